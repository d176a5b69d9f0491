"""Retrieval pairs from the Python standard library: docstring -> signature.

A pair is ``(query, document)`` for one public function, class or method of a stdlib module:

    query     the first paragraph of ``inspect.getdoc(obj)``, whitespace collapsed
    document  the qualified name and signature, e.g. ``json.dumps(obj, *, skipkeys=False, ...)``

The task for an encoder: embed every query and every document of the test split, and rank the
documents by cosine similarity to each query; the right document should come first.

    pairs = stdlib_pairs()                  # deterministic, de-duplicated
    train, test = split_by_module(pairs)    # no module on both sides

Determinism: the extraction runs in a fresh, isolated interpreter (``python -I -S``: no site
packages, so nothing has patched the stdlib: transformers, for one, adds methods to
``logging.Logger`` and torch wraps some of ``inspect``); modules are imported in sorted order
(stdout/stderr and warnings silenced), names visited in sorted order, and a default value is
written as its repr only when it is a plain literal (None, bool, int, float, str, bytes, or a
tuple of those), else ``...`` (a list of live handlers, ``<object object at 0x...>``).
Duplicates: a query or a document seen before is dropped (the first, in that order, is kept), so
every query has exactly one right document.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import re
import subprocess
import sys
import warnings
import zlib
from dataclasses import asdict, dataclass

# Modules with import side effects (GUI, a browser, printing, terminal state) or that are not
# part of the documented library.
SKIP_MODULES = frozenset({
    "this", "antigravity", "tkinter", "turtle", "turtledemo", "idlelib", "readline", "rlcompleter",
    "ensurepip", "venv", "pydoc_data", "lib2to3", "xxsubtype", "xxlimited", "xxlimited_35", "msvcrt",
    "winreg", "winsound", "nturl2path", "curses", "test", "sitecustomize", "usercustomize", "site",
    "__future__", "__hello__", "__phello__", "pip", "setuptools",
})
MIN_QUERY_WORDS = 4        # "Return the value." is not a query anyone would search with
TEST_PERCENT = 30          # share of modules (by a CRC32 of the name) in the test split
_ADDRESS_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


@dataclass(frozen=True)
class Pair:
    module: str      # top-level stdlib module the object was reached from
    name: str        # qualified name, e.g. "json.JSONDecoder.decode"
    query: str       # first docstring paragraph
    document: str    # name + signature


def first_paragraph(doc: str | None) -> str:
    """The first blank-line-separated paragraph of ``doc``, whitespace collapsed ('' for None)."""
    if not doc:
        return ""
    para = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0]
    return " ".join(para.split())


def clean_signature(sig: str) -> str:
    """Replace reprs that carry an address (``<... at 0x...>``) by ``...`` (annotations can hold them)."""
    return _ADDRESS_REPR.sub("...", sig)


def _import_quietly(name: str):
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a module this platform lacks or cannot import is skipped
            return None


def stdlib_module_names() -> list[str]:
    """Public top-level stdlib modules, sorted, without the skipped ones."""
    return sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in SKIP_MODULES)


def _public_names(mod) -> list[str]:
    names = getattr(mod, "__all__", None)
    if not isinstance(names, (list, tuple)):
        names = [n for n in vars(mod) if not n.startswith("_")]
    return sorted({n for n in names if isinstance(n, str) and not n.startswith("_")})


def _own(obj, modname: str) -> bool:
    """Defined in ``modname`` or one of its submodules (not a re-export from elsewhere)."""
    owner = getattr(obj, "__module__", None)
    return isinstance(owner, str) and (owner == modname or owner.startswith(modname + "."))


class _Text:
    """A default value shown verbatim in a signature."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _literal(value) -> bool:
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        return True
    return type(value) is tuple and all(_literal(v) for v in value)


def _signature(obj) -> str | None:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    params = [p if p.default is inspect.Parameter.empty or _literal(p.default) else p.replace(default=_Text("..."))
              for p in sig.parameters.values()]
    return clean_signature(str(sig.replace(parameters=params)))


def _pair(modname: str, qualname: str, obj) -> Pair | None:
    query = first_paragraph(inspect.getdoc(obj) if inspect.isclass(obj) or callable(obj) else None)
    if len(query.split()) < MIN_QUERY_WORDS:
        return None
    sig = _signature(obj)
    if sig is None:
        return None
    return Pair(modname, qualname, query, qualname + sig)


def module_pairs(modname: str) -> list[Pair]:
    """The pairs of one module (functions, classes and their own public methods), sorted by name."""
    mod = _import_quietly(modname)
    if mod is None:
        return []
    out: list[Pair] = []
    for name in _public_names(mod):
        obj = getattr(mod, name, None)
        if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)) or not _own(obj, modname):
            continue
        qual = f"{modname}.{name}"
        p = _pair(modname, qual, obj)
        if p is not None:
            out.append(p)
        if inspect.isclass(obj):
            for attr in sorted(vars(obj)):
                if attr.startswith("_"):
                    continue
                raw = vars(obj)[attr]
                if isinstance(raw, (staticmethod, classmethod)):
                    raw = raw.__func__
                if inspect.isfunction(raw) and not _own(raw, modname):
                    continue  # added to a stdlib class by a third-party package
                if inspect.isfunction(raw) or inspect.ismethoddescriptor(raw) or inspect.isbuiltin(raw):
                    p = _pair(modname, f"{qual}.{attr}", raw)
                    if p is not None:
                        out.append(p)
    return out


def stdlib_pairs(modules: list[str] | None = None) -> list[Pair]:
    """Pairs of ``modules`` (default: every public stdlib module), in module then name order,
    with repeated queries and repeated documents dropped (first kept). Extracted in a fresh
    isolated interpreter (module docstring), so the result does not depend on this process.

    Raises:
        ValueError: a module of ``SKIP_MODULES`` asked for; RuntimeError: the extraction failed.
    """
    names = stdlib_module_names() if modules is None else list(modules)
    bad = [m for m in names if m in SKIP_MODULES]
    if bad:
        raise ValueError(f"modules {bad} have import side effects and are skipped by design")
    proc = subprocess.run([sys.executable, "-I", "-S", __file__, *names], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"pair extraction failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return [Pair(**d) for d in json.loads(proc.stdout)]


def extract_pairs(names: list[str]) -> list[Pair]:
    """The extraction itself, in this process (``stdlib_pairs`` runs it in a clean one)."""
    seen_q: set[str] = set()
    seen_d: set[str] = set()
    out: list[Pair] = []
    for m in names:
        for p in module_pairs(m):
            if p.query in seen_q or p.document in seen_d:
                continue
            seen_q.add(p.query)
            seen_d.add(p.document)
            out.append(p)
    return out


def is_test_module(modname: str, test_percent: int = TEST_PERCENT) -> bool:
    """A stable, platform-independent assignment of a module to the test split."""
    return zlib.crc32(modname.encode("utf-8")) % 100 < test_percent


def split_by_module(pairs: list[Pair], test_percent: int = TEST_PERCENT) -> tuple[list[Pair], list[Pair]]:
    """(train, test): every module's pairs go to one side, chosen by ``is_test_module``."""
    if not 0 < test_percent < 100:
        raise ValueError(f"test_percent must be in (0, 100), got {test_percent!r}")
    train = [p for p in pairs if not is_test_module(p.module, test_percent)]
    test = [p for p in pairs if is_test_module(p.module, test_percent)]
    return train, test


def subsample(pairs: list[Pair], n: int | None) -> list[Pair]:
    """Every k-th pair so that at most ``n`` remain (deterministic; keeps the module mix)."""
    if n is None or n >= len(pairs):
        return list(pairs)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n!r}")
    step = len(pairs) / n
    return [pairs[int(i * step)] for i in range(n)]


if __name__ == "__main__":
    # the clean-interpreter side of stdlib_pairs: module names in argv, JSON pairs on stdout
    sys.path.pop(0)  # this file's folder: nothing in it may shadow a stdlib module
    _out = sys.stdout
    _pairs = extract_pairs(sys.argv[1:])
    _out.write(json.dumps([asdict(p) for p in _pairs]))
