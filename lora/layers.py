"""LoRA layers: the shared adapter (``LoRALayer``) and the 16-bit-base ``LoRALinear``.

Shapes (``nn.Linear`` convention; leading dims of x are batch dims):

    x: [..., K]    W: [N, K] frozen    b: [N] frozen    A: [r, K] trainable    B: [N, r] trainable
    y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ                 y: [..., N]

``s = alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA). B starts at zero, so a fresh adapter
leaves the output unchanged. Merging folds the update into the base,
``W' = W + s · B A``, after which ``forward`` is a plain linear map.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import INITS, LoRAConfig, lora_scale

__all__ = ["LoRALayer", "LoRALinear", "relative_error"]


class LoRALayer(nn.Module):
    """The adapter part every LoRA layer shares: A, B, the scale, dropout, merge bookkeeping.

    Subclasses hold the frozen base and implement ``forward``, ``base_weight``, ``merge`` and
    ``unmerge``.

    Attributes:
        lora_A: ``[r, in_features]`` trainable.
        lora_B: ``[out_features, r]`` trainable.
        r, alpha, use_rslora, lora_dropout: the adapter's settings; ``scale`` derives from them.
        merged: True while ``W + s·BA`` is folded into the base.
    """

    def _init_adapter(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float,
                      use_rslora: bool, init: str, dtype: torch.dtype, device: torch.device) -> None:
        # validate through the config (one set of rules, one set of messages)
        LoRAConfig(r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, init=init, adapter_dtype=dtype)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.r, self.alpha, self.use_rslora, self.lora_dropout = r, float(alpha), use_rslora, float(dropout)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, dtype=dtype, device=device))
        self.merged = False
        self._disabled = 0  # a counter, so that disable_adapter() blocks nest
        self.reset_lora_parameters(init)

    # ---- adapter ------------------------------------------------------------------------------
    @property
    def scale(self) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return lora_scale(self.r, self.alpha, self.use_rslora)

    @property
    def adapter_enabled(self) -> bool:
        return self._disabled == 0

    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        """A ~ Kaiming-uniform(a=sqrt(5)) (nn.Linear's init, the LoRA paper's choice) or
        N(0, 1/r²) (``"gaussian"``); B = 0."""
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if self.merged:
            raise RuntimeError(f"{type(self).__name__} is merged; unmerge() before resetting the adapter")
        with torch.no_grad():
            if init == "kaiming":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            else:
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
            nn.init.zeros_(self.lora_B)

    def set_scale(self, alpha: float | None = None, use_rslora: bool | None = None) -> None:
        """Change alpha and/or the rsLoRA rule (not allowed while merged)."""
        if self.merged:
            raise RuntimeError(f"{type(self).__name__} is merged; unmerge() before changing its scale")
        alpha = self.alpha if alpha is None else alpha
        use_rslora = self.use_rslora if use_rslora is None else use_rslora
        LoRAConfig(r=self.r, alpha=alpha, use_rslora=use_rslora)  # validates
        self.alpha, self.use_rslora = float(alpha), use_rslora

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``s · B A``: ``[out_features, in_features]``, computed in float32, returned in ``dtype``."""
        with torch.no_grad():
            return (self.scale * (self.lora_B.float() @ self.lora_A.float())).to(dtype)

    def lora_output(self, x: torch.Tensor, dropout: bool = True) -> torch.Tensor:
        """``s · (dropout(x) Aᵀ) Bᵀ`` in plain PyTorch, in the adapters' dtype: ``[..., N]``."""
        h = x.to(self.lora_A.dtype)
        if dropout and self.lora_dropout > 0:
            h = F.dropout(h, self.lora_dropout, self.training)
        return F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scale

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within the block, ``forward`` computes the base layer alone, merged or not."""
        self._disabled += 1
        try:
            yield self
        finally:
            self._disabled -= 1

    def _check_trainable_while_merged(self) -> None:
        if self.merged and self.training and torch.is_grad_enabled() and (
                self.lora_A.requires_grad or self.lora_B.requires_grad):
            raise RuntimeError(
                f"{type(self).__name__} is merged: its adapter gets no gradient; call unmerge() before "
                f"training, or run under torch.no_grad() / eval()"
            )

    # ---- to implement ---------------------------------------------------------------------------
    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The frozen base W ``[N, K]`` as a dense tensor (merged into it, if merged)."""
        raise NotImplementedError

    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``W + s · B A`` as a dense ``[N, K]`` tensor in ``dtype``, without changing the layer.

        Unmerged: computed in float32 from the dequantized/16-bit base. Merged: the base itself
        (for a quantized layer that is the re-quantized merge).
        """
        if self.merged:
            return self.base_weight(dtype)
        w = self.base_weight(torch.float32) + self.delta_weight(torch.float32)
        return w.to(self.base_dtype if dtype is None else dtype)

    def merge(self, keep_base: bool | None = None) -> float:
        """Fold ``s · B A`` into the base; returns the relative error the fold adds
        (``||stored - exact||_F / ||exact||_F``, exact = the float32 sum)."""
        raise NotImplementedError

    def unmerge(self) -> None:
        raise NotImplementedError

    def _adapter_repr(self) -> str:
        rs = ", rslora" if self.use_rslora else ""
        return (f"r={self.r}, alpha={self.alpha:g}{rs}, scale={self.scale:g}, dropout={self.lora_dropout:g}"
                f"{', merged' if self.merged else ''}")


class LoRALinear(LoRALayer):
    """LoRA on a frozen 16-bit (or 32-bit) dense base: the baseline QLoRA is compared against.

        y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ,    x: [..., K], W: [N, K], A: [r, K], B: [N, r]

    Args:
        weight: ``[N, K]`` base weight. An ``nn.Parameter`` is reused as is (so weight ties
            survive), a plain tensor is wrapped; either way it is frozen.
        bias: ``[N]`` or None, reused / frozen the same way.
        r, alpha, dropout, use_rslora, init, adapter_dtype: see ``LoRAConfig``.

    Merging (``merge``) writes ``W + s·BA`` into W in place (float32 sum, one rounding to W's
    dtype); ``unmerge`` subtracts it again, which restores W up to one rounding of W's dtype,
    or exactly with ``merge(keep_base=True)`` (which keeps a copy of W while merged).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, r: int = 16, alpha: float = 32,
                 dropout: float = 0.0, use_rslora: bool = False, init: str = "kaiming",
                 adapter_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"weight must be a 2-D floating tensor [out, in], got "
                             f"{getattr(weight, 'shape', type(weight).__name__)} {getattr(weight, 'dtype', '')}")
        n, k = weight.shape
        if bias is not None and tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape ({n},), got {tuple(bias.shape)}")
        self.weight = _frozen(weight)
        self.bias = None if bias is None else _frozen(bias)
        self._base_backup: torch.Tensor | None = None
        self._init_adapter(k, n, r, alpha, dropout, use_rslora, init, adapter_dtype, weight.device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: LoRAConfig) -> "LoRALinear":
        """Wrap ``linear`` (its parameters are reused, not copied)."""
        return cls(linear.weight, linear.bias, r=config.r, alpha=config.alpha, dropout=config.dropout,
                   use_rslora=config.use_rslora, init=config.init, adapter_dtype=config.adapter_dtype)

    @property
    def base_dtype(self) -> torch.dtype:
        return self.weight.dtype

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.weight.detach().to(self.weight.dtype if dtype is None else dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: [..., K] -> [..., N]`` in x's dtype."""
        self._check_trainable_while_merged()
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            if self.adapter_enabled:
                return y
            return (y - self.lora_output(x, dropout=False)).to(y.dtype)  # undo the fold on the fly
        if not self.adapter_enabled:
            return y
        return (y + self.lora_output(x)).to(y.dtype)

    def merge(self, keep_base: bool | None = None) -> float:
        """``W <- W + s·BA`` in place. ``keep_base=True`` keeps a copy of W for an exact unmerge.

        Returns the relative error of rounding the float32 sum to W's dtype (0.0 for float32).
        """
        if self.merged:
            raise RuntimeError("LoRALinear is already merged")
        with torch.no_grad():
            self._base_backup = self.weight.detach().clone() if keep_base else None
            exact = self.weight.float() + self.delta_weight()
            self.weight.copy_(exact.to(self.weight.dtype))
            err = relative_error(self.weight.float(), exact)
        self.merged = True
        return err

    def unmerge(self) -> None:
        """``W <- W - s·BA`` (or the kept copy): restores W to one rounding of its dtype, or exactly."""
        if not self.merged:
            raise RuntimeError("LoRALinear is not merged")
        with torch.no_grad():
            if self._base_backup is not None:
                self.weight.copy_(self._base_backup)
            else:
                self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
        self._base_backup = None
        self.merged = False

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        if self._base_backup is not None:
            self._base_backup = fn(self._base_backup)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"base={self.weight.dtype}, " + self._adapter_repr())


def _frozen(t: torch.Tensor) -> nn.Parameter:
    """Reuse an ``nn.Parameter`` (keeps ties), wrap a tensor; never trainable."""
    p = t if isinstance(t, nn.Parameter) else nn.Parameter(t.detach(), requires_grad=False)
    p.requires_grad_(False)
    return p


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """``||approx - exact||_F / ||exact||_F`` (float32 norms; 0.0 when both are zero)."""
    num = torch.linalg.vector_norm(approx.float() - exact.float())
    den = torch.linalg.vector_norm(exact.float())
    if float(den) == 0.0:
        return 0.0 if float(num) == 0.0 else float("inf")
    return float(num / den)
