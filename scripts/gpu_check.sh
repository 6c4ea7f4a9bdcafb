#!/usr/bin/env bash
# The prepared GPU session (about 10 minutes on one GPU): everything it measures goes to one folder, $OUT
# (default /tmp/logitcache-gpu; the device tool returns $OUT). Steps, each logged with its time in $OUT/steps.log:
#   1. the suite's GPU-marked tests (tests that skip without CUDA run here);
#   2. a teacher, then a build equal to a torchrun build (NCCL; one rank per GPU, world size 1 through the same code
#      path with one GPU), bitwise at fp32 and at the device's auto precision;
#   3. build throughput against a bare teacher loop at fp32, bf16 and fp16, and encoding on the GPU against encoding
#      on the host (benchmarks/bench_build.py);
#   4. the cached-KD step against the plain step (benchmarks/bench_step.py);
#   5. DDP cached-KD training with --precision auto --channels-last on every GPU present;
#   6. the sequence study at GPU scale (benchmarks/bench_sequence.py: all 60,000 Fashion-MNIST images, a wide
#      ResNet-20, complete schedules at reduced budgets, two seeds); its time is an estimate from the CPU quick run
#      scaled by the throughput measured in step 3, so it is the step to cut first when time runs short.
# Records the benchmarks append are copied to $OUT/RECORDS.md.
#   --device cpu --quick   the same steps at toy sizes on the CPU (gloo instead of NCCL): the suite's dry run.
# On a bare GPU machine (no network): run scripts/gpu_prepare.sh where PyPI is reachable first and carry .gpu.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda QUICK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --quick) QUICK=1; shift ;;
    *) echo "unknown option $1 (use --device cpu|cuda, --quick)" >&2; exit 2 ;;
  esac
done
if [ -n "${PY:-}" ]; then
  :  # the interpreter to use is given (the suite's dry run)
elif [ -d .gpu/wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
  if [ ! -d /usr/share/datasets/fashion-mnist ]; then mkdir -p /usr/share/datasets; cp -r .gpu/fashion-mnist /usr/share/datasets/; fi
  PY=python3
else
  bash scripts/setup.sh
  PY=.venv/bin/python
fi
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/logitcache-gpu}; rm -rf "$OUT"; mkdir -p "$OUT"
export LOGITCACHE_BENCH_OUT="$OUT/bench"
cp benchmarks/RECORDS.md "$OUT/.records-before"
lc() { "$PY" -m logitcache "$@"; }
torchrun() { "$PY" -m torch.distributed.run "$@"; }
step() {  # step NAME COMMAND...: run it, log its time and status; a failed step does not stop the others
  local name=$1; shift
  local start=$SECONDS
  if "$@" > "$OUT/$name.log" 2>&1; then status=ok; else status="FAILED ($?)"; fi
  echo "$name: $status in $((SECONDS - start)) s" | tee -a "$OUT/steps.log"
}
if [ "$DEVICE" = cpu ]; then
  RANKS=2; Q=(--quick); LIMIT=512; TEST=(--test-limit 256); EPOCHS=1
else
  RANKS=$("$PY" -c "import torch; print(max(1, torch.cuda.device_count()))"); Q=(); LIMIT=8192; TEST=(); EPOCHS=2
  [ "$QUICK" = 1 ] && Q=(--quick)
fi
[ "$QUICK" = 1 ] && LIMIT=512 && TEST=(--test-limit 256) && EPOCHS=1
"$PY" -c "import torch, logitcache; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu', 'logitcache', logitcache.__version__)" \
  | tee "$OUT/machine.txt"

step 1-gpu-tests "$PY" -m pytest -q -m gpu tests
COMMON=(--dataset fashion-mnist --limit "$LIMIT" --views 2 --chunk-rows 256 --encoding topk --device "$DEVICE" --quiet)
step 2a-teacher lc train --out "$OUT/teacher" --epochs 1 --limit "$LIMIT" "${TEST[@]}" --device "$DEVICE" --quiet
for precision in fp32 auto; do
  step "2b-build-$precision" lc build --teacher "$OUT/teacher" "${COMMON[@]}" --precision "$precision" \
    --out "$OUT/single-$precision"
  step "2c-torchrun-build-$precision" torchrun --standalone --nproc-per-node "$RANKS" -m logitcache build \
    --teacher "$OUT/teacher" "${COMMON[@]}" --precision "$precision" --out "$OUT/multi-$precision"
  step "2d-equal-$precision" "$PY" - "$OUT/single-$precision" "$OUT/multi-$precision" <<'PY'
import sys, zarr
a, b = (zarr.open_group(p, mode="r") for p in sys.argv[1:3])
for name in ("ids", "logprobs", "tail", "tail_soft", "labels", "complete", "digests"):
    assert a[name][...].tobytes() == b[name][...].tobytes(), name
print("torchrun build == single-process build, bitwise;", dict(a.attrs["logitcache"])["precision"])
PY
done
step 3-build-throughput "$PY" benchmarks/bench_build.py --precisions fp32,bf16,fp16 --encode-on auto,host,device \
  --device "$DEVICE" "${Q[@]}"
step 4-step "$PY" benchmarks/bench_step.py "${Q[@]}"
step 5-ddp-train torchrun --standalone --nproc-per-node "$RANKS" -m logitcache train --out "$OUT/student" \
  --kd cached --cache "$OUT/multi-auto" --epochs "$EPOCHS" "${TEST[@]}" --precision auto --channels-last \
  --device "$DEVICE" --quiet
if [ "$DEVICE" = cpu ] || [ "$QUICK" = 1 ]; then
  step 6-sequence-study "$PY" benchmarks/bench_sequence.py --quick
else
  step 6-sequence-study "$PY" benchmarks/bench_sequence.py --samples 60000 --model small-resnet20-w32 --epochs 6 \
    --seeds 2 --scratch-budgets 0.5,0.75,1.0 --kd-budgets 0.5,0.75,1.0 --throughout-budgets "" --sweep-lrs "" \
    --workers 8
fi
diff "$OUT/.records-before" benchmarks/RECORDS.md > "$OUT/RECORDS.md" || true
rm -f "$OUT/.records-before"
cat "$OUT/steps.log"
! grep -q FAILED "$OUT/steps.log"
