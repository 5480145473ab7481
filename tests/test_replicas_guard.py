"""ReplicaSet's gradient-free forward on inputs with singleton axes, its check of the models' hooks
on lazy modules, and its "models changed since built" guard (replaced tensors and layers, storage
moved by share_memory(), swap-based and no-op conversions, a move to another device, writes no
version counter sees: p.data, numpy views, fused optimizers), pickling
after a sparse forward, lazy replicas run once, the list validate_models returns; train_population given numpy arrays."""
import io

import numpy as np
import pytest
import torch
from torch import nn

import fastcurv
from fastcurv.measures._common import loss_at
from fastcurv.model_checks import _validated
from fastcurv.replicas import ReplicaSet, validate_models
from fastcurv.train import train_population
from fake_device import OnOtherDevice


def _mlps(R: int = 2, F: int = 20, C: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(F, 6), nn.ReLU(), nn.Linear(6, C)) for _ in range(R)]


def _sparse_signals(N: int = 24, F: int = 20, seed: int = 1):
    """``x [N, 1, F]``: sparse signals with one channel (few enough nonzeros for the CSR path)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 1, F, generator=g) * (torch.rand(N, 1, F, generator=g) < 0.15)


# --- singleton input axes on the sparse MLP forward ----------------------------------------------
def test_sparse_forward_keeps_singleton_axis_of_mlp_without_flatten():
    """An MLP without Flatten on ``x [N, 1, F]`` outputs ``[N, 1, C]``. The sparse CSR forward
    used to flatten every sample to one row and return ``[R, N, C]``, so the MSE loss against
    ``[N, 1, C]`` targets was broadcast to ``[N, N, C]``: loss_at gave about 40x the loss
    (43.2 instead of 1.08 in the report's case)."""
    models = _mlps()
    x = _sparse_signals()
    y = torch.randn(len(x), 1, 3)
    op = fastcurv.HessianOperator(models, (x, y), loss="mse", backend="autograd")
    with torch.no_grad():
        out = op.replicas.forward(x)
        want = torch.stack([nn.functional.mse_loss(m(x), y) for m in models]).double()
    assert out.shape == (2, len(x), 1, 3)
    torch.testing.assert_close(loss_at(op, op.replicas.flat_params()).double(), want, rtol=1e-5, atol=1e-6)


def test_sparse_forward_still_flattens_behind_a_leading_flatten():
    """With a leading ``nn.Flatten()`` the model's own output is ``[N, C]``, which the sparse path
    gives (it stays in use there): the same outputs as the dense functional forward."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Flatten(), nn.Linear(20, 6), nn.ReLU(), nn.Linear(6, 3)) for _ in range(2)]
    x = _sparse_signals()
    rs = ReplicaSet(models)
    with torch.no_grad():
        out = rs.forward(x)
        want = torch.stack([m(x) for m in models])
    assert rs._sparse_rows(rs._mlp_plan(), x) is not None  # (the CSR path is the one tested)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_sharpness_with_singleton_axis_matches_the_flat_data():
    """rho_sharpness and epsilon_sharpness of an MLP given ``x [N, 1, F]`` and MSE targets
    ``[N, 1, C]`` equal those of the same models on the flat ``[N, F]``/``[N, C]`` data. Through the
    sparse forward's broadcast losses they came out 0.0 for every replica (0.02 and 0.16 are
    right)."""
    models = _mlps()
    x = _sparse_signals(N=32)
    y = torch.randn(len(x), 1, 3)
    measures = ["rho_sharpness", "epsilon_sharpness"]
    kw = dict(loss="mse", measures=measures, progress=False, backend="autograd", seed=0,
              measure_options={"rho_sharpness": {"n_iter": 5}, "epsilon_sharpness": {"n_iter": 3}})
    got = fastcurv.batched_sharpness(models, (x, y), **kw).values
    want = fastcurv.batched_sharpness(models, (x[:, 0], y[:, 0]), **kw).values
    for name in measures:
        assert bool((want[name] > 1e-3).all()), name
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)


# --- lazy modules ---------------------------------------------------------------------------------
def test_lazy_modules_materialized_by_load_state_dict_are_measured():
    """LazyLinear replicas rebuilt from checkpoints with load_state_dict (no forward yet) keep torch's
    own lazy-initialization pre-hook; the hook check refused them, telling the user to remove a
    handle they never had. They measure as the plain Linear models with the same weights."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    src = [nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)) for _ in range(2)]
    lazy = []
    for s in src:
        m = nn.Sequential(nn.LazyLinear(5), nn.Tanh(), nn.LazyLinear(3))
        m.load_state_dict(s.state_dict())
        lazy.append(m)
    kw = dict(measures=["lambda_max"], progress=False)
    want = fastcurv.batched_sharpness(src, (x, y), **kw).values["lambda_max"]
    got = fastcurv.batched_sharpness(lazy, (x, y), **kw).values["lambda_max"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_uninitialized_lazy_module_asks_for_a_forward_pass():
    """A lazy module whose parameters are still uninitialized is named, with the remedy (one
    forward pass), rather than reported as a hook to remove."""
    models = [nn.Sequential(nn.LazyLinear(5), nn.Tanh(), nn.Linear(5, 3))]
    with pytest.raises(ValueError, match=r"module '0' \(LazyLinear\) is a lazy module .*run one forward pass"):
        ReplicaSet(models)


def test_user_hook_on_a_lazy_module_is_still_refused():
    """Only torch's lazy-initialization hook is passed over: a hook of the user's on the same
    lazy module is still refused."""
    m = nn.Sequential(nn.LazyLinear(5), nn.Tanh(), nn.Linear(5, 3))
    m(torch.randn(2, 4))
    m.load_state_dict(m.state_dict())
    m[0].register_forward_hook(lambda mod, args, out: out * 2)
    with pytest.raises(ValueError, match="forward hook on module '0'"):
        ReplicaSet([m])


# --- the "models changed" guard -------------------------------------------------------------------
def _operator(models):
    torch.manual_seed(3)
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    return fastcurv.HessianOperator(models, (x, y), backend="autograd")


def _models(R: int = 2):
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)) for _ in range(R)]


_NEW = [nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).state_dict() for _ in range(2)]


@pytest.mark.parametrize("change, what", [
    (lambda ms: [m.load_state_dict(s, assign=True) for m, s in zip(ms, _NEW)], "parameter '0.weight' of replica 0"),
    (lambda ms: [setattr(m[2], "weight", nn.Parameter(torch.randn(3, 8))) for m in ms],
     "parameter '2.weight' of replica 0"),
    (lambda ms: [m.__setitem__(2, nn.Linear(8, 3)) for m in ms], "module '2' of replica 0"),
    (lambda ms: ms[1].__setitem__(1, nn.ReLU()), "module '1' of replica 1"),
])
def test_guard_sees_replaced_parameters_and_layers(change, what):
    """Parameters replaced by new tensors (load_state_dict(assign=True), a new nn.Parameter, a
    swapped layer) were not seen once the old tensor died: the operator silently gave the old
    weights' loss (1.2426 / 1.0201 against 1.1727 / 1.1449 in the report's case)."""
    models = _models()
    op = _operator(models)
    change(models)
    with pytest.raises(RuntimeError, match=f"models changed .*{what}"):
        op.loss_and_gradient()


def test_guard_ignores_share_memory_but_sees_new_values():
    """``model.share_memory()`` moves every tensor's storage without changing a value or a version
    counter: it raised "the models changed". The values are now compared when only the storage
    moved, so the operator runs, and other values in another storage are still a change."""
    models = _models()
    op = _operator(models)
    want = op.loss_and_gradient()[0]
    for m in models:
        m.share_memory()
    torch.testing.assert_close(op.loss_and_gradient()[0], want)
    assert op.replicas.changed_since_built() is None
    models[1][2].bias.data = models[1][2].bias.data + 1  # (no version counter moves)
    with pytest.raises(RuntimeError, match="parameter '2.bias' of replica 1"):
        op.loss_and_gradient()


def test_guard_sees_dtype_conversion():
    """``.double()`` keeps each parameter object and its version counter; the new storage holds
    values of another dtype, which is a change."""
    models = _models()
    rs = ReplicaSet(models)
    models[0].double()
    assert rs.changed_since_built() == "parameter '0.weight' of replica 0"


@pytest.fixture
def future_flags():
    """Restores torch's ``__future__`` conversion settings a test turns on."""
    swap = torch.__future__.get_swap_module_params_on_conversion()
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    yield
    torch.__future__.set_swap_module_params_on_conversion(swap)
    torch.__future__.set_overwrite_module_params_on_conversion(overwrite)


def test_swap_conversions_of_the_models_work_while_an_operator_lives(future_flags):
    """The guard held weak references to the models' tensors, which ``torch.utils.swap_tensors``
    refuses: with ``set_swap_module_params_on_conversion(True)``, ``load_state_dict`` and
    ``.double()`` raised "Cannot swap t1 because it has weakref associated with it" while an
    operator lived. They run now, and the operator still sees the new values."""
    models = _models()
    op = _operator(models)
    torch.__future__.set_swap_module_params_on_conversion(True)
    models[1].load_state_dict({k: v + 0.01 for k, v in models[1].state_dict().items()})
    models[0].double()
    with pytest.raises(RuntimeError, match="models changed .*replica 0"):
        op.loss_and_gradient()


def test_noop_conversion_giving_new_parameter_objects_is_no_change(future_flags):
    """With ``set_overwrite_module_params_on_conversion(True)``, ``model.to("cpu")`` on CPU models
    gives every parameter a new object with the same values: the operator refused to run ("the
    models changed"). It runs now, and follows the new tensors (a later step on them is seen)."""
    models = _models()
    op = _operator(models)
    want = op.loss_and_gradient()[0]
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    for m in models:
        m.to("cpu")
    torch.testing.assert_close(op.loss_and_gradient()[0], want)
    with torch.no_grad():
        models[1][0].weight.mul_(2)
    with pytest.raises(RuntimeError, match="parameter '0.weight' of replica 1"):
        op.loss_and_gradient()


def _move_to_other_device(model: nn.Module) -> None:
    """Every parameter of ``model`` replaced by an ``OnOtherDevice`` of its values."""
    for layer in model.modules():
        for key, p in layer._parameters.items():
            layer._parameters[key] = OnOtherDevice(p.detach().clone())


def test_guard_takes_a_move_to_another_device_with_the_values_for_no_change():
    """``model.cuda()`` after an operator was built on the CPU moves each parameter's storage to the
    GPU with its values; the operator keeps its own CPU copies, so its results hold. The guard took
    any tensor on another device for changed, and the CPU operator refused to run ("the models
    changed"; the GPU test that builds one operator per device failed so). The values are now compared
    across devices: the operator runs, and other values on the other device are still a change. No
    GPU needed: the moved parameters are tensors that say they are on "cuda" (``OnOtherDevice``); a
    meta tensor holds no values, so a move to "meta" stays a change."""
    models = _models()
    op = _operator(models)
    want = op.loss_and_gradient()[0]
    for m in models:
        _move_to_other_device(m)
    assert models[0][0].weight.device.type == "cuda"
    assert op.replicas.changed_since_built() is None
    torch.testing.assert_close(op.loss_and_gradient()[0], want)
    models[1][2]._parameters["bias"] = OnOtherDevice(models[1][2].bias.values + 1e-3)
    with pytest.raises(RuntimeError, match="parameter '2.bias' of replica 1"):
        op.loss_and_gradient()
    models = _models()
    rs = ReplicaSet(models)
    models[1].to("meta")
    assert rs.changed_since_built() == "parameter '0.weight' of replica 1"


@pytest.mark.gpu
def test_operator_built_on_the_cpu_runs_after_its_models_moved_to_the_gpu():
    """The same on a GPU: ``.cuda()`` keeps each Parameter object and moves its data. The CPU
    operator still runs and gives its results; a step on the GPU copies is still seen."""
    models = _models()
    op = _operator(models)
    want = op.loss_and_gradient()[0]
    for m in models:
        m.cuda()
    torch.testing.assert_close(op.loss_and_gradient()[0], want)
    with torch.no_grad():
        models[1][2].bias.add_(1)
    with pytest.raises(RuntimeError, match="parameter '2.bias' of replica 1"):
        op.loss_and_gradient()



# --- writes no version counter sees ----------------------------------------------------------------
def _fused_step(make):
    """A change: one step of the optimizer ``make(params)`` on each model's loss."""
    def step(models):
        torch.manual_seed(4)
        x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
        for m in models:
            opt = make(m.parameters())
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    return step


def _no_grad_data_mul(models):
    with torch.no_grad():
        models[1][2].weight.data.mul_(3)


def _write_through_numpy(models):
    models[0][0].weight.detach().numpy()[:] = 0.0


@pytest.mark.parametrize("change, what", [
    (lambda ms: ms[0][0].weight.data.add_(0.5), "parameter '0.weight' of replica 0"),
    (lambda ms: ms[1][2].bias.data.copy_(torch.tensor([1.0, -1.0, 2.0])), "parameter '2.bias' of replica 1"),
    (_no_grad_data_mul, "parameter '2.weight' of replica 1"),
    (_write_through_numpy, "parameter '0.weight' of replica 0"),
    (_fused_step(lambda p: torch.optim.Adam(p, lr=0.1, fused=True)), "parameter '0.weight' of replica 0"),
    (_fused_step(lambda p: torch.optim.AdamW(p, lr=0.1, fused=True)), "parameter '0.weight' of replica 0"),
    (_fused_step(lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, fused=True)), "parameter '0.weight' of replica 0"),
    (_fused_step(lambda p: torch.optim.Adam(p, lr=0.1, foreach=True)), "parameter '0.weight' of replica 0"),
    (_fused_step(lambda p: torch.optim.SGD(p, lr=0.5, foreach=True)), "parameter '0.weight' of replica 0"),
], ids=["data.add_", "data.copy_", "no_grad data.mul_", "numpy view", "Adam fused", "AdamW fused", "SGD fused", "Adam foreach", "SGD foreach"])
def test_guard_sees_writes_no_version_counter_sees(change, what):
    """Writes through ``p.data`` (under no_grad or not), through a numpy view, and the steps of
    torch's fused optimizers (``fused=True``) change the values in the same storage without moving
    the tensor's version counter: the guard did not see them, and the kept operator silently gave
    the old weights' products (max |kept - fresh| 0.36 against |fresh| 0.72 after
    ``p.data.add_(0.5)``, 0.30 of 0.56 after one fused Adam step, 0.06 of 0.51 after a fused SGD
    step). The values are now compared with the operator's copies. (The foreach optimizers move
    the counters: they were seen already.)"""
    models = _models()
    op = _operator(models)
    V = torch.randn(2, op.P)
    op.matvec(V)
    change(models)
    with pytest.raises(RuntimeError, match=f"models changed .*{what} was modified in place.*write through .data"):
        op.matvec(V)


def test_guard_sees_a_weight_given_a_transposed_view_of_its_storage():
    """``w.data = w.data.t()`` on a square weight keeps the parameter object, its storage and its
    version counter, and the shape: the guard saw no change while the model computed with the
    transposed weight (the kept operator's loss of replica 1, 1.1001, against the model's 1.1020)."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)) for _ in range(2)]
    op = _operator(models)
    w = models[1][0].weight
    w.data = w.data.t()
    with pytest.raises(RuntimeError, match="parameter '0.weight' of replica 1"):
        op.loss_and_gradient()


def test_guard_sees_a_buffer_written_through_data():
    """A BatchNorm's running mean written through ``.data`` (no version counter moves) gave the old
    statistics' loss silently (1.1410 against the model's 1.1412); it is seen now, and named."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).eval() for _ in range(2)]
    op = _operator(models)
    op.loss_and_gradient()
    models[1][1].running_mean.data[3] = 2.0
    with pytest.raises(RuntimeError, match="buffer '1.running_mean' of replica 1"):
        op.loss_and_gradient()


def test_guard_takes_equal_values_in_other_bytes_for_no_change(monkeypatch):
    """The values are compared byte for byte first; other bytes of equal values (-0.0 for 0.0, a NaN
    of a replica whose weights are NaN) are no change: the operator still runs, on the CPU path and
    on the batched one of the other devices (run here on the CPU), which compares NaN with itself
    (unequal) and confirms by value. A change of another replica is still named on both paths,
    also when some replicas' models are gone (their rows are left out of the comparison)."""
    models = _models(3)
    with torch.no_grad():
        models[0][2].bias.zero_()
        models[1][0].weight[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        op = _operator(models)
    models[0][2].bias.data.neg_()  # (0.0 -> -0.0: other bytes, the same values)
    assert torch.signbit(models[0][2].bias).all()
    first_rewritten = ReplicaSet._first_rewritten
    for batched in (False, True):
        monkeypatch.setattr(ReplicaSet, "_first_rewritten", lambda self, kept: first_rewritten(self, kept, batched))
        assert op.replicas.changed_since_built() is None
        op.loss_and_gradient()
    del models[0]  # (replica 0's model is gone: rows 1 and 2 are compared)
    models[1][2].bias.data[1] += 1e-6
    for batched in (False, True):
        monkeypatch.setattr(ReplicaSet, "_first_rewritten", lambda self, kept: first_rewritten(self, kept, batched))
        assert op.replicas.changed_since_built() == "parameter '2.bias' of replica 2"


def test_replica_set_pickles_after_a_sparse_forward():
    """After a forward on sparse inputs the set caches the fused MLP plan (local closures) and the
    input's CSR form (a weak reference): ``torch.save`` raised "Can't pickle local object". The
    caches are left out of the pickled state, and the loaded copy computes the same outputs."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(2)]
    x = torch.rand(30, 20) * (torch.rand(30, 20) > 0.8)
    rs = ReplicaSet(models)
    want = rs.forward(x)
    assert hasattr(rs, "_plan") and rs._plan is not None  # (the sparse path ran)
    buf = io.BytesIO()
    torch.save(rs, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf, weights_only=False).forward(x), want)


def test_lazy_replica_run_once_matches_one_materialized_by_load_state_dict():
    """One forward on replica 0 turns its LazyLinear into Linear (and sets ``in_features``, 0 in
    the replicas materialized by ``load_state_dict``): every entry point refused the population
    ("module '0' is LazyLinear, replica 0 has Linear"). It is measured as before the forward."""
    torch.manual_seed(0)
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    plain = [nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)) for _ in range(2)]
    lazy = [nn.Sequential(nn.LazyLinear(8), nn.Tanh(), nn.LazyLinear(3)) for _ in range(2)]
    for m, p in zip(lazy, plain):
        m.load_state_dict(p.state_dict())
    with torch.no_grad():
        lazy[0].eval()(x)
    assert type(lazy[0][0]) is nn.Linear and type(lazy[1][0]) is nn.LazyLinear
    got = fastcurv.batched_sharpness(lazy, (x, y), measures=("lambda_max",), max_iter=50, seed=0)
    want = fastcurv.batched_sharpness(plain, (x, y), measures=("lambda_max",), max_iter=50, seed=0)
    torch.testing.assert_close(got.values["lambda_max"], want.values["lambda_max"])


# --- the list validate_models returns -------------------------------------------------------------
def test_hook_added_after_validation_is_refused():
    """A validated list skipped every check while it held the same models: a forward hook added
    afterwards (tripling replica 1's output) was silently ignored. The hooks are checked again."""
    ms = validate_models(_models())
    ms[1][2].register_forward_hook(lambda mod, args, out: 3 * out)
    with pytest.raises(ValueError, match="replica 1 has a forward hook"):
        validate_models(ms)


def test_validated_list_knows_its_models_not_their_ids():
    """The list remembered its models by id, which a new model reuses once the checked one is freed
    (CPython gives the freed address to the next object of its size): a model of another
    architecture then counted as checked, and failed later with a raw "stack expects each tensor to
    be equal size". It holds weak references now: the new model is checked."""
    ms = validate_models(_models())
    layers = [nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4)]
    freed = id(ms[1])
    ms[1] = None
    kept = []  # (models that did not get the freed id stay alive, so the next one may)
    for _ in range(200):
        m = nn.Sequential(*layers)
        if id(m) == freed:
            break
        kept.append(m)
    else:
        pytest.skip("CPython did not reuse the freed model's id")
    ms[1] = m
    with pytest.raises(ValueError, match=r"parameter '2.weight' has shape \(4, 8\), replica 0 has \(3, 8\)"):
        validate_models(ms)


def test_validated_list_given_back_is_a_new_list():
    """Given a validated list, validate_models returned the caller's own list, into which
    ``distributed.batched_sharpness(device=...)`` wrote its device copies: the caller's list no longer
    held their models. A new list is returned, still counted as checked."""
    models = _models()
    ms = validate_models(models)
    again = validate_models(ms)
    assert again is not ms and all(a is b for a, b in zip(again, models))
    assert _validated(again, False)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    fastcurv.distributed.batched_sharpness(ms, (x, y), measures=("lambda_max",), max_iter=5, device="cpu",
                                           use_distributed=False)
    assert all(a is b for a, b in zip(ms, models))


# --- train_population with numpy data -------------------------------------------------------------
def test_train_population_numpy_data_raises_a_clear_type_error():
    """numpy inputs failed with a raw AttributeError ('numpy.ndarray' object has no attribute
    'detach'); they get the TypeError batched_sharpness gives, naming torch.as_tensor."""
    x, y = np.random.randn(8, 5).astype(np.float32), np.random.randint(0, 3, 8)
    with pytest.raises(TypeError, match="x and y must be tensors, got ndarray and ndarray.*torch.as_tensor"):
        train_population(lambda: nn.Sequential(nn.Linear(5, 3)), x, y, replicas=2, epochs=1, progress=False)


def test_a_parameter_whose_storage_was_freed_is_a_change_not_a_crash():
    """A parameter whose storage was freed under it after the build (``untyped_storage().resize_(0)``,
    as FSDP does) killed the process with SIGSEGV at the next product: the value comparison read the
    freed memory. It is reported as a change now. (In a subprocess: the old code would take pytest
    down with it.)"""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch, fastcurv
        from torch import nn
        models = [nn.Sequential(nn.Linear(4, 3)) for _ in range(2)]
        op = fastcurv.HessianOperator(models, (torch.randn(6, 4), torch.randint(0, 3, (6,))), backend="autograd")
        models[0][0].weight.untyped_storage().resize_(0)
        try:
            op.matvec(torch.randn(2, op.P))
        except RuntimeError as e:
            print("RAISED", e)
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, (run.returncode, run.stderr[-500:])
    assert "RAISED the models changed" in run.stdout and "'0.weight' of replica 0" in run.stdout


def test_models_checked_once_checks_before_the_first_product_and_on_leaving():
    """Within ``models_checked_once`` (batched_sharpness runs its job in one) the models are checked
    before the first product only (the check reads every weight: up to half a product on deep nets
    of small layers), and once more on leaving: a change made inside the block raises there, so a
    run's results never silently mix weights; outside it every product checks."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double() for _ in range(2)]
    op = fastcurv.HessianOperator(models, (torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))))
    calls = []
    real = op.replicas.changed_since_built
    op.replicas.changed_since_built = lambda: calls.append(1) or real()
    V = torch.randn(2, op.P, dtype=torch.float64)
    with op.models_checked_once():
        for _ in range(4):
            op.matvec(V)
        with op.models_checked_once():  # (nested: part of the outer block)
            op.matvec(V)
    assert len(calls) == 2  # the first product, and leaving the block
    op.matvec(V)
    op.matvec(V)
    assert len(calls) == 4  # outside, every product
    with pytest.raises(RuntimeError, match="models changed since this HessianOperator was built, while a run of its"):
        with op.models_checked_once():
            op.matvec(V)
            with torch.no_grad():
                models[1][0].weight.data.add_(1.0)
            op.matvec(V)  # (not checked: inside the block)
    with pytest.raises(RuntimeError, match="models changed since this HessianOperator was built \\("):
        op.matvec(V)


def test_batched_sharpness_checks_the_models_once_per_job(monkeypatch):
    """batched_sharpness runs its products in ``models_checked_once``: the models are checked before
    the first product and after the last, not before each of its dozens (each check reads every
    weight)."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double() for _ in range(2)]
    calls = []
    real = ReplicaSet.changed_since_built
    monkeypatch.setattr(ReplicaSet, "changed_since_built", lambda self: calls.append(1) or real(self))
    res = fastcurv.batched_sharpness(models, (torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))),
                                     measures=("lambda_max", "trace"), trace_method="hutch++", progress=False)
    assert res.num_matvecs > 20 and len(calls) <= 3, (res.num_matvecs, len(calls))
