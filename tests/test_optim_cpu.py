"""The compiled CPU AdamW loop (kernels/adamw_cpu.py) equals the eager reference bit for bit."""

import pytest
import torch

from kernels import adamw as K
from kernels import adamw_cpu

SHAPES = [(70_001,), (300, 257), (1 << 17,)]  # odd sizes, a partial 8-bit block, whole blocks


def _inputs(dtype, eight_bit, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=gen).to(dtype) for s in SHAPES]
    gs = [(torch.randn(s, generator=gen) * 1e-2).to(dtype) for s in SHAPES]
    gs[0].view(-1)[:256] = 0  # an all-zero state block after the first step
    m = [torch.randn(s, generator=gen) * 1e-2 for s in SHAPES]
    v = [torch.rand(s, generator=gen) * 1e-4 for s in SHAPES]
    if not eight_bit:
        return ps, gs, m, v, None, None
    mq = [K.quantize_state_8bit(x, True) for x in m]
    vq = [K.quantize_state_8bit(x, False) for x in v]
    return ps, gs, [q[0] for q in mq], [q[0] for q in vq], [q[1] for q in mq], [q[1] for q in vq]


def _bits(t):
    return t if t.dtype == torch.uint8 else t.contiguous().view(-1).view(torch.uint8)


@pytest.mark.parametrize("eight_bit", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_cpu_step_equals_the_reference(dtype, eight_bit, monkeypatch):
    fast = _inputs(dtype, eight_bit)
    ref = _inputs(dtype, eight_bit)
    for step in (1, 2, 3):
        kw = dict(step=step, lr=1e-2, weight_decay=0.1, backend="reference")
        monkeypatch.setenv("NF4_COMPILE", "1")
        K.adamw_update(*fast[:4], exp_avg_absmax=fast[4], exp_avg_sq_absmax=fast[5], **kw)
        monkeypatch.setenv("NF4_COMPILE", "0")
        K.adamw_update(*ref[:4], exp_avg_absmax=ref[4], exp_avg_sq_absmax=ref[5], **kw)
    assert adamw_cpu._FNS.get("step8" if eight_bit else "step32") is not None, "the compiled path did not run"
    for a_list, b_list in zip(fast, ref):
        for a, b in zip(a_list or [], b_list or []):
            assert torch.equal(_bits(a), _bits(b))


def test_bin_table_search_is_the_midpoint_count_by_brute_force():
    """Every float32 of [-1, 1] that bf16 bins tell apart, plus both ends of each bin and the
    midpoints themselves (ties go to the lower level)."""
    for mids in (K.state_maps("cpu")[1], K.state_maps("cpu")[3]):
        first, mids_ext = adamw_cpu.bin_table(mids)
        bits = torch.arange(1 << 16, dtype=torch.int64) << 16
        xs = [((bits | low) - ((bits >> 31) & 1) * (1 << 32)).to(torch.int32).view(torch.float32)
              for low in (0, 0x7FFF, 0xFFFF)]
        x = torch.cat(xs + [mids, torch.nextafter(mids, torch.tensor(2.0))])
        x = x[x.abs() <= 1]
        assert torch.equal(adamw_cpu._nearest(x, first, mids_ext), torch.bucketize(x, mids).to(torch.uint8))


def test_compile_failure_falls_back_to_the_reference(monkeypatch):
    def broken(*args):
        raise RuntimeError("no compiler")

    monkeypatch.setitem(adamw_cpu._FNS, "step32", broken)
    fast, ref = _inputs(torch.float32, False), _inputs(torch.float32, False)
    K.adamw_update(*fast[:4], step=1, lr=1e-2, backend="reference")
    assert adamw_cpu._FNS["step32"] is None  # given up for good
    monkeypatch.setenv("NF4_COMPILE", "0")
    K.adamw_update(*ref[:4], step=1, lr=1e-2, backend="reference")
    for a, b in zip(fast[0] + fast[2] + fast[3], ref[0] + ref[2] + ref[3]):
        assert torch.equal(a, b)
