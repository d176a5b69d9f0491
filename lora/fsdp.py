"""QLoRA under PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``), the 4-bit base sharded too.

    import lora, optim
    from lora.fsdp import shard_qlora_model
    model = lora.apply_lora(model, cfg, quantize=True)
    shard_qlora_model(model, mesh)            # prepare_for_fsdp + fully_shard per block + root
    opt = optim.PagedAdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)

Mechanism (docs/distributed.md says why this one). FSDP2 shards a module's *parameters* on
dim 0 and leaves its buffers whole on every rank. ``QLoRALinear`` (and the adapter-less
``QuantizedLinear`` of whole-model QLoRA) keeps its base in buffers, so ``prepare_for_fsdp`` re-registers the three tensors that grow with the weight as frozen
parameters (``requires_grad=False``), in a storage dtype that FSDP never casts, and keeps the
constant-size tables replicated::

    attribute                 logical tensor               storage FSDP shards on dim 0
    weight                    uint8   [(N*K + 1) // 2, 1]   the same tensor
    weight_absmax             uint8   [nblocks]  (DQ)       the same tensor
                              float32 [nblocks]  (no DQ)    int32 [nblocks], the same bits
    weight_nested_absmax      float32 [ceil(nblocks/256)]   int32, the same bits
    weight_quant_map, weight_nested_quant_map, weight_offset: replicated buffers (<= 1.1 KiB)

A rank holds ``ceil(n / W)`` elements of each sharded tensor of ``n`` elements (FSDP pads
dim 0 up to a multiple of the world size W; the padding never reaches the math: the
all-gather output is cut back to ``n``). So its quantized bytes are
``sum_t ceil(n_t / W) * itemsize_t`` ~= 1/W of the single-process ``qt.nbytes()``.

FSDP all-gathers a block's shards just before its forward and again before its backward
(``reshard_after_forward=True``, the default here) and frees them after each. In between,
``quantized_weight`` builds an ``nf4.QuantizedTensor`` that *views* the gathered storage
(float32 views of the int32 bits) and ``kernels.qlora_linear`` dequantizes tile by tile, so
no dequantized weight ever exists outside one kernel call (DESIGN.md), and no full 4-bit base
outlives the all-gather window.

Why int32 bits and not float32: a ``MixedPrecisionPolicy(param_dtype=torch.bfloat16)`` casts
every floating parameter before the all-gather; float32 absmax would silently become bf16
(another quantized model). Integer parameters are never cast, and all-gathering bits is exact.

Errors (each names the layers concerned):

* ``prepare_for_fsdp`` / ``shard_qlora_model`` on a *merged* layer: its base is a re-quantized
  dense merge and the original 4-bit base sits in a Python attribute that FSDP cannot see,
  so every rank would keep it whole, for good. Unmerge first.
* ``prepare_for_fsdp`` / ``shard_qlora_model`` / ``check_fsdp_model`` when ``fully_shard`` already wraps
  a QLoRA layer whose base is still in buffers: FSDP does not shard buffers, every rank
  keeps the whole 4-bit base for good. Call ``prepare_for_fsdp`` before ``fully_shard``;
  likewise quantized parameters passed to ``ignored_params``.
* ``merge``/``unmerge`` on a prepared layer (``lora.merge``), and ``base_weight``/
  ``merged_weight``/``quantized_weight`` on a sharded one (``lora.unload``), raise
  ``RuntimeError``: they would all-gather the base, dequantize it and keep the result (a
  re-quantized full base in buffers, or a dense ``nn.Linear``) on every rank. Merge in a
  single-process model loaded from the consolidated adapter instead.

Uneven sizes (a world size that does not divide a sharded dim) are handled by FSDP's dim-0
padding, tested on layers whose packed rows, block count and nested count are odd (the
nested absmax of a small layer has 1 element: the second rank holds only padding).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

import nf4

from .qlinear import QUANT_BUFFERS, QLoRALinear
from .quantized_linear import QuantizedLinear
from .surgery import lora_layers

__all__ = [
    "REPLICATED_STATE",
    "SHARDED_STATE",
    "ShardableQLoRA",
    "ShardableQLoRALinear",
    "ShardableQuantizedLinear",
    "check_fsdp_model",
    "default_blocks",
    "is_prepared",
    "is_sharded",
    "prepare_for_fsdp",
    "quantized_state_bytes",
    "shard_qlora_model",
]

SHARDED_STATE = ("weight", "weight_absmax", "weight_nested_absmax")  # grow with N*K: dim-0 sharded
REPLICATED_STATE = ("weight_quant_map", "weight_nested_quant_map", "weight_offset")  # constant size
_STORAGE_DTYPE = {torch.uint8: torch.uint8, torch.float32: torch.int32}  # logical -> never-cast storage


def _is_dtensor(t) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _is_fsdp_module(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


class ShardableQLoRA:
    """Mixin of a ``QLoRALinear`` prepared for FSDP (``prepare_for_fsdp`` puts it first in the
    layer's class). The sharded state is parameters in storage dtypes (module docstring);
    ``_logical_dtypes`` maps each of them back to the dtype the quantized tensor expects."""

    _logical_dtypes: dict[str, torch.dtype]

    # ---- the quantized base, viewed from whatever FSDP has registered now ---------------------
    def sharded_names(self) -> list[str]:
        """Names of the quantized parameters that are FSDP shards (DTensors) right now."""
        return [n for n in SHARDED_STATE if _is_dtensor(getattr(self, n))]

    @property
    def quantized_weight(self) -> nf4.QuantizedTensor:
        """The base as an ``nf4.QuantizedTensor`` viewing the current (unsharded) storage.

        Raises:
            RuntimeError: the base is sharded (outside FSDP's all-gather window).
        """
        sharded = self.sharded_names()
        if sharded:
            raise RuntimeError(
                f"{type(self).__name__}: the quantized base is sharded by FSDP ({sharded} are DTensors); "
                f"the full base exists only between FSDP's all-gather and reshard (inside forward/backward). "
                f"Materializing it here would gather and keep a full copy on every rank"
            )
        t = {name: getattr(self, name) for name in QUANT_BUFFERS}
        view = lambda name: None if t[name] is None else t[name].view(self._logical_dtypes[name])
        return nf4.QuantizedTensor(
            data=t["weight"], shape=self._qshape, dtype=self._qdtype, blocksize=self.blocksize,
            quant_type=self.quant_type, code=t["weight_quant_map"], absmax=view("weight_absmax"),
            offset=t["weight_offset"], nested_absmax=view("weight_nested_absmax"),
            nested_code=t["weight_nested_quant_map"],
        )

    def _refuse(self, what: str):
        raise RuntimeError(
            f"{type(self).__name__}.{what}() is not available on a layer prepared for FSDP: it would all-gather "
            f"the 4-bit base, dequantize it and keep the result unsharded on every rank. Save the adapter "
            f"(lora.fsdp_checkpoint.save_adapter_consolidated), load it into a single-process model "
            f"(lora.load_adapter) and call {what}() there"
        )

    def merge(self, keep_base: bool | None = None) -> None:
        self._refuse("merge")

    def unmerge(self) -> None:
        self._refuse("unmerge")

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.sharded_names():
            self._refuse("base_weight")
        return super().base_weight(dtype)

    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.sharded_names():
            self._refuse("merged_weight")
        return super().merged_weight(dtype)

    def _set_quantized(self, qt: nf4.QuantizedTensor) -> None:
        self._refuse("_set_quantized")

    # ---- state dict: the storage layout (sharded entries are DTensors: what DCP saves) --------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        nn.Module._save_to_state_dict(self, destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                        unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        n, k = self._qshape
        dq = "+dq" if self.weight_offset is not None else ""
        where = f"sharded {self.sharded_names()}" if self.sharded_names() else "unsharded"
        return (f"in_features={k}, out_features={n}, bias={self.bias is not None}, "
                f"base={self.quant_type}{dq}/{self.blocksize} (fsdp storage, {where})"
                + (", " + self._adapter_repr() if isinstance(self, QLoRALinear) else ""))


_CLASSES: dict[type, type] = {}


def _shardable_class(cls: type) -> type:
    """``Shardable<cls>``: the mixin first, then the layer's own class (subclasses kept)."""
    if issubclass(cls, ShardableQLoRA):
        return cls
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Shardable{cls.__name__}", (ShardableQLoRA, cls), {"__module__": __name__})
    return _CLASSES[cls]


ShardableQLoRALinear = _shardable_class(QLoRALinear)  # importable by name: pickling a prepared model works
ShardableQuantizedLinear = _shardable_class(QuantizedLinear)


def is_prepared(layer: nn.Module) -> bool:
    """True for a 4-bit layer whose base is in FSDP-shardable parameters."""
    return isinstance(layer, ShardableQLoRA)


def is_sharded(layer: nn.Module) -> bool:
    """True for a prepared layer whose quantized parameters are FSDP shards right now."""
    return is_prepared(layer) and bool(layer.sharded_names())


def _qlora_layers(model: nn.Module) -> list[tuple[str, QuantizedLinear]]:
    """Every 4-bit layer, adapted (``QLoRALinear``) or not (``QuantizedLinear``)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]


def prepare_for_fsdp(model: nn.Module) -> list[str]:
    """Re-register every ``QLoRALinear``'s growing quantized state as frozen parameters
    (module docstring) so that ``fully_shard`` shards it. Idempotent; call it before
    ``fully_shard``. Returns the names of the layers prepared now.

    Raises:
        ValueError: a merged layer (named); a layer inside a module already wrapped by
            ``fully_shard`` (its FSDP group is built: parameters added now would stay whole).
    """
    check_fsdp_model(model)
    layers = _qlora_layers(model)
    merged = [n for n, m in layers if getattr(m, "merged", False)]
    if merged:
        raise ValueError(f"cannot prepare merged QLoRA layers {merged} for FSDP: a merged layer keeps its original "
                         f"4-bit base outside any parameter, so every rank would hold it whole; unmerge() first")
    done = []
    for name, layer in layers:
        if is_prepared(layer):
            continue
        dtypes = {}
        for attr in SHARDED_STATE:
            t = layer._buffers.pop(attr)
            if t is None:  # no double quant: nested state absent
                layer.register_parameter(attr, None)
                continue
            if t.dtype not in _STORAGE_DTYPE:
                raise ValueError(f"{name}.{attr} has dtype {t.dtype}; expected one of {list(_STORAGE_DTYPE)}")
            dtypes[attr] = t.dtype
            storage = t.contiguous().view(_STORAGE_DTYPE[t.dtype])
            layer.register_parameter(attr, nn.Parameter(storage, requires_grad=False))
        for attr in REPLICATED_STATE:  # persistent now: the storage state dict is complete
            t = layer._buffers.pop(attr)
            layer.register_buffer(attr, t, persistent=True)
        layer._logical_dtypes = dtypes
        layer._qt = None  # drop the cached QuantizedTensor: it would keep the unsharded buffers alive
        layer._base_backup = None
        layer.__class__ = _shardable_class(type(layer))
        done.append(name)
    return done


def check_fsdp_model(model: nn.Module) -> None:
    """Raise when ``fully_shard`` manages a QLoRA layer whose base it cannot shard.

    Raises:
        ValueError: naming each QLoRA layer inside an FSDP-wrapped module whose quantized
            state is still in buffers (FSDP replicates buffers: the whole 4-bit base on
            every rank, for the life of the model).
    """
    bad = []
    for name, module in model.named_modules():
        if not _is_fsdp_module(module):
            continue
        for sub_name, layer in _qlora_layers(module):
            if not is_prepared(layer):
                bad.append(f"{name}.{sub_name}".strip("."))
    if bad:
        raise ValueError(f"fully_shard wraps QLoRA layers whose 4-bit base is in buffers, which FSDP does not shard "
                         f"(every rank keeps it whole): {sorted(set(bad))[:8]}; call lora.fsdp.prepare_for_fsdp(model) "
                         f"before fully_shard")


BlockSpec = None | type | tuple | Callable[[str, nn.Module], bool] | Iterable[nn.Module]


def default_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: children of any ``nn.ModuleList`` that contain a LoRA layer;
    when there are none, the QLoRA layers themselves."""
    lora_ids = {id(m) for _, m in lora_layers(model)}
    blocks = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            blocks += [c for c in module if any(id(m) in lora_ids for m in c.modules())]
    return blocks or [m for _, m in _qlora_layers(model)]


def _resolve_blocks(model: nn.Module, blocks: BlockSpec) -> list[nn.Module]:
    if blocks is None:
        return default_blocks(model)
    if isinstance(blocks, nn.Module):
        return [blocks]
    if isinstance(blocks, type) or (isinstance(blocks, tuple) and all(isinstance(b, type) for b in blocks)):
        return [m for m in model.modules() if isinstance(m, blocks) and m is not model]
    if callable(blocks):
        return [m for n, m in model.named_modules() if n and blocks(n, m)]
    out = list(blocks)
    bad = [type(b).__name__ for b in out if not isinstance(b, nn.Module)]
    if bad:
        raise TypeError(f"blocks must be nn.Modules, a module type, or a predicate (name, module) -> bool; got {bad}")
    return out


def shard_qlora_model(model: nn.Module, mesh=None, *, blocks: BlockSpec = None,
                      reshard_after_forward: bool | int = True, **fsdp_kwargs) -> nn.Module:
    """Prepare the QLoRA layers, then ``fully_shard`` each block (bottom-up) and the root.

    Args:
        model: an ``apply_lora(..., quantize=True)`` model on the mesh's device.
        mesh: a 1-D ``DeviceMesh`` (None: FSDP's default, the whole world on the default device).
        blocks: what gets its own FSDP group (one all-gather / reduce-scatter each): None for
            ``default_blocks``; a module type (e.g. ``LlamaDecoderLayer``); a predicate
            ``(name, module) -> bool``; or the modules themselves.
        reshard_after_forward: for the blocks (the root uses FSDP's default, keep gathered).
        fsdp_kwargs: passed to every ``fully_shard`` call (``mp_policy``, ``offload_policy``, ...).

    Returns:
        the model (its classes now FSDP subclasses; module names unchanged).

    Raises:
        ValueError: merged layers, FSDP already applied to unprepared QLoRA layers, or
            quantized parameters listed in ``ignored_params`` (each would stay whole on every rank).
    """
    from torch.distributed.fsdp import fully_shard

    prepare_for_fsdp(model)  # raises first when fully_shard already wraps unprepared layers
    ignored = fsdp_kwargs.get("ignored_params") or set()
    quant = {id(getattr(m, a)): f"{n}.{a}" for n, m in _qlora_layers(model) for a in SHARDED_STATE
             if getattr(m, a) is not None}
    kept = sorted(quant[id(p)] for p in ignored if id(p) in quant)
    if kept:
        raise ValueError(f"ignored_params holds quantized base parameters {kept[:8]}: FSDP would keep them whole on "
                         f"every rank; remove them")
    for block in reversed(_resolve_blocks(model, blocks)):  # bottom-up: inner groups first
        if block is model or _is_fsdp_module(block):
            continue
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, **fsdp_kwargs)
    if not _is_fsdp_module(model):
        fully_shard(model, mesh=mesh, **fsdp_kwargs)
    return model


def _local_bytes(t: torch.Tensor | None) -> int:
    """Bytes of the storage a rank allocates for ``t`` (an FSDP shard: its padded local storage)."""
    if t is None:
        return 0
    local = t.to_local() if _is_dtensor(t) else t
    return local.untyped_storage().nbytes()


def quantized_state_bytes(model: nn.Module) -> dict[str, int]:
    """Per-rank bytes of every QLoRA layer's base, read from the tensors' storage sizes.

    Returns:
        ``{"sharded": ..., "replicated": ..., "full": ..., "layers": ...}``: ``sharded`` is what
        this rank stores of the growing state (codes, absmax, nested absmax; padding
        included), ``replicated`` the constant tables, ``full`` the single-process size of
        the growing state (``sum n_t * itemsize_t``, logical shapes).
    """
    sharded = replicated = full = 0
    layers = _qlora_layers(model)
    for _, layer in layers:
        for attr in SHARDED_STATE:
            t = getattr(layer, attr)
            if t is None:
                continue
            sharded += _local_bytes(t)
            full += math.prod(t.shape) * t.element_size()
        replicated += sum(_local_bytes(getattr(layer, a)) for a in REPLICATED_STATE)
    return {"sharded": sharded, "replicated": replicated, "full": full, "layers": len(layers)}
