"""AdamW on CPU: ``adamw_reference_``'s arithmetic as one fused, vectorized loop per tensor.

The reference (``kernels.adamw.adamw_reference_``) makes a full pass over memory for each of
its ~12 operations. Here the same operations, in the same order, each a single IEEE float32
rounding, are compiled by ``torch.compile`` (inductor's C++ backend, built without FMA
contraction or fast-math) into one loop that reads p, g, m, v once and writes p, m, v once:

    p  = p * decay
    m  = m * b1 + g * (1 - b1)
    v  = v * b2 + (g * g) * (1 - b2)
    p  = p - (m / (sqrt(v) * inv_bc2_sqrt + eps)) * step_size

``sqrt`` is taken in float64 and rounded to float32 (correctly rounded: 53 >= 2 * 24 + 2 bits),
because torch's vectorized float32 sqrt is not (kernels/adamw.py). The seven scalars travel as
one float32 tensor, so a new step does not recompile. The 8-bit variant dequantizes each
256-element block (``map[q] * absmax``), updates it, and requantizes it with a new absmax and
the nearest level (ties to the lower level; a 65536-entry table indexed by the top 16 bits of
the scaled value gives the count of midpoints below its bin, one comparison finishes it):
the numbers of ``quantize_state_8bit`` / ``dequantize_state_8bit``.

Results equal the reference bit for bit (tests/test_optim_cpu.py: odd sizes, fp32/bf16/fp16
parameters, 32- and 8-bit state). Used for contiguous CPU tensors of at least
``MIN_NUMEL`` elements (8-bit: whole 256-blocks; the partial last block takes the reference);
``NF4_COMPILE=0`` turns it off, and a compiler failure falls back to the reference for good.
"""

from __future__ import annotations

import torch

from nf4._compiled import compiled, plain_eager

__all__ = ["MIN_NUMEL", "enabled", "scalars_tensor", "bin_table", "step32", "step8"]

MIN_NUMEL = 1 << 16  # below this a compiled call's fixed cost outweighs the saved passes
_BLOCK = 256  # 8-bit state block (kernels.adamw.STATE_BLOCKSIZE)
_FNS: dict[str, object] = {}


def enabled(*tensors: torch.Tensor) -> bool:
    """Whether the compiled loop may run on these tensors (``nf4._compiled``: not while tracing,
    plain CPU tensors; ``NF4_COMPILE=0`` is checked where the loop is fetched)."""
    return plain_eager(*tensors)


def scalars_tensor(sc) -> torch.Tensor:
    """``AdamWScalars`` -> float32 ``[8]`` (each value is already exactly a float32)."""
    return torch.tensor([sc.decay, sc.beta1, sc.one_minus_beta1, sc.beta2, sc.one_minus_beta2,
                         sc.step_size, sc.inv_bc2_sqrt, sc.eps], dtype=torch.float32)


def _update(pf, gf, mf, vf, s):
    decay, b1, omb1, b2, omb2, step_size, inv_bc2, eps = s.unbind()
    pf = pf * decay
    mf = mf * b1 + gf * omb1
    vf = vf * b2 + (gf * gf) * omb2
    denom = vf.double().sqrt().float() * inv_bc2 + eps
    pf = pf - (mf / denom) * step_size
    return pf, mf, vf


def _step32_body(p, g, m, v, s):
    pf, mf, vf = _update(p.float(), g.float(), m, v, s)
    p.copy_(pf)
    m.copy_(mf)
    v.copy_(vf)


def _nearest(x, first, mids_ext):
    """#(mids < x) for x in [-1, 1]: a table lookup by the top 16 bits of x, then one compare.

    ``first[b]`` = #(mids < lowest float32 whose top 16 bits are b); at most one midpoint of
    the dynamic maps lies inside such a bin (``bin_table`` checks it), so the count is
    ``first[b]`` or one more.
    """
    lo = first[(x.view(torch.int32) >> 16) & 0xFFFF]
    return (lo + (mids_ext[lo] < x).to(torch.int64)).to(torch.uint8)


def bin_table(mids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first [65536] int64, mids + [inf] [256])`` for ``_nearest`` (float32 sorted midpoints).

    Raises:
        ValueError: if some bin of [-1, 1] holds more than one midpoint.
    """
    top = torch.arange(65536, dtype=torch.int64) << 16
    ends = [((top | low) - ((top >> 31) & 1) * (1 << 32)).to(torch.int32).view(torch.float32)
            for low in (0, 0xFFFF)]
    lo, hi = torch.minimum(*ends), torch.maximum(*ends)
    first = torch.bucketize(lo, mids)  # right=False: #(mids < lo)
    inside = (lo.abs() <= 1) & (hi.abs() <= 1)
    if bool(((torch.bucketize(hi, mids) - first)[inside] > 1).any()):
        raise ValueError("a 16-bit bin of [-1, 1] holds more than one midpoint of this map")
    mids_ext = torch.cat([mids.float(), torch.full((1,), float("inf"))])
    return first.clamp_(max=mids.numel()), mids_ext


def _requant(x, codes, absmax, first, mids_ext):
    blocks = x.view(-1, _BLOCK)
    amax = blocks.abs().amax(dim=1)
    inv = 1.0 / amax.clamp(min=1e-38)
    scaled = (blocks * inv[:, None]).clamp(-1.0, 1.0)
    codes.copy_(_nearest(scaled, first, mids_ext).view(codes.shape))
    absmax.copy_(amax)


def _step8_body(p, g, mc, vc, ma, va, s, qmap_m, first_m, mids_m, qmap_v, first_v, mids_v):
    mf = (qmap_m[mc.long()].view(-1, _BLOCK) * ma[:, None]).view(-1)
    vf = (qmap_v[vc.long()].view(-1, _BLOCK) * va[:, None]).view(-1)
    pf, mf, vf = _update(p.float(), g.float(), mf, vf, s)
    p.copy_(pf)
    _requant(mf, mc, ma, first_m, mids_m)
    _requant(vf, vc, va, first_v, mids_v)


def _run(name: str, body, *args) -> bool:
    fn = compiled(_FNS, name, body, dynamic=True)
    if fn is None:
        return False
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - compiler failure at run time: reference from now on
        _FNS[name] = None
        return False
    return True


def step32(p, g, m, v, s) -> bool:
    """One fused step on flat contiguous CPU tensors; False when the caller must run the reference."""
    return _run("step32", _step32_body, p.view(-1), g.view(-1), m.view(-1), v.view(-1), s)


_TABLES: list = []


def _tables(maps) -> tuple:
    """(map, first, mids_ext) for m then v, built once from ``state_maps('cpu')``."""
    if not _TABLES:
        qmap_m, qmid_m, qmap_v, qmid_v = maps
        _TABLES.extend([qmap_m, *bin_table(qmid_m), qmap_v, *bin_table(qmid_v)])
    return tuple(_TABLES)


def step8(p, g, mc, vc, ma, va, s, maps) -> bool:
    """The 8-bit step on the whole 256-blocks ``[:full]`` of flat contiguous CPU tensors.
    ``maps`` = ``kernels.adamw.state_maps('cpu')``."""
    return _run("step8", _step8_body, p, g, mc, vc, ma, va, s, *_tables(maps))
