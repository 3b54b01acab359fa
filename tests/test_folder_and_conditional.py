"""Your own images (-d folder) and the class you ask for (--conditional 1).

The folders are built here: small images of mixed formats, sizes and modes, a corrupt file, a
text file, nested class folders. The decoded-image cache goes to a temporary XDG_CACHE_HOME.
"""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import gan_conf
import gan_trainer
from conftest import assert_one_line_error, idx_bytes, load_ckpt, make_mnist_dir, mnist_images, run_main


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    """The decoded-image cache of these tests lives in their own folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def shade(k):
    return (37 * k) % 200 + 30


def make_folder(root, per_class=12, classes=("cat", "dog"), loose=0):
    """root/<class>/<k>.<fmt> in several formats, sizes and modes, plus a corrupt image, a text
    file, a nested subfolder, and `loose` images at the top level."""
    formats = [("png", "RGB"), ("jpg", "RGB"), ("bmp", "L"), ("webp", "RGB"), ("gif", "P"), ("png", "RGBA"),
               ("png", "P"), ("jpg", "CMYK"), ("png", "LA")]
    for c, name in enumerate(classes):
        folder = root / name / ("nested" if c == 1 else "")
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            ext, mode = formats[k % len(formats)]
            size = (20 + 3 * k, 16 + 2 * (k % 4))  # mixed sizes, both orientations
            image = Image.new("RGB", size, (shade(k + c), 255 - shade(k), 90 * c))
            image = image.convert(mode) if mode != "P" else image.quantize(16)
            image.save(folder / f"{k:03d}.{ext}")
    for k in range(loose):
        Image.new("RGB", (18, 18), (200, 10, 10)).save(root / f"loose{k}.png")
    (root / classes[0] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really")
    (root / "notes.txt").write_text("not an image")
    return root


def listing(root):
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns, p.stat().st_size) for p in root.rglob("*"))


# ------------------------------------------------------------------ reading a folder

def test_a_folder_of_mixed_images_is_decoded_to_one_uint8_array(tmp_path):
    root = make_folder(tmp_path / "images")
    said = []
    images, names = gan_trainer.read_image_folder(root, 16, 3, log=said.append)
    assert images.shape == (24, 3, 16, 16) and images.dtype == np.uint8
    assert len(names) == 24 and all(not n.endswith((".txt", "broken.png")) for n in names)
    assert any(n.startswith("dog/nested/") for n in names)  # recursively
    skipped = [line for line in said if "could not be read" in line]
    assert len(skipped) == 1 and "1 image file" in skipped[0] and "cat/broken.png" in skipped[0]
    grey, _ = gan_trainer.read_image_folder(root, 9, 1, log=said.append)
    assert grey.shape == (24, 1, 9, 9)


def test_images_are_resized_on_the_shorter_side_and_centre_cropped(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    wide = Image.new("L", (60, 20), 0)
    wide.paste(255, (15, 0, 45, 20))  # only the middle half is white: a squeezed image would show black
    wide.save(root / "wide.png")
    frames = [Image.new("L", (16, 16), 200), Image.new("L", (16, 16), 10)]
    frames[0].save(root / "anim.gif", save_all=True, append_images=frames[1:])
    images, names = gan_trainer.read_image_folder(root, 8, 1)
    by_name = dict(zip(names, images))
    assert by_name["wide.png"].shape == (1, 8, 8) and (by_name["wide.png"] > 250).all()  # the centre, scaled
    assert (by_name["anim.gif"] == 200).all()  # a GIF's first frame


def test_the_decoded_folder_is_cached_and_rebuilt_when_its_files_change(tmp_path, cache_home):
    root = make_folder(tmp_path / "images", per_class=4)
    before = listing(root)
    said = []
    first, _ = gan_trainer.read_image_folder(root, 12, 3, log=said.append)
    assert not any("from the cache" in line for line in said)
    said.clear()
    again, _ = gan_trainer.read_image_folder(root, 12, 3, log=said.append)
    assert any("from the cache" in line for line in said) and np.array_equal(first, again)
    assert listing(root) == before  # nothing in the folder is written or changed
    cached = list((cache_home / "gan_trainer").iterdir())
    assert len(cached) == 2 and not any(str(p).startswith(str(root)) for p in cached)
    # another size is another cache; a changed, added or removed file rebuilds
    said.clear()
    gan_trainer.read_image_folder(root, 10, 3, log=said.append)
    assert not any("from the cache" in line for line in said)
    victim = root / "cat" / "000.png"
    Image.new("RGB", (20, 16), (255, 255, 255)).save(victim)
    os.utime(victim, ns=(1, 1))
    said.clear()
    changed, _ = gan_trainer.read_image_folder(root, 12, 3, log=said.append)
    assert not any("from the cache" in line for line in said) and not np.array_equal(changed, first)
    (root / "dog" / "new.png").write_bytes((root / "cat" / "001.jpg").read_bytes())
    grown, _ = gan_trainer.read_image_folder(root, 12, 3, log=lambda *a: None)
    assert len(grown) == len(first) + 1


def test_a_cache_that_is_not_the_trainers_is_rebuilt(tmp_path, cache_home):
    root = make_folder(tmp_path / "images", per_class=4)
    gan_trainer.read_image_folder(root, 12, 3, log=lambda *a: None)
    for p in (cache_home / "gan_trainer").glob("*.npy"):
        p.write_bytes(b"garbage")
    said = []
    images, _ = gan_trainer.read_image_folder(root, 12, 3, log=said.append)
    assert images.shape == (8, 3, 12, 12) and not any("from the cache" in line for line in said)


@pytest.mark.parametrize("size", [8, 9, 28, 30, 48, 64, 96])
def test_the_nets_are_built_for_any_size_the_kernel_rule_admits(size):
    cfg = gan_trainer.dataclasses.replace(gan_conf.CONFIGS["folder"], sample_shape=(3, size, size))
    assert gan_conf.image_size_ok(size)
    with torch.device("meta"):
        gen, dis = gan_conf.build_nets(cfg)
        images = gen(torch.randn(4, cfg.noise_dim))
        assert images.shape == (4, 3, size, size) and dis(images).shape == (4, 2)


@pytest.mark.parametrize("argv, says", [
    (["--image_size", 5], "--image_size 5"),
    (["--channels", 2], "invalid choice"),
])
def test_sizes_the_rule_rejects_are_one_line_errors(tmp_path, capsys, argv, says):
    root = make_folder(tmp_path / "images", per_class=4)
    code, _, err = run_main(["-d", "folder", "--data_dir", root, "--use_gpu", 0, "--out_dir", tmp_path / "out", *argv],
                            capsys)
    line = assert_one_line_error(code, err, says)
    assert "5" not in argv or "nearest size that works is 8" in line


@pytest.mark.parametrize("content, says", [
    ("no images", "no image in it or below it"),
    ("corrupt only", "none of its 1 image files could be read"),
    ("too few", "only 3 images, fewer than a batch of 16"),
    ("no folder", "not a folder"),
])
def test_a_folder_without_enough_usable_images_is_refused(tmp_path, capsys, content, says):
    root = tmp_path / "images"
    if content != "no folder":
        root.mkdir()
        (root / "readme.txt").write_text("hello")
    if content == "corrupt only":
        (root / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    if content == "too few":
        for k in range(3):
            Image.new("RGB", (10, 10)).save(root / f"{k}.png")
    code, _, err = run_main(["-d", "folder", "--data_dir", root, "--use_gpu", 0, "--batch_size", 16, "--image_size", 8,
                             "--out_dir", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, says)


def test_folder_flags_apply_to_folders_and_the_folder_is_required(tmp_path, capsys):
    code, _, err = run_main(["-d", "folder", "--use_gpu", 0, "--out_dir", tmp_path / "a"], capsys)
    assert_one_line_error(code, err, "-d folder needs --data_dir")
    code, _, err = run_main(["-d", "mnist", "--image_size", 32, "--use_gpu", 0, "--out_dir", tmp_path / "b"], capsys)
    assert_one_line_error(code, err, "apply to -d folder only")


# ------------------------------------------------------------------ training on a folder

FOLDER_RUN = ["-d", "folder", "--image_size", 16, "--batch_size", 8, "--iters", 2, "--passes", 1, "--seed", 3,
              "--use_gpu", 0, "--quiet"]


def test_a_folder_run_writes_what_the_other_sources_write(tmp_path, capsys):
    root = make_folder(tmp_path / "images")
    out = tmp_path / "out"
    code, stdout, err = run_main([*FOLDER_RUN, "--data_dir", root, "--out_dir", out], capsys)
    assert code == 0, err
    assert "training folder on cpu" in stdout and "cat/broken.png" in stdout
    assert Image.open(out / "folder_samples" / "train_pass0.png").size == (128, 128)  # 8 x 8 images of 16 px
    cfg = load_ckpt(out / "folder_params" / "pass_0.pt")["config"]
    assert (tuple(cfg["sample_shape"]), cfg["folder"], cfg["images"], cfg["classes"]) == \
           ((3, 16, 16), str(root.resolve()), 24, ())
    # --generate needs nothing but the checkpoint
    (root / "cat").rename(tmp_path / "gone")
    code, stdout, err = run_main(["-d", "folder", "--use_gpu", 0, "--generate", 5, "--out_dir", out], capsys)
    assert code == 0, err
    assert np.load(out / "folder_samples" / "generated.npy").shape == (5, 3, 16, 16)
    assert not (out / "folder_samples" / "generated.labels.npy").exists()


def test_a_folder_run_resumes_from_the_recorded_folder(tmp_path, capsys):
    root = make_folder(tmp_path / "images")
    out = tmp_path / "out"
    assert run_main([*FOLDER_RUN, "--data_dir", root, "--out_dir", out], capsys)[0] == 0
    code, stdout, err = run_main(["-d", "folder", "--resume", "--passes", 2, "--use_gpu", 0, "--quiet",
                                  "--out_dir", out], capsys)
    assert code == 0, err
    assert "from the cache" in stdout and load_ckpt(out / "folder_params" / "pass_1.pt")["pass"] == 1
    code, _, err = run_main(["-d", "folder", "--resume", "--passes", 3, "--use_gpu", 0, "--image_size", 32,
                             "--out_dir", out], capsys)
    assert_one_line_error(code, err, "--image_size 32 differs from the run's 16")


# ------------------------------------------------------------------ conditional

def test_conditional_nets_see_the_label():
    cfg = gan_trainer.dataclasses.replace(gan_conf.CONFIGS["mnist"], classes=tuple("0123456789"))
    torch.manual_seed(0)
    gen, dis = gan_conf.build_nets(cfg)
    assert gen.fc[0].in_features == 100 + 10 and dis.convs[0].in_channels == 1 + 10
    z = torch.randn(16, 100)
    with torch.no_grad():
        threes, sevens = gen(z, torch.full((16,), 3)), gen(z, torch.full((16,), 7))
        assert threes.shape == (16, 1, 28, 28) and not torch.allclose(threes, sevens)
        assert not torch.allclose(dis(threes, torch.full((16,), 3)), dis(threes, torch.full((16,), 7)))
    plain, _ = gan_conf.build_nets(gan_conf.CONFIGS["mnist"])  # unconditional: the tutorial's, unchanged
    assert plain.fc[0].in_features == 100


def conditional_mnist(tmp_path, n=60):
    images = mnist_images(n, seed=4)
    data = make_mnist_dir(tmp_path / "data", images=images)
    labels = np.arange(n) % 10
    (data / "mnist_data" / "train-labels-idx1-ubyte").write_bytes(idx_bytes(2049, labels))
    return data


def test_a_conditional_mnist_run_draws_a_row_per_digit_and_generates_the_labels_asked_for(tmp_path, capsys):
    data, out = conditional_mnist(tmp_path), tmp_path / "out"
    code, stdout, err = run_main(["-d", "mnist", "--conditional", 1, "--batch_size", 16, "--iters", 3, "--passes", 1,
                                  "--seed", 2, "--use_gpu", 0, "--quiet", "--data_dir", data, "--out_dir", out], capsys)
    assert code == 0, err
    assert Image.open(out / "mnist_samples" / "train_pass0.png").size == (280, 280)  # 10 digits x 10 samples
    ckpt = load_ckpt(out / "mnist_params" / "pass_0.pt")
    assert ckpt["config"]["classes"] == tuple("0123456789")
    assert ckpt["fixed_labels"][:30].tolist() == [0] * 10 + [1] * 10 + [2] * 10
    assert torch.equal(ckpt["fixed_noise"][:10], ckpt["fixed_noise"][10:20])  # the same noise down each column
    code, stdout, err = run_main(["-d", "mnist", "--use_gpu", 0, "--generate", 25, "--out_dir", out], capsys)
    assert code == 0, err
    samples_dir = out / "mnist_samples"
    assert np.load(samples_dir / "generated.labels.npy").tolist() == [k % 10 for k in range(25)]
    for label, index in (("7", 7), ("0", 0)):
        code, _, err = run_main(["-d", "mnist", "--use_gpu", 0, "--generate", 4, "--label", label, "--seed", 3,
                                 "--output", tmp_path / f"g{label}", "--out_dir", out], capsys)
        assert code == 0, err
        assert np.load(tmp_path / f"g{label}.labels.npy").tolist() == [index] * 4
    # the same noise asked for as a 7 and as a 0: G sees the label even when every row carries it
    # (drawn alone, a batch of one label loses it in G's batch norm, which subtracts the batch mean)
    sevens, zeros = np.load(tmp_path / "g7.npy"), np.load(tmp_path / "g0.npy")
    assert np.abs(sevens - zeros).max() > 1e-3
    code, _, err = run_main(["-d", "mnist", "--use_gpu", 0, "--generate", 4, "--label", "ten", "--out_dir", out], capsys)
    assert_one_line_error(code, err, "--label ten: not a class", "0-9")


def test_a_batch_smaller_than_the_classes_draws_them_in_turn(tmp_path, capsys):
    """Batches of 4 hold 4 of the 10 digits (training batches do too): the picture, --generate
    and --label draw each row among companions of the next classes, batch after batch."""
    data, out = conditional_mnist(tmp_path), tmp_path / "out"
    code, _, err = run_main(["-d", "mnist", "--conditional", 1, "--batch_size", 4, "--iters", 2, "--passes", 1,
                             "--seed", 2, "--use_gpu", 0, "--quiet", "--data_dir", data, "--out_dir", out], capsys)
    assert code == 0, err
    assert Image.open(out / "mnist_samples" / "train_pass0.png").size == (280, 280)
    for label in ("7", "0"):
        code, _, err = run_main(["-d", "mnist", "--use_gpu", 0, "--generate", 6, "--label", label, "--seed", 3,
                                 "--output", tmp_path / f"g{label}", "--out_dir", out], capsys)
        assert code == 0, err
        assert np.load(tmp_path / f"g{label}.labels.npy").tolist() == [int(label)] * 6
    assert np.abs(np.load(tmp_path / "g7.npy") - np.load(tmp_path / "g0.npy")).max() > 1e-3  # G saw the label
    gen = gan_conf.build_nets(gan_trainer.check_config(load_ckpt(out / "mnist_params" / "pass_0.pt")["config"]))[0]
    noise, labels = torch.randn(13, 100), torch.arange(13) % 10
    assert torch.equal(gan_trainer.generate_samples(gen, noise, 4, labels=labels)[4:8],
                       gen(noise[4:8], labels[4:8]))  # the second batch: digits 4-7, no companion needed


def test_label_needs_a_conditional_generator(uniform_run, tmp_path, capsys):
    code, _, err = run_main(["-d", "uniform", "--use_gpu", 0, "--generate", 4, "--label", 1,
                             "--params", uniform_run.params("uniform") / "pass_1.pt", "--output", tmp_path / "g"], capsys)
    assert_one_line_error(code, err, "--label applies to a conditional generator")


def test_a_conditional_folder_takes_its_classes_from_the_subfolders(tmp_path, capsys):
    root = make_folder(tmp_path / "images", classes=("cat", "dog", "owl"))
    out = tmp_path / "out"
    code, _, err = run_main([*FOLDER_RUN, "--conditional", 1, "--data_dir", root, "--out_dir", out], capsys)
    assert code == 0, err
    ckpt = load_ckpt(out / "folder_params" / "pass_0.pt")
    assert ckpt["config"]["classes"] == ("cat", "dog", "owl")
    assert Image.open(out / "folder_samples" / "train_pass0.png").size == (160, 48)  # 3 rows of 10
    code, _, err = run_main(["-d", "folder", "--use_gpu", 0, "--generate", 3, "--label", "owl", "--out_dir", out], capsys)
    assert code == 0, err
    assert np.load(out / "folder_samples" / "generated.labels.npy").tolist() == [2, 2, 2]


def test_a_conditional_folder_needs_every_image_in_a_class_folder(tmp_path, capsys):
    root = make_folder(tmp_path / "images", loose=2)
    code, _, err = run_main([*FOLDER_RUN, "--conditional", 1, "--data_dir", root, "--out_dir", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, "one subfolder per class", "2 images sit at the top level")


def test_conditional_needs_labelled_images(tmp_path, capsys):
    code, _, err = run_main(["-d", "uniform", "--conditional", 1, "--use_gpu", 0, "--out_dir", tmp_path], capsys)
    assert_one_line_error(code, err, "--conditional 1 needs images with classes")
    data = make_mnist_dir(tmp_path / "data", n=40)  # no labels file
    code, _, err = run_main(["-d", "mnist", "--conditional", 1, "--use_gpu", 0, "--data_dir", data,
                             "--out_dir", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, "train-labels-idx1-ubyte", "get_mnist_data.sh")


def test_a_conditional_run_resumes_bit_for_bit(tmp_path, capsys):
    data = conditional_mnist(tmp_path)
    argv = ["-d", "mnist", "--conditional", 1, "--batch_size", 16, "--iters", 3, "--seed", 2, "--use_gpu", 0,
            "--quiet", "--data_dir", data]
    assert run_main([*argv, "--passes", 2, "--out_dir", tmp_path / "full"], capsys)[0] == 0
    assert run_main([*argv, "--passes", 1, "--out_dir", tmp_path / "split"], capsys)[0] == 0
    code, _, err = run_main(["-d", "mnist", "--resume", "--passes", 2, "--use_gpu", 0, "--quiet", "--data_dir", data,
                             "--out_dir", tmp_path / "split"], capsys)
    assert code == 0, err
    a, b = (load_ckpt(tmp_path / k / "mnist_params" / "pass_1.pt") for k in ("full", "split"))
    assert all(torch.equal(a["generator"][k], b["generator"][k]) for k in a["generator"])
    assert all(torch.equal(a["discriminator"][k], b["discriminator"][k]) for k in a["discriminator"])
    code, _, err = run_main(["-d", "mnist", "--resume", "--passes", 3, "--conditional", 0, "--use_gpu", 0,
                             "--data_dir", data, "--out_dir", tmp_path / "split"], capsys)
    assert_one_line_error(code, err, "--conditional 0 differs from the run's 1")


def test_the_checkpoint_of_a_conditional_run_is_checked_too(tmp_path, capsys):
    data, out = conditional_mnist(tmp_path), tmp_path / "out"
    assert run_main(["-d", "mnist", "--conditional", 1, "--batch_size", 16, "--iters", 2, "--passes", 1, "--use_gpu", 0,
                     "--quiet", "--data_dir", data, "--out_dir", out], capsys)[0] == 0
    path = out / "mnist_params" / "pass_0.pt"
    ckpt = torch.load(path)
    ckpt["fixed_labels"][0] = 10  # not a class
    torch.save(ckpt, path)
    code, _, err = run_main(["-d", "mnist", "--use_gpu", 0, "--generate", 4, "--out_dir", out], capsys)
    assert_one_line_error(code, err, "fixed_labels")
    ckpt["fixed_labels"][0] = 0
    ckpt["config"]["classes"] = ["a"]  # one class is no classes
    torch.save(ckpt, path)
    code, _, err = run_main(["-d", "mnist", "--use_gpu", 0, "--generate", 4, "--out_dir", out], capsys)
    assert_one_line_error(code, err, "config.classes")
    assert json.dumps(list(gan_trainer.CHECKPOINT_KEYS))  # plain strings
