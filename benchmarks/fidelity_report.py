"""The fidelity study's markdown tables and its Pareto plot (recall@1 and cosine vs bits/param)."""

from __future__ import annotations

from pathlib import Path

from .report_util import pyplot


def format_label(row: dict) -> str:
    """A zero-shot row's format: ``fp32 (reference)`` or e.g. ``NF4+DQ /64``."""
    if row["format"] == "fp32":
        return "fp32 (reference)"
    return f"{row['format'].upper()}{'+DQ' if row['double_quant'] else ''} /{row['blocksize']}"


def zero_shot_table(rows: list[dict]) -> list[str]:
    lines = ["| format | bits/param | recall@1 [95% CI] | recall@10 | MRR | cos mean | cos p5 |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lo, hi = r["recall_at_1_ci"]
        lines.append(f"| {format_label(r)} | {r['bits_per_param']:.3f} | {r['recall_at_1']:.3f} [{lo:.3f}, {hi:.3f}] | "
                     f"{r['recall_at_10']:.3f} | {r['mrr']:.3f} | {r['cos_mean']:.4f} | {r['cos_p5']:.4f} |")
    return lines


def finetune_table(rows: list[dict]) -> list[str]:
    lines = ["| arm | seeds | recall@1 before | recall@1 after: mean [95% CI] | MRR before | MRR after (mean) |",
             "|---|---:|---:|---|---:|---:|"]
    for r in rows:
        lo, hi = r["recall_at_1_ci"]
        ci = f"[{lo:.3f}, {hi:.3f}]" if r["seeds"] > 1 else "(1 seed: no CI)"
        lines.append(f"| {r['arm']} | {r['seeds']} | {r['recall_at_1_before']:.3f} | {r['recall_at_1_mean']:.3f} "
                     f"{ci} | {r['mrr_before']:.3f} | {r['mrr_mean']:.3f} |")
    return lines


def verdicts(res: dict) -> list[str]:
    """Plain sentences on the paper's claims, from the numbers (CI overlap, not wishes)."""
    out = []
    zs = {(r["format"], r["double_quant"], r["blocksize"]): r for r in res["zero_shot"]}
    ref = zs.get(("fp32", False, None))
    nf4 = zs.get(("nf4", True, 64))
    if ref and nf4:
        for other in (("fp4", True, 64), ("int4", True, 64)):
            o = zs.get(other)
            if o is None:
                continue
            out.append(f"Zero-shot, cosine to fp32: NF4+DQ {nf4['cos_mean']:.4f} (p5 {nf4['cos_p5']:.4f}) vs "
                       f"{other[0].upper()}+DQ {o['cos_mean']:.4f} (p5 {o['cos_p5']:.4f}): NF4 is "
                       f"{'closer' if nf4['cos_mean'] > o['cos_mean'] else 'NOT closer'} to the fp32 embeddings.")
            ov = o["recall_at_1_ci"][0] <= nf4["recall_at_1"] <= o["recall_at_1_ci"][1] or \
                nf4["recall_at_1_ci"][0] <= o["recall_at_1"] <= nf4["recall_at_1_ci"][1]
            out.append(f"Zero-shot recall@1: NF4+DQ {nf4['recall_at_1']:.3f} vs {other[0].upper()}+DQ "
                       f"{o['recall_at_1']:.3f} (fp32 {ref['recall_at_1']:.3f}): "
                       + ("the difference is inside the bootstrap CIs: not distinguishable on this test set."
                          if ov else "the difference is outside the bootstrap CIs."))
    ft = {r["arm"]: r for r in res.get("finetune", [])}
    if "lora16" in ft and "qlora_nf4" in ft:
        a, b = ft["qlora_nf4"], ft["lora16"]
        d = a["recall_at_1_mean"] - b["recall_at_1_mean"]
        out.append(f"Fine-tune: QLoRA NF4 recall@1 {a['recall_at_1_mean']:.3f} vs 16-bit LoRA "
                   f"{b['recall_at_1_mean']:.3f} ({d:+.3f}; {a['seeds']} seed(s) each).")
        for k in ("qlora_fp4", "qlora_int4"):
            if k in ft:
                out.append(f"Fine-tune: {k} recall@1 {ft[k]['recall_at_1_mean']:.3f} "
                           f"({ft[k]['recall_at_1_mean'] - a['recall_at_1_mean']:+.3f} vs QLoRA NF4).")
    return out


def markdown(res: dict, committed: Path | None = None) -> str:
    p = res["pairs"]
    head = []
    if res.get("reduced"):
        head.append(f"**Reduced version** ({p['test']} of {p['test_available']} test pairs, "
                    f"{len(res['config']['seeds'])} seed, {res['config']['finetune']['steps']} steps): the full "
                    "study is `python -m benchmarks.fidelity --full` (results committed in "
                    "`benchmarks/results/fidelity.md`). Recall is higher than the full study's because each "
                    f"query ranks {p['test']} documents, not {p['test_available']}.")
    head.append(f"Task: stdlib docstring (first paragraph) -> `name(signature)` retrieval with all-MiniLM-L6-v2 "
                f"(transformers, mean pooling, max {res['config']['finetune']['max_len']} tokens); "
                f"{p['train']} train pairs ({p['train_modules']} modules), {p['test']} test pairs from "
                f"{p['test_modules']} other modules. Measured {res['date']}, {res['wall_s']:.0f} s.")
    lines = [" ".join(head), "", "Zero-shot: every Linear quantized with our `nf4`, dequantized to fp32 for the "
             "forward. Recall@1 CI: 95% bootstrap over queries, the same resamples for every row "
             f"({res['config']['resamples']} resamples). Cosine: each test embedding to its fp32 embedding.", ""]
    lines += zero_shot_table(res["zero_shot"])
    if res.get("finetune"):
        f = res["config"]["finetune"]
        lines += ["", f"Fine-tune: symmetric InfoNCE (T={f['temperature']}, in-batch negatives, batch {f['batch']}), "
                  f"{f['steps']} steps, LoRA r={f['r']} alpha={f['alpha']:g} on every Linear, PagedAdamW lr "
                  f"{f['lr']:g}; quantized arms: double quant, blocksize {f['blocksize']}. CI: 95% Student-t over "
                  "seeds.", ""]
        lines += finetune_table(res["finetune"])
    v = verdicts(res)
    if v:
        lines += [""] + [f"- {s}" for s in v]
    if committed is not None and Path(committed).exists() and res.get("reduced"):
        lines += ["", f"Full study (committed): see `{Path(committed).relative_to(Path(committed).parents[2])}`."]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: str | Path) -> Path | None:
    """Two panels: recall@1 (with CI) and mean cosine to fp32 against bits/param; None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    rows = [r for r in res["zero_shot"] if r["format"] != "fp32"]
    ref = next((r for r in res["zero_shot"] if r["format"] == "fp32"), None)
    colors = {"nf4": "tab:blue", "fp4": "tab:orange", "int4": "tab:green"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "recall_at_1", "recall@1 (95% bootstrap CI)"),
                           (axes[1], "cos_mean", "cosine to fp32 embedding: mean (filled), 5th pct (hollow)")):
        for r in rows:
            y = r[key]
            kw = dict(color=colors.get(r["format"], "k"), marker="o" if r["double_quant"] else "s",
                      linestyle="none")
            if key == "recall_at_1":
                lo, hi = r["recall_at_1_ci"]
                ax.errorbar(r["bits_per_param"], y, yerr=[[y - lo], [hi - y]], capsize=3, **kw)
            else:
                ax.plot(r["bits_per_param"], y, **kw)
                ax.plot(r["bits_per_param"], r["cos_p5"], **{**kw, "markerfacecolor": "none"})
            ax.annotate(format_label(r), (r["bits_per_param"], y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if ref is not None and key == "recall_at_1":
            ax.axhline(ref[key], color="gray", linestyle="--", label=f"fp32 {ref[key]:.3f}")
            ax.axhspan(*ref["recall_at_1_ci"], color="gray", alpha=0.12)
            ax.legend(fontsize=8)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_xlabel("bits / parameter (Linear weights)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    fig.suptitle(f"all-MiniLM-L6-v2 zero-shot, stdlib retrieval ({res['pairs']['test']} test pairs"
                 f"{', reduced' if res.get('reduced') else ''}, {res['date']})", fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
