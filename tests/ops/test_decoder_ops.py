"""hoptune.ops.decoder (rms_norm, silu_mul, rope): the references are the transformers modules'
own computation; the CUDA kernels match them (bit for bit where the ops round alike) and their
gradients meet the 2x rule against an fp64 reference."""

from __future__ import annotations

import pytest
import torch

from hoptune.ops import decoder as ops
from hoptune.reference import decoder as ref
from tests.conftest import poison_cuda_cache, rel_err

LOW = [torch.bfloat16, torch.float16]


def _grads(fn, inputs, g):
    """fn(*inputs) and the gradients of <fn, g> for the inputs that require grad."""
    out = fn(*inputs)
    grads = torch.autograd.grad(out, [t for t in inputs if t.requires_grad], g)
    return out, grads


def _leaf(t: torch.Tensor, grad: bool = True) -> torch.Tensor:
    return t.detach().clone().requires_grad_(grad)


def _two_x(
    kernel: torch.Tensor, low: torch.Tensor, exact: torch.Tensor, name: str, slack: float = 1e-6
) -> None:
    """The 2x rule: the kernel's error against the fp64 reference is at most twice PyTorch's in
    the low precision (plus a floor for results PyTorch gets exactly)."""
    ek, el = rel_err(kernel, exact), rel_err(low, exact)
    assert ek <= 2 * el + slack, f"{name}: kernel error {ek:.3g} > 2 x PyTorch's {el:.3g}"


# -- the references are the transformers modules -------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_references_are_the_llama_modules(dtype):
    from transformers.models.llama import modeling_llama as ml

    torch.manual_seed(0)
    norm = ml.LlamaRMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48))
    x = torch.randn(3, 5, 48).to(dtype)
    assert torch.equal(ref.rms_norm(x, norm.weight, 1e-5), norm(x))
    g, u = torch.randn(4, 40).to(dtype), torch.randn(4, 40).to(dtype)
    assert torch.equal(ref.silu_mul(g, u), torch.nn.SiLU()(g) * u)
    q, k = torch.randn(2, 4, 6, 32).to(dtype), torch.randn(2, 2, 6, 32).to(dtype)
    cos, sin = torch.randn(2, 6, 32).to(dtype), torch.randn(2, 6, 32).to(dtype)
    want = ml.apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(ref.rope(q, cos, sin), want[0]) and torch.equal(ref.rope(k, cos, sin), want[1])


# -- CPU: the ops are the references --------------------------------------------------------------
def test_cpu_runs_the_reference_with_gradients():
    torch.manual_seed(1)
    x, w = _leaf(torch.randn(3, 24)), _leaf(torch.randn(24))
    y = ops.rms_norm(x, w, 1e-6)
    assert torch.equal(y, ref.rms_norm(x, w, 1e-6))
    y.sum().backward()
    assert x.grad is not None and w.grad is not None
    g, u = _leaf(torch.randn(5, 7)), _leaf(torch.randn(5, 7))
    ops.silu_mul(g, u).sum().backward()
    assert g.grad is not None and u.grad is not None
    q, cos, sin = _leaf(torch.randn(1, 2, 3, 8)), torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    out = ops.rope(q, cos, sin)
    assert torch.equal(out, ref.rope(q, cos, sin))
    out.sum().backward()
    assert q.grad is not None


def test_bad_inputs_are_named():
    x = torch.randn(2, 16)
    with pytest.raises(ValueError, match="weight must be 1-D with x's last dimension"):
        ops.rms_norm(x, torch.randn(8))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        ops.rms_norm(torch.ones(2, 16, dtype=torch.int64), torch.randn(16))
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        ops.rms_norm(x, [1.0] * 16)
    with pytest.raises(ValueError, match="gate and up must have one shape"):
        ops.silu_mul(torch.randn(2, 8), torch.randn(2, 9))
    with pytest.raises(ValueError, match="x must be 4-D"):
        ops.rope(torch.randn(2, 3, 8), torch.randn(1, 3, 8), torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match=r"cos and sin must both be \(2 or 1, 3, 8\)"):
        ops.rope(torch.randn(2, 4, 3, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="head_dim must be even"):
        ops.rope(torch.randn(1, 1, 2, 7), torch.randn(1, 2, 7), torch.randn(1, 2, 7))
    # inputs the ops would otherwise broadcast or promote into a result of another shape or dtype
    # (or fail on inside torch)
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match="weight must be 1-D with x's last dimension"):
        ops.rms_norm(x, torch.randn(16, 1))
    with pytest.raises(ValueError, match=r"weight must be 1-D with x's last dimension \(\?\)"):
        ops.rms_norm(torch.tensor(1.5), torch.randn(1))
    with pytest.raises(TypeError, match="weight must be a floating-point tensor"):
        ops.rms_norm(x, torch.randint(1, 5, (16,)))
    with pytest.raises(ValueError, match="gate and up must have one shape"):
        ops.silu_mul(torch.randn(2, 8), torch.randn(1, 8))
    with pytest.raises(TypeError, match="gate must be a floating-point tensor"):
        ops.silu_mul(torch.randint(-3, 3, (2, 8)), torch.randn(2, 8))
    q = torch.randn(2, 4, 3, 8)
    with pytest.raises(ValueError, match=r"cos and sin must both be \(2 or 1, 3, 8\)"):
        ops.rope(q, torch.randn(1, 3, 8), torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"cos and sin must both be \(2 or 1, 3, 8\)"):
        ops.rope(q, torch.randn(2, 1, 8), torch.randn(2, 1, 8))
    with pytest.raises(ValueError, match=r"cos and sin must both be \(2 or 1, 3, 8\)"):
        ops.rope(q, torch.tensor(0.5), torch.tensor(0.5))


def test_rms_norm_default_eps_is_llamas():
    """Without eps, rms_norm uses 1e-6 (LlamaRMSNorm's default): visible on rows of small values."""
    x, w = 1e-3 * torch.randn(3, 32), 1 + 0.5 * torch.randn(32)
    assert torch.equal(ops.rms_norm(x, w), ref.rms_norm(x, w, 1e-6))
    assert not torch.equal(ops.rms_norm(x, w), ref.rms_norm(x, w, 1e-5))


def test_kernels_take_only_the_inputs_they_are_written_for(monkeypatch):
    """Which inputs the kernels would take where they run (as on an H100: the device check
    answered yes): bf16 / fp16 throughout, a norm row width a multiple of 8, a rotary head dim a
    multiple of 16, tables that need no gradient; anything else runs the reference."""
    from hoptune import _lib

    monkeypatch.setattr(_lib, "use_kernel", lambda t, op: True)
    bf = torch.bfloat16
    x, w = torch.randn(3, 16).to(bf), torch.randn(16).to(bf)
    assert ops.rms_norm_runs(x, w)
    assert not ops.rms_norm_runs(x.float(), w.float())
    assert not ops.rms_norm_runs(x, w.float())  # (a weight of another dtype)
    assert not ops.rms_norm_runs(torch.randn(3, 12).to(bf), torch.randn(12).to(bf))
    g = torch.randn(2, 8).to(bf)
    assert ops.silu_mul_runs(g, torch.randn(2, 8).to(bf))
    assert not ops.silu_mul_runs(g, torch.randn(2, 8).half())
    q = torch.randn(1, 2, 3, 16).to(bf)
    cos, sin = torch.randn(1, 3, 16).to(bf), torch.randn(1, 3, 16).to(bf)
    assert ops.rope_runs(q, cos, sin)
    assert not ops.rope_runs(q, cos, sin.float()) and not ops.rope_runs(q, cos.float(), sin)
    assert not ops.rope_runs(q, cos.requires_grad_(), sin)
    assert not ops.rope_runs(q, cos.detach(), sin.requires_grad_())
    q8 = torch.randn(1, 2, 3, 8).to(bf)
    assert not ops.rope_runs(q8, torch.randn(1, 3, 8).to(bf), torch.randn(1, 3, 8).to(bf))


# -- CUDA kernels ---------------------------------------------------------------------------------
def _laid_out(t: torch.Tensor, layout: str, grad: bool = False) -> torch.Tensor:
    """t's values in the layout ``layout`` names, as a view of a fresh leaf (requires_grad as
    ``grad``): the view itself must reach the op, since .to and .clone (so _leaf) give back a
    contiguous tensor for a strided one. "plain": a clone (dense strides such as the attention's
    transposed view kept); "padN": the rows of a wider tensor (a row stride of cols + N, an
    aligned start); "misaligned": contiguous, one element past an aligned start (2 bytes off the
    kernels' 16-byte alignment in bf16 / fp16); "broadcast": t's first row expanded (stride 0)."""
    t = t.detach()
    cols = t.shape[-1]
    if layout.startswith("pad"):
        base = t.new_zeros(*t.shape[:-1], cols + int(layout[3:]))
        base[..., :cols] = t
        out = base.requires_grad_(grad)[..., :cols]
        assert out.stride(-2) == base.shape[-1] and out.data_ptr() % 16 == 0
    elif layout == "misaligned":
        out = torch.cat((t.new_zeros(1), t.reshape(-1))).requires_grad_(grad)[1:].view(t.shape)
        assert out.is_contiguous() and out.data_ptr() % 16 == t.element_size()
    elif layout == "broadcast":
        out = t[..., :1, :].clone().requires_grad_(grad).expand(t.shape)
        assert out.stride(-2) == 0
    else:
        assert layout == "plain", layout
        out = t.clone().requires_grad_(grad)
    return out


def _shape_id(v):
    """A case's id part for a shape: 2x33x4096 (the others pytest's own)."""
    return "x".join(map(str, v)) if isinstance(v, tuple) else None


def _norm_inputs(shape, dtype):
    torch.manual_seed(shape[-2] * 7 + shape[-1])
    x = torch.randn(shape, device="cuda")
    w = 1 + 0.5 * torch.randn(shape[-1], device="cuda")
    return x.to(dtype), w.to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize(
    "shape,x_layout,dy_layout",
    [
        ((1, 8), "plain", "plain"),
        ((7, 128), "plain", "pad8"),
        ((1000, 520), "pad24", "plain"),
        ((2, 33, 4096), "plain", "plain"),
        ((5, 5000), "plain", "plain"),
        ((3, 8200), "pad24", "pad8"),
        # layouts the kernels do not take, copied: a row stride not a multiple of 8, a start off
        # alignment, rows closer than the width (one row broadcast; dy as y.sum(0)'s backward)
        ((64, 128), "pad4", "pad4"),
        ((9, 1024), "misaligned", "misaligned"),
        ((16, 520), "broadcast", "broadcast"),
    ],
    ids=_shape_id,
)
def test_rms_norm_kernel(shape, x_layout, dy_layout, dtype):
    """x and dy strided ("padN": read in place with their own row strides, the outputs
    contiguous) or in layouts that must be copied first."""
    x, w = _norm_inputs(shape, dtype)
    g = _laid_out(torch.randn(shape, device="cuda").to(dtype), dy_layout)
    xk, xl, x64 = (_laid_out(t, x_layout, grad=True) for t in (x, x, x.double()))
    wk, wl, w64 = _leaf(w), _leaf(w), _leaf(w.double())
    poison_cuda_cache()
    yk, (dxk, dwk) = _grads(lambda a, b: ops.rms_norm(a, b, 1e-5), (xk, wk), g)
    yl, (dxl, dwl) = _grads(lambda a, b: ref.rms_norm(a, b, 1e-5), (xl, wl), g)
    y64, (dx64, dw64) = _grads(lambda a, b: ref.rms_norm(a, b, 1e-5), (x64, w64), g.double())
    assert not torch.isnan(yk).any() and not torch.isnan(dxk).any()
    # the forward is the model's but for the fp32 sum's order: nearly every element equal
    assert (yk == yl).float().mean() > 0.98, "forward differs from the model's ops beyond rounding"
    # so is the weight's gradient, autograd's own sum of the rounded products dy * round(x * rstd)
    # (an fp32 product unrounded is more accurate, so the 2x rule alone would pass it)
    assert (dwk == dwl).float().mean() > 0.98, "weight gradient differs from autograd's beyond rounding"
    _two_x(yk, yl, y64, "y")
    _two_x(dxk, dxl, dx64, "dx")
    _two_x(dwk, dwl, dw64, "dw")


@pytest.mark.gpu
@pytest.mark.parametrize("frozen", ["weight", "x"])
def test_rms_norm_kernel_one_input_frozen_and_no_grad(frozen):
    """A frozen norm weight (LoRA's case) or a frozen x (a full fine-tune's norm over frozen
    embeddings): the input that trains still gets the model's gradient."""
    x, w = _norm_inputs((64, 4096), torch.bfloat16)
    g = torch.randn_like(x)
    (xk, wk), (xr, wr) = ((_leaf(x, frozen != "x"), _leaf(w, frozen != "weight")) for _ in range(2))
    poison_cuda_cache()
    _, (dk,) = _grads(lambda a, b: ops.rms_norm(a, b, 1e-6), (xk, wk), g)
    _, (dr,) = _grads(lambda a, b: ref.rms_norm(a, b, 1e-6), (xr, wr), g)
    if frozen == "weight":
        assert rel_err(dk, dr) < 1e-2
    else:  # (autograd's own sum, as in test_rms_norm_kernel)
        assert (dk == dr).float().mean() > 0.98
    with torch.no_grad():
        assert (ops.rms_norm(x, w, 1e-6) == ref.rms_norm(x, w, 1e-6)).float().mean() > 0.98


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize(
    "shape,gate_layout,up_layout",
    [
        ((3, 1001), "plain", "plain"),
        ((64, 14336), "plain", "plain"),
        # gate and up as halves of one fused projection's rows, or one of them so (or off
        # alignment) and the other as the kernel takes it: each copied on its own
        ((2, 9, 256), "pad256", "pad256"),
        ((2, 9, 256), "plain", "pad256"),
        ((2, 9, 256), "pad256", "plain"),
        ((3, 1001), "plain", "misaligned"),
        ((3, 1001), "misaligned", "plain"),
    ],
    ids=_shape_id,
)
def test_silu_mul_kernel(shape, gate_layout, up_layout, dtype):
    torch.manual_seed(sum(shape))
    gate = (3 * torch.randn(shape, device="cuda")).to(dtype)
    up = torch.randn(shape, device="cuda").to(dtype)
    g = torch.randn(shape, device="cuda").to(dtype)

    def inputs(to=dtype):
        return _laid_out(gate.to(to), gate_layout, grad=True), _laid_out(up.to(to), up_layout, grad=True)

    poison_cuda_cache()
    ok, (dgk, duk) = _grads(ops.silu_mul, inputs(), g)
    ol, (dgl, dul) = _grads(ref.silu_mul, inputs(), g)
    _, (dg64, _) = _grads(ref.silu_mul, inputs(torch.float64), g.double())
    assert torch.equal(ok, ol), "forward is not the model's ops bit for bit"
    assert torch.equal(duk, dul), "d up is not autograd's bit for bit"
    _two_x(dgk, dgl, dg64, "d gate")
    assert not torch.isnan(dgk).any()


def _rope_inputs(b, heads, s, d, dtype, layout, table_batch):
    torch.manual_seed(b * 100 + heads * 10 + s)
    if layout == "attention":  # the projection's output viewed per head and transposed
        x = torch.randn(b, s, heads * d, device="cuda").to(dtype).view(b, s, heads, d).transpose(1, 2)
    else:
        x = torch.randn(b, heads, s, d, device="cuda").to(dtype)
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    pos = (
        torch.arange(s, device="cuda").float()[None].expand(table_batch, s)
        + torch.arange(table_batch, device="cuda").float()[:, None]
    )
    freqs = pos[..., None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    return x, emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize(
    "b,heads,s,d,layout,table_batch,sin_layout",
    [
        (2, 4, 33, 128, "attention", 2, "plain"),
        (1, 3, 7, 64, "plain", 1, "plain"),
        (2, 1, 5, 16, "attention", 1, "plain"),
        (3, 2, 9, 256, "plain", 3, "plain"),
        # x (and its gradient) contiguous but off alignment: copied
        (2, 3, 7, 64, "misaligned", 2, "plain"),
        # sin the rows of a wider table, a layout the kernel takes but strides other than cos's
        (2, 3, 7, 64, "plain", 2, "pad16"),
        (1, 2, 5, 32, "attention", 1, "pad16"),
    ],
)
def test_rope_kernel(b, heads, s, d, layout, table_batch, sin_layout, dtype):
    x, cos, sin = _rope_inputs(b, heads, s, d, dtype, layout, table_batch)
    g = torch.randn(b, heads, s, d, device="cuda").to(dtype)
    x_layout = "misaligned" if layout == "misaligned" else "plain"
    g, sin = _laid_out(g, x_layout), _laid_out(sin, sin_layout)
    assert sin_layout == "plain" or sin.stride() != cos.stride()
    poison_cuda_cache()
    ok, (dk,) = _grads(lambda t: ops.rope(t, cos, sin), (_laid_out(x, x_layout, grad=True),), g)
    ol, (dl,) = _grads(lambda t: ref.rope(t, cos, sin), (_laid_out(x, x_layout, grad=True),), g)
    assert torch.equal(ok, ol), "forward is not the model's ops bit for bit"
    assert torch.equal(dk, dl), "backward is not autograd's bit for bit"
    assert ok.stride() == x.stride() or ok.is_contiguous()


@pytest.mark.gpu
def test_unaligned_and_odd_widths_fall_back_or_copy():
    torch.manual_seed(3)
    # an offset view (not 16-byte aligned), a width the kernels do not take (12 % 8 != 0)
    base = torch.randn(4, 4097, device="cuda").to(torch.bfloat16)
    x = base[:, 1:]
    w = torch.randn(4096, device="cuda").to(torch.bfloat16)
    assert (ops.rms_norm(x, w) == ref.rms_norm(x, w, 1e-6)).float().mean() > 0.98
    x12, w12 = torch.randn(3, 12, device="cuda").bfloat16(), torch.randn(12, device="cuda").bfloat16()
    assert torch.equal(ops.rms_norm(x12, w12), ref.rms_norm(x12, w12, 1e-6))
    flat = torch.randn(1 + 2 * 999, device="cuda").bfloat16()
    g, u = flat[1:1000], flat[1000:]
    assert torch.equal(ops.silu_mul(g, u), ref.silu_mul(g, u))


@pytest.mark.gpu
def test_opcheck():
    torch.manual_seed(4)
    x = torch.randn(5, 64, device="cuda").bfloat16().requires_grad_(True)
    w = torch.randn(64, device="cuda").bfloat16()
    torch.library.opcheck(torch.ops.hoptune.rms_norm, (x, w, 1e-6))
    g = torch.randn(3, 40, device="cuda").bfloat16().requires_grad_(True)
    u = torch.randn(3, 40, device="cuda").bfloat16().requires_grad_(True)
    torch.library.opcheck(torch.ops.hoptune.silu_mul, (g, u))
    q = torch.randn(1, 2, 3, 32, device="cuda").bfloat16().requires_grad_(True)
    cos, sin = (
        torch.randn(1, 3, 32, device="cuda").bfloat16(),
        torch.randn(1, 3, 32, device="cuda").bfloat16(),
    )
    torch.library.opcheck(torch.ops.hoptune.rope, (q, cos, sin))
    # a dense x whose last stride is not 1: the output's layout (contiguous) as the fake kernel's
    qt = torch.randn(1, 2, 32, 32, device="cuda").bfloat16().transpose(-1, -2).requires_grad_(True)
    cos32, sin32 = (torch.randn(1, 32, 32, device="cuda").bfloat16() for _ in range(2))
    torch.library.opcheck(torch.ops.hoptune.rope, (qt, cos32, sin32))


def test_empty_inputs_take_the_reference():
    # (no rows, no columns: nothing for a kernel to do, and no division by a zero width)
    for x in (torch.randn(0, 16).bfloat16(), torch.randn(3, 0).bfloat16()):
        w = torch.randn(x.shape[-1]).bfloat16()
        assert ops.rms_norm(x, w).shape == x.shape
    assert ops.silu_mul(torch.randn(0, 4), torch.randn(0, 4)).shape == (0, 4)
    assert ops.rope(torch.randn(1, 2, 0, 16), torch.randn(1, 0, 16), torch.randn(1, 0, 16)).shape == (
        1,
        2,
        0,
        16,
    )
