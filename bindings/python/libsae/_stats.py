"""Feature statistics (firing counts, sums, maxima, top examples) and decoder neighbours."""
from __future__ import annotations

import ctypes
from typing import Any, Optional, Tuple

from . import _args as A
from . import _buffers as B
from ._handle import Handle
from ._lib import lib, require


class Stats(Handle):
    """An accumulator over batches of codes: per feature, the tokens it fired on (value > 0),
    the sum and maximum of its values, and its top_n examples (value, example id).

    ``st = libsae.Stats(m.d_sae, top_n=20); st.update(m.encode(x), ids)``; two accumulators of
    the same shape merge, so threads or processes can split the data.
    """

    _kind = "Stats"

    def __init__(self, d_sae: int, top_n: int = 16):
        require("sae_stats_new")
        out = ctypes.c_void_p()
        lib.sae_stats_new(ctypes.byref(out), A.size(d_sae, "d_sae"), A.size(top_n, "top_n"))
        self._own(out.value, lib.sae_stats_free)
        self.d_sae: int = lib.sae_stats_d_sae(out.value)
        self.top_n: int = lib.sae_stats_top_n(out.value)

    @property
    def tokens(self) -> int:
        """Tokens seen so far."""
        with self._use() as h:
            return lib.sae_stats_tokens(h)

    def _ids(self, ids: Any, n: int) -> Tuple[Optional[int], Any]:
        if ids is None:
            return None, None
        return B.as_exact(ids, (n,), "Q", "Stats: ids")

    def update(self, f: Any, ids: Any = None) -> "Stats":
        """Adds dense codes f [..., d_sae]; ids (uint64, one per token) name the examples, or
        None numbers them by position from `tokens`."""
        fp, keep, n, _ = B.as_input(f, self.d_sae, "Stats.update: f")
        ip, keep_ids = self._ids(ids, n)
        with self._use(write=True) as h:
            lib.sae_stats_update(h, fp, n, ip)
        return self

    def update_sparse(self, idx: Any, val: Any, count: Any, ids: Any = None,
                      k: Optional[int] = None) -> "Stats":
        """Adds sparse codes laid out as Model.encode_sparse returns them."""
        if B.HAVE_NUMPY:
            count = B.np.asarray(count).reshape(-1)
            n = count.shape[0]
            if k is None:
                k = B.np.shape(idx)[-1]
            idx = B.np.asarray(idx).reshape(n, k) if B.np.size(idx) == n * k else idx
            val = B.np.asarray(val).reshape(n, k) if B.np.size(val) == n * k else val
        else:
            n = len(count) if isinstance(count, (list, tuple)) else memoryview(count).nbytes // 4
            if k is None:
                total = len(idx) if isinstance(idx, (list, tuple)) else memoryview(idx).nbytes // 4
                if n == 0 or total % n:
                    raise ValueError("Stats.update_sparse: pass k: it cannot be told from the "
                                     "buffers")
                k = total // n
        k = A.size(k, "Stats.update_sparse: k", lo=1)
        ip, k1 = B.as_exact(idx, (n, k), B.U32, "Stats.update_sparse: idx")
        vp, k2 = B.as_exact(val, (n, k), "f", "Stats.update_sparse: val")
        cp, k3 = B.as_exact(count, (n,), B.U32, "Stats.update_sparse: count")
        idp, k4 = self._ids(ids, n)
        with self._use(write=True) as h:
            lib.sae_stats_update_sparse(h, ip, vp, cp, k, n, idp)
        return self

    def merge(self, other: "Stats") -> "Stats":
        """Adds everything `other` has seen to this accumulator."""
        if not isinstance(other, Stats):
            raise TypeError(f"Stats.merge needs a Stats, not {type(other).__name__}")
        with self._use(write=True, reads=(other,)) as (h, oh):
            lib.sae_stats_merge(h, oh)
        return self

    def counts(self) -> Any:
        """Tokens each feature fired on, uint64 [d_sae] (frequency = counts / tokens)."""
        out, ptr = B.new_output((self.d_sae,), "Q")
        with self._use() as h:
            lib.sae_stats_counts(h, ptr)
        return out

    def sums(self) -> Any:
        """Sum of each feature's values where it fired, float64 [d_sae]."""
        out, ptr = B.new_output((self.d_sae,), "d")
        with self._use() as h:
            lib.sae_stats_sums(h, ptr)
        return out

    def max(self) -> Any:
        """Each feature's largest value (0 if it never fired), float32 [d_sae]."""
        out, ptr = B.new_output((self.d_sae,))
        with self._use() as h:
            lib.sae_stats_max(h, ptr)
        return out

    def top(self, feature: int) -> Tuple[Any, Any]:
        """One feature's top examples, largest first: (values float32 [m], ids uint64 [m]),
        m <= top_n."""
        f = A.u32(feature, "feature")
        val, vp = B.new_output((self.top_n,))
        ids, ip = B.new_output((self.top_n,), "Q")
        n = ctypes.c_size_t()
        with self._use() as h:
            lib.sae_stats_top(h, f, vp, ip, ctypes.byref(n))
        return val[:n.value], ids[:n.value]

    def __repr__(self) -> str:
        try:
            tokens = self.tokens
        except ValueError:
            return "<libsae.Stats closed>"
        return f"<libsae.Stats d_sae={self.d_sae} top_n={self.top_n} tokens={tokens}>"


def neighbors(model, feature: int, k: int = 10) -> Tuple[Any, Any]:
    """The k features whose decoder directions are closest to `feature`'s by cosine similarity,
    most similar first, itself excluded: (idx uint32 [k], cos float32 [k])."""
    require("sae_feature_neighbors")
    f, k = A.u32(feature, "feature"), A.size(k, "k")
    idx, ip = B.new_output((k,), B.U32)
    cos, cp = B.new_output((k,))
    with model._use() as h:
        lib.sae_feature_neighbors(h, f, k, ip, cp)
    return idx, cos
