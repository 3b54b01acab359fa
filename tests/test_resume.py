"""Issue 3: interrupted runs continue exactly where they stopped."""
import gzip
import re
import shutil
import signal

import pytest
import torch

import gan_trainer
from conftest import (MNIST_ARGS, MNIST_IMAGES, UNIFORM_ARGS, assert_one_line_error, eager, load_ckpt,
                      popen_cli, read_metrics, run_cli, run_main)

D_POS_LINE = re.compile(r"^d_pos_loss is [0-9.e+-]+     d_neg_loss is [0-9.e+-]+$")


def without_seconds(metrics):
    return [{k: v for k, v in m.items() if k != "seconds"} for m in metrics]


def assert_same_training_state(a, b):
    for net in ("generator", "discriminator"):
        assert a[net].keys() == b[net].keys()
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), f"{net}.{k} differs"
    for opt in ("opt_g", "opt_d"):
        for pid, state in a[opt]["state"].items():
            for k, v in state.items():
                assert torch.equal(v, b[opt]["state"][pid][k]), f"{opt} state {pid}.{k} differs"
    assert a["schedule"] == b["schedule"]
    assert (a["pass"], a["iteration"]) == (b["pass"], b["iteration"])


# ------------------------------------------------------------------ exact resume

def test_uniform_resume_is_exact(cli, uniform_run, tmp_path):
    """--passes 2 in one go == --passes 1, then --resume --passes 2 (bit for bit, CPU, --seed)."""
    first = cli.result("uniform_1pass")
    assert first.returncode == 0, first.stderr
    out = tmp_path / "out"
    shutil.copytree(cli.out("uniform_1pass"), out)
    assert sorted(p.name for p in (out / "uniform_params").glob("*.pt")) == ["pass_0.pt"]
    proc = run_cli("-d", "uniform", "--resume", "--passes", 2, "--use_gpu", 0, "--quiet", "--out_dir", out)
    assert proc.returncode == 0, proc.stderr
    assert "resuming" in proc.stdout and "pass 1 iteration 0" in proc.stdout
    assert uniform_run.proc.returncode == 0
    full = uniform_run.params("uniform")
    assert without_seconds(read_metrics(out / "uniform_params" / "metrics.jsonl")) == \
        without_seconds(read_metrics(full / "metrics.jsonl"))
    assert_same_training_state(load_ckpt(out / "uniform_params" / "pass_1.pt"), load_ckpt(full / "pass_1.pt"))
    # the log lines of pass 1 are the same too
    tail = lambda text: [l for l in text.splitlines() if l.startswith(("d_", "Batch="))]  # noqa: E731
    assert tail(proc.stdout) == tail(uniform_run.proc.stdout)[-len(tail(proc.stdout)):]
    assert (out / "uniform_samples" / "train_pass1.png").exists()


def test_mnist_resume_is_exact(mnist_run, tmp_path, capsys):
    """Same for mnist (data given as .gz this time: the same images)."""
    assert mnist_run.proc.returncode == 0
    data = tmp_path / "data"
    (data / "mnist_data").mkdir(parents=True)
    raw = (mnist_run.data_dir / "mnist_data" / MNIST_IMAGES).read_bytes()
    (data / "mnist_data" / (MNIST_IMAGES + ".gz")).write_bytes(gzip.compress(raw))
    out = tmp_path / "out"
    code, _, err = run_main([*MNIST_ARGS, "--passes", 1, "--data_dir", data, "--out_dir", out], capsys)
    assert code == 0, err
    code, stdout, err = run_main(["-d", "mnist", "--resume", "--passes", 2, "--use_gpu", 0, "--quiet",
                                  "--data_dir", data, "--out_dir", out], capsys)
    assert code == 0, err
    assert "pass 1 iteration 0" in stdout
    full = mnist_run.params("mnist")
    assert without_seconds(read_metrics(out / "mnist_params" / "metrics.jsonl")) == \
        without_seconds(read_metrics(full / "metrics.jsonl"))
    assert_same_training_state(load_ckpt(out / "mnist_params" / "pass_1.pt"), load_ckpt(full / "pass_1.pt"))


def test_resume_when_all_passes_are_done(uniform_run, tmp_path, capsys):
    shutil.copytree(uniform_run.params("uniform"), tmp_path / "uniform_params")
    before = (tmp_path / "uniform_params" / "pass_1.pt").read_bytes()
    code, out, err = run_main(["-d", "uniform", "--resume", "--use_gpu", 0, "--quiet", "--out_dir", tmp_path], capsys)
    assert code == 0, err
    assert "nothing to do" in out
    assert (tmp_path / "uniform_params" / "pass_1.pt").read_bytes() == before
    assert len(read_metrics(tmp_path / "uniform_params" / "metrics.jsonl")) == 4


def test_resume_without_a_checkpoint(tmp_path, capsys):
    code, out, err = run_main(["-d", "uniform", "--resume", "--use_gpu", 0, "--out_dir", tmp_path], capsys)
    assert_one_line_error(code, err, "train first")


def test_resume_from_a_truncated_checkpoint(uniform_run, tmp_path, capsys):
    params = tmp_path / "uniform_params"
    params.mkdir()
    data = (uniform_run.params("uniform") / "pass_1.pt").read_bytes()
    (params / "pass_1.pt").write_bytes(data[:len(data) // 3])
    code, out, err = run_main(["-d", "uniform", "--resume", "--use_gpu", 0, "--out_dir", tmp_path], capsys)
    assert_one_line_error(code, err, "pass_1.pt")


def test_loaded_checkpoint_keeps_random_states_on_the_cpu(uniform_run):
    """torch.set_rng_state only accepts a CPU ByteTensor: the checkpoint is loaded onto the CPU
    (the nets' load_state_dict moves weights to the training device), so --resume on a GPU
    can restore the random states."""
    ckpt = gan_trainer.load_checkpoint(uniform_run.params("uniform") / "pass_1.pt", "uniform")
    assert ckpt["rng"]["torch"].device.type == "cpu"
    assert ckpt["rng"]["torch"].dtype == torch.uint8
    saved = torch.get_rng_state()
    try:
        gan_trainer.set_rng_state(ckpt["rng"])
        assert torch.equal(torch.get_rng_state(), ckpt["rng"]["torch"])
    finally:
        torch.set_rng_state(saved)


# ------------------------------------------------------------------ Ctrl-C

def test_sigint_writes_a_checkpoint_and_resume_continues_exactly(tmp_path, capsys):
    args = ["-d", "uniform", "--passes", 1, "--iters", 300, "--batch_size", 16, "--seed", 2, "--use_gpu", 0,
            "--quiet"]
    out = tmp_path / "out"
    proc = popen_cli(*args, "--out_dir", out)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if D_POS_LINE.match(line.rstrip("\n")):
                break
        assert seen and D_POS_LINE.match(seen[-1].rstrip("\n")), "".join(seen)
        proc.send_signal(signal.SIGINT)
        rest, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode in (0, 130), stderr
    line = assert_one_line_error(1, stderr, "SIGINT", "--resume")
    stopped_at = int(re.search(r"iteration (\d+)", line).group(1))
    ckpt = load_ckpt(out / "uniform_params" / "pass_0.pt")
    assert (ckpt["pass"], ckpt["iteration"]) == (0, stopped_at)
    assert 0 < stopped_at < 300
    assert not (out / "uniform_samples" / "train_pass0.png").exists()  # the pass was not finished

    code, stdout, err = run_main(["-d", "uniform", "--resume", "--use_gpu", 0, "--quiet", "--out_dir", out], capsys)
    assert code == 0, err
    assert f"at pass 0 iteration {stopped_at} " in stdout
    ckpt = load_ckpt(out / "uniform_params" / "pass_0.pt")
    assert (ckpt["pass"], ckpt["iteration"]) == (0, 300)
    assert (out / "uniform_samples" / "train_pass0.png").exists()
    metrics = read_metrics(out / "uniform_params" / "metrics.jsonl")
    assert [m["iteration"] for m in metrics] == [0, 100, 200]

    # and the interrupted + resumed run is the uninterrupted one, bit for bit
    code, full_out, err = run_main([*args, "--out_dir", tmp_path / "full"], capsys)
    assert code == 0, err
    assert_same_training_state(ckpt, load_ckpt(tmp_path / "full" / "uniform_params" / "pass_0.pt"))
    assert without_seconds(metrics) == without_seconds(read_metrics(tmp_path / "full" / "uniform_params" /
                                                                    "metrics.jsonl"))
    # the trainer summaries carry over the interruption too (same "Batch=" lines, same averages)
    summaries = lambda text: [l for l in text.splitlines() if l.startswith("Batch=")]  # noqa: E731
    assert summaries("".join(seen) + rest + stdout) == summaries(full_out)
    assert summaries(full_out)


# ------------------------------------------------------------------ non-finite loss

def test_non_finite_loss_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    real_batches, calls = gan_trainer.real_batches, []

    def poisoned(*args):
        for x, y in real_batches(*args):
            calls.append(1)
            yield (x if len(calls) <= 7 else torch.full_like(x, float("nan"))), y  # pass 1, iteration 2 on

    monkeypatch.setattr(gan_trainer, "real_batches", poisoned)
    code, out, err = run_main(["-d", "uniform", "--passes", 3, "--iters", 5, "--batch_size", 16, "--seed", 0,
                               "--use_gpu", 0, "--quiet", "--out_dir", tmp_path], capsys)
    assert code == 1
    line = assert_one_line_error(code, err, "non-finite loss at pass 1 iteration 2", "pass_0.pt")
    params = tmp_path / "uniform_params"
    assert sorted(p.name for p in params.glob("*.pt")) == ["pass_0.pt"]
    ckpt = load_ckpt(params / "pass_0.pt")
    assert ckpt["pass"] == 0
    assert all(torch.isfinite(v).all() for v in ckpt["generator"].values())
    assert "Traceback" not in line
    # the plots show the run up to the stop (passes this fast are otherwise plotted every 30 s)
    samples = tmp_path / "uniform_samples"
    assert (samples / "losses.png").stat().st_size > 0
    from PIL import Image
    with Image.open(samples / "progress.gif") as gif:
        assert gif.n_frames == 1  # pass 0's picture


# ------------------------------------------------------------------ --eval_every and resume

EVAL_ARGS = ["-d", "uniform", "--iters", 3, "--batch_size", 16, "--seed", 4, "--use_gpu", 0, "--quiet",
             "--eval_every", 1, "--samples", 200]


@pytest.fixture(scope="module")
def eval_runs(tmp_path_factory):
    """With --eval_every 1: 2 passes in one go, and 1 pass then --resume --passes 2."""
    import contextlib
    import io
    root = tmp_path_factory.mktemp("eval_runs")
    results = {}
    for name, argvs in {"full": [[*EVAL_ARGS, "--passes", 2]],
                        "resumed": [[*EVAL_ARGS, "--passes", 1],
                                    ["-d", "uniform", "--resume", "--passes", 2, "--use_gpu", 0, "--quiet",
                                     "--eval_every", 1, "--samples", 200]]}.items():
        for argv in argvs:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
                code = gan_trainer.main(eager([*argv, "--out_dir", root / name]))
            results.setdefault(name, []).append((code, err.getvalue()))
    return root, results


def test_resume_with_eval_every_is_exact(eval_runs):
    root, results = eval_runs
    assert all(code == 0 for code, _ in results["full"] + results["resumed"]), results
    assert_same_training_state(load_ckpt(root / "resumed" / "uniform_params" / "pass_1.pt"),
                               load_ckpt(root / "full" / "uniform_params" / "pass_1.pt"))


def test_resume_keeps_the_eval_records(eval_runs):
    root, results = eval_runs
    evals = lambda name: [(m["pass"], m["iteration"]) for m in  # noqa: E731
                          read_metrics(root / name / "uniform_params" / "metrics.jsonl") if "eval" in m]
    assert evals("full") == [(0, 3), (1, 3)]
    assert evals("resumed") == evals("full")


def test_resume_after_evaluated_passes_runs(eval_runs, tmp_path, capsys):
    root, _ = eval_runs
    shutil.copytree(root / "full", tmp_path / "out")
    code, out, err = run_main(["-d", "uniform", "--resume", "--passes", 3, "--use_gpu", 0, "--quiet",
                               "--eval_every", 1, "--samples", 200, "--out_dir", tmp_path / "out"], capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "uniform_samples" / "train_pass2.png").exists()
    assert (tmp_path / "out" / "uniform_params" / "pass_2.pt").exists()


def test_a_fresh_run_does_not_overwrite_an_existing_one(uniform_run, tmp_path, capsys):
    shutil.copytree(uniform_run.params("uniform"), tmp_path / "uniform_params")
    before = (tmp_path / "uniform_params" / "pass_1.pt").read_bytes()
    code, out, err = run_main([*UNIFORM_ARGS, "--passes", 1, "--out_dir", tmp_path], capsys)
    assert_one_line_error(code, err, "--resume")
    assert (tmp_path / "uniform_params" / "pass_1.pt").read_bytes() == before
    assert len(read_metrics(tmp_path / "uniform_params" / "metrics.jsonl")) == 4
