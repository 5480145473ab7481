"""The fused R-op engine (Pearlmutter): exact Hessian-vector products for chains of supported layers.

Per batch, work that does not depend on the probe is done once and cached: layer inputs,
activation derivatives ``sigma'(z)`` and ``sigma''(z) * g`` (g = loss gradient w.r.t. the
activation output), loss gradients w.r.t. every layer output, max-pooling argmax indices,
normalized BatchNorm inputs and the softmax probabilities. A matvec then costs one R-forward and
one R-backward pass, with replicas and probes batched into the GEMMs/convolutions.

Two engines share this backend:

* MLP chains (Linear, activations, Flatten before the first Linear): layout ``[R, N, K, F]``; the
  first layer is a single GEMM over all replicas x probes (its input is shared), the others are
  batched matmuls over replicas with the K probes stacked with the batch rows; on the CPU,
  replicas are processed in cache-sized chunks.
* Everything else (conv nets): the sample-major layout of :class:`_MapEngine`. Features are
  ``[N, R, C, H, W]`` (so ``[N, R*C, H, W]`` is the input of one grouped convolution with
  ``groups = R * groups``), tangents ``[N, K, R, C, H, W]`` (the K probes fold into the batch axis
  of the products with the weights ``W``; the products with the weight tangents put K into the
  channels of a grouped convolution). Conv R-backward uses ``torch.nn.grad.conv2d_weight`` and
  ``conv2d_input`` with the same grouping. After Flatten the dense head uses ``[N, R, F]`` and
  ``[N, K, R, F]`` (Flatten is a free view). Work is chunked over samples (except with
  batch-statistics BatchNorm, which couples the samples of a batch). Models that are not plain
  chains run on this engine as DAGs traced by torch.fx (:mod:`.fused_graph`): residual additions,
  shared modules, functional ReLU/flatten.

Supported: ``nn.Sequential`` (nested allowed) of Conv2d (bias, stride, padding incl. 'valid' and
symmetric 'same', dilation, groups; zero padding mode), MaxPool2d (tangents gathered with the
forward argmax, scattered back with it: exactly torch's max_pool2d backward, ties included),
AvgPool2d, AdaptiveAvgPool2d, BatchNorm1d/2d with running statistics (eval) or batch statistics
(``bn_mode="batch"`` or ``track_running_stats=False``: per batch, per replica and channel; the
R-op couples the samples), Linear, ReLU, LeakyReLU, GELU (exact), Tanh, Sigmoid, Flatten, Dropout
(eval: identity), Identity; feature-map layers first, then Flatten, then the dense head;
cross-entropy with integer labels or MSE. Other models (custom ``forward``, residual blocks) are
traced by torch.fx; see :mod:`.fused_graph` for the operations it accepts. Not fused: other
modules and operations (``torch.cat``, products, ...): :meth:`FusedBackend.supports` names the
module or operation, and ``auto`` then uses torch.func.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import (act_derivs, act_rop_bwd, activation_kind, activation_value, bn_eval_rop_bwd, bn_eval_rop_fwd, bn_rop_bwd,
                   softmax_ce_hvp)
from .. import _ext
from ..ops.csr_linear import (CsrRows, csr_linear, csr_linear_wgrad, csr_linear_wgrad_shared, csr_masked_linear,
                              sparse_rows)
from ..ops.head_hvp import HEAD_MAX_OUTPUTS, head_hvp
from ..ops.linear_rop import in_fused_engine, linear_rop
from ..replicas import consecutive_runs
from .base import Backend

DEFAULT_CACHE_BYTES = 4 << 30
DEFAULT_CHUNK_BYTES = 4 << 20
# The network input's all-zero columns (e.g. MNIST's border pixels, 22% of a 1000-image batch)
# are dropped from the first layer's products when they are at least this fraction of its inputs
# and the batch has at least this many rows: below that, gathering the probe's columns and
# scattering the product back cost more than the skipped flops.
ZERO_COLUMNS_MIN_FRACTION = 0.05
ZERO_COLUMNS_MIN_ROWS = 128
#: The MLP engine's matvecs (CPU) take a hidden Linear layer's products from its ReLU input's nonzeros,
#: and from its output's ReLU pattern, where at most this fraction of them is nonzero in a batch, per
#: x86 vector level of the kernels (``fastcurv._ext.cpu_level()``: 2 AVX-512, 1 AVX2, 0 baseline).
#: ``python benchmarks/bench_kernels.py --relu-sweep --repeat 21`` (one W1 replica at K=8, the six
#: products against the GEMMs, 2 threads): AVX-512 2.1x faster at 50% nonzero, 1.7x at 60%, 1.3x at
#: 70%, 0.9x at 80%; AVX2 (``FASTCURV_CPU_LEVEL=1``) 1.3x, 1.1x, 1.0x, 0.9x; baseline 1.4x at 20%,
#: 1.0x at 35%, 0.7x at 50%. In the engine, on 100 W1 MLPs trained 5 epochs (71% and 64% of the ReLU
#: outputs nonzero), AVX-512 K=8 matvecs took 1.04 s with the sparse products against 1.28 s with the
#: GEMMs, and 1.12 s with a limit of 0.7 (which left the 71% input dense).
HIDDEN_SPARSE_MAX_DENSITY = {2: 0.75, 1: 0.6, 0: 0.3}
#: ... and where the layer has at least this many inputs and outputs: narrower rows fill too little of
#: the kernels' vector tiles (AVX-512, 50% / 70% nonzero: 1.0x / 0.6x at 32 features, 1.4x / 1.0x at 64).
HIDDEN_SPARSE_MIN_WIDTH = 64


def hidden_sparse_max_density() -> float:
    """``HIDDEN_SPARSE_MAX_DENSITY`` at this machine's kernel level (0 without the C++ kernels)."""
    return HIDDEN_SPARSE_MAX_DENSITY.get(_ext.cpu_level(), 0.0)

_ACTS = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.GELU: "gelu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}
@dataclass
class _Layer:
    kind: str  # "linear" | "act" | "flatten" | "conv" | "bn" | "maxpool" | "avgpool" | "adaptive"
    weight: str | None = None
    bias: str | None = None
    act: int = 0
    slope: float = 0.0
    name: str = ""
    opts: dict = field(default_factory=dict)  # conv/pool hyper-parameters; bn: buffer names and eps


def _leaves(module: nn.Module, prefix: str = ""):
    if isinstance(module, nn.Sequential):
        for name, child in module.named_children():
            yield from _leaves(child, f"{prefix}{name}.")
    else:
        yield prefix[:-1], module


def _pair(v):
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(u) for u in v)


_SPATIAL = ("conv", "maxpool", "avgpool", "adaptive")


def _parse_module(name: str, mod: nn.Module) -> tuple[_Layer | None, str]:
    """One leaf module as a fused layer; (None, "") for an identity, (None, reason) if unsupported."""
    if isinstance(mod, nn.Linear):
        return _Layer("linear", f"{name}.weight", f"{name}.bias" if mod.bias is not None else None, name=name), ""
    if type(mod) in _ACTS:
        kind = _ACTS[type(mod)]
        if kind == "gelu" and mod.approximate != "none":
            return None, f"module {name!r} is GELU(approximate={mod.approximate!r}); only the exact GELU is fused"
        slope = float(mod.negative_slope) if kind == "leaky_relu" else 0.0
        return _Layer("act", act=activation_kind(kind), slope=slope, name=name), ""
    if isinstance(mod, nn.Flatten):
        if mod.start_dim != 1 or mod.end_dim != -1:
            return None, f"module {name!r} is Flatten(start_dim={mod.start_dim}, end_dim={mod.end_dim}); only Flatten() is fused"
        return _Layer("flatten", name=name), ""
    if isinstance(mod, (nn.Dropout, nn.Identity)):
        if isinstance(mod, nn.Dropout) and mod.training:
            return None, f"module {name!r} is Dropout in training mode"
        return None, ""
    if type(mod) is nn.Conv2d:
        if mod.padding_mode != "zeros":
            return None, f"module {name!r} is Conv2d(padding_mode={mod.padding_mode!r}); only zero padding is fused"
        k, d = _pair(mod.kernel_size), _pair(mod.dilation)
        pad = mod.padding
        if pad == "valid":
            pad = (0, 0)
        elif pad == "same":
            if any(di * (ki - 1) % 2 for ki, di in zip(k, d)):
                return None, f"module {name!r} is Conv2d(padding='same') with asymmetric padding; not fused"
            pad = tuple(di * (ki - 1) // 2 for ki, di in zip(k, d))
        opts = dict(stride=_pair(mod.stride), padding=_pair(pad), dilation=d, groups=int(mod.groups))
        return _Layer("conv", f"{name}.weight", f"{name}.bias" if mod.bias is not None else None, name=name, opts=opts), ""
    if type(mod) is nn.MaxPool2d:
        if mod.return_indices:
            return None, f"module {name!r} is MaxPool2d(return_indices=True); not fused"
        opts = dict(kernel_size=_pair(mod.kernel_size), stride=_pair(mod.stride if mod.stride is not None else mod.kernel_size),
                    padding=_pair(mod.padding), dilation=_pair(mod.dilation), ceil_mode=bool(mod.ceil_mode))
        return _Layer("maxpool", name=name, opts=opts), ""
    if type(mod) is nn.AvgPool2d:
        opts = dict(kernel_size=_pair(mod.kernel_size), stride=_pair(mod.stride if mod.stride is not None else mod.kernel_size),
                    padding=_pair(mod.padding), ceil_mode=bool(mod.ceil_mode), count_include_pad=bool(mod.count_include_pad),
                    divisor_override=mod.divisor_override)
        return _Layer("avgpool", name=name, opts=opts), ""
    if type(mod) is nn.AdaptiveAvgPool2d:
        return _Layer("adaptive", name=name, opts=dict(output_size=mod.output_size)), ""
    if type(mod) in (nn.BatchNorm1d, nn.BatchNorm2d):
        if mod.training or mod.running_mean is None:
            # batch statistics (bn_mode='batch' or track_running_stats=False): each batch is normalized
            # with its own biased mean and variance per channel (running statistics neither used nor updated)
            opts = dict(batch=True, eps=float(mod.eps), dims=1 if isinstance(mod, nn.BatchNorm1d) else 2)
            return _Layer("bn", f"{name}.weight" if mod.affine else None, f"{name}.bias" if mod.affine else None,
                          name=name, opts=opts), ""
        opts = dict(mean=f"{name}.running_mean", var=f"{name}.running_var", eps=float(mod.eps),
                    dims=1 if isinstance(mod, nn.BatchNorm1d) else 2)
        return _Layer("bn", f"{name}.weight" if mod.affine else None, f"{name}.bias" if mod.affine else None, name=name, opts=opts), ""
    return None, f"module {name!r} ({type(mod).__name__}) is not supported by the fused engine"


def parse(base: nn.Module) -> tuple[list[_Layer] | None, str]:
    """The layers of ``base`` for the fused engine, or (None, reason): an ``nn.Sequential`` (nested
    allowed) of ``torch.nn`` modules as a chain (a list); any other model (custom ``forward``,
    residual blocks) traced by torch.fx into a DAG (:class:`fused_graph.Graph`)."""
    custom = any(not type(m).__module__.startswith("torch.") for _, m in _leaves(base)) or any(
        isinstance(m, nn.Sequential) and type(m).forward is not nn.Sequential.forward for m in base.modules())
    if not isinstance(base, nn.Sequential) or custom:
        from .fused_graph import trace

        return trace(base)
    layers: list[_Layer] = []
    for name, mod in _leaves(base):
        layer, why = _parse_module(name, mod)
        if why:
            return None, why
        if layer is not None:
            layers.append(layer)
    if not any(l.kind in ("linear", "conv") for l in layers):
        return None, "the model has no Linear or Conv2d layer"
    # feature maps (conv, pooling, BatchNorm2d) come first, then Flatten, then the dense head
    mode = "input"
    for l in layers:
        if l.kind in _SPATIAL or l.kind == "bn" and l.opts["dims"] == 2:
            if mode == "dense":
                return None, f"module {l.name!r} works on feature maps but follows Flatten/Linear; not fused"
            mode = "spatial"
        elif l.kind == "flatten":
            if mode == "spatial":
                mode = "dense"
        elif l.kind == "linear" or l.kind == "bn":
            if mode == "spatial":
                return None, f"module {l.name!r} follows feature maps without a Flatten in between; not fused"
            mode = "dense"
    if not _is_general(layers):
        first = next(i for i, l in enumerate(layers) if l.kind == "linear")
        if any(l.kind == "flatten" for l in layers[first:]):
            return None, "Flatten after the first Linear layer is not supported by the fused engine"
    return layers, ""


def _as_slice(ids: torch.Tensor):
    """``ids`` as a slice when they are consecutive (a view instead of a copy), else ``ids``."""
    lo = int(ids[0])
    return slice(lo, lo + len(ids)) if int(ids[-1]) - lo + 1 == len(ids) else ids


def _drop_zero_columns(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(x[:, keep], keep, zero)`` for a shared first-layer input ``x`` ``[N, I]`` whose columns
    ``zero`` are 0 in every row, or ``(x, None, None)`` when too few are (see
    ``ZERO_COLUMNS_MIN_FRACTION``). Exact: a zero input column adds nothing to ``x W^T`` and its
    weight column's gradient and Hessian rows are zero."""
    N, I = x.shape
    if N < ZERO_COLUMNS_MIN_ROWS:
        return x, None, None
    used = (x != 0).any(0)
    n_zero = I - int(used.sum())
    if n_zero < ZERO_COLUMNS_MIN_FRACTION * I:
        return x, None, None
    keep = used.nonzero().flatten()
    return x.index_select(1, keep), keep, (~used).nonzero().flatten()


def _scatter_columns_(dst: torch.Tensor, keep: torch.Tensor, zero: torch.Tensor, src: torch.Tensor, first: bool):
    """``dst[..., keep] (=|+=) src`` along the last axis; with ``first`` also ``dst[..., zero] = 0``
    (zeroing all of ``dst`` and adding is ~2.5x faster on the CPU than index_fill_ + index_copy_)."""
    if first:
        dst.zero_()
    dst.index_add_(-1, keep, src)


@dataclass
class _ReluCsr:
    """A ``[R, N, F]`` tensor of R replicas stacked in one CSR matrix ``[R*N, F]`` (``rows[r]``: replica
    r's rows), optionally with its per-replica transposes ``[R*F, N]`` (``rows_t[r]``: replica r's)."""

    csr: CsrRows
    rows: torch.Tensor
    csr_t: CsrRows | None = None
    rows_t: torch.Tensor | None = None

    @staticmethod
    def build(t: torch.Tensor, mask: torch.Tensor | None = None, transpose: bool = False) -> "_ReluCsr":
        """Of ``t [R, N, F]`` (entries where ``mask`` is True, default nonzero)."""
        R, N, F_ = t.shape
        ar = lambda n, m: torch.arange(n * m, device=t.device).view(n, m)
        csr_t, rows_t = (CsrRows.stacked(t, mask, transpose=True), ar(R, F_)) if transpose else (None, None)
        return _ReluCsr(CsrRows.stacked(t, mask), ar(R, N), csr_t, rows_t)

    def map_rows(self, f) -> "_ReluCsr":
        return _ReluCsr(self.csr, f(self.rows), self.csr_t, None if self.rows_t is None else f(self.rows_t))

    @property
    def nbytes(self) -> int:
        """Bytes that scale with the samples (the transposes' row pointers do not)."""
        ts = [self.csr.indptr, self.csr.indices, self.csr.values]
        if self.csr_t is not None:
            ts += [self.csr_t.indices, self.csr_t.values]
        return sum(t.numel() * t.element_size() for t in ts)


def _all_rows(N: int, R: int, device) -> torch.Tensor:
    """Row ids ``[R, N]`` of a whole batch, shared by R replicas (a stride-0 expand)."""
    return torch.arange(N, device=device).expand(R, N)


def _is_general(layers) -> bool:
    """True when the model needs the sample-major engine: a traced graph, or a chain with anything
    beyond Linear/activations/Flatten."""
    return hasattr(layers, "inputs") or any(l.kind not in ("linear", "act", "flatten") for l in layers)


def _head_products(loss, a, ra, W, dW, delta, probs, db, d1, out_w, out_b, accumulate: bool) -> torch.Tensor:
    """The output Linear layer's products and the loss R-op by :func:`~fastcurv.ops.head_hvp.head_hvp`
    (``[R, ...]`` operands; ``probs`` is read for cross-entropy only); returns the R-gradient w.r.t.
    the layer's input."""
    ce = loss.kind == "cross_entropy"
    scale = loss.scale() if ce else 2 * loss.scale(W.shape[1])  # the loss Hessian: scale * (diag(p) - p p^T), or scale * I
    return head_hvp(a, ra, W, dW, delta, scale, probs=probs if ce else None, dbias=db, d1=d1, out_w=out_w, out_b=out_b,
                    accumulate=accumulate)[0]


def _loss_head(loss, out: torch.Tensor, y: torch.Tensor, sample_dim: int):
    """Per-replica loss ``[R]``, softmax probabilities (cross-entropy; else None) and the loss
    gradient w.r.t. the outputs, for outputs ``[R, N, C]`` (sample_dim=1) or ``[N, R, C]`` (0)."""
    shape = [1, 1, 1]
    shape[sample_dim] = y.shape[0]
    if loss.kind == "cross_entropy":
        sc = loss.scale()
        logp = torch.log_softmax(out, dim=-1)
        yi = y.view(shape).expand(*out.shape[:2], 1)
        probs = logp.exp()
        delta = probs.clone().scatter_add_(2, yi, torch.full_like(logp[..., :1], -1.0)).mul_(sc)
        return -logp.gather(2, yi).squeeze(2).sum(sample_dim) * sc, probs, delta
    sc = loss.scale(out.shape[-1])
    diff = out - y.unsqueeze(1 - sample_dim)
    return diff.square().sum((sample_dim, 2)) * sc, None, 2 * sc * diff


class _State:
    """Probe-independent values of one batch for a set of replicas (leading axis R)."""

    def __init__(self):
        self.inputs: list = []  # per linear layer: its input ([N, I] shared for the first, else [R, N, I])
        # the first layer's input columns kept, and those dropped as zero in every row (or None):
        # inputs[0] is then x[:, keep] (see _drop_zero_columns)
        self.keep = self.zero = None
        # or the first layer's input in CSR form (its products then use only the nonzero inputs), and
        # its transpose (for the weight products)
        self.csr = self.csr_t = None
        self.d1: list = []  # per activation: sigma'(z) [R, N, F] (None before the first linear)
        self.d2g: list = []  # per activation: sigma''(z) * g [R, N, F], or None when identically zero
        self.deltas: list = []  # per linear layer: dL/dz [R, N, O]
        # per linear layer (None: dense): its input after a ReLU in CSR form with transposes (sparse_in),
        # and its output's ReLU pattern holding the deltas (sparse_out); see HIDDEN_SPARSE_MAX_DENSITY
        self.sparse_in: list = []
        self.sparse_out: list = []
        self.probs = None  # softmax probabilities [R, N, C] (cross-entropy)
        self.loss = None  # this batch's share of the loss per replica [R]
        self.nbytes = 0

    def _map(self, f) -> "_State":
        out = _State()
        out.keep, out.zero, out.csr, out.csr_t = self.keep, self.zero, self.csr, self.csr_t
        shared = self.inputs[0] if self.inputs and self.inputs[0].dim() == 2 else None
        g = lambda t: None if t is None else (t if t is shared else f(t))
        out.inputs = [g(t) for t in self.inputs]
        out.d1 = [g(t) for t in self.d1]
        out.d2g = [g(t) for t in self.d2g]
        out.deltas = [g(t) for t in self.deltas]
        out.sparse_in = [None if c is None else c.map_rows(f) for c in self.sparse_in]
        out.sparse_out = [None if c is None else c.map_rows(f) for c in self.sparse_out]
        out.probs = g(self.probs)
        out.loss = g(self.loss)
        return out

    def narrow(self, rows: slice) -> "_State":
        """Views of the replicas ``rows`` (a slice of the leading axis; no copy)."""
        return self._map(lambda t: t[rows])

    def select(self, pos: torch.Tensor) -> "_State":
        """The state of the replicas at positions ``pos`` (a copy of their rows)."""
        return self._map(lambda t: t.index_select(0, pos))


class FusedBackend(Backend):
    """Exact HVPs by forward and backward R-passes over cached per-batch state.

    Args:
        cache_bytes: memory for cached per-batch state (all batches together). Beyond it, the
            state is recomputed in every matvec (one extra forward+backward per batch).
        chunk_bytes: on the CPU, replicas are processed in chunks whose widest tangent
            ``[chunk, N, K, F]`` fits in this many bytes (None: no chunking). MLP chains only.
        sample_chunk_bytes: models with conv/pooling/BatchNorm layers are processed in chunks of
            samples whose widest tangent ``[n, K, R, *feat]`` fits in this many bytes (default:
            16 MiB on the CPU, 2 GiB on a GPU).
        drop_zero_columns: MLP chains leave the network input's columns that are zero in every
            row of a batch out of the first layer's products (exact; see ``_drop_zero_columns``).
        sparse_input: MLP chains on the CPU compute the first layer's products from the nonzero
            inputs only (:mod:`fastcurv.ops.csr_linear`), instead of dropping zero columns: None
            (default) when at most ``SPARSE_INPUT_MAX_DENSITY`` (0.4) of a batch's inputs are
            nonzero (MNIST: 19%), True whenever the C++ kernels can run, False never.
        fused_head: on the CPU, a last Linear layer with at most ``HEAD_MAX_OUTPUTS`` (32) outputs
            runs with the loss in one kernel (:mod:`fastcurv.ops.head_hvp`) instead of six thin
            GEMMs (einsums in conv nets, there for at least 32 inputs) and the loss R-op.
        sparse_hidden: MLP chains on the CPU compute the matvec's products of a Linear layer between
            ReLUs from the nonzero entries of its ReLU input, and of its output's ReLU pattern,
            (the probe's tangents vanish where the ReLU does): None (default) where at most
            ``HIDDEN_SPARSE_MAX_DENSITY`` of them are nonzero in a batch (0.75 with AVX-512, 0.6
            with AVX2; about half at initialization) and the layer has at least
            ``HIDDEN_SPARSE_MIN_WIDTH`` (64) inputs and outputs, True always, False never.
    """

    name = "fused"

    @staticmethod
    def supports(replicas, loss=None) -> tuple[bool, str]:
        layers, why = parse(replicas.base)
        if layers is None:
            return False, why
        if loss is not None and loss.kind not in ("cross_entropy", "mse"):
            return False, f"loss {loss.kind!r} is not fused (cross_entropy and mse are)"
        allowed = set()
        for l in layers:
            if l.kind == "bn" and not l.opts.get("batch"):
                stem = l.opts["mean"][: -len("running_mean")]
                allowed |= {l.opts["mean"], l.opts["var"], stem + "num_batches_tracked"}
        other = sorted(set(replicas.buffers) - allowed)
        if other:
            return False, f"the model has buffers other than BatchNorm running statistics: {other[:3]}"
        return True, ""

    def __init__(self, replicas, loss, batches, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 chunk_bytes: int | None = DEFAULT_CHUNK_BYTES, sample_chunk_bytes: int | None = None,
                 drop_zero_columns: bool = True, sparse_input: bool | None = None, fused_head: bool = True,
                 sparse_hidden: bool | None = None):
        super().__init__(replicas, loss, batches)
        ok, why = self.supports(replicas, loss)
        if not ok:
            raise ValueError(f"the fused backend does not support this model: {why}")
        self.layers, _ = parse(replicas.base)
        self.cache_bytes = cache_bytes
        self.chunk_bytes = chunk_bytes
        self.sample_chunk_bytes = sample_chunk_bytes
        self.drop_zero_columns = drop_zero_columns
        self.sparse_input = sparse_input
        self.sparse_hidden = sparse_hidden
        self._maps = _MapEngine(self.layers, loss, fused_head) if _is_general(self.layers) else None
        linears = self._linears = [l for l in self.layers if l.kind == "linear"]
        # the last layer a Linear with few outputs, not the first (its input has a tangent)
        self.fused_head = (fused_head and self._maps is None and self.layers[-1].kind == "linear" and len(linears) > 1
                           and replicas.params[linears[-1].weight].shape[1] <= HEAD_MAX_OUTPUTS)
        # per Linear layer of an MLP chain: whether a ReLU joins it to a Linear layer before / after it
        relu = lambda j: 0 <= j < len(self.layers) and self.layers[j].kind == "act" and self.layers[j].act == activation_kind("relu")
        lin_at = lambda j: 0 <= j < len(self.layers) and self.layers[j].kind == "linear"
        # (the first Linear layer's input is the data: it has no tangent, so no use for the pattern after it)
        at = [j for j, l in enumerate(self.layers) if l.kind == "linear"]
        self._relu_around = [(relu(j - 1) and lin_at(j - 2), n > 0 and relu(j + 1) and lin_at(j + 2)) for n, j in enumerate(at)]
        self._cache: dict[int, tuple[torch.Tensor | None, _State]] = {}
        self._subset: dict[int, tuple[torch.Tensor, _State]] = {}
        self._cache_used = 0
        self._cache_full = False

    def clear_cache(self):
        self._cache.clear()
        self._subset.clear()
        self._cache_used = 0
        self._cache_full = False

    # --- probe-independent pass --------------------------------------------------------------
    def _primal(self, x, y, idx, sparse_hidden: bool | None = None) -> _State:
        """The probe-independent state of batch ``(x, y)`` for replicas ``idx``; ``sparse_hidden``:
        whether to build the hidden layers' CSR forms (False: not, the gradient does not read them;
        True: wherever they apply, whatever the density; None: this backend's setting)."""
        if self._maps is not None:
            params, buffers = self.replicas.subset(idx)
            return self._maps.primal(x, y, params, buffers)
        rs, st = self.replicas, _State()
        params = rs.params if idx is None else {n: t[idx] for n, t in rs.params.items()}
        R = next(iter(params.values())).shape[0]
        a, shared = x, True  # activations; shared = no replica axis yet
        pre: list = []  # pre-activations per act layer
        for layer in self.layers:
            if layer.kind == "flatten":
                a = a.reshape(a.shape[0], -1) if shared else a.reshape(R, a.shape[1], -1)
            elif layer.kind == "linear":
                W = params[layer.weight]
                if shared:  # the first layer: its input in CSR form, or without its all-zero columns
                    st.csr, _ = sparse_rows(a, self.sparse_input)
                    st.csr_t = None if st.csr is None else st.csr.transpose()
                    if st.csr is None and self.drop_zero_columns:
                        a, st.keep, st.zero = _drop_zero_columns(a)
                        if st.keep is not None:
                            W = W.index_select(2, st.keep)
                st.inputs.append(a)
                b = None if layer.bias is None else params[layer.bias]  # the product starts from it
                if shared and st.csr is not None:  # from the nonzero inputs
                    z = csr_linear(st.csr, _all_rows(a.shape[0], R, a.device), W, b)
                else:
                    a3 = a.expand(R, *a.shape) if shared else a
                    z = torch.bmm(a3, W.transpose(1, 2)) if b is None else torch.baddbmm(b.unsqueeze(1), a3, W.transpose(1, 2))
                shared = False
                a = z
            else:
                pre.append(None if shared else a)
                a = activation_value(a, layer.act, layer.slope)
        out = a  # [R, N, C]
        st.loss, st.probs, delta = _loss_head(self.loss, out, y, sample_dim=1)
        # backward: deltas per linear layer, activation multipliers
        acts = iter(reversed(pre))
        lin = len(st.inputs)
        g = delta
        deltas, d1s, d2gs = [], [], []
        for layer in reversed(self.layers):
            if layer.kind == "linear":
                lin -= 1
                deltas.append(g)
                g = torch.bmm(g, params[layer.weight]) if st.inputs[lin].dim() == 3 else None
            elif layer.kind == "act":
                z = next(acts)
                if z is None:
                    d1s.append(None)
                    d2gs.append(None)
                    continue
                d1, d2g = act_derivs(z, g, layer.act, layer.slope)
                if layer.act in (activation_kind("relu"), activation_kind("leaky_relu")):
                    d2g = None
                d1s.append(d1)
                d2gs.append(d2g)
                g = d1 * g
        st.deltas = deltas[::-1]
        st.d1, st.d2g = d1s[::-1], d2gs[::-1]
        self._relu_csr(st, self.sparse_hidden if sparse_hidden is None else sparse_hidden)
        # X^T's row pointers (one per input feature) are left out: state_bytes_per_sample scales these by samples
        csr = [] if st.csr is None else [st.csr.indptr, st.csr.indices, st.csr.values, st.csr_t.indices, st.csr_t.values]
        st.nbytes = sum(t.numel() * t.element_size() for t in [*st.inputs[1:], *st.deltas, *[d for d in st.d1 + st.d2g if d is not None], *csr] + ([st.probs] if st.probs is not None else []))
        st.nbytes += sum(c.nbytes for c in st.sparse_in + st.sparse_out if c is not None)
        return st

    def _relu_csr(self, st: _State, sparse_hidden: bool | None):
        """Fill ``st.sparse_in`` / ``st.sparse_out``: CSR forms of the hidden Linear layers' ReLU
        inputs and of their outputs' ReLU patterns (holding the deltas), for the matvec's sparse
        products (:func:`~fastcurv.ops.csr_linear.csr_masked_linear` and friends), where
        ``sparse_hidden`` allows (None: at most :func:`hidden_sparse_max_density` nonzero, in layers
        at least ``HIDDEN_SPARSE_MIN_WIDTH`` wide)."""
        n = len(st.inputs)
        st.sparse_in, st.sparse_out = [None] * n, [None] * n
        if sparse_hidden is False or not self._sparse_hidden_runs(st.deltas[0].device):
            return
        limit = hidden_sparse_max_density()
        # per Linear layer's input: its ReLU pattern and whether it is sparse enough; the pattern after
        # one hidden layer is the one before the next, found once
        patterns = {}

        def pattern(j):
            if j not in patterns:
                m = st.inputs[j] != 0  # ReLU(z) != 0 exactly where the ReLU passes its gradient
                patterns[j] = m, sparse_hidden is not None or float(m.sum()) <= limit * m.numel()
            return patterns[j]

        for lin, _, _, before, after in self._sparse_hidden_sites(sparse_hidden is None):
            if before and pattern(lin)[1]:
                st.sparse_in[lin] = _ReluCsr.build(st.inputs[lin], pattern(lin)[0], transpose=True)
            if after and pattern(lin + 1)[1]:
                st.sparse_out[lin] = _ReluCsr.build(st.deltas[lin], pattern(lin + 1)[0])

    def _sparse_hidden_runs(self, device) -> bool:
        return self.sparse_hidden is not False and device.type == "cpu" and _ext.has_kernel("csr_masked_linear_out", "cpu")

    def _sparse_hidden_sites(self, auto: bool):
        """``(linear layer, inputs, outputs, sparse input?, sparse output pattern?)`` where the ReLUs
        around a Linear layer allow the sparse products (``auto``: and the layer is wide enough)."""
        n = len(self._relu_around)
        for lin, (before, after) in enumerate(self._relu_around):
            i, o = self.replicas.params[self._linears[lin].weight].shape[2:0:-1]
            if auto and min(i, o) < HIDDEN_SPARSE_MIN_WIDTH:
                continue
            before = before and not (self.fused_head and lin == n - 1)  # the head kernel reads the dense input
            if before or after:
                yield lin, i, o, before, after

    def _state(self, i, x, y, idx) -> _State:
        hit = self._cache.get(i)
        if hit is not None:
            rows, st = hit
            if rows is None and idx is None or rows is not None and idx is not None and torch.equal(rows, idx):
                return st
            last = self._subset.get(i)
            if last is not None and idx is not None and torch.equal(last[0], idx):
                return last[1]
            sub = self._positions(rows, idx)
            if sub is not None:
                # solvers shrink their active set over a run: keep the latest subset's rows
                self._subset[i] = (idx, st.select(sub))
                return self._subset[i][1]
        st = self._primal(x, y, idx)
        if not self._cache_full:
            old = self._cache.pop(i, None)
            if old is not None:
                self._cache_used -= old[1].nbytes
            if self._cache_used + st.nbytes <= self.cache_bytes:
                self._cache[i] = (idx, st)
                self._cache_used += st.nbytes
            else:
                self._cache_full = True
        return st

    def state_bytes_per_sample(self, x, y) -> int:
        """Bytes of cached per-batch state for ONE replica and ONE sample (what ``cache_bytes``
        pays for), measured by running the probe-independent pass for replica 0 on the first
        sample of ``x`` / ``y``. Every cached tensor has one row per sample, so a batch of n
        samples and c replicas needs about ``c * n`` times this (used by :mod:`fastcurv.memory`);
        the hidden layers' CSR forms (``sparse_hidden``) are counted at the largest density they are
        built at (``hidden_sparse_max_density()``, or full with ``sparse_hidden=True``)."""
        idx = torch.zeros(1, dtype=torch.long, device=x.device)
        per = self._primal(x[:1], y[:1], idx, sparse_hidden=False).nbytes
        if self._sparse_hidden_runs(x.device):
            # the CSR forms at the most entries they are built with: row pointers (int64), then an int32
            # column index and a value per entry, twice for the input (it and its transpose)
            frac = 1.0 if self.sparse_hidden else hidden_sparse_max_density()
            item = 4 + self.replicas.params[self.replicas.names[0]].element_size()
            for _, i, o, before, after in self._sparse_hidden_sites(self.sparse_hidden is None):
                per += before * (8 + 2 * frac * i * item) + after * (8 + frac * o * item)
        return int(per)

    def _positions(self, rows, idx):
        """Positions of replicas ``idx`` within cached ``rows`` (None = all), or None if not covered."""
        if idx is None:
            return None
        if rows is None:
            return idx
        where = {int(r): j for j, r in enumerate(rows.tolist())}
        if not all(int(r) in where for r in idx.tolist()):
            return None
        return torch.tensor([where[int(r)] for r in idx.tolist()], device=idx.device)

    def loss_and_gradient(self, idx, reuse_state: bool = False):
        """Loss ``[R]`` and per-parameter gradients ``[R, *shape]`` over all batches (batched GEMMs).

        By default the forward and backward passes run afresh (callers may have changed the
        parameters since the state was cached). ``reuse_state=True`` (MLP chains) reads the
        matvecs' cached per-batch state instead, filling the cache where it is missing, so only
        the weight products remain: valid while the parameters are those the operator was built
        with (the solvers' gradient start)."""
        rs = self.replicas
        pos = {n: j for j, n in enumerate(rs.names)}
        params = rs.params if idx is None else {n: t[idx] for n, t in rs.params.items()}
        grads = [torch.zeros_like(params[n]) for n in rs.names]
        total = None
        if self._maps is not None:
            params, buffers = rs.subset(idx)
            named = dict(zip(rs.names, grads))
            for _, x, y in self.batches:
                # in chunks of samples whose widest feature tensor [n, R, *feat] fits the budget
                step = self._sample_step(x, self._maps.primal(x[:1], y[:1], params, buffers).widest * grads[0].shape[0] * grads[0].element_size())
                for n0 in range(0, x.shape[0], step):
                    st = self._maps.primal(x[n0:n0 + step], y[n0:n0 + step], params, buffers, keep_all=True)
                    total = st.loss if total is None else total + st.loss
                    self._maps.gradient(st, params, buffers, named)
            return total, grads
        for i, x, y in self.batches:
            if reuse_state:
                st, where = self._state_rows(i, x, y, idx)
                if where is not None:
                    st = st.select(where.to(x.device))
            else:
                st = self._primal(x, y, idx, sparse_hidden=False)
            total = st.loss if total is None else total + st.loss
            lin = 0
            for layer in self.layers:
                if layer.kind != "linear":
                    continue
                a, delta = st.inputs[lin], st.deltas[lin]
                R = delta.shape[0]
                if lin == 0 and st.csr is not None:
                    csr_linear_wgrad_shared(st.csr_t, delta, out=grads[pos[layer.weight]], accumulate=True)
                elif lin == 0 and st.keep is not None:
                    dst = grads[pos[layer.weight]]
                    _scatter_columns_(dst, st.keep, st.zero, torch.bmm(delta.transpose(1, 2), a.expand(R, *a.shape)), first=False)
                else:
                    grads[pos[layer.weight]].baddbmm_(delta.transpose(1, 2), a.expand(R, *a.shape) if a.dim() == 2 else a)
                if layer.bias is not None:
                    grads[pos[layer.bias]] += delta.sum(1)
                lin += 1
        return total, grads

    # --- the exact trace of piecewise-linear MLPs ----------------------------------------------
    def exact_trace_support(self) -> tuple[bool, str]:
        """Whether :meth:`exact_trace` applies, and why not."""
        if self._maps is not None:
            return False, "the exact trace is implemented for MLP chains (Linear and activations), not this model"
        piecewise = (activation_kind("relu"), activation_kind("leaky_relu"))
        curved = [l for l in self.layers if l.kind == "act" and l.act not in piecewise]
        if curved:
            return False, "the model has activations that are not piecewise linear (only ReLU and LeakyReLU are)"
        return True, ""

    def exact_trace(self, idx) -> torch.Tensor:
        """Exact Hessian trace ``[Ra]`` (float64) of replicas ``idx`` (None: all), without probes.

        A chain of Linear layers and ReLU/LeakyReLU is linear in any single parameter (the others
        and the activation pattern fixed), so the second derivative of every output with respect
        to one parameter vanishes and the Hessian's diagonal equals the Gauss-Newton diagonal:
        ``tr H = sum_n tr(J_n^T H_n J_n) = sum_n sum_c |J_n^T a_nc|^2`` with ``H_n = A_n A_n^T`` the
        loss Hessian in the outputs (cross-entropy: ``a_nc = sqrt(s p_c) (e_c - p)``, MSE:
        ``sqrt(2 s) e_c``). Each ``J_n^T a_nc`` is a per-sample gradient, whose squared norm
        for a Linear layer is ``|delta|^2 (|input|^2 + 1 if bias)``: one backward pass of the C
        vectors ``a_nc`` through the cached state, no weight-sized products (about 0.7 gradients
        for 784-128-128-10 with C = 10)."""
        ok, why = self.exact_trace_support()
        if not ok:
            raise ValueError(why)
        rs = self.replicas
        params = rs.params if idx is None else {n: t[idx] for n, t in rs.params.items()}
        Ra = next(iter(params.values())).shape[0]
        total = torch.zeros(Ra, dtype=torch.float64, device=rs.device)
        for i, x, y in self.batches:
            st, where = self._state_rows(i, x, y, idx)
            if where is not None:
                st = st.select(where.to(x.device))
            N = x.shape[0]
            C = st.deltas[-1].shape[-1]
            step = self._chunk(Ra, N, C, x.device)
            for r0 in range(0, Ra, step):
                rows = slice(r0, min(Ra, r0 + step))
                total[rows] += self._trace_rows(st.narrow(rows), {n: t[rows] for n, t in params.items()}, N, C)
        return total

    def _trace_rows(self, st, params, N, C) -> torch.Tensor:
        """``sum_n sum_c |J_n^T a_nc|^2`` ``[R]`` for one batch's state of R replicas."""
        R = st.deltas[-1].shape[0]
        eye = torch.eye(C, dtype=st.deltas[-1].dtype, device=st.deltas[-1].device)
        if self.loss.kind == "cross_entropy":
            p = st.probs  # [R, N, C]: seed c is sqrt(s p_c) (e_c - p)
            rd = (eye - p.unsqueeze(2)).mul_((self.loss.scale() * p).sqrt_().unsqueeze(3))
        else:
            rd = (eye * (2 * self.loss.scale(C)) ** 0.5).expand(R, N, C, C)
        total = torch.zeros(R, dtype=torch.float64, device=rd.device)
        lin, act = len(st.inputs), len(st.d1)
        for layer in reversed(self.layers):
            if layer.kind == "linear":
                lin -= 1
                a, W = st.inputs[lin], params[layer.weight]
                sq = a.square().sum(-1)  # [N] (the shared input) or [R, N]
                if layer.bias is not None:
                    sq = sq + 1
                total += (rd.square().sum((2, 3)) * sq).sum(1).to(torch.float64)
                sp = st.sparse_out[lin]
                if a.dim() == 3 and sp is not None:  # rd vanishes outside the ReLU pattern after the layer
                    rd = csr_masked_linear(sp.csr, sp.rows, rd, W.transpose(1, 2))
                elif a.dim() == 3:
                    rd = torch.bmm(rd.reshape(R, N * C, -1), W).view(R, N, C, -1)
            elif layer.kind == "act":
                act -= 1
                if st.d1[act] is not None:
                    rd = rd * st.d1[act].unsqueeze(2)
        return total

    # --- the matvec --------------------------------------------------------------------------
    # Tangents use the layout [R, N, K, F]: every batched matmul below then reads and writes
    # contiguous views without permuting activation-sized tensors.
    def matvec(self, vecs, idx):
        """Products of the replicas ``idx`` (None: all); MLP chains return the flat ``[Ra, K, P]``."""
        if self._maps is not None:
            return self._matvec_maps(vecs, idx, [torch.zeros_like(v) for v in vecs])
        rs = self.replicas
        pos = {n: j for j, n in enumerate(rs.names)}
        R, K = vecs[0].shape[:2]
        flat = vecs[0].new_empty(R, K, rs.P)
        # K = 1: the products land in their place in the flat result (strided views); K > 1: the
        # GEMMs need [K*O, I] blocks per replica, so they go to per-parameter tensors copied once
        out = rs.unflatten(flat) if K == 1 else [torch.empty_like(v) for v in vecs]
        # forward: [R, I, K*O] (a transposed view; the first layer's is made per chunk in _apply,
        # which may keep only some of its input columns); backward, hidden layers: [R, O, K*I]
        # (the Triton linear_rop path reads the probe directly: no forward copies)
        dWt = {}
        triton_fwd = in_fused_engine(vecs[0].device)
        # the last Linear and the loss in one kernel (head_hvp), which reads the probe block as it is
        head = (self.fused_head and vecs[0].device.type == "cpu" and not triton_fwd
                and _ext.choose("head_hvp", vecs[0].device) == "ext")
        for n_lin, layer in enumerate(l for l in (self.layers[:-1] if head else self.layers) if l.kind == "linear"):
            dW = vecs[pos[layer.weight]]
            O, I = dW.shape[2:]
            fwd = None if n_lin == 0 or triton_fwd else dW.reshape(R, K * O, I).transpose(1, 2)
            dWt[layer.weight] = (fwd, dW.permute(0, 2, 1, 3).reshape(R, O, K * I) if n_lin > 0 else None)
        for n_batch, (i, x, y) in enumerate(self.batches):
            st, where = self._state_rows(i, x, y, idx)
            step = self._chunk(R, x.shape[0], K, x.device)
            for s0, v0, n in consecutive_runs(where, R):  # state rows s0.. hold the replicas of vecs rows v0..
                ids = None if idx is None else idx[v0:v0 + n]
                for c in range(0, n, step):
                    m = min(step, n - c)
                    sv, vv = slice(s0 + c, s0 + c + m), slice(v0 + c, v0 + c + m)
                    gid = slice(v0 + c, v0 + c + m) if ids is None else _as_slice(ids[c:c + m])
                    self._apply(st.narrow(sv), {n_: t[gid] for n_, t in rs.params.items()}, [v[vv] for v in vecs],
                                {w: (None if f is None else f[vv], None if g is None else g[vv]) for w, (f, g) in dWt.items()},
                                [o[vv] for o in out], pos, x.shape[0], first=n_batch == 0, triton_fwd=triton_fwd, head=head)
        if K > 1:
            for dst, o in zip(rs.unflatten(flat), out):
                dst.copy_(o)
        return flat

    @staticmethod
    def _gather_on_gpu(st: _State, where: torch.Tensor) -> tuple[_State, torch.Tensor | None]:
        """On a GPU, scattered replicas are gathered into one state (a cheap copy there) instead of
        being run as many small runs of consecutive rows, whose kernel launches would dominate."""
        dev = st.deltas[0].device
        if dev.type == "cuda" and sum(1 for _ in consecutive_runs(where, len(where))) > 1:
            return st.select(where.to(dev)), None
        return st, where

    def _state_rows(self, i, x, y, idx) -> tuple[_State, torch.Tensor | None]:
        """The cached state of batch ``i`` and the positions of replicas ``idx`` in it (None:
        position = replica), computing (and caching, within ``cache_bytes``) what is missing."""
        hit = self._cache.get(i)
        if hit is not None:
            rows, st = hit
            if rows is None:
                return (st, None) if idx is None else self._gather_on_gpu(st, idx)
            if idx is not None and torch.equal(rows, idx):
                return st, None
            where = self._positions(rows, idx)
            if where is not None:
                return self._gather_on_gpu(st, where)
        st = self._primal(x, y, idx)
        if not self._cache_full and (hit is None or idx is None):
            if hit is not None:
                self._cache_used -= hit[1].nbytes
                del self._cache[i]
            if self._cache_used + st.nbytes <= self.cache_bytes:
                self._cache[i] = (idx, st)
                self._cache_used += st.nbytes
            else:
                self._cache_full = True
        return st, None

    def _matvec_maps(self, vecs, idx, out):
        rs = self.replicas
        params, buffers = rs.subset(idx)
        # each probe tensor contiguous once per matvec: as views of the flat [R, K, P] probe block,
        # K > 1 tangents are strided, and every sample chunk's products would copy them again
        named_v, named_o = {n: v.contiguous() for n, v in zip(rs.names, vecs)}, dict(zip(rs.names, out))
        R, K = vecs[0].shape[:2]
        for i, x, y in self.batches:
            st = self._state(i, x, y, idx)
            N = x.shape[0]
            step = self._sample_step(x, K * R * st.widest * vecs[0].element_size())
            for n0 in range(0, N, step):
                self._maps.apply(st.samples(slice(n0, min(N, n0 + step))), params, buffers, named_v, named_o)
        return out

    def _sample_step(self, x, per_sample_bytes: int) -> int:
        """Samples per chunk of the conv engine: as many as keep ``per_sample_bytes`` each within
        ``sample_chunk_bytes``."""
        if self._maps is not None and self._maps.coupled:
            return x.shape[0]  # batch-statistics BatchNorm couples the samples of a batch: no chunks
        budget = self.sample_chunk_bytes
        if budget is None:
            budget = (16 << 20) if x.device.type == "cpu" else (2 << 30)
        return max(1, min(x.shape[0], budget // max(per_sample_bytes, 1)))

    def _chunk(self, R: int, N: int, K: int, device) -> int:
        """Replicas per chunk: all on a GPU; on a CPU as many as keep one [chunk, N, K, F]
        tangent within ``chunk_bytes``, so the element-wise passes between GEMMs hit the cache."""
        if device.type != "cpu" or self.chunk_bytes is None:
            return R
        widest = max(self.replicas.params[l.weight].shape[1] for l in self.layers if l.kind == "linear")
        per = N * K * widest * self.replicas.params[self.replicas.names[0]].element_size()
        return max(1, min(R, self.chunk_bytes // max(per, 1)))

    def _apply(self, st, params, vecs, dWt, out, pos, N, first, triton_fwd, head):
        """Accumulate one batch's Hessian-vector products of the replicas in ``st`` into ``out``
        (``first``: the first batch, whose products overwrite ``out``: it is not zeroed;
        ``triton_fwd``: the Linear layers' R-forward runs through the Triton linear_rop; ``head``:
        the last Linear layer and the loss run in the head_hvp kernel)."""
        R, K = vecs[0].shape[:2]
        ra, rpre, rin = None, [], []
        lin = act = 0
        fused_act = None  # the R-op of the activation after a Linear run by the Triton linear_rop
        layers = self.layers[:-1] if head else self.layers  # with head, the backward pass starts below it
        for li, layer in enumerate(layers):
            if layer.kind == "linear" and triton_fwd:
                rin.append(ra)
                nxt = self.layers[li + 1] if li + 1 < len(self.layers) else None
                ra, fused_act = self._linear_rop_layer(st, lin, layer, nxt if nxt is not None and nxt.kind == "act" else None,
                                                       ra, params, vecs, pos)
                lin += 1
            elif layer.kind == "linear":
                rin.append(ra)
                a, W = st.inputs[lin], params[layer.weight]
                O, I = W.shape[1], W.shape[2]
                fwd, _ = dWt[layer.weight]
                db = None if layer.bias is None else vecs[pos[layer.bias]].reshape(R, K * O)  # the first product starts from it
                sp = st.sparse_in[lin]
                if fwd is None and st.csr is not None:  # sparse input: the probe block as [R, K*O, I] (a view at K=1)
                    rz = csr_linear(st.csr, _all_rows(N, R, a.device), vecs[pos[layer.weight]].reshape(R, K * O, I), db)
                elif sp is not None:  # from the ReLU input's nonzeros
                    rz = csr_linear(sp.csr, sp.rows, fwd.transpose(1, 2), db)
                else:
                    if fwd is None:  # the first layer: [R, I, K*O], or [R, I_kept, K*O] (the probe's kept columns)
                        dW = vecs[pos[layer.weight]]
                        fwd = (dW.reshape(R, K * O, I) if st.keep is None else dW.index_select(3, st.keep).view(R, K * O, -1)).transpose(1, 2)
                    # an input shared by all replicas enters bmm as a stride-0 expand (no copy)
                    a3 = a.expand(R, *a.shape) if a.dim() == 2 else a
                    rz = torch.bmm(a3, fwd) if db is None else torch.baddbmm(db.unsqueeze(1), a3, fwd)
                rz = rz.view(R, N, K, O)
                if ra is not None and sp is not None:  # ra vanishes where the ReLU input does
                    csr_masked_linear(sp.csr, sp.rows, ra, W, out=rz, accumulate=True)
                elif ra is not None:  # in place: these tensors are R*N*K*F large
                    rz.view(R, N * K, O).baddbmm_(ra.view(R, N * K, I), W.transpose(1, 2))
                ra = rz
                lin += 1
            elif layer.kind == "act":
                d1 = st.d1[act]
                act += 1
                if fused_act is not None:  # applied by linear_rop's epilogue: (tangent before, after)
                    rz, ra = fused_act
                    fused_act = None
                    rpre.append(None if st.d2g[act - 1] is None else rz)
                    continue
                if d1 is None:
                    rpre.append(None)
                    continue
                if st.d2g[act - 1] is None:  # piecewise-linear: the pre-activation tangent is not needed later
                    rpre.append(None)
                    ra = ra.mul_(d1.unsqueeze(2))
                else:
                    rpre.append(ra)
                    ra = d1.unsqueeze(2) * ra
        if head:
            rd, layers, act = self._head(st, params, vecs, out, pos, ra, act, first)
        else:
            C = ra.shape[-1]
            if self.loss.kind == "cross_entropy":
                rd = softmax_ce_hvp(st.probs.reshape(R * N, 1, C), ra.reshape(R * N, K, 1, C), self.loss.scale()).view(R, N, K, C)
            else:
                rd = 2 * self.loss.scale(C) * ra
        for layer in reversed(layers):
            if layer.kind == "linear":
                lin -= 1
                a, W, delta = st.inputs[lin], params[layer.weight], st.deltas[lin]
                O, I = W.shape[1], W.shape[2]
                j = pos[layer.weight]
                rdT = rd.reshape(R, N, K * O).transpose(1, 2)  # [R, K*O, N]
                sp_in, sp_out = st.sparse_in[lin], st.sparse_out[lin]
                if lin == 0 and st.csr is not None:  # from the nonzero inputs, written in place
                    csr_linear_wgrad_shared(st.csr_t, rd.reshape(R, N, K * O), out=out[j].view(R, K * O, I), accumulate=not first)
                elif sp_in is not None:
                    csr_linear_wgrad_shared(sp_in.csr_t, rd.reshape(R, N, K * O), out=out[j].view(R, K * O, I),
                                            accumulate=not first, rows=sp_in.rows_t)
                elif lin == 0 and st.keep is not None:
                    _scatter_columns_(out[j].view(R, K * O, I), st.keep, st.zero, torch.bmm(rdT, a.expand(R, *a.shape)), first)
                else:
                    out[j].view(R, K * O, I).baddbmm_(rdT, a.expand(R, *a.shape) if a.dim() == 2 else a, beta=0 if first else 1)
                ra_in = rin[lin]
                if ra_in is not None:  # delta^T ra_in [R, O, K*I], from the output's ReLU pattern where sparse
                    dra = (torch.bmm(delta.transpose(1, 2), ra_in.view(R, N, K * I)) if sp_out is None else
                           csr_linear_wgrad(sp_out.csr, sp_out.rows, ra_in.view(R, N, K * I),
                                            out=delta.new_empty(R, O, K * I).transpose(1, 2)).transpose(1, 2))
                    out[j] += dra.view(R, O, K, I).transpose(1, 2)
                if layer.bias is not None:
                    if first:
                        torch.sum(rd, 1, out=out[pos[layer.bias]])
                    else:
                        out[pos[layer.bias]] += rd.sum(1)
                if a.dim() == 3 and sp_out is not None:  # rd vanishes outside the output's ReLU pattern
                    rg = csr_linear(sp_out.csr, sp_out.rows, dWt[layer.weight][1].transpose(1, 2))
                    rd = csr_masked_linear(sp_out.csr, sp_out.rows, rd, W.transpose(1, 2), out=rg.view(R, N, K, I), accumulate=True)
                elif a.dim() == 3:
                    rg = torch.bmm(rd.reshape(R, N * K, O), W)
                    rg.view(R, N, K * I).baddbmm_(delta, dWt[layer.weight][1])
                    rd = rg.view(R, N, K, I)
            elif layer.kind == "act":
                act -= 1
                d1 = st.d1[act]
                if d1 is None:
                    continue
                d2g, rz = st.d2g[act], rpre[act]
                F_ = rd.shape[-1]
                if d2g is None:
                    rd = rd.mul_(d1.unsqueeze(2))
                else:
                    rd = act_rop_bwd(d1.reshape(R * N, F_), d2g.reshape(R * N, F_), rz.reshape(R * N, K, F_), rd.reshape(R * N, K, F_)).view(R, N, K, F_)

    def _head(self, st, params, vecs, out, pos, ra, act, first):
        """The last Linear layer's products and the loss R-op by :func:`~fastcurv.ops.head_hvp.head_hvp`,
        given the tangent ``ra`` of its input; when a piecewise-linear activation precedes it, that
        activation's backward R-op too. Returns the R-gradient for the layers left, those layers and
        the activation count below them."""
        layer, lin = self.layers[-1], len(st.inputs) - 1
        layers, d1 = self.layers[:-1], None
        if layers[-1].kind == "act" and st.d1[act - 1] is not None and st.d2g[act - 1] is None:
            act -= 1
            d1, layers = st.d1[act], layers[:-1]
        bias = None if layer.bias is None else pos[layer.bias]
        rd = _head_products(self.loss, st.inputs[lin], ra, params[layer.weight], vecs[pos[layer.weight]], st.deltas[lin],
                            st.probs, None if bias is None else vecs[bias], d1, out[pos[layer.weight]],
                            None if bias is None else out[bias], accumulate=not first)
        return rd, layers, act

    @staticmethod
    def _linear_rop_layer(st, lin, layer, act, ra, params, vecs, pos):
        """One Linear layer's R-forward (and that of the activation ``act`` after it, or None) by
        the Triton :func:`fastcurv.ops.linear_rop.linear_rop`, in the engine's ``[R, N, K, F]``
        layout: returns the tangent after the layer and, with ``act``, ``(rz, sigma'(z) rz)``
        for the activation step (else None)."""
        a, W, dW = st.inputs[lin], params[layer.weight], vecs[pos[layer.weight]]
        R = dW.shape[0]
        if lin == 0 and st.keep is not None:
            W, dW = W.index_select(2, st.keep), dW.index_select(3, st.keep)
        out = linear_rop(
            a.expand(R, *a.shape) if a.dim() == 2 else a, None if ra is None else ra.transpose(1, 2), W, dW,
            None if layer.bias is None else params[layer.bias], None if layer.bias is None else vecs[pos[layer.bias]],
            None if act is None else act.act, 0.0 if act is None else act.slope)
        rz = out.rz.transpose(1, 2).contiguous()  # [R, K, N, O] -> [R, N, K, O]
        if act is None:
            return rz, None
        return rz, (rz, out.rh.transpose(1, 2).contiguous())


# --- the sample-major engine: conv nets, pooling, BatchNorm, residual DAGs --------------------
# Layout: a feature tensor of R replicas is [N, R, *feat] (feature maps [N, R, C, H, W], so that
# [N, R*C, H, W] is a contiguous view and every replica's conv is one group of a grouped
# convolution); a tangent is [N, K, R, *feat] (the K probes fold into the batch axis of the
# products that share the weights). Replicas' inputs before the first layer with parameters are
# shared: [N, *feat] without the replica axis. Everything has the samples first, so the work is
# chunked over samples (contiguous views) to bound the tangents' memory.


class _MapState:
    """Probe-independent values of one batch for the sample-major engine.

    ``t[(layer, key)]``: tensors with the samples first; those in ``shared`` have no replica
    axis, the others have it at axis 1. ``meta[layer]``: input shapes (pooling, flatten).
    """

    def __init__(self):
        self.t: dict = {}
        self.shared: set = set()
        self.meta: dict = {}
        self.probs = None  # [N, R, C] softmax probabilities (cross-entropy)
        self.loss = None  # [R]
        self.widest = 1  # the largest number of features per sample and replica
        self.nbytes = 0

    def put(self, i, key, tensor, shared=False):
        self.t[(i, key)] = tensor
        if shared:
            self.shared.add((i, key))
        self.nbytes += tensor.numel() * tensor.element_size()

    def get(self, i, key):
        return self.t.get((i, key))

    def _map(self, f, shared_too=False) -> "_MapState":
        out = _MapState()
        out.shared, out.meta, out.widest, out.loss = self.shared, self.meta, self.widest, self.loss
        out.t = {k: (f(v) if shared_too or k not in self.shared else v) for k, v in self.t.items()}
        out.probs = None if self.probs is None else f(self.probs)
        return out

    def select(self, pos: torch.Tensor) -> "_MapState":
        """The replicas at positions ``pos`` (a copy of their rows)."""
        return self._map(lambda v: v.index_select(1, pos))

    def samples(self, rows: slice) -> "_MapState":
        """Views of the samples ``rows`` (no copy)."""
        return self._map(lambda v: v[rows], shared_too=True)


def _rb(coef: torch.Tensor, nsp: int, tangent: bool) -> torch.Tensor:
    """A per-replica, per-channel ``[R, C]`` (tangent: ``[R, K, C]``) coefficient shaped to
    broadcast against ``[N, R, C, *sp]`` (tangent: ``[N, K, R, C, *sp]``)."""
    if tangent:
        coef = coef.transpose(0, 1)
    return coef.reshape(1, *coef.shape, *([1] * nsp))


class _MapEngine:
    """Forward, backward and R-passes of the sample-major engine over a DAG of layers.

    ``layers``: the nodes in topological order, a parsed chain or a traced graph
    (:class:`fastcurv.backends.fused_graph.Graph`, whose ``inputs[i]`` lists the nodes that node
    ``i`` reads; -1 is the model input; a chain's node reads its predecessor). The last node is the
    model output. ``kind == "add"`` nodes sum their inputs (residual additions). Nodes without
    parameters whose inputs are all computed from the model input alone are "shared": evaluated
    once without a replica axis, with zero tangents. Forward passes run in topological order;
    backward passes in reverse order, each node adding its input gradients into its inputs' (a
    value used twice receives the sum).
    """

    def __init__(self, layers, loss, fused_head: bool = True):
        self.layers, self.loss = layers, loss
        n = len(layers)
        self.inputs = [list(v) for v in getattr(layers, "inputs", [[i - 1] for i in range(n)])]
        self.shared: list[bool] = []
        for i, l in enumerate(layers):
            self.shared.append(l.kind not in ("linear", "conv", "bn") and all(j < 0 or self.shared[j] for j in self.inputs[i]))
        # the output node a Linear whose input has a tangent: with few outputs, it and the loss may run in
        # the head_hvp kernel (decided per call: outputs, device, kernels)
        self.head = fused_head and layers[n - 1].kind == "linear" and not self._reads_shared(self.inputs[n - 1][0])
        users: list[list[int]] = [[] for _ in range(n)]
        for i, ins in enumerate(self.inputs):
            for j in ins:
                if j >= 0:
                    users[j].append(i)
        self.last_use = [max(u, default=n) for u in users]  # values are freed after their last reader
        # BatchNorm with batch statistics couples the samples of a batch (no chunking over samples)
        self.coupled = any(l.kind == "bn" and l.opts.get("batch") for l in layers)

        # In-place updates of tangents (activations) only where no other node holds the tensor:
        # forward, the input has this node as its only reader and is not an alias (an addition
        # may return one of its inputs, Flatten returns a view of its input); backward, likewise
        # for the node's reader (an addition hands the same gradient to all its inputs).
        def fwd_owned(j):
            return j >= 0 and len(users[j]) == 1 and layers[j].kind != "add" and (
                layers[j].kind != "flatten" or fwd_owned(self.inputs[j][0]))

        def bwd_owned(i):
            if not users[i]:
                return True
            u = users[i][0]
            return len(users[i]) == 1 and layers[u].kind != "add" and (layers[u].kind != "flatten" or bwd_owned(u))

        # An eval BatchNorm whose output only a first-order activation (ReLU, LeakyReLU) reads: the
        # BatchNorm R-op kernels apply the activation's derivative too, and the activation node
        # passes tangents through.
        first_order = (activation_kind("relu"), activation_kind("leaky_relu"))
        self.bn_act = {i: users[i][0] for i, l in enumerate(layers)
                       if l.kind == "bn" and not l.opts.get("batch") and len(users[i]) == 1
                       and layers[users[i][0]].kind == "act" and layers[users[i][0]].act in first_order}
        self.act_fused = set(self.bn_act.values())
        # A conv or linear bias whose output only an eval BatchNorm reads: the BatchNorm kernels take
        # its tangent (scale * db joins the BatchNorm's shift) and give its product (the sum of the
        # BatchNorm input's R-gradient), a pass over the tangent saved each way.
        self.bn_bias = {users[i][0]: i for i, l in enumerate(layers)
                        if l.kind in ("conv", "linear") and l.bias is not None and len(users[i]) == 1
                        and layers[users[i][0]].kind == "bn" and not layers[users[i][0]].opts.get("batch")}
        self.bias_folded = set(self.bn_bias.values())
        self.fwd_inplace = [l.kind in ("act", "bn") and fwd_owned(self.inputs[i][0]) for i, l in enumerate(layers)]
        self.bwd_inplace = [(l.kind == "act" and bwd_owned(i)) or (l.kind == "bn" and bwd_owned(self.bn_act.get(i, i)))
                            for i, l in enumerate(layers)]

    def _reads_shared(self, j) -> bool:
        return j < 0 or self.shared[j]

    def _acc(self, acc: dict, j: int, t):
        """Add the gradient ``t`` of node ``j``'s output into ``acc`` (out of place: ``t`` may be
        held elsewhere); shared nodes take none."""
        if j < 0 or self.shared[j] or t is None:
            return
        acc[j] = t if j not in acc else acc[j] + t

    def _backward(self, grads: dict):
        """Walk the graph from the output back: yield ``(node, layer, gradient of its output)`` for
        every node that is not shared and has a gradient in ``grads`` (popped), while the loop body
        adds the gradients of the node's inputs into ``grads``; additions pass theirs to every input."""
        for i in range(len(self.layers) - 1, -1, -1):
            if self.shared[i] or i not in grads:
                continue
            l, g = self.layers[i], grads.pop(i)
            if l.kind == "add":
                for j in self.inputs[i]:
                    self._acc(grads, j, g)
                continue
            yield i, l, g

    def _free(self, vals: dict, i: int):
        for j in set(self.inputs[i]):
            if j >= 0 and self.last_use[j] == i:
                vals.pop(j, None)

    @staticmethod
    def _add_values(l, terms, shared):
        """The output of a residual addition: ``terms`` with the replica axis at 1, except where
        ``shared`` (no replica axis)."""
        full = [t for t, s in zip(terms, shared) if not s]
        ref = full[0].shape
        for t, s in zip(terms, shared):
            if (t.shape != ref[:1] + ref[2:]) if s else (t.shape != ref):
                raise ValueError(f"the residual addition {l.name!r} adds tensors of shapes "
                                 f"{[tuple(u.shape) for u in terms]} (replica axis at 1 except for inputs shared by all "
                                 f"replicas); the fused engine needs equal shapes (no broadcasting)")
        out = None
        for t, s in zip(terms, shared):
            t = t.unsqueeze(1) if s else t
            out = t if out is None else out + t
        return out

    # --- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _full(a, R, shared):
        """``[N, R*C, H, W]`` input of a grouped conv (a shared input is repeated R times)."""
        if shared:
            return a.unsqueeze(1).expand(a.shape[0], R, *a.shape[1:]).reshape(a.shape[0], -1, *a.shape[2:])
        return a.reshape(a.shape[0], -1, *a.shape[3:])

    @staticmethod
    def _pool(a4, l):
        o = l.opts
        if l.kind == "avgpool":
            return F.avg_pool2d(a4, o["kernel_size"], o["stride"], o["padding"], o["ceil_mode"], o["count_include_pad"], o["divisor_override"])
        if l.kind == "adaptive":
            return F.adaptive_avg_pool2d(a4, o["output_size"])
        return F.max_pool2d(a4, o["kernel_size"], o["stride"], o["padding"], o["dilation"], o["ceil_mode"])

    @staticmethod
    def _pool_bwd(g4, l, in_shape):
        """Adjoint of a (linear) average pooling: ``g4`` ``[B, C, H', W']`` -> ``[B, C, H, W]``."""
        proxy = g4.new_zeros(()).expand(*g4.shape[:2], *in_shape)
        o = l.opts
        if l.kind == "avgpool":
            return torch.ops.aten.avg_pool2d_backward(g4, proxy, o["kernel_size"], o["stride"], o["padding"], o["ceil_mode"],
                                                      o["count_include_pad"], o["divisor_override"])
        return torch.ops.aten._adaptive_avg_pool2d_backward(g4, proxy)

    def _bn_coefs(self, l, params, buffers):
        inv = torch.rsqrt(buffers[l.opts["var"]] + l.opts["eps"])  # [R, C]
        mean = buffers[l.opts["mean"]]
        s = inv if l.weight is None else params[l.weight] * inv
        t = -mean * s if l.bias is None else params[l.bias] - mean * s
        return s, t, inv, mean

    def _bn_eval_rfwd(self, l, i, st, vecs, ra, s):
        """R-forward of eval BatchNorm node ``i`` (and of the activation fused with it; ``ra``:
        the input tangent, without the folded bias of the layer before, if any): returns the output
        tangent ``[N, K, R, C, *sp]`` and, for an affine BatchNorm whose input has a tangent,
        ``dot`` ``[R, K, C]``: the sum over samples and positions of the full input tangent times
        ``delta`` (what the weight's product needs from it, so that it is not kept); computed by
        :func:`fastcurv.ops.bn_eval_rop_fwd` (C++/CUDA/Triton kernel)."""
        j = self.bn_act.get(i)
        d1 = None if j is None else st.get(j, "d1")  # [N, R, C, *sp]
        xh = st.get(i, "xhat") if l.weight is not None else None
        if ra is None:  # a BatchNorm of the model input: only the parameter tangents
            nsp = xh.dim() - 3
            term = xh.unsqueeze(1) * _rb(vecs[l.weight], nsp, True) + _rb(vecs[l.bias], nsp, True)
            return (term if d1 is None else term.mul_(d1.unsqueeze(1))), None
        N, K, R, C = ra.shape[:4]
        G, S = R * C, ra[0, 0, 0, 0].numel()
        delta = st.get(i, "delta") if l.weight is not None else None
        rz = ra.reshape(N, K, G, S)
        fresh = rz.untyped_storage().data_ptr() != ra.untyped_storage().data_ptr()  # reshape copied

        def flat(t):
            return None if t is None else t.reshape(N, G, S)

        def kg(p):  # [R, K, C] tangent -> [K, R*C]
            return None if p is None else vecs[p].transpose(0, 1).reshape(K, G)

        rbeta, db = kg(l.bias), kg(self.layers[self.bn_bias[i]].bias) if i in self.bn_bias else None
        if db is not None:
            rbeta = db * s.reshape(G) if rbeta is None else rbeta + db * s.reshape(G)
        out, dot = bn_eval_rop_fwd(rz, s.reshape(G), flat(xh), kg(l.weight), rbeta, flat(d1), flat(delta),
                                   inplace=rz.is_contiguous() and (self.fwd_inplace[i] or fresh))
        if delta is None:
            return out.view(ra.shape), None
        if db is not None:
            dot += db * st.get(i, "dsum").reshape(N, G).sum(0)
        return out.view(ra.shape), dot.view(K, R, C).transpose(0, 1)

    def _bn_eval_rbwd(self, l, i, st, vecs, out, rd, s, inv, dot):
        """R-backward of eval BatchNorm node ``i`` (``rd``: the R-gradient w.r.t. the output of the
        activation fused with it, or of the BatchNorm): adds the weight and bias products to ``out``
        and returns the R-gradient w.r.t. the BatchNorm input (None when that input is shared);
        computed by :func:`fastcurv.ops.bn_eval_rop_bwd` (C++/CUDA/Triton kernel)."""
        j = self.bn_act.get(i)
        d1 = None if j is None else st.get(j, "d1")
        N, K, R, C = rd.shape[:4]
        G, S = R * C, rd[0, 0, 0, 0].numel()
        input_grad = not self._reads_shared(self.inputs[i][0])
        xh = delta = crg = None
        if l.weight is not None:
            xh = st.get(i, "xhat").reshape(N, G, S)
            if input_grad:
                delta = st.get(i, "delta").reshape(N, G, S)
                crg = (vecs[l.weight] * inv.unsqueeze(1)).transpose(0, 1).reshape(K, G)
        r = rd.reshape(N, K, G, S)
        if input_grad and not (r.is_contiguous() and self.bwd_inplace[i]):
            r = r.clone(memory_format=torch.contiguous_format)
        r, sum_u, sum_uxh = bn_eval_rop_bwd(r, s.reshape(G), xh, delta, crg, None if d1 is None else d1.reshape(N, G, S),
                                            input_grad=input_grad)
        if l.weight is not None:
            hw = sum_uxh.view(K, R, C).transpose(0, 1)
            out[l.weight] += hw if dot is None else hw + dot * inv.unsqueeze(1)
            out[l.bias] += sum_u.view(K, R, C).transpose(0, 1)
        if i in self.bn_bias:  # the folded bias: the sum of the input's R-gradient scale * u + crg * delta
            hb = sum_u * s.reshape(G)
            if crg is not None:
                hb += crg * st.get(i, "dsum").reshape(N, G).sum(0)
            out[self.layers[self.bn_bias[i]].bias] += hb.view(K, R, C).transpose(0, 1)
        return r.view(rd.shape) if input_grad else None

    @staticmethod
    def _bn_batch_check(l, a, R, shared):
        """The input of a batch-statistics BatchNorm with the replica axis (a shared input is expanded)."""
        want = (4 if l.opts["dims"] == 2 else 2) + (0 if shared else 1)  # BatchNorm1d: [N, C]; 2d: [N, C, H, W]
        if a.dim() != want:
            raise ValueError(f"BatchNorm {l.name!r} got inputs {tuple(a.shape)} (replica axis included: {not shared})")
        return a.unsqueeze(1).expand(a.shape[0], R, *a.shape[1:]) if shared else a

    @staticmethod
    def _bn_batch_rbwd(l, i, st, params, vecs, out, rin, rd):
        """R-backward of a batch-statistics BatchNorm node. With ``out``: add the weight and bias
        products to it; else return the R-gradient w.r.t. the node's input ``[N, K, R, C, *sp]``.

        Per replica and channel, with means over samples (and positions): forward
        ``y = gamma * xhat + beta``, ``xhat = (x - mean) * inv``; backward
        ``gx = inv * P(gamma * g)`` with ``P(v) = v - mean(v) - xhat * mean(v * xhat)``. Its R-op
        adds the tangents of ``inv`` (``-inv^2 * mean(xhat * dx)``), ``xhat`` (``rxh``), ``gamma``
        and ``g`` (``rd``); computed by :func:`fastcurv.ops.bn_rop_bwd` (C++/CUDA/Triton kernel)."""
        xh, inv, delta = st.get(i, "xhat").unsqueeze(1), st.get(i, "inv").unsqueeze(1), st.get(i, "delta").unsqueeze(1)
        dims = (0, *range(4, xh.dim()))
        rxh, m2 = rin if rin is not None else (None, None)
        if out is not None:
            if l.weight is not None:
                hg = (rd * xh).sum(dims)
                if rxh is not None:
                    hg += (delta * rxh).sum(dims)
                out[l.weight] += hg.transpose(0, 1)
                out[l.bias] += rd.sum(dims).transpose(0, 1)
            return None
        # the fused kernel (fastcurv.ops.bn_rop_bwd) on the flat layout: groups G = R*C, positions S
        N, K = rd.shape[:2]
        G = xh.shape[2] * xh.shape[3]
        S = torch.Size(xh.shape[4:]).numel()  # 1 for BatchNorm1d
        gamma = rgamma = None
        if l.weight is not None:
            gamma = params[l.weight].reshape(G)
            rgamma = vecs[l.weight].transpose(0, 1).reshape(K, G)  # [R, K, C] -> [K, R*C]
        if rxh is not None:
            rxh, m2 = rxh.reshape(N, K, G, S), m2.reshape(K, G)
        out = bn_rop_bwd(xh.reshape(N, G, S), delta.reshape(N, G, S), rd.reshape(N, K, G, S), inv.reshape(G), gamma, rgamma, rxh, m2)
        return out.view(rd.shape)

    @staticmethod
    def _conv_io(l, W):
        o = l.opts
        return o["stride"], o["padding"], o["dilation"], o["groups"]

    def _shared_apply(self, a, l):
        if l.kind == "flatten":
            return a.reshape(a.shape[0], -1)
        if l.kind == "act":
            return activation_value(a, l.act, l.slope)
        if a.dim() != 4:
            raise ValueError(f"module {l.name!r} ({l.kind}) needs inputs [N, C, H, W]; got {tuple(a.shape)}")
        return self._pool(a, l)

    # --- probe-independent pass -----------------------------------------------------------------
    def primal(self, x, y, params, buffers, keep_all=False) -> _MapState:
        """Forward and backward pass; keeps what the R-passes need (``keep_all``: every layer's
        input and output gradient, for the parameter gradient)."""
        st = _MapState()
        R = next(iter(params.values())).shape[0]
        N = x.shape[0]
        vals = {-1: x}  # node outputs still to be read
        pre = {}
        bn = {}
        for i, l in enumerate(self.layers):
            ins = self.inputs[i]
            if l.kind == "add":
                terms = [vals[j] for j in ins]
                if self.shared[i]:
                    vals[i] = self._add_values(l, [t.unsqueeze(1) for t in terms], [False] * len(terms)).squeeze(1)
                else:
                    vals[i] = self._add_values(l, terms, [self._reads_shared(j) for j in ins])
                    st.widest = max(st.widest, vals[i][0, 0].numel())
                self._free(vals, i)
                continue
            a, shared = vals[ins[0]], self._reads_shared(ins[0])
            if self.shared[i]:
                vals[i] = self._shared_apply(a, l)
                self._free(vals, i)
                continue
            if l.kind == "conv":
                if (a.dim() != 4 if shared else a.dim() != 5):
                    raise ValueError(f"Conv2d {l.name!r} needs inputs [N, C, H, W]; got {tuple(a.shape)} (replica axis included: {not shared})")
                W = params[l.weight]
                stride, pad, dil, g = self._conv_io(l, W)
                b = params[l.bias].reshape(-1) if l.bias is not None else None
                if shared and g == 1:
                    z = F.conv2d(a, W.reshape(-1, *W.shape[2:]), b, stride, pad, dil, 1)
                else:
                    z = F.conv2d(self._full(a, R, shared), W.reshape(-1, *W.shape[2:]), b, stride, pad, dil, R * g)
                st.put(i, "in", a, shared)
                a = z.view(N, R, W.shape[1], *z.shape[2:])
            elif l.kind == "linear":
                if a.dim() != (2 if shared else 3):
                    raise ValueError(f"Linear {l.name!r} needs inputs [N, features]; got {tuple(a.shape)} (replica axis included: {not shared})")
                W = params[l.weight]
                z = torch.einsum("ni,roi->nro" if shared else "nri,roi->nro", a, W)
                if l.bias is not None:
                    z = z + params[l.bias]
                st.put(i, "in", a, shared)
                a = z
            elif l.kind == "bn" and l.opts.get("batch"):
                a = self._bn_batch_check(l, a, R, shared)
                dims = (0, *range(3, a.dim()))
                var, mean = torch.var_mean(a, dims, correction=0, keepdim=True)
                inv = torch.rsqrt(var + l.opts["eps"])  # [1, R, C, 1...]
                xhat = (a - mean) * inv
                st.put(i, "xhat", xhat)
                st.put(i, "inv", inv)
                a = xhat if l.weight is None else xhat * _rb(params[l.weight], a.dim() - 3, False) + _rb(params[l.bias], a.dim() - 3, False)
            elif l.kind == "bn":
                s, t, inv, mean = bn[i] = self._bn_coefs(l, params, buffers)
                if shared:
                    a = a.unsqueeze(1)
                nsp = a.dim() - 3
                if a.shape[2] != s.shape[1]:
                    raise ValueError(f"BatchNorm {l.name!r} has {s.shape[1]} channels, its input {tuple(a.shape)} (replica axis at 1)")
                if l.weight is not None:
                    st.put(i, "xhat", (a - _rb(mean, nsp, False)) * _rb(inv, nsp, False))
                a = a * _rb(s, nsp, False) + _rb(t, nsp, False)
            elif l.kind == "act":
                pre[i] = a
                a = activation_value(a, l.act, l.slope)
            elif l.kind == "flatten":
                st.meta[i] = a.shape[2:]
                a = a.reshape(N, R, -1)
            elif l.kind == "maxpool":
                st.meta[i] = a.shape[3:]
                o = l.opts
                z, ind = F.max_pool2d(a.reshape(N, -1, *a.shape[3:]), o["kernel_size"], o["stride"], o["padding"],
                                      o["dilation"], o["ceil_mode"], return_indices=True)
                st.put(i, "ind", ind.view(N, R, a.shape[2], -1))
                st.meta[(i, "out")] = z.shape[2:]
                a = z.view(N, R, a.shape[2], *z.shape[2:])
            else:
                st.meta[i] = a.shape[3:]
                z = self._pool(a.reshape(N, -1, *a.shape[3:]), l)
                a = z.view(N, R, a.shape[2], *z.shape[2:])
            st.widest = max(st.widest, a[0, 0].numel())
            vals[i] = a
            self._free(vals, i)
        out = vals[len(self.layers) - 1]  # [N, R, C]
        if out.dim() != 3:
            raise ValueError(f"the model's outputs are {tuple(out.shape)} (replica axis at 1); the fused engine needs [N, classes]")
        st.loss, st.probs, g = _loss_head(self.loss, out, y, sample_dim=0)
        if st.probs is not None:
            st.nbytes += st.probs.numel() * st.probs.element_size()
        grads = {len(self.layers) - 1: g}  # node -> gradient of the loss w.r.t. its output
        for i, l, g in self._backward(grads):
            if l.kind in ("conv", "linear"):
                a_in, first = st.get(i, "in"), (i, "in") in st.shared
                if keep_all or not first:
                    st.put(i, "delta", g)
                if first:
                    continue
                W = params[l.weight]
                if l.kind == "linear":
                    g = torch.einsum("nro,roi->nri", g, W)
                else:
                    stride, pad, dil, gr = self._conv_io(l, W)
                    gi = torch.nn.grad.conv2d_input((N, a_in.shape[1] * a_in.shape[2], *a_in.shape[3:]), W.reshape(-1, *W.shape[2:]),
                                                    g.reshape(N, -1, *g.shape[3:]), stride, pad, dil, R * gr)
                    g = gi.view(a_in.shape)
            elif l.kind == "bn" and l.opts.get("batch"):
                st.put(i, "delta", g)
                if self._reads_shared(self.inputs[i][0]):
                    continue
                xhat, inv = st.get(i, "xhat"), st.get(i, "inv")
                gx = g if l.weight is None else g * _rb(params[l.weight], g.dim() - 3, False)
                dims = (0, *range(3, g.dim()))
                g = (gx - gx.mean(dims, keepdim=True) - xhat * (gx * xhat).mean(dims, keepdim=True)) * inv
            elif l.kind == "bn":
                if l.weight is not None or keep_all:
                    st.put(i, "delta", g)
                if l.weight is not None and i in self.bn_bias:  # per sample: the folded bias's R-passes read its sums
                    st.put(i, "dsum", g.reshape(*g.shape[:3], -1).sum(3))
                if self._reads_shared(self.inputs[i][0]):
                    continue
                s = bn[i][0]
                g = g * _rb(s, g.dim() - 3, False)
            elif l.kind == "act":
                d1, d2g = act_derivs(pre[i], g, l.act, l.slope)
                st.put(i, "d1", d1)
                if l.act not in (activation_kind("relu"), activation_kind("leaky_relu")):
                    st.put(i, "d2g", d2g)
                g = d1 * g
            elif l.kind == "flatten":
                g = g.reshape(N, R, *st.meta[i])
            elif l.kind == "maxpool":
                ind = st.get(i, "ind")
                gi = g.new_zeros(N, R, g.shape[2], st.meta[i].numel())
                g = gi.scatter_add_(3, ind, g.reshape(N, R, g.shape[2], -1)).view(N, R, g.shape[2], *st.meta[i])
            else:
                C = g.shape[2]
                g = self._pool_bwd(g.reshape(N, R * C, *g.shape[3:]), l, st.meta[i]).view(N, R, C, *st.meta[i])
            self._acc(grads, self.inputs[i][0], g)
        return st

    def gradient(self, st: _MapState, params, buffers, grads: dict):
        """Add the parameter gradients of a ``keep_all`` state to ``grads`` (name -> [R, *shape])."""
        for i, l in enumerate(self.layers):
            if self.shared[i]:
                continue
            if l.kind == "conv":
                a, first, delta = st.get(i, "in"), (i, "in") in st.shared, st.get(i, "delta")
                W = params[l.weight]
                R, N = W.shape[0], delta.shape[0]
                stride, pad, dil, g = self._conv_io(l, W)
                inp = a if first and g == 1 else self._full(a, R, first)
                gw = torch.nn.grad.conv2d_weight(inp, (R * W.shape[1], *W.shape[2:]), delta.reshape(N, -1, *delta.shape[3:]),
                                                 stride, pad, dil, 1 if first and g == 1 else R * g)
                grads[l.weight] += gw.view(W.shape)
                if l.bias is not None:
                    grads[l.bias] += delta.sum((0, 3, 4))
            elif l.kind == "linear":
                a, first, delta = st.get(i, "in"), (i, "in") in st.shared, st.get(i, "delta")
                grads[l.weight] += torch.einsum("nro,ni->roi" if first else "nro,nri->roi", delta, a)
                if l.bias is not None:
                    grads[l.bias] += delta.sum(0)
            elif l.kind == "bn" and l.weight is not None:
                delta = st.get(i, "delta")
                dims = (0, *range(3, delta.dim()))
                grads[l.weight] += (delta * st.get(i, "xhat")).sum(dims)
                grads[l.bias] += delta.sum(dims)

    @staticmethod
    def _head_runs(W) -> bool:
        """Whether the output Linear (weight ``W [R, O, I]``) runs in the head kernel: few outputs, on
        the CPU, at least 32 inputs (W4's 16-input head ran 1.3-1.7% slower with it than with the
        einsums; W3's 784-input one 5.6-8% faster)."""
        return (W.shape[1] <= HEAD_MAX_OUTPUTS and W.shape[2] >= 32 and W.device.type == "cpu"
                and _ext.choose("head_hvp", W.device) == "ext")

    def _head(self, st, params, vecs, out, ra):
        """The output Linear layer's products and the loss R-op by :func:`~fastcurv.ops.head_hvp.head_hvp`
        (its [R, ...] operands as views of this engine's sample-major tensors), given the tangent
        ``ra [N, K, R, I]`` of its input; returns the R-gradient w.r.t. that input, ``[N, K, R, I]``."""
        i = len(self.layers) - 1
        l = self.layers[i]
        probs = None if st.probs is None else st.probs.transpose(0, 1)
        rg = _head_products(self.loss, st.get(i, "in").transpose(0, 1), ra.permute(2, 0, 1, 3), params[l.weight],
                            vecs[l.weight], st.get(i, "delta").transpose(0, 1), probs,
                            None if l.bias is None else vecs[l.bias], None, out[l.weight],
                            None if l.bias is None else out[l.bias], accumulate=True)
        return rg.permute(1, 2, 0, 3)

    # --- the R-passes -------------------------------------------------------------------------
    def apply(self, st: _MapState, params, buffers, vecs: dict, out: dict):
        """Add one chunk's Hessian-vector products to ``out`` (name -> [R, K, *shape]);
        ``vecs``: name -> [R, K, *shape] tangents."""
        K = next(iter(vecs.values())).shape[1]
        rv = {}  # node -> output tangent [N, K, R, *feat] still to be read, or None (identically zero)
        rin, rpre, bn, bn_dot = {}, {}, {}, {}
        N = None
        last = len(self.layers) - 1
        head = self.head and self._head_runs(params[self.layers[last].weight])
        for i, l in enumerate(self.layers):
            if self.shared[i]:
                continue
            ins = self.inputs[i]
            if l.kind == "add":
                ra = None
                for j in ins:
                    t = None if self._reads_shared(j) else rv[j]
                    ra = t if ra is None else (ra if t is None else ra + t)
                rv[i] = ra
                self._free(rv, i)
                continue
            ra = None if self._reads_shared(ins[0]) else rv[ins[0]]
            if l.kind == "conv":
                a, first = st.get(i, "in"), (i, "in") in st.shared
                W, dW = params[l.weight], vecs[l.weight]
                R, Co, Cig = W.shape[:3]
                N = a.shape[0]
                stride, pad, dil, g = self._conv_io(l, W)
                rin[i] = ra
                if first and g == 1:  # one plain conv: output channels in (K, R, Co) order, the tangent's layout
                    zb = F.conv2d(a, dW.transpose(0, 1).reshape(-1, *W.shape[2:]), None, stride, pad, dil, 1)
                    zb = zb.view(N, K, R, g, Co // g, *zb.shape[2:])
                else:
                    dWs = dW.view(R, K, g, Co // g, *W.shape[2:]).transpose(1, 2).reshape(-1, *W.shape[2:])
                    zb = F.conv2d(self._full(a, R, first), dWs, None, stride, pad, dil, R * g)
                    zb = zb.view(N, R, g, K, Co // g, *zb.shape[2:]).permute(0, 3, 1, 2, 4, 5, 6)
                if ra is not None:
                    za = F.conv2d(ra.reshape(N * K, -1, *ra.shape[4:]), W.reshape(-1, *W.shape[2:]), None, stride, pad, dil, R * g)
                    rz = za.view(N, K, R, g, Co // g, *za.shape[2:]).add_(zb)
                else:
                    rz = zb.contiguous()
                rz = rz.view(N, K, R, Co, *rz.shape[5:])
                if l.bias is not None and i not in self.bias_folded:
                    rz += _rb(vecs[l.bias], 2, True)
                ra = rz
            elif l.kind == "linear" and head and i == last and ra is not None:
                pass  # the head kernel (below) takes the tangent of its input
            elif l.kind == "linear":
                head = head and i != last  # (no input tangent at the output node: the plain path)
                a, first = st.get(i, "in"), (i, "in") in st.shared
                W, dW = params[l.weight], vecs[l.weight]
                N = a.shape[0]
                rin[i] = ra
                rz = torch.einsum("ni,rkoi->nkro" if first else "nri,rkoi->nkro", a, dW)
                if ra is not None:
                    rz += torch.einsum("nkri,roi->nkro", ra, W)
                if l.bias is not None and i not in self.bias_folded:
                    rz += vecs[l.bias].transpose(0, 1)
                ra = rz
            elif l.kind == "bn" and l.opts.get("batch"):
                xh, inv = st.get(i, "xhat").unsqueeze(1), st.get(i, "inv").unsqueeze(1)
                N = xh.shape[0]
                nsp = xh.dim() - 4
                dims = (0, *range(4, xh.dim()))
                rz = None
                if ra is not None:
                    # tangent of the normalized input: inv * (dx - mean(dx) - xhat * mean(dx * xhat))
                    m2 = (ra * xh).mean(dims, keepdim=True)
                    rxh = (ra - ra.mean(dims, keepdim=True) - xh * m2).mul_(inv)
                    rin[i] = (rxh, m2)
                    # (a copy without affine parameters: later layers may update their input in place)
                    rz = rxh.clone() if l.weight is None else rxh * _rb(params[l.weight], nsp, False).unsqueeze(1)
                if l.weight is not None:
                    term = xh * _rb(vecs[l.weight], nsp, True) + _rb(vecs[l.bias], nsp, True)
                    rz = term if rz is None else rz.add_(term)
                ra = rz
            elif l.kind == "bn":
                bn[i] = self._bn_coefs(l, params, buffers)
                if ra is None and l.weight is None:
                    pass
                else:
                    ra, bn_dot[i] = self._bn_eval_rfwd(l, i, st, vecs, ra, bn[i][0])
                    N = ra.shape[0]
            elif ra is None or i in self.act_fused:
                pass
            elif l.kind == "act":
                d1 = st.get(i, "d1").unsqueeze(1)
                if st.get(i, "d2g") is not None:
                    rpre[i] = ra
                    ra = d1 * ra
                else:
                    ra = ra.mul_(d1) if self.fwd_inplace[i] else ra * d1
            elif l.kind == "flatten":
                ra = ra.reshape(*ra.shape[:3], -1)
            elif l.kind == "maxpool":
                ind = st.get(i, "ind")  # [N, R, C, H'W']
                n, k, R, C = ra.shape[:4]
                ra = ra.reshape(n, k, R, C, -1).gather(4, ind.unsqueeze(1).expand(n, k, *ind.shape[1:]))
                ra = ra.view(n, k, R, C, *st.meta[(i, "out")])
            else:
                n, k, R, C = ra.shape[:4]
                z = self._pool(ra.reshape(n * k, R * C, *ra.shape[4:]), l)
                ra = z.view(n, k, R, C, *z.shape[2:])
            rv[i] = ra
            self._free(rv, i)
        ra = rv.pop(last)
        rds = {}  # node -> R-gradient w.r.t. its output
        if head:  # ra: the tangent of the output node's input
            self._acc(rds, self.inputs[last][0], self._head(st, params, vecs, out, ra))
        elif self.loss.kind == "cross_entropy":
            rds[last] = softmax_ce_hvp(st.probs, ra.contiguous(), self.loss.scale())  # [n, R, C] and [n, k, R, C]
        else:
            rds[last] = ra * (2 * self.loss.scale(ra.shape[-1]))
        for i, l, rd in self._backward(rds):
            if l.kind == "conv":
                a, first, delta, ra_in = st.get(i, "in"), (i, "in") in st.shared, st.get(i, "delta"), rin[i]
                W, dW = params[l.weight], vecs[l.weight]
                R, Co, Cig = W.shape[:3]
                N = rd.shape[0]
                stride, pad, dil, g = self._conv_io(l, W)
                hw = rd.shape[4:]
                o = out[l.weight].view(R, K, g, Co // g, *W.shape[2:])
                # weight: conv-weight-gradient of (input a, output grads rd) with K in the output channels
                if first and g == 1:  # one plain conv: rd's (K, R, Co) channel order as it is
                    gw = torch.nn.grad.conv2d_weight(a, (K * R * Co, *W.shape[2:]), rd.reshape(N, -1, *hw), stride, pad, dil, 1)
                    o += gw.view(K, R, g, Co // g, *W.shape[2:]).transpose(0, 1)
                else:
                    go = rd.view(N, K, R, g, Co // g, *hw).permute(0, 2, 3, 1, 4, 5, 6).reshape(N, -1, *hw)
                    gw = torch.nn.grad.conv2d_weight(self._full(a, R, first), (R * g * K * (Co // g), *W.shape[2:]), go,
                                                     stride, pad, dil, R * g)
                    o += gw.view(R, g, K, Co // g, *W.shape[2:]).transpose(1, 2)
                if l.bias is not None and i not in self.bias_folded:
                    out[l.bias] += rd.sum((0, 4, 5)).transpose(0, 1)
                if ra_in is not None:
                    # (input tangent, delta) with K in the input channels
                    ri = ra_in.view(N, K, R, g, Cig, *ra_in.shape[4:]).permute(0, 2, 3, 1, 4, 5, 6).reshape(N, -1, *ra_in.shape[4:])
                    gw2 = torch.nn.grad.conv2d_weight(ri, (R * Co, K * Cig, *W.shape[3:]), delta.reshape(N, -1, *hw),
                                                      stride, pad, dil, R * g)
                    o += gw2.view(R, g, Co // g, K, Cig, *W.shape[3:]).permute(0, 3, 1, 2, 4, 5, 6)
                if first:
                    continue
                in_hw = a.shape[3:]
                rg = torch.nn.grad.conv2d_input((N * K, R * g * Cig, *in_hw), W.reshape(-1, *W.shape[2:]),
                                                rd.reshape(N * K, -1, *hw), stride, pad, dil, R * g)
                wt = dW.view(R, K, g, Co // g, Cig, *W.shape[3:]).permute(0, 2, 3, 1, 4, 5, 6).reshape(R * Co, K * Cig, *W.shape[3:])
                rg2 = torch.nn.grad.conv2d_input((N, R * g * K * Cig, *in_hw), wt, delta.reshape(N, -1, *hw), stride, pad, dil, R * g)
                rd = rg.view(N, K, R, g, Cig, *in_hw).add_(rg2.view(N, R, g, K, Cig, *in_hw).permute(0, 3, 1, 2, 4, 5, 6))
                rd = rd.view(N, K, R, g * Cig, *in_hw)
            elif l.kind == "linear":
                a, first, delta, ra_in = st.get(i, "in"), (i, "in") in st.shared, st.get(i, "delta"), rin[i]
                W, dW = params[l.weight], vecs[l.weight]
                out[l.weight] += torch.einsum("nkro,ni->rkoi" if first else "nkro,nri->rkoi", rd, a)
                if ra_in is not None:
                    out[l.weight] += torch.einsum("nro,nkri->rkoi", delta, ra_in)
                if l.bias is not None and i not in self.bias_folded:
                    out[l.bias] += rd.sum(0).transpose(0, 1)
                if first:
                    continue
                rd = torch.einsum("nkro,roi->nkri", rd, W) + torch.einsum("nro,rkoi->nkri", delta, dW)
            elif l.kind == "bn" and l.opts.get("batch"):
                self._bn_batch_rbwd(l, i, st, params, vecs, out, rin.get(i), rd)
                if self._reads_shared(self.inputs[i][0]):
                    continue
                rd = self._bn_batch_rbwd(l, i, st, params, vecs, None, rin.get(i), rd)
            elif l.kind == "bn":
                s, t, inv, mean = bn[i]
                rd = self._bn_eval_rbwd(l, i, st, vecs, out, rd, s, inv, bn_dot.get(i))
                if rd is None:
                    continue
            elif i in self.act_fused:
                pass
            elif l.kind == "act":
                d1 = st.get(i, "d1")
                d2g = st.get(i, "d2g")
                n, k = rd.shape[:2]
                if d2g is None:
                    rd = rd.mul_(d1.unsqueeze(1)) if self.bwd_inplace[i] else rd * d1.unsqueeze(1)
                else:
                    rd = act_rop_bwd(d1.reshape(n, -1), d2g.reshape(n, -1), rpre[i].reshape(n, k, -1),
                                     rd.reshape(n, k, -1)).view(rd.shape)
            elif l.kind == "flatten":
                rd = rd.reshape(*rd.shape[:3], *st.meta[i])
            elif l.kind == "maxpool":
                ind = st.get(i, "ind")
                n, k, R, C = rd.shape[:4]
                gi = rd.new_zeros(n, k, R, C, st.meta[i].numel())
                rd = gi.scatter_add_(4, ind.unsqueeze(1).expand(n, k, *ind.shape[1:]), rd.reshape(n, k, R, C, -1))
                rd = rd.view(n, k, R, C, *st.meta[i])
            else:
                n, k, R, C = rd.shape[:4]
                rd = self._pool_bwd(rd.reshape(n * k, R * C, *rd.shape[4:]), l, st.meta[i]).view(n, k, R, C, *st.meta[i])
            self._acc(rds, self.inputs[i][0], rd)
