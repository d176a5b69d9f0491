"""The two frozen-weight GEMM ops of a QLoRA linear, as torch.library ops, and the regime
choice between the three Triton paths.

    qlora::nf4_linear     y  = x Wᵀ + scale * S Bᵀ + bias                x: [M, K] -> [M, N]
    qlora::nf4_linear_dx  dx = dy W + scale * (G A) ⊙ keep / (1 - p)      dy: [M, N] -> [M, K]

W: [N, K] stays packed (4-bit codes + absmax state); S = x_hat Aᵀ: [M, r], G = dy B: [M, r].
Both ops read W in place (forward as Wᵀ, dx as W) through element strides, never a transposed
or persistent dequantized copy.

Regimes (Triton paths), by M = number of token rows:
    M <= GEMV_MAX_M                     'gemv'          split-K GEMV (kernels.gemv)
    GEMV_MAX_M < M < DEQUANT_ONCE_MIN_M 'gemm'          tiled GEMM, dequant inside the K loop
    M >= DEQUANT_ONCE_MIN_M             'dequant_gemm'  dequantize once into a temporary buffer
                                                        of x's dtype, then the same tiled GEMM
The crossovers below are NOT measured yet: they must be measured on the GPU
(benchmarks/bench_matmul.py) and set by the GPU tuning issue. ``dispatch.force_regime``
overrides the choice (tests run every regime).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import reference
from ._launch import MatmulProblem
from .contract import check_nf4_linear, check_nf4_linear_dx
from .dequant import dequantize_launch
from .dispatch import forced_regime, use_triton
from .gemm import gemm_launch
from .gemv import gemv_launch

__all__ = ["GEMV_MAX_M", "DEQUANT_ONCE_MIN_M", "choose_regime", "nf4_linear_op", "nf4_linear_dx_op"]

# Unmeasured defaults (NOTES §4: decode is byte-bound up to M ~ 16-64; training is compute-bound
# and dequantize-once + tensor-core GEMM is the known-fastest path). To be measured on an H200.
GEMV_MAX_M = 64
DEQUANT_ONCE_MIN_M = 1024


def choose_regime(M: int) -> str:
    """'gemv', 'gemm' or 'dequant_gemm' for M rows (``dispatch.force_regime`` wins)."""
    forced = forced_regime()
    if forced != "auto":
        return forced
    if M <= GEMV_MAX_M:
        return "gemv"
    return "gemm" if M < DEQUANT_ONCE_MIN_M else "dequant_gemm"


def _run(prob: MatmulProblem, out_dtype: torch.dtype, n: int, k: int) -> torch.Tensor:
    regime = choose_regime(prob.M)
    if regime == "dequant_gemm" and prob.M > 0:
        # one dense [N, K] buffer in the activation dtype, freed when this op returns
        flat = dequantize_launch(*prob.state, n * k, prob.blocksize, prob.a.dtype)
        prob.state = (flat.view(n, k),)
        return gemm_launch(prob, out_dtype)
    if regime == "gemv":
        return gemv_launch(prob, out_dtype)
    return gemm_launch(prob, out_dtype)


def _dense_w(state, n, k, blocksize, dtype):
    return reference.dequantize_packed(*state, n * k, blocksize, reference.compute_dtype(dtype)).view(n, k)


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
    state = (data, absmax, code, nested_absmax, nested_code, offset)
    if not use_triton(x):
        return reference.linear_forward(x, _dense_w(state, n, k, blocksize, x.dtype), lora_s, lora_B, scale, bias)
    prob = MatmulProblem(
        a=x, P=n, R=k, stride_wr=1, stride_wp=k, state=state, blocksize=blocksize,
        lora_s=lora_s, lora_l=lora_B,
        stride_lj=lora_B.stride(1) if lora_B is not None else 0,
        stride_lp=lora_B.stride(0) if lora_B is not None else 0,
        scale=scale, bias=bias.contiguous() if bias is not None else None,  # the kernel reads bias[p]
    )
    return _run(prob, x.dtype, n, k)


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
        keep = reference.dropout_keep_mask(seed, (dy.shape[0], k), p, dy.device) if dropout else None
        return reference.linear_dx(dy, _dense_w(state, n, k, blocksize, dy.dtype), lora_g, lora_A, scale, keep, p)
    prob = MatmulProblem(
        a=dy, P=k, R=n, stride_wr=k, stride_wp=1, state=state, blocksize=blocksize,
        lora_s=lora_g, lora_l=lora_A,
        stride_lj=lora_A.stride(0) if lora_A is not None else 0,
        stride_lp=lora_A.stride(1) if lora_A is not None else 0,
        scale=scale, seed=seed if dropout else None, p=p if dropout else 0.0,
    )
    return _run(prob, dy.dtype, n, k)


@nf4_linear_dx_op.register_fake
def _(dy, data, absmax, code, nested_absmax, nested_code, offset, n, k, blocksize, lora_g, lora_A, scale, seed, p):
    return dy.new_empty((dy.shape[0], k))
