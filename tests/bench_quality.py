"""Quality benchmark (run by hand, not collected by pytest): how good does the generator get?

Trains with the tutorial's settings (or an opt-in remedy) and scores the generator at
fixed iteration counts with the same figures as `gan_trainer.py --evaluate`:

    python tests/bench_quality.py -d mnist --data_dir data --iters 3000 --every 500
    python tests/bench_quality.py -d uniform --passes 10 --every 10000 --d_batch_norm 0

Prints one table row per evaluation point and, with --json FILE, writes the rows.
"""
import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gan_trainer as gt  # noqa: E402
from gan_conf import CONFIGS  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--data_source", choices=["mnist", "uniform"], required=True)
    p.add_argument("--data_dir", default="data", help="folder holding mnist_data/ (e.g. ../shared/data)")
    p.add_argument("--iters", type=int, help="total iterations (default: --passes of the tutorial's length)")
    p.add_argument("--passes", type=int, default=2, help="passes, when --iters is not given")
    p.add_argument("--every", type=int, default=500, help="iterations between evaluations")
    p.add_argument("--samples", type=int, default=2000, help="generated samples per evaluation")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--d_batch_norm", type=int, default=1, choices=[0, 1])
    p.add_argument("--d_leaky", type=float, default=0.0)
    p.add_argument("--lr", type=float)
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    cfg = dataclasses.replace(CONFIGS[args.data_source], d_batch_norm=bool(args.d_batch_norm),
                              d_leaky=args.d_leaky, **({"lr": args.lr} if args.lr else {}))
    total = args.iters or args.passes * cfg.iters_per_pass
    device = torch.device("cpu")
    data = gt.load_data(cfg, args.data_dir, device, args.seed)
    evaluator = gt.Evaluator(cfg, args.data_dir, data)
    floor = evaluator.floor(args.samples)
    print(f"# {cfg.data_source}, {total} iterations, evaluated on {args.samples} samples every {args.every}; "
          f"config {json.dumps({k: v for k, v in cfg.to_dict().items() if k in ('lr', 'd_batch_norm', 'd_leaky')})}")
    print(f"# real-data floor: {gt.format_scores(floor)}")
    gen, dis, opt_g, opt_d, autocast = gt.make_training(cfg, {}, device)
    schedule, d_steps, rows, t0 = gt.Schedule(), 0, [], time.time()
    eval_noise = torch.randn(args.samples, cfg.noise_dim, generator=torch.Generator().manual_seed(7))
    for i in range(1, total + 1):
        x = gt.real_batch(data, cfg.batch_size)
        z = torch.randn(cfg.batch_size, cfg.noise_dim)
        step = gt.train_step(gen, dis, opt_g, opt_d, x, z, schedule, autocast)
        if not step.net:
            print(f"non-finite loss at iteration {i}")
            break
        schedule = gt.advance(schedule, step.net)
        d_steps += step.net == "dis"
        if i % args.every == 0:
            seconds = time.time() - t0
            scores = evaluator.score(gt.generate_samples(gen, eval_noise, cfg.batch_size))
            d_pos, d_neg, g = (v.detach().item() for v in (step.d_pos_loss, step.d_neg_loss, step.g_loss))
            row = {"iteration": i, "seconds": round(seconds, 1), **scores, "d_loss": (d_pos + d_neg) / 2,
                   "g_loss": g, "d_share": d_steps / i}
            rows.append(row)
            print(gt.format_scores(row), flush=True)
            t0 = time.time() - seconds  # evaluation time does not count as training time
    if args.json:
        Path(args.json).write_text(json.dumps({"config": cfg.to_dict(), "floor": floor, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
