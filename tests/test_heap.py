"""fastcurv._heap: inside heap_reuse, large tensors come from the heap (not fresh mmaps) and
freed memory is reused; outside, glibc's behaviour is back."""
import ctypes
import resource

import pytest
import torch

from fastcurv import _heap


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo():
    lib = _heap._glibc()
    lib.mallinfo2.restype = _Mallinfo2
    return lib.mallinfo2()


def _mmapped_bytes():
    return _mallinfo().hblkhd


def _outside_size(n: int) -> int:
    """At least ``n`` bytes, and more than the heap holds free: glibc serves a request from a free
    heap chunk large enough before it maps fresh memory, and earlier tests' jobs (inside heap_reuse)
    can leave such chunks (a fresh-clone CI run once failed so). Not touched: virtual memory only."""
    return n + _mallinfo().fordblks + (1 << 20)


needs_glibc = pytest.mark.skipif(_heap._glibc() is None or not hasattr(_heap._glibc(), "mallinfo2"),
                                 reason="needs glibc >= 2.33")


@needs_glibc
def test_large_tensors_come_from_the_heap_inside_only(monkeypatch):
    monkeypatch.delenv("FASTCURV_HEAP_REUSE", raising=False)
    # bytes: above glibc's largest mmap threshold (32 MiB), and n // 2 above the 64 MiB limit of
    # glibc's per-thread heaps, so that both come from the main arena even when earlier contention
    # moved this thread to another one (there a 32 MiB block got a fresh heap: a flaky failure)
    n = 256 << 20
    assert _heap._depth == 0
    before, big = _mmapped_bytes(), _outside_size(n)
    t = torch.empty(big, dtype=torch.uint8)
    assert _mmapped_bytes() >= before + big  # outside: a fresh mapping
    del t
    with _heap.heap_reuse():
        with _heap.heap_reuse():  # nests
            inside = _mmapped_bytes()
            t = torch.empty(n, dtype=torch.uint8)
            t.fill_(1)
            assert _mmapped_bytes() < inside + n
            del t
            # the freed pages are reused: (almost) no page faults. In two fresh-clone CI runs (of about
            # thirty, both while other processes loaded the machine) the first reuse faulted on every
            # page, for a reason not found; so up to three tries, each reusing the pages the one
            # before freed. A heap that does not keep freed pages faults on all three.
            for _ in range(3):
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                t = torch.empty(n // 2, dtype=torch.uint8)
                t.fill_(1)
                faulted = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
                del t
                if faulted < n // 2 // 4096 // 4:
                    break
            assert faulted < n // 2 // 4096 // 4, f"{faulted} page faults on reusing {n // 2} freed bytes"
    before, big = _mmapped_bytes(), _outside_size(n)
    t = torch.empty(big, dtype=torch.uint8)
    assert _mmapped_bytes() >= before + big  # restored on leaving


def test_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("FASTCURV_HEAP_REUSE", "0")
    assert not _heap.enabled()
    with _heap.heap_reuse():
        pass


@needs_glibc
def test_batched_sharpness_runs_inside_heap_reuse(monkeypatch):
    import fastcurv
    import fastcurv.sharpness as S
    from models import mlp, replicas

    monkeypatch.delenv("FASTCURV_HEAP_REUSE", raising=False)
    depths = []
    real = S.HessianOperator

    def recording(*a, **k):
        depths.append(_heap._depth)
        return real(*a, **k)

    monkeypatch.setattr(S, "HessianOperator", recording)
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    fastcurv.batched_sharpness(replicas(lambda: mlp(), 2), (x, y), progress=False)
    assert depths and depths[0] >= 1
    assert _heap._depth == 0


@needs_glibc
def test_every_matvec_and_gradient_runs_inside_heap_reuse(monkeypatch):
    import fastcurv
    from models import mlp, replicas

    monkeypatch.delenv("FASTCURV_HEAP_REUSE", raising=False)
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    op = fastcurv.HessianOperator(replicas(lambda: mlp(), 2), (x, y), backend="func")
    depths = []
    real = op._run
    monkeypatch.setattr(op, "_run", lambda *a: depths.append(_heap._depth) or real(*a))
    op.matvec(torch.randn(2, op.P, dtype=torch.float64))
    assert depths == [1] and _heap._depth == 0
    real_grad = op._loss_and_gradient_func
    monkeypatch.setattr(op, "_loss_and_gradient_func", lambda *a: depths.append(_heap._depth) or real_grad(*a))
    op.loss_and_gradient()
    assert depths == [1, 1] and _heap._depth == 0
