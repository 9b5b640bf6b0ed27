"""hoptune.ops.gemm: 16-bit GEMMs with cuBLASLt's algorithm chosen by measurement."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from hoptune import _lib
from hoptune.ops import gemm
from tests.conftest import poison_cuda_cache, rel_err


@pytest.fixture(autouse=True)
def _fresh_choices():
    gemm.reset()
    previous = gemm.enable(None)
    yield
    gemm.enable(previous)
    gemm.reset()


def _operands(op, m, k, n, dtype, device, x_shape=None):
    """(inputs, float64 result, the same product by PyTorch in dtype) of one problem."""
    if op == "linear":
        x = torch.randn(*(x_shape or (m,)), k, device=device).to(dtype)
        w = (torch.randn(n, k, device=device) * k**-0.5).to(dtype)
        ref = x.double() @ w.double().t()
        return (x, w), ref, x @ w.t()
    a = torch.randn(m, n, device=device).to(dtype)
    b = (torch.randn(n, k, device=device) * n**-0.5).to(dtype)
    if op == "mm":
        return (a, b), a.double() @ b.double(), a @ b
    acc = torch.randn(m, k, device=device).to(dtype)
    return (a, b, acc), acc.double() + a.double() @ b.double(), acc + a @ b


def _call(op, args):
    if op == "linear":
        return gemm.linear(*args)
    if op == "mm":
        return gemm.mm(*args)
    a, b, acc = args
    return gemm.mm(a, b, acc=acc.clone())


def _check_rule(ours, ref, low, name):
    """STYLE.md: our error against float64 at most 2x PyTorch's in the same dtype."""
    assert ours.shape == ref.shape and ours.dtype == low.dtype, name
    assert torch.isfinite(ours).all(), name
    e_ours, e_low = rel_err(ours, ref), rel_err(low, ref)
    assert e_ours <= 2 * e_low + 1e-6, f"{name}: ours {e_ours:.3g} vs torch {e_low:.3g}"


@pytest.mark.parametrize("op", ["linear", "mm", "acc"])
def test_cpu_is_torch(op, monkeypatch):
    monkeypatch.setattr(gemm, "MIN_ROWS", 1)
    args, _, _ = _operands(op, 37, 24, 40, torch.float32, "cpu")
    out = _call(op, args)
    if op == "linear":
        expected = torch.nn.functional.linear(*args)
    elif op == "mm":
        expected = torch.mm(*args)
    else:
        expected = args[2].clone().addmm_(args[0], args[1])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert gemm.tuned() == {}


def test_enable_switch():
    from hoptune import _lib

    assert gemm.enable(False) is None
    assert not gemm._enabled()
    why = gemm.tuning_unavailable_reason()
    # turned off is the reason where the kernels run; elsewhere the kernels' own reason comes first
    assert why is not None and ("turned off" in why) == (_lib.unavailable_reason() is None)
    assert gemm.enable(True) is False
    assert gemm._enabled()


def test_measured_is_a_copy(monkeypatch):
    """measured() hands out copies, the timing windows' lists included: a caller that edits them
    leaves the record as it was."""
    key = ("x@wT", 8192, 4096, 4096, torch.bfloat16, torch.device("cuda", 0))
    record = {"candidates": 1, "torch_ms": 0.35, "rounds_ms": {"torch": [0.35, 0.36], "0": [0.34, 0.35]}}
    monkeypatch.setattr(gemm, "_measured", {key: record})
    got = gemm.measured()[key]
    got["rounds_ms"]["torch"].append(9.0)
    got["torch_ms"] = 9.0
    assert record == {
        "candidates": 1,
        "torch_ms": 0.35,
        "rounds_ms": {"torch": [0.35, 0.36], "0": [0.34, 0.35]},
    }


def test_cublaslt_extension_reason():
    from hoptune import _lib

    ext, why = gemm.cublaslt_extension()
    if _lib.unavailable_reason() is not None:  # a reason, not an error from a CUDA call
        assert ext is None and why == _lib.unavailable_reason()
    else:
        assert ext is not None and why is None and hasattr(ext, "CublasLtPlan")


@pytest.mark.gpu
def test_tuning_available_gpu():
    assert gemm.tuning_unavailable_reason() is None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", ["linear", "mm", "acc"])
# N = 1000 and K = 1000: not multiples of 64 or 128
@pytest.mark.parametrize("m,k,n", [(2048, 512, 1000), (2304, 1000, 768), (4096, 4096, 4096)])
def test_chosen_candidate_matches(op, dtype, m, k, n, monkeypatch):
    # every problem takes cuBLASLt's fastest candidate, even when PyTorch's GEMM is faster
    monkeypatch.setattr(gemm, "MIN_GAIN", -10.0)
    args, ref, low = _operands(op, m, k, n, dtype, "cuda")
    for call in ("tuning", "chosen"):
        poison_cuda_cache()
        _check_rule(_call(op, args), ref, low, f"{op} {call}")
    (key, choice), *rest = gemm.tuned().items()
    assert not rest and key[1:4] == (m, n, k)
    assert choice is not None and choice["ms"] > 0 and choice["torch_ms"] > 0
    timing = gemm.measured()[key]
    assert timing["best_candidate"] == choice["candidate"] and timing["best_ms"] == choice["ms"]
    rounds = timing["rounds_ms"]  # every window, PyTorch's first: the medians above come from them
    assert next(iter(rounds)) == "torch" and len(rounds) == timing["candidates"] + 1
    assert all(len(t) == gemm.ROUNDS for t in rounds.values())
    assert statistics.median(rounds["torch"]) == timing["torch_ms"]
    assert statistics.median(rounds[str(choice["candidate"])]) == choice["ms"]


@pytest.mark.gpu
def test_linear_3d_input(monkeypatch):
    monkeypatch.setattr(gemm, "MIN_GAIN", -10.0)
    args, ref, low = _operands("linear", 0, 320, 200, torch.bfloat16, "cuda", x_shape=(3, 700))
    y = gemm.linear(*args)
    assert y.shape == (3, 700, 200) and not y._is_view()
    _check_rule(y, ref, low, "3-D x")
    assert next(iter(gemm.tuned()))[1] == 2100


@pytest.mark.gpu
def test_ineligible_operands_keep_torch(monkeypatch):
    monkeypatch.setattr(gemm, "MIN_GAIN", -10.0)
    (x, w), _, _ = _operands("linear", 2048, 256, 384, torch.bfloat16, "cuda")
    wide = torch.randn(2048, 512, device="cuda", dtype=torch.bfloat16)
    wide[:, :256] = x
    cases = {
        "strided": (wide[:, :256], w),
        "misaligned": (torch.cat([x.new_zeros(1), x.reshape(-1)])[1:].view(2048, 256), w),
        "fp32": (x.float(), w.float()),
        "few rows": (x[:1024], w),
    }
    for name, (xi, wi) in cases.items():
        y = gemm.linear(xi, wi)
        torch.testing.assert_close(y, torch.nn.functional.linear(xi, wi), rtol=0, atol=0, msg=name)
    assert gemm.tuned() == {}
    torch.use_deterministic_algorithms(True)
    try:
        gemm.linear(x, w)
    finally:
        torch.use_deterministic_algorithms(False)
    assert gemm.tuned() == {}
    gemm.enable(False)
    gemm.linear(x, w)
    assert gemm.tuned() == {}


@pytest.mark.gpu
def test_rows_per_shape_capped(monkeypatch):
    monkeypatch.setattr(gemm, "MIN_GAIN", -10.0)
    monkeypatch.setattr(gemm, "MIN_ROWS", 16)
    monkeypatch.setattr(gemm, "MAX_ROWS_PER_SHAPE", 2)
    for m in (64, 80, 96):
        args, ref, low = _operands("linear", m, 256, 192, torch.bfloat16, "cuda")
        _check_rule(gemm.linear(*args), ref, low, f"M={m}")
    assert sorted(key[1] for key in gemm.tuned()) == [64, 80]


@pytest.mark.gpu
def test_graph_capture_uses_torch(monkeypatch):
    monkeypatch.setattr(gemm, "MIN_GAIN", -10.0)
    (x, w), ref, low = _operands("linear", 2048, 256, 384, torch.bfloat16, "cuda")
    w2 = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        gemm.linear(x, w)  # tuned before the capture
        torch.nn.functional.linear(x, w2)
    torch.cuda.current_stream().wait_stream(side)
    assert len(gemm.tuned()) == 1
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = gemm.linear(x, w)  # PyTorch's GEMM inside a capture all the same
        y2 = gemm.linear(x, w2)  # a new problem is not tuned inside a capture
    assert len(gemm.tuned()) == 1
    poison_cuda_cache()
    graph.replay()
    torch.cuda.synchronize()
    _check_rule(y, ref, low, "captured")
    torch.testing.assert_close(y2, torch.nn.functional.linear(x, w2), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["linear", "mm", "acc"])
def test_a_choice_is_per_dtype(op, monkeypatch):
    """The same shapes in bf16, then fp16: two problems, each tuned and chosen on its own (a
    candidate chosen for bf16 would read fp16 operands' bits as bf16)."""
    monkeypatch.setattr(gemm, "MIN_GAIN", -10.0)
    for dtype in (torch.bfloat16, torch.float16):
        args, ref, low = _operands(op, 2048, 256, 384, dtype, "cuda")
        poison_cuda_cache()
        _check_rule(_call(op, args), ref, low, f"{op} {dtype}")
    choices = gemm.tuned()
    assert sorted(str(key[4]) for key in choices) == ["torch.bfloat16", "torch.float16"]
    assert all(choice is not None for choice in choices.values())


@pytest.mark.gpu
def test_mismatched_operands_raise():
    """Operands that do not fit reach PyTorch's error, never a cuBLASLt call on them (rows above
    MIN_ROWS, so the tuned path would otherwise take them)."""
    m = gemm.MIN_ROWS
    a = torch.randn(m, 256, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(RuntimeError):
        gemm.mm(a, torch.randn(512, 128, device="cuda", dtype=torch.bfloat16))
    with pytest.raises(RuntimeError):
        gemm.mm(a, b.cpu())
    with pytest.raises(RuntimeError):
        gemm.mm(a, b, acc=torch.randn(m, 64, device="cuda", dtype=torch.bfloat16))
    with pytest.raises(RuntimeError):
        gemm.mm(a, b, acc=torch.randn(m, 128, device="cuda", dtype=torch.float16))
    with pytest.raises(RuntimeError):
        gemm.linear(a, torch.randn(128, 512, device="cuda", dtype=torch.bfloat16))
    assert gemm.tuned() == {}  # none of them reached cuBLASLt (not even to be timed)
    # the same operands, fitting, run (and match PyTorch's product to rounding)
    torch.testing.assert_close(gemm.mm(a, b), a @ b, rtol=2e-2, atol=2e-2)


def _aligned_bf16(*shape):
    """A bf16 tensor of ``shape`` starting on 256 bytes (as the CUDA allocator's blocks do)."""
    n = math.prod(shape)
    buf = torch.empty(n + 128, dtype=torch.bfloat16)
    start = (-buf.data_ptr() % 256) // 2
    return buf[start : start + n].view(shape)


def test_empty_operands_are_not_eligible(monkeypatch):
    """An operand without elements (a zero inner or output size; empty tensors often have no
    address at all, which passes the alignment check) goes to PyTorch: cuBLASLt's plan refuses a
    zero size. (The eligibility rule alone, as on a GPU where the kernels run: no GEMM runs here.)"""
    from hoptune import _lib

    monkeypatch.setattr(_lib, "kernels_run_on", lambda t: True)
    gemm.enable(True)
    m = gemm.MIN_ROWS
    assert gemm._eligible(_aligned_bf16(m, 64), _aligned_bf16(64, 128), m)
    assert not gemm._eligible(_aligned_bf16(m, 0), _aligned_bf16(0, 128), m)  # mm: inner size 0
    assert not gemm._eligible(_aligned_bf16(m, 64), _aligned_bf16(64, 0), m)  # mm: no columns
    assert not gemm._eligible(_aligned_bf16(m, 64), _aligned_bf16(0, 64), m)  # linear: N = 0


def test_operands_that_keep_pytorchs_gemm(monkeypatch):
    """The eligibility rule for each condition alone (as on a GPU where the kernels run: no GEMM
    runs here): operands of two dtypes, fp32, a column view, an operand off 256-byte alignment,
    deterministic algorithms asked for, and tuning turned off go to PyTorch; a 256-byte aligned,
    contiguous bf16 or fp16 pair of at least MIN_ROWS rows is eligible."""
    from hoptune import _lib

    monkeypatch.setattr(_lib, "kernels_run_on", lambda t: True)
    gemm.enable(True)
    m = gemm.MIN_ROWS
    a, b = _aligned_bf16(m, 64), _aligned_bf16(64, 128)
    assert gemm._eligible(a, b, m)
    assert gemm._eligible(a.view(torch.float16), b.view(torch.float16), m)
    assert not gemm._eligible(a, b, m - 1)
    assert not gemm._eligible(a, b.view(torch.float16), m)  # two dtypes
    assert not gemm._eligible(a.float(), b.float(), m)
    assert not gemm._eligible(a, _aligned_bf16(128, 64).t(), m)  # not contiguous
    buf = _aligned_bf16(m * 64 + 8)
    assert not gemm._eligible(buf[8:].view(m, 64), b, m)  # 16 bytes past the alignment
    assert not gemm._eligible(a, _aligned_bf16(64 * 128 + 8)[8:].view(64, 128), m)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert not gemm._eligible(a, b, m)
    monkeypatch.undo()
    monkeypatch.setattr(_lib, "kernels_run_on", lambda t: True)
    gemm.enable(False)
    assert not gemm._eligible(a, b, m)
    gemm.enable(True)
    assert gemm._eligible(a, b, m)


def test_linear_writes_into_out_on_the_cpu(monkeypatch):
    """linear(x, w, out=out) where PyTorch's GEMM runs (the CPU) writes the product into out, of
    x's leading shape, and returns out itself."""
    monkeypatch.setattr(gemm, "MIN_ROWS", 1)
    (x, w), _, _ = _operands("linear", 0, 24, 40, torch.float32, "cpu", x_shape=(3, 5))
    out = torch.full((3, 5, 40), float("nan"))
    got = gemm.linear(x, w, out=out)
    assert got is out
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w), rtol=0, atol=0)


class _RecordingPlan:
    def __init__(self):
        self.runs = []

    def run(self, index, a, b, d, beta, ws, wsb, stream):
        self.runs.append((index, beta))


def _chosen_candidate(monkeypatch, op="x@wT"):
    """(x, w, key, plan): an x @ w^T problem of MIN_ROWS rows with a stand-in plan chosen for it,
    as on a GPU where the kernels run (the rule alone); with op="acc+a@b" (a, b, key, plan) of an
    acc += a @ b problem, b (64, 32)."""
    from hoptune import _lib

    monkeypatch.setattr(_lib, "kernels_run_on", lambda t: True)
    monkeypatch.setattr(_lib, "stream", lambda t: 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    gemm.enable(True)
    m = gemm.MIN_ROWS
    x, w = _aligned_bf16(m, 64), _aligned_bf16(*((32, 64) if op == "x@wT" else (64, 32)))
    x.copy_(torch.randn(m, 64))
    w.copy_(torch.randn(w.shape))
    key = (op, m, *((32, 64) if op == "x@wT" else (64, 32)), torch.bfloat16, None)
    plan = _RecordingPlan()
    gemm._choices[key] = (plan, 3, {"candidate": 3})
    return x, w, key, plan


def test_a_chosen_candidate_runs_and_a_kept_pytorch_does_not(monkeypatch):
    """Once a problem is measured, a chosen candidate runs for it (PyTorch's GEMM does not), and a
    problem where PyTorch's GEMM was kept runs PyTorch's, as without this module. (The rule alone,
    as on a GPU where the kernels run, with a stand-in plan.)"""
    x, w, key, plan = _chosen_candidate(monkeypatch)
    gemm.linear(x, w)
    assert plan.runs == [(3, 0.0)]
    gemm._choices[key] = None
    y = gemm.linear(x, w)
    assert plan.runs == [(3, 0.0)]
    assert torch.equal(y, torch.nn.functional.linear(x, w))


def test_a_chosen_candidate_gets_only_operands_it_reads(monkeypatch):
    """A candidate reads its operands and the accumulator as dense blocks from their pointers (its
    tuning self-check refuses other layouts, so the case is a problem chosen before): a later call
    of that problem with a column-major weight or b, or with an accumulator off 256-byte alignment,
    takes PyTorch's GEMM; an aligned accumulator still takes the candidate. (The rule alone, with a
    stand-in plan.)"""
    x, w, _, plan = _chosen_candidate(monkeypatch)
    w_cols = _aligned_bf16(64, 32).copy_(w.t()).t()  # the same values, column-major
    assert not w_cols.is_contiguous() and torch.equal(w_cols, w)
    assert torch.equal(gemm.linear(x, w_cols), torch.nn.functional.linear(x, w))
    assert plan.runs == []
    a, b, _, plan = _chosen_candidate(monkeypatch, "acc+a@b")
    m = a.shape[0]
    acc = _aligned_bf16(m, 32).copy_(torch.randn(m, 32))
    want = acc.clone().addmm_(a, b)
    b_cols = _aligned_bf16(32, 64).copy_(b.t()).t()
    assert not b_cols.is_contiguous() and torch.equal(b_cols, b)
    got = _aligned_bf16(m, 32).copy_(acc)
    assert gemm.mm(a, b_cols, acc=got) is got and torch.equal(got, want)
    off = _aligned_bf16(m * 32 + 8, 1).view(-1)[1 : 1 + m * 32].view(m, 32).copy_(acc)
    assert off.is_contiguous() and off.data_ptr() % 256 == 2
    assert gemm.mm(a, b, acc=off) is off and torch.equal(off, want)
    assert plan.runs == []
    gemm.mm(a, b, acc=_aligned_bf16(m, 32).copy_(acc))
    assert plan.runs == [(3, 1.0)]


def test_an_out_cublaslt_cannot_write_takes_pytorchs_gemm(monkeypatch):
    """linear(x, w, out=out) gave out's pointer to the chosen candidate whatever out's layout: a
    strided or misaligned out would have been written as a contiguous rows x N block. Such an out
    (and one of another dtype) now takes PyTorch's GEMM, which writes it as it is laid out. (The
    rule alone, with a stand-in plan, as in the test above.)"""
    x, w, _, plan = _chosen_candidate(monkeypatch)
    m = x.shape[0]
    want = torch.nn.functional.linear(x, w)
    wide = _aligned_bf16(m, 64)
    flat = _aligned_bf16(m * 32 + 8, 1).view(-1)
    for name, out in {
        "strided": wide[:, :32],
        "misaligned": flat[1 : 1 + m * 32].view(m, 32),
    }.items():
        out.fill_(float("nan"))
        assert gemm.linear(x, w, out=out) is out
        assert plan.runs == [], name
        torch.testing.assert_close(out, want, rtol=0, atol=0, msg=name)
    out = _aligned_bf16(m, 32)
    gemm.linear(x, w, out=out)
    assert plan.runs == [(3, 0.0)]  # (an out it can write takes the candidate)


def test_rows_per_shape_cap_and_reset(monkeypatch):
    """At most MAX_ROWS_PER_SHAPE row counts of one weight shape are measured (the others keep
    PyTorch's GEMM unmeasured); reset() forgets them, so the next row count is measured again."""
    tuned = []

    def fake_tune(ext, key, *args):
        tuned.append(key[1])
        return None

    monkeypatch.setattr(gemm, "_cublaslt", lambda: (object(), None))
    monkeypatch.setattr(gemm, "_tune", fake_tune)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    out = torch.empty(2, 2)
    cap = gemm.MAX_ROWS_PER_SHAPE
    for rows in range(1, cap + 3):
        key = ("a@b", rows, 64, 32, torch.bfloat16, 0)
        assert not gemm._run(key, False, False, 32, rows, 64, 0, 0, out, None, 0.0)
    assert tuned == list(range(1, cap + 1))
    gemm.reset()
    assert gemm.tuned() == {}
    gemm._run(
        ("a@b", cap + 5, 64, 32, torch.bfloat16, 0), False, False, 32, cap + 5, 64, 0, 0, out, None, 0.0
    )
    assert tuned[-1] == cap + 5


def test_a_candidate_off_by_a_few_percent_is_not_a_contender(monkeypatch):
    """A candidate whose output differs from PyTorch's by a few percent of its largest value (not
    bf16 rounding: another result) is left out however fast it is."""
    offset = 0.1  # 3-7% of the largest of 64 standard normal values
    choice = _fake_tune(monkeypatch, [(OTHER_CFG, offset)], TORCH_CFG, {"torch": 1.0, 0: 0.5})
    assert choice is None
    assert gemm.measured()[("x@wT", 8, 8, 8)]["candidates"] == 0


@pytest.mark.gpu
def test_empty_operands_gpu(monkeypatch):
    """Rows above MIN_ROWS but an operand without elements: PyTorch's empty or zero product (acc
    unchanged), not cuBLASLt's refusal of a zero-size plan."""
    monkeypatch.setattr(gemm, "MIN_GAIN", -10.0)
    m = gemm.MIN_ROWS
    opts = dict(device="cuda", dtype=torch.bfloat16)
    a, b = torch.randn(m, 0, **opts), torch.randn(0, 128, **opts)
    assert torch.equal(gemm.mm(a, b), torch.zeros(m, 128, **opts))
    acc = torch.randn(m, 128, **opts)
    assert torch.equal(gemm.mm(a, b, acc=acc.clone()), acc)
    assert gemm.mm(torch.randn(m, 64, **opts), torch.randn(64, 0, **opts)).shape == (m, 0)
    assert gemm.linear(torch.randn(2, m, 256, **opts), torch.randn(0, 256, **opts)).shape == (2, m, 0)
    assert gemm.tuned() == {}


@pytest.mark.gpu
def test_plan_rejects_bad_arguments():
    ext, why = gemm.cublaslt_extension()
    assert ext is not None, why
    handle = ext.cublaslt_handle()
    with pytest.raises(ValueError, match="m, n, k"):
        ext.CublasLtPlan(handle, True, False, 0, 8, 8, 2)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        ext.CublasLtPlan(handle, True, False, 8, 8, 8, 0)
    plan = ext.CublasLtPlan(handle, True, False, 256, 256, 256, 2)
    assert plan.search(4, 1 << 20) > 0
    with pytest.raises(RuntimeError, match="out of range"):
        plan.run(plan.count(), 0, 0, 0, 0.0, 0, 0, 0)
    with pytest.raises(ValueError, match="max_count"):
        plan.search(0, 1 << 20)
    with pytest.raises(ValueError, match="sm_count"):
        plan.set_sm_count(-1)


@pytest.mark.gpu
def test_plan_with_an_sm_count_target():
    """A plan told to target fewer SMs than the device has (set_sm_count) still offers candidates,
    and each one's product matches torch.mm's by the bf16 rounding; setting it drops the earlier
    search's candidates."""
    ext, why = gemm.cublaslt_extension()
    assert ext is not None, why
    torch.manual_seed(3)
    m, n, k = 1000, 768, 520  # (dims no tile divides)
    a = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    want = torch.mm(a.double(), b.double())
    low = torch.mm(a, b).double()
    plan = ext.CublasLtPlan(ext.cublaslt_handle(), False, False, k, m, n, _lib.DTYPE_CODES[torch.bfloat16])
    assert plan.search(4, 0) > 0
    plan.set_sm_count(max(torch.cuda.get_device_properties(0).multi_processor_count - 8, 1))
    assert plan.count() == 0
    assert plan.search(4, 0) > 0
    for i in range(plan.count()):
        out = torch.full((m, k), float("nan"), device="cuda", dtype=torch.bfloat16)
        plan.run(
            i, b.data_ptr(), a.data_ptr(), out.data_ptr(), 0.0, 0, 0, torch.cuda.current_stream().cuda_stream
        )
        err = (out.double() - want).abs().max().item()
        assert err <= 2 * (low - want).abs().max().item() + 1e-6, (i, err)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1000, 4160])  # the merged dX (N <= 2 M) and the unmerged one
def test_in_the_qlora_op(n, monkeypatch):
    """The op's forward GEMM and dX through chosen cuBLASLt candidates: output and gradients by
    the rule against float64."""
    from tests.ops.test_nf4_lora import _check

    monkeypatch.setattr(gemm, "MIN_GAIN", -10.0)
    _check(2048, 512, n, 16, torch.bfloat16, "cuda", seed=n, x_shape=(2, 1024), bias=False)
    ops = {key[0] for key, choice in gemm.tuned().items() if choice is not None}
    assert "x@wT" in ops
    assert ("a@b" if n <= 4096 else "acc+a@b") in ops


class _FakeExt:
    """A cuBLASLt extension whose candidates write chosen outputs: ``configs`` the candidates
    without a workspace (configuration, output offset from PyTorch's), ``torch_config`` the
    heuristic's first with PyTorch's workspace. Calls are logged so the timing stub can name them."""

    def __init__(self, out, ref, configs, torch_config):
        self.out, self.ref, self.configs, self.torch_config = out, ref, configs, torch_config
        self.last = None
        self.searched = []
        ext = self

        class Plan:
            def __init__(self, *args):
                self.cands = []

            def search(self, count, workspace):
                ext.searched.append(workspace)
                self.cands = [c for c, _ in ext.configs] if workspace == 0 else [ext.torch_config]
                self.offsets = [o for _, o in ext.configs] if workspace == 0 else [0.0]
                return len(self.cands)

            def count(self):
                return len(self.cands)

            def describe(self, i):
                return [*list(self.cands[i]), 0]

            def run(self, i, a, b, d, beta, ws, wsb, stream):
                assert (ws, wsb) == (0, 0) and d == ext.out.data_ptr()
                ext.last = i
                ext.out.copy_(ext.ref + self.offsets[i])

        self.CublasLtPlan = Plan

    def cublaslt_handle(self):
        return 0


def _fake_tune(monkeypatch, configs, torch_config, times):
    """gemm._tune on a CPU 'problem' with _FakeExt's candidates and these times (ms by candidate
    index, "torch" for PyTorch's)."""
    from hoptune import _lib

    out = torch.empty(8, 8, dtype=torch.bfloat16)
    ref = torch.randn(8, 8).to(torch.bfloat16)
    ext = _FakeExt(out, ref, configs, torch_config)

    def torch_fn():
        ext.last = "torch"
        out.copy_(ref)

    def time_ms(fn, calls=gemm.WINDOW):
        fn()
        t = times[ext.last]  # a time, or a list of one per round (taken in order)
        return t.pop(0) if isinstance(t, list) else t

    monkeypatch.setattr(gemm, "_time_ms", time_ms)
    monkeypatch.setattr(_lib, "stream", lambda t: 0)
    choice = gemm._tune(ext, ("x@wT", 8, 8, 8), True, False, 8, 8, 8, 0, 0, torch_fn, out)
    assert ext.searched[0] == 0  # the candidates are searched for running without a workspace
    assert torch.equal(out, ref)  # PyTorch's result left in out
    return choice


TORCH_CFG = [66, 24, 35, 1, -1]
OTHER_CFG = [66, 31, 35, 1, -1]


def test_default_is_torch_kernel_without_workspace(monkeypatch):
    # no candidate 4% faster, PyTorch's configuration second in the list, equal output, 0.7% faster
    choice = _fake_tune(
        monkeypatch, [(OTHER_CFG, 0.0), (TORCH_CFG, 0.0)], TORCH_CFG, {"torch": 1.0, 0: 0.98, 1: 0.993}
    )
    assert choice is not None
    _, index, desc = choice
    assert index == 1 and desc["reason"] == "PyTorch's kernel without the workspace"
    assert desc["tile"] == TORCH_CFG[1] and desc["workspace"] == 0


def test_faster_candidate_wins_over_default(monkeypatch):
    choice = _fake_tune(
        monkeypatch, [(TORCH_CFG, 0.0), (OTHER_CFG, 0.0)], TORCH_CFG, {"torch": 1.0, 0: 0.99, 1: 0.95}
    )
    assert choice is not None and choice[1] == 1 and choice[2]["reason"] == "faster"


def test_judged_by_same_round_ratios(monkeypatch):
    """A clock that dropped in the middle round (windows an H100 process timed, PyTorch's GEMM
    and its kernel without the workspace): the medians are 3.5% apart and kept PyTorch's GEMM with
    its memset; the same-round ratios (median 0.998) keep the kernel without the workspace."""
    torch_ms = [0.3525, 0.3526, 0.3546, 0.3937, 0.3892]
    default_ms = [0.3520, 0.3519, 0.3671, 0.3908, 0.3886]
    assert statistics.median(default_ms) > (1 + gemm.DEFAULT_SLACK) * statistics.median(torch_ms)
    times = {"torch": list(torch_ms), 0: list(default_ms)}
    choice = _fake_tune(monkeypatch, [(TORCH_CFG, 0.0)], TORCH_CFG, times)
    assert choice is not None and choice[2]["reason"] == "PyTorch's kernel without the workspace"
    assert choice[2]["ratio"] == pytest.approx(0.3886 / 0.3892) and choice[2]["ms"] == 0.3671
    record = gemm.measured()[("x@wT", 8, 8, 8)]
    assert record["default_ratio"] == record["best_ratio"] == choice[2]["ratio"]
    assert record["rounds_ms"] == {"torch": torch_ms, "0": default_ms}
    # and the other way: 2% slower in four rounds of five is refused, though the medians (the
    # clock slower in PyTorch's middle window than in the candidate's) made it 6% faster
    torch_ms = [0.350, 0.350, 0.380, 0.380, 0.380]
    slow = [0.357, 0.357, 0.357, 0.3876, 0.3876]
    assert statistics.median(slow) < (1 - gemm.MIN_GAIN) * statistics.median(torch_ms)
    times = {"torch": list(torch_ms), 0: list(slow)}
    assert _fake_tune(monkeypatch, [(TORCH_CFG, 0.0)], TORCH_CFG, times) is None
    assert gemm.measured()[("x@wT", 8, 8, 8)]["best_ratio"] == pytest.approx(1.02)


def test_rounds_alternate_order(monkeypatch):
    """The contenders are timed in turn forward and backward, so a steady drift within a round
    reaches PyTorch's window first in one round and last in the next."""
    order = []

    class Times(dict):  # the order the windows' times are asked for
        def __getitem__(self, k):
            order.append(k)
            return dict.__getitem__(self, k)

    monkeypatch.setattr(gemm, "ROUNDS", 3)
    times = Times({"torch": 1.0, 0: 0.99, 1: 0.98})
    _fake_tune(monkeypatch, [(OTHER_CFG, 0.0), (TORCH_CFG, 0.0)], TORCH_CFG, times)
    assert order == ["torch", 0, 1, 1, 0, "torch", "torch", 0, 1]


@pytest.mark.parametrize(
    "configs,times,why",
    [
        ([(TORCH_CFG, 2.0**-6)], {"torch": 1.0, 0: 0.99}, "output differs from PyTorch's"),
        ([(TORCH_CFG, 0.0)], {"torch": 1.0, 0: 1.02}, "slower than PyTorch's by more than the slack"),
        ([(OTHER_CFG, 0.0)], {"torch": 1.0, 0: 0.99}, "another configuration"),
    ],
)
def test_default_refused(monkeypatch, configs, times, why):
    assert _fake_tune(monkeypatch, configs, TORCH_CFG, times) is None, why
    key = ("x@wT", 8, 8, 8)
    assert ("default_candidate" in gemm.measured()[key]) == (why.startswith("slower")), why


@pytest.mark.gpu
def test_default_candidate_gpu(monkeypatch):
    """With no candidate allowed to win on speed, a large bf16 problem runs PyTorch's own kernel
    without the workspace: found, kept, and its output equal to PyTorch's bit for bit."""
    monkeypatch.setattr(gemm, "MIN_GAIN", 1.0)
    monkeypatch.setattr(gemm, "DEFAULT_SLACK", 10.0)  # (speed is not what this test checks)
    (x, w), _ref, _low = _operands("linear", 4096, 4096, 4096, torch.bfloat16, "cuda")
    first = gemm.linear(x, w)
    poison_cuda_cache()
    y = gemm.linear(x, w)
    (key, choice), *rest = gemm.tuned().items()
    assert not rest and choice is not None, gemm.measured()
    assert choice["reason"] == "PyTorch's kernel without the workspace" and choice["workspace"] == 0
    assert gemm.measured()[key]["default_candidate"] == choice["candidate"]
    expected = torch.nn.functional.linear(x, w)
    assert torch.equal(y, expected) and torch.equal(first, expected)


@pytest.mark.parametrize(
    "value,enabled",
    [("1", True), ("", False), ("0", False), ("false", False), ("No", False), ("OFF", False), ("true", True)],
)
def test_gemm_tuning_reads_false_as_false(monkeypatch, value, enabled):
    """HOPTUNE_GEMM_TUNING=false kept the tuning on: only 0 or empty turned it off."""
    from hoptune.ops import gemm

    monkeypatch.setenv("HOPTUNE_GEMM_TUNING", value)
    gemm._enabled_by_env.cache_clear()
    try:
        assert gemm._enabled_by_env() is enabled
    finally:
        gemm._enabled_by_env.cache_clear()
