"""The ops as a user calls them directly (hoptune.ops), at the edges: arguments the op must refuse
with an error naming them rather than answer silently with part of the input."""

from __future__ import annotations

import pytest
import torch

from hoptune.ops import nf4_quantize


@pytest.mark.parametrize(
    ("numel", "blocksize", "msg"),
    [
        (100, 64, "multiple of blocksize=64"),  # a trailing partial block
        (0, 64, "multiple of blocksize=64"),
        (96, 32, "blocksize must be one of"),
        (96, 48, "blocksize must be one of"),
        (128, 0, "blocksize must be one of"),
    ],
)
def test_nf4_quantize_refuses_blocks_it_cannot_store(numel, blocksize, msg):
    with pytest.raises(ValueError, match=msg):
        nf4_quantize(torch.randn(numel), blocksize)


def test_nf4_quantize_takes_whole_blocks():
    packed, absmax, bad = nf4_quantize(torch.randn(3, 128), 128)
    assert packed.shape == (192,) and absmax.shape == (3,) and int(bad) == 0


def test_nf4_quantize_blocksizes_match_quantize_nf4():
    from hoptune.ops import nf4 as nf4_ops
    from hoptune.quant.nf4 import BLOCKSIZES

    assert nf4_ops.QUANT_BLOCKSIZES == BLOCKSIZES
