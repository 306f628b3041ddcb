"""Published SAE formats written the way each tool writes them, with numpy, and libsae's encode
checked against each tool's own math in float64 numpy.

- SAELens: cfg.json (6.x and the flat pre-6.0 layout) + sae_weights.safetensors, the safetensors
  bytes built by hand as safetensors.torch.save_file lays them out (the safetensors package is
  not installed here); activation_scaler.json for "expected_average_only_in".
- sparsify: cfg.json + sae.safetensors with encoder.weight [d_sae][d_in] and W_dec [d_sae][d_in].
- Gemma Scope: params.npz from np.savez (stored, ZIP64 extra fields: numpy forces them) and
  np.savez_compressed (deflated).
- The real SAELens 3.4 file in the shared data folder.

Run: LIBSAE_LIBRARY=build/lib/libsae.so /usr/bin/python3 -m unittest tests/python/test_formats.py
"""
import json
import os
import struct
import unittest

from _support import libsae, np, tmpdir

DATA_DIR = os.environ.get("SAE_DATA_DIR") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "data")


def bf16_bytes(a):
    """float32 -> bfloat16 with round-to-nearest-even, as torch's .to(torch.bfloat16)."""
    bits = np.ascontiguousarray(a, dtype="<f4").view("<u4").astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype("<u2").tobytes()


def bf16_values(a):
    """What those bytes mean, as float64."""
    b = np.frombuffer(bf16_bytes(a), dtype="<u2").astype("<u4") << 16
    return b.view("<f4").astype(np.float64).reshape(np.shape(a))


def tensor_bytes(a, dtype):
    if dtype == "F32":
        return np.ascontiguousarray(a, dtype="<f4").tobytes()
    if dtype == "F16":
        return np.ascontiguousarray(a, dtype="<f2").tobytes()
    if dtype == "F64":
        return np.ascontiguousarray(a, dtype="<f8").tobytes()
    if dtype == "BF16":
        return bf16_bytes(a)
    raise ValueError(dtype)


def stored_values(a, dtype):
    """The float32 values a reader gets from a tensor stored as dtype, as float64: numpy's
    astype(float32) of the stored values (round to nearest even for F64)."""
    if dtype == "BF16":
        return bf16_values(a)
    width = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}[dtype]
    return np.asarray(a).astype(width).astype(np.float32).astype(np.float64)


def write_safetensors(path, tensors, dtype="F32", metadata=None):
    """safetensors.torch.save_file's layout: 8-byte length, JSON header sorted by name,
    space-padded to 8 bytes, then the tensors back to back in the same order."""
    header, blobs, offset = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name in sorted(tensors):
        blob = tensor_bytes(tensors[name], dtype)
        header[name] = {"dtype": dtype, "shape": list(np.shape(tensors[name])),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def relu(v):
    return np.maximum(v, 0.0)


def topk_dense(pre, k):
    """ReLU of the k largest pre-activations per row (ties: lower index), 0 elsewhere."""
    out = np.zeros_like(pre)
    order = np.argsort(-pre, axis=1, kind="stable")[:, :k]
    rows = np.arange(pre.shape[0])[:, None]
    out[rows, order] = relu(pre[rows, order])
    return out


class Base(unittest.TestCase):
    d_in, d_sae = 24, 40  # not square: a W_enc/W_dec mix-up shows

    def setUp(self):
        if np is None:
            self.skipTest("numpy is not installed")
        self.rng = np.random.default_rng(7)
        self.dir = tmpdir(self)

    def weights(self, threshold=False):
        r = self.rng
        w = {"W_enc": r.normal(0, 0.3, (self.d_in, self.d_sae)).astype(np.float32),
             "W_dec": r.normal(0, 0.3, (self.d_sae, self.d_in)).astype(np.float32),
             "b_enc": r.normal(0, 0.2, self.d_sae).astype(np.float32),
             "b_dec": r.normal(0, 0.5, self.d_in).astype(np.float32)}
        if threshold:
            w["threshold"] = r.uniform(0.0, 0.4, self.d_sae).astype(np.float32)
        return w

    def x(self, n=9):
        return self.rng.normal(0, 1, (n, self.d_in)).astype(np.float32)

    def folder(self, name):
        path = os.path.join(self.dir, name)
        os.makedirs(path, exist_ok=True)
        return path

    def assert_close(self, got, want, tol=2e-5):
        scale = max(1.0, float(np.max(np.abs(want))))
        err = float(np.max(np.abs(got.astype(np.float64) - want)))
        self.assertLessEqual(err, tol * scale, f"max error {err} (scale {scale})")


class SAELensTest(Base):
    def write(self, cfg, w, dtype="F32", scaler=None):
        d = self.folder("saelens-%d" % self.rng.integers(1 << 30))
        with open(os.path.join(d, "cfg.json"), "w") as f:
            json.dump(cfg, f)
        write_safetensors(os.path.join(d, "sae_weights.safetensors"), w, dtype)
        if scaler is not None:
            with open(os.path.join(d, "activation_scaler.json"), "w") as f:
                json.dump({"scaling_factor": scaler}, f)
        return d

    def v6(self, arch, **extra):
        cfg = {"d_in": self.d_in, "d_sae": self.d_sae, "dtype": "float32", "device": "cpu",
               "apply_b_dec_to_input": True, "normalize_activations": "none",
               "reshape_activations": "none", "architecture": arch,
               "metadata": {"sae_lens_version": "6.18.0", "hook_name": "blocks.0.hook_resid_post"}}
        cfg.update(extra)
        return cfg

    def reference(self, w, dtype, arch, x, apply_b_dec=True, k=None, scale=1.0):
        v = {n: stored_values(a, dtype) for n, a in w.items()}
        xs = np.float32(scale) * x.astype(np.float64)
        pre = (xs - (v["b_dec"] if apply_b_dec else 0)) @ v["W_enc"] + v["b_enc"]
        if arch == "topk":
            return topk_dense(pre, k)
        if arch == "jumprelu":
            return relu(pre) * (pre > v["threshold"])
        return relu(pre)

    def test_every_architecture_and_dtype(self):
        for dtype in ("F32", "F16", "BF16", "F64"):
            for arch in ("standard", "topk", "jumprelu"):
                with self.subTest(dtype=dtype, arch=arch):
                    w = self.weights(threshold=arch == "jumprelu")
                    extra = {"k": 5} if arch == "topk" else {}
                    d = self.write(self.v6(arch, **extra), w, dtype)
                    m = libsae.Model.load(d)
                    self.assertEqual(m.format, "saelens")
                    self.assertEqual(m.dtype, dtype)
                    self.assertEqual((m.d_in, m.d_sae), (self.d_in, self.d_sae))
                    x = self.x()
                    want = self.reference(w, dtype, arch, x, k=5)
                    self.assert_close(m.encode(x), want)
                    # The weights file alone reads the cfg.json beside it.
                    m2 = libsae.Model.load(os.path.join(d, "sae_weights.safetensors"))
                    self.assert_close(m2.encode(x), want)
                    self.assertTrue(np.array_equal(
                        m.get_tensor("W_dec"), stored_values(w["W_dec"], dtype).astype(np.float32)))

    def test_pre_6_flat_layout(self):
        w = self.weights()
        cfg = {"d_in": self.d_in, "d_sae": self.d_sae, "dtype": "float32", "device": "cpu",
               "hook_point": "blocks.0.hook_mlp_out", "activation_fn_str": "topk",
               "activation_fn_kwargs": {"k": 4}, "apply_b_dec_to_input": False,
               "sae_lens_training_version": "3.4.0", "normalize_activations": False}
        m = libsae.Model.load(self.write(cfg, w))
        self.assertEqual(m.arch, "topk")
        self.assertEqual(m.k, 4)
        x = self.x()
        self.assert_close(m.encode(x), self.reference(w, "F32", "topk", x, apply_b_dec=False, k=4))

    def test_expected_average_only_in_uses_the_stored_scale(self):
        w = self.weights()
        s = 0.3712
        cfg = self.v6("standard", normalize_activations="expected_average_only_in")
        m = libsae.Model.load(self.write(cfg, w, scaler=s))
        x = self.x()
        want = self.reference(w, "F32", "standard", x, scale=s)
        self.assert_close(m.encode(x), want)
        # SAELens' own folded form (W_enc*s, W_dec/s, b_dec/s on raw input) agrees.
        v = {n: a.astype(np.float64) for n, a in w.items()}
        folded = relu((x - v["b_dec"] / np.float32(s)) @ (v["W_enc"] * np.float32(s)) + v["b_enc"])
        self.assert_close(m.encode(x), folded)
        # Decoding returns to the caller's units, as SAELens' unscale does.
        f = m.encode(x)
        self.assert_close(m.decode(f), (f.astype(np.float64) @ v["W_dec"] + v["b_dec"]) / np.float32(s))

    def test_expected_average_only_in_without_a_scale_is_unsupported(self):
        cfg = self.v6("standard", normalize_activations="expected_average_only_in")
        for scaler_text in (None, '{"scaling_factor": null}'):  # none, or the folded model's
            d = self.write(cfg, self.weights())
            if scaler_text is not None:
                with open(os.path.join(d, "activation_scaler.json"), "w") as f:
                    f.write(scaler_text)
            with self.assertRaises(libsae.LibsaeError) as e:
                libsae.Model.load(d)
            self.assertIn("expected_average_only_in", str(e.exception))

    def test_the_real_saelens_3_4_file(self):
        folder = os.path.join(DATA_DIR, "othello_sae_128")
        if not os.path.isdir(folder):
            self.skipTest("no shared data folder")
        with open(os.path.join(folder, "sae_weights.safetensors"), "rb") as f:
            raw = f.read()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + n])
        t = {}
        for name, e in header.items():
            if name == "__metadata__":
                continue
            a, b = e["data_offsets"]
            t[name] = np.frombuffer(raw[8 + n + a:8 + n + b], dtype="<f4").reshape(e["shape"])
        m = libsae.Model.load(folder)
        self.assertEqual((m.format, m.arch, m.d_in, m.d_sae), ("saelens", "relu", 128, 128))
        x = self.rng.normal(0, 1, (16, 128)).astype(np.float32)
        # cfg.json says apply_b_dec_to_input false: no b_dec subtraction.
        want = relu(x.astype(np.float64) @ t["W_enc"].astype(np.float64) + t["b_enc"])
        self.assert_close(m.encode(x), want)


class SparsifyTest(Base):
    def test_topk_in_every_dtype(self):
        for dtype in ("F32", "BF16", "F16"):
            with self.subTest(dtype=dtype):
                w = self.weights()
                d = self.folder("sparsify-" + dtype)
                k = 6
                with open(os.path.join(d, "cfg.json"), "w") as f:
                    json.dump({"activation": "topk", "expansion_factor": 32, "normalize_decoder": True,
                               "num_latents": self.d_sae, "k": k, "multi_topk": False,
                               "skip_connection": False, "transcode": False, "d_in": self.d_in}, f)
                # nn.Linear layout: encoder.weight is [d_sae][d_in], the transpose of W_enc.
                write_safetensors(os.path.join(d, "sae.safetensors"),
                                  {"encoder.weight": np.ascontiguousarray(w["W_enc"].T),
                                   "encoder.bias": w["b_enc"], "W_dec": w["W_dec"], "b_dec": w["b_dec"]},
                                  dtype, metadata={"format": "pt"})
                m = libsae.Model.load(d)
                self.assertEqual((m.format, m.arch, m.k, m.dtype), ("sparsify", "topk", k, dtype))
                v = {n: stored_values(a, dtype) for n, a in w.items()}
                x = self.x()
                # sparsify's encode: ReLU(x - b_dec) @ W^T + b, then top k.
                pre = relu((x.astype(np.float64) - v["b_dec"]) @ v["W_enc"] + v["b_enc"])
                self.assert_close(m.encode(x), topk_dense(pre, k))
                self.assertTrue(np.array_equal(m.get_tensor("W_dec"), v["W_dec"].astype(np.float32)))


class GemmaScopeTest(Base):
    def test_savez_and_savez_compressed(self):
        for save, dtype, lower in ((np.savez, np.float32, False), (np.savez_compressed, np.float32, False),
                                   (np.savez, np.float16, True), (np.savez_compressed, np.float64, False)):
            with self.subTest(save=save.__name__, dtype=dtype.__name__, lower=lower):
                w = self.weights(threshold=True)
                arrays = {n: a.astype(dtype) for n, a in w.items()}
                if lower:
                    arrays["w_enc"] = arrays.pop("W_enc")
                    arrays["w_dec"] = arrays.pop("W_dec")
                d = self.folder("gemma-%s-%s-%d" % (save.__name__, dtype.__name__, lower))
                path = os.path.join(d, "params.npz")
                save(path, **arrays)
                for target in (d, path):
                    m = libsae.Model.load(target)
                    self.assertEqual((m.format, m.arch), ("gemma-scope", "jumprelu"))
                    v = {n: a.astype(dtype).astype(np.float32).astype(np.float64) for n, a in w.items()}
                    x = self.x()
                    pre = x.astype(np.float64) @ v["W_enc"] + v["b_enc"]  # no b_dec subtraction
                    self.assert_close(m.encode(x), relu(pre) * (pre > v["threshold"]))
                    f = m.encode(x)
                    self.assert_close(m.decode(f), f.astype(np.float64) @ v["W_dec"] + v["b_dec"])

    def test_a_zip_that_is_not_an_sae_is_refused(self):
        path = os.path.join(self.dir, "other.npz")
        np.savez(path, weights=np.zeros(3, np.float32))
        with self.assertRaises(libsae.LibsaeError) as e:
            libsae.Model.load(path)
        self.assertIn("W_enc", str(e.exception))


if __name__ == "__main__":
    unittest.main()
