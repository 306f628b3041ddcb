"""The 2026 publishers' folders, laid out as each publisher lays them out, loaded by libsae and
checked against numpy re-implementations of the publisher's own forward code (float64 on the
values the files hold):
- Gemma Scope 2: params.safetensors + config.json; Google's tutorial JumpReLUSAE (encode:
  mask * relu(x @ w_enc + b_enc); forward adds x @ affine_skip_connection), which
  circuit-tracer's load_gemma_scope_2_transcoder reproduces (W_skip = A^T used as x @ W_skip^T).
- Llama Scope: hyperparams.json + checkpoints/final.safetensors; lm_saes (late 2024)
  SparseAutoEncoder.from_config's weight rewrites (dataset-wise standardization, then
  transform_to_unit_decoder_norm, topk -> jumprelu) and its encode / decode.
- Llama Scope R1 / lm_saes 2025: tests/fixtures/llamascope_r1 (config.json +
  sae_weights.safetensors, both 2025 layouts) against make.py's expected.json.
- circuit-tracer: layer_<l>.safetensors as SingleLayerTranscoder.to_safetensors writes it
  (W_enc [d_sae][d_in], W_dec [d_sae][d_out], activation_function.threshold, W_skip), and the
  June 2025 release's W_dec [d_out][d_sae]; forward F.linear(x, W_enc, b_enc), JumpReLU
  x * (x > threshold), decode acts @ W_dec + b_dec + x @ W_skip^T.
- .npy / npz members in Fortran order and big-endian, read as numpy reads them.

Run: LIBSAE_LIBRARY=build/lib/libsae.so /usr/bin/python3 -m unittest tests/python/test_publishers.py
"""
import ctypes
import json
import os
import unittest
import zipfile

from _support import libsae, np, tmpdir

if np is not None:
    from test_peers import C, Loaded, load_error, relu, save_file, topk_mask, values

SAE_EUNSUPPORTED = -5
SAE_EFORMAT = -4


def rng(seed):
    return np.random.default_rng(seed)


def q(a):
    """Values exact in F16 and BF16 alike (multiples of 1/64 below 4), so every dtype stores
    the same numbers and the references need no rounding model."""
    return np.round(np.asarray(a) * 64.0) / 64.0


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=4)


@unittest.skipIf(np is None, "numpy is not installed")
class GemmaScope2(unittest.TestCase):
    D_IN, D_SAE = 6, 10

    def params(self, seed, d_out, skip):
        r = rng(seed)
        p = {"w_enc": q(r.normal(0, 0.5, (self.D_IN, self.D_SAE))),
             "w_dec": q(r.normal(0, 0.5, (self.D_SAE, d_out))),
             "b_enc": q(r.normal(0, 0.3, self.D_SAE)),
             "b_dec": q(r.normal(0, 0.3, d_out)),
             "threshold": q(np.abs(r.normal(0.3, 0.2, self.D_SAE)))}
        if skip:
            p["affine_skip_connection"] = q(r.normal(0, 0.5, (self.D_IN, d_out)))
        return p

    def folder(self, p, dtype, config):
        d = os.path.join(tmpdir(self), "resid_post", "layer_9_width_16k_l0_medium")
        os.makedirs(d)
        save_file(os.path.join(d, "params.safetensors"), {n: (a, dtype) for n, a in p.items()})
        if config is not None:
            write_json(os.path.join(d, "config.json"), config)
        return d

    @staticmethod
    def tutorial(w, x, skip_transposed=False):
        """Google's JumpReLUSAE (the Gemma Scope 2 tutorial), in float64."""
        pre = x @ w["w_enc"] + w["b_enc"]
        acts = (pre > w["threshold"]) * relu(pre)
        recon = acts @ w["w_dec"] + w["b_dec"]
        if "affine_skip_connection" in w:
            a = w["affine_skip_connection"]
            recon = recon + x @ (a.T if skip_transposed else a)
        return acts, recon

    def config(self, hook_in, hook_out, affine):
        return {"architecture": "jump_relu", "hf_hook_point_in": hook_in,
                "hf_hook_point_out": hook_out, "affine_connection": affine,
                "width": self.D_SAE, "l0": "medium"}

    def test_saes_and_transcoders(self):
        x = q(rng(9).normal(0, 1.0, (7, self.D_IN)))
        cases = [("sae", self.D_IN, False, "model.layers.9.output", "model.layers.9.output"),
                 ("attn-out sae", self.D_IN, False, "o_proj.input", "o_proj.input"),
                 ("transcoder", 5, False, "pre_feedforward_layernorm.output",
                  "post_feedforward_layernorm.output"),
                 ("skip transcoder", self.D_IN, True, "pre_feedforward_layernorm.output",
                  "post_feedforward_layernorm.output")]
        for seed, (kind, d_out, skip, hin, hout) in enumerate(cases):
            for dtype in ("F32", "BF16", "F16"):
                with self.subTest(kind=kind, dtype=dtype):
                    p = self.params(seed, d_out, skip)
                    d = self.folder(p, dtype, self.config(hin, hout, skip))
                    w = values({n: (a, dtype) for n, a in p.items()})
                    acts, recon = self.tutorial(w, x)
                    m = Loaded(d)
                    try:
                        self.assertEqual(m.d_out, d_out)
                        self.assertEqual(m.transcoder, kind != "sae" and kind != "attn-out sae")
                        np.testing.assert_allclose(m.encode(x), acts, rtol=1e-5, atol=1e-5)
                        np.testing.assert_allclose(m.reconstruct(x), recon, rtol=1e-5, atol=1e-5)
                    finally:
                        m.close()

    def test_skip_is_x_at_A_not_its_transpose(self):
        """Reference outputs stored with the authors' forward (x @ A): libsae reproduces them,
        and SAELens's gemma_3 reading (x @ A^T) on the same non-symmetric A does not."""
        p = self.params(5, self.D_IN, True)
        a = p["affine_skip_connection"]
        self.assertGreater(np.abs(a - a.T).max(), 0.1)
        d = self.folder(p, "F32", self.config("a", "b", True))
        x = q(rng(3).normal(0, 1.0, (9, self.D_IN)))
        w = values({n: (v, "F32") for n, v in p.items()})
        _, y_authors = self.tutorial(w, x)
        np.savez(os.path.join(d, "reference.npz"), x=x, y=y_authors)
        ref = np.load(os.path.join(d, "reference.npz"))
        _, y_saelens = self.tutorial(w, ref["x"], skip_transposed=True)
        m = Loaded(os.path.join(d, "params.safetensors"))
        try:
            got = m.reconstruct(ref["x"])
        finally:
            m.close()
        np.testing.assert_allclose(got, ref["y"], rtol=1e-5, atol=1e-5)
        rel = np.linalg.norm(got - y_saelens) / np.linalg.norm(ref["y"])
        self.assertGreater(rel, 0.05, "x @ A^T must not reproduce the stored outputs")

    def test_without_config(self):
        p = self.params(7, self.D_IN, False)
        d = self.folder(p, "F32", None)
        x = q(rng(4).normal(0, 1.0, (3, self.D_IN)))
        acts, recon = self.tutorial(values({n: (a, "F32") for n, a in p.items()}), x)
        m = Loaded(d)
        try:
            self.assertFalse(m.transcoder)
            np.testing.assert_allclose(m.reconstruct(x), recon, rtol=1e-5, atol=1e-5)
        finally:
            m.close()

    def test_refused(self):
        p = self.params(8, self.D_IN, False)
        d = self.folder(p, "F32", self.config("a", "b", True))
        rc, msg = load_error(d)
        self.assertEqual(rc, SAE_EFORMAT)
        self.assertIn("affine_connection", msg)
        clt = os.path.join(tmpdir(self), "clt")
        os.makedirs(clt)
        p3 = dict(p)
        p3["w_dec"] = np.stack([p["w_dec"], p["w_dec"]], axis=1)  # [d_sae, layers, d_model]
        path = os.path.join(clt, "params_layer_0.safetensors")
        save_file(path, {n: (a, "F32") for n, a in p3.items()})
        rc, msg = load_error(path)
        self.assertEqual(rc, SAE_EUNSUPPORTED)
        self.assertIn("multi-layer", msg)
        d2 = self.folder(p, "F32", dict(self.config("a", "a", False), architecture="topk"))
        rc, msg = load_error(d2)
        self.assertEqual(rc, SAE_EUNSUPPORTED)
        self.assertIn("topk", msg)


@unittest.skipIf(np is None, "numpy is not installed")
class LlamaScope(unittest.TestCase):
    D, D_SAE = 8, 12

    def hyper(self, **kw):
        h = {"d_model": self.D, "d_sae": self.D_SAE, "expansion_factor": 1, "act_fn": "topk",
             "jump_relu_threshold": 0.5, "top_k": 3, "norm_activation": "dataset-wise",
             "dataset_average_activation_norm": {"in": 4.5, "out": 4.5},
             "sparsity_include_decoder_norm": True, "use_decoder_bias": True,
             "apply_decoder_bias_to_pre_encoder": False, "use_glu_encoder": False,
             "hook_point_in": "blocks.5.hook_resid_post",
             "hook_point_out": "blocks.5.hook_resid_post", "lp": 1, "l1_coefficient": 2e-5}
        h.update(kw)
        return h

    def state(self, seed):
        r = rng(seed)
        return {"encoder.weight": q(r.normal(0, 0.4, (self.D_SAE, self.D))),
                "encoder.bias": q(r.normal(0, 0.2, self.D_SAE)),
                # decoder columns of clearly different norms, so folding them matters
                "decoder.weight": q(r.normal(0, 0.4, (self.D, self.D_SAE)) *
                                    np.linspace(0.5, 2.5, self.D_SAE)),
                "decoder.bias": q(r.normal(0, 0.2, self.D))}

    def folder(self, state, dtype, hyper):
        d = os.path.join(tmpdir(self), "L5R")
        os.makedirs(os.path.join(d, "checkpoints"))
        save_file(os.path.join(d, "checkpoints", "final.safetensors"),
                  {n: (a, dtype) for n, a in state.items()})
        write_json(os.path.join(d, "hyperparams.json"), hyper)
        return d

    @staticmethod
    def lm_saes(w, h, x, include_decoder_norm=None):
        """SparseAutoEncoder.from_config + encode + decode (lm_saes, late 2024), float64."""
        We, be = w["encoder.weight"].copy(), w["encoder.bias"].copy()
        Wd, bd = w["decoder.weight"].copy(), w["decoder.bias"].copy()
        act, theta = h["act_fn"], h["jump_relu_threshold"]
        if h["norm_activation"] == "dataset-wise":
            s_in = np.sqrt(h["d_model"]) / h["dataset_average_activation_norm"]["in"]
            s_out = np.sqrt(h["d_model"]) / h["dataset_average_activation_norm"]["out"]
            be = be / s_in
            bd = bd / s_out
            Wd = Wd * s_in / s_out
        if h["sparsity_include_decoder_norm"] if include_decoder_norm is None else \
                include_decoder_norm:
            n = np.linalg.norm(Wd, axis=0)
            Wd = Wd / n
            We = We * n[:, None]
            be = be * n
        if act == "topk" and theta > 0:
            act = "jumprelu"
        xx = x - bd if h["apply_decoder_bias_to_pre_encoder"] else x
        pre = xx @ We.T + be
        if act == "relu":
            f = relu(pre)
        elif act == "jumprelu":
            f = np.where(pre > theta, pre, 0.0)
        else:  # topk of relu(pre) * decoder norm (unit after the fold)
            r = relu(pre) * np.linalg.norm(Wd, axis=0)
            f = np.where(topk_mask(r, h["top_k"]), relu(pre), 0.0)
        return f, f @ Wd.T + bd

    def test_forward(self):
        x = q(rng(1).normal(0, 1.5, (9, self.D)))
        cases = [dict(),
                 dict(apply_decoder_bias_to_pre_encoder=True),
                 dict(act_fn="jumprelu", jump_relu_threshold=0.25),
                 dict(act_fn="relu", jump_relu_threshold=0.0,
                      dataset_average_activation_norm={"in": 3.0, "out": 6.0},
                      hook_point_out="blocks.5.hook_mlp_out"),
                 dict(act_fn="topk", jump_relu_threshold=0.0),
                 dict(sparsity_include_decoder_norm=False, norm_activation="inference")]
        for i, kw in enumerate(cases):
            for dtype in ("F32", "BF16"):
                with self.subTest(case=kw, dtype=dtype):
                    h = self.hyper(**kw)
                    st = self.state(i)
                    d = self.folder(st, dtype, h)
                    w = values({n: (a, dtype) for n, a in st.items()})
                    f, y = self.lm_saes(w, h, x)
                    for path in (d, os.path.join(d, "checkpoints", "final.safetensors")):
                        m = Loaded(path)
                        try:
                            np.testing.assert_allclose(m.encode(x), f, rtol=2e-5, atol=2e-5)
                            np.testing.assert_allclose(m.reconstruct(x), y, rtol=2e-5, atol=2e-5)
                        finally:
                            m.close()

    def test_decoder_norm_changes_what_fires(self):
        """SAELens's reading (no decoder-norm fold) fires other features than lm_saes's."""
        h = self.hyper()
        st = self.state(11)
        d = self.folder(st, "F32", h)
        x = q(rng(2).normal(0, 1.5, (16, self.D)))
        w = values({n: (a, "F32") for n, a in st.items()})
        f, _ = self.lm_saes(w, h, x)
        f_saelens, _ = self.lm_saes(w, h, x, include_decoder_norm=False)
        self.assertTrue(((f > 0) != (f_saelens > 0)).any())
        m = Loaded(d)
        try:
            self.assertTrue((((m.encode(x) > 0) == (f > 0))).all())
        finally:
            m.close()

    def test_refused(self):
        cases = [(dict(use_glu_encoder=True), "use_glu_encoder"),
                 (dict(norm_activation="token-wise"), "token-wise"),
                 (dict(act_fn="jumprelu", jump_relu_threshold=-0.5), "negative"),
                 (dict(dataset_average_activation_norm={"in": 1.0}), "out")]
        for kw, needle in cases:
            with self.subTest(needle=needle):
                d = self.folder(self.state(0), "F32", self.hyper(**kw))
                rc, msg = load_error(d)
                self.assertIn(rc, (SAE_EUNSUPPORTED, SAE_EFORMAT))
                self.assertIn(needle, msg)
        d = os.path.join(tmpdir(self), "r1")
        os.makedirs(d)
        save_file(os.path.join(d, "sae_weights.safetensors"),
                  {"W_E": (np.zeros((4, 6)), "F32"), "log_jumprelu_threshold": (np.zeros(6), "F32"),
                   "encoder.weight": (np.zeros((6, 4)), "F32")})
        write_json(os.path.join(d, "hyperparams.json"), self.hyper())
        # The R1 layout goes to the R1 reader, which needs lm_saes's config.json, not this file.
        rc, msg = load_error(d)
        self.assertEqual(rc, SAE_EFORMAT)
        self.assertIn("config.json", msg)


R1_FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures",
                           "llamascope_r1")


@unittest.skipIf(np is None, "numpy is not installed")
class LlamaScopeR1(unittest.TestCase):
    """tests/fixtures/llamascope_r1 (make.py: lm_saes's SparseAutoEncoder in torch, float64)."""

    def setUp(self):
        with open(os.path.join(R1_FIXTURES, "expected.json")) as f:
            self.expected = json.load(f)

    def test_fixtures_and_their_libsae_file(self):
        for name, want in self.expected.items():
            with self.subTest(name=name):
                x = np.array(want["x"], dtype=np.float32)
                m = libsae.Model.load(os.path.join(R1_FIXTURES, want["path"]))
                self.assertEqual(m.format, "llama-scope-r1")
                self.assertEqual(m.arch, "jumprelu" if want["jumprelu"] else "relu")
                out = os.path.join(tmpdir(self), name + ".safetensors")
                m.save(out)  # what `python3 -m libsae convert` writes
                for model in (m, libsae.Model.load(out)):
                    np.testing.assert_allclose(model.encode(x), np.array(want["f"]),
                                               rtol=2e-5, atol=2e-5)
                    np.testing.assert_allclose(model.reconstruct(x), np.array(want["y"]),
                                               rtol=2e-5, atol=2e-5)

    def test_saelens_reading_fires_other_features(self):
        want = self.expected["r1_sae"]
        m = libsae.Model.load(os.path.join(R1_FIXTURES, want["path"]))
        f = m.encode(np.array(want["x"], dtype=np.float32))
        self.assertTrue(((f != 0) != (np.array(want["f_saelens"]) != 0)).any())
        # the per-feature threshold exp(log_threshold) / ||W_D row||: not one value
        t = m.get_tensor("threshold")
        self.assertGreater(float(np.max(t) - np.min(t)), 0.1)

    def test_refused(self):
        with open(os.path.join(R1_FIXTURES, "refused.json")) as f:
            for case in json.load(f):
                with self.subTest(path=case["path"]):
                    rc, msg = load_error(os.path.join(R1_FIXTURES, case["path"]))
                    self.assertEqual(rc, case["code"])
                    self.assertIn(case["needle"], msg)


@unittest.skipIf(np is None, "numpy is not installed")
class CircuitTracer(unittest.TestCase):
    D_IN, D_SAE, D_OUT = 6, 11, 6

    def state(self, seed, jump, skip, june=False, d_out=None):
        d_out = d_out or self.D_OUT
        r = rng(seed)
        s = {"W_enc": q(r.normal(0, 0.5, (self.D_SAE, self.D_IN))),
             "W_dec": q(r.normal(0, 0.5, (self.D_SAE, d_out))),
             "b_enc": q(r.normal(0, 0.3, self.D_SAE)),
             "b_dec": q(r.normal(0, 0.3, d_out))}
        if june:
            s["W_dec"] = s["W_dec"].T.copy()
        if jump:
            s["activation_function.threshold"] = q(np.abs(r.normal(0.2, 0.2, self.D_SAE)))
        if skip:
            s["W_skip"] = q(r.normal(0, 0.5, (d_out, self.D_IN)))
        return s

    @staticmethod
    def forward(w, x, june=False):
        """SingleLayerTranscoder.encode / decode (+ compute_skip), float64."""
        pre = x @ w["W_enc"].T + w["b_enc"]
        t = w.get("activation_function.threshold")
        acts = pre * (pre > t) if t is not None else relu(pre)
        Wd = w["W_dec"].T if june else w["W_dec"]
        y = acts @ Wd + w["b_dec"]
        if "W_skip" in w:
            y = y + x @ w["W_skip"].T
        return acts, y

    def test_forward(self):
        x = q(rng(5).normal(0, 1.0, (8, self.D_IN)))
        for i, (jump, skip, june, d_out) in enumerate([(False, True, False, None),
                                                      (True, False, False, None),
                                                      (True, True, True, None),
                                                      (False, False, True, 4)]):
            for dtype in ("F32", "BF16"):
                with self.subTest(jump=jump, skip=skip, june=june, dtype=dtype):
                    st = self.state(i, jump, skip, june, d_out)
                    path = os.path.join(tmpdir(self), "layer_%d.safetensors" % i)
                    save_file(path, {n: (a, dtype) for n, a in st.items()})
                    w = values({n: (a, dtype) for n, a in st.items()})
                    acts, y = self.forward(w, x, june)
                    m = Loaded(path)
                    try:
                        self.assertTrue(m.transcoder)
                        np.testing.assert_allclose(m.encode(x), acts, rtol=1e-5, atol=1e-5)
                        np.testing.assert_allclose(m.reconstruct(x), y, rtol=1e-5, atol=1e-5)
                    finally:
                        m.close()

    def test_refused(self):
        st = self.state(1, True, False)
        st["activation_function.threshold"][3] = -0.25
        path = os.path.join(tmpdir(self), "layer_0.safetensors")
        save_file(path, {n: (a, "F32") for n, a in st.items()})
        rc, msg = load_error(path)
        self.assertEqual(rc, SAE_EUNSUPPORTED)
        self.assertIn("negative", msg)
        st = self.state(2, False, False)
        st["k"] = np.array(4.0)
        save_file(path, {n: (a, "F32") for n, a in st.items()})
        rc, msg = load_error(path)
        self.assertEqual(rc, SAE_EUNSUPPORTED)
        self.assertIn("TopK", msg)


@unittest.skipIf(np is None, "numpy is not installed")
class NumpyOrders(unittest.TestCase):
    def setUp(self):
        C.sae_npy_open.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p]
        C.sae_npy_read.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,
                                   ctypes.POINTER(ctypes.c_float)]
        C.sae_npy_close.argtypes = [ctypes.c_void_p]

    def read_rows(self, path, first, count, cols):
        h = ctypes.c_void_p()
        self.assertEqual(C.sae_npy_open(ctypes.byref(h), path.encode()), 0,
                         C.sae_last_error().decode())
        out = np.zeros((count, cols), dtype=np.float32)
        try:
            rc = C.sae_npy_read(h, first, count, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))
            self.assertEqual(rc, 0, C.sae_last_error().decode())
        finally:
            C.sae_npy_close(h)
        return out

    def test_npy_orders_and_byte_orders(self):
        a = rng(0).normal(0, 1.0, (37, 5))
        for dtype in (">f4", ">f2", ">f8", "<f4", "<f2"):
            for fortran in (False, True):
                with self.subTest(dtype=dtype, fortran=fortran):
                    arr = np.asarray(a, dtype=dtype)
                    arr = np.asfortranarray(arr) if fortran else np.ascontiguousarray(arr)
                    path = os.path.join(tmpdir(self), "acts.npy")
                    np.save(path, arr)
                    want = np.load(path).astype(np.float32)
                    got = self.read_rows(path, 3, 30, 5)
                    np.testing.assert_array_equal(got, want[3:33])

    def test_npz_members(self):
        r = rng(1)
        d_in, d_sae = 4, 7
        w_dec = r.normal(0, 0.5, (d_sae, d_in)).astype(np.float32)
        p = {"W_dec": w_dec, "W_enc": w_dec.T,  # a transposed view: a Fortran-ordered member
             "b_enc": r.normal(0, 0.2, d_sae).astype(">f4"),
             "b_dec": r.normal(0, 0.2, d_in).astype(">f8"),
             "threshold": np.abs(r.normal(0.1, 0.1, d_sae)).astype(np.float32)}
        path = os.path.join(tmpdir(self), "params.npz")
        np.savez(path, **p)
        with zipfile.ZipFile(path) as z:
            self.assertIn(b"'fortran_order': True", z.read("W_enc.npy")[:128])
        w = {k: np.load(path)[k].astype(np.float32).astype(np.float64) for k in p}
        x = r.normal(0, 1.0, (5, d_in))
        pre = x.astype(np.float32).astype(np.float64) @ w["W_enc"] + w["b_enc"]
        f = (pre > w["threshold"]) * relu(pre)
        m = Loaded(path)
        try:
            np.testing.assert_allclose(m.encode(x), f, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(m.reconstruct(x), f @ w["W_dec"] + w["b_dec"],
                                       rtol=1e-5, atol=1e-5)
        finally:
            m.close()


if __name__ == "__main__":
    unittest.main()
