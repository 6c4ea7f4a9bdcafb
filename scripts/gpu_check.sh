#!/usr/bin/env bash
# The GPU/NCCL check of issue 6, as one script for a lent GPU machine (a few minutes):
# single-GPU build equals a torchrun build bitwise, and DDP `train --kd cached` runs on every GPU present.
# NCCL refuses two ranks on one GPU, so with one GPU the torchrun runs use one rank (the CUDA path, not NCCL).
# On a bare GPU machine (no network): run scripts/gpu_prepare.sh here first and carry .gpu; elsewhere the project's
# own set-up runs.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .gpu/wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
  if [ ! -d /usr/share/datasets/fashion-mnist ]; then mkdir -p /usr/share/datasets; cp -r .gpu/fashion-mnist /usr/share/datasets/; fi
  PY=python3
else
  bash scripts/setup.sh
  PY=.venv/bin/python
fi
export PYTHONUNBUFFERED=1
lc() { "$PY" -m logitcache "$@"; }
torchrun() { "$PY" -m torch.distributed.run "$@"; }
GPUS=$("$PY" -c "import torch; print(max(1, torch.cuda.device_count()))")
OUT=${OUT:-/tmp/logitcache-gpu}; rm -rf "$OUT"; mkdir -p "$OUT"
COMMON=(--dataset fashion-mnist --limit 4096 --views 2 --chunk-rows 512 --encoding topk --quiet)
lc train --out "$OUT/teacher" --epochs 1 --limit 4096 --test-limit 1024 --quiet
lc build --teacher "$OUT/teacher" "${COMMON[@]}" --out "$OUT/single"
torchrun --standalone --nproc-per-node "$GPUS" -m logitcache build --teacher "$OUT/teacher" "${COMMON[@]}" --out "$OUT/multi"
"$PY" - "$OUT" <<'PY'
import sys, zarr
a, b = (zarr.open_group(f"{sys.argv[1]}/{n}", mode="r") for n in ("single", "multi"))
for name in ("ids", "logprobs", "tail", "tail_soft", "labels", "complete"):
    assert a[name][...].tobytes() == b[name][...].tobytes(), name
print("torchrun build == single-process build, bitwise")
PY
torchrun --standalone --nproc-per-node "$GPUS" -m logitcache train --out "$OUT/student" --kd cached \
  --cache "$OUT/multi" --epochs 2 --limit 4096 --test-limit 1024 --quiet
"$PY" -c "import json,sys; rows=[json.loads(l) for l in open('$OUT/student/metrics.jsonl')]; print(rows); assert len(rows)==2; import torch; d=json.load(open('$OUT/student/config.json'))['device']; print('device', d); assert d.startswith('cuda') or not torch.cuda.is_available()"
echo "GPU check passed on $GPUS GPU(s)"
