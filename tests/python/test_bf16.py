"""Model.bf16_path (sae_model_bf16_path): the path it names is the one the products take, for
every cap of SAE_BF16_ISA the CPU allows (each run in a child interpreter, since the path is
chosen once per process), and the results are that path's.

The expected path comes from the CPU's flags (/proc/cpuinfo) and from whether the loaded library
pulled in oneDNN (libdnnl in this process's mappings): a build without oneDNN always widens."""
import os
import subprocess
import sys
import unittest

from _support import HERE, libsae, np, subprocess_env

# One child's work: a small model, bfloat16 weights, the path, and the encode of 24 tokens
# against the float64 references of both kinds of path (float inputs, or inputs rounded to
# bfloat16 as AMX / AVX512-BF16 round them); prints the path and the two distances.
CHILD = r"""
import numpy as np, libsae
rng = np.random.default_rng(4)
d_in, d_sae = 37, 90
m = libsae.Model.new("relu", d_in, d_sae)
w = {"W_enc": rng.standard_normal((d_in, d_sae)).astype(np.float32),
     "W_dec": rng.standard_normal((d_sae, d_in)).astype(np.float32),
     "b_enc": rng.standard_normal(d_sae).astype(np.float32),
     "b_dec": rng.standard_normal(d_in).astype(np.float32)}
for k, v in w.items():
    m.set_tensor(k, v)
assert m.bf16_path == "float", m.bf16_path
m.set_param("bf16_weights", 1)
W = m.get_tensor("W_enc").astype(np.float64)
x = (2 * rng.standard_normal((24, d_in))).astype(np.float32)
xs = (x - w["b_dec"]).astype(np.float32)
bits = xs.view(np.uint32).astype(np.uint64)
xs16 = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)
mass = np.abs(xs.astype(np.float64)) @ np.abs(W) + 1
got = m.encode(x)
for ref_in in (xs, xs16):
    ref = np.maximum(ref_in.astype(np.float64) @ W + w["b_enc"], 0)
    print(float((np.abs(got - ref) / mass).max()), end=" ")
print(m.bf16_path)
m.set_param("bf16_weights", 0)
assert m.bf16_path == "float", m.bf16_path
"""


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def has_onednn():
    with open("/proc/self/maps") as f:
        return "libdnnl" in f.read()


@unittest.skipIf(np is None, "needs numpy")
@unittest.skipUnless(sys.platform.startswith("linux"), "reads /proc")
class Bf16PathTest(unittest.TestCase):
    def run_child(self, cap):
        env = subprocess_env()
        env.pop("SAE_BF16_ISA", None)
        if cap is not None:
            env["SAE_BF16_ISA"] = cap
        out = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=HERE, timeout=120,
                             capture_output=True, text=True)
        self.assertEqual(out.returncode, 0, out.stderr)
        from_float, from_rounded, path = out.stdout.split()
        return path, float(from_float), float(from_rounded)

    def test_the_path_named_is_the_one_taken(self):
        flags = cpu_flags()
        onednn = has_onednn()
        amx = onednn and {"amx_bf16", "amx_tile"} <= flags
        avx512 = onednn and "avx512_bf16" in flags
        best = "amx" if amx else "avx512_bf16" if avx512 else "widen"
        cases = [(None, best), ("amx", best), ("none", "widen"),
                 ("avx512_bf16", "avx512_bf16" if avx512 else "widen")]
        for cap, want in cases:
            with self.subTest(SAE_BF16_ISA=cap):
                path, from_float, from_rounded = self.run_child(cap)
                self.assertEqual(path, want)
                # Each path is within float32 accumulation of its own reference, relative to
                # sum |x_i w_i|; rounding x to bfloat16 moves a code by up to 2^-8 of that, so
                # each path is far from the other's reference.
                if want == "widen":
                    self.assertLess(from_float, 1e-5)
                    self.assertGreater(from_rounded, 1e-4)
                else:
                    self.assertLess(from_rounded, 1e-5)
                    self.assertGreater(from_float, 1e-4)

    def test_bf16_path_in_this_process(self):
        m = libsae.Model.new("topk", 8, 20, k=3)
        self.assertEqual(m.bf16_path, "float")
        m.set_param("bf16_weights", 1)
        self.assertIn(m.bf16_path, ("widen", "avx512_bf16", "amx"))
        m.close()
        with self.assertRaises(ValueError):
            m.bf16_path


@unittest.skipIf(np is None, "needs numpy")
class Bf16TrainingTest(unittest.TestCase):
    def test_mixed_precision_is_a_trainer_param(self):
        rng = np.random.default_rng(2)
        x = (rng.standard_normal((512, 16)) + 0.3).astype(np.float32)
        fvu = {}
        for bf16 in (0, 1):
            m = libsae.Model.new("topk", 16, 64, k=4)
            t = libsae.Trainer(m, lr=3e-3, seed=3, bf16=bf16)
            self.assertEqual(t.get_param("bf16"), bf16)
            t.init(x)
            for s in range(60):
                t.step(x[(s % 8) * 64:(s % 8 + 1) * 64])
            fvu[bf16] = m.evaluate(x)["fvu"]
        # The same recipe, only the products' operands rounded: the same quality.
        self.assertLess(abs(fvu[1] - fvu[0]), 0.05 * fvu[0], fvu)
        with self.assertRaises(libsae.LibsaeError):
            libsae.Trainer(libsae.Model.new("relu", 4, 8), bf16=2)


if __name__ == "__main__":
    unittest.main()
