"""The benchmark scripts' own machinery: peak-memory measurement, tiny runs of hvp_json (W1, W3) and
sparse_hidden_json, and that the timings mean what the scripts say (warm baselines, steady-state
units, compiled rows only when something compiled)."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import fastcurv

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)
import peak_memory  # noqa: E402


def _cpu_peak_measurable() -> bool:
    return sys.platform.startswith("linux") and peak_memory.reset_peak_rss()


@pytest.mark.skipif(not _cpu_peak_measurable(), reason="needs Linux's /proc/self/clear_refs")
def test_peak_memory_sees_a_block_that_was_freed():
    with peak_memory.measure(torch.device("cpu")) as quiet:
        pass
    with peak_memory.measure(torch.device("cpu")) as busy:
        t = torch.ones(64 << 18)  # 64 MiB of float32, touched, then freed inside the block
        del t
    assert quiet.MiB is not None and busy.MiB is not None
    assert busy.MiB >= 60, busy.MiB
    assert quiet.MiB < 16, quiet.MiB


@pytest.mark.skipif(not _cpu_peak_measurable(), reason="needs Linux's /proc/self/clear_refs")
def test_peak_memory_counts_memory_the_allocator_held_free():
    """Small blocks freed before the measurement stay in malloc's heap; what the block takes of them
    again still counts (the heap is handed back to the system first)."""
    held = [torch.ones(8 << 10) for _ in range(2048)]  # 2048 x 32 KiB: below glibc's mmap threshold
    del held
    with peak_memory.measure(torch.device("cpu")) as busy:
        again = [torch.ones(8 << 10) for _ in range(2048)]
        del again
    assert busy.MiB >= 48, busy.MiB


@pytest.mark.gpu
def test_peak_memory_on_cuda():
    dev = torch.device("cuda")
    with peak_memory.measure(dev) as busy:
        t = torch.ones(64 << 18, device=dev)
        del t
    assert busy.bytes >= 64 << 20


def test_hvp_json_tiny_run(tmp_path):
    """The reference benchmark end to end on a tiny W1 (its slow parts skipped): every timing and
    peak-memory entry is there and finite."""
    out = tmp_path / "hvp.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, os.path.join(BENCH, "hvp_json.py"), "--replicas", "2", "--batch", "64", "--repeats", "1",
                    "--job-repeats", "1", "--skip-slow", "--out", str(out)], check=True, env=env, capture_output=True, timeout=300)
    res = json.loads(out.read_text())
    for key in ("gradient_batched_fused", "batched_sharpness_fused", "hvp_fused_K1", "hvp_fused_K8", "hvp_func_K1",
                "exact_trace_fused", "hvp_fused_K10"):
        assert res["seconds"][key] > 0, key
        peak = res["peak_memory_MiB"][key]
        assert peak is None or peak >= 0, (key, peak)
    assert res["ratio_to_gradient"]["hvp_fused_K8_per_probe"] > 0
    # the FLOP model counts what each variant of the engine does: fewer first-layer inputs with the
    # sparse input or the zero columns left out, all 784 without either
    work = res["engine_first_layer_inputs_and_hidden_macs"]
    assert work["fused"][0] <= work["fused_dense_input"][0] <= work["fused_all_columns"][0] == 784
    assert work["fused"][1] <= work["fused_dense_hidden"][1] == 128 * 128
    assert 0 < res["fused_K8_fraction_of_bmm"] and res["bmm_gflops"] > 0


def test_hvp_json_tiny_w3_run(tmp_path):
    """W3 end to end on 2 replicas and 16 images: the pooled stem and the full-resolution one are
    both timed, and the FLOP model counts the first convolution at the positions each one does."""
    out = tmp_path / "hvp_w3.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, os.path.join(BENCH, "hvp_json.py"), "--workload", "W3", "--replicas", "2", "--batch", "16",
                    "--repeats", "1", "--job-repeats", "1", "--skip-slow", "--out", str(out)], check=True, env=env,
                   capture_output=True, timeout=300)
    res = json.loads(out.read_text())
    for key in ("hvp_fused_K8", "hvp_fused_full_stem_K8", "exact_trace_fused"):
        assert res["seconds"][key] > 0, key
    assert res["batched_sharpness_fused_trace_rel_stderr_median"] == 0  # the exact trace
    done = res["first_conv_positions_done"]
    assert done["fused_full_stem"] == 1.0
    assert done["fused"] == (0.25 if fastcurv.cpu_extension_loaded() else 1.0)  # 2x2 max pooling: a quarter
    assert res["gflops_fused_K8"] > 0 and res["gflops_fused_full_stem_K8"] > 0


def test_sparse_hidden_json_tiny_run(tmp_path):
    """The sparse-hidden sweep end to end on tiny MLPs: a larger bias shift opens more ReLUs, and
    every mode's time is there."""
    out = tmp_path / "sparse_hidden.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, os.path.join(BENCH, "sparse_hidden_json.py"), "--replicas", "2", "--hidden", "32",
                    "--train", "200", "--batch", "64", "--epochs", "1", "--repeats", "1", "--shifts", "0", "2",
                    "--out", str(out)], check=True, env=env, capture_output=True, timeout=300)
    res = json.loads(out.read_text())
    low, high = res["runs"]
    assert len(low["relu_density"]) == 2
    for a, b in zip(low["relu_density"], high["relu_density"]):
        assert 0 <= a["min"] <= a["mean"] <= a["max"] <= 1
        assert b["mean"] > a["mean"]
    for run in res["runs"]:
        assert set(run["seconds"]) == {"on", "off", "auto"} and min(run["seconds"].values()) > 0
        assert run["dense_over_sparse"] > 0


def _tiny_w1(R=2, n=16):
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(20, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)) for _ in range(R)]
    return models, torch.rand(n, 20), torch.randint(0, 3, (n,))


def test_hvp_json_does_not_label_eager_func_times_compiled(monkeypatch):
    """Where torch.compile fails, func runs its linearizations eagerly (with a warning); hvp_json
    used to report those eager times as ``func_compile_first_matvec`` ("the first matvec, which
    compiles") and ``hvp_func_compiled_K*`` with nothing in the JSON saying that nothing was
    compiled. Now they are left out and ``func_compiled_skipped`` holds the reason."""
    import warnings

    import hvp_json

    def unavailable(fn, **kw):
        raise RuntimeError("simulated: no working C++ compiler")

    monkeypatch.setattr(torch, "compile", unavailable)
    models, x, y = _tiny_w1()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seconds, skipped = hvp_json.func_compiled_times(models, x, y, 1, lambda: None)
    assert seconds == {}
    assert "torch.compile failed" in skipped and "simulated: no working C++ compiler" in skipped


def test_hvp_json_times_func_compiled_when_the_compile_works(monkeypatch):
    """The compiled rows are still written when the compile works (Dynamo's "eager" backend here: no
    C++ compiler needed, and quick)."""
    import hvp_json

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager", **kw))
    models, x, y = _tiny_w1()
    try:
        seconds, skipped = hvp_json.func_compiled_times(models, x, y, 1, lambda: None)
    finally:
        torch._dynamo.reset()
    assert skipped is None
    assert set(seconds) == {"func_compile_first_matvec", "hvp_func_compiled_K1", "hvp_func_compiled_K8"}
    assert min(seconds.values()) > 0


def _one_time_cost_in_first_sgd(monkeypatch, seconds):
    """Make the first ``torch.optim.SGD`` construction sleep ``seconds``: the real first one imports
    torch._dynamo (2.3-2.7 s on 2 cores), which this test process may already have done."""
    real, paid = torch.optim.SGD, []

    def sgd(*args, **kwargs):
        if not paid:
            paid.append(True)
            time.sleep(seconds)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "SGD", sgd)


def test_bench_train_times_the_loop_warm(monkeypatch):
    """bench_train's loop baseline (the denominator of every speed-up) used to pay torch.optim's
    one-time import inside its timed run: with ``repeats=1``, 2.3 s for a loop that takes 0.03 s
    warm, ``speedup_loop_over_batched`` 56 instead of 1. Now every variant runs once untimed first."""
    import bench_train

    _one_time_cost_in_first_sgd(monkeypatch, 0.5)
    res = bench_train.measure(R=2, epochs=1, repeats=1, n_train=128, variants=("batched",))
    assert res["loop_s"] < 0.25, res["loop_all_s"]


def test_bench_train_pytest_benchmarks_warm_up(monkeypatch):
    """The same for the pytest-benchmark tests, which time a single round with no warm-up round."""
    import bench_train

    class Once:  # pytest-benchmark's fixture, reduced to what the tests use
        def pedantic(self, fn, args=(), kwargs=None, rounds=1, iterations=1):
            t = time.perf_counter()
            fn(*args, **(kwargs or {}))
            self.seconds = time.perf_counter() - t

    _one_time_cost_in_first_sgd(monkeypatch, 0.5)
    x, y = torch.rand(128, 784), torch.randint(0, 10, (128,))
    bench = Once()
    bench_train.time_once(bench, "loop", x, y, R=2)
    assert bench.seconds < 0.25, bench.seconds


def test_measures_json_gradient_unit_is_timed_in_the_steady_state(monkeypatch):
    """measures_json divides each measure's job (whose calls all run inside one ``heap_reuse``) by
    the gradient unit. It timed that unit as single calls, each in its own ``heap_reuse``, paying
    fresh pages every time: 1.12x the steady-state unit at R=20 (1 thread), 1.5-2x at R=100, so
    every measure's ``gradient_units`` came out that much too small against hvp_json's unit. Now every
    call it makes runs inside an enclosing ``heap_reuse``, as in hvp_json.best."""
    import measures_json
    from fastcurv import _heap

    depths, real = [], fastcurv.HessianOperator.loss_and_gradient

    def spy(self, *args, **kwargs):
        depths.append(_heap._depth)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(fastcurv.HessianOperator, "loss_and_gradient", spy)
    models, x, y = _tiny_w1(n=32)
    assert measures_json.gradient_unit(models, measures_json.loader_of(x, y, 16)) > 0
    assert len(depths) == 4 and min(depths) >= 1, depths  # a warm-up and 3 timed calls


def test_measures_json_records_say_what_they_measured():
    """The docstring promised per-iteration costs that no record held: each record now has the
    solvers' median iterations, and the JSON says how the gradient unit was timed."""
    import measures_json

    out = measures_json.run(R=2, n=64, batch=32, train_steps=0, measures=("lambda_max",), with_audit=False,
                            log=lambda *a: None)
    rec, = out["records"]
    assert rec["iterations"]["lambda_max"] >= 1
    assert "steady state" in out["gradient_unit"]


def test_memory_json_records_the_trace_method(capsys):
    """memory_json's docstring called its job's trace Krylov-deflated, but on its ReLU MLPs the
    default job computes it exactly, and the JSON did not say which: now it does."""
    import memory_json

    try:
        memory_json.main(["--child", "--replicas", "2", "--n-train", "64", "--batch-size", "32"])
    except FileNotFoundError as exc:
        pytest.skip(f"MNIST not found: {exc}")
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["trace_method"] == "exact" and res["all_ok"]


def test_bench_agreement_never_runs_the_largest_one_hot_matmuls(monkeypatch):
    """The docstring says the one-hot matmul at R = 1000, C = 1000 (2e13-2e14 flops, over 10
    minutes) never runs, but with FASTCURV_BENCH_LARGE=1 the case M = 10k (2e13 flops) did: its
    R * M * C = 1e10 passed the ``> 1e10`` skip. Now the skip counts the matmul's flops."""
    import bench_agreement

    class NoRun:
        def pedantic(self, *args, **kwargs):
            raise AssertionError("the one-hot matmul would run here")

    monkeypatch.setattr(bench_agreement, "LARGE", True)
    with pytest.raises(pytest.skip.Exception, match="over 10 minutes"):
        bench_agreement.test_agreement_counts(NoRun(), 1000, 10_000, 1000, "onehot")
