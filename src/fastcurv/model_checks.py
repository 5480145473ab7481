"""Whether models are replicas of one architecture (:func:`validate_models`): the same parameters
and buffers, module classes, parametrizations and settings, and no module hooks; weight tying
(:func:`tied_parameters`).
"""
from __future__ import annotations

import types
import warnings
import weakref
from enum import Enum
from typing import Sequence

from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrizations as _parametrizations
from torch.nn.utils import parametrize


# the TypeError of an entry point that takes a list of models only, given a ReplicaSet
REPLICA_SET_NOT_TAKEN = ("models must be the list of nn.Module replicas here; a ReplicaSet is taken by HessianOperator "
                         "(and GGNOperator, EmpiricalFisherOperator), function_measures and collect_predictions only")

# torch's spectral-norm and orthogonal parametrizations (their settings compared specially); None where torch has none
_TORCH_SPECTRAL_NORM = getattr(_parametrizations, "_SpectralNorm", None)
_TORCH_ORTHOGONAL = getattr(_parametrizations, "_Orthogonal", None)


def module_settings(mod: nn.Module) -> dict:
    """A module's public attributes that are numbers, strings or tuples of them: its settings
    (``negative_slope``, ``stride``, ``eps``...), including those ``extra_repr()`` does not show,
    e.g. a loss module's ``label_smoothing``."""
    def simple(v):
        return v is None or isinstance(v, (bool, int, float, str)) or (
            isinstance(v, (tuple, list)) and all(simple(x) for x in v))

    return {k: v for k, v in vars(mod).items() if not k.startswith("_") and k != "training" and simple(v)}


# torch.nn containers: their forward reads no attribute (a tag such as ``model.seed = 3`` changes nothing)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


# torch.nn layers with lazy forms (LazyLinear, LazyConvNd, LazyBatchNorm, LazyInstanceNorm derive from them)
_LAZY_FORMS = (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase)


def _is_torch_module(mod: nn.Module) -> bool:
    return type(mod).__module__.startswith("torch.nn")


def _compared_settings(mod: nn.Module, training: bool) -> dict:
    """The settings of ``mod`` that change what fastcurv computes with it: every simple attribute and
    the functions it holds (by name: a Transformer layer's ``activation``), but none of a torch.nn
    container's. ``inplace`` never does; in eval mode (every measurement) neither do dropout rates
    (``nn.Dropout``'s ``p``, ``dropout`` of attention and recurrent layers), BatchNorm's
    ``momentum`` nor spectral norm's ``n_power_iterations`` (its eval-mode forward runs no power
    iteration), so a sweep over them measures as one population. The input sizes of torch's
    layers that have lazy forms (``in_features``, ``in_channels``, ``num_features``) are left to the
    parameter and buffer shapes, which hold them: a lazy layer materialized by ``load_state_dict``
    keeps 0 there until its first forward."""
    if isinstance(mod, _CONTAINERS) and _is_torch_module(mod):
        return {}
    s = module_settings(mod)
    if _is_torch_module(mod) and isinstance(mod, _LAZY_FORMS):
        for k in ("in_features", "in_channels", "num_features"):
            s.pop(k, None)
    s.update({k: f"{getattr(v, '__module__', '')}.{v.__qualname__}" for k, v in vars(mod).items()
              if not k.startswith("_") and isinstance(v, (types.FunctionType, types.BuiltinFunctionType))})
    s.pop("inplace", None)
    if not training:
        s.pop("dropout", None)
        if isinstance(mod, nn.modules.dropout._DropoutNd):
            s.pop("p", None)
        if isinstance(mod, nn.modules.batchnorm._NormBase):
            s.pop("momentum", None)
        if _TORCH_SPECTRAL_NORM is not None and isinstance(mod, _TORCH_SPECTRAL_NORM):
            s.pop("n_power_iterations", None)  # (the power iterations run in training mode only)
    return s


def _setting_differences(ref: list[tuple[str, dict]], m: nn.Module, training: bool):
    """``(module name, module, key, replica 0's value, this replica's value)`` for the first setting
    that differs in each module of ``m`` from replica 0's, ``ref`` (its modules' names and
    :func:`_compared_settings`)."""
    for (name, sa), (_, b) in zip(ref, m.named_modules()):
        sb = _compared_settings(b, training)
        if sa != sb:
            key = next(k for k in sorted(set(sa) | set(sb), key=str) if sa.get(k, "(none)") != sb.get(k, "(none)"))
            yield name or "(model)", b, key, sa.get(key, "(none)"), sb.get(key, "(none)")


def _check_settings(models: list, training: bool) -> None:
    """Raise when a replica's torch.nn modules are set up otherwise than replica 0's; warn (once per
    module and attribute) when a custom module's simple attributes differ: every replica runs
    through replica 0's modules (with its own parameters and buffers), so such a setting would
    silently be replica 0's."""
    custom: dict = {}
    ref = [(name, _compared_settings(a, training)) for name, a in models[0].named_modules()]
    for i, m in enumerate(models[1:], start=1):
        for name, mod, key, v0, v in _setting_differences(ref, m, training):
            what = f"module {name!r} ({type(mod).__name__}) has {key}={v!r}, replica 0 has {key}={v0!r}"
            if _is_torch_module(mod):
                raise ValueError(f"replica {i} differs from replica 0: {what}; every replica runs through replica "
                                 "0's modules, so the population must share its layers' settings (measure such "
                                 "replicas in separate calls)")
            custom.setdefault((name, key), (i, what, []))[2].append(i)
    for (name, key), (i, what, which) in custom.items():
        warnings.warn(f"replicas {which} differ from replica 0 in module {name!r}'s attribute {key!r} (replica {i}: "
                      f"{what}): every replica runs through replica 0's modules with its own parameters and buffers; "
                      "if forward() reads this attribute, the other replicas are computed with replica 0's value",
                      RuntimeWarning, stacklevel=4)


# (module attribute, what it holds): the hooks that observe or change what a module computes
_HOOK_KINDS = (("_forward_pre_hooks", "forward pre-hook"), ("_forward_hooks", "forward hook"),
               ("_backward_pre_hooks", "backward pre-hook"), ("_backward_hooks", "backward hook"))


def _describe_hook(hook) -> tuple[str, str]:
    """``(what hook is, what to do about it before measuring)``: torch's reparametrizing hooks
    (pruning, the old weight and spectral norm) are named with their removers; anything else is
    removed by its handle."""
    from torch.nn.utils import prune
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    kind = type(hook).__name__
    if isinstance(hook, prune.BasePruningMethod):
        t = hook._tensor_name
        return (f"{kind} of torch.nn.utils.prune, which computes {t!r} from {t + '_orig'!r} and {t + '_mask'!r}",
                f"make the pruning permanent first with torch.nn.utils.prune.remove(module, {t!r}) (the pruned "
                "entries become zeros of a plain parameter)")
    if isinstance(hook, WeightNorm):
        return (f"torch.nn.utils.weight_norm's, which computes {hook.name!r}",
                "remove it first with torch.nn.utils.remove_weight_norm(module)")
    if isinstance(hook, SpectralNorm):
        return (f"torch.nn.utils.spectral_norm's, which computes {hook.name!r}",
                "remove it first with torch.nn.utils.remove_spectral_norm(module)")
    return (f"the hook {getattr(hook, '__qualname__', kind)}",
            "remove the hooks before measuring (handle.remove() on the handle their register_*_hook call returned), "
            "or do what they do in the model's forward()")


def _is_lazy_init_hook(mod: nn.Module, hook) -> bool:
    """Whether ``hook`` is torch's own lazy-initialization pre-hook of ``mod`` (a ``LazyLinear``...):
    ``LazyModuleMixin._infer_parameters``, which stays registered until the first forward even when
    ``load_state_dict`` materialized the parameters, and then does nothing but turn the module into
    its non-lazy class (``cls_to_become``)."""
    return (isinstance(mod, LazyModuleMixin) and getattr(hook, "__self__", None) is mod
            and getattr(hook, "__func__", None) is getattr(type(mod), "_infer_parameters", None))


# (tensor attribute, what it holds): the gradient hooks of a parameter (``Tensor.register_hook``,
# ``register_post_accumulate_grad_hook``), which change or observe what an optimizer sees
_TENSOR_HOOK_KINDS = (("_backward_hooks", "gradient hook (Tensor.register_hook)"),
                      ("_post_accumulate_grad_hooks", "post-accumulate-grad hook"))


def _check_tensor_hooks(models: list, template: bool = False) -> None:
    """Raise a ValueError naming the first parameter of any replica that has a gradient hook
    (``p.register_hook(...)``, e.g. a mask keeping part of a weight fixed, or
    ``p.register_post_accumulate_grad_hook(...)``). Training computes the gradients of stacked copies
    of the parameters (closed-form on the fused path), where no such hook runs: the replicas would
    train as if it were not there (a masked row moved by 0.03 in one SGD epoch). The measures do
    not look at them: a gradient hook changes what an optimizer sees, not the loss whose curvature
    is measured, and every backend differentiates copies of the parameters, which have none.
    ``template``: ``models`` is ``[the template module]`` train_population copies per replica
    (``copy.deepcopy`` drops tensor hooks: its copies have none to find)."""
    for i, m in enumerate(models):
        for name, p in m.named_parameters():
            for attr, kind in _TENSOR_HOOK_KINDS:
                if getattr(p, attr, None):
                    raise ValueError(
                        f"{'the template model' if template else f'replica {i}'}'s parameter {name!r} has a {kind}: "
                        "train_population does not run gradient "
                        "hooks (it differentiates stacked copies of the parameters), so the replicas would train "
                        "as if it were not there. Remove it (handle.remove() on the handle its register call "
                        "returned) and train without it, or train with a torch.optim loop; requires_grad_(False) "
                        "keeps a whole parameter fixed")


def _check_hooks(models: list, training: bool = False) -> None:
    """Raise a ValueError naming the first module hook (forward, forward pre-, backward or backward
    pre-hook) on any replica's modules, and with ``training`` the first parameter gradient hook
    (:func:`_check_tensor_hooks`). fastcurv runs every replica through one functional copy of
    replica 0's modules: another replica's hooks would be ignored and replica 0's applied to every
    replica, and the fused engines run no hooks at all, so even hooks alike on every replica are
    refused. (Global hooks, ``torch.nn.modules.module.register_module_forward_hook``, are not
    looked at: they apply to every module call alike.) torch's own lazy-initialization hook of a
    lazy module (``LazyLinear``...) is no hook of the user's: it is ignored once the parameters are
    materialized (by ``load_state_dict``), and a lazy module still uninitialized raises a ValueError
    asking for one forward pass first."""
    for i, m in enumerate(models):
        for name, mod in m.named_modules():
            if isinstance(mod, LazyModuleMixin) and mod.has_uninitialized_params():
                raise ValueError(f"replica {i}'s module {name or '(model)'!r} ({type(mod).__name__}) is a lazy module "
                                 "whose parameters are not initialized yet: run one forward pass (model(x)) or "
                                 "load_state_dict to materialize them before measuring")
            for attr, kind in _HOOK_KINDS:
                hooks = [h for h in getattr(mod, attr, {}).values() if not _is_lazy_init_hook(mod, h)]
                if hooks:
                    what, remedy = _describe_hook(hooks[0])
                    raise ValueError(
                        f"replica {i} has a {kind} on module {name or '(model)'!r} ({type(mod).__name__}): {what}. "
                        "fastcurv does not support module hooks (every replica runs through one copy of replica 0's "
                        "modules, so another replica's hooks would be ignored and replica 0's applied to every "
                        f"replica, and the fused engines run none): {remedy}")
    if training:
        _check_tensor_hooks(models)


class _ValidatedModels(list):
    """The list :func:`validate_models` returns: it remembers the models it was checked with (weak
    references, so that a freed model whose id another one reuses is not taken for it) and whether
    the training-mode settings were compared too, so that the entry points' nested calls
    (``batched_sharpness`` validates, then the ReplicaSet it builds would validate the same list
    again; chunked jobs validate each chunk's slice) skip a second pass over every replica's
    parameters. A slice of such a list, taken while it still holds the models it checked, counts as
    checked too (replicas that all match replica 0 match each other)."""

    def __init__(self, models: list, training: bool, checked: tuple | None = None):
        super().__init__(models)
        self.checked = checked if checked is not None else (tuple(map(weakref.ref, models)), training)

    def __getitem__(self, index):
        got = super().__getitem__(index)
        if isinstance(index, slice) and got and _validated(self, False):
            return _ValidatedModels(got, self.checked[1])
        return got


def _module_class(mod: nn.Module) -> type:
    """``mod``'s class as the replicas are compared by: an initialized lazy module counts as the
    class torch turns it into at its first forward (``LazyLinear`` -> ``Linear``), so that a replica
    run once is not taken for another architecture than one materialized by ``load_state_dict``; a
    parametrized module as its original class (``ParametrizedLinear`` -> ``Linear``: torch makes a
    class of its own for every parametrized module, so two replicas' never share one; their
    parametrizations are compared by :func:`_check_parametrizations`)."""
    if isinstance(mod, LazyModuleMixin) and getattr(mod, "cls_to_become", None) is not None \
            and not mod.has_uninitialized_params():
        return mod.cls_to_become
    cls = type(mod)
    if _is_parametrized_class(cls) and parametrize.is_parametrized(mod):
        return cls.__bases__[0]
    return cls


def _is_parametrized_class(cls: type) -> bool:
    """Whether ``cls`` is a class ``torch.nn.utils.parametrize`` made for one module when it
    registered the module's first parametrization (``ParametrizedLinear``: the module's original
    class, its only base, with a property for each parametrized tensor)."""
    return (cls.__module__ == parametrize.__name__ and len(cls.__bases__) == 1
            and cls.__name__ == f"Parametrized{cls.__bases__[0].__name__}")


def _parametrization_settings(p: nn.Module, training: bool) -> dict:
    """What defines the function of the parametrization module ``p`` besides its class and its
    buffers: its settings (:func:`_compared_settings`: weight norm's ``dim``; spectral norm's ``dim``
    and ``eps``, and ``n_power_iterations`` when ``training``, the only mode whose forward runs the
    power iterations), its enumerated ones (orthogonal's ``orthogonal_map``, by name) and, for
    torch's orthogonal parametrization, ``use_trivialization`` (whether it holds a ``base``)."""
    s = _compared_settings(p, training)
    s.update({k: v.name for k, v in vars(p).items() if not k.startswith("_") and isinstance(v, Enum)})
    if _TORCH_ORTHOGONAL is not None and isinstance(p, _TORCH_ORTHOGONAL):
        s["use_trivialization"] = "base" in p._buffers
    return s


def _parametrizations_of(mod: nn.Module, training: bool) -> dict:
    """``{tensor name: (number of original tensors, ((class, settings), ...))}``: the
    parametrizations of ``mod``'s tensors (``torch.nn.utils.parametrize``), in the order torch
    applies them, with :func:`_parametrization_settings`; ``{}`` for a module without any."""
    if not parametrize.is_parametrized(mod):
        return {}
    return {t: (plist.ntensors, tuple((_module_class(p), _parametrization_settings(p, training)) for p in plist))
            for t, plist in mod.parametrizations.items()}


def _describe_chain(chain: tuple) -> str:
    """A tensor's parametrizations (see :func:`_parametrizations_of`) in words, e.g.
    ``_WeightNorm(dim=0) then _SpectralNorm(dim=0, eps=1e-12)``."""
    return " then ".join(f"{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in sorted(s.items()))})"
                         for cls, s in chain[1])


def _describe_tensors(parametrized: dict) -> str:
    """A module's parametrized tensors (:func:`_parametrizations_of`) in words, e.g.
    ``'weight' (by _WeightNorm(dim=0))``, or ``nothing``."""
    return ", ".join(f"{t!r} (by {_describe_chain(c)})" for t, c in parametrized.items()) or "nothing"


def _chain_difference(a: tuple, b: tuple) -> str:
    """The first difference between two tensors' parametrizations (see :func:`_parametrizations_of`),
    ``b`` another replica's and ``a`` replica 0's, in words."""
    if len(a[1]) != len(b[1]):
        return (f"is computed by {len(b[1])} parametrizations, {_describe_chain(b)}, where replica 0's by "
                f"{len(a[1])}, {_describe_chain(a)}")
    for j, ((ca, sa), (cb, sb)) in enumerate(zip(a[1], b[1])):
        if ca is not cb:
            hint = (" (two classes of one name: a parametrization class defined anew for each model; define it "
                    "once)") if ca.__name__ == cb.__name__ else ""
            return f"parametrization {j} is {cb.__name__} where replica 0's is {ca.__name__}{hint}"
        if sa != sb:
            key = next(k for k in sorted(set(sa) | set(sb), key=str) if sa.get(k, "(none)") != sb.get(k, "(none)"))
            return (f"parametrization {j} ({cb.__name__}) has {key}={sb.get(key, '(none)')!r} where replica 0's has "
                    f"{key}={sa.get(key, '(none)')!r}")
    return f"parametrizations are computed from {b[0]} tensors where replica 0's are from {a[0]}"


def _check_parametrizations(ref: dict, m: nn.Module, i: int, training: bool) -> None:
    """Raise a ValueError naming the first module of replica ``i``, ``m``, whose parametrizations
    (``torch.nn.utils.parametrize``: weight norm, spectral norm, orthogonal, the user's own) differ
    from replica 0's, ``ref`` (module name -> :func:`_parametrizations_of`, parametrized modules
    only), and how: other parametrized tensors, other parametrization classes or order, other
    settings. Every replica runs through replica 0's parametrizations. Modules of names replica 0
    lacks are left to the comparison of the module classes."""
    mods = dict(m.named_modules())
    names = list(ref) + [n for n, mod in mods.items() if n not in ref and parametrize.is_parametrized(mod)]
    for name in names:
        a, mod = ref.get(name, {}), mods.get(name)
        if mod is None:
            continue
        b = _parametrizations_of(mod, training)
        if a == b:
            continue
        where = f"replica {i} differs from replica 0: module {name or '(model)'!r} ({_module_class(mod).__name__})"
        tail = ("; every replica runs through replica 0's parametrizations, so they must match (measure such replicas "
                "in separate calls)")
        if list(a) != list(b):
            raise ValueError(f"{where} parametrizes {_describe_tensors(b)} where replica 0's parametrizes "
                             f"{_describe_tensors(a)}{tail}")
        t = next(t for t in a if a[t] != b[t])
        raise ValueError(f"{where}: its {t!r} {_chain_difference(a[t], b[t])}{tail}")


def _validated(models, training: bool) -> bool:
    """Whether ``models`` is a list :func:`validate_models` returned, still holding the very models
    it checked (with the training-mode settings compared when ``training``)."""
    if type(models) is not _ValidatedModels:
        return False
    refs, was_training = models.checked
    return (len(refs) == len(models) and all(ref() is m for ref, m in zip(refs, models))
            and (was_training or not training))


def model_list(models) -> list[nn.Module]:
    """``models`` as a new list of modules, with the entry points' errors for what is not one: a
    ``ReplicaSet``, a single module, an empty list, an entry that is not a module. An
    ``nn.ModuleList`` reads as the list of its modules (it has no forward: a container of replicas,
    not a model)."""
    from .replicas import ReplicaSet  # (here: fastcurv.replicas imports this module)

    if isinstance(models, ReplicaSet):
        raise TypeError(REPLICA_SET_NOT_TAKEN)
    if isinstance(models, nn.ModuleList):
        models = list(models)
    if isinstance(models, nn.Module):
        raise TypeError("models must be a list of nn.Module replicas, not a single module; wrap it as [model]")
    models = list(models)
    if not models:
        raise ValueError("models is empty: pass a list of at least one nn.Module")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(f"replica {i} is a {type(m).__name__}, not an nn.Module")
    return models


def validate_models(models: Sequence[nn.Module], *, training: bool = False) -> list[nn.Module]:
    """``models`` as a new list, after raising a clear error when they cannot be stacked as replicas
    of one architecture: the same parameters and buffers (names, shapes, dtypes, devices), module
    classes (an initialized lazy module counting as the class it becomes after its first forward,
    e.g. ``LazyLinear`` as ``Linear``; a parametrized module as its original class, e.g.
    ``ParametrizedLinear`` as ``Linear``), parametrizations (``torch.nn.utils.parametrize``: weight
    norm, spectral norm, orthogonal or the user's own; the same tensors, parametrization classes in
    the same order and settings, see :func:`_check_parametrizations`) and built-in modules'
    settings (``training``: also those that matter only in training mode, dropout's ``p``,
    BatchNorm's ``momentum`` and spectral norm's ``n_power_iterations``), and no module hooks on any
    replica (see :func:`_check_hooks`: they would not run faithfully); with ``training``, no
    gradient hooks on parameters either (:func:`_check_tensor_hooks`: training would not run them).

    The list returned remembers that it was checked: given back here while it holds the same models
    (and ``training`` asks for no more than was checked), only the hooks are checked again (a hook
    can be added to a model at any time), so that the ReplicaSet an entry point builds from the
    list it validated does not walk every replica's parameters again. The caller's list is never
    returned itself (callers may write into the list they get)."""
    from .replicas import ReplicaSet  # (here: fastcurv.replicas imports this module)

    if isinstance(models, ReplicaSet):
        raise TypeError(REPLICA_SET_NOT_TAKEN)
    if _validated(models, training):
        _check_hooks(models, training)
        return _ValidatedModels(models, training, models.checked)
    models = model_list(models)
    _check_hooks(models, training)
    ref_params = list(models[0].named_parameters())
    if not ref_params:
        raise ValueError("replica 0 has no parameters: there is no curvature to compute")
    dtypes = {p.dtype for _, p in ref_params}
    devices = {p.device for _, p in ref_params}
    first_name, first = ref_params[0]
    if len(dtypes) > 1:
        name, p = next((n, p) for n, p in ref_params if p.dtype != first.dtype)
        raise ValueError(f"replica 0 mixes parameter dtypes: {name!r} is {p.dtype}, {first_name!r} {first.dtype}; "
                         "convert the model to one dtype")
    if len(devices) > 1:
        name, p = next((n, p) for n, p in ref_params if p.device != first.device)
        raise ValueError(f"replica 0 has parameters on several devices: {name!r} on {p.device}, {first_name!r} on "
                         f"{first.device}; move it to one device")
    if not next(iter(dtypes)).is_floating_point:
        raise ValueError(f"parameters must be floating point, got {next(iter(dtypes))}")
    ref_types = [_module_class(mod) for _, mod in models[0].named_modules()]
    ref_parametrized = {name: _parametrizations_of(mod, training) for name, mod in models[0].named_modules()
                        if parametrize.is_parametrized(mod)}
    for i, m in enumerate(models[1:], start=1):
        _check_parametrizations(ref_parametrized, m, i, training)
        params = list(m.named_parameters())
        for (n0, p0), (n, p) in zip(ref_params, params):
            if n0 != n:
                raise ValueError(f"replica {i} differs from replica 0: parameter {n!r} where replica 0 has {n0!r}")
            if p.shape != p0.shape:
                raise ValueError(
                    f"replica {i} differs from replica 0: parameter {n!r} has shape {tuple(p.shape)}, replica 0 has {tuple(p0.shape)}"
                )
            if p.dtype != p0.dtype:
                raise ValueError(f"replica {i} has dtype {p.dtype} for {n!r} but replica 0 has {p0.dtype}: mixed dtypes")
            if p.device != p0.device:
                raise ValueError(
                    f"replica {i} has {n!r} on {p.device} but replica 0 is on {p0.device}: move all replicas to one device"
                )
        if len(params) != len(ref_params):
            extra = params[len(ref_params)][0] if len(params) > len(ref_params) else ref_params[len(params)][0]
            raise ValueError(
                f"replica {i} differs from replica 0: {len(params)} parameters vs {len(ref_params)} (first unmatched: {extra!r})"
            )
        types = [_module_class(mod) for _, mod in m.named_modules()]
        if types != ref_types:
            for j, (a, b) in enumerate(zip(ref_types, types)):
                if a is not b:
                    break
            else:
                j = min(len(types), len(ref_types))
            names = [n for n, _ in m.named_modules()]
            where = repr(names[j]) if j < len(names) else "(end)"
            got = types[j].__name__ if j < len(types) else "nothing"
            want = ref_types[j].__name__ if j < len(ref_types) else "nothing"
            same_name = j < len(types) and j < len(ref_types) and got == want
            hint = (" (two classes of one name: a class defined anew for each model, e.g. inside the function that "
                    "builds it; define it once)") if same_name else ""
            raise ValueError(f"replica {i} differs from replica 0: module {where} is {got}, replica 0 has {want}{hint}")
    _check_settings(models, training)
    ref_buffers = [(n, tuple(b.shape)) for n, b in models[0].named_buffers()]
    for i, m in enumerate(models[1:], start=1):
        buffers = [(n, tuple(b.shape)) for n, b in m.named_buffers()]
        if buffers != ref_buffers:
            (n0, s0), (n, s) = next(((a, b) for a, b in zip(ref_buffers + [("(none)", ())], buffers + [("(none)", ())])
                                     if a != b))
            raise ValueError(f"replica {i} differs from replica 0 in its buffers: {n!r} {s} where replica 0 has "
                             f"{n0!r} {s0}")
    return _ValidatedModels(models, training)


def tied_parameters(model: nn.Module) -> dict[str, str]:
    """``{name: first name}`` for every parameter that one tensor holds under several names
    (weight tying), the first being the name ``named_parameters()`` keeps."""
    first: dict[int, str] = {}
    ties = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            ties[name] = first[id(p)]
        else:
            first[id(p)] = name
    return ties
