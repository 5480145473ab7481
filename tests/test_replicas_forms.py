"""The forms of models and batches a ReplicaSet and the data readers take: every kind of BatchNorm
(SyncBatchNorm), dict batches read alike by the operators and function_measures, the cost of
stacking many parameter tensors and of validating the models once per call."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import fastcurv
from fastcurv import model_checks, reparam
from fastcurv.function.predictions import collect_predictions
from fastcurv.replicas import REPLICA_SET_NOT_TAKEN, ReplicaSet, validate_models


# --- SyncBatchNorm ------------------------------------------------------------------------------
def _conv_bn(bn_cls, seed: int, **bn_kwargs) -> nn.Module:
    """Conv -> BatchNorm (``bn_cls``) -> Tanh -> Linear on ``[N, 3, 5, 4]`` inputs, float64, with
    running statistics far from any batch's (so that using them instead is plain to see)."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), bn_cls(4, **bn_kwargs), nn.Tanh(), nn.Flatten(), nn.Linear(24, 3)).double()
    if m[1].running_mean is not None:
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.3, 3)
    return m


def _as_batchnorm2d(m: nn.Module) -> nn.Module:
    """The same model with a plain BatchNorm2d (same parameters and buffers) in place of its
    SyncBatchNorm."""
    twin = _conv_bn(nn.BatchNorm2d, 0)
    twin.load_state_dict(m.state_dict())
    return twin


def _dense_batch_statistics_hessian(m: nn.Module, x, y) -> torch.Tensor:
    """``[P, P]`` Hessian of the mean cross-entropy of ``m`` (a BatchNorm2d model) with its
    BatchNorm normalizing by the batch's statistics (training mode, running statistics neither used
    nor updated), by autograd."""
    m = _as_batchnorm2d(m)
    m.train()
    m[1].track_running_stats = False
    m[1].running_mean = m[1].running_var = m[1].num_batches_tracked = None
    names = [n for n, _ in m.named_parameters()]
    shapes = [p.shape for _, p in m.named_parameters()]
    flat = torch.cat([p.detach().flatten() for _, p in m.named_parameters()])

    def loss(v):
        params = dict(zip(names, (c.view(s) for c, s in zip(v.split([s.numel() for s in shapes]), shapes))))
        return F.cross_entropy(torch.func.functional_call(m, params, (x,)), y)

    return torch.autograd.functional.hessian(loss, flat, vectorize=True)


def _products(op, V: torch.Tensor) -> torch.Tensor:
    """``[K, P]`` Hessian products of replica 0 with the rows of ``V`` (a dense Hessian would cost
    P products)."""
    return op.matvec(V.unsqueeze(0))[0]


def _batch():
    torch.manual_seed(5)
    return torch.randn(6, 3, 5, 4, dtype=torch.float64), torch.randint(0, 3, (6,))


def test_sync_batchnorm_batch_mode_uses_batch_statistics():
    """bn_mode="batch" was silently ignored for nn.SyncBatchNorm (models converted with
    convert_sync_batchnorm for DDP): the Hessian was the running-statistics one, 0.58 off the
    batch-statistics Hessian entrywise (lambda_max 3.52 where batch statistics give 3.91), because
    only BatchNorm1d/2d/3d were put in batch mode. Now it equals the dense float64 Hessian of the same
    model with a plain BatchNorm2d in training mode; the fused engine, which has no SyncBatchNorm,
    hands the model to torch.func and says why."""
    x, y = _batch()
    m = _conv_bn(nn.SyncBatchNorm, 0)
    op = fastcurv.HessianOperator([m], (x, y), bn_mode="batch")
    assert op.backend_name == "func" and "SyncBatchNorm" in op.backend_reason
    V = torch.randn(4, op.replicas.P, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = V @ _dense_batch_statistics_hessian(m, x, y)
    scale = float(want.abs().max())
    assert float((_products(op, V) - want).abs().max()) < 1e-10 * scale
    # and the eval mode keeps the running statistics (the products of the BatchNorm2d twin's Hessian)
    ev = _products(fastcurv.HessianOperator([m], (x, y)), V)
    twin = _products(fastcurv.HessianOperator([_as_batchnorm2d(m)], (x, y), backend="func"), V)
    assert float((ev - twin).abs().max()) < 1e-10 * scale
    assert float((ev - want).abs().max()) > 0.1 * scale


def test_sync_batchnorm_without_running_statistics_is_batch_statistics():
    """SyncBatchNorm(track_running_stats=False) normalizes by each batch's statistics, but
    ReplicaSet.batch_statistics was False for it: collect_predictions (function_measures) then cut a
    batch into max_rows chunks, normalized by each chunk's statistics (probabilities 0.027 off the
    model's own), and a 1-sample batch was not refused."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 3, 5, 4, dtype=torch.float64), torch.randint(0, 3, (64,))
    ms = [_conv_bn(nn.SyncBatchNorm, s, track_running_stats=False) for s in range(2)]
    rs = ReplicaSet(ms)
    assert rs.batch_statistics
    got = collect_predictions(rs, (x, y), keep_probs=True, max_rows=16).probs
    with torch.no_grad():
        want = torch.stack([m.eval()(x).softmax(-1) for m in ms])
    assert float((got - want).abs().max()) < 1e-12
    with pytest.raises(ValueError, match="batch-statistics BatchNorm"):
        fastcurv.HessianOperator(ms, (x[:1], y[:1]))


def test_sync_batchnorm_batch_mode_under_a_process_group(tmp_path):
    """With torch.distributed initialised (fastcurv.distributed's ranks), a SyncBatchNorm in training
    mode gathers every rank's statistics (and raises on CPU inputs): fastcurv's batch statistics must
    not go through that path. The same dense Hessian as without a process group."""
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed, not yet initialised")
    x, y = _batch()
    m = _conv_bn(nn.SyncBatchNorm, 0)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        op = fastcurv.HessianOperator([m], (x, y), bn_mode="batch")
        V = torch.randn(4, op.replicas.P, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        got = _products(op, V)
    finally:
        dist.destroy_process_group()
    want = V @ _dense_batch_statistics_hessian(m, x, y)
    assert float((got - want).abs().max()) < 1e-10 * float(want.abs().max())


# --- dict batches -------------------------------------------------------------------------------
class _Dicts(Dataset):
    """Samples as dicts with the given keys for the inputs and (when given) the labels."""

    def __init__(self, x, y, kx, ky=None):
        self.x, self.y, self.kx, self.ky = x, y, kx, ky

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {self.kx: self.x[i], **({self.ky: self.y[i]} if self.ky else {})}


def _linear_replicas():
    torch.manual_seed(0)
    x, y = torch.randn(20, 10), torch.randint(0, 3, (20,))
    return [nn.Linear(10, 3) for _ in range(2)], x, y


def test_function_measures_reads_dict_batches_as_the_operator_does():
    """function_measures read a dict {"x", "label"} by its inputs key alone and dropped the labels
    without a word (no test_error column), while HessianOperator refused the same loader naming its
    keys. Both now read dicts by one rule (a known key pair) and refuse the same dicts with the same
    message; function_measures also takes a dict holding one inputs key alone (no labels)."""
    ms, x, y = _linear_replicas()
    mixed = DataLoader(_Dicts(x, y, "x", "label"), batch_size=8)
    with pytest.raises(TypeError) as op_err:
        fastcurv.HessianOperator(ms, mixed)
    with pytest.raises(TypeError) as fm_err:
        fastcurv.function_measures(ms, mixed, measures=("disagreement", "gde"))
    assert "dict with keys ['label', 'x']" in str(op_err.value)
    assert str(fm_err.value).startswith(str(op_err.value))

    want = fastcurv.function_measures(ms, (x, y), measures=("disagreement", "gde"))
    for kx, ky in (("image", "label"), ("x", "y"), ("inputs", "targets")):
        got = fastcurv.function_measures(ms, DataLoader(_Dicts(x, y, kx, ky), batch_size=8),
                                         measures=("disagreement", "gde"))
        assert torch.equal(torch.as_tensor(got.values["test_error"]), torch.as_tensor(want.values["test_error"]))
    alone = fastcurv.function_measures(ms, DataLoader(_Dicts(x, y, "x"), batch_size=8), measures=("disagreement",))
    assert "test_error" not in alone.values
    assert torch.equal(torch.as_tensor(alone.values["disagreement"]), torch.as_tensor(want.values["disagreement"]))


# --- building the set ---------------------------------------------------------------------------
class _Counted(nn.Sequential):
    """A Sequential counting the walks over its parameters and buffers."""

    walks = 0

    def named_parameters(self, *args, **kwargs):
        type(self).walks += 1
        return super().named_parameters(*args, **kwargs)

    def named_buffers(self, *args, **kwargs):
        type(self).walks += 1
        return super().named_buffers(*args, **kwargs)


def _deep(depth: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(6, 6), nn.BatchNorm1d(6), nn.ReLU()]
    return _Counted(*layers, nn.Linear(6, 3))


def test_building_a_replica_set_walks_each_model_a_fixed_number_of_times():
    """ReplicaSet stacked each parameter (and buffer) by dict(m.named_parameters())[name]: one walk
    of every model per tensor name, quadratic in the number of tensors (a 24-layer MLP spent half of
    batched_sharpness there: 0.36 s of a 0.8 s job at R=128). Now each model is walked a fixed
    number of times, whatever its depth."""
    walks = {}
    for depth in (2, 10):
        ms = [_deep(depth, s) for s in range(3)]
        _Counted.walks = 0
        rs = ReplicaSet(ms)
        walks[depth] = _Counted.walks
        for n, p in ms[1].named_parameters():
            assert torch.equal(rs.params[n][1], p)
        for n, b in ms[2].named_buffers():
            assert torch.equal(rs.buffers[n][2], b)
    assert walks[10] == walks[2]


def test_models_are_validated_once_per_call(monkeypatch):
    """batched_sharpness validated the models, then the ReplicaSet it builds validated the same list
    again (70-110 ms at R=128-256). The list validate_models returns is not checked again, unless
    its models were replaced or training-mode settings are asked for."""
    calls = []
    check = model_checks._check_settings  # (runs on a full validation only)
    monkeypatch.setattr(model_checks, "_check_settings", lambda models, training: calls.append(len(models)) or check(models, training))
    torch.manual_seed(0)
    ms = [nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)) for _ in range(3)]
    x, y = torch.randn(20, 5), torch.randint(0, 3, (20,))
    fastcurv.batched_sharpness(ms, (x, y), measures=("lambda_max",), seed=0)
    assert calls == [3]

    checked = validate_models(ms)
    again = validate_models(checked)  # (a new list: callers may write into the list they get)
    assert again is not checked and list(again) == list(checked) and len(calls) == 2
    ReplicaSet(checked[1:])  # (a slice of checked models is checked)
    assert len(calls) == 2
    changed = validate_models(ms)
    changed[1] = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    with pytest.raises(ValueError, match="replica 1 differs from replica 0: module '1' is Tanh"):
        ReplicaSet(changed)
    dropouts = [nn.Sequential(nn.Linear(5, 4), nn.Dropout(p), nn.Linear(4, 3)) for p in (0.1, 0.2)]
    eval_checked = validate_models(dropouts)
    with pytest.raises(ValueError, match="p=0.2"):
        validate_models(eval_checked, training=True)


def test_reparam_refuses_a_replica_set_with_the_shared_message():
    """reparam kept its own copy of the old message ("a ReplicaSet is taken by HessianOperator and
    function_measures only"), which named neither the other operators nor collect_predictions."""
    ms = [nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)) for _ in range(2)]
    with pytest.raises(TypeError) as err:
        reparam.balance(ReplicaSet(ms))
    assert str(err.value) == REPLICA_SET_NOT_TAKEN
    with pytest.raises(TypeError) as err:
        validate_models(ReplicaSet(ms))
    assert str(err.value) == REPLICA_SET_NOT_TAKEN


def test_two_layer_classes_of_one_name_are_named_as_such():
    """A layer class defined anew for every model (inside the function that builds it) makes
    replicas of two classes of one name. The hint blamed torch.nn.utils.parametrize and told the
    user to remove the parametrizations, which the model did not have (parametrized modules now
    compare as their original classes, see tests/test_parametrized.py)."""
    def build(seed):
        class Scale(nn.Module):
            def forward(self, x):
                return 2 * x

        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(5, 4), Scale(), nn.Linear(4, 3))

    with pytest.raises(ValueError, match=r"module '1' is Scale, replica 0 has Scale \(two classes of one name: a class "
                                         r"defined anew for each model") as err:
        validate_models([build(0), build(1)])
    assert "parametriz" not in str(err.value)
