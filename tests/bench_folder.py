"""-d folder benchmarks (run by hand, not collected by pytest).

    python tests/bench_folder.py decode --images 10000 --kind mnist     # 28 px grey PNGs
    python tests/bench_folder.py decode --images 10000 --kind photo     # 96 px RGB JPEGs read at 64 px
    python tests/bench_folder.py mnist --data_dir data --iters 4000 --every 500 --samples 2000 -- --threads 1

decode: writes a folder of images into a temporary folder, then reads it with the trainer's
read_image_folder in fresh processes: once with no cache (decoding), once from the cache. It
prints the seconds and the peak resident memory of each, and the size of the array as uint8 and
as float32.

mnist: writes the 60,000 MNIST training images as PNG files (one folder, in MNIST's order), trains
`-d folder --image_size 28 --channels 1` on them with the tutorial's settings, and scores every
pass's generator as `--evaluate -d mnist` would (the digit classifier, 2,000 samples drawn as
bench_quality.py draws them), so the table compares with bench_quality.py's -d mnist table.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import gan_trainer  # noqa: E402

MEASURE = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
import gan_trainer
started = time.time()
images, names = gan_trainer.read_image_folder({folder!r}, {size}, {channels}, log=lambda *a: None)
print(json.dumps({{"seconds": time.time() - started, "images": len(names), "bytes": images.nbytes,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def write_images(folder, n, kind):
    import numpy as np
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "mnist":
        images = gan_trainer.load_mnist("data")[:n, 0]
        for i, img in enumerate(images):
            Image.fromarray(img).save(folder / f"{i:05d}.png")
        return 28, 1
    rng = np.random.default_rng(0)
    for i in range(n):  # smooth colour fields with noise, 96 x 96, read at 64 x 64
        base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((96, 96), Image.BICUBIC)
        noisy = np.clip(np.asarray(img, np.int16) + rng.integers(-20, 20, (96, 96, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"{i:05d}.jpg", quality=90)
    return 64, 3


def decode(args):
    with tempfile.TemporaryDirectory() as tmp:
        folder, cache = Path(tmp) / "images", Path(tmp) / "cache"
        started = time.time()
        size, channels = write_images(folder, args.images, args.kind)
        print(f"wrote {args.images} {args.kind} images in {time.time() - started:.1f} s "
              f"({sum(p.stat().st_size for p in folder.iterdir()) / 2 ** 20:.1f} MiB on disk)")
        env = dict(os.environ, XDG_CACHE_HOME=str(cache), OMP_NUM_THREADS="1")
        code = MEASURE.format(repo=str(HERE.parent), folder=str(folder), size=size, channels=channels)
        imports = ("import json, resource, sys; sys.path.insert(0, {!r}); import gan_trainer; "
                   "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)").format(str(HERE.parent))
        baseline = float(subprocess.run([sys.executable, "-c", imports], capture_output=True, text=True,
                                        env=env, check=True).stdout)
        print(f"| read | seconds | images | peak RSS MiB (the trainer imported, nothing read: {baseline:.0f}) "
              "| array as uint8 MiB | as float32 MiB |\n|---|---|---|---|---|---|")
        for what in ("decoding (no cache)", "from the cache", "from the cache, again"):
            out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                            env=env, check=True).stdout)
            print(f"| {what} | {out['seconds']:.2f} | {out['images']} | {out['peak_mib']:.0f} | "
                  f"{out['bytes'] / 2 ** 20:.1f} | {4 * out['bytes'] / 2 ** 20:.1f} |")


def mnist(args):
    import torch
    out_dir, folder = Path(args.out_dir), Path(args.out_dir) / "mnist_png"
    if not folder.exists():
        write_images(folder, 60000, "mnist")
    code = gan_trainer.main(["-d", "folder", "--data_dir", str(folder), "--image_size", "28", "--channels", "1",
                             "--use_gpu", "0", "--quiet", "--seed", str(args.seed), "--out_dir", str(out_dir),
                             "--iters", str(args.every), "--passes", str(args.iters // args.every), "--keep", "0",
                             *args.trainer_args])
    if code:
        sys.exit(code)
    cfg = gan_trainer.CONFIGS["mnist"]
    data = gan_trainer.load_data(cfg, args.data_dir, torch.device("cpu")).x
    evaluator = gan_trainer.Evaluator(cfg, args.data_dir, data)
    cols = ["fid", "classes_covered", "max_class_share", "kl_from_uniform", "memorised"]
    print(f"\n# -d folder of the MNIST PNGs, 28 px grey, {args.samples} samples per evaluation, scored as -d mnist")
    print("| iterations | " + " | ".join(cols) + " |\n|" + "---|" * (len(cols) + 1))
    for path in gan_trainer.list_checkpoints(out_dir / "folder_params"):
        ckpt = gan_trainer.load_checkpoint(path, "folder")
        gen, _ = gan_trainer.build_nets(gan_trainer.check_config(ckpt["config"]))
        gen.load_state_dict(ckpt["generator"])
        rng = torch.Generator().manual_seed(args.seed + ckpt["pass"])  # as --eval_every draws them
        noise = torch.randn(args.samples, cfg.noise_dim, generator=rng)
        scores = evaluator.score(gan_trainer.generate_samples(gen, noise, cfg.batch_size, rng))
        print(f"| {(ckpt['pass'] + 1) * args.every} | " +
              " | ".join(f"{scores[c]:.4g}" if isinstance(scores[c], float) else str(scores[c]) for c in cols) + " |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    d = sub.add_parser("decode")
    d.add_argument("--images", type=int, default=10000)
    d.add_argument("--kind", choices=["mnist", "photo"], default="mnist")
    m = sub.add_parser("mnist")
    m.add_argument("--data_dir", default="data", help="holding mnist_data/ (images, labels, test files)")
    m.add_argument("--out_dir", default="bench_folder_run")
    m.add_argument("--iters", type=int, default=4000)
    m.add_argument("--every", type=int, default=500)
    m.add_argument("--samples", type=int, default=2000)
    m.add_argument("--seed", type=int, default=1)
    m.add_argument("trainer_args", nargs="*", help="extra trainer flags, after --")
    args = p.parse_args()
    decode(args) if args.what == "decode" else mnist(args)


if __name__ == "__main__":
    main()
