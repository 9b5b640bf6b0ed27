"""Per-token log-probs, forward + backward to the hidden states, B=8 x T=2048, H=4096, at
V=128256 (Llama-3) and V=151936 (Qwen): ours (fused lm_head -> log-prob), naive PyTorch, TRL's
selective_log_softmax (row loop), Liger's fused linear cross-entropy and the bare lm_head
matmuls (the floor), all in one run; plus the logits-input kernel against the copy rate, with
every numbered version of its backward kernel. Off by default: --breakdown (CUDA time per kernel
of one fused step, from torch.profiler), --chunk-sweep (the fused step at chunk_rows 256..1024)
--vchunk-sweep (the fused step at several vocabulary-chunk widths and row-block sizes of the
vocab-chunked forward, and with the row-chunked forward, against the bare matmuls) and
--gemm-sweep (the fused-GEMM walk, the bf16 default, per chunk width and row-block size, at both
vocabulary sizes) and --power (sustained runs of the floor, ours and the floor's input-gradient
GEMM with nvidia-smi sampling the SM clock and board power).

The floor is measured twice: as the anchor measures it (the upstream gradient of the logits is
torch.ones_like) and given a fixed random upstream gradient. Under the H200's power cap the GEMM
on an all-ones operand draws less power and runs at a higher clock than on real-valued data.

    python bench/bench_logprob.py --out bench/results/logprob.json [--breakdown] [--chunk-sweep]
        [--vchunk-sweep [--vchunk-settings 4096:0,8192:0,16384:0,8192:2048,8192:1024,16384:4096]]
        [--gemm-sweep [--gemm-settings 32768:2048,32768:4096,65536:2048]] [--power]
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (
    bench,
    bench_graph,
    bench_queued,
    copy_rate_tbps,
    env_info,
    int_list,
    peak_extra_gib,
    ratio_interleaved,
    require_cuda,
    sustained_clocks,
    table,
    write_json,
)
from hoptune.ops import fused_linear_logprobs, token_logprobs
from hoptune.ops import logprob as logprob_ops

B, T, H = 8, 2048, 4096


def selective_log_softmax(logits, index):
    """TRL's memory-saving form for bf16 logits: one batch row at a time."""
    out = []
    for row_logits, row_labels in zip(logits, index):
        lp = F.log_softmax(row_logits, dim=-1)
        out.append(lp.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1))
    return torch.stack(out)


def step(h, g, fn):
    h.grad = None
    fn().backward(g)


def lm_head_floor(h, W, grad=None):
    """The floor: the bare lm_head matmuls, h @ W^T and its backward to h (h.grad cleared first),
    given ``grad`` as the logits' upstream gradient, or ones as the anchor measures it."""
    h.grad = None
    logits = h @ W.t()
    logits.backward(torch.ones_like(logits) if grad is None else grad)


def inputs(v: int, shape: tuple[int, ...] = (B, T)):
    """Seeded bf16 hidden states `shape + (H,)` requiring grad, a frozen lm_head (v, H), labels
    and an fp32 upstream gradient: the inputs every measurement here uses."""
    torch.manual_seed(0)
    h = torch.randn(*shape, H, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    W = torch.randn(v, H, device="cuda", dtype=torch.bfloat16) * 0.02
    labels = torch.randint(0, v, shape, device="cuda")
    g = torch.randn(*shape, device="cuda", dtype=torch.float32)
    return h, W, labels, g


def run_vocab(v: int, chunk_variants: list[int]) -> dict:
    h, W, labels, g = inputs(v)
    r: dict = {"B": B, "T": T, "H": H, "V": v}

    def timed(name, fn, rep=5):
        r[name + "_ms"] = bench(fn, warmup=2, rep=rep)
        r[name + "_peak_GiB"] = peak_extra_gib(fn)
        print(name, round(r[name + "_ms"], 2), "ms", round(r[name + "_peak_GiB"], 3), "GiB", flush=True)

    floor = partial(lm_head_floor, h, W)
    timed("lm_head_floor", floor)
    # the same two matmuls given a random upstream gradient instead of ones (made once, outside the
    # timing, so this floor also skips the fill): the board's power cap lets the all-ones GEMM run
    # at a higher clock (see --power), a gradient with real values does not
    grad = torch.randn((*h.shape[:-1], v), device="cuda", dtype=torch.bfloat16)
    floor_randg = partial(lm_head_floor, h, W, grad)

    r["lm_head_floor_randg_ms"] = bench(floor_randg, warmup=2, rep=5)
    print("lm_head_floor_randg", round(r["lm_head_floor_randg_ms"], 2), "ms", flush=True)
    for c in chunk_variants:
        key = "ours" if c == 0 else f"ours_chunk{c}"
        timed(key, partial(step, h, g, lambda c=c: fused_linear_logprobs(h, W, labels, chunk_rows=c)))
    # the vocab-chunked path without the fused GEMM (cuBLAS fp32 logits + the vocab-chunk kernel)
    logprob_ops.GEMM = False
    timed("ours_vchunk", partial(step, h, g, lambda: fused_linear_logprobs(h, W, labels)))
    r["ours_vchunk_over_floor_interleaved"] = ratio_interleaved(
        partial(step, h, g, lambda: fused_linear_logprobs(h, W, labels)), floor, rounds=3, rep=3
    )
    logprob_ops.GEMM = True
    # the target's ratio, ours and the floor measured back to back in rounds (clock drift)
    r["ours_over_floor_interleaved"] = ratio_interleaved(
        partial(step, h, g, lambda: fused_linear_logprobs(h, W, labels)), floor, rounds=5, rep=3
    )
    r["ours_over_floor_randg_interleaved"] = ratio_interleaved(
        partial(step, h, g, lambda: fused_linear_logprobs(h, W, labels)), floor_randg, rounds=5, rep=3
    )
    timed(
        "naive",
        partial(
            step,
            h,
            g,
            lambda: torch.log_softmax((h @ W.t()).float(), -1).gather(-1, labels[..., None])[..., 0],
        ),
    )
    timed("trl_selective", partial(step, h, g, lambda: selective_log_softmax(h @ W.t(), labels).float()))
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        lce = LigerFusedLinearCrossEntropyLoss(reduction="none")
        timed("liger_flce", partial(step, h, g, lambda: -lce(W, h.view(-1, H), labels.view(-1)).view(B, T)))
    except Exception as e:
        r["liger_error"] = repr(e)[:300]
    r["ours_over_floor"] = r["ours_ms"] / r["lm_head_floor_ms"]
    r["ours_over_floor_randg"] = r["ours_ms"] / r["lm_head_floor_randg_ms"]
    r["ours_vchunk_over_floor"] = r["ours_vchunk_ms"] / r["lm_head_floor_ms"]
    for k in list(r):
        if k.startswith("ours_chunk") and k.endswith("_ms"):
            r[k.replace("_ms", "_over_floor")] = r[k] / r["lm_head_floor_ms"]

    # logits-input kernel: forward reads the logits once; backward reads and writes them
    with torch.no_grad():
        logits = h.detach() @ W.t()
    nbytes = logits.numel() * logits.element_size()
    r["tl_fwd_ms"] = bench(lambda: token_logprobs(logits, labels, check_labels=False), rep=10)
    r["tl_fwd_read_TBps"] = nbytes / r["tl_fwd_ms"] / 1e9
    lg = logits.clone().requires_grad_(True)
    lp = token_logprobs(lg, labels)

    def bwd():
        torch.autograd.grad(lp, lg, g, retain_graph=True)

    r["tl_bwd_ms"] = bench(bwd, rep=10)
    r["tl_bwd_over_fwd"] = r["tl_bwd_ms"] / r["tl_fwd_ms"]
    # the same through autograd with 10 calls back to back (the host's per-call work, about
    # 0.1-0.3 ms, overlaps the device's as in a training step instead of preceding each call)
    r["tl_fwd_queued_ms"] = bench_queued(lambda: token_logprobs(logits, labels, check_labels=False), rep=5)
    r["tl_bwd_queued_ms"] = bench_queued(bwd, rep=5)
    r["tl_bwd_over_fwd_queued"] = r["tl_bwd_queued_ms"] / r["tl_fwd_queued_ms"]

    # the kernels alone, in CUDA graphs (no launch, allocation or autograd work): the forward,
    # then every backward version on the same logits into one preallocated dlogits
    r["tl_fwd_graph_ms"] = bench_graph([lambda: token_logprobs(logits, labels, check_labels=False)], calls=10)
    # every forward version in CUDA graphs, alternating in rounds (the forward's time drifts
    # between runs more than the versions differ): per version the median, and each version's
    # median ratio to version 0 over the rounds
    fwd = {k: [] for k in logprob_ops._FWD_VARIANTS}
    for _ in range(5):
        for k in logprob_ops._FWD_VARIANTS:
            logprob_ops._FWD_VARIANT = k
            fwd[k].append(bench_graph([lambda: token_logprobs(logits, labels, check_labels=False)], calls=10))
    logprob_ops._FWD_VARIANT = 0
    for k, times in fwd.items():
        r[f"fwd_v{k}_ms"] = sorted(times)[len(times) // 2]
        r[f"fwd_v{k}_read_TBps"] = nbytes / r[f"fwd_v{k}_ms"] / 1e9
        ratios = sorted(t / t0 for t, t0 in zip(times, fwd[0]))
        r[f"fwd_v{k}_over_v0"] = ratios[len(ratios) // 2]
    with torch.no_grad():
        _, ent, lse = torch.ops.hoptune.token_logprobs(logits, labels, 1.0, -100, False)
    dlogits = torch.empty_like(logits)

    def bwd_kernel():
        logprob_ops._bwd_impl(logits, labels, lse, ent, g, None, 1.0, -100, dlogits)

    for k in logprob_ops._BWD_VARIANTS:
        logprob_ops._BWD_VARIANT = k
        ms = bench_graph([bwd_kernel], calls=10)
        r[f"bwd_v{k}_ms"] = ms
        r[f"bwd_v{k}_over_fwd"] = ms / r["tl_fwd_graph_ms"]
        r[f"bwd_v{k}_TBps"] = 2 * nbytes / ms / 1e9  # bytes read plus bytes written
    logprob_ops._BWD_VARIANT = 0
    return r


def fused_breakdown(v: int = 128256) -> list[dict]:
    """One forward + backward of fused_linear_logprobs (bf16, B*T x H hidden requiring grad, a
    frozen lm_head) under the profiler: CUDA time per kernel name, largest first."""
    h, W, labels, g = inputs(v, (B * T,))
    fn = partial(step, h, g, lambda: fused_linear_logprobs(h, W, labels))
    fn()  # warm-up: cuBLAS heuristics, allocator
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    totals: dict[str, list] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            t = totals.setdefault(e.name, [0, 0.0])
            t[0] += 1
            t[1] += e.time_range.elapsed_us() / 1e3
    rows = [{"kernel": k, "count": c, "total_ms": ms} for k, (c, ms) in totals.items()]
    return sorted(rows, key=lambda x: -x["total_ms"])


def power_clocks(v: int = 128256, seconds: float = 3.0) -> list[dict]:
    """Sustained runs (``seconds`` each) with the SM clock and board power sampled: the floor as
    the anchor defines it (upstream gradient of ones), the floor given a random upstream gradient,
    ours, and the floor's input-gradient GEMM alone with either gradient."""
    h, W, labels, g = inputs(v)
    ones = torch.ones((*h.shape[:-1], v), device="cuda", dtype=torch.bfloat16)
    grad = torch.randn_like(ones)
    dh = torch.empty_like(h)
    flops = 2 * h.numel() * v

    cases = [
        ("lm_head_floor", partial(lm_head_floor, h, W), 2 * flops),
        ("lm_head_floor_randg", partial(lm_head_floor, h, W, grad), 2 * flops),
        ("ours", partial(step, h, g, lambda: fused_linear_logprobs(h, W, labels)), 2 * flops),
        ("input_grad_gemm_ones", lambda: torch.matmul(ones, W, out=dh), flops),
        ("input_grad_gemm_random", lambda: torch.matmul(grad, W, out=dh), flops),
    ]
    rows = sustained_clocks(cases, seconds)
    for row in rows:
        row["V"] = v
    return rows


def host_marks(v: int = 128256, steps: int = 6) -> list[dict]:
    """Where the host spends one fused forward + backward, without the profiler: perf_counter marks
    (us from the step's start) at the label check, the first GEMM's launch, the end of the wait
    for the overflow flag and the backward's launch. The device idles until the first GEMM is
    queued, and after the last GEMM until the backward is, when the host is slower than the
    work queued behind the flag (the last G @ W)."""
    import time

    h, W, labels, g = inputs(v)
    marks: list[tuple[str, float]] = []

    def wrap(obj, name):
        orig = getattr(obj, name)

        def f(*a, **k):
            marks.append((name + ">", time.perf_counter()))
            out = orig(*a, **k)
            marks.append((name + "<", time.perf_counter()))
            return out

        setattr(obj, name, f)
        return orig

    names = ("_label_stats", "_gemm_chunk", "_scale_rows")
    saved = {n: wrap(logprob_ops, n) for n in names}
    saved_item = wrap(logprob_ops._HostFlag, "item")
    rows = []
    try:
        for i in range(steps):
            marks.clear()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(h, g, lambda: fused_linear_logprobs(h, W, labels))
            torch.cuda.synchronize()
            first = {}
            for k, t in marks:
                first.setdefault(k, (t - t0) * 1e6)
            flag_end = [(t - t0) * 1e6 for k, t in marks if k == "item<"][-1]
            rows.append(
                {
                    "step": i,
                    "label_stats_start_us": first["_label_stats>"],
                    "label_stats_us": first["_label_stats<"] - first["_label_stats>"],
                    "first_gemm_launch_us": first["_gemm_chunk>"],
                    "flag_to_backward_us": first["_scale_rows>"] - flag_end,
                }
            )
    finally:
        for n, f in saved.items():
            setattr(logprob_ops, n, f)
        logprob_ops._HostFlag.item = saved_item
    return rows[1:]  # the first step warms up


def chunk_sweep(v: int = 128256, chunks=(256, 512, 768, 1024)) -> list[dict]:
    """fused_linear_logprobs forward + backward (as in run_vocab) for each chunk_rows."""
    h, W, labels, g = inputs(v)
    out = []
    for c in chunks:
        fn = partial(step, h, g, lambda c=c: fused_linear_logprobs(h, W, labels, chunk_rows=c))
        row = {"V": v, "chunk_rows": c, "ms": bench(fn, warmup=2, rep=5), "peak_GiB": peak_extra_gib(fn)}
        print("chunk_rows", c, round(row["ms"], 2), "ms", round(row["peak_GiB"], 3), "GiB", flush=True)
        out.append(row)
    return out


def vchunk_sweep(v: int = 128256, settings=((4096, 0), (8192, 0), (16384, 0))) -> list[dict]:
    """fused_linear_logprobs forward + backward (as in run_vocab) for each (VCHUNK_COLS,
    VCHUNK_ROWS) of the vocab-chunked forward (rows 0: from CHUNK_BYTES), then the row-chunked
    forward (VCHUNK off): time, its ratio to the bare lm_head matmuls timed in the same run
    (plain and interleaved) and the peak extra memory."""
    h, W, labels, g = inputs(v)

    floor = partial(lm_head_floor, h, W)
    floor_ms = bench(floor, warmup=2, rep=5)
    print("lm_head_floor", round(floor_ms, 2), "ms", flush=True)
    fn = partial(step, h, g, lambda: fused_linear_logprobs(h, W, labels))
    saved = (logprob_ops.VCHUNK, logprob_ops.VCHUNK_COLS, logprob_ops.VCHUNK_ROWS)
    out = []
    try:
        for cols, rows in [*settings, (0, 0)]:
            logprob_ops.VCHUNK = cols > 0
            if cols > 0:
                logprob_ops.VCHUNK_COLS, logprob_ops.VCHUNK_ROWS = cols, rows
            ms = bench(fn, warmup=2, rep=5)
            row = {
                "V": v,
                "path": "vchunk" if cols > 0 else "rows",
                "vchunk_cols": cols if cols > 0 else None,
                "vchunk_rows": logprob_ops._vchunk_rows(0) if cols > 0 else None,
                "ms": ms,
                "floor_ms": floor_ms,
                "over_floor": ms / floor_ms,
                "over_floor_interleaved": ratio_interleaved(fn, floor, rounds=3, rep=3),
                "peak_GiB": peak_extra_gib(fn),
            }
            print(
                row["path"],
                row["vchunk_cols"],
                row["vchunk_rows"],
                round(ms, 2),
                "ms",
                round(row["over_floor_interleaved"], 3),
                "x",
                round(row["peak_GiB"], 3),
                "GiB",
                flush=True,
            )
            out.append(row)
    finally:
        logprob_ops.VCHUNK, logprob_ops.VCHUNK_COLS, logprob_ops.VCHUNK_ROWS = saved
    return out


def gemm_sweep(settings=((32768, 2048), (32768, 4096), (65536, 2048))) -> list[dict]:
    """The fused-GEMM walk (the bf16 default) per (GEMM_COLS, GEMM_ROWS) at both vocabulary
    sizes: forward + backward time, its ratio to the bare lm_head matmuls timed in the same run
    (plain and interleaved), the peak extra memory and the chunk width actually used."""
    out = []
    saved = (logprob_ops.GEMM_COLS, logprob_ops.GEMM_ROWS)
    for v in (128256, 151936):
        h, W, labels, g = inputs(v)

        floor = partial(lm_head_floor, h, W)
        floor_ms = bench(floor, warmup=2, rep=5)
        fn = partial(step, h, g, lambda: fused_linear_logprobs(h, W, labels))
        try:
            for cols, rows in settings:
                logprob_ops.GEMM_COLS, logprob_ops.GEMM_ROWS = cols, rows
                ms = bench(fn, warmup=2, rep=5)
                tile = logprob_ops._gemm_tile(True)
                row = {
                    "V": v,
                    "gemm_cols": cols,
                    "gemm_rows": rows,
                    "cols_used": logprob_ops._gemm_cols(rows, tile, h.device),
                    "ms": ms,
                    "floor_ms": floor_ms,
                    "over_floor": ms / floor_ms,
                    "over_floor_interleaved": ratio_interleaved(fn, floor, rounds=5, rep=3),
                    "peak_GiB": peak_extra_gib(fn),
                }
                print(
                    *(f"{k}={round(x, 3) if isinstance(x, float) else x}" for k, x in row.items()), flush=True
                )
                out.append(row)
        finally:
            logprob_ops.GEMM_COLS, logprob_ops.GEMM_ROWS = saved
    return out


def _pairs(ap: argparse.ArgumentParser, flag: str, text: str) -> list[tuple[int, int]]:
    """``text``'s comma-separated COLS:ROWS integer pairs, or a usage error naming ``flag``."""
    out = []
    for item in text.split(","):
        parts = item.split(":")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            ap.error(f"{flag}: expected COLS:ROWS integer pairs such as 32768:2048, got {item!r}")
        out.append((int(parts[0]), int(parts[1])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/logprob.json")
    ap.add_argument("--chunks", default="0,256,384,512", help="chunk_rows variants of ours (0 = auto)")
    ap.add_argument("--breakdown", action="store_true", help="per-kernel CUDA time of one fused step")
    ap.add_argument("--chunk-sweep", action="store_true", help="fused step for chunk_rows 256..1024")
    ap.add_argument(
        "--host-marks", action="store_true", help="host time at the fused step's two syncs (no profiler)"
    )
    ap.add_argument(
        "--power", action="store_true", help="SM clock and board power in sustained runs (nvidia-smi)"
    )
    ap.add_argument(
        "--vchunk-sweep", action="store_true", help="fused step per vocabulary-chunk width / row-block size"
    )
    ap.add_argument(
        "--gemm-sweep", action="store_true", help="fused-GEMM step per GEMM_COLS / GEMM_ROWS setting"
    )
    ap.add_argument(
        "--gemm-settings",
        default="32768:2048,32768:4096,65536:2048",
        help="GEMM_COLS:GEMM_ROWS pairs for --gemm-sweep",
    )
    ap.add_argument(
        "--vchunk-settings",
        default="4096:0,8192:0,16384:0,8192:2048,8192:1024,16384:4096",
        help="VCHUNK_COLS:VCHUNK_ROWS pairs for --vchunk-sweep (rows 0: from CHUNK_BYTES)",
    )
    args = ap.parse_args()
    # every list read before any timing: the sweeps that use them start after minutes of it
    chunks = int_list(ap, "--chunks", args.chunks)
    if 0 not in chunks:
        ap.error("--chunks: must include 0 (auto, the chunking every ratio to the floor uses)")
    gemm_settings = _pairs(ap, "--gemm-settings", args.gemm_settings)
    vchunk_settings = _pairs(ap, "--vchunk-settings", args.vchunk_settings)
    require_cuda(__file__)
    res = {"env": env_info(), "copy_TBps": copy_rate_tbps(), "rows": []}
    for v in (128256, 151936):
        row = run_vocab(v, chunks)
        row["tl_fwd_frac_copy"] = row["tl_fwd_read_TBps"] / res["copy_TBps"]
        for k in logprob_ops._BWD_VARIANTS:
            row[f"bwd_v{k}_frac_copy"] = row[f"bwd_v{k}_TBps"] / res["copy_TBps"]
        for k in logprob_ops._FWD_VARIANTS:
            row[f"fwd_v{k}_frac_copy"] = row[f"fwd_v{k}_read_TBps"] / res["copy_TBps"]
        res["rows"].append(row)
        torch.cuda.empty_cache()
        write_json(args.out, res)
    print(f"HBM copy rate {res['copy_TBps']:.2f} TB/s")
    cols = [
        "V",
        "lm_head_floor_ms",
        "ours_ms",
        "ours_over_floor",
        "ours_over_floor_interleaved",
        "lm_head_floor_randg_ms",
        "ours_over_floor_randg_interleaved",
        "ours_peak_GiB",
        "ours_vchunk_over_floor_interleaved",
        "naive_ms",
        "trl_selective_ms",
        "liger_flce_ms",
        "liger_flce_peak_GiB",
    ]
    print(table(res["rows"], cols))
    if any(k.startswith("ours_chunk") for k in res["rows"][0]):
        print(table(res["rows"], ["V", *[k for k in res["rows"][0] if k.startswith("ours_chunk")]]))
    print(
        table(
            res["rows"],
            ["V", "tl_fwd_ms", "tl_fwd_frac_copy", "tl_bwd_ms", "tl_bwd_over_fwd", "tl_bwd_over_fwd_queued"],
        )
    )
    # backward versions, kernels alone (CUDA graphs): time, ratio to the forward kernel timed the
    # same way, and bytes moved (read + written) as a fraction of the copy rate
    bwd_rows = [
        {
            "V": row["V"],
            "version": k,
            "bwd_ms": row[f"bwd_v{k}_ms"],
            "fwd_ms": row["tl_fwd_graph_ms"],
            "over_fwd": row[f"bwd_v{k}_over_fwd"],
            "frac_copy": row[f"bwd_v{k}_frac_copy"],
        }
        for row in res["rows"]
        for k in logprob_ops._BWD_VARIANTS
    ]
    print(table(bwd_rows, ["V", "version", "bwd_ms", "fwd_ms", "over_fwd", "frac_copy"]))
    fwd_rows = [
        {
            "V": row["V"],
            "version": k,
            "fwd_ms": row[f"fwd_v{k}_ms"],
            "frac_copy": row[f"fwd_v{k}_frac_copy"],
            "over_v0": row[f"fwd_v{k}_over_v0"],
        }
        for row in res["rows"]
        for k in logprob_ops._FWD_VARIANTS
    ]
    print(table(fwd_rows, ["V", "version", "fwd_ms", "frac_copy", "over_v0"]))
    if args.breakdown:
        res["fused_breakdown"] = fused_breakdown()
        write_json(args.out, res)
        top = [{**k, "kernel": k["kernel"][:100]} for k in res["fused_breakdown"][:15]]
        print(f"fused_linear_logprobs forward + backward, B*T={B * T} H={H} V=128256: top kernels")
        print(table(top, ["total_ms", "count", "kernel"]))
    if args.host_marks:
        res["host_marks"] = host_marks()
        write_json(args.out, res)
        cols = [
            "step",
            "label_stats_start_us",
            "label_stats_us",
            "first_gemm_launch_us",
            "flag_to_backward_us",
        ]
        print(table(res["host_marks"], cols))
    if args.power:
        res["power"] = power_clocks()
        write_json(args.out, res)
        cols = ["case", "ms", "TFLOPs", "sm_clock_MHz", "power_W", "flop_per_clock_per_sm", "samples"]
        print(table(res["power"], cols))
    if args.chunk_sweep:
        res["chunk_sweep"] = chunk_sweep()
        write_json(args.out, res)
        print(table(res["chunk_sweep"], ["V", "chunk_rows", "ms", "peak_GiB"]))
    if args.gemm_sweep:
        res["gemm_sweep"] = gemm_sweep(gemm_settings)
        write_json(args.out, res)
        cols = ["V", "gemm_cols", "gemm_rows", "cols_used", "ms", "over_floor", "over_floor_interleaved"]
        print(table(res["gemm_sweep"], [*cols, "peak_GiB"]))
    if args.vchunk_sweep:
        res["vchunk_sweep"] = vchunk_sweep(settings=vchunk_settings)
        write_json(args.out, res)
        cols = ["V", "path", "vchunk_cols", "vchunk_rows", "ms", "over_floor", "over_floor_interleaved"]
        print(table(res["vchunk_sweep"], [*cols, "peak_GiB"]))


if __name__ == "__main__":
    main()
