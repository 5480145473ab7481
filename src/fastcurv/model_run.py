"""Running a model as fastcurv does: vmapped over the replicas (:func:`vmap_replicas`), on a copy of
its input checked for in-place changes (:func:`run_on_copy`, :data:`INPUT_CHANGED`), its output
checked to be one tensor (:func:`check_output`), and the errors of a forward that writes into its
parameters or buffers.
"""
from __future__ import annotations

import torch
from torch.func import vmap

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
