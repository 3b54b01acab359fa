#!/usr/bin/env bash
# The GPU checks, as one run (run by hand on a CUDA machine, from the repository root, with
# data/mnist_data/ and data/mnist_classifier.pt in place). Writes everything under $OUT.
#   OUT=/tmp/gpu bash tests/gpu_session.sh                 # every section
#   OUT=/tmp/gpu bash tests/gpu_session.sh bench full fid  # some
# EQ_ITERS, BENCH_ITERS, FULL_ARGS shrink the work (a dry run of this script on the CPU).
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_session}
EQ_ITERS=${EQ_ITERS:-300}
BENCH_ITERS=${BENCH_ITERS:-200}
FULL_ARGS=${FULL_ARGS:-}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
py=python3
section() { echo; echo "=== $* ($(date +%T))"; }

machine() {
  section machine
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  nproc
  $py -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())"
}

gputests() {
  section "tests that need a GPU (and the equivalence tests beside them)"
  timeout 120 $py -m pytest -q tests/test_step_equivalence.py
}

smoke() {
  section "CUDA code path: train eagerly, resume with graphs, generate"
  local S=/tmp/smoke
  rm -rf $S
  timeout 120 $py gan_trainer.py -d uniform --passes 1 --iters 300 --seed 1 --out_dir $S --quiet --cuda_graphs 0 | tail -3
  timeout 120 $py gan_trainer.py -d uniform --passes 2 --iters 300 --resume --out_dir $S --quiet | tail -2
  timeout 60 $py gan_trainer.py -d uniform --generate 100 --out_dir $S
  ls $S/uniform_samples
}

equivalence() {
  section "eager vs eager vs graphs, mnist, $EQ_ITERS iterations from seed 1"
  for v in eager:0 eager2:0 graphs:1; do
    rm -rf /tmp/eq_${v%%:*}
    timeout 120 $py gan_trainer.py -d mnist --passes 1 --iters $EQ_ITERS --seed 1 --out_dir /tmp/eq_${v%%:*} --quiet \
      --cuda_graphs ${v##*:} > /tmp/eq_${v%%:*}.log 2>&1; echo "${v%%:*} rc=$?"; tail -1 /tmp/eq_${v%%:*}.log
  done
  $py - <<'PY'
import json
for k in ("eager", "eager2", "graphs"):
    ms = [json.loads(l) for l in open(f"/tmp/eq_{k}/mnist_params/metrics.jsonl")]
    print(k, [(m["iteration"], round(m["d_loss"], 6), round(m["g_loss"], 6), m["trained"]) for m in ms if "d_loss" in m])
PY
}

bench() {
  section "bench_speed mnist"
  timeout 120 $py tests/bench_speed.py --data_source mnist --iters $BENCH_ITERS --rounds 3 --warmup 20
  section "bench_speed uniform"
  timeout 60 $py tests/bench_speed.py --data_source uniform --iters 1000 --rounds 3 --no_peak
}

full() {
  section "full default mnist run, 100 passes"
  local F=/tmp/full
  rm -rf $F
  /usr/bin/time -v timeout 240 $py gan_trainer.py -d mnist --seed 1 --out_dir $F --quiet $FULL_ARGS \
    > "$OUT/full.log" 2> /tmp/full.err; echo "rc=$?"; grep -E "Elapsed|Maximum resident" /tmp/full.err; tail -2 /tmp/full.err
  head -1 "$OUT/full.log"
  grep "done:" "$OUT/full.log" | sed -n '1p;2p;50p;$p'
  grep "done:" "$OUT/full.log" | sed -E 's/.*in ([0-9.]+) s.*/\1/' | awk '{s += $1} END {print "training seconds, summed over passes:", s}'
  cp $F/mnist_samples/losses.png $F/mnist_samples/progress.gif $F/mnist_params/metrics.jsonl "$OUT"/ 2>/dev/null
  cp "$(ls -v $F/mnist_samples/train_pass*.png | tail -1)" "$OUT"/last_pass.png 2>/dev/null
}

fid() {
  section "FID of the final generator"
  timeout 60 $py gan_trainer.py -d mnist --evaluate --out_dir /tmp/full --samples 10000
}

for s in ${@:-machine gputests smoke equivalence bench full fid}; do $s; done
section end
