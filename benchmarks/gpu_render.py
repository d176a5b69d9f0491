"""``gpu_suite.md`` from ``gpu_suite.jsonl``: re-rendered after every step, so a run cut short
still reads as a report.

    md = render(read_records(Path("gpu_suite.jsonl")))

Layout: the device and versions (the smoke step's ``env`` record), the steps with status and
seconds, then one section per step. Steps with a known row layout (``TABLES``) get a table with
chosen columns (bitsandbytes first: it is the bar to beat); any other step gets every scalar
column of its rows. Times are medians in microseconds with the interquartile range in brackets.
"""

from __future__ import annotations

from typing import Callable

from .report_util import md_table

Column = tuple[str, Callable[[dict], str]]


# ---- cell formats ------------------------------------------------------------------------------
def _num(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 100:
            return f"{v:,.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 0.01:
            return f"{v:.2f}"
        return f"{v:.2e}"
    return str(v)


def us(prefix: str) -> Callable[[dict], str]:
    """``median [IQR]`` of ``{prefix}_us`` / ``{prefix}_iqr_us``."""
    def cell(r: dict) -> str:
        v = r.get(f"{prefix}_us")
        if v is None:
            return "n/a" if f"{prefix}_error" not in r else "error"
        iqr = r.get(f"{prefix}_iqr_us")
        return f"{_num(v)} [{_num(iqr)}]" if iqr is not None else _num(v)
    return cell


def pct(key: str) -> Callable[[dict], str]:
    return lambda r: "" if r.get(key) is None else f"{100 * r[key]:.0f}%"


def times(key: str) -> Callable[[dict], str]:
    return lambda r: "" if r.get(key) is None else f"{r[key]:.2f}x"


def val(key: str) -> Callable[[dict], str]:
    return lambda r: _num(r.get(key))


def shape(r: dict) -> str:
    return f"{r.get('N')}x{r.get('K')}"


def mib(key: str) -> Callable[[dict], str]:
    return lambda r: "" if r.get(key) is None else f"{r[key] / 2 ** 20:,.1f}"


# ---- per-step tables ---------------------------------------------------------------------------
MATMUL_FWD: list[Column] = [
    ("W (N x K)", shape), ("M", val("M")), ("regime", val("regime")),
    ("bnb us [IQR]", us("bnb")), ("bnb % HBM", pct("bnb_hbm_frac")), ("bnb gemv_4bit us", us("bnb_gemv")),
    ("bf16 us [IQR]", us("bf16")), ("bf16 % HBM", pct("bf16_hbm_frac")),
    ("ours us [IQR]", us("ours")), ("ours % HBM", pct("ours_hbm_frac")), ("ours TFLOP/s", val("ours_tflops")),
    ("speed-up vs bf16", times("speedup_vs_bf16")), ("speed-up vs bnb", times("speedup_vs_bnb")),
    ("M = 1 FMA kernel us", us("ours_fma")), ("M > 1 wgmma-smem kernel us", us("ours_mma")),
    ("eager us: bnb / bf16 / ours", lambda r: " / ".join(_num(r.get(f"{p}_eager_us")) for p in ("bnb", "bf16", "ours"))
     if r.get("ours_eager_us") is not None else ""),
    ("ours rel. err", val("ours_rel_err")),
]
MATMUL_DX: list[Column] = [
    ("W (N x K)", shape), ("M", val("M")), ("regime", val("regime")),
    ("bnb us [IQR]", us("bnb")), ("bf16 us [IQR]", us("bf16")), ("ours us [IQR]", us("ours")),
    ("ours % HBM", pct("ours_hbm_frac")), ("speed-up vs bf16", times("speedup_vs_bf16")),
    ("speed-up vs bnb", times("speedup_vs_bnb")),
]
DEQUANT: list[Column] = [
    ("W (N x K)", shape), ("bnb us [IQR]", us("bnb")), ("bnb GB/s", val("bnb_GBps")), ("bnb % HBM", pct("bnb_hbm_frac")),
    ("ours us [IQR]", us("ours")), ("ours GB/s", val("ours_GBps")), ("ours % HBM", pct("ours_hbm_frac")),
    ("speed-up vs bnb", times("speedup_vs_bnb")), ("bit-exact vs nf4", val("ours_exact")),
]
LORA: list[Column] = [
    ("W (N x K)", shape), ("M", val("M")), ("r", val("r")),
    ("peft+bnb us [IQR]", us("peft_bnb")), ("bf16 LoRA us [IQR]", us("lora16")), ("QLoRA us [IQR]", us("qlora")),
    ("speed-up vs peft+bnb", times("speedup_vs_peft_bnb")), ("speed-up vs bf16 LoRA", times("speedup_vs_lora16")),
    ("peak MiB: peft+bnb / bf16 / QLoRA", lambda r: " / ".join(
        "" if r.get(f"{p}_peak_bytes") is None else f"{r[f'{p}_peak_bytes'] / 2 ** 20:,.0f}"
        for p in ("peft_bnb", "lora16", "qlora"))),
]
OPTIM: list[Column] = [
    ("params", lambda r: f"{r['params']:,}" if isinstance(r.get("params"), int) else ""), ("optimizer", val("provider")), ("step us [IQR], state resident", us("step")),
    ("step us [IQR], state on host first", us("host_step")), ("speed-up vs torch fused", times("speedup_vs_torch_fused")),
    ("state MiB", mib("state_bytes")), ("note", val("error")),
]
PREDICTED: list[Column] = [
    ("kernel", val("kernel")), ("M", val("M")), ("N", val("N")), ("K", val("K")), ("variant (model)", val("variant")),
    ("regime (ran)", val("measured_regime")), ("predicted us", val("predicted_us")),
    ("measured us [IQR]", us("measured")), ("measured / predicted", times("measured_over_predicted")),
    ("predicted % HBM", pct("predicted_hbm_fraction")), ("measured % HBM", pct("measured_hbm_fraction")),
]
REGIMES: list[Column] = [
    ("W (N x K)", shape), ("M", val("M")), ("auto picks", val("auto_regime")),
    ("gemv us [IQR]", us("gemv")), ("gemm us [IQR]", us("gemm")), ("dequant_gemm us [IQR]", us("dequant_gemm")),
    ("fastest", val("fastest")), ("auto / fastest", times("auto_over_fastest")),
]
CHECKS: list[Column] = [
    ("check", val("check")), ("case", val("case")), ("ok", val("ok")), ("max err", val("max_err")),
    ("err / bound", val("worst_ratio")),
]
FINETUNE: list[Column] = [
    ("row", val("row")), ("bits/param", val("bits_per_param")), ("recall@1 before", val("recall_at_1_before")),
    ("recall@1", val("recall_at_1")), ("MRR", val("mrr")), ("cos to fp32", val("cos_mean")),
]
PYTEST: list[Column] = [("test", val("test")), ("outcome", val("outcome")), ("message", val("message"))]


def _split(mode_key: str, tables: dict[str, list[Column]]):
    def pick(rows: list[dict]) -> list[tuple[str, list[Column], list[dict]]]:
        out = []
        for mode, cols in tables.items():
            sel = [r for r in rows if r.get(mode_key) == mode]
            if sel:
                out.append((mode, cols, sel))
        return out
    return pick


def _one(cols: list[Column]):
    return lambda rows: [("", cols, rows)]


TABLES = {
    "matmul": _split("mode", {"fwd": MATMUL_FWD, "dx": MATMUL_DX}),
    "dequant": _one(DEQUANT),
    "lora": _one(LORA),
    "optim": _one(OPTIM),
    "predicted": _one(PREDICTED),
    "regimes": _one(REGIMES),
    "smoke": _one(CHECKS),
    "check_dequantize": _one(CHECKS),
    "check_qlora_linear": _one(CHECKS),
    "check_paged_adamw": _one(CHECKS),
    "finetune": _one(FINETUNE),
    "pytest": _one(PYTEST),
}
CHECK_STEPS_SHOW_ALL = 40      # check steps list every row up to this many, else only the failures
SKIP_KEYS = {"kind", "step", "t"}


def generic_columns(rows: list[dict]) -> list[Column]:
    keys: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k not in SKIP_KEYS and k not in keys and (v is None or isinstance(v, (int, float, str, bool))):
                keys.append(k)
    return [(k, val(k)) for k in keys]


def _env_line(env: dict | None, plan: dict | None) -> str:
    if not env:
        return (f"No device record yet (the smoke step writes it). Python {plan.get('python') if plan else '?'}, "
                f"device {plan.get('device') if plan else '?'}.")
    gpu = env.get("gpu") or env.get("device")
    parts = [f"**{gpu}**"]
    if env.get("gpu_memory_gib"):
        parts.append(f"{env['gpu_memory_gib']} GiB, sm {env.get('capability')}, {env.get('sm_count')} SMs")
    if env.get("driver"):
        parts.append(f"driver {env['driver']}")
    parts.append(f"torch {env.get('torch')} (CUDA {env.get('cuda')})")
    parts.append(f"triton {env.get('triton')}")
    if "bitsandbytes" not in env:
        parts.append("bitsandbytes not checked yet")
    else:
        parts.append(f"bitsandbytes {env['bitsandbytes'] or 'absent: ' + str(env.get('bitsandbytes_error'))}")
    parts.append(f"peft {env.get('peft')}, transformers {env.get('transformers')}, python {env.get('python')}")
    if env.get("regime_thresholds"):
        parts.append(f"regime thresholds {env['regime_thresholds']}")
    return "Device: " + "; ".join(parts) + "."


def render(records: list[dict]) -> str:
    """The whole markdown report from the JSONL records (any prefix of a run)."""
    plan = next((r for r in records if r.get("kind") == "plan"), None)
    env = next((r for r in reversed(records) if r.get("kind") == "env"), None)
    end = next((r for r in records if r.get("kind") == "end"), None)
    outcomes = {r["step"]: r for r in records if r.get("kind") == "step"}
    planned = [s["name"] for s in plan.get("steps", [])] if plan else []
    for r in records:                      # steps run outside a plan (a step called on its own) too
        if r.get("step") and r.get("kind") in ("row", "note", "step") and r["step"] not in planned:
            planned.append(r["step"])
    date = (env or {}).get("date") or (plan or {}).get("date", "?")
    gpu = (env or {}).get("gpu") or (plan or {}).get("device", "?")
    lines = [f"# GPU suite: {gpu}, {date}", "", _env_line(env, plan), ""]
    if end:
        lines.append(f"Finished in {end['wall_s']:.0f} s of a {plan['budget_s'] if plan else '?'} s budget; "
                     f"steps by status: {end.get('statuses')}. Mode: {'quick' if plan and plan.get('quick') else 'full'}.")
    else:
        lines.append(f"**In progress or cut short**: {len(outcomes)} of {len(planned)} steps recorded.")
    lines += ["", "Times are medians in microseconds, [interquartile range]; speed-ups are the peer's time over "
              "ours (> 1: ours is faster); % HBM is bytes moved / time / 4.8 TB/s.", ""]
    step_rows = []
    for name in planned:
        o = outcomes.get(name)
        n_rows = sum(1 for r in records if r.get("kind") == "row" and r.get("step") == name)
        step_rows.append([name, o["status"] if o else "not run", _num(o.get("seconds")) if o else "",
                          _num(o.get("timeout_s")) if o else "", n_rows, (o or {}).get("note", "")])
    lines += [md_table(["step", "status", "seconds", "timeout s", "rows", "note"], step_rows), ""]
    for name in planned:
        rows = [r for r in records if r.get("kind") == "row" and r.get("step") == name]
        notes = [r["text"] for r in records if r.get("kind") == "note" and r.get("step") == name]
        o = outcomes.get(name) or {}
        if not rows and not notes and not o.get("traceback") and not o.get("log_tail"):
            continue
        lines += [f"## {name}", ""]
        lines += [f"- {t}" for t in notes]
        if notes:
            lines.append("")
        if rows:
            if name.startswith("check_") or name == "smoke":
                bad = [r for r in rows if r.get("ok") is False]
                shown = rows if len(rows) <= CHECK_STEPS_SHOW_ALL else bad
                lines.append(f"{len(rows) - len(bad)}/{len(rows)} checks passed; worst error/bound ratio "
                             f"{_num(max((r.get('worst_ratio') or 0.0 for r in rows), default=0.0))} (<= 1 passes).")
                lines.append("")
                rows = shown
            tables = TABLES.get(name, lambda rs: [("", generic_columns(rs), rs)])(rows) if rows else []
            for mode, cols, sel in tables:
                if mode:
                    lines += [f"### {name} {mode}", ""]
                lines += [md_table([h for h, _ in cols], [[f(r) for _, f in cols] for r in sel]), ""]
        if o.get("traceback"):
            lines += [f"**{o['status']}**: {o.get('note', '')}", "", "```", o["traceback"], "```", ""]
        elif o.get("log_tail"):
            lines += [f"**{o['status']}**: {o.get('note', '')}; last lines of the log:", "", "```", o["log_tail"],
                      "```", ""]
    return "\n".join(lines).rstrip() + "\n"
