#!/usr/bin/env bash
# Unpacks NVIDIA's NVRTC, ptxas and CUDA headers from their PyPI wheels into DIR, for the CUDA
# codegen test (tests/tests/cuda_codegen.rs), which reads the folder from MEGABYTE_CUDA_TOOLS.
# No GPU or driver is needed. Usage: scripts/install-cuda-tools.sh DIR
set -euo pipefail
dir=${1:?usage: scripts/install-cuda-tools.sh DIR}
if [ -x "$dir/nvidia/cuda_nvcc/bin/ptxas" ] && [ -f "$dir/nvidia/cuda_nvrtc/lib/libnvrtc.so.12" ]; then
    exit 0
fi
mkdir -p "$dir/wheels"
python3 -m pip download --quiet --no-deps --dest "$dir/wheels" \
    nvidia-cuda-nvrtc-cu12==12.9.86 nvidia-cuda-nvcc-cu12==12.9.86 \
    nvidia-cuda-runtime-cu12==12.9.79 nvidia-cuda-cccl-cu12==12.9.27
for w in "$dir"/wheels/*.whl; do
    python3 -m zipfile -e "$w" "$dir"
done
chmod +x "$dir/nvidia/cuda_nvcc/bin/ptxas"
rm -rf "$dir/wheels"
echo "CUDA tools in $dir"
