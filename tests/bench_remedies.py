"""The opt-in remedies measured (run by hand, not collected by pytest): --ema and --augment.

    python tests/bench_remedies.py ema RUN_DIR                # an --ema 1 --eval_every K run's scores
    python tests/bench_remedies.py folder --images 1000 --passes 8 --iters 250 -- --threads 1
    python tests/bench_remedies.py cost --iters 8 --rounds 5

ema: the table of an `--ema 1` run's evaluations: the averaged G against the raw G on the same
noise (`eval` and `eval_raw` in metrics.jsonl). The average does not change training (it draws
no random numbers), so the raw G is the run without --ema, bit for bit.

folder: writes the first N MNIST training digits (data/mnist_data) as PNG files, then trains
`-d folder --image_size 28 --channels 1 --eval_every 1` on them twice, without and with
`--augment color,translation,cutout`, same seed; prints each pass's FID in the folder's own
features, D's mean probability of "real" on the real and the generated batches of the pass's
logged iterations, the best pass, and whether the collapse alarm fired.

cost: the mnist step (with the loop's bookkeeping, and the augmentation of the real batch) plain,
with --ema 1 and with --augment, interleaved in rounds in one process (random images: no data
read), as ratios to the plain step.
"""
import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRAINER = HERE.parent / "gan_trainer.py"
POLICY = "color,translation,cutout"


def read_metrics(params):
    return [json.loads(line) for line in (Path(params) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def ema_table(args):
    rows = [m for m in read_metrics(Path(args.run) / f"{args.data_source}_params") if "eval" in m]
    print("| iteration | FID, G | FID, averaged G | change | coverage, G | coverage, averaged G |")
    print("|---|---|---|---|---|---|")
    for m in rows:
        raw, avg = m["eval_raw"], m["eval"]
        print(f"| {m['step']} | {raw['fid']:.1f} | {avg['fid']:.1f} | {100 * (avg['fid'] / raw['fid'] - 1):+.0f}% "
              f"| {raw['coverage']:.3f} | {avg['coverage']:.3f} |")


def train(out, data_dir, args, extra):
    cmd = [sys.executable, str(TRAINER), "-d", "folder", "--data_dir", str(data_dir), "--image_size", "28",
           "--channels", "1", "--use_gpu", "0", "--quiet", "--seed", str(args.seed), "--passes", str(args.passes),
           "--iters", str(args.iters), "--eval_every", "1", "--samples", str(args.samples), "--keep", "0",
           "--out_dir", str(out), *extra, *args.rest]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)}\n{proc.stderr}")
    return proc.stdout


def folder(args):
    import numpy as np
    from PIL import Image
    sys.path.insert(0, str(HERE.parent))
    import gan_trainer
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "digits"
        images.mkdir()
        for i, img in enumerate(gan_trainer.load_mnist(args.data_dir)[:args.images, 0]):
            Image.fromarray(np.ascontiguousarray(img)).save(images / f"{i:05d}.png")
        for name, extra in (("without --augment", []), (f"--augment {POLICY}", ["--augment", POLICY])):
            out = Path(tmp) / name.split()[0].strip("-")
            stdout = train(out, images, args, extra)
            metrics = read_metrics(out / "folder_params")
            print(f"\n{args.images} digits, {name}:")
            print("| pass | iterations | FID | D(real) on real | D(real) on generated |")
            print("|---|---|---|---|---|")
            for m in (m for m in metrics if "eval" in m):
                logged = [x for x in metrics if x.get("pass") == m["pass"] and "d_real" in x]
                print(f"| {m['pass']} | {m['step']} | {m['eval']['fid']:.1f} | "
                      f"{statistics.mean(x['d_real'] for x in logged):.3f} | "
                      f"{statistics.mean(x['d_fake'] for x in logged):.3f} |")
            best = [line for line in stdout.splitlines() if "a new best" in line]
            print("best:", re.search(r"a new best fid ([0-9.e+]+)", best[-1]).group(1),
                  "at pass", re.search(r"Pass=(\d+)", best[-1]).group(1))
            alarms = [line for line in stdout.splitlines() if " collapse:" in line]
            print("collapse alarm:", alarms[0] if alarms else "none")
            floor = [line for line in stdout.splitlines() if line.startswith("real data (floor)")]
            print(floor[0] if floor else "")


def cost(args):
    """The step with each option against the plain one, interleaved in rounds in this process."""
    import dataclasses
    import time
    import torch
    sys.path.insert(0, str(HERE.parent))
    import gan_trainer as gt
    torch.set_num_threads(args.threads)
    base = gt.CONFIGS["mnist"]
    variants = {"plain": base, "--ema 1": dataclasses.replace(base, ema=True),
                f"--augment {POLICY}": dataclasses.replace(base, augment=POLICY)}
    runs = {}
    for name, cfg in variants.items():
        torch.manual_seed(1)
        run = gt.Run(cfg, 1, gt.Speed(channels_last=True), "cpu")
        runs[name] = run, gt.make_step(run)
    x, per = torch.rand(base.batch_size, 1, 28, 28) * 2 - 1, {name: [] for name in variants}
    for r in range(args.rounds + 1):
        for name, (run, step) in runs.items():
            started = time.perf_counter()
            for _ in range(args.iters):
                xi, z = x, torch.randn(base.batch_size, base.noise_dim)
                if run.cfg.augment:
                    xi, z = gt.augmented_inputs(run.cfg.augment, xi, z)
                run.record(step(xi, z, run.schedule))
            if r:  # the first round warms up
                per[name].append((time.perf_counter() - started) / args.iters)
    plain = statistics.median(per["plain"])
    print(f"| variant | ms per iteration (median of {args.rounds} rounds of {args.iters}) | ratio to plain |")
    print("|---|---|---|")
    for name, times in per.items():
        print(f"| {name} | {1e3 * statistics.median(times):.0f} | {statistics.median(times) / plain:.3f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    e = sub.add_parser("ema")
    e.add_argument("run")
    e.add_argument("--data_source", default="mnist")
    f = sub.add_parser("folder")
    f.add_argument("--images", type=int, default=1000)
    f.add_argument("--passes", type=int, default=8)
    f.add_argument("--iters", type=int, default=250)
    f.add_argument("--samples", type=int, default=2000)
    f.add_argument("--seed", type=int, default=1)
    c = sub.add_parser("cost")
    c.add_argument("--iters", type=int, default=8)
    c.add_argument("--rounds", type=int, default=5)
    c.add_argument("--threads", type=int, default=1)
    f.add_argument("--data_dir", default="data")
    f.add_argument("rest", nargs="*", help="after --: more trainer flags")
    args = p.parse_args()
    {"ema": ema_table, "folder": folder, "cost": cost}[args.what](args)


if __name__ == "__main__":
    main()
