#!/usr/bin/env bash
# Installs what the ROCm check (tests/tests/rocm_codegen.rs) needs from Debian bookworm's own
# archive: ROCm 5.2's hipcc with clang-15, the gfx90a device libraries and libamdhip64, and
# LLVM 15's clang-offload-bundler, llvm-readelf and llvm-objdump. No GPU is needed.
# Usage: scripts/install-rocm-tools.sh
set -euo pipefail
if command -v hipcc >/dev/null 2>&1 && command -v clang-offload-bundler-15 >/dev/null 2>&1 \
    && command -v llvm-readelf-15 >/dev/null 2>&1 && command -v llvm-objdump-15 >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq hipcc libamdhip64-dev >/dev/null
echo "ROCm tools: $(hipcc --version 2>/dev/null | grep -m1 -i 'HIP version' || echo hipcc)"
