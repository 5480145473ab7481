"""Resumable chunked jobs: atomic per-chunk saves, skip-on-restart, SIGKILL and Ctrl-C."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import fastcurv
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
