"""Peak memory of a block of benchmark code, above what was in use when it started.

On a GPU: the CUDA caching allocator's peak of allocated bytes (``torch.cuda.max_memory_allocated``).
On the CPU (Linux): the process's peak resident set size, ``VmHWM`` in ``/proc/self/status``, reset
to the current RSS at the start of the block (writing 5 to ``/proc/self/clear_refs``), minus the RSS
then. Memory the allocator holds free is handed back first (glibc's ``malloc_trim``), so that what
the block reuses of it counts; inside ``fastcurv.heap_reuse`` freed pages stay resident, so the CPU
figure is the peak of live memory plus what the allocator kept, an upper bound of the live peak.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager


def status_bytes(key: str) -> int:
    """A size line of /proc/self/status in bytes (VmRSS: resident now; VmHWM: peak since the last reset)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Peak:
    """Filled in when its ``measure`` block ends: ``bytes`` (None where it cannot be measured) and
    ``MiB``."""

    bytes: int | None = None

    @property
    def MiB(self) -> float | None:
        return None if self.bytes is None else self.bytes / 2**20


@contextmanager
def measure(device):
    """``with measure(dev) as peak: ...``, then ``peak.bytes``: the most memory in use during the
    block above what was in use at its start (see the module docstring)."""
    import torch  # here: memory_json's parent process does not load torch

    from fastcurv._heap import trim

    peak = Peak()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield peak
        torch.cuda.synchronize(device)
        peak.bytes = torch.cuda.max_memory_allocated(device) - start
        return
    trim()
    try:
        ok, start = reset_peak_rss(), status_bytes("VmRSS")
    except (OSError, StopIteration):
        ok = False
    yield peak
    if ok:
        peak.bytes = max(0, status_bytes("VmHWM") - start)
