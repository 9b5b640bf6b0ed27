"""The fused NF4 GEMM (nf4_lora_gemm: codes decoded in the mainloop, LoRA and bias added to the
accumulators) against torch bf16 ``x @ W^T`` and our merged dequantize + GEMM forward, at
M = 8192 on the forward shapes of TARGETS.md, all in one run (device time: each call queued
behind a device sleep, ratio_interleaved(covered=True)).

Rows: ``fused`` the kernel alone (no LoRA), ``fused_r16`` with the LoRA term (xs given),
``fused_fwd`` the whole fused forward as the op would run it (xs = s x A^T by cuBLAS, then the
kernel), ``merged_fwd`` the op's forward today (merged dequantize, then cuBLAS), each as a ratio to
bf16 ``x @ W^T`` without LoRA.

    python bench/bench_nf4_gemm.py --out bench/results/nf4_gemm.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (
    bench,
    env_info,
    int_list,
    ratio_interleaved,
    require_cuda,
    shape_list,
    table,
    write_json,
)
from hoptune.ops import nf4 as nf4_ops
from hoptune.ops import nf4_lora_linear
from hoptune.quant import quantize_nf4

FWD_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672)]  # (K, N)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--m", type=int, default=8192)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--sweep", default="", help="comma-separated M values: device times per M instead")
    p.add_argument(
        "--splits",
        default="",
        help="with --sweep: comma-separated K splits of the fused GEMM to time (0: stream-K, "
        "auto: nf4.fused_splits), each with nf4.fused_tile_n's tile, instead of both tiles unsplit",
    )
    p.add_argument(
        "--tiles",
        default="",
        help="with --splits: comma-separated tokens per CTA to time each split with (auto: nf4.fused_tile_n)",
    )
    p.add_argument("--shapes", default="", help="comma-separated KxN shapes (default: all five)")
    p.add_argument("--out", default="bench/results/nf4_gemm.json")
    args = p.parse_args(argv)
    if (args.splits or args.tiles) and not args.sweep:
        p.error("--splits and --tiles apply to --sweep only; add --sweep M[,M...] or leave them out")
    if args.tiles and not args.splits:
        p.error("--tiles needs --splits (each tile is timed with each K split); add --splits auto")
    shapes = FWD_SHAPES
    if args.shapes:
        shapes = shape_list(p, "--shapes", args.shapes)
    if args.sweep:
        ms = int_list(p, "--sweep", args.sweep)
        splits = int_list(p, "--splits", args.splits, auto=None) if args.splits else []
        tiles = int_list(p, "--tiles", args.tiles, auto=0) if args.tiles else [0]
        sweep(ms, args.rank, args.out, shapes, splits, tiles)
        return
    require_cuda(__file__)
    torch.manual_seed(0)
    m, r, s = args.m, args.rank, 2.0
    rows = []
    for k, n in shapes:
        dt = torch.bfloat16
        w = torch.randn(n, k, device="cuda", dtype=dt) * k**-0.5
        q = quantize_nf4(w)
        qa = (q.packed, q.absmax, q.absmax2, q.code2, q.offset, q.blocksize, q.blocksize2)
        x = torch.randn(m, k, device="cuda", dtype=dt)
        a = torch.randn(r, k, device="cuda", dtype=dt) * k**-0.5
        b = torch.randn(n, r, device="cuda", dtype=dt) * r**-0.5
        xs = (s * (x @ a.t())).to(dt)

        def bf16():
            return x @ w.t()

        def fused():
            return nf4_ops.fused_gemm_kernel(x, *qa, n, None, None, None)

        def fused_r16():
            return nf4_ops.fused_gemm_kernel(x, *qa, n, xs, b, None)

        def fused_fwd():
            xs_ = torch.mm(x, a.t()).mul_(s)
            return nf4_ops.fused_gemm_kernel(x, *qa, n, xs_, b, None)

        def merged_fwd():
            with torch.no_grad():
                return nf4_lora_linear(x, q, a, b, s)

        row = {"K": k, "N": n, "bf16_ms": bench(bf16, lead_ms=3.0)}
        for name, fn in (
            ("fused", fused),
            ("fused_r16", fused_r16),
            ("fused_fwd", fused_fwd),
            ("merged_fwd", merged_fwd),
        ):
            row[f"{name}_ms"] = bench(fn, lead_ms=3.0)
            row[name] = ratio_interleaved(fn, bf16, covered=True)
        flop = 2.0 * m * n * k
        row["bf16_tflops"] = flop / row["bf16_ms"] / 1e9
        row["fused_tflops"] = flop / row["fused_ms"] / 1e9
        rows.append(row)
        print(table([row], ["K", "N", "fused", "fused_r16", "fused_fwd", "merged_fwd"]), flush=True)
        torch.cuda.empty_cache()
    cols = ["K", "N", "bf16_ms", "fused_ms", "fused", "fused_r16", "fused_fwd", "merged_fwd"]
    print(table(rows, cols))
    write_json(args.out, {"env": env_info(), "m": m, "rank": r, "rows": rows})


def sweep(ms: list[int], r: int, out: str, shapes, splits: list, tiles: list[int]) -> None:
    """Device time per call (queued behind a device sleep) of bf16 ``x @ W^T``, the fused forward
    (xs by cuBLAS, then nf4_lora_gemm), the merged forward (the merged dequantize, then cuBLAS),
    up to 32 rows the small-M kernel's forward (x A^T, then nf4_small_m), and the op's forward
    without autograd (what the dispatch picks) for each M, on every shape.
    The fused forward with 128 and 256 tokens per CTA and the default K split, or with each tile
    in ``tiles`` (0: fused_tile_n's) and each K split in ``splits``."""
    require_cuda(__file__)
    torch.manual_seed(0)
    s, dt = 2.0, torch.bfloat16
    rows = []
    for k, n in shapes:
        w = torch.randn(n, k, device="cuda", dtype=dt) * k**-0.5
        q = quantize_nf4(w)
        qa = (q.packed, q.absmax, q.absmax2, q.code2, q.offset, q.blocksize, q.blocksize2)
        a = torch.randn(r, k, device="cuda", dtype=dt) * k**-0.5
        b = torch.randn(n, r, device="cuda", dtype=dt) * r**-0.5
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=dt)

            def fused_fwd(tile_n, split):
                xs_ = torch.mm(x, a.t()).mul_(s)
                return nf4_ops.fused_gemm_kernel(x, *qa, n, xs_, b, None, tile_n=tile_n, splits=split)

            def merged_fwd():
                w_ = nf4_ops.dequantize_lora_kernel(*qa, (n, k), a, b, s)
                return x @ w_.t()

            def op_fwd():
                with torch.no_grad():
                    return nf4_lora_linear(x, q, a, b, s)

            row = {"K": k, "N": n, "M": m}
            row["bf16_ms"] = bench(lambda: x @ w.t(), lead_ms=3.0)
            row["merged_fwd_ms"] = bench(merged_fwd, lead_ms=3.0)
            row["op_fwd_ms"] = bench(op_fwd, lead_ms=3.0)
            if m <= nf4_ops.SMALL_M_MAX:  # the small-M kernel (x A^T in fp32 first)

                def small_fwd():
                    xa = torch.mm(x, a.t(), out_dtype=torch.float32)
                    return nf4_ops.small_m_kernel(x, *qa, n, xa, b, s, None)

                row["small_fwd_ms"] = bench(small_fwd, lead_ms=3.0)
            variants = [(f"fused{tn}", tn, None) for tn in (128, 256)] if not splits else []
            tile = nf4_ops.fused_tile_n(m, n)
            for t in tiles:
                for sp in splits:
                    prefix = "fused" if t == 0 else f"fused_t{t}"
                    variants.append((f"{prefix}_s{'auto' if sp is None else sp}", t or tile, sp))
            if splits:
                row["tile_n"] = tile
                row["auto_splits"] = nf4_ops.fused_splits(m, n, k, tile, nf4_ops.sm_count(x.device))
            for name, tn, sp in variants:
                row[f"{name}_fwd_ms"] = bench(lambda tn=tn, sp=sp: fused_fwd(tn, sp), lead_ms=3.0)
                row[f"{name}_vs_merged"] = row[f"{name}_fwd_ms"] / row["merged_fwd_ms"]
            rows.append(row)
        print(table([r_ for r_ in rows if r_["N"] == n and r_["K"] == k], list(rows[-1])), flush=True)
        torch.cuda.empty_cache()
    write_json(out, {"env": env_info(), "rank": r, "rows": rows})


if __name__ == "__main__":
    main()
