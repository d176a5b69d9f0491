"""``QuantizedLinear``: a frozen 4-bit (NF4 / FP4, double-quantized) linear layer, no adapter.

    x: [..., K]    W: [N, K] stored 4-bit    b: [N]
    y = x dequant(W)ᵀ + b                       (``kernels.nf4_matmul``; W is never kept dense)

This is what QLoRA does to every linear layer that carries no adapter: the whole base sits in
4-bit, so a 65B model fits one 48 GB GPU. ``QLoRALinear`` is this layer plus a LoRA adapter.

Storage. The quantized base lives in buffers, so ``.to()``, ``.cuda()``, ``.cpu()`` move it;
a dtype cast (``.half()``, ``.to(torch.bfloat16)``) casts the bias but leaves the quantized
state as it is (packed uint8 codes and float32 constants stay what they are):

    weight                   uint8 [(N*K + 1) // 2, 1]  packed codes (bitsandbytes' layout)
    weight_absmax            uint8 [nblocks] (double quant) or float32 [nblocks]
    weight_quant_map         float32 [16]
    weight_nested_absmax     float32 [ceil(nblocks / 256)]      (double quant only)
    weight_nested_quant_map  float32 [256]                      (double quant only)
    weight_offset            float32 []                         (double quant only)

``state_dict()`` writes the base under bitsandbytes' Linear4bit keys (``weight``,
``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``, ``weight.nested_quant_map``,
``weight.quant_state.bitsandbytes__nf4``) next to ``bias``: exactly what transformers +
bitsandbytes write, so such a checkpoint loads into it and back. ``load_state_dict`` also
accepts a plain 16-bit ``weight`` and quantizes it with the layer's settings.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import kernels
import nf4

from .config import COMPUTE_DTYPES
from .layers import _frozen

__all__ = ["QuantizedLinear", "QUANT_BUFFERS", "QUANTIZE_CHUNK_ELEMENTS", "BNB_QUANT_TYPES"]

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
BNB_QUANT_TYPES = ("nf4", "fp4")  # what bitsandbytes' state_dict layout (our interchange format) holds


class QuantizedLinear(nn.Module):
    """A frozen linear layer whose weight is stored 4-bit.

    Args:
        weight: ``[N, K]`` float tensor (quantized here, chunk by chunk) or an
            ``nf4.QuantizedTensor`` of shape ``[N, K]`` (used as is, no copy).
        bias: ``[N]`` or None (kept in its dtype, frozen; an ``nn.Parameter`` is reused).
        quant_type, blocksize, double_quant: how to quantize a float ``weight``.
        compute_dtype: the dtype ``forward`` computes in (None: the input's dtype). The output
            is returned in the input's dtype, as bitsandbytes' Linear4bit does.

    Raises:
        ValueError: a weight that is not 2-D, an unknown quant_type, a bias
            of the wrong shape, or a compute_dtype that is not float32 / float16 / bfloat16 / None.
    """

    def __init__(self, weight, bias: torch.Tensor | None = None, *, quant_type: str = "nf4", blocksize: int = 64,
                 double_quant: bool = True, compute_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        qt = weight if isinstance(weight, nf4.QuantizedTensor) else \
            self._quantize(weight, quant_type, blocksize, double_quant)
        if qt.quant_type not in nf4.codebooks.QUANT_TYPES:
            raise ValueError(f"the quantized weight must be one of {nf4.codebooks.QUANT_TYPES}, got {qt.quant_type!r}")
        if len(qt.shape) != 2:
            raise ValueError(f"weight must be 2-D [out, in], got shape {tuple(qt.shape)}")
        n, k = qt.shape
        if bias is not None and tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype!r}")
        self.in_features, self.out_features = int(k), int(n)
        self.compute_dtype = compute_dtype
        self._qt: nf4.QuantizedTensor | None = None
        self._set_quantized(qt)
        self.bias = None if bias is None else _frozen(bias)

    @staticmethod
    def _quantize(weight, quant_type: str, blocksize: int, double_quant: bool) -> nf4.QuantizedTensor:
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D tensor [out, in] or a QuantizedTensor, got "
                             f"{getattr(weight, 'shape', type(weight).__name__)}")
        if quant_type not in nf4.codebooks.QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {nf4.codebooks.QUANT_TYPES}, got {quant_type!r}")
        return nf4.quantize(weight.detach(), quant_type, blocksize, double_quant,
                            chunk_elements=QUANTIZE_CHUNK_ELEMENTS)

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: torch.dtype | None = None) -> "QuantizedLinear":
        """Quantize ``linear.weight`` (on its device, in bounded chunks) and reuse its bias."""
        return cls(linear.weight, linear.bias, quant_type=quant_type, blocksize=blocksize,
                   double_quant=double_quant, compute_dtype=compute_dtype)

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

    @property
    def num_weights(self) -> int:
        """Logical elements of W (N*K), what parameter counts count for it."""
        return math.prod(self._qshape)

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``dequant(W)``: a dense ``[N, K]`` tensor in ``dtype`` (default: the original dtype)."""
        return kernels.dequantize(self.quantized_weight, self._qdtype if dtype is None else dtype)

    # ---- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [..., K] -> [..., N]`` in x's dtype, through ``kernels.nf4_matmul``."""
        xc = x if self.compute_dtype is None else x.to(self.compute_dtype)
        return kernels.nf4_matmul(xc, self.quantized_weight, self.bias).to(x.dtype)

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

        return super()._apply(keep_quantized, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.quant_type not in BNB_QUANT_TYPES:
            raise ValueError(f"{prefix.rstrip('.') or type(self).__name__}: a {self.quant_type!r} base cannot be "
                             f"saved: the state_dict layout is bitsandbytes', which stores only {BNB_QUANT_TYPES} "
                             f"(save the adapters with lora.save_adapter instead)")
        super()._save_to_state_dict(destination, prefix, keep_vars)  # bias (and lora_A, lora_B)
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
                              f"this {type(self).__name__} has {tuple(self._qshape)}")
            return
        self._loaded_base(qt.to(self.weight.device))

    def _loaded_base(self, qt: nf4.QuantizedTensor) -> None:
        """Install a base read by ``load_state_dict`` (subclasses reset their merge state)."""
        self._set_quantized(qt)

    def _quantized_from_state(self, sd: dict, wkey: str) -> nf4.QuantizedTensor:
        w = sd[wkey]
        if len(sd) == 1 and w.is_floating_point():  # a 16-bit checkpoint: quantize it here
            if w.dim() != 2:
                raise ValueError(f"a float weight must be 2-D [out, in], got shape {tuple(w.shape)}")
            return nf4.quantize(w.detach().to(self.weight.device), self.quant_type, self.blocksize,
                                self.double_quant, chunk_elements=QUANTIZE_CHUNK_ELEMENTS)
        return nf4.QuantizedTensor.from_bnb_state_dict(sd, wkey)

    def _base_repr(self) -> str:
        qt = self.quantized_weight
        dq = "+dq" if qt.nested else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"base={self.quant_type}{dq}/{self.blocksize} ({qt.bits_per_parameter():.3f} bits/param)")

    def extra_repr(self) -> str:
        return self._base_repr()
