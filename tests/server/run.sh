#!/bin/sh
# sae-server end to end, one command (tests/run runs it as a stage), localhost only:
#   examples/llama.cpp/prepare.sh  llama.cpp, the GGUF models and the stories260K SAE (cached);
#   sae-server built against them (examples/server, in SERVER_BUILD_DIR);
#   the npm `openai` client installed once into $LIBSAE_CACHE/npm-openai;
#   test_server.py: every endpoint, greedy text against reference.json, steered text against
#                   sae-llama-cpp, bad inputs, 8 x 25 concurrent requests, timeout, a full
#                   queue, SIGTERM mid-stream, and the openai client (openai_client.mjs, Node);
#   then tests/server/test_cards*.py and test_page*.py (the feature cards; the page in
#   headless Chromium), each run as `python3 TEST BUILD --model M --sae S --data D`.
# Exit 0 all passed, 77 skipped (the npm registry cannot be reached and nothing is cached),
# 1 a check failed.
# Environment: SERVER_BUILD_DIR (<repo>/build-server), LLCPP_BUILD_DIR, LIBSAE_CACHE (as
# prepare.sh).
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE_ROOT=${LIBSAE_CACHE:-$HOME/.cache/libsae}
BUILD=${SERVER_BUILD_DIR:-$REPO/build-server}
export OPENBLAS_NUM_THREADS=1

rc=0; env=$("$REPO/examples/llama.cpp/prepare.sh") || rc=$?
if [ "$rc" = 77 ]; then
    echo "server: SKIP: the npm registry cannot be reached, so llama.cpp cannot be fetched"
    exit 77
fi
[ "$rc" = 0 ] || exit "$rc"
eval "$env"

mkdir -p "$BUILD"
cmake -S "$REPO/examples/server" -B "$BUILD" -DLLAMA_CPP_DIR="$LLAMA_CPP_DIR" \
    -DCMAKE_BUILD_TYPE=Release >"$BUILD.configure.log" 2>&1 ||
    { cat "$BUILD.configure.log"; exit 1; }
targets="sae-server sae-server-stats sae-server-cards sae-llama-capture sae_shared"
# shellcheck disable=SC2086
if cmake --build "$BUILD" -j2 --target $targets 2>&1 | grep -E "warning:|error:"; then
    exit 1
fi
# shellcheck disable=SC2086
cmake --build "$BUILD" -j2 --target $targets >/dev/null

# the npm openai client, pinned, installed once (npm's own client, into the cache)
NPM_DIR=$CACHE_ROOT/npm-openai
OPENAI_VERSION=4.104.0
node_args=""
if [ ! -f "$NPM_DIR/node_modules/openai/package.json" ] ||
   ! grep -q "\"version\": \"$OPENAI_VERSION\"" "$NPM_DIR/node_modules/openai/package.json"; then
    mkdir -p "$NPM_DIR"
    (cd "$NPM_DIR" && timeout 300 npm install --no-audit --no-fund --prefix . \
        "openai@$OPENAI_VERSION" >install.log 2>&1) ||
        echo "server: npm install openai@$OPENAI_VERSION failed (see $NPM_DIR/install.log)"
fi
if command -v node >/dev/null && [ -f "$NPM_DIR/node_modules/openai/package.json" ]; then
    node_args="--openai-node $HERE/openai_client.mjs $NPM_DIR/node_modules"
fi

MODEL=$LLAMA_CPP_DIR/models/stories260K.gguf
status=0
# shellcheck disable=SC2086
ref=""
[ -f "$DATA/stories260K/reference.json" ] && ref="--reference $DATA/stories260K/reference.json"
# shellcheck disable=SC2086
/usr/bin/python3 "$HERE/test_server.py" "$BUILD/sae-server" "$MODEL" "$SAE" $ref \
    --sae-llama-cpp "$LLCPP_BUILD/sae-llama-cpp" $node_args || status=1

for t in "$HERE"/test_cards*.py "$HERE"/test_page*.py; do
    [ -f "$t" ] || continue
    echo "server: $(basename "$t")"
    # /usr/bin/python3 has numpy, and with it llama.cpp's gguf-py, which the tied, F16 and
    # Q8_0 unembedding checks of test_cards.py need
    /usr/bin/python3 "$t" "$BUILD" --model "$MODEL" --sae "$SAE" --data "$DATA" || status=1
done
if [ "$status" = 0 ] && [ -z "$node_args" ]; then
    echo "server: SKIP: the npm openai client could not be installed (the rest passed)"
    exit 77
fi
exit $status
