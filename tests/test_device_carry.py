"""``tools/device_carry.py`` (what ``tools/prepare_device_carry.sh`` runs): the slimmed wheel, the
fp16 weights, the size of what travels and the device command, on synthetic inputs (no network)."""

import csv
import importlib.util
import io
import json
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("device_carry", ROOT / "tools" / "device_carry.py")
dc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dc)

ELF_X86_64 = b"\x7fELF\x02\x01\x01" + bytes(11) + (62).to_bytes(2, "little") + bytes(12)
LIBS = ("cpu", "cuda118", "cuda128", "cuda130", "cuda132", "rocm64", "xpu2026")


def _fake_wheel(tmp_path: Path, libs=LIBS) -> Path:
    files = {"bitsandbytes/__init__.py": b"__version__ = '0.50.2'\n", "bitsandbytes/nn/__init__.py": b""}
    files.update({f"bitsandbytes/libbitsandbytes_{lib}.so": ELF_X86_64 + lib.encode() * 1000 for lib in libs})
    record = "".join(f"{n},sha256=x,{len(d)}\n" for n, d in files.items())
    record += "bitsandbytes-0.50.2.dist-info/RECORD,,\n"
    path = tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl"
    with zipfile.ZipFile(path, "w") as z:
        for n, d in files.items():
            z.writestr(n, d)
        z.writestr("bitsandbytes-0.50.2.dist-info/RECORD", record)
    return path


def test_slim_wheel_keeps_one_cuda_library_and_a_matching_record(tmp_path):
    src = _fake_wheel(tmp_path)
    out = dc.slim_wheel(src, tmp_path / "carry", "130")
    names = zipfile.ZipFile(out).namelist()
    assert sorted(n for n in names if n.endswith(".so")) == ["bitsandbytes/libbitsandbytes_cpu.so",
                                                              "bitsandbytes/libbitsandbytes_cuda130.so"]
    record = zipfile.ZipFile(out).read("bitsandbytes-0.50.2.dist-info/RECORD").decode()
    assert {r[0] for r in csv.reader(io.StringIO(record)) if r} == set(names)
    info = dc.check_wheel(out, "130")
    assert info["cuda_lib"] == "libbitsandbytes_cuda130.so" and out.stat().st_size < src.stat().st_size


def test_slim_wheel_errors_name_the_problem(tmp_path):
    src = _fake_wheel(tmp_path, libs=("cpu", "cuda128"))
    with pytest.raises(dc.CarryError, match=r"no libbitsandbytes_cuda130\.so \(it has \['libbitsandbytes_cuda128"):
        dc.slim_wheel(src, tmp_path / "carry", "130")
    with pytest.raises(dc.CarryError, match="digits"):
        dc.slim_wheel(src, tmp_path / "carry", "13.0")
    with pytest.raises(dc.CarryError, match="expected exactly"):
        dc.check_wheel(_fake_wheel(tmp_path), "130")               # the unslimmed wheel has five
    (tmp_path / "junk.whl").write_bytes(b"not a zip")
    with pytest.raises(dc.CarryError, match="not a zip"):
        dc.check_wheel(tmp_path / "junk.whl")


def test_export_fp16_casts_floats_copies_files_and_rejects_overflow(tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    src.mkdir()
    save_file({"w": torch.tensor([0.1, -2.5, 3e-3]), "ids": torch.arange(3)}, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (src / "vocab.txt").write_text("[PAD]\n")
    info = dc.export_fp16(src, tmp_path / "dst")
    got = load_file(str(tmp_path / "dst" / "model.safetensors"))
    assert got["w"].dtype == torch.float16 and torch.equal(got["w"], torch.tensor([0.1, -2.5, 3e-3]).half())
    assert got["ids"].dtype == torch.int64 and info["files"] == ["config.json", "vocab.txt"]
    save_file({"big": torch.tensor([7e4])}, str(src / "model.safetensors"))
    with pytest.raises(dc.CarryError, match="tensor big reaches 70000"):
        dc.export_fp16(src, tmp_path / "dst")


def test_device_call_and_what_travels():
    from benchmarks import gpu_suite

    assert dc.DEVICE_COMMAND == gpu_suite.DEVICE_COMMAND                  # one command, printed by both
    call = dc.device_call()
    assert call["carry"] == [".carry"] and call["command"].count("python3 -m benchmarks.gpu_suite") == 1
    assert len(call["command"]) <= dc.COMMAND_LIMIT and " python " not in f" {call['command']} "
    size = dc.travelling_bytes()
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert size["tree"] >= sum((ROOT / f).stat().st_size for f in tracked if (ROOT / f).is_file()) > 0
    assert size["total"] == size["tree"] + size["carry"]


def test_carry_folder_is_ignored_by_git():
    proc = subprocess.run(["git", "check-ignore", "-q", ".carry/x.whl"], cwd=ROOT)
    assert proc.returncode == 0
