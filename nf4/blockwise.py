"""Blockwise absmax quantization: the reference math, in plain PyTorch, on any device.

Layout (bitsandbytes' format, see ../shared/NOTES.md §1):
- the tensor is flattened row-major and cut into contiguous blocks of ``blocksize`` elements
  (blocks cross row ends); the last, partial block has its own absmax;
- absmax is float32; values are scaled by multiplying with ``1/absmax`` (the partial last
  block divides instead, as bitsandbytes does) and clamped to [-1, 1];
- 4-bit codes are the index of the nearest codebook level; thresholds are midpoints between
  sorted neighbours and the test is strict (``x > t``), so a tie goes to the lower level;
- two 4-bit codes per byte: element 2j in the high nibble, 2j+1 in the low nibble.

The 8-bit quantizer used for double quantization (``quantize_blockwise_8bit``) has two
rounding rules. ``"lut16"`` reproduces bitsandbytes' CPU kernel bit for bit: it looks the
scaled value up in a 65536-entry table, ``k = trunc((z + 1) * 32767.5 + 0.5)`` in float32, and
entry k holds the level nearest to ``k / 32767.5 - 1`` (measured against bitsandbytes 0.50.2 on
CPU: 0 mismatches in 5M values). ``"nearest"`` is exact round-to-nearest. The two differ only
where z lies within 1.5e-5 of a midpoint (about 0.1% of absmax codes); the absmax error from
"lut16" exceeds that of "nearest" by at most 3.1e-5 x absmax2.
"""

from __future__ import annotations

import functools

import torch

from ._compiled import compiled, plain_eager

__all__ = [
    "BLOCKSIZES",
    "check_blocksize",
    "block_absmax",
    "scale_blocks",
    "codes_from_scaled",
    "pack_nibbles",
    "unpack_nibbles",
    "quantize_blockwise_8bit",
    "dequantize_blockwise_8bit",
]

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_TINY = 1e-38  # bitsandbytes clamps absmax from below before taking the reciprocal


def check_blocksize(blocksize: int) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be a power of two in [32, 4096], got {blocksize!r}")
    return blocksize


def block_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """absmax of each block of a 1-D float32 tensor: ``[ceil(n / blocksize)]`` float32."""
    n = flat.numel()
    full = n - n % blocksize
    absmax = flat[:full].view(-1, blocksize).abs().amax(dim=1)
    if full < n:
        absmax = torch.cat([absmax, flat[full:].abs().amax().view(1)])
    return absmax


def scale_blocks(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``clamp(x / absmax_block, -1, 1)`` for a 1-D float32 tensor, bitsandbytes' way.

    Full blocks multiply by the float32 reciprocal ``1/max(absmax, 1e-38)``; the partial last
    block divides by it. An all-zero block scales to zeros.
    """
    n = flat.numel()
    full = n - n % blocksize
    nfull = full // blocksize
    safe = absmax.clamp(min=_TINY)
    scaled = (flat[:full].view(nfull, blocksize) * (1.0 / safe[:nfull]).view(-1, 1)).view(-1)
    if full < n:
        scaled = torch.cat([scaled, flat[full:] / safe[nfull]])
    return scaled.clamp_(-1.0, 1.0)


@functools.lru_cache(maxsize=32)
def _thresholds(code_key: tuple[float, ...], device: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    code = torch.tensor(code_key, dtype=torch.float32)
    order = torch.argsort(code, stable=True)
    srt = code[order]
    mids = (srt[:-1] + srt[1:]) / 2
    identity = bool(torch.equal(order, torch.arange(code.numel())))
    return mids.to(device), (None if identity else order.to(torch.uint8).to(device))


def codes_from_scaled(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level of ``code`` for each value in [-1, 1]; ties go lower.

    ``code`` need not be sorted (FP4 is not): the search runs over the sorted levels and the
    result is mapped back to code order. Returns uint8 codes of ``scaled``'s shape.
    The index is ``#(midpoints < x)``: ``torch.bucketize`` in general, and on large CPU
    inputs a compiled, vectorized count of the same comparisons (identical results, tested).
    """
    key = tuple(code.detach().cpu().tolist())
    mids, order = _thresholds(key, str(scaled.device))
    idx = _count_below(scaled, mids)
    if order is not None:
        return order[idx.long()]
    return idx


_PIECE = 1 << 20  # elements per compiled call: one static shape, so one compile per codebook
_COUNTERS: dict[tuple[float, ...], object] = {}


def _counter(mids_key: tuple[float, ...]):
    """``x -> #(mids < x)`` as uint8 through torch.compile (CPU), or None when unavailable."""
    def count(x: torch.Tensor) -> torch.Tensor:
        idx = torch.zeros_like(x, dtype=torch.int32)
        for m in mids_key:  # constants baked into one fused, vectorized loop
            idx = idx + (x > m).to(torch.int32)
        return idx.to(torch.uint8)

    return compiled(_COUNTERS, mids_key, count, dynamic=False)


def _count_below(scaled: torch.Tensor, mids: torch.Tensor) -> torch.Tensor:
    flat = scaled.reshape(-1)
    n = flat.numel()
    full = n - n % _PIECE
    fn = None
    if full and plain_eager(scaled):
        fn = _counter(tuple(mids.tolist()))
    if fn is None:
        return torch.bucketize(scaled, mids, out_int32=True).to(torch.uint8)
    out = torch.empty(n, dtype=torch.uint8)
    try:
        for start in range(0, full, _PIECE):
            out[start : start + _PIECE] = fn(flat[start : start + _PIECE])
    except Exception:  # noqa: BLE001 - compiler failure at run time: bucketize from now on
        _COUNTERS[tuple(mids.tolist())] = None
        return torch.bucketize(scaled, mids, out_int32=True).to(torch.uint8)
    if full < n:
        out[full:] = torch.bucketize(flat[full:], mids, out_int32=True).to(torch.uint8)
    return out.view(scaled.shape)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[n]`` (n even: pad odd sizes first) -> bytes ``[n // 2]``; element 2j high."""
    if codes.numel() % 2:
        raise ValueError(f"pack_nibbles needs an even number of codes, got {codes.numel()}")
    pairs = codes.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of ``pack_nibbles``: packed uint8 bytes -> the first ``n`` codes (int64)."""
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0x0F], dim=1).view(-1)
    return codes[:n].long()


@functools.lru_cache(maxsize=8)
def _lut16(code_key: tuple[float, ...], device: str) -> torch.Tensor:
    code = torch.tensor(code_key, dtype=torch.float64)  # sorted 256-entry map
    rep = torch.arange(65536, dtype=torch.float64) / 32767.5 - 1.0
    # nearest level to each bin's representative value; a tie goes to the lower level
    lut = torch.bucketize(rep, (code[:-1] + code[1:]) / 2)
    return lut.to(torch.uint8).to(device)


def quantize_blockwise_8bit(
    x: torch.Tensor, code: torch.Tensor, blocksize: int = 256, rounding: str = "lut16"
) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of a 1-D tensor with a 256-entry sorted map.

    Returns ``(codes uint8 [n], absmax float32 [ceil(n / blocksize)])``. See the module
    docstring for the two rounding rules.
    """
    if rounding not in ("lut16", "nearest"):
        raise ValueError(f"rounding must be 'lut16' or 'nearest', got {rounding!r}")
    flat = x.reshape(-1).float()
    absmax = block_absmax(flat, blocksize)
    if flat.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=x.device), absmax
    scaled = scale_blocks(flat, absmax, blocksize)
    if rounding == "nearest":
        return codes_from_scaled(scaled, code), absmax
    lut = _lut16(tuple(code.detach().cpu().tolist()), str(x.device))
    k = ((scaled + 1.0) * 32767.5 + 0.5).to(torch.int32).clamp_(0, 65535)  # float32, truncation
    codes = lut[k.long()]
    # bitsandbytes' CPU kernel gives an all-zero block code 0 (it decodes to 0 * level = 0)
    zero_blocks = (absmax == 0).repeat_interleave(blocksize)[: codes.numel()]
    return codes.masked_fill_(zero_blocks, 0), absmax


def dequantize_blockwise_8bit(
    codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int = 256
) -> torch.Tensor:
    """``code[q] * absmax[i // blocksize]`` in float32, one rounding: ``[n]`` float32."""
    n = codes.numel()
    vals = code.to(codes.device)[codes.reshape(-1).long()]
    full = n - n % blocksize
    out = torch.empty(n, dtype=torch.float32, device=codes.device)
    out[:full] = (vals[:full].view(-1, blocksize) * absmax[: full // blocksize, None]).view(-1)
    if full < n:
        out[full:] = vals[full:] * absmax[full // blocksize]
    return out
