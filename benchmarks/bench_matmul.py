"""4-bit matmul with the fused LoRA path: ours vs bf16 cuBLAS vs bitsandbytes vs dequant+matmul.

    python -m benchmarks.bench_matmul [--quick] [--device cpu|cuda] [--out DIR]

Providers, on the same inputs in one run:
    ours            kernels.nf4_matmul / kernels.qlora_linear (Triton on CUDA)
    torch_bf16      x @ W.t() with a dense bf16 W (cuBLAS), LoRA unfused
    bnb             bitsandbytes.matmul_4bit (when importable), LoRA unfused (the peft way)
    dequant_matmul  nf4.dequantize (plain torch) then x @ W.t(), LoRA unfused
Modes: forward (no LoRA), and forward + backward with LoRA r=16 (grads of x, A, B).
On CUDA it also times each Triton regime (gemv / gemm / dequant_gemm) per (shape, M), which is
how the crossovers ``kernels.GEMV_MAX_M`` / ``DEQUANT_ONCE_MIN_M`` are to be set, and the
dequantize kernel alone (GB/s vs HBM).

Timing: ``triton.testing.do_bench`` (median) on CUDA; warm-up + median on CPU. Roofline
(NOTES §4, H200): 4.8 TB/s HBM, 790 TFLOP/s bf16 dense. On CPU everything runs in float32
through the plain-PyTorch reference path at small shapes: those numbers say nothing about GPU
speed and the markdown says so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform

import torch

import kernels
import nf4

from .report_util import md_table
from .timing import bnb_available, median_time

LLAMA_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]  # (K, N)
GPU_MS = [1, 4, 16, 64, 256, 1024, 4096, 16384]
CPU_SHAPES = [(256, 512), (1024, 2048)]
CPU_MS = [1, 16, 128, 512]
RANK = 16
HBM_BYTES_PER_S = 4.8e12  # H200 spec (≈4.3 TB/s measured copy)
PEAK_BF16_FLOPS = 790e12  # H200 bf16 dense, measured
NF4_DQ_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4.127 bits per weight (blocksize 64, nested 256)


def _flops(M, N, K, backward, rank):
    f = 2.0 * M * N * K
    if not backward:
        return f
    lora = 2.0 * M * rank * (K + N)  # S = xAᵀ, S Bᵀ
    return 2 * f + 3 * lora  # + dx = dy W, + G, dx lora, dA, dB


def _bytes(M, N, K, weight_bits, elem, backward):
    act = elem * (M * K + M * N) * (2 if backward else 1)
    return N * K * weight_bits / 8 * (2 if backward else 1) + act


def _providers(x, qt, w_dense, bnb_state, backward, rank):
    """name -> zero-argument callable, all computing the same thing."""
    dev, dt = x.device, x.dtype
    N, K = w_dense.shape
    out = {}
    if not backward:
        out["ours"] = lambda: kernels.nf4_matmul(x, qt)
        out["torch_bf16" if dev.type == "cuda" else "torch_dense"] = lambda: x @ w_dense.t()
        if bnb_state is not None:
            import bitsandbytes as bnb

            q, st = bnb_state
            out["bnb"] = lambda: bnb.matmul_4bit(x, q.t(), quant_state=st)
        out["dequant_matmul"] = lambda: x @ nf4.dequantize(qt, dt).t()
        return out
    g = torch.Generator(device="cpu").manual_seed(1)
    A = (torch.randn(rank, K, generator=g) / math.sqrt(K)).to(dev, dt).requires_grad_()
    B = (torch.randn(N, rank, generator=g) * 0.01).to(dev, dt).requires_grad_()
    xg = x.detach().clone().requires_grad_()
    dy = torch.randn(x.shape[0], N, generator=g).to(dev, dt)
    s = 2.0

    def unfused(base):
        def step():
            y = base(xg) + s * ((xg @ A.t()) @ B.t())
            return torch.autograd.grad(y, (xg, A, B), dy)
        return step

    def ours():
        y = kernels.qlora_linear(xg, qt, A, B, s)
        return torch.autograd.grad(y, (xg, A, B), dy)

    out["ours"] = ours
    out["torch_bf16" if dev.type == "cuda" else "torch_dense"] = unfused(lambda v: v @ w_dense.t())
    if bnb_state is not None:
        import bitsandbytes as bnb

        q, st = bnb_state
        out["bnb"] = unfused(lambda v: bnb.matmul_4bit(v, q.t(), quant_state=st))
    out["dequant_matmul"] = unfused(lambda v: v @ nf4.dequantize(qt, dt).t())
    return out


def _regime_times(x, qt, dev):
    res = {}
    for regime in ("gemv", "gemm", "dequant_gemm"):
        if regime == "gemv" and x.shape[0] > 256:
            continue  # split-K GEMV tiles are for small M only
        with kernels.force_regime(regime):
            res[regime] = median_time(lambda: kernels.nf4_matmul(x, qt), dev)
    return res


def run(quick: bool = False, device: str = "cpu") -> dict:
    """Time every provider over the sweep; returns ``{"rows", "markdown", "meta"}``."""
    dev = torch.device(device)
    on_gpu = dev.type == "cuda"
    if on_gpu:
        shapes, ms = (LLAMA_SHAPES[:2], [1, 16, 256, 4096]) if quick else (LLAMA_SHAPES, GPU_MS)
        dtype = torch.bfloat16
    else:
        shapes, ms = (CPU_SHAPES[:1], [1, 16, 128]) if quick else (CPU_SHAPES, CPU_MS)
        dtype = torch.float32
    timing = {"warmup": 1, "reps": 3} if (quick and not on_gpu) else {}
    timed = lambda fn: median_time(fn, dev, **timing)  # noqa: E731
    have_bnb = bnb_available()
    backend = "auto" if on_gpu else "reference"  # CPU: never the (slow) interpreter here
    rows = []
    for K, N in shapes:
        g = torch.Generator().manual_seed(0)
        w = (torch.randn(N, K, generator=g) * 0.02).to(dtype).to(dev)
        qt = nf4.quantize(w, "nf4", 64, True)
        w_dense = nf4.dequantize(qt, dtype)
        bnb_state = None
        if have_bnb:
            import bitsandbytes.functional as bnbf

            bnb_state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        row_dq = {"mode": "dequantize", "K": K, "N": N, "M": 0}
        with kernels.force_backend(backend):
            row_dq["ours_s"] = timed(lambda: kernels.dequantize(qt, dtype))
        row_dq["nf4_reference_s"] = timed(lambda: nf4.dequantize(qt, dtype))
        if bnb_state is not None:
            row_dq["bnb_s"] = timed(lambda: bnbf.dequantize_4bit(*bnb_state))
        dq_bytes = N * K * (NF4_DQ_BITS / 8 + torch.finfo(dtype).bits / 8)
        row_dq["ours_GBps"] = dq_bytes / row_dq["ours_s"] / 1e9
        row_dq["ours_frac_hbm"] = row_dq["ours_GBps"] * 1e9 / HBM_BYTES_PER_S if on_gpu else None
        rows.append(row_dq)
        for M in ms:
            x = torch.randn(M, K, generator=g).to(dtype).to(dev)
            for backward in (False, True):
                row = {"mode": "fwd+bwd r16" if backward else "fwd", "K": K, "N": N, "M": M,
                       "regime": kernels.choose_regime(M)}
                with kernels.force_backend(backend):
                    for name, fn in _providers(x, qt, w_dense, bnb_state, backward, RANK).items():
                        ctx = torch.enable_grad() if backward else torch.no_grad()
                        with ctx:
                            row[f"{name}_s"] = timed(fn)
                    if on_gpu and not backward:
                        with torch.no_grad():
                            row["regimes_s"] = _regime_times(x, qt, dev)
                        row["best_regime"] = min(row["regimes_s"], key=row["regimes_s"].get)
                flops = _flops(M, N, K, backward, RANK)
                nbytes = _bytes(M, N, K, NF4_DQ_BITS, torch.finfo(dtype).bits // 8, backward)
                t = row["ours_s"]
                row["ours_TFLOPs"] = flops / t / 1e12
                row["ours_GBps"] = nbytes / t / 1e9
                if on_gpu:
                    row["ours_frac_roofline"] = max(nbytes / HBM_BYTES_PER_S, flops / PEAK_BF16_FLOPS) / t
                dense = "torch_bf16_s" if on_gpu else "torch_dense_s"
                row["speedup_vs_dense"] = row[dense] / t
                if "bnb_s" in row:
                    row["speedup_vs_bnb"] = row["bnb_s"] / t
                rows.append(row)
    meta = {
        "device": torch.cuda.get_device_name(dev) if on_gpu else (platform.processor() or "cpu"),
        "device_type": dev.type, "dtype": str(dtype), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "triton": _triton_version(), "bitsandbytes": have_bnb,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "path": "triton" if on_gpu else "reference (plain PyTorch, CPU)", "quick": quick,
        "gemv_max_m": kernels.GEMV_MAX_M, "dequant_once_min_m": kernels.DEQUANT_ONCE_MIN_M,
    }
    return {"rows": rows, "markdown": _markdown(rows, meta), "meta": meta}


def _triton_version():
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def _markdown(rows: list[dict], meta: dict) -> str:
    on_gpu = meta["device_type"] == "cuda"
    dense = "torch_bf16" if on_gpu else "torch_dense"
    head = [f"4-bit matmul + LoRA (r={RANK}): device {meta['device']}, {meta['dtype']}, torch {meta['torch']}, "
            f"triton {meta['triton']}, {meta['date']}."]
    if not on_gpu:
        head.append("**CPU run: the reference (plain PyTorch) path at small shapes, float32. These numbers "
                    "say nothing about GPU kernel speed; the Triton kernels are only timed on CUDA.**")
    ms = lambda r, k: f"{r[k] * 1e3:.3f}" if r.get(k) is not None else "n/a"  # noqa: E731
    xf = lambda r, k: f"{r[k]:.2f}x" if r.get(k) is not None else "n/a"  # noqa: E731
    mm = [r for r in rows if r["mode"] != "dequantize"]
    table = md_table(
        ["mode", "K x N", "M", "regime", "ours (ms)", f"{dense} (ms)", "bnb (ms)", "dequant+matmul (ms)",
         f"vs {dense}", "vs bnb", "ours TFLOP/s", "ours GB/s"] + (["% roofline", "best regime"] if on_gpu else []),
        [[r["mode"], f"{r['K']}x{r['N']}", r["M"], r["regime"], ms(r, "ours_s"), ms(r, f"{dense}_s"), ms(r, "bnb_s"),
          ms(r, "dequant_matmul_s"), xf(r, "speedup_vs_dense"), xf(r, "speedup_vs_bnb"),
          f"{r['ours_TFLOPs']:.3f}", f"{r['ours_GBps']:.1f}"]
         + ([f"{100 * r['ours_frac_roofline']:.0f}%", r.get("best_regime", "")] if on_gpu else []) for r in mm])
    dq = [r for r in rows if r["mode"] == "dequantize"]
    dq_table = md_table(
        ["dequantize K x N", "ours (ms)", "nf4 reference (ms)", "bnb (ms)", "ours GB/s"]
        + (["% of HBM"] if on_gpu else []),
        [[f"{r['K']}x{r['N']}", ms(r, "ours_s"), ms(r, "nf4_reference_s"), ms(r, "bnb_s"), f"{r['ours_GBps']:.1f}"]
         + ([f"{100 * r['ours_frac_hbm']:.0f}%"] if on_gpu else []) for r in dq])
    notes = [f"Speed-ups are provider time / our time. Regime crossovers in use: GEMV for M <= {meta['gemv_max_m']}, "
             f"dequantize-once GEMM for M >= {meta['dequant_once_min_m']} (unmeasured defaults until a GPU run)."]
    if not meta["bitsandbytes"]:
        notes.append("bitsandbytes is not importable here: no bnb column.")
    return "\n\n".join(["\n".join(head), table, dq_table, " ".join(notes)])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small sweep (CPU: < 60 s)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="directory for bench_matmul_<device>.json / .md")
    a = p.parse_args(argv)
    res = run(a.quick, a.device)
    print(res["markdown"])
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        stem = os.path.join(a.out, f"bench_matmul_{torch.device(a.device).type}")
        with open(stem + ".json", "w") as f:
            json.dump({"rows": res["rows"], "meta": res["meta"]}, f, indent=2)
        with open(stem + ".md", "w") as f:
            f.write(res["markdown"] + "\n")


if __name__ == "__main__":
    main()
