"""Bad inputs added with issue 7: non-deterministic loaders (opt-in two-pass check), replicas on
other devices, solver non-convergence flagged, a NaN replica inside a chunked job."""
import math

import pytest
import torch

import fastcurv
from models import mlp, replicas


def data(n=12, d=5, c=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float64), torch.randint(0, c, (n,), generator=gen)


class ShufflingLoader:
    """Yields the same samples in a new random order on every pass (like shuffle=True)."""

    def __init__(self, x, y, bs=4):
        self.x, self.y, self.bs, self.g = x, y, bs, torch.Generator().manual_seed(0)

    def __iter__(self):
        perm = torch.randperm(len(self.x), generator=self.g)
        for i in range(0, len(perm), self.bs):
            j = perm[i : i + self.bs]
            yield self.x[j], self.y[j]


def test_nondeterministic_loader_detected_when_asked():
    x, y = data()
    loader = ShufflingLoader(x, y)
    with pytest.raises(ValueError, match="not deterministic: batch 0 differs"):
        fastcurv.HessianOperator(replicas(mlp, 2), loader, check_determinism=True)
    with pytest.raises(ValueError, match="not deterministic"):
        fastcurv.batched_sharpness(replicas(mlp, 2), loader, check_determinism=True, progress=False)
    # a deterministic loader passes the check and gives the same products as without it
    fixed = [(x[:5], y[:5]), (x[5:], y[5:])]
    ms = replicas(mlp, 2)
    a = fastcurv.HessianOperator(ms, fixed, check_determinism=True, cache_data=False)
    b = fastcurv.HessianOperator(ms, fixed)
    v = torch.randn(2, a.P, dtype=torch.float64)
    torch.testing.assert_close(a.matvec(v), b.matvec(v))


def test_replicas_on_different_devices():
    ms = [mlp().double(), mlp().double().to("meta")]
    with pytest.raises(ValueError, match="replica 1 .* on meta .* one device"):
        fastcurv.HessianOperator(ms, data())


def test_integer_inputs_for_a_float_model():
    x, y = data()
    with pytest.raises(ValueError, match="cannot run on the first batch"):
        fastcurv.HessianOperator([mlp().double()], (x.long(), y))


def test_non_converged_replica_is_flagged_not_silently_reported():
    res = fastcurv.batched_sharpness(replicas(mlp, 3), data(), measures=("lambda_max", "lambda_min"),
                                     max_iter=2, tol=1e-12, progress=False)
    assert not res.converged["lambda_max"].any()
    assert all("lambda_max not converged" in f and "lambda_min not converged" in f for f in res.flags)
    assert res.to_pandas()["lambda_max_converged"].eq(False).all()
    ok = fastcurv.batched_sharpness(replicas(mlp, 3), data(), measures=("lambda_max",), progress=False)
    assert ok.converged["lambda_max"].all() and ok.flags == ["", "", ""]


def test_nan_replica_in_a_chunked_job_is_flagged_at_its_global_index(tmp_path):
    ms = replicas(mlp, 4)
    with torch.no_grad():
        ms[3][0].weight[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        res = fastcurv.batched_sharpness(ms, data(), replica_chunk=2, output=str(tmp_path / "r.jsonl"), progress=False)
    assert res.ok.tolist() == [True, True, True, False]
    assert res.flags[3] == "non-finite parameters" and math.isnan(res["lambda_max"][3])
    assert torch.isfinite(res["lambda_max"][:3]).all()
