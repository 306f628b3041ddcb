"""Steering plans: per-feature clamp, scale and add, applied to activations in place."""
from __future__ import annotations

import ctypes
from typing import Any, List, Optional, Tuple

from . import _args as A
from . import _buffers as B
from ._enums import STEER_OPS
from ._handle import Handle
from ._lib import lib, require
from ._model import Model, _path

_OP_NAMES = {v: k for k, v in STEER_OPS.items()}


class Steering(Handle):
    """A plan of feature operations for one model, applied to activations in place.

    ``clamp`` and ``scale`` keep the SAE's error term: for each token,
    ``x' = x + sum_i (f_i' - f_i(x)) * W_dec[i] / input_scale`` (carried through the token's
    denormalization when the model normalizes its input). ``add`` adds
    ``coeff * W_dec[i] / input_scale`` whatever x is. A later op on a feature replaces the
    earlier one. Every op returns the plan, so they chain::

        s = libsae.Steering(m).clamp(12, 10.0).scale(40, 2.0).add(7, -1.0)
        s.apply(x)          # x is now steered

    A transcoder steers its target instead: ``s.apply_to(x, y)`` reads the features from the
    MLP's input x and changes the MLP's output y in place, ``y' = y + sum_i (f_i' - f_i(x)) *
    W_dec[i]`` (``add``: ``y += coeff * W_dec[i]``).

    The plan keeps its model alive; closing the model closes the plan. Building the plan
    (clamp, scale, ...) waits for applies of it on other threads, and the other way round.
    """

    _kind = "Steering"

    def __init__(self, model: Model):
        require("sae_steer_new")
        if not isinstance(model, Model):
            raise TypeError(f"Steering needs a libsae.Model, not {type(model).__name__}")
        out = ctypes.c_void_p()
        with model._use() as mh:  # the model cannot be freed before the plan holds it
            lib.sae_steer_new(ctypes.byref(out), mh)
            self.model = model
            self._own(out.value, lib.sae_steer_free, parent=model)

    def clamp(self, feature: int, value: float) -> "Steering":
        """f_feature := value on every token (value 0 ablates the feature)."""
        return self._op(lib.sae_steer_clamp, feature, value, "value")

    def ablate(self, feature: int) -> "Steering":
        """The same as clamp(feature, 0.0)."""
        return self.clamp(feature, 0.0)

    def scale(self, feature: int, factor: float) -> "Steering":
        """f_feature := factor * f_feature on every token."""
        return self._op(lib.sae_steer_scale, feature, factor, "factor")

    def add(self, feature: int, coeff: float) -> "Steering":
        """x += coeff * W_dec[feature] / input_scale on every token."""
        return self._op(lib.sae_steer_add, feature, coeff, "coeff")

    def _op(self, fn, feature: int, value: float, what: str) -> "Steering":
        f, v = _feature(feature), A.f32(value, what)
        with self._use(write=True) as h:
            fn(h, f, v)
        return self

    def clamp_relative(self, feature: int, multiple: float, stats: "Optional[Stats]" = None,
                       max: Any = None) -> "Steering":
        """Clamps a feature to `multiple` times its largest observed activation, as "Scaling
        Monosemanticity" does (10x to amplify, negative multiples to suppress). The maximum
        comes from `stats` (a Stats of this model's codes) or from `max`, an array of d_sae
        maxima: exactly one of the two."""
        require("sae_steer_clamp_relative")
        if stats is not None and not isinstance(stats, Stats):
            raise TypeError(f"clamp_relative: stats must be a libsae.Stats, not "
                            f"{type(stats).__name__}")
        f, mult = _feature(feature), A.f32(multiple, "multiple")
        mp = None
        keep = None
        if max is not None:
            mp, keep = B.as_exact(max, (self.model.d_sae,), "f", "clamp_relative: max")
        with self._use(write=True, reads=(stats,)) as (h, sp):
            lib.sae_steer_clamp_relative(h, f, mult, sp, mp)
        del keep
        return self

    def remove(self, feature: int) -> "Steering":
        """Removes the op on one feature, if there is one."""
        f = _feature(feature)
        with self._use(write=True) as h:
            lib.sae_steer_remove(h, f)
        return self

    def __len__(self) -> int:
        """The number of features the plan acts on."""
        with self._use() as h:
            return lib.sae_steer_count(h)

    def ops(self) -> List[Tuple[int, str, float]]:
        """The plan as (feature, "clamp" | "scale" | "add", value), in increasing feature order."""
        f, op, v = ctypes.c_uint32(), ctypes.c_int(), ctypes.c_float()
        out = []
        with self._use() as h:  # one hold: the plan cannot change between count and get_op
            for i in range(lib.sae_steer_count(h)):
                lib.sae_steer_get_op(h, i, ctypes.byref(f), ctypes.byref(op), ctypes.byref(v))
                out.append((f.value, _OP_NAMES.get(op.value, str(op.value)), v.value))
        return out

    def __repr__(self) -> str:
        try:
            ops = self.ops()
        except ValueError:
            return "<libsae.Steering closed>"
        body = ", ".join(f"{op}({f}, {v:g})" for f, op, v in ops)
        return f"<libsae.Steering {body or 'empty'}>"

    def vector(self) -> Any:
        """A plan of add ops only as the one constant vector [d_out] (d_in for an SAE) it adds
        to every token (LibsaeError ESTATE if it has clamp or scale ops, which depend on the
        activations)."""
        out, ptr = B.new_output((self.model.d_out,))
        with self._use() as h:
            lib.sae_steer_vector(h, ptr)
        return out

    def write_cvec(self, path, layer: int, n_layer: int, model_hint: Optional[str] = None) -> None:
        """Writes the plan's constant vector as a llama.cpp control-vector GGUF file for
        ``--control-vector``: the vector at `layer` (1 <= layer < n_layer, the engine model's
        block count), zeros elsewhere. model_hint is the engine's architecture, e.g. "llama"."""
        p = _path(path)
        layer, n_layer = A.size(layer, "layer"), A.size(n_layer, "n_layer")
        hint = A.text(model_hint, "model_hint") if model_hint is not None else None
        with self._use() as h:
            lib.sae_steer_write_cvec(h, p, layer, n_layer, hint)

    def clear(self) -> "Steering":
        """Removes every op."""
        with self._use(write=True) as h:
            lib.sae_steer_clear(h)
        return self

    def apply(self, x: Any) -> Any:
        """Steers activations x [..., d_in] in place and returns x.

        Because it works in place, x must be a writable C-contiguous float32 array (numpy) or
        buffer (array.array('f'), a writable memoryview); anything else is refused with a
        TypeError rather than silently steering a copy. A transcoder whose d_out differs from
        d_in has nothing to steer in x: use apply_to (the C library refuses it, EINVAL)."""
        ptr, n = _in_place(x, self.model.d_in, "Steering.apply", "x")
        with self._use() as h:
            lib.sae_steer_apply(h, ptr, n)
        return x

    def apply_to(self, x: Any, y: Any) -> Any:
        """Reads the features from x [..., d_in] and steers y [..., d_out] in place; returns y.

        For a transcoder x is the MLP's input and y its output (about to be written back):
        ``y' = y + sum_i (f_i' - f_i(x)) * W_dec[i]``, and add ops ``y += coeff * W_dec[i]``.
        For an SAE it is apply's change, computed from x and added to y. x and y may be the
        same array (then d_out = d_in). y must be a writable C-contiguous float32 array or
        buffer, as for apply; x is read only (converted to float32 if it is not), and must
        have as many tokens as y."""
        require("sae_steer_apply_to")
        xp, keep, n, _ = B.as_input(x, self.model.d_in, "Steering.apply_to: x")
        yp, ny = _in_place(y, self.model.d_out, "Steering.apply_to", "y")
        if ny != n:
            raise ValueError(f"Steering.apply_to: x has {n} tokens but y has {ny}")
        with self._use() as h:
            lib.sae_steer_apply_to(h, xp, yp, n)
        del keep
        return y


def _in_place(x: Any, width: int, fn: str, what: str) -> Tuple[int, int]:
    """(address, rows) of an array changed in place: writable C-contiguous float32 [..., width]
    (numpy) or a writable float32 buffer holding whole rows of width."""
    if B.HAVE_NUMPY and isinstance(x, B.np.ndarray):
        if x.dtype != B.np.float32 or not x.flags.c_contiguous or not x.flags.writeable:
            raise TypeError(
                f"{fn} works in place, so {what} must be a writable C-contiguous "
                f"float32 array (got {x.dtype}, contiguous={x.flags.c_contiguous}, "
                f"writable={x.flags.writeable}); convert it once with "
                f"{what} = np.ascontiguousarray({what}, dtype=np.float32) and apply to that")
        if x.ndim == 0 or x.shape[-1] != width:
            raise ValueError(f"{fn}: expected {what} of shape [..., {width}], "
                             f"got {list(x.shape)}")
        return x.ctypes.data, x.size // width
    try:
        count = memoryview(x).nbytes // 4
    except TypeError:
        raise TypeError(f"{fn} works in place, so {what} must be a writable float32 "
                        f"array or buffer, not {type(x).__name__}") from None
    if count % width:
        raise ValueError(f"{fn}: {count} values are not a whole number of rows of {width}")
    return B.as_inplace(x, count, fn), count // width


def _feature(feature: int) -> int:
    # A uint32 in C: ctypes would keep only the low 32 bits and steer some other feature.
    return A.u32(feature, "feature")


def write_cvec(path, data: Any, n_embd: int, n_layer: int, model_hint: Optional[str] = None) -> None:
    """Writes a llama.cpp control-vector GGUF file from data [n_layer - 1, n_embd] (layer 1
    first, as llama_set_adapter_cvec takes it)."""
    require("sae_cvec_write")
    n_embd, n_layer = A.size(n_embd, "n_embd"), A.size(n_layer, "n_layer", lo=2)
    p = _path(path)
    hint = A.text(model_hint, "model_hint") if model_hint is not None else None
    ptr, keep = B.as_exact(data, (n_layer - 1, n_embd), "f", "write_cvec: data")
    lib.sae_cvec_write(p, ptr, n_embd, n_layer, hint)
    del keep


from ._stats import Stats  # noqa: E402  (for the type hint; Stats does not import this module)
