#!/usr/bin/env python3
"""sae-server's feature cards (examples/server/feature_cards.c, stats.c) against straightforward loops.

usage: test_cards.py [BUILD_DIR] [--model GGUF] [--sae PATH] [--data DIR] [--work DIR]

As tests/server/run.sh runs it, with no arguments: BUILD_DIR is $SERVER_BUILD (sae-server's
build), the model and SAE are $SAE_MODEL and $SAE_DICT, sae-llama-capture and libsae.so come
from $LLCPP_BUILD; missing ones come from examples/llama.cpp/prepare.sh (stories260K's GGUF,
the SAE trained on its stream entering block 2). sae-server-stats and sae-server-cards are
built in BUILD_DIR (tools() below) when it does not hold them yet. The data is $LIBSAE_DATA, else
shared/data beside the repository, else /work/shared/data (as prepare.sh finds it).

(1) a capture of stories260K's texts (several shards), then sae-server-stats with non-default
    settings; every card then equals plain loops over the capture's rows encoded by libsae:
    firing count, frequency, mean, max, the histogram (each value binned by the card's edges),
    the top contexts (which tokens, their window, and the feature's value on each token);
(2) promoted and suppressed tokens equal a float64 loop of the decoder row (/ INPUT_SCALE)
    through the final RMSNorm weight and the unembedding, both read from llama2.c's model.bin
    (not from the GGUF), with the tokens' text from tok512.bin; and, with numpy and llama.cpp's
    gguf-py, through copies of the GGUF whose unembedding is tied to the embedding, F16 and
    Q8_0 (each loop through the values gguf-py reads back);
(3) nearest features equal sae_feature_neighbors (the Python binding);
(4) cards built by 8 threads at once equal the ones built alone;
(5) bad input gives a message and exit 1, never a crash: missing, empty, truncated, damaged and
    mismatched statistics files (another width, another dictionary of the same width, token ids
    past the vocabulary, ...), a feature out of range, a GGUF that is not one, and
    sae-server-stats on an incomplete capture, an unknown hook or an SAE of another width.
Exit 0 when everything holds, 1 otherwise.
"""
import argparse
import ast
import json
import os
import random
import shutil
import struct
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
HOOK = os.environ.get("SAE_HOOK") or "blocks.2.hook_resid_pre"
TOP, BEFORE, AFTER, BINS = 6, 5, 3, 12
BLOCK = 4096  # stats.c's BLOCK_MAX: the same blocks give the same SGEMM, bit for bit
fails = 0


def check(ok, what):
    global fails
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        fails += 1
    return ok


def run(args, expect=0):
    p = subprocess.run([str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
    if expect is not None and p.returncode != expect:
        sys.stderr.write(p.stderr)
        raise RuntimeError(f"{os.path.basename(str(args[0]))}: exit {p.returncode}, "
                           f"expected {expect}")
    return p


def f32(x):
    return struct.unpack("<f", struct.pack("<f", x))[0]


def flat(a):
    """A list of Python numbers from what the binding returns (numpy arrays when numpy is
    installed, array.array otherwise)."""
    return a.reshape(-1).tolist() if hasattr(a, "reshape") else list(a)


def find(build, name):
    for root, _, files in os.walk(build):
        if name in files:
            return os.path.join(root, name)
    raise RuntimeError(f"no {name} under {build}")


def read_i32_npy(path):
    with open(path, "rb") as f:
        assert f.read(6) == b"\x93NUMPY"
        f.read(2)
        hl = struct.unpack("<H", f.read(2))[0]
        h = ast.literal_eval(f.read(hl).decode())
        assert h["descr"] == "<i4" and not h["fortran_order"]
        n = h["shape"][0]
        return list(struct.unpack(f"<{n}i", f.read(4 * n)))


def llama2c_weights(path):
    """(dim, vocab, rms_final [dim], classifier [vocab][dim]) of a llama2.c checkpoint."""
    with open(path, "rb") as f:
        dim, hidden, layers, heads, kv_heads, vocab, seq = struct.unpack("<7i", f.read(28))
        shared = vocab > 0
        vocab = abs(vocab)
        kv_dim = dim * kv_heads // heads
        floats = lambda n: list(struct.unpack(f"<{n}f", f.read(4 * n)))
        emb = floats(vocab * dim)
        skip = layers * dim + layers * dim * dim + 2 * layers * dim * kv_dim + \
            layers * dim * dim + layers * dim + 3 * layers * dim * hidden
        f.seek(4 * skip, 1)
        rms_final = floats(dim)
        head = dim // heads
        f.seek(4 * seq * head, 1)  # freq_cis_real, freq_cis_imag
        cls = emb if shared else floats(vocab * dim)
    return dim, vocab, rms_final, [cls[v * dim:(v + 1) * dim] for v in range(vocab)]


def llama2c_pieces(path):
    """tok512.bin's pieces as bytes."""
    out = []
    with open(path, "rb") as f:
        f.read(4)
        while True:
            h = f.read(8)
            if len(h) < 8:
                break
            _, n = struct.unpack("<fi", h)
            out.append(f.read(n))
    return out


def shown(piece):
    """The text a card shows for a token piece: valid UTF-8 as is, other bytes as <0xNN>."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(f"<0x{b:02X}>" for b in piece)


def data_dir():
    if os.environ.get("LIBSAE_DATA"):
        return os.environ["LIBSAE_DATA"]
    beside = os.path.join(os.path.dirname(REPO), "shared", "data")
    return beside if os.path.isdir(beside) else "/work/shared/data"


def setup(argv, what):
    """The arguments, completed from tests/server/run.sh's environment, then prepare.sh."""
    ap = argparse.ArgumentParser(description=what)
    ap.add_argument("build", nargs="?", default=os.environ.get("SERVER_BUILD") or
                    os.path.join(REPO, "build-server"))
    ap.add_argument("--model", default=os.environ.get("SAE_MODEL"))
    ap.add_argument("--sae", default=os.environ.get("SAE_DICT"))
    ap.add_argument("--data", default=data_dir())
    ap.add_argument("--screenshot")
    ap.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                   f"libsae-test-{os.getpid()}"))
    a = ap.parse_args(argv)
    a.llcpp = os.environ.get("LLCPP_BUILD")
    a.llama_cpp_dir = os.environ.get("LLAMA_CPP_DIR")
    if not (a.model and a.sae and a.llcpp and a.llama_cpp_dir):
        env = run(["sh", os.path.join(REPO, "examples/llama.cpp/prepare.sh")]).stdout
        kv = dict(line.split("=", 1) for line in env.split("\n") if "=" in line)
        kv = {k: v.strip("'") for k, v in kv.items()}
        a.model = a.model or os.path.join(kv["LLAMA_CPP_DIR"], "models", "stories260K.gguf")
        a.sae = a.sae or kv["SAE"]
        a.llcpp = a.llcpp or kv["LLCPP_BUILD"]
        a.llama_cpp_dir = a.llama_cpp_dir or kv["LLAMA_CPP_DIR"]
    return a


def tools(a, names):
    """{name: path} of the programs the tests run, found in the server's build or
    examples/llama.cpp's. sae-server-stats and sae-server-cards (cards.cmake's targets, which
    examples/server/CMakeLists.txt includes) are built in the server's build if they are not
    there yet."""
    def look():
        out = {}
        for n in names:
            for d in (a.build, a.llcpp):
                try:
                    out[n] = find(d, n)
                    break
                except RuntimeError:
                    pass
        return out

    got = look()
    ours = [n for n in ("sae-server-stats", "sae-server-cards") if n in names and n not in got]
    if ours:
        if not os.path.isfile(os.path.join(a.build, "CMakeCache.txt")):
            run(["cmake", "-S", os.path.join(REPO, "examples", "server"), "-B", a.build,
                 f"-DLLAMA_CPP_DIR={a.llama_cpp_dir}", "-DCMAKE_BUILD_TYPE=Release"])
        p = run(["cmake", "--build", a.build, "-j2", "--target"] + ours)
        if "warning:" in p.stdout + p.stderr:
            raise RuntimeError(f"{', '.join(ours)} built with warnings:\n" + p.stdout + p.stderr)
        got = look()
    missing = [n for n in names if n not in got]
    if missing:
        raise RuntimeError(f"cannot find or build {', '.join(missing)} (in {a.build}, {a.llcpp})")
    return got


def gguf_variants(a, work):
    """Copies of the model with output.weight left out (tied: the unembedding is
    token_embd.weight), stored as F16, and as Q8_0, written with llama.cpp's gguf-py; each with
    the unembedding's values as gguf-py reads them back ({kind: (path, rows)}). None without
    numpy or gguf-py."""
    try:
        import numpy as np
        sys.path.insert(0, os.path.join(a.llama_cpp_dir, "src", "gguf-py"))
        import gguf
    except ImportError:
        return None
    r = gguf.GGUFReader(a.model)
    arch = r.fields[gguf.Keys.General.ARCHITECTURE].contents()
    out = {}
    for kind in ("tied", "F16", "Q8_0"):
        path = os.path.join(work, f"model-{kind}.gguf")
        w = gguf.GGUFWriter(path, arch=arch)
        for f in r.fields.values():
            if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
                continue
            vt = f.types[0]
            w.add_key_value(f.name, f.contents(), vt,
                            sub_type=f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None)
        tensors = []
        for t in r.tensors:
            data, ty = t.data, t.tensor_type
            if t.name == "output.weight":
                if kind == "tied":
                    continue
                ty = gguf.GGMLQuantizationType[kind]
                data = data.astype(np.float16) if kind == "F16" else gguf.quants.quantize(data, ty)
            tensors.append(data)
            w.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, ty)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for data in tensors:
            w.write_tensor_data(data)
        w.close()
        back = {t.name: t for t in gguf.GGUFReader(path).tensors}
        t = back["token_embd.weight" if kind == "tied" else "output.weight"]
        u = gguf.quants.dequantize(t.data, t.tensor_type) if kind == "Q8_0" else t.data
        out[kind] = (path, u.astype(np.float32).tolist())
    return out


def main():
    a = setup(sys.argv[1:], "the feature cards against plain loops")
    t = tools(a, ["sae-llama-capture", "sae-server-stats", "sae-server-cards", "libsae.so"])
    capture_bin, stats_bin, cards_bin = (t["sae-llama-capture"], t["sae-server-stats"],
                                         t["sae-server-cards"])
    os.environ["LIBSAE_LIBRARY"] = t["libsae.so"]
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    sys.path.insert(0, os.path.join(REPO, "bindings", "python"))
    import libsae

    work = a.work
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    try:
        test(libsae, a, work, capture_bin, stats_bin, cards_bin)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"test_cards: {'all passed' if not fails else f'{fails} FAILED'}")
    return 1 if fails else 0


def test(libsae, a, work, capture_bin, stats_bin, cards_bin):
    data = os.path.join(a.data, "stories260K")
    cap = os.path.join(work, "capture")
    run([capture_bin, "-m", a.model, "--hooks", HOOK, "--corpus",
         os.path.join(data, "stories.txt"), "-o", cap, "--max-tokens", "12000",
         "--shard-tokens", "5000", "--no-progress"])
    stats = os.path.join(work, "stats.json")
    run([stats_bin, "--capture", cap, "--hook", HOOK, "--sae", a.sae, "-o", stats,
         "--top", TOP, "--before", BEFORE, "--after", AFTER, "--bins", BINS])
    check(not [f for f in os.listdir(work) if ".tmp." in f], "sae-server-stats leaves no "
          "temporary file")

    # the loops: every row of every shard encoded, in stats.c's blocks
    m = libsae.Model.load(a.sae)
    d_sae = m.d_sae
    index = json.load(open(os.path.join(cap, "index.json")))
    check(len(index["shards"]) >= 2, f"the capture has {len(index['shards'])} shards")
    tokens, positions, codes = [], [], []
    for sh in index["shards"]:
        base = os.path.join(cap, sh["name"])
        tokens += read_i32_npy(base + ".tokens.npy")
        positions += read_i32_npy(base + ".positions.npy")
        npy = libsae.NpyFile(f"{base}.{HOOK}.npy")
        rows = npy.shape[0]
        for r in range(0, rows, BLOCK):
            n = min(BLOCK, rows - r)
            f = flat(m.encode(npy.read(r, n)))
            codes += [f[t * d_sae:(t + 1) * d_sae] for t in range(n)]
    N = len(codes)
    check(N == index["tokens"] == len(tokens), f"{N} tokens encoded")

    features = sorted(set([0, 1, 7, 100, 255, 300, 511] + random.Random(3).sample(range(d_sae), 8)))
    out = run([cards_bin, "-m", a.model, "--sae", a.sae, "--stats", stats] + features).stdout
    cards = [json.loads(line) for line in out.splitlines()]
    check([c["feature"] for c in cards] == features, f"{len(cards)} cards printed")

    dim, vocab, g, unemb = llama2c_weights(os.path.join(data, "model.bin"))
    pieces = llama2c_pieces(os.path.join(data, "tok512.bin"))
    w_dec = flat(m.get_tensor("W_dec"))
    scale = m.input_scale

    def window(t):
        lo = max(t - positions[t], t - BEFORE)
        hi = t
        while hi - t < AFTER and hi + 1 < N and positions[hi + 1] != 0:
            hi += 1
        return lo, hi

    def text_of(tok):
        if tok == 1:
            return "<s>"
        if tok == 2:
            return "</s>"
        if 3 <= tok <= 258:
            return shown(bytes([tok - 3]))
        return shown(pieces[tok])

    def same_logits(c, u):
        """The card's promoted and suppressed tokens against a float64 loop through u:
        logit_v = sum_j u[v][j] * (W_dec[i][j] * g[j] / INPUT_SCALE)."""
        i = c["feature"]
        d = [w_dec[i * dim + j] * g[j] / scale for j in range(dim)]
        logits = []
        for v in range(vocab):
            acc = 0.0
            for j in range(dim):
                acc += u[v][j] * d[j]
            logits.append((acc, v))
        same = True
        for name, ref in (("promoted", sorted(logits, key=lambda p: (-p[0], p[1]))[:10]),
                          ("suppressed", sorted(logits, key=lambda p: (p[0], p[1]))[:10])):
            got = c[name]
            # cJSON prints a double with 15 significant digits when that reads back within its
            # tolerance, so the logits agree to about 1e-15 relative
            if [t["id"] for t in got] != [v for _, v in ref] or \
                    any(abs(t["logit"] - l) > 1e-14 * abs(l) for t, (l, _) in zip(got, ref)):
                same = False
                print(f"  feature {i}: {name} {[(t['id'], t['logit']) for t in got]} vs {ref}")
        return same

    def verify(cards, with_bos, label):
        """Each card against the loops; with_bos: the windows' first tokens are counted too."""
        counted = [t for t in range(N) if with_bos or positions[t] != 0]
        ok = {k: True for k in ("count", "hist", "top", "values", "tokens", "logits", "text", "nb")}
        for c in cards:
            i = c["feature"]
            vals = [(codes[t][i], t) for t in counted if codes[t][i] > 0]
            count = len(vals)
            s = 0.0
            for v, _ in vals:
                s += v
            if not (c["count"] == count and c["tokens_seen"] == len(counted) and
                    c["frequency"] == count / len(counted)
                    and abs(c["mean"] - (s / count if count else 0))
                    <= 1e-12 * max(1, abs(c["mean"]))
                    and f32(c["max"]) == (max(v for v, _ in vals) if vals else 0)):
                ok["count"] = False
                print(f"  feature {i}: count {c['count']} vs {count}, mean {c['mean']} vs "
                      f"{s / max(count, 1)}, max {c['max']}")
            h = c["histogram"]
            edges = [f32(e) for e in h["edges"]]
            hist = [0] * BINS
            for v, _ in vals:
                hist[sum(1 for e in edges[1:BINS] if e <= v)] += 1
            if not (h["scale"] == "log" and (not count or (len(edges) == BINS + 1 and
                    edges[0] == min(v for v, _ in vals) and edges[-1] == f32(c["max"])))
                    and h["counts"] == (hist if count else [])):
                ok["hist"] = False
                print(f"  feature {i}: histogram {h['counts']} vs {hist}")
            want = sorted(vals, key=lambda p: (-p[0], p[1]))[:TOP]
            got = [(f32(x["value"]), x["index"]) for x in c["top_contexts"]]
            if got != want:
                ok["top"] = False
                print(f"  feature {i}: top {got} vs {want}")
            for x in c["top_contexts"]:
                lo, hi = window(x["index"])
                ts = x["tokens"]
                if not (x["target"] == x["index"] - lo and len(ts) == hi - lo + 1 and
                        [t["id"] for t in ts] == tokens[lo:hi + 1]):
                    ok["tokens"] = False
                    print(f"  feature {i}: context of {x['index']}: window [{lo}, {hi}]")
                elif [f32(t["value"]) for t in ts] != [codes[t][i] for t in range(lo, hi + 1)]:
                    ok["values"] = False
                    print(f"  feature {i}: context values differ at {x['index']}")
                if any(t["text"] != text_of(t["id"]) for t in ts):
                    ok["text"] = False
                    print(f"  feature {i}: token texts {[t['text'] for t in ts]}")
            if not same_logits(c, unemb):
                ok["logits"] = False
            for name in ("promoted", "suppressed"):
                got = c[name]
                if any(t["text"] != text_of(t["id"]) for t in got):
                    ok["text"] = False
                    print(f"  feature {i}: {name} texts {[t['text'] for t in got]}")
            idx, cos = (flat(x) for x in m.neighbors(i, 10))
            if [n["feature"] for n in c["neighbors"]] != list(idx) or \
                    [f32(n["cosine"]) for n in c["neighbors"]] != list(cos):
                ok["nb"] = False
                print(f"  feature {i}: neighbours {c['neighbors']} vs {list(idx)}")
        check(ok["count"], label + "count, frequency, mean and max equal loops over the encoded "
              "capture")
        check(ok["hist"], label + f"{BINS}-bin log histograms equal binning every value by the "
              "card's edges")
        check(ok["top"], label + f"the top {TOP} contexts are the {TOP} largest values (ties: "
              "earlier token)")
        check(ok["tokens"], label + f"each context is the capture's tokens from {BEFORE} before "
              f"to {AFTER} "
              "after its token, cut at the window's edges")
        check(ok["values"], label + "each context token's value equals encoding that token's row")
        check(ok["logits"], label + "promoted/suppressed tokens and logits equal a float64 loop "
              "through "
              "model.bin's rms_final and classifier")
        check(ok["text"], label + "token texts are tok512.bin's pieces (bytes that are not UTF-8 "
              "as <0xNN>)")
        check(ok["nb"], label + "nearest features equal sae_feature_neighbors")
        check(any(len(x["tokens"]) < BEFORE + AFTER + 1 for c in cards for x in c["top_contexts"]),
              "some contexts are cut at a window's edge (the case is exercised)")

    verify(cards, False, "")
    check(all(positions[x["index"]] != 0 for c in cards for x in c["top_contexts"]),
          "no top context is a window's first token (BOS), which is not counted")
    check(any(t["id"] == 1 for c in cards for x in c["top_contexts"] for t in x["tokens"]),
          "contexts still show BOS tokens (with the feature's value on them)")
    stats_bos = os.path.join(work, "stats-bos.json")
    run([stats_bin, "--capture", cap, "--hook", HOOK, "--sae", a.sae, "-o", stats_bos,
         "--top", TOP, "--before", BEFORE, "--after", AFTER, "--bins", BINS, "--with-bos"])
    bos_features = [f for f in range(d_sae) if codes[0][f] > 0][:3] + [7]
    out = run([cards_bin, "-m", a.model, "--sae", a.sae, "--stats", stats_bos]
              + bos_features).stdout
    verify([json.loads(line) for line in out.splitlines()], True, "--with-bos: ")

    # the unembedding stored otherwise: tied to the embedding (no output.weight), F16, Q8_0
    variants = gguf_variants(a, work)
    if variants is None:
        print("note: numpy or llama.cpp's gguf-py is missing: the tied, F16 and Q8_0 "
              "unembeddings are not checked")
    for kind, (path, u) in (variants or {}).items():
        out = run([cards_bin, "-m", a.model, "--sae", a.sae, "--stats", stats, "--gguf", path]
                  + features[:4]).stdout
        check(all(same_logits(json.loads(line), u) for line in out.splitlines()),
              f"{kind} unembedding: promoted/suppressed equal the float64 loop through its "
              "values (gguf-py's)")

    p = run([cards_bin, "-m", a.model, "--sae", a.sae, "--stats", stats, "--threads", "8"]
            + features, expect=None)
    check(p.returncode == 0, "8 threads building the same cards at once get the same cards")

    bad_inputs(libsae, a, work, stats, cap, stats_bin, cards_bin, m)


def bad_inputs(libsae, a, work, stats, cap, stats_bin, cards_bin, m):
    def expect_error(args, phrase, what):
        p = run(args, expect=None)
        last = (p.stderr.strip().splitlines() or [""])[-1]
        check(p.returncode == 1 and phrase in p.stderr,
              f"{what}: exit {p.returncode}, '{last[:110]}'")

    def cards(path, *extra, gguf=None):
        return [cards_bin, "-m", a.model, "--sae", a.sae, "--stats", path] + \
            (["--gguf", gguf] if gguf else []) + list(extra) + ["0"]

    text = open(stats, "rb").read()
    doc = json.loads(text)

    def variant(name, mutate):
        d = json.loads(text)
        mutate(d)
        path = os.path.join(work, name + ".json")
        with open(path, "w") as f:
            json.dump(d, f)
        return path

    expect_error(cards(os.path.join(work, "absent.json")), "absent.json", "a missing file")
    empty = os.path.join(work, "empty.json")
    open(empty, "wb").close()
    expect_error(cards(empty), "empty", "an empty file")
    for frac in (0.5, 0.999):
        cut = os.path.join(work, f"cut{frac}.json")
        with open(cut, "wb") as f:
            f.write(text[:int(len(text) * frac)])
        expect_error(cards(cut), "not JSON", f"a file cut at {frac:.1%}")
    expect_error(cards(variant("format", lambda d: d.update(format="libsae-capture-1"))),
                 "not a feature statistics file", "another format")
    expect_error(cards(variant("width", lambda d: d.update(d_sae=256))),
                 "made for a dictionary of", "another width")
    expect_error(cards(variant("fewer", lambda d: d["features"].pop())),
                 "'features' is not a list", "a feature missing")
    other = os.path.join(work, "other.safetensors")
    m2 = libsae.Model.load(a.sae)
    w = m2.get_tensor("W_dec")
    m2.set_tensor("W_dec", w * 1.5 if hasattr(w, "reshape") else [v * 1.5 for v in w])
    m2.save(other)
    expect_error([cards_bin, "-m", a.model, "--sae", other, "--stats", stats, "0"],
                 "made for another dictionary", "the same width, another dictionary")

    def feat(k, fn):
        return lambda d: fn(d["features"][k])

    live = next(k for k, f in enumerate(doc["features"]) if f["top"])
    cases = [
        ("hist", feat(live, lambda f: f["hist"].__setitem__(0, f["hist"][0] + 1)),
         "the histogram counts", "a histogram that does not add up to the count"),
        ("edges", feat(live, lambda f: f["edges"].reverse()), "ascending", "descending edges"),
        ("count", feat(live, lambda f: f.update(count=doc["tokens"] + 1)), "'count'",
         "a count above the tokens seen"),
        ("neg", feat(live, lambda f: f.update(sum=-1)), "'sum'", "a negative sum"),
        ("str", feat(live, lambda f: f.update(max="big")), "'max'", "a string for a number"),
        ("tok", feat(live, lambda f: f["top"][0]["tokens"].__setitem__(0, 512)),
         "token id below 512", "a token id past the vocabulary"),
        ("frac", feat(live, lambda f: f["top"][0]["tokens"].__setitem__(0, 1.5)),
         "token id below", "a fractional token id"),
        ("target", feat(live, lambda f: f["top"][0].update(target=99)), "context 0",
         "a target outside its context"),
        ("value", feat(live, lambda f: f["top"][0].update(value=f["top"][0]["value"] / 2)),
         "the value at the target", "a context value that is not the target's"),
        ("len", feat(live, lambda f: f["top"][0]["values"].pop()), "tokens", "values shorter "
         "than tokens"),
        ("many", feat(live, lambda f: f["top"].extend(f["top"] * 2)), "'top'",
         "more contexts than top_n"),
        ("index", feat(live, lambda f: f["top"][0].update(index=2 ** 60)), "context 0",
         "an index past the tokens seen"),
        ("nofeat", lambda d: d["features"].__setitem__(3, [1, 2]), "not an object",
         "a feature that is not an object"),
        ("tokens0", lambda d: d.update(tokens=0), "'tokens'", "no tokens seen"),
        ("bins", lambda d: d.update(bins=10 ** 9), "'bins'", "a billion bins (refused before "
         "anything is allocated for them)"),
    ]
    for name, fn, phrase, what in cases:
        expect_error(cards(variant(name, fn)), phrase, what)
    # random damage: any byte changed may give a card or an error, never a crash
    rng = random.Random(7)
    crashes = 0
    for k in range(40):
        b = bytearray(text)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.choice(b'0123456789-.e,:[]{}"x ')
        path = os.path.join(work, "damaged.json")
        with open(path, "wb") as f:
            f.write(bytes(b))
        p = run(cards(path), expect=None)
        crashes += p.returncode not in (0, 1)
    check(crashes == 0, "40 randomly damaged files: a card or an error each, no crash")
    expect_error([cards_bin, "-m", a.model, "--sae", a.sae, "--stats", stats, "512"],
                 "out of range", "feature 512 of 512")
    expect_error(cards(stats, gguf=stats), "not a GGUF file", "a GGUF that is not one")
    cut_gguf = os.path.join(work, "cut.gguf")
    with open(a.model, "rb") as src, open(cut_gguf, "wb") as dst:
        blob = src.read()
        dst.write(blob[:200000])  # inside output.weight (stories260K: 1 MB, it ends near 280 kB)
    expect_error(cards(stats, gguf=cut_gguf), "outside the file", "a GGUF cut inside the "
                 "unembedding")

    # the statistics pass
    out = os.path.join(work, "s.json")
    expect_error([stats_bin, "--capture", cap, "--hook", "blocks.3.hook_resid_pre", "--sae",
                  a.sae, "-o", out], "no hook", "stats: a hook the capture lacks")
    small = os.path.join(work, "small.safetensors")
    libsae.Model.new("relu", 32, 16).save(small)
    expect_error([stats_bin, "--capture", cap, "--hook", HOOK, "--sae", small, "-o", out],
                 "32-wide", "stats: an SAE of another width")
    part = os.path.join(work, "partial")
    shutil.copytree(cap, part)
    ix = json.load(open(os.path.join(part, "index.json")))
    ix["complete"] = False
    json.dump(ix, open(os.path.join(part, "index.json"), "w"))
    expect_error([stats_bin, "--capture", part, "--hook", HOOK, "--sae", a.sae, "-o", out],
                 "not complete", "stats: an incomplete capture")
    ix["complete"] = True
    json.dump(ix, open(os.path.join(part, "index.json"), "w"))
    npy = os.path.join(part, f"{ix['shards'][0]['name']}.{HOOK}.npy")
    with open(npy, "r+b") as f:
        f.truncate(os.path.getsize(npy) // 2)
    expect_error([stats_bin, "--capture", part, "--hook", HOOK, "--sae", a.sae, "-o", out],
                 ".npy", "stats: a truncated activation file")
    check(not os.path.exists(out), "no statistics file is left after a failed pass")


if __name__ == "__main__":
    sys.exit(main())
