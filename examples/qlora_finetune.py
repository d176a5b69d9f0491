"""Example (c): QLoRA end to end with ``lora`` + ``optim``: quantize, adapt, train, save, reload.

    model = lora.apply_lora(model, lora.LoRAConfig(r=8, alpha=16), quantize=True)   # NF4 + double quant base
    opt = optim.PagedAdamW(lora.adapter_parameters(model).values(), lr=..., state_bits=32)
    ... train ...
    lora.save_adapter(model, out)     # peft's layout; lora.load_adapter reads it back

The model is a small Llama (transformers) with random weights standing in for a pretrained one,
and the task is learnable on purpose: continue arithmetic sequences modulo the vocabulary. The
script checks that the held-out loss falls, that only the adapters trained, and that the saved
adapter, loaded into a freshly quantized copy of the base, reproduces the trained model's logits.

    python examples/qlora_finetune.py                     # 256 wide, 4 layers, 60 steps
    python examples/qlora_finetune.py --state-bits 8      # 8-bit optimizer state
    python examples/qlora_finetune.py --tiny              # what CI runs
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch

import lora
import optim

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
DEFAULT = dict(vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
               num_key_value_heads=4, max_position_embeddings=256)


def sequences(batch: int, length: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Rows ``start + stride * t (mod vocab)``: the next token follows from the previous two."""
    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    stride = torch.randint(1, 4, (batch, 1), generator=generator)
    return (start + stride * torch.arange(length)) % vocab


def loss_on(model, ids: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    model.train()
    return loss


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model and a few steps (CI)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--state-bits", type=int, default=32, choices=(8, 32), help="optimizer state precision")
    args = parser.parse_args(argv)
    from transformers import LlamaConfig, LlamaForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = TINY if args.tiny else DEFAULT
    steps = args.steps or (8 if args.tiny else 60)
    batch, length = (4, 16) if args.tiny else (8, 64)
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**cfg))  # stands in for a pretrained model
    config = lora.LoRAConfig(r=8, alpha=16, dropout=0.05)
    model = lora.apply_lora(copy.deepcopy(base), config, quantize=True, device=device)
    print(lora.trainable_report(model))

    params = list(lora.adapter_parameters(model).values())
    opt = optim.PagedAdamW(params, lr=1e-2 if args.tiny else 3e-3, state_bits=args.state_bits)
    gen = torch.Generator().manual_seed(1)
    held_out = sequences(batch, length, cfg["vocab_size"], gen).to(device)
    before = loss_on(model, held_out)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.train()
    for step in range(steps):
        ids = sequences(batch, length, cfg["vocab_size"], gen).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % max(1, steps // 6) == 0 or step == steps - 1:
            print(f"  step {step:3d}  train loss {loss.item():.4f}")
    after = loss_on(model, held_out)
    print(f"held-out loss {before:.4f} -> {after:.4f}")
    assert after < before, (before, after)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)

    with tempfile.TemporaryDirectory() as out:
        lora.save_adapter(model, out)
        fresh = lora.apply_lora(copy.deepcopy(base), config, quantize=True, device=device)
        lora.load_adapter(fresh, out)
    model.eval(), fresh.eval()
    with torch.no_grad():
        same = torch.equal(model(input_ids=held_out).logits, fresh(input_ids=held_out).logits)
    assert same, "the reloaded adapter does not reproduce the trained model"
    print(f"adapter saved and reloaded into a freshly quantized base: logits identical ({device})")
    return {"loss_before": before, "loss_after": after, "steps": steps}


if __name__ == "__main__":
    main()
