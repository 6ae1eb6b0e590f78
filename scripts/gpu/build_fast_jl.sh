#!/usr/bin/env bash
# Build and install fast_jl (traker's CUDA projector) from its carried sdist, on the GPU machine,
# offline: scripts/gpu/run.sh starts it in the background. Its setup.py pins
# TORCH_CUDA_ARCH_LIST="7.0+PTX", which CUDA 13 no longer compiles (sm_70 was dropped): it is
# replaced by the GPU's own compute capability. Exit status 0 when `import fast_jl` works after.
# Usage: bash scripts/gpu/build_fast_jl.sh WHEELS_DIR
set -euo pipefail
WHEELS=$(cd "${1:-.gpu_wheels}" && pwd)
PY=${PYTHON:-python3}
SDIST=$(ls "$WHEELS"/fast_jl-*.tar.gz | head -n 1)
ARCH=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
WORK=$(mktemp -d /tmp/fast_jl.XXXXXX)
tar xzf "$SDIST" -C "$WORK"
cd "$WORK"/fast_jl-*
sed -i "s/7\.0+PTX/$ARCH/" setup.py
grep -n TORCH_CUDA_ARCH_LIST setup.py
echo "nvcc: $(command -v nvcc || echo none); CUDA_HOME=${CUDA_HOME:-unset}; arch $ARCH"
nvcc --version 2>/dev/null | tail -n 2 || true
MAX_JOBS=${MAX_JOBS:-4} "$PY" -m pip install --no-index --no-deps --no-build-isolation \
    --no-cache-dir --root-user-action=ignore .
cd /
"$PY" -c 'import torch, fast_jl; x = torch.zeros(8, 1000, device="cuda"); fast_jl.project_rademacher_8(x, 512, 0, torch.cuda.get_device_properties(0).multi_processor_count); print("fast_jl imports and runs")'
