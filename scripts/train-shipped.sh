#!/usr/bin/env bash
# Rebuilds the shipped model: the `small` preset trained on the Python 3.11 documentation
# sources (scripts/build-pydoc-corpus.sh), then exported as f16 weights, and reports held-out
# bits per byte next to order-0 entropy, `zstd -19` and `xz -9` on the same held-out bytes
# (the first 16 KiB of the held-out part, and the whole held-out part).
# Usage: scripts/train-shipped.sh [OUT_DIR]
# The shipped checkpoint's run stopped at step 600 of a 1400-step schedule and resumed to 2300
# steps; this script runs the same two phases. About 95 minutes on two CPU cores (lavapipe).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/shipped}
mkdir -p "$out"
corpus="$out/pydoc.txt"
scripts/build-pydoc-corpus.sh "$corpus"
cargo build --release -p megabyte
bin=./target/release/megabyte
ckpt="$out/small-pydoc.train.safetensors"
common=(--data "$corpus" --preset small --batch 4 --seq 1024 --lr 3e-3 --min-lr 3e-4
        --eval-every 200 --val-bytes 16384 --seed 1 --save-dtype f16 --out "$ckpt")
"$bin" train "${common[@]}" --steps 1400 --stop-after 600
"$bin" train "${common[@]}" --steps 2300 --resume "$ckpt"
"$bin" export --checkpoint "$ckpt" --out "$out/small-pydoc.safetensors"
# The trainer holds out the last 5% of the corpus and validates on its first 16 KiB.
python3 - "$corpus" "$out" <<'PY'
import sys
data = open(sys.argv[1], "rb").read()
held = data[len(data) - int(len(data) * 0.05):]
open(sys.argv[2] + "/heldout-16k.txt", "wb").write(held[:16384])
open(sys.argv[2] + "/heldout-all.txt", "wb").write(held)
PY
for held in "$out/heldout-16k.txt" "$out/heldout-all.txt"; do
    n=$(wc -c < "$held")
    echo "== $held ($n bytes)"
    "$bin" eval --checkpoint "$out/small-pydoc.safetensors" "$held"
    python3 - "$held" <<'PY'
import collections, math, sys
d = open(sys.argv[1], "rb").read()
c = collections.Counter(d)
print(f"order-0 entropy: {-sum(v / len(d) * math.log2(v / len(d)) for v in c.values()):.4f} bits per byte")
PY
    echo "zstd -19: $(python3 -c "print(f'{$(zstd -19 -c "$held" | wc -c) * 8 / $n:.4f}')") bits per byte"
    echo "xz -9:    $(python3 -c "print(f'{$(xz -9 -c "$held" | wc -c) * 8 / $n:.4f}')") bits per byte"
done
