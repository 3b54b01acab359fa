"""Several processes started by torchrun (gloo on the CPU) train the single process's run.

Each test starts `python -m torch.distributed.run --standalone --nproc_per_node 2 gan_trainer.py`
with the arguments of one of the shared single-process runs (conftest), and compares: the
choices and counts exactly, the logged losses to float rounding, the final parameters to the
drift that Adam makes of round-off (it turns a gradient that is zero but for round-off, such as
a bias that feeds a batch norm, into a step of up to lr either way), and the files written.
"""
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import CLI_ENV, REPO, TRAINER, assert_one_line_error, read_metrics, run_main


def our_stderr(text):
    """stderr without torchrun's own warnings (W... lines and their continuations)."""
    return [line for line in text.splitlines() if line.strip() and not line.startswith(("W1", "W0", " ", "*"))]


def parameter_gap(a, b, net):
    """The relative distance between two runs' parameters of a net, as one vector."""
    va, vb = (torch.cat([t.flatten() for t in ckpt[net].values()]) for ckpt in (a, b))
    return ((va - vb).norm() / va.norm()).item()


def assert_same_run(single_dir, multi_dir, source, passes):
    params = [d / f"{source}_params" for d in (single_dir, multi_dir)]
    one, two = (read_metrics(p / "metrics.jsonl") for p in params)
    assert len(one) == len(two) > 0
    for m1, m2 in zip(one, two):
        assert (m1["pass"], m1["iteration"], m1["trained"], m1["strike"], m1["d_share"]) == \
               (m2["pass"], m2["iteration"], m2["trained"], m2["strike"], m2["d_share"])
        for key in ("d_pos_loss", "d_neg_loss", "g_loss", "d_real", "d_fake"):
            assert m2[key] == pytest.approx(m1[key], rel=1e-4), (m1["pass"], m1["iteration"], key)
    a, b = (torch.load(p / f"pass_{passes - 1}.pt") for p in params)
    assert a["steps"] == b["steps"] and a["schedule"] == b["schedule"]
    gaps = {net: parameter_gap(a, b, net) for net in ("generator", "discriminator")}
    assert max(gaps.values()) < 5e-3, gaps
    print(f"{source}: largest relative parameter gap {max(gaps.values()):.2e}")
    # rank 0 alone writes: the very files the single process writes
    for folder in ("params", "samples"):
        names = [sorted(p.name for p in (d / f"{source}_{folder}").iterdir() if p.name != ".lock")
                 for d in (single_dir, multi_dir)]
        assert names[0] == names[1]


def test_two_processes_train_the_single_process_uniform_run(uniform_run, cli, tmp_path):
    """conftest's shared uniform run, and the same arguments on two processes."""
    out, proc = cli.out("uniform_ddp"), cli.result("uniform_ddp")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert our_stderr(proc.stderr) == [] and "Traceback" not in proc.stderr
    assert [line for line in proc.stdout.splitlines() if line.startswith("training")] == \
           ["training uniform on cpu: 2 passes of 101 iterations, batch 16, lr 0.0001, seed 1"]  # rank 0's log alone
    assert "speed: 2 processes x cpu" in proc.stdout
    assert_same_run(uniform_run.out, out, "uniform", 2)


    # the checkpoint of the 2-process run resumes in one process, with a note (in a copy: the
    # shared run's folder is read-only for the tests)
    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    code_out = subprocess.run([sys.executable, str(TRAINER), "-d", "uniform", "--resume", "--passes", "3", "--use_gpu",
                               "0", "--quiet", "--compile", "0", "--out_dir", str(copy)], cwd=REPO, env=CLI_ENV,
                              capture_output=True, text=True, timeout=300)
    assert code_out.returncode == 0, code_out.stderr
    assert "processes 1 (the run: 2)" in code_out.stdout
    assert torch.load(copy / "uniform_params" / "pass_2.pt")["options"]["speed"]["processes"] == 1


def test_two_processes_train_the_single_process_mnist_run(mnist_run, cli):
    out, proc = cli.out("mnist_ddp"), cli.result("mnist_ddp")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert our_stderr(proc.stderr) == [] and "Traceback" not in proc.stderr
    assert_same_run(mnist_run.out, out, "mnist", 2)


def test_each_process_takes_its_rows_and_a_batch_must_divide():
    import gan_trainer
    shares = [gan_trainer.Processes(rank, 4).rows(128) for rank in range(4)]
    assert [(s.start, s.stop) for s in shares] == [(0, 32), (32, 64), (64, 96), (96, 128)]
    with pytest.raises(gan_trainer.UserError, match="--batch_size 15 is the global batch: it must divide evenly"):
        gan_trainer.Processes(0, 2).rows(15)


def test_generate_refuses_to_run_under_torchrun(uniform_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_main(["-d", "uniform", "--use_gpu", 0, "--generate", 4, "--out_dir", uniform_run.out], capsys)
    assert_one_line_error(code, err, "--generate runs in one process")
