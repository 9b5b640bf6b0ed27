"""Probe: where the QLoRA forward's time goes at M = 8192 beyond its kernels' durations.

Each sequence runs behind a 3 ms device sleep (the host has queued all of it before the device
reaches it) under torch.profiler, and the kernels' own timestamps give, per sequence: the
duration of each kernel, the idle gap between consecutive kernels, and the CUDA-event time of the
whole sequence ("covered", as in bench_nf4_lora.py). Sequences: the bf16 GEMM alone; a tiny fill
kernel then the GEMM (the cost of one kernel boundary); the merged dequantize (W + s B A) then
the GEMM on its output; the plain dequantize then the GEMM; the bf16 and merged GEMMs through
``hoptune.ops.gemm`` (``*_linear``); the op itself with and without that module's choice; and
the merged dequantize followed by each of cuBLASLt's heuristic candidates for the GEMM (the candidate alone too), the candidates
searched with each workspace limit of ``--workspaces`` (bytes; a candidate then runs with exactly
that workspace, so one that needs none can be seen without cuBLAS' memset).

    python bench/probes/forward_gap.py --out bench/results/forward_gap_probe.json
    python bench/probes/forward_gap.py --workspaces 0,33554432 --shapes 4096x4096 --out F
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from harness import env_info, is_device_sleep, table, write_json
from hoptune import _lib
from hoptune.ops import gemm as gemm_ops
from hoptune.ops import nf4 as nf4_ops
from hoptune.ops import nf4_lora_linear
from hoptune.quant import quantize_nf4

M, R = 8192, 16
SHAPES = [(4096, 4096), (8192, 8192)]  # (K, N)
LEAD_CYCLES = int(3.0 * 2e6)


def untuned(fn):
    previous = gemm_ops.enable(False)
    try:
        return fn()
    finally:
        gemm_ops.enable(previous)


def timeline(fn, reps: int) -> dict:
    """Median event time of fn behind a sleep, and per-position kernel durations and gaps (µs)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            a = torch.cuda.Event(enable_timing=True)
            b = torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(LEAD_CYCLES)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3)
    kernels = sorted(
        (e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start
    )
    groups: list[list] = []
    for e in kernels:
        if is_device_sleep(e.name):
            groups.append([])
        elif groups:
            groups[-1].append(e)
    groups = [g for g in groups if g]
    n = min(len(g) for g in groups)
    dur = [statistics.median(g[i].time_range.elapsed_us() for g in groups) for i in range(n)]
    gaps = [
        statistics.median(g[i + 1].time_range.start - g[i].time_range.end for g in groups)
        for i in range(n - 1)
    ]
    span = statistics.median(g[n - 1].time_range.end - g[0].time_range.start for g in groups)
    return {
        "covered_us": statistics.median(times),
        "kernels": [k.name[:60] for k in groups[0][:n]],
        "dur_us": dur,
        "gap_us": gaps,
        "span_us": span,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/forward_gap_probe.json")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--workspaces", default=str(gemm_ops.TORCH_WORKSPACE_BYTES))
    ap.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="KxN,...")
    ap.add_argument("--max-candidates", type=int, default=gemm_ops.MAX_CANDIDATES)
    args = ap.parse_args()
    workspaces = [int(v) for v in args.workspaces.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    torch.manual_seed(0)
    rows = []
    for k, n in shapes:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        q = quantize_nf4(w)
        x = torch.randn(M, k, device="cuda", dtype=torch.bfloat16)
        a = torch.randn(R, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        b = torch.randn(n, R, device="cuda", dtype=torch.bfloat16) * 0.01
        scale = 2.0
        y = torch.empty(M, n, device="cuda", dtype=torch.bfloat16)
        tiny = torch.empty(256, device="cuda")
        stream = _lib.stream(x)
        args_q = (q.packed, q.absmax, q.absmax2, q.code2, q.offset, q.blocksize, q.blocksize2, [n, k])

        w_merged = nf4_ops.dequantize_lora_kernel(*args_q, a, b, scale)

        seqs = {
            "bf16": lambda: torch.mm(x, w.t(), out=y),
            "fill_mm": lambda: (tiny.fill_(1.0), torch.mm(x, w.t(), out=y)),
            "merged_mm": lambda: torch.mm(x, nf4_ops.dequantize_lora_kernel(*args_q, a, b, scale).t(), out=y),
            "plain_mm": lambda: torch.mm(x, nf4_ops.dequantize_impl(*args_q, torch.bfloat16).t(), out=y),
            # through hoptune.ops.gemm's choice, as the op runs its GEMM; then the op itself
            "bf16_linear": lambda: gemm_ops.linear(x, w),
            "merged_linear": lambda: gemm_ops.linear(x, nf4_ops.dequantize_lora_kernel(*args_q, a, b, scale)),
            "op": lambda: nf4_lora_linear(x, q, a, b, scale),
            "op_untuned": lambda: untuned(lambda: nf4_lora_linear(x, q, a, b, scale)),
        }
        ext, why = gemm_ops.cublaslt_extension()
        assert ext is not None, why
        ref = torch.mm(x, w_merged.t())
        descs = {}
        ws = torch.empty(max([*workspaces, 256]), dtype=torch.uint8, device="cuda")
        for wsb in workspaces:
            plan = ext.CublasLtPlan(ext.cublaslt_handle(), True, False, n, M, k, _lib.DTYPE_CODES[x.dtype])
            count = plan.search(args.max_candidates, wsb)
            tag = "" if wsb == gemm_ops.TORCH_WORKSPACE_BYTES else f"ws{wsb}_"
            for i in range(count):
                try:
                    y.fill_(float("nan"))
                    plan.run(
                        i, w_merged.data_ptr(), x.data_ptr(), y.data_ptr(), 0.0, ws.data_ptr(), wsb, stream
                    )
                    torch.cuda.synchronize()
                except RuntimeError:
                    continue
                err = ((y.float() - ref.float()).abs().max() / ref.abs().max().float()).item()
                if not err < 1e-2:
                    continue
                descs[f"{tag}{i}"] = [str(v) for v in plan.describe(i)]

                def cand(i=i, src=None, plan=plan, wsb=wsb):
                    wsrc = src() if src is not None else w_merged
                    plan.run(i, wsrc.data_ptr(), x.data_ptr(), y.data_ptr(), 0.0, ws.data_ptr(), wsb, stream)

                seqs[f"{tag}cand{i}"] = cand
                seqs[f"{tag}merged_cand{i}"] = lambda cand=cand: cand(
                    src=lambda: nf4_ops.dequantize_lora_kernel(*args_q, a, b, scale)
                )
        row = {"K": k, "N": n, "candidates": descs}
        for name, fn in seqs.items():
            row[name] = timeline(fn, args.reps)
            print(k, n, name, row[name], flush=True)
        rows.append(row)
    brief = []
    for row in rows:
        base = row["bf16"]["covered_us"]
        for name, v in row.items():
            if isinstance(v, dict) and "covered_us" in v:
                brief.append(
                    {
                        "K x N": f"{row['K']} x {row['N']}",
                        "seq": name,
                        "covered_us": round(v["covered_us"], 1),
                        "ratio": round(v["covered_us"] / base, 4),
                        "dur_us": "/".join(f"{d:.1f}" for d in v["dur_us"]),
                        "gap_us": "/".join(f"{g:.2f}" for g in v["gap_us"]),
                        "span_us": round(v["span_us"], 1),
                    }
                )
    print(table(brief, list(brief[0])))
    write_json(args.out, {"command": " ".join(sys.argv), "env": env_info(), "rows": rows, "brief": brief})


if __name__ == "__main__":
    main()
