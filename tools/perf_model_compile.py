"""``tools/perf_model.py --compile-check``: every kernel variant compiles for the H200.

The H200 runs triton 3.6 while the repository is developed under the 3.9 interpreter, so a
kernel can pass every CPU test and still fail to compile for sm_90a, or need more than the
227 KB of shared memory a block may have. This sweep calls the public ops (every activation
dtype, every matmul regime, odd shapes, LoRA / bias / dropout variants, the fused AdamW) on
stand-in tensors through ``perf_model_trace`` (compile only, nothing runs) and prints each
launch's registers, spills and shared memory.
"""

from __future__ import annotations

import time

from perf_model import OP_NAMESPACES, Model, cdiv, stand_in_weight

__all__ = ["compile_cases", "compile_check"]


def compile_cases():
    """``[(name, thunk)]``: each thunk calls public ops with stand-in tensors so that one family
    of kernel variants compiles (dtypes, regimes, odd shapes, LoRA / bias / dropout, AdamW)."""
    import itertools

    import torch

    import kernels
    from kernels.adamw import adamw_update

    e = torch.empty
    cases = []
    for nested, dt in itertools.product((True, False), (torch.bfloat16, torch.float16, torch.float32)):
        cases.append((f"dequant nested={nested} {dt}",
                      lambda n=nested, d=dt: kernels.dequantize(stand_in_weight(64, 96, n), d)))
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        cases.append((f"dropout {dt}", lambda d=dt: kernels.dropout(e(8, 40, dtype=d), 0.3, 5)))
    cases.append(("dropout seed tensor", lambda: kernels.dropout(e(8, 40, dtype=torch.float16), 0.3, torch.tensor(5))))
    for pd, gd, eight, k in itertools.product((torch.float32, torch.bfloat16), (torch.float32, torch.bfloat16),
                                              (False, True), (1, 3)):
        def adamw(pd=pd, gd=gd, eight=eight, k=k):
            ps = [e(n, dtype=pd) for n in (300, 4096 + 17, 1000)[:k]]
            gs = [e(p.numel(), dtype=gd) for p in ps]
            sdt = torch.uint8 if eight else torch.float32
            ms = [e(p.numel(), dtype=sdt) for p in ps]
            vs = [e(p.numel(), dtype=sdt) for p in ps]
            ab = ([e(cdiv(p.numel(), 256)) for p in ps], [e(cdiv(p.numel(), 256)) for p in ps]) if eight else (None, None)
            adamw_update(ps, gs, ms, vs, step=3, lr=1e-3, weight_decay=0.01, exp_avg_absmax=ab[0],
                         exp_avg_sq_absmax=ab[1], check=False)
        cases.append((f"adamw p={pd} g={gd} 8bit={eight} tensors={k}", adamw))

    def linear(M, N, K, r, bias, p, nested, dt, regime):
        qt = stand_in_weight(N, K, nested)
        x = e(M, K, dtype=dt, requires_grad=True)
        A = e(r, K, dtype=dt, requires_grad=True) if r else None
        B = e(N, r, dtype=dt, requires_grad=True) if r else None
        with kernels.force_regime(regime):
            y = kernels.qlora_linear(x, qt, A, B, 0.5, e(N, dtype=dt) if bias else None, p, seed=3)
            y.backward(e(M, N, dtype=dt))

    combos = [(M, 256, 512, 16, True, 0.1, True, dt, regime)
              for dt in (torch.bfloat16, torch.float16, torch.float32)
              for regime, M in (("gemv", 1), ("gemv", 4), ("gemv", 16), ("gemv", 64), ("gemm", 130), ("gemm", 64),
                                ("dequant_gemm", 256))]
    combos += [(1, 100, 73, 0, False, 0.0, False, torch.bfloat16, "gemv"),  # odd K, no LoRA, plain absmax
               (8, 100, 66, 64, True, 0.0, False, torch.bfloat16, "gemv"),
               (130, 100, 73, 1, False, 0.0, True, torch.bfloat16, "gemm"),
               (130, 100, 96, 64, False, 0.2, False, torch.bfloat16, "gemm"),
               (2, 100, 128, 8, True, 0.0, True, torch.float16, "gemv"),
               (16, 100, 66, 16, True, 0.25, True, torch.bfloat16, "gemv"),
               (130, 100, 73, 8, True, 0.25, True, torch.float32, "gemm"),
               (64, 100, 73, 8, True, 0.25, True, torch.float16, "gemm"),
               (3, 70, 100, 64, True, 0.25, True, torch.float32, "dequant_gemm"),
               (3, 70, 100, 64, True, 0.25, True, torch.bfloat16, "dequant_gemm"),
               (1, 70, 100, 64, True, 0.25, True, torch.float32, "gemm"),
               (1300, 256, 512, 16, True, 0.1, True, torch.bfloat16, "auto")]
    combos += [(1, 256, 512, 0, False, 0.0, False, torch.bfloat16, "gemv"),  # streaming GEMVs, plain absmax
               (5, 256, 512, 0, True, 0.0, False, torch.float16, "gemv")]
    for c in combos:
        cases.append((f"qlora_linear M={c[0]} N={c[1]} K={c[2]} r={c[3]} bias={c[4]} p={c[5]} nested={c[6]} "
                      f"{c[7]} {c[8]}", lambda c=c: linear(*c)))
    from kernels import _decode, gemv

    from kernels import gemv_tc

    for dec in ("lds", "prmt", "table"):  # the 2 <= M <= 16 register-operand GEMV (SUB = 16 at K = 2048)
        for dt in (torch.bfloat16, torch.float16):
            for nested in (True, False):
                def forced_m(dec=dec, dt=dt, nested=nested):
                    with gemv.force_decoder(dec):
                        linear(16, 256, 2048, 16, True, 0.0, nested, dt, "gemv")
                cases.append((f"gemv M=16 K=2048 decoder={dec} {dt} nested={nested}", forced_m))

    for r in (8, 128, 256):  # K = 256 (SUB = 2): the table with a small rank, byte permutes with a large one
        cases.append((f"gemv M=4 K=256 r={r}", lambda r=r: linear(4, 256, 256, r, True, 0.0, True, torch.bfloat16,
                                                                   "gemv")))

    def mma_kernel():
        with gemv.multi_kind("mma"):
            linear(16, 256, 512, 16, True, 0.0, True, torch.bfloat16, "gemv")
    cases.append(("gemv M=16 warpgroup-MMA kernel", mma_kernel))
    for dec in ("shfl", "mixed", "table", "hybrid", "lds"):  # every M = 1 decoder, forced
        for dt in (torch.bfloat16, torch.float16):
            def forced(dec=dec, dt=dt):
                with gemv.force_decoder(dec):
                    linear(1, 256, 512, 16, True, 0.0, True, dt, "gemv")
            cases.append((f"gemv M=1 decoder={dec} {dt}", forced))
    for dec in gemv_tc.DECODERS:  # the tc kernel's decode, as its GPU self-check runs it
        for dt in (torch.bfloat16, torch.float16):
            cases.append((f"tc decode probe {dec} {dt}", lambda dec=dec, dt=dt: gemv_tc.probe(
                torch.device("cpu"), e(16), e(1024, dtype=torch.int32), dec, dt)))
    for dec, dt in (("shfl", None), ("mixed", None), ("prmt_f32", None), ("table", None),
                    ("prmt", torch.bfloat16), ("prmt", torch.float16)):  # the GPU self-check's probe
        cases.append((f"decoder probe {dec} {dt}", lambda dec=dec, dt=dt: _decode.probe(
            torch.device("cpu"), e(16), e(256, dtype=torch.int32), e(256), dec, dt)))
    return cases


LAUNCH_DEFAULT_SMEM = 48 * 1024


def compile_check(model: Model) -> int:
    """Compile every case of ``compile_cases`` for sm_90a; print each Triton launch's registers,
    spills and shared memory; return the number of failing cases."""
    import traceback

    import perf_model_trace as T

    failures = 0
    for name, thunk in compile_cases():
        t = time.time()
        try:
            with T.trace(OP_NAMESPACES) as tr:
                thunk()
            for la in tr.launches:
                if hasattr(la, "cubin"):
                    st = model.sass(la.cubin)
                    print(f"    {la.name}: regs {st.regs}, spills {st.spills} B, shared {la.shared} B, "
                          f"static shared {st.static_smem} B, warps {la.num_warps}, stages {la.num_stages}",
                          flush=True)
                    if la.shared <= LAUNCH_DEFAULT_SMEM < la.shared + st.static_smem:
                        # Triton raises a block's shared-memory limit above 48 KB only for its own
                        # (dynamic) part; static shared memory (kernels._lut's table) must fit with it
                        raise RuntimeError(f"{la.name}: {la.shared} B dynamic + {st.static_smem} B static shared "
                                           f"memory exceeds the {LAUNCH_DEFAULT_SMEM} B a launch gets by default")
            print(f"OK   {name} ({time.time() - t:.1f} s)", flush=True)
        except Exception as exc:  # noqa: BLE001 - report every failing variant, then fail
            failures += 1
            print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
            traceback.print_exc(limit=4)
    print(f"compile check: {failures} failing case(s)", flush=True)
    return failures
