"""Speed of the training iteration: gan_trainer.train_step and variants against the plain port.

Run by hand (not collected by pytest):

    python tests/bench_speed.py --data_source all --iters 50 --rounds 3
    python tests/bench_speed.py --data_source uniform --iters 2000 --variants ref,fp32,fused1t,step1t

Every variant trains its own copy of the same nets (same seed) on the loop's real
work per iteration: real_batch (index draw + scaling), noise, the step, the
schedule and TrainerLog accumulation, and the loss lines every 100 iterations.
Variants run interleaved, in rounds, and the median round counts: the machine may
be shared.  Work is counted analytically (2 x multiply-adds of every linear /
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
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import gan_trainer as T  # noqa: E402
from gan_conf import CONFIGS, build_nets  # noqa: E402
from reference_step import make_optimizers, reference_step  # noqa: E402


# ---------------------------------------------------------------- a compiled functional step (proposal)

def _cost(logits, label):
    return F.cross_entropy(logits.float(), torch.full((logits.shape[0],), label, dtype=torch.long,
                                                      device=logits.device))


class CompiledStep:
    """train_step's semantics in two compiled calls per iteration (losses; then the D or the G update).

    Forward, backward and Adam of an update are one inductor graph; the parameters and
    torch.optim.Adam's own state tensors are updated in place, so checkpoints
    (opt.state_dict()) and everything else keep working.  The choice stays on the host
    with gan_trainer.choose_net on the float64 d_loss, as in the original.
    """

    def __init__(self, gen, dis, opt_g, opt_d, compile=True):
        from torch.func import functional_call, grad_and_value
        self._call, self._gv = functional_call, grad_and_value
        self.gen, self.dis = gen, dis
        self.gp, self.dp = dict(gen.named_parameters()), dict(dis.named_parameters())
        self.gs, self.ds = self._adam_state(opt_g, self.gp), self._adam_state(opt_d, self.dp)
        self.hg, self.hd = (self._hyper(o) for o in (opt_g, opt_d))
        c = (lambda f: torch.compile(f, fullgraph=True, dynamic=False)) if compile else (lambda f: f)
        self.losses, self.train_d, self.train_g = c(self._losses), c(self._train_d), c(self._train_g)

    @staticmethod
    def _hyper(opt):
        g = opt.param_groups[0]
        assert not g["weight_decay"] and not g["amsgrad"] and not g["maximize"]
        return (g["lr"], *g["betas"], g["eps"])

    @staticmethod
    def _adam_state(opt, params):
        out = []
        for p in params.values():
            st = opt.state[p]
            if not st:  # torch.optim.Adam's lazy initialisation, same layout
                st.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                          exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))
            out.append((st["step"], st["exp_avg"], st["exp_avg_sq"]))
        return out

    @staticmethod
    def _adam(params, grads, state, hyper):
        """torch.optim.Adam (single-tensor, no weight decay), bias corrections in float64."""
        lr, b1, b2, eps = hyper
        with torch.no_grad():
            for p, g, (step, m, v) in zip(params, grads, state):
                step.add_(1)
                s = step.double()
                bc1, bc2_sqrt = 1 - torch.pow(b1, s), torch.sqrt(1 - torch.pow(b2, s))
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                p.sub_((lr / bc1).float() * m / (v.sqrt() / bc2_sqrt.float()).add_(eps))

    def _losses(self, x, z):
        with torch.no_grad():
            real_logits = self._call(self.dis, self.dp, (x,))
            fake_logits = self._call(self.dis, self.dp, (self._call(self.gen, self.gp, (z,)),))
            return torch.stack([_cost(real_logits, T.REAL), _cost(fake_logits, T.FAKE), _cost(fake_logits, T.REAL)])

    def _train_d(self, x, z):
        with torch.no_grad():
            fake = self._call(self.gen, self.gp, (z,))

        def f(dp, inp, label):
            logits = self._call(self.dis, dp, (inp,))
            return _cost(logits, label), logits
        out = []
        for inp, label in ((fake, T.FAKE), (x, T.REAL)):
            grads, (c, logits) = self._gv(f, has_aux=True)({k: v.detach() for k, v in self.dp.items()}, inp, label)
            self._adam(list(self.dp.values()), list(grads.values()), self.ds, self.hd)
            out.append(torch.stack([c.double(), (logits.argmax(1) != label).double().mean()]))
        return out

    def _train_g(self, z):
        def f(gp):
            logits = self._call(self.dis, self.dp, (self._call(self.gen, gp, (z,)),))
            return _cost(logits, T.REAL), logits
        grads, (c, logits) = self._gv(f, has_aux=True)({k: v.detach() for k, v in self.gp.items()})
        self._adam(list(self.gp.values()), list(grads.values()), self.gs, self.hg)
        return [torch.stack([c.double(), (logits.argmax(1) != T.REAL).double().mean()])]

    def __call__(self, x, z, schedule):
        """((d_pos, d_neg, g) as floats, net or "" when not finite, [(cost, error) stacked float64, ...])."""
        d_pos, d_neg, g = losses = self.losses(x, z).tolist()
        d_loss = (d_pos + d_neg) / 2
        if not math.isfinite(d_loss + g):
            return losses, "", []
        net = T.choose_net(schedule, d_loss > g)
        return losses, net, (self.train_d(x, z) if net == "dis" else self.train_g(z))


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
        # losses: D(x), G(z), D(G(z)), G(z), D(G(z)); then the update recomputes its forwards
        "ref": (3 * Df + 2 * Gf + Gf + Df + D_bp + Df + D_bp, 3 * Df + 2 * Gf + Gf + Df + D_all + G_bp),
        # losses: D(x), G(z), D(G(z)); D-update: G(z), D fwd+bwd twice; G-update: G, D fwd, bwd
        "step": (2 * Df + Gf + Gf + 2 * (Df + D_bp), 2 * Df + Gf + Gf + Df + D_in + G_bp),
    }
    return flops, Gf, Df


def matmul_peak(dtype, n=2048, reps=5):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


# ---------------------------------------------------------------- variants

VARIANTS = {
    # name: (implementation, options)
    "ref": ("ref", {}),
    "fp32": ("product", {}),
    "fused": ("product", {"adam": {"fused": True}}),
    "bf16": ("product", {"bf16": True}),
    "cl": ("product", {"cl": True}),
    "bf16+cl": ("product", {"bf16": True, "cl": True}),
    "bf16+cl+fused": ("product", {"bf16": True, "cl": True, "adam": {"fused": True}}),
    "compile": ("product", {"compile": True}),
    "fused1t": ("product", {"adam": {"fused": True}, "threads": 1}),
    "ref1t": ("ref", {"threads": 1}),
    "step": ("step", {}),
    "step1t": ("step", {"threads": 1}),
}
DEFAULT_VARIANTS = {
    "uniform": "ref,fp32,fused,compile,ref1t,fused1t,step1t",
    "mnist": "ref,fp32,fused,cl,bf16,bf16+cl,bf16+cl+fused,compile,step",
    "cifar": "ref,fp32,fused,cl,bf16+cl+fused",
}


class Runner:
    def __init__(self, name, cfg, data, device, seed=0):
        self.name = name
        impl, o = VARIANTS[name]
        self.impl, self.threads = impl, o.get("threads")
        self.cfg, self.data, self.device = cfg, data, device
        torch.manual_seed(seed)
        gen, dis = build_nets(cfg)
        self.fmt = torch.channels_last if o.get("cl") and cfg.is_image else torch.contiguous_format
        self.gen, self.dis = gen.to(device, memory_format=self.fmt), dis.to(device, memory_format=self.fmt)
        self.opt_g, self.opt_d = make_optimizers(cfg, self.gen, self.dis, **o.get("adam", {}))
        self.autocast = T.make_autocast(device, o.get("bf16", False))
        self.net_g, self.net_d = self.gen, self.dis
        if o.get("compile"):
            self.net_g, self.net_d = torch.compile(self.gen), torch.compile(self.dis)
        self.fast = CompiledStep(self.gen, self.dis, self.opt_g, self.opt_d) if impl == "step" else None
        self.schedule, self.i = T.Schedule(), 0
        self.steps = {"dis": 0, "gen": 0}
        self.logs = {"dis": T.TrainerLog("discriminator", cfg.batch_size),
                     "gen": T.TrainerLog("generator", cfg.batch_size)}
        self.times, self.compile_s = [], 0.0

    def iteration(self):
        cfg, i = self.cfg, self.i
        x = T.real_batch(self.data, cfg.batch_size)
        z = torch.randn(cfg.batch_size, cfg.noise_dim, device=self.device)
        if self.fmt is torch.channels_last:
            x = x.contiguous(memory_format=self.fmt)
        if self.impl == "product":
            step = T.train_step(self.net_g, self.net_d, self.opt_g, self.opt_d, x, z, self.schedule, self.autocast)
            net, batches = step.net, step.batches
            if i % T.LOG_PERIOD == 0:
                T.loss_lines(step)
        elif self.impl == "step":
            losses, net, stacked = self.fast(x, z, self.schedule)
            batches = [(s[0], s[1]) for s in stacked]
            if i % T.LOG_PERIOD == 0:
                "%g %g %g" % tuple(losses)
        else:
            *losses, net = reference_step(self.gen, self.dis, self.opt_g, self.opt_d, x, z, self.schedule)
            batches = []  # the plain port logs no trainer summaries: it is the yardstick of the step alone
            if i % T.LOG_PERIOD == 0:
                "%g %g %g" % tuple(float(v) for v in losses)
        if not net:
            raise SystemExit(f"{self.name}: non-finite loss at iteration {i}")
        self.schedule = T.advance(self.schedule, net)
        self.steps[net] += 1
        for b in batches:
            self.logs[net].add(*b)
        self.i += 1

    def run(self, iters):
        saved = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            t = time.perf_counter()
            for _ in range(iters):
                self.iteration()
            return time.perf_counter() - t
        finally:
            torch.set_num_threads(saved)

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
        data = torch.randint(0, 256, (n, *cfg.sample_shape), generator=g, dtype=torch.uint8).to(device)
    names = (args.variants or DEFAULT_VARIANTS[source]).split(",")
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
    ref_ms = {r.threads: statistics.median(r.times) * 1e3 for r in runners if r.impl == "ref"}
    print(f"\n== {source} on {device}, batch {cfg.batch_size}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.rounds} rounds x {args.iters} iterations (median round); "
          f"forward GFLOP per batch: G {Gf / 1e9:.4g}, D {Df / 1e9:.4g}")
    print(f"{'variant':15s} {'ms/iter':>9s} {'img/s':>9s} {'ref/this':>8s} {'D share':>7s} "
          f"{'GFLOP D-it':>10s} {'G-it':>7s} {'avg':>7s} {'GFLOP/s':>8s} {'warmup s':>8s}")
    for r in runners:
        ms = statistics.median(r.times) * 1e3
        base = ref_ms.get(r.threads, ref_ms.get(None))  # the plain port on the same thread setting
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
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the default variants")
    p.add_argument("--no_peak", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cpu" and not args.no_peak:
        print(f"matmul peak (torch.mm 2048^2, {torch.get_num_threads()} threads): "
              f"fp32 {matmul_peak(torch.float32):.0f} GFLOP/s, bf16 {matmul_peak(torch.bfloat16):.0f} GFLOP/s")
    sources = ["uniform", "mnist", "cifar"] if args.data_source == "all" else [args.data_source]
    for source in sources:
        a = copy.copy(args)
        a.iters = args.iters or (1000 if source == "uniform" else 20)
        a.warmup = args.warmup if args.warmup is not None else (20 if source == "uniform" else 3)
        bench(source, a, device)
        if device.type == "cpu" and not args.no_peak:
            print(f"matmul peak again: fp32 {matmul_peak(torch.float32):.0f} GFLOP/s, "
                  f"bf16 {matmul_peak(torch.bfloat16):.0f} GFLOP/s")


if __name__ == "__main__":
    main()
