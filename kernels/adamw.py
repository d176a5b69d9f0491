"""Fused AdamW update: one Triton launch updates a whole list of tensors (multi-tensor apply).

The math (per element, float32 throughout, torch.optim.AdamW's order: decoupled decay first)::

    p  = p * (1 - lr * wd)                          # decoupled weight decay
    m  = m * b1 + g * (1 - b1)                      # first moment
    v  = v * b2 + (g * g) * (1 - b2)                # second moment
    d  = sqrt(v) * (1 / sqrt(1 - b2**t)) + eps      # bias-corrected denominator
    p  = p - (m / d) * (lr / (1 - b1**t))           # bias-corrected step

``p`` is read in its own dtype (fp32, bf16 or fp16), upcast, updated and rounded once
(nearest even) on the store. The seven scalars are computed on the host in float64 and
rounded to float32 once (``adamw_scalars``), so kernel and reference use the same constants.

State comes in two layouts, chosen per launch:

* 32-bit: ``m``, ``v`` float32, one value per parameter;
* 8-bit (blockwise dynamic quantization, Dettmers et al. 2022): ``m`` as uint8 codes into the
  signed dynamic map, ``v`` into the unsigned one, each with a float32 absmax per 256-element
  block. A block is dequantized (``map[q] * absmax``), updated in fp32 as above (the parameter
  step uses the fp32 values) and requantized: new absmax = max |x| over the block, codes =
  nearest map level of ``x / absmax`` (ties to the lower level), exactly as
  ``nf4.blockwise.quantize_blockwise_8bit(..., rounding="nearest")``.

Bit-exactness: every operation above is a single IEEE-rounded fp32 operation in both the
reference and the kernel (the kernel uses ``sqrt_rn`` / ``div_rn`` and is launched with
``enable_fp_fusion=False`` so no FMA is formed; on CPU the reference takes ``sqrt`` from
numpy because torch's vectorised CPU float32 sqrt is not correctly rounded: measured 1-ulp
errors on ~20% of inputs with AVX512 on torch 2.13). Kernel and reference therefore agree bit for bit
(tested under the Triton interpreter).

Launch layout: each program owns one tile of ``ROWS x 256`` elements of one tensor. A small
int64 table ``meta [K, 8]`` holds, per tensor, the addresses of p, g, m, v, m_absmax, v_absmax,
its numel and the index of its first tile; a program finds its tensor by binary search.
"""

from __future__ import annotations

import contextlib
import math
import struct
from dataclasses import dataclass
from functools import lru_cache
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

import nf4
from kernels import adamw_cpu
from kernels.dispatch import check_device, interpreting, use_triton

__all__ = [
    "STATE_BLOCKSIZE",
    "AdamWScalars",
    "adamw_scalars",
    "state_maps",
    "quantize_state_8bit",
    "dequantize_state_8bit",
    "adamw_reference_",
    "adamw_update",
]

STATE_BLOCKSIZE = 256  # 8-bit state block (bitsandbytes' blockwise optimizers, Dettmers et al. 2022)
_COLS = STATE_BLOCKSIZE  # a tile row is one quantization block
_ROWS_32BIT = 8  # 2048 elements per program with 32-bit state
_ROWS_8BIT = 4  # 1024 elements (4 quantization blocks) per program with 8-bit state
# The interpreter pays per operation, not per element: fewer, larger tiles (same code paths).
_ROWS_INTERPRET = 64
_META = 8  # columns of the per-tensor table: p, g, m, v, m_absmax, v_absmax, numel, first tile


def _f32(x: float) -> float:
    """``x`` rounded to the nearest float32, as a Python float."""
    return struct.unpack("f", struct.pack("f", x))[0]


@dataclass(frozen=True)
class AdamWScalars:
    """The per-launch constants of one AdamW step, each exactly representable in float32."""

    decay: float  # 1 - lr * wd
    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    step_size: float  # lr / (1 - beta1**t)
    inv_bc2_sqrt: float  # 1 / sqrt(1 - beta2**t)
    eps: float


def adamw_scalars(step: int, lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> AdamWScalars:
    """Host-side constants for step ``t = step`` (1-based), computed in float64, rounded once."""
    if step < 1:
        raise ValueError(f"step must be >= 1 (bias correction divides by 1 - beta**step), got {step}")
    b1, b2 = float(betas[0]), float(betas[1])
    return AdamWScalars(
        decay=_f32(1.0 - lr * weight_decay),
        beta1=_f32(b1),
        one_minus_beta1=_f32(1.0 - b1),
        beta2=_f32(b2),
        one_minus_beta2=_f32(1.0 - b2),
        step_size=_f32(lr / (1.0 - b1**step)),
        inv_bc2_sqrt=_f32(1.0 / math.sqrt(1.0 - b2**step)),
        eps=_f32(eps),
    )


# --------------------------------------------------------------------------------------------
# Reference (plain PyTorch, any device): the specification of the kernel.
# --------------------------------------------------------------------------------------------

@lru_cache(maxsize=16)
def state_maps(device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(signed map, its 255 midpoints, unsigned map, its midpoints)`` float32 on ``device``.

    m uses the signed dynamic map, v (never negative) the unsigned one (twice the resolution).
    Midpoints are ``(map[i] + map[i+1]) / 2`` in float32, the thresholds of nearest rounding.
    """
    out = []
    for signed in (True, False):
        code = nf4.dynamic_map(signed=signed)
        out += [code.to(device), ((code[:-1] + code[1:]) / 2).to(device)]
    return tuple(out)


def quantize_state_8bit(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 state ``x`` (any shape) -> ``(codes uint8 like x, absmax float32 [ceil(n/256)])``."""
    code = state_maps("cpu")[0 if signed else 2]
    codes, absmax = nf4.blockwise.quantize_blockwise_8bit(x, code, STATE_BLOCKSIZE, rounding="nearest")
    return codes.view(x.shape), absmax


def dequantize_state_8bit(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """Inverse of ``quantize_state_8bit``: ``map[q] * absmax[i // 256]`` float32, shaped like codes."""
    code = state_maps("cpu")[0 if signed else 2]
    return nf4.blockwise.dequantize_blockwise_8bit(codes, absmax, code, STATE_BLOCKSIZE).view(codes.shape)


def _sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt on any device.

    torch's CPU float32 sqrt is not correctly rounded (module docstring); numpy's is (and is
    3x faster here); float64 sqrt rounded to float32 is too (53 >= 2 * 24 + 2 bits). CUDA's
    float32 sqrt is IEEE.
    """
    if x.is_cuda:
        return x.sqrt()
    if x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous():
        import numpy as np

        return torch.from_numpy(np.sqrt(x.numpy()))
    return x.double().sqrt().float()


def adamw_reference_(p, g, m, v, sc: AdamWScalars, m_absmax=None, v_absmax=None) -> None:
    """One AdamW step on one tensor, in place (module docstring). 8-bit when absmax is given."""
    eight_bit = m_absmax is not None
    pf, gf = p.float(), g.float()
    if eight_bit:
        mf, vf = dequantize_state_8bit(m, m_absmax, True), dequantize_state_8bit(v, v_absmax, False)
    else:
        mf, vf = m, v
    pf = pf * sc.decay
    mf = mf * sc.beta1 + gf * sc.one_minus_beta1
    vf = vf * sc.beta2 + (gf * gf) * sc.one_minus_beta2
    denom = _sqrt_rn(vf) * sc.inv_bc2_sqrt + sc.eps
    pf = pf - (mf / denom) * sc.step_size
    p.copy_(pf)
    if eight_bit:
        for codes, absmax, x, signed in ((m, m_absmax, mf, True), (v, v_absmax, vf, False)):
            qc, qa = quantize_state_8bit(x, signed)
            codes.copy_(qc)
            absmax.copy_(qa)
    else:
        m.copy_(mf)
        v.copy_(vf)


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _store_rounded(ptr, x, mask, DTYPE: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """Store float32 ``x`` as ``DTYPE``, rounding to nearest even.

    MANUAL_BF16 (set under the interpreter only): round to bfloat16 with integer operations,
    because the interpreter's own float32 -> bfloat16 conversion does not round to nearest even
    (measured with triton 3.9: ~0.5% of values off by one ulp). On a GPU the conversion
    instruction rounds to nearest even and gives the same bits.
    """
    if MANUAL_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = tl.where(x != x, bits | 0x400000, rounded)  # a NaN stays a quiet NaN
        tl.store(ptr, (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, x.to(DTYPE), mask=mask)


@triton.jit
def _nearest_code(mids_ptr, x):
    """Index of the nearest of 256 sorted levels, ties to the lower one: #(midpoints < x).

    Branch-free binary search over the 255 midpoints (8 probes; 255 = 2**8 - 1).
    """
    pos = tl.zeros(x.shape, dtype=tl.int32)
    for i in tl.static_range(8):
        half = 128 >> i  # a compile-time constant; triton 3.6 forbids re-annotating it per unrolled step
        mid = tl.load(mids_ptr + pos + (half - 1))
        pos = tl.where(mid < x, pos + half, pos)
    return pos


@triton.jit
def _requantize(x, mask, idx, blk, bmask, n, codes_ptr, absmax_ptr, mids_ptr, COLS: tl.constexpr):
    """Store ``x: [ROWS, COLS]`` as 8-bit codes with a new absmax per row (= per block)."""
    absmax = tl.max(tl.where(mask, tl.abs(x), 0.0), axis=1)  # [ROWS]
    tl.store(absmax_ptr + blk, absmax, mask=bmask)
    # nf4.blockwise's clamp before the reciprocal; 1e-38 is subnormal, so triton would type the
    # literal fp64 (and div_rn then rejects it): keep the result fp32
    safe = tl.maximum(absmax, 1e-38).to(tl.float32)
    inv = tl.div_rn(tl.full(safe.shape, 1.0, tl.float32), safe)
    full = (blk + 1) * COLS <= n  # full blocks multiply by the reciprocal, the last one divides
    scaled = tl.where(full[:, None], x * inv[:, None], tl.div_rn(x, safe[:, None]))
    scaled = tl.minimum(tl.maximum(scaled, -1.0), 1.0)
    # an all-zero block scales to exactly 0 (as 0 * 1/1e-38 does), whatever the denormal mode
    scaled = tl.where(absmax[:, None] > 0.0, scaled, 0.0)
    tl.store(codes_ptr + idx, _nearest_code(mids_ptr, scaled).to(tl.uint8), mask=mask)


@triton.jit
def _adamw_kernel(
    # per-tensor table [K, 8] int64 and K
    meta_ptr, num_tensors,
    # 8-bit state maps: signed map + midpoints (m), unsigned map + midpoints (v)
    qmap_m_ptr, qmid_m_ptr, qmap_v_ptr, qmid_v_ptr,
    # float32 scalars (adamw_scalars)
    decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, inv_bc2_sqrt, eps,
    # meta-parameters
    P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, STATE_8BIT: tl.constexpr, LOG_K: tl.constexpr,
    ROWS: tl.constexpr, COLS: tl.constexpr, META: tl.constexpr, ALIGNED: tl.constexpr,
    MANUAL_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    # which tensor: the largest t with first_tile[t] <= pid
    t = 0
    for i in tl.static_range(LOG_K):
        cand = t + (1 << (LOG_K - 1 - i))
        first = tl.load(meta_ptr + tl.minimum(cand, num_tensors - 1) * META + 7)
        t = tl.where((cand < num_tensors) & (first <= pid), cand, t)
    row = meta_ptr + t * META
    n = tl.load(row + 6)
    start = (pid - tl.load(row + 7)).to(tl.int64) * (ROWS * COLS)
    r = tl.arange(0, ROWS)
    idx = start + r[:, None] * COLS + tl.arange(0, COLS)[None, :]  # [ROWS, COLS] int64
    mask = idx < n

    p_ptr = tl.load(row + 0).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(G_DTYPE))
    if ALIGNED:  # every address in the table is 16-byte aligned (checked by the launcher)
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
    p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)

    if STATE_8BIT:
        mc_ptr = tl.load(row + 2).to(tl.pointer_type(tl.uint8))
        vc_ptr = tl.load(row + 3).to(tl.pointer_type(tl.uint8))
        ma_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
        va_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
        blk = start // COLS + r  # [ROWS] quantization block of each tile row
        bmask = blk * COLS < n
        mq = tl.load(mc_ptr + idx, mask=mask, other=0).to(tl.int32)
        vq = tl.load(vc_ptr + idx, mask=mask, other=0).to(tl.int32)
        m = tl.load(qmap_m_ptr + mq) * tl.load(ma_ptr + blk, mask=bmask, other=0.0)[:, None]
        v = tl.load(qmap_v_ptr + vq) * tl.load(va_ptr + blk, mask=bmask, other=0.0)[:, None]
        m = tl.where(mask, m, 0.0)  # lanes past the end decode code 0, which is not 0 for m
        v = tl.where(mask, v, 0.0)
    else:
        m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
        v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
        if ALIGNED:
            m_ptr = tl.multiple_of(m_ptr, 16)
            v_ptr = tl.multiple_of(v_ptr, 16)
        m = tl.load(m_ptr + idx, mask=mask, other=0.0)
        v = tl.load(v_ptr + idx, mask=mask, other=0.0)

    # the update, one rounding per operation (no FMA: enable_fp_fusion=False)
    p = p * decay
    m = m * beta1 + g * one_minus_beta1
    v = v * beta2 + (g * g) * one_minus_beta2
    denom = tl.sqrt_rn(v) * inv_bc2_sqrt + eps
    p = p - tl.div_rn(m, denom) * step_size
    _store_rounded(p_ptr + idx, p, mask, P_DTYPE, MANUAL_BF16)

    if STATE_8BIT:
        _requantize(m, mask, idx, blk, bmask, n, mc_ptr, ma_ptr, qmid_m_ptr, COLS)
        _requantize(v, mask, idx, blk, bmask, n, vc_ptr, va_ptr, qmid_v_ptr, COLS)
    else:
        tl.store(m_ptr + idx, m, mask=mask)
        tl.store(v_ptr + idx, v, mask=mask)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------

def _launch(params, grads, ms, vs, mas, vas, sc: AdamWScalars) -> None:
    """One launch over tensors that share device, p dtype and g dtype; all contiguous."""
    eight_bit = mas is not None
    device = params[0].device
    interp = interpreting() and device.type == "cpu"
    rows_per_tile = _ROWS_INTERPRET if interp else (_ROWS_8BIT if eight_bit else _ROWS_32BIT)
    tile = rows_per_tile * _COLS
    table, tiles, aligned = [], 0, True
    for i, (p, g, m, v) in enumerate(zip(params, grads, ms, vs)):
        n = p.numel()
        if n == 0:
            continue
        row = [p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(),
               mas[i].data_ptr() if eight_bit else 0, vas[i].data_ptr() if eight_bit else 0, n, tiles]
        aligned = aligned and ((row[0] | row[1] | row[2] | row[3] | row[4] | row[5]) & 15) == 0
        table.append(row)
        tiles += -(-n // tile)
    if not table:
        return
    meta = torch.tensor(table, dtype=torch.int64)
    if device.type == "cuda":
        meta = meta.pin_memory().to(device, non_blocking=True)
    p_dtype, g_dtype = params[0].dtype, grads[0].dtype
    qmap_m, qmid_m, qmap_v, qmid_v = state_maps(str(device))
    k = len(table)
    # Triton launches on the current device: make it the parameters' one
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _adamw_kernel[(tiles,)](
            meta, k, qmap_m, qmid_m, qmap_v, qmid_v,
            sc.decay, sc.beta1, sc.one_minus_beta1, sc.beta2, sc.one_minus_beta2,
            sc.step_size, sc.inv_bc2_sqrt, sc.eps,
            P_DTYPE=_TL_DTYPES[p_dtype], G_DTYPE=_TL_DTYPES[g_dtype], STATE_8BIT=eight_bit,
            LOG_K=(k - 1).bit_length(), ROWS=rows_per_tile, COLS=_COLS, META=_META,
            ALIGNED=aligned, MANUAL_BF16=interp and p_dtype == torch.bfloat16,
            num_warps=4, enable_fp_fusion=False,
        )


_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _cpu_fast(p, g, m, v, sc, ma, va, cpu_scalars: list) -> bool:
    """The compiled CPU loop (``kernels.adamw_cpu``) for one large contiguous CPU tensor; the
    partial last 8-bit block goes through the reference. False: the caller runs the reference."""
    n = p.numel()
    if (n < adamw_cpu.MIN_NUMEL or not adamw_cpu.enabled(p, g, m, v)
            or not all(t.is_contiguous() for t in (p, g, m, v))):
        return False
    if not cpu_scalars:
        cpu_scalars.append(adamw_cpu.scalars_tensor(sc))
    s = cpu_scalars[0]
    if ma is None:
        return adamw_cpu.step32(p, g, m, v, s)
    full = n - n % STATE_BLOCKSIZE
    nb = full // STATE_BLOCKSIZE
    flat = [t.view(-1) for t in (p, g, m, v)]
    qmap_m, qmid_m, qmap_v, qmid_v = state_maps("cpu")
    if not adamw_cpu.step8(*(t[:full] for t in flat), ma[:nb], va[:nb], s, (qmap_m, qmid_m, qmap_v, qmid_v)):
        return False
    if full < n:
        adamw_reference_(*(t[full:] for t in flat), sc, ma[nb:], va[nb:])
    return True


def _check(params, grads, ms, vs, mas, vas) -> None:
    k = len(params)
    for name, seq in (("grads", grads), ("exp_avgs", ms), ("exp_avg_sqs", vs)):
        if len(seq) != k:
            raise ValueError(f"{name} has {len(seq)} tensors, params has {k}")
    if (mas is None) != (vas is None):
        raise ValueError("pass both exp_avg_absmax and exp_avg_sq_absmax (8-bit state) or neither")
    eight_bit = mas is not None
    if eight_bit and (len(mas) != k or len(vas) != k):
        raise ValueError(f"absmax lists have {len(mas)} and {len(vas)} tensors, params has {k}")
    device = params[0].device if k else None
    for i in range(k):
        p, g, m, v = params[i], grads[i], ms[i], vs[i]
        check_device(p, f"params[{i}]")
        if p.dtype not in _FLOAT_DTYPES or g.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"params[{i}] / grads[{i}] must be float32, bfloat16 or float16, "
                            f"got {p.dtype} / {g.dtype}")
        state_dtype = torch.uint8 if eight_bit else torch.float32
        tensors = [g, m, v] + ([mas[i], vas[i]] if eight_bit else [])
        if any(t.device != device for t in [p] + tensors):
            raise ValueError(f"tensor {i}: every tensor must be on {device}, got "
                             f"{[str(t.device) for t in [p] + tensors]}")
        for name, t in (("grads", g), ("exp_avgs", m), ("exp_avg_sqs", v)):
            if t.numel() != p.numel():
                raise ValueError(f"{name}[{i}] has {t.numel()} elements, params[{i}] has {p.numel()}")
        if m.dtype != state_dtype or v.dtype != state_dtype:
            raise TypeError(f"exp_avgs[{i}] / exp_avg_sqs[{i}] must be {state_dtype}, got {m.dtype} / {v.dtype}")
        if eight_bit:
            nb = -(-p.numel() // STATE_BLOCKSIZE)
            for name, a in (("exp_avg_absmax", mas[i]), ("exp_avg_sq_absmax", vas[i])):
                if a.dtype != torch.float32 or a.numel() != nb:
                    raise ValueError(f"{name}[{i}] must be float32 with {nb} elements, "
                                     f"got {a.dtype} with {a.numel()}")


def adamw_update(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    *,
    step: int,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    exp_avg_absmax: Sequence[torch.Tensor] | None = None,
    exp_avg_sq_absmax: Sequence[torch.Tensor] | None = None,
    backend: str = "auto",
    check: bool = True,
) -> None:
    """One AdamW step (module docstring) on every tensor of the lists, in place.

    Args:
        params, grads: K tensors each; p float32/bf16/fp16, g float32/bf16/fp16, same numel.
        exp_avgs, exp_avg_sqs: 32-bit state, float32 with p's numel; or, with the absmax lists
            given, 8-bit codes (uint8, p's numel) with ``exp_avg_absmax`` /
            ``exp_avg_sq_absmax`` float32 ``[ceil(numel / 256)]``.
        step: the 1-based step count t used for bias correction (shared by all tensors).
        backend: 'auto' (CUDA -> Triton, CPU -> reference, or Triton under
            TRITON_INTERPRET=1), 'triton' or 'reference'.
        check: validate the inputs (the optimizer, whose state is valid by construction,
            skips this on its hot path).

    Raises:
        ValueError / TypeError naming the offending tensor, size, dtype or device.
    """
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")
    if not params:
        return
    if check:
        _check(params, grads, exp_avgs, exp_avg_sqs, exp_avg_absmax, exp_avg_sq_absmax)
    sc = adamw_scalars(step, lr, betas, eps, weight_decay)
    eight_bit = exp_avg_absmax is not None
    if backend == "auto":
        triton_ok = use_triton(params[0])
    elif backend == "triton":
        if params[0].device.type == "cpu" and not interpreting():
            raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before import")
        triton_ok = True
    else:
        triton_ok = False
    groups: dict[tuple, list[int]] = {}
    cpu_scalars: list = []  # built once, on first use
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        if triton_ok and p.is_contiguous() and g.is_contiguous() and m.is_contiguous() and v.is_contiguous():
            groups.setdefault((p.dtype, g.dtype), []).append(i)
        elif not _cpu_fast(p, g, m, v, sc, exp_avg_absmax[i] if eight_bit else None,
                           exp_avg_sq_absmax[i] if eight_bit else None, cpu_scalars):
            # strided tensors take the reference path (same numbers, see module docstring)
            adamw_reference_(p, g, m, v, sc, *((exp_avg_absmax[i], exp_avg_sq_absmax[i]) if eight_bit else ()))
    lists = (params, grads, exp_avgs, exp_avg_sqs, exp_avg_absmax, exp_avg_sq_absmax)
    for idx in groups.values():
        _launch(*([seq[i] for i in idx] if seq is not None else None for seq in lists), sc)
