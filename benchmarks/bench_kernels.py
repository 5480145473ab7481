"""Benchmarks of the fastcurv kernels: each op under every implementation available here.

CPU: the C++ extension ('ext') against the pure-torch reference ('torch').
CUDA: Triton ('triton'), the CUDA extension ('cuda') and the torch reference ('torch');
``linear_rop``: the fused Triton kernel against the torch reference (batched cuBLAS GEMMs).

Run as pytest-benchmark tests::

    python -m pytest benchmarks/bench_kernels.py --benchmark-only -p no:cacheprovider

or as a script that prints times and speed-ups relative to 'torch' and writes JSON::

    python benchmarks/bench_kernels.py --json bench_kernels.json

``--csr-sweep``: the sparse-input linear layer (``csr_linear`` forward + ``csr_linear_wgrad``) against
the dense batched GEMMs it replaces in training (one replica group of 17, minibatch 64, 784 -> 128,
one thread, as a training worker runs it), over input densities; it sets ``SPARSE_INPUT_MAX_DENSITY``.
``--csr-hessian``: the same pair at the fused Hessian engine's sizes (1000 MNIST images shared by
all replicas, the probe block ``[R, K*O, 784]`` in the ``Linear`` layout and its weight HVP written
back in it; R=20 x 4096 and R=100 x 1024 columns, W2 and W1 at K=8; torch's threads), in GFLOP/s
of the multiply-adds done, and the weight HVP from the minibatch's transpose
(``csr_linear_wgrad_shared``, what the engine runs); then the forward product and
``csr_linear_wgrad_shared`` on the engine's layout, the K=8 blocks ``[R, 8, O, 784]`` of a flat
``[R, 8, P]`` tensor read and written in place.
``--relu-sweep``: a hidden Linear layer between ReLUs in the fused engine's matvec (one replica of
W1 at K=8: 1000 samples, 128 -> 128, what one CPU chunk runs), its six products from the ReLU
patterns (``csr_linear``, ``csr_masked_linear``, ``csr_linear_wgrad(_shared)``) against the six
batched GEMMs, over the fraction of nonzero ReLU outputs; it sets ``HIDDEN_SPARSE_MAX_DENSITY``.
``--pointwise``: the conv engine's 1x1 convolutions (forward, input and weight gradient; W4's
strided projection and bottleneck layers, replicas as groups) as matmuls against torch's
convolutions; it backs ``POINTWISE_MAX_CHANNELS`` in ``fastcurv/backends/fused/conv.py``. Then the
fused engine's matvecs and gradient on W4 and a small bottleneck ResNet (R=20, 200 MNIST images)
with either, timed in alternation.
``--group-conv``: ``group_conv`` and its weight gradient against torch's grouped convolutions over
channel counts and map sizes (it backs ``NARROW_CHANNELS``).
``head_hvp``'s 'torch' column is the GEMM chain the fused engine ran before that kernel.

Default sizes (a slice of the W1 workload: R=20 replicas, N=500 rows, hidden 128, C=10, K=4) run in
about a minute on a 2-core CPU; ``FASTCURV_BENCH_FULL=1`` (or ``--full``) uses W1 itself (R=100,
N=1000, K=8). Timings on shared machines are noisy: compare medians from one run, never gate CI on them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import pytest
import torch

import fastcurv
from fastcurv import _ext
from fastcurv.ops import (
    ACTIVATIONS,
    act_derivs_reference,
    act_rop_bwd_reference,
    bn_eval_rop_bwd_reference,
    bn_eval_rop_fwd_reference,
    bn_rop_bwd_reference,
    conv_patches,
    group_conv,
    group_conv_reference,
    group_conv_wgrad,
    group_conv_wgrad_reference,
    sampled_conv_reference,
    sampled_conv_wgrad_reference,
    softmax_ce_hvp_reference,
)
from fastcurv.ops.linear_rop import linear_rop_reference

HAVE_CUDA = torch.cuda.is_available()
try:  # Triton only on a GPU here: the interpreter is a correctness tool, not a benchmark target
    from fastcurv import triton_kernels

    HAVE_TRITON = HAVE_CUDA and triton_kernels.available() and os.environ.get("TRITON_INTERPRET") != "1"
except ImportError:  # pragma: no cover
    HAVE_TRITON = False


def sizes(full: bool | None = None) -> dict:
    if full is None:
        full = os.environ.get("FASTCURV_BENCH_FULL") == "1"
    if full:
        return dict(R=100, N=1000, H=128, C=10, K=8, I=784, BN=(256, 4, 320, 196), SC=(32, 160, 8), GC=(32, 20, 8, 8, 14))
    # BN: bn_rop_bwd's (N, K, G, S), a batch-statistics BatchNorm2d with 20 replicas x 16 channels of 14x14 maps;
    # SC: sampled_conv's (N, G, K), W3's first layer (20 replicas x 8 channels, 3x3 on 28x28 MNIST, 2x2 pooling);
    # GC: group_conv's (B, G, C, O, H = W), the R-forward of W4's first residual block (4 samples x 8 probes,
    # 20 replicas of 8 -> 8 channels, 3x3 on 14x14)
    return dict(R=20, N=500, H=128, C=10, K=4, I=784, BN=(64, 4, 320, 196), SC=(16, 160, 4), GC=(32, 20, 8, 8, 14))


def make_inputs(op: str, device: str, dtype=torch.float32, full: bool | None = None) -> tuple:
    s = sizes(full)
    R, N, H, C, K, I = s["R"], s["N"], s["H"], s["C"], s["K"], s["I"]
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype).to(device)  # noqa: E731
    if op == "softmax_ce_hvp":
        return (rnd(R, N, C).softmax(-1), rnd(R, K, N, C), 1.0 / N)
    if op == "act_derivs":
        return (rnd(R, N, H), rnd(R, N, H), ACTIVATIONS["tanh"], 0.0)
    if op == "act_rop_bwd":
        return (rnd(R, N * H), rnd(R, N * H), rnd(R, K, N * H), rnd(R, K, N * H))
    if op == "bn_rop_bwd":  # xh, g, rg, inv, gamma, rgamma, rxh, m2 (input tangent and affine weights)
        Nb, Kb, Gb, Sb = s["BN"]
        return (rnd(Nb, Gb, Sb), rnd(Nb, Gb, Sb), rnd(Nb, Kb, Gb, Sb), rnd(Gb).abs() + 0.5, rnd(Gb), rnd(Kb, Gb),
                rnd(Nb, Kb, Gb, Sb), rnd(Kb, Gb))
    if op in ("bn_eval_rop_fwd", "bn_eval_rop_bwd"):
        # eval BatchNorm2d + ReLU at bn_rop_bwd's sizes; in place, so scale 1 and a 0/1 mask keep repeated
        # calls' values finite and normal
        Nb, Kb, Gb, Sb = s["BN"]
        mask = (rnd(Nb, Gb, Sb) > 0).to(dtype)
        one = torch.ones(Gb, dtype=dtype, device=device)
        if op == "bn_eval_rop_fwd":  # rz, scale, xh, rgamma, rbeta, d1, delta
            return (rnd(Nb, Kb, Gb, Sb), one, rnd(Nb, Gb, Sb), rnd(Kb, Gb), rnd(Kb, Gb), mask, rnd(Nb, Gb, Sb))
        return (rnd(Nb, Kb, Gb, Sb), one, rnd(Nb, Gb, Sb), rnd(Nb, Gb, Sb), rnd(Kb, Gb), mask, True)  # rd, scale, xh, delta, crg, d1
    if op == "head_hvp":  # W1's head (H -> C) at K probes: a, ra, weight, dweight, dbias, probs, delta, scale, d1, out_w, out_b, accumulate
        mask = (rnd(R, N, H) > 0).to(dtype)
        return (rnd(R, N, H), rnd(R, N, K, H), rnd(R, C, H), rnd(R, K, C, H), rnd(R, K, C), rnd(R, N, C).softmax(-1),
                rnd(R, N, C), 1.0 / N, mask, torch.empty(R, K, C, H, dtype=dtype, device=device),
                torch.empty(R, K, C, dtype=dtype, device=device), False)
    if op in ("sampled_conv", "sampled_conv_wgrad"):  # cols, pos (a winner in each 2x2 window), weight or grad
        Ns, G, Ks = s["SC"]
        cols = conv_patches(rnd(Ns, 1, 28, 28), 3, 1, 1)
        win = torch.randint(0, 2, (2, Ns, G, 14, 14), generator=g)
        rows, cols_ = torch.arange(14).view(14, 1), torch.arange(14).view(1, 14)
        pos = ((2 * rows + win[0]) * 28 + 2 * cols_ + win[1]).view(Ns, G, 196).to(device)
        if op == "sampled_conv":
            return (cols, pos, rnd(G, Ks, 9))
        return (cols, pos, rnd(Ns, Ks, G, 196), torch.empty(G, Ks, 9, dtype=dtype, device=device), False)
    if op in ("group_conv", "group_conv_wgrad"):  # x [B, G, 1, C, H, W], weight or grad, out; padding 1 on every side
        B, G, Cg, Og, Hg = s["GC"]
        x = rnd(B, G, 1, Cg, Hg, Hg)
        if op == "group_conv":
            return (x, rnd(G, Og, Cg, 3, 3), torch.empty(B, G, 1, Og, Hg, Hg, dtype=dtype, device=device), [1, 1, 1, 1], False)
        return (x, rnd(B, G, 1, Og, Hg, Hg), torch.empty(G, 1, Og, 1, Cg, 3, 3, dtype=dtype, device=device), [1, 1, 1, 1], False)
    if op == "linear_rop":  # the first hidden layer of W1: input shared by all replicas
        x = rnd(N, I)
        return (x.expand(R, N, I), None, rnd(R, H, I) / I**0.5, rnd(R, K, H, I), rnd(R, H), rnd(R, K, H), "relu", 0.0)
    raise KeyError(op)


def head_hvp_gemms(a, ra, W, dW, db, probs, delta, scale, d1, out_w, out_b, accumulate):
    """What the fused engine ran before the head_hvp kernel: batched GEMMs (six per probe block, each
    with a dimension of C), the softmax-CE R-op and the element-wise passes (written, not accumulated)."""
    R, N, K, I = ra.shape
    C = W.shape[1]
    rz = torch.bmm(a, dW.reshape(R, K * C, I).transpose(1, 2)).view(R, N, K, C)
    rz.view(R, N * K, C).baddbmm_(ra.reshape(R, N * K, I), W.transpose(1, 2))
    rz += db.unsqueeze(1)
    rd = softmax_ce_hvp_reference(probs, rz.transpose(1, 2), scale).transpose(1, 2).contiguous()
    out_w.view(R, K * C, I).baddbmm_(rd.view(R, N, K * C).transpose(1, 2), a, beta=0)
    out_w += torch.bmm(delta.transpose(1, 2), ra.reshape(R, N, K * I)).view(R, C, K, I).transpose(1, 2)
    torch.sum(rd, 1, out=out_b)
    rg = torch.bmm(rd.view(R, N * K, C), W)
    rg.view(R, N, K * I).baddbmm_(delta, dW.permute(0, 2, 1, 3).reshape(R, C, K * I))
    return rg.view(R, N, K, I).mul_(d1.unsqueeze(2))


REFERENCES = {
    "softmax_ce_hvp": softmax_ce_hvp_reference,
    "act_derivs": act_derivs_reference,
    "act_rop_bwd": act_rop_bwd_reference,
    "bn_rop_bwd": bn_rop_bwd_reference,
    "bn_eval_rop_fwd": bn_eval_rop_fwd_reference,
    "bn_eval_rop_bwd": bn_eval_rop_bwd_reference,
    "linear_rop": linear_rop_reference,
    "head_hvp": head_hvp_gemms,  # the GEMM chain it replaces, not the einsum reference
    "sampled_conv": sampled_conv_reference,
    "sampled_conv_wgrad": sampled_conv_wgrad_reference,
    "group_conv": group_conv_reference,
    "group_conv_wgrad": group_conv_wgrad_reference,
}


def implementations(op: str, device: str) -> dict:
    """name -> callable for every implementation of ``op`` usable on ``device`` here."""
    impls = {"torch": REFERENCES[op]}
    if op != "linear_rop" and _ext.has_kernel(op, device):
        impls["cuda" if device == "cuda" else "ext"] = getattr(torch.ops.fastcurv, op)
    if device == "cuda" and HAVE_TRITON and triton_kernels.supports(op):
        impls["triton"] = triton_kernels.OPS[op]
    return impls


def cases():
    devices = ["cpu"] + (["cuda"] if HAVE_CUDA else [])
    out = []
    for device in devices:
        for op in REFERENCES:
            for impl in ("torch", "ext", "cuda", "triton"):
                out.append(pytest.param(op, impl, device, id=f"{op}-{impl}-{device}"))
    return out


def _synced(fn, args, device):
    if device == "cuda":
        def run():
            fn(*args)
            torch.cuda.synchronize()
    else:
        def run():
            fn(*args)
    return run


@pytest.mark.parametrize("op,impl,device", cases())
def test_kernel(benchmark, op, impl, device):
    impls = implementations(op, device)
    if impl not in impls:
        pytest.skip(f"{impl} not available for {op} on {device}")
    args = make_inputs(op, device)
    benchmark.group = f"{op}-{device}"
    benchmark.extra_info.update(sizes())
    benchmark(_synced(impls[impl], args, device))


# ----------------------------------------------------------------------------- sparse inputs

CSR_DENSITIES = (0.05, 0.1, 0.19, 0.3, 0.4, 0.5, 0.7)


def csr_inputs(density: float, R: int = 17, B: int = 64, N: int = 2000, d_in: int = 784, d_out: int = 128):
    """A random ``[N, d_in]`` data set with the given fraction of nonzeros, a minibatch per replica,
    weights and output gradients; returns ``(X, rows, x_batch, w_t, w, grad)``: ``w [R, d_out, d_in]``
    contiguous and ``w_t`` the same values stored transposed (as batched training keeps them)."""
    from fastcurv.ops.csr_linear import CsrRows

    g = torch.Generator().manual_seed(0)
    x = torch.rand(N, d_in, generator=g)
    x[torch.rand(N, d_in, generator=g) >= density] = 0
    rows = torch.randint(0, N, (R, B), generator=g)
    w = torch.randn(R, d_out, d_in, generator=g)
    w_t = w.transpose(1, 2).contiguous().transpose(1, 2)
    return CsrRows.from_dense(x), rows, x[rows], w_t, w, torch.randn(R, B, d_out, generator=g)


def csr_pair(X, rows, w_t, grad, out):
    from fastcurv.ops.csr_linear import csr_linear, csr_linear_wgrad

    csr_linear(X, rows, w_t)
    csr_linear_wgrad(X, rows, grad, out=out)


def dense_pair(xb, w, grad, out):
    torch.bmm(xb, w.transpose(1, 2))
    torch.bmm(grad.transpose(1, 2), xb, out=out)


@pytest.mark.skipif(not _ext.has_kernel("csr_linear", "cpu"), reason="C++ extension not built")
@pytest.mark.parametrize("density", [0.19, 0.5])
@pytest.mark.parametrize("impl", ["csr", "dense"])
def test_csr_linear(benchmark, impl, density):
    X, rows, xb, w_t, w, grad = csr_inputs(density)
    benchmark.group = f"csr_linear-density{density}"
    if impl == "csr":
        out = torch.empty_like(w_t)
        benchmark(csr_pair, X, rows, w_t, grad, out)
    else:
        out = torch.empty_like(w)
        benchmark(dense_pair, xb, w, grad, out)


RELU_DENSITIES = (0.2, 0.35, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


def relu_layer_products(density: float, K: int = 8, N: int = 1000, F: int = 128):
    """The six products of one hidden ``Linear(F, F)`` between ReLUs in one replica's matvec with K
    probes, ``density`` of the ReLU outputs (before and after the layer) nonzero: returns
    ``(sparse, dense)`` closures, the engine's sparse path and the GEMMs of its dense path."""
    from fastcurv.ops.csr_linear import CsrRows, csr_linear, csr_linear_wgrad_shared, csr_masked_linear

    g = torch.Generator().manual_seed(0)
    relu = lambda *shape: torch.randn(*shape, generator=g) * (torch.rand(*shape, generator=g) < density)
    a, delta = relu(1, N, F), relu(1, N, F)  # the layer's ReLU input; dL/dz, zero where the ReLU after it is
    m_in, m_out = (a != 0).unsqueeze(2), (delta != 0).unsqueeze(2)
    ra, rd = torch.randn(1, N, K, F, generator=g) * m_in, torch.randn(1, N, K, F, generator=g) * m_out
    W, dW = torch.randn(1, F, F, generator=g), torch.randn(1, K * F, F, generator=g)  # probe block [K*O, I]
    dWt = torch.randn(1, F, K * F, generator=g)  # the probe as [O, K*I]
    A, At = CsrRows.from_dense(a[0]), CsrRows.from_dense(a[0].t().contiguous())
    D = CsrRows.from_dense(delta[0], m_out[0, :, 0].expand(N, F))
    Dt = CsrRows.from_dense(delta[0].t().contiguous(), m_out[0, :, 0].expand(N, F).t().contiguous())
    rows, rows_t = torch.arange(N).view(1, N), torch.arange(F).view(1, F)
    out, tmp = torch.empty(1, K * F, F), torch.empty(1, F, K * F)

    def sparse():
        rz = csr_linear(A, rows, dW)
        csr_masked_linear(A, rows, ra, W, out=rz.view(1, N, K, F), accumulate=True)
        csr_linear_wgrad_shared(At, rd.view(1, N, K * F), out=out, accumulate=True, rows=rows_t)
        csr_linear_wgrad_shared(Dt, ra.view(1, N, K * F), out=tmp.transpose(1, 2), rows=rows_t)
        rg = csr_linear(D, rows, dWt.transpose(1, 2))
        csr_masked_linear(D, rows, rd, W.transpose(1, 2), out=rg.view(1, N, K, F), accumulate=True)

    def dense():
        rz = torch.bmm(a, dW.transpose(1, 2))
        rz.view(1, N * K, F).baddbmm_(ra.view(1, N * K, F), W.transpose(1, 2))
        out.baddbmm_(rd.view(1, N, K * F).transpose(1, 2), a)
        torch.bmm(delta.transpose(1, 2), ra.view(1, N, K * F), out=tmp)
        rg = torch.bmm(rd.view(1, N * K, F), W)
        rg.view(1, N, K * F).baddbmm_(delta, dWt)

    return sparse, dense


@pytest.mark.skipif(not _ext.has_kernel("csr_masked_linear_out", "cpu"), reason="C++ extension not built")
@pytest.mark.parametrize("density", [0.5])
@pytest.mark.parametrize("impl", ["sparse", "dense"])
def test_relu_layer_products(benchmark, impl, density):
    sparse, dense = relu_layer_products(density)
    benchmark.group = f"relu-layer-density{density}"
    benchmark(sparse if impl == "sparse" else dense)


def relu_sweep(repeat: int) -> list[dict]:
    res = []
    for density in RELU_DENSITIES:
        sparse, dense = relu_layer_products(density)
        t_sparse, t_dense = _time(sparse, repeat), _time(dense, repeat)
        res.append(dict(op="hidden ReLU layer, 6 products", density=density, sparse_ms=t_sparse * 1e3,
                        dense_ms=t_dense * 1e3, speedup=t_dense / t_sparse))
        print(f"hidden ReLU layer density {density:4.2f}: sparse {t_sparse * 1e3:7.3f} ms, dense GEMMs {t_dense * 1e3:7.3f} ms"
              f"   x{t_dense / t_sparse:5.2f}")
    return res


def csr_sweep(repeat: int) -> list[dict]:
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = []
        for density in CSR_DENSITIES:
            X, rows, xb, w_t, w, grad = csr_inputs(density)
            o1, o2 = torch.empty_like(w_t), torch.empty_like(w)
            t_csr = _time(lambda: csr_pair(X, rows, w_t, grad, o1), repeat)
            t_dense = _time(lambda: dense_pair(xb, w, grad, o2), repeat)
            res.append(dict(op="csr_linear+wgrad", density=density, csr_ms=t_csr * 1e3, dense_ms=t_dense * 1e3,
                            speedup=t_dense / t_csr))
            print(f"csr_linear+wgrad density {density:4.2f}: csr {t_csr * 1e3:7.3f} ms, dense bmm {t_dense * 1e3:7.3f} ms"
                  f"   x{t_dense / t_csr:5.2f}")
        return res
    finally:
        torch.set_num_threads(old)


def csr_hessian(repeat: int) -> list[dict]:
    from fastcurv.ops.csr_linear import CsrRows, csr_linear, csr_linear_wgrad, csr_linear_wgrad_shared

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from hvp_json import load_batch

    x, _, source = load_batch(1000)
    X = CsrRows.from_dense(x)
    g = torch.Generator().manual_seed(0)
    res = []
    for R, cols in ((20, 4096), (100, 1024)):
        rows = torch.arange(len(x)).expand(R, len(x))
        w = torch.randn(R, cols, x.shape[1], generator=g)
        grad = torch.randn(R, len(x), cols, generator=g)
        out = torch.empty_like(w)
        flops = 2 * X.values.numel() * cols * R
        t_fwd = _time(lambda: csr_linear(X, rows, w), repeat)
        t_wgrad = _time(lambda: csr_linear_wgrad(X, rows, grad, out=out), repeat)
        Xt = X.transpose()
        t_shared = _time(lambda: csr_linear_wgrad_shared(Xt, grad, out=out), repeat)
        # the engine's layout: the K=8 probe blocks of a flat [R, K, P] tensor, read and written in place
        flat = torch.randn(R, 8, cols // 8 * x.shape[1] + 7, generator=g)
        blocks = flat[..., 3:3 + cols // 8 * x.shape[1]].view(R, 8, cols // 8, x.shape[1])
        t_fwd_g = _time(lambda: csr_linear(X, rows, blocks), repeat)
        t_shared_g = _time(lambda: csr_linear_wgrad_shared(Xt, grad, out=blocks), repeat)
        res.append(dict(op="csr_linear (Hessian sizes)", data=source, R=R, columns=cols, fwd_ms=t_fwd * 1e3,
                        wgrad_ms=t_wgrad * 1e3, wgrad_shared_ms=t_shared * 1e3, fwd_gflops=flops / t_fwd / 1e9,
                        wgrad_gflops=flops / t_wgrad / 1e9, wgrad_shared_gflops=flops / t_shared / 1e9,
                        fwd_probe_blocks_ms=t_fwd_g * 1e3, wgrad_shared_probe_blocks_ms=t_shared_g * 1e3))
        print(f"R={R:3d} x {cols} columns, {source}: csr_linear {t_fwd * 1e3:7.1f} ms ({flops / t_fwd / 1e9:5.1f} GFLOP/s), "
              f"csr_linear_wgrad {t_wgrad * 1e3:7.1f} ms ({flops / t_wgrad / 1e9:5.1f} GFLOP/s), "
              f"csr_linear_wgrad_shared {t_shared * 1e3:7.1f} ms ({flops / t_shared / 1e9:5.1f} GFLOP/s); "
              f"on the 8 probe blocks of a flat tensor: csr_linear {t_fwd_g * 1e3:7.1f} ms, "
              f"csr_linear_wgrad_shared {t_shared_g * 1e3:7.1f} ms")
    return res


# ----------------------------------------------------------------------------- 1x1 convolutions

# (name, input [N, C_in, H, W], C_out, groups, stride): the conv engine's 1x1 products, replicas
# (R=20) as groups, K=8 probes in the batch (N=32) or in the channels; W4's strided projection
# (8 -> 16 channels per replica) and a bottleneck block's 1x1 layers (16 <-> 8)
POINTWISE_CASES = [
    ("W4 projection, tangent", (32, 160, 14, 14), 320, 20, 2),
    ("W4 projection, weight tangent", (4, 160, 14, 14), 2560, 20, 2),
    ("W4 projection, K in input channels", (4, 1280, 14, 14), 320, 20, 2),
    ("bottleneck reduce", (32, 320, 14, 14), 160, 20, 1),
    ("bottleneck expand", (32, 160, 14, 14), 320, 20, 1),
    ("wide groups (torch's path)", (8, 640, 14, 14), 1280, 20, 1),
]


def pointwise_inputs(shape, co, groups, stride):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    w = torch.randn(co, shape[1] // groups, 1, 1, generator=g)
    args = ((stride, stride), (0, 0), (1, 1), groups)
    go = torch.randn(torch.nn.functional.conv2d(x, w, None, *args).shape, generator=g)
    return x, w, go, args


def pointwise_runs(x, w, go, args) -> dict:
    """op -> (torch's call, the conv engine's call) for the forward, input and weight gradient."""
    from fastcurv.backends.fused import conv

    F = torch.nn.functional
    return {"conv2d": (lambda: F.conv2d(x, w, None, *args), lambda: conv.conv2d(x, w, None, *args)),
            "conv2d_input": (lambda: torch.nn.grad.conv2d_input(x.shape, w, go, *args),
                             lambda: conv.conv2d_input(x.shape, w, go, *args)),
            "conv2d_weight": (lambda: torch.nn.grad.conv2d_weight(x, w.shape, go, *args),
                              lambda: conv.conv2d_weight(x, w.shape, go, *args))}


@pytest.mark.parametrize("impl", ["torch", "fastcurv"])
@pytest.mark.parametrize("case", POINTWISE_CASES[:2], ids=lambda c: c[0].split(",")[0].replace(" ", "-") + str(c[1][0]))
def test_pointwise_conv(benchmark, case, impl):
    runs = pointwise_runs(*pointwise_inputs(*case[1:]))
    benchmark.group = f"1x1 conv {case[0]}"

    def all_three():
        for pair in runs.values():
            pair[impl == "fastcurv"]()

    benchmark(all_three)


class BottleneckBlock(torch.nn.Module):
    """1x1 conv c -> m, 3x3 conv m -> m (stride), 1x1 conv m -> cout, each with eval BatchNorm,
    ReLU between; plus the input, or its 1x1-conv projection; then ReLU."""

    def __init__(self, c, m, cout, stride=1):
        super().__init__()
        nn = torch.nn
        self.body = nn.Sequential(nn.Conv2d(c, m, 1, bias=False), nn.BatchNorm2d(m), nn.ReLU(),
                                  nn.Conv2d(m, m, 3, stride, 1, bias=False), nn.BatchNorm2d(m), nn.ReLU(),
                                  nn.Conv2d(m, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = (None if stride == 1 and cout == c else
                     nn.Sequential(nn.Conv2d(c, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x):
        return torch.relu(self.body(x) + (x if self.skip is None else self.skip(x)))


def bottleneck_resnet():
    """A small bottleneck ResNet on 1x28x28: a 16-channel stem with max pooling, blocks 16 -> 8 -> 8 -> 16
    (identity skip) and 16 -> 8 -> 8 -> 32 (stride 2, 1x1 projection skip), global average pooling, 10 classes."""
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         BottleneckBlock(16, 8, 16), BottleneckBlock(16, 8, 32, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 10))


def pointwise_engine(repeat: int, R: int = 20, N: int = 200) -> list[dict]:
    """The fused engine's matvecs (K=1, 8) and gradient on W4 and a bottleneck ResNet, with the 1x1
    convolutions as matmuls against torch's convolutions, timed in alternation (best of ``repeat``)."""
    from fastcurv.backends.fused import conv

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from hvp_json import W4ResNet, load_batch

    x, y, source = load_batch(N, flatten=False)
    plain = conv._plain
    res = []
    for name, factory in (("W4", W4ResNet), ("bottleneck ResNet", bottleneck_resnet)):
        torch.manual_seed(0)
        op = fastcurv.HessianOperator([factory().eval() for _ in range(R)], (x, y), backend="fused")
        calls = {f"matvec K={K}": (lambda V=torch.randn(R, K, op.P): op.matvec(V)) for K in (1, 8)}
        calls["gradient"] = op.loss_and_gradient
        with fastcurv.heap_reuse():
            for what, call in calls.items():
                best = {}
                try:
                    for rep in range(repeat + 1):  # the first round warms up
                        for matmuls in (False, True):
                            conv._plain = plain if matmuls else (lambda *a: False)  # False: torch's convolutions
                            t = time.perf_counter()
                            call()
                            if rep:
                                best[matmuls] = min(best.get(matmuls, float("inf")), time.perf_counter() - t)
                finally:
                    conv._plain = plain
                res.append(dict(op=f"fused {what}", model=name, R=R, N=N, data=source, torch_convs_s=best[False],
                                matmuls_s=best[True], time_ratio=best[True] / best[False]))
                print(f"{name:18s} {what:11s} 1x1 as matmuls {best[True]:6.3f} s, torch's convolutions {best[False]:6.3f} s"
                      f"   {best[True] / best[False]:5.3f}x the time")
    return res


def pointwise(repeat: int) -> list[dict]:
    res = []
    for name, *case in POINTWISE_CASES:
        x, w, go, args = pointwise_inputs(*case)
        for op, (ref, ours) in pointwise_runs(x, w, go, args).items():
            t_ref, t_ours = _time(ref, repeat), _time(ours, repeat)
            res.append(dict(op=op, case=name, input=list(case[0]), out_channels=case[1], groups=case[2], stride=case[3],
                            torch_ms=t_ref * 1e3, fastcurv_ms=t_ours * 1e3, speedup=t_ref / t_ours))
            print(f"{name:36s} {op:13s} torch {t_ref * 1e3:7.3f} ms, fastcurv {t_ours * 1e3:7.3f} ms   x{t_ref / t_ours:5.2f}")
    return res + pointwise_engine(max(3, repeat // 3))


# ----------------------------------------------------------------------------- group_conv widths

# (B, G, C, O, H = W, kernel): groups of C -> O channels, 20 replicas; the first four W4's and W3's
# R-products (K=8 probes as samples, as output or as input channels), then wider and larger ones
GROUP_CONV_CASES = [(32, 20, 8, 8, 14, 3), (4, 20, 8, 64, 14, 3), (4, 20, 64, 8, 14, 3), (32, 20, 8, 16, 14, 3),
                    (32, 20, 8, 8, 7, 3), (32, 20, 4, 4, 28, 3), (32, 20, 3, 8, 32, 3), (8, 20, 8, 8, 32, 5),
                    (32, 20, 16, 16, 7, 3), (32, 20, 16, 16, 14, 3), (8, 20, 16, 16, 28, 3), (32, 20, 32, 32, 7, 3)]


def group_conv_sweep(repeat: int) -> list[dict]:
    """group_conv and group_conv_wgrad against torch's grouped convolutions (``F.conv2d``,
    ``conv2d_weight``, oneDNN on the CPU) over channel counts and map sizes, in GFLOP/s; backs
    ``NARROW_CHANNELS`` in ``fastcurv/ops/group_conv.py``."""
    F = torch.nn.functional
    res = []
    g = torch.Generator().manual_seed(0)
    for B, G, C, O, H, k in GROUP_CONV_CASES:
        p = k // 2
        x, w = torch.randn(B, G * C, H, H, generator=g), torch.randn(G * O, C, k, k, generator=g)
        go = torch.randn(B, G * O, H, H, generator=g)
        x6, w5, g6 = x.view(B, G, 1, C, H, H), w.view(G, O, C, k, k), go.view(B, G, 1, O, H, H)
        out, out_w = torch.empty_like(g6), torch.empty(G, 1, O, 1, C, k, k)
        flops = 2 * B * G * O * C * k * k * H * H
        runs = {"forward": (lambda: F.conv2d(x, w, None, 1, p, 1, G), lambda: group_conv(x6, w5, out, (p, p))),
                "weight_gradient": (lambda: torch.nn.grad.conv2d_weight(x, w.shape, go, 1, p, 1, G),
                                    lambda: group_conv_wgrad(x6, g6, out_w, (p, p)))}
        with fastcurv.heap_reuse():
            for op, (ref, ours) in runs.items():
                t_ref, t_ours = _time(ref, repeat), _time(ours, repeat)
                res.append(dict(op=op, B=B, G=G, C=C, O=O, H=H, kernel=k, torch_gflops=flops / t_ref / 1e9,
                                fastcurv_gflops=flops / t_ours / 1e9, speedup=t_ref / t_ours))
                print(f"B={B:2d} G={G} {C:2d} -> {O:3d} ch {H:2d}x{H:<2d} {k}x{k} {op:15s} torch {flops / t_ref / 1e9:6.1f} GFLOP/s, "
                      f"fastcurv {flops / t_ours / 1e9:6.1f}   x{t_ref / t_ours:5.2f}")
    return res


# ----------------------------------------------------------------------------- script mode


def _time(run, repeat: int) -> float:
    run()  # warm-up / compilation
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        run()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=None, help="write the results to this file")
    ap.add_argument("--full", action="store_true", help="W1 sizes (R=100, N=1000, K=8)")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--ops", default=None, help=f"comma-separated subset of: {', '.join(REFERENCES)}")
    ap.add_argument("--csr-sweep", action="store_true", help="only the sparse-input layer against dense GEMMs")
    ap.add_argument("--csr-hessian", action="store_true", help="only the sparse-input layer at the Hessian engine's sizes")
    ap.add_argument("--relu-sweep", action="store_true", help="only a hidden ReLU layer's matvec products, sparse against dense")
    ap.add_argument("--pointwise", action="store_true", help="only the conv engine's 1x1 convolutions against torch's")
    ap.add_argument("--group-conv", action="store_true", help="only group_conv against torch's grouped convolutions, over widths")
    args = ap.parse_args(argv)
    if args.csr_sweep or args.csr_hessian or args.relu_sweep or args.pointwise or args.group_conv:
        res = (csr_sweep(args.repeat) if args.csr_sweep else csr_hessian(args.repeat) if args.csr_hessian else
               relu_sweep(args.repeat) if args.relu_sweep else pointwise(args.repeat) if args.pointwise else
               group_conv_sweep(args.repeat))
        if args.json:
            with open(args.json, "w") as f:
                threads = 1 if args.csr_sweep else torch.get_num_threads()
                json.dump(dict(meta=dict(torch=torch.__version__, threads=threads), results=res), f, indent=2)
        return 0
    ops = list(REFERENCES) if args.ops is None else args.ops.split(",")
    unknown = sorted(set(ops) - set(REFERENCES))
    if unknown:
        ap.error(f"unknown ops {unknown}; choose from {list(REFERENCES)}")
    results = []
    for device in ["cpu"] + (["cuda"] if HAVE_CUDA else []):
        for op in ops:
            inputs = make_inputs(op, device, full=args.full or None)
            times = {name: _time(_synced(fn, inputs, device), args.repeat) for name, fn in implementations(op, device).items()}
            base = times["torch"]
            for name, t in times.items():
                results.append(dict(op=op, device=device, impl=name, median_ms=t * 1e3, speedup_vs_torch=base / t))
                print(f"{op:16s} {device:4s} {name:7s} {t * 1e3:9.3f} ms   x{base / t:5.2f} vs torch")
    meta = dict(sizes=sizes(args.full or None), torch=torch.__version__, fastcurv=fastcurv.__version__,
                threads=torch.get_num_threads(), cuda=torch.cuda.get_device_name() if HAVE_CUDA else None)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
