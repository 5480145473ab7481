"""The fused backend, :class:`FusedBackend`, and its MLP engine (layout ``[R, N, K, F]``); models
with conv, pooling or BatchNorm layers, or traced DAGs, run on :class:`.maps._MapEngine`."""
from __future__ import annotations

import itertools
import numbers
from collections.abc import Iterator

import torch

from ...ops import PIECEWISE_LINEAR, act_derivs, activation_kind, activation_value
from ... import _ext
from ...ops.csr_linear import csr_linear, csr_linear_wgrad_shared, sparse_rows
from ...ops.head_hvp import HEAD_MAX_OUTPUTS
from ...memory_model import largest_true
from ...replicas import consecutive_runs
from ..base import Backend
from .blocks import JOIN_MAX_BYTES, JOIN_PROBES, JOIN_ROWS, Block, first_pass, later_pass
from .layers import _is_general, parse
from .loss_head import _loss_head
from .maps import _MapEngine
from .mlp_matvec import _MlpMatvec
from .mlp_state import _all_rows, _check_first_input, _drop_zero_columns, _ReluCsr, _scatter_columns_, _State
from .mlp_trace import _MlpExactTrace

DEFAULT_CACHE_BYTES = 4 << 30
DEFAULT_CHUNK_BYTES = 4 << 20
#: The MLP engine's matvecs (CPU) take a hidden Linear layer's products from its ReLU input's nonzeros,
#: and from its output's ReLU pattern, where at most this fraction of them is nonzero in a batch, per
#: x86 vector level of the kernels (``fastcurv._ext.cpu_level()``: 2 AVX-512, 1 AVX2, 0 baseline).
#: ``python benchmarks/bench_kernels.py --relu-sweep --repeat 31`` (one W1 replica at K=8, the six
#: products against the GEMMs, 2 threads; the limit is where the sparse products stay about 1.1x
#: faster): AVX-512 2.5-2.6x faster at 50% nonzero, 1.7x at 80%, 1.5x at 90% and 95%, 1.1-1.35x at
#: 100%; AVX2 (``FASTCURV_CPU_LEVEL=1``) 1.7x, 1.4x, 1.2x, 1.1x, 1.0x at 50-90%; baseline 1.4x at
#: 20%, 1.0x at 35%, 0.7x at 50% (the seventeenth round's kernels, whose blocks fit L1; before them
#: AVX-512 ran 1.1x at 80% and 0.9x at 90%, AVX2 1.0x at 70%, and the limits were 0.8 and 0.65).
#: ``python benchmarks/sparse_hidden_json.py`` on 100 W1 MLPs trained 3 epochs, their biases
#: shifted to open more ReLUs: AVX-512 1.29x at 91/82% nonzero (20 W2 MLPs, 512 wide: 1.32x at
#: 97/89%), so it always takes the sparse products; AVX2 1.11x at 77/73%, 1.07x at 82/76%.
HIDDEN_SPARSE_MAX_DENSITY = {2: 1.0, 1: 0.8, 0: 0.3}
#: ... and where the layer has at least this many inputs and outputs, per kernel level: narrower rows
#: fill too little of the kernels' vector tiles. The relu-sweep's products at F features
#: (``relu_layer_products(density, F=F)``), sparse over GEMM speed at 50 / 70 / 90% nonzero, the
#: seventeenth round's kernels: AVX-512 1.15 / 1.0 / 0.9x at 24 features, 1.2-1.9 / 1.6 / 1.4x at 32,
#: 1.9 / 1.5 / 1.3x at 48; AVX2 0.9-1.05x at 32, 1.24 / 1.03 / 0.84x at 48, 1.26 / 1.18 / 0.98x at 64.
#: (The kernels before it ran AVX-512 1.0 / 0.6x at 32 and 50 / 70%, and 0.3-0.4x at 24, whose
#: columns past a vector tile ran as scalars.)
HIDDEN_SPARSE_MIN_WIDTH = {2: 32, 1: 64, 0: 64}


def hidden_sparse_max_density() -> float:
    """``HIDDEN_SPARSE_MAX_DENSITY`` at this machine's kernel level (0 without the C++ kernels)."""
    return HIDDEN_SPARSE_MAX_DENSITY.get(_ext.cpu_level(), 0.0)


def hidden_sparse_min_width() -> int:
    """``HIDDEN_SPARSE_MIN_WIDTH`` at this machine's kernel level."""
    return HIDDEN_SPARSE_MIN_WIDTH.get(_ext.cpu_level(), HIDDEN_SPARSE_MIN_WIDTH[0])


def default_sample_chunk_bytes(device) -> int:
    """The conv engine's default ``sample_chunk_bytes`` on ``device`` (a ``torch.device`` or its
    name): 16 MiB on the CPU, 2 GiB on a GPU."""
    return (16 << 20) if torch.device(device).type == "cpu" else (2 << 30)


#: the dtypes the fused engine runs (its C++ kernels take these two; float16 and bfloat16 models use
#: torch.func)
FUSED_DTYPES = (torch.float32, torch.float64)


class FusedBackend(_MlpMatvec, _MlpExactTrace, Backend):
    """Exact HVPs by forward and backward R-passes over cached per-batch state.

    Args:
        cache_bytes: memory for cached per-batch state (all batches together). Beyond it, the
            state is recomputed in every matvec (one extra forward+backward per batch). MLP
            chains join consecutive batches into blocks of up to ``JOIN_ROWS`` (512) samples where
            what a block adds fits a quarter of it (:meth:`_join_rows`; 0: no joins).
        chunk_bytes: on the CPU, replicas are processed in chunks whose widest tangent
            ``[chunk, N, K, F]`` fits in this many bytes (None: no chunking), and the exact trace in
            chunks of replicas and samples whose widest tensor does. MLP chains only.
        sample_chunk_bytes: models with conv/pooling/BatchNorm layers are processed in chunks of
            samples whose widest tangent ``[n, K, R, *feat]`` fits in this many bytes (None:
            :func:`default_sample_chunk_bytes`, 16 MiB on the CPU, 2 GiB on a GPU).
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
            ``HIDDEN_SPARSE_MAX_DENSITY`` of them are nonzero in a batch (any fraction with
            AVX-512, 0.8 with AVX2; about half at initialization) and the layer has at least
            ``HIDDEN_SPARSE_MIN_WIDTH`` inputs and outputs (32 with AVX-512, 64 with AVX2), True
            always, False never.
        pooled_stem: conv nets whose first convolution reaches a strided max pooling only
            through eval BatchNorm and activations run that stem's passes at the pooled
            resolution, at the pooling's winning positions (:mod:`fastcurv.ops.sampled_conv`;
            exact): None (default) where its C++ kernels run (CPU) and the convolution has at most
            ``STEM_MAX_TAPS`` (32) taps, True always (elsewhere the torch reference), False never.
        group_conv: conv nets run the matvec's products of a stride-1 convolution (no dilation, one
            group per replica) in the group_conv kernels (:mod:`fastcurv.ops.group_conv`), which read
            and write the tangents in place: None (default) on the CPU where the convolution has fewer
            than 16 input or output channels (``NARROW_CHANNELS``), True at any width, False never.
    """

    name = "fused"

    @staticmethod
    def supports(replicas, loss=None) -> tuple[bool, str]:
        layers, why = parse(replicas.base)
        if layers is None:
            return False, why
        if loss is not None and loss.kind not in ("cross_entropy", "mse"):
            return False, f"loss {loss.kind!r} is not fused (cross_entropy and mse are)"
        if replicas.dtype not in FUSED_DTYPES:
            # (its kernels take float32 and float64)
            return False, (f"the model is {replicas.dtype}; the fused engine runs float32 and float64 models "
                           "(torch.func runs any dtype)")
        allowed = set()
        for l in layers:
            if l.kind == "bn" and not l.batch_stats:
                stem = l.opts["mean"][: -len("running_mean")]
                allowed |= {l.opts["mean"], l.opts["var"], stem + "num_batches_tracked"}
        other = sorted(set(replicas.buffers) - allowed)
        if other:
            return False, (f"the model has buffers the fused layers do not read: {other[:3]} (other than the running "
                           "statistics of the BatchNorm layers forward() calls)")
        return True, ""

    @staticmethod
    def check_on(replicas, loss, x, y, samples: int = 32, synthetic: int = 2) -> tuple[bool, str]:
        """Run the engine on samples of a batch ``(x, y)`` for the first and the last finite replica,
        and compare its loss and gradient with the model's own forward and autograd. Catches what
        the layer check cannot: inputs or outputs of shapes the engine does not take, and models
        whose eager forward differs from the traced graph (an in-place update of a tensor another
        operation also reads, which torch.fx records as an out-of-place operation, when the tracer
        cannot see it). Returns ``(ok, reason)``.

        The samples: all of the batch when it has at most ``samples``, else its first 8 and others
        evenly spaced through it, ``samples`` in all; and ``synthetic`` random inputs (a fixed seed,
        the samples' mean and standard deviation; floating-point inputs only), since real samples
        can hide a difference (e.g. all-zero padding samples through layers without bias give zero
        activations both ways). The comparison runs in the model's dtype; a float32 model that
        disagrees is compared again in float64 (:mod:`.engine_check`): two correct float32
        computations can differ by more than any fixed tolerance (a float32 MSE regression with
        outputs around 1e4 rounds every residual to about 1e-3), a wrong graph by far more than
        float64's rounding. Cost: the engine's and autograd's forward and backward passes over
        ``samples + synthetic`` samples, for two replicas (W1, 100 MLPs 784-128-128-10, one thread:
        4 ms, a hundredth of one matvec; twice where the float64 comparison runs)."""
        from .engine_check import check_engine

        return check_engine(replicas, loss, x, y, samples, synthetic)

    def __init__(self, replicas, loss, batches, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 chunk_bytes: int | None = DEFAULT_CHUNK_BYTES, sample_chunk_bytes: int | None = None,
                 drop_zero_columns: bool = True, sparse_input: bool | None = None, fused_head: bool = True,
                 sparse_hidden: bool | None = None, pooled_stem: bool | None = None, group_conv: bool | None = None):
        super().__init__(replicas, loss, batches)
        for name, v in (("cache_bytes", cache_bytes), ("chunk_bytes", chunk_bytes), ("sample_chunk_bytes", sample_chunk_bytes)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0):
                raise ValueError(f"backend_options {name} must be a non-negative number of bytes, got {v!r}")
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
        self._maps = _MapEngine(self.layers, loss, fused_head, pooled_stem, group_conv) if _is_general(self.layers) else None
        linears = self._linears = [l for l in self.layers if l.kind == "linear"]
        self._widest = max((replicas.params[l.weight].shape[1] for l in linears), default=0)  # Linear outputs
        read = {n for l in linears for n in (l.weight, l.bias)}
        self._unused = [j for j, n in enumerate(replicas.names) if n not in read]
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
        # the MLP engine's blocks (lists of consecutive batch indices joined into one unit of work),
        # once a whole pass has made them (see _blocks)
        self._groups: list[list[int]] | None = None

    @property
    def cpu_probe_batch(self) -> int:
        """10 probes per trace matvec in the conv and residual graph engine, 1 for MLP chains (see
        :func:`fastcurv.solvers.trace.probes_per_matvec`)."""
        return 1 if self._maps is None else 10

    def clear_cache(self):
        self._cache.clear()
        self._subset.clear()
        self._cache_used = 0
        self._cache_full = False
        self._groups = None  # (the cache's keys are blocks: they are made again with it)

    # --- the MLP engine's units of work --------------------------------------------------------
    def _blocks(self) -> Iterator[Block]:
        """The MLP engine's units of work (:class:`.blocks.Block`), consecutive batches of the loader
        joined into blocks of at most :meth:`_join_rows` samples (a batch of more stays alone), which
        amortize the fixed cost of a pass over a batch. The state cache is keyed by block. The first
        whole pass makes the blocks; later passes join the same batches, where they read the data
        (a block whose state is cached is not joined again)."""
        if self._groups is not None:
            yield from later_pass(self.batches, self._groups)
            return
        groups: list[list[int]] = []
        if len(self.batches) == 1:
            yield from first_pass(self.batches, 1, groups)
        else:
            it = iter(self.batches)
            head = next(it)
            yield from first_pass(itertools.chain([head], it), self._join_rows(head[1], head[2]), groups)
        self._groups = groups

    def _join_rows(self, x, y) -> int:
        """The most samples per block (at most ``JOIN_ROWS``), given the first batch ``(x, y)``: where
        a block of n samples adds at most ``min(JOIN_MAX_BYTES, cache_bytes / 4)`` bytes, counted as
        its state for all replicas twice (cached, and the probe-independent pass's temporaries; per
        :meth:`state_bytes_per_sample`), its inputs' copy, and a matvec's ``layers + 4`` tangents for
        ``JOIN_PROBES`` probes (on the CPU each within ``chunk_bytes``, as the replica chunks keep them).
        A memory plan (:mod:`fastcurv.memory`) counts the state cache twice, and the MLP engine reads
        the cached rows in place (no second copy): its quarter is what a block may add. No state
        cache (``cache_bytes = 0``): no joins."""
        budget = min(JOIN_MAX_BYTES, self.cache_bytes // 4)
        if budget <= 0:
            return 1
        R, item = self.replicas.R, self.replicas.params[self.replicas.names[0]].element_size()
        state = self.state_bytes_per_sample(x, y)
        row = x[0].numel() * x.element_size()
        widest = self._widest

        def adds(n: int) -> int:
            one = n * JOIN_PROBES * widest * item  # one replica's tangent
            tangent = R * one
            if x.device.type == "cpu" and self.chunk_bytes is not None:
                tangent = min(tangent, max(self.chunk_bytes, one))
            return 2 * R * n * state + n * row + (len(self._linears) + 4) * tangent

        return largest_true(1, JOIN_ROWS, lambda n: adds(n) <= budget)  # (adds grows with n)

    # --- probe-independent pass --------------------------------------------------------------
    def _primal(self, x, y, idx, sparse_hidden: bool | None = None) -> _State:
        """The probe-independent state of batch ``(x, y)`` for replicas ``idx``; ``sparse_hidden``:
        whether to build the hidden layers' CSR forms (False: not, the gradient does not read them;
        True: wherever they apply, whatever the density; None: this backend's setting)."""
        if self._maps is not None:
            params, buffers = self.replicas.subset(idx)
            return self._maps.primal(x, y, params, buffers)
        st = _State()
        params = self.replicas.subset(idx)[0]
        R = next(iter(params.values())).shape[0]
        a, shared = x, True  # activations; shared = no replica axis yet
        pre: list = []  # pre-activations per act layer
        for layer in self.layers:
            if layer.kind == "flatten":
                a = a.reshape(a.shape[0], -1) if shared else a.reshape(R, a.shape[1], -1)
            elif layer.kind == "linear":
                W = params[layer.weight]
                if shared:  # the first layer: its input in CSR form, or without its all-zero columns
                    _check_first_input(layer.name, a, W.shape[2])
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
        st.loss, st.probs, delta, st.mass = _loss_head(self.loss, out, y, sample_dim=1)
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
                if layer.act in PIECEWISE_LINEAR:
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
        at least :func:`hidden_sparse_min_width` wide)."""
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
                st.sparse_in[lin] = _ReluCsr.build(st.inputs[lin], pattern(lin)[0])
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
            if auto and min(i, o) < hidden_sparse_min_width():
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
                # solvers shrink their active set over a run: keep the latest subset's rows, the
                # previous subset freed first so that the copy reuses its pages (W4's job: 118k
                # page faults in one such copy, 0.19 s)
                last = None
                self._subset.pop(i, None)
                self._subset[i] = (idx, st.select(sub))
                return self._subset[i][1]
        st = self._primal(x, y, idx)
        self._cache_put(i, idx, st)
        return st

    def _cache_put(self, i, idx, st) -> None:
        """Cache ``st``, the state of batch ``i`` for replicas ``idx``, if it fits in ``cache_bytes``
        (replacing what was cached for that batch)."""
        if self._cache_full:
            return
        old = self._cache.pop(i, None)
        if old is not None:
            self._cache_used -= old[1].nbytes
        if self._cache_used + st.nbytes <= self.cache_bytes:
            self._cache[i] = (idx, st)
            self._cache_used += st.nbytes
        else:
            self._cache_full = True

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
            # column index and a value per entry, twice (each form and its transpose)
            frac = 1.0 if self.sparse_hidden else hidden_sparse_max_density()
            item = 4 + self.replicas.params[self.replicas.names[0]].element_size()
            for _, i, o, before, after in self._sparse_hidden_sites(self.sparse_hidden is None):
                per += before * (8 + 2 * frac * i * item) + after * (8 + 2 * frac * o * item)
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
        parameters since the state was cached). ``reuse_state=True`` reads the matvecs' cached
        per-batch state instead (MLP chains), or builds it and caches it for them (conv and
        residual graphs: the passes the first matvec would run anyway, keeping the first layers'
        output gradients until their weight products are done), so only the weight products
        remain: valid while the parameters are those the operator was built with (the solvers'
        gradient start)."""
        rs = self.replicas
        pos = {n: j for j, n in enumerate(rs.names)}
        params, buffers = rs.subset(idx)
        grads = [torch.zeros_like(params[n]) for n in rs.names]
        total = None
        if self._maps is not None:
            named = dict(zip(rs.names, grads))
            for i, x, y in self.batches:
                if reuse_state and i not in self._cache and not self._cache_full and self.cache_bytes > 0:
                    st = self._maps.primal(x, y, params, buffers, keep_all=True)
                    total = st.loss if total is None else total + st.loss
                    self._maps.gradient(st, params, named)
                    self._cache_put(i, idx, self._maps.for_matvecs(st))
                    continue
                # in chunks of samples whose widest feature tensor [n, R, *feat] fits the budget
                step = self._sample_step(x, self._maps.primal(x[:1], y[:1], params, buffers).widest * grads[0].shape[0] * grads[0].element_size())
                for n0 in range(0, x.shape[0], step):
                    st = self._maps.primal(x[n0:n0 + step], y[n0:n0 + step], params, buffers, keep_all=True)
                    total = st.loss if total is None else total + st.loss
                    self._maps.gradient(st, params, named)
            return total, grads
        for blk in self._blocks():
            if reuse_state:
                st, where = self._state_rows(blk, idx)
                if where is not None:
                    st = st.select(where.to(blk.device))
            else:
                st = self._primal(*blk.data(), idx, sparse_hidden=False)
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

    # --- the exact trace (piecewise-linear MLPs: .mlp_trace; conv nets and graphs in _MapEngine) ---
    def exact_trace_support(self) -> tuple[bool, str]:
        """Whether :meth:`exact_trace` applies, and why not."""
        names = [p for l in self.layers for p in (l.weight, l.bias) if p is not None]
        if len(set(names)) < len(names):
            return False, "a parameter is used more than once (by a module run twice or tied weights), which makes the model curved in it"
        if self._maps is not None:
            return self._maps.exact_trace_support()
        curved = [l for l in self.layers if l.kind == "act" and l.act not in PIECEWISE_LINEAR]
        if curved:
            return False, "the model has activations that are not piecewise linear (only ReLU and LeakyReLU are)"
        return True, ""

    def exact_trace(self, idx) -> torch.Tensor:
        """Exact Hessian trace ``[Ra]`` (float64) of replicas ``idx`` (None: all), without probes.

        A chain of Linear layers and ReLU/LeakyReLU is linear in any single parameter (the others
        and the activation pattern fixed), so the second derivative of every output with respect
        to one parameter vanishes and the Hessian's diagonal equals the Gauss-Newton diagonal
        (conv nets and residual graphs: :meth:`_MapEngine.exact_trace`):
        ``tr H = sum_n tr(J_n^T H_n J_n) = sum_n sum_c |J_n^T a_nc|^2`` with ``H_n = A_n A_n^T`` the
        loss Hessian in the outputs (cross-entropy: ``a_nc = sqrt(s p_c) (e_c - p)``, MSE:
        ``sqrt(2 s) e_c``). Each ``J_n^T a_nc`` is a per-sample gradient, whose squared norm
        for a Linear layer is ``|delta|^2 (|input|^2 + 1 if bias)``: one backward pass of the C
        vectors ``a_nc`` through the cached state, no weight-sized products (about 0.7 gradients
        for 784-128-128-10 with C = 10). Where the classes outnumber the widths below the head,
        the per-sample Gram matrices of those vectors are propagated instead (:meth:`_trace_gram`,
        chosen by :meth:`_gram_trace`). On the CPU the work goes in chunks of replicas and samples
        whose widest tensor fits ``chunk_bytes`` (:meth:`_trace_steps`)."""
        ok, why = self.exact_trace_support()
        if not ok:
            raise ValueError(why)
        return self._exact_trace_maps(idx) if self._maps is not None else self._exact_trace_mlp(idx)

    def _exact_trace_maps(self, idx) -> torch.Tensor:
        """The conv engine's exact trace: each batch's cached state, in sample chunks sized for the
        C vectors as for a C-probe matvec."""
        params, buffers = self.replicas.subset(idx)
        R = next(iter(params.values())).shape[0]
        total = None
        for i, x, y in self.batches:
            st = self._state(i, x, y, idx)
            N = x.shape[0]
            step = self._sample_step(x, st.outputs * R * st.widest * x.element_size())
            for n0 in range(0, N, step):
                part = self._maps.exact_trace(st.samples(slice(n0, min(N, n0 + step))), params, buffers)
                total = part if total is None else total + part
        return total

    # --- the matvec (MLP chains: .mlp_matvec; conv nets and graphs in _MapEngine) -------------------
    def matvec(self, vecs, idx):
        """Products of the replicas ``idx`` (None: all); MLP chains return the flat ``[Ra, K, P]``."""
        if self._maps is not None:
            return self._matvec_maps(vecs, idx, [torch.zeros_like(v) for v in vecs])
        return self._matvec_mlp(vecs, idx)

    @staticmethod
    def _gather_on_gpu(st: _State, where: torch.Tensor) -> tuple[_State, torch.Tensor | None]:
        """On a GPU, scattered replicas are gathered into one state (a cheap copy there) instead of
        being run as many small runs of consecutive rows, whose kernel launches would dominate."""
        dev = st.deltas[0].device
        if dev.type == "cuda" and sum(1 for _ in consecutive_runs(where, len(where))) > 1:
            return st.select(where.to(dev)), None
        return st, where

    def _state_rows(self, blk: Block, idx) -> tuple[_State, torch.Tensor | None]:
        """The cached state of block ``blk`` and the positions of replicas ``idx`` in it (None:
        position = replica), computing (and caching, within ``cache_bytes``) what is missing: only
        then are the block's batches joined."""
        i = blk.index
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
        st = self._primal(*blk.data(), idx)
        if blk.joined:  # its inputs are the block's own copy (the cache pays for it)
            st.nbytes += st.inputs[0].numel() * st.inputs[0].element_size()
        if hit is None or idx is None:  # (a subset's state does not replace what is cached for another)
            self._cache_put(i, idx, st)
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
        budget = default_sample_chunk_bytes(x.device) if self.sample_chunk_bytes is None else self.sample_chunk_bytes
        return max(1, min(x.shape[0], budget // max(per_sample_bytes, 1)))

