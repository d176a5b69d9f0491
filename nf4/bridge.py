"""A zero-copy bridge from bitsandbytes' 4-bit objects, by duck typing (bitsandbytes is never imported).

bitsandbytes keeps a 4-bit weight as a ``Params4bit`` (a tensor of packed codes) plus a
``QuantState`` with the fields read here:

    weight                 packed codes, [(n + 1) // 2, 1] uint8 (or the same bytes viewed as another
                           ``quant_storage`` dtype, e.g. [(n + 1) // 4, 1] bfloat16 for FSDP)
    quant_state.absmax     [nblocks] float32, or uint8 codes when double-quantized
    quant_state.code       float32[16], the levels (NF4 or FP4 table)
    quant_state.blocksize  elements per absmax block
    quant_state.quant_type 'nf4' or 'fp4'
    quant_state.dtype      the original dtype (float32 / float16 / bfloat16)
    quant_state.shape      the logical shape, e.g. torch.Size([N, K])
    quant_state.offset     0-d float32 mean of the original absmax (double quant only)
    quant_state.state2     None, or the nested state: .absmax float32 [ceil(nblocks / 256)],
                           .code float32[256] (the dynamic map), .blocksize 256

That is exactly ``nf4.QuantizedTensor``'s layout (``nf4.storage`` documents the same bytes on
disk), so ``from_bnb`` wraps these tensors without copying any of them: the result's ``data``,
``absmax``, ``code``, ``offset``, ``nested_absmax`` and ``nested_code`` share storage with
bitsandbytes' objects (``data_ptr`` equality is tested). Anything the kernels cannot read is
refused with an error naming the field: an 8-bit ``Int8Params``, a weight that bitsandbytes
has not quantized yet, missing or mistyped fields, a blocksize outside [32, 4096], a nested
blocksize other than 256, non-contiguous storage, tensors on different devices, and the
AVX512-BF16 CPU layout that bitsandbytes' ``Linear4bit`` switches a weight to in place on
its first inference forward on such CPUs (``quant_state.packing_format_for_cpu``).
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from .blockwise import BLOCKSIZES
from .tensor import FLOAT_DTYPES, NESTED_BLOCKSIZE, QuantizedTensor

__all__ = ["from_bnb", "QUANT_STATE_FIELDS"]

QUANT_STATE_FIELDS = ("absmax", "code", "blocksize", "quant_type", "dtype", "shape", "offset", "state2")
NESTED_FIELDS = ("absmax", "code", "blocksize")
BNB_QUANT_TYPES = ("nf4", "fp4")  # what bitsandbytes' 4-bit format stores (not our int4)
CODE_SIZE, NESTED_CODE_SIZE = 16, 256


def _field(state, name: str, where: str, expected: tuple[str, ...]):
    if not hasattr(state, name):
        raise TypeError(f"{where} has no field {name!r}; bitsandbytes' QuantState has {', '.join(expected)}")
    return getattr(state, name)


def _tensor(value, name: str, dtype: torch.dtype, numel: int, device: torch.device) -> torch.Tensor:
    """``value`` itself (a view at most), checked: a contiguous ``dtype`` tensor of ``numel`` on ``device``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {value.dtype}")
    if value.numel() != numel:
        raise ValueError(f"{name} must have {numel} elements, got {value.numel()} (shape {tuple(value.shape)})")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but the packed weight is on {device}")
    if not value.is_contiguous():
        raise ValueError(f"{name} must be contiguous (the kernels read it flat; sharing forbids a copy)")
    return value


def _int_field(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    return value


def _packed_bytes(weight: torch.Tensor, numel: int) -> torch.Tensor:
    """The packed codes as a ``[(numel + 1) // 2, 1]`` uint8 view of ``weight``'s storage."""
    data = weight.detach()  # a plain tensor on the same storage (a Parameter's .data)
    if data.dtype.is_complex or data.dtype == torch.bool:
        raise TypeError(f"packed weight must hold bytes (uint8 or a quant_storage dtype), got {data.dtype}")
    if not data.is_contiguous():
        raise ValueError("packed weight must be contiguous (sharing its storage forbids a copy)")
    if data.dtype != torch.uint8:  # bitsandbytes' quant_storage: the same bytes viewed as another dtype
        data = data.reshape(-1).view(torch.uint8)
    nbytes = (numel + 1) // 2
    if data.numel() != nbytes:
        raise ValueError(f"packed weight must hold {nbytes} bytes for {numel} elements, got {data.numel()} "
                         f"(shape {tuple(weight.shape)}, {weight.dtype})")
    return data.view(nbytes, 1)


def _shape(value) -> torch.Size:
    if not isinstance(value, (tuple, list, torch.Size)) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value):
        raise TypeError(f"quant_state.shape must be a sequence of non-negative ints, got {value!r}")
    return torch.Size(value)


def _offset(value, device: torch.device) -> torch.Tensor:
    """The 0-d float32 offset: bitsandbytes' tensor itself, or a new scalar for a plain number."""
    if isinstance(value, torch.Tensor):
        return _tensor(value, "quant_state.offset", torch.float32, 1, device)
    if isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value):
        return torch.tensor(float(value), dtype=torch.float32, device=device)
    raise TypeError(f"quant_state.offset must be a float32 scalar tensor for a double-quantized weight, got {value!r}")


def from_bnb(weight, quant_state=None):
    """Wrap a bitsandbytes 4-bit weight as an ``nf4.QuantizedTensor`` sharing its storage.

    Args:
        weight: a ``bitsandbytes.nn.Params4bit`` (its ``quant_state`` is used), or the packed
            tensor returned by ``bitsandbytes.functional.quantize_4bit`` with its ``quant_state``.
            Any object shaped like them works: bitsandbytes is not imported.
        quant_state: the state to use instead of ``weight.quant_state`` (e.g. the ``QuantState``
            that ``quantize_4bit`` returns, or ``Linear4bit.quant_state`` after FSDP dropped
            the one on the parameter).

    Returns:
        ``nf4.QuantizedTensor`` whose tensors are bitsandbytes' own (no copy, no re-quantization).

    Raises:
        TypeError: not a tensor, an 8-bit weight, no quant_state, or a missing / mistyped field.
        ValueError: a field with the wrong dtype, size, device or value (the message names it).
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor shaped like bitsandbytes' Params4bit, got "
                        f"{type(weight).__name__}")
    if hasattr(weight, "SCB") or hasattr(weight, "CB"):
        raise TypeError("weight is an 8-bit (LLM.int8, Int8Params) weight; only 4-bit Params4bit weights "
                        "(NF4 / FP4) can be read")
    state = getattr(weight, "quant_state", None) if quant_state is None else quant_state
    if state is None:
        raise TypeError(f"weight has no quant_state: a {type(weight).__name__} of {weight.dtype} "
                        f"{tuple(weight.shape)} is not a quantized bitsandbytes 4-bit weight (bitsandbytes quantizes "
                        "a Params4bit when it moves to its device; a bare packed tensor needs quant_state=)")
    if getattr(state, "packing_format_for_cpu", False):
        raise ValueError("quant_state.packing_format_for_cpu is set: bitsandbytes repacked this weight for its "
                         "AVX512-BF16 CPU kernel (row tiles, bf16 absmax), not its standard layout; call from_bnb "
                         "before the first inference forward of its Linear4bit")
    fields = {name: _field(state, name, "quant_state", QUANT_STATE_FIELDS)
              for name in QUANT_STATE_FIELDS}

    quant_type = fields["quant_type"]
    if quant_type not in BNB_QUANT_TYPES:
        raise ValueError(f"quant_state.quant_type must be one of {BNB_QUANT_TYPES}, got {quant_type!r}")
    blocksize = _int_field(fields["blocksize"], "quant_state.blocksize")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"quant_state.blocksize must be a power of two in [32, 4096], got {blocksize}")
    dtype = fields["dtype"]
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"quant_state.dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
    shape = _shape(fields["shape"])
    numel = math.prod(shape)
    nblocks = math.ceil(numel / blocksize)
    data = _packed_bytes(weight, numel)
    device = data.device
    if device.type == "meta":
        raise ValueError("weight is on the meta device: it holds no data to share")
    code = _tensor(fields["code"], "quant_state.code", torch.float32, CODE_SIZE, device)

    state2 = fields["state2"]
    nested_flag = getattr(state, "nested", None)
    if nested_flag is not None and bool(nested_flag) != (state2 is not None):
        raise ValueError(f"quant_state.nested={nested_flag!r} but quant_state.state2 is "
                         f"{'None' if state2 is None else 'set'}")
    if state2 is None:
        absmax = _tensor(fields["absmax"], "quant_state.absmax", torch.float32, nblocks, device)
        return QuantizedTensor(data=data, shape=shape, dtype=dtype, blocksize=blocksize, quant_type=quant_type,
                               code=code, absmax=absmax.view(nblocks))

    nested = {name: _field(state2, name, "quant_state.state2", NESTED_FIELDS) for name in NESTED_FIELDS}
    nested_blocksize = _int_field(nested["blocksize"], "quant_state.state2.blocksize")
    if nested_blocksize != NESTED_BLOCKSIZE:
        raise ValueError(f"quant_state.state2.blocksize must be {NESTED_BLOCKSIZE} (the nested absmax block the "
                         f"kernels read), got {nested_blocksize}")
    absmax = _tensor(fields["absmax"], "quant_state.absmax", torch.uint8, nblocks, device)
    nested_absmax = _tensor(nested["absmax"], "quant_state.state2.absmax", torch.float32,
                            math.ceil(nblocks / NESTED_BLOCKSIZE), device)
    nested_code = _tensor(nested["code"], "quant_state.state2.code", torch.float32, NESTED_CODE_SIZE, device)
    if fields["offset"] is None:
        raise ValueError("quant_state.offset is None but the weight is double-quantized (state2 is set)")
    return QuantizedTensor(
        data=data, shape=shape, dtype=dtype, blocksize=blocksize, quant_type=quant_type, code=code,
        absmax=absmax.view(nblocks), offset=_offset(fields["offset"], device),
        nested_absmax=nested_absmax.view(-1), nested_code=nested_code.view(NESTED_CODE_SIZE),
        nested_blocksize=NESTED_BLOCKSIZE,
    )
