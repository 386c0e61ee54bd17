#!/usr/bin/env bash
# Rebuilds the Rust-source corpus and trains the `small` preset on it, then reports held-out bits
# per byte next to order-0 entropy, `zstd -19` and `xz -9` on the same held-out bytes.
# Usage: scripts/train-shipped.sh [OUT_DIR] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-models}
steps=${2:-900}
mkdir -p "$out"
corpus="$out/corpus.txt"
scripts/build-corpus.sh "$corpus"
cargo build --release -p megabyte
./target/release/megabyte train --data "$corpus" --preset small --steps "$steps" --batch 2 \
    --lr 2e-3 --min-lr 2e-4 --eval-every 150 --val-bytes 16384 --seed 1 --save-dtype f16 \
    --out "$out/small-code.safetensors"
# The trainer holds out the last 5% of the corpus and validates on its first 16 KiB.
python3 - "$corpus" "$out/heldout.txt" <<'PY'
import sys
data = open(sys.argv[1], "rb").read()
held = data[len(data) - max(int(len(data) * 0.05), 2048):][:16384]
open(sys.argv[2], "wb").write(held)
PY
held="$out/heldout.txt"
n=$(wc -c < "$held")
./target/release/megabyte eval --checkpoint "$out/small-code.safetensors" "$held"
python3 - "$held" <<'PY'
import collections, math, sys
d = open(sys.argv[1], "rb").read()
c = collections.Counter(d)
print(f"order-0 entropy: {-sum(v / len(d) * math.log2(v / len(d)) for v in c.values()):.4f} bits per byte")
PY
echo "zstd -19: $(python3 -c "print(f'{$(zstd -19 -c "$held" | wc -c) * 8 / $n:.4f}')") bits per byte"
echo "xz -9:    $(python3 -c "print(f'{$(xz -9 -c "$held" | wc -c) * 8 / $n:.4f}')") bits per byte"
