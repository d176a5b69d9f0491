"""Compile every kernel variant for sm_90 with triton 3.6 (no GPU needed): catches GPU-only compile errors.

The GPU machine runs triton 3.6 while this repo is developed under the 3.9 interpreter, so a
kernel can pass every CPU test and still fail to compile (or exceed the H200's 232,448 bytes of
shared memory per block) on the device. This script swaps in a stand-in driver that reports an
sm_90 target, sends the real launchers through triton's compiler and prints each kernel's
shared-memory size. Run it in a separate environment that has triton==3.6.0 and a CPU torch:

    python -m venv /tmp/v36 && /tmp/v36/bin/pip install torch==2.13.0 triton==3.6.0 numpy scipy safetensors
    /tmp/v36/bin/python tools/sm90_compile_check.py all

It is a development check, not part of the test suite (it patches triton internals).
"""
import os, sys, itertools, traceback, time
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_CACHE_DIR", "/tmp/sm90_compile_cache")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

class FakeDriver:
    def get_current_target(self): return GPUTarget("cuda", 90, 32)
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 0
    def __getattr__(self, k): raise AttributeError(f"FakeDriver.{k}")
driver.set_active(FakeDriver())

_orig_run = JITFunction.run
COMPILED = []
def run(self, *args, grid, warmup, **kwargs):
    k = _orig_run(self, *args, grid=grid, warmup=True, **kwargs)
    md = k.metadata
    COMPILED.append((self.__name__, md.shared, getattr(md, "num_warps", None), None))
    keys = ("BLOCK_M","BLOCK_P","BLOCK_R","SPLIT","USE_DOT","QUANTIZED","NESTED","PAIRED","ROW_BLOCKS","HAS_LORA","BLOCK_RANK","HAS_DROPOUT","DOT_DTYPE","IEEE","num_stages","num_warps")
    flag = "  <-- OVER 232448" if md.shared > 232448 else ""
    print("   ", self.__name__, "shared", md.shared, {k: str(kwargs[k]) for k in keys if k in kwargs}, flag, flush=True)
    return k
JITFunction.run = run

import kernels, nf4
import importlib; from kernels import matmul, gemm, gemv, dequant, qlora; kdrop = importlib.import_module("kernels.dropout")
from kernels._launch import MatmulProblem
print("triton", triton.__version__, "interpreting:", kernels.dispatch.interpreting())
for mod in (matmul, dequant, kdrop):
    mod.use_triton = lambda t: t.dtype != torch.float64
cuda = torch.device("cuda")
_gc, _vc = gemm.gemm_config, gemv.gemv_config
gemm.gemm_config = lambda M, P, R, d: _gc(M, P, R, cuda)
gemv.gemv_config = lambda M, P, R, d: _vc(M, P, R, cuda)

fails = []
def attempt(name, fn):
    t0 = time.time()
    n0 = len(COMPILED)
    try:
        fn()
        print(f"OK   {name}  ({time.time()-t0:.1f}s, {len(COMPILED)-n0} launches)", flush=True)
    except Exception as e:
        fails.append(name)
        print(f"FAIL {name}: {type(e).__name__}: {str(e)[:3000]}", flush=True)
        traceback.print_exc(limit=3)

which = sys.argv[1] if len(sys.argv) > 1 else "all"
if which in ("all", "dequant"):
    for nested, dt in itertools.product([True, False], [torch.bfloat16, torch.float16, torch.float32]):
        qt = nf4.quantize(torch.randn(64, 96), "nf4", 64, nested)
        attempt(f"dequant nested={nested} {dt}", lambda: kernels.dequantize(qt, dt))
    for dt in [torch.bfloat16, torch.float32]:
        attempt(f"dropout {dt}", lambda: kernels.dropout(torch.randn(8, 40).to(dt), 0.3, 5))
    attempt("dropout fp16 seed tensor", lambda: kernels.dropout(torch.randn(8, 40).half(), 0.3, torch.tensor(5)))

if which in ("all", "adamw"):
    from kernels import adamw as AW
    sc = AW.adamw_scalars(3, 1e-3, (0.9, 0.999), 1e-8, 0.01)
    for pd, gd, eight, k in itertools.product([torch.float32, torch.bfloat16], [torch.float32, torch.bfloat16], [False, True], [1, 3]):
        ps = [torch.randn(n).to(pd) for n in (300, 4096 + 17, 1000)[:k]]
        gs = [torch.randn(p.numel()).to(gd) for p in ps]
        if eight:
            ms = [torch.zeros(p.numel(), dtype=torch.uint8) for p in ps]; vs = [torch.zeros_like(m) for m in ms]
            mas = [torch.ones(-(-p.numel() // 256)) for p in ps]; vas = [torch.ones_like(a) for a in mas]
        else:
            ms = [torch.zeros(p.numel()) for p in ps]; vs = [torch.zeros_like(m) for m in ms]; mas = vas = None
        attempt(f"adamw p={pd} g={gd} 8bit={eight} k={k}", lambda: AW._launch(ps, gs, ms, vs, mas, vas, sc))

def case(M, N, K, r, bias, p, nested, dt, regime, bs=64):
    qt = nf4.quantize(torch.randn(N, K), "nf4", bs, nested)
    x = torch.randn(M, K).to(dt).requires_grad_()
    A = torch.randn(r, K).to(dt).requires_grad_() if r else None
    B = torch.randn(N, r).to(dt).requires_grad_() if r else None
    b = torch.randn(N).to(dt) if bias else None
    with kernels.force_regime(regime):
        y = kernels.qlora_linear(x, qt, A, B, 0.5, b, p, seed=3)
        y.backward(torch.randn_like(y))

if which in ("all", "mm"):
    combos = []
    for dt in [torch.bfloat16, torch.float16, torch.float32]:
        for regime, M in [("gemv", 1), ("gemv", 4), ("gemv", 16), ("gemv", 64), ("gemm", 130), ("gemm", 64), ("dequant_gemm", 256)]:
            combos.append((M, 256, 512, 16, True, 0.1, True, dt, regime))
    # odd K / non-ROW_BLOCKS / no lora / rank 64 / non-nested
    combos += [(1, 100, 73, 0, False, 0.0, False, torch.bfloat16, "gemv"),
               (8, 100, 66, 64, True, 0.0, False, torch.bfloat16, "gemv"),
               (130, 100, 73, 1, False, 0.0, True, torch.bfloat16, "gemm"),
               (130, 100, 96, 64, False, 0.2, False, torch.bfloat16, "gemm"),
               (2, 100, 128, 8, True, 0.0, True, torch.float16, "gemv"),
               (16, 100, 66, 16, True, 0.25, True, torch.bfloat16, "gemv"),
               (130, 100, 73, 8, True, 0.25, True, torch.float32, "gemm"),
               (64, 100, 73, 8, True, 0.25, True, torch.float32, "gemm"),
               (64, 100, 73, 8, True, 0.25, True, torch.float16, "gemm"),
               (3, 70, 100, 64, True, 0.25, True, torch.float32, "dequant_gemm"),
               (3, 70, 100, 64, True, 0.25, True, torch.bfloat16, "dequant_gemm"),
               (1, 70, 100, 64, True, 0.25, True, torch.float32, "gemm"),
               (1300, 256, 512, 16, True, 0.1, True, torch.bfloat16, "auto")]
    sel = sys.argv[2:] 
    for i, c in enumerate(combos):
        if sel and str(i) not in sel: continue
        attempt(f"mm[{i}] M={c[0]} N={c[1]} K={c[2]} r={c[3]} bias={c[4]} p={c[5]} nested={c[6]} {c[7]} {c[8]}", lambda: case(*c))

for c in COMPILED: pass
print("kernels compiled (name, shared bytes, warps):", sorted(set(COMPILED)))
print("FAILS:", fails)
