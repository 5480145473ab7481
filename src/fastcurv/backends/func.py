"""The torch.func backend: vmap over replicas; per batch the gradient's double-backward graph
(mode "graph", the default) or its ``torch.func.linearize`` linearization (mode "forward") is built
once and reused by every matvec of a solver."""
from __future__ import annotations

import threading
import warnings

import torch
from torch import nn
from torch.func import grad, jvp, linearize, vmap
from torch.utils._python_dispatch import TorchDispatchMode

from ..memory import is_out_of_memory
from ..model_run import VmapUnsupportedError
from .base import NOT_TORCH_FUNC, Backend, mark_not_torch_func, math_attention, read_batches

# Reused graphs (or linearizations) are kept while their estimated size fits this. It keeps even
# W1's linearizations (100 replicas, 1000 images: 5.4 GB estimated, 3.8 GiB measured; its graphs 1.9
# GB) for compile=True; without reuse, K=8 matvecs cost 4.8 gradients per probe there instead of 2.8.
DEFAULT_REUSE_BYTES = 8 << 30
DEFAULT_WORK_BYTES = 4 << 30


# Each estimate below weighs one replica's module outputs on a batch (feature maps, with 4 or more
# dimensions, apart from the rest) and its parameters, as (bytes per output byte, per feature-map
# byte, per parameter byte).
#
# Peak bytes of linearizing one batch and running one product with it, measured by
# benchmarks/func_memory.py and tests/test_memory.py (CPU, torch 2.13, peak RSS): a fit over MLPs
# 784-128-128-10 (R=4-100, 300-1000 samples) gives 16x the module output bytes plus 17x the
# parameter bytes (19-21x the outputs alone at 1000 samples, 29x at 300); W3's CNN and W4's ResNet,
# whose outputs are nearly all feature maps, 23-26x. Rounded up, with headroom for run-to-run spread.
LINEARIZE_WEIGHTS = (20, 30, 24)
# The same for mode "graph" (a vmapped forward and a retained double-backward graph): peaks of 4.0-5.6x
# the outputs (MLPs, W3, W4, the 3-layer CNN; R=4-50), of which the graph then keeps 1.0-2.3x;
# rounded up, with headroom. A batch's graph is counted at its peak, the other batches' graphs at
# what they keep.
GRAPH_WEIGHTS = (7, 8, 8)
GRAPH_HELD_WEIGHTS = (3, 3, 4)
# Peak bytes of one replica x probe of a matvec without reuse (vmapped jvp of grad), measured the
# same way: 4.8-6.0x the outputs for MLPs, 3.2-5.7x for the CNNs; rounded up. On small batches the
# parameter-sized tangents, gradients and products dominate: 784-128-128-10 MLPs on 16 samples
# (R=10 and 40, K=1 and 2) peaked at 3.6-5.2x the parameter bytes per replica x probe, plus 6x.
HVP_WEIGHTS = (9, 6, 6)

# Layers through which mode "forward" (torch.func.linearize) is known to go wrong: see forward_mode_hazard.
_LINEARIZE_BROKEN = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.instancenorm._InstanceNorm)
# The aten ops behind LayerNorm, GroupNorm and (where fused) RMSNorm, which a forward pass shows however
# they are called (see traced_hazard). Instance norm runs as batch norm with batch statistics (its
# ``training`` argument), which counts too; unfused RMSNorm as ops with an in-place add_.
_LINEARIZE_BROKEN_OPS = ("aten::native_layer_norm", "aten::native_group_norm", "aten::_fused_rms_norm")
# In-place ops that linearize's re-running on every product leaves right: applied again to their own
# result they change nothing (see traced_hazard).
# (Not clamp_: re-applied to its clamped values, which sit on the bounds, its derivative there lets the
# tangents through, where relu_'s and hardtanh_'s do not: 108% off.)
_IDEMPOTENT_INPLACE = ("aten::relu_", "aten::hardtanh_", "aten::fill_", "aten::zero_")
# Relative tolerance of mode "forward"'s check against mode "graph" (see product_error); 0.1 for other
# dtypes (16-bit). The failures seen measure 0.06 to 1 (or NaN, or raise); float32 rounding about 1e-6.
FORWARD_CHECK_TOL = {torch.float64: 1e-6, torch.float32: 1e-3}


def _call_first(replicas, x):
    """The first replica's outputs on batch ``x`` (no gradients)."""
    with torch.no_grad():
        p, b = replicas.subset(torch.tensor([0], device=replicas.device))
        return replicas.call({n: t[0] for n, t in p.items()}, {n: t[0] for n, t in b.items()}, x)


def _output_parts(replicas, x) -> tuple[int, int]:
    """Bytes of one replica's module outputs on batch ``x``: (outputs with fewer than 4 dimensions,
    feature maps with 4 or more)."""
    parts = [0, 0]

    def hook(_m, _i, out):
        if isinstance(out, torch.Tensor):
            parts[out.dim() >= 4] += out.numel() * out.element_size()

    handles = [m.register_forward_hook(hook) for m in replicas.base.modules()]
    try:
        _call_first(replicas, x)
    finally:
        for h in handles:
            h.remove()
    return parts[0], parts[1]


def _weigh(replicas, parts: tuple[int, int], weights: tuple[int, int, int]) -> int:
    """An estimate from :func:`_output_parts` and the parameters' bytes, by ``weights``."""
    return weights[0] * parts[0] + weights[1] * parts[1] + weights[2] * replicas.P * replicas.dtype.itemsize


def linearization_bytes(replicas, x) -> int:
    """Estimated peak bytes of one replica's linearized gradient map on batch ``x`` with one product
    (:data:`LINEARIZE_WEIGHTS`)."""
    return _weigh(replicas, _output_parts(replicas, x), LINEARIZE_WEIGHTS)


def graph_bytes(replicas, x) -> int:
    """Estimated peak bytes of building one replica's retained double-backward graph on batch ``x``
    (mode "graph") and one product with it (:data:`GRAPH_WEIGHTS`)."""
    return _weigh(replicas, _output_parts(replicas, x), GRAPH_WEIGHTS)


def graph_held_bytes(replicas, x) -> int:
    """Estimated bytes that one replica's retained graph on batch ``x`` keeps once built
    (:data:`GRAPH_HELD_WEIGHTS`)."""
    return _weigh(replicas, _output_parts(replicas, x), GRAPH_HELD_WEIGHTS)


def hvp_bytes(replicas, x) -> int:
    """Estimated bytes of one replica's product with one probe on batch ``x`` without reuse
    (:data:`HVP_WEIGHTS`)."""
    return _weigh(replicas, _output_parts(replicas, x), HVP_WEIGHTS)


def forward_mode_hazard(replicas, x=None) -> str | None:
    """What in ``replicas``' model mode "forward" is known to give wrong Hessian products through
    (torch 2.13), described for an error message, or None: a module by its type and, given a batch
    ``x``, an aten op that one forward pass of the first replica on ``x`` runs
    (:func:`traced_hazard`: the same layers called functionally, and in-place writes).

    torch.func's nested transforms give wrong second derivatives through batch-statistics BatchNorm
    (37% off, checked against finite differences in tests/test_operator.py), and
    ``torch.func.linearize`` of the vmapped gradient (with reuse) through LayerNorm (10% off the dense
    Hessian), affine InstanceNorm (15%) and circular padding (100%, NaN, or right by chance:
    uninitialized memory); through GroupNorm its second product raises, and through RMSNorm every
    product drifts further off (float32: 1e-4 after 200 products; tests/test_func_layers.py). These
    are refused, with or without reuse (for simplicity: without reuse, ``vmap(jvp(grad))``, only
    batch-statistics BatchNorm was seen wrong); the first products of any other model are checked
    against mode "graph" (:meth:`FuncBackend._check_forward`)."""
    if replicas.batch_statistics:
        return ("a BatchNorm that normalizes with batch statistics (bn_mode='batch' or track_running_stats=False; "
                "torch.func's second derivatives through it are wrong)")
    for name, mod in replicas.base.named_modules():
        circular = isinstance(mod, nn.modules.conv._ConvNd) and mod.padding_mode == "circular"
        if circular or isinstance(mod, _LINEARIZE_BROKEN):
            what = f"{type(mod).__name__} {name!r}" + (" with padding_mode='circular'" if circular else "")
            return f"{what} (torch.func.linearize's second derivatives through it are wrong or fail)"
    return None if x is None else traced_hazard(replicas, x)


def traced_hazard(replicas, x) -> str | None:
    """The first aten op that one forward pass of the first replica on batch ``x`` runs and that
    mode "forward" (``torch.func.linearize``) is known to get wrong, described with the module it
    ran in, or None. It sees the ops however the model calls them (``F.layer_norm``, ``F.pad``, a
    tensor method), which module types cannot:

    - the normalizations of :data:`_LINEARIZE_BROKEN_OPS`, and batch norm with batch statistics
      (instance norm runs as one);
    - in-place writes (torch 2.13). ``linearize`` traces the product and computes once, at its first
      run, every value that depends on the parameters only (constant folding); in-place ops, which
      it never folds, run at every product, after those values were computed. A write into a view
      (circular padding: ``new_empty`` filled through slices; ``h[:, 1:] = ...``) is therefore
      missed by the folded values that read the tensor it writes: they read the memory before the
      write, uninitialized in circular padding's case, so the products are 100% off, NaN, or right
      when that memory happens to hold the right values (in 1 of 50 and 16 of 200 tries in one
      process: a first-product check cannot be relied on). Any other in-place op is re-applied to its folded result at every
      product: ``h += r`` (a residual block) gave the right first product, then 71% and 100% off;
      RMSNorm's ``add_`` of its epsilon drifts. Only ops that change nothing when re-applied
      (:data:`_IDEMPOTENT_INPLACE`, e.g. ``nn.ReLU(inplace=True)``) pass, on a tensor that is not a
      view and of which no view was taken before.

    Costs one forward pass of one replica, under a dispatch mode (``FuncBackend`` runs it once, at
    construction, where mode "forward" would run)."""
    stack, names = [], {m: n for n, m in replicas.base.named_modules()}

    def where() -> str:
        mod = stack[-1] if stack else replicas.base
        return f"{f'module {names[mod]!r}' if names.get(mod) else 'the model'} ({type(mod).__name__})"

    owner = threading.get_ident()  # (the hooks also fire in other threads' forward passes of the model)

    def enter(mod, _inputs):
        if threading.get_ident() == owner:
            stack.append(mod)

    def leave(_mod, _inputs, _output):
        if threading.get_ident() == owner:
            stack.pop()

    handles = [h for mod in names for h in (mod.register_forward_pre_hook(enter), mod.register_forward_hook(leave))]
    try:
        with math_attention(), _HazardScan(where) as scan:
            _call_first(replicas, x)
    finally:
        for h in handles:
            h.remove()
    return scan.found


def _argument(func, args, kwargs, name: str):
    """The value of aten op ``func``'s argument ``name`` in a call with ``args``/``kwargs`` (None
    where it has none or it is left at its default)."""
    for i, spec in enumerate(func._schema.arguments):
        if spec.name == name:
            return kwargs.get(name, args[i] if i < len(args) else None)
    return None


def _op_hazard(func, args, kwargs, viewed: dict) -> str | None:
    """Why mode "forward" goes wrong through aten op ``func`` called with ``args``/``kwargs`` (see
    :func:`traced_hazard`), or None; ``viewed`` holds the storages the forward took views of so far
    (by data pointer)."""
    name = func._schema.name
    if name in _LINEARIZE_BROKEN_OPS:
        return f"{name} (torch.func.linearize's second derivatives through it are wrong or fail)"
    if "batch_norm" in name and (name.endswith("_with_update") or _argument(func, args, kwargs, "training")):
        return f"{name} with batch statistics (torch.func's second derivatives through it are wrong)"
    written = [_argument(func, args, kwargs, a.name) for a in func._schema.arguments
               if a.alias_info is not None and a.alias_info.is_write]
    t = next((w for w in written if isinstance(w, torch.Tensor)), None)
    if t is None:
        return None
    dense = t.layout == torch.strided
    if dense and (t._is_view() or t.untyped_storage().data_ptr() in viewed):
        return (f"the in-place {name} into a view (torch.func.linearize computes the values read from the tensor it "
                "writes before the write: its products read stale or uninitialized memory)")
    if name not in _IDEMPOTENT_INPLACE or not dense:
        return (f"the in-place {name} (torch.func.linearize re-applies it to its precomputed values at every product: "
                "the products drift)")
    return None


class _HazardScan(TorchDispatchMode):
    """Within it, the first aten op for which :func:`_op_hazard` gives a reason is kept in ``found``,
    with where ``where()`` says it ran."""

    def __init__(self, where):
        super().__init__()
        self.where, self.found, self.viewed = where, None, {}

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # (torch otherwise wraps __torch_dispatch__ in torch._dynamo.disable, whose first use imports
        # torch._dynamo: 1.4 s; the scan never runs compiled)
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.found is None:
            why = _op_hazard(func, args, kwargs, self.viewed)
            if why is not None:
                self.found = f"{why}, called in {self.where()}"
        out = func(*args, **kwargs)
        # a view op (its result aliases an argument, unwritten): the schema says so, as the results'
        # _is_view() does not under a dispatch mode
        if any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns):
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor) and o.layout == torch.strided:
                    # (the storage object is kept: a freed one's address could come back as another tensor's)
                    storage = o.untyped_storage()
                    self.viewed[storage.data_ptr()] = storage
        return out


def resolve_mode(replicas, mode: str, compile: bool, x=None) -> str:
    """The mode :class:`FuncBackend` runs for ``mode`` ("auto", "forward" or "graph"): "auto" is
    "forward" with ``compile=True`` unless :func:`forward_mode_hazard` (given batch ``x``, also its
    forward pass) names something mode "forward" gets wrong, else "graph". ``mode="forward"`` with
    such a hazard raises a ValueError naming it."""
    return _resolve(replicas, mode, compile, x)[0]


def _resolve(replicas, mode: str, compile: bool, x=None) -> tuple[str, str | None]:
    """:func:`resolve_mode`'s mode and the hazard that kept "auto" off mode "forward" (or None)."""
    if mode not in ("auto", "forward", "graph"):
        raise ValueError(f"mode must be 'auto', 'forward' or 'graph', got {mode!r}")
    if mode == "graph" or (mode == "auto" and not compile):
        return "graph", None
    hazard = forward_mode_hazard(replicas, x)
    if mode == "forward" and hazard:
        raise ValueError(f"mode='forward' gives wrong Hessian products through {hazard}: use mode='graph' (or 'auto')")
    return ("graph", hazard) if hazard else ("forward", None)


def memory_costs(replicas, x, mode: str) -> dict:
    """Per replica, the estimates a memory plan needs in mode ``mode``, each as ``(bytes per sample,
    fixed bytes)``: "peak", building one batch's reused graph (or linearization) with one product;
    "held", what it keeps; "item", one unit of the products without reuse (mode "graph": one
    replica's graph, for all probes; "forward": one replica and probe). The outputs' part scales
    with the samples of batch ``x``; the parameters' part is fixed."""
    if mode == "graph":
        weights = {"peak": GRAPH_WEIGHTS, "held": GRAPH_HELD_WEIGHTS, "item": GRAPH_WEIGHTS}
    else:
        weights = {"peak": LINEARIZE_WEIGHTS, "held": LINEARIZE_WEIGHTS, "item": HVP_WEIGHTS}
    parts, n = _output_parts(replicas, x), x.shape[0]
    return {k: (_weigh(replicas, parts, w[:2] + (0,)) / n, _weigh(replicas, (0, 0), w)) for k, w in weights.items()}


def work_chunks(R: int, K: int, item_bytes: int, work_bytes: int) -> tuple[int, int]:
    """``(replicas, probes)`` per vmapped call so that ``replicas * probes * item_bytes`` stays
    within ``work_bytes``: all replicas and as many probes as fit, else one probe and as many
    replicas as fit (at least one of each)."""
    items = max(1, work_bytes // max(1, item_bytes))
    if items >= R:
        return R, max(1, min(K, items // R))
    return items, 1


def product_error(got: dict, want: dict) -> float:
    """How far the Hessian products ``got`` are from ``want`` (``{name: tensor}``, one replica's):
    the largest over the parameter tensors of ``|got - want|`` relative to ``|want|`` on that tensor
    or, where larger, to a tenth of ``|want|`` over all (a tensor whose products are about zero, such
    as a bias that a normalization cancels, then compares only its rounding). ``inf`` where ``got``
    is not finite but ``want`` is; 0 where ``want`` is not finite (nothing to compare against)."""
    total = torch.sqrt(sum(want[n].double().square().sum() for n in want))
    if not bool(torch.isfinite(total)):
        return 0.0
    worst = 0.0
    for n, w in want.items():
        g = got[n].double()
        if not bool(torch.isfinite(g).all()):
            return float("inf")
        scale = max(float(w.double().norm()), 0.1 * float(total))
        diff = float((g - w.double()).norm())
        worst = max(worst, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))
    return worst


def torch_func_failed(exc: BaseException) -> bool:
    """Whether ``exc``, raised while torch.func computed a product or gradient, may say that
    torch.func cannot run the model, so that ``backend="auto"`` falls back to autograd: a
    :class:`~fastcurv.model_run.VmapUnsupportedError` (vmap cannot batch a module of the model), a
    RuntimeError or NotImplementedError, but not an out-of-memory error (on a GPU the job is rerun
    in chunks of half the replicas), one raised while reading the data (the loader's own, or
    fastcurv's "the loader yielded ... on a later pass": :func:`~.base.read_batches` marks them)
    nor one raised after this backend had finished a product (torch.func evidently runs the model:
    :meth:`FuncBackend.matvec` marks them)."""
    vmap_error = isinstance(exc, VmapUnsupportedError)
    if not (vmap_error or isinstance(exc, (RuntimeError, NotImplementedError))) or is_out_of_memory(exc):
        return False
    return getattr(exc, NOT_TORCH_FUNC, None) is None


def _compiled(build, on_fallback):
    """``torch.compile`` of the linearization ``v -> H v`` that ``build()`` returns. If compiling or
    running it fails, it warns, calls ``on_fallback(message)`` and from then on runs a linearization
    built afresh, eagerly: a compile that fails midway (e.g. Inductor without a working C++ compiler)
    can leave the linearization it was tracing unusable (torch.func's const-folded graph half set up:
    IndexError on the next call)."""

    def warn(exc):
        msg = f"torch.compile failed on the linearized HVP ({type(exc).__name__}: {str(exc)[:200]}); running it eagerly"
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        on_fallback(msg)

    fn = build()
    state = {"compiled": True}
    try:
        state["fn"] = torch.compile(fn, dynamic=False)
    except Exception as exc:  # noqa: BLE001 - torch.compile unavailable here: fn is untouched, run it eagerly
        warn(exc)
        state["fn"], state["compiled"] = fn, False
    del fn

    def apply(v):
        if not state["compiled"]:
            return state["fn"](v)
        try:
            return state["fn"](v)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: run eagerly instead
            warn(exc)
        # (outside the handler, whose traceback holds the failed compile: it is dropped before the
        # new linearization is built)
        state["fn"], state["compiled"] = None, False
        state["fn"] = build()
        return state["fn"](v)

    return apply


class FuncBackend(Backend):
    """HVPs batched over replicas with vmap: double backward through a retained graph, or torch.func's
    forward-over-reverse.

    Args:
        reuse: True, False or "auto". With reuse, each batch's gradient map is linearized once per
            set of active replicas (mode "graph": its double-backward graph is built and retained)
            and reused, so a matvec costs only the tangent passes. "auto" reuses when the
            estimated size of these graphs (mode "graph": :func:`graph_bytes` for one batch and
            :func:`graph_held_bytes` for the others; "forward": :func:`linearization_bytes` each)
            fits in ``reuse_bytes`` (default :data:`DEFAULT_REUSE_BYTES`, 8 GiB); without reuse
            each matvec redoes the primal passes, in a fraction of the memory.
        work_bytes: without reuse, in mode "forward", replicas and probes run in vmapped chunks whose estimated
            temporaries (:func:`hvp_bytes` per replica and probe) fit in ``work_bytes`` (default
            4 GiB): all replicas with as many probes as fit, else one probe for as many replicas as
            fit, so that many probes or replicas of a large model do not exhaust memory; in mode
            "graph", each batch's graph is built for as many replicas as fit (at
            :func:`graph_bytes` each).
        mode: "graph" (vmapped forward, then plain autograd double backward through a retained
            graph), "forward" (torch.func forward-over-reverse, ``jvp(grad)``, reused through
            ``torch.func.linearize``) or "auto": "forward" with ``compile=True``, else "graph".
            Measured on W1 with reuse (CPU, 2 threads): the same time per product, but a
            linearization peaks at about 20x the module outputs and keeps 15x, a retained graph
            peaks at 4-5x and keeps 1-2x (benchmarks/func_memory.py); the default job took 20.1 s
            in mode "graph" against 31.9 s (peak 3.5 against 6.2 GiB). Mode "forward" gives wrong
            products through some layers and ops in torch 2.13 (batch-statistics BatchNorm,
            LayerNorm, GroupNorm, RMSNorm, InstanceNorm, circular padding, in-place writes such as
            ``h += r``: :func:`forward_mode_hazard`, which runs one forward pass of one replica on
            the first batch under a dispatch mode where mode "forward" would run): "auto" keeps
            "graph" there even with ``compile=True``, and ``mode="forward"`` raises a ValueError
            naming the layer or op. For any other model its first product (on the first batch
            read) is checked against mode "graph" for one replica and probe (the linearization
            applied twice: a re-applied in-place op shows from the second product); when they
            differ beyond :data:`FORWARD_CHECK_TOL` or mode "forward" raises, a warning names why
            and the backend runs mode "graph" from then on (``forward_error``).
        compile: run each linearization through ``torch.compile`` (mode "forward" with reuse; a
            warning says when there is nothing to compile: no reuse, or mode "graph").
            Measured on W1 (CPU, 2 threads): 0.64 -> 0.38 s per matvec, but each linearization
            (one per batch, and again when the active replicas shrink below half) costs a compile
            of about 15 s, so it pays off only for long solves on a fixed replica set. A compile
            that fails (e.g. Inductor finds no working C++ compiler) warns, runs that
            linearization eagerly (built afresh) and leaves the later ones uncompiled.

    Attributes:
        compile_error: with ``compile=True``, ``None`` while the linearizations run compiled (or
            none has run yet); after a compile failed, its warning: that linearization and all
            later ones run eagerly.
        forward_error: ``None`` unless mode "forward" failed its check against mode "graph" (or
            raised) and the backend switched to mode "graph": then its warning.

    :class:`~fastcurv.HessianOperator` runs products and gradients under
    :func:`~.base.math_attention` (attention's fused kernels have no double backward). Every
    vmapped map takes the batch's inputs shared by the replicas, or, for a model that fills a tensor
    it allocates from its input (``x.new_zeros(...)`` written through slices), batched as a view
    (:meth:`~fastcurv.ReplicaSet.vmapped`, remembered by the replica set after its first failure).
    """

    name = "func"

    def __init__(self, replicas, loss, batches, reuse="auto", reuse_bytes: int = DEFAULT_REUSE_BYTES, mode="auto",
                 compile: bool = False, work_bytes: int = DEFAULT_WORK_BYTES):
        super().__init__(replicas, loss, batches)
        if work_bytes < 1:
            raise ValueError(f"work_bytes must be positive, got {work_bytes}")
        self.work_bytes = int(work_bytes)
        self._outputs: dict[tuple, tuple[int, int]] = {}  # (input shape, dtype) -> _output_parts
        self.compile = bool(compile)
        self.compile_error: str | None = None
        self.forward_error: str | None = None
        self._forward_checked = False
        # the first batch's inputs, read only where needed: the hazard scan's forward pass where mode
        # "forward" may run, the size estimates for reuse="auto"
        scan = mode == "forward" or (mode == "auto" and self.compile)
        x0 = next(iter(batches))[1] if scan or reuse == "auto" else None
        mode, hazard = _resolve(replicas, mode, self.compile, x0)
        self.mode = mode
        if self.compile and mode == "graph":
            why = f" (mode 'forward' gives wrong products through {hazard})" if hazard else ""
            warnings.warn("func backend: compile=True compiles torch.func linearizations (mode 'forward'); mode 'graph' "
                          f"runs uncompiled{why}", RuntimeWarning, stacklevel=2)
        if reuse not in (True, False, "auto"):
            raise ValueError(f"reuse must be True, False or 'auto', got {reuse!r}")
        if reuse == "auto":
            est = self._reused_bytes(x0, len(batches))
            reuse = est <= reuse_bytes
            if self.compile and mode == "forward" and not reuse:
                warnings.warn(f"func backend: compile=True compiles the reused linearizations, but they would take about "
                              f"{est / 2**30:.1f} GiB (reuse_bytes={reuse_bytes / 2**30:.1f} GiB): running without reuse and "
                              "uncompiled; pass reuse=True or a larger reuse_bytes to compile", RuntimeWarning, stacklevel=2)
        elif self.compile and mode == "forward" and not reuse:
            warnings.warn("func backend: compile=True has no effect with reuse=False (it compiles the reused linearizations)",
                          RuntimeWarning, stacklevel=2)
        self.reuse = reuse
        self._linear: dict[int, tuple[tuple, object]] = {}
        self.products_done = 0  # matvecs finished (after one, errors are not torch.func's: torch_func_failed)

    def clear_cache(self):
        self._linear.clear()

    def _grad_map(self, buffers, x, y):
        rs, loss = self.replicas, self.loss

        def one(p, b, xr):
            return loss.batch_loss(rs.call(p, b, xr), y)

        # (x shared by the replicas, or batched for a model that fills a tensor allocated from it: ReplicaSet.vmapped)
        return lambda params: rs.vmapped(grad(one), params, buffers, x)

    def _linearized(self, i, x, y, idx):
        key = tuple(idx.tolist()) if idx is not None else None
        hit = self._linear.get(i)
        if hit is not None and hit[0] == key:
            return hit[1]
        if hit is not None and key is not None:
            # While at least half of the cached replicas are still active, run the cached
            # linearization with zero tangents for the others instead of tracing a new one
            # (not for an idx naming a replica twice: its tangents would share one slot).
            cached = list(range(self.replicas.R)) if hit[0] is None else list(hit[0])
            where = {r: j for j, r in enumerate(cached)}
            if all(r in where for r in key) and len(set(key)) == len(key) and 2 * len(key) >= len(cached):
                return self._padded(hit[1], torch.tensor([where[r] for r in key]), len(cached))
        # drop every reference to the old linearization before building the new one, so that the
        # two never take memory together
        hit = None
        self._linear.pop(i, None)
        fn = self._linear_map(x, y, idx)
        self._linear[i] = (key, fn)
        return fn

    @staticmethod
    def _padded(fn, pos, n):
        dev_pos = None

        def apply(v):
            nonlocal dev_pos
            first = next(iter(v.values()))
            dev_pos = pos.to(first.device) if dev_pos is None else dev_pos
            full = {}
            for name, t in v.items():
                z = torch.zeros((n, *t.shape[1:]), dtype=t.dtype, device=t.device)
                z[dev_pos] = t
                full[name] = z
            return {name: t[dev_pos] for name, t in fn(full).items()}

        return apply

    def _linear_map(self, x, y, idx):
        """``v -> H v`` on one batch for replicas ``idx``, with the primal work done once."""
        params, buffers = self.replicas.subset(idx)
        if self.mode == "graph":
            return self._graph_map(params, buffers, x, y)
        gmap = self._grad_map(buffers, x, y)

        def build():
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*get_attr Node.*")
                return linearize(gmap, params)[1]

        if self.compile and self.compile_error is None:
            return _compiled(build, self._compile_failed)
        return build()

    def _check_forward(self, i, x, y, idx):
        """In mode "forward", before its first product: compare it on batch ``i`` (``x``, ``y``)
        with mode "graph" for the first active replica and one fixed random probe, and switch to
        mode "graph" (:meth:`_to_graph`) when they differ beyond :data:`FORWARD_CHECK_TOL` or
        mode "forward" raises: a second line of defence behind :func:`forward_mode_hazard`, for
        what torch.func's linearization gets wrong that it does not know. (It cannot be the first:
        a linearization that reads uninitialized memory, as circular padding's, passes it when the
        memory happens to hold the right values.)
        With reuse, the batch's linearization for ``idx`` is built here (compiled with
        ``compile=True``: a compile's own wrong products count too) and kept for the product; the
        check then costs one mode-"graph" product for one replica and two tangent passes for all
        (0.11 s once, about 3 products, for 4 MLPs 784-128-128-10 on 500 images)."""
        if self.mode != "forward" or self._forward_checked:
            return
        rs = self.replicas
        first = idx[:1] if idx is not None else torch.zeros(1, dtype=torch.long, device=rs.device)
        gen = torch.Generator().manual_seed(0)
        probe = {n: torch.randn((1, *s), generator=gen, dtype=rs.dtype).to(rs.device) for n, s in zip(rs.names, rs.shapes)}
        # (mode "graph" raising is not this check's business: its error goes on to the caller)
        params, buffers = rs.subset(first)
        want = self._graph_map(params, buffers, x, y)(probe)
        try:
            if self.reuse:
                Ra = rs.R if idx is None else len(idx)
                v = {n: torch.cat([p, p.new_zeros((Ra - 1, *p.shape[1:]))]) for n, p in probe.items()}
                fn = self._linearized(i, x, y, idx)
                # twice: an in-place op that linearize re-applies to its folded values at every
                # product (one the scan does not know) shows from the second product on
                got = [{n: t[:1] for n, t in fn(v).items()} for _ in range(2)]
            else:
                hv = self._hvp_map(x, y)(params, buffers, {n: p.unsqueeze(1) for n, p in probe.items()})
                got = [{n: t[:, 0] for n, t in hv.items()}]
        except Exception as exc:  # noqa: BLE001 - any failure of torch.func's forward mode: run mode "graph"
            if is_out_of_memory(exc):
                raise
            self._to_graph(f"raised {type(exc).__name__}: {str(exc)[:200]}")
            return
        self._forward_checked = True
        err = max(product_error(g, want) for g in got)
        tol = FORWARD_CHECK_TOL.get(rs.dtype, 0.1)
        if err == float("inf"):
            self._to_graph("gives non-finite Hessian products where mode 'graph' gives finite ones")
        elif not err <= tol:
            self._to_graph(f"gives Hessian products {err:.1e} off mode 'graph' (relative; tolerance {tol:g} for {rs.dtype})")

    def _to_graph(self, why: str):
        """Mode "forward" failed its check (``why``): warn and run mode "graph" from now on."""
        msg = (f"func backend: mode 'forward' {why} on this model (torch.func's linearization goes wrong through some "
               "layers); running mode 'graph' instead (the same products, uncompiled)")
        warnings.warn(msg, RuntimeWarning, stacklevel=5)
        self.mode, self.forward_error, self._forward_checked = "graph", msg, True
        self._linear.clear()

    def _compile_failed(self, message: str):
        """A compiled linearization fell back to eager: no further ones are compiled."""
        self.compile_error = message

    def _graph_map(self, params, buffers, x, y):
        rs, loss = self.replicas, self.loss
        leaves = [params[n].detach().requires_grad_(True) for n in rs.names]

        def one(p, b, xr):
            return loss.batch_loss(rs.call(p, b, xr), y)

        total = rs.vmapped(one, dict(zip(rs.names, leaves)), buffers, x).sum()
        grads = torch.autograd.grad(total, leaves, create_graph=True, allow_unused=True)
        used = [j for j, g in enumerate(grads) if g is not None and g.requires_grad]

        def apply(v):
            if not used:
                return {n: torch.zeros_like(v[n]) for n in rs.names}
            hv = torch.autograd.grad([grads[j] for j in used], leaves, grad_outputs=[v[rs.names[j]] for j in used],
                                     retain_graph=True, allow_unused=True)
            return {n: (h if h is not None else torch.zeros_like(v[n])) for n, h in zip(rs.names, hv)}

        return apply

    def matvec(self, vecs, idx):
        try:
            out = self._matvec(vecs, idx)
        except Exception as exc:
            if self.products_done:
                mark_not_torch_func(exc, "raised after torch.func had computed this operator's products")
            raise
        self.products_done += 1
        return out

    def _matvec(self, vecs, idx):
        rs = self.replicas
        Ra, K = vecs[0].shape[:2]
        if K == 1 and len(self.batches) == 1 and (self.reuse or self.mode == "graph"):
            (i, x, y), = read_batches(self.batches)
            self._check_forward(i, x, y, idx)
            if self.reuse or self._graph_chunk(x, Ra) == Ra:
                # one product: hand back its tensors (no zero fill and accumulation passes)
                fn = self._linearized(i, x, y, idx) if self.reuse else self._linear_map(x, y, idx)
                hv = fn({n: v[:, 0] for n, v in zip(rs.names, vecs)})
                return [hv[n].unsqueeze(1) for n in rs.names]
        out = [torch.zeros_like(v) for v in vecs]
        subset = None  # the active replicas' parameters, for the products without reuse
        for i, x, y in read_batches(self.batches):
            self._check_forward(i, x, y, idx)
            if self.reuse:
                self._apply_per_probe(self._linearized(i, x, y, idx), vecs, out, slice(None))
            elif self.mode == "graph":
                # a fresh graph per batch, for as many replicas at a time as fit work_bytes
                step = self._graph_chunk(x, Ra)
                rows = torch.arange(rs.R, device=rs.device) if idx is None else idx
                for r0 in range(0, Ra, step):
                    sub = idx if step >= Ra else rows[r0 : r0 + step]
                    self._apply_per_probe(self._linear_map(x, y, sub), vecs, out, slice(r0, r0 + step))
            else:
                subset = rs.subset(idx) if subset is None else subset
                self._unreused(*subset, vecs, out, x, y)
        return out

    def _apply_per_probe(self, fn, vecs, out, rr: slice):
        """``out[j][rr, k] += fn(probe k)`` for every probe k of ``vecs`` (rows ``rr``)."""
        names = self.replicas.names
        for k in range(vecs[0].shape[1]):
            hv = fn({n: v[rr, k] for n, v in zip(names, vecs)})
            for j, n in enumerate(names):
                out[j][rr, k] += hv[n]

    def _graph_chunk(self, x, Ra: int) -> int:
        """Replicas per retained graph (mode "graph" without reuse): as many as fit ``work_bytes``
        at :func:`graph_bytes` each."""
        return work_chunks(Ra, 1, self._per_replica(GRAPH_WEIGHTS, x), self.work_bytes)[0]

    def _reused_bytes(self, x, batches: int) -> int:
        """Estimated bytes of all replicas' reused linearizations (or retained graphs) over
        ``batches`` batches like ``x``."""
        if self.mode == "graph":
            per = self._per_replica(GRAPH_WEIGHTS, x) + (batches - 1) * self._per_replica(GRAPH_HELD_WEIGHTS, x)
        else:
            per = batches * self._per_replica(LINEARIZE_WEIGHTS, x)
        return per * self.replicas.R

    def _per_replica(self, weights, x) -> int:
        """One replica's estimate by ``weights`` on batch ``x`` (see :func:`_weigh`); its module
        outputs are measured once per input shape (one replica's forward)."""
        key = (tuple(x.shape), x.dtype)
        if key not in self._outputs:
            self._outputs[key] = _output_parts(self.replicas, x)
        return _weigh(self.replicas, self._outputs[key], weights)

    def _hvp_map(self, x, y):
        """``(params [Ra, ...], buffers [Ra, ...], tangents [Ra, K, ...]) -> products [Ra, K, ...]``
        on batch ``(x, y)`` without reuse: ``jvp`` of ``grad``, vmapped over probes and replicas (``x``
        shared by the replicas, or batched for a model that needs it: ReplicaSet.vmapped)."""
        rs = self.replicas

        def hvp(p, b, v, xr):
            def g(q):
                return grad(lambda q_: self.loss.batch_loss(rs.call(q_, b, xr), y))(q)

            return jvp(g, (p,), (v,))[1]

        per_replica = vmap(hvp, in_dims=(None, None, 0, None))
        return lambda params, buffers, v: rs.vmapped(lambda pv, b, xr: per_replica(pv[0], b, pv[1], xr),
                                                     (params, v), buffers, x)

    def _unreused(self, params, buffers, vecs, out, x, y):
        """Add one batch's products without reuse (jvp of grad, vmapped over replicas and probes)
        to ``out``, in chunks of replicas and probes that fit ``work_bytes``."""
        rs = self.replicas
        Ra, K = vecs[0].shape[:2]
        r_step, k_step = work_chunks(Ra, K, self._per_replica(HVP_WEIGHTS, x), self.work_bytes)
        batched = self._hvp_map(x, y)
        for r0 in range(0, Ra, r_step):
            rr = slice(r0, r0 + r_step)
            p_r, b_r = {n: t[rr] for n, t in params.items()}, {n: t[rr] for n, t in buffers.items()}
            for k0 in range(0, K, k_step):
                kk = slice(k0, k0 + k_step)
                hv = batched(p_r, b_r, {n: v[rr, kk] for n, v in zip(rs.names, vecs)})
                for j, n in enumerate(rs.names):
                    out[j][rr, kk] += hv[n]
