"""``save_quantized``: write a quantized model as transformers + bitsandbytes do.

    lora.save_quantized(model, "out/", max_shard_size="5GB")
    AutoModelForCausalLM.from_pretrained("out/")          # with bitsandbytes installed: the same model

The folder gets ``model.safetensors`` (or shards + ``model.safetensors.index.json``) and a
``config.json``: the model's own config (``model.config.to_dict()`` when it has one, as Hugging
Face models do) with a ``quantization_config`` block,

    {"quant_method": "bitsandbytes", "load_in_4bit": true, "bnb_4bit_quant_type": "nf4",
     "bnb_4bit_use_double_quant": true, "bnb_4bit_compute_dtype": "float32",
     "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": [<every 16-bit Linear>], ...}

Each 4-bit Linear is stored under bitsandbytes' keys (``weight`` packed uint8, ``weight.absmax``,
``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__nf4``): the very tensors the model holds, so a folder read by
``lora.load_quantized`` is written back byte for byte. ``llm_int8_skip_modules`` lists every
Linear left 16-bit by name, so transformers quantizes exactly the layers stored 4-bit.

Adapters are not written here (``lora.save_adapter``: peft's layout). A merged layer writes its
merged base (``lora.merge``: the re-quantized ``W + s·BA``), which is how a merged 4-bit model
is saved for serving. A tied weight is written once, under its first name (transformers re-ties it).
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from .checkpoint_files import CONFIG_NAME, write_shards
from .layers import LoRALayer
from .quantized_linear import BNB_QUANT_TYPES, QuantizedLinear
from .surgery import lora_layers

__all__ = ["save_quantized", "quantization_config"]

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _quantized_layers(model: nn.Module) -> list[tuple[str, QuantizedLinear]]:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no 4-bit layers: quantize it first "
                         f"(lora.apply_lora(model, cfg, quantize=True) or lora.load_quantized)")
    odd = [f"{n} ({m.quant_type})" for n, m in layers if m.quant_type not in BNB_QUANT_TYPES]
    if odd:
        raise ValueError(f"bitsandbytes' format stores only {BNB_QUANT_TYPES}; these layers use another format: "
                         f"{odd[:8]}")
    prepared = [n for n, m in layers if callable(getattr(m, "sharded_names", None))]
    if prepared:  # their state_dict is FSDP's storage layout (int32 bits), not bitsandbytes'
        raise ValueError(f"layers {prepared[:8]} are prepared for FSDP (lora.fsdp): save the quantized model from "
                         f"a single-process model that was not prepared")
    for attr in ("quant_type", "double_quant"):
        values = {getattr(m, attr) for _, m in layers}
        if len(values) > 1:
            raise ValueError(f"transformers' quantization_config has one {attr}; these layers differ: "
                             f"{sorted(f'{n}={getattr(m, attr)}' for n, m in layers)[:8]}")
    return layers


def quantization_config(model: nn.Module) -> dict:
    """The ``quantization_config`` block transformers + bitsandbytes read for ``model``."""
    layers = _quantized_layers(model)
    first = layers[0][1]
    compute = {m.compute_dtype for _, m in layers} - {None}
    compute_name = _DTYPE_NAMES.get(next(iter(compute)), "float32") if len(compute) == 1 else "float32"
    quantized = {n for n, _ in layers}
    skip = [n for n, m in model.named_modules()
            if n not in quantized and (isinstance(m, nn.Linear) or (isinstance(m, LoRALayer)))]
    return {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "_load_in_4bit": True, "_load_in_8bit": False,
        "bnb_4bit_quant_type": first.quant_type, "bnb_4bit_use_double_quant": first.double_quant,
        "bnb_4bit_compute_dtype": compute_name, "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": skip, "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }


def _state_groups(model: nn.Module, quantized: set[str]) -> list[dict[str, torch.Tensor]]:
    """``model.state_dict()`` without adapters and tied duplicates, one group per quantized
    weight (its keys stay in one shard) and one per other tensor, in module order."""
    adapter_keys = {f"{n}.{w}" if n else w for n, _ in lora_layers(model) for w in ("lora_A", "lora_B")}
    first_name: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first_name.setdefault(id(p), name)
    tied = {name for name, p in model.named_parameters(remove_duplicate=False) if first_name[id(p)] != name}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in model.state_dict().items():
        if key in adapter_keys or key in tied:
            continue
        owner, _, rest = key.partition(".weight")
        group = owner if owner in quantized and (rest == "" or rest.startswith(".")) else key
        groups.setdefault(group, {})[key] = t
    return list(groups.values())


def save_quantized(model: nn.Module, path: str | os.PathLike, max_shard_size: int | str = "5GB") -> list[str]:
    """Write ``model`` (its 4-bit base, no adapters) to the folder ``path`` in transformers +
    bitsandbytes' layout (module docstring). Returns the file names written.

    Args:
        model: a model with ``QuantizedLinear`` / ``QLoRALinear`` layers.
        path: the folder (created if needed; an older checkpoint's weight files are replaced).
        max_shard_size: bytes per shard, an int or a string such as ``"5GB"`` / ``"500MiB"``.

    Raises:
        ValueError: no 4-bit layer; a layer in a format bitsandbytes cannot store (anything but
            nf4 / fp4); layers that differ in quant_type or double quantization (transformers'
            config has one value); layers prepared for FSDP; a bad ``max_shard_size``.
    """
    qconfig = quantization_config(model)
    quantized = {n for n, _ in _quantized_layers(model)}
    groups = _state_groups(model, quantized)
    folder = os.fspath(path)
    names = write_shards(groups, folder, max_shard_size)
    getter = getattr(getattr(model, "config", None), "to_dict", None)
    config = dict(getter()) if callable(getter) else {}
    config["quantization_config"] = qconfig
    with open(os.path.join(folder, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True, default=str)
    return names + [CONFIG_NAME]
