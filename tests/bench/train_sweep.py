"""Do the training defaults land near the best a sweep finds? For each data set and architecture,
trains the default run (what `python3 -m libsae train --arch A ACTS OUT` does: its run length,
held-out slice and parameters) and a grid around it (learning rate x 1/4 .. 4; ReLU's L1
coefficient x 1/2 .. 2), all on the same batches, and compares held-out FVU at similar L0 (TopK
and BatchTopK: the same K; ReLU: runs at most 20% denser than the default).

    LIBSAE_LIBRARY=build/lib/libsae.so PYTHONPATH=bindings/python \\
        nice python3 tests/bench/train_sweep.py [--arch relu,topk,batchtopk] [--d-sae N] \\
        [--data NAME=PATH ...] [--planted] [--seed N]

Data sets by default: /work/shared/data/stories260K/resid_mid.npy and
/work/shared/data/aidreams260K/resid_layer2.npy (or $SAE_DATA_DIR/...), and planted features
(--planted: 512 unit directions in 64 dimensions, about 4 active per token with exponential
magnitudes, plus noise of 5% of the signal's norm; 50,000 tokens, numpy seed 0). Prints one
markdown table row per run and a verdict per (data, architecture): the default's held-out FVU
against the best at similar L0 (docs/training.md records a run).
"""
import argparse
import os
import sys
import time

import numpy as np

import libsae
from libsae.__main__ import default_k, plan_run

DATA = os.environ.get("SAE_DATA_DIR", "/work/shared/data")
BATCH = 1024
LR_MULT = (0.25, 0.5, 1.0, 2.0, 4.0)
L1_MULT = (0.5, 1.0, 2.0)


def planted(n=50_000, d=64, n_feat=512, active=4, seed=0):
    rng = np.random.default_rng(seed)
    D = rng.standard_normal((n_feat, d))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    idx = rng.integers(0, n_feat, size=(n, active))
    mag = rng.exponential(1.0, size=(n, active))
    x = np.zeros((n, d))
    for j in range(active):
        x += mag[:, j:j + 1] * D[idx[:, j]]
    x += 0.05 * np.linalg.norm(x, axis=1).mean() / np.sqrt(d) * rng.standard_normal((n, d))
    return x.astype(np.float32)


def run(x, arch, d_sae, seed=0, **params):
    """One run as the CLI's default does it, with params overriding the library's defaults."""
    rows, d_in = x.shape
    heldout, steps, _ = plan_run(rows, BATCH, d_sae, None)
    train = rows - heldout
    kw = {"k": default_k(d_in)} if arch != "relu" else {}
    m = libsae.Model.new(arch, d_in, d_sae, **kw)
    base = {"seed": seed, "total_steps": steps,
            "dead_tokens": max(1, min(10_000_000, steps * BATCH // 10))}
    base.update(params)
    t = libsae.Trainer(m, **base)
    t.init(x[:min(train, 16384)])
    t.set_heldout(x[train:])
    starts = list(range(0, train - BATCH + 1, BATCH))
    rng = np.random.default_rng(seed)
    order = []
    t0 = time.monotonic()
    for _ in range(steps):
        if not order:
            order = list(rng.permutation(starts))
        at = order.pop()
        met = t.step(x[at:at + BATCH])
    used = {p: t.get_param(p) for p in ("lr", "l1_coeff")}
    t.close()
    return {"fvu": met["heldout_fvu"], "l0": met["heldout_l0"], "dead": met["dead_fraction"],
            "warn": met["warnings"], "s": time.monotonic() - t0, "steps": steps, **used}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="relu,topk,batchtopk")
    ap.add_argument("--d-sae", type=int, default=512)
    ap.add_argument("--data", action="append", default=None, metavar="NAME=PATH")
    ap.add_argument("--planted", action="store_true", help="also planted features")
    ap.add_argument("--no-real", action="store_true", help="only planted features")
    ap.add_argument("--seed", type=int, default=0,
                    help="the trainer's seed and the batch order's (the data stay the same)")
    a = ap.parse_args()
    sets = []
    if not a.no_real:
        for item in a.data or [f"stories260K={DATA}/stories260K/resid_mid.npy",
                               f"aidreams260K={DATA}/aidreams260K/resid_layer2.npy"]:
            name, _, path = item.partition("=")
            sets.append((name, np.load(path).astype(np.float32)))
    if a.planted:
        sets.append(("planted", planted()))
    print("| data | arch | lr | l1 | held-out FVU | L0 | dead | warn | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    verdicts = []
    for name, x in sets:
        for arch in a.arch.split(","):
            d = run(x, arch, a.d_sae, seed=a.seed)
            rows = [("default", d)]
            grid = [(lm, l1m) for lm in LR_MULT for l1m in (L1_MULT if arch == "relu" else (1.0,))]
            for lm, l1m in grid:
                if lm == 1.0 and l1m == 1.0:
                    continue
                p = {"lr": d["lr"] * lm}
                if arch == "relu":
                    p["l1_coeff"] = d["l1_coeff"] * l1m
                rows.append((f"x{lm:g}/x{l1m:g}", run(x, arch, a.d_sae, seed=a.seed, **p)))
            for tag, r in rows:
                l1 = f"{r['l1_coeff']:.3g}" if arch == "relu" else "-"
                print(f"| {name} | {arch} {tag} | {r['lr']:.3g} | {l1} | {r['fvu']:.4f} | "
                      f"{r['l0']:.1f} | {100 * r['dead']:.1f}% | {r['warn']} | {r['s']:.0f} |",
                      flush=True)
            similar = [r for _, r in rows if r["l0"] <= 1.2 * d["l0"]]
            best = min(similar, key=lambda r: r["fvu"])
            ratio = d["fvu"] / best["fvu"]
            verdicts.append(f"{name} {arch} (d_sae {a.d_sae}, {d['steps']} steps): default FVU "
                            f"{d['fvu']:.4f} at L0 {d['l0']:.1f}; best at similar L0 "
                            f"{best['fvu']:.4f} (lr {best['lr']:.3g}, L0 {best['l0']:.1f}): "
                            f"{ratio:.3f}x {'ok' if ratio <= 1.1 else 'MORE THAN 10% OFF'}")
    print()
    for v in verdicts:
        print(v)
    return 0 if all(v.endswith("ok") for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
