"""The two frozen-weight GEMM ops of a QLoRA linear, as torch.library ops, and the regime
choice between the Triton paths.

    qlora::nf4_linear     y  = x Wᵀ + scale * S Bᵀ + bias                x: [M, K] -> [M, N]
    qlora::nf4_linear_dx  dx = dy W + scale * (G A) ⊙ keep / (1 - p)      dy: [M, N] -> [M, K]

W: [N, K] stays packed (4-bit codes + absmax state); S = x_hat Aᵀ: [M, r], G = dy B: [M, r].
Neither op keeps a dequantized W beyond its own return.

Regimes, by M = number of token rows (``choose_regime``):
    'gemv'          forward, M <= GEMV_MAX_M, K and blocksize multiples of 64: a streaming GEMV that
                    reads each packed byte once with 128-bit loads and reduces split-K inside the
                    launch (``kernels.gemv``; M = 1 float32 FMA, 2..16 tensor cores);
    'gemm'          forward, 16 < M < DEQUANT_ONCE_MIN_M, when its tile grid fills the GPU (N large):
                    a tiled Triton GEMM that dequantizes inside its K loop (``kernels.gemm``);
    'dequant_gemm'  everything else, dx at every M included: dequantize once into a buffer of the
                    activation dtype (``kernels.dequant``, one launch at HBM speed), then ``torch.mm``
                    / ``addmm`` (cuBLAS on a GPU) with the LoRA term added by ``addmm`` into the same
                    output. The buffer is freed when the op returns; backward dequantizes again
                    (never a dequantized W kept across forward and backward).
The rules come from ``tools/perf_model.py`` (predicted, sm_90a: the in-loop GEMM beats
dequantize-once + cuBLAS only while x is small and its grid of 128-wide tiles covers the SMs) until
the GPU suite measures them. ``dispatch.force_regime`` overrides the choice (tests run every
regime); forcing 'gemv' on a problem it cannot take (dx, odd K) runs 'gemm'.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import reference
from ._launch import MatmulProblem
from .contract import check_nf4_linear, check_nf4_linear_dx
from .dequant import dequantize_launch
from .dispatch import forced_regime, use_triton
from .dropout import dropout_op
from .gemm import gemm_launch
from .gemv import GEMV_MAX_M, gemv_kind, gemv_launch

__all__ = ["GEMV_MAX_M", "DEQUANT_ONCE_MIN_M", "choose_regime", "nf4_linear", "nf4_linear_op", "nf4_linear_dx_op"]

# Training-size batches go to dequantize-once + cuBLAS; below, the in-loop GEMM where its grid of
# tiles fills about 3/4 of the H200's 132 SMs (tools/perf_model.py predicts both crossovers).
DEQUANT_ONCE_MIN_M = 1024
GEMM_MIN_TILES = 99


def choose_regime(M: int, *, forward: bool = True, K: int | None = None, N: int | None = None,
                  blocksize: int = 64, dtype: torch.dtype = torch.bfloat16) -> str:
    """'gemv', 'gemm' or 'dequant_gemm' for M rows (module docstring; ``dispatch.force_regime`` wins,
    except that 'gemv' is only taken by forward problems ``gemv.gemv_kind`` accepts). Without K or
    N, assumes an aligned K and a large N (the common case, e.g. for benchmark tables)."""
    streaming = forward and gemv_kind(M, K if K is not None else 64, blocksize, dtype) is not None
    forced = forced_regime()
    if forced != "auto":
        return "gemm" if forced == "gemv" and not streaming else forced
    if streaming:
        return "gemv"
    if forward and M < DEQUANT_ONCE_MIN_M:
        tiles = -(-(N if N is not None else 1 << 16) // 128) * -(-M // (128 if M >= 128 else 64))
        if tiles >= GEMM_MIN_TILES:
            return "gemm"
    return "dequant_gemm"


def _dense(state, n, k, blocksize, dtype):
    """The dequantized ``W: [n, k]`` in ``dtype`` (one Triton launch)."""
    return dequantize_launch(*state, n * k, blocksize, dtype).view(n, k)


def nf4_linear(
    x: torch.Tensor,
    data: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    n: int,
    k: int,
    blocksize: int,
    lora_s: Optional[torch.Tensor],
    lora_B: Optional[torch.Tensor],
    scale: float,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """``y = x Wᵀ + scale * S Bᵀ + bias`` for ``x: [M, K]`` -> ``[M, N]`` in x.dtype (the body of
    ``qlora::nf4_linear``; eager inference calls it directly: a torch.library dispatch costs more
    than the whole decode-size launch)."""
    state = (data, absmax, code, nested_absmax, nested_code, offset)
    if not use_triton(x):
        return reference.linear_forward(x, reference.dense_weight(state, n, k, blocksize, x.dtype), lora_s, lora_B, scale,
                                        bias)
    M = x.shape[0]
    regime = choose_regime(M, forward=True, K=k, N=n, blocksize=blocksize, dtype=x.dtype)
    if M == 0 or n == 0:
        return x.new_empty((M, n))
    if regime == "gemv":
        return gemv_launch(x, state, n, k, blocksize, lora_s, lora_B, scale, bias, x.dtype)
    if regime == "dequant_gemm":
        w = _dense(state, n, k, blocksize, x.dtype)
        y = torch.mm(x, w.t()) if bias is None else torch.addmm(bias.to(x.dtype), x, w.t())
        del w
        if lora_s is not None:
            y.addmm_(lora_s, lora_B.t(), alpha=scale)
        return y
    prob = MatmulProblem(
        a=x, P=n, R=k, stride_wr=1, stride_wp=k, state=state, blocksize=blocksize,
        lora_s=lora_s, lora_l=lora_B,
        stride_lj=lora_B.stride(1) if lora_B is not None else 0,
        stride_lp=lora_B.stride(0) if lora_B is not None else 0,
        scale=scale, bias=bias.contiguous() if bias is not None else None,  # the kernel reads bias[p]
    )
    return gemm_launch(prob, x.dtype)


@torch.library.custom_op("qlora::nf4_linear", mutates_args=())
def nf4_linear_op(
    x: torch.Tensor,
    data: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    n: int,
    k: int,
    blocksize: int,
    lora_s: Optional[torch.Tensor],
    lora_B: Optional[torch.Tensor],
    scale: float,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """``y = x Wᵀ + scale * S Bᵀ + bias`` for ``x: [M, K]`` -> ``[M, N]`` in x.dtype."""
    check_nf4_linear(x, data, absmax, code, nested_absmax, nested_code, offset, n, k, blocksize, lora_s, lora_B,
                     scale, bias)
    return nf4_linear(x, data, absmax, code, nested_absmax, nested_code, offset, n, k, blocksize, lora_s, lora_B,
                      scale, bias)


@nf4_linear_op.register_fake
def _(x, data, absmax, code, nested_absmax, nested_code, offset, n, k, blocksize, lora_s, lora_B, scale, bias):
    return x.new_empty((x.shape[0], n))


@torch.library.custom_op("qlora::nf4_linear_dx", mutates_args=())
def nf4_linear_dx_op(
    dy: torch.Tensor,
    data: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    n: int,
    k: int,
    blocksize: int,
    lora_g: Optional[torch.Tensor],
    lora_A: Optional[torch.Tensor],
    scale: float,
    seed: Optional[torch.Tensor],
    p: float,
) -> torch.Tensor:
    """``dx = dy W + scale * (G A) ⊙ keep / (1 - p)`` for ``dy: [M, N]`` -> ``[M, K]`` in dy.dtype."""
    check_nf4_linear_dx(dy, data, absmax, code, nested_absmax, nested_code, offset, n, k, blocksize, lora_g, lora_A,
                        scale, seed, p)
    state = (data, absmax, code, nested_absmax, nested_code, offset)
    dropout = seed is not None and p > 0 and lora_g is not None
    if not use_triton(dy):
        return reference.linear_dx_seeded(dy, reference.dense_weight(state, n, k, blocksize, dy.dtype), lora_g, lora_A,
                                          scale, seed, p)
    M = dy.shape[0]
    if M == 0 or k == 0:
        return dy.new_empty((M, k))
    if choose_regime(M, forward=False, N=n) == "dequant_gemm":
        w = _dense(state, n, k, blocksize, dy.dtype)
        dx = torch.mm(dy, w)
        del w
        if lora_g is not None:
            if dropout:  # the same keep mask as the fused epilogue: index m * K + k of [M, K]
                dx += dropout_op(torch.mm(lora_g, lora_A) * scale, seed, p)
            else:
                dx.addmm_(lora_g, lora_A, alpha=scale)
        return dx
    prob = MatmulProblem(
        a=dy, P=k, R=n, stride_wr=k, stride_wp=1, state=state, blocksize=blocksize,
        lora_s=lora_g, lora_l=lora_A,
        stride_lj=lora_A.stride(0) if lora_A is not None else 0,
        stride_lp=lora_A.stride(1) if lora_A is not None else 0,
        scale=scale, seed=seed if dropout else None, p=p if dropout else 0.0,
    )
    return gemm_launch(prob, dy.dtype)


@nf4_linear_dx_op.register_fake
def _(dy, data, absmax, code, nested_absmax, nested_code, offset, n, k, blocksize, lora_g, lora_A, scale, seed, p):
    return dy.new_empty((dy.shape[0], k))
