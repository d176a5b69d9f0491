"""Every script in examples/ runs as ``python examples/<name>.py --tiny`` (executed here as ``__main__``
with that argv). The scripts check their own results (asserts); these tests check what they print.

(a) runs the Triton kernels through the interpreter, as the rest of the suite does. (b) and (c) run
whole models for several forwards and training steps, so they run on the CPU reference path, which
is what ``python examples/...`` gives on a CPU machine; the kernels under them are tested elsewhere.
"""

from __future__ import annotations

import re
import runpy
import sys
from pathlib import Path

import pytest

import kernels

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, monkeypatch, capsys, *args: str) -> str:
    path = EXAMPLES / name
    monkeypatch.setattr(sys, "argv", [str(path), "--tiny", *args])
    runpy.run_path(str(path), run_name="__main__")
    return capsys.readouterr().out


def test_every_example_is_tested():
    tested = set(re.findall(r'run_example\("(\w+\.py)"', Path(__file__).read_text(encoding="utf-8")))
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_raw_ops_linear(monkeypatch, capsys):
    out = run_example("raw_ops_linear.py", monkeypatch, capsys)
    assert "Packed4bitLinear 64x128" in out and "bits/weight" in out
    assert len(re.findall(r"max \|(y|dx|dbias) - dense F.linear\|", out)) == 3


def test_raw_ops_linear_packs_exactly_what_nf4_and_bitsandbytes_pack():
    """The example's ten-line quantizer writes bitsandbytes' NF4 format: the same bytes as nf4.quantize."""
    import torch

    import nf4

    example = runpy.run_path(str(EXAMPLES / "raw_ops_linear.py"))
    w = torch.randn(48, 256)
    w[3, :64] = 0  # an all-zero block
    data, absmax = example["quantize_nf4"](w)
    ref = nf4.quantize(w, "nf4", 64, double_quant=False)
    assert torch.equal(data, ref.data.flatten()) and torch.equal(absmax, ref.absmax)


def test_bnb_model_on_our_kernels(monkeypatch, capsys):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("transformers")
    with kernels.force_backend("reference"):
        out = run_example("bnb_model_on_our_kernels.py", monkeypatch, capsys, "--reps", "1")
    assert "14 bitsandbytes Linear4bit layers now run on our kernels" in out and "0 bytes copied" in out
    rows = re.findall(r"ours/theirs speed ([\d.]+)x\s+max logit diff ([\d.e+-]+)", out)
    assert len(rows) == 2  # decode and prefill, both timed
    if "bitsandbytes repacked its weights" not in out:
        # both dequantize exactly and multiply in float32 (bitsandbytes' AVX2 / generic CPU path); on
        # AVX512-BF16 CPUs bitsandbytes switches to its own kernel with bfloat16 scales, which the script reports
        # float32 summation order at most: 2 layers x 2 chained matmuls of length K <= 128 (measured: 0)
        assert all(float(diff) <= 2 * 2 * 128 * 2.0**-23 for _, diff in rows), rows


def test_qlora_finetune(monkeypatch, capsys):
    pytest.importorskip("transformers")
    with kernels.force_backend("reference"):
        out = run_example("qlora_finetune.py", monkeypatch, capsys)
    assert "(14 LoRA layers)" in out
    before, after = map(float, re.search(r"held-out loss ([\d.]+) -> ([\d.]+)", out).groups())
    assert after < before
    assert "logits identical" in out
