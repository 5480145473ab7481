"""Process-state hygiene and re-entrancy: fastcurv leaves the caller's models, warnings machinery and
malloc settings as they were, and its shared objects and sections are safe across threads.

The thread tests force the harmful interleaving with events (a wait that only the old, unlocked
code lets the other thread end; with a lock it times out after ``WAIT`` seconds), so they fail on
the old code every time rather than by chance.
"""
import importlib.util
import os
import subprocess
import sys
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastcurv
from fastcurv import reparam, train

WAIT = 0.4  # seconds a thread waits for an overlap that a lock rightly prevents


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _mlp(seed, hidden=8):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, hidden), nn.Tanh(), nn.Linear(hidden, 3))


def _data(n=20):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def _run_threads(*targets, names=None):
    """Run each callable in its own thread (named by ``names``); re-raise the first error one raised."""
    errors = []

    def guarded(fn):
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    names = names or [None] * len(targets)
    threads = [threading.Thread(target=guarded, args=(fn,), name=name) for fn, name in zip(targets, names)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    if errors:
        raise errors[0]


# --- #3 reparam's probe and the caller's modes ------------------------------------------------------
def _mixed_mode_model():
    m = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)).train()
    m[2].eval()  # the caller switched this Dropout off inside a training model
    return m


def test_reparam_probe_keeps_every_submodules_mode():
    """The probe check ran ``a.eval(); ...; a.train(was_a)`` on the caller's models: ``train(True)`` set
    every submodule to True, so a Dropout the caller had put in eval mode was switched back on (modes
    [T, T, T, F, T] became all True), after rescale_layers and after every invariance_audit."""
    models = [_mixed_mode_model(), _mixed_mode_model()]
    before = [[m.training for m in model.modules()] for model in models]
    x = torch.randn(6, 5)
    reparam.rescale_layers(models, alpha=2.0, layers=("0", "3"), probe=x)
    assert [[m.training for m in model.modules()] for model in models] == before
    fastcurv.invariance_audit(models, (x, torch.randint(0, 3, (6,))), measures=("trace",), alpha=2.0)
    assert [[m.training for m in model.modules()] for model in models] == before


def test_reparam_probe_interrupted_restores_modes():
    """A KeyboardInterrupt in the model's forward during the probe left the caller's model in eval
    mode (no try/finally around the mode switch)."""
    class Stop(nn.Module):
        def forward(self, x):
            raise KeyboardInterrupt

    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3), Stop()).train()
    with pytest.raises(KeyboardInterrupt):
        reparam.rescale_layers([model], alpha=2.0, layers=("0", "2"), probe=torch.randn(4, 5))
    assert all(m.training for m in model.modules())


# --- #1 one HessianOperator shared by threads -------------------------------------------------------
class _Gate(nn.Module):
    """Identity; on its first call in a thread named in ``actions``, runs that thread's action (a wait)."""

    def __init__(self, actions):
        super().__init__()
        self.actions, self.done = actions, set()

    def forward(self, x):
        name = threading.current_thread().name
        if name in self.actions and name not in self.done:
            self.done.add(name)
            self.actions[name]()
        return x


def test_operator_shared_by_two_threads_gives_the_sequential_products():
    """Two threads calling ``matvec`` of one operator ran their forwards in one shared module that
    torch.func's functional_call swaps each replica's tensors into: thread A's forward read thread B's
    tensors for its last layer (forced here: A waits inside its forward until B is inside its own), so
    A's products were off by 1.17 (products of size 1.26), and B's forward, resumed after A had put the
    module's meta tensors back, crashed ("Tensor on device meta"). Now the operator runs one computation
    at a time (A's wait for B times out: B waits for the operator's lock)."""
    a_in, b_in, a_past = threading.Event(), threading.Event(), threading.Event()

    def a_waits():
        a_in.set()
        b_in.wait(WAIT)

    def b_waits():
        b_in.set()
        a_past.wait(WAIT)

    inner = _Gate({"A": a_waits, "B": b_waits})
    after = _Gate({"A": lambda: a_past.set()})  # (functions: the operator deep-copies the model)
    models = []
    for s in range(2):
        torch.manual_seed(s)
        models.append(nn.Sequential(nn.Linear(5, 8), inner, nn.Tanh(), nn.Linear(8, 3), after))
    op = fastcurv.HessianOperator(models, _data(), backend="autograd")
    g = torch.Generator().manual_seed(1)
    V = {k: torch.randn(2, 2, op.P, generator=g, dtype=op.dtype) for k in "AB"}
    expected = {k: op.matvec(v) for k, v in V.items()}  # (main thread: the gates do nothing)
    got = {}

    def job(k):
        if k == "B":
            assert a_in.wait(10)
        got[k] = op.matvec(V[k])

    _run_threads(lambda: job("A"), lambda: job("B"), names="AB")
    for k in "AB":
        torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-8)


# --- #2 train_population in two threads --------------------------------------------------------------
def _flat(models):
    return torch.stack([torch.cat([p.detach().flatten() for p in m.parameters()]) for m in models])


def test_train_population_in_two_threads_initializes_as_alone():
    """Two train_population calls in two threads each seeded and restored the ONE global generator
    around building a replica: B's seed landed between A's seed and A's draws (forced here: A's
    builder waits until B's builder runs), so A's replica 0 got B's initial weights (0.83 off) and B's
    replica 0 the rest of A's stream. Now the seeded sections hold one lock (A's wait times out)."""
    a_in, b_in, a_built = threading.Event(), threading.Event(), threading.Event()
    x, y = _data(16)

    def builder():
        return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))

    def builder_a():
        if not a_in.is_set():
            a_in.set()
            b_in.wait(WAIT)
        m = builder()
        a_built.set()
        return m

    def builder_b():
        if not b_in.is_set():
            b_in.set()
            a_built.wait(WAIT)
        return builder()

    kw = dict(replicas=None, epochs=0, progress=False)
    alone = {k: _flat(train.train_population(builder, x, y, seeds=s, **kw)[0]) for k, s in (("A", [0, 1]), ("B", [7, 8]))}
    out = {}

    def job_a():
        out["A"] = _flat(train.train_population(builder_a, x, y, seeds=[0, 1], **kw)[0])

    def job_b():
        assert a_in.wait(10)
        out["B"] = _flat(train.train_population(builder_b, x, y, seeds=[7, 8], **kw)[0])

    _run_threads(job_a, job_b)
    for k in "AB":
        assert torch.equal(out[k], alone[k]), f"job {k}: off by {float((out[k] - alone[k]).abs().max()):.3g}"


def test_dropout_masks_of_two_threads_are_their_own():
    """The dropout masks of a training step are drawn from the global generator seeded by the step's
    key (``_dropout_rng``); a step of another call in another thread re-seeded it in between (forced
    here), so the first call drew the other call's masks. Now the two steps do not interleave."""
    a_in, b_in, a_drawn = threading.Event(), threading.Event(), threading.Event()
    cpu = torch.device("cpu")
    alone = {}
    for k in "AB":
        with train._dropout_rng(True, cpu, (k, 0, 0)):
            alone[k] = torch.rand(6)
    got = {}

    def job_a():
        with train._dropout_rng(True, cpu, ("A", 0, 0)):
            a_in.set()
            b_in.wait(WAIT)
            got["A"] = torch.rand(6)
            a_drawn.set()

    def job_b():
        assert a_in.wait(10)
        with train._dropout_rng(True, cpu, ("B", 0, 0)):
            b_in.set()
            a_drawn.wait(WAIT)
            got["B"] = torch.rand(6)

    _run_threads(job_a, job_b)
    assert torch.equal(got["A"], alone["A"]) and torch.equal(got["B"], alone["B"])


def test_training_does_not_deadlock_on_the_seeded_sections_lock():
    """(A guard for the lock above.) It is only taken by the calling thread, never while that waits for
    the worker threads: a training run with worker threads (no dropout) and one with dropout (no
    workers) both finish, and leave the lock free."""
    x, y = _data(32)

    def runs():
        for p in (0.0, 0.3):
            train.train_population(lambda: nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Dropout(p), nn.Linear(8, 3)),
                                   x, y, replicas=4, epochs=1, batch_size=8, threads=2, progress=False)

    errors = []

    def guarded():
        try:
            runs()
        except Exception as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    t = threading.Thread(target=guarded, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "train_population did not finish: a deadlock on the seeded sections' lock?"
    assert not errors, errors
    assert train._GLOBAL_RNG_LOCK.acquire(blocking=False)
    train._GLOBAL_RNG_LOCK.release()


# --- #4 and #5 the warnings of a chunked job ----------------------------------------------------------
def _sharpness(models, loss, **kw):
    return fastcurv.batched_sharpness(models, _data(), loss=loss, measures=("lambda_max",), progress=False,
                                      max_iter=5, **kw)


def test_chunked_jobs_in_two_threads_leave_the_warnings_machinery_as_it_was():
    """Each chunk ran under ``warnings.catch_warnings(record=True)``, which swaps the process-wide
    warnings state: with jobs A and B overlapping (A enters, B enters, A leaves, B leaves; forced),
    B restored the state A had installed, so every later warning went into A's dead record list
    (here "after the jobs": nothing was shown). Meanwhile another thread's warning was taken into a
    chunk's list too, and lost with it. Now nothing is swapped: a chunk's warnings are recorded by
    context (thread), and the process's filters and showwarning are restored exactly."""
    models = [_mlp(0), _mlp(1)]
    _sharpness(models, "cross_entropy", replica_chunk=1)  # (torch's lazy imports add filters of their own)
    a_in, b_in, a_done, c_done = (threading.Event() for _ in range(4))

    def loss_a(out, y):
        if not a_in.is_set():
            a_in.set()
            assert b_in.wait(10)
            assert c_done.wait(10)
        return F.cross_entropy(out, y)

    def loss_b(out, y):
        if not b_in.is_set():
            b_in.set()
            assert a_done.wait(10)
        return F.cross_entropy(out, y)

    def job_a():
        try:
            _sharpness(models, loss_a, replica_chunk=1)
        finally:
            a_done.set()

    def job_b():
        assert a_in.wait(10)
        _sharpness(models, loss_b, replica_chunk=1)

    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        filters, show = list(warnings.filters), warnings.showwarning

        def job_c():  # another thread warns while job A's chunk runs: shown at once, as raised
            assert b_in.wait(10)
            warnings.warn("from another thread", UserWarning)
            c_done.set()

        _run_threads(job_a, job_b, job_c)
        assert warnings.filters == filters and warnings.showwarning is show
        warnings.warn("after the jobs", UserWarning)
        assert [str(w.message) for w in shown] == ["from another thread", "after the jobs"]


def _with_nan_replica(R=2, bad=1):
    models = [_mlp(s) for s in range(R)]
    with torch.no_grad():
        models[bad][0].weight[0, 0] = float("nan")
    return models


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_failing_chunk_shows_its_warnings_before_the_error(error):
    """A chunked job whose chunk failed (an error in the loss callable, or Ctrl-C) dropped every warning
    that chunk had raised: here "replicas [1] have non-finite (NaN/Inf) parameters", which the same
    unchunked call shows before its error."""
    calls = {"n": 0}

    def loss(out, y):
        calls["n"] += 1
        if calls["n"] == 2:
            raise error("loss failed")
        return F.cross_entropy(out, y)

    seen = {}
    for chunk in (None, 2):
        calls["n"] = 0
        with warnings.catch_warnings(record=True) as shown, pytest.raises(error):
            warnings.simplefilter("always")
            _sharpness(_with_nan_replica(), loss, replica_chunk=chunk)
        seen[chunk] = [str(w.message) for w in shown if "non-finite" in str(w.message)]
    assert seen[None] and seen[2] == seen[None]


def test_chunk_warnings_say_where_their_replica_numbers_count_from():
    """(Kept from before: a chunk's warnings name the chunk, and a chunk's own count of replicas.)"""
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        _sharpness(_with_nan_replica(R=3, bad=2), "cross_entropy", replica_chunk=2)
    msgs = [str(w.message) for w in shown if "non-finite" in str(w.message)]
    assert msgs and all(m.startswith("[chunk of replicas 2..2; replica numbers below count from 2] replicas [0]")
                        for m in msgs), msgs


# --- #6 heap_reuse and the process's malloc settings --------------------------------------------------
_WHERE = r"""
import ctypes, importlib.util, sys
spec = importlib.util.spec_from_file_location("fastcurv_heap", sys.argv[1])
heap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(heap)
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def where(n=64 << 20):
    p = libc.malloc(n)
    kind = "mmap"
    for line in open("/proc/self/maps"):
        lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
        if lo <= p < hi and line.rstrip().endswith("[heap]"):
            kind = "heap"
    libc.free(p)
    return kind

before = where()
with heap.heap_reuse():
    inside = where()
print(before, inside, where(96 << 20))  # (larger than the hole the block may leave in the heap)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.exists("/proc/self/maps"), reason="glibc only")
@pytest.mark.parametrize("env, expect", [
    ({}, "mmap heap mmap"),
    ({"MALLOC_MMAP_MAX_": "0"}, "heap heap heap"),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0", "MALLOC_MMAP_MAX_": "65536"}, "heap heap heap"),
])
def test_heap_reuse_restores_the_processs_own_malloc_settings(env, expect):
    """Leaving heap_reuse set the mmap limit to glibc's compiled-in default (65536), not to the
    process's: run with MALLOC_MMAP_MAX_=0 (or the GLIBC_TUNABLES form, which glibc prefers), a
    64 MiB malloc came from the heap before the first fastcurv call and from a fresh mmap after it."""
    from fastcurv import _heap

    if not _heap.enabled():
        pytest.skip("heap_reuse is off here (FASTCURV_HEAP_REUSE=0 or no glibc)")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    run = subprocess.run([sys.executable, "-c", _WHERE, _heap.__file__], env={**clean, **env}, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == expect.split()


def test_startup_settings_read_glibcs_environment():
    """The settings restored: GLIBC_TUNABLES first, then the MALLOC_*_ aliases, then glibc's defaults,
    numbers read as glibc reads them (hex, octal), values mallopt cannot take capped or ignored."""
    from fastcurv import _heap

    mmap_max, trim = _heap._M_MMAP_MAX, _heap._M_TRIM_THRESHOLD
    assert _heap.startup_settings({}) == {mmap_max: 65536, trim: 128 * 1024}
    env = {"GLIBC_TUNABLES": "glibc.malloc.check=0:glibc.malloc.trim_threshold=0x1000", "MALLOC_MMAP_MAX_": "010",
           "MALLOC_TRIM_THRESHOLD_": "5"}
    assert _heap.startup_settings(env) == {mmap_max: 8, trim: 4096}
    assert _heap.startup_settings({"MALLOC_TRIM_THRESHOLD_": str(2**40), "MALLOC_MMAP_MAX_": "x"}) == {
        mmap_max: 65536, trim: 2**31 - 1}


def test_heap_module_loads_without_the_package():
    """(The subprocess test above loads _heap.py on its own: it must need nothing but the standard library.)"""
    from fastcurv import _heap

    spec = importlib.util.spec_from_file_location("heap_alone", _heap.__file__)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
