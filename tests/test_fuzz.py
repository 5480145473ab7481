"""Hypothesis fuzzing: random supported architectures, batch layouts and replica counts; every
backend's Hessian-vector products must match the "autograd" oracle in float64.

Bounded: few examples, tiny models, no deadline (the first example pays for imports/compiles).
"""
import pytest
import torch
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import fastcurv  # noqa: E402
from fastcurv.backends import BACKENDS  # noqa: E402
from oracle import ragged  # noqa: E402

ACTS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
}
SETTINGS = dict(max_examples=8, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])



@st.composite
def mlp_case(draw):
    depth = draw(st.integers(1, 3))
    widths = [draw(st.integers(2, 6)) for _ in range(depth)]
    d_in, n_out = draw(st.integers(1, 5)), draw(st.integers(2, 4))
    act = draw(st.sampled_from(sorted(ACTS)))
    bias = draw(st.booleans())
    loss = draw(st.sampled_from(["cross_entropy", "mse"]))
    reduction = draw(st.sampled_from(["mean", "sum"]))
    R = draw(st.integers(1, 3))
    sizes = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))  # ragged batches
    seed = draw(st.integers(0, 2**16))
    return dict(kind="mlp", widths=widths, d_in=d_in, n_out=n_out, act=act, bias=bias, loss=loss,
                reduction=reduction, R=R, sizes=sizes, seed=seed)


@st.composite
def conv_case(draw):
    channels = draw(st.integers(1, 3))
    kernel, stride, padding = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(0, 1))
    # an optional second conv: 1x1 (the engine's matmul path) or 3x3, grouped or not
    second = draw(st.none() | st.tuples(st.sampled_from([1, 2]), st.booleans(), st.sampled_from([1, 3]), st.integers(1, 2)))
    bn = draw(st.booleans())
    act = draw(st.sampled_from(sorted(ACTS)))
    bias = draw(st.booleans())
    pool = draw(st.sampled_from(["max", "avg", "none"]))
    R = draw(st.integers(1, 3))
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=2))
    seed = draw(st.integers(0, 2**16))
    return dict(kind="conv", channels=channels, kernel=kernel, stride=stride, padding=padding, second=second, bn=bn,
                act=act, bias=bias, pool=pool, R=R, sizes=sizes, seed=seed, loss="cross_entropy", reduction="mean")


def build(case):
    """(models, batches) in float64 for one drawn case; BatchNorm gets random running statistics."""
    g = torch.Generator().manual_seed(case["seed"])
    torch.manual_seed(case["seed"])
    act = ACTS[case["act"]]
    if case["kind"] == "mlp":
        dims = [case["d_in"], *case["widths"], case["n_out"]]

        def make():
            layers = []
            for i in range(len(dims) - 1):
                layers.append(nn.Linear(dims[i], dims[i + 1], bias=case["bias"]))
                if i < len(dims) - 2:
                    layers.append(act())
            return nn.Sequential(*layers)

        in_shape, C = (case["d_in"],), case["n_out"]
    else:
        c, side = case["channels"], 5

        def make():
            layers = [nn.Conv2d(1, c, case["kernel"], case["stride"], case["padding"], bias=case["bias"])]
            if case["bn"]:
                layers.append(nn.BatchNorm2d(c))
            layers.append(act())
            if case["second"] is not None:
                mult, grouped, k, stride = case["second"]
                layers += [nn.Conv2d(c, mult * c, k, stride, k // 2, groups=c if grouped else 1, bias=case["bias"]), act()]
            features = nn.Sequential(*layers)
            n, h = features(torch.zeros(1, 1, side, side)).shape[1:3]
            if case["pool"] != "none" and h >= 2:
                layers.append(nn.MaxPool2d(2) if case["pool"] == "max" else nn.AvgPool2d(2))
                h //= 2
            layers += [nn.Flatten(), nn.Linear(n * h * h, 3, bias=case["bias"])]
            return nn.Sequential(*layers)

        in_shape, C = (1, side, side), 3
    models = []
    for _ in range(case["R"]):
        m = make().to(torch.float64)
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g, dtype=torch.float64) * 0.3)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g, dtype=torch.float64) + 0.5)
        models.append(m)
    N = sum(case["sizes"])
    x = torch.randn(N, *in_shape, generator=g, dtype=torch.float64)
    if case["loss"] == "cross_entropy":
        y = torch.randint(0, C, (N,), generator=g)
    else:
        y = torch.randn(N, C, generator=g, dtype=torch.float64)
    return models, ragged(x, y, case["sizes"])


def check_all_backends(case, K):
    models, batches = build(case)
    kw = dict(loss=case["loss"], reduction=case["reduction"])
    oracle = fastcurv.HessianOperator(models, batches, backend="autograd", **kw)
    g = torch.Generator().manual_seed(case["seed"] + 1)
    V = torch.randn(oracle.R, K, oracle.P, generator=g, dtype=torch.float64)
    ref = oracle.matvec(V)
    assert torch.isfinite(ref).all()
    scale = ref.abs().max().item() + 1e-12
    checked = []
    for name in ("func", "fused"):
        if name == "fused" and not BACKENDS["fused"].supports(oracle.replicas, oracle.loss)[0]:
            continue
        got = fastcurv.HessianOperator(models, batches, backend=name, **kw).matvec(V)
        err = (got - ref).abs().max().item()
        assert err <= 1e-9 * scale, f"backend {name!r} differs from autograd by {err:.3e} (scale {scale:.3e}) on {case}"
        checked.append(name)
    return checked


@settings(**SETTINGS)
@given(case=mlp_case(), K=st.integers(1, 3))
def test_fuzz_mlp_every_backend_matches_autograd(case, K):
    checked = check_all_backends(case, K)
    # every MLP drawn here is a Sequential of Linear + supported activations with a fused loss
    assert checked == ["func", "fused"], checked


@settings(**dict(SETTINGS, max_examples=5))
@given(case=conv_case(), K=st.integers(1, 2))
def test_fuzz_conv_batchnorm_eval_matches_autograd(case, K):
    checked = check_all_backends(case, K)
    assert "func" in checked
