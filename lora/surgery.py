"""Model surgery: put LoRA / QLoRA layers into any ``nn.Module``, and the model-wide helpers.

``apply_lora`` replaces each target ``nn.Linear`` in place, one at a time: the layer is
(optionally) moved to ``device``, quantized in bounded chunks, swapped into its parent, and the
16-bit weight is released before the next layer. So the extra memory at any moment is one
layer's 16-bit weight plus its quantized copy and the chunk temporaries, and the model ends at
its quantized size. With ``device`` (e.g. a model loaded on the CPU, quantized onto a GPU) the
device peak is the final model plus one 16-bit layer.

The QLoRA recipe is applied around it: every base parameter is frozen, only A and B train,
and normalization layers keep float32 parameters and compute in float32 (their output is
cast back to the input's dtype).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .config import LoRAConfig
from .layers import LoRALayer, LoRALinear
from .qlinear import QUANT_BUFFERS, QLoRALinear
from .targets import find_targets

__all__ = [
    "apply_lora", "lora_layers", "adapter_parameters", "mark_only_lora_trainable", "TrainableReport",
    "trainable_report", "merge", "unmerge", "disable_adapter", "unload", "upcast_norms", "is_norm",
]

log = logging.getLogger("lora")
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm)


def _split(name: str) -> tuple[str, str]:
    parent, _, child = name.rpartition(".")
    return parent, child


def _shared_weights(model: nn.Module, targets: list[str]) -> dict[str, list[str]]:
    """target -> other modules that hold the same weight Parameter (ties that quantizing breaks)."""
    owners: dict[int, list[str]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
    out = {}
    for name in targets:
        w = model.get_submodule(name).weight
        others = [o for o in owners.get(id(w), []) if o != f"{name}.weight"]
        if others:
            out[name] = others
    return out


def apply_lora(model: nn.Module, config: LoRAConfig, quantize: bool = True, *,
               device: torch.device | str | None = None, upcast_norms_to_fp32: bool = True) -> nn.Module:
    """Adapt ``model`` in place and return it.

    Args:
        model: any ``nn.Module``.
        config: a ``LoRAConfig`` (targets, rank, scale, quantization settings).
        quantize: True for QLoRA (``QLoRALinear``, a 4-bit base), False for 16-bit LoRA
            (``LoRALinear``, the base reused as is).
        device: move the model there, layer by layer (targets are quantized on it); None
            leaves every module where it is.
        upcast_norms_to_fp32: the QLoRA recipe for normalization layers (``upcast_norms``).

    Raises:
        TypeError: ``model`` is not an nn.Module or ``config`` not a LoRAConfig.
        ValueError: target entries that matched nothing (listed), non-Linear matches, or a
            quantized target whose weight is shared with another module (a tie would break).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a lora.LoRAConfig, got {type(config).__name__}")
    targets = find_targets(model, config)
    if quantize:
        tied = _shared_weights(model, targets)
        if tied:
            raise ValueError(f"cannot quantize weights shared with other modules (the tie would break): {tied}; "
                             f"exclude these targets or use quantize=False")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in targets:
        parent_name, child = _split(name)
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        if device is not None:
            linear.to(device)
        layer = (QLoRALinear if quantize else LoRALinear).from_linear(linear, config)
        setattr(parent, child, layer)
        del linear, layer  # the 16-bit weight goes now, before the next layer is quantized
    if device is not None:
        model.to(device)  # the rest (embeddings, norms, LoRA layers: already there)
    if upcast_norms_to_fp32:
        upcast_norms(model)
    mark_only_lora_trainable(model)
    log.info("apply_lora(%s, quantize=%s): %d layers adapted; %s", type(model).__name__, quantize,
             len(targets), trainable_report(model))
    return model


# ---- traversal and trainability ---------------------------------------------------------------
def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALayer]]:
    """``(name, layer)`` for every LoRA layer of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer):
            yield name, module


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter weights, ``{"<layer>.lora_A": A, "<layer>.lora_B": B, ...}`` (for optimizers)."""
    out = {}
    for name, layer in lora_layers(model):
        pre = f"{name}." if name else ""
        out[pre + "lora_A"], out[pre + "lora_B"] = layer.lora_A, layer.lora_B
    return out


def mark_only_lora_trainable(model: nn.Module) -> None:
    """requires_grad = True for every A and B, False for every other parameter."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in adapter_parameters(model).values():
        p.requires_grad_(True)


@dataclass(frozen=True)
class TrainableReport:
    """Parameter counts; a quantized weight counts its logical elements (N*K), not its bytes."""

    trainable: int
    total: int
    adapter_layers: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                f"trainable%: {self.percent:.4f} ({self.adapter_layers} LoRA layers)")


def trainable_report(model: nn.Module) -> TrainableReport:
    """Count trainable and all parameters (``str()`` of the result is peft's one-liner)."""
    layers = list(lora_layers(model))
    # the quantized base counts as its logical [N, K] weights, whether it sits in buffers or
    # (under FSDP2, see lora.fsdp) in frozen storage parameters, which must not count again
    storage = {id(t) for _, layer in layers if isinstance(layer, QLoRALinear)
               for name in QUANT_BUFFERS if isinstance(t := getattr(layer, name, None), torch.Tensor)}
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen or id(p) in storage:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    for _, layer in layers:
        if isinstance(layer, QLoRALinear):
            total += math.prod(layer._qshape)
    return TrainableReport(trainable, total, len(layers))


# ---- norms -------------------------------------------------------------------------------------
def is_norm(module: nn.Module) -> bool:
    """Normalization layers: torch's, and any leaf module whose class name ends in 'Norm'
    (LlamaRMSNorm, T5LayerNorm...). Leaves only: a 'PreNorm(fn)' wrapper is not a norm."""
    if isinstance(module, _NORM_TYPES):
        return True
    return type(module).__name__.lower().endswith("norm") and next(module.children(), None) is None


def _norm_pre_hook(module, args, kwargs):
    for p in module.parameters(recurse=False):  # sticky: a later model.half() does not undo it
        if p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
    dtypes = [a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
    module._lora_norm_in_dtype = dtypes[0] if dtypes else None
    up = lambda a: a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
    return tuple(up(a) for a in args), kwargs


def _norm_post_hook(module, args, kwargs, output):
    dtype = getattr(module, "_lora_norm_in_dtype", None)
    if dtype is None or dtype == torch.float32 or not isinstance(output, torch.Tensor):
        return output
    return output.to(dtype)


def upcast_norms(model: nn.Module) -> list[str]:
    """Float32 parameters for every normalization layer, computed in float32 (inputs upcast,
    the output cast back to the input's dtype). The hooks re-upcast parameters that a later
    ``model.half()`` / ``.to(bfloat16)`` cast down. Idempotent; returns the names touched."""
    names = []
    for name, module in model.named_modules():
        if not is_norm(module):
            continue
        for p in module.parameters(recurse=False):
            if p.is_floating_point() and p.dtype != torch.float32:
                p.data = p.data.float()
        if not getattr(module, "_lora_norm_hooks", False):
            module.register_forward_pre_hook(_norm_pre_hook, with_kwargs=True)
            module.register_forward_hook(_norm_post_hook, with_kwargs=True)
            module._lora_norm_hooks = True
        names.append(name)
    return names


# ---- merge / unmerge / disable / unload ----------------------------------------------------------
def _require_layers(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers (call lora.apply_lora first)")
    return layers


def merge(model: nn.Module, keep_base: bool | None = None) -> nn.Module:
    """Merge every unmerged LoRA layer (``LoRALayer.merge``); returns the model."""
    for _, layer in _require_layers(model):
        if not layer.merged:
            layer.merge(keep_base)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Unmerge every merged LoRA layer; returns the model."""
    for _, layer in _require_layers(model):
        if layer.merged:
            layer.unmerge()
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """Run the base model: every LoRA layer's adapter is off inside the block."""
    with contextlib.ExitStack() as stack:
        for _, layer in _require_layers(model):
            stack.enter_context(layer.disable_adapter())
        yield model


def unload(model: nn.Module, merge: bool = True, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every LoRA layer by a plain ``nn.Linear`` holding ``W + s·BA`` (``merge=True``)
    or ``W`` alone, dense in ``dtype`` (default: the base's dtype). Quantized bases are
    dequantized, not re-quantized. Returns the model."""
    for name, layer in _require_layers(model):
        if merge:
            w = layer.merged_weight(dtype)
        elif layer.merged:
            w = (layer.base_weight(torch.float32) - layer.delta_weight()).to(dtype or layer.base_dtype)
        else:
            w = layer.base_weight(dtype)
        lin = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                        device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if layer.bias is not None:
                lin.bias.copy_(layer.bias)
        lin.requires_grad_(False)
        parent, child = _split(name)
        setattr(model.get_submodule(parent), child, lin)
    return model
