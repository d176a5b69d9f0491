"""Optimizer-state storage: the layout of one parameter's state, packing it into buffers, and
converting it to and from plain CPU tensors.

Per-parameter state (``optimizer.state[p]``)::

    32-bit: step (0-d float32, CPU), exp_avg, exp_avg_sq  (float32, p's shape)
    8-bit : step, exp_avg_codes, exp_avg_sq_codes          (uint8, p's shape)
                  exp_avg_absmax, exp_avg_sq_absmax        (float32 [ceil(numel / 256)])

The 32-bit names and dtypes are torch.optim.AdamW's, so its state dicts load both ways.

Paged state is packed into *arenas*: one managed buffer holding the state of several
parameters (up to ``arena_bytes``; a larger parameter gets its own), each tensor a view
aligned to 256 bytes. An arena is the unit that is prefetched, so a step issues one
``cudaMemPrefetchAsync`` per arena instead of one per tensor. Memory is freed when the last
view of an arena dies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch

from kernels.adamw import STATE_BLOCKSIZE, dequantize_state_8bit, quantize_state_8bit

from .paging import PagingBackend

__all__ = [
    "MIN_8BIT_NUMEL",
    "STATE_KEYS_32BIT",
    "STATE_KEYS_8BIT",
    "Arena",
    "uses_8bit",
    "layout",
    "allocate_state",
    "state_to_cpu",
    "state_from_saved",
    "state_nbytes",
]

MIN_8BIT_NUMEL = 4096  # smaller tensors keep 32-bit state (bitsandbytes' min_8bit_size)
_ALIGN = 256  # bytes; every state tensor in an arena starts on this boundary
STATE_KEYS_32BIT = ("exp_avg", "exp_avg_sq")
STATE_KEYS_8BIT = ("exp_avg_codes", "exp_avg_sq_codes", "exp_avg_absmax", "exp_avg_sq_absmax")


@dataclass(eq=False)
class Arena:
    """One pageable buffer and the parameters whose state it holds."""

    buffer: torch.Tensor
    params: list = field(default_factory=list)


def uses_8bit(numel: int, state_bits: int) -> bool:
    return state_bits == 8 and numel >= MIN_8BIT_NUMEL


def layout(numel: int, eight_bit: bool) -> list[tuple[str, torch.dtype, int]]:
    """``(key, dtype, numel)`` of each state tensor of a parameter with ``numel`` elements."""
    if not eight_bit:
        return [("exp_avg", torch.float32, numel), ("exp_avg_sq", torch.float32, numel)]
    nb = -(-numel // STATE_BLOCKSIZE)
    return [("exp_avg_codes", torch.uint8, numel), ("exp_avg_sq_codes", torch.uint8, numel),
            ("exp_avg_absmax", torch.float32, nb), ("exp_avg_sq_absmax", torch.float32, nb)]


def _padded_nbytes(numel: int, eight_bit: bool) -> int:
    return sum(-(-n * dt.itemsize // _ALIGN) * _ALIGN for _, dt, n in layout(numel, eight_bit))


def _shape(key: str, p: torch.Tensor) -> tuple[int, ...]:
    return (-1,) if key.endswith("absmax") else tuple(p.shape)


@lru_cache(maxsize=2)
def _zero_code(signed: bool) -> int:
    """The code that quantizing 0.0 gives (127 in the signed map, 0 in the unsigned one)."""
    return int(quantize_state_8bit(torch.zeros(1), signed)[0][0])


def _zero_values(p: torch.Tensor, eight_bit: bool) -> dict[str, torch.Tensor]:
    """The fresh state of ``p`` (zeros; 8-bit: the codes of zero with absmax 0) on p's device."""
    n = p.numel()
    if not eight_bit:
        return {k: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for k in STATE_KEYS_32BIT}
    out = {}
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        out[f"{key}_codes"] = torch.full(p.shape, _zero_code(signed), dtype=torch.uint8, device=p.device)
        out[f"{key}_absmax"] = torch.zeros(-(-n // STATE_BLOCKSIZE), dtype=torch.float32, device=p.device)
    return out


def allocate_state(
    params: list[torch.Tensor],
    values: list[dict[str, torch.Tensor] | None],
    eight_bit: list[bool],
    backend: PagingBackend,
    paged: list[bool],
    arena_bytes: int,
) -> tuple[list[dict[str, torch.Tensor]], list[Arena]]:
    """Create state tensors for ``params`` (all on one device).

    ``values[i]`` holds the initial tensors (any device, the keys of ``layout``) or None for
    zeros. Parameters with ``paged[i]`` get views into arenas from ``backend``; the others
    get ordinary tensors on their device. Returns ``(state dicts without 'step', arenas)``.
    """
    states: list[dict[str, torch.Tensor]] = []
    arenas: list[Arena] = []
    pending: list[int] = []  # paged parameters waiting for the current arena
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if not pending:
            return
        device = params[pending[0]].device
        buf = backend.allocate(pending_bytes, device)
        arena = Arena(buf)
        offset = 0
        for i in pending:
            p = params[i]
            st = {}
            for key, dt, n in layout(p.numel(), eight_bit[i]):
                nbytes = n * dt.itemsize
                st[key] = buf[offset: offset + nbytes].view(dt).view(_shape(key, p))
                offset += -(-nbytes // _ALIGN) * _ALIGN
            src = values[i] if values[i] is not None else _zero_values(p, eight_bit[i])
            for key, t in st.items():
                t.copy_(src[key].reshape(t.shape))
            states[i] = st
            arena.params.append(p)
        arenas.append(arena)
        pending, pending_bytes = [], 0

    for i, p in enumerate(params):
        states.append({})
        if not paged[i]:
            src = values[i]
            if src is None:
                states[i] = _zero_values(p, eight_bit[i])
            else:
                states[i] = {key: src[key].to(device=p.device, dtype=dt, copy=True).reshape(_shape(key, p))
                             for key, dt, _ in layout(p.numel(), eight_bit[i])}
            continue
        need = _padded_nbytes(p.numel(), eight_bit[i])
        if pending and pending_bytes + need > arena_bytes:
            flush()
        pending.append(i)
        pending_bytes += need
    flush()
    return states, arenas


def state_to_cpu(st: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain, contiguous CPU copies of one parameter's state (never views of paged memory)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() if torch.is_tensor(v) else v for k, v in st.items()}


def state_from_saved(saved: dict, p: torch.Tensor, eight_bit: bool, where: str) -> dict[str, torch.Tensor]:
    """Saved state of one parameter (ours, 32- or 8-bit, or torch.optim.AdamW's) -> CPU float32
    or 8-bit tensors in the layout ``eight_bit`` asks for (dequantizing or quantizing).

    Raises:
        ValueError: naming ``where`` when keys are missing or sizes do not match ``p``.
    """
    n = p.numel()
    if "exp_avg" in saved and "exp_avg_sq" in saved:
        fp = {k: torch.as_tensor(saved[k]).detach().to("cpu", torch.float32) for k in STATE_KEYS_32BIT}
    elif all(k in saved for k in STATE_KEYS_8BIT):
        q = {k: torch.as_tensor(saved[k]).detach().cpu() for k in STATE_KEYS_8BIT}
        nb = -(-n // STATE_BLOCKSIZE)
        for k in STATE_KEYS_8BIT:
            want = nb if k.endswith("absmax") else n
            if q[k].numel() != want:
                raise ValueError(f"{where}: {k} has {q[k].numel()} elements, expected {want} for a "
                                 f"parameter of shape {tuple(p.shape)}")
        if eight_bit:
            return q
        fp = {"exp_avg": dequantize_state_8bit(q["exp_avg_codes"].to(torch.uint8), q["exp_avg_absmax"].float(), True),
              "exp_avg_sq": dequantize_state_8bit(q["exp_avg_sq_codes"].to(torch.uint8),
                                                  q["exp_avg_sq_absmax"].float(), False)}
    else:
        raise ValueError(f"{where}: saved state has keys {sorted(saved)}; expected {list(STATE_KEYS_32BIT)} "
                         f"or {list(STATE_KEYS_8BIT)} (plus 'step')")
    for k, t in fp.items():
        if t.numel() != n:
            raise ValueError(f"{where}: {k} has shape {tuple(t.shape)}, the parameter has shape {tuple(p.shape)}")
    if not eight_bit:
        return fp
    out = {}
    for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
        codes, absmax = quantize_state_8bit(fp[key].reshape(-1), signed)
        out[f"{key}_codes"], out[f"{key}_absmax"] = codes, absmax
    return out


def state_nbytes(st: dict[str, torch.Tensor]) -> int:
    """Bytes held by one parameter's state tensors (without 'step')."""
    return sum(v.numel() * v.element_size() for k, v in st.items() if k != "step" and torch.is_tensor(v))
