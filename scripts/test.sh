#!/usr/bin/env bash
# The test suite: pytest in 2 xdist workers (--dist loadgroup). The tests that start processes of their own
# (trainings, torchrun ranks, the benchmarks' and the GPU session's quick runs) share one worker and run one at a
# time; the single-process tests fill the other, so 2 cores stay busy without two heavy jobs colliding. About 11
# minutes on 2 CPU cores. `./scripts/test.sh -m "not smoke"` is the fast loop: it leaves out the end-to-end runs and
# the promises repeated on further layouts (pyproject.toml's `smoke` marker says which); the plain command runs all.
# LOGITCACHE_TEST_WORKERS=1 runs it in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
workers=${LOGITCACHE_TEST_WORKERS:-2}
if [ "$workers" -gt 1 ]; then
  exec .venv/bin/python -m pytest -n "$workers" --dist loadgroup "$@"
fi
exec .venv/bin/python -m pytest "$@"
