"""Running a model as fastcurv does: vmapped over the replicas (:func:`vmap_replicas`; a model
vmap cannot batch raises :class:`VmapUnsupportedError` naming the module), on a copy of its input
checked for in-place changes (:func:`run_on_copy`, :data:`INPUT_CHANGED`), its output checked to be
one tensor (:func:`check_output`), and the errors of a forward that writes into its parameters or
buffers, or that cannot take its inputs (:func:`model_cannot_run`, :func:`first_input_failing`).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import vmap
from torch.utils._pytree import tree_leaves, tree_map

from .tensor_state import _same_values, _version


def check_output(out) -> torch.Tensor:
    """``out``, a model's output, after raising a TypeError unless it is one tensor."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model returns a {type(out).__name__}; fastcurv needs one tensor of outputs (wrap the "
                        "model in a module whose forward returns the tensor the loss takes)")
    return out


#: the ValueError of every entry point for a model that changes its input in place (:func:`run_on_copy`)
INPUT_CHANGED = ("the model changes its input in place (an in-place operation on the input, such as ReLU(inplace=True) "
                 "as its first layer, or x -= mean); fastcurv passes the same batches to it many times (and would "
                 "change the caller's data): make that operation out of place (x = x - mean)")


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


def model_cannot_run(where: str, x, exc: Exception) -> ValueError:
    """The ValueError for inputs the model cannot take: "the model cannot run on <where> (inputs
    <shape>, <dtype>): <torch's message>" (``where``: "the first batch", "batch 3"), the wording of
    every entry point's check (torch's own RuntimeError or IndexError, such as an embedding's "index
    out of range in self", names neither the data nor the batch)."""
    what = f"{tuple(x.shape)}, {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
    return ValueError(f"the model cannot run on {where} (inputs {what}): {exc}")


def first_input_failing(run, inputs) -> ValueError | None:
    """:func:`model_cannot_run`'s ValueError for the first of ``inputs``, ``(where, x)`` pairs, on
    which ``run(x)`` (a forward of one replica, under ``torch.no_grad``) raises a RuntimeError or an
    IndexError, or None where every one runs: how the entry points name the batch (or the samples)
    that a model failed on, its error having come from a computation over all of them."""
    with torch.no_grad():
        for where, x in inputs:
            try:
                run(x)
            except (RuntimeError, IndexError) as exc:
                return model_cannot_run(where, x, exc)
    return None


class VmapUnsupportedError(ValueError):
    """torch.func's ``vmap`` cannot batch a module of the model over the replicas, though the model
    runs one replica at a time (:func:`vmap_replicas`). A ValueError, not a RuntimeError: the entry
    points turn RuntimeErrors on their first batch into "the model cannot run on the first batch",
    which would blame the inputs; the Hessian operator's ``backend="auto"`` falls back to autograd on
    it (:func:`~fastcurv.backends.func.torch_func_failed`)."""


#: where fastcurv batches the replicas with vmap, and so cannot run a model vmap cannot batch; and
#: what runs it (:class:`VmapUnsupportedError`'s message)
_VMAP_PATHS = ("fastcurv evaluates the replicas batched by vmap in the measures at perturbed weights (rho and "
               "epsilon sharpness, pac_bayes, fisher_rao and the like), function_measures, evaluate_population and "
               "train_population, which cannot run this model; the Hessian operator (HessianOperator, hvp, and "
               "batched_sharpness's Hessian measures: lambda_max, top_k, trace, ...) runs it with "
               "backend='autograd', one replica at a time (backend='auto' falls back to it)")


def _known_unbatchable(mod: nn.Module) -> bool:
    """Whether ``mod`` is a layer vmap is known not to batch (torch 2.13): the fused recurrent kernels
    (``aten::lstm``, ``gru``, ``rnn_tanh``/``rnn_relu``, ``lstm_cell``: no batching rule) and the
    sparse gradients of ``sparse=True`` embeddings."""
    return isinstance(mod, (nn.RNNBase, nn.LSTMCell, nn.RNNCell)) or (
        isinstance(mod, (nn.Embedding, nn.EmbeddingBag)) and mod.sparse)


def failing_module(exc: BaseException, model: nn.Module | None = None) -> str:
    """Where ``exc`` was raised, for a message: the innermost module whose forward its traceback
    passes through ("module 'enc.rnn' (LSTM)", named in ``model``, or else in the outermost module
    the traceback passes through: another copy of the model), else (an error in the backward pass,
    which runs in no module's forward) the first module of ``model`` vmap is known not to batch,
    else "the model"."""
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module):
            frames.append(owner)
        tb = tb.tb_next
    for root in ([model] if model is not None else []) + frames[:1]:
        names = {id(m): n for n, m in root.named_modules()}
        inner = next((m for m in reversed(frames) if id(m) in names), None)
        if inner is None and root is model:
            inner = next((m for m in model.modules() if _known_unbatchable(m)), None)
        if inner is not None:
            name = names[id(inner)]
            return f"module {name!r} ({type(inner).__name__})" if name else f"the model ({type(inner).__name__})"
    return "the model"


def cannot_batch(exc: BaseException, model: nn.Module | None = None) -> VmapUnsupportedError:
    """The :class:`VmapUnsupportedError` for ``exc``, raised by vmap in ``model`` (or in the modules
    its traceback passes through: :func:`failing_module`), with torch's message."""
    return VmapUnsupportedError(f"torch.func's vmap cannot batch {failing_module(exc, model)} over the replicas "
                                f"({type(exc).__name__}: {str(exc)[:200]}). {_VMAP_PATHS}")


def vmap_error(exc: BaseException, model: nn.Module) -> VmapUnsupportedError | None:
    """:func:`cannot_batch`'s error for ``exc``, raised by a vmapped computation of ``model`` that
    cannot be retried without vmap where it failed (training's steps), when it looks like vmap's
    failure: :func:`_vmap_failed`, and torch's message speaks of batching or vmap ("Batching rule
    not implemented for aten::lstm.input") or ``model`` holds a layer vmap is known not to batch
    (a sparse embedding's gradient fails with "reshape is not implemented for sparse tensors");
    else None."""
    if not _vmap_failed(exc):
        return None
    text = str(exc).lower()
    if not (any(k in text for k in ("batching rule", "vmap", "batchedtensor"))
            or any(_known_unbatchable(m) for m in model.modules())):
        return None
    return cannot_batch(exc, model)


def _vmap_failed(exc: BaseException) -> bool:
    """Whether ``exc`` (raised by a vmapped call) may say that vmap cannot batch the model: a
    RuntimeError or NotImplementedError that is not an out-of-memory error nor one raised while
    reading the data (:func:`~fastcurv.backends.func.torch_func_failed`), nor vmap's randomness
    error (a model drawing random numbers: the callers say so themselves)."""
    from .backends.func import torch_func_failed  # (imported here: the backends import this module)

    return (torch_func_failed(exc) and not isinstance(exc, VmapUnsupportedError)
            and "randomness" not in str(exc))


def _runs_unbatched(fn, params, buffers, x) -> bool:
    """Whether ``fn`` runs on the first replica of ``params``/``buffers`` alone, without vmap."""
    try:
        with torch.no_grad():
            fn(tree_map(lambda t: t[0], params), tree_map(lambda t: t[0], buffers), x)
    except Exception:  # noqa: BLE001 - any failure: the model itself cannot run, not vmap
        return False
    return True


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
    ``buffers`` (pytrees of ``[R', ...]`` tensors), every replica on the same input tensor ``x``, under
    :func:`~fastcurv.backends.base.math_attention` (vmap has no batching rule for attention's fused
    kernels nor for ``nn.TransformerEncoderLayer``'s inference fast path: torch ran them through its
    slow per-replica fallback, warning "There is a performance drop ..." hundreds of times per call).

    Where vmap cannot batch the model (no batching rule for ``nn.LSTM``'s kernel, say) but ``fn``
    runs on one replica without it, a :class:`VmapUnsupportedError` names the module, where torch's
    raw error names an aten op (or, wrapped by an entry point, blamed the inputs).

    ``x`` is passed unbatched (``in_dims=None``) unless ``batched``. Where that fails, it is passed
    batched, as ``x.expand(R', *x.shape)`` (a view: no copy), and ``batched`` comes back True, for the
    caller to pass from then on. Why: a model that fills a tensor it allocates from its input
    (``out = x.new_zeros(...); out[:, :k] = ...``, ``torch.zeros_like(x)``) cannot run on an
    unbatched input: that tensor has no replica axis, and vmap cannot write each replica's values
    into it ("vmap: inplace arithmetic ... is not possible"); from a batched input it gets one per
    replica, and each replica computes what its own ``model(x)`` does. When the batched input fails
    too, the first error is raised (a model that cannot take ``x``). Out-of-memory errors are raised
    as they are."""
    from .backends.base import math_attention  # (imported here: the backends import this module)

    with math_attention():
        try:
            return _vmap_replicas(fn, params, buffers, x, batched)
        except (RuntimeError, NotImplementedError) as exc:
            if not (_vmap_failed(exc) and _runs_unbatched(fn, params, buffers, x)):
                raise
            raise cannot_batch(exc) from exc


def _vmap_replicas(fn, params, buffers, x, batched: bool):
    """:func:`vmap_replicas`, without its context and its error for models vmap cannot batch."""
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
