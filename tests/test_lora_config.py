"""LoRAConfig validation and target selection (peft's matching rules)."""

import math
import re

import pytest
import torch
from torch import nn

import lora
from lora.targets import find_targets, output_layer_name


# ---- config -------------------------------------------------------------------------------------
def test_defaults_are_the_qlora_recipe():
    cfg = lora.LoRAConfig()
    assert (cfg.r, cfg.alpha, cfg.dropout, cfg.target_modules) == (16, 32, 0.05, "all-linear")
    assert (cfg.quant_type, cfg.blocksize, cfg.double_quant) == ("nf4", 64, True)
    assert cfg.scale == 2.0
    assert lora.LoRAConfig(r=16, alpha=32, use_rslora=True).scale == pytest.approx(32 / math.sqrt(16))


@pytest.mark.parametrize("field, value, match", [
    ("r", 0, "r must be a positive int, got 0"),
    ("r", 2.0, "r must be a positive int, got 2.0"),
    ("r", True, "r must be a positive int, got True"),
    ("alpha", -1, "alpha must be a positive finite number, got -1"),
    ("alpha", float("nan"), "alpha must be a positive finite number, got nan"),
    ("dropout", 1.0, r"dropout must be a number in \[0, 1\), got 1.0"),
    ("init", "xavier", "init must be one of .*got 'xavier'"),
    ("quant_type", "int8", "quant_type must be one of .*got 'int8'"),
    ("blocksize", 48, "blocksize must be a power of two in \\[32, 4096\\], got 48"),
    ("compute_dtype", torch.int8, "compute_dtype must be one of"),
    ("adapter_dtype", torch.float64, "adapter_dtype must be one of"),
    ("target_modules", [], "target_modules must be a regex string or a non-empty list"),
    ("target_modules", ["q_proj", ""], "non-empty names"),
    ("target_modules", "(", "target_modules regex '\\(' does not compile"),
    ("exclude_modules", "all-linear", "exclude_modules cannot be 'all-linear'"),
])
def test_config_rejects_bad_values_naming_them(field, value, match):
    with pytest.raises(ValueError, match=match):
        lora.LoRAConfig(**{field: value})


def test_config_type_errors():
    with pytest.raises(TypeError, match="target_modules must be a string or a list of strings, got int"):
        lora.LoRAConfig(target_modules=3)
    with pytest.raises(TypeError, match="use_rslora must be a bool"):
        lora.LoRAConfig(use_rslora="yes")


def test_config_normalizes_targets_and_serializes():
    cfg = lora.LoRAConfig(target_modules={"v_proj", "q_proj"}, compute_dtype=torch.bfloat16)
    assert cfg.target_modules == ("q_proj", "v_proj")
    d = cfg.to_dict()
    assert d["target_modules"] == ["q_proj", "v_proj"] and d["compute_dtype"] == "bfloat16"
    assert lora.LoRAConfig(target_modules="ALL-LINEAR").target_modules == "all-linear"


# ---- targets ------------------------------------------------------------------------------------
def mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.v_proj, self.norm = nn.Linear(8, 8), nn.Linear(8, 8), nn.LayerNorm(8)


class WithHead(nn.Module):
    """A model that names its output layer the Hugging Face way, registered *before* the blocks."""

    def __init__(self):
        super().__init__()
        self.lm_head = nn.Linear(8, 5)
        self.layers = nn.ModuleList([Block(), Block()])

    def get_output_embeddings(self):
        return self.lm_head


def test_all_linear_excludes_the_last_linear_of_a_plain_mlp():
    m = mlp()
    assert output_layer_name(m) == "4"
    assert find_targets(m, lora.LoRAConfig()) == ["0", "2"]


def test_all_linear_uses_get_output_embeddings_when_present():
    m = WithHead()
    assert output_layer_name(m) == "lm_head"
    assert find_targets(m, lora.LoRAConfig()) == [
        "layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj"]


def test_list_targets_match_names_and_dotted_suffixes_only():
    m = WithHead()
    assert find_targets(m, lora.LoRAConfig(target_modules=["q_proj"])) == ["layers.0.q_proj", "layers.1.q_proj"]
    assert find_targets(m, lora.LoRAConfig(target_modules=["1.v_proj", "lm_head"])) == ["lm_head", "layers.1.v_proj"]
    # "proj" is not a dotted suffix of "q_proj": peft's rule, no substring matching
    with pytest.raises(ValueError, match=re.escape("matched no module of WithHead: ['proj']")):
        find_targets(m, lora.LoRAConfig(target_modules=["q_proj", "proj"]))


def test_regex_targets_fullmatch_and_exclusions():
    m = WithHead()
    assert find_targets(m, lora.LoRAConfig(target_modules=r"layers\.\d+\.(q|v)_proj",
                                           exclude_modules=["0.v_proj"])) == [
        "layers.0.q_proj", "layers.1.q_proj", "layers.1.v_proj"]
    with pytest.raises(ValueError, match=re.escape("matched no module of WithHead: ['q_proj']")):
        find_targets(m, lora.LoRAConfig(target_modules="q_proj"))  # a regex must match the full name
    assert find_targets(m, lora.LoRAConfig(exclude_modules=r".*v_proj")) == ["layers.0.q_proj", "layers.1.q_proj"]


def test_every_unmatched_target_is_listed_and_non_linear_matches_are_refused():
    m = WithHead()
    with pytest.raises(ValueError, match=re.escape("['k_proj', 'o_proj']")):
        find_targets(m, lora.LoRAConfig(target_modules=["q_proj", "k_proj", "o_proj"]))
    with pytest.raises(ValueError, match=r"not nn.Linear.*layers.0.norm \(LayerNorm\)"):
        find_targets(m, lora.LoRAConfig(target_modules=["norm"]))


def test_applying_twice_says_the_model_is_already_adapted():
    m = lora.apply_lora(mlp(), lora.LoRAConfig(r=2), quantize=False)
    with pytest.raises(ValueError, match="found no nn.Linear to adapt in Sequential \\(it already has 2 LoRA layers\\)"):
        lora.apply_lora(m, lora.LoRAConfig(r=2), quantize=False)
