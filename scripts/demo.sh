#!/usr/bin/env bash
# The main job: the sequence-of-runs demo on real Fashion-MNIST (about 15 minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/logitcache demo "$@"
