"""Finding the shared library, the version check, and the offline pip install."""
import importlib.util
import os
import shutil
import subprocess
import sys
import unittest

from _support import BINDINGS, ROOT, TestCase, libsae, subprocess_env, tmpdir
from libsae import _lib


def child(code, env, cwd=None):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def system_has_libsae():
    """Whether the system loader finds libsae.so.0 (asked in a fresh process: this one has
    already loaded it by path, and dlopen would answer with that)."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "LD_PRELOAD")}
    r = child("import ctypes; ctypes.CDLL('libsae.so.0')", env)
    return r.returncode == 0


def can_build_wheels():
    """pip with --no-build-isolation uses this interpreter's setuptools, which needs the wheel
    package for bdist_wheel before setuptools 70.1."""
    spec = importlib.util.find_spec
    st = spec("setuptools")
    if spec("pip") is None or st is None:
        return False
    builtin = any(os.path.exists(os.path.join(d, "command", "bdist_wheel.py"))
                  for d in st.submodule_search_locations or [])
    return builtin or spec("wheel") is not None


class TestLoading(TestCase):
    def test_libsae_library_path_and_folder(self):
        r = child("import libsae; print(libsae.library_path)", subprocess_env())
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.strip(), libsae.library_path)
        folder = os.path.dirname(libsae.library_path)
        r = child("import libsae; print(libsae.library_path)",
                  subprocess_env(LIBSAE_LIBRARY=folder))
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertTrue(r.stdout.strip().startswith(folder))

    def test_wrong_libsae_library_says_where(self):
        bad = os.path.join(tmpdir(self), "nope.so")
        r = child("import libsae", subprocess_env(LIBSAE_LIBRARY=bad))
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("LibraryNotFound", r.stderr)
        self.assertIn(f"LIBSAE_LIBRARY={bad}", r.stderr)

    def test_not_found_lists_every_place(self):
        if system_has_libsae():
            self.skipTest("libsae.so.0 is installed on this system: the loader finds it first")
        d = tmpdir(self)
        shutil.copytree(os.path.join(BINDINGS, "libsae"), os.path.join(d, "libsae"))
        env = dict(os.environ)
        for k in ("LIBSAE_LIBRARY", "LD_LIBRARY_PATH", "PYTHONPATH"):
            env.pop(k, None)
        r = child("import libsae", env, cwd=d)
        self.assertNotEqual(r.returncode, 0)
        for fragment in ("LIBSAE_LIBRARY: not set", "system loader, libsae.so.0",
                         "not inside a libsae checkout", "Set LIBSAE_LIBRARY"):
            self.assertIn(fragment, r.stderr)

    def test_build_tree_search_order_and_sanitizer_builds(self):
        root = tmpdir(self)
        os.makedirs(os.path.join(root, "include"))
        open(os.path.join(root, "include", "sae.h"), "w").close()
        paths = {}
        for sub in ("build", "build-old", "build/ci-asan", "build/ci-openblas"):
            lib_dir = os.path.join(root, sub, "lib")
            os.makedirs(lib_dir)
            paths[sub] = os.path.join(lib_dir, "libsae.so.0")
        for i, sub in enumerate(("build-old", "build/ci-openblas", "build/ci-asan")):
            with open(paths[sub], "wb") as f:
                f.write(b"\x7fELF...libasan.so.8..." if "asan" in sub else b"\x7fELF")
            os.utime(os.path.dirname(paths[sub]), (1000 + i, 1000 + i))
        from pathlib import Path
        found = [str(p) for p in _lib._build_tree_candidates(Path(root))]
        # build/lib has no library; then newest first
        self.assertEqual(found, [paths["build/ci-asan"], paths["build/ci-openblas"],
                                 paths["build-old"]])
        self.assertTrue(_lib._uses_sanitizer(Path(paths["build/ci-asan"])))
        self.assertFalse(_lib._uses_sanitizer(Path(paths["build-old"])))

    def test_build_tree_is_found_from_the_checkout(self):
        # With nothing else set, the checkout's own build tree is searched (tests/run builds
        # build/ci-openblas; a developer's build/ too).
        if system_has_libsae():
            self.skipTest("libsae.so.0 is installed on this system: the loader finds it first")
        env = subprocess_env()
        del env["LIBSAE_LIBRARY"]
        env.pop("LD_LIBRARY_PATH", None)
        r = child("import libsae; print(libsae.library_path)", env)
        if r.returncode != 0:
            self.assertIn("build tree", r.stderr)  # no usable build here: it says so
        else:
            self.assertTrue(r.stdout.strip().startswith(ROOT), r.stdout)

    def test_major_version_is_checked(self):
        _lib.check_version(libsae.version_number, libsae.version_string, "here")
        with self.assertRaisesRegex(libsae.LibraryNotFound, "major version 0"):
            _lib.check_version(10000, "1.0.0", "libsae.so.1")

    def test_every_c_function_has_a_signature(self):
        for name in _lib._present:
            fn = getattr(_lib.lib, name)
            self.assertIsNotNone(fn.argtypes, name)

    @unittest.skipIf(not can_build_wheels(), "needs pip, setuptools and wheel "
                     "(Debian python3-pip, python3-setuptools, python3-wheel)")
    def test_offline_pip_install(self):
        d = tmpdir(self)
        target = os.path.join(d, "site")
        src = os.path.join(d, "src")  # setuptools builds in the source folder: use a copy
        shutil.copytree(BINDINGS, src, ignore=shutil.ignore_patterns("build", "*.egg-info",
                                                                     "__pycache__"))
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-build-isolation",
                            "--no-deps", "--no-index", "--quiet", "--target", target, src],
                           capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, PIP_NO_INPUT="1", TMPDIR=d))
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        env = dict(os.environ, PYTHONPATH=target, LIBSAE_LIBRARY=libsae.library_path)
        r = child("import libsae, array; m = libsae.Model.new('relu', 2, 3); "
                  "print(libsae.__file__); print(list(m.encode(array.array('f', [1, 2]))))",
                  env, cwd=d)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertTrue(r.stdout.startswith(target), r.stdout)


if __name__ == "__main__":
    unittest.main()
