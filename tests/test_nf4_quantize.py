"""nf4.quantize / QuantizedTensor: behaviour, bad input, memory, and round-trip properties."""

import math
import subprocess
import sys

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import nf4
from nf4.blockwise import unpack_nibbles


def test_bits_per_parameter_formula():
    w = torch.randn(4096, 4096)
    assert nf4.quantize(w, double_quant=False).bits_per_parameter() == 4.5
    dq = nf4.quantize(w, double_quant=True).bits_per_parameter()
    assert dq == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))
    assert 4.5 - dq == pytest.approx(0.373, abs=5e-4)  # the paper's saving per parameter
    assert nf4.quantize(w, blocksize=128, double_quant=False).bits_per_parameter() == 4.25


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_names_the_first_bad_index(value):
    w = torch.randn(10, 30)
    w.view(-1)[137] = value
    w.view(-1)[200] = value
    with pytest.raises(ValueError, match="flat index 137"):
        nf4.quantize(w)
    with pytest.raises(ValueError, match="flat index 137"):
        nf4.quantize(w, chunk_elements=64)  # found in the third chunk, index still global
    nf4.quantize(w, check_finite=False)  # the switch turns the check off


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.uint8, torch.bool, torch.int64])
def test_integer_or_bool_input_is_a_type_error(dtype):
    with pytest.raises(TypeError, match=str(dtype)):
        nf4.quantize(torch.zeros(64, dtype=dtype))


def test_non_tensor_input_is_a_type_error():
    with pytest.raises(TypeError, match="list"):
        nf4.quantize([1.0, 2.0])


@pytest.mark.parametrize("blocksize", [0, 16, 48, 8192, 64.0, True])
def test_bad_blocksize_names_the_value(blocksize):
    with pytest.raises(ValueError, match=repr(blocksize)):
        nf4.quantize(torch.randn(64), blocksize=blocksize)


def test_bad_quant_type_names_the_value():
    with pytest.raises(ValueError, match="'nf3'"):
        nf4.quantize(torch.randn(64), quant_type="nf3")


@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0, 2)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_empty_tensors(shape, double_quant):
    qt = nf4.quantize(torch.empty(shape), double_quant=double_quant)
    assert qt.data.numel() == 0 and qt.absmax.numel() == 0
    out = qt.dequantize()
    assert out.shape == shape and out.dtype == torch.float32
    assert qt.bits_per_parameter() == 0.0


def test_non_contiguous_input_reads_row_major():
    base = torch.randn(96, 130)
    w = base.t()  # [130, 96], non-contiguous
    assert not w.is_contiguous()
    a, b = nf4.quantize(w), nf4.quantize(w.contiguous())
    assert torch.equal(a.data, b.data) and torch.equal(a.absmax, b.absmax)
    assert torch.equal(a.dequantize(), b.dequantize())
    sliced = base[:, ::2]
    assert torch.equal(nf4.quantize(sliced).dequantize(), nf4.quantize(sliced.contiguous()).dequantize())


@pytest.mark.parametrize("n", [64 * 7, 64 * 7 + 1, 64 * 7 + 33, 1000])
@pytest.mark.parametrize("chunk", [64, 128, 192, 300, 10**9])
def test_chunk_boundaries_do_not_change_the_result(n, chunk):
    w = torch.randn(n)
    ref = nf4.quantize(w, chunk_elements=10**9)
    got = nf4.quantize(w, chunk_elements=chunk)
    assert torch.equal(got.data, ref.data) and torch.equal(got.absmax, ref.absmax)
    assert torch.equal(got.nested_absmax, ref.nested_absmax)
    assert torch.equal(nf4.dequantize(got, chunk_elements=chunk), nf4.dequantize(ref))


def test_compiled_dequantization_is_bit_identical_to_eager():
    from nf4 import tensor as T

    w = torch.randn(1 << 20, dtype=torch.bfloat16)
    qt = nf4.quantize(w)
    pairs = T._pair_table(qt.code)
    absmax = qt.dequantize_absmax()
    eager = T._decode_blocks(qt.data.view(-1), absmax, pairs, 64, torch.bfloat16)
    assert torch.equal(qt.dequantize(), eager.view(qt.shape))  # goes through the fast path


def test_move_and_validate():
    qt = nf4.quantize(torch.randn(8, 64))
    moved = qt.to("cpu")
    assert torch.equal(moved.dequantize(), qt.dequantize())
    with pytest.raises(ValueError, match="absmax must have"):
        nf4.QuantizedTensor(qt.data, qt.shape, qt.dtype, qt.blocksize, qt.quant_type, qt.code,
                            qt.absmax[:-1], qt.offset, qt.nested_absmax, qt.nested_code)
    with pytest.raises(ValueError, match="data must be"):
        nf4.QuantizedTensor(qt.data[:-1], qt.shape, qt.dtype, qt.blocksize, qt.quant_type, qt.code,
                            qt.absmax, qt.offset, qt.nested_absmax, qt.nested_code)
    assert "bits/param=4.1" in repr(qt)


_PEAK_SCRIPT = r"""
import resource, sys, torch
sys.path.insert(0, {root!r})
import nf4
torch.set_num_threads(2)
w = torch.randn({rows}, 4096, dtype=torch.bfloat16)
w.add_(0)  # touch every page
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
qt = nf4.quantize(w)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print((after - before) / (w.numel() * w.element_size()))
"""


def test_peak_extra_memory_is_bounded_by_chunking():
    # Llama-3's 128256 x 4096 bf16 embedding (1 GiB): chunked quantization must need less
    # than 1.5x the tensor's own size of extra memory (measured here: ~0.8x, most of it the
    # 0.25x packed output and malloc's retained chunk buffers).
    root = str(__import__("pathlib").Path(nf4.__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT.format(root=root, rows=128256)],
                         capture_output=True, text=True, timeout=300, env={"NF4_COMPILE": "0", "PATH": ""})
    assert out.returncode == 0, out.stderr
    ratio = float(out.stdout.strip().splitlines()[-1])
    assert ratio < 1.5, f"peak extra memory {ratio:.2f}x the input size"


# ---- hypothesis round-trip properties ------------------------------------------------

_floats = st.floats(min_value=-1e4, max_value=1e4, width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(w=hnp.arrays(dtype="float32", shape=st.integers(1, 700), elements=_floats),
       quant_type=st.sampled_from(["nf4", "fp4", "int4"]), blocksize=st.sampled_from([32, 64, 128]))
def test_dequantize_error_is_at_most_half_the_largest_gap_times_absmax(w, quant_type, blocksize):
    w = torch.from_numpy(w)
    qt = nf4.quantize(w, quant_type, blocksize, double_quant=False)
    code = nf4.get_codebook(quant_type).sort().values
    half_gap = ((code[1:] - code[:-1]).max() / 2).item()
    absmax = qt.absmax.repeat_interleave(blocksize)[: w.numel()]
    err = (qt.dequantize() - w).abs()
    # float32 scaling/rounding adds a few ulps of absmax on top of the codebook bound
    normal = absmax >= 1e-38
    assert (err[normal] <= absmax[normal] * (half_gap + 1e-6)).all()
    # bitsandbytes clamps absmax to >= 1e-38 before scaling, so a block whose absmax is
    # subnormal scales to almost 0 and flushes towards zero: error at most its absmax
    assert (err[~normal] <= absmax[~normal]).all()


@settings(max_examples=60, deadline=None)
@given(w=hnp.arrays(dtype="float32", shape=st.integers(1, 700), elements=_floats),
       double_quant=st.booleans(), blocksize=st.sampled_from([32, 64, 256]))
def test_quantize_of_dequantize_is_the_identity_on_codes(w, double_quant, blocksize):
    qt = nf4.quantize(torch.from_numpy(w), "nf4", blocksize, double_quant)
    # Only scales that survive can give the codes back: an all-zero block (scale 0) does; a
    # subnormal scale flushes to zero (test_subnormal_blocks_flush_to_zero_like_bitsandbytes)
    # and DQ can decode a small scale as 0 (test_double_quant_loses_small_block_scales...).
    true_absmax = nf4.quantize(torch.from_numpy(w), "nf4", blocksize, False).absmax
    decoded = qt.dequantize_absmax()
    assume(bool(((decoded >= 1e-38) | ((true_absmax == 0) & (decoded == 0))).all()))
    again = nf4.quantize(qt.dequantize(), "nf4", blocksize, double_quant)
    assert torch.equal(again.data, qt.data)
    if not double_quant:
        assert torch.equal(again.absmax, qt.absmax)


@settings(max_examples=40, deadline=None)
@given(w=hnp.arrays(dtype="float32", shape=st.integers(1, 500), elements=_floats))
def test_fp4_round_trip_preserves_values(w):
    # FP4 has two zero codes (0 and 8), so compare values rather than codes. As for NF4 above, only
    # normal (or zero) block scales can give their values back: a subnormal one (w = [1.86e-40],
    # found by hypothesis) decodes towards zero (test_subnormal_blocks_flush_to_zero_like_bitsandbytes)
    # and re-quantizes to another block.
    qt = nf4.quantize(torch.from_numpy(w), "fp4", 64, False)
    assume(bool(((qt.absmax >= 1e-38) | (qt.absmax == 0)).all()))
    again = nf4.quantize(qt.dequantize(), "fp4", 64, False)
    assert torch.equal(again.dequantize(), qt.dequantize())


@settings(max_examples=50, deadline=None)
@given(codes=hnp.arrays(dtype="uint8", shape=st.integers(0, 200).map(lambda k: 2 * k),
                        elements=st.integers(0, 15)))
def test_pack_unpack_round_trip(codes):
    t = torch.from_numpy(codes)
    packed = nf4.blockwise.pack_nibbles(t)
    assert packed.numel() == t.numel() // 2
    assert torch.equal(unpack_nibbles(packed, t.numel()), t.long())


def test_double_quant_loses_small_block_scales_next_to_huge_ones():
    # Found by hypothesis. Double quantization stores absmax - mean(absmax) with 8 bits per
    # group of 256 blocks, so its absolute error scales with the largest deviation in the
    # group: next to a block of absmax 1921, blocks of absmax 1 decode to a scale of 7.75
    # (two blocks) or exactly 0 (three blocks: their weights vanish). bitsandbytes' format does
    # the same, bit for bit; it is a property of DQ when block scales span ~1000x.
    two = nf4.quantize(torch.cat([torch.full((1,), 1921.0), torch.ones(127)]), double_quant=True)
    assert two.dequantize_absmax()[1].item() == 7.75
    three = nf4.quantize(torch.cat([torch.full((1,), 1921.0), torch.ones(191)]), double_quant=True)
    assert three.dequantize_absmax()[1:].tolist() == [0.0, 0.0]
    assert torch.equal(three.dequantize()[64:], torch.zeros(128))
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = torch.cat([torch.full((1,), 1921.0), torch.ones(191)])
    q, st = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(bnbf.dequantize_4bit(q, st).view(-1), three.dequantize())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_compiled_code_search_equals_bucketize_including_ties(quant_type):
    # Large CPU inputs count the midpoints below each value with a compiled, vectorized loop
    # instead of torch.bucketize; both must give the same code for every value, ties included.
    from nf4 import blockwise as B

    code = nf4.get_codebook(quant_type)
    mids, order = B._thresholds(tuple(code.tolist()), "cpu")
    x = torch.rand(B._PIECE * 2 + 777) * 2 - 1
    x[:15] = mids
    x[B._PIECE + 3 : B._PIECE + 18] = mids  # ties inside the second compiled piece
    x[-15:] = mids  # and in the eager remainder
    x[20:24] = torch.tensor([-1.0, 1.0, 0.0, -0.0])
    ref = torch.bucketize(x, mids, out_int32=True)
    ref = order[ref] if order is not None else ref.to(torch.uint8)
    assert torch.equal(B.codes_from_scaled(x, code), ref)
