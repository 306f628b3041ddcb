#!/usr/bin/env python3
"""Cross-check libsae inside llama.cpp against libsae on its own example engine.

usage: check-steering.py BUILD_DIR MODEL.gguf DATA_DIR SAE.safetensors FEATURES.tsv

BUILD_DIR holds sae-llama-cpp (llama.cpp + libsae) and sae-engine-ref (examples/llama + libsae);
DATA_DIR is shared/data/stories260K (model.bin, tok512.bin, reference.json); the SAE reads the
stream entering block 2 and FEATURES.tsv is its sae-train-resid --features table.

(a) the rows llama.cpp hands cb_eval at l_out-1 equal reference.json's resid_layer2_first4 and
    the engine's stream entering layer 2 at every position of every reference sequence (whole
    prompt in one ubatch, and in ubatches of 3), to 1e-4; each token's top SAE features agree.
(b) greedy generation with clamp/scale/ablate plans applied in cb_eval gives the same tokens as
    the engine with the same plan and SAE, and different tokens from the unsteered run.
(c) an add plan gives the same tokens through cb_eval, llama_set_adapter_cvec and a libsae
    control-vector GGUF loaded by llama.cpp's common_control_vector_load; and the cvec paths
    refuse a clamp plan.
Exit 0 when everything holds, 1 otherwise.
"""
import json
import os
import subprocess
import sys

TOL = 1e-4
FEAT_TOL = 1e-3


def main():
    if len(sys.argv) != 6:
        print(__doc__, file=sys.stderr)
        return 2
    build, gguf, data, sae, tsv = sys.argv[1:]
    llcpp = os.path.join(build, "sae-llama-cpp")
    eng = os.path.join(build, "sae-engine-ref")
    model_bin = os.path.join(data, "model.bin")
    tok_bin = os.path.join(data, "tok512.bin")
    ref = json.load(open(os.path.join(data, "reference.json")))
    layer = 2
    fails = 0

    def check(ok, what):
        nonlocal fails
        print(("ok   " if ok else "FAIL ") + what)
        if not ok:
            fails += 1
        return ok

    def run(exe, *args, expect=0):
        p = subprocess.run([exe, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
        if p.returncode != expect:
            sys.stderr.write(p.stderr)
            raise RuntimeError(f"{os.path.basename(exe)} {' '.join(map(str, args))}: exit "
                               f"{p.returncode}, expected {expect}")
        return json.loads(p.stdout) if expect == 0 else p

    def llama_cpp(ids, n, *extra):
        return run(llcpp, "-m", gguf, "--sae", sae, "--stats", tsv, "--layer", layer, "-t",
                   ",".join(map(str, ids)), "-n", n, "--json", *extra)

    def engine(ids, n, *extra):
        return run(eng, model_bin, tok_bin, "--sae", sae, "--stats", tsv, "--layer", layer, "-t",
                   ",".join(map(str, ids)), "-n", n, *extra)

    def maxdiff(a, b):
        if len(a) != len(b):
            return float("inf")
        return max((abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)), default=0.0)

    def features_agree(fa, fb):
        """Top-k lists per position: same values for every listed feature; a feature listed on
        one side only must sit at the cut (within FEAT_TOL of the other side's smallest)."""
        worst = 0.0
        if len(fa) != len(fb):
            return False, float("inf")
        for la, lb in zip(fa, fb):
            da, db = dict((i, v) for i, v in la), dict((i, v) for i, v in lb)
            cut_a = min(da.values(), default=0.0)
            cut_b = min(db.values(), default=0.0)
            for i in set(da) | set(db):
                if i in da and i in db:
                    worst = max(worst, abs(da[i] - db[i]))
                elif i in da and da[i] > cut_b + FEAT_TOL:
                    return False, da[i]
                elif i in db and db[i] > cut_a + FEAT_TOL:
                    return False, db[i]
        return worst <= FEAT_TOL, worst

    # ---- (a) the rows the callback sees, and each token's features --------------------------
    features_of = {}
    for c in ref["cases"]:
        seq = c["greedy_tokens"]
        name = f"{ref['model']} {c['prompt']!r} ({len(seq)} tokens)"
        e = engine(seq, 0, "--features", 8, "--dump-resid", len(seq))
        features_of[c["prompt"]] = e["features"]
        for ub in (0, 3):
            extra = ("--ubatch", ub) if ub else ()
            r = llama_cpp(seq, 0, "--features", 8, "--dump-resid", len(seq), *extra)
            how = f"in ubatches of {ub} ({r['callback_calls']} callback calls)" if ub else \
                  f"in one ubatch ({r['callback_calls']} callback call)"
            d = maxdiff(r["resid"], e["resid"])
            check(len(r["resid"]) == len(seq) and d <= TOL,
                  f"(a) {name}: cb_eval rows of {r['tensor']} {how} equal the engine's stream "
                  f"entering layer {layer}, max |diff| {d:.2e}")
            ok, w = features_agree(r["features"], e["features"])
            check(ok, f"(a) {name}: top-8 SAE features per token agree {how}, max |diff| {w:.2e}")
        key = f"resid_layer{layer}_first4"
        if key in c:
            k = len(c[key])
            d = maxdiff(r["resid"][:k], c[key])
            check(d <= TOL, f"(a) {name}: cb_eval rows equal reference.json {key}, max |diff| {d:.2e}")

    # ---- (b) clamp through the callback == clamp in the engine ------------------------------
    feats = []
    for line in open(tsv):
        if line.startswith("#"):
            continue
        i, count, mx = line.split("\t")[:3]
        feats.append((int(count), int(i), float(mx)))
    feats.sort(reverse=True)
    busy, second = feats[0], feats[len(feats) // 4]  # the most frequent feature, and another
    cases = [c for c in ref["cases"] if c["prompt"]][:3]
    maxes = {i: mx for _, i, mx in feats}
    for c in cases:
        pt = c["prompt_tokens"]
        n_new = len(c["greedy_tokens"]) - len(pt)
        # the two features that are most often among this text's top 8: plans that touch them
        # must change the text, so the comparison below cannot pass vacuously
        seen = {}
        for lst in features_of[c["prompt"]]:
            for i, v in lst:
                seen[i] = seen.get(i, 0) + 1
        f1, f2 = sorted(seen, key=lambda i: (-seen[i], i))[:2]
        plans = [
            ("clamp", ["--clamp", f"{f1}:{2 * maxes[f1]:.6g}"]),
            ("clamp relative", ["--clamp", f"{f2}:1.5x"]),
            ("ablate + scale", ["--clamp", f"{f1}:0", "--scale", f"{f2}:4"]),
        ]
        base = llama_cpp(pt, n_new)
        check(base["tokens"] == c["greedy_tokens"],
              f"(b) {c['prompt']!r}: unsteered llama.cpp with the callback installed (read only) "
              f"gives reference.json's greedy tokens")
        for pname, args in plans:
            r = llama_cpp(pt, n_new, *args)
            e = engine(pt, n_new, *args)
            r3 = llama_cpp(pt, n_new, "--ubatch", 3, *args)
            differ = sum(a != b for a, b in zip(r["tokens"], base["tokens"]))
            what = (f"(b) {c['prompt']!r} {pname} [{r['plan']}]: steering changes "
                    f"{differ} of {n_new} tokens")
            if pname.startswith("clamp"):  # a clamp at twice the max must change the text
                check(r["callback_writes"] > 0 and differ > 0, what)
            else:                          # a gentle plan may leave greedy tokens as they were
                print("info " + what)
            if check(r["tokens"] == e["tokens"],
                     f"(b) {c['prompt']!r} {pname}: llama.cpp + cb_eval gives the engine's tokens"):
                pass
            else:
                print(f"     llama.cpp: {r['text']!r}\n     engine:    {e['text']!r}")
            check(r3["tokens"] == r["tokens"],
                  f"(b) {c['prompt']!r} {pname}: the same with the prompt in ubatches of 3")

    # ---- (c) add plan: callback == llama_set_adapter_cvec == control-vector file ------------
    add = ["--add", f"{busy[1]}:{3 * busy[2]:.6g}", "--add", f"{second[1]}:{-2 * second[2]:.6g}"]
    for c in cases:
        pt = c["prompt_tokens"]
        n_new = len(c["greedy_tokens"]) - len(pt)
        cb = llama_cpp(pt, n_new, *add)
        cv = llama_cpp(pt, n_new, *add, "--via", "cvec")
        cf = llama_cpp(pt, n_new, *add, "--via", "cvec-file")
        e = engine(pt, n_new, *add)
        differ = sum(a != b for a, b in zip(cb["tokens"], c["greedy_tokens"]))
        check(differ > 0, f"(c) {c['prompt']!r} [{cb['plan']}]: the add plan changes {differ} of "
                          f"{n_new} tokens")
        check(cv["tokens"] == cb["tokens"] and cv["callback_writes"] == 0,
              f"(c) {c['prompt']!r}: llama_set_adapter_cvec (sae_steer_vector) gives the "
              f"callback's tokens")
        check(cf["tokens"] == cb["tokens"] and cf["callback_writes"] == 0,
              f"(c) {c['prompt']!r}: the control-vector GGUF (sae_steer_write_cvec, loaded by "
              f"common_control_vector_load) gives the callback's tokens")
        check(e["tokens"] == cb["tokens"], f"(c) {c['prompt']!r}: and the engine's")
    pt = cases[0]["prompt_tokens"]
    for via in ("cvec", "cvec-file"):
        p = run(llcpp, "-m", gguf, "--sae", sae, "-t", ",".join(map(str, pt)), "-n", 4,
                "--clamp", f"{busy[1]}:1", "--via", via, expect=2)
        check("add ops only" in p.stderr, f"(c) --via {via} refuses a clamp plan: "
                                          f"{p.stderr.strip().splitlines()[-1][:90]}")

    print(f"{'all steering checks passed' if not fails else f'{fails} steering check(s) FAILED'}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
