"""Random residual graphs for the fused engine: a conv stem (pooled or not), then random
nodes (convolutions, eval BatchNorm, activations, sums of two earlier nodes) reading any earlier
node, so that tangents and gradients are shared, summed and updated in place in every pattern;
the products and the exact trace against the dense float64 Hessian. (A pooled stem read by a sum
with an earlier branch was found wrong this way in the twenty-first round.)"""
import random

import pytest
import torch
from torch import nn

import fastcurv
from models import randomize_bn
from oracle import check_exact_trace, dense_hessian

C, CLASSES = 2, 3
OPS = ("conv3", "conv1", "bn", "relu", "leaky", "tanh", "add")


class RandomGraph(nn.Module):
    """The first nodes: a convolution of the input traced before the stem (with ``pre``), and the
    stem's output; the next reads ``plan[k] = (op, i, j)`` (j: the second term of a sum)."""

    def __init__(self, plan, bn_stem, pool, pre, side):
        super().__init__()
        self.plan = plan
        self.pre = (nn.Conv2d(1, C, 2, stride=2) if pool else nn.Conv2d(1, C, 3, padding=1)) if pre else None
        first = 2 if pre else 1
        stem = [nn.Conv2d(1, C, 3, padding=1)] + ([nn.BatchNorm2d(C)] if bn_stem else []) + [nn.ReLU()]
        self.stem = nn.Sequential(*stem, *([nn.MaxPool2d(2)] if pool else []))
        mods = []
        for op, _, _ in plan:
            mods.append({"conv3": lambda: nn.Conv2d(C, C, 3, padding=1), "conv1": lambda: nn.Conv2d(C, C, 1, bias=False),
                         "bn": lambda: nn.BatchNorm2d(C), "relu": nn.ReLU, "leaky": lambda: nn.LeakyReLU(0.2),
                         "tanh": nn.Tanh, "add": nn.Identity}[op]())
        self.nodes = nn.ModuleList(mods)
        read = {i for op, i, j in plan} | {j for op, i, j in plan if op == "add"}
        last = first + len(plan) - 1
        self.dangling = [k for k in range(last) if k not in read]  # summed into the output with the last node
        side = side // 2 if pool else side
        self.head = nn.Linear(C * side * side, CLASSES)

    def forward(self, x):
        vals = [] if self.pre is None else [self.pre(x)]
        vals.append(self.stem(x))
        for (op, i, j), mod in zip(self.plan, self.nodes):
            vals.append(vals[i] + vals[j] if op == "add" else mod(vals[i]))
        out = vals[-1]
        for k in self.dangling:
            out = out + vals[k]
        return self.head(torch.flatten(out, 1))


def _case(seed: int) -> dict:
    """Case ``seed``: the stem pooled or not, a branch traced before the stem or not, BatchNorm in
    the stem or not and the pooled-stem kernels on or off cycle through every combination; the
    nodes are random. A branch before the stem joins it in a sum, the stem's only reader (a
    ResNet's stem and first skip)."""
    rng = random.Random(seed)
    pool, pre, pooled_stem, bn_stem = bool(seed & 1), bool(seed & 2), (None, False)[(seed >> 2) & 1], bool(seed & 8)
    first = 2 if pre else 1
    plan = [("add", 0, 1)] if pre else []
    for k in range(first + len(plan), first + rng.randint(1, 5)):
        reads = [i for i in range(k) if not (pre and i == 1)]
        plan.append((rng.choice(OPS), rng.choice(reads), rng.choice(reads)))
    return dict(plan=plan, bn_stem=bn_stem, pool=pool, pre=pre, pooled_stem=pooled_stem)


@pytest.mark.parametrize("seed", range(16))
def test_random_residual_graphs_against_dense(seed):
    case = _case(seed)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    models = [randomize_bn(RandomGraph(case["plan"], case["bn_stem"], case["pool"], case["pre"], 4).double(), gen)
              for _ in range(2)]
    x = torch.randn(7, 1, 4, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (7,), generator=gen)
    data = [(x[:4], y[:4]), (x[4:], y[4:])]
    op = fastcurv.HessianOperator(models, data, backend="fused", backend_options={"pooled_stem": case["pooled_stem"]})
    V = torch.randn(2, 2, op.P, generator=gen, dtype=torch.float64)
    HV = op.matvec(V)
    for r, m in enumerate(models):
        torch.testing.assert_close(HV[r], V[r] @ dense_hessian(m, data), rtol=1e-9, atol=1e-11)
    if "tanh" not in {p[0] for p in case["plan"]}:  # piecewise linear: the exact trace applies
        check_exact_trace(op, models, data)
