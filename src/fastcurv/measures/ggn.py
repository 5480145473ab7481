"""Top eigenvalue and trace of the generalized Gauss-Newton and the empirical Fisher
(:mod:`fastcurv.curvature`), with the same solvers as the Hessian measures.

Measures: ``ggn_lambda_max``, ``ggn_trace``, ``fisher_lambda_max``, ``fisher_trace``. Options:
``max_iter`` (100), ``tol`` (1e-3) for Lanczos; ``num_matvecs`` (30) for Hutch++. These are set
in ``measure_options`` only: ``batched_sharpness``'s own ``tol`` and ``max_iter`` (the Hessian's
eigen-solves) do not reach them, e.g. ``measure_options={"ggn_lambda_max": {"tol": 1e-4}}``.
Units: those of the Hessian (loss per squared parameter unit). Not reparameterization-invariant.
"""
from __future__ import annotations

from . import MeasureValue, register_measure


def _op(kind, op):
    from ..curvature import EmpiricalFisherOperator, GGNOperator

    return (GGNOperator if kind == "ggn" else EmpiricalFisherOperator).like(op)


def _lambda_max(kind, op, seed, common, max_iter=100, tol=1e-3):
    from ..solvers import lanczos

    sub = _op(kind, op)
    res = lanczos(sub, k=1, max_iter=max_iter, tol=tol, seed=seed, common=common)
    op.failed |= sub.failed
    return {f"{kind}_lambda_max": MeasureValue(res.eigenvalues[:, 0].clone(), None, res.converged.clone())}


def _trace(kind, op, seed, common, num_matvecs=30):
    from ..solvers import hutchpp

    sub = _op(kind, op)
    res = hutchpp(sub, num_matvecs=num_matvecs, seed=seed + 1, common=common)
    op.failed |= sub.failed
    return {f"{kind}_trace": MeasureValue(res.trace.clone(), res.stderr.clone(), None)}


# replica_noise=False: the solvers key independent probes by the replica's number in the job
@register_measure("ggn_lambda_max", replica_noise=False)
def ggn_lambda_max(op, *, seed, common, max_iter: int = 100, tol: float = 1e-3):
    """Column ``ggn_lambda_max``: the top eigenvalue of each replica's generalized Gauss-Newton
    matrix (:class:`fastcurv.GGNOperator`) by Lanczos, with ``max_iter`` matvecs at most and
    relative accuracy ``tol`` (options of its own, not batched_sharpness's)."""
    return _lambda_max("ggn", op, seed, common, max_iter=max_iter, tol=tol)


@register_measure("ggn_trace", replica_noise=False)
def ggn_trace(op, *, seed, common, num_matvecs: int = 30):
    """Column ``ggn_trace`` (with a standard error): the trace of each replica's generalized
    Gauss-Newton matrix by Hutch++ with a budget of ``num_matvecs`` matvecs (at least 6)."""
    return _trace("ggn", op, seed, common, num_matvecs=num_matvecs)


@register_measure("fisher_lambda_max", replica_noise=False)
def fisher_lambda_max(op, *, seed, common, max_iter: int = 100, tol: float = 1e-3):
    """Column ``fisher_lambda_max``: the top eigenvalue of each replica's empirical Fisher matrix
    (:class:`fastcurv.EmpiricalFisherOperator`) by Lanczos, with ``max_iter`` matvecs at most and
    relative accuracy ``tol`` (options of its own, not batched_sharpness's)."""
    return _lambda_max("fisher", op, seed, common, max_iter=max_iter, tol=tol)


@register_measure("fisher_trace", replica_noise=False)
def fisher_trace(op, *, seed, common, num_matvecs: int = 30):
    """Column ``fisher_trace`` (with a standard error): the trace of each replica's empirical
    Fisher matrix by Hutch++ with a budget of ``num_matvecs`` matvecs (at least 6)."""
    return _trace("fisher", op, seed, common, num_matvecs=num_matvecs)
