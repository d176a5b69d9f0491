"""The one mechanism behind the CPU fast paths compiled with ``torch.compile``: nf4's code search
(``blockwise``) and dequantization (``_cpu_decode``), and kernels' AdamW (``kernels.adamw_cpu``).

    fn = compiled(registry, key, body, dynamic=...)   # built once per key; None: use the eager code
    if fn is not None and plain_eager(*tensors): fn(...)

``NF4_COMPILE=0`` turns every fast path off (read at each call); a compiler that cannot be
loaded leaves ``registry[key] = None`` for good, and so does a caller that sets it after a
failure at run time. ``plain_eager`` keeps the compiled kernels away from tracing (a
``torch.compile`` / export trace, a dispatch mode such as ``FakeTensorMode``, tensor subclasses):
inductor's C++ would read fake tensors' missing memory (a segfault), and the eager code is what
every tracer understands.
"""

from __future__ import annotations

import os

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

__all__ = ["compiled", "plain_eager"]

_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def plain_eager(*tensors: torch.Tensor) -> bool:
    """True outside any tracing, for plain CPU tensors (or parameters) only."""
    return (not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None
            and all(type(t) in _PLAIN_TYPES and t.device.type == "cpu" for t in tensors))


def compiled(registry: dict, key, body, **compile_kwargs):
    """``registry[key]``, built on first use as ``torch.compile(body, **compile_kwargs)``; None when
    ``NF4_COMPILE=0``, when compilation is unavailable, or after a caller gave it up."""
    if os.environ.get("NF4_COMPILE", "1") == "0":
        return None
    if key not in registry:
        try:
            registry[key] = torch.compile(body, **compile_kwargs)
        except Exception:  # noqa: BLE001 - no compiler toolchain: the eager code it is
            registry[key] = None
    return registry[key]
