#!/usr/bin/env bash
# Download, HERE (a machine with PyPI), what the offline GPU machine lacks to run fasttrak, its
# tests and benchmarks/gpu_*.py: CPython 3.12 manylinux x86_64 wheels into .gpu_wheels/ (git
# ignored), carried to the device by `run` (carry: [".gpu_wheels"]) and installed there by
# scripts/gpu/run.sh with pip --no-index --no-deps. See docs/gpu.md.
#
# What the device image lacks (its package list: /work/.library/device/KINDS.md, 2026-11):
#   zarr, numcodecs, donfig, google-crc32c  (fasttrak's store; zarr's other needs numpy,
#                                            packaging, typing-extensions, pyyaml are there)
#   traker==0.3.2                            (the reference TRAK, benchmarks only; PyPI has
#                                            only its sdist: built here into a pure-Python wheel)
#   fast_jl==0.1.3                           (traker's CUDA projector: sdist only, a CUDA
#                                            extension; carried as source and compiled there,
#                                            for sm_90, by run.sh in the background)
# torch, numpy, scipy, tqdm, click, pytest, hypothesis, transformers, peft, scikit-learn are in
# the image; a carried second version of any of them would shadow or break it, so none is
# carried. Versions are those this repository's .venv is tested with.
#
# Usage: bash scripts/gpu/fetch_wheels.sh [DEST]   (default DEST: .gpu_wheels)
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=${1:-.gpu_wheels}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
mkdir -p "$DEST"
rm -f "$DEST"/*.whl "$DEST"/*.tar.gz

# Binary wheels for the device's interpreter: CPython 3.12, x86-64, glibc manylinux.
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$tag")
done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" -d "$DEST" \
    zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0

# traker: sdist only on PyPI; its wheel is pure Python (py3-none-any), built here without
# its dependencies (torch, numpy, tqdm: in the image).
"$PY" -m pip wheel --quiet --no-deps -w "$DEST" traker==0.3.2

# fast_jl: sdist only, and its setup.py imports torch, so `pip download` cannot fetch it
# (pip runs setup.py to read its metadata); take the file from the index's simple page.
FASTJL_SHA256=216100e9778da38b906a3c2a18b7c9e93bc395576e6943c7f920c98cce179775
url=$(curl -fsSL https://pypi.org/simple/fast-jl/ \
    | grep -o 'https://[^"#]*fast_jl-0\.1\.3\.tar\.gz' | head -n 1)
curl -fsSL -o "$DEST/fast_jl-0.1.3.tar.gz" "$url"
echo "$FASTJL_SHA256  $DEST/fast_jl-0.1.3.tar.gz" | sha256sum -c --quiet

ls -l "$DEST"
du -sh "$DEST"
