"""Decoding 4-bit codes inside the kernels: eight codes per 32-bit word, three ways.

A packed byte j holds element 2j in its high nibble and element 2j+1 in its low nibble
(bitsandbytes' layout), so in a little-endian 32-bit word ``w`` element ``e`` (0..7) is the
nibble ``e ^ 1``:  bits [3:0] = e1, [7:4] = e0, [11:8] = e3, [15:12] = e2, ...

Every decoder returns the eight values of a word in element order (e0..e7) as a new last
axis of size 8, so ``[..., W]`` words become ``[..., W, 8]`` values, i.e. ``[..., 8 W]``
weights in their natural order after a reshape.

- ``table``  plain Triton: ``code[(w >> 4 (e ^ 1)) & 15]`` gathered from the 16-entry table.
  Runs everywhere (the interpreter included); the reference the other two are proven against.
- ``shfl``   GPU only. Every lane of a warp holds one table entry, ``T[lane & 15]`` (float32), and
  ``shfl.sync.idx`` with segment mask 0x10 reads lane ``(lane & 16) | (b & 15)``: one shuffle
  per code, the code's nibble used in place as the source lane (PTX: only ``b[4:0]`` is read),
  so a code costs a shift and a shuffle and yields the *exact* float32 level.
- ``prmt``   GPU only. The 16 levels rounded to bf16 (or fp16) live in eight registers as byte
  planes (low bytes of entries 0-7, 8-15; high bytes likewise); ``prmt.b32`` looks four codes up
  in one plane-half per instruction, a byte mask built from each code's bit 3 picks the half
  (``lop3``), and two final ``prmt`` interleave low and high bytes into bf16x2 pairs: 21
  ALU instructions for 8 codes, no memory access. Used where the values feed a tensor-core dot.

The two asm decoders are written once, as instruction lists (``SHFL_PROGRAM``,
``PRMT_PROGRAM``), from which both the PTX text and a bit-exact Python emulator of the PTX
semantics (``emulate``) are generated. Tests run the emulator on every code in every nibble
position (and random words) against the table; ptxas checks the generated text when the
performance model compiles it (tools/perf_model.py); on a GPU, ``benchmarks.gpu_checks`` runs the
asm against the ``table`` decoder bit for bit.
"""

from __future__ import annotations

import numpy as np
import triton
import triton.language as tl

__all__ = ["SHFL_PROGRAM", "PRMT_PROGRAM", "SHFL_SEGMENT", "render_ptx", "emulate", "prmt_planes_host", "planes",
           "emulate_shfl", "DECODERS"]

DECODERS = ("table", "shfl", "prmt")

# shfl.sync.idx "c" operand: bits [12:8] segment mask, [4:0] clamp. Segment mask 0b10000 makes
# the source lane (lane & 16) | (b & 15): lanes 0-15 read lanes 0-15 and 16-31 read 16-31, each
# half holding the 16-entry table, so the low nibble of b is the code.
SHFL_SEGMENT = (0x10 << 8) | 0x1F


def _nibble(e: int) -> int:
    """Nibble position (0 = bits [3:0]) of element e in its 32-bit word."""
    return e ^ 1


# ---- the two asm programs, as data -----------------------------------------------------------
# Operands: "w" the packed word (input), "lane" the lane's table value (input, shfl only),
# "p0".."p7" the byte planes (inputs, prmt only), "o0".. outputs, anything else a temporary.

def _shfl_program(elements=range(8)) -> list[tuple]:
    """Shuffle-decode ``elements`` of the word: a shift (none for nibble 0) and a shuffle each."""
    prog = []
    for e in elements:
        shift = 4 * _nibble(e)
        src = "w"
        if shift:
            prog.append(("shr", "t", "w", shift))
            src = "t"
        prog.append(("shfl", f"o{e}", "lane", src, SHFL_SEGMENT))
    return prog


SHFL_PROGRAM = _shfl_program()

# Byte masks of bit 3 (code >= 8) for the codes feeding prmt output bytes 0..3: the selector
# nibble i (i < 4) is code nibble i, whose bit 3 is bit 4i+3 of w. With a = w << 4 and b = w,
# prmt in "sign replicate" mode (selector bit 3) copies the msb of a chosen byte to all 8 bits:
# msb of (w << 4).byte0 = bit 3, w.byte0 = bit 7, (w << 4).byte1 = bit 11, w.byte1 = bit 15.
MASK_LOW = 0xD9C8  # bytes <- rep(a.b0), rep(b.b0), rep(a.b1), rep(b.b1)
MASK_HIGH = 0xFBEA  # the same for nibbles 4..7: a.b2, b.b2, a.b3, b.b3
# lop3 truth table for (a & ~c) | (b & c) with a=0xF0, b=0xCC, c=0xAA
SELECT_LUT = 0xD8
# Interleave: value e (low byte from plane L, high byte from plane H) of the four codes in one
# plane register (byte i = code nibble i = element i ^ 1) into bf16x2 pairs in element order.
PAIR_01 = 0x4051  # (L.b1, H.b1, L.b0, H.b0) = (e0 lo, e0 hi, e1 lo, e1 hi)
PAIR_23 = 0x6273  # (L.b3, H.b3, L.b2, H.b2) = (e2, e3)


def prmt_program(scale: str | None = None) -> list[tuple]:
    """The byte-permute decoder; with ``scale`` ('bf16' or 'f16') each output pair is multiplied by
    the operand "am" (the block's absmax as a 16-bit pair) with ``mul.rn.{bf16x2,f16x2}``."""
    prog = [
        ("and", "s", "w", 0x77777777),      # 3-bit selectors (bit 3 would mean sign-replicate)
        ("shr", "sh", "s", 16),             # selectors of nibbles 4..7 in the low half
        ("shl", "w4", "w", 4),
        ("prmt", "m0", "w4", "w", MASK_LOW),
        ("prmt", "m1", "w4", "w", MASK_HIGH),
    ]
    outs = 0
    for sel, mask in (("s", "m0"), ("sh", "m1")):
        prog += [
            ("prmt", "a", "p0", "p1", sel), ("prmt", "b", "p2", "p3", sel),   # low bytes, entries 0-7 / 8-15
            ("lop3", "lo", "a", "b", mask, SELECT_LUT),
            ("prmt", "a", "p4", "p5", sel), ("prmt", "b", "p6", "p7", sel),   # high bytes
            ("lop3", "hi", "a", "b", mask, SELECT_LUT),
        ]
        for j, pair in ((outs, PAIR_01), (outs + 1, PAIR_23)):
            if scale:
                prog += [("prmt", "v", "lo", "hi", pair), ("mul_" + scale, f"o{j}", "v", "am")]
            else:
                prog.append(("prmt", f"o{j}", "lo", "hi", pair))
        outs += 2
    return prog


PRMT_PROGRAM = prmt_program()


def _mixed_program() -> list[tuple]:
    """Elements 0-3 by shuffle (exact float32), elements 4-7 by byte permutes on fp16 planes,
    widened to float32: half the shuffles of ``SHFL_PROGRAM`` (the MIO path is the M = 1 GEMV's
    bound) for 16 more ALU instructions; levels 4-7 are the fp16 roundings (2^-11 relative)."""
    prog = _shfl_program(range(4))
    prog += [
        ("shr", "sh", "w", 16), ("and", "sh", "sh", 0x7777),  # selectors of nibbles 4..7
        ("shl", "w4", "w", 4), ("prmt", "m1", "w4", "w", MASK_HIGH),
        ("prmt", "a", "p0", "p1", "sh"), ("prmt", "b", "p2", "p3", "sh"), ("lop3", "lo", "a", "b", "m1", SELECT_LUT),
        ("prmt", "a", "p4", "p5", "sh"), ("prmt", "b", "p6", "p7", "sh"), ("lop3", "hi", "a", "b", "m1", SELECT_LUT),
        ("prmt", "v", "lo", "hi", PAIR_01), ("unpack_f16", "o4", "o5", "v"),
        ("prmt", "v", "lo", "hi", PAIR_23), ("unpack_f16", "o6", "o7", "v"),
    ]
    return prog


MIXED_PROGRAM = _mixed_program()


def _prmt_f32_program() -> list[tuple]:
    """``PRMT_PROGRAM`` on fp16 planes with each fp16 level widened to float32 (8 outputs)."""
    prog = []
    for op in PRMT_PROGRAM:
        if op[0] == "prmt" and op[1].startswith("o"):
            j = int(op[1][1:])
            prog += [("prmt", "v", op[2], op[3], op[4]), ("unpack_f16", f"o{2 * j}", f"o{2 * j + 1}", "v")]
        else:
            prog.append(op)
    return prog


PRMT_F32_PROGRAM = _prmt_f32_program()


# ---- PTX text ------------------------------------------------------------------------------------
def render_ptx(program: list[tuple], outputs: int, inputs: list[str]) -> str:
    """PTX for ``tl.inline_asm_elementwise``: outputs are $0..$(outputs-1), then ``inputs``."""
    regs = {f"o{i}": f"${i}" for i in range(outputs)}
    regs.update({name: f"${outputs + i}" for i, name in enumerate(inputs)})
    temps = sorted({op[1] for op in program if op[1] not in regs})
    lines = ["{"]
    if temps:
        lines.append(".reg .b32 " + ", ".join(f"%{t}" for t in temps) + ";")
    if any(op[0] == "unpack_f16" for op in program):
        lines.append(".reg .b16 %h0, %h1;")

    def r(name):
        return regs.get(name) or f"%{name}"

    for op in program:
        kind = op[0]
        if kind in ("and", "shr", "shl"):
            ptx = {"and": "and.b32", "shr": "shr.b32", "shl": "shl.b32"}[kind]
            lines.append(f"{ptx} {r(op[1])}, {r(op[2])}, {op[3]:#x};")
        elif kind == "prmt":
            sel = op[4] if isinstance(op[4], str) else None
            lines.append(f"prmt.b32 {r(op[1])}, {r(op[2])}, {r(op[3])}, {r(sel) if sel else hex(op[4])};")
        elif kind == "lop3":
            lines.append(f"lop3.b32 {r(op[1])}, {r(op[2])}, {r(op[3])}, {r(op[4])}, {op[5]:#x};")
        elif kind == "shfl":
            lines.append(f"shfl.sync.idx.b32 {r(op[1])}, {r(op[2])}, {r(op[3])}, {op[4]:#x}, 0xffffffff;")
        elif kind in ("mul_bf16", "mul_f16"):
            lines.append(f"mul.rn.{kind[4:]}x2 {r(op[1])}, {r(op[2])}, {r(op[3])};")
        elif kind == "unpack_f16":  # the two fp16 halves of a register, widened to float32
            lines += [f"mov.b32 {{%h0, %h1}}, {r(op[3])};", f"cvt.f32.f16 {r(op[1])}, %h0;",
                      f"cvt.f32.f16 {r(op[2])}, %h1;"]
        else:  # pragma: no cover - programs are module constants
            raise ValueError(f"unknown op {kind!r}")
    lines.append("}")
    return "\n".join(lines)


SHFL_PTX = render_ptx(SHFL_PROGRAM, 8, ["w", "lane"])
_PLANES = ["p0", "p1", "p2", "p3", "p4", "p5", "p6", "p7"]
PRMT_PTX = render_ptx(PRMT_PROGRAM, 4, ["w", *_PLANES])
PRMT_SCALED_PTX = {s: render_ptx(prmt_program(s), 4, ["w", *_PLANES, "am"]) for s in ("bf16", "f16")}
MIXED_PTX = render_ptx(MIXED_PROGRAM, 8, ["w", "lane", *_PLANES])
PRMT_F32_PTX = render_ptx(PRMT_F32_PROGRAM, 8, ["w", *_PLANES])
LANE_PTX = "mov.u32 $0, %laneid;"


# ---- the PTX semantics in numpy (uint32), for tests -------------------------------------------
def _prmt(a, b, c):
    """PTX ``prmt.b32`` default mode: byte i of d <- byte (c >> 4i) & 7 of {b, a}; if bit 3 of
    that selector nibble is set, the msb of the chosen byte is replicated to all 8 bits."""
    a = np.asarray(a, dtype=np.uint64)
    b = np.asarray(b, dtype=np.uint64)
    c = np.asarray(c, dtype=np.uint64)
    src = a | (b << np.uint64(32))
    out = np.zeros(np.broadcast(a, b, c).shape, dtype=np.uint64)
    for i in range(4):
        nib = (c >> np.uint64(4 * i)) & np.uint64(15)
        byte = (src >> ((nib & np.uint64(7)) * np.uint64(8))) & np.uint64(0xFF)
        rep = np.where((byte >> np.uint64(7)) & np.uint64(1), np.uint64(0xFF), np.uint64(0))
        byte = np.where(nib & np.uint64(8), rep, byte)
        out |= byte << np.uint64(8 * i)
    return out.astype(np.uint32)


def _lop3(a, b, c, lut):
    a, b, c = (np.asarray(v, dtype=np.uint32) for v in (a, b, c))
    out = np.zeros(np.broadcast(a, b, c).shape, dtype=np.uint32)
    for bit in range(8):  # truth table index = (a << 2) | (b << 1) | c over a=0xF0, b=0xCC, c=0xAA
        if (lut >> bit) & 1:
            ta, tb, tc = (bit >> 2) & 1, (bit >> 1) & 1, bit & 1
            term = (a if ta else ~a) & (b if tb else ~b) & (c if tc else ~c)
            out |= term
    return out


def _to16(bits: np.ndarray, fmt: str) -> np.ndarray:
    """16-bit patterns -> float32 values."""
    bits = bits.astype(np.uint32)
    if fmt == "bf16":
        return (bits << np.uint32(16)).view(np.float32)
    return bits.astype(np.uint16).view(np.float16).astype(np.float32)


def _from32(v: np.ndarray, fmt: str) -> np.ndarray:
    """float32 -> 16-bit patterns, round to nearest even (NaN stays NaN)."""
    v = np.asarray(v, dtype=np.float32)
    if fmt == "f16":
        return v.astype(np.float16).view(np.uint16).astype(np.uint32)
    b = v.view(np.uint32).astype(np.uint64)
    r = ((b + np.uint64(0x7FFF) + ((b >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16)) & np.uint64(0xFFFF)
    return np.where(np.isnan(v), np.uint32(0x7FC0), r.astype(np.uint32))


def _mul_x2(a, b, fmt: str) -> np.ndarray:
    """PTX ``mul.rn.{bf16x2,f16x2}``: both halves multiplied and rounded to nearest even. The
    product of two 16-bit floats is exact in float32, so rounding it once is the correct result."""
    a = np.asarray(a, dtype=np.uint32)
    b = np.asarray(b, dtype=np.uint32)
    out = np.zeros(np.broadcast(a, b).shape, dtype=np.uint32)
    for half in (0, 16):
        x = _to16((a >> np.uint32(half)) & np.uint32(0xFFFF), fmt)
        y = _to16((b >> np.uint32(half)) & np.uint32(0xFFFF), fmt)
        out |= _from32(x * y, fmt) << np.uint32(half)
    return out


def emulate_shfl(lane_values: np.ndarray, b: np.ndarray, c: int) -> np.ndarray:
    """PTX ``shfl.sync.idx.b32`` for a full warp: ``lane_values: [32]`` the register of each
    lane, ``b: [32, ...]`` each lane's source operand. Returns ``[32, ...]``.

        segmask = c[12:8]; clamp = c[4:0]; minLane = lane & segmask
        maxLane = minLane | (clamp & ~segmask); j = minLane | (b[4:0] & ~segmask)
        d = lane_values[j] if j <= maxLane else lane_values[lane]
    """
    segmask, clamp = (c >> 8) & 0x1F, c & 0x1F
    lane = np.arange(32).reshape((32,) + (1,) * (np.ndim(b) - 1))
    b = np.asarray(b, dtype=np.int64)
    min_lane = lane & segmask
    max_lane = min_lane | (clamp & ~segmask)
    j = min_lane | ((b & 0x1F) & ~segmask)
    return np.where(j <= max_lane, lane_values[np.minimum(j, 31)], lane_values[np.broadcast_to(lane, j.shape)])


def emulate(program: list[tuple], inputs: dict, lane_values: np.ndarray | None = None) -> dict:
    """Run ``program`` on uint32 numpy inputs (per-lane arrays for shfl programs: the first axis
    is the lane, size 32). Returns every register, outputs included."""
    regs = {k: (np.asarray(v, dtype=np.uint32) if not isinstance(v, int) else np.uint32(v))
            for k, v in inputs.items()}
    for op in program:
        kind = op[0]
        if kind == "and":
            regs[op[1]] = regs[op[2]] & np.uint32(op[3])
        elif kind == "shr":
            regs[op[1]] = regs[op[2]] >> np.uint32(op[3])
        elif kind == "shl":
            regs[op[1]] = (regs[op[2]].astype(np.uint64) << np.uint64(op[3])).astype(np.uint32)
        elif kind == "prmt":
            sel = regs[op[4]] if isinstance(op[4], str) else np.uint32(op[4])
            regs[op[1]] = _prmt(regs[op[2]], regs[op[3]], sel)
        elif kind == "lop3":
            regs[op[1]] = _lop3(regs[op[2]], regs[op[3]], regs[op[4]], op[5])
        elif kind == "shfl":
            regs[op[1]] = emulate_shfl(lane_values, regs[op[3]], op[4]).astype(np.uint32)
        elif kind in ("mul_bf16", "mul_f16"):
            regs[op[1]] = _mul_x2(regs[op[2]], regs[op[3]], kind[4:])
        elif kind == "unpack_f16":
            v = np.asarray(regs[op[3]], dtype=np.uint32)
            regs[op[1]] = _to16(v & np.uint32(0xFFFF), "f16").view(np.uint32)
            regs[op[2]] = _to16(v >> np.uint32(16), "f16").view(np.uint32)
        else:  # pragma: no cover
            raise ValueError(f"unknown op {kind!r}")
    return regs


def prmt_planes_host(bits16: np.ndarray) -> list[int]:
    """The eight plane registers for 16 16-bit patterns (what ``planes`` builds on the device)."""
    bits16 = [int(v) & 0xFFFF for v in bits16]
    planes = []
    for shift in (0, 8):
        for base in (0, 4, 8, 12):
            planes.append(sum(((bits16[base + i] >> shift) & 0xFF) << (8 * i) for i in range(4)))
    return planes


def planes(code, dtype):
    """int32 ``[8]`` on code's device: the byte planes of the 16 levels ``code`` rounded to ``dtype``
    (bf16 or fp16): low bytes of entries 0-3, 4-7, 8-11, 12-15, then the high bytes. Built with torch
    ops on the device (no host sync) and cached on the code tensor (rebuilt if it is modified)."""
    import torch

    cache = getattr(code, "_qlora_planes", None)
    if cache is None or cache[0] != code._version:
        cache = (code._version, {})
        code._qlora_planes = cache
    out = cache[1].get(dtype)
    if out is None:
        bits = code.to(dtype).view(torch.int16).to(torch.int64) & 0xFFFF  # [16]
        shifts = torch.tensor([0, 8, 16, 24], device=code.device, dtype=torch.int64)
        lo = ((bits & 0xFF).view(4, 4) << shifts).sum(1)
        hi = (((bits >> 8) & 0xFF).view(4, 4) << shifts).sum(1)
        out = torch.cat([lo, hi])
        out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)  # the same 32 bits, as int32
        cache[1][dtype] = out
    return out


# ---- Triton helpers ------------------------------------------------------------------------------
_SHFL_PTX = tl.constexpr(SHFL_PTX)
_MIXED_PTX = tl.constexpr(MIXED_PTX)
_PRMT_F32_PTX = tl.constexpr(PRMT_F32_PTX)
_PRMT_PTX = tl.constexpr(PRMT_PTX)
_PRMT_BF16_PTX = tl.constexpr(PRMT_SCALED_PTX["bf16"])
_PRMT_F16_PTX = tl.constexpr(PRMT_SCALED_PTX["f16"])
_LANE_PTX = tl.constexpr(LANE_PTX)


@triton.jit
def join8(e0, e1, e2, e3, e4, e5, e6, e7):
    """Eight tensors of one shape -> that shape + [8], element i from ``e{i}``."""
    j = tl.join(tl.join(tl.join(e0, e4), tl.join(e2, e6)), tl.join(tl.join(e1, e5), tl.join(e3, e7)))
    return tl.reshape(j, e0.shape + [8])


@triton.jit
def decode8_table(w, code_ptr):
    """Plain Triton: int32 words -> float32 ``code[nibble]``, shape + [8]."""
    e0 = tl.load(code_ptr + ((w >> 4) & 15))
    e1 = tl.load(code_ptr + (w & 15))
    e2 = tl.load(code_ptr + ((w >> 12) & 15))
    e3 = tl.load(code_ptr + ((w >> 8) & 15))
    e4 = tl.load(code_ptr + ((w >> 20) & 15))
    e5 = tl.load(code_ptr + ((w >> 16) & 15))
    e6 = tl.load(code_ptr + ((w >> 28) & 15))
    e7 = tl.load(code_ptr + ((w >> 24) & 15))
    return join8(e0, e1, e2, e3, e4, e5, e6, e7)


@triton.jit
def lane_table(code_ptr, like):
    """A float32 tensor shaped like ``like`` whose every element held by a lane is ``code[lane & 15]``
    (GPU only: reads %laneid). Loop-invariant: build it once, before the K or row loop."""
    zero = tl.zeros(like.shape, tl.int32)
    lane = tl.inline_asm_elementwise(_LANE_PTX, "=r,r", [zero], dtype=tl.int32, is_pure=True, pack=1)
    return tl.load(code_ptr + (lane & 15))


@triton.jit
def decode8_shfl(w, lane_t):
    """GPU: int32 words -> exact float32 levels by warp shuffles (``SHFL_PROGRAM``), shape + [8].
    ``lane_t`` comes from ``lane_table``. All 32 lanes must be converged (straight-line code)."""
    e = tl.inline_asm_elementwise(_SHFL_PTX, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [w, lane_t],
                                  dtype=(tl.float32,) * 8, is_pure=False, pack=1)
    return join8(e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7])


@triton.jit
def decode8_mixed(w, lane_t, p0, p1, p2, p3, p4, p5, p6, p7):
    """GPU: int32 words -> float32 levels, elements 0-3 exact (shuffle), 4-7 from fp16 planes
    (``MIXED_PROGRAM``; planes from ``planes(code, torch.float16)``), shape + [8]."""
    e = tl.inline_asm_elementwise(_MIXED_PTX, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r",
                                  [w, lane_t, p0, p1, p2, p3, p4, p5, p6, p7],
                                  dtype=(tl.float32,) * 8, is_pure=False, pack=1)
    return join8(e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7])


@triton.jit
def decode8_prmt_f32(w, p0, p1, p2, p3, p4, p5, p6, p7):
    """GPU: int32 words -> float32 levels rounded to fp16 by byte permutes (no memory access);
    planes from ``planes(code, torch.float16)``, shape + [8]."""
    e = tl.inline_asm_elementwise(_PRMT_F32_PTX, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r,r",
                                  [w, p0, p1, p2, p3, p4, p5, p6, p7], dtype=(tl.float32,) * 8, is_pure=True, pack=1)
    return join8(e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7])


@triton.jit
def load_planes(planes_ptr):
    """The eight byte-plane registers (``planes(code, dtype)``: int32 [8]), loaded once per program."""
    return (tl.load(planes_ptr + 0), tl.load(planes_ptr + 1), tl.load(planes_ptr + 2), tl.load(planes_ptr + 3),
            tl.load(planes_ptr + 4), tl.load(planes_ptr + 5), tl.load(planes_ptr + 6), tl.load(planes_ptr + 7))


@triton.jit
def _lo16(v, DTYPE: tl.constexpr):
    return v.to(tl.int16).to(DTYPE, bitcast=True)


@triton.jit
def _hi16(v, DTYPE: tl.constexpr):
    return (v >> 16).to(tl.int16).to(DTYPE, bitcast=True)


@triton.jit
def decode8_prmt(w, p0, p1, p2, p3, p4, p5, p6, p7, DTYPE: tl.constexpr):
    """GPU: int32 words -> the levels rounded to DTYPE (bf16/fp16) by byte permutes, shape + [8]."""
    o = tl.inline_asm_elementwise(_PRMT_PTX, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r", [w, p0, p1, p2, p3, p4, p5, p6, p7],
                                  dtype=(tl.int32,) * 4, is_pure=True, pack=1)
    return join8(_lo16(o[0], DTYPE), _hi16(o[0], DTYPE), _lo16(o[1], DTYPE), _hi16(o[1], DTYPE),
                 _lo16(o[2], DTYPE), _hi16(o[2], DTYPE), _lo16(o[3], DTYPE), _hi16(o[3], DTYPE))


@triton.jit
def pair16(v, DTYPE: tl.constexpr):
    """float32 ``v`` rounded to DTYPE, its 16-bit pattern in both halves of an int32 (an x2 operand)."""
    b = v.to(DTYPE).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return b | (b << 16)


@triton.jit
def decode8_prmt_scaled(w, p0, p1, p2, p3, p4, p5, p6, p7, am2, DTYPE: tl.constexpr):
    """GPU: like ``decode8_prmt``, each level then multiplied by its block's absmax (``am2`` from
    ``pair16``) in DTYPE: ``DTYPE(DTYPE(level) * DTYPE(absmax))``, shape + [8]."""
    if DTYPE == tl.bfloat16:
        o = tl.inline_asm_elementwise(_PRMT_BF16_PTX, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r",
                                      [w, p0, p1, p2, p3, p4, p5, p6, p7, am2], dtype=(tl.int32,) * 4, is_pure=True,
                                      pack=1)
    else:
        o = tl.inline_asm_elementwise(_PRMT_F16_PTX, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r",
                                      [w, p0, p1, p2, p3, p4, p5, p6, p7, am2], dtype=(tl.int32,) * 4, is_pure=True,
                                      pack=1)
    return join8(_lo16(o[0], DTYPE), _hi16(o[0], DTYPE), _lo16(o[1], DTYPE), _hi16(o[1], DTYPE),
                 _lo16(o[2], DTYPE), _hi16(o[2], DTYPE), _lo16(o[3], DTYPE), _hi16(o[3], DTYPE))


# ---- a self-check on the GPU -------------------------------------------------------------------
# The asm decoders are proven on CPU against an emulator of the PTX they are generated from; the
# GPU runs them once per device against the plain decoder before any kernel may use them, and a
# mismatch switches that device to the plain decoder (with a warning) instead of a wrong result.
ASSUME_VERIFIED = False  # tools/perf_model.py sets it: its stand-in driver compiles, never runs
_verified: dict = {}


@triton.jit
def _probe_kernel(w_ptr, code_ptr, planes_ptr, am_ptr, out_ptr, n, BLOCK: tl.constexpr, DECODE: tl.constexpr,
                  DTYPE: tl.constexpr):
    """``out[i, e]`` = element e of word i decoded with DECODE (float32; 16-bit for prmt)."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    w = tl.load(w_ptr + i, mask=ok, other=0)
    if DECODE == "shfl":
        v = decode8_shfl(w, lane_table(code_ptr, w))
    elif DECODE == "mixed":
        p0, p1, p2, p3, p4, p5, p6, p7 = load_planes(planes_ptr)
        v = decode8_mixed(w, lane_table(code_ptr, w), p0, p1, p2, p3, p4, p5, p6, p7)
    elif DECODE == "prmt_f32":
        p0, p1, p2, p3, p4, p5, p6, p7 = load_planes(planes_ptr)
        v = decode8_prmt_f32(w, p0, p1, p2, p3, p4, p5, p6, p7)
    elif DECODE == "prmt":
        p0, p1, p2, p3, p4, p5, p6, p7 = load_planes(planes_ptr)
        am = tl.load(am_ptr + i, mask=ok, other=1.0)
        v = decode8_prmt_scaled(w, p0, p1, p2, p3, p4, p5, p6, p7, pair16(am, DTYPE), DTYPE).to(tl.float32)
    else:
        v = decode8_table(w, code_ptr)
    tl.store(out_ptr + i[:, None] * 8 + tl.arange(0, 8)[None, :], v, mask=ok[:, None])


def probe(device, code, words, absmax, decoder: str, dtype=None):
    """Run ``decoder`` on ``words`` (int32) with table ``code`` on ``device``: ``[n, 8]`` float32."""
    import torch

    n = words.numel()
    out = torch.empty((n, 8), dtype=torch.float32, device=device)
    dt = {None: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]
    pl = planes(code, dtype if decoder == "prmt" else torch.float16)
    _probe_kernel[(-(-n // 128),)](words, code, pl, absmax, out, n, BLOCK=128, DECODE=decoder, DTYPE=dt)
    return out


def probe_expected(code, words, absmax, decoder: str, dtype=None):
    """What ``probe`` must return, from the table in torch (the specification)."""
    import torch

    w = words.to(torch.int64) & 0xFFFFFFFF
    codes = torch.stack([(w >> (4 * (e ^ 1))) & 15 for e in range(8)], dim=1)
    levels = code.float()[codes]
    if decoder == "prmt":
        return (levels.to(dtype) * absmax.to(dtype)[:, None]).float()
    if decoder == "mixed":
        return torch.cat([levels[:, :4], levels[:, 4:].half().float()], dim=1)
    if decoder == "prmt_f32":
        return levels.half().float()
    return levels


def probe_words(generator):
    """int32 ``[4096]`` (CPU) words for the decoder self-checks: every code in every nibble
    position (16 words), then 4,080 random words drawn from ``generator`` (wrapped to int32: the
    same 32 bits)."""
    import torch

    every = torch.tensor([sum(((c + e) % 16) << (4 * e) for e in range(8)) for c in range(16)], dtype=torch.int64)
    rand = torch.randint(0, 2**32, (4080,), generator=generator, dtype=torch.int64)
    return torch.cat([every, rand]).to(torch.int32)


def verified(device, code) -> bool:
    """Whether the asm decoders give exactly the plain decoder's values on ``device`` for the table
    ``code`` (checked once per device and table; True off the GPU)."""
    import warnings

    import torch

    if device.type != "cuda" or ASSUME_VERIFIED:
        return True
    key = (device, code.data_ptr())
    if key not in _verified:
        g = torch.Generator(device="cpu").manual_seed(0)
        words = probe_words(g).to(device)
        am = (torch.rand(words.numel(), generator=g) * 3 + 1e-3).to(device)
        ok = True
        try:
            ok = all(torch.equal(probe(device, code, words, am, d), probe_expected(code, words, am, d))
                     for d in ("shfl", "mixed", "prmt_f32"))
            for dt in (torch.bfloat16, torch.float16):
                ok = ok and torch.equal(probe(device, code, words, am, "prmt", dt),
                                        probe_expected(code, words, am, "prmt", dt))
        except Exception as e:  # noqa: BLE001 - any failure means: do not use the asm decoders here
            warnings.warn(f"kernels: asm decoders unavailable on {device} ({type(e).__name__}: {e}); "
                          "using the plain Triton decoder", RuntimeWarning, stacklevel=3)
            ok = False
        if not ok:
            warnings.warn(f"kernels: the asm 4-bit decoders disagree with the plain decoder on {device}; using "
                          "the plain Triton decoder (slower, exact). Please report this.", RuntimeWarning, stacklevel=3)
        _verified[key] = ok
    return _verified[key]
