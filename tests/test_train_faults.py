"""Population training under bad targets and faults: MSE target shapes, the history a callback sees,
the thread count after an interruption, and a checkpoint write that fails."""
import os

import pytest
import torch
from torch import nn
from torch.func import stack_module_state

import fastcurv
import fastcurv.train_loop as train_loop
from fastcurv.train import evaluate_population, mlp, train_population
from fastcurv.train_fused import plan_mlp

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE_WORDS = "mse expects targets shaped like the outputs"


def _classes(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _builder():
    return mlp([6, 5, 3], "relu").double()


def test_mse_targets_in_another_layout_are_refused_by_training_and_evaluation():
    """Conv outputs ``[N, 3, 4, 4]`` and the same targets laid out channels-last ``[N, 4, 4, 3]``:
    training and evaluation compared only the number of targets per sample, reshaped the targets onto
    the outputs and trained on the scrambled pairing, silently (final weights 0.3 away from training
    on the right layout). ``F.mse_loss`` and the HessianOperator refuse the pair; now training and
    evaluation do too, with the operator's message, and still take the right layout."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 2, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randn(12, 3, 4, 4, generator=g, dtype=torch.float64)
    y_last = y.permute(0, 2, 3, 1).contiguous()

    def build():
        return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1)).double()

    with pytest.raises(ValueError, match=SHAPE_WORDS):  # the operator's rule
        fastcurv.HessianOperator([build()], (x, y_last), loss="mse")
    kw = dict(seeds=[0], loss="mse", epochs=1, batch_size=6, progress=False)
    with pytest.raises(ValueError, match=SHAPE_WORDS + r" \(2, 3, 4, 4\), got \(2, 4, 4, 3\)"):
        train_population(build, x, y_last, **kw)
    models, _ = train_population(build, x, y, **kw)
    with pytest.raises(ValueError, match=SHAPE_WORDS + r".*targets \(4, 4, 3\) per sample, outputs \(3, 4, 4\)"):
        evaluate_population(models, x, y_last, loss="mse")
    want = torch.nn.functional.mse_loss(models[0](x), y).item()
    assert evaluate_population(models, x, y, loss="mse")["loss"].tolist() == pytest.approx([want], rel=1e-12)


def test_flat_targets_of_a_one_output_model_follow_the_operators_rule():
    """``[N]`` targets for a ``[N, 1]`` model: training and evaluation accepted them (through the
    fused MLP path, by a reshape), then ``batched_sharpness`` refused the same models and data. One
    rule now: ``[N, 1]`` everywhere, ``[N]`` refused before any training."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 3, generator=g, dtype=torch.float64)
    y = torch.randn(20, generator=g, dtype=torch.float64)

    def build():
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()

    kw = dict(seeds=[0, 1], loss="mse", epochs=1, batch_size=8, progress=False)
    for shared in (False, True):
        with pytest.raises(ValueError, match=SHAPE_WORDS + r" \(2, 1\), got \(2,\)"):
            train_population(build, x, y, shared_data_order=shared, **kw)
    models, hist = train_population(build, x, y[:, None], **kw)
    assert hist.engine.startswith("fused-mlp")
    for data in ((x, y), (x, y[:, None])):
        kind = "refused" if data[1].dim() == 1 else "accepted"
        try:
            fastcurv.HessianOperator(models, data, loss="mse", backend="autograd")  # (any backend: Loss.check_targets)
            sharpness = "accepted"
        except ValueError as exc:
            assert SHAPE_WORDS in str(exc)
            sharpness = "refused"
        try:
            evaluate_population(models, *data, loss="mse")
            evaluation = "accepted"
        except ValueError as exc:
            assert SHAPE_WORDS in str(exc)
            evaluation = "refused"
        assert sharpness == evaluation == kind


def test_fused_mse_step_refuses_targets_of_another_shape():
    """The fused MLP step reshaped any targets with as many entries as the outputs onto them
    (``[R, B]`` onto ``[R, B, 1]``, or another layout); it now takes only the outputs' shape."""
    models = [nn.Sequential(nn.Linear(3, 2)).double() for _ in range(2)]
    plan, why = plan_mlp(models[0], "mse")
    assert plan is not None, why
    params = {n: t.detach() for n, t in stack_module_state(models)[0].items()}
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    y = torch.randn(2, 5, 2, dtype=torch.float64)
    active = torch.ones(2, dtype=torch.bool)
    _, losses = plan.loss_and_grads(params, x, y, active, "mse")
    want = [torch.nn.functional.mse_loss(m(x[r]), y[r]).item() for r, m in enumerate(models)]
    assert losses.tolist() == pytest.approx(want, rel=1e-12)
    with pytest.raises(ValueError, match=SHAPE_WORDS + r" \(2, 5, 2\), got \(2, 2, 5\)"):
        plan.loss_and_grads(params, x, y.transpose(1, 2).contiguous(), active, "mse")
    with pytest.raises(ValueError, match=SHAPE_WORDS + r" \(5, 2\), got \(10,\)"):
        plan.loss_and_grads(params, x[0], y[0].reshape(-1), active, "mse", shared=True)


def test_callback_sees_the_history_of_the_epochs_so_far():
    """``callback(epoch, history)`` got ``epochs_run``, ``steps``, ``diverged`` and ``reached_target``
    empty (filled only after the last epoch), and ``history.to_pandas()`` raised inside it. Now each
    callback sees what a run stopped after that epoch returns: a replica that diverged in epoch 0
    and one that reached the target in epoch 1 show up there."""
    x, y = _classes()
    kw = dict(seeds=[0, 1, 2], lr=[0.1, 1e300, 0.1], batch_size=16, target_loss=1.04, progress=False)
    seen = []

    def callback(epoch, h):
        seen.append((epoch, h.epochs_run, h.steps, h.diverged, h.reached_target, len(h.train_loss),
                     h.to_pandas().shape))

    train_population(_builder, x, y, epochs=3, callback=callback, **kw)
    assert [s[0] for s in seen] == [0, 1, 2]
    for epoch, *fields in seen:
        _, h = train_population(_builder, x, y, epochs=epoch + 1, **kw)
        assert fields == [h.epochs_run, h.steps, h.diverged, h.reached_target, epoch + 1, (3, 5)]
    assert seen[0][3] == [False, True, False] and seen[1][4] == [True, False, False]  # (the cases above happen)
    assert seen[0][1] is not seen[1][1]  # copies: a list the callback keeps does not change later


@pytest.mark.parametrize("failing", ["tqdm", "ThreadPoolExecutor"])
def test_interruption_while_the_workers_start_restores_the_thread_count(monkeypatch, failing):
    """Training with worker threads sets torch's thread count to 1, and restored it in a ``finally``
    entered only after the worker pool and the progress bar were created: a Ctrl-C (or any error)
    there left the whole process at 1 torch thread."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_loop, failing, interrupted)  # (the epoch loop creates the pool and the bar)
    x, y = _classes()
    torch.set_num_threads(2)  # (the one_thread fixture restores its own count after)
    with pytest.raises(KeyboardInterrupt):
        train_population(_builder, x, y, seeds=[0, 1], epochs=1, threads=2, progress=False)
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failed_checkpoint_write_leaves_no_temporary_file(monkeypatch, tmp_path, error):
    """A checkpoint write that failed after writing its bytes (a full disk, Ctrl-C) left
    ``run.pt.tmp<pid>``, as large as the checkpoint, beside ``run.pt``; another for every process.
    Now the temporary file is removed and the error re-raised; the checkpoint of the previous epoch
    stays valid and resumes."""
    real, calls = torch.save, []

    def fails_on_second(obj, f, *args, **kwargs):
        calls.append(f)
        real(obj, f, *args, **kwargs)
        if len(calls) == 2:
            raise error

    monkeypatch.setattr(torch, "save", fails_on_second)
    x, y = _classes()
    path = tmp_path / "run.pt"
    kw = dict(seeds=[0, 1], batch_size=16, epochs=3, progress=False, checkpoint=path)
    with pytest.raises(type(error)):
        train_population(_builder, x, y, **kw)
    assert sorted(os.listdir(tmp_path)) == ["run.pt"]
    monkeypatch.setattr(torch, "save", real)
    resumed, h = train_population(_builder, x, y, **kw)
    assert h.resumed_from_epoch == 1 and h.epochs_run == [3, 3]
    whole, _ = train_population(_builder, x, y, **{**kw, "checkpoint": None})
    for a, b in zip(resumed, whole):
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p, q)
