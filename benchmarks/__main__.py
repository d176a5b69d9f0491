"""``python -m benchmarks``: the main report (README's main command).

    python -m benchmarks                   # every section, full size (<= 10 min on a 2-core CPU)
    python -m benchmarks --quick           # smoke-test size
    python -m benchmarks --full            # also the CPU speed benchmarks at full size (slow)
    python -m benchmarks --only b,d        # some sections (others kept from the previous report.json)
    python -m benchmarks --device cuda --out /tmp/report

Writes ``<out>/report.md``, ``<out>/report.json`` and the PNG plots next to them. Sections:
(a) quant: quantization fidelity, (b) memory: memory accounting, (c) speed: kernels / LoRA /
optimizer benchmarks plus recorded GPU results, (d) finetune: the fidelity study, reduced (zero-shot formats, QLoRA vs 16-bit LoRA), (e) load:
whole-model 4-bit load vs transformers + bitsandbytes (a reduced model; ~1B in bench_load).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

from .progress import log
from .report import SECTIONS, build_report, resolve_sections


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="sections:\n" + "\n".join(f"  {s.key} / {s.name:9s} {s.title}"
                                                                   for s in SECTIONS))
    p.add_argument("--quick", action="store_true", help="smoke-test sizes (numbers are not measurements)")
    p.add_argument("--full", action="store_true", help="full sizes everywhere, also the speed benchmarks on CPU "
                   "(by default those use their quick sizes on CPU)")
    p.add_argument("--only", default=None, metavar="SECTION[,SECTION]",
                   help="run only these sections (letters a-e or names); others are kept from <out>/report.json")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--out", default="benchmarks/out", metavar="DIR", help="output folder (default benchmarks/out)")
    p.add_argument("--threads", default="auto", help="CPU threads for torch: a number, or 'auto' (default: one per "
                   "core, fewer when the load average shows other processes busy)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        resolve_sections(args.only)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import torch

    from .report_util import choose_threads

    threads, why = choose_threads(args.threads)
    torch.set_num_threads(threads)
    log(f"[report] torch threads: {threads} ({why})")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        print(f"error: device {device!r} is not usable here: {e}", file=sys.stderr)
        return 2
    command = "python -m benchmarks" + ("" if argv is None and len(sys.argv) <= 1 else
                                        " " + shlex.join(sys.argv[1:] if argv is None else argv))
    t0 = time.perf_counter()
    report = build_report(args.quick, args.only, device, args.out, command, full=args.full)
    bad = [p for s in report["sections"].values() for p in s["parts"] if p["status"] != "ok"]
    log(f"[report] wrote {args.out}/report.md and report.json in {time.perf_counter() - t0:.0f} s"
        + (f"; {len(bad)} part(s) not available (see the report)" if bad else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
