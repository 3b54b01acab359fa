"""The same scores on every data source: features trained on the data itself (cached, read
weights-only), the scores against a floor of held-out real images, --evaluate FILE.npy.

The data is tiny and built here; the feature nets train for a few steps (FEATURE_STEPS), and
their cache lives in a temporary XDG_CACHE_HOME.
"""
import contextlib
import io
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import gan_trainer as gt
from conftest import (assert_one_line_error, cifar_batch_bytes, idx_bytes, make_cifar_dir, make_mnist_dir,
                      read_metrics, run_main)


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    """Each test's own cache of feature nets, trained for a few steps."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(gt, "FEATURE_STEPS", 3)
    return tmp_path / "cache" / "gan_trainer"


# ------------------------------------------------------------------ tiny data of every kind

def make_image_folder(root, classes=("a", "b"), per_class=32):
    """8 x 8 images: class a bright on the left, class b bright on top; in one subfolder per
    class, or (classes=None) all at the top level."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes or ("", "")):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            pixels = rng.integers(0, 60, (8, 8, 3), dtype=np.uint8)
            pixels[(slice(None), slice(0, 4)) if c == 0 else (slice(0, 4),)] += 180
            Image.fromarray(pixels).save(folder / f"{c}_{k}.png")
    return root


def make_labelled_mnist(root):
    """64 training and 32 test "digits" with labels: what the digit classifier trains on."""
    rng = np.random.default_rng(1)
    data = make_mnist_dir(root, images=rng.integers(0, 256, (64, 28, 28), dtype=np.uint8))
    folder = data / "mnist_data"
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(2049, np.arange(64) % 10))
    (folder / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(2051, rng.integers(0, 256, (32, 28, 28))))
    (folder / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(2049, np.arange(32) % 10))
    return data


def make_labelled_cifar(root, per_batch=16):
    """CIFAR-10 batches with ten classes, and a test_batch."""
    folder = make_cifar_dir(root, per_batch) / "cifar-10-batches-py"
    rng = np.random.default_rng(2)
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        rows = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        (folder / name).write_bytes(cifar_batch_bytes(rows, [k % 10 for k in range(per_batch)]))
    return root


TRAIN = ["--batch_size", 8, "--iters", 2, "--passes", 1, "--seed", 1, "--use_gpu", 0, "--quiet",
         "--eval_every", 1, "--samples", 24]


def quietly(argv):
    """gan_trainer.main(argv) of a training run, its output kept: (exit status, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = gt.main([str(a) for a in argv] + ["--compile", "0"])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One trained pass (scored with --eval_every 1) on each kind of data: {name: (argv, out_dir, stdout)}."""
    root = tmp_path_factory.mktemp("runs")
    data = {"uniform": [], "mnist": ["--data_dir", make_labelled_mnist(root / "mnist")],
            "cifar": ["--data_dir", make_cifar_dir(root / "cifar", per_batch=16)],
            "folder": ["--data_dir", make_image_folder(root / "plain", classes=None), "--image_size", 8],
            "folder_classes": ["--data_dir", make_image_folder(root / "classes"), "--image_size", 8,
                               "--conditional", 1]}
    done = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root / "cache"))
        mp.setattr(gt, "FEATURE_STEPS", 3)
        for name, argv in data.items():
            source = name.split("_")[0]
            out = root / "out" / name
            code, stdout = quietly(["-d", source, *TRAIN, *argv, "--out_dir", out])
            assert code == 0, stdout
            done[name] = (["-d", source, "--use_gpu", 0, "--out_dir", out], argv[:2], out, stdout)
    return done


# ------------------------------------------------------------------ --eval_every and --evaluate everywhere

IMAGE_SCORES = {"fid", "kid", "density", "coverage", "memorised"}
EXPECTED = {"uniform": {"inside", "cells_covered", "sliced_w1"}, "mnist": IMAGE_SCORES | {"classes_covered"},
            "cifar": IMAGE_SCORES, "folder": IMAGE_SCORES,
            "folder_classes": IMAGE_SCORES | {"classes_covered", "label_accuracy", "label_accuracy_per_class"}}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_eval_every_records_the_scores_and_the_floor(runs, name):
    _, _, out, stdout = runs[name]
    source = name.split("_")[0]
    record = [m for m in read_metrics(out / f"{source}_params" / "metrics.jsonl") if "eval" in m][-1]
    assert EXPECTED[name] <= set(record["eval"])
    assert EXPECTED[name] - {"label_accuracy", "label_accuracy_per_class"} <= set(record["floor"])
    assert "Pass=0 eval: " in stdout and "real data (floor): " in stdout
    if source in ("cifar", "folder"):
        assert "training the evaluation features for" in stdout and "they are not Inception FIDs" in stdout


@pytest.mark.parametrize("name", [name for name in EXPECTED if name != "uniform"])  # uniform: as it was
def test_evaluate_scores_every_source_beside_the_floor(runs, name, capsys):
    apply, data, out, _ = runs[name]
    code, stdout, err = run_main([*apply, *data, "--evaluate", "--samples", 24], capsys)
    assert code == 0, err
    scores, floor = (line for line in stdout.splitlines() if "samples: " in line or line.startswith("real data"))
    assert "pass_0.pt: 24 samples: " in scores and floor.startswith("real data (floor): ")
    for key in EXPECTED[name] - {"label_accuracy_per_class"}:
        assert f"  {key}=" in "  " + scores.split("samples: ")[1]
    if name.startswith(("cifar", "folder")):
        assert sum("they are not Inception FIDs" in line for line in stdout.splitlines()) == 1  # said once


def test_cifar_features_learn_its_classes_and_its_floor_is_the_test_batch(runs, tmp_path, capsys):
    apply, _, _, _ = runs["cifar"]
    data = make_labelled_cifar(tmp_path / "labelled")
    code, stdout, err = run_main([*apply, "--data_dir", data, "--evaluate", "--samples", 24], capsys)
    assert code == 0, err
    assert "a classifier of its 10 classes, 80 images" in stdout and "the floor: 16 held-out images" in stdout
    assert "classes_covered=" in stdout
    _, stdout, _ = run_main([*runs["cifar"][0], *runs["cifar"][1], "--evaluate", "--samples", 24], capsys)
    assert "an autoencoder, 72 images" in stdout  # one class only: no classes to learn


def test_label_accuracy_draws_each_class_as_generate_label_does(runs, monkeypatch, capsys):
    apply, data, _, _ = runs["folder_classes"]
    asked, generate_samples = [], gt.generate_samples

    def spy(gen, noise, batch_size, generator=None, labels=None):
        asked.append(labels.tolist())
        return generate_samples(gen, noise, batch_size, generator, labels)
    monkeypatch.setattr(gt, "generate_samples", spy)
    code, stdout, err = run_main([*apply, *data, "--evaluate", "--samples", 24], capsys)
    assert code == 0, err
    assert asked == [[k % 2 for k in range(24)], [0] * 12, [1] * 12]  # the scores' draw, then each class alone
    assert "label_accuracy=" in stdout


@pytest.mark.parametrize("source", ["mnist", "folder"])
def test_scoring_while_training_moves_no_number_of_the_run_and_its_resume_stays_exact(tmp_path, source):
    """The feature net is trained by the first scored run and read by the resumed one: neither
    may draw from the training's random stream."""
    data = make_labelled_mnist(tmp_path / "mnist") if source == "mnist" else \
        make_image_folder(tmp_path / "images", classes=None)
    base = ["-d", source, "--data_dir", data, "--batch_size", 8, "--iters", 2, "--seed", 1, "--use_gpu", 0, "--quiet",
            *(["--image_size", 8] if source == "folder" else [])]
    scored = [*base, "--eval_every", 1, "--samples", 24]
    for argv, out in (([*base, "--passes", 2], "plain"), ([*scored, "--passes", 2], "scored"),
                      ([*scored, "--passes", 1], "resumed"), ([*scored, "--passes", 2, "--resume"], "resumed")):
        code, stdout = quietly([*argv, "--out_dir", tmp_path / out])
        assert code == 0, stdout
    last = {out: torch.load(tmp_path / out / f"{source}_params" / "pass_1.pt", weights_only=True)
            for out in ("plain", "scored", "resumed")}
    for out in ("scored", "resumed"):
        for net in ("generator", "discriminator"):
            assert all(torch.equal(v, last["plain"][net][k]) for k, v in last[out][net].items()), (out, net)


# ------------------------------------------------------------------ --evaluate FILE.npy

@pytest.mark.parametrize("name", ["uniform", "folder"])
def test_evaluate_file_prints_what_evaluate_prints_for_the_same_draw(runs, name, tmp_path, capsys):
    apply, data, _, _ = runs[name]
    code, _, err = run_main([*apply, "--generate", 30, "--seed", 4, "--output", tmp_path / "g"], capsys)
    assert code == 0, err
    code, from_file, err = run_main([*apply, *data, "--evaluate", tmp_path / "g.npy"], capsys)
    assert code == 0, err
    code, from_g, err = run_main([*apply, *data, "--evaluate", "--samples", 30, "--seed", 4], capsys)
    assert code == 0, err

    def figures(text):
        return [line.split("samples: ")[-1] for line in text.splitlines() if "samples: " in line or "(floor)" in line]
    assert figures(from_file) == figures(from_g) and len(figures(from_g)) == 2
    assert f"{tmp_path / 'g.npy'}: 30 samples: " in from_file


def test_evaluate_file_reads_the_labels_beside_it(runs, tmp_path, capsys):
    apply, data, _, _ = runs["folder_classes"]
    assert run_main([*apply, "--generate", 20, "--label", "b", "--output", tmp_path / "g"], capsys)[0] == 0
    code, stdout, err = run_main([*apply, *data, "--evaluate", tmp_path / "g.npy"], capsys)
    assert code == 0, err
    assert "label_accuracy=" in stdout


@pytest.mark.parametrize("array, says", [
    (np.zeros((5, 3), np.float32), "samples of shape (5, 3); -d uniform scores (n, 2)"),
    (np.full((5, 2), np.nan, np.float32), "NaN or infinite"),
    (np.zeros((5, 2), np.int64), "values of type int64"),
    (np.array([{"a": 1}] * 5, dtype=object), "an array of Python objects, which could run code"),
    (b"\x80\x04K\x01.", "no .npy header (numpy would unpickle it"),
    ({"generator": torch.zeros(2)}, "a zip archive (an .npz of arrays, or a checkpoint"),
    (None, "not read as a .npy array"),
])
def test_evaluate_file_refuses_what_is_not_samples_in_one_line(tmp_path, capsys, array, says):
    path = tmp_path / "odd.npy"
    if isinstance(array, bytes):
        path.write_bytes(array)
    elif isinstance(array, dict):
        torch.save(array, path)
    elif array is not None:
        np.save(path, array, allow_pickle=True)
    code, _, err = run_main(["-d", "uniform", "--use_gpu", 0, "--evaluate", path], capsys)
    assert_one_line_error(code, err, str(path), says)


def test_evaluate_file_refuses_odd_labels_and_images_out_of_range(runs, tmp_path, capsys):
    np.save(tmp_path / "p.npy", np.zeros((5, 2), np.float32))
    np.save(tmp_path / "p.labels.npy", np.zeros(4, np.int64))
    code, _, err = run_main(["-d", "uniform", "--use_gpu", 0, "--evaluate", tmp_path / "p.npy"], capsys)
    assert_one_line_error(code, err, "p.labels.npy", "expected 5 integer classes")
    np.save(tmp_path / "p.labels.npy", np.zeros(5, np.int64))
    code, _, err = run_main(["-d", "uniform", "--use_gpu", 0, "--evaluate", tmp_path / "p.npy"], capsys)
    assert_one_line_error(code, err, "p.labels.npy", "uniform here has no classes")
    np.save(tmp_path / "i.npy", np.full((5, 3, 8, 8), 2.0, np.float32))
    code, _, err = run_main(["-d", "folder", "--use_gpu", 0, "--data_dir", runs["folder"][1][1], "--evaluate",
                             tmp_path / "i.npy"], capsys)
    assert_one_line_error(code, err, "values from 2 to 2", "[-1, 1]")
    code, _, err = run_main(["-d", "uniform", "--use_gpu", 0, "--evaluate", tmp_path / "p.npy", "--samples", 9], capsys)
    assert_one_line_error(code, err, "--samples does not apply to --evaluate FILE")


# ------------------------------------------------------------------ the feature cache

def folder_features(root):
    cfg = gt.dataclasses.replace(gt.CONFIGS["folder"], sample_shape=(3, 8, 8))
    return gt.feature_data(cfg, root)


def test_features_are_trained_once_per_data_and_cached_outside_the_folder(tmp_path, cache_home):
    root = make_image_folder(tmp_path / "images", classes=None)
    before = sorted(p.name for p in root.rglob("*"))
    said = []
    first = gt.load_feature_net(folder_features(root), said.append)
    assert len(said) == 1 and said[0].startswith("training the evaluation features for the folder")
    assert "an autoencoder, 58 images" in said[0] and "the floor: 6 held-out images" in said[0]
    said.clear()
    again = gt.load_feature_net(folder_features(root), said.append)
    assert len(said) == 1 and said[0].startswith("evaluation features for the folder")  # read, not trained
    x = torch.rand(4, 3, 8, 8)
    assert torch.equal(first.features(x), again.features(x))
    for cached in cache_home.glob("features-*.pt"):
        cached.unlink()
    anew = gt.load_feature_net(folder_features(root), said.append)  # trained again: the same net, the same ruler
    assert torch.allclose(first.features(x), anew.features(x), atol=1e-5)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(root / "0_0.png")  # a changed image: other data, other features
    said.clear()
    gt.load_feature_net(folder_features(root), said.append)
    assert said[0].startswith("training the evaluation features")
    assert len(list(cache_home.glob("features-*.pt"))) == 2
    assert sorted(p.name for p in root.rglob("*")) == before  # nothing written in the folder


def test_a_folder_without_classes_gets_an_autoencoder_that_draws_its_held_out_images_back(tmp_path):
    real = folder_features(make_image_folder(tmp_path / "images", classes=None))
    held = gt.to_unit_range(real.held_out)
    net = gt.FeatureNet(3)
    torch.manual_seed(0)
    with torch.no_grad():
        untrained = gt.reconstruction_loss(net.eval(), held).item()
    gt.train_feature_net(net, real.training_images, gt.reconstruction_loss, steps=150)
    with torch.no_grad():
        drawn = net(held)
        trained = gt.reconstruction_loss(net, held).item()
    assert drawn.shape == (len(held), 3, 32, 32) and net.features(held).shape == (len(held), 128)
    assert trained < untrained / 4  # images it never saw, drawn back from 128 features


class RunsCode:
    """A pickle that runs a shell command when loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_a_crafted_feature_cache_runs_no_code_and_is_trained_again_in_one_line(tmp_path, cache_home, how):
    real = folder_features(make_image_folder(tmp_path / "images"))
    gt.load_feature_net(real, lambda *a: None)
    cached, = cache_home.glob("features-*.pt")
    marker = tmp_path / "code_ran"
    if how == "pickle":
        cached.write_bytes(pickle.dumps(RunsCode(marker)))
    else:
        torch.save({"state_dict": RunsCode(marker), "key": "x"}, cached)
    said = []
    net = gt.load_feature_net(real, said.append)
    assert not marker.exists()
    assert len(said) == 1 and said[0].startswith("training the evaluation features") and "unusable" in said[0]
    assert isinstance(net, gt.FeatureNet)
    said.clear()
    gt.load_feature_net(real, said.append)
    assert said[0].startswith("evaluation features for")  # the cache written anew is used


def test_a_cache_of_other_shapes_or_non_finite_weights_is_trained_again(tmp_path, cache_home):
    real = folder_features(make_image_folder(tmp_path / "images"))
    net = gt.load_feature_net(real, lambda *a: None)
    cached, = cache_home.glob("features-*.pt")
    key = torch.load(cached)["key"]
    for state in ({"head.weight": torch.zeros(3, 3)},
                  {k: torch.full_like(v, float("nan")) for k, v in net.state_dict().items()}):
        torch.save({"state_dict": state, "key": key}, cached)
        said = []
        gt.load_feature_net(real, said.append)
        assert len(said) == 1 and "unusable" in said[0]


# ------------------------------------------------------------------ the scores, on answers known beforehand

def cloud(n, d=8, shift=0.0, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


def test_kid_is_zero_for_one_distribution_and_the_kernel_distance_of_two_points():
    a, b = cloud(2000), cloud(2000, seed=1)
    assert abs(gt.kernel_inception_distance(a, b)) < 0.01
    assert gt.kernel_inception_distance(a, cloud(2000, shift=1.0, seed=1)) > 1.0
    # unbiased at a few hundred: an average near 0 over draws, where the biased estimate stays above
    small = [gt.kernel_inception_distance(cloud(200, seed=s), cloud(200, seed=100 + s)) for s in range(10)]
    assert abs(np.mean(small)) < 0.01 and min(small) < 0 < max(small)
    # point masses at 0 and at 1 in one dimension: k(0,0) + k(1,1) - 2 k(0,1) = 1 + 8 - 2
    assert gt.kernel_inception_distance(torch.zeros(10, 1), torch.ones(7, 1)) == pytest.approx(7.0)


def test_density_and_coverage_of_the_same_cloud_of_a_disjoint_one_and_of_a_collapse():
    real = cloud(500)
    radii = gt.nearest_neighbour_radii(real)
    same = gt.density_coverage(real, real, radii)
    assert same["coverage"] == 1.0 and same["density"] == pytest.approx(1.0, abs=0.005)  # k balls each, but ties
    assert gt.density_coverage(real, cloud(500, shift=50.0), radii) == {"density": 0.0, "coverage": 0.0}
    fresh = gt.density_coverage(real, cloud(500, seed=1), radii)
    assert 0.7 < fresh["density"] < 1.3 and fresh["coverage"] > 0.9
    collapsed = gt.density_coverage(real, real[:1].repeat(500, 1), radii)  # every sample one real point
    assert collapsed["coverage"] < 0.05


def test_label_scores_and_the_class_histogram_of_any_number_of_classes():
    scores = gt.label_scores(torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 1, 1]), 3)
    assert scores == {"label_accuracy": 0.5, "label_accuracy_per_class": [1.0, 0.3333, None]}
    shares = gt.class_histogram_scores(torch.tensor([0] * 90 + [1] * 6 + [2] * 4), classes=4)
    assert shares["classes_covered"] == 2  # 6% and 90% reach a fifth of 25%; 4% does not
    assert "class_shares=" not in gt.format_scores(shares) and "label_accuracy_per_class" not in \
        gt.format_scores(scores)
