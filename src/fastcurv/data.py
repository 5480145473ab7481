"""Reading the data: once per matvec for all replicas, with optional caching on the device.

:class:`Batches` holds a job's batches; :class:`LoaderPass` is the one walk over a loader that it,
:class:`SplitBatches` and the memory plan's scan (:mod:`fastcurv.memory_job`) share (split each
item, check it, skip empty batches). A job with a memory budget reads one-pass loaders (generators,
iterators) once and keeps their batches (:func:`is_one_pass`, :func:`read_one_pass`), and runs the
batches split when the plan says so (:class:`SplitBatches`).
"""
from __future__ import annotations

import collections.abc
import hashlib
import inspect
from typing import Iterable

import torch

from .ambient import outside_inference
from .losses import as_labels
from .memory_budget import format_bytes, parse_budget

DEFAULT_CACHE_BYTES = 2 << 30  # batches are kept on the device up to this size (cache_data="auto")


def is_single_batch(data) -> bool:
    """True for one ``(inputs, targets)`` pair of tensors rather than a loader."""
    return isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)


# the key pairs a dict batch is read by, (inputs key, targets key), first match first
DICT_KEYS = (("inputs", "targets"), ("x", "y"), ("input", "target"), ("image", "label"))


def split_dict(item: dict, i: int, *, targets_optional: bool = False):
    """``(inputs, targets)`` of dict batch ``i``: the values of the first pair of :data:`DICT_KEYS`
    it holds both keys of (other keys are ignored). ``targets_optional`` (``function_measures``,
    whose targets are optional): a dict holding one inputs key alone gives ``(inputs, None)``.
    Anything else raises a TypeError naming the keys; in particular a dict that mixes two pairs
    (``{"x", "label"}``) is refused rather than read without its labels."""
    for kx, ky in DICT_KEYS:
        if kx in item and ky in item:
            return item[kx], item[ky]
    if targets_optional and len(item) == 1:
        key = next(iter(item))
        if any(key == kx for kx, _ in DICT_KEYS):
            return item[key], None
    pairs = ", ".join(f"{kx}/{ky}" for kx, ky in DICT_KEYS)
    alone = f" (or one inputs key alone: {', '.join(kx for kx, _ in DICT_KEYS)})" if targets_optional else ""
    raise TypeError(f"batch {i} is a dict with keys {sorted(item, key=str)}; expected (inputs, targets) or a dict with "
                    f"one of the key pairs {pairs}{alone}")


def _split(item, i: int):
    """``(inputs, targets)`` of loader item ``i``: a pair (tuple or list; further entries are
    ignored) or a dict (:func:`split_dict`); else a TypeError."""
    if isinstance(item, dict):
        return split_dict(item, i)
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        hint = (" (numpy arrays: pass tensors, e.g. (torch.as_tensor(x), torch.as_tensor(y)))"
                if "numpy" in type(item).__module__ else "")
        raise TypeError(f"batch {i} is a {type(item).__name__}; the loader must yield (inputs, targets) pairs{hint}")
    return item[0], item[1]


def target_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype :class:`Batches` keeps floating targets in for a model of floating ``dtype``: its
    own, and float32 for float16 and bfloat16 models, whose targets are not rounded (a regression
    target of 10.01 is 10.0 in bfloat16): torch's dtype promotion then computes their loss in
    float32, as it does for ``F.mse_loss(bf16 outputs, f32 targets)``. Also the working precision
    of the perturbation measures for such models (``working_precision`` of
    :mod:`fastcurv.measures._common` and :mod:`fastcurv.function.weakness`)."""
    return torch.promote_types(dtype, torch.float32)


def _as_loader(data):
    """``data`` as a loader: one ``(inputs, targets)`` pair becomes a list of that one batch."""
    return [tuple(data)] if is_single_batch(data) else data


def _checked(item, i: int):
    """``(inputs, targets)`` of loader item ``i`` (:func:`_split`), checked: tensors (not numpy
    arrays), with a batch axis and the same batch size (else a TypeError or ValueError naming it)."""
    x, y = _split(item, i)
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        hint = " (convert them with torch.as_tensor)" if "numpy" in type(x).__module__ + type(y).__module__ else ""
        raise TypeError(f"batch {i}: inputs and targets must be tensors, got {type(x).__name__} and "
                        f"{type(y).__name__}{hint}")
    if y.dim() == 0 and x.dim() >= 1:
        raise ValueError(f"batch {i}: the target is a single value (inputs {tuple(x.shape)}): the data yields "
                         "single samples (a Dataset?); batch it, e.g. DataLoader(dataset, batch_size=256)")
    if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(f"batch {i}: inputs {tuple(x.shape)} and targets {tuple(y.shape)} disagree on the batch size")
    return x, y


class LoaderPass:
    """One pass over a loader's batches, the walk that :class:`Batches`, :class:`SplitBatches` and
    the memory plan's scan share: iterating yields ``(i, inputs, targets)`` for every non-empty
    batch, ``i`` its place in the loader, each split (:func:`_split`) and checked (:func:`_checked`)
    but as the loader gave it (not detached, moved or converted). Empty batches are skipped (they add
    nothing to any sum) and counted in ``empty``."""

    def __init__(self, source):
        self.source = source
        self.empty = 0

    def __iter__(self):
        try:
            iterator = iter(self.source)
        except TypeError:
            raise TypeError("data must be a loader (iterable of (inputs, targets)) or one (inputs, targets) pair, got "
                            f"{type(self.source).__name__}") from None
        for i, item in enumerate(iterator):
            x, y = _checked(item, i)
            if x.shape[0] == 0:
                self.empty += 1
                continue
            yield i, x, y

    def no_batches(self) -> ValueError:
        """The error of a pass that found no non-empty batch."""
        return ValueError("the data loader yielded only empty batches" if self.empty
                          else "the data loader yielded no batches (empty loader)")


def _digest(x: torch.Tensor, y: torch.Tensor) -> str:
    """sha1 of a batch's shapes, dtypes and bytes (for the two-pass determinism check)."""
    h = hashlib.sha1()
    for t in (x, y):
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class ClassCounts:
    """Integer labels counted per class (:meth:`Batches.class_counts`): ``per_class`` ``[C]`` (int64,
    on the batches' device) counts the labels in ``[0, C)``, ``ignore_index`` included when it lies
    there; ``ignored`` the labels equal to ``ignore_index`` (0 for an index outside the range that
    no label takes); ``bad`` is ``(label, batch)`` for a label outside ``[0, C)`` other than
    ``ignore_index``, the smallest if one is negative, else the largest (with the first batch
    holding it), or None."""

    def __init__(self, per_class: torch.Tensor, ignored: int, bad: tuple[int, int] | None):
        self.per_class, self.ignored, self.bad = per_class, ignored, bad

    @classmethod
    def of(cls, batches, C: int, ignore: int) -> "ClassCounts":
        per_class = None
        index, ignored, lows, highs = [], [], [], []
        for i, _, y in batches:
            if y.is_floating_point():
                continue
            index.append(i)
            y = y.reshape(-1)
            inside = (y >= 0) & (y < C)
            # (the labels outside [0, C) go to one bin more, C: bincount takes no negatives)
            n = torch.bincount(torch.where(inside, y, C), minlength=C + 1)[:C]
            per_class = n if per_class is None else per_class + n
            ignored.append((y == ignore).sum())
            bad = ~inside & (y != ignore)
            lows.append(torch.where(bad, y, torch.iinfo(y.dtype).max).min())
            highs.append(torch.where(bad, y, torch.iinfo(y.dtype).min).max())
        if per_class is None:
            raise ValueError("the data holds no integer labels to count")
        lo, hi = torch.stack(lows).cpu(), torch.stack(highs).cpu()
        bad = None  # (argmin / argmax: the first batch holding the label)
        if int(lo.min()) < 0:
            bad = (int(lo.min()), index[int(lo.argmin())])
        elif int(hi.max()) >= C:
            bad = (int(hi.max()), index[int(hi.argmax())])
        return cls(per_class, int(torch.stack(ignored).sum()), bad)


class Batches:
    """The batches of ``data`` (a loader or one ``(inputs, targets)`` pair), moved to ``device``.

    The first pass (done at construction) validates every batch, counts the samples and, when
    ``cache`` allows, keeps the batches on the device so that later passes do not re-read the
    loader. Iterating yields ``(index, inputs, targets)``: floating inputs in ``dtype``, floating
    targets in :func:`target_dtype` (float32 for a half-precision model), integer targets as int64.

    The first pass also notes what the losses check: the kinds of the targets and the range of
    integer targets (``label_range``); :meth:`class_counts` counts the labels of each class, for the
    losses that need it, in a pass of its own.

    Args:
        cache: True, False or "auto" (cache when the batches take at most ``max_cache_bytes``).
    """

    def __init__(self, data, *, device, dtype, cache="auto", max_cache_bytes: int = DEFAULT_CACHE_BYTES,
                 check_determinism: bool = False):
        if cache not in (True, False, "auto"):
            raise ValueError(f"cache_data must be True, False or 'auto', got {cache!r}")
        self.source = _as_loader(data)
        # a loader's batches (not a list's) are copied where moving them made no copy: a loader may
        # refill one buffer for every batch (prefetching pipelines do), and the batches, the fused
        # engine's cached state and func's retained graphs keep what they are given
        self._copy = not isinstance(self.source, (list, tuple))
        # the bytes of the cached batches that are this object's own (converted or copied), not the
        # caller's tensors themselves
        self.owned_bytes = 0
        self.device, self.dtype = torch.device(device), dtype
        self.cache: list | None = [] if cache in (True, "auto") else None
        self.sizes: list[int] = []
        # integer targets' smallest and largest value with the batches holding them, and the
        # targets' kinds (dtype class and per-sample shape) with the first batch of each
        self.label_range: tuple[int, int, int, int] | None = None
        self.target_kinds: dict = {}
        self._class_counts: dict = {}  # class_counts' results, by (num_classes, ignore_index)
        nbytes = 0
        digests = []
        walk = LoaderPass(self.source)
        for i, (x, y, fresh) in enumerate(self._read(walk)):
            self.sizes.append(x.shape[0])
            self._note_targets(i, y)
            if check_determinism:
                digests.append(_digest(x, y))
            if self.cache is not None:
                nbytes += x.numel() * x.element_size() + y.numel() * y.element_size()
                if cache == "auto" and nbytes > max_cache_bytes:
                    self.cache = None
                else:
                    self.cache.append((x, y))
                    self.owned_bytes += fresh

        self.skipped_empty = walk.empty  # batches of no samples in the first pass: skipped (they add nothing to any sum)
        if self.cache is None:
            self.owned_bytes = 0
        if not self.sizes:
            raise walk.no_batches()
        self.num_samples = sum(self.sizes)
        if check_determinism:
            self._check_second_pass(digests)

    def _note_targets(self, i: int, y: torch.Tensor) -> None:
        """Note batch ``i``'s targets ``y``: their kind, and integer targets' range."""
        kind = ("float" if y.is_floating_point() else "int", tuple(y.shape[1:]))
        self.target_kinds.setdefault(kind, i)
        if y.is_floating_point() or y.numel() == 0:
            return
        lo, hi = int(y.min()), int(y.max())
        if self.label_range is None:
            self.label_range = (lo, i, hi, i)
        else:
            l0, il, h0, ih = self.label_range
            self.label_range = (min(lo, l0), i if lo < l0 else il, max(hi, h0), i if hi > h0 else ih)

    def class_counts(self, num_classes: int, ignore_index: int) -> "ClassCounts":
        """The integer targets (every entry: all positions of ``[N, ...]`` labels) counted per class
        of ``num_classes`` (:class:`ClassCounts`), for the class-weighted means of torch's
        ``CrossEntropyLoss`` / ``NLLLoss``: one pass over the batches (the cached ones, else the
        loader again), counted on the device (``torch.bincount``, one transfer at the end), and kept
        for the next call with the same arguments."""
        key = (int(num_classes), int(ignore_index))
        if key not in self._class_counts:
            self._class_counts[key] = ClassCounts.of(self, *key)
        return self._class_counts[key]

    def _check_second_pass(self, digests: list[str]) -> None:
        """Read the loader again and raise if any batch differs from the first pass."""
        n = 0
        for i, (x, y, _) in enumerate(self._read()):
            if i >= len(digests) or _digest(x, y) != digests[i]:
                what = "an extra batch" if i >= len(digests) else f"batch {i} differs"
                raise ValueError(
                    f"the loader is not deterministic: {what} between two passes (shuffle=True or random "
                    "augmentation?). The Hessian must see the same data on every matvec: use a loader without "
                    "shuffling/augmentation, or cache_data=True without check_determinism to freeze one pass"
                )
            n += 1
        if n != len(digests):
            raise ValueError(f"the loader is not deterministic: {n} batches on the second pass, {len(digests)} on the first")

    def __len__(self):
        return len(self.sizes)

    def _read(self, walk: LoaderPass | None = None) -> Iterable:
        """``(inputs, targets, bytes of them that are new tensors, not the loader's)`` per non-empty
        batch of ``walk`` (a new :class:`LoaderPass` over the source when None: it checks the batches
        and skips empty ones), detached (no autograd graph) and moved to the device and dtype (floating
        targets to :func:`target_dtype`)."""
        for i, x, y in LoaderPass(self.source) if walk is None else walk:
            # data, not part of a graph: targets made by a teacher net (y = teacher(x)) or inputs that
            # require grad would otherwise carry their graph into every product (and the fused
            # engine's in-place writes, which autograd refuses on tensors that require grad)
            x, y = x.detach(), y.detach()
            x0, y0 = x, y
            x, y = outside_inference(x), outside_inference(y)  # (autograd cannot save inference tensors)
            if x.is_floating_point():
                if not torch.isfinite(x).all():
                    raise ValueError(f"batch {i}: the inputs contain NaN or Inf")
                x = x.to(self.device, self.dtype)
            else:
                x = x.to(self.device)
            if y.is_floating_point():
                if not torch.isfinite(y).all():
                    raise ValueError(f"batch {i}: the targets contain NaN or Inf")
                y = y.to(self.device, target_dtype(self.dtype))
            else:
                y = as_labels(y).to(self.device)
            if self._copy:
                x = x.clone() if x.data_ptr() == x0.data_ptr() else x
                y = y.clone() if y.data_ptr() == y0.data_ptr() else y
            fresh = sum(t.numel() * t.element_size() for t, t0 in ((x, x0), (y, y0)) if t.data_ptr() != t0.data_ptr())
            yield x, y, fresh

    def __iter__(self):
        if self.cache is not None:
            yield from ((i, x, y) for i, (x, y) in enumerate(self.cache))
            return
        n = 0
        for i, (x, y, _) in enumerate(self._read()):
            if i >= len(self.sizes) or x.shape[0] != self.sizes[i]:
                raise RuntimeError(
                    "the loader yielded different batches on a later pass (sizes changed); use a deterministic loader or cache_data=True"
                )
            n += 1
            yield i, x, y
        if n != len(self.sizes):
            raise RuntimeError(f"the loader yielded {n} batches on a later pass but {len(self.sizes)} on the first")

    @property
    def cached(self) -> bool:
        return self.cache is not None


# --- loaders for a job with a memory budget --------------------------------------------------------
class _KeptBatches(list):
    """The batches of a one-pass loader, read once by :func:`read_one_pass` (a list: the plan and
    the job read it again)."""


def is_one_pass(data) -> bool:
    """Whether ``data`` is a one-pass loader, which :func:`read_one_pass` reads once and keeps: a
    generator, a DataLoader's iterator, or an iterator (it has ``__next__``) whose type has no
    ``__len__`` (``iter(list)``, ``map``, ``zip``, ``itertools``). Anything else (a list, a
    DataLoader, one batch, a loader whose ``__iter__`` resets and returns ``self`` and that has a
    ``__len__``) is taken as re-iterable, ``iter()`` starting a new pass. Decided from the type
    alone: ``iter()`` is not called (on a DataLoader it would start workers and draw a seed from
    torch's random generator)."""
    if isinstance(data, Batches) or is_single_batch(data):
        return False
    if inspect.isgenerator(data):
        return True
    loader_iter = getattr(getattr(torch.utils.data, "dataloader", None), "_BaseDataLoaderIter", None)
    if loader_iter is not None and isinstance(data, loader_iter):  # (it has a __len__, but one pass)
        return True
    return isinstance(data, collections.abc.Iterator) and not hasattr(type(data), "__len__")


def _kept_bytes(t, dtype, targets=False) -> int:
    """The bytes of a batch's tensor ``t`` kept on the device as :class:`Batches` converts it
    (floating inputs to ``dtype``, floating targets to :func:`target_dtype`, integer targets to
    int64); 0 for anything else."""
    if not isinstance(t, torch.Tensor):
        return 0
    if t.is_floating_point():
        return t.numel() * (target_dtype(dtype) if targets else dtype).itemsize
    if targets and t.dtype != torch.int64:  # (losses.as_labels: uint8, int32 and bool labels become int64)
        return t.numel() * 8
    return t.numel() * t.element_size()


def read_one_pass(models, data, cache_data="auto", budget=None):
    """``(data, cache_data)`` for a job with a memory budget, whose plan reads the data before the
    job does. A one-pass loader (:func:`is_one_pass`: a generator, or an iterator whose type has no
    ``__len__``) is read here, once, into a list of its batches on the models' device and dtype
    (converted and copied where the loader's own tensors could be refilled, as :class:`Batches`
    does), which the plan and the job then both read, with ``cache_data=True`` (they stay in
    memory, and the plan counts them). ``cache_data=False`` cannot be honoured then (every product
    re-reads the batches): ValueError. With ``budget``, reading stops with a ValueError once the batches read
    take more than ``SAFETY * budget`` (:data:`fastcurv.memory_model.SAFETY`; they could never fit;
    a stream larger than the machine's memory is not read whole first). Other data (lists,
    DataLoaders, one batch, :class:`Batches`, loaders with a ``__len__``) is returned as it is, not
    iterated."""
    from .memory_model import SAFETY

    if not is_one_pass(data):
        return data, cache_data
    name = type(data).__name__
    if cache_data is False:
        raise ValueError("cache_data=False with memory_budget= needs a re-iterable loader (a list of batches, a "
                         f"DataLoader): this {name} is read as a one-pass loader (a generator, or an iterator whose "
                         "type has no __len__), but without caching every Hessian product reads the batches again; "
                         "pass cache_data='auto' (its batches are then kept, within the budget) or a re-iterable "
                         "loader (a loader whose __iter__ starts a new pass and returns self needs a __len__ to be "
                         "taken as one)")
    p = next(models[0].parameters())
    nbytes = None if budget is None else parse_budget(budget, p.device)
    limit = None if nbytes is None else SAFETY * nbytes

    def limited():
        kept = 0
        for i, item in enumerate(data):
            if limit is not None:
                try:
                    x, y = _split(item, i)
                except TypeError:
                    yield item  # (Batches names the problem)
                    continue
                kept += _kept_bytes(x, p.dtype) + _kept_bytes(y, p.dtype, targets=True)
                if kept > limit:
                    raise ValueError(
                        f"memory_budget={format_bytes(nbytes)} is too small for the batches of this one-pass {name}: "
                        "a one-pass loader (a generator, or an iterator whose type has no __len__) can be read only "
                        "once, so its batches must be kept on the device for every Hessian product, and its first "
                        f"{i + 1} batches already take {format_bytes(kept)}, more than the budget allows "
                        f"({SAFETY:.0%} of it, {format_bytes(limit)}); reading stopped there. Pass a re-iterable "
                        "loader (a list of batches, a DataLoader: its batches are read again in every product when "
                        "they do not fit) or a larger budget")
            yield item

    batches = Batches(limited(), device=p.device, dtype=p.dtype, cache=True)
    return _KeptBatches((x, y) for _, x, y in batches), True


class SplitBatches:
    """The batches of ``data`` (a loader or one ``(inputs, targets)`` pair) cut into pieces of at
    most ``max_batch`` samples, in order; re-iterable when ``data`` is. Each pass walks ``data``
    once (:class:`LoaderPass`: checked, empty batches skipped); :meth:`given_sizes` are the sizes of
    the batches as given, before the cuts."""

    def __init__(self, data, max_batch: int):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.source = _as_loader(data)
        self.max_batch = int(max_batch)
        self._given: list[int] | None = None  # the batch sizes of the last whole pass

    def __iter__(self):
        sizes = []
        for _, x, y in LoaderPass(self.source):
            sizes.append(int(x.shape[0]))
            for a in range(0, x.shape[0], self.max_batch):
                yield x[a:a + self.max_batch], y[a:a + self.max_batch]
        self._given = sizes

    def given_sizes(self) -> list[int]:
        """The sizes of ``data``'s non-empty batches, before the cuts: those of the last whole pass
        (a :class:`Batches` over this object makes one), else of a new pass over ``data``."""
        if self._given is None:
            self._given = [int(x.shape[0]) for _, x, _ in LoaderPass(self.source)]
        return list(self._given)
