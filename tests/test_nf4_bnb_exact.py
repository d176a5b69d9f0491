"""Bit-exactness with bitsandbytes (0.50.x CPU path), the format we interchange.

Codes, absmax codes, nested absmax, offset and dequantized values must be *equal*, not close.
"""

import pytest
import torch

import nf4

bnbf = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(3, 100), (333, 777), (1, 33), (65, 64), (4097,)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _bnb(w, quant_type, blocksize, nested):
    return bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)


def _assert_same_state(qt, q, s):
    assert torch.equal(qt.data, q), "packed codes"
    assert torch.equal(qt.absmax, s.absmax), "absmax (codes when nested)"
    if s.nested:
        assert torch.equal(qt.nested_absmax, s.state2.absmax), "nested absmax"
        assert qt.offset.item() == s.offset.item(), "offset"
        assert torch.equal(qt.nested_code, s.state2.code), "nested map"
    assert torch.equal(qt.code, s.code)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_codes_and_state_equal_bitsandbytes(shape, dtype, quant_type, nested):
    w = (torch.randn(shape) * 0.02).to(dtype)
    q, s = _bnb(w, quant_type, 64, nested)
    qt = nf4.quantize(w, quant_type, 64, nested)
    _assert_same_state(qt, q, s)
    for out_dtype in DTYPES:
        s.dtype = out_dtype
        assert torch.equal(bnbf.dequantize_4bit(q, s).reshape(-1), qt.dequantize(out_dtype).reshape(-1)), out_dtype


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
@pytest.mark.parametrize("nested", [False, True])
def test_every_blocksize_equals_bitsandbytes(blocksize, nested):
    w = torch.randn(257, 301, dtype=torch.bfloat16)  # 77357 elements: odd, partial last block
    q, s = _bnb(w, "nf4", blocksize, nested)
    qt = nf4.quantize(w, "nf4", blocksize, nested)
    _assert_same_state(qt, q, s)
    assert torch.equal(bnbf.dequantize_4bit(q, s), qt.dequantize())


def test_large_double_quantized_weight_equals_bitsandbytes():
    # 1M weights -> 16384 absmax values: exercises the 8-bit LUT rounding of the nested absmax
    # at scale, the compiled dequantization path, and chunking (chunk smaller than the tensor).
    w = torch.randn(1024, 1024) * 0.02
    q, s = _bnb(w, "nf4", 64, True)
    qt = nf4.quantize(w, "nf4", 64, True, chunk_elements=100_000)
    _assert_same_state(qt, q, s)
    s.dtype = torch.bfloat16
    assert torch.equal(bnbf.dequantize_4bit(q, s), qt.dequantize(torch.bfloat16))


def test_ties_go_to_the_lower_code_like_bitsandbytes():
    # Values exactly on the midpoint thresholds, scaled by absmax 1.0 (so x * 1/absmax == x).
    for code in (nf4.NF4, nf4.FP4):
        srt = code.sort().values
        mids = (srt[:-1] + srt[1:]) / 2
        w = torch.cat([torch.ones(1), mids, -mids, torch.zeros(64 * 3 - 1 - 2 * mids.numel())])
        quant_type = "nf4" if code is nf4.NF4 else "fp4"
        q, s = _bnb(w, quant_type, 64, False)
        qt = nf4.quantize(w, quant_type, 64, False)
        assert torch.equal(qt.data, q)
    # the NOTES example: 0.0397901497... sits on the 7|8 threshold and goes to code 7
    w = torch.tensor([1.0, float(mids_nf4 := (nf4.NF4[7] + nf4.NF4[8]) / 2)] + [0.0] * 62)
    codes = nf4.blockwise.unpack_nibbles(nf4.quantize(w, "nf4", 64, False).data, 64)
    assert codes[1].item() == 7 and mids_nf4 == pytest.approx(0.0397901497)


def test_all_zero_blocks_match_and_dequantize_to_exact_zero():
    w = torch.randn(64 * 8)
    w[64:192] = 0.0  # two all-zero blocks
    w[-64:] = 0.0
    for nested in (False, True):
        q, s = _bnb(w, "nf4", 64, nested)
        qt = nf4.quantize(w, "nf4", 64, nested)
        _assert_same_state(qt, q, s)
        out = qt.dequantize()
        assert torch.equal(out[64:192], torch.zeros(128)) and torch.equal(out[-64:], torch.zeros(64))
        assert (qt.data.view(-1)[32:96] == 0x77).all()  # code 7 is NF4's exact zero


def test_nearest_rounding_of_nested_absmax_is_an_honest_alternative():
    # 'lut16' (default) reproduces bitsandbytes' CPU kernel; 'nearest' is exact nearest-level
    # rounding. They disagree only where the scaled value is within half a LUT bin (1.5e-5)
    # of a midpoint, by one code, and the decoded absmax barely moves.
    w = torch.randn(1024, 1024)
    a = nf4.quantize(w, double_quant=True)
    b = nf4.quantize(w, double_quant=True, nested_rounding="nearest")
    differ = (a.absmax != b.absmax)
    assert differ.float().mean().item() < 0.01
    assert (a.absmax.int() - b.absmax.int()).abs().max().item() <= 1
    true = nf4.quantize(w, double_quant=False).absmax
    scale2 = a.nested_absmax.repeat_interleave(256)[: true.numel()]
    err_lut = (a.dequantize_absmax() - true).abs()
    err_nearest = (b.dequantize_absmax() - true).abs()
    # off by at most one bin (1/32767.5 wide in z) from the true midpoint: error grows <= 2 x 1.53e-5
    assert (err_lut <= err_nearest + 3.06e-5 * scale2 + 1e-6).all()
    q, s = _bnb(w, "nf4", 64, True)
    assert torch.equal(a.absmax, s.absmax)


def test_bitsandbytes_avx512_dequantize_misreads_blocks_that_cross_rows():
    # Found while building this: bitsandbytes 0.50.2's CPU C kernel for dequantize_4bit
    # decodes 2-D weights row by row, so when the last dim is a multiple of 16 but not of the
    # blocksize (e.g. [64, 160] at blocksize 64), blocks that cross a row end get the wrong
    # absmax. Its own pure-torch path agrees with ours; its C path does not.
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    w = torch.randn(64, 160)
    q, s = _bnb(w, "nf4", 64, False)
    qt = nf4.quantize(w, "nf4", 64, False)
    assert torch.equal(qt.data, q) and torch.equal(qt.absmax, s.absmax)  # same quantization
    torch_path = _dequantize_4bit_compute(q.reshape(-1), s.absmax, s.code, 64, w.shape, torch.float32)
    assert torch.equal(qt.dequantize(), torch_path)
    c_path = bnbf.dequantize_4bit(q, s)
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        # The misread is in the AVX-512 kernel only: on AVX2 machines (checked 2026-12-02 on an
        # AMD EPYC without AVX-512) the C path decodes these blocks correctly.
        assert torch.equal(c_path, torch_path)
        return
    assert not torch.equal(c_path, torch_path)
    bound = s.absmax.max().item() * 0.2  # NF4's largest half-gap is 0.139 of absmax
    assert (qt.dequantize() - w).abs().max().item() < bound < (c_path - w).abs().max().item()


def test_subnormal_blocks_flush_to_zero_like_bitsandbytes():
    # Found by hypothesis: bitsandbytes clamps absmax to >= 1e-38 before taking 1/absmax, so
    # a block whose values are all subnormal scales to ~0 and decodes to exact zeros. We match.
    w = torch.cat([torch.full((64,), 6.5e-41), torch.randn(64)])
    q, s = _bnb(w, "nf4", 64, False)
    qt = nf4.quantize(w, "nf4", 64, False)
    _assert_same_state(qt, q, s)
    assert torch.equal(qt.dequantize()[:64], torch.zeros(64))
