"""Probe: can the one-pass LoRA gradient kernel use the SMs that the dX GEMM's last wave leaves
idle? At M = 8192 the GEMM (dY @ W', torch.mm) then the kernel (nf4_lora.grads_kernel): one after
the other on one stream (``serial``), the kernel on a second stream enqueued after the GEMM
(``after``: its clusters can start only as the GEMM's CTAs leave) and enqueued before it
(``before``). Kernel timestamps from torch.profiler, 10 iterations behind a device sleep, three
rounds; per iteration the span from the first kernel's start to the last one's end, and when the
kernel began relative to the GEMM's end (negative: before it ended).

    python bench/probes/gemm_tail.py --out bench/results/gemm_tail_probe.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from harness import env_info, table, write_json
from hoptune.ops import nf4_lora as L

MODES = ("serial", "after", "before")


def run(mode, side, w, x, g, a, b):
    main = torch.cuda.current_stream()
    if mode == "serial":
        torch.mm(g, w)
        L.grads_kernel(x, g, a, b, 0.5)
        return
    ev = torch.cuda.Event()
    ev.record(main)
    side.wait_event(ev)
    if mode == "after":
        torch.mm(g, w)
    with torch.cuda.stream(side):
        L.grads_kernel(x, g, a, b, 0.5)
    if mode == "before":
        torch.mm(g, w)
    main.wait_stream(side)


def kind(name: str) -> str | None:
    if "lora_grads_kernel" in name:
        return "main"
    if "lora_grads_finish" in name:
        return "finish"
    if "emset" in name:
        return None
    if "nvjet" in name or "gemm" in name.lower() or "sm90" in name:
        return "gemm"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="JSON file to write")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    dev, m = "cuda", 8192
    side = torch.cuda.Stream()
    rows = []
    for k in (4096, 2048):
        torch.manual_seed(0)
        w = torch.randn(k, k, device=dev, dtype=torch.bfloat16) * 0.02
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        g = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        a = torch.randn(16, k, device=dev, dtype=torch.bfloat16) * 0.02
        b = torch.randn(k, 16, device=dev, dtype=torch.bfloat16) * 0.02
        assert L._grads_run(x, g, a, b)
        for mode in MODES:
            run(mode, side, w, x, g, a, b)
        torch.cuda.synchronize()
        per_iter = {mode: [] for mode in MODES}
        for rnd in range(args.rounds):
            for mode in MODES:
                for _ in range(3):
                    run(mode, side, w, x, g, a, b)
                torch.cuda.synchronize()
                torch.cuda._sleep(50_000_000)
                with profile(activities=[ProfilerActivity.CUDA]) as p:
                    for _ in range(10):
                        run(mode, side, w, x, g, a, b)
                    torch.cuda.synchronize()
                ev = [e for e in p.events() if e.device_type.name == "CUDA" and "sleep" not in e.name]
                ev.sort(key=lambda e: e.time_range.start)
                kinds = {"gemm": [], "main": [], "finish": []}
                for e in ev:
                    key = kind(e.name)
                    if key:
                        kinds[key].append((e.time_range.start, e.time_range.end))
                if any(len(v) != 10 for v in kinds.values()):
                    print("unexpected kernels", mode, {q: len(v) for q, v in kinds.items()}, flush=True)
                    continue
                spans = [
                    max(kinds[q][i][1] for q in kinds) - min(kinds[q][i][0] for q in kinds) for i in range(10)
                ]
                row = {
                    "K": k,
                    "mode": mode,
                    "round": rnd,
                    "per_iter_us": (ev[-1].time_range.end - ev[0].time_range.start) / 10,
                    "span_med_us": statistics.median(spans),
                    "main_start_minus_gemm_end_us": statistics.median(
                        kinds["main"][i][0] - kinds["gemm"][i][1] for i in range(10)
                    ),
                    "gemm_us": statistics.median(e - s for s, e in kinds["gemm"]),
                    "main_us": statistics.median(e - s for s, e in kinds["main"]),
                }
                per_iter[mode].append(row["per_iter_us"])
                rows.append(row)
        rows.append(
            {"K": k, "median_per_iter_us": {q: statistics.median(v) for q, v in per_iter.items() if v}}
        )
    print(
        table(
            [r for r in rows if "mode" in r],
            ["K", "mode", "round", "per_iter_us", "main_start_minus_gemm_end_us", "gemm_us", "main_us"],
        )
    )
    for r in rows:
        if "median_per_iter_us" in r:
            print(r)
    if args.out:
        write_json(args.out, {"command": " ".join(sys.argv), "env": env_info(), "rows": rows})


if __name__ == "__main__":
    main()
