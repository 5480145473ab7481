"""The fused engine on traced (torch.fx) models: residual CNNs and MLPs against dense float64
Hessians and the autograd backend; unsupported operations fall back and are named."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastcurv
from fastcurv.backends import FusedBackend
from fastcurv.backends.fused import parse
from fastcurv.backends.fused.graph import Graph
from fastcurv.replicas import ReplicaSet
from models import replicas
from oracle import check_fused_float32, dense_hessian

pytestmark = pytest.mark.usefixtures("one_thread")


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN plus an identity skip (or a strided 1x1-conv projection), then ReLU."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.proj = None
        if stride != 1 or cin != cout:
            self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.b1(self.c1(x)), inplace=True)
        out = self.b2(self.c2(out))
        out += x if self.proj is None else self.proj(x)
        return torch.relu(out)


class ResNet(nn.Module):
    def __init__(self, flatten="torch", width=(2, 3)):
        super().__init__()
        c1, c2 = width
        self.stem = nn.Conv2d(1, c1, 3, padding=1)
        self.act = nn.GELU()  # non-zero second derivative before the blocks
        self.layer1 = Block(c1, c1)  # identity skip; its output feeds two branches of the next block
        self.layer2 = Block(c1, c2, stride=2)  # projection skip
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c2, 3)
        self.flatten = flatten

    def forward(self, x):
        x = self.layer2(self.layer1(self.act(self.stem(x))))
        x = self.pool(x)
        if self.flatten == "view":
            x = x.view(x.size(0), -1)
        elif self.flatten == "reshape":
            x = x.reshape(x.shape[0], -1)
        else:
            x = torch.flatten(x, 1)
        return self.fc(x)


class ResMLP(nn.Module):
    """x + f(x) twice with the same f (shared weights), after a parameter-free residual on the input,
    then a pre-activation branch whose ReLUs read and feed values that the additions also use."""

    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4))
        self.g = nn.Linear(4, 4)
        self.head = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))

    def forward(self, x):
        x = x + torch.tanh(x)  # shared by all replicas (no parameters yet)
        h = x + self.f(x)
        h = h + self.f(h)
        h = h + F.relu(self.g(F.relu(h)))
        return self.head(h)


class SharedTangents(nn.Module):
    """BatchNorm-ReLU pairs whose tangents other nodes read too: a BatchNorm input that a residual
    addition also reads, a ReLU output read twice, a BatchNorm output read by two activations."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2)
        self.c2, self.b2 = nn.Conv2d(2, 2, 3, padding=1, bias=False), nn.BatchNorm2d(2)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        y = self.c1(x)
        h = F.relu(self.b1(y))
        h = h + y + h
        z = self.b2(self.c2(h))
        return self.fc(torch.flatten(F.relu(z) + F.leaky_relu(z, 0.2), 1))


class InPlaceSums(nn.Module):
    """Tangents and gradients the engine updates in place: an addition whose output a BatchNorm
    alone reads, an addition of an addition's output read by a GELU alone, and a value read by
    three nodes (its gradient a sum of three terms), beside terms that other nodes also read."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 1)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        y = self.c1(x)
        h = self.bn(y + self.c2(y))
        z = F.gelu(h + self.c3(h) + y)
        return self.fc(torch.flatten(F.relu(z) + z + self.c3(z), 1))


class StemIntoSum(nn.Module):
    """A pooled stem (conv, BatchNorm or not, ReLU, max pooling) whose output a residual addition
    adds to a branch traced before it: the addition hands both the same gradient, which the stem's
    backward must not update in place (it passes through the pooling as it is)."""

    def __init__(self, bn: bool):
        super().__init__()
        self.skip = nn.Conv2d(1, 4, 2, stride=2)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        z = self.skip(x)
        y = self.pool(F.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(z + y, 1))


def _data(shape, n, loss, gen, dtype=torch.float64):
    x = torch.randn(n, *shape, generator=gen, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=gen) if loss == "cross_entropy" else torch.randn(n, 3, generator=gen, dtype=dtype)
    return x, y


def _check_dense(factory, shape, R, K, loss, seed=0, n=7, **options):
    models = replicas(factory, R=R, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = _data(shape, n, loss, gen)
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    op = fastcurv.HessianOperator(models, batches, backend="fused", loss=loss, backend_options=options or None)
    assert isinstance(op.backend.layers, Graph)
    V = torch.randn(R, K, op.P, generator=gen, dtype=torch.float64)
    HV = op.matvec(V)
    for r in range(R):
        H = dense_hessian(models[r], batches, loss=loss)
        assert H.abs().max() > 1e-3
        torch.testing.assert_close(HV[r], V[r] @ H.T, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(op.matvec(V), HV, rtol=0, atol=0)  # from the cached state
    return op


@pytest.mark.parametrize("R,K,loss,width", [(1, 1, "cross_entropy", (2, 3)), (3, 4, "mse", (1, 2))])
def test_resnet_against_dense(R, K, loss, width):
    _check_dense(lambda: ResNet(width=width), (1, 5, 5), R, K, loss)


@pytest.mark.parametrize("R,K,loss", [(1, 4, "mse"), (3, 1, "cross_entropy"), (3, 4, "cross_entropy")])
def test_residual_mlp_against_dense(R, K, loss):
    _check_dense(ResMLP, (4,), R, K, loss)


@pytest.mark.parametrize("R,K,loss", [(1, 3, "mse"), (3, 2, "cross_entropy")])
def test_batchnorm_relu_tangents_read_elsewhere_against_dense(R, K, loss):
    op = _check_dense(SharedTangents, (1, 4, 4), R, K, loss)
    assert len(op.backend._maps.bn_act) == 1  # b1 with its ReLU; b2's output has two readers


@pytest.mark.parametrize("R,K,loss", [(1, 2, "mse"), (3, 3, "cross_entropy")])
def test_in_place_sums_against_dense(R, K, loss):
    _check_dense(InPlaceSums, (1, 4, 4), R, K, loss)


@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("pooled_stem", [None, False])
def test_pooled_stem_read_by_an_addition_against_dense(bn, pooled_stem):
    op = _check_dense(lambda: StemIntoSum(bn), (1, 6, 6), 2, 2, "cross_entropy", pooled_stem=pooled_stem)
    assert op.backend._maps.stems


@pytest.mark.parametrize("flatten", ["view", "reshape"])
def test_flatten_views_and_sample_chunks(flatten):
    # one sample per chunk and no cache: the state is recomputed in every matvec
    _check_dense(lambda: ResNet(flatten, width=(1, 2)), (1, 4, 4), 2, 3, "cross_entropy", n=5, sample_chunk_bytes=1, cache_bytes=0)


class SkipSequential(nn.Sequential):
    """An nn.Sequential whose own forward adds a skip: not a plain chain, so it is traced."""

    def forward(self, x):
        return x + super().forward(x)


def test_sequential_subclass_with_its_own_forward_is_traced():
    op = _check_dense(lambda: nn.Sequential(nn.Linear(4, 4), SkipSequential(nn.Sigmoid(), nn.Linear(4, 4)), nn.Linear(4, 3)),
                      (4,), 2, 2, "cross_entropy")
    assert [l.kind for l in op.backend.layers].count("add") == 1


def test_float32_against_autograd_subsets_and_gradient():
    models = replicas(ResNet, R=4, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    x, y = _data((1, 8, 8), 24, "cross_entropy", gen, dtype=torch.float32)
    data = [(x[:16], y[:16]), (x[16:], y[16:])]
    check_fused_float32(models, data, gen)


def test_auto_uses_the_graph_for_residuals_and_chains_stay_chains():
    models = replicas(ResMLP, R=2)
    op = fastcurv.HessianOperator(models, (torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])))
    assert op.backend_name == "fused"
    chain, _ = parse(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)))
    assert type(chain) is list  # plain chains keep the MLP engine
    assert FusedBackend(ReplicaSet(replicas(lambda: nn.Sequential(nn.Linear(4, 3)), R=1)), op.loss, []).layers.__class__ is list


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.cat([x, self.fc(x)], 1)


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x) * 2.0


class Softplus(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return F.softplus(self.fc(x))


class ReusedInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc(x)
        return self.head(F.relu(h, inplace=True) + h)  # the in-place ReLU changes h for the addition too


class Skip(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.fc(x)


class DroppedInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.fc(x)
        h.relu_()  # fx records a call whose result is unused; dropping it would silently skip the ReLU
        return self.head(h)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, z):
        return self.fc(x + z)


@pytest.mark.parametrize("model,words,runs", [
    (lambda: nn.Sequential(nn.Linear(4, 4), Concat(), nn.Linear(8, 3)), ["torch.cat", "'1'", "Concat"], True),
    (Scaled, ["operator.mul", "'mul'"], True),
    (Softplus, ["torch.nn.functional.softplus"], True),
    (ReusedInPlace, ["in place"], True),
    (TwoInputs, ["more than one input"], False),
    (DroppedInPlace, [".relu_()", "never used"], True),
    (lambda: nn.Sequential(Skip(), nn.Linear(4, 3), nn.BatchNorm2d(3)), ["'2'", "feature maps"], False),
])
def test_unsupported_ops_fall_back_with_a_reason(model, words, runs):
    models = replicas(model, R=2)
    ok, why = FusedBackend.supports(ReplicaSet(models))
    assert not ok and all(w in why for w in words), why
    if runs:  # auto falls back to torch.func and says why; backend="fused" refuses
        gen = torch.Generator().manual_seed(0)
        op = fastcurv.HessianOperator(models, _data((4,), 5, "cross_entropy", gen))
        assert op.backend_name == "func" and why in op.backend_reason
        with pytest.raises(ValueError, match="does not support"):
            fastcurv.HessianOperator(models, _data((4,), 5, "cross_entropy", gen), backend="fused")


def test_residual_shape_mismatch_is_reported():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 1)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(x + self.fc(x))  # broadcasts [N, 1] against [N, 4]

    models = replicas(Bad, R=1)
    data = _data((4,), 5, "cross_entropy", torch.Generator().manual_seed(0))
    # the engine is tried on the first samples when the operator is built
    with pytest.raises(ValueError, match="cannot run this model on inputs.*residual addition 'add'.*equal shapes"):
        fastcurv.HessianOperator(models, data, backend="fused")
    op = fastcurv.HessianOperator(models, data)
    assert op.backend_name == "func" and "residual addition 'add'" in op.backend_reason


# --- BatchNorm with batch statistics (bn_mode="batch"): the normalization couples the samples ---

def _no_affine_chain():
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, affine=False), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(8, 4), nn.BatchNorm1d(4, affine=False), nn.Tanh(), nn.Linear(4, 3))


def _input_bn_mlp():
    # BatchNorm on the input shared by all replicas, then a residual MLP with BatchNorm1d
    return nn.Sequential(nn.BatchNorm1d(4), Skip(), nn.BatchNorm1d(4), nn.GELU(), nn.Linear(4, 3))


@pytest.mark.parametrize("factory,shape,R,K,loss,options", [
    (lambda: ResNet(width=(1, 2)), (1, 5, 5), 2, 3, "cross_entropy", {"sample_chunk_bytes": 1}),  # chunks are ignored: samples are coupled
    (_no_affine_chain, (1, 6, 6), 3, 1, "mse", {}),
    (_input_bn_mlp, (4,), 1, 4, "cross_entropy", {"cache_bytes": 0}),
])
def test_batch_statistics_against_dense(factory, shape, R, K, loss, options):
    affine = all(m.affine for m in factory().modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    if affine:
        models = replicas(factory, R=R)
    else:  # nothing to randomize: batch statistics ignore the running buffers
        torch.manual_seed(0)
        models = [factory().double() for _ in range(R)]
    gen = torch.Generator().manual_seed(0)
    x, y = _data(shape, 8, loss, gen)
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]  # ragged: each batch has its own statistics
    op = fastcurv.HessianOperator(models, batches, backend="fused", loss=loss, bn_mode="batch", backend_options=options)
    V = torch.randn(R, K, op.P, generator=gen, dtype=torch.float64)
    HV = op.matvec(V)
    for r in range(R):
        H = dense_hessian(models[r], batches, loss=loss, bn_mode="batch")
        torch.testing.assert_close(HV[r], V[r] @ H.T, rtol=1e-9, atol=1e-12)
    func = fastcurv.HessianOperator(models, batches, backend="func", loss=loss, bn_mode="batch")
    (l1, g1), (l2, g2) = op.loss_and_gradient(), func.loss_and_gradient()
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)
    # the batch statistics matter: running statistics give other products
    ev = fastcurv.HessianOperator(models, batches, backend="fused", loss=loss, bn_mode="eval")
    assert (ev.matvec(V) - HV).abs().max() > 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["auto", "cuda"])
@pytest.mark.parametrize("bn_mode", ["eval", "batch"])
def test_cuda_matches_cpu_on_residual_nets_and_replica_subsets(bn_mode, kernels):
    """The fused engine on CUDA (a residual CNN in both BatchNorm modes, and an MLP chain with
    scattered replica subsets, which the GPU path gathers) equals the CPU products; Lanczos on CUDA
    (gathered reorthogonalization) equals Lanczos on the CPU. Under the default kernel choice
    ("auto") the element-wise ops run Triton on a GPU where it is installed; "cuda" runs the CUDA
    kernels (fastcurv._cuda) instead, which no other test runs end to end. The GPU operator gets
    copies of the models, so that the CPU operator's stay on the CPU: the test moved the CPU
    operator's own models, which then refused to run ("the models changed"), before anything was
    compared."""
    if kernels == "cuda" and not fastcurv.cuda_extension_loaded():
        pytest.skip(f"fastcurv._cuda did not load: {fastcurv._ext.extension_error('_cuda')}")
    with fastcurv.use_kernels(kernels):
        models = replicas(lambda: ResNet().eval(), R=3)
        gen = torch.Generator().manual_seed(7)
        x = torch.randn(10, 1, 8, 8, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (10,), generator=gen)
        batches = [(x[:6], y[:6]), (x[6:], y[6:])]
        cpu = fastcurv.HessianOperator(models, batches, backend="fused", bn_mode=bn_mode)
        gpu = fastcurv.HessianOperator([copy.deepcopy(m).cuda() for m in models], batches, backend="fused",
                                       bn_mode=bn_mode)
        V = torch.randn(3, 2, cpu.P, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(gpu.matvec(V.cuda()).cpu(), cpu.matvec(V), rtol=1e-10, atol=1e-12)
        mlps = replicas(lambda: nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)), R=6)
        xs, ys = torch.randn(12, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (12,), generator=gen)
        cpu = fastcurv.HessianOperator(mlps, (xs, ys), backend="fused")
        gpu = fastcurv.HessianOperator([copy.deepcopy(m).cuda() for m in mlps], (xs, ys), backend="fused")
        W = torch.randn(6, 1, cpu.P, generator=gen, dtype=torch.float64)
        full = cpu.matvec(W)
        gpu.matvec(W.cuda())  # caches the state of all replicas
        idx = torch.tensor([0, 2, 3, 5])
        torch.testing.assert_close(gpu.matvec(W[idx].cuda(), idx=idx.cuda()).cpu(), full[idx], rtol=1e-10, atol=1e-12)
        a = fastcurv.lanczos(cpu, k=2, tol=1e-8, max_iter=30)
        b = fastcurv.lanczos(gpu, k=2, tol=1e-8, max_iter=30)
        torch.testing.assert_close(b.eigenvalues, a.eigenvalues, rtol=1e-8, atol=1e-10)


class AliasInPlace(nn.Module):
    """An in-place update of a tensor through an alias (Identity, eval Dropout, a flattening view,
    or ``+=`` on an Identity's output) that torch applies to the tensor another operation reads."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.conv0, self.conv1 = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(1, 2, 3, padding=1)
        self.alias = nn.Dropout(0.5) if how == "dropout" else nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        h = self.conv0(x)
        if self.how == "view":  # torch: h is now relu(h) too
            return self.fc(self.relu(h.view(h.size(0), -1)) + torch.flatten(h, 1))
        if self.how == "iadd":
            o = self.alias(h)
            o += self.conv1(x)  # torch.fx records an out-of-place sum
            o = torch.tanh(o)
        else:
            o = self.relu(self.alias(h))
        return self.fc(torch.flatten(o + h, 1))


@pytest.mark.parametrize("how", ["identity", "dropout", "view", "iadd"])
def test_in_place_updates_through_aliases_are_not_fused(how):
    models = replicas(lambda: AliasInPlace(how), R=2)
    x, y = _data((1, 4, 4), 6, "cross_entropy", torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="in place"):
        fastcurv.HessianOperator(models, (x, y), backend="fused")
    op = fastcurv.HessianOperator(models, (x, y))
    assert op.backend_name == "func"
    V = torch.randn(2, op.P, dtype=torch.float64)
    for r in range(2):
        torch.testing.assert_close(op.matvec(V)[r], dense_hessian(models[r], [(x, y)]) @ V[r], rtol=1e-10, atol=1e-12)


def test_a_model_that_changes_its_input_is_refused():
    models = replicas(lambda: nn.Sequential(nn.LeakyReLU(0.1, inplace=True), nn.Linear(4, 3)), R=1)
    x, y = _data((4,), 6, "cross_entropy", torch.Generator().manual_seed(0))
    before = x.clone()
    for backend in ("fused", "func", "autograd"):
        with pytest.raises(ValueError, match="changes its input in place"):
            fastcurv.HessianOperator(models, (x, y), backend=backend)
    assert torch.equal(x, before)
    # an in-place ReLU on inputs >= 0 (pixels) changes no value: it was found by its values only, and
    # torch.func then raised a raw error about aten::relu_
    models = replicas(lambda: nn.Sequential(nn.ReLU(inplace=True), nn.Linear(4, 3)), R=1)
    for backend in ("auto", "func"):
        with pytest.raises(ValueError, match="changes its input in place"):
            fastcurv.HessianOperator(models, (x.abs(), y), backend=backend)


class SequenceMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):  # [N, T, 4] -> [N, T, 3]
        return self.b(torch.relu(self.a(x)))


class MapsOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):  # feature maps out
        return torch.relu(self.c(x))


@pytest.mark.parametrize("factory,shape,target", [(SequenceMLP, (3, 4), (3, 3)), (MapsOut, (1, 4, 4), (2, 4, 4))])
def test_auto_falls_back_when_the_engine_cannot_take_the_shapes(factory, shape, target):
    models = replicas(factory, R=2)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, *shape, generator=gen, dtype=torch.float64), torch.randn(5, *target, generator=gen, dtype=torch.float64)
    op = fastcurv.HessianOperator(models, (x, y), loss="mse")
    assert op.backend_name == "func" and "cannot run this model on inputs" in op.backend_reason
    V = torch.randn(2, op.P, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(V)[1], dense_hessian(models[1], [(x, y)], loss="mse") @ V[1], rtol=1e-10, atol=1e-12)


class GlobalMean(nn.Module):
    """A conv net whose global average pooling is written as a mean over the spatial dims."""

    def __init__(self, how="method"):
        super().__init__()
        self.c1, self.bn, self.c2, self.fc = nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.Linear(4, 3)
        self.how = how

    def forward(self, x):
        h = F.relu(self.c2(F.relu(self.bn(self.c1(x)))))
        if self.how == "method":
            return self.fc(h.mean((2, 3)))
        if self.how == "function":
            return self.fc(torch.mean(h, dim=(-2, -1)))
        return self.fc(h.mean((2, 3), keepdim=True).flatten(1))


@pytest.mark.parametrize("how", ["method", "function"])
def test_global_average_pooling_written_as_a_mean(how):
    """x.mean((2, 3)) is AdaptiveAvgPool2d(1) then Flatten: fused, exact against dense, with the
    exact trace (it fell back to torch.func: 3x slower, and a stochastic trace)."""
    op = _check_dense(lambda: GlobalMean(how), (1, 5, 5), 2, 3, "cross_entropy")
    assert op.exact_trace_support() == (True, "")


def test_other_means_are_not_fused():
    ok, why = FusedBackend.supports(ReplicaSet(replicas(lambda: GlobalMean("keepdim"), R=1)))
    assert not ok and "only x.mean((2, 3))" in why, why


class FlattenModuleInPlace(nn.Module):
    """nn.Flatten returns its input (a view of it): the in-place ReLU on its output changes ``h``,
    which ``fc2`` reads after it (hunt 18: the tracer accepted it, unlike ``h.flatten(1)``)."""

    def __init__(self):
        super().__init__()
        self.a, self.flat = nn.Linear(4, 5, bias=False), nn.Flatten()
        self.fc, self.fc2 = nn.Linear(5, 3), nn.Linear(5, 3)

    def forward(self, x):
        h = self.a(x)
        f = F.relu(self.flat(h), inplace=True)  # torch: h is now relu(h) too
        return self.fc(f) + self.fc2(h)


class AliasedSum(nn.Module):
    """``h += b(x)``, which torch.fx records as ``h + b(x)``: with ``how="alias"`` a Python alias
    ``g = h`` is read after it (torch: the sum; the traced graph: the old ``h``); with ``"before"`` a
    tanh reads ``h`` before it (the old value both ways); ``"inplace_relu"``: the same with an
    in-place ReLU in place of the sum."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a, self.b = nn.Linear(4, 5, bias=False), nn.Linear(4, 5, bias=False)
        self.fc, self.fc2 = nn.Linear(5, 3), nn.Linear(5, 3)

    def forward(self, x):
        h = self.a(x)
        if self.how == "alias":
            g = h
            h += self.b(x)
            return self.fc(torch.relu(h)) + self.fc2(torch.relu(g))
        s = torch.tanh(h)
        if self.how == "inplace_relu":
            return self.fc(s) + self.fc2(F.relu(h, inplace=True))
        h += self.b(x)
        return self.fc(torch.relu(h)) + self.fc2(s)


def _padded_data(n=12, zeros=8, seed=0):
    """Cross-entropy data whose first samples are all zero (padding): through layers without bias
    they give zero activations whatever the graph."""
    gen = torch.Generator().manual_seed(seed)
    x, y = _data((4,), n, "cross_entropy", gen)
    x[:zeros] = 0
    return x, y


@pytest.mark.parametrize("model,words", [
    (FlattenModuleInPlace, ["relu", "works in place on 'a' (of which 'flat' is an alias)", "module 'fc2'"]),
    (lambda: AliasedSum("alias"), ["operator.add written '+='", "works in place on 'a'", "torch.relu (node 'relu_1')"]),
])
def test_in_place_updates_through_module_and_python_aliases_are_refused(model, words):
    """The tracer refuses them, naming the nodes, whatever the data; auto falls back to func, exact
    (the fused engine's products were wrong by 0.6 when the first samples hid the difference)."""
    models = replicas(model, R=2)
    ok, why = FusedBackend.supports(ReplicaSet(models))
    assert not ok and all(w in why for w in words), why
    x, y = _padded_data()
    op = fastcurv.HessianOperator(models, (x, y))
    assert op.backend_name == "func" and why in op.backend_reason
    V = torch.randn(2, op.P, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for r in range(2):
        torch.testing.assert_close(op.matvec(V)[r], dense_hessian(models[r], [(x, y)]) @ V[r], rtol=1e-10, atol=1e-12)


def test_in_place_updates_read_only_before_them_are_fused():
    """An operation that reads the tensor before the in-place update (a sum written ``+=``, a ReLU)
    reads the old value in the model and in the traced graph: fused, exact (the in-place ReLU was
    refused)."""
    for how in ("before", "inplace_relu"):
        _check_dense(lambda: AliasedSum(how), (4,), 2, 2, "cross_entropy")


def test_resnet_sums_written_in_place_stay_fused():
    """``out += identity`` (Block) is marked as the in-place sum it is, and fused: nothing reads the
    old ``out`` after it. The same sum with the old value read afterwards is refused."""
    from fastcurv.backends.fused import graph

    layers, why = graph.trace(ResNet().double())
    assert layers is not None, why

    class ReadAfter(Block):
        def forward(self, x):
            out = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
            old = out
            out += x
            return torch.relu(out) + old

    ok, why = FusedBackend.supports(ReplicaSet(replicas(lambda: nn.Sequential(ReadAfter(1, 1), nn.Flatten(), nn.Linear(16, 3)), R=1)))
    assert not ok and "written '+='" in why and "in place" in why, why


def test_check_on_looks_past_degenerate_first_samples(monkeypatch):
    """check_on compares the engine with the model on samples spread through the batch and on random
    inputs, not on its first 4 samples only: all-zero first samples hid an in-place sum that the
    tracer cannot see (simulated: a tracer blind to ``+=``) and auto picked the fused engine."""
    from fastcurv.backends.fused import graph

    monkeypatch.setattr(graph, "_called_by_inplace_add", lambda: False, raising=False)
    models = replicas(lambda: AliasedSum("alias"), R=2)
    rs = ReplicaSet(models)
    assert FusedBackend.supports(rs)[0]
    x, y = _padded_data(n=40, zeros=10)
    op = fastcurv.HessianOperator(models, (x, y))
    assert op.backend_name == "func" and "differs from the model's own" in op.backend_reason, op.backend_reason
    V = torch.randn(2, op.P, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(op.matvec(V)[1], dense_hessian(models[1], [(x, y)]) @ V[1], rtol=1e-10, atol=1e-12)
    # the samples spread through the batch find it without the random inputs, the first ones do not
    assert not FusedBackend.check_on(rs, op.loss, x, y, synthetic=0)[0]
    assert FusedBackend.check_on(rs, op.loss, x[:10], y[:10], synthetic=0)[0]


def test_the_engine_check_skips_replicas_whose_outputs_overflow():
    """Finite weights whose outputs overflow (a too-large learning rate in a sweep) at both ends of
    the population: the check compares the replicas where the loss is finite, the engine is fused,
    and only those replicas get NaN rows (the check crashed on a NaN tolerance)."""
    ms = replicas(lambda: nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3)), 4, dtype=torch.float32)
    with torch.no_grad():
        for r in (0, 3):
            for p in ms[r].parameters():
                p.mul_(1e20)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 10, generator=g), torch.randint(0, 3, (64,), generator=g)
    op = fastcurv.HessianOperator(ms, (x, y), backend="auto")
    assert op.backend_name == "fused"
    V = torch.randn(4, op.P, generator=g)
    with pytest.warns(RuntimeWarning, match=r"replicas \[0, 3\] produced non-finite"):
        HV = op.matvec(V)
    assert torch.isfinite(HV).all(1).tolist() == [False, True, True, False]
    ref = fastcurv.HessianOperator(ms[1:3], (x, y), backend="autograd").matvec(V[1:3])
    torch.testing.assert_close(HV[1:3], ref, rtol=1e-4, atol=1e-5)


def test_the_engine_check_finds_a_finite_replica_anywhere(monkeypatch):
    """Overflowing replicas at both ends (here four on each side): the check still compares a
    replica whose loss is finite (it tried four from each end, then passed the engine unchecked:
    products 0.8 off on the healthy replicas of a model the tracer cannot see through)."""
    from fastcurv.backends.fused import graph

    monkeypatch.setattr(graph, "_called_by_inplace_add", lambda: False, raising=False)
    ms = replicas(lambda: AliasedSum("alias"), R=10)
    with torch.no_grad():
        for r in (0, 1, 2, 3, 6, 7, 8, 9):
            for p in ms[r].parameters():
                p.mul_(1e160)  # finite weights, overflowing outputs
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (40,), generator=g)
    op = fastcurv.HessianOperator(ms, (x, y))
    assert op.backend_name == "func" and "differs from the model's own (replica 4" in op.backend_reason, op.backend_reason


class TutorialCNN(nn.Module):
    """The classic tutorial CNN: functional pooling and ``x.view(-1, features)``."""

    def __init__(self, flatten="features"):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 3, 3), nn.Conv2d(3, 4, 3)
        self.f, self.o = nn.Linear(16, 5), nn.Linear(5, 3)
        self.flatten = flatten

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.c1(x)), (2, 2))
        h = F.relu(self.c2(h))
        h = F.avg_pool2d(h, 2, stride=1) if self.flatten == "features" else F.adaptive_avg_pool2d(h, 2)
        h = h.view(-1, 16) if self.flatten == "features" else h.view(x.size(0), -1)  # (x: the input's batch size)
        return self.o(F.relu(self.f(h)))


@pytest.mark.parametrize("flatten", ["features", "input_size"])
def test_functional_pooling_and_tutorial_views_are_fused(flatten):
    """F.max_pool2d / F.avg_pool2d / F.adaptive_avg_pool2d, x.view(-1, 16) and h.view(x.size(0), -1)
    sent such CNNs to torch.func (3x slower, no exact trace)."""
    models = replicas(lambda: TutorialCNN(flatten), R=2)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 1, 12, 12, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
    op = fastcurv.HessianOperator(models, (x, y))
    assert op.backend_name == "fused", op.backend_reason
    V = torch.randn(2, 2, op.P, generator=g, dtype=torch.float64)
    HV, tr = op.matvec(V), op.exact_trace()
    for r in range(2):
        H = dense_hessian(models[r], [(x, y)])
        torch.testing.assert_close(HV[r], V[r] @ H, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(tr[r], H.trace(), rtol=1e-10, atol=1e-12)


class MixesSamples(nn.Module):
    """``view(-1, 2 * features)`` pairs up samples; a later ``view(-1, features)`` splits them again:
    each view alone reads as a flatten, together they mix samples in the Linear between them."""

    def __init__(self):
        super().__init__()
        self.c, self.mix, self.o = nn.Conv2d(1, 2, 3), nn.Linear(16, 16), nn.Linear(8, 3)

    def forward(self, x):  # 8 features per sample
        h = F.relu(self.c(x)).view(-1, 16)
        return self.o(F.relu(self.mix(h)).view(-1, 8))


def test_a_view_that_mixes_samples_is_not_fused_wrongly():
    models = replicas(MixesSamples, R=2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
    op = fastcurv.HessianOperator(models, (x, y))
    assert op.backend_name != "fused"
    V = torch.randn(2, op.P, generator=g, dtype=torch.float64)
    for r in range(2):
        torch.testing.assert_close(op.matvec(V)[r], dense_hessian(models[r], [(x, y)]) @ V[r], rtol=1e-10, atol=1e-12)


class KeywordInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 2, 3), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(input=self.conv(x))
        h = torch.reshape(input=torch.tanh(input=h), shape=(x.shape[0], -1))
        return self.fc(torch.flatten(input=h, start_dim=1))


def test_calls_that_pass_the_tensor_by_keyword_are_fused():
    """torch.relu(input=h), torch.flatten(input=h, start_dim=1), torch.reshape(input=h, shape=...):
    the tracer read args[0] and crashed with a raw IndexError under backend="auto"."""
    models = replicas(KeywordInputs, R=2)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)
    op = fastcurv.HessianOperator(models, (x, y))
    assert op.backend_name == "fused", op.backend_reason
    V = torch.randn(2, op.P, generator=g, dtype=torch.float64)
    for r in range(2):
        torch.testing.assert_close(op.matvec(V)[r], dense_hessian(models[r], [(x, y)]) @ V[r], rtol=1e-10, atol=1e-12)


def test_models_the_engine_check_cannot_run_fall_back_with_the_reason():
    """A weight-normalized Linear (a parametrization: the fused engine looked up '0.weight', KeyError),
    and a model whose own forward runs on some batch sizes only (x.view(-1, 32) groups 4 samples: the
    check's 34 samples raised), crashed the operator under "auto" instead of falling back."""
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    wn = nn.Sequential(weight_norm(nn.Linear(4, 5)), nn.ReLU(), nn.Linear(5, 3)).double()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    op = fastcurv.HessianOperator([wn], (x, y))
    assert op.backend_name == "func" and "parametrized" in op.backend_reason

    class Groups(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.o = nn.Linear(8, 8), nn.Linear(32, 12)

        def forward(self, x):
            return self.o(torch.relu(self.fc(x)).view(-1, 32)).view(-1, 3)

    xs, ys = torch.randn(40, 8, dtype=torch.float64), torch.randint(0, 3, (40,))
    op = fastcurv.HessianOperator(replicas(Groups, R=2), (xs, ys))
    assert op.backend_name == "func" and "may mix samples" in op.backend_reason


class EvalDropout(nn.Module):
    def __init__(self, default_training=False):
        super().__init__()
        self.fc, self.o = nn.Linear(4, 6), nn.Linear(6, 3)
        self.default_training = default_training

    def forward(self, x):
        h = F.dropout(F.relu(self.fc(x)), 0.5, training=self.training).contiguous()
        if self.default_training:
            h = F.dropout(h, p=0.2)  # (F.dropout's default training=True: it drops in eval mode too)
        return self.o(h)


def test_eval_mode_functional_dropout_and_contiguous_are_identities():
    """F.dropout(h, p, training=self.training) and .contiguous() sent models to torch.func; in eval mode
    they are identities. F.dropout with its default training=True draws random numbers: refused."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
    models = [m.eval() for m in replicas(EvalDropout, R=2)]
    op = fastcurv.HessianOperator(models, (x, y))
    assert op.backend_name == "fused", op.backend_reason
    V = torch.randn(2, op.P, generator=g, dtype=torch.float64)
    for r in range(2):
        torch.testing.assert_close(op.matvec(V)[r], dense_hessian(models[r], [(x, y)]) @ V[r], rtol=1e-10, atol=1e-12)
    graph, why = fastcurv.backends.fused.graph.trace(EvalDropout(default_training=True).eval())
    assert graph is None and "draws random numbers" in why
