"""benchmarks/bench_matmul.py runs on CPU (reference path), says so, and reports every provider."""

import json

import torch

from benchmarks import bench_matmul


def test_bench_matmul_quick_cpu_runs_and_says_cpu(tmp_path):
    bench_matmul.main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "bench_matmul_cpu.json").read_text())
    assert res["meta"]["device_type"] == "cpu" and res["meta"]["path"].startswith("reference")
    md = (tmp_path / "bench_matmul_cpu.md").read_text()
    assert md.startswith("4-bit matmul") and "CPU run" in md
    mm = [r for r in res["rows"] if r["mode"] != "dequantize"]
    assert {r["mode"] for r in mm} == {"fwd", "fwd+bwd r16"}
    for r in mm:
        for key in ("ours_s", "torch_dense_s", "dequant_matmul_s"):
            assert r[key] > 0, key
        assert r["ours_TFLOPs"] > 0 and r["speedup_vs_dense"] > 0


def test_bench_providers_compute_the_same_thing():
    """Every provider in a row times the same math (else the comparison means nothing)."""
    g = torch.Generator().manual_seed(0)
    import nf4

    w = torch.randn(64, 128, generator=g) * 0.02
    qt = nf4.quantize(w, "nf4", 64, True)
    wd = nf4.dequantize(qt, torch.float32)
    x = torch.randn(4, 128, generator=g)
    outs = {k: f() for k, f in bench_matmul._providers(x, qt, wd, None, False, 16).items()}
    for name, y in outs.items():
        torch.testing.assert_close(y, x @ wd.t(), rtol=1e-5, atol=1e-5, msg=name)
    grads = {k: f() for k, f in bench_matmul._providers(x, qt, wd, None, True, 16).items()}
    for name, gs in grads.items():
        for a, b in zip(gs, grads["ours"]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_bench_quantize_warm_child_times_both_decoders_like_for_like():
    """The like-for-like dequantize figure: a child process whose glibc keeps freed memory times
    our decode (output cache off) and bitsandbytes', interleaved."""
    import pytest

    pytest.importorskip("bitsandbytes")
    from benchmarks import bench_quantize

    res = bench_quantize._warm((128, 512), reps=3)
    for key in ("ours", "bnb"):
        assert 0 < res[f"{key}_min_s"] <= res[f"{key}_s"] <= res[f"{key}_max_s"], key
    row = {"shape": [128, 512], "reps": 3, "ours_dequantize_warm_s": res["ours_s"],
           "bnb_dequantize_warm_s": res["bnb_s"], "dequantize_warm_speedup": res["bnb_s"] / res["ours_s"]}
    md = bench_quantize._markdown([row], {"device": "cpu", "threads": 1, "bitsandbytes": True, "interleaved": True})
    assert "| 128x512 |" in md and "Like for like" in md
