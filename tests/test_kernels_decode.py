"""The in-kernel 4-bit decoders (``kernels._decode``), proven on CPU.

The GPU decoders are inline PTX that the Triton interpreter cannot run. They are written once as
instruction lists; the PTX text and a numpy emulator of the PTX semantics are both generated from
that one list. These tests run the emulator against the 16-entry tables on every code in every
nibble position and on random words; ptxas checks the text when tools/perf_model.py compiles it,
and ``benchmarks.gpu_checks`` compares the asm with the plain decoder bit for bit on a GPU.
"""

import numpy as np
import pytest
import torch

import nf4
from kernels import _decode as D

TABLES = {"nf4": nf4.NF4, "fp4": nf4.FP4, "int4": nf4.INT4}


def _words():
    """Every code in every nibble position (16 words), then 4096 random words."""
    every = [sum(((c + e) % 16) << (4 * e) for e in range(8)) for c in range(16)]
    rand = np.random.default_rng(0).integers(0, 2**32, size=4096, dtype=np.uint64)
    return np.concatenate([np.array(every, dtype=np.uint64), rand]).astype(np.uint32)


def _codes(w, e):
    """Element e (0..7) of each word: the high nibble of byte e // 2 for even e, the low for odd."""
    byte = (w >> np.uint32(8 * (e // 2))) & np.uint32(0xFF)
    return ((byte >> np.uint32(4)) if e % 2 == 0 else byte) & np.uint32(15)


def test_word_layout_is_bitsandbytes_packing():
    codes = torch.arange(16, dtype=torch.uint8)
    packed = nf4.blockwise.pack_nibbles(codes)  # byte j = code[2j] << 4 | code[2j+1]
    w = packed.reshape(-1).view(torch.int32).numpy().view(np.uint32)
    for e in range(8):
        assert _codes(w[:1], e)[0] == e and _codes(w[1:], e)[0] == 8 + e


@pytest.mark.parametrize("name", list(TABLES))
def test_shfl_decoder_gives_the_exact_float32_level_in_every_lane(name):
    table = TABLES[name].numpy().astype(np.float32).view(np.uint32)
    w = _words()
    lanes = np.stack([np.roll(w, 7 * lane) for lane in range(32)])  # each lane its own words
    lane_values = table[np.arange(32) & 15]  # what lane_table puts in each lane
    regs = D.emulate(D.SHFL_PROGRAM, {"w": lanes, "lane": lane_values[:, None]}, lane_values=lane_values)
    for e in range(8):
        assert np.array_equal(regs[f"o{e}"], table[_codes(lanes, e)]), e


def test_shfl_segment_mask_keeps_each_half_warp_on_its_own_table():
    # b's bits above the nibble (the next codes) must not change the source lane
    vals = np.arange(32, dtype=np.uint32) * 10
    b = np.full((32, 1), 0xFFFFFFF3, dtype=np.uint64)  # nibble 3, every other bit set
    got = D.emulate_shfl(vals, b, D.SHFL_SEGMENT)[:, 0]
    assert np.array_equal(got, np.where(np.arange(32) < 16, 30, 190))


@pytest.mark.parametrize("name", list(TABLES))
def test_mixed_decoder_gives_exact_levels_0_to_3_and_fp16_levels_4_to_7(name):
    table = TABLES[name]
    t32 = table.numpy().astype(np.float32).view(np.uint32)
    half = table.to(torch.float16).float().numpy().view(np.uint32)
    planes = D.prmt_planes_host(table.to(torch.float16).view(torch.int16).numpy().astype(np.uint16))
    w = _words()
    lanes = np.stack([np.roll(w, 5 * lane) for lane in range(32)])
    lane_values = t32[np.arange(32) & 15]
    regs = D.emulate(D.MIXED_PROGRAM, {"w": lanes, "lane": lane_values[:, None],
                                       **{f"p{i}": np.uint32(planes[i]) for i in range(8)}}, lane_values=lane_values)
    for e in range(8):
        assert np.array_equal(regs[f"o{e}"], (t32 if e < 4 else half)[_codes(lanes, e)]), e
    assert D.MIXED_PTX.count("shfl.sync") == 4  # half the shuffles of the exact decoder


@pytest.mark.parametrize("name", list(TABLES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prmt_decoder_gives_the_level_rounded_to_16_bits(name, dtype):
    bits = TABLES[name].to(dtype).view(torch.int16).numpy().astype(np.uint16)
    planes = D.prmt_planes_host(bits)
    w = _words()
    regs = D.emulate(D.PRMT_PROGRAM, {"w": w, **{f"p{i}": np.uint32(planes[i]) for i in range(8)}})
    for e in range(8):
        got = (regs[f"o{e // 2}"] >> np.uint32(16 * (e % 2))) & np.uint32(0xFFFF)
        assert np.array_equal(got, bits[_codes(w, e)].astype(np.uint32)), e


@pytest.mark.parametrize("dtype,fmt", [(torch.bfloat16, "bf16"), (torch.float16, "f16")])
def test_scaled_prmt_decoder_multiplies_by_the_absmax_once(dtype, fmt):
    bits = nf4.NF4.to(dtype).view(torch.int16).numpy().astype(np.uint16)
    planes = D.prmt_planes_host(bits)
    w = _words()
    am = np.random.default_rng(1).uniform(1e-3, 4, size=w.shape).astype(np.float32)
    am16 = torch.from_numpy(am).to(dtype)
    a = am16.view(torch.int16).numpy().astype(np.uint32) & 0xFFFF
    regs = D.emulate(D.prmt_program(fmt), {"w": w, "am": a | (a << 16),
                                           **{f"p{i}": np.uint32(planes[i]) for i in range(8)}})
    for e in range(8):
        got = (regs[f"o{e // 2}"] >> np.uint32(16 * (e % 2))) & np.uint32(0xFFFF)
        level = nf4.NF4.to(dtype)[torch.from_numpy(_codes(w, e).astype(np.int64))]
        want = (level * am16).view(torch.int16).numpy().astype(np.uint32) & 0xFFFF
        assert np.array_equal(got, want), e


def test_prmt_sign_replicate_semantics():
    # selector nibble bit 3 replicates the chosen byte's msb: the trick behind the bit-3 masks
    a, b = np.uint32(0x80_7F_01_FF), np.uint32(0x00_00_00_00)
    assert D._prmt(a, b, np.uint32(0x3210)) == 0x807F01FF  # identity
    assert D._prmt(a, b, np.uint32(0xBA98)) == 0xFF0000FF  # msb of each byte replicated
    assert D._prmt(a, b, np.uint32(0x4444)) == 0  # bytes of b


def test_ptx_text_has_one_instruction_per_program_op():
    for program, text in ((D.SHFL_PROGRAM, D.SHFL_PTX), (D.PRMT_PROGRAM, D.PRMT_PTX),
                          (D.prmt_program("bf16"), D.PRMT_SCALED_PTX["bf16"])):
        lines = [ln for ln in text.splitlines() if ln.endswith(";") and not ln.startswith(".reg")]
        assert len(lines) == len(program)
        assert all(ln.split()[0].split(".")[0] in ("and", "shr", "shl", "prmt", "lop3", "shfl", "mul") for ln in lines)
    assert len([ln for ln in D.MIXED_PTX.splitlines() if ln.endswith(";") and not ln.startswith(".reg")]) == \
        len(D.MIXED_PROGRAM) + 2 * sum(op[0] == "unpack_f16" for op in D.MIXED_PROGRAM)  # mov + 2 cvt
    assert D.PRMT_PTX.count("prmt.b32") == 14 and D.PRMT_PTX.count("lop3.b32") == 4  # 21 ALU ops for 8 codes
    assert D.SHFL_PTX.count("shfl.sync.idx.b32") == 8 and D.SHFL_PTX.count("shr.b32") == 7


def test_probe_kernel_and_its_expectation_agree_on_the_plain_decoder():
    # the GPU self-check (kernels._decode.verified) compares probe() against probe_expected();
    # on CPU the probe runs the plain decoder through the interpreter, proving both halves
    g = torch.Generator().manual_seed(0)
    words = torch.randint(0, 2**32, (300,), generator=g, dtype=torch.int64).to(torch.int32)
    am = torch.rand(300, generator=g) + 0.1
    for table in TABLES.values():
        got = D.probe(torch.device("cpu"), table, words, am, "table")
        assert torch.equal(got, D.probe_expected(table, words, am, "table"))
    assert D.verified(torch.device("cpu"), nf4.NF4)
