"""Example (a): the raw ``torch.ops.qlora`` ops inside a plain ``nn.Module``, with your own packed weights.

No ``nf4`` object anywhere. ``Packed4bitLinear`` quantizes its weight in a few lines of plain
PyTorch into bitsandbytes' NF4 layout (docs/kernels.md, section 1: absmax per block of 64, codes
of the 16 NF4 levels, two per byte), keeps the bytes and scales as buffers, and runs

    forward   y  = x Wᵀ + b      torch.ops.qlora.nf4_linear     (W read packed)
    backward  dx = dy W          torch.ops.qlora.nf4_linear_dx  (W read packed again)
              db = sum(dy)

The script checks the module against a dense ``F.linear`` on the same dequantized weight
(forward and both gradients) and prints the memory it saves.

    python examples/raw_ops_linear.py            # 4096 x 4096, batch 8
    python examples/raw_ops_linear.py --tiny     # what CI runs
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import kernels  # noqa: F401  (registers torch.ops.qlora.*)

# The NF4 levels (QLoRA, Appendix E; bitsandbytes' table), code 0..15
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])
BLOCKSIZE = 64
TINY_ABSMAX = 1e-38  # an all-zero block scales by 1/1e-38 and stays zero (bitsandbytes' clamp)


def quantize_nf4(w: torch.Tensor, blocksize: int = BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``w: [N, K]`` (N·K a multiple of blocksize) -> (packed uint8 [N·K/2], absmax float32 [N·K/blocksize]).

    Each value goes to the nearest level; a value exactly between two levels goes to the lower one
    (``bucketize`` counts the midpoints strictly below it), as bitsandbytes rounds.
    """
    blocks = w.detach().float().reshape(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp_min(TINY_ABSMAX))[:, None]).clamp(-1, 1)
    levels = NF4_LEVELS.to(w.device)
    codes = torch.bucketize(scaled, (levels[1:] + levels[:-1]) / 2).to(torch.uint8).flatten()
    return (codes[0::2] << 4) | codes[1::2], absmax


class _Packed4bitFunction(torch.autograd.Function):
    """Autograd over the two raw ops: gradients for x and the bias; the 4-bit weight is frozen."""

    @staticmethod
    def forward(ctx, x2, bias, state, n, k, blocksize):
        ctx.state, ctx.dims = state, (n, k, blocksize)
        ctx.has_bias = bias is not None
        return torch.ops.qlora.nf4_linear(x2, *state, n, k, blocksize, None, None, 0.0, bias)

    @staticmethod
    def backward(ctx, dy):
        n, k, blocksize = ctx.dims
        dx = torch.ops.qlora.nf4_linear_dx(dy.contiguous(), *ctx.state, n, k, blocksize, None, None, 0.0, None, 0.0)
        db = dy.sum(dim=0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return dx, db, None, None, None, None


class Packed4bitLinear(nn.Module):
    """A frozen NF4 linear layer: ``y = x Wᵀ + b`` with ``W: [out, in]`` stored in 4.5 bits per weight.

    Buffers: ``data`` uint8 [out·in/2] (two codes per byte, element 2j high), ``absmax`` float32
    [out·in/64], ``code`` float32 [16]. The bias stays a trainable parameter.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, blocksize: int = BLOCKSIZE):
        super().__init__()
        n, k = weight.shape
        if (n * k) % blocksize:
            raise ValueError(f"out*in must be a multiple of blocksize={blocksize}, got {n}x{k}")
        data, absmax = quantize_nf4(weight, blocksize)
        self.register_buffer("data", data)
        self.register_buffer("absmax", absmax)
        self.register_buffer("code", NF4_LEVELS.to(weight.device))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.out_features, self.in_features, self.blocksize = n, k, blocksize

    def state(self) -> tuple:
        """The six weight tensors in the ops' order (no double quantization: the last three None)."""
        return (self.data, self.absmax, self.code, None, None, None)

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        return torch.ops.qlora.dequantize(*self.state(), n * k, self.blocksize, dtype).view(n, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        y = _Packed4bitFunction.apply(x2, self.bias, self.state(), self.out_features, self.in_features,
                                      self.blocksize)
        return y.view(*x.shape[:-1], self.out_features)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes (CI)")
    args = parser.parse_args(argv)
    n, k, batch = (64, 128, 3) if args.tiny else (4096, 4096, 8)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)

    dense = nn.Linear(k, n, device=device)
    layer = Packed4bitLinear(dense.weight, dense.bias)
    w = layer.dense_weight()
    # the dequantize op is bit-identical to decoding the bytes by hand
    codes = torch.stack([layer.data >> 4, layer.data & 15], dim=1).flatten().long()
    assert torch.equal(w.flatten(), layer.code[codes] * layer.absmax.repeat_interleave(layer.blocksize))

    x = torch.randn(2, batch, k, device=device, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    bias_ref = layer.bias.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), F.linear(x_ref, w, bias_ref)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)

    eps = torch.finfo(torch.float32).eps
    errors = {"y": (y - y_ref).abs().max().item(), "dx": (x.grad - x_ref.grad).abs().max().item(),
              "dbias": (layer.bias.grad - bias_ref.grad).abs().max().item()}
    # float32 dot products of length K (y), N (dx) and 2·batch (dbias): error <= length · eps · sum|terms|
    bounds = {"y": k * eps * (x_ref.detach().abs() @ w.abs().T + bias_ref.detach().abs()).max().item(),
              "dx": n * eps * (dy.abs() @ w.abs()).max().item(),
              "dbias": 2 * batch * eps * dy.abs().sum(dim=(0, 1)).max().item()}
    for name in errors:
        assert errors[name] <= bounds[name], (name, errors[name], bounds[name])

    packed_bytes = sum(b.numel() * b.element_size() for b in layer.buffers())
    dense_bytes = dense.weight.numel() * 2  # as bfloat16
    print(f"Packed4bitLinear {n}x{k} on {device}: {packed_bytes:,} bytes packed vs {dense_bytes:,} in bf16 "
          f"({8 * packed_bytes / (n * k):.3f} bits/weight)")
    for name in errors:
        print(f"  max |{name} - dense F.linear| = {errors[name]:.2e}  (float32 bound {bounds[name]:.2e})")
    return {"errors": errors, "bounds": bounds, "bits_per_weight": 8 * packed_bytes / (n * k)}


if __name__ == "__main__":
    main()
