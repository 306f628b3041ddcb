"""python3 -m libsae end to end, on files the tests write."""
import json
import os
import subprocess
import sys
import unittest

from _support import (TestCase, libsae, np, random_any, random_model, ref_encode_any,
                      ref_metrics, ref_reconstruct_any, ref_steer_to, subprocess_env, tmpdir)
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
        for cmd in ("info", "convert", "top", "evaluate", "train", "steer"):
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


@unittest.skipIf(np is None, "needs numpy to write the inputs")
class TestCliTranscoder(TestCase):
    """The CLI on a transcoder file made with the bindings (new_transcoder, set_tensor, save)."""

    def setUp(self):
        self.d = tmpdir(self)
        self.m, self.w = random_any("topk", 12, 30, 5, True, seed=51, k=4,
                                    normalize="layer_norm")
        self.model = os.path.join(self.d, "t.safetensors")
        self.m.save(self.model)
        rng = np.random.default_rng(52)
        self.x = (rng.standard_normal((40, 12)) * 2).astype(np.float32)
        self.y = (rng.standard_normal((40, 5)) + 0.5).astype(np.float32)
        self.acts, self.target = (os.path.join(self.d, n) for n in ("x.npy", "y.npy"))
        np.save(self.acts, self.x)
        np.save(self.target, self.y)

    def test_info(self):
        rc, out, err = run("info", self.model)
        self.assertEqual(rc, 0, err)
        self.assertIn("kind          transcoder with skip connection", out)
        self.assertIn("shape         d_in 12, d_sae 30, d_out 5 "
                      "(W_enc [12, 30], W_dec [30, 5], W_skip [12, 5])", out)
        self.assertIn("normalize     layer_norm", out)
        self.assertIn("parameters    k 4, apply_b_dec_to_input 0, input_scale 1, threads 0, "
                      "bf16_weights 0, normalize layer_norm", out)
        rc, out, err = run("info", "--json", self.model)
        self.assertEqual(rc, 0, err)
        info = json.loads(out)
        self.assertEqual((info["kind"], info["skip"], info["d_in"], info["d_sae"], info["d_out"],
                          info["normalize"], info["architecture"]),
                         ("transcoder", True, 12, 30, 5, "layer_norm", "topk"))
        self.assertEqual(info["parameters"], self.m.params())
        self.assertEqual(info["tensors"], {"W_enc": [12, 30], "W_dec": [30, 5], "b_enc": [30],
                                           "b_dec": [5], "W_skip": [12, 5]})
        norms = np.linalg.norm(self.w["W_dec"], axis=1)
        self.assertAlmostEqual(info["decoder_row_norms"]["min"], norms.min(), places=5)
        self.assertAlmostEqual(info["decoder_row_norms"]["mean"], norms.mean(), places=5)
        self.assertAlmostEqual(info["decoder_row_norms"]["max"], norms.max(), places=5)
        # an SAE says so, without a skip
        sae, _ = random_any("gated", 6, 8, seed=53)
        path = os.path.join(self.d, "g.safetensors")
        sae.save(path)
        rc, out, err = run("info", path)
        self.assertEqual(rc, 0, err)
        self.assertIn("kind          SAE\n", out)
        self.assertIn("r_mag         min", out)
        info = json.loads(run("info", "--json", path)[1])
        self.assertEqual((info["kind"], info["skip"], info["d_out"], info["normalize"]),
                         ("sae", False, 6, "none"))
        self.assertLessEqual({"r_mag", "b_mag"}, set(info))

    def test_info_reads_the_norms_from_the_library(self):
        # in this process, with Model.decoder_norms answering something no W_dec gives
        import contextlib
        import io
        from unittest import mock
        from libsae.__main__ import main
        fake = np.full(30, 7.0, np.float32)
        out = io.StringIO()
        with mock.patch.object(libsae.Model, "decoder_norms", return_value=fake) as called, \
                mock.patch.object(libsae.Model, "get_tensor",
                                  side_effect=AssertionError("W_dec read")), \
                contextlib.redirect_stdout(out):
            self.assertEqual(main(["info", "--json", self.model]), 0)
        called.assert_called_once_with()
        self.assertEqual(json.loads(out.getvalue())["decoder_row_norms"],
                         {"min": 7.0, "mean": 7.0, "max": 7.0, "not_unit": 30})

    def test_evaluate(self):
        rc, out, err = run("evaluate", self.model, self.acts, "--target", self.target, "--json")
        self.assertEqual(rc, 0, err)
        got = json.loads(out)
        self.assertEqual(got["tokens"], 40)
        want = ref_metrics(ref_encode_any(self.m, self.w, self.x), self.y,
                           ref_reconstruct_any(self.m, self.w, self.x))
        for name, value in want.items():
            self.assertAlmostEqual(got["metrics"][name], value, delta=1e-4 * max(1, abs(value)),
                                   msg=name)
        rc, out, err = run("evaluate", self.model, self.acts, "--target", self.target)
        self.assertEqual(rc, 0, err)
        lines = dict(line.split() for line in out.splitlines())
        self.assertEqual(list(lines), list(libsae.EVAL_METRICS))
        self.assertAlmostEqual(float(lines["fvu"]), want["fvu"], places=4)
        # an SAE is scored against its input
        sae, _ = random_model("relu", 12, 20, seed=54)
        path = os.path.join(self.d, "s.safetensors")
        sae.save(path)
        rc, out, err = run("evaluate", path, self.acts, "--json")
        self.assertEqual(rc, 0, err)
        for name, value in sae.evaluate(self.x).items():
            self.assertAlmostEqual(json.loads(out)["metrics"][name], value, places=5)

    @unittest.skipIf(not libsae.has("sae_steer_apply_to"), "needs apply_to")
    def test_steer(self):
        out = os.path.join(self.d, "steered.npy")
        active = int(np.argmax(self.m.encode(self.x).sum(0)))
        rc, _, err = run("steer", self.model, self.acts, "--target", self.target,
                         "--clamp", f"{active}=3", "--add", "2=-1.5", "-o", out)
        self.assertEqual(rc, 0, err)
        got = np.load(out)
        self.assertEqual((got.shape, got.dtype), ((40, 5), np.float32))
        want = ref_steer_to(self.m, self.w, self.x, self.y,
                            {active: ("clamp", 3.0), 2: ("add", -1.5)})
        self.assertClose(got, want, atol=2e-4)
        np.testing.assert_array_equal(np.load(self.acts), self.x)  # the inputs are untouched

    def test_top_works(self):
        rc, out, err = run("top", self.model, self.acts, "-k", 3)
        self.assertEqual(rc, 0, err)
        idx, _, count = self.m.encode_sparse(self.x, 3)
        first = out.splitlines()[0].split("\t")
        self.assertEqual([int(p.split(":")[0]) for p in first[1].split()],
                         list(idx[0, :count[0]]))

    def test_refusals(self):
        short = os.path.join(self.d, "short.npy")
        np.save(short, self.y[:39])
        wide = os.path.join(self.d, "wide.npy")
        np.save(wide, self.x)
        o = os.path.join(self.d, "o.npy")
        cases = [
            (("evaluate", self.model, self.acts), "transcoder (d_in 12 -> d_out 5)"),
            (("evaluate", self.model, self.acts), "--target Y.npy"),
            (("steer", self.model, self.acts, "--clamp", "1=2", "-o", o), "--target Y.npy"),
            (("evaluate", self.model, self.acts, "--target", short), "39 rows"),
            (("steer", self.model, self.acts, "--target", short, "--clamp", "1=2", "-o", o),
             "39 rows"),
            (("evaluate", self.model, self.acts, "--target", wide), "d_out is 5"),
            (("evaluate", self.model, self.target, "--target", self.target), "d_in is 12"),
        ]
        for args, fragment in cases:
            with self.subTest(args=args):
                rc, _, err = run(*args)
                self.assertEqual(rc, 1, err)
                self.assertTrue(err.startswith("libsae: error: "), err)
                self.assertIn(fragment, err)
                self.assertNotIn("Traceback", err)
        self.assertFalse(os.path.exists(o))


if __name__ == "__main__":
    unittest.main()


TORCHSAE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures",
                        "torchsae")


def _openai_topk_ln(x, W_enc, b_enc, b_dec, W_dec, k):
    """OpenAI model.py's forward in numpy float64: LN (unbiased std, eps 1e-5), encoder on
    x - pre_bias, TopK then ReLU, decode and undo LN."""
    x = x.astype(np.float64)
    mu = x.mean(axis=1, keepdims=True)
    xc = x - mu
    std = xc.std(axis=1, ddof=1, keepdims=True)
    xn = xc / (std + 1e-5)
    pre = (xn - b_dec) @ W_enc + b_enc
    f = np.zeros_like(pre)
    idx = np.argsort(-pre, axis=1, kind="stable")[:, :k]
    np.put_along_axis(f, idx, np.maximum(np.take_along_axis(pre, idx, axis=1), 0), axis=1)
    return f, (f @ W_dec + b_dec) * std + mu


@unittest.skipIf(np is None, "needs numpy")
class TestCliTorch(TestCase):
    """info and convert on the .pt dictionaries of tests/fixtures/torchsae (make.py)."""

    def setUp(self):
        self.d = tmpdir(self)
        with open(os.path.join(TORCHSAE, "expected.json")) as f:
            self.expected = json.load(f)

    def test_info_names_format_and_settings(self):
        for name, want in self.expected.items():
            path = os.path.join(TORCHSAE, want["path"])
            rc, out, err = run("info", "--json", path)
            self.assertEqual(rc, 0, f"{name}: {err}")
            info = json.loads(out)
            self.assertEqual(info["format"], want["format"], name)
            self.assertEqual(info["architecture"], want["arch"], name)
            self.assertTrue(info["read_as"], name)
            params = info["parameters"]
            self.assertEqual(params["apply_b_dec_to_input"], want["apply_b_dec"], name)
            if "k" in want:
                self.assertEqual(params["k"], want["k"], name)
            if "threshold" in want:
                self.assertAlmostEqual(params["threshold"], want["threshold"], places=6)
            self.assertEqual(info["normalize"], want.get("normalize", "none"), name)
        rc, out, err = run("info", os.path.join(TORCHSAE, "dl_autoencoder"))
        self.assertEqual(rc, 0, err)
        self.assertIn("format        dictionary_learning/AutoEncoder\n", out)
        self.assertIn("read as       ", out)
        self.assertIn("normalize_decoder=True", out)
        # its decoder was normalized at load: every row has norm 1
        self.assertIn("0 of 10 differ from 1", out)

    def test_convert_each(self):
        for name, want in self.expected.items():
            src = os.path.join(TORCHSAE, want["path"])
            out = os.path.join(self.d, name + ".safetensors")
            rc, _, err = run("convert", src, out)
            self.assertEqual(rc, 0, f"{name}: {err}")
            self.assertIn(f"(from {want['format']}", err)
            m = libsae.Model.load(out)
            self.assertEqual((m.format, m.arch), ("libsae", want["arch"]))
            x = np.array(want["x"], dtype=np.float32)
            np.testing.assert_allclose(m.encode(x), np.array(want["f"]), rtol=2e-5, atol=2e-5,
                                       err_msg=name)
            np.testing.assert_allclose(m.reconstruct(x), np.array(want["x_hat"]), rtol=2e-5,
                                       atol=2e-5, err_msg=name)

    def test_openai_forward_in_numpy(self):
        want = self.expected["openai_topk"]
        m = libsae.Model.load(os.path.join(TORCHSAE, want["path"]))
        x = np.array(want["x"], dtype=np.float32)
        f, x_hat = _openai_topk_ln(x, m.get_tensor("W_enc").astype(np.float64),
                                   m.get_tensor("b_enc"), m.get_tensor("b_dec"),
                                   m.get_tensor("W_dec").astype(np.float64), want["k"])
        np.testing.assert_allclose(f, np.array(want["f"]), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(m.encode(x), f, rtol=2e-5, atol=2e-5)
        np.testing.assert_allclose(m.reconstruct(x), x_hat, rtol=2e-5, atol=2e-5)

    def test_refusals_name_what_was_found(self):
        rc, _, err = run("info", os.path.join(TORCHSAE, "unknown.pt"))
        self.assertNotEqual(rc, 0)
        self.assertIn("'weight'", err)
        rc, _, err = run("convert", os.path.join(TORCHSAE, "dl_topk_nocfg", "ae.pt"),
                         os.path.join(self.d, "x.safetensors"))
        self.assertNotEqual(rc, 0)
        self.assertIn("dict_class", err)
        self.assertFalse(os.path.exists(os.path.join(self.d, "x.safetensors")))
