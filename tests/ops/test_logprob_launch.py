"""The log-prob ops' kernel path as an sm_90 GPU takes it, run on the CPU: hoptune._C's launchers
stand in as Python functions over the raw pointers the ops pass (the launchers' own argument
checks, then the reference's values written through the pointers, which autograd does not see,
as a kernel's writes). The gpu-marked tests run the same calls on the kernels."""

from __future__ import annotations

import ctypes

import pytest
import torch

from hoptune import _lib
from hoptune.ops import fused_linear_logprobs, token_logprobs
from hoptune.reference import logprob as ref

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
_DTYPES = {code: dtype for dtype, code in _lib.DTYPE_CODES.items()}


def _raw(ptr: int, shape, strides, dtype: torch.dtype) -> torch.Tensor:
    """A tensor over the CPU memory at ptr, with no autograd history or version of its own."""
    span = 1 + sum((n - 1) * s for n, s in zip(shape, strides))
    buf = (ctypes.c_byte * (span * dtype.itemsize)).from_address(ptr)
    return torch.frombuffer(buf, dtype=dtype).as_strided(shape, strides)


def _refused(op: str):
    # what hoptune._C raises where a launcher's HOPTUNE_REQUIRE fails (csrc/kernels/logprob.cu)
    return RuntimeError(f"hoptune._C.{op} failed: cudaErrorInvalidValue (invalid argument)")


class _Launchers:
    """The launchers that the cases below reach, for fp32 CPU tensors."""

    FUSED_LOGPROB_GEMM_TILE = (256, 192)

    def token_logprobs_fwd(self, logits, dtype, b, t, v, sb, st, labels, ii, inv_t, *outs):
        logp, ent, lse = outs[:3]
        if not (logits and labels and logp and lse and v > 0 and t > 0):
            raise _refused("token_logprobs_fwd")
        if b * t == 0:
            return
        z = _raw(logits, (b, t, v), (sb, st, 1), _DTYPES[dtype])
        y = _raw(labels, (b, t), (t, 1), torch.int64)
        for p, o in zip((logp, ent, lse), ref.token_logprobs_fwd(z, y, 1.0 / inv_t, ii)):
            _raw(p, (b, t), (t, 1), torch.float32).copy_(o)

    def token_logprobs_bwd(
        self, logits, dtype, b, t, v, sb, st, labels, ii, inv_t, lse, ent, gl, gh, out, *_
    ):
        if not (logits and labels and lse and gl and out and t > 0):
            raise _refused("token_logprobs_bwd")
        if b * t == 0:
            return
        z = _raw(logits, (b, t, v), (sb, st, 1), _DTYPES[dtype])
        rows = [_raw(p, (b, t), (t, 1), torch.float32) if p else None for p in (lse, ent, gl, gh)]
        y = _raw(labels, (b, t), (t, 1), torch.int64)
        d = ref.token_logprobs_bwd(z, y, *rows, 1.0 / inv_t, ii)
        _raw(out, (b, t, v), (sb, st, 1), _DTYPES[dtype]).copy_(d)

    def scale_rows(self, j, ld_j, row_scale, out, out_dtype, rows, k, *_):
        if not (j and row_scale and out and k > 0):
            raise _refused("scale_rows")
        if rows == 0:
            return
        jt = _raw(j, (rows, k), (ld_j, 1), torch.float32)
        rs = _raw(row_scale, (rows, 1), (1, 1), torch.float32)
        _raw(out, (rows, k), (k, 1), _DTYPES[out_dtype]).copy_(jt * rs)


@pytest.fixture
def launch(request, monkeypatch):
    """The device to run on; on the CPU, with the kernel path taken through _Launchers (the label
    check keeps its PyTorch path: the kernel's answer goes through pinned memory)."""
    device = request.param
    if device == "cpu":
        monkeypatch.setattr(_lib, "use_kernel", lambda t, op: op != "label_stats")
        monkeypatch.setattr(_lib, "extension", lambda: _Launchers())
        monkeypatch.setattr(_lib, "stream", lambda t: 0)
    return device


@pytest.mark.parametrize("launch", DEVICES, indirect=True)
@pytest.mark.parametrize("shape", [(0,), (2, 0), (0, 3)])
@pytest.mark.parametrize("inplace", [False, True])
def test_token_logprobs_zero_rows_on_the_kernel_path(launch, shape, inplace):
    """No rows (a batch whose loss positions were all selected away, a one-token sequence shifted
    by one): empty log-probs, entropy and gradient, as on the reference, not a refused launch."""
    leaf = torch.randn(*shape, 40, device=launch, requires_grad=True)
    y = torch.zeros(shape, dtype=torch.long, device=launch)
    kw = {"temperature": 0.7, "return_entropy": True, "inplace_backward": inplace}
    lp, ent = token_logprobs(leaf * 1.0, y, **kw)
    assert lp.shape == shape and ent.shape == shape and lp.dtype == torch.float32
    (lp.sum() + ent.sum()).backward()
    assert leaf.grad.shape == leaf.shape


@pytest.mark.parametrize("launch", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(0,), (2, 0)])
def test_fused_linear_logprobs_zero_rows_on_the_kernel_path(launch, dtype, shape):
    """No rows, with the hidden states and the head trained: empty log-probs, empty dh, a zero dW
    (bf16: the fused-GEMM walk; fp32: the vocab-chunked one), not a refused scale_rows launch."""
    g = torch.Generator().manual_seed(0)
    hid = torch.randn(*shape, 16, generator=g).to(dtype).to(launch).requires_grad_(True)
    w = torch.randn(50, 16, generator=g).to(dtype).to(launch).requires_grad_(True)
    y = torch.zeros(shape, dtype=torch.long, device=launch)
    lp = fused_linear_logprobs(hid, w, y, temperature=0.7)
    assert lp.shape == shape and lp.dtype == torch.float32
    lp.sum().backward()
    assert hid.grad.shape == hid.shape and hid.grad.dtype == dtype
    assert w.grad is not None and (w.grad == 0).all()


@pytest.mark.parametrize("launch", DEVICES, indirect=True)
def test_token_logprobs_inplace_backward_is_seen_by_autograd(launch):
    """inplace_backward writes dlogits over the logits. A node that saved the logits and runs
    after (here a z-loss made before the call: autograd runs later-made nodes first) must not
    read that gradient as logits: autograd's version check refuses it, as on the reference path
    (copy_), rather than return a wrong gradient. Alone, the result matches the reference."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 40, generator=g).to(launch)
    y = torch.randint(0, 40, (6,), generator=g).to(launch)
    y[2] = -100
    leaf = z.clone().requires_grad_(True)
    token_logprobs(leaf * 1.0, y, temperature=0.7, inplace_backward=True).sum().backward()
    want = z.clone().requires_grad_(True)
    token_logprobs(want, y, temperature=0.7).sum().backward()
    torch.testing.assert_close(leaf.grad, want.grad, rtol=1e-5, atol=1e-6)

    leaf = z.clone().requires_grad_(True)
    logits = leaf * 1.0
    z_loss = 1e-4 * torch.logsumexp(logits, -1).pow(2).sum()  # saves the logits
    lp = token_logprobs(logits, y, temperature=0.7, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (lp.sum() + z_loss).backward()
    # and a second backward through the same graph
    leaf = z.clone().requires_grad_(True)
    lp = token_logprobs(leaf * 1.0, y, temperature=0.7, inplace_backward=True)
    lp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        lp.sum().backward()
