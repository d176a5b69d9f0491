"""Contrastive fine-tuning of all-MiniLM-L6-v2 on the stdlib retrieval pairs: QLoRA vs 16-bit LoRA.

Arms (same data order, same seeds, same adapters: LoRA r=16, alpha=32 on every Linear of the
encoder, ``optim.PagedAdamW`` for all, so only the frozen base's storage differs):

    lora16       the base in 16-bit/fp32 (``apply_lora(..., quantize=False)``)
    qlora_nf4    NF4 + double quantization, blocksize 64 (QLoRA)
    qlora_fp4    FP4 + double quantization, blocksize 64
    qlora_int4   INT4 (uniform) + double quantization, blocksize 64

Objective: symmetric InfoNCE with in-batch negatives. For a batch of B pairs with normalized
embeddings ``q, d: [B, H]``, ``logits = q d^T / T`` (T = 0.05) and

    loss = (CE(logits, arange(B)) + CE(logits^T, arange(B))) / 2

    res = run_arm(ARMS["qlora_nf4"], train, test, FinetuneConfig(seed=1), model_dir=None)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from .encoder import encode_texts, evaluate, load_minilm
from .progress import progress


@dataclass(frozen=True)
class Arm:
    key: str
    label: str
    quantize: bool
    quant_type: str = "nf4"


ARMS = {a.key: a for a in [
    Arm("lora16", "16-bit LoRA", quantize=False),
    Arm("qlora_nf4", "QLoRA NF4+DQ", True, "nf4"),
    Arm("qlora_fp4", "QLoRA FP4+DQ", True, "fp4"),
    Arm("qlora_int4", "QLoRA INT4+DQ", True, "int4"),
]}
TEMPERATURE = 0.05


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyperparameters of one fine-tune run (defaults: the full study's)."""

    steps: int = 30
    batch: int = 32
    lr: float = 5e-4
    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    max_len: int = 64
    temperature: float = TEMPERATURE
    seed: int = 0
    blocksize: int = 64
    double_quant: bool = True
    device: str = "cpu"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "r", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.batch < 2:
            raise ValueError(f"batch must be >= 2 (in-batch negatives), got {self.batch!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")


def info_nce(q: torch.Tensor, d: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Symmetric InfoNCE of normalized ``q, d: [B, H]`` (row i of each is a positive pair)."""
    logits = q @ d.T / temperature
    target = torch.arange(q.shape[0], device=q.device)
    return (nn.functional.cross_entropy(logits, target) + nn.functional.cross_entropy(logits.T, target)) / 2


def batch_order(n_train: int, steps: int, batch: int, seed: int) -> list[list[int]]:
    """Indices of each step's pairs: successive slices of seeded permutations (no repeats in a batch)."""
    if n_train < batch:
        raise ValueError(f"need at least batch={batch} training pairs, got {n_train}")
    g = torch.Generator().manual_seed(seed)
    perm: list[int] = []
    out = []
    for _ in range(steps):
        if len(perm) < batch:
            perm = torch.randperm(n_train, generator=g).tolist()
        out.append(perm[:batch])
        perm = perm[batch:]
    return out


def build_arm_model(arm: Arm, cfg: FinetuneConfig, model_dir=None):
    """A fresh pretrained encoder with adapters (and a 4-bit base for QLoRA arms), and its tokenizer."""
    import lora

    dtype = getattr(torch, cfg.dtype)
    model, tok = load_minilm(model_dir, device="cpu", dtype=dtype)
    torch.manual_seed(cfg.seed)
    lcfg = lora.LoRAConfig(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, target_modules="all-linear",
                           quant_type=arm.quant_type, blocksize=cfg.blocksize, double_quant=cfg.double_quant,
                           compute_dtype=dtype, adapter_dtype=torch.float32)
    lora.apply_lora(model, lcfg, quantize=arm.quantize, device=cfg.device)
    return model, tok


def train(model: nn.Module, tok, pairs, cfg: FinetuneConfig, label: str = "finetune") -> list[float]:
    """``cfg.steps`` PagedAdamW steps of symmetric InfoNCE on ``pairs``; returns the loss curve."""
    import lora
    import optim

    params = list(lora.adapter_parameters(model).values())
    opt = optim.PagedAdamW(params, lr=cfg.lr, weight_decay=0.0)
    losses = []
    model.train()
    bar = progress(batch_order(len(pairs), cfg.steps, cfg.batch, cfg.seed), label, unit="step")
    for idx in bar:
        q = encode_texts(model, tok, [pairs[i].query for i in idx], cfg.max_len)
        d = encode_texts(model, tok, [pairs[i].document for i in idx], cfg.max_len)
        loss = info_nce(q, d, cfg.temperature)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"{label}: loss became {losses[-1]} at step {len(losses) - 1}")
        bar.set(loss=losses[-1])
    model.eval()
    return losses


def run_arm(arm: Arm, train_pairs, test_pairs, cfg: FinetuneConfig, model_dir=None, evaluate_before: bool = True,
            resamples: int = 1000) -> dict:
    """Fine-tune one arm with one seed; recall@1 / MRR on ``test_pairs`` before (optional) and after."""

    t0 = time.perf_counter()
    model, tok = build_arm_model(arm, cfg, model_dir)
    out: dict = {"arm": arm.key, "seed": cfg.seed}
    if evaluate_before:
        out["before"] = evaluate(model, tok, test_pairs, cfg.max_len, resamples=resamples)[0]
    t1 = time.perf_counter()
    out["train_loss"] = train(model, tok, train_pairs, cfg, f"finetune {arm.key} seed {cfg.seed}")
    out["train_s"] = time.perf_counter() - t1
    out["after"] = evaluate(model, tok, test_pairs, cfg.max_len, resamples=resamples)[0]
    out["wall_s"] = time.perf_counter() - t0
    return out
