"""Paging: the prefetch schedule (recorded on CPU), arenas, the CUDA runtime bindings (with a
fake library), fallbacks, and on a GPU the real unified-memory round trip.

The recorder checks the order of calls only; the real validation is the GPU test at the end
(skipped without CUDA) and benchmarks/bench_optim.py on a GPU.
"""

import ctypes
import gc
import subprocess
import sys
import warnings

import pytest
import torch

import optim
from optim import cudart, paging
from optim.paging import DeviceBackend, PageScheduler, RecordingBackend



HAS_CUDA = torch.cuda.is_available()


def _params(sizes, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=gen).to(device)) for n in sizes]


def _grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(p.device)


def test_scheduler_prefetches_the_next_unit_while_the_current_one_updates():
    rec = RecordingBackend()
    bufs = [rec.allocate(1024, torch.device("cpu")) for _ in range(3)]
    rec.calls.clear()
    units = [(None, "small"), (bufs[0], "a"), (bufs[1], "b"), (bufs[2], "c")]
    PageScheduler(rec).run(units, lambda payload: rec.calls.append(("run", payload)), torch.device("cpu"))
    assert rec.calls == [
        ("begin",),
        ("prefetch", "buf0", "device", "ahead"), ("update", None), ("run", "small"),
        ("prefetch", "buf1", "device", "ahead"), ("wait", "buf0"), ("update", "buf0"), ("run", "a"),
        ("prefetch", "buf2", "device", "ahead"), ("wait", "buf1"), ("update", "buf1"), ("run", "b"),
        ("wait", "buf2"), ("update", "buf2"), ("run", "c"),
    ]
    rec.calls.clear()
    PageScheduler(rec).run(units[1:3], lambda payload: rec.calls.append(("run", payload)), torch.device("cpu"))
    assert rec.calls[:3] == [("begin",), ("prefetch", "buf0", "device", "now"), ("prefetch", "buf1", "device", "ahead")]
    rec.calls.clear()
    PageScheduler(rec).page_out(bufs, torch.device("cpu"))
    assert rec.calls == [("prefetch", f"buf{i}", "host", "now") for i in range(3)] + [("synchronize",)]


def test_scheduler_without_paged_units_issues_no_paging_calls():
    rec = RecordingBackend()
    PageScheduler(rec).run([(None, 1)], lambda payload: None, torch.device("cpu"))
    assert rec.calls == [("update", None)]


@pytest.mark.parametrize("bits", [32, 8])
def test_optimizer_pages_each_parameter_in_before_its_update_and_out_on_request(bits):
    rec = RecordingBackend()
    params = _params([5000, 300, 7000, 6000])
    opt = optim.PagedAdamW(params, page_min_numel=1000, arena_bytes=0, paging_backend=rec,
                           state_bits=bits, fused=False)
    for step in range(2):
        _grads(params, step)
        rec.calls.clear()
        opt.step()
        calls = rec.calls
        if step == 0:  # one arena per paged parameter (arena_bytes=0), in parameter order
            assert [c[0] for c in calls[:3]] == ["allocate"] * 3
            calls = calls[3:]
        updates = [c[1] for c in calls if c[0] == "update"]
        assert updates == [None, "buf0", "buf1", "buf2"]  # unpaged (300 elements) first
        for i, name in enumerate(updates[1:]):
            at = calls.index(("update", name))
            assert ("prefetch", name, "device", "ahead") in calls[:at]
            assert calls[at - 1] == ("wait", name)
            if i + 1 < 3:  # the next one was sent ahead before this one's update
                assert ("prefetch", f"buf{i + 1}", "device", "ahead") in calls[:at]
        rec.calls.clear()
        assert opt.page_out() == opt.state_bytes()["paged"] > 0
        assert rec.calls == [("prefetch", f"buf{i}", "host", "now") for i in range(3)] + [("synchronize",)]


def test_arenas_pack_state_in_aligned_disjoint_views():
    rec = RecordingBackend()
    params = _params([5000, 100, 4100, 3000, 70000])
    opt = optim.PagedAdamW(params, page_min_numel=1000, arena_bytes=80_000, paging_backend=rec,
                           state_bits=8, fused=False)
    _grads(params, 0)
    opt.step()
    allocs = [c for c in rec.calls if c[0] == "allocate"]
    # 5000 (8-bit: 2 x 5120 codes + 2 x 256 absmax bytes, padded to 256) and 4100 share an
    # arena, 3000 (32-bit: 2 x 12032) joins them under 80 kB; 70000 (2 x 70144 + 2 x 1280) does not
    assert [a[2] for a in allocs] == [10752 + 9216 + 24064, 142_848]
    spans = []
    for p in params:
        for key, t in opt.state[p].items():
            if key == "step":
                continue
            if p.numel() >= 1000:  # paged: a view 256-byte aligned within its arena
                assert (t.data_ptr() - opt._arena_of[p].buffer.data_ptr()) % 256 == 0
            spans.append((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()))
    spans.sort()
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), "views overlap"
    assert opt.state_bytes()["unpaged"] == 8 * 100


@pytest.mark.parametrize("bits", [32, 8])
def test_paged_state_gives_bit_identical_results(bits):
    runs = []
    for backend in (RecordingBackend(), None):
        params = _params([5000, 300, 7000])
        opt = optim.PagedAdamW(params, lr=1e-2, page_min_numel=1000, arena_bytes=30_000, state_bits=bits,
                               paged=backend is not None, paging_backend=backend, fused=False)
        for step in range(4):
            _grads(params, step)
            opt.step()
            if step == 1:
                opt.page_out()
        runs.append(([p.detach().clone() for p in params], opt.state_dict()["state"]))
    (pa, sa), (pb, sb) = runs
    assert all(torch.equal(a, b) for a, b in zip(pa, pb))
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        assert all(torch.equal(sa[i][k], sb[i][k]) for k in sa[i])


def test_cpu_optimizer_with_paged_true_just_works():
    params = _params([200_000])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = optim.PagedAdamW(params, paged=True, fused=False)
        _grads(params, 0)
        opt.step()
    assert opt.state_bytes() == {"paged": 0, "unpaged": 1_600_000, "total": 1_600_000}
    assert opt.page_out() == 0


def test_wrap_pointer_frees_once_the_last_view_is_gone():
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    freed = []

    def free(ptr):
        freed.append(ptr)
        libc.free(ptr)

    ptr = libc.malloc(4096)
    t = paging.wrap_pointer(ptr, 4096, torch.device("cpu"), free)
    assert t.dtype == torch.uint8 and t.numel() == 4096 and t.data_ptr() == ptr
    view = t[256:512].view(torch.float32)
    view.fill_(1.5)
    del t
    gc.collect()
    assert freed == [] and torch.all(view == 1.5)
    del view
    gc.collect()
    assert freed == [ptr]


class _FakeCudart:
    """Records each runtime call with its ctypes arguments; returns success (or ``fail``)."""

    def __init__(self, version, concurrent=1, fail=None):
        self.version, self.concurrent, self.fail = version, concurrent, fail
        self.calls = []

    def cudaRuntimeGetVersion(self, out):
        out.contents.value = self.version
        return 0

    def cudaDeviceGetAttribute(self, out, attr, device):
        self.calls.append(("attr", attr.value, device.value))
        out.contents.value = self.concurrent if attr.value == cudart.ATTR_CONCURRENT_MANAGED_ACCESS else 1
        return 0

    def cudaMallocManaged(self, out, size, flags):
        self.calls.append(("malloc", size.value, flags.value))
        out.contents.value = 0x7000_0000
        return 2 if self.fail == "malloc" else 0

    def cudaFree(self, ptr):
        self.calls.append(("free", ptr.value))
        return 0

    def cudaMemPrefetchAsync(self, *args):
        self.calls.append(("prefetch",) + args)
        return 0

    def cudaGetErrorString(self, rc):
        return b"out of memory"


class _Lib:
    """Wraps the fake so that ``lib.fn.argtypes = ...`` works as on a ctypes.CDLL."""

    def __init__(self, fake):
        self._fake = fake
        for name in ("cudaRuntimeGetVersion", "cudaDeviceGetAttribute", "cudaMallocManaged", "cudaFree",
                     "cudaMemPrefetchAsync", "cudaGetErrorString"):
            method = getattr(fake, name)
            setattr(self, name, lambda *a, _m=method: _m(*a))


def test_cuda12_prefetch_passes_an_int_device_with_minus_one_for_host():
    fake = _FakeCudart(12080)
    rt = cudart.CudaRuntime(_Lib(fake))
    assert rt.version == 12080 and not rt.location_api
    rt.prefetch(0x1000, 4096, 0, 77)
    rt.prefetch(0x1000, 4096, None, 77)
    (_, p1, n1, d1, s1), (_, _, _, d2, _) = fake.calls
    assert (p1.value, n1.value, s1.value) == (0x1000, 4096, 77)
    assert isinstance(d1, ctypes.c_int) and d1.value == 0 and d2.value == -1


def test_cuda13_prefetch_passes_a_location_struct_and_flags():
    fake = _FakeCudart(13000)
    rt = cudart.CudaRuntime(_Lib(fake))
    assert rt.location_api
    rt.prefetch(0x1000, 4096, 1, 77)
    rt.prefetch(0x1000, 4096, None, 0)
    (_, p1, n1, loc1, flags1, s1), (_, _, _, loc2, _, s2) = fake.calls
    assert isinstance(loc1, cudart.MemLocation)
    assert (loc1.type, loc1.id) == (cudart.LOCATION_DEVICE, 1)
    assert loc2.type == cudart.LOCATION_HOST
    assert flags1.value == 0 and s1.value == 77 and s2.value is None  # NULL = default stream


def test_runtime_allocates_globally_attached_memory_and_reports_errors():
    fake = _FakeCudart(12080)
    rt = cudart.CudaRuntime(_Lib(fake))
    assert rt.malloc_managed(1 << 20) == 0x7000_0000
    assert fake.calls[-1] == ("malloc", 1 << 20, 1)
    assert rt.supports_paging(0)
    fake.concurrent = 0
    assert not rt.supports_paging(0)
    fake.fail = "malloc"
    with pytest.raises(cudart.CudaRuntimeError, match="cudaMallocManaged failed with cudaError 2: out of memory"):
        rt.malloc_managed(1 << 20)
    with pytest.raises(ValueError, match="nbytes must be positive, got 0"):
        rt.malloc_managed(0)


@pytest.mark.parametrize("why", ["no runtime", "no concurrent access"])
def test_unusable_managed_memory_falls_back_with_one_warning(monkeypatch, why):
    monkeypatch.setattr(paging, "_backends", {})
    monkeypatch.setattr(paging, "_warned", set())
    if why == "no runtime":
        def load():
            raise cudart.CudaRuntimeError("no libcudart found")
    else:
        def load():
            return cudart.CudaRuntime(_Lib(_FakeCudart(12080, concurrent=0)))
    monkeypatch.setattr(cudart, "load_runtime", load)
    dev = torch.device("cuda", 0)  # a device object only: nothing touches CUDA
    with pytest.warns(RuntimeWarning, match="unified memory is not usable") as record:
        first = paging.managed_backend(dev)
    assert len(record) == 1
    assert isinstance(first, DeviceBackend) and not first.managed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert paging.managed_backend(dev) is first  # cached, no second warning


def test_importing_does_not_initialise_cuda():
    code = ("import torch, optim, kernels.adamw, optim.paging, optim.cudart; "
            "print(torch.cuda.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU with unified memory")
def test_gpu_state_pages_out_to_host_and_back_bit_identically():
    dev = torch.device("cuda", torch.cuda.current_device())
    backend = paging.managed_backend(dev)
    if not backend.managed:
        pytest.skip("this GPU has no concurrent managed access")
    n = 1 << 22  # 4M parameters -> 32 MiB of 32-bit state; far below free memory
    free, _ = torch.cuda.mem_get_info(dev)
    assert 16 * n < free / 4
    runs = []
    for paged in (True, False):
        params = _params([n, 1000], device=dev)
        opt = optim.PagedAdamW(params, lr=1e-2, paged=paged)
        for step in range(4):
            _grads(params, step)
            opt.step()
            if paged and step == 1:
                torch.cuda.synchronize()
                before, _ = torch.cuda.mem_get_info(dev)
                moved = opt.page_out()
                after, _ = torch.cuda.mem_get_info(dev)
                assert moved >= 8 * n
                # the pages left the GPU: free memory grew by (nearly) the state size
                assert after - before >= 0.9 * 8 * n
        torch.cuda.synchronize()
        runs.append([p.detach().cpu() for p in params])
        if paged:
            assert opt.state_bytes()["paged"] >= 8 * n
            assert isinstance(opt._backend(dev), paging.ManagedBackend)
    assert all(torch.equal(a, b) for a, b in zip(*runs))
