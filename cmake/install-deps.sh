#!/bin/sh
# Installs what libsae needs from Debian's packages, once. Safe to run again: it only calls
# apt-get when a package is missing. Groups:
#   (none)  build and test: compiler, CMake, CBLAS (OpenBLAS and the reference BLAS), Check,
#           cJSON, libzip, libyaml, Python 3 with numpy, clang (fuzzers, sanitizers), libabigail,
#           Open MPI (the data-parallel training test), Chromium (the page check), oneDNN
#           (bfloat16 products on AMX / AVX512-BF16; libsae builds without it too),
#           libmicrohttpd (sae-server, examples/server)
#   bench   the peers the benchmarks compare against: PyTorch
set -eu

packages="build-essential cmake pkg-config libopenblas-dev libblas-dev check libcjson-dev
libzip-dev libyaml-dev zlib1g-dev python3 python3-numpy clang libclang-rt-14-dev llvm abigail-tools
openmpi-bin libopenmpi-dev chromium libdnnl-dev libmicrohttpd-dev"
if [ "${1:-}" = bench ]; then
    packages="$packages python3-torch"
fi

missing=""
for p in $packages; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
        missing="$missing $p"
done
[ -z "$missing" ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: missing packages:$missing; run this script as root" >&2
    exit 1
fi
echo "install-deps: installing$missing" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing >/dev/null
