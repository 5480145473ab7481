"""``function_measures``: function-space measures for every replica from one pass over the data."""
from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field

import torch

from .._heap import reusing_heap
from ..ambient import resetting_ambient
from ..operator import as_replica_set
from ..ops.agreement_counts import agreement_counts
from ..replicas import ReplicaSet
from ..solvers.lanczos import whole_count
from ..solvers.probes import as_seed
from . import pairwise, simplicity, weakness
from .predictions import collect_predictions

MEASURES = ("disagreement", "gde", "soft", "weakness", "perturbation_weakness", "simplicity")
DEFAULT_MEASURES = ("disagreement", "gde", "weakness", "simplicity")


@dataclass
class FunctionMeasuresResult:
    """Per-replica results of :func:`function_measures`.

    values: ``{column: float64 [R]}``. pairwise: ``{name: float64 [R, R]}`` (``disagreement``,
    ``js``, ``tv``, ``l2``; and the counts ``agree``/``both_correct``/``both_wrong_same``/
    ``both_wrong_different``, exact integers held as float64 so that they can be NaN).
    summary: scalars (``gde_estimate``, ``mean_test_error``, ...). ok: ``[R]`` False for replicas
    with non-finite weights or outputs (their values, and their rows and columns of every pairwise
    matrix, are NaN; they are left out of every other replica's means).
    flags: one string per replica (empty when all is well).
    num_examples: M, the examples of ``data`` the measures were computed on.
    seconds: wall-clock time of the computation.
    """

    values: dict = field(default_factory=dict)
    pairwise: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    ok: torch.Tensor | None = None
    flags: list = field(default_factory=list)
    num_examples: int = 0
    seconds: float = 0.0

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.values[name]

    def __repr__(self):
        return f"FunctionMeasuresResult(R={len(self.flags)}, M={self.num_examples}, measures=[{', '.join(self.values)}])"

    def to_pandas(self):
        """One row per replica: every measure column, ``ok`` and ``flags``."""
        import pandas as pd

        df = pd.DataFrame({"replica": range(len(self.flags))})
        for name, v in self.values.items():
            df[name] = v.numpy()
        df["ok"] = self.ok.numpy()
        df["flags"] = self.flags
        return df.set_index("replica")


def _nan_rows(mat: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``mat`` ``[R, R]`` as float64 with NaN in the rows and columns of the replicas not ``ok``."""
    mat = mat.double().clone()
    mat[~ok] = float("nan")
    mat[:, ~ok] = float("nan")
    return mat


def _as_float(v) -> float:
    """``v`` (a number or a one-element tensor or array) as a float; NaN for anything else (a bool too)."""
    if isinstance(v, bool):
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError, RuntimeError):
        return math.nan


@resetting_ambient  # inference mode and autocast off (see fastcurv.ambient)
@reusing_heap  # one heap_reuse for the whole job (leaving it trims the heap: 12 ms each time)
def function_measures(
    models,
    data,
    *,
    measures=DEFAULT_MEASURES,
    soft=pairwise.SOFT,
    taus=(0.01, 0.05, 0.1, 0.25, 0.5),
    tau_modes=("relative", "absolute"),
    perturb_sigmas=(0.01, 0.05, 0.1),
    delta: float = 0.01,
    num_draws: int = 8,
    bisect_steps: int = 12,
    sigma_max: float = 8.0,
    probe_size: int = 512,
    codecs=simplicity.CODECS,
    pacbayes_sigma: float | None = None,
    num_train: int | None = None,
    init_models=None,
    bn_mode: str | None = None,
    seed: int = 0,
    probs_dtype: torch.dtype | None = None,
    max_rows: int = 1 << 19,
) -> FunctionMeasuresResult:
    """Function-space measures of R replicas, all replicas evaluated together.

    Args:
        models: list of R replicas of one architecture (or a :class:`fastcurv.ReplicaSet`) whose
            outputs are logits ``[batch, K]`` with K >= 2 classes: every measure compares predicted
            classes, so models with one output (regressors) raise a ValueError on the first forward,
            before any measure runs.
        data: a loader yielding inputs or ``(inputs, targets)``, or one such batch. Use the test
            set (targets optional: disagreement needs none).
        measures: any of
            "disagreement": column ``disagreement``, each replica's mean prediction disagreement
            with the others; ``pairwise["disagreement"]`` and ``pairwise["agree"]`` (counts).
            "gde": ``summary["gde_estimate"]`` = mean pairwise disagreement, Jiang et al.'s
            estimate of the mean test error; with targets also the column ``test_error``,
            ``summary["mean_test_error"]`` and the per-pair counts both_correct /
            both_wrong_same / both_wrong_different in ``pairwise``.
            "soft": columns ``js``, ``tv``, ``l2`` (mean over the other replicas of the mean over
            examples of Jensen-Shannon divergence in nats, total variation, L2 distance of the
            softmax outputs) and their ``[R, R]`` matrices (``soft`` selects a subset). Costs
            ``R^2 M K`` and keeps the probabilities ``[R, M, K]`` in memory.
            "weakness": permission-profile log-weakness (bits per input) for every tau in
            ``taus`` and mode in ``tau_modes`` (columns ``weakness_rel_tau0.1`` ...) and
            ``mean_entropy`` (nats); see :mod:`fastcurv.function.weakness`.
            "perturbation_weakness": on the first ``probe_size`` inputs, ``perturb_weakness_sigma<s>``
            (fraction of ``num_draws`` multiplicative perturbations leaving every prediction
            unchanged) for s in ``perturb_sigmas``, and ``perturb_sigma_star`` (bisected noise
            where agreement falls to ``1 - delta``).
            "simplicity": ``compressed_bytes_<codec>`` (8-bit quantised weights), ``sq_weight_norm``,
            ``pacbayes_mag_kl`` and the ``pacbayes_mag_sigma`` it uses (``pacbayes_sigma`` when
            given: finite and > 0, else a ValueError; else bisected magnitude-aware noise where
            probe accuracy drops by 0.1, or agreement falls to 0.9 without targets). ``num_train``
            (the training set's size, an integer >= 1, whole floats too, else a ValueError;
            default None: the examples in ``data``) and ``init_models`` (default: zero init; a list
            of R replicas or a ReplicaSet) enter the KL term.
        soft, taus, tau_modes, perturb_sigmas, codecs: sequences; a single value stands for a
            one-element sequence (as for ``measures``).
        probe_size: a positive integer when a probe is needed (perturbation weakness; simplicity
            without ``pacbayes_sigma``). sigma_max: upper end of the noise bisections, > 0.
            num_draws, bisect_steps, probe_size: positive integers (whole floats, a JSON or YAML
            config's ``8.0``, too).
        bn_mode: "eval" (BatchNorm running statistics) or "batch" (each batch's statistics), as in
            :class:`fastcurv.HessianOperator`; default (None): "eval" for a list, a ReplicaSet's
            own mode for a ReplicaSet (another mode than its own raises a ValueError). With
            "batch", the perturbed passes run the probe as one batch (its own statistics) and
            compare with the unperturbed predictions under the same statistics.
        seed: seeds the perturbation draws (the same draws for every replica shape, and for every
            bisection step: common random numbers).
        probs_dtype: the dtype of the softmax probabilities "soft" keeps (``[R, M, K]``; default:
            float64 for float64 models, else float32): e.g. ``torch.float16`` halves their memory,
            at the cost of the precision of JS, TV and L2. The other measures keep none.
        max_rows: at most this many replica x example rows per forward call, the perturbed passes
            included (replicas and examples are chunked; the results do not depend on it). With
            batch statistics (``bn_mode="batch"``) a batch, and the probe, is never split.

    Half precision: the perturbed passes (perturbation weakness, the bisected ``pacbayes_mag_sigma``)
    run float16/bfloat16 models on float32 copies of their parameters, buffers and probe inputs
    (the models are not changed), compared with the float32 forward's own predictions on the probe
    (:func:`fastcurv.function.weakness.working_precision`): in their own dtype the noise rounded
    away below the rounding unit. Their values are those of the same weights as float32 models;
    the other measures evaluate the models in their own dtype.

    Called inside ``torch.no_grad()``, ``torch.inference_mode()`` or ``torch.autocast(...)``, the
    measures are computed as outside: grad mode on, in the models' own dtype (fastcurv leaves
    autocast regions); the caller's settings are left as they were (:mod:`fastcurv.ambient`).
    Data made under ``torch.inference_mode`` is taken as any other.
    """
    if isinstance(measures, str):
        measures = (measures,)
    unknown = [m for m in measures if m not in MEASURES]
    if unknown:
        raise ValueError(f"unknown measures {unknown}; available: {MEASURES}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    num_draws, bisect_steps = whole_count("num_draws", num_draws), whole_count("bisect_steps", bisect_steps)
    if not 0 < sigma_max < math.inf:
        raise ValueError(f"sigma_max must be positive and finite, got {sigma_max}")
    need_probe = "perturbation_weakness" in measures or ("simplicity" in measures and pacbayes_sigma is None)
    if isinstance(probe_size, float) and probe_size.is_integer():
        probe_size = int(probe_size)
    if need_probe and (isinstance(probe_size, bool) or not isinstance(probe_size, numbers.Integral) or probe_size < 1):
        raise ValueError(f"probe_size must be a positive integer for perturbation_weakness and the bisected "
                         f"pacbayes_mag_sigma, got {probe_size!r}")
    if isinstance(perturb_sigmas, (str, numbers.Real)):
        perturb_sigmas = (perturb_sigmas,)
    if pacbayes_sigma is not None and not 0 < _as_float(pacbayes_sigma) < math.inf:  # (0 gave an inf KL term, < 0 NaN)
        raise ValueError(f"pacbayes_sigma must be positive and finite (or None: bisected), got {pacbayes_sigma!r}")
    if num_train is not None:  # (0 fell back to the test set's size; a negative one gave a NaN KL term)
        num_train = whole_count("num_train", num_train)
    seed = as_seed(seed)
    t0 = time.perf_counter()
    rs = as_replica_set(models, bn_mode)
    R = rs.R
    acc = weakness.PermissionWeakness(R, taus, tau_modes) if "weakness" in measures else None
    preds = collect_predictions(rs, data, keep_probs="soft" in measures, probs_dtype=probs_dtype,
                                accumulators=(acc,) if acc else (), probe_size=int(probe_size) if need_probe else 0,
                                max_rows=max_rows)
    ok = preds.finite.clone()
    M = preds.num_examples
    out = FunctionMeasuresResult(num_examples=M)
    V = out.values

    if "disagreement" in measures or "gde" in measures:
        D, A = pairwise.disagreement_matrix(preds.labels)
        out.pairwise["agree"] = _nan_rows(A, ok)
        out.pairwise["disagreement"] = _nan_rows(D, ok)
        if "disagreement" in measures:
            V["disagreement"] = pairwise.mean_over_others(D, ok)
        if "gde" in measures:
            out.summary["gde_estimate"] = pairwise.mean_off_diagonal(D, ok)
            if preds.targets is not None:
                counts = agreement_counts(preds.labels, preds.targets.to(torch.int32))
                err = 1.0 - counts.correct.double() / M
                V["test_error"] = err
                out.summary["mean_test_error"] = float(err[ok].mean()) if ok.any() else float("nan")
                for name in ("both_correct", "both_wrong_same", "both_wrong_different"):
                    out.pairwise[name] = _nan_rows(getattr(counts, name), ok)
    if "soft" in measures:
        mats = pairwise.soft_matrices(preds.probs, soft)
        for name, mat in mats.items():
            V[name] = pairwise.mean_over_others(mat, ok)
            out.pairwise[name] = _nan_rows(mat, ok)
    if acc is not None:
        V.update(acc.results())

    probe = preds.probe_inputs
    probe_ref = preds.labels[:, : probe.shape[0]] if probe is not None else None
    # the replicas the perturbed passes run: float16/bfloat16 ones as float32 copies (weakness.working_precision),
    # compared with the float32 forward's own labels (the half-precision ones differ where logits nearly tie);
    # with batch statistics, compared with the labels under the probe's statistics, which the perturbed passes
    # use (the pass over the data normalized each batch by its own)
    prs, probe = (rs, probe) if probe is None else weakness.working_precision(rs, probe)
    if probe is not None and (prs is not rs or rs.batch_statistics):
        probe_ref = weakness.reference_labels(prs, probe, max_rows)
    sat = {}  # column -> [R] bool: its noise bisection did not bracket the crossing
    if "perturbation_weakness" in measures:
        for s in map(float, perturb_sigmas):
            _, unchanged = weakness.perturbation_agreement(prs, probe, probe_ref,
                                                           torch.full((R,), s, dtype=torch.float64),
                                                           num_draws=num_draws, seed=seed, max_rows=max_rows)
            V[f"perturb_weakness_sigma{s:g}"] = unchanged
        agree = torch.full((R,), 1.0 - delta, dtype=torch.float64)
        star, sat_star = weakness.bisect_sigma(prs, probe, probe_ref, agree, num_draws=num_draws, seed=seed + 1,
                                               steps=bisect_steps, sigma_max=sigma_max, max_rows=max_rows)
        V["perturb_sigma_star"] = star
        sat["perturb_sigma_star"] = sat_star
    if "simplicity" in measures:
        V.update(simplicity.compressed_sizes(rs.params, rs.finite, codecs))
        flat = rs.flat_params()
        V["sq_weight_norm"] = simplicity.sq_weight_norm(flat)
        if pacbayes_sigma is not None:
            sig = torch.full((R,), float(pacbayes_sigma), dtype=torch.float64)
        else:
            tg = preds.targets[: probe.shape[0]] if preds.targets is not None else None
            if tg is not None:
                base = (probe_ref.long() == tg[None]).double().mean(1)
                target = base - 0.1
            else:
                target = torch.full((R,), 0.9, dtype=torch.float64)
            sig, sat_sig = weakness.bisect_sigma(prs, probe, probe_ref, target, num_draws=num_draws, seed=seed + 2,
                                                 steps=bisect_steps, sigma_max=sigma_max, kind="magnitude", targets=tg,
                                                 max_rows=max_rows)
            sat["pacbayes_mag_sigma"] = sat_sig
        init = None
        if init_models is not None:  # (only their parameters are read: no BatchNorm mode to match)
            init = (init_models if isinstance(init_models, ReplicaSet) else ReplicaSet(init_models)).flat_params()
        V["pacbayes_mag_sigma"] = sig
        V["pacbayes_mag_kl"] = simplicity.pacbayes_mag_kl(flat, sig, M if num_train is None else num_train, init)

    for name in V:
        V[name] = V[name].double().cpu()
        V[name][~ok] = float("nan")
    out.ok = ok
    flags = []
    for r in range(R):
        f = []
        if not bool(rs.finite[r]):
            f.append("non-finite parameters")
        elif not bool(ok[r]):
            f.append("non-finite outputs")
        else:
            f += [f"{col}'s noise bisection not bracketed in [sigma_max * 2^-20, sigma_max={sigma_max:g}] (the value is "
                  "a bound)" for col, hit in sat.items() if bool(hit[r])]
        flags.append("; ".join(f))
    out.flags = flags
    out.seconds = time.perf_counter() - t0
    return out
