"""Several processes against one (run by hand, not collected by pytest).

    python tests/bench_ddp.py --data_source mnist --iters 40 --rounds 3
    python tests/bench_ddp.py --data_source uniform --iters 2000 --rounds 3

Trains the same short run, in turn, as one process with N threads (the default step, and for
uniform also the eager one) and as N processes of one thread each, started by torchrun
(`python -m torch.distributed.run --standalone --nproc_per_node N`), and prints the ms per
iteration of each from the pass's own line ("Pass=0 done: ... in S s"), round by round. The
first iterations (compiling, oneDNN's first calls) count in every variant alike.
"""
import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def pass_seconds(stdout):
    found = re.search(r"Pass=0 done: (\d+) iterations in ([0-9.]+) s", stdout)
    if not found:
        raise SystemExit(f"no pass line in:\n{stdout[-2000:]}")
    return float(found.group(2)) / int(found.group(1))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_source", default="mnist", choices=["mnist", "uniform"])
    p.add_argument("--data_dir", default="data")
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--processes", type=int, default=2)
    args = p.parse_args()
    n = args.processes
    common = ["-d", args.data_source, "--passes", "1", "--iters", str(args.iters), "--seed", "1", "--use_gpu", "0",
              "--quiet", "--data_dir", args.data_dir]
    trainer = [sys.executable, str(REPO / "gan_trainer.py")]
    variants = {f"1 process x {n} threads": trainer + common + ["--threads", str(n)],
                f"{n} processes x 1 thread": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                              "--nproc_per_node", str(n), str(REPO / "gan_trainer.py"),
                                              *common, "--threads", "1"]}
    if args.data_source == "uniform":
        variants["1 process x 1 thread, eager (--compile 0)"] = trainer + common + ["--threads", "1", "--compile", "0"]
        variants["1 process x 1 thread, compiled (the default)"] = trainer + common + ["--threads", "1"]
    times = {name: [] for name in variants}
    for r in range(args.rounds):
        for name, command in variants.items():
            with tempfile.TemporaryDirectory() as out:
                proc = subprocess.run([*command, "--out_dir", out], capture_output=True, text=True, cwd=REPO)
            if proc.returncode:
                raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
            times[name].append(pass_seconds(proc.stdout) * 1e3)
            print(f"round {r + 1}: {name}: {times[name][-1]:.3f} ms per iteration", flush=True)
    print(f"\n| {args.data_source}, {args.iters} iterations, batch 128 | " +
          " | ".join(f"round {r + 1}" for r in range(args.rounds)) + " |")
    print("|---|" + "---|" * args.rounds)
    for name, t in times.items():
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in t) + " |")


if __name__ == "__main__":
    main()
