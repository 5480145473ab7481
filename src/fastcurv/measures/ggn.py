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
@register_measure("ggn_lambda_max", replica_noise=False, options=("max_iter", "tol"))
def ggn_lambda_max(op, *, seed, common, **options):
    return _lambda_max("ggn", op, seed, common, **options)


@register_measure("ggn_trace", replica_noise=False, options=("num_matvecs",))
def ggn_trace(op, *, seed, common, **options):
    return _trace("ggn", op, seed, common, **options)


@register_measure("fisher_lambda_max", replica_noise=False, options=("max_iter", "tol"))
def fisher_lambda_max(op, *, seed, common, **options):
    return _lambda_max("fisher", op, seed, common, **options)


@register_measure("fisher_trace", replica_noise=False, options=("num_matvecs",))
def fisher_trace(op, *, seed, common, **options):
    return _trace("fisher", op, seed, common, **options)
