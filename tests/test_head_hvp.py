"""fastcurv.ops.head_hvp: the Hessian-vector product through a network's last Linear layer and its
loss, fused.

* The torch reference against torch.func: the directional derivative of the gradient of
  loss(W relu(zp) + b) with respect to (W, b, zp), so the formula itself is checked.
* The C++ kernel (every ISA variant) against the reference on random inputs: every combination of
  the optional operands, strided probe blocks and outputs, accumulation, shapes with vector tails
  and output counts that are not multiples of four; clear errors on bad input.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

from fastcurv import _ext
from fastcurv.ops import head_hvp, head_hvp_reference

pytestmark = pytest.mark.usefixtures("one_thread")

needs_ext = pytest.mark.skipif(not _ext.has_kernel("head_hvp", "cpu"), reason="C++ extension not loaded (fastcurv._ext.extension_error() says why)")
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-12, atol=1e-12)}


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_reference_is_the_derivative_of_the_gradient(loss):
    """For one replica: zp -> a = relu(zp) -> z = W a + b -> loss. Along the tangent (dW, db, dzp),
    the derivative of (dL/dW, dL/db, dL/dzp) is (out_w, out_b, rg) with ra = relu'(zp) dzp, delta =
    dL/dz and d1 = relu'(zp) (relu'' = 0 almost everywhere)."""
    N, K, O, I = 7, 3, 4, 5
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    zp, W, b = rnd(N, I), rnd(O, I), rnd(O)
    y = torch.randint(0, O, (N,), generator=gen) if loss == "cross_entropy" else rnd(N, O)

    def lossf(W_, b_, zp_):
        z = torch.relu(zp_) @ W_.T + b_
        return F.cross_entropy(z, y) if loss == "cross_entropy" else ((z - y) ** 2).mean()

    grad = torch.func.grad(lossf, argnums=(0, 1, 2))
    z = torch.relu(zp) @ W.T + b
    if loss == "cross_entropy":
        probs, scale = torch.softmax(z, -1), 1.0 / N
        delta = (probs - F.one_hot(y, O)) * scale
    else:
        probs, scale = None, 2.0 / (N * O)
        delta = scale * (z - y)
    d1 = (zp > 0).double()
    dW, db, dzp = rnd(K, O, I), rnd(K, O), rnd(K, N, I)
    rg, hw, hb = head_hvp_reference(torch.relu(zp)[None], (d1 * dzp).transpose(0, 1)[None], W[None], dW[None], delta[None],
                                    scale, probs=None if probs is None else probs[None], dbias=db[None], d1=d1[None])
    for k in range(K):
        _, (tw, tb, tzp) = torch.func.jvp(grad, (W, b, zp), (dW[k], db[k], dzp[k]))
        torch.testing.assert_close(hw[0, k], tw, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(hb[0, k], tb, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rg[0, :, k], tzp, rtol=1e-12, atol=1e-12)


def inputs(R, N, K, O, I, dtype, seed=0):
    """Operands as the fused engine passes them: the probe blocks and products are views into flat
    [R, K, P] tensors (replica and probe strides), d1 a ReLU / LeakyReLU mask, probs a softmax."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    flat = rnd(R, K, O * I + O + 3)
    d1 = torch.where(torch.rand(R, N, I, generator=gen) > 0.5, 1.0, 0.1).to(dtype)
    return dict(a=rnd(R, N, I), ra=rnd(R, N, K, I), weight=rnd(R, O, I), dweight=flat[..., :O * I].view(R, K, O, I),
                delta=rnd(R, N, O), probs=torch.softmax(rnd(R, N, O) * 3, -1), dbias=flat[..., O * I:O * I + O], d1=d1)


def outputs(R, K, O, I, dtype, seed=1):
    """Product tensors with a stride like the flat result's, holding random values (for accumulate)."""
    gen = torch.Generator().manual_seed(seed)
    flat = torch.randn(R, K, O * I + O + 5, generator=gen, dtype=torch.float64).to(dtype)
    return flat[..., :O * I].view(R, K, O, I), flat[..., O * I + 2:O * I + 2 + O]


SHAPES = [(2, 5, 3, 10, 128), (1, 7, 1, 3, 37), (3, 4, 2, 5, 16), (2, 3, 4, 1, 1), (1, 9, 2, 9, 20), (2, 1, 2, 33, 70)]


@needs_ext
@pytest.mark.parametrize("level", ["0", "1", "2"])  # FASTCURV_CPU_LEVEL: baseline, AVX2, AVX-512 (capped by the CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_matches_reference(shape, dtype, level, monkeypatch):
    """Every combination of probs (cross-entropy or squared error), dbias, d1 and out_b, written
    and accumulated, into strided outputs."""
    monkeypatch.setenv("FASTCURV_CPU_LEVEL", level)
    R, N, K, O, I = shape
    x = inputs(R, N, K, O, I, dtype)
    for probs, dbias, d1, with_b, acc in itertools.product([True, False], repeat=5):
        kw = dict(probs=x["probs"] if probs else None, dbias=x["dbias"] if dbias else None, d1=x["d1"] if d1 else None)
        args = (x["a"], x["ra"], x["weight"], x["dweight"], x["delta"], 0.7)
        ow, ob = outputs(R, K, O, I, dtype)
        ow_ref, ob_ref = ow.clone(), ob.clone()
        got = head_hvp(*args, **kw, out_w=ow, out_b=ob if with_b else None, accumulate=acc)
        with _ext.use_kernels("torch"):
            want = head_hvp_reference(*args, **kw, out_w=ow_ref, out_b=ob_ref if with_b else None, accumulate=acc)
        case = f"probs={probs} dbias={dbias} d1={d1} out_b={with_b} accumulate={acc}"
        assert got[1] is ow and (not with_b or got[2] is ob), case
        for g, w, name in zip(got, want, ("rg", "out_w", "out_b")):
            assert (g is None) == (w is None), f"{name}: {case}"
            if g is not None:
                torch.testing.assert_close(g, w, **TOL[dtype], msg=lambda m: f"{name}, {case}: {m}")


@needs_ext
def test_kernel_edge_values():
    """Zeros everywhere give zeros; a saturated softmax (one-hot probabilities) makes the
    cross-entropy Hessian, hence rd, zero, leaving only the delta terms."""
    R, N, K, O, I = 2, 6, 3, 10, 24
    x = inputs(R, N, K, O, I, torch.float64)
    zeros = {k: torch.zeros_like(v) for k, v in x.items()}
    rg, hw, hb = head_hvp(zeros["a"], zeros["ra"], x["weight"], x["dweight"], zeros["delta"], 1.0, probs=x["probs"],
                          dbias=zeros["dbias"], d1=x["d1"])
    assert rg.abs().max() == 0 and hw.abs().max() == 0 and hb.abs().max() == 0
    onehot = F.one_hot(torch.arange(R * N) % O, O).double().view(R, N, O)
    rg, hw, hb = head_hvp(x["a"], x["ra"], x["weight"], x["dweight"], x["delta"], 1.0, probs=onehot, dbias=x["dbias"])
    assert hb.abs().max() == 0
    torch.testing.assert_close(hw, torch.einsum("rno,rnki->rkoi", x["delta"], x["ra"]))
    torch.testing.assert_close(rg, torch.einsum("rno,rkoi->rnki", x["delta"], x["dweight"]))


@needs_ext
@pytest.mark.parametrize("accumulate", [False, True])
def test_outputs_the_kernel_cannot_write_go_through_scratch(accumulate):
    """Products wanted in layouts whose rows are not contiguous are computed into scratch and
    written (or added) there; inputs in such layouts are copied."""
    R, N, K, O, I = 2, 5, 3, 4, 19
    x = inputs(R, N, K, O, I, torch.float64)
    x["weight"] = x["weight"].mT.contiguous().mT
    ow, ob = outputs(R, K, O, I, torch.float64)
    ow_t, ob_s = ow.mT.contiguous().mT, torch.zeros(R, K, 2 * O, dtype=torch.float64)[..., ::2].copy_(ob)
    ref_w, ref_b = ow.clone(), ob.clone()
    got = head_hvp(**x, scale=0.5, out_w=ow_t, out_b=ob_s, accumulate=accumulate)
    head_hvp_reference(**x, scale=0.5, out_w=ref_w, out_b=ref_b, accumulate=accumulate)
    assert got[1] is ow_t and got[2] is ob_s
    torch.testing.assert_close(ow_t, ref_w, **TOL[torch.float64])
    torch.testing.assert_close(ob_s, ref_b, **TOL[torch.float64])


@needs_ext
def test_sample_major_views():
    """The conv engine passes views of its [N, R, I] / [N, K, R, I] tensors: the kernel reads them
    at their strides and returns rg in ra's layout."""
    R, N, K, O, I = 3, 6, 2, 5, 40
    x = inputs(R, N, K, O, I, torch.float64)
    views = {k: x[k].transpose(0, 1).contiguous().transpose(0, 1) for k in ("a", "delta", "probs", "d1")}
    views["ra"] = x["ra"].permute(1, 2, 0, 3).contiguous().permute(2, 0, 1, 3)
    got = head_hvp(**{**x, **views}, scale=0.3)
    want = head_hvp_reference(**x, scale=0.3)
    assert got[0].stride() == views["ra"].stride()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL[torch.float64])


def test_bad_inputs_are_named():
    x = inputs(2, 5, 3, 4, 6, torch.float32)
    args = lambda **kw: {**x, **kw}  # noqa: E731
    with pytest.raises(ValueError, match="ra must be"):
        head_hvp(**args(ra=x["ra"][:, :, :, :5]), scale=1.0)
    with pytest.raises(ValueError, match="dweight must be"):
        head_hvp(**args(dweight=x["dweight"][:, :2]), scale=1.0)
    with pytest.raises(ValueError, match="delta must be"):
        head_hvp(**args(delta=x["delta"][:, :, :3]), scale=1.0)
    with pytest.raises(ValueError, match="out_b must be"):
        head_hvp(**x, scale=1.0, out_b=torch.zeros(2, 3, 5))
    with pytest.raises(TypeError, match="dtype mismatch, d1"):
        head_hvp(**args(d1=x["d1"].double()), scale=1.0)
    with pytest.raises(TypeError, match="float32 or float64"):
        head_hvp(**{k: v.half() for k, v in x.items()}, scale=1.0)
    if _ext.has_kernel("head_hvp", "cpu"):  # the compiled op checks for itself too
        with pytest.raises(RuntimeError, match="dweight .* contiguous"):
            torch.ops.fastcurv.head_hvp(x["a"], x["ra"], x["weight"], x["dweight"].mT.contiguous().mT, None, None, x["delta"],
                                        1.0, None, torch.empty(2, 3, 4, 6), None, False)


def test_tensors_off_the_cpu_take_the_reference():
    """The op has no GPU kernel: off the CPU (here the meta device, which keeps shapes only) it runs
    the reference, even where compiled kernels are asked for (on a GPU, use_kernels("cuda"))."""
    x = {k: v.to("meta") for k, v in inputs(2, 5, 3, 4, 6, torch.float32).items()}
    with _ext.use_kernels("ext"):
        rg, hw, hb = head_hvp(**x, scale=1.0)
    assert rg.shape == (2, 5, 3, 6) and hw.shape == (2, 3, 4, 6) and hb.shape == (2, 3, 4) and rg.device.type == "meta"


@pytest.mark.parametrize("impl", ["ext", "torch"])
def test_no_inputs(impl):
    """A head of I = 0 inputs: the reference returned its result, the C++ layout check refused the
    empty weight (its strides after a size-0 dimension)."""
    if impl == "ext" and not _ext.has_kernel("head_hvp", "cpu"):
        pytest.skip("C++ extension not loaded (fastcurv._ext.extension_error() says why)")
    r = torch.randn
    with _ext.use_kernels(impl):
        got = head_hvp(r(2, 2, 0), r(2, 2, 3, 0), r(2, 4, 0), r(2, 3, 4, 0), r(2, 2, 4), 0.5)
    want = head_hvp_reference(r(2, 2, 0), r(2, 2, 3, 0), r(2, 4, 0), r(2, 3, 4, 0), r(2, 2, 4) * 0, 0.5)
    assert [tuple(t.shape) for t in (got if isinstance(got, tuple) else (got,)) if t is not None] == \
        [tuple(t.shape) for t in (want if isinstance(want, tuple) else (want,)) if t is not None]
