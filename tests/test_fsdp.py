"""QLoRA under FSDP2 (``fully_shard``) on CPU: 2 ranks over gloo on loopback, spawned here.

One spawned world (``world`` fixture, bounded in time) runs every distributed scenario and
writes its measurements; the tests below assert on them. The scenarios:

* main run: tiny Llama (transformers when installed, else ``TinyLM`` below), ``apply_lora``
  (NF4 + double quant), ``shard_qlora_model``, 10 steps of ``optim.PagedAdamW`` on a global
  batch of 4 sequences (2 per rank); a DCP checkpoint after step 5; a consolidated adapter.
* the same 10 steps with ``torch.optim.AdamW`` (a second optimizer, not a substitute);
* resume: a freshly built, quantized and sharded model loads the step-5 checkpoint and runs
  steps 6-10;
* single-process baselines of both runs on the whole batch, and the consolidated adapter
  loaded into a single-process model.

Tolerances. The runs differ only in summation order (per-rank losses; the gradient
reduce-scatter averages two half-batch gradients instead of one full-batch sum). Losses: one
fp32 rounding per reduction, measured 1.1e-7 relative, bound 1e-5. Adapters: a relative
gradient change d changes an Adam update by about d * lr (m / sqrt(v) is scale-free), and d is
an fp32 accumulation error over the 48 tokens of the batch (48 * 1.2e-7 ~ 6e-6), so 10 steps
of lr 5e-3 give ~3e-7 (measured 6e-7 with both optimizers); the bound, 1e-5, is 0.02% of the
largest possible adapter movement (10 * lr). The resume is compared bit for bit (same world,
same order of every operation), and so are the two ranks' gathered adapters.

The kernels run their CPU reference path in the workers (``force_backend('reference')``: the
interpreter would only slow this down; the kernels have their own tests).
"""

from __future__ import annotations

import math
import os
import time
from datetime import timedelta

import pytest
import torch
from torch import nn

from benchmarks.spawn import spawn_world as _spawn

import kernels
import lora
import optim
from lora.fsdp import (
    REPLICATED_STATE,
    SHARDED_STATE,
    is_prepared,
    is_sharded,
    prepare_for_fsdp,
    quantized_state_bytes,
    shard_qlora_model,
)

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available in this torch build", allow_module_level=True)

WORLD = 2
STEPS, CKPT_STEP = 10, 5
BATCH, SEQ, VOCAB = 4, 12, 96
LR, WD = 5e-3, 0.01
WORLD_TIMEOUT_S = 240  # the whole spawned world; each collective also times out (60 s)
LORA_CFG = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}


# ---- the model ---------------------------------------------------------------------------------
class TinyLM(nn.Module):
    """A project-built stand-in for a Llama when transformers is absent: embedding, blocks of
    (RMSNorm, gate/up/down MLP, residual) in an ``nn.ModuleList``, a final norm, an lm head."""

    def __init__(self, vocab=VOCAB, hidden=45, inter=74, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(nn.ModuleDict({
            "norm": nn.RMSNorm(hidden), "gate_proj": nn.Linear(hidden, inter, bias=False),
            "up_proj": nn.Linear(hidden, inter, bias=False), "down_proj": nn.Linear(inter, hidden, bias=False)})
            for _ in range(layers))
        self.norm = nn.RMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids, labels=None):
        h = self.embed(input_ids)
        for blk in self.layers:
            x = blk["norm"](h)
            h = h + blk["down_proj"](nn.functional.silu(blk["gate_proj"](x)) * blk["up_proj"](x))
        logits = self.lm_head(self.norm(h))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return type("Out", (), {"loss": loss, "logits": logits})()


def build_model() -> nn.Module:
    """Tiny Llama, deterministic, quantized. Sizes chosen to be uneven for 2 ranks: hidden 45,
    head_dim 14, 3 heads, 1 kv head, MLP 74 give odd packed-row counts (945, 315, 1665),
    odd block counts (53), partial last blocks, and 1-element nested absmax everywhere."""
    torch.manual_seed(0)
    try:
        import transformers

        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=45, intermediate_size=74, num_hidden_layers=2,
                                       num_attention_heads=3, num_key_value_heads=1, head_dim=14,
                                       max_position_embeddings=64, attn_implementation="eager")
        model = transformers.LlamaForCausalLM(cfg)
    except ImportError:
        model = TinyLM()
    return lora.apply_lora(model, lora.LoRAConfig(**LORA_CFG), quantize=True)


def global_batch(step: int) -> torch.Tensor:
    """Learnable sequences: token t+1 = token t + stride (mod VOCAB), a random start and stride
    per row, drawn from a generator seeded by the step (every run sees the same batches)."""
    g = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, VOCAB, (BATCH, 1), generator=g)
    stride = torch.randint(1, 4, (BATCH, 1), generator=g)
    return (start + stride * torch.arange(SEQ)) % VOCAB


EVAL_IDS = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(7))


def make_optimizer(kind: str, model: nn.Module):
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "paged":
        return optim.PagedAdamW(params, lr=LR, weight_decay=WD)
    return torch.optim.AdamW(params, lr=LR, weight_decay=WD)


def train(model, opt, steps: range, rank: int = 0, world: int = 1, on_step=None) -> list[float]:
    """Steps over the global batches; rank r takes rows [r*B/W, (r+1)*B/W). Returns the global
    loss of each step (the mean of the ranks' losses: equal token counts per rank)."""
    losses = []
    model.train()
    for step in steps:
        ids = global_batch(step).chunk(world)[rank]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
        if on_step is not None:
            on_step(step + 1)
    return losses


def adapters_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in lora.adapter_parameters(model).items()}


def eval_logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=EVAL_IDS).logits.detach().clone()


# ---- the distributed scenarios (run in each spawned rank) --------------------------------------
def _jit_probe(model, record: dict):
    """Hooks that record, for one QLoRA layer, whether its base is gathered (plain tensors, full
    size) inside its forward and sharded again (DTensors) after its block's forward."""
    from torch.distributed.tensor import DTensor

    block = model.model.layers[0] if hasattr(model, "model") else model.layers[0]
    layer = next(m for m in block.modules() if isinstance(m, lora.QLoRALinear))
    full = math.prod(layer._qshape)

    def inside(mod, args):
        record.setdefault("inside", []).append(
            not isinstance(mod.weight, DTensor) and mod.weight.numel() == (full + 1) // 2
            and mod.quantized_weight.numel == full)

    def after(mod, args, out):
        record.setdefault("after", []).append(all(isinstance(getattr(layer, a), DTensor) for a in SHARDED_STATE))

    return [layer.register_forward_pre_hook(inside), block.register_forward_hook(after)]


def _uneven(model) -> list[tuple[str, int]]:
    return [(f"{n}.{a}", getattr(m, a).shape[0]) for n, m in lora.lora_layers(model)
            for a in SHARDED_STATE if getattr(m, a) is not None and getattr(m, a).shape[0] % WORLD]


def _errors_on_sharded(model) -> dict[str, str]:
    out = {}
    layer = next(m for _, m in lora.lora_layers(model))
    for name, fn in [("merge", lambda: lora.merge(model)), ("unload", lambda: lora.unload(model)),
                     ("base_weight", layer.base_weight), ("quantized_weight", lambda: layer.quantized_weight)]:
        try:
            fn()
            out[name] = "no error"
        except RuntimeError as e:
            out[name] = f"RuntimeError: {e}"
    return out


def _distributed_run(kind: str, mesh, rank: int, out_dir: str, main: bool) -> dict:
    from lora.fsdp_checkpoint import (
        gathered_adapters,
        save_adapter_consolidated,
        save_sharded,
    )

    res: dict = {}
    model = build_model()
    res["single_bytes"] = quantized_state_bytes(model)
    shard_qlora_model(model, mesh)
    res["bytes"] = quantized_state_bytes(model)
    res["expected_local"] = sum(math.ceil(math.prod(t.shape) / WORLD) * t.element_size()
                                for _, m in lora.lora_layers(model) for a in SHARDED_STATE
                                if (t := getattr(m, a)) is not None)
    res["all_prepared"] = all(is_prepared(m) and is_sharded(m) for _, m in lora.lora_layers(model))
    res["uneven"] = _uneven(model)
    opt = make_optimizer(kind, model)
    probe: dict = {}
    handles = _jit_probe(model, probe) if main else []
    ckpt = os.path.join(out_dir, "ckpt_step5")

    def on_step(done):
        if main and done == CKPT_STEP:
            save_sharded(ckpt, model, opt, step=done, extra={"note": "test"})
            res["rng_at_ckpt"] = torch.get_rng_state()

    res["losses"] = train(model, opt, range(STEPS), rank, WORLD, on_step)
    for h in handles:
        h.remove()
    res["probe"] = probe
    with gathered_adapters(model):
        res["adapters"] = adapters_of(model)
    if main:
        res["eval_logits"] = eval_logits(model)
        save_adapter_consolidated(model, os.path.join(out_dir, "adapter"))
        res["errors"] = _errors_on_sharded(model)
    return res


def _resume_run(kind: str, mesh, rank: int, out_dir: str) -> dict:
    from lora.fsdp_checkpoint import gathered_adapters, load_sharded

    model = shard_qlora_model(build_model(), mesh)
    opt = make_optimizer(kind, model)
    torch.manual_seed(12345)  # a different RNG state: the checkpoint must restore it
    meta = load_sharded(os.path.join(out_dir, "ckpt_step5"), model, opt)
    res = {"meta": meta, "rng_after_load": torch.get_rng_state()}
    res["losses"] = train(model, opt, range(meta["step"], STEPS), rank, WORLD)
    with gathered_adapters(model):
        res["adapters"] = adapters_of(model)
    return res


def _unprepared_error(mesh) -> str:
    from torch.distributed.fsdp import fully_shard

    model = build_model()
    blocks = model.model.layers if hasattr(model, "model") else model.layers
    fully_shard(blocks[0], mesh=mesh)  # the base stays in buffers: replicated on every rank
    try:
        shard_qlora_model(model, mesh)
    except ValueError as e:
        return f"ValueError: {e}"
    return "no error"


def _single_run(kind: str) -> dict:
    model = build_model()
    opt = make_optimizer(kind, model)
    return {"losses": train(model, opt, range(STEPS)), "adapters": adapters_of(model)}


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    from torch.distributed.device_mesh import init_device_mesh

    res: dict = {"t0": time.perf_counter()}
    try:
        mesh = init_device_mesh("cpu", (world,))
        with kernels.force_backend("reference"):
            try:
                res["paged"] = _distributed_run("paged", mesh, rank, out_dir, main=True)
                main_kind = "paged"
            except RuntimeError as e:  # optim.PagedAdamW without DTensor support
                if "DTensor" not in str(e):
                    raise
                res["paged_error"] = f"{type(e).__name__}: {e}"
                main_kind = None
            res["adamw"] = _distributed_run("adamw", mesh, rank, out_dir, main=main_kind is None)
            main_kind = main_kind or "adamw"
            res["main_kind"] = main_kind
            res["resume"] = _resume_run(main_kind, mesh, rank, out_dir)
            res["unprepared_error"] = _unprepared_error(mesh)
            dist.barrier()
            # single-process references, split over the two ranks (no collectives below)
            if rank == 0:
                res["single_paged"] = _single_run("paged")
                fresh = build_model()
                lora.load_adapter(fresh, os.path.join(out_dir, "adapter"))
                res["loaded_eval_logits"] = eval_logits(fresh)
            else:
                res["single_adamw"] = _single_run("adamw")
        res["seconds"] = time.perf_counter() - res.pop("t0")
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def spawn_world(out_dir: str, world: int = WORLD, timeout_s: float = WORLD_TIMEOUT_S) -> list[dict]:
    """Run ``_worker`` on ``world`` spawned processes; kill them (by pid) past ``timeout_s``."""
    return _spawn(_worker, world, (out_dir,), out_dir, timeout_s, what="FSDP world")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return spawn_world(str(tmp_path_factory.mktemp("fsdp")))


# ---- tests on the spawned world -----------------------------------------------------------------
ADAPTER_ATOL, LOSS_RTOL = 1e-5, 1e-5


def _close_adapters(a: dict, b: dict, atol: float) -> float:
    assert a.keys() == b.keys()
    worst = max((x - b[k]).abs().max().item() for k, x in a.items())
    assert worst <= atol, f"adapters differ by {worst:.3g} > {atol:.3g}"
    return worst


@pytest.mark.parametrize("kind", ["paged", "adamw"])
def test_fsdp_training_matches_single_process(world, kind):
    r0, r1 = world
    if kind == "paged" and "paged_error" in r0:
        pytest.xfail(f"optim.PagedAdamW cannot step DTensor (FSDP2) parameters yet: {r0['paged_error']} "
                     f"(the change optim needs: docs/distributed.md, 'PagedAdamW on DTensors')")
    single = r0["single_paged"] if kind == "paged" else r1["single_adamw"]
    for r in world:
        torch.testing.assert_close(torch.tensor(r[kind]["losses"]), torch.tensor(single["losses"]),
                                   rtol=LOSS_RTOL, atol=0)
    _close_adapters(r0[kind]["adapters"], single["adapters"], ADAPTER_ATOL)
    assert all(torch.equal(v, r1[kind]["adapters"][k]) for k, v in r0[kind]["adapters"].items())
    assert all(v.abs().max() > 0 for k, v in single["adapters"].items() if k.endswith("lora_B"))  # B left 0: trained


def test_each_rank_holds_half_the_quantized_base(world):
    for r in world:
        run = r[r["main_kind"]]
        b, single = run["bytes"], run["single_bytes"]
        assert run["all_prepared"]
        assert b["full"] == single["full"] == single["sharded"]  # logical size unchanged; unsharded = full
        assert b["sharded"] == run["expected_local"]  # ceil(n / 2) elements of each sharded tensor
        assert 0.5 <= b["sharded"] / single["full"] < 0.51, b
        # the constant tables (quant maps, offset) are all that stays replicated: < 1.1 KiB a layer
        assert b["replicated"] == single["replicated"] <= 1100 * b["layers"]


def test_base_is_gathered_just_in_time(world):
    probe = world[0][world[0]["main_kind"]]["probe"]
    assert len(probe["inside"]) == STEPS and all(probe["inside"])
    assert len(probe["after"]) == STEPS and all(probe["after"])


def test_uneven_sizes_are_padded_by_fsdp(world):
    run = world[0][world[0]["main_kind"]]
    odd = dict(run["uneven"])
    # odd packed rows, odd block counts and a 1-element nested absmax (rank 1 holds padding only)
    assert any(n.endswith(".weight") for n in odd) and any(n.endswith("weight_absmax") for n in odd)
    assert any(n.endswith("nested_absmax") and v == 1 for n, v in odd.items())
    # correctness with those sizes is the parity test; here: the padding is what a rank stores
    assert run["bytes"]["sharded"] > run["single_bytes"]["full"] / 2


def test_consolidated_adapter_loads_into_single_process_model(world, tmp_path):
    r0 = world[0]
    fsdp_logits, loaded = r0[r0["main_kind"]]["eval_logits"], r0["loaded_eval_logits"]
    assert torch.equal(fsdp_logits, loaded), (fsdp_logits - loaded).abs().max()


def test_resume_from_sharded_checkpoint_is_bit_identical(world):
    for r in world:
        main, res = r[r["main_kind"]], r["resume"]
        assert res["meta"] == {"step": CKPT_STEP, "world_size": WORLD, "extra": {"note": "test"}}
        assert torch.equal(res["rng_after_load"], main["rng_at_ckpt"])
        assert res["losses"] == main["losses"][CKPT_STEP:]
        assert all(torch.equal(v, main["adapters"][k]) for k, v in res["adapters"].items())


def test_clear_errors_in_the_distributed_world(world):
    for r in world:
        errors = r[r["main_kind"]]["errors"]
        for name in ("merge", "unload", "base_weight", "quantized_weight"):
            assert errors[name].startswith("RuntimeError"), (name, errors[name])
        assert "dequantize it and keep the result unsharded" in errors["merge"]
        assert "sharded by FSDP" in errors["quantized_weight"]
        assert r["unprepared_error"].startswith("ValueError") and "buffers" in r["unprepared_error"]


# ---- single-process tests (no world needed) -----------------------------------------------------
def small_model(double_quant: bool = True) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(70, 45), nn.ReLU(), nn.Linear(45, 33))
    cfg = lora.LoRAConfig(r=4, alpha=8, target_modules=["0", "2"], double_quant=double_quant)
    return lora.apply_lora(m, cfg, quantize=True)


@pytest.mark.parametrize("double_quant", [True, False])
def test_prepare_keeps_outputs_and_state_bits(double_quant):
    m = small_model(double_quant)
    m.eval()  # LoRAConfig's default dropout (0.05) would make two forwards differ
    x = torch.randn(5, 70)
    before = {n: layer.quantized_weight for n, layer in lora.lora_layers(m)}
    with kernels.force_backend("reference"):
        y0 = m(x)
        assert prepare_for_fsdp(m) == ["0", "2"] and prepare_for_fsdp(m) == []  # idempotent
        y1 = m(x)
    assert torch.equal(y0, y1)
    for n, layer in lora.lora_layers(m):
        qt, ref = layer.quantized_weight, before[n]
        for f in ("data", "absmax", "nested_absmax", "offset", "code", "nested_code"):
            a, b = getattr(qt, f), getattr(ref, f)
            assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), f
        params = dict(layer.named_parameters())
        assert params["weight"].dtype == torch.uint8 and not params["weight"].requires_grad
        absmax_storage = torch.uint8 if double_quant else torch.int32  # float32 bits live as int32
        assert params["weight_absmax"].dtype == absmax_storage
        if double_quant:
            assert params["weight_nested_absmax"].dtype == torch.int32
        assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
        assert set(REPLICATED_STATE) & set(dict(layer.named_buffers())) == {
            a for a in REPLICATED_STATE if getattr(layer, a) is not None}


def test_quantized_state_bytes_single_process():
    m = small_model()
    b = quantized_state_bytes(m)
    tables = sum(layer.quantized_weight.nbytes() for _, layer in lora.lora_layers(m)) - b["full"]
    assert b["full"] == b["sharded"] and b["replicated"] == tables
    assert b["replicated"] == 2 * (16 * 4 + 256 * 4 + 4)


def test_prepare_refuses_merged_layers():
    m = small_model()
    lora.merge(m)
    with pytest.raises(ValueError, match=r"merged QLoRA layers \['0', '2'\].*unmerge\(\) first"):
        prepare_for_fsdp(m)


def test_ignored_quantized_params_are_refused():
    m = small_model()
    prepare_for_fsdp(m)
    with pytest.raises(ValueError, match=r"ignored_params holds quantized base parameters \['0.weight'"):
        shard_qlora_model(m, None, ignored_params={m[0].weight})


def test_prepared_layer_refuses_merge_even_unsharded():
    m = small_model()
    prepare_for_fsdp(m)
    with pytest.raises(RuntimeError, match="merge\\(\\) is not available on a layer prepared for FSDP"):
        m[0].merge()


def test_prepared_state_dict_round_trip():
    """A prepared layer's state dict is its storage layout (what a sharded model's DCP holds):
    codes, int32 bits of the float state, the replicated tables, the adapter."""
    m = small_model()
    prepare_for_fsdp(m)
    with torch.no_grad():
        for _, layer in lora.lora_layers(m):
            layer.lora_B.normal_()
    sd = m.state_dict()
    assert {k for k in sd if k.startswith("0.")} == {
        "0.weight", "0.weight_absmax", "0.weight_nested_absmax", "0.weight_quant_map", "0.weight_nested_quant_map",
        "0.weight_offset", "0.bias", "0.lora_A", "0.lora_B"}
    other = small_model()
    prepare_for_fsdp(other)
    other.load_state_dict(sd)
    x = torch.randn(3, 70)
    with kernels.force_backend("reference"):
        assert torch.equal(m.eval()(x), other.eval()(x))  # eval: LoRAConfig's default dropout is 0.05


def test_default_blocks_are_the_layers_of_a_module_list():
    from lora.fsdp import default_blocks

    tiny = lora.apply_lora(TinyLM(hidden=16, inter=24), lora.LoRAConfig(r=2, target_modules="all-linear"))
    assert default_blocks(tiny) == list(tiny.layers)  # blocks holding LoRA layers, in order
    seq = small_model()  # no ModuleList: every QLoRA layer is its own FSDP group
    assert default_blocks(seq) == [seq[0], seq[2]]
