"""token_logprobs and fused_linear_logprobs against an fp64 oracle, on the CPU reference and
(gpu-marked) the CUDA kernels. Tolerances: fp32 inputs, 1e-5 absolute; 16-bit inputs, at most 2x
the error of PyTorch's fp32 computation on the upcast values (plus 1e-6 for fp32 round-off)."""

from __future__ import annotations

import re

import pytest
import torch

from hoptune.ops import fused_linear_logprobs, token_logprobs
from hoptune.ops import logprob as logprob_ops
from tests.conftest import poison_cuda_cache

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def oracle(z, labels, temperature=1.0, ignore_index=-100):
    """fp64 log-probs and entropy (z already float64, differentiable)."""
    lsm = torch.log_softmax(z / temperature, dim=-1)
    valid = labels != ignore_index
    lp = lsm.gather(-1, labels.clamp(min=0)[..., None])[..., 0] * valid
    ent = -(lsm.exp() * lsm).sum(-1) * valid
    return lp, ent


def torch_fp32(z, labels, temperature=1.0, ignore_index=-100):
    return oracle(z.float(), labels, temperature, ignore_index)


def err(a, b):
    return (a.double() - b.double().to(a.device)).abs().max().item()


def _case(shape, v, dtype, device, seed, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(*shape, v, generator=g) * 3).to(dtype).to(device)
    y = torch.randint(0, v, shape, generator=g)
    y[torch.rand(shape, generator=g) < ignore_frac] = -100
    return z, y.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,v", [((7,), 33), ((3, 5), 32001), ((2, 9), 1024), ((130,), 4000)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_fp32(device, shape, v, temperature):
    z, y = _case(shape, v, torch.float32, device, seed=v)
    z.requires_grad_(True)
    lp, ent = token_logprobs(z, y, temperature=temperature, return_entropy=True)
    z64 = z.detach().double().requires_grad_(True)
    rlp, rent = oracle(z64, y, temperature)
    assert err(lp, rlp) <= 1e-5 and err(ent, rent) <= 1e-5
    g = torch.randn(shape, device=device)
    gh = torch.randn(shape, device=device)
    (lp * g + ent * gh).sum().backward()
    (rlp * g.double() + rent * gh.double()).sum().backward()
    assert err(z.grad, z64.grad) <= 1e-5
    ignored = y == -100
    assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all() and (z.grad[ignored] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_token_logprobs_16bit_within_2x_of_torch_fp32(device, dtype):
    z, y = _case((4, 77), 50000, dtype, device, seed=3)
    z.requires_grad_(True)
    lp, ent = token_logprobs(z, y, temperature=0.9, return_entropy=True)
    z64 = z.detach().double().requires_grad_(True)
    rlp, rent = oracle(z64, y, 0.9)
    tlp, tent = torch_fp32(z.detach(), y, 0.9)
    assert err(lp, rlp) <= 2 * err(tlp, rlp) + 1e-6
    assert err(ent, rent) <= 2 * err(tent, rent) + 1e-6
    g = torch.randn(4, 77, device=device)
    lp.backward(g)
    rlp.backward(g.double())
    zt = z.detach().float().requires_grad_(True)
    torch_fp32(zt, y, 0.9)[0].backward(g)
    # gradients are returned in the logits' dtype: compare with the fp32 gradient rounded to it
    ref_err = err(zt.grad.to(dtype), z64.grad)
    assert err(z.grad, z64.grad) <= 2 * ref_err + 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_token_logprobs_shifted_view_no_copy(device):
    """logits[:, :-1] with labels[:, 1:]: a strided 3-D view, handled without a copy."""
    z, y = _case((3, 17), 1000, torch.float32, device, seed=5, ignore_frac=0.0)
    zs, ys = z[:, :-1], y[:, 1:]
    assert not zs.is_contiguous()
    lp = token_logprobs(zs, ys)
    assert err(lp, oracle(zs.double(), ys)[0]) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_token_logprobs_inplace_backward(device):
    z, y = _case((6,), 4096, torch.float32, device, seed=6)
    z64 = z.double().requires_grad_(True)
    oracle(z64, y)[0].sum().backward()
    leaf = z.clone().requires_grad_(True)
    logits = leaf * 1.0  # a non-leaf the op may overwrite
    token_logprobs(logits, y, inplace_backward=True).sum().backward()
    assert err(leaf.grad, z64.grad) <= 1e-5
    assert err(logits.detach(), z64.grad) <= 1e-5  # the buffer now holds dlogits
    # a leaf's buffer would become its own .grad: refused
    with pytest.raises(ValueError, match="logits must be computed by the model"):
        token_logprobs(z.clone().requires_grad_(True), y, inplace_backward=True)


@pytest.mark.parametrize("device", DEVICES)
def test_token_logprobs_inplace_backward_into_a_shifted_view(device):
    """inplace_backward=True on the shifted view logits[:, :-1] (strided, rows apart in memory,
    none shared) writes the gradient into the logits buffer itself, not into a copy: the view's
    elements hold dlogits after the backward and the last position, outside the view, is untouched."""
    z, y = _case((2, 7), 30, torch.float32, device, seed=8, ignore_frac=0.0)
    leaf = z.clone().requires_grad_(True)
    logits = leaf * 1.0
    token_logprobs(logits[:, :-1], y[:, 1:], temperature=0.8, inplace_backward=True).sum().backward()
    z64 = z.double().requires_grad_(True)
    oracle(z64[:, :-1], y[:, 1:], 0.8)[0].sum().backward()
    assert err(leaf.grad, z64.grad) <= 1e-5
    assert err(logits.detach()[:, :-1], z64.grad[:, :-1]) <= 1e-5  # the buffer now holds dlogits
    assert torch.equal(logits.detach()[:, -1], z[:, -1])


def test_token_logprobs_inplace_backward_refuses_a_view_of_a_leaf():
    """The shifted view logits[:, :-1] of a leaf that requires grad (logits detached from the
    model to take their gradient, say): the in-place backward would write the gradient into the
    leaf's own values. Refused, as for the leaf itself; a view of computed logits is taken."""
    z, y = _case((2, 6), 40, torch.float32, "cpu", seed=7)
    leaf = z.clone().requires_grad_(True)
    with pytest.raises(ValueError, match="nor a view of one"):
        token_logprobs(leaf[:, :-1], y[:, 1:], inplace_backward=True)
    assert torch.equal(leaf.detach(), z)
    token_logprobs((leaf * 1.0)[:, :-1], y[:, 1:], inplace_backward=True).sum().backward()
    assert torch.equal(leaf.detach(), z)
    z64 = z.double().requires_grad_(True)
    oracle(z64[:, :-1], y[:, 1:])[0].sum().backward()
    assert err(leaf.grad, z64.grad) <= 1e-5


# logits views for the backward versions: (rows shape, vocab, how the logits are laid out)
BWD_CASES = {
    "rows": ((37,), 20000, "contiguous"),  # several rounds per row, a partial last round and tile
    "small_vocab": ((6,), 40, "contiguous"),  # fewer 16-byte units than threads
    "odd_vocab": ((2, 9), 32001, "contiguous"),  # V % 8 != 0: the scalar path
    "shifted_view": ((3, 16), 4096, "shifted"),  # logits[:, :-1] of (3, 17, V): strided 3-D view
    "misaligned": ((11,), 4096, "offset"),  # pointer one element past 16-byte alignment: scalar
}


def _bwd_view(base: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "shifted":
        return base[:, :-1]
    if layout == "offset":
        return base[:, 1:]
    return base


@pytest.mark.gpu
@pytest.mark.parametrize("variant", logprob_ops._BWD_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(BWD_CASES))
def test_token_logprobs_backward_variants_gpu(variant, dtype, case, monkeypatch):
    """Every numbered backward kernel version: the gradient of log-probs and entropy (temperature,
    ignored rows, labels at both ends of a row) against fp64, out of place and in place, on
    contiguous, strided and unaligned logits. fp32: 1e-5 absolute; 16-bit: at most 2x the error
    of PyTorch's fp32 gradient rounded to the logits' dtype (plus 1e-6)."""
    monkeypatch.setattr(logprob_ops, "_BWD_VARIANT", variant)  # restored after the test
    shape, v, layout = BWD_CASES[case]
    base_shape = (shape[0], shape[1] + 1) if layout == "shifted" else shape
    z, y = _case(base_shape, v + (layout == "offset"), dtype, "cuda", seed=v + len(shape), ignore_frac=0.25)
    if layout == "shifted":
        y = y[:, 1:].contiguous()  # labels shifted against the logits, as in a causal LM
    y = y.clamp(max=v - 1)
    flat = y.view(-1)
    flat[0], flat[1], flat[-1] = 0, v - 1, -100  # both ends of a row, and an ignored row
    g = torch.randn(shape, device="cuda")
    gh = torch.randn(shape, device="cuda")
    temperature = 0.8

    def grads(zb, inplace):
        logits = _bwd_view(zb * 1.0, layout)  # a non-leaf the in-place backward may overwrite
        lp, ent = token_logprobs(
            logits, y, temperature=temperature, return_entropy=True, inplace_backward=inplace
        )
        return torch.autograd.grad((lp * g + ent * gh).sum(), zb)[0]

    poison_cuda_cache()
    leaf = z.detach().requires_grad_(True)
    ours = grads(leaf, inplace=False)
    ours_inplace = grads(leaf, inplace=True)
    z64 = z.detach().double().requires_grad_(True)
    rlp, rent = oracle(_bwd_view(z64, layout), y, temperature)
    (rlp * g.double() + rent * gh.double()).sum().backward()
    assert torch.equal(ours_inplace, ours)
    assert (_bwd_view(ours, layout)[y == -100] == 0).all()
    if dtype == torch.float32:
        assert err(ours, z64.grad) <= 1e-5
    else:
        zt = z.detach().float().requires_grad_(True)
        tlp, tent = torch_fp32(_bwd_view(zt, layout), y, temperature)
        (tlp * g + tent * gh).sum().backward()
        assert err(ours, z64.grad) <= 2 * err(zt.grad.to(dtype), z64.grad) + 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("variant", logprob_ops._FWD_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(BWD_CASES))
def test_token_logprobs_forward_variants_gpu(variant, dtype, case, monkeypatch):
    """Every numbered forward kernel version: log-probs, entropy and lse (temperature, ignored rows,
    labels at both ends of a row, a run of -inf logits) against fp64 on contiguous, strided and
    unaligned logits. fp32: 1e-5 absolute; 16-bit: at most 2x the error of PyTorch in fp32."""
    monkeypatch.setattr(logprob_ops, "_FWD_VARIANT", variant)  # restored after the test
    shape, v, layout = BWD_CASES[case]
    base_shape = (shape[0], shape[1] + 1) if layout == "shifted" else shape
    z, y = _case(base_shape, v + (layout == "offset"), dtype, "cuda", seed=v + 7, ignore_frac=0.25)
    if layout == "shifted":
        y = y[:, 1:].contiguous()
    y = y.clamp(max=v - 1)
    flat = y.view(-1)
    flat[0], flat[1], flat[-1] = 0, v - 1, -100
    logits = _bwd_view(z, layout)
    row = (0,) * (logits.dim() - 2) + (2,)
    logits[row][-16:] = float("-inf")  # a masked tail in one row (written through the view)
    y[row] = 0  # (its label unmasked)
    poison_cuda_cache()
    lp, ent = token_logprobs(logits, y, temperature=0.8, return_entropy=True)
    z64 = logits.double().masked_fill(logits.isinf(), -1e4)
    rlp, rent = oracle(z64, y, 0.8)
    for name, ours, ref in (("logp", lp, rlp), ("entropy", ent, rent)):
        assert torch.isfinite(ours).all(), name
        if dtype == torch.float32:
            assert err(ours, ref) <= 1e-5, name
    if dtype != torch.float32:
        tlp, tent = torch_fp32(logits.float().masked_fill(logits.isinf(), -1e4), y, 0.8)
        assert err(lp, rlp) <= 2 * err(tlp, rlp) + 1e-6
        assert err(ent, rent) <= 2 * err(tent, rent) + 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_entropy_grad", [False, True])
@pytest.mark.parametrize("shape,v", [((3, 5), 33), ((40,), 4096)])
def test_token_logprobs_masked_logits(device, with_entropy_grad, shape, v):
    """Logits of -inf (tokens masked out) add nothing to the entropy and get a zero gradient:
    log-probs, entropy and gradients finite and equal to the fp64 oracle on the logits with the
    masked ones at -1e4 (exp underflows to exactly 0 there)."""
    z, y = _case(shape, v, torch.float32, device, seed=v)
    g = torch.Generator().manual_seed(1)
    masked = (torch.rand(*shape, v, generator=g) < 0.3).to(device)
    masked[..., :64] = True  # a whole leading run (every thread's first values, on a short row all)
    masked.scatter_(-1, y.clamp(min=0)[..., None], False)  # (not the label's own logit)
    z = z.masked_fill(masked, float("-inf"))
    leaf = z.detach().requires_grad_(True)
    lp, ent = token_logprobs(leaf, y, temperature=0.9, return_entropy=True)
    gl = torch.randn(shape, generator=g).to(device)
    gh = torch.randn(shape, generator=g).to(device)
    loss = (lp * gl).sum() + ((ent * gh).sum() if with_entropy_grad else 0)
    loss.backward()
    z64 = z.detach().double().masked_fill(masked, -1e4).requires_grad_(True)
    rlp, rent = oracle(z64, y, 0.9)
    ((rlp * gl.double()).sum() + ((rent * gh.double()).sum() if with_entropy_grad else 0)).backward()
    for name, ours, ref in (("logp", lp, rlp), ("entropy", ent, rent), ("grad", leaf.grad, z64.grad)):
        assert torch.isfinite(ours).all(), name
        assert err(ours, ref) <= 1e-5, name
    assert (leaf.grad[masked] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_token_logprobs_expanded_logits(device):
    """Logits whose rows share memory (expand) get each row's gradient summed into the shared
    rows, as autograd does for any op."""
    z, y = _case((1, 6), 40, torch.float32, device, seed=5, ignore_frac=0.0)
    y = torch.randint(0, 40, (3, 6), generator=torch.Generator().manual_seed(2)).to(device)
    leaf = z.detach().requires_grad_(True)
    lp, ent = token_logprobs(leaf.expand(3, 6, 40), y, return_entropy=True)
    (lp.sum() + ent.sum()).backward()
    z64 = z.detach().double().requires_grad_(True)
    rlp, rent = oracle(z64.expand(3, 6, 40), y)
    (rlp.sum() + rent.sum()).backward()
    assert err(leaf.grad, z64.grad) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_token_logprobs_two_strided_upstream_gradients(device):
    """Both upstream gradients non-contiguous (from sum(): expanded) and different: each is copied
    for the kernel, and the first copy must live until the launch (freed early, the second copy
    could take its memory and be read as the log-prob gradient)."""
    z, y = _case((3, 6), 40, torch.float32, device, seed=6, ignore_frac=0.2)
    leaf = z.detach().requires_grad_(True)
    lp, ent = token_logprobs(leaf, y, return_entropy=True)
    (lp.sum() - 2.5 * ent.sum()).backward()
    z64 = z.detach().double().requires_grad_(True)
    rlp, rent = oracle(z64, y)
    (rlp.sum() - 2.5 * rent.sum()).backward()
    assert err(leaf.grad, z64.grad) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplace", [False, True])
def test_token_logprobs_overlapping_rows(device, inplace):
    """Rows that overlap in memory without a zero stride (sliding windows from unfold) are copied
    like expanded rows: each window's gradient adds into the elements it shares with its
    neighbours, as autograd does, instead of the windows' gradients overwriting one another (out
    of place, or in place in the logits)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 40, generator=g).to(device)
    y = torch.randint(0, 12, (2, 8), generator=g).to(device)
    y[0, 3] = -100
    gl = torch.randn(2, 8, generator=g).to(device)
    gh = torch.randn(2, 8, generator=g).to(device)

    def run(b, fn):
        leaf = b.detach().clone().requires_grad_(True)
        lp, ent = fn((leaf * 1.0).unfold(1, 12, 4))  # (2, 8, 12), strides (40, 4, 1)
        ((lp * gl).sum() + (ent * gh).sum()).backward()
        return lp, ent, leaf.grad

    ours = run(base, lambda z: token_logprobs(z, y, 0.8, return_entropy=True, inplace_backward=inplace))
    ref = run(base.double(), lambda z: oracle(z, y, 0.8))
    for name, a, b in zip(("logp", "entropy", "grad"), ours, ref):
        assert err(a, b) <= 1e-5, name


def test_token_logprobs_overlapping_rows_gradcheck():
    """The same in fp64 (the reference): gradcheck of log-probs and entropy on unfold windows."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(20, dtype=torch.float64, generator=g).requires_grad_(True)
    y = torch.randint(0, 6, (8,), generator=g)
    y[5] = -100
    assert torch.autograd.gradcheck(
        lambda b: token_logprobs(b.unfold(0, 6, 2), y, temperature=0.7, return_entropy=True), (base,)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_token_logprobs_fp64(device):
    """fp64 logits run the reference (on the GPU too) and give fp64 results."""
    z, y = _case((2, 7), 50, torch.float64, device, seed=9)
    leaf = z.detach().requires_grad_(True)
    lp, ent = token_logprobs(leaf, y, return_entropy=True)
    assert lp.dtype == ent.dtype == torch.float64
    (lp.sum() + ent.sum()).backward()
    z64 = z.detach().requires_grad_(True)
    rlp, rent = oracle(z64, y)
    (rlp.sum() + rent.sum()).backward()
    assert err(lp, rlp) <= 1e-12 and err(ent, rent) <= 1e-12 and err(leaf.grad, z64.grad) <= 1e-12


@pytest.mark.parametrize("device", DEVICES)
def test_token_logprobs_bad_input(device):
    z, y = _case((4,), 10, torch.float32, device, seed=1, ignore_frac=0.0)
    y[2] = 10
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\) or ignore_index=-100; got 10"):
        token_logprobs(z, y)
    y[2] = -5
    with pytest.raises(ValueError, match="got -5"):
        token_logprobs(z, y)
    with pytest.raises(ValueError, match="labels must have shape"):
        token_logprobs(z, y[:3])
    with pytest.raises(TypeError, match="labels must be int64"):
        token_logprobs(z, y.float())
    with pytest.raises(TypeError, match="logits must be"):
        token_logprobs(z.int(), y.clamp(0, 9))
    for t in (0.0, float("inf"), float("nan")):  # (inf: every log-prob -log V, silently)
        with pytest.raises(ValueError, match="temperature must be a positive finite number"):
            token_logprobs(z, y.clamp(0, 9), temperature=t)


@pytest.mark.parametrize("device", DEVICES)
def test_int32_labels_give_what_int64_labels_give(device):
    """int32 labels (accepted beside int64) give both ops the log-probs and gradients of the same
    labels in int64, ignored positions included (the kernels read int64 labels). dW adds each
    label's row with index_add_, whose CUDA atomics sum repeated labels in any order, so dW is
    compared to fp32 rounding (a label read wrongly moves whole rows)."""
    z, y = _case((3, 9), 40, torch.float32, device, seed=12)
    _, _, b, _ = _fused_case(27, 32, 40, torch.float32, device, seed=12)
    hid, w, _, _ = _fused_case(27, 32, 40, torch.float32, device, seed=13)
    outs = []
    for labels in (y, y.int()):
        zl = z.clone().requires_grad_(True)
        lp = token_logprobs(zl, labels, temperature=0.7)
        lp.sum().backward()
        hl, wl = hid.clone().requires_grad_(True), w.clone().requires_grad_(True)
        lpf = fused_linear_logprobs(hl, wl, labels.reshape(-1), bias=b, temperature=0.7)
        lpf.sum().backward()
        outs.append((lp, zl.grad, lpf, hl.grad, wl.grad))
    for name, a, c in zip(("logp", "dlogits", "fused logp", "dhidden"), *outs):
        assert torch.equal(a, c), name
    torch.testing.assert_close(outs[0][4], outs[1][4], rtol=1e-6, atol=1e-6, msg="dweight")


def test_fused_chunks_hold_at_least_64_rows_for_any_vocabulary():
    # CHUNK_BYTES of fp32 logits hold fewer than 64 rows of a vocabulary above 512k: the chunk is
    # then 64 rows (above the budget), never 0 rows (no progress)
    from hoptune.ops.logprob import CHUNK_BYTES, _chunk_rows

    assert _chunk_rows(CHUNK_BYTES // (4 * 64), 0) == 64
    assert _chunk_rows(4 * CHUNK_BYTES, 0) == 64
    assert _chunk_rows(32000, 0) == CHUNK_BYTES // (4 * 32000) // 64 * 64
    assert _chunk_rows(32000, 7) == 7


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_token_logprobs_ignored_rows_large_logits(device, temperature):
    """An ignored row gets a zero gradient whatever its logits: logits above exp's fp32 range
    (here through a low temperature) must not turn it into nan (0 * inf)."""
    z, y = _case((4, 6), 50, torch.float32, device, seed=11, ignore_frac=0.0)
    z[0, 1] += 100.0
    z[2, 3] += 30.0
    y[0, 1] = -100
    y[2, 3] = -100
    leaf = z.detach().requires_grad_(True)
    lp, ent = token_logprobs(leaf, y, temperature=temperature, return_entropy=True)
    gl, gh = torch.randn(4, 6, device=device), torch.randn(4, 6, device=device)
    ((lp * gl).sum() + (ent * gh).sum()).backward()
    z64 = z.detach().double().requires_grad_(True)
    rlp, rent = oracle(z64, y, temperature)
    ((rlp * gl.double()).sum() + (rent * gh.double()).sum()).backward()
    assert torch.isfinite(leaf.grad).all()
    assert (leaf.grad[y == -100] == 0).all()
    assert err(leaf.grad, z64.grad) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_token_logprobs_ignored_rows_take_no_upstream_nan(device):
    """An ignored position gets a zero gradient whatever the upstream gradient holds there: a nan
    or inf (a caller's 0 * inf at a masked position, e.g. exp of a log-ratio times a zero mask)
    must not reach the logits, as with cross_entropy(ignore_index=...) and the CUDA kernel."""
    z, y = _case((2, 5), 17, torch.float32, device, seed=3, ignore_frac=0.0)
    y[0, 1] = y[1, 4] = -100
    ignored = y == -100
    grads = []
    for bad in (float("nan"), float("inf"), 0.0):
        leaf = z.detach().requires_grad_(True)
        lp, ent = token_logprobs(leaf, y, return_entropy=True)
        gl, gh = torch.ones_like(lp), torch.ones_like(ent)
        gl[ignored], gh[ignored] = bad, -bad
        torch.autograd.backward((lp, ent), (gl, gh))
        grads.append(leaf.grad)
    assert (grads[2][ignored] == 0).all()
    assert torch.equal(grads[0], grads[2]) and torch.equal(grads[1], grads[2])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(5,), (2, 3)])
@pytest.mark.parametrize("mode", ["train", "frozen", "no_grad"])
def test_token_logprobs_in_place_on_the_outputs(device, shape, mode):
    """The log-probs (and, without a graph, the entropy) take in-place ops, as a fresh tensor
    does (lp *= mask in training; a frozen reference model's log-probs combined in place with a
    term that requires grad): they are not views of the op's flat results, which autograd refuses
    to modify in place. (In training the entropy is saved for the backward, as softmax's output is:
    modified in place, autograd's version check names it.)"""
    z, y = _case(shape, 11, torch.float32, device, seed=12)
    leaf = z.detach().requires_grad_(mode == "train")
    with torch.set_grad_enabled(mode != "no_grad"):
        lp, ent = token_logprobs(leaf * 1.0, y, return_entropy=True)
    want_lp, want_ent = lp.detach().clone(), ent.detach().clone()
    other = torch.randn(shape, device=device, requires_grad=True)
    mask = (torch.rand(shape) < 0.5).float().to(device)
    lp *= mask
    lp -= other
    if mode != "train":
        ent += other
        assert torch.equal(ent.detach(), want_ent + other.detach())
    (2 * lp + ent).sum().backward()
    assert torch.equal(lp.detach(), want_lp * mask - other.detach())
    assert torch.equal(other.grad, torch.full_like(other, -2.0 if mode == "train" else -1.0))
    if mode == "train":
        z64 = z.detach().double().requires_grad_(True)
        rlp, rent = oracle(z64, y)
        (2 * rlp * mask.double() + rent).sum().backward()
        assert err(leaf.grad, z64.grad) <= 1e-5


def test_token_logprobs_gradcheck_fp64():
    """fp64 logits (the reference): gradcheck of log-probs and entropy together, with ignored
    positions, a temperature and a shifted 3-D view; the backward is not itself differentiable,
    so a second derivative is an error, not a silently wrong value."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 5, 9, dtype=torch.float64, generator=g).requires_grad_(True)
    y = torch.randint(0, 9, (2, 4), generator=g)
    y[0, 1] = -100

    def f(z):
        lp, ent = token_logprobs(z[:, :-1], y, temperature=0.7, return_entropy=True)
        return lp, ent

    assert torch.autograd.gradcheck(f, (base,))
    w = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    (dz,) = torch.autograd.grad((f(base)[0] * w).sum(), base, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        (dz * dz).sum().backward()


def test_token_logprobs_fake_matches_reference():
    """The ops' fake (meta) outputs, which torch.compile's code is generated from, have the
    dtype and strides of what the reference returns: fp64 logits give fp64, and the logits'
    gradient of a shifted (strided) view has the view's strides."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 11, (2, 5), generator=g)
    y[1, 2] = -100
    views = {
        dtype: torch.randn(2, 6, 11, dtype=dtype, generator=g)[:, :-1]
        for dtype in (torch.float32, torch.float64)
    }
    for z in views.values():
        torch.library.opcheck(
            torch.ops.hoptune.token_logprobs, (z, y, 0.7, -100, False), test_utils=("test_faketensor",)
        )
    for dtype, z in views.items():
        _, ent, lse = torch.ops.hoptune.token_logprobs(z, y, 0.7, -100, False)
        grad = torch.randn(2, 5, dtype=dtype, generator=g)
        torch.library.opcheck(
            torch.ops.hoptune.token_logprobs_backward,
            (z, y, lse, ent, grad, None, 0.7, -100),
            test_utils=("test_faketensor",),
        )


def _fused_case(n, h, v, dtype, device, seed, ignore_frac=0.25):
    g = torch.Generator().manual_seed(seed)
    hid = torch.randn(n, h, generator=g).to(dtype).to(device)
    w = (torch.randn(v, h, generator=g) * h**-0.5 * 2).to(dtype).to(device)
    b = torch.randn(v, generator=g).to(dtype).to(device)
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < ignore_frac] = -100
    return hid, w, b, y.to(device)


def fused_oracle(hid, w, b, y, temperature=1.0, softcap=None, scale=1.0):
    z = hid @ w.t()
    if b is not None:
        z = z + b
    z = z * scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return oracle(z, y, temperature)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "kw",
    [{}, {"temperature": 0.8}, {"softcap": 5.0, "scale": 0.5}, {"bias": True}],
)
@pytest.mark.parametrize("chunk_rows", [0, 7])
def test_fused_linear_logprobs_fp32(device, kw, chunk_rows):
    hid, w, b, y = _fused_case(45, 64, 1001, torch.float32, device, seed=len(kw))
    bias = b if kw.get("bias") else None
    hid.requires_grad_(True)
    lp, ent = fused_linear_logprobs(
        hid,
        w,
        y,
        bias=bias,
        temperature=kw.get("temperature", 1.0),
        softcap=kw.get("softcap"),
        logit_scale=kw.get("scale", 1.0),
        chunk_rows=chunk_rows,
        return_entropy=True,
    )
    h64 = hid.detach().double().requires_grad_(True)
    rlp, rent = fused_oracle(
        h64,
        w.double(),
        None if bias is None else bias.double(),
        y,
        kw.get("temperature", 1.0),
        kw.get("softcap"),
        kw.get("scale", 1.0),
    )
    assert err(lp, rlp) <= 1e-5 and err(ent, rent) <= 1e-5
    g = torch.randn(45, device=device)
    lp.backward(g)
    rlp.backward(g.double())
    assert err(hid.grad, h64.grad) <= 1e-5
    assert (hid.grad[y == -100] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ignore_index", [5, -1])
def test_an_ignore_index_other_than_minus_100(device, ignore_index):
    """ignore_index is the caller's: a token id (a pad id used as the ignore label) or another
    negative number; -100 is then an out-of-range label, and the token id ``ignore_index`` itself is
    ignored wherever it stands, in both ops and their gradients."""
    z, y = _case((6, 7), 50, torch.float32, device, seed=11)
    y = torch.where(y == -100, ignore_index, y)
    if ignore_index >= 0:
        y[0, :3] = ignore_index
    ignored = y == ignore_index
    assert ignored.any() and (~ignored).any()
    z.requires_grad_(True)
    lp, ent = token_logprobs(z, y, ignore_index=ignore_index, return_entropy=True)
    z64 = z.detach().double().requires_grad_(True)
    rlp, rent = oracle(z64, y, ignore_index=ignore_index)
    assert err(lp, rlp) <= 1e-5 and err(ent, rent) <= 1e-5
    g = torch.randn(6, 7, device=device)
    lp.backward(g)
    rlp.backward(g.double())
    assert err(z.grad, z64.grad) <= 1e-5 and (z.grad[ignored] == 0).all()
    with pytest.raises(ValueError, match=rf"or ignore_index={ignore_index}; got -100"):
        token_logprobs(z, torch.where(ignored, -100, y), ignore_index=ignore_index)

    hid, w, _, y2 = _fused_case(21, 32, 50, torch.float32, device, seed=12)
    y2 = torch.where(y2 == -100, ignore_index, y2)
    if ignore_index >= 0:
        y2[:4] = ignore_index
    hid.requires_grad_(True)
    lp2 = fused_linear_logprobs(hid, w, y2, ignore_index=ignore_index, chunk_rows=8)
    h64 = hid.detach().double().requires_grad_(True)
    z2 = h64 @ w.double().t()
    r2 = oracle(z2, y2, ignore_index=ignore_index)[0]
    assert err(lp2, r2) <= 1e-5
    g2 = torch.randn(21, device=device)
    lp2.backward(g2)
    r2.backward(g2.double())
    assert err(hid.grad, h64.grad) <= 1e-5 and (hid.grad[y2 == ignore_index] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_fused_linear_logprobs_weight_and_bias_grad(device):
    hid, w, b, y = _fused_case(33, 32, 300, torch.float32, device, seed=9)
    for t in (hid, w, b):
        t.requires_grad_(True)
    lp = fused_linear_logprobs(hid, w, y, bias=b, softcap=4.0, chunk_rows=10)
    g = torch.randn(33, device=device)
    lp.backward(g)
    h64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (hid, w, b))
    fused_oracle(h64, w64, b64, y, softcap=4.0)[0].backward(g.double())
    for a, r in ((hid, h64), (w, w64), (b, b64)):
        assert err(a.grad, r.grad) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_fused_linear_logprobs_bias_grad_of_a_frozen_weight(device):
    """Only the bias trained (the weight frozen, the hidden states a constant): the bias gets its
    gradient, the weight none."""
    hid, w, b, y = _fused_case(33, 32, 300, torch.float32, device, seed=10)
    b.requires_grad_(True)
    lp = fused_linear_logprobs(hid, w, y, bias=b, temperature=0.9, chunk_rows=10)
    g = torch.randn(33, device=device)
    lp.backward(g)
    b64 = b.detach().double().requires_grad_(True)
    fused_oracle(hid.double(), w.double(), b64, y, temperature=0.9)[0].backward(g.double())
    assert w.grad is None and err(b.grad, b64.grad) <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,h,v", [(300, 256, 32001), (1000, 512, 50304)])
def test_fused_linear_logprobs_16bit_gpu(dtype, n, h, v):
    """16-bit hidden/weight. Log-probs: the logits come from a tensor-core GEMM (exact 16-bit
    products, fp32 accumulation); PyTorch's fp32 computation on the upcast values with TF32
    tensor cores is the same arithmetic class (TF32 holds bf16/fp16 values exactly), and the
    kernel alone is checked against fp64 on the very logits the GEMM produced. Gradient: against
    PyTorch's full-fp32 gradient rounded to the hidden dtype."""
    hid, w, _, y = _fused_case(n, h, v, dtype, "cuda", seed=n)
    poison_cuda_cache()
    hid.requires_grad_(True)
    lp, ent = fused_linear_logprobs(hid, w, y, return_entropy=True, temperature=0.9)
    h64 = hid.detach().double().requires_grad_(True)
    rlp, rent = fused_oracle(h64, w.double(), None, y, 0.9)
    prev = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        tlp, tent = fused_oracle(hid.detach().float(), w.float(), None, y, 0.9)
        torch.backends.cuda.matmul.allow_tf32 = False
        ht = hid.detach().float().requires_grad_(True)
        t32 = fused_oracle(ht, w.float(), None, y, 0.9)[0]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    assert err(lp, rlp) <= 2 * err(tlp, rlp) + 1e-6
    assert err(ent, rent) <= 2 * err(tent, rent) + 1e-6
    same_logits = torch.mm(hid.detach(), w.t(), out_dtype=torch.float32).double()
    klp, kent = oracle(same_logits, y, 0.9)
    assert err(lp, klp) <= 1e-5 and err(ent, kent) <= 1e-5
    g = torch.randn(n, device="cuda")
    lp.backward(g)
    rlp.backward(g.double())
    t32.backward(g)
    ref_err = err(ht.grad.to(dtype), h64.grad)
    ours = err(hid.grad, h64.grad)
    print(f"grad error ours {ours:.3g} vs torch fp32 rounded to {dtype}: {ref_err:.3g}")
    assert ours <= 2 * ref_err + 1e-6


# (keyword, value, message): scalar arguments of the wrong type, named in the error (not a bare
# TypeError from int() or a comparison, nor a float ignore_index truncated silently)
_BAD_SCALARS = [
    ("ignore_index", None, "ignore_index must be an integer, got None"),
    ("ignore_index", -100.5, "ignore_index must be an integer, got -100.5"),
    ("ignore_index", "-100", "ignore_index must be an integer, got '-100'"),
    ("temperature", None, "temperature must be a real number, got None"),
    ("temperature", "1.0", "temperature must be a real number, got '1.0'"),
    ("temperature", torch.tensor([1.0, 2.0]), "temperature must be a real number"),
    ("temperature", True, "temperature must be a real number, got True"),
    ("ignore_index", False, "ignore_index must be an integer, got False"),
    ("ignore_index", torch.tensor(True), "ignore_index must be an integer, got tensor(True)"),
]


@pytest.mark.parametrize(("kw", "value", "msg"), _BAD_SCALARS)
def test_token_logprobs_scalar_argument_types(kw, value, msg):
    z, y = _case((4,), 10, torch.float32, "cpu", seed=1, ignore_frac=0.0)
    with pytest.raises(TypeError, match=re.escape(msg)):
        token_logprobs(z, y, **{kw: value})
    # numbers of other types are taken as their value
    ref = token_logprobs(z, y, temperature=0.5)
    got = token_logprobs(z, y, temperature=torch.tensor(0.5), ignore_index=torch.tensor(-100))
    assert torch.equal(got, ref)


@pytest.mark.parametrize(
    ("kw", "value", "msg"),
    [
        *_BAD_SCALARS,
        ("softcap", "30", "softcap must be a real number (or None), got '30'"),
        ("logit_scale", None, "logit_scale must be a real number, got None"),
        ("chunk_rows", 1.5, "chunk_rows must be an integer, got 1.5"),
    ],
)
def test_fused_linear_logprobs_scalar_argument_types(kw, value, msg):
    hid, w, _, y = _fused_case(5, 16, 50, torch.float32, "cpu", seed=2, ignore_frac=0.0)
    with pytest.raises(TypeError, match=re.escape(msg)):
        fused_linear_logprobs(hid, w, y, **{kw: value})


@pytest.mark.parametrize("device", DEVICES)
def test_fused_linear_logprobs_bad_input(device):
    hid, w, _, y = _fused_case(5, 16, 50, torch.float32, device, seed=2, ignore_frac=0.0)
    with pytest.raises(ValueError, match="weight must be"):
        fused_linear_logprobs(hid, w[:, :8], y)
    for dtype in (torch.float64, torch.int64, torch.int8):  # (integers: not an error from a matmul)
        with pytest.raises(TypeError, match=f"weight must have hidden's dtype torch.float32, got {dtype}"):
            fused_linear_logprobs(hid, w.to(dtype), y)
    y2 = y.clone()
    y2[0] = 50
    with pytest.raises(ValueError, match=r"labels must be in \[0, 50\)"):
        fused_linear_logprobs(hid, w, y2)
    with pytest.raises(ValueError, match="softcap"):
        fused_linear_logprobs(hid, w, y, softcap=-1.0)
    for scale in (float("nan"), float("inf")):  # (every log-prob would be nan)
        with pytest.raises(ValueError, match="logit_scale must be a finite number"):
            fused_linear_logprobs(hid, w, y, logit_scale=scale)
    # (B, T) labels with some ignored: the position is reported in the labels' own shape
    hid3 = hid[:4].reshape(2, 2, 16)
    y3 = y[:4].reshape(2, 2).clone()
    y3[0, 0] = -100
    y3[1, 0] = -3
    with pytest.raises(ValueError, match=r"got -3 at position \(1, 0\)"):
        fused_linear_logprobs(hid3, w, y3)
    with pytest.raises(ValueError, match="empty vocabulary"):
        fused_linear_logprobs(hid, w[:0], y)
    with pytest.raises(ValueError, match="empty vocabulary"):
        fused_linear_logprobs(hid, w[:0], torch.full_like(y, -100))
    with pytest.raises(ValueError, match="hidden must be"):
        fused_linear_logprobs(hid[0, 0], w, y[0])
    # only 0 means auto: a negative count is refused, not taken as auto
    for rows in (-5, -1):
        with pytest.raises(ValueError, match="chunk_rows must be 0 \\(auto\\) or a positive"):
            fused_linear_logprobs(hid, w, y, chunk_rows=rows)
    # an empty hidden dimension, named (not a bare reshape error)
    with pytest.raises(ValueError, match=r"empty hidden dimension \(H = 0\)"):
        fused_linear_logprobs(hid[:, :0], w[:, :0], y)
    # the bias must have the weight's dtype, as in F.linear (not cast silently)
    _, _, b, _ = _fused_case(5, 16, 50, torch.float32, device, seed=2)
    for bad in (b.long(), b.double()):
        with pytest.raises(TypeError, match=f"bias must have hidden's dtype torch.float32, got {bad.dtype}"):
            fused_linear_logprobs(hid, w, y, bias=bad)


def test_unchecked_out_of_range_label_cpu():
    """check_labels=False on the CPU: the labels are checked anyway (free there), so an
    out-of-range label is the error naming labels, not a bare index error from a gather (the CUDA
    kernels give nan for such a row instead: tests/ops/test_host_checks.py)."""
    z, y = _case((2, 4), 10, torch.float32, "cpu", seed=1, ignore_frac=0.0)
    hid, w, _, _ = _fused_case(8, 16, 10, torch.float32, "cpu", seed=2)
    hid = hid.reshape(2, 4, 16)
    for label in (10, -7):
        bad = y.clone()
        bad[1, 2] = label
        msg = rf"labels must be in \[0, 10\) or ignore_index=-100; got {label} at position \(1, 2\)"
        with pytest.raises(ValueError, match=msg):
            token_logprobs(z, bad, check_labels=False)
        with pytest.raises(ValueError, match=msg):
            fused_linear_logprobs(hid, w, bad, check_labels=False)
    # in-range labels: the same results as with the check
    assert torch.equal(token_logprobs(z, y, check_labels=False), token_logprobs(z, y))
    assert torch.equal(fused_linear_logprobs(hid, w, y, check_labels=False), fused_linear_logprobs(hid, w, y))


def test_token_logprobs_inplace_backward_leaf_under_no_grad():
    """Under no_grad no backward runs, so nothing is written into the logits: a leaf that
    requires grad is taken with inplace_backward=True (refused only where a graph is built)."""
    z, y = _case((2, 6), 40, torch.float32, "cpu", seed=7)
    leaf = z.clone().requires_grad_(True)
    with torch.no_grad():
        lp = token_logprobs(leaf, y, inplace_backward=True)
    assert torch.equal(lp, token_logprobs(z, y))
    assert torch.equal(leaf.detach(), z) and leaf.grad is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(5,), (2, 3)])
@pytest.mark.parametrize("mode", ["train", "frozen", "no_grad"])
def test_fused_linear_logprobs_in_place_on_the_outputs(device, shape, mode):
    """The log-probs and entropy take in-place ops with grad on, as a fresh tensor does (a frozen
    reference model's log-probs, computed under no_grad, combined in place with a term that
    requires grad): not views made under no_grad, which autograd refuses to modify in place."""
    n = 1
    for d in shape:
        n *= d
    hid, w, _, y = _fused_case(n, 16, 40, torch.float32, device, seed=12)
    hid, y = hid.reshape(*shape, 16), y.reshape(shape)
    leaf = hid.detach().requires_grad_(mode == "train")
    with torch.set_grad_enabled(mode != "no_grad"):
        lp, ent = fused_linear_logprobs(leaf, w, y, return_entropy=True)
    want_lp, want_ent = lp.detach().clone(), ent.detach().clone()
    other = torch.randn(shape, device=device, requires_grad=True)
    mask = (torch.rand(shape) < 0.5).float().to(device)
    lp *= mask
    lp -= other
    ent += other
    # (trained, the entropy carries no gradient: a backward through it raises)
    (2 * lp + (ent.detach() if mode == "train" else ent)).sum().backward()
    assert torch.equal(lp.detach(), want_lp * mask - other.detach())
    assert torch.equal(ent.detach(), want_ent + other.detach())
    assert torch.equal(other.grad, torch.full_like(other, -2.0 if mode == "train" else -1.0))
    if mode == "train":
        h64 = hid.detach().double().requires_grad_(True)
        rlp = fused_oracle(h64.reshape(n, 16), w.double(), None, y.reshape(n))[0]
        (2 * rlp * mask.double().reshape(n)).sum().backward()
        assert err(leaf.grad, h64.grad) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_fused_linear_logprobs_create_graph(device):
    """A first-order gradient taken with create_graph (e.g. a penalty on it) matches the oracle's;
    differentiating it again is an error (the backward is not itself differentiable)."""
    hid, w, _, y = _fused_case(6, 16, 40, torch.float32, device, seed=4)
    hid.requires_grad_(True)
    scale = torch.randn(6, device=device, requires_grad=True)
    (dh,) = torch.autograd.grad((fused_linear_logprobs(hid, w, y) * scale).sum(), hid, create_graph=True)
    h64 = hid.detach().double().requires_grad_(True)
    (rdh,) = torch.autograd.grad((fused_oracle(h64, w.double(), None, y)[0] * scale.double()).sum(), h64)
    assert err(dh, rdh) <= 1e-5
    with pytest.raises(RuntimeError, match="differentiate twice"):
        (dh * dh).sum().backward()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("trained", ["hidden", "weight"])
def test_fused_linear_logprobs_entropy_backward_refused(device, trained):
    """The entropy carries no gradient: a loss with an entropy term raises, naming token_logprobs
    (it trained silently on the log-prob term alone). For logging (detached, or with the loss on
    the log-probs alone) it works, and the gradient is the log-probs' own."""
    hid, w, _, y = _fused_case(9, 16, 40, torch.float32, device, seed=21)
    leaf = (hid if trained == "hidden" else w).requires_grad_(True)
    lp, ent = fused_linear_logprobs(hid, w, y, return_entropy=True)
    with pytest.raises(RuntimeError, match="token_logprobs"):
        (lp.sum() + 0.1 * ent.sum()).backward()
    g = torch.randn(9, device=device)
    for log_ent in (lambda e: e.detach().mean(), lambda e: e.mean()):
        leaf.grad = None
        lp, ent = fused_linear_logprobs(hid, w, y, return_entropy=True)
        lp.backward(g)
        log_ent(ent).item()
        h64, w64 = (t.detach().double().requires_grad_(True) for t in (hid, w))
        rlp, rent = fused_oracle(h64, w64, None, y)
        rlp.backward(g.double())
        assert err(ent, rent) <= 1e-5
        assert err(leaf.grad, (h64 if trained == "hidden" else w64).grad) <= 1e-5


@pytest.mark.filterwarnings("ignore:Error detected in")  # (torch's trace of the refused backward)
def test_fused_linear_logprobs_entropy_backward_refused_compiled():
    """Under torch.compile as eagerly: an entropy term is refused; a detached entropy works."""
    hid, w, _, y = _fused_case(7, 16, 40, torch.float32, "cpu", seed=22)

    def loss(h):
        lp, ent = fused_linear_logprobs(h, w, y, return_entropy=True)
        return lp.sum() + 0.1 * ent.sum()

    def logged(h):
        lp, ent = fused_linear_logprobs(h, w, y, return_entropy=True)
        return lp, ent.detach()

    torch._dynamo.reset()
    with pytest.raises(Exception, match="token_logprobs"):  # (at compile time, wrapped by torch)
        compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
        compiled(hid.clone().requires_grad_(True)).backward()
    outs = []
    for fn in (logged, torch.compile(logged, backend="aot_eager", fullgraph=True)):
        h = hid.clone().requires_grad_(True)
        lp, ent = fn(h)
        lp.sum().backward()
        outs.append((lp.detach(), ent, h.grad))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("train_head", [False, True])
def test_fused_linear_logprobs_compiled(device, train_head):
    """Under torch.compile the custom op and its backward's ops run (not the eager Function):
    the same values and gradients, with a frozen lm_head and with a trained one and its bias."""
    hid, w, b, y = _fused_case(37, 16, 50, torch.float32, device, seed=3)
    g = torch.randn(37, device=device)

    def f(h, w, b):
        return fused_linear_logprobs(h, w, y, bias=b, temperature=0.9)

    outs = []
    for fn in (f, torch.compile(f, backend="aot_eager", fullgraph=True)):
        args = [hid.clone(), w.clone(), b.clone() if train_head else None]
        trained = args[: 3 if train_head else 1]
        for a in trained:
            a.requires_grad_(True)
        lp = fn(*args)
        lp.backward(g)
        outs.append([lp.detach()] + [a.grad for a in trained])
    for want, got in zip(*outs):  # dW's index_add_ is atomic on CUDA: not bit-reproducible there
        assert got is not None
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("inplace", [False, True])
def test_token_logprobs_compiled(device, inplace):
    """Under torch.compile the custom ops run (not the eager Function): same values and dlogits."""
    z, y = _case((3, 5), 40, torch.float32, device, seed=4)
    g = torch.randn(3, 5, device=device)

    def f(z):
        return token_logprobs(z * 1.0, y, temperature=0.7, inplace_backward=inplace)

    outs = []
    for fn in (f, torch.compile(f, backend="aot_eager", fullgraph=True)):
        zz = z.clone().requires_grad_(True)
        lp = fn(zz)
        lp.backward(g)
        outs.append((lp.detach(), zz.grad))
    assert torch.equal(outs[0][0], outs[1][0])
    assert torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("dynamic", [None, True])
@pytest.mark.parametrize("shift", [False, True])
def test_token_logprobs_compiled_sequence_lengths(dynamic, shift):
    """fullgraph compilation survives a change of sequence length, where torch.compile retraces
    with symbolic sizes and strides (dynamic=None: on the second length), and gives eager's values
    and dlogits at every length (shift: the logits[:, :-1] view, strided)."""

    def f(z, y):
        if shift:
            z, y = z[:, :-1], y[:, 1:]
        return token_logprobs(z, y, temperature=0.7)

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    for t in (3, 5, 9):
        z, y = _case((2, t), 40, torch.float32, "cpu", seed=t)
        outs = []
        for fn in (f, compiled):
            zz = z.clone().requires_grad_(True)
            lp = fn(zz, y)
            lp.backward(torch.ones_like(lp))
            outs.append((lp.detach(), zz.grad))
        assert torch.equal(outs[0][0], outs[1][0]), t
        assert torch.equal(outs[0][1], outs[1][1]), t


def test_fused_linear_logprobs_compiled_dynamic():
    """fullgraph compilation with dynamic=True, the arguments left at their defaults: the
    argument checks compare floats (a symbolic float cannot go through math.isfinite)."""
    torch._dynamo.reset()
    compiled = torch.compile(fused_linear_logprobs, backend="aot_eager", fullgraph=True, dynamic=True)
    for n in (5, 9):
        hid, w, _, y = _fused_case(n, 16, 50, torch.float32, "cpu", seed=n)
        outs = []
        for fn in (fused_linear_logprobs, compiled):
            h = hid.clone().requires_grad_(True)
            lp = fn(h, w, y)
            lp.backward(torch.ones_like(lp))
            outs.append((lp.detach(), h.grad))
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-6, atol=1e-6)


def test_fused_linear_logprobs_no_grad_forms_no_hidden_gradient(monkeypatch):
    """Under torch.no_grad the forward does not form d logp / d hidden (an (N, H) fp32 buffer) even
    for hidden states that require grad: no backward can follow."""
    seen = []
    orig = logprob_ops._forward

    def spy(*args, **kw):
        seen.append(args[9])  # compute_grad
        return orig(*args, **kw)

    monkeypatch.setattr(logprob_ops, "_forward", spy)
    hid, w, _, y = _fused_case(6, 16, 50, torch.float32, "cpu", seed=3)
    hid.requires_grad_(True)
    with torch.no_grad():
        lp = fused_linear_logprobs(hid, w, y)
    assert seen == [False] and not lp.requires_grad
    fused_linear_logprobs(hid, w, y)
    assert seen == [False, True]


def test_fused_linear_logprobs_zero_softcap_refused():
    """softcap=0 is not "no cap" (that is None): refused, as a negative one is, rather than run
    uncapped."""
    hid, w, _, y = _fused_case(5, 16, 50, torch.float32, "cpu", seed=2, ignore_frac=0.0)
    for cap in (0.0, 0, -0.0):
        with pytest.raises(ValueError, match=r"softcap must be a positive finite number \(or None\), got"):
            fused_linear_logprobs(hid, w, y, softcap=cap)


def test_fused_linear_logprobs_infinite_softcap_refused():
    """softcap = inf would give inf * tanh(0) = nan for every log-prob: refused, naming it."""
    hid, w, _, y = _fused_case(4, 8, 20, torch.float32, "cpu", seed=0)
    with pytest.raises(ValueError, match="softcap must be a positive finite number"):
        fused_linear_logprobs(hid, w, y, softcap=float("inf"))
    with pytest.raises(ValueError, match="logit_scale must be a finite number"):
        fused_linear_logprobs(hid, w, y, logit_scale=float("nan"))


def test_opcheck():
    z, y = _case((3, 4), 40, torch.float32, "cpu", seed=0)
    torch.library.opcheck(torch.ops.hoptune.token_logprobs, (z.requires_grad_(True), y, 0.8, -100, False))
    hid, w, _, y = _fused_case(6, 8, 20, torch.float32, "cpu", seed=0, ignore_frac=0.0)
    torch.library.opcheck(
        torch.ops.hoptune.fused_linear_logprobs,
        (hid.requires_grad_(True), w, y, None, 1.0, -100, 0.0, 1.0, 0, True),
        test_utils=("test_schema", "test_faketensor"),
    )
    # every check, the backward's included, without the entropy (whose backward raises by design)
    args = (hid, w, y, None, 0.8, -100, 0.0, 1.0, 0, True, False)
    torch.library.opcheck(torch.ops.hoptune.fused_linear_logprobs, args)


@pytest.mark.gpu
def test_fused_overflow_falls_back_gpu():
    """A logit ~200 above the label's overflows the single-pass kernel; the op redoes the chunk
    relative to the row max and the result stays exact."""
    h, v = 64, 4096
    hid = torch.zeros(3, h, device="cuda", dtype=torch.bfloat16)
    hid[:, 0] = 20.0
    w = torch.randn(v, h, device="cuda", dtype=torch.bfloat16) * 0.01
    w[5, 0] = 10.0  # logit 200 for token 5
    y = torch.tensor([7, 5, 9], device="cuda")
    hid.requires_grad_(True)
    poison_cuda_cache()
    lp = fused_linear_logprobs(hid, w, y)
    h64 = hid.detach().double().requires_grad_(True)
    rlp = fused_oracle(h64, w.double(), None, y)[0]
    assert torch.isfinite(lp).all()
    assert err(lp, rlp) <= 1e-4 * rlp.abs().max().item()
    lp.sum().backward()
    rlp.sum().backward()
    assert torch.isfinite(hid.grad).all()
    assert err(hid.grad, h64.grad) <= 2e-2 * h64.grad.abs().max().item()


# vocab-chunked forward knobs: (VCHUNK, VCHUNK_COLS, VCHUNK_ROWS). "small" gives several row
# blocks and vocabulary chunks (at V = 1001 the last chunk is 41 columns: the scalar path);
# "rows" is the row-chunked single-pass forward.
VCHUNK_KNOBS = {
    "default": (True, 8192, 0),
    "small": (True, 64, 64),
    "rows": (False, 8192, 0),
    # fused GEMM: 200-column chunks, so V = 1001 or 32001 leaves 1 column that joins the last chunk
    "merge": (True, 200, 64),
}
FUSED_KW = [
    {},
    {"temperature": 0.8},
    {"softcap": 5.0, "scale": 0.5},
    {"bias": True},
    {"bias": True, "softcap": 3.0, "scale": 1.5, "temperature": 0.7},
]


def _set_vchunk(monkeypatch, knobs, on_cpu=False, gemm=False):
    """The vocab-chunked knobs; gemm=True lets eligible calls (bf16, no bias / soft-cap /
    entropy) take the fused-GEMM walk, otherwise they stay on the path named by the knobs."""
    use, cols, rows = VCHUNK_KNOBS[knobs]
    monkeypatch.setattr(logprob_ops, "VCHUNK", use)
    monkeypatch.setattr(logprob_ops, "VCHUNK_COLS", cols)
    monkeypatch.setattr(logprob_ops, "VCHUNK_ROWS", rows)
    monkeypatch.setattr(logprob_ops, "_VCHUNK_ON_CPU", on_cpu)
    monkeypatch.setattr(logprob_ops, "GEMM", gemm)
    if knobs in ("small", "merge"):
        monkeypatch.setattr(logprob_ops, "GEMM_COLS", cols)
        monkeypatch.setattr(logprob_ops, "GEMM_ROWS", rows)
    else:
        monkeypatch.setattr(logprob_ops, "GEMM_COLS", 32768)
        monkeypatch.setattr(logprob_ops, "GEMM_ROWS", 2048)
    monkeypatch.setattr(logprob_ops, "_GEMM_ON_CPU", on_cpu and gemm)


def _spy_gemm(monkeypatch, offsets: list | None = None) -> list:
    """Counts the forwards that took the fused-GEMM walk (and appends to ``offsets`` how many bytes
    past 16-byte alignment each one's hidden states start)."""
    calls = []
    orig = logprob_ops._forward_gemm

    def spy(hidden, *args, **kw):
        calls.append(1)
        if offsets is not None:
            offsets.append(hidden.data_ptr() % 16)
        return orig(hidden, *args, **kw)

    monkeypatch.setattr(logprob_ops, "_forward_gemm", spy)
    return calls


def _spy_fallback(monkeypatch) -> list:
    """Records each row-chunked forward the op runs (single_pass=False: the two-pass redo)."""
    calls = []
    orig = logprob_ops._forward

    def spy(*args, single_pass):
        calls.append(single_pass)
        return orig(*args, single_pass=single_pass)

    monkeypatch.setattr(logprob_ops, "_forward", spy)
    return calls


def _check_fused_fp32(device, kw, ignore_frac, chunk_rows=0, n=300, v=1001, h=32):
    hid, w, b, y = _fused_case(n, h, v, torch.float32, device, seed=len(kw) + n, ignore_frac=ignore_frac)
    y[0], y[-1] = v - 1, 0  # labels in the last (partial) and the first vocabulary chunk
    bias = b if kw.get("bias") else None
    temperature, softcap, scale = kw.get("temperature", 1.0), kw.get("softcap"), kw.get("scale", 1.0)
    hid.requires_grad_(True)
    lp, ent = fused_linear_logprobs(
        hid,
        w,
        y,
        bias=bias,
        temperature=temperature,
        softcap=softcap,
        logit_scale=scale,
        chunk_rows=chunk_rows,
        return_entropy=True,
    )
    h64 = hid.detach().double().requires_grad_(True)
    rlp, rent = fused_oracle(
        h64, w.double(), None if bias is None else bias.double(), y, temperature, softcap, scale
    )
    assert err(lp, rlp) <= 1e-5 and err(ent, rent) <= 1e-5
    g = torch.randn(n, device=device)
    lp.backward(g)
    rlp.backward(g.double())
    assert err(hid.grad, h64.grad) <= 1e-5
    assert (hid.grad[y == -100] == 0).all() and (lp[y == -100] == 0).all()


@pytest.mark.parametrize("kw", FUSED_KW)
@pytest.mark.parametrize("ignore_frac", [0.0, 0.25])  # row blocks as slices of J / index selections
@pytest.mark.parametrize("chunk_rows", [0, 50])
def test_fused_vchunk_cpu(kw, ignore_frac, chunk_rows, monkeypatch):
    """The vocab-chunked forward's Python loop on CPU (the reference for the kernel) with small
    knobs: several row blocks, 15 full vocabulary chunks and a partial one, against fp64."""
    _set_vchunk(monkeypatch, "small", on_cpu=True)
    calls = _spy_fallback(monkeypatch)
    _check_fused_fp32("cpu", kw, ignore_frac, chunk_rows)
    assert calls == []  # no overflow, no redo


def _check_fused_16bit(
    device, dtype, n, h, v, temperature=0.9, entropy=True, scale=1.0, hid=None, ignore_frac=0.25
):
    """16-bit hidden/weight: log-probs and entropy within 2x the error of PyTorch's fp32
    computation on the upcast values; the gradient within 2x the error of PyTorch's computation
    (see the yardstick below). `hid`, when given, replaces the case's hidden states (e.g. a
    non-contiguous view of the same values)."""
    hid0, w, _, y = _fused_case(n, h, v, dtype, device, seed=n, ignore_frac=ignore_frac)
    hid = hid0 if hid is None else hid(hid0)
    hid.requires_grad_(True)
    out = fused_linear_logprobs(hid, w, y, return_entropy=entropy, temperature=temperature, logit_scale=scale)
    lp, ent = out if entropy else (out, None)
    h64 = hid.detach().double().requires_grad_(True)
    rlp, rent = fused_oracle(h64, w.double(), None, y, temperature, scale=scale)
    prev = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        tlp, tent = fused_oracle(hid.detach().float(), w.float(), None, y, temperature, scale=scale)
        torch.backends.cuda.matmul.allow_tf32 = False
        ht = hid.detach().float().requires_grad_(True)
        t32 = fused_oracle(ht, w.float(), None, y, temperature, scale=scale)[0]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    assert err(lp, rlp) <= 2 * err(tlp, rlp) + 1e-6
    if entropy:
        assert err(ent, rent) <= 2 * err(tent, rent) + 1e-6
    assert (lp[y == -100] == 0).all()
    g = torch.randn(n, generator=torch.Generator().manual_seed(n + 1)).to(device)
    lp.backward(g)
    rlp.backward(g.double())
    t32.backward(g)
    # Gradient yardstick: PyTorch's fp32 gradient rounded to the hidden dtype, or the same
    # computation with d logp / d logits stored in the hidden dtype (as PyTorch's own 16-bit
    # backward stores them), whichever errs more. Both fused paths pass the softmax part of
    # d logp / d logits through the GEMM as a 16-bit operand (G), so their gradient can sit about
    # one 16-bit ulp from the truth where the fp32 gradient rounded once sits within half an ulp
    # (one seeded case on the H200 came to 2.04x that alone).
    c = scale / temperature
    valid = y != -100
    p = torch.softmax((hid.detach().float() @ w.float().t()) * c, -1)
    onehot = torch.zeros_like(p)
    onehot[valid, y[valid]] = 1.0
    dlogits = ((onehot - p) * (c * g * valid)[:, None]).to(dtype)
    low = (dlogits.float() @ w.float()).to(dtype)
    ref_err = max(err(ht.grad.to(dtype), h64.grad), err(low, h64.grad))
    assert err(hid.grad, h64.grad) <= 2 * ref_err + 1e-6


def test_fused_vchunk_bf16_cpu(monkeypatch):
    """bf16 through the vocab-chunked loop on CPU: G rounded to bf16, unnormalised."""
    _set_vchunk(monkeypatch, "small", on_cpu=True)
    _check_fused_16bit("cpu", torch.bfloat16, 200, 64, 1001)


def _overflow_case(device, dtype, gap):
    """Rows whose label's logit is about `gap` below the row's largest (token 5's logit is
    2 gap / 3, the others' about -gap / 3) and a row labelled with token 5."""
    h, v = 64, 1001
    hid = torch.zeros(4, h, dtype=dtype)
    hid[:, 0] = gap / 15
    g = torch.Generator().manual_seed(0)
    w = torch.randn(v, h, generator=g) * 0.01
    w[:, 0] = -5.0 + torch.randn(v, generator=g) * 0.05
    w[5, 0] = 10.0
    return hid.to(device), w.to(dtype).to(device), torch.tensor([7, 5, 1000, 300], device=device)


def _check_overflow_result(hid, w, y, lp):
    """After an overflow case: finite log-probs and gradients, close to fp64 (relative to the
    largest values, which are ~100 here)."""
    h64 = hid.detach().double().requires_grad_(True)
    rlp = fused_oracle(h64, w.double(), None, y)[0]
    assert torch.isfinite(lp).all()
    assert err(lp, rlp) <= 1e-4 * max(1.0, rlp.abs().max().item())
    lp.sum().backward()
    rlp.sum().backward()
    assert torch.isfinite(hid.grad).all()
    assert err(hid.grad, h64.grad) <= 2e-2 * h64.grad.abs().max().item()


def test_fused_vchunk_masked_vocabulary_cpu(monkeypatch):
    """A bias of -inf on part of the vocabulary (tokens masked out of the head): the vocab-chunked
    walk adds nothing for them to the entropy's sums, so the rows need no two-pass redo, and the
    log-probs, entropy and hidden-state gradient match the fp64 oracle."""
    _set_vchunk(monkeypatch, "small", on_cpu=True)
    calls = _spy_fallback(monkeypatch)
    hid, w, b, y = _fused_case(50, 32, 300, torch.float32, "cpu", seed=11)
    b[torch.randperm(300, generator=torch.Generator().manual_seed(1))[:60]] = float("-inf")
    y = torch.where((y >= 0) & torch.isinf(b[y.clamp(min=0)]), -100, y)  # (a masked label: log p = -inf)
    hid.requires_grad_(True)
    lp, ent = fused_linear_logprobs(hid, w, y, bias=b, return_entropy=True)
    assert calls == []  # no row-chunked redo
    up = torch.randn(50, generator=torch.Generator().manual_seed(2))
    (lp * up).sum().backward()
    h64 = hid.detach().double().requires_grad_(True)
    rlp = fused_oracle(h64, w.double(), b.double(), y)[0]
    (rlp * up.double()).sum().backward()
    lsm = torch.log_softmax(h64.detach() @ w.double().t() + b.double(), -1)
    rent = -torch.where(lsm > -float("inf"), lsm.exp() * lsm, 0).sum(-1) * (y != -100)
    assert err(lp, rlp) <= 1e-5 and err(ent, rent) <= 1e-5 and err(hid.grad, h64.grad) <= 1e-5


@pytest.mark.parametrize("gap,redo", [(40.0, False), (80.0, True), (200.0, True)])
def test_fused_vchunk_overflow_cpu(gap, redo, monkeypatch):
    """A label logit more than 64 below its row's largest flags the vocab-chunked forward (at 80
    nothing is infinite yet) and the op redoes it in two passes; below 64 it stands. Both exact."""
    _set_vchunk(monkeypatch, "small", on_cpu=True)
    calls = _spy_fallback(monkeypatch)
    hid, w, y = _overflow_case("cpu", torch.float32, gap)
    hid.requires_grad_(True)
    lp = fused_linear_logprobs(hid, w, y)
    assert calls == ([False] if redo else [])
    h64 = hid.detach().double().requires_grad_(True)
    rlp = fused_oracle(h64, w.double(), None, y)[0]
    assert err(lp, rlp) <= 1e-5 * max(1.0, rlp.abs().max().item())
    lp.sum().backward()
    rlp.sum().backward()
    assert err(hid.grad, h64.grad) <= 1e-5 * max(1.0, h64.grad.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("knobs", list(VCHUNK_KNOBS))
@pytest.mark.parametrize("kw", FUSED_KW)
@pytest.mark.parametrize("ignore_frac", [0.0, 0.25])
def test_fused_vchunk_fp32_gpu(knobs, kw, ignore_frac, monkeypatch):
    """fp32 hidden on CUDA (G written in place in fp32): the vocab-chunked forward with the
    default and small knobs, and the row-chunked single pass, against fp64."""
    _set_vchunk(monkeypatch, knobs)
    calls = _spy_fallback(monkeypatch)
    poison_cuda_cache()
    _check_fused_fp32("cuda", kw, ignore_frac)
    assert calls == ([True] if knobs == "rows" else [])


@pytest.mark.gpu
@pytest.mark.parametrize("knobs", list(VCHUNK_KNOBS))
@pytest.mark.parametrize("n,h,v", [(300, 256, 32001), (1000, 512, 50304), (150, 64, 1001)])
def test_fused_vchunk_bf16_gpu(knobs, n, h, v, monkeypatch):
    """bf16 on CUDA: at V = 32001 the last 8192-column chunk (7425) takes the scalar path, at
    50304 every chunk the vector path; small knobs give many blocks and chunks."""
    _set_vchunk(monkeypatch, knobs)
    calls = _spy_fallback(monkeypatch)
    poison_cuda_cache()
    _check_fused_16bit("cuda", torch.bfloat16, n, h, v)
    assert calls == ([True] if knobs == "rows" else [])


@pytest.mark.gpu
@pytest.mark.parametrize("knobs", ["default", "small"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("gap,redo", [(40.0, False), (80.0, True), (100.0, True), (200.0, True)])
def test_fused_vchunk_overflow_gpu(knobs, dtype, gap, redo, monkeypatch):
    """The kernel flags a label logit more than 64 below the row's largest; the op redoes the
    forward in two passes and the result matches fp64 (relative to the largest value)."""
    _set_vchunk(monkeypatch, knobs)
    calls = _spy_fallback(monkeypatch)
    hid, w, y = _overflow_case("cuda", dtype, gap)
    hid.requires_grad_(True)
    poison_cuda_cache()
    lp = fused_linear_logprobs(hid, w, y)
    assert calls == ([False] if redo else [])
    _check_overflow_result(hid, w, y, lp)


# ---- the fused lm_head GEMM (exp and row sums in the GEMM's epilogue; bf16, no entropy) ----
GEMM_KW = [{}, {"temperature": 0.7, "scale": 1.3}]


@pytest.mark.parametrize("kw", GEMM_KW)
@pytest.mark.parametrize("knobs", ["default", "small", "merge"])
def test_fused_gemm_bf16_cpu(kw, knobs, monkeypatch):
    """The fused-GEMM walk's Python loop on CPU (the kernel replaced by its reference): row
    blocks as slices and index selections (ignored rows), a partial last vocabulary chunk, and a
    narrow remainder joined to the last chunk."""
    _set_vchunk(monkeypatch, knobs, on_cpu=True, gemm=True)
    calls = _spy_gemm(monkeypatch)
    redo = _spy_fallback(monkeypatch)
    _check_fused_16bit(
        "cpu",
        torch.bfloat16,
        200,
        64,
        1001,
        kw.get("temperature", 1.0),
        entropy=False,
        scale=kw.get("scale", 1.0),
    )
    assert calls == [1] and redo == []


@pytest.mark.parametrize(
    "sms,rows,cols,tn,expect",
    [
        (132, 2048, 32768, 192, 31680),  # 8 row tiles: 33 column tiles fill 2 waves; 5 x 33 of them
        (132, 4096, 32768, 192, 31680),
        (132, 2048, 65536, 192, 63360),
        (114, 2048, 32768, 192, 32832),  # 57 column tiles per 4 waves
        (132, 100, 32768, 192, 25344),  # one row tile: 132 column tiles per wave
        (132, 2048, 64, 192, 64),  # below one unit (the tests' small knobs): as given
        (132, 2048, 32768, 128, 33792),  # the earlier 256x128 tile
        (114, 2048, 32768, 128, 29184),
    ],
)
def test_fused_gemm_cols_fill_waves(sms, rows, cols, tn, expect, monkeypatch):
    """The chunk width is GEMM_COLS rounded to whole waves of 256 x tn tiles on the device's SMs."""

    class Props:
        multi_processor_count = sms

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: Props())
    monkeypatch.setattr(logprob_ops, "GEMM_COLS", cols)
    got = logprob_ops._gemm_cols(rows, (256, tn), torch.device("cuda"))
    assert got == expect
    if got != cols:
        tiles = -(-rows // 256) * (got // tn)
        assert tiles % sms == 0
    assert logprob_ops._gemm_cols(rows, (256, tn), torch.device("cpu")) == cols


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["gemm", "vchunk", "rows"])
def test_fused_all_rows_ignored(device, path, monkeypatch):
    """No valid label: no matmul runs, every output row is 0 and so is the gradient (the outputs
    of the walks start uninitialised when no row is ignored, zeroed when some are)."""
    gemm = path == "gemm"
    _set_vchunk(monkeypatch, "rows" if path == "rows" else "small", on_cpu=device == "cpu", gemm=gemm)
    calls = _spy_gemm(monkeypatch)
    dtype = torch.bfloat16 if gemm else torch.float32
    hid, w, _, y = _fused_case(70, 16, 50, dtype, device, seed=5)
    y.fill_(-100)
    hid.requires_grad_(True)
    lp = fused_linear_logprobs(hid, w, y)
    lp.backward(torch.randn_like(lp))
    assert calls == ([1] if gemm else [])
    assert (lp == 0).all() and (hid.grad == 0).all()


def _confident_case(dtype, device, n=64, h=96, v=300, seed=3):
    """Rows whose label's logit stands 11-17 above the rest: p_y from about 0.989 to 0.99996,
    most of them above 1 - 2^-9, where 16-bit rounding takes p_y to 1."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(v, h, generator=g) / h**0.5
    y = torch.randint(0, v, (n,), generator=g)
    wy = w[y]
    margin = torch.linspace(11, 17, n)[:, None]
    hid = torch.randn(n, h, generator=g) * 0.3 + margin * wy / (wy * wy).sum(1, keepdim=True)
    return hid.to(dtype).to(device), w.to(dtype).to(device), y.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "path,dtype",
    [
        ("gemm", torch.bfloat16),
        ("vchunk", torch.bfloat16),
        ("rows", torch.bfloat16),
        ("vchunk", torch.float16),
        ("rows", torch.float16),
    ],
)
def test_fused_confident_tokens_keep_their_gradient(device, path, dtype, monkeypatch):
    """A confident token's gradient is (1 - p_y) times its label's row, less the other rows'
    small pulls. The label's share of G rounded to 16 bits would make p_y 1 and drop that term
    (28-55% of the hidden and weight gradients here, in bf16); both gradients must stay within 2x
    the error of PyTorch's 16-bit head with an fp32 log_softmax."""
    _set_vchunk(
        monkeypatch, "rows" if path == "rows" else "small", on_cpu=device == "cpu", gemm=path == "gemm"
    )
    calls = _spy_gemm(monkeypatch)
    hid, w, y = _confident_case(dtype, device)
    up = (torch.rand(y.shape[0], generator=torch.Generator().manual_seed(9)) + 0.5).to(device)
    h_, w_ = hid.clone().requires_grad_(True), w.clone().requires_grad_(True)
    fused_linear_logprobs(h_, w_, y).backward(up)
    assert calls == ([1] if path == "gemm" else [])
    h64, w64 = hid.double().requires_grad_(True), w.double().requires_grad_(True)
    lp64 = torch.log_softmax(h64 @ w64.t(), -1).gather(1, y[:, None])[:, 0]
    lp64.backward(up.double())
    assert float((lp64.exp() > 1 - 2**-9).float().mean()) > 0.5
    ht, wt = hid.clone().requires_grad_(True), w.clone().requires_grad_(True)
    torch.log_softmax((ht @ wt.t()).float(), -1).gather(1, y[:, None])[:, 0].backward(up)

    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()

    assert rel(h_.grad, h64.grad) <= 2 * rel(ht.grad, h64.grad)
    assert rel(w_.grad, w64.grad) <= 2 * rel(wt.grad, w64.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["gemm", "vchunk", "rows"])
def test_fused_ignored_rows_take_no_upstream_nan(device, path, monkeypatch):
    """An ignored row's hidden state gets a zero gradient whatever the upstream gradient holds
    there: a nan or inf must not pass through J's zero row (0 * nan), nor reach the lm_head."""
    gemm = path == "gemm"
    _set_vchunk(monkeypatch, "rows" if path == "rows" else "small", on_cpu=device == "cpu", gemm=gemm)
    dtype = torch.bfloat16 if gemm else torch.float32
    hid, w, _, y = _fused_case(70, 16, 50, dtype, device, seed=6)
    ignored = y == -100
    assert 0 < int(ignored.sum()) < 70
    grads = []
    for bad in (float("nan"), float("inf"), 0.0):
        h_, w_ = hid.detach().requires_grad_(True), w.detach().requires_grad_(True)
        lp = fused_linear_logprobs(h_, w_, y)
        g = torch.ones_like(lp)
        g[ignored] = bad
        lp.backward(g)
        grads.append((h_.grad, w_.grad))
    assert (grads[2][0][ignored] == 0).all()
    for dh, dw in grads[:2]:
        assert torch.equal(dh, grads[2][0])
        # (the lm_head's gradient sums rows with atomics on the GPU: equal up to the order of the sums)
        assert torch.isfinite(dw).all()
        if device == "cpu":
            assert torch.equal(dw, grads[2][1])
        else:
            torch.testing.assert_close(dw, grads[2][1], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [0, 1, 37, 1025, (1 << 20) + 3])
def test_label_stats_gpu(n):
    """The label-stats kernel against the PyTorch ops it stands in for: the count, and the first
    out-of-range label's position (several bad ones, ignore_index among them, 2-D and strided)."""
    g = torch.Generator().manual_seed(n)
    y = torch.randint(0, 1000, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.3] = -100
    want = int((y != -100).sum())
    assert logprob_ops._label_stats(y.cuda(), -100, 1000) == want
    assert logprob_ops._label_stats(y.cuda(), -100) == want
    if n < 37:
        return
    for bad in ([n - 1], [n // 2, n - 3], [5, n // 3]):
        yb = y.clone()
        yb[bad] = torch.tensor([1000, -7, 5000])[: len(bad)]
        msgs = []
        for dev in ("cpu", "cuda"):
            with pytest.raises(ValueError, match=r"labels must be in \[0, 1000\)") as e:
                logprob_ops._label_stats(yb.to(dev), -100, 1000)
            msgs.append(str(e.value))
        assert msgs[0] == msgs[1] and f"at position ({min(bad)},)" in msgs[0]
    # a strided (B, T) view: positions in its own shape
    y2 = y[: (n // 4) * 4].view(-1, 4).cuda()[:, 1:]
    y2[1, 2] = 1000
    with pytest.raises(ValueError, match=r"got 1000 at position \(1, 2\)"):
        logprob_ops._label_stats(y2, -100, 1000)
    assert logprob_ops._label_stats(y2, -100) == int((y2 != -100).sum())


def test_fused_gemm_one_row_block_strided_cpu(monkeypatch):
    """Hidden states as a view whose row stride (67) the GEMM cannot take, with a row block of a
    single row (65 rows in blocks of 64): the block is copied to a dense, aligned layout like
    any other. A one-row tensor counts as contiguous whatever its row stride, so .contiguous()
    handed it over as it was (on CPU the loop's stride check refused it)."""
    _set_vchunk(monkeypatch, "small", on_cpu=True, gemm=True)  # GEMM_ROWS = 64
    calls = _spy_gemm(monkeypatch)

    def view(h0):
        wide = torch.zeros(h0.shape[0], h0.shape[1] + 3, dtype=h0.dtype, device=h0.device)
        wide[:, : h0.shape[1]] = h0
        return wide[:, : h0.shape[1]]

    _check_fused_16bit("cpu", torch.bfloat16, 65, 64, 1001, entropy=False, hid=view, ignore_frac=0.0)
    assert calls == [1]


def test_fused_gemm_routing_cpu(monkeypatch):
    """Entropy, bias, soft-cap and fp32 keep the vocab-chunked path; plain bf16 takes the GEMM."""
    _set_vchunk(monkeypatch, "small", on_cpu=True, gemm=True)
    calls = _spy_gemm(monkeypatch)
    hid, w, b, y = _fused_case(40, 16, 300, torch.bfloat16, "cpu", seed=1)
    fused_linear_logprobs(hid, w, y, return_entropy=True)
    fused_linear_logprobs(hid, w, y, bias=b)
    fused_linear_logprobs(hid, w, y, softcap=4.0)
    fused_linear_logprobs(hid.float(), w.float(), y)
    assert calls == []
    lp = fused_linear_logprobs(hid, w, y)
    assert calls == [1] and torch.isfinite(lp).all()


@pytest.mark.parametrize("h", [12, 20])
def test_fused_gemm_routing_needs_rows_of_whole_16_bytes_cpu(monkeypatch, h):
    """bf16 hidden states whose rows are not a multiple of 8 elements (16 bytes, what the fused
    GEMM's loads need) keep the vocab-chunked path, also beside an lm_head weight whose rows are
    padded to 16 bytes (a view of a wider buffer): the log-probs and the hidden-state gradient
    come out as for any other H, not a stride error."""
    _set_vchunk(monkeypatch, "small", on_cpu=True, gemm=True)
    calls = _spy_gemm(monkeypatch)
    hid, w, _, y = _fused_case(40, h, 300, torch.bfloat16, "cpu", seed=3)
    w = torch.zeros(300, h + 4, dtype=w.dtype).copy_(torch.nn.functional.pad(w, (0, 4)))[:, :h]
    assert w.stride(0) % 8 == 0 and w.data_ptr() % 16 == 0
    hid.requires_grad_(True)
    lp = fused_linear_logprobs(hid, w, y)
    assert calls == []
    up = torch.randn(40, generator=torch.Generator().manual_seed(4))
    (lp * up).sum().backward()
    h64 = hid.detach().double().requires_grad_(True)
    ref = fused_oracle(h64, w.double(), None, y)[0]
    (ref * up.double()).sum().backward()
    assert err(lp, ref) <= 2e-2 and err(hid.grad, h64.grad) <= 2e-2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gap,redo", [(40.0, False), (80.0, True), (200.0, True)])
def test_fused_gemm_overflow(device, gap, redo, monkeypatch):
    """A row whose sum passes e^64 (a logit > 64 above its label's) makes the op redo the forward
    relative to the row max; below that the GEMM walk's result stands (on CPU the walk's loop
    with the kernel replaced by its reference; on CUDA the kernels). Both against fp64."""
    _set_vchunk(monkeypatch, "small", on_cpu=device == "cpu", gemm=True)
    calls = _spy_fallback(monkeypatch)
    gemm = _spy_gemm(monkeypatch)
    hid, w, y = _overflow_case(device, torch.bfloat16, gap)
    hid.requires_grad_(True)
    if device == "cuda":
        poison_cuda_cache()
    lp = fused_linear_logprobs(hid, w, y)
    assert gemm == [1] and calls == ([False] if redo else [])
    _check_overflow_result(hid, w, y, lp)


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", [(1000, 1008, 256), (1, 8192, 4096), (7, 296, 64), (4100, 8192, 512)])
def test_fused_logprob_gemm_kernel_gpu(m, n, k):
    """The kernel alone against fp64: G (poisoned first) within 2x the error of PyTorch's
    computation (its bf16 GEMM with fp32 output, exp in fp32, rounded to bf16), elementwise
    relative; the row sums (every per-tile entry poisoned first, padded rows must come back 0)
    likewise; nothing written past n columns of G's padded rows; a second launch gives the same
    bits. Sizes the kernel cannot take (n or k not a multiple of 8) are refused with an error."""
    from hoptune import _lib

    g = torch.Generator().manual_seed(m + n)
    a = torch.randn(m, k, generator=g).bfloat16().cuda()
    b = (torch.randn(n, k, generator=g) * k**-0.5 * 3).bfloat16().cuda()
    scale = 0.9
    z64 = a.double() @ b.double().t() * scale
    shift = (z64.max(1).values - torch.rand(m, device="cuda", dtype=torch.float64) * 3).float()
    e64 = torch.exp(z64 - shift.double()[:, None])
    ld = (n + 7) // 8 * 8 + 8
    G = torch.full((m, ld), float("nan"), device="cuda", dtype=torch.bfloat16)
    tm, tn = _lib.extension().FUSED_LOGPROB_GEMM_TILE
    ldp = -(-m // tm) * tm
    part = torch.full((-(-n // tn), ldp), float("nan"), device="cuda")  # every entry must be written

    def launch(nn, kk):
        _lib.extension().fused_logprob_gemm(
            a.data_ptr(),
            k,
            b.data_ptr(),
            k,
            G.data_ptr(),
            ld,
            m,
            nn,
            kk,
            scale,
            shift.data_ptr(),
            part.data_ptr(),
            torch.cuda.current_stream().cuda_stream,
        )

    launch(n, k)
    torch.cuda.synchronize()
    assert (part[:, m:] == 0).all()
    s0 = part.sum(0)[:m]
    # PyTorch's computation of the same: the logits from its bf16 tensor-core GEMM (fp32 out)
    e32 = torch.exp(torch.mm(a, b.t(), out_dtype=torch.float32) * scale - shift[:, None])
    gref, sref = e32.bfloat16(), e32.sum(1)
    rel = lambda x, y: ((x.double() - y) / y).abs().max().item()  # noqa: E731
    assert rel(G[:, :n], e64) <= 2 * rel(gref, e64) + 1e-6
    assert rel(s0, e64.sum(1)) <= 2 * rel(sref, e64.sum(1)) + 1e-6
    assert torch.isnan(G[:, n:].float()).all()
    for bad_n, bad_k in ((n - 1, k), (n, k - 1)):
        with pytest.raises(RuntimeError, match="fused_logprob_gemm failed: cudaErrorInvalidValue"):
            launch(bad_n, bad_k)
    # the same inputs give the same bits (no atomics in the row sums)
    first = part.clone()
    launch(n, k)
    torch.cuda.synchronize()
    assert torch.equal(first, part)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "knobs,n,h,v",
    [
        *[
            (k, n, h, v)
            for k in ("default", "small")
            for n, h, v in ((300, 256, 32001), (1000, 512, 50304), (150, 64, 1001))
        ],
        ("merge", 300, 256, 32001),
        ("default", 2100, 4096, 128256),
    ],
)
@pytest.mark.parametrize("kw", GEMM_KW)
def test_fused_gemm_gpu(knobs, n, h, v, kw, monkeypatch):
    """bf16 through the fused-GEMM walk on CUDA against fp64 (log-probs and the hidden gradient):
    partial last chunks with a 1-column tail (V = 32001, 1001), several row blocks with the small
    knobs, a 1-column remainder joined to the last chunk, and a Llama-3-sized lm_head (its
    1536-column remainder joins the last of four chunks)."""
    _set_vchunk(monkeypatch, knobs, gemm=True)
    calls = _spy_gemm(monkeypatch)
    redo = _spy_fallback(monkeypatch)
    poison_cuda_cache()
    _check_fused_16bit(
        "cuda", torch.bfloat16, n, h, v, kw.get("temperature", 1.0), entropy=False, scale=kw.get("scale", 1.0)
    )
    assert calls == [1] and redo == []


@pytest.mark.gpu
@pytest.mark.parametrize("knobs,n", [("small", 1001), ("default", 2050)])
def test_fused_gemm_all_rows_gpu(knobs, n, monkeypatch):
    """No ignored rows: the row blocks are slices, so the block's log-probs and gradient rows are
    written in place; the last block's row count is not a multiple of 4 (the finishing kernel
    takes rows in fours)."""
    _set_vchunk(monkeypatch, knobs, gemm=True)
    calls = _spy_gemm(monkeypatch)
    poison_cuda_cache()
    _check_fused_16bit("cuda", torch.bfloat16, n, 256, 32000, entropy=False, ignore_frac=0.0)
    assert calls == [1]


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["padded_rows", "transposed", "misaligned"])
def test_fused_gemm_noncontiguous_gpu(layout, monkeypatch):
    """Hidden states as a view with padded rows (taken as is: TMA-compatible strides), as a
    transposed copy (made contiguous first), and contiguous but 2 bytes past 16-byte alignment with
    no ignored label, so that the row blocks are slices of them (each copied to an aligned block:
    the kernels refuse a misaligned base): same results as the contiguous input."""
    _set_vchunk(monkeypatch, "default", gemm=True)
    offsets = []
    calls = _spy_gemm(monkeypatch, offsets)

    def view(h0):
        if layout == "padded_rows":
            wide = torch.zeros(h0.shape[0], h0.shape[1] + 8, dtype=h0.dtype, device=h0.device)
            wide[:, : h0.shape[1]] = h0
            return wide[:, : h0.shape[1]]
        if layout == "misaligned":
            v = torch.cat((h0.new_zeros(1), h0.flatten()))[1:].view(h0.shape)
            assert v.data_ptr() % 16 == 2 and v.stride(0) == 256
            return v
        return h0.t().contiguous().t()

    poison_cuda_cache()
    ignore_frac = 0.0 if layout == "misaligned" else 0.25
    _check_fused_16bit(
        "cuda", torch.bfloat16, 500, 256, 32001, entropy=False, hid=view, ignore_frac=ignore_frac
    )
    assert calls == [1]
    assert layout != "misaligned" or offsets == [2]  # (the walk was given them misaligned)
