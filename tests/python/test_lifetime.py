"""Handles: freed exactly once, children before their parent, context managers, use after close."""
import gc
import unittest

from _support import TestCase, libsae, np, random_model, ref_encode
from libsae._handle import _Box


def record_free(obj, log, label):
    """Wraps obj's C free function so that each call is logged."""
    box = obj._box
    orig = box.free

    def free(h):
        log.append((label, h))
        orig(h)

    box.free = free
    return box.h


class TestBox(unittest.TestCase):
    def test_parent_outlives_children_whatever_the_order(self):
        log = []
        parent = _Box(1, lambda h: log.append(("parent", h)))
        a = _Box(2, lambda h: log.append(("a", h)), parent)
        b = _Box(3, lambda h: log.append(("b", h)), parent)
        parent.decref()  # the parent's Python object goes first
        self.assertEqual(log, [])
        a.decref()
        self.assertEqual(log, [("a", 2)])
        b.decref()
        self.assertEqual(log, [("a", 2), ("b", 3), ("parent", 1)])


class TestLifetime(TestCase):
    def test_freed_once_when_collected(self):
        log = []
        m = libsae.Model.new("relu", 3, 4)
        h = record_free(m, log, "model")
        del m
        gc.collect()
        self.assertEqual(log, [("model", h)])

    def test_close_frees_now_and_once(self):
        log = []
        m = libsae.Model.new("relu", 3, 4)
        h = record_free(m, log, "model")
        m.close()
        self.assertEqual(log, [("model", h)])
        self.assertTrue(m.closed)
        m.close()
        del m
        gc.collect()
        self.assertEqual(log, [("model", h)])

    def test_context_manager(self):
        log = []
        with libsae.Model.new("topk", 3, 4) as m:
            h = record_free(m, log, "model")
            self.assertEqual(m.d_sae, 4)
        self.assertEqual(log, [("model", h)])
        with self.assertRaisesRegex(ValueError, "Model is closed"):
            m.encode([[0.0, 0.0, 0.0]])
        with self.assertRaisesRegex(ValueError, "closed"):
            m.get_tensor("W_enc")
        self.assertIn("closed", repr(m))
        # an exception inside the block still frees the model
        log2 = []
        with self.assertRaises(RuntimeError):
            with libsae.Model.new("relu", 2, 2) as m2:
                h2 = record_free(m2, log2, "model")
                raise RuntimeError
        self.assertEqual(log2, [("model", h2)])

    def test_npy_file_closes(self):
        import os
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "a.npy")
            libsae.save_npy(p, [1.0, 2.0, 3.0, 4.0], cols=2)
            with libsae.NpyFile(p) as f:
                self.assertEqual(f.shape, (2, 2))
            with self.assertRaisesRegex(ValueError, "closed"):
                f.read()


@unittest.skipIf(np is None or not libsae.has("sae_steer_new"), "needs numpy and steering")
class TestChildren(TestCase):
    def test_steering_keeps_its_model_alive(self):
        log = []
        m, w = random_model("relu", 8, 16)
        s = libsae.Steering(m).clamp(2, 1.0)
        hm = record_free(m, log, "model")
        hs = record_free(s, log, "steer")
        model_ref = m
        del m
        gc.collect()
        self.assertEqual(log, [])
        self.assertIs(s.model, model_ref)
        del model_ref
        gc.collect()
        self.assertEqual(log, [])  # the plan still holds the model
        x = np.random.default_rng(31).standard_normal((3, 8)).astype(np.float32)
        self.assertEqual(s.apply(x).shape, (3, 8))  # reads live weights
        del s
        gc.collect()
        self.assertEqual(log, [("steer", hs), ("model", hm)])

    def test_cycle_collected_in_order(self):
        log = []
        m, _ = random_model("relu", 8, 16)
        s = libsae.Steering(m)
        m.plan = s  # model -> plan -> model: only the cycle collector frees them
        hm = record_free(m, log, "model")
        hs = record_free(s, log, "steer")
        del m, s
        gc.collect()
        self.assertEqual(log, [("steer", hs), ("model", hm)])

    def test_closing_the_model_closes_its_children(self):
        log = []
        m, _ = random_model("relu", 8, 16)
        s = libsae.Steering(m).clamp(1, 0.0)
        st = libsae.Stats(16, 2)  # not a child: independent of the model
        hm = record_free(m, log, "model")
        hs = record_free(s, log, "steer")
        m.close()
        self.assertEqual(log, [("steer", hs), ("model", hm)])
        self.assertTrue(s.closed)
        self.assertFalse(st.closed)
        with self.assertRaisesRegex(ValueError, "Steering is closed"):
            s.apply(np.zeros((1, 8), np.float32))
        with self.assertRaisesRegex(ValueError, "Model is closed"):
            libsae.Steering(m)

    def test_with_steering(self):
        m, w = random_model("relu", 8, 16)
        x = np.random.default_rng(32).standard_normal((3, 8)).astype(np.float32)
        with libsae.Steering(m) as s:
            s.add(3, 1.0).apply(x)
        self.assertTrue(s.closed)
        self.assertFalse(m.closed)
        self.assertEqual(m.encode(x).shape, (3, 16))

    @unittest.skipIf(not libsae.has("sae_trainer_new"), "needs the trainer")
    def test_trainer_keeps_its_model_alive(self):
        log = []
        m, _ = random_model("topk", 8, 16, k=4)
        t = libsae.Trainer(m, seed=1)
        hm = record_free(m, log, "model")
        ht = record_free(t, log, "trainer")
        del m
        gc.collect()
        self.assertEqual(log, [])
        x = np.random.default_rng(33).standard_normal((64, 8)).astype(np.float32)
        t.init(x)
        t.step(x)
        del t
        gc.collect()
        self.assertEqual(log, [("trainer", ht), ("model", hm)])


if __name__ == "__main__":
    unittest.main()
