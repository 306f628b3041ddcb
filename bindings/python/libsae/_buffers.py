"""Turning Python arrays into the addresses the C functions take, and making result arrays.

With numpy, a C-contiguous float32 array is passed as it is (its address, no copy); any other
array is converted once with ``np.ascontiguousarray``. Results are numpy arrays.

Without numpy, anything with the buffer protocol works (``array.array``, ``memoryview``,
``bytearray``), and so does a list of floats (or of rows). A C-contiguous float32 buffer is
passed without a copy when it is writable; other buffers are converted once. Results are
``array.array`` (typecode ``'f'`` for float32, an unsigned 32-bit typecode for indices), flat,
row-major.
"""
from __future__ import annotations

import array
import ctypes
from typing import Any, Tuple

try:
    import numpy as np
except ImportError:  # the package works without numpy
    np = None

HAVE_NUMPY = np is not None

# The array typecode of an unsigned 32-bit integer ('I' on every platform Python supports today,
# 'L' where int is 16 bits).
U32 = next(t for t in ("I", "L") if array.array(t).itemsize == 4)

if HAVE_NUMPY:
    _F32 = np.dtype(np.float32)
    _U32 = np.dtype(np.uint32)
    _ndarray = np.ndarray
    _DTYPES = {"f": _F32, U32: _U32, "d": np.dtype(np.float64), "Q": np.dtype(np.uint64)}


def _address(mv: memoryview) -> int:
    """The address of a writable, C-contiguous buffer, without copying it."""
    return ctypes.addressof(ctypes.c_char.from_buffer(mv)) if mv.nbytes else 0


def _flatten(obj: Any) -> list:
    if obj and isinstance(obj[0], (list, tuple)):
        return [v for row in obj for v in row]
    return list(obj)


def _plain(obj: Any, typecode: str, what: str) -> Tuple[int, Any, Tuple[int, ...], int]:
    """Without numpy: (address, keep-alive object, shape, element count) of obj as typecode."""
    if isinstance(obj, array.array) and obj.typecode == typecode:
        return obj.buffer_info()[0], obj, (len(obj),), len(obj)
    if isinstance(obj, (list, tuple)):
        try:
            a = array.array(typecode, _flatten(obj))
        except (TypeError, OverflowError) as e:
            raise TypeError(f"{what}: cannot convert the list to {_tname(typecode)}: {e}") from None
        shape = (len(obj), len(obj[0])) if obj and isinstance(obj[0], (list, tuple)) else (len(a),)
        return a.buffer_info()[0], a, shape, len(a)
    try:
        mv = memoryview(obj)
    except TypeError:
        raise TypeError(f"{what}: expected an array or a buffer of {_tname(typecode)}, "
                        f"not {type(obj).__name__}") from None
    shape = mv.shape or (1,)
    if mv.format == typecode or (mv.format in ("f", "<f", "=f") and typecode == "f"):
        if mv.c_contiguous and not mv.readonly:
            return _address(mv), mv, shape, mv.nbytes // mv.itemsize
        a = array.array(typecode, mv.tobytes())  # converted once
        return a.buffer_info()[0], a, shape, len(a)
    try:
        a = array.array(typecode, mv.cast("B").cast(mv.format).tolist())
    except (TypeError, ValueError, OverflowError) as e:
        raise TypeError(f"{what}: cannot convert a buffer of format {mv.format!r} to "
                        f"{_tname(typecode)}: {e}") from None
    return a.buffer_info()[0], a, shape, len(a)


def _tname(typecode: str) -> str:
    return {"f": "float32", "d": "float64", "Q": "uint64"}.get(typecode, "uint32")


def as_input(obj: Any, width: int, what: str) -> Tuple[int, Any, int, Tuple[int, ...]]:
    """A read-only [n, width] float32 argument: (address, keep-alive, n, leading shape).

    numpy arrays may have any number of leading dimensions ([width], [n, width],
    [batch, seq, width]); their shape without the last axis comes back as the leading shape, so
    results keep it. Flat buffers must hold a whole number of rows.
    """
    if HAVE_NUMPY and isinstance(obj, _ndarray):
        a = obj
        if a.dtype != _F32 or not a.flags.c_contiguous:
            _numeric(a, what)
            a = np.ascontiguousarray(a, dtype=_F32)
        shape = a.shape
        if not shape or shape[-1] != width:
            raise ValueError(f"{what}: expected shape [..., {width}], got {list(shape)}")
        return a.ctypes.data, a, a.size // width, shape[:-1]
    if HAVE_NUMPY:  # array.array, memoryview, lists: flat buffers hold whole rows
        a = np.asarray(obj)
        _numeric(a, what)
        a = np.ascontiguousarray(a, dtype=_F32)
        if a.ndim == 1 and a.size != width and width and a.size % width == 0:
            a = a.reshape(-1, width)
        return as_input(a, width, what)
    ptr, keep, shape, count = _plain(obj, "f", what)
    if len(shape) >= 2 and shape[-1] != width:
        raise ValueError(f"{what}: expected rows of {width} values, got shape {list(shape)}")
    if count % width:
        raise ValueError(f"{what}: {count} values are not a whole number of rows of {width}")
    n = count // width
    return ptr, keep, n, (n,)


def as_exact(obj: Any, shape: Tuple[int, ...], typecode: str, what: str) -> Tuple[int, Any]:
    """A read-only argument of exactly `shape` (numpy) or that many elements (other buffers)."""
    if HAVE_NUMPY:
        dt = _DTYPES[typecode]
        is_nd = isinstance(obj, _ndarray)
        a = obj if is_nd else np.asarray(obj)
        flat_ok = not is_nd and a.ndim == 1 and a.size == _prod(shape)  # array.array, list
        if a.shape != shape and not flat_ok:
            raise ValueError(f"{what}: expected shape {list(shape)}, got {list(a.shape)}")
        if a.dtype != dt or not a.flags.c_contiguous:
            if dt.kind == "u":
                _fits_unsigned(a, dt, what)
            else:
                _numeric(a, what)
            a = np.ascontiguousarray(a, dtype=dt)
        return a.ctypes.data, a
    ptr, keep, _, count = _plain(obj, typecode, what)
    if count != _prod(shape):
        raise ValueError(f"{what}: expected {_prod(shape)} values ({' x '.join(map(str, shape))}), "
                         f"got {count}")
    return ptr, keep


def _numeric(a: Any, what: str) -> None:
    """Refuses arrays numpy would convert to float32 by reinterpreting them: strings, objects,
    bools, complex numbers (whose imaginary part would be dropped)."""
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{what}: expected numbers (float32), got an array of {a.dtype}")


def _fits_unsigned(a: Any, dt: Any, what: str) -> None:
    """Refuses integer arrays with values outside an unsigned type (a uint32 index of 2**32 + 5
    or -1 would otherwise be cast to 5 or 2**32 - 1 without a word)."""
    if a.dtype.kind not in "ui":
        raise TypeError(f"{what}: expected integers, got {a.dtype}")
    if a.size == 0 or np.can_cast(a.dtype, dt):
        return
    lo, hi = int(a.min()), int(a.max())
    top = int(np.iinfo(dt).max)
    if lo < 0 or hi > top:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{what}: {bad} is outside {dt} (0 to {top})")


def _prod(shape: Tuple[int, ...]) -> int:
    p = 1
    for s in shape:
        p *= s
    return p


def new_output(shape: Tuple[int, ...], typecode: str = "f") -> Tuple[Any, int]:
    """A fresh result array: (array, address)."""
    if HAVE_NUMPY:
        a = np.empty(shape, dtype=_DTYPES[typecode])
        return a, a.ctypes.data
    a = array.array(typecode, bytes(array.array(typecode).itemsize * _prod(shape)))
    return a, a.buffer_info()[0]


def as_output(out: Any, shape: Tuple[int, ...], what: str) -> int:
    """The address of a caller's float32 result buffer of exactly `shape`, written in place.

    A numpy array must have that shape (not only that size: an array of another shape would be
    filled in an order its reader does not expect), dtype float32, and be C-contiguous and
    writable. Other buffers must be writable C-contiguous float32 with that many values and,
    when they have more than one dimension, that shape."""
    if HAVE_NUMPY and isinstance(out, _ndarray):
        if out.dtype != _F32 or not out.flags.c_contiguous or not out.flags.writeable:
            raise TypeError(f"{what}: must be a writable C-contiguous float32 array "
                            f"(got {out.dtype}, contiguous={out.flags.c_contiguous}, "
                            f"writable={out.flags.writeable})")
        if out.shape != tuple(shape):
            raise ValueError(f"{what}: expected shape {list(shape)}, got {list(out.shape)}")
        return out.ctypes.data
    try:
        dims = memoryview(out).shape
    except TypeError:
        dims = None
    if dims is not None and len(dims) > 1 and tuple(dims) != tuple(shape):
        raise ValueError(f"{what}: expected shape {list(shape)}, got {list(dims)}")
    return as_inplace(out, _prod(shape), what)


def as_inplace(obj: Any, count: int, what: str) -> int:
    """The address of a writable float32 buffer holding `count` values (no numpy array)."""
    try:
        mv = memoryview(obj)
    except TypeError:
        raise TypeError(f"{what}: works in place, so it needs a writable float32 array or "
                        f"buffer, not {type(obj).__name__}") from None
    if mv.format not in ("f", "<f", "=f") or mv.readonly or not mv.c_contiguous:
        raise TypeError(f"{what}: works in place, so it needs a writable C-contiguous float32 "
                        f"buffer (got format {mv.format!r}, readonly={mv.readonly}, "
                        f"contiguous={mv.c_contiguous}); convert it first, e.g. "
                        f"array.array('f', values)")
    if mv.nbytes != 4 * count:
        raise ValueError(f"{what}: expected {count} float32 values, got {mv.nbytes // 4}")
    return _address(mv)
