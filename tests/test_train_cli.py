"""Training from the command line: exit status, the tutorial's log lines, files written."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import gan_trainer
from conftest import (CLI_ENV, MNIST_IMAGES, REPO, idx_bytes, load_ckpt, make_cifar_dir, make_mnist_dir,
                      mnist_images, python2_pickle, run_main)

D_POS_LINE = re.compile(r"^d_pos_loss is [0-9.e+-]+     d_neg_loss is [0-9.e+-]+$")
D_LOSS_LINE = re.compile(r"^d_loss is [0-9.e+-]+    g_loss is [0-9.e+-]+$")
SUMMARY_LINE = re.compile(r"^Batch=100 samples=1600 AvgCost=\S+ CurrentCost=\S+ "
                          r"Eval: (generator|discriminator)_training_error=\S+  CurrentEval: ")
METRIC_KEYS = {"pass", "iteration", "d_pos_loss", "d_neg_loss", "d_loss", "g_loss", "trained", "strike",
               "d_real", "d_fake", "seconds"}


# ------------------------------------------------------------------ uniform

def test_uniform_run_exits_0(uniform_run):
    assert uniform_run.proc.returncode == 0, uniform_run.proc.stderr
    assert uniform_run.proc.stderr == ""  # nothing for the user to worry about
    assert uniform_run.proc.stdout.splitlines()[0].startswith("training uniform on cpu: 2 passes of 101 iterations")


def test_uniform_run_prints_the_tutorial_loss_lines(uniform_run):
    lines = uniform_run.proc.stdout.splitlines()
    pos = [line for line in lines if D_POS_LINE.match(line)]
    loss = [line for line in lines if D_LOSS_LINE.match(line)]
    # i % 100 == 0 with 101 iterations per pass: iterations 0 and 100 of each of 2 passes
    assert len(pos) == len(loss) == 4, uniform_run.proc.stdout
    # the two lines come as a pair, d_pos first
    for k, line in enumerate(lines):
        if D_POS_LINE.match(line):
            assert D_LOSS_LINE.match(lines[k + 1])
    # d_loss is the mean of the two losses printed above it
    for p, l in zip(pos, loss):
        d_pos, d_neg = float(p.split()[2]), float(p.split()[5])
        assert float(l.split()[2]) == pytest.approx((d_pos + d_neg) / 2, rel=1e-5)


def test_uniform_run_prints_trainer_summaries(uniform_run):
    summaries = [line for line in uniform_run.proc.stdout.splitlines() if line.startswith("Batch=")]
    assert summaries, uniform_run.proc.stdout
    assert all(SUMMARY_LINE.match(line) for line in summaries), summaries


def test_uniform_run_writes_pictures_and_plots(uniform_run):
    samples = uniform_run.samples("uniform")
    for name in ("train_pass0.png", "train_pass1.png", "losses.png"):
        with Image.open(samples / name) as im:
            assert im.format == "PNG"
    with Image.open(samples / "progress.gif") as gif:
        assert gif.format == "GIF"
        assert gif.n_frames == 2  # one frame per pass
    assert not (samples / "train_pass2.png").exists()


def test_uniform_run_writes_checkpoints(uniform_run):
    params = uniform_run.params("uniform")
    assert sorted(p.name for p in params.glob("*.pt")) == ["pass_0.pt", "pass_1.pt"]
    ckpt = load_ckpt(params / "pass_1.pt")
    assert {"generator", "discriminator", "opt_g", "opt_d", "rng", "pass", "iteration", "schedule",
            "fixed_noise", "config"} <= ckpt.keys()
    assert ckpt["pass"] == 1 and ckpt["iteration"] == 101
    assert ckpt["config"]["data_source"] == "uniform" and ckpt["config"]["batch_size"] == 16
    assert ckpt["schedule"]["net"] in ("dis", "gen") and 1 <= ckpt["schedule"]["strike"] <= 5
    gen, dis = gan_trainer.build_nets(gan_trainer.check_config(ckpt["config"]))
    gen.load_state_dict(ckpt["generator"])
    dis.load_state_dict(ckpt["discriminator"])
    assert ckpt["fixed_noise"].shape[1] == 10
    # the weights moved during training
    assert not torch.equal(ckpt["generator"]["0.weight"], load_ckpt(params / "pass_0.pt")["generator"]["0.weight"])


def test_uniform_run_writes_metrics_jsonl(uniform_run):
    text = (uniform_run.params("uniform") / "metrics.jsonl").read_text()
    records = [json.loads(line) for line in text.splitlines()]
    assert [(m["pass"], m["iteration"]) for m in records] == [(0, 0), (0, 100), (1, 0), (1, 100)]
    for m in records:
        assert METRIC_KEYS <= m.keys()
        assert m["trained"] in ("dis", "gen")
        assert 1 <= m["strike"] <= 5
        assert 0 <= m["d_real"] <= 1 and 0 <= m["d_fake"] <= 1
        assert m["d_loss"] == pytest.approx((m["d_pos_loss"] + m["d_neg_loss"]) / 2)
    # the logged values are the printed ones
    printed = [float(line.split()[2]) for line in uniform_run.proc.stdout.splitlines() if D_LOSS_LINE.match(line)]
    assert printed == pytest.approx([m["d_loss"] for m in records], rel=1e-9)


# ------------------------------------------------------------------ images

def test_mnist_run_exits_0_and_writes_outputs(mnist_run):
    assert mnist_run.proc.returncode == 0, mnist_run.proc.stderr
    assert mnist_run.proc.stderr == ""
    samples, params = mnist_run.samples("mnist"), mnist_run.params("mnist")
    for p in (0, 1):
        with Image.open(samples / f"train_pass{p}.png") as im:
            assert im.format == "PNG"
            assert im.width == 8 * 28  # 8 digits a row, no padding
            assert im.height % 28 == 0
    assert (params / "pass_1.pt").exists()
    assert sum(1 for line in mnist_run.proc.stdout.splitlines() if D_POS_LINE.match(line)) == 2


def test_mnist_sample_grid_is_8x8_224px(mnist_run):
    # The documented picture: the first 64 samples tiled 8 x 8, 224 x 224 pixels, also when
    # the batch (here 16) is smaller than 64.
    with Image.open(mnist_run.samples("mnist") / "train_pass0.png") as im:
        assert im.size == (224, 224)


def test_cifar_run_exits_0_and_writes_256px_grid(tmp_path, capsys):
    # batch 64: the grid holds 8 x 8 images of 32 x 32 pixels
    data = make_cifar_dir(tmp_path / "data", per_batch=40)
    code, out, err = run_main(["-d", "cifar", "--batch_size", 64, "--iters", 2, "--passes", 1, "--seed", 0,
                               "--use_gpu", 0, "--quiet", "--data_dir", data, "--out_dir", tmp_path / "out"], capsys)
    assert code == 0, err
    with Image.open(tmp_path / "out" / "cifar_samples" / "train_pass0.png") as im:
        assert im.format == "PNG"
        assert im.size == (256, 256)
        assert im.mode == "RGB"
    ckpt = load_ckpt(tmp_path / "out" / "cifar_params" / "pass_0.pt")
    assert tuple(ckpt["config"]["sample_shape"]) == (3, 32, 32)


def test_load_cifar_reads_channel_major_rows(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for k in range(1, 6):
        r = np.zeros((2, 3072), np.uint8)
        r[:, :1024], r[:, 1024:2048], r[:, 2048:] = 10 * k, 100, 200  # R, G, B planes
        (folder / f"data_batch_{k}").write_bytes(python2_pickle({b"data": r, b"labels": [k, 9]}))
    images, labels = gan_trainer.load_cifar(tmp_path)
    assert [list(batch) for batch in labels] == [[k, 9] for k in range(1, 6)]
    assert images.shape == (10, 3, 32, 32) and images.dtype == np.uint8
    assert (images[:, 1] == 100).all() and (images[:, 2] == 200).all()
    assert [int(images[2 * (k - 1), 0, 5, 5]) for k in range(1, 6)] == [10, 20, 30, 40, 50]


def test_mnist_loader_accepts_gz_beside(tmp_path):
    images = mnist_images(30, seed=3)
    make_mnist_dir(tmp_path / "raw", images=images)
    make_mnist_dir(tmp_path / "gz", images=images, gz=True)
    assert not (tmp_path / "gz" / "mnist_data" / MNIST_IMAGES).exists()
    raw = gan_trainer.load_mnist(tmp_path / "raw")
    gz = gan_trainer.load_mnist(tmp_path / "gz")
    assert raw.shape == gz.shape == (30, 1, 28, 28)
    assert np.array_equal(raw, gz) and np.array_equal(raw[:, 0], images)


def test_read_idx_values_and_shape(tmp_path):
    labels = np.arange(10, dtype=np.uint8)
    (tmp_path / "l").write_bytes(idx_bytes(2049, labels))
    assert np.array_equal(gan_trainer.read_idx(tmp_path / "l", 2049, ()), labels)


def test_real_batches_scale_images_to_unit_range():
    data = gan_trainer.TrainingSet(torch.tensor([[0], [255], [51]], dtype=torch.uint8).repeat(1, 4),
                                   torch.tensor([0, 2, 1]))
    x, y = next(gan_trainer.real_batches(data, 3, seed=0, pass_id=0))
    assert sorted(x[:, 0].tolist()) == pytest.approx([-1.0, -0.6, 1.0])  # x / 255 * 2 - 1
    assert [{-1.0: 0, 1.0: 2}.get(round(v, 1), 1) for v in x[:, 0].tolist()] == y.tolist()  # labels follow rows


@pytest.mark.parametrize("n", [1000, 40])  # repeats drawn again; a permutation per row (batch > n / 8)
def test_block_indices_are_distinct_uniform_rows(n):
    idx = gan_trainer.block_indices(n, 16, torch.Generator().manual_seed(0), rows=2000)
    assert idx.shape == (2000, 16) and idx.dtype == torch.int64
    assert 0 <= idx.min() and idx.max() < n
    assert all(len(set(row)) == 16 for row in idx.tolist())  # no repeats in a batch
    # every index as likely: the chi-square statistic of the counts is what chance gives
    # (1 - 16 / n per degree of freedom, drawing without replacement), within 5 sigma
    counts = torch.bincount(idx.flatten(), minlength=n).double()
    expected = idx.numel() / n
    chi2 = (((counts - expected) ** 2) / expected).sum().item() / (n - 1)
    assert abs(chi2 - (1 - 16 / n)) < 5 * (2 / (n - 1)) ** 0.5
    # each position is uniform too: rows are not handed out in sorted order
    assert abs(idx[:, 0].float().mean().item() - (n - 1) / 2) < 0.05 * n


@pytest.mark.parametrize("n, batch", [(60000, 1000), (1_000_000, 1024), (60000, 20000)])
def test_block_indices_with_large_batches(n, batch):
    """Batches with repeats in nearly every random draw (mnist's 60000 in batches of 1000;
    uniform's 1,000,000 in batches above 1000) and batches of a third of the data still come as
    distinct rows."""
    idx = gan_trainer.block_indices(n, batch, torch.Generator().manual_seed(0), rows=20)
    assert idx.shape == (20, batch) and all(len(set(row)) == batch for row in idx.tolist())
    assert 0 <= idx.min() and idx.max() < n


def test_real_batches_are_the_same_wherever_a_pass_resumes():
    """A pass resumed at iteration k (the same seed) sees the batches an unbroken pass saw from k on."""
    data = gan_trainer.TrainingSet(torch.arange(500).float()[:, None])
    whole = [b for (b, _), _ in zip(gan_trainer.real_batches(data, 8, seed=3, pass_id=2), range(1003))]
    for k in (1, 999, 1000, 1001):  # inside the first block, at and after the block boundary
        resumed = [b for (b, _), _ in zip(gan_trainer.real_batches(data, 8, seed=3, pass_id=2, start=k), range(2))]
        assert all(torch.equal(a, b) for a, b in zip(resumed, whole[k:k + 2]))
    other_pass = next(gan_trainer.real_batches(data, 8, seed=3, pass_id=3))[0]
    other_seed = next(gan_trainer.real_batches(data, 8, seed=4, pass_id=2))[0]
    assert not torch.equal(other_pass, whole[0]) and not torch.equal(other_seed, whole[0])


# ------------------------------------------------------------------ checkpoints kept

def test_keep_newest_checkpoints(tmp_path, capsys):
    code, out, err = run_main(["-d", "uniform", "--passes", 4, "--iters", 2, "--batch_size", 16, "--seed", 0,
                               "--use_gpu", 0, "--quiet", "--keep", 2, "--out_dir", tmp_path], capsys)
    assert code == 0, err
    params = tmp_path / "uniform_params"
    assert sorted(p.name for p in params.glob("*.pt")) == ["pass_2.pt", "pass_3.pt"]
    assert load_ckpt(params / "pass_3.pt")["pass"] == 3
    assert len(list((tmp_path / "uniform_samples").glob("train_pass*.png"))) == 4


def test_progress_gif_spreads_at_most_20_frames_over_many_passes(tmp_path):
    """A long run's progress.gif keeps 20 frames, the first and newest passes among them."""
    from PIL import Image
    for p in range(50):
        Image.new("RGB", (8, 8), (p * 5, 0, 0)).save(tmp_path / f"train_pass{p}.png")
    gan_trainer.write_progress_gif(tmp_path, 50, tmp_path / "progress.gif")
    with Image.open(tmp_path / "progress.gif") as gif:
        assert gif.n_frames == 20
        reds = []
        for i in range(gif.n_frames):
            gif.seek(i)
            reds.append(gif.convert("RGB").getpixel((0, 0))[0])
    assert reds[0] == 0 and reds[-1] == 49 * 5 and reds == sorted(reds)


def test_cuda_graphs_on_the_cpu_is_noted_and_training_runs_eagerly(tmp_path, capsys):
    code, out, err = run_main(["-d", "uniform", "--use_gpu", "0", "--cuda_graphs", "1", "--passes", "1",
                               "--iters", "3", "--seed", "1", "--out_dir", tmp_path, "--quiet"], capsys)
    assert code in (0, None), err
    assert "--cuda_graphs 1 needs a GPU: running eagerly" in out
    assert (tmp_path / "uniform_params" / "pass_0.pt").exists()


def test_every_flag_is_in_the_readme_flags_table():
    """The README's Flags table is the user's reference: no flag of --help is missing from it."""
    from pathlib import Path
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme[readme.index("## Flags"):readme.index("## Results")]
    parser = gan_trainer.build_parser()
    flags = [s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
    assert len(flags) > 20
    missing = [f for f in flags if not re.search(rf"`(-\w, )?{f}[` ]", table)]
    assert not missing, f"flags missing from README's Flags table: {missing}"


FAULTS = """
import ctypes, resource, torch, gan_trainer

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        held = [torch.ones(1 << 20) for _ in range(8)]  # 8 tensors of 4 MB alive at once, then freed
        del held
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

# glibc's initial mmap threshold, held fixed (by default it rises after the first frees, and then
# whether blocks churn depends on what else lies at the heap's top): every 4 MB block is mapped
# when made and unmapped when freed, the churn at its plainest
ctypes.CDLL(None).mallopt(-3, 128 << 10)
faults()
churning = faults()
took = gan_trainer.keep_freed_memory()
faults()  # the heap grows to its peak once
print(took, churning, faults())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc setting")
def test_freed_tensor_memory_is_kept_for_reuse():
    """Tensors of a few MB made and freed again and again, as an iteration does: while malloc
    hands such blocks back to the OS, their pages are faulted in again each time; after
    keep_freed_memory they are reused. A fresh process, as the setting cannot be undone."""
    out = subprocess.run([sys.executable, "-c", FAULTS], cwd=REPO, env=CLI_ENV, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    took, churning, kept = out.stdout.split()
    if took != "True":
        pytest.skip("not glibc")
    assert int(churning) > 10_000  # the control: 8 x 1024 pages per round, 10 rounds
    assert int(kept) < 500


@pytest.mark.parametrize("native, bf16, hinted", [(True, 0, True), (True, 1, False), (False, 0, False)])
def test_a_cpu_with_bf16_arithmetic_hears_of_bf16_once(tmp_path, capsys, monkeypatch, native, bf16, hinted):
    """Image nets in fp32 on a CPU with AVX512-BF16 or AMX: one line says --bf16 1 is faster with
    the same measured quality; the default stays fp32."""
    monkeypatch.setattr(gan_trainer, "cpu_computes_bf16", lambda: native and "avx512_bf16")
    data = make_mnist_dir(tmp_path / "data", n=40)
    code, out, err = run_main(["-d", "mnist", "--use_gpu", 0, "--passes", 1, "--iters", 1, "--batch_size", 8,
                               "--data_dir", data, "--out_dir", tmp_path / "out", "--quiet", "--bf16", bf16], capsys)
    assert code == 0, err
    hints = [line for line in out.splitlines() if "--bf16 1 trains" in line]
    assert len(hints) == int(hinted)
    assert load_ckpt(tmp_path / "out" / "mnist_params" / "pass_0.pt")["options"]["speed"]["bf16"] == bool(bf16)
