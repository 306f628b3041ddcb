"""Model, encode and decode bindings against float64 numpy references, and their errors."""
import os
import threading
import unittest

from _support import ARCHS, TestCase, libsae, np, random_model, ref_decode, ref_encode, \
    ref_sparse, tmpdir
from libsae import _buffers


@unittest.skipIf(np is None, "needs numpy (the no-numpy path is test_no_numpy)")
class TestModel(TestCase):
    def test_version_matches_the_package(self):
        self.assertEqual(libsae.version_number // 10000, libsae.EXPECTED_MAJOR)
        self.assertEqual(libsae.version_string.split(".")[0], str(libsae.EXPECTED_MAJOR))
        self.assertTrue(os.path.exists(libsae.library_path))

    def test_new_sizes_arch_and_default_params(self):
        for arch in ARCHS:
            with libsae.Model.new(arch, 5, 7) as m:
                self.assertEqual((m.d_in, m.d_sae, m.arch, m.format), (5, 7, arch, "new"))
                self.assertEqual(m.input_scale, 1.0)
                self.assertTrue(m.apply_b_dec_to_input)
                self.assertEqual(m.k, 32 if arch in ("topk", "batchtopk") else None)
                self.assertEqual(m.threshold, 0.0 if arch == "batchtopk" else None)
                for name in libsae.TENSORS:
                    held = name in ("W_enc", "W_dec", "b_enc", "b_dec") or \
                        (name == "threshold" and arch == "jumprelu")
                    self.assertEqual(m.has_tensor(name), held, name)
                    if not held:
                        continue
                    t = m.get_tensor(name)
                    self.assertEqual(t.shape, m.tensor_shape(name))
                    self.assertEqual(t.dtype, np.float32)
                    self.assertFalse(t.any(), "new models are zero")
        self.assertEqual(libsae.Model.new("standard", 2, 3).arch, "relu")

    def test_new_with_params(self):
        m = libsae.Model.new("topk", 4, 9, k=3, input_scale=2.5, apply_b_dec_to_input=False)
        self.assertEqual((m.k, m.input_scale, m.apply_b_dec_to_input), (3, 2.5, False))
        self.assertEqual(m.params(), {"k": 3.0, "apply_b_dec_to_input": 0.0, "input_scale": 2.5,
                                      "threads": 0.0, "bf16_weights": 0.0, "normalize": "none"})
        m.k = 5
        self.assertEqual(m.get_param("k"), 5.0)
        b = libsae.Model.new("batchtopk", 4, 9, threshold=0.25)
        self.assertEqual(b.threshold, 0.25)
        self.assertIn("topk d_in=4 d_sae=9 k=5", repr(m))

    def test_new_and_param_errors(self):
        self.assertLibsaeError(libsae.EINVAL, "must be at least 1", libsae.Model.new, "relu", 0, 4)
        self.assertLibsaeError(libsae.EINVAL, "maxout", libsae.Model.new, "maxout", 4, 4)
        m = libsae.Model.new("relu", 4, 4)
        self.assertLibsaeError(libsae.EUNSUPPORTED, "K", m.set_param, "k", 3)
        t = libsae.Model.new("topk", 4, 4)
        self.assertLibsaeError(libsae.EINVAL, "K must be", setattr, t, "k", 0)
        self.assertLibsaeError(libsae.EINVAL, "INPUT_SCALE", setattr, t, "input_scale", -1.0)
        self.assertLibsaeError(libsae.EINVAL, "INPUT_SCALE", setattr, t, "input_scale",
                               float("nan"))
        with self.assertRaises(KeyError):
            t.get_param("lr")
        with self.assertRaises(TypeError):
            libsae.Model.new("relu", "4", 4)

    def test_tensors_round_trip_and_are_copies(self):
        m, w = random_model("jumprelu", 6, 10)
        for name, v in w.items():
            got = m.get_tensor(name)
            np.testing.assert_array_equal(got, v.astype(np.float32))
            got[...] = 0  # a copy: the model keeps its weights
            np.testing.assert_array_equal(m.get_tensor(name), v.astype(np.float32))
        # float64, Fortran-ordered and list inputs are converted once
        m.set_tensor("W_enc", np.asfortranarray(w["W_enc"] * 2))
        np.testing.assert_allclose(m.get_tensor("W_enc"), w["W_enc"] * 2, rtol=1e-6)
        m.set_tensor("b_dec", [1.0] * 6)
        np.testing.assert_array_equal(m.get_tensor("b_dec"), np.ones(6, np.float32))

    def test_tensor_errors(self):
        m = libsae.Model.new("relu", 6, 10)
        with self.assertRaisesRegex(ValueError, r"expected shape \[6, 10\], got \[10, 6\]"):
            m.set_tensor("W_enc", np.zeros((10, 6), np.float32))
        with self.assertRaisesRegex(ValueError, "expected shape"):
            m.set_tensor("b_enc", np.zeros(9, np.float32))
        with self.assertRaisesRegex(KeyError, "unknown tensor 'W_in'"):
            m.get_tensor("W_in")
        self.assertLibsaeError(libsae.EUNSUPPORTED, "threshold", m.get_tensor, "threshold")
        bad = np.zeros((6, 10), np.float32)
        bad[2, 3] = np.inf
        e = self.assertLibsaeError(libsae.EINVAL, "W_enc", m.set_tensor, "W_enc", bad)
        self.assertEqual(e.function, "sae_model_set_tensor")
        self.assertEqual(e.name, "invalid argument")

    def test_encode_matches_reference_for_every_arch(self):
        rng = np.random.default_rng(1)
        for arch in ARCHS:
            for scale, apply in ((1.0, True), (0.5, False), (3.0, True)):
                kw = {"k": 7} if arch in ("topk", "batchtopk") else {}
                if arch == "batchtopk":
                    kw["threshold"] = 0.2
                m, w = random_model(arch, 24, 64, seed=2, input_scale=scale,
                                    apply_b_dec_to_input=apply, **kw)
                for n in (1, 5, 40):
                    x = rng.standard_normal((n, 24)).astype(np.float32)
                    with self.subTest(arch=arch, scale=scale, apply=apply, n=n):
                        f = m.encode(x)
                        self.assertEqual((f.shape, f.dtype), ((n, 64), np.float32))
                        self.assertClose(f, ref_encode(m, w, x))
                        if arch == "topk":
                            self.assertTrue(((f > 0).sum(1) <= 7).all())

    def test_decode_and_reconstruct_match_reference(self):
        rng = np.random.default_rng(3)
        for arch in ARCHS:
            m, w = random_model(arch, 16, 48, seed=4, input_scale=2.0, k=5)  \
                if arch in ("topk", "batchtopk") else random_model(arch, 16, 48, seed=4,
                                                                   input_scale=2.0)
            x = rng.standard_normal((9, 16)).astype(np.float32)
            f = np.abs(rng.standard_normal((9, 48))).astype(np.float32)
            with self.subTest(arch=arch):
                self.assertClose(m.decode(f), ref_decode(m, w, f))
                self.assertClose(m.reconstruct(x), ref_decode(m, w, ref_encode(m, w, x)))

    def test_threads_param_gives_the_same_codes(self):
        m, w = random_model("topk", 16, 200, seed=8, k=7)
        x = np.random.default_rng(2).standard_normal((50, 16)).astype(np.float32)
        self.assertEqual(m.get_param("threads"), 0)
        many = m.encode(x)
        m.set_param("threads", 1)
        self.assertEqual(m.params()["threads"], 1)
        np.testing.assert_array_equal(m.encode(x), many)
        with self.assertRaises(libsae.LibsaeError):
            m.set_param("threads", -1)
        self.assertEqual(libsae.Model.new("relu", 2, 3, threads=3).get_param("threads"), 3)

    def test_bf16_weights_are_the_rounded_weights(self):
        m, w = random_model("relu", 16, 200, seed=9)
        x = np.random.default_rng(3).standard_normal((5, 16)).astype(np.float32)
        m.set_param("bf16_weights", 1)
        self.assertEqual(m.get_param("bf16_weights"), 1)
        W_enc = m.get_tensor("W_enc")
        # bfloat16: the low 16 bits of every float are zero, the value within 2^-8 relative
        self.assertFalse((W_enc.view(np.uint32) & 0xFFFF).any())
        np.testing.assert_allclose(W_enc, w["W_enc"], rtol=1.001 * 2 ** -8)
        rounded = dict(w, W_enc=W_enc, W_dec=m.get_tensor("W_dec"))
        # On CPUs with bfloat16 matrix instructions the encoder's input x_s is rounded to
        # bfloat16 too (sae.h, sae_model_bf16_path: AMX, AVX512_BF16); elsewhere it stays float.
        # The result must be one of the two, each to the usual tolerance.
        xs = (np.float32(m.input_scale) * x - w["b_dec"]).astype(np.float32)
        bits = xs.view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # to nearest, ties to even
        xs16 = bits.astype(np.uint32).view(np.float32).astype(np.float64)
        on_widen = ref_encode(m, rounded, x)
        on_bf16 = np.maximum(xs16 @ W_enc + w["b_enc"], 0)
        got = m.encode(x)
        scale = max(1.0, float(np.abs(on_widen).max()))
        self.assertTrue(np.abs(got - on_widen).max() <= 2e-4 * scale or
                        np.abs(got - on_bf16).max() <= 2e-4 * scale,
                        f"neither path: {np.abs(got - on_widen).max()} from the float input, "
                        f"{np.abs(got - on_bf16).max()} from the bfloat16 input")
        with self.assertRaises(libsae.LibsaeError):
            m.set_param("bf16_weights", 2)

    def test_evaluate_matches_numpy(self):
        rng = np.random.default_rng(11)
        for arch in ARCHS:
            m, w = random_model(arch, 16, 48, seed=6, k=5 if arch in ("topk", "batchtopk") else None)
            x = (rng.standard_normal((300, 16)) + 0.5).astype(np.float32)
            f = ref_encode(m, w, x)
            x_hat = ref_decode(m, w, f)
            xd = x.astype(np.float64)
            err = ((xd - x_hat) ** 2).sum(1)
            fvu = err.sum() / ((xd - xd.mean(0)) ** 2).sum()
            nx, nh = np.linalg.norm(xd, axis=1), np.linalg.norm(x_hat, axis=1)
            want = {"mse": err.mean(), "fvu": fvu, "explained_variance": 1 - fvu,
                    "l0": (f != 0).sum(1).mean(), "l1": f.sum(1).mean(),
                    "cosine": ((xd * x_hat).sum(1) / (nx * nh)).mean(),
                    "l2_ratio": (nh / nx).mean(), "dead_fraction": ((f != 0).sum(0) == 0).mean()}
            with self.subTest(arch=arch):
                got = m.evaluate(x)
                self.assertEqual(set(got), set(want))
                for name, value in want.items():
                    self.assertAlmostEqual(got[name], value, delta=1e-4 * max(1, abs(value)),
                                           msg=name)
                self.assertEqual(list(m.evaluate(x, metrics=("l0", "mse"))), ["l0", "mse"])
        with self.assertRaises(ValueError):
            m.evaluate(x, metrics=("accuracy",))
        with self.assertRaises(libsae.LibsaeError) as e:
            m.evaluate(x[:0])
        self.assertEqual(e.exception.code, libsae.EINVAL)

    def test_encode_sparse_matches_reference(self):
        rng = np.random.default_rng(5)
        for arch in ARCHS:
            m, w = random_model(arch, 20, 50, seed=6, k=6) if arch in ("topk", "batchtopk") \
                else random_model(arch, 20, 50, seed=6)
            x = rng.standard_normal((12, 20)).astype(np.float32)
            for k in (1, 4, 50, 80):  # k >= d_sae too
                with self.subTest(arch=arch, k=k):
                    idx, val, count = m.encode_sparse(x, k)
                    self.assertEqual((idx.dtype, val.dtype, count.dtype),
                                     (np.uint32, np.float32, np.uint32))
                    self.assertEqual((idx.shape, val.shape, count.shape), ((12, k), (12, k), (12,)))
                    ridx, rval, rcount = ref_sparse(ref_encode(m, w, x), k)
                    np.testing.assert_array_equal(count, rcount)
                    np.testing.assert_array_equal(idx, ridx)
                    self.assertClose(val, rval)
                    # and back: decode_sparse equals decoding the same codes made dense
                    dense = np.zeros((12, 50), np.float32)
                    for t in range(12):
                        dense[t, idx[t, :count[t]]] = val[t, :count[t]]
                    self.assertClose(m.decode_sparse(idx, val, count), m.decode(dense))
        t = libsae.Model.new("topk", 3, 8, k=2)
        self.assertEqual(t.encode_sparse(np.ones((4, 3), np.float32))[0].shape, (4, 2))
        r = libsae.Model.new("relu", 3, 8)
        with self.assertRaisesRegex(TypeError, "k is required"):
            r.encode_sparse(np.ones((1, 3), np.float32))
        with self.assertRaisesRegex(ValueError, "at least 1"):
            r.encode_sparse(np.ones((1, 3), np.float32), 0)

    def test_decode_sparse_errors(self):
        m, _ = random_model("relu", 4, 6)
        idx = np.array([[1, 6]], np.uint32)
        val = np.ones((1, 2), np.float32)
        self.assertLibsaeError(libsae.ERANGE, "d_sae = 6", m.decode_sparse, idx, val,
                               np.array([2], np.uint32))
        self.assertLibsaeError(libsae.EINVAL, "more than k", m.decode_sparse, idx, val,
                               np.array([3], np.uint32))
        with self.assertRaisesRegex(TypeError, "expected integers"):
            m.decode_sparse(idx.astype(np.float32), val, np.array([1], np.uint32))

    def test_shapes_leading_axes_and_empty_batches(self):
        m, w = random_model("relu", 8, 12)
        x = np.random.default_rng(7).standard_normal((2, 3, 8)).astype(np.float32)
        f = m.encode(x)
        self.assertEqual(f.shape, (2, 3, 12))
        self.assertClose(f, ref_encode(m, w, x))
        self.assertEqual(m.decode(f).shape, (2, 3, 8))
        idx, val, count = m.encode_sparse(x, 4)
        self.assertEqual((idx.shape, count.shape), ((2, 3, 4), (2, 3)))
        self.assertEqual(m.decode_sparse(idx, val, count).shape, (2, 3, 8))
        one = m.encode(x[0, 0])  # a single token, 1-D
        self.assertEqual(one.shape, (12,))
        self.assertClose(one, f[0, 0])
        i1, v1, c1 = m.encode_sparse(x[0, 0], 12)
        self.assertEqual((i1.shape, c1.shape), ((12,), ()))
        self.assertClose(m.decode_sparse(i1, v1, c1), m.decode(one))
        self.assertEqual(m.encode(np.zeros((0, 8), np.float32)).shape, (0, 12))
        self.assertEqual(m.reconstruct(np.zeros((0, 8), np.float32)).shape, (0, 8))
        with self.assertRaisesRegex(ValueError, r"expected shape \[\.\.\., 8\], got \[4, 7\]"):
            m.encode(np.zeros((4, 7), np.float32))
        with self.assertRaisesRegex(ValueError, "expected shape"):
            m.decode(np.zeros((4, 8), np.float32))

    def test_non_finite_input_is_refused_with_the_token(self):
        m, _ = random_model("topk", 8, 12, k=3)
        x = np.zeros((3, 8), np.float32)
        x[2, 5] = np.nan
        e = self.assertLibsaeError(libsae.EINVAL, "x[2][5]", m.encode, x)
        self.assertEqual(e.function, "sae_encode")
        self.assertLibsaeError(libsae.EINVAL, "x[2][5]", m.reconstruct, x)
        self.assertLibsaeError(libsae.EINVAL, "x[2][5]", m.encode_sparse, x, 2)

    def test_zero_copy_and_conversion(self):
        m, w = random_model("relu", 8, 12)
        x = np.random.default_rng(8).standard_normal((5, 8)).astype(np.float32)
        ptr, keep, n, lead = _buffers.as_input(x, 8, "x")
        self.assertIs(keep, x)  # C-contiguous float32: passed by address
        self.assertEqual((ptr, n, lead), (x.ctypes.data, 5, (5,)))
        for other in (x.astype(np.float64), np.asfortranarray(x), x[:, ::1].T.copy().T,
                      x.tolist()):
            self.assertClose(m.encode(other), ref_encode(m, w, x))
        strided = np.zeros((10, 8), np.float32)
        strided[::2] = x
        self.assertClose(m.encode(strided[::2]), ref_encode(m, w, x))

    def test_out_arguments(self):
        m, w = random_model("relu", 8, 12)
        x = np.random.default_rng(9).standard_normal((5, 8)).astype(np.float32)
        out = np.empty((5, 12), np.float32)
        self.assertIs(m.encode(x, out=out), out)
        self.assertClose(out, ref_encode(m, w, x))
        back = np.empty((5, 8), np.float32)
        self.assertIs(m.decode(out, out=back), back)
        want = ref_decode(m, w, ref_encode(m, w, x))
        self.assertIs(m.reconstruct(x, out=x), x)  # in place
        self.assertClose(x, want)
        with self.assertRaisesRegex(TypeError, "float32"):
            m.encode(x, out=np.empty((5, 12), np.float64))
        with self.assertRaisesRegex(ValueError, "expected shape"):
            m.encode(x, out=np.empty((5, 11), np.float32))
        ro = np.empty((5, 12), np.float32)
        ro.flags.writeable = False
        with self.assertRaisesRegex(TypeError, "writable"):
            m.encode(x, out=ro)

    def test_save_load_round_trip(self):
        d = tmpdir(self)
        for arch in ARCHS:
            kw = {"k": 4} if arch in ("topk", "batchtopk") else {}
            m, w = random_model(arch, 6, 14, input_scale=1.5, apply_b_dec_to_input=False, **kw)
            path = os.path.join(d, f"{arch}.safetensors")
            m.save(path)
            with libsae.Model.load(path) as back:
                self.assertEqual((back.arch, back.d_in, back.d_sae, back.format, back.dtype),
                                 (arch, 6, 14, "libsae", "F32"))
                self.assertEqual(back.params(), m.params())
                for name in w:
                    np.testing.assert_array_equal(back.get_tensor(name), m.get_tensor(name))
            # os.PathLike works as well
            import pathlib
            self.assertEqual(libsae.Model.load(pathlib.Path(path)).arch, arch)

    def test_load_errors_name_the_file(self):
        d = tmpdir(self)
        missing = os.path.join(d, "missing.safetensors")
        self.assertLibsaeError(libsae.EIO, missing, libsae.Model.load, missing)
        junk = os.path.join(d, "junk.safetensors")
        with open(junk, "wb") as f:
            f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
        with self.assertRaises(libsae.LibsaeError) as cm:
            libsae.Model.load(junk)
        self.assertIn(cm.exception.code, (libsae.EFORMAT, libsae.EUNSUPPORTED))
        self.assertIn(junk, cm.exception.message)
        m = libsae.Model.new("relu", 2, 2)
        self.assertLibsaeError(libsae.EIO, "no-such-dir", m.save,
                               os.path.join(d, "no-such-dir", "m.safetensors"))

    def test_threads_encode_at_once(self):
        m, w = random_model("topk", 64, 256, k=8)
        rng = np.random.default_rng(10)
        xs = [rng.standard_normal((32, 64)).astype(np.float32) for _ in range(4)]
        want = [m.encode(x) for x in xs]
        got = [None] * 4

        def run(i):
            for _ in range(20):
                got[i] = m.encode(xs[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for g, want_i in zip(got, want):
            np.testing.assert_array_equal(g, want_i)


@unittest.skipIf(np is None, "needs numpy")
class TestNpy(TestCase):
    def test_round_trip_with_numpy(self):
        d = tmpdir(self)
        x = np.random.default_rng(11).standard_normal((7, 5)).astype(np.float32)
        p = os.path.join(d, "a.npy")
        libsae.save_npy(p, x)
        np.testing.assert_array_equal(np.load(p), x)
        np.testing.assert_array_equal(libsae.load_npy(p), x)
        with libsae.NpyFile(p) as f:
            self.assertEqual((f.rows, f.cols, f.shape, len(f)), (7, 5, (7, 5), 7))
            np.testing.assert_array_equal(f.read(2, 3), x[2:5])
            np.testing.assert_array_equal(f.read(6), x[6:])
            self.assertEqual(f.read(7).shape, (0, 5))
            self.assertLibsaeError(libsae.ERANGE, "", f.read, 5, 3)
        # float64 and float16 files numpy wrote read as float32
        for dt in (np.float64, np.float16):
            np.save(p, x.astype(dt))
            np.testing.assert_array_equal(libsae.load_npy(p), x.astype(dt).astype(np.float32))
        np.save(p, x[:, 0].copy())
        self.assertEqual(libsae.load_npy(p).shape, (7, 1))

    def test_errors(self):
        d = tmpdir(self)
        p = os.path.join(d, "bad.npy")
        with open(p, "wb") as f:
            f.write(b"\x93NUMPY\x01\x00garbage")
        self.assertLibsaeError(libsae.EFORMAT, p, libsae.NpyFile, p)
        np.save(p, np.zeros((2, 2), np.int32))
        self.assertLibsaeError(libsae.EUNSUPPORTED, "", libsae.NpyFile, p)
        self.assertLibsaeError(libsae.EIO, "missing", libsae.NpyFile, os.path.join(d, "missing"))
        with self.assertRaisesRegex(TypeError, "cols is required"):
            libsae.save_npy(p, [1.0, 2.0])
        self.assertLibsaeError(libsae.EIO, "no-dir", libsae.save_npy,
                               os.path.join(d, "no-dir", "x.npy"), np.zeros((2, 2), np.float32))


if __name__ == "__main__":
    unittest.main()


def read_safetensors(path):
    """A minimal independent safetensors reader (F32 only): {name: array}."""
    import json
    import struct
    with open(path, "rb") as f:
        data = f.read()
    (hlen,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8:8 + hlen])
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        assert t["dtype"] == "F32", t["dtype"]
        a, b = t["data_offsets"]
        out[name] = np.frombuffer(data[8 + hlen + a:8 + hlen + b], "<f4").reshape(t["shape"])
    return out


DATA = os.environ.get("SAE_DATA_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                   "..", "..", "..", "shared", "data"))
OTHELLO = os.path.join(DATA, "othello_sae_128")


@unittest.skipIf(np is None or not os.path.isdir(OTHELLO), "needs numpy and the othello SAE")
class TestRealSAE(TestCase):
    def test_saelens_folder_matches_its_weights(self):
        try:
            m = libsae.Model.load(OTHELLO)
        except libsae.LibsaeError as e:
            if e.code == libsae.EUNSUPPORTED:
                self.skipTest(f"this libsae does not read SAELens folders yet: {e.message}")
            raise
        w = read_safetensors(os.path.join(OTHELLO, "sae_weights.safetensors"))
        self.assertEqual((m.format, m.arch, m.d_in, m.d_sae), ("saelens", "relu", 128, 128))
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            np.testing.assert_array_equal(m.get_tensor(name), w[name])
        x = np.random.default_rng(61).standard_normal((16, 128)).astype(np.float32)
        w64 = {n: v.astype(np.float64) for n, v in w.items()}
        self.assertClose(m.encode(x), ref_encode(m, w64, x))
        self.assertClose(m.reconstruct(x), ref_decode(m, w64, ref_encode(m, w64, x)))
