"""memory_budget=: budget parsing, the plan, chunked results, GPU out-of-memory retries, peak RSS."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import fastcurv
from fastcurv import memory, memory_budget
from fastcurv.backends.fused import FusedBackend
from fastcurv.replicas import ReplicaSet


def _mlp(seed, d=12, h=10, c=4, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, c)).to(dtype)


def _job(R=6, n=96, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 12, generator=g, dtype=dtype)
    y = torch.randint(0, 4, (n,), generator=g)
    return [_mlp(s, dtype=dtype) for s in range(R)], (x, y)


KW = dict(measures=("lambda_max", "trace"), max_iter=20, progress=False)


def _close(a, b, rtol=1e-10):
    assert set(a.values) == set(b.values)
    for k in a.values:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=1e-12)
    for k in a.stderr:
        torch.testing.assert_close(a.stderr[k], b.stderr[k], rtol=rtol, atol=1e-12)
    for k in a.iterations:
        assert torch.equal(a.iterations[k], b.iterations[k])


# --- parsing ---------------------------------------------------------------------------------------
def test_parse_budget_units_and_fractions(monkeypatch):
    assert memory.parse_budget(123456) == 123456
    assert memory.parse_budget("4GiB") == 4 * 2**30
    assert memory.parse_budget("512 MiB") == 512 * 2**20
    assert memory.parse_budget("1.5GB") == 1_500_000_000
    assert memory.parse_budget("2e6") == 2_000_000
    monkeypatch.setattr(memory_budget, "available_memory", lambda device="cpu": 10_000)
    assert memory.parse_budget(0.25) == 2500
    assert memory.parse_budget(1.0) == 10_000


@pytest.mark.parametrize("bad, what", [(0, "positive"), (-5, "positive"), (1.5, r"\(0, 1\]"), (0.0, r"\(0, 1\]"),
                                       (float("nan"), r"\(0, 1\]"), ("lots", "not a size"), ("4 XB", "not a size"),
                                       (True, "memory_budget"), ([1], "list"), ("0.1B", "less than one byte")])
def test_parse_budget_rejects(bad, what):
    with pytest.raises(ValueError, match=what):
        memory.parse_budget(bad)


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="needs /proc/meminfo (Linux)")
def test_available_memory_reads_meminfo():
    with open("/proc/meminfo") as f:
        total = next(int(l.split()[1]) * 1024 for l in f if l.startswith("MemTotal:"))
    free = memory.available_memory("cpu")
    assert 0 < free <= total


# --- the cost model and the plan ------------------------------------------------------------------
def test_state_bytes_per_sample_matches_the_cache():
    """Exact for dense state; an upper bound where hidden layers' ReLU CSR forms are cached (their
    size depends on the data: counted as if full)."""
    models, (x, y) = _job(R=3)
    V = torch.randn(3, sum(p.numel() for p in models[0].parameters()), dtype=x.dtype)
    used = {}
    for sparse in (False, True):
        op = fastcurv.HessianOperator(models, (x, y), backend="fused", backend_options={"sparse_hidden": sparse})
        per = op.backend.state_bytes_per_sample(x, y)
        op.matvec(V)  # fills the cache with the whole batch's state for 3 replicas
        used[sparse] = op.backend._cache_used
        st = op.backend._cache[0][1]
        if sparse:
            assert any(c is not None for c in st.sparse_out) and used[True] <= 3 * x.shape[0] * per
        else:
            assert used[False] == 3 * x.shape[0] * per
    assert used[True] > used[False]


def test_plan_shrinks_with_the_budget_and_stays_under_it():
    models, data = _job(R=6)
    shape, name = memory.job_shape(models, data, max_iter=20)
    assert name == "fused" and shape.P == sum(p.numel() for p in models[0].parameters())
    chunks = []
    # just enough for c = 1, 3, 6 replicas with their whole state cached, then plenty
    budgets = [int(memory.estimate_bytes(shape, c)["total"] / memory.SAFETY) + 1 for c in (1, 3, 6)] + [10**9]
    for budget in budgets:
        plan = memory.choose(shape, 6, budget)
        assert plan.estimate["total"] <= memory.SAFETY * budget
        assert plan.estimate == memory.estimate_bytes(shape, plan.replica_chunk, batch=plan.batch_size,
                                                      cache_bytes=plan.cache_bytes, cache_data=plan.cache_data)
        assert plan.cache_bytes == plan.replica_chunk * shape.num_samples * shape.state_per_sample
        chunks.append(plan.replica_chunk)
    assert chunks == [1, 3, 6, 6]
    # a little less than one replica with its whole state needs: partial cache, still one replica
    plan = memory.choose(shape, 6, budgets[0] - 2000)
    assert plan.replica_chunk == 1 and plan.cache_bytes < shape.num_samples * shape.state_per_sample
    with pytest.raises(ValueError, match="too small for this job"):
        memory.choose(shape, 6, 1000)


# --- results ---------------------------------------------------------------------------------------
def test_budget_chunks_give_the_unchunked_results(one_thread):
    models, data = _job(R=6)
    ref = fastcurv.batched_sharpness(models, data, **KW)
    shape, _ = memory.job_shape(models, data, max_iter=20)
    # a budget that fits 2 replicas at a time (3 chunks)
    budget = int(memory.estimate_bytes(shape, 2)["total"] / memory.SAFETY) + 1
    plan = memory.plan_memory(models, data, budget, max_iter=20)
    assert plan.replica_chunk == 2 and plan.batch_size is None
    got = fastcurv.batched_sharpness(models, data, memory_budget=budget, **KW)
    _close(got, ref)


def test_budget_bounds_the_func_backend(one_thread, monkeypatch):
    """With the func backend, the plan reuses every batch's retained graph when that fits (the
    largest chunk that does), else reuses none and gives the products' chunks what is left;
    results equal the unbudgeted job's."""
    from fastcurv.backends import func

    models, data = _job(R=6)
    kw = dict(KW, backend="func", trace_method="hutchinson", trace_probes=6)
    job = {k: v for k, v in kw.items() if k != "progress"}
    ref = fastcurv.batched_sharpness(models, data, **kw)
    shape, name = memory.job_shape(models, data, **job)
    assert name == "func" and shape.func_mode == "graph" and not shape.fused
    reuse_3 = int(memory.estimate_bytes(shape, 3)["total"] / memory.SAFETY) + 1  # 3 replicas with their graphs
    no_reuse = int(memory.estimate_bytes(shape, 1)["total"] / memory.SAFETY) - 1  # not even 1 with its graph
    made = []
    init = func.FuncBackend.__init__
    monkeypatch.setattr(func.FuncBackend, "__init__", lambda self, *a, **k: made.append(self) or init(self, *a, **k))
    for budget, chunk, reuse in ((1 << 40, 6, True), (reuse_3, 3, True), (no_reuse, None, False)):
        made.clear()
        plan = memory.plan_memory(models, data, budget, **job)
        assert plan.backend == "func" and plan.cache_bytes is None
        assert plan.estimate["total"] <= memory.SAFETY * budget
        assert plan.func_options["reuse"] is reuse and (chunk is None or plan.replica_chunk == chunk)
        assert "func reuse" in plan.describe()
        if not reuse:  # the products get what the rest of the plan leaves, at least one replica's graph
            least = func.graph_bytes(ReplicaSet(models[:1]), data[0])
            assert plan.func_options["work_bytes"] == plan.estimate["batch_transient"] >= least * 0.99
        _close(fastcurv.batched_sharpness(models, data, memory_budget=budget, **kw), ref)
        assert made and all(b.reuse is reuse and b.work_bytes == plan.func_options["work_bytes"] for b in made)


def test_tiny_budget_splits_batches_and_caches_part_of_the_state(one_thread):
    models, data = _job(R=4, n=120)
    shape, _ = memory.job_shape(models, data, max_iter=20)
    # the smallest budget whose plan splits the batches into pieces of at least 30 samples
    budget = next(b for b in range(2_000, 10**7, 500) if _ok(shape, b) and (memory.choose(shape, 4, b).batch_size or 120) >= 30)
    plan = memory.choose(shape, 4, budget)
    assert plan.replica_chunk == 1 and plan.batch_size is not None and plan.batch_size < 120
    assert plan.cache_bytes < shape.num_samples * shape.state_per_sample
    ref = fastcurv.batched_sharpness(models, data, **KW)
    got = fastcurv.batched_sharpness(models, data, memory_budget=budget, **KW)
    _close(got, ref, rtol=1e-8)  # batches are summed in another order


def _bn_job(R=2, n=120):
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).double() for _ in range(R)]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    x[: n // 2] += 3.0  # the halves have other statistics: splitting the batch changes the Hessian
    return models, (x, torch.randint(0, 3, (n,), generator=gen))


@pytest.mark.parametrize("job", [dict(bn_mode="batch"), dict(measures=("lambda_max", "rho_sharpness"))])
def test_budgets_never_split_batches_that_results_depend_on(one_thread, job):
    """Batch-statistics BatchNorm and per-batch worst-case rho-sharpness depend on the batches: a
    budget that would need them split raises instead; one that fits whole batches gives the
    unbudgeted results."""
    models, data = _bn_job()
    free = dict(job, measures=job.get("measures", ("lambda_max",)))
    shape, _ = memory.job_shape(models, data, max_iter=20, **free)
    assert shape.whole_batches
    plain = dataclasses.replace(shape, whole_batches="")
    small = next(b for b in range(2_000, 10**7, 500) if _ok(plain, b))  # the plan would split the batch here
    assert memory.choose(plain, 2, small).batch_size is not None
    with pytest.raises(ValueError, match="so the batches are not split"):
        memory.choose(shape, 2, small)
    whole = next(b for b in range(small, 10**8, 500) if _ok(shape, b))
    kw = dict(KW, **free, tol=1e-8, seed=0)
    with pytest.raises(ValueError, match="so the batches are not split"):
        fastcurv.batched_sharpness(models, data, memory_budget=small, **kw)
    _close(fastcurv.batched_sharpness(models, data, memory_budget=whole, **kw), fastcurv.batched_sharpness(models, data, **kw))
    if "measures" in job:  # per_batch=False takes the full-data worst case: splitting is allowed
        opts = {"rho_sharpness": {"per_batch": False}}
        assert not memory.job_shape(models, data, max_iter=20, measure_options=opts, **free)[0].whole_batches


def _ok(shape, budget):
    try:
        memory.choose(shape, 4, budget)
        return True
    except ValueError:
        return False


# --- out-of-memory retries --------------------------------------------------------------------------
def _failing_matvec(limit, error):
    original = FusedBackend.matvec

    def matvec(self, vecs, idx):
        if self.replicas.R > limit:
            raise error
        return original(self, vecs, idx)

    return matvec


@pytest.mark.parametrize("error", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("CUDA error: out of memory")])
def test_out_of_memory_halves_the_chunk_and_retries(monkeypatch, error, one_thread):
    models, data = _job(R=6)
    ref = fastcurv.batched_sharpness(models, data, **KW)
    monkeypatch.setattr(FusedBackend, "matvec", _failing_matvec(2, error))
    with pytest.warns(RuntimeWarning, match="out of memory") as record:
        got = fastcurv.batched_sharpness(models, data, replica_chunk=6, **KW)
    sizes = [int(str(w.message).split("replica_chunk=")[1].split()[0]) for w in record if "replica_chunk=" in str(w.message)]
    assert sizes == [3, 1]  # 6 fails, 3 fails, then one at a time
    _close(got, ref)


def test_out_of_memory_in_an_unchunked_gpu_job_reruns_it_in_chunks(monkeypatch, one_thread):
    """A plain call (no chunking asked for) on a GPU: the out-of-memory error is caught and the job
    reruns in halves (simulated on the CPU: the models count as on a GPU, the products fail for
    chunks above 2 replicas); CPU jobs are never retried."""
    import fastcurv.sharpness as S

    models, data = _job(R=6)
    ref = fastcurv.batched_sharpness(models, data, **KW)
    monkeypatch.setattr(FusedBackend, "matvec", _failing_matvec(2, torch.cuda.OutOfMemoryError("CUDA out of memory")))
    with pytest.raises(torch.cuda.OutOfMemoryError):  # on the CPU: not retried
        fastcurv.batched_sharpness(models, data, **KW)
    monkeypatch.setattr(S, "_on_gpu", lambda models: True)
    with pytest.warns(RuntimeWarning, match="out of memory") as record:
        got = fastcurv.batched_sharpness(models, data, **KW)
    sizes = [int(str(w.message).split("replica_chunk=")[1].split()[0]) for w in record if "replica_chunk=" in str(w.message)]
    assert sizes == [3, 1]  # 6 fails, 3 fails, then one at a time
    _close(got, ref)


def test_out_of_memory_with_one_replica_reraises(monkeypatch):
    models, data = _job(R=2)
    monkeypatch.setattr(FusedBackend, "matvec", _failing_matvec(0, torch.cuda.OutOfMemoryError("CUDA out of memory")))
    with pytest.warns(RuntimeWarning, match="replica_chunk=1"):
        with pytest.raises(RuntimeError, match="even with one replica at a time"):
            fastcurv.batched_sharpness(models, data, memory_budget=10**8, **KW)


def test_other_errors_are_not_retried(monkeypatch):
    models, data = _job(R=4)
    monkeypatch.setattr(FusedBackend, "matvec", _failing_matvec(0, RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        fastcurv.batched_sharpness(models, data, replica_chunk=4, **KW)


# --- peak memory -----------------------------------------------------------------------------------
# Prepended to the child scripts below: a /proc/self/status field in bytes (VmRSS, VmHWM).
STATUS = textwrap.dedent("""
    def status(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
""")
CHILD = STATUS + textwrap.dedent("""
    import json, resource, sys
    import torch
    from torch import nn
    import fastcurv
    from fastcurv.memory import plan_memory
    torch.set_num_threads(1)
    budget = int(sys.argv[1]); use = sys.argv[2] == "budget"; backend = sys.argv[3]
    def mlp(s):
        torch.manual_seed(s)
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g); y = torch.randint(0, 10, (512,), generator=g)
    models = [mlp(s) for s in range(12)]
    kw = dict(max_iter=30, tol=1e-6, progress=False, backend=backend)
    fastcurv.batched_sharpness(models[:1], (x[:8], y[:8]), **dict(kw, max_iter=3))  # warm-up: kernels, thread pools
    try:  # reset the peak (VmHWM) to the current RSS, so that the peak below is the job's
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = status("VmRSS")
    except OSError:  # no reset: the peak so far
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    res = fastcurv.batched_sharpness(models, (x, y), memory_budget=budget if use else None, **kw)
    peak = max(status("VmHWM"), base)
    plan = plan_memory(models, (x, y), budget, **kw)
    print(json.dumps({"base": base, "peak": peak, "chunk": plan.replica_chunk, "estimate": plan.estimate["total"],
                      "lambda_max": res["lambda_max"].tolist()}))
""")


def _children(budget, modes, backend="auto"):
    """Run the child job once per mode, concurrently; their JSON reports."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(budget), m, backend], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for m in modes]
    reports = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-2000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


FUNC_CHILD = STATUS + textwrap.dedent("""
    import json, sys
    import torch
    from torch import nn
    import fastcurv
    from fastcurv._heap import trim
    from fastcurv.backends import func
    torch.set_num_threads(1)
    kind, R, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    def model(s):
        torch.manual_seed(s)
        if kind == "mlp":
            return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Flatten(), nn.Linear(16 * 7 * 7, 10)).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *((784,) if kind == "mlp" else (1, 28, 28)), generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    models = [model(s) for s in range(R)]
    mode = sys.argv[4]
    opts = {"reuse": mode != "hvp", "mode": "graph" if mode == "graph" else "forward"}
    warm = fastcurv.HessianOperator(models[:1], (x[:4], y[:4]), backend="func", backend_options=opts)
    warm.matvec(torch.randn(1, 2, warm.P))
    del warm
    op = fastcurv.HessianOperator(models, (x, y), backend="func", backend_options=opts)
    K = 2 if mode == "hvp" else 1
    v = torch.randn(R, K, op.P)
    trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS")
    op.matvec(v)
    peak = status("VmHWM") - base
    trim()
    held = status("VmRSS") - base  # what the reused linearization or graph keeps
    est = {"forward": func.linearization_bytes, "graph": func.graph_bytes, "hvp": func.hvp_bytes}[mode](op.replicas, x) * R * K
    print(json.dumps({"peak": peak, "estimate": est, "held": held, "held_estimate": func.graph_held_bytes(op.replicas, x) * R}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="resets the peak RSS in /proc/self/clear_refs (Linux)")
@pytest.mark.parametrize("case", ["mlp 8 600 forward", "cnn 2 60 forward", "mlp 8 600 graph", "cnn 2 60 graph",
                                  "mlp 8 600 hvp", "cnn 2 60 hvp", "mlp 8 16 hvp"])
def test_func_memory_estimates_bound_the_measured_peaks(case):
    """The func backend's estimates (what memory_budget= and reuse_bytes / work_bytes rely on) are
    at least the measured peak of a first matvec: linearizing a batch and one product (mode
    "forward"), building its retained graph and one product (mode "graph"; then also what the graph
    keeps), or two probes without reuse, for an MLP and W3's CNN (peak RSS above the start, in a
    child); and without reuse on a batch so small that the parameter-sized tangents and products
    outweigh the module outputs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", FUNC_CHILD, *case.split()], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["peak"] > 0.25 * got["estimate"], got  # a real measurement, not a tiny fraction
    assert got["peak"] <= got["estimate"], got
    if case.endswith("graph"):
        assert got["held"] <= got["held_estimate"], got


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc/self/status (Linux)")
def test_peak_rss_stays_within_the_budget():
    """Peak RSS of the job (VmHWM, reset after the baseline) above the child's baseline RSS
    (interpreter, torch, inputs, a one-replica warm-up) stays under the budget; without the
    budget the same job goes over it."""
    budget = 128 * 2**20
    bounded, free = _children(budget, ("budget", "none"))
    assert bounded["chunk"] < 12
    assert bounded["peak"] - bounded["base"] <= budget, bounded
    assert free["peak"] - free["base"] > budget, free  # the budget really constrains this job
    torch.testing.assert_close(torch.tensor(bounded["lambda_max"]), torch.tensor(free["lambda_max"]), rtol=1e-4, atol=0)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc/self/status (Linux)")
def test_peak_rss_of_a_func_job_stays_within_the_budget():
    """The same with the func backend: its plan (reused graphs, or chunks of products) keeps the
    job's peak RSS under a budget the unbudgeted job goes over."""
    budget = 96 * 2**20
    bounded, free = _children(budget, ("budget", "none"), backend="func")
    assert bounded["chunk"] < 12
    assert bounded["peak"] - bounded["base"] <= budget, bounded
    assert free["peak"] - free["base"] > budget, free
    torch.testing.assert_close(torch.tensor(bounded["lambda_max"]), torch.tensor(free["lambda_max"]), rtol=1e-4, atol=0)


def test_operator_memory_budget_sets_the_state_cache(one_thread):
    models, data = _job(R=3)
    V = torch.randn(3, 2, sum(p.numel() for p in models[0].parameters()), dtype=torch.float64)
    ref = fastcurv.HessianOperator(models, data, backend="fused")
    big = fastcurv.HessianOperator(models, data, backend="fused", memory_budget="1GiB")
    need = memory.SAFETY * 2**30 - memory.STATE_COPIES * big.backend.cache_bytes  # the operator without any cache
    full = 3 * data[0].shape[0] * ref.backend.state_bytes_per_sample(*data)
    # room for half of the state (each cached byte counts STATE_COPIES times)
    small = fastcurv.HessianOperator(models, data, backend="fused", memory_budget=int((need + full) / memory.SAFETY))
    assert abs(small.backend.cache_bytes - full // 2) <= 2 and full <= big.backend.cache_bytes
    for op in (small, big):
        torch.testing.assert_close(op.matvec(V), ref.matvec(V), rtol=1e-12, atol=1e-14)
    assert small.backend._cache_used <= small.backend.cache_bytes
    with pytest.raises(ValueError, match="too small for this operator"):
        fastcurv.HessianOperator(models, data, backend="fused", memory_budget=1000)


def test_operator_memory_budget_caps_the_func_backend(one_thread):
    models, data = _job(R=3)
    V = torch.randn(3, 2, sum(p.numel() for p in models[0].parameters()), dtype=torch.float64)
    ref = fastcurv.HessianOperator(models, data, backend="func")
    assert ref.backend.reuse and ref.backend.work_bytes == 4 << 30  # the defaults, without a budget
    budget = 10 << 20
    op = fastcurv.HessianOperator(models, data, backend="func", memory_budget=budget)
    half = int(memory.SAFETY * budget) // 2
    assert op.backend.work_bytes == half and memory.func_bytes_caps(budget, "cpu") == {"reuse_bytes": half, "work_bytes": half}
    torch.testing.assert_close(op.matvec(V), ref.matvec(V), rtol=1e-12, atol=1e-14)
    # a budget whose half (of 85%) is less than the retained graphs' estimate: no reuse
    est = op.backend._reused_bytes(data[0], 1)
    tight = fastcurv.HessianOperator(models, data, backend="func", memory_budget=int(est / memory.SAFETY))
    assert op.backend.reuse and not tight.backend.reuse
    torch.testing.assert_close(tight.matvec(V), ref.matvec(V), rtol=1e-12, atol=1e-14)
    # what the caller sets wins; a large budget keeps the defaults
    mine = fastcurv.HessianOperator(models, data, backend="func", memory_budget=budget, backend_options={"work_bytes": 123})
    assert mine.backend.work_bytes == 123
    assert fastcurv.HessianOperator(models, data, backend="func", memory_budget="1TiB").backend.work_bytes == 4 << 30


@pytest.mark.gpu
def test_fraction_budget_on_the_gpu():
    models, (x, y) = _job(R=6)
    models = [m.cuda() for m in models]
    data = (x.cuda(), y.cuda())
    free = memory.available_memory("cuda")
    assert memory.parse_budget(0.5, "cuda") == pytest.approx(free / 2, rel=0.05)
    ref = fastcurv.batched_sharpness(models, data, **KW)
    got = fastcurv.batched_sharpness(models, data, memory_budget=0.5, **KW)
    _close(got, ref, rtol=1e-8)  # cuBLAS may pick other kernels for other batch counts


@pytest.mark.gpu
def test_real_cuda_out_of_memory_is_retried_in_halves():
    """With the CUDA allocator capped below the job's peak, the plain call hits a real
    OutOfMemoryError, reruns in halves and gives the uncapped results."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(1000, 784, generator=g).cuda(), torch.randint(0, 10, (1000,), generator=g).cuda()
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)).cuda()
              for _ in range(64)]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    ref = fastcurv.batched_sharpness(models, (x, y), progress=False)
    peak, total = torch.cuda.max_memory_allocated(), torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(0.6 * peak / total)
    try:
        with pytest.warns(RuntimeWarning, match="retrying with replica_chunk=32"):
            got = fastcurv.batched_sharpness(models, (x, y), progress=False)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    for k in ref.values:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6)


class _RefillingLoader:
    """Yields every batch in one buffer that it refills (as prefetching pipelines do)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        bx, by = torch.empty_like(self.batches[0][0]), torch.empty_like(self.batches[0][1])
        for x, y in self.batches:
            bx.copy_(x)
            by.copy_(y)
            yield bx, by


@pytest.mark.parametrize("backend", ["fused", "func"])
@pytest.mark.parametrize("cache_data", [True, False])
def test_a_loader_refilling_one_buffer(backend, cache_data):
    """The batches (and the fused state, func's graphs) must not alias a loader's buffer: they held
    the last batch's data (matvec errors 2.45 with the default cache, 0.64 from the second matvec
    without it)."""
    models, data = _job(R=2, n=48)
    batches = [(data[0][i:i + 16], data[1][i:i + 16]) for i in range(0, 48, 16)]
    ref = fastcurv.HessianOperator(models, batches, backend="autograd")
    op = fastcurv.HessianOperator(models, _RefillingLoader(batches), backend=backend, cache_data=cache_data)
    V = torch.randn(2, ref.P, dtype=torch.float64)
    want = ref.matvec(V)
    for _ in range(2):
        torch.testing.assert_close(op.matvec(V), want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.loss_and_gradient()[0], ref.loss_and_gradient()[0], rtol=1e-12, atol=0)


def test_the_callers_own_batches_are_not_counted_and_auto_plans_the_exact_trace():
    from fastcurv.data import Batches

    models, data = _job(R=2, n=48)
    batches = [(data[0][i:i + 16], data[1][i:i + 16]) for i in range(0, 48, 16)]
    assert Batches(batches, device="cpu", dtype=torch.float64).owned_bytes == 0  # the caller's tensors, read
    assert Batches(batches, device="cpu", dtype=torch.float32).owned_bytes == sum(x.numel() * 4 for x, _ in batches)
    relu = [nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4)).double() for _ in range(2)]
    shapes = {m: memory.job_shape(relu, data, measures=("lambda_max", "trace"), trace_method=m)[0]
              for m in ("auto", "exact", "hutchinson")}
    plan = {m: (s.vectors, s.probes) for m, s in shapes.items()}
    assert plan["auto"] == plan["exact"] != plan["hutchinson"]  # "auto" runs the exact trace here


def test_func_memory_options_do_not_change_the_settings(tmp_path):
    """The func backend's planned reuse and work_bytes change memory, not results: a job resumes
    under another budget (it raised FingerprintMismatch)."""
    models, data = _job(R=2, n=48)
    out = str(tmp_path / "r.jsonl")
    kw = dict(KW, backend="func", output=out)
    a = fastcurv.batched_sharpness(models, data, memory_budget="64MiB", **kw)
    b = fastcurv.batched_sharpness(models, data, memory_budget="256MiB", **kw)
    assert a.settings == b.settings and "backend_options" not in a.settings
    torch.testing.assert_close(a["lambda_max"], b["lambda_max"], rtol=0, atol=0)


def test_budget_values_and_memory_options_are_named():
    import numpy as np

    assert memory.format_bytes(500) == "500 B" and memory.format_bytes(5000) == "4.9 KiB"
    assert memory.parse_budget(np.float32(0.5)) > 0  # a numpy float is a fraction too (it was refused)
    with pytest.raises(ValueError, match="pass a fraction of the free memory as a float"):
        memory.parse_budget("0.5")
    models, data = _job(R=2, n=16)
    for name in ("cache_bytes", "chunk_bytes", "sample_chunk_bytes"):
        with pytest.raises(ValueError, match=f"backend_options {name} must be a non-negative number of bytes"):
            fastcurv.HessianOperator(models, data, backend="fused", backend_options={name: -1})


# --- the exact trace, one-pass loaders, operator budgets, whole batches (hunt 15) ---------------------
def _relu_models(kind, C, R=2):
    def make(s):
        torch.manual_seed(s)
        if kind == "mlp":
            return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, C)).double()
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(4 * 4 * 4, C)).double()

    g = torch.Generator().manual_seed(2)
    x = torch.randn(96, *((12,) if kind == "mlp" else (1, 8, 8)), generator=g, dtype=torch.float64)
    return [make(s) for s in range(R)], (x, torch.randint(0, C, (96,), generator=g))


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_the_exact_trace_is_planned_for_one_vector_per_output(one_thread, monkeypatch, kind):
    """The exact trace back-propagates C vectors per sample (C = the model's outputs) in the
    probes' place: the plan counts its tangents as a C-probe matvec's (it planned one probe, and the
    default job went 1.5-2.5x over its budget), and the largest tangent the job's exact trace
    holds stays within the plan's per-tangent bound; results equal the unbudgeted job's."""
    from fastcurv.backends.fused.maps import _MapEngine

    C = 24
    models, data = _relu_models(kind, C)
    job = dict(measures=("trace",), max_iter=20)
    shape, name = memory.job_shape(models, data, **job)
    assert name == "fused" and shape.probes == C
    assert memory.job_shape(models, data, **dict(job, trace_method="exact"))[0].probes == C
    # a budget whose plan splits the batches
    budget = next(b for b in range(20_000, 10**8, 5_000) if _ok(shape, b) and memory.choose(shape, 2, b).batch_size)
    plan = memory.plan_memory(models, data, budget, **job)
    assert plan.batch_size is not None and plan.estimate["total"] <= memory.SAFETY * budget
    bound = plan.estimate["tangents"] / (shape.layers + 4)  # one tangent of the plan
    held = []
    if kind == "mlp":
        rows = FusedBackend._trace_rows

        def spy(self, st, params, N, C_):
            widest = max([C_] + [w.shape[2] for k, w in params.items() if w.dim() == 3])  # rd: [R, N, C, features]
            held.append(st.deltas[-1].shape[0] * N * C_ * widest * 8)
            return rows(self, st, params, N, C_)

        monkeypatch.setattr(FusedBackend, "_trace_rows", spy)
    else:
        trace = _MapEngine.exact_trace

        def spy(self, st, params, buffers):  # tangents [n, C, R, *features]
            R_ = next(iter(params.values())).shape[0]
            held.append(st.probs.shape[0] * st.outputs * R_ * st.widest * 8)
            return trace(self, st, params, buffers)

        monkeypatch.setattr(_MapEngine, "exact_trace", spy)
    got = fastcurv.batched_sharpness(models, data, memory_budget=budget, progress=False, **job)
    assert got.trace_method == "exact" and held and max(held) <= bound, (max(held), bound)
    monkeypatch.undo()
    ref = fastcurv.batched_sharpness(models, data, progress=False, **job)
    torch.testing.assert_close(got["trace"], ref["trace"], rtol=1e-10, atol=0)


def test_the_operator_budget_counts_the_exact_trace():
    """HessianOperator(memory_budget=): the fused state cache leaves room for the exact trace's C
    vectors per sample where it applies (C = 24 > the 10 probes otherwise planned)."""
    models, data = _relu_models("mlp", 24)
    op = fastcurv.HessianOperator(models, data, backend="fused", memory_budget="64MiB")
    least = memory.operator_least_bytes("fused", op.backend, op.batches)
    # (3 Linear layers + 4) tangents [R = 2, n = 96, C = 24, widest = 32] of float64, not 10 probes' worth
    assert least["tangents"] == 7 * 2 * 96 * 24 * 32 * 8
    assert op.backend.cache_bytes == int((memory.SAFETY * 64 * 2**20 - least["total"]) // memory.STATE_COPIES)


def _gen(data, step=16):
    x, y = data
    return ((x[i:i + step], y[i:i + step]) for i in range(0, x.shape[0], step))


class _ReadOnce:
    """A loader whose __iter__ returns a new iterator that shares one underlying stream (re-iterable in
    form, one-pass in fact)."""

    def __init__(self, batches):
        self.stream = iter(batches)

    def __iter__(self):
        return (b for b in self.stream)


def test_a_one_pass_loader_with_a_budget(one_thread):
    """memory_budget= with a generator: the plan and the job read the same batches, read once and
    kept (the plan read the generator, and the job found it empty); a plan that would not cache a
    re-iterable loader's batches keeps a generator's (counted in the estimate); cache_data=False
    with a generator, and a loader that yields nothing the second time, raise saying why."""
    models, data = _job(R=3, n=2000)
    kw = dict(KW, seed=0)
    ref = fastcurv.batched_sharpness(models, _gen(data), **kw)
    _close(fastcurv.batched_sharpness(models, _gen(data), memory_budget="1GiB", **kw), ref)
    # a budget where the batches take more than a quarter: a list's are not cached, a generator's are
    listed = list(_gen(data))
    shape, _ = memory.job_shape(models, listed, max_iter=20)
    budget = int(memory.estimate_bytes(shape, 1, cache_bytes=0, cache_data=True)["total"] / memory.SAFETY) + 1
    assert not memory.plan_memory(models, listed, budget, max_iter=20).cache_data
    assert memory.plan_memory(models, listed, budget, max_iter=20, cache_data=True).cache_data
    _close(fastcurv.batched_sharpness(models, _gen(data), memory_budget=budget, **kw), ref)
    with pytest.raises(ValueError, match="cache_data=False with memory_budget= needs a re-iterable loader"):
        fastcurv.batched_sharpness(models, _gen(data), memory_budget="1GiB", cache_data=False, **kw)
    with pytest.raises(ValueError, match="reads the loader twice .* yielded no batches the second time"):
        fastcurv.batched_sharpness(models, _ReadOnce(listed), memory_budget="1GiB", **kw)


@pytest.mark.parametrize("backend", ["fused", "func", "autograd"])
def test_operator_budget_is_checked_for_every_backend(one_thread, backend):
    """HessianOperator(memory_budget=) refuses a budget below the operator's least memory with
    every backend (only the fused one did; func and autograd accepted one byte), names the parts,
    and accepts one above it with the same products."""
    models, data = _job(R=3)
    V = torch.randn(3, 2, sum(p.numel() for p in models[0].parameters()), dtype=torch.float64)
    ref = fastcurv.HessianOperator(models, data, backend=backend)
    with pytest.raises(ValueError, match=r"too small for this operator: it needs about .*\(vectors "):
        fastcurv.HessianOperator(models, data, backend=backend, memory_budget=1)
    least = memory.operator_least_bytes(backend, ref.backend, ref.batches)
    assert least["total"] > 0 and least["vectors"] == memory.PARAM_COPIES * 3 * ref.P * 8
    for budget in (1000, int(least["total"] / memory.SAFETY) - 1):
        with pytest.raises(ValueError, match=r"too small for this operator: it needs about .*\(vectors "):
            fastcurv.HessianOperator(models, data, backend=backend, memory_budget=budget)
    if backend == "fused":  # the caller's cache_bytes is kept, and the budget still checked
        with pytest.raises(ValueError, match="too small for this operator"):
            fastcurv.HessianOperator(models, data, backend=backend, memory_budget=1, backend_options={"cache_bytes": 0})
    fits = int(least["total"] / memory.SAFETY) + 4096
    op = fastcurv.HessianOperator(models, data, backend=backend, memory_budget=fits)
    torch.testing.assert_close(op.matvec(V), ref.matvec(V), rtol=1e-12, atol=1e-14)


def test_whole_batches_error_gives_the_parts_and_useful_advice():
    """A job whose batches stay whole (batch-statistics BatchNorm) and do not fit: the error gives
    the estimate's parts, names the largest batch that would fit when smaller batches help, and
    says that they cannot when even the smallest (2 samples) would not fit."""
    models, (x, y) = _bn_job(R=2, n=64)
    loader = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 64, 32)]
    shape, _ = memory.job_shape(models, loader, max_iter=20, bn_mode="batch", measures=("lambda_max",))
    assert shape.whole_batches and shape.batch == 32
    need = lambda n: memory.estimate_bytes(shape, 1, batch=n, cache_bytes=0)["total"] / memory.SAFETY
    budget = int((need(8) + need(9)) / 2)  # batches of 8 fit, 9 do not
    with pytest.raises(ValueError, match=r"so the batches are not split") as err:
        memory.choose(shape, 2, budget)
    msg = str(err.value)
    assert "(vectors " in msg and "tangents " in msg and "a loader with batches of at most 8 samples would fit" in msg
    small = int(need(2)) - 1
    with pytest.raises(ValueError, match=r"smaller batches cannot make it fit \(even batches of 2 need about") as err:
        memory.choose(shape, 2, small)
    assert "(vectors " in str(err.value) and "a loader with" not in str(err.value)
    assert shape.min_batch == 2
    two = dataclasses.replace(shape, batch=2)
    with pytest.raises(ValueError, match=r"batches of 2 are the smallest this job takes\); most of the estimate is"):
        memory.choose(two, 2, small)


def test_a_budgeted_job_falls_back_where_the_engine_check_does():
    """An MLP applied along [N, T, F] inputs: the plan runs the engine check as the operator does and
    plans func (it planned the fused engine, which then failed on the inputs)."""
    ms = [nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double() for _ in range(2)]
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 5, 4, generator=g, dtype=torch.float64), torch.randn(6, 5, 3, generator=g, dtype=torch.float64)
    kw = dict(measures=("lambda_max",), loss="mse", progress=False)
    plain = fastcurv.batched_sharpness(ms, (x, y), **kw)
    budget = fastcurv.batched_sharpness(ms, (x, y), memory_budget="1GiB", **kw)
    assert plain.backend == budget.backend == "func"
    torch.testing.assert_close(budget["lambda_max"], plain["lambda_max"])


# --- one-pass detection, a one-pass loader over the budget, jobs that cannot be split (hunt 21) -------
class _SelfIterLoader:
    """The "FastTensorDataLoader" pattern: __iter__ resets the position and returns self, so every
    iter() starts a new pass (re-iterable), and it has a __len__."""

    def __init__(self, data, step=16):
        self.x, self.y = data
        self.step, self.passes = step, 0

    def __iter__(self):
        self.i, self.passes = 0, self.passes + 1
        return self

    def __next__(self):
        if self.i >= self.x.shape[0]:
            raise StopIteration
        self.i += self.step
        return self.x[self.i - self.step:self.i], self.y[self.i - self.step:self.i]

    def __len__(self):
        return -(-self.x.shape[0] // self.step)


def test_one_pass_loaders_are_told_by_their_type(one_thread, monkeypatch):
    """One-pass: generators and iterators whose type has no __len__ (iter(list), map, itertools),
    and a DataLoader's iterator; a loader whose __iter__ resets and returns self (with a __len__)
    is re-iterable: streamed with cache_data=False and not copied with 'auto' (it was refused, or
    read whole and kept); a DataLoader is never iterated to find out (that started its workers and
    drew a seed from torch's generator)."""
    import itertools

    models, data = _job(R=2, n=96)
    listed = list(_gen(data))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data), batch_size=16)
    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", lambda self: pytest.fail("iterated"))
    assert memory.read_one_pass(models, loader, "auto") == (loader, "auto")
    monkeypatch.undo()
    kw = dict(KW, seed=0)
    ref = fastcurv.batched_sharpness(models, listed, **kw)
    for cache_data in (False, "auto"):
        selfiter = _SelfIterLoader(data)
        got, _ = memory.read_one_pass(models, selfiter, cache_data)
        assert got is selfiter and selfiter.passes == 0
        _close(fastcurv.batched_sharpness(models, selfiter, memory_budget="1GiB", cache_data=cache_data, **kw), ref)
        assert selfiter.passes > (2 if cache_data is False else 1)  # read by the plan and again by the job
    with pytest.raises(ValueError, match="cache_data=False with memory_budget= needs a re-iterable loader.*__len__"):
        fastcurv.batched_sharpness(models, iter(listed), memory_budget="1GiB", cache_data=False, **kw)
    for one_pass in (_gen(data), iter(listed), map(lambda b: b, listed), itertools.islice(listed, 3), iter(loader)):
        assert memory.is_one_pass(one_pass)
    for reiterable in (listed, data, _SelfIterLoader(data), loader, range(3)):
        assert not memory.is_one_pass(reiterable)


def test_a_one_pass_loader_over_the_budget_is_refused_while_read(one_thread):
    """A one-pass loader whose batches exceed what the budget allows: reading stops at the batch
    that passes SAFETY * budget, with a ValueError saying that its batches must be kept and what to
    do (it was read whole, 3x the budget, before the plan refused it); batches that fit the reading
    but not the job: the plan's error names the kept batches and the same advice."""
    models, (x, y) = _job(R=2, n=2000)
    drawn = []

    def stream(batches=50, step=200):  # 200 samples of 12 float64 + int64 labels: 20800 bytes a batch
        for i in range(batches):
            drawn.append(i)
            yield x[i * step % 2000:][:step], y[i * step % 2000:][:step]

    budget = int(20.5 * 20800 / memory.SAFETY)  # room for 20 batches
    with pytest.raises(ValueError, match=r"too small for the batches of this one-pass generator: .* must be kept .*"
                                         r"first 21 batches already take .*re-iterable loader .* or a larger budget"):
        fastcurv.batched_sharpness(models, stream(), memory_budget=budget, **KW)
    assert len(drawn) == 21  # not the 50 batches
    drawn.clear()
    with pytest.raises(ValueError, match=r"too small for this job: .*most of it is the batches, kept on the device: "
                                         r"a one-pass loader's batches must be kept .*re-iterable loader"):
        fastcurv.batched_sharpness(models, stream(batches=19), memory_budget=budget, **KW)
    assert len(drawn) == 19
    got = fastcurv.batched_sharpness(models, stream(batches=5), memory_budget="1GiB", **KW)
    _close(got, fastcurv.batched_sharpness(models, list(stream(batches=5)), **KW))


def test_a_job_that_cannot_be_split_is_planned_in_one_chunk(one_thread):
    """epsilon_sharpness_subspace with common_random_numbers=False cannot be split into chunks: the
    plan keeps all replicas in one chunk (it split them, and the job then refused its own plan),
    with a partial state cache where the whole does not fit; a budget too small for one chunk of
    all of them says so."""
    models, data = _job(R=4, n=96)
    name = "epsilon_sharpness_subspace"
    job = dict(measures=(name,), common_random_numbers=False, measure_options={name: {"p": 20, "n_iter": 2}})
    shape, _ = memory.job_shape(models, data, **job)
    whole = memory.estimate_bytes(shape, 4, max_matrix_bytes=0)["total"]
    partial = memory.estimate_bytes(shape, 4, cache_bytes=0, max_matrix_bytes=0)["total"]
    assert partial < whole
    budget = int((whole + partial) / 2 / memory.SAFETY)  # 4 replicas fit only with a partial state cache
    plan = memory.plan_memory(models, data, budget, **job)
    assert plan.replica_chunk == 4 and plan.estimate["total"] <= memory.SAFETY * budget
    assert shape.unsplit.startswith(f"measures ['{name}'] with common_random_numbers=False cannot be split")
    assert memory.choose(dataclasses.replace(shape, unsplit=""), 4, budget).replica_chunk < 4  # (a split plan)
    ref = fastcurv.batched_sharpness(models, data, progress=False, **job)
    got = fastcurv.batched_sharpness(models, data, progress=False, memory_budget=budget, **job)
    torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=0)
    least = memory.estimate_bytes(shape, 4, batch=1, cache_bytes=0, max_matrix_bytes=0)["total"]
    small = int(least / memory.SAFETY) - 64
    assert memory.estimate_bytes(shape, 1, batch=1, cache_bytes=0, max_matrix_bytes=0)["total"] < memory.SAFETY * small
    with pytest.raises(ValueError, match=r"too small for this job: measures \['epsilon_sharpness_subspace'\] with "
                                         r"common_random_numbers=False cannot be split into chunks or ranks, so its 4 "
                                         r"replicas run in one chunk, and with one-sample batches they need about"):
        fastcurv.batched_sharpness(models, data, progress=False, memory_budget=small, **job)


@pytest.mark.parametrize("y", [torch.tensor([True, False, True]), torch.tensor([1, 0, 2], dtype=torch.uint8),
                               torch.tensor([1, 0, 2])])
def test_a_one_pass_loaders_targets_are_counted_as_the_job_keeps_them(y):
    """read_one_pass counts the bytes of the batches it keeps as Batches converts them: labels become
    int64 (bool labels too, since this round; they were counted at one byte each)."""
    from fastcurv.data import Batches, _kept_bytes

    kept = Batches((torch.zeros(3, 2), y), device="cpu", dtype=torch.float32).cache[0][1]
    assert _kept_bytes(y, torch.float32, targets=True) == kept.numel() * kept.element_size()


def _conv_job(R=2, n=12):
    g = torch.Generator().manual_seed(3)
    models = []
    for s in range(R):
        torch.manual_seed(s)
        models.append(nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double())
    return models, (torch.randn(n, 2, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))


def test_the_cost_model_takes_the_fused_engines_defaults_from_the_backend(monkeypatch):
    """The cost model restated the fused backend's defaults (the MLP engine's 4 MiB CPU tangent
    chunk at two places, the conv engine's 16 MiB CPU / 2 GiB GPU sample chunk), so a change to the
    engine would have left the memory plan's estimate stale. It reads them from the backend now
    (``DEFAULT_CHUNK_BYTES``, ``default_sample_chunk_bytes``)."""
    from fastcurv.backends.fused import backend as B

    models, data = _conv_job()
    shape, name = memory.job_shape(models, data, max_iter=20)
    assert name == "fused" and shape.conv and shape.sample_chunk_bytes is None
    default = B.default_sample_chunk_bytes(torch.device("cpu"))
    assert memory.estimate_bytes(shape, 2) == memory.estimate_bytes(dataclasses.replace(shape, sample_chunk_bytes=default), 2)
    mlp_shape, _ = memory.job_shape(*_job(R=2), max_iter=20)
    assert mlp_shape.chunk_bytes == B.DEFAULT_CHUNK_BYTES
    # an engine with other defaults: the estimate and a shape's default follow
    monkeypatch.setattr(B, "default_sample_chunk_bytes", lambda device: 1)
    monkeypatch.setattr(B, "DEFAULT_CHUNK_BYTES", 12345)
    tight = memory.estimate_bytes(shape, 2)
    assert tight == memory.estimate_bytes(dataclasses.replace(shape, sample_chunk_bytes=1), 2)
    assert tight["tangents"] < memory.estimate_bytes(dataclasses.replace(shape, sample_chunk_bytes=default), 2)["tangents"]
    bare = memory.JobShape(P=1, itemsize=8, batch=1, num_samples=1, data_bytes=0, vectors=1, probes=1,
                           state_per_sample=0, act_per_sample=0, widest=1, layers=1, fused=True, gpu=False)
    assert bare.chunk_bytes == 12345


def test_largest_true_bisects_a_monotone_predicate():
    """The plan's bisection ("the largest n with a monotone predicate") was written out twice (the
    replicas per chunk, the largest batch that fits): one helper now, whose ``lo`` is never
    tested (0: none fits; or a floor taken as fitting)."""
    from fastcurv.memory_model import largest_true

    calls = []
    assert largest_true(0, 100, lambda n: calls.append(n) or n <= 37) == 37
    assert 0 not in calls and len(calls) <= 7
    assert largest_true(0, 100, lambda n: False) == 0 and largest_true(5, 100, lambda n: False) == 5
    assert largest_true(0, 100, lambda n: True) == 100 and largest_true(3, 3, lambda n: 1 / 0) == 3


def test_the_plan_reads_a_loader_as_the_job_does():
    """The plan's scan of the data (``_scan_data``) re-implemented the walk of ``Batches`` with
    checks of its own: numpy batches got "must be tensors with a batch axis" without the hint that
    ``Batches`` gives, data that is no loader a bare "'int' object is not iterable", and batches
    whose inputs and targets disagree on the batch size were planned (the job refused them only
    after). It walks the loader as ``Batches`` does now (``fastcurv.data.LoaderPass``)."""
    import numpy as np

    models, _ = _job(R=2)
    with pytest.raises(TypeError, match="convert them with torch.as_tensor"):
        memory.plan_memory(models, [(np.zeros((4, 12)), np.zeros(4, dtype=np.int64))], "1GiB", max_iter=5)
    with pytest.raises(TypeError, match="data must be a loader"):
        memory.plan_memory(models, 5, "1GiB", max_iter=5)
    with pytest.raises(ValueError, match=r"batch 1: inputs \(4, 12\) and targets \(3,\) disagree on the batch size"):
        memory.plan_memory(models, [(torch.zeros(4, 12), torch.zeros(4, dtype=torch.long)),
                                    (torch.zeros(4, 12), torch.zeros(3, dtype=torch.long))], "1GiB", max_iter=5)
    with pytest.raises(ValueError, match="only empty batches"):
        memory.plan_memory(models, [(torch.zeros(0, 12), torch.zeros(0, dtype=torch.long))], "1GiB", max_iter=5)


def test_the_plan_reads_the_subspace_options_as_whole_floats_too(one_thread):
    """epsilon_sharpness_subspace takes whole floats for its counts (a JSON config's p=2000.0), but
    the plan skipped any p, n_iter or max_matrix_bytes that was not an int: with p=2000.0 it left
    the P x p matrix out (matrix_p 0; on a P = 12210 MLP a 96 MB matrix missing from a 150 MB
    budget, then cached under the default 1 GiB cap). A measure's entry None (no options) raised
    AttributeError in the plan; it is the defaults."""
    from fastcurv.memory_job import job_shape

    models, data = _job(R=2, n=16)
    name, fields = "epsilon_sharpness_subspace", ("matrix_p", "matrix_shared", "matrix_products", "matrix_max")

    def matrix(options):
        shape, _ = job_shape(models, data, measures=(name, "rho_sharpness"), measure_options=options)
        return {f: getattr(shape, f) for f in fields}

    ints = matrix({name: {"p": 20, "n_iter": 3, "max_matrix_bytes": 4096}})
    assert ints == {"matrix_p": 20, "matrix_shared": True, "matrix_products": 9, "matrix_max": 4096}
    assert matrix({name: {"p": 20.0, "n_iter": 3.0, "max_matrix_bytes": 4096.0}}) == ints
    P = sum(t.numel() for t in models[0].parameters())  # (the default p=1000, at most P)
    assert matrix({name: None, "rho_sharpness": None}) == matrix({}) == {**ints, "matrix_p": min(1000, P),
                                                                         "matrix_products": 23, "matrix_max": None}
