"""Independent draws (common_random_numbers=False) and split jobs: only measures that draw one noise
row per replica of a chunk are refused, and only when the job really splits into chunks."""
import pytest
import torch

import fastcurv
import fastcurv.sharpness as S
from fastcurv.measures import rho_sharpness as RS

from _measure_models import make_data, make_replicas, single_thread  # noqa: F401  (autouse fixture)

KW = dict(common_random_numbers=False, progress=False)
SAFE = {"measures": ("fisher_rao", "ggn_trace", "relative_flatness"),
        "measure_options": {"relative_flatness": {"method": "exact"}, "ggn_trace": {"num_matvecs": 6}}}
NOISY = {"measures": ("avg_rho_sharpness",), "measure_options": {"avg_rho_sharpness": {"n_samples": 4}}}


def _close(got, ref):
    assert got.values.keys() == ref.values.keys()
    for k, v in ref.values.items():
        torch.testing.assert_close(got[k], v, rtol=1e-10, atol=1e-12)


def test_measures_without_per_replica_noise_split_freely(tmp_path):
    models, data = make_replicas(R=3), make_data()
    ref = fastcurv.batched_sharpness(models, data, **SAFE, **KW)
    for split in ({"memory_budget": "4GiB"}, {"output": str(tmp_path / "a.jsonl")}, {"replica_chunk": 1}):
        _close(fastcurv.batched_sharpness(models, data, **split, **SAFE, **KW), ref)
    zero_start = {"measures": ("rho_sharpness",), "measure_options": {"rho_sharpness": {"init": "zero", "n_iter": 2}}}
    _close(fastcurv.batched_sharpness(models, data, replica_chunk=2, **zero_start, **KW),
           fastcurv.batched_sharpness(models, data, **zero_start, **KW))


def test_noisy_measures_run_in_one_chunk_and_are_refused_when_split(tmp_path):
    models, data = make_replicas(R=3), make_data()
    ref = fastcurv.batched_sharpness(models, data, **NOISY, **KW)
    for one_chunk in ({"memory_budget": "4GiB"}, {"output": str(tmp_path / "a.jsonl")}, {"replica_chunk": 3}):
        _close(fastcurv.batched_sharpness(models, data, **one_chunk, **NOISY, **KW), ref)
    for noisy in (NOISY, {"measures": ("relative_flatness",), "measure_options": {"relative_flatness": {"num_probes": 4}}}):
        with pytest.raises(ValueError, match=rf"\['{noisy['measures'][0]}'\].*use common_random_numbers=True"):
            fastcurv.batched_sharpness(models, data, replica_chunk=2, **noisy, **KW)
    # with common draws every measure splits
    _close(fastcurv.batched_sharpness(models, data, replica_chunk=2, **NOISY, progress=False),
           fastcurv.batched_sharpness(models, data, **NOISY, progress=False))


def test_out_of_memory_is_not_retried_in_chunks_when_that_would_change_the_draws(monkeypatch, tmp_path):
    """A GPU out-of-memory error (simulated) in a job that must not split: raised as it is, with a
    note saying why it was not retried in halves."""
    models, data = make_replicas(R=2), make_data()

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(RS, "average_case_sharpness", out_of_memory)
    monkeypatch.setattr(S, "_on_gpu", lambda models: True)
    for job in ({"output": str(tmp_path / "a.jsonl")}, {}):  # a one-chunk job; an unchunked job on a GPU
        with pytest.raises(torch.cuda.OutOfMemoryError) as info:
            fastcurv.batched_sharpness(models, data, **job, **NOISY, **KW)
        assert "not retried in smaller chunks" in " ".join(getattr(info.value, "__notes__", ())), job
