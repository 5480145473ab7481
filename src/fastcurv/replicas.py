"""Stacking R same-architecture models into one batched parameter set (replica axis R).

Flat vector layout used everywhere in fastcurv: ``[R, P]`` or ``[R, K, P]``, P = the number of
parameter entries in ``model.parameters()`` order, each parameter flattened row-major.
"""
from __future__ import annotations

import copy
import ctypes
import sys
import types
import warnings
import weakref
from enum import Enum
from typing import Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrizations as _parametrizations
from torch.nn.utils import parametrize

BN_MODES = ("eval", "batch")
# every BatchNorm: BatchNorm1d/2d/3d, SyncBatchNorm (DDP checkpoints, convert_sync_batchnorm) and the lazy ones
_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)

# the TypeError of an entry point that takes a list of models only, given a ReplicaSet
REPLICA_SET_NOT_TAKEN = ("models must be the list of nn.Module replicas here; a ReplicaSet is taken by HessianOperator "
                         "(and GGNOperator, EmpiricalFisherOperator), function_measures and collect_predictions only")


def nonfinite_rows(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[R]`` bool: replica ``r`` has a NaN/Inf entry in any of the ``[R, ...]`` tensors.

    A finite row sum implies finite entries (NaN and Inf propagate through sums), so one summing
    pass clears almost every row; only rows whose sum is not finite (a NaN/Inf, or a float overflow
    of the sum) get the exact elementwise check.
    """
    R = tensors[0].shape[0]
    bad = torch.zeros(R, dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        t = t.reshape(R, -1)
        maybe = ~torch.isfinite(t.sum(1))
        if bool(maybe.any()):
            rows = maybe.nonzero().squeeze(1)
            bad[rows] |= ~torch.isfinite(t[rows]).all(1)
    return bad


def consecutive_runs(index: torch.Tensor | None, n: int):
    """The runs of consecutive replicas in ``index`` (None: ``0..n-1``), as ``(first replica,
    first position in index, length)``: replicas ``first..first+length-1`` sit at positions
    ``position..position+length-1`` of ``index``, so both are slices (views, not copies)."""
    if index is None:
        yield 0, 0, n
        return
    v = index.tolist()
    start = 0
    for j in range(1, len(v) + 1):
        if j == len(v) or v[j] != v[j - 1] + 1:
            yield v[start], start, j - start
            start = j


def check_output(out) -> torch.Tensor:
    """``out``, a model's output, after raising a TypeError unless it is one tensor."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model returns a {type(out).__name__}; fastcurv needs one tensor of outputs (wrap the "
                        "model in a module whose forward returns the tensor the loss takes)")
    return out


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


#: the ValueError of every entry point for a model that changes its input in place (:func:`run_on_copy`)
INPUT_CHANGED = ("the model changes its input in place (an in-place operation on the input, such as ReLU(inplace=True) "
                 "as its first layer, or x -= mean); fastcurv passes the same batches to it many times (and would "
                 "change the caller's data): make that operation out of place (x = x - mean)")


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` hold the same values, NaN equal to NaN (True on the meta device, which
    holds none)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if "meta" in (a.device.type, b.device.type):
        return True
    with torch.no_grad():
        return torch.equal(a, b) or ((a.is_floating_point() or a.is_complex())
                                     and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))


def _in_storage(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` lies inside its storage: False for a tensor whose storage was
    freed or shrunk under it (``untyped_storage().resize_(0)``, as FSDP does), which reading (a value
    comparison, even ``torch.equal``) would crash the process on."""
    if t.numel() == 0 or t.device.type == "meta" or t.layout != torch.strided:
        return True
    last = t.storage_offset() + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return t.untyped_storage().nbytes() >= (last + 1) * t.element_size()


# checked_call's errors for a forward that writes into a parameter or a buffer of the replica
_WRITTEN_IN_FORWARD = {
    "params": ("the model writes into its parameter {!r} in forward (nn.Embedding(max_norm=...) renormalizes the rows "
               "it looks up in place): fastcurv evaluates each replica as one fixed function, many times, at the "
               "weights the models hold; renormalize the weights once beforehand and build the model without the "
               "in-place write (max_norm=None)"),
    "buffers": ("the model updates its buffer {!r} in forward in eval mode (a call counter, a quantization observer's "
                "statistics, an average updated whatever the mode): fastcurv evaluates each replica as one fixed "
                "function, many times, with the buffers the models hold; make the update conditional on training "
                "(if self.training: ...), or keep that state out of the model's buffers"),
}


def run_on_copy(run, x):
    """``run(c)`` on a copy ``c`` of the tensor ``x`` (anything else is passed as it is), after raising
    the ValueError :data:`INPUT_CHANGED` when ``run`` changed ``c`` in place: its version counter moved
    (also for an in-place op that left the values, a ReLU on pixels >= 0: it would change other
    inputs) or its values did (writes no version counter sees). The one check, shared by every path
    that runs a model more than once on the same input tensor (the operators, the function-space
    measures, training, the reparametrization probe)."""
    if not isinstance(x, torch.Tensor):
        return run(x)
    xc = x.clone()
    version = _version(xc)
    out = run(xc)
    if _version(xc) != version or not _same_values(xc, x):
        raise ValueError(INPUT_CHANGED)
    return out


def vmap_replicas(fn, params, buffers, x, batched: bool = False):
    """``(outputs, batched)``: ``vmap(fn)(params, buffers, x)`` over the replica axis of ``params`` and
    ``buffers`` (pytrees of ``[R', ...]`` tensors), every replica on the same input tensor ``x``.

    ``x`` is passed unbatched (``in_dims=None``) unless ``batched``. Where that fails, it is passed
    batched, as ``x.expand(R', *x.shape)`` (a view: no copy), and ``batched`` comes back True, for the
    caller to pass from then on. Why: a model that fills a tensor it allocates from its input
    (``out = x.new_zeros(...); out[:, :k] = ...``, ``torch.zeros_like(x)``) cannot run on an
    unbatched input: that tensor has no replica axis, and vmap cannot write each replica's values
    into it ("vmap: inplace arithmetic ... is not possible"); from a batched input it gets one per
    replica, and each replica computes what its own ``model(x)`` does. When the batched input fails
    too, the first error is raised (a model that cannot take ``x``). Out-of-memory errors are raised
    as they are."""
    from torch.utils._pytree import tree_leaves

    if not batched or not isinstance(x, torch.Tensor):
        try:
            return vmap(fn, in_dims=(0, 0, None))(params, buffers, x), batched
        except RuntimeError as exc:
            if not isinstance(x, torch.Tensor) or isinstance(exc, torch.OutOfMemoryError) \
                    or "out of memory" in str(exc).lower():
                raise
            first = exc
    else:
        first = None
    R = tree_leaves(params)[0].shape[0]
    try:
        return vmap(fn, in_dims=(0, 0, 0))(params, buffers, x.expand(R, *x.shape)), True
    except RuntimeError:
        if first is None:
            raise
    raise first


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


_MISSING = object()  # (a dict key that is gone)


def _NO_MODULE():
    """A submodule slot that held None (as a weak reference's call gives)."""
    return None


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


def _check_hooks(models: list) -> None:
    """Raise a ValueError naming the first module hook (forward, forward pre-, backward or backward
    pre-hook) on any replica's modules. fastcurv runs every replica through one functional copy of
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


def _version(t: torch.Tensor) -> int | None:
    """``t``'s version counter, None for an inference tensor (made under ``torch.inference_mode``,
    which has none)."""
    return None if t.is_inference() else t._version


def _load_memcmp():
    """The C library's ``memcmp`` through ctypes, or None where it cannot be loaded."""
    try:
        fn = (ctypes.cdll.msvcrt if sys.platform == "win32" else ctypes.CDLL(None)).memcmp
    except (OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = ctypes.c_int, (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
    return fn


_MEMCMP = _load_memcmp()


_PLAIN = (torch.Tensor, nn.Parameter)  # (no subclass whose data_ptr() might not be its values)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` (a model's tensor, on any device) holds the bytes of the CPU tensor ``b``: one
    ``memcmp`` for plain contiguous tensors (it runs before every product: 3-4x faster than
    ``torch.equal``, whose loop over the elements handles NaN), ``torch.equal`` for the others;
    ``a`` on another device is copied over first. False may still be equal values (NaN, -0.0 and
    0.0): the caller confirms by value."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.device != b.device:
        a = a.to(b.device)
    if _MEMCMP is not None and type(a) in _PLAIN and type(b) in _PLAIN and a.is_contiguous() and b.is_contiguous():
        return a.numel() == 0 or _MEMCMP(a.data_ptr(), b.data_ptr(), a.numel() * a.element_size()) == 0
    return torch.equal(a, b)


def _grouped(kept: list) -> dict:
    """``kept``'s ``(tensor, record)`` pairs (see ``ReplicaSet._watch``) grouped by the stacked tensor
    their copies are in, ``("params" or "buffers", name)``, in their order."""
    groups: dict = {}
    for t, rec in kept:
        groups.setdefault((rec[6], rec[7]), []).append((t, rec))
    return groups


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
    replica (see :func:`_check_hooks`: they would not run faithfully).

    The list returned remembers that it was checked: given back here while it holds the same models
    (and ``training`` asks for no more than was checked), only the hooks are checked again (a hook
    can be added to a model at any time), so that the ReplicaSet an entry point builds from the
    list it validated does not walk every replica's parameters again. The caller's list is never
    returned itself (callers may write into the list they get)."""
    if isinstance(models, ReplicaSet):
        raise TypeError(REPLICA_SET_NOT_TAKEN)
    if _validated(models, training):
        _check_hooks(models)
        return _ValidatedModels(models, training, models.checked)
    models = model_list(models)
    _check_hooks(models)
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


def _computed_attributes(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(module name, module, attribute)`` for each tensor a module of ``model`` holds as a plain
    attribute (neither parameter nor buffer) that autograd computed, i.e. not a graph leaf."""
    return [(name or "(model)", mod, k) for name, mod in model.named_modules() for k, v in vars(mod).items()
            if isinstance(v, torch.Tensor) and v.grad_fn is not None]


# torch's weight-norm parametrization (torch.nn.utils.parametrizations.weight_norm); None where torch has none
_TORCH_WEIGHT_NORM = getattr(_parametrizations, "_WeightNorm", None)
# torch's spectral-norm and orthogonal parametrizations (their settings compared specially); None where torch has none
_TORCH_SPECTRAL_NORM = getattr(_parametrizations, "_SpectralNorm", None)
_TORCH_ORTHOGONAL = getattr(_parametrizations, "_Orthogonal", None)


class PlainWeightNorm(nn.Module):
    """torch's weight-norm parametrization (``torch.nn.utils.parametrizations.weight_norm``) in
    plain differentiable ops: ``weight = v * (g / norm)``, the 2-norm of ``v`` over every dimension
    but ``dim`` (kept as size 1), or over all of ``v`` for ``dim == -1`` (what torch stores for
    ``dim=None``; torch reads -1 as "all", not as the last dimension, and any other negative
    ``dim`` counts from the end). The values (to rounding) and parameter layout of torch's:
    ``forward(g, v)`` with ``g`` = ``original0``, ``v`` = ``original1``.

    Why: torch computes ``dim=0`` and ``dim=v.dim()-1`` through the fused
    ``aten::_weight_norm_interface``, whose backward formula reads the norms it saved without
    differentiating through them, so its double backward misses that path: Hessian-vector products
    come out wrong and not symmetric (and it has no forward-mode derivative). The plain ops here
    are differentiated correctly twice, in either mode."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # (not torch.norm_except_dim: vmap has no batching rule for it, and its forward-mode
        # derivative for dim=-1 has the wrong shape)
        if self.dim == -1 or v.dim() == 0:
            norm = torch.linalg.vector_norm(v)
        else:
            keep = self.dim % v.dim()
            others = [d for d in range(v.dim()) if d != keep]
            norm = torch.linalg.vector_norm(v, dim=others, keepdim=True) if others else v.abs()
        return v * (g / norm)


def _is_torch_weight_norm(mod: nn.Module) -> bool:
    """Whether ``mod`` is torch's weight-norm parametrization computing torch's ``forward`` (a
    subclass with a forward of its own is left alone: it computes something else)."""
    return (_TORCH_WEIGHT_NORM is not None and isinstance(mod, _TORCH_WEIGHT_NORM)
            and type(mod).forward is _TORCH_WEIGHT_NORM.forward)


class InPlaceSpectralNorm(_TORCH_SPECTRAL_NORM or nn.Module):
    """torch's spectral-norm parametrization (``torch.nn.utils.parametrizations.spectral_norm``)
    whose training-mode power iterations write the singular-vector estimates ``_u``/``_v`` into
    their buffers with ``copy_`` rather than through ``F.normalize(..., out=...)``: ``vmap`` (the
    training engine's) has no batching rule for ``out=`` ops. The same values as torch's, bit for
    bit, written in place just as torch writes them (so into the replica's own rows of the stacked
    buffers); the forward, the settings and the buffers are torch's. Eval mode (every measurement)
    runs no power iteration: the weight is ``W / (u . W v)`` with the stored ``u``, ``v``, which are
    buffers, not parameters: derivatives are taken with respect to ``original`` with ``u``, ``v``
    held fixed, as torch's own gradients are (its power iterations run under ``no_grad``)."""

    @torch.no_grad()
    def _power_method(self, weight_mat: torch.Tensor, n_power_iterations: int) -> None:
        for _ in range(n_power_iterations):
            self._u.copy_(nn.functional.normalize(torch.mv(weight_mat, self._v), dim=0, eps=self.eps))
            self._v.copy_(nn.functional.normalize(torch.mv(weight_mat.H, self._u), dim=0, eps=self.eps))


def _uncached_getter(tensor_name: str):
    """The getter of a parametrized tensor that computes it at every access (``parametrizations[name]()``)."""
    def get(self) -> torch.Tensor:
        return self.parametrizations[tensor_name]()
    return get


def _uncached_class(mod: nn.Module) -> type:
    """A subclass of the parametrized module ``mod``'s class (``ParametrizedLinear``, of the same name)
    whose parametrized tensors are computed at every access. torch's getters read and fill
    ``torch.nn.utils.parametrize``'s cache inside ``parametrize.cached()``, under a key of the module
    the parametrization was registered on, which the class is shared with: a copy would read the
    user's model's cached weight (computed from other parameters) and leave its own (a vmap-batched
    or meta tensor) for the user's model to read."""
    cls = type(mod)
    props = {t: property(_uncached_getter(t), getattr(cls, t).fset) for t in mod.parametrizations}
    # (torch's module and name, as the class it refines: the fused engines' parsers read them)
    return type(cls.__name__, (cls,), {**props, "__module__": cls.__module__, "__qualname__": cls.__qualname__})


def _replace_parametrizations(model: nn.Module) -> None:
    """Replace, in place, every torch weight-norm parametrization in ``model``'s
    ``parametrizations[...]`` lists with a :class:`PlainWeightNorm` of the same ``dim``, turn every
    torch spectral-norm one into an :class:`InPlaceSpectralNorm` (see there for why), and give every
    parametrized module a class of its own that never caches (:func:`_uncached_class`). ``model`` is
    fastcurv's own copy: the parameters, buffers and their names stay as they are."""
    for mod in model.modules():
        plists = getattr(mod, "parametrizations", None)
        if not isinstance(plists, nn.ModuleDict):
            continue
        if parametrize.is_parametrized(mod) and _is_parametrized_class(type(mod)):
            mod.__class__ = _uncached_class(mod)
        for plist in plists.values():
            for i, p in enumerate(list(plist)):
                if _is_torch_weight_norm(p):
                    dim = -1 if p.dim is None else p.dim
                    plist[i] = PlainWeightNorm(dim)
                elif _TORCH_SPECTRAL_NORM is not None and type(p) is _TORCH_SPECTRAL_NORM:
                    p.__class__ = InPlaceSpectralNorm  # (the copy's own module: its state stays as it is)


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on the meta device (for ``functional_call``), with its tied parameters
    still one tensor (``.to()`` gives each module its own, and ``functional_call`` would then read
    the untied one's meta data instead of the weight passed under the first name), torch's
    weight-norm parametrizations (``torch.nn.utils.parametrizations.weight_norm``) computed by
    :class:`PlainWeightNorm`, whose second derivatives are right where torch's are not, its
    spectral-norm ones by :class:`InPlaceSpectralNorm`, whose training-mode power iterations run
    under ``vmap``, and every parametrized tensor computed afresh at each access, also inside the
    user's ``torch.nn.utils.parametrize.cached()`` (see :func:`_uncached_class`).

    A module holding a tensor that autograd computed as a plain attribute (neither parameter nor
    buffer; deepcopy refuses it) raises a ValueError naming it."""
    try:
        base = copy.deepcopy(model)
    except RuntimeError as exc:
        computed = _computed_attributes(model)
        if not computed:
            raise
        name, mod, attr = computed[0]
        raise ValueError(f"module {name!r} ({type(mod).__name__}) holds {attr!r} as a tensor computed by autograd, "
                         "neither a parameter nor a buffer, which cannot be copied (a hook's output, as "
                         "torch.nn.utils.prune and weight_norm set?): make it a parameter or buffer, compute it in "
                         "forward(), or remove the reparametrization (torch.nn.utils.prune.remove, "
                         "torch.nn.utils.remove_weight_norm)") from exc
    _replace_parametrizations(base)
    ties = tied_parameters(base)
    base = base.to("meta")
    for name, first in ties.items():
        owner, _, attr = name.rpartition(".")
        setattr(base.get_submodule(owner), attr, base.get_parameter(first))
    return base


def functional_base(model: nn.Module, bn_mode: str = "eval") -> nn.Module:
    """A parameter-free (meta) copy of ``model`` in the mode fastcurv evaluates it in.

    ``bn_mode='eval'``: everything in eval mode (BatchNorm running statistics, no dropout).
    ``bn_mode='batch'``: every BatchNorm (any ``_BatchNorm``: BatchNorm1d/2d/3d, SyncBatchNorm, the
    lazy ones) normalizes with the statistics of each batch (running statistics are neither used
    nor updated); dropout stays off. The user's models are not touched.

    The batch-statistics BatchNorms stay in eval mode with their running statistics removed, which
    torch normalizes by the batch's statistics just as in training mode (``F.batch_norm`` with
    ``training=True``), but without touching a process group: in training mode a SyncBatchNorm
    gathers the statistics of every rank once torch.distributed is initialised (where fastcurv's
    ranks each hold other replicas), and raises on CPU inputs.
    """
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
    base = meta_copy(model)
    base.eval()
    if bn_mode == "batch":
        for mod in base.modules():
            if isinstance(mod, _BN_TYPES):
                mod.track_running_stats = False
                mod.running_mean = None
                mod.running_var = None
                mod.num_batches_tracked = None
    return base


class ReplicaSet:
    """R replicas of one architecture, their parameters stacked along a leading axis.

    Attributes:
        params: ``{name: [R, *shape]}`` detached parameter tensors, ``model.parameters()`` order.
        buffers: ``{name: [R, *shape]}`` the buffers the functional model uses.
        finite: ``[R]`` bool, False for replicas whose parameters contain NaN or Inf.
        R, P: number of replicas and of parameter entries per replica.

    ``params`` and ``buffers`` are copies of the models' tensors when the set is built: the set does
    not follow later changes of the models. It remembers which tensors (and submodules) it copied,
    so that :meth:`changed_since_built` can tell (and the operators built on it refuse to run) once
    the models were changed in place (an optimizer step) or given new tensors or layers.
    """

    def __init__(self, models: Sequence[nn.Module], *, bn_mode: str = "eval"):
        models = validate_models(models)
        self.bn_mode = bn_mode
        self.base = functional_base(models[0], bn_mode)
        self.names = [n for n, _ in models[0].named_parameters()]
        self.shapes = [tuple(p.shape) for _, p in models[0].named_parameters()]
        self.numels = [int(torch.Size(s).numel()) for s in self.shapes]
        self.P = sum(self.numels)
        self.R = len(models)
        # each model's name -> tensor maps, built once (looking each name up in a fresh walk of the
        # model made building the set quadratic in the number of parameter tensors)
        named = [dict(m.named_parameters()) for m in models]
        named_buffers = [dict(m.named_buffers()) for m in models]
        with torch.no_grad():
            self.params = {n: torch.stack([d[n].detach() for d in named]) for n in self.names}
            buffer_names = [n for n, b in self.base.named_buffers() if b is not None]
            self.buffers = {n: torch.stack([d[n].detach() for d in named_buffers]) for n in buffer_names}
        self._sources = self._watch(models, named, named_buffers, buffer_names)
        first = self.params[self.names[0]]
        self.dtype, self.device = first.dtype, first.device
        self.finite = ~nonfinite_rows([self.params[n] for n in self.names]).cpu()
        bad = (~self.finite).nonzero().flatten().tolist()
        if bad:
            warnings.warn(
                f"replicas {bad} have non-finite (NaN/Inf) parameters: their results will be NaN and flagged",
                RuntimeWarning,
                stacklevel=3,
            )

    # --- the models it was built from -----------------------------------------------------------
    def _watch(self, models: list, named: list[dict], named_buffers: list[dict], buffer_names: list) -> tuple:
        """What :meth:`changed_since_built` compares: ``(links, tensors)``. The models' modules are held
        weakly (the set does not keep the models alive), their tensors not at all: a weak reference
        to a tensor makes ``torch.utils.swap_tensors`` refuse it, and so the users' own swap-based
        conversions (``load_state_dict``, ``.double()`` under
        ``torch.__future__.set_swap_module_params_on_conversion(True)``).

        ``links``: ``(parent, child name, child, description)`` for every submodule of every model
        (a layer swapped for another is seen there, even when the old one died with its weights).
        ``tensors``: ``[id of the tensor, owning module, "_parameters" or "_buffers", key, version
        counter, data pointer, "params" or "buffers", name, replica, description, the set's copy]`` of
        every parameter and used buffer (``named``/``named_buffers``: each model's name -> tensor; the
        copy: the replica's view of the stacked tensor), a list so that the record can follow a tensor
        that holds the same values elsewhere (``share_memory()``, or a new tensor object from a no-op
        conversion)."""
        links, tensors = [], []
        for r, (model, params, buffers) in enumerate(zip(models, named, named_buffers)):
            for path, mod in model.named_modules():
                for cname, child in mod._modules.items():
                    where = f"{path}.{cname}" if path else cname
                    links.append((weakref.ref(mod), cname, _NO_MODULE if child is None else weakref.ref(child),
                                  f"module {where!r} of replica {r}"))
            watched = [("parameter", "_parameters", "params", n, params[n]) for n in self.names]
            watched += [("buffer", "_buffers", "buffers", n, buffers[n]) for n in buffer_names]
            for kind, table, stacked, n, t in watched:
                owner, _, key = n.rpartition(".")
                tensors.append([id(t), weakref.ref(model.get_submodule(owner)), table, key, _version(t),
                                t.data_ptr(), stacked, n, r, f"{kind} {n!r} of replica {r}",
                                getattr(self, stacked)[n][r]])
        return links, tensors

    def __getstate__(self):
        """For pickling (``torch.save``) and ``copy.deepcopy``: weak references do not pickle, and a
        copy watches no models (a snapshot of the weights it holds). The caches of the sparse-input
        forward (the fused MLP plan's closures, the last input's CSR form) are dropped too: they are
        rebuilt when needed."""
        state = {**self.__dict__, "_sources": ((), ())}
        state.pop("_plan", None)
        state.pop("_csr_of", None)
        return state

    def changed_since_built(self) -> str | None:
        """The first parameter, buffer or submodule of the models this set was built from that changed
        since (e.g. "parameter '0.weight' of replica 2"), or None. Changed: modified in place (its
        version counter moved: an optimizer step, ``load_state_dict``, ``copy_`` under no_grad, a
        training-mode BatchNorm forward through its ``num_batches_tracked``; or its values differ
        from the set's copy: the writes no version counter sees, through ``p.data``, fused optimizers
        (``torch.optim`` with ``fused=True``), numpy views (``p.detach().numpy()``),
        ``torch.distributed`` collectives into the parameters), replaced by a tensor holding other
        values (``load_state_dict(..., assign=True)``, a new ``nn.Parameter`` assigned, a layer
        swapped for another module), or holding other values in another storage (``.double()``,
        ``p.data = ...``). A tensor replaced by one of the same values, or whose storage moved with
        the values kept (``share_memory()``, a no-op ``.to()`` under
        ``torch.__future__.set_overwrite_module_params_on_conversion(True)``, a move to another device
        such as ``model.cuda()``: the set keeps its own copies where it was built), is no change; the
        check then follows the moved tensor. Values are compared exactly, NaN equal to NaN (and -0.0 to
        0.0).

        Not seen: models since deleted, and writes made while a product runs (another thread
        training the models: the check comes before each product). Cost: the identity, storage and
        version of every tensor and submodule (about a microsecond each), and one exact comparison
        of every tensor with its copy (:meth:`_first_rewritten`; a tensor on another device than the
        set is copied over for it). For 10 MLPs 784-128-128-10 on one CPU thread: 0.2-0.4 ms, 2% of
        a one-probe Hessian-vector product on 256 samples, 0.3% of an eight-probe one (the
        comparison runs on one thread: with many, its share of a product grows)."""
        links, tensors = getattr(self, "_sources", ((), ()))
        for parent_ref, cname, child_ref, what in links:
            parent = parent_ref()
            if parent is not None and parent._modules.get(cname, _MISSING) is not child_ref():
                return what
        kept = []  # (the model's tensor, its record): the same tensor object, storage and version
        for rec in tensors:
            tensor_id, owner_ref, table, key, version, ptr, stacked, name, r, what, copied = rec
            owner = owner_ref()
            if owner is None:  # (its model was deleted, or the module swapped: a link tells)
                continue
            t = getattr(owner, table).get(key, _MISSING)
            if not isinstance(t, torch.Tensor) or not _in_storage(t):
                return what
            if id(t) == tensor_id and t.data_ptr() == ptr:
                if version is not None and _version(t) != version:
                    return what
                kept.append((t, rec))  # (its values are compared below)
                continue
            # another tensor object, or the storage moved: a change only if the values did (a tensor
            # whose id is reused by another holds other values, or equal ones, which change nothing)
            if (id(t) == tensor_id and version is not None and _version(t) != version) \
                    or not self._holds_copy_of(t, copied):
                return what
            rec[0], rec[4], rec[5] = id(t), _version(t), t.data_ptr()  # the same values: follow this tensor
        return self._first_rewritten(kept)

    def _first_rewritten(self, kept: list, batched: bool | None = None) -> str | None:
        """The description of the first ``(model's tensor, its record)`` in ``kept`` (see :meth:`_watch`)
        whose values are no longer the set's copy, or None: the in-place writes no version counter
        sees. On the CPU one ``memcmp`` per tensor (:func:`_same_bytes`); elsewhere (or ``batched``)
        each parameter's tensors are stacked (a transient copy of that parameter for every replica)
        and compared with the copies on the device, with one synchronization for all of them rather
        than one per tensor. Tensors whose values differ there, or whose bytes differ on the CPU,
        are confirmed by value (:meth:`_holds_copy_of`: NaN equals NaN, -0.0 equals 0.0)."""
        if not kept or self.device.type == "meta":  # (a set of meta tensors holds no values)
            return None
        with torch.no_grad():
            if not (self.device.type != "cpu" if batched is None else batched):
                for t, rec in kept:
                    if not _same_bytes(t, rec[10]) and not self._holds_copy_of(t, rec[10]):
                        return rec[9]
                return None
            order, flags = [], []
            for (stacked, name), members in _grouped(kept).items():
                copies = getattr(self, stacked)[name]
                for t, rec in members:
                    if t.shape != copies.shape[1:] or t.dtype != copies.dtype:
                        return rec[9]
                rows = [rec[8] for _, rec in members]
                ref = copies if rows == list(range(len(copies))) else copies[rows]
                differ = torch.stack([t.to(self.device) for t, _ in members]) != ref
                flags.append(differ.flatten(1).any(1) if differ.dim() > 1 else differ)
                order += members
            flags = torch.cat(flags)
            if not bool(flags.any()):  # (the one synchronization)
                return None
            for i in flags.nonzero().flatten().tolist():  # (NaN differs from itself: confirmed by value)
                t, rec = order[i]
                if not self._holds_copy_of(t, rec[10]):
                    return rec[9]
        return None

    @staticmethod
    def _holds_copy_of(t: torch.Tensor, copied: torch.Tensor) -> bool:
        """Whether the model's tensor ``t`` still holds exactly the values the set copied (NaN where NaN),
        on any device: a model moved to another device (``.cuda()`` after the set was built on the CPU)
        holds a copy when the values came along. A meta tensor holds no values, so no copy."""
        if t.shape != copied.shape or t.dtype != copied.dtype:
            return False
        if t.device != copied.device and "meta" in (t.device.type, copied.device.type):
            return False
        with torch.no_grad():  # (across devices: one copy per move; the record then follows the moved tensor)
            return torch.allclose(t.to(copied.device), copied, rtol=0, atol=0, equal_nan=True)

    # --- flat layout -------------------------------------------------------------------------
    @property
    def batch_statistics(self) -> bool:
        """Whether a BatchNorm (any ``_BatchNorm``, SyncBatchNorm included) normalizes each batch by
        its own statistics (``bn_mode='batch'``, or ``track_running_stats=False``): the results then
        depend on the batches. (torch's rule, as the fused engine's parser reads it: training mode,
        or no running statistics.)"""
        return any(isinstance(m, _BN_TYPES) and (m.training or m.running_mean is None) for m in self.base.modules())

    def flatten(self, tensors: Sequence[torch.Tensor], lead: int = 1) -> torch.Tensor:
        """Concatenate per-parameter tensors ``[*lead_dims, *shape]`` into ``[*lead_dims, P]``."""
        lead_shape = tensors[0].shape[:lead]
        return torch.cat([t.reshape(*lead_shape, -1) for t in tensors], dim=-1)

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Split ``[..., P]`` into per-parameter views ``[..., *shape]``."""
        if flat.shape[-1] != self.P:
            raise ValueError(f"vectors have {flat.shape[-1]} entries in the last axis, the models have P = {self.P}")
        lead = flat.shape[:-1]
        return [c.reshape(*lead, *s) for c, s in zip(flat.split(self.numels, dim=-1), self.shapes)]

    def flat_params(self) -> torch.Tensor:
        """``[R, P]`` parameters of all replicas."""
        return self.flatten([self.params[n] for n in self.names])

    def subset(self, idx: torch.Tensor | None):
        """``(params, buffers)`` dicts restricted to replicas ``idx`` (all when None)."""
        if idx is None:
            return self.params, self.buffers
        return ({n: t[idx] for n, t in self.params.items()}, {n: t[idx] for n, t in self.buffers.items()})

    # --- evaluation --------------------------------------------------------------------------
    def call(self, params: dict, buffers: dict, x):
        """Run one replica's functional model: ``params``/``buffers`` without the replica axis."""
        return functional_call(self.base, (params, buffers), (x,))

    def forward(self, x, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Outputs of replicas ``idx`` (all when None) on the batch ``x``: ``[R, N, ...]``."""
        params, buffers = self.subset(idx)
        return self.forward_with(params, buffers, x)

    def forward_with(self, params: dict, buffers: dict, x) -> torch.Tensor:
        """Outputs ``[R', N, ...]`` of stacked ``params``/``buffers`` (name -> ``[R', ...]``) on ``x``.

        Plain MLP chains on sparse CPU inputs (at most 40% nonzero, e.g. MNIST; samples that are rows
        ``x [N, F]``, or any ``x [N, ...]`` when the chain starts with ``nn.Flatten()``) compute their first
        layer from the nonzero inputs only (the fused MLP forward of :mod:`fastcurv.train_fused`
        with :mod:`fastcurv.ops.csr_linear`, which autograd cannot differentiate: only when nothing
        needs a gradient); everything else runs ``vmap`` over ``functional_call``, with ``x`` shared by
        the replicas, or batched for a model that cannot run so (:meth:`vmapped`).
        """
        plan = self._mlp_plan()
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params.values()))
        # the sparse path flattens each sample to one row and returns [R', N, C]: the model's own output
        # shape only when it flattens the samples too (a leading Flatten(1, -1)) or they are rows already
        # (an MLP given x [N, 1, F] outputs [N, 1, C], which the loss must see unchanged)
        if plan is not None and not needs_grad and not buffers and (x.dim() == 2 or (plan.flatten and x.dim() >= 2)):
            from .train_fused import CsrBatch

            csr = self._sparse_rows(plan, x)
            if csr is not None:
                return plan.forward(params, CsrBatch(csr, torch.arange(len(x), device=x.device)), shared=True)
        return check_output(self.vmapped(self.call, params, buffers, x))

    def vmapped(self, fn, params, buffers, x):
        """:func:`vmap_replicas` of ``fn(params, buffers, x)`` (a function of one replica, e.g. of
        :meth:`call`) over the replica axis, ``x`` shared by the replicas, or batched once the set's
        model has needed it (remembered by the set: the perturbation measures run it hundreds of
        times)."""
        out, self._batched_input = vmap_replicas(fn, params, buffers, x, getattr(self, "_batched_input", False))
        return out

    def in_dtype(self, dtype: torch.dtype) -> "ReplicaSet":
        """A copy of this set with its parameters and floating buffers in floating dtype ``dtype`` (the
        models are not touched; the copy watches no models and has no sparse-forward caches: see
        ``__getstate__``). The perturbation measures run float16/bfloat16 replicas in float32 on it."""
        wide = copy.copy(self)
        wide.params = {n: t.to(dtype) for n, t in self.params.items()}
        wide.buffers = {n: t.to(dtype) if t.is_floating_point() else t for n, t in self.buffers.items()}
        wide.dtype = dtype
        return wide

    def checked_call(self, x, r: int | None = None) -> torch.Tensor:
        """Replica ``r``'s outputs (default: the first replica with finite parameters) on ``x`` (a few
        samples), computed on copies of ``x`` and of the replica's parameters and buffers, after a
        ValueError when the forward changed one of them in place (a parameter: ``nn.Embedding``'s
        ``max_norm`` renormalization): fastcurv evaluates the replicas many times on the same
        inputs, and with the same buffers (the set's stacked copies, which its vmapped forwards would
        write into), as fixed functions. A model that changes its input would see other data at every
        pass, and change the caller's (:func:`run_on_copy`); one that updates a buffer in its
        eval-mode forward (a call counter, a quantization observer's min/max, an average updated
        whatever the mode) would be another function at every pass, and its copies no longer the
        models' buffers (which :meth:`changed_since_built` then reports as a change of the models).
        The entry points call it on their first batch. torch's own errors (inputs the model cannot
        take) propagate as they are; a model that returns no tensor raises :func:`check_output`'s."""
        if r is None:
            r = int(self.finite.nonzero()[0]) if self.finite.any() else 0
        copies = {kind: {n: t[r].clone() for n, t in getattr(self, kind).items()} for kind in ("params", "buffers")}
        versions = {(kind, n): _version(t) for kind, ts in copies.items() for n, t in ts.items()}
        out = check_output(run_on_copy(lambda xc: self.call(copies["params"], copies["buffers"], xc), x))
        for kind, ts in copies.items():
            for n, t in ts.items():
                if _version(t) != versions[(kind, n)] or not _same_values(t, getattr(self, kind)[n][r]):
                    raise ValueError(_WRITTEN_IN_FORWARD[kind].format(n))
        return out

    def _sparse_rows(self, plan, x: torch.Tensor):
        """The CSR form of ``x`` for the fused MLP ``plan`` (None when too dense or not its input), kept
        for the last input while that tensor lives unchanged (a weak reference and its version
        counter): the perturbation estimators evaluate the same probe inputs hundreds of times."""
        hit = getattr(self, "_csr_of", None)
        if hit is not None and hit[0]() is x and hit[1] == x._version:
            return hit[2]
        csr, _ = plan.sparse_rows(x, None)
        self._csr_of = (weakref.ref(x), x._version, csr)
        return csr

    def _mlp_plan(self):
        """The fused MLP plan of the architecture, or None (computed once)."""
        if not hasattr(self, "_plan"):
            from .train_fused import plan_mlp

            self._plan = plan_mlp(self.base)[0]
        return self._plan
