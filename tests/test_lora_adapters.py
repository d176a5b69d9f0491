"""Adapters in peft's file layout: our round trip, validation errors that name the key, and
interchange with peft itself in both directions."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import kernels
import lora



def tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def randomize(params, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(autouse=True)
def _reference_backend():
    with kernels.force_backend("reference"):  # file formats are the subject here, not kernels
        yield


def adapted_mlp(r=4, alpha=8.0, quantize=False, **kw):
    model = lora.apply_lora(mlp(), lora.LoRAConfig(r=r, alpha=alpha, dropout=0.0, **kw), quantize=quantize)
    return model


# ---- our own round trip ---------------------------------------------------------------------------
@pytest.mark.parametrize("quantize", [False, True])
def test_round_trip_restores_weights_and_scale(tmp_path, quantize):
    src = adapted_mlp(quantize=quantize, use_rslora=True)
    randomize(lora.adapter_parameters(src).values())
    lora.save_adapter(src, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(tensors) == ["base_model.model.0.lora_A.weight", "base_model.model.0.lora_B.weight",
                               "base_model.model.2.lora_A.weight", "base_model.model.2.lora_B.weight"]
    assert tensors["base_model.model.0.lora_A.weight"].shape == (4, 16)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == ("LORA", 4, 8, True)
    assert cfg["target_modules"] == ["0", "2"] and cfg["rank_pattern"] == {} and cfg["bias"] == "none"

    dst = lora.apply_lora(mlp(), lora.load_adapter_config(tmp_path), quantize=quantize)
    assert dst[0].use_rslora and dst[0].alpha == 8
    lora.load_adapter(dst, tmp_path)
    for (n, a), (_, b) in zip(lora.adapter_parameters(src).items(), lora.adapter_parameters(dst).items()):
        assert torch.equal(a, b), n
    x = torch.randn(3, 16)
    assert torch.equal(src(x), dst(x))


def test_load_sets_alpha_and_dropout_from_the_file(tmp_path):
    src = adapted_mlp(alpha=3.0)
    lora.save_adapter(src, tmp_path)
    dst = adapted_mlp(alpha=16.0)
    dst[0].lora_dropout = 0.3
    lora.load_adapter(dst, tmp_path)
    assert dst[0].alpha == 3.0 and dst[0].scale == 0.75 and dst[0].lora_dropout == 0.0


def test_mixed_ranks_use_rank_and_alpha_patterns(tmp_path):
    model = mlp()
    lora.apply_lora(model, lora.LoRAConfig(r=4, alpha=8, target_modules=["0"]), quantize=False)
    lora.apply_lora(model, lora.LoRAConfig(r=2, alpha=2, target_modules=["2"]), quantize=False)
    randomize(lora.adapter_parameters(model).values())
    lora.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert len(cfg["rank_pattern"]) == 1 and len(cfg["alpha_pattern"]) == 1
    twin = mlp()
    lora.apply_lora(twin, lora.LoRAConfig(r=4, alpha=1, target_modules=["0"]), quantize=False)
    lora.apply_lora(twin, lora.LoRAConfig(r=2, alpha=1, target_modules=["2"]), quantize=False)
    lora.load_adapter(twin, tmp_path)
    assert {layer.alpha for _, layer in lora.lora_layers(twin)} == {8.0, 2.0}
    x = torch.randn(2, 16)
    assert torch.equal(model.eval()(x), twin.eval()(x))
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(mlp(), str(tmp_path)).eval()  # peft reads the patterns too
    assert theirs.base_model.model[2].r["default"] == 2 and theirs.base_model.model[2].scaling["default"] == 1.0
    torch.testing.assert_close(theirs(x), model(x), atol=1e-6, rtol=1e-6)


# ---- validation: every error names what is wrong -------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    src = adapted_mlp()
    randomize(lora.adapter_parameters(src).values())
    lora.save_adapter(src, tmp_path)
    return tmp_path


def rewrite(path, edit):
    tensors = load_file(path / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})


def test_missing_key_is_named(saved):
    rewrite(saved, lambda t: t.pop("base_model.model.2.lora_B.weight"))
    with pytest.raises(ValueError, match=r"missing keys: \['base_model.model.2.lora_B.weight'\]"):
        lora.load_adapter(adapted_mlp(), saved)


def test_extra_key_is_named(saved):
    rewrite(saved, lambda t: t.update({"base_model.model.4.lora_A.weight": torch.zeros(4, 32)}))
    with pytest.raises(ValueError, match=r"not LoRA layers of Sequential: \['base_model.model.4.lora_A.weight'\]"):
        lora.load_adapter(adapted_mlp(), saved)


def test_rank_mismatch_is_named_and_nothing_changes(saved):
    dst = adapted_mlp(r=8)
    before = {n: p.clone() for n, p in lora.adapter_parameters(dst).items()}
    with pytest.raises(ValueError, match=r"rank mismatch for 'base_model.model.0.lora_A.weight': the file has "
                                         r"rank 4, the layer has r=8"):
        lora.load_adapter(dst, saved)
    assert all(torch.equal(p, before[n]) for n, p in lora.adapter_parameters(dst).items())


def test_shape_mismatch_is_named(saved):
    rewrite(saved, lambda t: t.update({"base_model.model.0.lora_A.weight": torch.zeros(4, 15)}))
    with pytest.raises(ValueError, match=r"shape mismatch for 'base_model.model.0.lora_A.weight': the file has "
                                         r"\(4, 15\), the layer expects \(4, 16\)"):
        lora.load_adapter(adapted_mlp(), saved)


def test_non_float_tensor_is_named(saved):
    rewrite(saved, lambda t: t.update({"base_model.model.2.lora_A.weight": torch.zeros(4, 32, dtype=torch.int32)}))
    with pytest.raises(ValueError, match=r"'base_model.model.2.lora_A.weight' must be a float tensor.*I32"):
        lora.load_adapter(adapted_mlp(), saved)


def test_config_errors_are_named(saved):
    cfg_path = saved / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(dict(cfg, use_dora=True)))
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        lora.load_adapter(adapted_mlp(), saved)
    cfg_path.write_text(json.dumps(dict(cfg, peft_type="IA3")))
    with pytest.raises(ValueError, match="peft_type must be 'LORA', got 'IA3'"):
        lora.load_adapter(adapted_mlp(), saved)
    cfg_path.write_text(json.dumps(dict(cfg, r=8)))
    with pytest.raises(ValueError, match="says r=8 for 'base_model.model.0.lora_A.weight'"):
        lora.load_adapter(adapted_mlp(), saved)
    cfg_path.write_text(json.dumps(dict(cfg, lora_alpha=-2)))
    with pytest.raises(ValueError, match="alpha must be a positive finite number, got -2"):
        lora.load_adapter(adapted_mlp(), saved)
    cfg_path.write_text("{")
    with pytest.raises(ValueError, match="malformed JSON"):
        lora.load_adapter(adapted_mlp(), saved)
    os.remove(cfg_path)
    with pytest.raises(ValueError, match="no adapter_config.json at"):
        lora.load_adapter(adapted_mlp(), saved)


def test_state_errors(saved, tmp_path):
    with pytest.raises(ValueError, match="Sequential has no LoRA layers"):
        lora.load_adapter(mlp(), saved)
    merged = adapted_mlp()
    lora.merge(merged)
    with pytest.raises(ValueError, match=r"cannot load into merged layers \['0', '2'\]"):
        lora.load_adapter(merged, saved)
    with pytest.raises(ValueError, match=r"cannot save merged layers \['0', '2'\]"):
        lora.save_adapter(merged, tmp_path / "x")
    (saved / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ValueError, match="header length 16 exceeds the file"):
        lora.load_adapter(adapted_mlp(), saved)


# ---- interchange with peft ---------------------------------------------------------------------------
def test_peft_loads_our_adapter_and_gives_our_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    ours = lora.apply_lora(tiny_llama(), lora.LoRAConfig(r=4, alpha=16, dropout=0.0, use_rslora=True),
                           quantize=False)
    randomize(lora.adapter_parameters(ours).values())
    lora.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        got, want = ours(ids).logits, theirs(input_ids=ids).logits
        with lora.disable_adapter(ours):
            base = ours(ids).logits
    assert not torch.allclose(got, base, atol=1e-3)  # the adapter matters...
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # ...and peft applies it the same way


def test_we_load_a_peft_adapter_and_give_its_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    targets = ["q_proj", "v_proj", "down_proj"]
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=8, lora_alpha=4, lora_dropout=0.0,
                                                                target_modules=targets)).eval()
    randomize([p for n, p in theirs.named_parameters() if "lora_" in n], seed=3)
    theirs.save_pretrained(str(tmp_path))
    cfg = lora.load_adapter_config(tmp_path)
    assert (cfg.r, cfg.alpha, set(cfg.target_modules)) == (8, 4, set(targets))
    ours = lora.apply_lora(tiny_llama(), cfg, quantize=False)
    assert len(list(lora.lora_layers(ours))) == 6
    lora.load_adapter(ours, tmp_path)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    # a partially adapted model is told exactly which keys it cannot place
    partial = lora.apply_lora(tiny_llama(), lora.LoRAConfig(r=8, target_modules=["q_proj", "v_proj"]), quantize=False)
    with pytest.raises(ValueError, match=r"not LoRA layers of LlamaForCausalLM: \['base_model.model.model.layers.0."
                                         r"mlp.down_proj.lora_A.weight'"):
        lora.load_adapter(partial, tmp_path)
