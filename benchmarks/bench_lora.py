"""One LoRA layer, forward + backward: ours (QLoRA) vs peft + bitsandbytes vs 16-bit LoRA.

Providers, same weights, same inputs, one process:

    qlora     lora.QLoRALinear: NF4 + double quant base, y = x Wᵀ + s (x Aᵀ) Bᵀ through kernels.qlora_linear
    peft_bnb  peft's LoRA around a bitsandbytes Linear4bit (NF4, compress_statistics=True)
    lora16    lora.LoRALinear: the same adapter on a 16-bit dense base (torch's linear)

Per case (W: [N, K], x: [M, K], rank r) we time ``y = layer(x); y.backward(dy)`` with x requiring
grad (as inside a network, so dx is computed) and measure the peak memory that step needs above
what was allocated before it, plus the layer's own bytes (weights, quantization state, adapters).

Shapes. On CUDA the full sweep: W = 4096x4096 and 14336x4096 (N x K, Llama-3-8B's square and MLP
up projections), M = 512 ... 16384 tokens, r in {8, 16, 64}, bf16 activations. On CPU the shapes
are REDUCED (1024x1024 and 3584x1024, M in {128, 512}) so the sweep ends in about a minute; the
CPU runs the plain-PyTorch path of ``kernels`` (never the Triton interpreter, which is a test
vehicle, not a runtime): float32 GEMMs for float32 activations, bf16 GEMMs with float32
accumulation for bf16 ones (``QLORA_CPU_BF16_GEMM=0``: float32, as DESIGN.md's reference).

Memory. CUDA: ``torch.cuda.max_memory_allocated`` (exact tensor bytes). CPU: the kernel's RSS
high-water mark (``lora.PeakMemory``) with glibc's mmap threshold pinned at 64 KiB, so every
tensor-sized block is returned to the OS when freed; it sees temporaries inside fused ops too,
at the price of a few hundred KiB of allocator noise.

The whole-model CPU step (all-MiniLM-L6-v2 vs transformers + bitsandbytes + peft) is its own
benchmark, ``benchmarks/minilm_step.py``, next to this one in the report's section (c).

    python -m benchmarks.bench_lora --quick --device cpu --out benchmarks/out/bench_lora.json
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import json
import math
import platform
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

import kernels
from kernels import reference
import lora
from benchmarks.timing import median_time

PROVIDERS = ("qlora", "peft_bnb", "lora16")
FULL = dict(shapes=[(4096, 4096), (14336, 4096)], tokens=[512, 1024, 2048, 4096, 8192, 16384], ranks=[8, 16, 64])
CPU_QUICK = dict(shapes=[(1024, 1024), (3584, 1024)], tokens=[128, 512], ranks=[8, 16, 64])
CPU_FULL = dict(shapes=[(4096, 4096), (14336, 4096)], tokens=[512, 1024], ranks=[8, 16, 64])
CPU_THREADS = 1  # the CI CPU is shared: with 2 threads, OpenMP spin-waits made timings vary 5x (measured)
M_MMAP_THRESHOLD = -3  # mallopt parameter number (glibc malloc.h)
MIB = 2 ** 20


def _peft_bnb_available() -> bool:
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


class _Holder(nn.Module):
    def __init__(self, proj: nn.Module) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def build(provider: str, weight: torch.Tensor, r: int, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """One layer holding ``weight`` ([N, K] float32 on the CPU) with a rank-r adapter (B != 0)."""
    n, k = weight.shape
    if provider == "qlora":
        layer = lora.QLoRALinear(weight.to(device=device, dtype=dtype), r=r, alpha=2 * r)
        b = layer.lora_B
    elif provider == "lora16":
        layer = lora.LoRALinear(weight.to(device=device, dtype=dtype), r=r, alpha=2 * r)
        b = layer.lora_B
    elif provider == "peft_bnb":
        import bitsandbytes as bnb
        import peft

        q = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
        q.load_state_dict({"weight": weight.to(dtype)})
        layer = peft.get_peft_model(_Holder(q.to(device)), peft.LoraConfig(
            r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["proj"]))
        b = layer.base_model.model.proj.lora_B["default"].weight
    else:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    with torch.no_grad():
        b.normal_(0, 0.01)  # a non-zero B: the adapter path does its full work
    return layer


def layer_bytes(layer: nn.Module) -> int:
    """Bytes of the layer's own tensors (weights, quantization state, adapters)."""
    seen, total = set(), 0
    for t in list(layer.parameters()) + list(layer.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    for m in layer.modules():  # bitsandbytes keeps its quantization state outside buffers
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None and id(qs) not in seen:  # peft's wrapper exposes the same .weight
            seen.add(id(qs))
            for name in ("absmax", "code"):
                t = getattr(qs, name, None)
                total += t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
            nested = getattr(qs, "state2", None)
            if nested is not None:
                total += sum(getattr(nested, f).numel() * getattr(nested, f).element_size() for f in ("absmax", "code"))
    return total


def _step(layer, x, dy):
    def fn():
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        layer(x).backward(dy)
    return fn


def _pin_mmap_threshold() -> bool:
    """glibc: serve every block >= 64 KiB by mmap, so freed tensors leave the RSS at once."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024))
    except OSError:
        return False


def measure(provider, weight, m, r, dtype, device, reps) -> dict:
    layer = build(provider, weight, r, dtype, device)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(m, weight.shape[1], generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    dy = torch.randn(m, weight.shape[0], generator=g).to(device=device, dtype=dtype)
    fn = _step(layer, x, dy)
    seconds = median_time(fn, device, warmup=1 if device.type == "cpu" else 2, reps=reps)
    fn()  # leave grads allocated, as in training: the peak below is the step's own working set
    with lora.PeakMemory(device) as pm:
        fn()
    flops = 2 * m * weight.numel() * 2 + 2 * m * r * sum(weight.shape) * 3  # W: fwd + dx; LoRA: fwd + 2 grads
    return dict(provider=provider, ms=seconds * 1e3, peak_mib=pm.peak_delta / MIB,
                layer_mib=layer_bytes(layer) / MIB, tflops=flops / seconds / 1e12)


def _sweep(grid, providers, dtype, dev, reps, backend, rows) -> None:
    with backend:
        for n, k in grid["shapes"]:
            weight = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)) / math.sqrt(k)
            for m in grid["tokens"]:
                for r in grid["ranks"]:
                    res = {p: measure(p, weight, m, r, dtype, dev, reps) for p in providers}
                    row = dict(N=n, K=k, M=m, r=r, dtype=str(dtype).removeprefix("torch."))
                    for p, v in res.items():
                        row.update({f"{p}_{key}": val for key, val in v.items() if key != "provider"})
                    for other in ("peft_bnb", "lora16"):
                        if other in res:
                            row[f"time_vs_{other}"] = res["qlora"]["ms"] / res[other]["ms"]
                            row[f"peak_vs_{other}"] = res["qlora"]["peak_mib"] / max(res[other]["peak_mib"], 1e-9)
                    rows.append(row)
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()


def run(quick: bool = True, device: str = "cpu") -> dict:
    """Benchmark every case on ``device``; returns ``{"rows", "summary", "markdown", "meta"}``."""
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    grid = (CPU_QUICK if quick else CPU_FULL) if dev.type == "cpu" else FULL
    if dev.type == "cuda" and quick:
        grid = dict(grid, tokens=[512, 4096, 16384])
    dtype = torch.bfloat16
    providers = [p for p in PROVIDERS if p != "peft_bnb" or _peft_bnb_available()]
    pinned = _pin_mmap_threshold() if dev.type == "cpu" else False
    # the CPU runs kernels' plain-PyTorch path, also when TRITON_INTERPRET is set (tests set it)
    backend = kernels.force_backend("reference") if dev.type == "cpu" else contextlib.nullcontext()
    reps = 3 if dev.type == "cpu" else 0
    rows = []
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(CPU_THREADS)
    try:
        _sweep(grid, providers, dtype, dev, reps, backend, rows)
    finally:
        torch.set_num_threads(threads)
    summary = {}
    for other in ("peft_bnb", "lora16"):
        ratios = [row[f"time_vs_{other}"] for row in rows if f"time_vs_{other}" in row]
        if ratios:
            summary[f"time_vs_{other}_geomean"] = math.exp(statistics.fmean(math.log(v) for v in ratios))
            summary[f"time_vs_{other}_range"] = (min(ratios), max(ratios))
    meta = dict(device=str(dev), gpu=torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
                cpu=platform.processor() or platform.machine(), threads=CPU_THREADS if dev.type == "cpu" else None,
                torch=torch.__version__, date=datetime.date.today().isoformat(), quick=quick,
                reduced_shapes=dev.type == "cpu", providers=providers, mmap_threshold_pinned=pinned,
                kernels_backend="reference (plain PyTorch)" if dev.type == "cpu" else "triton",
                cpu_bf16_gemm_dtype=str(reference.gemm_dtype(torch.bfloat16)).removeprefix("torch."),
                versions=_versions())
    return dict(rows=rows, summary=summary, meta=meta, markdown=to_markdown(rows, summary, meta))


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("triton", "bitsandbytes", "peft"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def to_markdown(rows: list[dict], summary: dict, meta: dict) -> str:
    where = meta["gpu"] or f"CPU ({meta['cpu']}, {meta['threads']} threads)"
    lines = [f"QLoRA layer forward + backward on {where}, {meta['date']}, torch {meta['torch']}, "
             f"kernels backend: {meta['kernels_backend']}."]
    if meta["reduced_shapes"]:
        lines.append("**CPU: reduced shapes** (the full 4096x4096 / 14336x4096 sweep runs on CUDA). "
                     f"bf16 activations; the CPU path multiplies them in {meta['cpu_bf16_gemm_dtype']} "
                     "(with float32 accumulation).")
    if "peft_bnb" not in meta["providers"]:
        lines.append("peft / bitsandbytes not installed: no peft_bnb column.")
    peft_cols = "peft_bnb" in meta["providers"]
    head = "| N x K | M | r | qlora ms | " + ("peft+bnb ms | " if peft_cols else "") + "16-bit ms | " + \
           ("qlora/peft | " if peft_cols else "") + "qlora/16-bit | peak MiB qlora / " + \
           ("peft / " if peft_cols else "") + "16-bit | layer MiB qlora / 16-bit |"
    lines += ["", head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        cells = [f"{row['N']}x{row['K']}", str(row["M"]), str(row["r"]), f"{row['qlora_ms']:.2f}"]
        if peft_cols:
            cells.append(f"{row['peft_bnb_ms']:.2f}")
        cells.append(f"{row['lora16_ms']:.2f}")
        if peft_cols:
            cells.append(f"{row['time_vs_peft_bnb']:.2f}x")
        cells.append(f"{row['time_vs_lora16']:.2f}x")
        peaks = [row["qlora_peak_mib"]] + ([row["peft_bnb_peak_mib"]] if peft_cols else []) + [row["lora16_peak_mib"]]
        cells.append(" / ".join(f"{v:.1f}" for v in peaks))
        cells.append(f"{row['qlora_layer_mib']:.1f} / {row['lora16_layer_mib']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    for other, label in (("peft_bnb", "peft+bitsandbytes"), ("lora16", "16-bit LoRA")):
        key = f"time_vs_{other}_geomean"
        if key in summary:
            lo, hi = summary[f"time_vs_{other}_range"]
            lines.append(f"\nTime, ours / {label}: geometric mean {summary[key]:.2f}x (range {lo:.2f}x to {hi:.2f}x); "
                         "below 1 means ours is faster.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the reduced sweep (CPU: under 90 s)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, help="write the result JSON here (and the markdown next to it)")
    args = ap.parse_args(argv)
    res = run(quick=args.quick, device=args.device)
    print(res["markdown"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({k: res[k] for k in ("rows", "summary", "meta")},
                                       indent=2))
        args.out.with_suffix(".md").write_text(res["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
