"""NF4Linear's state dict: NF4 buffers load only as they were saved (their dtypes are the format)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hoptune.nn import NF4Linear


def _layer(seed, double_quant=True):
    torch.manual_seed(seed)
    return NF4Linear.from_linear(nn.Linear(128, 64).to(torch.bfloat16), double_quant=double_quant)


@pytest.mark.parametrize("double_quant", [True, False])
def test_state_dict_round_trip(double_quant):
    src, dst = _layer(0, double_quant), _layer(1, double_quant)
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.dequantize(), src.dequantize())


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("src_dq", [True, False])
def test_other_nesting_is_refused_not_converted(strict, src_dq):
    # uint8 absmax codes copied into a float32 absmax (or float32 statistics truncated to uint8)
    # used to load without an error under strict=False and give other weights
    src, dst = _layer(0, src_dq), _layer(1, not src_dq)
    before = dst.weight_absmax.clone()
    with pytest.raises(RuntimeError, match=r"weight_absmax: the state dict holds torch\.(uint8|float32)"):
        dst.load_state_dict(src.state_dict(), strict=strict)
    assert torch.equal(dst.weight_absmax, before) and dst.weight_absmax.dtype == before.dtype


def test_cast_statistics_are_refused():
    src, dst = _layer(0, double_quant=False), _layer(1, double_quant=False)
    sd = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in src.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"weight_absmax: the state dict holds torch\.bfloat16"):
        dst.load_state_dict(sd)
    dst.load_state_dict({k: v.to(torch.float32) if k == "bias" else v for k, v in src.state_dict().items()})
    assert torch.equal(dst.dequantize(), src.dequantize())  # the bias converts as usual
