#!/usr/bin/env bash
# Fills .gpu/ (ignored by git) HERE, where PyPI and Debian's packages are reachable, for scripts/gpu_check.sh on a lent
# GPU machine, which reaches nothing (pass .gpu as the device run's `carry`; it must stay under 64 MiB):
#   .gpu/wheels/             Python 3.12 wheels of zarr, numcodecs, donfig and google-crc32c, which the image lacks:
#                            gpu_check.sh always installs them;
#   .gpu/wheels-if-missing/  Python 3.12 wheels of the rest of what logitcache and pytest import (typer, rich, pydantic,
#                            safetensors, pytest, ...; not torch, torchvision, numpy or pillow, which the image has):
#                            gpu_check.sh installs those the image lacks, so a bare image still runs;
#   .gpu/fashion-mnist/      Fashion-MNIST's four files from Debian's dataset-fashion-mnist (installed here with apt
#                            when root, else an error says how), which the benchmarks read.
# Versions: those of this checkout's .venv (scripts/setup.sh makes it), a known-good set.
set -euo pipefail
cd "$(dirname "$0")/.."
FMNIST=/usr/share/datasets/fashion-mnist
FILES=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)
have_fmnist() { for f in "${FILES[@]}"; do [ -s "$FMNIST/$f" ] || return 1; done; }

if ! have_fmnist; then
  if command -v apt-get > /dev/null && [ "$(id -u)" = 0 ]; then
    echo "Fashion-MNIST is not at $FMNIST: installing Debian's dataset-fashion-mnist"
    apt-get update -q > /dev/null && apt-get install -y -q dataset-fashion-mnist > /dev/null
  fi
  if ! have_fmnist; then
    echo "error: Fashion-MNIST is not at $FMNIST (${FILES[*]}); install Debian's dataset-fashion-mnist" \
      "(as root: apt-get update && apt-get install dataset-fashion-mnist) and run this again" >&2
    exit 1
  fi
fi
[ -x .venv/bin/python ] || bash scripts/setup.sh

rm -rf .gpu/wheels .gpu/wheels-if-missing .gpu/fashion-mnist
mkdir -p .gpu/wheels .gpu/wheels-if-missing .gpu/fashion-mnist
# name==version lines: the four the image lacks, then the rest of logitcache's and pytest's requirements for Python
# 3.12 on Linux, as installed in .venv, less what torch and torchvision bring.
.venv/bin/python - > .gpu/requirements.txt <<'EOF'
import importlib.metadata as md
from packaging.markers import default_environment
from packaging.requirements import Requirement

env = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
       "platform_system": "Linux"}
ALWAYS = ["zarr", "numcodecs", "donfig", "google-crc32c"]
IMAGE = {"torch", "torchvision", "numpy", "pillow"}

def norm(name):
    return name.lower().replace("_", "-").replace(".", "-")

def requires(name):
    for r in md.requires(name) or []:
        req = Requirement(r)
        if req.marker is None or req.marker.evaluate({**env, "extra": ""}):
            yield norm(req.name)

def closure(roots, stop):
    seen, todo = set(), list(roots)
    while todo:
        n = todo.pop()
        if n in seen or n in stop:
            continue
        seen.add(n)
        todo += requires(n)
    return seen

image = closure(IMAGE, set())
always = closure(ALWAYS, image) & set(ALWAYS)
rest = closure(["logitcache", "pytest", *ALWAYS], image) - always - {"logitcache"}
for group, names in (("always", always), ("if-missing", rest)):
    for n in sorted(names):
        print(group, f"{n}=={md.version(n)}")
EOF
download() {  # download DIR REQUIREMENT...: Python 3.12 wheels for Linux x86-64
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$1" "${@:2}"
}
mapfile -t ALWAYS < <(awk '$1 == "always" {print $2}' .gpu/requirements.txt)
mapfile -t IF_MISSING < <(awk '$1 == "if-missing" {print $2}' .gpu/requirements.txt)
download .gpu/wheels "${ALWAYS[@]}"
download .gpu/wheels-if-missing "${IF_MISSING[@]}"
cp "${FILES[@]/#/$FMNIST/}" .gpu/fashion-mnist/
echo "wheels: ${ALWAYS[*]}; if missing: ${IF_MISSING[*]}"
size=$(du -sm .gpu | cut -f1)
echo "$(du -sh .gpu | cut -f1) in .gpu (carry limit 64 MiB, shared with anything else carried)"
if [ "$size" -ge 60 ]; then
  echo "error: .gpu is ${size} MiB, too close to the 64 MiB carry limit" >&2
  exit 1
fi
