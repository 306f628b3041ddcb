"""The trainer's bindings, against what include/sae.h promises (the recipes themselves are tested
in C, tests/test_train*.c)."""
import os
import unittest

from _support import TestCase, libsae, np, tmpdir


def planted(n, d_in=16, n_dirs=48, seed=51):
    """Sparse non-negative combinations of fixed random directions."""
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((n_dirs, d_in))
    codes = rng.random((n, n_dirs)) * (rng.random((n, n_dirs)) < 4 / n_dirs)
    return (codes @ dirs).astype(np.float32)


def weights(m):
    return {name: m.get_tensor(name) for name in ("W_enc", "W_dec", "b_enc", "b_dec")}


@unittest.skipIf(np is None or not libsae.has("sae_trainer_new"), "needs numpy and the trainer")
class TestTrainer(TestCase):
    def trainer(self, arch="topk", seed=0, **params):
        m = libsae.Model.new(arch, 16, 64, **({"k": 4} if arch in ("topk", "batchtopk") else {}))
        return m, libsae.Trainer(m, seed=seed, **params)

    def test_params_by_name(self):
        m, t = self.trainer(lr=1e-3, auxk_coeff=0.5, total_steps=100)
        self.assertEqual(t.get_param("lr"), 1e-3)
        self.assertEqual(t.get_param("auxk_coeff"), 0.5)
        self.assertEqual(t.get_param("total_steps"), 100)
        self.assertEqual(set(t.params()), set(libsae.TRAIN_PARAMS))
        t.set_param("beta2", 0.99)
        self.assertEqual(t.get_param("beta2"), 0.99)
        self.assertLibsaeError(libsae.EINVAL, "", t.set_param, "beta1", 1.0)
        with self.assertRaisesRegex(KeyError, "unknown training parameter 'learning_rate'"):
            libsae.Trainer(m, learning_rate=1.0)

    def test_state_errors(self):
        m, t = self.trainer()
        x = planted(64)
        self.assertEqual(t.metrics(), {"steps": 0, "tokens": 0, "warnings": 0})
        self.assertLibsaeError(libsae.ESTATE, "", t.step, x)
        j = libsae.Model.new("gated", 4, 8)
        self.assertLibsaeError(libsae.EUNSUPPORTED, "", libsae.Trainer, j)
        t.init(x)
        bad = x.copy()
        bad[3, 2] = np.nan
        self.assertLibsaeError(libsae.EINVAL, "", t.step, bad)
        with self.assertRaisesRegex(ValueError, "expected shape"):
            t.step(np.zeros((4, 15), np.float32))

    def test_step_metrics_describe_the_batch(self):
        for arch in ("relu", "topk", "batchtopk"):
            with self.subTest(arch=arch):
                m, t = self.trainer(arch)
                x = planted(256)
                t.init(x)
                metrics = t.step(x)
                for key in ("loss", "mse", "fvu", "l0", "dead_fraction", "steps", "tokens"):
                    self.assertIn(key, metrics)
                self.assertEqual((metrics["steps"], metrics["tokens"]), (1, 256))
                self.assertIsInstance(metrics["steps"], int)
                # FVU and MSE describe the same forward pass: fvu * SS(x - mean) = mse * n
                ss = float(((x.astype(np.float64) - x.mean(0)) ** 2).sum())
                self.assertAlmostEqual(metrics["fvu"] * ss / (metrics["mse"] * 256), 1.0,
                                       places=3)
                self.assertEqual(t.metrics(), metrics)

    def test_training_reduces_the_error(self):
        m, t = self.trainer("topk", total_steps=300)
        data = planted(256 * 300)
        t.init(data[:4096])
        first = t.step(data[:256])["fvu"]
        for s in range(1, 300):
            last = t.step(data[s * 256:(s + 1) * 256])["fvu"]
        self.assertLess(last, 0.5 * first)

    def test_transcoder_learns_its_target(self):
        """A skip transcoder trains from pairs (x, y): the FVU of y falls, W_skip moves, and the
        SAE entry points (no y) are refused with a message naming the _to variants."""
        x = planted(4096)
        rng = np.random.default_rng(3)
        y = (np.maximum(x[:, :12], 0) * 2 + x[:, 4:16] @ rng.standard_normal((12, 12)) * 0.3
             ).astype(np.float32)
        m = libsae.Model.new_transcoder("topk", 16, 64, 12, skip=True, k=4)
        t = libsae.Trainer(m, lr=5e-3, seed=0)
        self.assertLibsaeError(libsae.EINVAL, "sae_trainer_init_to", t.init, x[:1024])
        t.init(x[:1024], y[:1024])
        first = t.step(x[:256], y[:256])["fvu"]
        for i in range(1, 16):
            last = t.step(x[256 * i:256 * (i + 1)], y[256 * i:256 * (i + 1)])["fvu"]
        self.assertLess(last, 0.7 * first)
        self.assertGreater(float(np.abs(m.get_tensor("W_skip")).sum()), 0.0)
        self.assertLibsaeError(libsae.EINVAL, "sae_trainer_step_to", t.step, x[:256])
        with self.assertRaisesRegex(ValueError, "x has 256 tokens but y has 128"):
            t.step(x[:256], y[:128])

    def test_same_seed_same_weights(self):
        x = planted(512)
        runs = []
        for _ in range(2):
            m, t = self.trainer(seed=7)
            t.init(x)
            for s in range(4):
                t.step(x[s * 128:(s + 1) * 128])
            runs.append(weights(m))
        for name in runs[0]:
            np.testing.assert_array_equal(runs[0][name], runs[1][name])

    def test_checkpoint_resumes_bit_for_bit(self):
        d = tmpdir(self)
        x = planted(1024)
        m, t = self.trainer(seed=3)
        t.init(x)
        for s in range(3):
            t.step(x[s * 128:(s + 1) * 128])
        ckpt = os.path.join(d, "ckpt.safetensors")
        t.save(ckpt)
        for s in range(3, 6):
            t.step(x[s * 128:(s + 1) * 128])
        m2, t2 = self.trainer(seed=99)
        t2.load(ckpt)
        self.assertEqual(t2.metrics()["steps"], 3)
        for s in range(3, 6):
            t2.step(x[s * 128:(s + 1) * 128])
        for name, v in weights(m).items():
            np.testing.assert_array_equal(m2.get_tensor(name), v)
        self.assertEqual(libsae.Model.load(ckpt).arch, "topk")  # also a plain model file
        self.assertLibsaeError(libsae.EIO, "", t2.load, os.path.join(d, "missing"))

    def test_allreduce_hook(self):
        x = planted(256)
        m1, t1 = self.trainer(seed=5)
        t1.init(x)
        t1.step(x)
        m2, t2 = self.trainer(seed=5)
        calls = []
        t2.set_allreduce(lambda buf: calls.append(buf.size))  # one process: the sum is itself
        t2.init(x)
        t2.step(x)
        self.assertEqual(len(calls), 1)
        for name, v in weights(m1).items():
            self.assertClose(m2.get_tensor(name), v, atol=1e-6, rtol=1e-6)
        before = weights(m2)

        def broken(buf):
            raise RuntimeError("the network is down")

        t2.set_allreduce(broken)
        self.assertLibsaeError(libsae.ECALLBACK, "", t2.step, x)
        for name, v in before.items():  # a failed step changes nothing
            np.testing.assert_array_equal(m2.get_tensor(name), v)
        t2.set_allreduce(None)
        t2.step(x)


if __name__ == "__main__":
    unittest.main()
