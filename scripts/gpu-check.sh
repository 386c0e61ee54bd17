#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: runs the whole test suite and the kernel benches on CUDA and
# prints a table (kernel, shape, time, TFLOP/s or GB/s, fraction of the device's peak).
#
#   scripts/gpu-check.sh                 # tests + gemm and attention benches
#   BENCHES="gemm attention layer_norm" PEAK_TFLOPS=67 scripts/gpu-check.sh
#
# PEAK_TFLOPS: the device's f32 (non-tensor-core) peak; guessed from nvidia-smi for A100/H100/
# H200/L4, otherwise left out of the table. FEATURES=wgpu runs the same on wgpu (no GPU needed;
# used to check this script).
set -euo pipefail
cd "$(dirname "$0")/.."
features=${FEATURES:-cuda}
benches=${BENCHES:-gemm attention}
if [ -z "${PEAK_TFLOPS:-}" ] && command -v nvidia-smi >/dev/null 2>&1; then
    case "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n1)" in
        *H200*|*H100*SXM*|*H100\ 80GB\ HBM3*) PEAK_TFLOPS=67 ;;
        *H100*) PEAK_TFLOPS=51 ;;
        *A100*) PEAK_TFLOPS=19.5 ;;
        *L4*) PEAK_TFLOPS=30 ;;
    esac
fi
feature_args=()
[ "$features" != wgpu ] && feature_args=(--features "$features")
if [ -z "${SKIP_TESTS:-}" ]; then
    echo "== cargo test -p megabyte-tests ${feature_args[*]}"
    cargo test --release -p megabyte-tests "${feature_args[@]}" 2>&1 | grep -E "^test result|FAILED|panicked" || true
fi
log=$(mktemp)
for b in $benches; do
    echo "== bench $b"
    cargo bench -p megabyte-benches "${feature_args[@]}" --bench "$b" -- \
        --warm-up-time 1 --measurement-time 2 2>&1 | tee -a "$log" | grep -E "^[a-z_0-9]+/|time:|thrpt:" || true
done
# Criterion prints "group/id/param" then "time: [lo mid hi]" and "thrpt: [lo mid hi]".
python3 - "$log" "${PEAK_TFLOPS:-}" <<'PY'
import re, sys
log, peak = sys.argv[1], sys.argv[2]
peak = float(peak) if peak else None
name, time = None, None
rows = []
units = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}
for line in open(log, encoding="utf-8", errors="replace"):
    line = line.rstrip()
    if "%" in line:  # criterion's change-since-last-run lines
        continue
    m = re.match(r"^(\S+/\S+)\s*(time:.*)?$", line)
    if m and "/" in m.group(1) and not line.startswith(" "):
        name = m.group(1)
        line = m.group(2) or ""
    t = re.search(r"time:\s*\[\S+ \S+ (\S+) (\S+)", line)
    if t:
        time = float(t.group(1)) * units.get(t.group(2), 1)
    r = re.search(r"thrpt:\s*\[\S+ \S+ (\S+) (\S*?)(elem|B)/s", line)
    if r and name and time:
        value = float(r.group(1)) * scale.get(r.group(2), 1)
        flops = r.group(3) == "elem"
        rows.append((name, time, value, flops))
        name, time = None, None
print()
print("| kernel | shape | time | throughput | fraction of peak |")
print("| --- | --- | ---: | ---: | ---: |")
for name, time, value, flops in rows:
    kernel, _, shape = name.rpartition("/")
    kernel = kernel.split("/", 1)[-1]
    tp = f"{value / 1e12:.2f} TFLOP/s" if flops else f"{value / 1e9:.1f} GB/s"
    frac = f"{value / 1e12 / peak:.0%}" if flops and peak else ""
    print(f"| {kernel} | {shape} | {time * 1e3:.3f} ms | {tp} | {frac} |")
PY
