"""gan_trainer.train_step (shared work) computes what the plain port computes.

From one seed, the nets are built once and deep-copied; both copies see the
same x and z each iteration.  Losses, choices and the parameters afterwards
must agree to float tolerance, for the uniform nets and for the mnist-shaped
DCGAN (random images in [-1, 1], batch 16), and with the fp32 speed variants
(Adam implementations, channels-last layout) that a faster step may use.
"""
import copy
import dataclasses
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import gan_trainer  # noqa: E402
from gan_conf import CONFIGS, build_nets  # noqa: E402
from reference_step import make_optimizers, reference_step  # noqa: E402

ITERS = 8
BATCH = 16


def batches(cfg, iters, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(iters):
        x = torch.rand(BATCH, *cfg.sample_shape, generator=g) * 2 - 1
        z = torch.randn(BATCH, cfg.noise_dim, generator=g)
        out.append((x, z))
    return out


def run_both(source, adam_kwargs=None, channels_last=False, iters=ITERS, seed=0):
    cfg = dataclasses.replace(CONFIGS[source], batch_size=BATCH)
    torch.manual_seed(seed)
    gen, dis = build_nets(cfg)
    ref_gen, ref_dis = copy.deepcopy(gen), copy.deepcopy(dis)
    opt_g, opt_d = make_optimizers(cfg, gen, dis, **(adam_kwargs or {}))
    ref_opt_g, ref_opt_d = make_optimizers(cfg, ref_gen, ref_dis)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen, dis = gen.to(memory_format=fmt), dis.to(memory_format=fmt)
    autocast = gan_trainer.make_autocast(torch.device("cpu"), False)

    schedule = ref_schedule = gan_trainer.Schedule()
    got, want = [], []
    for x, z in batches(cfg, iters, seed + 1):
        step = gan_trainer.train_step(gen, dis, opt_g, opt_d, x.contiguous(memory_format=fmt) if x.dim() == 4 else x,
                                      z, schedule, autocast)
        got.append((step.d_pos_loss.detach(), step.d_neg_loss.detach(), step.g_loss.detach(), step.net))
        schedule = gan_trainer.advance(schedule, step.net)
        r = reference_step(ref_gen, ref_dis, ref_opt_g, ref_opt_d, x, z, ref_schedule)
        want.append(r)
        ref_schedule = gan_trainer.advance(ref_schedule, r[3])
    return (gen, dis), (ref_gen, ref_dis), got, want


def assert_same(nets, ref_nets, got, want, atol=1e-6):
    assert [g[3] for g in got] == [w[3] for w in want], "different choices of the net to train"
    choices = {w[3] for w in want}
    assert choices == {"dis", "gen"}, f"only {choices} trained in {len(want)} iterations: not a full test"
    for i, (g, w) in enumerate(zip(got, want)):
        for name, a, b in zip(("d_pos_loss", "d_neg_loss", "g_loss"), g[:3], w[:3]):
            assert a.dtype == b.dtype == torch.float32
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), f"iteration {i}: {name} {a.item()} != {b.item()}"
    for net, ref in zip(nets, ref_nets):
        for (name, p), (_, q) in zip(net.named_parameters(), ref.named_parameters()):
            assert torch.allclose(p, q, rtol=0, atol=atol), \
                f"{type(net).__name__}.{name}: max diff {(p - q).abs().max().item():g}"


@pytest.mark.parametrize("source", ["uniform", "mnist"])
def test_train_step_matches_reference(source):
    assert_same(*run_both(source))


@pytest.mark.parametrize("source", ["uniform", "mnist"])
def test_foreach_adam_matches_reference(source):
    """The multi-tensor Adam does the same arithmetic: same numbers over the whole run."""
    assert_same(*run_both(source, adam_kwargs={"foreach": True}))


def bn_fed_biases(net):
    """Names of the biases that feed straight into a batch norm: their gradient is zero in
    exact arithmetic, so Adam turns round-off into an update of up to lr (either sign)."""
    names, prev = set(), None
    for name, m in net.named_modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)) and prev is not None:
            names.add(prev + ".bias")
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
            prev = name
        elif not isinstance(m, (torch.nn.Sequential, torch.nn.ReLU)) and m is not net:
            prev = None
    if isinstance(net, torch.nn.Module) and hasattr(net, "fc") and hasattr(net, "convs") and hasattr(net, "start"):
        names.add("fc.bias")  # ImageGenerator: fc -> view -> batch norm
    return names


@pytest.mark.parametrize("source, adam, channels_last", [
    ("uniform", {"fused": True}, False),
    ("mnist", {"fused": True}, False),
    ("mnist", {}, True),
], ids=["fused-uniform", "fused-mnist", "channels_last-mnist"])
def test_reordered_fp32_variants_match_reference_stepwise(source, adam, channels_last):
    """Variants that reorder float sums (fused Adam kernel, channels-last convolutions) agree
    to float tolerance on every single iteration started from the same state.

    Over many iterations they drift apart (Adam's first steps are ~lr * sign(grad), and
    the GAN amplifies round-off), so each iteration starts from the reference's state.
    """
    cfg = dataclasses.replace(CONFIGS[source], batch_size=BATCH)
    torch.manual_seed(0)
    gen, dis = build_nets(cfg)
    ref_gen, ref_dis = copy.deepcopy(gen), copy.deepcopy(dis)
    opt_g, opt_d = make_optimizers(cfg, gen, dis, **adam)
    ref_opt_g, ref_opt_d = make_optimizers(cfg, ref_gen, ref_dis)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen, dis = gen.to(memory_format=fmt), dis.to(memory_format=fmt)
    autocast = gan_trainer.make_autocast(torch.device("cpu"), False)
    loose = {id(net): bn_fed_biases(net) for net in (gen, dis)}
    schedule, nets = gan_trainer.Schedule(), []
    for i, (x, z) in enumerate(batches(cfg, ITERS, 1)):
        for a, b in ((gen, ref_gen), (dis, ref_dis), (opt_g, ref_opt_g), (opt_d, ref_opt_d)):
            a.load_state_dict(copy.deepcopy(b.state_dict()))
        step = gan_trainer.train_step(gen, dis, opt_g, opt_d, x.contiguous(memory_format=fmt) if x.dim() == 4 else x,
                                      z, schedule, autocast)
        r = reference_step(ref_gen, ref_dis, ref_opt_g, ref_opt_d, x, z, schedule)
        assert step.net == r[3], f"iteration {i}: chose {step.net}, reference {r[3]}"
        for name, a, b in zip(("d_pos_loss", "d_neg_loss", "g_loss"), (step.d_pos_loss, step.d_neg_loss, step.g_loss), r):
            assert torch.allclose(a.detach(), b, rtol=1e-5, atol=1e-6), f"iteration {i}: {name} {a.item()} != {b.item()}"
        for net, ref in ((gen, ref_gen), (dis, ref_dis)):
            for (name, p), (_, q) in zip(net.named_parameters(), ref.named_parameters()):
                diff = (p - q).abs()
                where = f"iteration {i}: {type(net).__name__}.{name}"
                # No element moves further apart than Adam's steps can take it ...
                assert diff.max() <= 4 * cfg.lr, f"{where}: max diff {diff.max().item():g}"
                # ... and on average they agree to 1% of a step (elements whose gradient sums to
                # round-off level, as in most gradient reorderings, can take a different step).
                if name not in loose[id(net)]:
                    assert diff.mean() <= 0.01 * cfg.lr, f"{where}: mean diff {diff.mean().item():g}"
        nets.append(step.net)
        schedule = gan_trainer.advance(schedule, step.net)
    assert set(nets) == {"dis", "gen"}


def test_reference_losses_precede_update():
    """The reference's losses are those of the parameters before the iteration's update."""
    cfg = dataclasses.replace(CONFIGS["uniform"], batch_size=BATCH)
    torch.manual_seed(0)
    gen, dis = build_nets(cfg)
    opt_g, opt_d = make_optimizers(cfg, gen, dis)
    (x, z), = batches(cfg, 1, 1)
    with torch.no_grad():
        before = gan_trainer.cost(dis(x), gan_trainer.REAL)
    d_pos, *_ , net = reference_step(gen, dis, opt_g, opt_d, x, z, gan_trainer.Schedule())
    assert net in ("dis", "gen")
    assert torch.equal(d_pos, before)


def test_adam_step_equals_fused_adam_step_bit_for_bit():
    """gan_trainer.adam_step calls Adam's fused kernel directly: same parameters and state as opt.step()."""
    torch.manual_seed(0)
    cfg = CONFIGS["mnist"]
    _, dis = build_nets(cfg)
    twin = copy.deepcopy(dis)
    opts = [torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999), fused=True) for net in (dis, twin)]
    for i in range(4):
        if i == 1:  # from the second step on, the state exists: adam_step must not call opt.step()
            opts[1].step = lambda *a, **k: pytest.fail("adam_step fell back to Adam.step")
        for net in (dis, twin):
            for p in net.parameters():
                p.grad = None
        grads = [torch.randn_like(p) for p in dis.parameters()]
        for net in (dis, twin):
            for p, g in zip(net.parameters(), grads):
                p.grad = g.clone()
        opts[0].step()
        gan_trainer.adam_step(opts[1])
    for a, b in zip(dis.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    for sa, sb in zip(opts[0].state.values(), opts[1].state.values()):
        assert all(torch.equal(sa[k], sb[k]) for k in ("step", "exp_avg", "exp_avg_sq"))


@pytest.mark.parametrize("source", ["uniform", "mnist"])
def test_graphed_step_logic_matches_train_step(source):
    """GraphedStep (--cuda_graphs) without the capture, as the CPU can run it: warm-up updates,
    then parameters and Adam state put back, evaluation replayed before each update. Losses,
    choices, logged batches, parameters and optimizer state equal train_step's bit for bit."""
    cfg = dataclasses.replace(CONFIGS[source], batch_size=BATCH)
    torch.manual_seed(0)
    gen, dis = build_nets(cfg)
    nets = {"eager": (gen, dis), "graphed": copy.deepcopy((gen, dis))}
    opts = {k: tuple(torch.optim.Adam(n.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999), fused=True) for n in v)
            for k, v in nets.items()}
    autocast = gan_trainer.make_autocast(torch.device("cpu"), False)
    steps = {k: gan_trainer.make_step(*nets[k], *opts[k], autocast, cuda_graphs=k == "graphed", capture=False)
             for k in nets}
    assert isinstance(steps["graphed"], gan_trainer.GraphedStep)
    schedule, chosen = gan_trainer.Schedule(), []
    for x, z in batches(cfg, ITERS, 1):
        eager, graphed = (steps[k](x, z, schedule) for k in ("eager", "graphed"))
        assert graphed.values == eager.values and graphed.net == eager.net
        assert [(c.item(), label) for c, _, label in graphed.batches] == \
               [(c.item(), label) for c, _, label in eager.batches]
        assert all(torch.equal(a[1], b[1]) for a, b in zip(graphed.batches, eager.batches))
        schedule = gan_trainer.advance(schedule, eager.net)
        chosen.append(eager.net)
    assert set(chosen) == {"dis", "gen"}, f"only {chosen}: not a full test"
    for a, b in zip(nets["eager"], nets["graphed"]):
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.equal(p, q), name
    for a, b in zip(opts["eager"], opts["graphed"]):
        sa, sb = a.state_dict()["state"], b.state_dict()["state"]
        assert sa.keys() == sb.keys()
        for k in sa:
            assert all(torch.equal(sa[k][n], sb[k][n]) for n in ("step", "exp_avg", "exp_avg_sq")), k


def test_graphed_step_puts_back_a_resumed_state():
    """Warm-up updates before capturing must not change a run resumed with Adam state."""
    cfg = dataclasses.replace(CONFIGS["uniform"], batch_size=BATCH)
    torch.manual_seed(0)
    gen, dis = build_nets(cfg)
    opt_g, opt_d = (torch.optim.Adam(n.parameters(), lr=cfg.lr, fused=True) for n in (gen, dis))
    autocast = gan_trainer.make_autocast(torch.device("cpu"), False)
    (x, z), (x2, z2) = batches(cfg, 2, 3)
    gan_trainer.train_step(gen, dis, opt_g, opt_d, x, z, gan_trainer.Schedule("gen", 5), autocast)  # D trains
    gan_trainer.train_step(gen, dis, opt_g, opt_d, x, z, gan_trainer.Schedule("dis", 5), autocast)  # G trains
    before = copy.deepcopy((gen.state_dict(), dis.state_dict(), opt_g.state_dict(), opt_d.state_dict()))
    graphed = gan_trainer.GraphedStep(gen, dis, opt_g, opt_d, autocast, capture=False)
    graphed._build(x2, z2)
    after = (gen.state_dict(), dis.state_dict(), opt_g.state_dict(), opt_d.state_dict())
    for a, b in zip(before[:2], after[:2]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    for a, b in zip(before[2:], after[2:]):
        for k in a["state"]:
            assert all(torch.equal(a["state"][k][n], b["state"][k][n]) for n in ("step", "exp_avg", "exp_avg_sq"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (CUDA graphs)")
def test_captured_graphs_follow_train_step_on_the_gpu():
    """With real CUDA graphs: the same choices and the same losses as train_step for a few
    iterations (mnist shapes), as close as a second eager copy gets to the first (GPU kernels
    may sum in varying order; Adam's first steps amplify that; cuDNN is made deterministic
    here to keep it small); a Step's logged batches are copies that later replays leave alone.
    (Runs only where CUDA is present, e.g. tests/gpu_session.sh.)"""
    dev = torch.device("cuda")
    cfg = dataclasses.replace(CONFIGS["mnist"], batch_size=BATCH)
    torch.manual_seed(0)
    nets = {"eager": tuple(net.to(dev) for net in build_nets(cfg))}
    nets["eager2"], nets["graphed"] = copy.deepcopy(nets["eager"]), copy.deepcopy(nets["eager"])
    opts = {k: tuple(torch.optim.Adam(n.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999), fused=True) for n in v)
            for k, v in nets.items()}
    autocast = gan_trainer.make_autocast(dev, False)
    steps = {k: gan_trainer.make_step(*nets[k], *opts[k], autocast, cuda_graphs=k == "graphed") for k in nets}
    schedule, kept, gaps = gan_trainer.Schedule(), [], []
    deterministic = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        for i, (x, z) in enumerate(batches(cfg, 6, 1)):
            x, z = x.to(dev), z.to(dev)
            out = {k: steps[k](x, z, schedule) for k in ("eager", "eager2", "graphed")}
            gap = {k: max(abs(a - b) for a, b in zip(out[k].values, out["eager"].values)) for k in ("eager2", "graphed")}
            gaps.append((i, out["eager"].net, out["graphed"].net, gap["eager2"], gap["graphed"]))
            assert out["graphed"].net == out["eager2"].net == out["eager"].net, gaps
            assert gap["graphed"] <= min(1e-5 + 10 * gap["eager2"], 1e-3), gaps
            kept.append(([c.clone() for c, _, _ in out["graphed"].batches], out["graphed"].batches))
            schedule = gan_trainer.advance(schedule, out["eager"].net)
    finally:
        torch.backends.cudnn.deterministic = deterministic
    print("iteration, net (eager, graphed), largest loss gap to eager: eager2, graphed", *gaps, sep="\n")
    for copies, logged in kept:
        assert all(torch.equal(c, b[0]) for c, b in zip(copies, logged))
