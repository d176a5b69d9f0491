"""``nf4.QuantizedTensor`` behaves like a value: ``==`` gives a bool (format fields and every
tensor, nested state included), pickle round-trips, ``copy.copy`` shares storage and
``copy.deepcopy`` does not (what bitsandbytes' tests expect of its ``Params4bit``)."""

import copy
import pickle
from dataclasses import replace

import pytest
import torch

import nf4

TENSORS = ("data", "code", "absmax", "offset", "nested_absmax", "nested_code")


def qt_pair(double_quant=True, quant_type="nf4"):
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(1))
    return nf4.quantize(w, quant_type, 64, double_quant), nf4.quantize(w.clone(), quant_type, 64, double_quant)


@pytest.mark.parametrize("double_quant", [True, False])
def test_equal_quantizations_compare_equal_as_a_bool(double_quant):
    a, b = qt_pair(double_quant)
    assert a is not b and a.data is not b.data
    result = a == b
    assert result is True and (a != b) is False  # a bool, not "ambiguous truth value of a tensor"
    assert a != nf4.quantize(torch.randn(48, 96), "nf4", 64, double_quant)
    assert a != "not a tensor" and (a == 3) is False


@pytest.mark.parametrize("field", TENSORS)
def test_one_changed_tensor_makes_them_different(field):
    a, b = qt_pair()
    t = getattr(b, field).clone()
    t.view(-1)[-1] += 1  # one element (in uint8 codes: one code) differs
    assert a != replace(b, **{field: t})


def test_format_fields_count():
    a, _ = qt_pair()
    assert a != replace(a, dtype=torch.bfloat16)  # the same bytes, another original dtype
    assert a != replace(a, shape=torch.Size([96, 48]))  # the same bytes, another shape
    fp4 = nf4.quantize(a.dequantize(), "fp4")
    assert a != fp4
    plain, nested = qt_pair(False)[0], a
    assert plain != nested and nested != plain  # nested state present on one side only


def test_pickle_round_trips_every_field():
    a, _ = qt_pair()
    b = pickle.loads(pickle.dumps(a))
    assert b == a and b.data is not a.data
    assert (b.shape, b.dtype, b.blocksize, b.quant_type, b.nested_blocksize) == \
        (a.shape, a.dtype, a.blocksize, a.quant_type, a.nested_blocksize)
    assert torch.equal(b.dequantize(), a.dequantize())


def test_unpickling_validates_the_state():
    a, _ = qt_pair()
    state = a.__getstate__()
    state["absmax"] = state["absmax"][:-1]  # one block constant short
    broken = object.__new__(nf4.QuantizedTensor)
    with pytest.raises(ValueError, match="absmax must have 72 entries"):
        broken.__setstate__(state)


def test_copy_shares_storage_and_deepcopy_does_not():
    a, _ = qt_pair()
    shallow, deep = copy.copy(a), copy.deepcopy(a)
    assert shallow is not a and deep is not a and shallow == a and deep == a
    for name in TENSORS:
        assert getattr(shallow, name) is getattr(a, name)
        assert getattr(deep, name).data_ptr() != getattr(a, name).data_ptr()
    deep.data.zero_()  # the deep copy owns its bytes: the original is untouched
    assert deep != a and shallow == a
    shallow.data.zero_()  # the shallow copy shares them
    assert torch.count_nonzero(a.data) == 0


def test_deepcopy_of_a_container_keeps_shared_references_shared():
    a, _ = qt_pair()
    pair = copy.deepcopy([a, a])
    assert pair[0] is pair[1] and pair[0] == a
