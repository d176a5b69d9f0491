"""``PagedAdamW``: torch.optim.AdamW's math, a fused Triton update, 32- or 8-bit state, and
state that pages between GPU and host through CUDA unified memory.

Update (per parameter, step t; identical to torch.optim.AdamW, see kernels/adamw.py)::

    p <- p (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

How it differs from its neighbours:

* torch.optim.AdamW keeps state in the parameter's dtype (bf16 params -> bf16 moments) and
  rounds after each of its operations. PagedAdamW keeps fp32 (or 8-bit) state for every
  parameter dtype, computes in fp32 and rounds the parameter once per step. For fp32
  parameters the two agree to float32 rounding; torch's bf16/fp16 state dicts load (upcast).
* bitsandbytes' CUDA kernels apply the decoupled decay *after* the Adam step
  (``p <- (p - lr_t * m / (sqrt(v) + eps_t)) (1 - lr wd)``, NOTES §2), a difference of order
  ``lr^2 wd`` per step; its PyTorch/CPU fallbacks (0.50.2) decay first, as here (tested: same
  trajectory to 1e-6). bitsandbytes writes eps as ``eps * sqrt(1 - b2^t)`` against the
  un-corrected ``sqrt(v)``: the same value.
* bitsandbytes' 8-bit state (``AdamW8bit`` / ``PagedAdamW8bit``) has our layout (signed
  dynamic map for m, unsigned for v, fp32 absmax per 256 block, tensors < 4096 elements in
  32 bit), under the keys ``state1/absmax1/state2/absmax2``. Its CPU path rounds through a
  65536-entry table where we round to the nearest level: from the same state a step moves the
  parameter identically and ~0.1% of codes land one level apart, all on a level boundary.
* bitsandbytes pages the state of tensors with >= 1e5 elements (our default
  ``page_min_numel``) with one prefetch per state tensor; we pack state into arenas and
  prefetch the next arena on a side stream while the current one updates (optim/paging.py).
"""

from __future__ import annotations

import math
from collections import defaultdict
from copy import deepcopy
from itertools import chain
from typing import Any
from collections.abc import Callable, Iterable

import torch

from kernels.adamw import adamw_update

from . import paging
from .state import (
    Arena,
    allocate_state,
    state_from_saved,
    state_nbytes,
    state_to_cpu,
    uses_8bit,
)

__all__ = ["PagedAdamW", "PAGE_MIN_NUMEL", "ARENA_BYTES"]

PAGE_MIN_NUMEL = 100_000  # bitsandbytes pages state of tensors with at least 1e5 elements
ARENA_BYTES = 256 << 20  # one prefetch moves up to this much state
_TORCH_ONLY_KEYS = {"amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                    "differentiable": False, "fused": None, "decoupled_weight_decay": True}
_FUSED_BACKEND = {None: "auto", True: "triton", False: "reference"}


def _dtensor_type():
    """``torch.distributed.tensor.DTensor`` when this torch build has it, else None."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _local(t):
    """The rank-local shard of a DTensor (FSDP2 parameters and gradients), else ``t`` itself.
    AdamW is elementwise, so each rank updates its own slice of each parameter."""
    dtensor = _dtensor_type()
    return t.to_local() if dtensor is not None and isinstance(t, dtensor) else t


def _as_shard_of(t, p):
    """State tensor ``t`` of a DTensor parameter ``p``, shaped like p's local shard, as a DTensor
    with p's placement (so that torch.distributed.checkpoint saves every rank's slice)."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(p, dtensor) or not torch.is_tensor(t) or isinstance(t, dtensor):
        return t
    if t.shape != p.to_local().shape:
        return t
    return dtensor.from_local(t, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def _agree_across_shards(ok: torch.Tensor, grads: list) -> torch.Tensor:
    """A sharded parameter is skipped on every rank when any shard is non-finite (else the ranks
    would update different slices): MIN all-reduce of the flags over each mesh dimension."""
    dtensor = _dtensor_type()
    meshes = {g.device_mesh for g in grads if dtensor is not None and isinstance(g, dtensor)}
    if not meshes:
        return ok
    flags = ok.to(torch.int32)
    for mesh in meshes:
        for dim in range(mesh.ndim):
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN, group=mesh.get_group(dim))
    return flags.bool()


def _validate_hyper(lr, betas, eps, weight_decay) -> None:
    """torch.optim.AdamW's checks, with its messages."""
    lr_value = float(lr)
    if not 0.0 <= lr_value:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= float(eps):
        raise ValueError(f"Invalid epsilon value: {eps}")
    if len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i in (0, 1):
        if not 0.0 <= float(betas[i]) < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {betas[i]}")
    if not 0.0 <= float(weight_decay):
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


class PagedAdamW(torch.optim.Optimizer):
    """AdamW with paged, optionally 8-bit state and a fused Triton update (module docstring).

    Args:
        params: parameters or parameter groups, as for any ``torch.optim.Optimizer``.
        lr, betas, eps, weight_decay: as torch.optim.AdamW (decoupled decay, applied first).
        paged: allocate the state of CUDA parameters with at least ``page_min_numel``
            elements in unified memory, paged in before each update and out by ``page_out``.
            Falls back to ordinary GPU memory (one warning) when unified memory is unusable.
            On CPU the state is already in host memory and paging does nothing.
        state_bits: 32 (fp32 m and v) or 8 (blockwise 8-bit m and v for tensors with at least
            4096 elements; 2.03 instead of 8 bytes of state per parameter).
        page_min_numel: smallest tensor whose state is paged.
        skip_nonfinite: when a gradient holds NaN or Inf, leave that parameter and its state
            untouched (its step count too) and count it in ``nonfinite_skips``; one device
            sync per step. Default False: like torch, non-finite values flow into the update.
        amsgrad, maximize: accepted for signature compatibility; True raises ValueError.
        fused: None = Triton on CUDA, the PyTorch reference on CPU (Triton under
            TRITON_INTERPRET=1); True = always Triton; False = always the reference.
        arena_bytes: most state bytes packed into one paged buffer (one prefetch).
        paging_backend: a ``optim.paging.PagingBackend`` to use for every device instead of
            the automatic choice (tests record the paging schedule with one).

    Attributes:
        nonfinite_skips: parameter updates skipped for non-finite gradients since creation.
        last_skipped: the parameters skipped in the last step.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        paged: bool = True,
        state_bits: int = 32,
        page_min_numel: int = PAGE_MIN_NUMEL,
        skip_nonfinite: bool = False,
        *,
        amsgrad: bool = False,
        maximize: bool = False,
        fused: bool | None = None,
        arena_bytes: int = ARENA_BYTES,
        paging_backend: paging.PagingBackend | None = None,
    ) -> None:
        _validate_hyper(lr, betas, eps, weight_decay)
        if amsgrad:
            raise ValueError("PagedAdamW does not implement amsgrad (got amsgrad=True)")
        if maximize:
            raise ValueError("PagedAdamW does not implement maximize (got maximize=True); negate the loss")
        if state_bits not in (8, 32):
            raise ValueError(f"state_bits must be 8 or 32, got {state_bits!r}")
        if isinstance(page_min_numel, bool) or not isinstance(page_min_numel, int) or page_min_numel < 0:
            raise ValueError(f"page_min_numel must be a non-negative int, got {page_min_numel!r}")
        if fused not in _FUSED_BACKEND:
            raise ValueError(f"fused must be None, True or False, got {fused!r}")
        if not isinstance(arena_bytes, int) or arena_bytes < 0:
            raise ValueError(f"arena_bytes must be a non-negative int, got {arena_bytes!r}")
        self.paged = bool(paged)
        self.state_bits = state_bits
        self.page_min_numel = page_min_numel
        self.skip_nonfinite = bool(skip_nonfinite)
        self.fused = fused
        self.arena_bytes = arena_bytes
        self.nonfinite_skips = 0
        self.last_skipped: list[torch.Tensor] = []
        self._paging_backend = paging_backend
        self._backends: dict[str, paging.PagingBackend] = {}
        self._arenas: list[Arena] = []
        self._arena_of: dict[torch.Tensor, Arena] = {}
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    _CONFIG = ("paged", "state_bits", "page_min_numel", "skip_nonfinite", "fused", "arena_bytes",
               "nonfinite_skips")

    def __getstate__(self) -> dict[str, Any]:
        # torch pickles/deep-copies defaults, state and groups only; keep the configuration too
        # (a copy's state is ordinary memory: arenas and backends are per live optimizer)
        return {**super().__getstate__(), **{k: getattr(self, k) for k in self._CONFIG}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.last_skipped, self._paging_backend, self._backends = [], None, {}
        self._arenas, self._arena_of = [], {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        g = self.param_groups[-1]
        for p in g["params"]:
            if p.is_complex():
                raise TypeError(f"PagedAdamW does not support complex parameters, got {p.dtype}")
        _validate_hyper(g["lr"], g["betas"], g["eps"], g["weight_decay"])

    # ---------------------------------------------------------------------------------------
    # step
    # ---------------------------------------------------------------------------------------

    def _backend(self, device: torch.device) -> paging.PagingBackend:
        key = str(device)
        if key not in self._backends:
            if self._paging_backend is not None:
                self._backends[key] = self._paging_backend
            elif self.paged and device.type == "cuda":
                self._backends[key] = paging.managed_backend(device)
            else:
                self._backends[key] = paging.DeviceBackend()
        return self._backends[key]

    def _install(self, params: list[torch.Tensor], values: list, steps: list[torch.Tensor]) -> None:
        """Allocate state for ``params`` (initial tensors in ``values``, None = zeros)."""
        by_device: dict[torch.device, list[int]] = defaultdict(list)
        for i, p in enumerate(params):
            by_device[p.device].append(i)
        for device, idx in by_device.items():
            backend = self._backend(device)
            ps = [_local(params[i]) for i in idx]  # state is shaped like the local shard
            owner = {id(lp): params[i] for lp, i in zip(ps, idx)}
            eight = [uses_8bit(p.numel(), self.state_bits) for p in ps]
            paged = [backend.managed and p.numel() >= max(1, self.page_min_numel) for p in ps]
            states, arenas = allocate_state(ps, [values[i] for i in idx], eight, backend, paged, self.arena_bytes)
            for i, st in zip(idx, states):
                self.state[params[i]] = {"step": steps[i], **st}
            for arena in arenas:
                arena.params = [owner[id(lp)] for lp in arena.params]  # keyed by the parameter itself
                self._arenas.append(arena)
                for p in arena.params:
                    self._arena_of[p] = arena

    def _drop_nonfinite(self, items: list) -> list:
        by_device: dict[torch.device, list[int]] = defaultdict(list)
        for i, (_, g, _) in enumerate(items):
            if g.numel():
                by_device[g.device].append(i)
        finite = [True] * len(items)
        for idx in by_device.values():
            locs = [_local(items[i][1]) for i in idx]
            norms = torch.stack([torch.linalg.vector_norm(g, ord=math.inf).float() if g.numel() else
                                 torch.zeros((), device=g.device) for g in locs])
            ok = _agree_across_shards(torch.isfinite(norms), [items[i][1] for i in idx])
            for i, flag in zip(idx, ok.tolist()):  # one sync per device, by design
                finite[i] = flag
        self.last_skipped = [it[0] for it, ok in zip(items, finite) if not ok]
        self.nonfinite_skips += len(self.last_skipped)
        return [it for it, ok in zip(items, finite) if ok]

    def _update(self, items: list) -> None:
        """Fused launches for ``items`` [(p, g, group index)], one per group of equal settings."""
        launches: dict[tuple, list] = defaultdict(list)
        for p, g, gi in items:
            st = self.state[p]
            launches[(gi, float(st["step"]), "exp_avg_codes" in st)].append((p, g, st))
        for (gi, step, eight_bit), batch in launches.items():
            group = self.param_groups[gi]
            ps = [_local(b[0]) for b in batch]
            gs = [_local(b[1]) for b in batch]
            sts = [b[2] for b in batch]
            kw = {}
            if eight_bit:
                m = [s["exp_avg_codes"] for s in sts]
                v = [s["exp_avg_sq_codes"] for s in sts]
                kw = dict(exp_avg_absmax=[s["exp_avg_absmax"] for s in sts],
                          exp_avg_sq_absmax=[s["exp_avg_sq_absmax"] for s in sts])
            else:
                m = [s["exp_avg"] for s in sts]
                v = [s["exp_avg_sq"] for s in sts]
            adamw_update(ps, gs, m, v, step=int(step), lr=float(group["lr"]), betas=tuple(group["betas"]),
                         eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
                         backend=_FUSED_BACKEND[self.fused], check=False, **kw)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One AdamW step for every parameter with a gradient. Returns ``closure()`` if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        items = []
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise RuntimeError("PagedAdamW does not support sparse gradients")
                items.append((p, g, gi))
        if self.skip_nonfinite:
            items = self._drop_nonfinite(items)
        if not items:
            return loss
        fresh = [p for p, _, _ in items if not self.state.get(p)]
        if fresh:
            self._install(fresh, [None] * len(fresh), [torch.tensor(0.0) for _ in fresh])
        torch._foreach_add_([self.state[p]["step"] for p, _, _ in items], 1.0)

        by_device: dict[torch.device, list] = defaultdict(list)
        for it in items:
            by_device[it[0].device].append(it)
        for device, dev_items in by_device.items():
            units: dict[Arena | None, list] = {None: []}
            for it in dev_items:
                units.setdefault(self._arena_of.get(it[0]), []).append(it)
            ordered = [(None if a is None else a.buffer, lst) for a, lst in units.items() if lst]
            paging.PageScheduler(self._backend(device)).run(ordered, self._update, device)
        return loss

    # ---------------------------------------------------------------------------------------
    # paging and memory
    # ---------------------------------------------------------------------------------------

    def page_out(self) -> int:
        """Move all paged state to host memory (returns when it is there), freeing the GPU for
        evaluation or generation. The next ``step`` pages it back in. Returns the bytes moved.
        State of tensors below ``page_min_numel`` stays where it is."""
        by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
        for arena in self._arenas:
            by_device[arena.buffer.device].append(arena.buffer)
        for device, bufs in by_device.items():
            paging.PageScheduler(self._backend(device)).page_out(bufs, device)
        return sum(b.numel() for bufs in by_device.values() for b in bufs)

    def state_bytes(self) -> dict[str, int]:
        """Bytes of optimizer state: ``paged`` (unified-memory arenas, padding included),
        ``unpaged`` (ordinary tensors) and ``total``."""
        paged = sum(a.buffer.numel() for a in self._arenas)
        unpaged = sum(state_nbytes(st) for p, st in self.state.items() if p not in self._arena_of)
        return {"paged": paged, "unpaged": unpaged, "total": paged + unpaged}

    # ---------------------------------------------------------------------------------------
    # checkpoints
    # ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """torch's format with plain CPU tensors (copies, never views of paged memory). Groups
        carry torch.optim.AdamW's extra keys so that it can load this state dict."""
        sd = super().state_dict()
        by_id = dict(zip(chain.from_iterable(g["params"] for g in sd["param_groups"]),
                         chain.from_iterable(g["params"] for g in self.param_groups)))
        sd["state"] = {k: {key: _as_shard_of(t, by_id[k]) for key, t in state_to_cpu(v).items()}
                       for k, v in sd["state"].items()}
        for g in sd["param_groups"]:
            for key, value in _TORCH_ONLY_KEYS.items():
                g.setdefault(key, value)
        sd["nonfinite_skips"] = self.nonfinite_skips
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of PagedAdamW (32- or 8-bit, converted to this optimizer's
        ``state_bits``) or of torch.optim.AdamW. Validates everything before changing anything.

        Raises:
            ValueError: group count/size mismatch, amsgrad/maximize groups, unknown parameter
                ids, missing or mis-sized state tensors.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = pre_hook(self, state_dict)
            if out is not None:
                state_dict = out
        groups = self.param_groups
        saved_groups = deepcopy(state_dict["param_groups"])
        if len(groups) != len(saved_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)):
            raise ValueError("loaded state dict contains a parameter group that doesn't match the size "
                             "of optimizer's group")
        id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                          chain.from_iterable(g["params"] for g in groups)))
        new_groups = []
        for i, (group, saved) in enumerate(zip(groups, saved_groups)):
            for flag in ("amsgrad", "maximize"):
                if saved.get(flag):
                    raise ValueError(f"param group {i} has {flag}=True, which PagedAdamW does not implement")
            new = {k: v for k, v in saved.items() if k not in _TORCH_ONLY_KEYS}
            new["params"] = group["params"]
            if "param_names" in group and "param_names" not in new:
                new["param_names"] = group["param_names"]
            for key in ("lr", "betas", "eps", "weight_decay"):
                new.setdefault(key, group[key])
            new["betas"] = tuple(new["betas"])
            _validate_hyper(new["lr"], new["betas"], new["eps"], new["weight_decay"])
            new_groups.append(new)
        params, values, steps = [], [], []
        for pid, saved in state_dict["state"].items():
            if pid not in id_map:
                raise ValueError(f"state for parameter id {pid!r} matches no parameter of the loaded groups")
            p = id_map[pid]
            if "step" not in saved:
                raise ValueError(f"state[{pid!r}] has no 'step'")
            params.append(p)
            local = _local(p)  # DTensor state (what state_dict writes for DTensor params) loads shard by shard
            saved = {k: _local(v) if torch.is_tensor(v) else v for k, v in saved.items()}
            values.append(state_from_saved(saved, local, uses_8bit(local.numel(), self.state_bits), f"state[{pid!r}]"))
            steps.append(torch.as_tensor(saved["step"]).detach().to("cpu", torch.float32).reshape(()).clone())
        # everything is valid: replace the state
        self.param_groups = new_groups
        self.state = defaultdict(dict)
        self._arenas, self._arena_of = [], {}
        self._install(params, values, steps)
        self.nonfinite_skips = int(state_dict.get("nonfinite_skips", 0))
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)
