"""Storage: bitsandbytes' serialized layout, both directions, and files that must be refused."""

import json
import struct

import pytest
import torch

import nf4
from nf4.storage import QUANT_STATE_TAG


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip(quant_type, double_quant, dtype):
    qt = nf4.quantize(torch.randn(37, 129).to(dtype), quant_type, 64, double_quant)
    back = nf4.QuantizedTensor.from_bnb_state_dict(qt.to_bnb_state_dict("w"), "w")
    assert torch.equal(back.dequantize(), qt.dequantize())
    assert back.shape == qt.shape and back.dtype == qt.dtype and back.nested == qt.nested


def test_keys_and_json_match_the_notes_example():
    qt = nf4.quantize(torch.randn(3, 100, dtype=torch.bfloat16))
    sd = qt.to_bnb_state_dict("weight")
    assert set(sd) == {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                       "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"}
    meta = json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert list(meta) == ["quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype",
                          "nested_offset"]
    assert meta["dtype"] == "bfloat16" and meta["shape"] == [3, 100] and meta["nested_blocksize"] == 256
    assert sd["weight"].shape == (150, 1) and sd["weight.absmax"].dtype == torch.uint8


def test_int4_has_no_bitsandbytes_layout():
    with pytest.raises(ValueError, match="int4"):
        nf4.quantize(torch.randn(64), "int4").to_bnb_state_dict()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_export_loads_into_ours_and_ours_into_bitsandbytes(quant_type, double_quant):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(33, 70, dtype=torch.bfloat16)
    q, s = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
    theirs = {"weight": q, **{f"weight.{k}": v for k, v in s.as_dict(packed=True).items()}}
    ours = nf4.quantize(w, quant_type, 64, double_quant).to_bnb_state_dict("weight")
    # identical keys, identical tensors, identical JSON bytes
    assert set(theirs) == set(ours)
    for k in theirs:
        assert torch.equal(theirs[k], ours[k]), k
    # ours -> bitsandbytes
    qs = bnbf.QuantState.from_dict({k[len("weight."):]: v for k, v in ours.items() if k != "weight"}, device="cpu")
    assert torch.equal(bnbf.dequantize_4bit(ours["weight"], qs), nf4.QuantizedTensor.from_bnb_state_dict(ours).dequantize())
    # bitsandbytes -> ours
    assert torch.equal(nf4.QuantizedTensor.from_bnb_state_dict(theirs).dequantize(), bnbf.dequantize_4bit(q, s))


def test_transformers_save_pretrained_loads_bit_identically(tmp_path):
    transformers = pytest.importorskip("transformers")
    bnbf = pytest.importorskip("bitsandbytes.functional")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "fp")
    qcfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=qcfg,
                                                              device_map="cpu")
    model.save_pretrained(tmp_path / "q4")
    loaded = nf4.load_file(tmp_path / "q4" / "model.safetensors")
    quantized = {k: v for k, v in loaded.items() if isinstance(v, nf4.QuantizedTensor)}
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down per layer
    modules = dict(model.named_modules())
    for name, qt in quantized.items():
        param = modules[name[: -len(".weight")]].weight
        assert qt.nested and qt.quant_type == "nf4"
        ref = bnbf.dequantize_4bit(param.data, param.quant_state)
        assert torch.equal(qt.dequantize(ref.dtype), ref), name
    plain = [k for k, v in loaded.items() if isinstance(v, torch.Tensor)]
    assert any("embed_tokens" in k for k in plain) and any("norm" in k for k in plain)


def test_save_and_load_mixed_file(tmp_path):
    qt = nf4.quantize(torch.randn(64, 96))
    bias = torch.randn(64)
    nf4.save_file({"layer.weight": qt, "layer.bias": bias}, tmp_path / "m.safetensors")
    back = nf4.load_file(tmp_path / "m.safetensors")
    assert set(back) == {"layer.weight", "layer.bias"}
    assert torch.equal(back["layer.bias"], bias)
    assert torch.equal(back["layer.weight"].dequantize(), qt.dequantize())


# ---- bad files: every one is a ValueError naming the key; nothing is ever unpickled -------

def _write(tmp_path, sd):
    from safetensors.torch import save_file

    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def _good_sd():
    return nf4.quantize(torch.randn(16, 64)).to_bnb_state_dict("layer.weight")


def test_truncated_file_names_the_key(tmp_path):
    path = _write(tmp_path, _good_sd())
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(ValueError, match="truncated"):
        nf4.load_file(path)


def test_malformed_json_names_the_key(tmp_path):
    sd = _good_sd()
    key = f"layer.weight.{QUANT_STATE_TAG}nf4"
    sd[key] = torch.tensor(list(b'{"quant_type": "nf4", '), dtype=torch.uint8)
    with pytest.raises(ValueError, match="malformed JSON") as e:
        nf4.load_file(_write(tmp_path, sd))
    assert key in str(e.value)


@pytest.mark.parametrize("field", ["blocksize", "shape", "quant_type", "dtype"])
def test_missing_json_field_names_it(tmp_path, field):
    sd = _good_sd()
    key = f"layer.weight.{QUANT_STATE_TAG}nf4"
    meta = json.loads(bytes(sd[key].tolist()))
    del meta[field]
    sd[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match=field):
        nf4.load_file(_write(tmp_path, sd))


def test_inconsistent_shapes_name_the_key(tmp_path):
    sd = _good_sd()
    sd["layer.weight.absmax"] = sd["layer.weight.absmax"][:-1]
    with pytest.raises(ValueError, match="layer.weight.absmax"):
        nf4.load_file(_write(tmp_path, sd))
    sd = _good_sd()
    key = f"layer.weight.{QUANT_STATE_TAG}nf4"
    meta = json.loads(bytes(sd[key].tolist()))
    meta["shape"] = [16, 65]
    sd[key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="'layer.weight'"):
        nf4.load_file(_write(tmp_path, sd))


def test_unknown_quant_type_is_refused(tmp_path):
    sd = _good_sd()
    key = f"layer.weight.{QUANT_STATE_TAG}nf4"
    meta = json.loads(bytes(sd.pop(key).tolist()))
    meta["quant_type"] = "nf5"
    sd[f"layer.weight.{QUANT_STATE_TAG}nf5"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="nf5"):
        nf4.load_file(_write(tmp_path, sd))


def test_a_pickle_is_never_unpickled(tmp_path):
    path = tmp_path / "evil.safetensors"
    torch.save({"weight": torch.randn(3)}, path)  # a zip/pickle file, not safetensors
    with pytest.raises(ValueError):
        nf4.load_file(path)


def test_header_with_bad_offsets_names_the_key(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(ValueError, match="'w'"):
        nf4.load_file(path)
