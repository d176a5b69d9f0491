"""The argument contract of the ``torch.ops.qlora.*`` ops, checked (docs/kernels.md states it).

The raw ops are a public API for other frameworks: they take plain tensors, and a wrong size,
dtype, device or layout must fail with a message naming the argument, before any kernel reads
memory out of bounds. Each op calls its ``check_*`` first; the checks read only metadata (no
device data, no host-device synchronisation), so they are CUDA-graph safe.

The quantized weight ``W: [n, k]`` (``numel = n * k`` elements, blocks of ``blocksize``,
``nblocks = ceil(numel / blocksize)``) travels as

    data           uint8    [(numel + 1) // 2] (any shape, contiguous)  element 2j: high nibble
    absmax         float32  [nblocks], or uint8 codes [nblocks] when double-quantized
    code           float32  [16]       the levels (NF4, FP4, or any table)
    nested_absmax  float32  [ceil(nblocks / 256)]    } all three given (double quantization)
    nested_code    float32  [256]                    } or all three None
    offset         float32  one element              }
"""

from __future__ import annotations

import math
import weakref

import torch

from nf4.blockwise import BLOCKSIZES

from .state import NESTED_BLOCKSIZE

__all__ = ["check_quant_state", "check_dequantize", "check_nf4_linear", "check_nf4_linear_dx", "check_dropout",
           "ACT_DTYPES", "OUT_DTYPES"]

ACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)  # float64: reference path only
OUT_DTYPES = ACT_DTYPES


def _fail(op: str, msg: str, kind=ValueError):
    raise kind(f"qlora::{op}: {msg}")


def _flat(op: str, name: str, t, dtype: torch.dtype, numel: int, device: torch.device) -> None:
    """``t`` is a contiguous ``dtype`` tensor of ``numel`` elements on ``device`` (read flat)."""
    if (isinstance(t, torch.Tensor) and t.dtype is dtype and t.numel() == numel and t.is_contiguous()
            and t.device == device):
        return  # the common case, in one expression: these checks run on every op call
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{name} must be a Tensor, got {type(t).__name__}", TypeError)
    if t.dtype != dtype:
        _fail(op, f"{name} must be {dtype}, got {t.dtype}", TypeError)
    if t.numel() != numel:
        _fail(op, f"{name} must have {numel} elements, got {t.numel()} (shape {tuple(t.shape)})")
    if t.device != device:
        _fail(op, f"{name} is on {t.device}, expected {device}")
    _fail(op, f"{name} must be contiguous (it is read as a flat array)")


def _matrix(op: str, name: str, t, rows: int | None, cols: int | None, dtypes, device: torch.device) -> None:
    """``t`` is a 2-D tensor of one of ``dtypes`` on ``device`` (any strides); None dims are free."""
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{name} must be a Tensor, got {type(t).__name__}", TypeError)
    shape = t.shape
    if (t.dtype in dtypes and len(shape) == 2 and (rows is None or shape[0] == rows)
            and (cols is None or shape[1] == cols) and (device is None or t.device == device)):
        return
    if t.dtype not in dtypes:
        _fail(op, f"{name} must be one of {dtypes}, got {t.dtype}", TypeError)
    if len(shape) != 2 or (rows is not None and shape[0] != rows) or (cols is not None and shape[1] != cols):
        want = f"[{'*' if rows is None else rows}, {'*' if cols is None else cols}]"
        _fail(op, f"{name} must be 2-D {want}, got shape {tuple(shape)}")
    _fail(op, f"{name} is on {t.device}, expected {device}")


def _int(op: str, name: str, v, minimum: int = 0) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        _fail(op, f"{name} must be an int >= {minimum}, got {v!r}")


def _prob(op: str, name: str, p) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        _fail(op, f"{name} must be a probability in [0, 1), got {p!r}")


def _seed(op: str, seed, device: torch.device) -> None:
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
        _fail(op, f"seed must be a one-element int64 tensor, got "
                  f"{seed.dtype if isinstance(seed, torch.Tensor) else type(seed).__name__}", TypeError)
    if seed.device != device:
        _fail(op, f"seed is on {seed.device}, expected {device} (the kernel reads it on the device)")


# Weights already checked, by id of their packed data: (weakref to data, (numel, blocksize, device), absmax,
# code, nested_absmax, nested_code, offset). A decode step calls the ops with the same weight tensors over
# and over; a hit costs a few identity tests instead of ~30 metadata reads. An entry leaves when its data
# tensor dies (weakref callback), so an id is never matched to a different tensor.
_CHECKED: dict[int, tuple] = {}
_CHECKED_MAX = 1 << 14


def check_quant_state(op: str, data, absmax, code, nested_absmax, nested_code, offset, numel: int, blocksize: int,
                      device: torch.device) -> None:
    """The six quantization-state tensors of a ``numel``-element weight (module docstring).

    A weight passes the full checks once; later calls with the very same tensor objects (and the
    same numel, blocksize, device) are recognised by identity. Changing a state tensor's metadata in
    place (``resize_``, ``set_``) after it passed is not detected.
    """
    key = id(data)
    hit = _CHECKED.get(key)
    if (hit is not None and hit[0]() is data and hit[2] is absmax and hit[3] is code and hit[4] is nested_absmax
            and hit[5] is nested_code and hit[6] is offset and hit[1] == (numel, blocksize, device)):
        return
    _check_state(op, data, absmax, code, nested_absmax, nested_code, offset, numel, blocksize, device)
    if len(_CHECKED) >= _CHECKED_MAX:
        _CHECKED.clear()
    _CHECKED[key] = (weakref.ref(data, lambda _, k=key: _CHECKED.pop(k, None)), (numel, blocksize, device),
                     absmax, code, nested_absmax, nested_code, offset)


def _check_state(op, data, absmax, code, nested_absmax, nested_code, offset, numel, blocksize, device) -> None:
    _int(op, "numel", numel)
    if isinstance(blocksize, bool) or blocksize not in BLOCKSIZES:
        _fail(op, f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    nblocks = math.ceil(numel / blocksize)
    _flat(op, "data", data, torch.uint8, (numel + 1) // 2, device)
    _flat(op, "code", code, torch.float32, 16, device)
    given = [t is not None for t in (nested_absmax, nested_code, offset)]
    if any(given) and not all(given):
        _fail(op, "nested_absmax, nested_code and offset must all be given (double quantization) or all be None, "
                  f"got {dict(zip(('nested_absmax', 'nested_code', 'offset'), given))}")
    if not all(given):
        _flat(op, "absmax", absmax, torch.float32, nblocks, device)
        return
    _flat(op, "absmax", absmax, torch.uint8, nblocks, device)
    _flat(op, "nested_absmax", nested_absmax, torch.float32, math.ceil(nblocks / NESTED_BLOCKSIZE), device)
    _flat(op, "nested_code", nested_code, torch.float32, 256, device)
    _flat(op, "offset", offset, torch.float32, 1, device)


def check_dequantize(data, absmax, code, nested_absmax, nested_code, offset, numel, blocksize, dtype) -> None:
    if not isinstance(data, torch.Tensor):
        _fail("dequantize", f"data must be a Tensor, got {type(data).__name__}", TypeError)
    check_quant_state("dequantize", data, absmax, code, nested_absmax, nested_code, offset, numel, blocksize,
                      data.device)
    if dtype not in OUT_DTYPES:
        _fail("dequantize", f"dtype must be one of {OUT_DTYPES}, got {dtype}", TypeError)


def _activation(op: str, name: str, a, cols: int, n: int, k: int) -> torch.device:
    """``a: [M, cols]`` of an activation dtype, and the two weight dims; returns a's device."""
    if (isinstance(a, torch.Tensor) and a.dtype in ACT_DTYPES and a.dim() == 2 and a.shape[1] == cols
            and type(n) is int and type(k) is int and n >= 0 and k >= 0):
        return a.device  # the common case in one expression (these run on every call)
    _int(op, "n", n)
    _int(op, "k", k)
    _matrix(op, name, a, None, cols, ACT_DTYPES, None)
    return a.device


def _lora_pair(op: str, s_name: str, s, l_name: str, l, m: int, l_rows, l_cols, dtype, device) -> None:
    """``s: [M, r]`` and the LoRA factor ``l`` (``[l_rows, l_cols]``, r in place of None), both or neither."""
    if s is None and l is None:
        return
    if s is None or l is None:
        _fail(op, f"{s_name} and {l_name} must both be tensors or both be None")
    _matrix(op, s_name, s, m, None, (dtype,), device)
    r = s.shape[1]
    _matrix(op, l_name, l, r if l_rows is None else l_rows, r if l_cols is None else l_cols, (dtype,), device)


def _scale(op: str, scale) -> None:
    if type(scale) is float and math.isfinite(scale):
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        _fail(op, f"scale must be a finite float, got {scale!r}")


def check_nf4_linear(x, data, absmax, code, nested_absmax, nested_code, offset, n, k, blocksize,
                     lora_s, lora_B, scale, bias) -> None:
    """``qlora::nf4_linear``'s arguments (docs/kernels.md)."""
    op = "nf4_linear"
    dev = _activation(op, "x", x, k, n, k)
    check_quant_state(op, data, absmax, code, nested_absmax, nested_code, offset, n * k, blocksize, dev)
    _lora_pair(op, "lora_s", lora_s, "lora_B", lora_B, x.shape[0], n, None, x.dtype, dev)
    _scale(op, scale)
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or not bias.dtype.is_floating_point:
        _fail(op, f"bias must be a floating Tensor, got {getattr(bias, 'dtype', type(bias).__name__)}", TypeError)
    if bias.shape != (n,) or bias.device != dev:
        _fail(op, f"bias must be [{n}] on {dev}, got shape {tuple(bias.shape)} on {bias.device}")


def check_nf4_linear_dx(dy, data, absmax, code, nested_absmax, nested_code, offset, n, k, blocksize,
                        lora_g, lora_A, scale, seed, p) -> None:
    """``qlora::nf4_linear_dx``'s arguments (docs/kernels.md)."""
    op = "nf4_linear_dx"
    dev = _activation(op, "dy", dy, n, n, k)
    check_quant_state(op, data, absmax, code, nested_absmax, nested_code, offset, n * k, blocksize, dev)
    _lora_pair(op, "lora_g", lora_g, "lora_A", lora_A, dy.shape[0], None, k, dy.dtype, dev)
    _scale(op, scale)
    _prob(op, "p", p)
    if seed is not None:
        _seed(op, seed, dev)


def check_dropout(x, seed, p) -> None:
    """``qlora::dropout``'s arguments (docs/kernels.md)."""
    op = "dropout"
    _matrix(op, "x", x, None, None, ACT_DTYPES, None)
    _seed(op, seed, x.device)
    _prob(op, "p", p)
