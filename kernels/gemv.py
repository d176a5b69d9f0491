"""Decode regime (M <= ``GEMV_MAX_M`` rows), forward orientation ``y = x Wᵀ``: GEMVs that stream
the packed weight once, with 128-bit loads, and reduce split-K inside the launch.

Four kernels, all for K and the blocksize multiples of 64 (every 64-code group of a row lies in
one absmax block; ``gemv_kind`` says which problems qualify):

``_gemv_tc_kernel`` (M = 1, bf16/fp16; ``kernels.gemv_tc``) — x-stationary, row-streaming, the
decoded weight as a tensor-core MMA's register operand (rows and k relabelled so that no data
moves), codes decoded by a pair table in shared memory (``kernels._lut``), the float32 absmax
applied after the MMA. It is ``tools/perf_model.py``'s fastest M = 1 kernel, and the only one within
the issue's 3.5 instructions a weight.

``_gemv_fma_kernel`` (M = 1, float32 x; bf16/fp16 when a FMA decoder is forced, or when the tc
kernel's decode fails its GPU self-check) — x-stationary, row-streaming, float32 FMA::

    grid = (k-slices, row groups); program (s, g) owns k in [s KS, (s+1) KS), KS = 64 TK
    xs = float32(x[k-slice])                           # converted once, kept in registers
    for each BLOCK_N rows of its group:                # the weight-streaming loop
        w   = words[rows, k-slice]                     # [TK, BLOCK_N, 2, 4] int32: 64 codes a thread
        v   = level(w)                                 # exact float32 levels (DECODE below)
        y_s = sum_k v * xs * absmax[row, block]        # one absmax decode per 64 codes
        ws[s, rows] = y_s          (or, with one slice, the epilogue and the output directly)

``_gemv_tcm_kernel`` (2 <= M <= 16, bf16/fp16; ``kernels.gemv_tcm``, the default) — the M = 1
kernel's register-operand relabelling with x's tokens as the MMA's 16 columns, the weight scaled by
its block's absmax in registers, 16 sub-slices of 128 codes a program. The model's fastest M > 1
kernel on every shape.

``_gemv_mma_kernel`` (2 <= M <= 16, bf16/fp16, under ``multi_kind("mma")``; the GPU suite times it
next to the default) — a Hopper warpgroup MMA with x's rows padded to 64 and the decoded weight as
the operand read from shared memory::

    grid = (row tiles, SPLIT); program (i, s) owns a K range
    for each 64-code block of its range:
        w = level16(codes[rows, block]) * absmax[rows, block]     # [BLOCK_N, 64], in x's dtype
        acc += x[:, block] @ wᵀ                                   # [64, BLOCK_N], float32

The weight is scaled before the dot (``mul.rn.bf16x2``, 0.5 instructions a weight) rather than the
accumulator after it (64 padded rows a block); level, absmax and product are rounded to bf16/fp16,
as bitsandbytes' own kernels do, so its error bound is the dtype's.

Split-K without a second launch: each program stores its float32 partial in a workspace and
increments a per-tile counter; the program that arrives last sums the partials in split order
(deterministic), applies the fused epilogue ``+ scale * S Bᵀ + bias`` in float32, casts once,
stores the output and resets the counter to 0 for the next call (so the counters are allocated
once per device and the launch is CUDA-graph capturable: no host sync, no per-call variable
allocation beyond the workspace of a fixed size).

DECODE (``kernels._decode``, ``kernels._lut``): 'table' (plain Triton, the interpreter and the
reference), 'lds' (tc kernel on the GPU: three words in four from the shared pair table, the fourth by
byte permutes; 'lds_table' is its CPU test), 'shfl'
(FMA kernel on the GPU for float32 x: warp shuffles give exact float32 levels), 'hybrid' (FMA kernel,
bf16/fp16 x: three words of every four by shuffle, the fourth by byte permutes on fp16 levels; the
shuffles' MIO path bounds the exact decoder and the permutes' ALU work bounds the other, and 3:1
balances the two), 'mixed' (half by each: an alternative the model ranks below 'hybrid'), 'prmt'
(MMA kernels on the GPU: byte permutes give bf16/fp16 levels, as bitsandbytes' kernels round them;
the tcm kernel's 'lds' scales the table's pairs the same way, 'lds_table' is its CPU test).
Layers: kernels -> ``gemv_launch`` (called by ``kernels.matmul``).
"""

from __future__ import annotations

import contextlib
import functools
import threading

import torch
import triton
import triton.language as tl

from ._decode import (decode8_mixed, decode8_prmt_f32, decode8_prmt_scaled, decode8_shfl, decode8_table, lane_table, pair16,
                      load_planes, planes, verified)
from ._launch import cdiv, device_guard, next_pow2
from ._tl import cast_out, finish_split_k_rows, lora_bias_epilogue, manual_bf16, row_epilogue, tl_dtype
from ._lut import STATIC_BUDGET, TABLE_BYTES, lut_source
from .dispatch import interpreting
from .gemv_tc import BLOCK_ROWS as TC_ROWS, SLICE as TC_SLICE, _gemv_tc_kernel
from .gemv_tc import verified as tc_verified
from .gemv_tcm import SLICE as TCM_SLICE, _gemv_tcm_kernel

__all__ = ["GEMV_MAX_M", "gemv_kind", "gemv_launch", "gemv_config", "force_decoder", "DECODERS"]

GEMV_MAX_M = 16  # tensor-core tiles pad M to 16; above that the GEMM regimes take over
GROUP = 64  # codes per thread group / per MMA step: the kernels need K and blocksize multiples of it
DECODERS = ("auto", "table", "shfl", "mixed", "hybrid", "hybrid_table", "prmt", "lds", "lds_table")
FMA_DECODERS = ("shfl", "mixed", "hybrid", "hybrid_table")  # forcing one runs M = 1 on the FMA kernel
KIND_DECODERS = {"fma": ("table",) + FMA_DECODERS, "tc": ("table", "lds", "lds_table"), "mma": ("table", "prmt"),
                 "tcm": ("table", "prmt", "lds", "lds_table")}

_state = threading.local()
TC_PER_SM = 4  # tc programs per SM the row grouping aims at
MULTI_KINDS = ("tcm", "mma")  # the 2 <= M <= 16 kernels; the first is the default (``multi_kind``)
TCM_SUB = 16  # 128-code sub-slices a tcm program owns on a GPU (x's operands: 4 KB each)
TCM_SUB_CPU = 2  # and in the interpreter (tests set 1 or 3)
TCM_X_BYTES = 128 * 16 * 2  # one sub-slice's x operand
TCM_PER_SM = 4


@contextlib.contextmanager
def force_decoder(name: str):
    """Decode with ``name`` in this block ('table' runs the plain-Triton decoder on the GPU too,
    which is how ``benchmarks.gpu_checks`` proves the asm decoders bit-exact)."""
    if name not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {name!r}")
    old = getattr(_state, "decoder", "auto")
    _state.decoder = name
    try:
        yield
    finally:
        _state.decoder = old


@contextlib.contextmanager
def multi_kind(name: str):
    """Run 2 <= M <= 16 bf16/fp16 problems on ``name`` ('tcm', the default, or 'mma') in this block:
    the GPU suite times both in one run, so a GPU session checks the choice the model made."""
    if name not in MULTI_KINDS:
        raise ValueError(f"the 2 <= M <= 16 kernel must be one of {MULTI_KINDS}, got {name!r}")
    old = getattr(_state, "multi", MULTI_KINDS[0])
    _state.multi = name
    try:
        yield
    finally:
        _state.multi = old


def gemv_kind(M: int, K: int, blocksize: int, dtype: torch.dtype, multi: str | None = None) -> str | None:
    """'tc', 'fma', 'tcm' or 'mma' when a streaming GEMV handles ``x: [M, K]`` against a weight quantized with
    ``blocksize``; None when the problem needs the generic kernels (K not a multiple of 64 and of
    the blocksize, a blocksize below 64, M above ``GEMV_MAX_M``, float32/64 activations with M > 1).
    Every LLM projection (K = 4096, 14336, ..., blocksize 64) qualifies."""
    if M < 1 or K % GROUP or blocksize % GROUP or K % blocksize or M > GEMV_MAX_M:
        return None
    if M == 1 and dtype in (torch.bfloat16, torch.float16):
        return "tc"
    if M == 1 and dtype == torch.float32:
        return "fma"
    if dtype in (torch.bfloat16, torch.float16):
        return multi or getattr(_state, "multi", MULTI_KINDS[0])
    return None


# ---- the M = 1 kernel --------------------------------------------------------------------------
@triton.jit
def _fma_level(w, code_ptr, lane_t, p0, p1, p2, p3, p4, p5, p6, p7, DECODE: tl.constexpr):
    """``[TK, BLOCK_N, 2, 4]`` words -> ``[TK, BLOCK_N, 64]`` float32 levels."""
    if DECODE == "shfl":
        v = decode8_shfl(w, lane_t)
    elif DECODE == "mixed":
        v = decode8_mixed(w, lane_t, p0, p1, p2, p3, p4, p5, p6, p7)
    elif DECODE == "hybrid" or DECODE == "hybrid_table":
        # words 0-2 of every 4 by shuffle (exact), word 3 by byte permutes (fp16 levels): 3/4 of the
        # codes on the MIO path and 1/4 on the ALUs, which balances the two bounds of the M = 1 GEMV.
        # ('hybrid_table' runs the same split and re-join with the plain decoder: the CPU test.)
        w5 = tl.reshape(w, (w.shape[0], w.shape[1], 2, 2, 2))
        even, odd = tl.split(w5)  # word index bit 0
        w0, w2 = tl.split(even)  # bit 1
        w1, w3 = tl.split(odd)
        if DECODE == "hybrid":
            t5 = tl.reshape(lane_t, (w.shape[0], w.shape[1], 2, 2, 2))
            t_even, _t_odd = tl.split(t5)
            t0, _t2 = tl.split(t_even)
            d0 = decode8_shfl(w0, t0)
            d1 = decode8_shfl(w1, t0)
            d2 = decode8_shfl(w2, t0)
            d3 = decode8_prmt_f32(w3, p0, p1, p2, p3, p4, p5, p6, p7)
        else:
            d0 = decode8_table(w0, code_ptr)
            d1 = decode8_table(w1, code_ptr)
            d2 = decode8_table(w2, code_ptr)
            d3 = decode8_table(w3, code_ptr).to(tl.float16).to(tl.float32)
        # [TK, BN, half, e, bit1, bit0] -> [TK, BN, half, bit1, bit0, e]: word 2 bit1 + bit0, element e
        v = tl.permute(tl.join(tl.join(d0, d2), tl.join(d1, d3)), (0, 1, 2, 4, 5, 3))
    else:
        v = decode8_table(w, code_ptr)
    return tl.reshape(v, (w.shape[0], w.shape[1], 64))


@triton.jit
def _absmax_rows(a_ptrs, ncode_ptr, nabs_ptr, blk, offset, mask, NESTED: tl.constexpr):
    """float32 absmax of the blocks ``blk`` (int32 block indices, pointers ``a_ptrs``)."""
    if NESTED:
        q = tl.load(a_ptrs, mask=mask, other=0).to(tl.int32)
        return tl.load(ncode_ptr + q) * tl.load(nabs_ptr + (blk >> 8), mask=mask, other=0.0) + offset
    else:
        return tl.load(a_ptrs, mask=mask, other=0.0)


@triton.jit
def _gemv_fma_kernel(
    x_ptr, w_ptr, absmax_ptr, code_ptr, nabs_ptr, ncode_ptr, offset_ptr,  # x: [K]; W packed: [N, K/2] uint8
    planes_ptr,  # int32 [8]: the levels' byte planes (kernels._decode.planes), for the permute decoders
    s_ptr, b_ptr, bias_ptr,  # LoRA S: [1, RANK], B: [N, RANK]; bias: [N]
    out_ptr, ws_ptr, count_ptr,  # out: [N] (stride_on); ws: >= [SLICES, N] float32; count: [row groups] int32
    N, K, RANK, rows_per_cta,
    stride_xk, stride_wn, stride_on,
    stride_sj, stride_bn, stride_bj,
    scale, SLICES,
    BLOCK_N: tl.constexpr, TK: tl.constexpr, SPLIT_K: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    DECODE: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK_RANK: tl.constexpr, HAS_BIAS: tl.constexpr,
    OUT_DTYPE: tl.constexpr, MANUAL_BF16: tl.constexpr,
):
    KS: tl.constexpr = TK * 64  # codes per k-slice
    w_ptr = w_ptr.to(tl.pointer_type(tl.int32))  # the packed bytes, read as 32-bit words
    pid_s = tl.program_id(0)
    pid_g = tl.program_id(1)
    offs_t = tl.arange(0, TK)
    offs_r = tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, 2)
    offs_w = tl.arange(0, 4)
    k_base = pid_s * KS
    k_ok = (k_base + offs_t * 64) < K  # [TK]: the last slice may be partial
    # x slice, float32: thread group t holds x[k_base + 64 t : + 64]
    kx = k_base + offs_t[:, None] * 64 + tl.arange(0, 64)[None, :]
    xs = tl.load(x_ptr + kx * stride_xk, mask=kx < K, other=0.0).to(tl.float32)  # [TK, 64]
    offset = 0.0
    if NESTED:
        offset = tl.load(offset_ptr)
    row0 = pid_g * rows_per_cta
    rows = row0 + offs_r  # [BLOCK_N]
    # words of (group t, row r): 2 halves x 4 words = 64 codes, one 16-byte load per half
    w_ptrs = (w_ptr + rows[None, :, None, None].to(tl.int64) * stride_wn + (k_base // 8 + offs_t * 8)[:, None, None, None]
              + offs_h[None, None, :, None] * 4 + offs_w[None, None, None, :])
    blk32 = rows[None, :] * (K // BLOCKSIZE) + ((k_base + offs_t * 64) // BLOCKSIZE)[:, None]  # [TK, BLOCK_N]
    a_ptrs = absmax_ptr + blk32
    lane_t = tl.zeros((TK, BLOCK_N, 2, 4), tl.float32)
    if DECODE == "shfl" or DECODE == "mixed" or DECODE == "hybrid":
        lane_t = lane_table(code_ptr, lane_t)
    p0, p1, p2, p3, p4, p5, p6, p7 = 0, 0, 0, 0, 0, 0, 0, 0
    if DECODE == "mixed" or DECODE == "hybrid":
        p0, p1, p2, p3, p4, p5, p6, p7 = load_planes(planes_ptr)
    blk_step = BLOCK_N * (K // BLOCKSIZE)
    row_end = tl.minimum(row0 + rows_per_cta, N)
    for r0 in range(row0, row_end, BLOCK_N):
        row_ok = (r0 + offs_r) < N
        mask = k_ok[:, None] & row_ok[None, :]
        wq = tl.load(w_ptrs, mask=mask[:, :, None, None], other=0)
        v = _fma_level(wq, code_ptr, lane_t, p0, p1, p2, p3, p4, p5, p6, p7, DECODE)
        part = tl.sum(v * xs[:, None, :], axis=2)  # [TK, BLOCK_N]
        am = _absmax_rows(a_ptrs, ncode_ptr, nabs_ptr, blk32, offset, mask, NESTED)
        y = tl.sum(part * am, axis=0)  # [BLOCK_N]
        if not SPLIT_K:
            y = row_epilogue(y, r0 + offs_r, N, s_ptr, stride_sj, b_ptr, stride_bn, stride_bj, RANK, scale, bias_ptr,
                              HAS_LORA, BLOCK_RANK, HAS_BIAS)
            tl.store(out_ptr + (r0 + offs_r) * stride_on, cast_out(y, OUT_DTYPE, MANUAL_BF16), mask=row_ok)
        else:
            tl.store(ws_ptr + pid_s * N + r0 + offs_r, y, mask=row_ok)
        w_ptrs += BLOCK_N * stride_wn
        a_ptrs += blk_step
        blk32 += blk_step

    if SPLIT_K:
        finish_split_k_rows(count_ptr, pid_g, ws_ptr, out_ptr, stride_on, row0, row_end, N, SLICES, s_ptr, stride_sj,
                            b_ptr, stride_bn, stride_bj, RANK, scale, bias_ptr, BLOCK_N, HAS_LORA, BLOCK_RANK,
                            HAS_BIAS, OUT_DTYPE, MANUAL_BF16)


# ---- the 2 <= M <= 16 kernel ---------------------------------------------------------------------
@triton.jit
def _mma_block(wq, am, code_ptr, p0, p1, p2, p3, p4, p5, p6, p7, DECODE: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """``[BLOCK_N, 8]`` words and their rows' absmax ``[BLOCK_N]`` -> ``[BLOCK_N, 64]`` weights in
    the dot's operand type. 'prmt' rounds level, absmax and product to DOT_DTYPE (as bitsandbytes'
    kernels do); 'table' multiplies in float32 (the reference's value) and rounds once."""
    if DECODE == "prmt":
        v = decode8_prmt_scaled(wq, p0, p1, p2, p3, p4, p5, p6, p7, pair16(am, DOT_DTYPE)[:, None], DOT_DTYPE)
    else:
        v = (decode8_table(wq, code_ptr) * am[:, None, None]).to(DOT_DTYPE)
    return tl.reshape(v, (wq.shape[0], 64))


@triton.jit
def _gemv_mma_kernel(
    x_ptr, w_ptr, absmax_ptr, code_ptr, nabs_ptr, ncode_ptr, offset_ptr,  # x: [M, K]; W packed: [N, K/2] uint8
    planes_ptr,  # int32 [8]: the levels' byte planes (kernels._decode.planes)
    s_ptr, b_ptr, bias_ptr,  # S: [M, RANK], B: [N, RANK], bias: [N]
    out_ptr, ws_ptr, count_ptr,  # out: [M, N]; ws: >= [SPLIT, M, N] float32; count: [row tiles] int32
    M, N, K, RANK, k_per_split,
    stride_xm, stride_xk, stride_wn, stride_om, stride_on,
    stride_sm, stride_sj, stride_bn, stride_bj,
    scale, SPLIT,
    BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    DECODE: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK_RANK: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, OUT_DTYPE: tl.constexpr, MANUAL_BF16: tl.constexpr,
):
    BLOCK_M: tl.constexpr = 64  # the smallest M of a Hopper warpgroup MMA; rows >= M are zeros
    w_ptr = w_ptr.to(tl.pointer_type(tl.int32))  # the packed bytes, read as 32-bit words
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    offs_m = tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    offs_k = tl.arange(0, 64)
    offs_w = tl.arange(0, 8)
    offset = 0.0
    if NESTED:
        offset = tl.load(offset_ptr)
    p0, p1, p2, p3, p4, p5, p6, p7 = 0, 0, 0, 0, 0, 0, 0, 0
    if DECODE == "prmt":
        p0, p1, p2, p3, p4, p5, p6, p7 = load_planes(planes_ptr)
    k_begin = pid_s * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_wn + tl.multiple_of(k_begin // 8, 8) + offs_w[None, :]
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k_begin + offs_k)[None, :] * stride_xk  # [64, 64]
    blk_row = rows * (K // BLOCKSIZE)  # [BLOCK_N]: first block of each row (K % BLOCKSIZE == 0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(k_begin, k_end, 64):
        wq = tl.load(w_ptrs, mask=row_ok[:, None], other=0)
        blk = blk_row + k0 // BLOCKSIZE
        am = _absmax_rows(absmax_ptr + blk, ncode_ptr, nabs_ptr, blk, offset, row_ok, NESTED)
        wt = _mma_block(wq, am, code_ptr, p0, p1, p2, p3, p4, p5, p6, p7, DECODE, DOT_DTYPE)
        xt = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0).to(DOT_DTYPE)
        if IEEE:
            acc = tl.dot(xt, tl.trans(wt), acc, input_precision="ieee")
        else:
            acc = tl.dot(xt, tl.trans(wt), acc)
        w_ptrs += 8
        x_ptrs += 64 * stride_xk

    if not SPLIT_K:
        _mma_finish(acc, offs_m, rows, M, N, out_ptr, stride_om, stride_on, s_ptr, stride_sm, stride_sj, b_ptr,
                    stride_bn, stride_bj, RANK, scale, bias_ptr, HAS_LORA, BLOCK_RANK, HAS_BIAS, DOT_DTYPE, IEEE,
                    OUT_DTYPE, MANUAL_BF16)
    else:
        tile_ok = m_ok[:, None] & row_ok[None, :]
        tl.store(ws_ptr + pid_s * M * N + offs_m[:, None] * N + rows[None, :], acc, mask=tile_ok)
        # the last of this tile's SPLIT programs reduces the partials (in split order)
        tl.debug_barrier()  # every thread's partial stores precede the release below
        arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT - 1:
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for s in range(0, SPLIT):
                acc += tl.load(ws_ptr + s * M * N + offs_m[:, None] * N + rows[None, :], mask=tile_ok, other=0.0,
                               cache_modifier=".cg")
            _mma_finish(acc, offs_m, rows, M, N, out_ptr, stride_om, stride_on, s_ptr, stride_sm, stride_sj, b_ptr,
                        stride_bn, stride_bj, RANK, scale, bias_ptr, HAS_LORA, BLOCK_RANK, HAS_BIAS, DOT_DTYPE, IEEE,
                        OUT_DTYPE, MANUAL_BF16)
            tl.atomic_xchg(count_ptr + pid_n, 0, sem="relaxed", scope="gpu")  # ready for the next call


@triton.jit
def _mma_finish(acc, offs_m, rows, M, N, out_ptr, stride_om, stride_on, s_ptr, stride_sm, stride_sj, b_ptr,
                stride_bn, stride_bj, RANK, scale, bias_ptr,
                HAS_LORA: tl.constexpr, BLOCK_RANK: tl.constexpr, HAS_BIAS: tl.constexpr,
                DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, OUT_DTYPE: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """``out[m, n] = acc[m, n] + scale * sum_j S[m, j] B[n, j] + bias[n]`` (float32), cast once."""
    acc = lora_bias_epilogue(acc, offs_m, rows, M, N, s_ptr, stride_sm, stride_sj, b_ptr, stride_bj, stride_bn,
                             RANK, scale, bias_ptr, bias_ptr, 0, 1.0,
                             HAS_LORA, BLOCK_RANK, False, HAS_BIAS, True, DOT_DTYPE, IEEE)
    tl.store(out_ptr + offs_m[:, None] * stride_om + rows[None, :] * stride_on, cast_out(acc, OUT_DTYPE, MANUAL_BF16),
             mask=(offs_m[:, None] < M) & (rows[None, :] < N))


# ---- configs and launcher --------------------------------------------------------------------------
_SMS = 132  # H200
_counters: dict = {}


def gemv_config(kind: str, M: int, N: int, K: int, device: torch.device) -> dict:
    """Tiles, split and warps. The GPU values are chosen with ``tools/perf_model.py`` (issue, MIO and
    register budget of each candidate on the H200); the interpreter uses small tiles so CI shapes
    cross every boundary (row tails, several k-slices and splits)."""
    return _make_config(kind, M, N, K, device.type == "cuda")


def _make_config(kind: str, M: int, N: int, K: int, gpu: bool) -> dict:
    cpu = not gpu
    decode = "table" if cpu else {"fma": "shfl", "tc": "lds", "tcm": "lds"}.get(kind, "prmt")
    if kind == "tc":
        slices = cdiv(K, TC_SLICE)
        if cpu:
            return dict(rows_per_cta=2 * TC_ROWS, SLICES=slices, DECODE=decode, num_warps=4)
        groups = max(1, min(cdiv(N, TC_ROWS), TC_PER_SM * _SMS // slices))
        rows = cdiv(cdiv(N, groups), TC_ROWS) * TC_ROWS
        # enable_fp_fusion=False: the nested absmax is two roundings, as in kernels._tl (bit-exact)
        return dict(rows_per_cta=rows, SLICES=slices, DECODE=decode, num_warps=4, num_stages=1,
                    enable_fp_fusion=False)
    if kind == "tcm":
        sub = min(TCM_SUB_CPU if cpu else TCM_SUB, cdiv(K, TCM_SLICE))
        if gpu and 3 < sub <= STATIC_BUDGET // TCM_X_BYTES:
            decode = "prmt"  # K of 4-12 sub-slices: one slice, no pair table (its 32 KB would not fit)
        slices = cdiv(K, TCM_SLICE * sub)
        if cpu:
            return dict(rows_per_cta=2 * TC_ROWS, SLICES=slices, SUB=sub, DECODE=decode, num_warps=4)
        groups = max(1, min(cdiv(N, TC_ROWS), TCM_PER_SM * _SMS // slices))
        rows = cdiv(cdiv(N, groups), TC_ROWS) * TC_ROWS
        return dict(rows_per_cta=rows, SLICES=slices, SUB=sub, DECODE=decode, num_warps=4, num_stages=1,
                    enable_fp_fusion=False)
    if kind == "fma":
        if cpu:
            return dict(TK=2, BLOCK_N=8, rows_per_cta=16, SLICES=cdiv(K, 128), DECODE=decode, num_warps=1)
        tk, block_n, warps, per_sm = 2, 128, 4, 4  # 128 registers: 4 programs of 4 warps per SM
        slices = cdiv(K, 64 * tk)
        slots = per_sm * _SMS
        # the fewest row groups that fill one wave of programs (never a second, nearly empty one)
        groups = max(1, min(cdiv(N, block_n), slots // slices))
        rows = cdiv(cdiv(N, groups), block_n) * block_n
        return dict(TK=tk, BLOCK_N=block_n, rows_per_cta=rows, SLICES=slices, DECODE=decode, num_warps=warps)
    if cpu:
        block_n, warps, split = 16, 1, min(2, K // GROUP)
    else:
        block_n, warps = 256, 8  # one program per SM (175 registers); 64 KB of weights per K step
        tiles = cdiv(N, block_n)
        split = max(1, min(K // GROUP // 4, _SMS // tiles))
    k_per_split = cdiv(K // GROUP, split) * GROUP
    split = cdiv(K, k_per_split)
    return dict(BLOCK_N=block_n, SPLIT=split, k_per_split=k_per_split, DECODE=decode, num_warps=warps,
                **({} if cpu else {"num_stages": 1}))


def _stream_key(device: torch.device):
    return (device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)


def _scratch(device: torch.device, counters: int, ws_floats: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(counters, workspace)`` of this device and stream, allocated once and grown when needed:
    zeroed int32 counters (one per row group / tile; the kernels leave them at zero) and the float32
    split-K partials. Kernels on one stream run in order, so they can share both; keeping them
    makes a call allocate nothing but its output (CUDA graphs: warm up once before capture)."""
    key = _stream_key(device)
    hit = _counters.get(key)
    if hit is not None and hit[2] >= counters and hit[3] >= ws_floats:  # the steady state: no tensor call
        return hit[0], hit[1]
    cnt, ws = (None, None) if hit is None else hit[:2]
    if cnt is None or cnt.numel() < counters:
        cnt = torch.zeros(max(counters, 1024), dtype=torch.int32, device=device)
    if ws is None or ws.numel() < ws_floats:
        ws = torch.empty(max(ws_floats, 1 << 16), dtype=torch.float32, device=device)
    _counters[key] = (cnt, ws, cnt.numel(), ws.numel())
    return cnt, ws


@functools.lru_cache(maxsize=4096)
def _plan(M: int, n: int, k: int, blocksize: int, nested: bool, x_dtype, out_dtype, rank: int, has_lora: bool,
          has_bias: bool, gpu: bool, decode: str | None, multi: str) -> tuple:
    """Everything about a launch that depends only on the problem's shape and flags:
    ``(kind, grid, scalars, constexprs, counters, ws_floats)``. Memoized: the eager decode path
    pays a dictionary lookup, not the config arithmetic."""
    kind = gemv_kind(M, k, blocksize, x_dtype, multi)
    if kind is None:
        return (None,) * 6
    if kind == "tc" and decode in FMA_DECODERS:
        kind = "fma"  # a decoder of the FMA kernel asked for (tests, or the tc decoder's fallback)
    cfg = dict(gemv_config(kind, M, n, k, torch.device("cuda" if gpu else "cpu")))
    if cfg["DECODE"] == "shfl" and x_dtype != torch.float32:
        # 3 words of 4 by shuffle, 1 by permutes (fp16 levels: finer than bf16/fp16 x's own rounding)
        cfg["DECODE"] = "hybrid"
    if decode is not None:
        if decode not in KIND_DECODERS[kind]:
            raise ValueError(f"decoder {decode!r} does not apply to the {kind!r} GEMV (M={M}, {x_dtype}); "
                             f"it takes {KIND_DECODERS[kind]}")
        cfg["DECODE"] = decode
    interp = interpreting()
    meta = dict(BLOCKSIZE=blocksize, NESTED=nested, HAS_LORA=has_lora,
                BLOCK_RANK=max(16, next_pow2(max(rank, 1))), HAS_BIAS=has_bias, OUT_DTYPE=tl_dtype(out_dtype),
                MANUAL_BF16=manual_bf16(out_dtype, interp))
    if kind == "fma":
        slices, rows = cfg.pop("SLICES"), cfg.pop("rows_per_cta")
        groups = cdiv(n, rows)
        meta.update(SPLIT_K=slices > 1, **cfg)
        return kind, (slices, groups), (rows, slices), meta, groups, slices * n if slices > 1 else 0
    if kind == "tcm":
        slices, rows = cfg.pop("SLICES"), cfg.pop("rows_per_cta")
        groups = cdiv(n, rows)
        dot_dtype = torch.float32 if interp else x_dtype  # the interpreter's bf16 dot is wrong (NOTES §3)
        meta.update(DOT_DTYPE=tl_dtype(dot_dtype), IEEE=interp, GPU_ASM=not interp, **cfg)
        # the pair table is 32 KB of static shared memory, and the launch lifts the 48 KB limit only
        # when Triton's own part (x's SUB operands, and the LoRA epilogue's dot: ~160 B a rank
        # column, counted on top to be safe) exceeds it
        own = TCM_X_BYTES * meta["SUB"] + (160 * meta["BLOCK_RANK"] if has_lora else 0)
        if (gpu or not interp) and meta["DECODE"] == "lds" and STATIC_BUDGET - TABLE_BYTES - 1024 < own <= STATIC_BUDGET:
            if decode is None:
                meta["DECODE"] = "prmt"  # no table: byte permutes only
            else:
                raise ValueError(f"the tcm GEMV with the shared pair table takes SUB <= 3 or >= 13 (and a small "
                                 f"LoRA rank with SUB <= 3), got SUB={meta['SUB']}, rank {rank}")
        return kind, (slices, groups), (rows, slices), meta, groups, slices * M * n
    if kind == "tc":
        slices, rows = cfg.pop("SLICES"), cfg.pop("rows_per_cta")
        groups = cdiv(n, rows)
        dot_dtype = torch.float32 if interp else x_dtype  # the interpreter's bf16 dot is wrong (NOTES §3)
        meta.update(LEVEL_DTYPE=tl_dtype(x_dtype), LEVEL_MANUAL_BF16=manual_bf16(x_dtype, interp),
                    DOT_DTYPE=tl_dtype(dot_dtype), IEEE=interp,
                    GPU_STORE=not interp, **cfg)
        return kind, (slices, groups), (rows, slices), meta, groups, slices * n
    split, k_per_split = cfg.pop("SPLIT"), cfg.pop("k_per_split")
    tiles = cdiv(n, cfg["BLOCK_N"])
    dot_dtype = torch.float32 if interp else x_dtype  # the interpreter's bf16 dot is wrong (NOTES §3)
    meta.update(SPLIT_K=split > 1, DOT_DTYPE=tl_dtype(dot_dtype), IEEE=interp or x_dtype == torch.float32, **cfg)
    return kind, (tiles, split), (k_per_split, split), meta, tiles, split * M * n if split > 1 else 0


def gemv_launch(x: torch.Tensor, state: tuple, n: int, k: int, blocksize: int, lora_s, lora_B, scale: float,
                bias, out_dtype: torch.dtype, config: dict | None = None) -> torch.Tensor:
    """``y = x Wᵀ + scale * S Bᵀ + bias`` for ``x: [M, K]`` (M <= GEMV_MAX_M), ``W: [n, k]`` packed
    (``state`` as in ``kernels.state.quant_state``); returns ``[M, n]`` of ``out_dtype``.
    ``config`` (tests, tuning) overrides ``gemv_config``'s keys. Written for the host cost of a
    decode-size call: one allocation (the output), one memoized plan, no recomputation."""
    M = x.shape[0]
    dev = x.device
    data, absmax, code, nabs, ncode, offset = state
    gpu = dev.type == "cuda"
    forced = getattr(_state, "decoder", "auto")
    decode = None if forced == "auto" else forced
    if gpu and decode is None and not verified(dev, code):
        decode = "table"
    rank = 0 if lora_s is None else lora_s.shape[1]
    multi = getattr(_state, "multi", MULTI_KINDS[0])
    kind, grid, (p1, p2), meta, counters, ws_floats = _plan(
        M, n, k, blocksize, nabs is not None, x.dtype, out_dtype, rank, lora_s is not None, bias is not None, gpu,
        decode, multi)
    if kind is None:
        raise ValueError(f"no streaming GEMV for M={M}, K={k}, blocksize={blocksize}, {x.dtype}")
    if kind in ("tc", "tcm") and gpu and decode is None and not tc_verified(dev, code, x.dtype):
        # the shared-table decode failed its self-check: M = 1 runs the FMA kernel's shuffle + permute
        # decoder, M > 1 the byte permutes (their own self-check passed above)
        kind, grid, (p1, p2), meta, counters, ws_floats = _plan(
            M, n, k, blocksize, nabs is not None, x.dtype, out_dtype, rank, lora_s is not None, bias is not None, gpu,
            "hybrid" if kind == "tc" else "prmt", multi)
    out = torch.empty((M, n), dtype=out_dtype, device=dev)
    if n == 0:
        return out
    if config:
        meta = {**meta, **{key: v for key, v in config.items() if key in meta}}
    count, ws = _scratch(dev, counters, ws_floats)
    s_t = x if lora_s is None else lora_s
    b_t = x if lora_B is None else lora_B
    sm, sj = s_t.stride()
    bn, bj = b_t.stride()
    xm, xk = x.stride()
    dec = meta["DECODE"]
    if kind == "tc":
        if meta["num_warps"] != 4:  # the shared table's fill is written for exactly 128 threads
            raise ValueError(f"the tc GEMV runs 4 warps (one warpgroup), got num_warps={meta['num_warps']}")
        pl = lut_source(code, x.dtype) if dec == "lds" else count
    elif kind == "tcm":
        if meta["num_warps"] != 4:  # the relabelling is written for one warpgroup
            raise ValueError(f"the tcm GEMV runs 4 warps (one warpgroup), got num_warps={meta['num_warps']}")
        pl = lut_source(code, x.dtype) if dec in ("lds", "prmt") else count
    else:
        pl = planes(code, torch.float16 if kind == "fma" else x.dtype) if dec in ("mixed", "hybrid", "prmt") else count
    args = (x, data, absmax, code, absmax if nabs is None else nabs, code if ncode is None else ncode,
            code if offset is None else offset, pl, s_t, b_t, x if bias is None else bias, out, ws, count)
    with device_guard(x):
        if kind == "fma":
            _gemv_fma_kernel[grid](*args, n, k, rank, p1, xk, k // 8, 1, sj, bn, bj, float(scale), p2, **meta)
        elif kind == "tc":
            _gemv_tc_kernel[grid](*args, n, k, rank, p1, xk, k // 8, 1, sj, bn, bj, float(scale), p2, **meta)
        elif kind == "tcm":
            _gemv_tcm_kernel[grid](*args, M, n, k, rank, p1, xm, xk, k // 8, n, 1, sm, sj, bn, bj, float(scale), p2,
                                   **meta)
        else:
            _gemv_mma_kernel[grid](*args, M, n, k, rank, p1, xm, xk, k // 8, n, 1, sm, sj, bn, bj, float(scale), p2,
                                   **meta)
    return out
