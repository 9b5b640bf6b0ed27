"""Whether the layer's big GEMMs would gain from choosing cuBLASLt's algorithm by measurement
instead of taking the one cuBLAS picks for PyTorch (M = 8192, bf16, fp32 accumulate, one run).

For the forward ``y = x @ W^T`` and the backward ``dX = dY @ W`` on the five weights of the
forward bar, cuBLASLt's heuristic is asked for its candidates (32 MiB workspace, as PyTorch gives
cuBLAS on Hopper). Each candidate's output is checked against ``torch.mm``'s and its device time
taken behind a device sleep; the fastest two are then timed against ``torch.mm`` interleaved
(median ratio of rounds) and, with ``--seconds`` > 0, back to back for that long with the SM clock
sampled (a dense GEMM runs at the board's power cap, where short timings flatter some tiles;
``docs/KERNELS.md``). cuBLASLt is reached through the extension's ``CublasLtPlan`` (the
library PyTorch loaded, as ``hoptune.ops.gemm`` uses it), so the extension must be built.

    python bench/bench_gemm_algo.py --out bench/results/gemm_algo.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gemm_extension import SHAPES, kernel_names
from harness import bench, env_info, ratio_interleaved, require_cuda, sustained_clocks, table, write_json

WORKSPACE = 32 << 20
MAX_CANDIDATES = 32


def load_extension():
    """hoptune's extension with cuBLASLt loaded (the library PyTorch's process has loaded)."""
    from hoptune.ops import gemm

    ext, why = gemm.cublaslt_extension()
    if ext is None:
        raise SystemExit(f"cuBLASLt is not reachable through hoptune's extension: {why}")
    return ext


class LtGemm:
    """One problem of ``hoptune._C.CublasLtPlan`` (D m x n, column-major, ld m, = op(A) op(B) in
    bf16 with fp32 accumulation), its heuristic candidates and a launcher per candidate."""

    def __init__(self, ext, transa: bool, transb: bool, m: int, n: int, k: int):
        from hoptune import _lib

        self.plan = ext.CublasLtPlan(
            ext.cublaslt_handle(), transa, transb, m, n, k, _lib.DTYPE_CODES[torch.bfloat16]
        )
        self.count = self.plan.search(MAX_CANDIDATES, WORKSPACE)
        self.workspace = torch.empty(WORKSPACE, dtype=torch.uint8, device="cuda")

    def describe(self, i: int) -> dict:
        names = ("id", "tile", "stages", "splitk", "cluster", "workspace")
        return {name: (None if v < 0 else v) for name, v in zip(names, self.plan.describe(i))}

    def launcher(self, i: int, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor):
        plan, ws = self.plan, self.workspace

        def run():
            stream = torch.cuda.current_stream().cuda_stream
            plan.run(i, a.data_ptr(), b.data_ptr(), d.data_ptr(), 0.0, ws.data_ptr(), WORKSPACE, stream)

        return run


def case(ext, op: str, m: int, k: int, n: int, seconds: float) -> dict:
    dt = torch.bfloat16
    w = torch.randn(n, k, device="cuda", dtype=dt) * 0.02
    if op == "fwd":  # y[m, n] = x @ W^T: column-major y^T = W^T(T) x^T
        inp = torch.randn(m, k, device="cuda", dtype=dt)
        out = torch.empty(m, n, device="cuda", dtype=dt)
        gemm = LtGemm(ext, True, False, n, m, k)
        ref_fn = lambda: torch.mm(inp, w.t(), out=out)  # noqa: E731
    else:  # dx[m, k] = dY @ W: column-major dX^T = W^T dY^T
        inp = torch.randn(m, n, device="cuda", dtype=dt)
        out = torch.empty(m, k, device="cuda", dtype=dt)
        gemm = LtGemm(ext, False, False, k, m, n)
        ref_fn = lambda: torch.mm(inp, w, out=out)  # noqa: E731
    ref_fn()
    ref = out.clone()
    scale = ref.abs().max().item()
    row: dict = {"op": op, "M": m, "K": k, "N": n, "candidates": gemm.count}
    row["torch_ms"] = bench(ref_fn, warmup=2, rep=10, lead_ms=3.0)
    row["torch_kernels"] = kernel_names(ref_fn)
    timed = []
    for i in range(gemm.count):
        fn = gemm.launcher(i, w, inp, out)
        out.fill_(float("nan"))
        try:
            fn()
        except RuntimeError as e:  # cuBLASLt refused the candidate for these operands
            timed.append({"index": i, "error": str(e), **gemm.describe(i)})
            continue
        err = (out.float() - ref.float()).abs().max().item() / scale
        if not err < 2e-2:  # a wrong candidate (or NaN) is reported and not timed
            timed.append({"index": i, "rel_err": err, **gemm.describe(i)})
            continue
        ms = bench(fn, warmup=2, rep=10, lead_ms=3.0)
        timed.append(
            {"index": i, "rel_err": err, "ms": ms, "vs_torch": ms / row["torch_ms"], **gemm.describe(i)}
        )
    row["all"] = timed
    ok = sorted((t for t in timed if "ms" in t), key=lambda t: t["ms"])
    row["heuristic0_vs_torch"] = next((t["vs_torch"] for t in timed if t["index"] == 0 and "ms" in t), None)
    for rank, t in enumerate(ok[:2]):
        fn = gemm.launcher(t["index"], w, inp, out)
        t["interleaved_vs_torch"] = ratio_interleaved(fn, ref_fn, rounds=9, covered=True)
        if rank == 0:
            row["best"] = t
            row["best_kernels"] = kernel_names(fn)
            row["best_interleaved"] = t["interleaved_vs_torch"]
            if seconds > 0:
                flops = 2.0 * m * n * k
                sus = sustained_clocks([("torch", ref_fn, flops), ("best", fn, flops)], seconds=seconds)
                row["sustained"] = sus
                if all("ms" in s for s in sus):
                    row["best_sustained"] = sus[1]["ms"] / sus[0]["ms"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/gemm_algo.json")
    ap.add_argument("--m", type=int, default=8192)
    ap.add_argument("--ops", default="fwd,dx")
    ap.add_argument("--seconds", type=float, default=2.0, help="sustained window per GEMM (0: none)")
    args = ap.parse_args()
    require_cuda(__file__)
    ext = load_extension()
    rows = []
    for op in args.ops.split(","):
        for k, n in SHAPES:
            rows.append(case(ext, op, args.m, k, n, args.seconds))
            torch.cuda.empty_cache()
            r = rows[-1]
            print(op, k, n, "best", r.get("best"), flush=True)
    write_json(args.out, {"env": env_info(), "rows": rows})
    print(
        table(
            rows,
            [
                "op",
                "K",
                "N",
                "candidates",
                "torch_ms",
                "heuristic0_vs_torch",
                "best_interleaved",
                "best_sustained",
            ],
        )
    )
    for r in rows:
        print(r["op"], r["K"], r["N"], "torch", r["torch_kernels"], "best", r.get("best_kernels"))


if __name__ == "__main__":
    main()
