"""Speed of the training iteration: gan_trainer.train_step and variants against the plain port.

Run by hand (not collected by pytest):

    python tests/bench_speed.py --data_source all --iters 50 --rounds 3
    python tests/bench_speed.py --data_source mnist --iters 10 --variants ref,fp32,cl,bf16,bf16+cl,compiled

Every variant trains its own copy of the same nets (same seed) on the loop's real
work per iteration: the batch (the trainer's block draws, or a draw per batch for the
plain port) and its scaling, noise, the step, the schedule and TrainerLog
accumulation, and the loss lines every 100 iterations.
Variants run interleaved, in rounds, and the median round counts: the machine may
be shared.  On the CPU all of them run with the trainer's malloc setting
(gan_trainer.keep_freed_memory, which cannot be undone within a process), so the
ratios compare the steps alone; `--keep_freed_memory 0` leaves glibc's defaults, to
measure the setting itself in separate processes.
Work is counted analytically (2 x multiply-adds of every linear /
conv / transposed conv, forward and backward as each implementation does it),
per D-iteration and per G-iteration, then weighted by the observed D share.
Images: random uint8 data of the right shape (no download, no data files read).
"""
import argparse
import copy
import dataclasses
import math
import os
import statistics
import sys
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import gan_trainer as T  # noqa: E402
from gan_conf import CONFIGS, build_nets  # noqa: E402


# ---------------------------------------------------------------- analytic work

def layer_macs(net, example):
    """[(name, multiply-adds per batch)] of every linear / conv / transposed conv, from the shapes."""
    rows, hooks = [], []

    def hook(m, inp, out, name):
        if isinstance(m, nn.Linear):
            rows.append((name, out.numel() * m.in_features))
        elif isinstance(m, nn.Conv2d):
            rows.append((name, out.numel() * m.in_channels * math.prod(m.kernel_size) // m.groups))
        elif isinstance(m, nn.ConvTranspose2d):
            rows.append((name, inp[0].numel() * m.out_channels * math.prod(m.kernel_size) // m.groups))
    for name, m in net.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            hooks.append(m.register_forward_hook(lambda m, i, o, name=name: hook(m, i, o, name)))
    with torch.no_grad():
        out = net(example)
    for h in hooks:
        h.remove()
    return rows, out


def work(cfg, batch):
    """FLOPs per D-iteration and per G-iteration for each implementation."""
    gen, dis = build_nets(cfg)
    g_rows, fake = layer_macs(gen, torch.randn(batch, cfg.noise_dim))
    d_rows, _ = layer_macs(dis, fake)
    Gf, Df = 2 * sum(m for _, m in g_rows), 2 * sum(m for _, m in d_rows)
    G_bp = 2 * Gf - 2 * g_rows[0][1]      # weight grads + input grads but the first layer's
    D_bp = 2 * Df - 2 * d_rows[0][1]
    D_in = Df                              # input grads only (G trains through D)
    D_all = 2 * Df                         # weight and input grads (the plain port's G update)
    flops = {
        # losses: D(x), G(z), D(G(z)) [shared]; D-update: backward on fake, D(x) again + backward
        "product": (Gf + 2 * Df + D_bp + Df + D_bp, Gf + 2 * Df + D_in + G_bp),
        "graphed": (2 * (Gf + 2 * Df) + D_bp + Df + D_bp, 2 * (Gf + 2 * Df) + D_in + G_bp),
        # losses and the gradients of both candidate updates every iteration; D's update on x after
        "compiled": (Gf + 2 * Df + D_bp + D_in + G_bp + Df + D_bp, Gf + 2 * Df + D_bp + D_in + G_bp),
        # losses: D(x), G(z), D(G(z)), G(z), D(G(z)); then the update recomputes its forwards
        "ref": (3 * Df + 2 * Gf + Gf + Df + D_bp + Df + D_bp, 3 * Df + 2 * Gf + Gf + Df + D_all + G_bp),
    }
    return flops, Gf, Df


def matmul_peak(dtype, device, reps=5):
    """GFLOP/s of the best of `reps` square products (2048 on the CPU, 8192 on a GPU; fp32 without TF32)."""
    n = 8192 if device.type == "cuda" else 2048
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    torch.mm(a, b)
    sync()
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t)
    torch.backends.cuda.matmul.allow_tf32 = tf32
    return 2 * n ** 3 / best / 1e9


# ---------------------------------------------------------------- variants

VARIANTS = {
    # name: (implementation, trainer options); "product" is gan_trainer's own set-up
    "ref": ("ref", {}),
    "fp32": ("product", {}),
    "cl": ("product", {"channels_last": True}),
    "bf16": ("product", {"bf16": True}),
    "bf16+cl": ("product", {"bf16": True, "channels_last": True}),
    "compiled": ("compiled", {"compiled": True}),  # CompiledStep: torch.compile (--compile 1)
    # the graphed step evaluates the losses twice (once to choose, once inside the update's graph)
    "graphs": ("graphed", {"cuda_graphs": True}),
    "cl+graphs": ("graphed", {"channels_last": True, "cuda_graphs": True}),
    "bf16+graphs": ("graphed", {"bf16": True, "cuda_graphs": True}),
}
DEFAULT_VARIANTS = {
    "uniform": "ref,fp32,compiled",
    "mnist": "ref,fp32,cl,bf16,bf16+cl",
    "cifar": "ref,fp32,cl,bf16,bf16+cl",
}
GPU_VARIANTS = {
    "uniform": "ref,fp32,graphs",
    "mnist": "ref,fp32,cl,bf16,graphs,cl+graphs,bf16+graphs",
    "cifar": "ref,fp32,cl,bf16,graphs,cl+graphs,bf16+graphs",
}


def reference_batch(data, batch_size):
    """A batch drawn in the iteration, as a plain port draws it: batch_size distinct rows
    (by rejection; the original's numpy.random.choice permuted all n rows), scaled to [-1, 1]."""
    n = len(data)
    while True:
        idx = torch.randint(n, (batch_size,), device=data.device)
        if torch.unique(idx).numel() == batch_size:
            return T.to_unit_range(data[idx])


class Runner:
    """One variant: its own nets (same seed), optimizers and schedule, run like the trainer's loop.
    "ref" is the plain port: T.tutorial_step with torch's own Adam and a batch drawn per iteration."""

    def __init__(self, name, cfg, data, device, seed=0):
        self.name = name
        self.impl, options = VARIANTS[name]
        self.cfg, self.data, self.device = cfg, data, device
        torch.manual_seed(seed)
        if self.impl != "ref":
            speed = T.Speed(device=str(device), threads=torch.get_num_threads(),
                            channels_last=options.get("channels_last", False) and cfg.is_image,
                            bf16=options.get("bf16", False), cuda_graphs=options.get("cuda_graphs", False),
                            compile=options.get("compiled", False))
            run = T.Run(cfg, seed, speed, device)
            self.step = T.make_step(run, log=lambda *lines: None)
            self.fmt = torch.channels_last if speed.channels_last else torch.contiguous_format
        else:
            self.gen, self.dis = (net.to(device) for net in build_nets(cfg))
            self.opt_g, self.opt_d = (torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
                                      for net in (self.gen, self.dis))
            self.fmt = torch.contiguous_format
        self.schedule, self.i = T.Schedule(), 0
        self.steps = {"dis": 0, "gen": 0}
        self.logs = {"dis": T.TrainerLog("discriminator", cfg.batch_size),
                     "gen": T.TrainerLog("generator", cfg.batch_size)}
        self.times, self.compile_s = [], 0.0
        self.batches = T.real_batches(data, cfg.batch_size, seed, 0, 0, self.fmt)  # as the trainer draws them

    def iteration(self):
        cfg, i = self.cfg, self.i
        z = torch.randn(cfg.batch_size, cfg.noise_dim, device=self.device)
        if self.impl != "ref":
            x, y = next(self.batches)
            step = self.step(x, z, self.schedule, y=y)
            batches = step.batches
        else:
            x = reference_batch(self.data.x, cfg.batch_size)
            step = T.tutorial_step(self.gen, self.dis, self.opt_g, self.opt_d, x, z, self.schedule)
            batches = []  # the plain port logs no trainer summaries: it is the yardstick of the step alone
        if i % T.LOG_PERIOD == 0:
            T.loss_lines(step)
        if not step.finite:
            raise SystemExit(f"{self.name}: non-finite loss at iteration {i}")
        self.schedule = T.advance(self.schedule, step.trained)
        self.steps[step.trained] += 1
        for b in batches:
            self.logs[step.trained].add(*b)
        self.i += 1

    def run(self, iters):
        t = time.perf_counter()
        for _ in range(iters):
            self.iteration()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    @property
    def d_share(self):
        return self.steps["dis"] / max(1, sum(self.steps.values()))


def bench(source, args, device):
    cfg = CONFIGS[source]
    if args.batch_size:
        cfg = dataclasses.replace(cfg, batch_size=args.batch_size)
    if source == "uniform":
        data = T.load_data(cfg, None, device)
    else:
        g = torch.Generator().manual_seed(0)
        n = 60000 if source == "mnist" else 50000
        data = T.TrainingSet(torch.randint(0, 256, (n, *cfg.sample_shape), generator=g, dtype=torch.uint8).to(device))
    names = (args.variants or (GPU_VARIANTS if device.type == "cuda" else DEFAULT_VARIANTS)[source]).split(",")
    runners = []
    for name in names:
        r = Runner(name, cfg, data, device)
        t = time.perf_counter()
        r.run(args.warmup)  # compiles, oneDNN primitive caches, Adam state
        r.compile_s = time.perf_counter() - t
        runners.append(r)
    for _ in range(args.rounds):
        for r in runners:
            r.times.append(r.run(args.iters) / args.iters)
    flops, Gf, Df = work(cfg, cfg.batch_size)
    ref_ms = statistics.median(next(r for r in runners if r.impl == "ref").times) * 1e3
    print(f"\n== {source} on {device}, batch {cfg.batch_size}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.rounds} rounds x {args.iters} iterations (median round); "
          f"forward GFLOP per batch: G {Gf / 1e9:.4g}, D {Df / 1e9:.4g}")
    print(f"{'variant':15s} {'ms/iter':>9s} {'img/s':>9s} {'ref/this':>8s} {'D share':>7s} "
          f"{'GFLOP D-it':>10s} {'G-it':>7s} {'avg':>7s} {'GFLOP/s':>8s} {'warmup s':>8s}")
    for r in runners:
        ms = statistics.median(r.times) * 1e3
        base = ref_ms
        fd, fg = flops[r.impl]
        avg = r.d_share * fd + (1 - r.d_share) * fg
        ratio = f"{base / ms:8.2f}" if base else f"{'-':>8s}"
        print(f"{r.name:15s} {ms:9.3f} {cfg.batch_size / ms * 1e3:9.0f} {ratio} {r.d_share:7.2f} "
              f"{fd / 1e9:10.4g} {fg / 1e9:7.4g} {avg / 1e9:7.4g} {avg / ms / 1e6:8.1f} {r.compile_s:8.1f}")
    return runners


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_source", default="all", choices=["uniform", "mnist", "cifar", "all"])
    p.add_argument("--iters", type=int, default=None, help="iterations per round (default 1000 uniform, 20 images)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default 20 / 3)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", default=None, help=f"comma list out of {', '.join(VARIANTS)}")
    p.add_argument("--batch_size", type=int, default=None)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: the trainer's choice per data source)")
    p.add_argument("--no_peak", action="store_true")
    p.add_argument("--keep_freed_memory", type=int, default=1, choices=[0, 1],
                   help="the trainer's malloc setting for every variant (CPU; 0: glibc's defaults)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and args.keep_freed_memory:
        T.keep_freed_memory()
    sources = ["uniform", "mnist", "cifar"] if args.data_source == "all" else [args.data_source]
    default_threads = torch.get_num_threads()
    for source in sources:
        torch.set_num_threads(default_threads)
        a = copy.copy(args)
        a.iters = args.iters or (1000 if source == "uniform" else 20)
        a.warmup = args.warmup if args.warmup is not None else (20 if source == "uniform" else 3)
        if device.type == "cpu":  # the trainer's choice: 1 thread for the tiny uniform nets
            torch.set_num_threads(args.threads or (1 if source == "uniform" else default_threads))
        if not args.no_peak:
            where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
            print(f"matmul peak (torch.mm, {where}): fp32 {matmul_peak(torch.float32, device):.0f} GFLOP/s, "
                  f"bf16 {matmul_peak(torch.bfloat16, device):.0f} GFLOP/s")
        bench(source, a, device)
        if not args.no_peak:
            print(f"matmul peak again: fp32 {matmul_peak(torch.float32, device):.0f} GFLOP/s, "
                  f"bf16 {matmul_peak(torch.bfloat16, device):.0f} GFLOP/s")


if __name__ == "__main__":
    main()
