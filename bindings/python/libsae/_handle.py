"""Owning C handles: each is freed exactly once, children before their parent.

A handle lives in a :class:`_Box` with a reference count: one reference for the Python object
that owns it, one for each child handle made from it (a steering plan or trainer holds its
model's box). The C free function runs when the count reaches zero, so a model is never freed
while a plan that reads its weights exists, whatever order the garbage collector (or the
interpreter's exit) finalizes the Python objects in.
"""
from __future__ import annotations

import threading
import weakref
from typing import Callable, Optional

_lock = threading.Lock()


class _Box:
    __slots__ = ("h", "free", "refs", "parent")

    def __init__(self, h: int, free: Callable[[int], None], parent: Optional["_Box"] = None):
        self.h = h
        self.free = free
        self.refs = 1
        self.parent = parent
        if parent is not None:
            with _lock:
                parent.refs += 1

    def decref(self) -> None:
        with _lock:
            self.refs -= 1
            dead = self.refs == 0 and self.h is not None
            h, self.h = self.h, (None if dead else self.h)
        if dead:
            self.free(h)
            if self.parent is not None:
                self.parent.decref()


class Handle:
    """Base of every object that owns a C handle: ``close()``, ``with``, collection."""

    _kind = "object"

    def _own(self, h: int, free: Callable[[int], None], parent: Optional["Handle"] = None) -> None:
        self._box = _Box(h, free, parent._box if parent is not None else None)
        self._h = h
        self._finalizer = weakref.finalize(self, self._box.decref)
        self._children: "weakref.WeakSet[Handle]" = weakref.WeakSet()
        if parent is not None:
            parent._children.add(self)

    def close(self) -> None:
        """Frees the C object now (objects made from it are closed first). Safe to call twice;
        any later use raises ValueError."""
        if getattr(self, "_h", None) is None:
            return
        for child in list(self._children):
            child.close()
        self._h = None
        self._finalizer()

    @property
    def closed(self) -> bool:
        return getattr(self, "_h", None) is None

    def _closed_error(self) -> ValueError:
        return ValueError(f"this {self._kind} is closed")

    def _ptr(self) -> int:
        """The C handle, or ValueError once closed."""
        h = self._h
        if h is None:
            raise self._closed_error()
        return h

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
