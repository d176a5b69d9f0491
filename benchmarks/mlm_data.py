"""The fine-tune's data: docstrings of Python's standard library, a fixed split, BERT masking.

Real English technical prose that every machine with Python has, read with ``ast`` (nothing is
imported or executed). Determinism:

- documents: every docstring (module, class, function) of the top-level ``*.py`` modules of the
  stdlib, files sorted by name, nodes in ``ast.walk`` order, exact duplicates dropped;
- split by module: a module is held out when ``crc32(name) % 10 == 0`` (about 10%), so no
  held-out sentence was seen in training (docstrings repeat within a module, rarely across);
- packing: each split's token stream is cut into ``[CLS] <seq_len-2 tokens> [SEP]`` rows; the
  training rows are then shuffled with a seeded generator;
- masking: BERT's 15% rule (of those, 80% -> [MASK], 10% -> random token, 10% unchanged), drawn
  from ``torch.Generator().manual_seed(seed + step)`` so every arm sees the same masks; the
  held-out set has one fixed mask drawn with ``seed`` for evaluation before and after training.

The docstrings depend on the Python version; the report records it.
"""

from __future__ import annotations

import ast
import functools
import sys
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

EXCLUDED_MODULES = {"antigravity", "this", "__phello__", "__hello__"}
MIN_DOC_CHARS = 40
HELDOUT_MODULUS = 10          # crc32(module) % 10 == 0 -> held out
MASK_PROB = 0.15              # BERT (Devlin et al. 2019), Section 3.1
IGNORE_INDEX = -100


def stdlib_docstrings(stdlib_dir: str | Path | None = None) -> list[tuple[str, str]]:
    """(module name, docstring) for every documented node of the top-level stdlib modules."""
    return list(_docstrings(str(stdlib_dir or sysconfig.get_paths()["stdlib"])))


@functools.lru_cache(maxsize=2)
def _docstrings(stdlib_dir: str) -> tuple[tuple[str, str], ...]:
    root = Path(stdlib_dir)
    seen: set[str] = set()
    docs = []
    for path in sorted(root.glob("*.py")):
        name = path.stem
        if name.startswith("_") or name in EXCLUDED_MODULES:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue  # a vendored or broken file: skip it, the corpus stays deterministic
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                text = ast.get_docstring(node)
                if text and len(text) >= MIN_DOC_CHARS and text not in seen:
                    seen.add(text)
                    docs.append((name, text))
    if not docs:
        raise RuntimeError(f"no docstrings found under {root}")
    return tuple(docs)


def is_heldout(module: str) -> bool:
    return zlib.crc32(module.encode()) % HELDOUT_MODULUS == 0


def pack(streams: list[list[int]], seq_len: int, prefix: list[int], suffix: list[int],
         separator: list[int]) -> torch.Tensor:
    """Concatenate token lists (``separator`` between documents) and cut ``[N, seq_len]`` rows of
    ``prefix + body + suffix``. The tail that does not fill a row is dropped."""
    body = seq_len - len(prefix) - len(suffix)
    if body <= 0:
        raise ValueError(f"seq_len {seq_len} leaves no room for tokens after {len(prefix) + len(suffix)} specials")
    flat: list[int] = []
    for ids in streams:
        flat += ids + separator
    rows = [prefix + flat[i:i + body] + suffix for i in range(0, len(flat) - body + 1, body)]
    return torch.tensor(rows, dtype=torch.long).view(-1, seq_len)


def mask_tokens(ids: torch.Tensor, gen: torch.Generator, mask_id: int, special_ids: list[int],
                random_range: tuple[int, int], prob: float = MASK_PROB) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of ``ids [B, S]`` -> (inputs [B, S], labels [B, S] with -100 where not masked).

    Special tokens are never masked. At least one position per batch is masked so the loss exists.
    Random replacements are drawn uniformly from ``random_range = (low, high)``, high exclusive.
    """
    ids = ids.clone()
    special = torch.zeros_like(ids, dtype=torch.bool)
    for s in special_ids:
        special |= ids == s
    draw = torch.rand(ids.shape, generator=gen)
    masked = (draw < prob) & ~special
    if not masked.any():
        masked.view(-1)[(~special).view(-1).nonzero()[0]] = True
    labels = torch.where(masked, ids, torch.full_like(ids, IGNORE_INDEX))
    how = torch.rand(ids.shape, generator=gen)
    rand_tok = torch.randint(random_range[0], random_range[1], ids.shape, generator=gen)
    ids = torch.where(masked & (how < 0.8), torch.full_like(ids, mask_id), ids)
    ids = torch.where(masked & (how >= 0.8) & (how < 0.9), rand_tok, ids)
    return ids, labels


@dataclass
class TextData:
    """Packed token rows for one tokenizer. ``heldout_inputs``/``heldout_labels``: the fixed
    held-out mask (MLM only; for causal LMs the labels are the inputs)."""

    train: torch.Tensor                     # [n_train, seq_len] int64
    heldout: torch.Tensor                   # [n_heldout, seq_len]
    heldout_inputs: torch.Tensor
    heldout_labels: torch.Tensor
    meta: dict = field(default_factory=dict)


def build_data(tok, seq_len: int, n_train: int | None, n_heldout: int, seed: int, mlm: bool = True,
               cls: str = "[CLS]", sep: str = "[SEP]", mask: str = "[MASK]",
               vocab_size: int | None = None) -> TextData:
    """Tokenize the stdlib docstrings, split, pack and (for MLM) draw the held-out mask.

    ``n_train=None`` keeps every training row (shuffled); ``n_heldout`` takes the first rows of
    the held-out stream (a fixed set whatever the training size).

    Raises ``ValueError`` when the corpus cannot supply ``n_train`` / ``n_heldout`` rows.
    """
    from .wordpiece import encode_all

    docs = stdlib_docstrings()
    train_docs = [t for m, t in docs if not is_heldout(m)]
    held_docs = [t for m, t in docs if is_heldout(m)]
    if mlm:
        c, s = tok.token_to_id(cls), tok.token_to_id(sep)
        prefix, suffix, separator = [c], [s], [s]
    else:
        bos, eos = _optional_id(tok, "<s>"), _optional_id(tok, "</s>")
        prefix, suffix, separator = ([bos] if bos is not None else []), [], ([eos] if eos is not None else [])
    train = pack(encode_all(tok, train_docs), seq_len, prefix, suffix, separator)
    held = pack(encode_all(tok, held_docs), seq_len, prefix, suffix, separator)
    n_train = train.shape[0] if n_train is None else n_train
    if train.shape[0] < n_train or held.shape[0] < n_heldout or min(n_train, n_heldout) < 1:
        raise ValueError(f"corpus has {train.shape[0]} train / {held.shape[0]} held-out rows of {seq_len} "
                         f"tokens; asked for {n_train} / {n_heldout}")
    order = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(seed))
    train = train[order[:n_train]]
    held = held[:n_heldout]
    if mlm:
        hin, hlab = mask_tokens(held, torch.Generator().manual_seed(seed), tok.token_to_id(mask),
                                [c, s, _optional_id(tok, "[PAD]") or 0], _random_range(tok, vocab_size))
    else:
        hin, hlab = held, held
    meta = {"source": "Python standard library docstrings (ast, top-level modules)",
            "python": sys.version.split()[0], "documents": len(docs), "train_documents": len(train_docs),
            "heldout_documents": len(held_docs), "seq_len": seq_len, "train_rows": n_train,
            "heldout_rows": n_heldout, "heldout_masked_tokens": int((hlab != IGNORE_INDEX).sum()) if mlm
            else int(held.numel()), "seed": seed}
    return TextData(train, held, hin, hlab, meta)


def _optional_id(tok, token: str) -> int | None:
    try:
        return tok.token_to_id(token)
    except KeyError:
        return None


def _random_range(tok, vocab_size: int | None) -> tuple[int, int]:
    """BERT's uncased vocab keeps [PAD], [unused*], [UNK], [CLS], [SEP], [MASK] below id 999."""
    first = _optional_id(tok, "!")
    low = first if first is not None else 0
    high = vocab_size if vocab_size is not None else tok.vocab_size
    return low, high
