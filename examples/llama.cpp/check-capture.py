#!/usr/bin/env python3
"""The hook adapter, capture, evaluate and training from a capture, against libsae's own engine.

usage: check-capture.py BUILD_DIR GGUF_DIR DATA_DIR WORK_DIR

For stories260K and aidreams260K (GGUF_DIR/<m>.gguf, DATA_DIR/<m>/model.bin and the corpus):
(1) sae-llama-capture of every hook point of every layer (F32 KV cache) equals examples/llama's
    point hooks on the same windows (sae-engine-hooks check-capture), relative 1e-5 per hook;
(2) a capture killed after writing a shard's activations (before its tokens and the index) and
    resumed gives byte-identical files to one uninterrupted run, and leaves no temporary files;
(3) sae-train-capture streams the shards into one TopK SAE per hook, bit-identical to training
    from the same rows in memory;
(4) sae-llama-evaluate (llama.cpp) and sae-engine-hooks evaluate (the engine) give the same
    numbers to 1e-4, for an SAE trained in (3);
(5) bad input: a missing model, an unknown hook, a layer out of range, a dictionary of another
    width, an empty corpus, a file-size limit (RLIMIT_FSIZE) give a message and a non-zero exit,
    and never a half-written .npy.
Exit 0 when everything holds, 1 otherwise.
"""
import json
import random
import os
import resource
import shutil
import struct
import subprocess
import sys

REL_TOL = 1e-5
EVAL_TOL = 1e-4
POINTS = ["hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_in", "hook_mlp_out",
          "hook_resid_post"]
fails = 0


def check(ok, what):
    global fails
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        fails += 1
    return ok


def run(args, expect=0, env=None, preexec=None):
    p = subprocess.run([str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, env=env, preexec_fn=preexec)
    if expect is not None and p.returncode != expect:
        sys.stderr.write(p.stderr)
        raise RuntimeError(f"{os.path.basename(str(args[0]))}: exit {p.returncode}, expected {expect}")
    return p


def npy_complete(path):
    """True if the .npy file's size is what its header says."""
    with open(path, "rb") as f:
        head = f.read(10)
        if head[:6] != b"\x93NUMPY":
            return False
        hl = struct.unpack("<H", head[8:10])[0]
        h = f.read(hl).decode()
    descr = h.split("'descr': '")[1][:3]
    es = {"<f4": 4, "<i4": 4, "<f2": 2, "<i8": 8}[descr]
    shape = h.split("'shape': (")[1].split(")")[0]
    n = 1
    for s in shape.split(","):
        if s.strip():
            n *= int(s)
    return os.path.getsize(path) == 10 + hl + n * es


def write_safetensors(path, tensors):
    """A SAELens weights file: {name: (shape, flat list)} as F32."""
    hdr, off, blobs = {}, 0, []
    for name, (shape, vals) in tensors.items():
        b = struct.pack(f"<{len(vals)}f", *vals)
        hdr[name] = {"dtype": "F32", "shape": shape, "data_offsets": [off, off + len(b)]}
        off += len(b)
        blobs.append(b)
    h = json.dumps(hdr).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def main():
    if len(sys.argv) != 5:
        print(__doc__, file=sys.stderr)
        return 2
    build, gguf_dir, data, work = sys.argv[1:]
    cap = os.path.join(build, "sae-llama-capture")
    ev = os.path.join(build, "sae-llama-evaluate")
    eng = os.path.join(build, "sae-engine-hooks")
    trn = os.path.join(build, "sae-train-capture")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    models = [("stories260K", "stories.txt"), ("aidreams260K", "dreams.txt")]
    for m, corpus_name in models:
        gguf = os.path.join(gguf_dir, m + ".gguf")
        mbin = os.path.join(data, m, "model.bin")
        full = os.path.join(data, m, corpus_name)
        if not (os.path.exists(gguf) and os.path.exists(full)):
            print(f"skip {m}: no model or corpus")
            continue
        n_layer = struct.unpack("<7i", open(mbin, "rb").read(28))[2]
        lines = [l for l in open(full, encoding="utf-8").read().split("\n") if l.strip()]
        small = os.path.join(work, m + "-small.txt")
        open(small, "w", encoding="utf-8").write("\n".join(lines[:10]) + "\n")
        jl = os.path.join(work, m + "-small.jsonl")
        open(jl, "w", encoding="utf-8").write(
            "".join(json.dumps({"text": l, "id": i}) + "\n" for i, l in enumerate(lines[:10])))

        # (1) every hook point of every layer against the engine
        hooks = [f"blocks.{L}.{p}" for L in range(n_layer) for p in POINTS]
        d1 = os.path.join(work, m + "-all")
        r = run([cap, "-m", gguf, "--hooks", ",".join(hooks), "--corpus", small, "-o", d1,
                 "--ctx", 96, "--shard-tokens", 500, "--no-progress"])
        idx = json.load(open(os.path.join(d1, "index.json")))
        e = json.loads(run([eng, "check-capture", mbin, d1]).stdout)
        worst = max(e["hooks"].items(), key=lambda kv: kv[1]["rel"])
        check(idx["complete"] and e["tokens"] == idx["tokens"] and
              all(v["rel"] <= REL_TOL for v in e["hooks"].values()) and len(e["hooks"]) == len(hooks),
              f"(1) {m}: capture of {len(hooks)} hooks ({n_layer} layers x 6 points), "
              f"{idx['tokens']} tokens in {len(idx['shards'])} shards of windows of 96 (with 2 "
              f"sequences a batch) equals examples/llama's point hooks; worst {worst[0]} relative "
              f"{worst[1]['rel']:.2e} (max |diff| {worst[1]['max_abs']:.2e})")
        # the same corpus as JSON lines gives the same shards
        d1j = os.path.join(work, m + "-jsonl")
        run([cap, "-m", gguf, "--hooks", ",".join(hooks[:6]), "--corpus", jl, "--jsonl", "-o", d1j,
             "--ctx", 96, "--shard-tokens", 500, "--no-progress"])
        same = all(open(os.path.join(d1, f), "rb").read() == open(os.path.join(d1j, f), "rb").read()
                   for f in os.listdir(d1j) if f.endswith(".npy"))
        check(same, f"(1) {m}: the corpus as JSON lines gives the same shard files")

        # (2) kill after a shard's activations, resume, compare with one run
        three = [f"blocks.1.hook_resid_pre", f"blocks.{n_layer - 1}.hook_resid_post",
                 "blocks.2.hook_mlp_out"]
        args = ["-m", gguf, "--hooks", ",".join(three), "--corpus", full, "--ctx", 128,
                "--shard-tokens", 1500, "--max-tokens", 20000, "--no-progress"]
        da, db = os.path.join(work, m + "-one"), os.path.join(work, m + "-killed")
        run([cap, *args, "-o", da])
        env = dict(os.environ, SAE_CAPTURE_TEST_KILL_AT_SHARD="4")
        p = run([cap, *args, "-o", db], expect=None, env=env)
        killed = p.returncode == -9
        part = json.load(open(os.path.join(db, "index.json")))
        n_part = len(part["shards"])
        p2 = run([cap, *args, "-o", db])
        fa = sorted(f for f in os.listdir(da))
        fb = sorted(f for f in os.listdir(db))
        ident = fa == fb and all(open(os.path.join(da, f), "rb").read() ==
                                 open(os.path.join(db, f), "rb").read() for f in fa)
        check(killed and n_part == 4 and "resuming" in p2.stderr and ident,
              f"(2) {m}: killed (SIGKILL) after shard 4's activations with {n_part} shards in the "
              f"index, resumed: {len(fa)} files byte-identical to one run, no temporaries")

        # (3) one SAE per hook from one streaming pass; == in memory
        sd = os.path.join(work, m + "-saes")
        r = run([trn, da, "-o", sd, "--arch", "topk", "--k", 8, "--latents", 256, "--batch", 200,
                 "--init-tokens", 1000, "--check-in-memory"], expect=None)
        print("     " + r.stdout.strip().replace("\n", "\n     "))
        check(r.returncode == 0 and r.stdout.count("bit-identical") == len(three),
              f"(3) {m}: {len(three)} TopK SAEs trained from {len(part['shards'])}+ shards in one "
              f"pass equal training from the rows in memory, bit for bit")

        # (4) evaluate: llama.cpp vs the engine
        for hook in ("blocks.1.hook_resid_pre", "blocks.2.hook_mlp_out"):
            sae = os.path.join(sd, hook + ".safetensors")
            a = json.loads(run([ev, "-m", gguf, "--dict", sae, "--hook", hook, "--capture", da,
                                "--max-tokens", 3000]).stdout)
            b = json.loads(run([eng, "evaluate", mbin, "--dict", sae, "--hook", hook, "--capture",
                                da, "--max-tokens", 3000]).stdout)
            keys = ["ce_loss_clean", "ce_loss_spliced", "ce_loss_zero_ablated", "ce_loss_recovered",
                    "kl_spliced", "kl_zero_ablated", "fvu", "l0", "dead_features", "tokens"]
            diff = max(abs(a[k] - b[k]) / max(1.0, abs(b[k])) for k in keys)
            check(diff <= EVAL_TOL and a["special"] == b["special"] and a["tokens"] > 2900,
                  f"(4) {m} {hook}: llama.cpp and the engine agree over {a['tokens']} tokens "
                  f"(max diff {diff:.1e}): CE clean {a['ce_loss_clean']:.4f} spliced "
                  f"{a['ce_loss_spliced']:.4f} zero {a['ce_loss_zero_ablated']:.4f}, recovered "
                  f"{a['ce_loss_recovered']:.4f}, KL {a['kl_spliced']:.4f}, FVU {a['fvu']:.4f}, "
                  f"L0 {a['l0']:.2f}, dead {a['dead_features']}")

        # (4b) a transcoder spliced in: it reads block 2's MLP input, its prediction replaces the
        # MLP output. Random weights in SAELens's transcoder layout (cfg.json beside them).
        d, n_tc = 64, 128
        rnd = random.Random(7)
        tc_dir = os.path.join(work, m + "-transcoder")
        os.makedirs(tc_dir, exist_ok=True)
        write_safetensors(os.path.join(tc_dir, "sae_weights.safetensors"), {
            "W_enc": ([d, n_tc], [rnd.gauss(0, 0.15) for _ in range(d * n_tc)]),
            "b_enc": ([n_tc], [rnd.gauss(-0.1, 0.05) for _ in range(n_tc)]),
            "W_dec": ([n_tc, d], [rnd.gauss(0, 0.05) for _ in range(n_tc * d)]),
            "b_dec": ([d], [0.0] * d)})
        with open(os.path.join(tc_dir, "cfg.json"), "w") as f:
            json.dump({"architecture": "transcoder", "d_in": d, "d_sae": n_tc, "d_out": d,
                       "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False,
                       "normalize_activations": "none", "reshape_activations": "none",
                       "metadata": {"sae_lens_version": "6.18.0"}}, f)
        hook = "blocks.2.hook_mlp_in"
        a = json.loads(run([ev, "-m", gguf, "--dict", tc_dir, "--hook", hook, "--capture", da,
                            "--max-tokens", 3000]).stdout)
        b = json.loads(run([eng, "evaluate", mbin, "--dict", tc_dir, "--hook", hook, "--capture",
                            da, "--max-tokens", 3000]).stdout)
        keys = ["ce_loss_clean", "ce_loss_spliced", "ce_loss_zero_ablated", "kl_spliced",
                "kl_zero_ablated", "fvu", "l0", "tokens"]
        diff = max(abs(a[k] - b[k]) / max(1.0, abs(b[k])) for k in keys)
        check(a["transcoder"] and b["transcoder"] and diff <= EVAL_TOL and
              a["ce_loss_spliced"] != a["ce_loss_clean"],
              f"(4b) {m}: a transcoder at {hook} -> hook_mlp_out spliced in: llama.cpp and the "
              f"engine agree (max diff {diff:.1e}): CE clean {a['ce_loss_clean']:.4f} spliced "
              f"{a['ce_loss_spliced']:.4f}, KL {a['kl_spliced']:.4f}, FVU {a['fvu']:.4f}")

        # (5) bad input
        def bad(what, args, code, needle, directory=None, pre=None):
            p = run(args, expect=None, preexec=pre)
            msg = (p.stderr.strip().splitlines() or [""])[-1]
            ok = p.returncode == code and needle in p.stderr
            if directory and os.path.isdir(directory):
                for f in os.listdir(directory):
                    path = os.path.join(directory, f)
                    if ".tmp." in f or (f.endswith(".npy") and not npy_complete(path)):
                        ok = False
                        msg += f" [left {f}]"
            check(ok, f"(5) {m}: {what}: exit {p.returncode}: {msg[:110]}")

        o = os.path.join(work, m + "-bad")
        bad("a missing model", [cap, "-m", gguf + ".missing", "--hooks", "blocks.1.hook_mlp_in",
                                "--corpus", small, "-o", o], 1, "model")
        bad("an unknown hook", [cap, "-m", gguf, "--hooks", "blocks.1.hook_mlp_middle",
                                "--corpus", small, "-o", o], 2, "no hook point")
        bad("a layer out of range", [cap, "-m", gguf, "--hooks", f"blocks.{n_layer}.hook_mlp_in",
                                     "--corpus", small, "-o", o], 2, "out of range")
        empty = os.path.join(work, "empty.txt")
        open(empty, "w").write("\n\n")
        bad("an empty corpus", [cap, "-m", gguf, "--hooks", "blocks.1.hook_mlp_in", "--corpus",
                                empty, "-o", o + "-empty"], 1, "no tokens")
        bad("a malformed JSON line", [cap, "-m", gguf, "--hooks", "blocks.1.hook_mlp_in",
                                      "--corpus", small, "--jsonl", "-o", o + "-json"], 1, "line 1")
        wrong = os.path.join(work, "wrong-width")   # a SAELens folder
        os.makedirs(wrong, exist_ok=True)
        dw, ds = 32, 16
        json.dump({"architecture": "standard", "d_in": dw, "d_sae": ds, "dtype": "float32",
                   "apply_b_dec_to_input": True, "normalize_activations": "none",
                   "hook_name": "blocks.1.hook_resid_pre"},
                  open(os.path.join(wrong, "cfg.json"), "w"))
        write_safetensors(os.path.join(wrong, "sae_weights.safetensors"), {"W_enc": ([dw, ds], [0.01] * (dw * ds)),
                                  "W_dec": ([ds, dw], [0.01] * (dw * ds)),
                                  "b_enc": ([ds], [0.0] * ds), "b_dec": ([dw], [0.0] * dw)})
        bad("a dictionary of width 32", [ev, "-m", gguf, "--dict", wrong, "--hook",
                                         "blocks.1.hook_resid_pre", "--capture", da], 2, "d_in is 32")
        lim = 100000
        bad(f"a file-size limit of {lim} bytes (RLIMIT_FSIZE)",
            [cap, "-m", gguf, "--hooks", ",".join(hooks), "--corpus", small, "-o", o + "-fsize",
             "--ctx", 96, "--shard-tokens", 500, "--no-progress"], 1, "File too large",
            directory=o + "-fsize",
            pre=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (lim, lim)))
    print("all capture checks passed" if not fails else f"{fails} capture check(s) FAILED")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
