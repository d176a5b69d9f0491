"""Report assembly: run the sections, survive the ones that fail, write report.md + report.json.

A section is a module exposing ``run(quick: bool, device: str[, out_dir]) -> dict`` with at least
``{"markdown": str}`` (and usually ``"rows"`` and ``"plots"``: PNG paths; a module without plots
but with a ``plot(rows, path)`` function gets it called into the report folder). Modules are imported
lazily; a missing module, a missing ``run`` or an exception becomes a clear
"not available: <reason>" line in that section, and the report is still written.

``--only`` re-runs some sections and keeps the others from the previous report.json in the same
folder; every section carries its own timestamp, device and mode, so nothing stale passes for new.
"""

from __future__ import annotations

import datetime as dt
import importlib
import inspect
import json
import math
import platform
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from .progress import log


@dataclass(frozen=True)
class Part:
    """One benchmark module inside a section."""

    module: str                # e.g. "benchmarks.bench_matmul"
    title: str
    recorded: bool = False     # shows committed results instead of measuring


@dataclass(frozen=True)
class Section:
    key: str
    name: str
    title: str
    parts: tuple[Part, ...]
    intro: str = ""
    cpu_quick: bool = False    # on CPU, quick sizes unless --full (CPU speed is not the headline)


SECTIONS = (
    Section("a", "quant", "(a) Quantization fidelity", (Part("benchmarks.quant_report", "Fidelity"),)),
    Section("b", "memory", "(b) Memory accounting", (Part("benchmarks.memory_report", "Llama 7B-65B"),)),
    Section("c", "speed", "(c) Speed", (
        Part("benchmarks.bench_quantize", "Quantize / dequantize"),
        Part("benchmarks.bench_matmul", "NF4 matmul (kernels)"),
        Part("benchmarks.bench_lora", "QLoRA layer forward + backward"),
        Part("benchmarks.minilm_step", "Whole-model QLoRA step on CPU (all-MiniLM-L6-v2)"),
        Part("benchmarks.bench_optim", "Paged AdamW"),
        Part("benchmarks.recorded", "Recorded GPU results (committed)", recorded=True),
    ), "Tables marked 'measured now' ran in this invocation on the device named; 'recorded' results "
       "are read from benchmarks/results/ and carry their own date and device.", cpu_quick=True),
    Section("d", "finetune", "(d) Fidelity: zero-shot formats and QLoRA vs 16-bit LoRA fine-tuning (reduced)",
            (Part("benchmarks.fidelity", "Fidelity study (reduced)"),)),
    Section("e", "load", "(e) Whole-model 4-bit load: ours vs transformers + bitsandbytes",
            (Part("benchmarks.bench_load", "Load a Llama-shaped model, 16-bit and bnb 4-bit checkpoints"),)),
)
BY_KEY = {s.key: s for s in SECTIONS} | {s.name: s for s in SECTIONS}


def resolve_sections(only: str | None) -> list[Section]:
    """'a,c' or 'memory,finetune' -> sections in report order. Raises ValueError naming unknowns."""
    if not only:
        return list(SECTIONS)
    keys = [k.strip().lower() for k in only.split(",") if k.strip()]
    bad = [k for k in keys if k not in BY_KEY]
    if bad or not keys:
        raise ValueError(f"unknown section(s) {bad or only!r}; choose from "
                         + ", ".join(f"{s.key}/{s.name}" for s in SECTIONS))
    chosen = {BY_KEY[k].key for k in keys}
    return [s for s in SECTIONS if s.key in chosen]


def run_part(part: Part, quick: bool, device: str, out_dir: Path) -> dict:
    """Import and run one module; never raises. Returns status 'ok' or 'unavailable'/'error'."""
    t0 = time.perf_counter()
    base = {"module": part.module, "title": part.title}
    try:
        mod = importlib.import_module(part.module)
    except Exception as e:  # noqa: BLE001 - any import failure degrades to a line in the report
        return {**base, "status": "unavailable", "reason": f"{part.module} cannot be imported: "
                f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - t0}
    fn = getattr(mod, "run", None)
    if not callable(fn):
        return {**base, "status": "unavailable", "reason": f"{part.module} has no run(quick, device)",
                "seconds": time.perf_counter() - t0}
    kwargs = {}
    params = inspect.signature(fn).parameters
    if "out_dir" in params:
        kwargs["out_dir"] = out_dir
    try:
        res = fn(quick=quick, device=device, **kwargs)
    except Exception as e:  # noqa: BLE001 - a failing benchmark must not sink the report
        return {**base, "status": "error", "reason": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(), "seconds": time.perf_counter() - t0}
    if not isinstance(res, dict) or not isinstance(res.get("markdown"), str):
        return {**base, "status": "error", "reason": f"{part.module}.run returned {type(res).__name__} without a "
                "'markdown' string", "seconds": time.perf_counter() - t0}
    res = dict(res)
    res["plots"] = [_adopt_plot(p, out_dir) for p in res.get("plots", []) or []]
    plot_fn = getattr(mod, "plot", None)
    if not res["plots"] and callable(plot_fn) and res.get("rows"):
        # convention: a module may expose plot(rows, path) instead of plotting inside run()
        try:
            made = plot_fn(res["rows"], str(out_dir / f"{part.module.rsplit('.', 1)[-1]}.png"))
            res["plots"] = [str(made)] if made else []
        except Exception as e:  # noqa: BLE001 - a broken plot must not lose the table
            res["plot_error"] = f"{type(e).__name__}: {e}"
    return {**base, "status": "ok", "result": res, "seconds": time.perf_counter() - t0}


def _adopt_plot(path, out_dir: Path) -> str:
    """Plots must sit in the report folder so report.md can link them relatively."""
    p = Path(path)
    if p.exists() and p.resolve().parent != out_dir.resolve():
        dest = out_dir / p.name
        shutil.copyfile(p, dest)
        return str(dest)
    return str(p)


def environment(device: str) -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
           "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(), "device": device}
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    for name in ("triton", "bitsandbytes", "peft", "transformers"):
        env[name] = _version(name)
    return env


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def run_sections(sections: list[Section], quick: bool, device: str, out_dir: Path,
                 full: bool = False) -> dict[str, dict]:
    out = {}
    for i, sec in enumerate(sections, 1):
        q = quick or (sec.cpu_quick and device == "cpu" and not full)
        log(f"[report] section {sec.key} ({i}/{len(sections)}): {sec.title}{' (quick sizes)' if q else ''} ...")
        t0 = time.perf_counter()
        parts = [run_part(p, q, device, out_dir) for p in sec.parts]
        for p in parts:
            if p["status"] != "ok":
                log(f"[report]   {p['module']}: {p['status']}: {p['reason']}")
        secs = time.perf_counter() - t0
        log(f"[report] section {sec.key} done in {secs:.0f} s")
        intro = sec.intro
        if q and not quick:
            intro += (" On CPU these benchmarks run at their quick sizes (CPU speed is not the headline; "
                      "`--full` runs the full sizes, which add several minutes on 2 cores).")
        for p, part in zip(parts, sec.parts):
            p["recorded"] = part.recorded
        out[sec.key] = {"key": sec.key, "title": sec.title, "intro": intro, "parts": parts, "seconds": secs,
                        "device": device, "quick": q, "timestamp": _now()}
    return out


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def render(report: dict) -> str:
    """report.json's content -> report.md."""
    env = report["environment"]
    dev = env.get("gpu") or env.get("cpu")
    lines = ["# QLoRA from scratch: benchmark report", "",
             f"Generated {report['generated']} by `{report['command']}` on **{dev}** (`{env['device']}`, "
             f"{env['threads']} torch thread{'s' if env['threads'] != 1 else ''}), "
             f"Python {env['python']}, torch {env['torch']}, triton {env.get('triton')}, bitsandbytes "
             f"{env.get('bitsandbytes')}, peft {env.get('peft')}, transformers {env.get('transformers')}.", ""]
    if any(s.get("quick") for s in report["sections"].values()):
        lines += ["> Sections marked **quick** ran at reduced sizes (`--quick`, or the CPU speed benchmarks): "
                  "read their numbers as smoke tests, not as the headline measurements.", ""]
    lines += ["| section | status | time | measured | mode |", "|---|---|---|---|---|"]
    for key in sorted(report["sections"]):
        s = report["sections"][key]
        ok = sum(p["status"] == "ok" for p in s["parts"])
        lines.append(f"| {s['title']} | {ok}/{len(s['parts'])} parts ok | {s['seconds']:.0f} s | "
                     f"{s['timestamp']} on {s['device']} | {'quick' if s['quick'] else 'full'} |")
    lines.append("")
    for key in sorted(report["sections"]):
        s = report["sections"][key]
        lines += [f"## {s['title']}", ""]
        lines.append(f"*Measured {s['timestamp']} on `{s['device']}`{' (quick)' if s['quick'] else ''}, "
                     f"{s['seconds']:.0f} s.*")
        lines.append("")
        if s.get("intro"):
            lines += [s["intro"], ""]
        multi = len(s["parts"]) > 1
        for p in s["parts"]:
            if multi:
                label = "" if p.get("recorded") else f" (measured now on {s['device']})"
                lines += [f"### {p['title']}{label}", ""]
            if p["status"] != "ok":
                lines += [f"**not available: {p['reason']}**", ""]
                continue
            res = p["result"]
            lines += [res["markdown"].rstrip(), ""]
            linked = res["markdown"]
            for plot in res.get("plots", []):
                name = Path(plot).name
                if name not in linked:
                    lines += [f"![{name}]({name})", ""]
    return "\n".join(lines) + "\n"


def _jsonable(obj):
    """Strip what JSON cannot hold (tensors, paths, dtypes) to strings/lists."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def build_report(quick: bool, only: str | None, device: str, out_dir: str | Path, command: str,
                 full: bool = False) -> dict:
    """Run the chosen sections, merge with a previous report.json for the others, write both files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections = resolve_sections(only)
    fresh = run_sections(sections, quick, device, out, full)
    previous = {}
    if only and (out / "report.json").exists():
        try:
            previous = json.loads((out / "report.json").read_text()).get("sections", {})
        except (json.JSONDecodeError, OSError):
            previous = {}
    report = {"generated": _now(), "command": command, "environment": environment(device),
              "sections": {**previous, **_jsonable(fresh)}}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "report.md").write_text(render(report))
    return report
