"""CPU fast paths of the QLoRA layer and of dequantization equal their eager forms bit for bit."""

import pytest
import torch

import kernels
import lora
import nf4
from kernels import qlora as Q
from nf4 import tensor as T


def _bits(t):
    return t.detach().contiguous().view(-1).view(torch.uint8)


def _run(layer, x, dy):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(dy)
    return [y, x.grad, layer.lora_A.grad, layer.lora_B.grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_dense_weight_kept_for_backward_gives_the_same_bits(dtype, double_quant, dropout, monkeypatch):
    torch.manual_seed(0)
    n, k, m = 37, 130, 45  # odd sizes, a partial quantization block
    layer = lora.QLoRALinear(torch.randn(n, k), torch.randn(n), r=4, alpha=8, dropout=dropout,
                             double_quant=double_quant).to(dtype)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    x = torch.randn(m, k).to(dtype)
    dy = torch.randn(m, n).to(dtype)
    out = {}
    with kernels.force_backend("reference"):
        for mode in ("always", "never"):
            monkeypatch.setenv(Q.KEEP_DENSE_ENV, mode)
            torch.manual_seed(1)  # the same dropout seed
            out[mode] = _run(layer, x, dy)
    for a, b in zip(out["always"], out["never"]):
        assert torch.equal(_bits(a), _bits(b))


def test_the_keep_rule_bounds_the_extra_memory_by_the_saved_input(monkeypatch):
    monkeypatch.setenv(Q.KEEP_DENSE_ENV, "auto")
    layer = lora.QLoRALinear(torch.randn(48, 64), r=4)
    dense_saved = {}
    for m in (6, 48):  # N = 48 float32: kept when M >= 48
        saved = []
        x = torch.randn(m, 64, requires_grad=True)
        with kernels.force_backend("reference"):
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                y = layer(x)
            y.sum().backward()
        dense_saved[m] = any(t.shape == (48, 64) for t in saved)
    assert dense_saved == {6: False, 48: True}
    monkeypatch.setenv(Q.KEEP_DENSE_ENV, "sometimes")
    with pytest.raises(ValueError, match="sometimes"), kernels.force_backend("reference"):
        layer(torch.randn(48, 64, requires_grad=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant, quant_type", [(True, "nf4"), (False, "nf4"), (True, "fp4")])
def test_compiled_dequantize_equals_eager_on_odd_sizes(dtype, double_quant, quant_type, monkeypatch):
    monkeypatch.setattr(T, "_COMPILE_MIN_ELEMENTS", 1 << 12)
    w = torch.randn(129, 67) * 0.05  # 8643 elements: a partial last block, an odd byte
    w.view(-1)[:64] = 0  # an all-zero block
    qt = nf4.quantize(w.to(dtype), quant_type, double_quant=double_quant)
    fast = nf4.dequantize(qt)
    assert T._fast_decode() is not None
    monkeypatch.setattr(T, "_COMPILE_MIN_ELEMENTS", 1 << 40)
    assert torch.equal(_bits(fast), _bits(nf4.dequantize(qt)))


def test_dequantize_compile_failure_falls_back_to_eager(monkeypatch):
    def broken(*args):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(T, "_COMPILE_MIN_ELEMENTS", 1 << 12)
    monkeypatch.setitem(T._COMPILED, "fn", broken)
    qt = nf4.quantize(torch.randn(100, 90))
    got = nf4.dequantize(qt)
    assert T._COMPILED["fn"] is None  # given up for good
    monkeypatch.setattr(T, "_COMPILE_MIN_ELEMENTS", 1 << 40)
    assert torch.equal(got, nf4.dequantize(qt))


def test_bf16_layer_on_cpu_multiplies_in_bf16_within_its_rounding_bound(monkeypatch):
    """bf16 activations: bf16 GEMMs with fp32 accumulation (QLORA_CPU_BF16_GEMM=0: fp32 GEMMs);
    both within a few bf16 roundings of the float64 result."""
    from kernels import reference

    torch.manual_seed(0)
    layer = lora.QLoRALinear(torch.randn(64, 96), torch.randn(64), r=4, alpha=8).to(torch.bfloat16)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    x = torch.randn(32, 96).to(torch.bfloat16)
    w = nf4.dequantize(layer.quantized_weight, torch.float32).double()
    xd, a, b = x.double(), layer.lora_A.double(), layer.lora_B.double()
    want = xd @ w.T + layer.scale * (xd @ a.T) @ b.T + layer.bias.double()
    mag = xd.abs() @ w.abs().T + layer.scale * (xd.abs() @ a.abs().T) @ b.abs().T + layer.bias.double().abs()
    for flag in ("1", "0"):
        monkeypatch.setenv(reference.BF16_GEMM_ENV, flag)
        assert reference.gemm_dtype(torch.bfloat16) == (torch.bfloat16 if flag == "1" else torch.float32)
        with torch.no_grad(), kernels.force_backend("reference"):
            y = layer(x)
        assert y.dtype == torch.bfloat16
        assert ((y.double() - want).abs() <= 4 * 2.0 ** -8 * mag + 1e-6).all(), flag
