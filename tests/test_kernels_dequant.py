"""kernels.dequantize and kernels.dropout: deterministic ops, so every comparison is exact.

On CPU these run the Triton kernels through the interpreter (conftest sets TRITON_INTERPRET=1),
and compare them against ``nf4.dequantize`` / ``kernels.reference`` (the spec).
"""

import pytest
import torch

import kernels
import nf4
import triton  # noqa: E402  (after conftest set TRITON_INTERPRET)
import triton.language as tl
from kernels import reference
from kernels._tl import keep_mask
from kernels.dispatch import interpreting, use_triton

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("shape", [(33, 67), (300, 257), (1,), (2, 3, 64)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("nested", [True, False])
def test_dequantize_is_bit_identical_to_nf4(device, shape, quant_type, blocksize, nested):
    # (300, 257) at blocksize 64 has 1205 absmax blocks: 5 nested blocks of 256, the last partial
    w = torch.randn(shape, device=device) * 3
    qt = nf4.quantize(w, quant_type, blocksize, nested)
    for dtype in DTYPES:
        got = kernels.dequantize(qt, dtype)
        assert got.shape == qt.shape and got.dtype == dtype and got.is_contiguous()
        assert torch.equal(got, nf4.dequantize(qt, dtype)), dtype


@pytest.mark.parametrize("blocksize,n_blocks", [(32, 600), (64, 1200), (256, 300), (4096, 3)])
def test_whole_block_fast_path_is_bit_identical_and_taken(device, blocksize, n_blocks, monkeypatch):
    """Tensors made of whole blocks run ``_dequant_blocks_kernel`` (one absmax decode a block,
    eight codes a word); 1,200 blocks span five nested-absmax groups of 256, the last partial."""
    from kernels import dequant

    calls = []
    real = dequant._dequant_blocks_kernel

    class Spy:
        def __getitem__(self, grid):
            calls.append(grid)
            return real[grid]

    monkeypatch.setattr(dequant, "_dequant_blocks_kernel", Spy())
    w = torch.randn(n_blocks, blocksize, device=device) * 2
    for nested in (True, False):
        qt = nf4.quantize(w, "nf4", blocksize, nested)
        for dtype in (torch.bfloat16, torch.float32):
            assert torch.equal(kernels.dequantize(qt, dtype), nf4.dequantize(qt, dtype)), (nested, dtype)
    assert len(calls) == (4 if use_triton(w) else 0)


def test_dequantize_rounds_bf16_to_nearest_even(device):
    # every absmax is a float32 exactly halfway between two bf16 values (low 16 bits 0x8000),
    # with odd and even upper halves and an all-ones mantissa (the carry reaches the exponent):
    # a kernel that truncates or rounds half up (the interpreter's own cast) differs from nf4
    upper = torch.tensor([0x3F80, 0x3F81, 0x3FFF, 0x4000, 0x4001, 0x3C7F, 0x477F, 0x40FF], dtype=torch.int32)
    absmax = ((upper << 16) | 0x8000).view(torch.float32)
    w = torch.ones(64 * len(upper))
    w[1::2] = -1.0  # codes for +1.0 and -1.0
    qt = nf4.quantize(w, "nf4", 64, False)
    qt.absmax.copy_(absmax)
    qt = qt.to(device)
    got = kernels.dequantize(qt, torch.bfloat16)
    assert torch.equal(got, nf4.dequantize(qt, torch.bfloat16))
    assert torch.equal(got[::64], absmax.to(torch.bfloat16).to(device))


def test_dequantize_reference_backend_matches_spec(device):
    qt = nf4.quantize(torch.randn(65, 31, device=device), "nf4", 64, True)
    with kernels.force_backend("reference"):
        got = kernels.dequantize(qt, torch.float16)
    assert torch.equal(got, nf4.dequantize(qt, torch.float16))


def test_dequantize_empty_and_errors(device):
    qt = nf4.quantize(torch.randn(0, 8, device=device), "nf4", 64, False)
    assert kernels.dequantize(qt, torch.float32).shape == (0, 8)
    qt = nf4.quantize(torch.randn(4, 8, device=device), "nf4", 64, True)
    with pytest.raises(ValueError, match="torch.int8"):
        kernels.dequantize(qt, torch.int8)
    with pytest.raises(TypeError, match="Tensor"):
        kernels.dequantize(torch.zeros(4), torch.float32)


def test_dispatch_rule(device):
    t = torch.zeros(1, device=device)
    expected = device.type == "cuda" or interpreting()
    assert use_triton(t) == expected
    assert not use_triton(t.double()), "float64 always runs the reference"
    with kernels.force_backend("reference"):
        assert not use_triton(t)
    with pytest.raises(ValueError, match="meta"):
        use_triton(torch.zeros(1, device="meta"))
    with pytest.raises(ValueError, match="'gpu'"):
        with kernels.force_backend("gpu"):
            pass


# ---- dropout --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_kernel_equals_reference_exactly(device, dtype):
    x = torch.randn(37, 53, device=device).to(dtype)
    seed = torch.tensor(1234, device=device)
    for p in (0.1, 0.5):
        got = kernels.dropout(x, p, seed)
        assert torch.equal(got, reference.dropout(x, seed, p)), p
    xt = torch.randn(53, 37, device=device).to(dtype).t()  # non-contiguous: logical indexing
    assert torch.equal(kernels.dropout(xt, 0.3, seed), reference.dropout(xt.contiguous(), seed, 0.3))


def test_dropout_keeps_one_minus_p_and_scales(device):
    x = torch.ones(200, 500, device=device)
    p = 0.3
    y = kernels.dropout(x, p, 7)
    kept = (y != 0).float().mean().item()
    sigma = (p * (1 - p) / x.numel()) ** 0.5
    assert abs(kept - (1 - p)) < 5 * sigma
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - p)))
    # different seeds give (nearly) independent masks; same seed, same mask
    y2 = kernels.dropout(x, p, 8)
    both = ((y != 0) & (y2 != 0)).float().mean().item()
    assert abs(both - (1 - p) ** 2) < 5 * sigma
    assert torch.equal(kernels.dropout(x, p, 7), y)
    # neighbouring rows are not shifted copies of each other (the hash decorrelates indices)
    assert ((y[1:, :] != 0) == (y[:-1, :] != 0)).float().mean().item() < 0.7


def test_dropout_p_zero_is_identity_and_bad_p_raises(device):
    x = torch.randn(3, 4, device=device)
    assert kernels.dropout(x, 0.0) is x
    with pytest.raises(ValueError, match="1.0"):
        kernels.dropout(x, 1.0)


@triton.jit
def _hash_probe(out_ptr, seed_ptr, start, threshold, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    idx = start + i.to(tl.int64)
    tl.store(out_ptr + i, keep_mask(tl.load(seed_ptr), idx, threshold).to(tl.int8))


def test_hash_is_correct_beyond_int32_and_uint32_indices(device):
    """The in-kernel hash takes int64 flat indices; check it near 2^31 and 2^32, where an
    int32 index would wrap, against the int64 reference."""
    if not use_triton(torch.zeros(1, device=device)):
        pytest.skip("the Triton kernels do not run on this device here")
    seed = torch.tensor(99, device=device)
    threshold = reference.dropout_threshold(0.5)
    for start in (2**31 - 32, 2**32 - 32, 3 * 2**32 + 5):
        out = torch.empty(64, dtype=torch.int8, device=device)
        _hash_probe[(1,)](out, seed, start, threshold, BLOCK=64)
        idx = torch.arange(start, start + 64, device=device)
        key = reference._fmix32((seed + reference._mul32(idx >> 32, reference.GOLDEN32)) & 0xFFFFFFFF)
        bits = reference._fmix32((idx & 0xFFFFFFFF) ^ key)
        assert torch.equal(out.bool(), bits >= threshold), start
    # and the reference over a full range equals its index-by-index definition
    assert torch.equal(reference.dropout_bits(seed, 70)[64:],
                       reference._fmix32((torch.arange(64, 70, device=device) ^ reference._fmix32(seed))))
