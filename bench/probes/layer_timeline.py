"""Probe: the QLoRA layer step's timeline on the device, against the frozen bf16 layer's.

One training step of each layer (``bench_nf4_lora.py``'s layer section: forward, backward with an
upstream gradient, M = 8192, r = 16) is queued behind a 3 ms device sleep, so the host has launched
all of it before the device reaches it, and torch.profiler's kernel timestamps give, per step: each
kernel's (and memset's) start relative to the step's first kernel, its duration, its stream, and
the span from the first start to the last end (what ``ratio_covered`` measures, less the first
launch's latency). Medians over ``--steps`` steps per round, ``--rounds`` rounds with the two
layers alternated; the span ratio of each round is printed last.

    python bench/probes/layer_timeline.py --out bench/results/layer_timeline_probe.json
    python bench/probes/layer_timeline.py --shapes 4096x4096,2048x2048 --out F
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bench_nf4_lora as B
from harness import env_info, is_device_sleep, require_cuda, shape_list, write_json

LEAD_CYCLES = 6_000_000  # ~3 ms at the boards' clocks: longer than a step's host work


def timeline(fn, steps: int) -> list[list[dict]]:
    """Per step, its device events in start order: name, stream, start (µs from the step's first
    event), duration (µs)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            torch.cuda._sleep(LEAD_CYCLES)
            fn()
        torch.cuda.synchronize()
    ev = [e for e in prof.events() if e.device_type.name == "CUDA"]
    ev.sort(key=lambda e: e.time_range.start)
    out, cur = [], None
    for e in ev:
        dur = e.time_range.end - e.time_range.start
        if is_device_sleep(e.name, dur):
            cur = []
            out.append(cur)
            continue
        if cur is None:
            continue
        cur.append(
            {
                "name": e.name[:80],
                "stream": getattr(e, "device_resource_id", -1),
                "t0": e.time_range.start,
                "dur_us": dur,
            }
        )
    for step in out:
        if step:
            first = min(d["t0"] for d in step)
            for d in step:
                d["start_us"] = d.pop("t0") - first
    return [s for s in out if s]


def summarize(steps: list[list[dict]]) -> dict:
    """Medians per event position (the steps must launch the same sequence) and of the span."""
    n = statistics.mode(len(s) for s in steps)
    same = [s for s in steps if len(s) == n]
    events = []
    for i in range(n):
        events.append(
            {
                "name": same[0][i]["name"],
                "stream": same[0][i]["stream"],
                "start_us": statistics.median(s[i]["start_us"] for s in same),
                "dur_us": statistics.median(s[i]["dur_us"] for s in same),
            }
        )
    spans = [max(d["start_us"] + d["dur_us"] for d in s) for s in same]
    return {"steps": len(same), "span_us": statistics.median(spans), "events": events}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="JSON file to write")
    ap.add_argument("--shapes", default="4096x4096", help="comma-separated KxN layer shapes")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    shapes = shape_list(ap, "--shapes", args.shapes)
    require_cuda(__file__)
    m, rows = 8192, []
    for k, n in shapes:
        torch.manual_seed(0)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        dense = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        dense.weight.data.copy_(w)
        dense.weight.requires_grad_(False)
        layers = {"frozen": dense, "ours": B.qlora_layer(dense)}
        for rnd in range(args.rounds):
            spans = {}
            for name, mod in layers.items():
                res = summarize(timeline(B.layer_step(mod, x, g), args.steps))
                spans[name] = res["span_us"]
                rows.append({"K": k, "N": n, "layer": name, "round": rnd, **res})
                print(f"K={k} N={n} {name} round {rnd}: span {res['span_us']:.1f} us", flush=True)
                for d in res["events"]:
                    print(
                        f"    {d['start_us']:8.1f} +{d['dur_us']:7.1f}  s{d['stream']:<4} {d['name']}",
                        flush=True,
                    )
            print(f"K={k} N={n} round {rnd}: span ratio {spans['ours'] / spans['frozen']:.4f}", flush=True)
    if args.out:
        write_json(args.out, {"command": " ".join(sys.argv), "env": env_info(), "rows": rows})


if __name__ == "__main__":
    main()
