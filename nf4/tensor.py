"""``QuantizedTensor`` and the inverse pair ``quantize`` / ``dequantize``.

W: any shape, n elements  ->  packed codes ``[(n + 1) // 2, 1]`` uint8 + absmax state.

Without double quantization the state is ``absmax: [nblocks]`` float32 (4 + 32/64 = 4.5 bits
per weight at blocksize 64). With it (the QLoRA default) absmax is itself quantized:
``offset = mean(absmax)``; ``absmax - offset`` is 8-bit quantized with the signed dynamic map
in blocks of 256, each with a float32 ``nested_absmax``. Dequantization then is

    absmax[b] = nested_code[q_absmax[b]] * nested_absmax[b // 256] + offset   (two roundings)
    w[i]      = code[q[i]] * absmax[i // blocksize]                         (one rounding)

computed in float32 and cast once to the output dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from . import _cpu_decode
from .blockwise import (
    block_absmax,
    check_blocksize,
    codes_from_scaled,
    dequantize_blockwise_8bit,
    pack_nibbles,
    quantize_blockwise_8bit,
    scale_blocks,
)
from .codebooks import QUANT_TYPES, dynamic_map, get_codebook

__all__ = ["QuantizedTensor", "quantize", "dequantize", "decode_packed", "DEFAULT_CHUNK_ELEMENTS"]

NESTED_BLOCKSIZE = 256  # QLoRA Sec. 3: absmax constants are quantized in blocks of 256
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Elements quantized per chunk: bounds the float32 temporaries to a few x 16 MiB whatever the
# tensor size (a 128256 x 4096 weight needs ~0.28x its bf16 size of extra memory).
DEFAULT_CHUNK_ELEMENTS = 1 << 22
_TENSOR_FIELDS = ("data", "code", "absmax", "offset", "nested_absmax", "nested_code")


@dataclass
class QuantizedTensor:
    """A blockwise 4-bit tensor in bitsandbytes' layout.

    Attributes:
        data: packed codes, ``[(n + 1) // 2, 1]`` uint8; element 2j in the high nibble.
        shape: the logical shape of the original tensor.
        dtype: the original floating dtype (the default for ``dequantize``).
        blocksize: elements per absmax block.
        quant_type: 'nf4', 'fp4' or 'int4'.
        code: the 16 float32 levels.
        absmax: ``[nblocks]`` float32, or uint8 codes when double-quantized.
        offset: 0-d float32 (double quant only): mean of the original absmax.
        nested_absmax: ``[ceil(nblocks / 256)]`` float32 (double quant only).
        nested_code: the 256-entry dynamic map (double quant only).
        nested_blocksize: 256.
    """

    data: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    code: torch.Tensor
    absmax: torch.Tensor
    offset: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE
    _absmax_cache: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.shape = torch.Size(self.shape)
        self.validate()

    # ---- invariants -------------------------------------------------------------------
    def validate(self) -> None:
        """Check every field against the others; raise ``ValueError`` naming the bad one."""
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        check_blocksize(self.blocksize)
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {self.dtype}")
        n = self.numel
        if self.data.dtype != torch.uint8 or self.data.numel() != (n + 1) // 2:
            raise ValueError(
                f"data must be {(n + 1) // 2} uint8 bytes for shape {tuple(self.shape)}, got "
                f"{self.data.numel()} {self.data.dtype}"
            )
        if self.code.dtype != torch.float32 or self.code.numel() != 16:
            raise ValueError(f"code must be 16 float32 levels, got {self.code.numel()} {self.code.dtype}")
        nblocks = self.num_blocks
        if self.absmax.numel() != nblocks:
            raise ValueError(f"absmax must have {nblocks} entries (one per block), got {self.absmax.numel()}")
        if self.nested:
            if self.absmax.dtype != torch.uint8:
                raise ValueError(f"nested absmax must be uint8 codes, got {self.absmax.dtype}")
            if self.nested_blocksize != NESTED_BLOCKSIZE:
                raise ValueError(f"nested_blocksize must be {NESTED_BLOCKSIZE}, got {self.nested_blocksize}")
            n2 = math.ceil(nblocks / self.nested_blocksize)
            if self.nested_absmax is None or self.nested_absmax.numel() != n2:
                got = None if self.nested_absmax is None else self.nested_absmax.numel()
                raise ValueError(f"nested_absmax must have {n2} entries, got {got}")
            if self.nested_absmax.dtype != torch.float32:
                raise ValueError(f"nested_absmax must be float32, got {self.nested_absmax.dtype}")
            if self.nested_code is None or self.nested_code.numel() != 256 or self.nested_code.dtype != torch.float32:
                raise ValueError("nested_code must be 256 float32 values")
            if self.offset.numel() != 1:
                raise ValueError(f"offset must be a scalar, got shape {tuple(self.offset.shape)}")
        else:
            if self.absmax.dtype != torch.float32:
                raise ValueError(f"absmax must be float32 without double quant, got {self.absmax.dtype}")
            if self.nested_absmax is not None or self.nested_code is not None:
                raise ValueError("nested_absmax / nested_code given without an offset")

    # ---- properties -------------------------------------------------------------------
    @property
    def nested(self) -> bool:
        """True when the absmax constants are double-quantized."""
        return self.offset is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.numel / self.blocksize)

    @property
    def device(self) -> torch.device:
        return self.data.device

    def nbytes(self) -> int:
        """Bytes of storage: packed codes plus all quantization state."""
        parts = [self.data, self.absmax, self.code]
        if self.nested:
            parts += [self.nested_absmax, self.nested_code, self.offset]
        return sum(t.numel() * t.element_size() for t in parts)

    def bits_per_parameter(self) -> float:
        """Storage bits per weight, excluding the constant-size tables (code maps, offset).

        Without double quant:  4 + 32 / blocksize                 (= 4.5 at 64)
        With double quant:     4 + 8 / blocksize + 32 / (blocksize * 256)
                               (= 4.127 at 64/256: QLoRA saves 32/64 - 8/64 - 32/16384
                               = 0.373 bits per parameter)
        Computed from the actual tensor sizes, so partial blocks and padding count.
        """
        n = self.numel
        if n == 0:
            return 0.0
        bits = self.data.numel() * 8 + self.absmax.numel() * self.absmax.element_size() * 8
        if self.nested:
            bits += self.nested_absmax.numel() * 32
        return bits / n

    # ---- conversions ------------------------------------------------------------------
    def to(self, device: torch.device | str) -> "QuantizedTensor":
        """Move every tensor to ``device``. The data stay quantized."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(
            self,
            data=move(self.data),
            code=move(self.code),
            absmax=move(self.absmax),
            offset=move(self.offset),
            nested_absmax=move(self.nested_absmax),
            nested_code=move(self.nested_code),
            _absmax_cache=None,
        )

    def dequantize_absmax(self) -> torch.Tensor:
        """Per-block float32 scales ``[nblocks]`` (decodes the nested absmax when present)."""
        if not self.nested:
            return self.absmax
        vals = dequantize_blockwise_8bit(self.absmax, self.nested_absmax, self.nested_code, self.nested_blocksize)
        return vals + self.offset  # a second, separate float32 rounding, as bitsandbytes does

    def dequantize(self, dtype: torch.dtype | None = None, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """The reference dequantization: a tensor of ``shape`` in ``dtype`` (default: original),
        written into ``out`` when given (see ``nf4.dequantize``)."""
        return dequantize(self, dtype, out=out)

    def to_bnb_state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """The tensors bitsandbytes + transformers write for a Linear4bit weight."""
        from .storage import to_bnb_state_dict

        return to_bnb_state_dict(self, prefix)

    @classmethod
    def from_bnb_state_dict(cls, sd: dict[str, torch.Tensor], prefix: str = "weight") -> "QuantizedTensor":
        """Inverse of ``to_bnb_state_dict``; validates every field."""
        from .storage import from_bnb_state_dict

        return from_bnb_state_dict(sd, prefix)

    @classmethod
    def from_bnb(cls, weight, quant_state=None) -> "QuantizedTensor":
        """Wrap a bitsandbytes ``Params4bit`` (or packed tensor + ``QuantState``) without copying:
        the result shares every tensor with it. Duck-typed; see ``nf4.bridge.from_bnb``."""
        from .bridge import from_bnb

        return from_bnb(weight, quant_state)

    # ---- value semantics -----------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        """Same format (shape, dtype, blocksize, quant_type, nesting) and ``torch.equal`` on every
        tensor, nested state included. Tensors on different devices make different values
        (``torch.equal`` refuses to compare them). Returns a ``bool``, never a tensor."""
        if not isinstance(other, QuantizedTensor):
            return NotImplemented
        fmt = ("shape", "dtype", "blocksize", "quant_type", "nested_blocksize", "nested")
        if any(getattr(self, f) != getattr(other, f) for f in fmt):
            return False
        for name in _TENSOR_FIELDS:
            a, b = getattr(self, name), getattr(other, name)
            if (a is None) != (b is None):
                return False
            if a is not None and (a.device != b.device or a.dtype != b.dtype or not torch.equal(a, b)):
                return False
        return True

    __hash__ = None  # mutable tensors inside: not hashable (as torch.Tensor's value semantics would need)

    def __copy__(self) -> "QuantizedTensor":
        """A new object sharing every tensor (storage) with this one."""
        return replace(self, _absmax_cache=self._absmax_cache)

    def __deepcopy__(self, memo: dict) -> "QuantizedTensor":
        """A new object with its own copy of every tensor (``copy.deepcopy`` of each)."""
        import copy

        fields = {name: copy.deepcopy(getattr(self, name), memo) for name in _TENSOR_FIELDS}
        out = replace(self, _absmax_cache=None, **fields)
        memo[id(self)] = out
        return out

    def __getstate__(self) -> dict:
        """Pickle state: every field but the derived absmax cache (rebuilt on demand)."""
        state = dict(self.__dict__)
        state["_absmax_cache"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.validate()  # an unpickled object obeys the same invariants as a constructed one

    def __repr__(self) -> str:
        dq = f", double_quant(nested_blocksize={self.nested_blocksize})" if self.nested else ""
        return (
            f"QuantizedTensor(shape={tuple(self.shape)}, dtype={self.dtype}, quant_type={self.quant_type!r}, "
            f"blocksize={self.blocksize}{dq}, device={self.device}, bits/param={self.bits_per_parameter():.4f})"
        )


def _check_input(w: torch.Tensor) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(w).__name__}")
    if not w.dtype.is_floating_point:
        raise TypeError(f"quantize needs a floating tensor (float32/float16/bfloat16), got {w.dtype}")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"quantize supports float32/float16/bfloat16, got {w.dtype}")


def _first_nonfinite(chunk: torch.Tensor, start: int) -> None:
    if not bool(torch.isfinite(chunk).all()):
        bad = int(torch.nonzero(~torch.isfinite(chunk))[0, 0]) + start
        raise ValueError(f"input has a non-finite value ({chunk[bad - start].item()}) at flat index {bad}")


def quantize(
    w: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    *,
    check_finite: bool = True,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    nested_rounding: str = "lut16",
) -> QuantizedTensor:
    """Blockwise 4-bit quantization of ``w`` (any shape, float32/float16/bfloat16, any device).

    The tensor is processed in chunks of ``chunk_elements`` (rounded down to whole blocks), so
    the float32 temporaries stay small whatever the tensor size.

    Args:
        w: the tensor; non-contiguous inputs are read in row-major order.
        quant_type: 'nf4' (default), 'fp4' or 'int4'.
        blocksize: elements per absmax block, a power of two in [32, 4096].
        double_quant: quantize the absmax constants too (QLoRA's double quantization).
        check_finite: raise on NaN/Inf (default). Off, a NaN input gives undefined codes.
        chunk_elements: elements per chunk.
        nested_rounding: rounding of the 8-bit absmax codes, 'lut16' (bitsandbytes' CPU
            kernel, bit-exact) or 'nearest'. See ``nf4.blockwise``.

    Raises:
        TypeError: for a non-tensor, integer or bool input.
        ValueError: for a bad quant_type or blocksize, or a non-finite value (naming its index).
    """
    _check_input(w)
    code = get_codebook(quant_type)
    check_blocksize(blocksize)
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be positive, got {chunk_elements}")
    device = w.device
    flat_in = w.reshape(-1)  # a view when contiguous; one copy otherwise
    n = flat_in.numel()
    nblocks = math.ceil(n / blocksize)
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=device)
    absmax = torch.empty(nblocks, dtype=torch.float32, device=device)
    code_dev = code.to(device)
    step = max(blocksize, chunk_elements - chunk_elements % blocksize)  # whole, even-sized blocks
    for start in range(0, n, step):
        chunk = flat_in[start : start + step].float()
        if check_finite:
            _first_nonfinite(chunk, start)
        b0 = start // blocksize
        am = block_absmax(chunk, blocksize)
        absmax[b0 : b0 + am.numel()] = am
        scaled = scale_blocks(chunk, am, blocksize)
        if scaled.numel() % 2:  # odd total size: the pad element is a quantized 0.0
            scaled = torch.cat([scaled, scaled.new_zeros(1)])
        codes = codes_from_scaled(scaled, code_dev)
        packed[start // 2 : start // 2 + (codes.numel() + 1) // 2, 0] = pack_nibbles(codes)
    if not double_quant:
        return QuantizedTensor(packed, w.shape, w.dtype, blocksize, quant_type, code_dev, absmax)
    offset = absmax.mean() if nblocks else torch.zeros((), device=device)
    nested_code = dynamic_map(signed=True).to(device)
    qabsmax, absmax2 = quantize_blockwise_8bit(absmax - offset, nested_code, NESTED_BLOCKSIZE, nested_rounding)
    return QuantizedTensor(
        packed, w.shape, w.dtype, blocksize, quant_type, code_dev, qabsmax,
        offset=offset, nested_absmax=absmax2, nested_code=nested_code,
    )


def _decode_blocks(packed: torch.Tensor, absmax: torch.Tensor, pairs: torch.Tensor, bs: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """Whole blocks: packed ``[nb * bs / 2]`` uint8, absmax ``[nb]`` -> ``[nb * bs]`` in dtype.

    ``pairs[b] = (code[b >> 4], code[b & 15])``: one gather per byte, one float32 product per
    element (a single rounding), one cast.
    """
    vals = pairs[packed.long()].view(-1, bs)
    return (vals * absmax[:, None]).to(dtype).view(-1)


def _pair_table(code: torch.Tensor) -> torch.Tensor:
    byte = torch.arange(256, device=code.device)
    return torch.stack([code[byte >> 4], code[byte & 15]], dim=1).contiguous()


def _decode_chunks(packed: torch.Tensor, absmax: torch.Tensor, pairs: torch.Tensor, bs: int, out: torch.Tensor,
                   chunk_elements: int) -> None:
    """The eager path: ``out`` ([whole blocks]) decoded ``chunk_elements`` at a time."""
    full = out.numel()
    step = max(bs, chunk_elements - chunk_elements % bs)
    for start in range(0, full, step):
        stop = min(full, start + step)
        out[start:stop] = _decode_blocks(packed[start // 2 : stop // 2], absmax[start // bs : stop // bs],
                                         pairs, bs, out.dtype)


def _check_out(out: torch.Tensor, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.dtype != dtype or out.device != device or out.numel() != n or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of {n} elements on {device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}"
                         f"{'' if out.is_contiguous() else ' (not contiguous)'}")
    if out.requires_grad:
        raise ValueError("out must not require grad (dequantize writes it in place)")
    if out.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError("out is an inference tensor: it can be written only inside torch.inference_mode()")
    return out.view(-1)


def decode_packed(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, numel: int, blocksize: int,
                  dtype: torch.dtype, *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """The dequantization arithmetic on raw state: ``[numel]`` in ``dtype``.

    packed: ``[(numel + 1) // 2]`` uint8 (any shape, read flat); absmax: ``[nblocks]`` float32
    (already decoded when double-quantized); code: float32[16]. Each value is
    ``code[q] * absmax[i // blocksize]`` rounded once in float32, then cast once to ``dtype``
    (float64 is allowed as an output, for gradient checks: the cast is exact). ``out``: a
    contiguous tensor of ``numel`` elements in ``dtype`` to write into (returned flat).
    """
    out_dtypes = FLOAT_DTYPES + (torch.float64,)
    if dtype not in out_dtypes:
        raise ValueError(f"dtype must be one of {out_dtypes}, got {dtype}")
    n, bs, device = numel, blocksize, packed.device
    out = _cpu_decode.empty(n, dtype, device) if out is None else _check_out(out, n, dtype, device)
    if n == 0:
        return out
    packed = packed.reshape(-1)
    full = n - n % bs
    nfull = full // bs
    done = full and _cpu_decode.decode_full_blocks(packed[: full // 2], absmax[:nfull], code, bs, out[:full])
    pairs = _pair_table(code) if (done is not True or full < n) else None  # the eager paths' table
    if done is not True:
        _decode_chunks(packed, absmax, pairs, bs, out[:full], chunk_elements)
        if isinstance(done, Exception):  # the eager path worked where the compiled one raised
            _cpu_decode.disable()
    if full < n:  # the partial last block: decode its (padded) bytes, keep n - full values
        tail = pairs[packed[full // 2 :].long()].view(-1)[: n - full]
        out[full:] = (tail * absmax[nfull]).to(dtype)
    return out


def dequantize(
    qt: QuantizedTensor, dtype: torch.dtype | None = None, *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference dequantization: ``code[q] * absmax[block]`` in float32, cast once to ``dtype``.

    Returns a contiguous tensor of ``qt.shape`` on ``qt.device`` (``out``, reshaped, when given:
    contiguous, ``qt.numel`` elements of ``dtype`` on ``qt.device``). On CPU, whole blocks go
    through a compiled copy of the same arithmetic (``nf4._cpu_decode``, bit-identical) into an
    output from its cache of large buffers; otherwise they are decoded in chunks.

    Raises:
        ValueError: ``dtype`` is not a float type, or ``out`` does not fit.
    """
    dtype = qt.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype}")
    flat = decode_packed(qt.data, qt.dequantize_absmax(), qt.code, qt.numel, qt.blocksize, dtype,
                         chunk_elements=chunk_elements, out=out)
    return flat.view(qt.shape)
