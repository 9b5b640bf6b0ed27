"""NF4 dequantize (bf16 out, double quant) on the five weight shapes of TARGETS.md, against the
HBM copy rate and bitsandbytes' dequantize_4bit, all measured in this run.

    python bench/bench_nf4_dequant.py --out bench/results/nf4_dequant.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (
    bench_graph,
    bench_rotating,
    copy_rate_tbps,
    env_info,
    per_call_us,
    require_cuda,
    table,
    write_json,
)
from hoptune.ops import nf4 as nf4_ops
from hoptune.quant import dequantize_nf4, quantize_nf4

VARIANTS = (
    0,
    1,
)  # csrc/kernels/nf4.cu: 0 the default, 1 the same kernel without programmatic dependent launch

# merged dequantize versions (nf4_ops._MERGE_VARIANT): 0 the default (bulk tensor stores at
# ranks 8-32), 1 the lanes' stores; timed at these ranks in alternating rounds (r = 64 takes the
# same kernel in both)
MERGE_VARIANTS = (0, 1)
MERGE_RANKS = (8, 16, 32)
MERGE_ROUNDS = 3

# weights [N, K]: the (K, N) pairs of TARGETS.md §1
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192)]


def _state(q) -> tuple:
    return q.packed, q.absmax, q.absmax2, q.code2, q.offset, q.blocksize, q.blocksize2


def measure(n: int, k: int, copy_tbps: float, bnbf) -> dict:
    numel = n * k
    copies = max(2, (256 << 20) // (numel // 2 + 2 * numel) + 1)  # > L2 per rotation
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    qs = [quantize_nf4(w) for w in ws]
    nbytes = numel // 2 + numel // 64 + 2 * numel  # codes + nested absmax + bf16 out
    row = {"N": n, "K": k}
    # kernel time (CUDA graph replay: no launch overhead), for each numbered kernel version
    for v in VARIANTS:
        nf4_ops._DEQUANT_VARIANT = v
        row[f"v{v}_ms"] = bench_graph([partial(dequantize_nf4, q) for q in qs])
        row[f"v{v}_frac_copy"] = nbytes / row[f"v{v}_ms"] / 1e9 / copy_tbps
    nf4_ops._DEQUANT_VARIANT = 0
    row["ours_ms"] = row["v0_ms"]
    row["ours_TBps"] = nbytes / row["ours_ms"] / 1e9
    row["ours_frac_copy"] = row["ours_TBps"] / copy_tbps
    # dequantize with a rank-r LoRA product folded in (the QLoRA layer's weight pass)
    for r in (16, 32, 64):
        a = torch.randn(r, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
        b = torch.randn(n, r, device="cuda", dtype=torch.bfloat16) * 0.01
        lora = [partial(nf4_ops.nf4_dequantize_lora, *_state(q), [n, k], a, b, 2.0) for q in qs]
        row[f"lora{r}_ms"] = bench_graph(lora)
        row[f"lora{r}_frac_copy"] = nbytes / row[f"lora{r}_ms"] / 1e9 / copy_tbps
    # merged-dequantize kernel versions (nf4_ops._MERGE_VARIANT), alternated round by round
    for r in MERGE_RANKS:
        a = torch.randn(r, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
        b = torch.randn(n, r, device="cuda", dtype=torch.bfloat16) * 0.01
        lora = [partial(nf4_ops.nf4_dequantize_lora, *_state(q), [n, k], a, b, 2.0) for q in qs]
        rounds = {v: [] for v in MERGE_VARIANTS}
        for _ in range(MERGE_ROUNDS):
            for v in MERGE_VARIANTS:
                nf4_ops._MERGE_VARIANT = v
                rounds[v].append(bench_graph(lora))
        nf4_ops._MERGE_VARIANT = 0
        for v in MERGE_VARIANTS:
            row[f"lora{r}_mv{v}_rounds_ms"] = rounds[v]
            row[f"lora{r}_mv{v}_ms"] = statistics.median(rounds[v])
            row[f"lora{r}_mv{v}_frac_copy"] = nbytes / row[f"lora{r}_mv{v}_ms"] / 1e9 / copy_tbps
    # one eager call from Python (op dispatch included)
    row["ours_eager_ms"] = bench_rotating(lambda i: partial(dequantize_nf4, qs[i]), copies)
    row["quantize_ms"] = bench_rotating(lambda i: partial(quantize_nf4, ws[i]), copies, rep=5)
    if bnbf is not None:
        bq = [bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4") for w in ws]
        row["bnb_ms"] = bench_graph([partial(bnbf.dequantize_4bit, *b) for b in bq])
        row["bnb_eager_ms"] = bench_rotating(lambda i: partial(bnbf.dequantize_4bit, *bq[i]), copies)
        row["bnb_frac_copy"] = nbytes / row["bnb_ms"] / 1e9 / copy_tbps
        row["speedup_vs_bnb"] = row["bnb_ms"] / row["ours_ms"]
        quant = partial(bnbf.quantize_4bit, blocksize=64, compress_statistics=True, quant_type="nf4")
        row["bnb_quantize_ms"] = bench_rotating(lambda i: partial(quant, ws[i]), copies, rep=5)
    return row


def merge_host_us(calls: int = 2000, rounds: int = 5) -> dict:
    """Host time per merged-dequantize call of each version (the op's whole call: checks, launch and,
    in version 0, the bulk-store map) on a 256 x 256 weight at r = 16, calls queued back to back:
    the median over rounds of the mean per call, in µs (``per_call_us``: its last drain is timed too,
    a few ns per call more than in results/nf4_dequant_bulk_stores.json, which stopped the clock
    before it)."""
    q = quantize_nf4(torch.randn(256, 256, device="cuda", dtype=torch.bfloat16))
    a = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(256, 16, device="cuda", dtype=torch.bfloat16)
    call = partial(nf4_ops.nf4_dequantize_lora, *_state(q), [256, 256], a, b, 2.0)
    times = {v: [] for v in MERGE_VARIANTS}
    for _ in range(rounds):
        for v in MERGE_VARIANTS:
            nf4_ops._MERGE_VARIANT = v
            times[v].append(per_call_us(call, calls, warmup=50))
    nf4_ops._MERGE_VARIANT = 0
    return {f"mv{v}_host_us": statistics.median(t) for v, t in times.items()} | {
        f"mv{v}_host_rounds_us": t for v, t in times.items()
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/nf4_dequant.json")
    args = ap.parse_args()
    require_cuda(__file__)
    try:
        import bitsandbytes.functional as bnbf
    except Exception as e:
        bnbf = None
        print("bitsandbytes unavailable:", e)
    res = {"env": env_info(), "copy_TBps": copy_rate_tbps(), "rows": []}
    for n, k in SHAPES:
        res["rows"].append(measure(n, k, res["copy_TBps"], bnbf))
        print(res["rows"][-1], flush=True)
        torch.cuda.empty_cache()
    res["merge_host"] = merge_host_us()
    write_json(args.out, res)
    print(
        "merged dequantize, host time per call (µs):",
        {k: round(v, 2) for k, v in res["merge_host"].items() if k.endswith("host_us")},
    )
    print(f"HBM copy rate {res['copy_TBps']:.2f} TB/s; kernel times from CUDA graph replay")
    print(table(res["rows"], ["N", "K", *[f"v{v}_frac_copy" for v in VARIANTS]]))
    print(
        table(
            res["rows"],
            ["N", "K"] + [f"lora{r}_frac_copy" for r in (16, 32, 64)],
        )
    )
    print(
        table(
            res["rows"],
            ["N", "K"] + [f"lora{r}_mv{v}_frac_copy" for r in MERGE_RANKS for v in MERGE_VARIANTS],
        )
    )
    print(
        table(
            res["rows"],
            [
                "N",
                "K",
                "ours_ms",
                "ours_frac_copy",
                "bnb_ms",
                "bnb_frac_copy",
                "speedup_vs_bnb",
                "quantize_ms",
            ],
        )
    )


if __name__ == "__main__":
    main()
