"""The fused R-op engine (Pearlmutter): exact Hessian-vector products for chains of supported layers.

Per batch, work that does not depend on the probe is done once and cached: layer inputs,
activation derivatives ``sigma'(z)`` and ``sigma''(z) * g`` (g = loss gradient w.r.t. the
activation output), loss gradients w.r.t. every layer output, max-pooling argmax indices,
normalized BatchNorm inputs and the softmax probabilities. A matvec then costs one R-forward and
one R-backward pass, with replicas and probes batched into the GEMMs/convolutions.

Two engines share this backend:

* MLP chains (Linear, activations, Flatten before the first Linear; :mod:`.backend`, its state in
  :mod:`.mlp_state`, its matvec in :mod:`.mlp_matvec`, its exact trace in :mod:`.mlp_trace`):
  layout ``[R, N, K, F]``; the first layer is a single GEMM over all replicas x probes (its input
  is shared), the others are batched matmuls over replicas with the K probes stacked with the
  batch rows; on the CPU, replicas are processed in cache-sized chunks; consecutive small batches
  run joined into blocks (:mod:`.blocks`).
* Everything else (conv nets): the sample-major layout of :class:`.maps._MapEngine` (its state in
  :mod:`.map_state`, convolution and pooling helpers in :mod:`.map_conv`, exact trace in
  :mod:`.map_trace`). Features are
  ``[N, R, C, H, W]`` (so ``[N, R*C, H, W]`` is the input of one grouped convolution with
  ``groups = R * groups``), tangents ``[N, K, R, C, H, W]`` (the K probes fold into the batch axis
  of the products with the weights ``W``; the products with the weight tangents put K into the
  channels of a grouped convolution). Conv R-backward uses the weight and input gradients of
  convolutions with the same grouping (:mod:`.conv`: torch's, or batched matmuls for 1x1 kernels
  with few channels per group on the CPU). After Flatten the dense head uses ``[N, R, F]`` and
  ``[N, K, R, F]`` (Flatten is a free view). Work is chunked over samples (except with
  batch-statistics BatchNorm, which couples the samples of a batch). Models that are not plain
  chains run on this engine as DAGs traced by torch.fx (:mod:`.graph`): residual additions,
  shared modules, functional ReLU/flatten.

Supported: ``nn.Sequential`` (nested allowed) of Conv2d (bias, stride, padding incl. 'valid' and
symmetric 'same', dilation, groups; zero padding mode), MaxPool2d (tangents gathered with the
forward argmax, scattered back with it: exactly torch's max_pool2d backward, ties included),
AvgPool2d, AdaptiveAvgPool2d, BatchNorm1d/2d with running statistics (eval) or batch statistics
(``bn_mode="batch"`` or ``track_running_stats=False``: per batch, per replica and channel; the
R-op couples the samples), Linear, ReLU, LeakyReLU, GELU (exact), Tanh, Sigmoid, Flatten, Dropout
(eval: identity), Identity; feature-map layers first, then Flatten, then the dense head;
cross-entropy with integer labels or class probabilities, or MSE. Other models (custom ``forward``, residual blocks) are
traced by torch.fx; see :mod:`.graph` for the operations it accepts. Not fused: other
modules and operations (``torch.cat``, products, ...): :meth:`FusedBackend.supports` names the
module or operation, and ``auto`` then uses torch.func. :meth:`FusedBackend.check_on` (:mod:`.engine_check`)
then compares the engine's loss and gradient with the model's own on samples of the data.
"""
from __future__ import annotations

from .backend import DEFAULT_CACHE_BYTES, DEFAULT_CHUNK_BYTES, FusedBackend
from .layers import parse

__all__ = ["DEFAULT_CACHE_BYTES", "DEFAULT_CHUNK_BYTES", "FusedBackend", "parse"]
