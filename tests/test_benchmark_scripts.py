"""The benchmark scripts' own machinery: peak-memory measurement and tiny runs of hvp_json (W1, W3) and sparse_hidden_json."""
import json
import os
import subprocess
import sys

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
