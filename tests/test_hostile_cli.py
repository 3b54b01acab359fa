"""What a hostile pass over the command line found: each case ends in one clear line (or the
right data), never a traceback, and a failed start leaves nothing behind."""
import gzip
import json
import os
import re
import shutil
import struct
import subprocess
import types

import pytest
import torch

import gan_trainer
from conftest import CLI_ENV, MNIST_IMAGES, assert_one_line_error, cli_args, eager, run_main, within
from gan_trainer import UserError

BEYOND_INT64 = "1" + "0" * 20


@pytest.fixture(scope="module")
def uniform_3_passes(tmp_path_factory):
    """A uniform run of 3 passes of one iteration (shared: read only)."""
    out = tmp_path_factory.mktemp("uniform_3_passes")
    assert gan_trainer.main(eager(["-d", "uniform", "--use_gpu", 0, "--passes", 3, "--iters", 1, "--batch_size", 16,
                                   "--seed", 1, "--quiet", "--out_dir", out])) == 0
    return out


# ------------------------------------------------------------------ integers beyond their flag's range

TRAINING = ["-d", "mnist", "--use_gpu", 0, "--quiet"]


@pytest.mark.parametrize("flag, argv", [
    ("--image_size", ["-d", "folder"]),
    ("--generate", ["-d", "uniform"]),
    ("--samples", ["-d", "uniform", "--evaluate"]),
    *[(flag, TRAINING) for flag in ("--batch_size", "--hidden_dim", "--threads", "--iters", "--passes", "--keep",
                                    "--eval_every", "--gpu_id")],
])
def test_an_integer_beyond_its_flags_range_is_refused_in_one_line(tmp_path, capsys, flag, argv):
    code, out, err = run_main([*argv, "--data_dir", tmp_path / "no_data", "--out_dir", tmp_path / "out",
                               flag, BEYOND_INT64], capsys)
    assert code == 2
    line = assert_one_line_error(code, err, f"argument {flag}: must be an integer from", BEYOND_INT64)
    assert not (tmp_path / "out").exists()
    # the largest value the line names is taken
    highest = re.search(r"from \d+ to (\d+)", line).group(1)
    assert getattr(gan_trainer.build_parser().parse_args([*map(str, argv), flag, highest]),
                   flag[2:]) == int(highest)


# ------------------------------------------------------------------ --label: a name, else an index

CLASSES = ("0", "1", "10", "2")  # as sorted folder names come


def test_a_label_that_names_a_class_and_indexes_another_takes_the_name_and_says_so(capsys):
    assert gan_trainer.class_index("2", CLASSES) == 3
    assert capsys.readouterr().out == "--label 2: the class named '2' (index 3), not the class at index 2 ('10')\n"
    # a name at its own index, a name with no class at its index, an index that is no name: nothing to say
    for label, index in (("1", 1), ("10", 2), ("3", 3)):
        assert gan_trainer.class_index(label, CLASSES) == index
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("label", ["²", "1" * 5000])  # str.isdigit() takes both, int() neither
def test_a_label_that_is_neither_a_name_nor_an_index_is_refused_in_one_line(label):
    with pytest.raises(UserError, match=r"not a class of this generator: 0-3 or 0, 1, 10, 2") as e:
        gan_trainer.class_index(label, CLASSES)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------ metrics.jsonl edited

GOOD = {"pass": 0, "iteration": 0, "step": 0, "d_pos_loss": 0.7, "d_neg_loss": 0.6, "d_loss": 0.65, "g_loss": 0.9,
        "trained": "dis", "strike": 1, "d_real": 0.5, "d_fake": 0.5, "d_share": 1.0, "seconds": 0.1}


def loss_line(**fields):
    return json.dumps({**GOOD, "iteration": 1, "step": 1, **fields})


@pytest.mark.parametrize("odd", [
    "[" * 100_000 + "]" * 100_000,
    '{"pass": 0, "iteration": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
    loss_line(g_loss="high"),
    loss_line(d_loss=None),
    loss_line(d_pos_loss=float("inf")),
    loss_line(d_neg_loss=float("nan")),
    loss_line(g_loss=1e308),
    loss_line(step=-1e308),
    loss_line(d_share=10 ** 400),
    loss_line(step="1"),
    json.dumps({"pass": 0, "iteration": 1, "step": 1, "eval": {"fid": 10 ** 400}}),
    json.dumps({"pass": 0, "iteration": 1, "step": 1, "eval": {"fid": 1.0}, "floor": {"fid": -10 ** 400}}),
    json.dumps({"pass": 0, "iteration": 1, "step": 10 ** 400, "eval": {"fid": 1.0}}),
    json.dumps({"pass": 0, "iteration": 1, "collapse": {"score": 1.0, "best": 10 ** 400}}),
], ids=["nested", "nested_field", "text", "null", "inf", "nan", "beyond_float32", "step_float", "huge_int",
        "step_text", "eval_huge_int", "floor_huge_int", "eval_step_huge_int", "collapse_huge_int"])
def test_metrics_lines_whose_losses_are_not_plottable_are_left_out(tmp_path, odd):
    """Left out like other odd lines; what a run can write is kept (its extremes too: float32
    losses, a share, a step count), and drawn."""
    most = torch.finfo(torch.float32).max
    extreme = {**GOOD, "iteration": 2, "step": 2 ** 63 - 1, "d_pos_loss": most, "d_neg_loss": 0.0, "d_loss": most,
               "g_loss": 0, "d_share": 0}
    evaluation = {"pass": 0, "iteration": 3, "step": 3, "seconds": 0.2, "eval": {"fid": 30.0}}
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join([json.dumps(GOOD), odd, json.dumps(extreme), json.dumps(evaluation)]) + "\n")
    said = []
    kept = gan_trainer.metrics_until(path, {"pass": 1, "iteration": 0, "quality": {"last_pass": -1}}, said.append)
    assert kept == [GOOD, extreme, evaluation]
    assert said == [f"{path}: 1 line that is not metrics left out"]
    gan_trainer.plot_losses(kept, tmp_path / "losses.png")
    assert (tmp_path / "losses.png").stat().st_size > 0


# ------------------------------------------------------------------ a FIFO in place of a file

@pytest.mark.parametrize("case", ["mnist", "cifar", "params", "newest", "metrics", "evaluate"])
def test_a_fifo_in_place_of_a_file_is_refused_not_waited_on(tmp_path, capsys, uniform_3_passes, case):
    run = shutil.copytree(uniform_3_passes, tmp_path / "run")
    params, data = run / "uniform_params", tmp_path / "data"
    fifo = {"mnist": data / "mnist_data" / MNIST_IMAGES, "cifar": data / "cifar-10-batches-py" / "data_batch_1",
            "params": tmp_path / "p.pt", "newest": params / "pass_5.pt", "metrics": params / "metrics.jsonl",
            "evaluate": tmp_path / "s.npy"}[case]
    fifo.parent.mkdir(parents=True, exist_ok=True)
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    generate = ["-d", "uniform", "--generate", 2, "--output", tmp_path / "g"]
    argv = {"mnist": ["-d", "mnist", "--data_dir", data, "--out_dir", tmp_path], "cifar": ["-d", "cifar", "--data_dir", data,
            "--out_dir", tmp_path], "params": [*generate, "--params", fifo], "newest": [*generate, "--out_dir", run],
            "metrics": ["-d", "uniform", "--resume", "--passes", 4, "--out_dir", run, "--compile", 0, "--quiet"],
            "evaluate": ["-d", "uniform", "--evaluate", fifo]}[case]
    with within(60):
        code, _, err = run_main([*argv, "--use_gpu", 0], capsys)
    assert_one_line_error(code, err, str(fifo), "not a regular file")


# ------------------------------------------------------------------ a gzip bomb for MNIST

@pytest.mark.parametrize("items, says", [
    (10, "header says 10 items (7840 bytes of data), file holds more"),
    (2 ** 32 - 1, "header says 4294967295 items, more than an MNIST file holds"),
])
def test_a_gzip_bomb_is_not_unpacked_beyond_what_its_header_says(tmp_path, capsys, monkeypatch, items, says):
    folder = tmp_path / "data" / "mnist_data"
    folder.mkdir(parents=True)
    header = struct.pack(">IIII", 2051, items, 28, 28)
    (folder / (MNIST_IMAGES + ".gz")).write_bytes(gzip.compress(header + bytes(16 * 2 ** 20), compresslevel=1))
    unpacked = []
    read = gzip.GzipFile.read

    def counted_read(self, size=-1):
        data = read(self, size)
        unpacked.append(len(data))
        return data
    monkeypatch.setattr(gzip.GzipFile, "read", counted_read)
    code, out, err = run_main(["-d", "mnist", "--use_gpu", 0, "--quiet", "--data_dir", tmp_path / "data",
                               "--out_dir", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, MNIST_IMAGES + ".gz", says)
    assert sum(unpacked) <= len(header) + 10 * 28 * 28 + 1


# ------------------------------------------------------------------ smaller items

def test_resuming_with_fewer_passes_than_the_run_has_says_how_many_it_has(uniform_3_passes, capsys):
    code, out, err = run_main(["-d", "uniform", "--use_gpu", 0, "--quiet", "--resume", "--passes", 1,
                               "--out_dir", uniform_3_passes], capsys)
    assert code == 0, err
    assert out == "nothing to do: the run already has 3 passes, more than --passes 1 (raise --passes to go on)\n"


@pytest.mark.parametrize("flag, value, says", [
    ("--d_batch_norm", 0, "--d_batch_norm 0 differs from the run's 1"),
    ("--g_sigmoid", 1, "--g_sigmoid 1 differs from the run's 0"),
    ("--augment", "color", "--augment color differs from the run's none"),
    ("--channels", 3, "--channels does not apply to this uniform run"),
    ("--image_size", 64, "--image_size does not apply to this uniform run"),
])
def test_a_resume_refuses_another_configuration_in_the_flags_own_spelling(uniform_3_passes, capsys, flag, value, says):
    code, out, err = run_main(["-d", "uniform", "--use_gpu", 0, "--quiet", "--resume", "--passes", 4, flag, value,
                               "--out_dir", uniform_3_passes], capsys)
    assert_one_line_error(code, err, says)


def test_an_allocation_that_fails_is_said_in_a_unit_that_shows_its_size():
    def said(n):
        return gan_trainer.out_of_memory(RuntimeError(f"[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: "
                                                      f"can't allocate memory: you tried to allocate {n} bytes."))
    assert [said(n) for n in (3 * 2 ** 30, 5 * 2 ** 20 + 2 ** 19, 800 * 2 ** 10, 512)] == [
        f"{size} could not be allocated" for size in ("3.0 GiB", "5.5 MiB", "800.0 KiB", "512 bytes")]


def test_matplotlib_says_nothing_when_its_config_folder_is_unusable(uniform_3_passes, tmp_path):
    proc = subprocess.run(cli_args("-d", "uniform", "--use_gpu", 0, "--generate", 4, "--output", tmp_path / "g",
                                   "--params", uniform_3_passes / "uniform_params" / "pass_2.pt"),
                          env=dict(CLI_ENV, MPLCONFIGDIR="/proc/gan_trainer_tests/matplotlib"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert (tmp_path / "g.png").exists()


def test_a_failed_start_removes_the_folders_it_made_and_only_those(tmp_path, capsys):
    missing_data = ["-d", "mnist", "--use_gpu", 0, "--quiet", "--data_dir", tmp_path / "no_data"]
    code, out, err = run_main([*missing_data, "--out_dir", tmp_path / "new" / "out"], capsys)
    assert_one_line_error(code, err, "get_mnist_data.sh")
    assert list(tmp_path.iterdir()) == []  # not even the --out_dir it made
    mine = tmp_path / "mine"
    (mine / "mnist_samples").mkdir(parents=True)
    code, out, err = run_main([*missing_data, "--out_dir", mine], capsys)
    assert_one_line_error(code, err, "get_mnist_data.sh")
    assert [p.name for p in mine.iterdir()] == ["mnist_samples"]  # the user's empty folder stays
    # a folder that cannot be made: the one made before it goes
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "mnist_params").write_text("a file where the folder should be")
    code, out, err = run_main([*missing_data, "--out_dir", blocked], capsys)
    assert_one_line_error(code, err, "cannot write outputs under")
    assert [p.name for p in blocked.iterdir()] == ["mnist_params"]
    # a run that wrote something before it failed keeps it: --lr 1e38 makes the second iteration's
    # loss non-finite, after the first one's metrics line
    code, out, err = run_main(["-d", "uniform", "--use_gpu", 0, "--quiet", "--lr", "1e38", "--passes", 1,
                               "--iters", 50, "--batch_size", 16, "--seed", 1, "--out_dir", tmp_path / "wrote"], capsys)
    assert_one_line_error(code, err, "non-finite loss", "no checkpoint was written yet")
    assert (tmp_path / "wrote" / "uniform_params" / "metrics.jsonl").read_text().count("\n") == 1


@pytest.mark.parametrize("flags, kind, speedup", [
    ("fpu avx512f avx512_bf16 amx_bf16 amx_tile amx_int8", "amx_bf16", "with AMX: --bf16 1 trains the image nets "
                                                                        "about 2.2x faster"),
    ("fpu avx512f avx512_bf16 avx512_vnni", "avx512_bf16", "with AVX512-BF16 (no AMX): --bf16 1 trains the image "
                                                           "nets about 1.4x faster"),
    ("fpu avx2 avx512f", None, None),
])
def test_the_bf16_hint_gives_the_speed_up_of_this_kind_of_cpu(tmp_path, monkeypatch, flags, kind, speedup):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    assert gan_trainer.cpu_computes_bf16(cpuinfo) == kind
    monkeypatch.setattr(gan_trainer, "cpu_computes_bf16", lambda: kind)
    run = types.SimpleNamespace(speed=types.SimpleNamespace(device="cpu", bf16=False),
                                cfg=types.SimpleNamespace(is_image=True))
    hint = gan_trainer.bf16_hint(run)
    assert hint is None if speedup is None else f"note: this CPU computes bf16 natively {speedup}" in hint
