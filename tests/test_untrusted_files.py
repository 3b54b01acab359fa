"""Files from elsewhere never run code, and odd ones are refused in one line.

Checkpoints hold tensors and plain values only and are read with torch.load(weights_only=True);
every field is checked before use. CIFAR batches go through an unpickler that admits what a
CIFAR-10 batch holds and nothing else. The crafted files are built here.
"""
import io
import os
import pickle
import pickletools
import shutil
import subprocess

import numpy as np
import pytest
import torch

import gan_trainer
from conftest import REPO, assert_one_line_error, cifar_batch_bytes, make_cifar_dir, run_main


class RunsCode:
    """Unpickled (without weights_only), it creates a file: the proof that loading ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def checkpoint_in(tmp_path, content, raw=False):
    """tmp_path/out/uniform_params/pass_1.pt holding `content` (torch.save, or raw pickle bytes)."""
    params = tmp_path / "out" / "uniform_params"
    params.mkdir(parents=True, exist_ok=True)
    path = params / "pass_1.pt"
    if raw:
        path.write_bytes(content)
    else:
        torch.save(content, path)
    return tmp_path / "out", path


ACTIONS = {
    "generate": ["--generate", 4],
    "evaluate": ["--evaluate", "--samples", 64],
    "resume": ["--resume", "--passes", 3, "--compile", 0],
}


def refused(out, capsys, action, *fragments):
    code, _, err = run_main(["-d", "uniform", "--use_gpu", 0, "--out_dir", out, *ACTIONS[action]], capsys)
    return assert_one_line_error(code, err, "pass_1.pt", *fragments)


# ------------------------------------------------------------------ checkpoints that would run code

@pytest.mark.parametrize("action", ACTIONS)
def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path, capsys, action):
    marker = tmp_path / "ran"
    out, _ = checkpoint_in(tmp_path, RunsCode(marker))
    refused(out, capsys, action, "refused", "could run code", "posix.system")
    assert not marker.exists()


def test_a_checkpoint_of_an_earlier_version_is_refused_as_such(uniform_run, tmp_path, capsys):
    """Earlier versions pickled NumPy's random state (and had G's first batch norm per channel)."""
    old = torch.load(uniform_run.params("uniform") / "pass_1.pt")
    for key in ("format", "run_options", "quality", "generator_ema"):  # what format 1 lacked
        del old[key]
    old["rng"]["numpy"] = np.random.get_state()  # a tuple holding a NumPy array, as they wrote it
    out, _ = checkpoint_in(tmp_path, old)
    refused(out, capsys, "generate", "refused", "earlier versions", "numpy")
    del old["rng"]["numpy"]  # even one that loads: no format key
    torch.save(old, out / "uniform_params" / "pass_1.pt")
    refused(out, capsys, "generate", "earlier version", "architecture")


def test_checkpoints_load_with_pytorchs_default_torch_load(uniform_run, mnist_run):
    """A plain torch.load(path) (weights_only=True since PyTorch 2.6) reads them."""
    for path in (uniform_run.params("uniform") / "pass_1.pt", mnist_run.params("mnist") / "pass_1.pt"):
        ckpt = torch.load(path)
        assert ckpt["format"] == gan_trainer.CHECKPOINT_FORMAT
        assert torch.load(path, weights_only=True).keys() == gan_trainer.CHECKPOINT_KEYS


# ------------------------------------------------------------------ checkpoints with odd content

def set_path(ckpt, keys, value):
    *parents, last = keys
    for k in parents:
        ckpt = ckpt[k]
    if value is DELETE:
        del ckpt[last]
    else:
        ckpt[last] = value(ckpt[last]) if callable(value) else value


DELETE = object()
FIRST_G = "0.weight"  # the uniform G's first fc weight (10 x 10)

ODD = {  # name: (path to the field, new value or a function of the old one, what the line says)
    "top level a list": ((), None, "holds a list"),
    "missing key": (("schedule",), DELETE, "missing schedule"),
    "extra key": (("surprise",), 1, "unexpected surprise"),
    "other format": (("format",), 5, "format 5"),
    "format 2 with the newer fields": (("format",), 2, "format 2, this trainer reads 4"),
    "format 3 with the newer fields": (("format",), 3, "format 3, this trainer reads 4"),
    "an averaged G in a run without one": (("generator_ema",), {"0.weight": torch.zeros(10, 10)},
                                           "generator_ema must be empty"),
    "an unknown augmentation": (("config", "augment"), "blur", "config.augment must be a comma list"),
    "augmentation of points": (("config", "augment"), "color", "config.augment must be a comma list"),
    "format a tensor": (("format",), torch.tensor([2, 2]), "format"),
    "data source a list": (("config", "data_source"), ["uniform"], "config.data_source"),
    "sample shape a string": (("config", "sample_shape"), "2", "config.sample_shape"),
    "CUDA random state of the wrong size": (("rng", "cuda"), [torch.zeros(3, dtype=torch.uint8)], "rng.cuda"),
    "generator None": (("generator",), None, "generator is not a state dict"),
    "generator missing a tensor": (("generator", FIRST_G), DELETE, "generator is not a state dict"),
    "generator wrong shape": (("generator", FIRST_G), torch.zeros(3, 3), "generator.0.weight"),
    "generator integers": (("generator", FIRST_G), lambda t: t.long(), "generator.0.weight"),
    "generator NaN": (("generator", FIRST_G), lambda t: t * float("nan"), "finite"),
    "discriminator a string": (("discriminator",), "weights", "discriminator"),
    "optimizer None": (("opt_g",), None, "opt_g: not an optimizer state dict"),
    "optimizer without groups": (("opt_g", "param_groups"), [], "opt_g: must have one parameter group"),
    "empty optimizer state": (("opt_d", "state"), {}, "opt_d: no Adam state"),
    "moment of the wrong size": (("opt_d", "state", 0, "exp_avg"), torch.zeros(7), "opt_d: state 0"),
    "negative learning rate": (("opt_g", "param_groups", 0, "lr"), -1.0, "opt_g: lr"),
    "torch random state of the wrong size": (("rng", "torch"), torch.zeros(10, dtype=torch.uint8), "rng.torch"),
    "python random state garbage": (("rng", "python"), (3, (1, 2), None), "rng.python"),
    "numpy random state of the wrong size": (("rng", "numpy", "state", "key"), [1, 2, 3], "rng.numpy"),
    "negative pass": (("pass",), -1, "pass must be"),
    "iteration past the pass": (("iteration",), 10 ** 9, "iteration must be"),
    "schedule of an unknown net": (("schedule", "net"), "both", "schedule"),
    "fixed noise of another width": (("fixed_noise",), torch.zeros(16, 3), "fixed_noise"),
    "negative batch size": (("config", "batch_size"), -5, "config.batch_size"),
    "zero hidden width": (("config", "hidden_dim"), 0, "config.hidden_dim"),
    "learning rate a string": (("config", "lr"), "fast", "config.lr"),
    "config missing a field": (("config", "noise_dim"), DELETE, "config must have exactly"),
    "config with an extra field": (("config", "depth"), 3, "config must have exactly"),
    "config of another sample shape": (("config", "sample_shape"), (3,), "config.sample_shape"),
    "negative seed": (("options", "seed"), -1, "options"),
    "speed options missing": (("options", "speed"), DELETE, "options"),
    "speed with zero threads": (("options", "speed", "threads"), 0, "options.speed"),
    "trainer logs of the wrong form": (("trainer_logs", "dis", "pass_sums"), [1.0], "trainer_logs"),
    "negative step count": (("steps", "gen"), -1, "steps"),
    "elapsed not a number": (("elapsed",), float("nan"), "elapsed"),
}


@pytest.mark.parametrize("name", ODD)
def test_a_checkpoint_with_odd_content_is_refused_in_one_line(uniform_run, tmp_path, capsys, name):
    keys, value, says = ODD[name]
    ckpt = torch.load(uniform_run.params("uniform") / "pass_1.pt")
    assert ckpt["steps"]["gen"] > 0 and ckpt["steps"]["dis"] > 0  # both nets have Adam state to spoil
    if keys:
        set_path(ckpt, keys, value)
    else:
        ckpt = [ckpt]
    out, _ = checkpoint_in(tmp_path, ckpt)
    for action in ACTIONS:  # refused alike before generating, evaluating or resuming
        refused(out, capsys, action, says)
    written = sorted(p.name for p in (out / "uniform_params").iterdir() if p.name != ".lock")
    assert written == ["pass_1.pt"]  # nothing written, nothing removed


def test_the_unaltered_checkpoint_passes_the_same_checks(uniform_run, tmp_path, capsys):
    """The control for the test above: the same file, saved again unchanged, is accepted."""
    out, _ = checkpoint_in(tmp_path, torch.load(uniform_run.params("uniform") / "pass_1.pt"))
    code, _, err = run_main(["-d", "uniform", "--use_gpu", 0, "--out_dir", out, *ACTIONS["generate"]], capsys)
    assert code == 0, err


# ------------------------------------------------------------------ CIFAR-10 batches

def test_a_cifar_batch_that_would_run_code_is_refused_without_running_it(tmp_path, capsys):
    data = make_cifar_dir(tmp_path / "data", per_batch=8)
    marker = tmp_path / "ran"
    (data / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps(RunsCode(marker), protocol=2))
    code, _, err = run_main(["-d", "cifar", "--use_gpu", 0, "--passes", 1, "--iters", 1, "--batch_size", 8,
                             "--data_dir", data, "--out_dir", tmp_path / "out", "--quiet"], capsys)
    assert_one_line_error(code, err, "data_batch_3", "not a CIFAR-10 python batch", "posix.system")
    assert not marker.exists()


def test_a_cifar_batch_of_python_objects_is_refused(tmp_path, capsys):
    data = make_cifar_dir(tmp_path / "data", per_batch=8)
    rows = np.array([object()] * 8 * 3072, dtype=object).reshape(8, 3072)
    (data / "cifar-10-batches-py" / "data_batch_2").write_bytes(pickle.dumps({b"data": rows}, protocol=4))
    code, _, err = run_main(["-d", "cifar", "--use_gpu", 0, "--passes", 1, "--iters", 1, "--batch_size", 8,
                             "--data_dir", data, "--out_dir", tmp_path / "out", "--quiet"], capsys)
    assert_one_line_error(code, err, "data_batch_2", "not a CIFAR-10 python batch")


def test_cifar_unpickler_reads_a_batch_as_cifar_writes_it(tmp_path):
    """A real batch is a Python 2 protocol-2 pickle of a dict whose 'data' is a NumPy array;
    the fixture's pickles are written that way, and hold nothing but what the unpickler admits."""
    rows = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    raw = cifar_batch_bytes(rows, labels=[6, 9])
    names = {arg for op, arg, _ in pickletools.genops(raw) if op.name == "GLOBAL"}
    admitted = {" ".join(name) for name in gan_trainer.CifarUnpickler.ALLOWED}
    assert names <= admitted and {"numpy ndarray", "numpy dtype"} <= names
    batch = gan_trainer.CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    assert np.array_equal(batch[b"data"], rows) and batch[b"labels"] == [6, 9]


def test_download_cifar_checks_the_archives_md5_before_unpacking(tmp_path):
    """The script refuses an archive whose MD5 is not the published one (a fake curl serves it)."""
    shutil.copy(REPO / "data" / "download_cifar.sh", tmp_path)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "curl").write_text('#!/bin/sh\nwhile [ "$1" != "-o" ]; do shift; done\necho not cifar > "$2"\n')
    (fake_bin / "curl").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}")
    proc = subprocess.run(["bash", str(tmp_path / "download_cifar.sh")], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert "MD5" in proc.stderr and "c58f30108f718f92721af3b95e74349a" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "download_cifar.sh"]  # nothing unpacked or left
