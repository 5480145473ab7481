"""Curvature matrices other than the Hessian, as batched operators with the
:class:`fastcurv.HessianOperator` interface (``matvec(V[R,K,P], idx)``, ``R``, ``P``, ``dtype``,
``device``, ``failed``), so :func:`fastcurv.lanczos`, :func:`fastcurv.hutchinson`,
:func:`fastcurv.hutchpp` and :func:`fastcurv.slq` work on them unchanged.

* :class:`GGNOperator`: generalized Gauss-Newton ``G = sum_batches J^T H_out J``, J the Jacobian
  of the model outputs w.r.t. the parameters and H_out the Hessian of the batch's loss share
  w.r.t. the outputs (for softmax cross-entropy: ``(diag(p) - p p^T) / N``). PSD for convex losses;
  equals the Hessian when the model is linear in its parameters or the residuals vanish.
* :class:`EmpiricalFisherOperator`: ``F = sum_i grad s_i grad s_i^T / c_i`` with s_i = c_i * l_i sample
  i's share of the full-data loss (c_i = 1/N for mean cross-entropy), i.e. ``(1/N) sum_i grad l_i
  grad l_i^T`` for the default mean reduction and ``sum_i grad l_i grad l_i^T`` for "sum". For mean
  MSE, c = 1/(N C) (torch's mean runs over the C outputs too) and l_i is sample i's *summed* squared
  error: ``F = (1/(N C)) sum_i grad l_i grad l_i^T``, the scale at which the Fisher of a Gaussian
  model with variance 1/2 equals the GGN (l_i is then that model's negative log-likelihood of
  sample i, up to a constant; curvlinops' ``EFLinearOperator`` takes the same scale for a mean
  ``MSELoss``). A callable loss is known only by its values: l_i is its value on sample i alone and
  c = 1/N (mean ``loss_reduction``) or 1, so ``loss=nn.MSELoss()`` or ``F.mse_loss``, whose value on
  one sample is the *mean* over its C outputs, give 1/C of ``"mse"``'s empirical Fisher (the loss,
  gradient, Hessian and GGN agree). torch's ``CrossEntropyLoss`` / ``NLLLoss`` with class weights
  ``w`` or ``ignore_index`` and integer labels (see :mod:`fastcurv.losses`): L = (1/W) sum_i w[y_i]
  l_i, so c_i = w[y_i] / W (w[y_i] for "sum"; a module with its own ``reduction="sum"``: w[y_i] / N,
  or w[y_i] with ``reduction="sum"``; 0 for an ignored label) and ``F = (1/W) sum_i
  w[y_i] grad l_i grad l_i^T``, the class weights acting as sample weights (l_i torch's unweighted
  loss of sample i; for labels ``[N, ...]``, w[y_i] sums over its positions and l_i is their
  weighted mean).

Both cost about two passes (one jvp, one vjp) per probe and batch, vmapped over replicas (the inputs
shared by them, or batched for a model that fills a tensor it allocates from its input:
:meth:`fastcurv.ReplicaSet.vmapped`).
"""
from __future__ import annotations

import functools

import torch
from torch.func import grad, jvp, vjp, vmap

from .ambient import resetting_ambient
from .backends.base import Backend
from .operator import HessianOperator


class _JtMJBackend(Backend):
    """``J_f^T M J_f v`` summed over batches for a per-replica map f(params) (outputs or per-sample shares)."""

    #: what ``J_f v`` differentiates in forward mode (for the error when torch cannot)
    forward_mode_of = "the model's outputs"

    def _f(self, buffers, x):
        raise NotImplementedError

    def _middle(self, f_val, jv, y):
        raise NotImplementedError

    def matvec(self, vecs, idx):
        rs = self.replicas
        params, buffers = rs.subset(idx)
        tangents = {n: v for n, v in zip(rs.names, vecs)}
        out = [torch.zeros_like(v) for v in vecs]
        for _, x, y in self.batches:
            def one(pt, b, xr):
                p, t = pt
                f = self._f(b, xr, y)
                val, pull = vjp(f, p)
                jv = vmap(lambda tk: jvp(f, (p,), (tk,))[1])(t)  # [K, ...]
                mjv = vmap(lambda j: self._middle(val, j, y))(jv)
                return vmap(lambda c: pull(c)[0])(mjv)

            try:
                # (x shared by the replicas, or batched for a model that fills a tensor allocated from it)
                res = rs.vmapped(one, (params, tangents), buffers, x)
            except NotImplementedError as exc:
                raise NotImplementedError(
                    f"the {self.name} operator differentiates {self.forward_mode_of} in forward mode, which torch does "
                    f"not implement for an operation of this model or loss ({str(exc).splitlines()[0][:200]}); "
                    "HessianOperator uses reverse mode only") from exc
            for j, n in enumerate(rs.names):
                out[j] += res[n]
        return out


class GGNBackend(_JtMJBackend):
    name = "ggn"

    def _f(self, b, x, y):
        rs = self.replicas
        return lambda p: rs.call(p, b, x)

    def _middle(self, z, jv, y):
        """``H_out jv``: the Hessian of the batch's loss share w.r.t. the outputs ``z`` times ``jv``
        (both shaped like the outputs), by reverse over reverse: ``grad(<grad loss(z), jv>)`` is
        ``H_out^T jv = H_out jv``. (Forward over reverse fails on torch's own losses:
        ``F.mse_loss``'s backward writes into the target's zero tangent.)"""
        loss = self.loss
        dz = grad(lambda q: loss.batch_loss(q, y))
        return grad(lambda zz: (dz(zz) * jv).sum())(z)


class FisherBackend(_JtMJBackend):
    name = "empirical_fisher"
    forward_mode_of = "the model's outputs and the per-sample losses"

    def _f(self, b, x, y):
        rs, loss = self.replicas, self.loss

        def shares(p):
            z = rs.call(p, b, x)
            return vmap(lambda zi, yi: loss.batch_loss(zi.unsqueeze(0), yi.unsqueeze(0)))(z, y)

        return shares

    def _middle(self, s, jv, y):
        """``jv / c_i`` per sample, c_i sample i's coefficient in the full-data loss
        (:meth:`~fastcurv.losses.Loss.sample_coefficients`): ``s_i = c_i l_i``, so that
        ``sum_i grad s_i grad s_i^T / c_i = sum_i c_i grad l_i grad l_i^T``. A sample of c_i = 0 (its
        labels all ignored, or of class weight 0) has no share and adds nothing."""
        c = self.loss.sample_coefficients(y, self._outputs_per_sample)
        if not isinstance(c, torch.Tensor):
            return jv / c
        c = c.to(jv.dtype)
        return torch.where(c > 0, jv / torch.where(c > 0, c, 1), 0)

    _outputs_per_sample = 1


def _documented(method, doc: str):
    """``method`` (a :class:`HessianOperator` method) under the docstring ``doc``: an operator of
    another matrix inherits its code, not its words about the Hessian."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        return method(self, *args, **kwargs)

    wrapper.__doc__ = doc
    return wrapper


_MATVEC_DOC = """{Matrix}-vector products for every replica and probe.

        V: ``[R, P]`` or ``[R, K, P]``; with ``idx`` (a 1-D index tensor of replicas) the leading
        axis holds those replicas only. Returns the same shape. Replicas whose parameters or
        products are non-finite get NaN rows and are recorded in :attr:`failed`.
        """
_DENSE_DOC = """The full ``[P, P]`` {matrix} of one replica, column by column (small models only:
        P at most 20000)."""
_EXACT_TRACE_DOC = """Not available: the exact trace without probes is the Hessian's (on the fused engine);
        this operator's always raises a ValueError. Estimate the {matrix}'s trace with
        :func:`fastcurv.hutchpp` (or the ``{prefix}_trace`` measure of :func:`fastcurv.batched_sharpness`)."""


def _with_docs(cls):
    """``cls`` with :meth:`matvec`, :meth:`dense` and :meth:`exact_trace` documented for its own
    matrix (``cls.matrix``, ``cls.prefix``), not the Hessian."""
    words = dict(matrix=cls.matrix, Matrix=cls.matrix[0].upper() + cls.matrix[1:], prefix=cls.prefix)
    cls.matvec = _documented(HessianOperator.matvec, _MATVEC_DOC.format(**words))
    cls.dense = _documented(HessianOperator.dense, _DENSE_DOC.format(**words))
    cls.exact_trace = _documented(HessianOperator.exact_trace, _EXACT_TRACE_DOC.format(**words))
    return cls


class _SwappedBackendOperator(HessianOperator):
    """A HessianOperator whose products come from another backend (same data, loss, replicas)."""

    backend_cls: type = Backend
    matrix = "curvature matrix"  # (in the docstrings and errors)
    prefix = ""

    @resetting_ambient
    def __init__(self, models, data, *, backend: str = "autograd", backend_options: dict | None = None, **kwargs):
        name = type(self).__name__
        if backend not in ("autograd", "auto"):
            raise ValueError(f"{name} takes no backend (got backend={backend!r}): its products come from its own "
                             "torch.func jvp/vjp engine, whatever HessianOperator's backends; leave backend out")
        if backend_options:
            raise ValueError(f"{name} takes no backend_options (got {sorted(backend_options)}): its products come "
                             "from its own torch.func jvp/vjp engine, which has none")
        super().__init__(models, data, backend="autograd", **kwargs)
        self._install()

    def _install(self):
        self.backend = self.backend_cls(self.replicas, self.loss, self.batches)
        if isinstance(self.backend, FisherBackend) and self.loss.kind == "mse":
            _, x, _ = next(iter(self.batches))
            with torch.no_grad():
                out = self.replicas.forward(x[:1], torch.tensor([0], device=self.device))
            self.backend._outputs_per_sample = out[0, 0].numel()
        self.backend_name, self.backend_reason = self.backend_cls.name, "curvature variant"
        self._auto = False

    @classmethod
    def like(cls, op: HessianOperator):
        """The same replicas, data and loss as ``op`` (nothing re-read), with this curvature."""
        new = cls.__new__(cls)
        new.replicas, new.batches, new.loss = op.replicas, op.batches, op.loss
        new._backend_options = {}
        new.failed = op.failed.clone()
        new.num_passes = new.num_matvecs = 0
        new._lock = op._guard()  # (they share the replicas' functional module: one computation at a time)
        new._install()
        return new

    def loss_and_gradient(self, idx=None, *, reuse_state: bool = False):
        """As :meth:`HessianOperator.loss_and_gradient` (by torch.func: this backend caches no state)."""
        return HessianOperator.loss_and_gradient(self, idx)

    def exact_trace_support(self) -> tuple[bool, str]:
        """``(False, why)``: :meth:`exact_trace` is the Hessian's, not this operator's."""
        return False, (f"the {type(self).__name__} has no exact trace (the fused engine's exact trace is the "
                       f"Hessian's): estimate the {self.matrix}'s trace with fastcurv.hutchpp or the "
                       f"{self.prefix}_trace measure")


@_with_docs
class GGNOperator(_SwappedBackendOperator):
    """Generalized Gauss-Newton matrices of R replicas (arguments as :class:`HessianOperator`, but
    its products come from its own torch.func jvp/vjp engine: ``backend`` other than "autograd" (the
    default) or "auto", and any ``backend_options``, raise a ValueError). Like the Hessian operator,
    it holds the weights it was built with and refuses to run once the models changed."""

    backend_cls = GGNBackend
    matrix, prefix = "generalized Gauss-Newton matrix", "ggn"


@_with_docs
class EmpiricalFisherOperator(_SwappedBackendOperator):
    """Empirical Fisher matrices of R replicas (arguments as :class:`HessianOperator`, but its
    products come from its own torch.func jvp/vjp engine: ``backend`` other than "autograd" (the
    default) or "auto", and any ``backend_options``, raise a ValueError). Like the Hessian operator,
    it holds the weights it was built with and refuses to run once the models changed."""

    backend_cls = FisherBackend
    matrix, prefix = "empirical Fisher matrix", "fisher"
