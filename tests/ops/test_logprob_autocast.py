"""fused_linear_logprobs inside torch.autocast: the float inputs are cast to its dtype, as
nn.Linear's are, and the op's own matmuls keep their fp32 outputs (the kernels read the logits
as fp32; autocast would hand them 16-bit ones)."""

from __future__ import annotations

import pytest
import torch

from hoptune.ops import fused_linear_logprobs
from hoptune.ops import logprob as logprob_ops


def _path(monkeypatch, path):
    monkeypatch.setattr(logprob_ops, "_VCHUNK_ON_CPU", path == "vchunk")
    monkeypatch.setattr(logprob_ops, "_GEMM_ON_CPU", path == "gemm")
    monkeypatch.setattr(logprob_ops, "VCHUNK_COLS", 64)
    monkeypatch.setattr(logprob_ops, "GEMM_COLS", 64)


@pytest.mark.parametrize("path", ["row", "vchunk", "gemm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_logprobs_in_autocast_cpu(path, dtype, monkeypatch):
    """In autocast(bf16): the op on bf16 copies of hidden and weight, outside autocast; the
    gradients come back in the inputs' own dtypes."""
    _path(monkeypatch, path)
    g = torch.Generator().manual_seed(0)
    n, h, v = 21, 32, 203
    hid = (torch.randn(n, h, generator=g) * 2).to(dtype).requires_grad_(True)
    w = torch.randn(v, h, generator=g).to(dtype).requires_grad_(True)
    y = torch.randint(0, v, (n,), generator=g)
    y[3] = -100
    up = torch.randn(n, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = fused_linear_logprobs(hid, w, y, temperature=0.8)
        (lp * up).sum().backward()
    hb = hid.detach().bfloat16().requires_grad_(True)
    wb = w.detach().bfloat16().requires_grad_(True)
    ref = fused_linear_logprobs(hb, wb, y, temperature=0.8)
    (ref * up).sum().backward()
    assert lp.dtype == torch.float32
    assert (lp - ref).abs().max().item() <= 1e-5
    assert hid.grad.dtype == dtype and w.grad.dtype == dtype
    assert (hid.grad.float() - hb.grad.float()).abs().max().item() <= 1e-5
    assert (w.grad.float() - wb.grad.float()).abs().max().item() <= 1e-5


def test_fused_linear_logprobs_in_autocast_mixed_dtypes_cpu():
    """In autocast, hidden and weight may differ in dtype (both are cast), as for nn.Linear."""
    g = torch.Generator().manual_seed(1)
    hid = torch.randn(7, 16, generator=g).bfloat16()
    w = torch.randn(50, 16, generator=g)
    b = torch.randn(50, generator=g)
    y = torch.randint(0, 50, (7,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = fused_linear_logprobs(hid, w, y, bias=b)
    ref = fused_linear_logprobs(hid, w.bfloat16(), y, bias=b.bfloat16())
    assert (lp - ref).abs().max().item() <= 1e-5
    with pytest.raises(TypeError, match="weight must have hidden's dtype"):
        fused_linear_logprobs(hid, w, y)  # outside autocast: refused, as before


@pytest.mark.gpu
@pytest.mark.parametrize("entropy", [False, True])  # (the fused-GEMM path / the vocab-chunked one)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_logprobs_in_autocast_gpu(dtype, entropy):
    """On the CUDA kernels, in autocast(bf16): the same as the op on bf16 copies outside autocast
    (fp32 inputs were cast, and the kernels were handed 16-bit logits where they read fp32)."""
    from tests.conftest import poison_cuda_cache

    g = torch.Generator(device="cuda").manual_seed(2)
    n, h, v = 301, 256, 32003
    hid = torch.randn(n, h, generator=g, device="cuda").to(dtype).requires_grad_(True)
    w = (torch.randn(v, h, generator=g, device="cuda") / 16).to(dtype).requires_grad_(True)
    y = torch.randint(0, v, (n,), generator=g, device="cuda")
    y[5] = -100
    up = torch.randn(n, generator=g, device="cuda")
    hb = hid.detach().bfloat16().requires_grad_(True)
    wb = w.detach().bfloat16().requires_grad_(True)
    poison_cuda_cache()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = fused_linear_logprobs(hid, w, y, temperature=0.8, return_entropy=entropy)
    ref = fused_linear_logprobs(hb, wb, y, temperature=0.8, return_entropy=entropy)
    out, ref = (out, ref) if entropy else ((out,), (ref,))
    for a, b in zip(out, ref, strict=True):
        assert a.dtype == torch.float32 and torch.isfinite(a).all()
        assert (a - b).abs().max().item() <= 1e-4
    (out[0] * up).sum().backward()
    (ref[0] * up).sum().backward()
    assert hid.grad.dtype == dtype and w.grad.dtype == dtype
    for a, b in ((hid.grad, hb.grad), (w.grad, wb.grad)):
        scale = b.float().abs().max().item()
        assert (a.float() - b.float()).abs().max().item() <= 2**-7 * scale
