#!/usr/bin/python3
"""docs/performance.md: every libsae operation next to numpy and torch doing the same math on the
same weights and tokens in the same run, with the machine's bounds, the scaling with n and d_sae,
and each operation's peak memory. tests/bench/run builds libsae and calls this.

    tests/bench/perf.py --build DIR [--out docs/performance.md] [--quick]

The C side is DIR/tests/bench/bench_ops (see its header for what it prints)."""
import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

THREADS = os.cpu_count() or 1
# Every BLAS in every process uses all cores: set before numpy and torch load OpenBLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", str(THREADS))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

torch.set_num_threads(THREADS)

D_IN, D_SAE, K, TOP_N, STEER_VALUE, BATCH = 2304, 16384, 32, 16, 40.0, 1024
NS = (1, 64, 1024)


def steer_features(count, d_sae=D_SAE):
    return [(1234 + 997 * j) % d_sae for j in range(count)]


def best_time(fn):
    """As bench_ops: repeat until 3 calls and 0.5 s have passed; keep the fastest."""
    best, total, reps, min_reps = float("inf"), 0.0, 0, 3
    while reps < 200 and (reps < min_reps or total < 0.5):
        start = time.perf_counter()
        fn()
        t = time.perf_counter() - start
        total += t
        reps += 1
        best = min(best, t)
    return best


# ---- the data ------------------------------------------------------------------------------------

def make_data(folder, d_in=D_IN, d_sae=D_SAE, n=BATCH):
    """Random weights shaped like a trained SAE's: pre-activations of unit scale and a negative
    encoder bias, so that ReLU codes have an L0 near 100 of 16384 (trained 16k SAEs: 20 to 150)."""
    rng = np.random.default_rng(0)
    t = {
        "W_enc": rng.standard_normal((d_in, d_sae), dtype=np.float32) / np.float32(np.sqrt(d_in)),
        "W_dec": rng.standard_normal((d_sae, d_in), dtype=np.float32) / np.float32(np.sqrt(d_in)),
        "b_enc": (np.float32(-2.5) + rng.uniform(-0.1, 0.1, d_sae)).astype(np.float32),
        "b_dec": (rng.standard_normal(d_in, dtype=np.float32) * np.float32(0.1)),
        "threshold": rng.uniform(0.0, 0.2, d_sae).astype(np.float32),
        "x": rng.standard_normal((n, d_in), dtype=np.float32),
        # The 0.2 kinds: a transcoder's skip connection (its W_dec, b_dec are the SAE's, d_out =
        # d_in), and a gated SAE's magnitude path (b_enc is its gate bias b_gate).
        "W_skip": rng.standard_normal((d_in, d_in), dtype=np.float32) / np.float32(np.sqrt(d_in)),
        "r_mag": rng.uniform(-0.5, 0.5, d_sae).astype(np.float32),
        "b_mag": rng.uniform(-0.2, 0.2, d_sae).astype(np.float32),
    }
    for name, a in t.items():
        np.save(os.path.join(folder, name + ".npy"), a)
    return t


class Peers:
    """numpy and torch doing what SAELens and sparsify do, on the benchmark's weights."""

    def __init__(self, t):
        self.np = {k: v for k, v in t.items()}
        self.np["theta"] = np.float32(t["threshold"].astype(np.float64).mean())
        self.t = {k: torch.from_numpy(v) for k, v in t.items()}
        self.t["theta"] = torch.tensor(float(self.np["theta"]))

    # numpy
    def np_pre(self, x):
        w = self.np
        return (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]

    def np_encode(self, arch, x):
        w, pre = self.np, self.np_pre(x)
        if arch == "relu":
            return np.maximum(pre, 0)
        if arch == "jumprelu":
            return np.maximum(pre, 0) * (pre > w["threshold"])
        if arch == "batchtopk":
            return np.maximum(pre, 0) * (pre > w["theta"])
        if arch == "gated":  # SAELens's GatedSAE.encode, with b_enc as b_gate
            xp = x - w["b_dec"]
            mag = xp @ (w["W_enc"] * np.exp(w["r_mag"])) + w["b_mag"]
            return (pre > 0) * np.maximum(mag, 0)
        if arch == "groupmax":  # sparsify: the largest of each of K groups of D_SAE / K
            g = np.maximum(pre, 0).reshape(pre.shape[0], K, -1)
            idx = g.argmax(-1)
            f = np.zeros_like(g)
            np.put_along_axis(f, idx[..., None], np.take_along_axis(g, idx[..., None], -1), -1)
            return f.reshape(pre.shape)
        idx = np.argpartition(-pre, K, axis=1)[:, :K]
        f = np.zeros_like(pre)
        np.put_along_axis(f, idx, np.maximum(np.take_along_axis(pre, idx, 1), 0), 1)
        return f

    def np_encode_sparse(self, arch, x):
        f = np.maximum(self.np_pre(x), 0) if arch == "topk" else self.np_encode(arch, x)
        idx = np.argpartition(-f, K, axis=1)[:, :K]
        val = np.take_along_axis(f, idx, 1)
        order = np.argsort(-val, axis=1, kind="stable")
        return np.take_along_axis(idx, order, 1), np.take_along_axis(val, order, 1)

    def np_decode(self, f):
        return f @ self.np["W_dec"] + self.np["b_dec"]

    def np_scatter(self, idx, val):
        f = np.zeros((idx.shape[0], D_SAE), dtype=np.float32)
        np.put_along_axis(f, idx, val, 1)
        return f

    def np_decode_sparse(self, idx, val):
        return np.einsum("nk,nkd->nd", val, self.np["W_dec"][idx]) + self.np["b_dec"]

    def np_reconstruct(self, arch, x):
        if arch == "topk":
            return self.np_decode_sparse(*self.np_encode_sparse(arch, x))
        return self.np_decode(self.np_encode(arch, x))

    def np_encode_layernorm(self, x):
        mu = x.mean(-1, keepdims=True)
        xc = x - mu
        return self.np_encode("relu", xc / (xc.std(-1, ddof=1, keepdims=True) + np.float32(1e-5)))

    def np_encode_transcoder(self, x):
        return np.maximum(x @ self.np["W_enc"] + self.np["b_enc"], 0)

    def np_reconstruct_transcoder(self, x, skip):
        y = self.np_decode(self.np_encode_transcoder(x))
        return y + x @ self.np["W_skip"] if skip else y

    def np_steer(self, arch, x, features):
        f = self.np_encode(arch, x)
        error = x - self.np_decode(f)
        f[:, features] = STEER_VALUE
        return self.np_decode(f) + error

    # torch, as SAELens (dense) and sparsify (TopK: topk + embedding_bag) compute
    def t_pre(self, x):
        w = self.t
        return (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]

    def t_encode(self, arch, x):
        w, pre = self.t, self.t_pre(x)
        if arch == "relu":
            return torch.relu(pre)
        if arch == "jumprelu":
            return torch.relu(pre) * (pre > w["threshold"])
        if arch == "batchtopk":
            return torch.relu(pre) * (pre > w["theta"])
        if arch == "gated":  # SAELens's GatedSAE.encode (gated_sae.py), b_enc as b_gate
            xp = x - w["b_dec"]
            active = (pre > 0).to(pre.dtype)
            mag = xp @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"]
            return active * torch.relu(mag)
        if arch == "groupmax":  # sparsify's groupmax, scattered into dense codes
            values, indices = torch.relu(pre).unflatten(-1, (K, -1)).max(dim=-1)
            indices = indices + torch.arange(0, pre.shape[-1], pre.shape[-1] // K)
            return torch.zeros_like(pre).scatter(-1, indices, values)
        top = pre.topk(K, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def t_encode_sparse(self, arch, x):
        f = torch.relu(self.t_pre(x)) if arch == "topk" else self.t_encode(arch, x)
        top = f.topk(K, dim=-1, sorted=True)
        return top.indices, top.values

    def t_decode(self, f):
        return f @ self.t["W_dec"] + self.t["b_dec"]

    def t_scatter(self, idx, val):
        return torch.zeros(idx.shape[0], D_SAE).scatter_(1, idx, val)

    def t_decode_sparse(self, idx, val):
        return F.embedding_bag(idx, self.t["W_dec"], per_sample_weights=val, mode="sum") + self.t["b_dec"]

    def t_reconstruct(self, arch, x):
        if arch == "topk":
            return self.t_decode_sparse(*self.t_encode_sparse(arch, x))
        return self.t_decode(self.t_encode(arch, x))

    def t_encode_layernorm(self, x):
        """SAELens's run_time_activation_ln_in (normalize_activations = "layer_norm")."""
        mu = x.mean(dim=-1, keepdim=True)
        xc = x - mu
        return self.t_encode("relu", xc / (xc.std(dim=-1, keepdim=True) + 1e-5))

    def t_encode_transcoder(self, x):
        return torch.relu(x @ self.t["W_enc"] + self.t["b_enc"])

    def t_reconstruct_transcoder(self, x, skip):
        y = self.t_decode(self.t_encode_transcoder(x))
        return y + x @ self.t["W_skip"] if skip else y

    def t_steer(self, arch, x, features):
        f = self.t_encode(arch, x)
        error = x - self.t_decode(f)
        f[:, features] = STEER_VALUE
        return self.t_decode(f) + error


class TorchStats:
    """Feature statistics in torch: firing counts, sums, maxima and the TOP_N largest values per
    feature with their token ids, what sae_stats_update keeps."""

    def __init__(self, d_sae):
        self.count = torch.zeros(d_sae, dtype=torch.int64)
        self.sum = torch.zeros(d_sae, dtype=torch.float64)
        self.max = torch.zeros(d_sae)
        self.top_val = torch.zeros(TOP_N, d_sae)
        self.top_id = torch.zeros(TOP_N, d_sae, dtype=torch.int64)
        self.tokens = 0

    def update(self, f):
        n = f.shape[0]
        self.count += (f > 0).sum(0)
        self.sum += f.sum(0, dtype=torch.float64)
        self.max = torch.maximum(self.max, f.max(0).values)
        ids = torch.arange(self.tokens, self.tokens + n).unsqueeze(1).expand(n, f.shape[1])
        vals = torch.cat([self.top_val, f])
        top = vals.topk(TOP_N, dim=0)
        self.top_val = top.values
        self.top_id = torch.cat([self.top_id, ids]).gather(0, top.indices)
        self.tokens += n

    def update_sparse(self, idx, val):
        f = torch.zeros(idx.shape[0], self.max.shape[0]).scatter_(1, idx, val)
        self.update(f)


class NumpyStats:
    def __init__(self, d_sae):
        self.count = np.zeros(d_sae, dtype=np.int64)
        self.sum = np.zeros(d_sae)
        self.max = np.zeros(d_sae, dtype=np.float32)
        self.top_val = np.zeros((TOP_N, d_sae), dtype=np.float32)
        self.top_id = np.zeros((TOP_N, d_sae), dtype=np.int64)
        self.tokens = 0

    def update(self, f):
        n = f.shape[0]
        self.count += (f > 0).sum(0)
        self.sum += f.sum(0, dtype=np.float64)
        self.max = np.maximum(self.max, f.max(0))
        vals = np.concatenate([self.top_val, f])
        ids = np.concatenate([self.top_id, np.broadcast_to(
            np.arange(self.tokens, self.tokens + n)[:, None], f.shape)])
        top = np.argpartition(-vals, TOP_N - 1, axis=0)[:TOP_N] if vals.shape[0] > TOP_N else \
            np.arange(vals.shape[0])[:, None].repeat(vals.shape[1], 1)
        self.top_val = np.take_along_axis(vals, top, 0)
        self.top_id = np.take_along_axis(ids, top, 0)
        self.tokens += n

    def update_sparse(self, idx, val):
        f = np.zeros((idx.shape[0], self.max.shape[0]), dtype=np.float32)
        np.put_along_axis(f, idx, val, 1)
        self.update(f)


def torch_trainer(arch, t, x_init):
    """One SAELens-style ReLU step (MSE + L1 * |f| * ||W_dec||, gradient clipping, Adam) or one
    sparsify-style TopK step (topk, embedding_bag decoder, FVU loss, unit-norm decoder rows with
    the parallel gradient removed, Adam), with libsae's default hyperparameters."""
    d_in, d_sae = t["W_enc"].shape
    g = torch.Generator().manual_seed(0)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    if arch == "relu":
        W_dec *= 0.1
    p = {"W_dec": W_dec.clone().requires_grad_(), "W_enc": W_dec.t().clone().requires_grad_(),
         "b_enc": torch.zeros(d_sae, requires_grad=True),
         "b_dec": x_init.mean(0).clone().requires_grad_()}
    params = list(p.values())
    if arch == "relu":
        opt = torch.optim.Adam(params, lr=5e-5, betas=(0.9, 0.999), eps=1e-8)
    else:
        opt = torch.optim.Adam(params, lr=2e-4 / (d_sae / 2 ** 14) ** 0.5, eps=6.25e-10)
    var = float(((x_init - x_init.mean(0)) ** 2).sum(-1).mean())

    def step(x):
        opt.zero_grad(set_to_none=True)
        pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
        if arch == "relu":
            f = torch.relu(pre)
            x_hat = f @ p["W_dec"] + p["b_dec"]
            loss = ((x_hat - x) ** 2).sum(-1).mean() + 5.0 * (f * p["W_dec"].norm(dim=1)).sum(-1).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        else:
            top = torch.relu(pre).topk(K, dim=-1, sorted=False)
            x_hat = F.embedding_bag(top.indices, p["W_dec"], per_sample_weights=top.values,
                                    mode="sum") + p["b_dec"]
            loss = ((x_hat - x) ** 2).sum(-1).mean() / var
            loss.backward()
            with torch.no_grad():
                w, gr = p["W_dec"], p["W_dec"].grad
                gr -= (gr * w).sum(1, keepdim=True) * w
                opt.step()
                w /= w.norm(dim=1, keepdim=True)
    return step


# ---- running the C side ----------------------------------------------------------------------------

def run_c(exe, *args):
    out = subprocess.run([exe, *map(str, args)], check=True, capture_output=True, text=True).stdout
    return out.splitlines()


def parse_times(lines, kind="time"):
    """The lines "KIND op arch n seconds [d_sae]" as {(op, arch, n[, d_sae]): seconds}."""
    times = {}
    for line in lines:
        parts = line.split()
        if parts and parts[0] == kind:
            key = (parts[1], parts[2], int(parts[3])) + ((int(parts[5]),) if len(parts) > 5 else ())
            times[key] = float(parts[4])
    return times


# ---- formatting ---------------------------------------------------------------------------------------

def fmt_time(s):
    if s is None:
        return "—"
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def fmt_ratio(peer, ours):
    if peer is None or ours is None:
        return "—"
    r = peer / ours
    return f"{r:.1f}×" if r < 100 else f"{r:.0f}×"


def machine_info(exe):
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem_kb = int(line.split()[1])
    info = dict(line.split(" ", 1) for line in run_c(exe, "info") if " " in line)
    flags = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = " ".join(x for x in ("avx2", "fma", "avx512f", "avx512_bf16",
                                             "avx512_fp16", "amx_tile", "amx_bf16") if x in have)
                break
    np_blas = "unknown"
    for lib in ("/lib/x86_64-linux-gnu/libblas.so.3", "/usr/lib/libblas.so.3"):
        if os.path.exists(lib):
            np_blas = os.path.basename(os.path.realpath(lib))
            break
    torch_blas = []
    x = torch.ones(64, 64)
    x @ x
    np.ones((64, 64), dtype=np.float32) @ np.ones((64, 64), dtype=np.float32)
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.split()[-1]
            if re.search(r"blas|mkl|dnnl", path) and path not in torch_blas:
                torch_blas.append(path)
    return {
        "cpu": cpu, "cores": os.cpu_count(), "mem_gb": mem_kb / 2 ** 20, "flags": flags,
        "kernel": platform.release(), "blas": info.get("blas_config", "?"),
        "blas_core": info.get("blas_core", "?"), "blas_threads": info.get("blas_threads", "?"),
        "libsae_threads": info.get("libsae_threads", "?"), "numpy": np.__version__,
        "bf16_path": info.get("bf16_path", "?"),
        "numpy_blas": np_blas, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "torch_config": torch.__config__.show(), "libs": torch_blas,
    }


# ---- the measurements ---------------------------------------------------------------------------------

ROWS = [
    # (label, op key, arch, what the peers do)
    ("encode", "encode", "relu", "relu((x - b_dec) @ W_enc + b_enc)"),
    ("encode", "encode", "jumprelu", "relu(pre) * (pre > threshold)"),
    ("encode", "encode", "batchtopk", "relu(pre) * (pre > theta)"),
    ("encode", "encode", "topk", "pre.topk(K), scattered into zeros (SAELens TopK)"),
    ("sparse encode, k = 32", "encode_sparse", "relu", "f.topk(32, sorted=True)"),
    ("sparse encode, k = 32", "encode_sparse", "topk", "relu(pre).topk(32) (sparsify)"),
    ("decode, the model's codes (L0 ≈ 100)", "decode", "relu", "f @ W_dec + b_dec"),
    ("decode, half-dense codes", "decode_dense", "-", "f @ W_dec + b_dec"),
    ("sparse decode, k = 32", "decode_sparse", "topk",
     "embedding_bag(idx, W_dec, val) (sparsify); numpy: gather + einsum"),
    ("sparse decode, k = 32, SAELens's way", "decode_sparse_saelens", "topk",
     "the same codes scattered into [n][d_sae], then f @ W_dec + b_dec (SAELens decodes TopK "
     "codes densely); libsae's time is the sparse decode's"),
    ("reconstruct", "reconstruct", "relu", "decode(encode(x))"),
    ("reconstruct", "reconstruct", "topk", "topk + embedding_bag (sparsify)"),
    ("steer, 1 feature", "steer1", "relu", "SAELens: encode, decode, error, set, decode + error"),
    ("steer, 1 feature", "steer1", "jumprelu", "as above"),
    ("steer, 1 feature", "steer1", "topk", "as above"),
    ("steer, 16 features", "steer16", "relu", "as above"),
    ("steer, 16 features", "steer16", "topk", "as above"),
    ("stats update, dense codes", "stats", "relu", "counts, sums, max, top-16 per feature"),
    ("stats update, sparse codes", "stats_sparse", "topk", "scatter to dense, then as above"),
    # The 0.2 kinds (issue 14): a Gemma-2-2B-sized transcoder (2304 -> 16384 -> 2304) on the SAE's
    # weights, gated, GroupMax, per-token LAYER_NORM.
    ("encode, again in the kinds' process", "encode_ref", "relu",
     "the encode (relu) row's peers; libsae's SAE encode again, in the process of the next rows "
     "(six models), which the goals below compare them with from calls timed in turns"),
    ("transcoder encode", "encode_transcoder", "relu", "relu(x @ W_enc + b_enc)"),
    ("transcoder encode, with skip", "encode_transcoder_skip", "relu",
     "as above (W_skip does not enter the codes)"),
    ("transcoder prediction", "reconstruct_transcoder", "relu",
     "relu(x @ W_enc + b_enc) @ W_dec + b_dec"),
    ("transcoder prediction, with skip", "reconstruct_transcoder_skip", "relu",
     "relu(x @ W_enc + b_enc) @ W_dec + b_dec + x @ W_skip"),
    ("encode", "encode", "gated", "SAELens's gated forward: x' = x - b_dec, "
     "(x' @ W_enc + b_gate > 0) * relu(x' @ (W_enc * exp(r_mag)) + b_mag)"),
    ("steer, 1 feature", "steer1", "gated",
     "SAELens: gated encode, decode, error = x - decode(f), set f[1234] = 40, decode + error"),
    ("encode", "encode", "groupmax", "sparsify's groupmax: relu(pre).unflatten(-1, (32, 512))"
     ".max(-1), scattered into zeros"),
    ("encode, LAYER_NORM inputs", "encode_layernorm", "relu",
     "SAELens's layer_norm: (x - mean) / (std + 1e-5), then the ReLU encode"),
    ("encode, bf16 weights", "encode_bf16", "relu",
     "the float32 encode above (SAE_PARAM_BF16_WEIGHTS is libsae's option; error vs torch below)"),
    ("sparse decode, k = 32, bf16 weights", "decode_sparse_bf16", "topk",
     "embedding_bag on float32 W_dec (sparsify)"),
    ("steer, 1 feature, bf16 weights", "steer1_bf16", "topk", "SAELens's float32 clamp"),
    ("training step", "train", "relu", "SAELens-style ReLU step, Adam (torch only)"),
    ("training step", "train", "topk", "sparsify-style TopK step, Adam (torch only)"),
]


# libsae with bfloat16 weights against the peers' float32 rows of the same operation.
BF16_ROWS = {"encode_bf16": "encode", "decode_sparse_bf16": "decode_sparse",
             "steer1_bf16": "steer1"}
ROW_ARCH = {op: arch for _, op, arch, _ in ROWS}


def row_bound(op, arch, n, codes, bounds):
    """The roofline bound of the minimal work: max(FLOPs / SGEMM peak, bytes / read bandwidth).
    codes: per-n dict of the ReLU codes' nonzeros and the TopK codes' distinct features."""
    peak, bw = bounds["flops"], bounds["bw"]
    if op in BF16_ROWS and "bf16_flops" in bounds:  # the bf16 path's own peak (tests/bench/bf16)
        peak = bounds["bf16_flops"]
    wb = 2 if op in BF16_ROWS else 4  # bytes per weight
    op = BF16_ROWS.get(op, op)
    w = D_IN * D_SAE * wb
    flops = bytes_ = 0.0
    if op in ("encode", "encode_sparse", "encode_ref", "encode_transcoder", "encode_transcoder_skip",
              "encode_layernorm"):  # gated: one GEMM, the magnitudes are its columns scaled
        flops = 2.0 * n * D_IN * D_SAE
        bytes_ = w + n * D_IN * 4 + (n * D_SAE * 4 if op == "encode" else n * K * 8)
    elif op == "decode":
        nnz, rows = codes[n]["relu_nnz"], codes[n]["relu_rows"]
        flops = 2.0 * nnz * D_IN
        bytes_ = n * D_SAE * 4 + rows * D_IN * 4 + n * D_IN * 4
    elif op == "decode_dense":
        flops = 2.0 * n * D_IN * D_SAE
        bytes_ = w + n * D_SAE * 4 + n * D_IN * 4
    elif op in ("decode_sparse", "decode_sparse_saelens"):
        flops = 2.0 * n * K * D_IN
        bytes_ = codes[n]["topk_rows"] * D_IN * wb + n * K * 8 + n * D_IN * 4
    elif op == "reconstruct":
        key = "topk" if arch == "topk" else "relu"
        flops = 2.0 * n * D_IN * D_SAE + 2.0 * codes[n][key + "_nnz"] * D_IN
        bytes_ = w + codes[n][key + "_rows"] * D_IN * 4 + 2 * n * D_IN * 4
    elif op in ("reconstruct_transcoder", "reconstruct_transcoder_skip"):
        skip = op.endswith("skip")
        flops = 2.0 * n * D_IN * D_SAE + 2.0 * codes[n]["tc_nnz"] * D_IN + skip * 2.0 * n * D_IN * D_IN
        bytes_ = w + codes[n]["tc_rows"] * D_IN * 4 + skip * D_IN * D_IN * 4 + 2 * n * D_IN * 4
    elif op in ("steer1", "steer16"):
        m = 1 if op == "steer1" else 16
        if arch == "topk":  # the full encode decides which features survive
            flops = 2.0 * n * D_IN * D_SAE + 4.0 * n * m * D_IN
            bytes_ = w + m * D_IN * wb + 2 * n * D_IN * 4
        else:  # the features' encoder columns (a cache line per element) and decoder rows
            flops = 4.0 * n * m * D_IN
            bytes_ = D_IN * 64 * min(m, 16) + m * D_IN * 4 + 2 * n * D_IN * 4
    elif op == "stats":
        bytes_ = n * D_SAE * 4
    elif op == "stats_sparse":
        bytes_ = n * K * 8
    elif op == "train":
        params = 2 * D_IN * D_SAE
        if arch == "relu":  # encoder, decoder, and their weight and input gradients: 5 GEMMs
            flops = 5 * 2.0 * n * D_IN * D_SAE
        else:  # the encoder GEMM, its weight gradient at K columns per token, sparse decoder
            flops = 2.0 * n * D_IN * D_SAE + 3 * 2.0 * n * K * D_IN
        bytes_ = params * 4 * 7  # Adam reads weights, gradients, 2 moments; writes 3
    t = max(flops / peak, bytes_ / bw)
    return t, ("compute" if flops / peak >= bytes_ / bw else "memory")


def time_peers(peers, t, out_dir, ns, log):
    """numpy's and torch's times for every row, and the agreement at n = 64."""
    res, agree = {}, []
    x_all = t["x"]
    for n in ns:
        x = x_all[:n]
        tx = torch.from_numpy(np.ascontiguousarray(x))
        with torch.inference_mode():
            f_relu_np = peers.np_encode("relu", x)
            f_relu_t = torch.from_numpy(f_relu_np)
            idx_np, val_np = peers.np_encode_sparse("topk", x)
            idx_t, val_t = torch.from_numpy(idx_np.astype(np.int64)), torch.from_numpy(val_np)
            half = np.where(np.random.default_rng(1).random((n, D_SAE)) < 0.5,
                            np.random.default_rng(2).random((n, D_SAE), dtype=np.float32), 0)
            half = half.astype(np.float32)
            half_t = torch.from_numpy(half)
            for label, op, arch, _ in ROWS:
                if op == "train" or op in BF16_ROWS:
                    continue
                if op == "encode_ref":  # the encode (relu) row's peers
                    for peer in ("numpy", "torch"):
                        res[(op, arch, n, peer)] = res[("encode", arch, n, peer)]
                    continue
                fns = {
                    "encode": (lambda: peers.np_encode(arch, x), lambda: peers.t_encode(arch, tx)),
                    "encode_sparse": (lambda: peers.np_encode_sparse(arch, x),
                                      lambda: peers.t_encode_sparse(arch, tx)),
                    "decode": (lambda: peers.np_decode(f_relu_np), lambda: peers.t_decode(f_relu_t)),
                    "decode_dense": (lambda: peers.np_decode(half), lambda: peers.t_decode(half_t)),
                    "decode_sparse": (lambda: peers.np_decode_sparse(idx_np, val_np),
                                      lambda: peers.t_decode_sparse(idx_t, val_t)),
                    "decode_sparse_saelens": (
                        lambda: peers.np_decode(peers.np_scatter(idx_np, val_np)),
                        lambda: peers.t_decode(peers.t_scatter(idx_t, val_t))),
                    "reconstruct": (lambda: peers.np_reconstruct(arch, x),
                                    lambda: peers.t_reconstruct(arch, tx)),
                    "steer1": (lambda: peers.np_steer(arch, x, steer_features(1)),
                               lambda: peers.t_steer(arch, tx, steer_features(1))),
                    "steer16": (lambda: peers.np_steer(arch, x, steer_features(16)),
                                lambda: peers.t_steer(arch, tx, steer_features(16))),
                    "encode_transcoder": (lambda: peers.np_encode_transcoder(x),
                                          lambda: peers.t_encode_transcoder(tx)),
                    "encode_transcoder_skip": (lambda: peers.np_encode_transcoder(x),
                                               lambda: peers.t_encode_transcoder(tx)),
                    "reconstruct_transcoder": (lambda: peers.np_reconstruct_transcoder(x, False),
                                               lambda: peers.t_reconstruct_transcoder(tx, False)),
                    "reconstruct_transcoder_skip": (
                        lambda: peers.np_reconstruct_transcoder(x, True),
                        lambda: peers.t_reconstruct_transcoder(tx, True)),
                    "encode_layernorm": (lambda: peers.np_encode_layernorm(x),
                                         lambda: peers.t_encode_layernorm(tx)),
                }
                if op in fns:
                    np_fn, t_fn = fns[op]
                elif op == "stats":
                    ns_, ts_ = NumpyStats(D_SAE), TorchStats(D_SAE)
                    np_fn, t_fn = (lambda: ns_.update(f_relu_np)), (lambda: ts_.update(f_relu_t))
                else:
                    ns_, ts_ = NumpyStats(D_SAE), TorchStats(D_SAE)
                    np_fn = lambda: ns_.update_sparse(idx_np, val_np)  # noqa: E731
                    t_fn = lambda: ts_.update_sparse(idx_t, val_t)  # noqa: E731
                res[(op, arch, n, "numpy")] = best_time(np_fn)
                res[(op, arch, n, "torch")] = best_time(t_fn)
                log(f"  {op} {arch} n={n}: numpy {fmt_time(res[(op, arch, n, 'numpy')])}, "
                    f"torch {fmt_time(res[(op, arch, n, 'torch')])}")
                if n == 64:
                    agree += check_agreement(peers, op, arch, x, tx, out_dir)
        for op, base in BF16_ROWS.items():  # the same float32 peers
            arch = ROW_ARCH[op]
            for peer in ("numpy", "torch"):
                if (base, arch, n, peer) in res:
                    res[(op, arch, n, peer)] = res[(base, arch, n, peer)]
            if n == 64:
                agree += check_agreement(peers, op, arch, x, tx, out_dir)
        # Training, torch only: numpy has no automatic gradients.
        x_init = torch.from_numpy(x_all[:BATCH].copy())
        for arch in ("relu", "topk"):
            step = torch_trainer(arch, t, x_init)
            res[("train", arch, n, "torch")] = best_time(lambda: step(tx))
            log(f"  train {arch} n={n}: torch {fmt_time(res[('train', arch, n, 'torch')])}")
    return res, agree


def check_agreement(peers, op, arch, x, tx, out_dir):
    """libsae's output at n = 64 (written by bench_ops) against torch's."""
    name = {"encode": f"encode_{arch}", "reconstruct": f"reconstruct_{arch}",
            "decode": "decode_relu", "decode_sparse": "decode_sparse_topk",
            "steer1": f"steer1_{arch}", "steer16": f"steer16_{arch}",
            "encode_bf16": "encode_bf16_relu", "steer1_bf16": "steer1_bf16_topk",
            "encode_transcoder": "encode_transcoder_relu",
            "reconstruct_transcoder": "reconstruct_transcoder_relu",
            "reconstruct_transcoder_skip": "reconstruct_transcoder_skip_relu",
            "encode_layernorm": "encode_layernorm_relu"}.get(op)
    path = os.path.join(out_dir, (name or "") + ".npy")
    if name is None or not os.path.exists(path):
        return []
    got = np.load(path)
    row, op = op, BF16_ROWS.get(op, op)
    if op == "encode":
        want = peers.t_encode(arch, tx).numpy()
    elif op == "reconstruct":
        want = peers.t_reconstruct(arch, tx).numpy()
    elif op == "decode":
        want = peers.t_decode(peers.t_encode("relu", tx)).numpy()
    elif op == "encode_transcoder":
        want = peers.t_encode_transcoder(tx).numpy()
    elif op.startswith("reconstruct_transcoder"):
        want = peers.t_reconstruct_transcoder(tx, op.endswith("skip")).numpy()
    elif op == "encode_layernorm":
        want = peers.t_encode_layernorm(tx).numpy()
    elif op == "decode_sparse":
        idx = np.load(os.path.join(out_dir, "sparse_idx_topk.npy")).astype(np.int64)
        val = np.load(os.path.join(out_dir, "sparse_val_topk.npy"))
        want = peers.t_decode_sparse(torch.from_numpy(idx), torch.from_numpy(val)).numpy()
    else:
        want = peers.t_steer(arch, tx, steer_features(1 if op == "steer1" else 16)).numpy()
    err = float(np.max(np.abs(got - want)))
    scale = float(np.max(np.abs(want)))
    return [(row, arch, err, scale)]


def torch_memory(peers, t, ops):
    """Peak memory torch adds for each op at n = 1024, beyond its inputs and outputs, in this
    process: the peak RSS is reset (/proc/self/clear_refs) before each call."""
    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        return 0

    x = torch.from_numpy(t["x"][:BATCH].copy())
    out = {}
    with torch.inference_mode():
        f_relu = peers.t_encode("relu", x)
        idx, val = peers.t_encode_sparse("topk", x)
    for op, arch in ops:
        if op == "train":
            step = torch_trainer(arch, t, x)
            step(x)  # Adam's moments and the gradients exist from the first step on
            call = lambda: step(x)  # noqa: E731
        else:
            call = {
                "encode": lambda: peers.t_encode(arch, x),
                "encode_sparse": lambda: peers.t_encode_sparse(arch, x),
                "decode": lambda: peers.t_decode(f_relu),
                "decode_sparse": lambda: peers.t_decode_sparse(idx, val),
                "reconstruct": lambda: peers.t_reconstruct(arch, x),
                "steer1": lambda: peers.t_steer(arch, x, steer_features(1)),
                "steer16": lambda: peers.t_steer(arch, x, steer_features(16)),
                "stats": lambda: TorchStats(D_SAE).update(f_relu),
                "stats_sparse": lambda: TorchStats(D_SAE).update_sparse(idx, val),
            }[op]
        base = status("VmRSS:")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        with torch.inference_mode(op != "train"):
            result = call()
        peak = status("VmHWM:")
        outputs = sum(r.numel() * r.element_size() for r in
                      (result if isinstance(result, tuple) else (result,)) if torch.is_tensor(r))
        out[(op, arch)] = max(0, peak - base - outputs)
        del result
    return out


MEM_OPS = [("encode", "relu"), ("encode", "topk"), ("encode_sparse", "topk"), ("decode", "relu"),
           ("decode_sparse", "topk"), ("reconstruct", "relu"), ("reconstruct", "topk"),
           ("steer1", "relu"), ("steer1", "topk"), ("steer16", "relu"), ("stats", "relu"),
           ("stats_sparse", "topk"), ("train", "relu"), ("train", "topk")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", required=True)
    ap.add_argument("--out", help="default: docs/performance.md (--quick: BUILD/performance-quick.md)")
    ap.add_argument("--quick", action="store_true", help="n = 1 and 64 only, no scaling rows")
    args = ap.parse_args()
    if args.out is None:  # a quick look must not replace the full table
        args.out = (os.path.join(args.build, "performance-quick.md") if args.quick else
                    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docs",
                                 "performance.md"))
    exe = os.path.join(args.build, "tests", "bench", "bench_ops")
    if not os.path.exists(exe):
        sys.exit(f"perf.py: {exe} not found: build first")
    started = time.time()
    load_start = os.getloadavg()

    def log(msg):
        print(f"[{time.time() - started:6.1f} s] {msg}", flush=True)

    ns = (1, 64) if args.quick else NS
    work = tempfile.mkdtemp(prefix="libsae-perf-")
    try:
        info = machine_info(exe)
        log("writing the model and tokens")
        t = make_data(work)
        out_dir = os.path.join(work, "out")
        os.makedirs(out_dir)
        log("bounds")
        b = {}
        for line in run_c(exe, "bounds", work):
            _, name, secs, amount = line.split()
            b[name] = (float(secs), float(amount))
        bounds = {"flops": b["sgemm_encode"][1] / b["sgemm_encode"][0],
                  "flops_dec": b["sgemm_decode"][1] / b["sgemm_decode"][0],
                  "bw_probe": b["read"][1] / b["read"][0],
                  "bw_sgemv": b["read_sgemv"][1] / b["read_sgemv"][0],
                  "bw1": b["read_1thread"][1] / b["read_1thread"][0]}
        bounds["bw"] = max(bounds["bw_probe"], bounds["bw_sgemv"])
        log(f"  SGEMM {bounds['flops'] / 1e9:.1f} GFLOP/s, read {bounds['bw'] / 1e9:.1f} GB/s")
        log("libsae")
        c = parse_times(run_c(exe, "time", work, out_dir, *ns))
        log("libsae: the 0.2 kinds")
        kinds_out = list(run_c(exe, "kinds", work, out_dir, *ns))
        c.update(parse_times(kinds_out))
        turns = parse_times(kinds_out, "turns")
        for n in ns:  # one libsae call, two peers: sparsify's sparse decode and SAELens's dense one
            if ("decode_sparse", "topk", n) in c:
                c[("decode_sparse_saelens", "topk", n)] = c[("decode_sparse", "topk", n)]
        log("numpy and torch")
        peers = Peers(t)
        p, agree = time_peers(peers, t, out_dir, ns, log)
        # The codes' sparsity, for the decode bounds.
        codes = {}
        for n in ns:
            f = peers.np_encode("relu", t["x"][:n])
            idx, _ = peers.np_encode_sparse("topk", t["x"][:n])
            ftc = peers.np_encode_transcoder(t["x"][:n])
            codes[n] = {"relu_nnz": int((f > 0).sum()), "relu_rows": int((f > 0).any(0).sum()),
                        "topk_nnz": n * K, "topk_rows": len(np.unique(idx)),
                        "tc_nnz": int((ftc > 0).sum()), "tc_rows": int((ftc > 0).any(0).sum())}
        scale_n, scale_d = {}, {}
        if not args.quick:
            log("scaling with n")
            ns_scale = (1, 4, 16, 64, 256, 1024)
            scale_n = parse_times(run_c(exe, "scale", D_SAE, *ns_scale))
            scale_peers = {}
            for d_sae in (4096, 8192, 16384, 32768, 65536):
                log(f"scaling with d_sae: {d_sae}")
                scale_d.update(parse_times(run_c(exe, "scale", d_sae, 64)))
            # torch on the same shapes (its own random weights: the times do not depend on them)
            rng = np.random.default_rng(5)
            for d_sae in (4096, 8192, 16384, 32768, 65536):
                tt = {"W_enc": rng.standard_normal((D_IN, d_sae), dtype=np.float32) / 48,
                      "W_dec": np.zeros((1, D_IN), dtype=np.float32),
                      "b_enc": np.full(d_sae, -2.5, dtype=np.float32),
                      "b_dec": np.zeros(D_IN, dtype=np.float32),
                      "threshold": np.zeros(d_sae, dtype=np.float32),
                      "x": rng.standard_normal((1024, D_IN), dtype=np.float32)}
                pp = Peers(tt)
                for n in (ns_scale if d_sae == D_SAE else (64,)):
                    tx = torch.from_numpy(tt["x"][:n].copy())
                    with torch.inference_mode():
                        scale_peers[("encode", n, d_sae)] = best_time(lambda: pp.t_encode("relu", tx))
                        scale_peers[("encode_sparse", n, d_sae)] = best_time(
                            lambda: pp.t_encode_sparse("topk", tx))
                del pp, tt
        log("peak memory")
        mem_c = {}
        for op, arch in MEM_OPS:
            line = run_c(exe, "mem", work, op, arch, BATCH if BATCH in ns else ns[-1])[-1].split()
            mem_c[(op, arch)] = (int(line[5]) - int(line[4])) * 1024  # mem OP ARCH N BASE PEAK
        mem_t = torch_memory(peers, t, MEM_OPS) if BATCH in ns else {}
        log("loading (tests/bench/load)")
        load_script = os.path.join(os.path.dirname(__file__), "load")
        load_out = subprocess.run([sys.executable, load_script, "--build", args.build], check=True,
                                  capture_output=True, text=True).stdout
        log("rows near 1, interleaved in one process (tests/bench/interleaved)")
        inter_out = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__),
                                                                 "interleaved"),
                                    "--build", args.build], check=True, capture_output=True,
                                   text=True).stdout
        log("bfloat16 against torch's bfloat16, in turns (tests/bench/bf16), on each path")
        bf16_out = {}
        for cap in ("", "avx512_bf16", "none"):
            env = dict(os.environ)
            if cap:
                env["SAE_BF16_ISA"] = cap
            else:
                env.pop("SAE_BF16_ISA", None)
            cmd = [sys.executable, os.path.join(os.path.dirname(__file__), "bf16"),
                   "--build", args.build, "--ns", ",".join(str(n) for n in ns)]
            bf16_out[cap] = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                           env=env).stdout
            log("  " + (cap or "default") + ": " + bf16_out[cap].splitlines()[0])
        m = re.search(r"bound of the path: .*: (\d+) GFLOP/s", bf16_out[""])
        if m and info["bf16_path"] in ("amx", "avx512_bf16"):
            bounds["bf16_flops"] = float(m.group(1)) * 1e9
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_end = os.getloadavg()
    with open(os.path.join(args.build, "perf-results.repr"), "w") as f:
        f.write(repr({"info": info, "bounds": bounds, "b": b, "c": c, "p": p, "agree": agree,
                      "codes": codes, "ns": ns, "scale_n": scale_n, "scale_d": scale_d,
                      "mem_c": mem_c, "mem_t": mem_t, "load_out": load_out,
                      "inter_out": inter_out, "bf16_out": bf16_out}))
    write_doc(args.out, info, bounds, b, c, turns, p, agree, codes, ns, scale_n, scale_d,
              scale_peers if not args.quick else {}, mem_c, mem_t, load_out, inter_out, bf16_out,
              load_start, load_end,
              time.time() - started)
    log(f"wrote {args.out}")


def targets(c, p, ns, bounds, codes):
    """The issue's goals, checked against this run's numbers, with what bounds each row."""
    def ratio(op, arch, n):
        ours, theirs = c.get((op, arch, n)), p.get((op, arch, n, "torch"))
        return theirs / ours if ours and theirs else None

    L = ["## Goals", ""]
    below = [(op, arch, n, ratio(op, arch, n)) for _, op, arch, _ in ROWS for n in ns
             if op not in BF16_ROWS and ratio(op, arch, n) is not None and ratio(op, arch, n) < 1]
    def why(op, arch, n):
        if op == "decode_sparse" or (op == "reconstruct" and arch == "topk" and n < 1024):
            return ("both read the same K rows of W_dec per token (sparsify's embedding_bag is the "
                    "same algorithm), so the two differ by how well each streams rows from memory, "
                    "and by which side found them in cache (see \"Rows near 1, interleaved\")")
        return ("both sides are one SGEMM (see \"of bound\"): OpenBLAS's in libsae, oneDNN's in "
                "torch, a few percent apart on this shape and within the run-to-run noise (see "
                "\"Rows near 1, interleaved\")")
    L.append("- Every row at least as fast as torch: " + (
        "yes." if not below else "no, " + "; ".join(
            f"{op} {arch} n = {n} ({r:.2f}×): {why(op, arch, n)}" for op, arch, n, r in below) + "."))
    steer = [(arch, n, ratio("steer1", arch, n)) for arch in ("relu", "jumprelu", "topk") for n in ns]
    L.append("- Steering one feature 10× torch or more: " + ", ".join(
        f"{arch} n = {n}: {r:.0f}×" for arch, n, r in steer if r) + ". ReLU and JumpReLU (and "
        "BatchTopK) need only the steered features' encoder columns and decoder rows. TopK cannot "
        "skip the full encoder GEMM: whether a feature survives depends on every other feature's "
        "value, so its bound is the encode row, and torch's SAELens-style clamp costs one encode "
        "and two dense decodes, some 2-3 encodes' time: that ratio is the ceiling for TopK.")
    sd = [(n, ratio("decode_sparse", "topk", n)) for n in ns]
    sl = [(n, ratio("decode_sparse_saelens", "topk", n)) for n in ns]
    L.append("- TopK sparse decode 10× torch or more: against SAELens's decode of TopK codes "
             "(dense, the row \"SAELens's way\") " + ", ".join(
                 f"n = {n}: {r:.0f}×" for n, r in sl if r) + "; against sparsify's embedding_bag "
             + ", ".join(f"n = {n}: {r:.1f}×" for n, r in sd if r) + ". embedding_bag already "
             "reads only the K rows of W_dec each token uses, so against it both sides are bound by "
             "moving those rows: at n = 1, 32 rows of 9 KB from cache (a few µs; torch's floor is "
             "its per-call dispatch); at large n, the rows from memory, where 10× would be faster "
             "than the bound column allows.")
    gains = []
    for op, base in BF16_ROWS.items():
        arch = ROW_ARCH[op]
        gains += [f"{base} n = {n}: {c[(base, arch, n)] / c[(op, arch, n)]:.2f}×" for n in ns
                  if (op, arch, n) in c and (base, arch, n) in c]
    if gains:
        L.append("- Optional bfloat16 weights, libsae's float32 time over its bfloat16 time: " +
                 ", ".join(gains) + ". They halve the bytes a memory-bound call reads (single "
                 "tokens; sparse decoding from memory); where the call is compute-bound they run "
                 "on the CPU's bfloat16 matrix instructions (AMX, AVX512-BF16) through oneDNN, or "
                 "without them are widened to float for SGEMM, which costs a pass over them "
                 "(path here: see Machine).")
    n = max(ns)
    enc = c.get(("encode", "relu", n))
    if enc:
        flops = 2.0 * n * D_IN * D_SAE
        L.append(f"- Batch encode (n = {n}) at 90% of the SGEMM bound or more: "
                 f"{100 * flops / bounds['flops'] / enc:.0f}% (ReLU), " + ", ".join(
                     f"{100 * flops / bounds['flops'] / c[('encode', a, n)]:.0f}% ({a})"
                     for a in ("jumprelu", "batchtopk", "topk") if ("encode", a, n) in c) +
                 ". The rest is one pass over the codes (bias, activation, selection) across "
                 "threads and the check that x is finite.")
    L.append("")
    return L


def targets_kinds(c, turns, p, ns, bounds, codes):
    """Issue 14's goals for the 0.2 kinds, checked against this run's numbers: the time ratios of
    the encodes from their calls in turns, the rest from the table's times (c)."""
    def ratio(op, arch, n):
        ours, theirs = c.get((op, arch, n)), p.get((op, arch, n, "torch"))
        return theirs / ours if ours and theirs else None

    def share(op, arch, n):
        return row_bound(op, arch, n, codes, bounds)[0] / c[(op, arch, n)]

    def met(ok):
        return "met" if ok else "NOT met"

    L = ["### The 0.2 kinds (issue 14)", "",
         "libsae's encodes of the 0.2 kinds are also timed in turns with the plain SAE encode in "
         "one process, so the time ratios with it below hold under a changing load better than "
         "two rows timed minutes apart; the shares of the bound and the comparisons with torch "
         "use the table's times (repeated calls of one model, as the peers are timed).", ""]
    have = [n for n in ns if ("encode_transcoder", "relu", n) in turns and
            ("encode_ref", "relu", n) in turns]
    if not have:
        return L + ["(not measured in this run)", ""]
    parts, ok = [], True
    for n in have:
        sae, tc, tcs = (turns[(op, "relu", n)] for op in
                        ("encode_ref", "encode_transcoder", "encode_transcoder_skip"))
        worst = max(tc, tcs) / sae
        ok &= worst <= 1.05
        kind = row_bound("encode", "relu", n, codes, bounds)[1]
        parts.append(f"n = {n} ({'SGEMM' if kind == 'compute' else 'memory'} bound): SAE "
                     f"{100 * share('encode_ref', 'relu', n):.0f}%, transcoder "
                     f"{100 * share('encode_transcoder', 'relu', n):.0f}%, with skip "
                     f"{100 * share('encode_transcoder_skip', 'relu', n):.0f}% (time over the "
                     f"SAE's: {tc / sae:.2f}, {tcs / sae:.2f})")
    L.append("- Transcoder encode at the same share of the bound as the SAE encode of its size "
             "(counted as met when the transcoder's time is within 5% of the SAE's, about this "
             f"table's run-to-run spread): {met(ok)}. " + "; ".join(parts) + ". The transcoder "
             "does not subtract b_dec from x; the encode is the same one SGEMM; W_skip is not "
             "read.")
    L.append("- Transcoder prediction (sae_reconstruct) against torch's relu(x @ W_enc + b_enc) @ "
             "W_dec + b_dec + x @ W_skip: " + ", ".join(
                 f"n = {n}: {ratio('reconstruct_transcoder_skip', 'relu', n):.1f}× "
                 f"(without skip {ratio('reconstruct_transcoder', 'relu', n):.1f}×)" for n in have
                 if ratio("reconstruct_transcoder_skip", "relu", n)) + "; of the bound: " +
             ", ".join(f"n = {n}: {100 * share('reconstruct_transcoder_skip', 'relu', n):.0f}%"
                       for n in have) + ". torch decodes the codes densely (a second GEMM over "
             "W_dec); libsae decodes only the nonzero features' rows.")
    g = [(n, turns[("encode", "gated", n)] / turns[("encode_ref", "relu", n)]) for n in have
         if ("encode", "gated", n) in turns]
    L.append("- Gated encode no slower than 2.1× the SAE encode of the same size: "
             f"{met(all(r <= 2.1 for _, r in g))}, " + ", ".join(
                 f"n = {n}: {r:.2f}×" for n, r in g) + ". Against torch computing SAELens's "
             "gated forward: " + ", ".join(f"n = {n}: {ratio('encode', 'gated', n):.1f}×"
                                           for n, _ in g if ratio("encode", "gated", n)) +
             ". x' @ (W_enc * exp(r_mag)) is column i of x' @ W_enc times exp(r_mag[i]), so "
             "libsae runs one SGEMM and keeps exp(r_mag); SAELens forms W_enc * exp(r_mag) "
             "(a 151 MB temporary) and runs a second GEMM on every call.")
    st = [(n, ratio("steer1", "gated", n)) for n in have if ratio("steer1", "gated", n)]
    L.append("- One-feature gated clamp at least 100× faster than SAELens's way in torch (full "
             "gated encode, edit, full decode, add back the error): "
             f"{met(all(r >= 100 for n, r in st if n in (1, 64)))} at n = 1 and 64; " +
             ", ".join(f"n = {n}: {r:.0f}×" for n, r in st) + ". A gated feature's gate and "
             "magnitude both come from its own column of W_enc, so the clamp reads one column "
             "and one decoder row per token.")
    for arch, op, what in (("groupmax", "encode", "GroupMax encode (K = 32 groups of 512)"),
                           ("relu", "encode_layernorm", "LAYER_NORM-normalized ReLU encode")):
        rows = [n for n in have if (op, arch, n) in turns]
        if rows:
            L.append(f"- {what}, time over the plain SAE encode's, and against torch: " + ", ".join(
                f"n = {n}: {turns[(op, arch, n)] / turns[('encode_ref', 'relu', n)]:.2f}, "
                f"{ratio(op, arch, n):.1f}× torch, {100 * share(op, arch, n):.0f}% of the bound"
                for n in rows) + ".")
    L.append("")
    return L


def bf16_rows(out):
    """tests/bench/bf16's encode rows: {n: (libsae bf16, torch bf16, torch x@W bf16)} and
    {n: (libsae f32, numpy f32, torch f32)}, in ms."""
    bf, f32 = {}, {}
    for line in out.splitlines():
        m = re.match(r"encode, bf16 weights \(relu\)\s+(\d+)\s+([\d.]+) ms\s+([\d.]+) ms\s+([\d.]+) ms",
                     line)
        if m:
            bf[int(m.group(1))] = tuple(float(m.group(i)) for i in (2, 3, 4))
        m = re.match(r"encode, float32 \(relu\)\s+(\d+)\s+([\d.]+) ms\s+numpy ([\d.]+) ms\s+torch "
                     r"([\d.]+)", line)
        if m:
            f32[int(m.group(1))] = tuple(float(m.group(i)) for i in (2, 3, 4))
    return bf, f32


def targets_bf16(bf16_out, info):
    """Issue 17's goals, from tests/bench/bf16's runs."""
    if "" not in bf16_out:
        return []
    bf, f32 = bf16_rows(bf16_out[""])
    L = ["### bfloat16 (issue 17)", ""]
    L.append(f"- bf16 batch encode at least as fast as torch's bf16 encode in the same run (path "
             f"{info['bf16_path']}): " + ", ".join(
                 f"n = {n}: {t / o:.2f}× ({'met' if o <= t else 'not met'}; against the bare "
                 f"x.bfloat16() @ W_enc {mm / o:.2f}×)" for n, (o, t, mm) in sorted(bf.items())
                 if n >= 64) + ".")
    L.append("- every float32 encode row of that run at least as fast as the best of numpy and "
             "torch: " + ", ".join(f"n = {n}: {min(nn, tt) / o:.2f}×" for n, (o, nn, tt)
                                   in sorted(f32.items())) + ".")
    for cap in ("avx512_bf16", "none"):
        if cap in bf16_out:
            b2, _ = bf16_rows(bf16_out[cap])
            L.append(f"- SAE_BF16_ISA={cap}: bf16 encode " + ", ".join(
                f"n = {n}: {o:.2f} ms ({t / o:.2f}× torch bf16)" for n, (o, t, _) in
                sorted(b2.items())) + ".")
    L.append("")
    return L


def write_doc(path, info, bounds, b, c, turns, p, agree, codes, ns, scale_n, scale_d, scale_peers,
              mem_c, mem_t, load_out, inter_out, bf16_out, load_start, load_end, elapsed):
    L = []
    w_mb = 2 * D_IN * D_SAE * 4 / 1e6
    L += ["# Performance", "",
          "Run `tests/bench/run` (about 10 minutes on 2 cores; `--quick`: n = 1 and 64 only) on an idle",
          "machine. This file is generated by it (a fresh Release build, then `tests/bench/perf.py`); do not",
          "edit by hand. Every time is the fastest of several calls (at least 3 and at least 0.5 s in",
          "all), libsae, numpy and torch measured in the same run on the",
          "same weights and tokens.", "",
          "## Machine", "",
          f"- CPU: {info['cpu']}, {info['cores']} cores ({info['flags']}), "
          f"{info['mem_gb']:.0f} GiB memory, Linux {info['kernel']}",
          f"- BLAS: {info['blas']} (kernel {info['blas_core']}), "
          f"{info['blas_threads']} threads (OPENBLAS_NUM_THREADS = {os.environ['OPENBLAS_NUM_THREADS']})",
          f"- libsae: SAE_PARAM_THREADS = {info['libsae_threads']} (its own threads, for the work "
          "outside BLAS, never running during a BLAS call); bfloat16 weight products: path "
          f"{info['bf16_path']} (sae_model_bf16_path: amx and avx512_bf16 through oneDNN, widen: "
          "widened for SGEMM)",
          f"- numpy {info['numpy']}: libblas.so.3 = {info['numpy_blas']}, "
          f"{os.environ['OPENBLAS_NUM_THREADS']} threads",
          f"- torch {info['torch']}, torch.set_num_threads({info['torch_threads']}); "
          f"BLAS libraries loaded: {', '.join(os.path.basename(x) for x in info['libs'])}",
          f"- load average (1, 5, 15 min) at the start {load_start[0]:.2f} {load_start[1]:.2f} "
          f"{load_start[2]:.2f}, at the end {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}; "
          f"the whole run took {elapsed / 60:.1f} min", "",
          "## Bounds", "",
          f"- SGEMM peak: {bounds['flops'] / 1e9:.1f} GFLOP/s (OpenBLAS alone, the encoder's shape "
          f"{BATCH} x {D_IN} x {D_SAE}, {fmt_time(b['sgemm_encode'][0])}); the decoder's shape "
          f"{bounds['flops_dec'] / 1e9:.1f} GFLOP/s",
          f"- memory read: {bounds['bw'] / 1e9:.1f} GB/s, the faster of streaming W_enc "
          f"({D_IN * D_SAE * 4 / 1e6:.0f} MB) with every core ({bounds['bw_probe'] / 1e9:.1f} GB/s; "
          f"{bounds['bw1'] / 1e9:.1f} GB/s with one) and OpenBLAS's SGEMV over it "
          f"({bounds['bw_sgemv'] / 1e9:.1f} GB/s). Repeated passes keep part of W_enc in the "
          "last-level cache, so this is the speed of the benchmark's loop, not of DRAM alone.",
          "- a row's bound is max(FLOPs / SGEMM peak, bytes / read bandwidth) of the least work the",
          "  operation needs (a sparse operation: only the rows of W_dec its codes use; steering",
          "  ReLU-family features: their encoder columns, one cache line per element, and decoder rows);",
          "  \"of bound\" is bound / libsae's time.", "",
          f"## Operations at d_in = {D_IN}, d_sae = {D_SAE} (weights {w_mb:.0f} MB)", "",
          "The model: random weights shaped like a trained SAE's (unit-scale pre-activations, encoder",
          f"bias -2.5), so ReLU codes have L0 ≈ {codes[ns[-1]]['relu_nnz'] / ns[-1]:.0f} of {D_SAE}; "
          f"TopK and BatchTopK keep K = {K}. ",
          "The 0.2 kinds use the same weights: a ReLU transcoder 2304 -> 16384 -> 2304 (Gemma-2-2B's",
          "MLP; b_dec is its output bias) without and with a random W_skip; a gated SAE whose gate",
          "bias is b_enc, with random r_mag in [-0.5, 0.5] and b_mag in [-0.2, 0.2]; GroupMax with",
          f"K = {K} groups; the ReLU SAE with SAE_PARAM_NORMALIZE = LAYER_NORM.",
          "Ratios are the peer's time over libsae's: above 1, libsae is faster.", "",
          "| operation | arch | n | libsae | numpy | torch | vs numpy | vs torch | bound | of bound |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    worst = []
    for label, op, arch, _ in ROWS:
        for n in ns:
            ours = c.get((op, arch, n))
            tn, tt = p.get((op, arch, n, "numpy")), p.get((op, arch, n, "torch"))
            bound, kind = row_bound(op, arch, n, codes, bounds)
            frac = f"{100 * bound / ours:.0f}% ({kind})" if ours else "—"
            L.append(f"| {label} | {arch} | {n} | {fmt_time(ours)} | {fmt_time(tn)} | {fmt_time(tt)} "
                     f"| {fmt_ratio(tn, ours)} | {fmt_ratio(tt, ours)} | {fmt_time(bound)} | {frac} |")
            if tt is not None and ours is not None:
                worst.append((tt / ours, label, arch, n))
    # load rows from tests/bench/load
    L += ["", "What the peers run, per row:", ""]
    for label, op, arch, what in ROWS:
        L.append(f"- {label} ({arch}): {what}")
    L += ["", "Agreement at n = 64 (libsae's output against torch's, same weights and tokens):", "",
          "| operation | arch | max abs difference | max abs value |", "|---|---|---:|---:|"]
    for op, arch, err, scale in agree:
        L.append(f"| {op} | {arch} | {err:.2e} | {scale:.3g} |")
    worst.sort()
    L += ["", "Slowest against torch: " + ", ".join(f"{lab} ({a}, n = {n}): {r:.2f}×"
                                                    for r, lab, a, n in worst[:3]), ""]
    L += targets(c, p, ns, bounds, codes)
    L += targets_kinds(c, turns, p, ns, bounds, codes)
    L += targets_bf16(bf16_out, info)
    if scale_n:
        L += ["## Scaling", "", f"Time against n (d_sae = {D_SAE}; random weights, same for torch):", "",
              "| n | encode (ReLU) | torch | per token | sparse encode (TopK) | torch | per token |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
        for n in (1, 4, 16, 64, 256, 1024):
            e, s = scale_n.get(("encode", "relu", n, D_SAE)), scale_n.get(("encode_sparse", "topk", n, D_SAE))
            te, ts = scale_peers.get(("encode", n, D_SAE)), scale_peers.get(("encode_sparse", n, D_SAE))
            L.append(f"| {n} | {fmt_time(e)} | {fmt_time(te)} | {fmt_time(e / n)} | {fmt_time(s)} "
                     f"| {fmt_time(ts)} | {fmt_time(s / n)} |")
        L += ["", "Time against d_sae (n = 64):", "",
              "| d_sae | weights | encode (ReLU) | torch | sparse encode (TopK) | torch | GFLOP/s |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
        for d in (4096, 8192, 16384, 32768, 65536):
            e, s = scale_d.get(("encode", "relu", 64, d)), scale_d.get(("encode_sparse", "topk", 64, d))
            te, ts = scale_peers.get(("encode", 64, d)), scale_peers.get(("encode_sparse", 64, d))
            gf = 2 * 64 * D_IN * d / e / 1e9 if e else 0
            L.append(f"| {d} | {2 * D_IN * d * 4 / 1e6:.0f} MB | {fmt_time(e)} | {fmt_time(te)} "
                     f"| {fmt_time(s)} | {fmt_time(ts)} | {gf:.1f} |")
        L.append("")
    L += ["## Peak memory", "",
          f"Memory one call adds at n = {BATCH}, beyond the model ({w_mb:.0f} MB of weights) and the",
          "caller's input and output buffers: the peak resident size during the call (reset through",
          "/proc/self/clear_refs just before it) minus the resident size before it. libsae: a fresh",
          "process per operation; torch: one process, its outputs subtracted.", "",
          "| operation | arch | libsae | of weights | torch | of weights |", "|---|---|---:|---:|---:|---:|"]
    for op, arch in MEM_OPS:
        mc, mt = mem_c.get((op, arch)), mem_t.get((op, arch))
        L.append(f"| {op} | {arch} | {mc / 1e6:.1f} MB | {100 * mc / (w_mb * 1e6):.1f}% | "
                 + (f"{mt / 1e6:.1f} MB | {100 * mt / (w_mb * 1e6):.1f}% |" if mt is not None else "— | — |"))
    L += ["", "## Loading", "", "From `tests/bench/load` (numpy reads the same arrays; torch has no",
          "safetensors reader without the `safetensors` package, which SAELens uses and which reads",
          "as numpy does):", "", "```", load_out.rstrip(), "```", ""]
    L += ["## Rows near 1, interleaved", "",
          "The table times libsae in one process and the peers in another, so a row whose data",
          "straddles the cache (the TopK sparse decode at n = 64 reads 19 MB of decoder rows) can",
          "land in cache on one side and not on the other. `tests/bench/interleaved` times libsae",
          "(through the Python bindings) and torch taking turns in one process, warm and with the",
          "cache flushed before every call:", "", "```", inter_out.rstrip(), "```", ""]
    L += ["## bfloat16 weights against torch's bfloat16", "",
          "`tests/bench/bf16`: libsae with SAE_PARAM_BF16_WEIGHTS and torch users' bfloat16 (every",
          "tensor bf16, the tokens cast: relu((x.bfloat16() - b_dec) @ W_enc + b_enc), and the bare",
          "x.bfloat16() @ W_enc) taking turns in one process, beside the float32 encodes of libsae,",
          "numpy and torch. All three runs are on the machine above"
          f" ({info['cpu']}, {info['flags']}): the first on the path libsae picks here",
          f"({info['bf16_path']}); the second and third cap it with SAE_BF16_ISA, standing in for a",
          "CPU with AVX512-BF16 but no AMX (oneDNN is capped for torch too, one oneDNN per process),",
          "and for one without bfloat16 instructions, such as an AVX2-only AMD EPYC (libsae widens",
          "the weights for SGEMM: the path and code of 0.2; torch keeps its AMX). \"of bound\" is the",
          "path's bound (its matmul's peak, or for the widening path torch's float32 matmul) over",
          "libsae's time.", ""]
    for cap, label in (("", "the path libsae picks"), ("avx512_bf16", "SAE_BF16_ISA=avx512_bf16"),
                       ("none", "SAE_BF16_ISA=none")):
        if cap in bf16_out:
            L += [f"{label}:", "", "```", bf16_out[cap].rstrip(), "```", ""]
    with open(path, "w") as f:
        f.write("\n".join(L))


if __name__ == "__main__":
    main()
