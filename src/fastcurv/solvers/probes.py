"""Random probe vectors with common random numbers across replicas."""
from __future__ import annotations

import contextvars
import operator
from contextlib import contextmanager

import torch

KINDS = ("rademacher", "gaussian")

# (first replica, total replicas) of the replicas being computed, set by chunked/sharded jobs
_WINDOW: contextvars.ContextVar = contextvars.ContextVar("fastcurv_replica_window", default=None)


@contextmanager
def replica_window(first: int, total: int):
    """Within this block the operator's R replicas are replicas ``first .. first+R-1`` of a job of
    ``total``: independent probes (``common=False``) are keyed by the replica's global number
    (outside a window, by its position 0..R-1). Common probes are unaffected."""
    token = _WINDOW.set((int(first), int(total)))
    try:
        yield
    finally:
        _WINDOW.reset(token)


def as_seed(seed) -> int:
    """``seed`` as a Python int (numpy integers too, e.g. a seed taken from a numpy grid: torch's
    generators take only ints); a TypeError naming it else."""
    try:
        return operator.index(seed)
    except TypeError:
        raise TypeError(f"seed must be an integer, got {seed!r} ({type(seed).__name__})") from None


def _draw(shape, generator, kind):
    if kind == "rademacher":
        return torch.randint(0, 2, shape, generator=generator, dtype=torch.int8).to(torch.float64).mul_(2).sub_(1)
    return torch.randn(shape, generator=generator, dtype=torch.float64)


def probe_vectors(R: int, K: int, P: int, *, generator: torch.Generator, kind: str = "rademacher", common: bool = True,
                  dtype=torch.float32, device="cpu") -> torch.Tensor:
    """``[R, K, P]`` random probes drawn on the CPU (same numbers on every device).

    common=True (default) gives every replica the same K probes (common random numbers): the
    between-replica differences of an estimate then carry less noise than with independent draws.
    common=False draws each replica's probes from its own stream, keyed by ``generator`` and the
    replica's number in the job (:func:`replica_window`; 0.. outside one), so they do not depend on
    how the job is split into replica chunks or ranks.
    """
    if kind not in KINDS:
        raise ValueError(f"probe kind must be one of {KINDS}, got {kind!r}")
    if not common:
        window = _WINDOW.get()
        first = 0 if window is None else window[0]
        base = int(torch.randint(0, 2**62, (1,), generator=generator))  # advances the job's stream once
        rows = [_draw((K, P), torch.Generator().manual_seed((base + 1_000_003 * (first + r)) % 2**63), kind)
                for r in range(R)]
        return torch.stack(rows).to(dtype).to(device)
    shape = (1, K, P)
    if kind == "rademacher":
        v = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8).to(dtype).mul_(2).sub_(1)
    else:
        v = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    return v.to(device).expand(R, K, P).clone()


def start_vectors(op, seed: int, common: bool = True) -> torch.Tensor:
    """Unit Gaussian start vectors ``[R, P]`` of the eigensolvers, drawn from ``seed`` (the same
    vector for every replica with ``common=True``)."""
    g = torch.Generator().manual_seed(as_seed(seed))
    v = probe_vectors(op.R, 1, op.P, generator=g, kind="gaussian", common=common, dtype=op.dtype, device=op.device)[:, 0]
    return v / v.norm(dim=-1, keepdim=True)
