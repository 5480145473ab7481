"""MSE and regression paths found broken by the twenty-fifth round's hunt: data that requires grad,
the GGN of torch's own MSE callables, half-precision models and overflowing losses on the fused
engine, the empirical Fisher's scale for "mse" against a callable MSE, and loss-name spellings."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

import fastcurv
from fastcurv.curvature import EmpiricalFisherOperator, GGNOperator
from fastcurv.data import Batches

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed, out=2, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, out)).to(dtype)


def _regression(n=12, out=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=dtype), torch.randn(n, out, generator=g, dtype=dtype)


def _probes(op, seed=1):
    return torch.randn(op.R, op.P, generator=torch.Generator().manual_seed(seed), dtype=op.dtype)


def _per_sample_jacobians(model, x):
    """``[N, C, P]`` Jacobians of a float64 model's outputs w.r.t. its flat parameters."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(t, xi):
        parts = dict(zip(names, (c.view(s) for c, s in zip(t.split([s.numel() for s in shapes]), shapes))))
        return functional_call(model, parts, (xi.unsqueeze(0),))[0]

    return torch.stack([jacrev(f)(flat, xi) for xi in x])


# --- 4: data that requires grad -----------------------------------------------------------------
def test_batches_are_detached_from_the_callers_graph():
    """Batches moved x and y to the device but kept their autograd graph (targets from a teacher
    net, y = teacher(x)); every product then carried it."""
    x, _ = _regression()
    y = nn.Linear(3, 2)(x)
    b = Batches((x.requires_grad_(), y), device="cpu", dtype=torch.float32)
    (_, xb, yb), = list(b)
    assert not xb.requires_grad and not yb.requires_grad
    assert torch.equal(xb, x.detach()) and torch.equal(yb, y.detach())


def test_teacher_targets_that_require_grad_run_on_the_fused_engine():
    """y = teacher(x) without .detach(): the fused engine (and auto, batched_sharpness) raised
    torch's "A view was created in no_grad mode and is being modified inplace" from _bmm_into."""
    x, _ = _regression()
    y = nn.Linear(3, 2)(x)
    assert y.requires_grad
    models = [_mlp(0), _mlp(1)]
    want = fastcurv.HessianOperator(models, (x, y.detach()), loss="mse", backend="autograd")
    V = _probes(want)
    op = fastcurv.HessianOperator(models, (x, y), loss="mse", backend="fused")
    torch.testing.assert_close(op.matvec(V), want.matvec(V), rtol=1e-5, atol=1e-6)
    kw = dict(loss="mse", measures=("lambda_max",), progress=False)
    res = fastcurv.batched_sharpness(models, (x, y), **kw)
    ref = fastcurv.batched_sharpness(models, (x, y.detach()), **kw)
    torch.testing.assert_close(res["lambda_max"], ref["lambda_max"])


def test_inputs_that_require_grad_keep_the_fused_engine():
    """Inputs with requires_grad failed the fused engine's self-check ("the fused engine cannot run
    this model"), so auto fell back to torch.func with a misleading reason."""
    x, y = _regression()
    models = [_mlp(0), _mlp(1)]
    op = fastcurv.HessianOperator(models, (x.clone().requires_grad_(), y), loss="mse")
    assert op.backend_name == "fused", op.backend_reason
    want = fastcurv.HessianOperator(models, (x, y), loss="mse", backend="autograd")
    V = _probes(op)
    torch.testing.assert_close(op.matvec(V), want.matvec(V), rtol=1e-5, atol=1e-6)


# --- 5: the GGN of torch's MSE callables ---------------------------------------------------------
@pytest.mark.parametrize("loss", [F.mse_loss, nn.MSELoss()], ids=["F.mse_loss", "nn.MSELoss"])
def test_ggn_of_torchs_mse_callables_matches_mse_and_the_dense_ggn(loss):
    """GGNOperator(loss=F.mse_loss or nn.MSELoss()) raised torch's "ZeroTensors are immutable"
    (forward over reverse through mse_loss_backward); now the same GGN as loss="mse" and as the
    dense float64 (2 / (N C)) sum_i J_i^T J_i."""
    x, y = _regression(n=10, out=3, dtype=torch.float64)
    models = [_mlp(0, 3, torch.float64), _mlp(1, 3, torch.float64)]
    op = GGNOperator(models, (x, y), loss=loss)
    V = _probes(op)
    got = op.matvec(V)
    torch.testing.assert_close(got, GGNOperator(models, (x, y), loss="mse").matvec(V), rtol=1e-12, atol=1e-12)
    for r, m in enumerate(models):
        J = _per_sample_jacobians(m, x)  # [N, C, P]
        G = 2 * torch.einsum("ncp,ncq->pq", J, J) / y.numel()
        torch.testing.assert_close(got[r], G @ V[r], rtol=1e-10, atol=1e-12)


def test_ggn_lambda_max_of_f_mse_loss_matches_mse():
    """batched_sharpness(loss=F.mse_loss, measures=("ggn_lambda_max",)) raised the same raw error."""
    x, y = _regression()
    models = [_mlp(0), _mlp(1)]
    kw = dict(measures=("ggn_lambda_max",), progress=False)
    got = fastcurv.batched_sharpness(models, (x, y), loss=F.mse_loss, **kw)["ggn_lambda_max"]
    want = fastcurv.batched_sharpness(models, (x, y), loss="mse", **kw)["ggn_lambda_max"]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=0)


def test_ggn_of_huber_loss_is_the_dense_ggn():
    """The GGN differentiated the loss in forward mode and refused F.huber_loss with a
    NotImplementedError; the loss Hessian is now applied by reverse mode: the dense float64
    (1 / (N C)) sum_i J_i^T diag(|r_i| < 1) J_i."""
    x, y = _regression(n=10, out=3, dtype=torch.float64)
    y = 2 * y  # residuals on both sides of Huber's threshold 1
    models = [_mlp(0, 3, torch.float64)]
    op = GGNOperator(models, (x, y), loss=F.huber_loss)
    V = _probes(op)
    J = _per_sample_jacobians(models[0], x)
    with torch.no_grad():
        inside = ((models[0](x) - y).abs() < 1).double()  # [N, C]: Huber's second derivative
    assert 0 < inside.mean() < 1
    G = torch.einsum("ncp,nc,ncq->pq", J, inside, J) / y.numel()
    torch.testing.assert_close(op.matvec(V)[0], G @ V[0], rtol=1e-10, atol=1e-12)


def test_ggn_of_a_model_without_forward_mode_is_named():
    """The forward-mode error now names the model's outputs (what the GGN still differentiates in
    forward mode), not the loss; the Hessian of the same model works."""
    class Sampled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 8)
            self.grid = nn.Parameter(torch.rand(1, 2, 2, 2) * 2 - 1)

        def forward(self, x):
            z = torch.tanh(self.lin(x)).view(-1, 1, 2, 4)
            return F.grid_sample(z, self.grid.expand(len(x), 2, 2, 2), align_corners=True).flatten(1)[:, :2]

    x, y = _regression()
    torch.manual_seed(0)
    models = [Sampled()]
    hess = fastcurv.HessianOperator(models, (x, y), loss="mse")
    assert torch.isfinite(hess.matvec(torch.randn(1, hess.P))).all()
    op = GGNOperator(models, (x, y), loss="mse")
    with pytest.raises(NotImplementedError, match="differentiates the model's outputs in forward mode"):
        op.matvec(torch.randn(1, op.P))


# --- 6: half precision and overflowing losses on the fused engine -------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_are_refused_by_fused_with_the_right_reason(dtype):
    """float16 / bfloat16 models failed the engine's self-check (its float64 tolerance 1e-9), with
    the claim that forward() "may update in place a tensor that another operation reads"; the
    losses matched to the digit (1.16797 against 1.16797). They are refused up front by dtype."""
    x, y = _regression(n=16)
    models = [_mlp(0).to(dtype), _mlp(1).to(dtype)]
    with pytest.raises(ValueError, match=rf"the model is {dtype}; the fused engine runs float32 and float64") as err:
        fastcurv.HessianOperator(models, (x, y), loss="mse", backend="fused")
    assert "in place" not in str(err.value)
    op = fastcurv.HessianOperator(models, (x, y), loss="mse")
    assert op.backend_name == "func" and str(dtype) in op.backend_reason


def test_float16_regression_whose_losses_overflow_runs_on_auto():
    """float16 targets of about 1e3 (squared errors past float16's 65504): every reference loss
    overflowed, the engine check passed without running the engine, and auto crashed with
    "TypeError: head_hvp: float32 or float64 tensors required". auto now gives func's values."""
    x, y = _regression(n=16)
    models = [_mlp(0).half(), _mlp(1).half()]
    kw = dict(loss="mse", measures=("lambda_max",), progress=False)
    with warnings.catch_warnings():  # (the float16 solves may warn about their precision)
        warnings.simplefilter("ignore")
        got = fastcurv.batched_sharpness(models, (x, 1e3 * y), backend="auto", **kw)["lambda_max"]
        want = fastcurv.batched_sharpness(models, (x, 1e3 * y), backend="func", **kw)["lambda_max"]
    assert torch.isfinite(want).all()
    torch.testing.assert_close(got, want)


def test_an_engine_check_with_every_loss_overflowing_falls_back():
    """A float32 population whose every loss overflows on the check's samples (targets 1e20) passed
    the engine check unchecked and ran on the fused engine; the check now fails, naming why."""
    x, y = _regression(n=16)
    models = [_mlp(0), _mlp(1)]
    data = (x, torch.full_like(y, 1e20))
    op = fastcurv.HessianOperator(models, data, loss="mse")
    assert op.backend_name == "func"
    assert "overflows (Inf or NaN)" in op.backend_reason
    with pytest.raises(ValueError, match="could not be compared with the model's own"):
        fastcurv.HessianOperator(models, data, loss="mse", backend="fused")


# --- 7: the empirical Fisher's scale for MSE ----------------------------------------------------
def test_empirical_fisher_scale_of_mse_and_of_a_callable_mse():
    """The documented convention (README, GGN / empirical Fisher): "mse" takes sample i's squared
    error summed over its C outputs with c = 1/(N C), the dense (1/(N C)) sum_i g_i g_i^T (a
    Gaussian likelihood's scale); a callable MSE (nn.MSELoss()) its value on one sample, the mean
    over C, with c = 1/N: exactly 1/C of it. (A documentation fix: this pins the convention.)"""
    x, y = _regression(n=10, out=4, dtype=torch.float64)
    model = _mlp(0, 4, torch.float64)
    op = EmpiricalFisherOperator([model], (x, y), loss="mse")
    V = _probes(op)
    got = op.matvec(V)[0]
    with torch.no_grad():
        r = model(x) - y  # [N, C]
    g = torch.einsum("nc,ncp->np", 2 * r, _per_sample_jacobians(model, x))  # gradients of the summed squared errors
    F_dense = g.T @ g / y.numel()
    torch.testing.assert_close(got, F_dense @ V[0], rtol=1e-10, atol=1e-12)
    callable_ef = EmpiricalFisherOperator([model], (x, y), loss=nn.MSELoss()).matvec(V)[0]
    torch.testing.assert_close(callable_ef * y.shape[1], got, rtol=1e-10, atol=1e-12)


# --- 8: loss-name spellings ---------------------------------------------------------------------
def test_canonical_name_takes_every_spelling_in_one_place():
    """Loss names were normalised inside Loss only; the other entry points had no common function."""
    from fastcurv.losses import LOSS_NAMES, canonical_name

    assert LOSS_NAMES == ("cross_entropy", "mse")
    for name, want in (("MSE", "mse"), ("mse", "mse"), ("CE", "cross_entropy"), ("Cross-Entropy", "cross_entropy"),
                       ("CrossEntropy", "cross_entropy"), ("cross_entropy", "cross_entropy")):
        assert canonical_name(name) == want
    with pytest.raises(ValueError, match="unknown loss 'l2'"):
        canonical_name("l2")


def test_a_job_resumes_under_another_spelling_of_its_loss(tmp_path):
    """A job started with loss="mse" refused to resume with loss="MSE" (FingerprintMismatch,
    "differs in: loss"), though both name one loss."""
    x, y = _regression()
    models = [_mlp(0), _mlp(1)]
    out = tmp_path / "run.jsonl"
    kw = dict(measures=("lambda_max",), output=out, progress=False)
    first = fastcurv.batched_sharpness(models, (x, y), loss="mse", **kw)
    again = fastcurv.batched_sharpness(models, (x, y), loss="MSE", **kw)
    torch.testing.assert_close(again["lambda_max"], first["lambda_max"])


def test_a_results_file_written_with_the_loss_as_spelled_resumes(tmp_path, monkeypatch):
    """Files written before the twenty-fifth round hold the loss name as given ("MSE") in their
    config and fingerprint; once names were made canonical, the very call that wrote one raised
    FingerprintMismatch ("differs in: loss"). Such a file is read back, not computed again."""
    import hashlib
    import json

    x, y = _regression()
    models = [_mlp(0), _mlp(1)]
    out = tmp_path / "run.jsonl"
    kw = dict(measures=("lambda_max",), output=out, progress=False)
    first = fastcurv.batched_sharpness(models, (x, y), loss="MSE", **kw)
    head, *rest = out.read_text().splitlines()
    head = json.loads(head)
    head["config"]["loss"] = "MSE"  # as the earlier rounds wrote it
    head["fingerprint"] = hashlib.sha256(json.dumps(head["config"], sort_keys=True).encode()).hexdigest()[:32]
    out.write_text("\n".join([json.dumps(head), *rest]) + "\n")
    backend = type(fastcurv.HessianOperator(models, (x, y), loss="mse").backend)
    monkeypatch.setattr(backend, "matvec", lambda *a, **k: pytest.fail("a finished job was computed again"))
    again = fastcurv.batched_sharpness(models, (x, y), loss="MSE", **kw)
    torch.testing.assert_close(again["lambda_max"], first["lambda_max"])
    with pytest.raises(fastcurv.resume.FingerprintMismatch, match="loss"):
        fastcurv.batched_sharpness(models, (x, y), loss="cross_entropy", **kw)
