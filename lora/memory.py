"""Peak-memory probe: how much memory a block of code needed above what it started with.

    with PeakMemory(device) as pm:
        apply_lora(model, cfg)
    pm.peak_delta    # bytes: high-water mark during the block minus the level at its start
    pm.end_delta     # bytes: level at the end minus the level at the start

CUDA: the caching allocator's counters (``memory_allocated`` and the resettable peak), exact
tensor bytes. CPU: the process's resident set size from the kernel, whose high-water mark
(``VmHWM``) Linux resets on ``echo 5 > /proc/self/clear_refs``. That counts every byte the
process touches, so it is an upper bound on tensor memory (allocator slack included); run it
in a fresh process with ``MALLOC_MMAP_THRESHOLD_`` set (freed blocks go back to the OS at once)
for tight figures. ``tracemalloc`` cannot see torch's allocations and is not used.
"""

from __future__ import annotations

import re

import torch

__all__ = ["PeakMemory", "cpu_probe_available"]

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_bytes(field: str) -> int:
    with open(_STATUS) as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    if m is None:
        raise RuntimeError(f"{_STATUS} has no {field} line")
    return int(m.group(1)) * 1024


def cpu_probe_available() -> bool:
    """True where the CPU probe works (Linux with a writable /proc/self/clear_refs)."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        _status_bytes("VmHWM")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager measuring ``peak_delta`` and ``end_delta`` (bytes) on ``device``."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"PeakMemory supports cpu and cuda, got {self.device}")
        self.start = self.peak = self.end = 0

    def _level(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return _status_bytes("VmRSS")

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            if not cpu_probe_available():
                raise RuntimeError("the CPU memory probe needs Linux's /proc/self/clear_refs")
            with open(_CLEAR_REFS, "w") as f:
                f.write("5")  # VmHWM := VmRSS
        self.start = self._level()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = _status_bytes("VmHWM")
        self.end = self._level()

    @property
    def peak_delta(self) -> int:
        return max(0, self.peak - self.start)

    @property
    def end_delta(self) -> int:
        return self.end - self.start
