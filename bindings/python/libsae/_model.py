"""The model: loading, saving, weights, parameters, encoding and decoding."""
from __future__ import annotations

import ctypes
from typing import Any, Dict, Optional, Tuple, Union

from . import _args as A
from . import _buffers as B
from ._args import PathLike
from ._enums import EVAL_METRICS, LOAD_FLAGS, MODEL_PARAMS, NORMALIZATIONS, TENSORS, name_of
from ._handle import Handle
from ._lib import EUNSUPPORTED, LibsaeError, declare, has, lib, require

# The bfloat16 path getters (sae.h, sae_model_bf16_path): optional, so that an older library
# still loads and only Model.bf16_path says what it lacks.
declare("sae_model_bf16_path", ctypes.c_int, [ctypes.c_void_p], optional=True)
declare("sae_bf16_path_name", ctypes.c_char_p, [ctypes.c_int], optional=True)

#: The keyword arguments of Model.new and Model.new_transcoder that set parameters.
_NEW_PARAMS = ("k", "input_scale", "apply_b_dec_to_input", "threshold", "threads", "normalize")


def _path(p: PathLike, what: str = "path") -> bytes:
    return A.path(p, what)


def _arch_value(arch: Union[str, int]) -> int:
    if isinstance(arch, str):
        v = ctypes.c_int()
        lib.sae_arch_from_name(A.text(arch, "arch"), ctypes.byref(v))
        return v.value
    try:
        return A.cint(arch, "arch")
    except TypeError:
        raise TypeError(f"arch must be a name such as \"topk\" or an sae_arch value, "
                        f"not {type(arch).__name__}") from None


def param_bounds(name: str) -> Tuple[float, float]:
    """The range (lo, hi), both inclusive, that set_param accepts for a model parameter, from
    the C library (sae_model_param_bounds). Whole-number parameters (k, threads, the flags,
    normalize: 0 "none" to 2 "constant_norm") also need a whole value."""
    require("sae_model_param_bounds")
    p = _param(name)
    lo, hi = ctypes.c_double(), ctypes.c_double()
    lib.sae_model_param_bounds(p, ctypes.byref(lo), ctypes.byref(hi))
    return lo.value, hi.value


class Model(Handle):
    """A sparse autoencoder or a transcoder: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]``,
    ``b_enc [d_sae]``, ``b_dec [d_out]``, and where the model has them ``threshold [d_sae]``
    (JumpReLU), ``r_mag``, ``b_mag [d_sae]`` (gated), ``W_skip [d_in, d_out]`` (a transcoder
    with a skip connection), with the architecture's parameters. An SAE has d_out = d_in; a
    transcoder reads x [..., d_in] (an MLP's input) and predicts y [..., d_out] (its output).

    Make one with :meth:`new` or :meth:`load`. Every method takes activations as float32
    ``[..., d_in]`` (numpy arrays pass without a copy when C-contiguous float32) and returns
    numpy arrays, or ``array.array`` when numpy is not installed.

    Methods taking only reads (encode, decode, ...) may be called from many threads at once:
    the C call releases the GIL. Methods that change the model (set_tensor, set_param, a
    Trainer's step) wait until no other thread is inside a call on it, and make others wait.
    ``close()`` refuses new calls and waits for those in flight; see docs/python.md.
    """

    _kind = "Model"

    def __init__(self, _handle: int):
        """Use Model.new or Model.load."""
        self._own(_handle, lib.sae_model_free)
        self.d_in: int = lib.sae_model_d_in(_handle)
        self.d_sae: int = lib.sae_model_d_sae(_handle)
        #: Width of the output: decode and reconstruct return [..., d_out]; d_in for an SAE.
        self.d_out: int = (lib.sae_model_d_out(_handle) if has("sae_model_d_out")
                           else self.d_in)
        #: True for a transcoder (new_transcoder, or a file holding one), False for an SAE.
        self.is_transcoder: bool = (bool(lib.sae_model_is_transcoder(_handle))
                                    if has("sae_model_is_transcoder") else False)

    # -- making, loading, saving ----------------------------------------------------------

    @classmethod
    def new(cls, arch: Union[str, int], d_in: int, d_sae: int, *, k: Optional[int] = None,
            input_scale: Optional[float] = None, apply_b_dec_to_input: Optional[bool] = None,
            threshold: Optional[float] = None, threads: Optional[int] = None,
            normalize: Union[str, int, None] = None) -> "Model":
        """An SAE with every tensor zero. `arch` is one of libsae.ARCHITECTURES ("relu", "topk",
        "batchtopk", "jumprelu", "gated", "groupmax"; SAELens' "standard" is "relu").
        Keyword arguments set the parameters of the same name (threads: how many threads a call
        may use outside BLAS, 0 = all cores; normalize: "none", "layer_norm" or
        "constant_norm")."""
        arch_v, d_in, d_sae = _arch_value(arch), A.size(d_in, "d_in"), A.size(d_sae, "d_sae")
        out = ctypes.c_void_p()
        lib.sae_model_new(ctypes.byref(out), arch_v, d_in, d_sae)
        m = cls(out.value)
        m._set_new_params(dict(k=k, input_scale=input_scale, threshold=threshold,
                               apply_b_dec_to_input=apply_b_dec_to_input, threads=threads,
                               normalize=normalize))
        return m

    @classmethod
    def new_transcoder(cls, arch: Union[str, int], d_in: int, d_sae: int, d_out: int,
                       skip: bool = False, *, k: Optional[int] = None,
                       input_scale: Optional[float] = None,
                       apply_b_dec_to_input: Optional[bool] = None,
                       threshold: Optional[float] = None, threads: Optional[int] = None,
                       normalize: Union[str, int, None] = None) -> "Model":
        """A transcoder with every tensor zero: it reads x [..., d_in] and predicts
        y [..., d_out] = f @ W_dec + b_dec (+ x @ W_skip with ``skip=True``, which gives it a
        W_skip [d_in, d_out]). apply_b_dec_to_input starts False (b_dec is the output bias; it
        may be True only when d_out = d_in). Keyword arguments: as for :meth:`new`."""
        require("sae_model_new_transcoder")
        arch_v, d_in, d_sae = _arch_value(arch), A.size(d_in, "d_in"), A.size(d_sae, "d_sae")
        d_out, skip = A.size(d_out, "d_out"), A.flag(skip, "skip")
        out = ctypes.c_void_p()
        lib.sae_model_new_transcoder(ctypes.byref(out), arch_v, d_in, d_sae, d_out, int(skip))
        m = cls(out.value)
        m._set_new_params(dict(k=k, input_scale=input_scale, threshold=threshold,
                               apply_b_dec_to_input=apply_b_dec_to_input, threads=threads,
                               normalize=normalize))
        return m

    def _set_new_params(self, params: Dict[str, Any]) -> None:
        """The keyword arguments of new and new_transcoder; the model is closed if one fails."""
        try:
            for name in _NEW_PARAMS:
                if params[name] is not None:
                    self.set_param(name, params[name])
        except BaseException:
            self.close()
            raise

    @classmethod
    def load(cls, path: PathLike, *, copy: bool = False) -> "Model":
        """Loads libsae's own file, a SAELens or sparsify folder (or its weights file), or a
        Gemma Scope params.npz; the format is detected from the content.

        By default F32 weights may stay memory-mapped from the file: loading is quick, but a
        file truncated or rewritten by another process while the model lives can change its
        weights or kill the process with SIGBUS. ``copy=True`` (sae_model_load_with with
        SAE_LOAD_COPY) reads every tensor into the model's own memory instead, after which the
        file may change or vanish without effect."""
        p = _path(path)
        out = ctypes.c_void_p()
        if A.flag(copy, "copy"):
            require("sae_model_load_with")
            lib.sae_model_load_with(ctypes.byref(out), p, LOAD_FLAGS["copy"])
        else:
            lib.sae_model_load(ctypes.byref(out), p)
        return cls(out.value)

    def save(self, path: PathLike) -> None:
        """Writes libsae's safetensors file, atomically (path is untouched on failure)."""
        p = _path(path)
        with self._use() as h:
            lib.sae_model_save(h, p)

    # -- description ----------------------------------------------------------------------

    @property
    def arch(self) -> str:
        """One of libsae.ARCHITECTURES: "relu", "topk", "batchtopk", "jumprelu", "gated",
        "groupmax"."""
        with self._use() as h:
            return lib.sae_arch_name(lib.sae_model_arch(h)).decode()

    @property
    def format(self) -> str:
        """Where the model came from: "libsae", "saelens", "sparsify", "gemma-scope" or "new"."""
        with self._use() as h:
            return lib.sae_model_format(h).decode()

    @property
    def dtype(self) -> str:
        """The dtype the weights were stored in: "F32", "F16", "BF16" or "F64"."""
        with self._use() as h:
            return lib.sae_model_dtype(h).decode()

    @property
    def bf16_path(self) -> str:
        """How this model's batched weight products run (sae.h, sae_model_bf16_path): "float"
        (float weights: SGEMM), or with bf16_weights set, "amx" or "avx512_bf16" (oneDNN on the
        CPU's bfloat16 matrix instructions; the activations entering a product of more than a
        few tokens are rounded to bfloat16 too) or "widen" (no such instructions, or a library
        built without oneDNN: the weights are widened to float for SGEMM). Chosen once per
        process from the CPU; the environment variable SAE_BF16_ISA ("none", "avx512_bf16")
        caps it. NotImplementedError if the loaded library predates it."""
        require("sae_model_bf16_path")
        with self._use() as h:
            return lib.sae_bf16_path_name(lib.sae_model_bf16_path(h)).decode()

    def get_param(self, name: str) -> Union[float, str]:
        """One parameter by name (the keys of libsae.MODEL_PARAMS): "k" (TopK, BatchTopK:
        features kept; GroupMax: groups), "apply_b_dec_to_input", "input_scale", "threshold"
        (BatchTopK's global threshold), "threads", "bf16_weights" (1: W_enc and W_dec held as
        bfloat16), "normalize" (returned as its name: "none", "layer_norm", "constant_norm").
        Numbers come back as floats. LibsaeError (EUNSUPPORTED) if the architecture has none."""
        p = _param(name)
        v = ctypes.c_double()
        with self._use() as h:
            lib.sae_model_get_param(h, p, ctypes.byref(v))
        if name == "normalize":
            return name_of(NORMALIZATIONS, int(v.value))
        return v.value

    def set_param(self, name: str, value: Union[float, str]) -> None:
        """Sets a parameter by name (see get_param) to a number, or "normalize" to a name of
        libsae.NORMALIZATIONS or its value; the C library checks the value (param_bounds gives
        the range)."""
        p = _param(name)
        v = _normalize_value(value) if name == "normalize" else A.real(value, name)
        with self._use(write=True) as h:
            lib.sae_model_set_param(h, p, v)

    def params(self) -> Dict[str, float]:
        """Every parameter this architecture has, by name."""
        out = {}
        for name in MODEL_PARAMS:
            try:
                out[name] = self.get_param(name)
            except LibsaeError as e:
                if e.code != EUNSUPPORTED:
                    raise
        return out

    def _optional_param(self, name: str) -> Optional[float]:
        try:
            return self.get_param(name)
        except LibsaeError as e:
            if e.code == EUNSUPPORTED:
                return None
            raise

    @property
    def k(self) -> Optional[int]:
        """Features kept per token (TopK, BatchTopK); None for other architectures."""
        v = self._optional_param("k")
        return None if v is None else int(v)

    @k.setter
    def k(self, value: int) -> None:
        self.set_param("k", value)

    @property
    def input_scale(self) -> float:
        return self.get_param("input_scale")

    @input_scale.setter
    def input_scale(self, value: float) -> None:
        self.set_param("input_scale", value)

    @property
    def apply_b_dec_to_input(self) -> bool:
        return bool(self.get_param("apply_b_dec_to_input"))

    @apply_b_dec_to_input.setter
    def apply_b_dec_to_input(self, value: bool) -> None:
        self.set_param("apply_b_dec_to_input", A.flag(value, "apply_b_dec_to_input"))

    @property
    def normalize(self) -> str:
        """Per-token input normalization: "none", "layer_norm" or "constant_norm"."""
        return self.get_param("normalize")

    @normalize.setter
    def normalize(self, value: Union[str, int]) -> None:
        self.set_param("normalize", value)

    @property
    def threshold(self) -> Optional[float]:
        """BatchTopK's global threshold; None for other architectures."""
        return self._optional_param("threshold")

    @threshold.setter
    def threshold(self, value: float) -> None:
        self.set_param("threshold", value)

    def __repr__(self) -> str:
        if self.closed:
            return "<libsae.Model closed>"
        try:
            k = self.k
        except ValueError:  # closed by another thread meanwhile
            return "<libsae.Model closed>"
        kind = ""
        if self.is_transcoder:
            kind = "transcoder" + (" with skip" if self.has_tensor("W_skip") else "") + " "
        return (f"<libsae.Model {kind}{self.arch} d_in={self.d_in} d_sae={self.d_sae}"
                + (f" d_out={self.d_out}" if self.is_transcoder else "")
                + (f" k={k}" if k is not None else "") + f" from {self.format}>")

    # -- weights --------------------------------------------------------------------------

    def tensor_shape(self, name: str) -> Tuple[int, ...]:
        """The shape of a tensor: W_enc [d_in, d_sae], W_dec [d_sae, d_out], b_enc [d_sae],
        b_dec [d_out], threshold, r_mag, b_mag [d_sae], W_skip [d_in, d_out] (whether or not
        this model holds it: see has_tensor)."""
        _tensor(name)
        return {"W_enc": (self.d_in, self.d_sae), "W_dec": (self.d_sae, self.d_out),
                "b_enc": (self.d_sae,), "b_dec": (self.d_out,), "threshold": (self.d_sae,),
                "W_skip": (self.d_in, self.d_out), "r_mag": (self.d_sae,),
                "b_mag": (self.d_sae,)}[name]

    def has_tensor(self, name: str) -> bool:
        """Whether the model holds a tensor: threshold (JumpReLU), r_mag and b_mag (gated),
        W_skip (a transcoder with a skip connection); W_enc, W_dec, b_enc, b_dec always.
        get_tensor and set_tensor of one it does not hold raise LibsaeError (EUNSUPPORTED)."""
        require("sae_model_has_tensor")
        t = _tensor(name)
        with self._use() as h:
            return lib.sae_model_has_tensor(h, t) == 1

    def decoder_norms(self) -> Any:
        """||W_dec[i]|| of every feature, float32 [d_sae]: the norms the C library keeps
        current for steering and neighbours (SAELens's decoder norms)."""
        require("sae_model_decoder_norms")
        out, ptr = B.new_output((self.d_sae,))
        with self._use() as h:
            lib.sae_model_decoder_norms(h, ptr)
        return out

    def set_tensor(self, name: str, value: Any) -> None:
        """Copies a whole tensor into the model. A numpy array must have the tensor's exact
        shape (a transposed W_enc is refused); other buffers must hold that many floats.
        NaN and infinity are refused (LibsaeError EINVAL)."""
        t = _tensor(name)
        ptr, keep = B.as_exact(value, self.tensor_shape(name), "f", f"set_tensor({name!r})")
        with self._use(write=True) as h:
            lib.sae_model_set_tensor(h, t, ptr)
        del keep

    def get_tensor(self, name: str) -> Any:
        """A copy of a tensor, as a new array of its shape."""
        t = _tensor(name)
        out, ptr = B.new_output(self.tensor_shape(name))
        with self._use() as h:
            lib.sae_model_get_tensor(h, t, ptr)
        return out

    # -- encoding and decoding ------------------------------------------------------------

    def encode(self, x: Any, out: Any = None) -> Any:
        """Dense codes f [..., d_sae] of activations x [..., d_in]. `out`, if given, is a
        writable C-contiguous float32 array of exactly that shape that receives them (and is
        returned)."""
        xp, keep, n, lead = B.as_input(x, self.d_in, "encode: x")
        if out is None:
            out, fp = B.new_output(lead + (self.d_sae,))
        else:
            fp = B.as_output(out, lead + (self.d_sae,), "encode: out")
        with self._use() as h:
            lib.sae_encode(h, xp, n, fp)
        return out

    def encode_sparse(self, x: Any, k: Optional[int] = None) -> Tuple[Any, Any, Any]:
        """Each token's at most k nonzero features, largest first: (idx [..., k] uint32,
        val [..., k] float32, count [...] uint32). Unused slots hold index 0, value 0.
        k defaults to the model's K for TopK and BatchTopK."""
        if k is None:
            k = self.k
            if k is None:
                raise TypeError(f"encode_sparse: k is required for a {self.arch} model")
        k = A.size(k, "encode_sparse: k", lo=1)
        xp, keep, n, lead = B.as_input(x, self.d_in, "encode_sparse: x")
        idx, ip = B.new_output(lead + (k,), B.U32)
        val, vp = B.new_output(lead + (k,))
        count, cp = B.new_output(lead if lead else (1,), B.U32)
        if B.HAVE_NUMPY and not lead:
            count = count.reshape(())
        with self._use() as h:
            lib.sae_encode_sparse(h, xp, n, k, ip, vp, cp)
        return idx, val, count

    def decode(self, f: Any, out: Any = None) -> Any:
        """[..., d_out] from dense codes f [..., d_sae]: an SAE's x_hat, (f @ W_dec + b_dec) /
        input_scale (in normalized space when "normalize" is set: a token's statistics are not
        known from its codes); a transcoder's f @ W_dec + b_dec (without the skip term, which
        needs x: see reconstruct). `out`: as for encode."""
        fp, keep, n, lead = B.as_input(f, self.d_sae, "decode: f")
        if out is None:
            out, xp = B.new_output(lead + (self.d_out,))
        else:
            xp = B.as_output(out, lead + (self.d_out,), "decode: out")
        with self._use() as h:
            lib.sae_decode(h, fp, n, xp)
        return out

    def decode_sparse(self, idx: Any, val: Any, count: Any, k: Optional[int] = None) -> Any:
        """[..., d_out] (as decode) from sparse codes laid out as encode_sparse returns them. k is read
        from idx's last axis (numpy) or must be given for flat buffers. Indices must fit
        uint32: an index array of another integer type is checked, never wrapped."""
        if B.HAVE_NUMPY:
            count = B.np.asarray(count)
            lead = count.shape
            count = count.reshape(-1)
            if k is None:
                if B.np.ndim(idx) == 0:
                    raise ValueError("decode_sparse: idx must have a last axis of k slots")
                k = B.np.shape(idx)[-1]
        else:
            n = len(count) if isinstance(count, (list, tuple)) else memoryview(count).nbytes // 4
            lead = (n,)
            if k is None:
                total = len(idx) if isinstance(idx, (list, tuple)) else memoryview(idx).nbytes // 4
                if n == 0 or total % n:
                    raise ValueError("decode_sparse: pass k: it cannot be told from the buffers")
                k = total // n
        n = B._prod(lead)
        k = A.size(k, "decode_sparse: k", lo=1)
        ip, k1 = B.as_exact(idx, lead + (k,), B.U32, "decode_sparse: idx")
        vp, k2 = B.as_exact(val, lead + (k,), "f", "decode_sparse: val")
        cp, k3 = B.as_exact(count, (n,), B.U32, "decode_sparse: count")
        out, xp = B.new_output(lead + (self.d_out,))
        with self._use() as h:
            lib.sae_decode_sparse(h, ip, vp, cp, k, n, xp)
        return out

    def neighbors(self, feature: int, k: int = 10) -> Tuple[Any, Any]:
        """The k features whose decoder rows are closest to `feature`'s by cosine similarity,
        most similar first, itself excluded: (idx uint32 [k], cos float32 [k])."""
        from ._stats import neighbors
        return neighbors(self, feature, k)

    #: sae_evaluate's metrics, by the names evaluate() returns, in the C enum's order.
    EVAL_METRICS = tuple(EVAL_METRICS)

    def evaluate(self, x: Any, y: Any = None, *,
                 metrics: Optional[Tuple[str, ...]] = None) -> Dict[str, float]:
        """How well the model's output matches activations, as SAELens' evals measure it:
        {"mse", "fvu", "explained_variance", "l0", "l1", "cosine", "l2_ratio",
        "dead_fraction"} (or only the named `metrics`), over the tokens x [..., d_in].

        Without y an SAE is scored against x itself (sae_evaluate; a transcoder refuses it,
        LibsaeError EINVAL, unless d_out = d_in). With y [..., d_out], the target the model
        should predict from x (a transcoder's MLP output), the model's whole output
        (reconstruct, skip included) is scored against y, FVU against y's own mean
        (sae_evaluate_to). x and y must have the same number of tokens."""
        if isinstance(y, (tuple, list)) and y and all(isinstance(v, str) for v in y):
            raise TypeError("evaluate: the second argument is the target y; pass the metrics "
                            "by keyword: evaluate(x, metrics=(...))")
        names = self.EVAL_METRICS if metrics is None else tuple(metrics)
        for name in names:
            if name not in self.EVAL_METRICS:
                raise ValueError(f"evaluate: unknown metric {name!r} "
                                 f"(one of {', '.join(self.EVAL_METRICS)})")
        xp, keep, n, lead = B.as_input(x, self.d_in, "evaluate: x")
        yp, keep_y = None, None
        if y is not None:
            require("sae_evaluate_to")
            yp, keep_y, ny, _ = B.as_input(y, self.d_out, "evaluate: y")
            if ny != n:
                raise ValueError(f"evaluate: x has {n} tokens but y has {ny}")
        which = (ctypes.c_int * len(names))(*(EVAL_METRICS[m] for m in names))
        values = (ctypes.c_double * len(names))()
        with self._use() as h:
            if y is None:
                lib.sae_evaluate(h, xp, n, ctypes.addressof(which), len(names),
                                 ctypes.addressof(values))
            else:
                lib.sae_evaluate_to(h, xp, yp, n, ctypes.addressof(which), len(names),
                                    ctypes.addressof(values))
        del keep, keep_y
        return dict(zip(names, values))

    def reconstruct(self, x: Any, out: Any = None) -> Any:
        """The model's whole output for x [..., d_in], as [..., d_out]: an SAE's x_hat
        (denormalized with each token's own statistics), a transcoder's y_hat including the
        skip term. `out` may be x itself when d_out = d_in."""
        xp, keep, n, lead = B.as_input(x, self.d_in, "reconstruct: x")
        if out is None:
            out, op = B.new_output(lead + (self.d_out,))
        else:
            op = B.as_output(out, lead + (self.d_out,), "reconstruct: out")
        with self._use() as h:
            lib.sae_reconstruct(h, xp, n, op)
        return out


def _tensor(name: str) -> int:
    try:
        return TENSORS[name]
    except KeyError:
        raise KeyError(f"unknown tensor {name!r}; tensors are {', '.join(TENSORS)}") from None


def _param(name: str) -> int:
    try:
        return MODEL_PARAMS[name]
    except KeyError:
        raise KeyError(f"unknown model parameter {name!r}; parameters are "
                       f"{', '.join(MODEL_PARAMS)}") from None


def _normalize_value(value: Union[str, int]) -> int:
    """A "normalize" value: a name of NORMALIZATIONS or a whole number (the C library judges
    its range)."""
    if isinstance(value, str):
        try:
            return NORMALIZATIONS[value]
        except KeyError:
            raise ValueError(f"unknown normalize {value!r}; one of "
                             f"{', '.join(NORMALIZATIONS)} (or their values "
                             f"{', '.join(map(str, NORMALIZATIONS.values()))})") from None
    try:
        return A.cint(value, "normalize")
    except TypeError:
        raise TypeError(f"normalize must be one of {', '.join(NORMALIZATIONS)} or a whole "
                        f"number, not {type(value).__name__}") from None
