"""Small ``@triton.jit`` helpers shared by the kernels (inlined into each kernel).

- ``decode_absmax`` / ``dequant_elements``: the NF4/FP4 dequantization of ``nf4.dequantize``
  for arbitrary int64 flat element indices (so a kernel may read W in either orientation);
- ``keep_mask``: the dropout hash of ``kernels.reference.dropout_bits``;
- ``cast_out``: float32 -> output dtype with round-to-nearest-even, done with integer ops for
  bfloat16 under the interpreter, whose own float32 -> bfloat16 conversion does not round to
  nearest even (checked with triton 3.9: it rounds half up and drops the mantissa carry).

Bit-exactness note (FMA contraction): the reference rounds ``nested_code[q] * absmax2`` and
then ``+ offset`` separately, and ``code[q] * absmax`` once. The launchers pass
``enable_fp_fusion=False`` so the compiler never contracts these into an FMA on the GPU; the
interpreter (numpy) never contracts.
"""

from __future__ import annotations

import triton
import triton.language as tl

NESTED_BLOCKSIZE = 256  # double quantization block size (QLoRA Sec. 3), fixed by the format


@triton.jit
def decode_absmax(absmax_ptr, nabs_ptr, ncode_ptr, offset, blk, mask, NESTED: tl.constexpr):
    """absmax[blk] as float32; with double quant ``ncode[qa[blk]] * nabs[blk // 256] + offset``."""
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
        level = tl.load(ncode_ptr + q)
        scale2 = tl.load(nabs_ptr + blk // 256, mask=mask, other=0.0)
        prod = level * scale2  # rounded on its own: no FMA (enable_fp_fusion=False)
        return prod + offset
    else:
        return tl.load(absmax_ptr + blk, mask=mask, other=0.0)


@triton.jit
def dequant_elements(w_ptr, absmax_ptr, code_ptr, nabs_ptr, ncode_ptr, offset, idx, mask,
                     BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr):
    """float32 ``code[q[idx]] * absmax[idx // BLOCKSIZE]`` for int64 flat indices ``idx``.

    q[idx] is the high nibble of byte ``idx >> 1`` for even idx, the low nibble for odd idx.
    Masked-off elements read byte 0 / block 0 and must be masked again by the caller.
    """
    byte = tl.load(w_ptr + (idx >> 1), mask=mask, other=0)
    nib = tl.where((idx & 1) == 0, byte >> 4, byte & 15).to(tl.int32)
    level = tl.load(code_ptr + nib)
    am = decode_absmax(absmax_ptr, nabs_ptr, ncode_ptr, offset, idx // BLOCKSIZE, mask, NESTED)
    return level * am


@triton.jit
def dequant_pairs(w_ptr, absmax_ptr, code_ptr, nabs_ptr, ncode_ptr, offset, r0, offs_p, R, P, stride_wp,
                  HALF_R: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, ROW_BLOCKS: tl.constexpr):
    """Forward orientation (Wop = Wᵀ, rows of W contiguous along r, K = R even, r0 even):
    the tile ``Wop[r0 : r0 + 2 HALF_R, p-block]`` as two float32 tiles ``[HALF_R, BP]``,
    ``hi`` for even r (high nibbles) and ``lo`` for odd r (low nibbles): one byte load and
    one absmax decode per pair of weights.

    ROW_BLOCKS: each row's chunk lies inside one absmax block (K % BLOCKSIZE == 0 and
    BLOCKSIZE % (2 HALF_R) == 0), so absmax is decoded once per row, not per byte.
    """
    j = tl.arange(0, HALF_R).to(tl.int64)
    r_even = r0 + 2 * j
    mask = (r_even[:, None] < R) & (offs_p[None, :] < P)
    byte = tl.load(w_ptr + offs_p[None, :] * (stride_wp // 2) + (r0 // 2 + j)[:, None], mask=mask, other=0)
    if ROW_BLOCKS:
        blk = (offs_p * stride_wp + r0) // BLOCKSIZE
        am = decode_absmax(absmax_ptr, nabs_ptr, ncode_ptr, offset, blk, offs_p < P, NESTED)[None, :]
    else:
        blk = (offs_p[None, :] * stride_wp + r_even[:, None]) // BLOCKSIZE
        am = decode_absmax(absmax_ptr, nabs_ptr, ncode_ptr, offset, blk, mask, NESTED)
    hi = tl.load(code_ptr + (byte >> 4).to(tl.int32)) * am
    lo = tl.load(code_ptr + (byte & 15).to(tl.int32)) * am
    return hi, lo


@triton.jit
def load_a_pairs(a_ptr, offs_m, r0, M, R, stride_am, stride_ar, BLOCK_R: tl.constexpr):
    """The activation tile ``a[m-block, r0 : r0 + BLOCK_R]`` split into even and odd columns."""
    r = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
    a = tl.load(a_ptr + offs_m[:, None] * stride_am + r[None, :] * stride_ar,
                mask=(offs_m[:, None] < M) & (r[None, :] < R), other=0.0)
    return tl.split(tl.reshape(a, (a.shape[0], BLOCK_R // 2, 2)))


@triton.jit
def k_step(acc, a_ptr, w_ptr, absmax_ptr, code_ptr, nabs_ptr, ncode_ptr, offset, r0, offs_m, offs_p, offs_r,
           M, P, R, stride_am, stride_ar, stride_wr, stride_wp,
           BLOCK_R: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
           PAIRED: tl.constexpr, ROW_BLOCKS: tl.constexpr,
           USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr):
    """One reduction step of the generic GEMM: ``acc += a[:, r0:r0+BLOCK_R] @ W``.

    PAIRED (forward orientation, K even): each packed byte is loaded once and gives the even-r
    (high nibble) and odd-r (low nibble) weight tiles. Otherwise (any orientation) the nibbles
    are gathered element by element.
    """
    if PAIRED:
        a_even, a_odd = load_a_pairs(a_ptr, offs_m, r0, M, R, stride_am, stride_ar, BLOCK_R)
        w_hi, w_lo = dequant_pairs(w_ptr, absmax_ptr, code_ptr, nabs_ptr, ncode_ptr, offset, r0, offs_p, R, P,
                                   stride_wp, BLOCK_R // 2, BLOCKSIZE, NESTED, ROW_BLOCKS)
        acc = mma(a_even, w_hi, acc, USE_DOT, DOT_DTYPE, IEEE)
        acc = mma(a_odd, w_lo, acc, USE_DOT, DOT_DTYPE, IEEE)
    else:
        r = r0 + offs_r
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + r[None, :] * stride_ar,
                    mask=(offs_m[:, None] < M) & (r[None, :] < R), other=0.0)
        w_mask = (r[:, None] < R) & (offs_p[None, :] < P)
        w_idx = r[:, None] * stride_wr + offs_p[None, :] * stride_wp
        w = dequant_elements(w_ptr, absmax_ptr, code_ptr, nabs_ptr, ncode_ptr, offset, w_idx, w_mask,
                             BLOCKSIZE, NESTED)
        acc = mma(a, w, acc, USE_DOT, DOT_DTYPE, IEEE)
    return acc


@triton.jit
def load_offset(offset_ptr, NESTED: tl.constexpr):
    """The double-quantization offset (0.0 without double quant)."""
    if NESTED:
        return tl.load(offset_ptr)
    else:
        return 0.0


@triton.jit
def fmix32(h):
    """murmur3's 32-bit finaliser on uint32 values (wraps mod 2^32)."""
    h ^= h >> 16
    h = h * 0x85EBCA6B
    h ^= h >> 13
    h = h * 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def keep_mask(seed, idx, threshold):
    """Dropout keep mask for int64 flat indices: ``reference.dropout_bits(...) >= threshold``."""
    hi = (idx >> 32).to(tl.uint32)
    lo = idx.to(tl.uint32)
    key = fmix32(seed.to(tl.uint32) + hi * 0x9E3779B1)
    h = fmix32(lo ^ key)
    return h.to(tl.int64) >= threshold


@triton.jit
def cast_out(v, dtype: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """Round float32 ``v`` to ``dtype`` (nearest even). MANUAL_BF16: integer rounding for bf16."""
    if MANUAL_BF16:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = tl.where(v != v, bits | 0x400000, rounded)  # NaN stays a (quiet) NaN
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(dtype)


def manual_bf16(dtype, interpret: bool) -> bool:
    """Whether ``cast_out`` must round to bfloat16 by hand (only under the interpreter)."""
    import torch

    return interpret and dtype == torch.bfloat16


_TL_DTYPES: dict = {}


def tl_dtype(dtype):
    """The Triton element type of a torch floating dtype."""
    if not _TL_DTYPES:
        import torch

        _TL_DTYPES.update({torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
                           torch.float64: tl.float64})
    return _TL_DTYPES[dtype]


@triton.jit
def mma(a, b, acc, USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr):
    """``acc + a @ b`` for ``a: [BM, BR]``, ``b: [BR, BP]`` (float32 accumulator).

    USE_DOT: ``tl.dot`` on DOT_DTYPE operands (IEEE: exact float32 products, no TF32);
    otherwise a broadcast multiply and a float32 sum over BR (GEMV tiles with BM < 16).
    """
    if USE_DOT:
        if IEEE:
            return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision="ieee")
        else:
            return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc)
    else:
        prod = a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :]
        return acc + tl.sum(prod, axis=1)


@triton.jit
def lora_bias_epilogue(
    acc, offs_m, offs_p, M, P,
    s_ptr, stride_sm, stride_sj,  # S (or G): [M, RANK]
    l_ptr, stride_lj, stride_lp,  # L(j, p): B[p, j] forward, A[j, p] for dx
    RANK, scale,
    bias_ptr, seed_ptr, threshold, keep_scale,
    HAS_LORA: tl.constexpr, BLOCK_RANK: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr,
):
    """The fused epilogue, in float32, on an output tile ``acc: [BM, BP]``:

        lora = scale * S_tile @ L_tile                       (rank-sized, BLOCK_RANK >= RANK)
        lora = keep(m * P + p) ? lora * keep_scale : 0        (HAS_DROPOUT: dx of dropout)
        acc += lora;  acc += bias[p]
    """
    if HAS_LORA:
        j = tl.arange(0, BLOCK_RANK)
        s = tl.load(s_ptr + offs_m[:, None] * stride_sm + j[None, :] * stride_sj,
                    mask=(offs_m[:, None] < M) & (j[None, :] < RANK), other=0.0)
        lt = tl.load(l_ptr + j[:, None] * stride_lj + offs_p[None, :] * stride_lp,
                     mask=(j[:, None] < RANK) & (offs_p[None, :] < P), other=0.0)
        lora = mma(s, lt, tl.zeros(acc.shape, dtype=tl.float32), USE_DOT, DOT_DTYPE, IEEE) * scale
        if HAS_DROPOUT:
            keep = keep_mask(tl.load(seed_ptr), offs_m[:, None] * P + offs_p[None, :], threshold)
            lora = tl.where(keep, lora * keep_scale, 0.0)
        acc += lora
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_p, mask=offs_p < P, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def row_epilogue(y, rows, N, s_ptr, stride_sj, b_ptr, stride_bn, stride_bj, RANK, scale, bias_ptr,
                 HAS_LORA: tl.constexpr, BLOCK_RANK: tl.constexpr, HAS_BIAS: tl.constexpr):
    """M = 1: ``y[n] + scale * sum_j S[0, j] B[n, j] + bias[n]`` in float32 for one row block."""
    if HAS_LORA:
        j = tl.arange(0, BLOCK_RANK)
        s = tl.load(s_ptr + j * stride_sj, mask=j < RANK, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + rows[:, None] * stride_bn + j[None, :] * stride_bj,
                    mask=(rows[:, None] < N) & (j[None, :] < RANK), other=0.0).to(tl.float32)
        y += tl.sum(b * s[None, :], axis=1) * scale
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=rows < N, other=0.0).to(tl.float32)
    return y


@triton.jit
def finish_split_k_rows(count_ptr, pid_g, ws_ptr, out_ptr, stride_on, row0, row_end, N, SLICES,
                        s_ptr, stride_sj, b_ptr, stride_bn, stride_bj, RANK, scale, bias_ptr,
                        BLOCK_N: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK_RANK: tl.constexpr,
                        HAS_BIAS: tl.constexpr, OUT_DTYPE: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """The M = 1 GEMVs' split-K without a second launch: every program of row group ``pid_g`` has
    stored its float32 partials ``ws[s, rows]``; the one that arrives last (a per-group counter)
    sums them in slice order (deterministic), adds ``row_epilogue``, casts once, stores the output
    and resets the counter to 0 for the next call."""
    offs_r = tl.arange(0, BLOCK_N)
    tl.debug_barrier()  # every thread's partial stores precede the release below
    arrived = tl.atomic_add(count_ptr + pid_g, 1, sem="acq_rel", scope="gpu")
    if arrived == SLICES - 1:
        for r0 in range(row0, row_end, BLOCK_N):
            rr = r0 + offs_r
            row_ok = rr < N
            y = tl.zeros((BLOCK_N,), tl.float32)
            for s in range(0, SLICES):
                y += tl.load(ws_ptr + s * N + rr, mask=row_ok, other=0.0, cache_modifier=".cg")
            y = row_epilogue(y, rr, N, s_ptr, stride_sj, b_ptr, stride_bn, stride_bj, RANK, scale, bias_ptr,
                             HAS_LORA, BLOCK_RANK, HAS_BIAS)
            tl.store(out_ptr + rr * stride_on, cast_out(y, OUT_DTYPE, MANUAL_BF16), mask=row_ok)
        tl.atomic_xchg(count_ptr + pid_g, 0, sem="relaxed", scope="gpu")  # ready for the next call
