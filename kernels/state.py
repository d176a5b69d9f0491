"""Unpacking a ``nf4.QuantizedTensor`` into the plain tensors the ops take, with checks.

torch.library ops take tensors and scalars only, so a quantized weight travels as
``(data, absmax, code, nested_absmax, nested_code, offset)`` plus ``numel`` / ``blocksize``.
The last three are ``None`` without double quantization.
"""

from __future__ import annotations

import torch

import nf4

__all__ = ["quant_state", "check_quantized", "weight_dims"]

NESTED_BLOCKSIZE = 256


def check_quantized(qt, name: str = "qt") -> None:
    """Raise ``TypeError`` unless ``qt`` is a ``nf4.QuantizedTensor`` the kernels can read."""
    if not isinstance(qt, nf4.QuantizedTensor):
        raise TypeError(f"{name} must be a nf4.QuantizedTensor, got {type(qt).__name__}")
    if qt.nested and qt.nested_blocksize != NESTED_BLOCKSIZE:
        raise ValueError(f"{name}.nested_blocksize must be {NESTED_BLOCKSIZE}, got {qt.nested_blocksize}")


def weight_dims(qt, name: str = "qt") -> tuple[int, int]:
    """``(N, K)`` of a 2-D quantized weight ``W: [N, K]``."""
    check_quantized(qt, name)
    if len(qt.shape) != 2:
        raise ValueError(f"{name} must be a 2-D weight [N, K], got shape {tuple(qt.shape)}")
    return int(qt.shape[0]), int(qt.shape[1])


def quant_state(qt) -> tuple[torch.Tensor, ...]:
    """``(data, absmax, code, nested_absmax, nested_code, offset)``; the last three may be None."""
    off = qt.offset
    if off is None:
        return qt.data, qt.absmax, qt.code, None, None, None
    return qt.data, qt.absmax, qt.code, qt.nested_absmax, qt.nested_code, off if off.dim() == 0 else off.reshape(())
