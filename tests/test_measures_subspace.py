"""Keskar et al.'s random-subspace epsilon-sharpness (``epsilon_sharpness_subspace``): the full-space
measure when A = I, agreement with a per-model L-BFGS-B reference in the same subspace, the cached
and regenerated matrix agree, non-invariance under Dinh rescaling, a NaN replica stays isolated."""
import copy
import dataclasses
import warnings

import numpy as np
import pytest
import scipy.optimize
import torch

import fastcurv
import fastcurv.measures._subspace as subspace_mod
from fastcurv.measures._ascent import apgd_ascent
from fastcurv.measures._subspace import RandomSubspace
from fastcurv.measures.epsilon_sharpness import epsilon_sharpness_values, epsilon_subspace_values
from fastcurv.reparam import rescale_layers

from _measure_models import full_loss, make_data, make_replicas, set_flat, train, single_thread  # noqa: F401  (autouse fixture)

NAME = "epsilon_sharpness_subspace"


@pytest.fixture(scope="module")
def trained():
    loader = make_data()
    return train(make_replicas(R=3), loader, steps=100), loader


def test_identity_subspace_is_the_full_space_measure(trained):
    models, loader = trained
    op = fastcurv.HessianOperator(models, loader)
    eye = torch.eye(op.P, dtype=torch.float64)
    for common in (True, False):
        full, delta = epsilon_sharpness_values(op, eps=1e-2, seed=4, common=common)
        sub, y, s = epsilon_subspace_values(op, eps=1e-2, seed=4, common=common, A=eye)
        assert torch.allclose(sub, full, rtol=1e-12, atol=0)
        assert torch.allclose(s.matmul(y.to(op.dtype)), delta, rtol=1e-12, atol=1e-15)
    # per-replica injected matrices: replica r uses A[r]
    perm = torch.stack([eye, eye.flip(0), eye])
    sub, y, s = epsilon_subspace_values(op, eps=1e-2, seed=4, A=perm)
    assert torch.allclose(s.matmul(y.to(op.dtype))[1], perm[1] @ y[1])


def _reference_lbfgsb(model, loader, A, eps):
    """Keskar's protocol per model: 10 L-BFGS-B iterations on y in the box eps (|A^+ theta| + 1)."""
    m = copy.deepcopy(model)
    theta = torch.nn.utils.parameters_to_vector(m.parameters()).detach().clone()
    base = float(full_loss(m, loader).detach())
    An = A.numpy()
    hw = eps * (np.abs(np.linalg.pinv(An) @ theta.numpy()) + 1)

    def negf(y):
        set_flat(m, theta + torch.from_numpy(An @ y))
        m.zero_grad()
        loss = full_loss(m, loader)
        loss.backward()
        g = torch.nn.utils.parameters_to_vector([p.grad for p in m.parameters()]).numpy()
        return -float(loss.detach()), -(An.T @ g)

    opt = scipy.optimize.minimize(negf, np.zeros_like(hw), jac=True, method="L-BFGS-B", bounds=list(zip(-hw, hw)),
                                  options={"maxiter": 10})
    return 100 * (-opt.fun - base) / (1 + base), hw, base


def _reference_same_ascent(model, loader, A, eps, n_iter, seed):
    """The same ascent (APGD in the y box) for one plain model with a dense A and numpy's pinv."""
    m = copy.deepcopy(model)
    theta = torch.nn.utils.parameters_to_vector(m.parameters()).detach().clone()
    base = float(full_loss(m, loader).detach())
    half = torch.from_numpy(np.abs(np.linalg.pinv(A.numpy()) @ theta.numpy()) + 1)

    def objective(y):
        set_flat(m, theta + A @ y[0])
        m.zero_grad()
        loss = full_loss(m, loader)
        loss.backward()
        g = torch.nn.utils.parameters_to_vector([p.grad for p in m.parameters()])
        return torch.tensor([float(loss.detach())], dtype=torch.float64), (A.T @ g)[None]

    best, _, _ = apgd_ascent(objective, torch.zeros(1, A.shape[1], dtype=torch.float64),
                             torch.tensor([eps], dtype=torch.float64), p="linf", c=half[None], n_iter=n_iter,
                             generator=torch.Generator().manual_seed(seed), common=True)
    return 100 * max(float(best[0]) - base, 0.0) / (1 + base)


@pytest.mark.parametrize("common", [True, False])
def test_matches_per_model_references(trained, common):
    models, loader = trained
    eps, p = 1e-2, 20
    res = fastcurv.batched_sharpness(models, loader, measures=(NAME,), seed=1, common_random_numbers=common,
                                     progress=False, measure_options={NAME: {"eps": eps, "p": p, "n_iter": 20}})
    op = fastcurv.HessianOperator(models, loader)
    value, y, sub = epsilon_subspace_values(op, eps=eps, p=p, n_iter=20, seed=1, common=common)
    assert torch.allclose(value, res[NAME], rtol=1e-12)
    assert sub.cached and sub.p == p
    if not common:
        assert not torch.allclose(sub.dense(0), sub.dense(1))
    for r, m in enumerate(models):
        A = sub.dense(r)
        if common:  # the per-model loop draws the same (common) random start
            same = _reference_same_ascent(m, loader, A, eps, 20, 1)
            assert float(value[r]) == pytest.approx(same, rel=1e-9)
        ref, hw, base = _reference_lbfgsb(m, loader, A, eps)
        assert ref > 0
        # close to Keskar's 10 L-BFGS-B iterations in the same subspace: both are local maxima of a
        # nonconvex problem, either may be higher (ratios 0.92 .. 1.06 over 6 seeds x 2 eps here) ...
        assert float(value[r]) == pytest.approx(ref, rel=0.1)
        # ... attained by a feasible y (checked with the plain model)
        assert (y[r].abs() <= torch.from_numpy(hw) * (1 + 1e-9)).all()
        mm = copy.deepcopy(m)
        theta = torch.nn.utils.parameters_to_vector(m.parameters()).detach()
        with torch.no_grad():
            set_flat(mm, theta + A @ y[r])
            assert 100 * (float(full_loss(mm, loader)) - base) / (1 + base) == pytest.approx(float(value[r]), rel=1e-9)


def test_regenerated_blocks_equal_cached_matrix(trained, monkeypatch):
    models, loader = trained
    monkeypatch.setattr(subspace_mod, "BLOCK_ROWS", 32)  # several blocks on the tiny model
    op = fastcurv.HessianOperator(models, loader)
    theta = op.replicas.flat_params()
    for common in (True, False):
        cached = RandomSubspace(op.P, 12, op.R, seed=3, common=common, dtype=op.dtype)
        lazy = RandomSubspace(op.P, 12, op.R, seed=3, common=common, dtype=op.dtype, max_bytes=0)
        assert cached.cached and not lazy.cached and lazy.num_blocks == 5
        A = torch.stack([cached.dense(r) for r in range(op.R)])
        assert torch.equal(A, torch.stack([lazy.dense(r) for r in range(op.R)]))
        y = torch.randn(op.R, 12, dtype=op.dtype)
        assert torch.allclose(lazy.matmul(y), torch.einsum("rnp,rp->rn", A, y), rtol=1e-12, atol=1e-14)
        assert torch.allclose(lazy.rmatmul(theta), torch.einsum("rnp,rn->rp", A, theta), rtol=1e-12, atol=1e-14)
        ref = torch.stack([torch.linalg.pinv(A[r]) @ theta[r] for r in range(op.R)])
        assert torch.allclose(lazy.pinv_apply(theta), ref, rtol=1e-9, atol=1e-12)
        assert torch.allclose(cached.pinv_apply(theta), ref, rtol=1e-9, atol=1e-12)
        # the scale of our distribution: entries N(0, 1/p)
        assert float(A.var()) == pytest.approx(1 / 12, rel=0.1)
    a, _, _ = epsilon_subspace_values(op, eps=1e-2, p=12, common=False, seed=3)
    b, _, _ = epsilon_subspace_values(op, eps=1e-2, p=12, common=False, seed=3, max_matrix_bytes=0)
    assert torch.allclose(a, b, rtol=1e-10)


def test_per_replica_matrix_does_not_depend_on_the_split():
    from fastcurv.solvers.probes import replica_window
    whole = RandomSubspace(50, 7, 4, seed=9, common=False, dtype=torch.float64)
    with replica_window(2, 4):
        part = RandomSubspace(50, 7, 2, seed=9, common=False, dtype=torch.float64)
        shared = RandomSubspace(50, 7, 2, seed=9, common=True, dtype=torch.float64)
    assert torch.equal(part.dense(0), whole.dense(2)) and torch.equal(part.dense(1), whole.dense(3))
    assert torch.equal(shared.dense(1), whole.dense(0))  # the common matrix is replica 0's stream
    assert not torch.equal(whole.dense(0), whole.dense(1))


def test_not_invariant_under_dinh_rescaling(trained):
    models, loader = trained
    opts = {NAME: {"eps": 1e-2, "p": 20, "n_iter": 20}}
    before = fastcurv.batched_sharpness(models, loader, measures=(NAME,), progress=False, measure_options=opts)[NAME]
    rescaled = rescale_layers(models, alpha=10.0, probe=torch.cat([b[0] for b in loader]))
    assert rescaled.max_output_change < 1e-10  # same functions ...
    after = fastcurv.batched_sharpness(rescaled.models, loader, measures=(NAME,), progress=False, measure_options=opts)[NAME]
    assert (after > 2 * before).all()  # ... much sharper (the shrunk layer's box grows relative to it: 10-30x here)


def test_nan_replica_is_isolated(trained):
    models, loader = trained
    bad = [copy.deepcopy(m) for m in models]
    with torch.no_grad():
        bad[1][0].weight[0, 0] = float("nan")
    opts = {NAME: {"eps": 1e-2, "p": 20}}
    with pytest.warns(RuntimeWarning):
        res = fastcurv.batched_sharpness(bad, loader, measures=(NAME,), progress=False, measure_options=opts)
    good = fastcurv.batched_sharpness([models[0], models[2]], loader, measures=(NAME,), progress=False,
                                      measure_options=opts)
    assert torch.isnan(res[NAME][1]) and res.flags[1] and not res.flags[0]
    assert torch.allclose(res[NAME][[0, 2]], good[NAME], rtol=1e-10)


def test_rejects_bad_input(trained):
    models, loader = trained
    with pytest.raises(ValueError, match="A must have shape"):
        fastcurv.batched_sharpness(models, loader, measures=(NAME,), progress=False,
                                   measure_options={NAME: {"A": torch.eye(5, dtype=torch.float64)}})
    with pytest.raises(ValueError, match="p must be a positive integer"):
        fastcurv.batched_sharpness(models, loader, measures=(NAME,), progress=False, measure_options={NAME: {"p": 0}})
    with pytest.raises(ValueError, match="eps must be a positive"):
        fastcurv.batched_sharpness(models, loader, measures=(NAME,), progress=False, measure_options={NAME: {"eps": 0}})


def test_warns_when_p_is_not_small_against_the_parameter_count(trained):
    """The default p = min(1000, P) makes A square on small models: a RuntimeWarning says so; p << P
    and an injected A (A = I is the full-space check) do not warn."""
    models, loader = trained
    op = fastcurv.HessianOperator(models, loader)
    for p in (1000, op.P // 2 + 1):
        with pytest.warns(RuntimeWarning, match=rf"p = {min(p, op.P)} is not small against the P = {op.P}"):
            epsilon_subspace_values(op, eps=1e-2, p=p, n_iter=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        epsilon_subspace_values(op, eps=1e-2, p=op.P // 2, n_iter=1)
        epsilon_subspace_values(op, eps=1e-2, n_iter=1, A=torch.eye(op.P, dtype=torch.float64))


@pytest.mark.gpu
def test_cuda_matches_cpu_with_injected_matrix(trained):
    models, loader = trained
    cuda_models = [copy.deepcopy(m).cuda() for m in models]
    cuda_loader = [(x.cuda(), y.cuda()) for x, y in loader]
    op = fastcurv.HessianOperator(models, loader)
    _, _, sub = epsilon_subspace_values(op, eps=1e-2, p=20, seed=2)
    A = sub.dense(0).clone()
    opts = {NAME: {"eps": 1e-2, "A": A, "n_iter": 20}}
    cpu = fastcurv.batched_sharpness(models, loader, measures=(NAME,), progress=False, measure_options=opts)[NAME]
    gpu = fastcurv.batched_sharpness(cuda_models, cuda_loader, measures=(NAME,), progress=False, measure_options=opts)[NAME]
    assert torch.allclose(cpu, gpu, rtol=1e-8)
    # the device-generated matrix: cached and regenerated blocks agree on the GPU too
    opc = fastcurv.HessianOperator(cuda_models, cuda_loader)
    a, _, s1 = epsilon_subspace_values(opc, eps=1e-2, p=20, common=False)
    b, _, s2 = epsilon_subspace_values(opc, eps=1e-2, p=20, common=False, max_matrix_bytes=0)
    assert s1.cached and not s2.cached and torch.allclose(a, b, rtol=1e-10)


def test_memory_budget_plans_the_matrix(monkeypatch):
    """batched_sharpness(memory_budget=) counts the random matrix: cached whenever the whole plan
    fits with it cached (it was cached only up to a quarter of the budget, and a budget with plenty
    of room made the job 2x slower), else regenerated block by block (the same matrix: the same
    values; the default 1 GiB cap cached it whatever the budget, 12x over it); a max_matrix_bytes
    the caller gives is kept and counted."""
    from fastcurv import memory

    monkeypatch.setattr(subspace_mod, "BLOCK_ROWS", 512)
    models = make_replicas(R=2, sizes=(6, 64, 64, 3))  # P = 4803
    loader = make_data()
    opts = {NAME: {"eps": 1e-2, "p": 400, "n_iter": 3}}
    job = dict(measures=(NAME,), measure_options=opts, max_iter=20)
    made = []
    init = RandomSubspace.__init__
    monkeypatch.setattr(RandomSubspace, "__init__", lambda self, *a, **k: made.append(self) or init(self, *a, **k))
    ref = fastcurv.batched_sharpness(models, loader, progress=False, seed=1, **job)[NAME]
    assert made[-1].cached
    P = sum(q.numel() for q in models[0].parameters())
    matrix = P * 400 * 8  # one shared matrix (common random numbers)
    shape, _ = memory.job_shape(models, loader, **job)
    assert shape.P == P and shape.matrix_p == 400 and shape.matrix_shared

    def with_matrix(c, **kw):  # the estimate with the matrix cached
        return memory.estimate_bytes(shape, c, max_matrix_bytes=1 << 40, **kw)["total"] / memory.SAFETY

    fits_cached = int(with_matrix(2)) + 64  # the whole job, two replicas a chunk, with the matrix cached
    too_small = int(with_matrix(1, cache_bytes=0)) - 64  # not even one replica with the matrix cached
    assert matrix > fits_cached / 4  # (more than a quarter of the budget: regenerated before)
    for budget, cached in ((too_small, False), (fits_cached, True)):
        made.clear()
        got = fastcurv.batched_sharpness(models, loader, progress=False, seed=1, memory_budget=budget, **job)[NAME]
        assert made and all(s.cached is cached for s in made)
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)
        plan = memory.plan_memory(models, loader, budget, **job)
        assert plan.estimate["total"] <= memory.SAFETY * budget and plan.batch_size is None
        assert plan.max_matrix_bytes == (matrix if cached else 0)
        assert (plan.estimate["measure"] > matrix) is cached and ("subspace matrix cached" in plan.describe()) is cached
    assert memory.plan_memory(models, loader, fits_cached, **job).replica_chunk == 2
    # the caller's max_matrix_bytes: kept (cached here), and the plan counts it
    mine = {NAME: dict(opts[NAME], max_matrix_bytes=1 << 30)}
    plan = memory.plan_memory(models, loader, too_small, **dict(job, measure_options=mine))
    assert plan.max_matrix_bytes is None and plan.estimate["measure"] > matrix
    with pytest.raises(ValueError, match=r"too small for this job: .*measure "):
        memory.plan_memory(models, loader, matrix, **dict(job, measure_options=mine))
    with pytest.raises(ValueError, match="max_matrix_bytes must be a non-negative number of bytes"):
        fastcurv.batched_sharpness(models, loader, progress=False, measures=(NAME,),
                                   measure_options={NAME: {"max_matrix_bytes": -1}})


def test_the_plan_weighs_building_a_shared_matrix_per_chunk():
    """A shared matrix cached is drawn once per chunk, regenerated in every product of a chunk: the
    plan caches it unless that needs so many more chunks that it would be drawn more often."""
    from fastcurv import memory

    models = make_replicas(R=2, sizes=(6, 64, 64, 3))
    shape, _ = memory.job_shape(models, make_data(), measures=(NAME,), measure_options={NAME: {"p": 400, "n_iter": 3}})
    matrix = shape.P * 400 * 8
    R = 12
    budget = int(memory.estimate_bytes(shape, 1, max_matrix_bytes=1 << 40)["total"] / memory.SAFETY) + 64
    # the plans with the matrix cached and regenerated (as a caller's max_matrix_bytes would fix it)
    cached, regenerated = (memory.choose(dataclasses.replace(shape, matrix_max=m), R, budget) for m in (1 << 40, 0))
    chunks = lambda plan: -(-R // plan.replica_chunk)
    assert cached.replica_chunk < regenerated.replica_chunk and cached.batch_size is regenerated.batch_size is None
    assert chunks(cached) <= 9 * chunks(regenerated)  # 2 (n_iter + 1) + 1 = 9 products per chunk
    assert memory.choose(shape, R, budget).max_matrix_bytes == matrix  # cached: drawn fewer times
    assert shape.matrix_products == 9
    once = dataclasses.replace(shape, matrix_products=1)  # (as if each chunk made one product)
    assert chunks(cached) > chunks(regenerated)
    assert memory.choose(once, R, budget).max_matrix_bytes == 0


def test_a_numpy_p_is_planned(monkeypatch):
    """p given as a numpy integer (the measure takes any integer) is planned as the int (the plan
    left the matrix out, and the measure cached it at 2x the budget)."""
    from fastcurv import memory

    models = make_replicas(R=2, sizes=(6, 64, 64, 3))
    loader = make_data()
    plans = []
    for p in (100, np.int64(100), np.int32(100)):
        job = dict(measures=(NAME,), measure_options={NAME: {"p": p, "n_iter": 1}})
        shape = memory.job_shape(models, loader, **job)[0]
        assert shape.matrix_p == 100
        # a budget too small for the matrix cached
        least = memory.estimate_bytes(shape, 1, cache_bytes=0, max_matrix_bytes=1 << 40)["total"]
        budget = int(least / memory.SAFETY) - 64
        plans.append(memory.plan_memory(models, loader, budget, **job))
    assert plans[0].max_matrix_bytes == 0  # regenerated under this budget
    for plan in plans[1:]:
        assert plan.estimate == plans[0].estimate and plan.max_matrix_bytes == plans[0].max_matrix_bytes
    made = []
    init = RandomSubspace.__init__
    monkeypatch.setattr(RandomSubspace, "__init__", lambda self, *a, **k: made.append(self) or init(self, *a, **k))
    fastcurv.batched_sharpness(models, loader, progress=False, memory_budget=budget, measures=(NAME,),
                               measure_options={NAME: {"p": np.int64(100), "n_iter": 1}})
    assert made and not any(s.cached for s in made)


def test_the_cached_matrix_is_built_in_place(monkeypatch):
    """Building the cached matrix holds it once, plus a block (its blocks were concatenated, which
    held it twice: the peak was 2x the matrix)."""
    monkeypatch.setattr(subspace_mod, "BLOCK_ROWS", 32)
    built = []  # sizes of the tensors torch.cat / torch.stack return while a subspace is built
    for fn in ("cat", "stack"):
        real = getattr(torch, fn)

        def spy(*a, _real=real, **k):
            out = _real(*a, **k)
            built.append(out.numel())
            return out

        monkeypatch.setattr(torch, fn, spy)
    for common in (True, False):
        built.clear()
        sub = RandomSubspace(300, 12, 3, seed=3, common=common, dtype=torch.float64)
        lazy = RandomSubspace(300, 12, 3, seed=3, common=common, dtype=torch.float64, max_bytes=0)
        assert sub.cached and not lazy.cached
        assert max(built, default=0) <= 3 * 32 * 12  # nothing matrix-sized was assembled
        for r in range(3):
            assert torch.equal(sub.dense(r), lazy.dense(r))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_plan_sizes_a_half_precision_models_matrix_in_float32(dtype):
    """A float16 / bfloat16 model's matrix is drawn in float32 (the perturbation measures run such
    models in float32), so the plan sizes it at 4 bytes an entry: it counted 2 (half the matrix).
    A float32 model's is unchanged, and an injected float32 matrix needs no converted copy."""
    from fastcurv import memory

    models = [m.to(dtype) for m in make_replicas(R=2, sizes=(6, 16, 3))]
    x, y = make_data()[0]
    data = [(x.to(dtype), y)]
    shape, _ = memory.job_shape(models, data, measures=(NAME,), measure_options={NAME: {"p": 8}})
    assert memory.matrix_bytes(shape, 2)[1] and shape.matrix_shared
    assert memory.matrix_bytes(shape, 2) == memory.matrix_bytes(dataclasses.replace(shape, itemsize=4), 2)
    A = torch.randn(shape.P, 8)
    shape, _ = memory.job_shape(models, data, measures=(NAME,), measure_options={NAME: {"A": A}})
    assert shape.matrix_injected == 0


@pytest.mark.parametrize("common", [True, False])
def test_a_nan_replica_of_a_small_model_loses_only_its_own_result(common):
    """A replica with NaN weights (a diverged one from train_population) among good ones, on a model
    with P < 2p (dense least squares: any model under 2000 parameters at the default p): gelsd
    refused the NaN right-hand side with torch's raw INTERNAL ASSERT and no replica got a result.
    The NaN replica now gets NaN and a flag, the others their results alone."""
    good = make_replicas(R=3, sizes=(6, 8, 3))
    bad = copy.deepcopy(good[1])
    with torch.no_grad():
        bad[0].weight.fill_(float("nan"))
    kw = dict(measures=(NAME,), progress=False, common_random_numbers=common)
    data = make_data()
    alone = fastcurv.batched_sharpness(good, data, **kw)[NAME]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fastcurv.batched_sharpness([good[0], bad, good[1], good[2]], data, **kw)
    got = res[NAME]
    assert torch.isnan(got[1]) and res.ok.tolist() == [True, False, True, True]
    if common:  # (per-replica draws are keyed by the position)
        torch.testing.assert_close(got[[0, 2, 3]], alone, rtol=1e-12, atol=0)
    else:
        assert torch.isfinite(got[[0, 2, 3]]).all()
