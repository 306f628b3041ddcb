"""Training an SAE or a transcoder in place: Adam steps on batches of activations."""
from __future__ import annotations

import ctypes
from typing import Any, Callable, Dict, List, Optional, Sequence

from . import _args as A
from . import _buffers as B
from ._handle import Handle
from ._lib import ALLREDUCE_FN, ESTATE, LibsaeError, lib, require
from ._enums import TRAIN_METRICS, TRAIN_PARAMS
from ._model import Model, _path

#: sae_train_param and sae_train_metric values by name (defined in _enums).
METRICS = TRAIN_METRICS
_COUNTS = ("steps", "tokens", "heldout_step", "warnings")


class Trainer(Handle):
    """Trains a model in place (ReLU with the L1 penalty, TopK with AuxK, BatchTopK, Matryoshka
    BatchTopK with ``groups=``, JumpReLU with the L0 penalty), an SAE or a transcoder
    (``init(x, y)``, ``step(x, y)`` with its targets y).

    ``Trainer(m, lr=1e-3, l1_coeff=5.0, seed=0)``: keyword arguments set parameters by name
    (the keys of ``libsae.TRAIN_PARAMS``: lr, l1_coeff, auxk, auxk_coeff, dead_tokens,
    warmup_steps, beta1, beta2, seed, total_steps, l1_warmup_steps, lr_decay_steps, grad_clip,
    decoder_init_norm, threshold_lr, adam_eps, normalize_input, b_dec_init, jumprelu_bandwidth,
    jumprelu_init_threshold, l0_coeff; docs/training.md gives each one's meaning and default).
    ``groups=[a, b, ...]`` (a BatchTopK model only) trains Matryoshka-style with those group
    sizes (see :meth:`set_groups`). Call :meth:`init` once with a sample of the data,
    then :meth:`step` per batch. The trainer keeps its model alive; the model's weights change
    with every step, and a step waits until no other thread is inside a call on the model
    (and makes encodes of it wait).
    """

    _kind = "Trainer"

    def __init__(self, model: Model, groups: Optional[Sequence[int]] = None, **params: float):
        require("sae_trainer_new")
        if not isinstance(model, Model):
            raise TypeError(f"Trainer needs a libsae.Model, not {type(model).__name__}")
        for name in params:
            _param(name)
        out = ctypes.c_void_p()
        with model._use(write=True) as mh:  # the model cannot be freed before the trainer holds it
            lib.sae_trainer_new(ctypes.byref(out), mh)
            self.model = model
            self._own(out.value, lib.sae_trainer_free, parent=model)
        self._allreduce = None
        for name, v in params.items():
            self.set_param(name, v)
        if groups is not None:
            self.set_groups(groups)

    def set_groups(self, sizes: Optional[Sequence[int]]) -> None:
        """Matryoshka training of a BatchTopK model: consecutive latents in groups of these
        sizes (each >= 1, summing to d_sae), and a reconstruction loss for every prefix of
        groups. None or [] goes back to plain BatchTopK."""
        require("sae_trainer_set_groups")
        sizes = [] if sizes is None else [A.size(v, "group size", 1) for v in sizes]
        arr = (ctypes.c_size_t * max(1, len(sizes)))(*sizes)
        with self._use(write=True) as h:
            lib.sae_trainer_set_groups(h, arr, len(sizes))

    def groups(self) -> List[int]:
        """The Matryoshka group sizes ([] without groups)."""
        require("sae_trainer_get_groups")
        n = ctypes.c_size_t()
        with self._use() as h:
            lib.sae_trainer_get_groups(h, None, 0, ctypes.byref(n))
            arr = (ctypes.c_size_t * max(1, n.value))()
            lib.sae_trainer_get_groups(h, arr, n.value, ctypes.byref(n))
        return list(arr[:n.value])

    def set_param(self, name: str, value: float) -> None:
        """Sets a training parameter by name; the C library checks the value."""
        p, v = _param(name), A.real(value, name)
        with self._use(write=True) as h:
            lib.sae_trainer_set_param(h, p, v)

    def get_param(self, name: str) -> float:
        require("sae_trainer_get_param")
        p = _param(name)
        v = ctypes.c_double()
        with self._use() as h:
            lib.sae_trainer_get_param(h, p, ctypes.byref(v))
        return v.value

    def params(self) -> Dict[str, float]:
        """Every training parameter, by name."""
        return {name: self.get_param(name) for name in TRAIN_PARAMS}

    def init(self, x: Any, y: Any = None) -> None:
        """Data-aware initialization from activations x [..., d_in] (docs/training.md). A
        transcoder needs its targets y [..., d_out] (what it predicts from x, e.g. an MLP's
        output for its input); an SAE takes none, or y equal to x."""
        xp, keep, n, _ = B.as_input(x, self.model.d_in, "Trainer.init: x")
        yp, keep_y = self._target(y, n, "Trainer.init")
        with self._use(write=True, parent_write=True) as h:
            if yp is None:
                lib.sae_trainer_init(h, xp, n)
            else:
                lib.sae_trainer_init_to(h, xp, yp, n)
        del keep, keep_y

    def step(self, x: Any, y: Any = None) -> Dict[str, float]:
        """One Adam step on the batch x [..., d_in] (with a transcoder's targets y [..., d_out]);
        returns :meth:`metrics` (a transcoder's describe y: FVU of its prediction)."""
        xp, keep, n, _ = B.as_input(x, self.model.d_in, "Trainer.step: x")
        yp, keep_y = self._target(y, n, "Trainer.step")
        with self._use(write=True, parent_write=True) as h:
            if yp is None:
                lib.sae_trainer_step(h, xp, n)
            else:
                lib.sae_trainer_step_to(h, xp, yp, n)
        del keep, keep_y
        return self.metrics()

    def _target(self, y: Any, n: int, what: str):
        if y is None:
            return None, None
        require("sae_trainer_init_to")
        yp, keep_y, ny, _ = B.as_input(y, self.model.d_out, f"{what}: y")
        if ny != n:
            raise ValueError(f"{what}: x has {n} tokens but y has {ny}")
        return yp, keep_y

    def metrics(self) -> Dict[str, float]:
        """The last step's batch: loss, mse, fvu, l0, dead_fraction, auxk_loss, lr, grad_norm,
        the counts steps and tokens (ints), warnings (an int, TRAIN_WARNINGS bits), and once the
        held-out tokens have been evaluated heldout_fvu, heldout_mse, heldout_l0 and heldout_step
        (the step they describe). Before the first step only the counts and warnings."""
        v = ctypes.c_double()
        out: Dict[str, float] = {}
        with self._use() as h:
            for name, key in METRICS.items():
                try:
                    lib.sae_trainer_get_metric(h, key, ctypes.byref(v))
                except LibsaeError as e:
                    if e.code == ESTATE:
                        continue
                    raise
                out[name] = int(v.value) if name in _COUNTS else v.value
        if not out.get("heldout_step"):  # never evaluated: no NaN entries
            for name in ("heldout_fvu", "heldout_mse", "heldout_l0", "heldout_step"):
                out.pop(name, None)
        return out

    def set_heldout(self, x: Any = None, y: Any = None) -> None:
        """Held-out tokens x [..., d_in] (a transcoder's with their targets y [..., d_out]),
        copied: the metrics heldout_fvu, heldout_mse and heldout_l0 describe them, evaluated
        every ``heldout_every`` steps and at ``total_steps`` (docs/training.md). None removes
        them."""
        require("sae_trainer_set_heldout")
        if x is None:
            with self._use(write=True) as h:
                lib.sae_trainer_set_heldout(h, None, None, 0)
            return
        xp, keep, n, _ = B.as_input(x, self.model.d_in, "Trainer.set_heldout: x")
        yp, keep_y = self._target(y, n, "Trainer.set_heldout")
        with self._use(write=True, parent_write=True) as h:
            lib.sae_trainer_set_heldout(h, xp, yp, n)
        del keep, keep_y

    def warning(self) -> Optional[str]:
        """The run's warnings in force (metrics()["warnings"]) as a sentence naming the knob to
        change, or None."""
        require("sae_trainer_warning")
        with self._use() as h:
            w = lib.sae_trainer_warning(h)
        return None if w is None else w.decode("utf-8", "replace")

    def save(self, path) -> None:
        """Writes a checkpoint: the model and everything training needs to continue bit for bit
        (optimizer moments, counters, parameters), atomically. It also loads as a plain Model."""
        p = _path(path)
        with self._use() as h:
            lib.sae_trainer_save(h, p)

    def load(self, path) -> None:
        """Resumes from a checkpoint written by save, into this trainer and its model (same
        architecture and shape); on failure nothing changes."""
        p = _path(path)
        with self._use(write=True, parent_write=True) as h:
            lib.sae_trainer_load(h, p)

    def set_allreduce(self, fn: Optional[Callable[[Any], None]]) -> None:
        """Data-parallel training: fn(buf) is called once per step with this process's gradient
        sums (a float32 array, numpy if available, else a memoryview) and must replace them in
        place with the sum over all processes (e.g. mpi4py's ``comm.Allreduce(MPI.IN_PLACE,
        buf)``). An exception from fn makes the step fail (LibsaeError ECALLBACK). None removes
        the hook."""
        if fn is None:
            with self._use(write=True) as h:
                lib.sae_trainer_set_allreduce(h, ALLREDUCE_FN(), None)
                self._allreduce = None
            return

        def trampoline(buf: int, count: int, user: int) -> int:
            try:
                arr = (ctypes.c_float * count).from_address(buf)
                fn(B.np.frombuffer(arr, dtype=B.np.float32) if B.HAVE_NUMPY
                   else memoryview(arr).cast("B").cast("f"))
                return 0
            except BaseException:  # noqa: B902 -- a C caller cannot take a Python exception
                return 1

        cb = ALLREDUCE_FN(trampoline)
        with self._use(write=True) as h:
            lib.sae_trainer_set_allreduce(h, cb, None)
            self._allreduce = cb  # the C library keeps the pointer: keep the thunk alive


def _param(name: str) -> int:
    try:
        return TRAIN_PARAMS[name]
    except KeyError:
        raise KeyError(f"unknown training parameter {name!r}; parameters are "
                       f"{', '.join(TRAIN_PARAMS)}") from None
