"""Small helpers every report section shares: markdown tables, byte formatting, matplotlib."""

from __future__ import annotations

from typing import Sequence


def md_table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; cells are str()-ed and '|' escaped."""
    cell = lambda x: str(x).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    out = ["| " + " | ".join(cell(h) for h in head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def fmt_bytes(n: float | int | None) -> str:
    """1536 -> '1.50 KiB'; binary units (GiB = 2**30 bytes)."""
    if n is None:
        return "n/a"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend, or None when not installed."""
    try:
        import matplotlib
    except ModuleNotFoundError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def choose_threads(spec: str | int | None = "auto") -> tuple[int, str]:
    """torch intra-op threads for a benchmark run, and why.

    An int is used as given. 'auto' keeps torch's default (one per core) unless the 1-minute
    load average says other processes already keep the cores busy: then OpenMP workers that wait
    on descheduled siblings make every op many times slower (measured here: a fine-tune step
    took 4.1 s with 2 threads on a loaded 2-core machine and 0.57 s with 1), so 'auto' picks
    ``cores - round(load)``, at least 1.
    """
    import os

    import torch

    default = torch.get_num_threads()
    if spec is None or spec == "auto":
        try:
            load = os.getloadavg()[0]
        except OSError:
            return default, "torch default"
        cores = os.cpu_count() or default
        if load <= cores - 0.5:
            return default, f"torch default (load average {load:.1f} on {cores} cores)"
        n = max(1, min(default, cores - round(load)))
        return n, f"auto: load average {load:.1f} on {cores} cores (other processes busy)"
    n = int(spec)
    if n < 1:
        raise ValueError(f"threads must be >= 1 or 'auto', got {spec!r}")
    return n, "set by --threads"
