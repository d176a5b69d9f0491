"""docs/kernels.md cannot rot: every ```python block in it runs, every registered ``qlora::`` op is
documented with its exact schema, and every public name it lists has the documented signature."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch

import kernels

DOC = Path(__file__).resolve().parents[1] / "docs" / "kernels.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
REQUIRES = re.compile(r"^# requires: ([\w.]+)")
SIGNATURES_MARK = "<!-- public-signatures -->"


def _blocks(lang: str) -> list[tuple[int, str]]:
    text = DOC.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == lang]


PY_BLOCKS = _blocks("python")


def test_the_doc_has_an_example_for_every_op():
    code = "\n".join(src for _, src in PY_BLOCKS)
    for op in _registered_ops():
        assert f"torch.ops.qlora.{op.split('::')[1]}(" in code, f"no example calls {op}"


@pytest.mark.parametrize("line, src", PY_BLOCKS, ids=[f"kernels.md:{line}" for line, _ in PY_BLOCKS])
def test_doc_example_runs(line, src):
    need = REQUIRES.match(src)
    if need:
        pytest.importorskip(need.group(1))
    torch._dynamo.reset()  # the compile example must trace from scratch
    exec(compile(src, f"{DOC}:{line}", "exec"), {"__name__": "docs_kernels_example"})  # noqa: S102


def _registered_ops() -> list[str]:
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("qlora::"))


def _documented_schemas() -> dict[str, str]:
    out = {}
    for _, src in _blocks("text"):
        for line in src.splitlines():
            if line.startswith("qlora::"):
                out[line.split("(", 1)[0]] = line.strip()
    return out


def _doc_problems() -> list[str]:
    """What differs between the registered qlora:: ops and docs/kernels.md (empty when in sync)."""
    documented = _documented_schemas()
    registered = _registered_ops()
    problems = [f"{op} is registered but not documented in docs/kernels.md" for op in registered
                if op not in documented]
    problems += [f"{op} is documented but not registered" for op in documented if op not in registered]
    for op in registered:
        if op in documented:
            namespace, name = op.split("::")
            schema = str(getattr(getattr(torch.ops, namespace), name).default._schema)
            if documented[op] != schema:
                problems.append(f"{op}: the doc says\n  {documented[op]}\nthe op is\n  {schema}")
    return problems


def test_every_registered_op_is_documented_with_its_exact_schema():
    assert len(_registered_ops()) >= 4
    assert _doc_problems() == []


def test_a_new_undocumented_op_fails_the_check():
    lib = torch.library.Library("qlora", "FRAGMENT")
    try:
        lib.define("undocumented_probe(Tensor x) -> Tensor")
        assert _doc_problems() == ["qlora::undocumented_probe is registered but not documented in docs/kernels.md"]
    finally:
        lib._destroy()
    assert _doc_problems() == []


def _documented_signatures() -> list[str]:
    text = DOC.read_text(encoding="utf-8")
    assert SIGNATURES_MARK in text
    block = FENCE.search(text, text.index(SIGNATURES_MARK))
    return [line.strip() for line in block.group(2).splitlines() if line.strip()]


def _resolve(dotted: str):
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        if not hasattr(obj, part):  # a submodule not imported by its package
            importlib.import_module(".".join(parts[: i + 1]))
        obj = getattr(obj, part)
    return obj


def _doc_params(params: str) -> list[tuple[str, inspect._ParameterKind, object]]:
    """(name, kind, default) of each parameter of a documented signature; defaults are evaluated
    (they are expressions such as ``torch.bfloat16``)."""
    args = ast.parse(f"def f({params}): pass").body[0].args
    value = lambda node: eval(compile(ast.Expression(node), "<doc>", "eval"), {"torch": torch})  # noqa: E731, S307
    positional = args.posonlyargs + args.args
    defaults = [inspect.Parameter.empty] * (len(positional) - len(args.defaults)) + [value(d) for d in args.defaults]
    out = []
    for a, d in zip(positional, defaults):
        kind = inspect.Parameter.POSITIONAL_ONLY if a in args.posonlyargs else inspect.Parameter.POSITIONAL_OR_KEYWORD
        out.append((a.arg, kind, d))
    for a, d in zip(args.kwonlyargs, args.kw_defaults):
        out.append((a.arg, inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.empty if d is None else value(d)))
    return out


@pytest.mark.parametrize("line", _documented_signatures())
def test_public_name_has_the_documented_signature(line):
    name, params = re.fullmatch(r"([\w.]+)\((.*)\)", line).groups()
    obj = _resolve(name)
    actual = [(p.name, p.kind, p.default) for p in inspect.signature(obj).parameters.values()]
    assert actual == _doc_params(params), f"{name}: documented ({params}), actual {inspect.signature(obj)}"


def test_signature_check_catches_a_wrong_default():
    """The comparison above is not vacuous: a changed default or a renamed argument differs."""
    actual = [(p.name, p.kind, p.default) for p in inspect.signature(kernels.dequantize).parameters.values()]
    assert actual != _doc_params("qt, dtype=torch.float16")
    assert actual != _doc_params("weight, dtype=torch.bfloat16")
    assert actual == _doc_params("qt, dtype=torch.bfloat16")
