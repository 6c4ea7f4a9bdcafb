#!/usr/bin/env bash
# Idempotent set-up on a fresh machine: Fashion-MNIST from Debian (when apt is available), a venv with the pinned
# torch/torchvision wheels, and logitcache installed in editable mode with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null
  else
    echo "note: Debian's dataset-fashion-mnist is not installed; torchvision will download Fashion-MNIST" >&2
  fi
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv

stamp=.venv/.logitcache-installed
want=$(cat pyproject.toml scripts/setup.sh scripts/constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # Exact pins only here (the package itself declares ranges): constraints.txt is a known-good set, so the resolver
  # never backtracks into incompatible s3fs/botocore pairs. pip on Python 3.11 takes torch from local wheels.
  .venv/bin/pip install -q --disable-pip-version-check -c scripts/constraints.txt torch==2.14.1 torchvision==0.29.1
  .venv/bin/pip install -q --disable-pip-version-check -c scripts/constraints.txt -e '.[test]'
  echo "$want" > "$stamp"
fi
