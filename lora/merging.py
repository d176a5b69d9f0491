"""Model-wide merge / unmerge / disable / unload, and the dense merged export for serving.

Merging folds each adapter into its base, ``W' = W + s·BA``. For a 4-bit base the sum must be
re-quantized (``W' = Q(dequant(W) + s·BA)``, ``requantize=True``), which adds a quantization
error of its own; ``merge`` measures it per layer,

    err = ||Q(M) - M||_F / ||M||_F,     M = dequant(W) + s·BA  (float32),

so that a user can see whether the adapter survived (compare ``err`` with ``||s·BA|| / ||M||``).
``requantize=False`` does the merge in 16-bit instead: the QLoRA layer becomes a merged
``LoRALinear`` on its dequantized base (dense, in the base's original dtype; ``err`` is then the
rounding to that dtype). ``merged_state_dict`` exports a dense model, every quantized weight
dequantized and every adapter folded in, without changing the model.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .layers import LoRALayer, LoRALinear
from .qlinear import QLoRALinear
from .quantized_linear import QuantizedLinear
from .surgery import _split, lora_layers

__all__ = ["merge", "unmerge", "disable_adapter", "unload", "merged_state_dict"]


def _require_layers(model: nn.Module) -> list[tuple[str, LoRALayer]]:
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers (call lora.apply_lora first)")
    return layers


def _dense_lora(layer: QLoRALinear) -> LoRALinear:
    """A ``LoRALinear`` on ``dequant(W)`` (original dtype) sharing the QLoRA layer's A, B, bias."""
    dense = LoRALinear(layer.base_weight(), layer.bias, r=layer.r, alpha=layer.alpha, dropout=layer.lora_dropout,
                       use_rslora=layer.use_rslora, adapter_dtype=layer.lora_A.dtype)
    dense.lora_A, dense.lora_B = layer.lora_A, layer.lora_B  # the same Parameters: optimizers keep them
    dense.train(layer.training)
    return dense


def merge(model: nn.Module, keep_base: bool | None = None, *, requantize: bool = True) -> dict[str, float]:
    """Merge every unmerged LoRA layer (``LoRALayer.merge``).

    Args:
        keep_base: keep each original base for an exact ``unmerge`` (default True).
        requantize: True: a QLoRA layer folds the update into its 4-bit base. False: it is
            replaced by a merged 16-bit ``LoRALinear`` on its dequantized base (module docstring).

    Returns:
        ``{layer name: relative error the merge added}`` for the layers merged now (module
        docstring; 16-bit layers report their rounding to the base dtype, 0.0 in float32).
    """
    errors = {}
    for name, layer in _require_layers(model):
        if layer.merged:
            continue
        if isinstance(layer, QLoRALinear) and not requantize:
            dense = _dense_lora(layer)
            parent, child = _split(name)
            setattr(model.get_submodule(parent), child, dense)
            layer = dense
        errors[name] = layer.merge(keep_base)
    return errors


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


def _unmerged_base(layer: LoRALayer, dtype: torch.dtype | None) -> torch.Tensor:
    if layer.merged:
        return (layer.base_weight(torch.float32) - layer.delta_weight()).to(dtype or layer.base_dtype)
    return layer.base_weight(dtype)


def unload(model: nn.Module, merge: bool = True, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every LoRA layer by a plain ``nn.Linear`` holding ``W + s·BA`` (``merge=True``)
    or ``W`` alone, dense in ``dtype`` (default: the base's dtype). Quantized bases are
    dequantized, not re-quantized. Returns the model."""
    for name, layer in _require_layers(model):
        w = layer.merged_weight(dtype) if merge else _unmerged_base(layer, dtype)
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


def merged_state_dict(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The model as a dense state dict for serving, the model left as it is.

    Every LoRA layer gives ``<name>.weight = W + s·BA`` (``merged_weight``: float32 sum of the
    dequantized base and the update, one rounding to ``dtype``) and ``<name>.bias``; every
    frozen ``QuantizedLinear`` gives ``dequant(W)``; every other floating tensor of
    ``model.state_dict()`` is cast to ``dtype`` (integer buffers stay as they are). The keys are
    the plain model's (no ``lora_A`` / ``lora_B`` / ``weight.absmax``...), so the dict loads into
    the original architecture. Tied weights keep one key each, as ``state_dict()`` does.

    Raises:
        ValueError: ``dtype`` is not a floating dtype.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    dense = {name: m for name, m in model.named_modules() if isinstance(m, (LoRALayer, QuantizedLinear))}
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        owner = key.rpartition(".")[0]
        while owner and owner not in dense:
            owner = owner.rpartition(".")[0]
        if owner not in dense:
            out[key] = t.detach().to(dtype) if t.is_floating_point() else t.detach()
            continue
        pre = f"{owner}." if owner else ""
        if pre + "weight" in out:
            continue  # this layer's other keys (bias, lora_A, absmax...): written already
        layer = dense[owner]
        w = layer.merged_weight(dtype) if isinstance(layer, LoRALayer) else layer.base_weight(dtype)
        out[pre + "weight"] = w
        if layer.bias is not None:
            out[pre + "bias"] = layer.bias.detach().to(dtype)
    return out
