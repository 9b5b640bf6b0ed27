"""Two choices of the QLoRA layer's backward and merged weight, each against its alternative in
the same run (device time):

* reductions: the token reductions dA = dxa^T x and dB = dY^T xa (a (M, p)^T b (M, q), one of
  p, q the rank) as one cuBLAS GEMM (what the op runs) against M cut into 2048-row slices with
  fp32 partial sums, summed and rounded once (what it ran before: torch.profiler, 20 calls);
* ranks: the merged dequantize deq(W) + s B A at r = 16, 32, 40, 64, 96 and 128 through the main
  kernel (B 16-byte aligned: its rows read in 16-byte runs; 32-column pieces above r = 64)
  against the general kernel (B one element into its buffer, so its rows are not 4-byte aligned:
  nf4_dequantize_lora_any) and, up to r = 64, against the main kernel reading B in 4-byte words
  (B two elements in), by CUDA-graph replay over two weights (the general kernel with
  nf4.MERGE_PAD_RANKS off, which would otherwise copy B to an aligned buffer);
* odd_ranks: ranks the main kernel cannot take as given (odd; 65-127 not multiples of 8) through
  the general kernel (padding off) against what the op runs, the factors padded with zero ranks to
  a multiple of 8 and the main kernel (nf4.main_kernel_factors, its two copies included), and
  against the main kernel on factors padded beforehand.

    python bench/bench_lora_passes.py --out bench/results/lora_passes.json
"""

from __future__ import annotations

import argparse
import os
import sys
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import bench_graph, device_ms, env_info, require_cuda, table, write_json
from hoptune.ops import nf4 as nf4_ops
from hoptune.quant import quantize_nf4
from hoptune.reference import nf4 as ref_nf4

SLICE_ROWS = 2048


def sliced_tn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a^T b with the M rows cut into SLICE_ROWS slices, fp32 partial sums, one rounding."""
    s = a.shape[0] // SLICE_ROWS
    part = torch.bmm(
        a.view(s, SLICE_ROWS, -1).transpose(1, 2), b.view(s, SLICE_ROWS, -1), out_dtype=torch.float32
    )
    return part.sum(0).to(a.dtype)


def reduction_rows() -> list[dict]:
    rows = []
    for m in (4096, 8192):
        for wide in (4096, 14336, 28672):
            for r in (16, 64):
                big = torch.randn(m, wide, device="cuda", dtype=torch.bfloat16)
                thin = torch.randn(m, r, device="cuda", dtype=torch.bfloat16)
                row = {"M": m, "wide": wide, "r": r}
                # dA-like: thin^T big, (r, wide); dB-like: big^T thin, (wide, r)
                for tag, a, b in (("dA", thin, big), ("dB", big, thin)):
                    row[f"{tag}_one_us"] = device_ms(lambda a=a, b=b: a.t() @ b, calls=20) * 1e3
                    row[f"{tag}_sliced_us"] = device_ms(lambda a=a, b=b: sliced_tn(a, b), calls=20) * 1e3
                    row[f"{tag}_one_over_sliced"] = row[f"{tag}_one_us"] / row[f"{tag}_sliced_us"]
                rows.append(row)
                del big, thin
    return rows


def rank_rows() -> list[dict]:
    rows = []
    for n, k in [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192)]:
        qs = [quantize_nf4(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02) for _ in range(2)]
        for r in (16, 32, 40, 64, 96, 128):
            a = torch.randn(r, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
            buf = torch.randn(n * r + 2, device="cuda", dtype=torch.bfloat16) * r**-0.5
            b_aligned, b_odd = buf[: n * r].view(n, r), buf[1 : n * r + 1].view(n, r)
            b_words = buf[2:].view(n, r)  # 4-byte but not 16-byte aligned rows

            def merged(q, b, a=a):
                state = (q.packed, q.absmax, q.absmax2, q.code2, q.offset, q.blocksize, q.blocksize2)
                return lambda: nf4_ops.dequantize_lora_kernel(*state, (n, k), a, b, 0.5)

            row = {"N": n, "K": k, "r": r}
            row["main_us"] = bench_graph([merged(q, b_aligned) for q in qs]) * 1e3
            with mock.patch.object(nf4_ops, "MERGE_PAD_RANKS", False):
                row["general_us"] = bench_graph([merged(q, b_odd) for q in qs]) * 1e3
            row["main_over_general"] = row["main_us"] / row["general_us"]
            if r <= 64:  # (above 64 the main kernel needs the 16-byte runs)
                row["main_words_us"] = bench_graph([merged(q, b_words) for q in qs]) * 1e3
                row["main_over_words"] = row["main_us"] / row["main_words_us"]
            base = nf4_ops.dequantize_impl(
                qs[0].packed, qs[0].absmax, qs[0].absmax2, qs[0].code2, qs[0].offset, qs[0].blocksize,
                qs[0].blocksize2, (n, k), torch.bfloat16,
            )  # fmt: skip
            variants = [("main", b_aligned), ("general", b_odd)] + [("main_words", b_words)] * (r <= 64)
            for tag, b in variants:
                exact = ref_nf4.merge_lora(base, a, b, 0.5)  # fp32, rounded once
                with mock.patch.object(nf4_ops, "MERGE_PAD_RANKS", tag != "general"):
                    row[f"{tag}_differ_frac"] = (merged(qs[0], b)() != exact).float().mean().item()
            rows.append(row)
    return rows


ODD_RANKS = (15, 33, 63, 100)


def odd_rank_rows() -> list[dict]:
    rows = []
    for n, k in [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192)]:
        qs = [quantize_nf4(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02) for _ in range(2)]
        base = nf4_ops.dequantize_impl(
            qs[0].packed, qs[0].absmax, qs[0].absmax2, qs[0].code2, qs[0].offset, qs[0].blocksize,
            qs[0].blocksize2, (n, k), torch.bfloat16,
        )  # fmt: skip
        for r in ODD_RANKS:
            a = torch.randn(r, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
            b = torch.randn(n, r, device="cuda", dtype=torch.bfloat16) * r**-0.5
            a8, b8 = nf4_ops.main_kernel_factors(a, b)

            def merged(q, a, b):
                state = (q.packed, q.absmax, q.absmax2, q.code2, q.offset, q.blocksize, q.blocksize2)
                return lambda: nf4_ops.dequantize_lora_kernel(*state, (n, k), a, b, 0.5)

            row = {"N": n, "K": k, "r": r, "padded_r": a8.shape[0]}
            with mock.patch.object(nf4_ops, "MERGE_PAD_RANKS", False):
                row["general_us"] = bench_graph([merged(q, a, b) for q in qs]) * 1e3
                general = merged(qs[0], a, b)()
            row["padded_us"] = bench_graph([merged(q, a, b) for q in qs]) * 1e3
            row["prepadded_us"] = bench_graph([merged(q, a8, b8) for q in qs]) * 1e3
            row["padded_over_general"] = row["padded_us"] / row["general_us"]
            row["pads_us"] = row["padded_us"] - row["prepadded_us"]
            padded = merged(qs[0], a, b)()
            exact = ref_nf4.merge_lora(base, a, b, 0.5)  # fp32, rounded once
            row["general_differ_frac"] = (general != exact).float().mean().item()
            row["padded_differ_frac"] = (padded != exact).float().mean().item()
            row["padded_equals_prepadded"] = torch.equal(padded, merged(qs[0], a8, b8)())
            rows.append(row)
            print(row, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/lora_passes.json")
    known = {"reductions", "ranks", "odd_ranks"}
    ap.add_argument(
        "--sections",
        default="reductions,ranks,odd_ranks",
        help="comma-separated: " + ", ".join(sorted(known)),
    )
    args = ap.parse_args()
    require_cuda(__file__)
    sections = set(args.sections.split(","))
    if not sections <= known:
        ap.error(f"--sections: unknown {sorted(sections - known)}")
    res = {"env": env_info()}
    if "reductions" in sections:
        res["reductions"] = reduction_rows()
        write_json(args.out, res)
        cols = ["M", "wide", "r", "dA_one_us", "dA_sliced_us", "dA_one_over_sliced"]
        print(table(res["reductions"], [*cols, "dB_one_us", "dB_sliced_us", "dB_one_over_sliced"]))
    if "ranks" in sections:
        res["ranks"] = rank_rows()
        write_json(args.out, res)
        cols = [
            "N",
            "K",
            "r",
            "main_us",
            "general_us",
            "main_over_general",
            "main_words_us",
            "main_over_words",
        ]
        print(
            table(res["ranks"], [*cols, "main_differ_frac", "general_differ_frac", "main_words_differ_frac"])
        )
    if "odd_ranks" in sections:
        res["odd_ranks"] = odd_rank_rows()
        write_json(args.out, res)
        cols = ["N", "K", "r", "padded_r", "general_us", "padded_us", "prepadded_us", "padded_over_general"]
        print(table(res["odd_ranks"], [*cols, "general_differ_frac", "padded_differ_frac"]))


if __name__ == "__main__":
    main()
