"""Shared pieces of the Python tests: the package from this checkout, float64 numpy references
of the contract's math, random models, temporary folders.

Run from the repository root:
    LIBSAE_LIBRARY=build/lib/libsae.so /usr/bin/python3 -m unittest discover -s tests/python
"""
import os
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
BINDINGS = os.path.join(ROOT, "bindings", "python")
if BINDINGS not in sys.path:
    sys.path.insert(0, BINDINGS)

import libsae  # noqa: E402

try:
    import numpy as np
except ImportError:
    np = None

ARCHS = ("relu", "topk", "batchtopk", "jumprelu")


def tmpdir(test: unittest.TestCase) -> str:
    d = tempfile.TemporaryDirectory(prefix="libsae-py-", dir=os.environ.get("SAE_TEST_TMPDIR"))
    test.addCleanup(d.cleanup)
    return d.name


def subprocess_env(**extra) -> dict:
    """The environment for a child Python: this checkout's package, the same library."""
    env = dict(os.environ)
    env["PYTHONPATH"] = BINDINGS + os.pathsep + env.get("PYTHONPATH", "")
    env["LIBSAE_LIBRARY"] = libsae.library_path
    env.update(extra)
    return env


# --------------------------------------------------------------------------------------------
# numpy references: the contract's math written out in float64
# --------------------------------------------------------------------------------------------

# (defined without numpy too, so that test modules import; their tests skip)
def random_model(arch, d_in, d_sae, seed=0, k=None, input_scale=None,
                 apply_b_dec_to_input=None, threshold=None):
    """A model with random weights, and the same weights as float64 arrays."""
    rng = np.random.default_rng(seed)
    m = libsae.Model.new(arch, d_in, d_sae, k=k, input_scale=input_scale,
                         apply_b_dec_to_input=apply_b_dec_to_input, threshold=threshold)
    w = {"W_enc": rng.standard_normal((d_in, d_sae)) / np.sqrt(d_in),
         "W_dec": rng.standard_normal((d_sae, d_in)) / np.sqrt(d_in),
         "b_enc": rng.standard_normal(d_sae) * 0.1,
         "b_dec": rng.standard_normal(d_in) * 0.1}
    if arch == "jumprelu":
        w["threshold"] = np.abs(rng.standard_normal(d_sae)) * 0.3
    for name, v in w.items():
        w[name] = v.astype(np.float32)
        m.set_tensor(name, w[name])
    return m, {n: v.astype(np.float64) for n, v in w.items()}

def ref_params(m):
    return {"arch": m.arch, "k": m.k, "scale": m.input_scale,
            "apply": 1.0 if m.apply_b_dec_to_input else 0.0, "theta": m.threshold}

def ref_preact(m, w, x):
    p = ref_params(m)
    xs = p["scale"] * np.asarray(x, np.float64)
    return (xs - p["apply"] * w["b_dec"]) @ w["W_enc"] + w["b_enc"]

def ref_encode(m, w, x):
    """f = activation(pre), exactly as API.md writes it, per architecture."""
    p = ref_params(m)
    pre = ref_preact(m, w, x)
    if p["arch"] == "relu":
        return np.maximum(pre, 0)
    if p["arch"] == "jumprelu":
        return np.where((pre > w["threshold"]) & (pre > 0), pre, 0.0)
    if p["arch"] == "batchtopk":
        return np.where((pre > p["theta"]) & (pre > 0), pre, 0.0)
    f = np.zeros_like(pre)
    flat, fflat = pre.reshape(-1, pre.shape[-1]), f.reshape(-1, pre.shape[-1])
    for t in range(flat.shape[0]):
        keep = np.argsort(-flat[t], kind="stable")[:p["k"]]  # ties: lower index first
        fflat[t, keep] = np.maximum(flat[t, keep], 0)
    return f

def ref_decode(m, w, f):
    return (np.asarray(f, np.float64) @ w["W_dec"] + w["b_dec"]) / m.input_scale

def ref_sparse(f, k):
    """(idx, val, count) as the contract lays them out: nonzero features, largest first."""
    n = f.shape[0]
    idx = np.zeros((n, k), np.uint32)
    val = np.zeros((n, k), np.float64)
    count = np.zeros(n, np.uint32)
    for t in range(n):
        nz = np.flatnonzero(f[t])
        order = nz[np.argsort(-f[t, nz], kind="stable")][:k]
        idx[t, :len(order)] = order
        val[t, :len(order)] = f[t, order]
        count[t] = len(order)
    return idx, val, count


class TestCase(unittest.TestCase):
    def assertClose(self, got, want, rtol=1e-4, atol=1e-4, msg=None):
        got = np.asarray(got, np.float64)
        want = np.asarray(want, np.float64)
        self.assertEqual(got.shape, want.shape, msg)
        scale = max(1.0, float(np.abs(want).max())) if want.size else 1.0
        err = float(np.abs(got - want).max()) if want.size else 0.0
        self.assertLessEqual(err, atol * scale + rtol * scale,
                             msg or f"max abs error {err} (scale {scale})")

    def assertLibsaeError(self, code, fragment, fn, *args, **kw):
        """fn fails with LibsaeError `code`, and the C message contains `fragment`."""
        with self.assertRaises(libsae.LibsaeError) as cm:
            fn(*args, **kw)
        e = cm.exception
        self.assertEqual(e.code, code, str(e))
        self.assertIn(fragment, e.message)
        self.assertIn(fragment, str(e))
        return e


# --------------------------------------------------------------------------------------------
# Version 0.2: transcoders, gated, GroupMax, per-token normalization (API.md's math, float64)
# --------------------------------------------------------------------------------------------

ALL_ARCHS = ("relu", "topk", "batchtopk", "jumprelu", "gated", "groupmax")


def random_any(arch, d_in, d_sae, d_out=None, skip=False, seed=0, **params):
    """An SAE (d_out None) or a transcoder with random weights in every tensor it holds, and the
    same weights as float64 arrays. params: Model.new's keywords."""
    rng = np.random.default_rng(seed)
    if d_out is None:
        m = libsae.Model.new(arch, d_in, d_sae, **params)
    else:
        m = libsae.Model.new_transcoder(arch, d_in, d_sae, d_out, skip, **params)
    w = {"W_enc": rng.standard_normal((d_in, d_sae)) / np.sqrt(d_in),
         "W_dec": rng.standard_normal((d_sae, m.d_out)) / np.sqrt(d_in),
         "b_enc": rng.standard_normal(d_sae) * 0.1,
         "b_dec": rng.standard_normal(m.d_out) * 0.1}
    if arch == "jumprelu":
        w["threshold"] = np.abs(rng.standard_normal(d_sae)) * 0.3
    if arch == "gated":
        w["r_mag"] = rng.standard_normal(d_sae) * 0.3
        w["b_mag"] = rng.standard_normal(d_sae) * 0.1
    if skip:
        w["W_skip"] = rng.standard_normal((d_in, m.d_out)) / np.sqrt(d_in)
    for name, v in w.items():
        w[name] = v.astype(np.float32)
        m.set_tensor(name, w[name])
    return m, {n: v.astype(np.float64) for n, v in w.items()}


def ref_norm(m, x):
    """(x_n, denorm, dscale): the model's per-token normalization of x [n, d_in], the function
    taking an SAE's normalized-space output back, and the per-token factor [n, 1] a direction
    is multiplied by when denormalized (sigma, 1 / c or 1)."""
    x = np.asarray(x, np.float64)
    mode = m.normalize
    if mode == "none":
        one = np.ones(x.shape[:-1] + (1,))
        return x, (lambda v: v), one
    if mode == "layer_norm":
        mu = x.mean(-1, keepdims=True)
        sigma = np.sqrt(((x - mu) ** 2).sum(-1, keepdims=True) / (x.shape[-1] - 1))
        return (x - mu) / (sigma + 1e-5), (lambda v: v * sigma + mu), sigma
    assert mode == "constant_norm", mode
    c = np.sqrt(x.shape[-1]) / np.linalg.norm(x, axis=-1, keepdims=True)
    return c * x, (lambda v: v / c), 1 / c


def ref_encode_any(m, w, x):
    """f for any architecture, normalization and kind, as API.md's math writes it."""
    x_n, _, _ = ref_norm(m, x)
    xin = m.input_scale * x_n
    if m.apply_b_dec_to_input:  # only possible when d_out = d_in
        xin = xin - w["b_dec"]
    pre = xin @ w["W_enc"] + w["b_enc"]
    arch = m.arch
    if arch == "gated":
        mag = xin @ (w["W_enc"] * np.exp(w["r_mag"])) + w["b_mag"]
        return np.where(pre > 0, np.maximum(mag, 0), 0.0)
    if arch == "groupmax":
        f = np.maximum(pre, 0)
        groups = m.k
        size = m.d_sae // groups
        flat = f.reshape(-1, groups, size)
        keep = np.zeros_like(flat)
        best = np.argmax(flat, axis=-1)  # the first of equal maxima: the lower index
        np.put_along_axis(keep, best[..., None], np.take_along_axis(flat, best[..., None], -1), -1)
        return keep.reshape(f.shape)
    if arch == "relu":
        return np.maximum(pre, 0)
    if arch == "jumprelu":
        return np.where((pre > w["threshold"]) & (pre > 0), pre, 0.0)
    if arch == "batchtopk":
        return np.where((pre > m.threshold) & (pre > 0), pre, 0.0)
    f = np.zeros_like(pre)
    flat, fflat = pre.reshape(-1, pre.shape[-1]), f.reshape(-1, pre.shape[-1])
    for t in range(flat.shape[0]):
        keep = np.argsort(-flat[t], kind="stable")[:m.k]
        fflat[t, keep] = np.maximum(flat[t, keep], 0)
    return f


def ref_decode_any(m, w, f):
    """sae_decode: (f @ W_dec + b_dec) / INPUT_SCALE for an SAE (normalized space), f @ W_dec +
    b_dec for a transcoder."""
    v = np.asarray(f, np.float64) @ w["W_dec"] + w["b_dec"]
    return v if m.is_transcoder else v / m.input_scale


def ref_reconstruct_any(m, w, x):
    """sae_reconstruct: an SAE's denormalized x_hat, a transcoder's y_hat with the skip term."""
    f = ref_encode_any(m, w, x)
    if m.is_transcoder:
        y = f @ w["W_dec"] + w["b_dec"]
        if "W_skip" in w:
            y = y + np.asarray(x, np.float64) @ w["W_skip"]
        return y
    _, denorm, _ = ref_norm(m, x)
    return denorm(ref_decode_any(m, w, f))


def ref_steer_to(m, w, x, y, ops):
    """sae_steer_apply_to: y' = y + sum_i (f_i' - f_i(x)) D_i, D_i = W_dec[i] (transcoder) or
    W_dec[i] / INPUT_SCALE times the token's denormalization factor (SAE); add ops add
    coeff * W_dec[i] (transcoder) or coeff * W_dec[i] / INPUT_SCALE (SAE)."""
    f = ref_encode_any(m, w, x)
    _, _, factor = ref_norm(m, x)
    scale = 1.0 if m.is_transcoder else m.input_scale
    if m.is_transcoder:
        factor = np.ones_like(factor)
    out = np.array(y, np.float64)
    for i, (kind, v) in ops.items():
        if kind == "clamp":
            out += np.outer(v - f[:, i], w["W_dec"][i]) * factor / scale
        elif kind == "scale":
            out += np.outer(v * f[:, i] - f[:, i], w["W_dec"][i]) * factor / scale
        else:
            out += v * w["W_dec"][i] / scale
    return out


def ref_metrics(f, y, y_hat):
    """sae_evaluate_to's metrics of predictions y_hat against targets y, codes f."""
    y, y_hat = np.asarray(y, np.float64), np.asarray(y_hat, np.float64)
    err = ((y - y_hat) ** 2).sum(1)
    fvu = err.sum() / ((y - y.mean(0)) ** 2).sum()
    ny, nh = np.linalg.norm(y, axis=1), np.linalg.norm(y_hat, axis=1)
    return {"mse": err.mean(), "fvu": fvu, "explained_variance": 1 - fvu,
            "l0": (f != 0).sum(1).mean(), "l1": f.sum(1).mean(),
            "cosine": ((y * y_hat).sum(1) / (ny * nh)).mean(),
            "l2_ratio": (nh / ny).mean(), "dead_fraction": ((f != 0).sum(0) == 0).mean()}
