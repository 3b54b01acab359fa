"""A kill at any moment of a checkpoint write leaves a loadable checkpoint under the final name."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import gan_trainer
from conftest import CLI_ENV, REPO

N = 25_000_000  # int32: a 100 MB checkpoint, so that a write takes a while

WRITER = f"""
import os, sys
from pathlib import Path
sys.path.insert(0, {str(REPO)!r})
import torch
import gan_trainer

path = Path(sys.argv[1])
big = torch.arange({N}, dtype=torch.int32)
gan_trainer.save_checkpoint(path, {{"version": 0, "big": big}}, keep=0)  # the good old checkpoint
print("ready", flush=True)
for round_no, command in enumerate(sys.stdin, 1):
    if command.strip() != "go":
        break
    pid = os.fork()
    if pid == 0:  # the writer: overwrite the checkpoint again and again until killed
        k = 1000 * round_no  # versions grow from round to round
        while True:
            k += 1
            gan_trainer.save_checkpoint(path, {{"version": k, "big": big + k}}, keep=0)
    print(pid, flush=True)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""


def temp_files(folder, final):
    return [p for p in folder.iterdir() if p != final]


def wait_for(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the writer made no progress"
        time.sleep(0.001)


def test_sigkill_during_checkpoint_writes(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    final = tmp_path / "params" / "pass_0.pt"
    folder = final.parent
    folder.mkdir()
    helper = subprocess.Popen([sys.executable, str(script), str(final)], env=CLI_ENV, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def temp_size():
        return max((p.stat().st_size for p in temp_files(folder, final) if p.exists()), default=-1)

    def replaced(inode):
        return lambda: final.stat().st_ino != inode

    # The moments of the kill: at once; as the temporary file appears; half way through it;
    # when all of it is written (fsync / rename); just after a rename replaced the checkpoint.
    moments = {
        "at once": lambda: None,
        "temp file created": lambda: wait_for(lambda: temp_size() >= 0),
        "half written": lambda: wait_for(lambda: temp_size() >= 2 * N),
        "fully written": lambda: wait_for(lambda: temp_size() >= 4 * N),
        "just replaced": lambda: wait_for(replaced(final.stat().st_ino)),
    }
    killed_mid_write, versions = 0, []
    try:
        assert helper.stdout.readline().strip() == "ready"
        for name, wait in moments.items():
            helper.stdin.write("go\n")
            helper.stdin.flush()
            pid = int(helper.stdout.readline())
            wait()
            os.kill(pid, signal.SIGKILL)
            assert helper.stdout.readline().strip() == "reaped"

            # the final name holds a complete checkpoint, the old one or a newer one
            ckpt = torch.load(final, weights_only=True)
            version = int(ckpt["version"])
            assert ckpt["big"].shape == (N,), name
            assert ckpt["big"][0].item() == version and ckpt["big"][-1].item() == N - 1 + version, name
            versions.append(version)
            # a write cut short leaves only its hidden temporary file, never a checkpoint name
            others = temp_files(folder, final)
            assert all(p.name.startswith(".pass_0.pt.") and p.name.endswith(".tmp") for p in others), others
            assert gan_trainer.list_checkpoints(folder) == [final]
            killed_mid_write += bool(others)
            for p in others:  # 100 MB each: do not keep them around
                p.unlink()
    finally:
        if helper.poll() is None:
            helper.stdin.close()
            helper.wait(timeout=30)
    assert versions == sorted(versions)
    assert versions[-1] > 0  # a new checkpoint did replace the old one
    # the kills did land inside writes (else this test would prove nothing)
    assert killed_mid_write >= 2, versions
    assert helper.returncode == 0


def test_atomic_path_leaves_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "pass_3.pt"
    torch.save({"version": "old"}, target)
    with pytest.raises(gan_trainer.UserError, match=f"cannot write {target}: disk full"):
        with gan_trainer.atomic_path(target) as tmp:
            assert tmp.parent == target.parent and tmp != target
            tmp.write_bytes(b"half a checkp")
            raise OSError(28, "disk full")
    assert torch.load(target, weights_only=True) == {"version": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pass_3.pt"]


def test_save_checkpoint_replaces_and_prunes(tmp_path):
    for k in range(4):
        gan_trainer.save_checkpoint(tmp_path / f"pass_{k}.pt", {"pass": k}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pass_2.pt", "pass_3.pt"]
    gan_trainer.save_checkpoint(tmp_path / "pass_3.pt", {"pass": 33}, keep=2)
    assert torch.load(tmp_path / "pass_3.pt", weights_only=True) == {"pass": 33}
    # pass_10 is newer than pass_9 (numeric, not text, order)
    gan_trainer.save_checkpoint(tmp_path / "pass_9.pt", {"pass": 9}, keep=2)
    gan_trainer.save_checkpoint(tmp_path / "pass_10.pt", {"pass": 10}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pass_10.pt", "pass_9.pt"]
    # keep 0 keeps them all
    gan_trainer.save_checkpoint(tmp_path / "pass_11.pt", {"pass": 11}, keep=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pass_10.pt", "pass_11.pt", "pass_9.pt"]
