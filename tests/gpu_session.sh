#!/usr/bin/env bash
# The GPU checks, as one run (run by hand on a CUDA machine, from the repository root, with
# data/mnist_data/ and data/mnist_classifier.pt in place). Writes everything under $OUT.
#   OUT=/tmp/gpu bash tests/gpu_session.sh
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_session}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
py=python3
EQ_ITERS=${EQ_ITERS:-300}   # smaller values: a dry run of this script on the CPU
FULL_ARGS=${FULL_ARGS:-}
BENCH_ITERS=${BENCH_ITERS:-200}
section() { echo; echo "=== $* ($(date +%T))"; }

section machine
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
nproc
$py -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())"

section "CUDA code path: train, resume with graphs, generate"
S=/tmp/smoke
rm -rf $S /tmp/eq_* /tmp/full
timeout 120 $py gan_trainer.py -d uniform --passes 1 --iters 300 --seed 1 --out_dir $S --quiet | tail -3
timeout 120 $py gan_trainer.py -d uniform --passes 2 --iters 300 --resume --out_dir $S --quiet --cuda_graphs 1 | tail -2
timeout 60 $py gan_trainer.py -d uniform --generate 100 --out_dir $S
ls $S/uniform_samples

section "eager vs eager vs graphs, mnist, 300 iterations from seed 1"
for v in eager:0 eager2:0 graphs:1; do
  timeout 120 $py gan_trainer.py -d mnist --passes 1 --iters $EQ_ITERS --seed 1 --out_dir /tmp/eq_${v%%:*} --quiet \
    --cuda_graphs ${v##*:} > /tmp/eq_${v%%:*}.log 2>&1; echo "${v%%:*} rc=$?"; tail -1 /tmp/eq_${v%%:*}.log
done
$py - <<'PY'
import json
runs = {k: [json.loads(l) for l in open(f"/tmp/eq_{k}/mnist_params/metrics.jsonl")] for k in ("eager", "eager2", "graphs")}
for k, ms in runs.items():
    print(k, [(m["iteration"], round(m["d_loss"], 6), round(m["g_loss"], 6), m["trained"]) for m in ms if "d_loss" in m])
PY

section "bench_speed mnist (cuda)"
timeout 120 $py tests/bench_speed.py --data_source mnist --iters $BENCH_ITERS --rounds 3 --warmup 20
section "bench_speed uniform (cuda)"
timeout 60 $py tests/bench_speed.py --data_source uniform --iters 1000 --rounds 3 --no_peak

section "full default mnist run, 100 passes, --cuda_graphs 1"
F=/tmp/full
/usr/bin/time -v timeout 240 $py gan_trainer.py -d mnist --seed 1 --out_dir $F --quiet --cuda_graphs 1 $FULL_ARGS \
  > "$OUT/full.log" 2> /tmp/full.err; echo "rc=$?"; grep -E "Elapsed|Maximum resident" /tmp/full.err; tail -2 /tmp/full.err
grep "done:" "$OUT/full.log" | sed -n '1p;2p;50p;$p'
cp $F/mnist_samples/losses.png $F/mnist_samples/progress.gif $F/mnist_params/metrics.jsonl "$OUT"/ 2>/dev/null
cp "$(ls -v $F/mnist_samples/train_pass*.png | tail -1)" "$OUT"/last_pass.png 2>/dev/null

section "FID of the final generator"
timeout 60 $py gan_trainer.py -d mnist --evaluate --out_dir $F --samples 10000
section end
