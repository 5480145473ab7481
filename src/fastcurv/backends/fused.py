"""The fused R-op engine (Pearlmutter): exact Hessian-vector products for chains of supported layers.

Per batch, work that does not depend on the probe is done once and cached: layer inputs,
activation derivatives ``sigma'(z)`` and ``sigma''(z) * g`` (g = loss gradient w.r.t. the
activation output), loss gradients w.r.t. every layer output and the softmax probabilities. A
matvec then costs one R-forward and one R-backward pass, with replicas and probes batched into
the GEMMs: the first layer is a single GEMM over all replicas x probes (its input is shared), the
others are batched matmuls over replicas with the K probes stacked with the batch rows.

Supported: ``nn.Sequential`` (nested allowed) of Linear, ReLU, LeakyReLU, GELU (exact), Tanh,
Sigmoid, Flatten, Dropout (eval: identity), Identity; cross-entropy with integer labels or MSE.
Anything else: :meth:`FusedBackend.supports` says which module, and ``auto`` uses torch.func.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import act_derivs, act_rop_bwd, activation_kind, softmax_ce_hvp
from .base import Backend

DEFAULT_CACHE_BYTES = 4 << 30
DEFAULT_CHUNK_BYTES = 4 << 20

_ACTS = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.GELU: "gelu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}
_TORCH_ACTS = {
    activation_kind("relu"): F.relu,
    activation_kind("tanh"): torch.tanh,
    activation_kind("sigmoid"): torch.sigmoid,
    activation_kind("gelu"): F.gelu,
}


@dataclass
class _Layer:
    kind: str  # "linear" | "act" | "flatten"
    weight: str | None = None
    bias: str | None = None
    act: int = 0
    slope: float = 0.0


def _leaves(module: nn.Module, prefix: str = ""):
    if isinstance(module, nn.Sequential):
        for name, child in module.named_children():
            yield from _leaves(child, f"{prefix}{name}.")
    else:
        yield prefix[:-1], module


def parse(base: nn.Module) -> tuple[list[_Layer] | None, str]:
    """The layer chain of ``base`` for the fused engine, or (None, reason)."""
    if not isinstance(base, nn.Sequential):
        return None, f"the model is a {type(base).__name__}, not an nn.Sequential chain"
    layers: list[_Layer] = []
    for name, mod in _leaves(base):
        if isinstance(mod, nn.Linear):
            layers.append(_Layer("linear", f"{name}.weight", f"{name}.bias" if mod.bias is not None else None))
        elif type(mod) in _ACTS:
            kind = _ACTS[type(mod)]
            if kind == "gelu" and mod.approximate != "none":
                return None, f"module {name!r} is GELU(approximate={mod.approximate!r}); only the exact GELU is fused"
            slope = float(mod.negative_slope) if kind == "leaky_relu" else 0.0
            layers.append(_Layer("act", act=activation_kind(kind), slope=slope))
        elif isinstance(mod, nn.Flatten):
            if mod.start_dim != 1 or mod.end_dim != -1:
                return None, f"module {name!r} is Flatten(start_dim={mod.start_dim}, end_dim={mod.end_dim}); only Flatten() is fused"
            layers.append(_Layer("flatten"))
        elif isinstance(mod, (nn.Dropout, nn.Identity)):
            if isinstance(mod, nn.Dropout) and mod.training:
                return None, f"module {name!r} is Dropout in training mode"
            continue
        else:
            return None, f"module {name!r} ({type(mod).__name__}) is not supported by the fused engine"
    if not any(l.kind == "linear" for l in layers):
        return None, "the model has no Linear layer"
    first = next(i for i, l in enumerate(layers) if l.kind == "linear")
    if any(l.kind == "flatten" for l in layers[first:]):
        return None, "Flatten after the first Linear layer is not supported by the fused engine"
    return layers, ""


def _act_forward(z: torch.Tensor, layer: _Layer) -> torch.Tensor:
    if layer.act == activation_kind("leaky_relu"):
        return F.leaky_relu(z, layer.slope)
    return _TORCH_ACTS[layer.act](z)


class _State:
    """Probe-independent values of one batch for a set of replicas (leading axis R)."""

    def __init__(self):
        self.inputs: list = []  # per linear layer: its input ([N, I] shared for the first, else [R, N, I])
        self.d1: list = []  # per activation: sigma'(z) [R, N, F] (None before the first linear)
        self.d2g: list = []  # per activation: sigma''(z) * g [R, N, F], or None when identically zero
        self.deltas: list = []  # per linear layer: dL/dz [R, N, O]
        self.probs = None  # softmax probabilities [R, N, C] (cross-entropy)
        self.loss = None  # this batch's share of the loss per replica [R]
        self.nbytes = 0

    def _map(self, f) -> "_State":
        out = _State()
        shared = self.inputs[0] if self.inputs and self.inputs[0].dim() == 2 else None
        g = lambda t: None if t is None else (t if t is shared else f(t))
        out.inputs = [g(t) for t in self.inputs]
        out.d1 = [g(t) for t in self.d1]
        out.d2g = [g(t) for t in self.d2g]
        out.deltas = [g(t) for t in self.deltas]
        out.probs = g(self.probs)
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
            ``[chunk, N, K, F]`` fits in this many bytes (None: no chunking).
    """

    name = "fused"

    @staticmethod
    def supports(replicas, loss=None) -> tuple[bool, str]:
        layers, why = parse(replicas.base)
        if layers is None:
            return False, why
        if loss is not None and loss.kind not in ("cross_entropy", "mse"):
            return False, f"loss {loss.kind!r} is not fused (cross_entropy and mse are)"
        if replicas.buffers:
            return False, f"the model has buffers {sorted(replicas.buffers)[:3]}"
        return True, ""

    def __init__(self, replicas, loss, batches, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 chunk_bytes: int | None = DEFAULT_CHUNK_BYTES):
        super().__init__(replicas, loss, batches)
        ok, why = self.supports(replicas, loss)
        if not ok:
            raise ValueError(f"the fused backend does not support this model: {why}")
        self.layers, _ = parse(replicas.base)
        self.cache_bytes = cache_bytes
        self.chunk_bytes = chunk_bytes
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
    def _primal(self, x, y, idx) -> _State:
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
                st.inputs.append(a)
                z = torch.bmm(a.expand(R, *a.shape) if shared else a, W.transpose(1, 2))
                shared = False
                if layer.bias is not None:
                    z = z + params[layer.bias].unsqueeze(1)
                a = z
            else:
                pre.append(None if shared else a)
                a = _act_forward(a, layer)
        out = a  # [R, N, C]
        if self.loss.kind == "cross_entropy":
            logp = torch.log_softmax(out, dim=-1)
            st.loss = -logp[:, torch.arange(out.shape[1]), y].sum(1) * self.loss.scale()
            st.probs = logp.exp()
            delta = st.probs.clone()
            delta[:, torch.arange(out.shape[1]), y] -= 1
            delta *= self.loss.scale()
        else:
            st.loss = (out - y).square().sum((1, 2)) * self.loss.scale(out[0, 0].numel())
            delta = 2 * self.loss.scale(out[0, 0].numel()) * (out - y)
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
        st.nbytes = sum(t.numel() * t.element_size() for t in [*st.inputs[1:], *st.deltas, *[d for d in st.d1 + st.d2g if d is not None]] + ([st.probs] if st.probs is not None else []))
        return st

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

    def loss_and_gradient(self, idx):
        """Loss ``[R]`` and per-parameter gradients ``[R, *shape]`` over all batches (batched GEMMs)."""
        rs = self.replicas
        pos = {n: j for j, n in enumerate(rs.names)}
        params = rs.params if idx is None else {n: t[idx] for n, t in rs.params.items()}
        grads = [torch.zeros_like(params[n]) for n in rs.names]
        total = None
        for _, x, y in self.batches:
            st = self._primal(x, y, idx)
            total = st.loss if total is None else total + st.loss
            lin = 0
            for layer in self.layers:
                if layer.kind != "linear":
                    continue
                a, delta = st.inputs[lin], st.deltas[lin]
                R = delta.shape[0]
                grads[pos[layer.weight]].baddbmm_(delta.transpose(1, 2), a.expand(R, *a.shape) if a.dim() == 2 else a)
                if layer.bias is not None:
                    grads[pos[layer.bias]] += delta.sum(1)
                lin += 1
        return total, grads

    # --- the matvec --------------------------------------------------------------------------
    # Tangents use the layout [R, N, K, F]: every batched matmul below then reads and writes
    # contiguous views without permuting activation-sized tensors.
    def matvec(self, vecs, idx):
        rs = self.replicas
        pos = {n: j for j, n in enumerate(rs.names)}
        params = rs.params if idx is None else {n: t[idx] for n, t in rs.params.items()}
        R, K = vecs[0].shape[:2]
        out = [torch.zeros_like(v) for v in vecs]
        # probe-major weight tangents as [R, I, K*O] (forward) and [R, O, K*I] (backward)
        dWt = {}
        for layer in self.layers:
            if layer.kind == "linear":
                dW = vecs[pos[layer.weight]]
                Kd, O, I = dW.shape[1:]
                dWt[layer.weight] = (dW.permute(0, 3, 1, 2).reshape(R, I, K * O), dW.permute(0, 2, 1, 3).reshape(R, O, K * I))
        for i, x, y in self.batches:
            st = self._state(i, x, y, idx)
            step = self._chunk(R, x.shape[0], K, x.device)
            for c0 in range(0, R, step):
                c = slice(c0, min(R, c0 + step))
                self._apply(st.narrow(c), {n: t[c] for n, t in params.items()}, [v[c] for v in vecs],
                            {w: (f[c], b[c]) for w, (f, b) in dWt.items()}, [o[c] for o in out], pos, x.shape[0])
        return out

    def _chunk(self, R: int, N: int, K: int, device) -> int:
        """Replicas per chunk: all on a GPU; on a CPU as many as keep one [chunk, N, K, F]
        tangent within ``chunk_bytes``, so the element-wise passes between GEMMs hit the cache."""
        if device.type != "cpu" or self.chunk_bytes is None:
            return R
        widest = max(self.replicas.params[l.weight].shape[1] for l in self.layers if l.kind == "linear")
        per = N * K * widest * self.replicas.params[self.replicas.names[0]].element_size()
        return max(1, min(R, self.chunk_bytes // max(per, 1)))

    def _apply(self, st, params, vecs, dWt, out, pos, N):
        """Accumulate one batch's Hessian-vector products of the replicas in ``st`` into ``out``."""
        R, K = vecs[0].shape[:2]
        ra, rpre, rin = None, [], []
        lin = act = 0
        for layer in self.layers:
            if layer.kind == "linear":
                rin.append(ra)
                a, W = st.inputs[lin], params[layer.weight]
                O, I = W.shape[1], W.shape[2]
                fwd, _ = dWt[layer.weight]
                # an input shared by all replicas enters bmm as a stride-0 expand (no copy)
                rz = torch.bmm(a.expand(R, *a.shape) if a.dim() == 2 else a, fwd)
                rz = rz.view(R, N, K, O)
                if ra is not None:  # in place: these tensors are R*N*K*F large
                    rz.view(R, N * K, O).baddbmm_(ra.view(R, N * K, I), W.transpose(1, 2))
                if layer.bias is not None:
                    rz += vecs[pos[layer.bias]].unsqueeze(1)
                ra = rz
                lin += 1
            elif layer.kind == "act":
                d1 = st.d1[act]
                act += 1
                if d1 is None:
                    rpre.append(None)
                    continue
                if st.d2g[act - 1] is None:  # piecewise-linear: the pre-activation tangent is not needed later
                    rpre.append(None)
                    ra = ra.mul_(d1.unsqueeze(2))
                else:
                    rpre.append(ra)
                    ra = d1.unsqueeze(2) * ra
        C = ra.shape[-1]
        if self.loss.kind == "cross_entropy":
            rd = softmax_ce_hvp(st.probs.reshape(R * N, 1, C), ra.reshape(R * N, K, 1, C), self.loss.scale()).view(R, N, K, C)
        else:
            rd = 2 * self.loss.scale(C) * ra
        for layer in reversed(self.layers):
            if layer.kind == "linear":
                lin -= 1
                a, W, delta = st.inputs[lin], params[layer.weight], st.deltas[lin]
                O, I = W.shape[1], W.shape[2]
                j = pos[layer.weight]
                rdT = rd.reshape(R, N, K * O).transpose(1, 2)  # [R, K*O, N]
                out[j].view(R, K * O, I).baddbmm_(rdT, a.expand(R, *a.shape) if a.dim() == 2 else a)
                ra_in = rin[lin]
                if ra_in is not None:
                    out[j] += torch.bmm(delta.transpose(1, 2), ra_in.view(R, N, K * I)).view(R, O, K, I).transpose(1, 2)
                if layer.bias is not None:
                    out[pos[layer.bias]] += rd.sum(1)
                if a.dim() == 3:
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
