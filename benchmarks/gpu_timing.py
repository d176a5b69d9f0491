"""Timing for the GPU suite: the median and interquartile range of one op, cold in L2.

    t = time_op(cycle(fn, arg_sets), device, graph=True)   # Timing(median_us, q25_us, q75_us, timer, note)
    row.update(t.fields("ours"))                          # ours_us, ours_iqr_us, ours_timer

On CUDA:

- ``graph=True``: ``triton.testing.do_bench_cudagraph``. One CUDA graph replays ``n`` unrolled
  calls (``n`` ~ 20 ms of work), ten times; each sample is one replay's mean. Host launch and
  dispatcher overhead are gone, so this is the kernels' time. If the op cannot be captured (a
  host synchronisation, a CPU-side step counter), the capture error is noted and it falls back.
- ``graph=False`` (or after a failed capture): ``triton.testing.do_bench``, one event pair per
  call after warm-up, the L2 flushed before each call, at least ``MIN_EAGER_SAMPLES`` calls. A call that spends longer on the host than
  on the GPU is timed at its host speed: this is what an eager caller sees.

L2 residency. The H200 keeps 60 MB in L2 (KINDS.md), more than a 4096x4096 bf16 weight. A graph
replaying the same call reads the weight from L2 and would report more than HBM bandwidth, so
callers rotate through enough copies of the operands (``copies_for``) that each call's working
set has left L2 before it comes round again: ``ROTATE_BYTES`` is over 4x the L2.

On CPU (the suite's own tests run the steps there): ``cpu_warmup`` calls, then ``cpu_reps``
timed calls with ``time.perf_counter``; the same quantiles.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .timing import interleaved_samples

QUANTILES = (0.5, 0.25, 0.75)     # median, then the quartiles (IQR = q75 - q25)
ROTATE_BYTES = 256 * 2 ** 20      # > 4x the H200's 60 MB L2 (KINDS.md), as triton's own L2 flush buffer
MAX_COPIES = 64                   # operand copies at most (small ops: 256 MiB / 4 MiB)
GRAPH_REP_MS = 20                 # work per graph replay (do_bench_cudagraph's default)
EAGER_WARMUP_MS = 25              # do_bench's defaults
EAGER_REP_MS = 100
MIN_EAGER_SAMPLES = 7             # do_bench takes rep / estimate samples: slow ops get a longer rep


@dataclass(frozen=True)
class Timing:
    """One op's time in microseconds: median and quartiles of the samples, and how it was timed."""

    median_us: float
    q25_us: float
    q75_us: float
    timer: str                    # "cudagraph" | "do_bench" | "cpu"
    note: str | None = None       # e.g. why a graph capture fell back to do_bench

    @property
    def iqr_us(self) -> float:
        return self.q75_us - self.q25_us

    def fields(self, prefix: str) -> dict:
        """``{prefix_us, prefix_iqr_us, prefix_timer[, prefix_timer_note]}`` for a result row."""
        out = {f"{prefix}_us": self.median_us, f"{prefix}_iqr_us": self.iqr_us, f"{prefix}_timer": self.timer}
        if self.note:
            out[f"{prefix}_timer_note"] = self.note
        return out


def copies_for(bytes_per_copy: int) -> int:
    """How many copies of an operand set of ``bytes_per_copy`` bytes make ``ROTATE_BYTES``."""
    if bytes_per_copy <= 0:
        raise ValueError(f"bytes_per_copy must be > 0, got {bytes_per_copy}")
    return max(1, min(MAX_COPIES, math.ceil(ROTATE_BYTES / bytes_per_copy)))


def cycle(fn: Callable, arg_sets: Sequence[tuple]) -> Callable[[], object]:
    """A zero-argument callable that calls ``fn(*args)`` with the next of ``arg_sets`` each time
    (a graph capture unrolls it, so every captured call reads different operands)."""
    if not arg_sets:
        raise ValueError("cycle needs at least one argument set")
    it = itertools.cycle(arg_sets)
    return lambda: fn(*next(it))


def _quantiles_us(samples_ms: Sequence[float]) -> tuple[float, float, float]:
    import statistics

    s = sorted(samples_ms)
    if len(s) == 1:
        return (s[0] * 1e3,) * 3
    q = statistics.quantiles(s, n=4, method="inclusive")  # q25, median, q75
    return q[1] * 1e3, q[0] * 1e3, q[2] * 1e3


def time_op(fn: Callable[[], object], device: str | torch.device, graph: bool = True, cpu_warmup: int = 1,
            cpu_reps: int = 5) -> Timing:
    """Time ``fn()`` on ``device`` (see the module docstring for the method)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        if cpu_reps < 3:
            raise ValueError(f"cpu_reps must be >= 3 for quartiles, got {cpu_reps}")
        samples = interleaved_samples({"fn": fn}, cpu_reps, cpu_warmup)["fn"]
        return Timing(*_quantiles_us([t * 1e3 for t in samples]), timer="cpu")
    import triton.testing as tt

    note = None
    if graph:
        try:
            med, q25, q75 = tt.do_bench_cudagraph(fn, rep=GRAPH_REP_MS, quantiles=list(QUANTILES))
            return Timing(med * 1e3, q25 * 1e3, q75 * 1e3, timer="cudagraph")
        except Exception as e:  # noqa: BLE001 - not capturable: say why, time it eagerly
            torch.cuda.synchronize(dev)
            note = f"graph capture failed ({type(e).__name__}: {str(e)[:160]})"
    fn()                                               # one call first (compiles, allocates), then one timed
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize(dev)
    rep = max(EAGER_REP_MS, MIN_EAGER_SAMPLES * start.elapsed_time(end))
    med, q25, q75 = tt.do_bench(fn, warmup=EAGER_WARMUP_MS, rep=rep, quantiles=list(QUANTILES))
    return Timing(med * 1e3, q25 * 1e3, q75 * 1e3, timer="do_bench", note=note)
