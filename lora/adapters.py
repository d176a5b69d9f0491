"""Adapters on disk in peft's layout, so peft and this package read each other's files.

A directory holds

    adapter_model.safetensors   base_model.model.<module path>.lora_A.weight   [r, in]
                                base_model.model.<module path>.lora_B.weight   [out, r]
    adapter_config.json         {"peft_type": "LORA", "r": .., "lora_alpha": .., "lora_dropout": ..,
                                 "use_rslora": .., "target_modules": [<module paths>],
                                 "rank_pattern": {}, "alpha_pattern": {}, "bias": "none", ...}

``<module path>`` is the layer's name in the model given to ``apply_lora`` (peft's base model).
Layers whose rank or alpha differ from the common value go to ``rank_pattern`` /
``alpha_pattern`` (keys are escaped full paths, matched with peft's rule
``re.match(rf"(.*\\.)?({key})$", path)``). Loading validates everything before changing the
model: a missing key, an extra key, a shape or rank mismatch raises ``ValueError`` naming it.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter

import torch
from torch import nn

from nf4.storage import read_safetensors_header

from .config import LoRAConfig
from .surgery import lora_layers

__all__ = ["save_adapter", "load_adapter", "load_adapter_config", "peft_key", "WEIGHTS_NAME", "CONFIG_NAME"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
# peft features an adapter file may use that these layers cannot represent: field -> allowed values
_UNSUPPORTED = {
    "use_dora": (False, None), "fan_in_fan_out": (False, None), "bias": ("none", None),
    "lora_bias": (False, None), "modules_to_save": (None, []), "layer_replication": (None, []),
    "trainable_token_indices": (None, {}, []), "target_parameters": (None, []), "use_qalora": (False, None),
}


def peft_key(module_name: str, which: str) -> str:
    """``base_model.model.<module_name>.lora_A.weight`` (``which`` is 'A' or 'B')."""
    return f"{PEFT_PREFIX}{module_name}.lora_{which}.weight"


def _paths(path: str | os.PathLike) -> tuple[str, str]:
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        return path, os.path.join(os.path.dirname(path) or ".", CONFIG_NAME)
    return os.path.join(path, WEIGHTS_NAME), os.path.join(path, CONFIG_NAME)


def _layers(model: nn.Module):
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers (apply lora.apply_lora first; "
                         f"lora.load_adapter_config(path) gives the matching LoRAConfig)")
    return layers


def save_adapter(model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None) -> None:
    """Write the adapters of ``model`` to the directory ``path`` (created if needed).

    Raises:
        ValueError: no LoRA layers, a merged layer (its A/B are folded into the base, save
            before merging), or layers that differ in dropout / rsLoRA (peft has one value).
    """
    layers = _layers(model)
    merged = [n for n, layer in layers if layer.merged]
    if merged:
        raise ValueError(f"cannot save merged layers {merged}: unmerge() first")
    sharded = [n for n, layer in layers if type(layer.lora_A).__name__ == "DTensor"
               or type(getattr(layer.lora_A, "data", None)).__name__ == "DTensor"]
    if sharded:
        raise ValueError(f"adapters of {sharded[:3]}{'...' if len(sharded) > 3 else ''} are FSDP2-sharded "
                         "(DTensor): use lora.fsdp_checkpoint.save_adapter_consolidated(model, path)")
    for attr in ("lora_dropout", "use_rslora"):
        values = {getattr(layer, attr) for _, layer in layers}
        if len(values) > 1:
            raise ValueError(f"peft's format has one {attr} per adapter; these layers differ: {sorted(values)}")
    r = Counter(layer.r for _, layer in layers).most_common(1)[0][0]
    alpha = Counter(layer.alpha for _, layer in layers).most_common(1)[0][0]
    first = layers[0][1]
    config = {
        "peft_type": "LORA", "task_type": None,
        "base_model_name_or_path": base_model_name_or_path or getattr(model, "name_or_path", None) or None,
        "r": r, "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": first.lora_dropout, "use_rslora": first.use_rslora,
        "target_modules": [n for n, _ in layers], "exclude_modules": None,
        "rank_pattern": {re.escape(n): layer.r for n, layer in layers if layer.r != r},
        "alpha_pattern": {re.escape(n): layer.alpha for n, layer in layers if layer.alpha != alpha},
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "use_dora": False, "lora_bias": False, "revision": None,
    }
    tensors = {}
    for name, layer in layers:
        tensors[peft_key(name, "A")] = layer.lora_A.detach().cpu().contiguous().clone()
        tensors[peft_key(name, "B")] = layer.lora_B.detach().cpu().contiguous().clone()
    from safetensors.torch import save_file

    weights_path, config_path = _paths(path)
    os.makedirs(os.path.dirname(weights_path) or ".", exist_ok=True)
    save_file(tensors, weights_path, metadata={"format": "pt"})
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _read_config(config_path: str) -> dict:
    if not os.path.exists(config_path):
        raise ValueError(f"no {CONFIG_NAME} at {config_path!r}")
    try:
        with open(config_path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path!r}: malformed JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{config_path!r}: expected a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_path!r}: peft_type must be 'LORA', got {cfg.get('peft_type')!r}")
    for key, allowed in _UNSUPPORTED.items():
        if key in cfg and cfg[key] not in allowed:
            raise ValueError(f"{config_path!r}: {key}={cfg[key]!r} is not supported (only {allowed[0]!r})")
    for key in ("r", "lora_alpha"):
        if key not in cfg:
            raise ValueError(f"{config_path!r}: missing field {key!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise ValueError(f"{config_path!r}: {key} must be an object, got {cfg[key]!r}")
    try:  # the same rules as LoRAConfig, for the main values and every per-module override
        LoRAConfig(r=cfg["r"], alpha=cfg["lora_alpha"], dropout=cfg.get("lora_dropout", 0.0),
                   use_rslora=cfg.get("use_rslora", False))
        for r in (cfg.get("rank_pattern") or {}).values():
            LoRAConfig(r=r)
        for alpha in (cfg.get("alpha_pattern") or {}).values():
            LoRAConfig(alpha=alpha)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_path!r}: {e}") from None
    return cfg


def _pattern(patterns: dict, name: str, default):
    """peft's per-module override: the first key with ``re.match(rf"(.*\\.)?({key})$", name)``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def load_adapter_config(path: str | os.PathLike, **overrides) -> LoRAConfig:
    """A ``LoRAConfig`` equivalent to a peft adapter's ``adapter_config.json`` (for
    ``apply_lora`` before ``load_adapter``); ``overrides`` set the quantization fields etc."""
    cfg = _read_config(_paths(path)[1])
    init = cfg.get("init_lora_weights", True)
    fields = dict(r=cfg["r"], alpha=cfg["lora_alpha"], dropout=cfg.get("lora_dropout", 0.0),
                  target_modules=cfg.get("target_modules"), exclude_modules=cfg.get("exclude_modules"),
                  use_rslora=bool(cfg.get("use_rslora", False)), init="gaussian" if init == "gaussian" else "kaiming")
    fields.update(overrides)
    return LoRAConfig(**fields)


def load_adapter(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a peft-layout adapter (ours or peft's) into the LoRA layers of ``model``.

    Sets every layer's A, B (cast to the layer's adapter dtype), alpha, rsLoRA rule and dropout.
    Nothing is changed unless every check passes.

    Raises:
        ValueError: missing file / field, unsupported peft feature, merged layers, and any key
            that is missing, extra, or of the wrong shape or rank (each named).
    """
    layers = _layers(model)
    weights_path, config_path = _paths(path)
    cfg = _read_config(config_path)
    if not os.path.exists(weights_path):
        raise ValueError(f"no adapter weights at {weights_path!r}")
    header = read_safetensors_header(weights_path)
    file_keys = {k for k in header if k != "__metadata__"}
    merged = [n for n, layer in layers if layer.merged]
    if merged:
        raise ValueError(f"cannot load into merged layers {merged}: unmerge() first")

    expected = {}
    for name, layer in layers:
        r_cfg = _pattern(cfg.get("rank_pattern"), name, cfg["r"])
        expected[peft_key(name, "A")] = (layer, "lora_A", (layer.r, layer.in_features), r_cfg)
        expected[peft_key(name, "B")] = (layer, "lora_B", (layer.out_features, layer.r), r_cfg)
    extra = sorted(file_keys - expected.keys())
    if extra:
        raise ValueError(f"{weights_path!r} has keys for modules that are not LoRA layers of "
                         f"{type(model).__name__}: {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    missing = sorted(expected.keys() - file_keys)
    if missing:
        raise ValueError(f"{weights_path!r} is missing keys: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    for key, (_, attr, shape, r_cfg) in expected.items():
        if header[key]["dtype"] not in ("F16", "BF16", "F32", "F64"):
            raise ValueError(f"{key!r} must be a float tensor, the file has dtype {header[key]['dtype']}")
        got = tuple(header[key]["shape"])
        rank_axis = 0 if attr == "lora_A" else 1
        if len(got) == 2 and got[rank_axis] != shape[rank_axis]:
            raise ValueError(f"rank mismatch for {key!r}: the file has rank {got[rank_axis]}, the layer has "
                             f"r={shape[rank_axis]} (shape {got} vs {shape})")
        if got != shape:
            raise ValueError(f"shape mismatch for {key!r}: the file has {got}, the layer expects {shape}")
        if r_cfg != shape[rank_axis]:
            raise ValueError(f"{config_path!r} says r={r_cfg} for {key!r}, but its tensor has rank {shape[rank_axis]}")

    from safetensors.torch import load_file

    tensors = load_file(weights_path)
    with torch.no_grad():
        for key, (layer, attr, _, _) in expected.items():
            param = getattr(layer, attr)
            param.copy_(tensors[key].to(device=param.device, dtype=param.dtype))
    for name, layer in layers:
        layer.alpha = float(_pattern(cfg.get("alpha_pattern"), name, cfg["lora_alpha"]))
        layer.use_rslora = bool(cfg.get("use_rslora", False))
        layer.lora_dropout = float(cfg.get("lora_dropout", 0.0))
    return model
