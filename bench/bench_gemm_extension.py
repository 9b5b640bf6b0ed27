"""Whether the QLoRA layer's skinny LoRA products can ride along in its big GEMMs (device time,
M = 8192, cuBLAS through PyTorch, one run):

* forward: y = x @ W'^T against [y | x A^T] = x @ [W'; A]^T (N + r output columns; y would be
  a strided view of the result), next to x @ A^T alone (the pass that extension would remove);
* dX: dX = dY @ W' against [dX | dY B] = dY @ [W' | B] (K + r output columns), next to
  dY @ B alone.

Each pair is timed interleaved (median of rounds of the two back to back, queued behind a
device sleep) and by summed kernel time (torch.profiler); the cuBLAS kernel each one ran is
recorded.

    python bench/bench_gemm_extension.py --out bench/results/gemm_extension.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import device_ms, env_info, ratio_interleaved, require_cuda, table, write_json

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672)]  # (K, N)


def kernel_names(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({e.name for e in prof.events() if e.device_type.name == "CUDA"})


def rows_for(m: int, k: int, n: int, r: int) -> dict:
    dt = torch.bfloat16
    x = torch.randn(m, k, device="cuda", dtype=dt)
    dy = torch.randn(m, n, device="cuda", dtype=dt)
    w_ext = torch.randn(n + r, k, device="cuda", dtype=dt) * 0.02  # [W'; A]
    w = w_ext[:n]  # W' alone: the first N rows, contiguous
    a = w_ext[n:]
    wx_ext = torch.randn(n, k + r, device="cuda", dtype=dt) * 0.02  # [W' | B]
    wx = wx_ext[:, :k].contiguous()
    b = wx_ext[:, k:].contiguous()
    y = torch.empty(m, n, device="cuda", dtype=dt)
    y_ext = torch.empty(m, n + r, device="cuda", dtype=dt)
    dx = torch.empty(m, k, device="cuda", dtype=dt)
    dx_ext = torch.empty(m, k + r, device="cuda", dtype=dt)
    fns = {
        "fwd": lambda: torch.mm(x, w.t(), out=y),
        "fwd_ext": lambda: torch.mm(x, w_ext.t(), out=y_ext),
        "xa": lambda: x @ a.t(),
        "dx": lambda: torch.mm(dy, wx, out=dx),
        "dx_ext": lambda: torch.mm(dy, wx_ext, out=dx_ext),
        "dyb": lambda: dy @ b,
    }
    row: dict = {"M": m, "K": k, "N": n, "r": r}
    for name, fn in fns.items():
        row[f"{name}_us"] = device_ms(fn, calls=20) * 1e3
        row[f"{name}_kernels"] = kernel_names(fn)
    for name in ("fwd", "dx"):
        row[f"{name}_ext_over_plain"] = ratio_interleaved(fns[f"{name}_ext"], fns[name], covered=True)
        row[f"{name}_ext_minus_plain_us"] = row[f"{name}_ext_us"] - row[f"{name}_us"]
    row["xa_saved_us"] = row["xa_us"] - row["fwd_ext_minus_plain_us"]
    row["dyb_saved_us"] = row["dyb_us"] - row["dx_ext_minus_plain_us"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/gemm_extension.json")
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--m", type=int, default=8192)
    args = ap.parse_args()
    require_cuda(__file__)
    rows = []
    for r in (int(v) for v in args.ranks.split(",")):
        for k, n in SHAPES:
            rows.append(rows_for(args.m, k, n, r))
            torch.cuda.empty_cache()
    write_json(args.out, {"env": env_info(), "rows": rows})
    print(
        table(
            rows,
            [
                "K",
                "N",
                "r",
                "fwd_us",
                "fwd_ext_over_plain",
                "xa_us",
                "xa_saved_us",
                "dx_us",
                "dx_ext_over_plain",
                "dyb_us",
                "dyb_saved_us",
            ],
        )
    )
    for row in rows:
        print(row["K"], row["N"], row["r"], "fwd", row["fwd_kernels"], "fwd_ext", row["fwd_ext_kernels"])
        print(row["K"], row["N"], row["r"], "dx", row["dx_kernels"], "dx_ext", row["dx_ext_kernels"])


if __name__ == "__main__":
    main()
