"""The model: loading, saving, weights, parameters, encoding and decoding."""
from __future__ import annotations

import ctypes
from typing import Any, Dict, Optional, Tuple, Union

from . import _args as A
from . import _buffers as B
from ._args import PathLike
from ._handle import Handle
from ._lib import EUNSUPPORTED, LibsaeError, lib, require

#: sae_tensor values by name, and each tensor's shape as (rows of d_in/d_sae, ...).
TENSORS = {"W_enc": 1, "W_dec": 2, "b_enc": 3, "b_dec": 4, "threshold": 5}
#: sae_model_param values by name.
MODEL_PARAMS = {"k": 1, "apply_b_dec_to_input": 2, "input_scale": 3, "threshold": 4, "threads": 5,
                "bf16_weights": 6}
#: sae_load_flag values by name.
LOAD_FLAGS = {"copy": 1}


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


class Model(Handle):
    """A sparse autoencoder: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc``,
    ``b_dec`` (and ``threshold`` for JumpReLU), with the architecture's parameters.

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

    # -- making, loading, saving ----------------------------------------------------------

    @classmethod
    def new(cls, arch: Union[str, int], d_in: int, d_sae: int, *, k: Optional[int] = None,
            input_scale: Optional[float] = None, apply_b_dec_to_input: Optional[bool] = None,
            threshold: Optional[float] = None, threads: Optional[int] = None) -> "Model":
        """A model with every tensor zero. `arch` is "relu", "topk", "batchtopk" or "jumprelu"
        (or SAELens' "standard"). Keyword arguments set the parameters of the same name
        (threads: how many threads a call may use outside BLAS, 0 = all cores)."""
        out = ctypes.c_void_p()
        lib.sae_model_new(ctypes.byref(out), _arch_value(arch), A.size(d_in, "d_in"),
                          A.size(d_sae, "d_sae"))
        m = cls(out.value)
        for name, v in (("k", k), ("input_scale", input_scale),
                        ("apply_b_dec_to_input", apply_b_dec_to_input), ("threshold", threshold),
                        ("threads", threads)):
            if v is not None:
                m.set_param(name, v)
        return m

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
        """"relu", "topk", "batchtopk" or "jumprelu"."""
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

    def get_param(self, name: str) -> float:
        """One parameter by name: "k", "apply_b_dec_to_input", "input_scale", "threshold"
        (BatchTopK's global threshold), "threads", "bf16_weights" (1: W_enc and W_dec held as
        bfloat16). LibsaeError (EUNSUPPORTED) if the architecture has none."""
        p = _param(name)
        v = ctypes.c_double()
        with self._use() as h:
            lib.sae_model_get_param(h, p, ctypes.byref(v))
        return v.value

    def set_param(self, name: str, value: float) -> None:
        """Sets a parameter by name (see get_param) to a number; the C library checks the
        value."""
        p, v = _param(name), A.real(value, name)
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
        return (f"<libsae.Model {self.arch} d_in={self.d_in} d_sae={self.d_sae}"
                + (f" k={k}" if k is not None else "") + f" from {self.format}>")

    # -- weights --------------------------------------------------------------------------

    def tensor_shape(self, name: str) -> Tuple[int, ...]:
        """The shape of a tensor: W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc [d_sae],
        b_dec [d_in], threshold [d_sae]."""
        _tensor(name)
        return {"W_enc": (self.d_in, self.d_sae), "W_dec": (self.d_sae, self.d_in),
                "b_enc": (self.d_sae,), "b_dec": (self.d_in,), "threshold": (self.d_sae,)}[name]

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
        """x_hat [..., d_in] from dense codes f [..., d_sae]. `out`: as for encode."""
        fp, keep, n, lead = B.as_input(f, self.d_sae, "decode: f")
        if out is None:
            out, xp = B.new_output(lead + (self.d_in,))
        else:
            xp = B.as_output(out, lead + (self.d_in,), "decode: out")
        with self._use() as h:
            lib.sae_decode(h, fp, n, xp)
        return out

    def decode_sparse(self, idx: Any, val: Any, count: Any, k: Optional[int] = None) -> Any:
        """x_hat [..., d_in] from sparse codes laid out as encode_sparse returns them. k is read
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
        out, xp = B.new_output(lead + (self.d_in,))
        with self._use() as h:
            lib.sae_decode_sparse(h, ip, vp, cp, k, n, xp)
        return out

    def neighbors(self, feature: int, k: int = 10) -> Tuple[Any, Any]:
        """The k features whose decoder rows are closest to `feature`'s by cosine similarity,
        most similar first, itself excluded: (idx uint32 [k], cos float32 [k])."""
        from ._stats import neighbors
        return neighbors(self, feature, k)

    #: sae_evaluate's metrics, by the names evaluate() returns, in the C enum's order.
    EVAL_METRICS = ("mse", "fvu", "explained_variance", "l0", "l1", "cosine", "l2_ratio",
                    "dead_fraction")

    def evaluate(self, x: Any, metrics: Optional[Tuple[str, ...]] = None) -> Dict[str, float]:
        """Reconstruction quality on activations x [..., d_in], as SAELens' evals measure it:
        {"mse", "fvu", "explained_variance", "l0", "l1", "cosine", "l2_ratio",
        "dead_fraction"} (or only the named `metrics`). See sae_evaluate in sae.h."""
        names = self.EVAL_METRICS if metrics is None else tuple(metrics)
        for name in names:
            if name not in self.EVAL_METRICS:
                raise ValueError(f"evaluate: unknown metric {name!r} "
                                 f"(one of {', '.join(self.EVAL_METRICS)})")
        xp, keep, n, lead = B.as_input(x, self.d_in, "evaluate: x")
        which = (ctypes.c_int * len(names))(*(self.EVAL_METRICS.index(m) + 1 for m in names))
        values = (ctypes.c_double * len(names))()
        with self._use() as h:
            lib.sae_evaluate(h, xp, n, ctypes.addressof(which), len(names),
                             ctypes.addressof(values))
        del keep
        return dict(zip(names, values))

    def reconstruct(self, x: Any, out: Any = None) -> Any:
        """decode(encode(x)) in one call: x_hat [..., d_in]. `out` may be x itself."""
        xp, keep, n, lead = B.as_input(x, self.d_in, "reconstruct: x")
        if out is None:
            out, op = B.new_output(lead + (self.d_in,))
        else:
            op = B.as_output(out, lead + (self.d_in,), "reconstruct: out")
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
