"""The CPU fast path of dequantization: one compiled, vectorized loop over whole blocks.

    out[b, r, j] = (code[nib(words[b, r], j)] * absmax[b]).to(dtype)
    words: [nb, blocksize / 16] int64, 16 packed codes each; out: [nb, blocksize / 16, 16];
    nib(w, j) = (w >> SHIFT[j]) & 15

Bit-identical to ``tensor._decode_blocks``: the same single float32 product and one cast; only
the lookup differs. Inductor compiles any gather from a table into scalar loads (the old
per-block table decoder ran at ~0.6x bitsandbytes), so here

- the packed codes are read as one little-endian int64 per row of 16 outputs: byte k of the
  word holds outputs 2k (high nibble) and 2k+1 (low), hence ``SHIFT[j] = 8 (j // 2) + 4 (1 - j % 2)``;
  the word is a per-row scalar, so every load and store of the loop is contiguous;
- the 16-entry lookup is a binary tree of selects on the nibble's four bits (15 blends per
  vector of 16 lanes), exact for any codebook;
- one compile serves every size and blocksize (both leading dimensions are dynamic; dynamo
  still specialises on the output dtype and inference mode) (measured 4.3 ms for
  4096x4096 bf16 into a warm buffer, against 3.6 ms for a static shape, 2026-12-02).

``empty`` allocates the output. First touching a fresh tensor costs one page fault per 4 KiB
(~11 ms for a 32 MiB output on the 2-core machine, more than the decode itself), and glibc
returns every allocation above 32 MiB to the kernel when it is freed, so a model that
dequantizes its large weights every step pays those faults every step. Large outputs
therefore come from a small cache of anonymous mappings, reused once no tensor refers to them
any more (the same idea as PyTorch's CUDA caching allocator). It tracks at most
``NF4_DECODE_CACHE_MB`` (default 256) MiB; beyond that the oldest mappings are forgotten and
freed with their last tensor; ``0`` turns it off, ``release_cache()`` empties it. Such a
tensor's storage is not resizable (``resize_`` to a larger size raises); tracing (``torch.compile``,
FakeTensorMode) always takes ``torch.empty``.
"""

from __future__ import annotations

import mmap
import os
import sys
import threading

import torch

from ._compiled import compiled, plain_eager

ROW = 16  # outputs per int64 word of packed codes
MIN_ELEMENTS = 1 << 14  # below this the call overhead of the compiled loop is not worth it

_COMPILED: dict[str, object] = {}


def _select(nib: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """``code[nib]`` for int32 ``nib`` in [0, 16) as a tree of selects on its bits (exact)."""
    level = [code[i] for i in range(16)]
    for bit in (1, 2, 4, 8):
        on = (nib & bit) != 0
        level = [torch.where(on, level[i + 1], level[i]) for i in range(0, len(level), 2)]
    return level[0]


def _decode_rows(words: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, out: torch.Tensor) -> None:
    """words: [nb, blocksize / 16] int64; absmax: [nb] float32; code: [16] float32;
    out: [nb, blocksize / 16, 16]."""
    j = torch.arange(ROW, dtype=torch.int64, device=words.device)
    shift = (j >> 1) * 8 + (1 - (j & 1)) * 4
    nib = ((words[:, :, None] >> shift) & 15).to(torch.int32)
    out.copy_((_select(nib, code) * absmax[:, None, None]).to(out.dtype))


def compiled_rows():
    """``_decode_rows`` through torch.compile, or None (``nf4._compiled``; little-endian only)."""
    return compiled(_COMPILED, "fn", _decode_rows, dynamic=False) if sys.byteorder == "little" else None


def decode_full_blocks(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                       out: torch.Tensor) -> bool | Exception:
    """Decode whole blocks into ``out`` ([nb * blocksize], contiguous) with the compiled loop.

    packed: [nb * blocksize / 2] uint8; absmax: [nb] float32 (decoded). Returns True when done;
    False, having written nothing, when the fast path does not apply (small or odd blocks, not a
    plain CPU call, compiler unavailable); the exception, when the compiled call raised (the caller
    decodes eagerly and, if that succeeds, calls ``disable``: a compiler failure, not bad input).
    """
    n = out.numel()
    if blocksize % ROW or n < MIN_ELEMENTS or not plain_eager(packed, absmax, code, out):
        return False
    fn = compiled_rows()
    if fn is None:
        return False
    if packed.storage_offset() % 8:
        packed = packed.clone()  # the int64 view needs 8-byte alignment within its storage
    nb = absmax.numel()
    words = packed.view(torch.int64).view(nb, blocksize // ROW)
    rows = out.view(nb, blocksize // ROW, ROW)
    for t in (words, rows):  # one graph for every size and blocksize
        torch._dynamo.maybe_mark_dynamic(t, 0)
        torch._dynamo.maybe_mark_dynamic(t, 1)
    absmax = absmax.contiguous()
    torch._dynamo.maybe_mark_dynamic(absmax, 0)
    code = code.to(torch.float32).contiguous()
    try:
        # Guards: the output dtype, inference mode and the leading sizes' 0/1 specialisation, so a
        # handful of graphs; past the limit dynamo raises (not: runs the select tree eagerly, ~1 s)
        with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT,
                                                         fail_on_recompile_limit_hit=True):
            fn(words, absmax, code, rows)
    except torch._dynamo.exc.FailOnRecompileLimitHit:
        return False  # one graph too many for this call: eager, the compiled graphs stay in use
    except Exception as e:  # noqa: BLE001 - the caller decides: bad input or a broken compiler
        return e
    return True


def disable() -> None:
    """Stop using the compiled decoder in this process (it failed where the eager path worked)."""
    _COMPILED["fn"] = None


_RECOMPILE_LIMIT = 16


CACHE_MIN_BYTES = 8 << 20  # smaller outputs are recycled by glibc's heap already
_CACHE_ENV = "NF4_DECODE_CACHE_MB"
_DEFAULT_CACHE_MB = 256


class _OutputCache:
    """Anonymous mappings handed out as tensors (``torch.frombuffer``). A tensor, and every view
    of its storage, holds one reference to its mapping, so a mapping whose only reference is
    the cache's own is free to hand out again."""

    def __init__(self) -> None:
        self.regions: list[mmap.mmap] = []  # oldest first
        self.lock = threading.Lock()

    def take(self, nbytes: int, limit: int) -> mmap.mmap | None:
        with self.lock:
            for i in range(len(self.regions) - 1, -1, -1):
                # references: the list's and getrefcount's argument; any more is a live tensor
                if len(self.regions[i]) == nbytes and sys.getrefcount(self.regions[i]) == 2:
                    region = self.regions.pop(i)
                    self.regions.append(region)
                    return region
            if nbytes > limit:
                return None
            while self.regions and sum(len(r) for r in self.regions) + nbytes > limit:
                self.regions.pop(0)  # forgotten: unmapped when its last tensor goes
            region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            self.regions.append(region)
            return region

    def clear(self) -> None:
        with self.lock:
            self.regions.clear()


_CACHE = _OutputCache()


def release_cache() -> None:
    """Forget every cached output mapping (each is unmapped when no tensor uses it)."""
    _CACHE.clear()


def cache_limit() -> int:
    """Bytes the output cache may track (``NF4_DECODE_CACHE_MB``; 0: off)."""
    raw = os.environ.get(_CACHE_ENV, str(_DEFAULT_CACHE_MB))
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"{_CACHE_ENV} must be a number of MiB (0 turns the cache off), got {raw!r}") from None
    if mb < 0:
        raise ValueError(f"{_CACHE_ENV} must be >= 0, got {raw!r}")
    return int(mb * (1 << 20))


def empty(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A ``[n]`` tensor for a decode output (uninitialised); on CPU from ``CACHE_MIN_BYTES`` up,
    a recycled mapping from the output cache when one of this size is free."""
    nbytes = n * dtype.itemsize
    if device.type == "cpu" and nbytes >= CACHE_MIN_BYTES and plain_eager():
        limit = cache_limit()
        region = _CACHE.take(nbytes, limit) if limit else None
        if region is not None:
            return torch.frombuffer(region, dtype=dtype)
    return torch.empty(n, dtype=dtype, device=device)
