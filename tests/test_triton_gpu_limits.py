"""The Triton ``linear_rop`` launch against the limits of real GPUs, checked without one.

* Shared memory per block (the opt-in maximum, which Triton checks the compiled kernel against at
  launch): sm_75 64 KiB, sm_80 163 KiB, sm_86/sm_89 99 KiB, sm_90 227 KiB. The tiles and pipelining
  depth are chosen from the device's limit by the pure-Python :func:`launch_config`, using
  :func:`shared_bytes`, an upper bound of the compiler's figure (checked against Triton's NVIDIA
  compiler below, ``-m slow``).
* Grid: CUDA caps grid axes 1 and 2 at 65535 programs (axis 0 at 2**31 - 1).
"""
import pytest
import torch

from fastcurv.ops.linear_rop import linear_rop_reference
from triton_helpers import TRITON_DEVICES, compile_for_gpu

triton_kernels = pytest.importorskip("fastcurv.triton_kernels")
if not triton_kernels.HAVE_TRITON:
    pytest.skip("triton is not installed", allow_module_level=True)
from fastcurv.triton_kernels import linear_rop as tlr  # noqa: E402

SM75, SM80, SM86, SM90 = 65536, 166912, 101376, 232448  # bytes (CUDA guide: 64 / 163 / 99 / 227 KiB)
FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


# ----------------------------------------------------------------------------- shared memory


def test_shared_bytes_reproduces_the_compiler_figures():
    """The compiler's ``metadata.shared`` (Triton 3.7.1, sm_86, a launch on contiguous inputs with
    ra, bias and tanh), measured for these tiles ``(BN, BO, BI, KB)``, itemsize and stages."""
    measured = [  # (tiles, itemsize, num_stages, shared bytes)
        ((64, 64, 32, 2), 4, 3, 114688),  # float32, 2 probes: the old default, over sm_86's 101376
        ((64, 64, 32, 2), 4, 2, 65536),
        ((32, 32, 32, 2), 8, 3, 114688),  # float64, 2 probes: the old default, over the limit
        ((32, 32, 32, 4), 8, 3, 196608),  # float64, 4 probes: the old default, over the limit
        ((16, 32, 32, 4), 8, 2, 94208),
        ((32, 32, 32, 4), 8, 1, 65536),
    ]
    for (bn, bo, bi, kb), size, stages, shared in measured:
        assert tlr.shared_bytes(bn, bo, bi, kb, size, stages) == shared, ((bn, bo, bi, kb), size, stages)


@pytest.mark.parametrize("limit", [SM75, SM80, SM86, SM90])
def test_launch_config_fits_the_shared_memory_of_each_gpu(limit):
    """The default tiles ran with Triton's default 3 pipeline stages whatever the device: float32
    with 2 probes needed 114688 bytes and float64 with 2 or 4 probes 114688 / 196608, more than the
    101376 of sm_86/sm_89 GPUs (A10, A40, L4, L40S, RTX 30xx/40xx), so the launch raised
    OutOfResources there. Now every dtype and probe count gets tiles and stages within the limit."""
    for dtype in FLOATS:
        for K in range(1, 10):
            for has_ra in (True, False):
                bn, bo, bi, kb, stages = tlr.launch_config(K, dtype, None, limit, has_ra)
                need = tlr.shared_bytes(bn, bo, bi, kb, dtype.itemsize, stages, has_ra)
                assert need <= limit, (dtype, K, has_ra, (bn, bo, bi, kb, stages), need)
                assert all(v >= 16 and v & (v - 1) == 0 for v in (bn, bo, bi)) and stages >= 1


def test_launch_config_keeps_the_defaults_where_they_fit():
    """On sm_90 (the H200 the benchmarks run on) and in the interpreter (no limit) nothing changes:
    the default tiles with 3 stages. On sm_86 the old defaults' overflow is really there."""
    for limit in (SM90, None):
        for dtype in FLOATS:
            for K in (1, 2, 4, 7):
                assert tlr.launch_config(K, dtype, None, limit) == (*tlr._tiles(K, dtype, None), 3)
    bn, bo, bi, kb = tlr._tiles(2, torch.float32, None)
    assert tlr.shared_bytes(bn, bo, bi, kb, 4, 3) > SM86
    assert tlr.launch_config(2, torch.float32, None, SM86) == (bn, bo, bi, kb, 2)
    assert tlr.launch_config(4, torch.float64, None, SM86) == (16, 32, 32, 4, 2)  # 2 stages: 114688


def test_launch_config_with_an_explicit_block():
    """An explicit ``block`` keeps its tiles (fewer stages where needed), or fails with a clear error."""
    assert tlr.launch_config(4, torch.float64, (32, 32, 32), SM86) == (32, 32, 32, 4, 1)
    with pytest.raises(ValueError, match="shared memory"):
        tlr.launch_config(4, torch.float64, (128, 128, 64), SM86)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_linear_rop_launches_within_the_device_limit(device, monkeypatch):
    """The wrapper reads the device's limit and launches the fitting tiles and stages (here as on
    sm_86: float32 with 2 probes gets 2 stages, not 3); the result is unchanged."""
    seen = []
    real = tlr._linear_rop_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append((kw["BN"], kw["BO"], kw["BI"], kw["KB"], kw["num_stages"]))
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(tlr, "_linear_rop_kernel", Spy())
    monkeypatch.setattr(tlr, "device_max_shared", lambda dev: SM86)
    g = torch.Generator().manual_seed(2)
    R, K, N, I, O = 1, 2, 5, 20, 7
    a, W = torch.randn(R, N, I, generator=g), torch.randn(R, O, I, generator=g)
    ra, dW = torch.randn(R, K, N, I, generator=g), torch.randn(R, K, O, I, generator=g)
    x = [t.to(device) for t in (a, ra, W, dW)]
    out = tlr.linear_rop(*x, activation="tanh")
    assert seen == [(64, 64, 32, 2, 2)]
    ref = linear_rop_reference(*x, activation="tanh")
    for got, want in zip(out, ref):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_device_max_shared_is_none_off_cuda():
    assert tlr.device_max_shared(torch.device("cpu")) is None


@pytest.mark.gpu
def test_device_max_shared_is_the_limit_triton_checks():
    import triton

    index = torch.cuda.current_device()
    want = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    assert tlr.device_max_shared(torch.device("cuda")) == want


@pytest.mark.slow  # about 10 s per architecture
@pytest.mark.parametrize("arch, limit", [(86, SM86), (90, SM90)])
def test_linear_rop_tiles_compile_within_the_limit(tmp_path, arch, limit):
    """Triton's NVIDIA compiler (no GPU needed) agrees: the kernel compiled with the chosen tiles and
    stages for the cases that overflowed sm_86 (float32 K=2, float64 K=2 and K=4) needs no more
    shared memory than :func:`shared_bytes` says, which is within the device's limit."""
    compile_for_gpu(tmp_path, rf'''
from fastcurv.triton_kernels import linear_rop as lr
N, I, O = 128, 256, 128
for tdt, dt, K in ((torch.float32, "fp32", 2), (torch.float64, "fp64", 2), (torch.float64, "fp64", 4)):
    bn, bo, bi, kb, stages = lr.launch_config(K, tdt, None, {limit})
    const = dict(HAS_RA=True, HAS_B=True, HAS_DB=True, KIND=3, STORE_H=True, BN=bn, BO=bo, BI=bi, KB=kb,
                 F64=dt == "fp64", PREC=lr._input_precision(tdt, False))
    ints = dict(N=N, I=I, O=O, K=K, sa0=N*I, sa1=I, sa2=1, sra0=K*N*I, sra1=N*I, sra2=I, sra3=1, sw0=O*I,
                sw1=I, sw2=1, sdw0=K*O*I, sdw1=O*I, sdw2=I, sdw3=1, sb0=O, sb1=1, sdb0=K*O, sdb1=O, sdb2=1)
    k = comp_launch(lr._linear_rop_kernel, dt, const, ints, num_stages=stages)
    est = lr.shared_bytes(bn, bo, bi, kb, tdt.itemsize, stages)
    assert k.metadata.shared <= est <= {limit}, (dt, K, (bn, bo, bi, kb, stages), k.metadata.shared, est)
''', arch=arch)


# ----------------------------------------------------------------------------- grid


def _record_grid(monkeypatch):
    grids = []

    class Recorder:  # stands in for the kernel: records the grid, launches nothing
        def __getitem__(self, grid):
            grids.append(grid)
            return lambda *args, **kw: None

    monkeypatch.setattr(tlr, "_linear_rop_kernel", Recorder())
    return grids


def _within_cuda_grid_limits(grid):
    return 1 <= len(grid) <= 3 and grid[0] <= 2**31 - 1 and all(g <= 65535 for g in grid[1:])


def test_linear_rop_grid_takes_more_than_65535_replicas(monkeypatch):
    """The replicas were grid axis 2, (1, 1, 70000) for 70,000 tiny layers: past CUDA's 65535 the
    launch fails ('invalid argument'; the interpreter has no such limit). Now all programs are on
    axis 0 (2**31 - 1). Pure Python: the kernel is replaced by a recorder."""
    grids = _record_grid(monkeypatch)
    R, K, N, I, O = 70000, 1, 4, 8, 8
    a = torch.zeros(1, N, I).expand(R, N, I)
    W = torch.zeros(1, O, I).expand(R, O, I)
    dW = torch.zeros(1, 1, O, I).expand(R, K, O, I)
    tlr.linear_rop(a, None, W, dW)
    assert grids == [(70000,)] and _within_cuda_grid_limits(grids[0])
    assert _within_cuda_grid_limits(tlr._grid(70000, 9, 100, 100, 16, 16, 4))
    assert tlr._grid(70000, 9, 100, 100, 16, 16, 4) == (70000 * 7 * 7 * 3,)
    with pytest.raises(ValueError, match="grid limit"):
        tlr._grid(2**20, 1, 2**12, 2**12, 16, 16, 1)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_linear_rop_folded_grid_matches(device):
    """Several replicas, output tiles in both directions and probe blocks, all on the one grid axis:
    every program finds its replica, tile and probe block (distinct data everywhere)."""
    g = torch.Generator().manual_seed(4)
    R, K, N, I, O = 3, 5, 20, 24, 18  # block 16: 2 x 2 tiles; KB = 4: 2 probe blocks
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device)  # noqa: E731
    x = dict(a=mk(R, N, I), ra=mk(R, K, N, I), W=mk(R, O, I), dW=mk(R, K, O, I), b=mk(R, O), db=mk(R, K, O))
    out = tlr.linear_rop(**x, activation="sigmoid", block=(16, 16, 16))
    ref = linear_rop_reference(**x, activation="sigmoid")
    for got, want in zip(out, ref):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
