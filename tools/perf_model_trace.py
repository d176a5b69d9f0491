"""Running the real ops "on an H200" without one, for ``tools/perf_model.py``: every kernel the
ops would launch is captured, nothing executes.

- ``install_fake_driver()`` makes triton (3.6, the H200's version) believe the current device is an
  sm_90 GPU, so ``JITFunction.run`` compiles for ``sm_90a``;
- ``Tracer`` (a context manager) patches ``JITFunction.run`` to compile only (``warmup=True``) and
  record a ``TritonLaunch`` (grid, warps, constexprs, named arguments, cubin, PTX); it raises
  triton's ``OutOfResources`` where the H200 would refuse the launch (more than 227 KB of shared
  memory), so the launchers' own retry logic runs as on the GPU. ``Autotuner.run`` compiles
  every config that survives pruning and records them as candidates of one launch (the model
  picks the one it predicts fastest: that is its guess of what the autotuner would pick);
- the same ``Tracer`` is a ``TorchDispatchMode``: every aten op on the (CPU stand-in) tensors is
  recorded as a ``TorchLaunch`` (cuBLAS for ``mm``/``addmm``/``bmm``, a memory-bound kernel for
  everything else) and never computed: outputs are empty tensors of the shape, strides and dtype
  the op's meta kernel gives. Views and allocations launch nothing. Ops of the project's own
  ``torch.library.custom_op`` s are entered (their Python body runs under the tracer) and pushed
  on a scope stack, so each launch knows which public op it belongs to.

Tensors are CPU tensors from ``torch.empty``: their pages are never touched, so a 28672 x 8192
problem costs no memory or time beyond the compile.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from triton.backends.compiler import GPUTarget
from triton.runtime.autotuner import Autotuner
from triton.runtime.driver import driver
from triton.runtime.errors import OutOfResources
from triton.runtime.jit import JITFunction

SM90 = GPUTarget("cuda", 90, 32)
MAX_SHARED_PER_BLOCK = 232448  # bytes: cudaDevAttrMaxSharedMemoryPerBlockOptin on H100/H200

GEMM_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::_addmm_activation"}
NO_KERNEL_OPS = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty",
                 "aten::new_empty_strided", "aten::detach", "aten::lift_fresh", "aten::alias",
                 "aten::_unsafe_view", "aten::set_", "aten::resize_"}
WRITE_ONLY_OPS = {"aten::fill_", "aten::zero_", "aten::zeros", "aten::full", "aten::ones"}
HOST_SYNC_OPS = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::is_nonzero"}


class FakeDriver:
    """The parts of triton's driver that compiling needs: an sm_90 CUDA target, device 0."""

    def get_current_target(self):
        return SM90

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_device_capability(self, device=None):
        return (9, 0)

    def __getattr__(self, name):
        raise AttributeError(f"FakeDriver has no {name!r}: only compiling is possible without a GPU")


def install_fake_driver() -> None:
    """Compile for sm_90a from now on (this process only; there is no way back)."""
    driver.set_active(FakeDriver())


def _dtype_name(dt: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dt, str(dt).replace("torch.", ""))


def _tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among ``tensors`` (a tensor passed twice, or as a dummy
    pointer, counts once at its largest view)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            key = t.data_ptr()
            seen[key] = max(seen.get(key, 0), t.numel() * t.element_size())
    return sum(seen.values())


@dataclass
class TritonLaunch:
    """One ``kernel[grid](...)`` call, compiled for sm_90a."""
    name: str
    grid: tuple
    args: dict  # every parameter by name: tensors as they were, scalars and constexprs as values
    num_warps: int
    num_stages: int
    shared: int  # dynamic shared memory the launch requests (bytes)
    cubin: bytes = field(repr=False)
    ptx: str = field(repr=False)
    ptx_params: list = field(repr=False)  # parameter names in PTX order (specialised ones dropped)
    constexprs: list = field(default_factory=list)  # names of the constexpr parameters
    bytes: int = 0
    scope: tuple = ()
    candidates: list | None = None  # autotuned: every config's TritonLaunch (this one is the first)

    @property
    def programs(self) -> int:
        return math.prod(self.grid)


@dataclass
class TorchLaunch:
    """One aten op: a cuBLAS GEMM or a memory-bound torch kernel."""
    op: str
    kind: str  # "cublas" | "torch"
    bytes: int
    flops: int
    dtype: str
    shapes: list
    scope: tuple = ()


@dataclass
class OpCall:
    """One call of a project op (``torch.library.custom_op``): its own inputs and outputs."""
    op: str
    bytes: int
    shapes: list
    scope: tuple


def _resolve_grid(grid, named: dict) -> tuple:
    if callable(grid):
        grid = grid(named)
    grid = tuple(int(g) for g in grid)
    return grid + (1,) * (3 - len(grid))


def _named_args(fn: JITFunction, args: tuple, kwargs: dict) -> dict:
    named = dict(zip(fn.arg_names, args))
    for p in fn.params:
        if p.name not in named:
            if p.name in kwargs:
                named[p.name] = kwargs[p.name]
            elif p.default is not inspect.Parameter.empty:
                named[p.name] = p.default
    return named


def _ptx_param_names(kernel, fn: JITFunction) -> list:
    """Parameter names in PTX order: the signature without constexprs (and the ints triton
    specialised to 1, which it turns into constexprs)."""
    sig = kernel.src.signature
    consts = {fn.arg_names[k[0]] for k in getattr(kernel.src, "constants", {}) if len(k) == 1}
    return [n for n, ty in sig.items() if ty != "constexpr" and n not in consts]


class Tracer(TorchDispatchMode):
    """Captures every launch of the code run under ``trace()`` (module docstring).

    ``t.launches``: TritonLaunch / TorchLaunch in launch order; ``t.op_calls``: OpCall of the
    project ops (namespaces in ``op_namespaces``); ``t.notes``: what could not be modelled
    faithfully (host syncs, ops run for real)."""

    def __init__(self, op_namespaces=("qlora",)):
        super().__init__()
        self.op_namespaces = tuple(op_namespaces)
        self.launches: list = []
        self.op_calls: list[OpCall] = []
        self.notes: list[str] = []
        self.scope: list[str] = []
        self._candidates: list | None = None

    # ---- triton ---------------------------------------------------------------------------
    def _jit_run(self, fn: JITFunction, args, grid, kwargs):
        kernel = _ORIG_JIT_RUN(fn, *args, grid=grid, warmup=True, **kwargs)
        md = kernel.metadata
        if md.shared > MAX_SHARED_PER_BLOCK:  # what CompiledKernel._init_handles checks on the GPU
            raise OutOfResources(md.shared, MAX_SHARED_PER_BLOCK, "shared memory")
        named = _named_args(fn, args, kwargs)
        launch = TritonLaunch(
            name=fn.__name__, grid=_resolve_grid(grid, named), args=named,
            num_warps=md.num_warps, num_stages=getattr(md, "num_stages", kwargs.get("num_stages", 0)),
            shared=md.shared, cubin=kernel.asm["cubin"], ptx=kernel.asm["ptx"],
            ptx_params=_ptx_param_names(kernel, fn), constexprs=[p.name for p in fn.params if p.is_constexpr],
            bytes=_tensor_bytes(named.values()), scope=tuple(self.scope))
        if self._candidates is not None:
            self._candidates.append(launch)
        else:
            self.launches.append(launch)
        return kernel

    def _autotune_run(self, tuner: Autotuner, args, kwargs):
        tuner.nargs = dict(zip(tuner.arg_names, args))
        configs = tuner.prune_configs(kwargs) if len(tuner.configs) > 1 else tuner.configs
        self._candidates = []
        try:
            ret = None
            for cfg in configs:
                if cfg.pre_hook is not None:
                    cfg.pre_hook({**tuner.nargs, **kwargs, **cfg.all_kwargs()})
                try:
                    ret = tuner.fn.run(*args, **kwargs, **cfg.all_kwargs())
                except OutOfResources:
                    continue  # the autotuner skips configs that do not fit (its _bench returns inf)
            found = self._candidates
        finally:
            self._candidates = None
            tuner.nargs = None
        if not found:
            raise OutOfResources(0, MAX_SHARED_PER_BLOCK, f"every autotune config of {tuner.base_fn.__name__}")
        first = found[0]
        first.candidates = found
        self.launches.append(first)
        return ret

    # ---- torch ----------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if func.namespace in self.op_namespaces:
            return self._enter_op(func, name, args, kwargs)
        with self:  # composite ops (to, reshape, matmul, ...): trace what they are made of
            out = func.decompose(*args, **kwargs)
        if out is not NotImplemented:
            return out
        if func.is_view or name in NO_KERNEL_OPS:
            return func(*args, **kwargs)
        if name in HOST_SYNC_OPS:
            self.notes.append(f"host sync: {name} in scope {self.scope}")
            self.launches.append(TorchLaunch(name, "sync", 0, 0, "", [], tuple(self.scope)))
            return func(*args, **kwargs)
        mutated = [a for a, s in zip(args, func._schema.arguments) if s.alias_info and s.alias_info.is_write]
        mutated += [kwargs[s.name] for s in func._schema.arguments
                    if s.kwarg_only and s.alias_info and s.alias_info.is_write and s.name in kwargs]
        if mutated:
            out = mutated[0] if len(func._schema.returns) <= 1 else tuple(mutated)
        else:
            out = self._meta_outputs(func, name, args, kwargs)
        self._record_torch(func, name, args, kwargs, out, mutated)
        return out

    def _meta_outputs(self, func, name, args, kwargs):
        """The op's outputs as fresh (never written) CPU tensors, shaped by its meta kernel."""
        def to_meta(x):
            if isinstance(x, torch.Tensor):
                return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
            if isinstance(x, torch.device):
                return torch.device("meta")
            return x

        def to_cpu(x):
            if isinstance(x, torch.Tensor) and x.device.type == "meta":
                return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype)
            return x

        try:
            meta_kwargs = {k: to_meta(v) for k, v in kwargs.items()}
            if "device" in meta_kwargs:
                meta_kwargs["device"] = torch.device("meta")
            return tree_map(to_cpu, func(*tree_map(to_meta, args), **meta_kwargs))
        except (NotImplementedError, RuntimeError, TypeError) as e:
            self.notes.append(f"{name} has no meta kernel ({type(e).__name__}); computed on CPU")
            return func(*args, **kwargs)

    def _record_torch(self, func, name, args, kwargs, out, mutated):
        ins = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor)]
        if name in WRITE_ONLY_OPS:
            nbytes = _tensor_bytes(outs)
        else:
            nbytes = _tensor_bytes(ins) + _tensor_bytes([o for o in outs if not any(o is m for m in mutated)])
            nbytes += _tensor_bytes(mutated)  # read and written
        flops = 0
        kind = "torch"
        if name in GEMM_OPS:
            kind = "cublas"
            mats = [a for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2]
            k = mats[-2].shape[-1] if len(mats) >= 2 else 0
            flops = 2 * outs[0].numel() * k if outs else 0
            if name == "aten::addbmm":
                flops *= mats[-2].shape[0]
        dtype = _dtype_name(outs[0].dtype) if outs else ""
        self.launches.append(TorchLaunch(name, kind, nbytes, flops, dtype,
                                         [list(t.shape) for t in ins + outs], tuple(self.scope)))

    def _enter_op(self, func, name, args, kwargs):
        """Run a project op's Python body under the tracer, inside its scope."""
        from torch._library.custom_ops import OPDEFS

        opdef = OPDEFS.get(name)
        self.scope.append(name)
        try:
            if opdef is None:
                self.notes.append(f"{name} is not a torch.library.custom_op: its inner launches are not traced")
                out = func(*args, **kwargs)  # the mode is off inside this handler
            else:
                with self:
                    out = opdef._init_fn(*args, **kwargs)
        finally:
            self.scope.pop()
        tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor)]
        self.op_calls.append(OpCall(name, _tensor_bytes(tensors + outs), [list(t.shape) for t in tensors + outs],
                                    tuple(self.scope)))
        return out


_ACTIVE: Tracer | None = None
_ORIG_JIT_RUN = JITFunction.run
_ORIG_AUTOTUNE_RUN = Autotuner.run


def _patched_jit_run(self, *args, grid, warmup, **kwargs):
    if _ACTIVE is None:
        return _ORIG_JIT_RUN(self, *args, grid=grid, warmup=warmup, **kwargs)
    return _ACTIVE._jit_run(self, args, grid, kwargs)


def _patched_autotune_run(self, *args, **kwargs):
    if _ACTIVE is None:
        return _ORIG_AUTOTUNE_RUN(self, *args, **kwargs)
    return _ACTIVE._autotune_run(self, args, kwargs)


@contextlib.contextmanager
def trace(op_namespaces=("qlora",)):
    """``with trace() as t:`` run ops; afterwards ``t.launches`` / ``t.op_calls`` / ``t.notes``.
    Needs ``install_fake_driver()`` first. Not re-entrant."""
    global _ACTIVE
    if _ACTIVE is not None:
        raise RuntimeError("perf_model_trace.trace() is already active")
    tracer = Tracer(op_namespaces)
    _ACTIVE = tracer
    JITFunction.run = _patched_jit_run
    Autotuner.run = _patched_autotune_run
    try:
        with tracer:
            yield tracer
    finally:
        _ACTIVE = None
        JITFunction.run = _ORIG_JIT_RUN
        Autotuner.run = _ORIG_AUTOTUNE_RUN


__all__ = ["install_fake_driver", "trace", "Tracer", "TritonLaunch", "TorchLaunch", "OpCall"]
