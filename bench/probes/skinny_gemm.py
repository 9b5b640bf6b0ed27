"""Probe: the QLoRA layer's two rank-r GEMMs over the tokens at M = 8192, r = 16.

The backward of ``nf4_lora_linear`` forms ``xa = s x A^T`` (M x r, a reduction over K) and
``dA = dxa^T x`` (r x K, a reduction over the M tokens) with PyTorch's GEMMs, which cuBLAS runs
with PyTorch's workspace (and, where its kernel asks for a few bytes of it, a memset and an idle
gap before the GEMM: ``forward_gap.py``). Each sequence runs behind a 3 ms device sleep under
torch.profiler (``forward_gap.timeline``: per-kernel durations, the gaps between them and the
CUDA-event time, "covered"): PyTorch's calls as the op makes them, then each of cuBLASLt's
heuristic candidates for the same problem, searched and run with each workspace limit of
``--workspaces`` (bytes), checked against PyTorch's result first.

    python bench/probes/skinny_gemm.py --out bench/results/skinny_gemm_probe.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from forward_gap import timeline

from harness import env_info, table, write_json
from hoptune import _lib
from hoptune.ops import gemm as gemm_ops
from hoptune.ops import nf4_lora as nf4_lora_ops

M, R = 8192, 16
KS = [4096, 8192]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/skinny_gemm_probe.json")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--workspaces", default=f"0,{gemm_ops.TORCH_WORKSPACE_BYTES}")
    ap.add_argument("--ks", default=",".join(map(str, KS)))
    ap.add_argument("--max-candidates", type=int, default=8)
    args = ap.parse_args()
    workspaces = [int(v) for v in args.workspaces.split(",")]
    ext, why = gemm_ops.cublaslt_extension()
    assert ext is not None, why
    torch.manual_seed(0)
    scale = 2.0
    rows, brief = [], []
    for k in (int(v) for v in args.ks.split(",")):
        x = torch.randn(M, k, device="cuda", dtype=torch.bfloat16)
        a = torch.randn(R, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        dxa = torch.randn(M, R, device="cuda", dtype=torch.bfloat16)
        xa = torch.empty(M, R, device="cuda", dtype=torch.bfloat16)
        da = torch.empty(R, k, device="cuda", dtype=torch.bfloat16)
        stream = _lib.stream(x)
        code = _lib.DTYPE_CODES[x.dtype]
        ws = torch.empty(max([*workspaces, 256]), dtype=torch.uint8, device="cuda")
        seqs = {
            "xa_torch": lambda: nf4_lora_ops._mm_scaled(x, a.t(), scale, True),
            "da_torch": lambda: dxa.t() @ x,
        }
        refs = {"xa": seqs["xa_torch"](), "da": seqs["da_torch"]()}
        # column-major views: xa^T (r x M) = A (K x r as stored, transposed) ^T x^T, alpha = s folded
        # into the reference check only (the plan runs alpha = 1); dA^T (K x r) = x^T (K x M) dxa
        problems = {
            "xa": (True, False, R, M, k, a, x, xa, scale),
            "da": (False, True, k, R, M, x, dxa, da, 1.0),
        }
        descs = {}
        for name, (ta, tb, m_, n_, k_, opa, opb, out, s) in problems.items():
            ref = refs[name].float() / s
            for wsb in workspaces:
                plan = ext.CublasLtPlan(ext.cublaslt_handle(), ta, tb, m_, n_, k_, code)
                count = plan.search(args.max_candidates, wsb)
                for i in range(count):
                    try:
                        out.fill_(float("nan"))
                        plan.run(
                            i, opa.data_ptr(), opb.data_ptr(), out.data_ptr(), 0.0, ws.data_ptr(), wsb, stream
                        )
                        torch.cuda.synchronize()
                    except RuntimeError:
                        continue
                    err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                    if not err < 1e-2:
                        continue
                    tag = f"{name}_ws{wsb}_cand{i}"
                    descs[tag] = [str(v) for v in plan.describe(i)]
                    seqs[tag] = lambda i=i, plan=plan, wsb=wsb, opa=opa, opb=opb, out=out: plan.run(
                        i, opa.data_ptr(), opb.data_ptr(), out.data_ptr(), 0.0, ws.data_ptr(), wsb, stream
                    )
        row = {"K": k, "candidates": descs}
        for name, fn in seqs.items():
            row[name] = timeline(fn, args.reps)
            v = row[name]
            print(k, name, v, flush=True)
            brief.append(
                {
                    "K": k,
                    "seq": name,
                    "covered_us": round(v["covered_us"], 1),
                    "dur_us": "/".join(f"{d:.1f}" for d in v["dur_us"]),
                    "gap_us": "/".join(f"{g:.2f}" for g in v["gap_us"]),
                    "span_us": round(v["span_us"], 1),
                    "kernel": v["kernels"][-1][:40],
                }
            )
        rows.append(row)
    print(table(brief, list(brief[0])))
    write_json(args.out, {"command": " ".join(sys.argv), "env": env_info(), "rows": rows, "brief": brief})


if __name__ == "__main__":
    main()
