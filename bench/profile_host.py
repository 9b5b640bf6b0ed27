"""Host (CPU) time of one QLoRA layer step, the part that decides the step time when the GPU work
is small: a tiny layer (M = 8, K = N = 256) so device time is negligible, timed per call after
warm-up, for the frozen bf16 layer, bf16 + LoRA, and hoptune's LoRALinear on NF4; then a cProfile
of hoptune's step (top functions by own time).

    python bench/profile_host.py
"""

from __future__ import annotations

import copy
import cProfile
import io
import os
import pstats
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_nf4_lora import PlainLora
from hoptune.nn import LoRALinear


def per_call_us(fn, calls: int = 300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / calls * 1e6


def main() -> None:
    dev = "cuda"
    m, k, n = 8, 256, 256
    dense = nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16)
    dense.weight.requires_grad_(False)
    ours = LoRALinear(
        copy.deepcopy(dense),
        r=16,
        lora_alpha=32,
        quantize="nf4",
        adapter_dtype=torch.bfloat16,
        init_lora_weights=False,
    )
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(m, n, device=dev, dtype=torch.bfloat16)

    def step(mod):
        def f():
            x.grad = None
            for p in mod.parameters():
                p.grad = None
            mod(x).backward(g)

        return f

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
