"""Decoding 4-bit codes by a pair table in shared memory: one lookup per byte (two codes).

The table has 256 entries, one per byte value ``b``. Entry ``b`` is the 16-bit pair
``(level[b >> 4], level[b & 15])``, the byte's two elements in element order (bitsandbytes puts
element 2j in the high nibble of byte j). Packed in an int32, it is the bf16x2 or f16x2 register
an MMA reads.

The table is **replicated once per lane**: entry ``b`` of lane ``l`` sits at byte
``b * 128 + l * 4``, so the 32 lanes of a warp read 32 different banks whatever their bytes are.
There are no bank conflicts, and each warp-wide lookup costs one shared-memory wavefront. That is 32 KB,
declared as a static ``.shared`` array inside the fill's inline asm. Plain Triton cannot own
shared memory, but ptxas accepts a ``.shared`` declaration in an asm block's scope, and the block
hands its address out.

- ``FILL_PTX`` (once per program, 128 threads): thread t copies entries 2t and 2t+1 from the
  global table (``pair_table``), each into all 32 lane slots (16 128-bit stores), then ``bar.sync 0``.
  It returns the table's shared address. It must run exactly once per thread, on a scalar, and
  every thread of the program must reach it.
- ``DECODE_PROGRAM`` (per 32-bit word): for each byte j, one ``prmt`` extracts it, one ``shl`` + ``add``
  (a single ``LEA`` in SASS) makes ``b_j * 128 + lane * 4 + base`` from the lane's base register
  ``lb``, and one ``ld.shared.b32`` reads the pair: 3 SASS instructions a byte, 1.5 a code, against
  2.6 for the register-only byte-permute decoder of ``kernels._decode``, whatever the kernel's
  uniform registers hold.

The decode asm reads shared memory, so it is not pure: it stays after the fill's barrier.
Tests run ``emulate_decode`` (the PTX semantics in numpy) on ``table_image`` (the bytes the fill
writes) against the plain decoder. On a GPU, ``kernels.gemv_tc.verified`` runs fill and decode
once per device against the plain decoder before any kernel may use them.
"""

from __future__ import annotations

import numpy as np
import triton
import triton.language as tl

from ._decode import _hi16, _lo16, join8

__all__ = ["LANE_STRIDE", "TABLE_BYTES", "THREADS", "DECODE_PROGRAM", "FILL_PTX", "DECODE_PTX", "pair_table",
           "lut_source", "table_image", "lookup_addresses", "emulate_decode"]

LANE_STRIDE = 128  # bytes between two entries of one lane: 32 lanes x 4 bytes
TABLE_BYTES = 256 * LANE_STRIDE  # 32 KB
# The table is static shared memory, which Triton does not see: Triton's own (dynamic) shared
# memory starts after it and ptxas's 1 KB reserve, and needs 1 KB alignment there (a wgmma operand
# with 128-byte swizzle); and the launch only asks for more than 48 KB per block when Triton's own
# part alone exceeds it, so the kernel's dynamic part must stay under STATIC_BUDGET - TABLE_BYTES -
# 1 KB (tools/perf_model.py --compile-check asserts it for every tc variant).
STATIC_BUDGET = 48 * 1024
assert TABLE_BYTES % 1024 == 0 and TABLE_BYTES + 1024 < STATIC_BUDGET
THREADS = 128  # the fill's thread count: 2 entries a thread (kernels using it run 4 warps)

# ---- the decode program, as data ----------------------------------------------------------------
# Operands: "w" the word, "lb" = the table's shared address + 4 * %laneid (this lane's slot); "o0"
# .."o3" the pairs of bytes 0..3 (elements (0, 1), (2, 3), (4, 5), (6, 7)); "t" a temporary.
DECODE_PROGRAM: list[tuple] = []
for _j in range(4):
    DECODE_PROGRAM += [
        ("prmt", "t", "w", 0x4440 + _j),  # byte j, zero-extended (selector nibbles 4: the zero operand)
        ("shl", "t", "t", 7),  # * LANE_STRIDE
        ("add", "t", "t", "lb"),
        ("lds", f"o{_j}", "t"),
    ]
assert LANE_STRIDE == 1 << 7


def _render_decode(program: list[tuple]) -> str:
    regs = {"o0": "$0", "o1": "$1", "o2": "$2", "o3": "$3", "w": "$4", "lb": "$5"}

    def r(name):
        return regs.get(name, f"%{name}")

    lines = ["{", ".reg .b32 %t;"]
    for op in program:
        kind = op[0]
        if kind in ("shl", "shr", "and"):
            lines.append(f"{kind}.b32 {r(op[1])}, {r(op[2])}, {op[3]:#x};")
        elif kind == "prmt":
            lines.append(f"prmt.b32 {r(op[1])}, {r(op[2])}, 0, {op[3]:#x};")
        elif kind in ("or", "add"):
            ptx = "or.b32" if kind == "or" else "add.u32"
            lines.append(f"{ptx} {r(op[1])}, {r(op[2])}, {r(op[3])};")
        elif kind == "lds":
            lines.append(f"ld.shared.b32 {r(op[1])}, [{r(op[2])}];")
        else:  # pragma: no cover - the program is a module constant
            raise ValueError(f"unknown op {kind!r}")
    lines.append("}")
    return "\n".join(lines)


DECODE_PTX = _render_decode(DECODE_PROGRAM)

_stores = []
for _e in range(2):  # entries 2t and 2t + 1: 128 bytes apart, 8 x 16 bytes each
    for _q in range(LANE_STRIDE // 16):
        _v = f"%e{_e}"
        _stores.append(f"st.shared.v4.b32 [%a+{_e * LANE_STRIDE + 16 * _q}], {{{_v}, {_v}, {_v}, {_v}}};")
FILL_PTX = "\n".join([
    "{",
    f".shared .align 16 .b8 qlora_pair_lut[{TABLE_BYTES}];",
    ".reg .b32 %t, %e0, %e1, %a;",
    ".reg .b64 %p;",
    "mov.u32 %t, %tid.x;",
    f"and.b32 %t, %t, {THREADS - 1};",
    "mul.wide.u32 %p, %t, 8;",  # entries 2t, 2t+1 of the global int32 table: 8 bytes at 8 t
    "add.u64 %p, %p, $1;",
    "ld.global.v2.b32 {%e0, %e1}, [%p];",
    "mov.u32 %a, qlora_pair_lut;",
    "mad.lo.u32 %a, %t, " + str(2 * LANE_STRIDE) + ", %a;",  # entry 2t starts at 2 t * 128
    *_stores,
    "bar.sync 0;",
    "mov.u32 $0, qlora_pair_lut;",
    "}",
])


# ---- host side ---------------------------------------------------------------------------------
def pair_table(code, dtype):
    """int32 ``[256]`` on code's device: entry b = (level[b >> 4] | level[b & 15] << 16) in 16-bit
    ``dtype`` (bf16/fp16, rounded to nearest even), the fill's source. Cached on the code tensor
    with the byte planes (rebuilt if the table is modified)."""
    import torch

    from ._decode import planes

    planes(code, dtype)  # makes sure the cache is current for this table version
    cache = code._qlora_planes[1]
    out = cache.get((dtype, "pairs"))
    if out is None:
        bits = code.to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF  # [16]
        b = torch.arange(256, device=code.device)
        out = bits[b >> 4] | (bits[b & 15] << 16)
        out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)
        cache[(dtype, "pairs")] = out
    return out


def lut_source(code, dtype):
    """int32 ``[512]``: ``pair_table(code, dtype)`` followed by 32 copies of ``planes(code, dtype)``
    (lane-major), what ``kernels.gemv_tc`` reads: the fill's source and the byte planes of its
    permute-decoded words at a per-lane address. Cached like the pair table."""
    import torch

    from ._decode import planes

    pairs = pair_table(code, dtype)
    cache = code._qlora_planes[1]
    out = cache.get((dtype, "lut"))
    if out is None:
        out = cache[(dtype, "lut")] = torch.cat([pairs, planes(code, dtype).repeat(32)])
    return out


def table_image(pairs: np.ndarray) -> np.ndarray:
    """The 32 KB the fill writes, as uint8: entry b of lane l at ``b * 128 + l * 4``."""
    pairs = np.asarray(pairs).astype(np.int64).astype(np.uint32)
    img = np.repeat(pairs[:, None], 32, axis=1)  # [256 entries, 32 lanes]
    return img.astype("<u4").view(np.uint8).reshape(-1)


def lookup_addresses(words: np.ndarray, lanes: np.ndarray, base: int = 0) -> np.ndarray:
    """The shared addresses ``DECODE_PROGRAM`` reads (its PTX semantics in numpy) for uint32
    ``words`` decoded by lanes ``lanes`` (same shape), the table at ``base``: uint32 ``[..., 4]``."""
    regs = {"w": np.asarray(words, dtype=np.uint32), "lb": np.asarray(lanes, dtype=np.uint32) * 4 + np.uint32(base)}
    addrs = []
    for op in DECODE_PROGRAM:
        kind = op[0]
        if kind == "prmt":  # prmt.b32 d, a, 0, sel: byte i of d is byte sel_i of {a, 0} (4-7: zero)
            a, sel = regs[op[2]], op[3]
            out = np.zeros_like(a)
            for i in range(4):
                n = (sel >> (4 * i)) & 7
                if n < 4:
                    out |= ((a >> np.uint32(8 * n)) & np.uint32(0xFF)) << np.uint32(8 * i)
            regs[op[1]] = out
        elif kind == "shl":
            regs[op[1]] = (regs[op[2]].astype(np.uint64) << np.uint64(op[3])).astype(np.uint32)
        elif kind == "shr":
            regs[op[1]] = regs[op[2]] >> np.uint32(op[3])
        elif kind == "and":
            regs[op[1]] = regs[op[2]] & np.uint32(op[3])
        elif kind == "or":
            regs[op[1]] = regs[op[2]] | regs[op[3]]
        elif kind == "add":
            regs[op[1]] = (regs[op[2]].astype(np.uint64) + regs[op[3]]).astype(np.uint32)
        elif kind == "lds":
            addrs.append(regs[op[2]])
    return np.stack(addrs, axis=-1)


def emulate_decode(words: np.ndarray, lanes: np.ndarray, image: np.ndarray, base: int = 0x400) -> np.ndarray:
    """``DECODE_PROGRAM`` on ``image`` (``table_image``) placed at shared address ``base``: the
    uint32 pairs o0..o3 ``[..., 4]`` that lanes ``lanes`` read for ``words``."""
    a = lookup_addresses(words, lanes, base).astype(np.int64)
    if (a % 4).any():
        raise ValueError("misaligned ld.shared.b32")
    smem = np.zeros(base + image.size, dtype=np.uint8)
    smem[base:] = image
    return sum(smem[a + i].astype(np.uint32) << np.uint32(8 * i) for i in range(4))


# ---- Triton helpers ------------------------------------------------------------------------------
_FILL = tl.constexpr(FILL_PTX)
_DECODE = tl.constexpr(DECODE_PTX)


@triton.jit
def lut_fill(pairs_ptr):
    """Fill this program's shared table from ``pair_table`` (int32 [256]); returns its address.
    Call once, on the program's straight-line path, with exactly 128 threads (num_warps=4)."""
    return tl.inline_asm_elementwise(_FILL, "=r,l", [pairs_ptr.to(tl.int64, bitcast=True)], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def lut_lane4(base):
    """``4 * %laneid``: this lane's slot in every entry (a scalar; ``base`` orders it after the fill)."""
    return tl.inline_asm_elementwise("mov.u32 $0, %laneid; shl.b32 $0, $0, 2;", "=r,r", [base], dtype=tl.int32,
                                     is_pure=True, pack=1)


@triton.jit
def decode8_lds(w, lb, DTYPE: tl.constexpr):
    """GPU: int32 words -> the levels rounded to DTYPE (bf16/fp16) from the shared table, shape + [8];
    ``lb`` = the fill's address + ``lut_lane4`` (one register: a table base of its own would sit in a
    uniform register, which a kernel with many MMA descriptors runs short of)."""
    o = tl.inline_asm_elementwise(_DECODE, "=r,=r,=r,=r,r,r", [w, lb], dtype=(tl.int32,) * 4,
                                  is_pure=False, pack=1)
    return join8(_lo16(o[0], DTYPE), _hi16(o[0], DTYPE), _lo16(o[1], DTYPE), _hi16(o[1], DTYPE),
                 _lo16(o[2], DTYPE), _hi16(o[2], DTYPE), _lo16(o[3], DTYPE), _hi16(o[3], DTYPE))


@triton.jit
def decode8_lds_scaled(w, lb, am2, DTYPE: tl.constexpr):
    """GPU: like ``decode8_lds``, each level pair then multiplied by its block's absmax (``am2``
    from ``kernels._decode.pair16``) with ``mul.rn.{bf16x2,f16x2}``: ``DTYPE(DTYPE(level) *
    DTYPE(absmax))``, as ``kernels._decode.decode8_prmt_scaled`` rounds it; shape + [8]."""
    o = tl.inline_asm_elementwise(_DECODE, "=r,=r,=r,=r,r,r", [w, lb], dtype=(tl.int32,) * 4,
                                  is_pure=False, pack=1)
    mul: tl.constexpr = "mul.rn.bf16x2 $0, $1, $2;" if DTYPE == tl.bfloat16 else "mul.rn.f16x2 $0, $1, $2;"
    s0 = tl.inline_asm_elementwise(mul, "=r,r,r", [o[0], am2], dtype=tl.int32, is_pure=True, pack=1)
    s1 = tl.inline_asm_elementwise(mul, "=r,r,r", [o[1], am2], dtype=tl.int32, is_pure=True, pack=1)
    s2 = tl.inline_asm_elementwise(mul, "=r,r,r", [o[2], am2], dtype=tl.int32, is_pure=True, pack=1)
    s3 = tl.inline_asm_elementwise(mul, "=r,r,r", [o[3], am2], dtype=tl.int32, is_pure=True, pack=1)
    return join8(_lo16(s0, DTYPE), _hi16(s0, DTYPE), _lo16(s1, DTYPE), _hi16(s1, DTYPE),
                 _lo16(s2, DTYPE), _hi16(s2, DTYPE), _lo16(s3, DTYPE), _hi16(s3, DTYPE))
