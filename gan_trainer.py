"""Train the GAN of the PaddlePaddle tutorial (uniform, mnist or cifar), generate, evaluate.

    python gan_trainer.py -d mnist --use_gpu 1          # train (100 passes)
    python gan_trainer.py -d mnist --resume             # continue an interrupted run
    python gan_trainer.py -d mnist --generate 64        # apply the trained generator
    python gan_trainer.py -d mnist --evaluate           # score it

The file reads in the order a run happens, each part opened by a banner that says what it promises:
  1. the command line, which hands over to train();
  2. the loop (run_passes): batches in, one iteration each, a checkpoint per pass;
  3. the step and the choice rule: tutorial_step, the reference; Iteration, the logic written
     once; EagerStep, the way a CPU computes it for images;
  4. the run's state (Run, whose state_dict is the checkpoint) and its configuration;
  5. appendices: A. data sources and file formats, B. the run's files and the console,
     C. speed (CompiledStep, GraphedStep), D. several processes (DistributedStep), E. applying G.
The networks and the tutorial's hyper-parameters are in gan_conf.py.
"""
import argparse
import contextlib
import copy
import ctypes
import dataclasses
import functools
import gzip
import hashlib
import html
import io
import itertools
import json
import logging
import math
import os
import pickle
import random
import re
import signal
import stat
import sys
import time
import unicodedata
import urllib.parse
import warnings
import zlib
from pathlib import Path

if __name__ == "__main__":
    # A stop signal while numpy and torch load (seconds) ends the program quietly; main() then
    # installs its own handling.
    def _stopped_while_starting(signum, frame):
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one line for all the processes
            os.write(2, b"gan_trainer.py: interrupted\n")
        os._exit(130)
    for _s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if _s:
            signal.signal(_s, _stopped_while_starting)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from gan_conf import CONFIGS, DigitClassifier, FeatureNet, GANConfig, ShrinkTo, build_nets, image_size_ok  # noqa: E402

MAX_STRIKE = 5       # a net trains at most this many iterations in a row
LOG_PERIOD = 100     # iterations between loss lines; batches between trainer summaries
REAL, FAKE = 1, 0    # D's two classes
MNIST_SCRIPT = "data/get_mnist_data.sh"
CIFAR_SCRIPT = "data/download_cifar.sh"


class UserError(Exception):
    """Bad input or a failed write: reported as one line on stderr, exit status 1, no traceback."""


def plural(n, word):
    return f"{n} {word}{'es' if word.endswith('s') else 's'}" if n != 1 else f"{n} {word}"


def in_one_line(e, most=200):
    """An exception as "Type: the first line of its message" (which may be empty, or many lines)."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:most]}" if first else type(e).__name__


# ###################################################################### 1. THE COMMAND LINE
#
# main() reads the flags and hands over: to train() (part 2), or to generate(), evaluate() or
# report() (appendices E, B). Bad input is refused here, before anything is read or written, in one
# line on stderr with exit status 1 (UserError); so is a failed write later on, and a process of
# several that fails says so once.

def main(argv=None):
    try:
        with signals_interrupt():
            args = build_parser().parse_args(argv)
            args.given = given_flags(sys.argv[1:] if argv is None else argv)
            check_flags_apply(args, args.given)
            if (args.generate is not None or args.evaluate is not None) and torchrun_rank():
                raise UserError(f"{'--generate' if args.generate is not None else '--evaluate'} runs in one "
                                "process: start it with python, not torchrun")
            if args.generate is not None:
                generate(args)
            elif args.evaluate is not None:
                evaluate(args)
            elif args.report:
                report(args)
            else:
                train(args)
    except UserError as e:
        report_failure(f"gan_trainer.py: error{torchrun_rank()}: {e}")
        return 1
    except KeyboardInterrupt as e:
        if rank_0():  # under torchrun, one line for all the processes
            write_stderr(f"gan_trainer.py: interrupted{f' ({e})' if str(e) else ''}")
        return 130
    except (RuntimeError, MemoryError) as e:
        if lost_another_process(e):
            report_failure(f"gan_trainer.py: error{torchrun_rank()}: the processes lost touch with each other "
                           f"({in_one_line(e, most=120)})", first=False)
            return 1
        if not out_of_memory(e):
            raise
        report_failure(f"gan_trainer.py: error{torchrun_rank()}: out of memory: {out_of_memory(e)}; ask for less "
                       "(--generate N, --samples N, --batch_size, --hidden_dim, --image_size)")
        return 1
    return 0


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the absent ones (None / False), whose help says what happens."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


MOST = 10 ** 9  # counts (passes, iterations, samples, ...): beyond any run, and far from overflowing torch's sizes
MOST_IMAGE_SIZE = 4096  # far beyond what the tutorial's nets are for: G's first layer grows as the square of it


def positive_int(text):
    return int_in_range(text, 1, MOST)


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number")
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def augment_policy(text):
    """--augment: a comma list out of AUGMENTS, given back in their order."""
    parts = {p.strip() for p in text.split(",")} - {""}
    if not parts or parts - set(AUGMENTS):
        raise argparse.ArgumentTypeError(f"{text!r}: a comma list of {', '.join(AUGMENTS)}")
    return ",".join(a for a in AUGMENTS if a in parts)


def augment_or_none(text):
    """The policy a checkpoint's config names, as augment_policy gives it back; None if none."""
    try:
        return augment_policy(text)
    except (argparse.ArgumentTypeError, AttributeError):
        return None


def non_negative_int(text):
    return int_in_range(text, 0, MOST)


def int_in_range(text, low, high=None):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer")
    if value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f">= {low}"
        raise argparse.ArgumentTypeError(f"must be an integer {bounds}, got {value}")
    return value


def build_parser():
    p = OneLineParser(prog="gan_trainer.py", description="Train the PaddlePaddle tutorial GAN in PyTorch.",
                      formatter_class=HelpFormatter)
    p.add_argument("-d", "--data_source", required=True, choices=sorted(CONFIGS), help="what to learn")
    p.add_argument("--use_gpu", default="1", choices=["0", "1"], help="train on a GPU when CUDA is available")
    p.add_argument("--gpu_id", default=0, type=functools.partial(int_in_range, low=0, high=1023), help="which GPU")
    g = p.add_argument_group("training (defaults: the tutorial's, per data source)")
    g.add_argument("--passes", type=positive_int, help="total passes (100); with --resume, the run's new total")
    g.add_argument("--iters", type=positive_int, help="iterations per pass (10000 uniform, 1000 images)")
    g.add_argument("--batch_size", type=functools.partial(int_in_range, low=2, high=10 ** 6),
                   help="batch size (128; at least 2, for batch norm)")
    g.add_argument("--lr", type=positive_float, help="Adam learning rate (1e-4 uniform, 2e-4 images)")
    g.add_argument("--seed", type=functools.partial(int_in_range, low=0, high=2 ** 32 - 1),
                   help="random seed, 0 to 2^32-1 (default: a fresh one, printed)")
    g.add_argument("--data_dir", metavar="PATH",
                   help="folder holding mnist_data/ and cifar-10-batches-py/ (default: data); for -d folder, "
                        "the folder of images (required)")
    g.add_argument("--image_size", type=functools.partial(int_in_range, low=1, high=MOST_IMAGE_SIZE), metavar="S",
                   help=f"-d folder: images are resized and centre-cropped to S x S, 8 to {MOST_IMAGE_SIZE} "
                        "(default 64)")
    g.add_argument("--channels", type=int, choices=[1, 3], help="-d folder: 1 (grey) or 3 (RGB; the default)")
    g.add_argument("--conditional", type=int, choices=[0, 1],
                   help="1: G and D see the class of each image (mnist, cifar, or a folder with one subfolder "
                        "per class); the pictures show one row per class (default 0)")
    g.add_argument("--out_dir", default=".", help="where <d>_samples/ and <d>_params/ go")
    g.add_argument("--resume", nargs="?", const="", metavar="PATH",
                   help="continue from PATH, or without PATH from the newest checkpoint in <d>_params")
    g.add_argument("--keep", type=non_negative_int, default=3, metavar="K",
                   help="checkpoints to keep (newest; best.pt is kept besides); 0 keeps all; with --resume: the run's own")
    g.add_argument("--quiet", action="store_true", help="no progress bar (log lines still print)")
    g.add_argument("--eval_every", type=non_negative_int, default=0, metavar="K",
                   help="score the generator every K passes (0: never), keeping the best as <d>_params/best.pt; "
                        "see --evaluate; with --resume: the run's own")
    g.add_argument("--stop_on_collapse", type=int, choices=[0, 1], default=0,
                   help="1: end the run (with its checkpoint) when --eval_every sees it collapse; "
                        "with --resume: the run's own")
    r = p.add_argument_group("opt-in remedies (defaults: the tutorial's nets)")
    r.add_argument("--d_batch_norm", type=int, choices=[0, 1], help="0: D without batch norm (default 1)")
    r.add_argument("--hidden_dim", type=functools.partial(int_in_range, low=1, high=10 ** 6), metavar="N",
                   help="uniform: width of both nets (10)")
    r.add_argument("--g_sigmoid", type=int, choices=[0, 1], help="uniform: 1: G ends in a sigmoid (default 0)")
    r.add_argument("--ema", type=int, choices=[0, 1],
                   help="1: keep an average of G's weights, which draws the pictures and is scored beside G; "
                        "applying G: 0 takes the raw G of a run that has both (default 0; applying G: the average "
                        "where there is one)")
    r.add_argument("--ema_kimg", type=positive_float, metavar="K",
                   help="--ema 1: the average's half-life in thousands of the images G has made, shorter while "
                        f"a run is young ({EMA_RAMPUP:g} of them) (default {GANConfig.ema_kimg:g})")
    r.add_argument("--augment", type=augment_policy, metavar="POLICY",
                   help=f"images: DiffAugment every batch D sees, real and generated: a comma list of "
                        f"{', '.join(AUGMENTS)} (default: none)")
    s = p.add_argument_group("speed (none changes what is computed beyond float rounding, except --bf16)")
    s.add_argument("--bf16", type=int, choices=[0, 1],
                   help="bfloat16 autocast for the nets (default 0; with --resume: the run's own)")
    s.add_argument("--threads", type=functools.partial(int_in_range, low=0, high=1024), default=0, metavar="N",
                   help="CPU threads (0: 1 for uniform, torch's default for images)")
    s.add_argument("--channels_last", type=int, choices=[0, 1],
                   help="channels-last memory layout for the image nets (default: 1 on the CPU, 0 on a GPU; "
                        "with --resume: the run's own)")
    s.add_argument("--cuda_graphs", type=int, choices=[0, 1],
                   help="replay each iteration's kernels from CUDA graphs (default: 1 on a GPU; CPU: not available)")
    s.add_argument("--compile", type=int, choices=[0, 1],
                   help="run the step compiled by torch.compile on the CPU (default: 1 for uniform, 0 for images)")
    a = p.add_argument_group("applying a trained generator")
    a.add_argument("--generate", type=positive_int, metavar="N", help="write N samples to FILE.npy and FILE.png, then exit")
    a.add_argument("--report", action="store_true",
                   help="rebuild <d>_samples/report.html from a run's files (a run writes it after each pass), then exit")
    a.add_argument("--evaluate", nargs="?", const="", metavar="FILE",
                   help="score the trained generator, then exit; with FILE (.npy, as --generate writes it), score "
                        "the samples in it instead")
    a.add_argument("--samples", type=functools.partial(int_in_range, low=2, high=MOST), default=10000, metavar="N", help="samples for --evaluate / --eval_every")
    a.add_argument("--params", metavar="PATH",
                   help="checkpoint to use (default: the newest in <d>_params; best: <d>_params/best.pt)")
    a.add_argument("--output", metavar="FILE", help="output name for --generate (default: <d>_samples/generated)")
    a.add_argument("--label", metavar="K", help="--generate with a conditional G: class K (an index or a name); "
                                                 "without it the labels cycle over the classes")
    return p


TRAINING_ONLY = ("passes", "iters", "batch_size", "lr", "resume", "keep", "quiet", "eval_every", "stop_on_collapse",
                 "d_batch_norm",
                 "hidden_dim", "g_sigmoid", "bf16", "threads", "channels_last", "cuda_graphs", "compile",
                 "image_size", "channels", "conditional", "ema_kimg", "augment")


APPLYING_ONLY = ("params",)


def given_flags(argv):
    """The dests of the flags given on the command line (defaults left out)."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def check_flags_apply(args, given):
    def flag(dest):
        return "--" + dest
    if args.generate is not None and args.evaluate is not None:
        raise UserError("--generate and --evaluate are two actions: give one")
    action = "--generate" if args.generate is not None else "--evaluate" if args.evaluate is not None else None
    if args.report:
        extra = sorted(given - {"data_source", "out_dir", "report"})
        if action or extra:
            raise UserError(f"{action or flag(extra[0])} does not apply to --report: it rebuilds the run's page "
                            "from its files (give -d and --out_dir)")
    for dest in sorted(given):
        if action and dest in TRAINING_ONLY:
            raise UserError(f"{flag(dest)} does not apply to {action}: it is a training flag")
        if not action and dest in APPLYING_ONLY:
            raise UserError(f"{flag(dest)} names the checkpoint for --generate / --evaluate; "
                            "training continues from one with --resume PATH")
        if dest in ("output", "label") and action != "--generate":
            raise UserError(f"{flag(dest)} applies to --generate only")
        if dest == "data_dir" and action == "--generate":
            raise UserError("--data_dir does not apply to --generate: it needs the checkpoint only")
        if dest == "samples" and not (action == "--evaluate" or (not action and args.eval_every)):
            raise UserError("--samples applies to --evaluate and to training with --eval_every")
        if args.evaluate and dest in ("params", "samples", "seed", "ema"):
            raise UserError(f"{flag(dest)} does not apply to --evaluate FILE: it scores the samples in the file")


def out_of_memory(e):
    """The allocation failure in e, in words, or None."""
    if isinstance(e, (MemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))):
        return in_one_line(e)
    found = re.search(r"can't allocate memory: you tried to allocate (\d+) bytes", str(e))
    return f"{in_binary_units(int(found.group(1)))} could not be allocated" if found else None


def in_binary_units(n):
    """A number of bytes as "3.2 GiB", "12.5 MiB", "800.0 KiB" or "512 bytes"."""
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return plural(n, "byte")


def rank_0():
    """Whether this is the one process, or rank 0 of torchrun's."""
    return os.environ.get("RANK", "0") == "0"


def torchrun_rank():
    """ " (rank r of n)" in a process that torchrun started with others, else ""."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return f" (rank {os.environ.get('RANK', '?')} of {world})" if world > 1 else ""


SAY_AFTER_S = 30.0  # how long a process other than rank 0 waits before it reports a failure


def report_failure(line, first=None):
    """One line on stderr. Under torchrun, processes that fail alike (bad input, say) would each
    say it: rank 0 says it at once; another rank, or one that lost another process, waits a
    while first, and ends silently if torchrun ends it meanwhile (SIGTERM), as torchrun ends
    every process once one has failed: the one that failed has then said why, or torchrun has.
    (Processes start at different speeds, so the wait is long: rank 0 may still be loading.)"""
    if first is None:
        first = rank_0()
    line = shown(line)  # a path or a name with a newline in it must not break the line
    if torchrun_rank() and not first:
        def end(signum, frame):
            if signum == signal.SIGINT:  # Ctrl-C: the user is waiting for the reason
                write_stderr(line)
            os._exit(1)
        for s in STOP_SIGNALS:
            signal.signal(s, end)
        time.sleep(SAY_AFTER_S)
    write_stderr(line)


def lost_another_process(e):
    """Whether an error is a collective's that lost one of torchrun's processes."""
    if not torchrun_rank():
        return False
    return isinstance(e, dist.DistError) or any(
        words in str(e) for words in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                      "gloo", "NCCL"))


# ###################################################################### 2. THE LOOP
#
# train() sets a run up (new, or the one --resume continues) and run_passes() is the loop: each
# iteration draws the real batch and the noise and hands them to the step (part 3), then logs;
# each pass ends with its checkpoint (before anything optional), its scores (--eval_every), its
# picture and plots. A stop signal ends a run with a checkpoint to resume from.

def train(args):
    """Train for the configured passes, each followed by its checkpoint, scores and pictures."""
    procs = join_processes(args.use_gpu)  # one process, or one of torchrun's
    try:
        log = Printer(args.quiet, silent=not procs.writes)
        device = choose_device(args.use_gpu, procs.local_rank if procs.launched else args.gpu_id, log)
        files = RunFiles(args.out_dir, args.data_source, RunOptions().keep, write=procs.writes)  # the run's, once known
        with files.locked():
            run, data, evaluator = set_up(args, files, device, procs, log)
            if run is not None:
                run_passes(run, data, evaluator, files, args, log)
        leave_processes(procs, done=True)
    finally:
        leave_processes(procs)


def set_up(args, files, device, procs, log):
    """The run (new, or the one --resume continues), its data and its evaluator; no run when
    the run has all its passes already."""
    cfg, seed, ckpt = configure_run(args, files.params, procs, device)
    done = resume_position(ckpt)[0] if ckpt is not None else 0
    if ckpt is not None and done >= cfg.passes:
        more = f", more than --passes {cfg.passes}" if done > cfg.passes else ""
        log(f"nothing to do: the run already has {plural(done, 'pass')}{more} (raise --passes to go on)")
        return None, None, None
    procs.rows(cfg.batch_size)  # refuses a batch that does not divide over the processes
    options = RunOptions.decide(args, RunOptions(**ckpt["run_options"]) if ckpt else None)
    files.keep = options.keep
    if options.stop_on_collapse and not options.eval_every:
        raise UserError("--stop_on_collapse 1 acts on the scores of --eval_every K, which this run does not take: "
                        "give --eval_every too")
    if options.eval_every > cfg.passes:
        log(f"note: --eval_every {options.eval_every}: this run of {plural(cfg.passes, 'pass')} scores none of them")
    data_dir = args.data_dir or cfg.folder or "data"
    if options.eval_every:
        check_evaluable(cfg.data_source, data_dir)
    load = functools.partial(load_data, cfg, data_dir, device, seed, args.conditional or cfg.conditional, log,
                             args.quiet or not procs.writes, exclude=(files.samples, files.params))
    # a folder is decoded by one process per machine; the others take the cache it writes as it is
    data = procs.first_on_each_machine(lambda: load(retry=procs.local_rank == 0)) if cfg.data_source == "folder" \
        else load()
    run = start_run(args, fit_to_data(cfg, data, ckpt, log), seed, ckpt, options, device, procs, files, log)
    evaluator = Evaluator(cfg, data_dir, data.x, log) if options.eval_every and procs.writes else None
    return run, data, evaluator


def run_passes(run, data, evaluator, files, args, log):
    """The loop: each pass's iterations (draw the batch and the noise, train one net, log), then
    the end of the pass."""
    cfg, device, procs = run.cfg, run.device, run.processes
    train_one = make_step(run, log)  # an Iteration: EagerStep, or a faster way to compute it (part 3)
    memory_format = torch.channels_last if run.speed.channels_last else torch.contiguous_format
    rows = procs.rows(cfg.batch_size)  # this process's share of each batch (all of it, alone)
    log(f"training {cfg.data_source} on {device}: {plural(cfg.passes, 'pass')} of {plural(cfg.iters_per_pass, 'iteration')}, "
        f"batch {cfg.batch_size}, lr {cfg.lr:g}, seed {run.seed}", f"speed: {run.speed.describe()}",
        *filter(None, [bf16_hint(run), remedies_line(cfg)]))
    run.started = time.time()
    with StopRequest() as stop, files.metrics:
        for pass_id in range(run.pass_id, cfg.passes):
            run.start_pass(pass_id)
            log.start_pass(pass_id, cfg.iters_per_pass, run.iteration)
            started, first = time.time(), run.iteration
            batches = real_batches(data, cfg.batch_size, run.seed, pass_id, run.iteration, memory_format, rows)
            for i in range(run.iteration, cfg.iters_per_pass):
                if procs.any(stop.signal is not None, device):
                    stop_with_checkpoint(run, files, log, stop.signal, f"at pass {pass_id} iteration {i}")
                x, y = next(batches)
                z = torch.randn(cfg.batch_size, cfg.noise_dim, device=device)
                if cfg.augment:
                    x, z = augmented_inputs(cfg.augment, x, z, rows)
                z = z[rows] if procs.launched else z
                step = train_one(x, z, run.schedule, y=y)
                if not step.finite:
                    log.end_pass()
                    last_good = files.last_good_checkpoint()
                    files.draw_plots(pass_id, cfg, force=True)
                    files.write_page(run, f"stopped: a non-finite loss at pass {pass_id} iteration {i}")
                    raise UserError(f"non-finite loss at pass {pass_id} iteration {i} (d_loss={step.d_loss:g}, "
                                    f"g_loss={step.g_loss:g}); stopping: {last_good}")
                log(*run.record(step))
                run.iteration = i + 1
                if i % LOG_PERIOD == 0:
                    log(*loss_lines(step))
                    files.metrics.add(metrics_line(step, run, i))
                    log.update(1, d_loss=f"{step.d_loss:.3f}", g_loss=f"{step.g_loss:.3f}")
                else:
                    log.update(1)
            log.end_pass()
            if finish_pass(run, files, evaluator, args, log, time.time() - started, first, stopping=stop.signal):
                log(f"stopped after pass {pass_id}: the run has collapsed (--stop_on_collapse 1); "
                    f"checkpoint {files.checkpoint_path(pass_id)}, best {files.best_path()}")
                return
            run.iteration = 0
            if procs.any(stop.signal is not None, device) and pass_id + 1 < cfg.passes:
                stop_with_checkpoint(run, files, log, stop.signal, f"after pass {pass_id}", written=True)


def remedies_line(cfg):
    """What the opt-in remedies change in what the log shows (None without them)."""
    said = []
    if cfg.augment:
        said.append(f"augment {cfg.augment} (DiffAugment) on every batch D sees: the losses logged and compared "
                    "are D's on augmented batches")
    if cfg.ema:
        said.append(f"an average of G's weights (half-life {cfg.ema_kimg:g} kimg) draws the pictures and is scored")
    return "remedies: " + "; ".join(said) if said else None


def start_run(args, cfg, seed, ckpt, options, device, procs, files, log):
    """The run to train, with its speed options: a new one, or the one a checkpoint continues."""
    saved = Speed(**ckpt["options"]["speed"]) if ckpt else None
    speed = Speed.decide(args, cfg, device, saved, log, procs.world)
    apply_to_process(speed)
    run = Run(cfg, seed, speed, device, procs, options)
    if ckpt is None:
        files.open_metrics()
        return run
    run.load_state_dict(ckpt)
    files.open_metrics(metrics_until(ckpt["path"].parent / "metrics.jsonl", ckpt, log))
    log(f"resuming {ckpt['path']} at pass {run.pass_id} iteration {run.iteration} of {plural(cfg.passes, 'pass')}")
    changed = speed.differences(saved)
    if changed:
        log(f"note: resuming with {', '.join(changed)}: the run goes on correctly, but its numbers "
            "will not be bit-identical to an unbroken run's")
    return run


def finish_pass(run, files, evaluator, args, log, seconds, first, stopping=None):
    """After a pass: its checkpoint first (nothing optional may cost it), then the scores, the
    picture, the plots and the pass's line."""
    cfg, pass_id = run.cfg, run.pass_id
    path = files.save_checkpoint(run)
    best, collapsed = False, False
    if evaluator is not None and (pass_id + 1) % run.options.eval_every == 0:
        best, collapsed = evaluate_pass(run, files, evaluator, log)
    picture, stats = files.save_picture(run)
    files.draw_plots(pass_id + 1, cfg, force=pass_id + 1 == cfg.passes or stopping is not None or collapsed)
    ends = collapsed and run.options.stop_on_collapse
    files.write_page(run, "finished" if pass_id + 1 == cfg.passes else
                     "stopped: a collapse (--stop_on_collapse 1)" if ends else "running")
    done = cfg.iters_per_pass - first
    log(f"Pass={pass_id} done: {plural(done, 'iteration')} in {seconds:.1f} s ({100 * seconds / max(done, 1):.2f} s per 100), "
        f"D trained {run.steps['dis']} / G {run.steps['gen']} iterations so far{stats}; {picture}, {path}"
        + (f"; a new best {run.quality.metric} {run.quality.best:.4g}, kept as {files.best_path()}" if best else ""))
    return ends


def evaluate_pass(run, files, evaluator, log):
    """Score G after a pass; keep the checkpoint of the best score as best.pt, and notice a
    collapse (Quality.judge). The pass's checkpoint is written again with the quality, so that
    a resume knows the best so far. Returns (a new best, a collapse)."""
    cfg, pass_id = run.cfg, run.pass_id
    scores = evaluator.score_generator(run, run.sampler, run.options.samples)
    log(f"Pass={pass_id} eval{' (averaged G)' if cfg.ema else ''}: {format_scores(scores)}")
    at = {"pass": pass_id, "iteration": cfg.iters_per_pass, "step": (pass_id + 1) * cfg.iters_per_pass,
          "seconds": round(run.seconds(), 3)}
    raw = {}
    if cfg.ema:  # the raw G too, on the same noise: what the average gains
        raw = {"eval_raw": evaluator.score_generator(run, run.gen, run.options.samples)}
        log(f"Pass={pass_id} eval (raw G): {format_scores(raw['eval_raw'])}")
    files.metrics.add({**at, "eval": scores, **raw, "floor": evaluator.floor(run.options.samples)})
    metric = ranking_metric(cfg)
    previous = run.quality
    run.quality, best, collapsed = previous.judge(metric, scores[metric], pass_id)
    files.save_checkpoint(run)
    if best:
        files.save_best(run)
    if collapsed:
        files.metrics.add({**at, "collapse": {"metric": metric, "score": scores[metric], "best": previous.best,
                                              "best_pass": previous.best_pass}})
        log(f"Pass={pass_id} collapse: {metric} {scores[metric]:.4g} is over {COLLAPSE_FACTOR}x the best "
            f"({previous.best:.4g}, pass {previous.best_pass}) for {COLLAPSE_STREAK} evaluations in a row; "
            f"the best checkpoint is {files.best_path()}"
            + ("" if run.options.stop_on_collapse else " (--stop_on_collapse 1 would end the run here)"))
    return best, collapsed


def stop_with_checkpoint(run, files, log, signum, where, written=False):
    """A stop signal: checkpoint (unless the pass's own was just written), plots, one line, exit 130."""
    log.end_pass()
    path = files.checkpoint_path(run.pass_id) if written else files.save_checkpoint(run)
    if not written:
        files.draw_plots(run.pass_id, run.cfg, force=True)
    name = signal.Signals(signum).name if signum else "a stop signal to another process"
    files.write_page(run, f"stopped: {name} {where}")
    if run.processes.writes:
        write_stderr(f"{name}: stopped {where}; checkpoint {path}; continue with --resume")
    raise SystemExit(130)


# ###################################################################### 3. THE STEP AND THE CHOICE RULE
#
# The tutorial's iteration: (0) the losses of the current nets, (1) the choice rule (the net
# with the larger loss trains, at most MAX_STRIKE times in a row), (2) D's two updates or (3) G's
# one. tutorial_step is the reference to read; Iteration writes the logic once, and each way of
# computing it (EagerStep here; CompiledStep, GraphedStep, DistributedStep in appendices C and
# D) gives only its losses() and update(); tests/test_step_equivalence.py proves them equal.

# ====================================================================== the choice rule

@dataclasses.dataclass
class Schedule:
    """Which net trained last and how many iterations in a row (the original's curr_train, curr_strike)."""
    net: str = "dis"
    strike: int = 0


def choose_net(schedule, d_loss_larger, max_strike=MAX_STRIKE):
    """'dis' or 'gen': the net with the larger loss trains, but never more than max_strike in a row."""
    dis_exhausted = schedule.net == "dis" and schedule.strike == max_strike
    gen_exhausted = schedule.net == "gen" and schedule.strike == max_strike
    return "dis" if not dis_exhausted and (gen_exhausted or d_loss_larger) else "gen"


def advance(schedule, net):
    """The schedule after training `net`."""
    return Schedule(net, schedule.strike + 1 if net == schedule.net else 1)


# ====================================================================== one iteration

def cost(logits, label):
    """Cross-entropy of D's 2-way softmax against one label for the whole batch."""
    return F.cross_entropy(at_least_float32(logits), label_batch(len(logits), label, logits.device))


def at_least_float32(t):
    """bf16 (autocast's logits) made float32; float32 and float64 as they are."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


LABELS = {}  # (n, label, device) -> a batch of that label: made once (a plain dict, which torch.compile reads)


def label_batch(n, label, device):
    key = (n, label, device)
    if key not in LABELS:
        LABELS[key] = torch.full((n,), label, device=device)
    return LABELS[key]


@dataclasses.dataclass
class Losses:
    """The losses of one iteration, before any update, as tensors (what the choice reads)."""
    d_pos_loss: torch.Tensor   # D on the real batch x, labelled real
    d_neg_loss: torch.Tensor   # D on the generated batch G(z), labelled fake
    g_loss: torch.Tensor       # D on G(z), labelled real: G's cost
    real_logits: torch.Tensor  # D(x)
    fake_logits: torch.Tensor  # D(G(z)), with its graph where an update will use it


@dataclasses.dataclass
class Step:
    """What one iteration did: its losses as host floats (what is logged and what the choice
    read), whether they were finite, the net it trained, and tensors read only when logged."""
    d_pos_loss: float
    d_neg_loss: float
    g_loss: float
    finite: bool              # False: a loss was not finite, and nothing was trained
    trained: str | None       # "dis" or "gen" (None when not finite)
    real_logits: torch.Tensor
    fake_logits: torch.Tensor
    batches: list = dataclasses.field(default_factory=list)  # (cost, D's logits, label) per batch trained on

    @property
    def d_loss(self):
        """(d_pos_loss + d_neg_loss) / 2 in float64, as the original computed it in Python."""
        return (self.d_pos_loss + self.d_neg_loss) / 2


def choose_step(losses, schedule):
    """The Step of these losses: read to the host (the one read per iteration), the choice rule
    applied; no net when a loss is not finite."""
    with torch.no_grad():
        d_pos, d_neg, g = torch.stack([losses.d_pos_loss, losses.d_neg_loss, losses.g_loss]).tolist()
    finite = math.isfinite(d_pos + d_neg + g)
    trained = choose_net(schedule, (d_pos + d_neg) / 2 > g) if finite else None
    return Step(d_pos, d_neg, g, finite, trained, losses.real_logits, losses.fake_logits.detach())


def tutorial_step(gen, dis, opt_g, opt_d, x, z, schedule, y=None):
    """One iteration as the tutorial writes it, sharing no work: the reference that train_step is
    tested against (tests/test_step_equivalence.py) and timed against (tests/bench_speed.py).

    (0) The losses of the current nets, each from its own forward pass.
    (1) Choose the net with the larger loss: D if d_loss > g_loss (at most 5 times in a row).
    (2) Update D: maximise log D(x) + log(1 - D(G(z))): one Adam step on the generated batch
        labelled fake, then one on the real batch labelled real (each batch normalised alone).
    (3) Or update G: maximise log D(G(z)): one Adam step of G's parameters through D, labelled
        real (D's gradients are dropped).
    With classes (y, the real batch's labels; a conditional run), G draws its batch for the same
    labels and D sees the label beside each image.
    """
    with torch.no_grad():
        real_logits, fake_logits = dis(x, y), dis(gen(z, y), y)
        losses = Losses(cost(real_logits, REAL), cost(fake_logits, FAKE), cost(dis(gen(z, y), y), REAL),
                        real_logits, fake_logits)
    step = choose_step(losses, schedule)
    if step.trained == "dis":
        opt_d.zero_grad()
        fake_logits = dis(gen(z, y).detach(), y)
        fake_cost = cost(fake_logits, FAKE)
        fake_cost.backward()
        opt_d.step()
        opt_d.zero_grad()
        real_logits = dis(x, y)
        real_cost = cost(real_logits, REAL)
        real_cost.backward()
        opt_d.step()
        step.batches = [(fake_cost.detach(), fake_logits.detach(), FAKE), (real_cost.detach(), real_logits.detach(), REAL)]
    elif step.trained == "gen":
        opt_g.zero_grad()
        fake_logits = dis(gen(z, y), y)
        g_cost = cost(fake_logits, REAL)
        g_cost.backward()
        opt_g.step()
        opt_d.zero_grad()
        step.batches = [(g_cost.detach(), fake_logits.detach(), REAL)]
    return step


# (2) D: the generated batch labelled fake, then the real batch labelled real; (3) G: the
# generated batch through D labelled real. Each is one Adam step of that net.
UPDATES = {"dis": (("fake", FAKE), ("real", REAL)), "gen": (("fake", REAL),)}


class Iteration:
    """One iteration, written once for every way of computing it: (0) the losses of the current
    nets, (1) the choice rule, (2) or (3) the chosen net's updates in UPDATES's order; the Step
    it returns is what the loop logs and what the trainer logs receive.

    A way of computing it (EagerStep; appendices C and D: CompiledStep, GraphedStep, DistributedStep)
    gives two methods: losses(x, z, y), the Losses before any update, and update(net, batch,
    label), one Adam step of net on D's cost of that batch ("fake": G(z), "real": x) with
    that label, returning the batch's (cost, D's logits) for the trainer log."""

    def __call__(self, x, z, schedule, y=None):
        step = choose_step(self.losses(x, z, y), schedule)
        for batch, label in UPDATES.get(step.trained, ()):
            step.batches.append((*self.update(step.trained, batch, label), label))
        return step


class EagerStep(Iteration):
    """tutorial_step's numbers with less work (the parameters have not changed in between), the
    default for images on a CPU: one forward of D on G(z) gives d_neg_loss and g_loss, and its
    graph serves the update that follows; D(x) is evaluated without a graph, since D's update
    on x comes after its update on G(z) and must be recomputed anyway; gradients are taken for
    the trained net only."""

    def __init__(self, gen, dis, opt_g, opt_d, autocast=contextlib.nullcontext):
        self.gen, self.dis, self.autocast, self.opts = gen, dis, autocast, {"gen": opt_g, "dis": opt_d}
        self.held = None

    def losses(self, x, z, y=None, real=True):
        self.held = None  # the last iteration's graph goes before this one's is made
        losses = compute_losses(self.gen, self.dis, x, z, self.autocast, y, real)
        self.held = losses, x, y
        return losses

    def update(self, net, batch, label):
        losses, x, y = self.held
        if batch == "fake":  # the graph of D(G(z)) from the losses serves
            loss, logits = (losses.d_neg_loss if label == FAKE else losses.g_loss), losses.fake_logits
        else:
            loss, logits = cost_on_real(self.dis, x, self.autocast, y)
        descend(loss, self.opts[net])
        return loss.detach(), logits.detach()


def train_step(gen, dis, opt_g, opt_d, x, z, schedule, autocast=contextlib.nullcontext, y=None):
    """One EagerStep iteration of these nets (as the tests and benchmarks call it)."""
    return EagerStep(gen, dis, opt_g, opt_d, autocast)(x, z, schedule, y)


def compute_losses(gen, dis, x, z, autocast, y=None, real=True):
    """The losses at the current parameters; the graph of D(G(z)) is kept for the update.
    real=False leaves out D(x) and d_pos_loss, which no update uses (the graphed updates)."""
    with autocast():
        fake_logits = dis(gen(z, y), y)
        with torch.no_grad():
            real_logits = dis(x, y) if real else None
    return Losses(cost(real_logits, REAL) if real else None, cost(fake_logits, FAKE), cost(fake_logits, REAL),
                  real_logits, fake_logits)


def cost_on_real(dis, x, autocast, y=None):
    """D's cost on the real batch, labelled real, and its logits."""
    with autocast():
        logits = dis(x, y)
    return cost(logits, REAL), logits


def descend(loss, opt):
    """One Adam step down the gradient of loss, taken for opt's parameters only (nothing is
    computed for the other net's). Each gradient replaces the last, so no zero_grad is needed."""
    params = opt.param_groups[0]["params"]
    for p, grad in zip(params, torch.autograd.grad(loss, params)):
        p.grad = grad
    opt.step()


def make_step(run, log=print):
    """The iteration as run.speed asks for it: under torchrun, DistributedStep; on a GPU, its
    replay from CUDA graphs (GraphedStep); compiled (CompiledStep, the uniform CPU default);
    else EagerStep. Each is an Iteration: the same logic, computed its own way."""
    gen = Augmented(run.gen, run.cfg) if run.cfg.augment else run.gen
    nets = (gen, run.dis, run.opt_g, run.opt_d, run.autocast)
    if run.speed.processes > 1:
        return DistributedStep(*nets, run.device, run.processes)
    if run.speed.cuda_graphs:
        return GraphedStep(*nets)
    if run.speed.compile:
        return CompiledStep(*nets, log=log)
    return EagerStep(*nets)


# ---------------------------------------------------------------------- D's inputs augmented (--augment)

AUGMENTS = ("color", "translation", "cutout")  # DiffAugment's (Zhao et al. 2020), in its order
DRAWS = {"color": 3, "translation": 2, "cutout": 2}  # uniform draws per image each takes


def augment_draws(policy, n, device):
    """The random draws of n images' augmentation (uniform in [0, 1)): the same distribution for
    a real batch and a generated one."""
    return torch.rand(n, sum(DRAWS[a] for a in policy.split(",")), device=device)


def augment(images, draws, policy):
    """DiffAugment, differentiable in the images: color (brightness +-0.5, saturation x[0, 2],
    contrast x[0.5, 1.5]), translation (up to an eighth of the side, zeros coming in), cutout (a
    square of half the side set to 0), each image by its own row of draws."""
    column = iter(draws.to(images.dtype).unbind(1))
    factor = lambda: next(column).view(-1, 1, 1, 1)  # noqa: E731
    x, (n, _, h, w) = images, images.shape
    names = policy.split(",")
    if "color" in names:
        x = x + (factor() - 0.5)
        x = (x - x.mean(1, keepdim=True)) * (2 * factor()) + x.mean(1, keepdim=True)
        x = (x - x.mean((1, 2, 3), keepdim=True)) * (factor() + 0.5) + x.mean((1, 2, 3), keepdim=True)
    rows, cols = torch.arange(h, device=x.device).view(1, h, 1), torch.arange(w, device=x.device).view(1, 1, w)
    if "translation" in names:  # each pixel from (row - dy, col - dx); the zero border stands outside
        reach = [int(side / 8 + 0.5) for side in (h, w)]
        dy, dx = [((factor() * (2 * r + 1)).floor() - r).long().view(n, 1, 1) for r in reach]
        src_r, src_c = (rows - dy + 1).clamp(0, h + 1), (cols - dx + 1).clamp(0, w + 1)
        padded = F.pad(x, (1, 1, 1, 1))
        x = padded[torch.arange(n, device=x.device).view(n, 1, 1), :, src_r, src_c].permute(0, 3, 1, 2)
    if "cutout" in names:
        size = [int(side / 2 + 0.5) for side in (h, w)]
        top, left = [((factor() * (side + 1 - k % 2)).floor().long() - k // 2).view(n, 1, 1)
                     for side, k in zip((h, w), size)]
        inside = (rows >= top) & (rows < top + size[0]) & (cols >= left) & (cols < left + size[1])
        x = x * (~inside).unsqueeze(1).to(x.dtype)
    return x


def augmented_inputs(policy, x, z, rows=slice(None)):
    """--augment: (x augmented, z with the generated batch's draws appended), both drawn for the
    whole batch (z's rows), so that each process takes its rows of the same draws."""
    x = augment(x, augment_draws(policy, len(z), z.device)[rows], policy)
    return x, torch.cat([z, augment_draws(policy, len(z), z.device)], 1)


class Augmented(nn.Module):
    """G with its output augmented, as D is shown it: the noise carries each row's draws in its
    last columns (run_passes appends them), so every way of computing the step, which hands G
    the noise, augments alike. Its parameters are G's."""

    def __init__(self, gen, cfg):
        super().__init__()
        self.gen, self.noise_dim, self.policy = gen, cfg.noise_dim, cfg.augment

    def forward(self, z, y=None):
        return augment(self.gen(z[:, :self.noise_dim], y), z[:, self.noise_dim:], self.policy)


class TrainerLog:
    """Paddle's per-trainer summary: every 100 of this net's batches, its average cost and D's error.

    Batches are only queued (their cost and D's logits, no device work); costs and errors are
    computed for 100 batches at once and summed on the host in batch order, so that a run
    resumed from a checkpoint prints the very same figures.
    """

    def __init__(self, name, batch_size):
        self.name, self.batch_size = name, batch_size
        self.reset_pass()

    def reset_pass(self):
        self.batches, self.pass_sums, self.window_sums, self.pending = 0, [0.0, 0.0], [0.0, 0.0], []

    def add(self, batch_cost, logits, label):
        """Queue one training batch; returns a summary line every LOG_PERIOD batches."""
        self.pending.append((batch_cost, logits, label))
        self.batches += 1
        if self.batches % LOG_PERIOD:
            return None
        self.flush()
        self.pass_sums = [p + w for p, w in zip(self.pass_sums, self.window_sums)]
        (avg_cost, avg_err), (cur_cost, cur_err) = ([s / self.batches for s in self.pass_sums],
                                                    [s / LOG_PERIOD for s in self.window_sums])
        self.window_sums = [0.0, 0.0]
        metric = f"{self.name}_training_error"
        return (f"Batch={self.batches} samples={self.batches * self.batch_size} "
                f"AvgCost={avg_cost:.6g} CurrentCost={cur_cost:.6g} Eval: {metric}={avg_err:.6g}  "
                f"CurrentEval: {metric}={cur_err:.6g}")

    def flush(self):
        """Fold the queued batches into the window sums."""
        if not self.pending:
            return
        costs, logits, targets = zip(*self.pending)
        logits = torch.stack(logits).float()
        targets = torch.tensor(targets, device=logits.device)[:, None]
        errors = (logits.argmax(2) != targets).float().mean(1)
        for c, e in zip(torch.stack(costs).tolist(), errors.tolist()):
            self.window_sums = [self.window_sums[0] + c, self.window_sums[1] + e]
        self.pending = []

    def state_dict(self):
        self.flush()
        return {"batches": self.batches, "pass_sums": self.pass_sums, "window_sums": self.window_sums}

    def load_state_dict(self, state):
        self.reset_pass()
        self.batches, self.pass_sums, self.window_sums = state["batches"], state["pass_sums"], state["window_sums"]


def loss_lines(step):
    """The tutorial's two log lines (float32 values as %g, d_loss with 12 digits like Python 2's str)."""
    return (f"d_pos_loss is {step.d_pos_loss:.6g}     d_neg_loss is {step.d_neg_loss:.6g}",
            f"d_loss is {step.d_loss:.12g}    g_loss is {step.g_loss:.6g}")


@torch.no_grad()
def metrics_line(step, run, i):
    """The metrics.jsonl object of a logged iteration."""
    return {"pass": run.pass_id, "iteration": i, "step": run.pass_id * run.cfg.iters_per_pass + i,
            "d_pos_loss": step.d_pos_loss, "d_neg_loss": step.d_neg_loss, "d_loss": step.d_loss,
            "g_loss": step.g_loss, "trained": step.trained, "strike": run.schedule.strike,
            "d_real": step.real_logits.float().softmax(1)[:, REAL].mean().item(),
            "d_fake": step.fake_logits.float().softmax(1)[:, REAL].mean().item(),
            "d_share": run.steps["dis"] / max(1, run.steps["dis"] + run.steps["gen"]),
            "seconds": round(run.seconds(), 3)}


# ###################################################################### 4. THE RUN'S STATE
#
# A Run is everything a run is; its state_dict() is the checkpoint and load_state_dict()
# continues from one, bit for bit. Then how a run is configured: a new run's flags, or the
# checked content of the checkpoint it resumes.

@dataclasses.dataclass(frozen=True)
class RunOptions:
    """What a run does besides training, kept as its own so that a plain --resume goes on as the
    run began: how many checkpoints it keeps, how often it scores G and with how many samples,
    whether a collapse ends it. A flag given on --resume changes it from then on."""
    keep: int = 3
    eval_every: int = 0
    samples: int = 10000
    stop_on_collapse: bool = False

    @classmethod
    def decide(cls, args, saved=None):
        """The flags given; else the run's own (resuming); else the defaults."""
        given = getattr(args, "given", set())
        base = saved or cls()
        return cls(**{f.name: type(getattr(base, f.name))(getattr(args, f.name))
                      if f.name in given and getattr(args, f.name) is not None else getattr(base, f.name)
                      for f in dataclasses.fields(cls)})


COLLAPSE_FACTOR = 2   # a score this many times its best, ...
COLLAPSE_STREAK = 2   # ... this many evaluations in a row, is a collapse


@dataclasses.dataclass(frozen=True)
class Quality:
    """The run's scores so far, as far as the best checkpoint and the collapse alarm need them:
    the score that ranks G (lower is better), its best and where, how many evaluations in a row
    have been far from it, and the pass evaluated last (-1: none yet)."""
    metric: str = ""
    best: float = 0.0
    best_pass: int = -1
    far_in_a_row: int = 0
    last_pass: int = -1

    def judge(self, metric, score, pass_id):
        """(the quality after this evaluation, whether it is a new best, whether it signals a
        collapse): the score more than COLLAPSE_FACTOR times the best for COLLAPSE_STREAK
        evaluations in a row (said once, when the streak reaches it)."""
        if self.best_pass < 0 or score < self.best:
            return Quality(metric, score, pass_id, 0, pass_id), True, False
        far = self.far_in_a_row + 1 if score > COLLAPSE_FACTOR * self.best else 0
        return dataclasses.replace(self, far_in_a_row=far, last_pass=pass_id), False, far == COLLAPSE_STREAK


def ranking_metric(cfg):
    """The score that ranks a generator: the Frechet distance in the evaluation features; for
    the uniform square, the sliced Wasserstein distance to it."""
    return "fid" if cfg.is_image else "sliced_w1"


EMA_RAMPUP = 0.05  # the averaged G's half-life is at most this share of the images G has made


class Run:
    """Everything a run is: its configuration, seed and speed options, the nets and their
    optimizers, and what the loop carries from one iteration to the next (the schedule, the
    iteration counts, the trainer logs, the fixed noise of the pictures, the position, the
    training time). state_dict() is the checkpoint; load_state_dict() continues from one."""

    def __init__(self, cfg, seed, speed, device=None, processes=None, options=None):
        self.cfg, self.seed, self.speed = cfg, seed, speed
        self.options, self.quality = options or RunOptions(), Quality()
        self.device = torch.device(device or speed.device)
        self.processes = processes or Processes()
        # the tutorial's nets (gan_conf.py), laid out for speed (appendix C: prepare_nets)
        self.gen, self.dis = prepare_nets(build_nets(cfg), speed, self.device)
        # Adam with beta1 0.5, the tutorial's; fused into one kernel per net (appendix C: Adam)
        self.opt_g, self.opt_d = (Adam(net.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999), fused=True)
                                  for net in (self.gen, self.dis))
        self.autocast = make_autocast(self.device, speed.bf16)  # bf16 or nothing (appendix C)
        self.schedule, self.steps = Schedule(), {"dis": 0, "gen": 0}
        self.logs = {"dis": TrainerLog("discriminator", cfg.batch_size), "gen": TrainerLog("generator", cfg.batch_size)}
        self.fixed_noise, self.fixed_labels = picture_noise(cfg, self.device)
        self.gen_ema = copy.deepcopy(self.gen).requires_grad_(False) if cfg.ema else None
        self.averaged = None if self.gen_ema is None else list(zip(*[  # (the average's, G's) float tensors
            (a, c) for a, c in zip(self.gen_ema.state_dict(keep_vars=True).values(),
                                   self.gen.state_dict(keep_vars=True).values()) if a.is_floating_point()]))
        self.pass_id, self.iteration, self.elapsed = 0, 0, 0.0
        self.started = time.time()

    def seconds(self):
        """Training time so far, the stopped runs' included."""
        return self.elapsed + time.time() - self.started

    def record(self, step):
        """Account for a trained iteration; returns the trainer summary lines it completes."""
        self.schedule = advance(self.schedule, step.trained)
        self.steps[step.trained] += 1
        if step.trained == "gen" and self.gen_ema is not None:
            self.update_average()
        trainer_log = self.logs[step.trained]
        return [line for batch in step.batches if (line := trainer_log.add(*batch))]

    @property
    def sampler(self):
        """The G that draws the pictures and samples: the averaged one where the run keeps it."""
        return self.gen if self.gen_ema is None else self.gen_ema

    def update_average(self):
        """The averaged G after a G update (Karras et al.'s schedule): its half-life --ema_kimg,
        or EMA_RAMPUP of the images G has made if that is shorter, so that a young run averages
        its recent past rather than its random start. Every float tensor is averaged (batch
        norm's scale and shift too; the nets keep no running statistics)."""
        half_life = min(self.cfg.ema_kimg * 1000, EMA_RAMPUP * self.steps["gen"] * self.cfg.batch_size)
        averaged, current = self.averaged
        with torch.no_grad():
            torch._foreach_lerp_(averaged, current, 1 - 0.5 ** (self.cfg.batch_size / half_life))

    def start_pass(self, pass_id):
        self.pass_id = pass_id
        if self.iteration == 0:
            for trainer_log in self.logs.values():
                trainer_log.reset_pass()

    def facts(self):
        """The checkpoint's plain fields that say what the run is and where it stands (the run's page)."""
        return {"config": self.cfg.to_dict(), "options": {"seed": self.seed, "speed": dataclasses.asdict(self.speed)},
                "quality": dataclasses.asdict(self.quality), "pass": self.pass_id, "iteration": self.iteration,
                "elapsed": self.seconds()}

    def state_dict(self):
        no_labels = torch.zeros(0, dtype=torch.int64)
        return {"format": CHECKPOINT_FORMAT, **self.facts(), "run_options": dataclasses.asdict(self.options),
                "generator": self.gen.state_dict(), "discriminator": self.dis.state_dict(),
                "generator_ema": {} if self.gen_ema is None else self.gen_ema.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(), "rng": rng_state(),
                "schedule": dataclasses.asdict(self.schedule),
                "fixed_noise": self.fixed_noise.cpu(),
                "fixed_labels": no_labels if self.fixed_labels is None else self.fixed_labels.cpu(),
                "trainer_logs": {k: v.state_dict() for k, v in self.logs.items()},
                "steps": dict(self.steps)}

    def load_state_dict(self, ckpt):
        """Continue from a checkpoint (checked by check_checkpoint); a pass that was finished
        continues with the next one."""
        self.gen.load_state_dict(ckpt["generator"])
        self.dis.load_state_dict(ckpt["discriminator"])
        if self.gen_ema is not None:
            self.gen_ema.load_state_dict(ckpt["generator_ema"])
        self.opt_g.load_state_dict(ckpt["opt_g"])
        self.opt_d.load_state_dict(ckpt["opt_d"])
        self.fixed_noise = ckpt["fixed_noise"].to(self.device)
        self.fixed_labels = ckpt["fixed_labels"].to(self.device) if self.cfg.conditional else None
        self.schedule, self.steps = Schedule(**ckpt["schedule"]), dict(ckpt["steps"])
        for k, state in ckpt["trainer_logs"].items():
            self.logs[k].load_state_dict(state)
        self.pass_id, self.iteration = resume_position(ckpt)
        self.elapsed = ckpt["elapsed"]
        self.quality = Quality(**ckpt["quality"])
        set_rng_state(ckpt["rng"])
        self.started = time.time()


def resume_position(ckpt):
    """(pass, iteration) at which a checkpoint continues: a finished pass goes on with the next."""
    if ckpt["iteration"] >= ckpt["config"]["iters_per_pass"]:
        return ckpt["pass"] + 1, 0
    return ckpt["pass"], ckpt["iteration"]


PICTURE_COLUMNS = 10  # conditional pictures: one row per class (up to 10), this many samples each


def picture_noise(cfg, device):
    """The fixed noise (and, conditional, labels) of the per-pass pictures, so that passes
    compare: whole batches, enough for 64 images or 1024 points; conditional, a grid of one row
    per class, the same noise down each column."""
    batches = lambda n: -(-n // cfg.batch_size) * cfg.batch_size  # noqa: E731
    if not cfg.conditional:
        return torch.randn(batches(64 if cfg.is_image else 1024), cfg.noise_dim, device=device), None
    rows, k = min(len(cfg.classes), 10), len(cfg.classes)
    grid = torch.randn(PICTURE_COLUMNS, cfg.noise_dim).repeat(rows, 1)
    extra = batches(len(grid)) - len(grid)
    noise = torch.cat([grid, torch.randn(extra, cfg.noise_dim)])
    labels = torch.cat([torch.arange(rows).repeat_interleave(PICTURE_COLUMNS), torch.arange(extra) % k])
    return noise.to(device), labels.to(device)


# ====================================================================== configuration of a run

def configure_run(args, params_dir, procs=None, device="cpu"):
    """(configuration, seed, checkpoint) of the run to train: a new one (its random generators
    seeded, alike in every process), or the one --resume continues (its checkpoint, checked)."""
    if args.resume is None:
        return *fresh_config(args, params_dir, procs or Processes(), device), None
    ckpt = load_resume_checkpoint(args, params_dir)
    cfg = check_config(ckpt["config"])
    if args.passes is not None:  # --passes sets the run's new total
        cfg = dataclasses.replace(cfg, passes=args.passes)
    return cfg, ckpt["options"]["seed"], ckpt


RESUME_KEEPS = (("--iters", "iters", "iters_per_pass"), ("--batch_size", "batch_size", "batch_size"),
                ("--lr", "lr", "lr"), ("--hidden_dim", "hidden_dim", "hidden_dim"),
                ("--d_batch_norm", "d_batch_norm", "d_batch_norm"), ("--g_sigmoid", "g_sigmoid", "g_sigmoid"),
                ("--conditional", "conditional", "conditional"), ("--ema", "ema", "ema"),
                ("--ema_kimg", "ema_kimg", "ema_kimg"), ("--augment", "augment", "augment"))


def load_resume_checkpoint(args, params_dir):
    """The checkpoint --resume names (or the newest). Refused: one older than the newest of its
    own folder (it would overwrite the newer ones), one from elsewhere when this run's folder
    holds another run's files, flags that differ from its configuration."""
    if not args.resume and not params_dir.is_dir():
        raise UserError(f"no checkpoint (pass_<N>.pt) in {params_dir}: train first")
    ckpt = load_checkpoint(args.resume or params_dir, args.data_source, "--resume PATH")
    if ckpt["path"].parent.resolve() == params_dir.resolve():
        newer = [p for p in list_checkpoints(params_dir) if int(p.stem[5:]) > ckpt["pass"]]
        if newer:
            raise UserError(f"{newer[-1]} is newer than {ckpt['path']}: resuming from the older one would "
                            f"overwrite the newer ones; move them away first, or --resume from the newest")
    elif list_checkpoints(params_dir):
        raise UserError(f"{params_dir} holds another run's checkpoints: resuming {ckpt['path']} there would "
                        "mix the two runs; give an --out_dir without them (the run continues there)")
    cfg = check_config(ckpt["config"])
    kept = [(flag, getattr(args, arg), getattr(cfg, field)) for flag, arg, field in RESUME_KEEPS]
    kept += [("--seed", args.seed, ckpt["options"]["seed"]),
             ("--image_size", args.image_size, cfg.sample_shape[-1] if cfg.is_image else None),
             ("--channels", args.channels, cfg.sample_shape[0] if cfg.is_image else None),
             ("--data_dir", args.data_dir and cfg.folder and str(Path(args.data_dir).resolve()), cfg.folder)]
    for flag, given, run_value in kept:
        if given is not None and run_value is None:
            raise UserError(f"{flag} does not apply to this {cfg.data_source} run: it learns points, not images")
        if given is not None and type(run_value)(given) != run_value:
            # as the flag spells it: a run's True is --conditional 1
            spelled = int(run_value) if type(run_value) is bool else "none" if run_value == "" else run_value
            raise UserError(f"{flag} {given} differs from the run's {spelled}: a resumed run keeps its "
                            "configuration (a new run, in another --out_dir, can change it)")
    return ckpt


def make_config(args):
    """A new run's configuration: the tutorial's for the data source, and the flags given."""
    cfg = CONFIGS[args.data_source]
    if cfg.is_image and (args.hidden_dim is not None or args.g_sigmoid is not None):
        raise UserError("--hidden_dim and --g_sigmoid apply to -d uniform only")
    if args.conditional and not cfg.is_image:
        raise UserError("--conditional 1 needs images with classes: -d mnist, cifar or folder")
    if args.augment and not cfg.is_image:
        raise UserError("--augment applies to images (-d mnist, cifar or folder): it transforms pictures")
    if args.ema_kimg is not None and not args.ema:
        raise UserError("--ema_kimg is the half-life of --ema 1's average: give --ema 1 too")
    if cfg.data_source != "folder" and (args.image_size or args.channels):
        raise UserError("--image_size and --channels apply to -d folder only (mnist and cifar have their own)")
    overrides = {"passes": args.passes, "iters_per_pass": args.iters, "batch_size": args.batch_size, "lr": args.lr,
                 "d_batch_norm": args.d_batch_norm, "hidden_dim": args.hidden_dim, "g_sigmoid": args.g_sigmoid,
                 "ema": args.ema, "ema_kimg": args.ema_kimg, "augment": args.augment}
    cfg = dataclasses.replace(cfg, **{k: type(getattr(cfg, k))(v) for k, v in overrides.items() if v is not None})
    if cfg.data_source == "folder":
        if not args.data_dir:
            raise UserError("-d folder needs --data_dir PATH: the folder of images to learn")
        size, channels = args.image_size or cfg.sample_shape[1], args.channels or cfg.sample_shape[0]
        if not image_size_ok(size):
            raise UserError(f"--image_size {size}: the tutorial's nets halve the size three times, so it must be "
                            f"at least 8; the nearest size that works is {nearest_image_size(size)}")
        cfg = dataclasses.replace(cfg, sample_shape=(channels, size, size), folder=str(Path(args.data_dir).resolve()))
    return cfg


def nearest_image_size(size):
    return min((s for s in range(1, 2 * size + 16) if image_size_ok(s)), key=lambda s: (abs(s - size), s))


def fresh_config(args, params_dir, procs, device):
    """Configuration and seed of a new run; seeds every random generator."""
    if list_checkpoints(params_dir):
        raise UserError(f"{params_dir} already holds checkpoints of a run: continue it with --resume, "
                        "or give another --out_dir (or remove them) to start afresh")
    cfg = make_config(args)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    seed = procs.broadcast(seed, device)  # one seed for all processes: rank 0's
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return cfg, seed


def fit_to_data(cfg, data, ckpt, log):
    """The configuration with what the data says: a new run records its image count and classes;
    a resumed one must find the classes it was trained with."""
    if ckpt is not None and data.classes != cfg.classes:
        raise UserError(f"{shown(cfg.folder or cfg.data_source)}: the data's classes "
                        f"({', '.join(map(shown, data.classes)) or 'none'}) are not the run's "
                        f"({', '.join(map(shown, cfg.classes)) or 'none'})")
    if ckpt is not None and cfg.images and len(data.x) != cfg.images:
        log(f"note: the data holds {plural(len(data.x), 'image')}, the run was started on {cfg.images}")
    return dataclasses.replace(cfg, images=len(data.x) if cfg.is_image else 0, classes=data.classes)


# ###################################################################### 5. APPENDICES
#
# What the parts above call, one subject each: A. the data sources and their file formats;
# B. the run's files (checkpoints, metrics.jsonl, pictures and plots, the run's page) and the
# console; C. speed; D. several processes under torchrun; E. applying G: generate, evaluate,
# the scores.

# ====================================================================== A. data sources and their file formats

MOST_IDX_ITEMS = 10 ** 7  # far more than any MNIST file holds (60,000): a header that says more is not MNIST's
REFETCH = f"fetch it again with {MNIST_SCRIPT}"


def read_idx(path, magic, item_shape):
    """An IDX file (optionally gzipped) as a uint8 array of shape (n, *item_shape). The header is
    read first, then at most the data it announces and one byte more: a file that unpacks to far
    more (a gzip bomb) is never read whole."""
    path = Path(path)
    try:
        with open_regular_file(path) as file, (gzip.open(file) if path.suffix == ".gz" else file) as f:
            shape = check_idx_header(path, f.read(4 + 4 * (len(item_shape) + 1)), magic, item_shape)
            size = math.prod(shape)
            raw = f.read(size + 1)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise UserError(f"{path}: cannot read ({in_one_line(e)}); {REFETCH}")
    if len(raw) != size:
        holds = "more" if len(raw) > size else len(raw)
        raise UserError(f"{path}: truncated or padded IDX file: header says {shape[0]} items "
                        f"({size} bytes of data), file holds {holds}; {REFETCH}")
    return np.frombuffer(raw, np.uint8).reshape(shape)


def check_idx_header(path, header, magic, item_shape):
    """The shape an IDX header announces, checked against what the file should hold (a gzip
    stream damaged early can unpack to a wrong header before zlib notices)."""
    dims = len(item_shape) + 1
    if len(header) < 4 + 4 * dims:
        raise UserError(f"{path}: truncated IDX file ({len(header)} bytes, shorter than its header); {REFETCH}")
    found = int.from_bytes(header[:4], "big")
    if found != magic:
        raise UserError(f"{path}: not an IDX file of this kind (magic number {found}, expected {magic}); {REFETCH}")
    shape = [int.from_bytes(header[4 + 4 * k:8 + 4 * k], "big") for k in range(dims)]
    if tuple(shape[1:]) != tuple(item_shape):
        raise UserError(f"{path}: items of shape {tuple(shape[1:])}, expected {tuple(item_shape)}; {REFETCH}")
    if shape[0] > MOST_IDX_ITEMS:
        raise UserError(f"{path}: its header says {shape[0]} items, more than an MNIST file holds "
                        f"(at most {MOST_IDX_ITEMS}); {REFETCH}")
    return shape


def find_mnist_file(data_dir, name):
    """data_dir/mnist_data/<name>, or the .gz beside it."""
    for path in (Path(data_dir) / "mnist_data" / name, Path(data_dir) / "mnist_data" / (name + ".gz")):
        if path.exists():
            return path
    raise UserError(f"MNIST file {Path(data_dir) / 'mnist_data' / name} not found: "
                    f"run {MNIST_SCRIPT} (cd data && ./get_mnist_data.sh)")


def load_mnist(data_dir, split="train"):
    """MNIST images as uint8 (n, 1, 28, 28)."""
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(find_mnist_file(data_dir, f"{prefix}-images-idx3-ubyte"), 2051, (28, 28))
    return images[:, None]


def load_mnist_labels(data_dir, split="train"):
    prefix = "train" if split == "train" else "t10k"
    return read_idx(find_mnist_file(data_dir, f"{prefix}-labels-idx1-ubyte"), 2049, ())


class CifarUnpickler(pickle.Unpickler):
    """Unpickles what a CIFAR-10 python batch holds and nothing else: a dict of bytes, numbers,
    lists and one NumPy array. Any other class or function a pickle names is refused, so a
    crafted file cannot run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR-10 batch does not hold")
        multiarray = (getattr(np, "_core", None) or np.core).multiarray
        return {"_reconstruct": multiarray._reconstruct, "ndarray": np.ndarray, "dtype": np.dtype}[name]


CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def load_cifar(data_dir):
    """The five CIFAR-10 training batches: images as uint8 (n, 3, 32, 32), and their labels."""
    folder = Path(data_dir) / "cifar-10-batches-py"
    images, labels = [], []
    for k in range(1, 6):
        rows, batch_labels = read_cifar_batch(folder / f"data_batch_{k}")
        images.append(rows)
        labels.append(batch_labels)
    return np.concatenate(images), labels


def read_cifar_batch(path):
    """One CIFAR-10 python batch: its images as uint8 (n, 3, 32, 32), and its labels (None
    where they are not one class in 0-9 for each image: checked where used)."""
    if not path.exists():
        raise UserError(f"CIFAR-10 file {path} not found: run {CIFAR_SCRIPT} (cd data && ./download_cifar.sh)")
    try:
        with open_regular_file(path) as f:
            batch = CifarUnpickler(f, encoding="bytes").load()
        rows = batch[b"data"] if b"data" in batch else batch["data"]
        labels = batch.get(b"labels", batch.get("labels"))
    except Exception as e:  # any unpickling failure means a damaged or foreign file
        raise UserError(f"{path}: not a CIFAR-10 python batch ({in_one_line(e)})")
    if not isinstance(rows, np.ndarray) or rows.dtype != np.uint8 or rows.ndim != 2 or rows.shape[1] != 3072:
        raise UserError(f"{path}: 'data' is {getattr(rows, 'dtype', type(rows).__name__)} of shape "
                        f"{getattr(rows, 'shape', '()')}, expected uint8 rows of 3072 bytes "
                        "(32x32 pixels, R then G then B)")
    return rows.reshape(-1, 3, 32, 32), class_indices(labels, len(rows), len(CIFAR_CLASSES))


def class_indices(values, n, classes):
    """values as n class indices in [0, classes), or None if they are not that."""
    try:
        indices = np.asarray(values, dtype=np.int64)
    except (ValueError, TypeError, OverflowError):
        return None
    return indices if indices.shape == (n,) and ((indices >= 0) & (indices < classes)).all() else None


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")  # torchvision's IMG_EXTENSIONS leaves out GIF
MOST_CROPS_RESIZED = 16  # the resize, before the crop, may make this many crops' pixels (a thin image could make GBs)


def shown(text):
    """text (a path, a file name) with what would break a one-line message escaped as repr()
    writes it: control characters (a newline, a terminal escape), line separators, and the bytes
    of a file name that are not UTF-8."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(repr(c)[1:-1] if unicodedata.category(c) in ("Cc", "Zl", "Zp", "Cs") else c for c in text)


def named(entries, most=3):
    """(name, why) pairs as "name (why), ..." for a one-line message."""
    listed = ", ".join(f"{shown(name)} ({shown(why)})" for name, why in entries[:most])
    return listed + (", ..." if len(entries) > most else "")


def read_image_folder(folder, size, channels, log=print, quiet=True, exclude=(), by_class=False, retry=True):
    """Every image under `folder` (recursively, following linked folders; other files are
    ignored) as uint8 (n, channels, size, size), each resized on its shorter side and
    centre-cropped, and the path of each (relative to the folder). Left out: the run's own
    output folders (`exclude`) and any other run's (scan_image_folder); an image that cannot
    be decoded, named in one line. Decoded once: the result is cached outside the folder and
    reused while the folder's image files are the same ones (path, size, modification time).
    by_class: say which first-level subfolders (the classes) have no image. retry=False (the
    other processes of a run on one machine): the cache the first one wrote is taken as it is,
    so that every process has the same images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--data_dir {shown(folder)}: not a folder (-d folder reads the images in and below it)")
    scan = scan_image_folder(folder, exclude)
    if scan.left_out:
        log(f"note: {plural(len(scan.left_out), 'folder')} of {shown(folder)} left out: {named(scan.left_out)}")
    if not scan.files:
        raise UserError(f"{shown(folder)}: no image in it or below it (PNG, JPEG, BMP, WebP or GIF)")
    listing = [[str(p.relative_to(folder)), st.st_size, st.st_mtime_ns] for p, st in scan.files]
    cache = FolderCache(folder, size, channels)
    found = cache.load(listing, log, retry)
    if found is not None:
        images, names, skipped, again = found
        log(f"read {plural(len(names), 'image')} of {shown(folder)} from the cache {shown(cache.npy)}")
    else:
        images, names, skipped, again = decode_images(folder, [p for p, _ in scan.files], size, channels, quiet, log)
        cache.save(listing, images, names, skipped, again, log)
    if skipped:
        log(f"{shown(folder)}: {plural(len(skipped), 'image file')} could not be read and "
            f"{'were' if len(skipped) > 1 else 'was'} skipped: {named(skipped)}")
    if again:
        log(f"note: {plural(len(again), 'image file')} could not be read this time and "
            f"{'were' if len(again) > 1 else 'was'} left out of this run (the next run tries again): {named(again)}")
    if not names:
        raise UserError(f"{shown(folder)}: none of its {len(scan.files)} image files could be read")
    if by_class:
        with_images = {Path(name).parts[0] for name in names}
        empty = [d for d in scan.subfolders if d not in with_images]
        if empty:
            log(f"note: {plural(len(empty), 'class folder')} without an image that could be read, left out as "
                f"classes: {', '.join(map(shown, empty))}")
    return images, names


@dataclasses.dataclass
class FolderScan:
    """What an image folder holds: its image files (path, stat), sorted; its first-level
    subfolders; the folders left out, with why."""
    files: list
    subfolders: list
    left_out: list


def scan_image_folder(folder, exclude=()):
    """The image files in and below `folder`. Linked files and folders are followed (as
    torchvision's ImageFolder does), each real folder once, so a link loop ends. Left out: the
    folders in `exclude` (the run's own outputs) and other runs' (is_run_output). A file that
    goes away while the folder is listed is not listed."""
    excluded, real_folder = {os.path.realpath(p) for p in exclude}, os.path.realpath(folder)
    if any(real_folder == e or real_folder.startswith(os.path.join(e, "")) for e in excluded):
        raise UserError(f"--data_dir {shown(folder)} is this run's own output folder: give another --out_dir")
    seen = {real_folder: "."}  # real folder -> the path it was read by
    files, subfolders, left_out = [], None, []
    for top, dirs, file_names in os.walk(folder, followlinks=True):
        kept = []
        for d in sorted(dirs):
            path = os.path.join(top, d)
            real, rel = os.path.realpath(path), os.path.relpath(path, folder)
            if real in excluded or is_run_output(path):
                left_out.append((rel, "this trainer's output"))
            elif real in seen:
                left_out.append((rel, f"the same folder as {seen[real]}"))
            else:
                seen[real] = rel
                kept.append(d)
        dirs[:] = kept
        subfolders = kept if subfolders is None else subfolders
        for name in file_names:
            if name.lower().endswith(IMAGE_SUFFIXES):
                path = Path(top, name)
                try:
                    st = path.stat()
                except OSError:  # gone since its folder was listed, or a dangling link
                    continue
                if stat.S_ISREG(st.st_mode):  # a FIFO would block the decoder
                    files.append((path, st))
    return FolderScan(sorted(files, key=lambda f: f[0]), subfolders or [], left_out)


def is_run_output(path):
    """Whether a folder is a <d>_samples/ or <d>_params/ of a run of this trainer: so named,
    beside a <d>_params/ that holds a run's lock or checkpoints, or a <d>_samples/ that holds a
    run's pictures or page (its checkpoints moved away)."""
    source, _, kind = os.path.basename(path).rpartition("_")
    if source not in CONFIGS or kind not in ("samples", "params"):
        return False
    params = output_dirs(Path(path).parent, source, make=False)[1]
    return ((params / ".lock").is_file() or any(params.glob("pass_*.pt"))
            or kind == "samples" and ((Path(path) / "report.html").is_file() or any(Path(path).glob("train_pass*.png"))))


def decode_images(folder, files, size, channels, quiet=True, log=print):
    """The images of `files`, decoded, as uint8 (n, channels, size, size), the relative paths of
    those decoded, and (path, why) of those that could not be: skipped, for their content,
    and again, for a reason of the moment (the file moved away, a disk error, memory)."""
    from PIL import Image
    from tqdm import tqdm
    images = np.empty((len(files), channels, size, size), np.uint8)
    names, skipped, again, large = [], [], [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # said below, in one line for all
        for path in tqdm(files, desc=f"reading {shown(folder)}", unit="image", disable=quiet or len(files) < 500):
            name = str(path.relative_to(folder))
            try:
                with Image.open(path) as im:  # a GIF opens on its first frame
                    is_large = im.width * im.height > Image.MAX_IMAGE_PIXELS
                    images[len(names)] = fit_image(im, size, channels)
            except Exception as e:  # anything an image file can be: truncated, not an image, too large
                (again if may_read_later(e) else skipped).append((name, in_one_line(e, most=60)))
                continue
            names.append(name)
            if is_large:
                large.append(name)
    if large:
        log(f"note: decoded {plural(len(large), 'image')} larger than {Image.MAX_IMAGE_PIXELS} pixels, the size Pillow "
            f"warns of as a possible decompression bomb: {', '.join(map(shown, large[:3]))}"
            f"{', ...' if len(large) > 3 else ''}")
    return images[:len(names)], names, skipped, again


def fit_image(im, size, channels):
    """An opened image as uint8 (channels, size, size): upright (EXIF), 8 bits, grey or RGB,
    the shorter side resized to size (antialiased), centre-cropped."""
    from PIL import ImageOps
    from torchvision.transforms import functional as TF
    short, long = sorted(im.size)
    resized = int(size * long / short)  # the longer side after the resize, as torchvision computes it
    if resized > MOST_CROPS_RESIZED * size:
        shape = (size, resized) if im.width < im.height else (resized, size)
        raise ValueError(f"{im.width} x {im.height} px: resized, {shape[0]} x {shape[1]}, too elongated")
    im = to_8_bit(ImageOps.exif_transpose(im)).convert("L" if channels == 1 else "RGB")
    pixels = np.asarray(TF.center_crop(TF.resize(im, size), size))
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def to_8_bit(im):
    """A deep grey image (16-bit, 32-bit integers, floats) as 8-bit "L", scaled by its range:
    convert("L") clips it instead (a 16-bit image turns almost white). Other modes pass; Pillow
    itself reads 16-bit RGB(A) and grey with alpha as 8 bits a channel."""
    from PIL import Image
    if im.mode.startswith("I;16"):
        values = np.asarray(im, np.float64) / 257
    elif im.mode == "I":
        # 32-bit integers, with no range of their own: the formats read here keep 16-bit samples
        # in them (PNG in older Pillows, TIFF), so values within 0-65535 are read as 16 bit;
        # wider ones are stretched from their own least to their greatest
        values = np.asarray(im, np.float64)
        low, high = values.min(), values.max()
        values = values / 257 if low >= 0 and high <= 65535 else (values - low) * (255 / max(high - low, 1))
    elif im.mode == "F":
        # floats: 0-1 if none is above 1, else 0-255; clipped to that range
        values = np.nan_to_num(np.asarray(im, np.float64))
        values = values * 255 if values.max() <= 1 else values
    else:
        return im
    return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8))


def may_read_later(e):
    """Whether an image file failed for a reason of the moment, not for its content: an OSError
    with an errno (moved away, a disk error; Pillow's decoding errors have none), or memory."""
    return (isinstance(e, OSError) and e.errno is not None) or out_of_memory(e) is not None


def open_regular_file(path):
    """path opened for reading if it is a regular file; anything else (a FIFO, which would block
    a plain open, a device, a folder) is refused with an OSError."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError("not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_npy(path, shape):
    """The uint8 array of shape `shape` in a .npy file, read only once its header says it holds
    that: a damaged or crafted header cannot make it allocate more."""
    with open_regular_file(path) as f:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"a .npy file of version {version}")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        found, fortran, dtype = read_header(f)
        if found != shape or fortran or dtype != np.uint8:
            raise ValueError(f"it holds {dtype} of shape {found}{' in Fortran order' if fortran else ''}, "
                             f"not uint8 of shape {shape}")
        images = np.empty(shape, np.uint8)
        if f.readinto(memoryview(images).cast("B")) != images.nbytes or f.read(1):
            raise ValueError("its images are cut short or followed by more")
    return images


class FolderCache:
    """A folder's decoded images, kept in the user's cache folder ($XDG_CACHE_HOME/gan_trainer,
    else ~/.cache/gan_trainer), never in the image folder: a .npy of the uint8 images and a
    .json of what they were made from, one pair per folder, size and channels. It is used while
    the folder's listing is the same, and rebuilt when a file is added, removed or changed, when
    files could not be read last time for a reason of the moment, or when it is damaged."""

    def __init__(self, folder, size, channels):
        key = f"{Path(folder).resolve()}|{size}|{channels}"
        stem = "folder-" + hashlib.sha256(key.encode()).hexdigest()[:16]
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gan_trainer"
        self.npy, self.json, self.shape = root / f"{stem}.npy", root / f"{stem}.json", (channels, size, size)

    def load(self, listing, log=print, retry=True):
        """(images, names, skipped, again) if the cache holds this listing's images, else None:
        none yet, made from other files, or (said in one line) damaged. retry: a cache with files
        that could not be read for a reason of the moment is made anew, so they are tried again."""
        try:
            with open_regular_file(self.json) as f:
                meta = json.loads(f.read())
        except FileNotFoundError:  # none yet
            return None
        except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested too deeply
            return self.damaged(self.json, e, log)
        try:
            if meta["listing"] != listing:
                return None
            names, skipped, again = cached_names(meta, listing)
        except (ValueError, KeyError, TypeError) as e:
            return self.damaged(self.json, e, log)
        if again and retry:
            return None
        try:
            return read_npy(self.npy, (len(names), *self.shape)), names, skipped, again
        except (OSError, ValueError) as e:
            return self.damaged(self.npy, e, log)

    def damaged(self, path, e, log):
        log(f"note: the image cache {shown(path)} was damaged ({shown(in_one_line(e, most=80))}); decoding again")

    def save(self, listing, images, names, skipped, again, log=print):
        """Write the cache (the images first, the .json that vouches for them last); a cache that
        cannot be written costs the next run a decoding, nothing else."""
        try:
            self.npy.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.npy) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, images)
            with atomic_path(self.json) as tmp:
                tmp.write_text(json.dumps({"listing": listing, "names": names, "skipped": skipped, "again": again}))
        except (OSError, UserError) as e:
            log(f"note: the decoded images could not be cached ({shown(e)}); the next run decodes them again")


def cached_names(meta, listing):
    """(names, skipped, again) of a cache's .json, checked against the folder's listing: the
    names must be the listing's, in order, less those skipped or to read again."""
    skipped, again = meta["skipped"], meta.get("again", [])
    for entries in (skipped, again):
        if not isinstance(entries, list) or not all(
                isinstance(e, list) and len(e) == 2 and all(isinstance(s, str) for s in e) for e in entries):
            raise ValueError("its unread files are not (name, reason) pairs")
    unread = {name for name, _ in skipped + again}
    names = [name for name, _, _ in listing if name not in unread]
    if meta["names"] != names or len(names) + len(skipped) + len(again) != len(listing):
        raise ValueError("its image names are not the folder's")
    return names, [tuple(e) for e in skipped], [tuple(e) for e in again]


def class_labels(names, what):
    """The class of each image from the first-level subfolder it sits in (torchvision's
    ImageFolder convention), and the class names, sorted: from the names of the images read
    (torchvision's find_classes scans the folder again, and takes a class of no image)."""
    tops = [Path(name).parts[0] if len(Path(name).parts) > 1 else None for name in names]
    loose = tops.count(None)
    if loose:
        raise UserError(f"{shown(what)}: --conditional 1 needs the images in one subfolder per class; "
                        f"{plural(loose, 'image')} {'sits' if loose == 1 else 'sit'} at the top level")
    classes = tuple(sorted(set(tops)))
    if len(classes) < 2:
        raise UserError(f"{shown(what)}: --conditional 1 needs at least two classes (subfolders with images), "
                        f"found {len(classes)}")
    index = {c: k for k, c in enumerate(classes)}
    return np.array([index[t] for t in tops], dtype=np.int64), classes


@dataclasses.dataclass
class TrainingSet:
    """The whole training set on the training device: images as uint8 (a quarter of the memory;
    scaled to [-1, 1] per batch) or points; for a conditional run, each one's class."""
    x: torch.Tensor
    y: torch.Tensor | None = None
    classes: tuple = ()


def load_data(cfg, data_dir, device, seed=0, conditional=False, log=print, quiet=True, exclude=(), retry=True):
    """The training set of a configuration. The uniform points come from a generator of their
    own, so a resumed run sees the same ones. A folder: `exclude`, the run's output folders, are
    not read; retry, see read_image_folder."""
    if cfg.data_source == "uniform":
        return TrainingSet(torch.rand(1_000_000, 2, generator=torch.Generator().manual_seed(seed)).to(device))
    labels, classes = None, ()
    if cfg.data_source == "mnist":
        images = load_mnist(data_dir)
        if conditional:
            labels, classes = class_indices(load_mnist_labels(data_dir), len(images), 10), tuple("0123456789")
            if labels is None:
                raise UserError(f"{data_dir}: the MNIST labels are not one digit for each training image")
    elif cfg.data_source == "cifar":
        images, batch_labels = load_cifar(data_dir)
        if conditional:
            if any(b is None for b in batch_labels):
                raise UserError(f"{data_dir}: a CIFAR-10 batch has no labels in 0-9 for each image")
            labels, classes = np.concatenate(batch_labels), CIFAR_CLASSES
    else:
        images, names = read_image_folder(data_dir, cfg.sample_shape[1], cfg.sample_shape[0], log, quiet, exclude,
                                          by_class=conditional, retry=retry)
        if conditional:
            labels, classes = class_labels(names, data_dir)
            if len(classes) > 10:  # picture_noise draws a row for each of the first 10
                log(f"note: the per-pass pictures show the first 10 of the {len(classes)} classes, "
                    f"{shown(classes[0])} to {shown(classes[9])}, a row each")
    if len(images) < cfg.batch_size:
        raise UserError(f"{cfg.data_source}: only {plural(len(images), 'image')}, "
                        f"fewer than a batch of {cfg.batch_size}")
    y = torch.from_numpy(labels).to(device) if labels is not None else None
    return TrainingSet(torch.from_numpy(images if images.flags.writeable else images.copy()).to(device), y, classes)


def to_unit_range(data):
    """uint8 images -> floats in [-1, 1], the original's x / 255 * 2 - 1; points pass through."""
    return data.float() / 255 * 2 - 1 if data.dtype == torch.uint8 else data


BATCH_BLOCK = 1000   # batches whose rows are drawn at once
GATHER_BYTES = 1 << 22  # batches gathered from the training set at once: a whole block of points, a few of images


def block_indices(n, batch_size, generator, rows=BATCH_BLOCK):
    """rows x batch_size indices out of n: each row batch_size distinct indices, uniformly at
    random (the original's numpy.random.choice(n, batch_size, replace=False), once per batch).

    Drawing a block at once spares each iteration a draw, and on a GPU a wait. Indices are drawn
    with replacement, then each repeat within a row is drawn again until none is left (the rule
    treats every index alike, so each set of distinct indices is equally likely); deciding what
    to redraw reads the device once per round for the whole block. Where a batch is over an
    eighth of the data, repeats would take many rounds: each row is then a permutation's head.
    """
    device = generator.device
    if 8 * batch_size > n:
        # clone: a slice would keep its whole permutation of n alive
        return torch.stack([torch.randperm(n, generator=generator, device=device)[:batch_size].clone()
                            for _ in range(rows)])
    idx = torch.randint(n, (rows, batch_size), generator=generator, device=device)
    while len(again := rows_with_repeats(idx)):
        ordered, where = idx[again].sort(dim=1, stable=True)
        repeat = torch.zeros_like(ordered, dtype=torch.bool)
        repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]  # every copy of an index but its first
        row, col = repeat.nonzero(as_tuple=True)
        idx[again[row], where[row, col]] = torch.randint(n, (len(row),), generator=generator, device=device)
    return idx


def rows_with_repeats(idx):
    """The rows of idx that hold an index more than once (on a CPU, numpy sorts these rows many
    times faster than torch)."""
    if idx.device.type == "cpu":
        ordered = np.sort(idx.numpy(), axis=1)
        return torch.from_numpy(np.flatnonzero((ordered[:, 1:] == ordered[:, :-1]).any(1)))
    ordered = idx.sort(dim=1).values
    return (ordered[:, 1:] == ordered[:, :-1]).any(1).nonzero()[:, 0]


def real_batches(data, batch_size, seed, pass_id, start=0, memory_format=torch.contiguous_format, rows=slice(None)):
    """The real batches (x, y) of a TrainingSet for pass `pass_id`, from iteration `start` on:
    x as [-1, 1] floats, y their classes (None for an unconditional run). With several
    processes, each takes its `rows` of every batch: together, the single process's batch.

    The rows come from a generator of their own, seeded by (seed, pass, block): a pass resumed
    at any iteration sees the same batches, and the noise stream is left to torch's generator.
    """
    one = batch_size * data.x[0].numel() * 4  # bytes of a batch, as floats
    for block in itertools.count(start // BATCH_BLOCK):
        key = np.random.SeedSequence([seed, pass_id, block]).generate_state(1, np.uint64)[0]
        generator = torch.Generator(device=data.x.device).manual_seed(int(key))
        idx = block_indices(len(data.x), batch_size, generator)[max(start - block * BATCH_BLOCK, 0):, rows]
        # a gather per GATHER_BYTES of batches, not one per batch: the loop's largest cost for points
        for chunk in idx.split(max(1, GATHER_BYTES // one)):
            xs = to_unit_range(data.x.index_select(0, chunk.flatten())).unflatten(0, chunk.shape)  # index_select: faster than [] on a CPU
            for row, x in zip(chunk, xs):
                # the labels each in a tensor of their own: a compiled kernel cached for whole
                # tensors computed a conditional step wrongly on views of a larger one
                yield (x.contiguous(memory_format=memory_format) if x.dim() == 4 else x), \
                    None if data.y is None else data.y.index_select(0, row)


# ====================================================================== B. the run's files
#
# Where a run writes, under --out_dir: <d>_params/ (a checkpoint per pass, metrics.jsonl) and
# <d>_samples/ (a picture per pass, losses.png, progress.gif, report.html). Every file is written to a
# temporary name and renamed, so a kill never leaves half a file (metrics.jsonl is appended a
# line at a time; a line cut short is dropped on resume); a failed write ends the run in one
# line naming the file; a run holds its folder for its whole life.

GIF_FRAMES = 20      # most frames in progress.gif
PLOT_PERIOD = 30     # seconds: losses.png and progress.gif are redrawn after a pass at most this often


class RunFiles:
    """The files of one training run."""

    def __init__(self, out_dir, data_source, keep, write=True):
        """write=False: a process of several that is not rank 0, which writes nothing."""
        self.write = write
        self.samples, self.params = output_dirs(out_dir, data_source, make=False)
        self.made = missing_folders((self.samples, self.params)) if write else []
        try:
            output_dirs(out_dir, data_source, make=write)
        except UserError:
            self.remove_unused_folders()
            raise
        self.keep, self.metrics, self.plotted = keep, None, time.time()

    @contextlib.contextmanager
    def locked(self):
        """The run's hold on its folders (lock_run_folder); what a killed run left half-written goes,
        and so do the folders this run made, if it ends before it wrote anything in them."""
        if not self.write:
            yield
            return
        with lock_run_folder(self.params):
            for folder in (self.params, self.samples):
                remove_stale_temporaries(folder)
            try:
                yield
            except BaseException:
                self.remove_unused_folders()  # while the lock is held: no other run is starting there
                raise

    def remove_unused_folders(self):
        """The folders this run made, if it wrote nothing in them: nothing but what its start left
        (the lock, a metrics.jsonl without a line). Deepest first, so a parent it made goes too."""
        def left_by_the_start(p):
            return p.name == ".lock" or (p.name == "metrics.jsonl" and p.stat().st_size == 0)
        with contextlib.suppress(OSError):
            made = [d for d in self.made if d.is_dir()]  # a failed start may not have made them all
            if not all(left_by_the_start(p) for d in (self.samples, self.params) if d in made for p in d.iterdir()):
                return
            if self.params in made:
                for p in self.params.iterdir():
                    p.unlink()
            for folder in made:
                folder.rmdir()  # a parent holding anything else stays, and so do those above it

    def open_metrics(self, kept=()):
        self.metrics = MetricsLog(self.params / "metrics.jsonl", kept, self.write)

    def checkpoint_path(self, pass_id):
        return checkpoint_path(self.params, pass_id)

    def save_checkpoint(self, run):
        path = self.checkpoint_path(run.pass_id)
        if self.write:
            save_checkpoint(path, run.state_dict(), self.keep)
        return path

    def best_path(self):
        return self.params / BEST_CHECKPOINT

    def save_best(self, run):
        """best.pt: the checkpoint of the best score so far (never pruned: --keep counts pass_<N>.pt)."""
        if self.write:
            save_checkpoint(self.best_path(), run.state_dict(), keep=0)

    def last_good_checkpoint(self):
        found = list_checkpoints(self.params)
        return f"the last good checkpoint is {found[-1]}" if found else "no checkpoint was written yet"

    def save_picture(self, run):
        """train_pass<N>.png of G's output for the fixed noise (conditional: one row per class,
        up to 10); for points, their mean and std too."""
        cfg = run.cfg
        picture = self.samples / f"train_pass{run.pass_id}.png"
        if not self.write:
            return picture, ""
        samples = generate_samples(run.sampler, run.fixed_noise, cfg.batch_size, labels=run.fixed_labels)
        stats = ""
        if not cfg.is_image:
            mean, std = samples.mean(0).tolist(), samples.std(0).tolist()
            stats = f"; generated mean [{mean[0]:.4f} {mean[1]:.4f}] std [{std[0]:.4f} {std[1]:.4f}]"
        if cfg.conditional:
            samples = samples[:min(len(cfg.classes), 10) * PICTURE_COLUMNS]
        save_samples(samples, picture, f"{cfg.data_source} pass {run.pass_id}" + (" (averaged G)" if cfg.ema else ""),
                     PICTURE_COLUMNS if cfg.conditional else 8)
        return picture, stats

    def write_page(self, run, state):
        if self.write:
            write_report(self.samples, run.facts(), self.metrics.lines, state)

    def draw_plots(self, passes_done, cfg, force=False):
        """losses.png and progress.gif; redrawn at most every PLOT_PERIOD seconds (late in a run
        they take long enough to slow fast passes down), unless forced (the end of a run)."""
        if not self.write or (not force and time.time() - self.plotted < PLOT_PERIOD):
            return
        plot_losses(self.metrics.lines, self.samples / "losses.png")
        write_progress_gif(self.samples, passes_done, self.samples / "progress.gif",
                           gray=cfg.is_image and cfg.sample_shape[0] == 1)
        self.plotted = time.time()


def output_dirs(out_dir, data_source, make=True):
    """<d>_samples/ and <d>_params/ under out_dir; made (and checked writable) unless make=False."""
    samples, params = Path(out_dir) / f"{data_source}_samples", Path(out_dir) / f"{data_source}_params"
    if not make:
        return samples, params
    try:
        for d in (samples, params):
            d.mkdir(parents=True, exist_ok=True)
            probe = d / f".write_test.{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write outputs under {out_dir}: {e.strerror or e}")
    return samples, params


def missing_folders(folders):
    """Those of `folders` and of their parents that do not exist yet, deepest first."""
    missing = {p for f in folders for p in (f, *f.parents) if not os.path.exists(p)}
    return sorted(missing, key=lambda p: len(p.parts), reverse=True)


@contextlib.contextmanager
def lock_run_folder(params_dir):
    """Hold an OS lock on the run's params folder while the run lasts (the OS drops it when the
    process ends, even a killed one, so nothing stale is left): a second run there is refused
    instead of mixing its files with this one's."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    path = Path(params_dir) / ".lock"
    try:
        lock = open(path, "a+")
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}")
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise UserError(f"{params_dir} is in use by another run (pid {lock.read().strip() or '?'}): "
                            "wait for it to end, or give another --out_dir")
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename.

    A crash or a kill at any moment leaves either the old file or the new one under
    the final name, never a half-written one. A failed write (a full disk, a read-only
    folder, a folder in the file's place) ends in one line naming the file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or in_one_line(e)}")
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def remove_stale_temporaries(folder):
    """Delete temporary files left by a killed run (atomic_path names them .<name>.<pid>.tmp)."""
    for tmp in Path(folder).glob(".*.tmp"):
        try:
            pid = int(tmp.name.rsplit(".", 2)[-2])
            os.kill(pid, 0)  # still running: leave it
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        except (ValueError, PermissionError):
            pass


# ====================================================================== checkpoints
#
# A checkpoint holds tensors and plain values only (numbers, strings, lists, tuples, dicts), so
# that torch.load(weights_only=True), PyTorch's default, reads it: loading one can never run
# code. Every field is checked before anything uses it.

# 1 (no "format" key): G's first batch norm per channel, a pickled NumPy state; 2: without the
# run's own options and its quality (read as the defaults and none yet); 3: without the averaged
# G and the configuration's ema and augment (read as none)
CHECKPOINT_FORMAT = 4
CHECKPOINT_KEYS = {"format", "generator", "discriminator", "opt_g", "opt_d", "rng", "pass", "iteration",
                   "schedule", "fixed_noise", "fixed_labels", "config", "options", "trainer_logs", "steps",
                   "elapsed", "run_options", "quality", "generator_ema"}
FORMAT_3_KEYS = CHECKPOINT_KEYS - {"generator_ema"}
FORMAT_2_KEYS = FORMAT_3_KEYS - {"run_options", "quality"}
NEW_IN_FORMAT_4 = {f.name: f.default for f in dataclasses.fields(GANConfig) if f.name in ("ema", "ema_kimg", "augment")}
BEST_CHECKPOINT = "best.pt"


def rng_state():
    """Every random state, as tensors and plain values."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][:torch.cuda.device_count()])


def checkpoint_path(params_dir, pass_id):
    return Path(params_dir) / f"pass_{pass_id}.pt"


def list_checkpoints(params_dir):
    """Checkpoints in params_dir, oldest first."""
    found = []
    for path in Path(params_dir).glob("pass_*.pt"):
        try:
            found.append((int(path.stem[5:]), path))
        except ValueError:
            pass
    return [path for _, path in sorted(found)]


def save_checkpoint(path, state, keep):
    """Write atomically, then prune all but the newest `keep` (0 keeps all)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)  # in memory first: a failed file write is then an OSError that says why
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())
    if keep > 0:
        for old in list_checkpoints(path.parent)[:-keep]:
            if old != path:
                try:
                    old.unlink(missing_ok=True)
                except OSError as e:
                    raise UserError(f"cannot remove the old checkpoint {old}: {e.strerror or e}")


def read_checkpoint(path):
    """The raw content of a checkpoint file, read without running any code that it could hold."""
    try:
        return load_tensors(path)
    except pickle.UnpicklingError as e:  # weights_only met something beyond tensors and plain values
        raise UserError(f"{path}: refused: it holds more than tensors and plain values ({weights_only_reason(e)}), "
                        "and loading such a file could run code; checkpoints of earlier versions of this trainer "
                        "(an earlier architecture of G) look like this: train anew")
    except Exception as e:  # truncated zip, not a torch file, ...
        raise UserError(f"{path}: not a readable checkpoint ({in_one_line(e, most=120)})")


def load_tensors(path):
    """The tensors and plain values of a file saved by torch.save, read weights-only (nothing in
    it can run code) onto the CPU: a checkpoint from a GPU loads anywhere, and random states must
    be CPU tensors (load_state_dict then moves the rest to the nets' device). A FIFO or a device
    is refused, not waited on."""
    with open_regular_file(path) as f, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns of pickle protocols it did not write
        return torch.load(f, map_location="cpu", weights_only=True)


def weights_only_reason(e):
    """What torch.load(weights_only=True) refused, from its long message."""
    for line in str(e).splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line and not line.startswith(("Weights only load failed", "Please file", "Check the documentation",
                                         "(1)", "(2)")):
            return line.split(" was not an allowed")[0].split(". Please")[0][:120]
    return in_one_line(e, most=120)


def load_checkpoint(path, data_source, flag="--params"):
    """A checked checkpoint dict (on the CPU), with its path under "path"; refuses damaged,
    foreign or odd files in one line."""
    path = Path(path)
    if path.is_dir():
        found = list_checkpoints(path)
        if not found:
            raise UserError(f"no checkpoint (pass_<N>.pt) in {path}: train first")
        path = found[-1]
    if not path.exists():
        raise UserError(f"checkpoint {path} not found: train first, or name one with {flag}")
    ckpt = read_checkpoint(path)
    try:
        check_checkpoint(ckpt, path, data_source)
    except (TypeError, ValueError, RuntimeError, KeyError, AttributeError, IndexError, OverflowError) as e:
        # a combination of odd values that the checks did not foresee: still one line
        raise UserError(f"{path}: not a usable checkpoint: odd content ({in_one_line(e, most=100)})")
    ckpt["path"] = path
    return ckpt


# --- what a checkpoint may hold

def is_int(v, low=0, high=None):
    return type(v) is int and v >= low and (high is None or v <= high)


def is_number(v, low=0.0, high=math.inf):
    return type(v) in (int, float) and math.isfinite(v) and low <= v <= high


def is_float_tensor(t, shape=None):
    return (isinstance(t, torch.Tensor) and t.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
            and (shape is None or t.shape == shape) and bool(torch.isfinite(t).all()))


def has_keys(d, keys):
    return isinstance(d, dict) and d.keys() == set(keys)


def check_checkpoint(ckpt, path, data_source):
    """Refuse, in one line naming the field, a checkpoint this trainer did not write: each field's
    type, shape, range and keys are checked before anything uses it."""
    def need(ok, what):
        if not ok:
            raise UserError(f"{path}: not a usable checkpoint: {what}")

    need(isinstance(ckpt, dict), f"it holds a {type(ckpt).__name__}, not a dict")
    if ckpt.keys() == FORMAT_2_KEYS and ckpt["format"] == 2:  # today's format, before the run's own options
        # its scores, if any, are in metrics.jsonl, kept on resume as before (last_pass)
        last = ckpt["pass"] if type(ckpt["pass"]) is int else -1
        ckpt.update(format=3, run_options=dataclasses.asdict(RunOptions()),
                    quality=dataclasses.asdict(Quality(last_pass=last)))
    if ckpt.keys() == FORMAT_3_KEYS and ckpt["format"] == 3 and isinstance(ckpt["config"], dict):
        ckpt.update(format=CHECKPOINT_FORMAT, generator_ema={}, config={**NEW_IN_FORMAT_4, **ckpt["config"]})
    if ckpt.keys() == FORMAT_2_KEYS - {"format"}:
        raise UserError(f"{path}: made by an earlier version of this trainer, with an earlier architecture "
                        "(G's first batch norm per channel, now per unit as in the original): train anew")
    missing, extra = CHECKPOINT_KEYS - ckpt.keys(), ckpt.keys() - CHECKPOINT_KEYS
    if missing:
        raise UserError(f"{path}: not a checkpoint of this trainer (missing {', '.join(sorted(missing))})")
    need(not extra, f"unexpected {', '.join(sorted(map(str, extra)))}")
    need(type(ckpt["format"]) is int and ckpt["format"] == CHECKPOINT_FORMAT,
         f"format {ckpt['format']!r}, this trainer reads {CHECKPOINT_FORMAT}")
    cfg = check_config(ckpt["config"], need)
    made_for = cfg.data_source
    if made_for != data_source:
        raise UserError(f"{path}: checkpoint was made for -d {made_for}, not -d {data_source}")
    with torch.device("meta"):  # shapes only: nothing is allocated
        nets = dict(zip(("gen", "dis"), build_nets(cfg)))
    steps = ckpt["steps"]
    need(has_keys(steps, nets) and all(is_int(v) for v in steps.values()), "steps must be {'dis': n, 'gen': n}")
    need(cfg.ema or ckpt["generator_ema"] == {}, "generator_ema must be empty: the run keeps no averaged G")
    for net, weights, adam in (("gen", "generator", "opt_g"), ("dis", "discriminator", "opt_d"),
                               ("gen", "generator_ema", None)):
        if adam is None and not cfg.ema:
            continue
        expected = nets[net].state_dict()
        state = ckpt[weights]
        need(isinstance(state, dict) and state.keys() == expected.keys(),
             f"{weights} is not a state dict of this architecture")
        for k, t in state.items():
            need(is_float_tensor(t, expected[k].shape), f"{weights}.{k} is not a finite float tensor of shape "
                 f"{tuple(expected[k].shape)}")
        if adam is not None:
            check_adam_state(ckpt[adam], [p.shape for p in nets[net].parameters()], steps[net] > 0,
                             lambda ok, what, adam=adam: need(ok, f"{adam}: {what}"))
    check_rng_state(ckpt["rng"], need)
    need(is_int(ckpt["pass"], 0, cfg.passes - 1), f"pass must be an integer from 0 to {cfg.passes - 1}")
    need(is_int(ckpt["iteration"], 0, cfg.iters_per_pass), f"iteration must be an integer from 0 to {cfg.iters_per_pass}")
    schedule = ckpt["schedule"]
    need(has_keys(schedule, ("net", "strike")) and schedule["net"] in ("dis", "gen")
         and is_int(schedule["strike"], 0, MAX_STRIKE), f"schedule must be {{'net': 'dis' or 'gen', 'strike': 0 to {MAX_STRIKE}}}")
    noise = ckpt["fixed_noise"]
    need(is_float_tensor(noise) and noise.dim() == 2 and noise.shape[1] == cfg.noise_dim and len(noise) > 0
         and len(noise) % cfg.batch_size == 0, f"fixed_noise must be whole batches of {cfg.noise_dim}-d noise")
    labels = ckpt["fixed_labels"]
    need(isinstance(labels, torch.Tensor) and labels.dtype == torch.int64 and labels.dim() == 1
         and len(labels) == (len(noise) if cfg.conditional else 0)
         and bool(((labels >= 0) & (labels < max(1, len(cfg.classes)))).all()),
         "fixed_labels must be a class index for each fixed noise vector (none when unconditional)")
    options = ckpt["options"]
    need(has_keys(options, ("seed", "speed")) and is_int(options["seed"], 0, 2 ** 32 - 1),
         "options must be {'seed': 0 to 2^32-1, 'speed': {...}}")
    Speed.from_dict(options["speed"], need)
    logs = ckpt["trainer_logs"]
    need(has_keys(logs, ("dis", "gen")) and all(
        has_keys(log, ("batches", "pass_sums", "window_sums")) and is_int(log["batches"])
        and all(isinstance(v, list) and len(v) == 2 and all(is_number(x) for x in v)
                for v in (log["pass_sums"], log["window_sums"])) for log in logs.values()),
        "trainer_logs must be {'dis'/'gen': {'batches': n, 'pass_sums': [cost, error], 'window_sums': [cost, error]}}")
    need(is_number(ckpt["elapsed"]), "elapsed must be a number of seconds")
    check_fields(ckpt["run_options"], RunOptions, "run_options", need)
    check_fields(ckpt["quality"], Quality, "quality", need)
    quality = ckpt["quality"]
    need(quality["metric"] in ("", ranking_metric(cfg)) and quality["far_in_a_row"] >= 0 and quality["best"] >= 0,
         "quality holds values no run reaches")
    need(ckpt["run_options"]["samples"] >= 2, "run_options.samples must be at least 2")


def check_fields(d, cls, name, need):
    """d as the fields of dataclass cls: the same names, each of its type (an int may stand for a
    float), finite and not negative."""
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    need(has_keys(d, fields) and all(type(d[k]) is t or (t is float and type(d[k]) is int) for k, t in fields.items())
         and all(is_number(v, -1) for v in d.values() if type(v) in (int, float)),
         f"{name} must be {{{', '.join(f'{k}: {t.__name__}' for k, t in fields.items())}}}")


def check_config(config, need=None):
    """The GANConfig of a checkpoint's "config", each field of the type and range it must have
    (need(ok, what) refuses; a checked checkpoint's config needs none)."""
    need = need or (lambda ok, what: None)
    fields = {f.name: f.type for f in dataclasses.fields(GANConfig)}
    need(isinstance(config, dict) and config.keys() == fields.keys(),
         f"config must have exactly the fields of GANConfig ({', '.join(fields)})")
    need(type(config["data_source"]) is str and config["data_source"] in CONFIGS,
         f"config.data_source must be one of {', '.join(sorted(CONFIGS))}")
    for name, kind in fields.items():
        v = config[name]
        if kind is int:
            low = {"batch_size": 2, "images": 0}.get(name, 1)
            need(is_int(v, low), f"config.{name} must be an integer of at least {low}")
        elif name == "beta1":
            need(is_number(v, 0.0, 1.0) and v < 1, "config.beta1 must be a number in [0, 1)")
        elif kind is float:
            need(is_number(v) and v > 0, f"config.{name} must be a positive number")
        elif kind is bool:
            need(type(v) is bool, f"config.{name} must be true or false")
        elif kind is str:
            need(type(v) is str, f"config.{name} must be a string")
    need(config["augment"] in ("", augment_or_none(config["augment"])) and not (
        config["augment"] and config["data_source"] == "uniform"), f"config.augment must be a comma list of "
         f"{', '.join(AUGMENTS)}, for images")
    classes = config["classes"]
    need(isinstance(classes, (tuple, list)) and all(type(c) is str for c in classes)
         and len(set(classes)) == len(classes) != 1, "config.classes must be distinct names, none or several")
    shape = config["sample_shape"]
    need(isinstance(shape, (tuple, list)), "config.sample_shape must be a tuple")
    if config["data_source"] == "folder":
        need(len(shape) == 3 and shape[0] in (1, 3) and is_int(shape[1]) and shape[1] == shape[2]
             and image_size_ok(shape[1]), "config.sample_shape must be (1 or 3, s, s) with a size the nets admit")
    else:
        need(tuple(shape) == CONFIGS[config["data_source"]].sample_shape,
             f"config.sample_shape must be {CONFIGS[config['data_source']].sample_shape} for {config['data_source']}")
    return GANConfig(**dict(config, sample_shape=tuple(shape), classes=tuple(classes)))


def check_adam_state(state, shapes, trained, need):
    """An Adam state dict for parameters of these shapes: one group, and for every parameter
    its step and moments (none before the net's first update)."""
    need(has_keys(state, ("state", "param_groups")), "not an optimizer state dict")
    groups = state["param_groups"]
    need(isinstance(groups, list) and len(groups) == 1 and isinstance(groups[0], dict), "must have one parameter group")
    group = groups[0]
    need(group.get("params") == list(range(len(shapes))), f"its group must hold parameters 0 to {len(shapes) - 1}")
    need(is_number(group.get("lr"), 0.0) and group["lr"] > 0, "lr must be a positive number")
    betas = group.get("betas")
    need(isinstance(betas, (tuple, list)) and len(betas) == 2 and all(is_number(b, 0.0, 0.999999) for b in betas),
         "betas must be two numbers in [0, 1)")
    need(is_number(group.get("eps"), 0.0) and is_number(group.get("weight_decay"), 0.0), "eps and weight_decay must be numbers >= 0")
    need(all(isinstance(v, (bool, int, float, str, type(None))) for k, v in group.items() if k not in ("params", "betas")),
         "its group holds values other than numbers, flags and strings")
    moments = state["state"]
    need(isinstance(moments, dict), "state must be a dict")
    need(not trained or len(moments) == len(shapes), "no Adam state for a net that has trained")
    need(not moments or moments.keys() == set(range(len(shapes))), f"state must cover parameters 0 to {len(shapes) - 1}")
    for i, m in moments.items():
        need(has_keys(m, ("step", "exp_avg", "exp_avg_sq")), f"state {i} must hold step, exp_avg and exp_avg_sq")
        need(is_float_tensor(m["step"], ()) and m["step"].item() >= 0, f"state {i}: step must be a number >= 0")
        need(is_float_tensor(m["exp_avg"], shapes[i]) and is_float_tensor(m["exp_avg_sq"], shapes[i])
             and bool((m["exp_avg_sq"] >= 0).all()), f"state {i}: moments must be finite tensors of shape {tuple(shapes[i])}")


def check_rng_state(state, need):
    need(has_keys(state, ("python", "numpy", "torch", "cuda")), "rng must hold python, numpy, torch and cuda states")
    for name, make in (("python", random.Random), ("numpy", np.random.RandomState)):
        try:  # a throwaway generator of that kind takes the state, or says what is wrong with it
            (make().setstate if name == "python" else make().set_state)(state[name])
        except Exception as e:
            need(False, f"rng.{name} is not a {name} random state ({in_one_line(e, most=80)})")
    need(isinstance(state["torch"], torch.Tensor) and state["torch"].dtype == torch.uint8
         and state["torch"].shape == torch.get_rng_state().shape, "rng.torch is not a torch random state")
    cuda = state["cuda"]
    need(isinstance(cuda, list) and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.shape == (16,)
                                        for t in cuda), "rng.cuda must be CUDA random states (16 bytes each)")


# ====================================================================== metrics.jsonl

class MetricsLog:
    """metrics.jsonl: one JSON object per logged iteration or evaluation, on disk as soon as written.

    Opening it rewrites the file with `kept` (a resumed run drops what the stopped run logged
    after its checkpoint); `lines` is everything so far, for the plots.
    """

    def __init__(self, path, kept=(), write=True):
        self.path, self.lines, self.file, self.write = path, list(kept), None, write
        if write:
            with atomic_path(path) as tmp:
                tmp.write_text("".join(json.dumps(m) + "\n" for m in self.lines))

    def __enter__(self):
        if not self.write:
            return self
        try:
            self.file = open(self.path, "a")
        except OSError as e:
            raise UserError(f"cannot write {self.path}: {e.strerror or e}")
        return self

    def __exit__(self, *exc):
        with contextlib.suppress(OSError, AttributeError):
            self.file.close()

    def add(self, m):
        self.lines.append(m)
        if not self.write:
            return
        try:
            self.file.write(json.dumps(m) + "\n")
            self.file.flush()
        except OSError as e:
            raise UserError(f"cannot write {self.path}: {e.strerror or e}")


def metrics_until(path, ckpt, log):
    """The metrics.jsonl lines up to a checkpoint: what the stopped run logged after it is dropped,
    and so are lines that are not metrics (cut short by a kill, or edited)."""
    if not path.exists():
        return []
    try:
        with open_regular_file(path) as f:
            text = f.read().decode("utf-8", errors="replace")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}")
    kept, odd = [], 0
    saved = (ckpt["pass"], ckpt["iteration"])
    evaluated = ckpt["quality"]["last_pass"] == ckpt["pass"]
    for line in text.splitlines():
        try:
            m = json.loads(line)
            at = (m["pass"], m["iteration"])
            if not all(is_int(v) for v in at) or ("d_loss" in m and not plottable(m)) or not numbers_fit(m):
                raise TypeError
        except (ValueError, TypeError, KeyError, RecursionError, OverflowError):  # deeply nested; ints beyond floats
            odd += line.strip() != ""
            continue
        # the evaluation after a pass belongs with its checkpoint, if it was written with its quality
        if at < saved or (("eval" in m or "collapse" in m) and at == saved and evaluated):
            kept.append(m)
    if odd:
        log(f"{path}: {plural(odd, 'line')} that {'is' if odd == 1 else 'are'} not metrics left out")
    return kept


LOSSES = ("d_pos_loss", "d_neg_loss", "d_loss", "g_loss")


def numbers_fit(v, depth=0):
    """Whether every integer in a metrics line fits a float, as the page and the plots need
    (JSON reads integers of any length), within the few levels of nesting a run writes."""
    if isinstance(v, dict):
        v = list(v.values())
    if isinstance(v, list):
        return depth < 4 and all(numbers_fit(x, depth + 1) for x in v)
    return not isinstance(v, int) or abs(v) < 2 ** 63


def plottable(m):
    """Whether a loss line holds what plot_losses draws, in the ranges a run writes (float32
    cross-entropies, a share, a step count): the plot's axes cannot span what lies beyond."""
    return (is_int(m.get("step"), 0, 2 ** 63 - 1) and is_number(m.get("d_share"), 0.0, 1.0)
            and all(is_number(m.get(k), 0.0, torch.finfo(torch.float32).max) for k in LOSSES))


# ====================================================================== pictures and plots

@torch.no_grad()
def generate_samples(gen, noise, batch_size, generator=None, labels=None):
    """G's output for `noise` (and, conditional, `labels`), in batches of batch_size: batch norm
    sees the batch statistics G was trained with (the last batch is topped up with extra noise).
    In eval mode, which changes nothing for these nets (no running statistics) but keeps a
    batch norm over several processes to this one."""
    training = gen.training
    gen.eval()
    try:
        if labels is not None:
            return among_companions(gen, noise, labels, batch_size, generator).float()
        out = []
        for start in range(0, len(noise), batch_size):
            z = noise[start:start + batch_size]
            n = len(z)
            if n < batch_size:
                z = torch.cat([z, torch.randn(batch_size - n, z.shape[1], generator=generator).to(z.device)])
            out.append(gen(z)[:n])
        return torch.cat(out).float()
    finally:
        gen.train(training)


def among_companions(gen, noise, labels, batch_size, generator=None):
    """A conditional G's output for (noise, labels), each row drawn in a batch labelled as the
    training batches are: every class in turn (slot j of batch b holds class j mod k; a batch
    smaller than the k classes holds the next batch_size of them, so they rotate from batch
    to batch).

    G's batch norm subtracts the batch mean, and with it whatever every row of the batch shares:
    in a batch of one label, the label itself. So the rows asked for fill the slots of their
    class, and the other slots get companions, fresh noise whose output is dropped. Labels that
    cycle over the classes need no companion; a single class needs k batches per batch of it.
    """
    k = gen.classes
    asked = [(labels == c).nonzero().flatten().cpu() for c in range(k)]
    drawn = torch.zeros(k, dtype=torch.long)  # rows of each class drawn so far
    companions = generator or torch.Generator().manual_seed(0)  # never the training's random stream
    out = None
    for b in itertools.count():
        if all(n >= len(rows) for n, rows in zip(drawn.tolist(), asked)):
            return out
        slots = (torch.arange(batch_size) + (b * batch_size if batch_size < k else 0)) % k
        order = slots.argsort(stable=True)
        rank = torch.empty_like(slots)  # each slot's place among the slots of its class
        rank[order] = torch.arange(batch_size) - torch.searchsorted(slots[order], slots[order])
        at = drawn[slots] + rank
        drawn += torch.bincount(slots, minlength=k)
        rows = torch.tensor([asked[c][i] if i < len(asked[c]) else -1 for c, i in zip(slots.tolist(), at.tolist())])
        if (rows < 0).all():
            continue  # a rotation past classes nobody asked for
        z = noise[rows.clamp(min=0).to(noise.device)]
        fill = (rows < 0).nonzero().flatten()
        z[fill.to(z.device)] = torch.randn(len(fill), z.shape[1], generator=companions).to(z.device)
        images = gen(z, slots.to(z.device))
        if out is None:
            out = images.new_empty(len(noise), *images.shape[1:])
        keep = (rows >= 0).to(z.device)
        out[rows[rows >= 0].to(z.device)] = images[keep]


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (imported on first use: it is slow to load).
    Its warnings go unsaid: one that its config folder is unusable (it takes a temporary one
    instead) would put lines of its own among the run's."""
    logging.getLogger("matplotlib").setLevel(logging.ERROR)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_sample_grid(images, path, columns=8):
    """A grid of images, `columns` to a row, no padding; by default the first 64 as 8 x 8
    (224 x 224 for mnist, 256 x 256 for cifar)."""
    from torchvision.utils import save_image
    with atomic_path(path) as tmp:
        save_image(images[:columns * columns if columns == 8 else len(images)].cpu(), tmp, nrow=columns, padding=0,
                   normalize=True, value_range=(-1, 1), format="png")


def save_scatter(points, path, title=""):
    """Generated 2-D points over the target square [0, 1]^2, on fixed axes so passes compare."""
    plt = pyplot()
    pts = points.cpu().numpy()
    lo, hi = -1.0, 2.0
    inside = ((pts >= 0) & (pts < 1)).all(1).mean()
    off_view = (~((pts >= lo) & (pts <= hi)).all(1)).sum()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.add_patch(plt.Rectangle((0, 0), 1, 1, fill=False, color="tab:red", lw=1.5, label="target [0,1]^2"))
    ax.scatter(pts[:, 0], pts[:, 1], s=4, alpha=0.6, label="generated")
    note = f"{inside:.0%} inside the square" + (f", {off_view} of {len(pts)} beyond this view" if off_view else "")
    ax.set(xlim=(lo, hi), ylim=(lo, hi), aspect="equal", title=f"{title}\n{note}".strip())
    ax.legend(loc="upper right", fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def save_samples(samples, path, title="", columns=8):
    if samples.dim() == 4:
        save_sample_grid(samples, path, columns)
    else:
        save_scatter(samples, path, title)


def plot_losses(metrics, path):
    """losses.png: the four losses at the logged iterations and the share of iterations D trained."""
    if not metrics:
        return
    plt = pyplot()
    metrics = [m for m in metrics if "d_loss" in m]  # leave out the evaluation lines
    x = [m["step"] for m in metrics]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    for key in LOSSES:
        ax.plot(x, [m[key] for m in metrics], label=key, lw=1)
    ax.axhline(math.log(2), color="k", ls="--", lw=0.8, label="-log(0.5)")
    ax.set(ylabel="cross-entropy")
    ax.legend(fontsize=8, ncol=5)
    ax2.plot(x, [m["d_share"] for m in metrics], color="tab:purple", lw=1)
    ax2.set(xlabel="iteration", ylabel="share D trained", ylim=(0, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def write_progress_gif(samples_dir, passes, path, gray=False, most=GIF_FRAMES):
    """progress.gif: the per-pass pictures (same fixed noise) as an animation.

    At most `most` frames, spread evenly over the passes so far (the first and the newest
    always): rewriting it each pass then stays cheap in a 100-pass run.
    """
    from PIL import Image
    shown = range(passes) if passes <= most else sorted({round(i * (passes - 1) / (most - 1)) for i in range(most)})
    pictures = [samples_dir / f"train_pass{p}.png" for p in shown]
    # GIF frames have 256 colours; the fast octree palette is quicker than Pillow's default
    frames = [Image.open(p).convert("L") if gray else
              Image.open(p).convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE)
              for p in pictures if p.exists()]
    if frames:
        with atomic_path(path) as tmp:
            frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=400, loop=0)


# ====================================================================== the run's page

REFRESH_S = 30  # a running run's page reloads itself this often
SAID_ELSEWHERE = ("data_source", "folder", "classes", "passes", "images")  # configuration fields the page shows apart


def write_report(samples_dir, facts, lines, state):
    """<d>_samples/report.html, atomically: the run's configuration and position, its scores
    (the best row marked, with the floor), collapse alarms, plots and every pass's picture,
    newest first. Images are linked relative to the page, nothing is fetched from elsewhere,
    and the run's own text (paths, class names) is escaped. A running run's page reloads
    itself; every page says when it was written, so a killed run's shows its age."""
    path = Path(samples_dir) / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text(report_html(Path(samples_dir), facts, lines, state), encoding="utf-8")
    return path


def report_html(samples, facts, lines, state):
    cfg, speed = facts["config"], facts["options"]["speed"]
    text = lambda v: html.escape(str(v))  # noqa: E731
    number = lambda v: f"{v:.4g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else text(v)  # noqa: E731
    done = facts["pass"] * cfg["iters_per_pass"] + facts["iteration"]
    total = cfg["passes"] * cfg["iters_per_pass"]
    left = facts["elapsed"] / done * (total - done) if done and state == "running" else None
    pictures = sorted((p for p in samples.glob("train_pass*.png") if p.stem[10:].isdigit()), key=lambda p: -int(p.stem[10:]))
    image = lambda p, alt, cls="": (f'<img src="{urllib.parse.quote(p.name)}" alt="{text(alt)}" class="{cls}">'  # noqa: E731
                                    if p.exists() else f'<p class="missing">{text(alt)}: not recorded</p>')
    speed_line = Speed(**speed).describe() if set(speed) == {f.name for f in dataclasses.fields(Speed)} else "not recorded"
    facts_rows = [("state", state), ("updated", time.strftime("%Y-%m-%d %H:%M:%S %Z")),
                  ("position", f"pass {min(facts['pass'] + 1, cfg['passes'])} of {cfg['passes']} "
                               f"({done} of {total} iterations)"),
                  ("time so far", in_hours(facts["elapsed"])), ("time left", in_hours(left) if left else "-"),
                  ("data source", cfg["data_source"] + (f" ({cfg['folder']})" if cfg.get("folder") else "")
                   + (f", {cfg['images']} images" if cfg.get("images") else "")),
                  ("seed", facts["options"]["seed"]), ("speed", speed_line), ("device", speed.get("device", "not recorded")),
                  ("configuration", ", ".join(f"{k} {v}" for k, v in cfg.items() if k not in SAID_ELSEWHERE
                                              and not (k == "ema_kimg" and not cfg.get("ema")) and v != "")),
                  ("classes", ", ".join(cfg.get("classes", ())) or "none (unconditional)")]
    evals = [m for m in lines if isinstance(m.get("eval"), dict)]
    metric = "fid" if len(cfg["sample_shape"]) == 3 else "sliced_w1"
    ranked = [m["eval"].get(metric) for m in evals]
    finite = [(v, k) for k, v in enumerate(ranked) if isinstance(v, (int, float)) and math.isfinite(v)]
    best = min(finite)[1] if finite else None
    keys = list(dict.fromkeys(k for m in evals for k, v in m["eval"].items() if isinstance(v, (int, float))))
    raw = any(isinstance(m.get("eval_raw"), dict) for m in evals)  # --ema: the raw G's score beside the average's
    raw_cell = lambda m: f"<td>{number(m.get('eval_raw', {}).get(metric, ''))}</td>" if raw else ""  # noqa: E731
    score_rows = "".join(
        f'<tr{" class=best" if k == best else ""}><td>{number(m.get("pass"))}{" best" if k == best else ""}</td>'
        f'<td>{number(m.get("step"))}</td>' + "".join(f"<td>{number(m['eval'].get(key, ''))}</td>" for key in keys)
        + raw_cell(m) + "</tr>" for k, m in enumerate(evals))
    floor = next((m["floor"] for m in reversed(evals) if isinstance(m.get("floor"), dict)), None)
    if floor:
        score_rows += "<tr class=floor><td>floor</td><td>real data</td>" + "".join(
            f"<td>{number(floor.get(key, ''))}</td>" for key in keys) + ("<td></td>" if raw else "") + "</tr>"
    heads = [*keys, f"{metric}, raw G"] if raw else keys
    scores = (f"<table><tr><th>pass</th><th>iteration</th>{''.join(f'<th>{text(k)}</th>' for k in heads)}</tr>"
              f"{score_rows}</table>{score_plot(finite, metric, floor)}" if evals
              else "<p class=missing>no scores: the run was not trained with --eval_every K</p>")
    alarms = [(m.get("pass"), m["collapse"]) for m in lines if isinstance(m.get("collapse"), dict)]
    alarm_list = "".join(f"<li>pass {number(p)}: {text(a.get('metric'))} {number(a.get('score'))}, "
                         f"over {COLLAPSE_FACTOR}x the best ({number(a.get('best'))}, pass {number(a.get('best_pass'))})"
                         "</li>" for p, a in alarms)
    newest = image(pictures[0], pictures[0].stem, "newest") if pictures else "<p class=missing>no picture yet</p>"
    refresh = f'<meta http-equiv="refresh" content="{REFRESH_S}">' if state == "running" else ""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">{refresh}
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{text(cfg["data_source"])} run: {text(state)}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 0 auto; padding: 8px 12px; max-width: 1400px; color: #222; }}
h1 {{ font-size: 20px; margin: 4px 0 8px; }} h2 {{ font-size: 16px; margin: 18px 0 6px; }}
.top {{ display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 16px; align-items: start; }}
@media (max-width: 760px) {{ .top {{ grid-template-columns: minmax(0, 1fr); }} }}
svg {{ max-width: 100%; height: auto; }}
.facts {{ table-layout: fixed; width: 100%; }} .facts th {{ text-align: left; vertical-align: top; width: 7.5em; }}
.facts td {{ overflow-wrap: anywhere; }}
img {{ max-width: 100%; height: auto; }} img.newest {{ width: 100%; max-height: calc(100vh - 80px); object-fit: contain; }}
table {{ border-collapse: collapse; }} th, td {{ padding: 2px 6px; border-bottom: 1px solid #ddd; }}
.scores {{ overflow-x: auto; }} .scores td {{ text-align: right; }}
tr.best {{ background: #dff0d8; font-weight: bold; }} tr.floor {{ color: #666; font-style: italic; }}
.state-running {{ color: #0a58ca; }} .state-finished {{ color: #146c43; }} .state-stopped {{ color: #b02a37; }}
.missing {{ color: #888; }} .alarms li {{ color: #b02a37; }}
.passes {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(180px, 1fr)); gap: 8px; }}
figure {{ margin: 0; }} figcaption {{ font-size: 12px; color: #555; }}
</style></head><body>
<h1>{text(cfg["data_source"])} run: <span class="state-{text(state.split()[0].strip(':'))}">{text(state)}</span></h1>
<div class="top"><div><table class="facts">{"".join(f"<tr><th>{text(k)}</th><td>{text(v)}</td></tr>" for k, v in facts_rows)}</table>
<h2>Scores</h2><div class="scores">{scores}</div>
<h2>Collapse alarms</h2>{f'<ul class="alarms">{alarm_list}</ul>' if alarms else "<p>none</p>"}</div>
<figure>{newest}<figcaption>the newest picture{" (averaged G)" if cfg.get("ema") else ""}</figcaption></figure></div>
<h2>Losses and progress</h2>{image(samples / "losses.png", "losses")} {image(samples / "progress.gif", "progress")}
<h2>Every pass, newest first</h2><div class="passes">{"".join(
        f"<figure>{image(p, p.stem)}<figcaption>{text(p.stem)}</figcaption></figure>" for p in pictures)}</div>
</body></html>
"""


def score_plot(points, metric, floor, width=480, height=160):
    """An inline SVG of the ranking score per evaluation (log scale), the floor dashed."""
    if len(points) < 2:
        return ""
    values = [v for v, _ in points] + ([floor[metric]] if floor and isinstance(floor.get(metric), (int, float)) else [])
    low, high = math.log10(max(min(values), 1e-6)), math.log10(max(max(values), 1e-6))
    y = lambda v: height - 10 - (math.log10(max(v, 1e-6)) - low) / ((high - low) or 1) * (height - 20)  # noqa: E731
    x = lambda k: 10 + k / max(1, points[-1][1]) * (width - 20)  # noqa: E731
    line = " ".join(f"{x(k):.1f},{y(v):.1f}" for v, k in points)
    floor_line = (f'<line x1="10" x2="{width - 10}" y1="{y(values[-1]):.1f}" y2="{y(values[-1]):.1f}" '
                  'stroke="#888" stroke-dasharray="4"/>') if len(values) > len(points) else ""
    return (f'<p><svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="{metric} per evaluation"><polyline points="{line}" fill="none" stroke="#0a58ca" '
            f'stroke-width="2"/>{floor_line}</svg><br>{metric} per evaluation (log scale; dashed: the floor)</p>')


def in_hours(seconds):
    seconds = int(seconds or 0)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def held_by_a_live_run(params_dir):
    """Whether a live run holds the folder's lock (without taking it, or writing anything)."""
    try:
        import fcntl
        with open(Path(params_dir) / ".lock") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
    except (ImportError, OSError):
        pass
    return False


# ====================================================================== the console

def write_stdout(line):
    """print(line); a reader that went away (`| head`) silences stdout instead of ending the run."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # later writes, and the flush at exit, go nowhere
        os.close(devnull)


def write_stderr(line):
    try:
        print(line, file=sys.stderr, flush=True)
    except BrokenPipeError:
        pass


class Printer:
    """Log lines on stdout; a tqdm progress bar per pass on a terminal, unless --quiet."""

    def __init__(self, quiet, silent=False):
        """silent: a process of several that is not rank 0, which prints nothing."""
        self.show_bar = sys.stdout.isatty() and not quiet and not silent
        self.bar, self.silent = None, silent

    def __call__(self, *lines):
        if self.silent:
            return
        for line in lines:
            if self.bar is not None:
                self.bar.write(line)
            else:
                write_stdout(line)

    def start_pass(self, pass_id, total, done):
        if self.show_bar:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=done, desc=f"pass {pass_id}", unit="it", leave=False, miniters=1,
                            dynamic_ncols=True)

    def update(self, n=1, **postfix):
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def end_pass(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None




STOP_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s)


class Interrupted(KeyboardInterrupt):
    """A stop signal (Ctrl-C, SIGTERM, SIGHUP) outside the training loop."""


@contextlib.contextmanager
def signals_interrupt():
    """SIGTERM and SIGHUP act as Ctrl-C does: the action in hand ends (main prints one line)."""
    def interrupt(signum, frame):
        raise Interrupted(signal.Signals(signum).name)
    previous = {s: signal.signal(s, interrupt) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class StopRequest:
    """In the training loop, a stop signal sets a flag that the loop checks between iterations
    (it then writes a checkpoint); a second one, a moment later, aborts at once. One that comes
    with the first is the same request: Ctrl-C reaches torchrun's processes from the terminal
    and again from torchrun, which relays it."""
    SAME_REQUEST_S = 1.0

    def __init__(self):
        self.signal, self.when = None, None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in STOP_SIGNALS}
        return self

    def handle(self, signum, frame):
        if self.signal is None:
            self.signal, self.when = signum, time.monotonic()
        elif time.monotonic() - self.when > self.SAME_REQUEST_S:
            raise Interrupted(signal.Signals(signum).name)

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)


# ====================================================================== C. speed
#
# Every class here reproduces EagerStep (or the torch piece it replaces) with fewer launches,
# fewer Python calls or faster kernels; tests/test_step_equivalence.py and
# tests/test_compiled_step.py prove each equal to it, bit for bit or to float rounding.
# What a run uses is decided once, at start-up, as a Speed (printed, stored in checkpoints).

def choose_device(use_gpu, gpu_id, log):
    if use_gpu == "0":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        log("CUDA is not available: running on the CPU")
        return torch.device("cpu")
    if gpu_id >= torch.cuda.device_count():
        raise UserError(f"--gpu_id {gpu_id}: no such GPU (this machine has {torch.cuda.device_count()})")
    torch.cuda.set_device(gpu_id)  # streams and graphs are made on the current device
    return torch.device(f"cuda:{gpu_id}")


@dataclasses.dataclass(frozen=True)
class Speed:
    """How the iterations are computed. None of it changes the mathematics (bf16 changes its
    precision); every field can change the float rounding, so a run resumed with other values
    than it was made with goes on correctly but not bit for bit as an unbroken run would."""
    device: str = "cpu"
    threads: int = 1
    channels_last: bool = False
    bf16: bool = False
    cuda_graphs: bool = False
    compile: bool = False
    processes: int = 1        # torchrun's processes (one GPU each, on GPUs)

    @classmethod
    def decide(cls, args, cfg, device, saved=None, log=print, processes=1):
        """The speed options of a run: the flags given; else, resuming on the same kind of device
        with as many processes, the run's own (so that a plain --resume continues bit for bit);
        else the defaults, the fastest measured (tests/BENCHMARKS.md). bf16 changes precision: a
        run keeps its own."""
        if args.cuda_graphs and device.type != "cuda":
            log("--cuda_graphs 1 needs a GPU: running eagerly")
        if args.compile and device.type != "cpu":
            log("--compile 1 is for the CPU: ignored on a GPU (where --cuda_graphs speeds the step up)")
        if processes > 1 and ((args.compile and device.type == "cpu") or (args.cuda_graphs and device.type == "cuda")):
            log("--compile and --cuda_graphs are off with several processes: each update is a DDP forward "
                "and backward")
        # a run's own options, where they were chosen for the same kind of device and processes
        same = saved is not None and torch.device(saved.device).type == device.type and saved.processes == processes

        def option(flag, name, default):
            return bool(flag) if flag is not None else getattr(saved, name) if same else default

        if device.type != "cpu":
            threads = torch.get_num_threads()
        else:  # 1 for the tiny uniform nets: their ops are too small to share out between threads
            threads = args.threads or (saved.threads if same else 1 if not cfg.is_image else torch.get_num_threads())
        return cls(device=str(device), threads=threads,
                   # the same convolutions summed in another order, faster on the CPU
                   channels_last=cfg.is_image and option(args.channels_last, "channels_last", device.type == "cpu"),
                   bf16=bool(args.bf16) if args.bf16 is not None else bool(saved and saved.bf16),
                   # a graph launches an iteration's couple of hundred small kernels at once
                   cuda_graphs=device.type == "cuda" and processes == 1 and option(args.cuda_graphs, "cuda_graphs", True),
                   # the tiny uniform nets are all per-call overhead; images, convolutions
                   compile=device.type == "cpu" and processes == 1 and option(args.compile, "compile", not cfg.is_image),
                   processes=processes)

    @classmethod
    def from_dict(cls, d, need):
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        need(has_keys(d, fields) and all(type(d[k]) is t for k, t in fields.items()) and d["threads"] >= 1,
             f"options.speed must be {{{', '.join(f'{k}: {t.__name__}' for k, t in fields.items())}}}")
        return cls(**d)

    def describe(self):
        flags = [f"{name.replace('_', '-')} {'on' if value else 'off'}"
                 for name, value in dataclasses.asdict(self).items() if type(value) is bool]
        where = f"{self.processes} processes x " if self.processes > 1 else ""
        return f"{where}{self.device}, {plural(self.threads, 'thread')}, " + ", ".join(flags)

    def differences(self, other):
        return [f"{k} {v} (the run: {getattr(other, k)})" for k, v in dataclasses.asdict(self).items()
                if getattr(other, k) != v]


BF16_SPEEDUP = {  # tests/BENCHMARKS.md: mnist's same-run ratios to fp32 on each kind of CPU
    "amx_bf16": "with AMX: --bf16 1 trains the image nets about 2.2x faster",
    "avx512_bf16": "with AVX512-BF16 (no AMX): --bf16 1 trains the image nets about 1.4x faster",
}


def bf16_hint(run):
    """A line for runs that could take bf16's speed: image nets in fp32 on a CPU with bf16
    arithmetic (AVX512-BF16 or AMX). The default stays the tutorial's fp32."""
    kind = run.speed.device == "cpu" and run.cfg.is_image and not run.speed.bf16 and cpu_computes_bf16()
    if kind:
        return (f"note: this CPU computes bf16 natively {BF16_SPEEDUP[kind]} with the same measured quality "
                "(tests/BENCHMARKS.md); the default is the tutorial's fp32")
    return None


def cpu_computes_bf16(cpuinfo="/proc/cpuinfo"):
    """The CPU's bf16 arithmetic as Linux reports it: "amx_bf16" (AMX's matrix tiles),
    "avx512_bf16" (the vector instructions alone), or None."""
    try:
        flags = set(re.findall(r"\b(avx512_bf16|amx_bf16)\b", Path(cpuinfo).read_text()))
    except OSError:
        return None
    return "amx_bf16" if "amx_bf16" in flags else "avx512_bf16" if flags else None


def apply_to_process(speed):
    """The process-wide settings: torch's CPU threads and glibc's reuse of freed memory."""
    if speed.device == "cpu":
        torch.set_num_threads(speed.threads)
        keep_freed_memory()


def prepare_nets(nets, speed, device):
    """G and D on the device, laid out as the speed options say (the same state dicts); with
    several processes, their batch norms see the global batch."""
    if speed.processes > 1:
        nets = [global_batch_norm(net, torch.device(device)) for net in nets]
    gen, dis = (net.to(device) for net in nets)
    if speed.channels_last:
        gen, dis = gen.to(memory_format=torch.channels_last), dis.to(memory_format=torch.channels_last)
    if speed.bf16 and torch.device(device).type == "cpu":
        use_fast_deconvolutions(gen)
    return gen, dis


def make_autocast(device, bf16):
    if not bf16:
        return contextlib.nullcontext
    # no weight cache: it would not survive CUDA graph replay, and D's weights are cast twice at most
    return lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16, cache_enabled=False)


# ====================================================================== threads and memory

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)


def keep_freed_memory():
    """Have glibc's malloc keep freed memory for reuse; True where the setting took.

    Each iteration frees and allocates the same activation tensors of a few MB. By default
    glibc gives some of them back to the OS and takes them again page by page, thousands of
    page faults per mnist iteration on the CPU. Kept, the memory stays at its peak, which the
    first iterations reach anyway. Does nothing off glibc. (There is no way back: once set,
    glibc's self-adjusting thresholds stay off for the process.)
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # not glibc, or no C library to ask (Windows)
        return False
    # 32 MiB: the documented upper limit of the mmap threshold on 64-bit glibc; bigger blocks
    # (the data set) are made once. Up to 1 GiB of free memory at the heap's top is kept.
    took_mmap = mallopt(M_MMAP_THRESHOLD, 32 << 20)
    took_trim = mallopt(M_TRIM_THRESHOLD, 1 << 30)
    return bool(took_mmap and took_trim)


# ====================================================================== Adam

class Adam(torch.optim.Adam):
    """torch.optim.Adam; with fused=True and its state made, step() calls the fused kernel itself.

    Adam.step()'s per-call Python bookkeeping costs more than the whole update of the tiny
    uniform nets. This runs what Adam's fused path runs, on Adam's own state (state_dict,
    checkpoints and resume are unchanged); tests/test_step_equivalence.py checks it equals
    torch's step() bit for bit. The first step, and anything unusual, take torch's own path.
    """

    def step(self, closure=None):
        group = self.param_groups[0]
        params = group["params"]
        states = [self.state[p] for p in params]
        if (closure is not None or len(self.param_groups) != 1 or not all(states) or group["amsgrad"]
                or not group["fused"] or not hasattr(torch, "_fused_adam_") or not getattr(self, "direct", True)):
            return super().step(closure)
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        try:
            torch._fused_adam_(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                               [s["exp_avg_sq"] for s in states], [], steps, amsgrad=False, lr=group["lr"],
                               beta1=group["betas"][0], beta2=group["betas"][1], weight_decay=group["weight_decay"],
                               eps=group["eps"], maximize=group["maximize"], grad_scale=None, found_inf=None)
        except TypeError:  # a torch whose private kernel takes other arguments: its own step, from now on
            torch._foreach_sub_(steps, 1)
            self.direct = False
            return super().step()

    # torch wraps every optimizer's step() in a profiler record and hook calls, which cost about
    # as much again as this update; marked as wrapped already, this step() is left as it is
    # (optimizer step hooks are not used here)
    step.hooked = True


# ====================================================================== CUDA graphs

class GraphedStep(Iteration):
    """The iteration replayed from CUDA graphs (--cuda_graphs 1, GPU only).

    The nets are small, so an eager iteration keeps the GPU waiting on Python to launch a
    couple of hundred tiny kernels; a graph launches them all in one call. The graphs are
    made of EagerStep's own methods over fixed input buffers: the losses alone, and for each
    net the losses followed by its updates. An iteration replays the losses, reads them,
    chooses, and replays the chosen net's graph, which evaluates D(G(z)) again (the same
    kernels on the same inputs: the same values) and updates. Capturing needs a few warm-up
    updates; parameters and Adam state are put back afterwards, so the run is unchanged.

    The returned Step's logits are the graphs' output buffers: valid until the next call (its
    logged batches are copies). capture=False runs the same functions without graphs (how the
    CPU tests check the logic).
    """

    def __init__(self, gen, dis, opt_g, opt_d, autocast, capture=True):
        self.nets, self.opts, self.capture = (gen, dis), (opt_g, opt_d), capture
        self.eager = EagerStep(gen, dis, opt_g, opt_d, autocast)
        self.x = self.z = self.y = None

    def _build(self, x, z, y=None):
        eager = self.eager
        self.x, self.z = x.clone(), z.clone()  # clone keeps x's memory format
        self.y = None if y is None else y.clone()

        def updates(net):
            def fn():  # D(x) is left out of these losses: no update reads it
                eager.losses(self.x, self.z, self.y, real=False)
                return [eager.update(net, batch, label) for batch, label in UPDATES[net]]
            return fn

        # the graphs read the cached label batches (LABELS is never emptied; held here all the same)
        self.labels = [label_batch(len(x), label, x.device) for label in (REAL, FAKE)]
        saved = [t.detach().clone() for t in self._state()]
        fresh = {id(p) for opt in self.opts for p in opt.param_groups[0]["params"] if not opt.state.get(p)}
        self.graphs, self.outputs = {}, {}
        try:
            for name, fn in (("losses", lambda: eager.losses(self.x, self.z, self.y)),
                             ("dis", updates("dis")), ("gen", updates("gen"))):
                self.graphs[name], self.outputs[name] = capture_graph(fn, self.capture)
        except Exception as e:
            raise UserError(f"capturing CUDA graphs failed ({in_one_line(e)}); run with --cuda_graphs 0")
        finally:
            eager.held = None
            self._put_back(saved, fresh)

    def _put_back(self, saved, fresh):
        """Undo the warm-up updates: the saved tensors back in place (the graphs hold their
        addresses); Adam state they created starts at zero, as a first opt.step() creates it."""
        with torch.no_grad():
            for t, s in zip(self._state(fresh), saved):
                t.copy_(s)
            for opt in self.opts:
                for p in opt.param_groups[0]["params"]:
                    if id(p) in fresh:
                        for t in opt.state[p].values():
                            t.zero_()

    def _state(self, skip=()):
        """Every tensor a warm-up update changes: parameters, buffers, Adam state (not of `skip`)."""
        tensors = [t for net in self.nets for t in net.state_dict().values()]
        for opt in self.opts:
            for p in opt.param_groups[0]["params"]:
                if id(p) not in skip:
                    tensors += [t for t in opt.state[p].values() if torch.is_tensor(t)]
        return tensors

    def losses(self, x, z, y=None):
        if self.x is None:
            self._build(x, z, y)
        self.x.copy_(x)
        self.z.copy_(z)
        if y is not None:
            self.y.copy_(y)
        self.replayed = None
        return self._run("losses")

    def update(self, net, batch, label):
        """The net's first update replays its graph, which makes them all; each is handed out in
        turn, as copies (the next replay overwrites the graph's outputs)."""
        if self.replayed is None:
            self.replayed = iter(self._run(net))
        cost_, logits = next(self.replayed)
        return cost_.clone(), logits.clone()

    def _run(self, name):
        if not self.capture:
            return self.graphs[name]()
        self.graphs[name].replay()
        return self.outputs[name]


def capture_graph(fn, capture=True, warmup=2):
    """A CUDA graph of fn() and its (static) output, after warm-up runs on a side stream;
    capture=False: the warm-up runs only, and (fn, None)."""
    if not capture:
        for _ in range(warmup):
            fn()
        return fn, None
    if hasattr(torch.autograd.graph, "set_warn_on_accumulate_grad_stream_mismatch"):
        # it warns of the side-stream warm-up that capturing asks for; the capture works (seen on an H200)
        torch.autograd.graph.set_warn_on_accumulate_grad_stream_mismatch(False)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


# ====================================================================== the compiled step

# The compiled step rounds differently from the eager one where it fuses operations; on the
# first batch their relative gap, per tensor, stays far below this under every kernel choice
# measured (tests/BENCHMARKS.md), while a miscompiled kernel is off by order one.
COMPILED_GAP_BOUND = 1e-3


def key_the_compile_cache():
    """Give inductor's kernel cache a folder per torch version, CPU and kernel choice (unless
    TORCHINDUCTOR_CACHE_DIR says where): its own keys leave out ATEN_CPU_CAPABILITY and
    ONEDNN_MAX_CPU_ISA, so a cache made under other choices, or shared by machines of another
    kind, would hand back kernels built for them."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    try:
        cpu = [line for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith(("model name", "flags"))][:2]
    except OSError:
        cpu = []
    key = "|".join([torch.__version__, *cpu] + [f"{v}={os.environ.get(v, '')}" for v in
                                                ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")])
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        default_cache_dir(), "gan_trainer-" + hashlib.sha256(key.encode()).hexdigest()[:16])


def pytree_tensors(out):
    """The tensors in a nest of tuples, lists and dicts, in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    return [t for item in items for t in pytree_tensors(item)]


class CompiledStep(Iteration):
    """The iteration as two torch.compile'd functions (--compile 1, the CPU's default for uniform).

    The uniform nets are so small that an eager iteration is nearly all per-call overhead:
    about a hundred operator calls and autograd nodes. Compiled, one call evaluates the losses
    and, at the same parameters, the gradients of both updates on the generated batch the choice
    may pick: G's from g_loss and D's from d_neg_loss (the gradient left unused costs less than
    a second call would). The chosen net's gradients go to its Adam; D's update on the real
    batch, which comes after its first update, is the second compiled function. The arithmetic
    is EagerStep's, rounded differently where the compiler fuses operations.

    The first call compiles (seconds) and checks the compiled functions against the eager
    ones on its batch; if compiling fails (no C++ compiler, an older torch) or the check does,
    the run goes on with EagerStep after a note.
    """

    def __init__(self, gen, dis, opt_g, opt_d, autocast, log=print):
        self.opts, self.log = {"gen": opt_g, "dis": opt_d}, log
        self.eager = EagerStep(gen, dis, opt_g, opt_d, autocast)
        self.ready, self.losses_and_grads, self.dis_on_real = False, None, None  # compiled by the first call
        params = {net: opt.param_groups[0]["params"] for net, opt in self.opts.items()}

        def losses_and_grads(x, z, y):
            losses = compute_losses(gen, dis, x, z, autocast, y)
            grads = {"gen": torch.autograd.grad(losses.g_loss, params["gen"], retain_graph=True),
                     "dis": torch.autograd.grad(losses.d_neg_loss, params["dis"])}
            values = torch.stack([losses.d_pos_loss, losses.d_neg_loss, losses.g_loss]).detach()
            return values, losses.real_logits, losses.fake_logits.detach(), grads

        def dis_on_real(x, y):
            real_cost, logits = cost_on_real(dis, x, autocast, y)
            return real_cost.detach(), logits.detach(), torch.autograd.grad(real_cost, params["dis"])

        self.functions = losses_and_grads, dis_on_real

    def losses(self, x, z, y=None):
        if not self.ready:
            self._compile(x, z, y)
        if self.losses_and_grads is None:
            return self.eager.losses(x, z, y)
        values, real_logits, fake_logits, grads = self.losses_and_grads(x, z, y)
        self.held = x, y, values, fake_logits, grads
        return Losses(values[0], values[1], values[2], real_logits, fake_logits)

    def update(self, net, batch, label):
        if self.losses_and_grads is None:
            return self.eager.update(net, batch, label)
        x, y, values, fake_logits, grads = self.held
        if batch == "fake":  # its gradient came with the losses: D's of d_neg_loss, G's of g_loss
            batch_cost, logits, net_grads = values[1] if label == FAKE else values[2], fake_logits, grads[net]
        else:
            batch_cost, logits, net_grads = self.dis_on_real(x, y)
        opt = self.opts[net]
        for p, g in zip(opt.param_groups[0]["params"], net_grads):
            p.grad = g
        opt.step()
        return batch_cost, logits

    def _compile(self, x, z, y):
        """Compile both functions on the first batch (their calls change nothing), or fall back."""
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found"
        for label in (REAL, FAKE):
            label_batch(len(x), label, x.device)
        started = time.time()
        key_the_compile_cache()
        try:
            import torch._dynamo
            torch._dynamo.config.trace_autograd_ops = True  # torch.autograd.grad inside the graph (torch 2.14)
            self.losses_and_grads, self.dis_on_real = (torch.compile(f, fullgraph=True, dynamic=False)
                                                       for f in self.functions)
            self.gap = self.compiled_gap(x, z, y)
            self.log(f"compiled the training step in {time.time() - started:.1f} s "
                     "(torch.compile; --compile 0 runs it eagerly)")
            if self.gap > COMPILED_GAP_BOUND:
                self.log(f"note: the compiled step differs from the eager one by {self.gap:.2g} on the first batch "
                         f"(float rounding stays below {COMPILED_GAP_BOUND:g}): a wrong or stale compiled kernel "
                         f"(cache {os.environ.get('TORCHINDUCTOR_CACHE_DIR', '?')}); running eagerly, as --compile 0 does")
                self.losses_and_grads = None
        except Exception as e:
            self.log(f"torch.compile failed ({in_one_line(e)}); running eagerly, as --compile 0 does")
            self.losses_and_grads = None
        self.ready = True

    def compiled_gap(self, x, z, y):
        """The largest relative gap between what the compiled functions and the eager ones compute
        on this batch (the losses, D's logits, each net's gradient): a compiled kernel that is
        wrong, or stale from a cache made under other kernel choices, shows here at once."""
        def flat(out):  # a net's gradients as one vector: a bias feeding a batch norm has a gradient of round-off
            groups = [g for item in out for g in (item.values() if isinstance(item, dict) else [item])]
            return [torch.cat([t.detach().double().flatten() for t in pytree_tensors(g)]) for g in groups]
        gap = 0.0
        for compiled, eager, inputs in ((self.losses_and_grads, self.functions[0], (x, z, y)),
                                        (self.dis_on_real, self.functions[1], (x, y))):
            for a, b in zip(flat(compiled(*inputs)), flat(eager(*inputs))):
                gap = max(gap, ((a - b).norm() / b.norm().clamp(min=1e-12)).item())
        return gap


# ====================================================================== the bf16 transposed convolution

def use_fast_deconvolutions(net):
    """Make the net's transposed convolutions FastConvTranspose2d: the same modules, parameters
    and state dict, with a faster forward where it applies."""
    for m in net.modules():
        if type(m) is nn.ConvTranspose2d:
            m.__class__ = FastConvTranspose2d


class FastConvTranspose2d(nn.ConvTranspose2d):
    """nn.ConvTranspose2d, with one faster case: under bf16 autocast on the CPU, a layer whose
    kernel covers its whole input map (the first of mnist, 3 x 3 -> 7 x 7 with kernel 5, and
    of cifar) computes its forward as what a transposed convolution is, the input gradient of
    the convolution with the same weight, for which oneDNN has a much faster kernel at this
    shape (tests/BENCHMARKS.md). Everything else is nn's."""

    def forward(self, x, output_size=None):
        if (output_size is None and x.dim() == 4 and x.device.type == "cpu"
                and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
                and all(k >= n for k, n in zip(self.kernel_size, x.shape[2:]))):
            with torch.autocast("cpu", enabled=False):  # the casts autocast would make, made here
                bias = None if self.bias is None else self.bias.bfloat16()
                return AdjointConvTranspose.apply(x.bfloat16(), self.weight.bfloat16(), bias, self)
        return super().forward(x, output_size)


class AdjointConvTranspose(torch.autograd.Function):
    """conv_transpose2d(x, weight, bias) for a ConvTranspose2d m, its forward computed as a
    convolution's input gradient; the backward is the transposed convolution's own."""

    @staticmethod
    def forward(ctx, x, weight, bias, m):
        ctx.save_for_backward(x, weight)
        ctx.m = m
        size = [(n - 1) * s - 2 * p + d * (k - 1) + op + 1
                for n, s, p, d, k, op in zip(x.shape[2:], m.stride, m.padding, m.dilation, m.kernel_size, m.output_padding)]
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        like = torch.empty((len(x), m.out_channels, *size), dtype=x.dtype, device=x.device,
                           memory_format=fmt)  # only its shape and layout count
        y = torch.ops.aten.convolution_backward(x, like, weight, None, m.stride, m.padding, m.dilation,
                                                False, [0, 0], m.groups, [True, False, False])[0]
        return y if bias is None else y + bias.view(1, -1, 1, 1)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        m = ctx.m
        bias_sizes = [m.out_channels] if ctx.needs_input_grad[2] else None
        grads = torch.ops.aten.convolution_backward(grad, x, weight, bias_sizes, m.stride, m.padding, m.dilation,
                                                    True, m.output_padding, m.groups, ctx.needs_input_grad[:3])
        return *grads, None


# ====================================================================== D. several processes (torchrun)
#
# torchrun starts one process per GPU (or several on a CPU); together they train one run with
# the single process's mathematics: each takes its slice of the global batch's rows and noise,
# batch norm sees the whole global batch, the losses behind the choice are averaged over the
# ranks, and DistributedDataParallel averages each update's gradients. Rank 0 alone writes.

@dataclasses.dataclass(frozen=True)
class Processes:
    """This process's place among the processes torchrun started: rank `rank` of `world`.
    Outside torchrun, the one process: rank 0 of 1, and every exchange a no-op."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    launched: bool = False  # a process group exists

    @property
    def writes(self):
        """Rank 0, the one process that writes and prints."""
        return self.rank == 0

    def rows(self, n):
        """This rank's rows of a global batch of n, which must divide evenly over the ranks."""
        if n % self.world:
            raise UserError(f"the global batch of {n} (--batch_size) must divide evenly over the "
                            f"{self.world} processes")
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def average(self, t):
        if not self.launched:
            return t
        t = t.detach().clone()
        dist.all_reduce(t)
        return t / self.world

    def gather(self, t):
        """The ranks' tensors, one after another in rank order: the global batch's."""
        if not self.launched:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.detach().contiguous())
        return torch.cat(parts)

    def any(self, flag, device):
        """Whether any rank says so: every rank then acts alike (a stop signal, say)."""
        if not self.launched:
            return flag
        t = torch.tensor([int(flag)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def first_on_each_machine(self, work):
        """work() in each machine's first process (local rank 0), then in the others."""
        if not self.launched:
            return work()
        if self.local_rank == 0:
            result = work()
            dist.barrier()
            return result
        dist.barrier()
        return work()

    def broadcast(self, value, device):
        """Rank 0's integer, on every rank."""
        if not self.launched:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.broadcast(t, 0)
        return int(t.item())


def join_processes(use_gpu):
    """This run's Processes: under torchrun (RANK and WORLD_SIZE set), this process joins the
    group, nccl on GPUs (one per local rank), gloo on the CPU; else the one process."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Processes()
    import datetime
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    gpu = use_gpu == "1" and torch.cuda.is_available()
    if gpu:
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group("nccl" if gpu else "gloo", timeout=datetime.timedelta(minutes=30))
    except Exception as e:
        raise UserError(f"rank {rank}: cannot join torchrun's process group ({in_one_line(e)})")
    return Processes(rank, world, local_rank, True)


def leave_processes(procs, done=False):
    """Leave the process group: after a run, once every rank is done (one that is still
    writing rank 0's files is not cut off); after an error, at once."""
    import gc
    if procs.launched and dist.is_initialized():
        with contextlib.suppress(Exception):
            if done:
                dist.barrier()
            gc.collect()  # the DDP wrappers (held in reference cycles) go before their process group
            dist.destroy_process_group()


class AllReduceSum(torch.autograd.Function):
    """The sum of a tensor over the ranks; its gradient is the sum of the ranks' gradients
    (torch.distributed.nn.functional.all_reduce, which does the same, is deprecated, and what
    replaces it is private)."""

    @staticmethod
    def forward(ctx, t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm:
    """Batch norm over the global batch, on the CPU, where nn.SyncBatchNorm does not run: the
    ranks' sums are added up (the mean first, then the squares about it, as the single process
    computes the variance), so every rank normalises with the single process's statistics.
    Mixed into the BatchNorm class it replaces: the same parameters and state dict. Only in
    training mode; in eval mode (pictures, scores, on rank 0 alone) it is the plain batch norm,
    which our nets' batch norms are in either mode (they keep no running statistics)."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
        n = x.numel() // x.shape[1] * dist.get_world_size()
        x = at_least_float32(x)  # the statistics in float32 at least, as torch's batch norm keeps them
        mean = AllReduceSum.apply(x.sum(dims)) / n
        centred = x - mean.view(shape)
        var = AllReduceSum.apply((centred * centred).sum(dims)) / n
        return centred / torch.sqrt(var.view(shape) + self.eps) * self.weight.view(shape) + self.bias.view(shape)


class GlobalBatchNorm1d(GlobalBatchNorm, nn.BatchNorm1d):
    pass


class GlobalBatchNorm2d(GlobalBatchNorm, nn.BatchNorm2d):
    pass


def global_batch_norm(net, device):
    """The net with batch norms over the global batch: nn.SyncBatchNorm on GPUs, GlobalBatchNorm
    on the CPU (the same parameters)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(net)
    for m in net.modules():
        if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d):
            m.__class__ = GlobalBatchNorm1d if type(m) is nn.BatchNorm1d else GlobalBatchNorm2d
    return net


class DistributedStep(Iteration):
    """The iteration on several processes: this rank's slice of the batch, G and D each wrapped
    in DistributedDataParallel, so that every update averages the ranks' gradients: the
    gradient of the global batch's mean cost. The losses behind the choice are the ranks'
    average, so every rank trains the same net. Each update has its own forward, the tutorial's
    way, as DDP needs a forward through the wrapped net before each backward; the losses and
    the logged batches hold the global batch's logits."""

    def __init__(self, gen, dis, opt_g, opt_d, autocast, device, procs):
        from torch.nn.parallel import DistributedDataParallel
        ids = {"device_ids": [device.index]} if device.type == "cuda" else {}
        self.gen, self.dis, self.autocast, self.procs = gen, dis, autocast, procs
        self.opts = {"gen": opt_g, "dis": opt_d}
        self.gen_ddp = DistributedDataParallel(gen, **ids)
        self.dis_ddp = DistributedDataParallel(dis, **ids)

    def losses(self, x, z, y=None):
        self.held = x, z, y
        with torch.no_grad(), self.autocast():  # this rank's share
            real_logits, fake_logits = self.dis(x, y), self.dis(self.gen(z, y), y)
            local = torch.stack([cost(real_logits, REAL), cost(fake_logits, FAKE), cost(fake_logits, REAL)])
        return Losses(*self.procs.average(local), self.procs.gather(real_logits), self.procs.gather(fake_logits))

    def update(self, net, batch, label):
        x, z, y = self.held
        with self.autocast():
            if net == "gen":
                logits = self.dis(self.gen_ddp(z, y), y)
            else:
                with torch.no_grad():
                    images = self.gen(z, y) if batch == "fake" else x
                logits = self.dis_ddp(images, y)
        batch_cost, opt = cost(logits, label), self.opts[net]
        opt.zero_grad()
        batch_cost.backward(inputs=opt.param_groups[0]["params"])  # this net's gradients only; DDP averages them
        opt.step()
        return self.procs.average(batch_cost), self.procs.gather(logits)


# ====================================================================== E. applying G
#
# What a trained generator is for: samples (--generate), and scores of how good they are
# (--evaluate, --eval_every) against the real data, with the floor real data itself reaches.

def load_generator(args, device):
    params_dir = output_dirs(args.out_dir, args.data_source, make=False)[1]
    if args.params == "best":
        args.params = params_dir / BEST_CHECKPOINT
        if not args.params.exists():
            raise UserError(f"no best checkpoint ({args.params}): a run keeps one when it trains with --eval_every K")
    ckpt = load_checkpoint(args.params or params_dir, args.data_source)
    cfg = check_config(ckpt["config"])
    if args.ema and not cfg.ema:
        raise UserError(f"--ema 1: {ckpt['path']} holds no averaged G (its run trained without --ema 1)")
    averaged = cfg.ema and args.ema != 0
    gen, _ = build_nets(cfg)
    gen.load_state_dict(ckpt["generator_ema" if averaged else "generator"])
    return cfg, gen.to(device), ckpt["path"], " (the averaged G; --ema 0 takes the raw one)" if averaged else ""


def output_stem(output, default):
    """FILE of --output FILE (FILE.npy and FILE.png are written); a folder is refused."""
    out = Path(output or default)
    if out.suffix in (".npy", ".png"):
        out = out.with_suffix("")
    if out.name in ("", ".", "..") or out.is_dir():
        raise UserError(f"--output {output} is a folder: give a file name, such as {out / 'generated'} "
                        "(FILE.npy and FILE.png are written)")
    return out


def generate(args):
    """The tutorial's last step: noise through the trained G; writes FILE.npy and FILE.png
    (conditional: FILE.labels.npy too, the class asked for of each sample)."""
    device = choose_device(args.use_gpu, args.gpu_id, write_stdout)
    out = output_stem(args.output, output_dirs(args.out_dir, args.data_source, make=False)[0] / "generated")
    npy, png = out.with_name(out.name + ".npy"), out.with_name(out.name + ".png")
    if png.exists() and re.fullmatch(r"train_pass\d+|losses", out.name):
        raise UserError(f"--output {args.output}: {png} is a training run's picture; give another name")
    cfg, gen, path, which = load_generator(args, device)
    if args.label is not None and not cfg.conditional:
        raise UserError("--label applies to a conditional generator (trained with --conditional 1)")
    label = None if args.label is None else class_index(args.label, cfg.classes)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    samples, labels = sample_generator(gen, cfg, torch.randn(args.generate, cfg.noise_dim, device=device), label)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot make the folder {out.parent}: {e.strerror or e}")
    save_array(samples.cpu().numpy().astype(np.float32), npy)
    if labels is not None:
        save_array(labels.numpy(), out.with_name(out.name + ".labels.npy"))
    columns = len(cfg.classes) if labels is not None and args.label is None else 8  # cycling: a column a class
    save_samples(samples, png, f"{plural(args.generate, 'sample')} from {path.name}" + (" (averaged G)" if which else ""),
                 columns)
    write_stdout(f"wrote {plural(args.generate, 'sample')} of shape {tuple(samples.shape[1:])} from {path}{which} to {npy} and {png}"
                 + ("" if labels is None else f" (labels in {out.name}.labels.npy)"))


def save_array(array, path):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def sample_generator(gen, cfg, noise, label=None, generator=None):
    """(samples, classes) of G for noise, as --generate writes them (images clamped to [-1, 1]):
    a conditional G draws all of class `label` (an index), else the classes in turn."""
    labels = None
    if cfg.conditional:
        labels = torch.arange(len(noise)) % len(cfg.classes) if label is None else torch.full((len(noise),), label)
    samples = generate_samples(gen, noise, cfg.batch_size, generator, labels)
    return (samples.clamp(-1, 1) if cfg.is_image else samples), labels


def class_index(label, classes, log=write_stdout):
    """The class --label K names: a class name, else an index (ASCII digits: str.isdigit() also
    takes characters such as '²' that int() refuses). A name wins; where K is also the index of
    another class, one line says which was taken."""
    as_index = int(label) if re.fullmatch(r"[0-9]{1,18}", label) and int(label) < len(classes) else None
    if label in classes:
        index = classes.index(label)
        if as_index is not None and as_index != index:
            log(f"--label {shown(label)}: the class named '{shown(label)}' (index {index}), not the class at index "
                f"{as_index} ('{shown(classes[as_index])}')")
        return index
    if as_index is None:
        raise UserError(f"--label {label}: not a class of this generator: 0-{len(classes) - 1} or "
                        f"{', '.join(classes[:12])}{', ...' if len(classes) > 12 else ''}")
    return as_index


def report(args):
    """--report: <d>_samples/report.html rebuilt from a run's newest checkpoint, metrics.jsonl and
    pictures (for runs made before the page existed, or to see a stopped run's); writes nothing else."""
    samples, params = output_dirs(args.out_dir, args.data_source, make=False)
    if held_by_a_live_run(params):
        raise UserError(f"--report: a live run holds {params}; it rewrites {samples / 'report.html'} after each pass")
    if not list_checkpoints(params):
        raise UserError(f"--report: no checkpoint (pass_<N>.pt) in {params}: no run to report on there")
    ckpt = load_checkpoint(params, args.data_source)
    lines = metrics_until(params / "metrics.jsonl", ckpt, write_stdout)
    done, at = resume_position(ckpt)
    state = "finished" if done >= ckpt["config"]["passes"] else f"not running (stopped at pass {done} iteration {at})"
    write_stdout(f"wrote {write_report(samples, ckpt, lines, state)} ({state})")


def evaluate(args):
    """Score a trained generator offline, or with FILE (--evaluate FILE.npy) the samples in it
    (see the README for what each figure means)."""
    if args.evaluate:
        return evaluate_file(Path(args.evaluate), args)
    device = choose_device(args.use_gpu, args.gpu_id, write_stdout)
    cfg, gen, path, which = load_generator(args, device)
    data_dir = args.data_dir or cfg.folder or "data"
    check_evaluable(cfg.data_source, data_dir)
    evaluator = Evaluator(cfg, data_dir, None, write_stdout)
    torch.manual_seed(args.seed if args.seed is not None else 0)
    # the noise --generate draws: --generate N --seed S writes these very samples
    scores = evaluator.score_draws(gen, cfg, args.samples, lambda n: torch.randn(n, cfg.noise_dim, device=device))
    write_stdout(f"{path}{which}: {plural(args.samples, 'sample')}: {format_scores(scores)}")
    evaluator.floor(args.samples)


def evaluate_file(path, args):
    """--evaluate FILE.npy: the scores of samples shaped as --generate writes them (from this
    trainer or any other tool), with the classes of FILE.labels.npy where it exists."""
    samples = read_samples(path)
    if args.data_source == "folder" and not args.data_dir:
        raise UserError(f"-d folder --evaluate {path} needs --data_dir: the folder of images to compare with")
    data_dir = args.data_dir or "data"
    cfg = samples_config(args.data_source, samples, path)
    labels = read_sample_labels(path, len(samples))
    check_evaluable(cfg.data_source, data_dir)
    evaluator = Evaluator(cfg, data_dir, None, write_stdout)
    low, high = (None, None) if labels is None else (labels.min().item(), labels.max().item())
    if labels is not None and not (0 <= low and high < len(evaluator.classes)):
        raise UserError(f"{labels_path(path)}: classes {low} to {high}, but the evaluation features "
                        f"read {plural(len(evaluator.classes), 'class')}" +
                        ("" if evaluator.classes else f" ({cfg.data_source} here has no classes)"))
    write_stdout(f"{path}: {plural(len(samples), 'sample')}: {format_scores(evaluator.score(samples, labels))}")
    evaluator.floor(len(samples))


def read_samples(path):
    """The array in FILE.npy as float32, checked to hold finite numbers."""
    array = load_one_array(path, f"--evaluate {path}")
    if array.dtype.kind != "f":
        raise UserError(f"--evaluate {path}: values of type {array.dtype}; expected float32 (images in [-1, 1]), "
                        "as --generate writes them")
    if not np.isfinite(array).all():
        raise UserError(f"--evaluate {path}: it holds NaN or infinite values")
    return torch.from_numpy(array.astype(np.float32))


def load_one_array(path, about):
    """The array of a .npy file, never unpickled (an array of Python objects could run code)."""
    try:
        with open_regular_file(path) as f:
            array = np.load(f, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        why = ("it has no .npy header (numpy would unpickle it, which could run code)" if "pickled" in str(e) else
               "an array of Python objects, which could run code" if "Object arrays" in str(e) else in_one_line(e, most=100))
        raise UserError(f"{about}: not read as a .npy array of numbers as --generate writes: {why}")
    if not isinstance(array, np.ndarray):
        array.close()
        raise UserError(f"{about}: a zip archive (an .npz of arrays, or a checkpoint, which --evaluate --params "
                        "FILE scores), not one .npy array as --generate writes")
    return array


def samples_config(data_source, samples, path):
    """The configuration samples are scored under: the data source's (a folder's at the samples'
    size and channels), once their shape and range are checked."""
    cfg, shape = CONFIGS[data_source], tuple(samples.shape)
    if data_source == "folder":
        fits = len(shape) == 4 and shape[1] in (1, 3) and shape[2] == shape[3] >= 8
        cfg = dataclasses.replace(cfg, sample_shape=shape[1:]) if fits else None
        expected = "(n, C, S, S), C 1 or 3, S at least 8"
    else:
        fits = shape[1:] == cfg.sample_shape
        expected = f"(n, {', '.join(map(str, cfg.sample_shape))})"
    if not fits or shape[0] < 2:
        raise UserError(f"--evaluate {path}: samples of shape {shape}; -d {data_source} scores {expected} with n at "
                        "least 2, as --generate writes them")
    if cfg.is_image and not (samples.min() >= -1 and samples.max() <= 1):
        raise UserError(f"--evaluate {path}: values from {samples.min():.4g} to {samples.max():.4g}; images are "
                        "scored in [-1, 1], as --generate writes them")
    return cfg


def labels_path(path):
    """FILE.labels.npy beside FILE.npy (as --generate writes them)."""
    return path.with_name((path.name[:-4] if path.suffix == ".npy" else path.name) + ".labels.npy")


def read_sample_labels(path, n):
    """The classes of FILE.labels.npy (the class each sample was asked for), or None without one."""
    found = labels_path(path)
    if not found.exists():
        return None
    labels = load_one_array(found, str(found))
    if labels.dtype.kind not in "iu" or labels.shape != (n,):
        raise UserError(f"{found}: {labels.dtype} of shape {labels.shape}; "
                        f"expected {n} integer classes, one per sample of {path.name}")
    return torch.from_numpy(labels.astype(np.int64))


def check_evaluable(data_source, data_dir):
    """Refuse early what evaluating could not finish: MNIST files it would need later (CIFAR-10
    and a folder are read, and checked, before any evaluation features are trained)."""
    if data_source == "mnist":
        needed = ["train-images-idx3-ubyte", "t10k-images-idx3-ubyte"]
        if not (Path(data_dir) / "mnist_classifier.pt").exists():  # the classifier is trained first
            needed += ["train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"]
        for name in needed:
            find_mnist_file(data_dir, name)


MOST_REAL = 10000  # real images behind the reference features and behind `memorised`


class Evaluator:
    """Scores generated samples against the real data; holds what is computed once: the
    evaluation features (mnist: the digit classifier; cifar and a folder: a net trained on
    them, see load_feature_net), the real images' features and neighbourhoods, the floor."""

    @torch.random.fork_rng()  # building its nets must not move the training's random stream (resume)
    def __init__(self, cfg, data_dir, data=None, log=print):
        """data: mnist's training images where the caller holds them (read here otherwise);
        CIFAR-10 and a folder are read here, for their labels and class subfolders."""
        self.cfg, self.log, self.classes, self.floors = cfg, log, (), {}
        if cfg.data_source == "uniform":
            return
        if cfg.data_source == "mnist":
            images = (torch.from_numpy(load_mnist(data_dir).copy()) if data is None else data).cpu()
            self.net, self.classes = load_digit_classifier(data_dir, log), tuple("0123456789")
            self.reference, _ = self.features(to_unit_range(torch.from_numpy(load_mnist(data_dir, "test").copy())))
            self.floor_images = images[-MOST_REAL:]  # not among the training images `memorised` compares with
        else:
            real = feature_data(cfg, data_dir)
            self.net, self.classes, images = load_feature_net(real, log), real.classes, real.training_images
            self.reference, _ = self.features(to_unit_range(images[:MOST_REAL]))
            self.floor_images = real.held_out
        self.memory = memory_view(images[:MOST_REAL])
        self.typical_nn = typical_nearest_distance(images)
        self.radii = nearest_neighbour_radii(self.reference)

    @torch.no_grad()
    def features(self, images):
        """The evaluation features of images, and the classes their head reads (None for
        features without classes)."""
        feats, read = [], []
        for chunk in images.split(500):
            f = self.net.features(chunk.float().cpu())
            feats.append(f)
            if self.classes:
                read.append(self.net.head(f).argmax(1))
        return torch.cat(feats), torch.cat(read) if read else None

    def score(self, samples, labels=None):
        """The scores of samples; with the classes they were asked for, label_accuracy too:
        the share the evaluation features read as that class."""
        if self.cfg.data_source == "uniform":
            reference = torch.rand(len(samples), 2, generator=torch.Generator().manual_seed(1))
            return uniform_scores(samples.cpu(), reference)
        feats, read = self.features(samples)
        scores = {"fid": frechet_distance(feats, self.reference),
                  "kid": kernel_inception_distance(feats, self.reference),
                  **density_coverage(self.reference, feats, self.radii)}
        if read is not None:
            scores.update(class_histogram_scores(read, len(self.classes)))
        scores["memorised"] = memorisation_share(memory_view(samples), self.memory, self.typical_nn)
        if read is not None and labels is not None:
            scores.update(label_scores(read, labels.cpu(), len(self.classes)))
        return scores

    def score_generator(self, run, gen, n):
        """The scores of n samples of a run's G (gen: the raw or the averaged one), drawn with a
        generator of their own, the same noise for both: evaluating leaves the training's random
        stream untouched."""
        rng = torch.Generator().manual_seed(run.seed + run.pass_id)
        return self.score_draws(gen, run.cfg, n, lambda k: torch.randn(k, run.cfg.noise_dim, generator=rng)
                                .to(run.device), rng)

    def score_draws(self, gen, cfg, n, noise, generator=None):
        """The scores of n samples of G for noise(n) (a conditional G: the classes cycling, as
        --generate draws them); for a conditional G, label_accuracy too, of n / classes more
        samples of each class, drawn as --generate --label K draws them."""
        samples, labels = sample_generator(gen, cfg, noise(n), generator=generator)
        scores = self.score(samples)
        if labels is not None:
            scores.update(self.label_accuracy(gen, cfg, n, noise, generator))
        return scores

    def label_accuracy(self, gen, cfg, n, noise, generator):
        if self.classes != cfg.classes:
            self.log(f"note: label_accuracy is not scored: the generator's classes ({', '.join(cfg.classes[:5])}, ...) "
                     "are not those of the evaluation features")
            return {}
        per_class, read, asked = max(1, n // len(cfg.classes)), [], []
        for k in range(len(cfg.classes)):
            samples, labels = sample_generator(gen, cfg, noise(per_class), k, generator)
            read.append(self.features(samples)[1])
            asked.append(labels)
        return label_scores(torch.cat(read), torch.cat(asked), len(cfg.classes))

    def floor(self, n):
        """The same scores for n real images (at most as many as there are): cifar's test batch,
        or the share of CIFAR-10 or a folder held out from the feature net; mnist: the last
        training images, against the test set's features. What a perfect generator would score.
        Computed once for each n, and said once."""
        if n not in self.floors:
            if self.cfg.data_source == "uniform":
                self.floors[n] = self.score(torch.rand(n, 2, generator=torch.Generator().manual_seed(2)))
            else:
                self.floors[n] = self.score(to_unit_range(self.floor_images[-n:]))
            self.log(f"real data (floor): {format_scores(self.floors[n])}")
        return self.floors[n]


def format_scores(scores):
    """name=value pairs; the lists (shares per class) are left to metrics.jsonl."""
    return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in scores.items() if not isinstance(v, list))


def sliced_wasserstein(a, b, projections=256, seed=0):
    """Sliced Wasserstein-1 distance between two equal-size 2-D point sets."""
    g = torch.Generator().manual_seed(seed)
    theta = torch.rand(projections, generator=g, dtype=torch.float64) * math.pi
    dirs = torch.stack([theta.cos(), theta.sin()], 1)
    # one row per direction: sorting along rows is several times faster than down columns
    pa, pb = (dirs @ a.double().T).sort(1).values, (dirs @ b.double().T).sort(1).values
    return (pa - pb).abs().mean().item()


def uniform_scores(points, reference):
    """How well 2-D points match U[0,1)^2: share inside, 10x10 cells covered, sliced W1."""
    pts = points.double()
    inside = ((pts >= 0) & (pts < 1)).all(1)
    cells = (pts[inside].clamp(0, 0.999999) * 10).long()
    counts = torch.bincount(cells[:, 0] * 10 + cells[:, 1], minlength=100)
    expected = len(pts) / 100
    return {"inside": inside.double().mean().item(),
            "cells_covered": (counts >= expected / 2).double().mean().item(),
            "sliced_w1": sliced_wasserstein(pts, reference.double())}


def frechet_distance(f1, f2):
    """Frechet distance between Gaussians fitted to two feature sets (rows = samples)."""
    f1, f2 = f1.double(), f2.double()
    mu1, mu2 = f1.mean(0), f2.mean(0)
    c1, c2 = torch.cov(f1.T), torch.cov(f2.T)
    # trace sqrt(c1 c2) = sum of sqrt of the eigenvalues of sqrt(c1) c2 sqrt(c1) (symmetric, PSD).
    e1, v1 = torch.linalg.eigh(c1)
    s1 = (v1 * e1.clamp(min=0).sqrt()) @ v1.T
    tr_sqrt = torch.linalg.eigvalsh(s1 @ c2 @ s1).clamp(min=0).sqrt().sum()
    return max(0.0, ((mu1 - mu2).square().sum() + c1.trace() + c2.trace() - 2 * tr_sqrt).item())  # not -1e-12


def class_histogram_scores(predicted, classes=10):
    """Mode coverage of predicted classes: shares, classes with at least a fifth of a uniform
    share (2% of ten), KL from uniform."""
    share = torch.bincount(predicted, minlength=classes).double() / len(predicted)
    nz = share[share > 0]
    return {"classes_covered": int((share >= 0.2 / classes).sum()),
            "max_class_share": share.max().item(),
            "kl_from_uniform": (nz * (nz * classes).log()).sum().item(),
            "class_shares": [round(v, 4) for v in share.tolist()]}


def memorisation_share(generated, train, typical):
    """Share of generated images whose nearest training image is closer than `typical`.

    cdist finds the nearest image through a matrix product, whose round-off (larger on some
    CPUs) would make an exact copy look a little apart; the distance to the one found is then
    computed directly, so a copy is at distance 0 on every machine.
    """
    g, t = generated.flatten(1).float(), train.flatten(1).float()
    nearest = torch.cat([torch.cdist(chunk, t).argmin(1) for chunk in g.split(256)])
    distance = (g - t[nearest]).norm(dim=1)
    return (distance < typical).double().mean().item()


def kernel_inception_distance(f1, f2, subset_size=1000, seed=0):
    """KID (Binkowski et al. 2018): the unbiased estimate of the squared MMD between two feature
    sets under the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random
    subsets of subset_size rows of each, as many as draw each row of the larger set about once
    (at most 100; one, all rows, where both sets are that small). Unbiased at any size (near 0,
    either side, for two samples of one distribution), and cheap for 10,000 samples."""
    m = min(subset_size, len(f1), len(f2))
    subsets = min(100, math.ceil(max(len(f1), len(f2)) / m))
    rng, d, total = torch.Generator().manual_seed(seed), f1.shape[1], 0.0
    for _ in range(subsets):
        x = f1[torch.randperm(len(f1), generator=rng)[:m]].float()
        y = f2[torch.randperm(len(f2), generator=rng)[:m]].float()
        kxx, kyy, kxy = ((a @ b.T).div_(d).add_(1).pow_(3) for a, b in ((x, x), (y, y), (x, y)))
        within = sum(k.sum(dtype=torch.float64) - k.diagonal().sum(dtype=torch.float64) for k in (kxx, kyy))
        total += (within / (m * (m - 1)) - 2 * kxy.sum(dtype=torch.float64) / m ** 2).item()  # i != j: unbiased
    return total / subsets


NEIGHBOURS = 5  # k of density and coverage, as Naeem et al. recommend


def nearest_neighbour_radii(real, k=NEIGHBOURS):
    """Each real feature's distance to its k-th nearest other real feature: the radius of its
    ball in density and coverage."""
    return torch.cat([torch.cdist(chunk, real).kthvalue(k + 1, dim=1).values for chunk in real.split(1000)])


def density_coverage(real, fake, radii, k=NEIGHBOURS):
    """Density and coverage (Naeem et al. 2020) of fake features among real ones, each real
    feature's ball reaching its k-th nearest neighbour (radii). density: the real balls a fake
    falls in, per fake, over k (about 1 for fakes like the reals; above, for fakes crowding
    where the reals are densest; 0, for fakes far from all); coverage: the share of real balls
    holding a fake (1: all of the data is covered; a collapse leaves most balls empty)."""
    inside, covered = 0, torch.zeros(len(real), dtype=torch.bool)
    for chunk in fake.split(1000):
        within = torch.cdist(chunk, real) < radii
        inside += within.sum().item()
        covered |= within.any(0)
    return {"density": inside / (k * len(fake)), "coverage": covered.double().mean().item()}


def label_scores(read, asked, classes):
    """label_accuracy: the share of samples read as the class asked for; and that share for each
    class (None for a class not asked for)."""
    hit = read.eq(asked).double()
    per_class = [round(hit[asked == k].mean().item(), 4) if (asked == k).any() else None for k in range(classes)]
    return {"label_accuracy": hit.mean().item(), "label_accuracy_per_class": per_class}


def memory_view(images):
    """Images as `memorised` compares them: in [-1, 1], on the CPU, and larger than 32 x 32
    averaged down to it (comparing with 10,000 training images then costs what small images do)."""
    return ShrinkTo(FeatureNet.most_size)(to_unit_range(images.cpu()))


def typical_nearest_distance(images):
    """How near training images typically are to each other: the median distance from 500 of
    them (at most half) to their nearest among the next 10,000."""
    k = min(500, len(images) // 2)
    probe, rest = memory_view(images[:k]).flatten(1), memory_view(images[k:k + MOST_REAL]).flatten(1)
    return torch.cdist(probe, rest).min(1).values.median().item()


@torch.random.fork_rng()  # its own random stream: a training run's stays untouched
def train_digit_classifier(data_dir, path, log=print, epochs=4, seed=0):
    """Train (once) the small classifier behind the classifier FID; cached at `path`."""
    torch.manual_seed(seed)
    x = to_unit_range(torch.from_numpy(load_mnist(data_dir).copy()))
    y = torch.from_numpy(load_mnist_labels(data_dir).astype(np.int64))
    net = DigitClassifier()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    log(f"training the evaluation classifier on {len(x)} MNIST images ({epochs} epochs, cached in {path})")
    for epoch in range(epochs):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * 0.4 ** max(0, epoch - 1)
        for idx in torch.randperm(len(x)).split(128):
            # shifts of up to 2 pixels: the classifier must not depend on exact placement
            dx, dy = torch.randint(-2, 3, (2,)).tolist()
            opt.zero_grad()
            F.cross_entropy(net(x[idx].roll((dy, dx), (2, 3))), y[idx]).backward()
            opt.step()
    net.eval()
    tx = to_unit_range(torch.from_numpy(load_mnist(data_dir, "test").copy()))
    ty = torch.from_numpy(load_mnist_labels(data_dir, "test").astype(np.int64))
    with torch.no_grad():
        acc = torch.cat([net(c).argmax(1) for c in tx.split(1000)]).eq(ty).double().mean().item()
    log(f"evaluation classifier test accuracy {acc:.4f}")
    buffer = io.BytesIO()
    torch.save({"state_dict": net.state_dict(), "test_accuracy": acc}, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())
    return net


def load_digit_classifier(data_dir, log=print):
    path = Path(data_dir) / "mnist_classifier.pt"
    if path.exists():
        try:  # tensors and plain values only, as every file this trainer loads
            net = DigitClassifier()
            net.load_state_dict(load_tensors(path)["state_dict"])
            return net.eval()
        except Exception:
            log(f"{path} is damaged or not this trainer's: training the classifier again")
    return train_digit_classifier(data_dir, path, log)


# --- the evaluation features of cifar and of a folder
#
# No Inception network can be had offline, so the features are those of a small net trained on
# the data itself, once, and cached: a classifier where the data has classes (CIFAR-10's labels,
# a folder's class subfolders), else an autoencoder, whose code must hold what each image is (the
# self-supervised task that ranked sample sets best on MNIST: tests/BENCHMARKS.md). Their scores
# compare runs on the same data; they are not Inception FIDs, and no figure published elsewhere
# compares with them.

FEATURE_STEPS = 1000    # batches of 128 that train a feature net (tests pass fewer)
FEATURE_VERSION = 2     # of FeatureNet and its training: a cache of another version is trained anew
HELD_OUT_SHARE = 0.1    # of a folder (and of CIFAR-10 without test_batch): the floor's images, never trained on


@dataclasses.dataclass
class FeatureData:
    """What a feature net learns from (uint8 images, and their classes where there are), and
    the real images it never sees, which the floor is scored on."""
    what: str
    training_images: torch.Tensor
    labels: torch.Tensor | None
    classes: tuple
    held_out: torch.Tensor


def feature_data(cfg, data_dir):
    """CIFAR-10's training batches (test_batch held out, where present) or a folder's images (a
    fixed share held out), with the classes to learn where there are two or more."""
    if cfg.data_source == "cifar":
        what, folder = "CIFAR-10", Path(data_dir) / "cifar-10-batches-py"
        images, batch_labels = load_cifar(data_dir)
        labels = None if any(b is None for b in batch_labels) else np.concatenate(batch_labels)
        classes = CIFAR_CLASSES
        held_out = read_cifar_batch(folder / "test_batch")[0] if (folder / "test_batch").exists() else None
    else:
        what = f"the folder {data_dir}"
        images, names = read_image_folder(data_dir, cfg.sample_shape[1], cfg.sample_shape[0], log=lambda *a: None)
        try:
            labels, classes = class_labels(names, data_dir)
        except UserError:  # images at the top level, or one subfolder: no classes to learn
            labels, classes = None, ()
        held_out = None
    if labels is not None and len(np.unique(labels)) < 2:
        labels = None  # a single class tells no image from another
    images = torch.from_numpy(images if images.flags.writeable else images.copy())
    labels, classes = (None, ()) if labels is None else (torch.from_numpy(labels), classes)
    if held_out is not None:
        return FeatureData(what, images, labels, classes, torch.from_numpy(held_out.copy()))
    if len(images) < 10:
        raise UserError(f"{what}: {len(images)} images are too few to score (at least 10: a tenth is held out "
                        "as the floor)")
    keep, held = held_out_split(len(images))
    return FeatureData(what, images[keep], None if labels is None else labels[keep], classes, images[held])


def held_out_split(n, share=HELD_OUT_SHARE):
    """(kept, held out) indices of n images: a fixed random share held out, the same every time."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    held = max(2, round(share * n))
    return order[held:], order[:held]


def cache_folder():
    """$XDG_CACHE_HOME/gan_trainer, else ~/.cache/gan_trainer, as FolderCache has it."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gan_trainer"


@torch.random.fork_rng()  # seeded here, the caller's random stream untouched
def load_feature_net(real, log=print, steps=None):
    """The feature net of `real` (a FeatureData), trained once and cached in cache_folder(),
    keyed to what it learns from: changed images or classes train a new one. The cache is read
    weights-only; one that does not load, or holds anything but this net's finite weights, is
    never run: it is trained again, said in one line."""
    steps = FEATURE_STEPS if steps is None else steps
    key = feature_key(real, steps)
    path = cache_folder() / f"features-{key[:16]}.pt"
    kind = f"a classifier of its {len(real.classes)} classes" if real.classes else "an autoencoder"
    about = (f"({kind}, {len(real.training_images)} images, cached in {path}; the floor: {len(real.held_out)} held-out "
             "images): scores compare runs on this data; they are not Inception FIDs")
    unusable = ""
    if path.exists():
        try:
            net = read_feature_net(path, key, real)
            log(f"evaluation features for {real.what} {about}")
            return net
        except Exception as e:  # damaged, foreign or crafted: whatever it is, it is not used
            why = weights_only_reason(e) if isinstance(e, pickle.UnpicklingError) else in_one_line(e, most=100)
            unusable = f"; the cached ones were unusable ({why})"
    log(f"training the evaluation features for {real.what} {about}{unusable}")
    torch.manual_seed(0)  # the same data gets the same net, wherever and whenever it is trained
    net = FeatureNet(real.training_images.shape[1], len(real.classes))
    task = reconstruction_loss if real.labels is None else lambda net, x, idx: F.cross_entropy(net(x), real.labels[idx])
    train_feature_net(net, real.training_images, task, steps, quiet=not getattr(log, "show_bar", sys.stdout.isatty()))
    buffer = io.BytesIO()
    torch.save({"state_dict": net.state_dict(), "key": key}, buffer)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_bytes(buffer.getbuffer())
    except (OSError, UserError) as e:
        log(f"note: the evaluation features could not be cached ({e}); the next evaluation trains them again")
    return net


def read_feature_net(path, key, real):
    """The cached feature net at path, if it is the one for key; raises on anything else."""
    saved = load_tensors(path)
    if not isinstance(saved, dict) or saved.get("key") != key:
        raise ValueError("not the features of these images")
    net = FeatureNet(real.training_images.shape[1], len(real.classes))
    net.load_state_dict(saved["state_dict"])  # strict: other names or shapes raise
    if not all(t.isfinite().all() for t in net.state_dict().values()):
        raise ValueError("non-finite weights")
    return net.eval()


def feature_key(real, steps):
    """sha256 of what a feature net is made from: its images, classes and labels, its training."""
    h = hashlib.sha256(json.dumps([FEATURE_VERSION, steps, list(real.training_images.shape), list(real.classes)]).encode())
    h.update(real.training_images.contiguous().numpy())
    if real.labels is not None:
        h.update(real.labels.to(torch.int64).contiguous().numpy())
    return h.hexdigest()


@torch.random.fork_rng()  # its own random stream: a training run's stays untouched
def train_feature_net(net, images, task, steps, quiet=True, batch=128, seed=0):
    """Train a feature net on `steps` batches of random images (uint8), each batch shifted by a
    few pixels (features must not hang on exact placement); task(net, x, idx) is the loss of
    the batch x of images[idx]."""
    from tqdm import tqdm
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    shift = max(1, images.shape[-1] // 14)  # MNIST's 2 pixels
    net.train()
    for _ in tqdm(range(steps), desc="evaluation features", unit="batch", disable=quiet, leave=False):
        idx = torch.randint(len(images), (min(batch, len(images)),))
        dx, dy = torch.randint(-shift, shift + 1, (2,)).tolist()
        x = to_unit_range(images[idx]).roll((dy, dx), (2, 3))
        opt.zero_grad()
        task(net, x, idx).backward()
        opt.step()
        decay.step()
    return net.eval()


def reconstruction_loss(net, x, idx=None):
    """The self-supervised task: how far the image the net draws back from its features is from
    the image (resized to the decoder's most_size x most_size)."""
    target = F.interpolate(x, size=FeatureNet.most_size, mode="bilinear", antialias=True)
    return F.mse_loss(net(x), target)


if __name__ == "__main__":
    sys.exit(main())
