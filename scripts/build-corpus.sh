#!/usr/bin/env bash
# Builds a Rust-source training corpus from crates this workspace already depends on (all MIT
# and/or Apache-2.0 licensed), as they sit in cargo's registry after `cargo fetch`.
# Usage: scripts/build-corpus.sh OUT_FILE [MAX_FILE_BYTES]
# Files larger than MAX_FILE_BYTES (default 60000) are skipped: they are mostly generated
# tables, which any compressor (and any model) finds trivially predictable. regex-syntax's
# generated Unicode tables are left out whatever their size: they are lists of code points.
set -euo pipefail
out=${1:?usage: scripts/build-corpus.sh OUT_FILE [MAX_FILE_BYTES]}
max=${2:-60000}
cd "$(dirname "$0")/.."
cargo fetch --quiet
registry=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/ | head -n1)
names=(rand_core rand_chacha rand half thiserror thiserror-impl safetensors proptest clap_builder
       clap_lex libm regex-syntax)
# Each name at the version Cargo.lock pins (the first one listed when there are several).
crates=()
for n in "${names[@]}"; do
    v=$(awk -v n="$n" '$1 == "name" && $3 == "\""n"\"" { getline; gsub(/"/, "", $3); print $3; exit }' Cargo.lock)
    [ -n "$v" ] && crates+=("$n-$v")
done
: > "$out"
for c in "${crates[@]}"; do
    dir="$registry/$c"
    if [ ! -d "$dir" ]; then
        echo "missing $dir (not in this lockfile's registry cache); skipped" >&2
        continue
    fi
    find "$dir" -name '*.rs' -size -"${max}"c -not -path '*/unicode_tables/*' | LC_ALL=C sort |
        while read -r f; do cat "$f"; done >> "$out"
done
echo "$out: $(wc -c < "$out") bytes" >&2
