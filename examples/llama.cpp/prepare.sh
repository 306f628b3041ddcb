#!/bin/sh
# Everything the demo and the cross-checks need, each step cached:
#   1. llama.cpp from the npm bundle, and the GGUF models (build-llama.sh);
#   2. the example programs against it and this tree's libsae (CMake, only their targets);
#   3. an SAE for stories260K's stream entering block 2, trained with libsae's own trainer
#      (sae-train-resid, ~20 s) and saved in the cache, never in the repo.
# Prints shell assignments for eval: LLAMA_CPP_DIR, LLCPP_BUILD, DATA, SAE, SAE_STATS.
# Environment: LIBSAE_CACHE (~/.cache/libsae), LLCPP_BUILD_DIR (<repo>/build-llamacpp),
#   LIBSAE_DATA (<repo>/../shared/data, else /work/shared/data).
# Exit codes: 0, 77 the npm registry cannot be reached (and llama.cpp is not cached), 1 else.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
if [ -n "${LIBSAE_DATA:-}" ]; then DATA=$LIBSAE_DATA
elif [ -d "$REPO/../shared/data" ]; then DATA=$(cd "$REPO/../shared/data" && pwd)
else DATA=/work/shared/data; fi
CACHE_ROOT=${LIBSAE_CACHE:-$HOME/.cache/libsae}
BUILD=${LLCPP_BUILD_DIR:-$REPO/build-llamacpp}
say() { printf 'prepare: %s\n' "$*" >&2; }

rc=0; LLAMA_CPP_DIR=$("$HERE/build-llama.sh") || rc=$?
[ "$rc" = 0 ] || exit "$rc"

t0=$(date +%s)
mkdir -p "$BUILD"
cmake -S "$HERE" -B "$BUILD" -DLLAMA_CPP_DIR="$LLAMA_CPP_DIR" -DCMAKE_BUILD_TYPE=Release \
    >"$BUILD.configure.log" 2>&1 || { cat "$BUILD.configure.log" >&2; exit 1; }
cmake --build "$BUILD" -j2 >"$BUILD.build.log" 2>&1 || { tail -40 "$BUILD.build.log" >&2; exit 1; }
say "example programs built in $BUILD ($(( $(date +%s) - t0 )) s)"

# The SAE: 512 ReLU features, libsae's trainer with a learning rate and L1 coefficient suited to
# a 3000-step run (FVU ~0.06, L0 ~8 on this data).
SAE_DIR=$CACHE_ROOT/sae
SAE=$SAE_DIR/stories260K-resid2-relu512.safetensors
SAE_STATS=$SAE_DIR/stories260K-resid2-relu512.tsv
if [ ! -s "$SAE" ] || [ ! -s "$SAE_STATS" ]; then
    mkdir -p "$SAE_DIR"
    say "training the SAE (libsae's trainer on $DATA/stories260K/resid_mid.npy)"
    OPENBLAS_NUM_THREADS=1 "$BUILD/sae-train-resid" --arch relu --latents 512 --lr 2e-3 --l1 1 \
        --steps 3000 --batch 256 --seed 1 --features "$SAE_STATS.tmp" \
        "$DATA/stories260K" "$SAE.tmp.safetensors" >&2
    mv "$SAE.tmp.safetensors" "$SAE"
    mv "$SAE_STATS.tmp" "$SAE_STATS"
fi
printf "LLAMA_CPP_DIR='%s'\nLLCPP_BUILD='%s'\nDATA='%s'\nSAE='%s'\nSAE_STATS='%s'\n" \
    "$LLAMA_CPP_DIR" "$BUILD" "$DATA" "$SAE" "$SAE_STATS"
