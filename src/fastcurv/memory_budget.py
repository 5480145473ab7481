"""Memory budgets in bytes: :func:`parse_budget` reads the ``memory_budget`` argument (bytes, a size
string, or a fraction of :func:`available_memory`) and :func:`format_bytes` writes sizes for messages.
Standard library and torch only, so every memory module imports it at the top."""
from __future__ import annotations

import math
import re

import torch

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def available_memory(device="cpu") -> int:
    """Bytes free now on ``device``: ``torch.cuda.mem_get_info`` for CUDA; on the CPU the
    ``MemAvailable`` line of ``/proc/meminfo`` (Linux). Raises ValueError where unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        raise ValueError(f"cannot tell the free memory of a {device.type} device; pass memory_budget in bytes")
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise ValueError("cannot read MemAvailable from /proc/meminfo (not Linux?); pass memory_budget in bytes, e.g. '4GiB'")


def parse_budget(budget, device="cpu") -> int:
    """``memory_budget`` in bytes.

    int: bytes (> 0). str: a number with an optional unit (B, kB, MB, GB, TB, KiB, MiB, GiB, TiB;
    e.g. ``"4GiB"``, ``"1.5 GB"``). float in (0, 1]: that fraction of :func:`available_memory` of
    ``device``. Anything else raises ValueError naming the problem.
    """
    if isinstance(budget, bool) or budget is None:
        raise ValueError(f"memory_budget must be bytes (int), a size like '4GiB' or a fraction in (0, 1], got {budget!r}")
    if isinstance(budget, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", budget)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"memory_budget={budget!r} is not a size: use e.g. '4GiB', '512MiB', '2GB' or bytes as an int")
        value = float(m.group(1)) * _UNITS[m.group(2).lower()]
        if value < 1:
            raise ValueError(f"memory_budget={budget!r} is less than one byte (a string is a size; pass a fraction of the "
                             "free memory as a float, e.g. 0.5)")
        return int(value)
    if isinstance(budget, int) or (hasattr(budget, "dtype") and getattr(budget, "ndim", 1) == 0 and "int" in str(budget.dtype)):
        if int(budget) <= 0:
            raise ValueError(f"memory_budget must be a positive number of bytes, got {int(budget)}")
        return int(budget)
    if isinstance(budget, float) or hasattr(budget, "dtype") and getattr(budget, "ndim", 1) == 0 and "float" in str(budget.dtype):
        budget = float(budget)
        if not math.isfinite(budget) or not 0 < budget <= 1:
            raise ValueError(f"a float memory_budget is a fraction of the free memory and must lie in (0, 1], got {budget!r}"
                             " (pass bytes as an int, e.g. 4 * 2**30, or a string like '4GiB')")
        return max(1, int(budget * available_memory(device)))
    raise ValueError(f"memory_budget must be bytes (int), a size like '4GiB' or a fraction in (0, 1], got {type(budget).__name__}")


def format_bytes(n: float) -> str:
    """``n`` bytes as a short string in GiB, MiB or KiB (bytes below 1 KiB)."""
    if abs(n) >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if abs(n) >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB" if abs(n) >= 2**10 else f"{int(n)} B"
