"""The few CUDA runtime calls paging needs, through ctypes on the libcudart that torch ships.

No new dependency and nothing at import time: the library is located and opened on first use
(``load_runtime``), which only happens once a CUDA parameter exists, i.e. after torch has
initialised CUDA itself.

Calls used (CUDA runtime API):

    cudaRuntimeGetVersion(int*)                      -> e.g. 12080 for 12.8, 13000 for 13.0
    cudaDeviceGetAttribute(int*, attr, int device)   -> attr 83 managedMemory,
                                                        89 concurrentManagedAccess
    cudaMallocManaged(void**, size_t, unsigned flags) with cudaMemAttachGlobal = 1
    cudaFree(void*)
    cudaMemPrefetchAsync                             -> two signatures (NOTES §2):
        CUDA 12: (const void*, size_t, int dstDevice, cudaStream_t); host = cudaCpuDeviceId = -1
        CUDA 13: (const void*, size_t, cudaMemLocation{type, id}, unsigned flags, cudaStream_t);
                 type 1 = device (id = ordinal), 2 = host (id ignored)

``CudaRuntime`` takes the library object, so tests drive it with a fake that records the
arguments of each call (that is how the CUDA 12 / 13 forms are checked without a GPU).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
import threading

__all__ = [
    "CudaRuntime",
    "CudaRuntimeError",
    "MemLocation",
    "find_cudart",
    "load_runtime",
    "ATTR_MANAGED_MEMORY",
    "ATTR_CONCURRENT_MANAGED_ACCESS",
]

ATTR_MANAGED_MEMORY = 83  # cudaDevAttrManagedMemory
ATTR_CONCURRENT_MANAGED_ACCESS = 89  # cudaDevAttrConcurrentManagedAccess
MEM_ATTACH_GLOBAL = 0x01  # cudaMemAttachGlobal: accessible from any stream on any device
CPU_DEVICE_ID = -1  # cudaCpuDeviceId (CUDA 12 prefetch destination for host memory)
LOCATION_DEVICE = 1  # cudaMemLocationTypeDevice
LOCATION_HOST = 2  # cudaMemLocationTypeHost
LOCATION_API_VERSION = 13000  # first runtime whose prefetch takes a cudaMemLocation


class CudaRuntimeError(RuntimeError):
    """A CUDA runtime call returned an error code."""


class MemLocation(ctypes.Structure):
    """``struct cudaMemLocation { cudaMemLocationType type; int id; }`` (CUDA >= 12.2)."""

    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


def _loaded_cudart() -> str | None:
    """Path of a libcudart already mapped into this process (the one torch uses), if any."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if line.strip() else ""
                if "libcudart.so" in os.path.basename(path):
                    return path
    except OSError:
        pass
    return None


def find_cudart() -> str | None:
    """Locate libcudart: already loaded, else next to torch, else in nvidia pip packages, else
    the system search path. Returns a path (or a soname) or None."""
    path = _loaded_cudart()
    if path:
        return path
    roots = []
    try:
        import torch

        roots.append(os.path.join(os.path.dirname(torch.__file__), "lib"))
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    for site in sys.path:
        for sub in ("cuda_runtime", "cu13", "cu12"):
            roots.append(os.path.join(site, "nvidia", sub, "lib"))
    for root in roots:
        hits = sorted(glob.glob(os.path.join(root, "libcudart.so*")))
        if hits:
            return hits[-1]
    return ctypes.util.find_library("cudart")


class CudaRuntime:
    """Typed wrappers over the runtime calls in the module docstring.

    Args:
        lib: a ``ctypes.CDLL`` of libcudart, or any object exposing the same function names
            (tests pass a recorder). Every call checks its return code.
    """

    def __init__(self, lib) -> None:
        self.lib = lib
        version = ctypes.c_int(0)
        fn = lib.cudaRuntimeGetVersion
        fn.restype = ctypes.c_int
        self._check(fn(ctypes.pointer(version)), "cudaRuntimeGetVersion")
        self.version = int(version.value)
        self.location_api = self.version >= LOCATION_API_VERSION
        lib.cudaDeviceGetAttribute.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int]
        lib.cudaMallocManaged.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint]
        lib.cudaFree.argtypes = [ctypes.c_void_p]
        if self.location_api:
            lib.cudaMemPrefetchAsync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, MemLocation,
                                                 ctypes.c_uint, ctypes.c_void_p]
        else:
            lib.cudaMemPrefetchAsync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                 ctypes.c_void_p]
        for name in ("cudaDeviceGetAttribute", "cudaMallocManaged", "cudaFree", "cudaMemPrefetchAsync"):
            getattr(lib, name).restype = ctypes.c_int

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            msg = ""
            try:
                fn = self.lib.cudaGetErrorString
                fn.restype = ctypes.c_char_p
                raw = fn(ctypes.c_int(rc))
                msg = raw.decode() if isinstance(raw, bytes) else str(raw)
            except Exception:  # noqa: BLE001 - the error string is a courtesy
                pass
            raise CudaRuntimeError(f"{what} failed with cudaError {rc}{': ' + msg if msg else ''}")

    def device_attribute(self, attr: int, device: int) -> int:
        value = ctypes.c_int(0)
        self._check(self.lib.cudaDeviceGetAttribute(ctypes.pointer(value), ctypes.c_int(attr),
                                                    ctypes.c_int(device)), "cudaDeviceGetAttribute")
        return int(value.value)

    def malloc_managed(self, nbytes: int) -> int:
        """``cudaMallocManaged(&ptr, nbytes, cudaMemAttachGlobal)``; returns the address."""
        if nbytes <= 0:
            raise ValueError(f"nbytes must be positive, got {nbytes}")
        ptr = ctypes.c_void_p(0)
        self._check(self.lib.cudaMallocManaged(ctypes.pointer(ptr), ctypes.c_size_t(nbytes),
                                               ctypes.c_uint(MEM_ATTACH_GLOBAL)), "cudaMallocManaged")
        return int(ptr.value or 0)

    def free(self, ptr: int) -> None:
        self._check(self.lib.cudaFree(ctypes.c_void_p(ptr)), "cudaFree")

    def prefetch(self, ptr: int, nbytes: int, device: int | None, stream: int) -> None:
        """Migrate ``[ptr, ptr + nbytes)`` to GPU ``device`` (an ordinal) or, with None, to host
        memory, ordered on ``stream`` (a ``cudaStream_t`` as int; 0 = legacy default)."""
        if self.location_api:
            loc = MemLocation(LOCATION_HOST, 0) if device is None else MemLocation(LOCATION_DEVICE, device)
            rc = self.lib.cudaMemPrefetchAsync(ctypes.c_void_p(ptr), ctypes.c_size_t(nbytes), loc,
                                               ctypes.c_uint(0), ctypes.c_void_p(stream))
        else:
            dst = CPU_DEVICE_ID if device is None else device
            rc = self.lib.cudaMemPrefetchAsync(ctypes.c_void_p(ptr), ctypes.c_size_t(nbytes),
                                               ctypes.c_int(dst), ctypes.c_void_p(stream))
        self._check(rc, "cudaMemPrefetchAsync")

    def supports_paging(self, device: int) -> bool:
        """Managed memory with concurrent CPU/GPU access (needed for prefetch and eviction)."""
        return (self.device_attribute(ATTR_MANAGED_MEMORY, device) == 1
                and self.device_attribute(ATTR_CONCURRENT_MANAGED_ACCESS, device) == 1)


_lock = threading.Lock()
_runtime: list = []  # [CudaRuntime | None | Exception] once tried


def load_runtime() -> CudaRuntime:
    """The process-wide ``CudaRuntime`` (opened once).

    Raises:
        CudaRuntimeError: when no libcudart can be found or opened.
    """
    with _lock:
        if not _runtime:
            path = find_cudart()
            try:
                if path is None:
                    raise CudaRuntimeError("no libcudart found (looked next to torch, in nvidia pip "
                                           "packages and on the system library path)")
                _runtime.append(CudaRuntime(ctypes.CDLL(path)))
            except (OSError, AttributeError, CudaRuntimeError) as err:
                _runtime.append(CudaRuntimeError(f"cannot use libcudart at {path!r}: {err}"))
        rt = _runtime[0]
    if isinstance(rt, Exception):
        raise rt
    return rt
