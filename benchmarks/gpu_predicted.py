"""Predicted vs measured: every row of ``benchmarks/results/perf_model.json`` that the suite timed.

The performance model (``tools/perf_model.py``, triton 3.6 SASS for sm_90a) writes

    {"target": "sm_90a", "triton": "3.6.0", "rows": [{"kernel": "gemv|gemm_fwd|gemm_dx|dequant",
      "M": 1, "N": 14336, "K": 4096, "variant": "...", "predicted_us": ..,
      "predicted_hbm_fraction": .., ...}]}

and the suite's rows carry the same keys: ``matmul`` forward rows are ``gemv`` or ``gemm_fwd``
(from the regime ``kernels.choose_regime(M)`` picked), its forward + backward rows ``gemm_dx``
(dx derived as fwd+bwd - fwd), ``dequant`` rows ``dequant``. The join is on (kernel, M, N, K);
dequantize has no M, so ``dequant`` rows join on (N, K) alone. Each match becomes one row with
the model's variant, the regime that ran, both times and measured / predicted (> 1: slower than
predicted). While the file does not exist the step is skipped with a note.
"""

from __future__ import annotations

import json
from pathlib import Path

from .gpu_driver import REPO_ROOT, StepContext

PERF_MODEL = REPO_ROOT / "benchmarks" / "results" / "perf_model.json"
KERNELS = ("gemv", "gemm_fwd", "gemm_dx", "dequant")


def load_model(path: Path) -> list[dict]:
    """The model's rows, validated: a typed error names the file and the bad row or key."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected an object with a 'rows' list")
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise ValueError(f"{path}: rows[{i}] is not an object")
        missing = [k for k in ("kernel", "N", "K", "predicted_us") if k not in r]
        if missing:
            raise ValueError(f"{path}: rows[{i}] lacks {missing}")
        if r["kernel"] not in KERNELS:
            raise ValueError(f"{path}: rows[{i}] kernel must be one of {KERNELS}, got {r['kernel']!r}")
    return rows


def measured_index(records: list[dict]) -> dict[tuple, dict]:
    """(kernel, M, N, K) -> {us, iqr_us, regime, hbm_frac}; M is None for dequantize."""
    out: dict[tuple, dict] = {}
    for r in records:
        if r.get("kind") != "row":
            continue
        if r.get("step") == "matmul" and r.get("mode") == "fwd" and r.get("ours_us") is not None:
            out[(r["kernel"], r["M"], r["N"], r["K"])] = {
                "us": r["ours_us"], "iqr_us": r.get("ours_iqr_us"), "regime": r.get("regime"),
                "hbm_frac": r.get("ours_hbm_frac"), "timer": r.get("ours_timer")}
        elif r.get("step") == "matmul" and r.get("mode") == "fwd+bwd" and r.get("ours_dx_us") is not None:
            out[("gemm_dx", r["M"], r["N"], r["K"])] = {
                "us": r["ours_dx_us"], "iqr_us": None, "regime": r.get("regime"),
                "hbm_frac": r.get("ours_dx_hbm_frac"), "timer": r.get("ours_dx_timer")}
        elif r.get("step") == "dequant" and r.get("ours_us") is not None:
            out[("dequant", None, r["N"], r["K"])] = {
                "us": r["ours_us"], "iqr_us": r.get("ours_iqr_us"), "regime": "dequant",
                "hbm_frac": r.get("ours_hbm_frac"), "timer": r.get("ours_timer")}
    return out


def join(model_rows: list[dict], measured: dict[tuple, dict]) -> tuple[list[dict], list[dict]]:
    """(matched rows, model rows that were not timed)."""
    matched, missed = [], []
    for p in model_rows:
        key = (p["kernel"], None if p["kernel"] == "dequant" else p.get("M"), p["N"], p["K"])
        m = measured.get(key)
        if m is None:
            missed.append(p)
            continue
        row = {"kernel": p["kernel"], "M": p.get("M"), "N": p["N"], "K": p["K"], "variant": p.get("variant"),
               "predicted_us": p["predicted_us"], "predicted_hbm_fraction": p.get("predicted_hbm_fraction"),
               "measured_us": m["us"], "measured_iqr_us": m["iqr_us"], "measured_regime": m["regime"],
               "measured_hbm_fraction": m["hbm_frac"], "measured_timer": m["timer"]}
        if p["predicted_us"]:
            row["measured_over_predicted"] = m["us"] / p["predicted_us"]
        matched.append(row)
    return matched, missed


def predicted(ctx: StepContext) -> dict:
    path = Path(ctx.param("perf_model", str(PERF_MODEL)))
    if not path.exists():
        ctx.note(f"{path.name} does not exist yet (the performance-model issue writes it): nothing to compare")
        return {"status": "skipped", "note": f"no {path.name}"}
    model_rows = load_model(path)
    matched, missed = join(model_rows, measured_index(ctx.records()))
    print(f"{'kernel':9s} {'M':>5s} {'N':>6s} {'K':>6s} {'variant':24s} {'pred us':>9s} {'meas us':>9s} {'meas/pred':>9s}")
    for row in matched:
        ctx.emit(row)
        ratio = row.get("measured_over_predicted")
        print(f"{row['kernel']:9s} {str(row['M']):>5s} {row['N']:>6d} {row['K']:>6d} {str(row['variant'])[:24]:24s} "
              f"{row['predicted_us']:9.2f} {row['measured_us']:9.2f} {ratio if ratio is None else f'{ratio:9.2f}'}",
              flush=True)
    ctx.note(f"{len(matched)} of {len(model_rows)} predicted rows were timed in this run"
             + (f"; not timed: {sorted({(p['kernel'], p.get('M'), p['N'], p['K']) for p in missed}, key=str)[:12]}"
                if missed else ""))
    return {"note": f"{len(matched)}/{len(model_rows)} rows timed"}
