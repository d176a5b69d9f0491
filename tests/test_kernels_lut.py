"""The shared-memory pair-table decoder (``kernels._lut``) of the M = 1 tensor-core GEMV, proven on
CPU piece by piece: the decode program (numpy emulation of its PTX) against the plain decoder for
every byte value in every position and every lane; the fill's stores (read from its PTX text)
against the layout the decode assumes; the host-side table and its cache. On a GPU,
``kernels.gemv_tc.verified`` runs fill and decode against the plain decoder before first use."""

import re

import numpy as np
import pytest
import torch

import nf4
from kernels import _lut

DTYPES = [torch.bfloat16, torch.float16]


def _bits16(code, dtype):
    return code.to(dtype).view(torch.int16).numpy().astype(np.uint32) & 0xFFFF


def _expected(words, code, dtype):
    """[..., 8] 16-bit patterns of the levels, element order (element 2j: high nibble of byte j)."""
    codes = np.stack([(words >> np.uint32(4 * (e ^ 1))) & np.uint32(15) for e in range(8)], axis=-1)
    return _bits16(code, dtype)[codes]


def _words():
    every = [sum(((b >> 4) << (8 * j + 4)) | ((b & 15) << (8 * j)) for j in range(4)) for b in range(256)]
    rng = np.random.default_rng(0)
    return np.concatenate([np.array(every, dtype=np.uint32),
                           rng.integers(0, 2**32, size=768, dtype=np.uint64).astype(np.uint32)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_decode_program_matches_the_plain_decoder_in_every_lane(dtype, quant_type):
    code = nf4.quantize(torch.randn(64, 64), quant_type, 64, False).code
    image = _lut.table_image(_lut.pair_table(code, dtype).numpy())
    assert image.size == _lut.TABLE_BYTES
    words = np.broadcast_to(_words(), (32, 1024))
    lanes = np.broadcast_to(np.arange(32)[:, None], words.shape)
    pairs = _lut.emulate_decode(words, lanes, image)  # [32, 1024, 4]
    got = np.stack([(pairs[..., e // 2] >> np.uint32(16 * (e % 2))) & np.uint32(0xFFFF) for e in range(8)], axis=-1)
    np.testing.assert_array_equal(got, _expected(words, code, dtype))


def test_each_lane_reads_only_its_own_bank():
    """Entry b of lane l at b * 128 + l * 4: every address a lane computes lies in bank l, so a
    warp-wide lookup never conflicts, whatever the bytes."""
    words = _words()
    for lane in range(32):
        addrs = _lut.lookup_addresses(words, np.full_like(words, lane))
        assert ((addrs // 4) % 32 == lane).all() and addrs.max() < _lut.TABLE_BYTES


def test_the_fill_writes_exactly_the_layout_the_decode_reads():
    """Replay the fill's ``st.shared`` lines (from its PTX text) for the 128 threads and compare the
    bytes with ``table_image``: every byte written once, each where the decode looks."""
    pairs = np.arange(256, dtype=np.uint32) * np.uint32(0x01010101) ^ np.uint32(0xA5A5A5A5)
    ptx = _lut.FILL_PTX
    assert f"qlora_pair_lut[{_lut.TABLE_BYTES}]" in ptx and "bar.sync 0;" in ptx
    assert re.search(r"mad\.lo\.u32 %a, %t, (\d+), %a;", ptx).group(1) == str(2 * _lut.LANE_STRIDE)
    stores = re.findall(r"st\.shared\.v4\.b32 \[%a\+(\d+)\], \{(%e[01]),", ptx)
    assert len(stores) == 2 * _lut.LANE_STRIDE // 16
    image = np.zeros(_lut.TABLE_BYTES, dtype=np.uint8)
    written = np.zeros(_lut.TABLE_BYTES, dtype=np.int64)
    for t in range(_lut.THREADS):
        a = t * 2 * _lut.LANE_STRIDE
        e = {"%e0": pairs[2 * t], "%e1": pairs[2 * t + 1]}  # ld.global.v2 at byte 8 t
        for off, reg in stores:
            lo = a + int(off)
            image[lo:lo + 16] = np.repeat(np.array([e[reg]], dtype="<u4"), 4).view(np.uint8)
            written[lo:lo + 16] += 1
    assert (written == 1).all()
    np.testing.assert_array_equal(image, _lut.table_image(pairs))


@pytest.mark.parametrize("dtype", DTYPES)
def test_lut_source_layout_and_cache(dtype):
    from kernels._decode import planes

    code = nf4.quantize(torch.randn(32, 64), "nf4", 64, False).code.clone()
    src = _lut.lut_source(code, dtype)
    assert src.dtype == torch.int32 and src.shape == (512,)
    bits = _bits16(code, dtype)
    b = np.arange(256)
    want = (bits[b >> 4] | (bits[b & 15] << 16)).astype(np.uint32)
    np.testing.assert_array_equal(src[:256].numpy().view(np.uint32), want)
    for lane in (0, 17, 31):
        assert torch.equal(src[256 + 8 * lane: 264 + 8 * lane], planes(code, dtype))
    assert _lut.lut_source(code, dtype) is src  # cached
    code[3] = 0.25  # modified in place: rebuilt
    assert not torch.equal(_lut.lut_source(code, dtype), src)


def test_the_rendered_ptx_is_the_program():
    """DECODE_PTX is generated from DECODE_PROGRAM (which the emulator runs): parse it back."""
    ops = {"shl.b32": "shl", "shr.b32": "shr", "and.b32": "and", "or.b32": "or", "add.u32": "add"}
    regs = {"$0": "o0", "$1": "o1", "$2": "o2", "$3": "o3", "$4": "w", "$5": "lb", "%t": "t"}
    parsed = []
    for line in _lut.DECODE_PTX.splitlines():
        m = re.fullmatch(r"(\S+) (\S+), (\S+), (\S+);", line)
        if (p := re.fullmatch(r"prmt\.b32 (\S+), (\S+), 0, (0x[0-9a-f]+);", line)):
            parsed.append(("prmt", regs[p.group(1)], regs[p.group(2)], int(p.group(3), 16)))
        elif m and m.group(1) in ops:
            c = m.group(4)
            parsed.append((ops[m.group(1)], regs[m.group(2)], regs[m.group(3)],
                           int(c, 16) if c.startswith("0x") else regs[c]))
        elif (m := re.fullmatch(r"ld\.shared\.b32 (\S+), \[(\S+)\];", line)):
            parsed.append(("lds", regs[m.group(1)], regs[m.group(2)]))
        else:
            assert line in ("{", "}", ".reg .b32 %t;"), line
    assert parsed == _lut.DECODE_PROGRAM
