#!/usr/bin/env bash
# A short sweep on real Fashion-MNIST through `logitcache sweep`: three learning rates, each member distilled from the
# best run so far (about 6 minutes on 2 CPU cores). Rerun it to see a finished sweep resume; pass --out DIR elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/logitcache sweep --out demo-out/sweep --grid lr=0.05,0.1,0.2 --set limit=10000 --set epochs=4 \
    --set model=small-resnet8-w8 --set test-limit=5000 --views 4 "$@"
