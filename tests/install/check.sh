#!/usr/bin/env bash
# Installs a build of libsae into a temporary prefix and checks what a user gets: a program built
# with pkg-config and one built with find_package(sae) compile and run, sae.h compiles as C++,
# and the shared library exports only sae_* (and the version node).
#   tests/install/check.sh BUILD_DIR
set -euo pipefail
build=$(cd "$1" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
prefix=$work/prefix

cmake --install "$build" --prefix "$prefix" >/dev/null
export LD_LIBRARY_PATH=$prefix/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

echo "pkg-config:"
PKG_CONFIG_PATH=$prefix/lib/pkgconfig
export PKG_CONFIG_PATH
cc -std=c11 -Wall -Wextra -Wpedantic -Werror "$here/consumer.c" -o "$work/pc" \
    $(pkg-config --cflags --libs sae)
"$work/pc"
echo "static, pkg-config --static:"
cc -std=c11 "$here/consumer.c" -o "$work/pc_static" \
    $(pkg-config --cflags sae) "$prefix/lib/libsae.a" $(pkg-config --libs --static sae | sed 's/-lsae//')
"$work/pc_static"

echo "find_package(sae):"
cmake -S "$here" -B "$work/cmake" -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
cmake --build "$work/cmake" >/dev/null
"$work/cmake/consumer"
"$work/cmake/consumer_cxx"
echo "C++ header check:"
c++ -std=c++11 -Wall -Wextra -Wpedantic -Werror -fsyntax-only -I"$prefix/include" -x c++ "$prefix/include/sae.h"

echo "exported symbols:"
lib=$(readlink -f "$prefix/lib/libsae.so")
soname=$(objdump -p "$lib" | awk '$1 == "SONAME" {print $2}')
[ "$soname" = libsae.so.0 ] || { echo "SONAME is '$soname', expected libsae.so.0"; exit 1; }
others=$(nm -D --defined-only "$lib" | awk '{print $3}' | grep -v '^sae_' | grep -v '^LIBSAE_' || true)
if [ -n "$others" ]; then
    echo "exported symbols outside sae_*:"; echo "$others"; exit 1
fi
# Every exported function is declared in the header, and every declaration is exported.
exported=$(nm -D --defined-only "$lib" | awk '$2 == "T" {sub(/@.*/, "", $3); print $3}' | sort)
declared=$(grep -oE '^SAE_API [^;]*\b(sae_[a-z0-9_]+)\(' "$prefix/include/sae.h" |
    grep -oE 'sae_[a-z0-9_]+\($' | tr -d '(' | sort)
if [ "$exported" != "$declared" ]; then
    echo "exported and declared functions differ:"
    diff <(echo "$declared") <(echo "$exported") || true
    exit 1
fi
echo "$(echo "$exported" | wc -l) functions exported, all declared in sae.h; SONAME $soname"
