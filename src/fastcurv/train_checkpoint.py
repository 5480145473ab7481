"""Training checkpoints of :func:`fastcurv.train.train_population`: the fingerprint of a call's
settings, data and architecture (:func:`run_fingerprint`), the file written atomically after every
epoch (:func:`save_checkpoint`), and a resumed call's state read back after checking that it was
written with the same fingerprint (:func:`resume`).
"""
from __future__ import annotations

import hashlib
import json
import pickle
from operator import itemgetter
from pathlib import Path

import torch
from torch import nn

from .fingerprint import describe_changes, module_structure
from .paths import replace_atomically
from .train_data import _noisy_count
from .train_group import STATE_KEYS, Population, ReplicaGroup, merged_rows
from .train_optim import OptimizerSettings
from .train_options import TrainOptions

_CKPT_VERSION = 2  # 2: the fingerprint holds the architecture (module classes and settings)
_CKPT_KEYS = ("fingerprint", "epoch", "params", "state", "diverged", "done", "epochs_run", "history")


def run_fingerprint(opts: TrainOptions, hp: dict, optim: OptimizerSettings, dtype: torch.dtype, x: torch.Tensor,
                    y: torch.Tensor, model: nn.Module, frozen: list[str]) -> dict:
    """What a checkpoint's state depends on, as JSON-able values: the settings (``hp`` name -> ``[R]``), the
    training set ``x``, ``y`` (a digest), and the architecture of ``model`` (``frozen``: its parameters that
    do not train)."""
    batch_sizes, noise = opts.batch_sizes, opts.noise
    return {
        "version": _CKPT_VERSION, "seeds": opts.seeds, "data_seeds": opts.data_seeds, "optimizer": opts.optimizer,
        "hp": {k: v.double().cpu().tolist() for k, v in hp.items()}, "nesterov": bool(opts.nesterov),
        "betas": [optim.b1, optim.b2], "eps": float(opts.eps),
        "batch_size": batch_sizes[0] if len(set(batch_sizes)) == 1 else batch_sizes,
        "target_loss": opts.target_loss, "loss": opts.loss,
        "eval_train": bool(opts.eval_train), "dtype": str(dtype), "data": _data_digest(x, y),
        "params": [[n, list(p.shape)] for n, p in model.named_parameters()], "architecture": module_structure(model),
        **({"frozen": frozen} if frozen else {}),
        # (with label noise: what the labels depend on)
        **({"label_noise_samples": [_noisy_count(f, len(y)) for f in noise]} if any(noise) else {}),
    }


def _data_digest(x: torch.Tensor, y: torch.Tensor) -> str:
    """A SHA-1 hex digest of the shapes, dtypes and bytes of ``x`` and ``y``."""
    h = hashlib.sha1()
    for t in (x, y):
        a = t.detach().cpu().contiguous()
        h.update(str((tuple(a.shape), str(a.dtype))).encode())
        h.update(a.view(torch.uint8).numpy().tobytes() if a.numel() else b"")
    return h.hexdigest()


def save_checkpoint(path: Path, fingerprint: dict, epoch: int, groups: list[ReplicaGroup], R: int,
                    train_loss: list) -> None:
    """Write the checkpoint of the state after ``epoch`` completed epochs: every group's tensors, merged in
    replica order on the CPU, with the fingerprint and the history's ``train_loss`` rows."""
    _atomic_save({
        "fingerprint": json.dumps(fingerprint), "epoch": epoch,
        **{k: merged_rows(groups, R, itemgetter(k)) for k in STATE_KEYS},
        "history": {"train_loss": train_loss},
    }, path)


def _atomic_save(obj, path: Path):
    """``torch.save(obj)`` to ``path`` atomically (:func:`fastcurv.paths.replace_atomically`): a
    failed write, a full disk or Ctrl-C, leaves no temporary file behind (one as large as the
    checkpoint)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, lambda f: torch.save(obj, f))


def resume(path: Path, fingerprint: dict, epochs: int, pop: Population, device, dtype, history) -> int:
    """Load the checkpoint at ``path`` into ``pop`` (parameters in ``dtype``, on ``device``) and ``history``
    (its ``train_loss`` rows, ``resumed_from_epoch``) and return the epochs it holds; a ValueError naming the
    file when it is not one of this format, was written with another ``fingerprint`` (naming what differs)
    or holds more than ``epochs`` epochs."""
    ck = _load_checkpoint(path, device)
    old, new = ck["fingerprint"], json.loads(json.dumps(fingerprint))
    if old.get("version") != _CKPT_VERSION:
        raise ValueError(f"checkpoint {path} has format {old.get('version')}, this fastcurv writes "
                         f"{_CKPT_VERSION} (which also records the architecture): use another path")
    if old != new:
        raise ValueError(f"checkpoint {path} was written with different settings ({_settings_change(old, new)}); "
                         "use another path or the original settings")
    if int(ck["epoch"]) > epochs:
        raise ValueError(f"checkpoint {path} holds {int(ck['epoch'])} epochs, but epochs={epochs} was asked for: "
                         "a checkpoint can be extended, not shortened; ask for at least "
                         f"{int(ck['epoch'])} epochs, or use another path to train {epochs} from the start")
    pop.params = {n: ck["params"][n].to(device=device, dtype=dtype) for n in pop.params}
    for n, b_ in ck.get("buffers", {}).items():  # running statistics (checkpoints of models without any lack them)
        pop.buffers[n].copy_(b_)
    pop.state = ck["state"]
    pop.diverged, pop.done = ck["diverged"].to(device), ck["done"].to(device)
    pop.epochs_run = ck["epochs_run"].cpu()
    history.train_loss = [list(r) for r in ck["history"]["train_loss"]]
    history.resumed_from_epoch = int(ck["epoch"])
    return history.resumed_from_epoch


def _load_checkpoint(path: Path, device) -> dict:
    """The training checkpoint at ``path`` (its fingerprint decoded); a ValueError naming the file
    when it is damaged or not one (torch's own message advises ``weights_only=False``, which would
    run arbitrary code from the file)."""
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        raise ValueError(f"checkpoint {path} cannot be read ({type(exc).__name__}): it is damaged or not a fastcurv "
                         "training checkpoint; delete it or use another path") from None
    missing = [k for k in _CKPT_KEYS if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise ValueError(f"{path} is not a fastcurv training checkpoint (it has no {', '.join(missing)}); "
                         "delete it or use another path")
    try:
        fingerprint = json.loads(ck["fingerprint"])
    except (TypeError, json.JSONDecodeError):
        fingerprint = None
    if not isinstance(fingerprint, dict):
        raise ValueError(f"checkpoint {path} is damaged (unreadable fingerprint); delete it or use another path")
    return {**ck, "fingerprint": fingerprint}


def _settings_change(old: dict, new: dict) -> str:
    """What differs between two checkpoint fingerprints, the hyperparameters by name and short
    values as ``lr [0.05] -> [0.1]`` (the architecture by its first differing module)."""
    def flat(d):
        return {**{k: v for k, v in d.items() if k != "hp"}, **(d.get("hp") or {})}

    def show(v):  # per-replica values (float32-rounded) as one number when all agree
        if isinstance(v, list) and v and all(isinstance(u, float) for u in v):
            return f"{v[0]:.6g}" if len(set(v)) == 1 else "[" + ", ".join(f"{u:.6g}" for u in v) + "]"
        return repr(v)

    a, b = flat(old), flat(new)
    parts = []
    for key in describe_changes(a, b).split(", "):
        x, y = (show(d[key]) if key in d else None for d in (a, b))
        if x is not None and x == y and isinstance(a[key], list):  # one value for another number of replicas
            x, y = (f"{show(d[key])} x {len(d[key])}" for d in (a, b))
        parts.append(f"{key} {x} -> {y}" if x is not None and y is not None and len(x) + len(y) <= 120 else key)
    return ", ".join(parts)
