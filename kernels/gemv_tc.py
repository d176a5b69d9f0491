"""The M = 1 GEMV for bf16/fp16 x on tensor cores: the decoded weight is the MMA's *register*
operand, in the very registers the packed codes were loaded into, and the codes are decoded by a
pair table in shared memory (``kernels._lut``). ``kernels.gemv`` dispatches it for M = 1 bf16/fp16
(float32 x keeps the exact-level FMA kernel).

Why it needs no repack. A Hopper MMA's register operand A ``[64 rows, 16 k]`` gives thread
``(g, t) = (lane // 4, lane % 4)`` of warp ``w`` rows ``16 w + g`` and ``+ 8`` at k columns
``2 t, 2 t + 1, 2 t + 8, 2 t + 9``. A 128-bit load of bitsandbytes' row-major codes gives a
thread 32 *contiguous* codes of one row. A dot product does not care how its k terms (or its
rows) are numbered, so the kernel numbers them the way the loads placed them. With ``[64, 16]``
words loaded as lanes 8 x 4 with 4 words a thread and warps along rows (what Triton's coalescing
picks), physical row ``pr = 32 i + 8 w + g`` is virtual row ``vr = 16 w + 8 i + g``, and physical
code ``32 t + 8 j + e`` of the slice (word ``4 t + j``, element ``e = 4 e2 + 2 e1 + e0``) is
virtual k ``32 j + 16 e2 + 8 e1 + 2 t + e0``. ``_to_virtual`` is that relabelling, a reshape and a
permute. It moves no data when the layouts line up: ``tools/perf_model.py`` reads the SASS, and
the HGMMA takes A from registers with no shared-memory staging. x is loaded once, in the same
virtual k order. The relabelling is plain Triton semantics: the result never depends on it, only
the speed does.

One float32 absmax per 64-code block, applied after the MMA. A 128-code slice spans two blocks and
one MMA sums over all of it, so x enters as columns: x on half h of the slice (zeros on the other
half) in columns 2 h and 2 h + 4, zeros in the rest. Thread ``(g, t)`` holds accumulator columns
``2 t`` (and others), so every thread owns exactly one (row, half) partial sum: row ``16 w + 8 (t
>> 1) + g``, half ``t & 1`` (``_lane_pick``). It decodes that one absmax (one nested decode a
thread per K step, not four), scales, and one shuffle adds the two halves. The absmax loads are asm
(``_ld_u8``, ``_ld_b32``) so they stay in the accumulator's layout; a ``tl.load`` would get a
coalesced layout and move the values through shared memory. Levels are rounded to x's dtype (as
bitsandbytes' kernels round them); the absmax (two roundings when nested, no FMA) and the products
are not.

Decode ('lds'): words 0-2 of every 4 from the shared pair table (1.5 instructions a code, one
shared-memory wavefront per 64 codes a warp), word 3 by the byte permutes of ``kernels._decode``
(2.6 ALU instructions a code, no memory traffic). 3:1 keeps the loop under both the issue and the
shared-memory budget of an HBM-speed GEMV (predicted; ``benchmarks/results/perf_model.md``).
'lds_table' runs the same split and re-join with the plain decoder (the CPU test of it); 'table'
is the plain decoder (the interpreter, and the GPU's fallback).

    grid = (k-slices, row groups); program (s, g) owns codes [128 s, 128 s + 128)
    xv = x[slice] in virtual order, halves in columns (0, 4) and (2, 6), zeros elsewhere
    fill the pair table (once a program); one CTA barrier (none in the loop)
    for each 64 rows of its group:                            # the weight-streaming loop
        d = level(words[rows, slice]) @ xv                    # [64, 16] float32, one MMA chain
        ws[s, rows] = d[rows, 0] absmax[rows, blk0] + d[rows, 2] absmax[rows, blk1]
    the last program of a row group sums ws over s (in order), adds LoRA and bias, stores

On the CPU interpreter the same code runs with the plain decoder and float32 dots, the relabelling
included, so the tests prove that the virtual orders of W and x agree.
Layers: kernels -> ``gemv.gemv_launch``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._decode import decode8_prmt, decode8_table
from ._lut import decode8_lds, lut_fill, lut_lane4
from ._tl import cast_out, decode_absmax, finish_split_k_rows

DECODERS = ("table", "lds", "lds_table")

BLOCK_ROWS = 64  # one warpgroup's MMA tile: 4 warps x 16 rows
SLICE = 128  # codes of one k slice: 4 threads x 32 codes (one 128-bit load each)


@triton.jit
def _phys_k(vk):
    """Physical code (within the slice) of virtual k ``vk = 32 j + 16 e2 + 8 e1 + 2 t + e0``."""
    return 32 * ((vk >> 1) & 3) + 8 * (vk >> 5) + 4 * ((vk >> 4) & 1) + 2 * ((vk >> 3) & 1) + (vk & 1)


@triton.jit
def _phys_row(vr):
    """Physical row (within the 64-row tile) of virtual row ``vr = 16 w + 8 i + g``."""
    return 32 * ((vr >> 3) & 1) + 8 * (vr >> 4) + (vr & 7)


@triton.jit
def _to_virtual(v):
    """``[64 pr, 16 words, 8 e]`` -> ``[64 vr, 128 vk]``: the relabelling of the module docstring."""
    v = tl.reshape(v, (2, 4, 8, 4, 4, 2, 2, 2))  # pr = (i, w, g); word = (t, j); e = (e2, e1, e0)
    v = tl.permute(v, (1, 0, 2, 4, 5, 6, 3, 7))  # vr = (w, i, g); vk = (j, e2, e1, t, e0)
    return tl.reshape(v, (64, 128))


@triton.jit
def _cat_cols(a, b):
    """``[R, n]`` and ``[R, n]`` -> ``[R, 2 n]`` (a's columns first), the columns in registers."""
    j = tl.permute(tl.join(a, b), (0, 2, 1))
    return tl.reshape(j, (j.shape[0], 2 * j.shape[2]))


@triton.jit
def _lane_pick(v):
    """``[64 vr, 16 c]`` in the accumulator's order -> ``[4 w, 8 g, 4 t]``: the one value of each
    thread that the absmax step needs, row ``vr = 16 w + 8 (t >> 1) + g`` at column ``2 t``
    (thread ``(g, t)`` of warp ``w`` holds rows ``16 w + g, + 8`` at columns ``2 t + e + 8 h``)."""
    v = tl.reshape(v, (64, 2, 4, 2))  # [vr, h, t, e]
    v, _e1 = tl.split(v)  # e = 0
    v = tl.permute(v, (0, 2, 1))  # [vr, t, h]
    v, _h1 = tl.split(v)  # h = 0
    v = tl.permute(tl.reshape(v, (4, 2, 8, 4)), (0, 2, 3, 1))  # [w, g, t, i]: vr = (w, i, g)
    v0, v1 = tl.split(v)
    t = tl.arange(0, 4)[None, None, :]
    return tl.where((t >> 1) == 0, v0, v1)


@triton.jit
def _ld_b32(ptrs):
    """``ld.global.b32`` in the layout the consumer wants: a ``tl.load`` is placed in a coalesced
    layout of its own, and its values then go through shared memory (three barriers a K step here)."""
    return tl.inline_asm_elementwise("ld.global.b32 $0, [$1];", "=r,l", [ptrs.to(tl.int64, bitcast=True)],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _ld_u8(ptrs):
    """``ld.global.u8``, zero-extended to int32; see ``_ld_b32``."""
    return tl.inline_asm_elementwise("ld.global.u8 $0, [$1];", "=r,l", [ptrs.to(tl.int64, bitcast=True)],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _absmax_lanes(absmax_ptr, nabs_ptr, ncode_ptr, offset, blk, mask, NESTED: tl.constexpr, ASM: tl.constexpr):
    """``kernels._tl.decode_absmax``: the float32 absmax of blocks ``blk``, 0 where not ``mask``.
    ASM: the loads as asm, so the values stay in ``blk``'s layout (this kernel's accumulator, the
    tcm kernel's words); they read
    block 0 where not ``mask`` (unpredicated: a predicated load costs a branch here)."""
    if not ASM:
        return tl.where(mask, decode_absmax(absmax_ptr, nabs_ptr, ncode_ptr, offset, blk, mask, NESTED), 0.0)
    blk = tl.where(mask, blk, 0)
    if NESTED:
        level = _ld_b32(ncode_ptr + _ld_u8(absmax_ptr + blk)).to(tl.float32, bitcast=True)
        a = level * _ld_b32(nabs_ptr + blk // 256).to(tl.float32, bitcast=True) + offset
    else:
        a = _ld_b32(absmax_ptr + blk).to(tl.float32, bitcast=True)
    return tl.where(mask, a, 0.0)


@triton.jit
def _store_f32(ptrs, v, mask):
    """``st.global.f32`` of every element where ``mask``, in ``v``'s own register layout (a
    ``tl.store`` would first move the accumulator-layout values through shared memory into a
    coalesced layout: two barriers and about 30 instructions a K step for a few floats)."""
    return tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $3, 0; @p st.global.f32 [$1], $2; mov.b32 $0, 0; }",
        "=r,l,f,r", [ptrs.to(tl.int64, bitcast=True), v, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _store_partials(ptrs, v, mask, ASM: tl.constexpr):
    """The split-K partials where ``mask``: ``_store_f32`` in place on a GPU, ``tl.store`` in the
    interpreter (which runs no asm)."""
    if ASM:
        _store_f32(ptrs, v, mask)
    else:
        tl.store(ptrs, v, mask=mask)


@triton.jit
def _decode_setup(lut_ptr, DECODE: tl.constexpr):
    """Once per program, for 'lds': fill the shared pair table (every thread, straight-line code),
    this lane's slot in it, and the byte planes of the permute-decoded words, read at a per-lane
    address (ptxas then keeps them in vector registers; from one address it keeps some in uniform
    registers and copies one in before every ``prmt``). 'prmt' (the tcm kernel): the planes only.
    Zeros for the other decoders."""
    lb = 0
    p0, p1, p2, p3, p4, p5, p6, p7 = 0, 0, 0, 0, 0, 0, 0, 0
    if DECODE == "lds" or DECODE == "prmt":
        if DECODE == "lds":
            base = lut_fill(lut_ptr)
            lane4 = lut_lane4(base)
            lb = base + lane4
        else:
            lane4 = lut_lane4(tl.program_id(0))
        pl = lut_ptr + 256 + (lane4 >> 2) * 8
        p0, p1, p2, p3 = tl.load(pl + 0), tl.load(pl + 1), tl.load(pl + 2), tl.load(pl + 3)
        p4, p5, p6, p7 = tl.load(pl + 4), tl.load(pl + 5), tl.load(pl + 6), tl.load(pl + 7)
    return lb, p0, p1, p2, p3, p4, p5, p6, p7


@triton.jit
def _split_words(wq):
    """``[64, 16]`` words -> words 0-3 of every thread's 4, each ``[64, 4]`` (row, thread group t)."""
    w4 = tl.reshape(wq, (64, 4, 2, 2))  # [pr, t, jh, jl]: word j = 2 jh + jl of thread group t
    ev, od = tl.split(w4)
    w0, w2 = tl.split(ev)
    w1, w3 = tl.split(od)
    return w0, w1, w2, w3


@triton.jit
def _join_words(d0, d1, d2, d3):
    """``_split_words``' inverse on the decoded ``[64, 4, 8]`` -> ``[64, 16, 8]``."""
    j = tl.join(tl.join(d0, d1), tl.join(d2, d3))  # [pr, t, e, jl, jh]
    return tl.reshape(tl.permute(j, (0, 1, 4, 3, 2)), (64, 16, 8))


@triton.jit
def _decode_words(wq, code_ptr, lb, p0, p1, p2, p3, p4, p5, p6, p7, DECODE: tl.constexpr,
                  LEVEL_DTYPE: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """``[64, 16]`` words -> ``[64, 16, 8]`` levels in LEVEL_DTYPE (element order within a word)."""
    if DECODE == "table":
        return cast_out(decode8_table(wq, code_ptr), LEVEL_DTYPE, MANUAL_BF16)
    w0, w1, w2, w3 = _split_words(wq)
    if DECODE == "lds":
        d0 = decode8_lds(w0, lb, LEVEL_DTYPE)
        d1 = decode8_lds(w1, lb, LEVEL_DTYPE)
        d2 = decode8_lds(w2, lb, LEVEL_DTYPE)
        d3 = decode8_prmt(w3, p0, p1, p2, p3, p4, p5, p6, p7, LEVEL_DTYPE)
    else:  # 'lds_table': the same split and re-join, plain decoder (CPU)
        d0 = cast_out(decode8_table(w0, code_ptr), LEVEL_DTYPE, MANUAL_BF16)
        d1 = cast_out(decode8_table(w1, code_ptr), LEVEL_DTYPE, MANUAL_BF16)
        d2 = cast_out(decode8_table(w2, code_ptr), LEVEL_DTYPE, MANUAL_BF16)
        d3 = cast_out(decode8_table(w3, code_ptr), LEVEL_DTYPE, MANUAL_BF16)
    return _join_words(d0, d1, d2, d3)


@triton.jit
def _gemv_tc_kernel(
    x_ptr, w_ptr, absmax_ptr, code_ptr, nabs_ptr, ncode_ptr, offset_ptr,  # x: [K]; W packed: [N, K/2] uint8
    lut_ptr,  # int32 [512]: the pair table, then 32 copies of the byte planes (kernels._lut.lut_source)
    s_ptr, b_ptr, bias_ptr,  # LoRA S: [1, RANK], B: [N, RANK]; bias: [N]
    out_ptr, ws_ptr, count_ptr,  # out: [N] (stride_on); ws: >= [SLICES, N] float32; count: [row groups] int32
    N, K, RANK, rows_per_cta,
    stride_xk, stride_wn, stride_on,
    stride_sj, stride_bn, stride_bj,
    scale, SLICES,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, DECODE: tl.constexpr,
    HAS_LORA: tl.constexpr, BLOCK_RANK: tl.constexpr, HAS_BIAS: tl.constexpr,
    LEVEL_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, OUT_DTYPE: tl.constexpr,
    MANUAL_BF16: tl.constexpr, GPU_STORE: tl.constexpr, LEVEL_MANUAL_BF16: tl.constexpr,
):
    BN: tl.constexpr = 64
    w_ptr = w_ptr.to(tl.pointer_type(tl.int32))  # the packed bytes, read as 32-bit words
    pid_s = tl.program_id(0)
    pid_g = tl.program_id(1)
    k_base = pid_s * 128
    # x in virtual k order, as the MMA's [128, 16] operand: x on half 0 of the slice in columns 0
    # and 4, on half 1 in columns 2 and 6, zeros elsewhere (column 2 t is thread t's, _lane_pick).
    # Built by joins, so that each thread holds whole rows of it (two 128-bit shared stores).
    pk = _phys_k(tl.arange(0, 128))
    xk = tl.load(x_ptr + (k_base + pk) * stride_xk, mask=(k_base + pk) < K, other=0.0).to(DOT_DTYPE)
    zero = tl.zeros_like(xk)
    x0 = tl.where((pk >> 6) == 0, xk, zero)
    x1 = tl.where((pk >> 6) == 1, xk, zero)
    x4 = _cat_cols(tl.join(x0, zero), tl.join(x1, zero))
    x8 = _cat_cols(x4, x4)
    xv = _cat_cols(x8, tl.zeros_like(x8))
    offset = 0.0
    if NESTED:
        offset = tl.load(offset_ptr)
    lb, p0, p1, p2, p3, p4, p5, p6, p7 = _decode_setup(lut_ptr, DECODE)
    nblk = K // BLOCKSIZE
    offs_w = tl.arange(0, 16)
    w_ok = (k_base + 64 * (offs_w // 8)) < K  # per half slice, so the loads stay 128-bit
    pr = tl.arange(0, BN)  # physical rows of a tile: the words' order
    row0 = pid_g * rows_per_cta
    row_end = tl.minimum(row0 + rows_per_cta, N)
    w_ptrs = w_ptr + (row0 + pr)[:, None].to(tl.int64) * stride_wn + k_base // 8 + offs_w[None, :]
    # the absmax step, one value a thread (``_lane_pick``): physical row 32 (t >> 1) + 8 w + g of
    # the tile, half t & 1 of the slice
    lw = tl.arange(0, 4)[:, None, None]
    lg = tl.arange(0, 8)[None, :, None]
    lt = tl.arange(0, 4)[None, None, :]
    lrow = 32 * (lt >> 1) + 8 * lw + lg  # [4, 8, 4]
    half_ok = k_base + 64 * (lt & 1) < K  # K % 128 == 64: the last slice has one half
    blk = (row0 + lrow) * nblk + (k_base + 64 * (lt & 1)) // BLOCKSIZE
    # the partial sums, [4 w, 8 g, 2 i] (row 32 i + 8 w + g): stored by the threads t = 2 i, 2 i + 1
    yrow = 32 * tl.arange(0, 2)[None, None, :] + 8 * tl.arange(0, 4)[:, None, None] + tl.arange(0, 8)[None, :, None]
    ws_ptrs = ws_ptr + pid_s * N + row0 + yrow
    # x's shared copy is written above: one barrier here, or Triton puts one before every MMA in the loop
    tl.debug_barrier()
    for r0 in range(row0, row_end, BN):
        wq = tl.load(w_ptrs, mask=((r0 + pr) < N)[:, None] & w_ok[None, :], other=0)
        lv = _decode_words(wq, code_ptr, lb, p0, p1, p2, p3, p4, p5, p6, p7, DECODE, LEVEL_DTYPE,
                           LEVEL_MANUAL_BF16)
        wv = _to_virtual(lv.to(DOT_DTYPE))
        if IEEE:
            d = tl.dot(wv, xv, input_precision="ieee")
        else:
            d = tl.dot(wv, xv)
        a = _absmax_lanes(absmax_ptr, nabs_ptr, ncode_ptr, offset, blk, ((r0 + lrow) < N) & half_ok, NESTED, GPU_STORE)
        # each thread scales its row's partial over half t & 1; the two halves' threads add
        y = tl.sum(tl.reshape(_lane_pick(d) * a, (4, 8, 2, 2)), axis=3)
        _store_partials(ws_ptrs, y, (r0 + yrow) < N, GPU_STORE)
        w_ptrs += BN * stride_wn
        blk += BN * nblk
        ws_ptrs += BN

    finish_split_k_rows(count_ptr, pid_g, ws_ptr, out_ptr, stride_on, row0, row_end, N, SLICES, s_ptr, stride_sj,
                        b_ptr, stride_bn, stride_bj, RANK, scale, bias_ptr, BN, HAS_LORA, BLOCK_RANK, HAS_BIAS,
                        OUT_DTYPE, MANUAL_BF16)


# ---- the GPU self-check of the decode ---------------------------------------------------------
# 'lds' is proven on CPU piece by piece (kernels._lut.emulate_decode, the byte-permute emulator, the
# 'lds_table' split and re-join in the interpreter); a GPU runs it once per device, table and dtype
# against the plain decoder before the GEMV may use it, and a mismatch means 'table' (with a warning).
_verified: dict = {}


@triton.jit
def _probe_kernel(w_ptr, code_ptr, lut_ptr, out_ptr, DECODE: tl.constexpr, LEVEL_DTYPE: tl.constexpr):
    """Decode ``[64, 16]`` words per program with DECODE, as ``[64, 16, 8]`` float32 levels."""
    base_i = tl.program_id(0) * 1024
    i = base_i + tl.arange(0, 64)[:, None] * 16 + tl.arange(0, 16)[None, :]
    wq = tl.load(w_ptr + i)
    lb, p0, p1, p2, p3, p4, p5, p6, p7 = _decode_setup(lut_ptr, DECODE)
    lv = _decode_words(wq, code_ptr, lb, p0, p1, p2, p3, p4, p5, p6, p7, DECODE, LEVEL_DTYPE, False)
    tl.store(out_ptr + i[:, :, None] * 8 + tl.arange(0, 8)[None, None, :], lv.to(tl.float32))


def probe(device, code, words, decoder: str, dtype):
    """Run ``_decode_words`` with ``decoder`` on int32 ``words`` (a multiple of 1024) on ``device``:
    ``[n * 8]`` float32 levels rounded to ``dtype`` (bf16/fp16)."""
    import torch

    from ._lut import lut_source
    from ._tl import tl_dtype

    out = torch.empty(words.numel() * 8, dtype=torch.float32, device=device)
    _probe_kernel[(words.numel() // 1024,)](words, code, lut_source(code, dtype), out, DECODE=decoder,
                                            LEVEL_DTYPE=tl_dtype(dtype), num_warps=4)
    return out


def verified(device, code, dtype) -> bool:
    """Whether the 'lds' decode gives exactly the plain decoder's levels on ``device`` for ``code``
    rounded to ``dtype`` (bf16/fp16); checked once per device, table and dtype; True off the GPU."""
    import warnings

    import torch

    from . import _decode

    if device.type != "cuda" or _decode.ASSUME_VERIFIED:
        return True
    key = (device, code.data_ptr(), code._version, dtype)
    if key not in _verified:
        words = _decode.probe_words(torch.Generator(device="cpu").manual_seed(0)).to(device)  # 4 programs
        try:
            ok = torch.equal(probe(device, code, words, "lds", dtype), probe(device, code, words, "table", dtype))
        except Exception as e:  # noqa: BLE001 - any failure means: do not use the shared-table decoder here
            warnings.warn(f"kernels: the shared-table decoder is unavailable on {device} ({type(e).__name__}: {e}); "
                          "M = 1 runs on the FMA GEMV", RuntimeWarning, stacklevel=3)
            ok = False
        else:
            if not ok:
                warnings.warn(f"kernels: the shared-table 4-bit decoder disagrees with the plain decoder on {device}; "
                              "M = 1 runs on the FMA GEMV. Please report this.", RuntimeWarning,
                              stacklevel=3)
        _verified[key] = ok
    return _verified[key]
