"""Fused Triton kernel: a linear layer's forward and R-forward products with the activation epilogue.

For R replicas and K probes (see :func:`fastcurv.ops.linear_rop.linear_rop_reference` for the math)::

    z  = a W^T + b                        [R, N, O]
    rz = ra W^T + a dW^T + db             [R, K, N, O]
    h  = sigma(z),  rh = sigma'(z) * rz   (when an activation is given)

One program owns a ``[BN, BO]`` output tile of one replica and a block of ``KB`` probes. Each step
over the input dimension loads the tiles of ``a`` and ``W`` once and uses them for all three
products (``a W^T``, ``a dW_k^T``, ``ra_k W^T``, the last two as batched dots over the probe block).
Inputs may be strided views (e.g. the network input expanded over R with stride 0): nothing is copied;
offsets are int64. All programs lie on grid axis 0 (CUDA caps axes 1 and 2 at 65535, too few for R).
The tiles and the pipelining depth are chosen to fit the device's shared memory (:func:`launch_config`:
the defaults with 3 stages where they fit, as always on sm_90; fewer stages or smaller tiles on
sm_86/sm_89's 99 KiB).
Accumulation is float32 (float64 for float64 inputs); float32 products use IEEE precision unless
``allow_tf32=True``.
"""
from __future__ import annotations

import functools
from typing import Optional, Union

import torch
import triton
import triton.language as tl

from . import register
from .elementwise import _act_value_d1, _check_float, _scalar, split_f32
from ..ops.activation import ACTIVATIONS
from ..ops.linear_rop import LinearRop, check_linear_rop_shapes, resolve_activation


@triton.jit
def _linear_rop_kernel(
    a_ptr, ra_ptr, w_ptr, dw_ptr, b_ptr, db_ptr, z_ptr, rz_ptr, h_ptr, rh_ptr,
    N, I, O, K, slope_hi, slope_lo,
    sa0, sa1, sa2, sra0, sra1, sra2, sra3, sw0, sw1, sw2, sdw0, sdw1, sdw2, sdw3, sb0, sb1, sdb0, sdb1, sdb2,
    HAS_RA: tl.constexpr, HAS_B: tl.constexpr, HAS_DB: tl.constexpr, KIND: tl.constexpr, STORE_H: tl.constexpr,
    BN: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr, KB: tl.constexpr, F64: tl.constexpr, PREC: tl.constexpr,
):
    # one grid axis (see _grid): the probe block varies fastest, then the output tile, then the replica
    pid = tl.program_id(0)
    num_k = tl.cdiv(K, KB)
    num_o = tl.cdiv(O, BO)
    num_tiles = tl.cdiv(N, BN) * num_o
    pk = pid % num_k
    tile = (pid // num_k) % num_tiles
    r = (pid // num_k // num_tiles).to(tl.int64)
    pn = tile // num_o
    po = tile % num_o
    # int64 indices: index * stride and n * O pass 2**31 elements within one replica (e.g. ra is a
    # transposed view with row stride K * I), where int32 products wrap and address the wrong memory
    rn = (pn * BN + tl.arange(0, BN)).to(tl.int64)
    ro = (po * BO + tl.arange(0, BO)).to(tl.int64)
    rk = (pk * KB + tl.arange(0, KB)).to(tl.int64)
    ri = tl.arange(0, BI).to(tl.int64)
    nm = rn < N
    om = ro < O
    km = rk < K
    if F64:
        acc_dt = tl.float64
    else:
        acc_dt = tl.float32
    acc_z = tl.zeros([BN, BO], dtype=acc_dt)
    acc_r = tl.zeros([KB, BN, BO], dtype=acc_dt)
    a_base = a_ptr + r * sa0
    w_base = w_ptr + r * sw0
    dw_base = dw_ptr + r * sdw0
    ra_base = ra_ptr + r * sra0
    for i0 in range(0, I, BI):
        ii = i0 + ri
        im = ii < I
        a = tl.load(a_base + rn[:, None] * sa1 + ii[None, :] * sa2, mask=nm[:, None] & im[None, :], other=0.0)
        wt = tl.load(w_base + ro[None, :] * sw1 + ii[:, None] * sw2, mask=im[:, None] & om[None, :], other=0.0)
        acc_z = tl.dot(a, wt, acc_z, input_precision=PREC, out_dtype=acc_dt)
        dwt = tl.load(dw_base + rk[:, None, None] * sdw1 + ro[None, None, :] * sdw2 + ii[None, :, None] * sdw3,
                      mask=km[:, None, None] & im[None, :, None] & om[None, None, :], other=0.0)
        acc_r = tl.dot(tl.broadcast_to(a[None, :, :], (KB, BN, BI)), dwt, acc_r, input_precision=PREC, out_dtype=acc_dt)
        if HAS_RA:
            ra = tl.load(ra_base + rk[:, None, None] * sra1 + rn[None, :, None] * sra2 + ii[None, None, :] * sra3,
                         mask=km[:, None, None] & nm[None, :, None] & im[None, None, :], other=0.0)
            acc_r = tl.dot(ra, tl.broadcast_to(wt[None, :, :], (KB, BI, BO)), acc_r, input_precision=PREC, out_dtype=acc_dt)
    if HAS_B:
        bias = tl.load(b_ptr + r * sb0 + ro * sb1, mask=om, other=0.0).to(acc_dt)
        acc_z += bias[None, :]
    if HAS_DB:
        dbias = tl.load(db_ptr + r * sdb0 + rk[:, None] * sdb1 + ro[None, :] * sdb2, mask=km[:, None] & om[None, :],
                        other=0.0).to(acc_dt)
        acc_r += dbias[:, None, :]
    # outputs are contiguous: z, h [R, N, O]; rz, rh [R, K, N, O]
    z_off = r * N * O + rn[:, None] * O + ro[None, :]
    z_mask = nm[:, None] & om[None, :] & (pk == 0)  # the first probe block writes z and h
    r_off = r * K * N * O + rk[:, None, None] * N * O + rn[None, :, None] * O + ro[None, None, :]
    r_mask = km[:, None, None] & nm[None, :, None] & om[None, None, :]
    tl.store(z_ptr + z_off, acc_z.to(z_ptr.dtype.element_ty), mask=z_mask)
    tl.store(rz_ptr + r_off, acc_r.to(rz_ptr.dtype.element_ty), mask=r_mask)
    if STORE_H:
        h, d1 = _act_value_d1(acc_z, _scalar(slope_hi, slope_lo, F64), KIND, F64)
        tl.store(h_ptr + z_off, h.to(h_ptr.dtype.element_ty), mask=z_mask)
        tl.store(rh_ptr + r_off, (d1[None, :, :] * acc_r).to(rh_ptr.dtype.element_ty), mask=r_mask)


def _tiles(K: int, dtype: torch.dtype, block: Optional[tuple[int, int, int]]):
    """The preferred tiles ``(BN, BO, BI, KB)``: ``block`` when given (checked), else the defaults."""
    kb = min(triton.next_power_of_2(max(K, 1)), 4)
    if block is not None:
        bn, bo, bi = block
    elif dtype == torch.float64 or kb >= 4:
        bn, bo, bi = 32, 32, 32
    else:
        bn, bo, bi = 64, 64, 32
    for v in (bn, bo, bi):
        if v < 16 or v & (v - 1):
            raise ValueError(f"linear_rop: tile sizes must be powers of two >= 16, got {(bn, bo, bi)}")
    return bn, bo, bi, kb


NUM_STAGES = 3  # Triton's default software-pipelining depth, used where the shared memory allows


def shared_bytes(bn: int, bo: int, bi: int, kb: int, itemsize: int, num_stages: int, has_ra: bool = True) -> int:
    """Shared memory (bytes) the compiled kernel needs for tiles ``(bn, bo, bi, kb)`` of
    ``itemsize``-byte elements. Pipelined (``num_stages >= 2``): ``num_stages - 1`` copies of one
    input step's tiles (a ``[bn, bi]``, W ``[bi, bo]``, dW ``[kb, bi, bo]``, ra ``[kb, bn, bi]``)
    plus the operand broadcast over the probe block for the batched dots (a, or W for ra's dot,
    whichever is larger). One stage: only the operands of the largest (batched) dot at a time.

    An upper bound of the Triton 3.7 compiler's ``metadata.shared``, equal to it for the pipelined
    default tiles on sm_86/sm_89 (checked for 214 tile/dtype/stage choices on sm_75 to sm_90; sm_75
    and sm_90 often need less; ``tests/test_triton_gpu_limits.py`` compiles the kernel to check)."""
    if num_stages <= 1:
        return itemsize * kb * bi * (bn + bo)
    step = bn * bi + bi * bo + kb * bi * bo + (kb * bn * bi if has_ra else 0)
    bcast = kb * bi * (max(bn, bo) if has_ra else bn)
    return itemsize * ((num_stages - 1) * step + bcast)


def launch_config(K: int, dtype: torch.dtype, block: Optional[tuple[int, int, int]], max_shared: Optional[int],
                  has_ra: bool = True) -> tuple[int, int, int, int, int]:
    """Tiles and pipelining depth ``(BN, BO, BI, KB, num_stages)`` whose shared memory fits in
    ``max_shared`` bytes (the device's per-block opt-in limit; ``None``: no limit, as in the
    interpreter). Tries the preferred tiles (:func:`_tiles`) with 3, then 2 stages, then halves the
    larger of BN and BO (not below 16; not for an explicit ``block``), then 1 stage. Raises ValueError
    when nothing fits."""
    bn, bo, bi, kb = _tiles(K, dtype, block)
    size = dtype.itemsize

    def fits(bn_, bo_, stages):
        return max_shared is None or shared_bytes(bn_, bo_, bi, kb, size, stages, has_ra) <= max_shared

    for stages in (NUM_STAGES, 2):
        if fits(bn, bo, stages):
            return bn, bo, bi, kb, stages
    if block is None:
        while max(bn, bo) > 16:
            bn, bo = (bn // 2, bo) if bn >= bo else (bn, bo // 2)
            if fits(bn, bo, 2):
                return bn, bo, bi, kb, 2
    if fits(bn, bo, 1):
        return bn, bo, bi, kb, 1
    raise ValueError(f"linear_rop: tiles {(bn, bo, bi)} with {kb} probes per block need "
                     f"{shared_bytes(bn, bo, bi, kb, size, 1, has_ra)} bytes of shared memory, more than "
                     f"the device's {max_shared}; pass a smaller block")


def device_max_shared(device: torch.device) -> Optional[int]:
    """The per-block shared memory (bytes, opt-in maximum) of a CUDA ``device``, which Triton checks
    the compiled kernel against at launch; ``None`` for other devices (the interpreter has no limit)."""
    if device.type != "cuda":
        return None
    return _cuda_max_shared(torch.cuda.current_device() if device.index is None else device.index)


@functools.lru_cache(maxsize=None)
def _cuda_max_shared(index: int) -> int:
    optin = getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", None)
    if optin:
        return int(optin)
    return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])


MAX_GRID = 2**31 - 1  # CUDA's grid axis 0 limit (axes 1 and 2 stop at 65535, too few for R or N)


def _grid(R: int, K: int, N: int, O: int, bn: int, bo: int, kb: int) -> tuple[int]:
    """The launch grid: one axis of ``R * tiles * probe blocks`` programs (see the kernel)."""
    n = R * triton.cdiv(N, bn) * triton.cdiv(O, bo) * triton.cdiv(K, kb)
    if n > MAX_GRID:
        raise ValueError(f"linear_rop: {n} programs (R={R}, K={K}, N={N}, O={O}) exceed CUDA's grid limit {MAX_GRID}")
    return (n,)


def _input_precision(dtype: torch.dtype, allow_tf32: bool):
    if dtype == torch.float32:
        return "tf32" if allow_tf32 else "ieee"
    return "ieee" if dtype == torch.float64 else None  # float16/bfloat16: the backend's default


@register("linear_rop")
def linear_rop(
    a: torch.Tensor,
    ra: Optional[torch.Tensor],
    W: torch.Tensor,
    dW: torch.Tensor,
    b: Optional[torch.Tensor] = None,
    db: Optional[torch.Tensor] = None,
    activation: Union[None, str, int] = None,
    slope: float = 0.0,
    *,
    allow_tf32: bool = False,
    block: Optional[tuple[int, int, int]] = None,
) -> LinearRop:
    """Fused forward + R-forward of ``sigma(a W^T + b)``; same arguments and result as
    :func:`fastcurv.ops.linear_rop.linear_rop_reference`. ``block=(BN, BO, BI)`` overrides the tiles
    (powers of two >= 16)."""
    R, K, N, I, O = check_linear_rop_shapes(a, ra, W, dW, b, db)
    tensors = {"W": W, "dW": dW}
    tensors.update({k: v for k, v in (("ra", ra), ("b", b), ("db", db)) if v is not None})
    _check_float("linear_rop", a, **tensors)
    kind = resolve_activation(activation)
    store_h = kind != ACTIVATIONS["identity"]
    z = a.new_empty((R, N, O))
    rz = a.new_empty((R, K, N, O))
    h, rh = (torch.empty_like(z), torch.empty_like(rz)) if store_h else (z, rz)
    if R == 0 or N == 0 or O == 0:
        return LinearRop(z, rz, h, rh)
    if I == 0 or K == 0:  # empty reduction / no probes: torch handles the degenerate shapes
        from ..ops.linear_rop import linear_rop_reference

        return linear_rop_reference(a, ra, W, dW, b, db, activation, slope)
    bn, bo, bi, kb, stages = launch_config(K, a.dtype, block, device_max_shared(a.device), ra is not None)
    hi, lo = split_f32(float(slope))
    ra_ = ra if ra is not None else a  # placeholders for absent inputs (never read)
    b_ = b if b is not None else a
    db_ = db if db is not None else a
    sra = ra.stride() if ra is not None else (0, 0, 0, 0)
    sb = b.stride() if b is not None else (0, 0)
    sdb = db.stride() if db is not None else (0, 0, 0)
    _linear_rop_kernel[_grid(R, K, N, O, bn, bo, kb)](
        a, ra_, W, dW, b_, db_, z, rz, h, rh,
        N, I, O, K, hi, lo,
        *a.stride(), *sra, *W.stride(), *dW.stride(), *sb, *sdb,
        HAS_RA=ra is not None, HAS_B=b is not None, HAS_DB=db is not None, KIND=kind, STORE_H=store_h,
        BN=bn, BO=bo, BI=bi, KB=kb, F64=a.dtype == torch.float64,
        PREC=_input_precision(a.dtype, allow_tf32), num_stages=stages,
    )
    return LinearRop(z, rz, h, rh)
