"""``load_quantized``: fill a (meta-device) model from a whole-model checkpoint, 4-bit on the way in.

    with torch.device("meta"):
        model = LlamaForCausalLM(config)                       # no memory for weights
    model = lora.load_quantized(model, "ckpt/")               # a transformers + bitsandbytes 4-bit folder
    model = lora.load_quantized(model, "ckpt16/", quant_type="nf4")   # or 16-bit, quantized as read

Two kinds of folder (``lora.checkpoint_files`` for the layout):

- **bitsandbytes 4-bit** (written by transformers + bitsandbytes, or ``lora.save_quantized``): a
  Linear whose ``<name>.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``) key is present is
  stored packed (``weight`` uint8, ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
  ``weight.nested_quant_map``); those tensors become a ``QuantizedLinear`` as they are, no 16-bit
  copy of any weight is ever made. ``config.json``'s ``quantization_config`` is checked against
  the files (bitsandbytes, 4-bit, the same quant_type).
- **16-bit**: every Linear but the output layer, tied weights and ``skip_modules``
  (``lora.targets.sixteen_bit_linears``, the rule of ``apply_lora``) is quantized as it is read,
  with ``quant_type`` / ``blocksize`` / ``double_quant``: the bytes bitsandbytes would produce.

Everything else (embeddings, norms, biases, the head, buffers) is loaded as stored, in the
checkpoint's dtype. Ties survive: every module holding a tied Parameter gets the same new one.

Memory. Headers are read and every key, shape and dtype checked before any tensor data; then
tensors are read one at a time, shard by shard, straight into their final memory, and a 16-bit
Linear weight is quantized (in bounded chunks) and freed before the next is read. The peak is
the final model plus one 16-bit weight and the quantization temporaries, below the budget of
1.3 x (final 4-bit model + largest shard) (measured: ``benchmarks/bench_load.py``).

Non-persistent buffers (rotary ``inv_freq``, position ids) are not in checkpoints. If the model
was built on the meta device, those still on meta after loading are rebuilt by the model's own
``_init_weights(module)`` (what Hugging Face models define for it), else a ``ValueError`` lists them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

import nf4
from nf4.storage import QUANT_STATE_TAG

from .checkpoint_files import CONFIG_NAME, Checkpoint, open_checkpoint, read_json
from .config import LoRAConfig
from .layers import LoRALayer
from .quantized_linear import BNB_QUANT_TYPES, QuantizedLinear
from .surgery import _split
from .targets import linear_layers, matches, shared_weights, sixteen_bit_linears

__all__ = ["load_quantized", "read_quantization_config", "QUANT_SUFFIXES"]

# the keys of one packed weight besides "<name>.weight" and its quant-state key
QUANT_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_FLOAT_ST = ("F16", "BF16", "F32", "F64")
_LIST_LIMIT = 10  # keys listed in an error message
# Elements quantized per chunk while loading a 16-bit checkpoint. 2^20 is the piece nf4's
# compiled CPU code search works on (smaller chunks use torch.bucketize): measured here
# 2026-12-02, 0.13-0.16 s vs 0.30-0.50 s per 4M-element weight, but the compile costs ~17 s once
# per process. So the compiled chunk is used when the checkpoint has at least
# COMPILE_WORTH_ELEMENTS weights to quantize (~2.7e8: break-even at ~0.06 s saved per 1e6), and
# only for weights of at least LARGE_WEIGHT_ELEMENTS (8 MiB in bf16; its ~16 MiB of float32
# temporaries stay small next to the weight); otherwise 2^18 (~4 MiB of temporaries).
LOAD_CHUNK_ELEMENTS, SMALL_CHUNK_ELEMENTS = 1 << 20, 1 << 18
LARGE_WEIGHT_ELEMENTS, COMPILE_WORTH_ELEMENTS = 1 << 22, 1 << 28


def _listing(keys) -> str:
    keys = sorted(keys)
    more = f" ... ({len(keys)} in all)" if len(keys) > _LIST_LIMIT else ""
    return f"{keys[:_LIST_LIMIT]}{more}"


def read_quantization_config(folder: str) -> dict | None:
    """``config.json``'s ``quantization_config`` of a folder, validated; None when absent.

    Raises:
        ValueError: a malformed ``config.json``, a quantization method other than bitsandbytes
            4-bit, or a quant type bitsandbytes' 4-bit format does not have (each named).
    """
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        return None
    qc = read_json(path, CONFIG_NAME).get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise ValueError(f"{path!r}: quantization_config must be an object, got {qc!r}")
    if qc.get("quant_method", "bitsandbytes") != "bitsandbytes":
        raise ValueError(f"{path!r}: quant_method {qc.get('quant_method')!r} is not supported (only 'bitsandbytes')")
    if qc.get("load_in_8bit") or not qc.get("load_in_4bit", False):
        raise ValueError(f"{path!r}: only bitsandbytes 4-bit checkpoints are supported (load_in_4bit=true), "
                         f"got load_in_4bit={qc.get('load_in_4bit')!r}, load_in_8bit={qc.get('load_in_8bit')!r}")
    qtype = qc.get("bnb_4bit_quant_type", "fp4")  # bitsandbytes' own default
    if qtype not in BNB_QUANT_TYPES:
        raise ValueError(f"{path!r}: bnb_4bit_quant_type must be one of {BNB_QUANT_TYPES}, got {qtype!r}")
    skip = qc.get("llm_int8_skip_modules")
    if skip is not None and not (isinstance(skip, list) and all(isinstance(s, str) for s in skip)):
        raise ValueError(f"{path!r}: llm_int8_skip_modules must be a list of names, got {skip!r}")
    return qc


@dataclass
class _Group:
    """One quantized Linear: the keys that make it and what has been read of them."""

    name: str
    module: nn.Linear
    keys: set[str]
    got: dict[str, torch.Tensor] = field(default_factory=dict)
    qt: nf4.QuantizedTensor | None = None


class _Loader:
    """One ``load_quantized`` call: the plan (checked before reading), then the reads."""

    def __init__(self, model: nn.Module, ckpt: Checkpoint, cfg: LoRAConfig, prequantized: bool,
                 device: torch.device) -> None:
        self.model, self.ckpt, self.cfg, self.device = model, ckpt, cfg, device
        self.prequantized = prequantized
        self.groups: dict[str, _Group] = {}      # module name -> group
        self.key_group: dict[str, _Group] = {}   # checkpoint key -> its group
        self.plain: dict[str, list[tuple[nn.Module, str, str]]] = {}  # key -> owners (module, attr, kind)
        self.duplicates: set[str] = set()        # keys of a tied tensor after the first: checked, not read
        self._plan()
        to_quantize = 0 if prequantized else sum(g.module.weight.numel() for g in self.groups.values())
        self.compile_worth = to_quantize >= COMPILE_WORTH_ELEMENTS

    # ---- the plan ---------------------------------------------------------------------------
    def _quantized_names(self) -> list[str]:
        linears = dict(linear_layers(self.model))
        if not self.prequantized:
            keep16 = sixteen_bit_linears(self.model, self.cfg)
            return [n for n, m in linears.items() if isinstance(m, nn.Linear) and n not in keep16]
        marker = ".weight." + QUANT_STATE_TAG
        names = sorted({k[: k.index(marker)] for k in self.ckpt.entries if marker in k})
        bad = [n for n in names if not isinstance(linears.get(n), nn.Linear)]
        if bad:
            raise ValueError(f"{self.ckpt.folder!r} holds 4-bit weights for modules that are not nn.Linear in "
                             f"{type(self.model).__name__}: {_listing(bad)}")
        tied = shared_weights(self.model, names)
        if tied:
            raise ValueError(f"{self.ckpt.folder!r} holds 4-bit weights for Linears whose weight is tied to another "
                             f"module in the model (the tie would break): {tied}")
        skipped = [n for n in names if matches(self.cfg.skip_modules, n)]
        if skipped:
            raise ValueError(f"skip_modules names modules that {self.ckpt.folder!r} stores 4-bit: {_listing(skipped)} "
                             f"(they cannot be loaded 16-bit without dequantizing)")
        return names

    def _plan(self) -> None:
        entries = self.ckpt.entries
        for name in self._quantized_names():
            module = self.model.get_submodule(name)
            w = f"{name}.weight"
            keys = {w}
            if self.prequantized:  # the nested keys are there when its quant_state says so
                tag = next(k for k in entries if k.startswith(f"{w}.{QUANT_STATE_TAG}"))
                keys |= {tag, f"{w}.absmax", f"{w}.quant_map"} | {k for k in entries if k.startswith(w + ".")}
            if module.bias is not None:
                keys.add(f"{name}.bias")
            group = _Group(name, module, keys)
            self.groups[name] = group
            self.key_group.update({k: group for k in keys})
        skip_params = {id(g.module.weight) for g in self.groups.values()} | \
            {id(g.module.bias) for g in self.groups.values() if g.module.bias is not None}
        missing = []
        owners: dict[int, list[tuple[nn.Module, str, str, str]]] = {}
        for mname, module in self.model.named_modules(remove_duplicate=False):
            pre = f"{mname}." if mname else ""
            for pname, p in module._parameters.items():
                if p is not None and id(p) not in skip_params:
                    owners.setdefault(id(p), []).append((module, pname, "param", pre + pname))
            for bname, b in module._buffers.items():
                if b is None:
                    continue
                kind = "buffer" if bname not in module._non_persistent_buffers_set else "nonpersistent"
                owners.setdefault(id(b), []).append((module, bname, kind, pre + bname))
        for group_owners in owners.values():
            present = [key for (_, _, _, key) in group_owners if key in entries]
            kind = group_owners[0][2]
            if not present:
                if kind != "nonpersistent":
                    missing.append(group_owners[0][3])
                continue
            for key in present:  # a checkpoint may store a tied tensor under several names: read one
                self.plain[key] = [(m, a, k) for (m, a, k, _) in group_owners]
                if key != present[0]:
                    self.duplicates.add(key)
        for group in self.groups.values():
            missing += sorted(k for k in group.keys if k not in entries)
        used = set(self.plain) | set(self.key_group)
        unexpected = [k for k in entries if k not in used]
        if missing or unexpected:
            raise ValueError(f"{self.ckpt.folder!r} does not fit {type(self.model).__name__}: "
                             f"missing keys {_listing(missing)}; unexpected keys {_listing(unexpected)}")
        self._check_shapes()

    def _check_shapes(self) -> None:
        """Shapes and dtypes from the headers, before any data is read."""
        ck = self.ckpt
        for key, owners in self.plain.items():
            module, attr, _ = owners[0]
            t = getattr(module, attr)
            if ck.shape(key) != tuple(t.shape):
                raise ValueError(f"{ck.entries[key][0]!r}: {key!r} has shape {list(ck.shape(key))}, the model "
                                 f"expects {list(t.shape)}")
            dt = ck.dtype(key)
            ok = dt is not None and (dt.is_floating_point if t.is_floating_point() else dt == t.dtype)
            if not ok:
                raise ValueError(f"{ck.entries[key][0]!r}: {key!r} has dtype {ck.entries[key][1]['dtype']}, the model "
                                 f"expects {t.dtype}")
        for group in self.groups.values():
            w = f"{group.name}.weight"
            n, k = group.module.out_features, group.module.in_features
            path, info = ck.entries[w]
            if self.prequantized:
                packed = (n * k + 1) // 2
                if info["dtype"] != "U8" or ck.shape(w) not in ((packed, 1), (packed,)):
                    raise ValueError(f"{path!r}: packed {w!r} must be U8 [{packed}, 1] for a [{n}, {k}] "
                                     f"Linear, got {info['dtype']} {list(ck.shape(w))}")
                bad = sorted(key for key in group.keys - {w, f"{group.name}.bias"}
                             if key[len(w) + 1:] not in QUANT_SUFFIXES and QUANT_STATE_TAG not in key)
                if bad:
                    raise ValueError(f"{path!r}: unexpected keys next to the 4-bit {w!r}: {bad}")
            elif info["dtype"] not in _FLOAT_ST or ck.shape(w) != (n, k):
                raise ValueError(f"{path!r}: {w!r} must be a float [{n}, {k}] tensor to quantize, got "
                                 f"{info['dtype']} {list(ck.shape(w))}")
            b = f"{group.name}.bias"
            if b in group.keys and (ck.entries[b][1]["dtype"] not in _FLOAT_ST or ck.shape(b) != (n,)):
                raise ValueError(f"{ck.entries[b][0]!r}: {b!r} must be a float [{n}] tensor, got "
                                 f"{ck.entries[b][1]['dtype']} {list(ck.shape(b))}")

    # ---- the reads --------------------------------------------------------------------------
    def run(self) -> None:
        # 16-bit weights are read into one reused buffer: freeing a large buffer per weight would
        # let the allocator's heap fragment (measured: +0.9 GiB resident on the 1e9 model)
        sizes = [self.ckpt.nbytes(f"{n}.weight") for n in self.groups] if not self.prequantized else []
        self.scratch = torch.empty(max(sizes), dtype=torch.uint8, device="cpu") if sizes else None
        for path in self.ckpt.files:
            with open(path, "rb") as f:
                for key in self.ckpt.keys_of(path):
                    if key in self.key_group:
                        self._read_quantized(f, key, self.key_group[key])
                    elif key not in self.duplicates:
                        self._assign(key, self.ckpt.read(f, key).to(self.device))

    def _assign(self, key: str, t: torch.Tensor) -> None:
        owners = self.plain[key]
        module, attr, kind = owners[0]
        if kind == "param":
            old = module._parameters[attr]
            new = nn.Parameter(t, requires_grad=old.requires_grad)
            for m, a, _ in owners:
                m._parameters[a] = new
        else:
            for m, a, _ in owners:
                m._buffers[a] = t

    def _read_quantized(self, f, key: str, group: _Group) -> None:
        w = f"{group.name}.weight"
        if key == w and not self.prequantized:  # 16-bit: quantize now, keep only the 4-bit result
            t = self.ckpt.read(f, key, self.scratch)
            large = self.compile_worth and t.numel() >= LARGE_WEIGHT_ELEMENTS
            chunk = LOAD_CHUNK_ELEMENTS if large else SMALL_CHUNK_ELEMENTS
            group.qt = nf4.quantize(t.to(self.device), self.cfg.quant_type, self.cfg.blocksize,
                                    self.cfg.double_quant, chunk_elements=chunk)
            del t
        else:
            group.got[key] = self.ckpt.read(f, key)
        if len(group.got) + (group.qt is not None) == len(group.keys):
            self._finish(group)

    def _finish(self, group: _Group) -> None:
        w = f"{group.name}.weight"
        qt = group.qt
        if qt is None:
            try:
                qt = nf4.QuantizedTensor.from_bnb_state_dict(group.got, w)
            except ValueError as e:
                raise ValueError(f"{self.ckpt.entries[w][0]!r}: inconsistent quant_state for {w!r}: {e}") from None
            if tuple(qt.shape) != (group.module.out_features, group.module.in_features):
                raise ValueError(f"{self.ckpt.entries[w][0]!r}: the quant_state of {w!r} says shape {list(qt.shape)}, "
                                 f"the model's Linear is [{group.module.out_features}, {group.module.in_features}]")
            if qt.quant_type != self.cfg.quant_type:
                raise ValueError(f"{self.ckpt.entries[w][0]!r}: {w!r} is {qt.quant_type}, but {self.cfg.quant_type!r} "
                                 f"was asked for (quant_type / config.json)")
            qt = qt.to(self.device)
        bias = group.got.get(f"{group.name}.bias")
        layer = QuantizedLinear(qt, None if bias is None else bias.to(self.device),
                                compute_dtype=self.cfg.compute_dtype)
        parent, child = _split(group.name)
        setattr(self.model.get_submodule(parent), child, layer)
        group.got.clear()
        group.qt = None

    # ---- what checkpoints never hold --------------------------------------------------------
    def rebuild_meta_buffers(self) -> None:
        pending = [(n, m) for n, m in self.model.named_modules()
                   if any(b is not None and b.is_meta for b in m._buffers.values())]
        init = getattr(self.model, "_init_weights", None)
        left = []
        for name, module in pending:
            own_params = [p for p in module._parameters.values() if p is not None]
            if not callable(init) or own_params:  # _init_weights would also re-initialize loaded parameters
                left += [f"{name}.{b}" if name else b for b, t in module._buffers.items() if t is not None and t.is_meta]
                continue
            for bname, b in list(module._buffers.items()):
                if b is not None and b.is_meta:
                    module._buffers[bname] = torch.empty_like(b, device=self.device)
            with torch.no_grad():
                init(module)
        left += [n for n, p in self.model.named_parameters() if p.is_meta]
        if left:
            raise ValueError(f"{type(self.model).__name__}: {_listing(left)} are still on the meta device: the "
                             f"checkpoint does not hold them and the model cannot rebuild them; build the model "
                             f"with its buffers on a real device")


def load_quantized(model: nn.Module, path: str | os.PathLike, *, quant_type: str | None = None, blocksize: int = 64,
                   double_quant: bool = True, compute_dtype: torch.dtype | None = None,
                   skip_modules=None, device: torch.device | str | None = None) -> nn.Module:
    """Fill ``model`` from the checkpoint folder ``path``, every eligible Linear in 4-bit.

    Args:
        model: a plain model (``nn.Linear`` layers, no LoRA layers yet), typically built under
            ``torch.device("meta")``.
        path: a folder with ``model.safetensors`` or ``model.safetensors.index.json`` + shards.
        quant_type: ``"nf4"`` / ``"fp4"``. Required for a 16-bit checkpoint; for a 4-bit one it
            must agree with the file (None: the file's).
        blocksize, double_quant: how a 16-bit checkpoint is quantized (ignored for a 4-bit one,
            whose quant_state says it).
        compute_dtype: the quantized layers' compute dtype (None: the input's dtype).
        skip_modules: Linears a 16-bit checkpoint leaves 16-bit (``LoRAConfig.skip_modules``
            rules), besides the output layer and tied weights.
        device: where the loaded tensors go (and where quantization runs); default CPU.

    Returns:
        ``model``, its quantized Linears replaced by ``lora.QuantizedLinear``.

    Raises:
        FileNotFoundError: a missing folder or shard (named).
        ValueError: a malformed / truncated / corrupt file, an index that disagrees with its
            shards, missing or unexpected keys (listed), a shape or dtype that does not fit the
            model, an inconsistent quant_state, a quant_type mismatch, a 16-bit checkpoint
            without ``quant_type`` (each naming the file and the key).
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    adapted = [n for n, m in model.named_modules() if isinstance(m, (LoRALayer, QuantizedLinear))]
    if adapted:
        raise ValueError(f"load_quantized fills a plain model; {type(model).__name__} already has LoRA / quantized "
                         f"layers {_listing(adapted)} (load the base first, then lora.apply_lora)")
    if quant_type is not None and quant_type not in BNB_QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {BNB_QUANT_TYPES} (bitsandbytes' format) or None, got {quant_type!r}")
    folder = os.fspath(path)
    ckpt = open_checkpoint(folder)
    qc = read_quantization_config(folder)
    prequantized = any(QUANT_STATE_TAG in k for k in ckpt.entries)
    if qc is not None and not prequantized:
        raise ValueError(f"{os.path.join(folder, CONFIG_NAME)!r} declares a bitsandbytes 4-bit model but no shard "
                         f"holds a '*.weight.{QUANT_STATE_TAG}*' key")
    if prequantized:
        in_files = {k.rpartition(QUANT_STATE_TAG)[2] for k in ckpt.entries if QUANT_STATE_TAG in k}
        wanted = {quant_type} if quant_type is not None else set()
        if qc is not None:
            wanted.add(qc.get("bnb_4bit_quant_type", "fp4"))
        if len(in_files | wanted) > 1:
            raise ValueError(f"{folder!r}: quant types disagree: the files hold {sorted(in_files)}, "
                             f"quant_type / config.json ask for {sorted(wanted)}")
        quant_type = next(iter(in_files))
    elif quant_type is None:
        raise ValueError(f"{folder!r} is a 16-bit checkpoint: pass quant_type='nf4' (QLoRA) or 'fp4' to quantize it "
                         f"as it is read")
    cfg = LoRAConfig(quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
                     compute_dtype=compute_dtype, skip_modules=skip_modules)  # validates them all
    loader = _Loader(model, ckpt, cfg, prequantized, torch.device("cpu" if device is None else device))
    loader.run()
    loader.rebuild_meta_buffers()
    return model
