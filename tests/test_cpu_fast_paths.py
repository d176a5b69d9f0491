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
