"""The stable surface: ``kernels.__version__``, the raw ops' argument checks, and the rule that
library code never imports bitsandbytes, peft or transformers (the bnb bridge is duck-typed)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
import nf4
from kernels.state import quant_state

ROOT = Path(__file__).resolve().parents[1]
LIBRARY_PACKAGES = ("nf4", "kernels", "lora", "optim")
ORACLES = ("bitsandbytes", "peft", "transformers")
SEMVER = re.compile(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)")


def test_kernels_version_is_semver_and_matches_the_package():
    assert SEMVER.fullmatch(kernels.__version__), kernels.__version__
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert kernels.__version__ == project["version"]


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            names.add(str(node.args[0].value).split(".")[0])
    return names


def test_no_library_module_imports_an_oracle():
    offenders = []
    for pkg in LIBRARY_PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            bad = _imported_modules(path) & set(ORACLES)
            if bad:
                offenders.append(f"{path.relative_to(ROOT)}: {sorted(bad)}")
    assert not offenders, offenders


def test_using_the_bridge_loads_no_oracle(tmp_path):
    """In a fresh interpreter: import the library, bridge a duck-typed Params4bit, run it."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import sys, types, torch\n"
        "import nf4, kernels, lora, optim\n"
        "qt = nf4.quantize(torch.randn(8, 64))\n"
        "state2 = types.SimpleNamespace(absmax=qt.nested_absmax, code=qt.nested_code, blocksize=256)\n"
        "qs = types.SimpleNamespace(absmax=qt.absmax, code=qt.code, blocksize=64, quant_type='nf4',\n"
        "    dtype=torch.float32, shape=torch.Size([8, 64]), offset=qt.offset, state2=state2)\n"
        "w = nf4.QuantizedTensor.from_bnb(qt.data, qs)\n"
        "kernels.nf4_matmul(torch.randn(2, 64), w)\n"
        f"print(sorted(m for m in {ORACLES!r} if m in sys.modules))\n",
        encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


# ---- the raw ops check their arguments (docs/kernels.md, section 2) ----------------------------
def _state(nested=True):
    qt = nf4.quantize(torch.randn(16, 128), "nf4", 64, nested)
    return list(quant_state(qt))


def _linear(x, st, n=16, k=128, bs=64, s=None, b=None, scale=0.0, bias=None):
    return torch.ops.qlora.nf4_linear(x, *st, n, k, bs, s, b, scale, bias)


@pytest.mark.parametrize("change, kind, words", [
    (lambda st: st.__setitem__(0, st[0][:-1]), ValueError, "data must have 1024 elements"),
    (lambda st: st.__setitem__(0, st[0].to(torch.int8)), TypeError, "data must be torch.uint8"),
    (lambda st: st.__setitem__(1, st[1].float()), TypeError, "absmax must be torch.uint8"),
    (lambda st: st.__setitem__(2, st[2].half()), TypeError, "code must be torch.float32"),
    (lambda st: st.__setitem__(3, st[3].repeat(2)), ValueError, "nested_absmax must have 1 elements"),
    (lambda st: st.__setitem__(4, st[4][:128]), ValueError, "nested_code must have 256 elements"),
    (lambda st: st.__setitem__(5, None), ValueError, "nested_absmax, nested_code and offset must all be given"),
    (lambda st: st.__setitem__(0, st[0].view(-1, 2).t()), ValueError, "data must be contiguous"),
])
def test_nf4_linear_names_the_bad_state_tensor(change, kind, words):
    st = _state()
    change(st)
    with pytest.raises(kind, match=f"qlora::nf4_linear: {words}"):
        _linear(torch.randn(2, 128), st)


@pytest.mark.parametrize("call, kind, words", [
    (lambda st: _linear(torch.randn(2, 100), st), ValueError, r"x must be 2-D \[\*, 128\]"),
    (lambda st: _linear(torch.randn(2, 128).long(), st), TypeError, "x must be one of"),
    (lambda st: _linear(torch.randn(2, 128), st, bs=48), ValueError, "blocksize must be one of"),
    (lambda st: _linear(torch.randn(2, 128), st, n=-1), ValueError, "n must be an int >= 0"),
    (lambda st: _linear(torch.randn(2, 128), st, s=torch.randn(2, 4)), ValueError,
     "lora_s and lora_B must both be tensors or both be None"),
    (lambda st: _linear(torch.randn(2, 128), st, s=torch.randn(2, 4), b=torch.randn(16, 5), scale=1.0),
     ValueError, r"lora_B must be 2-D \[16, 4\]"),
    (lambda st: _linear(torch.randn(2, 128), st, s=torch.randn(2, 4).double(), b=torch.randn(16, 4), scale=1.0),
     TypeError, "lora_s must be one of"),
    (lambda st: _linear(torch.randn(2, 128), st, scale=float("nan")), ValueError, "scale must be a finite float"),
    (lambda st: _linear(torch.randn(2, 128), st, bias=torch.randn(15)), ValueError, r"bias must be \[16\]"),
])
def test_nf4_linear_names_the_bad_argument(call, kind, words):
    with pytest.raises(kind, match=f"qlora::nf4_linear: {words}"):
        call(_state())


def test_dx_dequantize_and_dropout_check_their_arguments():
    st = _state(nested=False)
    with pytest.raises(ValueError, match=r"qlora::nf4_linear_dx: dy must be 2-D \[\*, 16\]"):
        torch.ops.qlora.nf4_linear_dx(torch.randn(2, 128), *st, 16, 128, 64, None, None, 0.0, None, 0.0)
    with pytest.raises(ValueError, match=r"qlora::nf4_linear_dx: p must be a probability in \[0, 1\)"):
        torch.ops.qlora.nf4_linear_dx(torch.randn(2, 16), *st, 16, 128, 64, None, None, 0.0, None, 1.0)
    with pytest.raises(TypeError, match="qlora::nf4_linear_dx: seed must be a one-element int64 tensor"):
        torch.ops.qlora.nf4_linear_dx(torch.randn(2, 16), *st, 16, 128, 64, None, None, 0.0, torch.tensor(1.0), 0.1)
    with pytest.raises(TypeError, match="qlora::dequantize: dtype must be one of"):
        torch.ops.qlora.dequantize(*st, 16 * 128, 64, torch.int32)
    with pytest.raises(ValueError, match="qlora::dequantize: absmax must have 16 elements, got 32"):
        torch.ops.qlora.dequantize(*st, 16 * 128, 128, torch.float32)
    with pytest.raises(TypeError, match="qlora::dropout: seed must be a one-element int64 tensor"):
        torch.ops.qlora.dropout(torch.randn(2, 3), torch.tensor([1, 2]), 0.5)


def test_tensors_on_another_device_are_named():
    """(Called on the contract directly: a meta tensor among the op's inputs would dispatch the
    op to its fake implementation, which checks nothing.)"""
    from kernels.contract import check_nf4_linear

    st = _state()
    st[3] = torch.ones(1, device="meta")
    with pytest.raises(ValueError, match="qlora::nf4_linear: nested_absmax is on meta, expected cpu"):
        check_nf4_linear(torch.randn(2, 128), *st, 16, 128, 64, None, None, 0.0, None)


def test_a_weight_is_checked_again_when_any_of_its_tensors_changes():
    """The identity cache never lets a different tensor through: swap one state tensor for a
    bad one (same data object) and the full checks run again."""
    st = _state()
    x = torch.randn(2, 128)
    _linear(x, st)  # passes and is remembered
    _linear(x, st)
    bad = list(st)
    bad[1] = st[1][:-1]
    with pytest.raises(ValueError, match="absmax must have 32 elements"):
        _linear(x, bad)
    with pytest.raises(ValueError, match="data must have 2048 elements"):
        _linear(torch.randn(2, 256), st, k=256)  # same tensors, another shape claim
