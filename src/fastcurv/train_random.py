"""The random numbers of :func:`fastcurv.train.train_population`: the replicas' initialization
(:func:`init_replicas`) and the dropout draws of each training step (:func:`_dropout_rng`), both
from torch's global generators seeded inside a section that restores them after, under one lock
(:data:`_GLOBAL_RNG_LOCK`) so calls in several threads do not draw each other's numbers.

Seeding reaches the CPU generator and, where an accelerator (CUDA, XPU or MPS) is initialized, the
generators of all its devices (a builder may build on any of them); the section restores all of
these (:func:`_reseeding_section`). An accelerator not initialized yet is left alone (reading its
generators would initialize it: a CUDA context for a CPU job); a builder that initializes it is
run again, seeded there too (:func:`init_replicas`).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import threading
from typing import Sequence

import torch
from torch import nn

# Held around every section that seeds torch's global generators and restores them after (fork_rng): those
# sections are not atomic, and without it two train_population calls in two threads draw each other's random
# numbers (initial weights 0.6-0.8 off). Only the calling thread takes it, never while it waits for the worker threads
# (which take it only for dropout, and dropout runs without worker threads): no deadlock.
_GLOBAL_RNG_LOCK = threading.RLock()


@contextlib.contextmanager
def _seeded_section(devices: list):
    """``torch.random.fork_rng(devices)`` under :data:`_GLOBAL_RNG_LOCK`: the global generators may be
    seeded inside, and no other fastcurv section seeds or restores them meanwhile."""
    with _GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=devices):
        yield


def _rng_devices(device: torch.device) -> list:
    """The accelerators whose generators a section on ``device`` forks: ``[device]`` for CUDA, else none."""
    return [device] if device.type == "cuda" else []


def _accelerator() -> tuple[str, list[int]] | None:
    """``(device type, device indices)`` of this machine's initialized accelerator whose generators
    :func:`_seed` seeds (every device of CUDA, XPU or MPS), None on a machine without one or while
    CUDA / XPU is not initialized."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return "cuda", list(range(torch.cuda.device_count()))
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available() and getattr(xpu, "is_initialized", lambda: True)():
        return "xpu", list(range(xpu.device_count()))
    if torch.backends.mps.is_available():
        return "mps", [0]
    return None


@contextlib.contextmanager
def _reseeding_section(acc: tuple[str, list[int]] | None):
    """A section in which :func:`_seed` may be called with ``acc`` (:func:`_accelerator`'s value, or
    one device of it): under :data:`_GLOBAL_RNG_LOCK`, the CPU generator and those of ``acc``'s
    devices restored after."""
    kind, devices = acc if acc is not None else (None, [])
    with _GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=devices, device_type=kind or "cuda"):
        yield


def _seed(s: int, acc: tuple[str, list[int]] | None) -> None:
    """Seed the CPU generator and those of ``acc``'s devices with ``s``, the generators
    :func:`_reseeding_section` restores; call it inside one. (Not ``torch.manual_seed``, which also
    seeds device types the section does not restore, and queues lazy seeding of an accelerator not
    initialized yet, which replaced the caller's own seed at its initialization; on a machine without
    one it captured a traceback: 0.4 ms per call, 40% of initializing 100 small MLPs.)"""
    torch.default_generator.manual_seed(s)
    if acc is not None:
        kind, devices = acc
        if kind == "mps":
            torch.mps.manual_seed(s)
        else:
            gens = torch.get_device_module(kind).default_generators
            for d in devices:
                gens[d].manual_seed(s)


def init_replicas(builder, seeds: Sequence[int]) -> list[nn.Module]:
    """One model per seed: ``builder()`` (a zero-argument callable) under ``torch.manual_seed(seed)``.

    ``builder`` may also be an ``nn.Module`` template: each replica is a deep copy whose submodules'
    ``reset_parameters()`` are called under the seed. The global RNG state is left unchanged: the
    CPU generator and those of the initialized accelerator's devices (:func:`_reseeding_section`;
    a builder that initializes CUDA is run again with its generators seeded too).
    Thread-safe with other fastcurv calls (they do not seed the global RNG meanwhile), not with
    the caller's own draws from it in other threads.
    """
    models = []
    for s in seeds:
        acc = _accelerator()
        m = _built(builder, int(s), acc)
        if _accelerator() != acc:  # (the builder initialized CUDA: its draws there were not seeded)
            m = _built(builder, int(s), _accelerator())
        models.append(m)
    return models


def _built(builder, s: int, acc) -> nn.Module:
    """One replica of :func:`init_replicas`, built under seed ``s`` (the generators of ``acc`` seeded too)."""
    with _reseeding_section(acc):
        _seed(s, acc)
        if isinstance(builder, nn.Module):
            m = copy.deepcopy(builder)
            for mod in m.modules():
                own = list(mod.parameters(recurse=False))
                if own and not hasattr(mod, "reset_parameters"):
                    raise ValueError(f"cannot re-initialize {type(mod).__name__}: it has no reset_parameters(); "
                                     "pass a builder function instead of a module")
                if own:
                    mod.reset_parameters()
        elif callable(builder):
            m = builder()
            if not isinstance(m, nn.Module):
                raise TypeError(f"builder() returned a {type(m).__name__}, not an nn.Module")
        else:
            raise TypeError("builder must be a zero-argument callable returning an nn.Module, or an nn.Module")
    return m


@contextlib.contextmanager
def _dropout_rng(has_dropout: bool, device, key: tuple):
    """Dropout masks of one training step drawn from a generator seeded by ``key`` (the group's
    replica seeds, the epoch and the step), the global RNG state restored after: the same call
    gives the same models, and a run resumed from a checkpoint the uninterrupted run's."""
    if not has_dropout:
        yield
        return
    seed = int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little") >> 1
    acc = ("cuda", [device.index if device.index is not None else torch.cuda.current_device()]) \
        if device.type == "cuda" else None  # (the training device's generator only)
    with _reseeding_section(acc):
        _seed(seed, acc)
        yield


def _rng_states(devices: list) -> tuple:
    """The states of torch's default generators, the CPU one and those of the CUDA ``devices``, as bytes."""
    states = [torch.get_rng_state(), *(torch.cuda.get_rng_state(d) for d in devices)]
    return tuple(t.cpu().numpy().tobytes() for t in states)
