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


def _gradient_identity(model, x, y):
    """``sqrt((1/n) sum_i <theta, grad l_i>^2)`` with l_i torch's cross-entropy of sample i alone (for
    per-position outputs its mean over the positions): the value the closed form must equal on a
    bias-free ReLU network."""
    params = list(model.parameters())
    inner = []
    for i in range(len(x)):
        g = torch.autograd.grad(nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), params)
        inner.append(sum((p * gi).sum() for p, gi in zip(params, g)).item())
    return math.sqrt(sum(v * v for v in inner) / len(inner))


def _fisher_rao(models, data, **options):
    return fastcurv.batched_sharpness(models, data, measures=("fisher_rao",), progress=False,
                                      measure_options={"fisher_rao": options})["fisher_rao"]


def test_fisher_rao_with_soft_targets_of_mass_two():
    """Soft-target rows of mass m = 2 (supported: the loss Hessian is m (diag p - p p^T)): dl/dz is
    m p - y, but the closed form used p - y, so <dl/dz, z> lacked a (m - 1) <p, z>: 0.8528 and
    0.2345 against the identity's 0.7815 and 0.1595 (9% and 47% off)."""
    torch.manual_seed(0)
    models = [relu_mlp((6, 4, 3), bias=False).double() for _ in range(2)]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 6, generator=g, dtype=torch.float64)
    y = 2.0 * torch.softmax(torch.randn(20, 3, generator=g, dtype=torch.float64), 1)
    got = _fisher_rao(models, [(x[:12], y[:12]), (x[12:], y[12:])])
    for r, m in enumerate(models):
        assert float(got[r]) == pytest.approx(_gradient_identity(m, x, y), rel=1e-10)


def test_fisher_rao_of_per_position_outputs_takes_the_classes_from_dim_1():
    """Outputs [N, C, H, W] with class probabilities [N, C, H, W] (the cross-entropy's classes in
    dim 1): the closed form took the last axis (W) as the classes and failed with a raw "size of
    tensor a (2) must match ... b (3)". Now l_i is sample i's loss, the mean over its positions (as
    the operator's per-sample loss): the identity holds, and FR^2 = theta^T F theta with F the
    empirical Fisher; with reduction="sum" l_i is the sum over the H*W = 15 positions."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Conv2d(2, 4, 1, bias=False), nn.ReLU(), nn.Conv2d(4, 3, 1, bias=False)).double()
              for _ in range(2)]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, 3, 5, generator=g, dtype=torch.float64)
    y = torch.softmax(3 * torch.randn(16, 3, 3, 5, generator=g, dtype=torch.float64), 1)
    loader = [(x[:10], y[:10]), (x[10:], y[10:])]
    got = _fisher_rao(models, loader)
    fisher = fastcurv.EmpiricalFisherOperator(models, loader)
    theta = fisher.replicas.flat_params()
    quadratic = (theta * fisher.matvec(theta.unsqueeze(1))[:, 0]).sum(-1)
    for r, m in enumerate(models):
        assert float(got[r]) == pytest.approx(_gradient_identity(m, x, y), rel=1e-10)
        assert float(got[r]) ** 2 == pytest.approx(float(quadratic[r]), rel=1e-10)
    summed = fastcurv.batched_sharpness(models, loader, measures=("fisher_rao",), reduction="sum",
                                        progress=False)["fisher_rao"]
    torch.testing.assert_close(summed, 15 * got, rtol=1e-12, atol=0)


def test_fisher_rao_depth_counts_a_shared_layer_each_time_it_runs():
    """Linear - ReLU - shared - ReLU - shared - ReLU - Linear (bias-free) applies 4 weight layers
    from 3 modules; D counted the modules (module.modules() lists a module once), 3/4 of the
    identity's value (0.02276 against 0.03035). Now the calls are counted; depth= still overrides."""
    torch.manual_seed(0)

    def net():
        shared = nn.Linear(4, 4, bias=False)
        return nn.Sequential(nn.Linear(6, 4, bias=False), nn.ReLU(), shared, nn.ReLU(), shared, nn.ReLU(),
                             nn.Linear(4, 3, bias=False)).double()

    models = [net() for _ in range(2)]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (20,), generator=g)
    got = _fisher_rao(models, (x, y))
    for r, m in enumerate(models):
        assert float(got[r]) == pytest.approx(_gradient_identity(m, x, y), rel=1e-10)
    torch.testing.assert_close(_fisher_rao(models, (x, y), depth=3), 0.75 * got, rtol=1e-12, atol=0)


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
