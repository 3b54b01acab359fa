"""The compiled step (--compile 1, the CPU default for uniform) computes what train_step computes.

Compiling takes seconds, so the other tests run eagerly (conftest.eager); these check the
compiled step against train_step, its exact resume, and its fall-back to eager when
torch.compile fails.
"""
import contextlib
import copy
import dataclasses

import pytest
import torch

import gan_trainer
from conftest import read_metrics
from gan_conf import CONFIGS, build_nets
from test_resume import assert_same_training_state, without_seconds
from test_step_equivalence import BATCH, RecordingAdam, adams, batches, flat

ITERS = 12


def test_compiled_step_matches_train_step_stepwise():
    """Same choices, losses, logged batches and gradients as train_step, to float rounding,
    through D and G updates; each iteration starts both from train_step's state. The step
    compiles once."""
    cfg = dataclasses.replace(CONFIGS["uniform"], batch_size=BATCH)
    torch.manual_seed(0)
    nets = {"eager": build_nets(cfg)}
    nets["compiled"] = copy.deepcopy(nets["eager"])
    opts = {k: adams(cfg, v, RecordingAdam, fused=True) for k, v in nets.items()}
    logged = []
    compiled_step = gan_trainer.CompiledStep(*nets["compiled"], *opts["compiled"], contextlib.nullcontext,
                                             log=logged.append)
    schedule, chosen = gan_trainer.Schedule(), []
    graphs = lambda: torch._dynamo.utils.counters["stats"]["unique_graphs"]  # noqa: E731
    for i, (x, z) in enumerate(batches(cfg, ITERS, 1)):
        for a, b in zip((*nets["compiled"], *opts["compiled"]), (*nets["eager"], *opts["eager"])):
            a.load_state_dict(copy.deepcopy(b.state_dict()))
        for opt in (*opts["eager"], *opts["compiled"]):
            opt.seen.clear()
        eager = gan_trainer.train_step(*nets["eager"], *opts["eager"], x, z, schedule)
        compiled = compiled_step(x, z, schedule)
        assert compiled.trained == eager.trained, f"iteration {i}"
        for name in ("d_pos_loss", "d_neg_loss", "g_loss"):
            assert getattr(compiled, name) == pytest.approx(getattr(eager, name), rel=1e-5, abs=1e-6), f"{i}: {name}"
        assert [label for *_, label in compiled.batches] == [label for *_, label in eager.batches]
        for n, ((c1, l1, _), (c2, l2, _)) in enumerate(zip(compiled.batches, eager.batches)):
            tol = 1e-5 if n == 0 else 1e-3  # D's batch on x follows its first update (a step of lr apart)
            torch.testing.assert_close(c1, c2.detach(), rtol=tol, atol=tol)
            torch.testing.assert_close(l1, l2.detach(), rtol=tol, atol=tol)
        # The gradients of each update, the net's as one vector (a bias that feeds a batch norm
        # has a gradient of pure round-off on both sides): the first update's to float rounding,
        # D's second (on x, after its first update) to a step's worth
        for opt_c, opt_e in zip(opts["compiled"], opts["eager"]):
            assert len(opt_c.seen) == len(opt_e.seen)
            for k, (gc, ge) in enumerate(zip(opt_c.seen, opt_e.seen)):
                gap, norm = (flat(gc) - flat(ge)).norm().item(), flat(ge).norm().item()
                assert gap <= (1e-5 if k == 0 else 1e-3) * norm, f"iteration {i}, update {k}: {gap:g} of {norm:g}"
        for a, b in zip(opts["compiled"], opts["eager"]):
            sa, sb = a.state_dict()["state"], b.state_dict()["state"]
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k]["step"], sb[k]["step"]) for k in sa)
        schedule = gan_trainer.advance(schedule, eager.trained)
        chosen.append(eager.trained)
        if i == 0:
            compiled_graphs = graphs()
    assert graphs() == compiled_graphs, "recompiled after the first iteration"
    assert set(chosen) == {"dis", "gen"}, f"only {chosen}: not a full test"
    assert len(logged) == 1 and logged[0].startswith("compiled the training step in"), logged


UNIFORM = ["-d", "uniform", "--batch_size", 16, "--iters", 60, "--seed", 2, "--use_gpu", 0, "--quiet"]


def train(argv, out_dir):
    """gan_trainer.main as given (without conftest's --compile 0): (status, stdout, stderr)."""
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
        code = gan_trainer.main([str(a) for a in [*argv, "--out_dir", out_dir]])
    return code, out.getvalue(), err.getvalue()


def test_uniform_compiles_by_default_and_resumes_exactly(tmp_path):
    """Uniform on the CPU compiles without being asked; 2 passes in one go equal 1 pass,
    then --resume for the second, bit for bit (the compiled kernels are deterministic)."""
    code, out, err = train([*UNIFORM, "--passes", 2], tmp_path / "full")
    assert code == 0, err
    assert "compiled the training step in" in out
    code, _, err = train([*UNIFORM, "--passes", 1], tmp_path / "resumed")
    assert code == 0, err
    code, out, err = train(["-d", "uniform", "--resume", "--passes", 2, "--use_gpu", 0, "--quiet"],
                           tmp_path / "resumed")
    assert code == 0, err
    assert "compiled the training step in" in out and "pass 1 iteration 0" in out
    full, resumed = (tmp_path / k / "uniform_params" for k in ("full", "resumed"))
    assert_same_training_state(torch.load(resumed / "pass_1.pt", weights_only=False),
                               torch.load(full / "pass_1.pt", weights_only=False))
    assert without_seconds(read_metrics(resumed / "metrics.jsonl")) == without_seconds(read_metrics(full / "metrics.jsonl"))


@pytest.mark.parametrize("when", ["first call", "torch.compile"])
def test_compile_failure_falls_back_to_eager(tmp_path, monkeypatch, when):
    """If compiling fails, when the compiled function first runs (no C++ compiler) or already in
    torch.compile (a platform without it), the run says so in one line and trains eagerly: the
    very numbers of --compile 0."""
    def broken(fn, **kwargs):
        def call(*args):
            raise RuntimeError("no working C++ compiler found\nmore detail")
        return call() if when == "torch.compile" else call

    monkeypatch.setattr(torch, "compile", broken)
    code, out, err = train([*UNIFORM, "--passes", 1, "--compile", 1], tmp_path / "broken")
    assert code == 0, err
    notes = [line for line in out.splitlines() if "torch.compile failed" in line]
    assert notes == ["torch.compile failed (RuntimeError: no working C++ compiler found); "
                     "running eagerly, as --compile 0 does"]
    code, _, err = train([*UNIFORM, "--passes", 1, "--compile", 0], tmp_path / "eager")
    assert code == 0, err
    assert_same_training_state(torch.load(tmp_path / "broken" / "uniform_params" / "pass_0.pt", weights_only=False),
                               torch.load(tmp_path / "eager" / "uniform_params" / "pass_0.pt", weights_only=False))


def test_a_miscompiled_step_is_caught_on_the_first_batch_and_the_run_goes_on_eagerly(tmp_path, monkeypatch):
    """A compiled kernel that computes wrong numbers (stale in a cache made under other kernel
    choices, say) differs from the eager step on the first batch: the run says so in one line
    and trains eagerly, the very numbers of --compile 0."""
    def miscompiled(fn, **kwargs):
        def call(*args):
            return [t * 1.5 if isinstance(t, torch.Tensor) else t for t in fn(*args)]  # D's logits, losses off
        return call

    monkeypatch.setattr(torch, "compile", miscompiled)
    code, out, err = train([*UNIFORM, "--passes", 1, "--compile", 1], tmp_path / "wrong")
    assert code == 0, err
    notes = [line for line in out.splitlines() if "differs from the eager one" in line]
    assert len(notes) == 1 and "running eagerly, as --compile 0 does" in notes[0], out
    code, _, err = train([*UNIFORM, "--passes", 1, "--compile", 0], tmp_path / "eager")
    assert code == 0, err
    assert_same_training_state(torch.load(tmp_path / "wrong" / "uniform_params" / "pass_0.pt", weights_only=False),
                               torch.load(tmp_path / "eager" / "uniform_params" / "pass_0.pt", weights_only=False))
