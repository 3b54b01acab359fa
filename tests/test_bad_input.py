"""Bad input: each is refused with a non-zero exit and exactly one line on stderr, no traceback."""
import shutil
import time
import warnings

import numpy as np
import pytest

from conftest import (MNIST_IMAGES, assert_one_line_error, cifar_batch_bytes, idx_bytes, make_cifar_dir,
                      make_mnist_dir, mnist_images, run_cli, run_main)


def train_argv(source, data_dir, out_dir, *extra):
    return ["-d", source, "--use_gpu", 0, "--batch_size", 16, "--iters", 1, "--passes", 1, "--quiet",
            "--data_dir", data_dir, "--out_dir", out_dir, *extra]


# ------------------------------------------------------------------ as a user runs it (subprocess)

def test_missing_mnist_names_the_download_script(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, out, err = run_main(["-d", "mnist", "--use_gpu", 0, "--data_dir", tmp_path / "empty",
                               "--out_dir", tmp_path / "out"], capsys)
    assert code == 1
    assert_one_line_error(code, err, "data/get_mnist_data.sh", "train-images-idx3-ubyte")


def test_non_finite_loss_stops_with_one_line(tmp_path, capsys):
    # --lr 1e38 blows the weights up at the first update: the loss turns non-finite at once.
    # Warnings are recorded, not printed, under pytest: each would be lines on a user's stderr.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = run_main(["-d", "uniform", "--lr", "1e38", "--passes", 1, "--iters", 50, "--batch_size", 16,
                                   "--seed", 1, "--use_gpu", 0, "--quiet", "--out_dir", tmp_path], capsys)
    assert code == 1
    line = assert_one_line_error(code, err, "non-finite loss at pass 0 iteration")
    assert "no checkpoint was written yet" in line
    assert [f"{w.filename}:{w.lineno}: {w.message}" for w in caught] == []


# ------------------------------------------------------------------ command line (in process)

def test_unknown_data_source(tmp_path, capsys):
    code, out, err = run_main(["-d", "svhn", "--use_gpu", 0, "--out_dir", tmp_path], capsys)
    assert code == 2
    assert_one_line_error(code, err, "svhn", "-d/--data_source")
    assert not (tmp_path / "svhn_params").exists()


def test_use_gpu_2(tmp_path, capsys):
    code, out, err = run_main(["-d", "uniform", "--use_gpu", 2, "--out_dir", tmp_path], capsys)
    assert code == 2
    assert_one_line_error(code, err, "--use_gpu")


@pytest.mark.parametrize("passes", ["0", "-1"])
def test_passes_must_be_positive(tmp_path, capsys, passes):
    code, out, err = run_main(["-d", "uniform", "--use_gpu", 0, "--passes", passes, "--out_dir", tmp_path], capsys)
    assert code == 2
    assert_one_line_error(code, err, "--passes", passes)
    assert not (tmp_path / "uniform_params").exists()


def test_unwritable_out_dir(tmp_path, capsys):
    (tmp_path / "afile").write_text("a regular file, so nothing can be created below it")
    code, out, err = run_main(["-d", "uniform", "--use_gpu", 0, "--iters", 1, "--passes", 1, "--quiet",
                               "--out_dir", tmp_path / "afile" / "out"], capsys)
    assert_one_line_error(code, err, "cannot write outputs under", "afile")


# ------------------------------------------------------------------ data files (in process)

def test_missing_cifar_names_the_download_script(tmp_path, capsys):
    code, out, err = run_main(train_argv("cifar", tmp_path / "nothing", tmp_path / "out"), capsys)
    assert_one_line_error(code, err, "data/download_cifar.sh", "data_batch_1")


def test_truncated_idx(tmp_path, capsys):
    data = make_mnist_dir(tmp_path / "data", n=200)
    f = data / "mnist_data" / MNIST_IMAGES
    f.write_bytes(f.read_bytes()[:16 + 100 * 784 + 17])  # header says 200 images
    code, out, err = run_main(train_argv("mnist", data, tmp_path / "out"), capsys)
    assert_one_line_error(code, err, "truncated", MNIST_IMAGES)


def test_idx_shorter_than_its_header(tmp_path, capsys):
    data = make_mnist_dir(tmp_path / "data", n=200)
    (data / "mnist_data" / MNIST_IMAGES).write_bytes(idx_bytes(2051, mnist_images(1))[:10])
    code, out, err = run_main(train_argv("mnist", data, tmp_path / "out"), capsys)
    assert_one_line_error(code, err, "truncated")


def test_truncated_gzip(tmp_path, capsys):
    data = make_mnist_dir(tmp_path / "data", n=200, gz=True)
    f = data / "mnist_data" / (MNIST_IMAGES + ".gz")
    f.write_bytes(f.read_bytes()[:5000])
    code, out, err = run_main(train_argv("mnist", data, tmp_path / "out"), capsys)
    assert_one_line_error(code, err, MNIST_IMAGES + ".gz")


def test_wrong_idx_magic_number(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "mnist_data").mkdir(parents=True)
    # a labels-style magic number (2049) on an images file
    (data / "mnist_data" / MNIST_IMAGES).write_bytes(idx_bytes(2049, mnist_images(200)))
    code, out, err = run_main(train_argv("mnist", data, tmp_path / "out"), capsys)
    assert_one_line_error(code, err, "magic number 2049", "2051")


def test_fewer_images_than_a_batch(tmp_path, capsys):
    data = make_mnist_dir(tmp_path / "data", n=10)
    code, out, err = run_main(train_argv("mnist", data, tmp_path / "out"), capsys)
    assert_one_line_error(code, err, "10 images")


def test_cifar_batch_of_the_wrong_row_size(tmp_path, capsys):
    data = make_cifar_dir(tmp_path / "data", per_batch=40, row_bytes=3000)
    code, out, err = run_main(train_argv("cifar", data, tmp_path / "out"), capsys)
    assert_one_line_error(code, err, "data_batch_1", "3072")


def test_cifar_batch_that_is_not_a_pickle(tmp_path, capsys):
    data = make_cifar_dir(tmp_path / "data", per_batch=40)
    (data / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"<html>404 Not Found</html>")
    code, out, err = run_main(train_argv("cifar", data, tmp_path / "out"), capsys)
    assert_one_line_error(code, err, "data_batch_3")


def test_cifar_batch_of_the_wrong_dtype(tmp_path, capsys):
    data = make_cifar_dir(tmp_path / "data", per_batch=40)
    rows = np.zeros((40, 3072), np.int64)
    (data / "cifar-10-batches-py" / "data_batch_2").write_bytes(cifar_batch_bytes(rows))
    code, out, err = run_main(train_argv("cifar", data, tmp_path / "out"), capsys)
    assert_one_line_error(code, err, "data_batch_2", "uint8")


@pytest.mark.parametrize("flag, value", [("--seed", "-1"), ("--seed", str(2 ** 32)), ("--batch_size", "1"),
                                         ("--samples", "1"), ("--keep", "-1"), ("--generate", "0")])
def test_out_of_range_numbers_are_refused(tmp_path, capsys, flag, value):
    code, out, err = run_main(["-d", "uniform", "--use_gpu", 0, flag, value, "--out_dir", tmp_path], capsys)
    assert code == 2
    assert_one_line_error(code, err, flag, value)


def test_a_new_run_does_not_overwrite_an_existing_one(tmp_path, capsys):
    argv = ["-d", "uniform", "--use_gpu", 0, "--iters", 5, "--passes", 1, "--batch_size", 16, "--quiet",
            "--seed", 1, "--out_dir", tmp_path]
    assert run_main(argv, capsys)[0] == 0
    before = (tmp_path / "uniform_params" / "pass_0.pt").read_bytes()
    code, out, err = run_main(argv, capsys)
    assert_one_line_error(code, err, "already holds checkpoints", "--resume")
    assert (tmp_path / "uniform_params" / "pass_0.pt").read_bytes() == before


def test_resuming_an_older_checkpoint_does_not_destroy_newer_ones(tmp_path, capsys):
    argv = ["-d", "uniform", "--use_gpu", 0, "--iters", 5, "--batch_size", 16, "--quiet", "--seed", 1,
            "--keep", 0, "--out_dir", tmp_path]
    assert run_main([*argv, "--passes", 3], capsys)[0] == 0
    params = tmp_path / "uniform_params"
    code, out, err = run_main([*argv, "--resume", params / "pass_0.pt", "--passes", 2], capsys)
    assert_one_line_error(code, err, "pass_2.pt is newer than", "pass_0.pt")
    assert sorted(p.name for p in params.glob("pass_*.pt")) == ["pass_0.pt", "pass_1.pt", "pass_2.pt"]


def test_an_incomplete_checkpoint_is_refused(tmp_path, capsys):
    import torch
    params = tmp_path / "uniform_params"
    params.mkdir()
    torch.save({"generator": {}, "config": {"data_source": "uniform"}}, params / "pass_0.pt")
    for extra in (["--generate", 4], ["--resume"]):
        code, out, err = run_main(["-d", "uniform", "--use_gpu", 0, "--out_dir", tmp_path, *extra], capsys)
        assert_one_line_error(code, err, "pass_0.pt", "not a checkpoint of this trainer")


class _RaisesWithoutMessage:
    """Unpickled, it calls next() on an empty iterator: StopIteration, whose message is empty."""

    def __reduce__(self):
        return next, (iter([]),)


def test_a_pickle_that_would_call_a_function_is_refused_in_one_line(tmp_path, capsys):
    """Unpickled, it would call next() (StopIteration, whose message is empty): weights_only
    refuses it without calling anything, and the torch warning about its protocol is not shown."""
    import pickle
    params = tmp_path / "uniform_params"
    params.mkdir()
    (params / "pass_0.pt").write_bytes(pickle.dumps(_RaisesWithoutMessage(), protocol=4))
    code, out, err = run_main(["-d", "uniform", "--use_gpu", 0, "--out_dir", tmp_path, "--generate", 4], capsys)
    assert_one_line_error(code, err, "pass_0.pt", "refused", "could run code")


def test_a_gzip_damaged_inside_its_stream_is_refused(tmp_path, capsys):
    """Not cut short (that is EOFError) but corrupt: zlib's own errors are one line too."""
    data = make_mnist_dir(tmp_path / "data", n=200, gz=True)
    f = data / "mnist_data" / (MNIST_IMAGES + ".gz")
    raw = bytearray(f.read_bytes())
    raw[30:4000] = bytes(len(raw[30:4000]))  # zeros inside the deflate stream, length unchanged
    f.write_bytes(bytes(raw))
    code, out, err = run_main(train_argv("mnist", data, tmp_path / "out"), capsys)
    assert_one_line_error(code, err, MNIST_IMAGES + ".gz", "get_mnist_data.sh")


def test_odd_metrics_lines_are_left_out_on_resume(tmp_path, capsys):
    argv = ["-d", "uniform", "--use_gpu", 0, "--batch_size", 16, "--iters", 101, "--seed", 1, "--quiet",
            "--out_dir", tmp_path]
    assert run_main([*argv, "--passes", 1], capsys)[0] == 0
    metrics = tmp_path / "uniform_params" / "metrics.jsonl"
    good = metrics.read_text()
    with open(metrics, "ab") as f:
        f.write(b'[1, 2]\n{"pass": "x", "iteration": 1}\n"text"\n{"iteration": 3}\n\xff\xfe garbage\n{"pass": 0\n')
    code, out, err = run_main([*argv, "--resume", "--passes", 2], capsys)
    assert code == 0, err
    assert "6 lines that are not metrics left out" in out
    lines = metrics.read_text().splitlines()
    assert "\n".join(lines[:2]) + "\n" == good and [m.count('"pass": 1') for m in lines[2:]] == [1, 1]


@pytest.mark.parametrize("output", ["/", ".", "..", "some_folder"])
def test_generate_output_that_is_a_folder_is_refused(uniform_run, tmp_path, capsys, monkeypatch, output):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "some_folder").mkdir()
    code, out, err = run_main(["-d", "uniform", "--use_gpu", 0, "--generate", 4, "--output", output,
                               "--params", uniform_run.params("uniform") / "pass_1.pt"], capsys)
    assert_one_line_error(code, err, f"--output {output} is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["some_folder"]


def test_generate_does_not_overwrite_a_training_runs_picture(uniform_run, tmp_path, capsys):
    samples = tmp_path / "uniform_samples"
    shutil.copytree(uniform_run.out / "uniform_samples", samples)
    before = (samples / "train_pass0.png").read_bytes()
    code, out, err = run_main(["-d", "uniform", "--use_gpu", 0, "--generate", 4, "--output", samples / "train_pass0",
                               "--params", uniform_run.params("uniform") / "pass_1.pt"], capsys)
    assert_one_line_error(code, err, "train_pass0.png is a training run's picture")
    assert (samples / "train_pass0.png").read_bytes() == before and not (samples / "train_pass0.npy").exists()


def overcommits_everything():
    try:
        return open("/proc/sys/vm/overcommit_memory").read().strip() == "1"
    except OSError:
        return False


@pytest.mark.skipif(overcommits_everything(), reason="this kernel grants any allocation, then kills on use")
@pytest.mark.parametrize("argv", [
    ["--hidden_dim", 100000, "--passes", 1, "--iters", 1],  # one 10^10-weight layer: 40 GB
    ["--generate", 1_000_000_000],                           # 400 GB of noise
], ids=["hidden_dim", "generate"])
def test_an_allocation_that_fails_ends_in_one_line(uniform_run, tmp_path, argv):
    extra = ["--params", uniform_run.params("uniform") / "pass_1.pt"] if "--generate" in argv else ["--out_dir", tmp_path]
    proc = run_cli("-d", "uniform", "--use_gpu", 0, *argv, *extra)
    assert_one_line_error(proc.returncode, proc.stderr, "out of memory", "GiB")


def test_evaluate_checks_the_test_files_before_training_its_classifier(mnist_run, tmp_path, capsys):
    data = make_mnist_dir(tmp_path / "data", n=200)  # training images only: no labels, no test files
    started = time.time()
    code, out, err = run_main(["-d", "mnist", "--use_gpu", 0, "--evaluate", "--data_dir", data,
                               "--params", mnist_run.params("mnist") / "pass_1.pt"], capsys)
    assert_one_line_error(code, err, "t10k-images-idx3-ubyte", "get_mnist_data.sh")
    assert "classifier" not in out and time.time() - started < 30


@pytest.mark.parametrize("argv, says", [
    (["--generate", 4, "--evaluate"], "two actions"),
    (["--generate", 4, "--resume"], "--resume does not apply to --generate"),
    (["--generate", 4, "--passes", 3], "--passes does not apply to --generate"),
    (["--evaluate", "--bf16", 1], "--bf16 does not apply to --evaluate"),
    (["--evaluate", "--output", "x"], "--output applies to --generate only"),
    (["--generate", 4, "--data_dir", "data"], "--data_dir does not apply to --generate"),
    (["--params", "x.pt"], "--params names the checkpoint for --generate / --evaluate"),
    (["--passes", 1, "--output", "x"], "--output applies to --generate only"),
    (["--passes", 1, "--samples", 100], "--samples applies to --evaluate and to training with --eval_every"),
])
def test_flags_that_do_not_apply_to_the_action_are_refused(tmp_path, capsys, argv, says):
    code, out, err = run_main(["-d", "uniform", "--use_gpu", 0, "--out_dir", tmp_path, *argv], capsys)
    assert_one_line_error(code, err, says)
    assert list(tmp_path.iterdir()) == []


def test_resume_refuses_flags_that_would_change_the_run(uniform_run, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(uniform_run.out, out)
    for flag, value, says in (("--lr", 0.1, "--lr 0.1 differs from the run's 0.0001"),
                              ("--batch_size", 32, "--batch_size 32 differs from the run's 16"),
                              ("--seed", 9, "--seed 9 differs from the run's 1"),
                              ("--g_sigmoid", 1, "--g_sigmoid 1 differs from the run's 0")):
        code, _, err = run_main(["-d", "uniform", "--use_gpu", 0, "--out_dir", out, "--resume", "--passes", 3,
                                 flag, value], capsys)
        assert_one_line_error(code, err, says, "keeps its")
    # the run's own values, given again, are fine
    code, _, err = run_main(["-d", "uniform", "--use_gpu", 0, "--out_dir", out, "--resume", "--passes", 3,
                             "--batch_size", 16, "--iters", 101, "--seed", 1, "--quiet"], capsys)
    assert code == 0, err
