"""Faults from outside fastcurv's arithmetic: module hooks, pruned models, and errors raised while
torch.func computes (a loader that fails, an out-of-memory error) that are not torch.func's."""
import warnings

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

import fastcurv
import fastcurv.sharpness
from fastcurv.backends.base import read_batches
from fastcurv.backends.func import FuncBackend, torch_func_failed
from fastcurv.data import Batches
from fastcurv.replicas import meta_copy, validate_models


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def mlps(R, act=nn.ReLU, seed=0):
    """R float64 MLPs 5-4-3 (with ``act``: the fused engine takes ReLU, not Softplus)."""
    out = []
    for r in range(R):
        torch.manual_seed(seed + r)
        out.append(nn.Sequential(nn.Linear(5, 4), act(), nn.Linear(4, 3)).double())
    return out


def data(n=24, nb=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)
    bs = n // nb
    return [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]


class FailingLoader:
    """Re-iterable batches; on pass ``on_pass`` (1-based) it raises ``exc`` at batch 1, or with
    ``exc=None`` yields one batch fewer (a loader that changed between passes)."""

    def __init__(self, batches, on_pass, exc=None):
        self.batches, self.on_pass, self.exc, self.passes = batches, on_pass, exc, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        self.passes += 1
        failing = self.passes == self.on_pass
        for i, b in enumerate(self.batches[:-1] if failing and self.exc is None else self.batches):
            if i == 1 and failing and self.exc is not None:
                raise self.exc
            yield b


# --- module hooks -------------------------------------------------------------------------------

HOOKS = {
    "forward hook": lambda m: m.register_forward_hook(lambda mod, i, o: o * 3.0),
    "forward pre-hook": lambda m: m.register_forward_pre_hook(lambda mod, i: (i[0] * 2.0,)),
    "backward hook": lambda m: m.register_full_backward_hook(lambda mod, gi, go: None),
    "backward pre-hook": lambda m: m.register_full_backward_pre_hook(lambda mod, go: None),
}


@pytest.mark.parametrize("kind", HOOKS)
@pytest.mark.parametrize("replica", [0, 2])
def test_a_hook_on_any_replica_is_refused_naming_it(kind, replica):
    """Every replica runs through one copy of replica 0's modules, and the fused engine runs no
    hooks: a forward hook scaling replica 3's outputs by 3 was ignored (lambda_max 0.726 where the
    model alone has 5.23, 7x off) and the same hook on replica 0 was applied to every replica (4.36
    where 0.53), in every backend, autograd too. Now a hook on any replica's module is refused."""
    models = mlps(3)
    HOOKS[kind](models[replica][2])
    for call in (lambda: fastcurv.batched_sharpness(models, data(), progress=False),
                 lambda: fastcurv.HessianOperator(models, data(), backend="autograd"),
                 lambda: fastcurv.function_measures(models, data(), measures=("disagreement",)),
                 lambda: validate_models(models, training=True)):  # (what train_population checks)
        with pytest.raises(ValueError, match=rf"replica {replica} has a {kind} on module '2' \(Linear\).*"
                                             r"handle\.remove\(\)"):
            call()


def test_hooks_removed_measure_as_before():
    """The refusal goes with the hook: once its handle is removed, the models measure as never hooked."""
    models = mlps(2)
    handle = models[1].register_forward_hook(lambda mod, i, o: o * 3.0)
    with pytest.raises(ValueError, match="replica 1 has a forward hook on module '\\(model\\)'"):
        fastcurv.batched_sharpness(models, data(), measures=("lambda_max",), progress=False)
    handle.remove()
    got = fastcurv.HessianOperator(models, data(), backend="func").dense()
    torch.testing.assert_close(got, fastcurv.HessianOperator(mlps(2), data(), backend="func").dense())


# --- pruned and reparametrized models -----------------------------------------------------------

def test_pruned_models_get_an_error_naming_prune_remove():
    """torch.nn.utils.prune leaves 'weight' as a tensor autograd computed (a forward pre-hook's
    output): every entry point failed with torch's raw deepcopy error, which names weight_norm, not
    pruning (and, after a no_grad forward, ran through replica 0's hook). Now the error names the
    pruning and its remover, and after prune.remove the models measure as the dense models with
    zeros they then are (prune.remove registers 'weight' after 'bias': the eigenvalues compared)."""
    models = mlps(2)
    for m in models:
        prune.l1_unstructured(m[0], "weight", amount=0.5)
    for call in (lambda: fastcurv.batched_sharpness(models, data(), measures=("lambda_max",), progress=False),
                 lambda: fastcurv.function_measures(models, data(), measures=("disagreement",)),
                 lambda: fastcurv.HessianOperator(models, data())):
        with pytest.raises(ValueError, match=r"module '0' \(Linear\): L1Unstructured of torch\.nn\.utils\.prune.*"
                                             r"torch\.nn\.utils\.prune\.remove\(module, 'weight'\)"):
            call()
    for m in models:
        prune.remove(m[0], "weight")
    got = fastcurv.HessianOperator(models, data(), backend="func").dense()
    dense = mlps(2)
    with torch.no_grad():
        for d, m in zip(dense, models):
            d[0].weight.copy_(m[0].weight)
    want = fastcurv.HessianOperator(dense, data(), backend="func").dense()
    torch.testing.assert_close(torch.linalg.eigvalsh(got), torch.linalg.eigvalsh(want))


def test_old_weight_norm_names_its_remover():
    """torch.nn.utils.weight_norm (the hook-based one) gave the same raw deepcopy error."""
    models = mlps(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # (weight_norm is deprecated)
        for m in models:
            torch.nn.utils.weight_norm(m[2])
    with pytest.raises(ValueError, match=r"module '2' \(Linear\): torch\.nn\.utils\.weight_norm's.*"
                                         r"remove_weight_norm\(module\)"):
        fastcurv.HessianOperator(models, data())


def test_a_computed_tensor_attribute_is_named_when_the_copy_fails():
    """A module holding a tensor autograd computed as a plain attribute (no hook involved) cannot be
    deep-copied: the error names the module and the attribute instead of torch's weight_norm hint."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3).double()
            self.scale = self.lin.weight.sum() * 0 + 1  # (computed from a parameter: not a graph leaf)

        def forward(self, x):
            return self.lin(x) * self.scale.detach()

    with pytest.raises(ValueError, match=r"module '\(model\)' \(Scaled\) holds 'scale' as a tensor computed by "
                                         "autograd"):
        meta_copy(Scaled())


# --- errors during torch.func products that are not torch.func's -------------------------------

def test_errors_raised_reading_the_data_are_not_torch_funcs():
    """The loader's own errors (a DataLoader worker killed) and fastcurv's "the loader yielded ...
    on a later pass" are marked while the batches are read, and out-of-memory errors are never
    torch.func's: none of them may switch "auto" to autograd. Other RuntimeErrors and
    NotImplementedErrors may say that torch.func cannot run the model; other types never do."""
    loader = FailingLoader(data(), on_pass=2, exc=RuntimeError("DataLoader worker (pid 1234) is killed"))
    batches = Batches(loader, device="cpu", dtype=torch.float64, cache=False)
    with pytest.raises(RuntimeError, match="worker") as info:
        list(read_batches(batches))
    assert not torch_func_failed(info.value)
    short = Batches(FailingLoader(data(), on_pass=2), device="cpu", dtype=torch.float64, cache=False)
    with pytest.raises(RuntimeError, match="yielded 2 batches on a later pass but 3") as info:
        list(read_batches(short))
    assert not torch_func_failed(info.value)
    assert not torch_func_failed(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not torch_func_failed(RuntimeError("CUDA error: out of memory"))
    assert not torch_func_failed(ValueError("bad input"))
    assert torch_func_failed(RuntimeError("vmap: It looks like you're attempting to use a Tensor in some "
                                          "data-dependent control flow"))
    assert torch_func_failed(NotImplementedError("no batching rule"))


def test_func_errors_after_a_finished_product_are_not_torch_funcs():
    """Once the func backend has finished a product, torch.func evidently runs the model: a later
    error (here the loss's own) is marked as not torch.func's; the same error before any product
    is not (it may be torch.func failing)."""
    fail = {"on": False}

    def loss(out, y):
        if fail["on"]:
            raise RuntimeError("the loss failed")
        return nn.functional.cross_entropy(out, y)

    models = mlps(2, act=nn.Softplus)
    V = torch.randn(2, sum(p.numel() for p in models[0].parameters()), dtype=torch.float64)
    for done in (False, True):
        op = fastcurv.HessianOperator(models, data(), loss=loss, backend="func", backend_options={"reuse": False})
        assert isinstance(op.backend, FuncBackend)
        if done:
            op.matvec(V)
        fail["on"] = True
        with pytest.raises(RuntimeError, match="the loss failed") as info:
            op.matvec(V)
        fail["on"] = False
        assert torch_func_failed(info.value) is not done


@pytest.mark.parametrize("case", ["loader error", "loader changed"])
def test_auto_does_not_fall_back_on_a_loader_error(case):
    """A RuntimeError from the loader on a later pass (a DataLoader worker killed), or fastcurv's
    documented "the loader yielded 2 batches on a later pass but 3 on the first", during a func
    job under backend="auto" was reported as "torch.func could not differentiate this model" and
    the job went on, on autograd. Now it propagates unchanged and no fallback happens. (Needs
    operator.py to consult torch_func_failed.)"""
    models = mlps(2, act=nn.Softplus)  # (not the fused engine's: auto picks func)
    exc = RuntimeError("DataLoader worker (pid 1234) is killed") if case == "loader error" else None
    loader = FailingLoader(data(), on_pass=3, exc=exc)
    op = fastcurv.HessianOperator(models, loader, cache_data=False, backend_options={"reuse": False})
    assert op.backend_name == "func"
    V = torch.randn(2, op.P, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no "falling back" warning)
        with pytest.raises(RuntimeError, match="worker" if case == "loader error" else "yielded 2 batches"):
            for _ in range(3):
                op.matvec(V)
    assert op.backend_name == "func"


def test_gpu_out_of_memory_in_a_func_product_halves_the_chunk(monkeypatch):
    """An out-of-memory error inside a func product under backend="auto" switched the job to
    autograd ("torch.func could not differentiate this model") instead of the documented retry in
    chunks of half the replicas. The GPU is simulated: the job counts as on a GPU and the 3rd func
    product raises torch.OutOfMemoryError. (Needs operator.py to consult torch_func_failed.)"""
    models = mlps(4, act=nn.Softplus)
    want = fastcurv.batched_sharpness(models, data(), measures=("lambda_max",), progress=False)
    assert want.backend == "func"
    real, calls = FuncBackend.matvec, [0]

    def oom_once(self, vecs, idx):
        calls[0] += 1
        if calls[0] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, vecs, idx)

    monkeypatch.setattr(FuncBackend, "matvec", oom_once)
    monkeypatch.setattr(fastcurv.sharpness, "_on_gpu", lambda models: True)
    with pytest.warns(RuntimeWarning, match="replica_chunk=2") as caught:
        got = fastcurv.batched_sharpness(models, data(), measures=("lambda_max",), progress=False)
    assert not any("falling back" in str(w.message) for w in caught)
    assert got.backend == "func"
    torch.testing.assert_close(got["lambda_max"], want["lambda_max"])
