"""Peak tensor memory of a block of code, on any device.

    with TensorPeak(device, baseline=[model, optimizer]) as tp:
        loss = model(x); loss.backward(); opt.step()
    tp.peak_bytes        # most bytes of live tensor storage at any op boundary in the block

CUDA: the caching allocator's exact counters (``max_memory_allocated``, reset at entry).

CPU has no allocator counters, and the process RSS mixes in allocator slack and freed-but-kept
pages (and cannot separate several runs in one process). So on CPU every tensor an op returns is
recorded through a ``TorchDispatchMode`` (it sees forward, backward and optimizer ops, custom
``torch.library`` ops included); storages are held by weak reference, and after each op the
bytes of the storages still alive are summed. The baseline (parameters, buffers, gradients and
optimizer state that exist before the block) is counted too. Temporaries that live only inside
one op are not seen; the figure is the peak of live tensor bytes, the same quantity that
``max_memory_allocated`` reports on CUDA, minus allocator rounding.
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _LiveStorages(TorchDispatchMode):
    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def track(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type != self.device.type:
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return  # tensors without storage (e.g. some subclasses)
        key = st._cdata
        old = self.live.get(key)
        if old is not None and not old[0].expired():
            return
        if old is not None:
            self.current -= old[1]
        n = st.nbytes()
        self.live[key] = (StorageWeakRef(st), n)
        self.current += n

    def sweep(self) -> None:
        dead = [k for k, (ref, _) in self.live.items() if ref.expired()]
        for k in dead:
            self.current -= self.live.pop(k)[1]
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            self.track(t)
        self.sweep()
        return out


def _tensors_of(obj) -> list[torch.Tensor]:
    """Parameters, buffers and grads of modules; state tensors of optimizers; tensors as is."""
    out: list[torch.Tensor] = []
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, torch.nn.Module):
        for p in obj.parameters():
            out.append(p)
            if p.grad is not None:
                out.append(p.grad)
        out.extend(obj.buffers())
    elif isinstance(obj, torch.optim.Optimizer):
        for state in obj.state.values():
            out.extend(tree_leaves(state))
        for group in obj.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    out.append(p.grad)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            out.extend(_tensors_of(o))
    return [t for t in out if isinstance(t, torch.Tensor)]


class TensorPeak:
    """Context manager: ``peak_bytes`` of tensor memory on ``device`` during the block.

    Args:
        device: where to measure.
        baseline: modules / optimizers / tensors alive at entry whose bytes count (CPU only;
            on CUDA the allocator already knows every live byte).
    """

    def __init__(self, device: torch.device | str, baseline=()) -> None:
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"TensorPeak supports cpu and cuda, got {self.device}")
        self.baseline = baseline
        self.peak_bytes = 0
        self.method = ("torch.cuda.max_memory_allocated" if self.device.type == "cuda"
                       else "peak of live tensor storage bytes (TorchDispatchMode)")
        self._mode: _LiveStorages | None = None

    def __enter__(self) -> "TensorPeak":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._mode = _LiveStorages(self.device)
        for t in _tensors_of(self.baseline):
            self._mode.track(t)
        self._mode.sweep()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
            return
        self._mode.__exit__(*exc)
        self._mode.sweep()
        self.peak_bytes = int(self._mode.peak)
