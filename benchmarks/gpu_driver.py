"""The GPU suite's driver: every step in a child process, bounded in time, nothing lost.

    records = run_plan(steps, out, budget_s=480, device="cuda")

Parent (``run_plan``): for each ``Step`` in order, start

    python -m benchmarks.gpu_suite --child NAME --target module:function --out OUT ...

in its own process group (``start_new_session``), its stdout and stderr appended to
``OUT/gpu_suite.log``, and wait at most ``min(step.timeout_s, budget left - END_RESERVE_S)``.
Past that the whole group is killed (SIGTERM, then SIGKILL: a hung kernel, or a grandchild such
as pytest's, goes with it) and the step is recorded as ``{"kind": "step", "step", "status":
"timeout"}``; the suite goes on with the next step. A step that would get less than its
``min_s`` is recorded as skipped. After every step the markdown is re-rendered from the JSONL.

Child (``run_child``): imports ``module:function``, calls it with a ``StepContext`` and exits.
The function appends each result row to ``OUT/gpu_suite.jsonl`` through ``ctx.emit`` as soon as
it is measured (one line, flushed and fsync'ed), so rows measured before a hang or a crash stay.

Statuses: ok (exit 0), failed (exit 3: the step ran, and a check in it failed), skipped (the
step said so, or no time was left), error (any other exit; the traceback tail from the log is
recorded), timeout (killed).

JSONL records (one JSON object a line, every one with ``kind``):
    plan    the suite started: steps with timeouts, budget, python, argv       (parent)
    env     device and versions                                                 (the smoke step)
    row     one measurement or check result, with ``step``                      (children)
    note    a sentence for the report, with ``step``                            (children)
    result  the step function's own verdict: status and note                    (children)
    step    the step's outcome: status, seconds, timeout_s, rc, traceback tail  (parent)
    end     the suite finished: wall seconds, counts by status                  (parent)
"""

from __future__ import annotations

import importlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

JSONL_NAME = "gpu_suite.jsonl"
MD_NAME = "gpu_suite.md"
LOG_NAME = "gpu_suite.log"
END_RESERVE_S = 5.0       # budget kept back for the last kill, record and render
KILL_GRACE_S = 2.0        # SIGTERM -> SIGKILL
REAP_WAIT_S = 10.0        # how long to wait for a killed child to be reaped before moving on
EXIT_FAILED = 3           # the child's exit code for "ran, and a check failed"
TRACEBACK_LINES = 40      # traceback tail kept in a step record
TRACEBACK_CHARS = 4000
REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Step:
    """One step of the plan: ``target`` ("module:function") runs in a child process."""

    name: str
    target: str
    timeout_s: float
    what: str = ""
    min_s: float = 3.0        # not started with less than this left

    def __post_init__(self) -> None:
        if ":" not in self.target:
            raise ValueError(f"step {self.name!r}: target must be 'module:function', got {self.target!r}")
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ValueError(f"step {self.name!r}: timeout_s must be a positive number, got {self.timeout_s}")


# ---- records ---------------------------------------------------------------------------------
def append_record(path: Path, record: dict) -> None:
    """Append one JSON line and make it durable before returning (a kill right after loses nothing)."""
    line = json.dumps(record, default=_json_default, allow_nan=True) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _json_default(v):
    if hasattr(v, "item") and callable(v.item):        # 0-d tensors / numpy scalars
        return v.item()
    if isinstance(v, (set, tuple)):
        return list(v)
    if isinstance(v, Path):
        return str(v)
    return str(v)


def read_records(path: Path) -> list[dict]:
    """Every complete JSON line of ``path`` (a line cut short by a kill is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


@dataclass
class StepContext:
    """What a step function gets: where to write, the device, the size, optional overrides."""

    step: str
    out: Path
    device: str = "cuda"
    quick: bool = False
    params: dict = field(default_factory=dict)

    @property
    def jsonl(self) -> Path:
        return self.out / JSONL_NAME

    def emit(self, row: dict, kind: str = "row") -> dict:
        """Append ``row`` (tagged with the step and a timestamp) to the JSONL now."""
        rec = {"kind": kind, "step": self.step, **row, "t": round(time.time(), 3)}
        append_record(self.jsonl, rec)
        return rec

    def note(self, text: str) -> None:
        self.emit({"text": text}, kind="note")
        print(f"[{self.step}] {text}", flush=True)

    def param(self, key: str, default):
        """A size override (the suite's CPU tests pass tiny shapes), else ``default``."""
        return self.params.get(key, default)

    def records(self) -> list[dict]:
        return read_records(self.jsonl)


# ---- child -----------------------------------------------------------------------------------
def resolve(target: str) -> Callable[[StepContext], dict | None]:
    mod_name, _, fn_name = target.partition(":")
    fn = getattr(importlib.import_module(mod_name), fn_name, None)
    if not callable(fn):
        raise AttributeError(f"step target {target!r}: {mod_name} has no callable {fn_name!r}")
    return fn


def run_child(ctx: StepContext, target: str) -> int:
    """Run one step function; exit code 0 (ok or skipped), EXIT_FAILED, or 1 on an exception."""
    try:
        res = resolve(target)(ctx) or {}
    except Exception:  # noqa: BLE001 - the parent records the traceback from the log
        traceback.print_exc()
        sys.stderr.flush()
        return 1
    status = res.get("status", "ok")
    if status not in ("ok", "failed", "skipped"):
        raise ValueError(f"step {ctx.step}: status must be ok, failed or skipped, got {status!r}")
    ctx.emit({"status": status, "note": res.get("note")}, kind="result")
    return EXIT_FAILED if status == "failed" else 0


# ---- parent ----------------------------------------------------------------------------------
def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the child's process group, SIGKILL what is left after KILL_GRACE_S."""
    for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, REAP_WAIT_S)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
            if sig == signal.SIGKILL:
                return
        except subprocess.TimeoutExpired:
            continue
    try:  # the leader is gone; grandchildren that outlived SIGTERM still get SIGKILL
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def traceback_tail(text: str) -> str:
    """From the last Python traceback in ``text`` to its end (else the last lines), bounded."""
    i = text.rfind("Traceback (most recent call last):")
    tail = text[i:] if i >= 0 else text
    lines = tail.rstrip().splitlines()[-TRACEBACK_LINES:]
    return "\n".join(lines)[-TRACEBACK_CHARS:]


def _child_cmd(step: Step, out: Path, device: str, quick: bool, params: dict) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks.gpu_suite", "--child", step.name, "--target", step.target,
           "--out", str(out), "--device", device]
    if quick:
        cmd.append("--quick")
    if params:
        cmd += ["--child-params", json.dumps(params)]
    return cmd


def run_step(step: Step, out: Path, timeout_s: float, device: str, quick: bool, params: dict,
             env: dict | None = None, echo=None) -> dict:
    """Run one step as a child; return its ``step`` record (also appended to the JSONL)."""
    log_path = out / LOG_NAME
    print(f"[gpu_suite] step {step.name} (timeout {timeout_s:.0f} s) ...", file=sys.stderr, flush=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n===== step {step.name} ({step.target}), timeout {timeout_s:.0f} s =====\n")
        log.flush()
        start_offset = log.tell()
        t0 = time.perf_counter()
        proc = subprocess.Popen(_child_cmd(step, out, device, quick, params), cwd=str(REPO_ROOT), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            rc = proc.returncode
        seconds = time.perf_counter() - t0
    with open(log_path, encoding="utf-8", errors="replace") as f:
        f.seek(start_offset)
        text = f.read()
    rec = {"kind": "step", "step": step.name, "seconds": round(seconds, 2), "timeout_s": round(timeout_s, 1),
           "rc": rc}
    if timed_out:
        rec.update(status="timeout", note=f"killed after {timeout_s:.0f} s (process group); the suite went on")
        rec["log_tail"] = "\n".join(text.rstrip().splitlines()[-10:])[-1500:]
    elif rc == 0 or rc == EXIT_FAILED:
        verdict = next((r for r in reversed(read_records(out / JSONL_NAME))
                        if r.get("kind") == "result" and r.get("step") == step.name), {})
        rec["status"] = "failed" if rc == EXIT_FAILED else verdict.get("status", "ok")
        if verdict.get("note"):
            rec["note"] = verdict["note"]
    else:
        rec["status"] = "error"
        rec["note"] = f"killed by signal {-rc}" if rc is not None and rc < 0 else f"exit code {rc}"
        rec["traceback"] = traceback_tail(text)
    append_record(out / JSONL_NAME, rec)
    if echo is not None:
        echo(rec, text)
    return rec


def run_plan(steps: list[Step], out: Path, budget_s: float, device: str = "cuda", quick: bool = False,
             params: dict | None = None, env: dict | None = None, render: Callable[[list[dict]], str] | None = None,
             echo=None, plan_extra: dict | None = None) -> list[dict]:
    """Run ``steps`` in order inside ``budget_s`` seconds; returns the step records.

    ``params`` maps a step name to its size overrides (``StepContext.params``). ``render`` turns
    the JSONL records into markdown, rewritten to ``OUT/gpu_suite.md`` after every step.
    """
    if not budget_s > 0:
        raise ValueError(f"budget_s must be > 0, got {budget_s}")
    names = [s.name for s in steps]
    if len(set(names)) != len(names):
        raise ValueError(f"step names must be unique, got {names}")
    out.mkdir(parents=True, exist_ok=True)
    for name in (JSONL_NAME, LOG_NAME):
        (out / name).write_text("")
    params = params or {}
    t0 = time.perf_counter()
    append_record(out / JSONL_NAME, {
        "kind": "plan", "budget_s": budget_s, "device": device, "quick": quick, "python": sys.version.split()[0],
        "argv": sys.argv, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "steps": [{"name": s.name, "timeout_s": s.timeout_s, "what": s.what} for s in steps], **(plan_extra or {})})

    def _render() -> None:
        if render is not None:
            (out / MD_NAME).write_text(render(read_records(out / JSONL_NAME)))

    _render()
    results = []
    for step in steps:
        left = budget_s - (time.perf_counter() - t0) - END_RESERVE_S
        timeout = min(step.timeout_s, left)
        if timeout < step.min_s:
            rec = {"kind": "step", "step": step.name, "status": "skipped", "seconds": 0.0,
                   "timeout_s": step.timeout_s,
                   "note": f"time budget: {max(left, 0):.0f} s left, the step needs at least {step.min_s:.0f} s"}
            append_record(out / JSONL_NAME, rec)
            if echo is not None:
                echo(rec, "")
        else:
            rec = run_step(step, out, timeout, device, quick, params.get(step.name, {}), env=env, echo=echo)
        results.append(rec)
        _render()
    counts: dict[str, int] = {}
    for r in results:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    append_record(out / JSONL_NAME, {"kind": "end", "wall_s": round(time.perf_counter() - t0, 2),
                                     "statuses": counts})
    _render()
    return results
