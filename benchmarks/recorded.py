"""Recorded results: the GPU numbers committed under ``benchmarks/results/``, with date and device.

Each result is a JSON file (and usually a markdown file with the same stem) written by a
benchmark run on the GPU machine, or a ``gpu_<date>.jsonl`` of ``benchmarks/gpu_suite.py``.
Metadata is read from the JSON (``benchmark``, ``date``, ``gpu``/``device``, ``torch``, ``triton``;
for a JSONL, from its device record); for every benchmark
only the latest file is shown. The git commit date is added when git knows the file, and a file
git does not track is labelled "not committed".
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DATE_KEYS = ("date", "timestamp", "generated")
DEVICE_KEYS = ("gpu", "device_name", "device")


def _first(d: dict, keys) -> str | None:
    for k in keys:
        v = d.get(k)
        if v:
            return str(v)
    env = d.get("environment")
    if isinstance(env, dict):
        return _first(env, keys)
    return None


def _git_date(path: Path) -> str | None:
    """Commit date of the last commit touching ``path`` (None: untracked, or no git)."""
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%cs", "--", path.name], cwd=path.parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _read_jsonl(path: Path) -> dict:
    """A GPU suite run (``gpu_suite.jsonl``: one record a line) as one result: its device record
    (``kind: env``) gives date, device and versions."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short when the run was killed
    env = next((r for r in records if isinstance(r, dict) and r.get("kind") == "env"), {})
    plan = next((r for r in records if isinstance(r, dict) and r.get("kind") == "plan"), {})
    return {"benchmark": "gpu_suite", "date": env.get("date") or plan.get("date"), "environment": env}


def collect(results_dir: Path | None = None) -> list[dict]:
    """The latest result per benchmark: name, date, device, versions, markdown, commit date
    (``results_dir`` defaults to ``RESULTS_DIR``, read at call time)."""
    results_dir = RESULTS_DIR if results_dir is None else results_dir
    latest: dict[str, dict] = {}
    paths = sorted(results_dir.glob("*.json")) + sorted(results_dir.glob("*.jsonl")) if results_dir.exists() else []
    for path in paths:
        try:
            data = _read_jsonl(path) if path.suffix == ".jsonl" else json.loads(path.read_text())
        except (json.JSONDecodeError, OSError) as e:
            latest[path.stem] = {"benchmark": path.stem, "file": path.name, "error": f"unreadable: {e}"}
            continue
        if not isinstance(data, dict):
            continue
        name = str(data.get("benchmark") or path.stem)
        md_path = path.with_suffix(".md")
        entry = {
            "benchmark": name, "file": path.name, "date": _first(data, DATE_KEYS),
            "device": _first(data, DEVICE_KEYS), "torch": _first(data, ("torch",)),
            "triton": _first(data, ("triton",)),
            "markdown": md_path.read_text() if md_path.exists() else data.get("markdown"),
            "committed": _git_date(path),
        }
        old = latest.get(name)
        if old is None or (entry["date"] or "") >= (old.get("date") or ""):
            latest[name] = entry
    return sorted(latest.values(), key=lambda e: e["benchmark"])


def _demote(md: str, levels: int) -> str:
    """Push markdown headings down so they nest under the report's section headings."""
    return "\n".join(("#" * levels + line) if line.startswith("#") else line for line in md.splitlines())


def run(quick: bool, device: str) -> dict:
    rows = collect()
    if not rows:
        return {"rows": [], "markdown": f"No recorded GPU results yet (nothing under {RESULTS_DIR.name}/). "
                "Run `python3 -m benchmarks.gpu_suite --out DIR` on a GPU machine and commit its gpu_suite.jsonl "
                "and .md to benchmarks/results/ as gpu_<date>.jsonl / .md."}
    md = []
    for r in rows:
        if "error" in r:
            md.append(f"- `{r['file']}`: {r['error']}")
            continue
        committed = f"committed {r['committed']}" if r["committed"] else "**not committed**"
        md.append(f"#### Recorded: {r['benchmark']} (`{r['file']}`)\n\n*Recorded {r['date'] or 'date unknown'} on "
                  f"{r['device'] or 'device unknown'} (torch {r['torch']}, triton {r['triton']}), {committed}. "
                  f"Not measured in this run.*\n")
        if r["markdown"]:
            md.append(_demote(r["markdown"].strip(), 4) + "\n")
    return {"rows": rows, "markdown": "\n".join(md)}
