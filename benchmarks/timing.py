"""One way to time things: warm-up, then the median of repeated runs, on any device."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch


def median_time(fn: Callable[[], object], device: str | torch.device = "cpu", warmup: int = 2,
                reps: int = 7) -> float:
    """Median wall time of ``fn()`` in seconds after ``warmup`` calls.

    On CUDA this uses ``triton.testing.do_bench`` (L2 flushed between runs, events timed);
    on CPU ``time.perf_counter`` around each call.
    """
    if torch.device(device).type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    return statistics.median(interleaved_samples({"fn": fn}, reps, warmup)["fn"])


def interleaved_samples(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 2) -> dict[str, list[float]]:
    """Wall seconds of every call of each callable: ``warmup`` untimed calls each, then ``reps``
    repetitions in which the providers alternate (so drift on a shared machine hits them alike)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t0)
    return samples


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 2) -> dict[str, tuple]:
    """``(median, min, max)`` seconds of each callable, timed by ``interleaved_samples``."""
    return {k: (statistics.median(v), min(v), max(v)) for k, v in interleaved_samples(fns, reps, warmup).items()}


def bnb_available() -> bool:
    try:
        import bitsandbytes.functional  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    return True


def bench_cli(doc: str, run, json_name: str, argv: list[str] | None = None, after=None) -> None:
    """The CLI every quantization benchmark shares: --quick, --device, --out DIR (JSON)."""
    import argparse
    import json
    import os

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    res = run(a.quick, a.device)
    print(res["markdown"])
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, json_name), "w") as f:
            json.dump({"rows": res["rows"], "meta": res["meta"]}, f, indent=2)
        if after is not None:
            after(res, a.out)


def json_child(args: list[str], *, env: dict | None = None, timeout: float = 900) -> dict:
    """Run ``python args...`` from the repository root in a fresh process (a clean allocator, its
    own environment) and return the JSON object on the last line of its stdout.

    Raises:
        RuntimeError: the child failed (its exit status and the tail of its stderr).
    """
    cmd = [sys.executable, *args]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=root,
                         env=None if env is None else {**os.environ, **env})
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
