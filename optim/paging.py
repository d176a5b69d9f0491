"""Paging optimizer state between GPU and host through CUDA unified (managed) memory.

Storage: state buffers are allocated with ``cudaMallocManaged`` and wrapped as CUDA uint8
tensors that free the allocation when the last view of them dies. A managed page lives on
the GPU or on the host; the driver migrates it on access, evicts it to the host under memory
pressure, and ``cudaMemPrefetchAsync`` migrates a range ahead of time.

Schedule (``PageScheduler``), for units u0, u1, ... (a unit = one buffer of state and the
update that reads it)::

    begin()                         side stream waits for the work already queued
    prefetch(u0 -> GPU, now)        on the current stream
    for i:  prefetch(u{i+1} -> GPU, ahead)    on a side stream, overlapping update(u_i)
            wait(u_i)               current stream waits for u_i's prefetch
            update(u_i)             the fused AdamW launch(es) of u_i
    page_out: prefetch(every unit -> host, now); synchronize()

Backends (all share the small ``PagingBackend`` interface):

* ``ManagedBackend``: the real thing (CUDA with concurrent managed access);
* ``DeviceBackend``: ordinary memory on the parameter's device, prefetch does nothing (CPU,
  ``paged=False``, and the fallback when managed memory is unusable);
* ``RecordingBackend``: records every call, so the schedule's order is unit-tested on CPU.
  It only checks the order; the real validation is a GPU run (benchmarks/gpu_suite.py).
"""

from __future__ import annotations

import threading
import warnings
import weakref
from typing import Any
from collections.abc import Callable, Sequence

import torch

from . import cudart

__all__ = [
    "PagingBackend",
    "DeviceBackend",
    "ManagedBackend",
    "RecordingBackend",
    "PageScheduler",
    "managed_backend",
    "wrap_pointer",
]


class PagingBackend:
    """Where state buffers live and how they move. The default methods do nothing."""

    managed = False  # buffers from ``allocate`` are pageable

    def allocate(self, nbytes: int, device: torch.device) -> torch.Tensor:
        """A ``uint8 [nbytes]`` buffer usable by kernels on ``device`` (contents undefined)."""
        raise NotImplementedError

    def begin(self, device: torch.device) -> None:
        """Order later ahead-of-time prefetches after the work already queued on ``device``."""

    def prefetch(self, buf: torch.Tensor, device: torch.device | None, *, ahead: bool) -> Any:
        """Start moving ``buf`` to ``device`` (None = host). ``ahead``: overlap with the current
        stream's work; returns a token for ``wait``."""
        return None

    def wait(self, token: Any) -> None:
        """Make the current stream wait for the prefetch that returned ``token``."""

    def updating(self, buf: torch.Tensor | None) -> None:
        """Called just before the update that reads ``buf`` is queued (a tracing hook)."""

    def synchronize(self, device: torch.device) -> None:
        """Block until every prefetch queued for ``device`` has completed."""


class DeviceBackend(PagingBackend):
    """Ordinary memory on the parameter's device; nothing to page."""

    def allocate(self, nbytes: int, device: torch.device) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)


class _Allocation:
    """Owns one allocation: exposes it through the array interface of its device and frees it
    (``free(ptr)``) when the last tensor viewing it is gone."""

    def __init__(self, ptr: int, nbytes: int, device: torch.device, free: Callable[[int], None]):
        self.ptr, self.nbytes, self.device = ptr, nbytes, device
        iface = {"shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "version": 3, "strides": None}
        if device.type == "cuda":
            self.__cuda_array_interface__ = iface
        else:
            self.__array_interface__ = iface
        weakref.finalize(self, _free_quietly, free, ptr)


def _free_quietly(free: Callable[[int], None], ptr: int) -> None:
    try:
        free(ptr)
    except Exception as err:  # noqa: BLE001 - a finalizer must not raise (e.g. at interpreter exit)
        warnings.warn(f"freeing optimizer state at {ptr:#x} failed: {err}", RuntimeWarning, stacklevel=1)


def wrap_pointer(ptr: int, nbytes: int, device: torch.device, free: Callable[[int], None]) -> torch.Tensor:
    """A ``uint8 [nbytes]`` tensor over raw memory at ``ptr`` that calls ``free(ptr)`` once no
    tensor (or view) uses it any more. CUDA memory goes through ``__cuda_array_interface__``
    (torch keeps the owner alive for the tensor's lifetime), host memory through numpy's
    ``__array_interface__``."""
    owner = _Allocation(ptr, nbytes, device, free)
    if device.type == "cuda":
        t = torch.as_tensor(owner, device=device)
    else:
        import numpy as np

        t = torch.from_numpy(np.asarray(owner))
    if t.data_ptr() != ptr or t.numel() != nbytes:
        raise RuntimeError(f"wrapping {nbytes} bytes at {ptr:#x} gave {t.numel()} bytes at {t.data_ptr():#x}")
    return t


class ManagedBackend(PagingBackend):
    """CUDA unified memory: ``cudaMallocManaged`` buffers, ``cudaMemPrefetchAsync`` moves.

    Ahead-of-time prefetches run on a side stream so they overlap the update kernels on the
    current stream; events order them (see the module docstring).
    """

    managed = True

    def __init__(self, runtime: cudart.CudaRuntime, device: torch.device) -> None:
        self.runtime, self.device = runtime, device
        self._side: torch.cuda.Stream | None = None
        self._warned_oversubscribed = False

    def _side_stream(self) -> torch.cuda.Stream:
        if self._side is None:
            self._side = torch.cuda.Stream(device=self.device)
        return self._side

    def allocate(self, nbytes: int, device: torch.device) -> torch.Tensor:
        free_bytes, _ = torch.cuda.mem_get_info(device)
        if nbytes > free_bytes and not self._warned_oversubscribed:
            self._warned_oversubscribed = True
            warnings.warn(f"optimizer state of {nbytes} bytes exceeds the {free_bytes} bytes free on "
                          f"{device}: it will live partly on the host and be paged in on use",
                          RuntimeWarning, stacklevel=3)
        ptr = self.runtime.malloc_managed(nbytes)
        return wrap_pointer(ptr, nbytes, device, self.runtime.free)

    def begin(self, device: torch.device) -> None:
        # Prefetches issued ahead must not migrate pages that kernels already queued on the
        # current stream (previous step, page_out) still use: start the side stream after them.
        self._side_stream().wait_stream(torch.cuda.current_stream(device))

    def prefetch(self, buf: torch.Tensor, device: torch.device | None, *, ahead: bool) -> Any:
        dev = self.device if buf.device.index is None else buf.device
        stream = self._side_stream() if ahead else torch.cuda.current_stream(dev)
        target = None if device is None else (device.index if device.index is not None else dev.index)
        self.runtime.prefetch(buf.data_ptr(), buf.numel(), target, stream.cuda_stream)
        if not ahead:
            return None
        done = torch.cuda.Event()
        done.record(stream)
        return done

    def wait(self, token: Any) -> None:
        if token is not None:
            torch.cuda.current_stream(self.device).wait_event(token)

    def synchronize(self, device: torch.device) -> None:
        # page_out must return with the pages on the host, so that the GPU memory they held is
        # free for whatever runs next (evaluation, generation): wait for the migrations.
        torch.cuda.current_stream(device).synchronize()
        if self._side is not None:
            self._side.synchronize()


class RecordingBackend(PagingBackend):
    """Records every call as a tuple in ``calls``; storage comes from ``inner`` (host or device
    memory), which it pretends is pageable. Buffers are named ``buf0, buf1, ...`` in allocation
    order.

    Recorded events: ``("allocate", name, nbytes)``, ``("begin",)``,
    ``("prefetch", name, "device" | "host", "ahead" | "now")``, ``("wait", name)``,
    ``("update", name)`` and ``("synchronize",)``.
    """

    managed = True

    def __init__(self, inner: PagingBackend | None = None) -> None:
        self.inner = inner or DeviceBackend()
        self.calls: list[tuple] = []
        self._names: dict[int, str] = {}

    def name(self, buf: torch.Tensor | None) -> str | None:
        return None if buf is None else self._names.get(buf.data_ptr(), f"?{buf.data_ptr():#x}")

    def allocate(self, nbytes: int, device: torch.device) -> torch.Tensor:
        buf = self.inner.allocate(nbytes, device)
        self._names[buf.data_ptr()] = f"buf{len(self._names)}"
        self.calls.append(("allocate", self.name(buf), nbytes))
        return buf

    def begin(self, device: torch.device) -> None:
        self.calls.append(("begin",))
        self.inner.begin(device)

    def prefetch(self, buf: torch.Tensor, device: torch.device | None, *, ahead: bool) -> Any:
        where = "host" if device is None else "device"
        self.calls.append(("prefetch", self.name(buf), where, "ahead" if ahead else "now"))
        return (self.name(buf), self.inner.prefetch(buf, device, ahead=ahead))

    def wait(self, token: Any) -> None:
        if token is not None:
            self.calls.append(("wait", token[0]))
            self.inner.wait(token[1])

    def updating(self, buf: torch.Tensor | None) -> None:
        self.calls.append(("update", self.name(buf)))

    def synchronize(self, device: torch.device) -> None:
        self.calls.append(("synchronize",))
        self.inner.synchronize(device)


class PageScheduler:
    """Runs updates over units of state in order, paging each in just ahead of its update."""

    def __init__(self, backend: PagingBackend) -> None:
        self.backend = backend

    def run(self, units: Sequence[tuple[torch.Tensor | None, Any]], update: Callable[[Any], None],
            device: torch.device) -> None:
        """``units``: ``(buffer or None, payload)``; calls ``update(payload)`` for each, in order.

        A None buffer is state that does not page (ordinary device memory).
        """
        if not units:
            return
        be = self.backend
        if any(buf is not None for buf, _ in units):
            be.begin(device)
        tokens: list[Any] = [None] * len(units)
        if units[0][0] is not None:
            tokens[0] = be.prefetch(units[0][0], device, ahead=False)
        for i, (buf, payload) in enumerate(units):
            if i + 1 < len(units) and units[i + 1][0] is not None:
                tokens[i + 1] = be.prefetch(units[i + 1][0], device, ahead=True)
            be.wait(tokens[i])
            be.updating(buf)
            update(payload)

    def page_out(self, buffers: Sequence[torch.Tensor], device: torch.device) -> None:
        """Migrate ``buffers`` to host memory, after all queued work; returns once they are there."""
        for buf in buffers:
            self.backend.prefetch(buf, None, ahead=False)
        if buffers:
            self.backend.synchronize(device)


_backends: dict[str, PagingBackend] = {}
_backends_lock = threading.Lock()
_warned: set[str] = set()


def managed_backend(device: torch.device) -> PagingBackend:
    """The paging backend for CUDA ``device``: ``ManagedBackend`` when the runtime is found and
    the device has concurrent managed access; otherwise ``DeviceBackend`` with a one-time
    warning saying why (state then stays in ordinary GPU memory and ``page_out`` is a no-op)."""
    device = torch.device(device)
    if device.type != "cuda":
        return DeviceBackend()
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = str(device)
    with _backends_lock:
        if key not in _backends:
            reason = None
            try:
                rt = cudart.load_runtime()
                if not rt.supports_paging(device.index):
                    reason = (f"{device} reports no concurrent managed access "
                              f"(cudaDevAttrConcurrentManagedAccess = 0)")
            except cudart.CudaRuntimeError as err:
                reason = str(err)
            if reason is None:
                _backends[key] = ManagedBackend(rt, device)
            else:
                _backends[key] = DeviceBackend()
                if key not in _warned:
                    _warned.add(key)
                    warnings.warn(f"PagedAdamW: unified memory is not usable ({reason}); optimizer "
                                  f"state stays in ordinary memory on {device} and is not paged",
                                  RuntimeWarning, stacklevel=4)
        return _backends[key]
