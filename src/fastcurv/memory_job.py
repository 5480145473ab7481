"""Measuring a ``batched_sharpness`` job or a :class:`fastcurv.HessianOperator` for the memory cost
model (:mod:`fastcurv.memory_model`): :func:`job_shape` reads the data once and runs one replica on
two samples to fill a :class:`~fastcurv.memory_model.JobShape`, :func:`plan_memory` turns it into a
plan, and the ``operator_*`` functions size an operator's own memory (its least bytes, its fused
state cache, the func backend's caps).

The backends, the operator and the measures are imported where used: they import
:mod:`fastcurv.memory`, which re-exports this module's names, so module-level imports of them would
be cycles.
"""
from __future__ import annotations

import dataclasses
import numbers

import torch

from .data import Batches, LoaderPass, _as_loader, _KeptBatches, target_dtype
from .memory_budget import format_bytes, parse_budget
from .memory_model import (BASIS_COPIES, PROBE_BATCH, SAFETY, STATE_COPIES, VECTOR_COPIES, JobShape, MemoryPlan,
                           _parts, choose, estimate_bytes)
from .solvers.lanczos import whole


def _stage_vectors(P, *, measures, max_iter, eig_solver, trace_method, trace_probes, top_k, slq_steps, slq_draws,
                   outputs=1):
    """(the most [P] vectors per replica alive in any solver stage, the most probes per matvec).
    ``outputs``: the model's outputs per sample (C), the vectors the exact trace back-propagates
    per sample in the probes' place."""
    from .sharpness import MEASURES

    measures = (measures,) if isinstance(measures, str) else tuple(measures)
    m = min(max_iter, P) + 1
    deflate = "trace" in measures and trace_method in ("auto", "deflated") and eig_solver == "lanczos"
    probes = 1
    stages = [VECTOR_COPIES]
    if "trace" in measures and trace_method == "exact":
        # no [P] probe vectors, but one backward pass of C vectors per sample: its tangents are
        # those of a C-probe matvec (FusedBackend.exact_trace chunks them as it chunks such a matvec)
        probes = max(probes, int(outputs))
    kept = 0
    if "top_k" in measures or "lambda_max" in measures or (deflate and trace_method == "deflated"):
        k = top_k if "top_k" in measures else 1
        if eig_solver == "lanczos":
            stages.append(BASIS_COPIES * m + VECTOR_COPIES + 2 * k)
            kept = m if deflate else 0
    if "lambda_min" in measures:
        stages.append(kept + 2 * m + VECTOR_COPIES)
    if "trace" in measures and trace_method != "exact":  # "auto" may deflate: planned as if it does
        tp = trace_probes if trace_probes is not None else (10 if deflate else 30)
        K = min(PROBE_BATCH, tp)
        probes = max(probes, K)
        if deflate or trace_method == "hutchinson":
            stages.append(kept + VECTOR_COPIES * K)
        else:
            stages.append(4 * (max(6, tp) // 3) + VECTOR_COPIES * K)
    if "spectrum" in measures:
        stages.append(kept + 2 * (min(slq_steps, P) + 1) + VECTOR_COPIES + 2 * slq_draws)
    if any(name not in MEASURES for name in measures):  # registered measures: K <= 10 probe batches assumed
        probes = max(probes, PROBE_BATCH)
        stages.append(kept + VECTOR_COPIES * PROBE_BATCH)
    return max(stages), probes


def _scan_data(data):
    """(first (x, y) pair, at most two samples of it; batch sizes; bytes of all batches) of a
    loader or one batch, read in one :class:`fastcurv.data.LoaderPass` (checked as the job's
    :class:`~fastcurv.data.Batches` will check them; empty batches skipped), or of a ``Batches``."""
    if isinstance(data, Batches):
        first = next(iter(data))[1:]
        nbytes = sum(x.numel() * x.element_size() + y.numel() * y.element_size() for _, x, y in data) if data.cached else 0
        return first, list(data.sizes), nbytes
    walk = LoaderPass(_as_loader(data))
    first, sizes, nbytes = None, [], 0
    for _, x, y in walk:
        if first is None:
            first = (x[:2], y[:2])
        sizes.append(int(x.shape[0]))
        nbytes += x.numel() * x.element_size() + y.numel() * y.element_size()
    if not sizes:
        raise walk.no_batches()
    return first, sizes, nbytes


def _activation_stats(rs, x) -> tuple[int, int, int]:
    """(sum of leaf-module output sizes, the widest output size, the model's output size) per
    sample, in elements (the inputs carry no tangent)."""
    total, widest = 0, 1
    hooks = []

    def hook(mod, inp, out):
        nonlocal total, widest
        if isinstance(out, torch.Tensor) and out.dim() > 0:
            per = out.numel() // max(1, out.shape[0])
            total += per
            widest = max(widest, per)

    for mod in rs.base.modules():
        if not list(mod.children()):
            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            # (copies of the buffers: a forward that updates one must not write into the set's)
            out = rs.call({n: t[0] for n, t in rs.params.items()}, {n: t[0].clone() for n, t in rs.buffers.items()}, x)
    finally:
        for h in hooks:
            h.remove()
    outputs = out.numel() // max(1, out.shape[0]) if isinstance(out, torch.Tensor) and out.dim() > 0 else 1
    return total, widest, max(1, int(outputs))


def _model_fields(rs, fused_backend, x, y, func_mode: str = "") -> tuple[dict, int]:
    """``(fields, outputs)``: the :class:`~fastcurv.memory_model.JobShape` fields that describe the
    model of ``rs`` under its backend (``fused_backend``: the fused backend, None for another;
    ``func_mode``: the func backend's mode, "" for another), measured on batch ``(x, y)`` (state
    bytes on all of it, activations on its first two samples), and the model's outputs per sample
    (C). ``job_shape`` and ``_operator_shape`` both describe models so."""
    x2 = x[:2]
    n1 = x2.shape[0]
    act, widest, outputs = _activation_stats(rs, x2)
    fused = fused_backend is not None
    if fused:
        layers = sum(1 for l in fused_backend.layers if l.kind in ("linear", "conv"))
    else:
        layers = sum(1 for mod in rs.base.modules() if not list(mod.children()))
    fields = dict(P=rs.P, itemsize=rs.dtype.itemsize,
                  state_per_sample=fused_backend.state_bytes_per_sample(x, y) if fused else 0,
                  act_per_sample=-(-act * rs.dtype.itemsize // n1) if n1 else 0, widest=widest, layers=layers,
                  fused=fused, gpu=rs.device.type == "cuda", func_mode=func_mode, func_costs={})
    if fused:
        fields.update(conv=fused_backend._maps is not None, chunk_bytes=fused_backend.chunk_bytes,
                      sample_chunk_bytes=fused_backend.sample_chunk_bytes)
    if func_mode:
        from .backends.func import memory_costs

        fields["func_costs"] = memory_costs(rs, x2, func_mode)
    return fields, outputs


def job_shape(models, data, *, measures=("lambda_max", "trace"), loss="cross_entropy", reduction="mean",
              loss_reduction=None, backend="auto", bn_mode="eval", max_iter=100, eig_solver="lanczos",
              trace_method="auto", trace_probes=None, top_k=5, slq_steps=60, slq_draws=1,
              backend_options=None, measure_options=None, common_random_numbers=True, **_ignored) -> tuple[JobShape, str]:
    """The :class:`~fastcurv.memory_model.JobShape` of a ``batched_sharpness`` job and the backend it
    will use. Reads the data once (sizes and bytes) and runs one replica on up to two samples (state
    and activation sizes). ``models`` are checked as ``batched_sharpness`` checks them
    (:func:`fastcurv.replicas.validate_models`)."""
    from .backends.fused import FusedBackend
    from .losses import Loss
    from .measures import unsplittable
    from .operator import select_backend
    from .replicas import ReplicaSet, validate_models

    models = validate_models(models)  # (a single model would be planned as its layers)
    rs = ReplicaSet(models[:1], bn_mode=bn_mode)
    (x, y), sizes, nbytes = _scan_data(data)
    lossobj = Loss(loss, reduction, loss_reduction)
    lossobj.num_samples = sum(sizes)
    x = x.to(rs.device, rs.dtype) if x.is_floating_point() else x.to(rs.device)
    y = y.to(rs.device, target_dtype(rs.dtype)) if y.is_floating_point() else y.to(rs.device)
    name, _ = select_backend(rs, backend, lossobj, (x, y))  # (the engine check, as the operator runs it)
    opts = dict(backend_options or {})
    fb, func_mode = None, ""
    if name == "fused":
        fb = FusedBackend(rs, lossobj, Batches((x, y), device=rs.device, dtype=rs.dtype, cache=True), **opts)
        if trace_method == "auto" and fb.exact_trace_support()[0]:
            trace_method = "exact"  # what "auto" will run: no probes
    elif name == "func":
        from .backends.func import resolve_mode

        func_mode = resolve_mode(rs, opts.get("mode", "auto"), bool(opts.get("compile", False)), x)
    fields, outputs = _model_fields(rs, fb, x, y, func_mode)
    stage, probes = _stage_vectors(rs.P, measures=measures, max_iter=max_iter, eig_solver=eig_solver,
                                   trace_method=trace_method, trace_probes=trace_probes, top_k=top_k,
                                   slq_steps=slq_steps, slq_draws=slq_draws, outputs=outputs)
    shape = JobShape(**fields, batch=max(sizes), num_samples=sum(sizes), data_bytes=nbytes, vectors=stage, probes=probes,
                     whole_batches=_whole_batches(rs, measures, measure_options), min_batch=2 if rs.batch_statistics else 1)
    _subspace_matrix(shape, rs, measures, measure_options, common_random_numbers)
    shape.unsplit = unsplittable({"measures": measures, "measure_options": measure_options,
                                  "common_random_numbers": common_random_numbers})
    shape.one_pass = isinstance(data, _KeptBatches)
    return shape, name


def _subspace_matrix(shape: JobShape, rs, measures, measure_options, common) -> None:
    """Fill in ``shape``'s epsilon_sharpness_subspace matrix fields (see
    :func:`~fastcurv.memory_model.matrix_bytes`)."""
    name = "epsilon_sharpness_subspace"
    if name not in ((measures,) if isinstance(measures, str) else tuple(measures)):
        return
    options = (measure_options or {}).get(name) or {}
    A = options.get("A")
    if isinstance(A, torch.Tensor) and A.dim() in (2, 3):
        shape.matrix_p = max(1, int(A.shape[-1]))
        shape.matrix_shared = A.dim() == 2 or A.shape[0] == 1
        # (the measure works in at least float32: memory_model._matrix_itemsize)
        same = A.dtype == torch.promote_types(rs.dtype, torch.float32) and A.device == torch.device(rs.device)
        shape.matrix_injected = 0 if same else A.numel() * max(shape.itemsize, 4)
        return
    # whole floats (a JSON config's p=2000.0) as the measure takes them (batched_sharpness's _whole_options)
    p, n_iter, mx = (whole(options.get(k, d)) for k, d in (("p", 1000), ("n_iter", 10), ("max_matrix_bytes", None)))
    if isinstance(p, bool) or not isinstance(p, numbers.Integral) or p < 1:
        return  # (the measure refuses it)
    shape.matrix_p = min(int(p), shape.P)
    shape.matrix_shared = bool(common)
    if isinstance(n_iter, numbers.Integral) and not isinstance(n_iter, bool) and n_iter >= 0:
        shape.matrix_products = 2 * (int(n_iter) + 1) + 1
    shape.matrix_max = int(mx) if isinstance(mx, numbers.Integral) and not isinstance(mx, bool) else None


def _whole_batches(rs, measures, measure_options) -> str:
    """Why a job's results depend on its batches (so that a memory plan must not split them), or "".
    The loss is none: every batch's share is a sum of per-sample terms (a callable's "mean" is taken
    as one over the samples, see :mod:`fastcurv.losses`; torch's class-weighted ``CrossEntropyLoss``
    and ``NLLLoss`` are summed and divided by their W, counted over all the data)."""
    if rs.batch_statistics:
        return ("batch-statistics BatchNorm (bn_mode='batch' or track_running_stats=False) normalizes each batch by its "
                "own statistics")
    options = measure_options or {}
    names = [m for m in ((measures,) if isinstance(measures, str) else measures)
             if m in ("rho_sharpness", "adaptive_rho_sharpness") and (options.get(m) or {}).get("per_batch", True)]
    if names:
        return f"{' and '.join(names)} take each batch's worst case (per_batch=True)"
    return ""


def plan_memory(models, data, budget, **job) -> MemoryPlan:
    """The :class:`~fastcurv.memory_model.MemoryPlan` for ``batched_sharpness(models, data, memory_budget=budget, **job)``
    (``job``: its keywords; ``cache_data`` other than "auto" is kept). ``models`` are checked as
    ``batched_sharpness`` checks them: a single model, say, is refused, not planned as its layers."""
    from .replicas import validate_models

    models = validate_models(models)
    R = len(models)
    device = next(models[0].parameters()).device
    nbytes = parse_budget(budget, device)
    shape, name = job_shape(models, data, **job)
    cache_data = job.get("cache_data", "auto")
    plan = choose(shape, R, nbytes, cache_data=None if cache_data == "auto" else bool(cache_data))
    plan.backend = name
    return plan


def _operator_shape(name, backend, batches, probes) -> JobShape:
    """The :class:`~fastcurv.memory_model.JobShape` of a :class:`fastcurv.HessianOperator`'s own
    memory (no solver vectors: the probes are the caller's) with backend ``name``."""
    _, x, y = next(iter(batches))
    fused = name == "fused"
    fields, outputs = _model_fields(backend.replicas, backend if fused else None, x, y,
                                    backend.mode if name == "func" else "")
    if fused and backend.exact_trace_support()[0]:  # exact_trace() back-propagates C = outputs vectors per sample
        probes = max(probes, outputs)
    # (the batches' bytes that are the operator's own, not the caller's tensors, which it only reads)
    return JobShape(**fields, batch=max(batches.sizes), num_samples=batches.num_samples, data_bytes=batches.owned_bytes,
                    vectors=0, probes=probes)


def operator_least_bytes(name, backend, batches, *, probes: int = PROBE_BATCH) -> dict:
    """The least a :class:`fastcurv.HessianOperator` with backend ``name`` needs
    (:func:`~fastcurv.memory_model.estimate_bytes`' parts): its stacked parameters, the batches it
    owns, and one batch's transients for ``probes`` probes per matvec. fused: no cached state,
    tangents for the probes (or, where :meth:`exact_trace` applies, for the model's C outputs if
    more); func: no reused graphs, its products one unit at a time (one replica's graph; mode
    "forward": one replica and probe); autograd: one replica, batch and probe at a time (how it
    always runs)."""
    shape = _operator_shape(name, backend, batches, probes)
    R = backend.replicas.R
    if name in ("fused", "func"):
        return estimate_bytes(shape, R, cache_bytes=0)
    parts = estimate_bytes(shape, R)  # autograd: its graphs are one replica's, for one probe
    parts["batch_transient"] = estimate_bytes(dataclasses.replace(shape, probes=1), 1)["batch_transient"]
    parts["total"] = sum(v for k, v in parts.items() if k != "total")
    return parts


def operator_cache_bytes(backend, batches, budget, *, probes: int = PROBE_BATCH) -> int:
    """``cache_bytes`` for a fused ``backend`` of a :class:`fastcurv.HessianOperator` with a
    ``memory_budget``: what is left of ``SAFETY * budget`` after the operator's own memory
    (:func:`operator_least_bytes`: its stacked parameters, the cached batches, one batch's
    transients and tangents for ``probes`` probes per matvec, or for the model's C outputs where
    :meth:`exact_trace` applies, if more), divided by ``STATE_COPIES``. Raises ValueError when
    nothing is left."""
    nbytes, need = _checked_operator_budget("fused", backend, batches, budget, probes)
    return int((SAFETY * nbytes - need["total"]) // STATE_COPIES)


def check_operator_budget(name, backend, batches, budget, *, probes: int = PROBE_BATCH) -> int:
    """Raise ValueError when ``budget`` (times ``SAFETY``) is less than what a
    :class:`fastcurv.HessianOperator` with backend ``name`` needs at least
    (:func:`operator_least_bytes`); else return the budget in bytes."""
    return _checked_operator_budget(name, backend, batches, budget, probes)[0]


def _checked_operator_budget(name, backend, batches, budget, probes) -> tuple[int, dict]:
    """``(budget in bytes, operator_least_bytes)``, or the ValueError of :func:`check_operator_budget`."""

    nbytes = parse_budget(budget, backend.replicas.device)
    need = operator_least_bytes(name, backend, batches, probes=probes)
    if need["total"] > SAFETY * nbytes:
        what = {"fused": "without any cached state ", "func": "without reused graphs, one replica's products at a time ",
                "autograd": "running one replica, batch and probe at a time "}.get(name, "")
        raise ValueError(f"memory_budget={format_bytes(nbytes)} is too small for this operator: it needs about "
                         f"{format_bytes(need['total'] / SAFETY)} {what}({_parts(need)}); use fewer replicas, smaller "
                         "batches or a larger budget")
    return nbytes, need


def func_bytes_caps(budget, device) -> dict:
    """``reuse_bytes`` and ``work_bytes`` of a func backend under ``memory_budget``: each at most
    half of ``SAFETY * budget`` (reused graphs or linearizations and one chunk's temporaries are alive
    together), and at most the backend's defaults."""
    from .backends.func import DEFAULT_REUSE_BYTES, DEFAULT_WORK_BYTES

    half = max(1, int(SAFETY * parse_budget(budget, device)) // 2)
    return {"reuse_bytes": min(DEFAULT_REUSE_BYTES, half), "work_bytes": min(DEFAULT_WORK_BYTES, half)}
