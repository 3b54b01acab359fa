"""Shared helpers and fixtures: tiny data sets built in tmp dirs, CLI runners, shared training runs.

Nothing here downloads anything or reads the real data: MNIST IDX files and CIFAR-10
python batches are written by the fixtures themselves.
"""
import contextlib
import gzip
import io
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
TRAINER = REPO / "gan_trainer.py"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# The nets are tiny: one intra-op thread is fastest, and on a shared 2-core machine two
# threads oversubscribe badly (20x slower). Subprocesses get the same setting, so that
# in-process and subprocess runs compute bit-identical numbers.
torch.set_num_threads(1)
CLI_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
CLI_ENV.pop("PYTHONWARNINGS", None)

MNIST_IMAGES = "train-images-idx3-ubyte"


# ------------------------------------------------------------------ running the program

def eager(args):
    """Training args with --compile 0 unless they choose: compiling the uniform step (the CPU default) costs
    seconds per run, so runs are eager unless a test is about the compiled step
    (tests/test_compiled_step.py), which equals the eager one to float rounding."""
    args = [str(a) for a in args]
    applying = any(a.split("=")[0] in ("--compile", "--generate", "--evaluate", "--report") for a in args)
    return args if applying else args + ["--compile", "0"]


def cli_args(*args):
    return [sys.executable, str(TRAINER), *eager(args)]


def run_cli(*args, timeout=180):
    """Run gan_trainer.py with `args` in the repository root; returns the CompletedProcess (text)."""
    return subprocess.run(cli_args(*args), cwd=REPO, env=CLI_ENV, capture_output=True, text=True,
                          timeout=timeout)


def popen_cli(*args):
    return subprocess.Popen(cli_args(*args), cwd=REPO, env=CLI_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def popen_torchrun(*args, own_session=False):
    """gan_trainer.py on two processes, started as torchrun starts them (gloo on the CPU);
    own_session: torchrun and its processes in a process group of their own, as a terminal's
    foreground job is (Ctrl-C reaches them all)."""
    return subprocess.Popen([*TORCHRUN, str(TRAINER), *map(str, args)], cwd=REPO, env=CLI_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=own_session)


def stderr_lines(text):
    return [line for line in text.splitlines() if line.strip()]


def assert_one_line_error(returncode, stderr, *fragments):
    """Non-zero exit, exactly one line on stderr, no traceback, every fragment in that line."""
    lines = stderr_lines(stderr)
    assert returncode != 0, f"exit status 0, stderr {stderr!r}"
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{stderr}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


class Blocked(BaseException):
    """A call that blocked (on a FIFO): not an OSError, so nothing in the trainer can catch it."""


@contextlib.contextmanager
def within(seconds):
    """Fails a call that blocks instead of hanging the suite."""
    def late(signum, frame):
        raise Blocked(f"blocked for {seconds} s")
    before = signal.signal(signal.SIGALRM, late)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


def run_main(argv, capsys):
    """gan_trainer.main(argv) in this process: (exit status, stdout, stderr)."""
    import gan_trainer
    capsys.readouterr()
    try:
        code = gan_trainer.main(eager(argv))
    except SystemExit as e:  # argparse errors, interrupted runs
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------ fixture data

def idx_bytes(magic, array):
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", n) for n in array.shape)
    return header + array.tobytes()


def mnist_images(n=200, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)


def make_mnist_dir(root, n=200, seed=0, gz=False, images=None):
    """root/mnist_data/train-images-idx3-ubyte (or .gz only) holding n random 28x28 images."""
    images = mnist_images(n, seed) if images is None else images
    folder = Path(root) / "mnist_data"
    folder.mkdir(parents=True, exist_ok=True)
    raw = idx_bytes(2051, images)
    if gz:
        (folder / (MNIST_IMAGES + ".gz")).write_bytes(gzip.compress(raw))
    else:
        (folder / MNIST_IMAGES).write_bytes(raw)
    return Path(root)


class Python2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle wrote CIFAR-10 (protocol 2, byte strings as str), so the
    fixtures hold what the real batches hold: no _codecs calls, which the trainer refuses."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_str_as_python2(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_str_as_python2


def python2_pickle(obj):
    f = io.BytesIO()
    Python2Pickler(f, protocol=2).dump(obj)
    return f.getvalue()


def cifar_batch_bytes(rows, labels=None):
    labels = list(labels if labels is not None else [0] * len(rows))
    return python2_pickle({b"batch_label": b"training batch", b"labels": labels, b"data": rows,
                           b"filenames": [b"x.png"] * len(rows)})


def make_cifar_dir(root, per_batch=40, seed=0, row_bytes=3072):
    """root/cifar-10-batches-py/data_batch_1..5, each per_batch uint8 rows of row_bytes."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(1, 6):
        rows = rng.integers(0, 256, (per_batch, row_bytes), dtype=np.uint8)
        (folder / f"data_batch_{k}").write_bytes(cifar_batch_bytes(rows))
    return Path(root)


# ------------------------------------------------------------------ shared command-line runs
#
# Each run of the program spends seconds importing torch before it does anything, and this
# machine has two cores shared with other work. The independent runs that several tests look at
# are therefore started together, once, right after collection (only when a selected test uses
# them), and each test waits for the one it needs.

UNIFORM_ARGS = ("-d", "uniform", "--batch_size", 16, "--iters", 101, "--seed", 1, "--use_gpu", 0, "--quiet")
MNIST_ARGS = ("-d", "mnist", "--batch_size", 16, "--iters", 3, "--seed", 5, "--use_gpu", 0, "--quiet")


class CliPool:
    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="gan_trainer_tests_"))
        self.procs, self.results = {}, {}
        self.mnist_data = make_mnist_dir(self.root / "mnist_data")

    def out(self, name):
        return self.root / "out" / name

    def start(self, name, *args, torchrun=False):
        self.procs[name] = popen_torchrun(*args) if torchrun else popen_cli(*args)

    def result(self, name, timeout=300):
        if name not in self.results:
            proc = self.procs[name]
            out, err = proc.communicate(timeout=timeout)
            self.results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        return self.results[name]

    @classmethod
    def launch(cls):
        pool = cls()
        pool.start("uniform", *UNIFORM_ARGS, "--passes", 2, "--out_dir", pool.out("uniform"))
        pool.start("uniform_1pass", *UNIFORM_ARGS, "--passes", 1, "--out_dir", pool.out("uniform_1pass"))
        pool.start("mnist", *MNIST_ARGS, "--passes", 2, "--data_dir", pool.mnist_data, "--out_dir", pool.out("mnist"))
        # the same runs on two processes, as torchrun starts them (tests/test_distributed.py)
        pool.start("uniform_ddp", *UNIFORM_ARGS, "--passes", 1, "--out_dir", pool.out("uniform_ddp"), torchrun=True)
        pool.start("mnist_ddp", *MNIST_ARGS, "--passes", 2, "--data_dir", pool.mnist_data,
                   "--out_dir", pool.out("mnist_ddp"), torchrun=True)
        # a failure under torchrun: rank 0 cannot write, rank 1 (which writes nothing) waits for it
        pool.start("ddp_unwritable", "-d", "uniform", "--use_gpu", 0, "--out_dir", "/proc/gan_trainer_tests",
                   torchrun=True)
        return pool

    def close(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
        shutil.rmtree(self.root, ignore_errors=True)


_POOL = None


@pytest.hookimpl(trylast=True)  # after -k / -m deselection
def pytest_collection_modifyitems(session, config, items):
    global _POOL
    if _POOL is None and any("cli" in getattr(item, "fixturenames", ()) for item in items):
        _POOL = CliPool.launch()


def pytest_sessionfinish(session, exitstatus):
    if _POOL is not None:
        _POOL.close()


@pytest.fixture(scope="session")
def cli():
    """The shared runs (see CliPool.launch); `cli.result(name)` waits for one."""
    global _POOL
    if _POOL is None:
        _POOL = CliPool.launch()
    return _POOL


class Run:
    def __init__(self, out_dir, proc, data_dir=None):
        self.out, self.proc, self.data_dir = Path(out_dir), proc, data_dir

    def params(self, source):
        return self.out / f"{source}_params"

    def samples(self, source):
        return self.out / f"{source}_samples"


@pytest.fixture(scope="session")
def uniform_run(cli):
    """uniform, 2 passes x 101 iterations, batch 16, seed 1 (shared: read only)."""
    return Run(cli.out("uniform"), cli.result("uniform"))


@pytest.fixture(scope="session")
def mnist_run(cli):
    """mnist on 200 random images, 2 passes x 3 iterations, batch 16, seed 5 (shared: read only)."""
    return Run(cli.out("mnist"), cli.result("mnist"), cli.mnist_data)


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def read_metrics(path):
    import json
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
