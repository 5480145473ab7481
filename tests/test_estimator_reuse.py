"""Reusing a batched_sharpness result (invariance_audit's ``before``, the study's audit): the
measure set chooses the solver runs, recorded in ``SharpnessResult.estimator``, and a result made by
other runs is not reused."""
import copy
import warnings

import pytest
import torch
from torch import nn

import fastcurv
from fastcurv.sharpness import estimator_plan, reuse_refusal
from models import mlp, replicas


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _job(R=4):
    ms = replicas(lambda: mlp(nn.Tanh, (6, 5, 3)), R)  # (tanh: no exact trace, so the measures pick the estimator)
    g = torch.Generator().manual_seed(100)
    data = torch.randn(30, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (30,), generator=g)
    return ms, data


def _identity(models):
    return [copy.deepcopy(m) for m in models]


KW = dict(max_iter=40, progress=False, backend="func")


@pytest.mark.parametrize("before_measures, audit_measures", [
    (("lambda_max", "trace", "top_k"), ("lambda_max", "trace")),  # top_k: a 5-eigenvalue Lanczos run
    (("lambda_max", "trace"), ("trace",)),  # the trace alone: Hutch++ instead of the deflated estimator
])
def test_a_before_from_other_solver_runs_is_refused(before_measures, audit_measures):
    """invariance_audit(before=...) compared only the settings, not the measures that had chosen the
    solver runs: with an identity transform (every ratio exactly 1) the trace ratios were 0.77-1.07
    with a before computed with top_k, and 0.93-1.50 for an audit of the trace alone with a before
    of lambda_max and trace, both reported "not invariant". Such a before is now refused."""
    ms, data = _job()
    before = fastcurv.batched_sharpness(ms, data, measures=before_measures, **KW)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the transform changed nothing: said, and meant)
        with pytest.raises(ValueError, match="before cannot be reused: its values come from other solver runs"):
            fastcurv.invariance_audit(ms, data, measures=audit_measures, transform=_identity, before=before, **KW)
        # the same measures: reused, and the no-op reads as exactly invariant
        same = fastcurv.batched_sharpness(ms, data, measures=audit_measures, **KW)
        audit = fastcurv.invariance_audit(ms, data, measures=audit_measures, transform=_identity, before=same, **KW)
    assert (audit.table.loc["trace", ["ratio_min", "ratio_max"]] == 1.0).all()
    assert audit.table.loc["trace", "invariant"]


def test_the_estimator_records_the_runs_the_job_made():
    """The recorded runs are those the job made (the trace method as used), unchunked or chunked,
    and estimator_plan predicts them from the measures."""
    ms, data = _job(3)
    for measures, k, kept, method in ((("lambda_max", "trace", "top_k"), 5, True, "deflated"),
                                      (("trace",), None, None, "hutch++"),
                                      (("lambda_max",), 1, False, None)):
        for chunk in (None, 2):
            res = fastcurv.batched_sharpness(ms, data, measures=measures, replica_chunk=chunk, **KW)
            assert res.estimator.get("top_eigen_k") == k and res.estimator.get("top_eigen_basis_kept") == kept
            assert res.estimator.get("trace_estimator") == method == (res.trace_method or None)
            assert res.estimator == estimator_plan(measures, exact=False)
            assert reuse_refusal(res, measures) == ""


def test_an_exact_trace_does_not_depend_on_the_other_measures():
    """With the exact trace (a ReLU MLP on the fused engine) lambda_max's Lanczos run keeps no basis,
    so a before of lambda_max and trace stands for an audit of either alone."""
    ms = replicas(lambda: mlp(nn.ReLU, (6, 5, 3)), 2)
    g = torch.Generator().manual_seed(1)
    data = torch.randn(20, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (20,), generator=g)
    res = fastcurv.batched_sharpness(ms, data, measures=("lambda_max", "trace"), max_iter=30, progress=False)
    if res.trace_method != "exact":
        pytest.skip(f"no exact trace here ({res.trace_reason})")
    assert res.estimator == {"top_eigen_k": 1, "top_eigen_basis_kept": False, "trace_estimator": "exact",
                             "trace_probes": None}
    assert reuse_refusal(res, ("trace",)) == "" and reuse_refusal(res, ("lambda_max",)) == ""


def test_a_result_without_recorded_runs_is_refused_where_they_matter():
    """A result read from a results file written before the runs were recorded (estimator None)
    cannot be checked: refused for the Hessian's measures, accepted for the others."""
    ms, data = _job(2)
    res = fastcurv.batched_sharpness(ms, data, measures=("lambda_max",), **KW)
    res.estimator = None
    assert "does not record" in reuse_refusal(res, ("lambda_max",))
    assert reuse_refusal(res, ("lambda_min",)) == ""


def test_the_results_file_keeps_the_runs(tmp_path):
    """A chunked job's results go through its records: the runs come back from them, and from the
    file on a rerun; records that disagree or lack them give None."""
    from fastcurv.results_file import merge_records, to_record

    ms, data = _job(2)
    out = tmp_path / "r.jsonl"
    first = fastcurv.batched_sharpness(ms, data, measures=("lambda_max", "trace"), output=out, replica_chunk=1, **KW)
    again = fastcurv.batched_sharpness(ms, data, measures=("lambda_max", "trace"), output=out, replica_chunk=1, **KW)
    assert first.estimator == again.estimator == estimator_plan(("lambda_max", "trace"), exact=False)
    one = fastcurv.batched_sharpness(ms[:1], data, measures=("lambda_max", "trace"), **KW)
    rec = to_record(one, 0, 1)
    other = {**to_record(one, 1, 2), "estimator": {**one.estimator, "trace_probes": 30}}
    assert merge_records([rec, other], 2).estimator is None
    old = {k: v for k, v in to_record(one, 1, 2).items() if k != "estimator"}
    assert merge_records([rec, old], 2).estimator is None


def test_the_study_audit_reuses_only_results_of_the_same_runs(monkeypatch):
    """fastcurv.study gave its audit the curvature results of its measures whenever the audit's were
    among them: with top_k among them (or audit measures without lambda_max) the "before" came from
    other solver runs, and a no-op rescaling (alpha ~ 1) gave trace ratios 1.002-1.014 instead of 1.
    Now the audit computes its own before then, and still reuses a result of the same runs."""
    import fastcurv.audit

    seen = []
    real = fastcurv.audit.invariance_audit

    def spy(*args, before=None, **kwargs):
        seen.append(before)
        return real(*args, before=before, **kwargs)

    monkeypatch.setattr(fastcurv, "invariance_audit", spy)
    job = dict(data="digits", replicas=2, epochs=1, hidden=(6,), activation="tanh", n_boot=5, out=None,
               progress=False, verbose=False, threads=1, audit_replicas=None, sharpness_kwargs={"max_iter": 20})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = fastcurv.study(measures=("lambda_max", "trace", "top_k"), audit_alpha=1.0 + 1e-9, **job)
        assert seen[-1] is None  # (top_k: other runs; the audit computed its own)
        assert r["audit"].table.loc["trace", ["ratio_min", "ratio_max"]].tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
        fastcurv.study(measures=("lambda_max", "trace"), **job)
        assert seen[-1] is not None  # (the same runs: reused)
