"""Host (CPU) time of one QLoRA layer step, the part that decides the step time when the GPU work
is small: a tiny layer (M = 8, K = N = 256) so device time is negligible, timed per call after
warm-up, for the frozen bf16 layer, bf16 + LoRA, and hoptune's LoRALinear on NF4; then a cProfile
of hoptune's step (top functions by own time).

    python bench/profile_host.py
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_nf4_lora import PlainLora, layer_step, qlora_layer
from harness import idle_gaps, kernel_spans, per_call_us


def gaps(m: int, k: int, n: int, steps: int = 5) -> None:
    """Where the GPU waits inside a layer step: device idle time between consecutive kernels of
    the hoptune QLoRA step at M x K x N (torch.profiler), the largest gaps with their neighbours,
    and the runtime calls that block the host (synchronizations, device-to-host copies)."""
    from torch.profiler import ProfilerActivity, profile

    dense = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
    dense.weight.requires_grad_(False)
    ours = qlora_layer(dense)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)

    f = layer_step(ours, x, g)

    def host_us(fn, calls: int = 10) -> float:
        """Host time of one call (the launches queued; the device idle at the start of each)."""
        total = 0.0
        for _ in range(calls):
            torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            total += time.perf_counter() - t
        torch.cuda.synchronize()
        return total / calls * 1e6

    def f_dense():
        x.grad = None
        dense(x).backward(g)

    for _ in range(3):
        f()
        f_dense()
    print(
        f"host time per step at {m}x{k}x{n}: QLoRA {host_us(f):.0f} us, frozen bf16 {host_us(f_dense):.0f} us"
    )
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            f()
        torch.cuda.synchronize()
    events = prof.events()
    kernels = sorted((e for e in events if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    busy = sum(e.time_range.elapsed_us() for e in kernels)
    span = kernels[-1].time_range.end - kernels[0].time_range.start
    print(
        f"QLoRA step {m}x{k}x{n}: {steps} steps span {span / steps:.0f} us/step, kernels busy {busy / steps:.0f} us/step"
    )
    for g in idle_gaps(kernel_spans(prof), events)["largest"]:
        print(
            f"  idle {g['us']:7.1f} us  after {g['after'][:60]}  before {g['before'][:60]}  ({g['launch_path']})"
        )
    blocking = (
        "Synchronize",
        "cudaMemcpy",
        "cudaEventSynchronize",
        "cudaStreamWaitEvent",
        "cudaMalloc",
        "cudaFree",
    )
    for ev in prof.key_averages():
        if any(w in ev.key for w in blocking):
            print(f"  host {ev.key}: {ev.count // steps} per step, {ev.cpu_time_total / steps:.0f} us/step")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("no CUDA device is visible: this script times the host work of a GPU layer step")
    dev = "cuda"
    m, k, n = 8, 256, 256
    dense = nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16)
    dense.weight.requires_grad_(False)
    ours = qlora_layer(dense)
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(m, n, device=dev, dtype=torch.bfloat16)

    def step(mod):
        return layer_step(mod, x, g)

    for name, mod in (
        ("bf16 frozen", dense),
        ("bf16 + LoRA", PlainLora(dense, k, n)),
        ("hoptune QLoRA", ours),
    ):
        print(
            f"{name:14s} step {per_call_us(step(mod)):7.1f} us   forward only {per_call_us(lambda: mod(x)):7.1f} us"
        )
    with torch.no_grad():
        print(f"{'hoptune no_grad':14s} forward {per_call_us(lambda: ours(x)):7.1f} us")
    gaps(m=8192, k=4096, n=4096)
    prof = cProfile.Profile()
    f = step(ours)
    prof.enable()
    for _ in range(200):
        f()
    torch.cuda.synchronize()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(30)
    print(out.getvalue())


if __name__ == "__main__":
    main()
