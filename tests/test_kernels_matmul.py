"""kernels.qlora_linear / kernels.nf4_matmul: forward and every gradient against the reference.

Tolerances are derived, not tuned: each output is compared element-wise against
``(ROUNDINGS * u_dtype + 2 * L * u_fp32) * T`` where T is the same computation on absolute
values (|x| |W|ᵀ + |s| |x_hat| |A|ᵀ |B|ᵀ + |bias|, ...), u is the unit roundoff, L the
reduction length, and ROUNDINGS = 4 bounds the roundings to the activation dtype on any path
(x_hat, S or G, W in the dot operand, the output, and the scale multiply).
"""

import itertools
import math

import pytest
import torch

import kernels
import nf4
from kernels import reference

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
ROUNDINGS = 4
DTYPES = [torch.float16, torch.float32, torch.bfloat16]


def assert_within_bound(got, want, bound, dtype, reduction, what):
    u = UNIT_ROUNDOFF[dtype]
    tol = (ROUNDINGS * u + 2 * reduction * UNIT_ROUNDOFF[torch.float32]) * bound
    err = (got.float() - want.float()).abs()
    bad = err > tol
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {err.numel()} elements outside the bound; "
                           f"worst err {err.max().item():.3e} vs tol {tol.flatten()[err.argmax()].item():.3e}")


def make_x(lead, k, dtype, device, noncontig):
    if not noncontig:
        return torch.randn(*lead, k, device=device).to(dtype)
    if len(lead) == 1:  # transposed: x[m, k] at m + k * M (stride 1 along M)
        return torch.randn(k, *lead, device=device).to(dtype).t()
    return torch.randn(*lead, 2 * k, device=device).to(dtype)[..., ::2]  # strided last dim


def run_case(device, M, N, K, r, has_bias, p, blocksize, nested, quant_type, three_d, noncontig, dtype, regime):
    w = torch.randn(N, K, device=device)
    qt = nf4.quantize(w, quant_type, blocksize, nested)
    lead = (M,) if not three_d else ((1, M) if M % 2 else (2, M // 2))
    x = make_x(lead, K, dtype, device, noncontig).requires_grad_()
    A = (torch.randn(r, K, device=device) / math.sqrt(K)).to(dtype).requires_grad_() if r else None
    B = torch.randn(N, r, device=device).to(dtype).requires_grad_() if r else None
    bias = torch.randn(N, device=device).to(dtype) if has_bias else None
    scale, seed = 2.0 / max(r, 1), 1234
    with kernels.force_regime(regime):
        y = kernels.qlora_linear(x, qt, A, B, scale, bias, p, seed=seed)
        assert y.shape == (*lead, N) and y.dtype == dtype
        dy = torch.randn_like(y)
        y.backward(dy)

    # the spec, in float32, with the same dropout mask
    Wd = nf4.dequantize(qt, torch.float32)
    x2, dy2 = x.detach().reshape(M, K).float(), dy.reshape(M, N).float()
    keep = reference.dropout_keep_mask(torch.tensor(seed, device=device), (M, K), p, device) if (p and r) else None
    A_, B_ = (A.detach().float(), B.detach().float()) if r else (None, None)
    want_y = reference.qlora_forward(x2, Wd, A_, B_, scale, None if bias is None else bias.float(), keep, p)
    dx, dA, dB = reference.qlora_backward(dy2, x2, Wd, A_, B_, scale, keep, p)

    ax, aW, ady = x2.abs(), Wd.abs(), dy2.abs()
    axh = ax if keep is None else ax * keep / (1 - p)
    t_y, t_dx = ax @ aW.t(), ady @ aW
    if r:
        aA, aB = A_.abs(), B_.abs()
        t_y = t_y + scale * (axh @ aA.t()) @ aB.t()
        lora_dx = scale * (ady @ aB) @ aA
        t_dx = t_dx + (lora_dx if keep is None else lora_dx * keep / (1 - p))
        t_dA = scale * (ady @ aB).t() @ axh
        t_dB = scale * ady.t() @ (axh @ aA.t())
    if bias is not None:
        t_y = t_y + bias.float().abs()
    assert_within_bound(y.reshape(M, N), want_y, t_y, dtype, K + r, "y")
    assert_within_bound(x.grad.reshape(M, K), dx, t_dx, dtype, N + r, "dx")
    if r:
        assert_within_bound(A.grad, dA, t_dA, dtype, M + N, "dA")
        assert_within_bound(B.grad, dB, t_dB, dtype, M + r, "dB")


# ---- the curated matrix ----------------------------------------------------------------
# Every (M, regime, dtype) triple once, with the other factors cycled so that each value of each
# factor appears several times and in different company. Shapes are non-multiples of every
# tile size (interpreter tiles are 16/32 wide), except K = 128, a multiple of both blocksizes
# (the forward kernels decode absmax once per row chunk there). K = 73 is odd: rows start
# mid-byte and the forward kernels fall back to the element-wise nibble gather.
MS = [1, 3, 17, 64, 130]
REGIMES = ["gemv", "gemm", "dequant_gemm"]
RANKS = [0, 1, 8, 16, 64]
SHAPES = [(70, 100), (33, 73), (129, 66), (40, 128)]


def _cases():
    out = []
    for i, (M, regime, dtype) in enumerate(itertools.product(MS, REGIMES, DTYPES)):
        N, K = SHAPES[(i + i // 4) % 4]
        out.append(dict(
            M=M, N=N, K=K, r=RANKS[i % 5], has_bias=i % 2 == 0, p=(0.0, 0.25)[(i // 2) % 2],
            blocksize=(64, 128)[(i // 4) % 2], nested=(i % 6) < 3, quant_type=("nf4", "fp4")[(i // 5) % 2],
            three_d=(i % 4) in (1, 2), noncontig=(i % 7) in (1, 4, 5), dtype=dtype, regime=regime,
        ))
    # the automatic regime choice, and the factors' extremes together
    out.append(dict(M=130, N=33, K=73, r=64, has_bias=True, p=0.25, blocksize=128, nested=True, quant_type="fp4",
                    three_d=True, noncontig=True, dtype=torch.float16, regime="auto"))
    out.append(dict(M=1, N=129, K=66, r=16, has_bias=True, p=0.25, blocksize=64, nested=True, quant_type="nf4",
                    three_d=True, noncontig=False, dtype=torch.bfloat16, regime="auto"))
    return out


CASES = _cases()


def _id(c):
    return "M{M}-{N}x{K}-r{r}-{regime}-{qt}{bs}{nest}-{dt}{b}{p}{d3}{nc}".format(
        M=c["M"], N=c["N"], K=c["K"], r=c["r"], regime=c["regime"], qt=c["quant_type"], bs=c["blocksize"],
        nest="dq" if c["nested"] else "", dt=str(c["dtype"]).split(".")[1], b="-bias" if c["has_bias"] else "",
        p="-drop" if c["p"] else "", d3="-3d" if c["three_d"] else "", nc="-strided" if c["noncontig"] else "")


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_forward_and_every_gradient_match_reference(device, case):
    run_case(device, **case)


def test_case_matrix_covers_every_factor():
    for key, values in [("M", MS), ("regime", REGIMES + ["auto"]), ("r", RANKS), ("has_bias", [True, False]),
                        ("p", [0.0, 0.25]), ("blocksize", [64, 128]), ("nested", [True, False]),
                        ("quant_type", ["nf4", "fp4"]), ("three_d", [True, False]), ("noncontig", [True, False]),
                        ("dtype", DTYPES)]:
        assert {c[key] for c in CASES} == set(values), key


def test_case_matrix_covers_every_weight_read_path():
    """Forward reads W one byte per two weights (PAIRED), with absmax per row chunk (ROW_BLOCKS)
    or per byte, or element-wise; dx always element-wise in the other orientation."""
    from kernels._launch import MatmulProblem

    seen = set()
    for c in CASES:
        if c["regime"] not in ("gemv", "gemm"):
            continue
        prob = MatmulProblem(a=torch.zeros(1, c["K"]), P=c["N"], R=c["K"], stride_wr=1, stride_wp=c["K"],
                             state=(None,) * 6, blocksize=c["blocksize"])
        flags = prob.pairing(32, True)
        seen.add((flags["PAIRED"], flags["ROW_BLOCKS"]))
    assert seen == {(True, True), (True, False), (False, False)}


@pytest.mark.parametrize("regime", ["gemv", "gemm", "dequant_gemm"])
def test_reference_backend_matches_too(device, regime):
    with kernels.force_backend("reference"):
        run_case(device, 5, 33, 73, 8, True, 0.25, 64, True, "nf4", True, True, torch.float32, regime)


def test_nf4_matmul_is_x_times_w_transposed(device):
    qt = nf4.quantize(torch.randn(40, 48, device=device), "nf4", 64, True)
    x = torch.randn(3, 5, 48, device=device, requires_grad=True)
    bias = torch.randn(40, device=device)
    y = kernels.nf4_matmul(x, qt, bias)
    W = nf4.dequantize(qt, torch.float32)
    torch.testing.assert_close(y, x.detach() @ W.t() + bias, rtol=0, atol=(2 * 48 * 2**-24) * 10 * 48)
    y.sum().backward()
    torch.testing.assert_close(x.grad, W.sum(0).expand(3, 5, 48), rtol=0, atol=(2 * 40 * 2**-24) * 10 * 40)


@pytest.mark.parametrize("lead", [(0,), (2, 0)])
def test_zero_size_batches(device, lead):
    qt = nf4.quantize(torch.randn(24, 40, device=device), "nf4", 64, True)
    x = torch.randn(*lead, 40, device=device, requires_grad=True)
    A = torch.randn(4, 40, device=device, requires_grad=True)
    B = torch.randn(24, 4, device=device, requires_grad=True)
    y = kernels.qlora_linear(x, qt, A, B, 1.0, torch.randn(24, device=device), 0.1)
    assert y.shape == (*lead, 24)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(A.grad, torch.zeros_like(A)) and torch.equal(B.grad, torch.zeros_like(B))


def test_eval_mode_has_no_dropout_and_dropout_changes_training_output(device):
    qt = nf4.quantize(torch.randn(24, 40, device=device), "nf4", 64, True)
    x = torch.randn(6, 40, device=device)
    A, B = torch.randn(4, 40, device=device), torch.randn(24, 4, device=device)
    y_eval = kernels.qlora_linear(x, qt, A, B, 1.0, dropout_p=0.5, training=False)
    assert torch.equal(y_eval, kernels.qlora_linear(x, qt, A, B, 1.0))
    y_a = kernels.qlora_linear(x, qt, A, B, 1.0, dropout_p=0.5, seed=1)
    y_b = kernels.qlora_linear(x, qt, A, B, 1.0, dropout_p=0.5, seed=2)
    assert not torch.equal(y_a, y_eval) and not torch.equal(y_a, y_b)
    assert torch.equal(y_a, kernels.qlora_linear(x, qt, A, B, 1.0, dropout_p=0.5, seed=1))


def test_autograd_never_saves_a_dequantized_weight(device):
    N, K = 48, 64
    qt = nf4.quantize(torch.randn(N, K, device=device), "nf4", 64, True)
    x = torch.randn(8, K, device=device, requires_grad=True)
    A = torch.randn(4, K, device=device, requires_grad=True)
    B = torch.randn(N, 4, device=device, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = kernels.qlora_linear(x, qt, A, B, 0.5, dropout_p=0.1)
    float_big = [t for t in saved if t.is_floating_point() and t.numel() >= N * K]
    assert not float_big, f"saved float tensors of weight size: {[tuple(t.shape) for t in float_big]}"
    assert any(t.data_ptr() == qt.data.data_ptr() for t in saved), "the packed weight itself is saved"
    y.sum().backward()


# ---- errors name the bad value -----------------------------------------------------------
def test_errors_name_the_bad_value(device):
    qt = nf4.quantize(torch.randn(24, 40, device=device), "nf4", 64, True)
    x = torch.randn(5, 40, device=device)
    A, B = torch.randn(4, 40, device=device), torch.randn(24, 4, device=device)
    with pytest.raises(TypeError, match=r"lora_A.dtype must match x.dtype=torch.float32, got torch.float16"):
        kernels.qlora_linear(x, qt, A.half(), B, 1.0)
    with pytest.raises(TypeError, match=r"lora_B.dtype .* got torch.bfloat16"):
        kernels.qlora_linear(x, qt, A, B.bfloat16(), 1.0)
    with pytest.raises(ValueError, match=r"K=40, got x.shape=\(5, 41\)"):
        kernels.qlora_linear(torch.randn(5, 41, device=device), qt, A, B, 1.0)
    with pytest.raises(ValueError, match=r"rank mismatch: lora_A has r=4 .* r=3"):
        kernels.qlora_linear(x, qt, A, torch.randn(24, 3, device=device), 1.0)
    with pytest.raises(ValueError, match=r"lora_B must be \[N=24, r\], got shape \(23, 4\)"):
        kernels.qlora_linear(x, qt, A, torch.randn(23, 4, device=device), 1.0)
    with pytest.raises(ValueError, match="lora_A=Tensor, lora_B=None"):
        kernels.qlora_linear(x, qt, A, None, 1.0)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\), got 1.5"):
        kernels.qlora_linear(x, qt, A, B, 1.0, dropout_p=1.5)
    with pytest.raises(ValueError, match=r"bias must have shape \(24,\), got \(40,\)"):
        kernels.qlora_linear(x, qt, A, B, 1.0, bias=torch.randn(40, device=device))
    with pytest.raises(TypeError, match="x must be one of .* got torch.int64"):
        kernels.nf4_matmul(torch.ones(5, 40, dtype=torch.long, device=device), qt)
    with pytest.raises(TypeError, match="nf4.QuantizedTensor, got Tensor"):
        kernels.nf4_matmul(x, torch.randn(24, 40))
    with pytest.raises(ValueError, match="unsupported device meta"):
        kernels.nf4_matmul(torch.randn(5, 40, device="meta"), qt)
    with pytest.raises(ValueError, match="2-D weight"):
        kernels.nf4_matmul(x, nf4.quantize(torch.randn(2, 3, 40, device=device)))


def test_matches_a_bitsandbytes_quantized_weight(device):
    """An outside oracle: the weight quantized and dequantized by bitsandbytes, loaded through
    its state dict. K is a multiple of the blocksize on purpose: bitsandbytes 0.50.2's CPU
    ``dequantize_4bit`` (and so ``matmul_4bit``) is wrong for 2-D weights whose rows are not
    a multiple of the blocksize (e.g. 72 x 96: max error 0.08 at absmax 0.2), while its codes
    and absmax equal ours."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(80, 128) * 0.05
    q, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    w_bnb = bnbf.dequantize_4bit(q, state).to(device)
    sd = nf4.quantize(w, "nf4", 64, True).to_bnb_state_dict("weight")
    sd["weight"] = q  # bitsandbytes' packed codes
    qt = nf4.QuantizedTensor.from_bnb_state_dict(sd, "weight").to(device)
    x = torch.randn(3, 128, device=device)
    got = kernels.nf4_matmul(x, qt)
    assert_within_bound(got, x @ w_bnb.t(), x.abs() @ w_bnb.abs().t(), torch.float32, 128, "vs bitsandbytes")
