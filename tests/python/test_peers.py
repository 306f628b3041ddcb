"""The folders SAELens 6.18 and sparsify 1.3 write, laid out as their own save code lays them
out, loaded by libsae and checked against numpy re-implementations of each peer's forward code,
run on the same files.

Layouts (the save code they copy):
- SAELens: SAE.save_model (inference classes and TrainingSAE checkpoints: cfg.to_dict(), the
  state dict after process_state_dict_for_saving) and TrainingSAE.save_inference_model
  (get_inference_sae_cfg_dict(), process_state_dict_for_saving_inference: TopK norms folded,
  BatchTopK/Matryoshka saved as JumpReLU) for standard, topk, batchtopk, matryoshka_batchtopk,
  jumprelu, gated, transcoder, skip_transcoder, jumprelu_transcoder, with normalize_activations
  layer_norm and constant_norm_rescale; SkipTranscoder's W_skip is created without a dtype,
  so it stays float32 in a bfloat16 file.
- sparsify: SparseCoder.save_to_disk (safetensors.torch.save_model with {"format": "pt"},
  cfg.json = SparseCoderConfig.to_dict() + d_in) with transcode, skip_connection and groupmax.

The references follow sae_lens/saes/*.py and sparsify/sparse_coder.py + fused_encoder.py line
by line, in float64 on the values the files hold. libsae is called through ctypes (the C API),
so transcoders are reached whatever the Python package offers.

Run: LIBSAE_LIBRARY=build/lib/libsae.so /usr/bin/python3 -m unittest tests/python/test_peers.py
"""
import ctypes
import json
import os
import struct
import unittest

from _support import libsae, np, tmpdir

if np is not None:
    from test_formats import stored_values, tensor_bytes

C = ctypes.CDLL(libsae.library_path)
C.sae_model_load.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p]
C.sae_model_free.argtypes = [ctypes.c_void_p]
C.sae_last_error.restype = ctypes.c_char_p
for _name in ("sae_model_d_in", "sae_model_d_sae", "sae_model_d_out"):
    getattr(C, _name).argtypes = [ctypes.c_void_p]
    getattr(C, _name).restype = ctypes.c_size_t
C.sae_model_arch.argtypes = [ctypes.c_void_p]
C.sae_model_is_transcoder.argtypes = [ctypes.c_void_p]
_FP = ctypes.POINTER(ctypes.c_float)
C.sae_encode.argtypes = [ctypes.c_void_p, _FP, ctypes.c_size_t, _FP]
C.sae_reconstruct.argtypes = [ctypes.c_void_p, _FP, ctypes.c_size_t, _FP]

ARCH = {"relu": 1, "topk": 2, "batchtopk": 3, "jumprelu": 4, "gated": 5, "groupmax": 6}
SAE_EUNSUPPORTED = -5
SAE_EFORMAT = -4


class Loaded:
    """A model loaded by the C library, with encode and reconstruct."""

    def __init__(self, path):
        h = ctypes.c_void_p()
        rc = C.sae_model_load(ctypes.byref(h), path.encode())
        if rc != 0:
            raise AssertionError("load %s: %d %s" % (path, rc, C.sae_last_error().decode()))
        self.h = h
        self.d_in = C.sae_model_d_in(h)
        self.d_sae = C.sae_model_d_sae(h)
        self.d_out = C.sae_model_d_out(h)
        self.arch = C.sae_model_arch(h)
        self.transcoder = bool(C.sae_model_is_transcoder(h))

    def close(self):
        C.sae_model_free(self.h)

    def _call(self, fn, x, width):
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.zeros((x.shape[0], width), dtype=np.float32)
        rc = fn(self.h, x.ctypes.data_as(_FP), x.shape[0], out.ctypes.data_as(_FP))
        if rc != 0:
            raise AssertionError("%d %s" % (rc, C.sae_last_error().decode()))
        return out.astype(np.float64)

    def encode(self, x):
        return self._call(C.sae_encode, x, self.d_sae)

    def reconstruct(self, x):
        return self._call(C.sae_reconstruct, x, self.d_out)


def load_error(path):
    h = ctypes.c_void_p()
    rc = C.sae_model_load(ctypes.byref(h), path.encode())
    if rc == 0:
        C.sae_model_free(h)
    return rc, C.sae_last_error().decode()


def save_file(path, tensors, metadata=None):
    """safetensors' serialize: the data ordered by dtype alignment (largest first), then name;
    the header keys sorted, __metadata__ first; padded with spaces to 8 bytes. tensors maps a
    name to (array, dtype); a 0-d array is a scalar."""
    size = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
    order = sorted(tensors, key=lambda n: (-size[tensors[n][1]], n))
    header, blobs, offset = {}, {}, 0
    for name in order:
        a, dtype = tensors[name]
        blob = tensor_bytes(np.asarray(a), dtype)
        header[name] = {"dtype": dtype, "shape": list(np.shape(a)),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs[name] = blob
        offset += len(blob)
    head = {}
    if metadata is not None:
        head["__metadata__"] = metadata
    for name in sorted(header):
        head[name] = header[name]
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in order:
            f.write(blobs[name])


def values(tensors):
    """What a reader gets from each stored tensor, float64."""
    return {n: stored_values(np.asarray(a), d) for n, (a, d) in tensors.items()}


def relu(v):
    return np.maximum(v, 0.0)


def topk_mask(pre, k):
    """torch.topk's selection (no ties in these tests): a mask of the k largest per row."""
    idx = np.argsort(-pre, axis=-1, kind="stable")[:, :k]
    mask = np.zeros(pre.shape, dtype=bool)
    np.put_along_axis(mask, idx, True, axis=-1)
    return mask


# ---- SAELens ---------------------------------------------------------------------------------

META = {"sae_lens_version": "6.18.0", "sae_lens_training_version": "6.18.0",
        "model_name": "gpt2", "hook_name": "blocks.3.hook_resid_post", "hook_head_index": None,
        "context_size": 128, "prepend_bos": True, "dataset_path": "monology/pile",
        "model_from_pretrained_kwargs": {}, "seqpos_slice": [None]}


def saelens_cfg(arch, d_in, d_sae, dtype="float32", normalize="none", apply_b_dec=True,
                **fields):
    """SAEConfig.to_dict(): the dataclass fields, metadata, architecture."""
    cfg = {"d_in": d_in, "d_sae": d_sae, "dtype": dtype, "device": "cpu",
           "apply_b_dec_to_input": apply_b_dec, "normalize_activations": normalize,
           "reshape_activations": "none"}
    cfg.update(fields)
    cfg["metadata"] = dict(META)
    cfg["architecture"] = arch
    return cfg


def training_fields(arch):
    """The extra fields TrainingSAEConfig.to_dict() writes for a checkpoint."""
    f = {"decoder_init_norm": 0.1}
    if arch in ("topk", "batchtopk", "matryoshka_batchtopk"):
        f.update(use_sparse_activations=False, aux_loss_coefficient=1.0,
                 rescale_acts_by_decoder_norm=True)
    if arch in ("batchtopk", "matryoshka_batchtopk"):
        f["topk_threshold_lr"] = 0.01
    if arch == "matryoshka_batchtopk":
        f["matryoshka_widths"] = [4, 16]
    if arch == "jumprelu":
        f.update(jumprelu_init_threshold=0.01, jumprelu_bandwidth=0.05,
                 jumprelu_sparsity_loss_mode="step", l0_coefficient=1.0, l0_warm_up_steps=0,
                 pre_act_loss_coefficient=None, jumprelu_tanh_scale=4.0)
    return f


def write_saelens(d, cfg, tensors):
    os.makedirs(d, exist_ok=True)
    save_file(os.path.join(d, "sae_weights.safetensors"), tensors)
    with open(os.path.join(d, "cfg.json"), "w") as f:
        json.dump(cfg, f)


def fold_norm_topk(W_enc, b_enc, W_dec):
    """topk_sae.py _fold_norm_topk."""
    n = np.linalg.norm(W_dec, axis=-1)
    return W_enc * n[None, :], b_enc * n, W_dec / n[:, None]


def saelens_forward(cfg, T, x):
    """(feature_acts, output) of the SAELens class cfg['architecture'] names, on tensors T
    (float64): SAE.process_sae_in, each class's encode and decode, SAE.forward /
    Transcoder.forward / SkipTranscoder.forward."""
    arch = cfg["architecture"]
    transcoder = arch in ("transcoder", "skip_transcoder", "jumprelu_transcoder")
    norm = cfg.get("normalize_activations", "none")
    sae_in = x
    if norm == "constant_norm_rescale":
        coeff = np.sqrt(cfg["d_in"]) / np.linalg.norm(x, axis=-1, keepdims=True)
        sae_in = x * coeff
    elif norm == "layer_norm":
        mu = x.mean(axis=-1, keepdims=True)
        sae_in = x - mu
        std = sae_in.std(axis=-1, ddof=1, keepdims=True)  # torch's unbiased std
        sae_in = sae_in / (std + 1e-5)
    if not transcoder:  # Transcoder.process_sae_in never subtracts b_dec
        sae_in = sae_in - T["b_dec"] * cfg["apply_b_dec_to_input"]
    rescale = arch == "topk" and cfg.get("rescale_acts_by_decoder_norm", False)
    if arch == "gated":
        gate = (sae_in @ T["W_enc"] + T["b_gate"]) > 0
        mag = relu(sae_in @ (T["W_enc"] * np.exp(T["r_mag"])) + T["b_mag"])
        f = gate * mag
    else:
        pre = sae_in @ T["W_enc"] + T["b_enc"]
        if rescale:
            pre = pre * np.linalg.norm(T["W_dec"], axis=-1)
        if arch == "topk":
            f = np.where(topk_mask(pre, cfg["k"]), relu(pre), 0.0)
        elif arch in ("jumprelu", "jumprelu_transcoder"):
            f = relu(pre) * (pre > T["threshold"])
        else:
            f = relu(pre)
    fd = f / np.linalg.norm(T["W_dec"], axis=-1) if rescale else f
    out = fd @ T["W_dec"] + T["b_dec"]
    if not transcoder:  # run_time_activation_norm_fn_out; Transcoder.decode skips it
        if norm == "constant_norm_rescale":
            out = out / coeff
        elif norm == "layer_norm":
            out = out * std + mu
    if arch == "skip_transcoder":
        out = out + x @ T["W_skip"].T
    return f, out


def batchtopk_inference(cfg, T):
    """BatchTopKTrainingSAE.save_inference_model: TopK's fold (rescale true), then
    threshold = ones * topk_threshold, and a JumpReLUSAEConfig: what SAELens runs."""
    W_enc, b_enc, W_dec = T["W_enc"], T["b_enc"], T["W_dec"]
    if cfg.get("rescale_acts_by_decoder_norm"):
        W_enc, b_enc, W_dec = fold_norm_topk(W_enc, b_enc, W_dec)
    inf = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": T["b_dec"],
           "threshold": np.ones_like(b_enc) * float(T["topk_threshold"])}
    inf_cfg = {k: cfg[k] for k in ("d_in", "d_sae", "apply_b_dec_to_input",
                                   "normalize_activations")}
    inf_cfg["architecture"] = "jumprelu"
    return inf_cfg, inf


def rng_weights(seed, d_in, d_sae, d_out=None, scale_dec=1.0):
    r = np.random.default_rng(seed)
    d_out = d_out or d_in
    return {"W_enc": r.standard_normal((d_in, d_sae)) / np.sqrt(d_in),
            "b_enc": r.standard_normal(d_sae) * 0.2,
            "W_dec": r.standard_normal((d_sae, d_out)) * scale_dec / np.sqrt(d_sae),
            "b_dec": r.standard_normal(d_out) * 0.3}


DT = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


class PeerCase(unittest.TestCase):
    def setUp(self):
        if np is None:
            self.skipTest("needs numpy")
        self.dir = tmpdir(self)

    def check(self, path, f_ref, out_ref, x, arch, d_out=None, transcoder=False):
        m = Loaded(path)
        try:
            self.assertEqual(m.arch, ARCH[arch])
            self.assertEqual(m.transcoder, transcoder)
            if d_out is not None:
                self.assertEqual(m.d_out, d_out)
            f = m.encode(x)
            scale = max(1.0, float(np.abs(f_ref).max()))
            np.testing.assert_allclose(f, f_ref, rtol=0, atol=1e-5 * scale, err_msg="codes")
            out = m.reconstruct(x)
            scale = max(1.0, float(np.abs(out_ref).max()))
            np.testing.assert_allclose(out, out_ref, rtol=0, atol=1e-5 * scale, err_msg="output")
        finally:
            m.close()

    def inputs(self, n, d_in, seed=7):
        x = np.random.default_rng(seed).standard_normal((n, d_in)) * 1.5 + 0.25
        return x.astype(np.float32).astype(np.float64)


class SAELensLayouts(PeerCase):
    D_IN, D_SAE, D_OUT = 12, 16, 9

    def folder(self, name):
        return os.path.join(self.dir, name)

    def test_inference_and_checkpoint_saves(self):
        """Every architecture, as save_model and save_inference_model write it, in each dtype
        SAELens saves."""
        d_in, d_sae = self.D_IN, self.D_SAE
        x = self.inputs(20, d_in)
        for dtype in ("float32", "bfloat16", "float16"):
            st = DT[dtype]
            for arch in ("standard", "topk", "jumprelu", "gated"):
                w = rng_weights(hash((arch, dtype)) % 1000, d_in, d_sae, scale_dec=3.0)
                extra = {}
                if arch == "topk":
                    extra = {"k": 5, "rescale_acts_by_decoder_norm": False}
                if arch == "jumprelu":
                    w["threshold"] = np.abs(np.random.default_rng(3).standard_normal(d_sae)) * 0.2
                if arch == "gated":
                    r = np.random.default_rng(4)
                    w["b_gate"] = w.pop("b_enc")
                    w["r_mag"] = r.standard_normal(d_sae) * 0.3
                    w["b_mag"] = r.standard_normal(d_sae) * 0.2
                cfg = saelens_cfg(arch, d_in, d_sae, dtype, **extra)
                tensors = {n: (a, st) for n, a in w.items()}
                d = self.folder("%s-%s" % (arch, dtype))
                write_saelens(d, cfg, tensors)
                f, out = saelens_forward(cfg, values(tensors), x)
                self.check(d, f, out, x, {"standard": "relu"}.get(arch, arch))

    def test_topk_rescale_inference_and_checkpoint(self):
        """rescale_acts_by_decoder_norm true: the checkpoint (TrainingSAEConfig fields,
        unfolded weights) and the inference save (folded weights, flag kept) both run as
        SAELens' TopKSAE runs them: pre * ||W_dec[i]|| before the selection, f / ||W_dec[i]||
        before decoding."""
        d_in, d_sae = self.D_IN, self.D_SAE
        x = self.inputs(20, d_in, seed=9)
        for dtype in ("float32", "bfloat16"):
            st = DT[dtype]
            w = rng_weights(11, d_in, d_sae, scale_dec=4.0)
            # The checkpoint: TopKTrainingSAEConfig.to_dict(), weights as trained.
            cfg = saelens_cfg("topk", d_in, d_sae, dtype, k=4, **training_fields("topk"))
            tensors = {n: (a, st) for n, a in w.items()}
            d = self.folder("topk-ckpt-" + dtype)
            write_saelens(d, cfg, tensors)
            T = values(tensors)
            f, out = saelens_forward(cfg, T, x)
            self.check(d, f, out, x, "topk")
            # The inference save of the same SAE: folded in process_state_dict_for_saving_inference,
            # get_inference_sae_cfg_dict keeps the flag.
            W_enc, b_enc, W_dec = fold_norm_topk(T["W_enc"], T["b_enc"], T["W_dec"])
            inf = {"W_enc": (W_enc, st), "b_enc": (b_enc, st), "W_dec": (W_dec, st),
                   "b_dec": (T["b_dec"], st)}
            icfg = saelens_cfg("topk", d_in, d_sae, dtype, k=4, rescale_acts_by_decoder_norm=True)
            d = self.folder("topk-inf-" + dtype)
            write_saelens(d, icfg, inf)
            f2, out2 = saelens_forward(icfg, values(inf), x)
            self.check(d, f2, out2, x, "topk")
            if dtype == "float32":  # the same SAE either way, to float rounding
                np.testing.assert_allclose(f2, f, atol=1e-5 * np.abs(f).max())
                np.testing.assert_allclose(out2, out, atol=1e-5 * np.abs(out).max())

    def test_batchtopk_and_matryoshka_checkpoints(self):
        """Training checkpoints (cfg architecture batchtopk / matryoshka_batchtopk, the float64
        topk_threshold buffer): loaded as the JumpReLU SAE save_inference_model would make of
        them; and that inference save itself."""
        d_in, d_sae = self.D_IN, self.D_SAE
        x = self.inputs(20, d_in, seed=12)
        for arch in ("batchtopk", "matryoshka_batchtopk"):
            w = rng_weights(13, d_in, d_sae, scale_dec=4.0)
            cfg = saelens_cfg(arch, d_in, d_sae, k=3.5, **training_fields(arch))
            tensors = {n: (a, "F32") for n, a in w.items()}
            tensors["topk_threshold"] = (np.array(0.4), "F64")
            d = self.folder(arch + "-ckpt")
            write_saelens(d, cfg, tensors)
            icfg, inf = batchtopk_inference(cfg, values(tensors))
            f, out = saelens_forward(icfg, inf, x)
            self.assertTrue(0 < np.count_nonzero(f) < f.size)
            self.check(d, f, out, x, "batchtopk")
            # save_inference_model: architecture jumprelu, threshold per feature.
            d = self.folder(arch + "-inf")
            icfg = saelens_cfg("jumprelu", d_in, d_sae)
            write_saelens(d, icfg, {n: (a, "F32") for n, a in inf.items()})
            f2, out2 = saelens_forward(icfg, values({n: (a, "F32") for n, a in inf.items()}), x)
            self.check(d, f2, out2, x, "jumprelu")

    def test_jumprelu_checkpoint_and_log_threshold(self):
        d_in, d_sae = self.D_IN, self.D_SAE
        x = self.inputs(20, d_in, seed=14)
        w = rng_weights(15, d_in, d_sae)
        w["threshold"] = np.abs(np.random.default_rng(5).standard_normal(d_sae)) * 0.3 + 0.01
        cfg = saelens_cfg("jumprelu", d_in, d_sae, **training_fields("jumprelu"))
        tensors = {n: (a, "F32") for n, a in w.items()}
        d = self.folder("jump-ckpt")
        write_saelens(d, cfg, tensors)  # process_state_dict_for_saving: threshold = exp(log)
        f, out = saelens_forward(cfg, values(tensors), x)
        self.check(d, f, out, x, "jumprelu")
        # A state dict saved before that conversion holds log_threshold.
        logt = dict(tensors)
        logt["log_threshold"] = (np.log(values(tensors)["threshold"]), "F32")
        del logt["threshold"]
        d = self.folder("jump-log")
        write_saelens(d, cfg, logt)
        T = values(logt)
        T["threshold"] = np.exp(T["log_threshold"])
        f, out = saelens_forward(cfg, T, x)
        self.check(d, f, out, x, "jumprelu")

    def test_transcoders(self):
        """transcoder, skip_transcoder (W_skip [d_out, d_in], float32 in a bfloat16 file) and
        jumprelu_transcoder, with their d_out."""
        d_in, d_sae, d_out = self.D_IN, self.D_SAE, self.D_OUT
        x = self.inputs(20, d_in, seed=16)
        for dtype in ("float32", "bfloat16"):
            st = DT[dtype]
            for arch in ("transcoder", "skip_transcoder", "jumprelu_transcoder"):
                w = rng_weights(17, d_in, d_sae, d_out)
                tensors = {n: (a, st) for n, a in w.items()}
                if arch == "jumprelu_transcoder":
                    tensors["threshold"] = (np.abs(np.random.default_rng(6).standard_normal(d_sae))
                                            * 0.2, st)
                if arch == "skip_transcoder":
                    tensors["W_skip"] = (np.random.default_rng(8).standard_normal((d_out, d_in))
                                         * 0.3, "F32")
                cfg = saelens_cfg(arch, d_in, d_sae, dtype, apply_b_dec=False, d_out=d_out)
                d = self.folder("%s-%s" % (arch, dtype))
                write_saelens(d, cfg, tensors)
                f, out = saelens_forward(cfg, values(tensors), x)
                self.check(d, f, out, x, "jumprelu" if arch.startswith("jumprelu") else "relu",
                           d_out=d_out, transcoder=True)

    def test_per_token_normalization(self):
        """normalize_activations layer_norm and constant_norm_rescale, on an SAE (output
        denormalized) and a transcoder (not)."""
        d_in, d_sae, d_out = self.D_IN, self.D_SAE, self.D_OUT
        x = self.inputs(20, d_in, seed=18)
        for norm in ("layer_norm", "constant_norm_rescale"):
            for arch in ("standard", "topk", "skip_transcoder"):
                tc = arch.endswith("transcoder")
                w = rng_weights(19, d_in, d_sae, d_out if tc else None)
                tensors = {n: (a, "F32") for n, a in w.items()}
                extra = {"k": 6} if arch == "topk" else {}
                if tc:
                    tensors["W_skip"] = (np.random.default_rng(2).standard_normal((d_out, d_in))
                                         * 0.3, "F32")
                    extra["d_out"] = d_out
                cfg = saelens_cfg(arch, d_in, d_sae, normalize=norm, apply_b_dec=not tc, **extra)
                d = self.folder("%s-%s" % (arch, norm))
                write_saelens(d, cfg, tensors)
                f, out = saelens_forward(cfg, values(tensors), x)
                self.check(d, f, out, x, {"standard": "relu", "skip_transcoder": "relu"}
                           .get(arch, arch), transcoder=tc)

    def test_refusals_name_the_setting(self):
        d_in, d_sae, d_out = self.D_IN, self.D_SAE, self.D_OUT
        w = rng_weights(21, d_in, d_sae, d_out)
        tensors = {n: (a, "F32") for n, a in w.items()}
        tensors["W_skip"] = (np.zeros((d_out, d_in)), "F32")
        # A skip transcoder's weights without cfg.json: no d_out, no architecture.
        d = self.folder("skip-nocfg")
        os.makedirs(d)
        save_file(os.path.join(d, "sae_weights.safetensors"), tensors)
        rc, msg = load_error(d)
        self.assertEqual(rc, SAE_EFORMAT)
        self.assertIn("need the cfg.json", msg)
        # A cfg that says transcoder over weights with W_skip: the skip term would be dropped.
        write_saelens(d, saelens_cfg("transcoder", d_in, d_sae, apply_b_dec=False, d_out=d_out),
                      tensors)
        rc, msg = load_error(d)
        self.assertEqual(rc, SAE_EUNSUPPORTED)
        self.assertIn("W_skip", msg)


# ---- sparsify --------------------------------------------------------------------------------

def sparsify_cfg(d_in, num_latents, k, activation="topk", transcode=False, skip=False):
    """SparseCoderConfig.to_dict() + d_in, as save_to_disk writes it."""
    return {"activation": activation, "expansion_factor": 32, "normalize_decoder": True,
            "num_latents": num_latents, "k": k, "multi_topk": False, "skip_connection": skip,
            "transcode": transcode, "d_in": d_in}


def sparsify_forward(cfg, T, x):
    """SparseCoder.encode (fused_encoder) + decode + forward's skip term: the dense codes and
    the output."""
    sae_in = x if cfg["transcode"] else x - T["b_dec"]
    pre = relu(sae_in @ T["encoder.weight"].T + T["encoder.bias"])
    k = cfg["k"]
    f = np.zeros_like(pre)
    if cfg["activation"] == "topk":
        f = np.where(topk_mask(pre, k), pre, 0.0)
    else:  # preacts.unflatten(-1, (k, -1)).max(dim=-1), indices offset by group
        g = pre.reshape(pre.shape[0], k, -1)
        idx = g.argmax(axis=-1)  # the first maximum, as torch.max
        size = pre.shape[1] // k
        for t in range(pre.shape[0]):
            for j in range(k):
                f[t, j * size + idx[t, j]] = g[t, j, idx[t, j]]
    out = f @ T["W_dec"] + T["b_dec"]
    if cfg["skip_connection"]:
        out = out + x @ T["W_skip"].T
    return f, out


class SparsifyLayouts(PeerCase):
    D_IN, D_SAE = 10, 24

    def test_save_to_disk_layouts(self):
        d_in, d_sae = self.D_IN, self.D_SAE
        x = self.inputs(20, d_in, seed=30)
        n = 0
        for dtype in ("BF16", "F32"):
            for activation, k in (("topk", 5), ("groupmax", 6)):
                for transcode in (False, True):
                    for skip in (False, True):
                        n += 1
                        r = np.random.default_rng(n)
                        # SparseCoder.__init__: every tensor sized by d_in.
                        w = {"encoder.weight": r.standard_normal((d_sae, d_in)) / np.sqrt(d_in),
                             "encoder.bias": r.standard_normal(d_sae) * 0.2,
                             "W_dec": r.standard_normal((d_sae, d_in)) / np.sqrt(d_sae),
                             "b_dec": r.standard_normal(d_in) * 0.3}
                        if skip:
                            w["W_skip"] = r.standard_normal((d_in, d_in)) * 0.3
                        tensors = {name: (a, dtype) for name, a in w.items()}
                        cfg = sparsify_cfg(d_in, d_sae, k, activation, transcode, skip)
                        d = os.path.join(self.dir, "sp%d" % n)
                        os.makedirs(d)
                        save_file(os.path.join(d, "sae.safetensors"), tensors, {"format": "pt"})
                        with open(os.path.join(d, "cfg.json"), "w") as f:
                            json.dump(cfg, f)
                        f_ref, out_ref = sparsify_forward(cfg, values(tensors), x)
                        self.check(d, f_ref, out_ref, x,
                                   "topk" if activation == "topk" else "groupmax",
                                   d_out=d_in, transcoder=transcode or skip)


if __name__ == "__main__":
    unittest.main()
