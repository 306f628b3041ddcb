"""The package without numpy: buffers in, array.array out, against pure-Python float64 loops.

These tests run under a Python that has no numpy (tests/run uses pyenv's python3 when it has
none). Under a Python with numpy, NoNumpyChild runs this file again in a child interpreter in
which `import numpy` fails (sys.modules["numpy"] = None), so both paths run everywhere.
"""
import array
import math
import os
import subprocess
import sys
import unittest

from _support import HERE, TestCase, libsae, subprocess_env, tmpdir

U32 = libsae._buffers.U32


def ref_encode(m, w, x, n):
    """Pure-Python float64 version of the contract's encoder, token by token."""
    d_in, d_sae, arch = m.d_in, m.d_sae, m.arch
    scale, apply_b = m.input_scale, 1.0 if m.apply_b_dec_to_input else 0.0
    out = []
    for t in range(n):
        xs = [scale * x[t * d_in + j] - apply_b * w["b_dec"][j] for j in range(d_in)]
        pre = [math.fsum(xs[j] * w["W_enc"][j * d_sae + i] for j in range(d_in)) + w["b_enc"][i]
               for i in range(d_sae)]
        if arch == "relu":
            f = [max(p, 0.0) for p in pre]
        elif arch == "jumprelu":
            f = [p if p > w["threshold"][i] and p > 0 else 0.0 for i, p in enumerate(pre)]
        elif arch == "batchtopk":
            f = [p if p > m.threshold and p > 0 else 0.0 for p in pre]
        else:
            keep = sorted(range(d_sae), key=lambda i: (-pre[i], i))[:m.k]
            f = [0.0] * d_sae
            for i in keep:
                f[i] = max(pre[i], 0.0)
        out.extend(f)
    return out


def ref_decode(m, w, f, n):
    d_in, d_sae = m.d_in, m.d_sae
    return [(math.fsum(f[t * d_sae + i] * w["W_dec"][i * d_in + j] for i in range(d_sae))
             + w["b_dec"][j]) / m.input_scale for t in range(n) for j in range(d_in)]


def lcg(seed):
    """A small deterministic generator of floats in [-1, 1)."""
    state = seed
    while True:
        state = (state * 6364136223846793005 + 1442695040888963407) % 2 ** 64
        yield (state >> 11) / 2 ** 52 - 1.0


def random_model(arch, d_in, d_sae, seed=0, **kw):
    g = lcg(seed)
    m = libsae.Model.new(arch, d_in, d_sae, **kw)
    w = {}
    names = ["W_enc", "W_dec", "b_enc", "b_dec"] + (["threshold"] if arch == "jumprelu" else [])
    for name in names:
        count = math.prod(m.tensor_shape(name))
        vals = array.array("f", (next(g) for _ in range(count)))
        if name == "threshold":
            vals = array.array("f", (abs(v) * 0.3 for v in vals))
        m.set_tensor(name, vals)
        w[name] = list(vals)  # float32 values as float64
    return m, w


def run_expected():
    return os.environ.get("LIBSAE_EXPECT_NO_NUMPY") == "1"


@unittest.skipIf(libsae.HAVE_NUMPY and not run_expected(), "numpy is importable here: "
                 "NoNumpyChild runs these in a child without it")
class NoNumpy(TestCase):
    def assertAllClose(self, got, want, tol=1e-4):
        self.assertEqual(len(got), len(want))
        scale = max([1.0] + [abs(v) for v in want])
        for i, (a, b) in enumerate(zip(got, want)):
            self.assertLessEqual(abs(a - b), tol * scale, f"element {i}: {a} != {b}")

    def test_numpy_is_really_absent(self):
        self.assertFalse(libsae.HAVE_NUMPY)
        with self.assertRaises(ImportError):
            import numpy  # noqa: F401

    def test_encode_decode_every_arch(self):
        g = lcg(7)
        for arch in ("relu", "topk", "batchtopk", "jumprelu"):
            kw = {"k": 3} if arch in ("topk", "batchtopk") else {}
            m, w = random_model(arch, 6, 10, seed=3, input_scale=1.5, **kw)
            x = array.array("f", (next(g) * 2 for _ in range(4 * 6)))
            with self.subTest(arch=arch):
                f = m.encode(x)
                self.assertIsInstance(f, array.array)
                self.assertEqual((f.typecode, len(f)), ("f", 40))
                self.assertAllClose(f, ref_encode(m, w, list(x), 4))
                xh = m.decode(f)
                self.assertIsInstance(xh, array.array)
                self.assertAllClose(xh, ref_decode(m, w, list(f), 4))
                self.assertAllClose(m.reconstruct(x), xh)
                idx, val, count = m.encode_sparse(x, 4)
                self.assertEqual((idx.typecode, val.typecode, count.typecode), (U32, "f", U32))
                self.assertEqual((len(idx), len(val), len(count)), (16, 16, 4))
                for t in range(4):
                    row = f[t * 10:(t + 1) * 10]
                    nz = sorted((i for i in range(10) if row[i] != 0), key=lambda i: (-row[i], i))
                    self.assertEqual(count[t], min(len(nz), 4))
                    self.assertEqual(list(idx[t * 4:t * 4 + count[t]]), nz[:4])
                self.assertAllClose(m.decode_sparse(idx, val, count),
                                    m.decode(_dense(idx, val, count, 4, 10)))

    def test_buffers_of_every_kind(self):
        m, w = random_model("relu", 4, 5, seed=4)
        x = array.array("f", [0.5, -1.0, 2.0, 0.25, 1.0, 1.0, -1.0, 0.0])
        want = ref_encode(m, w, list(x), 2)
        writable = memoryview(bytearray(x.tobytes())).cast("f")
        for obj in (x, writable, memoryview(x.tobytes()).cast("f"),  # read-only: copied once
                    writable.cast("B").cast("f", (2, 4)),             # 2-D
                    array.array("d", x), [list(x[:4]), list(x[4:])], list(x)):
            with self.subTest(kind=type(obj).__name__):
                self.assertAllClose(m.encode(obj), want)
        with self.assertRaisesRegex(ValueError, "whole number of rows"):
            m.encode(array.array("f", [1.0] * 7))
        with self.assertRaisesRegex(ValueError, "rows of 4"):
            m.encode(memoryview(bytearray(24)).cast("f", (2, 3)))
        with self.assertRaisesRegex(TypeError, "buffer of float32"):
            m.encode(42)
        out = array.array("f", bytes(40))
        self.assertIs(m.encode(x, out=out), out)
        self.assertAllClose(out, want)
        with self.assertRaisesRegex(TypeError, "float32"):
            m.encode(x, out=array.array("d", bytes(80)))

    def test_tensors(self):
        m, w = random_model("jumprelu", 3, 4, seed=5)
        for name in w:
            got = m.get_tensor(name)
            self.assertIsInstance(got, array.array)
            self.assertEqual(list(got), w[name])
        with self.assertRaisesRegex(ValueError, "expected 12 values"):
            m.set_tensor("W_enc", array.array("f", [0.0] * 11))
        bad = array.array("f", [0.0] * 12)
        bad[5] = float("nan")
        self.assertLibsaeError(libsae.EINVAL, "W_enc", m.set_tensor, "W_enc", bad)

    @unittest.skipIf(not libsae.has("sae_steer_new"), "needs steering")
    def test_steering_in_place(self):
        m, w = random_model("relu", 4, 5, seed=6)
        x = array.array("f", [0.5, -1.0, 2.0, 0.25])
        y = array.array("f", x)
        s = libsae.Steering(m).add(2, 1.5)
        self.assertIs(s.apply(y), y)
        want = [x[j] + 1.5 * w["W_dec"][2 * 4 + j] for j in range(4)]
        self.assertAllClose(y, want)
        with self.assertRaisesRegex(TypeError, "in place"):
            s.apply(array.array("d", x))
        with self.assertRaisesRegex(TypeError, "in place"):
            s.apply(x.tobytes())
        with self.assertRaisesRegex(TypeError, "in place"):
            s.apply(list(x))
        self.assertIsInstance(s.vector(), array.array)

    @unittest.skipIf(not libsae.has("sae_stats_new"), "needs statistics")
    def test_stats(self):
        st = libsae.Stats(3, 2).update(array.array("f", [1, 0, 2, 3, 0, 0]))
        self.assertEqual(list(st.counts()), [2, 0, 1])
        self.assertEqual(st.counts().typecode, "Q")
        self.assertEqual(list(st.sums()), [4.0, 0.0, 2.0])
        val, ids = st.top(0)
        self.assertEqual((list(val), list(ids)), ([3.0, 1.0], [1, 0]))

    def test_npy_and_cli_without_numpy(self):
        d = tmpdir(self)
        m, w = random_model("topk", 4, 6, seed=8, k=2)
        mp = os.path.join(d, "m.safetensors")
        m.save(mp)
        x = array.array("f", [0.5, -1.0, 2.0, 0.25, 1.0, 1.0, -1.0, 0.0])
        p = os.path.join(d, "acts.npy")
        libsae.save_npy(p, x, cols=4)
        back = libsae.load_npy(p)
        self.assertEqual((back.typecode, list(back)), ("f", list(x)))
        r = subprocess.run([sys.executable, "-m", "libsae", "top", mp, p, "-k", "2"],
                           capture_output=True, text=True, env=subprocess_env())
        self.assertEqual(r.returncode, 0, r.stderr)
        idx, val, count = m.encode_sparse(x, 2)
        want = [f"{t}\t" + " ".join(f"{idx[t * 2 + j]}:{val[t * 2 + j]:.4g}"
                                    for j in range(count[t])) for t in range(2)]
        self.assertEqual(r.stdout.splitlines(), want)
        r = subprocess.run([sys.executable, "-m", "libsae", "info", mp], capture_output=True,
                           text=True, env=subprocess_env())
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("topk", r.stdout)


    def test_transcoder_with_skip_and_layer_norm(self):
        # x [n][4] -> f [n][6] -> y [n][3] = f @ W_dec + b_dec + x @ W_skip, raw x in the skip
        d_in, d_sae, d_out, n = 4, 6, 3, 5
        m = libsae.Model.new_transcoder("relu", d_in, d_sae, d_out, skip=True,
                                        normalize="layer_norm")
        self.assertEqual((m.d_out, m.is_transcoder, m.normalize), (3, True, "layer_norm"))
        self.assertEqual([t for t in libsae.TENSORS if m.has_tensor(t)],
                         ["W_enc", "W_dec", "b_enc", "b_dec", "W_skip"])
        g = lcg(21)
        w = {}
        for name in ("W_enc", "W_dec", "b_enc", "b_dec", "W_skip"):
            vals = array.array("f", (next(g) for _ in range(math.prod(m.tensor_shape(name)))))
            m.set_tensor(name, vals)
            w[name] = list(vals)
        x = array.array("f", (next(g) * 3 + 0.5 for _ in range(n * d_in)))
        f_ref, y_ref = [], []
        for t in range(n):
            row = x[t * d_in:(t + 1) * d_in]
            mu = math.fsum(row) / d_in
            sigma = math.sqrt(math.fsum((v - mu) ** 2 for v in row) / (d_in - 1))
            xn = [(v - mu) / (sigma + 1e-5) for v in row]
            f = [max(math.fsum(xn[j] * w["W_enc"][j * d_sae + i] for j in range(d_in))
                     + w["b_enc"][i], 0.0) for i in range(d_sae)]
            f_ref.extend(f)
            y_ref.extend(math.fsum(f[i] * w["W_dec"][i * d_out + o] for i in range(d_sae))
                         + w["b_dec"][o]
                         + math.fsum(row[j] * w["W_skip"][j * d_out + o] for j in range(d_in))
                         for o in range(d_out))
        f = m.encode(x)
        self.assertAllClose(f, f_ref)
        y_hat = m.reconstruct(x)
        self.assertIsInstance(y_hat, array.array)
        self.assertEqual(len(y_hat), n * d_out)
        self.assertAllClose(y_hat, y_ref)
        dec = m.decode(f)
        self.assertEqual(len(dec), n * d_out)
        self.assertAllClose(dec, [y_ref[t * d_out + o] - math.fsum(
            x[t * d_in + j] * w["W_skip"][j * d_out + o] for j in range(d_in))
            for t in range(n) for o in range(d_out)])
        with self.assertRaisesRegex(ValueError, "expected 15 float32 values, got 20"):
            m.reconstruct(x, out=array.array("f", bytes(4 * n * d_in)))  # d_in, not d_out
        out = array.array("f", bytes(4 * n * d_out))
        self.assertIs(m.reconstruct(x, out=out), out)
        norms = m.decoder_norms()
        self.assertAllClose(norms, [math.sqrt(math.fsum(v * v for v in
                                                        w["W_dec"][i * d_out:(i + 1) * d_out]))
                                    for i in range(d_sae)])
        # evaluate against a target, and apply_to steering that target
        y = array.array("f", (next(g) for _ in range(n * d_out)))
        mse = math.fsum((y[k] - y_ref[k]) ** 2 for k in range(n * d_out)) / n
        self.assertAlmostEqual(m.evaluate(x, y, metrics=("mse",))["mse"], mse,
                               delta=1e-4 * max(1, mse))
        if libsae.has("sae_steer_apply_to"):
            y2 = array.array("f", y)
            s = libsae.Steering(m).clamp(2, 1.5)
            self.assertIs(s.apply_to(x, y2), y2)
            want = [y[t * d_out + o] + (1.5 - f_ref[t * d_sae + 2]) * w["W_dec"][2 * d_out + o]
                    for t in range(n) for o in range(d_out)]
            self.assertAllClose(y2, want)
            with self.assertRaisesRegex(TypeError, "in place"):
                s.apply_to(x, list(y))
            with self.assertRaisesRegex(ValueError, "x has 5 tokens but y has 4"):
                s.apply_to(x, array.array("f", y[:12]))
        # and the CLI describes it without numpy, its norms from the library
        d = tmpdir(self)
        mp = os.path.join(d, "t.safetensors")
        m.save(mp)
        r = subprocess.run([sys.executable, "-m", "libsae", "info", mp], capture_output=True,
                           text=True, env=subprocess_env())
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertIn("kind          transcoder with skip connection", r.stdout)
        self.assertIn("d_out 3", r.stdout)
        self.assertIn(f"norm min {min(norms):.6g}, mean {math.fsum(norms) / d_sae:.6g}, "
                      f"max {max(norms):.6g}", r.stdout)


def _dense(idx, val, count, k, d_sae):
    f = array.array("f", bytes(4 * d_sae * len(count)))
    for t in range(len(count)):
        for j in range(count[t]):
            f[t * d_sae + idx[t * k + j]] = val[t * k + j]
    return f


@unittest.skipIf(not libsae.HAVE_NUMPY, "this interpreter has no numpy: NoNumpy runs here")
class NoNumpyChild(unittest.TestCase):
    def test_no_numpy_path_in_a_child_interpreter(self):
        # The child makes `import numpy` fail before anything imports it (python -I ignores
        # PYTHONPATH, so the tests folder is put on sys.path by hand).
        code = ("import sys; sys.modules['numpy'] = None; sys.path.insert(0, %r); "
                "import unittest; unittest.main(module='test_no_numpy', argv=['x', 'NoNumpy'])"
                % HERE)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=subprocess_env(LIBSAE_EXPECT_NO_NUMPY="1"), cwd=HERE)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertRegex(r.stderr, r"Ran [1-9]\d* tests")
        self.assertIn("OK", r.stderr)


if __name__ == "__main__":
    unittest.main()
