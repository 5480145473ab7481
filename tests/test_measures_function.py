"""Fisher-Rao norm, relative flatness and PAC-Bayes sigma flatness against per-model references."""
import copy
import math

import pytest
import torch
from torch import nn

import fastcurv
from fastcurv.measures.pac_bayes import perturbation_std, sigma_search
from fastcurv import reparam
from fastcurv.measures.relative_flatness import feature_std, relative_flatness_values

from _measure_models import make_data, make_replicas, relu_mlp, train, single_thread  # noqa: F401  (autouse fixture)


def test_fisher_rao_equals_parameter_gradient_inner_product_for_bias_free_relu():
    models = train(make_replicas(R=2, bias=False), make_data(), steps=30)
    loader = make_data()
    res = fastcurv.batched_sharpness(models, loader, measures=("fisher_rao",), progress=False)
    x = torch.cat([b[0] for b in loader])
    y = torch.cat([b[1] for b in loader])
    for r, m in enumerate(models):
        params = list(m.parameters())
        inner = []
        for i in range(len(y)):
            loss = nn.functional.cross_entropy(m(x[i:i + 1]), y[i:i + 1])
            g = torch.autograd.grad(loss, params)
            inner.append(sum((p * gi).sum() for p, gi in zip(params, g)).item())
        ref = math.sqrt(sum(v * v for v in inner) / len(inner))  # sqrt(mean <theta, grad l_i>^2)
        assert float(res["fisher_rao"][r]) == pytest.approx(ref, rel=1e-9)


def _reference_relative_flatness(model, loader, normalize):
    """Petzka's definition on an explicitly normalized copy, with the dense W-block Hessian."""
    m = copy.deepcopy(model)
    x = torch.cat([b[0] for b in loader])
    y = torch.cat([b[1] for b in loader])
    last = m[-1]
    if normalize:
        feats = m[:-1](x).detach()
        sig = feats.std(0, unbiased=False)
        keep = sig > 0
        sig = torch.where(keep, sig, torch.ones_like(sig))
        with torch.no_grad():  # divide the previous layer's rows, multiply W's columns: same function
            m[-3].weight.div_(sig.view(-1, 1))
            m[-3].bias.div_(sig)
            last.weight.mul_(sig.view(1, -1))
    feats = m[:-1](x).detach()
    W0 = last.weight.detach().clone()

    def loss_of(W):
        return nn.functional.cross_entropy(feats @ W.T + last.bias.detach(), y)

    H = torch.autograd.functional.hessian(loss_of, W0)  # [m, d, m, d]
    kept = keep if normalize else torch.ones(W0.shape[1], dtype=torch.bool)  # constant features are dropped
    k = 0.0
    for s in range(W0.shape[0]):
        for t in range(W0.shape[0]):
            k += float(W0[s, kept] @ W0[t, kept]) * float(torch.diagonal(H[s, :, t, :])[kept].sum())
    return k


@pytest.mark.parametrize("normalize", [False, True])
def test_relative_flatness_exact_matches_reference_and_estimator(normalize):
    models = train(make_replicas(R=2), make_data(), steps=50)
    loader = make_data()
    op = fastcurv.HessianOperator(models, loader)
    exact, _ = relative_flatness_values(op, method="exact", normalize=normalize)
    est, se = relative_flatness_values(op, method="hutchinson", num_probes=200, normalize=normalize)
    for r, m in enumerate(models):
        assert float(exact[r]) == pytest.approx(_reference_relative_flatness(m, loader, normalize), rel=1e-8)
    assert ((est - exact).abs() <= 4 * se).all()
    assert (se < 0.2 * exact.abs()).all()  # the estimator is informative, not just wide


def test_relative_flatness_drops_a_constant_feature_and_stays_invariant_to_rescaling_it():
    """A unit with zero incoming weights and bias 0.7 feeds the last layer a constant 0.7: its sigma
    is 0 (not rounding noise, which once inflated kappa ~1e14), its column and its Hessian terms are
    left out, so rescaling that unit (function-preserving) leaves kappa unchanged."""
    models = train(make_replicas(R=2), make_data(), steps=50)
    for m in models:
        with torch.no_grad():
            m[2].weight[0].zero_()
            m[2].bias[0] = 0.7
    loader = make_data()
    op = fastcurv.HessianOperator(models, loader)
    assert (feature_std(op, "4")[:, 0] == 0).all()
    exact, _ = relative_flatness_values(op, method="exact")
    for r, m in enumerate(models):
        assert float(exact[r]) == pytest.approx(_reference_relative_flatness(m, loader, True), rel=1e-8)
    est, _ = relative_flatness_values(op, num_probes=20)
    for scale in (10.0, 0.1):
        s = torch.ones(7, dtype=torch.float64)
        s[0] = scale
        new = reparam.rescale_neurons(models, s, layers=("2", "4"))
        op2 = fastcurv.HessianOperator(new.models, loader)
        torch.testing.assert_close(relative_flatness_values(op2, method="exact")[0], exact, rtol=1e-9, atol=0)
        torch.testing.assert_close(relative_flatness_values(op2, num_probes=20)[0], est, rtol=1e-9, atol=0)


def test_feature_std_is_stable_across_batches():
    """Centred moments merged across ragged batches: equal to torch's std for varying features, and
    exactly 0 for constants that a one-pass E[f^2] - E[f]^2 turns into ~1e-8."""
    model = relu_mlp((6, 10, 3)).double()
    with torch.no_grad():
        model[0].weight[:8].zero_()
        model[0].bias[:8] = torch.tensor([0.7, 0.1, 1 / 3, 0.9, 2.2, 123.456, 1e-5, 0.0])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(203, 6, generator=g, dtype=torch.float64) * 3 + 5
    y = torch.randint(0, 3, (203,), generator=g)
    op = fastcurv.HessianOperator([model], [(x[i:i + 64], y[i:i + 64]) for i in range(0, 203, 64)])
    std = feature_std(op, "2")[0]
    assert (std[:8] == 0).all()
    torch.testing.assert_close(std[8:], model[:2](x).detach().std(0, unbiased=False)[8:], rtol=1e-12, atol=0)


def test_relative_flatness_rejects_bad_layer():
    models = make_replicas(R=1)
    with pytest.raises(ValueError, match="not an nn.Linear"):
        fastcurv.batched_sharpness(models, make_data(), measures=("relative_flatness",), progress=False,
                                   measure_options={"relative_flatness": {"layer": "1"}})


def test_pac_bayes_noise_is_std_sigma():
    """Regression test: the reference code used sigma^2 as the std; fastcurv draws std sigma."""
    theta = torch.randn(2, 50000, dtype=torch.float64)
    sigma = torch.tensor([0.3, 0.05], dtype=torch.float64)
    std = perturbation_std(theta, sigma, False, 1e-3)
    u = std * torch.randn_like(theta)
    assert u[0].std().item() == pytest.approx(0.3, rel=0.02)
    assert u[1].std().item() == pytest.approx(0.05, rel=0.02)
    mag = perturbation_std(theta, sigma, True, 1e-3)
    assert torch.allclose(mag, (sigma.view(-1, 1) ** 2 * theta**2 + 1e-6).sqrt())


class _Sign(nn.Module):
    """logits (w x, -w x): every sample is right iff w > 0, so acc(w + u) = 1[u > -w]."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([w], dtype=torch.float64))

    def forward(self, x):
        z = self.w * x[:, 0]
        return torch.stack([z, -z], -1)


def test_pac_bayes_sigma_search_finds_analytic_sigma():
    """Accuracy drop at sigma is P(u < -w) = Phi(-w / sigma): the search must return sigma with
    Phi(-w/sigma) in [0.09, 0.11], i.e. sigma = w / z with z in [1.227, 1.341]; using sigma^2 as
    the std would return sqrt of that (far outside)."""
    w = 0.5
    x = torch.ones(8, 1, dtype=torch.float64)
    y = torch.zeros(8, dtype=torch.long)
    op = fastcurv.HessianOperator([_Sign(w), _Sign(2 * w)], (x, y))
    sigma, done, base = sigma_search(op, mc_samples=6000, seed=1, common=False)
    assert (base == 1).all() and done.all()
    for r, wr in enumerate((w, 2 * w)):
        assert wr / 1.40 <= float(sigma[r]) <= wr / 1.18


def test_pac_bayes_measure_columns():
    models = train(make_replicas(R=2), make_data(), steps=200, lr=0.3)
    loader = make_data()
    res = fastcurv.batched_sharpness(models, loader, measures=("pac_bayes",), progress=False,
                                     measure_options={"pac_bayes": {"mc_samples": 4, "depth": 6}})
    for col in ("pacbayes_flatness", "pacbayes_sigma", "pacbayes_mag_flatness", "pacbayes_mag_sigma"):
        assert col in res.values
    assert torch.allclose(res["pacbayes_flatness"], 1 / res["pacbayes_sigma"] ** 2)


class _TiedDecoder(nn.Module):
    """Input embedding and output decoder sharing one weight, as in language models."""

    def __init__(self):
        super().__init__()
        self.emb, self.mid, self.dec = nn.Embedding(6, 4), nn.Linear(12, 4), nn.Linear(4, 6, bias=False)
        self.dec.weight = self.emb.weight

    def forward(self, x):
        return self.dec(torch.tanh(self.mid(self.emb(x).flatten(1))))


def test_relative_flatness_of_a_tied_feature_layer_is_named():
    """A last Linear whose weight is tied to an embedding failed with a raw "'dec.weight' is not in
    list"; now a ValueError naming the layer and the weight's owner. Another layer can be chosen."""
    torch.manual_seed(0)
    models = [_TiedDecoder() for _ in range(2)]
    data = (torch.randint(0, 6, (10, 3)), torch.randint(0, 6, (10,)))
    op = fastcurv.HessianOperator(models, data)
    with pytest.raises(ValueError, match=r"layer 'dec' shares its weight with 'emb.weight'"):
        relative_flatness_values(op)
    kappa, _ = relative_flatness_values(op, layer="mid", method="exact")
    assert torch.isfinite(kappa).all()
