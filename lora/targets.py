"""Which modules a ``LoRAConfig`` adapts (peft's matching rules, see ``lora.config``).

``"all-linear"`` means every ``nn.Linear`` except the model's output layer, as QLoRA recommends:

- a model with ``get_output_embeddings()`` (every Hugging Face model) excludes the module that
  method returns (the LM head, tied to the embeddings or not), exactly as peft does;
- any other model excludes its last ``nn.Linear`` in registration order, the output layer of a
  plain MLP / ``nn.Sequential``. Name the targets explicitly when that convention does not fit.

A frozen 4-bit ``QuantizedLinear`` (what ``lora.load_quantized`` and whole-model quantization
make of a Linear) counts as a linear layer everywhere here, as bitsandbytes' Linear4bit does for peft.

Whole-model quantization (``sixteen_bit_linears``) keeps three kinds of Linear in 16-bit, as
transformers + bitsandbytes do: the output layer above, any Linear whose weight Parameter is
also held by another module (a head tied to the input embedding: quantizing it would break the
tie), and ``skip_modules``.
"""

from __future__ import annotations

import re

from torch import nn

from .config import ALL_LINEAR, LoRAConfig

__all__ = ["find_targets", "output_layer_name", "matches", "is_linear", "linear_layers", "shared_weights",
           "sixteen_bit_linears"]


def matches(spec, name: str) -> bool:
    """peft's rule: a string is a regex that must fullmatch ``name``; a list entry matches the
    full name or a dotted suffix of it."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == key or name.endswith("." + key) for key in spec)


def is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a frozen 4-bit ``QuantizedLinear``, not yet adapted."""
    from .layers import LoRALayer
    from .quantized_linear import QuantizedLinear

    return isinstance(module, (nn.Linear, QuantizedLinear)) and not isinstance(module, LoRALayer)


def _outside_lora(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every named submodule that is not inside a LoRA layer."""
    from .layers import LoRALayer

    named = [(n, m) for n, m in model.named_modules() if n]
    inside_lora = {f"{n}.{sub}" for n, m in named if isinstance(m, LoRALayer) for sub, _ in m.named_modules() if sub}
    return [(n, m) for n, m in named if n not in inside_lora]


def linear_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every linear layer (``is_linear``) outside LoRA layers."""
    return [(n, m) for n, m in _outside_lora(model) if is_linear(m)]


def shared_weights(model: nn.Module, names: list[str]) -> dict[str, list[str]]:
    """name -> the other modules' parameters that are the same Parameter as ``<name>.weight``
    (ties that quantizing that weight would break)."""
    owners: dict[int, list[str]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{mname}.{pname}" if mname else pname)
    out = {}
    for name in names:
        w = getattr(model.get_submodule(name), "weight", None)
        if not isinstance(w, nn.Parameter):
            continue
        others = [o for o in owners.get(id(w), []) if o != f"{name}.weight"]
        if others:
            out[name] = others
    return out


def sixteen_bit_linears(model: nn.Module, config: LoRAConfig) -> dict[str, str]:
    """The ``nn.Linear`` layers whole-model quantization leaves 16-bit: name -> why
    (``"output layer"``, ``"tied to <param>"``, ``"skip_modules"``)."""
    linears = [n for n, m in linear_layers(model) if isinstance(m, nn.Linear)]
    head = output_layer_name(model)
    tied = shared_weights(model, linears)
    out = {}
    for name in linears:
        if name in tied:  # first: a tie must never break, output layer or not
            out[name] = f"tied to {tied[name][0]}"
        elif name == head:
            out[name] = "output layer"
        elif matches(config.skip_modules, name):
            out[name] = "skip_modules"
    return out


def output_layer_name(model: nn.Module) -> str | None:
    """The name of the module ``"all-linear"`` leaves out (module docstring), or None."""
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        head = getter()
        if head is None:
            return None
        return next((n for n, m in model.named_modules() if m is head), None)
    last = None
    for name, _ in linear_layers(model):
        last = name
    return last


def find_targets(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Names of the linear layers (``nn.Linear`` or ``QuantizedLinear``) to adapt, in
    ``named_modules`` order.

    Raises:
        ValueError: when target names / the regex match nothing (listing each such entry), when
            a target matches a module that is not a linear layer, or when nothing is left.
    """
    from .layers import LoRALayer

    named = _outside_lora(model)
    excluded = {n for n, _ in named if matches(config.exclude_modules, n)}
    spec = config.target_modules

    if spec == ALL_LINEAR:
        head = output_layer_name(model)
        found = [n for n, m in named if is_linear(m) and n != head and n not in excluded]
        if not found:
            adapted = [n for n, m in named if isinstance(m, LoRALayer)]
            why = f" (it already has {len(adapted)} LoRA layers)" if adapted else ""
            raise ValueError(f"target_modules='all-linear' found no nn.Linear to adapt in "
                             f"{type(model).__name__}{why}; output layer excluded: {head!r}")
        return found

    entries = [spec] if isinstance(spec, str) else list(spec)
    unmatched, wrong_type, found = [], [], []
    for entry in entries:
        hits = [(n, m) for n, m in named if matches(entry if isinstance(spec, str) else (entry,), n)]
        if not hits:
            unmatched.append(entry)
        for n, m in hits:
            if n in excluded:
                continue
            if is_linear(m):
                found.append(n)
            else:
                wrong_type.append(f"{n} ({type(m).__name__})")
    if unmatched:
        raise ValueError(f"target_modules entries matched no module of {type(model).__name__}: {unmatched}")
    if wrong_type:
        raise ValueError(f"target_modules matched modules that are not nn.Linear (only nn.Linear can be adapted): "
                         f"{wrong_type}")
    if not found:
        raise ValueError(f"target_modules {spec!r} matched only excluded modules ({sorted(excluded)})")
    order = {n: i for i, (n, _) in enumerate(named)}
    return sorted(set(found), key=order.__getitem__)
