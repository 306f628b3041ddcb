"""Version 0.2 bindings against float64 numpy references: transcoders (with and without a skip
connection), gated and GroupMax models, per-token normalization, decoder norms, parameter
bounds, evaluate against a target, Steering.apply_to, and their argument errors."""
import os
import struct
import unittest

from _support import (ALL_ARCHS, TestCase, libsae, np, random_any, ref_decode_any,
                      ref_encode_any, ref_metrics, ref_norm, ref_reconstruct_any, ref_sparse,
                      ref_steer_to, tmpdir)

FLT_MAX = struct.unpack("f", struct.pack("I", 0x7F7FFFFF))[0]
FLT_MIN = struct.unpack("f", struct.pack("I", 0x00800000))[0]


def kw_for(arch, **kw):
    if arch in ("topk", "batchtopk"):
        kw.setdefault("k", 5)
    if arch == "groupmax":
        kw.setdefault("k", 8)  # groups: 40 features in groups of 5
    if arch == "batchtopk":
        kw.setdefault("threshold", 0.1)
    return kw


@unittest.skipIf(np is None, "needs numpy (the no-numpy path is test_no_numpy)")
class TestEnums(TestCase):
    def test_values_are_the_libraries(self):
        lib = libsae._lib.lib
        import ctypes
        for name, value in libsae.ARCHITECTURES.items():
            v = ctypes.c_int()
            lib.sae_arch_from_name(name.encode(), ctypes.byref(v))
            self.assertEqual(v.value, value, name)
            self.assertEqual(lib.sae_arch_name(value).decode(), name)
            self.assertEqual(libsae.Model.new(value, 4, 8).arch, name)
        self.assertIsNone(lib.sae_arch_name(max(libsae.ARCHITECTURES.values()) + 1))
        # every tensor and parameter name reaches C as a known value
        m = libsae.Model.new("relu", 4, 8)
        for name in libsae.TENSORS:
            self.assertIsInstance(m.has_tensor(name), bool)
        for name in libsae.MODEL_PARAMS:
            self.assertEqual(len(libsae.param_bounds(name)), 2)
        for name, value in libsae.NORMALIZATIONS.items():
            m.set_param("normalize", value)
            self.assertEqual(m.normalize, name)
        self.assertEqual(libsae._model._param("normalize"), 7)


@unittest.skipIf(np is None, "needs numpy (the no-numpy path is test_no_numpy)")
class TestTranscoder(TestCase):
    def test_new_shapes_and_tensors(self):
        for skip in (False, True):
            with self.subTest(skip=skip), libsae.Model.new_transcoder("relu", 6, 10, 4, skip) as m:
                self.assertEqual((m.d_in, m.d_sae, m.d_out, m.is_transcoder), (6, 10, 4, True))
                self.assertFalse(m.apply_b_dec_to_input)  # b_dec is the output bias
                want = {"W_enc": (6, 10), "W_dec": (10, 4), "b_enc": (10,), "b_dec": (4,),
                        "W_skip": (6, 4)}
                for name in libsae.TENSORS:
                    held = name in want and (name != "W_skip" or skip)
                    self.assertEqual(m.has_tensor(name), held, name)
                    if held:
                        self.assertEqual(m.tensor_shape(name), want[name])
                        t = m.get_tensor(name)
                        self.assertEqual(t.shape, want[name])
                        self.assertFalse(t.any())
                    else:
                        self.assertLibsaeError(libsae.EUNSUPPORTED, "", m.get_tensor, name)
                with self.assertRaisesRegex(ValueError, r"expected shape \[10, 4\], got \[10, 6\]"):
                    m.set_tensor("W_dec", np.zeros((10, 6), np.float32))
                with self.assertRaisesRegex(ValueError, r"expected shape \[4\]"):
                    m.set_tensor("b_dec", np.zeros(6, np.float32))
                self.assertIn("transcoder", repr(m))
                self.assertIn("d_out=4", repr(m))
                self.assertEqual("with skip" in repr(m), skip)
        s = libsae.Model.new("relu", 6, 10)
        self.assertEqual((s.d_out, s.is_transcoder), (6, False))
        self.assertNotIn("transcoder", repr(s))

    def test_new_errors(self):
        self.assertLibsaeError(libsae.EINVAL, "", libsae.Model.new_transcoder, "relu", 4, 8, 0)
        self.assertLibsaeError(libsae.EINVAL, "", libsae.Model.new_transcoder, "maxout", 4, 8, 3)
        with self.assertRaisesRegex(ValueError, "d_out must be at most"):
            libsae.Model.new_transcoder("relu", 4, 8, 2 ** 64 + 3)  # would be 3
        with self.assertRaisesRegex(ValueError, "d_out must be at least 0"):
            libsae.Model.new_transcoder("relu", 4, 8, -1)
        for bad in (2, "yes", None):
            with self.assertRaisesRegex(TypeError, "skip must be True or False"):
                libsae.Model.new_transcoder("relu", 4, 8, 3, bad)
        # b_dec [d_out] cannot be subtracted from an input of d_in values
        self.assertLibsaeError(libsae.EINVAL, "APPLY_B_DEC_TO_INPUT",
                               libsae.Model.new_transcoder, "relu", 4, 8, 3,
                               apply_b_dec_to_input=True)
        same = libsae.Model.new_transcoder("relu", 4, 8, 4, apply_b_dec_to_input=True)
        self.assertTrue(same.apply_b_dec_to_input)

    def test_every_arch_with_and_without_skip_matches_reference(self):
        rng = np.random.default_rng(31)
        for arch in ALL_ARCHS:
            for skip in (False, True):
                m, w = random_any(arch, 12, 40, 7, skip, seed=32, **kw_for(arch))
                x = rng.standard_normal((9, 12)).astype(np.float32)
                f_ref = ref_encode_any(m, w, x)
                with self.subTest(arch=arch, skip=skip):
                    f = m.encode(x)
                    self.assertClose(f, f_ref)
                    y = m.decode(f)
                    self.assertEqual(y.shape, (9, 7))
                    self.assertClose(y, ref_decode_any(m, w, f))
                    y_hat = m.reconstruct(x)
                    self.assertEqual(y_hat.shape, (9, 7))
                    self.assertClose(y_hat, ref_reconstruct_any(m, w, x))
                    idx, val, count = m.encode_sparse(x, 40)
                    ridx, rval, rcount = ref_sparse(f_ref, 40)
                    np.testing.assert_array_equal(count, rcount)
                    d = m.decode_sparse(idx, val, count)
                    self.assertEqual(d.shape, (9, 7))
                    self.assertClose(d, ref_decode_any(m, w, f))
                    out = np.empty((9, 7), np.float32)
                    self.assertIs(m.reconstruct(x, out=out), out)
                    self.assertClose(out, y_hat)
                    self.assertIs(m.decode(f, out=out), out)
                    for bad in ((9, 12), (7, 9), (63,)):
                        with self.assertRaisesRegex(ValueError, "expected shape"):
                            m.reconstruct(x, out=np.empty(bad, np.float32))
                        with self.assertRaisesRegex(ValueError, "expected shape"):
                            m.decode(f, out=np.empty(bad, np.float32))
                    # leading axes keep their shape, with d_out last
                    self.assertEqual(m.reconstruct(x.reshape(3, 3, 12)).shape, (3, 3, 7))

    def test_skip_is_the_raw_input(self):
        # with zero codes the output is b_dec + x @ W_skip, whatever the normalization
        m = libsae.Model.new_transcoder("relu", 3, 4, 2, skip=True, normalize="layer_norm")
        W_skip = np.array([[1, 0], [0, 2], [1, 1]], np.float32)
        m.set_tensor("W_skip", W_skip)
        m.set_tensor("b_dec", np.array([0.5, -0.5], np.float32))
        x = np.array([[1, 2, 3], [4, -1, 0]], np.float32)
        self.assertClose(m.reconstruct(x), x @ W_skip + [0.5, -0.5])
        self.assertClose(m.decode(m.encode(x)), np.tile([0.5, -0.5], (2, 1)))

    def test_save_load_round_trip(self):
        d = tmpdir(self)
        cases = [("topk", 7, True, "none"), ("gated", 7, False, "layer_norm"),
                 ("groupmax", 3, True, "constant_norm"), ("jumprelu", None, False, "layer_norm")]
        for arch, d_out, skip, norm in cases:
            m, w = random_any(arch, 12, 40, d_out, skip, seed=33, normalize=norm, **kw_for(arch))
            path = os.path.join(d, f"{arch}.safetensors")
            m.save(path)
            with self.subTest(arch=arch), libsae.Model.load(path) as back:
                self.assertEqual((back.arch, back.d_in, back.d_sae, back.d_out,
                                  back.is_transcoder),
                                 (arch, 12, 40, d_out or 12, d_out is not None))
                self.assertEqual(back.params(), m.params())
                self.assertEqual(back.normalize, norm)
                for name in libsae.TENSORS:
                    self.assertEqual(back.has_tensor(name), m.has_tensor(name), name)
                    if m.has_tensor(name):
                        np.testing.assert_array_equal(back.get_tensor(name), m.get_tensor(name))
                x = np.random.default_rng(34).standard_normal((4, 12)).astype(np.float32)
                np.testing.assert_array_equal(back.reconstruct(x), m.reconstruct(x))


@unittest.skipIf(np is None, "needs numpy (the no-numpy path is test_no_numpy)")
class TestGatedGroupMax(TestCase):
    def test_saes_match_reference(self):
        rng = np.random.default_rng(35)
        for arch in ("gated", "groupmax"):
            for scale, apply in ((1.0, True), (0.5, False), (2.0, True)):
                m, w = random_any(arch, 16, 40, seed=36, input_scale=scale,
                                  apply_b_dec_to_input=apply, **kw_for(arch))
                x = rng.standard_normal((11, 16)).astype(np.float32)
                with self.subTest(arch=arch, scale=scale, apply=apply):
                    f = m.encode(x)
                    self.assertClose(f, ref_encode_any(m, w, x))
                    self.assertClose(m.decode(f), ref_decode_any(m, w, f))
                    self.assertClose(m.reconstruct(x), ref_reconstruct_any(m, w, x))
                    if arch == "groupmax":  # at most one feature per group of 5
                        self.assertTrue(((f.reshape(11, 8, 5) != 0).sum(-1) <= 1).all())
                        idx, val, count = m.encode_sparse(x)  # k defaults to the groups
                        self.assertEqual(idx.shape, (11, 8))

    def test_tensors_and_params(self):
        g = libsae.Model.new("gated", 4, 6)
        self.assertEqual([n for n in libsae.TENSORS if g.has_tensor(n)],
                         ["W_enc", "W_dec", "b_enc", "b_dec", "r_mag", "b_mag"])
        self.assertEqual(g.tensor_shape("r_mag"), (6,))
        self.assertIsNone(g.k)
        self.assertLibsaeError(libsae.EUNSUPPORTED, "K", g.set_param, "k", 2)
        bad = np.zeros(6, np.float32)
        bad[4] = np.inf
        self.assertLibsaeError(libsae.EINVAL, "r_mag", g.set_tensor, "r_mag", bad)
        # GroupMax's K is the number of groups: by default the most up to 32 dividing d_sae
        self.assertEqual(libsae.Model.new("groupmax", 4, 48).k, 24)
        self.assertEqual(libsae.Model.new("groupmax", 4, 64).k, 32)
        gm = libsae.Model.new("groupmax", 4, 48, k=6)
        self.assertEqual(gm.k, 6)
        self.assertLibsaeError(libsae.EINVAL, "divide", setattr, gm, "k", 5)
        self.assertEqual(gm.k, 6)
        self.assertFalse(gm.has_tensor("r_mag"))


@unittest.skipIf(np is None, "needs numpy (the no-numpy path is test_no_numpy)")
class TestNormalize(TestCase):
    def test_every_normalization_matches_reference(self):
        rng = np.random.default_rng(37)
        x = (rng.standard_normal((10, 16)) * 3 + 1).astype(np.float32)
        for norm in libsae.NORMALIZATIONS:
            for arch in ("relu", "topk", "gated", "groupmax", "jumprelu"):
                for d_out, skip in ((None, False), (5, True), (16, False)):
                    m, w = random_any(arch, 16, 40, d_out, skip, seed=38, normalize=norm,
                                      input_scale=1.5, **kw_for(arch))
                    with self.subTest(norm=norm, arch=arch, d_out=d_out):
                        self.assertEqual(m.normalize, norm)
                        f = m.encode(x)
                        self.assertClose(f, ref_encode_any(m, w, x))
                        # decode stays in normalized space; reconstruct denormalizes an SAE
                        self.assertClose(m.decode(f), ref_decode_any(m, w, f))
                        self.assertClose(m.reconstruct(x), ref_reconstruct_any(m, w, x))
                        if norm != "none" and d_out is None:
                            x_n, _, _ = ref_norm(m, x)
                            self.assertFalse(np.allclose(x_n, x))

    def test_names_values_and_errors(self):
        m = libsae.Model.new("relu", 4, 8)
        self.assertEqual((m.normalize, m.get_param("normalize")), ("none", "none"))
        self.assertEqual(m.params()["normalize"], "none")
        for name, value in libsae.NORMALIZATIONS.items():
            m.normalize = name
            self.assertEqual(m.get_param("normalize"), name)
            m.set_param("normalize", 0)
            m.set_param("normalize", value)  # ints work too
            self.assertEqual(m.normalize, name)
        self.assertEqual(libsae.Model.new("relu", 4, 8, normalize=2).normalize, "constant_norm")
        with self.assertRaisesRegex(ValueError, "unknown normalize 'batch_norm'; one of none, "
                                    "layer_norm, constant_norm"):
            m.normalize = "batch_norm"
        self.assertEqual(m.normalize, "constant_norm")
        for bad in (True, 1.0, None, b"none"):
            with self.assertRaisesRegex(TypeError, "normalize must be"):
                m.normalize = bad
        with self.assertRaisesRegex(ValueError, "normalize must be at most 2147483647"):
            m.normalize = 2 ** 32 + 1  # as a C int: 1, layer_norm
        self.assertLibsaeError(libsae.EINVAL, "NORMALIZE", m.set_param, "normalize", 3)
        self.assertLibsaeError(libsae.EINVAL, "NORMALIZE", m.set_param, "normalize", -1)
        self.assertEqual(m.normalize, "constant_norm")
        self.assertLibsaeError(libsae.EINVAL, "d_in >= 2", libsae.Model.new, "relu", 1, 4,
                               normalize="layer_norm")
        # a token of norm 0 has no constant-norm scale
        c = libsae.Model.new("relu", 4, 8, normalize="constant_norm")
        x = np.ones((3, 4), np.float32)
        x[1] = 0
        self.assertLibsaeError(libsae.EINVAL, "", c.reconstruct, x)


@unittest.skipIf(np is None, "needs numpy (the no-numpy path is test_no_numpy)")
class TestDecoderNormsAndBounds(TestCase):
    def test_decoder_norms(self):
        for d_out in (None, 5):
            m, w = random_any("relu", 12, 30, d_out, seed=39)
            n = m.decoder_norms()
            self.assertEqual((n.shape, n.dtype), ((30,), np.float32))
            self.assertClose(n, np.linalg.norm(w["W_dec"], axis=1), rtol=1e-6, atol=1e-6)
            # kept current by set_tensor
            W = w["W_dec"].copy()
            W[3] *= 4
            W[7] = 0
            m.set_tensor("W_dec", W.astype(np.float32))
            self.assertClose(m.decoder_norms(), np.linalg.norm(W, axis=1), rtol=1e-6, atol=1e-6)
            self.assertEqual(m.decoder_norms()[7], 0)
        m.close()
        with self.assertRaisesRegex(ValueError, "closed"):
            m.decoder_norms()

    def test_param_bounds(self):
        want = {"k": (1, 2 ** 32 - 1), "apply_b_dec_to_input": (0, 1),
                "input_scale": (FLT_MIN, FLT_MAX), "threshold": (-FLT_MAX, FLT_MAX),
                "threads": (0, 1024), "bf16_weights": (0, 1), "normalize": (0, 2)}
        self.assertEqual(set(want), set(libsae.MODEL_PARAMS))
        for name, (lo, hi) in want.items():
            self.assertEqual(libsae.param_bounds(name), (lo, hi), name)
        with self.assertRaisesRegex(KeyError, "unknown model parameter 'lr'"):
            libsae.param_bounds("lr")
        # the bounds are what set_param accepts
        m = libsae.Model.new("topk", 4, 8)
        for name in ("threads", "k", "input_scale"):
            lo, hi = libsae.param_bounds(name)
            m.set_param(name, lo)
            m.set_param(name, hi)
            self.assertEqual(m.get_param(name), hi)
            self.assertLibsaeError(libsae.EINVAL, "", m.set_param, name,
                                   hi * 2 if name != "threads" else hi + 1)
            self.assertLibsaeError(libsae.EINVAL, "", m.set_param, name,
                                   lo / 2 if name == "input_scale" else lo - 1)


@unittest.skipIf(np is None, "needs numpy (the no-numpy path is test_no_numpy)")
class TestEvaluateTo(TestCase):
    def test_against_numpy(self):
        rng = np.random.default_rng(40)
        for arch, d_out, skip, norm in (("topk", 6, True, "none"), ("relu", 6, False, "none"),
                                        ("gated", 16, True, "layer_norm"),
                                        ("groupmax", None, False, "constant_norm")):
            m, w = random_any(arch, 16, 40, d_out, skip, seed=41, normalize=norm,
                              **kw_for(arch))
            x = (rng.standard_normal((200, 16)) + 0.3).astype(np.float32)
            y = (rng.standard_normal((200, m.d_out)) + 0.5).astype(np.float32)
            f = ref_encode_any(m, w, x)
            want = ref_metrics(f, y, ref_reconstruct_any(m, w, x))
            with self.subTest(arch=arch, d_out=d_out):
                got = m.evaluate(x, y)
                self.assertEqual(list(got), list(libsae.EVAL_METRICS))
                for name, value in want.items():
                    self.assertAlmostEqual(got[name], value, delta=1e-4 * max(1, abs(value)),
                                           msg=name)
                self.assertEqual(list(m.evaluate(x, y, metrics=("l0", "fvu"))), ["l0", "fvu"])
                # leading axes: tokens are counted, not shapes compared
                self.assertAlmostEqual(m.evaluate(x.reshape(10, 20, 16), y, metrics=("mse",))
                                       ["mse"], got["mse"], places=5)
        sae, _ = random_any("relu", 16, 40, seed=42)
        self.assertEqual(sae.evaluate(x), sae.evaluate(x, x))

    def test_errors(self):
        m, _ = random_any("relu", 8, 20, 3, seed=43)
        x = np.ones((5, 8), np.float32)
        y = np.ones((5, 3), np.float32)
        self.assertLibsaeError(libsae.EINVAL, "sae_evaluate_to", m.evaluate, x)
        with self.assertRaisesRegex(ValueError, "x has 5 tokens but y has 4"):
            m.evaluate(x, y[:4])
        with self.assertRaisesRegex(ValueError, r"evaluate: y: expected shape \[\.\.\., 3\]"):
            m.evaluate(x, np.ones((5, 8), np.float32))
        with self.assertRaisesRegex(TypeError, "pass the metrics by keyword"):
            m.evaluate(x, ("l0", "mse"))
        with self.assertRaisesRegex(ValueError, "unknown metric"):
            m.evaluate(x, y, metrics=("accuracy",))
        bad = y.copy()
        bad[2, 1] = np.nan
        self.assertLibsaeError(libsae.EINVAL, "y", m.evaluate, x, bad)
        self.assertLibsaeError(libsae.EINVAL, "", m.evaluate, x[:0], y[:0])


@unittest.skipIf(np is None or not libsae.has("sae_steer_apply_to"), "needs numpy and apply_to")
class TestApplyTo(TestCase):
    def test_transcoder_against_numpy(self):
        rng = np.random.default_rng(44)
        for arch in ("relu", "topk", "jumprelu", "gated", "groupmax"):
            for skip in (False, True):
                m, w = random_any(arch, 16, 40, 6, skip, seed=45, **kw_for(arch))
                x = rng.standard_normal((7, 16)).astype(np.float32) * 2
                y0 = rng.standard_normal((7, 6)).astype(np.float32)
                active = int(np.argmax(m.encode(x).sum(0)))
                for ops in ({active: ("clamp", 5.0)}, {active: ("clamp", 0.0)},
                            {active: ("scale", 3.0)}, {2: ("add", -1.5)},
                            {active: ("clamp", 4.0), 2: ("add", 0.5),
                             (active + 1) % 40: ("scale", 0.0)}):
                    with self.subTest(arch=arch, skip=skip, ops=ops):
                        s = libsae.Steering(m)
                        for i, (kind, v) in ops.items():
                            getattr(s, kind)(i, v)
                        y = y0.copy()
                        self.assertIs(s.apply_to(x, y), y)
                        self.assertClose(y, ref_steer_to(m, w, x, y0, ops), atol=2e-4)
                # an add-only plan is one constant vector of d_out values
                s = libsae.Steering(m).add(3, 2.0).add(5, -1.0)
                v = s.vector()
                self.assertEqual(v.shape, (6,))
                self.assertClose(v, 2.0 * w["W_dec"][3] - w["W_dec"][5])

    def test_sae_with_each_normalization(self):
        rng = np.random.default_rng(46)
        for norm in libsae.NORMALIZATIONS:
            m, w = random_any("relu", 16, 40, seed=47, normalize=norm, input_scale=0.5)
            x = (rng.standard_normal((6, 16)) * 2 + 1).astype(np.float32)
            ops = {int(np.argmax(m.encode(x).sum(0))): ("clamp", 3.0), 1: ("add", 0.7)}
            s = libsae.Steering(m)
            for i, (kind, v) in ops.items():
                getattr(s, kind)(i, v)
            with self.subTest(norm=norm):
                y0 = rng.standard_normal((6, 16)).astype(np.float32)
                y = y0.copy()
                s.apply_to(x, y)
                self.assertClose(y, ref_steer_to(m, w, x, y0, ops), atol=2e-4)
                same = x.copy()  # one buffer for x and y is apply
                s.apply_to(same, same)
                self.assertClose(same, ref_steer_to(m, w, x, x, ops), atol=2e-4)
                x2 = x.copy()
                s.apply(x2)
                np.testing.assert_array_equal(x2, same)

    def test_errors(self):
        m, _ = random_any("relu", 8, 20, 3, seed=48)
        s = libsae.Steering(m).clamp(1, 2.0)
        x = np.ones((4, 8), np.float32)
        y = np.zeros((4, 3), np.float32)
        with self.assertRaisesRegex(TypeError, "in place.*float32.*float64"):
            s.apply_to(x, np.zeros((4, 3)))
        with self.assertRaisesRegex(TypeError, "contiguous=False"):
            s.apply_to(x, np.zeros((3, 4), np.float32).T)
        ro = y.copy()
        ro.flags.writeable = False
        with self.assertRaisesRegex(TypeError, "writable=False"):
            s.apply_to(x, ro)
        with self.assertRaisesRegex(TypeError, "in place"):
            s.apply_to(x, [[0.0] * 3] * 4)
        with self.assertRaisesRegex(ValueError, r"y of shape \[\.\.\., 3\], got \[4, 8\]"):
            s.apply_to(x, np.zeros((4, 8), np.float32))
        with self.assertRaisesRegex(ValueError, r"x: expected shape \[\.\.\., 8\]"):
            s.apply_to(np.ones((4, 3), np.float32), y)
        with self.assertRaisesRegex(ValueError, "x has 4 tokens but y has 5"):
            s.apply_to(x, np.zeros((5, 3), np.float32))
        bad = y.copy()
        bad[3, 2] = np.inf
        self.assertLibsaeError(libsae.EINVAL, "y", s.apply_to, x, bad)
        # a transcoder's own input has nothing to steer
        self.assertLibsaeError(libsae.EINVAL, "", s.apply, x.copy())
        # x is read only: any float array works, and stays as it was
        x64 = np.ones((4, 8))
        s.apply_to(x64, y)
        np.testing.assert_array_equal(x64, np.ones((4, 8)))
        s.model.close()
        with self.assertRaisesRegex(ValueError, "closed"):
            s.apply_to(x, y)


if __name__ == "__main__":
    unittest.main()
