"""Model surgery: put LoRA / QLoRA layers into any ``nn.Module``, and the model-wide helpers.

``apply_lora`` replaces each target ``nn.Linear`` (and, for QLoRA, every other Linear but the
output layer, tied weights and ``skip_modules``: ``lora.targets``) in place, one at a time: the
layer is (optionally) moved to ``device``, quantized in bounded chunks, swapped into its parent,
and the 16-bit weight is released before the next layer. So the extra memory at any moment is one
layer's 16-bit weight plus its quantized copy and the chunk temporaries, and the model ends at
its quantized size. With ``device`` (e.g. a model loaded on the CPU, quantized onto a GPU) the
device peak is the final model plus one 16-bit layer.

The QLoRA recipe is applied around it: every base parameter is frozen, only A and B train,
and normalization layers keep float32 parameters and compute in float32 (their output is
cast back to the input's dtype).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from .config import LoRAConfig
from .layers import LoRALayer, LoRALinear
from .qlinear import QUANT_BUFFERS, QLoRALinear
from .quantized_linear import QuantizedLinear
from .targets import find_targets, linear_layers, shared_weights, sixteen_bit_linears

__all__ = [
    "apply_lora", "lora_layers", "adapter_parameters", "mark_only_lora_trainable", "TrainableReport",
    "trainable_report", "upcast_norms", "is_norm",
]

log = logging.getLogger("lora")
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase, nn.LocalResponseNorm)


def _split(name: str) -> tuple[str, str]:
    parent, _, child = name.rpartition(".")
    return parent, child


def _plan(model: nn.Module, config: LoRAConfig, quantize: bool) -> tuple[dict[str, type], list[str]]:
    """What ``apply_lora`` does: ``({target: layer class}, [Linears to freeze in 4-bit])``,
    both in ``named_modules`` order (module docstring of ``lora.config`` for the rules)."""
    targets = find_targets(model, config)
    kind = {}
    for name in targets:  # an already 4-bit base can only take a QLoRA adapter
        kind[name] = QLoRALinear if quantize or isinstance(model.get_submodule(name), QuantizedLinear) else LoRALinear
    if not quantize:
        return kind, []
    if config.quantize_targets_only:
        linear_targets = [n for n in targets if isinstance(model.get_submodule(n), nn.Linear)]
        tied = shared_weights(model, linear_targets)
        if tied:
            raise ValueError(f"cannot quantize weights shared with other modules (the tie would break): {tied}; "
                             f"exclude these targets or use quantize=False")
        return kind, []
    keep16 = sixteen_bit_linears(model, config)
    for name in targets:  # a target named explicitly is quantized even if it is the output layer
        if keep16.get(name, "output layer") != "output layer":
            kind[name] = LoRALinear
    frozen = [n for n, m in linear_layers(model)
              if n not in kind and n not in keep16 and isinstance(m, nn.Linear)]
    if keep16:
        log.info("apply_lora: Linear layers kept 16-bit: %s", keep16)
    return kind, frozen


def apply_lora(model: nn.Module, config: LoRAConfig, quantize: bool = True, *,
               device: torch.device | str | None = None, upcast_norms_to_fp32: bool = True) -> nn.Module:
    """Adapt ``model`` in place and return it.

    With ``quantize=True`` (QLoRA) the whole base goes 4-bit: each target becomes a
    ``QLoRALinear`` and every other ``nn.Linear`` a frozen ``QuantizedLinear``, except the
    output layer, Linears whose weight is tied to another module, and ``config.skip_modules``:
    those stay 16-bit, and a target among the last two gets a 16-bit ``LoRALinear`` (an output
    layer named as a target explicitly is quantized, as before whole-model quantization).
    ``config.quantize_targets_only`` quantizes the targets alone. A target that is already a
    ``QuantizedLinear`` (``lora.load_quantized``) keeps its 4-bit base as is.

    Args:
        model: any ``nn.Module``.
        config: a ``LoRAConfig`` (targets, rank, scale, quantization settings).
        quantize: True for QLoRA, False for 16-bit LoRA (``LoRALinear``, the base reused as
            is; a target that is already 4-bit still gets a ``QLoRALinear``).
        device: move the model there, layer by layer (Linears are quantized on it); None
            leaves every module where it is.
        upcast_norms_to_fp32: the QLoRA recipe for normalization layers (``upcast_norms``).

    Raises:
        TypeError: ``model`` is not an nn.Module or ``config`` not a LoRAConfig.
        ValueError: target entries that matched nothing (listed), non-Linear matches, or (with
            ``quantize_targets_only``) a target whose weight is shared with another module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, LoRAConfig):
        raise TypeError(f"config must be a lora.LoRAConfig, got {type(config).__name__}")
    kind, frozen = _plan(model, config, quantize)
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    for p in model.parameters():
        p.requires_grad_(False)
    for name in sorted([*kind, *frozen], key=order.__getitem__):
        parent_name, child = _split(name)
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        if device is not None:
            linear.to(device)
        if name in kind:
            layer = kind[name].from_linear(linear, config)
        else:
            layer = QuantizedLinear.from_linear(linear, config.quant_type, config.blocksize, config.double_quant,
                                                config.compute_dtype)
        setattr(parent, child, layer)
        del linear, layer  # the 16-bit weight goes now, before the next layer is quantized
    if device is not None:
        model.to(device)  # the rest (embeddings, norms, LoRA layers: already there)
    if upcast_norms_to_fp32:
        upcast_norms(model)
    mark_only_lora_trainable(model)
    if frozen:
        log.info("apply_lora: %d more Linear layers frozen in 4-bit (no adapter)", len(frozen))
    log.info("apply_lora(%s, quantize=%s): %d layers adapted; %s", type(model).__name__, quantize, len(kind),
             trainable_report(model))
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
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    # the quantized base counts as its logical [N, K] weights, whether it sits in buffers or
    # (under FSDP2, see lora.fsdp) in frozen storage parameters, which must not count again
    storage = {id(t) for layer in quantized
               for name in QUANT_BUFFERS if isinstance(t := getattr(layer, name, None), torch.Tensor)}
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen or id(p) in storage:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    total += sum(layer.num_weights for layer in quantized)
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
