"""Whole-model 4-bit load: ``lora.load_quantized`` vs transformers + bitsandbytes, CPU, same run.

    python -m benchmarks.bench_load [--size 1b|small] [--reps 5] [--out DIR]

A Llama-shaped model with random weights (``1b``: TinyLlama's shape, 22 layers, hidden 2048,
MLP 5632, 32 heads / 4 KV heads, vocab 32000: 1.10e9 parameters) is written once, into a temp
folder, as a 16-bit checkpoint (bf16, transformers' ``save_pretrained``, default shard size) and
as a bitsandbytes 4-bit checkpoint (transformers' ``from_pretrained(quantization_config=...)``
then ``save_pretrained``; NF4, double quantization). Two scenarios are timed:

    16-bit -> 4-bit   ours: meta model + load_quantized(path16, quant_type="nf4")
                      theirs: from_pretrained(path16, quantization_config=BitsAndBytesConfig(nf4, dq))
    4-bit  -> 4-bit   ours: meta model + load_quantized(path4)
                      theirs: from_pretrained(path4)

Each load runs in a fresh child process (so the peak resident set, Linux's ``VmHWM``, is the
load's own), which imports torch / transformers / bitsandbytes first and records its resident
set before the call (baseline). Providers alternate (ours, theirs, ours, ...) after one warm-up
child each (page cache, torch.compile's on-disk cache); the table gives the median and the
spread of the repetitions, and ratios ours / theirs from the same run. Both providers produce
the same model: each child prints a CRC of every tensor (a 4-bit layer: its packed and absmax
codes), which also reads every byte, so that weights transformers leaves mapped from the file
count as resident; the peak is read after it, and the run checks the CRCs agree.
Our peak is also compared with the issue's budget, 1.3 x (final 4-bit model + largest shard).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import zlib

from .timing import json_child

SIZES = {  # LlamaConfig fields
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048),
    "small": dict(vocab_size=8192, hidden_size=768, intermediate_size=2048, num_hidden_layers=6,
                  num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=512),
}
PROVIDERS = ("ours", "transformers")
SCENARIOS = ("16bit", "bnb4")
CHILD_TIMEOUT_S = 3600
BUDGET_FACTOR = 1.3  # the issue: peak <= 1.3 x (final 4-bit model + largest shard)


# ---- child processes ------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _bnb_config(transformers, torch):
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)


def _child_write(size: str, folder: str) -> dict:
    """Write the 16-bit checkpoint, then (transformers + bitsandbytes) the 4-bit one."""
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**SIZES[size], tie_word_embeddings=False)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 directly: no fp32 copy of ~1e9 weights
    model = transformers.LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(os.path.join(folder, "16bit"))
    del model
    q = transformers.LlamaForCausalLM.from_pretrained(os.path.join(folder, "16bit"), dtype=torch.bfloat16,
                                                      quantization_config=_bnb_config(transformers, torch),
                                                      device_map="cpu")
    q.save_pretrained(os.path.join(folder, "bnb4"))
    return {"params": params}


def _fingerprint(model, torch) -> dict[str, int]:
    """CRC32 of every tensor of the loaded model, which reads every byte of it once (a weight
    still mapped from the file becomes resident, as its first forward would make it). A 4-bit
    layer counts by its packed codes + absmax codes (the same for both providers); every other
    parameter / buffer by its bytes, by name."""
    import lora

    out, quantized = {}, set()
    crc = lambda t, c=0: zlib.crc32(t.detach().contiguous().view(torch.uint8).numpy(), c)  # noqa: E731
    for name, m in model.named_modules():
        if isinstance(m, lora.QuantizedLinear):
            data, absmax, nested = m.weight, m.weight_absmax, m.weight_nested_absmax
        elif type(m).__name__ == "Linear4bit":
            qs = m.weight.quant_state
            data, absmax, nested = m.weight.data, qs.absmax, qs.state2.absmax if qs.nested else None
        else:
            continue
        quantized.add(name)
        out[name + " (4-bit)"] = crc(absmax, crc(data, 0 if nested is None else crc(nested)))
    for key, t in [*model.named_parameters(), *model.named_buffers()]:
        if key.rpartition(".")[0] not in quantized:
            out[key] = crc(t)
    return out


def _model_bytes(model) -> int:
    """Bytes the loaded model holds: parameters and buffers, 4-bit state included, ties once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _child_load(provider: str, scenario: str, folder: str, threads: int) -> dict:
    import torch
    import transformers

    import lora

    torch.set_num_threads(threads)
    path = os.path.join(folder, scenario)
    cfg = transformers.LlamaConfig.from_pretrained(path)
    cls = transformers.LlamaForCausalLM  # imports the modeling code: not part of either load
    import bitsandbytes  # noqa: F401 - likewise (transformers imports it inside from_pretrained)

    baseline = _status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    if provider == "ours":
        with torch.device("meta"):
            model = cls(cfg)
        lora.load_quantized(model, path, quant_type="nf4" if scenario == "16bit" else None)
    else:
        extra = {"quantization_config": _bnb_config(transformers, torch)} if scenario == "16bit" else {}
        model = cls.from_pretrained(path, dtype=torch.bfloat16, device_map="cpu", **extra)
    seconds = time.perf_counter() - t0
    crcs = _fingerprint(model, torch)
    peak = _status_kib("VmHWM") * 1024
    return {"seconds": seconds, "baseline_rss": baseline, "peak_rss": peak, "model_bytes": _model_bytes(model),
            "crcs": crcs}


def _run_child(args: list[str]) -> dict:
    return json_child(["-m", "benchmarks.bench_load", "--child", *args], timeout=CHILD_TIMEOUT_S)


# ---- the measurement ---------------------------------------------------------------------------------
def _largest_shard(path: str) -> int:
    return max(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def measure(size: str, reps: int, threads: int, workdir: str | None = None, log=print) -> dict:
    """Write the checkpoints (once), then the interleaved child runs; returns rows + meta."""
    folder = workdir or tempfile.mkdtemp(prefix="bench_load_", dir=os.environ.get("BENCH_LOAD_DIR"))
    try:
        t0 = time.perf_counter()
        if not os.path.isdir(os.path.join(folder, "bnb4")):
            info = _run_child(["write", size, folder])
            log(f"[bench_load] wrote the {size} checkpoints in {time.perf_counter() - t0:.0f} s")
        else:
            info = {"params": None}
        rows = []
        for scenario in SCENARIOS:
            runs = {p: [] for p in PROVIDERS}
            for rep in range(reps + 1):  # rep 0 is the warm-up of each provider
                for provider in PROVIDERS:
                    r = _run_child(["load", provider, scenario, folder, str(threads)])
                    log(f"[bench_load] {scenario} {provider} {'warm-up' if rep == 0 else f'rep {rep}'}: "
                        f"{r['seconds']:.2f} s, peak {r['peak_rss'] / 2**30:.2f} GiB")
                    if rep:
                        runs[provider].append(r)
            rows.append(_row(scenario, runs, _largest_shard(os.path.join(folder, scenario))))
        sizes = {s: sum(os.path.getsize(os.path.join(folder, s, f)) for f in os.listdir(os.path.join(folder, s)))
                 for s in SCENARIOS}
        return {"rows": rows, "meta": {"size": size, "config": SIZES[size], "params": info["params"],
                                       "reps": reps, "threads": threads, "checkpoint_bytes": sizes}}
    finally:
        if workdir is None:
            shutil.rmtree(folder, ignore_errors=True)


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _row(scenario: str, runs: dict, largest_shard: int) -> dict:
    row = {"scenario": scenario, "largest_shard": largest_shard}
    for p in PROVIDERS:
        rs = runs[p]
        row[p] = {"seconds": _stats([r["seconds"] for r in rs]), "peak_rss": _stats([r["peak_rss"] for r in rs]),
                  "load_rss": _stats([r["peak_rss"] - r["baseline_rss"] for r in rs]),
                  "model_bytes": rs[0]["model_bytes"]}
    crcs = [r["crcs"] for p in PROVIDERS for r in runs[p]]
    row["identical_bytes"] = all(c == crcs[0] for c in crcs) and len(crcs[0]) > 0
    row["layers_4bit"] = sum(k.endswith(" (4-bit)") for k in crcs[0])
    row["time_ratio"] = row["ours"]["seconds"]["median"] / row["transformers"]["seconds"]["median"]
    row["peak_ratio"] = row["ours"]["peak_rss"]["median"] / row["transformers"]["peak_rss"]["median"]
    row["load_rss_ratio"] = row["ours"]["load_rss"]["median"] / row["transformers"]["load_rss"]["median"]
    budget = BUDGET_FACTOR * (row["ours"]["model_bytes"] + largest_shard)
    row["budget"] = budget
    row["ours_load_rss_vs_budget"] = row["ours"]["load_rss"]["median"] / budget
    return row


def markdown(res: dict) -> str:
    from .report_util import fmt_bytes, md_table

    meta = res["meta"]
    gib = lambda s: f"{s['median'] / 2**30:.2f} ({s['min'] / 2**30:.2f}-{s['max'] / 2**30:.2f})"  # noqa: E731
    sec = lambda s: f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})"  # noqa: E731
    head = ["checkpoint", "ours s", "transformers s", "time ours/theirs", "ours peak RSS GiB",
            "transformers peak RSS GiB", "peak ours/theirs", "load's own RSS ours/theirs", "ours vs 1.3x budget",
            "same bytes"]
    body = []
    for r in res["rows"]:
        label = "16-bit -> NF4+DQ" if r["scenario"] == "16bit" else "bnb 4-bit"
        body.append([label, sec(r["ours"]["seconds"]), sec(r["transformers"]["seconds"]), f"{r['time_ratio']:.2f}x",
                     gib(r["ours"]["peak_rss"]), gib(r["transformers"]["peak_rss"]), f"{r['peak_ratio']:.2f}x",
                     f"{r['load_rss_ratio']:.2f}x", f"{r['ours_load_rss_vs_budget']:.2f}x",
                     f"{r['identical_bytes']} ({r['layers_4bit']} layers)"])
    n = meta.get("params")
    params = meta["size"] if not n else f"{n / 1e9:.2f}e9 parameters" if n >= 1e9 else f"{n / 1e6:.0f}e6 parameters"
    ck = meta["checkpoint_bytes"]
    return (f"Whole-model load on CPU, Llama-shaped `{meta['size']}` model ({params}; checkpoints "
            f"{fmt_bytes(ck['16bit'])} bf16, {fmt_bytes(ck['bnb4'])} bnb 4-bit), {meta['threads']} torch thread(s). "
            f"Each load in a fresh process; median (min-max) of {meta['reps']} interleaved runs after one warm-up "
            f"each. Peak RSS = VmHWM of the process (imports included); \"load's own\" = VmHWM minus the resident "
            f"set before the call. Budget = 1.3 x (final 4-bit model + largest shard).\n\n" + md_table(head, body))


def run(quick: bool = False, device: str = "cpu") -> dict:
    """Report section: the ``small`` model (reduced size, labelled), 2 repetitions (1 with quick)."""
    from .progress import log
    from .report_util import choose_threads

    try:
        import bitsandbytes  # noqa: F401
        import transformers  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure: no peer to compare with
        return {"markdown": f"not available: transformers + bitsandbytes are needed as the peer ({e})", "rows": []}
    threads, _ = choose_threads("auto")
    res = measure("small", 1 if quick else 2, threads, log=log)
    note = ("\n\nReduced for the report's time budget: the `small` model (not ~1B) and 2 repetitions (not 5); "
            "README has the ~1B table (`python -m benchmarks.bench_load --size 1b`, 5 repetitions). "
            "Runs on CPU whatever --device says.")
    return {"rows": res["rows"], "meta": res["meta"], "markdown": markdown(res) + note}


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, *args = sys.argv[2:]
        if kind == "write":
            res = _child_write(*args)
        else:
            provider, scenario, folder, threads = args
            res = _child_load(provider, scenario, folder, int(threads))
        print(json.dumps(res))
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="1b")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", default="auto", help="torch threads in each child (a number or 'auto')")
    p.add_argument("--workdir", default=None, help="keep the checkpoints in this folder (default: a temp folder, "
                   "removed at the end)")
    p.add_argument("--out", default=None, help="folder for bench_load.json / bench_load.md")
    a = p.parse_args(argv)
    from .report_util import choose_threads

    threads, why = choose_threads(a.threads)
    print(f"[bench_load] {threads} thread(s): {why}", file=sys.stderr)
    res = measure(a.size, a.reps, threads, a.workdir, log=lambda m: print(m, file=sys.stderr, flush=True))
    md = markdown(res)
    print(md)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "bench_load.json"), "w") as f:
            json.dump(res, f, indent=2)
        with open(os.path.join(a.out, "bench_load.md"), "w") as f:
            f.write(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
