"""The evaluation figures of `--evaluate` / `--eval_every` on inputs whose answer is known."""
import gzip
import math
import struct

import numpy as np
import pytest
import torch

import gan_trainer as gt


def grid_points(n_side=100):
    """Points at the centres of an n x n grid over [0, 1)^2: as uniform as points get."""
    c = (torch.arange(n_side, dtype=torch.float64) + 0.5) / n_side
    return torch.cartesian_prod(c, c)


def test_uniform_scores_of_the_target_are_perfect():
    pts = grid_points()
    scores = gt.uniform_scores(pts, pts.clone())
    assert scores["inside"] == 1.0
    assert scores["cells_covered"] == 1.0
    assert scores["sliced_w1"] == pytest.approx(0.0, abs=1e-12)


def test_points_outside_the_square_are_counted():
    pts = grid_points()
    moved = pts.clone()
    moved[:3000, 0] += 1.0  # the points with x < 0.3 pushed out to the right
    scores = gt.uniform_scores(moved, pts)
    assert scores["inside"] == pytest.approx(0.7)
    # the three columns of cells with x < 0.3 are empty now: 30 of the 100 cells
    assert scores["cells_covered"] == pytest.approx(0.7)
    assert scores["sliced_w1"] > 0.05


def test_a_collapsed_cloud_covers_one_cell():
    pts = torch.full((1000, 2), 0.55, dtype=torch.float64)
    scores = gt.uniform_scores(pts, grid_points(32)[:1000])
    assert scores["inside"] == 1.0
    assert scores["cells_covered"] == pytest.approx(0.01)


def test_sliced_wasserstein_of_a_shift():
    a = torch.rand(4000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shift = torch.tensor([0.2, 0.0], dtype=torch.float64)
    # W1 of a shift along each direction theta is |0.2 cos theta|; its mean over theta is 0.2 * 2 / pi.
    assert gt.sliced_wasserstein(a, a + shift, projections=2048) == pytest.approx(0.4 / math.pi, rel=0.03)


def test_frechet_distance_of_identical_and_shifted_features():
    f = torch.randn(2000, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert gt.frechet_distance(f, f) == pytest.approx(0.0, abs=1e-6)
    shift = torch.arange(8, dtype=torch.float64)
    assert gt.frechet_distance(f, f + shift) == pytest.approx(float((shift ** 2).sum()), rel=1e-6)
    assert gt.frechet_distance(f, 2 * f) > 1.0  # a different spread is seen too


def test_class_histogram_of_one_digit_and_of_all_digits():
    collapsed = gt.class_histogram_scores(torch.full((500,), 7))
    assert collapsed["classes_covered"] == 1
    assert collapsed["max_class_share"] == 1.0
    assert collapsed["kl_from_uniform"] == pytest.approx(math.log(10))
    balanced = gt.class_histogram_scores(torch.arange(1000) % 10)
    assert balanced["classes_covered"] == 10
    assert balanced["max_class_share"] == pytest.approx(0.1)
    assert balanced["kl_from_uniform"] == pytest.approx(0.0, abs=1e-12)


def test_memorisation_share():
    train = torch.randint(0, 256, (50, 1, 28, 28), generator=torch.Generator().manual_seed(0)).float()
    assert gt.memorisation_share(train[:10], train, typical=1.0) == 1.0  # copies of training images
    # exact on any CPU: the distance to the nearest image is computed directly, not through the
    # matrix product (whose round-off on values this large is several units on some CPUs)
    nudged = train[:10].clone()
    nudged[:, 0, 0, 0] += torch.tensor([0.5] * 5 + [2.0] * 5)  # 0.5 and 2.0 away from a training image
    assert gt.memorisation_share(nudged, train, typical=1.0) == 0.5
    far = torch.full((10, 1, 28, 28), 1e4)
    assert gt.memorisation_share(far, train, typical=1.0) == 0.0


def write_idx(path, magic, array):
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_mnist(tmp_path):
    """Two "digits": images bright on the left (label 0) or on the right (label 1)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "mnist_data"
    folder.mkdir()
    for prefix, n in (("train", 256), ("t10k", 64)):
        labels = rng.integers(0, 2, n)
        images = rng.integers(0, 40, (n, 28, 28))
        for img, lab in zip(images, labels):
            img[:, 14 * lab:14 * lab + 14] += 200
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", 2051, images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 2049, labels)
    return tmp_path


def test_digit_classifier_is_trained_once_then_cached(tiny_mnist):
    said = []
    net = gt.load_digit_classifier(tiny_mnist, log=said.append)
    assert (tiny_mnist / "mnist_classifier.pt").exists()
    assert any("test accuracy" in s for s in said)
    cached = torch.load(tiny_mnist / "mnist_classifier.pt")
    assert cached["test_accuracy"] > 0.95  # the two classes are easy
    said.clear()
    again = gt.load_digit_classifier(tiny_mnist, log=said.append)
    assert said == []  # loaded, not trained again
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(net(x), again(x))


def test_evaluator_scores_real_images_near_the_floor_and_one_class_as_collapsed(tiny_mnist):
    cfg = gt.CONFIGS["mnist"]
    data = torch.from_numpy(gt.load_mnist(tiny_mnist).copy())
    evaluator = gt.Evaluator(cfg, tiny_mnist, data, log=lambda *a: None)
    labels = gt.load_mnist_labels(tiny_mnist)
    one_class = data[torch.from_numpy(labels == 1)][:60]
    collapsed = evaluator.score(one_class)
    assert collapsed["classes_covered"] == 1
    real = evaluator.score(data[:200])
    assert real["classes_covered"] == 2
    assert real["fid"] < collapsed["fid"]


def test_label_accuracy_is_the_share_read_as_the_label_asked_for(tiny_mnist):
    """--evaluate of a conditional mnist G: real test digits with their own labels score near 1,
    with the labels swapped near 0."""
    data = torch.from_numpy(gt.load_mnist(tiny_mnist).copy())
    evaluator = gt.Evaluator(gt.CONFIGS["mnist"], tiny_mnist, data, log=lambda *a: None)
    test = gt.to_unit_range(torch.from_numpy(gt.load_mnist(tiny_mnist, "test").copy()))
    labels = torch.from_numpy(gt.load_mnist_labels(tiny_mnist, "test").astype(np.int64))
    assert evaluator.score(test, labels)["label_accuracy"] > 0.95
    assert evaluator.score(test, 1 - labels)["label_accuracy"] < 0.05
    assert "label_accuracy" not in evaluator.score(test)
