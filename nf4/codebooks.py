"""Codebooks: every 4-bit table and the 8-bit dynamic map, built from their definitions.

A codebook is a 1-D float32 tensor of quantization levels in [-1, 1]. A block of weights
is scaled by ``1/absmax`` into [-1, 1] and each value is replaced by the index of its
nearest level (see ``nf4.blockwise``).

Sources
-------
- NF4: Dettmers et al., "QLoRA" (2023), Sec. 3 and Appendix E; bitsandbytes
  ``create_normal_map``. Levels are quantiles of N(0, 1), made asymmetric so that 0 is exact.
- FP4: bitsandbytes' 4-bit float (1 sign, 2 exponent, 1 mantissa bit), in its code order.
- dynamic map: Dettmers et al., "8-bit Optimizers via Block-wise Quantization" (2022):
  dynamic tree quantization, used for double-quantized absmax and 8-bit optimizer state.
"""

from __future__ import annotations

import torch

__all__ = [
    "NF4_OFFSET",
    "normal_float_codebook",
    "fp4_codebook",
    "int4_codebook",
    "dynamic_map",
    "NF4",
    "FP4",
    "INT4",
    "QUANT_TYPES",
    "get_codebook",
]

# QLoRA, Appendix E / bitsandbytes create_normal_map: the outermost quantile is chosen as
# offset = 1/2 * (1/(2*15) + 1/(2*16)) away from 1, i.e. 1 - 0.0322917 = 0.9677083.
NF4_OFFSET = 0.9677083


def normal_float_codebook(bits: int = 4, offset: float = NF4_OFFSET) -> torch.Tensor:
    """NormalFloat-k levels: ``2**(bits-1)`` positive, ``2**(bits-1) - 1`` negative, and 0.

    positive = Phi^-1(linspace(offset, 0.5, 2**(bits-1) + 1)[:-1])
    negative = -Phi^-1(linspace(offset, 0.5, 2**(bits-1))[:-1])
    levels   = sort(positive ++ [0] ++ negative) / max

    The quantile grid is made in float32 (``torch.linspace``'s default) and the levels are
    normalised in float32; for ``bits=4`` this reproduces bitsandbytes' NF4 table bit for bit.

    Args:
        bits: 2..8. Returns a float32 tensor of ``2**bits`` sorted levels in [-1, 1].
        offset: the outermost quantile, in (0.5, 1).

    Raises:
        ValueError: on a bits value outside 2..8 or an offset outside (0.5, 1).
    """
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in [2, 8], got {bits!r}")
    if not 0.5 < float(offset) < 1.0:
        raise ValueError(f"offset must be in (0.5, 1), got {offset!r}")
    from scipy.stats import norm  # scipy is a runtime dependency; imported lazily

    half = 2 ** (bits - 1)
    pos = norm.ppf(torch.linspace(offset, 0.5, half + 1)[:-1].numpy())
    neg = -norm.ppf(torch.linspace(offset, 0.5, half)[:-1].numpy())
    values = torch.tensor([*pos.tolist(), 0.0, *neg.tolist()], dtype=torch.float32)
    values = values.sort().values
    return values / values.max()


def fp4_codebook() -> torch.Tensor:
    """bitsandbytes' FP4 (E2M1 with its own bias) in code order.

    Bit 3 is the sign; codes 0..7 are ``0, 1/192, 2/3, 1, 1/3, 1/2, 1/6, 1/4`` (already
    divided by the format's max, 6) and codes 8..15 are their negations. bitsandbytes
    stores code 8 as +0.0, and so do we.
    """
    pos = torch.tensor([0.0, 1 / 192, 2 / 3, 1.0, 1 / 3, 1 / 2, 1 / 6, 1 / 4], dtype=torch.float64)
    neg = -pos
    neg[0] = 0.0  # code 8 is +0.0 in bitsandbytes' table
    return torch.cat([pos, neg]).to(torch.float32)


def int4_codebook() -> torch.Tensor:
    """Uniform symmetric 4-bit integer grid with an exact zero: ``k/7`` for k = -7..7.

    That is 15 levels; the 16th code (-8/7 clipped to -1) duplicates -1 so the table stays
    16 wide and sorted. It is the "Int4" baseline of the QLoRA paper (absmax round-to-nearest).
    """
    levels = torch.arange(-7, 8, dtype=torch.float64) / 7.0
    return torch.cat([levels[:1], levels]).to(torch.float32)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """Dynamic tree quantization map (256 float32 values, sorted).

    For i in 0..max_exponent_bits-1, the midpoints of ``linspace(0.1, 1, n_i + 1)`` scaled by
    ``10**(i - (max_exponent_bits - 1))``, with ``n_i = 2**i`` (signed, both signs added) or
    ``2**(i+1)`` (unsigned: no sign bit, so twice the values per decade); plus 0 and 1.0.
    Signed: from -0.99296875 to 1.0, smallest magnitude 5.5e-7.
    """
    if total_bits != 8 or not 1 <= max_exponent_bits <= 7:
        raise ValueError(
            f"only total_bits=8 with max_exponent_bits in [1, 7] is supported, got "
            f"total_bits={total_bits}, max_exponent_bits={max_exponent_bits}"
        )
    non_sign_bits = total_bits - 1
    additional = 2 ** (non_sign_bits - max_exponent_bits) - 1
    data: list[float] = []

    def decade(i: int, items: int) -> None:
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scaled = (10 ** (-(max_exponent_bits - 1) + i)) * means  # float32 arithmetic
        data.extend(scaled.tolist())
        if signed:
            data.extend((-scaled).tolist())

    for i in range(max_exponent_bits):
        shift = i + non_sign_bits - max_exponent_bits
        decade(i, 2**shift + 1 if signed else 2 ** (shift + 1) + 1)
    if additional > 0:
        decade(max_exponent_bits - 1, additional + 1)
    data += [0.0, 1.0]
    data += [0.0] * (2**total_bits - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


NF4 = normal_float_codebook(4)
FP4 = fp4_codebook()
INT4 = int4_codebook()

QUANT_TYPES = ("nf4", "fp4", "int4")


def get_codebook(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16-entry float32 table for ``quant_type`` ('nf4', 'fp4' or 'int4')."""
    tables = {"nf4": NF4, "fp4": FP4, "int4": INT4}
    if quant_type not in tables:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    table = tables[quant_type]
    return table if device is None else table.to(device)
