#!/bin/sh
# Fetch llama.cpp from the npm package node-llama-cpp (which ships llama.cpp's
# full source as llama/gitRelease.bundle), build libllama + ggml (CPU only)
# and llama-convert-llama2c-to-ggml, then convert the tiny llama2.c models in
# shared/data to GGUF.  Everything lands in a cache outside the source tree:
#
#   ${LIBSAE_CACHE:-$HOME/.cache/libsae}/llama.cpp-<npm version>/
#       npm/      the npm tarball             src/     the cloned llama.cpp
#       build/    CMake build (build/bin: libllama.so, libggml*.so, converter)
#       models/   <name>.gguf for each converted model
#       env.sh    LLAMA_CPP_DIR=... etc., for `.`-ing from other scripts
#       BUILD_INFO  commit, flags and build time
#
# A second run does nothing but print where it all is.  Nothing of llama.cpp is
# ever written into the libsae tree.
#
# Usage: examples/llama.cpp/build-llama.sh [--print-dir]
#   --print-dir   print the cache dir (LLAMA_CPP_DIR) and exit, building nothing
# Environment: LIBSAE_CACHE, LLAMA_NPM_VERSION (default 3.21.1), JOBS (default 2),
#   LIBSAE_DATA (default: <repo>/../shared/data, else /work/shared/data).
# Exit codes: 0 ok, 77 the npm registry cannot be reached (tests skip on it),
#   1 anything else.
set -eu

NPM_PKG=node-llama-cpp
NPM_VERSION=${LLAMA_NPM_VERSION:-3.21.1}
JOBS=${JOBS:-2}
CACHE_ROOT=${LIBSAE_CACHE:-$HOME/.cache/libsae}
DIR=$CACHE_ROOT/llama.cpp-$NPM_VERSION
EXIT_SKIP=77

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
if [ -n "${LIBSAE_DATA:-}" ]; then DATA=$LIBSAE_DATA
elif [ -d "$REPO/../shared/data" ]; then DATA=$(cd "$REPO/../shared/data" && pwd)
else DATA=/work/shared/data; fi
MODELS="stories260K aidreams260K"

say() { printf 'build-llama: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

if [ "${1:-}" = "--print-dir" ]; then echo "$DIR"; exit 0; fi

CONVERTER=$DIR/build/bin/llama-convert-llama2c-to-ggml

models_done() {
    for m in $MODELS; do
        [ -f "$DATA/$m/model.bin" ] || continue   # data not present: nothing to do
        [ -s "$DIR/models/$m.gguf" ] || return 1
    done
    return 0
}

if [ -f "$DIR/.built" ] && models_done; then
    say "llama.cpp (node-llama-cpp@$NPM_VERSION) already built, nothing to do"
    say "  LLAMA_CPP_DIR=$DIR"
    say "  libraries:  $DIR/build/bin"
    say "  models:     $(ls "$DIR"/models/*.gguf 2>/dev/null | tr '\n' ' ')"
    echo "$DIR"
    exit 0
fi

mkdir -p "$DIR"

# ---- tools: apt only for what is missing -----------------------------------
need_apt=""
for tool in npm:npm git:git cmake:cmake make:make g++:g++ tar:tar; do
    cmd=${tool%%:*}; pkg=${tool#*:}
    command -v "$cmd" >/dev/null 2>&1 || need_apt="$need_apt $pkg"
done
if [ -n "$need_apt" ]; then
    say "installing missing Debian packages:$need_apt"
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get update -q >&2 || true
    # shellcheck disable=SC2086
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $need_apt >&2 \
        || die "could not install:$need_apt"
fi

# ---- fetch: npm pack into the cache ----------------------------------------
TGZ=$DIR/npm/$NPM_PKG-$NPM_VERSION.tgz
if [ ! -s "$TGZ" ]; then
    mkdir -p "$DIR/npm"
    say "fetching $NPM_PKG@$NPM_VERSION with npm pack (about 35 MB)"
    if ! (cd "$DIR/npm" && npm pack --loglevel=error --fetch-timeout=60000 "$NPM_PKG@$NPM_VERSION" \
              --pack-destination "$DIR/npm" >/dev/null 2>"$DIR/npm/npm-pack.log"); then
        cat "$DIR/npm/npm-pack.log" >&2 || true
        rm -f "$TGZ"
        if grep -qiE 'ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ETIMEDOUT|ECONNRESET|network|proxy|socket' \
                "$DIR/npm/npm-pack.log"; then
            say "SKIP: the npm registry cannot be reached; llama.cpp cannot be fetched"
            exit $EXIT_SKIP
        fi
        die "npm pack $NPM_PKG@$NPM_VERSION failed (see above)"
    fi
    [ -s "$TGZ" ] || die "npm pack did not produce $TGZ"
fi

# ---- source: clone the git bundle ------------------------------------------
if [ ! -f "$DIR/src/CMakeLists.txt" ]; then
    say "extracting llama/gitRelease.bundle and cloning it"
    rm -rf "$DIR/unpack" "$DIR/src"
    mkdir -p "$DIR/unpack"
    tar -xzf "$TGZ" -C "$DIR/unpack" package/llama/gitRelease.bundle package/package.json
    rm -rf "$DIR/src.tmp"
    git -c advice.detachedHead=false clone -q \
        "$DIR/unpack/package/llama/gitRelease.bundle" "$DIR/src.tmp" >&2
    mv "$DIR/src.tmp" "$DIR/src"
    rm -rf "$DIR/unpack"
fi
COMMIT=$(git -C "$DIR/src" rev-parse HEAD)
COMMIT_DATE=$(git -C "$DIR/src" log -1 --format=%cI)

# ---- build: CPU only, no curl/ssl/server/tools, only the converter example --
if [ ! -f "$DIR/.built" ]; then
    say "configuring llama.cpp $COMMIT ($COMMIT_DATE), CPU only, Release"
    cmake -S "$DIR/src" -B "$DIR/build" \
        -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=ON \
        -DLLAMA_BUILD_COMMON=ON \
        -DLLAMA_BUILD_EXAMPLES=ON \
        -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_TOOLS=OFF \
        -DLLAMA_BUILD_SERVER=OFF \
        -DLLAMA_BUILD_APP=OFF \
        -DLLAMA_BUILD_UI=OFF \
        -DLLAMA_CURL=OFF \
        -DLLAMA_OPENSSL=OFF \
        -DGGML_CPU=ON -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF \
        -DGGML_BACKEND_DL=OFF \
        >"$DIR/cmake-configure.log" 2>&1 \
        || { tail -40 "$DIR/cmake-configure.log" >&2; die "cmake configure failed (log: $DIR/cmake-configure.log)"; }
    # llama-common (common_control_vector_load, for sae-llama-cpp --via cvec-file) is also a
    # dependency of the converter; it is named so that the build says what it needs.
    say "building llama, ggml, llama-common and llama-convert-llama2c-to-ggml with -j$JOBS (takes minutes; log: $DIR/build.log)"
    t0=$(date +%s)
    cmake --build "$DIR/build" --config Release -j "$JOBS" \
        --target llama llama-common llama-convert-llama2c-to-ggml >"$DIR/build.log" 2>&1 \
        || { tail -40 "$DIR/build.log" >&2; die "build failed (log: $DIR/build.log)"; }
    t1=$(date +%s)
    cat >"$DIR/BUILD_INFO" <<EOF
source: npm $NPM_PKG@$NPM_VERSION, llama/gitRelease.bundle
commit: $COMMIT
commit_date: $COMMIT_DATE
build: CMake Release, BUILD_SHARED_LIBS=ON, CPU only, -j$JOBS, targets llama llama-common llama-convert-llama2c-to-ggml
build_seconds: $((t1 - t0))
built_at: $(date -u +%Y-%m-%dT%H:%M:%SZ)
host: $(uname -m), $(nproc 2>/dev/null || echo '?') cpus
EOF
    touch "$DIR/.built"
    say "built in $((t1 - t0)) s"
fi

cat >"$DIR/env.sh" <<EOF
# generated by libsae examples/llama.cpp/build-llama.sh
LLAMA_CPP_DIR='$DIR'
LLAMA_CPP_SRC='$DIR/src'
LLAMA_CPP_LIBDIR='$DIR/build/bin'
LLAMA_CPP_MODELS='$DIR/models'
LLAMA_CPP_COMMIT='$COMMIT'
EOF

# ---- convert the llama2.c models with llama.cpp's own converter -------------
# The converter takes the llama2.c tokenizer (tok512.bin) directly through
# --copy-vocab-from-model (it accepts a GGUF model or a llama2.c vocab file).
mkdir -p "$DIR/models"
for m in $MODELS; do
    out=$DIR/models/$m.gguf
    [ -s "$out" ] && continue
    if [ ! -f "$DATA/$m/model.bin" ] || [ ! -f "$DATA/$m/tok512.bin" ]; then
        say "warning: $DATA/$m/{model.bin,tok512.bin} not found, not converting $m"
        continue
    fi
    say "converting $m to GGUF"
    "$CONVERTER" --copy-vocab-from-model "$DATA/$m/tok512.bin" \
        --llama2c-model "$DATA/$m/model.bin" \
        --llama2c-output-model "$out.tmp" >"$DIR/models/$m.convert.log" 2>&1 \
        || { tail -20 "$DIR/models/$m.convert.log" >&2; rm -f "$out.tmp"; die "conversion of $m failed"; }
    mv "$out.tmp" "$out"
done

say "done. LLAMA_CPP_DIR=$DIR"
[ -f "$DIR/BUILD_INFO" ] && sed 's/^/  /' "$DIR/BUILD_INFO" >&2
echo "$DIR"
