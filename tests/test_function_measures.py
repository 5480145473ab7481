"""Function-space measures: definitions against direct computations, invariance under Dinh
rescaling (while lambda_max changes ~alpha^2), NaN replicas, streaming."""
import copy
import math
import warnings

import pytest
import torch
from torch import nn

import fastcurv
from fastcurv.function import collect_predictions, label_dtype
from fastcurv.function.weakness import log2_weakness_terms

K = 3
FUNCTION_COLUMNS = None  # filled from the first result


def _mlp():
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, K)).double()


def _models(R=4, seed=0):
    torch.manual_seed(seed)
    return [_mlp() for _ in range(R)]


def _data(n=200, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, K, (n,), generator=g)


def _loader(x, y, bs=64):
    return [(x[i : i + bs], y[i : i + bs]) for i in range(0, len(x), bs)]


def _logits(models, x):
    with torch.no_grad():
        return torch.stack([m(x) for m in models])


FAST = dict(probe_size=96, num_draws=3, bisect_steps=6, perturb_sigmas=(0.01, 0.1), taus=(0.1, 0.5))
ALL = ("disagreement", "gde", "soft", "weakness", "perturbation_weakness", "simplicity")


def test_disagreement_gde_soft_match_direct_computation():
    from scipy.spatial.distance import jensenshannon

    models = _models(4)
    x, y = _data()
    res = fastcurv.function_measures(models, _loader(x, y), measures=("disagreement", "gde", "soft"))
    logits = _logits(models, x)
    lab, p = logits.argmax(-1), logits.softmax(-1)
    R = len(models)
    D = torch.tensor([[float((lab[i] != lab[j]).double().mean()) for j in range(R)] for i in range(R)], dtype=torch.float64)
    for i in range(R):
        others = [j for j in range(R) if j != i]
        assert res["disagreement"][i] == pytest.approx(float(D[i, others].mean()), abs=1e-12)
        assert res["test_error"][i] == pytest.approx(float((lab[i] != y).double().mean()), abs=1e-12)
        j = others[0]
        js = sum(jensenshannon(p[i, m].numpy(), p[j, m].numpy()) ** 2 for m in range(len(x))) / len(x)
        tv = float(0.5 * (p[i] - p[j]).abs().sum(-1).mean())
        l2 = float((p[i] - p[j]).norm(dim=-1).mean())
        assert res.pairwise["js"][i, j] == pytest.approx(js, rel=1e-6, abs=1e-12)
        assert res.pairwise["tv"][i, j] == pytest.approx(tv, rel=1e-9)
        assert res.pairwise["l2"][i, j] == pytest.approx(l2, rel=1e-9)
        assert res.pairwise["both_correct"][i, j] == int(((lab[i] == y) & (lab[j] == y)).sum())
    assert res.summary["gde_estimate"] == pytest.approx(float(D.sum() / (R * (R - 1))), abs=1e-12)
    assert torch.equal(res.pairwise["agree"], fastcurv.agreement_counts(lab).double())
    df = res.to_pandas()
    assert list(df.index) == list(range(R)) and "disagreement" in df and df["ok"].all()


def _direct_soft(p):
    """The soft measures of every pair from the full [R, R, M, K] differences, written
    independently of function.pairwise: JS as H(mixture) - mean of the two entropies (nats)."""
    a, b = p[:, None], p[None, :]
    H = lambda q: torch.special.entr(q).sum(-1)  # noqa: E731
    return {"js": (H(0.5 * (a + b)) - 0.5 * (H(a) + H(b))).mean(-1),
            "tv": 0.5 * (a - b).abs().sum(-1).mean(-1),
            "l2": (a - b).norm(dim=-1).mean(-1)}


def _population_probs(R, M, K, seed):
    """[R, M, K] float64 softmax outputs with a few exact zeros (0 log 0 terms)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(R, M, K, generator=g, dtype=torch.float64) * 2
    z[torch.rand(R, M, K, generator=g) < 0.05] = -math.inf
    z[..., 0] = z[..., 0].nan_to_num(neginf=0.0)  # (no row of zeros only)
    return z.softmax(-1)


@pytest.mark.parametrize("block, chunk", [(32, None), (32, 7), (16, 5)])
def test_soft_matrices_span_several_replica_blocks_and_example_chunks(block, chunk):
    """40 replicas take two blocks of 32 (three of 16), the last one ragged, and ``max_elems``
    makes chunks of 7 (5) of the 23 examples, the last one ragged. Every tested population had
    fewer than 32 replicas and fewer examples than one chunk (819 for K = 10), so a loop over the
    diagonal blocks only (``range(i0, R, block)`` -> ``range(i0, min(R, i0 + 1), block)``) or
    keeping the last chunk's sums only (``acc[w] = acc[w] + part[w]`` -> ``acc[w] = part[w]``)
    passed every test; here they are off by up to 0.73 in TV (values up to 0.75), 0.37 in JS."""
    from fastcurv.function.pairwise import soft_matrices

    R, M, K = 40, 23, 4
    p = _population_probs(R, M, K, seed=block)
    kw = {} if chunk is None else dict(max_elems=chunk * block * block * K)
    got = soft_matrices(p, block=block, **kw)
    for name, want in _direct_soft(p).items():
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-13, msg=name)


def test_soft_measures_of_a_population_larger_than_one_block():
    """function_measures with 40 replicas (two blocks of 32): every pair's soft measures and the
    per-replica means over the other replicas against the direct computation."""
    torch.manual_seed(3)
    models = [nn.Linear(6, K).double() for _ in range(40)]
    x, y = _data(n=30)
    res = fastcurv.function_measures(models, _loader(x, y, bs=16), measures=("soft",))
    want = _direct_soft(_logits(models, x).softmax(-1))
    off = ~torch.eye(40, dtype=torch.bool)
    for name in ("js", "tv", "l2"):
        torch.testing.assert_close(res.pairwise[name], want[name], rtol=0, atol=1e-13, msg=name)
        torch.testing.assert_close(res[name], (want[name] * off).sum(1) / 39, rtol=0, atol=1e-13, msg=name)


def test_one_batch_with_targets_of_any_shape():
    """One (inputs, targets) pair is one batch whatever the targets' shape: labels as a column and
    one-hot rows are labels, soft targets are not (test_error is skipped, with a warning). Before,
    a pair with 2-d targets was read as a loader of two input batches."""
    models = _models(3)
    x, y = _data(n=50)
    ref = fastcurv.function_measures(models, (x, y), measures=("disagreement", "gde"))
    onehot = nn.functional.one_hot(y, K).double()
    for targets in (y[:, None], onehot, onehot.float()):
        res = fastcurv.function_measures(models, (x, targets), measures=("disagreement", "gde"))
        assert res.num_examples == 50
        for k in ("disagreement", "test_error"):
            torch.testing.assert_close(res[k], ref[k], rtol=0, atol=0)
    soft = torch.softmax(torch.randn(50, K, dtype=torch.float64), 1)
    with pytest.warns(RuntimeWarning, match="not class labels"):
        res = fastcurv.function_measures(models, (x, soft), measures=("disagreement", "gde"))
    assert res.num_examples == 50 and "test_error" not in res.values
    torch.testing.assert_close(res["disagreement"], ref["disagreement"], rtol=0, atol=0)
    # a list of two equal input batches stays a loader of two batches
    res = fastcurv.function_measures(models, [x[:25], x[25:]], measures=("disagreement",))
    assert res.num_examples == 50
    torch.testing.assert_close(res["disagreement"], ref["disagreement"], rtol=0, atol=0)


def test_inputs_and_targets_of_different_lengths_are_refused():
    """A tuple is one (inputs, targets) pair: targets for another number of rows are a ValueError
    naming both shapes (before: read as two input batches, and a raw torch error), in a loader
    too; a list of two batches of inputs of different sizes stays two batches."""
    models = _models(2)
    x, y = _data(n=50)
    for data in ((x, y[:30]), [x, y[:30]], [(x[:20], y[:20]), (x[20:], y[:10])]):
        with pytest.raises(ValueError, match=r"inputs \((50|30), 6\) and targets \((30|10),\) disagree on the batch size"):
            fastcurv.function_measures(models, data, measures=("disagreement", "gde"))
    assert fastcurv.function_measures(models, [x[:30], x[30:]], measures=("disagreement",)).num_examples == 50


def test_permission_weakness_matches_definition_and_extremes():
    models = _models(3)
    x, y = _data(150)
    res = fastcurv.function_measures(models, _loader(x, y, 50), measures=("weakness",), taus=(0.1, 0.5))
    p = _logits(models, x).softmax(-1)
    pmax = p.amax(-1, keepdim=True)
    for mode, col in (("rel", "weakness_rel_tau0.5"), ("abs", "weakness_abs_tau0.1")):
        tau = 0.5 if mode == "rel" else 0.1
        thr = tau * pmax if mode == "rel" else torch.full_like(pmax, tau)
        a = ((p >= thr) | nn.functional.one_hot(p.argmax(-1), K).bool()).sum(-1).double()
        expect = torch.log2(2.0**a - 1).mean(1)
        assert torch.allclose(res[col], expect, atol=1e-12)
    ent = -(p * p.log()).sum(-1).mean(1)
    assert torch.allclose(res["mean_entropy"], ent, atol=1e-12)
    # a constant-output network permits every class: log2(2^K - 1); a saturated one only the argmax: 0
    flat, sharp = _mlp(), _mlp()
    with torch.no_grad():
        for m in flat.parameters():
            m.zero_()
        sharp[4].weight.mul_(1e4)
        sharp[4].bias.mul_(1e4)
    r2 = fastcurv.function_measures([flat, sharp], (x, y), measures=("weakness",), taus=(0.5,))
    assert r2["weakness_rel_tau0.5"][0] == pytest.approx(math.log2(2**K - 1))
    assert r2["weakness_rel_tau0.5"][1] == pytest.approx(0.0, abs=0.02)
    assert torch.allclose(log2_weakness_terms(torch.tensor([1, 2, 60])), torch.tensor([0.0, math.log2(3), 60.0], dtype=torch.float64))


def _rescale(model, alpha):
    """Dinh et al. T_alpha on layers (2, 4): W2, b2 -> alpha W2, alpha b2; W4 -> W4 / alpha."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        m[2].weight.mul_(alpha)
        m[2].bias.mul_(alpha)
        m[4].weight.div_(alpha)
    return m


WEIGHT_NORM_COLUMNS = ("sq_weight_norm", "pacbayes_mag_kl")  # the only columns Dinh rescaling changes


def test_function_measures_invariant_under_rescaling_while_lambda_max_scales():
    models = _models(3, seed=3)
    x, y = _data(160, seed=4)
    kw = dict(measures=ALL, pacbayes_sigma=0.1, **FAST)
    base = fastcurv.function_measures(models, _loader(x, y), **kw)
    lam = {1.0: fastcurv.batched_sharpness(models, (x, y), measures=("lambda_max",), progress=False)["lambda_max"]}
    for alpha in (10.0, 100.0):
        scaled = [_rescale(m, alpha) for m in models]
        assert torch.allclose(_logits(scaled, x), _logits(models, x), rtol=1e-9, atol=1e-9)
        res = fastcurv.function_measures(scaled, _loader(x, y), **kw)
        # every column but the two weight norms is unchanged, the compressed sizes included (the
        # quantisation is per tensor, and a whole layer is scaled); the README says exactly this
        invariant = [c for c in base.values if c not in WEIGHT_NORM_COLUMNS]
        assert {"perturb_sigma_star", "js", "weakness_rel_tau0.1", "compressed_bytes_lzma"} <= set(invariant)
        for c in invariant:
            assert torch.allclose(res[c], base[c], rtol=1e-7, atol=1e-10), c
        for c in WEIGHT_NORM_COLUMNS:
            assert not torch.allclose(res[c], base[c], rtol=1e-3), c
        assert torch.equal(res.pairwise["agree"], base.pairwise["agree"])
        lam[alpha] = fastcurv.batched_sharpness(scaled, (x, y), measures=("lambda_max",), progress=False)["lambda_max"]
    # the bisected magnitude-aware sigma' (pacbayes_sigma=None) is unchanged too (up to its eps floor)
    kw = dict(measures=("simplicity",), **FAST)
    sigma = fastcurv.function_measures(models, (x, y), **kw)["pacbayes_mag_sigma"]
    scaled = [_rescale(m, 10.0) for m in models]
    torch.testing.assert_close(fastcurv.function_measures(scaled, (x, y), **kw)["pacbayes_mag_sigma"], sigma, rtol=0.05, atol=0)
    # lambda_max grows by a large factor, and between alpha = 10 and 100 by about (100 / 10)^2
    assert (lam[10.0] / lam[1.0] > 5).all(), lam
    ratio = lam[100.0] / lam[10.0]
    assert ((ratio > 50) & (ratio < 200)).all(), ratio


def test_nan_replica_is_flagged_and_others_unaffected():
    models = _models(4, seed=5)
    x, y = _data(128, seed=6)
    bad = copy.deepcopy(models[1])
    with torch.no_grad():
        bad[0].weight[0, 0] = float("nan")
    kw = dict(measures=ALL, **FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = fastcurv.function_measures([models[0], bad, models[2], models[3]], _loader(x, y), **kw)
    ref = fastcurv.function_measures([models[0], models[2], models[3]], _loader(x, y), **kw)
    assert res.ok.tolist() == [True, False, True, True]
    assert "non-finite parameters" in res.flags[1] and "non-finite" not in res.flags[0]
    for c, v in res.values.items():
        assert torch.isnan(v[1]), c
        assert torch.allclose(v[[0, 2, 3]], ref[c], rtol=1e-12, atol=1e-12, equal_nan=True), c
    for name, mat in res.pairwise.items():  # every pairwise matrix, the counts included
        assert torch.isnan(mat[1]).all() and torch.isnan(mat[:, 1]).all(), name
        torch.testing.assert_close(mat[[0, 2, 3]][:, [0, 2, 3]], ref.pairwise[name], rtol=1e-12, atol=0)
    assert {"agree", "both_correct", "both_wrong_same", "both_wrong_different", "js"} <= set(res.pairwise)
    assert res.summary["gde_estimate"] == pytest.approx(ref.summary["gde_estimate"])


def test_prediction_pass_streams_and_keeps_small_labels():
    from fastcurv import ReplicaSet

    models = _models(5, seed=7)
    x, y = _data(130, seed=8)
    rs = ReplicaSet(models)
    full = collect_predictions(rs, _loader(x, y, 40), keep_probs=True)
    tiny = collect_predictions(rs, _loader(x, y, 40), keep_probs=True, max_rows=7)  # one replica per call
    unlabelled = collect_predictions(rs, [x[:70], x[70:]])
    assert full.labels.dtype == torch.uint8 and full.labels.shape == (5, 130)
    assert torch.equal(full.labels, tiny.labels) and torch.allclose(full.probs, tiny.probs)
    assert torch.equal(full.labels.long(), _logits(models, x).argmax(-1))
    assert torch.equal(full.targets, y) and unlabelled.targets is None and unlabelled.probs is None
    assert torch.equal(unlabelled.labels, full.labels)
    assert label_dtype(10) == torch.uint8 and label_dtype(1000) == torch.int16 and label_dtype(10**6) == torch.int32
    # without targets gde gives the estimate but no test error
    r = fastcurv.function_measures(models, [x[:70], x[70:]], measures=("gde",))
    assert "test_error" not in r.values and r.summary["gde_estimate"] > 0


def test_simplicity_columns():
    from fastcurv.function.simplicity import pacbayes_mag_kl, quantized_bytes

    models = _models(2, seed=9)
    x, y = _data(64)
    res = fastcurv.function_measures(models, (x, y), measures=("simplicity",), pacbayes_sigma=0.05, num_train=1000)
    for r, m in enumerate(models):
        theta = torch.cat([p.detach().flatten() for p in m.parameters()])
        assert res["sq_weight_norm"][r] == pytest.approx(float(theta.square().sum()))
        P, s2, eps = theta.numel(), 0.05**2, 1e-3
        kl = 0.25 * torch.log((eps**2 + (s2 + 1) * theta.square().sum() / P) / (eps**2 + s2 * theta.square())).sum()
        assert res["pacbayes_mag_kl"][r] == pytest.approx(float(kl + math.log(1000 / 0.05) + 10))
        assert res["compressed_bytes_zlib"][r] > 0 and res["compressed_bytes_lzma"][r] > 0
    # constant weights compress far better than random ones
    const = [torch.ones(1000)]
    rnd = [torch.randn(1000, generator=torch.Generator().manual_seed(0))]
    import zlib

    assert len(zlib.compress(quantized_bytes(const))) < len(zlib.compress(quantized_bytes(rnd))) / 5
    assert pacbayes_mag_kl(torch.ones(1, 4), torch.tensor([0.1]), 10).shape == (1,)


def test_noise_bisection_decides_exact_ties_by_counts(monkeypatch):
    """Accuracy is discrete, so the curve often equals the target exactly (20 of 100 against
    0.3 - 0.1 = 0.19999999999999998): a tie counts as reached whatever the float rounding of the
    fraction, so the bisection converges to where the curve drops to the target, not past it."""
    from fastcurv import ReplicaSet
    from fastcurv.function import weakness

    rs = ReplicaSet(_models(2))
    x = torch.zeros(100, 6, dtype=torch.float64)
    ref = torch.zeros(2, 100, dtype=torch.long)

    def counts(rs, x, ref, sigma, *, num_draws, **kw):  # 100 % correct below sigma = 0.1, then 84 % / 20 %
        per_draw = torch.where(sigma < 0.1, 100, torch.tensor([84, 20])).to(torch.int64)
        return per_draw * num_draws, torch.zeros_like(per_draw)

    monkeypatch.setattr(weakness, "perturbation_counts", counts)
    target = torch.tensor([0.94, 0.3], dtype=torch.float64) - 0.1
    sigma, saturated = weakness.bisect_sigma(rs, x, ref, target, num_draws=8, seed=0, steps=30)
    torch.testing.assert_close(sigma, torch.full((2,), 0.1, dtype=torch.float64), rtol=1e-6, atol=0)
    assert not saturated.any()
    assert weakness.count_threshold(target, 800).tolist() == [672.0, 160.0]
    assert weakness.count_threshold(torch.tensor([0.99]), 4096).item() == pytest.approx(4055.04)


def test_bad_arguments():
    models = _models(2)
    x, y = _data(32)
    with pytest.raises(ValueError, match="unknown measures"):
        fastcurv.function_measures(models, (x, y), measures=("flatness",))
    with pytest.raises(ValueError, match="tau"):
        fastcurv.function_measures(models, (x, y), measures=("weakness",), taus=(0.0,))
    with pytest.raises(ValueError, match="no examples"):
        fastcurv.function_measures(models, [], measures=("disagreement",))


def test_count_threshold_snaps_float32_targets_too():
    """A float32 target (1 - delta built in float32) carries its own rounding: a tie at 90 % of 10240
    counts as reached, as with a float64 target (it counted as above the target)."""
    from fastcurv.function.weakness import count_threshold

    for dtype in (torch.float32, torch.float64):
        assert count_threshold(torch.full((1,), 1.0 - 0.1, dtype=dtype), 10240).item() == 9216.0
    assert count_threshold(torch.full((1,), 1.0 - 0.01, dtype=torch.float64), 10240).item() == pytest.approx(10137.6)


def _tied_head(bias):
    """A network whose outputs are softmax(bias) at every input (the last layer's weights are 0)."""
    m = _mlp()
    with torch.no_grad():
        m[4].weight.zero_()
        m[4].bias.copy_(torch.tensor(bias, dtype=torch.float64))
    return m


def test_permission_weakness_permits_one_argmax_class_when_maxima_tie(one_thread):
    """Absolute threshold: the argmax class (one, as the predictions take the first) plus the
    classes with p >= tau; relative threshold: tied maxima all pass ``p >= tau * max p``."""
    x, y = _data(40)
    uniform, two_tied = _tied_head([0.0] * K), _tied_head([1.0, 1.0, -10.0])  # p = 1/3 each; p ~ (0.5, 0.5, 0)
    res = fastcurv.function_measures([uniform, two_tied], (x, y), measures=("weakness",), taus=(0.25, 0.5))
    assert res["weakness_abs_tau0.5"].tolist() == [0.0, 0.0]  # nothing reaches 0.5: only the argmax
    assert res["weakness_abs_tau0.25"].tolist() == pytest.approx([math.log2(2**K - 1), math.log2(3)])
    assert res["weakness_rel_tau0.5"].tolist() == pytest.approx([math.log2(2**K - 1), math.log2(3)])


def test_max_rows_bounds_every_forward_call_and_changes_no_result(monkeypatch, one_thread):
    """The prediction pass and the perturbed passes (sigma*, sigma') alike: chunks of replicas and
    of examples, with the same noise draws, give the unchunked results."""
    from fastcurv import ReplicaSet

    rows = []
    forward_with = ReplicaSet.forward_with

    def spy(self, params, buffers, x):
        out = forward_with(self, params, buffers, x)
        rows.append(out.shape[0] * out.shape[1])
        return out

    monkeypatch.setattr(ReplicaSet, "forward_with", spy)
    models = _models(3, seed=11)
    x, y = _data(60, seed=12)
    kw = dict(measures=ALL, **{**FAST, "probe_size": 24})
    full = fastcurv.function_measures(models, _loader(x, y, 30), **kw)
    assert max(rows) == 3 * 30
    for max_rows in (7, 50):  # 7: one replica on 7 examples per call; 50: two replicas on a whole batch
        rows.clear()
        res = fastcurv.function_measures(models, _loader(x, y, 30), max_rows=max_rows, **kw)
        assert 0 < max(rows) <= max_rows
        assert res.values.keys() == full.values.keys() and res.flags == full.flags
        for c in full.values:
            torch.testing.assert_close(res[c], full[c], rtol=1e-12, atol=1e-12, msg=c)
        for c in full.pairwise:
            torch.testing.assert_close(res.pairwise[c], full.pairwise[c], rtol=1e-12, atol=1e-12, msg=c)
    # batch statistics depend on the batch: a batch (and the probe) stays whole, the results too
    torch.manual_seed(13)
    bn = [nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, K)).double() for _ in range(2)]
    kw = dict(measures=("disagreement", "perturbation_weakness"), bn_mode="batch", **{**FAST, "probe_size": 24})
    a = fastcurv.function_measures(bn, _loader(x, y, 30), **kw)
    b = fastcurv.function_measures(bn, _loader(x, y, 30), max_rows=5, **kw)
    for c in a.values:
        torch.testing.assert_close(b[c], a[c], rtol=0, atol=0, msg=c)
    with pytest.raises(ValueError, match="max_rows"):
        fastcurv.function_measures(models, (x, y), measures=("disagreement",), max_rows=0)


def test_single_strings_and_numbers_stand_for_one_element_sequences(one_thread):
    models = _models(2)
    x, y = _data(32)
    kw = dict(num_draws=2, bisect_steps=2, probe_size=16)
    for measure, arg, one, columns in [
        ("soft", "soft", "js", ["js"]),
        ("simplicity", "codecs", "zlib",
         ["compressed_bytes_zlib", "sq_weight_norm", "pacbayes_mag_sigma", "pacbayes_mag_kl"]),
        ("weakness", "tau_modes", "relative",
         [f"weakness_rel_tau{t:g}" for t in (0.01, 0.05, 0.1, 0.25, 0.5)] + ["mean_entropy"]),
        ("weakness", "taus", 0.5, ["weakness_rel_tau0.5", "weakness_abs_tau0.5", "mean_entropy"]),
        ("perturbation_weakness", "perturb_sigmas", 0.1, ["perturb_weakness_sigma0.1", "perturb_sigma_star"]),
    ]:
        res = fastcurv.function_measures(models, (x, y), measures=(measure,), **{arg: one}, **kw)
        ref = fastcurv.function_measures(models, (x, y), measures=(measure,), **{arg: (one,)}, **kw)
        assert list(res.values) == columns, arg
        for c in columns:
            assert torch.equal(res[c], ref[c]), (arg, c)


def test_probe_size_and_sigma_max_are_validated(one_thread):
    models = _models(2)
    x, y = _data(32)
    kw = dict(num_draws=2, bisect_steps=2)
    for measures in (("perturbation_weakness",), ("simplicity",)):
        for bad in (0, -3, 2.5, None):
            with pytest.raises(ValueError, match="probe_size must be a positive integer"):
                fastcurv.function_measures(models, (x, y), measures=measures, probe_size=bad, **kw)
    # no probe needed: probe_size is not used
    res = fastcurv.function_measures(models, (x, y), measures=("simplicity",), pacbayes_sigma=0.1, probe_size=0)
    assert res["pacbayes_mag_sigma"].tolist() == [0.1, 0.1]
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sigma_max must be positive and finite"):
            fastcurv.function_measures(models, (x, y), measures=("perturbation_weakness",), sigma_max=bad, **kw)


def test_an_unbracketed_noise_bisection_flags_its_own_column(one_thread):
    """sigma_max far below where any prediction changes: each bisection's flag names its column (one
    flag covered both, so a proper perturb_sigma_star looked like a bound when only the PAC-Bayes
    sigma saturated)."""
    models = _models(2)
    x, y = _data(32)
    kw = dict(num_draws=2, bisect_steps=3, sigma_max=1e-9)
    both = ["perturb_sigma_star", "pacbayes_mag_sigma"]
    for measures, cols in [(("perturbation_weakness",), both[:1]), (("simplicity",), both[1:]),
                           (("perturbation_weakness", "simplicity"), both)]:
        res = fastcurv.function_measures(models, (x, y), measures=measures, **kw)
        for flag in res.flags:
            assert [c for c in both if f"{c}'s noise bisection not bracketed" in flag] == cols


def test_compressed_sizes_of_trained_replicas_do_not_change_under_rescaling():
    """The float32 bounds stored with each tensor's codes were compressed with them, so a Dinh
    rescaling of trained MLPs changed the sizes by a few bytes (3523 -> 3525) though the codes stay."""
    from fastcurv import reparam
    from fastcurv.datasets import load_digits
    from fastcurv.train import mlp, train_population

    d = load_digits()
    models, _ = train_population(lambda: mlp([64, 32, 32, 10]), d.x_train[:300], d.y_train[:300], replicas=4,
                                 epochs=3, lr=0.05, progress=False)
    new = reparam.rescale_layers(models, alpha=10, probe=d.x_test[:50]).models
    kw = dict(measures=("simplicity",), pacbayes_sigma=0.1)
    a = fastcurv.function_measures(models, (d.x_test[:50], d.y_test[:50]), **kw)
    b = fastcurv.function_measures(new, (d.x_test[:50], d.y_test[:50]), **kw)
    for c in ("compressed_bytes_zlib", "compressed_bytes_lzma"):
        assert torch.equal(a[c], b[c]), c


@pytest.mark.parametrize("sigma", [0.0, -0.05, float("nan"), float("inf"), True])
def test_a_pacbayes_sigma_that_is_not_a_positive_number_is_refused(sigma):
    """pacbayes_sigma was taken unchecked: 0 gave pacbayes_mag_kl = inf, a negative or NaN sigma
    NaN, with ok=True and no flag (the KL term's log(m / sigma) needs sigma > 0)."""
    with pytest.raises(ValueError, match="pacbayes_sigma must be positive and finite"):
        fastcurv.function_measures(_models(2), _data(20), measures="simplicity", pacbayes_sigma=sigma)


def test_num_train_is_a_positive_integer_and_zero_is_not_the_test_set_size():
    """num_train=0 silently became the test set's size M (``num_train or M``), and -100 gave a NaN
    KL term with ok=True. Now both are refused; a whole float is taken (the study's JSON configs),
    and None still means M."""
    ms, data = _models(2), _data(20)
    kw = dict(measures="simplicity", pacbayes_sigma=0.05)
    for bad in (0, -100, 2.5):
        with pytest.raises(ValueError, match=f"num_train must be a positive integer, got {bad}"):
            fastcurv.function_measures(ms, data, num_train=bad, **kw)
    default = fastcurv.function_measures(ms, data, **kw)["pacbayes_mag_kl"]
    torch.testing.assert_close(fastcurv.function_measures(ms, data, num_train=20.0, **kw)["pacbayes_mag_kl"], default)
    assert not torch.allclose(fastcurv.function_measures(ms, data, num_train=1000, **kw)["pacbayes_mag_kl"], default)


def test_inputs_the_model_cannot_take_are_named():
    """function_measures on inputs the model cannot take raised torch's vmapped bmm error ("Expected
    size for first two dimensions of batch2 tensor ...") or an embedding's index-dtype error, naming
    neither the model nor the inputs; batched_sharpness and training say which inputs."""
    with pytest.raises(ValueError, match=r"the model cannot run on the first batch \(inputs \(10, 7\), torch.float64\)"):
        fastcurv.function_measures(_models(2), (torch.randn(10, 7, dtype=torch.float64), torch.zeros(10, dtype=torch.long)))
    torch.manual_seed(0)
    emb = [nn.Sequential(nn.Embedding(9, 4), nn.Flatten(), nn.Linear(8, 3)) for _ in range(2)]
    with pytest.raises(ValueError, match=r"cannot run on the first batch \(inputs \(5, 2\), torch.uint8\)"):
        fastcurv.function_measures(emb, torch.randint(0, 9, (5, 2), dtype=torch.uint8), measures="disagreement")
    assert fastcurv.function_measures(emb, torch.randint(0, 9, (5, 2)), measures="disagreement").ok.all()


def test_batch_statistics_perturbation_compares_with_the_probes_own_statistics(one_thread):
    """With bn_mode="batch" the perturbed passes normalize the probe by its own statistics (one
    batch), but compared with the labels of the pass over the data, which normalized each batch by
    its own: with a probe of 4 loader batches, even sigma = 1e-9 'changed' predictions, so
    perturb_weakness_sigma1e-09 was [0, 0, 1] (for 1) and perturb_sigma_star sat at the bisection's
    lower end for two replicas (7.8e-6, flagged 'not bracketed', for 0.0085 and 0.0117). The
    reference labels are now the probe's own under its statistics: the measures equal those of the
    probe given as the data."""
    torch.manual_seed(5)
    bn = [nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, K)).double() for _ in range(3)]
    x, y = _data(256, seed=6)
    kw = dict(measures=("perturbation_weakness",), bn_mode="batch", perturb_sigmas=(1e-9, 0.05), num_draws=4,
              bisect_steps=8, probe_size=128)
    got = fastcurv.function_measures(bn, _loader(x, y, 32), **kw)
    want = fastcurv.function_measures(bn, (x[:128], y[:128]), **kw)  # (the probe is the one batch)
    assert torch.equal(got["perturb_weakness_sigma1e-09"], torch.ones(3, dtype=torch.float64))
    for c in want.values:
        assert torch.equal(got[c], want[c]), c
    assert got.flags == want.flags == ["", "", ""]
