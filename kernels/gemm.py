"""The generic regime: a tiled GEMM with the weight dequantized inside the K loop, with the LoRA
term, the dropout mask of dx and the bias fused into the epilogue. It reads W in either
orientation and any shape (forward for mid-size M, dx below the dequantize-once threshold, odd K,
blocksizes below 64).

Math (``kernels._launch`` explains Wop and the two orientations):

    for each output tile (m-block, p-block), grouped along M for L2 reuse of Wop:
        acc = 0                                             # float32 [BLOCK_M, BLOCK_P]
        for r0 in range(0, R, BLOCK_R):
            a_tile = a[m-block, r0:r0+BLOCK_R]
            w_tile = code[q[idx]] * absmax[idx // blocksize]   # idx = r * stride_wr + p * stride_wp
            acc   += a_tile @ w_tile                        # tl.dot, float32 accumulation
        acc += scale * S[m-block] @ L[:, p-block] (⊙ keep / (1-p))  + bias[p-block]
        out[m-block, p-block] = acc (cast once)

Forward with K even reads one packed byte per two weights (PAIRED; see ``kernels.gemv``).
Layers: ``_qgemm_kernel`` -> ``gemm_launch`` (called by the ops in ``kernels.matmul``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import MatmulProblem, cdiv, launch_fitting
from ._tl import cast_out, k_step, load_offset, lora_bias_epilogue

__all__ = ["gemm_launch", "gemm_config"]


@triton.jit
def _qgemm_kernel(
    a_ptr, w_ptr, absmax_ptr, code_ptr, nabs_ptr, ncode_ptr, offset_ptr,  # a: [M, R]; W packed
    s_ptr, l_ptr, bias_ptr, seed_ptr,  # epilogue operands
    out_ptr,  # [M, P]
    M, P, R, RANK,
    stride_am, stride_ar, stride_wr, stride_wp,
    stride_sm, stride_sj, stride_lj, stride_lp,
    scale, threshold, keep_scale,
    stride_om, stride_op,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
    PAIRED: tl.constexpr, ROW_BLOCKS: tl.constexpr,
    HAS_LORA: tl.constexpr, BLOCK_RANK: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, IEEE: tl.constexpr, OUT_DTYPE: tl.constexpr, MANUAL_BF16: tl.constexpr,
):
    # grouped ordering: GROUP_M consecutive m-blocks walk the p-blocks together
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_p = tl.cdiv(P, BLOCK_P)
    group = GROUP_M * num_p
    first_m = (pid // group) * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % group_size
    pid_p = (pid % group) // group_size

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_r = tl.arange(0, BLOCK_R).to(tl.int64)
    offset = load_offset(offset_ptr, NESTED)
    acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        acc = k_step(acc, a_ptr, w_ptr, absmax_ptr, code_ptr, nabs_ptr, ncode_ptr, offset, r0, offs_m, offs_p, offs_r,
                     M, P, R, stride_am, stride_ar, stride_wr, stride_wp,
                     BLOCK_R, BLOCKSIZE, NESTED, PAIRED, ROW_BLOCKS, True, DOT_DTYPE, IEEE)

    acc = lora_bias_epilogue(acc, offs_m, offs_p, M, P, s_ptr, stride_sm, stride_sj, l_ptr, stride_lj, stride_lp,
                             RANK, scale, bias_ptr, seed_ptr, threshold, keep_scale,
                             HAS_LORA, BLOCK_RANK, HAS_DROPOUT, HAS_BIAS, True, DOT_DTYPE, IEEE)
    out = cast_out(acc, OUT_DTYPE, MANUAL_BF16)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_p[None, :] * stride_op, out,
             mask=(offs_m[:, None] < M) & (offs_p[None, :] < P))


def gemm_config(M: int, P: int, R: int, device: torch.device) -> dict:
    """Tile sizes. GPU values are untuned starting points (the GPU tuning issue sets them);
    interpreter tiles are small so that CI shapes cross every tile boundary."""
    if device.type == "cpu":
        return dict(BLOCK_M=32, BLOCK_P=32, BLOCK_R=32, GROUP_M=4)
    if M >= 128:
        return dict(BLOCK_M=128, BLOCK_P=128, BLOCK_R=64, GROUP_M=8, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_P=128, BLOCK_R=64, GROUP_M=8, num_warps=4, num_stages=4)


def gemm_launch(prob: MatmulProblem, out_dtype: torch.dtype, config: dict | None = None) -> torch.Tensor:
    """Launch ``_qgemm_kernel`` for ``prob``: returns ``out: [M, P]`` of ``out_dtype``."""
    M, P = prob.M, prob.P
    out = torch.empty((M, P), dtype=out_dtype, device=prob.a.device)
    if M == 0 or P == 0:
        return out
    cfg = dict(config or gemm_config(M, P, prob.R, prob.a.device))
    flags = prob.pairing(cfg["BLOCK_R"], True)
    if "num_stages" in cfg and not flags["ROW_BLOCKS"]:
        # Per-element absmax decode (dx, or K not a multiple of the blocksize): every pipeline
        # stage buffers gathered byte / absmax-code / scale tiles. Compiled with triton 3.6 for
        # sm_90, 3-4 stages need up to 376 KB of shared memory, over the 227 KB an H100/H200
        # block may use; 2 stages need <= 164 KB (ROW_BLOCKS: <= 200 KB as configured).
        cfg["num_stages"] = min(cfg["num_stages"], 2)
    grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(P, cfg["BLOCK_P"]),)
    launch_fitting(
        _qgemm_kernel, grid,
        [*prob.pointer_args(), out, *prob.scalar_args(), out.stride(0), out.stride(1)],
        dict(**cfg, **prob.meta(out_dtype, dot_operands_fp32=False), **flags,
             enable_fp_fusion=False),  # bit-exact absmax decode (see kernels._tl)
    )
    return out
