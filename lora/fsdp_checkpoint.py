"""Checkpoints of an FSDP-sharded QLoRA model: a consolidated peft adapter, and sharded resume
checkpoints through ``torch.distributed.checkpoint`` (DCP).

    from lora.fsdp_checkpoint import save_adapter_consolidated, save_sharded, load_sharded
    save_adapter_consolidated(model, "out/adapter")          # every rank calls; rank 0 writes
    save_sharded("out/step_500", model, opt, step=500)       # every rank writes its shards
    meta = load_sharded("out/step_500", model, opt)          # into a freshly built + sharded model

Consolidated adapter: every rank all-gathers each ``lora_A`` / ``lora_B`` (``DTensor.full_tensor``,
layer by layer in module order), the chosen rank writes them with ``lora.save_adapter`` (peft's
layout, module names unchanged by ``fully_shard``), then all ranks meet at a barrier. It loads
into a single-process model with ``lora.load_adapter``.

Sharded checkpoint: only the *trained* state, keyed by parameter name so it survives a
rebuilt model and a different world size::

    "adapter::<param fqn>"         DTensor (each rank writes its shard)
    "optim::<param fqn>::<key>"    the optimizer's per-parameter state; a tensor shaped like the
                                   rank's local shard is wrapped as a DTensor with the
                                   parameter's placement; scalars ('step') are replicated
    "optim_groups"                 hyper-parameters of each group, params as fqns (replicated)
    "rng::rank<r>"                 torch.get_rng_state() of rank r (per rank: dropout seeds)
    "rng_cuda::rank<r>"            torch.cuda.get_rng_state() of rank r's current device, when
                                   CUDA is initialized (the kernels draw dropout seeds there)
    "meta"                         {"step": ..., "world_size": ..., "extra": ...} (replicated)

The two non-tensor entries are stored as ``torch.save`` bytes (DCP would otherwise flatten
them into one entry per leaf) and read back with ``weights_only=True``, so ``extra`` may hold
numbers, strings, lists, dicts and tensors.

The frozen 4-bit base is not in it: it is rebuilt by quantizing the pretrained weights
(deterministic), as with peft adapters. ``load_sharded`` builds its targets from the
checkpoint's metadata, so the optimizer may be fresh (empty state); it calls
``optimizer.load_state_dict`` with DTensor state (what ``torch.optim`` keeps for DTensor
parameters).
"""

from __future__ import annotations

import contextlib
import io
import os

import torch
from torch import nn

from .adapters import save_adapter
from .surgery import lora_layers

__all__ = [
    "CUDA_RNG_KEY",
    "RNG_KEY",
    "gathered_adapters",
    "load_sharded",
    "save_adapter_consolidated",
    "save_sharded",
    "sharded_state",
]

RNG_KEY = "rng::rank{}"
CUDA_RNG_KEY = "rng_cuda::rank{}"


def _dist():
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialized: call init_process_group first")
    return dist


def _dtensor_cls():
    from torch.distributed.tensor import DTensor

    return DTensor


@contextlib.contextmanager
def gathered_adapters(model: nn.Module):
    """Collective (every rank enters): inside the block each ``lora_A`` / ``lora_B`` is the full
    plain tensor on every rank; the sharded parameters are put back on exit. Adapters only
    (``r * (K + N)`` per layer), the 4-bit base stays sharded."""
    DTensor = _dtensor_cls()
    swapped = []
    try:
        with torch.no_grad():
            for _, layer in lora_layers(model):
                for attr in ("lora_A", "lora_B"):
                    p = layer._parameters[attr]
                    if isinstance(p, DTensor):
                        full = nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)
                        swapped.append((layer, attr, p))
                        layer._parameters[attr] = full
        yield model
    finally:
        for layer, attr, p in swapped:
            layer._parameters[attr] = p


def save_adapter_consolidated(model: nn.Module, path: str | os.PathLike, *, rank: int = 0,
                              base_model_name_or_path: str | None = None) -> None:
    """Collective: gather the adapters and write them on ``rank`` in peft's layout."""
    dist = _dist()
    with gathered_adapters(model):
        if dist.get_rank() == rank:
            save_adapter(model, path, base_model_name_or_path=base_model_name_or_path)
    dist.barrier()


# ---- sharded (DCP) checkpoints ---------------------------------------------------------------
def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _as_shard_of(t, p):
    """A state tensor of parameter ``p`` as DCP should see it: a tensor shaped like p's local
    shard becomes a DTensor with p's placement; anything else is returned as is."""
    DTensor = _dtensor_cls()
    if not isinstance(p, DTensor) or isinstance(t, DTensor) or not torch.is_tensor(t):
        return t
    local = p.to_local()
    if t.shape != local.shape:
        return t
    return DTensor.from_local(t.to(local.device), p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """The DCP state dict of the trained state (module docstring), without rng / meta."""
    params = _trainable(model)
    state: dict = {f"adapter::{n}": p.detach() for n, p in params.items()}
    if optimizer is None:
        return state
    names = {id(p): n for n, p in params.items()}
    sd = optimizer.state_dict()
    pid_to_param = {}
    for group, saved in zip(optimizer.param_groups, sd["param_groups"]):
        for p, pid in zip(group["params"], saved["params"]):
            if id(p) not in names:
                raise ValueError(f"the optimizer holds a parameter that is not a trainable parameter of "
                                 f"{type(model).__name__} (shape {tuple(p.shape)})")
            pid_to_param[pid] = p
    for pid, st in sd["state"].items():
        p = pid_to_param[pid]
        for key, value in st.items():
            state[f"optim::{names[id(p)]}::{key}"] = _as_shard_of(value, p)
    groups = []
    for saved in sd["param_groups"]:
        g = {k: v for k, v in saved.items() if k != "params"}
        g["params"] = [names[id(pid_to_param[pid])] for pid in saved["params"]]
        groups.append(g)
    state["optim_groups"] = _pack(groups)
    return state


def _pack(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unpack(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


def save_sharded(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 *, step: int | None = None, extra: dict | None = None, rng: bool = True) -> None:
    """Collective: write the adapters, the optimizer state and this rank's RNG state with DCP."""
    import torch.distributed.checkpoint as dcp

    dist = _dist()
    state = sharded_state(model, optimizer)
    state["meta"] = _pack({"step": step, "world_size": dist.get_world_size(), "extra": extra})
    if rng:
        state[RNG_KEY.format(dist.get_rank())] = torch.get_rng_state()
        if torch.cuda.is_initialized():
            state[CUDA_RNG_KEY.format(dist.get_rank())] = torch.cuda.get_rng_state()
    dcp.save(state, checkpoint_id=os.fspath(path))


def _template(meta, p):
    """An empty tensor to load a saved entry into: a DTensor sharded like ``p`` when the saved
    global shape is p's, else a plain tensor of the saved shape."""
    DTensor = _dtensor_cls()
    dtype, size = meta.properties.dtype, tuple(meta.size)
    if isinstance(p, DTensor) and size == tuple(p.shape):
        local = torch.zeros(p.to_local().shape, dtype=dtype, device=p.to_local().device)
        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                  stride=p.stride())
    return torch.zeros(size, dtype=dtype, device="cpu")


def load_sharded(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 *, rng: bool = True) -> dict:
    """Collective: load a ``save_sharded`` checkpoint into ``model`` (adapters, in place) and
    ``optimizer`` (through its ``load_state_dict``); restore this rank's RNG state.

    Returns:
        ``{"step": ..., "world_size": ..., "extra": ...}`` as saved.

    Raises:
        ValueError: a trainable parameter missing from the checkpoint, or one in it that the
            model lacks (both named); an optimizer given for a checkpoint without optimizer
            state; ``rng=True`` with no RNG state saved for this rank.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    dist = _dist()
    path = os.fspath(path)
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    params = _trainable(model)
    ckpt_params = {k.split("::", 1)[1] for k in saved if k.startswith("adapter::")}
    missing, extra = sorted(params.keys() - ckpt_params), sorted(ckpt_params - params.keys())
    if missing or extra:
        raise ValueError(f"{path!r} does not match the model's trainable parameters: missing {missing[:8]}, "
                         f"not in the model {extra[:8]}")
    if optimizer is not None and "optim_groups" not in saved:
        raise ValueError(f"{path!r} holds no optimizer state (saved with optimizer=None); pass optimizer=None")
    state: dict = {f"adapter::{n}": p.detach() for n, p in params.items()}  # loaded in place
    state["meta"] = b""
    rng_key = RNG_KEY.format(dist.get_rank())
    if rng:
        if rng_key not in saved:
            raise ValueError(f"{path!r} has no RNG state for rank {dist.get_rank()} (saved with another world "
                             f"size or rng=False); pass rng=False")
        for key in (rng_key, CUDA_RNG_KEY.format(dist.get_rank())):
            if key in saved:
                state[key] = torch.zeros(tuple(saved[key].size), dtype=saved[key].properties.dtype)
    optim_keys = [k for k in saved if k.startswith("optim::")] if optimizer is not None else []
    for key in optim_keys:
        _, name, _ = key.split("::")
        md = saved[key]
        state[key] = _template(md, params[name]) if isinstance(md, TensorStorageMetadata) else None
    if optimizer is not None:
        state["optim_groups"] = b""
    dcp.load(state, checkpoint_id=path)

    if optimizer is not None:
        _load_optimizer(optimizer, params, state, optim_keys)
    if rng:
        torch.set_rng_state(state[rng_key])
        cuda_key = CUDA_RNG_KEY.format(dist.get_rank())
        if cuda_key in state:
            torch.cuda.set_rng_state(state[cuda_key])
    return _unpack(state["meta"])


def _load_optimizer(optimizer, params, state, optim_keys) -> None:
    groups = _unpack(state["optim_groups"])
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(f"the checkpoint has {len(groups)} optimizer groups, the optimizer {len(optimizer.param_groups)}")
    names = {id(p): n for n, p in params.items()}
    ids, sd_groups = {}, []
    for group, saved in zip(optimizer.param_groups, groups):
        mine = [names.get(id(p)) for p in group["params"]]
        if mine != saved["params"]:
            raise ValueError(f"optimizer group parameters differ from the checkpoint's: {mine[:4]} vs {saved['params'][:4]}")
        g = {k: v for k, v in saved.items() if k != "params"}
        g["params"] = [ids.setdefault(n, len(ids)) for n in mine]
        sd_groups.append(g)
    per_param: dict = {}
    for key in optim_keys:
        _, name, skey = key.split("::")
        per_param.setdefault(ids[name], {})[skey] = state[key]
    optimizer.load_state_dict({"state": per_param, "param_groups": sd_groups})
