"""The report ``tools/perf_model.py`` writes: its schema, a validator and the markdown table.
Pure Python (no torch, no triton): tests and the GPU suite read the committed JSON through it.

    {"target": "sm_90a", "triton": "3.6.0",
     "rows": [{"kernel": "gemv|gemm_fwd|gemm_dx|dequant", "M": 1, "N": 14336, "K": 4096,
               "variant": "...", "regs": 96, "spills": 0, "smem": 0, "ctas_per_sm": 4,
               "ldg_bits_max": 128, "thread_instr_per_weight": 3.1, "predicted_us": 0.0,
               "predicted_hbm_fraction": 0.0, "predicted_vs_bf16": 0.0, ...extra keys}],
     "training": [{"M", "N", "K", "nested", "predicted_us", "bf16_lora_step_us",
                   "predicted_vs_bf16_lora_step", ...}], ...}

The names above are fixed (issue 13); extra keys may be added. Rows made only of library
kernels (cuBLAS, torch) have ``variant`` starting with "cublas" and null SASS fields.
"""

from __future__ import annotations

import math

KERNELS = ("gemv", "gemm_fwd", "gemm_dx", "dequant")
TOP_KEYS = {"target": str, "triton": str, "rows": list}
# name -> (type, nullable): SASS fields are null only for rows without a Triton launch
ROW_KEYS = {
    "kernel": (str, False), "M": (int, False), "N": (int, False), "K": (int, False), "variant": (str, False),
    "regs": (int, True), "spills": (int, True), "smem": (int, True), "ctas_per_sm": (int, True),
    "ldg_bits_max": (int, True), "thread_instr_per_weight": (float, True),
    "predicted_us": (float, False), "predicted_hbm_fraction": (float, False), "predicted_vs_bf16": (float, False),
}
TRAINING_KEYS = {"M": int, "N": int, "K": int, "nested": bool, "predicted_us": float,
                 "bf16_lora_step_us": float, "predicted_vs_bf16_lora_step": float}
BOUNDS = ("hbm", "issue", "lsu", "tensor")


class SchemaError(ValueError):
    """The report does not follow the schema; the message names the row and key."""


def _is(value, typ) -> bool:
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typ)


def validate(report: dict) -> None:
    """Raise ``SchemaError`` naming the first problem: missing or mistyped keys, unknown kernel,
    a non-positive time, a fraction outside (0, 1], a speed ratio <= 0, duplicated rows."""
    if not isinstance(report, dict):
        raise SchemaError(f"report must be a JSON object, got {type(report).__name__}")
    for key, typ in TOP_KEYS.items():
        if not _is(report.get(key), typ):
            raise SchemaError(f"top-level {key!r} must be {typ.__name__}, got {report.get(key)!r}")
    if report["target"] != "sm_90a":
        raise SchemaError(f"target must be 'sm_90a', got {report['target']!r}")
    if not report["triton"].startswith("3.6"):
        raise SchemaError(f"triton must be 3.6.x (the H200's), got {report['triton']!r}")
    if not report["rows"]:
        raise SchemaError("rows is empty")
    seen = set()
    for i, row in enumerate(report["rows"]):
        where = f"rows[{i}]"
        if not isinstance(row, dict):
            raise SchemaError(f"{where} must be an object")
        for key, (typ, nullable) in ROW_KEYS.items():
            if key not in row:
                raise SchemaError(f"{where} lacks {key!r}")
            v = row[key]
            if v is None and nullable and row.get("variant", "").startswith("cublas"):
                continue
            if not _is(v, typ):
                raise SchemaError(f"{where}[{key!r}] must be {typ.__name__}, got {v!r}")
        if row["kernel"] not in KERNELS:
            raise SchemaError(f"{where}['kernel'] must be one of {KERNELS}, got {row['kernel']!r}")
        if row["predicted_us"] <= 0:
            raise SchemaError(f"{where}['predicted_us'] must be > 0, got {row['predicted_us']}")
        if not 0 < row["predicted_hbm_fraction"] <= 1 + 1e-9:
            raise SchemaError(f"{where}['predicted_hbm_fraction'] must be in (0, 1], got {row['predicted_hbm_fraction']}")
        if row["predicted_vs_bf16"] <= 0:
            raise SchemaError(f"{where}['predicted_vs_bf16'] must be > 0, got {row['predicted_vs_bf16']}")
        if "bound" in row and row["bound"] not in BOUNDS:
            raise SchemaError(f"{where}['bound'] must be one of {BOUNDS}, got {row['bound']!r}")
        ident = (row["kernel"], row["M"], row["N"], row["K"], row["variant"])
        if ident in seen:
            raise SchemaError(f"{where} duplicates (kernel, M, N, K, variant) = {ident}")
        seen.add(ident)
    for i, row in enumerate(report.get("training", [])):
        for key, typ in TRAINING_KEYS.items():
            if not _is(row.get(key), typ):
                raise SchemaError(f"training[{i}][{key!r}] must be {typ.__name__}, got {row.get(key)!r}")


def _fmt(v, digits=2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def render_markdown(report: dict) -> str:
    """The report as markdown: constants, then one table per shape, then the training steps."""
    c = report.get("constants", {})
    src = report.get("source") or {}
    lines = [
        "# Performance model (predicted, sm_90a)",
        "",
        f"Generated by `tools/perf_model.py` with triton {report['triton']} on {report.get('date', '?')} "
        f"({report.get('runtime_s', 0):.0f} s), kernels at commit {src.get('git_commit') or '?'}"
        f"{' + uncommitted changes' if src.get('git_dirty') else ''}. **Every figure here is predicted** from the compiled "
        "sm_90a SASS, not measured; the GPU suite prints measured figures next to these.",
        "",
        f"Model: per launch, max(bytes / {c.get('hbm_bytes_per_s', 4.8e12):.3g} B/s, warp-instructions / "
        f"({c.get('sms', 132)} SMs x {c.get('schedulers_per_sm', 4)} x {c.get('clock_hz', 1.98e9):.3g}/s), "
        f"LSU wavefronts / ({c.get('sms', 132)} x {c.get('clock_hz', 1.98e9):.3g}/s), "
        f"tensor flops / {c.get('tensor_flops_bf16', 989e12):.3g}) with wave quantization; summed over the "
        "launches of a row. `instr/w` = thread-instructions per weight in the steady-state K loop. "
        "`vs bf16` = the bf16 peer's roofline time / ours (a bf16 weight read or a cuBLAS bf16 GEMM); "
        f"launch overhead ({c.get('launch_us', 1.0)} µs per kernel) is not in `pred µs`, see `incl. launch`.",
        "",
    ]
    head = ("| kernel | M | variant | regs | spills | smem | CTAs/SM | ldg bits | code ldg bits | instr/w "
            "| pred µs | bound | HBM frac | vs bf16 | launches | incl. launch µs | vs bf16 incl. launch |")
    sep = "|" + "---|" * (head.count("|") - 1)
    shapes = []
    for r in report["rows"]:
        if (r["N"], r["K"]) not in shapes:
            shapes.append((r["N"], r["K"]))
    for n, k in shapes:
        lines += [f"## N x K = {n} x {k}", "", head, sep]
        for r in report["rows"]:
            if (r["N"], r["K"]) != (n, k):
                continue
            lines.append("| " + " | ".join([
                r["kernel"], str(r["M"]), r["variant"], _fmt(r["regs"]), _fmt(r["spills"]), _fmt(r["smem"]),
                _fmt(r["ctas_per_sm"]), _fmt(r["ldg_bits_max"]), _fmt(r.get("code_ldg_bits")),
                _fmt(r["thread_instr_per_weight"], 1), _fmt(r["predicted_us"]), r.get("bound", ""),
                _fmt(r["predicted_hbm_fraction"]), _fmt(r["predicted_vs_bf16"]),
                _fmt(r.get("n_launches")), _fmt(r.get("predicted_us_incl_launch")),
                _fmt(r.get("predicted_vs_bf16_incl_launch")),
            ]) + " |")
        lines.append("")
    if report.get("training"):
        lines += ["## Training step (forward + backward of one QLoRA linear)", "",
                  "| N x K | M | nested | pred µs | bf16 LoRA step µs | vs bf16 LoRA step | launches | incl. launch: ours / bf16 |",
                  "|---|---|---|---|---|---|---|---|"]
        for t in report["training"]:
            lines.append(f"| {t['N']} x {t['K']} | {t['M']} | {t['nested']} | {_fmt(t['predicted_us'])} | "
                         f"{_fmt(t['bf16_lora_step_us'])} | {_fmt(t['predicted_vs_bf16_lora_step'])} | "
                         f"{_fmt(t.get('n_launches'))} | {_fmt(t.get('predicted_us_incl_launch'))} / "
                         f"{_fmt(t.get('bf16_lora_step_us_incl_launch'))} |")
        lines.append("")
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(lines)
