"""Small-M regime (decode, M <= ``matmul.GEMV_MAX_M``): a split-K GEMV that streams the packed
weight once, dequantizes in registers and accumulates in float32.

Math (``kernels._launch`` explains Wop and the two orientations):

    grid = (p-blocks, SPLIT, m-blocks); program (ip, s, im) owns r in [s*R_SPLIT, (s+1)*R_SPLIT)
        acc = 0                                             # float32 [BLOCK_M, BLOCK_P]
        for r0 in its range, step BLOCK_R:
            w_tile = code[q[idx]] * absmax[idx // blocksize]   # dequantized in registers
            acc   += a_tile @ w_tile
        if s == 0: acc += scale * S @ L (⊙ keep / (1-p)) + bias      (the fused epilogue)
        SPLIT == 1: out = acc (cast once);  else partial[s] = acc, out = sum_s partial[s]

Forward with K even (PAIRED, ``_tl.dequant_pairs``): each packed byte is loaded once and
gives the even-k (high nibble) and odd-k (low nibble) tiles, multiplied with the even and odd
columns of the activation tile; absmax is decoded once per row chunk when K is a multiple of
the blocksize (ROW_BLOCKS). Otherwise (dx, odd K) nibbles are gathered element by element.
For BLOCK_M < 16 the product is a broadcast multiply + float32 row sum (no tensor-core
minimum tile); for 16 <= BLOCK_M it is ``tl.dot``. The split-K partials are reduced by one
deterministic ``sum`` over the (tiny) [SPLIT, M, P] float32 buffer, never by atomics.

Layers: ``_qgemv_kernel`` -> ``gemv_launch`` (called by the ops in ``kernels.matmul``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import MatmulProblem, launch_fitting
from ._tl import cast_out, k_step, load_offset, lora_bias_epilogue

__all__ = ["gemv_launch", "gemv_config"]


@triton.jit
def _qgemv_kernel(
    a_ptr, w_ptr, absmax_ptr, code_ptr, nabs_ptr, ncode_ptr, offset_ptr,
    s_ptr, l_ptr, bias_ptr, seed_ptr,
    out_ptr,  # [M, P] (SPLIT == 1) or float32 partials [SPLIT, M, P]
    M, P, R, RANK,
    stride_am, stride_ar, stride_wr, stride_wp,
    stride_sm, stride_sj, stride_lj, stride_lp,
    scale, threshold, keep_scale,
    stride_os, stride_om, stride_op,
    R_SPLIT,  # reduction length per split, a multiple of BLOCK_R
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT: tl.constexpr,
    USE_DOT: tl.constexpr,
    QUANTIZED: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    PAIRED: tl.constexpr, ROW_BLOCKS: tl.constexpr,
    HAS_LORA: tl.constexpr, BLOCK_RANK: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, OUT_DTYPE: tl.constexpr, MANUAL_BF16: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
    offset = load_offset(offset_ptr, NESTED)
    r_begin = pid_s.to(tl.int64) * R_SPLIT
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for r0 in range(0, R_SPLIT, BLOCK_R):
        acc = k_step(acc, a_ptr, w_ptr, absmax_ptr, code_ptr, nabs_ptr, ncode_ptr, offset, r_begin + r0, offs_m,
                     offs_p, offs_r, M, P, R, stride_am, stride_ar, stride_wr, stride_wp,
                     BLOCK_R, QUANTIZED, BLOCKSIZE, NESTED, PAIRED, ROW_BLOCKS, USE_DOT, DOT_DTYPE, IEEE)

    if pid_s == 0:
        acc = lora_bias_epilogue(acc, offs_m, offs_p, M, P, s_ptr, stride_sm, stride_sj, l_ptr, stride_lj,
                                 stride_lp, RANK, scale, bias_ptr, seed_ptr, threshold, keep_scale,
                                 HAS_LORA, BLOCK_RANK, HAS_DROPOUT, HAS_BIAS, USE_DOT, DOT_DTYPE, IEEE)
    out_ptrs = out_ptr + pid_s.to(tl.int64) * stride_os + offs_m[:, None] * stride_om + offs_p[None, :] * stride_op
    mask = (offs_m[:, None] < M) & (offs_p[None, :] < P)
    if SPLIT == 1:
        tl.store(out_ptrs, cast_out(acc, OUT_DTYPE, MANUAL_BF16), mask=mask)
    else:
        tl.store(out_ptrs, acc, mask=mask)


# Target number of programs for a GPU launch: a few waves over H200's 132 SMs.
_GPU_TARGET_PROGRAMS = 4 * 132


def gemv_config(M: int, P: int, R: int, device: torch.device) -> dict:
    """Tiles and split. BLOCK_M * BLOCK_R * BLOCK_P stays <= 8192 in broadcast mode (registers).
    GPU values are untuned starting points (the GPU tuning issue measures them)."""
    block_m = min(triton.next_power_of_2(max(M, 1)), 64)
    use_dot = block_m >= 16
    if device.type == "cpu":  # interpreter: small tiles so CI shapes cross every boundary
        block_p, block_r = 32, 32
        split = min(2, triton.cdiv(max(R, 1), block_r))
        return dict(BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_R=block_r, SPLIT=split, USE_DOT=use_dot)
    if use_dot:
        block_p, block_r = 64, 64
    else:
        block_p, block_r = 64, max(16, 8192 // (64 * block_m))
    tiles = triton.cdiv(P, block_p) * triton.cdiv(M, block_m)
    split = max(1, min(triton.cdiv(_GPU_TARGET_PROGRAMS, tiles), triton.cdiv(R, block_r), 16))
    return dict(BLOCK_M=block_m, BLOCK_P=block_p, BLOCK_R=block_r, SPLIT=split, USE_DOT=use_dot, num_warps=4)


def gemv_launch(prob: MatmulProblem, out_dtype: torch.dtype, config: dict | None = None) -> torch.Tensor:
    """Launch ``_qgemv_kernel`` for ``prob``: returns ``out: [M, P]`` of ``out_dtype``."""
    M, P, R = prob.M, prob.P, prob.R
    dev = prob.a.device
    if M == 0 or P == 0:
        return torch.empty((M, P), dtype=out_dtype, device=dev)
    cfg = dict(config or gemv_config(M, P, R, dev))
    split, block_r = cfg["SPLIT"], cfg["BLOCK_R"]
    r_split = triton.cdiv(triton.cdiv(max(R, 1), split), block_r) * block_r
    split = triton.cdiv(max(R, 1), r_split)  # drop empty splits
    cfg["SPLIT"] = split
    if split == 1:
        out = torch.empty((M, P), dtype=out_dtype, device=dev)
        strides = (0, out.stride(0), out.stride(1))
    else:
        out = torch.empty((split, M, P), dtype=torch.float32, device=dev)
        strides = out.stride()
    grid = (triton.cdiv(P, cfg["BLOCK_P"]), split, triton.cdiv(M, cfg["BLOCK_M"]))
    launch_fitting(
        _qgemv_kernel, grid,
        [*prob.pointer_args(), out, *prob.scalar_args(), *strides, r_split],
        dict(**cfg, **prob.meta(out_dtype, dot_operands_fp32=False), **prob.pairing(block_r, cfg["USE_DOT"]),
             enable_fp_fusion=False),  # bit-exact absmax decode (see kernels._tl)
    )
    if split == 1:
        return out
    return out.sum(dim=0).to(out_dtype)
