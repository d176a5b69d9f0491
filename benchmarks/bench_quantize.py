"""Quantize / dequantize throughput: ours vs bitsandbytes, same inputs, same run.

    python -m benchmarks.bench_quantize [--quick] [--device cpu|cuda] [--out DIR]

Shapes are Llama layers (4096x4096, 4096x14336) in bf16, NF4 with double quantization.
Warm-up then the median of >= 5 runs. The roofline is memory traffic: quantize reads 2 bytes
and writes ~0.52 bytes per weight; dequantize the reverse.
"""

from __future__ import annotations

import platform

import torch

import nf4

from .timing import bench_cli, bnb_available, median_time

SHAPES = [(4096, 4096), (4096, 14336)]


def _bytes_moved(n: int) -> float:
    return n * 2 + n * 4.127 / 8  # bf16 in/out + packed NF4+DQ


def run(quick: bool = False, device: str = "cpu") -> dict:
    """Time both providers on each shape; returns ``{"rows", "markdown", "meta"}``."""
    dev = torch.device(device)
    shapes = SHAPES[:1] if quick else SHAPES
    reps = 5 if quick else 7
    have_bnb = bnb_available()
    rows = []
    for shape in shapes:
        g = torch.Generator().manual_seed(0)
        w = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16).to(dev)
        n = w.numel()
        qt = nf4.quantize(w)
        row = {"shape": list(shape), "numel": n,
               "ours_quantize_s": median_time(lambda: nf4.quantize(w), dev, reps=reps),
               "ours_dequantize_s": median_time(lambda: qt.dequantize(), dev, reps=reps)}
        if have_bnb:
            import bitsandbytes.functional as bnbf

            q, s = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            row["identical_to_bnb"] = bool(torch.equal(q, qt.data) and torch.equal(s.absmax, qt.absmax))
            row["bnb_quantize_s"] = median_time(
                lambda: bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4"), dev, reps=reps)
            row["bnb_dequantize_s"] = median_time(lambda: bnbf.dequantize_4bit(q, s), dev, reps=reps)
            row["quantize_speedup"] = row["bnb_quantize_s"] / row["ours_quantize_s"]
            row["dequantize_speedup"] = row["bnb_dequantize_s"] / row["ours_dequantize_s"]
        for k in ("quantize", "dequantize"):
            row[f"ours_{k}_GBps"] = _bytes_moved(n) / row[f"ours_{k}_s"] / 1e9
        rows.append(row)
    meta = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "bitsandbytes": have_bnb}
    return {"rows": rows, "markdown": _markdown(rows, meta), "meta": meta}


def _markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Quantize / dequantize, bf16 -> NF4+DQ (blocksize 64/256), device: {meta['device']}, "
             f"{meta['threads']} threads. Median of >= 5 after warm-up; speed-up = bnb time / our time.", "",
             "| shape | ours quantize (ms) | bnb quantize (ms) | speed-up | ours dequantize (ms) | bnb dequantize (ms) | speed-up | bit-identical |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = lambda k: f"{r[k] * 1e3:.1f}" if k in r else "n/a"  # noqa: E731
        x = lambda k: f"{r[k]:.2f}x" if k in r else "n/a"  # noqa: E731
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {f('ours_quantize_s')} | {f('bnb_quantize_s')} | "
                     f"{x('quantize_speedup')} | {f('ours_dequantize_s')} | {f('bnb_dequantize_s')} | "
                     f"{x('dequantize_speedup')} | {r.get('identical_to_bnb', 'n/a')} |")
    if not meta["bitsandbytes"]:
        lines.append("\nbitsandbytes is not installed: no side-by-side numbers.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    bench_cli(__doc__, run, "bench_quantize.json", argv)

if __name__ == "__main__":
    main()
