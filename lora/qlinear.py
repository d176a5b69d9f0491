"""``QLoRALinear``: LoRA on a frozen 4-bit (NF4 / FP4, double-quantized) base.

    x: [..., K]    W: [N, K] stored 4-bit    A: [r, K]    B: [N, r]    b: [N]
    y = dequant(W) applied to x  +  s · (dropout(x) Aᵀ) Bᵀ  +  b      (``kernels.qlora_linear``)

The kernel never keeps a dequantized W: backward dequantizes again (DESIGN.md).

Storage: the base is a ``QuantizedLinear``'s (``lora.quantized_linear``: buffers in
bitsandbytes' layout, never cast by ``.half()``); a dtype cast casts A, B and the bias.
``state_dict()`` holds bitsandbytes' Linear4bit keys next to ``bias``, ``lora_A`` and ``lora_B``.

Merging re-quantizes: ``W' = Q(dequant(W) + s·BA)``. It differs from the 16-bit merge
``dequant(W) + s·BA`` by exactly the quantization error of that sum (at most half a code gap
times the block's absmax per element). ``unmerge`` restores the original 4-bit base bit for bit
when it was kept (``keep_base=True``, the default: one extra 4-bit copy while merged);
otherwise it re-quantizes ``dequant(W') - s·BA``, which adds a second quantization error.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

import kernels
import nf4

from .config import LoRAConfig
from .layers import LoRALayer, relative_error
from .quantized_linear import QUANT_BUFFERS, QUANTIZE_CHUNK_ELEMENTS, QuantizedLinear

__all__ = ["QLoRALinear", "QUANT_BUFFERS"]


class QLoRALinear(QuantizedLinear, LoRALayer):
    """QLoRA linear layer: a 4-bit frozen base plus a trainable rank-r adapter.

    Args:
        weight: ``[N, K]`` float tensor (quantized here, chunk by chunk) or an
            ``nf4.QuantizedTensor`` of shape ``[N, K]`` (used as is).
        bias: ``[N]`` or None (kept in its dtype, frozen; an ``nn.Parameter`` is reused).
        r, alpha, dropout, use_rslora, init, adapter_dtype: see ``LoRAConfig``.
        quant_type, blocksize, double_quant: how to quantize a float ``weight``.
        compute_dtype: the dtype ``forward`` computes in (None: the input's dtype). The output
            is returned in the input's dtype, as bitsandbytes' Linear4bit does.

    Raises:
        ValueError: a weight that is not 2-D, or a bias of the wrong shape.
    """

    def __init__(self, weight, bias: torch.Tensor | None = None, *, r: int = 16, alpha: float = 32,
                 dropout: float = 0.0, use_rslora: bool = False, init: str = "kaiming",
                 quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                 compute_dtype: torch.dtype | None = None, adapter_dtype: torch.dtype = torch.float32) -> None:
        LoRAConfig(r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init, quant_type=quant_type,
                   blocksize=blocksize, double_quant=double_quant, compute_dtype=compute_dtype,
                   adapter_dtype=adapter_dtype)  # validates, before any quantization work
        super().__init__(weight, bias, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
                         compute_dtype=compute_dtype)
        self._base_backup: nf4.QuantizedTensor | None = None
        self._init_adapter(self.in_features, self.out_features, r, alpha, dropout, use_rslora, init,
                           adapter_dtype, self.weight.device)

    @classmethod
    def from_linear(cls, linear: nn.Module, config: LoRAConfig) -> "QLoRALinear":
        """Adapt ``linear``: an ``nn.Linear`` is quantized (on its device, in bounded chunks)
        with the config's settings; a ``QuantizedLinear`` keeps its 4-bit base as it is (no
        re-quantization; ``config.compute_dtype`` applies when set). The bias is reused."""
        if isinstance(linear, QuantizedLinear):
            weight = linear.quantized_weight
            compute_dtype = linear.compute_dtype if config.compute_dtype is None else config.compute_dtype
        else:
            weight, compute_dtype = linear.weight, config.compute_dtype
        return cls(weight, linear.bias, r=config.r, alpha=config.alpha, dropout=config.dropout,
                   use_rslora=config.use_rslora, init=config.init, quant_type=config.quant_type,
                   blocksize=config.blocksize, double_quant=config.double_quant,
                   compute_dtype=compute_dtype, adapter_dtype=config.adapter_dtype)

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [..., K] -> [..., N]`` in x's dtype, through ``kernels.qlora_linear``."""
        self._check_trainable_while_merged()
        xc = x if self.compute_dtype is None else x.to(self.compute_dtype)
        qt, with_lora, undo = self.quantized_weight, self.adapter_enabled and not self.merged, False
        if self.merged and not self.adapter_enabled:
            if self._base_backup is not None:
                qt = self._base_backup  # the original base, exactly
            else:
                undo = True  # subtract the folded update on the fly
        p = self.lora_dropout if (with_lora and self.training) else 0.0
        # the kernel takes A and B in the activation dtype; the casts are differentiable, so
        # gradients reach the (float32 by default) adapter weights in their own dtype
        a = self.lora_A.to(xc.dtype) if with_lora else None
        b = self.lora_B.to(xc.dtype) if with_lora else None
        y = kernels.qlora_linear(xc, qt, a, b, self.scale, bias=self.bias, dropout_p=p, training=self.training)
        if undo:
            y = y - self.lora_output(xc, dropout=False).to(y.dtype)
        return y.to(x.dtype)

    # ---- merge -------------------------------------------------------------------------------
    def _requantize(self, w: torch.Tensor) -> nf4.QuantizedTensor:
        qt = nf4.quantize(w, self.quant_type, self.blocksize, self.double_quant,
                          chunk_elements=QUANTIZE_CHUNK_ELEMENTS)
        return replace(qt, dtype=self._qdtype, _absmax_cache=None)  # keep the original dtype tag

    def merge(self, keep_base: bool | None = None) -> float:
        """Fold the adapter into the base: ``W <- Q(dequant(W) + s·BA)`` (float32 sum).

        ``keep_base`` (default True) keeps the original 4-bit base for an exact ``unmerge``.

        Returns:
            the relative error the re-quantization adds, ``||Q(M) - M||_F / ||M||_F`` with
            ``M = dequant(W) + s·BA`` (0.0 for an all-zero M).
        """
        if self.merged:
            raise RuntimeError("QLoRALinear is already merged")
        keep_base = True if keep_base is None else keep_base
        qt = self.quantized_weight
        with torch.no_grad():
            exact = kernels.dequantize(qt, torch.float32) + self.delta_weight()
            merged = self._requantize(exact)
            err = relative_error(kernels.dequantize(merged, torch.float32), exact)
        del exact
        self._base_backup = qt if keep_base else None
        self._set_quantized(merged)
        self.merged = True
        return err

    def unmerge(self) -> None:
        """Restore the base: exactly when it was kept, else ``Q(dequant(W') - s·BA)``."""
        if not self.merged:
            raise RuntimeError("QLoRALinear is not merged")
        if self._base_backup is not None:
            restored = self._base_backup
        else:
            with torch.no_grad():
                restored = self._requantize(kernels.dequantize(self.quantized_weight, torch.float32)
                                            - self.delta_weight())
        self._base_backup = None
        self._set_quantized(restored)
        self.merged = False

    # ---- module plumbing ---------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if self._base_backup is not None:
            self._base_backup = self._base_backup.to(self.weight.device)
        return out

    def _loaded_base(self, qt: nf4.QuantizedTensor) -> None:
        self._base_backup = None
        self.merged = False
        self._set_quantized(qt)

    def extra_repr(self) -> str:
        return self._base_repr() + ", " + self._adapter_repr()

