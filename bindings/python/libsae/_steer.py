"""Steering plans: per-feature clamp, scale and add, applied to activations in place."""
from __future__ import annotations

import ctypes
from typing import Any

from . import _buffers as B
from ._handle import Handle
from ._lib import lib, require
from ._model import Model


class Steering(Handle):
    """A plan of feature operations for one model, applied to activations in place.

    ``clamp`` and ``scale`` keep the SAE's error term: for each token,
    ``x' = x + sum_i (f_i' - f_i(x)) * W_dec[i] / input_scale``. ``add`` adds
    ``coeff * W_dec[i] / input_scale`` whatever x is. A later op on a feature replaces the
    earlier one. Every op returns the plan, so they chain::

        s = libsae.Steering(m).clamp(12, 10.0).scale(40, 2.0).add(7, -1.0)
        s.apply(x)          # x is now steered

    The plan keeps its model alive; closing the model closes the plan.
    """

    _kind = "Steering"

    def __init__(self, model: Model):
        require("sae_steer_new")
        if not isinstance(model, Model):
            raise TypeError(f"Steering needs a libsae.Model, not {type(model).__name__}")
        out = ctypes.c_void_p()
        lib.sae_steer_new(ctypes.byref(out), model._ptr())
        self.model = model
        self._own(out.value, lib.sae_steer_free, parent=model)

    def _ptr(self) -> int:
        h = self._h
        if h is None:
            raise self._closed_error()
        return h

    def clamp(self, feature: int, value: float) -> "Steering":
        """f_feature := value on every token (value 0 ablates the feature)."""
        lib.sae_steer_clamp(self._ptr(), feature, value)
        return self

    def ablate(self, feature: int) -> "Steering":
        """The same as clamp(feature, 0.0)."""
        return self.clamp(feature, 0.0)

    def scale(self, feature: int, factor: float) -> "Steering":
        """f_feature := factor * f_feature on every token."""
        lib.sae_steer_scale(self._ptr(), feature, factor)
        return self

    def add(self, feature: int, coeff: float) -> "Steering":
        """x += coeff * W_dec[feature] / input_scale on every token."""
        lib.sae_steer_add(self._ptr(), feature, coeff)
        return self

    def clear(self) -> "Steering":
        """Removes every op."""
        lib.sae_steer_clear(self._ptr())
        return self

    def apply(self, x: Any) -> Any:
        """Steers activations x [..., d_in] in place and returns x.

        Because it works in place, x must be a writable C-contiguous float32 array (numpy) or
        buffer (array.array('f'), a writable memoryview); anything else is refused with a
        TypeError rather than silently steering a copy."""
        h = self._ptr()
        d_in = self.model.d_in
        if B.HAVE_NUMPY and isinstance(x, B.np.ndarray):
            if x.dtype != B.np.float32 or not x.flags.c_contiguous or not x.flags.writeable:
                raise TypeError(
                    "Steering.apply works in place, so x must be a writable C-contiguous "
                    f"float32 array (got {x.dtype}, contiguous={x.flags.c_contiguous}, "
                    f"writable={x.flags.writeable}); convert it once with "
                    "x = np.ascontiguousarray(x, dtype=np.float32) and apply to that")
            if x.ndim == 0 or x.shape[-1] != d_in:
                raise ValueError(f"Steering.apply: expected shape [..., {d_in}], "
                                 f"got {list(x.shape)}")
            lib.sae_steer_apply(h, x.ctypes.data, x.size // d_in)
            return x
        try:
            count = memoryview(x).nbytes // 4
        except TypeError:
            raise TypeError("Steering.apply works in place, so x must be a writable float32 "
                            f"array or buffer, not {type(x).__name__}") from None
        if count % d_in:
            raise ValueError(f"Steering.apply: {count} values are not a whole number of rows "
                             f"of {d_in}")
        ptr = B.as_inplace(x, count, "Steering.apply")
        lib.sae_steer_apply(h, ptr, count // d_in)
        return x
