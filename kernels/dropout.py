"""Seeded, stateless dropout: ``x_hat = x * keep / (1 - p)`` with ``keep`` a hash of the index.

Math (per element i of the row-major flattening of x: [M, K]):

    keep_i  = fmix32((i mod 2^32) ^ fmix32(seed + (i >> 32) * GOLDEN32)) >= p * 2^32
    x_hat_i = keep_i ? fp32(x_i) * fp32(1 / (1 - p)) : 0          (cast once to x.dtype)

Because the mask is a pure function of ``(seed, i)``, the QLoRA backward regenerates it (in the
dx epilogue and here for dA) instead of storing it. See ``kernels.reference.dropout_bits``.
Layers: ``_dropout_kernel`` -> ``dropout_launch`` -> op ``qlora::dropout`` -> ``dropout``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import reference
from ._launch import cdiv, device_guard
from ._tl import cast_out, keep_mask, manual_bf16, tl_dtype
from .contract import check_dropout
from .dispatch import interpreting, use_triton

__all__ = ["dropout", "dropout_launch", "new_seed"]

BLOCK = 1024  # elements per program


@triton.jit
def _dropout_kernel(
    x_ptr, out_ptr, seed_ptr,
    M, K,
    stride_xm, stride_xk,
    threshold, keep_scale,
    BLOCK: tl.constexpr, OUT_DTYPE: tl.constexpr, MANUAL_BF16: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # flat logical index
    m = i // K
    k = i % K
    in_range = m < M  # not ``i < M * K``: M * K of two int32 arguments wraps past 2^31
    x = tl.load(x_ptr + m * stride_xm + k * stride_xk, mask=in_range, other=0.0).to(tl.float32)
    keep = keep_mask(tl.load(seed_ptr), i, threshold)
    y = tl.where(keep, x * keep_scale, 0.0)
    tl.store(out_ptr + i, cast_out(y, OUT_DTYPE, MANUAL_BF16), mask=in_range)


def dropout_launch(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """Launch ``_dropout_kernel`` on a 2-D ``x: [M, K]`` (any strides); returns contiguous."""
    M, K = x.shape
    out = torch.empty((M, K), dtype=x.dtype, device=x.device)
    if M * K == 0:
        return out
    with device_guard(x):
        _dropout_kernel[(cdiv(M * K, BLOCK),)](
            x, out, seed, M, K, x.stride(0), x.stride(1),
            reference.dropout_threshold(p), 1.0 / (1.0 - p),
            BLOCK=BLOCK, OUT_DTYPE=tl_dtype(x.dtype), MANUAL_BF16=manual_bf16(x.dtype, interpreting()),
        )
    return out


@torch.library.custom_op("qlora::dropout", mutates_args=())
def dropout_op(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """``x_hat`` of a 2-D ``x: [M, K]``; Triton or reference per ``kernels.dispatch``."""
    check_dropout(x, seed, p)
    if use_triton(x):
        return dropout_launch(x, seed, p)
    return reference.dropout(x, seed, p).contiguous()


@dropout_op.register_fake
def _(x, seed, p):
    return x.new_empty(x.shape)


def new_seed(device: torch.device) -> torch.Tensor:
    """A fresh int64 seed tensor drawn from torch's global RNG (traceable by torch.compile)."""
    return torch.randint(0, 2**31 - 1, (), device=device, dtype=torch.int64)


def dropout(x: torch.Tensor, p: float, seed: torch.Tensor | int | None = None) -> torch.Tensor:
    """Stateless dropout of ``x: [..., K]``; the mask is a function of ``(seed, flat index)``.

    Args:
        x: float tensor; p: drop probability in [0, 1); seed: int or int64 0-d tensor
            (default: drawn from torch's RNG).
    Raises:
        ValueError: p outside [0, 1), or an unsupported device.
    """
    reference.dropout_threshold(p)  # validates p
    if p == 0.0:
        return x
    if seed is None:
        seed = new_seed(x.device)
    elif not isinstance(seed, torch.Tensor):
        seed = torch.tensor(int(seed), dtype=torch.int64, device=x.device)
    else:  # the kernel reads the seed through a pointer: it must live on x's device
        seed = seed.to(device=x.device, dtype=torch.int64).reshape(())
    x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1]) if x.dim() else x.reshape(1, 1)
    return dropout_op(x2, seed, float(p)).view(x.shape)
