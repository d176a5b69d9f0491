"""``LoRAConfig``: what to adapt, with which rank and scale, and how to quantize the base.

LoRA (Hu et al. 2021) replaces a frozen linear map ``y = x W^T + b`` by

    y = x W^T + b + s * (dropout(x) A^T) B^T,      A: [r, K], B: [N, r]

with ``s = alpha / r`` (LoRA) or ``s = alpha / sqrt(r)`` (rsLoRA, Kalajdzievski 2023, which keeps
the update's scale independent of r). QLoRA (Dettmers et al. 2023) stores W in 4-bit NF4 with
double-quantized absmax constants and adapts every linear layer except the output head.

Target selection follows peft's rules, so a config means the same thing here and there:

- ``"all-linear"``: every ``nn.Linear`` except the model's output layer (``lora.targets``);
- a list of strings: a module whose full name equals an entry, or ends in ``"." + entry``;
- any other string: a regular expression that must ``re.fullmatch`` the full module name.

``exclude_modules`` uses the same list / regex rules and wins over ``target_modules``.

Quantization (``apply_lora(..., quantize=True)``) covers the whole model, as QLoRA does: every
``nn.Linear`` becomes 4-bit (an adapter on the targets, a frozen ``QuantizedLinear`` elsewhere)
except the output head, any Linear whose weight is tied to another module (an embedding), and
``skip_modules`` (same list / regex rules; transformers' ``llm_int8_skip_modules``).
``quantize_targets_only=True`` quantizes the targets alone.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from nf4.blockwise import BLOCKSIZES

__all__ = ["LoRAConfig", "ALL_LINEAR", "INITS", "QUANT_TYPES", "COMPUTE_DTYPES"]

ALL_LINEAR = "all-linear"
INITS = ("kaiming", "gaussian")
QUANT_TYPES = ("nf4", "fp4", "int4")  # int4 (uniform) is ours only: bitsandbytes cannot store it, saving refuses it
COMPUTE_DTYPES = (None, torch.float32, torch.float16, torch.bfloat16)
ADAPTER_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_targets(value, name: str, allow_none: bool):
    """A regex string or a non-empty tuple of non-empty names; returns the normalized value."""
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        if value == "":
            raise ValueError(f"{name} must not be an empty string")
        if value.lower() == ALL_LINEAR:
            if name != "target_modules":
                raise ValueError(f"{name} cannot be {ALL_LINEAR!r}")
            return ALL_LINEAR
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"{name} regex {value!r} does not compile: {e}") from None
        return value
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
        bad = [v for v in items if not isinstance(v, str) or not v]
        if bad or not items:
            raise ValueError(f"{name} must be a regex string or a non-empty list of non-empty names, got {value!r}")
        return tuple(items)
    raise TypeError(f"{name} must be a string or a list of strings, got {type(value).__name__}: {value!r}")


@dataclass
class LoRAConfig:
    """Validated LoRA / QLoRA settings.

    Attributes:
        r: adapter rank, >= 1.
        alpha: scale numerator; the update is multiplied by ``alpha / r`` (or ``alpha / sqrt(r)``).
        dropout: dropout probability on the adapter input, in [0, 1).
        target_modules: ``"all-linear"``, a list of names / suffixes, or a regex (module docstring).
        exclude_modules: modules never adapted (same forms, no ``"all-linear"``), or None.
        use_rslora: scale by ``alpha / sqrt(r)`` instead of ``alpha / r``.
        init: ``"kaiming"`` (A ~ Kaiming-uniform with a = sqrt(5), as nn.Linear and the LoRA paper)
            or ``"gaussian"`` (A ~ N(0, 1/r^2), peft's choice); B = 0 either way, so a fresh
            adapter leaves the model's output unchanged.
        quant_type: ``"nf4"`` (QLoRA) or ``"fp4"``, for ``apply_lora(..., quantize=True)``.
        skip_modules: Linear layers ``apply_lora(..., quantize=True)`` leaves 16-bit (same list /
            regex rules as ``exclude_modules``), or None. Skipped targets get a 16-bit ``LoRALinear``.
            (The output layer stays 16-bit unless it is named as a target.)
        quantize_targets_only: quantize the targets only and leave every other Linear 16-bit
            (the behaviour before whole-model quantization); default False.
        blocksize: elements per absmax block (a power of two in [32, 4096]; QLoRA uses 64).
        double_quant: quantize the absmax constants too (QLoRA's double quantization).
        compute_dtype: dtype the quantized layer computes in (the input is cast to it and the
            output cast back to the input's dtype); None computes in the input's dtype.
        adapter_dtype: dtype of A and B (float32 by default: adapters are tiny and the
            optimizer benefits from full-precision weights).

    Raises:
        ValueError / TypeError naming the bad field and value.
    """

    r: int = 16
    alpha: float = 32
    dropout: float = 0.05
    target_modules: str | Sequence[str] = ALL_LINEAR
    exclude_modules: str | Sequence[str] | None = None
    use_rslora: bool = False
    init: str = "kaiming"
    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: torch.dtype | None = None
    adapter_dtype: torch.dtype = field(default=torch.float32)
    skip_modules: str | Sequence[str] | None = None
    quantize_targets_only: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a positive int, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) \
                or self.alpha <= 0:
            raise ValueError(f"alpha must be a positive finite number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        self.target_modules = _check_targets(self.target_modules, "target_modules", allow_none=False)
        self.exclude_modules = _check_targets(self.exclude_modules, "exclude_modules", allow_none=True)
        self.skip_modules = _check_targets(self.skip_modules, "skip_modules", allow_none=True)
        for flag in ("use_rslora", "double_quant", "quantize_targets_only"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be a bool, got {getattr(self, flag)!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {self.quant_type!r}")
        if isinstance(self.blocksize, bool) or self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be a power of two in [32, 4096], got {self.blocksize!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise ValueError(f"adapter_dtype must be one of {ADAPTER_DTYPES}, got {self.adapter_dtype!r}")

    @property
    def scale(self) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        return lora_scale(self.r, self.alpha, self.use_rslora)

    def to_dict(self) -> dict:
        """A JSON-friendly dict (dtypes as their names)."""
        d = asdict(self)
        for k in ("compute_dtype", "adapter_dtype"):
            d[k] = None if d[k] is None else str(d[k]).removeprefix("torch.")
        if isinstance(d["target_modules"], tuple):
            d["target_modules"] = list(d["target_modules"])
        for k in ("exclude_modules", "skip_modules"):
            if isinstance(d[k], tuple):
                d[k] = list(d[k])
        return d


def lora_scale(r: int, alpha: float, use_rslora: bool) -> float:
    """The factor s in ``y = x W^T + s (x A^T) B^T``."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be a positive int, got {r!r}")
    return float(alpha) / (math.sqrt(r) if use_rslora else r)
