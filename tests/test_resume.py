"""Resumable chunked jobs: atomic per-chunk saves, skip-on-restart, SIGKILL and Ctrl-C."""
import copy
import functools
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastcurv
from fastcurv import fingerprint, paths, resume, results_file
from fastcurv.resume import FingerprintMismatch

sys.path.insert(0, os.path.dirname(__file__))
import _dist_worker as W  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "_dist_worker.py")


def chunks_in(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().splitlines()
    return [json.loads(ln) for ln in lines[1:]]


def test_chunked_equals_unchunked_and_rerun_skips(tmp_path, monkeypatch):
    models, data = W.job(R=5)
    ref = fastcurv.batched_sharpness(models, data, **W.KW)
    out = str(tmp_path / "r.jsonl")
    first = fastcurv.batched_sharpness(models, data, replica_chunk=2, output=out, **W.KW)
    assert [(c["start"], c["stop"]) for c in chunks_in(out)] == [(0, 2), (2, 4), (4, 5)]
    for k, v in ref.values.items():
        torch.testing.assert_close(first[k], v, rtol=1e-10, atol=1e-12)
    assert first.flags == ref.flags and torch.equal(first.ok, ref.ok)

    def no_compute(*a, **k):
        raise AssertionError("nothing should be recomputed")

    monkeypatch.setattr(fastcurv.sharpness, "batched_sharpness", no_compute)
    again = fastcurv.batched_sharpness(models, data, replica_chunk=2, output=out, **W.KW)
    for k, v in first.values.items():
        assert torch.equal(again[k], v) and again[k].dtype == v.dtype
    assert torch.equal(again.spectrum.nodes, first.spectrum.nodes)


def test_fingerprint_mismatch_names_what_changed(tmp_path):
    models, data = W.job(R=2)
    out = str(tmp_path / "r.jsonl")
    fastcurv.batched_sharpness(models, data, output=out, **W.KW)
    with pytest.raises(FingerprintMismatch, match="seed"):
        fastcurv.batched_sharpness(models, data, output=out, seed=1, **W.KW)
    other, _ = W.job(R=2, seed=5)
    with pytest.raises(FingerprintMismatch, match="models"):
        fastcurv.batched_sharpness(other, data, output=out, **W.KW)
    x, y = data[0]
    with pytest.raises(FingerprintMismatch, match="data"):
        fastcurv.batched_sharpness(models, [(x, y)], output=out, **W.KW)
    # the same samples and labels, paired otherwise or batched otherwise
    xs, ys = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    sizes = [b[0].shape[0] for b in data]
    for other in ([(a, b) for a, b in zip(xs.split(sizes), ys.flip(0).split(sizes))],
                  [(xs[i:i + 3], ys[i:i + 3]) for i in range(0, len(xs), 3)]):
        with pytest.raises(FingerprintMismatch, match="data"):
            fastcurv.batched_sharpness(models, other, output=out, **W.KW)
    assert fastcurv.batched_sharpness(models, list(zip(xs.split(sizes), ys.split(sizes))), output=out, **W.KW).ok.all()
    (tmp_path / "junk.jsonl").write_text("hello\n")
    with pytest.raises(ValueError, match="not a fastcurv results file"):
        fastcurv.batched_sharpness(models, data, output=str(tmp_path / "junk.jsonl"), **W.KW)


def test_independent_probes_do_not_depend_on_the_split():
    models, data = W.job(R=5)
    kw = dict(W.KW, common_random_numbers=False)
    plain = fastcurv.batched_sharpness(models, data, **kw)  # no replica_chunk: no replica window
    whole = fastcurv.batched_sharpness(models, data, replica_chunk=5, **kw)
    split = fastcurv.batched_sharpness(models, data, replica_chunk=2, **kw)
    for k, v in whole.values.items():
        torch.testing.assert_close(split[k], v, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(plain[k], v, rtol=1e-10, atol=1e-12)
    # the probes really are independent: replicas 0 and 1 as a chunk of their own, with common probes, differ
    common = fastcurv.batched_sharpness(models, data, replica_chunk=2, **W.KW)
    assert not torch.allclose(common["trace"], split["trace"], rtol=1e-6)
    with pytest.raises(ValueError, match="common_random_numbers=True"):
        fastcurv.batched_sharpness(models, data, replica_chunk=2, measures=("lambda_max", "pac_bayes"),
                                   common_random_numbers=False, progress=False)


def _start(out):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    # SIGINT at its default, so that the child's Python turns it into KeyboardInterrupt even when this
    # process was started with SIGINT ignored (as a shell does for a background job)
    return subprocess.Popen([sys.executable, WORKER, out, "slow"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_chunks(proc, out, n, timeout=60):
    t0 = time.time()
    while len(chunks_in(out)) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, "the job wrote no chunk in time"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_killed_job_resumes_to_the_uninterrupted_result(tmp_path, sig):
    out = str(tmp_path / "job.jsonl")
    proc = _start(out)
    _wait_for_chunks(proc, out, 1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    done = chunks_in(out)
    assert 1 <= len(done) < 3, "killed after the first chunk, before the last"
    assert not os.path.exists(out + ".pt")
    if sig == signal.SIGINT:  # Ctrl-C: a clean message naming the saved results, no half-written file
        assert proc.returncode != 0 and b"rerun the same call to resume" in err
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    resumed = subprocess.run([sys.executable, WORKER, out], env=dict(os.environ, PYTHONPATH=os.path.dirname(__file__)),
                             capture_output=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert [(c["start"], c["stop"]) for c in chunks_in(out)][: len(done)] == [(c["start"], c["stop"]) for c in done]
    got = torch.load(out + ".pt")
    models, data = W.job(R=6)
    ref = fastcurv.batched_sharpness(models, data, replica_chunk=2, **W.KW)
    assert set(got) == set(ref.values)
    for k, v in ref.values.items():
        assert torch.equal(got[k], v), k


def test_files_resume_across_the_two_entry_points(tmp_path):
    """A file written through fastcurv.distributed.batched_sharpness (its documented route for
    gather="rank0") resumes through fastcurv.batched_sharpness and back: the fingerprint fills in
    the defaults (it listed every defaulted keyword as changed)."""
    from fastcurv import distributed

    models, data = W.job(R=3)
    a, b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    first = distributed.batched_sharpness(models, data, output=a, use_distributed=False, measures=("lambda_max",), progress=False)
    again = fastcurv.batched_sharpness(models, data, output=a, measures=("lambda_max",), progress=False)
    assert torch.equal(again["lambda_max"], first["lambda_max"])
    fastcurv.batched_sharpness(models, data, output=b, measures=("lambda_max",), progress=False)
    distributed.batched_sharpness(models, data, output=b, use_distributed=False, measures=("lambda_max",), progress=False)


def test_replicas_all_nan_in_a_chunk():
    """A chunk (or a whole job) of NaN replicas gives NaN results and flags (the fused engine's check
    on the first batch raised on it)."""
    models, data = W.job(R=3)
    with torch.no_grad():
        for p in models[0].parameters():
            p.fill_(float("nan"))
    for kw in (dict(replica_chunk=1), {}):
        res = fastcurv.batched_sharpness(models, data, measures=("lambda_max", "trace"), progress=False, **kw)
        assert res.flags[0] == "non-finite parameters" and res.ok.tolist() == [False, True, True]
    alone = fastcurv.batched_sharpness(models[:1], data, progress=False)
    assert alone.flags == ["non-finite parameters"] and alone["lambda_max"].isnan().all()


def _mlp_pair():
    """Two replicas of a 5-8-3 ReLU MLP (float64) and a copy of them with Tanh, the same weights."""
    models, data = W.job(R=2)
    relu = [nn.Sequential(m[0], nn.ReLU(), m[2]) for m in models]
    tanh = [nn.Sequential(copy.deepcopy(m[0]), nn.Tanh(), copy.deepcopy(m[2])) for m in models]
    return relu, tanh, data


def test_module_settings_are_part_of_the_fingerprint(tmp_path):
    """Equal weights, another activation: refused, naming the module (the ReLU results came back)."""
    relu, tanh, data = _mlp_pair()
    out = str(tmp_path / "r.jsonl")
    kw = dict(measures=("lambda_max",), max_iter=20, progress=False)
    fastcurv.batched_sharpness(relu, data, output=out, **kw)
    with pytest.raises(FingerprintMismatch, match=r"architecture \(module 1: ReLU\(\) -> Tanh\(\)\), models"):
        fastcurv.batched_sharpness(tanh, data, output=out, **kw)
    a = [nn.Sequential(copy.deepcopy(m[0]), nn.Dropout(0.1), copy.deepcopy(m[2])) for m in relu]
    b = [nn.Sequential(copy.deepcopy(m[0]), nn.Dropout(0.5), copy.deepcopy(m[2])) for m in relu]
    assert resume.models_digest(a) != resume.models_digest(b)


def test_callables_are_fingerprinted_by_what_they_compute(tmp_path):
    """A loss was identified by its name: every lambda, every functools.partial, the same."""
    d = resume.describe
    ce = functools.partial(F.cross_entropy, label_smoothing=0.0)
    assert d(ce) == d(functools.partial(F.cross_entropy, label_smoothing=0.0))
    assert d(ce) != d(functools.partial(F.cross_entropy, label_smoothing=0.5))
    assert d(lambda o, t: F.cross_entropy(o, t)) != d(lambda o, t: 3.0 * F.cross_entropy(o, t))

    def scaled(s):
        return lambda o, t: s * F.cross_entropy(o, t)

    assert d(scaled(1.0)) == d(scaled(1.0)) and d(scaled(1.0)) != d(scaled(3.0))
    assert d(nn.CrossEntropyLoss(label_smoothing=0.1)) != d(nn.CrossEntropyLoss(label_smoothing=0.2))
    assert d({"seed": np.int64(3)}) == d({"seed": 3})
    assert d(scaled(torch.tensor(2.0))) == d(scaled(torch.tensor(2.0))) != d(scaled(torch.tensor(3.0)))  # 0-dim crashed

    models, data = W.job(R=2)
    out = str(tmp_path / "r.jsonl")
    kw = dict(measures=("lambda_max",), max_iter=20, progress=False)
    fastcurv.batched_sharpness(models, data, output=out, loss=scaled(1.0), **kw)
    fastcurv.batched_sharpness(models, data, output=out, loss=scaled(1.0), **kw)  # the same function: resumed
    with pytest.raises(FingerprintMismatch, match="differs in: loss"):
        fastcurv.batched_sharpness(models, data, output=out, loss=scaled(3.0), **kw)

    class Opaque:  # no stable repr: cannot be fingerprinted, so a rerun is refused, saying so
        pass

    holder = Opaque()
    opaque = str(tmp_path / "o.jsonl")
    fastcurv.batched_sharpness(models, data, output=opaque, loss=lambda o, t: F.cross_entropy(o, t) + 0 * id(holder), **kw)
    with pytest.raises(FingerprintMismatch, match="loss .it cannot be fingerprinted reliably: a .*Opaque has no stable"):
        fastcurv.batched_sharpness(models, data, output=opaque,
                                   loss=lambda o, t: F.cross_entropy(o, t) + 0 * id(holder), **kw)


def test_equivalent_arguments_and_memory_budgets_resume(tmp_path, monkeypatch):
    """A measure name or a list of it, measure_options None or {}, a numpy seed, a memory budget:
    the same job, resumed (each was refused); batches a budget splits sign as the batches given."""
    models, data = W.job(R=2)
    out = str(tmp_path / "r.jsonl")
    kw = dict(max_iter=20, progress=False)
    first = fastcurv.batched_sharpness(models, data, output=out, measures=("lambda_max",), **kw)
    monkeypatch.setattr(fastcurv.sharpness, "batched_sharpness", lambda *a, **k: pytest.fail("recomputed"))
    for same in (dict(measures="lambda_max", measure_options={}), dict(measures=["lambda_max"], seed=np.int64(0)),
                 dict(measures=("lambda_max",), memory_budget="64KiB")):
        again = fastcurv.batched_sharpness(models, data, output=out, **same, **kw)
        assert torch.equal(again["lambda_max"], first["lambda_max"])
    from fastcurv.data import Batches, SplitBatches

    whole = Batches(data, device="cpu", dtype=torch.float64)
    split = Batches(SplitBatches(data, 3), device="cpu", dtype=torch.float64)
    assert split.sizes != whole.sizes and resume.data_signature(split) == resume.data_signature(whole)


class _CountingLoader:
    """A re-iterable loader that counts its passes."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def test_split_batches_sign_as_given_without_another_pass_over_the_loader():
    """The fingerprint of batches that a memory plan split (SplitBatches) read the caller's loader
    once more, only for the sizes of its batches as given (resume re-walked it as Batches does): one
    more pass over a DataLoader per job. SplitBatches keeps the sizes of the pass it made."""
    from fastcurv.data import Batches, SplitBatches

    _, ((x0, y0), (x1, y1)) = W.job(R=1)
    loader = _CountingLoader([(x0, y0), (x0[:0], y0[:0]), (x1, y1)])  # (an empty batch: skipped, as Batches does)
    split = Batches(SplitBatches(loader, 3), device="cpu", dtype=torch.float64)
    assert loader.passes == 1 and split.sizes == [3] * 5 + [1] + [3] * 4 + [2]
    signature = resume.data_signature(split)
    assert loader.passes == 1 and signature["batches"] == [16, 14]
    assert signature == resume.data_signature(Batches([(x0, y0), (x1, y1)], device="cpu", dtype=torch.float64))


def test_damaged_results_files_are_named(tmp_path):
    """A cut-off record: a warning naming the file and line, its replicas computed again (a raw
    JSONDecodeError without the file's name made every saved chunk unusable); a header that is not
    an object: 'not a fastcurv results file' (it was an AttributeError)."""
    models, data = W.job(R=3)
    out = tmp_path / "r.jsonl"
    kw = dict(measures=("lambda_max",), max_iter=20, progress=False, replica_chunk=1)
    ref = fastcurv.batched_sharpness(models, data, output=str(out), **kw)
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:-1] + [lines[-1][:40]]) + "\n")
    with pytest.warns(RuntimeWarning, match=r"r.jsonl: line 4 is damaged .*computed again"):
        again = fastcurv.batched_sharpness(models, data, output=str(out), **kw)
    assert torch.equal(again["lambda_max"], ref["lambda_max"])
    assert [json.loads(ln)["start"] for ln in out.read_text().splitlines()[1:]] == [0, 1, 2]
    out.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="r.jsonl is not a fastcurv results file"):
        fastcurv.batched_sharpness(models, data, output=str(out), **kw)


def test_output_paths_are_checked_before_any_work(tmp_path, monkeypatch):
    """A missing folder is created (the first chunk was computed, then lost to a FileNotFoundError
    naming the temporary file); a folder at the path is refused before computing."""
    models, data = W.job(R=2)
    kw = dict(measures=("lambda_max",), max_iter=20, progress=False, replica_chunk=1)
    deep = tmp_path / "missing" / "dir" / "r.jsonl"
    assert fastcurv.batched_sharpness(models, data, output=str(deep), **kw).ok.all() and deep.is_file()
    monkeypatch.setattr(fastcurv.sharpness, "batched_sharpness", lambda *a, **k: pytest.fail("computed"))
    with pytest.raises(ValueError, match="is a folder"):
        fastcurv.batched_sharpness(models, data, output=str(tmp_path), **kw)
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match="a file is in the way"):
        fastcurv.batched_sharpness(models, data, output=str(tmp_path / "afile" / "r.jsonl"), **kw)
    with pytest.raises(ValueError, match="path .* is a folder"):
        fastcurv.invariance_audit(models, data, measures=("lambda_max",), path=str(tmp_path))


def test_results_are_strict_json(tmp_path):
    """NaN results were written as the bare token NaN, which strict JSON parsers reject."""
    models, data = W.job(R=2)
    with torch.no_grad():
        models[1][0].weight[0, 0] = float("nan")
    out = tmp_path / "r.jsonl"
    kw = dict(measures=("lambda_max",), max_iter=20, progress=False)
    with pytest.warns(RuntimeWarning):
        first = fastcurv.batched_sharpness(models, data, output=str(out), **kw)

    def strict(c):
        raise ValueError(f"not strict JSON: {c}")

    for line in out.read_text().splitlines():
        json.loads(line, parse_constant=strict)
    again = fastcurv.batched_sharpness(models, data, output=str(out), **kw)
    assert again["lambda_max"][1].isnan() and torch.equal(again["lambda_max"][:1], first["lambda_max"][:1])


def test_invariance_audit_with_an_output_file(tmp_path):
    """The reparameterized models' results go to a file of their own (the audit's second job
    opened the same file and was refused: 'differs in: models')."""
    models, data = W.job(R=2)
    relu = [nn.Sequential(m[0], nn.ReLU(), m[2]) for m in models]
    out = tmp_path / "audit.jsonl"
    kw = dict(measures=("lambda_max",), max_iter=20, progress=False)
    aud = fastcurv.invariance_audit(relu, data, output=str(out), replica_chunk=1, **kw)
    assert out.is_file() and (tmp_path / "audit.reparam.jsonl").is_file()
    again = fastcurv.invariance_audit(relu, data, output=str(out), replica_chunk=1, **kw)  # resumed
    assert again.table["after_mean"].equals(aud.table["after_mean"])
    # the models' own file is the plain job's: it resumes there too
    plain = fastcurv.batched_sharpness(relu, data, output=str(out), replica_chunk=1, **kw)
    assert torch.equal(plain["lambda_max"], aud.per_replica["lambda_max"][0].to(plain["lambda_max"].dtype))


def test_interrupt_message_counts_what_the_file_holds(tmp_path, monkeypatch, capsys):
    """Ctrl-C right after a chunk's write: the message counted the list in memory, one chunk short."""
    models, data = W.job(R=3)
    real, calls = results_file.write_atomic, []

    def write_then_interrupt(*a, **k):
        real(*a, **k)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(results_file, "write_atomic", write_then_interrupt)  # (where ResultStore.add reads it)
    with pytest.raises(KeyboardInterrupt):
        fastcurv.batched_sharpness(models, data, output=str(tmp_path / "r.jsonl"), replica_chunk=1,
                                   measures=("lambda_max",), max_iter=20, progress=False)
    assert "2 finished replicas are saved" in capsys.readouterr().err


def test_numpy_arrays_are_fingerprinted_by_their_bytes_and_numpy_seeds_work(tmp_path):
    """A 2001-entry numpy table differing in the middle had the same (elided) repr: the other table's
    results were resumed (0.819 for 2.457). A numpy integer seed failed in torch's generator."""
    a = np.zeros(2001)
    b = a.copy()
    b[1000] = 1.0
    assert resume.describe(a) != resume.describe(b) and resume.describe(a) == resume.describe(a.copy())
    models, data = W.job(R=2)
    res = fastcurv.batched_sharpness(models, data, measures=("lambda_max",), max_iter=20, progress=False, seed=np.int64(3))
    ref = fastcurv.batched_sharpness(models, data, measures=("lambda_max",), max_iter=20, progress=False, seed=3)
    assert torch.equal(res["lambda_max"], ref["lambda_max"])


def test_max_matrix_bytes_is_not_part_of_the_fingerprint(tmp_path, monkeypatch):
    """epsilon_sharpness_subspace's max_matrix_bytes changes memory, not results (the matrix is the
    same cached or regenerated): a rerun that adds or changes it resumes (it was refused with a
    FingerprintMismatch in measure_options); the other options still count; a call without it
    fingerprints as before (measure_options kept as given), so files written before resume."""
    from fastcurv.sharpness import result_settings

    models, data = W.job(R=2)
    name = "epsilon_sharpness_subspace"
    out = str(tmp_path / "r.jsonl")
    kw = dict(measures=(name,), progress=False)
    opts = {"p": 10, "n_iter": 2}
    first = fastcurv.batched_sharpness(models, data, output=out, measure_options={name: opts}, **kw)
    monkeypatch.setattr(fastcurv.sharpness, "batched_sharpness", lambda *a, **k: pytest.fail("recomputed"))
    for extra in ({"max_matrix_bytes": 0}, {"max_matrix_bytes": None}, {"max_matrix_bytes": 1 << 30}):
        again = fastcurv.batched_sharpness(models, data, output=out, measure_options={name: {**opts, **extra}}, **kw)
        assert torch.equal(again[name], first[name]) and again.settings["measure_options"] == {name: opts}
    with pytest.raises(FingerprintMismatch, match="measure_options"):
        fastcurv.batched_sharpness(models, data, output=out, measure_options={name: {**opts, "n_iter": 3}}, **kw)
    # max_matrix_bytes alone: as if no options were given
    assert result_settings({"measure_options": {name: {"max_matrix_bytes": 0}}})["measure_options"] is None
    given = {name: opts, "rho_sharpness": {"rho": 0.1}}
    assert result_settings({"measure_options": given})["measure_options"] is given


# module-level settings read by the losses below (the tests change them as a user edits a script)
LABEL_SMOOTHING = 0.0
CLASS_WEIGHTS = torch.ones(3, dtype=torch.float64)


def _smoothed(o, t):
    return F.cross_entropy(o, t, label_smoothing=LABEL_SMOOTHING)


def _scale(v):
    return v


def _weighted_helper(o, t):
    return _scale(F.cross_entropy(o, t, weight=CLASS_WEIGHTS))


class _NoRepr:
    pass


_OPAQUE = _NoRepr()


def _reads_opaque(o, t):
    return F.cross_entropy(o, t) + 0 * id(_OPAQUE)


def test_a_loss_is_fingerprinted_with_the_module_settings_it_reads(tmp_path, monkeypatch):
    """A loss reading a module-level ``LABEL_SMOOTHING``: a rerun after the setting changed 0.0 ->
    0.5 resumed, mixing the two settings (replica 0 kept 1.48671 where the 0.5 run gives 1.47301,
    0.9 % off); only the names a function reads were hashed, not their values. The same for a
    global tensor, a helper whose body changed and (via the helper) what the helper reads; a value
    with no stable description makes the rerun be refused, saying so. Library functions are
    described as before (their module's globals are no settings)."""
    d = resume.describe
    models, data = W.job(R=2)
    out = str(tmp_path / "r.jsonl")
    kw = dict(measures=("lambda_max",), max_iter=20, progress=False, loss=_smoothed)
    fastcurv.batched_sharpness(models, data, output=out, **kw)
    fastcurv.batched_sharpness(models, data, output=out, **kw)  # the same setting: resumed
    monkeypatch.setitem(globals(), "LABEL_SMOOTHING", 0.5)
    with pytest.raises(FingerprintMismatch, match="differs in: loss"):
        fastcurv.batched_sharpness(models, data, output=out, **kw)

    before = d(_weighted_helper)
    monkeypatch.setitem(globals(), "CLASS_WEIGHTS", torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64))
    weights_changed = d(_weighted_helper)
    monkeypatch.setitem(globals(), "_scale", lambda v: 2 * v)
    assert len({json.dumps(x, sort_keys=True) for x in (before, weights_changed, d(_weighted_helper))}) == 3
    assert d(_weighted_helper) == d(_weighted_helper)
    assert d(_weighted_helper)["globals"]["F"] == {"python module": "torch.nn.functional"}  # (not its path)
    assert fingerprint._unreliable_reasons(d(_reads_opaque)) == ["a _NoRepr has no stable representation"]
    assert "globals" not in d(F.cross_entropy) and not fingerprint._unreliable_reasons(d(F.cross_entropy))


def test_a_path_starting_with_a_tilde_is_in_the_home_folder(tmp_path, monkeypatch):
    """``output="~/runs/r.jsonl"`` (as a config file holds it) wrote into a folder literally named
    "~" under the current folder; a distributed job's part files and merged file alike."""
    from fastcurv import distributed

    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    models, data = W.job(R=2)
    kw = dict(measures=("lambda_max",), max_iter=20, progress=False, replica_chunk=1)
    first = fastcurv.batched_sharpness(models, data, output="~/runs/r.jsonl", **kw)
    assert [c["start"] for c in chunks_in(home / "runs" / "r.jsonl")] == [0, 1]
    again = distributed.batched_sharpness(models, data, output="~/runs/r.jsonl", use_distributed=False, **kw)
    assert torch.equal(again["lambda_max"], first["lambda_max"])
    assert resume.prepare_folder("~/report") == home / "report" and (home / "report").is_dir()
    (home / "runs" / "r.jsonl.part3").write_text("")
    assert resume.part_files("~/runs/r.jsonl") == [str(home / "runs" / "r.jsonl.part3")]
    assert not list(cwd.iterdir())


def test_temporary_files_are_never_read_as_part_files(tmp_path, monkeypatch):
    """A rank killed while it rewrote ``r.jsonl.part1`` left ``r.jsonl.part1.tmp<pid>``, which the
    part-file glob matched: cut in its header, it made every resume fail ("not a fastcurv results
    file"). Temporary files are now hidden (``.<name>.tmp<pid>``) and removed when a write fails,
    and only ``<output>.part<k>`` names are part files."""
    models, data = W.job(R=2)
    out = tmp_path / "r.jsonl"
    kw = dict(measures=("lambda_max",), max_iter=20, progress=False, replica_chunk=1)
    ref = fastcurv.batched_sharpness(models, data, output=str(out), **kw)
    header, first = out.read_text().splitlines()[:2]
    out.unlink()
    (tmp_path / "r.jsonl.part0").write_text(header + "\n" + first + "\n")
    for stale in ("r.jsonl.part1.tmp4242", "r.jsonl.partial", "r.jsonl.part1.bak"):
        (tmp_path / stale).write_text(header[: len(header) // 2])
    assert resume.part_files(str(out)) == [str(tmp_path / "r.jsonl.part0")]
    again = fastcurv.batched_sharpness(models, data, output=str(out), **kw)
    assert torch.equal(again["lambda_max"], ref["lambda_max"])

    names = []
    monkeypatch.setattr(paths.os, "replace", lambda a, b: names.append(os.path.basename(a)))
    resume.write_atomic(str(tmp_path / "r.jsonl.part1"), "d", {}, [])
    assert names == [f".r.jsonl.part1.tmp{os.getpid()}"]
    monkeypatch.undo()
    before = out.read_text()
    with pytest.raises(TypeError):  # a record that cannot be written (as a full disk would stop it)
        resume.write_atomic(str(out), "d", {}, [{"start": object()}])
    assert out.read_text() == before and not list(tmp_path.glob(".*.tmp*"))


def test_a_tilde_path_of_an_unknown_user_is_named_before_any_work(tmp_path, monkeypatch):
    """``output="~nosuchuser/r.jsonl"`` from the Python API raised pathlib's bare RuntimeError
    ("Could not determine home directory") for files and folders, and a distributed job's
    ``os.path.expanduser`` left the ``~`` in (a folder literally named ``~nosuchuser``)."""
    from fastcurv import distributed

    monkeypatch.chdir(tmp_path)
    models, data = W.job(R=2)
    kw = dict(measures=("lambda_max",), max_iter=20, progress=False)
    for run in (fastcurv.batched_sharpness, lambda *a, **k: distributed.batched_sharpness(*a, use_distributed=False, **k)):
        with pytest.raises(ValueError, match="no user 'nosuchuser_fc25'"):
            run(models, data, output="~nosuchuser_fc25/r.jsonl", **kw)
    with pytest.raises(ValueError, match="no user 'nosuchuser_fc25'"):
        resume.prepare_folder("~nosuchuser_fc25/report")
    assert not list(tmp_path.iterdir())



def test_a_file_written_with_a_whole_float_count_resumes(tmp_path, monkeypatch, one_thread):
    """Files written before the twenty-seventh round hold a count given as a whole float
    (``max_iter=20.0``, a JSON config's) as that float in their config and fingerprint; once counts
    were read as ints, resuming one raised FingerprintMismatch "differs in: unknown" (20.0 == 20),
    with ``max_iter=20.0`` or ``20`` alike, and its saved chunks were lost. Such a file resumes, and
    a mismatch names a value that differs only in its type."""
    import hashlib

    models, data = W.job(R=3)
    out = tmp_path / "r.jsonl"
    kw = dict(measures=("lambda_max",), progress=False, replica_chunk=2, output=str(out))
    first = fastcurv.batched_sharpness(models, data, max_iter=20, **kw)
    head, first_chunk, _ = out.read_text().splitlines()
    head = json.loads(head)
    # as the code before the twenty-seventh round wrote it for max_iter=20.0 (checked against it: nothing else differs)
    head["config"]["max_iter"] = 20.0
    head["fingerprint"] = hashlib.sha256(json.dumps(head["config"], sort_keys=True).encode()).hexdigest()[:32]
    old_file = json.dumps(head) + "\n" + first_chunk + "\n"  # interrupted after its first chunk
    chunks = []
    real = fastcurv.sharpness.batched_sharpness
    monkeypatch.setattr(fastcurv.sharpness, "batched_sharpness",
                        lambda models, *a, **k: chunks.append(len(models)) or real(models, *a, **k))
    for max_iter in (20.0, 20):
        out.write_text(old_file)
        chunks.clear()
        again = fastcurv.batched_sharpness(models, data, max_iter=max_iter, **kw)
        assert chunks == [1]  # the last replica's chunk alone
        assert torch.equal(again["lambda_max"], first["lambda_max"])
    out.write_text(old_file)
    with pytest.raises(FingerprintMismatch, match=r"differs in: max_iter \(20.0 -> 20\), seed\)"):
        fastcurv.batched_sharpness(models, data, max_iter=20, seed=1, **kw)
    old, new = {"measure_options": {"m": {"p": 2.0}}, "R": 2}, {"measure_options": {"m": {"p": 2}}, "R": 2}
    assert fingerprint.describe_changes(old, new, types=True) == "measure_options (m.p: 2.0 -> 2)"
    assert fingerprint.describe_changes(old, new) == "unknown"  # (checkpoints compare values: 2.0 is 2 there)
