#!/usr/bin/env bash
# The GPU/NCCL check of issue 6, as one script for a lent GPU machine (a few minutes):
# single-GPU build equals a torchrun build bitwise, and DDP `train --kd cached` runs on every GPU present.
# NCCL refuses two ranks on one GPU, so with one GPU the torchrun runs use one rank (the CUDA path, not NCCL).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
GPUS=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
OUT=${OUT:-/tmp/logitcache-gpu}; rm -rf "$OUT"; mkdir -p "$OUT"
COMMON=(--dataset fashion-mnist --limit 4096 --views 2 --chunk-rows 512 --encoding topk --quiet)
logitcache train --out "$OUT/teacher" --epochs 1 --limit 4096 --test-limit 1024 --quiet
logitcache build --teacher "$OUT/teacher" "${COMMON[@]}" --out "$OUT/single"
torchrun --standalone --nproc-per-node "$GPUS" -m logitcache build --teacher "$OUT/teacher" "${COMMON[@]}" --out "$OUT/multi"
python - "$OUT" <<'PY'
import sys, zarr
a, b = (zarr.open_group(f"{sys.argv[1]}/{n}", mode="r") for n in ("single", "multi"))
for name in ("ids", "logprobs", "tail", "labels", "complete"):
    assert a[name][...].tobytes() == b[name][...].tobytes(), name
print("torchrun build == single-process build, bitwise")
PY
torchrun --standalone --nproc-per-node "$GPUS" -m logitcache train --out "$OUT/student" --kd cached \
  --cache "$OUT/multi" --epochs 2 --limit 4096 --test-limit 1024 --quiet
python -c "import json,sys; rows=[json.loads(l) for l in open('$OUT/student/metrics.jsonl')]; print(rows); assert len(rows)==2; import torch; d=json.load(open('$OUT/student/config.json'))['device']; print('device', d); assert d.startswith('cuda') or not torch.cuda.is_available()"
echo "GPU check passed on $GPUS GPU(s)"
