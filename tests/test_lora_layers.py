"""QLoRALinear and LoRALinear: the math, every gradient, merge/unmerge, disable, storage.

Reference values are computed in float64 from ``nf4``'s reference dequantization; tolerances
come from the dtype and K (a dot product of K terms accumulated in float32 has error at most
about K·u32·Σ|terms|, plus one rounding to the output dtype), not from tuning.
"""

import copy
import math

import pytest
import torch
from torch import nn

import kernels
import lora
import nf4


EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float16: torch.finfo(torch.float16).eps,
       torch.bfloat16: torch.finfo(torch.bfloat16).eps}
NF4_MAX_HALF_GAP = float((nf4.NF4[1:] - nf4.NF4[:-1]).max() / 2)  # largest rounding error, in absmax units


def dot_bound(abs_terms, k, dtype):
    """|fl(sum) - sum| <= (k·u32 + u_out)·Σ|terms| for float32 accumulation and one output rounding."""
    return (k * EPS[torch.float32] / 2 + EPS[dtype] / 2) * abs_terms + 1e-30


def make_qlora(n=40, k=72, r=4, alpha=8.0, bias=True, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    layer = lora.QLoRALinear(torch.randn(n, k, generator=g), torch.randn(n, generator=g) if bias else None,
                             r=r, alpha=alpha, **kw)
    with torch.no_grad():
        layer.lora_B.normal_(generator=g)  # a fresh B is zero: make the adapter path visible
    return layer


def reference(layer, x):
    """float64 y and the |terms| sums for the error bound."""
    w = nf4.dequantize(layer.quantized_weight, torch.float32).double()
    a, b, s = layer.lora_A.double(), layer.lora_B.double(), layer.scale
    xd = x.double()
    y = xd @ w.T + s * (xd @ a.T) @ b.T
    mag = xd.abs() @ w.abs().T + abs(s) * (xd.abs() @ a.abs().T) @ b.abs().T
    if layer.bias is not None:
        y, mag = y + layer.bias.double(), mag + layer.bias.double().abs()
    return y, mag


@pytest.fixture(params=["reference", "auto"])
def backend(request):
    """'auto' runs the Triton kernels (through the interpreter on CPU in CI)."""
    with kernels.force_backend(request.param):
        yield request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead, n, k, r", [((5,), 40, 72, 4), ((2, 3), 33, 130, 8)])
def test_qlora_forward_and_every_gradient_match_float64(backend, device, dtype, lead, n, k, r):
    layer = make_qlora(n, k, r).to(device)
    x = torch.randn(*lead, k, device=device).to(dtype).requires_grad_(True)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (*lead, n)
    ref, mag = reference(layer, x.detach())
    assert ((y.double() - ref).abs() <= dot_bound(mag, k + r, dtype)).all()

    dy = torch.randn_like(y)
    y.backward(dy)
    w = nf4.dequantize(layer.quantized_weight, torch.float32).double()
    a, b, s = layer.lora_A.double().detach(), layer.lora_B.double().detach(), layer.scale
    dyd, xd = dy.double(), x.detach().double()
    g = dyd @ b  # [*, r]
    want = {"x": dyd @ w + s * g @ a, "A": s * g.reshape(-1, r).T @ xd.reshape(-1, k),
            "B": s * dyd.reshape(-1, n).T @ (xd @ a.T).reshape(-1, r)}
    mags = {"x": dyd.abs() @ w.abs() + s * (dyd.abs() @ b.abs()) @ a.abs(),
            "A": s * (dyd.abs() @ b.abs()).reshape(-1, r).T @ xd.abs().reshape(-1, k),
            "B": s * dyd.abs().reshape(-1, n).T @ (xd.abs() @ a.abs().T).reshape(-1, r)}
    got = {"x": x.grad, "A": layer.lora_A.grad, "B": layer.lora_B.grad}
    assert layer.lora_A.grad.dtype == torch.float32  # grads land in the adapters' dtype
    terms = {"x": n + r, "A": math.prod(lead) + n, "B": math.prod(lead) + k}
    for name in got:
        err = (got[name].double() - want[name]).abs()
        # intermediate roundings to the activation dtype (x·Aᵀ, dy·B) add one u(dtype) each
        tol = dot_bound(mags[name], terms[name], dtype) + 2 * EPS[dtype] * mags[name]
        assert (err <= tol).all(), (name, float(err.max()), float(tol.min()))
    assert layer.weight.grad is None and layer.bias.grad is None  # the base is frozen


def test_qlora_saves_no_dequantized_weight_for_backward(backend):
    layer = make_qlora(48, 64, 4)
    x = torch.randn(6, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    y.sum().backward()
    assert not [t for t in saved if t.numel() >= 48 * 64 and t.is_floating_point()]


def test_fresh_adapter_is_the_identity_update_and_disable_adapter_gives_the_base():
    layer = lora.QLoRALinear(torch.randn(24, 64), r=4)
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    x = torch.randn(3, 64)
    base = kernels.nf4_matmul(x, layer.quantized_weight)
    assert torch.equal(layer(x), base)
    with torch.no_grad():
        layer.lora_B.normal_()
    assert not torch.allclose(layer(x), base)
    with layer.disable_adapter(), layer.disable_adapter():  # nests
        assert torch.equal(layer(x), base)
    assert not torch.allclose(layer(x), base)


def test_init_schemes():
    torch.manual_seed(0)
    k = lora.QLoRALinear(torch.randn(64, 256), r=16, init="kaiming").lora_A
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(K), 1/sqrt(K))
    assert k.abs().max() <= bound and k.abs().max() > 0.9 * bound
    gauss = lora.LoRALinear(torch.randn(64, 256), r=16, init="gaussian").lora_A
    assert abs(gauss.std().item() - 1 / 16) < 0.01


def test_dropout_is_training_only_and_unbiased(backend):
    layer = make_qlora(16, 64, 4, dropout=0.5)
    x = torch.randn(32, 64)
    layer.eval()
    ref, _ = reference(layer, x)
    assert torch.allclose(layer(x).double(), ref, atol=1e-4)  # eval: no dropout
    layer.train()
    with layer.disable_adapter():
        base = layer(x)
    full = ref - reference_base(layer, x)  # the adapter term without dropout
    samples = torch.stack([(layer(x) - base).double() for _ in range(40)])
    assert not torch.equal(samples[0], samples[1])  # a fresh mask per call
    assert (samples[0] - full).abs().mean() > 0.2 * full.abs().mean()  # each one is dropped out...
    assert (samples.mean(0) - full).abs().mean() < 0.2 * full.abs().mean()  # ...and unbiased: E[x_hat] = x


def reference_base(layer, x):
    w = nf4.dequantize(layer.quantized_weight, torch.float32).double()
    return x.double() @ w.T + layer.bias.double()


def test_compute_dtype_casts_the_input_and_returns_the_input_dtype():
    layer = make_qlora(24, 64, 4, compute_dtype=torch.float16)
    x = torch.randn(5, 64)
    y = layer(x)
    assert y.dtype == torch.float32
    layer.compute_dtype = None
    y16 = layer(x.half())
    assert torch.equal(y, y16.float())


# ---- merge / unmerge ----------------------------------------------------------------------------
def test_qlora_merge_is_the_requantized_16bit_merge(backend):
    layer = make_qlora(40, 128, 8)
    with torch.no_grad():
        layer.lora_B.mul_(0.05)
    qt0 = layer.quantized_weight
    w16 = nf4.dequantize(qt0, torch.float32) + layer.delta_weight()  # the 16-bit merge
    layer.merge()
    assert layer.merged
    merged = nf4.dequantize(layer.quantized_weight, torch.float32)
    # exactly the quantization of the 16-bit merge...
    assert torch.equal(merged, nf4.quantize(w16, "nf4", 64, True).dequantize(torch.float32))
    # ...so it differs from it only by the quantization error: half a code gap times the absmax
    absmax = nf4.quantize(w16, "nf4", 64, True).dequantize_absmax().repeat_interleave(64)[: w16.numel()]
    assert ((merged - w16).abs().reshape(-1) <= NF4_MAX_HALF_GAP * absmax * (1 + 1e-6) + 1e-7).all()
    assert torch.equal(layer.merged_weight(torch.float32), merged)
    assert layer.quantized_weight.dtype == qt0.dtype  # bitsandbytes' dtype tag survives
    layer.unmerge()  # keep_base=True (default): bit-exact restore
    for name in lora.qlinear.QUANT_BUFFERS:
        a, b = getattr(layer, name), getattr(qt0, lora.qlinear.QUANT_BUFFERS[name])
        assert (a is None and b is None) or torch.equal(a, b)


def test_qlora_merged_forward_and_lossy_unmerge_without_kept_base():
    layer = make_qlora(40, 128, 8, bias=False)
    with torch.no_grad():
        layer.lora_B.mul_(0.05)
    x = torch.randn(4, 128)
    with torch.no_grad():
        before = layer(x)
        w16 = layer.merged_weight(torch.float32)
        layer.merge(keep_base=False)
        after = layer(x)
        # the merged layer is x·Q(W+sBA)ᵀ: exact to float32 accumulation
        ref = x.double() @ nf4.dequantize(layer.quantized_weight, torch.float32).double().T
        assert torch.allclose(after.double(), ref, atol=1e-4)
        err = nf4.dequantize(layer.quantized_weight, torch.float32) - w16
        assert torch.allclose(after - before, x @ err.T, atol=1e-4)
        with layer.disable_adapter():  # no kept base: the fold is undone on the fly
            base_now = layer(x)
        layer.unmerge()
        assert not layer.merged and layer._base_backup is None
        restored = layer(x)
    with layer.disable_adapter():
        base = layer(x)
    assert torch.allclose(base_now, base, atol=0.2 * base.abs().max().item())
    assert torch.allclose(restored, before, atol=0.2 * before.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_linear_merge_unmerge_restores_to_one_rounding(dtype):
    torch.manual_seed(1)
    w = torch.randn(32, 48).to(dtype)
    layer = lora.LoRALinear(w.clone(), torch.randn(32).to(dtype), r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 48).to(dtype)
    with torch.no_grad():
        before = layer(x)
        layer.merge()
        after = layer(x)
        with layer.disable_adapter():
            base_merged = layer(x)
        layer.unmerge()
    delta = layer.delta_weight()
    tol = EPS[dtype] * (w.float().abs() + (w.float() + delta).abs())
    assert ((layer.weight.float() - w.float()).abs() <= tol).all()
    assert torch.allclose(after.float(), before.float(), atol=20 * EPS[dtype] * before.abs().max().item())
    assert torch.allclose(base_merged.float(), nn.functional.linear(x, w, layer.bias).float(),
                          atol=20 * EPS[dtype] * before.abs().max().item())
    w_exact = layer.weight.detach().clone()
    layer.merge(keep_base=True)
    layer.unmerge()
    assert torch.equal(layer.weight, w_exact)  # the kept copy restores bit for bit


def test_merge_state_errors_and_training_while_merged_is_refused():
    layer = make_qlora(16, 64, 2)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.train()
    with pytest.raises(RuntimeError, match="is merged: its adapter gets no gradient"):
        layer(torch.randn(2, 64))
    with torch.no_grad():
        layer(torch.randn(2, 64))
    with pytest.raises(RuntimeError, match="unmerge\\(\\) before changing its scale"):
        layer.set_scale(alpha=4)


# ---- storage: state_dict, .to(), dtype casts ----------------------------------------------------
def test_state_dict_uses_bitsandbytes_keys_and_round_trips():
    layer = make_qlora(40, 72, 4)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                       "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4", "bias", "lora_A", "lora_B"}
    assert sd["weight"].dtype == torch.uint8 and tuple(sd["weight"].shape) == (40 * 72 // 2, 1)
    fresh = lora.QLoRALinear(torch.zeros(40, 72), torch.zeros(40), r=4, alpha=8)
    assert fresh.load_state_dict(sd) is not None
    x = torch.randn(3, 72)
    assert torch.equal(fresh(x), layer(x))
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_load_state_dict_quantizes_a_16bit_weight_and_names_errors():
    w = torch.randn(24, 64)
    layer = lora.QLoRALinear(torch.zeros(24, 64), r=2, bias=None)
    missing, unexpected = layer.load_state_dict({"weight": w}, strict=False)
    assert set(missing) == {"lora_A", "lora_B"} and not unexpected
    assert torch.equal(layer.base_weight(torch.float32), nf4.quantize(w).dequantize(torch.float32))
    with pytest.raises(RuntimeError, match="size mismatch for 'weight'.*\\(12, 64\\).*\\(24, 64\\)"):
        layer.load_state_dict({"weight": torch.randn(12, 64)}, strict=False)
    sd = layer.state_dict()
    del sd["weight.absmax"]
    with pytest.raises(RuntimeError, match="missing key 'weight.absmax'"):
        layer.load_state_dict(sd)
    with pytest.raises(RuntimeError, match='Missing key.*"weight"'):
        layer.load_state_dict({"lora_A": layer.lora_A, "lora_B": layer.lora_B})


def test_dtype_casts_keep_the_base_quantized_and_to_moves_it(device):
    layer = make_qlora(40, 72, 4)
    before = {n: b.clone() for n, b in layer.named_buffers()}
    for cast in (lambda m: m.half(), lambda m: m.to(torch.bfloat16), lambda m: m.float(), lambda m: m.double()):
        cast(layer)
        for n, b in layer.named_buffers():
            assert b.dtype == before[n].dtype and torch.equal(b, before[n]), n
    assert layer.lora_A.dtype == torch.float64 and layer.bias.dtype == torch.float64
    layer.float().to(device)
    assert all(b.device.type == device.type for b in layer.buffers())
    assert layer.quantized_weight.device.type == device.type
    x = torch.randn(3, 72, device=device)
    assert layer(x).device.type == device.type
    layer.merge()
    layer.cpu()
    assert layer._base_backup.device.type == "cpu"  # the kept base moves too
    layer.unmerge()


def test_deepcopy_and_repr():
    layer = make_qlora(40, 72, 4)
    twin = copy.deepcopy(layer)
    x = torch.randn(2, 72)
    assert torch.equal(twin(x), layer(x))
    assert twin.weight.data_ptr() != layer.weight.data_ptr()
    text = repr(layer)
    assert "base=nf4+dq/64" in text and "r=4" in text and "bits/param" in text


def test_constructor_errors_name_the_value():
    with pytest.raises(ValueError, match=r"weight must be 2-D \[out, in\], got shape \(8,\)"):
        lora.QLoRALinear(nf4.quantize(torch.randn(8)))
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\), got \(3,\)"):
        lora.QLoRALinear(torch.randn(8, 64), torch.randn(3))
    with pytest.raises(ValueError, match="r must be a positive int, got 0"):
        lora.LoRALinear(torch.randn(8, 64), r=0)
    with pytest.raises(ValueError, match=r"quant_type must be one of \('nf4', 'fp4', 'int4'\), got 'int8'"):
        lora.QLoRALinear(torch.randn(8, 64), quant_type="int8")
