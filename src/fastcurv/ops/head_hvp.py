"""The Hessian-vector product through a network's last Linear layer and its loss, for K probes.

For R replicas, N samples and K probes (the probe's blocks ``dW``, ``db`` of the layer's weight and
bias), with the layer's input ``a`` and its tangent ``ra`` (the R-forward of the layers before)::

    rz[r, n, k]  = dW[r, k] a[r, n] + W[r] ra[r, n, k] + db[r, k]               (O outputs)
    rd[r, n, k]  = scale * (diag(p) - p p^T) rz  p = probs[r, n]  (softmax cross-entropy; pivoted as
                                                   softmax_ce_hvp.ce_hessian_product says)
                   scale * rz                    without probs    (squared error, scale = 2 / its divisor)
    out_w[r, k]  = sum_n rd[r, n, k] a[r, n]^T + delta[r, n] ra[r, n, k]^T       [O, I]
    out_b[r, k]  = sum_n rd[r, n, k]                                             [O]
    rg[r, n, k]  = (W[r]^T rd[r, n, k] + dW[r, k]^T delta[r, n]) * d1[r, n]       [I] (returned)

``delta`` is the loss gradient with respect to the outputs, ``d1`` the derivative of a piecewise-
linear activation (ReLU, LeakyReLU) before the layer, whose R-op in the backward pass is that
product (None: no activation, or one whose R-op the caller applies). ``out_w`` and ``out_b`` are the
layer's Hessian-vector products for this batch; ``rg`` is the R-gradient the backward pass carries
on to the layers before.

As GEMMs these are six products per probe with one dimension of O (10 on MNIST), where sgemm is
slow; the C++ kernel (``csrc/cpu/head_hvp.cpp``, CPU only: on GPUs the engines keep their GEMMs)
does them per sample from registers and L1. It reads every operand at its strides as long as rows
of the last dimension are contiguous (the conv engine passes views of its sample-major ``[N, R, I]``
and ``[N, K, R, I]`` tensors) and returns ``rg`` in ``ra``'s layout. The fused engine uses it for
heads of at most ``HEAD_MAX_OUTPUTS`` outputs.
"""
from __future__ import annotations

import torch

from .. import _ext
from ._checks import check_like, check_shapes, contiguous_inner, inner_contiguous, store
from .softmax_ce_hvp import ce_hessian_product

_FLOATS = (torch.float32, torch.float64)

#: Heads with at most this many outputs take the fused kernel in the MLP engine.
HEAD_MAX_OUTPUTS = 32


def check_head_hvp_inputs(a, ra, weight, dweight, delta, probs=None, dbias=None, d1=None, out_w=None,
                          out_b=None) -> tuple[int, int, int, int, int]:
    """Validate shapes, dtypes and devices; returns ``(R, N, K, O, I)``. Raises ValueError/TypeError naming the problem."""
    op = "head_hvp"
    if a.dim() != 3:
        raise ValueError(f"{op}: a must be [R, N, I], got {tuple(a.shape)}")
    R, N, I = a.shape
    if ra.dim() != 4 or (ra.shape[0], ra.shape[1], ra.shape[3]) != (R, N, I):
        raise ValueError(f"{op}: ra must be [R, N, K, I] = [{R}, {N}, K, {I}], got {tuple(ra.shape)}")
    K = ra.shape[2]
    if weight.dim() != 3 or (weight.shape[0], weight.shape[2]) != (R, I):
        raise ValueError(f"{op}: weight must be [R, O, I] = [{R}, O, {I}], got {tuple(weight.shape)}")
    O = weight.shape[1]
    check_shapes(op, (("dweight", dweight, (R, K, O, I)), ("delta", delta, (R, N, O)), ("probs", probs, (R, N, O)),
                      ("dbias", dbias, (R, K, O)), ("d1", d1, (R, N, I)), ("out_w", out_w, (R, K, O, I)),
                      ("out_b", out_b, (R, K, O))))
    if a.dtype not in _FLOATS:
        raise TypeError(f"{op}: float32 or float64 tensors required, got a of dtype {a.dtype}")
    check_like(op, "a", a, dict(ra=ra, weight=weight, dweight=dweight, delta=delta, probs=probs, dbias=dbias, d1=d1,
                                out_w=out_w, out_b=out_b))
    return R, N, K, O, I


def head_hvp_reference(a, ra, weight, dweight, delta, scale: float, probs=None, dbias=None, d1=None, out_w=None,
                       out_b=None, accumulate: bool = False):
    """Pure-torch reference of :func:`head_hvp` (same arguments and results)."""
    check_head_hvp_inputs(a, ra, weight, dweight, delta, probs, dbias, d1, out_w, out_b)
    rz = torch.einsum("rni,rkoi->rnko", a, dweight) + torch.einsum("rnki,roi->rnko", ra, weight)
    if dbias is not None:
        rz = rz + dbias.unsqueeze(1)
    if probs is not None:
        rd = scale * ce_hessian_product(probs.unsqueeze(2), rz)
    else:
        rd = scale * rz
    hw = torch.einsum("rnko,rni->rkoi", rd, a) + torch.einsum("rno,rnki->rkoi", delta, ra)
    hb = rd.sum(1)
    rg = torch.einsum("rnko,roi->rnki", rd, weight) + torch.einsum("rno,rkoi->rnki", delta, dweight)
    if d1 is not None:
        rg = rg * d1.unsqueeze(2)
    out_w = store(out_w, hw, accumulate)
    out_b = store(out_b, hb, accumulate) if out_b is not None or dbias is not None else None
    return rg, out_w, out_b


def head_hvp(a, ra, weight, dweight, delta, scale: float, probs=None, dbias=None, d1=None, out_w=None, out_b=None,
             accumulate: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The Hessian-vector products of a network's last Linear layer and the R-gradient it passes
    back, for K probes (see the module docstring for the formula and shapes): C++ on CPU tensors,
    the torch reference elsewhere.

    a ``[R, N, I]``, ra ``[R, N, K, I]``, weight ``[R, O, I]``, dweight ``[R, K, O, I]``, delta
    ``[R, N, O]``; optional probs ``[R, N, O]`` (cross-entropy; None: squared error), dbias ``[R, K, O]``,
    d1 ``[R, N, I]``. ``out_w`` ``[R, K, O, I]`` and ``out_b`` ``[R, K, O]``, when given, are written in
    place (added to with ``accumulate``); the kernel writes them, and reads weight and dweight, at
    any replica and probe strides. Returns ``(rg [R, N, K, I], out_w, out_b)`` (``out_b`` None when
    neither it nor dbias is given).
    """
    R, N, K, O, I = check_head_hvp_inputs(a, ra, weight, dweight, delta, probs, dbias, d1, out_w, out_b)
    if _ext.choose("head_hvp", a.device, a.dtype) != "ext":
        return head_hvp_reference(a, ra, weight, dweight, delta, scale, probs, dbias, d1, out_w, out_b, accumulate)
    new = a.new_zeros if accumulate else a.new_empty
    ow = new(R, K, O, I) if out_w is None or not inner_contiguous(out_w, 2) else out_w
    ob = None
    if out_b is not None or dbias is not None:
        ob = new(R, K, O) if out_b is None or not inner_contiguous(out_b, 1) else out_b
    rg = torch.ops.fastcurv.head_hvp(
        a, ra, contiguous_inner(weight, 2), contiguous_inner(dweight, 2),
        None if dbias is None else contiguous_inner(dbias, 1), probs, delta, float(scale), d1, ow,
        ob, accumulate)
    if out_w is not None and ow is not out_w:  # the kernel wrote into zeros or scratch (a layout it cannot write)
        store(out_w, ow, accumulate)
    if out_b is not None and ob is not out_b:
        store(out_b, ob, accumulate)
    return rg, out_w if out_w is not None else ow, out_b if out_b is not None else ob

