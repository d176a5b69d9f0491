"""Every table is built from its definition and checked against the published values."""

import pytest
import torch

import nf4

# bitsandbytes' NF4 table (functional.py / QLoRA Appendix E), code 0..15, float32.
PUBLISHED_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]


def test_nf4_equals_the_published_table_exactly():
    assert torch.equal(nf4.NF4, torch.tensor(PUBLISHED_NF4, dtype=torch.float32))
    assert torch.equal(nf4.normal_float_codebook(4), nf4.NF4)


def test_nf4_needs_a_float32_quantile_grid():
    # The definition's grid is torch.linspace's float32 default; a float64 grid moves the
    # levels by up to ~1.2e-7, which is why the table is built exactly this way.
    from scipy.stats import norm

    pos = norm.ppf(torch.linspace(nf4.NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1].numpy())
    neg = -norm.ppf(torch.linspace(nf4.NF4_OFFSET, 0.5, 8, dtype=torch.float64)[:-1].numpy())
    v = torch.tensor(sorted([*pos, 0.0, *neg]), dtype=torch.float64)
    v64 = (v / v.max()).float()
    diff = (v64 - nf4.NF4).abs().max().item()
    assert 0 < diff <= 2e-7


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_normal_float_codebooks_are_asymmetric_with_exact_zero(bits):
    c = nf4.normal_float_codebook(bits)
    assert c.dtype == torch.float32 and c.numel() == 2**bits
    assert torch.all(c[1:] > c[:-1]), "strictly increasing"
    assert c[0].item() == -1.0 and c[-1].item() == 1.0
    assert (c == 0).sum().item() == 1
    assert (c > 0).sum().item() == (c < 0).sum().item() + 1  # one more positive level


@pytest.mark.parametrize("bad", [1, 9, 4.0, "4"])
def test_normal_float_rejects_bad_bits(bad):
    with pytest.raises(ValueError, match="bits"):
        nf4.normal_float_codebook(bad)


def test_normal_float_rejects_bad_offset():
    with pytest.raises(ValueError, match="offset"):
        nf4.normal_float_codebook(4, offset=1.2)


def test_fp4_table_in_code_order():
    pos = [0.0, 1 / 192, 2 / 3, 1.0, 1 / 3, 1 / 2, 1 / 6, 1 / 4]
    expected = torch.tensor(pos + [0.0] + [-p for p in pos[1:]], dtype=torch.float32)
    assert torch.equal(nf4.FP4, expected)
    assert str(nf4.FP4[8].item()) == "0.0"  # +0.0, as bitsandbytes stores it


def test_int4_is_uniform_symmetric_with_exact_zero():
    c = nf4.INT4
    assert c.numel() == 16 and (c == 0).sum() == 1
    levels = torch.unique(c)
    assert levels.numel() == 15
    assert torch.allclose(levels[1:] - levels[:-1], torch.full((14,), 1 / 7))
    assert torch.equal(levels, -levels.flip(0))


def test_dynamic_map_signed_definition():
    m = nf4.dynamic_map(signed=True)
    assert m.numel() == 256 and torch.all(m[1:] >= m[:-1])
    assert m[0].item() == pytest.approx(-0.99296875) and m[-1].item() == 1.0
    nonzero = m[m != 0].abs()
    assert nonzero.min().item() == pytest.approx(5.5e-7, rel=1e-4)
    assert (m == 0).sum().item() == 1


def test_dynamic_map_unsigned_has_twice_the_values_per_decade():
    s, u = nf4.dynamic_map(signed=True), nf4.dynamic_map(signed=False)
    assert u.min().item() == 0.0 and u.max().item() == 1.0
    def decade(m, lo, hi):
        return ((m > lo) & (m < hi)).sum().item()

    for lo in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1):
        assert decade(u, lo, 10 * lo) == 2 * decade(s, lo, 10 * lo), lo
    assert decade(s, 0.1, 1.0) == 64 and decade(u, 0.1, 1.0) == 128


def test_tables_match_bitsandbytes():
    bnbf = pytest.importorskip("bitsandbytes.functional")
    from bitsandbytes.backends.utils import _get_4bit_code

    assert torch.equal(nf4.NF4, _get_4bit_code("nf4", torch.device("cpu")))
    assert torch.equal(nf4.FP4, _get_4bit_code("fp4", torch.device("cpu")))
    assert torch.equal(nf4.dynamic_map(True), bnbf.create_dynamic_map(signed=True))
    assert torch.equal(nf4.dynamic_map(False), bnbf.create_dynamic_map(signed=False))


def test_get_codebook_names_the_bad_type():
    with pytest.raises(ValueError, match="'nf5'"):
        nf4.get_codebook("nf5")
