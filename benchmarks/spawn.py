"""Start a local torch.distributed world (gloo on 127.0.0.1) and wait for it, bounded in time.

Used by the FSDP benchmark and its tests: every rank runs ``fn(rank, world, port, *args)`` and
writes ``rank{r}.pt`` into ``out_dir``; the ranks are killed (by pid) past ``timeout_s``.
"""

from __future__ import annotations

import os
import socket
import time

import torch


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_world(fn, world: int, args: tuple, out_dir: str, timeout_s: float, what: str = "world") -> list[dict]:
    """Run ``fn`` on ``world`` spawned processes and return each rank's ``rank{r}.pt`` payload."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=(world, free_port(), *args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {world}-rank {what} did not finish within {timeout_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
