"""The performance model's adapter table (``tools/perf_model.py``): everything the model knows
about particular kernels, which launches make a report row, and which op namespaces it traces.
Update it when a kernel changes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# =====================================================================================
# ADAPTER TABLE: everything the model knows about particular kernels. Update it when a
# kernel changes. ``a`` is the launch's arguments by name (constexprs included).
#   weight_param       the argument that points at the streamed weight (for code_ldg_bits)
#   weights_per_iter   weights one program consumes per iteration of its K loop
#   iters              K-loop iterations per program
#   weights_per_program  (kernels without a K loop) weights one program handles
#   flops              tensor-core flops per program (dot kernels; padded tiles)
#   variant_keys       constexprs that name the variant in the report
# =====================================================================================
@dataclass(frozen=True)
class KernelAdapter:
    weight_param: str
    weights_per_iter: Callable[[dict], int] | None = None
    iters: Callable[[dict], int] | None = None
    weights_per_program: Callable[[dict], int] | None = None
    flops: Callable[[dict], int] | None = None
    variant_keys: tuple = ()
    # split-K kernels whose last program reduces the partials: the fraction of programs that run
    # the code after the predicated EXIT (perf_model_sass.cold_region), and how many times its
    # instructions run there by loop depth (depth 1, 2, ...; depth 0 runs once)
    cold_fraction: Callable[[dict], float] | None = None
    cold_loop_trips: Callable[[dict], tuple] | None = None


def _dot_dtype(a: dict) -> str:
    return "fp32" if a.get("IEEE") else str(a.get("DOT_DTYPE", "bf16"))


ADAPTERS = {
    # kernels/gemv.py, M = 1: program (k-slice, row group) loops over its rows BLOCK_N at a time,
    # each iteration TK x 64 codes of BLOCK_N rows; the last of a row group's SLICES programs
    # reduces the partials (row blocks x slices)
    "_gemv_fma_kernel": KernelAdapter(
        weight_param="w_ptr",
        weights_per_iter=lambda a: a["TK"] * 64 * a["BLOCK_N"],
        iters=lambda a: cdiv(min(a["rows_per_cta"], a["N"]), a["BLOCK_N"]),
        variant_keys=("TK", "BLOCK_N", "DECODE", "SPLIT_K"),
        cold_fraction=lambda a: 1.0 / a["SLICES"],
        cold_loop_trips=lambda a: (cdiv(min(a["rows_per_cta"], a["N"]), a["BLOCK_N"]),
                                   a["SLICES"] * cdiv(min(a["rows_per_cta"], a["N"]), a["BLOCK_N"]))),
    # kernels/gemv_tc.py, M = 1 bf16/fp16: program (k-slice of 128 codes, row group) loops over its
    # rows 64 at a time, one [64, 128] x [128, 16] register-operand MMA chain each (x's 2 columns
    # padded to the MMA's 16); the last of a row group's SLICES programs reduces the partials
    "_gemv_tc_kernel": KernelAdapter(
        weight_param="w_ptr",
        weights_per_iter=lambda a: 64 * 128,
        iters=lambda a: cdiv(min(a["rows_per_cta"], a["N"]), 64),
        flops=lambda a: 2 * 64 * 16 * 128 * cdiv(min(a["rows_per_cta"], a["N"]), 64),
        variant_keys=("DECODE",),
        cold_fraction=lambda a: 1.0 / a["SLICES"],
        cold_loop_trips=lambda a: (cdiv(min(a["rows_per_cta"], a["N"]), 64),
                                   a["SLICES"] * cdiv(min(a["rows_per_cta"], a["N"]), 64))),
    # kernels/gemv_tcm.py, 2 <= M <= 16 bf16/fp16: program (k-slice of 128 SUB codes, row group)
    # loops over its rows 64 at a time, SUB [64, 128] x [128, 16] register-operand MMA chains each;
    # the last of a row group's SLICES programs reduces the [16, 64] partials
    "_gemv_tcm_kernel": KernelAdapter(
        weight_param="w_ptr",
        weights_per_iter=lambda a: 64 * 128 * a["SUB"],
        iters=lambda a: cdiv(min(a["rows_per_cta"], a["N"]), 64),
        flops=lambda a: 2 * 64 * 16 * 128 * a["SUB"] * cdiv(min(a["rows_per_cta"], a["N"]), 64),
        variant_keys=("SUB", "DECODE"),
        cold_fraction=lambda a: 1.0 / a["SLICES"],
        cold_loop_trips=lambda a: (cdiv(min(a["rows_per_cta"], a["N"]), 64),
                                   a["SLICES"] * cdiv(min(a["rows_per_cta"], a["N"]), 64))),
    # kernels/gemv.py, 2 <= M <= 16: program (row tile, split) loops over its K range 64 at a time;
    # the dot is [64, 64] x [64, BLOCK_N] (x's rows padded to 64, the warpgroup MMA's minimum)
    "_gemv_mma_kernel": KernelAdapter(
        weight_param="w_ptr",
        weights_per_iter=lambda a: a["BLOCK_N"] * 64,
        iters=lambda a: cdiv(min(a["k_per_split"], a["K"]), 64),
        flops=lambda a: 2 * 64 * a["BLOCK_N"] * a["k_per_split"],
        variant_keys=("BLOCK_N", "DECODE", "SPLIT_K"),
        cold_fraction=lambda a: 1.0 / a["SPLIT"],
        cold_loop_trips=lambda a: (a["SPLIT"],)),
    # kernels/gemm.py: tile [BLOCK_M, BLOCK_P] per program, all of R in steps of BLOCK_R
    "_qgemm_kernel": KernelAdapter(
        weight_param="w_ptr",
        weights_per_iter=lambda a: a["BLOCK_P"] * a["BLOCK_R"],
        iters=lambda a: cdiv(a["R"], a["BLOCK_R"]),
        flops=lambda a: 2 * a["BLOCK_M"] * a["BLOCK_P"] * cdiv(a["R"], a["BLOCK_R"]) * a["BLOCK_R"],
        variant_keys=("BLOCK_M", "BLOCK_P", "BLOCK_R", "PAIRED", "ROW_BLOCKS")),
    # kernels/dequant.py: BLOCK_BYTES packed bytes (2 weights each) per program, no loop
    "_dequant_kernel": KernelAdapter(
        weight_param="w_ptr",
        weights_per_program=lambda a: 2 * a["BLOCK_BYTES"],
        variant_keys=("BLOCK_BYTES",)),
    # kernels/dequant.py, whole-block tensors: NB blocks of BLOCKSIZE weights per program, no loop
    "_dequant_blocks_kernel": KernelAdapter(
        weight_param="w_ptr",
        weights_per_program=lambda a: a["NB"] * a["BLOCKSIZE"],
        variant_keys=("NB", "DECODE")),
}
# The public ops whose launches make a row, and the row kind they give.
OP_ROWS = {"qlora::nf4_linear": "fwd", "qlora::nf4_linear_dx": "dx", "qlora::dequantize": "dequant"}
OP_NAMESPACES = ("qlora",)
# =====================================================================================
