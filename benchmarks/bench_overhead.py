"""Host cost of one decode-size call: the Python and dispatch work of ``kernels.qlora_linear`` /
``kernels.nf4_matmul`` at M = 1 with the Triton launch itself replaced by a no-op.

At M = 1 a 4096 x 4096 NF4 GEMV moves 8.7 MB, about 2 µs of HBM time on an H200 (predicted), so
the host work around the launch decides whether decode is launch-bound. This measures exactly
that work on the CPU, with the same code path the GPU takes (the streaming-GEMV launcher, its
config, workspace and counters; the kernels run through no interpreter and no device: their
``[grid](...)`` call returns at once). Triton's own launch cost (argument binding, the
specialisation key) is excluded: it is Triton's, and is the same for every Triton kernel.

    python -m benchmarks.bench_overhead            # median of 7 repetitions of 2,000 calls

Reported: microseconds of the calling thread's CPU time per call (median and min of the
repetitions) for nf4_matmul, and for qlora_linear with a
rank-16 adapter in float32 (its rank-16 down-projection ``x Aᵀ`` is a real torch matmul, 16 x 4096
multiply-adds, included).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

__all__ = ["measure", "main"]


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def _launches_patched_out():
    """Route CPU tensors down the GPU path (streaming GEMV) with every GEMV launch a no-op."""
    from kernels import gemv, matmul

    saved = (gemv._gemv_fma_kernel, gemv._gemv_tc_kernel, gemv._gemv_tcm_kernel, gemv._gemv_mma_kernel,
             matmul.use_triton)
    gemv._gemv_fma_kernel = gemv._gemv_tc_kernel = gemv._gemv_tcm_kernel = gemv._gemv_mma_kernel = _NoLaunch()
    matmul.use_triton = lambda t: True
    try:
        yield
    finally:
        (gemv._gemv_fma_kernel, gemv._gemv_tc_kernel, gemv._gemv_tcm_kernel, gemv._gemv_mma_kernel,
         matmul.use_triton) = saved


def _time(fn, calls: int, reps: int) -> list[float]:
    """Microseconds per call of this thread's CPU time (``time.thread_time``): what the host spends,
    insensitive to other processes taking the CPU away (this machine is shared)."""
    for _ in range(calls // 10):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.thread_time()
        for _ in range(calls):
            fn()
        out.append((time.thread_time() - t0) / calls * 1e6)
    return out


def measure(N: int = 4096, K: int = 4096, rank: int = 16, calls: int = 2000, reps: int = 7) -> list[dict]:
    """Rows ``{"call", "us_median", "us_min", "us_all"}`` for the decode-size calls."""
    import kernels
    import nf4

    torch.manual_seed(0)
    qt = nf4.quantize(torch.randn(N, K), "nf4", 64, True)
    x = torch.randn(1, K)
    A, B = torch.randn(rank, K) / K ** 0.5, torch.randn(N, rank)
    rows = []
    with torch.no_grad(), _launches_patched_out():
        for name, fn in (("nf4_matmul", lambda: kernels.nf4_matmul(x, qt)),
                         (f"qlora_linear r={rank}", lambda: kernels.qlora_linear(x, qt, A, B, 2.0))):
            ts = _time(fn, calls, reps)
            rows.append({"call": f"{name} M=1 {N}x{K}", "us_median": statistics.median(ts), "us_min": min(ts),
                         "us_all": ts})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--reps", type=int, default=7)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    for r in measure(calls=a.calls, reps=a.reps):
        print(f"{r['call']:40s} median {r['us_median']:6.1f} us   min {r['us_min']:6.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
