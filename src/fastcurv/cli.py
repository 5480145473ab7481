"""The ``fastcurv`` command line.

* ``fastcurv demo``: train a small population on the embedded digits, print its headline
  correlations and invariance audit, write a report folder (see :func:`fastcurv.demo.demo`).
* ``fastcurv study``: the same pipeline on MNIST / Fashion-MNIST / digits with any settings, from
  flags or a YAML / JSON config file (flags override the file); curvature measures
  (batched_sharpness) and function-space measures (function_measures), correlations, invariance
  audit, report folder; see :func:`fastcurv.study.study`.

A bad setting, config file or path ends the command with one line ``fastcurv <command>: <what is
wrong>`` on stderr and exit code 2 (as argparse's own usage errors), before any training where it
can be known then. Paths (flags and config files alike) may start with ``~``, the home folder.
Relative paths, in a config file as in flags, are relative to the current folder (as in the config
files of earlier versions; the ``config.yaml`` a study writes holds absolute paths). With ``--out``
overriding a config's ``out``, its ``checkpoint`` and ``sharpness_kwargs["output"]`` move along
when they lay inside the config's ``out`` folder (they belong to that study).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _floats(text: str):
    """'0.1' -> 0.1; '0.1,0.05' -> [0.1, 0.05] (one value per replica)."""
    vals = [float(v) for v in str(text).split(",") if v.strip()]
    return vals[0] if len(vals) == 1 else vals


def _ints(text: str):
    return [int(v) for v in str(text).split(",") if v.strip()]


def _names(text: str) -> tuple:
    """'lambda_max, trace' -> ('lambda_max', 'trace'): spaces around the names dropped, as the other lists'."""
    return tuple(v.strip() for v in str(text).split(",") if v.strip())


def _int_or_ints(text: str):
    """'32' -> 32; '32,128' -> [32, 128] (one value per replica)."""
    vals = _ints(text)
    return vals[0] if len(vals) == 1 else vals


_NO_CHECKPOINT = ("", "none", "off", "no", "false")  # checkpoint values meaning "no checkpoint"


def _expand(path):
    """``path`` with a leading ``~`` or ``~user`` expanded (other values unchanged); a ValueError when
    that user, or the home folder, is unknown."""
    if not isinstance(path, (str, os.PathLike)) or not str(path).startswith("~"):
        return path
    from .paths import expand_path

    return expand_path(path)


def _yaml_loader():
    """PyYAML's SafeLoader reading numbers as YAML 1.2 does: PyYAML (YAML 1.1) reads ``1e-3`` and
    ``1.0e3`` (no dot, or no exponent sign) as strings, which reached ``sharpness_kwargs`` /
    ``function_kwargs`` / ``measure_options`` as strings and failed after training."""
    import re

    import yaml

    from .study_config import _NUMBER

    class Loader(yaml.SafeLoader):
        pass

    # (appended after PyYAML's own resolvers: an int stays an int, what YAML 1.1 reads as a float is unchanged)
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(f"^(?:{_NUMBER.pattern})$"),
                                 list("-+0123456789."))
    return Loader


def _load_config(path: str) -> dict:
    """The settings in a JSON (``.json``) or YAML file (``~`` expanded; numbers read as YAML 1.2
    reads them: ``1e-3`` is a number); a ValueError saying what is wrong with it."""
    p = Path(_expand(path))
    if not p.is_file():
        raise ValueError(f"config file {path} not found")
    text = p.read_text()
    if p.suffix.lower() == ".json":
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path} is not valid JSON: {e}") from None
    else:
        try:
            import yaml
        except ImportError:
            raise ValueError("reading a YAML config needs PyYAML (pip install pyyaml), or use a .json file") from None
        try:
            cfg = yaml.load(text, Loader=_yaml_loader()) or {}
        except yaml.YAMLError as e:
            mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None) or str(e)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            raise ValueError(f"config file {path} is not valid YAML: {problem}{where}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a mapping of settings, got {type(cfg).__name__}")
    return {str(k).replace("-", "_"): v for k, v in cfg.items()}


def _fail(command: str, error: Exception) -> int:
    """Print ``fastcurv <command>: <error>`` on one line to stderr; the exit code 2."""
    print(f"fastcurv {command}: {' '.join(str(error).split())}", file=sys.stderr)
    return 2


def _add_study_flags(p: argparse.ArgumentParser):
    S = argparse.SUPPRESS  # absent flags do not override the config file
    p.add_argument("--config", help="YAML or JSON file with study settings (flags override it; its relative paths, "
                                    "as the flags', are relative to the current folder)")
    p.add_argument("--data", default=S, help="digits (embedded, default), mnist or fashion-mnist")
    p.add_argument("--data-root", default=S, help="folder with the IDX files (default: search FASTCURV_DATA, ../shared/data, ...)")
    p.add_argument("--n-train", type=int, default=S, help="random training subset size (mnist / fashion-mnist)")
    p.add_argument("--n-test", type=int, default=S, help="random test subset size")
    p.add_argument("--model", choices=("mlp", "cnn"), default=S,
                   help="mlp (default) or cnn (3x3 conv layers with BatchNorm and max pooling, then a linear head)")
    p.add_argument("--hidden", type=_ints, default=S, help="hidden widths, e.g. 512,512 (default 32); the conv channels "
                                                          "with --model cnn, e.g. 8,16")
    p.add_argument("--activation", default=S)
    p.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default=S)
    p.add_argument("--lr", type=_floats, default=S, help="learning rate, or one per replica: 0.1,0.05,...")
    p.add_argument("--momentum", type=_floats, default=S)
    p.add_argument("--weight-decay", type=_floats, default=S)
    p.add_argument("--sam-rho", type=_floats, default=S, help="SAM radius (0: plain optimizer)")
    p.add_argument("--batch-size", type=_int_or_ints, default=S, help="minibatch size, or one per replica: 32,32,512,512")
    p.add_argument("--label-noise", type=_floats, default=S,
                   help="fraction of each replica's training labels made wrong, or one per replica: 0,0.2")
    p.add_argument("--epochs", type=int, default=S, help="epochs (the maximum with --target-loss)")
    p.add_argument("--target-loss", type=float, default=S, help="stop each replica at this training loss")
    p.add_argument("--measures", type=_names, default=S,
                   help="comma-separated, curvature: lambda_max,trace,lambda_min,top_k,spectrum (and registered "
                        "measures, e.g. rho_sharpness); function-space: weakness,perturbation_weakness,simplicity,"
                        "disagreement,gde,soft")
    p.add_argument("--target", choices=("test_acc", "test_loss", "gap"), default=S)
    p.add_argument("--n-boot", type=int, default=S, help="bootstrap resamples for the CI")
    p.add_argument("--checkpoint", default=S, help="training checkpoint file (resumes when it exists; 'none' or "
                                                    "'off': no checkpoint). One inside the config's out folder follows "
                                                    "--out")
    p.add_argument("--threads", type=int, default=S, help="torch threads (1 is fastest for tiny models)")
    p.add_argument("--audit", dest="audit", action="store_true", default=S, help="run the invariance audit (default)")
    p.add_argument("--no-audit", dest="audit", action="store_false", default=S, help="skip the invariance audit")
    p.add_argument("--audit-alpha", type=float, default=S, help="alpha of the Dinh rescaling in the audit (default 10)")
    p.add_argument("--audit-transform", choices=("dinh", "dinh_first", "neurons", "balance"), default=S,
                   help="reparameterization audited (default dinh: last two weight layers)")
    p.add_argument("--audit-replicas", type=int, default=S, help="replicas audited (default 8)")
    p.add_argument("--spectrum-replicas", type=int, default=S, help="replicas drawn in spectrum.png (default 4)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fastcurv", description="Curvature and sharpness for many replicas at once.")
    ap.add_argument("--version", action="store_true", help="print the version and exit")
    sub = ap.add_subparsers(dest="command")

    d = sub.add_parser("demo", help="train a small population on the embedded digits, print its headline "
                                    "correlations and audit, write a report folder")
    d.add_argument("--replicas", type=int, default=8, help="number of replicas R (default 8)")
    d.add_argument("--seed", type=int, default=0, help="first seed; replicas use seed..seed+R-1")
    d.add_argument("--out", default="fastcurv-demo", help="report folder (default ./fastcurv-demo)")
    d.add_argument("--epochs", type=int, default=None, help="training epochs (default 15)")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")

    s = sub.add_parser("study", help="train, measure, correlate and report (flags or --config file)",
                       description="Train, measure, correlate and report, from flags or a YAML / JSON --config file "
                                   "(flags override it). Relative paths (out, checkpoint, data_root, "
                                   "sharpness_kwargs.output), in a config file as in flags, are relative to the "
                                   "current folder. The config.yaml a study writes "
                                   "holds absolute paths: `fastcurv study --config DIR/config.yaml --out NEW` reruns "
                                   "it from anywhere, and a checkpoint or results file (sharpness_kwargs.output) that "
                                   "lay inside the config's out folder moves into NEW. checkpoint: none / off / no / "
                                   "false is no checkpoint.")
    s.add_argument("--replicas", type=int, default=argparse.SUPPRESS)
    s.add_argument("--seed", type=int, default=argparse.SUPPRESS)
    s.add_argument("--out", default=argparse.SUPPRESS, help="report folder (default ./fastcurv-report)")
    s.add_argument("--no-progress", action="store_true")
    _add_study_flags(s)
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if args.command is None:
        ap.print_help()
        return 2
    progress = False if args.no_progress else None
    try:
        if args.command == "demo":
            from .demo import demo
            from .study_config import _seed

            extra = {} if args.epochs is None else {"epochs": args.epochs}
            demo(replicas=args.replicas, seed=_seed(args.seed), out=_expand(args.out), progress=progress, **extra)
        else:
            _study(args, progress)
    except (OSError, ValueError, TypeError) as e:  # bad settings, config files and paths (FingerprintMismatch too)
        return _fail(args.command, e)
    return 0


def _study(args, progress) -> None:
    """``fastcurv study``: the config file's settings overridden by the flags given (relative paths
    in both against the current folder); :func:`fastcurv.study.study` checks and normalizes them."""
    from .study import STUDY_ARGS as _STUDY_ARGS
    from .study import study as run_study
    from .study_config import _flag, _map_paths

    cfg = _load_config(args.config) if args.config else {}
    flags = {k: v for k, v in vars(args).items() if k not in ("command", "config", "no_progress", "version")}
    for settings in (cfg, flags):  # an unknown '~user' fails here, in one line (the study expands them itself)
        _map_paths(settings, _expand)
    for settings in (cfg, flags):
        if "checkpoint" in settings and _no_checkpoint(settings["checkpoint"]):
            settings["checkpoint"] = None
    if "out" in flags:  # files of the config's study move along with its out folder
        if cfg.get("checkpoint") is not None:
            cfg["checkpoint"] = _moved_under_out(cfg["checkpoint"], cfg, flags)
        if _output(cfg) is not None:
            cfg["sharpness_kwargs"] = {**cfg["sharpness_kwargs"], "output": _moved_under_out(_output(cfg), cfg, flags)}
    if "progress" in cfg:  # a config's progress (checked here: --no-progress wins, and the study never sees it)
        config_progress = _flag(cfg.pop("progress"), "progress", none_ok=True)
        progress = config_progress if progress is None else progress
    cfg.update(flags)
    if "hidden" in cfg and isinstance(cfg["hidden"], int):
        cfg["hidden"] = [cfg["hidden"]]
    unknown = sorted(set(cfg) - set(_STUDY_ARGS))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; known: {', '.join(sorted(_STUDY_ARGS))}")
    _run_keeping_no_empty_out(run_study, cfg, progress)


def _run_keeping_no_empty_out(run_study, cfg: dict, progress) -> None:
    """``run_study(progress=progress, **cfg)``; when it fails, the folders it created for its out
    folder (those that did not exist before: ``--out new/r`` creates ``new`` and ``new/r``) are
    removed again, deepest first, where still empty (a setting, the data or a path refused before
    any work), instead of being left behind."""
    out = cfg.get("out", "fastcurv-report")
    folder = Path(_expand(out)) if isinstance(out, (str, os.PathLike)) and str(out) != "" else None
    new = []  # the folders that do not exist yet, deepest first
    while folder is not None and not folder.exists() and folder != folder.parent:
        new.append(folder)
        folder = folder.parent
    try:
        run_study(progress=progress, **cfg)
    except BaseException:
        for f in new:
            if not f.is_dir() or any(f.iterdir()):
                break
            f.rmdir()
        raise


def _output(settings: dict):
    """The settings' ``sharpness_kwargs["output"]`` (a resumable results file), or None."""
    kw = settings.get("sharpness_kwargs")
    return kw.get("output") if isinstance(kw, dict) else None


def _no_checkpoint(value) -> bool:
    """Whether a checkpoint setting means "no checkpoint": None, False (YAML reads an unquoted
    ``off`` / ``no`` / ``false`` as False), or one of the strings in ``_NO_CHECKPOINT``."""
    if value is None or value is False:
        return True
    if value is True:
        raise ValueError("checkpoint must be a file path, or none / off for no checkpoint, got true")
    return isinstance(value, str) and value.strip().lower() in _NO_CHECKPOINT


def _moved_under_out(path, cfg: dict, flags: dict):
    """``path`` (a file of the config's study: its checkpoint or ``sharpness_kwargs["output"]``),
    moved along when ``--out`` overrides the config's ``out`` and the file lay inside that folder
    (``out: a`` with ``checkpoint: a/train.ckpt`` and ``--out b`` give ``b/train.ckpt``: the old
    file belongs to another study, which the rerun would resume, refuse or overwrite; ``~`` counts
    as the home folder). Other paths, and values that are not paths, are returned as they are."""
    old_out, new_out = cfg.get("out"), flags.get("out")
    if not isinstance(path, (str, os.PathLike)) or not str(path) or not old_out or new_out is None:
        return path
    try:
        inside = Path(path).expanduser().resolve().relative_to(Path(old_out).expanduser().resolve())
    except ValueError:
        return path
    return str(Path(new_out) / inside)


if __name__ == "__main__":
    sys.exit(main())
