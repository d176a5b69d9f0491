"""The one command a GPU session runs: the headline numbers first, nothing lost if it is cut short.

    python3 -m benchmarks.gpu_suite --out "$OUT"         # the plan below inside --budget-s 480
    python3 -m benchmarks.gpu_suite --dry-run            # any machine: the plan, its timeouts, what is missing
    python3 -m benchmarks.gpu_suite --out DIR --only smoke,matmul --quick

Before a GPU session, here: ``tools/prepare_device_carry.sh`` builds ``.carry/`` (a bitsandbytes
wheel slimmed to its CUDA 13 library, the all-MiniLM-L6-v2 weights in fp16) and prints the
device call: carry ``[".carry"]`` and the command above. The suite finds ``.carry/`` by itself:
it extracts the wheel to a temporary folder on the children's ``PYTHONPATH`` when bitsandbytes
is not installed, and the fine-tune reads the carried weights.

Every step runs in a child process with its own timeout (``benchmarks.gpu_driver``); each
measured row is appended to ``OUT/gpu_suite.jsonl`` at once and ``OUT/gpu_suite.md`` is
re-rendered after every step; the children's output goes to ``OUT/gpu_suite.log``. Steps are in
order of value: a run cut short at any point has returned everything before that point. Commit
the two files as ``benchmarks/results/gpu_<date>.jsonl`` / ``.md``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import tempfile
import zipfile
from pathlib import Path

from .gpu_driver import JSONL_NAME, LOG_NAME, MD_NAME, REPO_ROOT, Step, StepContext, run_child, run_plan
from .gpu_render import render

DEFAULT_BUDGET_S = 480.0      # a 600 s device command ends cleanly, everything written
CARRY_DIR = REPO_ROOT / ".carry"
BNB_SITE = Path(tempfile.gettempdir()) / "qlora-gpu-suite-site"
DEVICE_COMMAND = 'PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_suite --out "$OUT"'

PLAN = (
    Step("smoke", "benchmarks.gpu_steps:smoke", 20,
         "device and versions (recorded first), then one tiny bf16 qlora_linear forward + backward vs fp32"),
    Step("matmul", "benchmarks.gpu_bench:matmul", 120,
         "x @ W^T: ours vs bnb matmul_4bit (+ gemv_4bit at M=1) vs bf16 cuBLAS; M 1/16/4096, four shapes; "
         "forward, and forward + backward (dx)"),
    Step("dequant", "benchmarks.gpu_bench:dequant", 45, "kernels.dequantize vs bnb dequantize_4bit: GB/s, % of HBM"),
    Step("lora", "benchmarks.gpu_bench:lora", 75, "one layer fwd+bwd at M=4096, r=16: QLoRA vs peft+bnb vs bf16 LoRA"),
    Step("optim", "benchmarks.gpu_bench:optim_step", 60,
         "PagedAdamW 32/8-bit vs torch fused AdamW vs bnb PagedAdamW(8bit): state resident vs paged to host"),
    Step("predicted", "benchmarks.gpu_predicted:predicted", 15,
         "benchmarks/results/perf_model.json rows next to the measured times"),
    Step("check_dequantize", "benchmarks.gpu_steps:check_dequantize", 45, "dequantize == nf4 reference, bit-exact"),
    Step("check_qlora_linear", "benchmarks.gpu_steps:check_qlora_linear", 120,
         "qlora_linear / nf4_matmul forward, dx, dA, dB in bf16 vs fp32, every regime"),
    Step("check_paged_adamw", "benchmarks.gpu_steps:check_paged_adamw", 45,
         "PagedAdamW vs torch AdamW, page_out bit-identity, 8-bit state"),
    Step("regimes", "benchmarks.gpu_bench:regimes", 90, "nf4_matmul with each regime forced, M 1..4096"),
    Step("finetune", "benchmarks.gpu_steps:finetune", 120, "the fidelity study, short (all-MiniLM-L6-v2)"),
    Step("pytest", "benchmarks.gpu_steps:pytest_cuda", 180, "pytest -k cuda on the kernel, optim and lora tests"),
)
CORE_IMPORTS = ("nf4", "kernels", "lora", "optim", "benchmarks.gpu_bench", "benchmarks.gpu_steps",
                "benchmarks.gpu_predicted", "benchmarks.gpu_checks", "benchmarks.fidelity")


# ---- the carried bitsandbytes wheel --------------------------------------------------------------
def bnb_installed() -> bool:
    """Whether bitsandbytes is importable here (found, not imported: no CUDA library is loaded)."""
    return importlib.util.find_spec("bitsandbytes") is not None


def carried_wheel(carry: Path = CARRY_DIR) -> Path | None:
    wheels = sorted(carry.glob("bitsandbytes-*.whl")) if carry.is_dir() else []
    return wheels[-1] if wheels else None


def extract_wheel(wheel: Path, dest: Path) -> Path:
    """Unpack a wheel (a zip of the package folders) into ``dest``; refuses paths that escape it."""
    stamp = dest / ".wheel"
    tag = f"{wheel.name} {wheel.stat().st_size}"
    if stamp.exists() and stamp.read_text() == tag:
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            target = (dest / name).resolve()
            if root != target and root not in target.parents:
                raise ValueError(f"{wheel}: member {name!r} would be written outside {dest}")
        z.extractall(dest)
        for info in z.infolist():          # zipfile drops the mode bits that pip would restore
            mode = (info.external_attr >> 16) & 0o777
            if mode and not info.is_dir():
                (dest / info.filename).chmod(mode)
    stamp.write_text(tag)
    return dest


def child_environment(wheel: Path | None) -> tuple[dict, dict]:
    """The children's environment (bitsandbytes from the carried wheel when not installed) and
    what was done, for the plan record."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    paths = [str(REPO_ROOT)]
    if bnb_installed():
        info = {"bitsandbytes_source": "installed"}
    elif wheel is None:
        info = {"bitsandbytes_source": f"absent: not installed and no wheel in {CARRY_DIR.name}/"}
    else:
        paths.insert(0, str(extract_wheel(wheel, BNB_SITE)))
        info = {"bitsandbytes_source": f"carried wheel {wheel.name}, extracted to {BNB_SITE}"}
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env, info


# ---- dry run ---------------------------------------------------------------------------------------
def plan_lines(steps, budget_s: float) -> list[str]:
    lines = [f"steps, in order (budget {budget_s:.0f} s; a step gets min(its timeout, what is left)):",
             f"  {'#':>2}  {'step':20s} {'timeout':>8s} {'worst start':>12s}  what"]
    start = 0.0
    for i, s in enumerate(steps, 1):
        late = "  (runs only if earlier steps end early)" if start + s.min_s > budget_s else ""
        lines.append(f"  {i:2d}  {s.name:20s} {s.timeout_s:7.0f}s {start:11.0f}s  {s.what}{late}")
        start += s.timeout_s
    lines.append(f"  sum of timeouts {start:.0f} s; a step that would start with less than its minimum left is "
                 "recorded as skipped")
    return lines


def _wheel_line(wheel: Path | None) -> tuple[str, bool]:
    if bnb_installed():
        from importlib.metadata import version
        return f"installed here ({version('bitsandbytes')})", True
    if wheel is None:
        return f"MISSING: not installed and no {CARRY_DIR.name}/bitsandbytes-*.whl (run tools/prepare_device_carry.sh)", False
    with zipfile.ZipFile(wheel) as z:
        libs = [n.rsplit("/", 1)[-1] for n in z.namelist() if "libbitsandbytes_cuda" in n]
    return f"carried wheel {wheel.name} ({wheel.stat().st_size / 2 ** 20:.1f} MiB, CUDA libs {libs})", True


def dry_run(steps, budget_s: float, strict: bool = False) -> int:
    """Print the plan and check what the run needs; imports modules, initialises no CUDA."""
    from .gpu_predicted import PERF_MODEL
    from .gpu_steps import minilm_model_dir

    problems = []
    lines = ["gpu_suite plan (dry run: nothing executed)", ""] + plan_lines(steps, budget_s) + ["", "imports:"]
    for name in CORE_IMPORTS:
        try:
            importlib.import_module(name)
            lines.append(f"  {name:28s} ok")
        except Exception as e:  # noqa: BLE001
            problems.append(name)
            lines.append(f"  {name:28s} FAILED: {type(e).__name__}: {e}")
    text, ok = _wheel_line(carried_wheel())
    lines.append(f"  bitsandbytes                 {text}")
    if not ok:
        problems.append("bitsandbytes")
    try:
        lines.append(f"  all-MiniLM-L6-v2             {minilm_model_dir()}")
    except ModuleNotFoundError as e:
        problems.append("all-MiniLM-L6-v2")
        lines.append(f"  all-MiniLM-L6-v2             MISSING: {e}")
    lines.append(f"  perf_model.json              {'present' if PERF_MODEL.exists() else 'absent: the predicted step will be skipped'}")
    lines += ["", f"writes to --out: {JSONL_NAME} (every row, as measured), {MD_NAME} (after every step), "
              f"{LOG_NAME} (the children's output), fidelity_pareto.png",
              f"device command (run in the repo root): {DEVICE_COMMAND}"]
    print("\n".join(lines))
    if problems:
        print(f"\nnot ready: {', '.join(problems)}", file=sys.stderr)
    return 1 if (problems and strict) else 0


# ---- console ---------------------------------------------------------------------------------------
def _echo(rec: dict, text: str) -> None:
    """One line per step on stderr; the smoke step's output and any failure's log tail too."""
    print(f"[gpu_suite] {rec['step']}: {rec['status']} in {rec.get('seconds', 0):.1f} s"
          + (f" ({rec['note']})" if rec.get("note") else ""), file=sys.stderr, flush=True)
    if rec["step"] == "smoke" or rec["status"] in ("error", "timeout", "failed"):
        tail = rec.get("traceback") or "\n".join(text.rstrip().splitlines()[-30:])
        if tail:
            print(tail, file=sys.stderr, flush=True)


def select(steps, only: str | None, skip: str | None) -> list[Step]:
    names = [s.name for s in steps]
    pick = [x for x in (only or "").split(",") if x]
    drop = [x for x in (skip or "").split(",") if x]
    unknown = [x for x in pick + drop if x not in names]
    if unknown:
        raise ValueError(f"unknown step(s) {unknown}; choose from {names}")
    return [s for s in steps if (not pick or s.name in pick) and s.name not in drop]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_suite", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/out/gpu", help="output folder (default $OUT)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="fewer shapes and cases, a shorter fine-tune")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help=f"wall-clock budget for the whole plan (default {DEFAULT_BUDGET_S:.0f})")
    p.add_argument("--only", default=None, help="comma-separated step names (default: all)")
    p.add_argument("--skip", default=None, help="comma-separated step names to leave out")
    p.add_argument("--step-params", default=None, help='JSON: per-step size overrides, {"matmul": {"ms": [1]}}')
    p.add_argument("--dry-run", action="store_true", help="print the plan and check the environment; runs nothing")
    p.add_argument("--strict", action="store_true", help="with --dry-run: exit 1 when anything is missing")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--target", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-params", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        ctx = StepContext(a.child, Path(a.out), a.device, a.quick, json.loads(a.child_params or "{}"))
        return run_child(ctx, a.target)
    try:
        steps = select(PLAN, a.only, a.skip)
    except ValueError as e:
        p.error(str(e))
    if a.dry_run:
        return dry_run(steps, a.budget_s, a.strict)
    params = json.loads(a.step_params) if a.step_params else {}
    if not isinstance(params, dict) or any(k not in {s.name for s in PLAN} for k in params):
        p.error(f"--step-params must map step names to objects, got {a.step_params!r}")
    import torch

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: the GPU suite needs CUDA (--dry-run shows the plan on any machine; --device cpu runs it "
              "here at whatever sizes --step-params gives)", file=sys.stderr)
        return 2
    env, info = child_environment(carried_wheel())
    out = Path(a.out)
    records = run_plan(steps, out, a.budget_s, a.device, a.quick, params, env=env, render=render, echo=_echo,
                       plan_extra=info)
    bad = [r["step"] for r in records if r["status"] not in ("ok", "skipped")]
    print(f"[gpu_suite] wrote {out / JSONL_NAME}, {out / MD_NAME}, {out / LOG_NAME}; "
          + ("all steps ok or skipped" if not bad else f"not ok: {bad}"), file=sys.stderr, flush=True)
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
