"""Whole 4-bit checkpoints: ``lora.load_quantized`` (a transformers + bitsandbytes 4-bit folder,
or a 16-bit one quantized as it is read) and ``lora.save_quantized`` (a folder transformers +
bitsandbytes load as is), against transformers + bitsandbytes as the oracle: the packed bytes
must be identical and the logits equal to an exact fp32 bitsandbytes forward (dequantize, then
``F.linear``; bitsandbytes' own CPU matmul is ~0.5% off, NOTES §7). Then every bad input."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import kernels
import lora
import nf4

ROOT = Path(__file__).resolve().parents[1]
# vocab, hidden, MLP, q/o and k/v widths are all multiples of 64 (head_dim 64, one KV head)
LLAMA = dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=64)
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
REL_TOL = 1e-5  # fp32 forward of the same weights; only the order of the K-sums differs (K <= 256)


@pytest.fixture
def transformers():
    pytest.importorskip("bitsandbytes")
    return pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def reference_backend():
    """Model-level tests: the plain-PyTorch kernel path (the Triton one is tested on its own)."""
    with kernels.force_backend("reference"):
        yield


def llama_config(transformers, tie=False):
    return transformers.LlamaConfig(**LLAMA, tie_word_embeddings=tie)


def random_llama(transformers, tie=False, dtype=torch.float32):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config(transformers, tie)).to(dtype)
    with torch.no_grad():  # random norms, so that a mix-up of norm weights cannot go unnoticed
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


def meta_llama(transformers, tie=False):
    with torch.device("meta"):
        return transformers.LlamaForCausalLM(llama_config(transformers, tie))


def bnb_config(transformers, quant_type="nf4", double_quant=True):
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                           bnb_4bit_use_double_quant=double_quant,
                                           bnb_4bit_compute_dtype=torch.float32)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def ids():
    return torch.randint(0, LLAMA["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(3))


def assert_same_bases(ours, theirs):
    """Every Linear of ``theirs`` that bitsandbytes holds 4-bit is a QuantizedLinear of ``ours``
    with identical tensors (``QuantizedTensor.__eq__``), and no other Linear is 4-bit in ours."""
    bnb = pytest.importorskip("bitsandbytes")
    quantized = {n for n, m in theirs.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized and quantized == {n for n, m in ours.named_modules() if isinstance(m, lora.QuantizedLinear)}
    for name in quantized:
        qt = nf4.QuantizedTensor.from_bnb_state_dict(theirs.get_submodule(name).state_dict(), "weight")
        assert qt == ours.get_submodule(name).quantized_weight, name


def file_tensors(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


# ---- 16-bit checkpoint, quantized as it is read -------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_16bit_checkpoint_gives_bitsandbytes_bytes_and_logits(transformers, exact_bnb, tmp_path, dtype):
    random_llama(transformers, dtype=dtype).save_pretrained(tmp_path / "ckpt", max_shard_size="100KB")
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").exists()  # several shards
    ours = lora.load_quantized(meta_llama(transformers), tmp_path / "ckpt", quant_type="nf4")
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ckpt", quantization_config=bnb_config(
        transformers), device_map="cpu", dtype=dtype).eval()
    assert_same_bases(ours, theirs)
    assert isinstance(ours.lm_head, nn.Linear) and ours.lm_head.weight.dtype == dtype  # the head: as stored
    assert not any(t.is_meta for t in [*ours.parameters(), *ours.buffers()])
    assert torch.equal(ours.model.rotary_emb.inv_freq, theirs.model.rotary_emb.inv_freq)  # rebuilt, not stored
    with torch.no_grad():
        a, b = ours(ids()).logits, theirs(ids()).logits
    assert rel(a, b) < (REL_TOL if dtype == torch.float32 else 1e-2)  # bf16 activations round at 2^-8


@pytest.mark.parametrize("quant_type,double_quant,blocksize", [("fp4", False, 128), ("nf4", True, 64)])
def test_16bit_checkpoint_settings_and_skip_modules(transformers, tmp_path, quant_type, double_quant, blocksize):
    random_llama(transformers).save_pretrained(tmp_path / "ckpt")
    model = lora.load_quantized(meta_llama(transformers), tmp_path / "ckpt", quant_type=quant_type,
                                blocksize=blocksize, double_quant=double_quant, skip_modules=["down_proj"],
                                compute_dtype=torch.bfloat16)
    assert {m.compute_dtype for m in model.modules() if isinstance(m, lora.QuantizedLinear)} == {torch.bfloat16}
    down = model.model.layers[0].mlp.down_proj
    assert type(down) is nn.Linear  # skipped: 16-bit, as stored
    qt = model.model.layers[1].self_attn.q_proj.quantized_weight
    assert (qt.quant_type, qt.blocksize, qt.nested) == (quant_type, blocksize, double_quant)
    ref = random_llama(transformers).model.layers[1].self_attn.q_proj.weight
    assert qt == nf4.quantize(ref, quant_type, blocksize, double_quant)
    lora.save_quantized(model, tmp_path / "q")  # what transformers is told, and loads
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert (qc["bnb_4bit_quant_type"], qc["bnb_4bit_use_double_quant"], qc["bnb_4bit_compute_dtype"]) == \
        (quant_type, double_quant, "bfloat16")
    assert qc["llm_int8_skip_modules"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "lm_head"]
    again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu")
    assert type(again.model.layers[0].mlp.down_proj) is nn.Linear
    back = nf4.QuantizedTensor.from_bnb_state_dict(again.model.layers[1].self_attn.q_proj.state_dict(), "weight")
    assert back == qt  # any blocksize, nested or not: bitsandbytes reads the quant_state we write


# ---- a transformers + bitsandbytes 4-bit checkpoint, and saving it back ---------------------------------
def bnb_folder(transformers, tmp_path, tie=False, **kw):
    random_llama(transformers, tie).save_pretrained(tmp_path / "b16")
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "b16", quantization_config=bnb_config(
        transformers, **kw), device_map="cpu").eval()
    theirs.save_pretrained(tmp_path / "bnb", max_shard_size="60KB")
    return theirs, tmp_path / "bnb"


@pytest.mark.parametrize("tie", [False, True])
def test_bnb_checkpoint_loads_and_saves_back_byte_for_byte(transformers, exact_bnb, tmp_path, tie):
    theirs, folder = bnb_folder(transformers, tmp_path, tie)
    ours = lora.load_quantized(meta_llama(transformers, tie), folder)
    assert_same_bases(ours, theirs)
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tie  # the tie survives loading
    with torch.no_grad():
        assert rel(ours(ids()).logits, theirs(ids()).logits) < REL_TOL
    written = lora.save_quantized(ours, tmp_path / "ours", max_shard_size="60KB")
    assert "model.safetensors.index.json" in os.listdir(tmp_path / "ours") and "config.json" in written
    a, b = file_tensors(folder), file_tensors(tmp_path / "ours")
    assert a.keys() == b.keys()
    for key in a:  # packed codes, absmax, maps, the quant-state JSON bytes, norms, embeddings
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    qc = json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"]
    assert (qc["bnb_4bit_quant_type"], qc["bnb_4bit_use_double_quant"], qc["llm_int8_skip_modules"]) == \
        ("nf4", True, ["lm_head"])
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", device_map="cpu").eval()
    assert_same_bases(ours, again)
    with torch.no_grad():
        assert torch.equal(again(ids()).logits, theirs(ids()).logits)


def test_whole_model_flow_load_adapt_train_save(transformers, exact_bnb, tmp_path):
    """README's quick start: load a 4-bit checkpoint, apply LoRA, train a step, save the
    adapter (peft layout) and the quantized model (transformers + bitsandbytes layout)."""
    peft = pytest.importorskip("peft")
    _, folder = bnb_folder(transformers, tmp_path, quant_type="fp4", double_quant=False)
    with torch.device("meta"):  # README's way: the architecture from the folder's config.json
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.from_pretrained(folder))
    model = lora.load_quantized(model, folder)
    lora.apply_lora(model, lora.LoRAConfig(r=4, alpha=8, dropout=0.05, target_modules=["q_proj", "v_proj"]))
    assert isinstance(model.model.layers[0].self_attn.q_proj, lora.QLoRALinear)
    assert isinstance(model.model.layers[0].mlp.up_proj, lora.QuantizedLinear)
    before = {n: m.quantized_weight for n, m in model.named_modules() if isinstance(m, lora.QuantizedLinear)}
    # (README uses optim.PagedAdamW; here torch's AdamW: under the Triton interpreter the paged
    # optimizer's fused kernel is slow, and it is tested on its own)
    opt = torch.optim.AdamW(lora.adapter_parameters(model).values(), lr=1e-2)
    model.train()
    model(input_ids=ids(), labels=ids()).loss.backward()
    opt.step()
    model.eval()
    assert all(layer.lora_B.abs().sum() > 0 for _, layer in lora.lora_layers(model))  # one step moved B
    assert all(m.quantized_weight == before[n] for n, m in model.named_modules() if n in before)
    lora.save_adapter(model, tmp_path / "adapter")
    lora.save_quantized(model, tmp_path / "q")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q", device_map="cpu")
    reloaded = peft.PeftModel.from_pretrained(reloaded, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert rel(reloaded(ids()).logits, model(ids()).logits) < REL_TOL


def test_plain_module_round_trip_without_a_config(tmp_path):
    torch.manual_seed(0)
    build = lambda: nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64, bias=False), nn.Linear(64, 8))
    model = lora.apply_lora(build(), lora.LoRAConfig(r=2, target_modules=["0"], double_quant=False))
    assert [type(m).__name__ for m in model] == ["QLoRALinear", "GELU", "QuantizedLinear", "Linear"]
    lora.save_quantized(model, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())
    assert set(qc) == {"quantization_config"} and qc["quantization_config"]["llm_int8_skip_modules"] == ["3"]
    with torch.device("meta"):
        fresh = build()
    lora.load_quantized(fresh, tmp_path)
    x = torch.randn(3, 64)
    with torch.no_grad(), lora.disable_adapter(model):
        assert torch.equal(fresh(x), model(x))
    assert fresh[0].quantized_weight == model[0].quantized_weight


def test_meta_buffers_nobody_can_rebuild_are_named(tmp_path):
    class WithBuffer(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.head = nn.Linear(64, 64), nn.Linear(64, 4)
            self.register_buffer("scale", torch.ones(64), persistent=False)

    torch.manual_seed(0)
    lora.save_quantized(lora.apply_lora(WithBuffer(), lora.LoRAConfig(r=2, target_modules=["proj"])), tmp_path)
    assert isinstance(lora.load_quantized(WithBuffer(), tmp_path).proj, lora.QuantizedLinear)  # real buffer: fine
    with torch.device("meta"):
        model = WithBuffer()
    with pytest.raises(ValueError, match=r"\['scale'\] are still on the meta device"):
        lora.load_quantized(model, tmp_path)


# ---- memory ------------------------------------------------------------------------------------------
PEAK_PROBE = textwrap.dedent("""
    import json, os, sys, torch
    from torch import nn
    from safetensors.torch import save_file
    torch.set_num_threads(1)
    import lora
    layers, folder = 4, sys.argv[1]
    build = lambda dim: nn.Sequential(*[nn.Linear(dim, dim, bias=False) for _ in range(layers)], nn.Linear(dim, 8))

    def write(dim, where):  # shards of two [dim, dim] bf16 weights, the head in its own shard
        os.makedirs(where)
        sd = build(dim).to(torch.bfloat16).state_dict()
        names = [f"{{i}}.weight" for i in range(layers)]
        index = {{n: f"s{{i // 2}}.safetensors" for i, n in enumerate(names)}}
        index.update({{k: "head.safetensors" for k in sd if k not in names}})
        for shard in set(index.values()):
            save_file({{k: sd[k] for k, v in index.items() if v == shard}}, f"{{where}}/{{shard}}")
        json.dump({{"weight_map": index}}, open(f"{{where}}/model.safetensors.index.json", "w"))
        return max(os.path.getsize(f"{{where}}/{{f}}") for f in set(index.values()))

    torch.manual_seed(0)
    write(64, f"{{folder}}/warm")
    largest = write(1536, f"{{folder}}/big")
    with torch.device("meta"):
        warm, model = build(64), build(1536)
    lora.load_quantized(warm, f"{{folder}}/warm", quant_type="nf4")  # first calls touch code pages of torch
    with lora.PeakMemory("cpu") as pm:
        lora.load_quantized(model, f"{{folder}}/big", quant_type="nf4")
    final = sum(m.quantized_weight.nbytes() for m in model.modules() if isinstance(m, lora.QuantizedLinear))
    final += sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n.startswith(str(layers)))
    print(json.dumps({{"peak": pm.peak_delta, "final": final, "largest": largest}}))
""")


@pytest.mark.skipif(not lora.memory.cpu_probe_available(), reason="needs Linux's /proc/self/clear_refs")
def test_peak_memory_stays_within_final_model_plus_largest_shard(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), MALLOC_MMAP_THRESHOLD_="65536", NF4_COMPILE="0")
    out = subprocess.run([sys.executable, "-c", PEAK_PROBE.format(), str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=300, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    budget = 1.3 * (r["final"] + r["largest"])
    assert r["peak"] <= budget, r  # measured 2026-12-02: 0.72x the budget


# ---- bad input ---------------------------------------------------------------------------------------
def small_bnb(transformers, tmp_path):
    """A small one-shard transformers + bitsandbytes folder, and a fresh meta model for it."""
    _, folder = bnb_folder(transformers, tmp_path)
    for f in folder.glob("*"):
        f.unlink()
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "b16", quantization_config=bnb_config(
        transformers), device_map="cpu")
    theirs.save_pretrained(folder)  # one model.safetensors
    return folder


def rewrite(path, mutate):
    """Re-write a safetensors file with ``mutate(dict of tensors)`` applied."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    mutate(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


QSTATE = "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"


def set_json(**changes):
    def mutate(t):
        meta = json.loads(bytes(t[QSTATE].tolist()))
        meta.update(changes)
        t[QSTATE] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    return mutate


@pytest.mark.parametrize("damage,error,match", [
    (lambda f: f.unlink(), FileNotFoundError, r"no model.safetensors or model.safetensors.index.json"),
    (lambda f: f.write_bytes(f.read_bytes()[:-100]), ValueError, r"model.safetensors'.*truncated"),
    (lambda f: f.write_bytes(b"\xff" * 8 + f.read_bytes()[8:]), ValueError, r"model.safetensors'.*header length"),
    (lambda f: f.write_bytes(f.read_bytes()[:8] + b"[" + f.read_bytes()[9:]), ValueError,
     r"model.safetensors'.*malformed safetensors header"),
    (lambda f: rewrite(f, lambda t: t.pop("model.norm.weight")), ValueError,
     r"missing keys \['model.norm.weight'\]; unexpected keys \[\]"),
    (lambda f: rewrite(f, lambda t: t.update(extra=torch.zeros(1))), ValueError, r"unexpected keys \['extra'\]"),
    (lambda f: rewrite(f, lambda t: t.pop("model.layers.1.mlp.up_proj.weight.absmax")), ValueError,
     r"missing keys \['model.layers.1.mlp.up_proj.weight.absmax'\]"),
    (lambda f: rewrite(f, lambda t: t.update({"model.norm.weight": torch.ones(64)})), ValueError,
     r"model.safetensors'.*'model.norm.weight' has shape \[64\], the model expects \[128\]"),
    (lambda f: rewrite(f, lambda t: t.update({"model.norm.weight": torch.ones(128, dtype=torch.int32)})),
     ValueError, r"'model.norm.weight' has dtype I32, the model expects torch.float32"),
    (lambda f: rewrite(f, lambda t: t.update({"lm_head.weight": t["lm_head.weight"].half()})), None, None),
    (lambda f: rewrite(f, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(10, 1,
                                                                                       dtype=torch.uint8)})),
     ValueError, r"packed 'model.layers.0.mlp.up_proj.weight' must be U8 \[16384, 1\] for a \[256, 128\] Linear"),
    (lambda f: rewrite(f, set_json(shape=[64, 256])), ValueError,
     r"quant_state of 'model.layers.0.self_attn.q_proj.weight' says shape \[64, 256\].*\[128, 128\]"),
    (lambda f: rewrite(f, set_json(quant_type="fp4")), ValueError,
     r"inconsistent quant_state for 'model.layers.0.self_attn.q_proj.weight'.*inconsistent quant_type 'fp4'"),
    (lambda f: rewrite(f, set_json(blocksize=100)), ValueError, r"inconsistent quant_state.*blocksize must be"),
    (lambda f: rewrite(f, lambda t: t.update({QSTATE: torch.tensor(list(b"{oops"), dtype=torch.uint8)})),
     ValueError, r"inconsistent quant_state.*malformed JSON"),
])
def test_bad_checkpoints_raise_typed_errors_naming_file_and_key(transformers, tmp_path, damage, error, match):
    folder = small_bnb(transformers, tmp_path)
    damage(folder / "model.safetensors")
    if error is None:  # a float tensor in another float dtype is loaded as stored
        assert lora.load_quantized(meta_llama(transformers), folder).lm_head.weight.dtype == torch.float16
        return
    with pytest.raises(error, match=match):
        lora.load_quantized(meta_llama(transformers), folder)


def test_index_and_config_errors(transformers, tmp_path):
    theirs, folder = bnb_folder(transformers, tmp_path)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    meta = lambda: meta_llama(transformers)

    (folder / shard).rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match=rf"checkpoint shard '.*{shard}' does not exist"):
        lora.load_quantized(meta(), folder)
    (tmp_path / "moved").rename(folder / shard)
    with pytest.raises(FileNotFoundError, match="checkpoint folder '.*nowhere' does not exist"):
        lora.load_quantized(meta(), tmp_path / "nowhere")

    key = next(k for k, v in index["weight_map"].items() if v != shard)
    bad = dict(index, weight_map=dict(index["weight_map"], **{key: shard}))
    index_path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=rf"says '{key}' is in '{shard}', but that shard has no such key"):
        lora.load_quantized(meta(), folder)
    index_path.write_text(json.dumps(dict(index, weight_map=dict(index["weight_map"], **{key: "../x"}))))
    with pytest.raises(ValueError, match=r"shard names must be plain file names in the folder, got '../x'"):
        lora.load_quantized(meta(), folder)
    index_path.write_text("{")
    with pytest.raises(ValueError, match=r"index.json': malformed index"):
        lora.load_quantized(meta(), folder)
    index_path.write_text(json.dumps(index))

    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"].update(load_in_4bit=False, load_in_8bit=True)
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config.json': only bitsandbytes 4-bit checkpoints are supported"):
        lora.load_quantized(meta(), folder)
    config["quantization_config"].update(load_in_4bit=True, load_in_8bit=False, bnb_4bit_quant_type="fp4")
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"quant types disagree: the files hold \['nf4'\]"):
        lora.load_quantized(meta(), folder)
    config["quantization_config"]["bnb_4bit_quant_type"] = "nf4"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"quant types disagree.*ask for \['fp4', 'nf4'\]"):
        lora.load_quantized(meta(), folder, quant_type="fp4")
    with pytest.raises(ValueError, match=r"skip_modules names modules that .* stores 4-bit"):
        lora.load_quantized(meta(), folder, skip_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"already has LoRA / quantized layers"):
        lora.load_quantized(lora.load_quantized(meta(), folder), folder)
    with pytest.raises(ValueError, match=r"16-bit checkpoint: pass quant_type='nf4'"):
        lora.load_quantized(meta(), tmp_path / "b16")
    with pytest.raises(ValueError, match=r"quant_type must be one of \('nf4', 'fp4'\).*got 'int4'"):
        lora.load_quantized(meta(), tmp_path / "b16", quant_type="int4")


def test_save_refusals(transformers, tmp_path):
    with pytest.raises(ValueError, match="Sequential has no 4-bit layers"):
        lora.save_quantized(nn.Sequential(nn.Linear(64, 64)), tmp_path)
    model = lora.apply_lora(nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 8)),
                            lora.LoRAConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match=r"max_shard_size must be bytes or a string like '5GB'.*'lots'"):
        lora.save_quantized(model, tmp_path, max_shard_size="lots")
    model[1].quant_type = "int4"  # a format outside bitsandbytes' (what an INT4 base would be)
    with pytest.raises(ValueError, match=r"bitsandbytes' format stores only \('nf4', 'fp4'\).*\['1 \(int4\)'\]"):
        lora.save_quantized(model, tmp_path)
    model[1] = lora.QuantizedLinear(torch.randn(64, 64), quant_type="fp4")
    with pytest.raises(ValueError, match=r"one quant_type; these layers differ: \['0=nf4', '1=fp4'\]"):
        lora.save_quantized(model, tmp_path)
    from lora.fsdp import prepare_for_fsdp

    model[1] = lora.QuantizedLinear(torch.randn(64, 64))
    prepare_for_fsdp(model)  # its state_dict is now FSDP's storage layout, not bitsandbytes'
    with pytest.raises(ValueError, match=r"layers \['0', '1'\] are prepared for FSDP"):
        lora.save_quantized(model, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written by a refused call


def test_a_tied_tensor_stored_twice_is_read_once_and_checked(transformers, tmp_path):
    from safetensors.torch import load_file, save_file

    random_llama(transformers, tie=True).save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    assert "lm_head.weight" not in tensors  # transformers writes a tie once
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, path, metadata={"format": "pt"})
    model = lora.load_quantized(meta_llama(transformers, tie=True), tmp_path, quant_type="nf4")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:, :64].contiguous()
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'lm_head.weight' has shape \[128, 64\], the model expects \[128, 128\]"):
        lora.load_quantized(meta_llama(transformers, tie=True), tmp_path, quant_type="nf4")
