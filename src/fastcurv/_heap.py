"""Reuse of freed memory inside fastcurv's jobs (Linux with glibc; a no-op elsewhere).

A job allocates and frees tensors of tens to hundreds of MB at every matvec and solver step.
glibc serves blocks that large with fresh ``mmap`` calls and unmaps them when freed, so every new
tensor pays a page fault per 4 KiB page (measured here: a fresh 47 MB tensor costs 18-28 ms, a
reused one 1-2 ms). Inside :func:`heap_reuse`, malloc takes every block from the heap and keeps
freed memory there, so later tensors reuse pages already mapped; on leaving, the mmap limit is
restored and ``malloc_trim(0)`` returns the freed memory to the system. Peak memory is unchanged
(live tensors are the same), but glibc's adaptive mmap threshold stays fixed afterwards.

What is restored: the process's own mmap limit and trim threshold as glibc read them at start-up
(``GLIBC_TUNABLES=glibc.malloc.mmap_max=...:glibc.malloc.trim_threshold=...``, else
``MALLOC_MMAP_MAX_`` / ``MALLOC_TRIM_THRESHOLD_``), else glibc's defaults (65536 mappings, 128 KiB).
glibc has no getter for these settings, so values set later by ``mallopt`` calls (the
application's or another library's) are not seen and are replaced: set ``FASTCURV_HEAP_REUSE=0``
(or false, off, no) to keep them (fastcurv then leaves malloc alone).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
import warnings
import functools
from contextlib import contextmanager

_ON, _OFF = ("1", "true", "on", "yes"), ("0", "false", "off", "no")  # setup.py's FASTCURV_CUDA takes the same
_warned: set[tuple[str, str]] = set()  # (variable, value) pairs already refused with a warning


def _refuse(name: str, value: str, why: str) -> None:
    """Warn, once per value, that the environment variable ``name`` has a value fastcurv does not accept."""
    if (name, value) not in _warned:
        _warned.add((name, value))
        warnings.warn(f"{name}={value!r} {why}", RuntimeWarning, stacklevel=3)


def env_flag(name: str, default: bool) -> bool:
    """The on/off environment variable ``name``: '1', 'true', 'on', 'yes' or '0', 'false', 'off', 'no'
    (any case, spaces around ignored); unset or empty gives ``default``, any other value ``default``
    with a RuntimeWarning (once per value) naming the accepted spellings."""
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    if value:
        _refuse(name, raw, f"is not an on/off value ({'/'.join(_ON)} or {'/'.join(_OFF)}): ignored, "
                           f"{name} stays {'on' if default else 'off'}")
    return default


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_GLIBC_MMAP_MAX = 65536  # glibc's default M_MMAP_MAX
_KEEP_TOP = 2**31 - 1  # bytes: do not trim the top of the heap while inside
_GLIBC_TRIM = 128 * 1024  # glibc's default M_TRIM_THRESHOLD
# the settings heap_reuse changes: (mallopt parameter, glibc's tunable, its environment alias, glibc's default)
_SETTINGS = ((_M_MMAP_MAX, "glibc.malloc.mmap_max", "MALLOC_MMAP_MAX_", _GLIBC_MMAP_MAX),
             (_M_TRIM_THRESHOLD, "glibc.malloc.trim_threshold", "MALLOC_TRIM_THRESHOLD_", _GLIBC_TRIM))
_INT_MAX = 2**31 - 1  # (mallopt takes an int)
_lock = threading.Lock()
_depth = 0
_libc = None


def _glibc():
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") and hasattr(lib, "gnu_get_libc_version"):
                    lib.mallopt.argtypes, lib.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
                    lib.malloc_trim.argtypes, lib.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
                    _libc = lib
            except OSError:
                pass
    return _libc or None


def _startup_environ() -> dict[str, str]:
    """The environment the process started with, which is what glibc read its malloc settings from
    (``/proc/self/environ``; ``os.environ`` where that cannot be read). Later changes to
    ``os.environ`` do not reach glibc's settings."""
    try:
        with open("/proc/self/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return dict(os.environ)
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def _glibc_number(text: str) -> int | None:
    """A tunable's value read as glibc reads it (decimal, ``0x`` hex or ``0`` octal), capped at
    mallopt's int, or None when it is not a non-negative number (glibc ignores it then)."""
    text = text.strip()
    try:
        if text[:2].lower() == "0x":
            value = int(text[2:], 16)
        elif len(text) > 1 and text[0] == "0":
            value = int(text[1:], 8)
        else:
            value = int(text, 10)
    except ValueError:
        return None
    return min(value, _INT_MAX) if value >= 0 else None


def startup_settings(environ: dict[str, str] | None = None) -> dict[int, int]:
    """``{mallopt parameter: value}`` of the settings :func:`heap_reuse` changes, as the process had
    them at start-up: from ``GLIBC_TUNABLES`` (which takes precedence, as in glibc), else the
    ``MALLOC_*_`` alias, else glibc's default. ``environ``: the start-up environment (default:
    :func:`_startup_environ`)."""
    env = _startup_environ() if environ is None else environ
    tunables = {}
    for item in env.get("GLIBC_TUNABLES", "").split(":"):
        name, sep, value = item.partition("=")
        if sep:
            tunables[name.strip()] = value
    out = {}
    for param, tunable, alias, default in _SETTINGS:
        value = None
        if tunable in tunables:
            value = _glibc_number(tunables[tunable])
        if value is None and alias in env:
            value = _glibc_number(env[alias])
        out[param] = default if value is None else value
    return out


_restore: dict[int, int] | None = None  # startup_settings(), read once (on first use)


def trim() -> None:
    """Return the memory malloc holds free to the system now (glibc's ``malloc_trim(0)``; a no-op
    elsewhere). Leaving the outermost :func:`heap_reuse` does this."""
    lib = _glibc()
    if lib is not None:
        lib.malloc_trim(0)


def enabled() -> bool:
    """True when :func:`heap_reuse` changes anything here (glibc, and not turned off by
    ``FASTCURV_HEAP_REUSE`` = 0, false, off or no; another value than these and 1, true, on, yes
    leaves it on, with a RuntimeWarning)."""
    return env_flag("FASTCURV_HEAP_REUSE", True) and _glibc() is not None


@contextmanager
def heap_reuse():
    """Within this block, freed memory stays mapped for reuse (see the module docstring). Nests.

    fastcurv's jobs and each matvec or gradient call enter it themselves; wrap a loop of your own
    similar calls in it (``with fastcurv.heap_reuse(): ...``) so that they reuse each other's
    pages. Memory freed inside stays with the process until the outermost block exits, so wrap
    loops, not a whole program: one block around a benchmark of many different jobs grew to 24 GB
    where each job alone peaked at 13 GB."""
    global _depth, _restore
    lib = _glibc() if enabled() else None
    with _lock:
        _depth += 1
        if lib is not None and _depth == 1:
            if _restore is None:
                _restore = startup_settings()
            lib.mallopt(_M_MMAP_MAX, 0)
            lib.mallopt(_M_TRIM_THRESHOLD, _KEEP_TOP)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if lib is not None and _depth == 0:
                for param, value in (_restore or {}).items():  # the process's own settings (module docstring)
                    lib.mallopt(param, value)
                trim()


def reusing_heap(fn):
    """Decorator: run ``fn`` inside :func:`heap_reuse`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with heap_reuse():
            return fn(*args, **kwargs)

    return wrapper
