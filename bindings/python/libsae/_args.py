"""Checking Python values before they become C arguments.

ctypes converts silently: ``c_size_t(2**64 + 4)`` is 4, ``c_uint32(2**32 + 7)`` is 7,
``c_size_t(-1)`` is 2**64 - 1, ``c_float(1e39)`` is infinity, a double cannot hold the int
2**53 + 1, and a ``c_char_p`` stops at the first NUL byte, so ``b"a.safetensors\\0.bak"`` names
another file. Every value the bindings pass to C goes through one of these functions first, and a
value C would read differently from what the caller wrote is refused with an exception naming
the argument. The argument types declared in _lib.py check the same ranges again, so a value
that missed these checks still cannot wrap (it raises ctypes.ArgumentError).
"""
from __future__ import annotations

import ctypes
import math
import numbers
import operator
import os
import struct
from typing import Any, Union

try:
    import numpy as _np
except ImportError:
    _np = None

SIZE_MAX = 2 ** (8 * ctypes.sizeof(ctypes.c_size_t)) - 1
U32_MAX = 2 ** 32 - 1
U64_MAX = 2 ** 64 - 1
INT_MIN, INT_MAX = -2 ** (8 * ctypes.sizeof(ctypes.c_int) - 1), 2 ** (8 * ctypes.sizeof(ctypes.c_int) - 1) - 1
UINT_MAX = 2 ** (8 * ctypes.sizeof(ctypes.c_uint)) - 1


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool) or (_np is not None and isinstance(value, _np.bool_))


def integer(value: Any, what: str, lo: int, hi: int) -> int:
    """A whole number in [lo, hi] (Python or numpy integer; not a bool, a float or a string)."""
    if _is_bool(value):
        raise TypeError(f"{what} must be a whole number, not a bool ({value!r})")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be a whole number, not {type(value).__name__}") from None
    if v < lo:
        raise ValueError(f"{what} must be at least {lo}, not {v}")
    if v > hi:
        raise ValueError(f"{what} must be at most {hi}, not {v}")
    return v


def size(value: Any, what: str, lo: int = 0) -> int:
    """A size_t: a whole number from lo (default 0) to SIZE_MAX."""
    return integer(value, what, lo, SIZE_MAX)


def u32(value: Any, what: str) -> int:
    """A uint32_t: a whole number from 0 to 2**32 - 1 (feature indices)."""
    return integer(value, what, 0, U32_MAX)


def cint(value: Any, what: str) -> int:
    """A C int (enum values)."""
    return integer(value, what, INT_MIN, INT_MAX)


def real(value: Any, what: str) -> float:
    """A double: a real number (int, float, numpy scalar, bool), not a string. An int that a
    double cannot hold exactly (beyond 2**53) is refused rather than rounded."""
    if _is_bool(value):
        return float(bool(value))
    if isinstance(value, (str, bytes)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number, not {type(value).__name__}")
    if isinstance(value, numbers.Integral):
        v = int(value)
        try:
            f = float(v)
        except OverflowError:
            raise ValueError(f"{what} is too large for a double: {v}") from None
        if int(f) != v:
            raise ValueError(f"{what} cannot be passed exactly as a double (it would become "
                             f"{int(f)}): {v}")
        return f
    return float(value)


def f32(value: Any, what: str) -> float:
    """A float: as real(), and a finite value beyond float32's range (which C would read as
    infinity) is refused. NaN and infinity pass through: the C function says what it accepts."""
    v = real(value, what)
    if math.isfinite(v) and math.isinf(struct.unpack("f", struct.pack("f", v))[0]):
        raise ValueError(f"{what} is outside float32's range (it would become infinity): {v!r}")
    return v


def flag(value: Any, what: str) -> bool:
    """A yes/no: a bool (Python or numpy) or the integers 0 and 1; not any truthy object (the
    string "false" is truthy)."""
    if _is_bool(value):
        return bool(value)
    if isinstance(value, numbers.Integral) and int(value) in (0, 1):
        return bool(int(value))
    raise TypeError(f"{what} must be True or False (or 0 or 1), not {value!r}")


PathLike = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]


def path(p: Any, what: str = "path") -> bytes:
    """A file system path as the C library takes it: str, bytes or os.PathLike, encoded as the
    OS does; a NUL byte, which would end the C string early, is refused as open() refuses it."""
    try:
        p = os.fspath(p)
    except TypeError:
        raise TypeError(f"{what} must be a str, bytes or os.PathLike, "
                        f"not {type(p).__name__}") from None
    b = os.fsencode(p)
    if b"\0" in b:
        raise ValueError(f"{what}: embedded null byte in {p!r}")
    return b


def text(s: Any, what: str) -> bytes:
    """A C string argument that is not a path (an architecture name, a hint): str, UTF-8."""
    if not isinstance(s, str):
        raise TypeError(f"{what} must be a str, not {type(s).__name__}")
    if "\0" in s:
        raise ValueError(f"{what}: embedded null character in {s!r}")
    return s.encode("utf-8")


# ------------------------------------------------------------------------------------------
# The argument types of the C signatures: the same ranges, checked by ctypes at every call
# ------------------------------------------------------------------------------------------

def _checked_int(base, lo: int, hi: int, cname: str):
    def from_param(cls, v):
        return base(integer(v, f"a {cname} argument", lo, hi))
    return type(f"checked_{cname}", (base,), {"from_param": classmethod(from_param)})


size_t = _checked_int(ctypes.c_size_t, 0, SIZE_MAX, "size_t")
uint32_t = _checked_int(ctypes.c_uint32, 0, U32_MAX, "uint32_t")
c_int = _checked_int(ctypes.c_int, INT_MIN, INT_MAX, "int")
c_uint = _checked_int(ctypes.c_uint, 0, UINT_MAX, "unsigned")


class c_float(ctypes.c_float):
    @classmethod
    def from_param(cls, v):
        return ctypes.c_float(f32(v, "a float argument"))


class c_double(ctypes.c_double):
    @classmethod
    def from_param(cls, v):
        return ctypes.c_double(real(v, "a double argument"))


class c_char_p(ctypes.c_char_p):
    """A C string argument: bytes without NUL, or None."""

    @classmethod
    def from_param(cls, v):
        if isinstance(v, bytes) and b"\0" in v:
            raise ValueError("embedded null byte in a C string argument")
        if v is not None and not isinstance(v, bytes):
            raise TypeError(f"a C string argument must be bytes or None, not {type(v).__name__}")
        return ctypes.c_char_p(v)
