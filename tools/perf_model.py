"""The performance model: how fast the kernels would run on an H200, read from their sm_90a SASS.

Set-up (a separate environment with the H200's triton 3.6 and a CPU torch; no GPU needed):

    python -m venv /tmp/v36 && /tmp/v36/bin/pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0
    /tmp/v36/bin/pip install triton==3.6.0 numpy scipy safetensors

    /tmp/v36/bin/python tools/perf_model.py --json benchmarks/results/perf_model.json --md benchmarks/results/perf_model.md

Every figure it writes is **predicted**, not measured (the GPU suite measures; compare the two).

What it does. For each weight shape (N, K), M (token rows) and absmax variant (nested or plain
fp32), it calls the REAL public ops on stand-in CPU tensors (``torch.empty``: never touched) —
``kernels.qlora_linear`` forward and backward with a rank-16 LoRA, and ``kernels.dequantize`` —
with the dispatch retargeted to "CUDA" (``retarget_kernels``), so whatever regime and launcher
the dispatch picks for that M runs. ``perf_model_trace`` intercepts every launch: Triton
kernels are compiled for sm_90a (triton's warmup; nothing executes), aten ops become cuBLAS /
memory-bound torch kernels and are never computed. Each launch is then modelled:

- Triton launch: ``cuobjdump`` gives the SASS and resources (``perf_model_sass``): registers,
  spills (local memory bytes), shared memory, ``ctas_per_sm`` (``perf_model_h200.occupancy``),
  the steady-state K loop (the innermost loop with the most global loads, found from its
  back-edge branch), its width of global loads (``ldg_bits_max``; ``code_ldg_bits`` is the width
  of the loads of the packed weight itself, traced through the PTX from the weight pointer) and
  ``thread_instr_per_weight = loop instructions x 32 / (weights one iteration of one warp
  consumes)``. Per program, warp-instructions = ``num_warps x (instructions outside the loop +
  loop instructions x iterations)``. For a kernel without a loop (one tile per program) the
  whole kernel counts per weight of one program. The kernel-specific facts (weights per
  iteration, iterations, flops, which argument is the weight) live in ONE table, ``ADAPTERS`` (``tools/perf_model_adapters.py``).
- ``perf_model_h200.launch_time``: max(bytes / 4.8e12, warp-instructions / issue rate,
  LSU wavefronts / (132 x 1.98e9), tensor flops / 989e12), with the grid's wave quantization
  (waves of 132 x ctas_per_sm programs; the busiest SM of each wave sets its time). ``bytes`` are
  the distinct tensors the launch touches, each once (unique-bytes roofline, ideal L2 reuse).
- cuBLAS (``mm``/``addmm``/``bmm``): max(bytes / 4.8e12, flops / 989e12); other torch kernels:
  bytes / 4.8e12. Their rows say "cublas" in ``variant``.

A row is one public op — forward (``gemv`` when the dispatch picks the GEMV regime, else
``gemm_fwd``), backward dx (``gemm_dx``), ``dequant`` — per (N, K, M, variant): the sum of all
its launches (e.g. split-K GEMV + the torch reduction, or dequantize + GEMM), with the detail in
``launches``; its SASS columns come from its longest Triton launch (``primary``).
``predicted_hbm_fraction = (bytes the op must move: its own inputs and outputs) / 4.8e12 /
predicted_us``. ``predicted_vs_bf16 = bf16 peer / ours``, the peer being the same roofline for a
bf16 weight (``N K 2`` bytes + activations, ``2 M N K`` flops: a bf16 weight read at small M, a
cuBLAS GEMM at large M; for ``dequant``, one read of the bf16 weight). ``training`` rows sum the
whole forward + backward of ``kernels.qlora_linear`` and compare it with a bf16 LoRA step
(``y = x Wᵀ + s (x Aᵀ) Bᵀ`` in plain torch, traced and modelled the same way). A fixed cost of
``LAUNCH_US`` per kernel is reported separately (``predicted_us_incl_launch``).

``--compile-check`` (``perf_model_compile.py``) does not model: it compiles every kernel variant
(all dtypes, regimes, odd shapes, AdamW, dropout) for sm_90a and fails if one does not compile.

Run time: compiles dominate (a few seconds per distinct kernel variant); they are cached in
``TRITON_CACHE_DIR``, a fresh temporary directory per run unless ``--cache-dir`` is given.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
sys.path.insert(0, TOOLS)

import perf_model_h200 as H  # noqa: E402
from perf_model_adapters import ADAPTERS, OP_NAMESPACES, OP_ROWS, _dot_dtype, cdiv  # noqa: E402
import perf_model_report as R  # noqa: E402
import perf_model_sass as S  # noqa: E402

SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192))  # (N, K): attn, up, down, big
MS = (1, 4, 16, 4096)
QUICK_SHAPES = ((256, 512),)
QUICK_MS = (1,)
TRAIN_MIN_M = 1024  # training rows for M at least this (the dequantize-once regime starts here)
LORA_RANK = 16
LORA_SCALE = 2.0  # alpha 32 / r 16
BLOCKSIZE = 64
ACT_DTYPE = "bfloat16"
REQUIRED_TRITON = "3.6"




def retarget_kernels() -> None:
    """Make the package dispatch stand-in CPU tensors as CUDA tensors: every ``use_triton``
    imported from ``kernels.dispatch`` says yes (float64 aside), and every ``*_config``
    function of a ``kernels`` module that takes a ``device`` gets ``cuda`` (the GPU tiles)."""
    import importlib
    import inspect
    import pkgutil

    import torch

    import kernels
    from kernels import _decode, dispatch

    _decode.ASSUME_VERIFIED = True  # the stand-in driver compiles and never runs the self-check

    for info in pkgutil.iter_modules(kernels.__path__):
        importlib.import_module(f"kernels.{info.name}")
    original = dispatch.use_triton
    cuda = torch.device("cuda")

    def use_triton(t):
        dispatch.check_device(t)
        return t.dtype != torch.float64

    def on_cuda(fn):
        def wrapped(*args, **kwargs):
            args = [cuda if isinstance(x, torch.device) else x for x in args]
            kwargs = {k: cuda if isinstance(v, torch.device) else v for k, v in kwargs.items()}
            return fn(*args, **kwargs)
        wrapped.__wrapped__ = fn
        return wrapped

    for name, mod in list(sys.modules.items()):
        if name != "kernels" and not name.startswith("kernels."):
            continue
        for attr, val in list(vars(mod).items()):
            if val is original:
                setattr(mod, attr, use_triton)
            elif (attr.endswith("_config") and inspect.isfunction(val) and not hasattr(val, "__wrapped__")
                  and "device" in inspect.signature(val).parameters):
                setattr(mod, attr, on_cuda(val))


# ---- modelling one launch ------------------------------------------------------------------
class Model:
    """Turns captured launches into per-launch predictions (dicts for the report)."""

    def __init__(self, cuobjdump: str):
        self.cuobjdump = cuobjdump
        self._sass: dict[str, S.SassStats] = {}

    def sass(self, cubin: bytes) -> S.SassStats:
        key = hashlib.sha256(cubin).hexdigest()
        if key not in self._sass:
            self._sass[key] = S.analyse(*S.disassemble(cubin, self.cuobjdump))
        return self._sass[key]

    def triton(self, launch) -> dict:
        if launch.candidates:
            options = [self._triton_one(c) for c in launch.candidates]
            best = min(options, key=lambda d: d["predicted_us"])
            best["autotune"] = {"configs": len(options), "chosen_by": "lowest predicted_us"}
            return best
        return self._triton_one(launch)

    def _triton_one(self, launch) -> dict:
        st = self.sass(launch.cubin)
        a = launch.args
        ad = ADAPTERS.get(launch.name)
        # the kernel's own shared memory: ptxas shows the 1 KB reserved window as static (perf_model_h200)
        smem = launch.shared + max(0, st.static_smem - H.SMEM_RESERVED_PER_BLOCK)
        occ = H.occupancy(st.regs, launch.num_warps, launch.shared, st.static_smem)
        warps = launch.num_warps
        tipw = None
        if ad and ad.iters and ad.weights_per_iter and st.loop_instr:
            back_edges = ad.iters(a) / st.unroll
            instr = st.nonloop_instr + st.loop_instr * back_edges
            lsu = st.nonloop_lsu_cycles + st.loop_lsu_cycles * back_edges
            tipw = st.loop_instr * 32 / (ad.weights_per_iter(a) * st.unroll / warps)
        else:
            instr, lsu = st.n_instr, st.lsu_cycles  # straight-line kernel: every instruction once
            if ad and ad.weights_per_program:
                tipw = st.n_instr * 32 * warps / ad.weights_per_program(a)
        if ad and ad.cold_fraction and st.cold_instr:
            # the reduce-the-partials block runs in a fraction f of the programs, its loops
            # cold_loop_trips times there: per program on average
            f = ad.cold_fraction(a)
            trips = (1,) + tuple(ad.cold_loop_trips(a) if ad.cold_loop_trips else ())
            run_i = sum(n * trips[min(d, len(trips) - 1)] for d, (n, _) in st.cold_by_depth.items())
            run_l = sum(c * trips[min(d, len(trips) - 1)] for d, (_, c) in st.cold_by_depth.items())
            instr += run_i * f - st.cold_instr
            lsu += run_l * f - st.cold_lsu_cycles
        flops = ad.flops(a) if (ad and ad.flops and st.tensor_core) else 0
        code_bits = None
        if ad and ad.weight_param in launch.ptx_params:
            hist = S.weight_load_bits(launch.ptx, launch.ptx_params.index(ad.weight_param))
            code_bits = max(hist) if hist else None
        if occ.ctas_per_sm == 0:
            raise RuntimeError(f"{launch.name} cannot run on an H200: {st.regs} registers x {warps} warps, "
                               f"{smem} B shared ({occ.limit})")
        t = H.launch_time(programs=launch.programs, num_warps=warps, ctas_per_sm=occ.ctas_per_sm,
                          bytes_moved=launch.bytes, warp_instr_per_program=warps * instr,
                          lsu_cycles_per_program=warps * lsu, flops_per_program=flops,
                          tensor_dtype=_dot_dtype(a))
        keys = ad.variant_keys if ad else launch.constexprs
        meta = {k: _plain(a[k]) for k in keys if k in a}
        return {
            "name": launch.name, "kind": "triton", "label": _label(launch.name, meta, launch),
            "grid": list(launch.grid), "programs": launch.programs, "num_warps": warps,
            "num_stages": launch.num_stages, "meta": meta,
            "regs": st.regs, "spills": st.spills, "spill_instr": st.spill_instr, "smem": smem,
            "smem_static": st.static_smem,
            "ctas_per_sm": occ.ctas_per_sm, "occupancy_limit": occ.limit, "waves": t.waves,
            "ldg_bits_max": st.ldg_bits_max, "ldg_bits_hist": st.ldg_bits_hist, "code_ldg_bits": code_bits,
            "tensor_core": st.tensor_core, "tensor_ops": st.tensor_ops, "n_instr": st.n_instr, "loop_instr": st.loop_instr,
            "unroll": st.unroll, "thread_instr_per_weight": _r(tipw, 3),
            "bytes": launch.bytes, "flops": flops * launch.programs,
            "hbm_us": _r(t.hbm_us), "issue_us": _r(t.issue_us), "lsu_us": _r(t.lsu_us), "tensor_us": _r(t.tensor_us),
            "predicted_us": _r(t.us, 6), "bound": t.bound, "scope": list(launch.scope),
        }

    @staticmethod
    def torch(launch) -> dict:
        if launch.kind == "sync":
            return {"name": launch.op, "kind": "sync", "label": "HOST SYNC " + launch.op, "bytes": 0, "flops": 0,
                    "predicted_us": 0.0, "bound": "hbm", "scope": list(launch.scope)}
        dtype = launch.dtype if launch.dtype in H.TENSOR_FLOPS else "fp32"
        t = H.roofline_us(launch.bytes, launch.flops, dtype)
        short = launch.op.split("::")[-1]
        return {"name": launch.op, "kind": launch.kind,
                "label": f"cublas_{short}" if launch.kind == "cublas" else f"torch_{short}",
                "shapes": launch.shapes, "bytes": launch.bytes, "flops": launch.flops,
                "hbm_us": _r(t.hbm_us), "tensor_us": _r(t.tensor_us),
                "predicted_us": _r(t.us, 6), "bound": t.bound if launch.flops else "hbm", "scope": list(launch.scope)}

    def launch(self, launch) -> dict:
        return self.triton(launch) if hasattr(launch, "cubin") else self.torch(launch)


def _plain(v):
    return v if isinstance(v, (bool, int, float, str)) or v is None else str(v)


def _label(name: str, meta: dict, launch) -> str:
    flags = [k.lower() for k, v in meta.items() if v is True]
    nums = [f"{k.replace('BLOCK_', 'B')}={v}" for k, v in meta.items() if not isinstance(v, bool)]
    return f"{name.strip('_')}[{','.join(nums + flags)},w{launch.num_warps}s{launch.num_stages}]"


def _r(v, digits=4):
    return None if v is None else round(float(v), digits)


# ---- rows ----------------------------------------------------------------------------------
def summarize(launches: list[dict]) -> dict:
    """Sum a list of modelled launches into the row-level figures."""
    kernels = [d for d in launches if d["kind"] != "sync"]
    total = sum(d["predicted_us"] for d in kernels)
    longest = max(kernels, key=lambda d: d["predicted_us"]) if kernels else None
    tri = [d for d in kernels if d["kind"] == "triton"]
    primary = max(tri, key=lambda d: d["predicted_us"]) if tri else None
    overhead = len(kernels) * H.LAUNCH_US
    return {"total": total, "bound": longest["bound"] if longest else "hbm", "primary": primary,
            "n_launches": len(kernels), "host_syncs": sum(d["kind"] == "sync" for d in launches),
            "overhead": overhead, "bytes": sum(d["bytes"] for d in kernels),
            "cublas": any(d["kind"] == "cublas" for d in kernels),
            "sums": {b: sum(d.get(f"{b}_us") or 0.0 for d in kernels) for b in R.BOUNDS}}


def make_row(kernel: str, M: int, N: int, K: int, nested: bool, launches: list[dict], op_bytes: int,
             peer_us: float, regime: str, call: list[dict] | None = None) -> dict:
    s = summarize(launches)
    if not s["n_launches"]:
        raise RuntimeError(f"{kernel} M={M} N={N} K={K}: the op launched nothing (is OP_ROWS up to date?)")
    p = s["primary"]
    labels = " + ".join(d["label"] for d in launches)
    variant = f"{'cublas: ' if s['cublas'] else ''}{labels}, {'nested' if nested else 'fp32'} absmax"
    total = s["total"]
    row = {
        "kernel": kernel, "M": M, "N": N, "K": K, "variant": variant,
        "regs": p["regs"] if p else None, "spills": p["spills"] if p else None, "smem": p["smem"] if p else None,
        "ctas_per_sm": p["ctas_per_sm"] if p else None, "ldg_bits_max": p["ldg_bits_max"] if p else None,
        "thread_instr_per_weight": p["thread_instr_per_weight"] if p else None,
        "predicted_us": _r(total), "predicted_hbm_fraction": _r(op_bytes / H.HBM_BYTES_PER_S * 1e6 / total),
        "predicted_vs_bf16": _r(peer_us / total),
        # extra keys
        "nested": nested, "regime": regime, "bound": s["bound"], "primary": p["label"] if p else None,
        "code_ldg_bits": p["code_ldg_bits"] if p else None, "ldg_bits_hist": p["ldg_bits_hist"] if p else None,
        "waves": p["waves"] if p else None, "occupancy_limit": p["occupancy_limit"] if p else None,
        "op_bytes": op_bytes, "bytes": s["bytes"], "bf16_us": _r(peer_us),
        **{f"{b}_us": _r(v) for b, v in s["sums"].items()},
        "n_launches": s["n_launches"], "host_syncs": s["host_syncs"], "launch_overhead_us": _r(s["overhead"]),
        "predicted_us_incl_launch": _r(total + s["overhead"]),
        "predicted_vs_bf16_incl_launch": _r((peer_us + H.LAUNCH_US) / (total + s["overhead"])),
        "launches": launches,
    }
    if call is not None:  # the whole public call (forward: LoRA down-projection included)
        c = summarize(call)
        row["call_us"] = _r(c["total"])
        row["call_launches"] = [d["label"] for d in call]
        row["call_us_incl_launch"] = _r(c["total"] + c["overhead"])
    return row


def bf16_peer_us(M: int, N: int, K: int) -> float:
    """Roofline of the bf16 GEMM ``[M, K] x [K, N]`` (a weight read at small M)."""
    return H.roofline_us(2 * (N * K + M * K + M * N), 2 * M * N * K, "bf16").us


# ---- tracing the real ops ------------------------------------------------------------------
def stand_in_weight(N: int, K: int, nested: bool):
    """A ``nf4.QuantizedTensor`` of shape [N, K] whose tensors are never written (torch.empty)."""
    import torch

    import nf4

    n = N * K
    nblocks = cdiv(n, BLOCKSIZE)
    data = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8)
    if nested:
        return nf4.QuantizedTensor(data, (N, K), torch.bfloat16, BLOCKSIZE, "nf4", nf4.NF4.clone(),
                                   torch.empty(nblocks, dtype=torch.uint8), torch.tensor(0.0),
                                   torch.empty(cdiv(nblocks, 256)), nf4.dynamic_map(True))
    return nf4.QuantizedTensor(data, (N, K), torch.bfloat16, BLOCKSIZE, "nf4", nf4.NF4.clone(),
                               torch.empty(nblocks))


def _modelled(tracer, model: Model) -> list[tuple[str, dict]]:
    """``[(row kind, modelled launch)]`` in launch order; the kind comes from the outermost
    public op (OP_ROWS) the launch ran in, '' outside any."""
    out = []
    for launch in tracer.launches:
        top = next((s for s in launch.scope if s in OP_ROWS), None)
        out.append((OP_ROWS[top] if top else "", model.launch(launch)))
    return out


def _op_bytes(tracer, op: str) -> int:
    calls = [c for c in tracer.op_calls if c.op == op and not any(s in OP_ROWS for s in c.scope)]
    if not calls:
        raise RuntimeError(f"op {op} was not called (is OP_ROWS up to date?)")
    return sum(c.bytes for c in calls)


def trace_linear(model: Model, N: int, K: int, M: int, nested: bool, train: bool, notes: list,
                 rank: int = LORA_RANK) -> tuple:
    """Forward + backward of ``kernels.qlora_linear`` with a rank-``rank`` LoRA (0: none):
    (rows, training row or None)."""
    import torch

    import kernels
    import perf_model_trace as T

    dt = getattr(torch, ACT_DTYPE)
    qt = stand_in_weight(N, K, nested)
    x = torch.empty((M, K), dtype=dt, requires_grad=True)
    A = torch.empty((rank, K), dtype=dt, requires_grad=True) if rank else None
    B = torch.empty((N, rank), dtype=dt, requires_grad=True) if rank else None
    dy = torch.empty((M, N), dtype=dt)
    regime = kernels.choose_regime(M)
    with T.trace(OP_NAMESPACES):  # warm-up, not modelled: one-time set-up (split-K counters and
        y = kernels.qlora_linear(x, qt, A, B, LORA_SCALE)  # workspace, a code table's byte planes) is
        y.backward(dy)  # done by the first call; decode loops run the second and later ones
    x.grad = None
    if rank:
        A.grad = B.grad = None
    with T.trace(OP_NAMESPACES) as tr:
        y = kernels.qlora_linear(x, qt, A, B, LORA_SCALE)
        n_fwd = len(tr.launches)
        y.backward(dy)
    notes += [f"N={N} K={K} M={M} nested={nested}: {n}" for n in tr.notes]
    modelled = _modelled(tr, model)
    everything = [d for _, d in modelled]
    fwd_kind = "gemv" if regime == "gemv" else "gemm_fwd"
    rows = [
        make_row(fwd_kind, M, N, K, nested, [d for k, d in modelled[:n_fwd] if k == "fwd"],
                 _op_bytes(tr, "qlora::nf4_linear"), bf16_peer_us(M, N, K), regime, call=everything[:n_fwd]),
        make_row("gemm_dx", M, N, K, nested, [d for k, d in modelled[n_fwd:] if k == "dx"],
                 _op_bytes(tr, "qlora::nf4_linear_dx"), bf16_peer_us(M, K, N), regime),
    ]
    training = None
    if train:
        s = summarize(everything)
        peer = trace_bf16_lora_step(model, N, K, M, rank)
        p = summarize(peer)
        training = {
            "M": M, "N": N, "K": K, "nested": nested, "predicted_us": _r(s["total"]),
            "bf16_lora_step_us": _r(p["total"]), "predicted_vs_bf16_lora_step": _r(p["total"] / s["total"]),
            "n_launches": s["n_launches"], "predicted_us_incl_launch": _r(s["total"] + s["overhead"]),
            "bf16_lora_step_us_incl_launch": _r(p["total"] + p["overhead"]),
            "host_syncs": s["host_syncs"], "bound": s["bound"],
            "launches": [{k: d[k] for k in ("label", "predicted_us", "bound", "scope")} for d in everything],
            "bf16_launches": [{k: d[k] for k in ("label", "predicted_us", "bound")} for d in peer],
        }
    return rows, training


_PEER_CACHE: dict = {}


def trace_bf16_lora_step(model: Model, N: int, K: int, M: int, rank: int) -> list[dict]:
    """The bf16 LoRA step peer: ``y = x Wᵀ + s (x Aᵀ) Bᵀ`` forward + backward, plain torch
    (what peft does on a bf16 base), traced and modelled like ours."""
    key = (N, K, M, rank)
    if key not in _PEER_CACHE:
        import torch
        import torch.nn.functional as F

        import perf_model_trace as T

        dt = getattr(torch, ACT_DTYPE)
        W = torch.empty((N, K), dtype=dt)
        x = torch.empty((M, K), dtype=dt, requires_grad=True)
        A = torch.empty((rank, K), dtype=dt, requires_grad=True)
        B = torch.empty((N, rank), dtype=dt, requires_grad=True)
        dy = torch.empty((M, N), dtype=dt)
        with T.trace(OP_NAMESPACES) as tr:
            y = F.linear(x, W)
            if rank:
                y = y + LORA_SCALE * F.linear(F.linear(x, A), B)
            y.backward(dy)
        _PEER_CACHE[key] = [model.launch(la) for la in tr.launches]
    return _PEER_CACHE[key]


def trace_dequant(model: Model, N: int, K: int, nested: bool, notes: list) -> dict:
    import torch

    import kernels
    import perf_model_trace as T

    qt = stand_in_weight(N, K, nested)
    with T.trace(OP_NAMESPACES) as tr:
        kernels.dequantize(qt, getattr(torch, ACT_DTYPE))
    notes += [f"dequant N={N} K={K} nested={nested}: {n}" for n in tr.notes]
    launches = [d for k, d in _modelled(tr, model) if k == "dequant"]
    peer = H.roofline_us(2 * N * K).us  # one read of the bf16 weight
    return make_row("dequant", 0, N, K, nested, launches, _op_bytes(tr, "qlora::dequantize"), peer, "dequant")


# ---- CLI ------------------------------------------------------------------------------------
def _shape(text: str) -> tuple[int, int]:
    try:
        n, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must look like NxK (e.g. 4096x14336), got {text!r}") from None
    if n <= 0 or k <= 0:
        raise argparse.ArgumentTypeError(f"shape dimensions must be positive, got {text!r}")
    return n, k


def _ints(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--M must be comma-separated integers, got {text!r}") from None
    if any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"--M values must be positive, got {text!r}")
    return vals


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the report (JSON) here")
    p.add_argument("--md", help="write the markdown tables here")
    p.add_argument("--shapes", type=lambda s: [_shape(x) for x in s.split(",")],
                   help="comma-separated NxK weight shapes (default: the four of issue 13)")
    p.add_argument("--M", type=_ints, help="comma-separated token counts (default: 1,4,16,4096)")
    p.add_argument("--nested", choices=("both", "yes", "no"), default="both", help="absmax variants")
    p.add_argument("--no-dequant", action="store_true", help="skip the kernels.dequantize rows")
    p.add_argument("--no-train", action="store_true", help="skip the training-step rows")
    p.add_argument("--rank", type=int, default=LORA_RANK,
                   help=f"LoRA rank of the traced qlora_linear (default {LORA_RANK}; 0: no LoRA, i.e. nf4_matmul)")
    p.add_argument("--quick", action="store_true",
                   help=f"one small shape {QUICK_SHAPES[0][0]}x{QUICK_SHAPES[0][1]}, M={QUICK_MS[0]}, nested only "
                        "(what the test runs)")
    p.add_argument("--cache-dir", help="TRITON_CACHE_DIR to use and keep (default: a fresh temporary one)")
    p.add_argument("--compile-check", action="store_true",
                   help="only compile every kernel variant (all dtypes, regimes, odd shapes, dropout, AdamW) for "
                        "sm_90a and print registers / spills / shared memory; exit 1 if any fails")
    return p.parse_args(argv)


def setup() -> str:
    """Check triton, install the sm_90 stand-in driver, retarget the package; return the path
    of the bundled ``cuobjdump``."""
    import torch
    import triton

    if not triton.__version__.startswith(REQUIRED_TRITON):
        raise SystemExit(f"tools/perf_model.py needs triton {REQUIRED_TRITON}.x (the H200's version), found "
                         f"{triton.__version__} at {triton.__file__}; see the set-up at the top of the file")
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        raise SystemExit(f"cuobjdump not found at {cuobjdump} (the triton wheel ships it)")
    import perf_model_trace as T

    T.install_fake_driver()
    sys.path.insert(0, REPO)
    retarget_kernels()
    torch.set_num_threads(1)
    return cuobjdump


def source_revision() -> dict:
    """The git commit the kernels were read at, and whether kernels/, nf4/ or tools/ differ
    from it (then the figures belong to uncommitted code)."""
    import subprocess

    def git(*cmd):
        r = subprocess.run(["git", "-C", REPO, *cmd], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--", "kernels", "nf4", "tools")
    return {"git_commit": commit, "git_dirty": bool(dirty) if dirty is not None else None}


def run(args) -> dict:
    """Trace, model and assemble the report for ``args`` (parse_args)."""
    t0 = time.time()
    if args.rank < 0:
        raise SystemExit(f"--rank must be >= 0, got {args.rank}")
    import torch
    import triton

    cuobjdump = setup()
    shapes = QUICK_SHAPES if args.quick else (args.shapes or SHAPES)
    ms = QUICK_MS if args.quick else (args.M or MS)
    nesteds = {"both": (True, False), "yes": (True,), "no": (False,)}["yes" if args.quick else args.nested]
    model = Model(cuobjdump)
    rows, training, notes = [], [], []
    for N, K in shapes:
        for nested in nesteds:
            for M in ms:
                t = time.time()
                train = M >= TRAIN_MIN_M and not args.no_train and not args.quick
                r, tr = trace_linear(model, N, K, M, nested, train, notes, args.rank)
                rows += r
                if tr:
                    training.append(tr)
                print(f"  N={N} K={K} M={M} nested={nested}: " + ", ".join(
                    f"{x['kernel']} {x['predicted_us']:.2f} us" for x in r) + f" ({time.time() - t:.1f} s)", flush=True)
            if not args.no_dequant:
                rows.append(trace_dequant(model, N, K, nested, notes))
    order = {k: i for i, k in enumerate(R.KERNELS)}
    rows.sort(key=lambda r: (shapes.index((r["N"], r["K"])), order[r["kernel"]], r["M"], not r["nested"]))
    return {
        "target": "sm_90a", "triton": triton.__version__, "torch": torch.__version__,
        "benchmark": "perf_model", "device": "none: predicted for an H200 (sm_90a) from the SASS, not measured",
        "date": datetime.date.today().isoformat(), "tool": "tools/perf_model.py", "source": source_revision(),
        "runtime_s": round(time.time() - t0, 1),
        "constants": {"sms": H.SMS, "schedulers_per_sm": H.SCHEDULERS_PER_SM, "clock_hz": H.CLOCK_HZ,
                      "issue_rate": H.ISSUE_RATE, "hbm_bytes_per_s": H.HBM_BYTES_PER_S,
                      "tensor_flops_bf16": H.TENSOR_FLOPS["bf16"], "lsu_bytes_per_clk": H.LSU_BYTES_PER_CLK,
                      "launch_us": H.LAUNCH_US, "lora_rank": args.rank, "blocksize": BLOCKSIZE,
                      "activation_dtype": ACT_DTYPE},
        "rows": rows, "training": training, "notes": sorted(set(notes)),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # compile for the (stand-in) GPU, never interpret
    fresh = args.cache_dir is None
    cache = tempfile.mkdtemp(prefix="perf_model_triton_") if fresh else args.cache_dir
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the clean-up below on kill / timeout
    os.environ["TRITON_CACHE_DIR"] = cache
    try:
        if args.compile_check:
            from perf_model_compile import compile_check

            return 1 if compile_check(Model(setup())) else 0
        report = run(args)
    finally:
        if fresh:
            shutil.rmtree(cache, ignore_errors=True)
    R.validate(report)
    text = json.dumps(report, indent=1)
    md = R.render_markdown(report)
    for path, content in ((args.json, text), (args.md, md)):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                f.write(content + "\n")
    if not args.md:
        print(md)
    print(f"perf_model: {len(report['rows'])} rows in {report['runtime_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
