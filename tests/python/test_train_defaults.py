"""Training without flags, and its diagnostics: `python3 -m libsae train --arch A ACTS OUT` on the
shipped aidreams260K activations (tests/test_train_defaults.c uses stories260K) reaches a
held-out FVU below 0.3 at L0 below 32 for every architecture, says how many passes it planned
and warns about nothing; runs that fail are warned about with the option to change; the
held-out metrics of Trainer equal Model.evaluate on the same tokens."""
import os
import re
import subprocess
import sys
import unittest

from _support import TestCase, libsae, np, subprocess_env, tmpdir

DATA_DIR = os.environ.get("SAE_DATA_DIR") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "data")
ACTS = os.path.join(DATA_DIR, "aidreams260K", "resid_layer2.npy")


def train(*args):
    r = subprocess.run([sys.executable, "-m", "libsae", "train", *map(str, args)],
                       capture_output=True, text=True, env=subprocess_env(), timeout=600)
    return r.returncode, r.stderr


@unittest.skipIf(np is None, "needs numpy to check the saved model")
class TestDefaultRuns(TestCase):
    def default_run(self, arch):
        out = os.path.join(tmpdir(self), "sae.safetensors")
        rc, err = train("--arch", arch, ACTS, out)
        self.assertEqual(rc, 0, err)
        self.assertNotIn("warning", err)
        x = np.load(ACTS)
        held = min(len(x) // 10, 8192)
        # The plan: 2048 tokens per latent (512 latents) over 44904 - 4490 rows is 26 passes,
        # at most 20: 20 * 40414 / 1024 -> 790 steps.
        self.assertIn(f"{arch} 64 -> 512: 790 steps of 1024 = 808,960 tokens, 20 passes over "
                      f"40,414 rows", err)
        self.assertIn(f"held out: the last {held:,} rows", err)
        self.assertRegex(err, r"pass 20\.0/20")
        got = re.search(r"held-out fvu ([0-9.]+), l0 ([0-9.]+)", err)
        self.assertIsNotNone(got, err)
        fvu, l0 = float(got.group(1)), float(got.group(2))
        self.assertLess(fvu, 0.3)
        self.assertLess(l0, 32)
        # What it printed is the saved model's FVU on the rows it held out.
        m = libsae.Model.load(out)
        ev = m.evaluate(x[-held:])
        self.assertAlmostEqual(ev["fvu"], fvu, places=4)
        self.assertAlmostEqual(ev["l0"], l0, places=1)
        if arch not in ("relu", "jumprelu"):
            self.assertEqual(m.k, 16)  # min(32, d_in / 4)

    def test_relu(self):
        self.default_run("relu")

    def test_topk(self):
        self.default_run("topk")

    def test_batchtopk(self):
        self.default_run("batchtopk")

    def test_jumprelu(self):
        self.default_run("jumprelu")

    def test_matryoshka(self):
        self.default_run("matryoshka")


@unittest.skipIf(np is None, "needs numpy")
class TestDiagnostics(TestCase):
    def test_cli_warns_naming_the_option(self):
        d = tmpdir(self)
        # Anthropic's long-run ReLU rate and coefficient on 200 short steps: FVU and L0 stay high.
        rc, err = train("--arch", "relu", "--lr", "5e-5", "--l1-coeff", "5", "--steps", "200",
                        "--batch-size", "256", ACTS, os.path.join(d, "r.safetensors"))
        self.assertEqual(rc, 0, err)
        self.assertIn("warning at step 51: FVU has stayed above 1", err)
        self.assertIn("--lr", err)
        self.assertIn("--l1-coeff", err)
        # TopK with K above a quarter of the latents: L0 only, naming --k.
        rc, err = train("--arch", "topk", "-k", "400", "--steps", "150", "--batch-size", "256",
                        ACTS, os.path.join(d, "t.safetensors"))
        self.assertEqual(rc, 0, err)
        # Not before warm-up (a quarter of 150 steps), then once L0 has stayed high for 10.
        got = re.search(r"warning at step (\d+): L0 has stayed above a quarter of the 512 "
                        r"latents", err)
        self.assertIsNotNone(got, err)
        self.assertGreaterEqual(int(got.group(1)), 39)
        self.assertIn("--k", err)
        self.assertNotIn("FVU has stayed", err)

    def test_trainer_heldout_and_warning(self):
        x = np.load(ACTS)[:6000]
        m = libsae.Model.new("topk", 64, 256, k=8)
        t = libsae.Trainer(m, total_steps=40, heldout_every=10)
        t.init(x[:4000])
        self.assertIsNone(t.warning())
        self.assertEqual(t.metrics(), {"steps": 0, "tokens": 0, "warnings": 0})
        t.set_heldout(x[5000:])
        for s in range(1, 41):
            met = t.step(x[(s % 4) * 1000:(s % 4 + 1) * 1000])
            if s % 10 == 0:
                ev = m.evaluate(x[5000:])
                self.assertEqual(met["heldout_step"], s)
                self.assertAlmostEqual(met["heldout_fvu"], ev["fvu"], places=12)
                self.assertAlmostEqual(met["heldout_mse"], ev["mse"], places=10)
                self.assertAlmostEqual(met["heldout_l0"], ev["l0"], places=12)
        self.assertEqual(met["warnings"], 0)
        self.assertIsNone(t.warning())
        with self.assertRaises(libsae.LibsaeError):
            t.set_heldout(x[:10], x[:10])  # an SAE takes no targets
        t.set_heldout(None)
        self.assertNotIn("heldout_fvu", t.metrics())
        self.assertEqual(libsae.TRAIN_WARNINGS, {"fvu": 1, "l0": 2})


if __name__ == "__main__":
    unittest.main()
