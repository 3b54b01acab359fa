"""train_step and every faster form of it compute what tutorial_step computes.

gan_trainer.tutorial_step is the iteration as the tutorial writes it (separate forward passes,
zero_grad / backward / step); train_step shares work; GraphedStep replays it from CUDA graphs;
Adam.step calls the fused kernel directly; channels-last convolutions sum in another order.
From one seed the nets are built once and copied, and every side sees the same x and z.
Where both sides run the same kernels the numbers must agree exactly (or to 1e-6, the
tolerance of a float32 loss); where the kernels differ (channels-last, another Adam), each
iteration starts both from the same state, and the gradients are held against a float64
reference: a variant may be off by no more than a few times the float32 reference itself.
"""
import copy
import dataclasses

import pytest
import torch

import gan_trainer
from gan_conf import CONFIGS, build_nets
from gan_trainer import Adam, GraphedStep, Schedule, advance, train_step, tutorial_step

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


def config(source):
    return dataclasses.replace(CONFIGS[source], batch_size=BATCH)


class RecordingAdam(Adam):
    """The trainer's Adam, keeping the gradients of every step() it takes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def step(self, closure=None):
        self.seen.append([p.grad.detach().clone() for p in self.param_groups[0]["params"]])
        return super().step(closure)


def adams(cfg, nets, cls=Adam, **kwargs):
    return tuple(cls(net.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999), **kwargs) for net in nets)


def trained_copies(source, sides, seed=0):
    """{side: (gen, dis)}, identical copies of one pair of freshly built nets."""
    torch.manual_seed(seed)
    nets = build_nets(config(source))
    return {side: copy.deepcopy(nets) for side in sides}


@pytest.mark.parametrize("source", ["uniform", "mnist"])
def test_train_step_computes_what_tutorial_step_computes(source):
    """Same losses, same choices, the same parameters after 8 iterations (D and G both train):
    the shared forward passes and the gradients taken for one net only change nothing."""
    cfg = config(source)
    nets = trained_copies(source, ("tutorial", "trainer"))
    opts = {side: adams(cfg, nets[side], fused=True) for side in nets}
    schedules = {side: Schedule() for side in nets}
    chosen = []
    for i, (x, z) in enumerate(batches(cfg, ITERS, 1)):
        want = tutorial_step(*nets["tutorial"], *opts["tutorial"], x, z, schedules["tutorial"])
        got = train_step(*nets["trainer"], *opts["trainer"], x, z, schedules["trainer"])
        assert got.trained == want.trained, f"iteration {i}"
        for name in ("d_pos_loss", "d_neg_loss", "g_loss"):
            a, b = getattr(got, name), getattr(want, name)
            assert a == pytest.approx(b, rel=1e-6, abs=1e-7), f"iteration {i}: {name} {a} != {b}"
        assert [label for *_, label in got.batches] == [label for *_, label in want.batches]
        for side, step in (("tutorial", want), ("trainer", got)):
            schedules[side] = advance(schedules[side], step.trained)
        chosen.append(got.trained)
    assert set(chosen) == {"dis", "gen"}, f"only {chosen}: not a full test"
    for net, ref in zip(nets["trainer"], nets["tutorial"]):
        for (name, p), q in zip(net.named_parameters(), ref.parameters()):
            assert torch.allclose(p, q, rtol=0, atol=1e-6), f"{name}: max diff {(p - q).abs().max().item():g}"


def test_tutorial_step_evaluates_the_losses_before_the_update():
    cfg = config("uniform")
    (gen, dis), = trained_copies("uniform", ("one",)).values()
    (x, z), = batches(cfg, 1, 1)
    with torch.no_grad():
        before = gan_trainer.cost(dis(x), gan_trainer.REAL).item()
    step = tutorial_step(gen, dis, *adams(cfg, (gen, dis)), x, z, Schedule())
    assert step.trained in ("dis", "gen") and step.d_pos_loss == before


def test_a_non_finite_loss_trains_nothing():
    cfg = config("uniform")
    (gen, dis), = trained_copies("uniform", ("one",)).values()
    (x, z), = batches(cfg, 1, 1)
    before = copy.deepcopy(gen.state_dict()), copy.deepcopy(dis.state_dict())
    for step_fn in (tutorial_step, train_step):
        step = step_fn(gen, dis, *adams(cfg, (gen, dis)), x * float("nan"), z, Schedule())
        assert not step.finite and step.trained is None and step.batches == []
    for state, net in zip(before, (gen, dis)):
        assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())


def first_update_gradients(step_fn, nets, opts, x, z, schedule):
    """The chosen net and the gradient of its first update (before any parameter moved)."""
    for opt in opts:
        opt.seen.clear()
    step = step_fn(*nets, *opts, x, z, schedule)
    return step, (opts[0].seen or opts[1].seen)[0]


def flat(tensors):
    return torch.cat([t.double().flatten() for t in tensors])


@pytest.mark.parametrize("source, variant", [
    ("uniform", "fused Adam"), ("mnist", "fused Adam"), ("mnist", "channels-last"),
])
def test_reordered_variants_agree_to_float_rounding_stepwise(source, variant):
    """Variants whose kernels sum in another order (Adam's fused kernel; channels-last
    convolutions): from the same state each iteration, the same choice (but at a near tie),
    the losses to float32 rounding, and the first update's gradient (the whole net's, as one
    vector) close to a float64 reference.

    How close: float32 itself. The batch norms over a batch of 16 amplify round-off: for the
    mnist nets float32's gradient was up to 1.1% of the gradient's norm away from float64's
    (seeds 0-3, 1 and 2 threads), and a reordering's up to as much. So a variant may be 4 times
    further off than float32 is, plus 3% of the norm: a wrong gradient is off by the norm itself.
    """
    cfg = config(source)
    nets = trained_copies(source, ("variant", "fp32", "fp64"))
    if variant == "channels-last":
        nets["variant"] = tuple(n.to(memory_format=torch.channels_last) for n in nets["variant"])
    nets["fp64"] = tuple(n.double() for n in nets["fp64"])
    opts = {side: adams(cfg, nets[side], RecordingAdam, fused=side == "variant" and variant == "fused Adam")
            for side in nets}
    schedule, chosen = Schedule(), []
    for i, (x, z) in enumerate(batches(cfg, ITERS, 1)):
        for side in ("variant", "fp64"):  # every side starts the iteration from fp32's state
            for a, b in zip((*nets[side], *opts[side]), (*nets["fp32"], *opts["fp32"])):
                a.load_state_dict(copy.deepcopy(b.state_dict()))
        xv = x.contiguous(memory_format=torch.channels_last) if variant == "channels-last" and x.dim() == 4 else x
        got, g_variant = first_update_gradients(train_step, nets["variant"], opts["variant"], xv, z, schedule)
        want, g_fp32 = first_update_gradients(tutorial_step, nets["fp32"], opts["fp32"], x, z, schedule)
        exact, g_fp64 = first_update_gradients(tutorial_step, nets["fp64"], opts["fp64"], x.double(), z.double(),
                                               schedule)
        if abs(exact.d_loss - exact.g_loss) > 1e-5:  # not a near tie, where rounding may choose either
            assert got.trained == want.trained == exact.trained, f"iteration {i}"
        for name in ("d_pos_loss", "d_neg_loss", "g_loss"):
            assert getattr(got, name) == pytest.approx(getattr(exact, name), rel=1e-5, abs=1e-6), f"{i}: {name}"
        if got.trained == want.trained:
            off, fp32_off = (flat(g_variant) - flat(g_fp64)).norm(), (flat(g_fp32) - flat(g_fp64)).norm()
            norm = flat(g_fp64).norm()
            assert off <= 4 * fp32_off + 0.03 * norm, f"iteration {i}: {off:g}, float32 {fp32_off:g}, norm {norm:g}"
        schedule = advance(schedule, want.trained)
        chosen.append(want.trained)
    assert set(chosen) == {"dis", "gen"}, f"only {chosen}: not a full test"


def test_adam_calls_the_fused_kernel_with_torchs_numbers():
    """gan_trainer.Adam.step calls Adam's fused kernel directly: the same parameters and state,
    bit for bit, as torch.optim.Adam(fused=True).step()."""
    torch.manual_seed(0)
    cfg = CONFIGS["mnist"]
    _, dis = build_nets(cfg)
    twin = copy.deepcopy(dis)
    ours = Adam(dis.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999), fused=True)
    torchs = torch.optim.Adam(twin.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999), fused=True)
    fell_back = []
    original = torch.optim.Adam.step
    try:
        torch.optim.Adam.step = lambda self, *a, **k: fell_back.append(self is ours) or original(self, *a, **k)
        for i in range(4):
            grads = [torch.randn_like(p) for p in dis.parameters()]
            for net in (dis, twin):
                for p, g in zip(net.parameters(), grads):
                    p.grad = g.clone()
            ours.step()
            torchs.step()
    finally:
        torch.optim.Adam.step = original
    assert fell_back.count(True) == 1  # torch's path makes the state; the direct call does the rest
    for a, b in zip(dis.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    for sa, sb in zip(ours.state.values(), torchs.state.values()):
        assert all(torch.equal(sa[k], sb[k]) for k in ("step", "exp_avg", "exp_avg_sq"))


@pytest.mark.parametrize("source", ["uniform", "mnist"])
def test_graphed_step_logic_matches_train_step(source):
    """GraphedStep (--cuda_graphs) without the capture, as the CPU can run it: warm-up updates,
    then parameters and Adam state put back, evaluation replayed before each update. Losses,
    choices, logged batches, parameters and optimizer state equal train_step's bit for bit."""
    cfg = config(source)
    nets = trained_copies(source, ("eager", "graphed"))
    opts = {side: adams(cfg, nets[side], fused=True) for side in nets}
    graphed = GraphedStep(*nets["graphed"], *opts["graphed"], gan_trainer.make_autocast("cpu", False), capture=False)
    schedule, chosen = Schedule(), []
    for x, z in batches(cfg, ITERS, 1):
        eager, replayed = train_step(*nets["eager"], *opts["eager"], x, z, schedule), graphed(x, z, schedule)
        assert (replayed.d_pos_loss, replayed.d_neg_loss, replayed.g_loss, replayed.trained) == \
               (eager.d_pos_loss, eager.d_neg_loss, eager.g_loss, eager.trained)
        assert [(c.item(), label) for c, _, label in replayed.batches] == \
               [(c.item(), label) for c, _, label in eager.batches]
        assert all(torch.equal(a[1], b[1]) for a, b in zip(replayed.batches, eager.batches))
        schedule = advance(schedule, eager.trained)
        chosen.append(eager.trained)
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
    cfg = config("uniform")
    (gen, dis), = trained_copies("uniform", ("one",)).values()
    opt_g, opt_d = adams(cfg, (gen, dis), fused=True)
    (x, z), (x2, z2) = batches(cfg, 2, 3)
    train_step(gen, dis, opt_g, opt_d, x, z, Schedule("gen", 5))  # D trains
    train_step(gen, dis, opt_g, opt_d, x, z, Schedule("dis", 5))  # G trains
    before = copy.deepcopy((gen.state_dict(), dis.state_dict(), opt_g.state_dict(), opt_d.state_dict()))
    graphed = GraphedStep(gen, dis, opt_g, opt_d, gan_trainer.make_autocast("cpu", False), capture=False)
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
    cfg = config("mnist")
    torch.manual_seed(0)
    nets = {"eager": tuple(net.to(dev) for net in build_nets(cfg))}
    nets["eager2"], nets["graphed"] = copy.deepcopy(nets["eager"]), copy.deepcopy(nets["eager"])
    opts = {side: adams(cfg, nets[side], fused=True) for side in nets}
    autocast = gan_trainer.make_autocast(dev, False)
    steps = {side: (GraphedStep(*nets[side], *opts[side], autocast) if side == "graphed" else
                    lambda x, z, s, side=side: train_step(*nets[side], *opts[side], x, z, s, autocast))
             for side in nets}
    schedule, kept, gaps = Schedule(), [], []
    deterministic = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    try:
        for i, (x, z) in enumerate(batches(cfg, 6, 1)):
            x, z = x.to(dev), z.to(dev)
            out = {side: steps[side](x, z, schedule) for side in ("eager", "eager2", "graphed")}
            values = {side: (s.d_pos_loss, s.d_neg_loss, s.g_loss) for side, s in out.items()}
            gap = {side: max(abs(a - b) for a, b in zip(values[side], values["eager"])) for side in ("eager2", "graphed")}
            gaps.append((i, out["eager"].trained, out["graphed"].trained, gap["eager2"], gap["graphed"]))
            assert out["graphed"].trained == out["eager2"].trained == out["eager"].trained, gaps
            assert gap["graphed"] <= min(1e-5 + 10 * gap["eager2"], 1e-3), gaps
            kept.append(([c.clone() for c, _, _ in out["graphed"].batches], out["graphed"].batches))
            schedule = advance(schedule, out["eager"].trained)
    finally:
        torch.backends.cudnn.deterministic = deterministic
    print("iteration, net (eager, graphed), largest loss gap to eager: eager2, graphed", *gaps, sep="\n")
    for copies, logged in kept:
        assert all(torch.equal(c, b[0]) for c, b in zip(copies, logged))
