"""Where every op decides how it runs: the one dispatch rule of the package.

    CUDA tensor                        -> the Triton kernels
    CPU tensor, TRITON_INTERPRET=1     -> the Triton kernels, run by the interpreter (CI)
    CPU tensor otherwise               -> the plain-PyTorch reference (``kernels.reference``)
    float64 tensors, any device        -> the reference (float64 exists for gradcheck)
    anything else (mps, xpu, ...)      -> ValueError naming the device

Two overrides exist for tests and benchmarks, both scoped context managers:
``force_backend("reference" | "triton")`` and ``force_regime(...)`` (see ``kernels.matmul``).
Nothing here touches CUDA: the decision reads ``tensor.device.type`` only.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch

__all__ = ["interpreting", "use_triton", "check_device", "force_backend", "BACKENDS", "forced_regime",
           "force_regime", "REGIMES"]

BACKENDS = ("auto", "reference", "triton")
REGIMES = ("auto", "gemv", "gemm", "dequant_gemm")
SUPPORTED_DEVICES = ("cpu", "cuda")

_state = threading.local()


# Read once, like Triton itself: TRITON_INTERPRET must be set before the kernels are defined.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    return _INTERPRET


def check_device(t: torch.Tensor, name: str = "input") -> None:
    """Raise ``ValueError`` naming the device when ``t`` is on one we have no path for."""
    if t.device.type not in SUPPORTED_DEVICES:
        raise ValueError(f"{name} is on unsupported device {t.device}; kernels support {SUPPORTED_DEVICES}")


def use_triton(t: torch.Tensor) -> bool:
    """The dispatch rule (module docstring), honouring ``force_backend``."""
    check_device(t)
    forced = getattr(_state, "backend", "auto")
    if forced == "reference" or t.dtype == torch.float64:
        return False
    if forced == "triton":
        if t.device.type == "cpu" and not interpreting():
            raise ValueError("force_backend('triton') on CPU tensors needs TRITON_INTERPRET=1 set before import")
        return True
    return t.device.type == "cuda" or interpreting()


@contextlib.contextmanager
def _forced(attr: str, name: str, allowed: tuple[str, ...]):
    """Set a thread-local override for the block, restoring the previous one after."""
    if name not in allowed:
        raise ValueError(f"{attr} must be one of {allowed}, got {name!r}")
    old = getattr(_state, attr, "auto")
    setattr(_state, attr, name)
    try:
        yield
    finally:
        setattr(_state, attr, old)


def force_backend(name: str):
    """Run the ops in this block on ``name`` ('auto', 'reference' or 'triton')."""
    return _forced("backend", name, BACKENDS)


def forced_regime() -> str:
    """The matmul regime forced by ``force_regime`` ('auto' when none)."""
    return getattr(_state, "regime", "auto")


def force_regime(name: str):
    """Force the Triton matmul regime: 'gemv' (split-K, small M), 'gemm' (in-loop dequant)
    or 'dequant_gemm' (dequantize once into a buffer, then GEMM). 'auto' picks by M."""
    return _forced("regime", name, REGIMES)
