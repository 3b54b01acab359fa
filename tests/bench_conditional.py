"""How well `--generate N --label K` draws class K: three ways of drawing a batch of one label,
scored per class by the digit classifier (tests/BENCHMARKS.md, "The class you ask for").

    python tests/bench_conditional.py PATH/mnist_params/pass_1.pt [--samples 1000] [--data_dir data]

- alone: the batch holds only class K (the trainer before this fix). G's first batch norm
  subtracts the batch mean, and with it the label, which every row shares;
- companions: each row of class K sits in a batch labelled as training labels its batches (all
  classes in turn), the other rows dropped: what the trainer does now (among_companions);
- reference statistics: the batch of class K alone, normalised with the batch-norm statistics of
  a batch labelled as in training;
- cycling: the rows of class K out of a draw whose labels cycle over all classes (--generate
  without --label), for comparison.
A first row gives the floor: the share of MNIST's real test digits of each class that the
classifier reads as their class.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gan_trainer as gt  # noqa: E402
from gan_conf import build_nets  # noqa: E402


@torch.no_grad()
def alone(gen, noise, label, batch_size):
    return torch.cat([gen(z, torch.full((len(z),), label)) for z in noise.split(batch_size)])


@torch.no_grad()
def reference_statistics(gen, noise, label, batch_size):
    """Each batch normalised with the statistics of a batch of cycling labels and fresh noise."""
    norms = [m for m in gen.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    out = []
    for z in noise.split(batch_size):
        stats = {}

        def capture(m, inputs, output):
            x = inputs[0]
            dims = [0, *range(2, x.dim())]
            stats[m] = (x.mean(dims), x.var(dims, unbiased=False))

        hooks = [m.register_forward_hook(capture) for m in norms]
        gen(torch.randn(batch_size, z.shape[1]), torch.arange(batch_size) % gen.classes)
        for h in hooks:
            h.remove()
        hooks = [m.register_forward_hook(lambda m, inputs, output: F.batch_norm(
            inputs[0], *stats[m], m.weight, m.bias, False, 0.0, m.eps)) for m in norms]
        out.append(gen(z, torch.full((len(z),), label)))
        for h in hooks:
            h.remove()
    return torch.cat(out)


def companions(gen, noise, label, batch_size):
    return gt.generate_samples(gen, noise, batch_size, labels=torch.full((len(noise),), label))


def cycling(gen, noise, label, batch_size):
    """The same noise drawn with the labels cycling (--generate without --label); only the rows of
    the class are scored: the companions' way, with none of them dropped."""
    labels = torch.arange(len(noise) * gen.classes) % gen.classes
    wide = torch.randn(len(labels), noise.shape[1])
    wide[labels == label] = noise
    return gt.generate_samples(gen, wide, batch_size, labels=labels)[labels == label]


WAYS = {"alone": alone, "companions": companions, "reference statistics": reference_statistics, "cycling": cycling}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--data_dir", default="data")
    p.add_argument("--ways", nargs="+", default=list(WAYS), choices=list(WAYS))
    a = p.parse_args()
    torch.set_num_threads(2)
    ckpt = gt.load_checkpoint(a.checkpoint, "mnist")
    cfg = gt.check_config(ckpt["config"])
    gen, _ = build_nets(cfg)
    gen.load_state_dict(ckpt["generator"])
    gen.eval()
    classifier = gt.load_digit_classifier(a.data_dir)
    print(f"{a.checkpoint}: {a.samples} samples per class, read by the digit classifier")
    print("| way | " + " | ".join(str(k) for k in range(10)) + " | mean | seconds |")
    print("|---|" + "---|" * 12)
    # the floor per class: how often the classifier reads MNIST's real test digits as their own
    real = torch.tensor(gt.load_mnist(a.data_dir, "test"))
    truth = torch.tensor(gt.load_mnist_labels(a.data_dir, "test")).long()
    with torch.no_grad():
        read = torch.cat([classifier(gt.to_unit_range(c)).argmax(1) for c in real.split(500)])
    accuracy = [read[truth == k].eq(k).double().mean().item() for k in range(10)]
    print("| real test digits (the floor) | " + " | ".join(f"{v:.1%}" for v in accuracy)
          + f" | {read.eq(truth).double().mean().item():.1%} | |")
    for name in a.ways:
        draw = WAYS[name]
        accuracy, started = [], time.time()
        for k in range(10):
            torch.manual_seed(100 + k)
            noise = torch.randn(a.samples, cfg.noise_dim)
            with torch.no_grad():
                digits = torch.cat([classifier(c).argmax(1) for c in draw(gen, noise, k, cfg.batch_size).split(500)])
            accuracy.append(digits.eq(k).double().mean().item())
        print(f"| {name} | " + " | ".join(f"{v:.1%}" for v in accuracy)
              + f" | {sum(accuracy) / 10:.1%} | {time.time() - started:.1f} |")


if __name__ == "__main__":
    main()
