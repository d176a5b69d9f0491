"""``lora.from_bnb``: run a transformers + bitsandbytes 4-bit model on our kernels, in place, no copy.

Every bitsandbytes 4-bit Linear (an ``nn.Linear`` whose weight carries a ``quant_state``: a
``Linear4bit`` / ``LinearNF4`` / ``LinearFP4``, found by duck typing, bitsandbytes is never
imported) becomes a ``QLoRALinear`` whose quantized base *is* bitsandbytes' storage:

    Linear4bit.weight              (packed uint8)  -> QLoRALinear.weight                  same storage
    weight.quant_state.absmax                      -> QLoRALinear.weight_absmax           same storage
    weight.quant_state.code                        -> QLoRALinear.weight_quant_map        same storage
    weight.quant_state.offset                      -> QLoRALinear.weight_offset           same storage
    weight.quant_state.state2.absmax / .code       -> weight_nested_absmax / _quant_map   same storage
    Linear4bit.bias                                -> QLoRALinear.bias                    same Parameter

Nothing is re-quantized or copied (``nf4.bridge.from_bnb``), so the model's bytes do not grow
except for the adapters. The layers ``config`` targets (``target_modules`` / ``exclude_modules``,
peft's rules; ``"all-linear"``: every 4-bit Linear) become ``QLoRALinear``s with an adapter
whose B starts at zero; every other 4-bit Linear becomes a frozen ``QuantizedLinear`` on the
same storage, so the whole 4-bit base runs on our kernels either way and the model computes
what it computed before (tested on a tiny Llama: the logits equal
those of an exact-fp32 bitsandbytes forward). Under ``lora.disable_adapter(model)`` the layers
run the 4-bit base alone. Nothing else in the model changes (norms, embeddings, head stay as
transformers loaded them); call ``lora.upcast_norms(model)`` for the QLoRA norm recipe.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from nf4 import QuantizedTensor

from .config import ALL_LINEAR, LoRAConfig
from .qlinear import QLoRALinear
from .quantized_linear import QuantizedLinear
from .surgery import mark_only_lora_trainable
from .targets import find_targets, matches

__all__ = ["from_bnb", "bnb_4bit_linears"]

log = logging.getLogger("lora")


def _is_8bit_weight(w) -> bool:
    return hasattr(w, "SCB") or hasattr(w, "CB") or (isinstance(w, torch.Tensor) and w.dtype == torch.int8)


def _quant_state(module: nn.Module):
    """The weight's quant_state, or the module's copy (bitsandbytes keeps one there for FSDP,
    which can drop the attribute from the parameter)."""
    state = getattr(module.weight, "quant_state", None)
    return state if state is not None else getattr(module, "quant_state", None)


def bnb_4bit_linears(model: nn.Module) -> list[str]:
    """Names of the bitsandbytes 4-bit Linear modules of ``model``, in ``named_modules`` order."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not isinstance(m, QLoRALinear) and _quant_state(m) is not None]


def _targets(model: nn.Module, config: LoRAConfig, names: list[str]) -> set[str]:
    """The 4-bit Linears (of ``names``) that get an adapter."""
    if config.target_modules == ALL_LINEAR:  # bitsandbytes leaves the output layer 16-bit already
        found = {n for n in names if not matches(config.exclude_modules, n)}
        if not found:
            raise ValueError(f"exclude_modules={config.exclude_modules!r} excludes every 4-bit Linear")
        return found
    found = find_targets(model, config)
    not4 = [n for n in found if n not in names]
    if not not4:
        return set(found)
    raise ValueError(f"from_bnb adapts bitsandbytes 4-bit Linears only; these targets are not: {not4} "
                     "(apply_lora(model, config, quantize=False) adapts 16-bit layers)")


def from_bnb(model: nn.Module, config: LoRAConfig | None = None) -> nn.Module:
    """Swap every bitsandbytes 4-bit Linear of ``model`` for one of ours on the same storage: a
    ``QLoRALinear`` where ``config`` targets it, a frozen ``QuantizedLinear`` elsewhere.

    Args:
        model: an ``nn.Module`` holding bitsandbytes 4-bit Linears, e.g. from
            ``transformers.AutoModelForCausalLM.from_pretrained(..., quantization_config=
            BitsAndBytesConfig(load_in_4bit=True, ...))``; changed in place.
        config: the adapter each layer gets (``r``, ``alpha``, ``dropout``, ``use_rslora``,
            ``init``, ``adapter_dtype``); default ``LoRAConfig()``. ``compute_dtype``, when set,
            overrides each layer's bitsandbytes ``compute_dtype``. The quantization fields are
            not used: the weights keep bitsandbytes' format (NF4 or FP4, nested or not, its
            blocksize). ``target_modules`` / ``exclude_modules`` choose the adapted layers
            (``"all-linear"``: every 4-bit Linear not excluded); each target must be a 4-bit Linear.

    Returns:
        ``model``, with only the adapters trainable (``mark_only_lora_trainable``).

    Raises:
        TypeError: ``model`` is not an nn.Module, ``config`` not a LoRAConfig, or the model holds
            8-bit (LLM.int8) Linears (named).
        ValueError: no 4-bit Linear found; target entries that match nothing, or match a layer
            that is not a bitsandbytes 4-bit Linear (named); a weight the kernels cannot read
            (``nf4.QuantizedTensor.from_bnb`` names the layer and field).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    config = LoRAConfig() if config is None else config
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a lora.LoRAConfig or None, got {type(config).__name__}")
    eight_bit = [name for name, m in model.named_modules()
                 if isinstance(m, nn.Linear) and _quant_state(m) is None and _is_8bit_weight(m.weight)]
    if eight_bit:
        raise TypeError(f"8-bit (LLM.int8) Linears cannot run on these 4-bit kernels: {eight_bit}")
    names = bnb_4bit_linears(model)
    if not names:
        raise ValueError(f"{type(model).__name__} has no bitsandbytes 4-bit Linear (a Linear whose weight has a "
                         "quant_state); load it with BitsAndBytesConfig(load_in_4bit=True) first")
    targets = _targets(model, config, names)
    # read every layer before changing any, so that a bad one leaves the model untouched
    quantized = {}
    for name in names:
        module = model.get_submodule(name)
        try:
            quantized[name] = QuantizedTensor.from_bnb(module.weight, _quant_state(module))
        except (TypeError, ValueError) as e:
            raise type(e)(f"{name}: {e}") from None
        if len(quantized[name].shape) != 2:
            raise ValueError(f"{name}: a Linear weight must be 2-D, its quant_state.shape is "
                             f"{tuple(quantized[name].shape)}")
    for name in names:
        parent, _, child = name.rpartition(".")
        old = model.get_submodule(name)
        compute = config.compute_dtype if config.compute_dtype is not None else getattr(old, "compute_dtype", None)
        if name in targets:
            layer = QLoRALinear(quantized[name], old.bias, r=config.r, alpha=config.alpha, dropout=config.dropout,
                                use_rslora=config.use_rslora, init=config.init, compute_dtype=compute,
                                adapter_dtype=config.adapter_dtype)
        else:
            layer = QuantizedLinear(quantized[name], old.bias, compute_dtype=compute)
        layer.train(old.training)
        setattr(model.get_submodule(parent), child, layer)
    mark_only_lora_trainable(model)
    log.info("from_bnb(%s): %d bitsandbytes 4-bit Linears now run on our kernels (storage shared), "
             "%d of them adapted", type(model).__name__, len(names), len(targets))
    return model
