"""CPU fast paths of the QLoRA layer and of dequantization equal their eager forms bit for bit."""

import pytest
import torch

import kernels
import lora
import nf4
from kernels import qlora as Q
from nf4 import _cpu_decode as D
from nf4 import tensor as T


def _bits(t):
    return t.detach().contiguous().view(-1).view(torch.uint8)


def _run(layer, x, dy):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(dy)
    return [y, x.grad, layer.lora_A.grad, layer.lora_B.grad]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_dense_weight_kept_for_backward_gives_the_same_bits(dtype, double_quant, dropout, monkeypatch):
    torch.manual_seed(0)
    n, k, m = 37, 130, 45  # odd sizes, a partial quantization block
    layer = lora.QLoRALinear(torch.randn(n, k), torch.randn(n), r=4, alpha=8, dropout=dropout,
                             double_quant=double_quant).to(dtype)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    x = torch.randn(m, k).to(dtype)
    dy = torch.randn(m, n).to(dtype)
    out = {}
    with kernels.force_backend("reference"):
        for mode in ("always", "never"):
            monkeypatch.setenv(Q.KEEP_DENSE_ENV, mode)
            torch.manual_seed(1)  # the same dropout seed
            out[mode] = _run(layer, x, dy)
    for a, b in zip(out["always"], out["never"]):
        assert torch.equal(_bits(a), _bits(b))


def test_the_keep_rule_bounds_the_extra_memory_by_the_saved_input(monkeypatch):
    monkeypatch.setenv(Q.KEEP_DENSE_ENV, "auto")
    layer = lora.QLoRALinear(torch.randn(48, 64), r=4)
    dense_saved = {}
    for m in (6, 48):  # N = 48 float32: kept when M >= 48
        saved = []
        x = torch.randn(m, 64, requires_grad=True)
        with kernels.force_backend("reference"):
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                y = layer(x)
            y.sum().backward()
        dense_saved[m] = any(t.shape == (48, 64) for t in saved)
    assert dense_saved == {6: False, 48: True}
    monkeypatch.setenv(Q.KEEP_DENSE_ENV, "sometimes")
    with pytest.raises(ValueError, match="sometimes"), kernels.force_backend("reference"):
        layer(torch.randn(48, 64, requires_grad=True))


def _eager(monkeypatch):
    monkeypatch.setattr(D, "MIN_ELEMENTS", 1 << 40)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant, quant_type", [(True, "nf4"), (False, "nf4"), (True, "fp4"), (True, "int4")])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
def test_compiled_dequantize_equals_eager_on_odd_sizes(dtype, double_quant, quant_type, blocksize, monkeypatch):
    monkeypatch.setattr(D, "MIN_ELEMENTS", 1 << 10)
    g = torch.Generator().manual_seed(blocksize)
    w = torch.randn(129, 67, generator=g) * 0.05  # 8643 elements: a partial last block, an odd byte
    w.view(-1)[:blocksize] = 0  # an all-zero block
    w.view(-1)[blocksize: 2 * blocksize] = torch.linspace(-1, 1, blocksize)  # every code appears
    qt = nf4.quantize(w.to(dtype), quant_type, blocksize=blocksize, double_quant=double_quant)
    fast = nf4.dequantize(qt)
    assert D.compiled_rows() is not None
    _eager(monkeypatch)
    assert torch.equal(_bits(fast), _bits(nf4.dequantize(qt)))


def test_compiled_decode_reads_packed_codes_at_any_storage_offset(monkeypatch):
    """The int64 view of the codes needs 8-byte alignment: an odd offset into a larger buffer
    (a safetensors file, a slice) is copied first, and float64 outputs (gradient checks) work."""
    monkeypatch.setattr(D, "MIN_ELEMENTS", 1 << 10)
    qt = nf4.quantize(torch.randn(64, 128))
    buf = torch.zeros(qt.data.numel() + 3, dtype=torch.uint8)
    buf[3:] = qt.data.view(-1)
    shifted = buf[3:]
    assert shifted.storage_offset() % 8
    absmax = qt.dequantize_absmax()
    got = T.decode_packed(shifted, absmax, qt.code, qt.numel, 64, torch.float64)
    _eager(monkeypatch)
    assert torch.equal(got, T.decode_packed(qt.data, absmax, qt.code, qt.numel, 64, torch.float64))


def test_dequantize_compile_failure_falls_back_to_eager(monkeypatch):
    def broken(*args):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(D, "MIN_ELEMENTS", 1 << 10)
    monkeypatch.setitem(D._COMPILED, "fn", broken)
    qt = nf4.quantize(torch.randn(100, 90))
    got = nf4.dequantize(qt)
    assert D._COMPILED["fn"] is None  # given up for good
    _eager(monkeypatch)
    assert torch.equal(got, nf4.dequantize(qt))


@pytest.fixture
def small_cache(monkeypatch):
    """Outputs from 64 KiB up come from a fresh output cache of 1 MiB."""
    monkeypatch.setattr(D, "CACHE_MIN_BYTES", 1 << 16)
    monkeypatch.setattr(D, "_CACHE", D._OutputCache())
    monkeypatch.setenv("NF4_DECODE_CACHE_MB", "1")
    return D._CACHE


def test_a_cached_output_is_reused_only_once_no_tensor_refers_to_it(small_cache):
    qt = nf4.quantize(torch.randn(256, 256))  # 256 KiB of float32
    first = nf4.dequantize(qt)
    ptr = first.data_ptr()
    view = first.t()[3:]  # a view keeps the buffer alive
    del first
    second = nf4.dequantize(qt)
    assert second.data_ptr() != ptr and view.data_ptr() != second.data_ptr()
    assert torch.equal(view, second.t()[3:])
    second.mul_(2)  # writing one output never shows in another
    assert not torch.equal(view, second.t()[3:])
    del view
    assert nf4.dequantize(qt).data_ptr() == ptr  # free again: recycled
    assert len(small_cache.regions) == 2


def test_the_output_cache_tracks_at_most_its_limit_and_can_be_turned_off(small_cache, monkeypatch):
    qts = [nf4.quantize(torch.randn(256, 256 + 64 * i)) for i in range(6)]
    outs = [nf4.dequantize(q) for q in qts]  # all alive: 256..576 KiB each, more than 1 MiB in all
    assert sum(len(r) for r in small_cache.regions) <= 1 << 20
    assert all(torch.equal(o, nf4.dequantize(q)) for o, q in zip(outs, qts))
    big = nf4.quantize(torch.randn(1024, 512))  # 2 MiB: over the limit, never cached
    assert nf4.dequantize(big).untyped_storage().resizable()
    D.release_cache()
    assert small_cache.regions == []
    monkeypatch.setenv("NF4_DECODE_CACHE_MB", "0")
    assert nf4.dequantize(qts[0]).untyped_storage().resizable()  # the ordinary allocator
    monkeypatch.setenv("NF4_DECODE_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="lots"):
        nf4.dequantize(qts[0])


def test_cached_outputs_behave_like_any_tensor(small_cache):
    import io
    import pickle

    qt = nf4.quantize(torch.randn(256, 512).to(torch.bfloat16))
    got = nf4.dequantize(qt)
    assert not got.untyped_storage().resizable()  # it is a cached mapping
    buf = io.BytesIO()
    torch.save(got, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=True), got)
    assert torch.equal(pickle.loads(pickle.dumps(got)), got)
    assert torch.equal(got.float().bfloat16(), got) and got.requires_grad_().is_leaf


def test_dequantize_under_tracers_takes_the_eager_path(small_cache, monkeypatch):
    """FakeTensorMode (the compiled kernel would read fake tensors' missing memory), a
    ``torch.compile(fullgraph=True)`` trace (no mmap or lock to trace) and inference mode."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    monkeypatch.setattr(D, "MIN_ELEMENTS", 1 << 10)
    qt = nf4.quantize(torch.randn(256, 512))  # a 512 KiB output: cached outside a trace
    want = nf4.dequantize(qt)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = nf4.dequantize(qt)
    assert isinstance(fake, FakeTensor) and fake.shape == (256, 512)
    x = torch.randn(3, 512)
    f = torch.compile(lambda x: x @ nf4.dequantize(qt).t(), fullgraph=True)
    assert torch.allclose(f(x), x @ want.t(), rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        assert torch.equal(nf4.dequantize(qt), want)
    assert D.compiled_rows() is not None


def test_past_the_recompile_limit_a_call_is_eager_and_the_graphs_stay(monkeypatch):
    monkeypatch.setattr(D, "MIN_ELEMENTS", 1 << 10)
    monkeypatch.setattr(D, "_RECOMPILE_LIMIT", 1)
    qt = nf4.quantize(torch.randn(64, 96))
    got = {dt: nf4.dequantize(qt, dt) for dt in (torch.float32, torch.float16, torch.bfloat16)}
    assert D.compiled_rows() is not None  # a graph limit is not a compiler failure
    _eager(monkeypatch)
    for dt, v in got.items():
        assert torch.equal(_bits(v), _bits(nf4.dequantize(qt, dt)))


def test_dequantize_into_out():
    qt = nf4.quantize(torch.randn(96, 130).to(torch.float16))
    want = nf4.dequantize(qt)
    out = torch.empty(96, 130, dtype=torch.float16)
    assert nf4.dequantize(qt, out=out).data_ptr() == out.data_ptr()
    assert torch.equal(out, want)
    flat = torch.empty(96 * 130)  # any contiguous tensor of the right size and dtype
    got = qt.dequantize(torch.float32, out=flat)
    assert got.shape == (96, 130) and got.data_ptr() == flat.data_ptr()
    assert torch.equal(got, nf4.dequantize(qt, torch.float32))
    for bad in (torch.empty(96, 130), torch.empty(96, 131, dtype=torch.float16),
                torch.empty(130, 96, dtype=torch.float16).t()):
        with pytest.raises(ValueError, match="out must be"):
            nf4.dequantize(qt, out=bad)
    with pytest.raises(ValueError, match="require grad"):
        nf4.dequantize(qt, out=torch.empty(96, 130, dtype=torch.float16, requires_grad=True))
    with torch.inference_mode():
        frozen = torch.empty(96, 130, dtype=torch.float16)
    with pytest.raises(ValueError, match="inference tensor"):
        nf4.dequantize(qt, out=frozen)
    with torch.inference_mode():
        assert torch.equal(nf4.dequantize(qt, out=frozen), want)


def test_bf16_layer_on_cpu_multiplies_in_bf16_within_its_rounding_bound(monkeypatch):
    """bf16 activations: bf16 GEMMs with fp32 accumulation (QLORA_CPU_BF16_GEMM=0: fp32 GEMMs);
    both within a few bf16 roundings of the float64 result."""
    from kernels import reference

    torch.manual_seed(0)
    layer = lora.QLoRALinear(torch.randn(64, 96), torch.randn(64), r=4, alpha=8).to(torch.bfloat16)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)
    x = torch.randn(32, 96).to(torch.bfloat16)
    w = nf4.dequantize(layer.quantized_weight, torch.float32).double()
    xd, a, b = x.double(), layer.lora_A.double(), layer.lora_B.double()
    want = xd @ w.T + layer.scale * (xd @ a.T) @ b.T + layer.bias.double()
    mag = xd.abs() @ w.abs().T + layer.scale * (xd.abs() @ a.abs().T) @ b.abs().T + layer.bias.double().abs()
    for flag in ("1", "0"):
        monkeypatch.setenv(reference.BF16_GEMM_ENV, flag)
        assert reference.gemm_dtype(torch.bfloat16) == (torch.bfloat16 if flag == "1" else torch.float32)
        with torch.no_grad(), kernels.force_backend("reference"):
            y = layer(x)
        assert y.dtype == torch.bfloat16
        assert ((y.double() - want).abs() <= 4 * 2.0 ** -8 * mag + 1e-6).all(), flag


def test_compiled_fast_paths_stay_off_while_tracing():
    """One guard (``nf4._compiled.plain_eager``) for every compiled CPU path: the code search,
    dequantize and AdamW (which segfaulted under FakeTensorMode before it shared the guard)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from nf4._compiled import plain_eager

    p = torch.nn.Parameter(torch.randn(4))
    assert plain_eager(p, torch.zeros(3))
    assert not plain_eager(torch.zeros(3, device="meta"))
    with FakeTensorMode():
        assert not plain_eager(p)
