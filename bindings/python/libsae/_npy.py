"""Activation files (.npy) through the C reader and writer: streamed, no numpy needed."""
from __future__ import annotations

import ctypes
from typing import Any, Optional

from . import _args as A
from . import _buffers as B
from ._args import PathLike
from ._handle import Handle
from ._lib import lib
from ._model import _path


class NpyFile(Handle):
    """A 1-D or 2-D float32/float16/float64 .npy file, read in row ranges as float32.

    ``with libsae.NpyFile("acts.npy") as f: x = f.read(0, 1024)``; a 1-D file reads as rows of
    one column. Files larger than memory can be streamed a range at a time.
    """

    _kind = "NpyFile"

    def __init__(self, path: PathLike):
        p = _path(path)
        out = ctypes.c_void_p()
        lib.sae_npy_open(ctypes.byref(out), p)
        self._own(out.value, lib.sae_npy_close)
        self.path = path
        self.rows: int = lib.sae_npy_rows(out.value)
        self.cols: int = lib.sae_npy_cols(out.value)

    @property
    def shape(self):
        return (self.rows, self.cols)

    def __len__(self) -> int:
        return self.rows

    def read(self, first: int = 0, count: Optional[int] = None) -> Any:
        """Rows [first, first + count) as float32 [count, cols]; count defaults to the rest.
        Reads of one file are serialized (the C reader keeps a file position)."""
        first = A.size(first, "first")
        count = max(self.rows - first, 0) if count is None else A.size(count, "count")
        out, ptr = B.new_output((count, self.cols))
        with self._use(write=True) as h:
            lib.sae_npy_read(h, first, count, ptr)
        return out


def load_npy(path: PathLike) -> Any:
    """A whole .npy activation file as float32 [rows, cols]."""
    with NpyFile(path) as f:
        return f.read()


def save_npy(path: PathLike, data: Any, cols: Optional[int] = None) -> None:
    """Writes data [rows, cols] as a float32 .npy file, atomically. numpy arrays give their own
    shape (1-D arrays are one row); flat buffers need cols."""
    if B.HAVE_NUMPY and isinstance(data, B.np.ndarray):
        if data.ndim == 0:
            raise ValueError("save_npy: data must have at least one dimension")
        cols = data.shape[-1] if cols is None else cols
    elif cols is None:
        raise TypeError("save_npy: cols is required for a flat buffer")
    cols = A.size(cols, "save_npy: cols", lo=1)
    p = _path(path)
    ptr, keep, rows, _ = B.as_input(data, cols, "save_npy: data")
    lib.sae_npy_write(p, ptr, rows, cols)
