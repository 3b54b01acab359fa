"""Several processes started by torchrun (gloo on the CPU) train the single process's run.

Each test starts `python -m torch.distributed.run --standalone --nproc_per_node 2 gan_trainer.py`
with the arguments of one of the shared single-process runs (conftest), and compares: the
choices and counts exactly, the logged losses to float rounding, the final parameters to the
drift that Adam makes of round-off (it turns a gradient that is zero but for round-off, such as
a bias that feeds a batch norm, into a step of up to lr either way), and the files written.

Round-off cannot be compared away in float32: a gradient that is zero but for round-off gets an
Adam step of lr (float32 round-off is not small against Adam's eps), and the batch norm over
a few samples amplifies round-off. In float64 it can: test_the_distributed_step_is_the_single_step_in_float64
runs DistributedStep on two processes against train_step in one, to 1e-9.
"""
import dataclasses
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing

from conftest import CLI_ENV, REPO, TRAINER, UNIFORM_ARGS, assert_one_line_error, popen_torchrun, read_metrics, run_main


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
        # before any update only the sums' order differs; after updates, Adam's drift (above).
        # Bounds: about 10x the largest gaps measured under four kernel settings (tests/BENCHMARKS.md)
        rel = 1e-5 if m1["step"] == 0 else 2e-3
        for key in ("d_pos_loss", "d_neg_loss", "g_loss", "d_real", "d_fake"):
            assert m2[key] == pytest.approx(m1[key], rel=rel), (m1["pass"], m1["iteration"], key)
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


def test_two_processes_train_the_single_process_uniform_run(cli, tmp_path):
    """conftest's shared uniform run of one pass, and the same arguments on two processes."""
    assert cli.result("uniform_1pass").returncode == 0
    out, proc = cli.out("uniform_ddp"), cli.result("uniform_ddp")
    assert proc.returncode == 0, proc.stderr
    assert our_stderr(proc.stderr) == [] and "Traceback" not in proc.stderr
    assert [line for line in proc.stdout.splitlines() if line.startswith("training")] == \
           ["training uniform on cpu: 1 pass of 101 iterations, batch 16, lr 0.0001, seed 1"]  # rank 0's log alone
    assert "speed: 2 processes x cpu" in proc.stdout
    assert_same_run(cli.out("uniform_1pass"), out, "uniform", 1)

    # the checkpoint of the 2-process run resumes in one process, with a note (in a copy: the
    # shared run's folder is read-only for the tests)
    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    code_out = subprocess.run([sys.executable, str(TRAINER), "-d", "uniform", "--resume", "--passes", "2", "--use_gpu",
                               "0", "--quiet", "--compile", "0", "--out_dir", str(copy)], cwd=REPO, env=CLI_ENV,
                              capture_output=True, text=True, timeout=300)
    assert code_out.returncode == 0, code_out.stderr
    assert "processes 1 (the run: 2)" in code_out.stdout
    assert torch.load(copy / "uniform_params" / "pass_1.pt")["options"]["speed"]["processes"] == 1


def test_two_processes_train_the_single_process_mnist_run(mnist_run, cli):
    out, proc = cli.out("mnist_ddp"), cli.result("mnist_ddp")
    assert proc.returncode == 0, proc.stderr
    assert our_stderr(proc.stderr) == [] and "Traceback" not in proc.stderr
    assert_same_run(mnist_run.out, out, "mnist", 2)


def test_each_process_takes_its_rows_and_a_batch_must_divide():
    import gan_trainer
    shares = [gan_trainer.Processes(rank, 4).rows(128) for rank in range(4)]
    assert [(s.start, s.stop) for s in shares] == [(0, 32), (32, 64), (64, 96), (96, 128)]
    with pytest.raises(gan_trainer.UserError, match=r"the global batch of 15 \(--batch_size\) must divide evenly over the 2 processes"):
        gan_trainer.Processes(0, 2).rows(15)


def test_generate_refuses_to_run_under_torchrun(uniform_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run_main(["-d", "uniform", "--use_gpu", 0, "--generate", 4, "--out_dir", uniform_run.out], capsys)
    assert_one_line_error(code, err, "--generate runs in one process")


def test_a_failure_under_torchrun_is_said_in_one_line(cli):
    """Rank 0 cannot write; rank 1, waiting for it in a collective, loses it and waits before it
    would say so, and torchrun ends it meanwhile: one line, rank 0's, and no traceback of ours
    (torchrun adds its own report). A failure that both processes meet goes the same way."""
    proc = cli.result("ddp_unwritable")
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith(("gan_trainer.py", "[rank"))]
    assert len(ours) == 1 and ours[0].startswith("gan_trainer.py: error (rank 0 of 2): cannot write outputs under "
                                                 "/proc/gan_trainer_tests"), proc.stderr


def test_ctrl_c_stops_every_process_with_one_checkpoint(tmp_path):
    """Ctrl-C reaches torchrun and its processes together (one process group), and torchrun
    relays it to them once more: one stop, one line, one checkpoint, written by rank 0."""
    out = tmp_path / "out"
    proc = popen_torchrun(*UNIFORM_ARGS, "--passes", 1, "--iters", 100000, "--out_dir", out, own_session=True)
    try:
        while not proc.stdout.readline().startswith("d_pos_loss"):  # training is under way
            assert proc.poll() is None, proc.stderr.read()
        os.killpg(proc.pid, signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    ours = [line for line in our_stderr(stderr) if line.startswith(("SIGINT", "gan_trainer.py"))]
    assert len(ours) == 1 and "continue with --resume" in ours[0], stderr
    stopped_at = int(re.search(r"SIGINT: stopped at pass 0 iteration (\d+)", ours[0]).group(1))
    assert torch.load(out / "uniform_params" / "pass_0.pt")["iteration"] == stopped_at > 0
    assert sorted(p.name for p in (out / "uniform_params").iterdir()) == [".lock", "metrics.jsonl", "pass_0.pt"]


def test_a_second_signal_aborts_but_one_relayed_with_the_first_does_not():
    import gan_trainer
    stop = gan_trainer.StopRequest()
    stop.handle(signal.SIGINT, None)
    stop.handle(signal.SIGINT, None)  # torchrun relaying the same Ctrl-C
    assert stop.signal == signal.SIGINT
    stop.when -= 2 * stop.SAME_REQUEST_S
    with pytest.raises(gan_trainer.Interrupted):
        stop.handle(signal.SIGTERM, None)


def float64_ranks(rank, world, store, iters, results):
    """One of `world` processes (torch.multiprocessing.spawn): for uniform, mnist and mnist with
    both remedies (--ema 1, --augment), `iters` DistributedSteps of the nets in float64 on this
    rank's rows of each global batch; rank 0 also runs the single process's step on the whole
    batches, and saves both; every rank saves its averaged G."""
    import gan_trainer as gt
    from gan_conf import CONFIGS
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    procs = gt.Processes(rank, world, rank, True)  # one machine: local rank = rank

    def decode_folder():  # a folder's decoding: the machine's first process, then the others
        time.sleep(0.5 if rank == 0 else 0)
        with open(results / "order", "a") as f:
            f.write(f"{rank}\n")
    procs.first_on_each_machine(decode_folder)
    for source in ("uniform", "mnist", "mnist_remedies"):
        remedies = {"ema": True, "ema_kimg": 0.1, "augment": "color,translation,cutout"} if "remedies" in source else {}
        cfg = dataclasses.replace(CONFIGS[source.split("_")[0]], batch_size=16, gf_dim=16, df_dim=16,  # small: float64 is slow
                                  **remedies)

        def made_run(procs):
            torch.manual_seed(1)  # the same initial nets
            run = gt.Run(cfg, 1, gt.Speed(processes=procs.world), "cpu", procs)
            for net in (run.gen, run.dis, run.gen_ema):
                if net is not None:
                    net.double()
            return run
        runs = {"two": made_run(procs), **({"one": made_run(gt.Processes())} if rank == 0 else {})}
        steps = {name: gt.make_step(run) for name, run in runs.items()}
        rows, log = procs.rows(cfg.batch_size), {name: [] for name in runs}
        for i in range(iters):
            draw = torch.Generator().manual_seed(i)
            x = torch.rand(cfg.batch_size, *cfg.sample_shape, generator=draw, dtype=torch.float64) * 2 - 1
            z = torch.randn(cfg.batch_size, cfg.noise_dim, generator=draw, dtype=torch.float64)
            if cfg.augment:  # as run_passes augments: the same draws on every rank, for the whole batch
                torch.manual_seed(100 + i)
                x, z = gt.augmented_inputs(cfg.augment, x, z)
            for name, run in runs.items():
                step = steps[name](x[rows] if name == "two" else x, z[rows] if name == "two" else z, run.schedule)
                run.record(step)
                log[name].append((step.trained, step.d_pos_loss, step.d_neg_loss, step.g_loss))
        if rank == 0:
            torch.save({name: {"log": log[name], "generator": run.gen.state_dict(),
                               "discriminator": run.dis.state_dict()} for name, run in runs.items()},
                       results / f"{source}.pt")
        if cfg.ema:
            torch.save(runs["two"].gen_ema.state_dict(), results / f"{source}_ema_rank{rank}.pt")
            if rank == 0:
                torch.save(runs["one"].gen_ema.state_dict(), results / f"{source}_ema_one.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def float64_runs(tmp_path_factory):
    results = tmp_path_factory.mktemp("float64")
    torch.multiprocessing.start_processes(float64_ranks, (2, results / "store", 8, results), nprocs=2,
                                          start_method="fork")  # no second import of torch
    return results


@pytest.mark.parametrize("source", ["uniform", "mnist", "mnist_remedies"])
def test_the_distributed_step_is_the_single_step_in_float64(float64_runs, source):
    """The mathematics of two processes is the single process's: in float64, where round-off is
    small against Adam's eps, the choices agree exactly, losses to 1e-9 and parameters to 1e-8."""
    result = torch.load(float64_runs / f"{source}.pt")
    one, two = result["one"], result["two"]
    assert [entry[0] for entry in one["log"]] == [entry[0] for entry in two["log"]]
    assert {entry[0] for entry in one["log"]} == {"dis", "gen"}  # both nets' updates were compared
    for a, b in zip(one["log"], two["log"]):
        assert b[1:] == pytest.approx(a[1:], rel=1e-9)
    gaps = {net: parameter_gap(one, two, net) for net in ("generator", "discriminator")}
    print(f"{source} float64: relative parameter gaps {gaps}")
    assert max(gaps.values()) < 1e-8, gaps
    if source == "mnist_remedies":  # the averaged G: the same on both ranks, and the single process's
        ranks = [torch.load(float64_runs / f"{source}_ema_rank{r}.pt") for r in (0, 1)]
        one = torch.load(float64_runs / f"{source}_ema_one.pt")
        assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in one)
        gap = parameter_gap({"g": one}, {"g": ranks[0]}, "g")
        assert 0 < gap < 1e-8 or gap == 0, gap


def test_a_folder_is_decoded_by_the_first_process_then_read_by_the_others(float64_runs):
    assert (float64_runs / "order").read_text().split() == ["0", "1"]


def test_a_run_resumed_with_another_number_of_processes_takes_that_numbers_defaults():
    """A run's own speed options suit its number of processes: 2 processes of 1 thread, compile
    off, resumed in one process, get one process's defaults (and the reverse), not a slower run."""
    import gan_trainer as gt
    from gan_conf import CONFIGS
    args = gt.build_parser().parse_args(["-d", "uniform"])
    decide = functools.partial(gt.Speed.decide, args, CONFIGS["uniform"], torch.device("cpu"), log=lambda *lines: None)
    assert decide(gt.Speed(threads=7, compile=False, processes=2), processes=1) == gt.Speed(threads=1, compile=True)
    assert decide(gt.Speed(threads=7, compile=False), processes=1) == gt.Speed(threads=7, compile=False)  # its own
    args = gt.build_parser().parse_args(["-d", "mnist"])
    decide = functools.partial(gt.Speed.decide, args, CONFIGS["mnist"], torch.device("cpu"), log=lambda *lines: None)
    assert decide(gt.Speed(threads=7, channels_last=True), processes=2).threads == torch.get_num_threads()


def test_a_rank_other_than_0_says_its_failure_only_after_a_wait(monkeypatch, capsys):
    """If torchrun has not ended it by then (it ends every process once one has failed), a
    failure of rank 1 alone is still said: after the wait, in one line."""
    import gan_trainer
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(gan_trainer, "SAY_AFTER_S", 0.2)
    handlers = {s: signal.getsignal(s) for s in gan_trainer.STOP_SIGNALS}
    try:
        started = time.monotonic()
        gan_trainer.report_failure("gan_trainer.py: error (rank 1 of 2): no data on this machine")
        assert time.monotonic() - started >= 0.2
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    assert capsys.readouterr().err == "gan_trainer.py: error (rank 1 of 2): no data on this machine\n"
