#!/usr/bin/env bash
# The test suite: pytest in 2 xdist workers, so two tests run at once. Every process a test starts (trainings,
# torchrun ranks, DataLoader workers, the benchmarks' and the GPU session's quick runs) runs one thread
# (OMP_NUM_THREADS = a worker's share of the cores, tests/conftest.py), so two multi-process tests share the 2 cores
# without oversubscribing them. 8-9 minutes on 2 CPU cores. `./scripts/test.sh -m "not smoke"` is the fast loop:
# it leaves out the end-to-end runs and the promises repeated on further layouts (pyproject.toml's `smoke` marker says
# which); the plain command runs all.
# LOGITCACHE_TEST_WORKERS=1 runs it in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
workers=${LOGITCACHE_TEST_WORKERS:-2}
if [ "$workers" -gt 1 ]; then
  exec .venv/bin/python -m pytest -n "$workers" --dist load "$@"
fi
exec .venv/bin/python -m pytest "$@"
