#!/usr/bin/env bash
# The ABI guard: compares a built libsae.so (with debug info: RelWithDebInfo or Debug) against
# the committed baseline abi/libsae.abi with libabigail's abidiff, and fails on any change a
# program linked against the baseline could notice: a removed function or variable (abidiff's
# exit bit 8), or a changed one (a parameter, a return type, an enumerator's value, a struct
# layout reachable from the header: abidiff reports those with bit 4 only, so the summary is
# read too). Added functions pass; so do changes libabigail deems harmless (a new enumerator).
#   abi/check.sh build/lib/libsae.so
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
lib=${1:?usage: abi/check.sh PATH/TO/libsae.so}
report=$(abidiff --headers-dir2 "$root/include" "$root/abi/libsae.abi" "$lib" 2>&1)
rc=$?
echo "$report"
if (( rc & 3 )); then
    echo "abi/check.sh: abidiff could not compare (exit $rc)" >&2
    exit 1
fi
if (( rc & 8 )); then
    echo "abi/check.sh: INCOMPATIBLE: something the baseline exports is gone (exit $rc)" >&2
    exit 1
fi
changed=$(echo "$report" | grep -E '^(Functions|Variables) changes summary:' |
          grep -vE ': 0 Removed(\s*\([0-9]+ filtered out\))?, 0 Changed(\s*\([0-9]+ filtered out\))?,')
if [ -n "$changed" ]; then
    echo "abi/check.sh: INCOMPATIBLE: a function or variable of the baseline changed:" >&2
    echo "$changed" >&2
    exit 1
fi
echo "abi/check.sh: compatible with abi/libsae.abi (abidiff exit $rc: $( ((rc & 4)) && echo "additions only" || echo "no change"))"
