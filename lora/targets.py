"""Which modules a ``LoRAConfig`` adapts (peft's matching rules, see ``lora.config``).

``"all-linear"`` means every ``nn.Linear`` except the model's output layer, as QLoRA recommends:

- a model with ``get_output_embeddings()`` (every Hugging Face model) excludes the module that
  method returns (the LM head, tied to the embeddings or not), exactly as peft does;
- any other model excludes its last ``nn.Linear`` in registration order, the output layer of a
  plain MLP / ``nn.Sequential``. Name the targets explicitly when that convention does not fit.
"""

from __future__ import annotations

import re

from torch import nn

from .config import ALL_LINEAR, LoRAConfig

__all__ = ["find_targets", "output_layer_name", "matches"]


def matches(spec, name: str) -> bool:
    """peft's rule: a string is a regex that must fullmatch ``name``; a list entry matches the
    full name or a dotted suffix of it."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == key or name.endswith("." + key) for key in spec)


def output_layer_name(model: nn.Module) -> str | None:
    """The name of the module ``"all-linear"`` leaves out (module docstring), or None."""
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        head = getter()
        if head is None:
            return None
        return next((n for n, m in model.named_modules() if m is head), None)
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    return last


def find_targets(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Names of the ``nn.Linear`` modules to adapt, in ``named_modules`` order.

    Raises:
        ValueError: when target names / the regex match nothing (listing each such entry), when
            a target matches a module that is not an ``nn.Linear``, or when nothing is left.
    """
    from .layers import LoRALayer

    named = [(n, m) for n, m in model.named_modules() if n]
    inside_lora = {f"{n}.{sub}" for n, m in named if isinstance(m, LoRALayer) for sub, _ in m.named_modules() if sub}
    named = [(n, m) for n, m in named if n not in inside_lora]
    excluded = {n for n, _ in named if matches(config.exclude_modules, n)}
    spec = config.target_modules

    if spec == ALL_LINEAR:
        head = output_layer_name(model)
        found = [n for n, m in named if isinstance(m, nn.Linear) and n != head and n not in excluded]
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
            if isinstance(m, nn.Linear):
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
