"""NF4 kernels on the GPU: bitsandbytes' CUDA path is the reference (users' checkpoints come from
it), and our CUDA kernels equal our CPU reference bit for bit."""

from __future__ import annotations

import pytest
import torch

from hoptune.ops import nf4 as nf4_ops
from hoptune.quant import dequantize_nf4, quantize_nf4
from hoptune.reference import nf4 as ref
from tests.conftest import poison_cuda_cache

pytestmark = pytest.mark.gpu

SHAPES = [(4096, 4096), (96, 200), (333, 64), (1000, 4160), (14336, 4096)]


def _weight(shape, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = (torch.randn(shape, generator=g, device="cuda") * 0.02).to(dtype)
    w.view(-1)[64:128] = 0  # an all-zero block
    if shape[0] > 8:
        w[7] = 0  # an all-zero row
    w.view(-1)[200] = 3.0  # an outlier block
    return w


@pytest.fixture(scope="module")
def bnbf():
    return pytest.importorskip("bitsandbytes.functional")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_matches_bitsandbytes_cuda(bnbf, dtype, shape):
    w = _weight(shape, dtype)
    qb, st = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    poison_cuda_cache()
    q = quantize_nf4(w, blocksize=64, double_quant=True)
    # offset, nested scales and nested codes: identical (same absmax, same torch mean on CUDA)
    assert q.offset == st.offset.item()
    assert torch.equal(q.absmax2, st.state2.absmax)
    assert torch.equal(q.absmax, st.absmax)
    # codes: identical except in all-zero blocks, where we store 0.0 (see nf4.cuh)
    qb_flat = qb.view(-1)
    same = q.packed == qb_flat
    zero_blocks = (w.reshape(-1, 64) == 0).all(1).repeat_interleave(32)
    frac = same.float().mean().item()
    assert frac >= 0.9999 or zero_blocks.float().mean().item() > 1e-4, frac
    assert same[~zero_blocks].all(), (
        f"{int((~same[~zero_blocks]).sum())} codes differ outside all-zero blocks"
    )
    assert (qb_flat[zero_blocks] == 0x00).all() and (q.packed[zero_blocks] == 0x77).all()
    # non-nested absmax equals bitsandbytes' too
    _, st2 = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    q2 = quantize_nf4(w, blocksize=64, double_quant=False)
    assert torch.equal(q2.absmax, st2.absmax)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_dequantize_matches_bitsandbytes_cuda(bnbf, out_dtype, nested, blocksize):
    from hoptune.quant import NF4Weight

    for shape in SHAPES:
        w = _weight(shape, torch.bfloat16)
        qb, st = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")
        st.dtype = out_dtype
        expected = bnbf.dequantize_4bit(qb, st)
        if nested:
            q = NF4Weight(
                qb.view(-1),
                st.absmax,
                torch.Size(shape),
                out_dtype,
                blocksize,
                st.state2.absmax,
                st.state2.code,
                st.offset.item(),
                st.state2.blocksize,
            )
        else:
            q = NF4Weight(qb.view(-1), st.absmax, torch.Size(shape), out_dtype, blocksize)
        poison_cuda_cache()
        ours = dequantize_nf4(q)
        assert torch.equal(ours.view(torch.uint8), expected.view(torch.uint8)), (shape, out_dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_equals_cpu_reference(dtype):
    for shape in SHAPES[:4]:
        w = _weight(shape, dtype)
        packed, absmax, bad = nf4_ops.nf4_quantize(w, 64)
        rpacked, rabsmax = ref.nf4_quantize(w.cpu(), 64)
        assert bad.item() == 0
        assert torch.equal(packed.cpu(), rpacked) and torch.equal(absmax.cpu(), rabsmax)
        offset = float(absmax.mean().item())
        code2 = ref.dynamic_map()
        qa, a2 = nf4_ops.nf4_quantize_nested(absmax, code2.cuda(), offset, 256)
        rqa, ra2 = ref.nf4_quantize_nested(absmax.cpu(), code2, offset, 256)
        assert torch.equal(qa.cpu(), rqa) and torch.equal(a2.cpu(), ra2)
        for out in (torch.bfloat16, torch.float16, torch.float32):
            d = nf4_ops.nf4_dequantize(packed, qa, a2, code2.cuda(), offset, 64, 256, list(shape), out)
            rd = ref.nf4_dequantize(rpacked, rqa, ra2, code2, offset, 64, 256, list(shape), out)
            assert torch.equal(d.cpu().view(torch.uint8), rd.view(torch.uint8))


def test_unaligned_and_strided_inputs():
    w = _weight((256, 512), torch.bfloat16)
    q = quantize_nf4(w)
    base = dequantize_nf4(q)
    # a packed tensor at an odd byte offset goes through an aligned copy
    buf = torch.empty(q.packed.numel() + 1, dtype=torch.uint8, device="cuda")
    buf[1:] = q.packed
    d = nf4_ops.nf4_dequantize(
        buf[1:], q.absmax, q.absmax2, q.code2, q.offset, 64, 256, [256, 512], torch.bfloat16
    )
    assert torch.equal(d, base)


def test_large_index_no_overflow():
    """More than 2^31 elements: 64-bit indexing in both kernels (blocks past 2^25 are checked)."""
    n = (1 << 31) + (1 << 20)
    w = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    w.normal_(0, 0.02)
    tail = w[-(1 << 20) :].clone()
    q = quantize_nf4(w, double_quant=False)  # blocks are independent without the nested mean
    d = dequantize_nf4(q)
    assert torch.equal(d[-(1 << 20) :], dequantize_nf4(quantize_nf4(tail, double_quant=False)))
    del w, d, q
    torch.cuda.empty_cache()


def test_non_finite_detected_on_gpu():
    w = _weight((64, 128), torch.bfloat16)
    w[5, 3] = float("nan")
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_nf4(w)
