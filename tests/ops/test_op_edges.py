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


@pytest.mark.parametrize("blocksize", [64, 128, 256, 512, 1024, 2048, 4096])
def test_nf4_quantize_takes_every_blocksize_bitsandbytes_stores(blocksize):
    """Each blocksize bitsandbytes writes (64 to 4096) is taken: the reference's codes and absmax."""
    from hoptune.reference import nf4 as ref

    x = torch.randn(2, 4096)
    packed, absmax, bad = nf4_quantize(x, blocksize)
    want_packed, want_absmax = ref.nf4_quantize(x, blocksize)
    assert absmax.shape == (8192 // blocksize,) and int(bad) == 0
    assert torch.equal(packed, want_packed) and torch.equal(absmax, want_absmax)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
def test_nf4_quantize_nested_refuses_what_its_kernel_cannot_read(device):
    """The public nested quantize took any code2, blocksize2 and absmax: the kernel reads 256 code
    values (a shorter code2 was read past its end), a power-of-two blocksize2, and at least one
    block maximum; each is refused by name on every device."""
    from hoptune.ops import nf4_quantize_nested
    from hoptune.reference.nf4 import dynamic_map

    code2, absmax = dynamic_map().to(device), torch.rand(300, device=device)
    for kwargs, msg in (
        (dict(code2=code2[:100]), "code2 must hold the 256 values"),
        (dict(blocksize2=100), "blocksize2 must be one of"),
        (dict(blocksize2=0), "blocksize2 must be one of"),
        (dict(absmax=absmax[:0]), "absmax must hold at least one"),
    ):
        args = dict(absmax=absmax, code2=code2, offset=0.25, blocksize2=256) | kwargs
        with pytest.raises(ValueError, match=msg):
            nf4_quantize_nested(**args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_nf4_quantize_nested_reads_any_float_absmax_as_fp32(device, dtype):
    """absmax in another float dtype is quantized from its fp32 values, as the reference does (the
    kernel read a 16-bit absmax's bytes as fp32: other values, and past its end)."""
    from hoptune.ops import nf4_quantize_nested
    from hoptune.reference import nf4 as ref

    absmax = torch.rand(1000, device=device).to(dtype)
    code2 = ref.dynamic_map()
    qa, a2 = nf4_quantize_nested(absmax, code2.to(device), 0.5, 256)
    want_qa, want_a2 = ref.nf4_quantize_nested(absmax.cpu().float(), code2, 0.5, 256)
    assert torch.equal(qa.cpu(), want_qa) and torch.equal(a2.cpu(), want_a2)


def test_nf4_ops_fake_kernels_match_the_real_outputs():
    """The ops' fake kernels (what torch.compile traces) give the real outputs' shapes and dtypes:
    quantize, nested quantize, dequantize to a 16-bit dtype, and the merged dequantize."""
    from hoptune.quant import quantize_nf4

    w = torch.randn(96, 256, dtype=torch.bfloat16)
    q = quantize_nf4(w, blocksize=64, double_quant=True, blocksize2=32)
    state = (q.packed, q.absmax, q.absmax2, q.code2, q.offset, 64, 32, [96, 256])
    a, b = torch.randn(8, 256, dtype=torch.bfloat16), torch.randn(96, 8, dtype=torch.bfloat16)
    for op, args in (
        (torch.ops.hoptune.nf4_quantize, (w, 64)),
        (torch.ops.hoptune.nf4_quantize_nested, (torch.rand(300), q.code2, 0.25, 256)),
        (torch.ops.hoptune.nf4_dequantize, (*state, torch.bfloat16)),
        (torch.ops.hoptune.nf4_dequantize_lora, (*state, a, b, 0.5)),
    ):
        torch.library.opcheck(op, args, test_utils="test_faketensor")
