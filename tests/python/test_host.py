"""The host process is never harmed (issue 13): handles closed while other threads call them,
handles used at and after the interpreter's exit, integers ctypes would wrap, paths with NUL
bytes, `out=` arrays of the wrong shape, and loading without a mapping (copy=True).

Races run in a child interpreter, so a crash (SIGSEGV, SIGBUS, abort) fails one test with the
signal's name instead of killing the test runner.
"""
import array
import ctypes
import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import unittest

from _support import TestCase, libsae, np, random_model, subprocess_env, tmpdir
from libsae import _lib


def run_child(test, code, timeout=240):
    """Runs code in a fresh interpreter with this package; fails the test on a signal, a
    nonzero exit or a missing 'ok' on the last line. Returns stdout."""
    # A fixed mmap threshold: every large block freed is unmapped at once, so a use after free
    # faults instead of reading stale memory that looks right.
    env = subprocess_env(MALLOC_MMAP_THRESHOLD_="65536",
                         GLIBC_TUNABLES="glibc.malloc.mmap_threshold=65536")
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                       text=True, env=env, timeout=timeout)
    if r.returncode < 0:
        test.fail(f"the child died of {signal.Signals(-r.returncode).name}\n"
                  f"stdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-4000:]}")
    test.assertEqual(r.returncode, 0, f"stdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-4000:]}")
    test.assertEqual(r.stdout.strip().splitlines()[-1:], ["ok"], r.stdout[-2000:] + r.stderr)
    return r.stdout


# A child's common part: a model big enough that an encode takes milliseconds, saved and loaded
# back so that its weights are a mapping (freeing it unmaps them: a use after free faults).
CHILD_SETUP = """
import os, random, sys, tempfile, threading, time
import numpy as np
import libsae
D_IN, D_SAE, N = 256, 2048, 512
rng = np.random.default_rng(0)
tmp = tempfile.mkdtemp(prefix="libsae-host-")
path = os.path.join(tmp, "m.safetensors")
m0 = libsae.Model.new("relu", D_IN, D_SAE)
m0.set_tensor("W_enc", (rng.standard_normal((D_IN, D_SAE)) / 16).astype(np.float32))
m0.set_tensor("W_dec", (rng.standard_normal((D_SAE, D_IN)) / 16).astype(np.float32))
m0.save(path)
x = rng.standard_normal((N, D_IN)).astype(np.float32)
want = m0.encode(x)
m0.close()

def closed(e):
    return isinstance(e, ValueError) and "closed" in str(e)

def race(make, call, check, close_of=lambda obj: obj.close(), rounds=12, longest=0.03):
    '''Calls call(obj) in a loop on another thread while this one closes obj after a random
    moment: every call must return a good result (check) or raise ValueError "... is closed".'''
    bad = []
    for r in range(rounds):
        obj = make()
        started = threading.Event()
        def worker():
            started.set()
            while True:
                try:
                    got = call(obj)
                except Exception as e:
                    if not closed(e):
                        bad.append(repr(e))
                    return
                if not check(got):
                    bad.append("wrong result")
                    return
        t = threading.Thread(target=worker)
        t.start()
        started.wait()
        time.sleep(random.uniform(0, longest))
        close_of(obj)
        t.join()
        try:
            call(obj)
            bad.append("a call after close() worked")
        except Exception as e:
            if not closed(e):
                bad.append("after close: " + repr(e))
    assert not bad, bad
"""


@unittest.skipIf(np is None, "the races use numpy arrays")
class CloseWhileCalling(TestCase):
    """close() on one thread while another is inside a C call on the same handle: the call
    finishes (or is refused), the handle is freed after it, never under it."""

    def test_model_encode(self):
        run_child(self, CHILD_SETUP + """
race(lambda: libsae.Model.load(path), lambda m: m.encode(x),
     lambda f: np.array_equal(f, want))
print("ok")
""")

    def test_model_closed_under_a_steering_apply_and_a_trainer_step(self):
        # closing the model closes the plan (and the trainer) made from it: their calls in
        # flight keep both alive until they return
        run_child(self, CHILD_SETUP + """
def apply(s):
    y = x.copy()
    return s.apply(y)
race(lambda: libsae.Steering(libsae.Model.load(path)).clamp(3, 2.0), apply,
     lambda y: y.shape == x.shape and np.isfinite(y).all(), close_of=lambda s: s.model.close())
def make_trainer():
    t = libsae.Trainer(libsae.Model.load(path), seed=1)
    t.init(x)
    return t
race(make_trainer, lambda t: t.step(x), lambda mt: mt["steps"] >= 1,
     close_of=lambda t: t.model.close(), rounds=6)
print("ok")
""")

    @unittest.skipIf(not libsae.has("sae_steer_apply_to"), "needs 0.2 (transcoders)")
    def test_transcoder_calls(self):
        # a transcoder saved and loaded back (mapped): reconstruct, evaluate against a target,
        # decoder_norms and a steering plan's apply_to, each closed under a call in flight
        run_child(self, CHILD_SETUP + """
tpath = os.path.join(tmp, "t.safetensors")
t0 = libsae.Model.new_transcoder("relu", D_IN, D_SAE, 96, skip=True)
t0.set_tensor("W_enc", (rng.standard_normal((D_IN, D_SAE)) / 16).astype(np.float32))
t0.set_tensor("W_dec", (rng.standard_normal((D_SAE, 96)) / 16).astype(np.float32))
t0.set_tensor("W_skip", (rng.standard_normal((D_IN, 96)) / 16).astype(np.float32))
t0.save(tpath)
y = rng.standard_normal((N, 96)).astype(np.float32)
want_y, want_eval, want_norms = t0.reconstruct(x), t0.evaluate(x, y), t0.decoder_norms()
t0.close()
load = lambda: libsae.Model.load(tpath)
race(load, lambda m: m.reconstruct(x), lambda got: np.array_equal(got, want_y))
race(load, lambda m: m.evaluate(x, y), lambda got: got == want_eval)
race(load, lambda m: m.decoder_norms(), lambda got: np.array_equal(got, want_norms))
def apply_to(s):
    out = y.copy()
    return s.apply_to(x, out)
race(lambda: libsae.Steering(load()).clamp(3, 2.0), apply_to,
     lambda got: got.shape == y.shape and np.isfinite(got).all(),
     close_of=lambda s: s.model.close())
print("ok")
""")

    def test_npy_file_read(self):
        run_child(self, CHILD_SETUP + """
acts = os.path.join(tmp, "acts.npy")
libsae.save_npy(acts, np.tile(x, (8, 1)))
race(lambda: libsae.NpyFile(acts), lambda f: f.read(), lambda a: a.shape == (8 * N, D_IN))
print("ok")
""")

    def test_stats_update(self):
        run_child(self, CHILD_SETUP + """
race(lambda: libsae.Stats(D_SAE, 64), lambda st: st.update(np.tile(want, (4, 1))).counts(),
     lambda c: c.shape == (D_SAE,))
print("ok")
""")

    def test_changing_a_model_waits_for_its_encodes(self):
        # bf16_weights frees and reallocates W_enc and W_dec: while an encode on another thread
        # reads them, that would be a use after free
        run_child(self, CHILD_SETUP + """
m = libsae.Model.load(path)
stop = False
bad = []
def worker():
    while not stop:
        f = m.encode(x)
        if not np.isfinite(f).all() or f.shape != want.shape:
            bad.append("wrong")
threads = [threading.Thread(target=worker) for _ in range(2)]
for t in threads:
    t.start()
for i in range(40):
    m.set_param("bf16_weights", i % 2)
    time.sleep(random.uniform(0, 0.005))
stop = True
for t in threads:
    t.join()
assert not bad, bad
print("ok")
""")


class CloseSemantics(TestCase):
    def test_close_waits_for_a_call_in_flight_and_frees_after_it(self):
        m = libsae.Model.new("relu", 2, 3)
        log = []
        box = m._box
        orig = box.free
        box.free = lambda h: (log.append("free"), orig(h))
        entered, release = threading.Event(), threading.Event()

        def long_call():
            with m._use():  # what every method does around its C call
                entered.set()
                release.wait(10)
                log.append("call returned")

        t = threading.Thread(target=long_call)
        t.start()
        entered.wait(10)
        closer = threading.Thread(target=m.close)
        closer.start()
        closer.join(0.2)
        self.assertTrue(closer.is_alive(), "close() returned while a call was in flight")
        self.assertEqual(log, [])
        self.assertTrue(m.closed)
        with self.assertRaisesRegex(ValueError, "Model is closed"):
            m.encode([[0.0, 0.0]])  # refused at once, not waiting
        release.set()
        t.join(10)
        closer.join(10)
        self.assertEqual(log, ["call returned", "free"])

    def test_double_close_from_two_threads(self):
        m = libsae.Model.new("relu", 2, 3)
        log = []
        orig = m._box.free
        m._box.free = lambda h: (log.append(h), orig(h))
        ts = [threading.Thread(target=m.close) for _ in range(4)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(10)
        m.close()
        self.assertEqual(len(log), 1)

    @unittest.skipIf(np is None or not libsae.has("sae_trainer_new"), "needs the trainer")
    def test_close_from_inside_a_call_on_the_same_thread(self):
        # the allreduce callback runs inside sae_trainer_step: closing the trainer and its model
        # there must not free them under the step (nor wait for it: a deadlock), and changing
        # the model there is refused. In a child: freeing them under the step crashes.
        run_child(self, """
import numpy as np
import libsae
m = libsae.Model.new("topk", 64, 4096, k=4)
t = libsae.Trainer(m, seed=0)
x = np.random.default_rng(5).standard_normal((256, 64)).astype(np.float32)
t.init(x)
seen = []
def hook(buf):
    try:
        m.set_param("k", 3)
    except RuntimeError as e:
        seen.append(str(e))
    t.close()
    m.close()
    seen.append(("closed", t.closed, m.closed))
    buf[:] = 0.5  # the step goes on writing into the closed trainer's memory
t.set_allreduce(hook)
try:
    t.step(x)  # the step runs to its end; the metrics() after it are refused
    raise SystemExit("step after close worked")
except ValueError as e:
    assert "Trainer is closed" in str(e), e
assert seen and "in use by a call on this thread" in seen[0], seen
assert seen[1] == ("closed", True, True), seen
try:
    m.encode(x)
    raise SystemExit("encode after close worked")
except ValueError as e:
    assert "Model is closed" in str(e), e
print("ok")
""")


class AfterExit(TestCase):
    def test_late_use_is_refused(self):
        # atexit handlers run last-registered first: this one, registered before libsae made
        # its finalizers, runs after they freed every handle, as an object's __del__ can at
        # shutdown. The model must say it is closed, not be used freed.
        r = subprocess.run([sys.executable, "-c", textwrap.dedent("""
            import atexit
            held = []
            def late():
                try:
                    held[0].encode([[0.0] * 4])
                    print("used a freed model")
                except ValueError as e:
                    print("refused:", e)
            atexit.register(late)
            import libsae
            held.append(libsae.Model.new("relu", 4, 8))
            """)], capture_output=True, text=True, env=subprocess_env(), timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stdout.strip(), "refused: this Model is closed", r.stderr)


class Integers(TestCase):
    """Every integer argument is range-checked before ctypes could wrap it."""

    def test_sizes(self):
        for bad in (2 ** 64 + 4, 2 ** 64):
            with self.assertRaisesRegex(ValueError, "d_in must be at most 18446744073709551615"):
                libsae.Model.new("relu", bad, 8)
            with self.assertRaisesRegex(ValueError, "d_sae must be at most"):
                libsae.Model.new("relu", 4, bad)
        with self.assertRaisesRegex(ValueError, "d_in must be at least 0, not -1"):
            libsae.Model.new("relu", -1, 8)
        with self.assertRaisesRegex(TypeError, "d_in must be a whole number, not a bool"):
            libsae.Model.new("relu", True, 8)
        with self.assertRaisesRegex(TypeError, "d_in must be a whole number, not float"):
            libsae.Model.new("relu", 4.0, 8)
        with self.assertRaisesRegex(ValueError, "arch must be at most 2147483647"):
            libsae.Model.new(2 ** 32 + 1, 4, 8)  # would be 1, ReLU
        with self.assertRaisesRegex(ValueError, "d_sae must be at most"):
            libsae.Stats(2 ** 64 + 4, 2)
        with self.assertRaisesRegex(ValueError, "top_n must be at least 0"):
            libsae.Stats(4, -2)
        m = libsae.Model.new("topk", 4, 8, k=2)
        with self.assertRaisesRegex(ValueError, "encode_sparse: k must be at most"):
            m.encode_sparse([[0.0] * 4], 2 ** 64 + 1)
        if libsae.has("sae_model_new_transcoder"):
            for bad in (2 ** 64 + 4, 2 ** 64):  # would be 4 and 0
                with self.assertRaisesRegex(ValueError, "d_out must be at most"):
                    libsae.Model.new_transcoder("relu", 4, 8, bad)
            with self.assertRaisesRegex(ValueError, "d_in must be at most"):
                libsae.Model.new_transcoder("relu", 2 ** 64 + 4, 8, 4)
            with self.assertRaisesRegex(TypeError, "skip must be True or False"):
                libsae.Model.new_transcoder("relu", 4, 8, 4, skip=2)  # a C int: would be refused
            with self.assertRaisesRegex(ValueError, "normalize must be at most 2147483647"):
                m.set_param("normalize", 2 ** 32 + 1)  # as a C int: 1, layer_norm
            self.assertEqual(m.normalize, "none")
        # sizes of 0 are the C library's to judge, and it does
        self.assertLibsaeError(libsae.EINVAL, "at least 1", libsae.Model.new, "relu", 0, 8)

    def test_feature_indices(self):
        m = libsae.Model.new("relu", 4, 8)
        st = libsae.Stats(8, 2)
        for bad in (2 ** 32 + 3, 2 ** 64 + 3):  # would be feature 3
            with self.assertRaisesRegex(ValueError, "feature must be at most 4294967295"):
                st.top(bad)
            if libsae.has("sae_feature_neighbors"):
                with self.assertRaisesRegex(ValueError, "feature must be at most 4294967295"):
                    m.neighbors(bad, 2)
            if libsae.has("sae_steer_new"):
                s = libsae.Steering(m)
                for op in (s.clamp, s.scale, s.add):
                    with self.assertRaisesRegex(ValueError, "feature must be at most"):
                        op(bad, 1.0)
                with self.assertRaisesRegex(ValueError, "feature must be at most"):
                    s.remove(bad)
                self.assertEqual(len(s), 0)
        with self.assertRaisesRegex(ValueError, "feature must be at least 0, not -1"):
            st.top(-1)

    def test_npy_rows(self):
        p = os.path.join(tmpdir(self), "a.npy")
        libsae.save_npy(p, [1.0, 2.0, 3.0, 4.0], cols=2)
        with libsae.NpyFile(p) as f:
            with self.assertRaisesRegex(ValueError, "first must be at least 0, not -1"):
                f.read(-1)
            with self.assertRaisesRegex(ValueError, "count must be at most"):
                f.read(0, 2 ** 64 + 1)
            with self.assertRaisesRegex(ValueError, "first must be at most"):
                f.read(2 ** 64)
        with self.assertRaisesRegex(ValueError, "cols must be at most"):
            libsae.save_npy(p, [1.0] * 4, cols=2 ** 64 + 2)

    @unittest.skipIf(not libsae.has("sae_cvec_write"), "needs control vectors")
    def test_cvec_sizes(self):
        p = os.path.join(tmpdir(self), "v.gguf")
        with self.assertRaisesRegex(ValueError, "n_layer must be at most"):
            libsae.write_cvec(p, [0.0] * 4, 4, 2 ** 64 + 2)
        m = libsae.Model.new("relu", 4, 8)
        s = libsae.Steering(m).add(1, 1.0)
        with self.assertRaisesRegex(ValueError, "layer must be at most"):
            s.write_cvec(p, 2 ** 64 + 1, 3)
        self.assertFalse(os.path.exists(p))

    @unittest.skipIf(np is None, "numpy index arrays")
    def test_index_arrays_are_not_cast(self):
        m, _ = random_model("relu", 4, 8)
        val = np.ones((1, 2), np.float32)
        count = np.array([2], np.uint32)
        for bad, shown in ((2 ** 32 + 1, "4294967297"), (-1, "-1")):
            idx = np.array([[0, bad]], np.int64)  # as uint32: feature 1, or 2**32 - 1
            with self.assertRaisesRegex(ValueError, f"decode_sparse: idx: {shown} is outside "
                                        "uint32"):
                m.decode_sparse(idx, val, count)
            st = libsae.Stats(8, 2)
            with self.assertRaisesRegex(ValueError, f"idx: {shown} is outside uint32"):
                st.update_sparse(idx, val, count)
            self.assertEqual(st.tokens, 0)
        with self.assertRaisesRegex(ValueError, "count: 4294967298 is outside uint32"):
            m.decode_sparse(np.zeros((1, 2), np.int64), val, np.array([2 ** 32 + 2]))
        with self.assertRaisesRegex(ValueError, "ids: -5 is outside uint64"):
            libsae.Stats(8, 2).update(np.zeros((1, 8), np.float32), np.array([-5]))
        with self.assertRaisesRegex(TypeError, "expected integers"):
            m.decode_sparse(np.array([[0.0, 1.5]]), val, count)
        # in-range arrays of any integer type still work
        got = m.decode_sparse(np.array([[0, 3]], np.int64), val, count)
        want = m.decode_sparse(np.array([[0, 3]], np.uint32), val, count)
        self.assertTrue(np.array_equal(got, want))

    @unittest.skipIf(np is None, "numpy arrays")
    def test_float_inputs_are_numbers(self):
        m = libsae.Model.new("relu", 2, 3)
        for bad in (np.array([["1", "2"]]), np.array([[1 + 2j, 0]]), np.array([[True, False]])):
            with self.assertRaisesRegex(TypeError, "expected numbers"):
                m.encode(bad)

    def test_ctypes_signatures_check_too(self):
        # the last line of defence: even a direct call through the declared signatures cannot
        # pass a wrapped size or a cut string
        out = ctypes.c_void_p()
        with self.assertRaisesRegex(ctypes.ArgumentError, "size_t argument must be at most"):
            _lib.lib.sae_model_new(ctypes.byref(out), 1, 2 ** 64 + 4, 8)
        with self.assertRaisesRegex(ctypes.ArgumentError, "embedded null byte"):
            _lib.lib.sae_model_load(ctypes.byref(out), b"a.safetensors\0b")
        self.assertIsNone(out.value)


class Numbers(TestCase):
    """Floats and yes/no values: nothing C would read differently from what was written."""

    def test_float32_range(self):
        if not libsae.has("sae_steer_new"):
            self.skipTest("needs steering")
        s = libsae.Steering(libsae.Model.new("relu", 2, 4))
        with self.assertRaisesRegex(ValueError, "value is outside float32's range"):
            s.clamp(1, 1e39)  # ctypes would pass infinity
        with self.assertRaisesRegex(TypeError, "factor must be a number, not str"):
            s.scale(1, "2")
        self.assertLibsaeError(libsae.EINVAL, "not a finite number", s.add, 1, float("nan"))
        s.clamp(1, 3.4028234e38)
        self.assertEqual(s.ops()[0][0], 1)

    def test_doubles_are_exact(self):
        m = libsae.Model.new("topk", 2, 4)
        with self.assertRaisesRegex(TypeError, "input_scale must be a number, not str"):
            m.set_param("input_scale", "2")
        with self.assertRaisesRegex(ValueError, "k cannot be passed exactly as a double"):
            m.set_param("k", 2 ** 53 + 1)
        if libsae.has("sae_trainer_new"):
            t = libsae.Trainer(m)
            with self.assertRaisesRegex(ValueError, "seed cannot be passed exactly"):
                t.set_param("seed", 2 ** 53 + 1)  # would silently be 2**53
            t.set_param("seed", 2 ** 53)
            self.assertEqual(t.get_param("seed"), 2 ** 53)
            with self.assertRaisesRegex(TypeError, "lr must be a number"):
                libsae.Trainer(m, lr="0.1")

    def test_flags(self):
        m = libsae.Model.new("relu", 2, 4)
        for bad in ("false", "no", 2, None, 0.5):
            with self.assertRaisesRegex(TypeError, "apply_b_dec_to_input must be True or False"):
                m.apply_b_dec_to_input = bad
            self.assertTrue(m.apply_b_dec_to_input)
        m.apply_b_dec_to_input = False
        self.assertFalse(m.apply_b_dec_to_input)
        m.apply_b_dec_to_input = 1
        self.assertTrue(m.apply_b_dec_to_input)
        if np is not None:
            m.apply_b_dec_to_input = np.False_
            self.assertFalse(m.apply_b_dec_to_input)
        with self.assertRaisesRegex(TypeError, "copy must be True or False"):
            libsae.Model.load("x.safetensors", copy="no")

    def test_arch_names(self):
        with self.assertRaisesRegex(ValueError, "embedded null"):
            libsae.Model.new("relu\0topk", 2, 4)  # C would read "relu"
        with self.assertRaisesRegex(TypeError, "arch must be a name"):
            libsae.Model.new(None, 2, 4)


class Paths(TestCase):
    """A path with a NUL byte would be cut short by ctypes: another file would be touched."""

    def test_nul_bytes_are_refused_everywhere(self):
        d = tmpdir(self)
        good = os.path.join(d, "m.safetensors")
        m = libsae.Model.new("relu", 2, 4)
        m.save(good)
        acts = os.path.join(d, "a.npy")
        libsae.save_npy(acts, [1.0, 2.0], cols=2)
        calls = [("Model.load", lambda p: libsae.Model.load(p)),
                 ("Model.load(copy=True)", lambda p: libsae.Model.load(p, copy=True)),
                 ("Model.save", m.save),
                 ("NpyFile", libsae.NpyFile),
                 ("save_npy", lambda p: libsae.save_npy(p, [1.0, 2.0], cols=2))]
        if libsae.has("sae_steer_new"):
            s = libsae.Steering(m).add(1, 1.0)
            calls.append(("Steering.write_cvec", lambda p: s.write_cvec(p, 1, 3)))
        if libsae.has("sae_cvec_write"):
            calls.append(("write_cvec", lambda p: libsae.write_cvec(p, [0.0] * 4, 2, 3)))
        if libsae.has("sae_trainer_new"):
            t = libsae.Trainer(libsae.Model.new("relu", 2, 4))
            calls.append(("Trainer.save", t.save))
            calls.append(("Trainer.load", t.load))
        before = sorted(os.listdir(d))
        for name, fn in calls:
            for target in (good, acts):
                for p in (target + "\0.bak", os.fsencode(target) + b"\0x"):
                    with self.subTest(name, path=p), \
                            self.assertRaisesRegex(ValueError, "embedded null byte"):
                        fn(p)
        self.assertEqual(sorted(os.listdir(d)), before)

    def test_str_bytes_and_pathlike(self):
        import pathlib
        d = tmpdir(self)
        m = libsae.Model.new("relu", 2, 4)
        for p in (os.path.join(d, "a"), os.fsencode(os.path.join(d, "b")),
                  pathlib.Path(d) / "c"):
            m.save(p)
            self.assertEqual(libsae.Model.load(p).d_sae, 4)
        with self.assertRaisesRegex(TypeError, "path must be a str, bytes or os.PathLike"):
            libsae.Model.load(3)

    def test_cli_refuses_them(self):
        from libsae.__main__ import main
        import contextlib
        import io
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(["info", "m.safetensors\0x"])
        self.assertEqual(rc, 1)
        self.assertIn("embedded null byte", err.getvalue())


class OutArrays(TestCase):
    """`out=` must be exactly the result's shape, float32, C-contiguous and writable."""

    @unittest.skipIf(np is None, "numpy arrays")
    def test_numpy(self):
        m, _ = random_model("relu", 4, 6)
        x = np.ones((3, 4), np.float32)
        cases = [(m.encode, x, (3, 6)), (m.decode, np.ones((3, 6), np.float32), (3, 4)),
                 (m.reconstruct, x, (3, 4))]
        for fn, arg, shape in cases:
            with self.subTest(fn.__name__):
                for wrong in ((shape[1], shape[0]), (shape[0] * shape[1],), (1,) + shape):
                    with self.assertRaisesRegex(ValueError, "expected shape"):
                        fn(arg, out=np.zeros(wrong, np.float32))  # same size, other shape
                with self.assertRaisesRegex(TypeError, "float32"):
                    fn(arg, out=np.zeros(shape, np.float64))
                with self.assertRaisesRegex(TypeError, "contiguous=False"):
                    fn(arg, out=np.zeros((shape[1], shape[0]), np.float32).T)
                ro = np.zeros(shape, np.float32)
                ro.flags.writeable = False
                with self.assertRaisesRegex(TypeError, "writable=False"):
                    fn(arg, out=ro)
                out = np.zeros(shape, np.float32)
                self.assertIs(fn(arg, out=out), out)
                self.assertTrue(np.array_equal(out, fn(arg)))
        y = x.copy()
        self.assertIs(m.reconstruct(y, out=y), y)  # in place still works
        if libsae.has("sae_model_new_transcoder"):
            t = libsae.Model.new_transcoder("relu", 4, 6, 3, skip=True)
            for fn, arg in ((t.decode, np.ones((3, 6), np.float32)), (t.reconstruct, x)):
                with self.subTest("transcoder " + fn.__name__):
                    for wrong in ((3, 4), (1, 3, 3), (9,)):  # [n, d_in] is wrong: d_out is 3
                        with self.assertRaisesRegex(ValueError, r"expected shape \[3, 3\]"):
                            fn(arg, out=np.zeros(wrong, np.float32))
                    out = np.zeros((3, 3), np.float32)
                    self.assertIs(fn(arg, out=out), out)
            with self.assertRaisesRegex(ValueError, "expected shape"):
                t.reconstruct(x.copy(), out=x)  # in place needs d_out = d_in

    def test_buffers(self):
        m = libsae.Model.new("relu", 4, 6)
        x = array.array("f", [1.0] * 12)  # 3 rows
        out = memoryview(bytearray(4 * 18)).cast("B").cast("f", (6, 3))
        with self.assertRaisesRegex(ValueError, "expected shape"):
            m.encode(x, out=out)
        with self.assertRaisesRegex(TypeError, "float32"):
            m.encode(x, out=array.array("d", [0.0] * 18))
        ok = memoryview(bytearray(4 * 18)).cast("B").cast("f", (3, 6))
        self.assertIs(m.encode(x, out=ok), ok)
        flat = array.array("f", [0.0] * 18)
        self.assertIs(m.encode(x, out=flat), flat)


@unittest.skipIf(np is None or not hasattr(_lib.lib, "sae_model_load_with"),
                 "the C library has no sae_model_load_with")
class LoadCopy(TestCase):
    def test_copy_survives_the_file_changing(self):
        # In a child: a mapped model whose file is truncated faults (SIGBUS) on the next encode;
        # copy=True must not, and must keep the weights it read.
        run_child(self, """
import os, tempfile
import numpy as np
import libsae
d = tempfile.mkdtemp()
p = os.path.join(d, "m.safetensors")
rng = np.random.default_rng(3)
m0 = libsae.Model.new("relu", 64, 512)
m0.set_tensor("W_enc", rng.standard_normal((64, 512)).astype(np.float32))
m0.save(p)
x = rng.standard_normal((8, 64)).astype(np.float32)
want = m0.encode(x)
m = libsae.Model.load(p, copy=True)
assert np.array_equal(m.encode(x), want)
with open(p, "r+b") as f:
    f.truncate(0)
os.remove(p)
assert np.array_equal(m.encode(x), want)
assert np.array_equal(m.get_tensor("W_enc"), m0.get_tensor("W_enc"))
print("ok")
""")

    def test_copy_loads_the_same_model(self):
        d = tmpdir(self)
        p = os.path.join(d, "m.safetensors")
        m0, _ = random_model("jumprelu", 8, 16)
        m0.save(p)
        a, b = libsae.Model.load(p), libsae.Model.load(p, copy=True)
        for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold"):
            self.assertTrue(np.array_equal(a.get_tensor(name), b.get_tensor(name)), name)
        self.assertEqual((b.arch, b.d_in, b.d_sae, b.format), ("jumprelu", 8, 16, "libsae"))
        self.assertLibsaeError(libsae.EIO, "", libsae.Model.load, os.path.join(d, "no"),
                               copy=True)


if __name__ == "__main__":
    unittest.main()
