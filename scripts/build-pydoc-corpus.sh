#!/usr/bin/env bash
# Builds an English prose corpus: the reStructuredText sources of Python 3.11's documentation
# (tutorial, HOWTOs, FAQ, language reference, library reference), as Debian's `python3.11-doc`
# package ships them. The documentation is under the PSF License 2.0; the code examples in it
# are also under the Zero-Clause BSD licence (see copyright.rst.txt in the package).
# Usage: scripts/build-pydoc-corpus.sh OUT_FILE
# Needs `apt-get download` (no root) and `dpkg-deb`. The package version is pinned so that the
# corpus, and the held-out bytes at its end, are the same on every machine; a mirror that no
# longer carries it gives a clear error.
set -euo pipefail
out=${1:?usage: scripts/build-pydoc-corpus.sh OUT_FILE}
version=3.11.2-6+deb12u7
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -qq "python3.11-doc=$version" 2>/dev/null) || {
    echo "cannot download python3.11-doc=$version (apt-cache policy python3.11-doc lists what the mirror has)" >&2
    exit 1
}
dpkg-deb -x "$work"/python3.11-doc_*.deb "$work/x"
src="$work/x/usr/share/doc/python3.11/html/_sources"
: > "$out"
for part in tutorial howto faq reference library; do
    find "$src/$part" -name '*.rst.txt' | LC_ALL=C sort | while read -r f; do cat "$f"; done >> "$out"
done
echo "$out: $(wc -c < "$out") bytes" >&2
