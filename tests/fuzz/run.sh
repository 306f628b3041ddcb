#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, -fsanitize=fuzzer,address,undefined) for the safetensors
# reader, the cfg.json readers, the npz reader, the .pt reader, the dictionaries read from .pt
# files (torchsae) and the 2026 publishers' readers, replays every saved regression
# input, then fuzzes each target for a bounded time from the seeds tests/fuzz/seeds.c writes (and
# the .pt fixtures). Fails on any crash, leak, sanitizer report, timeout or out-of-memory; the
# input that caused it is left in the build folder's artifacts/ (copy it to
# tests/fuzz/regressions/<target>/ and add a case to tests/test_corrupt.c, or for the .pt reader
# to tests/test_torch.c).
#   tests/fuzz/run.sh [SECONDS-PER-TARGET [BUILD-DIR]]
# SAE_FUZZ_TARGETS="torch npz" limits the run to some targets.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
secs=${1:-50}
out=${2:-$root/build/fuzz}
mkdir -p "$out/obj" "$out/artifacts"
cd "$out"

cc=${CC_FUZZ:-clang}
common=(-g -O1 -std=c11 -D_GNU_SOURCE -fno-omit-frame-pointer -fno-sanitize-recover=all
        -I"$root/include" -I"$root/lib" -I"$root/tests" $(pkg-config --cflags libcjson libzip yaml-0.1 openblas))
libs=($(pkg-config --libs libcjson libzip yaml-0.1 openblas) -lz -lm -lpthread)

# The library's own source list, so the fuzzers build exactly what libsae.so is made of.
sources=$(sed -n '/add_library(sae_objects OBJECT/,/)/p' "$root/lib/CMakeLists.txt" |
          grep -oE '[a-z_0-9]+\.c')
objs=()
for s in $sources; do
    o="obj/${s%.c}.o"
    "$cc" "${common[@]}" -fsanitize=fuzzer-no-link,address,undefined -c "$root/lib/$s" -o "$o"
    objs+=("$o")
done
"$cc" "${common[@]}" -fsanitize=address,undefined "$root/tests/fuzz/seeds.c" \
    "$root/tests/writers.c" "${objs[@]}" "${libs[@]}" -o seeds
rm -rf seeds.d && ./seeds seeds.d
# The .pt reader's seeds: the committed fixtures (tests/fixtures/torch/make.py) as archives, and
# the pickle inside each valid one (fuzz_torch.c wraps an input not starting "PK" as data.pkl).
mkdir -p seeds.d/torch
cp "$root"/tests/fixtures/torch/*.pt seeds.d/torch/
python3 - "$root/tests/fixtures/torch" seeds.d/torch <<'EOF'
import glob, os, sys, zipfile
for f in glob.glob(os.path.join(sys.argv[1], "*.pt")):
    try:
        with zipfile.ZipFile(f) as z:
            pkl = [n for n in z.namelist() if n.endswith("/data.pkl")]
            if pkl:
                name = os.path.basename(f)[:-3] + ".pkl"
                open(os.path.join(sys.argv[2], name), "wb").write(z.read(pkl[0]))
    except Exception:
        pass  # the broken fixtures are seeds as they are
EOF

# The torchsae layer's seeds: each fixture of tests/fixtures/torchsae (make.py) taken apart into
# fuzz_torchsae.c's input (flags, config.json, data.pkl, storages), so the harness rebuilds it.
mkdir -p seeds.d/torchsae
python3 - "$root/tests/fixtures/torchsae" seeds.d/torchsae <<'EOF'
import glob, os, struct, sys, zipfile
root, out = sys.argv[1], sys.argv[2]
names = {"ae.pt": 0, "DeepSeek-R1-SAE-l37.pt": 1, "sae.pt": 3}
for i, f in enumerate(sorted(glob.glob(os.path.join(root, "**", "*.pt"), recursive=True))):
    try:
        z = zipfile.ZipFile(f)
        pkl = [n for n in z.namelist() if n.endswith("/data.pkl")][0]
        stem = pkl[: -len("data.pkl")]
        keys = sorted(int(n[len(stem) + 5:]) for n in z.namelist()
                      if n.startswith(stem + "data/"))
    except Exception:
        continue  # the damaged fixtures are fuzz_torch's seeds
    if keys != list(range(len(keys))) or len(keys) > 32:
        continue
    cfg_path = os.path.join(os.path.dirname(f), "config.json")
    cfg = open(cfg_path, "rb").read() if os.path.exists(cfg_path) else b""
    where = names.get(os.path.basename(f), 0)
    if where == 1 and os.path.basename(os.path.dirname(f)) == "logic":
        where = 2
    data = z.read(pkl)
    seed = bytes([(1 if cfg else 0) | where << 1]) + struct.pack("<H", len(cfg)) + cfg
    seed += struct.pack("<H", len(data)) + data + bytes([len(keys)])
    for k in keys:
        s = z.read(f"{stem}data/{k}")
        seed += struct.pack("<H", len(s)) + s
    open(os.path.join(out, f"{i:03d}.bin"), "wb").write(seed)
EOF

status=0
for target in ${SAE_FUZZ_TARGETS:-safetensors cfg npz torch publishers torchsae}; do
    extra=() dict=json.dict
    if [ "$target" = torch ] || [ "$target" = torchsae ]; then
        extra=("$root/tests/writers.c") dict=torch.dict # it wraps pickles in a zip
    fi
    "$cc" "${common[@]}" -fsanitize=fuzzer,address,undefined "$root/tests/fuzz/fuzz_$target.c" \
        "${extra[@]}" "${objs[@]}" "${libs[@]}" -o "fuzz_$target"
    opts=(-timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=1024 -max_len=65536
          -artifact_prefix="$out/artifacts/$target-" -dict="$root/tests/fuzz/$dict")
    regress="$root/tests/fuzz/regressions/$target"
    if [ -d "$regress" ] && [ -n "$(ls -A "$regress")" ]; then
        echo "--- $target: replaying $(ls "$regress" | wc -l) regression inputs"
        ./"fuzz_$target" "${opts[@]}" "$regress"/* || status=1
    fi
    mkdir -p "corpus/$target"
    echo "--- $target: fuzzing for $secs s"
    if ! ./"fuzz_$target" "${opts[@]}" -max_total_time="$secs" -print_final_stats=1 \
            "corpus/$target" "seeds.d/$target" > "$target.log" 2>&1; then
        status=1
        tail -60 "$target.log"
    else
        grep -E "stat::number_of_executed_units|cov:" "$target.log" | tail -2
    fi
done
exit $status
