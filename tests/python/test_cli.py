"""python3 -m libsae end to end, on files the tests write."""
import json
import os
import subprocess
import sys
import unittest

from _support import TestCase, libsae, np, random_model, subprocess_env, tmpdir
from test_steer import ref_steer


def run(*args):
    r = subprocess.run([sys.executable, "-m", "libsae", *map(str, args)], capture_output=True,
                       text=True, env=subprocess_env(), timeout=300)
    return r.returncode, r.stdout, r.stderr


@unittest.skipIf(np is None, "needs numpy to write the inputs")
class TestCli(TestCase):
    def setUp(self):
        self.d = tmpdir(self)
        self.m, self.w = random_model("topk", 12, 30, seed=41, k=5)
        self.model = os.path.join(self.d, "m.safetensors")
        self.m.save(self.model)
        self.x = np.random.default_rng(42).standard_normal((9, 12)).astype(np.float32) * 2
        self.acts = os.path.join(self.d, "acts.npy")
        np.save(self.acts, self.x)

    def test_help_on_every_command(self):
        rc, out, _ = run("--help")
        self.assertEqual(rc, 0)
        for cmd in ("info", "convert", "top", "train", "steer"):
            self.assertIn(cmd, out)
            rc, sub, _ = run(cmd, "--help")
            self.assertEqual(rc, 0, cmd)
            self.assertIn("usage: python3 -m libsae " + cmd, sub)

    def test_info(self):
        rc, out, err = run("info", self.model)
        self.assertEqual(rc, 0, err)
        self.assertIn("architecture  topk", out)
        self.assertIn("d_in 12, d_sae 30", out)
        self.assertIn("k 5", out)
        rc, out, err = run("info", "--json", self.model)
        self.assertEqual(rc, 0, err)
        info = json.loads(out)
        self.assertEqual((info["architecture"], info["d_in"], info["d_sae"], info["format"],
                          info["dtype"]), ("topk", 12, 30, "libsae", "F32"))
        self.assertEqual(info["parameters"]["k"], 5)
        norms = np.linalg.norm(self.w["W_dec"], axis=1)
        self.assertAlmostEqual(info["decoder_row_norms"]["min"], norms.min(), places=5)
        self.assertAlmostEqual(info["decoder_row_norms"]["mean"], norms.mean(), places=5)
        self.assertAlmostEqual(info["decoder_row_norms"]["max"], norms.max(), places=5)
        self.assertEqual(info["decoder_row_norms"]["not_unit"],
                         int((np.abs(norms - 1) > 1e-3).sum()))

    def test_convert(self):
        j, _ = random_model("jumprelu", 6, 8, seed=43)
        src = os.path.join(self.d, "j.safetensors")
        j.save(src)
        out = os.path.join(self.d, "out.safetensors")
        rc, _, err = run("convert", src, out)
        self.assertEqual(rc, 0, err)
        self.assertIn("wrote", err)
        back = libsae.Model.load(out)
        self.assertEqual(back.arch, "jumprelu")
        for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
            np.testing.assert_array_equal(back.get_tensor(name), j.get_tensor(name))

    def test_top(self):
        rc, out, err = run("top", self.model, self.acts, "-k", 3)
        self.assertEqual(rc, 0, err)
        idx, val, count = self.m.encode_sparse(self.x, 3)
        lines = out.splitlines()
        self.assertEqual(len(lines), 9)
        for t, line in enumerate(lines):
            tok, feats = line.split("\t")
            self.assertEqual(int(tok), t)
            pairs = [p.split(":") for p in feats.split()]
            self.assertEqual([int(p[0]) for p in pairs], list(idx[t, :count[t]]))
            np.testing.assert_allclose([float(p[1]) for p in pairs], val[t, :count[t]],
                                       rtol=1e-3)
        rc, out, _ = run("top", self.model, self.acts, "--first", 7, "--count", 5, "--batch", 1)
        self.assertEqual([line.split("\t")[0] for line in out.splitlines()], ["7", "8"])

    @unittest.skipIf(not libsae.has("sae_steer_new"), "needs steering")
    def test_steer(self):
        out = os.path.join(self.d, "steered.npy")
        rc, _, err = run("steer", self.model, self.acts, "--clamp", "3=4.5", "--clamp", "7=0",
                         "--scale", "9=2", "--add", "1=-1.5", "-o", out)
        self.assertEqual(rc, 0, err)
        want = ref_steer(self.m, self.w, self.x, {3: ("clamp", 4.5), 7: ("clamp", 0.0),
                                                  9: ("scale", 2.0), 1: ("add", -1.5)})
        self.assertClose(np.load(out), want, atol=2e-4)
        self.assertEqual(np.load(out).dtype, np.float32)

    @unittest.skipIf(not libsae.has("sae_trainer_new"), "needs the trainer")
    def test_train(self):
        rng = np.random.default_rng(44)
        dirs = rng.standard_normal((24, 8))
        codes = rng.random((2048, 24)) * (rng.random((2048, 24)) < 0.1)
        acts = os.path.join(self.d, "train.npy")
        np.save(acts, (codes @ dirs).astype(np.float32))
        out = os.path.join(self.d, "trained.safetensors")
        rc, _, err = run("train", acts, out, "--arch", "topk", "-k", 4, "--d-sae", 32,
                         "--steps", 20, "--batch-size", 128, "--seed", 3)
        self.assertEqual(rc, 0, err)
        self.assertIn("20/20 steps", err)
        m = libsae.Model.load(out)
        self.assertEqual((m.arch, m.d_in, m.d_sae, m.k), ("topk", 8, 32, 4))

    def test_exit_codes_and_messages(self):
        missing = os.path.join(self.d, "missing.safetensors")
        cases = [
            (("info", missing), 1, missing),
            (("top", self.model, os.path.join(self.d, "none.npy")), 1, "none.npy"),
            (("top", self.model, self.acts, "-k", 0), 2, "whole number >= 1"),
            (("top", self.model), 2, "required"),
            (("frobnicate",), 2, "invalid choice"),
            ((), 2, "required"),
            (("steer", self.model, self.acts, "-o", "x.npy"), 2, "at least one"),
            (("steer", self.model, self.acts, "--clamp", "3", "-o", "x.npy"), 2, "FEATURE=VALUE"),
            (("train", self.acts, "o", "--arch", "gated"), 2, "invalid choice"),
        ]
        wrong = os.path.join(self.d, "wrong.npy")
        np.save(wrong, np.zeros((2, 5), np.float32))
        cases.append((("top", self.model, wrong), 1, "d_in is 12"))
        if libsae.has("sae_steer_new"):
            cases.append((("steer", self.model, self.acts, "--clamp", "30=1", "-o",
                           os.path.join(self.d, "s.npy")), 1, "30"))
        for args, code, fragment in cases:
            with self.subTest(args=args):
                rc, out, err = run(*args)
                self.assertEqual(rc, code, err)
                self.assertIn(fragment, err)
                self.assertNotIn("Traceback", err)
                if code == 1:
                    self.assertTrue(err.startswith("libsae: error: "), err)


if __name__ == "__main__":
    unittest.main()
