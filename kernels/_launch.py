"""The generic GEMM's problem description (``MatmulProblem``) and launch helpers.

The kernel computes, for an activation ``a: [M, R]`` and the frozen weight read as
``Wop: [R, P]`` (``Wop = Wᵀ`` forward, ``Wop = W`` for dx),

    out[M, P] = a @ Wop  +  scale * S @ L  (⊙ dropout keep / (1-p))  +  bias

Element (r, p) of Wop is element ``r * stride_wr + p * stride_wp`` of the row-major W: [N, K]
(forward: r = k, p = n -> strides (1, K); dx: r = n, p = k -> strides (K, 1)). So one kernel
reads W in both orientations and no transposed copy is ever made.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
from triton.runtime.errors import OutOfResources

from ._tl import manual_bf16, tl_dtype
from .dispatch import interpreting


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host-side launch arithmetic (``triton.cdiv`` is a JIT-aware wrapper that
    costs tens of microseconds per call from Python)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), host side."""
    return 1 << (n - 1).bit_length()


_NULL = contextlib.nullcontext()


def device_guard(t: torch.Tensor):
    """Make ``t``'s GPU the current one: Triton launches on the current device, which need not
    be the tensors' (e.g. a model spread over several GPUs). A no-op when it already is."""
    if t.device.type != "cuda" or t.device.index == torch.cuda.current_device():
        return _NULL
    return torch.cuda.device(t.device)


def launch_fitting(kernel, grid, args: list, kwargs: dict) -> None:
    """``kernel[grid](*args, **kwargs)`` on the device of ``args[0]``; when the compiled kernel
    needs more shared memory than the GPU has (Triton raises ``OutOfResources`` before launching
    anything), retry with one pipeline stage fewer. Untuned tile configs must not crash a run
    (the GPU tuning issue sets them); the interpreter never raises this."""
    with device_guard(args[0]):
        while True:
            try:
                kernel[grid](*args, **kwargs)
                return
            except OutOfResources:
                stages = kwargs.get("num_stages", 3)
                if stages <= 1:
                    raise
                kwargs = {**kwargs, "num_stages": stages - 1}


@dataclass
class MatmulProblem:
    a: torch.Tensor  # [M, R], any strides
    P: int
    R: int
    stride_wr: int
    stride_wp: int
    state: tuple  # (data, absmax, code, nested_absmax, nested_code, offset)
    blocksize: int
    lora_s: torch.Tensor | None = None  # [M, RANK]
    lora_l: torch.Tensor | None = None  # viewed so that L(j, p) = lora_l[j * stride_lj + p * stride_lp]
    stride_lj: int = 0
    stride_lp: int = 0
    scale: float = 0.0
    bias: torch.Tensor | None = None  # [P]
    seed: torch.Tensor | None = None  # int64 0-d: dropout in the LoRA epilogue (dx only)
    p: float = 0.0

    @property
    def M(self) -> int:
        return self.a.shape[0]

    def pointer_args(self) -> list:
        """Kernel pointers: activation, the 6 weight pointers, S, L, bias, seed (dummies when unused)."""
        data, absmax, code, nabs, ncode, offset = self.state
        nested = nabs is not None
        wptrs = [data, absmax, code, nabs if nested else absmax, ncode if nested else code,
                 offset if nested else code]
        dummy = self.a
        return [self.a, *wptrs,
                self.lora_s if self.lora_s is not None else dummy,
                self.lora_l if self.lora_l is not None else dummy,
                self.bias if self.bias is not None else dummy,
                self.seed if self.seed is not None else dummy]

    def scalar_args(self) -> list:
        rank = 0 if self.lora_s is None else self.lora_s.shape[1]
        s = self.lora_s
        threshold = int(self.p * 2**32)
        return [self.M, self.P, self.R, rank,
                self.a.stride(0), self.a.stride(1), self.stride_wr, self.stride_wp,
                s.stride(0) if s is not None else 0, s.stride(1) if s is not None else 0,
                self.stride_lj, self.stride_lp,
                float(self.scale), threshold, 1.0 / (1.0 - self.p)]

    def pairing(self, block_r: int, use_dot: bool) -> dict:
        """PAIRED: the forward orientation with K even, read one byte per two weights
        (``_tl.dequant_pairs``); ROW_BLOCKS: each row chunk of BLOCK_R lies in one absmax block."""
        paired = self.stride_wr == 1 and self.stride_wp % 2 == 0 and block_r % 2 == 0
        if paired and use_dot and block_r < 32:
            paired = False  # tl.dot needs an inner dimension >= 16 per half
        row_blocks = paired and self.R % self.blocksize == 0 and self.blocksize % block_r == 0
        return dict(PAIRED=paired, ROW_BLOCKS=row_blocks)

    def meta(self, out_dtype: torch.dtype, dot_operands_fp32: bool) -> dict:
        """Constexpr flags common to both kernels."""
        rank = 0 if self.lora_s is None else self.lora_s.shape[1]
        interp = interpreting()
        dtype = self.a.dtype
        fp32_dot = dot_operands_fp32 or dtype == torch.float32 or (interp and dtype == torch.bfloat16)
        nested = self.state[3] is not None
        return dict(
            BLOCKSIZE=self.blocksize, NESTED=nested,
            HAS_LORA=self.lora_s is not None, BLOCK_RANK=max(16, next_pow2(max(rank, 1))),
            HAS_DROPOUT=self.seed is not None and self.p > 0, HAS_BIAS=self.bias is not None,
            DOT_DTYPE=tl_dtype(torch.float32 if fp32_dot else dtype), IEEE=fp32_dot,
            OUT_DTYPE=tl_dtype(out_dtype), MANUAL_BF16=manual_bf16(out_dtype, interp),
        )
