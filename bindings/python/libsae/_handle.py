"""Owning C handles: each is freed exactly once, never while a call uses it, children before
their parent.

A handle lives in a :class:`_Box` with a reference count: one reference for the Python object
that owns it, one for each child handle made from it (a steering plan or trainer holds its
model's box), and one for each call in flight. The C free function runs when the count reaches
zero, so

- a model is never freed while a plan that reads its weights exists, whatever order the garbage
  collector (or the interpreter's exit) finalizes the Python objects in;
- ``close()`` on one thread while another thread is inside a C call on the same handle (ctypes
  releases the GIL during the call) never frees it under that call: ``close()`` refuses new
  calls at once, waits for the calls in flight to return, and the last of them frees it.

Every call goes through :meth:`Handle._use`, which also keeps the C library's threading rule:
functions taking a ``const`` handle may run on many threads at once, the others need the
handle alone. A call that changes a handle (``write=True``) waits until no other thread uses
it; calls that only read it wait for such a writer. The handles of one call are taken all at
once, so two calls never deadlock by each holding one handle and waiting for the other.
"""
from __future__ import annotations

import threading
import weakref
from typing import Callable, Dict, List, Optional, Tuple

#: One lock for every box: taking the handles of one call is then a single atomic step.
_cond = threading.Condition(threading.Lock())
_lock = _cond  # older name


class _Box:
    __slots__ = ("h", "free", "refs", "parent", "kind", "closed", "freeing", "holders",
                 "writer", "waiting_writers")

    def __init__(self, h: int, free: Callable[[int], None], parent: Optional["_Box"] = None,
                 kind: str = "object"):
        self.h = h
        self.free = free
        self.refs = 1  # the owner's
        self.parent = parent
        self.kind = kind
        self.closed = False  # no new call may start
        self.freeing = False  # the C free function is running
        self.holders: Dict[int, int] = {}  # thread id -> calls in flight on this box
        self.writer: Optional[int] = None  # the thread changing it, if any
        self.waiting_writers = 0
        if parent is not None:
            with _cond:
                if parent.closed or parent.h is None:
                    raise ValueError(f"this {parent.kind} is closed")
                parent.refs += 1

    def decref(self) -> None:
        with _cond:
            dead = self._drop_locked()
        if dead:
            self._free_now()

    def _drop_locked(self) -> bool:
        """Drops one reference (the caller holds _cond); True if the caller must now free it
        with _free_now, outside the lock."""
        self.refs -= 1
        if self.refs == 0 and self.h is not None and not self.freeing:
            self.closed = True
            self.freeing = True
            return True
        return False

    def _free_now(self) -> None:
        try:
            self.free(self.h)
        finally:
            try:
                if self.parent is not None:
                    self.parent.decref()  # before `freeing` clears: close() waits for both
            finally:
                with _cond:
                    self.h = None
                    self.freeing = False
                    _cond.notify_all()

    def drop_owner(self) -> None:
        """The owning Python object is closed or collected: refuse new calls, drop its
        reference. Runs once (weakref.finalize), also at the interpreter's exit."""
        with _cond:
            self.closed = True
            _cond.notify_all()
        self.decref()

    def idle(self, me: int) -> bool:
        """Whether close() may return: no call in flight on another thread, not being freed.
        Calls of this very thread (a callback or __del__ running inside one) are not waited
        for: they end after close() returns, and the last one frees the handle."""
        return not self.freeing and all(t == me for t in self.holders)


def _closed(box: _Box) -> ValueError:
    return ValueError(f"this {box.kind} is closed")


class _Use:
    """``with handle._use(...) as h:`` the handles of one C call, held until it returns."""

    __slots__ = ("reqs", "nret", "taken")

    def __init__(self, reqs: List[Tuple[Optional[_Box], bool]], nret: int):
        self.reqs = reqs
        self.nret = nret  # 0: return the first handle alone, else a tuple of the first nret
        self.taken: List[Tuple[_Box, bool]] = []

    def __enter__(self):
        me = threading.get_ident()
        boxes: Dict[int, Tuple[_Box, bool]] = {}
        for box, write in self.reqs:  # one box asked for twice: once, writing if either writes
            if box is not None:
                prev = boxes.get(id(box))
                boxes[id(box)] = (box, write or (prev is not None and prev[1]))
        want = list(boxes.values())
        with _cond:
            waiting = False
            try:
                while True:
                    blocked = False
                    for box, write in want:
                        if box.closed or box.h is None:
                            raise _closed(box)
                        if box.holders.get(me):
                            if write:
                                raise RuntimeError(
                                    f"this {box.kind} is in use by a call on this thread (a "
                                    "callback or __del__ running inside it): it cannot be "
                                    "changed until that call returns")
                        elif write:
                            blocked = blocked or bool(box.holders)
                        else:
                            blocked = blocked or box.writer is not None or box.waiting_writers > 0
                    if not blocked:
                        break
                    if not waiting:
                        waiting = True
                        for box, write in want:
                            box.waiting_writers += write
                    _cond.wait()
            finally:
                if waiting:
                    for box, write in want:
                        box.waiting_writers -= write
                    _cond.notify_all()
            for box, write in want:
                box.holders[me] = box.holders.get(me, 0) + 1
                box.refs += 1
                if write:
                    box.writer = me
                self.taken.append((box, write))
        if not self.nret:
            return self.reqs[0][0].h
        return tuple(box.h if box is not None else None for box, _ in self.reqs[:self.nret])

    def __exit__(self, *exc) -> None:
        me = threading.get_ident()
        dead = []
        with _cond:
            for box, write in self.taken:
                left = box.holders[me] - 1
                if left:
                    box.holders[me] = left
                else:
                    del box.holders[me]
                if write:
                    box.writer = None
                if box._drop_locked():  # the last call of a closed handle frees it
                    dead.append(box)
            _cond.notify_all()
        for box in dead:
            box._free_now()


class Handle:
    """Base of every object that owns a C handle: ``close()``, ``with``, collection, and
    :meth:`_use`, through which every C call on the handle goes."""

    _kind = "object"

    def _own(self, h: int, free: Callable[[int], None], parent: Optional["Handle"] = None) -> None:
        """Takes ownership of a new C handle. With a parent (a model for a plan or trainer), call
        it while holding the parent (inside ``parent._use()``): if the parent was closed in the
        meantime, the new handle is freed and ValueError raised."""
        try:
            self._box = _Box(h, free, parent._box if parent is not None else None, self._kind)
        except ValueError:
            free(h)
            raise
        self._finalizer = weakref.finalize(self, self._box.drop_owner)
        self._children: "weakref.WeakSet[Handle]" = weakref.WeakSet()
        if parent is not None:
            parent._children.add(self)

    def _use(self, write: bool = False, *, parent_write: bool = False,
             reads: Tuple[Optional["Handle"], ...] = ()) -> _Use:
        """Holds this handle (and its parent, and the handles in `reads`) for one C call:
        ``with self._use() as h:``, or ``as (h, r1, ...)`` with `reads` (None stays None).
        `write`: the C function takes a non-const pointer to this handle; `parent_write`: it
        changes the parent too (a training step changes its model). ValueError if one of them
        is closed; it waits while another thread changes one it needs."""
        box = self._box_or_closed()
        reqs: List[Tuple[Optional[_Box], bool]] = [(box, write)]
        reqs += [(r._box_or_closed() if r is not None else None, False) for r in reads]
        if box.parent is not None:
            reqs.append((box.parent, parent_write))
        return _Use(reqs, 1 + len(reads) if reads else 0)

    def _box_or_closed(self) -> _Box:
        box = getattr(self, "_box", None)
        if box is None:
            raise ValueError(f"this {self._kind} is closed")
        return box

    def close(self) -> None:
        """Frees the C object (objects made from it are closed first). New calls are refused at
        once with ValueError; calls in flight on other threads are waited for, so the C object
        is never freed under a running call. Safe to call twice, from any thread."""
        box = getattr(self, "_box", None)
        if box is None:
            return
        with _cond:
            box.closed = True
            _cond.notify_all()
        if self._finalizer.alive:
            for child in list(self._children):
                child.close()
            self._finalizer()  # drops the owner's reference, once
        me = threading.get_ident()
        with _cond:
            _cond.wait_for(lambda: box.idle(me))

    @property
    def closed(self) -> bool:
        box = getattr(self, "_box", None)
        return box is None or box.closed

    @property
    def _h(self) -> Optional[int]:
        """The C handle, None once closed (do not pass it to C: use _use)."""
        box = getattr(self, "_box", None)
        return None if box is None or box.closed else box.h

    def _closed_error(self) -> ValueError:
        return ValueError(f"this {self._kind} is closed")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

