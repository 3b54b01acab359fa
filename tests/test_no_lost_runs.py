"""No workflow loses a run: resuming from elsewhere, two runs in one folder, failed writes, a
reader that goes away, stop signals anywhere, resuming with other speed options."""
import hashlib
import os
import re
import resource
import signal
import subprocess
import time

import pytest
import torch

import gan_trainer

from conftest import (CLI_ENV, UNIFORM_ARGS, assert_one_line_error, cli_args, load_ckpt, popen_cli, read_metrics,
                      run_main)

TINY = ["-d", "uniform", "--batch_size", 16, "--iters", 20, "--use_gpu", 0, "--quiet"]


def fingerprint(folder):
    """{file name: MD5} of a folder's files (the lock file aside)."""
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file() and p.name != ".lock"}


def train(capsys, out, *extra, passes=2, seed=1):
    code, stdout, err = run_main([*TINY, "--passes", passes, "--seed", seed, "--out_dir", out, *extra], capsys)
    assert code == 0, err
    return stdout


# ------------------------------------------------------------------ --resume PATH from elsewhere

def test_resume_from_another_folder_never_touches_a_run_in_this_one(tmp_path, capsys):
    train(capsys, tmp_path / "a")
    train(capsys, tmp_path / "b", seed=2)
    before = fingerprint(tmp_path / "a" / "uniform_params")
    code, _, err = run_main([*TINY, "--passes", 3, "--out_dir", tmp_path / "a",
                             "--resume", tmp_path / "b" / "uniform_params" / "pass_1.pt"], capsys)
    assert_one_line_error(code, err, "holds another run's checkpoints", "--out_dir")
    assert fingerprint(tmp_path / "a" / "uniform_params") == before  # not replaced, pruned or truncated


def test_a_failed_resume_into_another_folder_can_be_tried_again(tmp_path, capsys):
    """A resume that failed after it had begun writing the new folder's metrics (here: a
    configuration flag it refuses) does not lock that folder against the next try."""
    train(capsys, tmp_path / "a")
    (tmp_path / "c" / "uniform_params").mkdir(parents=True)
    (tmp_path / "c" / "uniform_params" / "metrics.jsonl").write_text("")  # left by a try that failed
    train(capsys, tmp_path / "c", "--resume", tmp_path / "a" / "uniform_params" / "pass_1.pt", passes=3)
    assert load_ckpt(tmp_path / "c" / "uniform_params" / "pass_2.pt")["pass"] == 2


def test_resume_from_another_folder_continues_into_an_empty_one(tmp_path, capsys):
    train(capsys, tmp_path / "a")
    source = fingerprint(tmp_path / "a" / "uniform_params")
    stdout = train(capsys, tmp_path / "c", "--resume", tmp_path / "a" / "uniform_params" / "pass_1.pt", passes=3)
    assert "at pass 2 iteration 0 of 3 passes" in stdout
    assert fingerprint(tmp_path / "a" / "uniform_params") == source  # the source run is untouched
    ckpt = load_ckpt(tmp_path / "c" / "uniform_params" / "pass_2.pt")
    assert (ckpt["pass"], ckpt["steps"]["dis"] + ckpt["steps"]["gen"]) == (2, 60)
    # the new folder's metrics carry the source run's lines, then its own
    assert [m["pass"] for m in read_metrics(tmp_path / "c" / "uniform_params" / "metrics.jsonl")] == [0, 1, 2]


# ------------------------------------------------------------------ one run per folder

def test_a_second_run_in_the_same_folder_is_refused_while_the_first_runs(tmp_path, capsys):
    out = tmp_path / "out"
    first = popen_cli(*UNIFORM_ARGS, "--passes", 1, "--iters", 100000, "--out_dir", out)
    try:
        assert first.stdout.readline().startswith("training uniform")  # it holds the folder by now
        for extra in ([], ["--resume"]):
            code, _, err = run_main([*TINY, "--passes", 1, "--out_dir", out, *extra], capsys)
            assert_one_line_error(code, err, "in use by another run", f"pid {first.pid}")
        first.kill()  # SIGKILL: the OS drops the lock with the process, nothing stale is left
        first.communicate()
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    train(capsys, tmp_path / "out", passes=1)  # the folder is free (no checkpoint was written: a fresh run)


# ------------------------------------------------------------------ failed writes

def test_a_failing_picture_does_not_cost_the_checkpoint(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "uniform_samples" / "train_pass0.png").mkdir(parents=True)  # a folder where the picture goes
    code, _, err = run_main([*TINY, "--passes", 1, "--seed", 1, "--out_dir", out], capsys)
    assert_one_line_error(code, err, "cannot write", "train_pass0.png")
    ckpt = load_ckpt(out / "uniform_params" / "pass_0.pt")  # written before the picture
    assert (ckpt["pass"], ckpt["iteration"]) == (0, 20)


def test_a_full_disk_ends_in_one_line_naming_the_checkpoint(tmp_path):
    """Files are limited to 16 KiB (RLIMIT_FSIZE: a write beyond fails as on a full disk); the
    metrics fit, the checkpoint does not."""
    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, 16 << 10))

    out = tmp_path / "out"
    proc = subprocess.run(cli_args(*TINY, "--passes", 1, "--seed", 1, "--out_dir", out), env=CLI_ENV,
                          capture_output=True, text=True, timeout=120, preexec_fn=small_files)
    assert_one_line_error(proc.returncode, proc.stderr, "cannot write", "pass_0.pt: File too large")
    assert [p.name for p in (out / "uniform_params").glob("*.pt")] == []  # no half-written checkpoint


# ------------------------------------------------------------------ a reader that goes away

def test_training_goes_on_when_stdout_is_closed(tmp_path):
    """`gan_trainer.py ... | head -1`: the run finishes quietly, with every checkpoint."""
    out = tmp_path / "out"
    proc = popen_cli(*UNIFORM_ARGS, "--passes", 2, "--out_dir", out)
    first = proc.stdout.readline()
    proc.stdout.close()  # head -1 exits
    _, stderr = proc.communicate(timeout=120)
    assert first.startswith("training uniform")
    assert proc.returncode == 0 and stderr == "", stderr
    assert load_ckpt(out / "uniform_params" / "pass_1.pt")["iteration"] == 101


# ------------------------------------------------------------------ stop signals

def test_sighup_stops_training_with_a_checkpoint(tmp_path):
    """SIGHUP (the terminal closed); SIGINT is in test_resume.py, SIGTERM under torchrun in
    test_distributed.py: the three share one handler."""
    sig = signal.SIGHUP
    out = tmp_path / "out"
    proc = popen_cli(*UNIFORM_ARGS, "--passes", 1, "--iters", 100000, "--out_dir", out)
    try:
        while not proc.stdout.readline().startswith("d_pos_loss"):  # training is under way
            pass
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130
    line = assert_one_line_error(proc.returncode, stderr, signal.Signals(sig).name, "continue with --resume")
    stopped_at = int(re.search(r"iteration (\d+)", line).group(1))
    assert load_ckpt(out / "uniform_params" / "pass_0.pt")["iteration"] == stopped_at > 0


def wait_until_torch_loads(proc, timeout=60):
    """Until the process has mapped libtorch: it is importing torch (which takes a while longer)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if "libtorch" in open(f"/proc/{proc.pid}/maps").read():
                return
        except OSError:
            pass
        time.sleep(0.005)
    raise AssertionError("the program never loaded torch")


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc to see the import under way")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_stop_signal_during_start_up_ends_in_one_line(tmp_path, sig):
    """While torch is still loading (its import takes seconds): no traceback, status 130."""
    proc = popen_cli(*UNIFORM_ARGS, "--passes", 1, "--out_dir", tmp_path / "out")
    wait_until_torch_loads(proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert_one_line_error(proc.returncode, stderr, "interrupted")
    assert proc.returncode == 130


def test_sigterm_during_generate_ends_in_one_line(uniform_run, tmp_path):
    """(--evaluate runs under the same handler, main's signals_interrupt.)"""
    proc = popen_cli("-d", "uniform", "--use_gpu", 0, "--params", uniform_run.params("uniform") / "pass_1.pt",
                     "--output", tmp_path / "g", "--generate", 3_000_000)
    time.sleep(3)  # loaded by now on most machines; either way the answer is the same
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert_one_line_error(proc.returncode, stderr, "interrupted")
    assert proc.returncode == 130
    assert not (tmp_path / "g.npy").exists()


# ------------------------------------------------------------------ resuming with other speed options

def test_resuming_with_another_thread_count_says_it_is_not_bit_identical(tmp_path, capsys):
    out = tmp_path / "out"
    stdout = train(capsys, out, "--threads", 1, passes=1)
    assert "speed: cpu, 1 thread," in stdout
    try:
        stdout = train(capsys, out, "--resume", "--threads", 2, passes=2)
    finally:
        torch.set_num_threads(1)  # this process's setting for the other tests (conftest)
    notes = [line for line in stdout.splitlines() if "bit-identical" in line]
    assert len(notes) == 1 and "threads 2 (the run: 1)" in notes[0]
    assert load_ckpt(out / "uniform_params" / "pass_1.pt")["options"]["speed"]["threads"] == 2
    # the same options as the run: no note
    stdout = train(capsys, out, "--resume", "--threads", 2, passes=3)
    assert "bit-identical" not in stdout


def test_a_plain_resume_keeps_the_runs_speed_options(tmp_path, capsys):
    """A uniform run made with --compile 0 (not the default) resumes with it: no note, and the
    checkpoint still says so."""
    out = tmp_path / "out"
    train(capsys, out, passes=1)  # --compile 0 (conftest)
    capsys.readouterr()
    code = gan_trainer.main(["-d", "uniform", "--use_gpu", "0", "--quiet", "--resume", "--passes", "2",
                             "--out_dir", str(out)])  # not run_main: conftest would add --compile 0
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "bit-identical" not in stdout and "compile off" in stdout
    assert load_ckpt(out / "uniform_params" / "pass_1.pt")["options"]["speed"]["compile"] is False


def test_resuming_with_the_compiled_step_switched_says_so(tmp_path, capsys):
    out = tmp_path / "out"
    train(capsys, out, passes=1)  # --compile 0 (conftest)
    code, stdout, err = run_main([*TINY, "--passes", 2, "--out_dir", out, "--resume", "--compile", 1,
                                  "--iters", 20], capsys)
    assert code == 0, err
    assert "compile True (the run: False)" in stdout and "bit-identical" in stdout
