"""Fused forward/backward for R replicas of a plain MLP chain, without ``vmap``/``functional_call``.

:func:`fastcurv.train.train_population` uses this path when the model is a plain chain
(``nn.Sequential``, possibly nested, of an optional leading ``nn.Flatten``, ``nn.Linear`` layers and
elementwise activations from ``ACTIVATION_GRADS``; ``nn.Identity`` and ``nn.Dropout(p=0)`` are
skipped) and the loss is ``"cross_entropy"`` or ``"mse"``; anything else falls back to the generic
``vmap`` path, and :func:`plan_mlp` says why.

The replicas' parameters stay stacked (``weight [R, out, in]``, ``bias [R, out]``). One step is
``baddbmm`` per layer forward, the loss gradient in closed form, and ``bmm`` per layer backward with
the weight gradients written straight into preallocated contiguous ``[R, out, in]`` buffers. The
activation derivatives are the ATen backward kernels autograd itself uses, so the gradients are the
ones ``loss.backward()`` gives for each replica alone (up to floating-point summation order).

When all replicas see the same minibatch (shared data order), the first layer is ONE GEMM
``x [B, in] @ W^T [in, R*out]`` forward and ``dZ^T [R*out, B] @ x [B, in]`` backward.

Sparse inputs (MNIST's pixels are 81% zero): the minibatch can be given as a :class:`CsrBatch`, row
ids into the training set held once in CSR form, and then the first layer's forward product and
weight gradient multiply only the nonzero inputs (:mod:`fastcurv.ops.csr_linear`). That layer's
weight is best stored transposed (``W = Wt.transpose(1, 2)`` with ``Wt [R, in, out]`` contiguous,
and its gradient buffer likewise), which is how :func:`fastcurv.train.train_population` lays it out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .losses import Loss
from .ops.csr_linear import CsrRows, csr_linear, csr_linear_wgrad, sparse_rows

aten = torch.ops.aten


def _relu(m):
    return (lambda z: torch.relu(z)), (lambda g, z, a: aten.threshold_backward(g, a, 0))


def _tanh(m):
    return torch.tanh, (lambda g, z, a: aten.tanh_backward(g, a))


def _sigmoid(m):
    return torch.sigmoid, (lambda g, z, a: aten.sigmoid_backward(g, a))


def _gelu(m):
    ap = m.approximate
    return (lambda z: F.gelu(z, approximate=ap)), (lambda g, z, a: aten.gelu_backward(g, z, approximate=ap))


def _elu(m):
    al = float(m.alpha)
    return (lambda z: F.elu(z, al)), (lambda g, z, a: aten.elu_backward(g, al, 1, 1, False, z))


def _silu(m):
    return F.silu, (lambda g, z, a: aten.silu_backward(g, z))


def _softplus(m):
    beta, th = m.beta, m.threshold
    return (lambda z: F.softplus(z, beta, th)), (lambda g, z, a: aten.softplus_backward(g, z, beta, th))


def _leaky_relu(m):
    s = float(m.negative_slope)
    return (lambda z: F.leaky_relu(z, s)), (lambda g, z, a: aten.leaky_relu_backward(g, z, s, False))


#: elementwise activation modules the fused path differentiates: type -> factory(module) -> (forward, backward)
#: where ``backward(grad_out, input, output)`` is the ATen kernel autograd uses for that activation.
ACTIVATION_GRADS = {nn.ReLU: _relu, nn.Tanh: _tanh, nn.Sigmoid: _sigmoid, nn.GELU: _gelu, nn.ELU: _elu,
                    nn.SiLU: _silu, nn.Softplus: _softplus, nn.LeakyReLU: _leaky_relu}


class CsrBatch(NamedTuple):
    """A minibatch as row ids into a sparse data set: ``rows [R, B]`` (or ``[B]`` with shared order)."""

    X: CsrRows
    rows: torch.Tensor


@dataclass
class _Layer:
    weight: str
    bias: str | None
    in_features: int
    out_features: int
    acts: list  # [(forward, backward)] applied after the linear map, in order


@dataclass
class MLPPlan:
    """A recognized MLP chain: ``flatten`` (reshape each sample to a vector), then ``layers``."""

    layers: list
    flatten: bool
    in_features: int

    @property
    def param_names(self) -> list[str]:
        return [n for L in self.layers for n in ((L.weight, L.bias) if L.bias else (L.weight,))]

    # ---- forward -------------------------------------------------------------------------
    def _first(self, p, x, shared: bool):
        """Pre-activation of layer 0: ``[R, B, out]`` (shared: ``x [B, in]`` -> one GEMM, a strided view)."""
        L = self.layers[0]
        W = p[L.weight]
        R = W.shape[0]
        if isinstance(x, CsrBatch):
            return csr_linear(x.X, x.rows, W, p[L.bias] if L.bias else None)
        if shared:
            Wf = W.reshape(R * L.out_features, L.in_features)
            if L.bias:
                z = torch.addmm(p[L.bias].reshape(-1), x, Wf.t())
            else:
                z = x @ Wf.t()
            return z.view(x.shape[0], R, L.out_features).transpose(0, 1)
        if L.bias:
            return torch.baddbmm(p[L.bias].unsqueeze(1), x, W.transpose(1, 2))
        return torch.bmm(x, W.transpose(1, 2))

    def sparse_rows(self, x: torch.Tensor, sparse_input: bool | None) -> tuple[CsrRows | None, str]:
        """The samples ``x [N, ...]`` in CSR form when this plan's first layer should take them from
        the nonzero inputs only (see :func:`fastcurv.ops.csr_linear.sparse_rows`), else ``(None, why not)``."""
        if x[0].numel() != self.in_features:
            return None, f"samples have {x[0].numel()} features but the first layer takes {self.in_features}"
        return sparse_rows(x, sparse_input)

    def _prep(self, p, x, shared: bool):
        if isinstance(x, CsrBatch):
            if x.X.in_features != self.in_features:
                raise ValueError(f"the model's first Linear layer takes {self.in_features} features per sample, "
                                 f"the data has {x.X.in_features}")
            R = p[self.layers[0].weight].shape[0]
            return CsrBatch(x.X, x.rows.expand(R, -1)) if shared else x
        if self.flatten:
            x = x.reshape(x.shape[0], -1) if shared else x.reshape(x.shape[0], x.shape[1], -1)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"the model's first Linear layer takes {self.in_features} features per sample, "
                             f"the data has {x.shape[-1]}")
        return x

    def forward(self, p: dict, x: torch.Tensor, *, shared: bool = False, keep: bool = False):
        """Outputs ``[R, B, C]`` of all replicas. ``x``: ``[R, B, ...]`` or (``shared``) ``[B, ...]``,
        or a :class:`CsrBatch` with ``rows [R, B]`` (``shared``: ``[B]``).

        With ``keep`` also returns the saved tensors the backward pass needs.
        """
        x = self._prep(p, x, shared)
        saved = []
        h = x
        for i, L in enumerate(self.layers):
            if i == 0:
                z = self._first(p, x, shared)
            elif L.bias:
                z = torch.baddbmm(p[L.bias].unsqueeze(1), h, p[L.weight].transpose(1, 2))
            else:
                z = torch.bmm(h, p[L.weight].transpose(1, 2))
            acts = []
            for fwd, _ in L.acts:
                a = fwd(z)
                acts.append((z, a))
                z = a
            saved.append((h, acts))
            h = z
        return (h, saved) if keep else h

    # ---- loss and backward ---------------------------------------------------------------
    @torch.no_grad()
    def loss_and_grads(self, p: dict, x: torch.Tensor, y: torch.Tensor, active: torch.Tensor, loss: str, *,
                       shared: bool = False, out: dict | None = None):
        """Per-replica minibatch losses ``[R]`` and gradients of ``sum_r active_r * loss_r``.

        ``p``: name -> ``[R, ...]`` stacked parameters. ``x``: ``[R, B, ...]`` (or ``[B, ...]`` with
        ``shared``) or a :class:`CsrBatch`, ``y``: ``[R, B]`` labels / MSE targets ``[R, B, C]``
        shaped like the outputs (or without the leading ``R``; other shapes: ValueError); with
        ``shared``, labels may be ``[B]`` (the same for every replica) or ``[R, B]`` (each its own).
        ``active``: ``[R]`` bool, inactive replicas get zero loss weight. ``out``: optional name ->
        preallocated contiguous ``[R, ...]`` gradient buffers (written in place and returned).
        Returns ``(grads: dict name -> [R, ...], losses: [R])``.
        """
        logits, saved = self.forward(p, x, shared=shared, keep=True)
        R, B = logits.shape[0], logits.shape[1]
        sparse = isinstance(x, CsrBatch)
        w = active.to(logits.dtype)
        if loss == "cross_entropy":
            # (shared inputs with per-replica labels, label noise: y [R, B])
            yy = y.view(1, B, 1).expand(R, B, 1) if shared and y.dim() == 1 else y.reshape(R, B, 1)
            logp = torch.log_softmax(logits, -1)
            losses = -logp.gather(2, yy).squeeze(2).mean(1)
            dz = logp.exp_()
            dz.scatter_add_(2, yy, torch.full((1, 1, 1), -1.0, dtype=dz.dtype, device=dz.device).expand(R, B, 1))
            dz.mul_((w / B).view(R, 1, 1))
        elif loss == "mse":
            tgt = y.to(logits.dtype)
            Loss("mse").check_targets(logits[0] if shared else logits, tgt)  # a reshape would mispair them
            tgt = tgt.unsqueeze(0) if shared else tgt
            d = logits - tgt
            n = d[0].numel()
            losses = d.pow(2).reshape(R, -1).mean(1)
            dz = d.mul_((2 * w / n).view(R, 1, 1))
        else:
            raise ValueError(f"the fused MLP path supports cross_entropy and mse, got {loss!r}")
        grads = {} if out is None else out

        def buf(name):  # the gradient buffer of parameter name: the preallocated one, or a new one
            g = grads.get(name)
            if g is None:
                grads[name] = g = torch.empty_like(p[name])
            return g

        for i in range(len(self.layers) - 1, -1, -1):
            L = self.layers[i]
            h, acts = saved[i]
            for (zin, a), (_, bwd) in zip(reversed(acts), reversed(L.acts)):
                dz = bwd(dz, zin, a)
            if i == 0 and sparse:  # h is the CsrBatch
                csr_linear_wgrad(h.X, h.rows, dz, out=buf(L.weight))
                if L.bias:
                    torch.sum(dz, 1, out=buf(L.bias))
                break
            if i == 0 and shared:
                # dz [R, B, out] -> [B, R*out]; dW [R*out, in] = dz^T @ x, one GEMM
                dzt = dz.transpose(0, 1).reshape(B, R * L.out_features)
                torch.mm(dzt.t(), h, out=buf(L.weight).view(R * L.out_features, L.in_features))
                if L.bias:
                    torch.sum(dzt, 0, out=buf(L.bias).view(-1))
                break
            torch.bmm(dz.transpose(1, 2), h, out=buf(L.weight))
            if L.bias:
                torch.sum(dz, 1, out=buf(L.bias))
            if i > 0:
                dz = torch.bmm(dz, p[L.weight])
        return grads, losses


def _walk(module: nn.Module, prefix: str, out: list) -> str | None:
    """Flatten nested ``nn.Sequential`` into ``[(name_prefix, leaf)]`` in the order they run;
    returns a reason when not possible.

    Every position counts, also a module object placed at several of them (a shared activation):
    ``named_children()`` lists each object once and dropped its later uses (one ``nn.Tanh()``
    instance after two Linear layers planned the second as linear, silently).
    """
    if module._forward_hooks or module._forward_pre_hooks or getattr(module, "_backward_hooks", None):
        return f"module {prefix or type(module).__name__} has hooks"
    if type(module) is nn.Sequential:
        for name, child in module._modules.items():
            if child is None:  # (a slot set to None: nn.Sequential skips it)
                continue
            r = _walk(child, f"{prefix}{name}.", out)
            if r:
                return r
        return None
    out.append((prefix, module))
    return None


def plan_mlp(model: nn.Module, loss: str = "cross_entropy") -> tuple[MLPPlan | None, str]:
    """Recognize a plain MLP chain for the fused path: ``(plan, "")`` or ``(None, reason)``."""
    if loss not in ("cross_entropy", "mse"):
        return None, f"loss {loss!r} is not supported by the fused MLP path"
    if type(model) is not nn.Sequential:
        return None, f"the model is a {type(model).__name__}, not a plain nn.Sequential"
    leaves: list = []
    r = _walk(model, "", leaves)
    if r:
        return None, r
    layers: list[_Layer] = []
    flatten = False
    linear_at: dict = {}  # id of each Linear module -> its name
    for pos, (prefix, m) in enumerate(leaves):
        name = prefix.rstrip(".") or type(m).__name__
        if isinstance(m, nn.Flatten) and type(m) is nn.Flatten:
            if layers or flatten or m.start_dim != 1 or m.end_dim != -1:
                return None, f"nn.Flatten at {name} is not a leading Flatten(1, -1)"
            flatten = True
        elif type(m) is nn.Linear:
            if id(m) in linear_at:  # its gradient would be the sum over both uses: the generic path does that
                return None, f"Linear layer {linear_at[id(m)]} is applied more than once (at {name} too: tied weights)"
            linear_at[id(m)] = name
            layers.append(_Layer(prefix + "weight", prefix + "bias" if m.bias is not None else None,
                                 m.in_features, m.out_features, []))
        elif type(m) in ACTIVATION_GRADS:
            if not layers:
                return None, f"activation {name} comes before the first Linear layer"
            layers[-1].acts.append(ACTIVATION_GRADS[type(m)](m))
        elif type(m) is nn.Identity or (type(m) is nn.Dropout and m.p == 0):
            continue
        else:
            return None, f"{type(m).__name__} at {name} is not a Linear layer or a supported elementwise activation"
    if not layers:
        return None, "the model has no Linear layer"
    if list(model.buffers()):
        return None, "the model has buffers"
    for a, b in zip(layers[:-1], layers[1:]):
        if a.out_features != b.in_features:
            return None, f"layer widths do not chain ({a.weight}: {a.out_features} -> {b.weight}: {b.in_features})"
    plan = MLPPlan(layers, flatten, layers[0].in_features)
    if len(list(model.parameters())) != len(list(model.named_parameters(remove_duplicate=False))):
        return None, "the model shares a parameter between layers (tied weights)"
    if sorted(plan.param_names) != sorted(n for n, _ in model.named_parameters()):
        return None, "the model has parameters outside its Linear layers"
    return plan, ""
