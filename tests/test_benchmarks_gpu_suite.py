"""``benchmarks/gpu_suite.py`` on a CPU machine: the dry run, the budget logic, and the bf16
check functions themselves (run here on tiny shapes in fp32/fp16 through the Triton interpreter,
whose bf16 dots are broken: NOTES §3)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_checks, gpu_suite

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_checks_imports_and_prints_the_plan():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for name in gpu_suite.CORE:
        assert f"import {name}" in out and "FAILED" not in out.split(f"import {name}")[1].splitlines()[0]
    for step in gpu_suite.STEPS:
        assert step.name in out
    assert "gpu_suite.json" in out and "bitsandbytes" in out


def test_refuses_to_run_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    assert gpu_suite.main(["--out", "/nonexistent/never-written"]) == 2


def test_budget_skips_steps_and_still_writes_results(tmp_path):
    res = gpu_suite.run_suite(tmp_path, "cpu", quick=True, budget_s=0.0)
    assert [s["status"] for s in res["steps"]] == ["skipped"] * len(gpu_suite.STEPS)
    data = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert data["benchmark"] == "gpu_suite" and data["date"] and data["environment"]["torch"]
    md = (tmp_path / "gpu_suite.md").read_text()
    assert "time budget" in md and "| finetune | skipped |" in md


def test_one_step_runs_and_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_checks, "CHECKS", {**gpu_checks.CHECKS, "dequantize": lambda device: [
        {"check": "dequantize", "case": "tiny", "ok": True, "max_err": 0.0, "worst_ratio": 0.0}]})
    res = gpu_suite.run_suite(tmp_path, "cpu", quick=True, budget_s=60, only=["check_dequantize"])
    assert res["ok"] and res["steps"][0]["status"] == "ok"
    assert "1/1 passed" in (tmp_path / "gpu_suite.md").read_text()


def test_check_dequantize_is_exact():
    rows = gpu_checks.check_dequantize(torch.device("cpu"), shapes=((5, 77),), dtypes=(torch.float16, torch.float32))
    assert len(rows) == 2 * 2 * 2 * 2 and all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]


def test_check_qlora_linear_forward_and_grads():
    cases = [(1, 40, 72, 4, True, "2d"), (5, 24, 64, 8, False, "3d"), (9, 33, 70, 0, True, "strided"),
             (7, 40, 72, 4, True, "3d", 0.25)]
    rows = gpu_checks.check_qlora_linear(torch.device("cpu"), dtype=torch.float32, cases=cases,
                                         regimes=("auto", "gemv", "gemm", "dequant_gemm"))
    bad = [r for r in rows if not r["ok"]]
    assert not bad, bad
    assert {r["check"] for r in rows} == {"qlora_linear y", "qlora_linear dx", "qlora_linear dA", "qlora_linear dB",
                                          "nf4_matmul y", "nf4_matmul dx"}


def test_check_bound_catches_a_wrong_result():
    ref = torch.ones(4)
    bound = gpu_checks._bound(torch.bfloat16, 16, torch.ones(4))
    assert gpu_checks._verdict(ref * (1 + 2 ** -8), ref, bound)["ok"]
    assert not gpu_checks._verdict(ref * 1.02, ref, bound)["ok"]
    assert not gpu_checks._verdict(ref + 1e-7, ref, None)["ok"]      # exact checks are exact


def test_check_paged_adamw_on_cpu():
    rows = gpu_checks.check_paged_adamw(torch.device("cpu"), numels=(5000, 300), steps=4, quad_numel=8192,
                                        quad_steps=30)
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]


def _child_env(monkeypatch, tmp_path, body):
    """A benchmark module ``fakepkg.fakebench`` (a dotted name is imported as is) on PYTHONPATH."""
    (tmp_path / "fakepkg").mkdir()
    (tmp_path / "fakepkg" / "__init__.py").write_text("")
    (tmp_path / "fakepkg" / "fakebench.py").write_text(body)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}:{ROOT}")
    monkeypatch.chdir(ROOT)


def test_benchmarks_run_in_a_child_process(monkeypatch, tmp_path):
    _child_env(monkeypatch, tmp_path, "def run(quick, device):\n"
               "    return {'rows': [{'q': quick, 'd': device}], 'markdown': 'child ok'}\n")
    ctx = gpu_suite.Context("cpu", tmp_path, quick=True)
    res = gpu_suite._bench("fakepkg.fakebench")(ctx)
    assert res["ok"] and res["markdown"] == "child ok" and res["rows"] == [{"q": True, "d": "cpu"}]


def test_a_hung_benchmark_is_killed_at_its_timeout(monkeypatch, tmp_path):
    _child_env(monkeypatch, tmp_path, "import time\ndef run(quick, device):\n    time.sleep(600)\n")
    import time
    monkeypatch.setattr(gpu_suite, "BENCH_MIN_TIMEOUT_S", 3.0)
    ctx = gpu_suite.Context("cpu", tmp_path, quick=True, deadline=time.perf_counter() + 5)
    t0 = time.perf_counter()
    res = gpu_suite._bench("fakepkg.fakebench")(ctx)
    assert not res["ok"] and "timed out after 3 s" in res["markdown"] and time.perf_counter() - t0 < 30


def test_a_failing_benchmark_reports_its_error(monkeypatch, tmp_path):
    _child_env(monkeypatch, tmp_path, "def run(quick, device):\n    raise RuntimeError('no CUDA here')\n")
    res = gpu_suite._bench("fakepkg.fakebench")(gpu_suite.Context("cpu", tmp_path, quick=True))
    assert not res["ok"] and "no CUDA here" in res["markdown"]
