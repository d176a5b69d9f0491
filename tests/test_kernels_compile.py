"""The torch ecosystem: gradcheck on the float64 reference path, torch.library op checks, and
torch.compile(fullgraph=True) tracing a QLoRA linear forward + backward without graph breaks."""

import pytest
import torch

import kernels
import nf4
from kernels.dequant import dequantize_op
from kernels.dropout import dropout_op
from kernels.matmul import nf4_linear_dx_op, nf4_linear_op
from kernels.state import quant_state


def _problem(device, dtype, N=12, K=20, r=3, M=5):
    qt = nf4.quantize(torch.randn(N, K, device=device), "nf4", 64, True)
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    A = (torch.randn(r, K, device=device, dtype=dtype) * 0.3).requires_grad_()
    B = (torch.randn(N, r, device=device, dtype=dtype) * 0.3).requires_grad_()
    bias = torch.randn(N, device=device, dtype=dtype, requires_grad=True)
    return qt, x, A, B, bias


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_float64_reference_path(device, p):
    qt, x, A, B, bias = _problem(device, torch.float64)
    f = lambda x, A, B, bias: kernels.qlora_linear(x, qt, A, B, 0.7, bias, p, seed=11)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, A, B, bias))


def test_gradcheck_through_torch_compile(device):
    qt, x, A, B, bias = _problem(device, torch.float64, N=6, K=10, r=2, M=3)
    f = torch.compile(lambda x, A, B: kernels.qlora_linear(x, qt, A, B, 0.5, None, 0.2, seed=3),
                      fullgraph=True, backend="aot_eager")
    assert torch.autograd.gradcheck(f, (x, A, B))


def test_library_ops_pass_opcheck(device):
    qt = nf4.quantize(torch.randn(24, 40, device=device), "nf4", 64, True)
    st = quant_state(qt)
    x = torch.randn(5, 40, device=device)
    S, B = torch.randn(5, 4, device=device), torch.randn(24, 4, device=device)
    G, A = torch.randn(5, 4, device=device), torch.randn(4, 40, device=device)
    seed = torch.tensor(3, device=device)
    torch.library.opcheck(dequantize_op, (*st, qt.numel, 64, torch.float16))
    torch.library.opcheck(dropout_op, (x, seed, 0.25))
    torch.library.opcheck(nf4_linear_op, (x, *st, 24, 40, 64, S, B, 0.5, torch.randn(24, device=device)))
    torch.library.opcheck(nf4_linear_dx_op, (torch.randn(5, 24, device=device), *st, 24, 40, 64, G, A, 0.5, seed, 0.25))


@pytest.mark.parametrize("backend", ["inductor"])
def test_compile_fullgraph_forward_and_backward(device, backend):
    """fullgraph=True fails on any graph break; results equal eager (same seed tensor)."""
    torch._dynamo.reset()
    qt, x, A, B, bias = _problem(device, torch.float32, N=24, K=40, r=4, M=6)
    seed = torch.tensor(5, device=device)

    def step(x, A, B, seed):
        y = kernels.qlora_linear(x, qt, A, B, 2.0, bias.detach(), 0.1, seed=seed)
        return (y * y).sum()

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    loss_c = compiled(x, A, B, seed)
    grads_c = torch.autograd.grad(loss_c, (x, A, B))
    loss_e = step(x, A, B, seed)
    grads_e = torch.autograd.grad(loss_e, (x, A, B))
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=0)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-5)
    # default seed (drawn inside the compiled graph) also traces without a break
    torch.compile(lambda x: kernels.qlora_linear(x, qt, A, B, 2.0, None, 0.1).sum(), fullgraph=True,
                  backend=backend)(x).backward()


def test_compile_traces_nf4_matmul_and_dequantize(device):
    torch._dynamo.reset()
    qt = nf4.quantize(torch.randn(16, 32, device=device), "fp4", 64, False)
    x = torch.randn(3, 32, device=device)
    f = torch.compile(lambda x: kernels.nf4_matmul(x, qt) + x @ kernels.dequantize(qt, torch.float32).t(),
                      fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(x), 2 * kernels.nf4_matmul(x, qt), rtol=1e-5, atol=1e-5)
