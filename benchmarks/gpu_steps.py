"""The GPU suite's non-timing steps, each ``step(ctx)`` in a child process of the driver:

    smoke               device and versions first, then one tiny bf16 qlora_linear vs fp32
    check_dequantize    kernels.dequantize == nf4 reference, bit for bit       (gpu_checks)
    check_qlora_linear  forward and every gradient in bf16, every regime       (gpu_checks)
    check_paged_adamw   PagedAdamW vs torch AdamW, page_out, 8-bit state       (gpu_checks)
    finetune            the fidelity study, short: zero-shot formats + 4-arm contrastive fine-tune
    pytest              the test suite's cuda-parametrized tests

A step returns ``{"status": "failed", ...}`` when a check in it fails; rows are emitted as they
are produced, so a step cut short keeps what it finished.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import torch

from .gpu_driver import REPO_ROOT, StepContext

CARRIED_MINILM = REPO_ROOT / ".carry" / "minilm-fp16"     # written by tools/prepare_device_carry.sh
MINILM_ENV = "QLORA_MINILM_DIR"                            # overrides both
SMOKE_CASE = (1, 256, 512, 8, True, "2d")                  # (M, N, K, r, bias, layout): one tiny layer
PYTEST_FILES = ("tests/test_kernels_*.py", "tests/test_optim_*.py", "tests/test_lora_*.py")
NVIDIA_SMI_TIMEOUT_S = 10


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _nvidia_smi() -> dict:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {}
    try:
        out = subprocess.run([exe, "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem,power.limit",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=NVIDIA_SMI_TIMEOUT_S).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return {}
    if not out:
        return {}
    vals = [v.strip() for v in out[0].split(",")]
    return dict(zip(("driver", "max_sm_clock_mhz", "max_mem_clock_mhz", "power_limit_w"), vals))


def bitsandbytes_info() -> dict:
    """bitsandbytes' version and where it came from; importing it (and so loading its native
    library) is the test of the carried wheel."""
    try:
        import bitsandbytes

        return {"bitsandbytes": getattr(bitsandbytes, "__version__", None) or _version("bitsandbytes"),
                "bitsandbytes_path": str(Path(bitsandbytes.__file__).parent)}
    except Exception as e:  # noqa: BLE001 - absent or its native library failed: comparisons are skipped
        return {"bitsandbytes": None, "bitsandbytes_error": f"{type(e).__name__}: {e}"[:300]}


def environment(device: str) -> dict:
    """Versions and the device (bitsandbytes: ``bitsandbytes_info``, imported separately)."""
    import kernels

    env = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "python": platform.python_version(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "triton": _version("triton"),
           "peft": _version("peft"), "transformers": _version("transformers"), "device": device,
           "regime_thresholds": {k: getattr(kernels, k) for k in ("GEMV_MAX_M", "DEQUANT_ONCE_MIN_M")
                                 if hasattr(kernels, k)}}
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.device(device))
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1),
                   capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count)
        env.update(_nvidia_smi())
    else:
        env["gpu"] = None
        env["cpu"] = platform.processor() or platform.machine()
    return env


def _check_dtype(dev: torch.device) -> torch.dtype:
    # bf16 on the GPU; the Triton interpreter's bf16 dots are wrong (NOTES §3), so fp32 on CPU
    return torch.bfloat16 if dev.type == "cuda" else torch.float32


def _verdict(rows: list[dict], what: str) -> dict:
    bad = [r for r in rows if not r.get("ok")]
    if bad:
        return {"status": "failed", "note": f"{len(bad)}/{len(rows)} {what} failed, first: {bad[0]['check']} "
                                            f"{bad[0]['case']}"}
    return {"note": f"{len(rows)}/{len(rows)} {what} passed"}


def smoke(ctx: StepContext) -> dict:
    """Cheap and first: versions and device (printed and recorded before anything can hang), the
    asm 4-bit decoders against the plain one bit for bit, one tiny qlora_linear forward + backward
    against a float32 reference, then the bitsandbytes import (the carried wheel's test; the device
    record is written again with it)."""
    from . import gpu_checks

    env = environment(ctx.device)
    ctx.emit(env, kind="env")
    print(json.dumps(env, indent=1), flush=True)
    dev = torch.device(ctx.device)
    rows = gpu_checks.check_decoders(dev, emit=ctx.emit)
    rows += gpu_checks.check_qlora_linear(dev, dtype=_check_dtype(dev), cases=[ctx.param("case", SMOKE_CASE)],
                                          regimes=("auto",), emit=ctx.emit)
    for r in rows:
        print(f"[smoke] {r['check']} {r['case']}: {'ok' if r['ok'] else 'FAILED'} (err/bound {r['worst_ratio']:.3g})",
              flush=True)
    bnb = bitsandbytes_info()
    ctx.emit({**env, **bnb}, kind="env")
    print(f"[smoke] {json.dumps(bnb)}", flush=True)
    return _verdict(rows, "smoke checks")


def check_dequantize(ctx: StepContext) -> dict:
    from . import gpu_checks

    kw = {k: ctx.params[k] for k in ("shapes", "dtypes") if k in ctx.params}
    if "dtypes" in kw:
        kw["dtypes"] = tuple(getattr(torch, d) for d in kw["dtypes"])
    rows = gpu_checks.check_dequantize(torch.device(ctx.device), emit=ctx.emit, **kw)
    return _verdict(rows, "dequantize checks")


QUICK_LORA_CASES = [(1, 4096, 4096, 16, False, "2d"), (130, 1031, 777, 8, True, "strided"),
                    (1024, 4096, 4096, 16, True, "2d"), (33, 1031, 777, 16, True, "3d", 0.1)]


def check_qlora_linear(ctx: StepContext) -> dict:
    from . import gpu_checks

    dev = torch.device(ctx.device)
    cases = ctx.param("cases", QUICK_LORA_CASES if ctx.quick else None)
    cases = [tuple(c) for c in cases] if cases else None
    rows = gpu_checks.check_qlora_linear(dev, dtype=_check_dtype(dev), cases=cases, emit=ctx.emit)
    return _verdict(rows, "qlora_linear checks")


def check_paged_adamw(ctx: StepContext) -> dict:
    from . import gpu_checks

    kw = {k: ctx.params[k] for k in ("numels", "steps", "quad_numel", "quad_steps") if k in ctx.params}
    rows = gpu_checks.check_paged_adamw(torch.device(ctx.device), emit=ctx.emit, **kw)
    return _verdict(rows, "PagedAdamW checks")


def minilm_model_dir() -> Path:
    """``$QLORA_MINILM_DIR``, else the carried fp16 copy, else the installed package's."""
    if os.environ.get(MINILM_ENV):
        return Path(os.environ[MINILM_ENV])
    if (CARRIED_MINILM / "config.json").exists():
        return CARRIED_MINILM
    from .encoder import minilm_dir

    return minilm_dir()


def finetune(ctx: StepContext) -> dict:
    """The fidelity study (``benchmarks.fidelity``) on all-MiniLM-L6-v2, short: every zero-shot
    format on all test pairs, then the four contrastive arms, one seed (the step's 120 s budget;
    ``seeds`` / ``steps`` params widen it)."""
    from dataclasses import replace

    from .fidelity import StudyConfig, run_study
    from .fidelity_report import format_label, plot, verdicts
    from .finetune import FinetuneConfig

    model = ctx.param("model", None) or str(minilm_model_dir())
    seeds = tuple(ctx.param("seeds", (0,)))
    cfg = StudyConfig(model_dir=model, seeds=seeds, reduced=True, resamples=1000,
                      finetune=FinetuneConfig(steps=ctx.param("steps", 30), device=ctx.device))
    if ctx.param("arms", None):
        cfg = replace(cfg, arms=tuple(ctx.param("arms")))
    res = run_study(cfg)
    for r in res["zero_shot"]:
        ctx.emit({"row": f"zero-shot {format_label(r)}", **{k: r[k] for k in ("bits_per_param", "recall_at_1", "mrr", "cos_mean")}})
    for r in res["finetune"]:
        ctx.emit({"row": f"fine-tune {r['arm']} ({r['seeds']} seeds)", "recall_at_1_before": r["recall_at_1_before"],
                  "recall_at_1": r["recall_at_1_mean"], "mrr": r["mrr_mean"]})
    for v in verdicts(res):
        ctx.note(v)
    ctx.note(f"model {Path(model).name}: {res['pairs']['test']} test pairs, {cfg.finetune.steps} steps x "
             f"{cfg.finetune.batch} pairs per arm and seed, {res['wall_s']:.0f} s")
    plot(res, ctx.out / "fidelity_pareto.png")
    return {}


class _Collect:
    """pytest plugin: one row per failed test, and the counts."""

    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx
        self.counts = {"passed": 0, "failed": 0, "skipped": 0, "error": 0}

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call":
            key = report.outcome              # passed, failed, skipped (xfail included)
        elif report.outcome == "failed":
            key = "error"                     # a setup or teardown failure
        elif report.outcome == "skipped":
            key = "skipped"                   # skipped while setting up (skipif, a fixture's skip)
        else:
            return
        self.counts[key] += 1
        if report.outcome == "failed":
            msg = str(report.longrepr).strip().splitlines()
            self.ctx.emit({"test": report.nodeid, "outcome": key, "message": (msg[-1] if msg else "")[:300]})


def pytest_cuda(ctx: StepContext) -> dict:
    """``pytest -k cuda`` on the kernel, optimizer and LoRA tests (in this process)."""
    import glob

    import pytest

    files = sorted(f for pat in ctx.param("files", PYTEST_FILES) for f in glob.glob(str(REPO_ROOT / pat)))
    if not files:
        return {"status": "failed", "note": "no test files found"}
    plugin = _Collect(ctx)
    rc = pytest.main(["-q", "-p", "no:cacheprovider", "-k", ctx.param("k", "cuda"), *files], plugins=[plugin])
    ctx.emit({"test": f"{len(files)} files, -k {ctx.param('k', 'cuda')}", "outcome": f"exit code {int(rc)}",
              "message": ", ".join(f"{v} {k}" for k, v in plugin.counts.items())})
    ok = int(rc) in (0, 5)        # 5: nothing collected (no cuda-parametrized test selected)
    return {"status": "ok" if ok else "failed", "note": ", ".join(f"{v} {k}" for k, v in plugin.counts.items())}
