#!/usr/bin/env bash
# The prepared GPU session, in two parts, each one device call on a fresh 16-core one-GPU machine:
#   bash scripts/gpu_check.sh --part correctness      (carry .gpu; a call limit of 330 s leaves room)
#   bash scripts/gpu_check.sh --part measure
# Each part is sized for about three minutes of steps; every step runs under its own `timeout`, a step starts only
# while 20 s of the part's --budget (270 s) remain and is cut to what remains, so a part ends within the budget plus
# a few seconds for the summary, whatever hangs.
#
#   --part correctness
#     gpu-tests        the suite's GPU-marked tests (pytest -m gpu on the files that carry the marker);
#     kd-100, kd-5000  on SYNTHETIC 3x32x32 images with 100 and 5,000 classes (scripts/gpu_steps.py): a teacher, then
#                      per encoding (full, topk, quantized, topk8, headtail, sampled) a build and a cached-KD training
#                      run with LOGITCACHE_SYNC_DEBUG=error (any host sync inside a steady-state step raises);
#     torchrun-build   a topk build on several ranks: one per GPU with two or more GPUs, else 2 CPU (gloo) ranks with
#                      --device cpu (the summary says which);
#     torchrun-train   DDP cached-KD training from that store on the same ranks;
#     checks           a single-process build equal to the torchrun build, bitwise; topk built with --encode-on device
#                      equal to --encode-on host (integer fields bitwise, float fields within rounding) at 100 and 5,000
#                      classes; a build and a cached-KD run at --precision fp32, bf16 and fp16.
#   --part measure
#     bench-options    every option of the three command lines below is one its benchmark declares (no import);
#     build-throughput benchmarks/bench_build.py at fp32, bf16 and fp16, encoding on auto, host and device;
#     step-overhead    benchmarks/bench_step.py (the cached-KD step against the plain and online-KD steps);
#     sequence-study   benchmarks/bench_sequence.py sized to fit (20,000 Fashion-MNIST images, a ResNet-20, complete
#                      schedules at budgets 0.5 and 1, one seed); the last step, so the budget cuts it first.
#
# Scratch data (teachers, stores, runs, logs) lives in $SCRATCH (default: a new folder under /tmp), never in $OUT.
# $OUT (default /tmp/logitcache-gpu-PART; the device tool returns it) receives exactly: summary-PART.txt (machine,
# steps with status and seconds, notes, key figures from the logs), logs-PART.tar.gz (every step's log, the step
# table, the benchmarks' plots), and for --part measure RECORDS-measure.diff (what the benchmarks appended to
# benchmarks/RECORDS.md, for `git apply`) when they recorded anything.
#
#   --device cpu --quick   the CPU dry run (the suite runs it): the same steps at toy sizes; what cannot be quick on
#                          2 cores is skipped or shrunk, and the summary says what.
#   --budget SECONDS       the seconds the part's steps may take in all (default 270; with --quick 150).
# On a lent GPU machine (no network), first run scripts/gpu_prepare.sh where PyPI is reachable and carry .gpu: the
# script installs .gpu/wheels into /tmp/site (with those of .gpu/wheels-if-missing that the image lacks or has older)
# and puts .gpu/fashion-mnist at /usr/share/datasets/fashion-mnist. PY=/path/to/python overrides the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PART="" DEVICE=cuda QUICK=0 BUDGET=""
usage="usage: $0 --part correctness|measure [--device cpu|cuda] [--quick] [--budget SECONDS]"
while [ $# -gt 0 ]; do
  case "$1" in
    --part) PART=${2:-}; shift 2 ;;
    --device) DEVICE=${2:-}; shift 2 ;;
    --quick) QUICK=1; shift ;;
    --budget) BUDGET=${2:-}; shift 2 ;;
    *) echo "unknown option $1; $usage" >&2; exit 2 ;;
  esac
done
case "$PART" in correctness|measure) ;; *) echo "$usage" >&2; exit 2 ;; esac
case "$DEVICE" in cpu|cuda) ;; *) echo "--device must be cpu or cuda; $usage" >&2; exit 2 ;; esac
[ -n "$BUDGET" ] || BUDGET=$([ "$QUICK" = 1 ] && echo 150 || echo 270)

T0=$SECONDS
OUT=${OUT:-/tmp/logitcache-gpu-$PART}
SCRATCH=${SCRATCH:-$(mktemp -d /tmp/logitcache-gpu-scratch.XXXXXX)}
LOGS=$SCRATCH/logs
rm -rf "$LOGS"
mkdir -p "$OUT" "$LOGS"
rm -f "$OUT/summary-$PART.txt" "$OUT/logs-$PART.tar.gz" "$OUT/RECORDS-$PART.diff"  # this part's files of a former run
: > "$LOGS/steps.tsv"
: > "$LOGS/notes.txt"
note() { echo "$*" >> "$LOGS/notes.txt"; }

# --- the interpreter, the wheels the image lacks, Fashion-MNIST -------------------------------------------------
FMNIST=/usr/share/datasets/fashion-mnist
if [ -n "${PY:-}" ]; then
  :  # given (the suite's dry run)
elif [ -x .venv/bin/python ]; then  # a checkout set up by scripts/setup.sh (.venv never travels to a lent machine)
  PY=$REPO/.venv/bin/python
elif [ -d .gpu/wheels ]; then  # a lent GPU machine: its python3 has torch
  PY=python3
  missing_wheels=()
  if [ -d .gpu/wheels-if-missing ]; then
    # a wheel goes in when the image lacks its distribution or has an older version of it
    mapfile -t missing_wheels < <("$PY" - .gpu/wheels-if-missing/*.whl <<'EOF'
import importlib.metadata as md, os, re, sys
try:
    from packaging.version import Version
except ImportError:
    Version = None
for wheel in sys.argv[1:]:
    name, version = os.path.basename(wheel).split("-")[:2]
    try:
        have = md.version(re.sub(r"[-_.]+", "-", name).lower())
    except md.PackageNotFoundError:
        print(wheel)
        continue
    if Version is not None and Version(have) < Version(version):
        print(wheel)
EOF
    )
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .gpu/wheels/*.whl \
    ${missing_wheels[@]+"${missing_wheels[@]}"}
  note "installed into /tmp/site: $(cd .gpu/wheels && ls -- *.whl | tr '\n' ' ')"
  [ ${#missing_wheels[@]} = 0 ] || note "  and, as the image lacks them or has older ones:" \
    "$(printf '%s ' "${missing_wheels[@]##*/}")"
  export PYTHONPATH="/tmp/site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
else
  bash scripts/setup.sh
  PY=$REPO/.venv/bin/python
fi
if [ ! -s "$FMNIST/train-images-idx3-ubyte.gz" ] && [ -d .gpu/fashion-mnist ]; then
  mkdir -p "$FMNIST" && cp .gpu/fashion-mnist/*.gz "$FMNIST/"
fi
export PYTHONUNBUFFERED=1 COLUMNS=160 LOGITCACHE_BENCH_OUT=$SCRATCH/bench
QUICK_FLAG=()
[ "$QUICK" = 1 ] && QUICK_FLAG=(--quick)
GS=(--work "$SCRATCH" --device "$DEVICE" ${QUICK_FLAG[@]+"${QUICK_FLAG[@]}"})  # scripts/gpu_steps.py's common options

# --- the machine ----------------------------------------------------------------------------------------------------
{
  memory=$(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)
  echo "host $(hostname), $(nproc --all) cores, $memory memory, load average $(cut -d' ' -f1-3 /proc/loadavg)"
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader 2>&1 | sed 's/^/GPU /'
  else
    echo "no nvidia-smi"
  fi
  "$PY" - <<'EOF'
import importlib.metadata as md, sys
names = ("torch", "torchvision", "zarr", "numcodecs", "typer", "rich", "pytest", "timm")
def version(n):
    try:
        return md.version(n)
    except md.PackageNotFoundError:
        return "MISSING"
print(f"python {sys.version.split()[0]};", ", ".join(f"{n} {version(n)}" for n in names))
EOF
  if [ "$DEVICE" = cuda ]; then
    "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available:', \
torch.cuda.is_available(), 'GPUs:', torch.cuda.device_count(), 'bf16:', torch.cuda.is_available() and \
torch.cuda.is_bf16_supported())" 2>&1 | tail -1
  fi
} > "$LOGS/machine.txt" 2>&1 || true
cat "$LOGS/machine.txt"

# --- steps ----------------------------------------------------------------------------------------------------------
FAILED=0
record() {  # record NAME STATUS SECONDS LIMIT
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$LOGS/steps.tsv"
  case "$2" in
    ok) echo "$1: ok in $3 s" ;;
    skipped*) echo "$1: $2" ;;
    *) FAILED=1; if [ "$4" = 0 ]; then echo "$1: $2"; else echo "$1: $2 in $3 s"; fi ;;  # 0: never started
  esac
}
skip() { record "$1" "skipped ($2)" 0 0; }
reap() {  # reap MARK: kill what a timed-out step left behind (torchrun starts its ranks in sessions of their own)
  local pid
  for pid in $(grep -lzsx "LOGITCACHE_GPU_STEP=$1" /proc/[0-9]*/environ | cut -d/ -f3); do
    kill -9 "$pid" 2> /dev/null || true
  done
}
step() {  # step NAME LIMIT COMMAND...: run it under `timeout`, log it, record its status and seconds
  local name=$1 limit=$2 start=$SECONDS rc=0 left mark
  shift 2
  left=$((BUDGET - (SECONDS - T0)))
  if [ "$left" -lt 20 ]; then
    record "$name" "FAILED (not started: budget spent)" 0 0
    return 0
  fi
  [ "$limit" -le "$left" ] || limit=$left
  mark="$name.$$.$RANDOM"  # in the environment of every process the step starts
  LOGITCACHE_GPU_STEP=$mark timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1 || rc=$?
  case $rc in
    0) record "$name" ok $((SECONDS - start)) "$limit" ;;
    124|137) reap "$mark"; record "$name" "TIMEOUT" $((SECONDS - start)) "$limit" ;;
    *) record "$name" "FAILED (exit $rc)" $((SECONDS - start)) "$limit" ;;
  esac
}
finish() {  # the summary and the tar, however the part ends
  local rc=$?
  trap - EXIT
  if [ -f "$SCRATCH/benchmarks/RECORDS.md" ] && ! cmp -s benchmarks/RECORDS.md "$SCRATCH/benchmarks/RECORDS.md"; then
    diff -u --label a/benchmarks/RECORDS.md --label b/benchmarks/RECORDS.md benchmarks/RECORDS.md \
      "$SCRATCH/benchmarks/RECORDS.md" > "$OUT/RECORDS-$PART.diff" || true  # applies with `git apply`
  fi
  if [ -f "$SCRATCH/.copied" ]; then  # plots the benchmarks drew go into the tar
    find "$SCRATCH/benchmarks" -name '*.png' -newer "$SCRATCH/.copied" -exec cp {} "$LOGS/" \;
  fi
  "$PY" scripts/gpu_steps.py summary --steps "$LOGS/steps.tsv" --logs "$LOGS" --machine "$LOGS/machine.txt" \
    --notes "$LOGS/notes.txt" --out "$OUT/summary-$PART.txt" --part "$PART" --device "$DEVICE" \
    --elapsed $((SECONDS - T0)) --budget "$BUDGET" $([ "$QUICK" = 1 ] && echo --quick) || {
    rc=1  # the plain tables, then
    cat "$LOGS/machine.txt" "$LOGS/steps.tsv" "$LOGS/notes.txt" > "$OUT/summary-$PART.txt" 2> /dev/null || true
  }
  tar -czf "$OUT/logs-$PART.tar.gz" -C "$SCRATCH" logs || rc=1
  [ "${KEEP_SCRATCH:-0}" = 1 ] || rm -rf "$SCRATCH"
  echo "total: $((SECONDS - T0)) s; $OUT holds: $(cd "$OUT" && ls | tr '\n' ' ')"
  if [ "$FAILED" = 0 ] && [ "$rc" = 0 ]; then exit 0; fi
  exit 1
}
trap finish EXIT

# Fail fast when the interpreter lacks what every step imports.
NEEDED=(torch torchvision zarr numcodecs typer rich safetensors numpy PIL)
[ "$PART-$DEVICE" = correctness-cuda ] && NEEDED+=(pytest)
missing=$("$PY" -c "import importlib.util as u, sys
print(' '.join(n for n in sys.argv[1:] if u.find_spec(n) is None))" "${NEEDED[@]}")
if [ -n "$missing" ]; then
  note "the interpreter $PY lacks: $missing (run scripts/gpu_prepare.sh where PyPI is reachable and carry .gpu)"
  record setup "FAILED (missing $missing)" 0 0
  exit 1
fi

if [ "$PART" = correctness ]; then
  SYNC=(env LOGITCACHE_SYNC_DEBUG=error)  # for the steps that train (not for the suite's tests)
  note "kd-*, torchrun-train and checks train under LOGITCACHE_SYNC_DEBUG=error: on CUDA a host sync in a" \
    "steady-state training step raises"
  if [ "$QUICK" = 1 ]; then
    KD100=topk,sampled KD5000=topk8,headtail ENC_CLASSES=100 PRECISIONS=bf16,fp16 LIMIT=60
    note "quick: toy sizes (256 SYNTHETIC samples, 2 views, 1 epoch, small-resnet8-w8, chunks of 64 rows);" \
      "encodings topk,sampled at 100 classes and topk8,headtail at 5000 (on a GPU: all six at both);" \
      "--encode-on device == host at 100 classes only (on a GPU: 100 and 5000)"
  else
    KD100=full,topk,quantized,topk8,headtail,sampled KD5000=$KD100 ENC_CLASSES=100,5000 PRECISIONS=fp32,bf16,fp16
    LIMIT=150
    note "SYNTHETIC data: 2048 random 3x32x32 images (test: 512), 2 views, students 2 epochs; small-resnet8;" \
      "kd-* build and train at --precision auto (bf16 where the GPU has it); checks trains at fp32, bf16 and fp16"
  fi
  note "topk8 at 5000 classes stores --tail-shape flat (a 5000 x 5000 tail table is refused above 4096 classes)"
  GPUS=0
  if [ "$DEVICE" = cuda ] && command -v nvidia-smi > /dev/null; then
    GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  fi
  if [ "$GPUS" -ge 2 ]; then
    RANKS=$GPUS RANK_DEVICE=cuda RANK_ENV=()
    note "multi-rank checks: $RANKS ranks, one per GPU (NCCL)"
  else
    RANKS=2 RANK_DEVICE=cpu RANK_ENV=(CUDA_VISIBLE_DEVICES=)
    note "multi-rank checks: the torchrun steps ran on 2 CPU (gloo) ranks with --device cpu" \
      "($([ "$DEVICE" = cuda ] && echo "one GPU: a world of 1 forms no process group" || echo "the CPU dry run"))"
  fi
  mapfile -t BUILD_SIZE < <("$PY" scripts/gpu_steps.py options build ${QUICK_FLAG[@]+"${QUICK_FLAG[@]}"})
  mapfile -t TRAIN_SIZE < <("$PY" scripts/gpu_steps.py options train ${QUICK_FLAG[@]+"${QUICK_FLAG[@]}"})
  TORCHRUN=(env ${RANK_ENV[@]+"${RANK_ENV[@]}"} "$PY" -m torch.distributed.run --standalone --nproc-per-node "$RANKS"
    --log-dir "$SCRATCH/torchrun")

  if [ "$DEVICE" = cuda ]; then
    mapfile -t GPU_TEST_FILES < <(grep -l 'pytest.mark.gpu' tests/test_*.py)
    step gpu-tests 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu "${GPU_TEST_FILES[@]}"
  else
    skip gpu-tests "no CUDA: every GPU-marked test skips"
  fi
  step kd-100 "$LIMIT" "${SYNC[@]}" "$PY" scripts/gpu_steps.py kd --classes 100 --encodings "$KD100" "${GS[@]}"
  step kd-5000 $((LIMIT + 30)) "${SYNC[@]}" "$PY" scripts/gpu_steps.py kd --classes 5000 --encodings "$KD5000" \
    "${GS[@]}"
  # the teacher of the torchrun steps and of the single-process twin in checks is kd-100's
  step torchrun-build "$LIMIT" "${TORCHRUN[@]}" -m logitcache build --teacher "$SCRATCH/teacher-100" \
    "${BUILD_SIZE[@]}" --encoding topk --precision fp32 --device "$RANK_DEVICE" --out "$SCRATCH/multi-fp32" \
    --overwrite --quiet
  step torchrun-train "$LIMIT" "${SYNC[@]}" "${TORCHRUN[@]}" -m logitcache train --out "$SCRATCH/ddp-student" \
    --kd cached --cache "$SCRATCH/multi-fp32" "${TRAIN_SIZE[@]}" --device "$RANK_DEVICE" --overwrite --quiet
  step checks "$LIMIT" "${SYNC[@]}" "$PY" scripts/gpu_steps.py checks --multi "$SCRATCH/multi-fp32" \
    --multi-device "$RANK_DEVICE" --encode-classes "$ENC_CLASSES" --precisions "$PRECISIONS" "${GS[@]}"
  if [ "$DEVICE" = cpu ]; then
    note "checks on the CPU: --encode-on device encodes on the CPU, and bf16/fp16 run under CPU autocast:" \
      "the plumbing is checked, not a GPU's numerics"
  fi
else
  if [ ! -s "$FMNIST/train-images-idx3-ubyte.gz" ]; then
    note "no Fashion-MNIST at $FMNIST: the benchmarks need it (scripts/gpu_prepare.sh puts it into .gpu)"
    record setup "FAILED (no Fashion-MNIST)" 0 0
    exit 1
  fi
  # The benchmarks run from a copy in $SCRATCH (as `python benchmarks/bench_X.py`, the command their records show),
  # so that what they record lands in the copy's RECORDS.md, diffed into $OUT.
  rm -rf "$SCRATCH/benchmarks" && cp -r benchmarks "$SCRATCH/benchmarks" && touch "$SCRATCH/.copied"
  BENCH=(env -C "$SCRATCH" "$PY")
  BUILD=(--samples 10000 --views 2 --reps 2 --workers 8 --precisions fp32,bf16,fp16 --encode-on auto,host,device
    --device "$DEVICE")
  STEP=(--samples 12000 --reps 3 --workers 8)
  SEQUENCE=(--samples 20000 --model small-resnet20-w16 --epochs 4 --seeds 1 --scratch-budgets 0.5,1.0
    --kd-budgets 0.5,1.0 --throughout-budgets "" --sweep-lrs "" --online-budget 0.5 --workers 8)
  # every option of the GPU command lines is one the benchmark declares (read from its source: no time lost)
  step bench-options 30 "$PY" scripts/gpu_steps.py bench-options "benchmarks/bench_build.py ${BUILD[*]}" \
    "benchmarks/bench_step.py ${STEP[*]}" "benchmarks/bench_sequence.py ${SEQUENCE[*]}"
  if [ "$QUICK" = 1 ]; then
    # Toy sizes rather than the benchmark's --quick (which fixes 2,048 samples and records nothing).
    step build-throughput 90 "${BENCH[@]}" benchmarks/bench_build.py --samples 64 --views 1 --reps 1 --workers 0 \
      --precisions fp32,bf16 --encode-on auto,host,device --device "$DEVICE"
    note "quick: build-throughput at 64 samples x 1 view, fp32 and bf16 (fp16 autocast on a CPU is emulated: minutes)"
    # bench_step and bench_sequence train several models and score the whole test set: minutes on 2 cores. Their
    # --quick modes run in tests/test_benchmarks_smoke.py; bench-options checked their GPU options.
    skip step-overhead "quick: minutes on 2 cores"
    skip sequence-study "quick: minutes on 2 cores"
  else
    step build-throughput 150 "${BENCH[@]}" benchmarks/bench_build.py "${BUILD[@]}"
    step step-overhead 120 "${BENCH[@]}" benchmarks/bench_step.py "${STEP[@]}"
    step sequence-study 200 "${BENCH[@]}" benchmarks/bench_sequence.py "${SEQUENCE[@]}"
  fi
fi
