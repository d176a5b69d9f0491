"""BERT tokenization: the ``tokenizers`` package when installed, else a small WordPiece over vocab.txt.

Both give the same ids for the uncased BERT vocabulary (tested on the fine-tune corpus). The steps
of the pure-Python path, in the order BERT applies them:

1. clean: drop NUL, U+FFFD and control characters; every whitespace character becomes a space;
2. put spaces around CJK ideographs;
3. lowercase, then strip accents (NFD, drop combining marks);
4. split on whitespace, and make every punctuation character a word of its own;
5. WordPiece each word: greedy longest match from the left, continuation pieces prefixed "##";
   a word with an unmatched remainder, or longer than 100 characters, becomes [UNK].
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

MAX_WORD_CHARS = 100  # tokenizer.json: "max_input_chars_per_word"


def _is_whitespace(ch: str) -> bool:
    return ch in " \t\n\r" or unicodedata.category(ch) == "Zs"


def _is_control(ch: str) -> bool:
    return ch not in "\t\n\r" and unicodedata.category(ch).startswith("C")


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def basic_split(text: str, lowercase: bool = True) -> list[str]:
    """Steps 1-4: text -> words (punctuation characters are words of their own)."""
    chars = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD or _is_control(ch):
            continue
        if _is_whitespace(ch):
            chars.append(" ")
        elif _is_cjk(cp):
            chars.append(f" {ch} ")
        else:
            chars.append(ch)
    text = "".join(chars)
    if lowercase:
        text = "".join(c for c in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(c) != "Mn")
    words: list[str] = []
    for chunk in text.split():
        cur = ""
        for ch in chunk:
            if _is_punctuation(ch):
                if cur:
                    words.append(cur)
                    cur = ""
                words.append(ch)
            else:
                cur += ch
        if cur:
            words.append(cur)
    return words


class WordPiece:
    """The pure-Python BERT tokenizer. ``encode(text)`` -> ids without [CLS]/[SEP]."""

    def __init__(self, vocab: dict[str, int], unk: str = "[UNK]", lowercase: bool = True) -> None:
        if unk not in vocab:
            raise ValueError(f"unk token {unk!r} is not in the vocabulary")
        self.vocab = vocab
        self.unk_id = vocab[unk]
        self.lowercase = lowercase
        self.vocab_size = len(vocab)
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_vocab_file(cls, path: str | Path, lowercase: bool = True) -> "WordPiece":
        lines = Path(path).read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        return cls({tok: i for i, tok in enumerate(lines)}, lowercase=lowercase)

    def word_ids(self, word: str) -> list[int]:
        """Step 5 for one word (memoised: docstrings repeat words a lot)."""
        hit = self._cache.get(word)
        if hit is not None:
            return hit
        if len(word) > MAX_WORD_CHARS:
            out = [self.unk_id]
        else:
            out, start = [], 0
            while start < len(word):
                end = len(word)
                while end > start:
                    piece = word[start:end] if start == 0 else "##" + word[start:end]
                    if piece in self.vocab:
                        out.append(self.vocab[piece])
                        break
                    end -= 1
                if end == start:
                    out = [self.unk_id]
                    break
                start = end
        self._cache[word] = out
        return out

    def encode(self, text: str) -> list[int]:
        return [i for w in basic_split(text, self.lowercase) for i in self.word_ids(w)]

    def token_to_id(self, token: str) -> int:
        if token not in self.vocab:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return self.vocab[token]


class HFTokenizer:
    """tokenizer.json through the ``tokenizers`` package (same interface as :class:`WordPiece`)."""

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path))
        self.tok.no_padding()
        self.tok.no_truncation()
        self.vocab_size = self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def token_to_id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return i


def load_tokenizer(model_dir: str | Path, backend: str = "auto"):
    """'auto' -> tokenizers when installed and tokenizer.json exists, else WordPiece(vocab.txt).

    Returns an object with ``encode(text) -> list[int]`` and ``token_to_id(token)``.
    """
    model_dir = Path(model_dir)
    if backend not in ("auto", "tokenizers", "wordpiece"):
        raise ValueError(f"backend must be 'auto', 'tokenizers' or 'wordpiece', got {backend!r}")
    if backend in ("auto", "tokenizers") and (model_dir / "tokenizer.json").exists():
        try:
            return HFTokenizer(model_dir / "tokenizer.json")
        except ModuleNotFoundError:
            if backend == "tokenizers":
                raise
    if backend == "tokenizers":
        raise FileNotFoundError(f"no tokenizer.json in {model_dir}")
    return WordPiece.from_vocab_file(model_dir / "vocab.txt")


def encode_all(tok, texts: list[str]) -> list[list[int]]:
    """Encode many texts (batched when the backend can)."""
    if hasattr(tok, "encode_batch"):
        return tok.encode_batch(texts)
    return [tok.encode(t) for t in texts]
