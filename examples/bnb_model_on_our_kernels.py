"""Example (b): a transformers + bitsandbytes 4-bit model, run on our kernels with ``lora.from_bnb``,
timed against bitsandbytes' own forward on the same model in the same run.

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    lora.from_bnb(model)        # every Linear4bit -> lora.QLoRALinear on the *same* storage: no copy

Both versions of each layer exist at once and share their bytes (the script asserts ``data_ptr``
equality), so the script swaps one set of modules for the other between timings: the inputs, the
weights and everything else are identical, and the two providers are measured interleaved
(warm-up, then the median and spread of ``--reps`` repetitions each). Our layers run with their
adapter disabled (``lora.disable_adapter``), so both compute the 4-bit base model alone.

    python examples/bnb_model_on_our_kernels.py                  # a random Llama, 1024 wide, 4 layers
    python examples/bnb_model_on_our_kernels.py --model DIR      # your own 16-bit checkpoint folder
    python examples/bnb_model_on_our_kernels.py --tiny           # what CI runs

On CPU both compute in float32 (ours: the reference path, dequantize then matmul; bitsandbytes: its
CPU kernels); on CUDA in bfloat16 (ours: the Triton kernels). Requires transformers and bitsandbytes.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from torch import nn

import kernels
import lora

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
DEFAULT = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
               num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048)


def load_4bit(path: str, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=qcfg, dtype=dtype,
                                                device_map=device).eval()


def random_llama(folder: str, config: dict) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(folder)
    return folder


def put(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Install ``modules`` (name -> module) in ``model``."""
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)


def timed(model: nn.Module, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    if ids.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    if ids.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, logits


def compare(model, theirs: dict, ours: dict, ids: torch.Tensor, reps: int) -> dict:
    """Interleaved timings of the same forward with bitsandbytes' layers and with ours."""
    times = {"bitsandbytes": [], "ours": []}
    logits = {}
    for rep in range(reps + 1):  # repetition 0 is the warm-up
        for who, modules in (("bitsandbytes", theirs), ("ours", ours)):
            put(model, modules)
            seconds, logits[who] = timed(model, ids)
            if rep:
                times[who].append(seconds)
    out = {who: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t)} for who, t in times.items()}
    out["speed_ratio"] = out["bitsandbytes"]["median_s"] / out["ours"]["median_s"]  # > 1: ours faster
    diff = (logits["ours"].float() - logits["bitsandbytes"].float()).abs().max().item()
    out["max_logit_diff_rel"] = diff / logits["bitsandbytes"].float().abs().max().item()
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama (CI)")
    parser.add_argument("--model", help="a 16-bit checkpoint folder to load in 4-bit (default: a random Llama)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per provider and shape")
    parser.add_argument("--prefill", type=int, default=None, help="tokens of the prefill-shaped forward")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    reps = args.reps or (2 if args.tiny else 7)
    prefill = args.prefill or (16 if args.tiny else 256)

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or random_llama(tmp, TINY if args.tiny else DEFAULT)
        model = load_4bit(path, dtype, device)
    theirs = {name: model.get_submodule(name) for name in lora.bnb_bridge.bnb_4bit_linears(model)}
    shared = {name: (m.weight.data_ptr(), m.weight.quant_state.absmax.data_ptr()) for name, m in theirs.items()}
    lora.from_bnb(model)  # before any bitsandbytes forward: on AVX512-BF16 CPUs that repacks its weights
    ours = {name: model.get_submodule(name) for name in theirs}
    assert all((ours[n].weight.data_ptr(), ours[n].weight_absmax.data_ptr()) == shared[n] for n in theirs)
    packed = sum(m.weight.numel() * m.weight.element_size() for m in ours.values())
    print(f"{len(ours)} bitsandbytes Linear4bit layers now run on our kernels; {packed:,} bytes of packed "
          f"weights shared, 0 bytes copied ({device}, {dtype}, backend: "
          f"{'triton' if kernels.dispatch.use_triton(torch.empty(0, device=device)) else 'reference'})")

    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    shapes = {"decode (1 token)": torch.randint(0, vocab, (1, 1), generator=gen),
              f"prefill ({prefill} tokens)": torch.randint(0, vocab, (1, prefill), generator=gen)}
    results = {}
    with lora.disable_adapter(model):  # the base model alone, as bitsandbytes computes it
        for label, ids in shapes.items():
            results[label] = r = compare(model, theirs, ours, ids.to(device), reps)
            print(f"  {label:22s} bitsandbytes {1e3 * r['bitsandbytes']['median_s']:9.2f} ms  "
                  f"ours {1e3 * r['ours']['median_s']:9.2f} ms  (spread {1e3 * r['ours']['min_s']:.2f}-"
                  f"{1e3 * r['ours']['max_s']:.2f})  ours/theirs speed {r['speed_ratio']:.2f}x  "
                  f"max logit diff {r['max_logit_diff_rel']:.1e} (relative)")
    put(model, ours)
    repacked = any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in theirs.values())
    if repacked:
        print("  note: bitsandbytes repacked its weights for its AVX512-BF16 CPU kernel during the timings "
              "(a copy of its own); ours kept reading the original bytes")
    return results


if __name__ == "__main__":
    main()
