"""The two fine-tune tasks: masked-LM on all-MiniLM-L6-v2 (default) and causal LM on a
Hugging Face Llama-style checkpoint (``--model PATH``).

A task builds a fresh pretrained model for each arm, serves the same batch for a given step to
every arm, and evaluates per-token held-out losses (so arms can be compared token by token).

    task = MLMTask(seq_len=64, batch=16, heldout_rows=128, seed=0)
    model = task.build_model(dtype)          # nn.Module: model(inputs, labels) -> mean loss
    inputs, labels = task.batch(step)        # CPU tensors, identical for every arm
    losses = task.token_losses(model, device)   # float32 [n_heldout_tokens]
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .mlm_data import build_data, mask_tokens


class _Task:
    """Shared batching: row ``(step * batch + i) mod n_rows`` of the shuffled training rows."""

    name = "task"
    objective = ""

    def __init__(self, batch: int, seed: int) -> None:
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.bsz = batch
        self.seed = seed

    def rows(self, step: int) -> torch.Tensor:
        n = self.data.train.shape[0]
        idx = (torch.arange(self.bsz) + step * self.bsz) % n
        return self.data.train[idx]

    @torch.no_grad()
    def token_losses(self, model: nn.Module, device: torch.device) -> torch.Tensor:
        """Loss of every held-out target token (fixed held-out mask for MLM), float32, on CPU."""
        was = model.training
        model.eval()
        out = []
        for i in range(0, self.data.heldout_inputs.shape[0], self.bsz):
            inp = self.data.heldout_inputs[i:i + self.bsz].to(device)
            lab = self.data.heldout_labels[i:i + self.bsz].to(device)
            out.append(model.token_losses(inp, lab).float().cpu())
        model.train(was)
        return torch.cat(out)

    @property
    def tokens_per_step(self) -> int:
        return self.bsz * self.data.train.shape[1]

    def describe(self) -> dict:
        return {"task": self.name, "objective": self.objective, **self.data.meta}


class MLMTask(_Task):
    """Masked-LM continued pre-training of a BERT encoder; the output head is the tied word
    embeddings (``bert.MaskedLM``)."""

    name = "mlm"
    objective = "masked-LM cross-entropy over masked tokens (15%; 80/10/10), tied word-embedding head"

    def __init__(self, model_dir: str | Path | None = None, seq_len: int = 64, batch: int = 16,
                 n_train_rows: int | None = None, heldout_rows: int = 128, seed: int = 0, bert_impl: str = "ours",
                 tokenizer_backend: str = "auto") -> None:
        super().__init__(batch, seed)
        from .bert import BertConfig, minilm_dir
        from .wordpiece import load_tokenizer

        if bert_impl not in ("ours", "transformers"):
            raise ValueError(f"bert_impl must be 'ours' or 'transformers', got {bert_impl!r}")
        self.model_dir = Path(model_dir) if model_dir is not None else minilm_dir()
        self.bert_impl = bert_impl
        self.config = BertConfig.from_json(self.model_dir / "config.json")
        self.tok = load_tokenizer(self.model_dir, tokenizer_backend)
        self.data = build_data(self.tok, seq_len, n_train_rows, heldout_rows, seed, mlm=True,
                               vocab_size=self.config.vocab_size)
        self.mask_id = self.tok.token_to_id("[MASK]")
        self.special = [self.tok.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]")]
        self.random_range = (self.tok.token_to_id("!"), self.config.vocab_size)
        self.vocab_size = self.config.vocab_size

    def build_model(self, dtype: torch.dtype, gradient_checkpointing: bool = False) -> nn.Module:
        from .bert import MaskedLM, hf_enable_checkpointing, load_bert, load_hf_bert

        if self.bert_impl == "ours":
            enc = load_bert(self.model_dir, dtype)
            enc.gradient_checkpointing = gradient_checkpointing
        else:
            enc = load_hf_bert(self.model_dir, dtype)
            if gradient_checkpointing:
                hf_enable_checkpointing(enc.inner)
        return MaskedLM(enc)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step + 1)
        return mask_tokens(self.rows(step), gen, self.mask_id, self.special, self.random_range)


class CausalLM(nn.Module):
    """A Hugging Face causal LM as ``forward(ids, labels) -> mean next-token loss``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def token_losses(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy at every position but the last, float32 ``[B * (S - 1)]``."""
        logits = self.inner(input_ids=ids).logits[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), reduction="none")

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.token_losses(ids, labels).mean()


class CausalTask(_Task):
    """Causal-LM fine-tuning of a Llama-style checkpoint directory (config.json + safetensors +
    tokenizer.json) on the same docstring corpus. Needs ``transformers`` and ``tokenizers``."""

    name = "causal-lm"
    objective = "next-token cross-entropy"

    def __init__(self, model_dir: str | Path, seq_len: int = 64, batch: int = 16, n_train_rows: int | None = None,
                 heldout_rows: int = 128, seed: int = 0) -> None:
        super().__init__(batch, seed)
        self.model_dir = Path(model_dir)
        cfg_path = self.model_dir / "config.json"
        if not cfg_path.exists():
            raise FileNotFoundError(f"--model {model_dir}: no config.json (expected a Hugging Face checkpoint dir)")
        if not any(self.model_dir.glob("*.safetensors")):
            raise FileNotFoundError(f"--model {model_dir}: no *.safetensors weights")
        if not (self.model_dir / "tokenizer.json").exists():
            raise FileNotFoundError(f"--model {model_dir}: no tokenizer.json")
        try:
            import transformers  # noqa: F401
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError("--model needs the 'transformers' package (the bench extra)") from e
        from .wordpiece import HFTokenizer

        self.hf_config = json.loads(cfg_path.read_text())
        self.tok = HFTokenizer(self.model_dir / "tokenizer.json")
        vocab = int(self.hf_config.get("vocab_size", self.tok.vocab_size))
        self.vocab_size = vocab
        if self.tok.vocab_size > vocab:
            raise ValueError(f"tokenizer has {self.tok.vocab_size} tokens but the model only {vocab}")
        self.data = build_data(self.tok, seq_len, n_train_rows, heldout_rows, seed, mlm=False, vocab_size=vocab)

    def build_model(self, dtype: torch.dtype, gradient_checkpointing: bool = False) -> nn.Module:
        from transformers import AutoModelForCausalLM

        from .bert import hf_dtype_kwarg, hf_enable_checkpointing

        inner = AutoModelForCausalLM.from_pretrained(str(self.model_dir), **hf_dtype_kwarg(dtype))
        inner.config.use_cache = False
        if gradient_checkpointing:
            hf_enable_checkpointing(inner)
        return CausalLM(inner)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.rows(step)
        return ids, ids
