"""Storage: bitsandbytes' serialized Linear4bit layout is our interchange format.

Under a module prefix (here ``weight``) bitsandbytes + transformers write:

    weight                                   packed codes, [(n + 1) // 2, 1] uint8
    weight.absmax                            uint8 codes (double quant) or float32
    weight.quant_map                         float32[16]
    weight.nested_absmax                     float32[ceil(nblocks / 256)]   (double quant)
    weight.nested_quant_map                  float32[256]                   (double quant)
    weight.quant_state.bitsandbytes__nf4     uint8 bytes of UTF-8 JSON:
        {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [3, 100],
         "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 2.171875}

Files are safetensors only: loading never unpickles or executes anything, and every field
is validated (a ``ValueError`` names the key).
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Mapping

import torch

from .blockwise import BLOCKSIZES


__all__ = ["to_bnb_state_dict", "from_bnb_state_dict", "save_file", "load_file", "QUANT_STATE_TAG"]

QUANT_STATE_TAG = "quant_state.bitsandbytes__"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def to_bnb_state_dict(qt, prefix: str = "weight") -> dict[str, torch.Tensor]:
    """The exact keys and JSON bitsandbytes writes for ``qt`` under ``prefix``."""
    if qt.quant_type not in ("nf4", "fp4"):
        raise ValueError(f"bitsandbytes' format has no quant_type {qt.quant_type!r} (only 'nf4' and 'fp4')")
    meta: dict[str, object] = {
        "quant_type": qt.quant_type,
        "blocksize": qt.blocksize,
        "dtype": _DTYPE_NAMES[qt.dtype],
        "shape": list(qt.shape),
    }
    sd = {prefix: qt.data, f"{prefix}.absmax": qt.absmax, f"{prefix}.quant_map": qt.code}
    if qt.nested:
        sd[f"{prefix}.nested_absmax"] = qt.nested_absmax
        sd[f"{prefix}.nested_quant_map"] = qt.nested_code
        meta.update(nested_blocksize=qt.nested_blocksize, nested_dtype="float32", nested_offset=qt.offset.item())
    blob = json.dumps(meta).encode("utf-8")
    sd[f"{prefix}.{QUANT_STATE_TAG}{qt.quant_type}"] = torch.tensor(list(blob), dtype=torch.uint8)
    return sd


def _need(sd: Mapping[str, torch.Tensor], key: str, dtype: torch.dtype, numel: int | None = None) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"missing key {key!r}")
    t = sd[key]
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{key!r} must be a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise ValueError(f"{key!r} must be {dtype}, got {t.dtype}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{key!r} must have {numel} elements, got {t.numel()} (shape {tuple(t.shape)})")
    return t


def _meta_field(meta: dict, key: str, name: str, kind: type):
    if name not in meta:
        raise ValueError(f"{key!r}: JSON has no field {name!r}")
    value = meta[name]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{key!r}: field {name!r} must be an int, got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
        raise ValueError(f"{key!r}: field {name!r} must be a finite number, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise ValueError(f"{key!r}: field {name!r} must be a string, got {value!r}")
    return value


def _find_state_key(sd: Mapping[str, torch.Tensor], prefix: str) -> str:
    found = [k for k in sd if k.startswith(f"{prefix}.{QUANT_STATE_TAG}")]
    if not found:
        raise ValueError(f"missing key {prefix + '.' + QUANT_STATE_TAG + '<quant_type>'!r}")
    if len(found) > 1:
        raise ValueError(f"several quant-state keys for {prefix!r}: {sorted(found)}")
    return found[0]


def from_bnb_state_dict(sd: Mapping[str, torch.Tensor], prefix: str = "weight"):
    """Build a ``QuantizedTensor`` from bitsandbytes' keys under ``prefix``, validating all."""
    from .tensor import QuantizedTensor  # storage sits beside tensor; avoid an import cycle

    key = _find_state_key(sd, prefix)
    tag = key[len(f"{prefix}.{QUANT_STATE_TAG}"):]
    blob = _need(sd, key, torch.uint8)
    try:
        meta = json.loads(bytes(blob.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{key!r}: malformed JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{key!r}: JSON must be an object, got {type(meta).__name__}")
    quant_type = _meta_field(meta, key, "quant_type", str)
    if quant_type not in ("nf4", "fp4") or quant_type != tag:
        raise ValueError(f"{key!r}: unknown or inconsistent quant_type {quant_type!r} (key says {tag!r})")
    blocksize = _meta_field(meta, key, "blocksize", int)
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"{key!r}: blocksize must be a power of two in [32, 4096], got {blocksize}")
    dtype_name = _meta_field(meta, key, "dtype", str)
    if dtype_name not in _DTYPES:
        raise ValueError(f"{key!r}: dtype must be one of {sorted(_DTYPES)}, got {dtype_name!r}")
    shape = meta.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ValueError(f"{key!r}: shape must be a list of non-negative ints, got {shape!r}")
    n = math.prod(shape)
    nblocks = math.ceil(n / blocksize)
    data = _need(sd, prefix, torch.uint8, (n + 1) // 2)
    code = _need(sd, f"{prefix}.quant_map", torch.float32, 16)
    nested = "nested_offset" in meta
    fields = dict(data=data.reshape(-1, 1), shape=torch.Size(shape), dtype=_DTYPES[dtype_name],
                  blocksize=blocksize, quant_type=quant_type, code=code)
    if not nested:
        for extra in ("nested_absmax", "nested_quant_map"):
            if f"{prefix}.{extra}" in sd:
                raise ValueError(f"{prefix + '.' + extra!r} present but the JSON has no nested_offset")
        return QuantizedTensor(absmax=_need(sd, f"{prefix}.absmax", torch.float32, nblocks), **fields)
    nested_bs = _meta_field(meta, key, "nested_blocksize", int)
    if nested_bs != 256:
        raise ValueError(f"{key!r}: nested_blocksize must be 256, got {nested_bs}")
    if meta.get("nested_dtype", "float32") != "float32":
        raise ValueError(f"{key!r}: nested_dtype must be 'float32', got {meta.get('nested_dtype')!r}")
    offset = _meta_field(meta, key, "nested_offset", float)
    return QuantizedTensor(
        absmax=_need(sd, f"{prefix}.absmax", torch.uint8, nblocks),
        offset=torch.tensor(offset, dtype=torch.float32, device=data.device),
        nested_absmax=_need(sd, f"{prefix}.nested_absmax", torch.float32, math.ceil(nblocks / 256)),
        nested_code=_need(sd, f"{prefix}.nested_quant_map", torch.float32, 256),
        nested_blocksize=256,
        **fields,
    )


def flatten_state_dict(tensors: Mapping[str, object]) -> dict[str, torch.Tensor]:
    """Quantized entries become their bitsandbytes keys; plain tensors stay as they are."""
    from .tensor import QuantizedTensor

    flat: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        if isinstance(value, QuantizedTensor):
            items = to_bnb_state_dict(value, name).items()
        elif isinstance(value, torch.Tensor):
            items = [(name, value)]
        else:
            raise TypeError(f"{name!r}: expected a Tensor or QuantizedTensor, got {type(value).__name__}")
        for k, t in items:
            if k in flat:
                raise ValueError(f"duplicate key {k!r}")
            flat[k] = t.detach().cpu().contiguous().clone()
    return flat


def unflatten_state_dict(flat: Mapping[str, torch.Tensor]) -> dict[str, object]:
    """Inverse of ``flatten_state_dict``: regroup bitsandbytes keys into ``QuantizedTensor``s."""
    out: dict[str, object] = {}
    used: set[str] = set()
    marker = "." + QUANT_STATE_TAG
    for k in flat:
        if marker in k:
            prefix = k[: k.index(marker)]
            qt = from_bnb_state_dict(flat, prefix)
            out[prefix] = qt
            used.update(kk for kk in flat if kk == prefix or kk.startswith(prefix + ".") and
                        kk[len(prefix) + 1:] in ("absmax", "quant_map", "nested_absmax", "nested_quant_map"))
            used.add(k)
    out.update({k: v for k, v in flat.items() if k not in used})
    return out


def save_file(tensors: Mapping[str, object], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write plain tensors and ``QuantizedTensor``s to one safetensors file (bitsandbytes keys)."""
    from safetensors.torch import save_file as st_save

    st_save(flatten_state_dict(tensors), os.fspath(path), metadata=metadata)


_ST_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
             "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def read_safetensors_header(path: str | os.PathLike) -> dict[str, dict]:
    """Parse and check a safetensors header against the file size; errors name the key."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{os.fspath(path)!r}: not a safetensors file (only {size} bytes)")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > size - 8:
            raise ValueError(f"{os.fspath(path)!r}: header length {hlen} exceeds the file ({size} bytes)")
        try:
            header = json.loads(f.read(hlen).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{os.fspath(path)!r}: malformed safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{os.fspath(path)!r}: safetensors header must be a JSON object")
    body = size - 8 - hlen
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (lo, hi) = info["dtype"], info["shape"], info["data_offsets"]
            expected = _ST_BYTES[dtype] * math.prod(shape)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{key!r}: malformed safetensors entry {info!r}") from None
        if hi - lo != expected:
            raise ValueError(f"{key!r}: {hi - lo} bytes stored for a {dtype}{shape} tensor ({expected} expected)")
        if hi > body:
            raise ValueError(f"{key!r}: truncated (its data ends at byte {hi} of a {body}-byte body)")
    return header


def load_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, object]:
    """Read a safetensors file; bitsandbytes quantized weights come back as ``QuantizedTensor``."""
    from safetensors.torch import load_file as st_load

    read_safetensors_header(path)
    flat = st_load(os.fspath(path), device=str(device))
    return unflatten_state_dict(flat)
