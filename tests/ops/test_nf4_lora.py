"""nf4_lora_linear: output and gradients against an fp32 computation on the dequantized weight.
Rule (STYLE.md): our error is at most 2x the error of the same computation done by PyTorch in
the input precision (plus 1e-6 for fp32 round-off)."""

from __future__ import annotations

import pytest
import torch

from hoptune.ops import nf4 as nf4_ops
from hoptune.ops import nf4_lora as nf4_lora_ops
from hoptune.ops import nf4_lora_linear
from hoptune.quant import dequantize_nf4, quantize_nf4
from hoptune.reference import nf4 as ref_nf4
from tests.conftest import poison_cuda_cache, rel_err

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _case(m, k, n, r, dtype, device, seed, bias=True, x_shape=None):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * k**-0.5
    x = torch.randn(*(x_shape or (m,)), k, generator=g)
    a = torch.randn(r, k, generator=g) * k**-0.5
    b = torch.randn(n, r, generator=g) * r**-0.5
    bb = torch.randn(n, generator=g) if bias else None
    q = quantize_nf4(w.to(dtype).to(device))
    cast = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return x.to(dtype).to(device), q, cast(a), cast(b), cast(bb)


def _run(fn, x, a, b, g):
    # (x's own strides, gaps included: .clone() of a strided view gives a contiguous tensor)
    x = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device).copy_(x)
    x.requires_grad_(True)
    a = a.detach().clone().requires_grad_(True)
    b = b.detach().clone().requires_grad_(True)
    y = fn(x, a, b)
    y.backward(g)
    return y.detach(), x.grad, a.grad, b.grad


def _compare(ours, ref, low, dtype, names=("y", "dx", "dA", "dB")):
    """y and the gradients: our error against the float64 result at most 2x torch's in dtype."""
    for name, o, r_, lo in zip(names, ours, ref, low):
        assert o.dtype == dtype and o.shape == r_.shape, name
        assert torch.isfinite(o).all(), name
        e_ours, e_low = rel_err(o, r_), rel_err(lo, r_)
        assert e_ours <= 2 * e_low + 1e-6, f"{name}: ours {e_ours:.3g} vs torch {dtype} {e_low:.3g}"


def _compare_to_plain(ours, x, a, b, gy, deq, bias, dtype):
    """ours (y and the gradients of s = 0.75 LoRA on deq with bias) by the STYLE rule against the
    same computation in float64 and in dtype."""

    def plain(x_, a_, b_, dt):
        y = x_.to(dt) @ deq.to(dt).t() + 0.75 * (x_.to(dt) @ a_.to(dt).t()) @ b_.to(dt).t()
        return y + bias.to(dt)

    ref = _run(
        lambda x_, a_, b_: plain(x_, a_, b_, torch.float64), x.double(), a.double(), b.double(), gy.double()
    )
    low = _run(lambda x_, a_, b_: plain(x_, a_, b_, dtype), x, a, b, gy)
    _compare(ours, ref, low, dtype)


def _check(m, k, n, r, dtype, device, seed, x_shape=None, noncontig=False, scale=0.75, bias=True):
    x, q, a, b, bias = _case(m, k, n, r, dtype, device, seed, bias=bias, x_shape=x_shape)
    if noncontig:  # a strided view of a wider buffer
        wide = torch.randn(*x.shape[:-1], 2 * k, dtype=dtype, device=device)
        wide[..., ::2] = x
        x = wide[..., ::2]
        assert not x.is_contiguous()
    w = dequantize_nf4(q)
    g = torch.randn(*x.shape[:-1], n, dtype=dtype, device=device)
    if noncontig:  # the upstream gradient strided too
        g = torch.randn(*x.shape[:-1], 2 * n, dtype=dtype, device=device)[..., ::2]
        assert not g.is_contiguous()
    if device == "cuda":
        poison_cuda_cache()
    ours = _run(lambda x_, a_, b_: nf4_lora_linear(x_, q, a_, b_, scale, bias), x, a, b, g)

    def plain(x_, a_, b_, dt):
        bb = None if bias is None else bias.to(dt)
        y = x_.to(dt) @ w.to(dt).t() + scale * (x_.to(dt) @ a_.to(dt).t()) @ b_.to(dt).t()
        return y if bb is None else y + bb

    ref = _run(
        lambda x_, a_, b_: plain(x_, a_, b_, torch.float64), x.double(), a.double(), b.double(), g.double()
    )
    low = _run(lambda x_, a_, b_: plain(x_, a_, b_, dtype), x, a, b, g)
    _compare(ours, ref, low, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [1, 7, 128, 1000])
@pytest.mark.parametrize("k,n", [(256, 384), (320, 200)])  # 200: N not a multiple of 128
@pytest.mark.parametrize("r", [8, 16, 64])
def test_matches_reference(device, m, k, n, r):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    _check(m, k, n, r, dtype, device, seed=m * 7 + r)


@pytest.mark.gpu
# 64: dB from a cuBLAS GEMM, not the dY pass; 128: the merged weight from 32-column pieces;
# 256: the LoRA terms on the activations (above MERGED_MAX_RANK)
@pytest.mark.parametrize("r", [16, 64, 128, 256])
@pytest.mark.parametrize("k,n", [(4096, 4096), (4096, 14336), (14336, 4096)])
def test_large_m_gpu(k, n, r):
    _check(8192, k, n, r, torch.bfloat16, "cuda", seed=1)


# every path of the op: (m, k, n, r)
_SCALE_PATHS = [
    (8, 320, 200, 16),  # a few rows: from the codes
    (100, 256, 384, 16),  # dX unmerged (N > 2 M): dxa and dB from the dY pass
    (2100, 256, 384, 16),  # the merged weight
    (1000, 1024, 1024, 16),  # dA and dB from the one-pass kernel (K == N, r = 16)
    (2100, 256, 384, 256),  # the LoRA terms on the activations (r above MERGED_MAX_RANK)
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", [-1.5, 0.0])
@pytest.mark.parametrize("m,k,n,r", _SCALE_PATHS)
def test_negative_and_zero_scale(device, scale, m, k, n, r):
    """Any finite scale, as PEFT takes any lora_alpha: a negative one negates the LoRA term, 0 turns
    it off (dA and dB then exactly zero: the rule's tolerance is 0 against a zero reference)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    _check(m, k, n, r, dtype, device, seed=m + r, scale=scale)


@pytest.mark.gpu
@pytest.mark.parametrize("scale", [-1.5, 0.0])
def test_negative_and_zero_scale_fused_gpu(scale):
    """The same on the fused NF4 GEMM (the codes decoded in its mainloop)."""
    x, q, *_ = _case(64, 4096, 8192, 16, torch.bfloat16, "cuda", seed=2)
    assert nf4_ops.fused_gemm_runs(x, 8192, q.blocksize)  # (the path this test is for)
    _check(64, 4096, 8192, 16, torch.bfloat16, "cuda", seed=2, scale=scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [1, 7, 128, 1000, 4096])
@pytest.mark.parametrize("k,n,r", [(64, 48, 80), (128, 96, 256), (192, 576, 256), (576, 192, 200)])
def test_rank_above_the_layer(device, m, k, n, r):
    """A rank above min(K, N), which PEFT trains and load_adapter therefore takes (SmolLM2-135M's
    k_proj is [192, 576]): every path (from the codes, merged, fused, on the activations)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    _check(m, k, n, r, dtype, device, seed=m + r)


@pytest.mark.gpu
@pytest.mark.parametrize("r", [1, 12, 15, 100, 250])
@pytest.mark.parametrize(
    "m,k,n",
    [
        (8, 320, 200),  # a few rows: from the codes (nf4_small_m)
        (64, 4096, 8192),  # the fused GEMM (a weight of 2^25 elements)
        (2100, 256, 384),  # the merged weight (or the terms on the activations above 128)
    ],
)
def test_ranks_padded_to_multiple_of_8(m, k, n, r, monkeypatch):
    """On the GPU a rank that is not a multiple of 8 reaches every kernel and GEMM padded with zero
    ranks; output and the gradients of the given (unpadded) factors by the STYLE rule."""
    ranks = []
    real = nf4_lora_ops._aligned_rank

    def spy(a, b):
        a8, b8 = real(a, b)
        ranks.append((a8.shape[0], b8.shape[1]))
        return a8, b8

    monkeypatch.setattr(nf4_lora_ops, "_aligned_rank", spy)
    _check(m, k, n, r, torch.bfloat16, "cuda", seed=m + r)  # (checks the gradients' shapes too)
    r8 = -(-r // 8) * 8
    assert ranks and set(ranks) == {(r8, r8)}


@pytest.mark.gpu
@pytest.mark.parametrize("r", [1, 15])
def test_fused_gemm_pads_odd_ranks_without_grad(r, monkeypatch):
    """Without grad (not padded at the op) an odd rank still takes the fused GEMM, padded with zero
    ranks (the kernel reads B's rows in pairs); the output by the STYLE rule."""
    m, k, n = 64, 4096, 8192
    x, q, a, b, bias = _case(m, k, n, r, torch.bfloat16, "cuda", seed=r)
    ranks = []
    real = nf4_ops.fused_gemm_kernel

    def spy(*args, **kwargs):
        ranks.append(args[10].shape[1])  # (x2, 7 NF4 state fields, N, xs, lora_B, bias)
        return real(*args, **kwargs)

    monkeypatch.setattr(nf4_ops, "fused_gemm_kernel", spy)
    poison_cuda_cache()
    with torch.no_grad():
        y = nf4_lora_linear(x, q, a, b, 0.75, bias)
    assert ranks == [-(-r // 8) * 8]
    w = dequantize_nf4(q)
    xd, ad, bd = x.double(), a.double(), b.double()
    exact = xd @ w.double().t() + 0.75 * (xd @ ad.t()) @ bd.t() + bias.double()
    low = x @ w.t() + 0.75 * (x @ a.t()) @ b.t() + bias
    assert rel_err(y, exact) <= 2 * rel_err(low, exact) + 1e-6


def test_kernel_paths_need_16_bit_x_and_factors_of_its_dtype(monkeypatch):
    """Where the kernels run (stood in here: the dispatch rules alone, no kernel runs), the merged
    weight takes 16-bit x with factors of x's dtype, K % 64 == 0 and r <= 128; the product from
    the codes 1 to small_m_max rows (not an empty x); the fused GEMM factors of x's dtype too."""
    from hoptune import _lib

    monkeypatch.setattr(_lib, "use_kernel", lambda t, op: True)
    bf16 = torch.bfloat16
    x = torch.empty(300, 256, dtype=bf16)
    assert nf4_lora_ops._merged(x, torch.empty(128, 256, dtype=bf16))
    assert not nf4_lora_ops._merged(x, torch.empty(136, 256, dtype=bf16))
    assert not nf4_lora_ops._merged(x, torch.empty(16, 256, dtype=torch.float16))
    assert not nf4_lora_ops._merged(x.float(), torch.empty(16, 256))
    assert not nf4_lora_ops._merged(torch.empty(300, 288, dtype=bf16), torch.empty(16, 288, dtype=bf16))
    assert not nf4_lora_ops._merged(x, None)
    a = torch.empty(16, 256, dtype=bf16)
    assert nf4_lora_ops._from_codes(x[:1], a, 64) and nf4_lora_ops._from_codes(x[:12], None, 64)
    assert not nf4_lora_ops._from_codes(x[:0], a, 64)
    assert not nf4_lora_ops._from_codes(x[:13], a, 64)  # (12 rows at most on a small weight)
    assert not nf4_lora_ops._from_codes(x[:1], a.half(), 64)
    x2 = torch.empty(200, 4096, dtype=bf16)
    a = torch.empty(16, 4096, dtype=bf16)
    assert nf4_lora_ops._fused(x2, a, 8192, 64) and nf4_lora_ops._fused(x2, None, 8192, 64)
    assert not nf4_lora_ops._fused(x2, a.half(), 8192, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("r,merged", [(8, True), (128, True), (136, False), (256, False)])
@pytest.mark.parametrize("bias", [True, False])
def test_merge_rank_rule(r, merged, bias, monkeypatch):
    """Up to MERGED_MAX_RANK the LoRA product is folded into the dequantized weight, forward and
    backward; above it (the general merged kernel, slower than the terms on the activations) the
    plain dequantize runs and the LoRA terms go on the activations. Same results either way."""
    assert nf4_lora_ops.MERGED_MAX_RANK == 128
    calls = []
    real = nf4_ops.dequantize_lora_kernel
    monkeypatch.setattr(nf4_ops, "dequantize_lora_kernel", lambda *a: calls.append(1) or real(*a))
    _check(2100, 256, 384, r, torch.bfloat16, "cuda", seed=r, bias=bias)
    assert bool(calls) == merged


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize(
    "n,k,r,blocksize",
    [
        (200, 192, 16, 64),
        (64, 128, 1, 64),
        (197, 320, 17, 64),
        (384, 256, 64, 128),
        (96, 512, 256, 64),
        (2000, 1088, 32, 64),  # more items than CTAs: runs of items across slabs
        (2000, 1088, 64, 64),  # ranks 33-64 in registers, one CTA per SM
        (197, 320, 40, 64),
        (2000, 1088, 128, 64),  # ranks 65-128: 32-column pieces, one CTA per SM
        (197, 320, 72, 64),  # (rank past the last full step of 16)
        (197, 320, 66, 64),  # above 64, not a multiple of 8: the general kernel
        (200, 192, 12, 64),  # not multiples of 8 (B read in 4-byte words): one, two, four steps
        (197, 320, 20, 64),
        (300, 512, 36, 64),
        (4100, 1024, 8, 256),
        (64, 72, 8, 64),  # K not a multiple of 64: the fallback
    ],
)
def test_dequantize_lora_kernel(n, k, r, blocksize, double_quant, dtype):
    """deq(W) + s B A, rounded once: within half an ulp of the exact value (plus fp32 round-off)."""
    g = torch.Generator().manual_seed(n + k + r)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype).cuda()
    a = (torch.randn(r, k, generator=g) * k**-0.5).to(dtype).cuda()
    b = (torch.randn(n, r, generator=g) * r**-0.5).to(dtype).cuda()
    q = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    s = 0.37
    poison_cuda_cache()
    ours = nf4_ops.nf4_dequantize_lora(
        q.packed, q.absmax, q.absmax2, q.code2, q.offset, q.blocksize, q.blocksize2, [n, k], a, b, s
    )
    base = dequantize_nf4(q)  # the plain dequantize's output, in dtype
    assert base.dtype == dtype and ours.dtype == dtype and ours.shape == (n, k)
    _check_merged(ours, base, a, b, s)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize(
    "n,k,r",
    [
        (200, 192, 16),
        (197, 320, 8),
        (4100, 1024, 16),
        (1, 64, 16),
        (2000, 1088, 8),
        (64, 128, 12),
        (197, 320, 32),
        (300, 512, 24),
        (2000, 1088, 64),
        (197, 320, 40),
    ],
)
def test_dequantize_lora_versions_agree(n, k, r, double_quant, dtype, monkeypatch):
    """Every numbered merged-dequantize version equals the default bit for bit (the default's bulk
    tensor stores at ranks up to 32 that are multiples of 8 drop the rows past the weight's last;
    version 1 stores from registers; r = 12, 40 and 64 take the same path in both)."""
    g = torch.Generator().manual_seed(7 * n + k + r)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype).cuda()
    a = (torch.randn(r, k, generator=g) * k**-0.5).to(dtype).cuda()
    b = (torch.randn(n, r, generator=g) * r**-0.5).to(dtype).cuda()
    q = quantize_nf4(w, double_quant=double_quant)
    args = (q.packed, q.absmax, q.absmax2, q.code2, q.offset, q.blocksize, q.blocksize2, [n, k], a, b, 0.37)
    expected = nf4_ops.nf4_dequantize_lora(*args)
    monkeypatch.setattr(nf4_ops, "_MERGE_VARIANT", 1)
    poison_cuda_cache()
    got = nf4_ops.nf4_dequantize_lora(*args)
    torch.cuda.synchronize()
    assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))


def _check_merged(ours, base, a, b, s):
    """ours = deq(W) + s B A rounded once to base's dtype: within half an ulp of the exact value
    (plus fp32 round-off), and equal to the reference except near rounding ties."""
    dtype = base.dtype
    exact = base.double() + s * (b.double() @ a.double())
    mag = base.double().abs() + s * (b.double().abs() @ a.double().abs())
    mant = 7 if dtype == torch.bfloat16 else 10  # explicit mantissa bits
    tiny = torch.finfo(dtype).smallest_normal  # below it the spacing is constant (subnormals)

    def ulp(t):
        return torch.exp2(torch.floor(torch.log2(t.abs().clamp_min(tiny))) - mant)

    err = (ours.double() - exact).abs()
    bound = 0.5 * torch.maximum(ulp(exact), ulp(ours.double())) + 2.0**-22 * mag
    assert torch.isfinite(ours).all()
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"
    # the reference (fp32 addmm, one rounding) agrees to the last bit except near a rounding tie
    ref = ref_nf4.merge_lora(base, a, b, s)
    assert (ours != ref).float().mean().item() < 1e-3


@pytest.mark.parametrize("r", [1, 7, 15, 33, 63, 66, 100, 121])
def test_main_kernel_factors_pads_ranks(r):
    """Ranks the merged kernel's main form cannot take as given get zero ranks appended up to a
    multiple of 8: the same product."""
    g = torch.Generator().manual_seed(r)
    a, b = torch.randn(r, 192, generator=g), torch.randn(40, r, generator=g)
    ap, bp = nf4_ops.main_kernel_factors(a, b)
    r8 = -(-r // 8) * 8
    assert ap.shape == (r8, 192) and bp.shape == (40, r8)
    assert ap.is_contiguous() and bp.is_contiguous() and bp.data_ptr() % 16 == 0
    assert torch.equal(ap[:r], a) and torch.equal(bp[:, :r], b)
    assert not ap[r:].any() and not bp[:, r:].any()
    assert torch.equal(bp @ ap, b @ a)


def test_main_kernel_factors_keeps_or_realigns():
    """Factors the main form takes (an even rank up to 64 with B 4-byte aligned, a multiple of 8 up
    to 128 with B 16-byte aligned) and ranks above 128 pass as they are; a multiple of 8 with B
    misaligned is copied (a fresh copy is aligned)."""
    a = torch.randn(16, 64, dtype=torch.bfloat16)
    for r in (2, 10, 16, 64, 96, 128, 136, 256):
        ar, br = torch.randn(r, 64), torch.randn(24, r)
        ap, bp = nf4_ops.main_kernel_factors(ar, br)
        assert ap is ar and bp is br
    buf = torch.randn(24 * 16 + 8, dtype=torch.bfloat16)
    b_odd = buf[1 : 1 + 24 * 16].view(24, 16)  # 2 bytes in: not 4-byte aligned
    assert b_odd.data_ptr() % 4 != 0
    ap, bp = nf4_ops.main_kernel_factors(a, b_odd)
    assert ap is a and bp.data_ptr() % 16 == 0 and torch.equal(bp, b_odd)
    b_words = buf[2 : 2 + 24 * 16].view(24, 16)  # 4 bytes in: 4-byte aligned, not 16
    assert b_words.data_ptr() % 16 != 0
    assert nf4_ops.main_kernel_factors(a, b_words)[1] is b_words


def test_main_kernel_factors_at_the_ends_of_the_main_form():
    """r = 64, the largest rank taken with B only 4-byte aligned, passes as it is; r = 128, the
    largest the main form takes, with B misaligned is copied to an aligned B (not padded)."""
    for r, offset, copied in ((64, 2, False), (128, 1, True)):
        a = torch.randn(r, 64, dtype=torch.bfloat16)
        buf = torch.randn(24 * r + 8, dtype=torch.bfloat16)
        b = buf[offset : offset + 24 * r].view(24, r)
        assert b.data_ptr() % 16 != 0
        ap, bp = nf4_ops.main_kernel_factors(a, b)
        assert ap is a and torch.equal(bp, b)
        assert (bp is not b) == copied, r
        if copied:
            assert bp.data_ptr() % 16 == 0 and bp.shape == (24, r)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k,r", [(197, 320, 17), (2000, 1088, 63), (300, 512, 100), (64, 128, 1)])
@pytest.mark.parametrize("misaligned", [False, True])
def test_dequantize_lora_padded_ranks(n, k, r, misaligned, dtype, monkeypatch):
    """Odd ranks, ranks 65-127 not multiples of 8 and a misaligned B reach the merged kernel padded
    to a multiple of 8 (its main form); the general kernel (padding off) gives the same values
    within the same bound."""
    ext = nf4_ops._lib.extension()
    ranks = []
    real = ext.nf4_dequantize_lora

    def spy(*args):
        ranks.append(args[12])  # the rank the kernel receives
        return real(*args)

    monkeypatch.setattr(ext, "nf4_dequantize_lora", spy)
    g = torch.Generator().manual_seed(n + k + r)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype).cuda()
    a = (torch.randn(r, k, generator=g) * k**-0.5).to(dtype).cuda()
    b = (torch.randn(n, r, generator=g) * r**-0.5).to(dtype).cuda()
    if misaligned:  # B one element into a buffer
        b = torch.cat([b.new_zeros(1), b.flatten()])[1:].view(n, r)
    q = quantize_nf4(w)
    state = (q.packed, q.absmax, q.absmax2, q.code2, q.offset, q.blocksize, q.blocksize2, [n, k])
    base = dequantize_nf4(q)
    s = 0.37
    poison_cuda_cache()
    padded = nf4_ops.nf4_dequantize_lora(*state, a, b, s)
    with monkeypatch.context() as mp:
        mp.setattr(nf4_ops, "MERGE_PAD_RANKS", False)
        general = nf4_ops.nf4_dequantize_lora(*state, a, b, s)
    assert ranks == [-(-r // 8) * 8, r]
    _check_merged(padded, base, a, b, s)
    _check_merged(general, base, a, b, s)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16, 17, 32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("k,n,r,sliced", [(320, 200, 8, True), (1088, 136, 64, False), (4096, 72, 16, True)])
def test_small_m_on_tensor_cores(m, dtype, double_quant, k, n, r, sliced, monkeypatch):
    """1 <= M <= 32 rows: the weight read once as codes, on tensor cores (nf4_small_m). Against
    float64 on the dequantized weight by the STYLE rule, for y and the gradients, with a strided x,
    N not a multiple of 16, K not a multiple of the kernel's 128-column step (320, 1088), LoRA and
    bias; the columns cut into one slice per step (sliced: partial sums through the workspace) or
    a single slice; twice in a row, bit-identical (the counters reset, the sum order fixed)."""
    monkeypatch.setattr(nf4_ops, "SMALL_M_MAX_SMALL_WEIGHT", 32)  # every row count the kernel takes
    if not sliced:
        monkeypatch.setattr(nf4_ops, "SMALL_M_CTAS_PER_SM", 1e-6)
    ext = nf4_ops._lib.extension()
    calls = {"small": 0, "merged": 0}
    slices = []
    for name, key in (("nf4_small_m", "small"), ("nf4_dequantize_lora", "merged")):
        fn = getattr(ext, name)

        def counted(*args, _fn=fn, _key=key, **kw):
            calls[_key] += 1
            if _key == "small":
                slices.append(args[18])
            return _fn(*args, **kw)

        monkeypatch.setattr(ext, name, counted)
    g = torch.Generator().manual_seed(m * 5 + k + r)
    w = (torch.randn(n, k, generator=g) * k**-0.5).to(dtype).cuda()
    q = quantize_nf4(w, double_quant=double_quant)
    wide = torch.randn(m, k + 64, generator=g).to(dtype).cuda()
    x = wide[:, 32 : 32 + k]  # rows k + 64 apart, 64 bytes in
    a = (torch.randn(r, k, generator=g) * k**-0.5).to(dtype).cuda()
    b = (torch.randn(n, r, generator=g) * r**-0.5).to(dtype).cuda()
    bias = torch.randn(n, generator=g).to(dtype).cuda()
    gy = torch.randn(m, n, generator=g).to(dtype).cuda()
    deq = dequantize_nf4(q)
    poison_cuda_cache()
    ours = _run(lambda x_, a_, b_: nf4_lora_linear(x_, q, a_, b_, 0.75, bias), x, a, b, gy)
    assert calls == {"small": 1, "merged": 0}
    steps = -(-k // 128)
    assert slices == [steps if sliced else 1]
    _compare_to_plain(ours, x, a, b, gy, deq, bias, dtype)
    # no LoRA, no grad (generation): the same kernel, twice, bit-identical
    with torch.no_grad():
        y0 = nf4_lora_linear(x, q, bias=bias)
        y1 = nf4_lora_linear(x, q, bias=bias)
    assert calls["small"] == 3
    assert torch.equal(y0, y1)
    exact = x.double() @ deq.double().t() + bias.double()
    e_ours = rel_err(y0, exact)
    e_low = rel_err(x @ deq.t() + bias, exact)
    assert e_ours <= 2 * e_low + 1e-6, f"no LoRA: ours {e_ours:.3g} vs torch {e_low:.3g}"


def test_small_m_dispatch_rule():
    """The codes are read directly up to 32 rows for a weight of 2^25 elements or more, up to 12
    below (where the merged weight and a GEMM win from 16 rows on an H200)."""
    assert nf4_ops.small_m_max(4096, 4096) == 12
    assert nf4_ops.small_m_max(4096, 8192) == 32
    assert nf4_ops.small_m_max(14336, 4096) == 32


@pytest.mark.gpu
def test_small_m_rejects_bad_arguments():
    """The launcher's checks surface as errors naming the kernel, not as a crash."""
    q = quantize_nf4(torch.randn(64, 256, dtype=torch.bfloat16, device="cuda"))
    x = torch.randn(33, 256, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(RuntimeError, match="nf4_small_m"):  # 33 rows: above the kernel's 32
        nf4_ops.small_m_kernel(x, *_q_args(q), 64, None, None, 1.0, None)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 7, 128, 1000, 2304])
@pytest.mark.parametrize("tile_n", [64, 128, 192, 256])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize(
    "k,n,r,blocksize", [(320, 200, 8, 64), (1088, 136, 64, 64), (4096, 392, 16, 128), (256, 384, 0, 64)]
)
def test_fused_gemm(m, tile_n, double_quant, k, n, r, blocksize):
    """nf4_lora_gemm (the codes decoded in the GEMM's mainloop, the LoRA term and bias added to its
    accumulators) against float64 on the dequantized weight by the STYLE rule: every token tile, a
    strided x, N not a multiple of the 128-row tile, M not a multiple of the token tile, ranks 0
    (no LoRA) to 64, block sizes 64 and 128, an output poisoned first."""
    g = torch.Generator().manual_seed(m + k + n + r)
    w = (torch.randn(n, k, generator=g) * k**-0.5).to(torch.bfloat16).cuda()
    q = quantize_nf4(w, blocksize=blocksize, double_quant=double_quant)
    wide = torch.randn(m, k + 64, generator=g).to(torch.bfloat16).cuda()
    x = wide[:, 32 : 32 + k]  # rows k + 64 apart, 64 bytes in
    a = (torch.randn(r, k, generator=g) * k**-0.5).to(torch.bfloat16).cuda()
    b = (torch.randn(n, r, generator=g) * r**-0.5).to(torch.bfloat16).cuda() if r else None
    bias = torch.randn(n, generator=g).to(torch.bfloat16).cuda()
    xs = (0.75 * (x @ a.t())).to(torch.bfloat16) if r else None
    deq = dequantize_nf4(q)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    poison_cuda_cache()
    y = nf4_ops.fused_gemm_kernel(x, *_q_args(q), n, xs, b, bias, out=out, tile_n=tile_n)
    torch.cuda.synchronize()
    exact = x.double() @ deq.double().t() + bias.double()
    low = x @ deq.t() + bias
    if r:
        exact += xs.double() @ b.double().t()
        low = low + xs @ b.t()
    e_ours, e_low = rel_err(y, exact), rel_err(low, exact)
    assert e_ours <= 2 * e_low + 1e-6, f"ours {e_ours:.3g} vs torch {e_low:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("m", [7, 300, 1000])
@pytest.mark.parametrize("tile_n", [64, 128, 192, 256])
@pytest.mark.parametrize("splits", [2, 3, 5, 0])
@pytest.mark.parametrize("k,n,r", [(320, 200, 8), (1088, 136, 64), (4096, 392, 16)])
def test_fused_gemm_split_k(m, tile_n, splits, k, n, r):
    """The fused GEMM with each tile's K range split (2, 3, 5 parts, or CUTLASS's stream-K: 0),
    partial sums reduced in the scratch: by the STYLE rule against float64, the LoRA term and bias
    added once, an output poisoned first, and the same bits on a second run (the fixed-order
    reduction)."""
    g = torch.Generator().manual_seed(m + k + n + r + splits)
    w = (torch.randn(n, k, generator=g) * k**-0.5).to(torch.bfloat16).cuda()
    q = quantize_nf4(w)
    x = torch.randn(m, k + 64, generator=g).to(torch.bfloat16).cuda()[:, 64:]
    a = (torch.randn(r, k, generator=g) * k**-0.5).to(torch.bfloat16).cuda()
    b = (torch.randn(n, r, generator=g) * r**-0.5).to(torch.bfloat16).cuda()
    bias = torch.randn(n, generator=g).to(torch.bfloat16).cuda()
    xs = (0.75 * (x @ a.t())).to(torch.bfloat16)
    deq = dequantize_nf4(q)
    out = torch.full((m, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    poison_cuda_cache()
    y = nf4_ops.fused_gemm_kernel(x, *_q_args(q), n, xs, b, bias, out=out, tile_n=tile_n, splits=splits)
    again = nf4_ops.fused_gemm_kernel(x, *_q_args(q), n, xs, b, bias, tile_n=tile_n, splits=splits)
    torch.cuda.synchronize()
    exact = x.double() @ deq.double().t() + bias.double() + xs.double() @ b.double().t()
    low = x @ deq.t() + bias + xs @ b.t()
    e_ours, e_low = rel_err(y, exact), rel_err(low, exact)
    assert e_ours <= 2 * e_low + 1e-6, f"ours {e_ours:.3g} vs torch {e_low:.3g}"
    assert torch.equal(y, again)


def test_fused_gemm_dispatch_rule():
    """The fused GEMM runs on weights of 2^25 elements or more with N >= 4096, above 12 or 16
    rows (the small-M kernel below) up to 256, and on N >= 8192 also 257-384 and 416-512 (and
    385-415, 513-576 and 704-768 on weights of 2^27 elements or more, 608-768 on those of 3 x
    2^26 or more); 64 tokens per CTA up to 64 rows, 128 up to 128, 192 up to 192; to 256 rows
    128 when 256-token tiles would number fewer than 100, else 256; 192 up to 384 rows, 256 up
    to 512, 192 up to 576, then 256; the K range split when the tiles are few, stream-K when
    they are many or above 512 rows (the measured faster ones)."""
    x = torch.empty(200, 4096, dtype=torch.bfloat16)
    assert nf4_ops.fused_gemm_runs(x, 8192, 64)
    assert not nf4_ops.fused_gemm_runs(x, 4096, 64)  # 4096 x 4096: the merged path wins
    assert nf4_ops.fused_gemm_runs(torch.empty(200, 8192, dtype=torch.bfloat16), 4096, 64)
    assert not nf4_ops.fused_gemm_runs(torch.empty(200, 32768, dtype=torch.bfloat16), 1024, 64)
    assert not nf4_ops.fused_gemm_runs(x.half(), 8192, 64)  # bf16 only
    assert not nf4_ops.fused_gemm_runs(torch.empty(0, 4096, dtype=torch.bfloat16), 8192, 64)
    rows = [m for m in range(1, 600) if nf4_ops.fused_rows(m, 8192, 8192)]
    assert rows == list(range(1, 385)) + list(range(416, 513))
    # 385-415, 513-576 and 704-768 rows too on weights of 2^27 elements or more
    for n, k in ((8192, 16384), (16384, 8192), (8192, 24512)):
        rows = [m for m in range(1, 1100) if nf4_ops.fused_rows(m, n, k)]
        assert rows == list(range(1, 577)) + list(range(704, 769))
    # and 608-703 on those of 3 x 2^26 or more
    for n, k in ((28672, 8192), (8192, 28672), (8192, 24576)):
        rows = [m for m in range(1, 1100) if nf4_ops.fused_rows(m, n, k)]
        assert rows == list(range(1, 577)) + list(range(608, 769))
    assert [m for m in range(1, 600) if nf4_ops.fused_rows(m, 4096, 4096)] == list(range(1, 257))
    assert [m for m in range(1, 600) if nf4_ops.fused_rows(m, 4096, 65536)] == list(range(1, 257))
    tiles = {m: nf4_ops.fused_tile_n(m, 28672) for m in range(1, 513)}
    assert [t for m, t in sorted(tiles.items()) if m <= 64] == [64] * 64
    assert {tiles[m] for m in range(65, 129)} == {128}
    assert {tiles[m] for m in range(129, 193)} == {192}
    assert {tiles[m] for m in range(193, 257)} == {256}
    assert {tiles[m] for m in range(257, 385)} == {192}
    assert {tiles[m] for m in range(385, 513)} == {256}
    assert {nf4_ops.fused_tile_n(m, 28672) for m in range(513, 577)} == {192}
    assert {nf4_ops.fused_tile_n(m, 28672) for m in range(577, 769)} == {256}
    assert nf4_ops.fused_tile_n(160, 4096) == 192
    assert nf4_ops.fused_tile_n(256, 8192) == 128  # 64 tiles of 256 tokens: fewer than 100
    assert nf4_ops.fused_tile_n(256, 14336) == 256
    assert nf4_ops.fused_tile_n(512, 8192) == 256
    # the K range split so that few tiles fill 132 SMs
    assert nf4_ops.fused_splits(64, 4096, 4096, 128, 132) == 4  # 32 tiles
    assert nf4_ops.fused_splits(256, 4096, 4096, 128, 132) == 2  # 64 tiles
    assert nf4_ops.fused_splits(512, 4096, 4096, 128, 132) == 1  # 128 tiles
    assert nf4_ops.fused_splits(64, 28672, 8192, 128, 132) == 1  # 224 tiles
    assert nf4_ops.fused_splits(512, 28672, 8192, 256, 132) == 0  # 448 tiles: stream-K
    assert nf4_ops.fused_splits(544, 8192, 28672, 192, 132) == 0  # above 512 rows: stream-K
    assert nf4_ops.fused_splits(64, 1024, 4096, 128, 132) == 8  # 8 tiles: at most 8 parts
    assert nf4_ops.fused_splits(64, 1024, 1024, 128, 132) == 2  # parts of >= 8 K blocks
    # the fused GEMM takes over from the small-M kernel above 12 rows (N >= 8192) or 16
    assert nf4_ops.fused_small_m_max(28672) == nf4_ops.fused_small_m_max(8192) == 12
    assert nf4_ops.fused_small_m_max(4096) == 16


def test_fused_gemm_runs_on_whole_quant_blocks_per_row_and_n_a_multiple_of_8():
    """The fused GEMM decodes whole quant blocks within a weight row and writes N in runs of 8: a
    blocksize that does not divide K (blocks across rows) or an N not a multiple of 8 takes
    another path (the dispatch rule alone: no kernel runs here)."""
    x = torch.empty(200, 4160, dtype=torch.bfloat16)  # K = 65 x 64
    assert nf4_ops.fused_gemm_runs(x, 8192, 64)
    assert not nf4_ops.fused_gemm_runs(x, 8192, 4096)  # 4160 % 4096: blocks span rows
    assert nf4_ops.fused_gemm_runs(x, 8200, 64)
    assert not nf4_ops.fused_gemm_runs(x, 8196, 64)  # N % 8 == 4


@pytest.mark.gpu
@pytest.mark.parametrize(
    "m,r,k,n",
    [
        (28, 16, 4096, 8192),
        (33, 16, 4096, 8192),
        (128, 8, 8192, 4096),
        (160, 16, 8192, 4096),  # 192-token tiles
        (200, 64, 4096, 8192),
        (300, 16, 4096, 8192),  # two 192-token tiles
        (400, 16, 16384, 8192),  # 385-415 rows: a weight of 2^27 elements
        (544, 16, 16384, 8192),  # 513-576 rows: 192-token tiles, stream-K
        (720, 16, 16384, 8192),  # 704-768 rows: 256-token tiles, stream-K
        (640, 16, 8192, 24576),  # 608-703 rows: a weight of 3 x 2^26 elements
        (480, 0, 4096, 8192),
    ],
)
def test_fused_gemm_in_the_op(m, r, k, n, monkeypatch):
    """The op's forward takes the fused GEMM for nf4.fused_small_m_max(N) < M rows in
    nf4.fused_rows' range on a weight of 2^25 elements or more (no merged weight; no small-M kernel
    either: 28 rows; the K range split: N = 4096), 3-D x, LoRA and bias; y and every gradient by
    the STYLE rule against float64 on the dequantized weight."""
    ext = nf4_ops._lib.extension()
    calls = {"fused": 0, "merged": 0, "small": 0}
    for name, key in (
        ("nf4_lora_gemm", "fused"),
        ("nf4_dequantize_lora", "merged"),
        ("nf4_small_m", "small"),
    ):
        fn = getattr(ext, name)

        def counted(*args, _fn=fn, _key=key, **kw):
            calls[_key] += 1
            return _fn(*args, **kw)

        monkeypatch.setattr(ext, name, counted)
    real_fused = nf4_lora_ops._fused
    decided = []  # the fused decision is taken once per forward (not again in _forward)
    monkeypatch.setattr(nf4_lora_ops, "_fused", lambda *a: decided.append(1) or real_fused(*a))
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(m + r)
    q = quantize_nf4((torch.randn(n, k, generator=g) * k**-0.5).to(dtype).cuda())
    x = torch.randn(1, m, k, generator=g).to(dtype).cuda()
    a = (torch.randn(max(r, 1), k, generator=g) * k**-0.5).to(dtype).cuda()
    b = (torch.randn(n, max(r, 1), generator=g) * max(r, 1) ** -0.5).to(dtype).cuda()
    bias = torch.randn(n, generator=g).to(dtype).cuda()
    gy = torch.randn(1, m, n, generator=g).to(dtype).cuda()
    deq = dequantize_nf4(q)
    if r == 0:  # no LoRA: the forward alone
        poison_cuda_cache()
        with torch.no_grad():
            y = nf4_lora_linear(x, q, bias=bias)
        assert calls == {"fused": 1, "merged": 0, "small": 0}
        assert len(decided) == 1
        exact = x.double() @ deq.double().t() + bias.double()
        e_ours, e_low = rel_err(y, exact), rel_err(x @ deq.t() + bias, exact)
        assert e_ours <= 2 * e_low + 1e-6, f"ours {e_ours:.3g} vs torch {e_low:.3g}"
        return
    poison_cuda_cache()
    ours = _run(lambda x_, a_, b_: nf4_lora_linear(x_, q, a_, b_, 0.75, bias), x, a, b, gy)
    assert calls["fused"] == 1 and calls["small"] == 0  # (the backward's dX may take the merged weight)
    assert len(decided) == 1
    _compare_to_plain(ours, x, a, b, gy, deq, bias, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("double_quant", [True, False])
def test_fused_gemm_decodes_exactly(double_quant):
    """With x the identity, y = deq(W)^T: every weight the mainloop decodes is bit-identical to
    the dequantize's (bf16_round(code[q] * absmax), the nibble order included)."""
    k, n = 384, 264
    w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.1
    q = quantize_nf4(w, double_quant=double_quant)
    eye = torch.eye(k, dtype=torch.bfloat16, device="cuda")
    for tile_n, splits in ((64, 1), (128, 1), (256, 1), (64, 3), (128, 3)):
        poison_cuda_cache()
        y = nf4_ops.fused_gemm_kernel(eye, *_q_args(q), n, None, None, None, tile_n=tile_n, splits=splits)
        assert torch.equal(y, dequantize_nf4(q).t())


@pytest.mark.gpu
def test_fused_gemm_rejects_bad_arguments():
    """The launcher's checks surface as errors naming the kernel."""
    q = quantize_nf4(torch.randn(64, 256, dtype=torch.bfloat16, device="cuda"))
    x = torch.randn(40, 256, dtype=torch.bfloat16, device="cuda")
    xs = torch.randn(40, 3, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(64, 3, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(RuntimeError, match="nf4_lora_gemm"):  # an odd rank
        nf4_ops.fused_gemm_kernel(x, *_q_args(q), 64, xs, b, None)
    with pytest.raises(ValueError, match="nf4_lora_gemm"):  # more K parts than 64-wide K blocks
        nf4_ops.fused_gemm_kernel(x, *_q_args(q), 64, None, None, None, splits=5)
    with pytest.raises(ValueError, match="nf4_lora_gemm"):  # more than 16 parts
        nf4_ops.fused_gemm_kernel(x, *_q_args(q), 64, None, None, None, splits=17)
    with pytest.raises(ValueError, match="nf4_lora_gemm"):  # a token tile the kernel lacks
        nf4_ops.fused_gemm_kernel(x, *_q_args(q), 64, None, None, None, tile_n=96)


def _q_args(q):
    return (q.packed, q.absmax, q.absmax2, q.code2, q.offset, q.blocksize, q.blocksize2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("r", nf4_lora_ops.DY_PASS_RANKS)
@pytest.mark.parametrize("m,n", [(1, 64), (65, 192), (1000, 576), (4099, 1024)])
def test_dy_pass_kernel(m, n, r, dtype):
    """dxa = s dY B and dB = dY^T xa from one read of dY: row tails, one to many column chunks,
    dY rows n + 8 apart; within 2x torch's error in dtype against float64."""
    g = torch.Generator().manual_seed(m + n + r)
    dy = torch.randn(m, n + 8, generator=g).to(dtype).cuda()[:, :n]
    b = (torch.randn(n, r, generator=g) * r**-0.5).to(dtype).cuda()
    xa = torch.randn(m, r, generator=g).to(dtype).cuda()
    poison_cuda_cache()
    dxa, db = nf4_lora_ops.dy_pass_kernel(dy, b, xa, 0.75)
    want = (0.75 * dy.double() @ b.double(), dy.double().t() @ xa.double())
    low = ((dy @ b) * 0.75, dy.t() @ xa)
    _compare((dxa, db), want, low, dtype, names=("dxa", "dB"))


@pytest.mark.gpu
@pytest.mark.parametrize("n,runs", [(384, True), (200, False)])
def test_backward_takes_the_dy_pass(n, runs, monkeypatch):
    """The eager backward forms dxa and dB with the one-pass kernel when N % 64 == 0 (else with
    two GEMMs), and the gradients agree with the reference either way."""
    calls = []
    real = nf4_lora_ops.dy_pass_kernel
    monkeypatch.setattr(nf4_lora_ops, "dy_pass_kernel", lambda *a: calls.append(1) or real(*a))
    _check(300, 256, n, 16, torch.bfloat16, "cuda", seed=3)
    assert bool(calls) == runs


@pytest.mark.parametrize(
    "r,n,runs",
    [
        (8, 64, True),
        (16, 4096, True),
        (32, 4096, False),
        (32, 8192, True),
        (64, 28672, False),
        (12, 4096, False),
    ],
)
def test_dy_pass_rank_and_width_rule(r, n, runs):
    """The backward takes the one-pass dY kernel at r = 8 and 16, at r = 32 only from
    N = DY_PASS_MIN_N[32] (narrower, it was slower than the two GEMMs), never at r = 64 or at a
    rank the kernel lacks (the dispatch rule alone: no kernel runs here)."""
    g = torch.empty(4, n, dtype=torch.bfloat16)
    b = torch.empty(n, r, dtype=torch.bfloat16)
    assert nf4_lora_ops._dy_pass_runs(g, b) == runs


@pytest.mark.gpu
def test_dy_pass_skips_a_misaligned_B():
    """A contiguous B that does not start on 16 bytes (a view into a larger buffer) takes the two
    GEMMs instead of an error from the kernel's alignment check."""
    x, q, a, b, _ = _case(64, 256, 192, 16, torch.bfloat16, "cuda", seed=4, bias=False)
    buf = torch.cat([b.new_zeros(1), b.flatten()]).requires_grad_(True)
    b_off = buf[1:].view_as(b)  # contiguous, 2 bytes past an aligned start
    assert b_off.is_contiguous() and b_off.data_ptr() % 16 != 0
    g = torch.randn(64, 192, dtype=torch.bfloat16, device="cuda")
    assert not nf4_lora_ops._dy_pass_runs(g, b_off)
    x_off, a_off = x.clone().requires_grad_(True), a.clone().requires_grad_(True)
    poison_cuda_cache()
    nf4_lora_linear(x_off, q, a_off, b_off, 0.5).backward(g)
    _, dx, da, db = _run(lambda x_, a_, b_: nf4_lora_linear(x_, q, a_, b_, 0.5), x, a, b, g)
    torch.testing.assert_close(x_off.grad, dx, rtol=0.02, atol=1e-2)  # dxa: GEMM vs the dY pass
    torch.testing.assert_close(a_off.grad, da, rtol=0.02, atol=1e-2)
    torch.testing.assert_close(buf.grad[1:].view_as(b), db, rtol=0.02, atol=1e-2)


def test_dy_pass_skips_a_gradient_broadcast_over_the_tokens():
    """dY with rows 0 apart (the gradient of y.sum(0), expanded over the tokens) is not a layout
    the one-pass kernel takes (its rows must be at least N apart): the two GEMMs take it."""
    b = torch.empty(256, 16, dtype=torch.bfloat16)
    assert nf4_lora_ops._dy_pass_runs(torch.empty(4, 256, dtype=torch.bfloat16), b)
    assert not nf4_lora_ops._dy_pass_runs(torch.empty(256, dtype=torch.bfloat16).expand(4, 256), b)


def test_dy_pass_skips_layouts_and_dtypes_it_does_not_read():
    """The one-pass dY kernel reads dY in B's dtype, rows of N % 64 == 0 elements with unit
    stride, a multiple of 8 elements apart, 16-byte aligned, and a contiguous B 16-byte aligned:
    anything else takes the two GEMMs (the dispatch rule alone: no kernel runs here)."""
    n, r = 256, 16
    b = torch.empty(n, r, dtype=torch.bfloat16)
    g = torch.empty(4, n, dtype=torch.bfloat16)
    assert nf4_lora_ops._dy_pass_runs(g, b)
    assert not nf4_lora_ops._dy_pass_runs(g.new_empty(4, n + 32), b.new_empty(n + 32, r))  # N % 64
    assert not nf4_lora_ops._dy_pass_runs(g.half(), b)
    assert not nf4_lora_ops._dy_pass_runs(torch.empty(4, 2 * n, dtype=torch.bfloat16)[:, ::2], b)
    assert not nf4_lora_ops._dy_pass_runs(torch.empty(4, n + 4, dtype=torch.bfloat16)[:, :n], b)
    assert not nf4_lora_ops._dy_pass_runs(torch.empty(4 * n + 1, dtype=torch.bfloat16)[1:].view(4, n), b)
    b_off = torch.empty(n * r + 1, dtype=torch.bfloat16)[1:].view(n, r)
    assert not nf4_lora_ops._dy_pass_runs(g, b_off)
    assert nf4_lora_ops._dy_pass_runs(g, b.t().contiguous().t())  # (strided: copied, aligned, first)


def _grads_case(m, k, r, dtype, seed, pad=8):
    """x and dY (M, K) as views of rows K + pad apart, A (r, K), B (K, r) (N = K)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k + pad, generator=g).to(dtype).cuda()[:, :k]
    dy = torch.randn(m, k + pad, generator=g).to(dtype).cuda()[:, :k]
    a = (torch.randn(r, k, generator=g) * k**-0.5).to(dtype).cuda()
    b = (torch.randn(k, r, generator=g) * r**-0.5).to(dtype).cuda()
    return x, dy, a, b


def _grads_want(x, dy, a, b, s, dt):
    """(dA, dB) = ((s dY B)^T x, dY^T (s x A^T)) in dtype dt."""
    x, dy, a, b = (t.to(dt) for t in (x, dy, a, b))
    return ((dy @ b) * s).t() @ x, dy.t() @ ((x @ a.t()) * s)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "m,k",
    [
        (1, 1024),
        (33, 1024),
        (1000, 2048),
        (4099, 4096),
        (4099, 1024),
        (70, 4096),
        (8192, 4096),
        (100001, 1024),
    ],
)
def test_grads_kernel(m, k, dtype):
    """dA and dB from one read of x and dY, on every cluster size (K = N = 1024, 2048, 4096),
    row tails, fewer row blocks than clusters (M = 1, 33, 70) and many per cluster (past each
    cluster's first three, from the counter: M = 8192 and 100001), x and dY rows K + 8 apart;
    within 2x torch's error in dtype against float64."""
    x, dy, a, b = _grads_case(m, k, 16, dtype, seed=m + k)
    assert nf4_lora_ops._grads_run(x, dy, a, b)
    poison_cuda_cache()
    ours = nf4_lora_ops.grads_kernel(x, dy, a, b, 0.75)
    want = _grads_want(x, dy, a, b, 0.75, torch.float64)
    low = _grads_want(x, dy, a, b, 0.75, dtype)
    _compare(ours, want, low, dtype, names=("dA", "dB"))


@pytest.mark.gpu
def test_grads_kernel_in_a_cuda_graph():
    """Captured in a CUDA graph (the workspace's memset, which resets the row blocks' counter, the
    kernel and its rounding kernel) and replayed on new inputs copied in: right on each replay."""
    x, dy, a, b = _grads_case(5000, 2048, 16, torch.bfloat16, seed=50)
    nf4_lora_ops.grads_kernel(x, dy, a, b, 0.5)  # (the extension loaded and the kernel set up)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = nf4_lora_ops.grads_kernel(x, dy, a, b, 0.5)
    for seed in (51, 52):
        x2, dy2, a2, b2 = _grads_case(5000, 2048, 16, torch.bfloat16, seed=seed)
        for dst, src in ((x, x2), (dy, dy2), (a, a2), (b, b2)):
            dst.copy_(src)
        for o in outs:  # (poisoned: the replay must write them)
            o.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        want = _grads_want(x, dy, a, b, 0.5, torch.float64)
        low = _grads_want(x, dy, a, b, 0.5, torch.bfloat16)
        _compare(outs, want, low, torch.bfloat16, names=("dA", "dB"))


@pytest.mark.gpu
def test_grads_kernel_takes_transposed_factors():
    """A as the transpose of a (K, r) tensor and B of an (r, N) one: the kernel reads each factor's
    rows from its pointer, so they reach it as contiguous copies; the result is the same."""
    x, dy, a, b = _grads_case(700, 1024, 16, torch.bfloat16, seed=5)
    a_t, b_t = a.t().contiguous().t(), b.t().contiguous().t()
    assert not a_t.is_contiguous() and not b_t.is_contiguous()
    assert nf4_lora_ops._grads_run(x, dy, a_t, b_t)
    ours = nf4_lora_ops.grads_kernel(x, dy, a_t, b_t, 0.75)
    want = _grads_want(x, dy, a, b, 0.75, torch.float64)
    low = _grads_want(x, dy, a, b, 0.75, torch.bfloat16)
    _compare(ours, want, low, torch.bfloat16, names=("dA", "dB"))


@pytest.mark.gpu
def test_grads_kernel_refuses_a_shape_outside_its_rule():
    """K = N = 768 (1.5 clusters' columns), 512 (a cluster of one CTA) or r = 8: an error naming
    the kernel, not a wrong answer or a fault."""
    for k in (768, 512):
        x, dy, a, b = _grads_case(64, k, 16, torch.bfloat16, seed=6)
        with pytest.raises(RuntimeError, match="lora_grads"):
            nf4_lora_ops.grads_kernel(x, dy, a, b, 0.5)
    x, dy, a, b = _grads_case(64, 1024, 8, torch.bfloat16, seed=7)
    with pytest.raises(RuntimeError, match="lora_grads"):
        nf4_lora_ops.grads_kernel(x, dy, a, b, 0.5)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "m,k,n,frozen_x,runs",
    [
        (700, 1024, 1024, False, True),  # dX on the merged weight (N <= 2 M)
        (300, 1024, 1024, False, False),  # dX needs dxa (N > 2 M): the three passes
        (300, 1024, 1024, True, True),  # no dX at all
        (700, 1024, 1536, False, False),  # K != N
    ],
)
@pytest.mark.parametrize("beside", [True, False])
def test_backward_takes_the_one_pass_grads(m, k, n, frozen_x, runs, beside, monkeypatch):
    """The eager backward takes dA and dB from the one-pass kernel where its rule holds and dX
    needs no s dY B (on the second stream beside dX's GEMM when dX is needed and GRADS_BESIDE_DX is
    on), and the gradients meet the STYLE rule either way."""
    calls = []
    real = nf4_lora_ops._grads_launch
    monkeypatch.setattr(
        nf4_lora_ops, "_grads_launch", lambda *a_, **kw: calls.append(a_[-1]) or real(*a_, **kw)
    )
    monkeypatch.setattr(nf4_lora_ops, "GRADS_BESIDE_DX", beside)
    dtype = torch.bfloat16
    x, q, a, b, bias = _case(m, k, n, 16, dtype, "cuda", seed=m + n)
    gy = torch.randn(m, n, dtype=dtype, device="cuda")
    poison_cuda_cache()
    if frozen_x:  # x without a gradient: dA and dB alone
        a_, b_ = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        nf4_lora_linear(x, q, a_, b_, 0.75, bias).backward(gy)
        want = _grads_want(x, gy, a, b, 0.75, torch.float64)
        low = _grads_want(x, gy, a, b, 0.75, dtype)
        _compare((a_.grad, b_.grad), want, low, dtype, names=("dA", "dB"))
    else:
        ours = _run(lambda x_, a2, b2: nf4_lora_linear(x_, q, a2, b2, 0.75, bias), x, a, b, gy)
        _compare_to_plain(ours, x, a, b, gy, dequantize_nf4(q), bias, dtype)
    assert bool(calls) == runs
    if runs:  # (the launch's stream: the second one only beside dX's GEMM)
        on_side = beside and not frozen_x
        side = nf4_lora_ops._side_streams.get(torch.cuda.current_device())
        assert (side is not None and calls == [side.cuda_stream]) == on_side
        assert on_side or calls == [torch.cuda.current_stream().cuda_stream]


@pytest.mark.gpu
@pytest.mark.parametrize("beside", [True, False])
def test_backward_with_the_one_pass_grads_in_a_cuda_graph(beside, monkeypatch):
    """The layer's forward and backward (dA and dB from the one-pass kernel, dX from the merged
    weight) captured in a CUDA graph, replayed on new inputs copied in, the output and gradients
    poisoned before each replay: right on each replay. Beside dX's GEMM the second stream is forked
    and joined inside the capture."""
    calls = []
    real = nf4_lora_ops._grads_launch
    monkeypatch.setattr(
        nf4_lora_ops, "_grads_launch", lambda *a_, **kw: calls.append(a_[-1]) or real(*a_, **kw)
    )
    monkeypatch.setattr(nf4_lora_ops, "GRADS_BESIDE_DX", beside)
    m, k, n, dtype = 700, 1024, 1024, torch.bfloat16
    x, q, a, b, bias = _case(m, k, n, 16, dtype, "cuda", seed=60)
    gy = torch.randn(m, n, dtype=dtype, device="cuda")
    x.requires_grad_(True)
    a.requires_grad_(True)
    b.requires_grad_(True)
    warm = torch.cuda.Stream()
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm):  # (warm-up off the default stream, as torch's graph docs ask)
        for _ in range(2):
            nf4_lora_linear(x, q, a, b, 0.75, bias).backward(gy)
            x.grad = a.grad = b.grad = None
    torch.cuda.current_stream().wait_stream(warm)
    assert calls  # (the one-pass kernel's path)
    assert (nf4_lora_ops._side_streams.get(torch.cuda.current_device()) is not None) or not beside
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = nf4_lora_linear(x, q, a, b, 0.75, bias)
        y.backward(gy)
    for seed in (61, 62):
        x2, _, a2, b2, _ = _case(m, k, n, 16, dtype, "cuda", seed=seed, bias=False)
        gy2 = torch.randn(m, n, dtype=dtype, device="cuda")
        with torch.no_grad():
            for dst, src in ((x, x2), (a, a2), (b, b2), (gy, gy2)):
                dst.copy_(src)
            for o in (y, x.grad, a.grad, b.grad):
                o.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ours = (y.detach(), x.grad, a.grad, b.grad)
        _compare_to_plain(ours, x.detach(), a.detach(), b.detach(), gy, dequantize_nf4(q), bias, dtype)


@pytest.mark.parametrize(
    "k,n,r,dtype,runs",
    [
        (4096, 4096, 16, torch.bfloat16, True),
        (1024, 1024, 16, torch.float16, True),
        (512, 512, 16, torch.bfloat16, False),  # a cluster of one CTA: st.async needs two
        (4096, 4096, 8, torch.bfloat16, False),  # the kernel's one rank is 16
        (4096, 14336, 16, torch.bfloat16, False),  # K != N
        (3072, 3072, 16, torch.bfloat16, False),  # 6 CTAs a cluster
        (8192, 8192, 16, torch.bfloat16, False),  # 16: above the portable cluster size
        (1000, 1000, 16, torch.bfloat16, False),
        (4096, 4096, 16, torch.float32, False),
    ],
)
def test_one_pass_grads_rule(k, n, r, dtype, runs):
    """Where the one-pass gradient kernel's shape rule holds (the dispatch rule alone: no kernel
    runs here)."""
    x = torch.empty(4, k, dtype=dtype)
    g = torch.empty(4, n, dtype=dtype)
    a, b = torch.empty(r, k, dtype=dtype), torch.empty(n, r, dtype=dtype)
    assert nf4_lora_ops._grads_run(x, g, a, b) == runs


def test_one_pass_grads_skips_layouts_it_does_not_read():
    """x and dY rows unit-stride, at least a row and a multiple of 8 elements apart, 16-byte
    aligned; the factors contiguous and 4-byte aligned or strided (then copied), all of one dtype;
    anything else takes the three passes (the dispatch rule alone)."""
    k, r = 1024, 16
    bf = torch.bfloat16
    x, g = torch.empty(4, k, dtype=bf), torch.empty(4, k, dtype=bf)
    a, b = torch.empty(r, k, dtype=bf), torch.empty(k, r, dtype=bf)
    assert nf4_lora_ops._grads_run(x, g, a, b)
    assert nf4_lora_ops._grads_run(torch.empty(4, k + 8, dtype=bf)[:, :k], g, a, b)
    assert not nf4_lora_ops._grads_run(torch.empty(4, k + 4, dtype=bf)[:, :k], g, a, b)
    assert not nf4_lora_ops._grads_run(x, torch.empty(4, 2 * k, dtype=bf)[:, ::2], a, b)
    assert not nf4_lora_ops._grads_run(x, torch.empty(k, dtype=bf).expand(4, k), a, b)
    assert not nf4_lora_ops._grads_run(torch.empty(4 * k + 1, dtype=bf)[1:].view(4, k), g, a, b)
    assert not nf4_lora_ops._grads_run(x, torch.empty(4 * k + 4, dtype=bf)[4:].view(4, k), a, b)
    assert not nf4_lora_ops._grads_run(x, g.half(), a, b)
    assert not nf4_lora_ops._grads_run(x, g, a.half(), b)
    a_off = torch.empty(r * k + 1, dtype=bf)[1:].view(r, k)
    assert not nf4_lora_ops._grads_run(x, g, a_off, b)
    assert nf4_lora_ops._grads_run(x, g, a.t().contiguous().t(), b.t().contiguous().t())


@pytest.mark.gpu
def test_backward_with_dy_broadcast_over_the_tokens():
    """A loss of y.sum(0) hands the backward dY with rows 0 apart (N % 64 == 0, r = 16: where the
    dY pass runs otherwise): gradients by the STYLE rule, not the dY kernel's refusal."""
    m, k, n = 64, 256, 192
    x, q, a, b, _ = _case(m, k, n, 16, torch.bfloat16, "cuda", seed=11, bias=False)
    v = torch.randn(n, generator=torch.Generator().manual_seed(11)).cuda()
    w = dequantize_nf4(q)

    def grads(fn, dt):
        ts = [t.detach().to(dt).clone().requires_grad_(True) for t in (x, a, b)]
        (fn(*ts).sum(0) * v.to(dt)).sum().backward()
        return [t.grad for t in ts]

    def plain(x_, a_, b_):
        return x_ @ w.to(x_.dtype).t() + 0.5 * (x_ @ a_.t()) @ b_.t()

    poison_cuda_cache()
    ours = grads(lambda x_, a_, b_: nf4_lora_linear(x_, q, a_, b_, 0.5), torch.bfloat16)
    _compare(
        ours,
        grads(plain, torch.float64),
        grads(plain, torch.bfloat16),
        torch.bfloat16,
        names=("dx", "dA", "dB"),
    )


def _offset_view(t):
    """(leaf, view): t's values in a leaf that requires grad, seen through a contiguous view that
    starts one element (2 bytes) past the leaf's aligned start."""
    buf = torch.cat([t.new_zeros(1), t.flatten()]).detach().requires_grad_(True)
    return buf, buf[1:].view_as(t)


@pytest.mark.parametrize("case", ["offset", "column"])
def test_kernel_operands_copy_what_the_kernels_refuse(case):
    """x contiguous all the same but misaligned (a view at an offset), or one row whose row
    stride PyTorch ignores (a (K, 1) column transposed: rows 1 element apart), and B at an odd
    offset reach the small-M kernel and the fused GEMM as aligned copies, not as operands that
    their launchers refuse (x.contiguous() is x itself for both)."""
    k, n, r = 256, 64, 16
    if case == "offset":
        x = _offset_view(torch.randn(3, k, dtype=torch.bfloat16))[1]
    else:
        x = torch.randn(k, 1, dtype=torch.bfloat16).t()
    assert x.is_contiguous() and (x.data_ptr() % 16 or x.stride(0) < k)
    b = _offset_view(torch.randn(n, r, dtype=torch.bfloat16))[1]
    assert b.is_contiguous() and b.data_ptr() % 4
    packed = torch.zeros(n * k // 2, dtype=torch.uint8)
    x2, _, b2, _, _ = nf4_ops._kernel_operands(x, packed, b, None, None)
    assert x2.stride() == (k, 1) and x2.data_ptr() % 16 == 0 and torch.equal(x2, x)
    assert b2.is_contiguous() and b2.data_ptr() % 16 == 0 and torch.equal(b2, b)


def test_kernel_operands_copy_rows_apart_by_other_than_multiples_of_8():
    """x whose rows are K + 4 elements apart (a slice of wider rows: the TMA needs rows a multiple
    of 8 elements apart), B 8 bytes past a 16-byte boundary, and xa and bias given as strided views
    reach the kernels as contiguous, aligned copies of the same values."""
    k, n, r = 256, 64, 16
    x = torch.randn(3, k + 4, dtype=torch.bfloat16)[:, :k]
    assert x.stride() == (k + 4, 1) and x.data_ptr() % 16 == 0
    b = torch.randn(n * r + 8, dtype=torch.bfloat16)[4 : 4 + n * r].view(n, r)
    assert b.data_ptr() % 4 == 0 and b.data_ptr() % 16 != 0
    xa = torch.randn(r, 3).t()
    bias = torch.randn(n, 2, dtype=torch.bfloat16)[:, 0]
    assert not xa.is_contiguous() and not bias.is_contiguous()
    packed = torch.zeros(n * k // 2, dtype=torch.uint8)
    x2, p2, b2, xa2, bias2 = nf4_ops._kernel_operands(x, packed, b, xa, bias)
    assert x2.stride() == (k, 1) and torch.equal(x2, x)
    assert p2 is packed
    assert b2.data_ptr() % 16 == 0 and torch.equal(b2, b)
    assert xa2.is_contiguous() and torch.equal(xa2, xa)
    assert bias2.is_contiguous() and torch.equal(bias2, bias)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "m,k,n,case",
    [
        (1, 320, 200, "column"),  # from the codes (nf4_small_m)
        (8, 320, 200, "offset"),
        (64, 4096, 8192, "offset"),  # the fused GEMM
    ],
)
def test_misaligned_x_and_B_reach_the_kernels_as_copies(m, k, n, case):
    """x and B as contiguous views the kernels cannot take as given (2 bytes past an aligned
    start; for one row, a (K, 1) column transposed): y and the gradients by the STYLE rule."""
    dtype = torch.bfloat16
    x, q, a, b, bias = _case(m, k, n, 16, dtype, "cuda", seed=m + 12)
    gy = torch.randn(m, n, dtype=dtype, device="cuda")
    if case == "column":
        x_leaf = x.reshape(k, 1).clone(memory_format=torch.contiguous_format).requires_grad_(True)
        x_view = x_leaf.t()  # (1, K), rows 1 element apart
    else:
        x_leaf, x_view = _offset_view(x)
    b_leaf, b_view = _offset_view(b)
    a_ = a.clone().requires_grad_(True)
    assert x_view.is_contiguous() and (x_view.data_ptr() % 16 or x_view.stride(0) < k)
    assert b_view.data_ptr() % 4
    poison_cuda_cache()
    y = nf4_lora_linear(x_view, q, a_, b_view, 0.75, bias)
    y.backward(gy)
    dx = x_leaf.grad.t() if case == "column" else x_leaf.grad[1:].view_as(x)
    ours = (y.detach(), dx, a_.grad, b_leaf.grad[1:].view_as(b))
    _compare_to_plain(ours, x, a, b, gy, dequantize_nf4(q), bias, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "m,k,n,kernel",
    [
        (8, 320, 200, "nf4_small_m"),  # a few rows: from the codes
        (64, 4096, 8192, "nf4_lora_gemm"),  # the fused GEMM (a weight of 2^25 elements)
    ],
)
def test_x_rows_apart_by_other_than_multiples_of_8_reach_the_kernels_as_copies(m, k, n, kernel, monkeypatch):
    """x as a slice of rows K + 4 elements apart (16-byte aligned start, unit column stride: not a
    multiple of 8 apart, which the kernels' row loads need) reaches the small-M kernel and the fused
    GEMM as a contiguous copy (rows K apart), not as an operand their launchers refuse; y and the
    gradients (x's through its wider base) by the STYLE rule."""
    dtype = torch.bfloat16
    x, q, a, b, bias = _case(m, k, n, 16, dtype, "cuda", seed=m + 31)
    ext = nf4_ops._lib.extension()
    strides = []
    real = getattr(ext, kernel)

    def spy(*args):
        strides.append(args[1])  # (x, its row stride, ...)
        return real(*args)

    monkeypatch.setattr(ext, kernel, spy)
    base = torch.zeros(m, k + 4, dtype=dtype, device="cuda")
    base[:, :k] = x
    base.requires_grad_(True)
    x_view = base[:, :k]
    assert x_view.stride() == (k + 4, 1) and x_view.data_ptr() % 16 == 0
    a_, b_ = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    gy = torch.randn(m, n, dtype=dtype, device="cuda")
    poison_cuda_cache()
    y = nf4_lora_linear(x_view, q, a_, b_, 0.75, bias)
    y.backward(gy)
    assert strides == [k]
    ours = (y.detach(), base.grad[:, :k], a_.grad, b_.grad)
    assert not base.grad[:, k:].any()
    _compare_to_plain(ours, x, a, b, gy, dequantize_nf4(q), bias, dtype)


@pytest.mark.gpu
def test_dy_pass_skips_a_misaligned_dY(monkeypatch):
    """An upstream gradient 2 bytes past a 16-byte boundary (a view at an offset, rows N elements
    apart: a multiple of 8), on a shape where an aligned dY takes the dY pass: the two GEMMs take
    it (the pass reads dY in 16-byte pieces and its launcher refuses it), and the gradients meet
    the STYLE rule. Autograd hands the Function's backward dY as given (checked: the test would
    otherwise not reach the case)."""
    m, k, n, r = 300, 256, 384, 16
    dtype = torch.bfloat16
    x, q, a, b, bias = _case(m, k, n, r, dtype, "cuda", seed=32)
    gy = torch.randn(m, n, dtype=dtype, device="cuda")
    g_off = _offset_view(gy)[1].detach()
    assert g_off.stride() == (n, 1) and g_off.data_ptr() % 16 == 2
    calls, seen = [], []
    real = nf4_lora_ops.dy_pass_kernel
    monkeypatch.setattr(nf4_lora_ops, "dy_pass_kernel", lambda *a_: calls.append(1) or real(*a_))
    real_impl = nf4_lora_ops._backward_impl

    def spy(saved, meta, needs, grad_y, *args, **kw):
        seen.append(grad_y.data_ptr() % 16)
        return real_impl(saved, meta, needs, grad_y, *args, **kw)

    monkeypatch.setattr(nf4_lora_ops, "_backward_impl", spy)
    fn = lambda x_, a_, b_: nf4_lora_linear(x_, q, a_, b_, 0.75, bias)  # noqa: E731
    poison_cuda_cache()
    ours = _run(fn, x, a, b, g_off)
    assert seen == [2] and not calls
    _compare_to_plain(ours, x, a, b, gy, dequantize_nf4(q), bias, dtype)
    _run(fn, x, a, b, gy)  # (the same call with dY aligned: the dY pass)
    assert seen == [2, 0] and calls == [1]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "factor,r,kernel,calls",
    [
        ("B", 16, "dy_pass_kernel", 1),
        ("A", 16, "dequantize_lora_kernel", 2),
        ("A", 64, "dequantize_lora_kernel", 2),
    ],
)
def test_a_transposed_factor_reaches_its_kernel_as_a_copy(factor, r, kernel, calls, monkeypatch):
    """lora_B as the transpose of an (r, N) tensor (column-major) on a shape where the backward
    takes the dY pass (dA takes s dY B from it), or lora_A as the transpose of a (K, r) one on the
    merged weight (the forward's and, with N <= 2 M, dX's; at ranks 16 and 64 main_kernel_factors
    passes the factors as given: no padding, B aligned). Each kernel reads the factor's rows from
    its pointer, so the factor must reach it as a contiguous copy; y and the gradients by the STYLE
    rule."""
    m, k, n = 300, 256, 384
    dtype = torch.bfloat16
    x, q, a, b, bias = _case(m, k, n, r, dtype, "cuda", seed=33 if factor == "B" else 34 + r)
    module, arg = (
        (nf4_lora_ops, 1) if factor == "B" else (nf4_ops, 8)
    )  # (g2, lora_B, ...) / (7 state fields, shape, lora_A, ...)
    real, given = getattr(module, kernel), []

    def spy(*args):
        given.append(args[arg].stride())
        return real(*args)

    monkeypatch.setattr(module, kernel, spy)
    i = 1 if factor == "A" else 2
    leaves = [t.clone() for t in (x, a, b)]
    leaves[i] = leaves[i].t().contiguous()  # (K, r) or (r, N)
    views = [t.requires_grad_(True) for t in leaves]
    views[i] = leaves[i].t()
    assert views[i].stride() == (1, views[i].shape[0])
    gy = torch.randn(m, n, dtype=dtype, device="cuda")
    poison_cuda_cache()
    y = nf4_lora_linear(views[0], q, views[1], views[2], 0.75, bias)
    y.backward(gy)
    assert given == [views[i].stride()] * calls  # (the kernel ran, given the caller's view)
    grads = [t.grad for t in leaves]
    grads[i] = grads[i].t()
    _compare_to_plain((y.detach(), *grads), x, a, b, gy, dequantize_nf4(q), bias, dtype)


@pytest.mark.gpu
def test_dequantize_lora_offset_absmax_codes():
    """The 8-bit absmax codes as a view at an odd offset: the same weight."""
    g = torch.Generator().manual_seed(0)
    n, k, r = 300, 640, 16
    w = (torch.randn(n, k, generator=g) * 0.05).to(torch.bfloat16).cuda()
    a = (torch.randn(r, k, generator=g) * k**-0.5).to(torch.bfloat16).cuda()
    b = (torch.randn(n, r, generator=g) * r**-0.5).to(torch.bfloat16).cuda()
    q = quantize_nf4(w, double_quant=True)
    shifted = torch.empty(q.absmax.numel() + 3, dtype=q.absmax.dtype, device="cuda")[3:]
    shifted.copy_(q.absmax)
    assert shifted.data_ptr() % 4 == 3
    args = (q.packed, q.absmax, q.absmax2, q.code2, q.offset, q.blocksize, q.blocksize2, [n, k], a, b, 0.5)
    ref = nf4_ops.nf4_dequantize_lora(*args)
    poison_cuda_cache()
    ours = nf4_ops.nf4_dequantize_lora(q.packed, shifted, *args[2:])
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_3d_and_noncontiguous_x(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    _check(0, 192, 128, 8, dtype, device, seed=3, x_shape=(3, 11))
    _check(0, 192, 128, 8, dtype, device, seed=4, x_shape=(5, 7), noncontig=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16])
def test_fp16_gpu(dtype):
    _check(300, 256, 320, 16, dtype, "cuda", seed=5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_shape", [(37,), (3, 13)])
def test_without_autograd_matches_the_recorded_call(device, x_shape):
    """With nothing to differentiate (no_grad, inference_mode, no input that requires grad) the
    forward runs without the autograd Function: the same values, and no graph."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x, q, a, b, bias = _case(0, 192, 136, 16, dtype, device, seed=6, x_shape=x_shape)
    if device == "cuda":
        poison_cuda_cache()
    y_rec = nf4_lora_linear(x.clone().requires_grad_(True), q, a, b, 0.5, bias)
    assert y_rec.grad_fn is not None
    outs = [nf4_lora_linear(x, q, a, b, 0.5, bias)]
    with torch.no_grad():
        outs.append(nf4_lora_linear(x.clone().requires_grad_(True), q, a, b, 0.5, bias))
    with torch.inference_mode():
        outs.append(nf4_lora_linear(x, q, a, b, 0.5, bias))
    for y in outs:
        assert y.grad_fn is None and not y.requires_grad
        assert y.shape == (*x_shape, 136)
        assert torch.equal(y, y_rec.detach())
    # a bias that requires grad goes through the Function and gets its gradient (dY summed over
    # the tokens: here their count)
    bias_g = bias.clone().requires_grad_(True)
    y = nf4_lora_linear(x, q, a, b, 0.5, bias_g)
    assert torch.equal(y.detach(), y_rec.detach())
    y.sum().backward()
    assert torch.equal(bias_g.grad, torch.full_like(bias_g, x.numel() // 192))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [2, 300])  # on CUDA: from the codes, and the merged weight
def test_in_place_on_the_output(device, m):
    """The output of a recorded call (3-D x) takes in-place ops, as a Linear's does (y += residual),
    and the gradients then follow the modified graph."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x, q, a, b, bias = _case(0, 192, 136, 16, dtype, device, seed=8, x_shape=(2, m // 2))
    res = torch.randn_like(x[..., :1]).expand(*x.shape[:-1], 136).contiguous()

    def fn(x_, a_, b_):
        y = nf4_lora_linear(x_, q, a_, b_, 0.5, bias)
        assert not y._is_view()
        y += res
        return y.mul_(3.0)

    def plain(x_, a_, b_):
        return (nf4_lora_linear(x_, q, a_, b_, 0.5, bias) + res) * 3.0

    g = torch.randn(*x.shape[:-1], 136, dtype=dtype, device=device)
    for got, want in zip(_run(fn, x, a, b, g), _run(plain, x, a, b, g)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("m", [2, 300])  # on CUDA: from the codes, and the merged weight
@pytest.mark.parametrize("lora", [True, False])
def test_in_place_with_grad_on_an_output_made_under_no_grad(device, m, lora):
    """An output computed under no_grad (3-D x: a frozen layer's) takes an in-place op once grad
    mode is back on, as a Linear's does (y += a term that requires grad): it is not a view made
    under no_grad, which autograd refuses to modify in place."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x, q, a, b, bias = _case(0, 192, 136, 16, dtype, device, seed=8, x_shape=(2, m // 2))
    if not lora:
        a = b = None
    with torch.no_grad():
        y = nf4_lora_linear(x, q, a, b, 0.5, bias)
    want = y.clone()
    res = torch.randn_like(y).requires_grad_(True)
    y += res
    y.mul_(3.0).sum().backward()
    torch.testing.assert_close(y.detach(), (want + res.detach()) * 3.0, rtol=0, atol=0)
    assert torch.equal(res.grad, torch.full_like(res, 3.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("compiled", [False, True])
def test_autocast(device, compiled):
    """Inside torch.autocast, float32 x, factors and bias run in the autocast dtype, as nn.Linear's
    do: the values of the call on inputs cast to it, and gradients in the inputs' own dtype."""
    x, q, a, b, bias = _case(6, 128, 64, 5, torch.float32, device, seed=9, x_shape=(2, 3))
    g = torch.randn(2, 3, 64, dtype=torch.bfloat16, device=device)
    fn = lambda x_, a_, b_: nf4_lora_linear(x_, q, a_, b_, 0.5, bias)  # noqa: E731
    if compiled:
        torch._dynamo.reset()
        fn = torch.compile(fn, backend="aot_eager", fullgraph=True)

    def in_autocast(x_, a_, b_):
        with torch.autocast(device, dtype=torch.bfloat16):
            return fn(x_, a_, b_)

    ours = _run(in_autocast, x, a, b, g)
    cast = [t.bfloat16() for t in (x, a, b)]
    want = _run(lambda x_, a_, b_: nf4_lora_linear(x_, q, a_, b_, 0.5, bias.bfloat16()), *cast, g)
    assert ours[0].dtype == torch.bfloat16
    for name, o, w in zip(("y", "dx", "dA", "dB"), ours, want):
        assert o.dtype == (torch.bfloat16 if name == "y" else torch.float32), name
        torch.testing.assert_close(o, w.to(o.dtype), rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_inputs_already_in_its_dtype(device):
    """Inside torch.autocast, inputs already in the autocast dtype (a bf16 model) are taken as they
    are: the same values and gradients as the call outside autocast."""
    x, q, a, b, bias = _case(6, 128, 64, 8, torch.bfloat16, device, seed=10, x_shape=(2, 3))
    g = torch.randn(2, 3, 64, dtype=torch.bfloat16, device=device)

    def in_autocast(x_, a_, b_):
        with torch.autocast(device, dtype=torch.bfloat16):
            return nf4_lora_linear(x_, q, a_, b_, 0.5, bias)

    ours = _run(in_autocast, x, a, b, g)
    want = _run(lambda x_, a_, b_: nf4_lora_linear(x_, q, a_, b_, 0.5, bias), x, a, b, g)
    for name, o, w in zip(("y", "dx", "dA", "dB"), ours, want):
        torch.testing.assert_close(o, w, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_mixed_dtypes(device):
    """Inside torch.autocast, x already in the autocast dtype (an earlier op's output) with float32
    factors and bias (the parameters' usual dtype) is taken as nn.Linear takes it: the call on the
    inputs cast to that dtype, gradients in the inputs' own dtypes. Outside autocast the mixed
    call is refused."""
    x, q, a, b, bias = _case(6, 128, 64, 8, torch.float32, device, seed=10, x_shape=(2, 3))
    x = x.bfloat16()
    g = torch.randn(2, 3, 64, dtype=torch.bfloat16, device=device)

    def in_autocast(x_, a_, b_):
        with torch.autocast(device, dtype=torch.bfloat16):
            return nf4_lora_linear(x_, q, a_, b_, 0.5, bias)

    ours = _run(in_autocast, x, a, b, g)
    cast = (x, a.bfloat16(), b.bfloat16(), g)
    want = _run(lambda x_, a_, b_: nf4_lora_linear(x_, q, a_, b_, 0.5, bias.bfloat16()), *cast)
    for name, o, w in zip(("y", "dx", "dA", "dB"), ours, want):
        assert o.dtype == (torch.float32 if name in ("dA", "dB") else torch.bfloat16), name
        torch.testing.assert_close(o, w.to(o.dtype), rtol=0, atol=0, msg=name)
    with pytest.raises(TypeError, match="lora_A must have x's dtype torch.bfloat16"):
        nf4_lora_linear(x, q, a, b, 0.5, bias)
    with torch.autocast(device, dtype=torch.bfloat16):  # (a dtype autocast does not take)
        with pytest.raises(TypeError, match="bias must have x's dtype"):
            nf4_lora_linear(x, q, a.bfloat16(), b.bfloat16(), 0.5, bias.double())


@pytest.mark.parametrize("op", ["eager", "custom op"])
@pytest.mark.parametrize("lora", [True, False])
def test_gradients_of_any_subset_of_trainable_inputs(op, lora):
    """Whichever of x, A, B and bias require grad (B alone, A frozen with x trained, the bias
    alone, with or without an adapter), an eager call is recorded as the op's own autograd node
    and each gets the gradient it gets when all four do, the others none; through the eager Function
    and through the custom op's registered autograd."""
    x, q, a, b, bias = _case(6, 128, 64, 8, torch.float32, "cpu", seed=21)
    if not lora:
        a = b = None
    g = torch.randn(6, 64)

    def call(x_, a_, b_, bias_):
        if op == "eager":
            return nf4_lora_linear(x_, q, a_, b_, 0.5, bias_)
        return torch.ops.hoptune.nf4_lora_linear(x_, *_q_args(q), 64, a_, b_, 0.5, bias_)

    def grads(trained):
        ts = [
            None if t is None else t.detach().clone().requires_grad_(i in trained)
            for i, t in enumerate((x, a, b, bias))
        ]
        y = call(*ts)
        if op == "eager":  # (not a graph of PyTorch's ops on the reference path)
            assert type(y.grad_fn).__name__ == "_EagerNF4LoraLinearBackward", trained
        y.backward(g)
        return [None if t is None else t.grad for t in ts]

    every = grads({0, 1, 2, 3})
    assert all(t is not None for t in every[:: 1 if lora else 3])
    for trained in ({2}, {1}, {0, 2}, {3}, {0, 3}):
        if not lora and trained & {1, 2}:
            continue
        got = grads(trained)
        for i, (o, w) in enumerate(zip(got, every)):
            if i in trained:
                torch.testing.assert_close(o, w, msg=f"input {i} of {sorted(trained)}")
            else:
                assert o is None, (i, trained)


def test_default_scale_is_1():
    """scale defaults to 1.0 (the LoRA term B A x added as it is)."""
    x, q, a, b, bias = _case(5, 128, 64, 8, torch.float32, "cpu", seed=22)
    assert torch.equal(nf4_lora_linear(x, q, a, b, bias=bias), nf4_lora_linear(x, q, a, b, 1.0, bias))


def test_no_lora_and_frozen_weight():
    """No adapter: y = x deq(W)^T + bias, and x's gradient through the frozen NF4 weight."""
    x, q, _, _, bias = _case(9, 128, 64, 8, torch.float32, "cpu", seed=0)
    w = dequantize_nf4(q)
    x.requires_grad_(True)
    y = nf4_lora_linear(x, q, bias=bias)
    torch.testing.assert_close(y, x @ w.t() + bias)
    g = torch.randn(9, 64)
    y.backward(g)
    exact, low = g.double() @ w.double(), g @ w
    assert rel_err(x.grad, exact) <= 2 * rel_err(low, exact) + 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    """The custom op's schema, fake and autograd registrations (on CUDA: the merged-weight path)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x, q, a, b, bias = _case(5, 128, 64, 8, dtype, device, seed=0)
    args = (
        x.requires_grad_(True),
        q.packed,
        q.absmax,
        q.absmax2,
        q.code2,
        q.offset,
        64,
        256,
        64,
        a.requires_grad_(True),
        b.requires_grad_(True),
        0.5,
        bias,
    )
    torch.library.opcheck(torch.ops.hoptune.nf4_lora_linear, args)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_and_checkpoint(device):
    """Eager runs an autograd.Function, torch.compile traces the custom op: same gradients."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x, q, a, b, bias = _case(6, 128, 64, 8, dtype, device, seed=2)
    a.requires_grad_(True)
    b.requires_grad_(True)

    def f(x_):
        return torch.utils.checkpoint.checkpoint(
            lambda t: nf4_lora_linear(t, q, a, b, 0.5, bias), x_, use_reentrant=False
        )

    xe = x.clone().requires_grad_(True)
    ye = f(xe)
    ye.sum().backward()
    ga, gb = a.grad.clone(), b.grad.clone()
    a.grad = b.grad = None
    xc = x.clone().requires_grad_(True)
    yc = torch.compile(f, backend="aot_eager", fullgraph=True)(xc)
    yc.sum().backward()
    torch.testing.assert_close(yc, ye)
    torch.testing.assert_close(xc.grad, xe.grad)
    torch.testing.assert_close(a.grad, ga)
    torch.testing.assert_close(b.grad, gb)


def test_torch_compile_dynamic_scale():
    """fullgraph compilation with dynamic=True, where a float argument (the scale) is symbolic:
    the scale check compares it (math.isfinite cannot take a symbolic float); eager's values and
    gradients at every row count."""
    _, q, a, b, bias = _case(6, 128, 64, 8, torch.float32, "cpu", seed=3)

    def f(x_, a_, b_, scale):
        return nf4_lora_linear(x_, q, a_, b_, scale, bias)

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    for m in (3, 5, 9):
        xm = torch.randn(m, 128, generator=torch.Generator().manual_seed(m))
        outs = []
        for fn in (f, compiled):
            args = [t.clone().requires_grad_(True) for t in (xm, a, b)]
            y = fn(*args, 0.5)
            y.sum().backward()
            outs.append([y.detach()] + [t.grad for t in args])
        torch.testing.assert_close(outs[1], outs[0])


@pytest.mark.parametrize("device", DEVICES)
def test_penalty_on_a_gradient_taken_with_create_graph(device, monkeypatch):
    """A loss with a penalty on dX (taken with create_graph) differentiates through the backward:
    the gradients of x, A and B by the STYLE rule. The merged weight's kernel gives an output
    without a graph (its terms in A and B); on the CPU a stand-in (the reference, detached) takes
    the merged path (N <= 2 M, r = 12: no dY pass) so that the test sees it."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cpu":
        real = nf4_ops.dequantize_lora_impl
        monkeypatch.setattr(nf4_ops, "dequantize_lora_kernel", lambda *args: real(*args).detach())
        monkeypatch.setattr(nf4_lora_ops, "_merged", lambda x, a: a is not None)
    x, q, a, b, bias = _case(40, 128, 64, 12, dtype, device, seed=12)
    w = dequantize_nf4(q)
    gy = torch.randn(40, 64, dtype=dtype, device=device)

    def grads(fn, dt):
        ts = [t.detach().to(dt).clone().requires_grad_(True) for t in (x, a, b)]
        y = fn(*ts)
        (dx,) = torch.autograd.grad(y, ts[0], gy.to(dt), create_graph=True)
        ((y * gy.to(dt)).sum() + (dx * dx).sum()).backward()
        return [dx.detach()] + [t.grad for t in ts]

    def plain(x_, a_, b_):
        dt = x_.dtype
        return x_ @ w.to(dt).t() + 0.5 * (x_ @ a_.t()) @ b_.t() + bias.to(dt)

    ours = grads(lambda x_, a_, b_: nf4_lora_linear(x_, q, a_, b_, 0.5, bias), dtype)
    names = ("dx", "x.grad", "A.grad", "B.grad")
    _compare(ours, grads(plain, torch.float64), grads(plain, dtype), dtype, names=names)


def test_scale_that_requires_grad_refused():
    """The op gives no gradient for the scale: a scale tensor that requires grad (a learned
    scale) is refused, not silently detached; without grad mode, or detached, it is taken."""
    x, q, a, b, bias = _case(4, 128, 64, 8, torch.float32, "cpu", seed=13)
    s = torch.tensor(0.5, requires_grad=True)
    with pytest.raises(TypeError, match="scale must not require grad"):
        nf4_lora_linear(x, q, a, b, s, bias)
    want = nf4_lora_linear(x, q, a, b, 0.5, bias)
    with torch.no_grad():
        assert torch.equal(nf4_lora_linear(x, q, a, b, s, bias), want)
    assert torch.equal(nf4_lora_linear(x, q, a, b, s.detach(), bias), want)


@pytest.mark.parametrize(
    "kw,err,msg",
    [
        ({"x": "float64"}, TypeError, "x must be bfloat16, float16 or float32"),
        ({"x_k": 100}, ValueError, "x must have last dim in_features=128"),
        ({"a_shape": (8, 64)}, ValueError, r"lora_A must be \[r, in_features=128\]"),
        ({"b_shape": (64, 4)}, ValueError, r"lora_B must be \[out_features=64, r=8\]"),
        ({"r0": True}, ValueError, "r = 0"),
        ({"r257": True}, ValueError, "rank r = 257 exceeds the supported maximum 256"),
        ({"only_a": True}, ValueError, "given together"),
        ({"a_dtype": "float64"}, TypeError, "lora_A must have x's dtype"),
        ({"bias_shape": (63,)}, ValueError, r"bias must be \[out_features=64\]"),
        ({"w": "dense"}, TypeError, "w_nf4 must be an NF4Weight"),
        (
            {"w": "3-D"},
            ValueError,
            r"w_nf4 must be 2-D \[out_features, in_features\], got shape \(2, 32, 128\)",
        ),
        ({"device": "meta"}, ValueError, r"one device.*\(lora_A differs\)"),
        ({"x_device": "meta"}, ValueError, r"one device.*\(x differs\)"),
        ({"scale": float("nan")}, ValueError, "scale must be a finite number, got nan"),
        ({"scale": float("inf")}, ValueError, "scale must be a finite number, got inf"),
        ({"scale": "0.5"}, TypeError, "scale must be a real number, got '0.5'"),
        ({"scale": True}, TypeError, "scale must be a real number, got True"),
        # (not an IndexError, a broadcast bias, or outputs of -inf)
        ({"x_0d": True}, ValueError, r"x must have last dim in_features=128 .*got shape \(\)"),
        ({"b_shape": (64, 8, 1)}, ValueError, r"lora_B must be \[out_features=64, r=8\], got \(64, 8, 1\)"),
        ({"b_dtype": "float64"}, TypeError, "lora_B must have x's dtype torch.float32, got torch.float64"),
        ({"bias_shape": (64, 1)}, ValueError, r"bias must be \[out_features=64\], got \(64, 1\)"),
        ({"bias_device": "meta"}, ValueError, r"one device.*\(bias differs\)"),
        ({"w_device": "meta"}, ValueError, r"one device.*w_nf4 on cpu.*\(w_nf4 differs\)"),
        ({"scale": -float("inf")}, ValueError, "scale must be a finite number, got -inf"),
    ],
)
def test_bad_input(kw, err, msg):
    x, q, a, b, bias = _case(4, 128, 64, 8, torch.float32, "cpu", seed=0)
    if kw.get("x"):
        x = x.double()
    if kw.get("x_k"):
        x = torch.randn(4, kw["x_k"])
    if kw.get("a_shape"):
        a = torch.randn(kw["a_shape"])
    if kw.get("b_shape"):
        b = torch.randn(kw["b_shape"])
    if kw.get("r0"):
        a, b = torch.randn(0, 128), torch.randn(64, 0)
    if kw.get("r257"):
        a, b = torch.randn(257, 128), torch.randn(64, 257)
    if kw.get("a_dtype"):
        a = a.double()
    if kw.get("bias_shape"):
        bias = torch.randn(kw["bias_shape"])
    w = q
    if kw.get("w") == "dense":
        w = torch.randn(64, 128)
    elif kw.get("w") == "3-D":
        w = quantize_nf4(torch.randn(2, 32, 128))
    if kw.get("device"):
        a = a.to("meta")
    if kw.get("x_device"):
        x = x.to("meta")
    if kw.get("x_0d"):
        x = x[0, 0]
    if kw.get("b_dtype"):
        b = b.double()
    if kw.get("bias_device"):
        bias = bias.to("meta")
    if kw.get("w_device"):  # (everything but the weight elsewhere)
        x, a, b, bias = (t.to("meta") for t in (x, a, b, bias))
    scale = kw.get("scale", 0.5)
    with pytest.raises(err, match=msg):
        if kw.get("only_a"):
            nf4_lora_linear(x, w, a, None, scale, bias)
        else:
            nf4_lora_linear(x, w, a, b, scale, bias)


def test_autocast_refuses_a_float64_factor():
    """Inside torch.autocast mixed float dtypes are taken, but float64 (which autocast does not
    cast) still is not: the factor is named, as outside autocast."""
    x, q, a, b, bias = _case(4, 128, 64, 8, torch.float32, "cpu", seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for name, a_, b_ in (("lora_A", a.double(), b), ("lora_B", a, b.double())):
            with pytest.raises(TypeError, match=f"{name} must have x's dtype torch.float32"):
                nf4_lora_linear(x, q, a_, b_, 0.5, bias)


def test_autocast_casts_the_float_inputs_it_casts_and_leaves_the_rest():
    """The ops' autocast cast (hoptune.ops._amp): float32 and the other 16-bit dtype go to the
    autocast dtype, as nn.Linear's inputs do; float64, integer tensors and None stay as they are."""
    from hoptune.ops import _amp

    ref = torch.randn(2, 3)
    ts = (torch.randn(3), torch.randn(3).half(), torch.randn(3).double(), torch.arange(3), None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _amp.cast_inputs(ref, *ts)
    assert [None if t is None else t.dtype for t in out] == [
        torch.bfloat16,
        torch.bfloat16,
        torch.float64,
        torch.int64,
        None,
    ]
    assert out[2] is ts[2] and out[3] is ts[3]


@pytest.mark.parametrize("device", DEVICES)
def test_k_not_a_multiple_of_64_warns_once_on_the_gpu(device, monkeypatch):
    """K % 64 != 0 takes the unfused path: correct results, and on the GPU one warning per K (none
    on the CPU, where everything is the reference anyway)."""
    import warnings

    from hoptune import _lib

    monkeypatch.setattr(_lib, "_warned", set())
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x, q, a, b, bias = _case(24, 96, 128, 8, dtype, device, seed=5)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        for _ in range(2):
            y = nf4_lora_linear(x, q, a, b, 0.5, bias)
    ours = [w for w in got if "not a multiple of 64" in str(w.message)]
    assert len(ours) == (1 if device == "cuda" else 0), [str(w.message) for w in got]
    if ours:
        assert "in_features = 96" in str(ours[0].message)
    w = dequantize_nf4(q)
    ref = x.double() @ w.double().t() + 0.5 * (x.double() @ a.double().t()) @ b.double().t() + bias.double()
    low = x @ w.t() + 0.5 * (x @ a.t()) @ b.t() + bias
    assert rel_err(y, ref) <= 2 * rel_err(low, ref) + 1e-6


CHECKPOINT_PATHS = [
    ("merged", (96,), True),
    ("merged", (4, 24), True),
    ("merged", (96,), False),
    ("fused", (4, 64), True),
    ("fused", (256,), False),
    ("unfused", (96,), True),
    ("unfused", (96,), False),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path,x_shape,saves_first", CHECKPOINT_PATHS)
def test_checkpoint_recompute_stops_before_the_last_projection(
    device, path, x_shape, saves_first, monkeypatch
):
    """Non-reentrant activation checkpointing stops the recompute at the last save the backward
    needs, packed when the autograd Function returns. Under saved-tensor hooks the op runs the
    Function before it computes the product (SAVES_FIRST), so the last projection's product is
    not formed again in the recompute for an output no one reads: two projections, the product
    (the merged weight, the fused GEMM, or the unfused reference) formed 2 (forward) + 1
    (recompute) times, not 2 + 2 (plus the merged weight's 2 for dX); values and gradients are
    those without checkpointing. On the CPU the kernels' paths are taken with PyTorch stand-ins
    (the same host logic); on the GPU the fused GEMM needs a weight of 2^25 elements."""
    monkeypatch.setattr(nf4_lora_ops, "SAVES_FIRST", saves_first)
    if device == "cuda" and path == "unfused":
        pytest.skip("the unfused path runs on the CPU here (on the GPU: K not a multiple of 64)")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    k, n = (4096, 8192) if device == "cuda" and path == "fused" else (128, 192)
    x, q1, a1, b1, bias1 = _case(None, k, n, 12, dtype, device, seed=11, x_shape=x_shape)
    _, q2, a2, b2, _ = _case(1, n, k, 12, dtype, device, seed=12)
    formed = []
    merged_kernel, fused_kernel = nf4_ops.dequantize_lora_kernel, nf4_ops.fused_gemm_kernel
    bases = {q1.packed.data_ptr(): q1, q2.packed.data_ptr(): q2}

    def merged(packed, *args):
        formed.append("merged")
        if device == "cuda":
            return merged_kernel(packed, *args)
        *_, lora_A, lora_B, scale = args
        with torch.no_grad():  # (as the kernel's output: no graph)
            return dequantize_nf4(bases[packed.data_ptr()], dtype) + scale * lora_B @ lora_A

    def fused(x2, packed, *args, out=None):
        formed.append("fused")
        if device == "cuda":
            return fused_kernel(x2, packed, *args, out=out)
        *_, xs, lora_B, bias = args  # (PyTorch's product, as the kernel forms it)
        y = x2 @ dequantize_nf4(bases[packed.data_ptr()], dtype).t() + xs @ lora_B.t()
        y = y if bias is None else y + bias
        return y if out is None else out.copy_(y)

    monkeypatch.setattr(nf4_ops, "dequantize_lora_kernel", merged)
    monkeypatch.setattr(nf4_ops, "fused_gemm_kernel", fused)
    if device == "cpu" and path != "unfused":
        monkeypatch.setattr(nf4_lora_ops, "_merged", lambda x_, a_: a_ is not None)
        monkeypatch.setattr(nf4_lora_ops, "_fused", lambda *a_: path == "fused")
    if path == "unfused":
        lora_forward = nf4_lora_ops.ref.lora_forward
        monkeypatch.setattr(
            nf4_lora_ops.ref, "lora_forward", lambda *a_: formed.append("unfused") or lora_forward(*a_)
        )

    def chain(t, a1_, b1_, a2_, b2_):
        return nf4_lora_linear(nf4_lora_linear(t, q1, a1_, b1_, 0.5, bias1), q2, a2_, b2_, 0.25)

    g = torch.randn(*x_shape, k, generator=torch.Generator().manual_seed(13)).to(dtype).to(device)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, a1, b1, a2, b2)]
    y_plain = chain(*leaves)
    y_plain.backward(g)
    plain = [t.grad for t in leaves]
    products = formed.count(path)
    assert products == (4 if path == "merged" else 2)  # (merged: 2 forward, 2 dX)
    formed.clear()
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, a1, b1, a2, b2)]
    y = torch.utils.checkpoint.checkpoint(chain, *leaves, use_reentrant=False)
    torch.testing.assert_close(y, y_plain, rtol=0, atol=0)
    y.backward(g)
    for got, want in zip((t.grad for t in leaves), plain):
        if device == "cuda":  # (the dY pass sums in fp32 through L2 reductions in no fixed order:
            assert rel_err(got, want) < 1e-3  # an element may round one bf16 ulp apart)
        else:
            torch.testing.assert_close(got, want)
    assert formed.count(path) == products + (1 if saves_first else 2)
