"""The fused AdamW kernel against its plain-PyTorch reference (kernels/adamw.py).

Both compute every operation with one IEEE rounding, so they must agree bit for bit: on CPU
the kernel runs through the Triton interpreter (TRITON_INTERPRET=1, set by conftest).
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nf4
from kernels import adamw as K



DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _state(shapes, eight_bit, seed=0):
    gen = torch.Generator().manual_seed(seed)
    m = [torch.randn(s, generator=gen) * 1e-2 for s in shapes]
    v = [torch.rand(s, generator=gen) * 1e-4 for s in shapes]
    if not eight_bit:
        return m, v, None, None
    mq = [K.quantize_state_8bit(x, True) for x in m]
    vq = [K.quantize_state_8bit(x, False) for x in v]
    return [q[0] for q in mq], [q[0] for q in vq], [q[1] for q in mq], [q[1] for q in vq]


def _inputs(shapes, dtype, eight_bit, device, seed=0):
    gen = torch.Generator().manual_seed(seed + 1)
    ps = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    gs = [(torch.randn(s, generator=gen) * 1e-2).to(dtype) for s in shapes]
    if eight_bit:  # a zero block and a block of exactly-representable midpoints (tie cases)
        gs[0].view(-1)[:256] = 0
    m, v, ma, va = _state(shapes, eight_bit, seed)
    if eight_bit:
        m[0].view(-1)[:256] = K.quantize_state_8bit(torch.zeros(1), True)[0][0]
        ma[0][0] = 0.0
    lists = [ps, gs, m, v, ma, va]
    return [[t.to(device) for t in lst] if lst is not None else None for lst in lists]


def _run(lists, backend, step=3, lr=1e-2, wd=0.1):
    p, g, m, v, ma, va = lists
    K.adamw_update(p, g, m, v, step=step, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd,
                   exp_avg_absmax=ma, exp_avg_sq_absmax=va, backend=backend)


def _assert_identical(a, b):
    for la, lb in zip(a, b):
        if la is None:
            continue
        for x, y in zip(la, lb):
            assert x.dtype == y.dtype and x.shape == y.shape
            assert torch.equal(x.view(torch.uint8) if x.dtype != torch.uint8 else x,
                               y.view(torch.uint8) if y.dtype != torch.uint8 else y), \
                f"max diff {(x.float() - y.float()).abs().max()}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eight_bit", [False, True])
def test_kernel_matches_reference_bit_for_bit(device, dtype, eight_bit, monkeypatch):
    # odd sizes, a partial last block, a tensor smaller than one block; small tiles so that
    # tensors span several programs and the tensor search crosses many boundaries
    monkeypatch.setattr(K, "_ROWS_INTERPRET", 2)
    shapes = [(5000,), (64, 129), (3,), (300,), (1,), (4096,)] if eight_bit else \
             [(5000,), (7, 13), (1,), (2049,), (511,)]
    a = _inputs(shapes, dtype, eight_bit, device)
    b = [[t.clone() for t in lst] if lst is not None else None for lst in a]
    _run(a, "triton")
    _run(b, "reference")
    _assert_identical(a, b)
    assert all(torch.isfinite(p.float()).all() for p in a[0])


def test_kernel_matches_reference_over_many_steps_with_large_tiles(device):
    shapes = [(20000,), (4097,)]
    a = _inputs(shapes, torch.float32, True, device, seed=3)
    b = [[t.clone() for t in lst] for lst in a]
    for step in range(1, 6):
        for lists in (a, b):
            for g in lists[1]:
                g.copy_(torch.randn(g.shape, generator=torch.Generator().manual_seed(step)).to(device) * 1e-2)
        _run(a, "triton", step=step)
        _run(b, "reference", step=step)
    _assert_identical(a, b)


def test_strided_tensors_take_the_reference_path_with_the_same_numbers(device):
    base = torch.randn(64, 64, device=device)
    p_strided = base.t()  # not contiguous
    p_contig = p_strided.contiguous()
    g = torch.randn(64, 64, device=device).t()
    outs = []
    for p, grad in ((p_strided, g), (p_contig, g.contiguous())):
        m, v = torch.zeros(64, 64, device=device), torch.zeros(64, 64, device=device)
        K.adamw_update([p], [grad], [m], [v], step=1, lr=1e-2, weight_decay=0.1, backend="triton")
        outs.append((p.contiguous(), m, v))
    for x, y in zip(*outs):
        assert torch.equal(x, y)


def test_reference_is_torch_adamw_single_step():
    """One step from zero state equals torch.optim.AdamW to float32 rounding."""
    p = torch.randn(1000)
    g = torch.randn(1000)
    ref = p.clone().requires_grad_()
    ref.grad = g.clone()
    torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1).step()
    m, v = torch.zeros(1000), torch.zeros(1000)
    K.adamw_update([p], [g], [m], [v], step=1, lr=1e-2, weight_decay=0.1, backend="reference")
    torch.testing.assert_close(p, ref.detach(), rtol=4 * 2**-24, atol=1e-2 * 4 * 2**-24)


def test_scalars_are_float32_and_bias_corrected():
    sc = K.adamw_scalars(10, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    for value in vars(sc).values():
        assert value == float(torch.tensor(value, dtype=torch.float32))
    assert sc.step_size == pytest.approx(1e-3 / (1 - 0.9**10), rel=1e-7)
    assert sc.inv_bc2_sqrt == pytest.approx(1 / math.sqrt(1 - 0.999**10), rel=1e-7)
    assert sc.decay == pytest.approx(1 - 1e-4, rel=1e-7)
    with pytest.raises(ValueError, match="step must be >= 1"):
        K.adamw_scalars(0, 1e-3, (0.9, 0.999), 1e-8, 0.0)


def test_state_quantizer_is_nearest_level_by_brute_force():
    """Codes equal the argmin of |level - x/absmax| for both maps; a value exactly on a
    (float32) midpoint goes to the lower level, the rule of the 4-bit quantizer too."""
    gen = torch.Generator().manual_seed(0)
    for signed in (True, False):
        code = nf4.dynamic_map(signed=signed)
        mids = (code[:-1] + code[1:]) / 2
        x = torch.randn(8192, generator=gen) * torch.logspace(-6, 0, 8192)
        x = x if signed else x.abs()
        codes, absmax = K.quantize_state_8bit(x, signed)
        scaled = nf4.blockwise.scale_blocks(x, absmax, 256)
        dist = (scaled[:, None].double() - code[None, :].double()).abs()
        brute = dist.argmin(dim=1)
        # exact arithmetic and float32 midpoints may disagree within an ulp of a midpoint
        near_tie = ((scaled[:, None] - mids[None, :]).abs() <= 2 * mids.abs().clamp(min=1e-30) * 2**-24).any(1)
        assert near_tie.sum() < 10
        assert torch.equal(codes.long()[~near_tie], brute[~near_tie])
        # ties: block = [all midpoints, 1.0] has absmax 1, so the scaled values are the midpoints
        tie = torch.cat([mids, torch.ones(1)])
        tie_codes, tie_absmax = K.quantize_state_8bit(tie, signed)
        assert tie_absmax.item() == 1.0
        assert torch.equal(tie_codes[:255].long(), torch.arange(255))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3000), st.floats(1e-6, 1e3), st.booleans())
def test_state_quantize_dequantize_round_trip(n, scale, signed):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=gen) * scale
    x = x if signed else x.abs()
    codes, absmax = K.quantize_state_8bit(x, signed)
    y = K.dequantize_state_8bit(codes, absmax, signed)
    assert codes.shape == x.shape and absmax.numel() == -(-n // 256)
    # the largest gap of either map is < 0.015 of absmax: error <= half of it
    err = (x - y).abs().view(-1)
    bound = 0.0075 * absmax.repeat_interleave(256)[:n]
    assert torch.all(err <= bound + 1e-30)
    # absmax is the exact block maximum, and the block's largest value keeps its sign
    assert torch.equal(absmax, nf4.blockwise.block_absmax(x.view(-1), 256))
    assert torch.all(torch.sign(y) * torch.sign(x) >= 0)


def test_validation_names_the_bad_input():
    p, g = [torch.zeros(10)], [torch.zeros(10)]
    with pytest.raises(ValueError, match="exp_avgs\\[0\\] has 9 elements"):
        K.adamw_update(p, g, [torch.zeros(9)], [torch.zeros(10)], step=1, lr=1e-3)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        K.adamw_update([torch.zeros(10, dtype=torch.float64)], g, [torch.zeros(10)], [torch.zeros(10)],
                       step=1, lr=1e-3)
    with pytest.raises(ValueError, match="exp_avg_absmax\\[0\\] must be float32 with 1 elements"):
        K.adamw_update(p, g, [torch.zeros(10, dtype=torch.uint8)], [torch.zeros(10, dtype=torch.uint8)],
                       step=1, lr=1e-3, exp_avg_absmax=[torch.zeros(2)], exp_avg_sq_absmax=[torch.zeros(1)])
    with pytest.raises(ValueError, match="backend must be"):
        K.adamw_update(p, g, p, p, step=1, lr=1e-3, backend="cuda")
    with pytest.raises(ValueError, match="grads has 2 tensors"):
        K.adamw_update(p, g * 2, p, p, step=1, lr=1e-3)
