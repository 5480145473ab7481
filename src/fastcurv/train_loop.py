"""The epoch loop of :func:`fastcurv.train.train_population` (:func:`run_epochs`): every replica
group's epoch in worker threads (:func:`worker_limit` of them at most), then the history row, the
checkpoint, the progress bar and the callback, once per epoch for all groups; and the history's
per-replica fields (:func:`fill_history`). The model's errors in an epoch are named
(:func:`_model_tasks`): a model vmap cannot batch, inputs it cannot take.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
from tqdm.auto import tqdm

from .model_run import first_input_failing, vmap_error
from .train_checkpoint import save_checkpoint
from .train_group import ReplicaGroup, merged_rows
from .train_options import TrainOptions


def worker_limit(device: torch.device, has_dropout: bool, R: int, threads: int | None) -> int:
    """The most worker threads a call may use: ``threads`` (default torch's thread count), at most R; one
    off the CPU and where the model draws random numbers (their order is kept fixed, in the calling
    thread)."""
    if device.type == "cpu" and not has_dropout:
        return max(1, min(R, int(threads) if threads is not None else torch.get_num_threads()))
    return 1


def run_epochs(groups: list[ReplicaGroup], opts: TrainOptions, history, start_epoch: int, fingerprint: dict,
               callback: Callable | None, most_workers: int) -> None:
    """Train ``groups`` from ``start_epoch`` until ``opts.epochs`` or until every replica has stopped, all
    groups' tasks of an epoch at once on up to ``most_workers`` worker threads (torch's thread count 1
    meanwhile, restored after whatever happens); after each epoch append the losses ``[R]`` to
    ``history.train_loss``, write the checkpoint (``opts.checkpoint``), update the progress bar and call
    ``callback(epoch, history)``."""
    R, epochs = opts.R, opts.epochs
    workers = min(most_workers, sum(g.workers for g in groups))
    pool = bar = None
    old_threads = torch.get_num_threads()
    # everything from the thread count's change on inside the try: an exception or Ctrl-C while the pool or the bar
    # is created must not leave the process at 1 torch thread
    try:
        if workers > 1:
            # replica-parallel: each worker runs its groups with one intra-op thread for a whole epoch, so no
            # per-op barrier waits on a thread that another process has descheduled
            torch.set_num_threads(1)
            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fastcurv-train")
            history.engine = f"{history.engine}, {workers} worker threads"
        bar = tqdm(total=epochs, initial=min(start_epoch, epochs), desc="fastcurv train", unit="epoch",
                   disable={False: True, None: None, True: False}[opts.progress], leave=False)
        for epoch in range(start_epoch, epochs):
            live = [g for g in groups if g.live()]
            if not live:
                break
            _model_tasks(pool, [task for g in live for task in g.train_tasks(epoch)], live)  # (all groups at once)
            _model_tasks(pool, [task for g in live for task in g.eval_tasks()], live)
            ep_loss = torch.full((R,), float("nan"), dtype=torch.float64)  # a group that has stopped: NaN
            for g in live:
                ep_loss[g.idx] = g.end_epoch().cpu()
            history.train_loss.append(ep_loss.tolist())
            if opts.checkpoint is not None:
                save_checkpoint(opts.checkpoint, fingerprint, epoch + 1, groups, R, history.train_loss)
            bar.set_postfix(_progress_fields(ep_loss, groups, R, opts.target_loss))
            bar.update(1)
            if callback is not None:
                fill_history(history, groups, R)  # (the per-replica fields as of this epoch: to_pandas() needs them)
                callback(epoch, history)
    finally:
        try:
            if bar is not None:
                bar.close()
            if pool is not None:
                pool.shutdown()  # (waits for the workers' current epoch: a second Ctrl-C may land here)
        finally:
            if workers > 1:
                torch.set_num_threads(old_threads)


def _run_tasks(pool: ThreadPoolExecutor | None, tasks: list) -> None:
    """Run the tasks, in the worker threads of ``pool`` when there is one (each waits for all)."""
    if pool is None:
        for task in tasks:
            task()
        return
    for f in [pool.submit(task) for task in tasks]:
        f.result()


def _model_tasks(pool: ThreadPoolExecutor | None, tasks: list, groups: list[ReplicaGroup]) -> None:
    """:func:`_run_tasks` of the ``groups``' epoch tasks, with the model's errors named: where vmap
    cannot batch the model (training's vmapped steps: ``nn.LSTM``'s "Batching rule not implemented for
    aten::lstm.input", a sparse embedding's gradient), :class:`~fastcurv.model_run.VmapUnsupportedError`
    naming the module (:func:`~fastcurv.model_run.vmap_error`); an IndexError (token ids beyond an
    embedding's table, past the first samples the checks before training run), the ValueError naming
    the first training samples the model cannot run on (:func:`_bad_samples`). Both were torch's raw
    errors before the twenty-eighth round."""
    try:
        _run_tasks(pool, tasks)
    except IndexError as exc:
        bad = _bad_samples(groups[0])
        if bad is None:
            raise
        raise bad from exc
    except (RuntimeError, NotImplementedError) as exc:
        e = groups[0].engine
        err = None if e.plan is not None or e.per_replica else vmap_error(exc, e._bases[True])
        if err is None:
            raise
        raise err from exc


def _bad_samples(group: ReplicaGroup) -> ValueError | None:
    """The ValueError "the model cannot run on the training samples i to j (inputs ...): ..." for the
    first of the training set's chunks of ``group.batch_size`` samples on which the eval-mode forward
    of the group's first replica (on copies of its buffers) raises, or None
    (:func:`~fastcurv.model_run.first_input_failing`)."""
    e, size = group.engine, group.batch_size
    params = {n: t[0] for n, t in group.params.items()}
    buffers = {n: t[0].clone() for n, t in group.buffers.items()}
    chunks = ((f"the training samples {i} to {min(i + size, len(e.x)) - 1}", e.x[i:i + size])
              for i in range(0, len(e.x), size))
    return first_input_failing(lambda x: e.forward(params, buffers, x, training=False), chunks)


def _progress_fields(ep_loss: torch.Tensor, groups: list[ReplicaGroup], R: int, target_loss: float | None) -> dict:
    """The progress bar's fields after an epoch with losses ``ep_loss [R]``: replicas alive, the finite
    losses' mean/min/max, and (with ``target_loss``) how many replicas have stopped."""
    alive = ep_loss[torch.isfinite(ep_loss)]
    post = {"alive": f"{R - sum(int(g.diverged.sum()) for g in groups)}/{R}"}
    if len(alive):
        post.update(loss_mean=f"{alive.mean():.4g}", min=f"{alive.min():.3g}", max=f"{alive.max():.3g}")
    if target_loss is not None:
        post["done"] = sum(int(g.done.sum()) for g in groups)
    return post


def fill_history(history, groups: list[ReplicaGroup], R: int) -> None:
    """The per-replica fields of ``history`` as of now (copies: the callback may keep them)."""
    history.epochs_run = merged_rows(groups, R, lambda t: t["epochs_run"]).tolist()
    history.steps = merged_rows(groups, R, lambda t: t["state"]["step"]).tolist()
    history.diverged = merged_rows(groups, R, lambda t: t["diverged"]).tolist()
    history.reached_target = merged_rows(groups, R, lambda t: t["done"]).tolist()
