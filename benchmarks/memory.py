"""Section (b): memory accounting for Llama-shaped models, bf16 vs NF4 vs NF4+DQ, with LoRA and AdamW.

Every number is an exact byte count from the shapes (no fudge factors), except the activation line,
which is a stated estimate. The 4-bit formula is the one ``nf4.QuantizedTensor.nbytes()`` obeys:

    data            ceil(n / 2)                     bytes (two 4-bit codes per byte)
    absmax          nblocks * 4                     bytes, nblocks = ceil(n / blocksize)   (no DQ)
                    nblocks * 1                     bytes of uint8 codes                     (DQ)
    nested absmax   ceil(nblocks / 256) * 4         bytes (DQ only)
    tables          16 * 4 (+ 256 * 4 + 4 with DQ) bytes per tensor (code map, nested map, offset)

so 4.5 bits/param without and 4 + 8/64 + 32/(64*256) = 4.127 bits/param with double quantization.
Only the linear layers of the decoder are quantized; embeddings, the LM head and norms stay bf16
(as in the QLoRA paper and bitsandbytes/transformers).

``confirm_against_quantized`` checks the formula against the real ``nf4.quantize`` output of the
MiniLM linear layers and (full mode) of one full-size Llama-7B decoder layer: the bytes must agree.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

GB = 1e9          # the paper's "48 GB" is a GPU's marketing size; we show GiB next to it
GIB = 2 ** 30
NESTED_BLOCKSIZE = 256
OPTIM_8BIT_MIN_NUMEL = 4096  # bitsandbytes: tensors below this keep 32-bit state (NOTES §2)
OPTIM_8BIT_BLOCKSIZE = 256


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions that fix a LLaMA-1 model's parameter count (Touvron et al. 2023, Table 2)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int = 32000

    def linear_shapes(self) -> list[tuple[str, int, int]]:
        """One decoder layer's linear weights as (name, out_features, in_features)."""
        h, f = self.hidden, self.intermediate
        return [("q_proj", h, h), ("k_proj", h, h), ("v_proj", h, h), ("o_proj", h, h),
                ("gate_proj", f, h), ("up_proj", f, h), ("down_proj", h, f)]


LLAMA_SHAPES = {
    "7B": LlamaShape("7B", 4096, 11008, 32, 32),
    "13B": LlamaShape("13B", 5120, 13824, 40, 40),
    "33B": LlamaShape("33B", 6656, 17920, 60, 52),
    "65B": LlamaShape("65B", 8192, 22016, 80, 64),
}


# ---- per-tensor byte formulas ----------------------------------------------------------------
def quantized_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> int:
    """Bytes of one 4-bit tensor of ``numel`` elements, exactly as ``QuantizedTensor.nbytes()``."""
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    nblocks = math.ceil(numel / blocksize)
    total = (numel + 1) // 2 + 16 * 4
    if double_quant:
        total += nblocks + math.ceil(nblocks / NESTED_BLOCKSIZE) * 4 + 256 * 4 + 4
    else:
        total += nblocks * 4
    return total


def adamw_state_bytes(numel: int, bits: int) -> int:
    """AdamW m and v for one tensor: 2 x 4 bytes/elem at 32 bits; at 8 bits 2 x (1 byte/elem +
    4 bytes per 256-block absmax), except tensors under 4096 elements, which keep 32-bit state."""
    if bits not in (8, 32):
        raise ValueError(f"state bits must be 32 or 8, got {bits}")
    if bits == 32 or numel < OPTIM_8BIT_MIN_NUMEL:
        return 8 * numel
    return 2 * (numel + 4 * math.ceil(numel / OPTIM_8BIT_BLOCKSIZE))


# ---- whole-model accounting ------------------------------------------------------------------
def param_counts(shape: LlamaShape) -> dict[str, int]:
    """Parameters by kind: decoder linears, embeddings, LM head, RMSNorm weights, total."""
    linear = shape.layers * sum(o * i for _, o, i in shape.linear_shapes())
    embed = head = shape.vocab * shape.hidden
    norms = (2 * shape.layers + 1) * shape.hidden
    return {"linear": linear, "embed": embed, "head": head, "norms": norms,
            "total": linear + embed + head + norms}


def lora_shapes(shape: LlamaShape, r: int) -> list[int]:
    """Element counts of every LoRA matrix (A: r x in, B: out x r) on all decoder linears."""
    out = []
    for _ in range(shape.layers):
        for _, o, i in shape.linear_shapes():
            out += [r * i, o * r]
    return out


def activation_bytes(shape: LlamaShape, batch: int = 1, seq: int = 512, bytes_per: int = 2) -> int:
    """ESTIMATE of activation memory with gradient checkpointing at every decoder layer.

    Kept: each layer's input hidden state, layers * b * s * h. Recomputed layer (one at a time):
    the inputs that backward needs, about (10 h + 4 f) per token (q/k/v/o inputs, norms, residuals,
    gate/up/act/down inputs), plus attention probabilities heads * s^2 twice (scores + softmax).
    """
    b, s, h, f = batch, seq, shape.hidden, shape.intermediate
    kept = shape.layers * b * s * h
    recompute = b * s * (10 * h + 4 * f) + 2 * b * shape.heads * s * s
    return (kept + recompute) * bytes_per


def training_memory(shape: LlamaShape, weights: str, lora_r: int | None = 64, optim_bits: int = 32,
                    full_finetune: bool = False, blocksize: int = 64, batch: int = 1, seq: int = 512) -> dict:
    """Bytes of each component of fine-tuning ``shape``.

    Args:
        weights: 'bf16', 'nf4' or 'nf4-dq': how the decoder's linear weights are stored.
        lora_r: LoRA rank on all decoder linears (None: no adapters, inference weights only).
        optim_bits: AdamW state precision for the trainable parameters (32 or 8).
        full_finetune: train every weight in bf16 (bf16 grads + fp32 m/v: 12 bytes/param in all).

    Returns a dict of byte counts: weights, lora, grads, optimizer, activations, total.
    """
    if weights not in ("bf16", "nf4", "nf4-dq"):
        raise ValueError(f"weights must be 'bf16', 'nf4' or 'nf4-dq', got {weights!r}")
    if full_finetune and weights != "bf16":
        raise ValueError(f"full fine-tuning needs 16-bit weights, got weights={weights!r}")
    pc = param_counts(shape)
    other16 = 2 * (pc["embed"] + pc["head"] + pc["norms"])
    if weights == "bf16":
        w = 2 * pc["linear"] + other16
    else:
        dq = weights == "nf4-dq"
        w = shape.layers * sum(quantized_bytes(o * i, blocksize, dq) for _, o, i in shape.linear_shapes())
        w += other16
    comp = {"weights": w, "lora": 0, "grads": 0, "optimizer": 0, "activations": 0}
    if full_finetune:
        comp["grads"] = 2 * pc["total"]
        comp["optimizer"] = sum(adamw_state_bytes(n, optim_bits) for n in _all_weight_numels(shape))
        comp["activations"] = activation_bytes(shape, batch, seq)
    elif lora_r:
        numels = lora_shapes(shape, lora_r)
        comp["lora"] = 2 * sum(numels)       # bf16 adapters (the paper's recipe)
        comp["grads"] = 2 * sum(numels)
        comp["optimizer"] = sum(adamw_state_bytes(n, optim_bits) for n in numels)
        comp["activations"] = activation_bytes(shape, batch, seq)
    comp["total"] = sum(comp.values())
    return comp


def _all_weight_numels(shape: LlamaShape) -> list[int]:
    pc = param_counts(shape)
    lin = [o * i for _ in range(shape.layers) for _, o, i in shape.linear_shapes()]
    return lin + [pc["embed"], pc["head"]] + [shape.hidden] * (2 * shape.layers + 1)


CONFIGS = [
    # (label, kwargs for training_memory)
    ("bf16 weights", dict(weights="bf16", lora_r=None)),
    ("NF4 weights", dict(weights="nf4", lora_r=None)),
    ("NF4+DQ weights", dict(weights="nf4-dq", lora_r=None)),
    ("full bf16 fine-tune, AdamW 32-bit", dict(weights="bf16", full_finetune=True)),
    ("16-bit LoRA r=64, AdamW 32-bit", dict(weights="bf16", lora_r=64, optim_bits=32)),
    ("QLoRA NF4 r=64, AdamW 32-bit", dict(weights="nf4", lora_r=64, optim_bits=32)),
    ("QLoRA NF4+DQ r=64, AdamW 32-bit", dict(weights="nf4-dq", lora_r=64, optim_bits=32)),
    ("QLoRA NF4+DQ r=64, AdamW 8-bit", dict(weights="nf4-dq", lora_r=64, optim_bits=8)),
]


def accounting_table() -> list[dict]:
    """One row per (model, config) with every component in bytes."""
    rows = []
    for shape in LLAMA_SHAPES.values():
        pc = param_counts(shape)
        for label, kw in CONFIGS:
            rows.append({"model": shape.name, "params": pc["total"], "config": label,
                         **training_memory(shape, **kw)})
    return rows


def claim_65b(budget_gb: float = 48.0) -> dict:
    """The QLoRA paper's claims, recomputed: 65B full 16-bit fine-tuning needs > 780 GB,
    QLoRA (NF4+DQ, LoRA r=64 on all linears, paged AdamW) fits in a 48 GB GPU."""
    shape = LLAMA_SHAPES["65B"]
    pc = param_counts(shape)
    full = training_memory(shape, "bf16", full_finetune=True)
    q = training_memory(shape, "nf4-dq", lora_r=64, optim_bits=32)
    n_lora = sum(lora_shapes(shape, 64))
    lin_bpp = 8 * sum(quantized_bytes(o * i) for _, o, i in shape.linear_shapes()) / sum(
        o * i for _, o, i in shape.linear_shapes())
    full_bytes = full["weights"] + full["grads"] + full["optimizer"]
    other16 = 2 * (pc["total"] - pc["linear"])
    steps = [
        f"parameters: {pc['linear']:,} in decoder linears + {pc['embed'] + pc['head']:,} embeddings/head "
        f"+ {pc['norms']:,} norms = {pc['total']:,}",
        f"full 16-bit fine-tune: {pc['total']:,} x (2 B weight + 2 B grad + 8 B AdamW m,v) "
        f"= {full_bytes:,} B = {full_bytes / GB:.0f} GB",
        f"NF4+DQ linears: {pc['linear']:,} x {lin_bpp:.4f} bits / 8 = {q['weights'] - other16:,} B",
        f"bf16 embeddings, head, norms: {pc['total'] - pc['linear']:,} x 2 B = {2 * (pc['total'] - pc['linear']):,} B",
        f"LoRA r=64 on all {7 * shape.layers} linears: {n_lora:,} params x 2 B (bf16) = {q['lora']:,} B; "
        f"their bf16 grads {q['grads']:,} B",
        f"AdamW 32-bit state on LoRA params: {n_lora:,} x 8 B = {q['optimizer']:,} B",
        f"activations (estimate, gradient checkpointing, batch 1, seq 512): {q['activations']:,} B",
        f"total: {q['total']:,} B = {q['total'] / GB:.2f} GB = {q['total'] / GIB:.2f} GiB "
        f"({'fits' if q['total'] <= budget_gb * GB else 'does NOT fit'} in {budget_gb:g} GB; "
        f"headroom {(budget_gb * GB - q['total']) / GB:.2f} GB)",
    ]
    return {"full_finetune_bytes": full_bytes,
            "qlora_bytes": q["total"], "fits": q["total"] <= budget_gb * GB, "budget_gb": budget_gb,
            "components": q, "steps": steps}


def as_dict(shape: LlamaShape) -> dict:
    return asdict(shape)
