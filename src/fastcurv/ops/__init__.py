"""Thin wrappers over ``torch.ops.fastcurv.*``, one module per op, each with its pure-torch reference.

The wrapper dispatches on the tensors' device and :func:`fastcurv.set_kernel_impl`
(compiled C++ on CPU; Triton or CUDA on GPU; the torch reference anywhere).
"""
from .agreement_counts import AgreementCounts, agreement_counts, agreement_counts_naive, agreement_counts_onehot
from .activation import ACTIVATIONS, act_derivs, act_derivs_reference, activation_kind, activation_value
from .act_rop_bwd import act_rop_bwd, act_rop_bwd_reference
from .bn_eval_rop_bwd import bn_eval_rop_bwd, bn_eval_rop_bwd_reference
from .bn_eval_rop_fwd import bn_eval_rop_fwd, bn_eval_rop_fwd_reference
from .bn_rop_bwd import bn_rop_bwd, bn_rop_bwd_reference
from .csr_from_dense import csr_from_dense, csr_from_dense_reference
from .csr_linear import (CsrRows, csr_linear, csr_linear_reference, csr_linear_wgrad, csr_linear_wgrad_reference,
                         csr_linear_wgrad_shared, csr_masked_linear, csr_masked_linear_reference)
from .group_conv import (conv_input_grad, group_conv, group_conv_reference, group_conv_wgrad,
                         group_conv_wgrad_reference)
from .head_hvp import head_hvp, head_hvp_reference
from .sampled_conv import (conv_patches, sampled_conv, sampled_conv_reference, sampled_conv_wgrad,
                           sampled_conv_wgrad_reference)
from .softmax_ce_hvp import softmax_ce_hvp, softmax_ce_hvp_reference

#: The piecewise-linear activations' codes (ReLU, LeakyReLU): ``sigma''(z) = 0``, so their R-op needs
#: no ``sigma''(z) * g`` term, and a model of them and linear layers has an exact trace.
PIECEWISE_LINEAR = frozenset({activation_kind("relu"), activation_kind("leaky_relu")})

__all__ = [
    "AgreementCounts",
    "agreement_counts",
    "agreement_counts_naive",
    "agreement_counts_onehot",
    "ACTIVATIONS",
    "PIECEWISE_LINEAR",
    "activation_kind",
    "activation_value",
    "act_derivs",
    "act_derivs_reference",
    "act_rop_bwd",
    "act_rop_bwd_reference",
    "bn_eval_rop_bwd",
    "bn_eval_rop_bwd_reference",
    "bn_eval_rop_fwd",
    "bn_eval_rop_fwd_reference",
    "bn_rop_bwd",
    "bn_rop_bwd_reference",
    "CsrRows",
    "csr_from_dense",
    "csr_from_dense_reference",
    "csr_linear",
    "csr_linear_reference",
    "csr_linear_wgrad",
    "csr_linear_wgrad_reference",
    "csr_linear_wgrad_shared",
    "csr_masked_linear",
    "csr_masked_linear_reference",
    "conv_input_grad",
    "group_conv",
    "group_conv_reference",
    "group_conv_wgrad",
    "group_conv_wgrad_reference",
    "head_hvp",
    "head_hvp_reference",
    "conv_patches",
    "sampled_conv",
    "sampled_conv_reference",
    "sampled_conv_wgrad",
    "sampled_conv_wgrad_reference",
    "softmax_ce_hvp",
    "softmax_ce_hvp_reference",
]
