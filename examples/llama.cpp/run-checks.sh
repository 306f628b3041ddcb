#!/bin/sh
# One command: build llama.cpp from the npm bundle (cached), convert the tiny
# models, build sae-llama-probe, and check llama.cpp against reference.json.
# Exit 77 (skip) when the npm registry cannot be reached and nothing is cached.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
if [ -n "${LIBSAE_DATA:-}" ]; then DATA=$LIBSAE_DATA
elif [ -d "$REPO/../shared/data" ]; then DATA=$(cd "$REPO/../shared/data" && pwd)
else DATA=/work/shared/data; fi

rc=0; LLAMA_CPP_DIR=$("$HERE/build-llama.sh") || rc=$?
if [ "$rc" = 77 ]; then echo "run-checks: SKIP (npm registry unreachable)"; exit 77; fi
[ "$rc" = 0 ] || exit "$rc"

BUILD=${PROBE_BUILD_DIR:-$LLAMA_CPP_DIR/probe-build}
cmake -S "$HERE" -B "$BUILD" -DLLAMA_CPP_DIR="$LLAMA_CPP_DIR" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$BUILD" -j2 >/dev/null
status=0
for m in stories260K aidreams260K; do
    [ -f "$DATA/$m/reference.json" ] || { echo "run-checks: no $DATA/$m/reference.json, skipping $m"; continue; }
    python3 "$HERE/check-reference.py" "$BUILD/sae-llama-probe" \
        "$LLAMA_CPP_DIR/models/$m.gguf" "$DATA/$m/reference.json" || status=1
done
exit $status
