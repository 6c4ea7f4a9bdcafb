#!/usr/bin/env bash
# Run HERE (where PyPI and Debian's Fashion-MNIST are reachable) before `scripts/gpu_check.sh` on a lent GPU machine,
# which reaches nothing: gathers into .gpu/ (ignored by git; pass it as the device run's `carry`) the Python 3.12
# wheels its image lacks and the Fashion-MNIST files.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu/wheels .gpu/fashion-mnist
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/wheels zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
cp /usr/share/datasets/fashion-mnist/*.gz .gpu/fashion-mnist/
du -sh .gpu
