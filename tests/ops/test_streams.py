"""The kernels launch on the current CUDA stream (hoptune._lib.stream), not the default one, so that
they order with the work queued before them on a side stream (a data loader's copies, an overlap
of communication). Here a side stream first sleeps (~0.1 s), then writes the inputs (NaN until
then), then runs the op forward and backward: a kernel launched on the default stream would run at
once, on the NaN inputs or on buffers the side stream has not written yet. The results must match
the same call made before on the default stream (with the real inputs)."""

from __future__ import annotations

import pytest
import torch

from hoptune import _lib, ops
from hoptune.quant import quantize_nf4
from tests.conftest import poison_cuda_cache, rel_err

# ~0.1 s at the H100 / H200 SM clocks (1.6-2 GHz): far longer than the host takes to queue a call
# below once it has run before (its one-time setup done)
SLEEP_CYCLES = 200_000_000


def _on_a_side_stream(fn, inputs):
    """fn(*staged) on a side stream, where staged (NaN, made on the default stream) receive the
    values of ``inputs`` only after the sleep; synchronized before anything is read (every tensor
    stays referenced until then, so no allocation is reused across the streams early)."""
    staged = [torch.full_like(t, float("nan")) for t in inputs]
    poison_cuda_cache()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        poison_cuda_cache(1 << 28)  # (the side stream's own blocks: the allocator pools them per stream)
        torch.cuda._sleep(SLEEP_CYCLES)
        for s, t in zip(staged, inputs):
            s.copy_(t)
        out = fn(*staged)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # (the side stream's cached blocks, of no use to the next test)
    return out


def _fwd_bwd(op, grad_of):
    """fn(*inputs, g): op's output and the gradients of <output, g> for the inputs at the
    positions ``grad_of`` (leaves made inside fn, on the stream it runs on)."""

    def fn(*args):
        *inputs, g = args
        leaves = [t.detach().clone().requires_grad_(i in grad_of) for i, t in enumerate(inputs)]
        y = op(*leaves)
        y.backward(g)
        return [y.detach()] + [leaves[i].grad for i in grad_of]

    return fn


def _nf4_lora(m, k, n, r=16):
    g = torch.Generator().manual_seed(m + k + n)
    dt = torch.bfloat16
    q = quantize_nf4((torch.randn(n, k, generator=g) * k**-0.5).to(dt).cuda())
    bias = torch.randn(n, generator=g).to(dt).cuda()
    inputs = [
        torch.randn(m, k, generator=g).to(dt).cuda(),
        (torch.randn(r, k, generator=g) * k**-0.5).to(dt).cuda(),
        (torch.randn(n, r, generator=g) * r**-0.5).to(dt).cuda(),
        torch.randn(m, n, generator=g).to(dt).cuda(),
    ]
    fn = _fwd_bwd(lambda x, a, b: ops.nf4_lora_linear(x, q, a, b, 0.75, bias), (0, 1, 2))
    return fn, inputs


def _nf4_dequantize():
    w = torch.randn(300, 512, dtype=torch.bfloat16, device="cuda")
    q = quantize_nf4(w, double_quant=True)

    def fn(absmax2):  # (the second-level absmax: fp32, NaN until written)
        state = (q.packed, q.absmax, absmax2, q.code2, q.offset, q.blocksize, q.blocksize2)
        return [ops.nf4_dequantize(*state, [300, 512], torch.bfloat16)]

    return fn, [q.absmax2]


def _token_logprobs():
    logits = torch.randn(2, 40, 1000, dtype=torch.bfloat16, device="cuda")
    labels = torch.randint(0, 1000, (2, 40), device="cuda")
    g = torch.randn(2, 40, device="cuda")
    # (check_labels off: no host sync inside the op, which would let later launches wait anyway)
    op = lambda x: ops.token_logprobs(x, labels, check_labels=False)  # noqa: E731
    return _fwd_bwd(op, (0,)), [logits, g]


def _fused_linear_logprobs():
    # fp16: the two-pass path. The single-pass ones (bf16, fp32) wait for the stream at their
    # overflow flag, set by NaN inputs, and redo the forward: that redo would read the inputs
    # already written whichever stream it ran on
    hidden = torch.randn(96, 256, dtype=torch.float16, device="cuda")
    weight = (torch.randn(1000, 256, device="cuda") * 256**-0.5).half()
    labels = torch.randint(0, 1000, (96,), device="cuda")
    g = torch.randn(96, device="cuda")
    op = lambda h, w: ops.fused_linear_logprobs(h, w, labels)  # noqa: E731
    return _fwd_bwd(op, (0,)), [hidden, weight, g]


def _rms_norm():
    x = torch.randn(4, 7, 512, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(512, dtype=torch.bfloat16, device="cuda")
    return _fwd_bwd(ops.rms_norm, (0, 1)), [x, w, torch.randn_like(x)]


def _silu_mul():
    gate, up = (torch.randn(64, 688, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    return _fwd_bwd(ops.silu_mul, (0, 1)), [gate, up, torch.randn_like(gate)]


def _rope():
    x = torch.randn(2, 4, 16, 64, dtype=torch.bfloat16, device="cuda")
    cos, sin = (torch.randn(2, 16, 64, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    return _fwd_bwd(ops.rope, (0,)), [x, cos, sin, torch.randn_like(x)]


CASES = {
    "nf4_dequantize": _nf4_dequantize,
    # the paths of nf4_lora_linear: from the codes (4 rows), the fused GEMM (64 rows of a weight of
    # 2^25 elements), the merged weight (300 rows); the backward's dequantize, dY pass and GEMMs
    "nf4_lora_small_m": lambda: _nf4_lora(4, 256, 384),
    "nf4_lora_fused": lambda: _nf4_lora(64, 4096, 8192),
    "nf4_lora_merged": lambda: _nf4_lora(300, 256, 384),
    "token_logprobs": _token_logprobs,
    "fused_linear_logprobs": _fused_linear_logprobs,
    "rms_norm": _rms_norm,
    "silu_mul": _silu_mul,
    "rope": _rope,
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(CASES))
def test_kernels_run_on_the_current_stream(case):
    fn, inputs = CASES[case]()
    assert _lib.kernels_run_on(inputs[0])
    want = fn(*inputs)  # (on the default stream; the one-time setup done here)
    torch.cuda.synchronize()
    got = _on_a_side_stream(fn, inputs)
    for i, (o, w) in enumerate(zip(got, want)):
        assert o.shape == w.shape and torch.isfinite(w).all(), i
        assert torch.isfinite(o).all(), f"output {i}: NaN or inf (read the inputs before they were written?)"
        # (bit for bit but where a kernel sums in no fixed order: the dY pass's fp32 reductions)
        assert rel_err(o, w) < 1e-3, f"output {i}: {rel_err(o, w):.3g} from the default stream's"
