"""Shared benchmark harness: CUDA-event medians, ceilings measured in the same run, JSON out.

Every benchmark compares against its anchor measured in the same process on the same inputs and
reports ratios; absolute times are for orientation only (machines are shared and noisy).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import torch

from hoptune.plan import KNOWN_MODELS

# the process' umask, for the files write_json makes (os.umask reads it only by setting it)
_UMASK = os.umask(0o022)
os.umask(_UMASK)

# Llama-3-8B shape for benchmarks that build a random-weight model: the sizes `hoptune plan`
# knows, plus the config fields a transformers LlamaConfig needs (public config.json)
LLAMA_8B = dict(
    {k: v for k, v in KNOWN_MODELS["llama-3-8b"].items() if k != "model_type"},
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
)


def bench(fn: Callable[[], object], warmup: int = 3, rep: int = 20, lead_ms: float = 0.0) -> float:
    """Median milliseconds of ``fn()`` over ``rep`` runs (CUDA events), after ``warmup`` runs.
    ``lead_ms`` > 0: each timed call is queued behind a device sleep of that length, so the host
    has launched all of the call's work before the device reaches it: the call's device time with
    no launch latency or host gaps inside it, as when the GPU is kept busy in training (the
    host work of one call must take less than ``lead_ms``)."""
    cycles = int(lead_ms * 2e6)  # at most ~2 GHz on an H100/H200: at least lead_ms
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rep):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        if cycles:
            torch.cuda._sleep(cycles)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def ratio_interleaved(
    fn_a: Callable[[], object],
    fn_b: Callable[[], object],
    rounds: int = 7,
    rep: int = 5,
    covered: bool = False,
) -> float:
    """Median over ``rounds`` of time(fn_a) / time(fn_b), the two measured back to back in each
    round: a ratio robust to the GPU's clock drifting over a run (several % on a busy machine).
    ``covered``: each call timed behind a 3 ms device sleep (bench's lead_ms: device time, the
    host's launch work hidden)."""
    lead = 3.0 if covered else 0.0
    ratios = []
    for _ in range(rounds):
        ratios.append(bench(fn_a, 1, rep, lead) / bench(fn_b, 1, rep, lead))
    return statistics.median(ratios)


def bench_queued(fn: Callable[[], object], calls: int = 10, warmup: int = 3, rep: int = 10) -> float:
    """Milliseconds per call when ``calls`` calls run back to back, so the host's launch work for
    one call overlaps the device work of the previous ones (as in a model's forward)."""

    def many():
        for _ in range(calls):
            fn()

    return bench(many, warmup=warmup, rep=rep) / calls


def device_ms(fn: Callable[[], object], calls: int = 10, warmup: int = 3) -> float:
    """GPU time of one call: the summed duration of the CUDA kernels (and memsets/copies) that
    ``calls`` back-to-back calls launch (torch.profiler), divided by ``calls``. Host time and the
    gaps it leaves between kernels are excluded: what the call costs the device."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    busy_us = sum(e.time_range.elapsed_us() for e in prof.events() if e.device_type.name == "CUDA")
    return busy_us / calls / 1e3


def is_device_sleep(name: str, dur_us: float = 0.0) -> bool:
    """Whether a profiled device kernel is the device sleep a timed call is queued behind
    (torch.cuda._sleep's kernel, named spin_kernel), or, given its duration, longer than 1 ms
    (longer than any kernel of a timed call)."""
    return "spin" in name or "sleep" in name or dur_us > 1000.0


# device-time categories of a training step's kernels, by kernel name (the first that matches)
KERNEL_CATEGORIES = (
    ("hoptune NF4 dequantize", r"hoptune.*(dequant|merge)"),
    ("hoptune LoRA passes", r"hoptune.*(dy_pass|lora)"),
    ("hoptune log-probs", r"hoptune.*logprob"),
    ("hoptune decoder ops", r"hoptune.*(rms_norm|silu_mul|rope)"),
    ("hoptune other", r"hoptune"),
    ("attention", r"sdpa|flash|fmha|attention|_attn"),  # (before GEMM: cuDNN's names hold "sm90_")
    ("GEMM (cuBLAS / CUTLASS)", r"nvjet|gemm|cutlass|xmma|cublas|sm90_"),
    ("optimizer", r"adam|multi_tensor"),
    ("memset / copy", r"^Memset|^Memcpy|copy_kernel|CatArrayBatched"),
    (
        "elementwise / reductions (PyTorch)",
        r"elementwise|vectorized|reduce|Reduce|softmax|norm|index|scatter|gather",
    ),
)


def kernel_category(name: str) -> str:
    """``name``'s category in KERNEL_CATEGORIES, or "other"."""
    for cat, pattern in KERNEL_CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return cat
    return "other"


def device_breakdown(fn: Callable[[], object]) -> dict:
    """One call of ``fn`` under torch.profiler: the summed device time of its kernels (and
    memsets / copies) per category and per kernel name (longest first), with the call's wall time
    (the difference is the device's idle time inside the call), and where the device idled
    (``idle_gaps``)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    per_cat: dict[str, float] = {}
    per_kernel: dict[str, list] = {}
    events = prof.events()
    for e in events:
        if e.device_type.name != "CUDA":
            continue
        us = e.time_range.elapsed_us()
        cat = kernel_category(e.name)
        per_cat[cat] = per_cat.get(cat, 0.0) + us
        k = per_kernel.setdefault(e.name, [cat, 0.0, 0])
        k[1] += us
        k[2] += 1
    busy = sum(per_cat.values())
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][1])
    return {
        "wall_ms": wall * 1e3,
        "device_busy_ms": busy / 1e3,
        "by_category_ms": {c: v / 1e3 for c, v in sorted(per_cat.items(), key=lambda kv: -kv[1])},
        "kernels": [{"name": n[:300], "category": c, "ms": us / 1e3, "count": k} for n, (c, us, k) in top],
        "idle": idle_gaps(kernel_spans(prof), events),
    }


def print_breakdown(profile: dict, label: str = "profiled step", top: int = 8) -> None:
    """device_breakdown's result, printed: wall and kernel time, the kernels by category, the idle
    time with its ``top`` launch paths, and the host syncs."""
    print(f"{label}: {profile['wall_ms']:.1f} ms wall, {profile['device_busy_ms']:.1f} ms of kernels")
    for cat, ms in profile["by_category_ms"].items():
        print(f"  {cat:<40} {ms:8.1f} ms")
    idle = profile["idle"]
    print(f"device idle between kernels: {idle['total_ms']:.1f} ms in {idle['gaps']} gaps; by launch:")
    for g in idle["by_launch_path"][:top]:
        print(f"  {g['ms']:7.2f} ms {g['gaps']:5d} gaps  {g['path'][:110]}")
    for g in idle["host_syncs"]:
        print(f"  sync x{g['count']}: {g['path'][:110]}")


def _launch_path(e) -> str:
    """The host ops around a kernel's launch: the outermost, then the two innermost (the CUDA
    runtime call itself left out)."""
    names = []
    while e is not None:
        names.append(e.name)
        e = e.cpu_parent
    names = [n for n in names if not n.startswith("cu")] or names
    if not names:
        return "?"
    inner = list(reversed(names[:2]))
    return " > ".join(
        inner if len(names) <= 2 else [names[-1], *([] if len(names) == 3 else ["..."]), *inner]
    )


def kernel_spans(prof) -> list[tuple[float, float, str, int]]:
    """(start us, end us, name, the launching host op's id) of each device event of a profile,
    from the profiler's own records (its FunctionEvents carry the launch link only in newer torch)."""
    out = []
    for e in prof.profiler.kineto_results.events():
        if e.device_type().name == "CUDA":
            start = e.start_ns() / 1e3
            out.append((start, start + e.duration_ns() / 1e3, e.name(), e.linked_correlation_id()))
    return out


def idle_gaps(
    kernels: Sequence[tuple[float, float, str, int]], events, min_us: float = 5.0, top: int = 12
) -> dict:
    """Where the device idles between the first and last of ``kernels`` (``kernel_spans``): the
    gaps of at least ``min_us`` before each kernel, summed by the host ops (of the profile's
    ``events``) that launched the kernel after the gap (``_launch_path``), the largest single gaps
    with the kernels on either side, and the host's device syncs by the ops that made them. A gap
    after a sync, or where the host launches slower than the device runs, shows here, charged to
    whoever launched the kernel that ended it."""
    cpu, syncs = {}, {}
    for e in events:
        if e.device_type.name == "CPU":
            cpu.setdefault(e.id, e)
            if e.name.startswith("cu") and e.name.endswith("Synchronize"):
                key = _launch_path(e)
                syncs[key] = syncs.get(key, 0) + 1
    host_syncs = [{"path": p, "count": c} for p, c in sorted(syncs.items(), key=lambda kv: -kv[1])]
    dev = sorted(kernels)
    if not dev:
        return {
            "total_ms": 0.0,
            "gaps": 0,
            "min_gap_us": min_us,
            "by_launch_path": [],
            "largest": [],
            "host_syncs": host_syncs,
        }
    end, prev = dev[0][1], dev[0][2]
    total, n, by_path, largest = 0.0, 0, {}, []
    for start, stop, name, corr in dev[1:]:
        gap = start - end
        if gap >= min_us:
            path = _launch_path(cpu.get(corr))
            total += gap
            n += 1
            acc = by_path.setdefault(path, [0.0, 0])
            acc[0] += gap
            acc[1] += 1
            largest.append((gap, prev[:120], name[:120], path))
        if stop > end:
            end, prev = stop, name
    largest.sort(key=lambda g: -g[0])
    return {
        "total_ms": total / 1e3,
        "gaps": n,
        "min_gap_us": min_us,
        "by_launch_path": [
            {"path": p, "ms": v[0] / 1e3, "gaps": v[1]}
            for p, v in sorted(by_path.items(), key=lambda kv: -kv[1][0])[:top]
        ],
        "largest": [{"us": g, "after": a, "before": b, "launch_path": p} for g, a, b, p in largest[:top]],
        "host_syncs": host_syncs,
    }


def bench_rotating(
    make_fn: Callable[[int], Callable[[], object]], copies: int, warmup: int = 3, rep: int = 20
) -> float:
    """Like bench, cycling through ``copies`` input sets so repeated runs don't hit L2."""
    fns = [make_fn(i) for i in range(copies)]
    state = {"i": 0}

    def step():
        state["i"] = (state["i"] + 1) % copies
        return fns[state["i"]]()

    return bench(step, warmup=warmup, rep=rep)


def per_call_us(fn: Callable[[], object], calls: int = 300, warmup: int = 20) -> float:
    """Mean microseconds per call of ``calls`` calls queued back to back after ``warmup`` (the device
    drained before and after): the host's time per call where the device work is small."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / calls * 1e6


def bench_graph(fns: Sequence[Callable[[], object]], calls: int = 24, rep: int = 10) -> float:
    """Median milliseconds per call with launch overhead removed: ``calls`` calls cycling through
    ``fns`` (e.g. one per input copy, so L2 doesn't serve repeats) captured in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fns[i % len(fns)]()
    return bench(graph.replay, warmup=2, rep=rep) / calls


class GcPauses:
    """Python's garbage-collector pauses while active (``gc.callbacks``): ``take()`` returns the
    (generation, ms) of each collection since the last call. Generation 2 is the full collection."""

    def __init__(self) -> None:
        self._pauses: list[tuple[int, float]] = []
        self._start: float | None = None

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self._pauses.append((info["generation"], (time.perf_counter() - self._start) * 1e3))
            self._start = None

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)

    def take(self) -> list[tuple[int, float]]:
        out, self._pauses = self._pauses, []
        return out


def peak_extra_gib(fn: Callable[[], object]) -> float:
    """Peak memory allocated by ``fn`` above what was allocated before it, in GiB."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def copy_rate_tbps(nbytes: int = 2 << 30) -> float:
    """HBM device-to-device copy rate, counting bytes read plus bytes written (TB/s)."""
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a), rep=20)
    return 2 * nbytes / ms / 1e9


def sustained_clocks(
    cases: Sequence[tuple[str, Callable[[], object], float]], seconds: float = 3.0
) -> list[dict]:
    """Each ``(name, fn, flops)`` run back to back for ``seconds`` (a sync every 4 calls) while
    nvidia-smi samples the SM clock and board power every 20 ms: the median call time, the mean
    clock and power over the window (its first 0.5 s left out) and, with ``flops``, TFLOP/s and
    FLOP per clock per SM. Under the board's power cap a GEMM's clock, and so its time, depends
    on how much energy each FLOP takes, which depends on the operands' values."""
    import subprocess
    import tempfile
    import time

    query = "timestamp,clocks.sm,power.draw,clocks_throttle_reasons.active"
    log = tempfile.NamedTemporaryFile("w+", suffix=".csv", delete=False)
    try:
        smi = subprocess.Popen(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits", "-lms", "20"],
            stdout=log,
            stderr=subprocess.DEVNULL,
        )
    except OSError as e:
        log.close()
        os.unlink(log.name)
        return [{"case": name, "error": f"nvidia-smi: {e}"} for name, _, _ in cases]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    windows = []
    try:
        time.sleep(0.5)
        for name, fn, flops in cases:
            fn()
            torch.cuda.synchronize()
            times, t0 = [], time.time()
            while time.time() - t0 < seconds:
                a = torch.cuda.Event(enable_timing=True)
                b = torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(4):
                    fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 4)
            windows.append((name, t0 + 0.5, time.time(), statistics.median(times), flops))
            time.sleep(1.0)  # the next case starts from a cooler board
    finally:
        smi.terminate()
        smi.wait()
        log.close()
    samples = []
    with open(log.name) as f:
        for line in f:
            parts = [p.strip() for p in line.split(",")]
            try:
                day, frac = parts[0].split(".")
                ts = time.mktime(time.strptime(day, "%Y/%m/%d %H:%M:%S")) + float("0." + frac)
                samples.append((ts, float(parts[1]), float(parts[2]), parts[3]))
            except (ValueError, IndexError):
                continue
    os.unlink(log.name)
    rows = []
    for name, t0, t1, ms, flops in windows:
        sel = [s for s in samples if t0 <= s[0] <= t1]
        row: dict = {"case": name, "ms": ms, "samples": len(sel)}
        if sel:
            row["sm_clock_MHz"] = statistics.mean(s[1] for s in sel)
            row["power_W"] = statistics.mean(s[2] for s in sel)
            row["throttle_reasons"] = sorted({s[3] for s in sel})
        if flops:
            row["TFLOPs"] = flops / ms / 1e9
            if sel:
                row["flop_per_clock_per_sm"] = flops / (ms * 1e-3) / (row["sm_clock_MHz"] * 1e6) / sms
        rows.append(row)
    return rows


def require_cuda(script: str) -> None:
    """Exit with a message where torch sees no CUDA device: the benchmark times CUDA code."""
    if not torch.cuda.is_available():
        raise SystemExit(
            f"{os.path.basename(script)} needs a CUDA device (an H100 / H200 for the kernels): "
            f"torch {torch.__version__} sees none"
        )


def _version(mod: str) -> str | None:
    try:
        m = __import__(mod)
    except Exception as e:  # record why an anchor library is missing
        return f"unavailable: {type(e).__name__}"
    version = getattr(m, "__version__", None)
    if version is None:  # (liger_kernel has no __version__: its installed distribution's)
        try:
            from importlib.metadata import version as dist_version

            version = dist_version(mod)
        except Exception:
            version = "?"
    return version


def _kernels() -> str:
    """Which code hoptune's ops ran: without the extension, on another GPU or with
    HOPTUNE_DISABLE_KERNELS set they run the PyTorch reference under the same names."""
    from hoptune import _lib

    reason = _lib.unavailable_reason()
    return "hoptune._C (sm_90 kernels)" if reason is None else f"PyTorch reference: {reason}"


def int_list(p: argparse.ArgumentParser, flag: str, text: str, auto: object = ...) -> list:
    """``text``'s comma-separated integers (``auto`` read as ``auto`` where given), or a usage error
    naming ``flag``."""
    values = []
    for v in text.split(","):
        if v == "auto" and auto is not ...:
            values.append(auto)
            continue
        try:
            values.append(int(v))
        except ValueError:
            kind = "integers or auto" if auto is not ... else "integers"
            p.error(f"{flag}: expected comma-separated {kind}, got {v!r} in {text!r}")
    return values


def shape_list(p: argparse.ArgumentParser, flag: str, text: str) -> list[tuple[int, int]]:
    """``text``'s comma-separated KxN pairs of positive integers, or a usage error naming ``flag``."""
    shapes = []
    for s in text.split(","):
        kn = s.split("x")
        if len(kn) != 2 or not all(v.isdigit() and int(v) > 0 for v in kn):
            p.error(f"{flag}: expected comma-separated KxN pairs such as 4096x14336, got {s!r}")
        shapes.append((int(kn[0]), int(kn[1])))
    return shapes


def _run(argv: Sequence[str]) -> str:
    """stdout of ``argv``; CalledProcessError where it exits non-zero."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout


def _hoptune_commit() -> str:
    """The commit of the git checkout hoptune was imported from, ``-dirty`` appended where tracked
    files differ from it (every revision has the same __version__), or why there is none.
    ``$HOPTUNE_COMMIT`` wins: a copied tree may carry no .git, or a stale one."""
    if os.environ.get("HOPTUNE_COMMIT"):
        return os.environ["HOPTUNE_COMMIT"]
    import hoptune

    pkg = os.path.dirname(os.path.abspath(hoptune.__file__))
    git = ["git", "-C", pkg]
    try:
        tracked = subprocess.run(
            [*git, "ls-files", "--error-unmatch", "__init__.py"], capture_output=True, timeout=60
        )
        if tracked.returncode:
            return f"unavailable: {pkg}/__init__.py is not a tracked file of a git checkout"
        sha = _run([*git, "rev-parse", "HEAD"]).strip()
        dirty = _run([*git, "status", "--porcelain", "--untracked-files=no"]).strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable: git: {type(e).__name__}"
    return sha + "-dirty" if dirty else sha


_PROC_DRIVER = "/proc/driver/nvidia/version"


def _driver() -> str:
    """The NVIDIA driver's version: nvidia-smi's, else the kernel module's (``_PROC_DRIVER``)."""
    try:
        out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        return out.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError) as e:
        smi = f"nvidia-smi: {type(e).__name__}"
    try:
        with open(_PROC_DRIVER) as f:
            line = f.readline()
    except OSError as e:
        return f"unavailable: {smi}; {_PROC_DRIVER}: {type(e).__name__}"
    # "NVRM version: NVIDIA UNIX ... Kernel Module ...  570.124.06  Release Build ..."
    found = re.search(r"\b\d+\.\d+(?:\.\d+)*\b", line)
    return found.group(0) if found else f"unavailable: {smi}; no version in {_PROC_DRIVER}"


def env_info() -> dict:
    props = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    return {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        # settings read from the environment change what is timed (HOPTUNE_GEMM_TUNING=0, ...)
        "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith("HOPTUNE_")},
        "kernels": _kernels(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name() if props else None,
        "sm_count": props.multi_processor_count if props else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "driver": _driver() if props else None,
        "python": platform.python_version(),
        "hoptune": _version("hoptune"),
        "hoptune_commit": _hoptune_commit(),
        "bitsandbytes": _version("bitsandbytes"),
        "peft": _version("peft"),
        "transformers": _version("transformers"),
        "liger_kernel": _version("liger_kernel"),
    }


def write_json(path: str, data: dict) -> None:
    """``data`` as JSON at ``path``, written beside it and then renamed over it: benchmarks write
    after each section, and a write that fails (a value JSON cannot hold, an interrupt) leaves the
    sections written before, not a truncated file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.chmod(tmp, 0o666 & ~_UMASK)  # (mkstemp makes it 0600; open() would give 0644 under umask 022)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    print(f"wrote {path}")


def table(rows: Sequence[dict], cols: Sequence[str]) -> str:
    """A plain-text table of ``rows`` restricted to ``cols`` (floats with 3 decimals)."""

    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    for r in rows:
        lines.append("  ".join(fmt(r.get(c, "")).rjust(w) for c, w in zip(cols, widths)))
    return "\n".join(lines)
