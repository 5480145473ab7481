"""Model builders for populations: :func:`mlp` and :func:`cnn`, and the activations they take by name
(``ACTIVATIONS``). Each returns a fresh ``nn.Sequential`` in torch's default initialization, so
``lambda: mlp(...)`` is a builder for :func:`fastcurv.train.train_population` (which re-exports
these names).
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid, "elu": nn.ELU,
               "silu": nn.SiLU, "softplus": nn.Softplus, "leaky_relu": nn.LeakyReLU}


def mlp(sizes: Sequence[int], activation: str = "relu", *, bias: bool = True, flatten: bool = True) -> nn.Sequential:
    """A multilayer perceptron ``Linear(sizes[0], sizes[1]), act, ..., Linear(sizes[-2], sizes[-1])``.

    ``sizes``: layer widths including input and output, e.g. ``(784, 128, 128, 10)``.
    ``activation``: one of ``ACTIVATIONS`` (none after the last layer). ``flatten``: start with
    ``nn.Flatten()`` so image batches ``[N, 1, 28, 28]`` work as well as ``[N, 784]``.
    """
    sizes = [int(s) for s in sizes]
    if len(sizes) < 2 or any(s < 1 for s in sizes):
        raise ValueError(f"sizes must list at least an input and an output width, all positive; got {sizes}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; available: {sorted(ACTIVATIONS)}")
    layers: list[nn.Module] = [nn.Flatten()] if flatten else []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def cnn(in_shape: Sequence[int], channels: Sequence[int], num_classes: int, activation: str = "relu", *,
        batchnorm: bool = True) -> nn.Sequential:
    """A small CNN: for each entry ``c`` of ``channels``, ``Conv2d(prev, c, 3, padding=1)``,
    ``BatchNorm2d(c)`` (``batchnorm=True``), the activation and ``MaxPool2d(2)`` (while the map is at
    least 2x2); then ``Flatten`` and ``Linear(.., num_classes)``.

    ``in_shape``: one input's ``(channels, height, width)``, e.g. ``(1, 28, 28)``;
    ``cnn((1, 28, 28), (8, 16), 10)`` is the benchmarks' W3 net (28x28 -> 8x14x14 -> 16x7x7 -> 10).
    """
    in_shape, channels = [int(s) for s in in_shape], [int(c) for c in channels]
    if len(in_shape) != 3 or any(s < 1 for s in in_shape) or any(c < 1 for c in channels) or int(num_classes) < 1:
        raise ValueError(f"cnn needs in_shape (C, H, W), positive channels and num_classes; got in_shape {in_shape}, "
                         f"channels {channels}, num_classes {num_classes}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; available: {sorted(ACTIVATIONS)}")
    (c, h, w), layers = in_shape, []
    for out in channels:
        layers += [nn.Conv2d(c, out, 3, padding=1), *([nn.BatchNorm2d(out)] if batchnorm else []), ACTIVATIONS[activation]()]
        if min(h, w) >= 2:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        c = out
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * h * w, int(num_classes)))
