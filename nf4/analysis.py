"""Research view: how much error each 4-bit format costs on real or synthetic weights."""

from __future__ import annotations

import itertools
import math

import torch

from .blockwise import block_absmax, check_blocksize, codes_from_scaled, scale_blocks
from .codebooks import normal_float_codebook
from .tensor import quantize

__all__ = ["quantization_error", "error_stats", "sweep", "codebook_by_name", "quantize_with_codebook"]


def codebook_by_name(name: str) -> torch.Tensor | None:
    """'nf2'..'nf8' -> a NormalFloat codebook; 'nf4'/'fp4'/'int4' -> None (packed path)."""
    if name in ("nf4", "fp4", "int4"):
        return None
    if name.startswith("nf") and name[2:].isdigit():
        return normal_float_codebook(int(name[2:]))
    raise ValueError(f"unknown quant_type {name!r}: use nf2..nf8, fp4 or int4")


def quantize_with_codebook(w: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Fake-quantize ``w`` with any codebook (k bits, no packing): returns float32 of w's shape."""
    flat = w.reshape(-1).float()
    absmax = block_absmax(flat, blocksize)
    q = codes_from_scaled(scale_blocks(flat, absmax, blocksize), code.to(w.device)).long()
    vals = code.to(w.device)[q]
    block = torch.arange(flat.numel(), device=w.device) // blocksize
    return (vals * absmax[block]).view(w.shape)


def error_stats(w: torch.Tensor, w_hat: torch.Tensor) -> dict[str, float]:
    """MSE, mean/max absolute error and SQNR (dB) of ``w_hat`` against ``w``, in float64."""
    w64, e = w.double(), (w_hat.double() - w.double())
    mse = float((e * e).mean()) if e.numel() else 0.0
    signal = float((w64 * w64).mean()) if e.numel() else 0.0
    return {
        "mse": mse,
        "mae": float(e.abs().mean()) if e.numel() else 0.0,
        "max_abs": float(e.abs().max()) if e.numel() else 0.0,
        "sqnr_db": 10 * math.log10(signal / mse) if mse > 0 else math.inf,
    }


def quantization_error(w: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64,
                       double_quant: bool = True) -> dict[str, float]:
    """Error of blockwise quantization of ``w``: mse, mae, max_abs, sqnr_db, bits_per_param.

    'nf4'/'fp4'/'int4' go through the real packed path (``nf4.quantize``); 'nf2'..'nf8' are
    fake-quantized with their codebook. Double quantization of those uses the same 8-bit
    absmax scheme, so bits/param = k + 8/blocksize + 32/(256*blocksize) with DQ.
    """
    check_blocksize(blocksize)
    code = codebook_by_name(quant_type)
    if code is None:
        qt = quantize(w, quant_type, blocksize, double_quant)
        stats = error_stats(w, qt.dequantize(torch.float32))
        stats["bits_per_param"] = qt.bits_per_parameter()
        return stats
    bits = int(math.log2(code.numel()))
    if double_quant:
        # reuse the packed path's absmax handling by quantizing the scales the same way
        from .blockwise import dequantize_blockwise_8bit, quantize_blockwise_8bit
        from .codebooks import dynamic_map

        flat = w.reshape(-1).float()
        absmax = block_absmax(flat, blocksize)
        offset = absmax.mean()
        nested = dynamic_map().to(w.device)
        q2, a2 = quantize_blockwise_8bit(absmax - offset, nested)
        absmax_dq = dequantize_blockwise_8bit(q2, a2, nested) + offset
        q = codes_from_scaled(scale_blocks(flat, absmax, blocksize), code.to(w.device)).long()
        block = torch.arange(flat.numel(), device=w.device) // blocksize
        w_hat = (code.to(w.device)[q] * absmax_dq[block]).view(w.shape)
        bpp = bits + 8 / blocksize + 32 / (256 * blocksize)
    else:
        w_hat = quantize_with_codebook(w, code, blocksize)
        bpp = bits + 32 / blocksize
    stats = error_stats(w, w_hat)
    stats["bits_per_param"] = bpp
    return stats


def sweep(w: torch.Tensor, quant_types=("nf4", "fp4", "int4"), blocksizes=(64,),
          double_quant=(False, True)) -> list[dict[str, object]]:
    """One row per (quant_type x blocksize x double_quant) with ``quantization_error``'s fields."""
    rows = []
    for qtype, bs, dq in itertools.product(quant_types, blocksizes, double_quant):
        rows.append({"quant_type": qtype, "blocksize": bs, "double_quant": dq,
                     **quantization_error(w, qtype, bs, dq)})
    return rows
