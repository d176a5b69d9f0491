"""Checkpoints: plain CPU state dicts, bit-identical resume, torch.optim.AdamW interchange,
32 <-> 8-bit conversion, and loud failures that leave the optimizer untouched."""

import copy
import io

import pytest
import torch

import optim
from kernels.adamw import dequantize_state_8bit, quantize_state_8bit
from optim.paging import RecordingBackend



F = torch.nn.functional


def _model(device, seed=1):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 160), torch.nn.Tanh(), torch.nn.Linear(160, 8)).to(device)


def _batches(device, n=10):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 32, generator=gen).to(device), torch.randn(16, 8, generator=gen).to(device))
            for _ in range(n)]


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _make(model, device, bits, paged, **kw):
    backend = RecordingBackend() if (paged and device.type == "cpu") else None
    return optim.PagedAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, state_bits=bits, paged=paged,
                            page_min_numel=1000, paging_backend=backend,
                            fused=None if device.type == "cuda" else False, **kw)


@pytest.mark.parametrize("bits", [32, 8])
def test_state_dict_holds_plain_cpu_copies(device, bits):
    model = _model(device)
    opt = _make(model, device, bits, paged=True)
    _train(model, opt, _batches(device, 2))
    sd = opt.state_dict()
    live = [v.data_ptr() for st in opt.state.values() for v in st.values()]
    for st in sd["state"].values():
        for t in st.values():
            assert t.device.type == "cpu" and t.is_contiguous() and t.data_ptr() not in live
    big = sd["state"][0]  # the 32 x 160 weight: 5120 elements
    if bits == 8:
        assert big["exp_avg_codes"].dtype == torch.uint8 and big["exp_avg_codes"].shape == (160, 32)
        assert big["exp_avg_absmax"].shape == (20,)
    else:
        assert big["exp_avg"].dtype == torch.float32 and big["exp_avg"].shape == (160, 32)
    before = opt.state[list(model.parameters())[0]]["step"].clone()
    big["step"].add_(5)  # editing the copy leaves the optimizer alone
    assert torch.equal(opt.state[list(model.parameters())[0]]["step"], before)


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("paged", [True, False])
def test_resume_mid_training_is_bit_identical(device, bits, paged):
    batches = _batches(device)
    model_a = _model(device)
    opt_a = _make(model_a, device, bits, paged)
    _train(model_a, opt_a, batches)

    model_b = _model(device)
    opt_b = _make(model_b, device, bits, paged)
    _train(model_b, opt_b, batches[:4])
    saved_model, saved_opt = _roundtrip(model_b.state_dict()), _roundtrip(opt_b.state_dict())
    del model_b, opt_b

    model_c = _model(device, seed=7)  # different init: everything must come from the checkpoint
    model_c.load_state_dict(saved_model)
    opt_c = _make(model_c, device, bits, paged)
    opt_c.load_state_dict(saved_opt)
    _train(model_c, opt_c, batches[4:])
    for a, c in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(a, c)
    sa, sc = opt_a.state_dict(), opt_c.state_dict()
    for i in sa["state"]:
        assert all(torch.equal(sa["state"][i][k], sc["state"][i][k]) for k in sa["state"][i])


def _linear_pair(device):
    torch.manual_seed(3)
    a = torch.nn.Linear(32, 8).to(device)
    b = torch.nn.Linear(32, 8).to(device)
    b.load_state_dict(a.state_dict())
    return a, b


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_torch_adamw_state_dict_loads_into_paged_adamw(device):
    batches = _batches(device, 20)
    ref_m, ours_m = _linear_pair(device)
    ref = torch.optim.AdamW(ref_m.parameters(), lr=3e-3, weight_decay=0.1)
    _train(ref_m, ref, batches[:10])
    ours_m.load_state_dict(ref_m.state_dict())
    ours = optim.PagedAdamW(ours_m.parameters(), lr=1.0, weight_decay=0.0, state_bits=32,
                            fused=None if device.type == "cuda" else False)
    ours.load_state_dict(_roundtrip(ref.state_dict()))
    assert ours.param_groups[0]["lr"] == 3e-3 and ours.param_groups[0]["weight_decay"] == 0.1
    assert "amsgrad" not in ours.param_groups[0]
    assert float(ours.state[ours_m.weight]["step"]) == 10.0
    _train(ref_m, ref, batches[10:])
    _train(ours_m, ours, batches[10:])
    for a, b in zip(ours_m.parameters(), ref_m.parameters()):
        assert _rel(a.detach(), b.detach()) <= 1e-6


def test_paged_adamw_state_dict_loads_into_torch_adamw(device):
    batches = _batches(device, 20)
    ours_m, ref_m = _linear_pair(device)
    ours = optim.PagedAdamW(ours_m.parameters(), lr=3e-3, weight_decay=0.1, state_bits=32,
                            fused=None if device.type == "cuda" else False)
    _train(ours_m, ours, batches[:10])
    ref_m.load_state_dict(ours_m.state_dict())
    ref = torch.optim.AdamW(ref_m.parameters(), lr=1.0, weight_decay=0.0)
    ref.load_state_dict(_roundtrip(ours.state_dict()))
    assert ref.param_groups[0]["lr"] == 3e-3
    assert ref.state[ref_m.weight]["exp_avg"].device == ref_m.weight.device
    _train(ours_m, ours, batches[10:])
    _train(ref_m, ref, batches[10:])
    for a, b in zip(ours_m.parameters(), ref_m.parameters()):
        assert _rel(a.detach(), b.detach()) <= 1e-6


def test_state_converts_between_32_and_8_bit_on_load():
    model = _model("cpu")
    opt32 = optim.PagedAdamW(model.parameters(), state_bits=32, fused=False)
    _train(model, opt32, _batches("cpu", 3))
    sd32 = opt32.state_dict()
    opt8 = optim.PagedAdamW(model.parameters(), state_bits=8, fused=False)
    opt8.load_state_dict(sd32)
    w = model[0].weight
    codes, absmax = quantize_state_8bit(sd32["state"][0]["exp_avg"], True)
    assert torch.equal(opt8.state[w]["exp_avg_codes"], codes)
    assert torch.equal(opt8.state[w]["exp_avg_absmax"], absmax)
    assert "exp_avg" in opt8.state[model[0].bias]  # 160 elements: stays 32-bit
    back = optim.PagedAdamW(model.parameters(), state_bits=32, fused=False)
    back.load_state_dict(opt8.state_dict())
    st8 = opt8.state[w]
    assert torch.equal(back.state[w]["exp_avg_sq"],
                       dequantize_state_8bit(st8["exp_avg_sq_codes"], st8["exp_avg_sq_absmax"], False))


def test_lr_scheduler_keys_survive_a_round_trip():
    model = _model("cpu")
    opt = optim.PagedAdamW(model.parameters(), lr=1e-2, fused=False)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for batch in _batches("cpu", 3):
        _train(model, opt, [batch])
        sched.step()
    sd = opt.state_dict()
    opt2 = optim.PagedAdamW(model.parameters(), lr=1e-2, fused=False)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["initial_lr"] == 1e-2
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 5e-3


def test_bad_state_dicts_fail_loudly_and_change_nothing():
    model = _model("cpu")
    opt = optim.PagedAdamW(model.parameters(), lr=1e-2, fused=False)
    _train(model, opt, _batches("cpu", 2))
    good = opt.state_dict()
    snapshot = opt.state_dict()

    def broken(edit):
        sd = _roundtrip(good)
        edit(sd)
        return sd

    cases = [
        (lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0])), "different number of parameter groups"),
        (lambda sd: sd["param_groups"][0]["params"].pop(), "doesn't match the size"),
        (lambda sd: sd["param_groups"][0].update(amsgrad=True), "amsgrad=True"),
        (lambda sd: sd["param_groups"][0].update(lr=-1.0), "Invalid learning rate: -1.0"),
        (lambda sd: sd["state"][1].update(exp_avg=torch.zeros(3)), r"state\[1\]: exp_avg has shape \(3,\)"),
        (lambda sd: sd["state"][2].pop("step"), r"state\[2\] has no 'step'"),
        (lambda sd: sd["state"][0].pop("exp_avg_sq"), r"state\[0\]: saved state has keys"),
        (lambda sd: sd["state"].update({99: sd["state"][0]}), "parameter id 99 matches no parameter"),
    ]
    for edit, match in cases:
        with pytest.raises(ValueError, match=match):
            opt.load_state_dict(broken(edit))
        now = opt.state_dict()
        assert now["param_groups"] == snapshot["param_groups"]
        for i in snapshot["state"]:
            assert all(torch.equal(now["state"][i][k], snapshot["state"][i][k]) for k in snapshot["state"][i])


def test_deepcopy_keeps_configuration_and_state():
    model = _model("cpu")
    opt = _make(model, torch.device("cpu"), 8, paged=True, skip_nonfinite=True)
    _train(model, opt, _batches("cpu", 2))
    twin = copy.deepcopy({"model": model, "opt": opt})  # the copy's optimizer holds the copy's params
    assert (twin["opt"].state_bits, twin["opt"].skip_nonfinite, twin["opt"].page_min_numel) == (8, True, 1000)
    more = _batches("cpu", 5)[2:]
    _train(model, opt, more)
    _train(twin["model"], twin["opt"], more)
    for a, b in zip(model.parameters(), twin["model"].parameters()):
        assert torch.equal(a, b)
