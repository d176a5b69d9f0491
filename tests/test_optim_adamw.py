"""PagedAdamW against torch.optim.AdamW: math, dtypes, 8-bit state, hyperparameters, NaN policy.

Long runs use ``fused=False`` (the reference) so that CPU CI stays fast; the fused kernel
equals the reference bit for bit (test_optim_kernel.py, and ``test_fused_equals_reference``
below through the optimizer).
"""

import math

import pytest
import torch

import optim



F = torch.nn.functional


def _mlp(seed=1, widths=(16, 32, 4), dtype=torch.float32, device="cpu"):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1]).to(device=device, dtype=dtype)


def _data(n_in, n_out, device, n=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=gen)
    y = torch.sin(x @ torch.randn(n_in, n_out, generator=gen) / n_in**0.5) + 0.1 * torch.randn(n, n_out, generator=gen)
    return x.to(device), y.to(device)


def _train_step(model, opt, x, y):
    opt.zero_grad()
    loss = F.mse_loss(model(x.to(next(model.parameters()).dtype)).float(), y)
    loss.backward()
    opt.step()
    return loss.item()


def _fused(device):
    """Triton on CUDA; the reference on CPU (the interpreter is tested separately)."""
    return None if device.type == "cuda" else False


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("lr", [1e-3, 1e-2, 3e-2])
def test_fp32_matches_torch_adamw_over_100_steps(device, lr):
    """Linear regression with weight decay, each optimizer on its own copy, free running.

    A linear model's training does not amplify rounding differences, so the trajectories
    stay within float32 noise. (On a chaotic net, torch's own fused and single-tensor
    AdamW drift apart by more than 1e-6 within 100 steps; the lockstep test covers nets.)
    """
    x, y = _data(32, 8, device)
    torch.manual_seed(1)
    ours_m = torch.nn.Linear(32, 8).to(device)
    ref_m = torch.nn.Linear(32, 8).to(device)
    ref_m.load_state_dict(ours_m.state_dict())
    ours = optim.PagedAdamW(ours_m.parameters(), lr=lr, weight_decay=0.1, fused=_fused(device))
    ref = torch.optim.AdamW(ref_m.parameters(), lr=lr, weight_decay=0.1)
    for _ in range(100):
        _train_step(ours_m, ours, x, y)
        _train_step(ref_m, ref, x, y)
    for a, b in zip(ours_m.parameters(), ref_m.parameters()):
        assert _rel(a.detach(), b.detach()) <= 1e-6


@pytest.mark.parametrize("lr", [1e-3, 1e-2, 3e-2])
def test_fp32_matches_torch_adamw_step_by_step_on_an_mlp(device, lr):
    """Every one of 100 steps of an MLP, started from torch's params and state, lands on
    torch's result to 1e-6 relative (weight decay 0.1)."""
    x, y = _data(16, 4, device)
    ours_m, ref_m = _mlp(device=device), _mlp(device=device)
    ours = optim.PagedAdamW(ours_m.parameters(), lr=lr, weight_decay=0.1, fused=_fused(device))
    ref = torch.optim.AdamW(ref_m.parameters(), lr=lr, weight_decay=0.1)
    worst = 0.0
    for _ in range(100):
        with torch.no_grad():
            for a, b in zip(ours_m.parameters(), ref_m.parameters()):
                a.copy_(b)
                if ref.state.get(b):
                    ours.state[a]["exp_avg"].copy_(ref.state[b]["exp_avg"])
                    ours.state[a]["exp_avg_sq"].copy_(ref.state[b]["exp_avg_sq"])
        _train_step(ours_m, ours, x, y)
        _train_step(ref_m, ref, x, y)
        for a, b in zip(ours_m.parameters(), ref_m.parameters()):
            worst = max(worst, _rel(a.detach(), b.detach()))
            assert float(ours.state[a]["step"]) == float(ref.state[b]["step"])
    assert worst <= 1e-6


def _bf16_half_ulp(x: torch.Tensor) -> torch.Tensor:
    """Half the spacing of bfloat16 numbers at |x| (8 significant bits)."""
    _, e = torch.frexp(x.float())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), e - 9)


def test_bf16_params_agree_within_bf16_rounding(device):
    """bf16 params, fp32 state: every step equals torch.optim.AdamW run in fp32 from the same
    point (params, state, gradients), rounded once to bf16.

    Bound: |ours - torch_fp32| <= half a bf16 ulp of the result (our one rounding) plus the
    float32 noise between the two fp32 computations, a few float32 ulps of the operands
    (|p_old| and the step ~lr): that noise shows when the step nearly cancels p_old.
    """
    lr = 1e-2
    x, y = _data(16, 4, device)
    model = _mlp(dtype=torch.bfloat16, device=device)
    shadow = [torch.nn.Parameter(p.detach().float().clone()) for p in model.parameters()]
    ours = optim.PagedAdamW(model.parameters(), lr=lr, weight_decay=0.1, fused=_fused(device))
    ref = torch.optim.AdamW(shadow, lr=lr, weight_decay=0.1)
    inexact = total = 0
    for _ in range(100):
        ours.zero_grad()
        F.mse_loss(model(x.bfloat16()).float(), y).backward()
        with torch.no_grad():
            old = [p.detach().float().clone() for p in model.parameters()]
            for p, s in zip(model.parameters(), shadow):
                s.copy_(p.float())
                s.grad = p.grad.float()
        ours.step()
        ref.step()
        for p, s, p_old in zip(model.parameters(), shadow, old):
            got, want = p.detach().float(), s.detach()
            bound = _bf16_half_ulp(got) + 8 * 2**-24 * (p_old.abs() + lr)
            assert torch.all((got - want).abs() <= bound)
            inexact += int((p.detach() != want.bfloat16()).sum())
            total += got.numel()
    assert inexact <= 0.01 * total, f"{inexact} of {total} values differ from torch's, rounded"


def test_fused_equals_reference_through_the_optimizer(device):
    """A few steps through the dispatch (Triton; the interpreter on CPU) equal the reference
    bit for bit, for 32- and 8-bit state and bf16 parameters."""
    x, y = _data(64, 80, device, n=32)
    for bits, dtype in ((32, torch.float32), (8, torch.float32), (8, torch.bfloat16)):
        runs = []
        for fused in (None, False):
            model = _mlp(widths=(64, 80), dtype=dtype, device=device)  # 5120-element weight
            opt = optim.PagedAdamW(model.parameters(), lr=1e-2, state_bits=bits, fused=fused)
            for _ in range(3):
                _train_step(model, opt, x, y)
            runs.append([p.detach().clone() for p in model.parameters()])
        for a, b in zip(*runs):
            assert torch.equal(a, b), f"state_bits={bits} dtype={dtype}"


def test_8bit_state_trains_within_a_few_percent_of_32bit(device):
    x, y = _data(32, 8, device, n=512)
    final = {}
    for bits in (32, 8):
        model = _mlp(widths=(32, 128, 128, 8), device=device)
        opt = optim.PagedAdamW(model.parameters(), lr=3e-3, weight_decay=0.01, state_bits=bits,
                               fused=_fused(device))
        gen = torch.Generator().manual_seed(0)
        for _ in range(200):
            idx = torch.randint(0, 512, (64,), generator=gen).to(device)
            _train_step(model, opt, x[idx], y[idx])
        with torch.no_grad():
            final[bits] = F.mse_loss(model(x), y).item()
        if bits == 8:
            kinds = {tuple(sorted(k for k in st if k != "step")) for st in opt.state.values()}
            assert ("exp_avg_absmax", "exp_avg_codes", "exp_avg_sq_absmax", "exp_avg_sq_codes") in kinds
            assert ("exp_avg", "exp_avg_sq") in kinds  # the < 4096-element tensors
    assert final[8] < 0.5 * F.mse_loss(torch.zeros_like(y), y).item()  # it did learn
    assert abs(final[8] - final[32]) <= 0.03 * final[32]


def test_8bit_state_memory_saved():
    """8 bytes per parameter in 32 bit; 2 + 8/256 in 8 bit (tensors >= 4096 elements)."""
    params = [torch.nn.Parameter(torch.randn(256, 1024)), torch.nn.Parameter(torch.randn(100))]
    sizes = {}
    for bits in (32, 8):
        opt = optim.PagedAdamW(params, state_bits=bits, fused=False)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        sizes[bits] = opt.state_bytes()["total"]
    n = 256 * 1024
    assert sizes[32] == 8 * (n + 100)
    assert sizes[8] == 2 * n + 2 * 4 * (n // 256) + 8 * 100
    assert sizes[8] / sizes[32] == pytest.approx(0.254, abs=0.001)


def test_param_groups_zero_grad_and_closure():
    a, b = torch.nn.Parameter(torch.ones(10)), torch.nn.Parameter(torch.ones(10))
    opt = optim.PagedAdamW([{"params": [a], "lr": 0.1}, {"params": [b]}], lr=0.0, weight_decay=0.0, fused=False)

    def closure():
        opt.zero_grad()
        loss = (a * 2).sum() + (b * 2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 40.0
    assert torch.allclose(a.detach(), torch.full((10,), 0.9))  # first Adam step moves by lr
    assert torch.equal(b.detach(), torch.ones(10))  # lr 0
    opt.zero_grad()
    assert a.grad is None
    opt.step()  # no gradients: nothing happens, no error
    assert float(opt.state[a]["step"]) == 1.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(lr=-1.0), "Invalid learning rate: -1.0"),
    (dict(eps=-1e-8), "Invalid epsilon value: -1e-08"),
    (dict(betas=(1.0, 0.999)), "Invalid beta parameter at index 0: 1.0"),
    (dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1: -0.1"),
    (dict(weight_decay=-0.1), "Invalid weight_decay value: -0.1"),
    (dict(amsgrad=True), "amsgrad"),
    (dict(maximize=True), "maximize"),
    (dict(state_bits=4), "state_bits must be 8 or 32, got 4"),
    (dict(page_min_numel=-1), "page_min_numel must be a non-negative int, got -1"),
    (dict(fused="yes"), "fused must be None, True or False"),
])
def test_hyperparameters_are_validated_like_torch(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optim.PagedAdamW([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_group_hyperparameters_are_validated_too():
    with pytest.raises(ValueError, match="Invalid learning rate: -0.5"):
        optim.PagedAdamW([{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": -0.5}])


def test_sparse_and_complex_are_rejected():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = optim.PagedAdamW(emb.parameters(), fused=False)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    with pytest.raises(TypeError, match="complex"):
        optim.PagedAdamW([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))])


def test_nonfinite_gradients_flow_through_by_default_like_torch():
    ours_p = torch.nn.Parameter(torch.ones(8))
    ref_p = torch.nn.Parameter(torch.ones(8))
    ours = optim.PagedAdamW([ours_p], lr=1e-2, fused=False)
    ref = torch.optim.AdamW([ref_p], lr=1e-2)
    g = torch.ones(8)
    g[3] = math.nan
    g[5] = math.inf
    for p, o in ((ours_p, ours), (ref_p, ref)):
        p.grad = g.clone()
        o.step()
    assert torch.equal(torch.isnan(ours_p.detach()), torch.isnan(ref_p.detach()))
    assert ours.nonfinite_skips == 0


@pytest.mark.parametrize("bits", [32, 8])
def test_skip_nonfinite_skips_that_parameter_and_counts(bits):
    good, bad = torch.nn.Parameter(torch.ones(5000)), torch.nn.Parameter(torch.ones(5000))
    opt = optim.PagedAdamW([good, bad], lr=1e-2, skip_nonfinite=True, state_bits=bits, fused=False)
    good.grad, bad.grad = torch.ones(5000), torch.ones(5000)
    opt.step()
    before = bad.detach().clone(), {k: v.clone() for k, v in opt.state[bad].items()}
    good.grad = torch.ones(5000)
    bad.grad = torch.ones(5000)
    bad.grad[17] = math.nan
    opt.step()
    assert torch.equal(bad.detach(), before[0])
    assert all(torch.equal(opt.state[bad][k], v) for k, v in before[1].items())  # step count too
    assert float(opt.state[good]["step"]) == 2.0 and float(opt.state[bad]["step"]) == 1.0
    assert opt.nonfinite_skips == 1 and opt.last_skipped[0] is bad
    bad.grad[17] = math.inf
    good.grad = torch.full((5000,), -math.inf)
    opt.step()
    assert opt.nonfinite_skips == 3 and len(opt.last_skipped) == 2
    assert torch.isfinite(good.detach()).all() and torch.isfinite(bad.detach()).all()


def _bnb():
    bnb = pytest.importorskip("bitsandbytes")
    return bnb


def test_matches_bitsandbytes_adamw_on_cpu():
    """bitsandbytes' CPU AdamW (32-bit) applies the decay first, as we do: same trajectory.
    (Its CUDA kernels decay after the step; see optim/adamw.py.)"""
    bnb = _bnb()
    runs = []
    for make in (lambda ps: optim.PagedAdamW(ps, lr=1e-2, weight_decay=0.1, fused=False),
                 lambda ps: bnb.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)):
        torch.manual_seed(3)
        model = torch.nn.Linear(32, 128)
        opt = make(model.parameters())
        gen = torch.Generator().manual_seed(0)
        for _ in range(50):
            _train_step(model, opt, torch.randn(16, 32, generator=gen), torch.randn(16, 128, generator=gen))
        runs.append([p.detach() for p in model.parameters()])
    for a, b in zip(*runs):
        assert _rel(a, b) <= 1e-6


def test_8bit_step_matches_bitsandbytes_up_to_its_rounding_rule():
    """From bitsandbytes' own 8-bit state (same maps, same 256-blocks, same layout), one step
    moves the parameter identically; the new codes differ only where bitsandbytes' 65536-entry
    table and exact nearest rounding disagree (within 1.5e-5 of a midpoint), by one level."""
    import nf4
    from kernels.adamw import dequantize_state_8bit

    bnb = _bnb()
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8192, generator=gen))
    theirs = bnb.optim.AdamW8bit([p], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        p.grad = torch.randn(8192, generator=gen)
        theirs.step()
    st = theirs.state[p]
    assert torch.equal(st["qmap1"], nf4.dynamic_map(signed=True))
    assert torch.equal(st["qmap2"], nf4.dynamic_map(signed=False))
    q = torch.nn.Parameter(p.detach().clone())
    ours = optim.PagedAdamW([q], lr=1e-2, weight_decay=0.1, state_bits=8, fused=False)
    ours.load_state_dict({"state": {0: {"step": float(st["step"]), "exp_avg_codes": st["state1"],
                                        "exp_avg_absmax": st["absmax1"], "exp_avg_sq_codes": st["state2"],
                                        "exp_avg_sq_absmax": st["absmax2"]}},
                          "param_groups": [{"params": [0], "lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8,
                                            "weight_decay": 0.1}]})
    old = {k: v.clone() for k, v in st.items() if torch.is_tensor(v)}
    g = torch.randn(8192, generator=gen)
    p.grad, q.grad = g.clone(), g.clone()
    theirs.step()
    ours.step()
    assert _rel(q.detach(), p.detach()) <= 1e-6
    for key, signed, n in (("exp_avg", True, "1"), ("exp_avg_sq", False, "2")):
        a, b = ours.state[q][f"{key}_codes"].long(), st[f"state{n}"].long()
        absmax = ours.state[q][f"{key}_absmax"]
        torch.testing.assert_close(absmax, st[f"absmax{n}"], rtol=2**-22, atol=0)
        # where the codes differ, the value sits on the boundary between the two levels
        code = nf4.dynamic_map(signed=signed)
        prev = dequantize_state_8bit(old[f"state{n}"], old[f"absmax{n}"], signed)
        new = prev * 0.9 + g * 0.1 if signed else prev * 0.999 + g * g * 0.001
        scaled = new / absmax.repeat_interleave(256)
        diff = a != b
        assert (a - b).abs().max() <= 1
        mid = (code[a[diff]] + code[b[diff]]) / 2
        assert torch.all((scaled[diff] - mid).abs() <= 2e-5)
