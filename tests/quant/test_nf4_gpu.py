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
    import bitsandbytes.functional

    return bitsandbytes.functional


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed >> 4, packed & 15), 1).reshape(-1).long()


def _assert_boundary_cases(scaled, ours, theirs, mids_of, what):
    """Every differing code is a neighbour whose scaled value lies within 2^-20 of the midpoint
    between the two codes: bitsandbytes is built with --use_fast_math, so its 1/absmax is
    rcp.approx (within an ulp or two of ours, which is IEEE division like the CPU reference)."""
    diff = (ours != theirs).nonzero().squeeze(1)
    for i in diff.tolist():
        a, b = int(ours[i]), int(theirs[i])
        assert abs(a - b) == 1, f"{what}[{i}]: codes {a} vs {b} are not neighbours"
        mid = mids_of(min(a, b))
        assert abs(float(scaled[i]) - mid) <= 2**-20, (
            f"{what}[{i}]: {float(scaled[i])!r} is not on the boundary {mid!r}"
        )
    return diff.numel()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_matches_bitsandbytes_cuda(bnbf, dtype, shape):
    w = _weight(shape, dtype)
    qb, st = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    poison_cuda_cache()
    q = quantize_nf4(w, blocksize=64, double_quant=True)
    # fp32 absmax before double quantization, its mean (offset) and the nested scales: identical
    _, st_plain = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    q_plain = quantize_nf4(w, blocksize=64, double_quant=False)
    assert torch.equal(q_plain.absmax, st_plain.absmax)
    assert torch.equal(q_plain.packed, q.packed)
    assert q.offset == st.offset.item()
    assert torch.equal(q.absmax2, st.state2.absmax)

    # 4-bit codes: all-zero blocks follow our convention (code 7, exact zeros; bitsandbytes 0)
    absmax = q_plain.absmax.cpu()
    zero = (absmax == 0).repeat_interleave(64)
    ours, theirs = _nibbles(q.packed.cpu()), _nibbles(qb.view(-1).cpu())
    assert (ours[zero] == 7).all() and (theirs[zero] == 0).all()
    x = w.reshape(-1).float().cpu()
    recip = (1.0 / absmax).repeat_interleave(64)
    mids = ref.nf4_midpoints()
    nz = ~zero
    n_diff = _assert_boundary_cases((x * recip)[nz], ours[nz], theirs[nz], lambda c: float(mids[c]), "code")
    assert 1 - n_diff / x.numel() >= 0.9999, n_diff

    # nested 8-bit codes of the absmax: same, up to the same boundary cases
    code2 = q.code2.cpu()
    centered = absmax - torch.tensor(q.offset)
    scaled2 = centered * (1.0 / q.absmax2.cpu()).repeat_interleave(256)[: absmax.numel()]
    _assert_boundary_cases(
        scaled2,
        q.absmax.cpu().long(),
        st.absmax.cpu().long(),
        lambda c: float((code2[c] + code2[c + 1]) * 0.5),
        "nested code",
    )


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_dequantize_matches_bitsandbytes_cuda(bnbf, out_dtype, nested, blocksize):
    from hoptune.quant import NF4Weight

    for shape in SHAPES:
        if (shape[0] * shape[1]) % blocksize:
            continue  # we require whole blocks (bitsandbytes allows a partial last block)
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
        poison_cuda_cache()
        packed, absmax, bad = nf4_ops.nf4_quantize(w, 64)
        rpacked, rabsmax = ref.nf4_quantize(w.cpu(), 64)
        assert bad.item() == 0
        assert torch.equal(packed.cpu(), rpacked) and torch.equal(absmax.cpu(), rabsmax)
        offset = float(absmax.mean().item())
        code2 = ref.dynamic_map()
        poison_cuda_cache()
        qa, a2 = nf4_ops.nf4_quantize_nested(absmax, code2.cuda(), offset, 256)
        rqa, ra2 = ref.nf4_quantize_nested(absmax.cpu(), code2, offset, 256)
        assert torch.equal(qa.cpu(), rqa) and torch.equal(a2.cpu(), ra2)
        for out in (torch.bfloat16, torch.float16, torch.float32):
            poison_cuda_cache()
            d = nf4_ops.nf4_dequantize(packed, qa, a2, code2.cuda(), offset, 64, 256, list(shape), out)
            rd = ref.nf4_dequantize(rpacked, rqa, ra2, code2, offset, 64, 256, list(shape), out)
            assert torch.equal(d.cpu().view(torch.uint8), rd.view(torch.uint8))


def test_fp64_on_the_gpu_takes_the_reference():
    """The raw ops with fp64 on a GPU (which the kernels do not read) give the CPU reference's
    result, not an error from the kernel's dtype table."""
    w = _weight((96, 200), torch.float64)
    packed, absmax, bad = nf4_ops.nf4_quantize(w, 64)
    rpacked, rabsmax = ref.nf4_quantize(w.cpu(), 64)
    assert packed.is_cuda and bad.item() == 0
    assert torch.equal(packed.cpu(), rpacked) and torch.equal(absmax.cpu(), rabsmax)
    d = nf4_ops.nf4_dequantize(packed, absmax, None, None, 0.0, 64, 256, [96, 200], torch.float64)
    rd = ref.nf4_dequantize(rpacked, rabsmax, None, None, 0.0, 64, 256, [96, 200], torch.float64)
    assert d.is_cuda and d.dtype == torch.float64 and torch.equal(d.cpu(), rd)


@pytest.mark.parametrize("offset", [1, 8])
def test_unaligned_packed_input(offset):
    """A packed tensor at an odd byte offset, or 8 bytes past 16-byte alignment (aligned for
    8-byte loads, not for the kernels' 16-byte ones, which they refuse), goes through an aligned
    copy."""
    w = _weight((256, 512), torch.bfloat16)
    q = quantize_nf4(w)
    base = dequantize_nf4(q)
    buf = torch.empty(q.packed.numel() + offset, dtype=torch.uint8, device="cuda")
    buf[offset:] = q.packed
    assert buf[offset:].data_ptr() % 16 == offset
    poison_cuda_cache()
    d = nf4_ops.nf4_dequantize(
        buf[offset:], q.absmax, q.absmax2, q.code2, q.offset, 64, 256, [256, 512], torch.bfloat16
    )
    assert torch.equal(d, base)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["transposed", "column_slice"])
def test_quantize_non_contiguous_input(dtype, layout):
    """The raw op on a non-contiguous x (a transposed weight; a column slice of a wider one) quantizes
    x in its row-major order, as on x.contiguous() and as the CPU reference, bit for bit: the
    kernel reads a dense row-major block from its pointer, so it must get a contiguous copy.
    (quantize_nf4 refuses such an x; the op itself takes it.)"""
    w = _weight((192, 512), dtype)
    x = w.t() if layout == "transposed" else w[:, :320]
    assert not x.is_contiguous()
    poison_cuda_cache()
    packed, absmax, bad = nf4_ops.nf4_quantize(x, 64)
    cpacked, cabsmax, _ = nf4_ops.nf4_quantize(x.contiguous(), 64)
    rpacked, rabsmax = ref.nf4_quantize(x.cpu(), 64)
    assert bad.item() == 0
    assert torch.equal(packed, cpacked) and torch.equal(absmax, cabsmax)
    assert torch.equal(packed.cpu(), rpacked) and torch.equal(absmax.cpu(), rabsmax)


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


@pytest.mark.parametrize("variant", [1])
def test_dequantize_kernel_versions_agree(variant, monkeypatch):
    """Every numbered dequantize version (bf16 out, nested absmax) equals the default bit for bit."""
    for shape in SHAPES[:4]:
        q = quantize_nf4(_weight(shape, torch.bfloat16, seed=1))
        expected = dequantize_nf4(q)
        monkeypatch.setattr(nf4_ops, "_DEQUANT_VARIANT", variant)
        poison_cuda_cache()
        got = dequantize_nf4(q)
        monkeypatch.setattr(nf4_ops, "_DEQUANT_VARIANT", 0)
        assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8)), (variant, shape)


def test_dequantize_ops_refuse_a_short_absmax_before_the_kernel():
    """A state read with the wrong blocksize is refused on the host: the kernel would read past
    absmax's end (the CPU test covers every mismatch; this one that the check stands first)."""
    q = quantize_nf4(_weight((96, 256), torch.bfloat16), blocksize=64, double_quant=False)
    for bs in (128, 256):
        with pytest.raises(ValueError, match="absmax must have"):
            nf4_ops.nf4_dequantize(q.packed, q.absmax, None, None, 0.0, bs, 256, [96, 256], torch.bfloat16)
    torch.cuda.synchronize()
