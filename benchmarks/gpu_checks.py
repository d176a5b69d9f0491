"""Correctness checks of every kernel against the reference, in the GPU suite's dtype (bf16).

Each check returns a list of dicts ``{"check", "case", "ok", "max_err", "worst_ratio", ...}``
where ``worst_ratio = max |got - ref| / bound`` (<= 1 passes). Deterministic results must be
exact (bound 0). Accumulated results get an elementwise bound from the dtype and the length of
the sum, not a tuned tolerance:

    |got - ref| <= (4 u + L * 2^-24) * (|a| @ |b|  [+ the same for every other product term])

u = unit roundoff of the activation dtype (2^-8 for bf16): up to four roundings to that dtype on any
path (the weight as the dot operand: the 4-bit level, absmax and their product in the M <= 16
tensor-core GEMV, once in the dequantize-once path; the rank-r product S = x Aᵀ; the output); L =
the accumulation length (K for y, N for dx, M for dA/dB) with float32 accumulation. The reference
is float32 on the *same* inputs with W exactly as ``nf4`` defines it (float32 levels x absmax), the
same derivation as tests/test_kernels_matmul.py.

The same functions run on CPU with small shapes (under ``TRITON_INTERPRET=1`` they exercise the
Triton kernels through the interpreter), which is how the suite's own test validates them.
"""

from __future__ import annotations

import time

import torch

UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float32: 2.0 ** -24}


class _Rows(list):
    """The check's result list; each appended row also goes to ``emit`` (the GPU suite writes it
    to its JSONL at once, so a check cut short keeps the rows it finished)."""

    def __init__(self, emit=None) -> None:
        super().__init__()
        self.emit = emit

    def append(self, row: dict) -> None:
        super().append(row)
        if self.emit is not None:
            self.emit(row)


ROUNDINGS = 4  # roundings to the activation dtype on any path (module docstring)


def _bound(dtype: torch.dtype, length: int, magnitude: torch.Tensor) -> torch.Tensor:
    return (ROUNDINGS * UNIT_ROUNDOFF[dtype] + length * 2.0 ** -24) * magnitude + 1e-30


def _verdict(got: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor | None) -> dict:
    got, ref = got.detach(), ref.detach()
    err = (got.double() - ref.double()).abs()
    if bound is None:  # exact
        ok = bool(torch.equal(got, ref))
        return {"ok": ok, "max_err": float(err.max()) if err.numel() else 0.0,
                "worst_ratio": 0.0 if ok else float("inf")}
    ratio = float((err / bound.double()).max()) if err.numel() else 0.0
    return {"ok": ratio <= 1.0 and bool(torch.isfinite(got).all()), "max_err": float(err.max()) if err.numel() else 0.0,
            "worst_ratio": ratio}


def check_decoders(device, emit=None):
    """The in-kernel asm decoders (warp-shuffle float32 levels; byte-permute bf16/fp16 levels times
    absmax; the tc GEMV's shared pair table + byte permutes) against the plain Triton decoder, bit
    for bit, for NF4, FP4 and INT4, on every code in every nibble position plus 4,080 random words
    (``kernels._decode.probe``, ``kernels.gemv_tc.probe``). The kernels run the same comparison once
    per device before using the asm (``_decode.verified``, ``gemv_tc.verified``)."""
    import nf4
    from kernels import _decode, gemv_tc

    out = _Rows(emit)
    g = torch.Generator(device="cpu").manual_seed(3)
    words = _decode.probe_words(g)
    am = torch.rand(words.numel(), generator=g) * 3 + 1e-3
    words, am = words.to(device), am.to(device)
    decoders = ["table"] + (["shfl", "mixed", "prmt"] if device.type == "cuda" else [])
    for name, table in (("nf4", nf4.NF4), ("fp4", nf4.FP4), ("int4", nf4.INT4)):
        code = table.to(device)
        for dec in decoders:
            for dt in ((torch.bfloat16, torch.float16) if dec == "prmt" else (None,)):
                t0 = time.perf_counter()
                got = _decode.probe(device, code, words, am, dec, dt)
                want = _decode.probe_expected(code, words, am, dec, dt)
                out.append({"check": "decoder", "case": f"{dec} {name} {dt or 'float32'}",
                            **_verdict(got, want, None), "seconds": time.perf_counter() - t0})
        if device.type == "cuda":  # the M = 1 tensor-core GEMV's shared-table + permute decode
            for dt in (torch.bfloat16, torch.float16):
                t0 = time.perf_counter()
                got = gemv_tc.probe(device, code, words, "lds", dt)
                want = gemv_tc.probe(device, code, words, "table", dt)
                out.append({"check": "decoder", "case": f"lds {name} {dt}", **_verdict(got, want, None),
                            "seconds": time.perf_counter() - t0})
    return out


def check_dequantize(device, shapes=((1031, 777), (4096, 4096)), dtypes=(torch.bfloat16, torch.float16, torch.float32),
                     emit=None):
    """``kernels.dequantize`` equals ``nf4``'s reference bit for bit (nf4/fp4 x DQ x blocksize)."""
    import kernels
    import nf4

    out = _Rows(emit)
    g = torch.Generator(device="cpu").manual_seed(0)
    for shape in shapes:
        w = (torch.randn(*shape, generator=g) * 0.02).to(device)
        for qtype in ("nf4", "fp4"):
            for dq in (True, False):
                for bs in (64, 128):
                    qt = nf4.quantize(w, qtype, bs, dq)
                    for dt in dtypes:
                        t0 = time.perf_counter()
                        got = kernels.dequantize(qt, dt)
                        ref = nf4.dequantize(qt, dt)
                        out.append({"check": "dequantize", "case": f"{tuple(shape)} {qtype} dq={dq} bs={bs} {dt}",
                                    **_verdict(got, ref, None), "seconds": time.perf_counter() - t0})
    return out


def _lora_problem(M, N, K, r, dtype, device, bias, g, layout="2d"):
    import nf4

    w = torch.randn(N, K, generator=g) * 0.02
    qt = nf4.quantize(w.to(device), "nf4", 64, True)
    if layout == "3d":
        x = torch.randn(2, M, K, generator=g).to(device=device, dtype=dtype)
    elif layout == "strided":  # a non-contiguous view (every other column)
        x = torch.randn(M, 2 * K, generator=g).to(device=device, dtype=dtype)[:, ::2]
    else:
        x = torch.randn(M, K, generator=g).to(device=device, dtype=dtype)
    A = (torch.randn(r, K, generator=g) / K ** 0.5).to(device=device, dtype=dtype) if r else None
    B = (torch.randn(N, r, generator=g) * 0.05).to(device=device, dtype=dtype) if r else None
    b = (torch.randn(N, generator=g) * 0.1).to(device=device, dtype=dtype) if bias else None
    return qt, x, A, B, b


def check_qlora_linear(device, dtype=torch.bfloat16, cases=None, regimes=("auto", "gemv", "gemm", "dequant_gemm"),
                       scale=2.0, seed=1234, emit=None):
    """Forward and every gradient (dx, dA, dB) of ``kernels.qlora_linear`` against a float32
    autograd reference on the same inputs, for every matmul regime.

    A case is ``(M, N, K, r, bias, layout[, dropout_p])``. With dropout the reference uses the
    kernels' own keep mask for the seed (``kernels.reference.dropout_keep_mask``, a pure function
    of seed and logical index) and x_hat = x * keep / (1 - p) rounded to the activation dtype as
    the kernels define it; the gradient through x_hat is keep / (1 - p).
    """
    import kernels
    from kernels.reference import dropout_keep_mask

    cases = cases or [
        # (M, N, K, r, bias, layout)
        (1, 4096, 4096, 16, False, "2d"), (3, 1031, 777, 16, True, "2d"), (17, 4096, 4096, 64, True, "3d"),
        # 2 <= M <= 16: the register-operand GEMV with the pair table (SUB = 16), and with byte
        # permutes in one slice (K of 8 sub-slices)
        (16, 4096, 4096, 16, True, "2d"), (4, 14336, 4096, 16, False, "3d"), (5, 1000, 1024, 8, False, "2d"),
        (64, 14336, 4096, 16, False, "2d"), (130, 1031, 777, 8, True, "strided"), (1024, 4096, 4096, 16, True, "2d"),
        (1024, 4096, 14336, 16, False, "2d"), (4096, 4096, 4096, 0, False, "2d"),
        (33, 1031, 777, 16, True, "3d", 0.1), (2048, 4096, 4096, 16, False, "2d", 0.05),
    ]
    out = _Rows(emit)
    g = torch.Generator(device="cpu").manual_seed(1)
    for M, N, K, r, bias, layout, *rest in cases:
        p = rest[0] if rest else 0.0
        qt, x, A, B, b = _lora_problem(M, N, K, r, dtype, device, bias, g, layout)
        w = qt.dequantize(torch.float32)                       # W exactly as nf4 defines it
        # float32 reference and the magnitudes for the bounds
        xr = x.float().detach().requires_grad_(True)
        Ar = A.float().detach().requires_grad_(True) if r else None
        Br = B.float().detach().requires_grad_(True) if r else None
        xh = xr
        if p > 0:
            keep = dropout_keep_mask(torch.tensor(seed, dtype=torch.int64, device=device), x.shape, p, device)
            exact = xr * (keep.float() / (1 - p))
            rounded = (x.float() * keep * (1.0 / (1 - p))).to(dtype).float()
            xh = exact + (rounded - exact).detach()             # value rounded, gradient keep / (1 - p)
        yr = xr @ w.t() + (scale * (xh @ Ar.t()) @ Br.t() if r else 0) + (b.float() if bias else 0)
        dy = torch.randn(yr.shape, generator=g).to(device=device, dtype=dtype)
        yr.backward(dy.float())
        ax, aw, ady = x.float().abs(), w.abs(), dy.float().abs()
        mag_y = ax @ aw.t() + (b.float().abs() if bias else 0)
        mag_dx = ady @ aw
        if r:
            aA, aB = A.float().abs(), B.float().abs()
            mag_y = mag_y + scale * (ax @ aA.t()) @ aB.t()
            mag_dx = mag_dx + scale * (ady @ aB) @ aA
            mag_dA = scale * (ady @ aB).reshape(-1, r).t() @ ax.reshape(-1, K)
            mag_dB = scale * ady.reshape(-1, N).t() @ (ax @ aA.t()).reshape(-1, r)
        rows = x.numel() // K
        for regime in regimes:
            t0 = time.perf_counter()
            xg = x.detach().requires_grad_(True)
            Ag = A.detach().requires_grad_(True) if r else None
            Bg = B.detach().requires_grad_(True) if r else None
            with kernels.force_regime(regime):
                if r:
                    y = kernels.qlora_linear(xg, qt, Ag, Bg, scale, bias=b, dropout_p=p, seed=seed if p > 0 else None)
                else:  # no adapter: the plain 4-bit matmul entry point
                    y = kernels.nf4_matmul(xg, qt, bias=b)
                y.backward(dy)
            if device.type == "cuda":
                torch.cuda.synchronize()
            op = "qlora_linear" if r else "nf4_matmul"
            case = f"M={M} N={N} K={K} r={r} bias={bias} {layout} p={p} {regime}"
            res = [("y", y, yr, _bound(dtype, K, mag_y)), ("dx", xg.grad, xr.grad, _bound(dtype, N, mag_dx))]
            if r:
                res += [("dA", Ag.grad, Ar.grad, _bound(dtype, rows, mag_dA)),
                        ("dB", Bg.grad, Br.grad, _bound(dtype, rows, mag_dB))]
            secs = time.perf_counter() - t0
            for name, got, ref, bound in res:
                out.append({"check": f"{op} {name}", "case": case, **_verdict(got.float(), ref, bound),
                            "seconds": secs})
    return out


def check_paged_adamw(device, numels=(1 << 20, 4096 + 17, 300), steps=20, quad_numel=1 << 16, quad_steps=200,
                      emit=None):
    """PagedAdamW (32-bit state, paged) against torch.optim.AdamW on float32 params: relative
    difference <= 1e-5 (different but exact-in-math update order); paging out between steps is
    bit-identical to an unpaged run; on a quadratic, 8-bit state achieves the 32-bit state's
    loss reduction to within 5%: |L8 - L32| <= 0.05 (L0 - L32)."""
    import optim

    g = torch.Generator(device="cpu").manual_seed(2)
    init = [torch.randn(n, generator=g).to(device) for n in numels]
    grads = [[torch.randn(n, generator=g).to(device) for n in numels] for _ in range(steps)]

    def train(make, page_out=False):
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        opt = make(ps)
        for s in range(steps):
            for p, gr in zip(ps, grads[s]):
                p.grad = gr.clone()
            opt.step()
            if page_out:
                opt.page_out()
        return [p.detach() for p in ps]

    hp = dict(lr=1e-2, weight_decay=0.1)
    t0 = time.perf_counter()
    ref = train(lambda ps: torch.optim.AdamW(ps, **hp))
    paged = train(lambda ps: optim.PagedAdamW(ps, paged=True, state_bits=32, **hp))
    paged_out = train(lambda ps: optim.PagedAdamW(ps, paged=True, state_bits=32, **hp), page_out=True)
    unpaged = train(lambda ps: optim.PagedAdamW(ps, paged=False, state_bits=32, **hp))
    secs = time.perf_counter() - t0
    out = _Rows(emit)
    for i, n in enumerate(numels):
        rel = float(((paged[i] - ref[i]).abs() / ref[i].abs().clamp_min(1e-3)).max())
        out.append({"check": "PagedAdamW vs torch AdamW", "case": f"numel={n} steps={steps}", "ok": rel <= 1e-5,
                    "max_err": rel, "worst_ratio": rel / 1e-5, "seconds": secs})
        same = torch.equal(paged_out[i], unpaged[i])
        out.append({"check": "PagedAdamW page_out between steps == unpaged", "case": f"numel={n}", "ok": same,
                    "max_err": float((paged_out[i] - unpaged[i]).abs().max()),
                    "worst_ratio": 0.0 if same else float("inf"),
                    "seconds": secs})
    # 8-bit state: minimise mean (p - target)^2 from p = 0 with both state precisions
    target = torch.randn(quad_numel, generator=g).to(device)

    def quad(bits):
        p = torch.nn.Parameter(torch.zeros_like(target))
        opt = optim.PagedAdamW([p], lr=1e-2, weight_decay=0.0, paged=True, state_bits=bits)
        for _ in range(quad_steps):
            loss = ((p - target) ** 2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
        return float(((p.detach() - target) ** 2).mean())

    l0, l32, l8 = float((target ** 2).mean()), quad(32), quad(8)
    rel = abs(l8 - l32) / max(l0 - l32, 1e-12)
    out.append({"check": "PagedAdamW 8-bit vs 32-bit state", "case": f"quadratic, {quad_numel} params, "
                f"{quad_steps} steps", "ok": rel <= 0.05, "max_err": rel, "worst_ratio": rel / 0.05,
                "loss0": l0, "loss32": l32, "loss8": l8})
    return out


CHECKS = {
    "dequantize": check_dequantize,
    "qlora_linear": check_qlora_linear,
    "paged_adamw": check_paged_adamw,
}
