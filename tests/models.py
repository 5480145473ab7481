"""Tiny models for oracle tests."""
import torch
from torch import nn


def mlp(act=nn.Tanh, sizes=(5, 7, 3), bias=True):
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def cnn(pool="max", bn=True):
    P = {"max": nn.MaxPool2d(2), "avg": nn.AvgPool2d(2), "adaptive": nn.AdaptiveAvgPool2d(2)}[pool]
    layers = [nn.Conv2d(1, 2, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(2))
    layers += [nn.ReLU(), P, nn.Flatten(), nn.Linear(2 * 2 * 2, 3)]
    return nn.Sequential(*layers)


def randomize_bn(model, gen):
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen, dtype=m.running_mean.dtype) * 0.3)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen, dtype=m.running_var.dtype) + 0.5)
            if m.weight is None:  # affine=False
                continue
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen, dtype=m.weight.dtype))
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen, dtype=m.bias.dtype))
    return model


def replicas(factory, R, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    return [randomize_bn(factory().to(dtype), gen) for _ in range(R)]
