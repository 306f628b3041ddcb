"""libsae: sparse autoencoders over language-model activations, from Python.

A thin ctypes layer over the C library ``libsae.so``: every call goes straight to C, numpy
arrays pass without a copy when they are C-contiguous float32, and nothing is computed in
Python. Without numpy, any buffer (``array.array``, ``memoryview``) works and results come back
as ``array.array``.

    import libsae, numpy as np
    m = libsae.Model.load("path/to/sae")                 # SAELens, sparsify, Gemma Scope, libsae
    f = m.encode(np.zeros((4, m.d_in), np.float32))      # [4, d_sae]

The shared library is found through ``LIBSAE_LIBRARY`` (a path), then the system loader, then
the build tree of the checkout this package sits in. Failures raise :class:`LibsaeError`,
carrying the C code and the C library's message.
"""
from ._buffers import HAVE_NUMPY
from ._lib import EXPECTED_MAJOR, LibraryNotFound, LibsaeError, has
from ._lib import path as library_path
from ._lib import version_number, version_string
from ._enums import (ARCHITECTURES, EVAL_METRICS, LOAD_FLAGS, MODEL_PARAMS,  # noqa: F401
                     NORMALIZATIONS, TENSORS)
from ._model import Model, param_bounds
from ._npy import NpyFile, load_npy, save_npy
from ._stats import Stats, neighbors
from ._steer import Steering, write_cvec
from ._train import METRICS, TRAIN_PARAMS, Trainer

__version__ = "0.1.0"

# The C library's error codes (LibsaeError.code), from _lib where they are defined.
from ._lib import (ECALLBACK, EFORMAT, EINVAL, EIO, ENOMEM, ERANGE, ESTATE,  # noqa: E402
                   EUNSUPPORTED, OK)

# The C library's enums by name (ARCHITECTURES, TENSORS, MODEL_PARAMS, NORMALIZATIONS,
# LOAD_FLAGS, EVAL_METRICS, TRAIN_PARAMS, METRICS) are dicts {name: value}, defined in _enums.

__all__ = [
    "Model", "Steering", "Trainer", "Stats", "neighbors", "write_cvec", "NpyFile", "load_npy",
    "save_npy", "param_bounds", "LibsaeError", "LibraryNotFound", "HAVE_NUMPY", "library_path",
    "version_string", "version_number", "has", "TENSORS", "MODEL_PARAMS", "NORMALIZATIONS",
    "LOAD_FLAGS", "EVAL_METRICS", "TRAIN_PARAMS", "METRICS", "ARCHITECTURES",
    "OK", "EINVAL", "ENOMEM", "EIO", "EFORMAT", "EUNSUPPORTED", "ERANGE", "ESTATE", "ECALLBACK",
]

# Training diagnostics: the bits of Trainer.metrics()["warnings"] by name.
from ._enums import TRAIN_WARNINGS  # noqa: E402

__all__ += ["TRAIN_WARNINGS"]
