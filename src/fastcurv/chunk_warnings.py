"""The warnings of a chunk of replicas (:func:`fastcurv.resume.run_chunks`): recorded while the chunk
runs, thread-safely (:func:`_recording_warnings`), and re-emitted after it with its first replica's
number (:func:`_reemit`). This module alone holds the recorder's process-wide state (the count of
recording chunks, the hooks' filter entry).
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
import warnings

# A chunk's warnings are recorded and re-emitted with its first replica's number (the messages count
# replicas from the chunk's first). ``warnings.catch_warnings`` cannot do this in a thread: it swaps the
# process's warnings state for the whole chunk, so chunked jobs in two threads left the state of one
# behind (every later warning swallowed), and the warnings of every other thread were taken meanwhile.
# Instead, while any chunk records, two inert hooks stand in the process's warnings state: a filter
# entry that says "always" only in a context (thread) where a chunk records, and a ``showwarning`` that
# keeps the warnings raised in such a context and passes all others on unchanged. The last chunk to
# finish takes both out again; between chunks the state is exactly as it was.
_RECORD: contextvars.ContextVar = contextvars.ContextVar("fastcurv_chunk_warnings", default=None)
_hooks_lock = threading.Lock()
_recorders = 0  # chunks recording now, in all threads


class _WhereRecording:
    """The module pattern of the filter entry :data:`_ALWAYS`: matches in a recording context only."""

    def match(self, module: str) -> bool:
        return _RECORD.get() is not None

    def __repr__(self):
        return "<fastcurv: only where a chunk of replicas records its warnings>"


_ALWAYS = ("always", None, Warning, _WhereRecording(), 0)


class _ShowOrRecord:
    """``warnings.showwarning`` while chunks record: keeps a warning raised where a chunk records
    (in that chunk's list), passes any other to the hook it replaced, ``previous``."""

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, message, category, filename, lineno, file=None, line=None):
        caught = _RECORD.get()
        if caught is None:
            self.previous(message, category, filename, lineno, file, line)
        else:
            caught.append(warnings.WarningMessage(message, category, filename, lineno, file, line))


def _put_hooks() -> None:
    """Count one more recording chunk; put the hooks in place where they are not (first chunk)."""
    global _recorders
    with _hooks_lock:
        _recorders += 1
        if not isinstance(warnings.showwarning, _ShowOrRecord):
            warnings.showwarning = _ShowOrRecord(warnings.showwarning)
        if not any(f is _ALWAYS for f in warnings.filters):
            warnings.filters.insert(0, _ALWAYS)


def _take_hooks() -> None:
    """Count one recording chunk less; the last one takes the hooks out where they still stand. (A
    hook that another caller put over them meanwhile stays, and so do they under it: they pass every
    warning on.)"""
    global _recorders
    with _hooks_lock:
        _recorders -= 1
        if _recorders:
            return
        while isinstance(warnings.showwarning, _ShowOrRecord):
            warnings.showwarning = warnings.showwarning.previous
        while any(f is _ALWAYS for f in warnings.filters):
            warnings.filters.remove(_ALWAYS)


@contextlib.contextmanager
def _recording_warnings():
    """Record the warnings raised in this thread (this context) within the block, each one (filters
    apply when they are re-emitted), into the list it yields; other threads' warnings are shown as
    usual. Nests (an inner block's warnings are its own). Thread-safe, unlike
    ``warnings.catch_warnings(record=True)``, but a ``catch_warnings`` block in another thread that
    overlaps it still takes over the whole process's warnings state meanwhile."""
    caught: list = []
    _put_hooks()
    token = _RECORD.set(caught)
    try:
        yield caught
    finally:
        _RECORD.reset(token)
        _take_hooks()


def _reemit(caught: list, a: int, b: int) -> None:
    """Emit the warnings recorded in the chunk of replicas ``[a, b)`` (as raised by run_chunks' caller),
    their replica numbers said to count from ``a``."""
    for w in caught:
        msg = f"[chunk of replicas {a}..{b - 1}; replica numbers below count from {a}] {w.message}" if a else w.message
        warnings.warn(msg, w.category, stacklevel=3)
