"""``kernels.qlora_linear`` and ``kernels.nf4_matmul``: the differentiable QLoRA linear.

    forward   S  = x_hat Aᵀ                                     [M, r]  (rank-sized GEMM)
              y  = x Wᵀ + s S Bᵀ + bias                         qlora::nf4_linear (fused epilogue)
    backward  G  = dy B                                         [M, r]  computed once, reused:
              dx = dy W + s (G A) ⊙ keep / (1 - p)              qlora::nf4_linear_dx (fused epilogue)
              dA = s Gᵀ x_hat                                   [r, K]  (rank-sized GEMM)
              dB = s dyᵀ S                                      [N, r]  (rank-sized GEMM)

with x_hat = dropout(x) (``kernels.dropout``: a pure function of a seed and the index).
The autograd Function saves only x (plus the dropout seed), S, A, B and the packed weight with
its quantization state. On GPUs it never saves a dequantized W: backward reads the packed W
again. On the CPU reference path a small W is dequantized once and kept for backward
(``keep_dense_for_backward``: its rule bounds the extra memory by the saved activations).
"""

from __future__ import annotations

import math
import os
from numbers import Real

import torch

from . import reference
from .dispatch import check_device, use_triton
from .dropout import dropout_op, new_seed
from .matmul import nf4_linear, nf4_linear_dx_op, nf4_linear_op
from .state import quant_state, weight_dims

__all__ = ["qlora_linear", "nf4_matmul", "QLoRALinearFunction"]

ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def _lora_down(x2, lora_A, seed, p):
    x_hat = dropout_op(x2, seed, p) if p > 0 else x2
    # F.linear is x_hat @ lora_A.t() (the same ATen matmul, the same bits) without building the
    # transposed view in Python: 0.6 µs of the decode-size host cost (benchmarks.bench_overhead)
    return x_hat, torch.nn.functional.linear(x_hat, lora_A)


class QLoRALinearFunction(torch.autograd.Function):
    """Autograd for ``y = x Wᵀ + s dropout(x) Aᵀ Bᵀ + bias`` with a frozen 4-bit W.

    Inputs: ``x: [M, K]`` (flattened), A: [r, K] or None, B: [N, r] or None, bias: [N] or None,
    the six quantization-state tensors, the int64 seed (or None), then n, k, blocksize, scale, p.
    """

    @staticmethod
    def forward(ctx, x2, lora_A, lora_B, bias, data, absmax, code, nabs, ncode, offset, seed,
                n, k, blocksize, scale, p):
        s = None
        if lora_A is not None:
            _, s = _lora_down(x2, lora_A, seed, p)
        dense = None
        if keep_dense_for_backward(x2, n, k, ctx.needs_input_grad[0]):
            # CPU, eager: dequantize once per step, shared by forward and backward (rule above)
            dense = reference.dense_weight((data, absmax, code, nabs, ncode, offset), n, k, blocksize, x2.dtype)
            y = reference.linear_forward(x2, dense, s, lora_B, scale, bias)
        else:
            y = nf4_linear_op(x2, data, absmax, code, nabs, ncode, offset, n, k, blocksize, s, lora_B, scale, bias)
        ctx.save_for_backward(x2 if lora_A is not None else None, s, lora_A, lora_B,
                              data, absmax, code, nabs, ncode, offset, seed, dense)
        ctx.n, ctx.k, ctx.blocksize, ctx.scale, ctx.p = n, k, blocksize, scale, p
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, s, lora_A, lora_B, data, absmax, code, nabs, ncode, offset, seed, dense = ctx.saved_tensors
        need_x, need_A, need_B, need_bias = ctx.needs_input_grad[:4]
        scale, p = ctx.scale, ctx.p
        dx = dA = dB = dbias = None
        g = dy @ lora_B if lora_A is not None and (need_x or need_A) else None  # [M, r], shared
        if need_x and dense is not None:
            dx = reference.linear_dx_seeded(dy.contiguous(), dense, g, lora_A, scale, seed, p)
        elif need_x:
            dx = nf4_linear_dx_op(dy, data, absmax, code, nabs, ncode, offset, ctx.n, ctx.k, ctx.blocksize,
                                  g, lora_A, scale, seed, p)
        if need_A:
            x_hat = dropout_op(x2, seed, p) if p > 0 else x2
            dA = (g.t() @ x_hat) * scale
        if need_B:
            dB = (dy.t() @ s) * scale
        if need_bias:
            dbias = dy.sum(dim=0, dtype=reference.compute_dtype(dy.dtype)).to(ctx.bias_dtype)
        return (dx, dA, dB, dbias) + (None,) * 12


KEEP_DENSE_ENV = "QLORA_CPU_KEEP_DENSE"  # "auto" (default), "always" or "never"


def keep_dense_for_backward(x2: torch.Tensor, n: int, k: int, need_dx: bool) -> bool:
    """Whether the CPU path dequantizes W once per step and keeps it for backward's dx.

    Only on the plain-PyTorch CPU path, in eager mode, when dx is needed. The rule ("auto"):
    keep the dense ``W: [N, K]`` (in ``reference.gemm_dtype``) when its bytes are at most those of
    the layer input ``x: [M, K]`` autograd saves anyway (``N * w.element_size() <= M *
    x.element_size()``), so the step's saved activations at most double and the base stays 4-bit
    between steps. Measured on all-MiniLM-L6-v2, batch 8x128 (2026-12-02, one interleaved run):
    step 0.442 s (auto) / 0.458 s (never) / 0.435 s (always) in fp32, 0.285 / 0.307 / 0.273 s in
    bf16. ``QLORA_CPU_KEEP_DENSE=always|never`` overrides.
    """
    if not need_dx or x2.device.type != "cpu" or torch.compiler.is_compiling() or use_triton(x2):
        return False
    mode = os.environ.get(KEEP_DENSE_ENV, "auto")
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"{KEEP_DENSE_ENV} must be auto, always or never, got {mode!r}")
    if mode != "auto":
        return mode == "always"
    return n * reference.gemm_dtype(x2.dtype).itemsize <= x2.shape[0] * x2.element_size()


def _check_inputs(x, qt, lora_A, lora_B, scale, bias, dropout_p):
    n, k = weight_dims(qt)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    check_device(x, "x")
    dev = x.device
    if x.dtype not in ACT_DTYPES:
        raise TypeError(f"x must be one of {ACT_DTYPES}, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x.shape[-1] must equal the weight's in_features K={k}, got x.shape={tuple(x.shape)}")
    if qt.data.device != dev:
        raise ValueError(f"the weight is on {qt.device} but x is on {dev}")
    if (lora_A is None) != (lora_B is None):
        kind = lambda t: "None" if t is None else "Tensor"  # noqa: E731
        raise ValueError("lora_A and lora_B must both be tensors or both be None, got "
                         f"lora_A={kind(lora_A)}, lora_B={kind(lora_B)}")
    if lora_A is not None:
        for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dtype != x.dtype:
                raise TypeError(f"{name}.dtype must match x.dtype={x.dtype}, got {t.dtype}")
            if t.device != dev:
                raise ValueError(f"{name} is on {t.device} but x is on {dev}")
            if t.dim() != 2:
                raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        if lora_A.shape[1] != k:
            raise ValueError(f"lora_A must be [r, K={k}], got shape {tuple(lora_A.shape)}")
        if lora_B.shape[0] != n:
            raise ValueError(f"lora_B must be [N={n}, r], got shape {tuple(lora_B.shape)}")
        if lora_A.shape[0] != lora_B.shape[1]:
            raise ValueError(f"LoRA rank mismatch: lora_A has r={lora_A.shape[0]} rows but lora_B has "
                             f"r={lora_B.shape[1]} columns")
    if not (type(scale) is float or type(scale) is int) and (isinstance(scale, bool) or not isinstance(scale, Real)):
        raise TypeError(f"scale must be a finite real number, got {scale!r}")
    if not math.isfinite(scale):
        raise TypeError(f"scale must be a finite real number, got {scale!r}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.dtype.is_floating_point:
            raise TypeError(f"bias must be a floating tensor, got {getattr(bias, 'dtype', type(bias).__name__)}")
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        if bias.device != dev:
            raise ValueError(f"bias is on {bias.device} but x is on {dev}")
    if (not (type(dropout_p) is float or type(dropout_p) is int)
            and (isinstance(dropout_p, bool) or not isinstance(dropout_p, Real))) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    return n, k


def qlora_linear(
    x: torch.Tensor,
    qt,
    lora_A: torch.Tensor | None,
    lora_B: torch.Tensor | None,
    scale: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    *,
    training: bool = True,
    seed: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """``y = x Wᵀ + scale * dropout(x) Aᵀ Bᵀ + bias``, differentiable w.r.t. x, A, B (and bias).

    Args:
        x: ``[..., K]`` bf16/fp16/fp32 (fp64: reference path only, for gradcheck); any strides.
        qt: the frozen weight ``W: [N, K]``, a ``nf4.QuantizedTensor`` on x's device.
        lora_A: ``[r, K]`` and lora_B: ``[N, r]`` in x.dtype, or both None (no LoRA).
        scale: the LoRA scale s (alpha/r, or alpha/sqrt(r) for rsLoRA).
        bias: ``[N]`` or None (any float dtype; added in float32).
        dropout_p: LoRA dropout on x, applied only when ``training``.
        seed: dropout seed (int or int64 0-d tensor); default: drawn from torch's RNG.

    Returns:
        ``[..., N]`` in x.dtype.

    Raises:
        TypeError: x/lora dtype mismatch or non-tensor inputs; ValueError: x.shape[-1] != K,
        rank or shape mismatch, bad dropout_p, device mismatch or an unsupported device.
    """
    n, k = _check_inputs(x, qt, lora_A, lora_B, scale, bias, dropout_p)
    if lora_A is not None and lora_A.shape[0] == 0:  # rank 0 contributes nothing
        lora_A = lora_B = None
    lead = x.shape[:-1]
    x2 = x if x.dim() == 2 else x.reshape(math.prod(lead), k)
    p = float(dropout_p) if (training and lora_A is not None) else 0.0
    seed_t = None
    if p > 0:
        if seed is None:
            seed_t = new_seed(x.device)
        elif isinstance(seed, torch.Tensor):
            seed_t = seed.to(device=x.device, dtype=torch.int64).reshape(())
        else:
            seed_t = torch.tensor(int(seed), dtype=torch.int64, device=x.device)
    state = quant_state(qt)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, lora_A, lora_B, bias))
    if needs_grad:
        y = QLoRALinearFunction.apply(x2, lora_A, lora_B, bias, *state, seed_t, n, k, qt.blocksize, float(scale), p)
    else:  # inference: the same math without autograd bookkeeping, and, in eager mode, without the
        # torch.library dispatch (decode is launch-bound: tools/perf_model.py reports the host cost)
        s = None if lora_A is None else _lora_down(x2, lora_A, seed_t, p)[1]
        linear = nf4_linear_op if torch.compiler.is_compiling() else nf4_linear
        y = linear(x2, *state, n, k, qt.blocksize, s, lora_B, float(scale), bias)
    return y if x.dim() == 2 else y.view(*lead, n)


def nf4_matmul(x: torch.Tensor, qt, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ Wᵀ (+ bias)`` for ``x: [..., K]`` and a 4-bit ``W: [N, K]``; differentiable w.r.t. x.

    Same checks and errors as ``qlora_linear``; returns ``[..., N]`` in x.dtype.
    """
    return qlora_linear(x, qt, None, None, 0.0, bias)
