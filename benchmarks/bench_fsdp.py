"""QLoRA under FSDP2: per-rank memory and step time, 1 rank vs 2 ranks, same global batch.

    python -m benchmarks.bench_fsdp [--quick] [--out DIR]          # CPU: spawns gloo worlds of 1 and 2
    torchrun --nproc-per-node N -m benchmarks.bench_fsdp [--quick]  # one world of N ranks (NCCL on GPUs)

Model: a Llama (transformers' ``LlamaForCausalLM`` from a config, random weights, no download),
``lora.apply_lora`` on every linear layer but the head (NF4 + double quant, r=16), sharded by
``lora.fsdp.shard_qlora_model`` (one FSDP group per decoder layer, then the root), trained
with ``optim.PagedAdamW``. Every rank takes ``global_batch / world`` sequences.

Per rank we report, from the tensors' storage sizes (exact, padding included):
``quantized base`` (this rank's shards of codes, absmax, nested absmax), ``tables`` (the
replicated quant maps / offsets), ``adapters`` (local A/B shards), ``other frozen`` (embeddings,
norms, head: FSDP shards them too), ``optimizer`` (local state), and the process' peak
(CUDA: ``max_memory_allocated``; CPU: resident-set high-water mark ``VmHWM``, which also
counts the interpreter, torch and transformers, ~0.5 GiB). Step time: median of the timed
steps after warm-up (forward, backward, optimizer step, the loss all-reduce).

On CPU the kernels run their reference path (the Triton interpreter is for tests), and with
2 ranks on a small shared CPU the step times measure contention as much as FSDP; the memory
columns are the point there. Under torchrun on GPUs each rank uses ``cuda:LOCAL_RANK`` and
NCCL, bf16 compute and the Triton kernels; rank 0 writes the report.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import timedelta

import torch

from .report_util import fmt_bytes, md_table
from .spawn import spawn_world

# model sizes: (hidden, intermediate, layers, heads, kv_heads, vocab, seq, global batch)
SIZES = {
    ("cpu", True): (256, 688, 2, 4, 2, 512, 64, 4),
    ("cpu", False): (512, 1376, 4, 8, 4, 2048, 128, 4),
    ("cuda", True): (2048, 5632, 4, 16, 4, 32000, 512, 8),
    ("cuda", False): (4096, 11008, 8, 32, 8, 32000, 1024, 8),
}
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}
LR = 2e-4


def _build(device: torch.device, quick: bool):
    import transformers

    import lora

    hidden, inter, layers, heads, kv, vocab, _, _ = SIZES[(device.type, quick)]
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                   max_position_embeddings=4096)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = transformers.LlamaForCausalLM(cfg).to(dtype)
    compute = torch.bfloat16 if device.type == "cuda" else None
    return lora.apply_lora(model, lora.LoRAConfig(**LORA, compute_dtype=compute), quantize=True, device=device)


def _local_nbytes(t) -> int:
    from torch.distributed.tensor import DTensor

    if t is None:
        return 0
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.untyped_storage().nbytes()


def _optimizer_bytes(opt) -> int:
    return sum(_local_nbytes(v) for st in opt.state.values() for k, v in st.items()
               if torch.is_tensor(v) and k != "step")


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def measure(rank: int, world: int, device: torch.device, quick: bool) -> dict:
    """One rank's row. Collective: every rank of the (initialized) world calls it."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import kernels
    import lora
    from lora.fsdp import quantized_state_bytes, shard_qlora_model

    *_, vocab, seq, gbatch = SIZES[(device.type, quick)]
    if gbatch % world:
        raise ValueError(f"the global batch {gbatch} must divide over {world} ranks")
    model = _build(device, quick)
    mesh = init_device_mesh(device.type, (world,))
    shard_qlora_model(model, mesh)
    trainable = [p for p in model.parameters() if p.requires_grad]
    q = quantized_state_bytes(model)
    adapters = sum(_local_nbytes(p) for p in trainable)
    quant_ids = {id(getattr(m, a)) for _, m in lora.lora_layers(model) for a in ("weight", "weight_absmax",
                                                                                   "weight_nested_absmax")}
    other = sum(_local_nbytes(p) for p in model.parameters() if not p.requires_grad and id(p) not in quant_ids)
    import optim

    opt, note = optim.PagedAdamW(trainable, lr=LR, weight_decay=0.0), "optim.PagedAdamW"
    fell_back = False
    g = torch.Generator().manual_seed(0)
    warmup, timed = (1, 3) if quick else (2, 6)
    times, losses = [], []
    backend = "auto" if device.type == "cuda" else "reference"
    with kernels.force_backend(backend):
        for step in range(warmup + timed):
            ids = torch.randint(0, vocab, (gbatch, seq), generator=g).chunk(world)[rank].to(device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dist.barrier()
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            try:
                opt.step()
            except RuntimeError as e:  # an optim.PagedAdamW that cannot step DTensors (yet)
                if fell_back or "DTensor" not in str(e):
                    raise
                fell_back = True
                note = f"torch.optim.AdamW (optim.PagedAdamW failed on DTensor parameters: {str(e)[:80]})"
                opt = torch.optim.AdamW(trainable, lr=LR, weight_decay=0.0)
                opt.step()
            opt.zero_grad(set_to_none=True)
            loss = loss.detach()
            dist.all_reduce(loss)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= warmup:
                times.append(time.perf_counter() - t0)
            losses.append(loss.item() / world)
    return {
        "ranks": world, "rank": rank, "quantized_base_bytes": q["sharded"], "quantized_full_bytes": q["full"],
        "tables_bytes": q["replicated"], "adapter_bytes": adapters, "other_frozen_bytes": other,
        "optimizer_bytes": _optimizer_bytes(opt), "peak_bytes": _peak_bytes(device),
        "step_s": statistics.median(times), "tokens_per_s": gbatch * seq / statistics.median(times),
        "losses": losses, "optimizer": note,
    }


# ---- CPU: spawned gloo worlds ------------------------------------------------------------------
def _spawned(rank: int, world: int, port: int, quick: bool, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # one core per rank: 1 vs 2 ranks is 1 vs 2 cores (and no OpenMP spin-waits)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    try:
        row = measure(rank, world, torch.device("cpu"), quick)
        torch.save(row, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn_world(world: int, quick: bool, timeout_s: float = 900) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        return spawn_world(_spawned, world, (quick, out), out, timeout_s, what="bench_fsdp world")


def _meta(device: str, quick: bool, world_note: str) -> dict:
    hidden, inter, layers, heads, kv, vocab, seq, gbatch = SIZES[(torch.device(device).type, quick)]
    return {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else (platform.processor() or "cpu"),
        "backend": "nccl" if device.startswith("cuda") else "gloo", "torch": torch.__version__,
        "model": f"Llama hidden {hidden}, MLP {inter}, {layers} layers, {heads}/{kv} heads, vocab {vocab}",
        "batch": f"{gbatch} x {seq} tokens (global)", "lora": LORA, "quick": quick, "worlds": world_note,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def run(quick: bool = False, device: str = "cpu") -> dict:
    """CPU: spawn gloo worlds of 1 and 2 ranks; returns ``{"rows", "markdown", "meta"}``.
    GPUs need one process per GPU: use torchrun (module docstring)."""
    if torch.device(device).type != "cpu":
        raise ValueError(f"run() spawns CPU (gloo) worlds; for {device!r} use "
                         f"`torchrun --nproc-per-node N -m benchmarks.bench_fsdp`")
    rows = []
    for world in (1, 2):
        rows += _spawn_world(world, quick)
    meta = _meta(device, quick, "1 and 2 ranks, spawned on this machine")
    return {"rows": rows, "markdown": markdown(rows, meta), "meta": meta}


def markdown(rows: list[dict], meta: dict) -> str:
    head = [f"QLoRA + FSDP2 per rank: {meta['model']}; {meta['batch']}; LoRA r={meta['lora']['r']}; "
            f"{meta['device']} ({meta['backend']}), torch {meta['torch']}, {meta['date']}"
            + (" (quick: smoke-test sizes)" if meta["quick"] else "") + ".", ""]
    table = md_table(
        ["ranks", "rank", "quantized base", "of full", "tables", "adapters", "other frozen", "optimizer",
         "peak", "step (median)", "tokens/s", "loss first -> last"],
        [[r["ranks"], r["rank"], fmt_bytes(r["quantized_base_bytes"]),
          f"{r['quantized_base_bytes'] / r['quantized_full_bytes']:.3f}", fmt_bytes(r["tables_bytes"]),
          fmt_bytes(r["adapter_bytes"]), fmt_bytes(r["other_frozen_bytes"]), fmt_bytes(r["optimizer_bytes"]),
          fmt_bytes(r["peak_bytes"]), f"{r['step_s'] * 1e3:.0f} ms", f"{r['tokens_per_s']:.0f}",
          f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}"] for r in rows])
    notes = sorted({r["optimizer"] for r in rows})
    return "\n".join(head) + table + "\n\nOptimizer: " + "; ".join(notes) + "\n"


# ---- the 70B plan: per-GPU memory from our measured bytes per parameter ----------------------
LLAMA_70B = {"hidden": 8192, "inter": 28672, "layers": 80, "heads": 64, "kv_heads": 8, "head_dim": 128, "vocab": 32000}
GIB = 1 << 30
RUNTIME_RESERVE = 1.0 * GIB  # CUDA context + NCCL buffers + allocator slack: an estimate


def _layer_shapes(c: dict) -> dict[str, tuple[int, int]]:
    """[N, K] of the 7 quantized linear layers of one Llama decoder layer."""
    h, i, kv = c["hidden"], c["inter"], c["kv_heads"] * c["head_dim"]
    q = c["heads"] * c["head_dim"]
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def measured_bits_per_parameter() -> dict[str, float]:
    """NF4 storage bits per weight, measured with nf4.quantize on a 4096x4096 tensor (with and
    without double quant). Exact for any tensor whose size is a multiple of 64 * 256."""
    import nf4

    w = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0))
    return {"nf4+dq": nf4.quantize(w, double_quant=True).bits_per_parameter(),
            "nf4": nf4.quantize(w, double_quant=False).bits_per_parameter()}


def memory_plan(gpus=(2, 4), seqs=(512, 2048), batch: int = 1, r: int = 16, gpu_gib: float = 24.0,
                config: dict | None = None) -> dict:
    """Per-GPU memory of QLoRA (NF4 + DQ, LoRA on every linear layer, r=16) of a Llama-2-70B
    under FSDP2 with this package, from measured bits per parameter. Activations assume
    gradient checkpointing per decoder layer and a fused (flash / SDPA) attention: an ESTIMATE.
    Returns ``{"rows", "markdown", "inputs"}`` (bytes)."""
    c = dict(config or LLAMA_70B)
    bits = measured_bits_per_parameter()["nf4+dq"]
    shapes = _layer_shapes(c)
    if any((n * k) % (64 * 256) for n, k in shapes.values()):
        raise ValueError("the plan's bits/parameter is exact only for sizes that are multiples of 64*256")
    L, h, i, V = c["layers"], c["hidden"], c["inter"], c["vocab"]
    quant_params = L * sum(n * k for n, k in shapes.values())
    lora_params = L * sum(r * (n + k) for n, k in shapes.values())
    block_quant = sum(n * k for n, k in shapes.values()) * bits / 8
    largest = max(n * k for n, k in shapes.values())
    inputs = {
        "bits_per_parameter": bits, "quantized_params": quant_params, "lora_params": lora_params,
        "base": quant_params * bits / 8, "tables": L * len(shapes) * (16 * 4 + 256 * 4 + 4),
        "embed_head_norms": 2 * V * h * 2 + (2 * L + 1) * h * 4,  # bf16 embedding + head, fp32 norms
        "gathered_blocks": 2 * (block_quant + sum(r * (n + k) for n, k in shapes.values()) * 4 * 2),
        "dequant_buffer": largest * 2,  # one bf16 weight while its GEMM runs (training regime)
    }
    rows = []
    for world in gpus:
        for seq in seqs:
            for state_bits, state_bpp in ((32, 8.0), (8, 2.03)):
                acts = L * batch * seq * h * 2 + batch * seq * (6 * h + 4 * i) * 2 + batch * seq * V * 10
                parts = {
                    "base": inputs["base"] / world, "tables": inputs["tables"],
                    "embed_head_norms": inputs["embed_head_norms"] / world,
                    "adapters_fp32": lora_params * 4 / world, "grads_fp32": lora_params * 4 / world,
                    "optimizer": lora_params * state_bpp / world,
                    "gathered_blocks": inputs["gathered_blocks"], "dequant_buffer": inputs["dequant_buffer"],
                    "activations_estimate": acts, "runtime_reserve_estimate": RUNTIME_RESERVE,
                }
                total = sum(parts.values())
                rows.append({"gpus": world, "seq": seq, "batch": batch, "state_bits": state_bits, **parts,
                             "total": total, "fits": total <= gpu_gib * GIB})
    return {"rows": rows, "inputs": inputs, "markdown": _plan_markdown(rows, inputs, gpu_gib)}


def _plan_markdown(rows, inputs, gpu_gib) -> str:
    g = lambda b: f"{b / GIB:.2f}"
    head = ["gpus", "seq", "optimizer state", "base (sharded)", "embed+head+norms", "adapters+grads",
            "optimizer", "gathered blocks", "dequant buffer", "activations (est.)", "reserve (est.)",
            f"total GiB (of {gpu_gib:g})"]
    body = [[r["gpus"], r["seq"], f"{r['state_bits']}-bit", g(r["base"]), g(r["embed_head_norms"]),
             g(r["adapters_fp32"] + r["grads_fp32"]), g(r["optimizer"]), g(r["gathered_blocks"]),
             g(r["dequant_buffer"]), g(r["activations_estimate"]), g(r["runtime_reserve_estimate"]),
             f"**{g(r['total'])}**" + ("" if r["fits"] else " (does not fit)")] for r in rows]
    return md_table(head, body) + "\n"


# ---- torchrun: one world of N ranks ------------------------------------------------------------
def _torchrun(args) -> None:
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=600))
    try:
        row = measure(rank, world, device, args.quick)
        rows = [None] * world
        dist.all_gather_object(rows, row)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        meta = _meta(str(device), args.quick, f"{world} ranks under torchrun")
        _write({"rows": rows, "markdown": markdown(rows, meta), "meta": meta}, args.out)


def _write(result: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "bench_fsdp.json"), "w") as f:
        json.dump({"rows": result["rows"], "meta": result["meta"]}, f, indent=1, default=str)
    with open(os.path.join(out, "bench_fsdp.md"), "w") as f:
        f.write(result["markdown"])
    print(result["markdown"])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_fsdp", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke-test sizes")
    p.add_argument("--device", default=None, help="under torchrun: cuda or cpu (default: cuda when available)")
    p.add_argument("--out", default="benchmarks/out", help="folder for bench_fsdp.md / .json")
    p.add_argument("--plan", action="store_true", help="print the 70B per-GPU memory plan and exit")
    args = p.parse_args(argv)
    if args.plan:
        plan = memory_plan()
        print(json.dumps({k: v for k, v in plan["inputs"].items()}, indent=1))
        print(plan["markdown"])
        return
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        _torchrun(args)
    else:
        _write(run(args.quick, args.device or "cpu"), args.out)


if __name__ == "__main__":
    main()
