"""Quantize / dequantize throughput: ours vs bitsandbytes, same inputs, same run.

    python -m benchmarks.bench_quantize [--quick] [--device cpu|cuda] [--out DIR]

Shapes are Llama layers (4096x4096, 4096x14336) in bf16, NF4 with double quantization.
Warm-up, then >= 5 runs with the providers interleaved (CPU): median, min and max. The roofline is memory traffic: quantize reads 2 bytes
and writes ~0.52 bytes per weight; dequantize the reverse.

On CPU more of our dequantize figures are timed, so the headline ratio can be read honestly:
``cold`` with our output cache off (every call takes fresh memory and its page faults, as
bitsandbytes' does) and ``into out=`` (a preallocated output: the decode alone), both in the same
interleaving; and ``warm``, like for like with bitsandbytes' decode: a child process whose glibc
keeps freed memory (``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` raised), so that
neither provider's output pays page faults after the first call (ours with the cache off).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from contextlib import contextmanager

import torch

import nf4
from nf4 import _cpu_decode

from .timing import bench_cli, bnb_available, interleaved, json_child, median_time

SHAPES = [(4096, 4096), (4096, 14336)]


def _bytes_moved(n: int) -> float:
    return n * 2 + n * 4.127 / 8  # bf16 in/out + packed NF4+DQ


@contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _cold(qt):
    """Our dequantize with the output cache off: fresh memory every call."""
    with _env("NF4_DECODE_CACHE_MB", "0"):
        return qt.dequantize()


# glibc keeps freed memory (read at start-up: a child process); our output cache off
WARM_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 34), "NF4_DECODE_CACHE_MB": "0"}


def _warm_child(n: int, k: int, reps: int) -> None:
    """In a process started with ``WARM_ENV``: our dequantize and bitsandbytes', interleaved;
    prints ``{"ours_s", "bnb_s", ...}`` (medians, min, max) as JSON on its last line."""
    import bitsandbytes.functional as bnbf

    g = torch.Generator().manual_seed(0)
    w = (torch.randn((n, k), generator=g) * 0.02).to(torch.bfloat16)
    qt = nf4.quantize(w)
    q, s = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    res = interleaved({"ours": lambda: qt.dequantize(), "bnb": lambda: bnbf.dequantize_4bit(q, s)}, reps)
    print(json.dumps({f"{key}{suffix}": v for key, vals in res.items()
                      for suffix, v in zip(("_s", "_min_s", "_max_s"), vals)}))


def _warm(shape: tuple[int, int], reps: int) -> dict:
    """``_warm_child`` in a fresh process with ``WARM_ENV``."""
    code = f"from benchmarks.bench_quantize import _warm_child; _warm_child({shape[0]}, {shape[1]}, {reps})"
    return json_child(["-c", code], env=WARM_ENV)


def run(quick: bool = False, device: str = "cpu") -> dict:
    """Time both providers on each shape; returns ``{"rows", "markdown", "meta"}``.

    On CPU the providers are interleaved inside every repetition (median, min and max of each;
    ``*_speedup`` = bnb median / our median, ``*_speedup_range`` = the worst and best pairing
    of repetitions' extremes: bnb min / our max .. bnb max / our min)."""
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
        fns = {"ours_quantize": lambda: nf4.quantize(w), "ours_dequantize": lambda: qt.dequantize()}
        if dev.type == "cpu":
            out = torch.empty(shape, dtype=w.dtype)
            fns["ours_dequantize_cold"] = lambda: _cold(qt)
            fns["ours_dequantize_into"] = lambda: qt.dequantize(out=out)
        row = {"shape": list(shape), "numel": n, "reps": reps}
        if have_bnb:
            import bitsandbytes.functional as bnbf

            q, s = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            row["identical_to_bnb"] = bool(torch.equal(q, qt.data) and torch.equal(s.absmax, qt.absmax))
            row["dequantize_identical_to_bnb"] = bool(torch.equal(bnbf.dequantize_4bit(q, s), qt.dequantize()))
            fns["bnb_quantize"] = lambda: bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True,
                                                             quant_type="nf4")
            fns["bnb_dequantize"] = lambda: bnbf.dequantize_4bit(q, s)
        if dev.type == "cuda":
            for k, fn in fns.items():
                row[f"{k}_s"] = median_time(fn, dev, reps=reps)
        else:
            for k, (med, lo, hi) in interleaved(fns, reps).items():
                row[f"{k}_s"], row[f"{k}_min_s"], row[f"{k}_max_s"] = med, lo, hi
        if have_bnb and dev.type == "cpu":
            warm = _warm(shape, reps)
            for suffix in ("_s", "_min_s", "_max_s"):
                row[f"ours_dequantize_warm{suffix}"] = warm[f"ours{suffix}"]
                row[f"bnb_dequantize_warm{suffix}"] = warm[f"bnb{suffix}"]
        # (ours, bnb) per ratio: bitsandbytes has one dequantize, so "cold" is compared with it too
        pairs = {"quantize": ("quantize", "quantize"), "dequantize": ("dequantize", "dequantize"),
                 "dequantize_cold": ("dequantize_cold", "dequantize"),
                 "dequantize_warm": ("dequantize_warm", "dequantize_warm")}
        for k, (ours, bnb) in pairs.items():
            if f"bnb_{bnb}_s" in row and f"ours_{ours}_s" in row:
                row[f"{k}_speedup"] = row[f"bnb_{bnb}_s"] / row[f"ours_{ours}_s"]
                if f"bnb_{bnb}_min_s" in row:
                    row[f"{k}_speedup_range"] = [row[f"bnb_{bnb}_min_s"] / row[f"ours_{ours}_max_s"],
                                                 row[f"bnb_{bnb}_max_s"] / row[f"ours_{ours}_min_s"]]
        for k in ("quantize", "dequantize", "dequantize_cold", "dequantize_into"):
            if f"ours_{k}_s" in row:
                row[f"ours_{k}_GBps"] = _bytes_moved(n) / row[f"ours_{k}_s"] / 1e9
        rows.append(row)
    meta = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "threads": torch.get_num_threads(), "torch": torch.__version__, "bitsandbytes": have_bnb,
            "date": datetime.date.today().isoformat(), "interleaved": dev.type == "cpu",
            "decode_cache_mb": _cpu_decode.cache_limit() / 2**20 if dev.type == "cpu" else None}
    return {"rows": rows, "markdown": _markdown(rows, meta), "meta": meta}


def _markdown(rows: list[dict], meta: dict) -> str:
    how = ("providers interleaved in each repetition, median (min..max) of " if meta.get("interleaved")
           else "median of ")
    lines = [f"Quantize / dequantize, bf16 -> NF4+DQ (blocksize 64/256), device: {meta['device']}, "
             f"{meta['threads']} threads, {meta.get('date', '')}. After warm-up, {how}"
             f"{rows[0]['reps'] if rows else 0} runs; speed-up = bnb time / our time (range: bnb min / our "
             "max .. bnb max / our min).", "",
             "| shape | ours quantize (ms) | bnb quantize (ms) | speed-up | ours dequantize (ms) | "
             "bnb dequantize (ms) | speed-up | ours cold (ms) | speed-up cold | ours into `out=` (ms) | "
             "warm: ours / bnb (ms) | speed-up warm | bit-identical (quantize / dequantize) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def f(k):
            if f"{k}_s" not in r:
                return "n/a"
            if f"{k}_min_s" in r:
                return f"{r[k + '_s'] * 1e3:.1f} ({r[k + '_min_s'] * 1e3:.1f}..{r[k + '_max_s'] * 1e3:.1f})"
            return f"{r[k + '_s'] * 1e3:.1f}"

        def x(k):
            if k not in r:
                return "n/a"
            rng = r.get(f"{k}_range")
            return f"{r[k]:.2f}x" + (f" ({rng[0]:.2f}..{rng[1]:.2f})" if rng else "")
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {f('ours_quantize')} | {f('bnb_quantize')} | "
                     f"{x('quantize_speedup')} | {f('ours_dequantize')} | {f('bnb_dequantize')} | "
                     f"{x('dequantize_speedup')} | {f('ours_dequantize_cold')} | {x('dequantize_cold_speedup')} | "
                     f"{f('ours_dequantize_into')} | {f('ours_dequantize_warm')} / {f('bnb_dequantize_warm')} | "
                     f"{x('dequantize_warm_speedup')} | {r.get('identical_to_bnb', 'n/a')} / "
                     f"{r.get('dequantize_identical_to_bnb', 'n/a')} |")
    cache_mb = meta.get("decode_cache_mb")
    ours = ("our default path, whose large outputs come from its output cache (up to "
            f"{cache_mb:g} MiB), against bitsandbytes' default path, which takes fresh memory every call; "
            "that is mostly a memory difference" if cache_mb else
            "our dequantize against bitsandbytes', both taking fresh memory every call (our output cache "
            "is off in this run)" if cache_mb == 0 else "our dequantize against bitsandbytes'")
    lines.append(f"\n*Speed-up*: {ours}. Like for like: *cold*, our cache off (`NF4_DECODE_CACHE_MB=0`), both pay page "
                 "faults every call; *warm*, a child process whose glibc keeps freed memory "
                 "(`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_` raised), neither does: the decode "
                 "arithmetic alone. *Into `out=`*: our decode into a preallocated output (bitsandbytes "
                 "has no CPU `out=`).")
    if not meta["bitsandbytes"]:
        lines.append("\nbitsandbytes is not installed: no side-by-side numbers.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    bench_cli(__doc__, run, "bench_quantize.json", argv)

if __name__ == "__main__":
    main()
