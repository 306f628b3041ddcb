#!/usr/bin/env bash
# Rewrites the ABI baseline from a built libsae.so (with debug info), for a release that adds
# functions on purpose. Never run it to make abi/check.sh pass after an incompatible change:
# that change needs a new SONAME instead.
#   abi/update.sh build/lib/libsae.so
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
lib=${1:?usage: abi/update.sh PATH/TO/libsae.so}
abidw --headers-dir "$root/include" --no-corpus-path --no-show-locs --no-comp-dir-path \
    --drop-undefined-syms --out-file "$root/abi/libsae.abi" "$lib"
# Source paths differ between checkouts; keep them relative so the file does not churn.
sed -i "s|path='[^']*/lib/|path='lib/|" "$root/abi/libsae.abi"
echo "abi/update.sh: wrote abi/libsae.abi ($(grep -c '<function-decl' "$root/abi/libsae.abi") functions)"
