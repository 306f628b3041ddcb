"""JumpReLU and Matryoshka training through the bindings and python3 -m libsae train (the
recipes' gradients and recovery are tested in C, tests/test_train_recipes.c)."""
import os
import subprocess
import sys
import unittest

from _support import TestCase, libsae, np, subprocess_env, tmpdir


def planted(n, d_in=16, n_dirs=48, seed=51):
    """Sparse non-negative combinations of fixed random directions."""
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((n_dirs, d_in))
    codes = rng.random((n, n_dirs)) * (rng.random((n, n_dirs)) < 4 / n_dirs)
    return (codes @ dirs).astype(np.float32)


def run(*args):
    r = subprocess.run([sys.executable, "-m", "libsae", *map(str, args)], capture_output=True,
                       text=True, env=subprocess_env(), timeout=300)
    return r.returncode, r.stdout, r.stderr


@unittest.skipIf(np is None or not libsae.has("sae_trainer_set_groups"),
                 "needs numpy and a trainer with the 2025 recipes")
class TestRecipes(TestCase):
    def test_groups(self):
        m = libsae.Model.new("batchtopk", 16, 64, k=4)
        t = libsae.Trainer(m, groups=[8, 24, 32], lr=1e-3)
        self.assertEqual(t.groups(), [8, 24, 32])
        self.assertLibsaeError(libsae.EINVAL, "sum to 40", t.set_groups, [8, 32])
        self.assertEqual(t.groups(), [8, 24, 32])
        with self.assertRaises(ValueError):
            t.set_groups([0, 64])
        t.set_groups(None)
        self.assertEqual(t.groups(), [])
        topk = libsae.Model.new("topk", 16, 64, k=4)
        self.assertLibsaeError(libsae.EUNSUPPORTED, "BatchTopK", libsae.Trainer, topk,
                               groups=[32, 32])

    def test_matryoshka_trains_and_resumes(self):
        x = planted(2048)
        m = libsae.Model.new("batchtopk", 16, 64, k=4)
        t = libsae.Trainer(m, groups=[16, 48], lr=3e-3, seed=2)
        t.init(x)
        first = t.step(x[:256])
        for s in range(1, 40):
            last = t.step(x[(s * 256) % 2048:(s * 256) % 2048 + 256])
        self.assertLess(last["fvu"], first["fvu"])
        self.assertGreaterEqual(last["prefix_fvu"], last["fvu"])
        path = os.path.join(tmpdir(self), "mat.ckpt")
        t.save(path)
        m2 = libsae.Model.new("batchtopk", 16, 64, k=4)
        t2 = libsae.Trainer(m2)
        t2.load(path)
        self.assertEqual(t2.groups(), [16, 48])
        a, b = t.step(x[:256]), t2.step(x[:256])
        self.assertEqual(a["loss"], b["loss"])
        np.testing.assert_array_equal(m.get_tensor("W_dec"), m2.get_tensor("W_dec"))
        # The model is BatchTopK in its threshold form, which a plain load reads back.
        self.assertGreater(m.get_param("threshold"), 0)

    def test_jumprelu_trains_its_thresholds(self):
        x = planted(2048)
        m = libsae.Model.new("jumprelu", 16, 64)
        t = libsae.Trainer(m, lr=3e-3, l0_coeff=0.5, jumprelu_init_threshold=0.1)
        self.assertEqual(t.get_param("beta1"), 0.0)
        t.init(x)
        np.testing.assert_allclose(m.get_tensor("threshold"), 0.1, rtol=1e-6)
        for s in range(60):
            metrics = t.step(x[(s * 256) % 2048:(s * 256) % 2048 + 256])
        th = m.get_tensor("threshold")
        self.assertTrue((th > 0).all())
        self.assertAlmostEqual(metrics["threshold_mean"], float(th.mean()), places=5)
        self.assertAlmostEqual(metrics["sparsity_loss"], 0.5 * metrics["l0"], places=4)
        self.assertGreater(float(th.max()), 0.1)  # the L0 penalty raised thresholds


@unittest.skipIf(np is None or not libsae.has("sae_trainer_set_groups"),
                 "needs numpy and a trainer with the 2025 recipes")
class TestCliRecipes(TestCase):
    def setUp(self):
        self.d = tmpdir(self)
        self.acts = os.path.join(self.d, "train.npy")
        np.save(self.acts, planted(2048, d_in=8, n_dirs=24, seed=44))

    def test_matryoshka(self):
        out = os.path.join(self.d, "mat.safetensors")
        rc, _, err = run("train", self.acts, out, "--arch", "matryoshka", "-k", 4, "--d-sae",
                         64, "--steps", 20, "--batch-size", 128)
        self.assertEqual(rc, 0, err)
        m = libsae.Model.load(out)
        self.assertEqual((m.arch, m.d_sae, m.k), ("batchtopk", 64, 4))
        rc, _, err = run("train", self.acts, out, "--arch", "matryoshka", "--groups", "16,16",
                         "--d-sae", 64, "--steps", 2, "--batch-size", 128)
        self.assertNotEqual(rc, 0)
        self.assertIn("sum to 32, not d_sae = 64", err)
        rc, _, err = run("train", self.acts, out, "--arch", "topk", "--groups", "32,32",
                         "--d-sae", 64, "--steps", 2, "--batch-size", 128)
        self.assertNotEqual(rc, 0)
        self.assertIn("--groups applies to matryoshka", err)

    def test_jumprelu(self):
        out = os.path.join(self.d, "jr.safetensors")
        rc, _, err = run("train", self.acts, out, "--arch", "jumprelu", "--d-sae", 64, "--steps",
                         20, "--batch-size", 128, "--lr", 3e-3, "--l0-coeff", 0.3,
                         "--jumprelu-bandwidth", 0.1)
        self.assertEqual(rc, 0, err)
        m = libsae.Model.load(out)
        self.assertEqual((m.arch, m.d_sae), ("jumprelu", 64))
        self.assertTrue((m.get_tensor("threshold") > 0).all())


if __name__ == "__main__":
    unittest.main()
