"""The report of :func:`fastcurv.study.study` (and of :func:`fastcurv.demo.demo`, which is a study):
``report.md`` (headline, correlations, granulated Kendall coefficient, audit, per-replica table,
the "Columns" glossary), the scatter plots and figures, the printed summary, and the list of the
files a study writes.
"""
from __future__ import annotations

import inspect
import platform
import sys
from pathlib import Path

import numpy as np
import torch

from ._figures import file_figure as _figure
from ._figures import figure_class as _figure_class
from .function.pairwise import SOFT
from .study_config import STALLED_MARGIN

TARGETS = ("test_acc", "test_loss", "gap")  # the generalization columns a study correlates with

# The column standing for each requested measure in the summary ("headline") table; other measures
# stand for the column of their own name, or their first column named ``<measure>_*`` ("spectrum"
# and "gde" have no per-replica column, so no row).
HEADLINE = {
    "lambda_max": "lambda_max",
    "trace": "trace",
    "lambda_min": "lambda_min",
    "top_k": "lambda_1",
    "pac_bayes": "pacbayes_flatness",
    "jiang_sharpness": "jiang_sharpness_flatness",
    "josz_variation": "josz_V",
    "josz_level_distance": "josz_d_eps",
    "disagreement": "disagreement",
    "weakness": "weakness_rel_tau0.1",
    "perturbation_weakness": "perturb_sigma_star",
    "simplicity": "compressed_bytes_lzma",
    "soft": "js",
}


# the report folder's files that a study writes (and removes from an earlier study in the same folder)
REPORT_FILES = ("results.csv", "results.parquet", "correlations.csv", "granulated_kendall.csv", "audit.csv",
                "audit_mixed_correlations.csv",
                "report.md", "config.json", "config.yaml", "spectrum.png", "agreement_heatmap.png",
                "disagreement_vs_test_error.png", "audit.png", *(f"*_vs_{t}.png" for t in TARGETS))


def _clear_report(out: Path, keep=()) -> list[str]:
    """Remove the files an earlier study wrote into ``out`` (``REPORT_FILES``, but not ``keep``);
    returns their names."""
    old = sorted({p for pattern in REPORT_FILES for p in out.glob(pattern) if p.is_file() and p.name not in keep})
    for p in old:
        p.unlink()
    return [p.name for p in old]


def _plot_heatmap(D: torch.Tensor, seeds, out: Path) -> str | None:
    """``agreement_heatmap.png``: 1 - the pairwise disagreement matrix ``D`` [R, R]; its name, or None
    without matplotlib."""
    made = _figure(figsize=(5.2, 4.4), dpi=110)
    if made is None:
        return None
    fig, ax = made
    from matplotlib.ticker import MaxNLocator

    A = 1.0 - D.double().numpy()
    im = ax.imshow(A, cmap="viridis", interpolation="nearest")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # ticks on replicas, not between them
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(im, ax=ax, label="prediction agreement on the test set")
    ax.set_xlabel("replica")
    ax.set_ylabel("replica")
    ax.set_title(f"pairwise agreement, R={A.shape[0]} (seeds {seeds[0]}..{seeds[-1]})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "agreement_heatmap.png")
    return "agreement_heatmap.png"


def _plot_gde(table, out: Path) -> str | None:
    """``disagreement_vs_test_error.png``: each replica's disagreement against its test error, with
    the y = x line of the generalization-disagreement equality; its name, or None without matplotlib."""
    made = _figure(figsize=(4.2, 3.6), dpi=110)
    if made is None:
        return None
    fig, ax = made
    x, y = table["test_error"].to_numpy(float), table["disagreement"].to_numpy(float)
    ax.scatter(x, y, s=16)
    both = np.concatenate([x, y])
    both = both[np.isfinite(both)]
    if len(both):  # (replicas that failed are NaN)
        ax.plot([both.min(), both.max()], [both.min(), both.max()], "k--", lw=0.8, label="y = x")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no finite test error or disagreement", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("test error")
    ax.set_ylabel("mean disagreement with the other replicas")
    ax.set_title("generalization-disagreement equality", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "disagreement_vs_test_error.png")
    return "disagreement_vs_test_error.png"


# What each results column means, in its units (report.md's "Columns" section): (prefix, text)
_GLOSSARY = (
    ("seed", "initialization and data-order seed"),
    ("lr", "learning rate (swept: one per replica)"), ("momentum", "momentum (swept)"),
    ("weight_decay", "weight decay (swept)"), ("sam_rho", "SAM radius (swept)"),
    ("batch_size", "minibatch size (swept; every batch size trains the same epochs, a smaller one more steps)"),
    ("label_noise", "fraction of the replica's training labels replaced by wrong ones, drawn with its seed (swept)"),
    ("noisy_train_acc", "training accuracy on the replica's own noisy labels, those it was trained on (fraction; "
                        "train_acc, train_loss and gap use the clean labels)"),
    ("train_loss", "mean cross-entropy on the training set (nats)"),
    ("test_loss", "mean cross-entropy on the test set (nats)"),
    ("train_acc", "training accuracy (fraction)"), ("test_acc", "test accuracy (fraction)"),
    ("gap", "train_acc - test_acc"), ("epochs", "epochs trained"),
    ("diverged", "training diverged (non-finite loss)"), ("reached_target", "reached the training-loss target"),
    ("lambda_max", "largest eigenvalue of the Hessian of the mean training cross-entropy (nats per squared "
                   "parameter unit); _error: its error bound (inf where not converged), _iters: Lanczos steps"),
    ("lambda_min", "smallest Hessian eigenvalue (same units)"),
    ("lambda_", "the k-th largest Hessian eigenvalue (top_k; same units)"),
    ("trace", "Hessian trace, the sum of its eigenvalues (same units); _stderr: its standard error (0 when exact)"),
    ("weakness_", "permission-profile log-weakness at threshold tau (rel: relative to the top probability, abs: "
                  "absolute), bits per input, from 0 to log2(2^K - 1) (about K for K classes)"),
    ("mean_entropy", "mean entropy of the predicted distribution (nats)"),
    ("perturb_weakness_sigma", "fraction of the multiplicative weight-noise draws at this sigma that leave every "
                               "probe prediction unchanged (steps of 1 / num_draws)"),
    ("perturb_sigma_star", "the noise scale at which prediction agreement falls to 1 - delta"),
    ("compressed_bytes_", "size of the 8-bit quantized weights compressed (bytes; larger = less simple)"),
    ("sq_weight_norm", "squared L2 norm of all parameters (a parametrized layer's original tensors)"),
    # (before pacbayes_mag_kl, a prefix of its name; function_measures calls it pacbayes_mag_sigma)
    ("pacbayes_mag_kl_sigma", "simplicity: the noise scale sigma' its magnitude-aware PAC-Bayes KL term uses "
                              "(function_measures' pacbayes_mag_sigma: function_kwargs' pacbayes_sigma, or bisected "
                              "where the accuracy on the probe test inputs drops by 0.1)"),
    ("pacbayes_mag_kl", "simplicity: magnitude-aware PAC-Bayes KL term (Jiang et al. 2020; nats)"),
    ("disagreement", "mean fraction of test inputs on which the replica's prediction differs from each other "
                     "replica's"),
    ("test_error", "1 - test accuracy on the function measures' inputs"),
    ("js", "mean Jensen-Shannon divergence between the replica's predicted distributions and each other "
           "replica's (nats)"),
    ("tv", "mean total-variation distance between the replica's predicted distributions and each other replica's"),
    ("l2", "mean L2 distance between the replica's predicted distributions and each other replica's"),
    ("ok", "the replica's measures computed without a failure"),
    ("rho_sharpness", "worst-case rise of the training loss within an L2 ball of radius rho (nats)"),
    ("adaptive_rho_sharpness", "worst-case loss rise within the weight-scaled ball (adaptive; nats)"),
    ("avg_rho_sharpness", "average loss rise under Gaussian weight noise of scale rho (nats)"),
    ("adaptive_avg_rho_sharpness", "average loss rise under weight-scaled Gaussian noise (nats)"),
    ("mw_sharpness", "Mason-Williams: mean absolute loss change over rho per random direction"),
    ("epsilon_sharpness", "Keskar's epsilon-sharpness: 100 x the worst loss rise in the box over (1 + loss)"),
    ("josz_V", "Josz's loss variation: the largest training-loss rise within an L2 ball of radius r (nats; "
               "josz_V_r=<r>: one column per radius)"),
    ("josz_d_eps", "Josz's distance to the eps level set: the smallest radius at which the training loss can rise "
                   "by eps"),
    ("relative_flatness", "Petzka's relative flatness of the last Linear layer (kappa_Tr)"),
    ("fisher_rao", "Fisher-Rao norm (closed form for cross-entropy)"),
    ("pacbayes_flatness", "pac_bayes: PAC-Bayes flatness, 1 / sigma^2 of the largest isotropic Gaussian weight "
                          "noise (std sigma) keeping the mean training-accuracy drop within target"),
    ("pacbayes_sigma", "pac_bayes: that largest noise scale sigma"),
    ("pacbayes_mag_flatness", "pac_bayes, magnitude-aware: 1 / sigma'^2 of the largest weight noise of std "
                              "sqrt(sigma'^2 theta^2 + eps^2) keeping the training-accuracy drop within target"),
    ("pacbayes_mag_sigma", "pac_bayes, magnitude-aware: that largest relative noise scale sigma'"),
    ("jiang_sharpness_flatness", "jiang_sharpness: Jiang et al.'s sharpness flatness, 1 / alpha^2 of the largest "
                                 "box |u_i| <= alpha whose worst-case perturbation keeps the training-accuracy drop "
                                 "within target"),
    ("jiang_sharpness_alpha", "jiang_sharpness: that largest box half-width alpha"),
    ("jiang_sharpness_mag_flatness", "jiang_sharpness, magnitude-aware: 1 / alpha'^2 of the largest box "
                                     "|u_i| <= alpha' |theta_i| + eps keeping the training-accuracy drop within "
                                     "target"),
    ("jiang_sharpness_mag_alpha", "jiang_sharpness, magnitude-aware: that largest relative half-width alpha'"),
    ("ggn_", "generalized Gauss-Newton matrix: largest eigenvalue or trace (nats per squared parameter unit)"),
    ("fisher_", "empirical Fisher: largest eigenvalue or trace (nats per squared parameter unit)"),
)


def _glossary(columns) -> list[str]:
    """report.md lines explaining the result columns present: one per glossary entry (the first
    whose prefix a column has), a family of columns (``weakness_*``) on one line."""
    found: dict[str, list[str]] = {}
    for col in columns:
        if str(col).endswith(("_error", "_iters", "_converged", "_stderr")) and col != "test_error":
            continue
        prefix = next((p for p, _ in _GLOSSARY if str(col).startswith(p)), None)
        if prefix is not None:
            found.setdefault(prefix, []).append(col)
    text = dict(_GLOSSARY)
    return [f"- `{cols[0] if len(cols) == 1 else prefix + '*'}`"
            + (f" ({len(cols)} columns)" if len(cols) > 1 else "") + f": {text[prefix]}" for prefix, cols in found.items()]


def _headline_columns(measures, columns) -> dict:
    """``{measure: column}``: the correlated column standing for each requested measure in the headline,
    ``HEADLINE``'s when it was computed, else the measure's first column (``function_kwargs`` may ask for
    other thresholds, codecs or divergences: ``taus=(0.05,)`` gives ``weakness_rel_tau0.05``; a list of
    josz radii ``josz_V_r=<r>``), else its own name, else the first column named ``<measure>_*`` (a
    measure registered with batched_sharpness that writes, e.g., ``<measure>_flatness``)."""
    family = {"weakness": lambda c: c.startswith("weakness_"), "simplicity": lambda c: c.startswith("compressed_bytes_"),
              "soft": lambda c: c in SOFT, "josz_variation": lambda c: c.startswith("josz_V_r=")}
    out = {}
    for m in measures:
        col = HEADLINE.get(m, m)
        if col not in columns:
            own = family.get(m) or (lambda c, m=m: c.startswith(f"{m}_"))
            col = next((c for c in columns if own(str(c))), col)
        if col in columns:
            out[m] = col
    return out


def _any_noise(value) -> bool:
    """Whether a study's ``label_noise`` setting (a number or one per replica) corrupts any labels."""
    return any(value) if isinstance(value, (list, tuple)) else bool(value)


def _report(config, arch, seeds, n_tr, n_te, data, times, sharp, fm, corr, headline, head_of, summary, aud, mixed,
            table, target, plots, parquet_note, granulated=None, granulated_note=None) -> str:
    """The text of report.md from the study's settings (``config``, as config.json holds them) and results."""
    c = config
    asked = [c["measures"]] if isinstance(c["measures"], str) else c["measures"]
    none = [m for m in asked if m not in head_of]  # measures without a headline row ("spectrum", "gde")
    md = [
        f"# fastcurv study: {len(seeds)} replicas of {arch} on {data}",
        "",
        f"Training: {c['optimizer']}, lr {c['lr']}, momentum {c['momentum']}, weight decay {c['weight_decay']}, "
        f"SAM rho {c['sam_rho']}, batch {c['batch_size']}, at most {c['epochs']} epochs"
        + (f", label noise {c['label_noise']} (fraction of each replica's training labels replaced by wrong ones; "
           "train_acc, train_loss and gap on the clean labels)" if _any_noise(c.get("label_noise")) else "")
        + (f", stop at training loss {c['target_loss']}" if c.get("target_loss") is not None else "")
        + f"; {n_tr} training / {n_te} test samples"
        + (f" (fixed subsets drawn with seed {c['seed']}). " if c.get("n_train") or c.get("n_test") else " (all of them). ")
        + f"Seeds {seeds[0]}..{seeds[-1]} (initialization and data order).",
        f"Train accuracy {summary['mean_train_acc']:.4f} (mean), test accuracy {summary['mean_test_acc']:.4f} "
        + (f"+- {summary['sd_test_acc']:.4f} (mean +- sd over replicas)." if len(seeds) > 1 else "(one replica)."),
        "Time: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()) + ".",
        "",
    ]
    if "reached_target" in table:
        reached, R = int(table["reached_target"].sum()), len(table)
        if reached < R:
            rest = table.loc[~table["reached_target"].astype(bool), "train_loss"]
            md[-1:-1] = [f"**{R - reached} of {R} replicas did not reach the training-loss target {c['target_loss']}** "
                         f"in {c['epochs']} epochs (their training losses {rest.min():.3g} to {rest.max():.3g}): they "
                         "are measured as they stood at the epoch limit (column `reached_target`)."]
        else:
            md[-1:-1] = [f"All {R} replicas reached the training-loss target {c['target_loss']}."]
    failed = table.index[table["diverged"].astype(bool)].tolist()
    if len(failed) == len(table):
        md[-1:-1] = [f"**All {len(table)} replicas diverged in training**: there is nothing to measure; lower the "
                     "learning rate."]
    elif failed:
        md[-1:-1] = [f"**{len(failed)} of {len(table)} replicas diverged in training** (replicas {failed}): their "
                     f"measures are NaN; the means above and the correlations use the other {len(table) - len(failed)}."]
    stalled = summary["did_not_learn"]
    if stalled:
        md[-1:-1] = [f"**{len(stalled)} of {len(table)} replicas did not learn** (replicas {stalled}: training accuracy "
                     f"within {STALLED_MARGIN} of chance, flagged): they are measured and correlated with the others, "
                     "and a few such outliers can decide a rank correlation; a smaller learning rate trains them."]
    if sharp is not None:
        how = {"exact": "the trace exact (no probes)", "": "no trace"}.get(sharp.trace_method,
                                                                        f"the trace estimated ({sharp.trace_method})")
        md += [f"Curvature (`batched_sharpness`, backend `{sharp.backend}`): Hessian of the mean cross-entropy over "
               f"the {n_tr} training samples; {sharp.num_matvecs} batched Hessian-vector products (each for every replica "
               f"still running; summed over chunks); "
               f"{how}.", ""]
    if fm is not None:
        from .function import function_measures

        delta = (c.get("function_kwargs") or {}).get("delta", inspect.signature(function_measures).parameters["delta"].default)
        md += [f"Function-space measures (`function_measures`) on the {fm.num_examples} test inputs. Weakness "
               "columns are OUR operationalizations of Bennett's weakness (permission-profile log-weakness at "
               "threshold tau, bits per input; perturbation weakness = noise scale sigma* at which "
               f"{100 * delta:g} % of the predictions change). Simplicity columns are sizes/norms (larger = less "
               "simple).", ""]
    no_row = f"{' and '.join(none)} {'have' if len(none) > 1 else 'has'} no per-replica column"
    md += [f"## Headline: rank correlation with `{target}`", "",
           f"Spearman rho (two-sided p), 95 % percentile bootstrap CI ({c['n_boot']} resamples over networks), "
           "Kendall tau-b. "
           + ("One column per requested measure (" + ", ".join(f"{k} -> `{v}`" for k, v in head_of.items()) + ")"
              + (f"; {no_row}" if none else "") + "." if head_of
              else f"No headline: {no_row} (see the sections below)."), "",
           *([_markdown_table(headline), ""] if head_of else [])]
    if "mean_pairwise_disagreement" in summary:
        d, e = summary["mean_pairwise_disagreement"], summary.get("mean_test_error", float("nan"))
        md += ["## Generalization-disagreement check", "",
               f"Mean pairwise test disagreement between replicas: {d:.4f}; mean test error: {e:.4f} "
               f"({_gde_ratio(d, e)}; the equality of Jiang et al. 2022 predicts 1).", ""]
    hyper = corr.index[corr["kind"] == "hyperparameter"].tolist()
    md += [f"## All measure columns vs `{target}`" + (" (and the swept hyperparameters)" if hyper else ""), "",
           "`spearman_p_by` / `kendall_p_by`: the p-values adjusted for testing every measure row of this table "
           "(Benjamini-Yekutieli: false discovery rate under any dependence between the columns; the "
           "hyperparameter rows, if any, are adjusted among themselves)."
           + (f" Rows of kind `hyperparameter` ({', '.join(hyper)}) are the swept settings themselves, "
              "correlated as baselines: a measure predicts more than the sweep only where it beats them (see also "
              "the granulated Kendall coefficient)." if hyper else ""), "",
           _markdown_table(corr), ""]
    if granulated is not None or granulated_note:
        md += ["## Granulated Kendall coefficient (Jiang et al. 2020)", ""]
        if granulated is not None:
            hs = [col[4:] for col in granulated.columns if col.startswith("psi_")]
            groups = granulated.attrs.get("groups", {})
            md += [f"`psi_<h>`: the mean Kendall tau (the pair-sign average: a tied pair counts 0) of the measure with `{target}` over the groups of replicas that "
                   "differ only in the hyperparameter h (and their seeds) ("
                   + ", ".join(f"{h}: {groups.get(h, '?')} groups" for h in hs) + "); `Psi`: the mean of the psi. "
                   "Unlike the pooled correlations above, it does not credit a measure for following a "
                   "hyperparameter that moves the target by another route." + (f" {granulated_note}" if granulated_note
                                                                               else ""), "",
                   _markdown_table(granulated), ""]
        else:
            md += [f"Psi {granulated_note}", ""]
    if aud is not None:
        at = aud.table
        md += [f"## Invariance audit (`{c['audit_transform']}` reparameterization, alpha = {c['audit_alpha']}, "
               f"{len(next(iter(aud.per_replica.values()))[0])} replicas)", "",
               *(["The audit compares copies with each BatchNorm folded into its conv layer (the same functions in "
                  "eval mode; a BatchNorm would undo a rescaling) before and after the transform; folding is itself a "
                  "reparameterization, so `before_mean` differs from the curvature columns above.", ""]
                 if c.get("model") == "cnn" else []),
               f"Largest output change {at.attrs.get('max_output_change', float('nan')):.2e}, "
               f"predictions changed: {at.attrs.get('predictions_changed')}. Function-space measures computed from "
               "the outputs are unchanged by construction; the simplicity columns describe the weights: "
               "`sq_weight_norm` and `pacbayes_mag_kl` change under any rescaling, the compressed sizes under "
               "neuron-wise rescaling.", "", _markdown_table(at), ""]
        if mixed is not None:
            md += [f"Rank correlation with `{target}` when a random half of these replicas is replaced by its "
                   "reparameterized copy (same functions, same test accuracy, same output-based function-space "
                   "measures):", "",
                   _markdown_table(mixed), ""]
    show = [x for x in ["seed", "train_loss", "test_acc", "gap", *[h for h in headline.index], "flags"] if x in table]
    md += ["## Per-replica results (headline columns; all columns in results.csv)", "", _markdown_table(table[show]), ""]
    if parquet_note:
        md += [parquet_note, ""]
    if plots:
        md += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    else:
        md += ["(matplotlib is not installed: no plots)", ""]
    md += ["## Columns", "", "A correlation of NaN means the column is constant over the replicas (or has fewer "
           "than 3 finite values).", "", *_glossary(table.columns), ""]
    md += ["Rerun: `fastcurv study --config config.yaml --out <folder>`, from any folder (config.yaml holds absolute "
           "paths; a checkpoint or results file inside this folder moves into <folder>); settings and versions in "
           "config.json.", ""]
    return "\n".join(md)


def _gde_ratio(disagreement: float, test_error: float) -> str:
    """"ratio <disagreement / test error>" for report.md, in words where the test error is 0 or NaN
    (a population perfect on a small test set; the division raised ZeroDivisionError)."""
    if disagreement != disagreement or test_error != test_error:
        return "ratio undefined: not finite"
    if test_error == 0:
        return ("ratio undefined: mean test error 0 and no disagreement" if disagreement == 0
                else "ratio infinite: mean test error 0")
    return f"ratio {disagreement / test_error:.3f}"


def _print(res, target):
    """The study's summary on stdout (``verbose=True``): headline, granulated Kendall (or why it is
    missing), audit, report path."""
    import pandas as pd

    with pd.option_context("display.width", 140, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        if len(res["headline"]):
            print(f"Rank correlation with {target} (headline measures):")
            print(res["headline"].to_string())
        else:
            print(f"No headline: no requested measure has a per-replica column to correlate with {target}.")
        note = res.get("granulated_kendall_note")
        if res.get("granulated_kendall") is not None:
            print(f"\ngranulated Kendall coefficient with {target} (Jiang et al.):")
            print(res["granulated_kendall"].to_string())
            if note:
                print(note)
        elif note:  # (a sweep that is not a full grid: the report says why there is no Psi, so does the summary)
            print(f"\ngranulated Kendall coefficient (Psi) {note}")
        s = res["summary"]
        if "mean_pairwise_disagreement" in s:
            print(f"\nmean pairwise disagreement {s['mean_pairwise_disagreement']:.4f} vs mean test error "
                  f"{s.get('mean_test_error', float('nan')):.4f}")
        if res["audit"] is not None:
            print(f"\ninvariance audit ({res['audit_transform']}):")
            print(res["audit"].table[["before_mean", "after_mean", "ratio_median", "invariant"]].to_string())
        if res.get("audit_mixed") is not None:
            print("\nhalf of the audited replicas reparameterized:")
            print(res["audit_mixed"][["n", "spearman_rho", "spearman_p"]].to_string())
    if res["out"] is not None:
        print(f"\nreport: {res['out'] / 'report.md'} ({len(res['files'])} files)")
    print(f"done in {res['seconds']:.1f} s")


def _versions() -> dict:
    """The versions of fastcurv and of what its numbers depend on (config.json's "versions")."""
    import pandas
    import scipy

    from . import __version__

    return {"fastcurv": __version__, "torch": torch.__version__, "numpy": np.__version__, "scipy": scipy.__version__,
            "pandas": pandas.__version__, "python": sys.version.split()[0], "platform": platform.platform()}


def _plot(df, measures, target, out: Path, correlated=None, color_by=(), corr=None) -> list[str]:
    """``<measure>_vs_<target>.png`` in ``out`` for each of ``measures`` (columns of ``df``); returns
    the file names ([] without matplotlib).

    correlated: the measure columns a :func:`fastcurv.stats.correlations` with ``rows="common"`` ran
    on; the replicas it left out (some deciding measure not finite) are drawn hollow and grey, and
    the title says how many were correlated. None: every replica where the measure and the target
    are finite counts. color_by: swept hyperparameter columns; the points are coloured by the first
    (a colour bar, log-scaled for positive values spanning a factor 10 or more; its label names the
    others when several were swept). corr: the correlations table; its Spearman rho and p of the
    measure go on the title's second line. Figures are ``matplotlib.figure.Figure`` objects (no
    pyplot state, the process's backend untouched)."""
    if _figure_class() is None:
        return []
    import warnings

    from .stats import _common_rows

    finite = np.isfinite(df[target].to_numpy(float))
    if correlated is None:
        used = np.ones(len(df), dtype=bool)
    else:
        with warnings.catch_warnings():  # (correlations warned about the dropped replicas already)
            warnings.simplefilter("ignore")
            used = _common_rows(df, target, list(correlated))
    color_by = list(color_by or ())
    files = []
    for m in measures:
        fig, ax = _figure(figsize=(4.6 if color_by else 4.2, 3.6), dpi=110)
        ok = np.isfinite(df[m].to_numpy(float)) & finite
        kept, left = ok & used, ok & ~used
        if color_by:
            _colored_scatter(fig, ax, df, m, target, kept, color_by)
        else:
            ax.scatter(df.loc[kept, m], df.loc[kept, target], s=22)
        if left.any():
            ax.scatter(df.loc[left, m], df.loc[left, target], s=22, facecolors="none", edgecolors="grey",
                       label="not correlated (another measure not finite)")
            ax.legend(fontsize=6)
        for r in df.index[ok]:
            ax.annotate(str(df.loc[r, "seed"]), (df.loc[r, m], df.loc[r, target]), fontsize=6, alpha=0.6)
        ax.set_xlabel(m)
        ax.set_ylabel(target)
        count = f"R={int(kept.sum())}" + (f" correlated; {int(left.sum())} left out: hollow" if left.any() else "")
        title = f"{m} vs {target} ({count})"
        if corr is not None and m in corr.index:
            rho, p = float(corr.loc[m, "spearman_rho"]), float(corr.loc[m, "spearman_p"])
            title += (f"\nSpearman rho {rho:+.2f} (p {p:.2g})" if rho == rho
                      else "\nSpearman rho undefined (a constant column)")
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        name = f"{m}_vs_{target}.png"
        fig.savefig(out / name)
        files.append(name)
    return files


def _colored_scatter(fig, ax, df, m, target, rows, color_by):
    """The ``rows`` of ``df`` as points coloured by the hyperparameter ``color_by[0]``, with a colour bar."""
    from matplotlib.colors import LogNorm, Normalize

    h = color_by[0]
    values = df[h].to_numpy(float)
    lo, hi = np.nanmin(values), np.nanmax(values)
    norm = LogNorm(lo, hi) if lo > 0 and hi >= 10 * lo else Normalize(lo, hi)
    sc = ax.scatter(df.loc[rows, m], df.loc[rows, target], s=22, c=values[rows], cmap="viridis", norm=norm)
    label = h + (f" (also swept: {', '.join(color_by[1:])})" if len(color_by) > 1 else "")
    fig.colorbar(sc, ax=ax, label=label)


def _markdown_table(df, floatfmt="{:.4g}") -> str:
    """``df`` (with its index as the first column) as a Markdown table, floats as ``floatfmt``."""
    cols = [df.index.name or ""] + [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for idx, row in df.iterrows():
        cells = [str(idx)]
        for v in row:
            if isinstance(v, (float, np.floating)):
                cells.append(floatfmt.format(v))
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
