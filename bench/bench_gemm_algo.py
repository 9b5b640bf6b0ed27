"""Whether the layer's big GEMMs would gain from choosing cuBLASLt's algorithm by measurement
instead of taking the one cuBLAS picks for PyTorch (M = 8192, bf16, fp32 accumulate, one run).

For the forward ``y = x @ W^T`` and the backward ``dX = dY @ W`` on the five weights of the
forward bar, cuBLASLt's heuristic is asked for its candidates (32 MiB workspace, as PyTorch gives
cuBLAS on Hopper). Each candidate's output is checked against ``torch.mm``'s and its device time
taken behind a device sleep; the fastest two are then timed against ``torch.mm`` interleaved
(median ratio of rounds) and, with ``--seconds`` > 0, back to back for that long with the SM clock
sampled (a dense GEMM runs at the board's power cap, where short timings flatter some tiles;
``docs/KERNELS.md``). cuBLASLt is reached through ``ctypes`` on the library PyTorch loaded:
nothing is built.

    python bench/bench_gemm_algo.py --out bench/results/gemm_algo.json
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gemm_extension import SHAPES, kernel_names
from harness import bench, env_info, ratio_interleaved, sustained_clocks, table, write_json

# cublasLt.h / cublas_api.h / library_types.h (CUDA 13) values.
CUDA_R_32F, CUDA_R_16BF = 0, 14
CUBLAS_COMPUTE_32F = 68
OP_N, OP_T = 0, 1
DESC_TRANSA, DESC_TRANSB = 3, 4
PREF_MAX_WORKSPACE_BYTES = 1
CONFIG = {"id": 0, "tile": 1, "splitk": 2, "stages": 6, "cluster": 8}
WORKSPACE = 32 << 20


class Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class Heuristic(ctypes.Structure):
    _fields_ = [
        ("algo", Algo),
        ("workspace", ctypes.c_size_t),
        ("state", ctypes.c_int),
        ("waves", ctypes.c_float),
        ("reserved", ctypes.c_int * 4),
    ]


def load_cublaslt() -> ctypes.CDLL:
    """The libcublasLt that PyTorch's process has loaded (found in /proc/self/maps)."""
    a = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    torch.nn.functional.linear(a, a, a[0])  # addmm with bias goes through cuBLASLt
    torch.cuda.synchronize()
    with open("/proc/self/maps") as f:
        paths = sorted({line.split()[-1] for line in f if "libcublasLt.so" in line})
    if not paths:
        raise RuntimeError("libcublasLt is not loaded in this process")
    lib = ctypes.CDLL(paths[0])
    lib.cublasLtMatrixLayoutCreate.argtypes = [
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.c_int,
        ctypes.c_uint64,
        ctypes.c_uint64,
        ctypes.c_int64,
    ]
    lib.cublasLtMatmul.argtypes = [ctypes.c_void_p] * 13 + [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    lib.cublasLtMatmulAlgoGetHeuristic.argtypes = [ctypes.c_void_p] * 7 + [
        ctypes.c_int,
        ctypes.POINTER(Heuristic),
        ctypes.POINTER(ctypes.c_int),
    ]
    lib.cublasLtMatmulDescSetAttribute.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_size_t,
    ]
    lib.cublasLtMatmulPreferenceSetAttribute.argtypes = lib.cublasLtMatmulDescSetAttribute.argtypes
    lib.cublasLtMatmulAlgoConfigGetAttribute.argtypes = [
        ctypes.POINTER(Algo),
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.POINTER(ctypes.c_size_t),
    ]
    return lib


def check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"{what} failed with cublasStatus {status}")


class LtGemm:
    """D (m x n, column-major, ld m) = op(A) op(B) in bf16 with fp32 accumulation: one problem,
    its heuristic candidates, and a launcher per candidate."""

    def __init__(self, lib, handle, transa, transb, m, n, k, a_rows, a_cols, b_rows, b_cols):
        self.lib, self.handle = lib, handle
        self.desc = ctypes.c_void_p()
        check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), CUBLAS_COMPUTE_32F, CUDA_R_32F), "desc")
        for attr, op in ((DESC_TRANSA, transa), (DESC_TRANSB, transb)):
            v = ctypes.c_int32(op)
            check(lib.cublasLtMatmulDescSetAttribute(self.desc, attr, ctypes.byref(v), 4), "trans")
        self.layouts = []
        for rows, cols in ((a_rows, a_cols), (b_rows, b_cols), (m, n)):
            lay = ctypes.c_void_p()
            check(lib.cublasLtMatrixLayoutCreate(ctypes.byref(lay), CUDA_R_16BF, rows, cols, rows), "layout")
            self.layouts.append(lay)
        pref = ctypes.c_void_p()
        check(lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "preference")
        ws = ctypes.c_uint64(WORKSPACE)
        check(
            lib.cublasLtMatmulPreferenceSetAttribute(pref, PREF_MAX_WORKSPACE_BYTES, ctypes.byref(ws), 8),
            "pref",
        )
        results = (Heuristic * 32)()
        count = ctypes.c_int()
        la, lb, ld = self.layouts
        check(
            lib.cublasLtMatmulAlgoGetHeuristic(
                handle, self.desc, la, lb, ld, ld, pref, 32, results, ctypes.byref(count)
            ),
            "heuristic",
        )
        self.candidates = [results[i] for i in range(count.value) if results[i].state == 0]
        self.alpha = ctypes.c_float(1.0)
        self.beta = ctypes.c_float(0.0)
        self.workspace = torch.empty(WORKSPACE, dtype=torch.uint8, device="cuda")

    def describe(self, i: int) -> dict:
        out = {"waves": round(self.candidates[i].waves, 3), "workspace": self.candidates[i].workspace}
        for name, attr in CONFIG.items():
            v = ctypes.c_uint32()
            written = ctypes.c_size_t()
            st = self.lib.cublasLtMatmulAlgoConfigGetAttribute(
                ctypes.byref(self.candidates[i].algo), attr, ctypes.byref(v), 4, ctypes.byref(written)
            )
            out[name] = v.value if st == 0 else None
        return out

    def launcher(self, i: int, a: torch.Tensor, b: torch.Tensor, d: torch.Tensor):
        lib, algo = self.lib, self.candidates[i].algo
        la, lb, ld = self.layouts

        def run():
            stream = torch.cuda.current_stream().cuda_stream
            check(
                lib.cublasLtMatmul(
                    self.handle,
                    self.desc,
                    ctypes.byref(self.alpha),
                    a.data_ptr(),
                    la,
                    b.data_ptr(),
                    lb,
                    ctypes.byref(self.beta),
                    d.data_ptr(),
                    ld,
                    d.data_ptr(),
                    ld,
                    ctypes.byref(algo),
                    self.workspace.data_ptr(),
                    WORKSPACE,
                    stream,
                ),
                "matmul",
            )

        return run


def case(lib, handle, op: str, m: int, k: int, n: int, seconds: float) -> dict:
    dt = torch.bfloat16
    w = torch.randn(n, k, device="cuda", dtype=dt) * 0.02
    if op == "fwd":  # y[m, n] = x @ W^T: column-major y^T = W^T(T) x^T
        inp = torch.randn(m, k, device="cuda", dtype=dt)
        out = torch.empty(m, n, device="cuda", dtype=dt)
        gemm = LtGemm(lib, handle, OP_T, OP_N, n, m, k, k, n, k, m)
        ref_fn = lambda: torch.mm(inp, w.t(), out=out)  # noqa: E731
    else:  # dx[m, k] = dY @ W: column-major dX^T = W^T dY^T
        inp = torch.randn(m, n, device="cuda", dtype=dt)
        out = torch.empty(m, k, device="cuda", dtype=dt)
        gemm = LtGemm(lib, handle, OP_N, OP_N, k, m, n, k, n, n, m)
        ref_fn = lambda: torch.mm(inp, w, out=out)  # noqa: E731
    ref_fn()
    ref = out.clone()
    scale = ref.abs().max().item()
    row: dict = {"op": op, "M": m, "K": k, "N": n, "candidates": len(gemm.candidates)}
    row["torch_ms"] = bench(ref_fn, warmup=2, rep=10, lead_ms=3.0)
    row["torch_kernels"] = kernel_names(ref_fn)
    timed = []
    for i in range(len(gemm.candidates)):
        fn = gemm.launcher(i, w, inp, out)
        out.fill_(float("nan"))
        fn()
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
    lib = load_cublaslt()
    handle = ctypes.c_void_p()
    check(lib.cublasLtCreate(ctypes.byref(handle)), "cublasLtCreate")
    rows = []
    for op in args.ops.split(","):
        for k, n in SHAPES:
            rows.append(case(lib, handle, op, args.m, k, n, args.seconds))
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
