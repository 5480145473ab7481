"""Core benchmark: Hessian-vector products for R replicas, as ratios to one gradient for all R.

Reference workload W1: R=100 MLPs 784-128-128-10, B=1000 MNIST images (../shared/data/mnist or
--data; synthetic only when no file is found, and then it says so), cross-entropy.
W3 (``--workload W3``): R=20 small CNNs (two conv layers with eval BatchNorm, ReLU, max pooling,
then a linear head) on B MNIST images 1x28x28.
W4 (``--workload W4``): R=20 small ResNets (conv-BN-ReLU-maxpool stem, a basic block with an
identity skip, one with a strided 1x1-conv projection skip, global average pooling, linear head;
eval BatchNorm) on B MNIST images: the fused engine runs them as torch.fx-traced DAGs.

    python benchmarks/hvp_json.py --out benchmarks/results/hvp.json            # CPU, 2 cores
    python benchmarks/hvp_json.py --device cuda --out hvp_gpu.json             # GPU
    python benchmarks/hvp_json.py --workload W3 --out benchmarks/results/hvp_w3.json
    python benchmarks/hvp_json.py --workload W4 --batch 200 --out benchmarks/results/hvp_w4.json

Reports, from one run: one gradient for all R (the unit: the fastest of a per-model loop and the
batched gradients), one matvec for all R per backend with
K=1 and K=8 probes (on W1 the fused engine's default multiplies only the nonzero pixels in the first
layer, ``fastcurv.ops.csr_linear``, and takes the hidden layer's products from its ReLU patterns,
``csr_masked_linear``; also timed: ``sparse_input=False``, dense GEMMs without the
input's all-zero pixel columns, and with ``drop_zero_columns=False`` too, all columns;
``sparse_hidden=False``, the hidden layer's GEMMs; on W3 and W4 the default runs the first
convolution's R-passes at the max pooling's winning positions, ``fastcurv.ops.sampled_conv``, also
timed: ``pooled_stem=False``, at every position), a per-model autograd loop (double backward through a retained graph, built
once), the func backend with its linearizations compiled (``backend_options={"compile": True}``;
the first matvec, which compiles, is reported apart; measured last, after the jobs; left out, with
func's warning in ``func_compiled_skipped``, where func's linearizations would exceed its memory
budget, so that it does not reuse, hence not compile, them: W3 and W4 at B=200; or where
torch.compile failed, e.g. without a working C++ compiler, and func ran them eagerly), and the
default ``batched_sharpness`` job per backend (best of --job-repeats; on ReLU MLPs and conv nets of
piecewise-linear layers the fused engine computes the trace exactly, so the fused job is also run
with func's deflated trace estimator; ``exact_trace_fused``: that exact trace alone, and
``exact_trace_over_fused_K10_matvec`` against the one K=10 matvec of the estimator's probes);
other times are the best of --repeats, in the steady state of fastcurv's jobs (the repeats run inside
one ``heap_reuse``: each call reuses the pages the one before freed; each job manages its own, as
for a user); ``standalone_seconds`` times the fused gradient and matvecs as single calls, which pay
a page fault per fresh 4 KiB page.
``paired_ratio_to_gradient``: the fused matvec per probe over the fused batched gradient, the two
timed in alternation (the separate timings above can catch the machine in different moods).
``flops_hvp_per_probe_over_gradient`` (W1) is the FLOP model's floor for the per-probe ratio: the
fused matvec's multiply-adds per probe over those of the fused gradient (both from the nonzero
inputs in the first layer, with the hidden layer's GEMMs dense).
``peak_memory_MiB``: per measurement, the most memory in use during it above what was in use
before it (``peak_memory.py``: on the CPU the resident set, on a GPU the allocator's peak); the
operators' cached per-batch state is built inside it, a per-model loop's retained graphs too.
``gflops_*``: the multiply-adds each variant does (read from its cached state,
``engine_first_layer_inputs_and_hidden_macs``; W3/W4: ``first_conv_positions_done``; W1's sparse hidden products: by the fraction of
nonzero ReLU outputs, ``hidden_relu_density``) over its time, as fractions of the same run's sgemm
(a 2048-square matmul) and, on W1, of ``bmm_gflops`` (torch.bmm on the hidden layer's K=8 shape,
``[R, 8B, H] @ [R, H, H]``: on a GPU the engine's own GEMMs); ``gflops_fused_K8_dense_hidden_equivalent``:
the default's time against the dense hidden layer's multiply-adds.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
import warnings

import torch
from torch import nn

import fastcurv

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peak_memory  # noqa: E402


def load_batch(n, data_root=None, flatten=True):
    try:
        from fastcurv.datasets import load_mnist

        d = load_mnist(root=data_root, n_train=n, flatten=flatten)
        return d.x_train, d.y_train, "MNIST"
    except (FileNotFoundError, OSError, ImportError) as exc:
        print(f"MNIST not found ({exc}); using SYNTHETIC data", file=sys.stderr)
        g = torch.Generator().manual_seed(0)
        x = torch.rand(n, 784, generator=g)
        return (x if flatten else x.view(n, 1, 28, 28)), torch.randint(0, 10, (n,), generator=g), "synthetic"


def w3_cnn():
    """W3's small CNN: two 3x3 conv layers with BatchNorm (eval statistics), ReLU and 2x2 max
    pooling, then a linear head (28x28 -> 8x14x14 -> 16x7x7 -> 10)."""
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(16 * 7 * 7, 10))


# multiply-accumulates per sample of W3's parametrized layers (conv1, conv2, head), in order
W3_MACS = [8 * 1 * 9 * 28 * 28, 16 * 8 * 9 * 14 * 14, 784 * 10]


class W4Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus the input (or its strided 1x1-conv projection), then ReLU."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.proj = None
        if stride != 1 or cin != cout:
            self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.b1(self.c1(x)))
        out = self.b2(self.c2(out))
        return torch.relu(out + (x if self.proj is None else self.proj(x)))


class W4ResNet(nn.Module):
    """W4's small ResNet: 28x28 -> stem 8x28x28 -> pool 8x14x14 -> block 8x14x14 -> block 16x7x7
    -> global average pool 16 -> 10."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.block1, self.block2 = W4Block(8, 8), W4Block(8, 16, stride=2)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.block2(self.block1(self.stem(x)))), 1))


# W4's conv and linear layers in forward order (stem, block1 c1/c2, block2 c1/c2/projection, head);
# the flop model below counts the projection like a layer whose input has a tangent
W4_MACS = [8 * 9 * 28 * 28, 8 * 8 * 9 * 196, 8 * 8 * 9 * 196, 16 * 8 * 9 * 49, 16 * 16 * 9 * 49, 16 * 8 * 49, 16 * 10]


def best(fn, repeats, sync, steady=True):
    """The fastest of ``repeats`` calls of ``fn`` after one warm-up call. ``steady``: all of them
    inside one ``fastcurv.heap_reuse``, the steady state of fastcurv's jobs, where each call reuses
    the pages the one before freed (else single calls, which pay a page fault per fresh 4 KiB page)."""
    with fastcurv.heap_reuse() if steady else contextlib.nullcontext():
        fn()
        sync()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t)
    return min(times)


def best_alternating(f, g, repeats, sync):
    """``(fastest f, fastest g)`` over ``repeats`` rounds that call ``f`` then ``g`` (after one
    warm-up round), inside one ``heap_reuse``: a ratio of the two is not skewed by the machine
    drifting between two separate measurements."""
    tf, tg = [], []
    with fastcurv.heap_reuse():
        f(), g()
        sync()
        for _ in range(repeats):
            for fn, ts in ((f, tf), (g, tg)):
                t = time.perf_counter()
                fn()
                sync()
                ts.append(time.perf_counter() - t)
    return min(tf), min(tg)


def hvp_flops(macs):
    """Flops of one fused matvec per sample, replica and probe, from the multiply-accumulates per
    sample of each layer with parameters (``macs``, in order; I*O for a Linear layer, the
    multiply-accumulates per sample for a conv layer): forward
    tangent 2 (+2 when the input has a tangent), weight HVP 2 (+2), input tangent 4 after the first
    layer, each times the layer's macs. Element-wise work is not counted."""
    return sum((4 + 4 * (i > 0)) * m + (4 * m if i > 0 else 0) for i, m in enumerate(macs))


def gradient_flops(macs):
    """Flops of one gradient per sample and replica: forward and weight gradient 2 each, input
    gradient 2 after the first layer, each times the layer's macs."""
    return sum((4 + 2 * (i > 0)) * m for i, m in enumerate(macs))


def sgemm_gflops(device, sync, n=2048):
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    t = best(lambda: a @ b, 3, sync)
    return 2 * n**3 / t / 1e9


def bmm_gflops(device, sync, R, M, H):
    """torch.bmm's GFLOP/s on ``[R, M, H] @ [R, H, H]``: at ``M = 8 * batch``, the hidden layer's
    product with the K=8 probes' tangents stacked with the batch rows."""
    a, b = torch.randn(R, M, H, device=device), torch.randn(R, H, H, device=device)
    t = best(lambda: torch.bmm(a, b), 3, sync)
    return 2 * R * M * H * H / t / 1e9


def stem_fraction(op, x, y) -> float:
    """The fraction of the first convolution's output positions at which the fused conv engine ``op``
    computes its R-passes (read from its cached state, or one sample's where nothing was cached):
    the pooled positions over all where its stem runs pooled (``pooled_stem``), else 1."""
    cached = next(iter(op.backend._cache.values()), None)
    maps, st = op.backend._maps, cached[1] if cached is not None else op.backend._primal(x[:1], y[:1], None)
    for m in st.stems:
        if maps.stems[m][0] == 0:
            return st.meta[(m, "out")].numel() / st.meta[m].numel()
    return 1.0


def engine_work(op, nonzeros, kept, n_in, H, density):
    """``(first-layer inputs per image, hidden-layer multiply-adds per image)`` that the fused W1
    operator ``op`` does, read from its cached per-batch state: the nonzero pixels with the sparse
    first layer (CPU), else the columns it keeps (or all ``n_in``); the hidden layer's products from
    the ReLU pattern before it (half of them, scaled by ``density["before"]``) and after it (the other
    half, by ``density["after"]``) where the engine built their CSR forms, else the dense ``H * H``."""
    st = next(iter(op.backend._cache.values()))[1]
    first = nonzeros if st.csr is not None else (n_in if st.keep is None else kept)
    half_in = density["before"] if st.sparse_in[1] is not None else 1.0
    half_out = density["after"] if st.sparse_out[1] is not None else 1.0
    return first, H * H * (half_in + half_out) / 2


def func_compiled_times(models, x, y, repeats, sync):
    """``(seconds, skipped)``: the func backend with each batch's linearization run through
    torch.compile, ``seconds`` holding its first matvec (which compiles) and the best of ``repeats``
    K=1 and K=8 matvecs, ``skipped`` None. Where nothing ran compiled, ``seconds`` is empty and
    ``skipped`` says why: func's warning where its linearizations would exceed its memory budget,
    so that it does not reuse, hence not compile, them; ``FuncBackend.compile_error`` where
    torch.compile failed and func ran them eagerly."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opc = fastcurv.HessianOperator(models, (x, y), backend="func", backend_options={"compile": True})
    if not opc.backend.reuse:
        return {}, str(caught[-1].message) if caught else "func does not reuse linearizations here"
    R, P, dev = len(models), opc.P, x.device
    seconds = {}
    V = torch.randn(R, 1, P, device=dev)
    t0 = time.perf_counter()
    opc.matvec(V)
    sync()
    seconds["func_compile_first_matvec"] = time.perf_counter() - t0
    for K in (1, 8):
        if opc.backend.compile_error is not None:
            break
        V = torch.randn(R, K, P, device=dev)
        seconds[f"hvp_func_compiled_K{K}"] = best(lambda: opc.matvec(V), repeats, sync)
    if opc.backend.compile_error is not None:  # eager times: not reported as compiled ones
        return {}, opc.backend.compile_error
    return seconds, None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=("W1", "W3", "W4"), default="W1",
                   help="W1: MLPs 784-H-H-10 (default); W3: small CNNs with BatchNorm; W4: small ResNets (R=20 by default)")
    p.add_argument("--replicas", type=int, default=None, help="R (default 100 for W1, 20 for W3)")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data", default=None, help="MNIST root (default: search ../shared/data, FASTCURV_DATA)")
    p.add_argument("--job-repeats", type=int, default=2, help="runs of each batched_sharpness job (the best is reported)")
    p.add_argument("--skip-slow", action="store_true", help="skip the per-model loop and the func job")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
    if a.replicas is None:
        a.replicas = 100 if a.workload == "W1" else 20
    x, y, source = load_batch(a.batch, a.data, flatten=a.workload == "W1")
    x, y = x.to(dev), y.to(dev)
    torch.manual_seed(0)
    H = a.hidden
    if a.workload == "W1":
        models = [nn.Sequential(nn.Linear(784, H), nn.ReLU(), nn.Linear(H, H), nn.ReLU(), nn.Linear(H, 10)).to(dev) for _ in range(a.replicas)]
        arch = f"MLP 784-{H}-{H}-10"
    elif a.workload == "W3":
        models = [w3_cnn().to(dev).eval() for _ in range(a.replicas)]  # eval: BatchNorm running statistics
        arch = "CNN conv8-BN-ReLU-pool-conv16-BN-ReLU-pool-linear10"
    else:
        models = [W4ResNet().to(dev).eval() for _ in range(a.replicas)]
        arch = "ResNet stem8-pool, block8 (identity skip), block16/2 (1x1 projection skip), avgpool, linear10"
    R = a.replicas
    name = "W2" if a.workload == "W1" and (H, R) == (512, 20) else a.workload  # W2: W1's MLPs, wider and fewer
    res = {"workload": f"{name}: R={R} {arch}, B={a.batch} {source}", "device": str(dev), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(), "seconds": {}, "ratio_to_gradient": {}}
    if dev.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(dev)
    peaks = res["peak_memory_MiB"] = {}

    def timed(name, fn, op=None):
        """``best`` of ``fn``, its peak memory above the memory in use before it (``op``'s cached
        per-batch state dropped first, so that its warm-up call builds it again and it counts) in
        ``peaks[name]``. One call runs before, so that modules it loads on first use do not count."""
        fn()
        if op is not None:
            op.backend.clear_cache()
        with peak_memory.measure(dev) as peak:
            t = best(fn, a.repeats, sync)
        peaks[name] = peak.MiB
        return t

    ops = {b: fastcurv.HessianOperator(models, (x, y), backend=b) for b in ("fused", "func")}
    # the unit is the fastest way we know to get one gradient for every replica
    params = [list(m.parameters()) for m in models]

    def grad_loop():
        for m, p in zip(models, params):
            torch.autograd.grad(nn.functional.cross_entropy(m(x), y), p)

    res["seconds"]["gradient_per_model_loop"] = timed("gradient_per_model_loop", grad_loop)
    for b in ("fused", "func"):
        res["seconds"][f"gradient_batched_{b}"] = timed(f"gradient_batched_{b}", ops[b].loss_and_gradient, ops[b])
    unit = min(res["seconds"][k] for k in ("gradient_per_model_loop", "gradient_batched_fused", "gradient_batched_func"))
    res["seconds"]["gradient_all_R"] = unit
    res["backend_auto"] = fastcurv.HessianOperator(models, (x, y)).backend_name
    del ops  # their cached state is not held during the jobs
    # the default job per backend; "fused_deflated": the fused engine with the trace estimator that
    # func uses (Krylov-deflated probes) instead of the exact trace it picks for ReLU MLPs and conv nets
    jobs = {"fused": dict(backend="fused"), "fused_deflated": dict(backend="fused", trace_method="deflated"),
            "func": dict(backend="func")}
    for b, kw in jobs.items():
        if a.skip_slow and b != "fused":
            continue
        runs, job_peaks = [], []
        for _ in range(a.job_repeats):
            with peak_memory.measure(dev) as peak:
                t0 = time.perf_counter()
                out = fastcurv.batched_sharpness(models, (x, y), progress=False, **kw)
                sync()
                runs.append(time.perf_counter() - t0)
            job_peaks.append(peak.MiB)
        peaks[f"batched_sharpness_{b}"] = job_peaks[-1]  # the first run also loads modules
        res["seconds"][f"batched_sharpness_{b}"] = min(runs)
        res["seconds"][f"batched_sharpness_{b}_all"] = runs
        res[f"batched_sharpness_{b}_matvecs"] = out.num_matvecs
        res[f"batched_sharpness_{b}_lambda_max_iters_mean"] = float(out.iterations["lambda_max"].float().mean())
        res[f"batched_sharpness_{b}_converged"] = int(out.converged["lambda_max"].sum())
        res[f"batched_sharpness_{b}_trace_rel_stderr_median"] = float((out.stderr["trace"] / out["trace"].abs()).median())
    # the unit again after the jobs (the fastest of both measurements), so that a slower spell of
    # the machine during the first measurement does not flatter the jobs
    res["seconds"]["gradient_per_model_loop_after_jobs"] = best(grad_loop, a.repeats, sync)
    unit = min(unit, res["seconds"]["gradient_per_model_loop_after_jobs"])
    res["seconds"]["gradient_all_R"] = unit
    for b in jobs:
        if f"batched_sharpness_{b}" in res["seconds"]:
            res["ratio_to_gradient"][f"batched_sharpness_{b}"] = res["seconds"][f"batched_sharpness_{b}"] / unit
    if "batched_sharpness_func" in res["seconds"]:
        for b in ("fused", "fused_deflated"):
            res[f"batched_sharpness_{b}_speedup_over_func"] = res["seconds"]["batched_sharpness_func"] / res["seconds"][f"batched_sharpness_{b}"]
    ops = {b: fastcurv.HessianOperator(models, (x, y), backend=b) for b in ("fused", "func")}
    if a.workload == "W1":  # the same engine with dense first-layer GEMMs: without the zero columns, and all
        ops["fused_dense_input"] = fastcurv.HessianOperator(models, (x, y), backend="fused",
                                                            backend_options={"sparse_input": False})
        ops["fused_all_columns"] = fastcurv.HessianOperator(
            models, (x, y), backend="fused", backend_options={"sparse_input": False, "drop_zero_columns": False})
        # and with dense GEMMs in the hidden layer (its products from the ReLU patterns are the default)
        ops["fused_dense_hidden"] = fastcurv.HessianOperator(models, (x, y), backend="fused",
                                                             backend_options={"sparse_hidden": False})
    else:  # the conv nets' first convolution, BatchNorm and ReLU at every position before the pooling
        ops["fused_full_stem"] = fastcurv.HessianOperator(models, (x, y), backend="fused",
                                                          backend_options={"pooled_stem": False})
    P = ops["fused"].P
    for K in (1, 8):
        V = torch.randn(R, K, P, device=dev)
        for b, op in ops.items():
            if b == "func" and K > 1 and a.skip_slow:
                continue
            t = timed(f"hvp_{b}_K{K}", lambda: op.matvec(V), op)
            res["seconds"][f"hvp_{b}_K{K}"] = t
            res["ratio_to_gradient"][f"hvp_{b}_K{K}_per_probe"] = t / K / unit
    # the exact trace (ReLU MLPs and conv nets: no probes), per gradient and against a 10-probe matvec,
    # the deflated estimator's probes in one matvec
    if ops["fused"].exact_trace_support()[0]:
        res["seconds"]["exact_trace_fused"] = timed("exact_trace_fused", ops["fused"].exact_trace, ops["fused"])
        res["ratio_to_gradient"]["exact_trace_fused"] = res["seconds"]["exact_trace_fused"] / unit
        V = torch.randn(R, 10, P, device=dev)
        res["seconds"]["hvp_fused_K10"] = timed("hvp_fused_K10", lambda: ops["fused"].matvec(V), ops["fused"])
        res["exact_trace_over_fused_K10_matvec"] = res["seconds"]["exact_trace_fused"] / res["seconds"]["hvp_fused_K10"]
        del V
    # the fused matvecs over the fused batched gradient, the two timed in alternation
    res["paired_ratio_to_gradient"] = {}
    for K in (1, 8):
        V = torch.randn(R, K, P, device=dev)
        tg, tm = best_alternating(lambda: ops["fused"].loss_and_gradient(), lambda: ops["fused"].matvec(V), a.repeats, sync)
        res["paired_ratio_to_gradient"][f"hvp_fused_K{K}_per_probe_over_batched_gradient"] = tm / K / tg
    # W1's first layer counts only the multiply-adds the engine does: with the sparse input (default
    # on the CPU) the nonzero pixels of each image, without it the columns not zero in every image.
    res["sgemm_gflops"] = sgemm_gflops(dev, sync)
    if a.workload == "W1":  # the engine's hidden-layer GEMM at K=8 (on a GPU, what the matvec runs)
        res["bmm_gflops"] = bmm_gflops(dev, sync, R, 8 * a.batch, H)

    def gflops(first_layer_inputs, hidden_macs, seconds):
        """W1: ``first_layer_inputs`` per image, ``hidden_macs``; W3/W4: ``first_layer_inputs`` the
        fraction of the first convolution's output positions done."""
        if a.workload == "W1":
            macs = [first_layer_inputs * H, hidden_macs, H * 10]
        else:
            macs = list({"W3": W3_MACS, "W4": W4_MACS}[a.workload])
            macs[0] *= first_layer_inputs
        return 8 * hvp_flops(macs) * a.batch * R / seconds / 1e9

    if a.workload != "W1":
        variants = {b: (stem_fraction(ops[b], x, y), None) for b in ("fused", "fused_full_stem")}
        res["first_conv_positions_done"] = {b: v[0] for b, v in variants.items()}
    if a.workload == "W1":
        res["first_layer_nonzeros_per_image"] = float((x != 0).sum(1).double().mean())
        res["first_layer_inputs_kept"] = int((x != 0).any(0).sum())
        # the hidden layer's products from the ReLU patterns: half of its multiply-adds scale with the
        # fraction of nonzero ReLU outputs before it, half with those after it
        with torch.no_grad():
            a1 = torch.stack([m[1](m[0](x)) for m in models])
            a2 = torch.stack([m[3](m[2](a1[r])) for r, m in enumerate(models)])
        res["hidden_relu_density"] = {"before": float((a1 != 0).double().mean()), "after": float((a2 != 0).double().mean())}
        nz, kept = res["first_layer_nonzeros_per_image"], res["first_layer_inputs_kept"]
        density = res["hidden_relu_density"]
        variants = {b: engine_work(ops[b], nz, kept, x.shape[1], H, density)
                    for b in ("fused", "fused_dense_input", "fused_all_columns", "fused_dense_hidden")}
        res["engine_first_layer_inputs_and_hidden_macs"] = variants
        # the same matvec's time against the work of the dense hidden layer's GEMMs
        res["gflops_fused_K8_dense_hidden_equivalent"] = gflops(variants["fused"][0], H * H, res["seconds"]["hvp_fused_K8"])
        # the gradient: forward and weight gradient per layer, input gradient after the first
        macs = [variants["fused"][0] * H, H * H, H * 10]
        res["flops_hvp_per_probe_over_gradient"] = hvp_flops(macs) / gradient_flops(macs)
    for b, (first, hidden) in variants.items():
        res[f"gflops_{b}_K8"] = gflops(first, hidden, res["seconds"][f"hvp_{b}_K8"])
        res[f"{b}_K8_fraction_of_sgemm"] = res[f"gflops_{b}_K8"] / res["sgemm_gflops"]
        if "bmm_gflops" in res:
            res[f"{b}_K8_fraction_of_bmm"] = res[f"gflops_{b}_K8"] / res["bmm_gflops"]
    if not a.skip_slow:
        with peak_memory.measure(dev) as peak:  # its retained graphs count
            graphs = []
            for m in models:
                params = list(m.parameters())
                g = torch.autograd.grad(nn.functional.cross_entropy(m(x), y), params, create_graph=True)
                graphs.append((params, g))
            vs = [[torch.randn_like(p) for p in m.parameters()] for m in models]

            def loop():
                for (params, g), v in zip(graphs, vs):
                    torch.autograd.grad(g, params, grad_outputs=v, retain_graph=True)

            t = best(loop, a.repeats, sync)
        peaks["hvp_per_model_autograd_loop"] = peak.MiB
        res["seconds"]["hvp_per_model_autograd_loop"] = t
        res["ratio_to_gradient"]["hvp_per_model_autograd_loop"] = t / unit
        res["fused_K1_speedup_over_loop"] = t / res["seconds"]["hvp_fused_K1"]
        del graphs, vs, loop  # 100 retained graphs: not held during the jobs
    if not a.skip_slow:  # the func backend with each batch's linearization run through torch.compile
        times, skipped = func_compiled_times(models, x, y, a.repeats, sync)
        if skipped is not None:
            res["func_compiled_skipped"] = skipped
        res["seconds"].update(times)
        for K in (1, 8):
            if f"hvp_func_compiled_K{K}" in times:
                res["ratio_to_gradient"][f"hvp_func_compiled_K{K}_per_probe"] = times[f"hvp_func_compiled_K{K}"] / K / unit
    # the same fused calls standalone (a user's single call): fresh pages each time
    op = fastcurv.HessianOperator(models, (x, y), backend="fused")
    res["standalone_seconds"] = {"gradient_batched_fused": best(lambda: op.loss_and_gradient(), a.repeats, sync, steady=False)}
    for K in (1, 8):
        V = torch.randn(R, K, op.P, device=dev)
        res["standalone_seconds"][f"hvp_fused_K{K}"] = best(lambda: op.matvec(V), a.repeats, sync, steady=False)
    del op
    unit_alone = min(res["standalone_seconds"]["gradient_batched_fused"], res["seconds"]["gradient_per_model_loop"])
    res["standalone_ratio_to_gradient"] = {f"hvp_fused_K{K}_per_probe": res["standalone_seconds"][f"hvp_fused_K{K}"] / K / unit_alone
                                           for K in (1, 8)}
    text = json.dumps(res, indent=2)
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
