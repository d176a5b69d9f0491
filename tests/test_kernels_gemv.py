"""The streaming GEMVs of the decode regime (``kernels.gemv``): which problems they take, and
forward + every gradient against the reference within the derived bound (``run_case``).

In the interpreter the kernels decode with the plain 'table' decoder (the asm decoders are proven
in tests/test_kernels_decode.py and on a GPU by benchmarks.gpu_checks); the tiles are small, so
these shapes cross row tails, several k-slices (M = 1) and several K splits (M >= 2), which
exercises the in-launch split-K reduction and its counters.
"""

import pytest
import torch

import kernels
import nf4
from kernels import gemv
from test_kernels_matmul import run_case

# (M, N, K, r, bias, p, blocksize, nested, quant_type, three_d, noncontig, dtype)
CASES = [
    (1, 40, 256, 8, True, 0.25, 64, True, "nf4", False, False, torch.bfloat16),   # 2 k-slices, LoRA + dropout
    (1, 17, 64, 0, False, 0.0, 64, False, "fp4", True, True, torch.float16),    # one slice, strided x
    (1, 33, 384, 16, True, 0.0, 128, True, "nf4", False, True, torch.float32),  # fp32: exact levels
    (1, 9, 512, 4, False, 0.0, 256, False, "nf4", True, False, torch.bfloat16),  # 4 slices, blocksize 256
    (2, 40, 256, 8, True, 0.0, 64, True, "nf4", False, False, torch.bfloat16),   # 2 K splits
    (5, 33, 128, 0, False, 0.0, 128, False, "fp4", True, True, torch.float16),
    (16, 20, 192, 16, True, 0.25, 64, True, "nf4", False, False, torch.float16),  # 3 K steps, 2 splits
    (7, 48, 64, 64, True, 0.0, 64, False, "fp4", True, False, torch.bfloat16),    # K = one step
]


def _id(c):
    return "M{}-{}x{}-r{}-bs{}-{}{}-{}".format(c[0], c[1], c[2], c[3], c[6], c[8], "dq" if c[7] else "",
                                               str(c[11]).split(".")[1])


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_streaming_gemv_forward_and_gradients_match_reference(device, case, monkeypatch):
    launched = []
    real = gemv.gemv_launch
    monkeypatch.setattr(kernels.matmul, "gemv_launch", lambda *a, **k: launched.append(1) or real(*a, **k))
    run_case(device, *case, regime="auto")
    assert launched, "the decode regime did not take an aligned problem"


MULTI = [c for c in CASES if c[0] > 1]


@pytest.mark.parametrize("case", MULTI, ids=[_id(c) for c in MULTI])
def test_the_warpgroup_mma_kernel_still_matches_the_reference(device, case):
    """2 <= M <= 16 runs the register-operand kernel ('tcm'); the GPU suite times the warpgroup-MMA
    one ('mma') next to it, so it stays proven too."""
    with gemv.multi_kind("mma"):
        run_case(device, *case, regime="auto")


@pytest.mark.parametrize("nested", [True, False])
def test_tcm_word_split_scaling_and_rejoin_keep_every_weight_in_place(device, nested, monkeypatch):
    """The GPU's 'lds' decoder of the 2 <= M <= 16 register-operand GEMV splits each thread's
    4-word groups 3:1 between the shared pair table and the byte permutes, scales each by its own
    block's absmax and joins them back; 'lds_table' runs that split, scaling and re-join with the
    plain decoder. The shapes cross a partial last sub-slice (K % 256 = 64), two row groups, more
    than 256 blocks (a second nested scale), blocksizes 128 and 256, LoRA and bias."""
    if not kernels.dispatch.use_triton(torch.zeros(1, device=device)):
        pytest.skip("reference backend")
    seen = []
    monkeypatch.setattr(gemv, "_gemv_tcm_kernel", _Spy(gemv._gemv_tcm_kernel, seen))
    with gemv.force_decoder("lds_table"):
        run_case(device, 3, 40, 320, 8, True, 0.0, 64, nested, "nf4", False, False, torch.bfloat16, regime="auto")
        run_case(device, 16, 200, 256, 0, False, 0.0, 64, nested, "nf4", False, True, torch.float16, regime="auto")
        run_case(device, 4, 33, 512, 4, True, 0.0, 256, nested, "fp4", True, False, torch.bfloat16, regime="auto")
        run_case(device, 2, 24, 384, 0, False, 0.0, 128, nested, "nf4", False, False, torch.float16, regime="auto")
    assert seen and set(seen) == {"lds_table"}


@pytest.mark.parametrize("sub", [1, 3])
def test_tcm_sub_slices_per_program(device, sub, monkeypatch):
    """A program owns SUB sub-slices of 128 codes (16 on a GPU, 2 in the interpreter): 1 and 3 give
    the same result within the bound, with 1, 2 or several programs per row group."""
    if not kernels.dispatch.use_triton(torch.zeros(1, device=device)):
        pytest.skip("reference backend")
    monkeypatch.setattr(gemv, "TCM_SUB_CPU", sub)
    gemv._plan.cache_clear()
    try:
        assert gemv._plan(5, 40, 448, 64, True, torch.bfloat16, torch.bfloat16, 0, False, False, False, None,
                          "tcm")[3]["SUB"] == sub
        run_case(device, 5, 40, 448, 4, True, 0.0, 64, True, "nf4", False, False, torch.bfloat16, regime="auto")
    finally:
        gemv._plan.cache_clear()


def test_tcm_shared_memory_rule(monkeypatch):
    """With the pair table (32 KB of static shared memory) x's SUB operands must fit the rest of
    48 KB or exceed 48 KB (then the launch lifts the limit): SUB 4-12 is refused, K of 4-12
    sub-slices decodes by byte permutes instead (one slice, no table)."""
    plan = gemv._plan
    gemv._plan.cache_clear()
    try:
        for k, sub, dec in ((4096, 16, "lds"), (1024, 8, "prmt"), (384, 3, "lds"), (2048, 16, "lds")):
            meta = plan(16, 4096, k, 64, True, torch.bfloat16, torch.bfloat16, 0, False, False, True, None, "tcm")[3]
            assert (meta["SUB"], meta["DECODE"]) == (sub, dec), k
        # a large LoRA rank's epilogue dot needs shared memory too: at SUB <= 3 the table no longer fits
        meta = plan(16, 4096, 256, 64, True, torch.bfloat16, torch.bfloat16, 128, True, False, True, None, "tcm")[3]
        assert (meta["SUB"], meta["DECODE"]) == (2, "prmt")
        meta = plan(16, 4096, 256, 64, True, torch.bfloat16, torch.bfloat16, 8, True, False, True, None, "tcm")[3]
        assert (meta["SUB"], meta["DECODE"]) == (2, "lds")
        monkeypatch.setattr(gemv, "TCM_SUB", 8)
        gemv._plan.cache_clear()
        meta = plan(16, 4096, 4096, 64, True, torch.bfloat16, torch.bfloat16, 0, False, False, True, None, "tcm")[3]
        assert (meta["SUB"], meta["DECODE"]) == (8, "prmt")
        with pytest.raises(ValueError, match="SUB <= 3 or >= 13"):  # the table forced
            plan(16, 4096, 4096, 64, True, torch.bfloat16, torch.bfloat16, 0, False, False, True, "lds", "tcm")
    finally:
        gemv._plan.cache_clear()


def test_which_problems_the_streaming_gemv_takes():
    assert gemv.gemv_kind(1, 4096, 64, torch.bfloat16) == "tc"  # tensor cores, shared pair table
    assert gemv.gemv_kind(1, 4096, 64, torch.float16) == "tc"
    assert gemv.gemv_kind(1, 4096, 64, torch.float32) == "fma"  # exact levels, float32 FMA
    assert gemv.gemv_kind(16, 14336, 64, torch.float16) == "tcm"  # register operand, x's tokens as columns
    assert gemv.gemv_kind(2, 4096, 64, torch.bfloat16) == "tcm"
    assert gemv.gemv_kind(16, 4096, 64, torch.bfloat16, multi="mma") == "mma"  # W through shared memory
    with gemv.multi_kind("mma"):
        assert gemv.gemv_kind(4, 4096, 64, torch.bfloat16) == "mma"
    assert gemv.gemv_kind(4, 4096, 64, torch.bfloat16) == "tcm"
    with pytest.raises(ValueError, match="one of"):
        with gemv.multi_kind("wgmma"):
            pass
    assert gemv.gemv_kind(17, 4096, 64, torch.bfloat16) is None  # above GEMV_MAX_M: GEMM regimes
    assert gemv.gemv_kind(4, 4096, 64, torch.float32) is None  # fp32 tensor cores would round (TF32)
    assert gemv.gemv_kind(1, 4100, 64, torch.bfloat16) is None  # K not a multiple of 64
    assert gemv.gemv_kind(1, 4096, 32, torch.bfloat16) is None  # a 64-code group would span 2 blocks
    assert gemv.gemv_kind(1, 192, 128, torch.bfloat16) is None  # rows start mid-block
    assert kernels.choose_regime(1, K=4096, blocksize=64, dtype=torch.bfloat16) == "gemv"
    assert kernels.choose_regime(1, forward=False) == "dequant_gemm"  # dx: dequantize once + cuBLAS
    assert kernels.choose_regime(32, K=4096, N=14336) == "gemm"  # 112 tiles of 128: the grid fills the GPU
    assert kernels.choose_regime(32, K=4096, N=4096) == "dequant_gemm"  # 32 tiles: too few programs
    assert kernels.choose_regime(4096, K=4096, N=4096) == "dequant_gemm"  # training
    with kernels.force_regime("gemv"):
        assert kernels.choose_regime(3, K=100) == "gemm"  # forcing 'gemv' where it cannot run


def test_split_k_is_deterministic_and_leaves_the_counters_at_zero(device):
    if not kernels.dispatch.use_triton(torch.zeros(1, device=device)):
        pytest.skip("reference backend")
    qt = nf4.quantize(torch.randn(24, 384, device=device), "nf4", 64, True)
    for M, dtype in ((1, torch.bfloat16), (3, torch.float16)):
        x = torch.randn(M, 384, device=device).to(dtype)
        y1 = kernels.nf4_matmul(x, qt)
        y2 = kernels.nf4_matmul(x, qt)
        assert torch.equal(y1, y2)
    for counters, *_ in gemv._counters.values():
        assert int(counters.abs().sum()) == 0


@pytest.mark.parametrize("nested", [True, False])
def test_hybrid_word_split_and_rejoin_keep_every_weight_in_place(device, nested):
    """The GPU's 'hybrid' decoder splits each thread's 4-word groups 3:1 between two decoders and
    joins them back; 'hybrid_table' runs that split and re-join with the plain decoder (fp16-rounded
    levels on the fourth word), so a misplaced word would show against the reference here."""
    if not kernels.dispatch.use_triton(torch.zeros(1, device=device)):
        pytest.skip("reference backend")
    with gemv.force_decoder("hybrid_table"):
        run_case(device, 1, 40, 256, 8, True, 0.0, 64, nested, "nf4", False, False, torch.bfloat16, regime="auto")
        run_case(device, 1, 33, 384, 0, False, 0.0, 128, nested, "fp4", True, True, torch.float16, regime="auto")


@pytest.mark.parametrize("nested", [True, False])
def test_tc_word_split_and_rejoin_keep_every_weight_in_place(device, nested, monkeypatch):
    """The GPU's 'lds' decoder of the M = 1 tensor-core GEMV splits each thread's 4-word groups 3:1
    between the shared pair table and the byte permutes and joins them back; 'lds_table' runs that
    split and re-join with the plain decoder, so a misplaced word would show against the reference.
    Also covers blocksize 128 (both halves of a slice in one block) and K % 128 == 64 (a half slice)."""
    if not kernels.dispatch.use_triton(torch.zeros(1, device=device)):
        pytest.skip("reference backend")
    seen = []
    real = gemv._gemv_tc_kernel
    monkeypatch.setattr(gemv, "_gemv_tc_kernel", _Spy(real, seen))
    with gemv.force_decoder("lds_table"):
        run_case(device, 1, 40, 256, 8, True, 0.0, 64, nested, "nf4", False, False, torch.bfloat16, regime="auto")
        run_case(device, 1, 33, 384, 0, False, 0.0, 128, nested, "fp4", True, True, torch.float16, regime="auto")
        run_case(device, 1, 70, 192, 4, True, 0.0, 64, nested, "nf4", False, True, torch.bfloat16, regime="auto")
        # two row groups (the CPU config takes 128 rows a group), > 256 blocks (a second nested scale)
        run_case(device, 1, 200, 256, 8, False, 0.0, 64, nested, "nf4", False, False, torch.bfloat16, regime="auto")
    assert seen and set(seen) == {"lds_table"}


@pytest.mark.parametrize("nested", [True, False])
def test_tc_absmax_view_at_an_odd_block(device, nested):
    """The tc kernel reads one absmax a thread at any element offset: an absmax that is a view
    starting at an odd element (a misaligned pair on a GPU, if it ever read pairs) gives the same
    result as a fresh one."""
    import dataclasses

    if not kernels.dispatch.use_triton(torch.zeros(1, device=device)):
        pytest.skip("reference backend")
    qt = nf4.quantize(torch.randn(96, 256, device=device), "nf4", 64, nested)
    buf = torch.zeros(qt.absmax.numel() + 1, dtype=qt.absmax.dtype, device=device)
    buf[1:] = qt.absmax
    odd = dataclasses.replace(qt, absmax=buf[1:])
    x = torch.randn(1, 256, device=device).to(torch.bfloat16)
    assert gemv.gemv_kind(1, 256, 64, x.dtype) == "tc"
    y, y_odd = kernels.nf4_matmul(x, qt), kernels.nf4_matmul(x, odd)
    assert torch.equal(y, y_odd)


def test_forced_decoder_that_does_not_apply_and_tc_warps_are_refused(device):
    if not kernels.dispatch.use_triton(torch.zeros(1, device=device)):
        pytest.skip("reference backend")
    qt = nf4.quantize(torch.randn(16, 128, device=device), "nf4", 64, False)
    x = torch.randn(1, 128, device=device).to(torch.bfloat16)
    with gemv.force_decoder("prmt"), pytest.raises(ValueError, match="decoder 'prmt' does not apply to the 'tc'"):
        kernels.nf4_matmul(x, qt)
    with gemv.force_decoder("lds"), pytest.raises(ValueError, match="does not apply to the 'fma'"):
        kernels.nf4_matmul(x.float(), qt)
    state = kernels.state.quant_state(qt)
    with pytest.raises(ValueError, match="tc GEMV runs 4 warps.*num_warps=2"):
        gemv.gemv_launch(x, state, 16, 128, 64, None, None, 0.0, None, x.dtype, config={"num_warps": 2})


class _Spy:
    """``kernel[grid](...)`` that records the DECODE it was launched with, then launches."""

    def __init__(self, kernel, seen):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append(kwargs["DECODE"])
            return self.kernel[grid](*args, **kwargs)
        return launch


def test_forcing_an_fma_decoder_runs_m1_half_precision_on_the_fma_kernel(device, monkeypatch):
    if not kernels.dispatch.use_triton(torch.zeros(1, device=device)):
        pytest.skip("reference backend")
    seen = []
    monkeypatch.setattr(gemv, "_gemv_fma_kernel", _Spy(gemv._gemv_fma_kernel, seen))
    qt = nf4.quantize(torch.randn(24, 256, device=device), "nf4", 64, True)
    x = torch.randn(1, 256, device=device).to(torch.bfloat16)
    with gemv.force_decoder("hybrid_table"):
        y = kernels.nf4_matmul(x, qt)
    assert seen == ["hybrid_table"]
    ref = x.float() @ nf4.dequantize(qt, torch.float32).t()
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)


def test_forced_table_decoder_and_bad_decoder_name(device):
    qt = nf4.quantize(torch.randn(16, 128, device=device), "nf4", 64, False)
    x = torch.randn(1, 128, device=device).to(torch.bfloat16)
    with gemv.force_decoder("table"):
        assert torch.equal(kernels.nf4_matmul(x, qt), kernels.nf4_matmul(x, qt))
    with pytest.raises(ValueError, match="decoder must be one of .* got 'lut'"):
        with gemv.force_decoder("lut"):
            pass
