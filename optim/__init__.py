"""optim: PagedAdamW (torch.optim.AdamW's math, a fused Triton update, 32- or 8-bit state)
with its state paged between GPU and host through CUDA unified memory.

    opt = optim.PagedAdamW(params, lr=2e-4, weight_decay=0.0, paged=True, state_bits=32)
    opt.page_out()   # move optimizer state to host memory (the next step brings it back)

Modules: ``adamw`` (the optimizer), ``state`` (state layout, arenas, checkpoint conversion),
``paging`` (unified-memory buffers, backends, the prefetch schedule), ``cudart`` (ctypes
bindings to the CUDA runtime torch ships). Importing does not initialise CUDA.
"""

from . import cudart, paging, state
from .adamw import ARENA_BYTES, PAGE_MIN_NUMEL, PagedAdamW
from .state import MIN_8BIT_NUMEL

__all__ = ["PagedAdamW", "PAGE_MIN_NUMEL", "ARENA_BYTES", "MIN_8BIT_NUMEL", "paging", "state", "cudart"]
