"""``benchmarks/gpu_suite.py`` on a CPU machine: the dry run, the driver (fake steps that hang,
raise and succeed, inside a budget), the markdown, predicted vs measured, the timing helpers, the
real steps at tiny sizes, and the bf16 check functions themselves (run here in fp32/fp16 through
the Triton interpreter, whose bf16 dots are broken: NOTES §3)."""

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_bench, gpu_checks, gpu_driver, gpu_predicted, gpu_render, gpu_steps, gpu_suite, gpu_timing
from benchmarks.gpu_driver import Step, StepContext

ROOT = Path(__file__).resolve().parents[1]


# ---- the plan and the dry run ------------------------------------------------------------------------
def test_dry_run_prints_the_plan_with_each_timeout():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_suite", "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    for step in gpu_suite.PLAN:
        line = next(ln for ln in out.splitlines() if f" {step.name} " in ln)
        assert f"{step.timeout_s:.0f}s" in line
    for name in ("nf4", "kernels", "lora", "optim"):
        assert f"{name} " in out and "FAILED" not in out
    assert "gpu_suite.jsonl" in out and "python3 -m benchmarks.gpu_suite" in out and "budget 480 s" in out


def test_plan_is_ordered_by_value_and_fits_the_device_limits():
    names = [s.name for s in gpu_suite.PLAN]
    assert names[:6] == ["smoke", "matmul", "dequant", "lora", "optim", "predicted"]
    assert names[-2:] == ["finetune", "pytest"] and names.index("check_qlora_linear") < names.index("finetune")
    assert gpu_suite.DEFAULT_BUDGET_S == 480 and all(s.timeout_s <= 600 for s in gpu_suite.PLAN)
    assert gpu_suite.PLAN[0].timeout_s <= 20
    for s in gpu_suite.PLAN:                      # every target resolves to a function
        assert callable(gpu_driver.resolve(s.target))


def test_select_only_and_skip():
    assert [s.name for s in gpu_suite.select(gpu_suite.PLAN, "matmul,smoke", None)] == ["smoke", "matmul"]
    assert "pytest" not in [s.name for s in gpu_suite.select(gpu_suite.PLAN, None, "pytest")]
    with pytest.raises(ValueError, match="unknown step"):
        gpu_suite.select(gpu_suite.PLAN, "nope", None)


def test_refuses_to_run_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    assert gpu_suite.main(["--out", "/nonexistent/never-written"]) == 2


# ---- the driver: fake steps that succeed, hang, raise, fail, and run past the budget --------------------
FAKE_STEPS = '''
import os, signal, subprocess, sys, time

def good(ctx):
    ctx.emit({"x": 1})
    ctx.emit({"x": 2})
    return {"note": "fine"}

def hang(ctx):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # like a process stuck in a driver call: needs SIGKILL
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    ctx.emit({"grandchild": child.pid})
    time.sleep(600)

def boom(ctx):
    ctx.emit({"partial": True})
    raise RuntimeError("kernel exploded at M=4096")

def bad_check(ctx):
    ctx.emit({"check": "c", "case": "k", "ok": False, "max_err": 1.0, "worst_ratio": 9.0})
    return {"status": "failed", "note": "1 check failed"}

def endless(ctx):
    ctx.emit({"started": True})
    time.sleep(600)

def late(ctx):
    ctx.emit({"late": True})
'''


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_driver_records_rows_timeouts_errors_and_stays_inside_the_budget(tmp_path):
    (tmp_path / "fakesteps.py").write_text(FAKE_STEPS)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    steps = [Step("good", "fakesteps:good", 30, min_s=0.5), Step("hang", "fakesteps:hang", 2.0, min_s=0.5),
             Step("boom", "fakesteps:boom", 30, min_s=0.5), Step("bad_check", "fakesteps:bad_check", 30, min_s=0.5),
             Step("endless", "fakesteps:endless", 500, min_s=0.5), Step("late", "fakesteps:late", 30, min_s=60)]
    out, budget = tmp_path / "out", 14.0
    t0 = time.perf_counter()
    res = gpu_driver.run_plan(steps, out, budget, device="cpu", env=env, render=gpu_render.render)
    wall = time.perf_counter() - t0
    assert wall <= budget, wall
    status = {r["step"]: r["status"] for r in res}
    assert status == {"good": "ok", "hang": "timeout", "boom": "error", "bad_check": "failed",
                      "endless": "timeout", "late": "skipped"}
    recs = gpu_driver.read_records(out / gpu_driver.JSONL_NAME)
    rows = lambda step: [r for r in recs if r["kind"] == "row" and r["step"] == step]  # noqa: E731
    assert [r["x"] for r in rows("good")] == [1, 2]                      # the successful rows
    assert rows("boom") == [dict(rows("boom")[0], partial=True)]          # rows before a crash stay
    assert rows("endless") and not rows("late")
    steprec = {r["step"]: r for r in recs if r["kind"] == "step"}
    assert steprec["hang"]["timeout_s"] == 2.0 and steprec["hang"]["seconds"] < 2.0 + 15
    assert "Traceback (most recent call last)" in steprec["boom"]["traceback"]
    assert "RuntimeError: kernel exploded at M=4096" in steprec["boom"]["traceback"]
    assert steprec["endless"]["timeout_s"] < 500                          # cut to what the budget left
    assert "time budget" in steprec["late"]["note"]
    assert recs[0]["kind"] == "plan" and recs[-1]["kind"] == "end"
    grandchild = rows("hang")[0]["grandchild"]
    for _ in range(50):                                                   # the process group went with it
        if not _alive(grandchild):
            break
        time.sleep(0.1)
    assert not _alive(grandchild)
    md = (out / gpu_driver.MD_NAME).read_text()
    assert "| hang | timeout |" in md and "| boom | error |" in md and "kernel exploded" in md
    assert "| bad_check | failed |" in md and "| endless | timeout |" in md and "| late | skipped |" in md
    assert "kernel exploded" in (out / gpu_driver.LOG_NAME).read_text()


def test_step_and_plan_validation(tmp_path):
    with pytest.raises(ValueError, match="module:function"):
        Step("x", "no_colon", 10)
    with pytest.raises(ValueError, match="timeout_s"):
        Step("x", "a:b", 0)
    with pytest.raises(ValueError, match="unique"):
        gpu_driver.run_plan([Step("a", "m:f", 1), Step("a", "m:g", 1)], tmp_path, 10)
    with pytest.raises(ValueError, match="budget_s"):
        gpu_driver.run_plan([], tmp_path, 0)


def test_a_record_cut_short_is_skipped_when_read(tmp_path):
    p = tmp_path / "x.jsonl"
    gpu_driver.append_record(p, {"kind": "row", "a": float("inf"), "b": torch.tensor(2.5)})
    with open(p, "a") as f:
        f.write('{"kind": "row", "trunc')                                  # a kill mid-write
    assert gpu_driver.read_records(p) == [{"kind": "row", "a": float("inf"), "b": 2.5}]


def test_render_of_a_run_cut_short():
    recs = [{"kind": "plan", "budget_s": 480, "device": "cuda", "python": "3.12",
             "steps": [{"name": "smoke"}, {"name": "matmul"}, {"name": "lora"}]},
            {"kind": "env", "gpu": "NVIDIA H200", "torch": "2.11", "cuda": "13.0", "date": "2026-12-03"},
            {"kind": "step", "step": "smoke", "status": "ok", "seconds": 9.0, "timeout_s": 30},
            {"kind": "row", "step": "matmul", "mode": "fwd", "N": 4096, "K": 4096, "M": 1, "regime": "gemv",
             "ours_us": 8.0, "ours_iqr_us": 0.2, "bnb_us": 12.0, "bnb_hbm_frac": 0.55, "bf16_us": 30.0,
             "speedup_vs_bnb": 1.5}]
    md = gpu_render.render(recs)
    assert md.startswith("# GPU suite: NVIDIA H200, 2026-12-03")
    assert "In progress or cut short" in md and "| matmul | not run |" in md
    assert "| 4096x4096 | 1 | gemv | 12.0 | 55% |" in md
    assert "8.00 [0.20]" in md and "1.50x" in md
    # bitsandbytes' columns come before ours in the headline table
    head = next(ln for ln in md.splitlines() if ln.startswith("| W (N x K) | M |"))
    assert head.index("bnb us") < head.index("bf16 us") < head.index("ours us")


# ---- predicted vs measured -----------------------------------------------------------------------------
def _measured_records():
    return [
        {"kind": "row", "step": "matmul", "mode": "fwd", "N": 14336, "K": 4096, "M": 1, "regime": "gemv",
         "kernel": "gemv", "ours_us": 12.0, "ours_iqr_us": 0.5, "ours_hbm_frac": 0.6, "ours_timer": "cudagraph"},
        {"kind": "row", "step": "matmul", "mode": "fwd+bwd", "N": 14336, "K": 4096, "M": 1, "regime": "gemv",
         "kernel": "gemm_dx", "ours_us": 40.0, "ours_dx_us": 28.0},
        {"kind": "row", "step": "dequant", "N": 14336, "K": 4096, "kernel": "dequant", "ours_us": 40.0},
    ]


def test_predicted_joins_the_model_rows_that_were_timed(tmp_path):
    model = {"target": "sm_90a", "triton": "3.6.0", "rows": [
        {"kernel": "gemv", "M": 1, "N": 14336, "K": 4096, "variant": "splitk-v2", "regs": 96, "predicted_us": 8.0,
         "predicted_hbm_fraction": 0.9},
        {"kernel": "gemm_dx", "M": 1, "N": 14336, "K": 4096, "variant": "dx", "predicted_us": 14.0},
        {"kernel": "dequant", "M": 0, "N": 14336, "K": 4096, "variant": "dq", "predicted_us": 20.0},
        {"kernel": "gemm_fwd", "M": 4096, "N": 4096, "K": 4096, "variant": "tiled", "predicted_us": 300.0}]}
    path = tmp_path / "perf_model.json"
    path.write_text(json.dumps(model))
    out = tmp_path / "out"
    out.mkdir()
    for r in _measured_records():
        gpu_driver.append_record(out / gpu_driver.JSONL_NAME, r)
    ctx = StepContext("predicted", out, "cpu", params={"perf_model": str(path)})
    res = gpu_predicted.predicted(ctx)
    rows = [r for r in ctx.records() if r["step"] == "predicted" and r["kind"] == "row"]
    by = {r["kernel"]: r for r in rows}
    assert set(by) == {"gemv", "gemm_dx", "dequant"} and res["note"] == "3/4 rows timed"
    assert by["gemv"]["variant"] == "splitk-v2" and by["gemv"]["measured_over_predicted"] == pytest.approx(1.5)
    assert by["gemm_dx"]["measured_us"] == 28.0 and by["dequant"]["measured_over_predicted"] == pytest.approx(2.0)
    note = next(r["text"] for r in ctx.records() if r["kind"] == "note")
    assert "3 of 4" in note and "gemm_fwd" in note
    md = gpu_render.render(ctx.records())
    assert "| gemv | 1 | 14336 | 4096 | splitk-v2 | gemv | 8.00 | 12.0 [0.50] | 1.50x | 90% | 60% |" in md


def test_predicted_is_skipped_with_a_note_while_the_model_is_missing(tmp_path):
    ctx = StepContext("predicted", tmp_path, "cpu", params={"perf_model": str(tmp_path / "perf_model.json")})
    assert gpu_predicted.predicted(ctx)["status"] == "skipped"
    assert "does not exist yet" in ctx.records()[0]["text"]


def test_predicted_rejects_a_malformed_model(tmp_path):
    p = tmp_path / "perf_model.json"
    p.write_text(json.dumps({"rows": [{"kernel": "gemv", "N": 1, "K": 2}]}))
    with pytest.raises(ValueError, match=r"perf_model.json: rows\[0\] lacks \['predicted_us'\]"):
        gpu_predicted.load_model(p)
    p.write_text(json.dumps({"rows": [{"kernel": "conv", "N": 1, "K": 2, "predicted_us": 1}]}))
    with pytest.raises(ValueError, match="kernel must be one of"):
        gpu_predicted.load_model(p)


# ---- timing ------------------------------------------------------------------------------------------
def test_timing_quantiles_rotation_and_fields():
    calls = []
    fn = gpu_timing.cycle(lambda a: calls.append(a), [(1,), (2,), (3,)])
    t = gpu_timing.time_op(fn, "cpu", cpu_warmup=1, cpu_reps=5)
    assert calls == [1, 2, 3, 1, 2, 3] and t.timer == "cpu"
    assert 0 <= t.q25_us <= t.median_us <= t.q75_us and t.iqr_us == t.q75_us - t.q25_us
    assert set(t.fields("ours")) == {"ours_us", "ours_iqr_us", "ours_timer"}
    assert gpu_timing._quantiles_us([1.0, 2.0, 3.0, 4.0, 5.0]) == (3000.0, 2000.0, 4000.0)
    assert gpu_timing.copies_for(gpu_timing.ROTATE_BYTES) == 1
    assert gpu_timing.copies_for(8 << 20) == 32 and gpu_timing.copies_for(1) == gpu_timing.MAX_COPIES
    with pytest.raises(ValueError):
        gpu_timing.copies_for(0)


def test_cuda_timer_falls_back_to_do_bench_with_enough_samples(monkeypatch):
    """The CUDA branch's control flow with triton's timers and CUDA events stubbed (no GPU here):
    a failed capture is noted and the op is timed eagerly over at least MIN_EAGER_SAMPLES calls."""
    import triton.testing as tt

    def no_capture(fn, rep, quantiles):
        fn()
        raise RuntimeError("operation not permitted when stream is capturing")

    seen = {}

    def do_bench(fn, warmup, rep, quantiles):
        seen.update(rep=rep, quantiles=quantiles)
        return [2.0, 1.5, 3.0]

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            pass

        def elapsed_time(self, end):
            return 50.0                                                   # one call takes 50 ms

    monkeypatch.setattr(tt, "do_bench_cudagraph", no_capture)
    monkeypatch.setattr(tt, "do_bench", do_bench)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    calls = []
    t = gpu_timing.time_op(lambda: calls.append(1), torch.device("cuda"))
    assert t.timer == "do_bench" and "graph capture failed (RuntimeError: operation not permitted" in t.note
    assert (t.median_us, t.q25_us, t.q75_us) == (2000.0, 1500.0, 3000.0) and t.iqr_us == 1500.0
    assert seen == {"rep": gpu_timing.MIN_EAGER_SAMPLES * 50.0, "quantiles": [0.5, 0.25, 0.75]}
    monkeypatch.setattr(tt, "do_bench_cudagraph", lambda fn, rep, quantiles: [0.01, 0.009, 0.012])
    t = gpu_timing.time_op(lambda: None, torch.device("cuda"))
    assert t.timer == "cudagraph" and t.median_us == pytest.approx(10.0) and t.note is None


# ---- the real steps, at tiny sizes on CPU --------------------------------------------------------------
def _ctx(tmp_path, step, **params):
    return StepContext(step, tmp_path, "cpu", params={"cpu_reps": 3, **params})


def _rows(ctx):
    return [r for r in ctx.records() if r["kind"] == "row" and r["step"] == ctx.step]


def test_matmul_step_rows(tmp_path):
    assert not gpu_bench.bnb_gemv_ok(torch.device("cpu"), 40) and gpu_bench.bnb_gemv_ok(torch.device("cuda"), 40)
    ctx = _ctx(tmp_path, "matmul", shapes=[[64, 64]], ms=[1, 3])
    gpu_bench.matmul(ctx)
    rows = _rows(ctx)
    assert [(r["mode"], r["M"]) for r in rows] == [("fwd", 1), ("fwd+bwd", 1), ("fwd", 3), ("fwd+bwd", 3)]
    fwd = rows[0]
    for p in ("ours", "bf16", "bnb", "bnb_gemv"):
        assert fwd[f"{p}_us"] > 0 and fwd[f"{p}_iqr_us"] >= 0 and 0 < fwd[f"{p}_hbm_frac"]
    assert fwd["regime"] == gpu_bench.regime_of(1) and fwd["kernel"] == gpu_bench.kernel_name(fwd["regime"])
    assert fwd["ours_rel_err"] < 2 ** -7 and fwd["copies_4bit"] == 2       # same W, same x: bf16 rounding only
    assert fwd["speedup_vs_bf16"] == pytest.approx(fwd["bf16_us"] / fwd["ours_us"])
    assert "bnb_gemv_us" not in rows[2] and rows[1]["kernel"] == "gemm_dx" and "ours_dx_us" in rows[1]


def test_dequant_and_regimes_steps(tmp_path):
    ctx = _ctx(tmp_path, "dequant", shapes=[[40, 64]])
    assert gpu_bench.dequant(ctx) == {}
    (row,) = _rows(ctx)
    assert row["ours_exact"] and row["bnb_matches_nf4"] and row["ours_GBps"] > 0 and "speedup_vs_bnb" in row
    ctx = _ctx(tmp_path, "regimes", shapes=[[40, 64]], ms=[1, 300])
    gpu_bench.regimes(ctx)
    small, big = _rows(ctx)
    assert {"gemv_us", "gemm_us", "dequant_gemm_us"} <= set(small) and "gemv_us" not in big
    assert small["fastest"] in gpu_bench.REGIMES and small["auto_regime"] == gpu_bench.regime_of(1)


def test_optim_step_rows(tmp_path):
    ctx = _ctx(tmp_path, "optim", sizes=[[2, 5000]])
    gpu_bench.optim_step(ctx)
    rows = {r["provider"]: r for r in _rows(ctx)}
    assert list(rows)[:3] == ["torch AdamW fused", "PagedAdamW 32-bit", "PagedAdamW 8-bit"]
    assert all("error" not in r for r in rows.values()), rows
    assert rows["PagedAdamW 32-bit"]["host_step_us"] > 0 and rows["torch AdamW fused"]["speedup_vs_torch_fused"] == 1
    assert rows["PagedAdamW 8-bit"]["state_bytes"] < rows["PagedAdamW 32-bit"]["state_bytes"]


def test_lora_step_rows(tmp_path):
    ctx = _ctx(tmp_path, "lora", shapes=[[40, 64]], M=8, r=4)
    gpu_bench.lora(ctx)
    (row,) = _rows(ctx)
    for p in ("qlora", "lora16", "peft_bnb"):
        assert row[f"{p}_us"] > 0 and f"{p}_peak_bytes" in row
    assert row["speedup_vs_peft_bnb"] == pytest.approx(row["peft_bnb_us"] / row["qlora_us"])


def test_smoke_writes_the_device_record_first(tmp_path):
    ctx = _ctx(tmp_path, "smoke", case=[1, 24, 64, 4, True, "2d"])
    assert gpu_steps.smoke(ctx)["note"] == "7/7 smoke checks passed"  # 3 decoder tables (CPU: plain) + 4
    recs = ctx.records()
    assert recs[0]["kind"] == "env" and recs[0]["torch"] == torch.__version__ and recs[0]["python"]
    assert [r["check"] for r in recs[1:8]] == ["decoder"] * 3 + ["qlora_linear y", "qlora_linear dx",
                                                                 "qlora_linear dA", "qlora_linear dB"]
    assert recs[8]["kind"] == "env" and "bitsandbytes" in recs[8]         # the import comes last


def test_a_failed_check_fails_its_step(tmp_path, monkeypatch):
    def wrong(device, emit=None, **kw):
        row = {"check": "dequantize", "case": "x", "ok": False, "max_err": 1.0, "worst_ratio": float("inf")}
        emit(row)
        return [row]

    monkeypatch.setattr(gpu_checks, "check_dequantize", wrong)
    ctx = _ctx(tmp_path, "check_dequantize")
    res = gpu_steps.check_dequantize(ctx)
    assert res["status"] == "failed" and res["note"].startswith("1/1 dequantize checks failed")
    assert "0/1 checks passed" in gpu_render.render(ctx.records())


def test_pytest_step_counts_and_lists_failures(tmp_path):
    (tmp_path / "test_fake.py").write_text("def test_a():\n    pass\n\ndef test_b():\n    assert 1 == 2\n")
    ctx = _ctx(tmp_path, "pytest", files=[str(tmp_path / "test_fake.py")], k="test_")
    res = gpu_steps.pytest_cuda(ctx)
    assert res["status"] == "failed" and "1 passed" in res["note"] and "1 failed" in res["note"]
    failed = [r for r in _rows(ctx) if r["outcome"] == "failed"]
    assert len(failed) == 1 and failed[0]["test"].endswith("test_b")


# ---- the carried bitsandbytes wheel -------------------------------------------------------------------
def _wheel(path: Path, members: dict) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o755 if name.endswith(".so") else 0o644) << 16
            z.writestr(info, data)
    return path


def test_the_carried_wheel_goes_on_the_childrens_path_when_bitsandbytes_is_absent(tmp_path, monkeypatch):
    wheel = _wheel(tmp_path / "bitsandbytes-0.50.2-py3-none-any.whl", {"bitsandbytes/__init__.py": "x = 1\n",
                                                                        "bitsandbytes/libbitsandbytes_cuda130.so": "elf"})
    monkeypatch.setattr(gpu_suite, "BNB_SITE", tmp_path / "site")
    monkeypatch.setattr(gpu_suite, "bnb_installed", lambda: False)
    env, info = gpu_suite.child_environment(wheel)
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path / "site")
    assert (tmp_path / "site" / "bitsandbytes" / "__init__.py").exists() and "carried wheel" in info[
        "bitsandbytes_source"]
    assert (tmp_path / "site" / "bitsandbytes" / "libbitsandbytes_cuda130.so").stat().st_mode & 0o777 == 0o755
    env, info = gpu_suite.child_environment(None)
    assert info["bitsandbytes_source"].startswith("absent")


def test_extract_wheel_refuses_paths_outside_its_folder(tmp_path):
    wheel = _wheel(tmp_path / "bitsandbytes-evil.whl", {"../escape.py": "x"})
    with pytest.raises(ValueError, match="outside"):
        gpu_suite.extract_wheel(wheel, tmp_path / "site")
    assert not (tmp_path / "escape.py").exists()


# ---- the bf16 check functions (at tiny sizes, fp32/fp16 here) ------------------------------------------
def test_check_dequantize_is_exact():
    rows = gpu_checks.check_dequantize(torch.device("cpu"), shapes=((5, 77),), dtypes=(torch.float16, torch.float32))
    assert len(rows) == 2 * 2 * 2 * 2 and all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]


def test_check_qlora_linear_forward_and_grads():
    cases = [(1, 40, 72, 4, True, "2d"), (5, 24, 64, 8, False, "3d"), (9, 33, 70, 0, True, "strided"),
             (7, 40, 72, 4, True, "3d", 0.25)]
    emitted = []
    rows = gpu_checks.check_qlora_linear(torch.device("cpu"), dtype=torch.float32, cases=cases,
                                         regimes=("auto", "gemv", "gemm", "dequant_gemm"), emit=emitted.append)
    bad = [r for r in rows if not r["ok"]]
    assert not bad, bad
    assert emitted == list(rows)
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
