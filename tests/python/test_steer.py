"""Steering, statistics and neighbours against float64 numpy references."""
import os
import struct
import unittest

from _support import ARCHS, TestCase, libsae, np, random_model, ref_encode, tmpdir


def ref_steer(m, w, x, ops):
    """API.md: x' = x + sum_i (f_i' - f_i(x)) W_dec[i] / scale for clamp and scale ops, plus
    coeff * W_dec[i] / scale for add ops. ops: {feature: (kind, value)} (the last op wins)."""
    x = np.asarray(x, np.float64)
    f = ref_encode(m, w, x)
    out = x.copy()
    for i, (kind, v) in ops.items():
        if kind == "clamp":
            out += np.outer(v - f[:, i], w["W_dec"][i]) / m.input_scale
        elif kind == "scale":
            out += np.outer(v * f[:, i] - f[:, i], w["W_dec"][i]) / m.input_scale
        else:
            out += v * w["W_dec"][i] / m.input_scale
    return out


@unittest.skipIf(np is None or not libsae.has("sae_steer_new"), "needs numpy and steering")
class TestSteering(TestCase):
    def model(self, arch, **kw):
        if arch in ("topk", "batchtopk"):
            kw.setdefault("k", 6)
        return random_model(arch, 16, 40, seed=21, input_scale=kw.pop("input_scale", 1.0), **kw)

    def test_every_op_and_mix_matches_reference(self):
        rng = np.random.default_rng(22)
        for arch in ARCHS:
            for scale in (1.0, 0.5):
                m, w = self.model(arch, input_scale=scale)
                x = rng.standard_normal((7, 16)).astype(np.float32) * 2
                f = m.encode(x)
                active = int(np.argmax(f.sum(0)))  # a feature that fires, so clamps matter
                cases = [
                    {active: ("clamp", 5.0)},
                    {active: ("clamp", 0.0)},  # ablation
                    {active: ("scale", 3.0)},
                    {2: ("add", -1.5)},
                    {active: ("clamp", 4.0), 2: ("add", 0.5), (active + 1) % 40: ("scale", 0.0)},
                ]
                for ops in cases:
                    with self.subTest(arch=arch, scale=scale, ops=ops):
                        s = libsae.Steering(m)
                        for i, (kind, v) in ops.items():
                            self.assertIs(getattr(s, kind)(i, v), s)  # chainable
                        y = x.copy()
                        self.assertIs(s.apply(y), y)  # in place, returns x
                        self.assertClose(y, ref_steer(m, w, x, ops), atol=2e-4)

    def test_chain_last_op_wins_ops_remove_clear(self):
        m, w = self.model("relu")
        s = libsae.Steering(m).clamp(3, 1.0).scale(3, 2.0).add(1, -1.0).ablate(7)
        self.assertEqual(len(s), 3)
        self.assertEqual(s.ops(), [(1, "add", -1.0), (3, "scale", 2.0), (7, "clamp", 0.0)])
        x = np.random.default_rng(23).standard_normal((4, 16)).astype(np.float32)
        want = ref_steer(m, w, x, {1: ("add", -1.0), 3: ("scale", 2.0), 7: ("clamp", 0.0)})
        self.assertClose(s.apply(x.copy()), want)
        s.remove(3).remove(5)
        self.assertEqual([op[0] for op in s.ops()], [1, 7])
        s.clear()
        self.assertEqual(len(s), 0)
        y = x.copy()
        np.testing.assert_array_equal(s.apply(y), x)
        self.assertIn("empty", repr(s))

    def test_leading_axes_and_empty(self):
        m, w = self.model("jumprelu")
        s = libsae.Steering(m).clamp(0, 2.0)
        x = np.random.default_rng(24).standard_normal((2, 3, 16)).astype(np.float32)
        want = ref_steer(m, w, x.reshape(6, 16), {0: ("clamp", 2.0)}).reshape(2, 3, 16)
        self.assertClose(s.apply(x), want)
        self.assertEqual(s.apply(np.zeros((0, 16), np.float32)).shape, (0, 16))

    def test_apply_refuses_what_it_cannot_change_in_place(self):
        m, _ = self.model("relu")
        s = libsae.Steering(m).clamp(0, 1.0)
        x = np.zeros((2, 16))
        with self.assertRaisesRegex(TypeError, "in place.*float32.*float64"):
            s.apply(x)
        with self.assertRaisesRegex(TypeError, "contiguous=False"):
            s.apply(np.zeros((16, 2), np.float32).T)
        ro = np.zeros((2, 16), np.float32)
        ro.flags.writeable = False
        with self.assertRaisesRegex(TypeError, "writable=False"):
            s.apply(ro)
        with self.assertRaisesRegex(TypeError, "in place"):
            s.apply([[0.0] * 16])
        with self.assertRaisesRegex(ValueError, r"\[\.\.\., 16\]"):
            s.apply(np.zeros((2, 15), np.float32))

    def test_errors(self):
        m, _ = self.model("relu")
        s = libsae.Steering(m)
        self.assertLibsaeError(libsae.ERANGE, "40", s.clamp, 40, 1.0)
        # past uint32 it is refused in Python, naming the argument (C would see another index)
        with self.assertRaisesRegex(ValueError, "feature must be at most 4294967295, not 1099511627776"):
            s.clamp(2 ** 40, 1.0)
        self.assertLibsaeError(libsae.EINVAL, "", s.scale, 1, float("nan"))
        self.assertLibsaeError(libsae.EINVAL, "", s.add, 1, float("inf"))
        with self.assertRaises(ValueError):
            s.clamp(-1, 1.0)
        with self.assertRaises(TypeError):
            libsae.Steering("model")
        x = np.zeros((2, 16), np.float32)
        x[1, 3] = np.nan
        s.clamp(0, 1.0)
        self.assertLibsaeError(libsae.EINVAL, "", s.apply, x)
        self.assertLibsaeError(libsae.ESTATE, "", s.vector)

    def test_vector_and_clamp_relative(self):
        m, w = self.model("relu")
        s = libsae.Steering(m).add(4, 2.0).add(9, -0.5)
        self.assertClose(s.vector(), (2.0 * w["W_dec"][4] - 0.5 * w["W_dec"][9]))
        mx = np.linspace(0.5, 4.5, 40).astype(np.float32)
        r = libsae.Steering(m).clamp_relative(5, 10.0, max=mx)
        self.assertEqual(r.ops()[0][:2], (5, "clamp"))
        self.assertAlmostEqual(r.ops()[0][2], 10.0 * float(mx[5]), places=4)
        x = np.random.default_rng(25).standard_normal((50, 16)).astype(np.float32) * 3
        st = libsae.Stats(40, 4).update(m.encode(x))
        r2 = libsae.Steering(m).clamp_relative(5, -2.0, stats=st)
        self.assertAlmostEqual(r2.ops()[0][2], -2.0 * float(st.max()[5]), places=4)
        self.assertLibsaeError(libsae.EINVAL, "", libsae.Steering(m).clamp_relative, 5, 1.0)

    def test_control_vector_file(self):
        m, w = self.model("relu")
        d = tmpdir(self)
        p = os.path.join(d, "steer.gguf")
        libsae.Steering(m).add(4, 2.0).write_cvec(p, layer=2, n_layer=4, model_hint="llama")
        with open(p, "rb") as f:
            data = f.read()
        self.assertEqual(data[:4], b"GGUF")
        self.assertEqual(struct.unpack_from("<I", data, 4)[0], 3)
        self.assertIn(b"controlvector", data)
        self.assertIn(b"direction.2", data)
        p2 = os.path.join(d, "raw.gguf")
        libsae.write_cvec(p2, np.ones((3, 16), np.float32), 16, 4, None)
        with open(p2, "rb") as f:
            self.assertEqual(f.read(4), b"GGUF")
        with self.assertRaisesRegex(ValueError, "expected shape"):
            libsae.write_cvec(p2, np.ones((4, 16), np.float32), 16, 4)
        self.assertLibsaeError(libsae.ERANGE, "", libsae.Steering(m).add(1, 1.0).write_cvec,
                               p, 4, 4)


@unittest.skipIf(np is None or not libsae.has("sae_stats_new"), "needs numpy and statistics")
class TestStats(TestCase):
    def test_counts_sums_max_top_against_numpy(self):
        rng = np.random.default_rng(26)
        f = np.maximum(rng.standard_normal((30, 12)), 0).astype(np.float32)
        ids = np.arange(100, 130, dtype=np.uint64)
        st = libsae.Stats(12, top_n=3)
        st.update(f[:10], ids[:10]).update(f[10:], ids[10:])
        self.assertEqual((st.tokens, st.d_sae, st.top_n), (30, 12, 3))
        np.testing.assert_array_equal(st.counts(), (f > 0).sum(0))
        self.assertEqual(st.counts().dtype, np.uint64)
        self.assertClose(st.sums(), f.astype(np.float64).sum(0))
        np.testing.assert_array_equal(st.max(), f.max(0))
        for j in range(12):
            val, got_ids = st.top(j)
            order = np.argsort(-f[:, j], kind="stable")
            order = [t for t in order if f[t, j] > 0][:3]
            np.testing.assert_array_equal(val, f[order, j])
            np.testing.assert_array_equal(got_ids, ids[order])

    def test_sparse_update_and_merge_equal_one_pass(self):
        m, w = random_model("topk", 16, 40, k=5)
        x = np.random.default_rng(27).standard_normal((40, 16)).astype(np.float32)
        whole = libsae.Stats(40, 4).update(m.encode(x))
        a = libsae.Stats(40, 4).update_sparse(*m.encode_sparse(x[:25], 5), ids=np.arange(25))
        b = libsae.Stats(40, 4).update_sparse(*m.encode_sparse(x[25:], 5),
                                              ids=np.arange(25, 40))
        a.merge(b)
        np.testing.assert_array_equal(a.counts(), whole.counts())
        # the halves encode as other GEMM shapes than the whole: equal to float rounding
        self.assertClose(a.max(), whole.max(), atol=1e-5, rtol=1e-5)
        self.assertClose(a.sums(), whole.sums())
        for j in range(40):
            np.testing.assert_array_equal(a.top(j)[1], whole.top(j)[1])

    def test_errors(self):
        st = libsae.Stats(4, 2)
        self.assertLibsaeError(libsae.EINVAL, "", st.merge, libsae.Stats(5, 2))
        self.assertLibsaeError(libsae.ERANGE, "", st.top, 4)
        bad = np.zeros((1, 4), np.float32)
        bad[0, 1] = np.nan
        self.assertLibsaeError(libsae.EINVAL, "", st.update, bad)
        self.assertEqual(st.tokens, 0)  # all or nothing
        with self.assertRaisesRegex(ValueError, "expected shape"):
            st.update(np.zeros((2, 4), np.float32), ids=np.arange(3))


@unittest.skipIf(np is None or not libsae.has("sae_feature_neighbors"), "needs neighbours")
class TestNeighbors(TestCase):
    def test_cosines_against_numpy(self):
        m, w = random_model("relu", 16, 40)
        wd = w["W_dec"]
        unit = wd / np.linalg.norm(wd, axis=1, keepdims=True)
        for feature in (0, 17, 39):
            cos = unit @ unit[feature]
            cos[feature] = -np.inf
            want = np.argsort(-cos, kind="stable")[:5]
            idx, c = m.neighbors(feature, 5)
            np.testing.assert_array_equal(idx, want)
            self.assertClose(c, cos[want])
        self.assertLibsaeError(libsae.ERANGE, "", m.neighbors, 40, 3)
        self.assertLibsaeError(libsae.ERANGE, "", m.neighbors, 0, 40)


if __name__ == "__main__":
    unittest.main()
