"""``kernels.dequantize``: NF4/FP4 -> bf16/fp16/fp32 in one launch, nested absmax decode fused.

Math (per packed byte j, elements 2j and 2j+1, both in block b = 2j // blocksize):

    absmax_b = nested_code[qa_b] * nested_absmax[b // 256]  (fp32)  + offset  (fp32)   # if nested
    w[2j]    = code[byte_j >> 4]  * absmax_b   (fp32, one rounding) -> out dtype (nearest even)
    w[2j+1]  = code[byte_j & 15]  * absmax_b

Two kernels compute it:

- ``_dequant_blocks_kernel`` (every whole-block tensor: numel a multiple of the blocksize, a
  multiple of 8): a program owns NB whole blocks as a ``[NB, blocksize / 8]`` tile of int32 words
  (128-bit loads), decodes each block's absmax once, and the codes with ``kernels._decode``
  ('shfl' on the GPU: exact float32 levels by warp shuffles; 'table' in the interpreter);
- ``_dequant_kernel`` (anything else: a partial last block, odd sizes): one packed byte at a time.

Both are bit-identical to ``nf4.dequantize`` (tested exactly, every dtype, nested or not): the two
absmax roundings stay separate (``enable_fp_fusion=False``) and each weight is one float32 product.
Layers: kernels -> ``dequantize_launch`` -> op ``qlora::dequantize`` -> ``dequantize``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import reference
from ._decode import decode8_shfl, decode8_table, lane_table, verified
from ._launch import cdiv, device_guard
from ._tl import cast_out, decode_absmax, load_offset, manual_bf16, tl_dtype
from .contract import check_dequantize
from .dispatch import interpreting, use_triton
from .state import check_quantized, quant_state

__all__ = ["dequantize", "dequantize_launch", "OUT_DTYPES"]

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
BLOCK_BYTES = 1024  # packed bytes per program (2048 weights); a GPU tuning knob


@triton.jit
def _dequant_kernel(
    w_ptr, absmax_ptr, code_ptr, nabs_ptr, ncode_ptr, offset_ptr,  # quantized W
    out_ptr,  # [numel] output
    numel,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BLOCK_BYTES: tl.constexpr,
    OUT_DTYPE: tl.constexpr, MANUAL_BF16: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    j = pid * BLOCK_BYTES + tl.arange(0, BLOCK_BYTES)  # int64 byte indices
    in_range = 2 * j < numel  # j < ceil(numel / 2), in int64 (numel + 1 may wrap an int32 numel)
    byte = tl.load(w_ptr + j, mask=in_range, other=0)
    offset = load_offset(offset_ptr, NESTED)
    am = decode_absmax(absmax_ptr, nabs_ptr, ncode_ptr, offset, (2 * j) // BLOCKSIZE, in_range, NESTED)
    hi = tl.load(code_ptr + (byte >> 4).to(tl.int32)) * am
    lo = tl.load(code_ptr + (byte & 15).to(tl.int32)) * am
    vals = tl.interleave(cast_out(hi, OUT_DTYPE, MANUAL_BF16), cast_out(lo, OUT_DTYPE, MANUAL_BF16))
    idx = pid * (2 * BLOCK_BYTES) + tl.arange(0, 2 * BLOCK_BYTES)
    tl.store(out_ptr + idx, vals, mask=idx < numel)


@triton.jit
def _dequant_blocks_kernel(
    w_ptr, absmax_ptr, code_ptr, nabs_ptr, ncode_ptr, offset_ptr,  # W packed as int32 words
    out_ptr,  # [numel]
    n_blocks,
    NB: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, DECODE: tl.constexpr,
    OUT_DTYPE: tl.constexpr, MANUAL_BF16: tl.constexpr,
):
    """NB whole blocks per program: ``out[b, :] = level(codes[b, :]) * absmax[b]``."""
    WPB: tl.constexpr = BLOCKSIZE // 8  # words per block
    blk = tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB)  # [NB]
    ok = blk < n_blocks
    words = tl.load(w_ptr + blk[:, None] * WPB + tl.arange(0, WPB)[None, :], mask=ok[:, None], other=0)
    offset = load_offset(offset_ptr, NESTED)
    am = decode_absmax(absmax_ptr, nabs_ptr, ncode_ptr, offset, blk, ok, NESTED)  # [NB]: once per block
    if DECODE == "shfl":
        levels = decode8_shfl(words, lane_table(code_ptr, words))
    else:
        levels = decode8_table(words, code_ptr)
    vals = tl.reshape(levels, (NB, BLOCKSIZE)) * am[:, None]  # one float32 rounding per weight
    tl.store(out_ptr + blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :],
             cast_out(vals, OUT_DTYPE, MANUAL_BF16), mask=ok[:, None])


def dequant_config(numel: int, blocksize: int, device: torch.device) -> dict:
    """Whole blocks per program (about 2048 weights a program on the GPU; small in the interpreter)
    and the decoder. On the GPU each thread holds 4 words: 128-bit loads, 64-byte stores (bf16)."""
    if device.type != "cuda":
        return dict(NB=max(1, 2048 // blocksize), DECODE="table", num_warps=1)
    nb = max(1, 2048 // blocksize)
    return dict(NB=nb, DECODE="shfl", num_warps=max(1, min(8, nb * blocksize // 8 // 4 // 32)))


def dequantize_launch(data, absmax, code, nested_absmax, nested_code, offset, numel: int, blocksize: int,
                      dtype: torch.dtype) -> torch.Tensor:
    """Launch a dequantize kernel: returns a contiguous ``[numel]`` tensor of ``dtype``."""
    if dtype not in OUT_DTYPES:
        raise ValueError(f"dequantize dtype must be one of {OUT_DTYPES}, got {dtype}")
    out = torch.empty(numel, dtype=dtype, device=data.device)
    if numel == 0:
        return out
    nested = nested_absmax is not None
    if numel % blocksize == 0 and blocksize % 8 == 0 and data.data_ptr() % 4 == 0 and dtype != torch.float64:
        cfg = dequant_config(numel, blocksize, data.device)
        if cfg["DECODE"] != "table" and not verified(data.device, code):
            cfg["DECODE"] = "table"
        n_blocks = numel // blocksize
        with device_guard(data):
            _dequant_blocks_kernel[(cdiv(n_blocks, cfg["NB"]),)](
                data.reshape(-1).view(torch.int32), absmax, code,
                nested_absmax if nested else absmax, nested_code if nested else code, offset if nested else code,
                out, n_blocks, BLOCKSIZE=blocksize, NESTED=nested, OUT_DTYPE=tl_dtype(dtype),
                MANUAL_BF16=manual_bf16(dtype, interpreting()), enable_fp_fusion=False, **cfg)
        return out
    grid = (cdiv((numel + 1) // 2, BLOCK_BYTES),)
    with device_guard(data):
        _dequant_kernel[grid](
            data, absmax, code,
            nested_absmax if nested else absmax, nested_code if nested else code, offset if nested else code,
            out, numel,
            BLOCKSIZE=blocksize, NESTED=nested, BLOCK_BYTES=BLOCK_BYTES,
            OUT_DTYPE=tl_dtype(dtype), MANUAL_BF16=manual_bf16(dtype, interpreting()),
            enable_fp_fusion=False,  # keep the two absmax roundings separate (bit-exactness)
        )
    return out


@torch.library.custom_op("qlora::dequantize", mutates_args=())
def dequantize_op(
    data: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_absmax: Optional[torch.Tensor],
    nested_code: Optional[torch.Tensor],
    offset: Optional[torch.Tensor],
    numel: int,
    blocksize: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Flat ``[numel]`` dequantized weight; Triton or reference per ``kernels.dispatch``."""
    check_dequantize(data, absmax, code, nested_absmax, nested_code, offset, numel, blocksize, dtype)
    if use_triton(data):
        return dequantize_launch(data, absmax, code, nested_absmax, nested_code, offset, numel, blocksize, dtype)
    return reference.dequantize_packed(data, absmax, code, nested_absmax, nested_code, offset, numel,
                                       blocksize, dtype)


@dequantize_op.register_fake
def _(data, absmax, code, nested_absmax, nested_code, offset, numel, blocksize, dtype):
    return data.new_empty(numel, dtype=dtype)


def dequantize(qt, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Dequantize ``qt`` (a ``nf4.QuantizedTensor``) to a contiguous tensor of ``qt.shape``.

    Bit-identical to ``nf4.dequantize(qt, dtype)`` on every path.

    Raises:
        TypeError: ``qt`` is not a QuantizedTensor.
        ValueError: unsupported ``dtype`` or device.
    """
    check_quantized(qt)
    if dtype not in OUT_DTYPES:
        raise ValueError(f"dequantize dtype must be one of {OUT_DTYPES}, got {dtype}")
    flat = dequantize_op(*quant_state(qt), qt.numel, qt.blocksize, dtype)
    return flat.view(qt.shape)
