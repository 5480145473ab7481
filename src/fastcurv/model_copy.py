"""fastcurv's functional copy of a model (:func:`functional_base`, :func:`meta_copy`): on the meta
device, in the mode fastcurv evaluates it in, its parametrizations in forms that ``vmap`` and
second derivatives handle (:class:`PlainWeightNorm`, :class:`InPlaceSpectralNorm`) and never cached,
and (for measuring) its embeddings' backward-only settings off (:func:`_differentiate_embeddings`).
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrizations as _parametrizations
from torch.nn.utils import parametrize

from .model_checks import _TORCH_SPECTRAL_NORM, _is_parametrized_class, tied_parameters


BN_MODES = ("eval", "batch")
# every BatchNorm: BatchNorm1d/2d/3d, SyncBatchNorm (DDP checkpoints, convert_sync_batchnorm) and the lazy ones
_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def _computed_attributes(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """``(module name, module, attribute)`` for each tensor a module of ``model`` holds as a plain
    attribute (neither parameter nor buffer) that autograd computed, i.e. not a graph leaf."""
    return [(name or "(model)", mod, k) for name, mod in model.named_modules() for k, v in vars(mod).items()
            if isinstance(v, torch.Tensor) and v.grad_fn is not None]


# torch's weight-norm parametrization (torch.nn.utils.parametrizations.weight_norm); None where torch has none
_TORCH_WEIGHT_NORM = getattr(_parametrizations, "_WeightNorm", None)


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


def _differentiate_embeddings(model: nn.Module) -> None:
    """Make every ``nn.Embedding`` / ``nn.EmbeddingBag`` of ``model`` (fastcurv's own copy) take the
    derivatives of the function it computes, in place: settings that change torch's backward formula
    and not the outputs are turned off.

    - ``scale_grad_by_freq``: torch divides each row's gradient by its token's count in the batch,
      which is no gradient: differentiated twice, its "Hessian" is not symmetric (37% off the loss's
      products, lambda_max 2% low, with ``ok=True``, before the twenty-eighth round).
    - ``nn.Embedding``'s ``padding_idx``: torch zeroes the padding row's gradient, so its rows and
      columns of the Hessian vanished (lambda_max 7% low), though the row is a parameter (counted in
      P, frozen or not) and every padding token's embedding. (``nn.EmbeddingBag`` leaves the
      padding entries out of its bags, in the forward too: its ``padding_idx`` stays.)
    - ``sparse``: a sparse gradient, which ``vmap`` cannot batch; the values are the dense ones.

    Only modules computing torch's own ``forward`` (a subclass with a forward of its own may read
    these settings in it). Training keeps torch's semantics: it steps on its own copy
    (:func:`meta_copy`)."""
    for mod in model.modules():
        cls = next((c for c in (nn.Embedding, nn.EmbeddingBag) if isinstance(mod, c)), None)
        if cls is None or type(mod).forward is not cls.forward:
            continue
        mod.scale_grad_by_freq = False
        mod.sparse = False
        if cls is nn.Embedding:
            mod.padding_idx = None


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

    Its embeddings are differentiated as the functions they compute (:func:`_differentiate_embeddings`:
    no ``scale_grad_by_freq``, no ``padding_idx`` in ``nn.Embedding``, dense gradients): the same
    outputs, and the derivatives of the loss with respect to every parameter.
    """
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
    base = meta_copy(model)
    base.eval()
    _differentiate_embeddings(base)
    if bn_mode == "batch":
        for mod in base.modules():
            if isinstance(mod, _BN_TYPES):
                mod.track_running_stats = False
                mod.running_mean = None
                mod.running_var = None
                mod.num_batches_tracked = None
    return base
