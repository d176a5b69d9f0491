"""The H200 (sm_90a) side of ``tools/perf_model.py``: hardware constants, occupancy, and the
time one launch takes under the model. Pure Python (no torch, no triton), so it is unit-tested
in CI.

Constants (H200 SXM; NOTES §4 and §6):

    SMS x SCHEDULERS x CLOCK_HZ = 132 x 4 x 1.98e9 ≈ 1.05e12 warp-instructions / s
    HBM_BYTES_PER_S  = 4.8e12           (spec; ≈ 4.3e12 measured copy, NOTES §4)
    TENSOR_FLOPS     = 989e12 bf16/fp16 dense (spec; ≈ 790e12 measured, NOTES §4)
    LSU_BYTES_PER_CLK = 128 per SM      (32 banks x 4 B: shared memory / L1 serve one
                                         128-byte wavefront per clock, NOTES §6)

Occupancy (``ctas_per_sm``) follows CUDA's occupancy calculator (``cuda_occupancy.h``): registers
are allocated per warp in units of 256 (``regs x 32`` rounded up), in 4 sub-partitions of 16,384
registers each, so ``warps = 4 x floor(16384 / regs_per_warp)``; plus 2,048 threads, 32 CTAs and
228 KB of shared memory per SM, each CTA charged its dynamic shared memory plus the 1 KB the
driver reserves per block on sm_8x/sm_90 (``smem_per_cta``), rounded up to 128 bytes.

Time of one launch (``launch_time``): programs run in waves of ``SMS x ctas_per_sm``; in a wave
the busiest SM runs ``p`` programs (``ctas_per_sm`` in a full wave, ``ceil(rest / SMS)`` in the
last one) and needs

    issue  = p * warp_instr_per_program / (min(4, p * num_warps) * CLOCK_HZ)   (1 instr / scheduler / clock)
    lsu    = p * lsu_cycles_per_program / CLOCK_HZ                            (1 wavefront / clock)
    tensor = p * flops_per_program / (TENSOR_FLOPS / SMS)                     (dot kernels only)

summed over the waves; HBM is shared by all SMs: ``hbm = bytes / HBM_BYTES_PER_S``. The launch
takes the largest of the four (its ``bound``). This is a throughput model: it ignores latency
(a lone warp cannot issue every clock), cache misses beyond the unique bytes, and tail effects
inside a wave, so it is optimistic; the GPU suite calibrates it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SMS = 132
SCHEDULERS_PER_SM = 4
CLOCK_HZ = 1.98e9
ISSUE_RATE = SMS * SCHEDULERS_PER_SM * CLOCK_HZ  # ≈ 1.05e12 warp-instructions / s
HBM_BYTES_PER_S = 4.8e12
TENSOR_FLOPS = {"bf16": 989e12, "fp16": 989e12, "tf32": 494e12, "fp32": 67e12}  # dense, per GPU
LSU_BYTES_PER_CLK = 128

WARP_SIZE = 32
REGS_PER_SM = 65536
REG_SUBPARTITIONS = 4
REG_ALLOC_UNIT = 256  # registers, per warp
MAX_REGS_PER_THREAD = 255
THREADS_PER_SM = 2048
CTAS_PER_SM = 32
SMEM_PER_SM = 228 * 1024
SMEM_PER_BLOCK = 227 * 1024  # what Triton checks before a launch (232,448 bytes)
SMEM_RESERVED_PER_BLOCK = 1024
SMEM_ALLOC_UNIT = 128

# Fixed cost of one kernel on the GPU timeline, back to back in one stream: NVIDIA's CUDA Graphs
# blog measured ≈ 3.8 µs per 2.9 µs kernel with stream launches (≈ 0.9 µs each) and ≈ 3.4 µs in a
# graph (V100). We take 1 µs per launch and report it in its own column (``launch_overhead_us``),
# never inside ``predicted_us``: it is unmeasured on the H200. Host-side launch cost (driver and
# torch.library dispatch, ≈ 5-20 µs) is not modelled: decode must run in a CUDA graph to hide it.
LAUNCH_US = 1.0


def round_up(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def regs_per_warp(regs: int) -> int:
    """Registers one warp is allocated: ``regs x 32`` rounded up to 256."""
    return round_up(max(regs, 1) * WARP_SIZE, REG_ALLOC_UNIT)


def max_warps_by_regs(regs: int) -> int:
    """Warps per SM the register file holds (4 sub-partitions of 16,384 registers)."""
    return REG_SUBPARTITIONS * ((REGS_PER_SM // REG_SUBPARTITIONS) // regs_per_warp(regs))


def smem_per_cta(dynamic: int, static: int = 0) -> int:
    """Shared memory one CTA takes from its SM: the dynamic part plus the 1 KB the driver
    reserves per block. On sm_90 ptxas reports that reserved window as 1,024 bytes of static
    shared memory for kernels that use shared memory (their dynamic window starts at 0x400 in
    the SASS), so static shared memory counts only beyond that 1 KB."""
    return round_up(dynamic + max(static, SMEM_RESERVED_PER_BLOCK), SMEM_ALLOC_UNIT)


@dataclass(frozen=True)
class Occupancy:
    ctas_per_sm: int
    limit: str  # "regs" | "threads" | "ctas" | "smem" (the first binding one)


def occupancy(regs: int, num_warps: int, smem: int, static_smem: int = 0) -> Occupancy:
    """CTAs per SM for ``num_warps`` warps of ``regs`` registers, ``smem`` bytes of dynamic and
    ``static_smem`` of static shared memory (``smem_per_cta``). ``ctas_per_sm == 0`` means the
    launch cannot run at all."""
    if regs > MAX_REGS_PER_THREAD or smem > SMEM_PER_BLOCK or num_warps * WARP_SIZE > 1024:
        return Occupancy(0, "regs" if regs > MAX_REGS_PER_THREAD else "smem" if smem > SMEM_PER_BLOCK else "threads")
    # hardware check: the per-CTA allocation is made as if warps were rounded up to the 4 partitions
    if regs_per_warp(regs) * round_up(num_warps, REG_SUBPARTITIONS) > REGS_PER_SM:
        return Occupancy(0, "regs")
    limits = {
        "regs": max_warps_by_regs(regs) // num_warps,
        "threads": THREADS_PER_SM // (num_warps * WARP_SIZE),
        "ctas": CTAS_PER_SM,
        "smem": SMEM_PER_SM // smem_per_cta(smem, static_smem),
    }
    name = min(limits, key=lambda k: limits[k])
    return Occupancy(limits[name], name)


def wave_loads(programs: int, ctas_per_sm: int) -> list[tuple[int, int]]:
    """``[(p, n_waves)]``: programs on the busiest SM per wave, and how many such waves."""
    if programs <= 0:
        return []
    slots = SMS * ctas_per_sm
    full, rest = divmod(programs, slots)
    out = [(ctas_per_sm, full)] if full else []
    if rest:
        out.append((math.ceil(rest / SMS), 1))
    return out


@dataclass(frozen=True)
class LaunchTime:
    hbm_us: float
    issue_us: float
    lsu_us: float
    tensor_us: float
    waves: int

    @property
    def bounds(self) -> dict:
        return {"hbm": self.hbm_us, "issue": self.issue_us, "lsu": self.lsu_us, "tensor": self.tensor_us}

    @property
    def us(self) -> float:
        return max(self.bounds.values())

    @property
    def bound(self) -> str:
        b = self.bounds
        return max(b, key=lambda k: b[k])


def launch_time(*, programs: int, num_warps: int, ctas_per_sm: int, bytes_moved: float,
                warp_instr_per_program: float, lsu_cycles_per_program: float = 0.0,
                flops_per_program: float = 0.0, tensor_dtype: str = "bf16") -> LaunchTime:
    """The model's time of one Triton launch (module docstring). Raises ``ValueError`` for a
    launch that cannot be resident (``ctas_per_sm == 0``)."""
    if ctas_per_sm <= 0:
        raise ValueError(f"a launch with ctas_per_sm={ctas_per_sm} cannot run on an SM")
    issue = lsu = tensor = 0.0
    waves = 0
    per_sm_flops = TENSOR_FLOPS[tensor_dtype] / SMS
    for p, n in wave_loads(programs, ctas_per_sm):
        waves += n
        schedulers = min(SCHEDULERS_PER_SM, p * num_warps)
        issue += n * p * warp_instr_per_program / (schedulers * CLOCK_HZ)
        lsu += n * p * lsu_cycles_per_program / CLOCK_HZ
        tensor += n * p * flops_per_program / per_sm_flops
    return LaunchTime(hbm_us=bytes_moved / HBM_BYTES_PER_S * 1e6, issue_us=issue * 1e6, lsu_us=lsu * 1e6,
                      tensor_us=tensor * 1e6, waves=waves)


def roofline_us(bytes_moved: float, flops: float = 0.0, tensor_dtype: str = "bf16") -> LaunchTime:
    """A library kernel (cuBLAS GEMM, torch elementwise) at the roofline:
    ``max(bytes / HBM, flops / TENSOR_FLOPS)``, no instruction or wave model."""
    return LaunchTime(hbm_us=bytes_moved / HBM_BYTES_PER_S * 1e6, issue_us=0.0, lsu_us=0.0,
                      tensor_us=flops / TENSOR_FLOPS[tensor_dtype] * 1e6 if flops else 0.0, waves=0)
