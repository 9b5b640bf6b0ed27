"""Large 16-bit GEMMs with cuBLASLt's algorithm chosen by measurement.

cuBLAS picks one algorithm per problem by heuristic. On an H200, at M = 8192, another of
cuBLASLt's candidates was 2-4% faster than that choice on several of the QLoRA layer's GEMMs
(``bench/bench_gemm_algo.py``, ``bench/results/gemm_algo.json``). So the first time a problem
(operation, rows, N, K, dtype, device) comes, its candidates and PyTorch's own GEMM are timed on
that call's inputs, and the fastest is kept for the rest of the process when it beats PyTorch's by
at least ``MIN_GAIN`` (each contender's time over PyTorch's in the same timing round, the median
over the rounds). Tuning a problem costs about a hundred of its GEMMs and one device
synchronization, once.

The candidates are searched for running without a workspace. With the workspace PyTorch gives
cuBLAS, the heuristic's first kernel asks for 4 bytes of it, and cuBLAS clears them with a memset
before every GEMM: 0.8 µs, then 1.6 µs idle before the GEMM starts, where a kernel boundary costs
0.9-1.2 µs (``bench/probes/forward_gap.py``, ``results/forward_gap_probe_workspace.json``).
Without a workspace the heuristic gives the same configuration (tile, stages, cluster) as another
kernel (``ssched`` in its name): no memset, and the same output bit for bit. So when no candidate
wins by the margin, the problem still runs through cuBLASLt if one candidate is that kernel: the
configuration the heuristic gives first with PyTorch's workspace, an output equal to PyTorch's bit
for bit, and a measured time no more than ``DEFAULT_SLACK`` above PyTorch's (the same ratio).
Otherwise the problem stays with PyTorch.

The margin is wide because this short timing (GEMMs back to back on the same operands) has
flattered candidates that are no faster in use: on the 4096 x 4096 forward it measured 0.969-0.978
of PyTorch's time in two of four processes, and the op then ran 1% slower behind a device sleep;
the 8192 x 28672 forward measured 0.962-0.983 with no gain in use. The gains that held in use
measured 0.941-0.968 (4096 x 14336 and 8192 x 8192 forwards: 3% of the call).

PyTorch's GEMM runs instead (the behaviour without this module) when any of these holds: fewer
than ``MIN_ROWS`` rows; operands not contiguous, not 256-byte aligned, or not bf16/fp16 on a CUDA
device where hoptune's kernels run; more than ``MAX_ROWS_PER_SHAPE`` distinct row counts already
tuned for the weight's shape (a run whose batches change length keeps the first ones); a CUDA
graph being captured; ``torch.are_deterministic_algorithms_enabled()`` (the choice can differ
between processes, and with it the rounding); ``HOPTUNE_GEMM_TUNING=0`` in the environment (read
once) or ``enable(False)``; or cuBLASLt not loaded in this process. ``tuned()`` lists the choices
made, ``measured()`` the timings behind them, ``reset()`` forgets them.
"""

from __future__ import annotations

import copy
import functools
import statistics

import torch

from hoptune import _lib

MIN_ROWS = 2048
MAX_ROWS_PER_SHAPE = 16
MIN_GAIN = 0.04  # a candidate must take at most (1 - MIN_GAIN) of PyTorch's time (see above)
DEFAULT_SLACK = 0.01  # PyTorch's kernel without the workspace: at most 1% above PyTorch's time
MAX_CANDIDATES = 16
ROUNDS = 5  # timing rounds over all contenders
WINDOW = 4  # calls per timed window
TORCH_WORKSPACE_BYTES = 32 << 20  # what PyTorch gives cuBLAS on Hopper (to find its kernel)
_ALIGN = 256  # the alignment cuBLASLt's heuristic assumes by default

_choices: dict[tuple, tuple | None] = {}  # key -> (plan, candidate index, description) or None
_rows_tuned: dict[tuple, int] = {}
_measured: dict[tuple, dict] = {}  # key -> PyTorch's and the fastest candidate's times


_override: bool | None = None


@functools.cache
def _enabled_by_env() -> bool:
    return not _lib.env_off("HOPTUNE_GEMM_TUNING", "1")


def _enabled() -> bool:
    return _enabled_by_env() if _override is None else _override


def enable(on: bool | None = True) -> bool | None:
    """Turns the measured choice on or off for this process (None: back to what
    HOPTUNE_GEMM_TUNING says); returns the previous setting. Choices already made are kept."""
    global _override
    previous, _override = _override, on
    return previous


def reset() -> None:
    """Forgets every choice: each problem is measured again when it next comes."""
    _choices.clear()
    _rows_tuned.clear()
    _measured.clear()


@functools.cache
def _cublaslt() -> tuple[object | None, str | None]:
    """(the extension with cuBLASLt loaded, None) or (None, why not); the caller has checked that
    the kernels can run (an sm_90 GPU)."""
    ext = _lib.extension()
    if ext is None or not hasattr(ext, "CublasLtPlan"):
        return None, "the CUDA extension is not built"
    # PyTorch links cuBLAS, which loads cuBLASLt; a GEMM first in case it is loaded lazily
    a = torch.ones(16, 16, device="cuda", dtype=torch.bfloat16)
    torch.mm(a, a)
    paths = []
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "libcublasLt.so" in line})
    except OSError as e:
        return None, f"cannot read /proc/self/maps: {e}"
    if not paths:
        return None, "libcublasLt is not loaded in this process"
    err = ext.cublaslt_load(paths[0])
    return (None, err) if err else (ext, None)


def cublaslt_extension() -> tuple[object | None, str | None]:
    """(hoptune's extension with this process' cuBLASLt library loaded into it, None), or (None,
    why not). Its ``CublasLtPlan`` is what the GEMM choice runs; benchmarks and tools that time
    cuBLASLt's candidates themselves take it from here."""
    why = _lib.unavailable_reason()
    return (None, why) if why is not None else _cublaslt()


def tuning_unavailable_reason() -> str | None:
    """Why no GEMM is tuned in this process (None when tuning can run on an sm_90 GPU)."""
    why = _lib.unavailable_reason()
    if why is not None:
        return why
    if not _enabled():
        return "turned off (HOPTUNE_GEMM_TUNING=0 or hoptune.ops.gemm.enable(False))"
    return _cublaslt()[1]


def tuned() -> dict[tuple, dict | None]:
    """The problems seen so far: (op, rows, N, K, dtype, device) -> the chosen cuBLASLt candidate
    (its configuration, measured time against PyTorch's, and ``reason``: "faster", or "PyTorch's
    kernel without the workspace") or None (PyTorch's GEMM kept)."""
    return {k: (None if v is None else dict(v[2])) for k, v in _choices.items()}


def measured() -> dict[tuple, dict]:
    """For every problem tuned: PyTorch's time, the number of candidates that ran correctly, the
    fastest one's index, time (ms, median window) and ratio to PyTorch's (the median over the
    rounds of the two windows' ratio), whether kept or not, and where one was found, PyTorch's
    kernel without the workspace (``default_candidate``, ``default_ms``, ``default_ratio``);
    ``rounds_ms``: each contender's windows ("torch", then the candidates' indices as strings),
    round by round."""
    return {k: copy.deepcopy(v) for k, v in _measured.items()}  # (the windows' lists too)


def _eligible(a: torch.Tensor, b: torch.Tensor, rows: int) -> bool:
    return (
        rows >= MIN_ROWS
        and a.numel() > 0
        and b.numel() > 0  # (an empty operand: a plan of a zero size is refused)
        and a.dtype in (torch.bfloat16, torch.float16)
        and b.dtype == a.dtype
        and b.device == a.device
        and a.is_contiguous()
        and b.is_contiguous()
        and a.data_ptr() % _ALIGN == 0
        and b.data_ptr() % _ALIGN == 0
        and _lib.kernels_run_on(a)
        and _enabled()
        and not torch.are_deterministic_algorithms_enabled()
    )


def _time_ms(fn, calls: int = WINDOW) -> float:
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / calls


def _torch_config(ext, handle, transa, transb, m, n, k, dtype_code) -> list | None:
    """The configuration (algorithm, tile, stages, split-K, cluster) of the kernel cuBLAS' heuristic
    gives first with PyTorch's workspace: PyTorch's own GEMM (None if there is none)."""
    plan = ext.CublasLtPlan(handle, transa, transb, m, n, k, dtype_code)
    if plan.search(1, TORCH_WORKSPACE_BYTES) == 0:
        return None
    return list(plan.describe(0))[:5]


def _tune(ext, key, transa, transb, m, n, k, a_ptr, b_ptr, torch_fn, out: torch.Tensor):
    """Times PyTorch's GEMM (torch_fn, writing out) and cuBLASLt's candidates without a workspace
    (writing out too, beta = 0) on this call's operands, in ROUNDS rounds of a call and a timed
    window of WINDOW calls each (the contenders in turn forward and backward), judged by the median
    over the rounds of each candidate's window over PyTorch's; returns (plan, index, description)
    or None."""
    handle = ext.cublaslt_handle()
    code = _lib.DTYPE_CODES[out.dtype]
    plan = ext.CublasLtPlan(handle, transa, transb, m, n, k, code)
    if plan.search(MAX_CANDIDATES, 0) == 0:
        return None
    torch_config = _torch_config(ext, handle, transa, transb, m, n, k, code)
    stream = _lib.stream(out)
    torch_fn()
    ref = out.clone()
    scale = ref.abs().max().float().clamp_min(1e-30)
    runners = {"torch": torch_fn}
    default = None  # PyTorch's kernel without the workspace
    for i in range(plan.count()):

        def run(i=i):
            plan.run(i, a_ptr, b_ptr, out.data_ptr(), 0.0, 0, 0, stream)

        try:
            out.fill_(float("nan"))
            run()
        except RuntimeError:  # not supported for these operands after all: not a contender
            continue
        err = ((out.float() - ref.float()).abs().max() / scale).item()
        if err < 1e-2:  # the same products summed in another order: bf16 rounding apart
            runners[i] = run
            if default is None and list(plan.describe(i))[:5] == torch_config and torch.equal(out, ref):
                default = i
    names = list(runners)
    times: dict = {name: [] for name in names}
    for r in range(ROUNDS):  # rounds over all contenders, in turn forward and backward
        for name in names if r % 2 == 0 else names[::-1]:
            runners[name]()
            times[name].append(_time_ms(runners[name]))
    best = {name: statistics.median(t) for name, t in times.items()}
    torch_ms = best.pop("torch")
    # Each candidate is judged by its time over PyTorch's in the same round, the median over the
    # rounds: a clock that drops between two rounds moves both sides of a round's ratio alike,
    # where it could put the two medians in rounds of different clocks (one process kept PyTorch's
    # GEMM with its memset so: medians 3.5% apart, the same-round ratios 0.993-0.999 but one).
    ratio = {n: statistics.median(t / p for t, p in zip(times[n], times["torch"])) for n in best}
    torch_fn()  # leave PyTorch's result in out
    # (every window kept, in the order timed (PyTorch's first in even rounds, last in odd ones), to
    # tell a real difference from a measurement that went wrong: one process once timed every
    # candidate, PyTorch's own kernel without the workspace too, 8-9% above PyTorch's GEMM)
    rounds = {str(name): t for name, t in times.items()}
    _measured[key] = {"candidates": len(best), "torch_ms": torch_ms, "rounds_ms": rounds}
    if default is not None:
        _measured[key].update(
            default_candidate=default, default_ms=best[default], default_ratio=ratio[default]
        )
    if not best:
        return None
    index = min(ratio, key=ratio.get)
    _measured[key].update(best_candidate=index, best_ms=best[index], best_ratio=ratio[index])
    reason = "faster"
    if ratio[index] > 1.0 - MIN_GAIN:
        if default is None or ratio[default] > 1.0 + DEFAULT_SLACK:
            return None
        index, reason = default, "PyTorch's kernel without the workspace"
    algo, tile, stages, splitk, cluster, wsb = plan.describe(index)
    desc = {
        "candidate": index,
        "reason": reason,
        "algo": algo,
        "tile": tile,
        "stages": stages,
        "splitk": splitk,
        "cluster": cluster,
        "workspace": wsb,
        "ms": best[index],
        "torch_ms": torch_ms,
        "ratio": ratio[index],
    }
    return plan, index, desc


def _torch_kept(key) -> bool:
    """The problem was measured before and PyTorch's GEMM kept: the caller runs it as it would
    without this module (no output allocated here, no further checks)."""
    return _choices.get(key, False) is None


def _run(key, transa, transb, m, n, k, a, b, out, torch_fn, beta: float) -> bool:
    """Runs the problem's chosen candidate into out (tuning it first if new); False when the
    caller must run PyTorch's GEMM itself. The caller has checked _torch_kept."""
    choice = _choices.get(key, False)
    if torch.cuda.is_current_stream_capturing():
        return False
    if choice is False:
        ext, _ = _cublaslt()
        shape = key[:1] + key[2:]
        if ext is None or _rows_tuned.get(shape, 0) >= MAX_ROWS_PER_SHAPE:
            return False
        _rows_tuned[shape] = _rows_tuned.get(shape, 0) + 1
        if beta != 0.0:  # tuned on a scratch output with beta = 0: out holds the addend
            scratch = torch.empty_like(out)
            choice = _tune(ext, key, transa, transb, m, n, k, a, b, lambda: torch_fn(scratch), scratch)
        else:
            choice = _tune(ext, key, transa, transb, m, n, k, a, b, lambda: torch_fn(out), out)
        _choices[key] = choice
        if choice is None:
            return False
    plan, index, _ = choice
    plan.run(index, a, b, out.data_ptr(), beta, 0, 0, _lib.stream(out))
    return True


def linear(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (*, K) @ w (N, K)^T as a new tensor (*, N): ``F.linear(x, w)``; with ``out`` (x's
    leading shape by N, contiguous, x's dtype) written into it, and out returned."""
    k = x.shape[-1]
    n = w.shape[0]
    rows = x.numel() // k if k else 0
    key = ("x@wT", rows, n, k, x.dtype, x.device.index)
    # (operands that do not fit go to PyTorch, whose error names the mismatch; so does an out that
    # cuBLASLt could not write as rows x N from its pointer)
    out_fits = out is None or (
        out.shape == (*x.shape[:-1], n)
        and out.dtype == x.dtype
        and out.device == x.device
        and out.is_contiguous()
        and out.data_ptr() % _ALIGN == 0
    )
    if w.dim() != 2 or w.shape[1] != k or not out_fits or not _eligible(x, w, rows) or _torch_kept(key):
        if out is None:
            return torch.nn.functional.linear(x, w)
        torch.mm(x.reshape(rows, k), w.t(), out=out.view(rows, n))
        return out
    y = out if out is not None else torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    x2, y2 = x.view(rows, k), y.view(rows, n)
    # column-major: y^T (N x rows) = (w as K x N)^T (x as K x rows)
    if not _run(
        key,
        True,
        False,
        n,
        rows,
        k,
        w.data_ptr(),
        x.data_ptr(),
        y2,
        lambda o: torch.mm(x2, w.t(), out=o),
        0.0,
    ):
        torch.mm(x2, w.t(), out=y2)
    return y


def mm(a: torch.Tensor, b: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
    """a (M, N) @ b (N, K); with ``acc`` (M, K, contiguous, a's dtype), acc += a @ b in place (one
    write of the result, the addend read in the GEMM's epilogue) and acc returned."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:  # PyTorch's error names it
        return torch.mm(a, b) if acc is None else acc.addmm_(a, b)
    m, n = a.shape
    k = b.shape[1]
    key = ("a@b" if acc is None else "acc+a@b", m, n, k, a.dtype, a.device.index)
    if (
        not _eligible(a, b, m)
        or (
            acc is not None
            and not (
                acc.shape == (m, k)
                and acc.dtype == a.dtype
                and acc.device == a.device
                and acc.is_contiguous()
                and acc.data_ptr() % _ALIGN == 0
            )
        )
        or _torch_kept(key)
    ):
        return torch.mm(a, b) if acc is None else acc.addmm_(a, b)
    out = acc if acc is not None else torch.empty(m, k, dtype=a.dtype, device=a.device)
    beta = 0.0 if acc is None else 1.0
    # column-major: out^T (K x M) = (b as K x N) (a as N x M)
    if not _run(
        key, False, False, k, m, n, b.data_ptr(), a.data_ptr(), out, lambda o: torch.mm(a, b, out=o), beta
    ):
        return torch.mm(a, b, out=out) if acc is None else acc.addmm_(a, b)
    return out
