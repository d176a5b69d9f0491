"""The plain-PyTorch reference for every op in ``kernels``: the specification the Triton
kernels are tested against, and the CPU path (see ``kernels.dispatch``).

Notation (shapes):
    W: [N, K] frozen 4-bit weight (dequantized here to the compute dtype)
    x: [M, K] activations (callers flatten leading dims); dy: [M, N]
    A: [r, K] LoRA down, B: [N, r] LoRA up, s: the LoRA scale (alpha/r or alpha/sqrt(r))
    keep: [M, K] bool dropout mask, x_hat = x * keep / (1 - p)

    forward   y  = x Wᵀ + s (x_hat Aᵀ) Bᵀ + bias
    backward  dx = dy W + s ((dy B) A) ⊙ keep / (1 - p)
              dA = s (dy B)ᵀ x_hat
              dB = s dyᵀ (x_hat Aᵀ)

Everything is computed in float32 (float64 for float64 inputs, so that ``gradcheck`` can
run on this path) and cast once to the dtype of ``x``.

Dropout is a pure function of ``(seed, flat index)``: ``dropout_bits`` hashes the element's
int64 flat index with a 32-bit seed (murmur3's ``fmix32`` finaliser), and the element is kept
when its 32-bit hash is ``>= dropout_threshold(p)``. The Triton kernels evaluate the very same
hash (``kernels._tl.keep_mask``), so a mask never has to be stored: backward regenerates it.
"""

from __future__ import annotations

import os

import torch

from nf4.blockwise import dequantize_blockwise_8bit
from nf4.tensor import decode_packed

__all__ = [
    "compute_dtype",
    "gemm_dtype",
    "dequantize_packed",
    "dense_weight",
    "linear_dx_seeded",
    "dropout_bits",
    "dropout_threshold",
    "dropout_keep_mask",
    "dropout",
    "linear_forward",
    "linear_dx",
    "qlora_forward",
    "qlora_backward",
]

NESTED_BLOCKSIZE = 256  # QLoRA double quantization: 8-bit absmax codes in blocks of 256
_M32 = 0xFFFFFFFF
GOLDEN32 = 0x9E3779B1  # 2^32 / golden ratio (odd): spreads the high word of the index
FMIX_C1 = 0x85EBCA6B  # murmur3 fmix32 constants
FMIX_C2 = 0xC2B2AE35


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


BF16_GEMM_ENV = "QLORA_CPU_BF16_GEMM"


def gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the runtime GEMMs (``linear_forward`` / ``linear_dx``) for activations of ``dtype``.

    bfloat16 activations multiply in bfloat16 with float32 accumulation inside the GEMM (as the
    GPU kernels do; CPUs with AVX512-BF16/AMX run these ~2x faster than float32 GEMMs), the
    LoRA term accumulating into the bf16 output. ``QLORA_CPU_BF16_GEMM=0`` restores float32
    GEMMs. Every other dtype: ``compute_dtype``.
    """
    if dtype == torch.bfloat16 and os.environ.get(BF16_GEMM_ENV, "1") != "0":
        return torch.bfloat16
    return compute_dtype(dtype)


# ---- dequantization ----------------------------------------------------------------------
def dequantize_packed(
    data: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    numel: int,
    blocksize: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``code[q[i]] * absmax[i // blocksize]`` in float32 (one rounding), cast once: ``[numel]``.

    With double quantization ``absmax[b] = nested_code[qa[b]] * nested_absmax[b // 256]``
    rounded in float32, then ``+ offset`` rounded again (bitsandbytes' two roundings). This is
    ``nf4.dequantize`` written on the raw state tensors the ops receive.
    """
    if nested_absmax is not None:
        absmax = dequantize_blockwise_8bit(absmax, nested_absmax, nested_code, NESTED_BLOCKSIZE) + offset
    return decode_packed(data, absmax, code, numel, blocksize, dtype)


def dense_weight(state: tuple, n: int, k: int, blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    """The dequantized ``W: [n, k]`` in ``gemm_dtype(dtype)`` for the runtime GEMMs of activations
    of ``dtype``; ``state`` = ``(data, absmax, code, nested_absmax, nested_code, offset)``."""
    return dequantize_packed(*state, n * k, blocksize, gemm_dtype(dtype)).view(n, k)


# ---- dropout -----------------------------------------------------------------------------
def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """``a * c mod 2^32`` for int64 ``a`` in [0, 2^32), without int64 overflow (16-bit halves)."""
    lo = a * (c & 0xFFFF)
    hi = ((a * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, FMIX_C1)
    h = h ^ (h >> 13)
    h = _mul32(h, FMIX_C2)
    return h ^ (h >> 16)


def dropout_bits(seed: torch.Tensor, numel: int, device: torch.device | None = None) -> torch.Tensor:
    """32-bit hashes (int64 values in [0, 2^32)) of the flat indices ``0..numel-1``.

        key(i) = fmix32(seed + (i >> 32) * GOLDEN32)      (mod 2^32)
        h(i)   = fmix32((i mod 2^32) ^ key(i))
    """
    device = seed.device if device is None else device
    idx = torch.arange(numel, device=device, dtype=torch.int64)
    key = _fmix32((seed.to(device=device, dtype=torch.int64) + _mul32(idx >> 32, GOLDEN32)) & _M32)
    return _fmix32((idx & _M32) ^ key)


def dropout_threshold(p: float) -> int:
    """Keep an element when its hash ``>= dropout_threshold(p)``: P(keep) = 1 - p (to 2^-32)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return int(p * 2**32)


def dropout_keep_mask(seed: torch.Tensor, shape: torch.Size | tuple, p: float, device=None) -> torch.Tensor:
    """The bool keep mask of a contiguous tensor of ``shape``."""
    numel = 1
    for d in shape:
        numel *= int(d)
    return (dropout_bits(seed, numel, device) >= dropout_threshold(p)).view(shape)


def dropout(x: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """``x_hat = x * keep / (1 - p)``: one float32 multiply by ``1/(1-p)``, cast to ``x.dtype``.

    The mask is indexed by the row-major flat index of ``x`` (its logical layout).
    """
    keep = dropout_keep_mask(seed, x.shape, p, x.device)
    ct = compute_dtype(x.dtype)
    return torch.where(keep, x.to(ct) * (1.0 / (1.0 - p)), 0).to(x.dtype)


# ---- the two GEMM ops with their epilogues (what the Triton matmuls compute) -------------
def linear_forward(
    x: torch.Tensor,
    w: torch.Tensor,
    s_lora: torch.Tensor | None,
    lora_B: torch.Tensor | None,
    scale: float,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``x Wᵀ + scale * S Bᵀ + bias`` with ``x: [M, K]``, ``w: [N, K]`` dense, ``S: [M, r]``,
    ``B: [N, r]``, ``bias: [N]``; computed in ``gemm_dtype(x.dtype)`` (float32 but for bf16)
    and returned in ``x.dtype``."""
    ct = gemm_dtype(x.dtype)
    xc, wt = x.to(ct), w.to(ct).t()
    # the bias initialises the GEMM output and the LoRA term accumulates into it (addmm): no
    # [M, N] temporaries, two fewer passes over the output
    y = xc @ wt if bias is None else torch.addmm(bias.to(ct), xc, wt)
    if s_lora is not None:
        y.addmm_(s_lora.to(ct), lora_B.to(ct).t(), alpha=scale)
    return y.to(x.dtype)


def linear_dx(
    dy: torch.Tensor,
    w: torch.Tensor,
    g_lora: torch.Tensor | None,
    lora_A: torch.Tensor | None,
    scale: float,
    keep: torch.Tensor | None,
    p: float,
) -> torch.Tensor:
    """``dy W + scale * (G A) ⊙ keep / (1 - p)`` with ``dy: [M, N]``, ``w: [N, K]``,
    ``G = dy B: [M, r]``, ``A: [r, K]``, ``keep: [M, K]``; in ``gemm_dtype(dy.dtype)``, returned in
    ``dy.dtype``."""
    ct = gemm_dtype(dy.dtype)
    dx = dy.to(ct) @ w.to(ct)
    if g_lora is not None:
        if keep is None:  # accumulate into the GEMM output (addmm): no [M, K] temporary
            dx.addmm_(g_lora.to(ct), lora_A.to(ct), alpha=scale)
        else:
            lora = scale * (g_lora.to(ct) @ lora_A.to(ct))
            dx = dx + torch.where(keep, lora * (1.0 / (1.0 - p)), 0)
    return dx.to(dy.dtype)


# ---- the whole QLoRA linear, from scratch (the spec for the autograd path) ----------------
def linear_dx_seeded(dy, w, g_lora, lora_A, scale, seed, p) -> torch.Tensor:
    """``linear_dx`` with the LoRA dropout's keep mask regenerated from ``seed`` (when ``p > 0``
    and there is a LoRA term): index ``m * K + k`` of ``[M, K]``, as the fused kernels do."""
    keep = None
    if seed is not None and p > 0 and g_lora is not None:
        keep = dropout_keep_mask(seed, (dy.shape[0], w.shape[1]), p, dy.device)
    return linear_dx(dy, w, g_lora, lora_A, scale, keep, p)


def qlora_forward(x, w, lora_A, lora_B, scale, bias=None, keep=None, p=0.0):
    """``y = x Wᵀ + s (x_hat Aᵀ) Bᵀ + bias`` for ``x: [M, K]``, all in float32."""
    ct = compute_dtype(x.dtype)
    y = x.to(ct) @ w.to(ct).t()
    if lora_A is not None:
        xh = x.to(ct) if keep is None else torch.where(keep, x.to(ct) * (1.0 / (1.0 - p)), 0)
        y = y + scale * ((xh @ lora_A.to(ct).t()) @ lora_B.to(ct).t())
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(x.dtype)


def qlora_backward(dy, x, w, lora_A, lora_B, scale, keep=None, p=0.0):
    """``(dx, dA, dB)`` of ``qlora_forward`` for ``dy: [M, N]`` (dA, dB None without LoRA)."""
    ct = compute_dtype(dy.dtype)
    dyc, wc = dy.to(ct), w.to(ct)
    dx = dyc @ wc
    if lora_A is None:
        return dx.to(dy.dtype), None, None
    A, B = lora_A.to(ct), lora_B.to(ct)
    xh = x.to(ct) if keep is None else torch.where(keep, x.to(ct) * (1.0 / (1.0 - p)), 0)
    g = dyc @ B  # [M, r], shared by all three terms
    lora = scale * (g @ A)
    if keep is not None:
        lora = torch.where(keep, lora * (1.0 / (1.0 - p)), 0)
    dA = scale * (g.t() @ xh)
    dB = scale * (dyc.t() @ (xh @ A.t()))
    return (dx + lora).to(dy.dtype), dA.to(lora_A.dtype), dB.to(lora_B.dtype)
