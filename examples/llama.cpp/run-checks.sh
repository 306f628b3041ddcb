#!/bin/sh
# The llama.cpp cross-checks, one command (tests/run runs it as a stage):
#   prepare.sh        llama.cpp from the npm bundle (cached), the GGUF models, the example
#                     programs, and the SAE (cached);
#   check-reference.py  llama.cpp alone against both models' reference.json: tokenization,
#                     greedy text, logits, the residual stream the callback sees;
#   check-capture.py  sae_llama_hook, sae-llama-capture, -evaluate, sae-train-capture against
#                     examples/llama's hook points (check-capture.py's docstring);
#   check-steering.py libsae inside llama.cpp against libsae on examples/llama: (a) rows and
#                     features, (b) clamped generation, (c) add plans via cb_eval, cvec, GGUF.
# Exit 0 all passed, 77 skipped (the npm registry cannot be reached and nothing is cached),
# 1 a check failed.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
export OPENBLAS_NUM_THREADS=1   # libsae's BLAS: the matrices are tiny, the machine is shared

rc=0; env=$("$HERE/prepare.sh") || rc=$?
if [ "$rc" = 77 ]; then
    echo "run-checks: SKIP: the npm registry cannot be reached, so llama.cpp (node-llama-cpp) cannot be fetched"
    exit 77
fi
[ "$rc" = 0 ] || exit "$rc"
eval "$env"

status=0
for m in stories260K aidreams260K; do
    [ -f "$DATA/$m/reference.json" ] || { echo "run-checks: no $DATA/$m/reference.json, skipping $m"; continue; }
    python3 "$HERE/check-reference.py" "$LLCPP_BUILD/sae-llama-probe" \
        "$LLAMA_CPP_DIR/models/$m.gguf" "$DATA/$m/reference.json" || status=1
done
python3 "$HERE/check-steering.py" "$LLCPP_BUILD" "$LLAMA_CPP_DIR/models/stories260K.gguf" \
    "$DATA/stories260K" "$SAE" "$SAE_STATS" || status=1
# the hook adapter, capture (+ kill/resume), evaluate and training from a capture, against the engine
python3 "$HERE/check-capture.py" "$LLCPP_BUILD" "$LLAMA_CPP_DIR/models" "$DATA" \
    "${TMPDIR:-/tmp}/libsae-check-capture-$$" || status=1
rm -rf "${TMPDIR:-/tmp}/libsae-check-capture-$$"
exit $status
