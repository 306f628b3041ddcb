"""Finding libsae.so, declaring every C function's signature, and turning error codes into
exceptions.

The shared library is searched in this order, and the first that loads wins:

1. ``LIBSAE_LIBRARY``: the path of the library file (or of a folder holding it). When it is set
   it must work: a wrong path is an error, not a reason to look elsewhere.
2. The system loader, by SONAME (``libsae.so.0``), as installed by ``cmake --install``.
3. The build tree this package sits in, when it is used from a git checkout (or an editable
   install): ``build/lib`` first, then every ``build*/lib`` and ``build/*/lib``, newest first.
   Builds with a sanitizer runtime are skipped, since loading one into Python aborts the process.

If none loads, :class:`LibraryNotFound` lists every place tried and why each failed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from ctypes import (CFUNCTYPE, POINTER, c_char_p, c_double, c_float, c_int, c_size_t, c_uint,
                    c_uint32, c_uint64, c_void_p)
from pathlib import Path
from typing import List, Optional, Tuple

from . import _args

#: The major version of the C library this package is written for. The C library changes its
#: major version (and SONAME) only with an incompatible ABI.
EXPECTED_MAJOR = 0

_SONAMES = {"linux": ["libsae.so.0"], "darwin": ["libsae.0.dylib"]}


class LibraryNotFound(ImportError):
    """libsae.so could not be loaded; the message lists where it was looked for."""


#: The C library's status codes (sae.h's SAE_OK, SAE_E*), defined here once: LibsaeError.code is
#: one of the negative ones.
OK = 0
EINVAL = -1
ENOMEM = -2
EIO = -3
EFORMAT = -4
EUNSUPPORTED = -5
ERANGE = -6
ESTATE = -7
ECALLBACK = -8


class LibsaeError(Exception):
    """A libsae call failed.

    Attributes:
        code: the negative ``SAE_E*`` code the C function returned (``libsae.EINVAL``, ...).
        name: the code's short name from ``sae_strerror`` ("invalid argument").
        message: ``sae_last_error()``: what went wrong and where (file, tensor, shape, offset).
        function: the C function that failed.
    """

    def __init__(self, code: int, message: str, function: str = ""):
        self.code = code
        self.message = message
        self.function = function
        self.name = _strerror(code)
        where = f"{function}: " if function else ""
        super().__init__(f"{where}{message} [{self.name}, code {code}]")


def _strerror(code: int) -> str:
    if lib is None:
        return "unknown error"
    return lib.sae_strerror(code).decode("utf-8", "replace")


# ------------------------------------------------------------------------------------------
# Finding the library
# ------------------------------------------------------------------------------------------

def _repo_root() -> Optional[Path]:
    """The git checkout this package sits in (bindings/python/libsae/_lib.py), if it does."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "include" / "sae.h").is_file() else None


def _uses_sanitizer(path: Path) -> bool:
    """Whether a library links a sanitizer runtime (its dynamic string table names one)."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    return any(s in data for s in (b"libasan.so", b"libtsan.so", b"libubsan.so", b"libmsan"))


def _build_tree_candidates(root: Path) -> List[Path]:
    names = _SONAMES.get(sys.platform, ["libsae.so.0"]) + ["libsae.so", "libsae.dylib"]
    dirs = [root / "build" / "lib"]
    others = [p / "lib" for p in root.glob("build*") if p.is_dir() and p.name != "build"]
    others += [p / "lib" for p in (root / "build").glob("*") if p.is_dir()]
    others = [d for d in others if d.is_dir()]
    others.sort(key=lambda d: d.stat().st_mtime, reverse=True)
    found = []
    for d in dirs + others:
        for name in names:
            if (d / name).is_file():
                found.append(d / name)
                break
    return found


def _load() -> Tuple[ctypes.CDLL, str]:
    tried: List[str] = []

    env = os.environ.get("LIBSAE_LIBRARY")
    if env:
        path = Path(env)
        if path.is_dir():
            cands = [path / n for n in _SONAMES.get(sys.platform, []) + ["libsae.so"]]
            path = next((c for c in cands if c.is_file()), cands[0])
        try:
            return ctypes.CDLL(str(path)), str(path)
        except OSError as e:
            raise LibraryNotFound(f"LIBSAE_LIBRARY={env}: cannot load {path}: {e}") from None

    for soname in _SONAMES.get(sys.platform, ["libsae.so.0"]):
        try:
            return ctypes.CDLL(soname), soname
        except OSError as e:
            tried.append(f"system loader, {soname}: {e}")
    found = ctypes.util.find_library("sae")
    if found:
        try:
            return ctypes.CDLL(found), found
        except OSError as e:
            tried.append(f"system loader, {found}: {e}")

    root = _repo_root()
    if root is None:
        tried.append(f"build tree: {Path(__file__).resolve().parent} is not inside a libsae checkout")
    else:
        cands = _build_tree_candidates(root)
        if not cands:
            tried.append(f"build tree: no libsae.so under {root}/build/lib, {root}/build*/lib "
                         f"or {root}/build/*/lib (build it: cmake -B build && cmake --build build)")
        for c in cands:
            if _uses_sanitizer(c):
                tried.append(f"build tree, {c}: skipped, built with a sanitizer")
                continue
            try:
                return ctypes.CDLL(str(c)), str(c)
            except OSError as e:
                tried.append(f"build tree, {c}: {e}")

    raise LibraryNotFound(
        "cannot find libsae's shared library. Looked in:\n  - LIBSAE_LIBRARY: not set\n  - "
        + "\n  - ".join(tried)
        + "\nSet LIBSAE_LIBRARY to the path of libsae.so, or install libsae (cmake --install).")


# ------------------------------------------------------------------------------------------
# Signatures
# ------------------------------------------------------------------------------------------

_h = c_void_p  # every opaque handle
_hp = POINTER(c_void_p)  # sae_x **out
_buf = c_void_p  # every array: passed as an address, so numpy and array.array cost nothing

#: Called by the trainer with (float *buf, size_t count, void *user); returns 0 on success.
ALLREDUCE_FN = CFUNCTYPE(c_int, c_void_p, c_size_t, c_void_p)

# name: (restype, argtypes). restype None means "int status code": checked by _errcheck.
_STATUS = object()
_CORE = {
    "sae_version_number": (c_uint, []),
    "sae_version_string": (c_char_p, []),
    "sae_strerror": (c_char_p, [c_int]),
    "sae_last_error": (c_char_p, []),
    "sae_model_new": (_STATUS, [_hp, c_int, c_size_t, c_size_t]),
    "sae_model_load": (_STATUS, [_hp, c_char_p]),
    "sae_model_save": (_STATUS, [_h, c_char_p]),
    "sae_model_free": (None, [_h]),
    "sae_model_d_in": (c_size_t, [_h]),
    "sae_model_d_sae": (c_size_t, [_h]),
    "sae_model_arch": (c_int, [_h]),
    "sae_model_set_tensor": (_STATUS, [_h, c_int, _buf]),
    "sae_model_get_tensor": (_STATUS, [_h, c_int, _buf]),
    "sae_model_set_param": (_STATUS, [_h, c_int, c_double]),
    "sae_model_get_param": (_STATUS, [_h, c_int, POINTER(c_double)]),
    "sae_arch_name": (c_char_p, [c_int]),
    "sae_arch_from_name": (_STATUS, [c_char_p, POINTER(c_int)]),
    "sae_model_format": (c_char_p, [_h]),
    "sae_model_dtype": (c_char_p, [_h]),
    "sae_encode": (_STATUS, [_h, _buf, c_size_t, _buf]),
    "sae_encode_sparse": (_STATUS, [_h, _buf, c_size_t, c_size_t, _buf, _buf, _buf]),
    "sae_decode": (_STATUS, [_h, _buf, c_size_t, _buf]),
    "sae_decode_sparse": (_STATUS, [_h, _buf, _buf, _buf, c_size_t, c_size_t, _buf]),
    "sae_reconstruct": (_STATUS, [_h, _buf, c_size_t, _buf]),
    "sae_evaluate": (_STATUS, [_h, _buf, c_size_t, _buf, c_size_t, _buf]),
    "sae_npy_open": (_STATUS, [_hp, c_char_p]),
    "sae_npy_close": (None, [_h]),
    "sae_npy_rows": (c_size_t, [_h]),
    "sae_npy_cols": (c_size_t, [_h]),
    "sae_npy_read": (_STATUS, [_h, c_size_t, c_size_t, _buf]),
    "sae_npy_write": (_STATUS, [c_char_p, _buf, c_size_t, c_size_t]),
}

# Parts of the library that are growing (steering, analysis, training): bound when present, so
# the package works with a library that does not have them yet and says so when asked for them.
_OPTIONAL = {
    "sae_model_load_with": (_STATUS, [_hp, c_char_p, c_uint]),
    # 0.2: transcoders, gated, GroupMax, per-token normalization
    "sae_model_new_transcoder": (_STATUS, [_hp, c_int, c_size_t, c_size_t, c_size_t, c_int]),
    "sae_model_d_out": (c_size_t, [_h]),
    "sae_model_is_transcoder": (c_int, [_h]),
    "sae_model_has_tensor": (c_int, [_h, c_int]),
    "sae_model_decoder_norms": (_STATUS, [_h, _buf]),
    "sae_model_param_bounds": (_STATUS, [c_int, POINTER(c_double), POINTER(c_double)]),
    "sae_evaluate_to": (_STATUS, [_h, _buf, _buf, c_size_t, _buf, c_size_t, _buf]),
    "sae_steer_apply_to": (_STATUS, [_h, _buf, _buf, c_size_t]),
    "sae_steer_new": (_STATUS, [_hp, _h]),
    "sae_steer_free": (None, [_h]),
    "sae_steer_clamp": (_STATUS, [_h, c_uint32, c_float]),
    "sae_steer_scale": (_STATUS, [_h, c_uint32, c_float]),
    "sae_steer_add": (_STATUS, [_h, c_uint32, c_float]),
    "sae_steer_clear": (_STATUS, [_h]),
    "sae_steer_apply": (_STATUS, [_h, _buf, c_size_t]),
    "sae_steer_count": (c_size_t, [_h]),
    "sae_steer_get_op": (_STATUS, [_h, c_size_t, POINTER(c_uint32), POINTER(c_int),
                                   POINTER(c_float)]),
    "sae_steer_remove": (_STATUS, [_h, c_uint32]),
    "sae_steer_clamp_relative": (_STATUS, [_h, c_uint32, c_float, _h, _buf]),
    "sae_steer_vector": (_STATUS, [_h, _buf]),
    "sae_cvec_write": (_STATUS, [c_char_p, _buf, c_size_t, c_size_t, c_char_p]),
    "sae_steer_write_cvec": (_STATUS, [_h, c_char_p, c_size_t, c_size_t, c_char_p]),
    "sae_stats_new": (_STATUS, [_hp, c_size_t, c_size_t]),
    "sae_stats_free": (None, [_h]),
    "sae_stats_update": (_STATUS, [_h, _buf, c_size_t, _buf]),
    "sae_stats_update_sparse": (_STATUS, [_h, _buf, _buf, _buf, c_size_t, c_size_t, _buf]),
    "sae_stats_merge": (_STATUS, [_h, _h]),
    "sae_stats_d_sae": (c_size_t, [_h]),
    "sae_stats_top_n": (c_size_t, [_h]),
    "sae_stats_tokens": (c_uint64, [_h]),
    "sae_stats_counts": (_STATUS, [_h, _buf]),
    "sae_stats_sums": (_STATUS, [_h, _buf]),
    "sae_stats_max": (_STATUS, [_h, _buf]),
    "sae_stats_top": (_STATUS, [_h, c_uint32, _buf, _buf, POINTER(c_size_t)]),
    "sae_feature_neighbors": (_STATUS, [_h, c_uint32, c_size_t, _buf, _buf]),
    "sae_trainer_new": (_STATUS, [_hp, _h]),
    "sae_trainer_free": (None, [_h]),
    "sae_trainer_set_param": (_STATUS, [_h, c_int, c_double]),
    "sae_trainer_get_param": (_STATUS, [_h, c_int, POINTER(c_double)]),
    "sae_trainer_init": (_STATUS, [_h, _buf, c_size_t]),
    "sae_trainer_step": (_STATUS, [_h, _buf, c_size_t]),
    "sae_trainer_init_to": (_STATUS, [_h, _buf, _buf, c_size_t]),
    "sae_trainer_step_to": (_STATUS, [_h, _buf, _buf, c_size_t]),
    "sae_trainer_get_metric": (_STATUS, [_h, c_int, POINTER(c_double)]),
    "sae_trainer_set_allreduce": (_STATUS, [_h, ALLREDUCE_FN, c_void_p]),
    "sae_trainer_save": (_STATUS, [_h, c_char_p]),
    "sae_trainer_load": (_STATUS, [_h, c_char_p]),
}
# Training diagnostics: a held-out slice and the warnings (optional: newer than the trainer).
_OPTIONAL.update({
    "sae_trainer_set_heldout": (_STATUS, [_h, _buf, _buf, c_size_t]),
    "sae_trainer_warning": (c_char_p, [_h]),
})

# Keep these names importable for modules that declare more signatures.
__all__ = ["lib", "path", "has", "require", "LibsaeError", "LibraryNotFound", "EXPECTED_MAJOR",
           "ALLREDUCE_FN", "declare", "c_uint64"]


def _errcheck(result, func, args):
    if result != 0:
        msg = lib.sae_last_error().decode("utf-8", "replace")
        raise LibsaeError(result, msg, func.__name__)
    return result


#: Argument types that ctypes would convert silently (wrapping, rounding, cutting a string at a
#: NUL byte), replaced by types that check the value at every call (see _args).
_CHECKED = {c_size_t: _args.size_t, c_uint32: _args.uint32_t, c_int: _args.c_int,
            c_uint: _args.c_uint, c_float: _args.c_float, c_double: _args.c_double,
            c_char_p: _args.c_char_p}


def declare(name: str, restype, argtypes, optional: bool = False) -> bool:
    """Declares one C function's signature; returns False if an optional one is absent. Every
    integer, float and string argument is range-checked by ctypes (_CHECKED)."""
    try:
        fn = getattr(lib, name)
    except AttributeError:
        if optional:
            return False
        raise LibraryNotFound(f"{path} has no {name}: it is older than this package") from None
    if restype is _STATUS:
        fn.restype = c_int
        fn.errcheck = _errcheck
    else:
        fn.restype = restype
    fn.argtypes = [_CHECKED.get(t, t) for t in argtypes]
    _present.add(name)
    return True


def has(name: str) -> bool:
    """Whether the loaded library exports the C function `name`."""
    return name in _present


def require(name: str) -> None:
    """Raises NotImplementedError if the loaded library lacks the C function `name`."""
    if name not in _present:
        raise NotImplementedError(
            f"{name} is not in the loaded libsae ({path}, version {version_string}); "
            "it needs a newer build of the C library")


_present: set = set()
lib = None
lib, path = _load()
for _name, (_res, _args) in _CORE.items():
    declare(_name, _res, _args)
# Matryoshka group sizes (sae_trainer_set_groups, sae_trainer_get_groups)
_OPTIONAL["sae_trainer_set_groups"] = (_STATUS, [_h, POINTER(c_size_t), c_size_t])
_OPTIONAL["sae_trainer_get_groups"] = (_STATUS, [_h, POINTER(c_size_t), c_size_t,
                                                 POINTER(c_size_t)])
for _name, (_res, _args) in _OPTIONAL.items():
    declare(_name, _res, _args, optional=True)


def check_version(number: int, string: str, where: str) -> None:
    """Refuses a library of another major version than EXPECTED_MAJOR (a different ABI)."""
    if number // 10000 != EXPECTED_MAJOR:
        raise LibraryNotFound(
            f"{where} is libsae {string}, but this package is written for major version "
            f"{EXPECTED_MAJOR} (the ABI differs between major versions)")


version_number: int = lib.sae_version_number()
version_string: str = lib.sae_version_string().decode()
check_version(version_number, version_string, path)
