"""Random probe vectors with common random numbers across replicas."""
from __future__ import annotations

import torch

KINDS = ("rademacher", "gaussian")


def probe_vectors(R: int, K: int, P: int, *, generator: torch.Generator, kind: str = "rademacher", common: bool = True,
                  dtype=torch.float32, device="cpu") -> torch.Tensor:
    """``[R, K, P]`` random probes drawn on the CPU (same numbers on every device).

    common=True (default) gives every replica the same K probes (common random numbers): the
    between-replica differences of an estimate then carry less noise than with independent draws.
    """
    if kind not in KINDS:
        raise ValueError(f"probe kind must be one of {KINDS}, got {kind!r}")
    shape = (1 if common else R, K, P)
    if kind == "rademacher":
        v = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8).to(dtype).mul_(2).sub_(1)
    else:
        v = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    v = v.to(device)
    return v.expand(R, K, P).clone() if common else v
