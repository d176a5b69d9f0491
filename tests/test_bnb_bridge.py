"""The zero-copy bridge from bitsandbytes: ``nf4.QuantizedTensor.from_bnb`` and ``lora.from_bnb``.

bitsandbytes is the oracle here (its own objects, quantized by itself, on CPU); the library side
never imports it. Shared storage is proven by ``data_ptr`` equality, correctness by bit-equality
with bitsandbytes' ``dequantize_4bit`` and, for a whole transformers + bitsandbytes Llama, by the
logits of an exact-fp32 bitsandbytes forward (dequantize, then ``F.linear``).

Shapes avoid one bitsandbytes CPU bug (README, "Format notes"): its AVX-512 ``dequantize_4bit``
misreads blocks that cross a row end when the last dimension is a multiple of 16 but not of the
blocksize; so K is either a multiple of every blocksize used or not a multiple of 16.
"""

from __future__ import annotations

import contextlib
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kernels
import lora
import nf4

bnb = pytest.importorskip("bitsandbytes")
bnbf = pytest.importorskip("bitsandbytes.functional")

EPS32 = torch.finfo(torch.float32).eps


def bnb_linear(n, k, quant_type="nf4", nested=True, storage=torch.uint8, bias=True, dtype=torch.float32):
    """A bitsandbytes Linear4bit quantized by bitsandbytes itself (on the move to the CPU)."""
    dense = nn.Linear(k, n, bias=bias, dtype=dtype)
    layer = bnb.nn.Linear4bit(k, n, bias=bias, compute_dtype=torch.float32, compress_statistics=nested,
                              quant_type=quant_type, quant_storage=storage)
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu")


def shares_storage(qt, weight, qs) -> bool:
    pairs = [(qt.data, weight), (qt.absmax, qs.absmax), (qt.code, qs.code)]
    if qs.state2 is not None:
        pairs += [(qt.nested_absmax, qs.state2.absmax), (qt.nested_code, qs.state2.code), (qt.offset, qs.offset)]
    return all(ours.data_ptr() == theirs.data_ptr() for ours, theirs in pairs)


def matmul_bound(x, w, k):
    """|error| of a float32 dot product of length k, elementwise: k * eps * sum |x_i w_i|."""
    return k * EPS32 * (x.abs() @ w.abs().T)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
@pytest.mark.parametrize("n, k", [(48, 192), (5, 99)])
def test_from_bnb_shares_every_tensor_and_dequantizes_bit_identically(quant_type, nested, storage, n, k):
    if storage != torch.uint8 and (n * k + 1) // 2 % 2:
        pytest.skip("bitsandbytes cannot view an odd byte count as 2-byte storage")
    layer = bnb_linear(n, k, quant_type, nested, storage)
    w, qs = layer.weight, layer.weight.quant_state
    qt = nf4.QuantizedTensor.from_bnb(w)
    assert shares_storage(qt, w, qs)
    assert (qt.shape, qt.quant_type, qt.blocksize, qt.nested, qt.dtype) == ((n, k), quant_type, 64, nested,
                                                                             torch.float32)
    ref = bnbf.dequantize_4bit(w, qs)
    assert torch.equal(qt.dequantize(), ref)
    assert torch.equal(kernels.dequantize(qt, torch.float32), ref)  # the Triton kernel (interpreter) too
    x = torch.randn(3, k)
    with torch.no_grad():
        y = kernels.nf4_matmul(x, qt, layer.bias)
        want = F.linear(x, ref, layer.bias)
    assert bool(((y - want).abs() <= matmul_bound(x, ref, k) + EPS32 * layer.bias.abs()).all())


@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 512, 1024, 2048, 4096])
@pytest.mark.parametrize("nested", [True, False])
def test_from_bnb_reads_every_blocksize_of_a_packed_tensor_and_its_quant_state(blocksize, nested):
    w = torch.randn(3, 4096)
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=nested)
    qt = nf4.QuantizedTensor.from_bnb(packed, quant_state=state)
    assert shares_storage(qt, packed, state) and qt.blocksize == blocksize
    assert torch.equal(qt.dequantize(), bnbf.dequantize_4bit(packed, state))
    # and what bitsandbytes computes equals what nf4 writes for the same input (the format is one)
    ours = nf4.quantize(w, "nf4", blocksize, nested)
    assert torch.equal(qt.data, ours.data) and torch.equal(qt.absmax, ours.absmax)


def test_from_bnb_accepts_any_object_shaped_like_params4bit():
    """Duck typing: plain namespaces with the fields, no bitsandbytes class involved."""
    ours = nf4.quantize(torch.randn(8, 64))
    state2 = types.SimpleNamespace(absmax=ours.nested_absmax, code=ours.nested_code, blocksize=256)
    qs = types.SimpleNamespace(absmax=ours.absmax, code=ours.code, blocksize=64, quant_type="nf4",
                               dtype=torch.float32, shape=(8, 64), offset=float(ours.offset), state2=state2)
    qt = nf4.QuantizedTensor.from_bnb(ours.data, qs)
    assert qt.data.data_ptr() == ours.data.data_ptr()
    assert torch.equal(qt.dequantize(), ours.dequantize())  # a float offset becomes a 0-d float32 tensor


# ---- what does not fit is refused, naming the field ---------------------------------------------
def _namespace_copy(qs, **changes):
    fields = {name: getattr(qs, name) for name in nf4.bridge.QUANT_STATE_FIELDS}
    fields.update(changes)
    return types.SimpleNamespace(**{k: v for k, v in fields.items() if v is not _DROP})


_DROP = object()


@pytest.mark.parametrize("make, kind, words", [
    (lambda w, qs: (torch.randn(4, 4), None), TypeError, "has no quant_state"),
    (lambda w, qs: ("weight", None), TypeError, "must be a torch.Tensor"),
    (lambda w, qs: (w, _namespace_copy(qs, code=_DROP)), TypeError, "quant_state has no field 'code'"),
    (lambda w, qs: (w, _namespace_copy(qs, state2=types.SimpleNamespace(absmax=qs.state2.absmax, code=qs.state2.code))),
     TypeError, "quant_state.state2 has no field 'blocksize'"),
    (lambda w, qs: (w, _namespace_copy(qs, absmax=qs.absmax.float())), ValueError,
     "quant_state.absmax must be torch.uint8"),
    (lambda w, qs: (w, _namespace_copy(qs, shape=torch.Size([48, 128]))), ValueError,
     "packed weight must hold 3072 bytes"),
    (lambda w, qs: (w, _namespace_copy(qs, blocksize=48)), ValueError, "blocksize must be a power of two"),
    (lambda w, qs: (w, _namespace_copy(qs, quant_type="int8")), ValueError, "quant_type must be one of"),
    (lambda w, qs: (w, _namespace_copy(qs, dtype=torch.float64)), ValueError, "quant_state.dtype must be one of"),
    (lambda w, qs: (w, _namespace_copy(qs, offset=None)), ValueError, "quant_state.offset is None"),
    (lambda w, qs: (w, _namespace_copy(qs, state2=types.SimpleNamespace(absmax=qs.state2.absmax,
                                                                        code=qs.state2.code, blocksize=128))),
     ValueError, "state2.blocksize must be 256"),
    (lambda w, qs: (w, _namespace_copy(qs, code=qs.code[:8])), ValueError, "quant_state.code must have 16"),
    (lambda w, qs: (w.data.view(-1, 2).t(), qs), ValueError, "packed weight must be contiguous"),
])
def test_from_bnb_refuses_what_the_kernels_cannot_read(make, kind, words):
    layer = bnb_linear(48, 192)
    weight, state = make(layer.weight, layer.weight.quant_state)
    with pytest.raises(kind, match=words):
        nf4.QuantizedTensor.from_bnb(weight, state)


def test_from_bnb_refuses_8bit_and_unquantized_weights():
    int8_layer = bnb.nn.Linear8bitLt(64, 32, has_fp16_weights=False).to("cpu")
    with pytest.raises(TypeError, match="8-bit"):
        nf4.QuantizedTensor.from_bnb(int8_layer.weight)
    raw = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, quant_type="nf4")  # not moved yet
    with pytest.raises(TypeError, match="has no quant_state"):
        nf4.QuantizedTensor.from_bnb(raw)


def test_from_bnb_refuses_bitsandbytes_avx512_cpu_repacking():
    """On AVX512-BF16 CPUs bitsandbytes' Linear4bit rewrites its weight in place into another layout
    on the first inference forward; it marks the state, and that state must be refused."""
    layer = bnb_linear(64, 128)
    state = _namespace_copy(layer.weight.quant_state)
    state.packing_format_for_cpu = True
    with pytest.raises(ValueError, match="packing_format_for_cpu"):
        nf4.QuantizedTensor.from_bnb(layer.weight, state)


# ---- lora.from_bnb on a transformers + bitsandbytes Llama -----------------------------------------
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def load_bnb_llama(path, quant_type="nf4", nested=True, dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    qcfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                           bnb_4bit_use_double_quant=nested, bnb_4bit_compute_dtype=dtype)
    return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=qcfg, device_map="cpu",
                                                             dtype=dtype).eval()


@contextlib.contextmanager
def exact_fp32_bnb_forward(model):
    """Each bitsandbytes Linear4bit computes ``F.linear(x, dequantize_4bit(W), b)`` in float32 (its own
    CPU matmul differs from that by rounding; the whole-model parity tests compare to this form)."""
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in layers:
        m.forward = (lambda m: lambda x: F.linear(x.float(), bnbf.dequantize_4bit(m.weight, m.weight.quant_state)
                                                  .float(), m.bias))(m)
    try:
        yield len(layers)
    finally:
        for m in layers:
            del m.forward


@pytest.mark.parametrize("quant_type, nested", [("nf4", True), ("fp4", False)])
def test_llama_gives_the_same_logits_on_our_kernels_with_shared_storage(llama_dir, quant_type, nested):
    model = load_bnb_llama(llama_dir, quant_type, nested)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad(), exact_fp32_bnb_forward(model) as n_layers:
        want = model(input_ids=ids).logits
    assert n_layers == 2 * 7
    before = {name: (m.weight, m.weight.quant_state) for name, m in model.named_modules()
              if isinstance(m, bnb.nn.Linear4bit)}
    lora.from_bnb(model, lora.LoRAConfig(r=4, alpha=8, dropout=0.0))
    for name, (w, qs) in before.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, lora.QLoRALinear), name
        assert shares_storage(layer.quantized_weight, w, qs), name
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    for backend in ("reference", "auto"):  # auto: the Triton kernels, through the interpreter on CPU
        with torch.no_grad(), kernels.force_backend(backend):
            got = model(input_ids=ids).logits
        # float32 accumulation order only: <= 2 layers x 7 matmuls of length K <= 128, each K*eps relative
        # (measured: reference path bit-identical, interpreter 2.4e-7 against logits of 0.57)
        tol = 2 * 2 * 128 * EPS32 * float(want.abs().max())
        assert float((got - want).abs().max()) <= tol, backend


def test_from_bnb_trains_only_the_adapters_and_keeps_bias_and_compute_dtype():
    model = nn.Sequential(bnb_linear(32, 64), nn.ReLU(), bnb_linear(16, 32, quant_type="fp4", nested=False))
    model[0].compute_dtype = torch.bfloat16
    biases = [model[0].bias, model[2].bias]
    lora.from_bnb(model, lora.LoRAConfig(r=2, alpha=4, dropout=0.0))
    assert [model[0].bias, model[2].bias] == biases and model[0].bias is biases[0]  # the same Parameters
    assert model[0].compute_dtype == torch.bfloat16 and model[2].compute_dtype == torch.float32
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"}
    model(torch.randn(5, 64)).square().sum().backward()
    assert model[2].lora_B.grad.abs().sum() > 0


@pytest.mark.parametrize("config", [lora.LoRAConfig(r=2, alpha=4, dropout=0.0, target_modules=["2"]),
                                    lora.LoRAConfig(r=2, alpha=4, dropout=0.0, exclude_modules=["0"]),
                                    lora.LoRAConfig(r=2, alpha=4, dropout=0.0, target_modules=r".*2")])
def test_from_bnb_adapts_the_targets_and_freezes_the_rest_on_the_same_storage(config):
    # K = 40 for the second layer: not a multiple of 16 (module docstring: bitsandbytes' AVX-512 bug)
    model = nn.Sequential(bnb_linear(40, 64), nn.ReLU(), bnb_linear(16, 40, quant_type="fp4", nested=False))
    x = torch.randn(5, 64)
    with torch.no_grad(), exact_fp32_bnb_forward(model):
        want = model(x)
    before = [(model[i].weight, model[i].weight.quant_state, model[i].bias) for i in (0, 2)]
    lora.from_bnb(model, config)
    assert type(model[0]) is lora.QuantizedLinear and type(model[2]) is lora.QLoRALinear
    for layer, (w, qs, bias) in zip((model[0], model[2]), before):
        assert shares_storage(layer.quantized_weight, w, qs) and layer.bias is bias
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"2.lora_A", "2.lora_B"}
    for backend in ("reference", "auto"):
        with torch.no_grad(), kernels.force_backend(backend):
            got = model(x)
        assert float((got - want).abs().max()) <= 2 * 64 * EPS32 * float(want.abs().max()), backend
    model(x).square().sum().backward()
    assert model[2].lora_B.grad.abs().sum() > 0


def test_from_bnb_reads_the_modules_copy_of_a_lost_quant_state():
    """FSDP can drop ``quant_state`` from the parameter; bitsandbytes keeps a copy on the module."""
    layer = bnb_linear(32, 64)
    layer.quant_state = layer.weight.quant_state
    w = layer.weight
    layer.weight = nn.Parameter(w.data, requires_grad=False)  # a plain parameter: no quant_state
    model = nn.Sequential(layer)
    lora.from_bnb(model)
    assert model[0].weight.data_ptr() == w.data_ptr()


def test_from_bnb_refuses_clearly_and_leaves_the_model_untouched():
    with pytest.raises(ValueError, match="has no bitsandbytes 4-bit Linear"):
        lora.from_bnb(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(TypeError, match=r"8-bit \(LLM.int8\) Linears .*\['1'\]"):
        lora.from_bnb(nn.Sequential(bnb_linear(32, 64), bnb.nn.Linear8bitLt(32, 16, has_fp16_weights=False)))
    with pytest.raises(ValueError, match=r"adapts bitsandbytes 4-bit Linears only; these targets are not: \['1'\]"):
        lora.from_bnb(nn.Sequential(bnb_linear(32, 64), nn.Linear(32, 8)), lora.LoRAConfig(target_modules=["0", "1"]))
    with pytest.raises(ValueError, match=r"matched no module of Sequential: \[.q_proj.\]"):
        lora.from_bnb(nn.Sequential(bnb_linear(32, 64)), lora.LoRAConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="excludes every 4-bit Linear"):
        lora.from_bnb(nn.Sequential(bnb_linear(32, 64)), lora.LoRAConfig(exclude_modules=["0"]))
    good, bad = bnb_linear(32, 64), bnb_linear(16, 32)
    bad.weight.quant_state.blocksize = 48
    model = nn.Sequential(good, bad)
    with pytest.raises(ValueError, match="^1: quant_state.blocksize must be a power of two"):
        lora.from_bnb(model)
    assert model[0] is good and model[1] is bad  # read everything first, then swap
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        lora.from_bnb("model")
