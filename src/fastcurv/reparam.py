"""Function-preserving reparameterizations of ReLU networks (Dinh et al. 2017), for showing which
measures survive them, and a canonical (balanced) form.

Every transform takes a list of replicas (``nn.Module``; an ``nn.ModuleList`` reads as the list of
its modules), never modifies them (the probe runs them in eval mode, then gives every submodule its
own mode back), and returns a :class:`ReparamResult` with the new models and, when a ``probe``
batch of inputs is given, the largest absolute and relative change of any output and the number of
changed argmax predictions on it. A transform warns (RuntimeWarning, "the transform is not
function-preserving ...") when a prediction flips or an output moves by more than ``OUTPUT_RTOL``
(1e-3) of that replica's largest output magnitude on the probe; ``bn_mode`` says how the probe runs
BatchNorm ("eval", or None: running statistics; "batch": each batch's own, as
``batched_sharpness(bn_mode="batch")``). The probe runs on copies of the caller's tensor: a model
that changes its input in place raises the operators' ValueError
(:data:`fastcurv.replicas.INPUT_CHANGED`), as every measurement of it would.

Layers are named by module name (``model.named_modules()``), in forward order; a pair
``(a, b)`` must be consecutive weight layers (Linear/Conv) with only a positively homogeneous
elementwise activation (ReLU, LeakyReLU, identity, max/avg pooling, flatten) between them, so that
scaling the hidden units between them is a symmetry. Without a probe, only the modules registered
between the two layers are checked (a BatchNorm or a known non-homogeneous module, e.g. GELU, Tanh,
Sigmoid, LayerNorm, warns); a skip connection or a function called in ``forward`` is found only by
the probe. When ``layers`` is None, all Linear/Conv modules in registration order are taken as the
chain (right for ``nn.Sequential`` MLPs/CNNs). Layers with computed weights (parametrizations such
as ``weight_norm``/``spectral_norm``) are refused: an in-place rescaling would scale a temporary.
"""
from __future__ import annotations

import contextlib
import copy
import math
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from .ambient import resetting_ambient
from .replicas import BN_MODES, check_output, functional_base, model_list, run_on_copy

_WEIGHT = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# modules that are not positively homogeneous (f(s x) != s f(x) for s > 0) or that mix units: a rescaling of
# the layer before them changes the function (Hardtanh covers ReLU6)
_NOT_HOMOGENEOUS = tuple(getattr(nn, n) for n in (
    "GELU", "SiLU", "Mish", "Tanh", "Sigmoid", "ELU", "SELU", "CELU", "GLU", "Softplus", "Softsign", "Hardtanh",
    "Hardswish", "Hardsigmoid", "LogSigmoid", "Tanhshrink", "Softshrink", "Hardshrink", "Threshold", "Softmax",
    "LogSoftmax", "Softmin", "LayerNorm", "GroupNorm", "RMSNorm", "LocalResponseNorm", "InstanceNorm1d",
    "InstanceNorm2d", "InstanceNorm3d") if hasattr(nn, n))
# the identity in eval mode: a BatchNorm after them still takes the layer's output
_PASS_THROUGH = (nn.Identity, nn.modules.dropout._DropoutNd)
NOT_PRESERVING = "the transform is not function-preserving"
OUTPUT_RTOL = 1e-3


@dataclass
class ReparamResult:
    """models: the transformed replicas. max_output_change: largest ``|f_new(x) - f_old(x)|`` over
    the probe batch and the replicas whose outputs were finite before (NaN without a probe).
    relative_output_change: the largest, over those replicas, of that change divided by the
    replica's largest ``|f_old(x)|``. predictions_changed: ``[R]`` number of probe inputs whose
    argmax changed. function_changed: whether a prediction flipped or the relative change passed
    ``OUTPUT_RTOL`` (None without a probe). details: transform-specific facts (e.g. balancing
    sweeps; ``nonfinite_replicas``: replicas whose outputs were NaN/Inf before, not compared)."""

    models: list
    max_output_change: float = float("nan")
    predictions_changed: torch.Tensor | None = None
    details: dict = field(default_factory=dict)
    relative_output_change: float = float("nan")
    function_changed: bool | None = None

    def __iter__(self):
        return iter(self.models)

    def __repr__(self):
        changed = None if self.predictions_changed is None else self.predictions_changed.tolist()
        return (f"ReparamResult(R={len(self.models)}, max_output_change={self.max_output_change:.3g}, "
                f"relative_output_change={self.relative_output_change:.3g}, predictions_changed={changed}, "
                f"details={self.details})")


def _check_bn_mode(bn_mode) -> str:
    """``bn_mode``, with None read as "eval" (as batched_sharpness and the operators read it)."""
    if bn_mode is None:
        return "eval"
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES} or None (= 'eval'), got {bn_mode!r}")
    return bn_mode


def weight_layers(model: nn.Module) -> list[str]:
    """Names of the Linear/Conv modules in registration order."""
    return [n for n, m in model.named_modules() if isinstance(m, _WEIGHT)]


def _check_plain_weights(name: str, layer: nn.Module) -> None:
    """A ValueError when ``layer``'s weight or bias is computed from other tensors (a parametrization,
    or old-style ``weight_norm``/``spectral_norm``): rescaling it in place would scale a temporary,
    silently leaving the layer as it was."""
    if parametrize.is_parametrized(layer):
        kinds = sorted({type(p).__name__ for ps in layer.parametrizations.values() for p in ps})
        what = f"parametrized ({', '.join(kinds)})"
        fix = f"torch.nn.utils.parametrize.remove_parametrizations(layer, {next(iter(layer.parametrizations))!r})"
    elif not all(isinstance(t, nn.Parameter) for t in (layer.weight, layer.bias) if t is not None):
        what = "computed (old-style torch.nn.utils.weight_norm or spectral_norm)"
        fix = "torch.nn.utils.remove_weight_norm(layer) or remove_spectral_norm(layer)"
    else:
        return
    raise ValueError(f"layer {name!r} has a {what} weight: the transforms rescale weights in place, which would scale "
                     f"a recomputed copy and leave the layer unchanged; remove it first with {fix}")


def _module(model, name):
    mods = dict(model.named_modules())
    if name not in mods:
        raise ValueError(f"no module named {name!r}; weight layers are {weight_layers(model)}")
    m = mods[name]
    if not isinstance(m, _WEIGHT):
        raise ValueError(f"module {name!r} is a {type(m).__name__}, not a Linear/Conv layer")
    _check_plain_weights(name, m)
    return m


def _copies(models: list, layers=()) -> list:
    """Deep copies of ``models``, after checking in every original that the named ``layers`` can be
    rescaled in place (old-style weight_norm layers cannot even be deep-copied)."""
    for m in models:
        for name in layers:
            _module(m, name)
    try:
        return [copy.deepcopy(m) for m in models]
    except RuntimeError as e:
        if "deepcopy protocol" not in str(e):
            raise
        raise ValueError("the models cannot be copied: a layer's weight is computed before each forward (old-style "
                         "torch.nn.utils.weight_norm or spectral_norm); remove it first with "
                         "torch.nn.utils.remove_weight_norm(layer) or remove_spectral_norm(layer)") from e


@contextlib.contextmanager
def _evaluating(*models: nn.Module):
    """Put ``models`` in eval mode for the block, then give every submodule back its own training flag
    (also after an exception): ``model.train(flag)`` would set one flag for all of them, switching
    back on, e.g., a Dropout the caller had put in eval mode inside a training model."""
    modes = [[(m, m.training) for m in model.modules()] for model in models]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for saved in modes:
            for m, flag in saved:
                m.training = flag


def _outputs(model: nn.Module, x, bn_mode: str) -> torch.Tensor:
    """``model(x)`` as fastcurv's measures see it: eval mode, BatchNorm with its running statistics
    ("eval") or with the batch's own statistics ("batch"); the model's modes and buffers unchanged.
    A model returning anything but one tensor (a tuple, a dict) raises :func:`check_output`'s TypeError."""
    if bn_mode == "batch":
        base = functional_base(model, "batch")  # (a meta copy: no running statistics to use or update)
        keep = {n for n, _ in base.named_buffers()}
        tensors = {**dict(model.named_parameters()), **{n: b for n, b in model.named_buffers() if n in keep}}
        return check_output(functional_call(base, tensors, (x,)))
    with _evaluating(model):  # (the caller's model: its modes stay as they were)
        return check_output(model(x))


def _output_rtol(dtype: torch.dtype) -> float:
    """The relative output (or loss) change that counts as a changed function: ``OUTPUT_RTOL``, or 64
    rounding units for half precision, whose rounding alone moves outputs by more."""
    return max(OUTPUT_RTOL, 64 * torch.finfo(dtype).eps) if dtype.is_floating_point else OUTPUT_RTOL


def change_summary(res: ReparamResult) -> str:
    """The probe's findings in words, for a warning."""
    text = (f"it changed {int(res.predictions_changed.sum())} predictions on the probe inputs (largest output change "
            f"{res.max_output_change:.3g}, {res.relative_output_change:.3g} of the replica's largest output)")
    bad = res.details.get("nonfinite_replicas")
    if bad:
        text += f"; replicas {bad} had non-finite outputs before the transform and were not compared"
    return text


def _report(old, new, probe, details=None, *, pairs=None, fold=False, bn_mode="eval") -> ReparamResult:
    """The result of a transform from ``old`` to ``new`` models, with the probe's changes (per replica,
    in ``bn_mode``) and a warning when the function changed. Without a probe, a warning when a module
    known to break a rescaling sits between the rescaled layers ``pairs`` ([(first, second)])."""
    new = list(new)
    if len(new) != len(old):
        raise ValueError(f"the transform returned {len(new)} models for {len(old)} replicas")
    res = ReparamResult(new, details=dict(details or {}))
    if probe is None:
        if pairs and _blockers(old[0], pairs):
            warnings.warn(f"{NOT_PRESERVING} for these models (seen from their modules; pass probe= to measure the "
                          f"change): {preservation_hint(old[0], pairs, bn_mode=bn_mode)}", RuntimeWarning, stacklevel=4)
        return res
    changes, relative, flips, bad = [], [], [], []
    with torch.no_grad():
        for r, (a, b) in enumerate(zip(old, new)):
            ref = next(a.parameters())
            p = probe.to(ref.device, ref.dtype) if probe.is_floating_point() else probe.to(ref.device)
            # (each on a copy of the probe: a model that changes its input in place raises INPUT_CHANGED, rather
            # than running b on the probe a changed and reporting a spurious change of the function)
            ya, yb = (run_on_copy(lambda pc, m=m: _outputs(m, pc, bn_mode), p) for m in (a, b))
            if not torch.isfinite(ya).all():  # (broken before the transform: nothing to compare)
                bad.append(r)
                changes.append(math.nan), relative.append(math.nan), flips.append(0)
                continue
            change = float((ya - yb).abs().max()) if torch.isfinite(yb).all() else math.inf
            scale = float(ya.abs().max())
            changes.append(change)
            relative.append(change / scale if scale > 0 else (0.0 if change == 0 else math.inf))
            flips.append(int((ya.argmax(-1) != yb.argmax(-1)).sum()) if ya.dim() >= 2 else 0)
    # (max() over a list starting with NaN is NaN: the NaN replicas are left out)
    res.max_output_change = max((c for c in changes if not math.isnan(c)), default=math.nan)
    res.relative_output_change = max((c for c in relative if not math.isnan(c)), default=math.nan)
    res.predictions_changed = torch.tensor(flips)
    if bad:
        res.details["nonfinite_replicas"] = bad
    res.function_changed = bool(sum(flips)) or res.relative_output_change > _output_rtol(ya.dtype)
    if res.function_changed:
        warnings.warn(f"{NOT_PRESERVING} for these models: {change_summary(res)}; "
                      f"{preservation_hint(old[0], pairs, fold=fold, bn_mode=bn_mode)}", RuntimeWarning, stacklevel=4)
    return res


def _blockers(model: nn.Module, pairs=None) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the BatchNorms and known non-homogeneous modules registered between the
    two layers of each pair (registration read as forward order); the whole model's when pairs is None."""
    named = list(model.named_modules())
    index = {n: i for i, (n, _) in enumerate(named)}
    if pairs is None:
        spans = [range(len(named))]
    else:
        spans = [range(index[a] + 1, index[b]) for a, b in pairs if a in index and b in index]
    found = {}
    for span in spans:
        for i in span:
            name, mod = named[i]
            if isinstance(mod, _NOT_HOMOGENEOUS + (_BatchNorm,)):
                found[name] = mod
    return list(found.items())


def preservation_hint(model: nn.Module, pairs=None, *, fold: bool = False, bn_mode: str = "eval") -> str:
    """Why a transform may not preserve ``model``'s function, and what to do about it. ``pairs``: the
    rescaled ``(first, second)`` layer names (None: the whole model is looked at); ``fold``: the
    transform was :func:`fold_batchnorm`."""
    if fold:
        return ("fold_batchnorm folds each BatchNorm into the Linear/Conv registered just before it, which keeps the "
                "function only when the BatchNorm takes that layer's output in forward (no activation, residual sum "
                "or other function called in forward between them) and normalizes with its running statistics")
    blockers = _blockers(model, pairs)
    bns = [n for n, m in blockers if isinstance(m, _BatchNorm)]
    others = [f"{type(m).__name__} {n!r}" for n, m in blockers if not isinstance(m, _BatchNorm)]
    reasons = []
    if bns:
        fix = ("with batch statistics (bn_mode='batch') no fold helps: rescale layers with no BatchNorm between them"
               if bn_mode == "batch" else
               "transform reparam.fold_batchnorm(models).models instead (eval BatchNorm folded into that layer)")
        reasons.append(f"the model has BatchNorm ({', '.join(map(repr, bns[:3]))}{', ...' if len(bns) > 3 else ''}), "
                       f"which undoes a rescaling of the layer before it: {fix}")
    if others:
        reasons.append(f"{', '.join(others[:3])}{', ...' if len(others) > 3 else ''} "
                       f"{'is' if len(others) == 1 else 'are'} not positively homogeneous: rescalings preserve the "
                       "function only through ReLU-like activations")
    if not reasons:
        reasons.append("the modules registered between the rescaled layers are ReLU-like, so the two layers are "
                       "probably not consecutive in forward: a skip/residual connection or a branch between them, or "
                       "a non-homogeneous function called in forward (e.g. torch.tanh), breaks the rescaling "
                       "symmetry; rescale two layers whose only link is a ReLU-like activation")
    return "; ".join(reasons)


def _in_factor(layer_in: nn.Module, layer_out: nn.Module, s: torch.Tensor) -> torch.Tensor:
    """The per-input-feature factor of ``layer_out`` for per-unit scales ``s`` of ``layer_in``'s outputs
    (a Conv -> Flatten -> Linear boundary repeats each channel's factor over its positions)."""
    units = s.numel()
    fan_in = layer_out.weight.shape[1] * (layer_out.groups if isinstance(layer_out, nn.modules.conv._ConvNd) else 1)
    if fan_in == units:
        return s
    if isinstance(layer_out, nn.Linear) and fan_in % units == 0:
        return s.repeat_interleave(fan_in // units)
    raise ValueError(f"cannot match {units} hidden units to the {fan_in} inputs of the next layer")


def _scale_units(layer_in: nn.Module, layer_out: nn.Module, s: torch.Tensor) -> None:
    """In place: unit j of layer_in's output scaled by s_j (weights and bias), layer_out's inputs by 1/s_j.
    ``s``: ``[units]`` on any device (the callers build it on the CPU), moved to the weights' device and dtype."""
    if isinstance(layer_out, nn.modules.conv._ConvNd) and layer_out.groups != 1:
        raise ValueError("grouped convolutions are not supported by unit rescaling")
    s = s.to(device=layer_in.weight.device, dtype=layer_in.weight.dtype)
    with torch.no_grad():
        shape = (-1,) + (1,) * (layer_in.weight.dim() - 1)
        layer_in.weight.mul_(s.view(shape))
        if layer_in.bias is not None:
            layer_in.bias.mul_(s)
        f = _in_factor(layer_in, layer_out, s)
        shape_out = (1, -1) + (1,) * (layer_out.weight.dim() - 2)
        layer_out.weight.div_(f.view(shape_out))


def _pairs(model, layers):
    names = list(layers) if layers is not None else weight_layers(model)
    if len(names) < 2:
        raise ValueError(f"need at least two consecutive weight layers, got {names}")
    return [(names[i], names[i + 1]) for i in range(len(names) - 1)]


@resetting_ambient
def rescale_layers(models: Sequence[nn.Module], alpha: float = 10.0, layers: tuple[str, str] | None = None,
                   probe: torch.Tensor | None = None, *, bn_mode: str = "eval") -> ReparamResult:
    """Dinh et al.'s alpha-rescaling: ``W1, b1 <- alpha W1, alpha b1`` and ``W2 <- W2 / alpha`` for the
    consecutive weight layers ``layers = (first, second)`` (default: the last two weight layers).

    The Hessian block of ``first`` shrinks by alpha^2 and that of ``second`` grows by alpha^2, so
    lambda_max grows by at most alpha^2, and only about that much when the grown block dominates.
    Measured on 8 MNIST MLPs 784-128-128-10 (README): the default with alpha = 10 gave 20x;
    shrinking the *first* layer instead (``alpha=0.1, layers=(first two weight layers)``) gave 66x;
    no prediction changed in either case. ``bn_mode``: how the probe runs BatchNorm (module docstring).
    """
    models = model_list(models)  # (architectures not compared; module hooks allowed: each model runs as it is)
    bn_mode = _check_bn_mode(bn_mode)
    if not (isinstance(alpha, (int, float)) and alpha > 0 and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    a, b = _pair(models[0], layers)
    new = _copies(models, (a, b))
    for m in new:
        la, lb = _module(m, a), _module(m, b)
        _scale_units(la, lb, torch.full((la.weight.shape[0],), float(alpha), dtype=torch.float64))
    return _report(models, new, probe, {"alpha": alpha, "layers": (a, b)}, pairs=[(a, b)], bn_mode=bn_mode)


def _pair(model: nn.Module, layers) -> tuple[str, str]:
    """``layers``, or the model's last two weight layers (a ValueError when it has fewer)."""
    if layers is not None:
        return tuple(layers)
    found = weight_layers(model)
    if len(found) < 2:
        raise ValueError(f"rescaling needs two consecutive weight layers, but the model has {len(found)} "
                         f"({', '.join(map(repr, found)) or 'none'})")
    return tuple(found[-2:])


@resetting_ambient
def rescale_neurons(models: Sequence[nn.Module], scales, layers: tuple[str, str] | None = None,
                    probe: torch.Tensor | None = None, *, bn_mode: str = "eval") -> ReparamResult:
    """Per-neuron rescaling: hidden unit j between ``layers = (first, second)`` gets incoming weights
    and bias times ``scales[j]`` and outgoing weights divided by it. ``scales``: positive ``[units]``
    (the same for every replica) or ``[R, units]``; default layers: the last two weight layers."""
    models = model_list(models)  # (architectures not compared; module hooks allowed: each model runs as it is)
    bn_mode = _check_bn_mode(bn_mode)
    a, b = _pair(models[0], layers)
    scales = torch.as_tensor(scales, dtype=torch.float64)
    if not torch.isfinite(scales).all() or (scales <= 0).any():
        raise ValueError("scales must be positive and finite")
    if scales.dim() not in (1, 2) or scales.dim() == 2 and scales.shape[0] != len(models):
        raise ValueError(f"scales must be [units] or [R, units] with R = {len(models)} replicas, got {tuple(scales.shape)}")
    new = _copies(models, (a, b))
    for r, m in enumerate(new):
        la, lb = _module(m, a), _module(m, b)
        s = scales if scales.dim() == 1 else scales[r]
        if s.numel() != la.weight.shape[0]:
            raise ValueError(f"scales has {s.numel()} entries but layer {a!r} has {la.weight.shape[0]} units")
        _scale_units(la, lb, s)
    return _report(models, new, probe, {"layers": (a, b)}, pairs=[(a, b)], bn_mode=bn_mode)


def _fold_plan(model: nn.Module) -> list[tuple[str, str]]:
    """``(batchnorm, layer)`` names: each BatchNorm with the Linear/Conv whose output it takes
    (:func:`_fold_walk`)."""
    return _fold_walk(model)[0]


def _fold_walk(model: nn.Module) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[tuple[str, str]]]:
    """``(plan, unverified, in_custom)``. plan: ``(batchnorm, layer)`` names, each BatchNorm with the Linear/Conv
    whose output it takes, read from registration order (exact inside ``nn.Sequential``; inside other
    modules, whose forward may combine their children otherwise, children are read in order and nothing
    is carried in). A module that is no Sequential carries out its last registered child only when that
    is a weight layer (e.g. a wrapper whose ``forward`` ends in its conv), as a candidate: the pairs
    built on one are also listed in ``unverified``, to be confirmed in forward with a probe
    (:func:`_check_fold_in_forward`; its forward may apply an activation after the layer). in_custom:
    the other pairs whose BatchNorm is a child of a module that is no Sequential (their registration
    order says nothing about its forward, which may put an activation between them). A ValueError
    names a BatchNorm that follows anything else (an activation, pooling, a block)."""
    plan, unverified, in_custom = [], [], []

    def walk(mod, name, prev, last, in_seq=True):
        """``(prev, last)`` after ``mod``: ``(name, layer, verified)`` of the weight layer whose output the
        next module takes (or None), and the last module seen (for the message). in_seq: whether
        ``mod``'s parent is an ``nn.Sequential`` (or ``mod`` is the model)."""
        if isinstance(mod, _BatchNorm):  # (every BatchNorm: 1d/2d/3d, SyncBatchNorm, lazy)
            if prev is None:
                where = f"follows {type(last[1]).__name__} {last[0]!r}" if last else "has no Linear/Conv before it"
                raise ValueError(f"BatchNorm {name!r} {where}, not a Linear/Conv: folding it into an earlier layer "
                                 "would change the function; fold_batchnorm folds only a BatchNorm that directly "
                                 "follows a Linear/Conv (or a module whose last registered child is one and whose "
                                 "forward returns that layer's output, checked with probe=)")
            if prev[1].weight.shape[0] != mod.num_features:
                raise ValueError(f"BatchNorm {name!r} does not follow a Linear/Conv with {mod.num_features} outputs "
                                 f"({prev[0]!r} has {prev[1].weight.shape[0]})")
            if mod.running_mean is None:
                raise ValueError(f"BatchNorm {name!r} has no running statistics to fold")
            _check_plain_weights(prev[0], prev[1])
            plan.append((name, prev[0]))
            if not prev[2]:
                unverified.append((name, prev[0]))
            elif not in_seq:
                in_custom.append((name, prev[0]))
            return None, (name, mod)
        if isinstance(mod, _WEIGHT):
            return (name, mod, True), (name, mod)
        if isinstance(mod, _PASS_THROUGH):
            return prev, last
        children = list(mod.named_children())
        if not children:  # an activation, pooling, any other leaf
            return None, (name, mod)
        sequential = isinstance(mod, nn.Sequential)
        inner = prev if sequential else None
        for child_name, child in children:
            inner, last = walk(child, f"{name}.{child_name}" if name else child_name, inner, last, sequential)
        if sequential:
            return inner, last
        # (its forward may not end in that layer: a candidate, for the probe to confirm)
        return (None if inner is None else (inner[0], inner[1], False)), (name, mod)

    walk(model, "", None, None)
    return plan, unverified, in_custom


def _check_fold_in_forward(model: nn.Module, plan, probe, unverified=()) -> None:
    """A ValueError when, running ``probe``, a planned BatchNorm does not take its layer's output as is
    (a function called in ``forward`` between them, or an in-place one: the tensor's version moved), or
    its layer runs more than once (the fold would change its other outputs too). The pairs in
    ``unverified`` (read from registration order out of a custom module) must also be reached."""
    mods = dict(model.named_modules())
    outs, ins, hooks, calls = {}, {}, [], {}

    def saver(store, name, pick):
        def hook(*args):  # (returns None: a hook's return value would replace the inputs or outputs)
            t = pick(args)
            calls[id(store), name] = calls.get((id(store), name), 0) + 1
            if name not in store and isinstance(t, torch.Tensor):
                store[name] = (t, t._version)
        return hook

    try:
        for bn_name, layer_name in plan:
            hooks.append(mods[layer_name].register_forward_hook(saver(outs, layer_name, lambda a: a[2])))
            hooks.append(mods[bn_name].register_forward_pre_hook(
                saver(ins, bn_name, lambda a: a[1][0] if a[1] else None)))
        ref = next(model.parameters())
        with torch.no_grad(), _evaluating(model):  # (on a copy of the probe, which the caller's model must not change)
            run_on_copy(model, probe.to(ref.device, ref.dtype) if probe.is_floating_point() else probe.to(ref.device))
    finally:
        for h in hooks:
            h.remove()
    for bn_name, layer_name in plan:
        if bn_name not in ins and (bn_name, layer_name) in unverified:
            raise ValueError(f"BatchNorm {bn_name!r} did not run on the probe, so whether it takes the output of "
                             f"{layer_name!r} (the last layer of the module before it) is unknown: folding it could "
                             "change the function")
        if bn_name in ins and (layer_name not in outs or outs[layer_name][0] is not ins[bn_name][0]
                               or outs[layer_name][1] != ins[bn_name][1]):
            raise ValueError(f"BatchNorm {bn_name!r} is registered after {layer_name!r} but in forward does not take "
                             "its output as is (something is computed between them): folding it would change the "
                             "function")
        if calls.get((id(outs), layer_name), 0) > 1:
            raise ValueError(f"layer {layer_name!r} runs {calls[id(outs), layer_name]} times in forward, but only one "
                             f"of its outputs goes through BatchNorm {bn_name!r}: folding it would change the others")


@resetting_ambient
def fold_batchnorm(models: Sequence[nn.Module], probe: torch.Tensor | None = None, *,
                   bn_mode: str = "eval") -> ReparamResult:
    """Fold every eval-mode BatchNorm into the Linear/Conv directly before it and replace the
    BatchNorm by ``nn.Identity`` (Dziugaite et al.'s ``_reparam``):
    ``W <- W * g / sqrt(var + eps)``, ``b <- (b - mean) * g / sqrt(var + eps) + beta``.

    A BatchNorm must directly follow its Linear/Conv (only Identity or Dropout between them, read
    from registration order, exact for ``nn.Sequential``; with a probe, also checked in forward):
    one after an activation, pooling or a block raises a ValueError. One after a custom module
    whose last registered child is a Linear/Conv (a wrapper such as ``conv(F.pad(x))``) is folded
    only with a probe, which must show the BatchNorm taking that layer's output (a ValueError
    without one). One inside a custom module (a BatchNorm registered after a Linear/Conv in a module
    that is no ``nn.Sequential``, e.g. a ResNet block) is folded without a probe with a
    RuntimeWarning naming it: the module's forward may put an activation between them, which only
    ``probe=`` checks (:func:`fastcurv.invariance_audit` always passes one). ``bn_mode=None`` reads
    as "eval". ``bn_mode="batch"`` raises: BatchNorm with each batch's statistics is no fixed affine
    map, so no fold preserves it."""
    models = model_list(models)  # (architectures not compared; module hooks allowed: each model runs as it is)
    bn_mode = _check_bn_mode(bn_mode)
    if bn_mode == "batch":
        raise ValueError("fold_batchnorm folds the running statistics; with bn_mode='batch' each BatchNorm normalizes "
                         "by the batch's own statistics, which no fold into the layer before reproduces: fold only "
                         "for bn_mode='eval'")
    walks = [_fold_walk(m) for m in models]
    plans, unverified, in_custom = [w[0] for w in walks], walks[0][1], walks[0][2]
    if unverified and probe is None:
        raise ValueError(f"BatchNorm {unverified[0][0]!r} follows a module whose last registered layer is "
                         f"{unverified[0][1]!r}, but whether its forward returns that layer's output (rather than, "
                         "e.g., an activation of it) cannot be read from the modules: pass probe= (a batch of inputs) "
                         "to check it in forward before folding")
    if in_custom and probe is None:
        names = ", ".join(repr(bn) for bn, _ in in_custom[:3]) + (", ..." if len(in_custom) > 3 else "")
        warnings.warn(f"fold_batchnorm: BatchNorm {names} folded unverified: inside a module that is no nn.Sequential "
                      f"it is paired with the layer registered before it ({in_custom[0][1]!r} for {in_custom[0][0]!r}), "
                      "but that module's forward may compute something between them (an activation), and the fold "
                      "then changes the function; pass probe= (a batch of inputs) to verify it in forward",
                      RuntimeWarning, stacklevel=3)
    new = _copies(models)
    if probe is not None and plans[0]:
        _check_fold_in_forward(new[0], plans[0], probe, unverified)
    for m, plan in zip(new, plans):
        mods = dict(m.named_modules())
        for bn_name, layer_name in plan:
            bn, layer = mods[bn_name], mods[layer_name]
            with torch.no_grad():
                inv = 1 / torch.sqrt(bn.running_var + bn.eps)
                g = bn.weight * inv if bn.affine else inv
                beta = bn.bias if bn.affine else torch.zeros_like(inv)
                layer.weight.mul_(g.view((-1,) + (1,) * (layer.weight.dim() - 1)))
                b0 = layer.bias if layer.bias is not None else torch.zeros_like(inv)
                new_b = (b0 - bn.running_mean) * g + beta
                if layer.bias is None:
                    layer.bias = nn.Parameter(new_b.to(layer.weight.dtype))
                else:
                    layer.bias.copy_(new_b)
            parent_name, _, attr = bn_name.rpartition(".")
            setattr(mods[parent_name] if parent_name else m, attr, nn.Identity())
    folded = len(plans[0])
    if not folded:
        warnings.warn("fold_batchnorm: the models have no BatchNorm to fold; they are returned unchanged", RuntimeWarning,
                      stacklevel=3)
    return _report(models, new, probe, {"folded": folded}, fold=True, bn_mode=bn_mode)


@resetting_ambient
def balance(models: Sequence[nn.Module], layers: Sequence[str] | None = None, *, tol: float = 1e-6,
            max_sweeps: int = 200, probe: torch.Tensor | None = None, bn_mode: str = "eval") -> ReparamResult:
    """Canonical form under per-neuron rescaling: every hidden unit gets equal incoming norm
    (its weights and bias) and outgoing norm, by repeated sweeps of ``s_j = sqrt(|out_j| / |in_j|)``
    over the chain ``layers`` until ``max |log s| <= tol``. The result minimizes ``||theta||^2``
    over the rescaling orbit, so two replicas that differ by a rescaling get the same parameters.
    ``details["sweeps"]`` and ``details["converged"]`` report the iteration."""
    models = model_list(models)  # (architectures not compared; module hooks allowed: each model runs as it is)
    bn_mode = _check_bn_mode(bn_mode)
    chain = _pairs(models[0], layers)
    new = _copies(models, sorted({n for pair in chain for n in pair}))
    sweeps_used, ok = 0, True
    for m in new:
        pairs = _pairs(m, layers)
        conv = False
        for sweep in range(max_sweeps):
            worst = 0.0
            for a, b in pairs:
                la, lb = _module(m, a), _module(m, b)
                with torch.no_grad():
                    win = la.weight.reshape(la.weight.shape[0], -1).to(torch.float64).pow(2).sum(1)
                    if la.bias is not None:
                        win = win + la.bias.to(torch.float64).pow(2)
                    units = la.weight.shape[0]
                    wo = lb.weight.to(torch.float64).transpose(0, 1).reshape(lb.weight.shape[1], -1).pow(2).sum(1)
                    if wo.numel() != units:
                        wo = wo.reshape(units, -1).sum(1)
                    s = (wo.sqrt() / win.sqrt()).sqrt()
                    s = torch.where(torch.isfinite(s) & (s > 0), s, torch.ones_like(s))
                worst = max(worst, float(s.log().abs().max()))
                _scale_units(la, lb, s)
            sweeps_used = max(sweeps_used, sweep + 1)
            if worst <= tol:
                conv = True
                break
        ok &= conv
    return _report(models, new, probe, {"sweeps": sweeps_used, "converged": ok}, pairs=chain, bn_mode=bn_mode)
