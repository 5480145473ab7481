"""Small models and data for the measure and reparameterization tests."""
import torch
from torch import nn


def relu_mlp(sizes=(6, 8, 7, 3), bias=True):
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def make_replicas(R=3, seed=0, **kw):
    torch.manual_seed(seed)
    return [relu_mlp(**kw).double() for _ in range(R)]


def make_data(n=48, d=6, k=3, seed=1, batches=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=g)
    step = n // batches
    return [(x[i:i + step], y[i:i + step]) for i in range(0, n, step)]


def train(models, loader, steps=150, lr=0.1):
    """A few full-batch GD steps so the models sit somewhere meaningful."""
    x = torch.cat([b[0] for b in loader])
    y = torch.cat([b[1] for b in loader])
    for m in models:
        opt = torch.optim.SGD(m.parameters(), lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    return models


def set_flat(model, flat):
    torch.nn.utils.vector_to_parameters(flat.to(next(model.parameters()).dtype), model.parameters())


def full_loss(model, loader):
    x = torch.cat([b[0] for b in loader])
    y = torch.cat([b[1] for b in loader])
    return nn.functional.cross_entropy(model(x), y)


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """These tests use tiny tensors: with 2 intra-op threads on a busy 2-core machine, OpenMP
    spin-waiting made them ~30x slower (measured). Use one thread, restore afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
