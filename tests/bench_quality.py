"""Quality benchmark (run by hand, not collected by pytest): how good does the generator get?

Runs the trainer itself (`gan_trainer.py --eval_every 1`, one pass = --every iterations),
then prints one row per evaluation: iterations, training seconds, the scores of
`gan_trainer.py --evaluate`, and the losses logged last before it.

    python tests/bench_quality.py -d mnist --data_dir data --iters 4000 --every 500
    python tests/bench_quality.py -d uniform --iters 100000 --every 10000 -- --d_batch_norm 0

Arguments after `--` go to the trainer unchanged (remedies, speed options). The run's
pictures, losses.png and progress.gif stay in --out_dir.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gan_trainer  # noqa: E402

COLUMNS = {
    "mnist": ["fid", "classes_covered", "max_class_share", "kl_from_uniform", "memorised"],
    "uniform": ["inside", "cells_covered", "sliced_w1"],
}


def eval_rows(out_dir, data_source):
    """(evaluation line, the loss line logged last before it) pairs of a run's metrics.jsonl."""
    rows, last = [], None
    for line in (Path(out_dir) / f"{data_source}_params" / "metrics.jsonl").open():
        m = json.loads(line)
        if "eval" in m:
            rows.append((m, last))
        else:
            last = m
    return rows


def plot_quality(runs, data_source, path):
    """Quality against iterations for one or more runs: {label: out_dir}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = ["fid", "classes_covered"] if data_source == "mnist" else ["inside", "cells_covered"]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5))
    for label, out_dir in runs.items():
        rows = eval_rows(out_dir, data_source)
        for ax, key in zip(axes, keys):
            ax.plot([m["step"] for m, _ in rows], [m["eval"][key] for m, _ in rows], marker="o", label=label)
    for ax, key in zip(axes, keys):
        ax.set(xlabel="iteration", title=key)
        if key == "fid":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--data_source", choices=sorted(COLUMNS), required=True)
    p.add_argument("--data_dir", default="data", help="folder holding mnist_data/ (e.g. ../shared/data)")
    p.add_argument("--iters", type=int, help="total training iterations")
    p.add_argument("--every", type=int, default=500, help="iterations between evaluations")
    p.add_argument("--samples", type=int, default=2000, help="generated samples per evaluation")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out_dir", default="bench_quality_run", help="where the trainer writes (must be new)")
    p.add_argument("--plot", nargs="+", metavar="LABEL=DIR",
                   help="no training: plot quality against iterations of finished runs into quality_<d>.png")
    p.add_argument("trainer_args", nargs="*", help="extra trainer flags, after --")
    args = p.parse_args()
    if args.plot:
        path = f"quality_{args.data_source}.png"
        plot_quality(dict(item.split("=", 1) for item in args.plot), args.data_source, path)
        print(f"wrote {path}")
        return
    if not args.iters:
        p.error("--iters is required for a benchmark run")

    code = gan_trainer.main(["-d", args.data_source, "--use_gpu", "0", "--quiet", "--seed", str(args.seed),
                             "--data_dir", args.data_dir, "--out_dir", args.out_dir,
                             "--iters", str(args.every), "--passes", str(args.iters // args.every),
                             "--eval_every", "1", "--samples", str(args.samples), "--keep", "1",
                             *args.trainer_args])
    if code:
        sys.exit(code)
    cols = COLUMNS[args.data_source]
    if any("label_accuracy" in m["eval"] for m, _ in eval_rows(args.out_dir, args.data_source)):
        cols = ["label_accuracy", *cols]  # a conditional run
    print(f"\n# {args.data_source}: {args.samples} samples per evaluation; trainer flags: "
          f"{' '.join(args.trainer_args) or '(tutorial defaults)'}")
    print("| iterations | train s | " + " | ".join(cols) + " | d_loss | g_loss | D share |")
    print("|" + "---|" * (len(cols) + 5))
    cfg = gan_trainer.CONFIGS[args.data_source]
    data = gan_trainer.load_data(cfg, args.data_dir, gan_trainer.torch.device("cpu"), args.seed).x
    floor = gan_trainer.Evaluator(cfg, args.data_dir, data).floor(args.samples)
    print("| real data (floor) | | " + " | ".join(
        f"{floor[c]:.4g}" if isinstance(floor.get(c), float) else str(floor.get(c, "")) for c in cols) + " | | | |")
    for m, last in eval_rows(args.out_dir, args.data_source):
        scores = m["eval"]
        cells = [f"{scores[c]:.4g}" if isinstance(scores[c], float) else str(scores[c]) for c in cols]
        print(f"| {m['step']} | {m['seconds']:.0f} | " + " | ".join(cells) +
              f" | {last['d_loss']:.3f} | {last['g_loss']:.3f} | {last['d_share']:.2f} |")


if __name__ == "__main__":
    main()
