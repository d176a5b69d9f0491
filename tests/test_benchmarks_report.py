"""``python -m benchmarks``: section selection, graceful degradation, report files, recorded results."""

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from benchmarks import recorded, report
from benchmarks.report import Part, Section

ROOT = Path(__file__).resolve().parents[1]


def test_resolve_sections_by_letter_or_name_in_report_order():
    assert [s.key for s in report.resolve_sections("finetune,a")] == ["a", "d"]
    assert [s.key for s in report.resolve_sections(None)] == ["a", "b", "c", "d", "e"]
    with pytest.raises(ValueError, match="'zz'"):
        report.resolve_sections("b,zz")


def _fake_module(monkeypatch, name, **attrs):
    mod = types.ModuleType(name)
    for k, v in attrs.items():
        setattr(mod, k, v)
    monkeypatch.setitem(sys.modules, name, mod)


def test_run_part_degrades_gracefully(monkeypatch, tmp_path):
    missing = report.run_part(Part("benchmarks.no_such_bench", "x"), True, "cpu", tmp_path)
    assert missing["status"] == "unavailable" and "no_such_bench" in missing["reason"]

    _fake_module(monkeypatch, "fake_norun")
    assert "has no run" in report.run_part(Part("fake_norun", "x"), True, "cpu", tmp_path)["reason"]

    def boom(quick, device):
        raise RuntimeError("kernel exploded")
    _fake_module(monkeypatch, "fake_boom", run=boom)
    res = report.run_part(Part("fake_boom", "x"), True, "cpu", tmp_path)
    assert res["status"] == "error" and "kernel exploded" in res["reason"] and "Traceback" in res["traceback"]

    _fake_module(monkeypatch, "fake_bad", run=lambda quick, device: [1, 2])
    assert "without a 'markdown'" in report.run_part(Part("fake_bad", "x"), True, "cpu", tmp_path)["reason"]


def test_run_part_passes_out_dir_and_adopts_plots(monkeypatch, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    seen = {}

    def run(quick, device, out_dir=None):
        seen.update(quick=quick, device=device, out_dir=out_dir)
        (elsewhere / "p.png").write_bytes(b"png")
        return {"rows": [{"a": 1}], "markdown": "hello", "plots": [str(elsewhere / "p.png")]}
    _fake_module(monkeypatch, "fake_ok", run=run)
    res = report.run_part(Part("fake_ok", "x"), False, "cpu", out)
    assert res["status"] == "ok" and seen == {"quick": False, "device": "cpu", "out_dir": out}
    assert (out / "p.png").exists() and res["result"]["plots"] == [str(out / "p.png")]


def test_build_report_writes_files_and_only_merges(monkeypatch, tmp_path):
    calls = []

    def make(tag):
        def run(quick, device):
            calls.append(tag)
            return {"rows": [], "markdown": f"section {tag} body"}
        return run
    _fake_module(monkeypatch, "fake_a", run=make("A"))
    _fake_module(monkeypatch, "fake_b", run=make("B"))
    secs = (Section("a", "one", "(a) One", (Part("fake_a", "A"),)),
            Section("b", "two", "(b) Two", (Part("fake_b", "B"), Part("fake_missing_mod", "M"))))
    monkeypatch.setattr(report, "SECTIONS", secs)
    monkeypatch.setattr(report, "BY_KEY", {s.key: s for s in secs} | {s.name: s for s in secs})
    report.build_report(True, None, "cpu", tmp_path, "cmd")
    md = (tmp_path / "report.md").read_text()
    assert "section A body" in md and "section B body" in md and "not available:" in md and "quick" in md
    first = json.loads((tmp_path / "report.json").read_text())["sections"]["a"]["timestamp"]

    report.build_report(False, "two", "cpu", tmp_path, "cmd --only two")
    data = json.loads((tmp_path / "report.json").read_text())
    assert calls == ["A", "B", "B"]                           # --only re-ran b alone
    assert set(data["sections"]) == {"a", "b"}                # a kept from the previous report
    assert data["sections"]["a"]["timestamp"] == first and data["sections"]["a"]["quick"] is True
    assert data["sections"]["b"]["quick"] is False


def test_cli_rejects_unknown_section():
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--only", "q"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "unknown section" in proc.stderr


def test_cli_memory_section_end_to_end(tmp_path):
    pytest.importorskip("matplotlib")
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--only", "b", "--device", "cpu",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = (tmp_path / "report.md").read_text()
    assert "## (b) Memory accounting" in md and "![memory by component](memory_llama.png)" in md
    assert (tmp_path / "memory_llama.png").exists()
    assert "[report] section b" in proc.stderr                 # progress on stderr
    assert json.loads((tmp_path / "report.json").read_text())["sections"]["b"]["parts"][0]["status"] == "ok"


def test_recorded_results_latest_per_benchmark(tmp_path):
    (tmp_path / "old.json").write_text(json.dumps({"benchmark": "gpu_suite", "date": "2026-01-01", "gpu": "H100"}))
    (tmp_path / "new.json").write_text(json.dumps({"benchmark": "gpu_suite", "date": "2026-03-01",
                                                   "environment": {"gpu": "NVIDIA H200", "torch": "2.11"}}))
    (tmp_path / "new.md").write_text("# GPU suite\n\nall ok")
    (tmp_path / "other.json").write_text(json.dumps({"date": "2026-02-01", "device": "cuda"}))
    rows = recorded.collect(tmp_path)
    assert [r["benchmark"] for r in rows] == ["gpu_suite", "other"]
    assert rows[0]["file"] == "new.json" and rows[0]["device"] == "NVIDIA H200" and rows[0]["torch"] == "2.11"
    assert rows[0]["markdown"].startswith("# GPU suite") and rows[0]["committed"] is None


def test_recorded_results_read_a_gpu_suite_jsonl(tmp_path):
    lines = [{"kind": "plan", "date": "2026-12-05 10:00:00 UTC"},
             {"kind": "env", "date": "2026-12-05 10:00:03 UTC", "gpu": "NVIDIA H200", "torch": "2.11.0",
              "triton": "3.6.0"}, {"kind": "row", "step": "matmul", "ours_us": 8.0}]
    (tmp_path / "gpu_2026-12-05.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + '\n{"kind": "ro')
    (tmp_path / "gpu_2026-12-05.md").write_text("# GPU suite: NVIDIA H200")
    (row,) = recorded.collect(tmp_path)
    assert row["benchmark"] == "gpu_suite" and row["device"] == "NVIDIA H200" and row["triton"] == "3.6.0"
    assert row["date"].startswith("2026-12-05") and row["markdown"].startswith("# GPU suite")


def test_recorded_section_says_when_there_is_nothing(monkeypatch, tmp_path):
    monkeypatch.setattr(recorded, "RESULTS_DIR", tmp_path / "none")
    assert "No recorded GPU results" in recorded.run(quick=True, device="cpu")["markdown"]


def test_module_plot_function_is_called_into_the_report_folder(monkeypatch, tmp_path):
    def plot(rows, path):
        Path(path).write_bytes(b"png")
        return path
    _fake_module(monkeypatch, "benchmarks.fake_plotter", run=lambda quick, device: {"rows": [1], "markdown": "m"},
                 plot=plot)
    res = report.run_part(Part("benchmarks.fake_plotter", "x"), True, "cpu", tmp_path)
    assert res["result"]["plots"] == [str(tmp_path / "fake_plotter.png")]
    md = report.render({"generated": "now", "command": "c", "environment": {
        "device": "cpu", "cpu": "x86", "threads": 1, "python": "3", "torch": "t"}, "sections": {"a": {
        "title": "(a) A", "parts": [res], "seconds": 1.0, "timestamp": "t", "device": "cpu", "quick": False}}})
    assert "![fake_plotter.png](fake_plotter.png)" in md and "1 torch thread)" in md
