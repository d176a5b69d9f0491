"""The 2 <= M <= 16 GEMV for bf16/fp16 x on tensor cores, x-stationary like the M = 1 kernel
(``kernels.gemv_tc``): the decoded weight is the MMA's *register* operand, relabelled as there
(``_to_virtual``), and x's tokens are the MMA's 16 columns.

Where it differs from the M = 1 kernel:

- **The absmax scales the weight, not the accumulator.** With 16 real columns there is no spare
  column for a block, so each level is multiplied by its block's absmax before the MMA
  (``mul.rn.bf16x2``: level, absmax and product rounded to x's dtype, as bitsandbytes' kernels and
  ``kernels.gemv``'s warpgroup-MMA kernel do). A thread's 128-bit load is 32 codes of one row and
  one block, so it needs two absmax a K step (its two rows), loaded by asm in the words' layout.
- **A program owns SUB slices of 128 codes, not one.** Its k range is ``128 SUB`` codes; x's SUB
  ``[128, 16]`` operands are staged in shared memory once, and each row tile runs SUB MMA chains
  into one accumulator. The split-K partials (``[SLICES, M, N]`` float32) shrink by SUB: with one
  slice a program they would double the bytes the GEMV moves.
- **Decode** 'lds' (the pair table, 3 words in 4, each pair scaled by ``mul.rn``) with SUB = 16: x's
  64 KB of operands exceed 48 KB, so the launch lifts the limit for the table's 32 KB static part
  too; 'prmt' (byte permutes only) where the table would not fit (4-12 sub-slices, a large LoRA rank).

    grid = (k-slices, row groups); program (s, g) owns codes [128 SUB s, 128 SUB (s + 1))
    xs[j] = x[:, sub-slice j]ᵀ in virtual k order, [128, 16]    (SUB shared-memory operands)
    for each 64 rows of its group:                              # the weight-streaming loop
        d = sum_j (level(words[rows, j]) * absmax) @ xs[j]        # [64 rows, 16 tokens] float32
        ws[s, :, rows] = dᵀ
    the last program of a row group sums ws over s (in order), adds LoRA and bias, stores

On the CPU interpreter the same code runs with the plain decoder (float32 product, rounded once to
the dot's type) and float32 dots, the relabelling included.
Layers: kernels -> ``gemv.gemv_launch``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._decode import decode8_prmt_scaled, decode8_table, pair16
from ._lut import decode8_lds_scaled
from ._tl import cast_out, lora_bias_epilogue
from .gemv_tc import _absmax_lanes, _decode_setup, _join_words, _phys_row, _split_words, _store_partials, _to_virtual

DECODERS = ("table", "prmt", "lds", "lds_table")
BLOCK_ROWS = 64  # one warpgroup's MMA tile
SLICE = 128  # codes of one sub-slice: 4 threads x 32 codes (one 128-bit load each)


@triton.jit
def _x_virtual(xp):
    """``[16 tokens, 128 pk]`` (physical k of a slice) -> ``[128 vk, 16]``, virtual k order
    (``kernels.gemv_tc``: physical ``32 t + 8 j + 4 e2 + 2 e1 + e0`` is virtual ``32 j + 16 e2 + 8 e1
    + 2 t + e0``): a reshape and a permute, so each thread keeps the values it loaded."""
    v = tl.reshape(xp, (16, 4, 4, 2, 2, 2))  # [m, t, j, e2, e1, e0]
    v = tl.permute(v, (2, 3, 4, 1, 5, 0))  # [j, e2, e1, t, e0, m]
    return tl.reshape(v, (128, 16))


@triton.jit
def _weights(wq, am, code_ptr, lb, p0, p1, p2, p3, p4, p5, p6, p7, DECODE: tl.constexpr,
             DOT_DTYPE: tl.constexpr):
    """``[64, 16]`` words and the absmax of each thread group's words ``[64, 4]`` (row, t: words
    4 t .. 4 t + 3, one block) -> ``[64 vr, 128 vk]`` scaled weights in the dot's type, virtual order.
    'lds': words 0-2 of every 4 from the shared pair table, word 3 by byte permutes, each pair then
    scaled by ``mul.rn.bf16x2``; 'prmt': all by byte permutes; 'table' / 'lds_table': the plain
    decoder times the absmax in float32, rounded once (CPU)."""
    if DECODE == "table" or DECODE == "prmt":
        w3 = tl.reshape(wq, (64, 4, 4))  # [pr, t, j]
        if DECODE == "prmt":
            v = decode8_prmt_scaled(w3, p0, p1, p2, p3, p4, p5, p6, p7, pair16(am, DOT_DTYPE)[:, :, None], DOT_DTYPE)
        else:
            v = (decode8_table(w3, code_ptr) * am[:, :, None, None]).to(DOT_DTYPE)
        v = tl.reshape(v, (64, 16, 8))
    else:
        w0, w1, w2, w3 = _split_words(wq)
        if DECODE == "lds":
            s2 = pair16(am, DOT_DTYPE)
            d0 = decode8_lds_scaled(w0, lb, s2, DOT_DTYPE)
            d1 = decode8_lds_scaled(w1, lb, s2, DOT_DTYPE)
            d2 = decode8_lds_scaled(w2, lb, s2, DOT_DTYPE)
            d3 = decode8_prmt_scaled(w3, p0, p1, p2, p3, p4, p5, p6, p7, s2, DOT_DTYPE)
        else:  # 'lds_table': the same split and re-join, plain decoder (CPU)
            d0 = (decode8_table(w0, code_ptr) * am[:, :, None]).to(DOT_DTYPE)
            d1 = (decode8_table(w1, code_ptr) * am[:, :, None]).to(DOT_DTYPE)
            d2 = (decode8_table(w2, code_ptr) * am[:, :, None]).to(DOT_DTYPE)
            d3 = (decode8_table(w3, code_ptr) * am[:, :, None]).to(DOT_DTYPE)
        v = _join_words(d0, d1, d2, d3)
    return _to_virtual(v)


@triton.jit
def _gemv_tcm_kernel(
    x_ptr, w_ptr, absmax_ptr, code_ptr, nabs_ptr, ncode_ptr, offset_ptr,  # x: [M, K]; W packed: [N, K/2] uint8
    lut_ptr,  # int32 [512]: kernels._lut.lut_source (its per-lane byte planes), for 'prmt'
    s_ptr, b_ptr, bias_ptr,  # LoRA S: [M, RANK], B: [N, RANK]; bias: [N]
    out_ptr, ws_ptr, count_ptr,  # out: [M, N]; ws: >= [SLICES, M, N] float32; count: [row groups] int32
    M, N, K, RANK, rows_per_cta,
    stride_xm, stride_xk, stride_wn, stride_om, stride_on,
    stride_sm, stride_sj, stride_bn, stride_bj,
    scale, SLICES,
    SUB: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, DECODE: tl.constexpr,
    HAS_LORA: tl.constexpr, BLOCK_RANK: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, OUT_DTYPE: tl.constexpr, MANUAL_BF16: tl.constexpr,
    GPU_ASM: tl.constexpr,
):
    BN: tl.constexpr = 64
    w_ptr = w_ptr.to(tl.pointer_type(tl.int32))  # the packed bytes, read as 32-bit words
    pid_s = tl.program_id(0)
    pid_g = tl.program_id(1)
    k_base = pid_s * (128 * SUB)
    # x's sub-slices, transposed, in virtual k order: the MMA's [128, 16] shared operands
    # (loaded in physical order, 128-bit loads, then relabelled in registers: _x_virtual)
    tok = tl.arange(0, 16)
    xs = ()
    for j in tl.static_range(SUB):
        kk = k_base + 128 * j + tl.arange(0, 128)
        xj = tl.load(x_ptr + tok[:, None] * stride_xm + kk[None, :] * stride_xk,
                     mask=(tok[:, None] < M) & (kk[None, :] < K), other=0.0)
        xs = xs + (_x_virtual(xj.to(DOT_DTYPE)),)
    offset = 0.0
    if NESTED:
        offset = tl.load(offset_ptr)
    lb, p0, p1, p2, p3, p4, p5, p6, p7 = _decode_setup(lut_ptr, DECODE)  # 'lds': the pair table
    nblk = K // BLOCKSIZE
    offs_w = tl.arange(0, 16)
    pr = tl.arange(0, BN)  # physical rows of a tile: the words' order
    row0 = pid_g * rows_per_cta
    row_end = tl.minimum(row0 + rows_per_cta, N)
    w_ptrs = w_ptr + (row0 + pr)[:, None].to(tl.int64) * stride_wn + k_base // 8 + offs_w[None, :]
    # the absmax of each thread group's words of a sub-slice: [64 pr, 4 t], block of half t >> 1
    half = tl.arange(0, 4)[None, :] >> 1
    blk_row = (row0 + pr)[:, None] * nblk
    # the accumulator [64 vr, 16 tokens] goes to ws[s, token, physical row]
    vrow = _phys_row(tl.arange(0, BN))
    ws_ptrs = ws_ptr + pid_s * M * N + tok[None, :] * N + (row0 + vrow)[:, None]
    # x's shared copies are written above: one barrier here, or Triton puts one before every MMA
    tl.debug_barrier()
    for r0 in range(row0, row_end, BN):
        row_ok = (r0 + pr) < N
        d = tl.zeros((BN, 16), tl.float32)
        for j in tl.static_range(SUB):
            k_ok = (k_base + 128 * j + 64 * (offs_w // 8)) < K  # per half, so the loads stay 128-bit
            wq = tl.load(w_ptrs + 16 * j, mask=row_ok[:, None] & k_ok[None, :], other=0)
            half_ok = row_ok[:, None] & ((k_base + 128 * j + 64 * half) < K)
            blk = blk_row + (k_base + 128 * j + 64 * half) // BLOCKSIZE
            am = _absmax_lanes(absmax_ptr, nabs_ptr, ncode_ptr, offset, blk, half_ok, NESTED, GPU_ASM)
            wv = _weights(wq, am, code_ptr, lb, p0, p1, p2, p3, p4, p5, p6, p7, DECODE, DOT_DTYPE)
            if IEEE:
                d = tl.dot(wv, xs[j], d, input_precision="ieee")
            else:
                d = tl.dot(wv, xs[j], d)
        _store_partials(ws_ptrs, d, ((r0 + vrow) < N)[:, None] & (tok[None, :] < M), GPU_ASM)
        w_ptrs += BN * stride_wn
        blk_row += BN * nblk
        ws_ptrs += BN

    # split-K without a second launch: the last program of the row group sums the partials in
    # slice order (deterministic), adds LoRA and bias, casts once and resets the counter
    tl.debug_barrier()  # every thread's partial stores precede the release below
    arrived = tl.atomic_add(count_ptr + pid_g, 1, sem="acq_rel", scope="gpu")
    if arrived == SLICES - 1:
        rr0 = tl.arange(0, BN)
        for r0 in range(row0, row_end, BN):
            rr = r0 + rr0
            ok = (tok[:, None] < M) & (rr[None, :] < N)
            acc = tl.zeros((16, BN), tl.float32)
            for s in range(0, SLICES):
                acc += tl.load(ws_ptr + s * M * N + tok[:, None] * N + rr[None, :], mask=ok, other=0.0,
                               cache_modifier=".cg")
            acc = lora_bias_epilogue(acc, tok, rr, M, N, s_ptr, stride_sm, stride_sj, b_ptr, stride_bj, stride_bn,
                                     RANK, scale, bias_ptr, bias_ptr, 0, 1.0,
                                     HAS_LORA, BLOCK_RANK, False, HAS_BIAS, True, DOT_DTYPE, IEEE)
            tl.store(out_ptr + tok[:, None] * stride_om + rr[None, :] * stride_on,
                     cast_out(acc, OUT_DTYPE, MANUAL_BF16), mask=ok)
        tl.atomic_xchg(count_ptr + pid_g, 0, sem="relaxed", scope="gpu")  # ready for the next call
