#!/usr/bin/env bash
# Unpacks NVIDIA's NVRTC, ptxas, nvdisasm and CUDA headers from their PyPI wheels into DIR, for
# the CUDA codegen test (tests/tests/cuda_codegen.rs), which reads the folder from
# MEGABYTE_CUDA_TOOLS and loads NVRTC (through cudarc) from
# LD_LIBRARY_PATH=DIR/nvidia/cuda_nvrtc/lib. (nvdisasm has no CUDA 12 wheel; 13.5 disassembles
# ptxas 12.9's sm_90.)
# No GPU or driver is needed. Usage: scripts/install-cuda-tools.sh DIR
set -euo pipefail
dir=${1:?usage: scripts/install-cuda-tools.sh DIR}
if [ -x "$dir/nvidia/cuda_nvcc/bin/ptxas" ] && [ -f "$dir/nvidia/cuda_nvrtc/lib/libnvrtc.so.12" ] \
    && [ -x "$dir/nvidia/cu13/bin/nvdisasm" ]; then
    exit 0
fi
mkdir -p "$dir/wheels"
python3 -m pip download --quiet --no-deps --dest "$dir/wheels" \
    nvidia-cuda-nvrtc-cu12==12.9.86 nvidia-cuda-nvcc-cu12==12.9.86 \
    nvidia-cuda-runtime-cu12==12.9.79 nvidia-cuda-cccl-cu12==12.9.27 \
    nvidia-cuda-nvdisasm==13.5.37
for w in "$dir"/wheels/*.whl; do
    python3 -m zipfile -e "$w" "$dir"
done
chmod +x "$dir/nvidia/cuda_nvcc/bin/ptxas" "$dir/nvidia/cu13/bin/nvdisasm"
rm -rf "$dir/wheels"
echo "CUDA tools in $dir"
