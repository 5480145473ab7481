"""Krylov and stochastic solvers against dense eigendecompositions and known spectra."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import fastcurv
from fastcurv.solvers import hutchinson, hutchpp, lanczos, power_iteration, slq
from models import mlp, replicas
from oracle import DenseOperator, dense_hessian


def spd_with_spectrum(eigs, seed):
    gen = torch.Generator().manual_seed(seed)
    n = len(eigs)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return Q @ torch.diag(torch.as_tensor(eigs, dtype=torch.float64)) @ Q.T


def random_symmetric(R, n, seed):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(R, n, n, generator=gen, dtype=torch.float64)
    return (A + A.transpose(1, 2)) / 2


def test_lanczos_top_and_bottom_match_eigh():
    mats = random_symmetric(4, 60, 0)
    op = DenseOperator(mats)
    top = lanczos(op, k=3, tol=1e-8, max_iter=60)
    bottom = lanczos(op, k=2, which="smallest", tol=1e-8, max_iter=60)
    for r in range(4):
        ev = np.linalg.eigvalsh(mats[r].numpy())
        np.testing.assert_allclose(top.eigenvalues[r].numpy(), ev[::-1][:3], rtol=1e-6)
        np.testing.assert_allclose(bottom.eigenvalues[r].numpy(), ev[:2], rtol=1e-6)
    assert top.converged.all() and bottom.converged.all()
    # the reported error estimate bounds the true error
    ev_top = torch.tensor([np.linalg.eigvalsh(m.numpy())[-1] for m in mats])
    assert ((top.eigenvalues[:, 0] - ev_top).abs() <= top.error_bounds[:, 0] + 1e-10).all()


def test_lanczos_ritz_vectors_and_per_replica_iterations():
    # replica 0 has a huge spectral gap (converges fast), replica 1 a clustered top (slow)
    a = spd_with_spectrum([100.0] + list(np.linspace(0, 1, 79)), 1)
    b = spd_with_spectrum(list(np.linspace(0.9, 1.0, 80)), 2)
    op = DenseOperator(torch.stack([a, b]))
    res = lanczos(op, k=1, tol=1e-6, max_iter=80, return_vectors=True)
    assert res.iterations[0] < res.iterations[1]
    v, theta = res.eigenvectors[0, 0], float(res.eigenvalues[0, 0])
    # the Ritz pair's residual is the one reported (eigenvalue accuracy is its square over the gap)
    assert abs(float((a @ v - theta * v).norm()) - float(res.residuals[0, 0])) < 1e-8
    assert abs(theta - 100.0) <= float(res.error_bounds[0, 0]) + 1e-12
    assert abs(float(v.norm()) - 1) < 1e-10


@pytest.mark.parametrize("P", [50, 51])
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_projection_with_the_columns_cut_into_slices(P, parts):
    """``_project_split`` (P cut into a batch of slices, leftover columns apart) equals the plain
    Gram-Schmidt step, writing into a strided view of W."""
    from fastcurv.solvers._project import _project_split

    g = torch.Generator().manual_seed(P + parts)
    q, _ = torch.linalg.qr(torch.randn(P, 6, generator=g, dtype=torch.float64))
    b = q.T.contiguous()
    W = torch.randn(3, 2, P, generator=g, dtype=torch.float64)
    want = W[1] - (W[1] @ b.T) @ b
    _project_split(b, W[1], parts)
    torch.testing.assert_close(W[1], want, rtol=0, atol=1e-13)


def test_lanczos_reorthogonalization_per_replica_matches_one_pass(monkeypatch):
    op = DenseOperator(random_symmetric(5, 50, 4))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # plain products
    whole = lanczos(op, k=2, tol=1e-8, max_iter=50, keep_basis=True)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)  # 50 columns: 3 slices of 16 and 2 apart
    split = lanczos(op, k=2, tol=1e-8, max_iter=50, keep_basis=True)
    torch.testing.assert_close(split.eigenvalues, whole.eigenvalues, rtol=1e-12, atol=1e-12)
    B = split.basis
    for r in range(5):
        n = int(split.iterations[r])
        torch.testing.assert_close(B[r, :n] @ B[r, :n].T, torch.eye(n, dtype=B.dtype), atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_partial_reorthogonalization_keeps_the_basis_semi_orthogonal(dtype):
    """150 steps past convergence, where plain Lanczos loses orthogonality and repeats converged
    eigenvalues: with Simon's estimates the basis stays orthogonal to sqrt(eps), the top four
    eigenvalues are those of the dense matrix, and fewer steps reorthogonalize than with "full"."""
    n = 400
    mats = torch.stack([spd_with_spectrum([100.0, 90.0, 80.0] + list(np.linspace(-1, 1, n - 3)), 0),
                        spd_with_spectrum(list(np.linspace(0, 10, n)), 1)]).to(dtype)
    op = DenseOperator(mats)
    res = lanczos(op, k=4, tol=0.0, max_iter=150, keep_basis=True, reorthogonalize="partial")
    eps = torch.finfo(dtype).eps
    for r in range(2):
        B = res.basis[r].double()
        drift = (B @ B.T - torch.eye(150, dtype=torch.float64)).abs().max()
        assert drift <= eps**0.5, (r, float(drift))
        want = np.linalg.eigvalsh(mats[r].double().numpy())[::-1][:4]
        np.testing.assert_allclose(res.eigenvalues[r].numpy(), want, rtol=100 * eps)
    assert (res.iterations == 150).all()
    assert (res.reorthogonalized > 0).all() and (res.reorthogonalized < 150).all()
    assert res.reorthogonalized[1] <= 50  # the slowly converging spectrum rarely needs it
    assert (lanczos(op, k=4, tol=0.0, max_iter=150, keep_basis=True).reorthogonalized == 150).all()


def test_partial_reorthogonalization_gathered_equals_per_replica():
    """The gathered reorthogonalization (the GPU's) gives the per-replica views' result, and only
    for the replicas that are due."""
    from fastcurv.solvers.lanczos import _reorthogonalize

    g = torch.Generator().manual_seed(3)
    Q = torch.linalg.qr(torch.randn(5, 40, 7, generator=g, dtype=torch.float64))[0].transpose(1, 2).contiguous()
    w = torch.randn(3, 40, generator=g, dtype=torch.float64)
    ai, due = torch.tensor([0, 2, 4]), torch.tensor([True, False, True])
    a, b = w.clone(), w.clone()
    _reorthogonalize(Q, a, ai, due, 5, gather=False)
    _reorthogonalize(Q, b, ai, due, 5, gather=True)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    assert torch.equal(a[1], w[1])
    for local, rr in ((0, 0), (2, 4)):
        assert (Q[rr, :6] @ a[local]).abs().max() < 1e-12
        assert (Q[rr, 6:] @ a[local] - Q[rr, 6:] @ w[local]).abs().max() < 1e-12


def test_lanczos_not_converged_is_flagged():
    op = DenseOperator(random_symmetric(2, 200, 3))
    res = lanczos(op, k=1, tol=1e-12, max_iter=5)
    assert not res.converged.any()
    assert (res.iterations == 5).all()


def test_power_iteration_matches_dominant_eigenvalue():
    a = spd_with_spectrum([10.0, 3.0] + [1.0] * 30, 4)
    op = DenseOperator(a.unsqueeze(0))
    res = power_iteration(op, tol=1e-8, max_iter=200)
    assert res.converged[0]
    assert abs(float(res.eigenvalues[0, 0]) - 10.0) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_hutchpp_of_a_half_precision_operator(dtype):
    """Hutch++ of a float16 / bfloat16 operator (a half-precision model's Hessian): its QR raised
    torch's raw '"geqrf_cpu" not implemented for 'Half'' (``measures=("trace",)``, ``ggn_trace``,
    ``trace_method="hutch++"``). It runs in float32 now, the sketch's basis cast back."""
    A = spd_with_spectrum(np.linspace(1.0, 2.0, 12), 0).unsqueeze(0).to(dtype)
    got = hutchpp(DenseOperator(A), num_matvecs=12, seed=0).trace
    want = hutchpp(DenseOperator(A.double()), num_matvecs=12, seed=0).trace  # the same probes in float64
    assert abs(float(got[0]) - float(want[0])) < 0.03 * float(want[0])


def test_hutchinson_and_hutchpp_errors_within_stderr_and_hutchpp_better():
    eigs = 1.0 / np.arange(1, 201) ** 2
    A = spd_with_spectrum(eigs, 5)
    op = DenseOperator(A.unsqueeze(0))
    exact = float(eigs.sum())
    err_h, err_pp, inside = [], [], 0
    for seed in range(20):
        h = hutchinson(op, num_probes=30, seed=seed)
        pp = hutchpp(op, num_matvecs=30, seed=seed)
        err_h.append(abs(float(h.trace[0]) - exact))
        err_pp.append(abs(float(pp.trace[0]) - exact))
        inside += abs(float(pp.trace[0]) - exact) <= 3 * float(pp.stderr[0]) + 1e-12
    assert np.mean(err_pp) < 0.2 * np.mean(err_h)
    assert inside >= 17  # about 99.7% expected for a Gaussian error
    # the Hutch++ relative error bound for PSD matrices: O(1/m)
    assert np.mean(err_pp) / exact < 3.0 / 30


def test_deflated_trace_with_lanczos_basis_is_unbiased_and_tight():
    eigs = [50.0, 20.0, 10.0] + list(np.linspace(-1, 1, 97))
    A = spd_with_spectrum(eigs, 6)
    op = DenseOperator(A.unsqueeze(0))
    exact = float(np.sum(eigs))
    lz = lanczos(op, k=1, tol=1e-6, max_iter=40, keep_basis=True)
    B = lz.basis
    torch.testing.assert_close(torch.einsum("rip,rjp->rij", B, B)[0], torch.eye(B.shape[1], dtype=B.dtype), atol=1e-10, rtol=0)
    ests = [float(hutchinson(op, num_probes=20, seed=s, basis=lz.basis, basis_trace=lz.tridiag_trace).trace[0]) for s in range(30)]
    plain = [float(hutchinson(op, num_probes=20, seed=s).trace[0]) for s in range(30)]
    assert abs(np.mean(ests) - exact) < 3 * np.std(ests) / np.sqrt(30) + 1e-9
    assert np.std(ests) < np.std(plain)


def test_probes_per_matvec_follows_the_backend_on_the_cpu():
    """An explicit probe_batch wins; by default a GPU stacks 10 probes per matvec, and the CPU asks
    the operator's backend (the fused conv engine: 10; MLP chains and operators without one: 1)."""
    from types import SimpleNamespace

    from fastcurv.solvers.trace import probes_per_matvec

    A = spd_with_spectrum(np.linspace(1, 2, 12), 3)
    op = DenseOperator(A.unsqueeze(0))
    ks = []
    matvec = op.matvec
    op.matvec = lambda V, idx=None: (ks.append(V.shape[1]), matvec(V, idx))[1]
    plain = hutchinson(op, num_probes=10, seed=1)
    assert ks == [1] * 10
    op.backend, ks[:] = SimpleNamespace(cpu_probe_batch=10), []
    stacked = hutchinson(op, num_probes=10, seed=1)
    assert ks == [10]
    torch.testing.assert_close(stacked.trace, plain.trace)  # the same probes
    ks[:] = []
    hutchpp(op, num_matvecs=12, probe_batch=3, seed=1)
    assert ks == [3, 1, 3, 1, 3, 1]  # S (4 probes), Q (4 columns), the rest (4 probes)
    assert probes_per_matvec(SimpleNamespace(device=torch.device("cuda"))) == 10
    assert probes_per_matvec(op, 4) == 4
    with pytest.raises(ValueError, match="probe_batch must be a positive integer, got 0"):
        probes_per_matvec(op, 0)


def test_lanczos_with_fewer_distinct_eigenvalues_than_k_and_k_above_p():
    # eigenvalues 3, 1, -2 with multiplicities: every start vector's Krylov space has dimension 3
    A = spd_with_spectrum(np.array([3.0] * 4 + [1.0] * 3 + [-2.0] * 3), 5)
    op = DenseOperator(A.unsqueeze(0))
    res = lanczos(op, k=5, tol=1e-10, seed=0)
    torch.testing.assert_close(res.eigenvalues[0, :3], torch.tensor([3.0, 1.0, -2.0], dtype=torch.float64))
    assert res.eigenvalues[0, 3:].isnan().all() and not bool(res.converged[0])
    res = lanczos(op, k=3, tol=1e-10, seed=0)
    assert bool(res.converged[0]) and int(res.iterations[0]) == 3
    with pytest.raises(ValueError, match="k=11 eigenvalues asked of a Hessian of dimension P=10"):
        lanczos(op, k=11)


@pytest.mark.parametrize("scale", [1.0, 1e-40, 1e-100, 1e-170])
def test_lanczos_is_scale_invariant(scale):
    """Relative stopping and breakdown tests: an operator scaled by 1e-40 gives the scaled results
    (an absolute floor of 1e-30 stopped it after one step with a wrong value, flagged converged).
    At 1e-170 torch's float64 norm of a matvec (entries 1e-170, squares below the smallest
    subnormal) was 0: both runs stopped "converged" after one step at the start vector's Rayleigh
    quotient (-0.78 for lambda_max 7.0 and for lambda_min -7.3)."""
    mats = random_symmetric(2, 30, 3)
    base = [lanczos(DenseOperator(mats), k=1, which=w, tol=1e-8, seed=0) for w in ("largest", "smallest")]
    for ref, w in zip(base, ("largest", "smallest")):
        got = lanczos(DenseOperator(mats * scale), k=1, which=w, tol=1e-8, seed=0)
        torch.testing.assert_close(got.eigenvalues / scale, ref.eigenvalues, rtol=1e-10, atol=0)
        assert torch.equal(got.iterations, ref.iterations) and got.converged.all()


def test_slq_draws_whose_krylov_spaces_differ():
    # eigenvectors (1,1,1)/sqrt3, (1,-1,0)/sqrt2, (1,1,-2)/sqrt6: a Rademacher start vector reaches
    # 1, 2 or 3 of them (v1 = v2 = v3, v1 = v2 only, else), so the draws stop after different steps
    Q = torch.tensor([[1, 1, 1], [1, -1, 0], [1, 1, -2]], dtype=torch.float64)
    Q = Q / Q.norm(dim=1, keepdim=True)
    A = Q.T @ torch.diag(torch.tensor([5.0, 3.0, 1.0], dtype=torch.float64)) @ Q
    dens = slq(DenseOperator(A.unsqueeze(0)), num_steps=3, num_draws=12, seed=0)
    assert dens.nodes.shape == dens.weights.shape == (1, 12, 3)
    reached = (dens.weights[0] > 1e-12).sum(1)
    assert len(set(reached.tolist())) >= 2
    torch.testing.assert_close(dens.weights[0].sum(1), torch.ones(12, dtype=torch.float64))
    on = dens.weights[0] > 1e-12
    assert all(min(abs(float(t) - e) for e in (5.0, 3.0, 1.0)) < 1e-10 for t in dens.nodes[0][on])
    grid, d = dens.density()
    assert abs(float(torch.trapezoid(d[0], grid)) - 1) < 1e-3


def test_slq_moments():
    eigs = np.linspace(-2, 5, 50)
    A = spd_with_spectrum(eigs, 7)
    op = DenseOperator(A.unsqueeze(0))
    dens = slq(op, num_steps=50, num_draws=8, seed=0)
    w = dens.weights[0]
    torch.testing.assert_close(w.sum(-1), torch.ones(8, dtype=torch.float64))  # each draw is a probability measure
    nodes = dens.nodes[0]
    assert nodes.min() >= eigs.min() - 1e-8 and nodes.max() <= eigs.max() + 1e-8
    # first moment = v^T A v / |v|^2 per draw; its mean estimates trace / P
    assert abs(float((w * nodes).sum(-1).mean()) - eigs.mean()) < 0.5
    grid, d = dens.density(sigma2=0.05)
    integral = float(torch.trapezoid(d[0], grid))
    assert abs(integral - 1) < 0.05


class RecordingOperator(DenseOperator):
    """A DenseOperator that keeps every vector it is applied to (to recover SLQ's start vectors)."""

    def __init__(self, mats):
        super().__init__(mats)
        self.applied = []

    def matvec(self, V, idx=None):
        self.applied.append(V.detach().clone().reshape(-1, self.P))
        return super().matvec(V, idx)

    def unit_rademacher_inputs(self):
        """``[n, P]``: the vectors applied with every entry ``+-1/sqrt(P)``: the normalized Rademacher
        start vectors (no later Lanczos vector has that form)."""
        rows = torch.cat(self.applied)
        flat = (rows.abs() - self.P**-0.5).abs().amax(1) < 1e-12
        return rows[flat]


def rademacher_se(B, draws):
    """Standard error of the mean over ``draws`` Rademacher probes of ``v^T B v / P`` (B symmetric
    ``[P, P]``): its variance per probe is ``2 sum_{i != j} B_ij^2 / P^2``."""
    P = B.shape[0]
    var = 2 * (float((B**2).sum()) - float((torch.diagonal(B) ** 2).sum())) / P**2
    return (var / draws) ** 0.5


def test_slq_quadrature_moments_are_the_spectral_moments(one_thread):
    """SLQ's weights were checked only for summing to 1 (and the first moment within 33%): weights
    taken from the last component of T's eigenvectors instead of the first (``Y[-1] ** 2``) passed
    every test, with a second moment of 1.92 for 6.50. With the whole Krylov space (num_steps = P)
    each draw's quadrature is exact up to degree 2P - 1, so its moments 1-4 equal
    ``v^T A^j v / |v|^2`` for the draw's own start vector v, and their mean over the draws is within
    3 standard errors (of those Rademacher draws) of the spectral moments ``trace(A^j) / P``."""
    eigs = np.linspace(-2, 5, 50)
    A = spd_with_spectrum(eigs, 7)
    P, draws = A.shape[0], 16
    op = RecordingOperator(A.unsqueeze(0))
    dens = slq(op, num_steps=P, num_draws=draws, seed=0)
    w, nodes = dens.weights[0], dens.nodes[0]
    V = op.unit_rademacher_inputs()
    assert V.shape == (draws, P)  # one start vector per draw, in draw order
    for j in range(1, 5):
        Aj = torch.linalg.matrix_power(A, j)
        quad = (w * nodes**j).sum(-1)  # [draws]
        exact = ((V @ Aj) * V).sum(-1)  # (|v| = 1)
        torch.testing.assert_close(quad, exact, rtol=1e-10, atol=1e-10 * float(Aj.abs().max()))
        spectral = float((torch.as_tensor(eigs) ** j).mean())
        assert abs(float(quad.mean()) - spectral) <= 3 * rademacher_se(Aj, draws), (j, float(quad.mean()), spectral)


def test_slq_mass_of_an_isolated_eigenvalue_cluster(one_thread):
    """The weight SLQ puts on an isolated cluster (3 of 80 eigenvalues near 100, the rest in [0, 1])
    after 20 steps (a partial Krylov space, as on a real model) is, per draw, the start vector's
    squared projection onto the cluster's eigenvectors (its Ritz values converge first), and its
    mean is 3/80 within 3 standard errors. Weights from the wrong eigenvector component gave that
    cluster's single-spike analogue a mass of 0 (for 1/80)."""
    eigs = np.array([99.0, 100.0, 101.0] + list(np.linspace(0, 1, 77)))
    A = spd_with_spectrum(eigs, 3)
    P, draws = A.shape[0], 20
    op = RecordingOperator(A.unsqueeze(0))
    dens = slq(op, num_steps=20, num_draws=draws, seed=1)
    w, nodes = dens.weights[0], dens.nodes[0]
    V = op.unit_rademacher_inputs()
    assert V.shape == (draws, P)
    U = torch.linalg.eigh(A).eigenvectors[:, -3:]
    in_cluster = nodes > 50
    assert (in_cluster.sum(1) == 3).all() and float((nodes[in_cluster] - 100).abs().max()) <= 1 + 1e-8
    mass = (w * in_cluster).sum(-1)
    torch.testing.assert_close(mass, ((V @ U) ** 2).sum(-1), rtol=1e-9, atol=1e-12)
    assert abs(float(mass.mean()) - 3 / P) <= 3 * rademacher_se(U @ U.T, draws)


def test_lanczos_error_bound_is_the_sharper_residual_squared_over_gap(one_thread):
    """The documented error estimate min(r, r^2/gap) was never checked for being the sharp one:
    returning the plain residual r (1,700x looser on lambda_max = 10 beside 3) passed, as did
    r^2/gap without the min. Here, with the gap theta - lambda_2 taken from a dense
    eigendecomposition and r from the returned Ritz vector, the converged top eigenvalue's bound is
    at most r^2/(theta - lambda_2) (Kato-Temple's bound, so at least the true error): 5,000x below r.
    And a converged column's bound is never above its residual, also where a near-double top
    eigenvalue (1e-5 apart) makes r^2/gap larger than r."""
    eigs = [1.0, 0.8] + list(np.linspace(0, 0.7, 198))
    A = spd_with_spectrum(eigs, 4)
    res = lanczos(DenseOperator(A.unsqueeze(0)), k=1, tol=1e-4, return_vectors=True)
    assert bool(res.converged[0])
    theta, v = float(res.eigenvalues[0, 0]), res.eigenvectors[0, 0]
    r = float((A @ v - theta * v).norm())
    assert abs(r - float(res.residuals[0, 0])) <= 1e-9 * r
    lam = torch.linalg.eigvalsh(A).flip(0)
    kato_temple = r * r / (theta - float(lam[1]))
    bound, err = float(res.error_bounds[0, 0]), abs(theta - float(lam[0]))
    assert err <= bound <= kato_temple * (1 + 1e-6)
    assert bound < 1e-3 * r  # (so the check is not vacuous: r is 3.7e-5, the bound 6.9e-9)

    pair = spd_with_spectrum([1.0, 1.0 - 1e-5] + list(np.linspace(0, 0.7, 198)), 4)
    top = lanczos(DenseOperator(pair.unsqueeze(0)), k=2, tol=1e-2)
    assert top.column_converged[0].all()
    gap = float(top.eigenvalues[0, 0] - top.eigenvalues[0, 1])
    assert (top.residuals[0] > gap).all()  # where r^2/gap > r
    torch.testing.assert_close(top.error_bounds[0], top.residuals[0], rtol=1e-12, atol=0)


def test_common_random_numbers_identical_replicas_identical_results():
    m = replicas(lambda: mlp(nn.Tanh), R=1)[0]
    twins = [m, m]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(15, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (15,), generator=gen)
    res = fastcurv.batched_sharpness(twins, (x, y), progress=False, seed=3)
    # same probes and batches for both: equal up to the rounding of batched GEMMs
    torch.testing.assert_close(res["lambda_max"][0], res["lambda_max"][1], rtol=1e-12, atol=0)
    torch.testing.assert_close(res["trace"][0], res["trace"][1], rtol=1e-12, atol=0)
    again = fastcurv.batched_sharpness(twins, (x, y), progress=False, seed=3)
    assert torch.equal(again["trace"], res["trace"])
    indep = fastcurv.batched_sharpness(twins, (x, y), progress=False, seed=3, common_random_numbers=False)
    assert abs(float(indep["trace"][0] - indep["trace"][1])) > 1e-6


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_lanczos_does_not_stop_before_the_extreme_eigenvalue_enters(which):
    """A start vector that barely touches the extreme eigenvector (overlap 1e-3, as a gradient
    plus random start can give): the residual test alone passes on the next eigenvalue after a few
    steps; the minimum number of steps lets the extreme one in."""
    sign = 1.0 if which == "largest" else -1.0
    eigs = sign * torch.cat([torch.tensor([1.0, 0.97]), torch.linspace(0.5, -0.2, 98)])
    gen = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(100, 100, generator=gen, dtype=torch.float64))
    op = DenseOperator((Q @ torch.diag(eigs.double()) @ Q.T).unsqueeze(0))
    v0 = (1e-3 * Q[:, 0] + Q[:, 1:] @ torch.randn(99, generator=gen, dtype=torch.float64) / 10).unsqueeze(0)
    early = lanczos(op, k=1, which=which, tol=1e-2, v0=v0, min_iter=0)
    assert bool(early.converged[0]) and abs(float(early.eigenvalues[0, 0]) - sign * 0.97) < 1e-2  # what the minimum guards against
    res = lanczos(op, k=1, which=which, tol=1e-2, v0=v0)
    assert bool(res.converged[0]) and abs(float(res.eigenvalues[0, 0]) - sign * 1.0) < 1e-2


def test_lanczos_error_bounds_respect_the_dtype_and_tol_below_it_is_raised():
    """float32 matvecs: error bounds are never below 10 eps |H| (the Ritz residual estimate alone
    goes to 1e-13 while the true error is 1e-8), and a tol finer than that is raised to it with a warning."""
    mats = spd_with_spectrum(torch.linspace(0.1, 2.0, 40), 0).unsqueeze(0).float()
    op = DenseOperator(mats)
    with pytest.warns(RuntimeWarning, match="below what torch.float32 matvecs resolve"):
        res = lanczos(op, k=2, tol=1e-10, max_iter=40)
    eps = torch.finfo(torch.float32).eps
    assert (res.error_bounds >= 10 * eps * 2.0 * (1 - 1e-6)).all()
    assert (res.eigenvalues[0].double() - torch.tensor([2.0, 2.0 - 1.9 / 39], dtype=torch.float64)).abs().max() <= res.error_bounds.max()


def test_lanczos_max_iter_below_the_minimum_steps_still_converges():
    """max_iter=6 (below the default minimum of 10 steps): a replica whose residual test passes
    within it is converged, as before the minimum."""
    op = DenseOperator(spd_with_spectrum([5.0] + torch.linspace(1.0, 0.1, 19).tolist(), 1).unsqueeze(0))
    res = lanczos(op, k=1, tol=1e-3, max_iter=6)
    assert bool(res.converged[0]) and abs(float(res.eigenvalues[0, 0]) - 5.0) < 5e-3


def test_float32_lanczos_stops_where_a_low_rank_krylov_space_runs_out():
    """A rank-6 operator in float32 (as a network with all but a few ReLUs dead is): its Krylov
    space runs out after 6 steps, and past that the coefficients are rounding noise, which
    continuing made grow to infinity (top-3 at 5e13, SLQ nodes at +-650; a trained MLP's lambda_max
    came back as 1e17). Breakdown is now detected at the matvecs' rounding level."""
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(4000, 6, generator=g, dtype=torch.float64))
    ev = torch.tensor([1.0, 0.5, 0.3, 0.1, -0.2, -0.4], dtype=torch.float64)
    op = DenseOperator(((U * ev) @ U.T).float().unsqueeze(0))
    top = lanczos(op, k=3, tol=1e-3, max_iter=100)
    assert bool(top.converged[0]) and (top.eigenvalues[0] - ev[:3]).abs().max() < 1e-5
    nodes = slq(op, num_steps=40, num_draws=2, seed=0).nodes
    assert float(nodes.max()) < 1 + 1e-5 and float(nodes.min()) > -0.4 - 1e-5


def test_a_replicas_density_does_not_depend_on_the_replicas_beside_it():
    """The default grid resolves the narrowest Ghorbani kernel, so a replica's density is the same
    function alone and beside a 40x wider spectrum, with Ghorbani's width (a 1000-point shared grid
    widened it: peak 22.5 alone, 10.3 beside the other)."""
    from fastcurv.solvers.slq import SpectralDensity

    gen = torch.Generator().manual_seed(0)
    nodes = torch.sort(torch.rand(1, 2, 20, generator=gen, dtype=torch.float64) * 3).values
    weights = torch.softmax(torch.randn(1, 2, 20, generator=gen, dtype=torch.float64), -1)
    alone = SpectralDensity(nodes, weights)
    both = SpectralDensity(torch.cat([nodes, nodes * 40 - 60]), torch.cat([weights, weights]))
    g1, d1 = alone.density()
    g2, d2 = both.density()
    s2 = 1e-5 * max(1.0, float(nodes.max() - nodes.min()))  # Ghorbani's kernel variance
    for g, d in ((g1, d1[0]), (g2, d2[0])):  # at grid points near 0.5 .. 2.5: the unwidened Ghorbani density
        at = torch.stack([torch.argmin((g - v).abs()) for v in torch.linspace(0.5, 2.5, 7, dtype=torch.float64)])
        ref = (weights[0].unsqueeze(-1) * torch.exp(-(g[at] - nodes[0].unsqueeze(-1)) ** 2 / (2 * s2))).sum(1).mean(0)
        torch.testing.assert_close(d[at], ref / (2 * torch.pi * s2) ** 0.5, rtol=1e-9, atol=1e-12)
    assert abs(float(torch.trapezoid(d2[0], g2)) - 1) < 1e-3 and abs(float(torch.trapezoid(d2[1], g2)) - 1) < 1e-3


@pytest.mark.parametrize("reorthogonalize", ["partial", "full"])
def test_lanczos_near_an_exhausted_krylov_space_stays_orthogonal(reorthogonalize):
    """A float32 MLP whose samples are all confidently right (P = 84, spectrum [-2e-6, 0.02]): the
    Krylov space nearly runs out, one Gram-Schmidt pass left the new vector mostly along the basis,
    and partial reorthogonalization went on to lambda_min -8.0 (betas 200 |H|). Heavy cancellation
    now gets a second pass."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 4))
    m = copy.deepcopy(base)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x = torch.randn(40, 5, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        z = base(x).topk(2, -1).values
        margin = z[:, 0] - z[:, 1]
        x = x[margin > margin.median() * 0.7]
        m[-1].weight.mul_(22 / margin.median()), m[-1].bias.mul_(22 / margin.median())
        y = m(x).argmax(-1)
    ev = torch.linalg.eigvalsh(dense_hessian(copy.deepcopy(m).double(), [(x.double(), y)]))
    op = fastcurv.HessianOperator([m], (x, y), backend="fused")
    low = lanczos(op, k=1, which="smallest", max_iter=120, tol=1e-4, seed=7, reorthogonalize=reorthogonalize)
    assert abs(float(low.eigenvalues[0, 0]) - float(ev[0])) < 1e-4 * float(ev[-1])
    nodes = slq(op, num_steps=60, num_draws=3, seed=6).nodes
    assert float(nodes.min()) >= float(ev[0]) - 1e-4 * float(ev[-1]) and float(nodes.max()) <= float(ev[-1]) * (1 + 1e-4)


@pytest.mark.parametrize("span", [0.0, 1e-6, 1e-3])
def test_density_of_a_narrow_spectrum_is_fast_and_integrates_to_one(span):
    """A confident model's Hessian spans 1e-5 while Ghorbani's kernel is 3e-3 wide: the default
    grid, spanning only the nodes, lost most of the mass (integral 0.125 at a span of 1e-3) and the
    windowed sum asked for 16 GB to 2e15 bytes. The grid now leaves room for the widest kernel."""
    from fastcurv.solvers.slq import SpectralDensity

    nodes = torch.linspace(0.3, 0.3 + span, 20, dtype=torch.float64).view(1, 1, 20).repeat(2, 1, 1)
    grid, dens = SpectralDensity(nodes, torch.full((2, 1, 20), 0.05, dtype=torch.float64)).density()
    assert grid.numel() <= 20_000
    torch.testing.assert_close(torch.trapezoid(dens, grid), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="sigma2 must be a positive"):
        SpectralDensity(nodes, torch.full((2, 1, 20), 0.05, dtype=torch.float64)).density(sigma2=0.0)


def test_plotting_a_density_to_a_file_leaves_no_figure_and_keeps_the_backend(svg_backend, tmp_path):
    """plot(path=...) switched the whole process to the Agg backend (matplotlib.use: a notebook's
    plt.show() and inline figures stopped working) and left its pyplot figure open (one more per call,
    and per study with "spectrum"; matplotlib warns at 20). Replica indices out of range raised torch's
    IndexError, and a negative one drew the last replica labelled "replica -1"."""
    import matplotlib.pyplot as plt

    from fastcurv.solvers.slq import SpectralDensity

    sd = SpectralDensity(torch.linspace(0.1, 2.0, 10, dtype=torch.float64).view(1, 1, 10).repeat(2, 1, 1),
                         torch.full((2, 1, 10), 0.1, dtype=torch.float64))
    open_before = plt.get_fignums()
    for i in range(2):
        ax = sd.plot(replicas=[0, -1], path=tmp_path / f"esd{i}.png")
    assert svg_backend.get_backend() == "svg"
    assert plt.get_fignums() == open_before
    assert (tmp_path / "esd1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["replica 0", "replica 1"]
    with pytest.raises(ValueError, match="replica 5 is out of range: the density has 2 replicas"):
        sd.plot(replicas=[5], path=tmp_path / "bad.png")
    ax = sd.plot()  # without a path: a pyplot figure, to show (the caller's to close)
    assert plt.get_fignums() == [*open_before, ax.figure.number]
    plt.close(ax.figure)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 1e-24, 1e-170, 1e25, 1e200])
def test_row_norms_neither_underflow_nor_overflow(dtype, scale):
    """torch's norm squares the entries in their own dtype: in float32 it returned 0 for entries
    of 1e-24 (a confident model's Hv, so Lanczos and power iteration stopped "converged" after one
    step) and inf for entries of 1e25; in float64 0 for entries of 1e-170."""
    from fastcurv.solvers._norms import row_norms

    if scale * 4 > torch.finfo(dtype).max or scale / 4 < torch.finfo(dtype).tiny:
        pytest.skip("entries outside the dtype's normal range")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 500, generator=g, dtype=torch.float64)
    base[1] = 0.0
    base[2, 1:] = 0.0  # one nonzero entry
    w = (base * scale).to(dtype)
    want = torch.linalg.vector_norm(w.double() / scale, dim=-1) * scale
    got = row_norms(w)
    assert got.dtype == dtype and got.shape == (3,)
    torch.testing.assert_close(got.double(), want, rtol=2 * torch.finfo(dtype).eps, atol=0)
    assert row_norms(w, keepdim=True).shape == (3, 1) and row_norms(w.unsqueeze(1)).shape == (3, 1)
    w[0, 7] = float("inf")
    assert row_norms(w)[0] == float("inf")


def _confident_mlp(target_margin):
    """A float32 ReLU MLP 6-8-3 and 40 samples labelled by its own argmax, all with nearly the same
    margin (0.264-0.274: about 10 samples carry the curvature, so the Hessian has several well
    separated eigenvalues), its head scaled so the median margin becomes ``target_margin``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 6, generator=g)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        out = m(x)
        top2 = out.topk(2, dim=1).values
        margin = top2[:, 0] - top2[:, 1]
        keep = (margin - margin.median()).abs().argsort()[:40]
        c = target_margin / float(margin.median())
        m[-1].weight.mul_(c)
        m[-1].bias.mul_(c)
    return m, x[keep], out[keep].argmax(1)


def test_solvers_on_a_confident_float32_model_match_float64(one_thread, recwarn):
    """A float32 MLP with per-sample loss 2e-27 (far above the 1.2e-38 where the loss underflows;
    the Hessian's products match float64 to 1e-5): its Hv entries, at most 3e-24, have squares
    below float32's smallest subnormal, and torch's float32 norm returned 0. Lanczos read that as
    an exhausted Krylov space: lambda_max 3.7e-24 for 7.0e-23 (top-2's second NaN), lambda_min
    +3.7e-24 for -1.15e-27 "converged", power iteration 3.7e-24 "converged" after one step, SLQ's
    largest node 3.0e-24; the gradient start (entries up to 1e-25, norm 2e-25) was taken for a
    zero vector. Now every solver matches the float64 run of the same weights."""
    m32, x, y = _confident_mlp(62.0)
    runs = {}
    for dtype in (torch.float32, torch.float64):
        m = copy.deepcopy(m32).to(dtype)
        op = fastcurv.HessianOperator([m], (x.to(dtype), y))
        loss, grad = op.loss_and_gradient()
        runs[dtype] = dict(
            loss=float(loss),
            top=lanczos(op, k=2, tol=1e-4),
            bottom=lanczos(op, k=1, which="smallest", tol=1e-4),
            grad_start=lanczos(op, k=1, tol=1e-4, v0=grad),
            power=power_iteration(op, tol=1e-4),
            slq=slq(op, num_steps=20).nodes.max(),
        )
    r32, r64 = runs[torch.float32], runs[torch.float64]
    assert 1e-28 < r64["loss"] < 1e-26
    assert not [w for w in recwarn.list if "v0 is zero" in str(w.message)]
    lmax = float(r64["top"].eigenvalues[0, 0])
    assert 6e-23 < lmax < 8e-23
    for key in ("top", "bottom", "grad_start", "power"):
        assert r32[key].converged.all() and r64[key].converged.all(), key
        torch.testing.assert_close(r32[key].eigenvalues, r64[key].eigenvalues, rtol=1e-4, atol=1e-5 * lmax, msg=key)
    torch.testing.assert_close(r32["slq"], r64["slq"], rtol=1e-4, atol=0)


def test_power_iteration_stops_on_an_absolute_change_below_1e_minus_6(one_thread):
    """The documented rule (PyHessian's): stop when the estimate moves by at most
    ``tol * (|lambda| + 1e-6)``, absolute below |lambda| = 1e-6. On the confident MLP above
    (lambda_max 7.0e-23, float64) it stops after two steps whatever ``tol``, 13% low, reported
    converged; its error bound, the residual, covers the error. (The README said "stopped moving
    by `tol`".)"""
    m, x, y = _confident_mlp(62.0)
    op = fastcurv.HessianOperator([m.double()], (x.double(), y))
    for tol in (1e-2, 1e-12):
        res = power_iteration(op, tol=tol)
        assert int(res.iterations[0]) == 2 and bool(res.converged[0])
        err = 7.0167e-23 - float(res.eigenvalues[0, 0])
        assert 0.1 * 7.0167e-23 < err <= float(res.error_bounds[0, 0])
