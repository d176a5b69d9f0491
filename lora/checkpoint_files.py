"""Whole-model checkpoint folders in transformers' layout: find, validate, read and write shards.

A folder holds either one ``model.safetensors`` or ``model.safetensors.index.json``,

    {"metadata": {"total_size": <bytes>}, "weight_map": {"<key>": "model-00001-of-00003.safetensors", ...}}

plus the shards it names, and usually a ``config.json``. A safetensors file is

    8 bytes little-endian u64 N | N bytes of UTF-8 JSON header | tensor bytes (little-endian)

with ``{"<key>": {"dtype": "BF16", "shape": [...], "data_offsets": [lo, hi]}, "__metadata__": {...}}``.

Reading never executes anything and never maps a whole file: every header is parsed and checked
against its file's size first (``nf4.storage.read_safetensors_header``), then each tensor is
read with one ``readinto`` straight into the tensor's own memory, so the process holds exactly
the tensors it keeps (no page cache of a whole shard counted in its resident set). Writing uses
the ``safetensors`` package (shards cut at ``max_shard_size``, transformers' file names).

Errors name the file and the key: ``FileNotFoundError`` for a missing folder / shard, and
``ValueError`` for a malformed index, header, truncated data or an index that disagrees with
its shards.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass

import torch

from nf4.storage import read_safetensors_header

__all__ = [
    "WEIGHTS_NAME", "INDEX_NAME", "CONFIG_NAME", "ST_DTYPES", "Checkpoint", "open_checkpoint", "read_json",
    "parse_size", "write_shards",
]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"  # transformers' shard names
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def read_json(path: str, what: str) -> dict:
    """A JSON object from ``path``; ``ValueError`` naming the file when it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path!r}: malformed {what} ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path!r}: {what} must be a JSON object, got {type(data).__name__}")
    return data


@dataclass
class Checkpoint:
    """A validated folder: where each key lives and its header entry.

    Attributes:
        folder: the folder.
        files: shard paths in order.
        entries: key -> (shard path, header entry ``{"dtype", "shape", "data_offsets"}``).
        body_start: shard path -> byte offset of its data (8 + header length).
    """

    folder: str
    files: list[str]
    entries: dict[str, tuple[str, dict]]
    body_start: dict[str, int]

    def keys_of(self, path: str) -> list[str]:
        """Keys stored in one shard, in file order (reads stay sequential)."""
        keys = [k for k, (p, _) in self.entries.items() if p == path]
        return sorted(keys, key=lambda k: self.entries[k][1]["data_offsets"][0])

    def dtype(self, key: str) -> torch.dtype | None:
        """The torch dtype of a key (None for a dtype torch cannot hold, e.g. F8 / U16)."""
        return ST_DTYPES.get(self.entries[key][1]["dtype"])

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key][1]["shape"])

    def nbytes(self, key: str) -> int:
        lo, hi = self.entries[key][1]["data_offsets"]
        return hi - lo

    def read(self, f, key: str, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Read ``key`` from the open shard ``f`` (``open(path, "rb")``) into a new CPU tensor,
        or into the front of ``scratch`` (uint8, at least ``nbytes(key)``) returning a view of it."""
        path, info = self.entries[key]
        dtype = self.dtype(key)
        if dtype is None:
            raise ValueError(f"{path!r}: {key!r} has dtype {info['dtype']}, which this loader does not read")
        lo, hi = info["data_offsets"]
        raw = torch.empty(hi - lo, dtype=torch.uint8, device="cpu") if scratch is None else scratch[: hi - lo]
        f.seek(self.body_start[path] + lo)
        got = f.readinto(memoryview(raw.numpy()))
        if got != hi - lo:
            raise ValueError(f"{path!r}: {key!r} is truncated ({got} of {hi - lo} bytes)")
        return raw.view(dtype).reshape(info["shape"])


def _check_name(index_path: str, name) -> str:
    """A shard named by the index must be a plain file name in the folder (no paths, no '..')."""
    if not isinstance(name, str) or not name or os.path.basename(name) != name or name in (".", ".."):
        raise ValueError(f"{index_path!r}: shard names must be plain file names in the folder, got {name!r}")
    return name


def _header(path: str) -> tuple[dict, int]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint shard {path!r} does not exist")
    try:
        header = read_safetensors_header(path)
    except (ValueError, TypeError) as e:  # TypeError: offsets / shape of the wrong JSON type
        msg = str(e)
        raise ValueError(msg if msg.startswith(repr(path)) else f"{path!r}: corrupt header: {msg}") from None
    with open(path, "rb") as f:
        start = 8 + int.from_bytes(f.read(8), "little")
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets, shape = info["data_offsets"], info["shape"]
        nonneg = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(nonneg, offsets))
                and offsets[0] <= offsets[1] and isinstance(shape, list) and all(map(nonneg, shape))):
            raise ValueError(f"{path!r}: corrupt header entry for {key!r}: {info!r}")
    spans = sorted(tuple(info["data_offsets"]) for k, info in header.items() if k != "__metadata__")
    for (lo0, hi0), (lo1, _) in zip(spans, spans[1:]):
        if lo1 < hi0:
            raise ValueError(f"{path!r}: corrupt header, tensor data overlaps (bytes {lo1} < {hi0})")
    return header, start


def open_checkpoint(folder: str | os.PathLike) -> Checkpoint:
    """Find and validate every shard of ``folder`` (headers only, no tensor data read).

    Raises:
        FileNotFoundError: the folder, both weight files, or a shard the index names is missing.
        ValueError: a malformed index or header, truncated data, or an index whose keys are not
            where it says (or a shard holding keys the index does not list).
    """
    if sys.byteorder != "little":
        raise RuntimeError("safetensors data is little-endian; this loader reads it in place on little-endian hosts")
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"checkpoint folder {folder!r} does not exist")
    index_path, single = os.path.join(folder, INDEX_NAME), os.path.join(folder, WEIGHTS_NAME)
    if os.path.isfile(index_path):
        index = read_json(index_path, "index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path!r}: 'weight_map' must be a non-empty object of key -> shard file")
        names = list(dict.fromkeys(_check_name(index_path, v) for v in weight_map.values()))
        files = [os.path.join(folder, n) for n in names]
    elif os.path.isfile(single):
        weight_map, files = None, [single]
    else:
        raise FileNotFoundError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {folder!r}")
    entries, body_start = {}, {}
    for path in files:
        header, body_start[path] = _header(path)
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if key in entries:
                raise ValueError(f"{path!r}: key {key!r} is also in {entries[key][0]!r}")
            entries[key] = (path, info)
    if weight_map is not None:
        for key, name in weight_map.items():
            where = os.path.join(folder, name)
            if key not in entries or entries[key][0] != where:
                raise ValueError(f"{index_path!r} says {key!r} is in {name!r}, but that shard has no such key")
        extra = sorted(set(entries) - set(weight_map))
        if extra:
            raise ValueError(f"{index_path!r} does not list keys its shards hold: {extra[:8]}")
    return Checkpoint(folder, files, entries, body_start)


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"5GB"`` (10^9), ``"500MiB"`` (2^20), ``"10KB"``."""
    if isinstance(size, bool):
        raise ValueError(f"max_shard_size must be a positive size, got {size!r}")
    if isinstance(size, int):
        value = size
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", size.upper())
        if m is None:
            raise ValueError(f"max_shard_size must be bytes or a string like '5GB' / '500MiB', got {size!r}")
        value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2) or ""])
    else:
        raise ValueError(f"max_shard_size must be an int or a string like '5GB', got {type(size).__name__}")
    if value <= 0:
        raise ValueError(f"max_shard_size must be positive, got {size!r}")
    return value


def write_shards(groups: list[dict[str, torch.Tensor]], folder: str, max_shard_size: int | str) -> list[str]:
    """Write tensors to ``folder`` as transformers does: one ``model.safetensors``, or shards
    ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``.

    ``groups`` are kept whole (a quantized weight's keys stay in one shard); a shard is closed
    when the next group would take it past ``max_shard_size`` (a group larger than that gets a
    shard of its own). Returns the file names written.
    """
    from safetensors.torch import save_file

    limit = parse_size(max_shard_size)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for group in groups:
        nbytes = sum(t.numel() * t.element_size() for t in group.values())
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1].update(group)
        size += nbytes
    os.makedirs(folder, exist_ok=True)
    for stale in os.listdir(folder):  # never leave an older layout's files next to this one
        if stale in (WEIGHTS_NAME, INDEX_NAME) or _SHARD_RE.fullmatch(stale):
            os.remove(os.path.join(folder, stale))
    names = [WEIGHTS_NAME] if len(shards) == 1 else [SHARD_NAME.format(i + 1, len(shards)) for i in range(len(shards))]
    weight_map, total, seen = {}, 0, set()
    for name, shard in zip(names, shards):
        out = {}
        for k, t in shard.items():
            t = t.detach().to("cpu").contiguous()
            ptr = t.untyped_storage().data_ptr()
            out[k] = t.clone() if ptr in seen else t  # safetensors refuses tensors that share memory
            seen.add(ptr)
        save_file(out, os.path.join(folder, name), metadata={"format": "pt"})
        for k, t in shard.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
    if len(shards) > 1:
        with open(os.path.join(folder, INDEX_NAME), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    return names

