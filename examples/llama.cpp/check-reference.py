#!/usr/bin/env python3
"""Check llama.cpp (through sae-llama-probe) against shared/data/*/reference.json.

usage: check-reference.py PROBE MODEL.gguf REFERENCE.json

For every case of the reference:
  * llama.cpp's tokenization of the prompt equals prompt_tokens;
  * greedy generation equals greedy_tokens and greedy_text;
  * the logits of the first 8 positions of greedy_tokens equal logits_first8;
  * if the reference has resid_layer<L>_first4, the residual stream entering
    block L that the eval callback sees equals it (to 1e-4).
If the reference's folder holds the residual-stream dataset (tokens.npy,
doc_ids.npy, positions.npy and resid_*.npy, all "entering layer 2"), the
callback's rows for the whole first document equal it too (prompt fed in
ubatches of 7 tokens, so the callback sees it in pieces).
Then, on the first case, that editing the residual stream inside the callback
changes generation, and that the same `add` through llama_set_adapter_cvec
gives the same tokens as through the callback.
Exit 0 when everything holds, 1 otherwise.
"""
import ast
import glob
import json
import os
import re
import struct
import subprocess
import sys

RESID_TOL = 1e-4
LOGIT_TOL = 1e-3


def probe(exe, model, *args):
    out = subprocess.run([exe, "-m", model, "--json", *map(str, args)],
                         check=True, stdout=subprocess.PIPE).stdout
    return json.loads(out)


def read_npy(path):
    """Minimal .npy reader (little-endian int32/float32, C order): (shape, flat list)."""
    with open(path, "rb") as f:
        if f.read(6) != b"\x93NUMPY":
            raise ValueError(path)
        major = f.read(2)[0]
        hlen = struct.unpack("<H" if major == 1 else "<I", f.read(2 if major == 1 else 4))[0]
        hdr = ast.literal_eval(f.read(hlen).decode("latin1"))
        code = {"<i4": "i", "<f4": "f"}[hdr["descr"]]
        assert not hdr["fortran_order"]
        shape = hdr["shape"]
        n = 1
        for d in shape:
            n *= d
        return shape, list(struct.unpack("<%d%s" % (n, code), f.read(4 * n)))


def maxdiff(a, b):
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def main():
    if len(sys.argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    exe, model, refpath = sys.argv[1:4]
    ref = json.load(open(refpath))
    fails = 0

    def check(ok, what):
        nonlocal fails
        print(("ok   " if ok else "FAIL ") + what)
        if not ok:
            fails += 1

    resid_keys = [k for k in ref["cases"][0] if re.fullmatch(r"resid_layer\d+_first\d+", k)]
    for c in ref["cases"]:
        name = f"{ref['model']} {c['prompt']!r}"
        n_new = len(c["greedy_tokens"]) - len(c["prompt_tokens"])
        r = probe(exe, model, "-p", c["prompt"], "-n", n_new)
        check(r["prompt_tokens"] == c["prompt_tokens"],
              f"{name}: tokenization {r['prompt_tokens']}")
        check(r["tokens"] == c["greedy_tokens"], f"{name}: greedy tokens ({n_new} new)")
        if r["tokens"] != c["greedy_tokens"]:
            print("     got ", r["tokens"], "\n     want", c["greedy_tokens"])
        check(r["text"] == c["greedy_text"], f"{name}: greedy text")
        if r["text"] != c["greedy_text"]:
            print(f"     got  {r['text']!r}\n     want {c['greedy_text']!r}")

        # logits and residual stream over the reference's own tokens
        k = len(c["logits_first8"])
        seq = c["greedy_tokens"][:k]
        for key in resid_keys or [None]:
            layer = int(re.match(r"resid_layer(\d+)", key).group(1)) if key else 2
            nres = len(c[key]) if key else 0
            r = probe(exe, model, "-t", ",".join(map(str, seq)), "-n", 0,
                      "--layer", layer, "--dump-logits", k, "--dump-resid", nres)
            d = maxdiff(r["logits"], c["logits_first8"])
            check(d <= LOGIT_TOL, f"{name}: logits of the first {k} positions, max |diff| {d:.2e}")
            if key:
                d = maxdiff(r["resid"], c[key])
                check(d <= RESID_TOL,
                      f"{name}: residual entering block {layer} ({r['tensor']}) at the first "
                      f"{nres} positions, max |diff| {d:.2e}")

    # whole first document of the residual-stream dataset, if present
    folder = os.path.dirname(os.path.abspath(refpath))
    resid_files = sorted(glob.glob(os.path.join(folder, "resid_*.npy")))
    if resid_files and os.path.exists(os.path.join(folder, "tokens.npy")):
        layer = 2  # both datasets: the residual stream entering layer 2
        _, toks = read_npy(os.path.join(folder, "tokens.npy"))
        _, docs = read_npy(os.path.join(folder, "doc_ids.npy"))
        _, poss = read_npy(os.path.join(folder, "positions.npy"))
        (n_rows, d), flat = read_npy(resid_files[0])
        rows = [i for i in range(n_rows) if docs[i] == docs[0]]
        assert [poss[i] for i in rows] == list(range(len(rows)))
        seq = [toks[i] for i in rows]
        want = [flat[i * d:(i + 1) * d] for i in rows]
        r = probe(exe, model, "-t", ",".join(map(str, seq)), "-n", 0, "--layer", layer,
                  "--dump-resid", len(seq), "--ubatch", 7)
        dd = maxdiff(r["resid"], want)
        check(len(r["resid"]) == len(seq) and dd <= RESID_TOL,
              f"{ref['model']}: {os.path.basename(resid_files[0])} document {docs[0]} "
              f"({len(seq)} positions, {r['callback_calls']} callback calls) equals "
              f"{r['tensor']}, max |diff| {dd:.2e}")

    # in-callback modification and the cvec path, on the first non-empty prompt
    c = next(c for c in ref["cases"] if c["prompt"])
    n_new = len(c["greedy_tokens"]) - len(c["prompt_tokens"])
    layer = 2
    base = probe(exe, model, "-p", c["prompt"], "-n", n_new, "--layer", layer)
    edit = ("0:4.0")
    cb = probe(exe, model, "-p", c["prompt"], "-n", n_new, "--layer", layer, "--add", edit)
    cv = probe(exe, model, "-p", c["prompt"], "-n", n_new, "--layer", layer, "--cvec-add", edit)
    check(cb["callback_modified"] > 0 and cb["tokens"] != base["tokens"],
          f"editing the residual stream in cb_eval changes generation "
          f"({sum(a != b for a, b in zip(cb['tokens'], base['tokens']))} tokens differ)")
    print(f"     plain:   {base['text']!r}\n     --add {edit}: {cb['text']!r}")
    check(cv["tokens"] == cb["tokens"],
          "the same add through llama_set_adapter_cvec gives the same tokens as through cb_eval")
    if cv["tokens"] != cb["tokens"]:
        print(f"     cvec:    {cv['text']!r}")
    print(f"{'all checks passed' if not fails else f'{fails} check(s) FAILED'} for {ref['model']}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
