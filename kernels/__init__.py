"""kernels: Triton NF4/FP4 dequantization and dequant-matmul fused with the LoRA path.

    import kernels
    w = kernels.dequantize(qt, dtype=torch.bfloat16)          # bit-identical to nf4.dequantize
    y = kernels.nf4_matmul(x, qt, bias=None)                  # x @ Wᵀ (+ bias)
    y = kernels.qlora_linear(x, qt, lora_A, lora_B, scale, bias=None, dropout_p=0.0)  # differentiable

Dispatch (one place, ``kernels.dispatch``): CUDA tensors run the Triton kernels; CPU tensors run
the plain-PyTorch reference (``kernels.reference``), except under ``TRITON_INTERPRET=1`` where
CPU tensors run the Triton kernels through the interpreter. float64 always runs the reference.
The ops are registered with torch.library (namespace ``qlora``) with fake implementations, so
``torch.compile(fullgraph=True)`` traces them. Importing this package never initialises CUDA.
The ops' arguments, layouts and guarantees: docs/kernels.md.
"""

__version__ = "0.1.0"  # semantic versioning of the public surface (README, "API stability"); = pyproject's

from . import dispatch, reference
from .dequant import dequantize
from .dispatch import force_backend, force_regime
from .dropout import dropout
from .matmul import DEQUANT_ONCE_MIN_M, GEMV_MAX_M, choose_regime
from .qlora import QLoRALinearFunction, nf4_matmul, qlora_linear

__all__ = [
    "dequantize", "nf4_matmul", "qlora_linear", "dropout", "QLoRALinearFunction",
    "dispatch", "reference", "force_backend", "force_regime", "choose_regime",
    "GEMV_MAX_M", "DEQUANT_ONCE_MIN_M",
]
