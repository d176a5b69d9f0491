"""``QLoRALinear``: LoRA on a frozen 4-bit (NF4 / FP4, double-quantized) base.

    x: [..., K]    W: [N, K] stored 4-bit    A: [r, K]    B: [N, r]    b: [N]
    y = dequant(W) applied to x  +  s · (dropout(x) Aᵀ) Bᵀ  +  b      (``kernels.qlora_linear``)

The kernel never keeps a dequantized W: backward dequantizes again (DESIGN.md).

Storage. The quantized base lives in buffers, so ``.to()``, ``.cuda()``, ``.cpu()`` move it;
a dtype cast (``.half()``, ``.to(torch.bfloat16)``) casts A, B and the bias but leaves the
quantized state as it is (packed uint8 codes and float32 constants stay what they are):

    weight                   uint8 [(N*K + 1) // 2, 1]  packed codes (bitsandbytes' layout)
    weight_absmax            uint8 [nblocks] (double quant) or float32 [nblocks]
    weight_quant_map         float32 [16]
    weight_nested_absmax     float32 [ceil(nblocks / 256)]      (double quant only)
    weight_nested_quant_map  float32 [256]                      (double quant only)
    weight_offset            float32 []                         (double quant only)

``state_dict()`` writes the base under bitsandbytes' Linear4bit keys (``weight``,
``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__nf4``) next to ``bias``, ``lora_A`` and ``lora_B``, so a
bitsandbytes checkpoint loads into it and back. ``load_state_dict`` also accepts a plain
16-bit ``weight`` and quantizes it with the layer's settings.

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
from .layers import LoRALayer, _frozen

__all__ = ["QLoRALinear", "QUANT_BUFFERS"]

# buffer name -> QuantizedTensor field
QUANT_BUFFERS = {
    "weight": "data",
    "weight_absmax": "absmax",
    "weight_quant_map": "code",
    "weight_nested_absmax": "nested_absmax",
    "weight_nested_quant_map": "nested_code",
    "weight_offset": "offset",
}
QUANTIZE_CHUNK_ELEMENTS = 1 << 18  # bounds the quantization temporaries to ~5 MiB whatever the layer


class QLoRALinear(LoRALayer):
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
        super().__init__()
        cfg = LoRAConfig(r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init,
                         quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
                         compute_dtype=compute_dtype, adapter_dtype=adapter_dtype)
        self.compute_dtype = compute_dtype
        qt = weight if isinstance(weight, nf4.QuantizedTensor) else self._quantize(weight, cfg)
        if qt.quant_type not in ("nf4", "fp4"):  # what bitsandbytes' state_dict layout can hold
            raise ValueError(f"the quantized weight must be nf4 or fp4, got {qt.quant_type!r}")
        if len(qt.shape) != 2:
            raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(qt.shape)}")
        n, k = qt.shape
        if bias is not None and tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        self._qt: nf4.QuantizedTensor | None = None
        self._base_backup: nf4.QuantizedTensor | None = None
        self._set_quantized(qt)
        self.bias = None if bias is None else _frozen(bias)
        self._init_adapter(k, n, r, alpha, dropout, use_rslora, init, adapter_dtype, qt.device)

    @staticmethod
    def _quantize(weight: torch.Tensor, cfg: LoRAConfig) -> nf4.QuantizedTensor:
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D tensor [out, in] or a QuantizedTensor, got "
                             f"{getattr(weight, 'shape', type(weight).__name__)}")
        return nf4.quantize(weight.detach(), cfg.quant_type, cfg.blocksize, cfg.double_quant,
                            chunk_elements=QUANTIZE_CHUNK_ELEMENTS)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: LoRAConfig) -> "QLoRALinear":
        """Quantize ``linear.weight`` (on its device, in bounded chunks) and reuse its bias."""
        return cls(linear.weight, linear.bias, r=config.r, alpha=config.alpha, dropout=config.dropout,
                   use_rslora=config.use_rslora, init=config.init, quant_type=config.quant_type,
                   blocksize=config.blocksize, double_quant=config.double_quant,
                   compute_dtype=config.compute_dtype, adapter_dtype=config.adapter_dtype)

    # ---- the quantized base -----------------------------------------------------------------
    def _set_quantized(self, qt: nf4.QuantizedTensor) -> None:
        for name, attr in QUANT_BUFFERS.items():
            self.register_buffer(name, getattr(qt, attr), persistent=False)
        self._qshape, self._qdtype = torch.Size(qt.shape), qt.dtype
        self.quant_type, self.blocksize, self.double_quant = qt.quant_type, qt.blocksize, qt.nested
        self._qt = qt

    @property
    def quantized_weight(self) -> nf4.QuantizedTensor:
        """The base as an ``nf4.QuantizedTensor`` viewing this module's buffers (no copy)."""
        qt = self._qt
        if qt is None or any(getattr(qt, attr) is not getattr(self, name) for name, attr in QUANT_BUFFERS.items()):
            qt = nf4.QuantizedTensor(
                data=self.weight, shape=self._qshape, dtype=self._qdtype, blocksize=self.blocksize,
                quant_type=self.quant_type, code=self.weight_quant_map, absmax=self.weight_absmax,
                offset=self.weight_offset, nested_absmax=self.weight_nested_absmax,
                nested_code=self.weight_nested_quant_map,
            )
            self._qt = qt
        return qt

    @property
    def base_dtype(self) -> torch.dtype:
        """The dtype the base was quantized from (bitsandbytes' quant-state ``dtype``)."""
        return self._qdtype

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return kernels.dequantize(self.quantized_weight, self._qdtype if dtype is None else dtype)

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

    def merge(self, keep_base: bool | None = None) -> None:
        """Fold the adapter into the base: ``W <- Q(dequant(W) + s·BA)`` (float32 sum).

        ``keep_base`` (default True) keeps the original 4-bit base for an exact ``unmerge``.
        """
        if self.merged:
            raise RuntimeError("QLoRALinear is already merged")
        keep_base = True if keep_base is None else keep_base
        qt = self.quantized_weight
        with torch.no_grad():
            merged = self._requantize(kernels.dequantize(qt, torch.float32) + self.delta_weight())
        self._base_backup = qt if keep_base else None
        self._set_quantized(merged)
        self.merged = True

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
        """Move the quantized buffers with the module but never cast them: for those, ``fn``
        is probed on an empty tensor; a dtype change means "cast", and only its device is used."""
        quant = {id(getattr(self, name)) for name in QUANT_BUFFERS if getattr(self, name) is not None}

        def keep_quantized(t):
            if id(t) not in quant:
                return fn(t)
            probe = fn(t.new_empty(0))
            return fn(t) if probe.dtype == t.dtype else t.to(probe.device)

        out = super()._apply(keep_quantized, recurse)
        if self._base_backup is not None:
            self._base_backup = self._base_backup.to(self.weight.device)
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # bias, lora_A, lora_B
        for key, t in self.quantized_weight.to_bnb_state_dict(prefix + "weight").items():
            destination[key] = t

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        wkey = prefix + "weight"
        mine = {k: state_dict[k] for k in state_dict if k == wkey or k.startswith(wkey + ".")}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        for k in mine:
            if k in unexpected_keys:
                unexpected_keys.remove(k)
        if wkey not in mine:
            missing_keys.append(wkey)
            return
        try:
            qt = self._quantized_from_state(mine, wkey)
        except ValueError as e:
            error_msgs.append(f"while loading {wkey!r}: {e}")
            return
        if qt.shape != self._qshape:
            error_msgs.append(f"size mismatch for {wkey!r}: the checkpoint holds shape {tuple(qt.shape)}, "
                              f"this QLoRALinear has {tuple(self._qshape)}")
            return
        self._base_backup = None
        self.merged = False
        self._set_quantized(qt.to(self.weight.device))

    def _quantized_from_state(self, sd: dict, wkey: str) -> nf4.QuantizedTensor:
        w = sd[wkey]
        if len(sd) == 1 and w.is_floating_point():  # a 16-bit checkpoint: quantize it here
            if w.dim() != 2:
                raise ValueError(f"a float weight must be 2-D [out, in], got shape {tuple(w.shape)}")
            return nf4.quantize(w.detach().to(self.weight.device), self.quant_type, self.blocksize,
                                self.double_quant, chunk_elements=QUANTIZE_CHUNK_ELEMENTS)
        return nf4.QuantizedTensor.from_bnb_state_dict(sd, wkey)

    def extra_repr(self) -> str:
        qt = self.quantized_weight
        dq = "+dq" if qt.nested else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"base={self.quant_type}{dq}/{self.blocksize} ({qt.bits_per_parameter():.3f} bits/param), "
                + self._adapter_repr())
