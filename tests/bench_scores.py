"""Do the scores mean something? (run by hand, not collected by pytest; tests/BENCHMARKS.md#scores)

    python tests/bench_scores.py calibrate                  # the six sample sets, for each feature net of MNIST
    python tests/bench_scores.py choose --run /tmp/agree    # autoencoder, rotation, contrastive: calibration, agreement
    python tests/bench_scores.py agree --run /tmp/agree     # the folder score against the digit classifier's FID
    python tests/bench_scores.py cifar                      # CIFAR-format fixtures: the machinery and the timing

MNIST comes from --data_dir (default data: mnist_data/, and the digit classifier,
data/mnist_classifier.pt, trained there the first time). --digits of its training images are
written as PNG files under --work (a folder of digits, and one of a subfolder per digit), read
as -d folder reads them. Feature nets are cached in --work/cache (XDG_CACHE_HOME), so a second
run reuses them; their training time is said when they are trained. The checkpoints of `choose`
and `agree` come from a short run, e.g.

    python gan_trainer.py -d mnist --use_gpu 0 --iters 200 --passes 6 --keep 0 --seed 1 --quiet --out_dir /tmp/agree
"""
import argparse
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gan_conf  # noqa: E402
import gan_trainer as gt  # noqa: E402

COLUMNS = ["fid", "kid", "density", "coverage", "memorised", "classes_covered"]


# ------------------------------------------------------------------ data

def write_mnist_pngs(data_dir, work, digits):
    """The first `digits` MNIST training images as PNG files: work/mnist_png/<i>_<digit>.png and
    work/mnist_classes/<digit>/<i>.png (written once)."""
    from PIL import Image
    flat, classes = work / f"mnist_png_{digits}", work / f"mnist_classes_{digits}"
    if not flat.exists():
        images, labels = gt.load_mnist(data_dir)[:digits, 0], gt.load_mnist_labels(data_dir)[:digits]
        for folder in (flat, classes):
            folder.mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(images, labels)):
            Image.fromarray(image).save(flat / f"{i:05d}_{label}.png")
            (classes / str(label)).mkdir(exist_ok=True)
            Image.fromarray(image).save(classes / str(label) / f"{i:05d}.png")
    return flat, classes


def folder_config():
    return gt.dataclasses.replace(gt.CONFIGS["folder"], sample_shape=(1, 28, 28))


def held_out_labels(folder):
    """The digit of each held-out image of a folder of MNIST PNGs (from the file names), in the
    order the Evaluator holds them."""
    _, names = gt.read_image_folder(folder, 28, 1, log=lambda *a: None)
    _, held = gt.held_out_split(len(names))
    return torch.tensor([int(Path(names[i]).stem[-1]) if "_" in Path(names[i]).stem else int(Path(names[i]).parts[0])
                         for i in held])


# ------------------------------------------------------------------ the self-supervised candidates

def rotation_net(channels):
    """Each image turned by a random multiple of 90 degrees, and the net's cost of telling which."""
    def loss(net, x, idx):
        turns = torch.randint(4, (len(x),))
        x = x.clone()
        for k in range(1, 4):
            x[turns == k] = x[turns == k].rot90(k, (2, 3))
        return F.cross_entropy(net(x), turns)
    return gan_conf.FeatureNet(channels, 4), loss


def autoencoder_net(channels):
    """The trainer's own: the trunk's 128 features decoded back to the image."""
    return gan_conf.FeatureNet(channels), gt.reconstruction_loss


def contrastive_net(channels, temperature=0.5):
    """SimCLR: two views of each image (shifted up to 3 pixels, noise added), told apart from
    the other images of the batch."""
    net = gan_conf.FeatureNet(channels, 4)  # its head replaced: a projection for the contrast
    net.head = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64))

    def view(x):
        padded = F.pad(x, (3, 3, 3, 3), value=-1.0)
        dx, dy = torch.randint(0, 7, (2, len(x)))
        crops = torch.stack([p[:, a:a + x.shape[2], b:b + x.shape[3]] for p, a, b in zip(padded, dy, dx)])
        return crops + 0.1 * torch.randn_like(crops)

    def loss(net, x, idx):
        z = F.normalize(net(torch.cat([view(x), view(x)])), dim=1)
        similarity = (z @ z.T / temperature).fill_diagonal_(float("-inf"))
        n = len(x)
        return F.cross_entropy(similarity, torch.cat([torch.arange(n, 2 * n), torch.arange(n)]))
    return net, loss


CANDIDATES = {"autoencoder": autoencoder_net, "rotation": rotation_net, "contrastive": contrastive_net}


def folder_evaluator(folder, task="product"):
    """The Evaluator of -d folder on `folder`: the product's feature net (the autoencoder
    without classes: cached for the other commands), or another candidate task's (trained here,
    for the same steps, never cached)."""
    if task in ("product", "autoencoder"):
        return gt.Evaluator(folder_config(), folder, None, print)
    product = gt.load_feature_net

    def candidate(real, log):
        net, loss = CANDIDATES[task](real.training_images.shape[1])
        started = time.time()
        gt.train_feature_net(net, real.training_images, loss, gt.FEATURE_STEPS, quiet=not sys.stdout.isatty())
        print(f"{task}: trained on {len(real.training_images)} images, {gt.FEATURE_STEPS} steps, in {time.time() - started:.0f} s")
        return net
    gt.load_feature_net = candidate
    try:
        return gt.Evaluator(folder_config(), folder, None, print)
    finally:
        gt.load_feature_net = product


# ------------------------------------------------------------------ the tables

def calibration_cases(evaluator, held_labels, n, seed=0):
    """The six sample sets of the calibration table, n images each, in [-1, 1]."""
    from torchvision.transforms import functional as TF
    g = torch.Generator().manual_seed(seed)
    held = evaluator.floor_images[-n:]
    real = gt.to_unit_range(held)
    one_class = held[held_labels[-n:] == 7]  # one digit, repeated
    return {"held-out real": real,
            "blurred real (Gaussian, sigma 1 px)": TF.gaussian_blur(real, 5, 1.0),
            "real plus noise (sigma 0.25)": (real + 0.25 * torch.randn(real.shape, generator=g)).clamp(-1, 1),
            "one digit (7) repeated": gt.to_unit_range(one_class[torch.arange(n) % len(one_class)]),
            "the training images": gt.to_unit_range(train_images(evaluator)[:n]),
            "uniform noise": torch.rand(real.shape, generator=g) * 2 - 1}


def train_images(evaluator):
    """Images the memorisation score compares with, as uint8 (its memory is in [-1, 1])."""
    return ((evaluator.memory + 1) / 2 * 255).round().to(torch.uint8)


def print_table(title, rows):
    cols = [c for c in COLUMNS if any(c in scores for scores, _ in rows.values())]
    print(f"\n{title}\n\n| sample set | " + " | ".join(cols) + " | seconds |\n|---|" + "---|" * (len(cols) + 1))
    for name, (scores, seconds) in rows.items():
        cells = [f"{scores[c]:.4g}" if isinstance(scores[c], float) else str(scores[c]) for c in cols]
        print(f"| {name} | " + " | ".join(cells) + f" | {seconds:.1f} |")


def calibrate(evaluator, held_labels, title, n):
    rows = {}
    for name, samples in calibration_cases(evaluator, held_labels, n).items():
        started = time.time()
        rows[name] = (evaluator.score(samples), time.time() - started)
    print_table(title, rows)
    return {name: scores for name, (scores, _) in rows.items()}


def mnist_evaluator(data_dir):
    return gt.Evaluator(gt.CONFIGS["mnist"], data_dir, None, print)


def mnist_held_labels(data_dir):
    return torch.from_numpy(gt.load_mnist_labels(data_dir)[-gt.MOST_REAL:].astype(np.int64))


def checkpoint_samples(run, n, seed=0):
    """n samples of each pass_<N>.pt of a run, drawn as --evaluate --seed draws them: {pass: samples}."""
    found = {}
    for path in gt.list_checkpoints(Path(run) / "mnist_params"):
        args = types.SimpleNamespace(params=path, out_dir=run, data_source="mnist", ema=None)
        cfg, gen, _, _ = gt.load_generator(args, torch.device("cpu"))
        torch.manual_seed(seed)
        noise = torch.randn(n, cfg.noise_dim)
        found[int(path.stem.split("_")[1])] = gt.generate_samples(gen, noise, cfg.batch_size).clamp(-1, 1)
    return found


def spearman(a, b):
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731 (no ties among these scores)
    return float(np.corrcoef(rank(np.asarray(a)), rank(np.asarray(b)))[0, 1])


def agreement(samples, digit, folders):
    """The digit classifier's scores and each folder net's on the same checkpoints' samples."""
    rows = {p: {"digit": digit.score(s), **{name: ev.score(s) for name, ev in folders.items()}}
            for p, s in samples.items()}
    names = ["digit", *folders]
    print("\n| pass | " + " | ".join(f"{k} fid | {k} kid | {k} coverage" for k in names) + " |\n|---|" +
          "---|---|---|" * len(names))
    for p, row in rows.items():
        print(f"| {p} | " + " | ".join(f"{row[k]['fid']:.4g} | {row[k]['kid']:.4g} | {row[k]['coverage']:.3f}"
                                      for k in names) + " |")
    for name in folders:
        print(f"Spearman rank correlation with the digit classifier, {name}: " + ", ".join(
            f"{key} {spearman([r['digit'][key] for r in rows.values()], [r[name][key] for r in rows.values()]):.3f}"
            for key in ("fid", "kid", "coverage")))


# ------------------------------------------------------------------ commands

def timed(what, fn):
    started = time.time()
    value = fn()
    print(f"{what}: {time.time() - started:.1f} s")
    return value


def evaluation_time(evaluator, samples):
    timed(f"scoring {len(samples)} samples", lambda: evaluator.score(samples))


def command_calibrate(args):
    flat, classes = write_mnist_pngs(args.data_dir, args.work, args.digits)
    digit = timed("the digit classifier's Evaluator", lambda: mnist_evaluator(args.data_dir))
    calibrate(digit, mnist_held_labels(args.data_dir), f"mnist, the digit classifier ({args.samples} samples)",
              args.samples)
    test = gt.to_unit_range(torch.from_numpy(gt.load_mnist(args.data_dir, "test").copy()))
    evaluation_time(digit, test)
    for folder, title in ((flat, "a folder of MNIST PNGs, the autoencoder"),
                          (classes, "a folder of MNIST PNGs in a subfolder per digit, its class net")):
        ev = timed("the folder's Evaluator", lambda: folder_evaluator(folder))
        calibrate(ev, held_out_labels(folder), f"{title} ({len(ev.floor_images)} held-out images, {args.samples} "
                  "samples)", min(args.samples, len(ev.floor_images)))
        evaluation_time(ev, test)


def command_choose(args):
    flat, _ = write_mnist_pngs(args.data_dir, args.work, args.digits)
    labels, digit = held_out_labels(flat), mnist_evaluator(args.data_dir)
    samples = checkpoint_samples(args.run, args.agree_samples)
    evaluators = {}
    for task in CANDIDATES:
        evaluators[task] = folder_evaluator(flat, task)
        calibrate(evaluators[task], labels, f"{task}, a folder of MNIST PNGs", min(args.samples,
                                                                                     len(evaluators[task].floor_images)))
    agreement(samples, digit, evaluators)


def command_agree(args):
    flat, classes = write_mnist_pngs(args.data_dir, args.work, args.digits)
    agreement(checkpoint_samples(args.run, args.agree_samples), mnist_evaluator(args.data_dir),
              {"folder": folder_evaluator(flat), "classes": folder_evaluator(classes)})


def command_cifar(args):
    """Random CIFAR-format batches of the real sizes (50,000 training images, a test_batch of
    10,000), with random labels: the classifier's training time and the scoring time."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import cifar_batch_bytes
    folder = args.work / "cifar_fixture" / "cifar-10-batches-py"
    if not folder.exists():
        folder.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
            rows = rng.integers(0, 256, (10000, 3072), dtype=np.uint8)
            (folder / name).write_bytes(cifar_batch_bytes(rows, rng.integers(0, 10, 10000).tolist()))
    ev = timed("the cifar Evaluator (reading, training the classifier, the reference features)",
               lambda: gt.Evaluator(gt.CONFIGS["cifar"], folder.parent, None, print))
    labels = torch.from_numpy(gt.read_cifar_batch(folder / "test_batch")[1])
    calibrate(ev, labels, "CIFAR-format fixture of random images (machinery only)", args.samples)
    evaluation_time(ev, gt.to_unit_range(ev.floor_images))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["calibrate", "choose", "agree", "cifar"])
    p.add_argument("--data_dir", default="data", help="holds mnist_data/ and mnist_classifier.pt")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_scores"), help="PNG folders and the feature cache")
    p.add_argument("--digits", type=int, default=5000, help="MNIST training images written as PNG files")
    p.add_argument("--samples", type=int, default=500, help="images per calibration sample set")
    p.add_argument("--agree_samples", type=int, default=2000, help="samples of each checkpoint")
    p.add_argument("--run", help="--out_dir of a short mnist run, for choose and agree")
    p.add_argument("--steps", type=int, default=gt.FEATURE_STEPS, help="batches that train a feature net")
    args = p.parse_args()
    os.environ["XDG_CACHE_HOME"] = str(args.work / "cache")
    gt.FEATURE_STEPS = args.steps
    if args.command in ("choose", "agree") and not args.run:
        p.error(f"{args.command} needs --run: the --out_dir of a short mnist run")
    {"calibrate": command_calibrate, "choose": command_choose, "agree": command_agree, "cifar": command_cifar}[
        args.command](args)


if __name__ == "__main__":
    main()
