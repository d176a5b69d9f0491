"""The GPU suite's timing steps, each a function ``step(ctx)`` that emits one row per point:

    matmul   4-bit matmul: ours vs bitsandbytes (matmul_4bit, gemv_4bit at M=1) vs bf16 cuBLAS
    dequant  dequantize: ours vs bitsandbytes' dequantize_4bit, GB/s and fraction of HBM
    lora     one QLoRA layer forward + backward vs peft + bitsandbytes vs bf16 LoRA
    optim    PagedAdamW 32/8-bit vs torch fused AdamW vs bitsandbytes' paged AdamW, state
             resident on the GPU and paged to the host before each step
    regimes  every matmul regime forced in turn, per shape and M (where the crossovers belong)

Only public entry points are called (``kernels.nf4_matmul``, ``kernels.dequantize``,
``lora.QLoRALinear``, ``optim.PagedAdamW``); which regime ran is read from
``kernels.choose_regime(M)``, never assumed. Providers are timed on the same inputs in one
process, interleaved per point; ``benchmarks.gpu_timing`` says how (CUDA graphs, median + IQR,
operands rotated out of L2). On CPU the same code runs at the sizes the caller passes (the suite's
tests), through kernels' plain-PyTorch path: those times mean nothing.

Shapes are W: [N, K] (out x in features), x: [M, K]. Bytes moved, for % of HBM (4.8 TB/s, NOTES §4):
    4-bit:  qt.nbytes() (packed codes + absmax codes + nested absmax) + 2 (M K + M N)
    bf16:   2 N K + 2 (M K + M N)
    dequantize: qt.nbytes() + 2 N K
"""

from __future__ import annotations

import contextlib
import gc
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .bench_matmul import HBM_BYTES_PER_S, PEAK_BF16_FLOPS
from .gpu_driver import StepContext
from .gpu_timing import copies_for, cycle, time_op

# W: [N, K]. Llama-3-8B q/o (4096x4096), gate/up (14336x4096), down (4096x14336); Llama-3-70B gate/up
MATMUL_SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336), (28672, 8192))
MATMUL_MS = (1, 16, 4096)                 # decode, small batch, training
EAGER_MS = (1,)                           # also timed without a graph: dispatcher cost shows at decode
LORA_M, LORA_R = 4096, 16
OPTIM_SIZES = ((10, 1 << 22), (25, 1 << 22))    # (tensors, elements each): 42M and 105M fp32 params
OPTIM_BYTES_PER_PARAM = 24                # param + grad + 32-bit state (16) with margin: the free-memory check
OPTIM_MAX_FREE_FRACTION = 0.5             # never ask for more than this of the free GPU memory
OPTIM_HP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
REGIME_MS = (1, 16, 64, 256, 1024, 4096)
REGIMES = ("gemv", "gemm", "dequant_gemm")
GEMV_TIMED_MAX_M = 256                    # the split-K GEMV is for small M; larger M would only waste time
CPU_MAX_COPIES = 2                        # on CPU rotation has nothing to defeat; two copies test the path
DTYPE = torch.bfloat16


# ---- helpers -------------------------------------------------------------------------------------
@dataclass
class _Run:
    """What every timing step starts from."""

    dev: torch.device
    backend: contextlib.AbstractContextManager   # CPU: kernels' plain-PyTorch path
    timed: Callable                               # timed(fn, graph=True) -> Timing
    shapes: list                                  # [(N, K)]
    bnb: object = None                            # bitsandbytes, or None when not importable
    bnbf: object = None                           # bitsandbytes.functional


def _start(ctx: StepContext, with_bnb: bool = True) -> _Run:
    import kernels

    dev = torch.device(ctx.device)
    # CPU: kernels' plain-PyTorch path, never the Triton interpreter (a test vehicle, not a runtime)
    backend = contextlib.nullcontext() if dev.type == "cuda" else kernels.force_backend("reference")
    reps = ctx.param("cpu_reps", 5)
    run = _Run(dev, backend, lambda fn, graph=True: time_op(fn, dev, graph=graph, cpu_reps=reps),
               [tuple(s) for s in ctx.param("shapes", MATMUL_SHAPES[:2] if ctx.quick else MATMUL_SHAPES)])
    if with_bnb:
        run.bnb, run.bnbf = _bnb(ctx)
    return run


def _bnb(ctx: StepContext):
    """``(bitsandbytes, bitsandbytes.functional)`` or ``(None, None)`` with a note saying why."""
    if ctx.param("no_bnb", False):
        ctx.note("bitsandbytes disabled for this run: no bnb columns")
        return None, None
    try:
        import bitsandbytes
        import bitsandbytes.functional as bnbf
    except Exception as e:  # noqa: BLE001 - absent or its native library failed to load
        ctx.note(f"bitsandbytes not importable ({type(e).__name__}: {str(e)[:200]}): no bnb columns")
        return None, None
    return bitsandbytes, bnbf


def _ncopies(ctx: StepContext, dev: torch.device, nbytes: int) -> int:
    n = copies_for(nbytes)
    return n if dev.type == "cuda" else min(n, ctx.param("max_copies", CPU_MAX_COPIES))


def _nf4_copies(ctx: StepContext, dev: torch.device, w: torch.Tensor, extra_bytes: int = 0) -> list:
    """NF4 + DQ quantizations of ``w`` (identical), enough to rotate the working set out of L2."""
    import nf4

    first = nf4.quantize(w, "nf4", 64, True)
    n = _ncopies(ctx, dev, first.nbytes() + extra_bytes)
    return [first] + [nf4.quantize(w, "nf4", 64, True) for _ in range(n - 1)]


def _weight(N: int, K: int, dev: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator(device=dev).manual_seed(seed)
    return (torch.randn(N, K, generator=g, device=dev) * 0.02).to(DTYPE)


def bnb_gemv_ok(dev: torch.device, N: int) -> bool:
    """Whether bitsandbytes' ``gemv_4bit`` can be timed on ``dev`` for N output rows: its CPU
    kernel (AVX-512 builds, bitsandbytes 0.50.2) aborts the whole process when N is not a multiple
    of 32 ("Unexpected block size"), so on CPU the row is left out for such N (tiny test shapes)."""
    return dev.type != "cpu" or N % 32 == 0


def regime_of(M: int) -> str:
    """The regime ``kernels`` picks for M rows (read from the library, not assumed)."""
    import kernels

    try:
        return kernels.choose_regime(M)
    except Exception as e:  # noqa: BLE001 - an API change must not sink the benchmark
        return f"unknown ({type(e).__name__})"


def kernel_name(regime: str) -> str:
    """The performance model's kernel name for a forward regime (its rows join on it)."""
    return "gemv" if regime == "gemv" else "gemm_fwd"


def _rates(row: dict, prefix: str, nbytes: float, flops: float | None = None) -> None:
    t = row.get(f"{prefix}_us")
    if not t:
        return
    row[f"{prefix}_GBps"] = nbytes / (t * 1e-6) / 1e9
    row[f"{prefix}_hbm_frac"] = nbytes / (t * 1e-6) / HBM_BYTES_PER_S
    if flops is not None:
        row[f"{prefix}_tflops"] = flops / (t * 1e-6) / 1e12
        row[f"{prefix}_flops_frac"] = flops / (t * 1e-6) / PEAK_BF16_FLOPS


def _speedups(row: dict, ours: str, peers: dict[str, str]) -> None:
    t = row.get(f"{ours}_us")
    for peer, name in peers.items():
        tp = row.get(f"{peer}_us")
        if t and tp:
            row[f"speedup_vs_{name}"] = tp / t


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _free_memory(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# ---- 4-bit matmul ----------------------------------------------------------------------------------
def _fma_matmul(x, qt):
    """``nf4_matmul`` on the float32-FMA M = 1 kernel (shuffle + permute decode) instead of the
    tensor-core one the dispatch picks for bf16: both are timed in one run, so a GPU session
    calibrates the performance model's choice between them."""
    import kernels
    from kernels import gemv

    with gemv.force_decoder("hybrid"):
        return kernels.nf4_matmul(x, qt)


def _mma_matmul(x, qt):
    """``nf4_matmul`` for 2 <= M <= 16 on the warpgroup-MMA kernel (W through shared memory)
    instead of the register-operand one the dispatch picks; timed next to it like ``_fma_matmul``."""
    import kernels
    from kernels import gemv

    with gemv.multi_kind("mma"):
        return kernels.nf4_matmul(x, qt)


def matmul(ctx: StepContext) -> dict:
    """Forward (no grad) and forward + backward (dx) of ``x @ W^T`` per shape and M."""
    import kernels

    run = _start(ctx)
    dev, bnb, bnbf, timed = run.dev, run.bnb, run.bnbf, run.timed
    ms = ctx.param("ms", MATMUL_MS)
    with run.backend:
        for si, (N, K) in enumerate(run.shapes):
            w = _weight(N, K, dev, seed=si)
            qts = _nf4_copies(ctx, dev, w)
            qt0, qbytes = qts[0], qts[0].nbytes()
            bnbs = [bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
                    for _ in range(len(qts))] if bnb else []
            dense = [w] + [w.clone() for _ in range(_ncopies(ctx, dev, 2 * N * K) - 1)]
            w_ref = qt0.dequantize(torch.float32)                        # W as the 4-bit providers see it
            for M in ms:
                g = torch.Generator(device=dev).manual_seed(1000 + M)
                x = torch.randn(M, K, generator=g, device=dev).to(DTYPE)
                regime = regime_of(M)
                act = 2 * (M * K + M * N)
                flops = 2.0 * M * N * K
                row = {"mode": "fwd", "N": N, "K": K, "M": M, "regime": regime, "kernel": kernel_name(regime),
                       "copies_4bit": len(qts), "copies_bf16": len(dense)}
                with torch.no_grad():
                    y_ref = F.linear(x.float(), w_ref)
                    row["ours_rel_err"] = _rel_err(kernels.nf4_matmul(x, qt0), y_ref)
                    provs = {"ours": (lambda a, q: kernels.nf4_matmul(a, q), [(x, q) for q in qts])}
                    if bnb:
                        row["bnb_rel_err"] = _rel_err(bnb.matmul_4bit(x, bnbs[0][0].t(), quant_state=bnbs[0][1]),
                                                      y_ref)
                        provs["bnb"] = (lambda a, s: bnb.matmul_4bit(a, s[0].t(), quant_state=s[1]),
                                        [(x, s) for s in bnbs])
                        if M == 1 and bnb_gemv_ok(dev, N):
                            provs["bnb_gemv"] = (lambda a, s: bnbf.gemv_4bit(a, s[0].t(), state=s[1]),
                                                 [(x, s) for s in bnbs])
                    provs["bf16"] = (lambda a, d: F.linear(a, d), [(x, d) for d in dense])
                    if M == 1 and dev.type == "cuda":  # the other M = 1 kernel, to calibrate the choice
                        provs["ours_fma"] = (_fma_matmul, [(x, q) for q in qts])
                        row["ours_fma_rel_err"] = _rel_err(_fma_matmul(x, qt0), y_ref)
                    if 1 < M <= 16 and dev.type == "cuda":  # the other 2 <= M <= 16 kernel
                        provs["ours_mma"] = (_mma_matmul, [(x, q) for q in qts])
                        row["ours_mma_rel_err"] = _rel_err(_mma_matmul(x, qt0), y_ref)
                    for name in ("bnb", "bnb_gemv", "bf16", "ours_fma", "ours_mma", "ours"):  # interleaved, peers first
                        if name in provs:
                            fn, sets = provs[name]
                            row.update(timed(cycle(fn, sets)).fields(name))
                            if M in EAGER_MS and dev.type == "cuda" and name != "bnb_gemv":
                                row.update(timed(cycle(fn, sets), graph=False).fields(f"{name}_eager"))
                for name in ("ours", "ours_fma", "ours_mma", "bnb", "bnb_gemv"):
                    _rates(row, name, qbytes + act, flops)
                _rates(row, "bf16", 2 * N * K + act, flops)
                _speedups(row, "ours", {"bf16": "bf16", "bnb": "bnb"})
                ctx.emit(row)
                print(f"[matmul] fwd {N}x{K} M={M} {regime}: ours {row['ours_us']:.1f} us, "
                      f"bf16 {row['bf16_us']:.1f} us" + (f", bnb {row['bnb_us']:.1f} us" if bnb else ""), flush=True)
                ctx.emit(_fwd_bwd_row(ctx, timed, x, qts, bnbs, dense, bnb, row, qbytes, act, flops))
                del x
            del qts, bnbs, dense, w_ref, w
            _free_memory(dev)
    return {}


def _fwd_bwd_row(ctx, timed, x, qts, bnbs, dense, bnb, fwd_row, qbytes, act, flops) -> dict:
    """Forward + backward to x (W frozen) in one graph; dx = (fwd + bwd) - fwd, both graph-timed."""
    import kernels

    N, K, M = fwd_row["N"], fwd_row["K"], fwd_row["M"]
    g = torch.Generator(device=x.device).manual_seed(2000 + M)
    dy = torch.randn(M, N, generator=g, device=x.device).to(DTYPE)
    xg = x.detach().requires_grad_(True)

    def fb(base):
        return lambda op: torch.autograd.grad(base(xg, op), xg, dy)[0]

    row = {"mode": "fwd+bwd", "N": N, "K": K, "M": M, "regime": fwd_row["regime"], "kernel": "gemm_dx"}
    provs = {"ours": (fb(lambda a, q: kernels.nf4_matmul(a, q)), [(q,) for q in qts])}
    if bnb:
        provs["bnb"] = (fb(lambda a, s: bnb.matmul_4bit(a, s[0].t(), quant_state=s[1])), [(s,) for s in bnbs])
    provs["bf16"] = (fb(lambda a, d: F.linear(a, d)), [(d,) for d in dense])
    for name in ("bnb", "bf16", "ours"):
        if name in provs:
            fn, sets = provs[name]
            row.update(timed(cycle(fn, sets)).fields(name))
    if row.get("ours_us") and fwd_row.get("ours_us"):
        row["ours_dx_us"] = row["ours_us"] - fwd_row["ours_us"]       # derived: the dx kernel alone
        row["ours_dx_timer"] = f"{row['ours_timer']} (fwd+bwd) - {fwd_row['ours_timer']} (fwd)"
        if row["ours_dx_us"] > 0:
            _rates(row, "ours_dx", qbytes + act)
    _rates(row, "ours", 2 * qbytes + 2 * act, 2 * flops)
    _speedups(row, "ours", {"bf16": "bf16", "bnb": "bnb"})
    return row


# ---- dequantize ------------------------------------------------------------------------------------
def dequant(ctx: StepContext) -> dict:
    """``kernels.dequantize(qt, bf16)`` vs ``bitsandbytes.functional.dequantize_4bit`` per shape."""
    import kernels
    import nf4

    run = _start(ctx)
    dev, bnb, bnbf, timed = run.dev, run.bnb, run.bnbf, run.timed
    inexact = []
    with run.backend:
        for si, (N, K) in enumerate(run.shapes):
            w = _weight(N, K, dev, seed=si)
            qts = _nf4_copies(ctx, dev, w, extra_bytes=2 * N * K)     # reads the codes, writes bf16
            qt0 = qts[0]
            nbytes = qt0.nbytes() + 2 * N * K
            ref = nf4.dequantize(qt0, DTYPE)
            row = {"N": N, "K": K, "kernel": "dequant", "copies": len(qts),
                   "ours_exact": bool(torch.equal(kernels.dequantize(qt0, DTYPE), ref))}
            if bnb:
                bnbs = [bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
                        for _ in range(len(qts))]
                row["bnb_matches_nf4"] = bool(torch.equal(bnbf.dequantize_4bit(*bnbs[0]), ref))
                row.update(timed(cycle(lambda s: bnbf.dequantize_4bit(s[0], s[1]), [(s,) for s in bnbs])).fields("bnb"))
                del bnbs
            row.update(timed(cycle(lambda q: kernels.dequantize(q, DTYPE), [(q,) for q in qts])).fields("ours"))
            for name in ("bnb", "ours"):
                _rates(row, name, nbytes)
            _speedups(row, "ours", {"bnb": "bnb"})
            ctx.emit(row)
            if not row["ours_exact"]:
                inexact.append(f"{N}x{K}")
            print(f"[dequant] {N}x{K}: ours {row['ours_us']:.1f} us ({100 * row['ours_hbm_frac']:.0f}% HBM)", flush=True)
            del qts, ref, w
            _free_memory(dev)
    if inexact:
        return {"status": "failed", "note": f"kernels.dequantize differs from nf4.dequantize at {inexact}"}
    return {}


# ---- one LoRA layer --------------------------------------------------------------------------------
def lora(ctx: StepContext) -> dict:
    """``y = layer(x); y.backward(dy)`` at M tokens, rank r: QLoRA vs peft+bnb vs bf16 LoRA."""
    import lora as lora_lib

    from .bench_lora import _peft_bnb_available, build

    run = _start(ctx, with_bnb=False)
    dev, timed = run.dev, run.timed
    M, r = ctx.param("M", LORA_M), ctx.param("r", LORA_R)
    providers = ["peft_bnb", "lora16", "qlora"]
    if ctx.param("no_bnb", False) or not _peft_bnb_available():
        providers.remove("peft_bnb")
        ctx.note("peft + bitsandbytes not importable: no peft+bnb column")
    with run.backend:
        for si, (N, K) in enumerate(run.shapes):
            g = torch.Generator(device=dev).manual_seed(si)
            weight = (torch.randn(N, K, generator=g, device=dev) / math.sqrt(K)).cpu()  # build() takes CPU fp32
            x = torch.randn(M, K, generator=g, device=dev).to(DTYPE).requires_grad_(True)
            dy = torch.randn(M, N, generator=g, device=dev).to(DTYPE)
            row = {"N": N, "K": K, "M": M, "r": r, "dtype": str(DTYPE).removeprefix("torch.")}
            for p in providers:
                layer = build(p, weight, r, DTYPE, dev)

                def step(layer=layer):
                    x.grad = None
                    for prm in layer.parameters():
                        prm.grad = None
                    layer(x).backward(dy)

                row.update(timed(step, graph=False).fields(p))
                step()                                  # grads allocated, as in training
                with lora_lib.PeakMemory(dev) as pm:
                    step()
                row[f"{p}_peak_bytes"] = pm.peak_delta
                del layer, step
                _free_memory(dev)
            _speedups(row, "qlora", {"peft_bnb": "peft_bnb", "lora16": "lora16"})
            ctx.emit(row)
            print(f"[lora] {N}x{K} M={M} r={r}: " + ", ".join(f"{p} {row[f'{p}_us']:.0f} us" for p in providers),
                  flush=True)
            del weight, x, dy
            _free_memory(dev)
    return {}


# ---- optimizer ---------------------------------------------------------------------------------------
def _state_bytes(opt) -> int:
    if hasattr(opt, "state_bytes"):
        return int(opt.state_bytes()["total"])
    return sum(v.numel() * v.element_size() for st in opt.state.values() for k, v in st.items()
               if torch.is_tensor(v) and v.dim() > 0)


def _bnb_to_host(opt) -> None:
    """bitsandbytes: prefetch this optimizer's paged state buffers to the host."""
    import bitsandbytes.functional as bnbf

    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v) and getattr(v, "is_paged", False):
                bnbf.prefetch_tensor(v, to_cpu=True)


def _optim_providers(dev: torch.device, bnb) -> list[tuple]:
    """(name, make(params), to_host(opt) or None)."""
    import optim

    fused = None if dev.type == "cuda" else False        # CPU: the reference, never the interpreter
    out = [
        ("torch AdamW fused", lambda ps: torch.optim.AdamW(ps, fused=True, **OPTIM_HP), None),
        ("PagedAdamW 32-bit", lambda ps: optim.PagedAdamW(ps, paged=True, state_bits=32, fused=fused, **OPTIM_HP),
         lambda o: o.page_out()),
        ("PagedAdamW 8-bit", lambda ps: optim.PagedAdamW(ps, paged=True, state_bits=8, fused=fused, **OPTIM_HP),
         lambda o: o.page_out()),
    ]
    if bnb is not None:
        out += [("bnb PagedAdamW", lambda ps: bnb.optim.PagedAdamW(ps, **OPTIM_HP), _bnb_to_host),
                ("bnb PagedAdamW8bit", lambda ps: bnb.optim.PagedAdamW8bit(ps, **OPTIM_HP), _bnb_to_host)]
    return out


def optim_step(ctx: StepContext) -> dict:
    """Step time per optimizer and size: state resident, and state paged to the host first."""
    run = _start(ctx)
    dev, bnb, timed = run.dev, run.bnb, run.timed
    sizes = ctx.param("sizes", OPTIM_SIZES[:1] if ctx.quick else OPTIM_SIZES)
    for n_tensors, numel in sizes:
        n_params = n_tensors * numel
        if dev.type == "cuda":  # never oversubscribe (managed memory can hang the GPU): NOTES §5
            free, _total = torch.cuda.mem_get_info(dev)
            if OPTIM_BYTES_PER_PARAM * n_params > OPTIM_MAX_FREE_FRACTION * free:
                ctx.note(f"{n_params:,} params skipped: needs {OPTIM_BYTES_PER_PARAM * n_params:,} B, "
                         f"more than {OPTIM_MAX_FREE_FRACTION:.0%} of the {free:,} B free")
                continue
        g = torch.Generator(device=dev).manual_seed(n_params)
        params = [torch.nn.Parameter(torch.randn(numel, generator=g, device=dev)) for _ in range(n_tensors)]
        for p in params:
            p.grad = torch.randn(numel, generator=g, device=dev) * 1e-3
        base_us = None
        for name, make, to_host in _optim_providers(dev, bnb):
            row = {"params": n_params, "tensors": n_tensors, "provider": name}
            opt = None
            try:
                opt = make(params)
                opt.step()                                   # creates the state
                row["state_bytes"] = _state_bytes(opt)
                row.update(timed(opt.step, graph=False).fields("step"))
                if to_host is not None:
                    def host_step(opt=opt):
                        to_host(opt)
                        opt.step()
                    row.update(timed(host_step, graph=False).fields("host_step"))
            except Exception as e:  # noqa: BLE001 - one failing provider must not sink the others
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            finally:
                del opt
                _free_memory(dev)
            if name == "torch AdamW fused":
                base_us = row.get("step_us")
            if base_us and row.get("step_us"):
                row["speedup_vs_torch_fused"] = base_us / row["step_us"]
            ctx.emit(row)
            print(f"[optim] {n_params:,} params {name}: " + (f"{row['step_us']:.0f} us" if "step_us" in row
                                                             else row.get("error", "")), flush=True)
        del params
        _free_memory(dev)
    return {}


# ---- regimes -------------------------------------------------------------------------------------
def regimes(ctx: StepContext) -> dict:
    """``nf4_matmul`` with each regime forced, per shape and M: where the crossovers belong."""
    import kernels

    run = _start(ctx, with_bnb=False)
    dev, timed = run.dev, run.timed
    ms = ctx.param("ms", REGIME_MS)
    with run.backend:
        for si, (N, K) in enumerate(run.shapes):
            w = _weight(N, K, dev, seed=si)
            qts = _nf4_copies(ctx, dev, w)
            for M in ms:
                x = torch.randn(M, K, device=dev).to(DTYPE)
                row = {"N": N, "K": K, "M": M, "auto_regime": regime_of(M)}
                with torch.no_grad():
                    for regime in REGIMES:
                        if regime == "gemv" and M > GEMV_TIMED_MAX_M:
                            continue
                        with kernels.force_regime(regime):
                            row.update(timed(cycle(lambda a, q: kernels.nf4_matmul(a, q),
                                                   [(x, q) for q in qts])).fields(regime))
                timed_regimes = {k: row[f"{k}_us"] for k in REGIMES if f"{k}_us" in row}
                row["fastest"] = min(timed_regimes, key=timed_regimes.get)
                if row["auto_regime"] in timed_regimes:
                    row["auto_over_fastest"] = timed_regimes[row["auto_regime"]] / timed_regimes[row["fastest"]]
                ctx.emit(row)
            del qts, w
            _free_memory(dev)
    return {}
