#!/usr/bin/env bash
# The test suite (about 25 minutes on 2 CPU cores; `-m "not smoke"` skips the benchmarks' end-to-end runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
