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
