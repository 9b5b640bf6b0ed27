"""The shared argument checks (hoptune.ops._check) that the ops, the layers, the loader and the
config use: what each takes, and what each refuses with a message naming the argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hoptune.ops import _check


@pytest.mark.parametrize(
    "value", [2, 2.5, np.float32(2.5), np.int64(3), torch.tensor(1.5), torch.tensor([4])]
)
def test_real_takes_numbers_and_one_element_tensors(value):
    assert _check.real("lr", value) == float(value)


@pytest.mark.parametrize(
    "value", ["2", b"2", True, np.bool_(True), torch.tensor(True), None, [1.0], torch.ones(2)]
)
def test_real_refuses_strings_bools_and_non_numbers_naming_the_argument(value):
    # float() would read '2' and True as numbers
    with pytest.raises(TypeError, match=r"^lr must be a real number \(or None\), got "):
        _check.real("lr", value, " (or None)")


@pytest.mark.parametrize("value", [3, np.int64(3), np.uint8(3), torch.tensor(3)])
def test_integer_takes_python_numpy_and_tensor_integers(value):
    got = _check.integer("steps", value)
    assert got == 3 and type(got) is int


@pytest.mark.parametrize("value", [3.0, np.float64(3.0), True, np.bool_(False), torch.tensor(True), "3"])
def test_integer_refuses_floats_and_bools_not_truncating_them(value):
    with pytest.raises(TypeError, match=r"^steps must be an integer, got "):
        _check.integer("steps", value)


@pytest.mark.parametrize(
    "value, want",
    [
        ("bf16", torch.bfloat16),
        ("float16", torch.float16),
        ("fp32", torch.float32),
        (torch.bfloat16, torch.bfloat16),
    ],
)
def test_float_dtype_takes_the_three_dtypes_and_their_names(value, want):
    assert _check.float_dtype("dtype", value) is want
    assert _check.float_dtype("dtype", None, none=True) is None


@pytest.mark.parametrize("value", [torch.float64, torch.int8, "float64", "bfloat", None])
def test_float_dtype_refuses_other_dtypes_naming_the_argument(value):
    with pytest.raises(TypeError, match=r"^dtype must be torch.float32, torch.bfloat16 or torch.float16"):
        _check.float_dtype("dtype", value)


def test_same_device_names_the_tensors_off_the_device_most_are_on():
    cpu, meta = torch.zeros(1), torch.zeros(1, device="meta")
    assert _check.same_device(a=cpu, b=None, c=cpu) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"a on meta, b on cpu, c on cpu \(a differs\)"):
        _check.same_device(a=meta, b=cpu, c=cpu)
    with pytest.raises(ValueError, match=r"\(b, c differ\)"):
        _check.same_device(a=cpu, b=meta, c=meta, d=cpu, e=cpu)
