"""Probe: dX's GEMM told to target fewer SMs (cuBLASLt's SM count target), with the one-pass LoRA
gradient kernel beside it on a second stream (the layer backward's order: the GEMM first, the
kernel's clusters on the SMs the GEMM leaves).

cuBLAS' GEMM at M = 8192, K = N = 4096 is one persistent wave of CTAs over 1024 tiles: on 132 SMs
32 of them get a tile less, so the kernel starts only in the GEMM's last tile-time, on those 32
SMs, and most of it runs after the GEMM. A GEMM targeting T SMs leaves 132 - T SMs free and a
different last tile-time. For each target: every candidate cuBLASLt offers (no workspace; each
output checked against torch.mm), timed alone and as the pair, behind a device sleep (device
time, medians), rounds alternating all contenders; PyTorch's torch.mm alone and beside the kernel
as the reference. The best pair's timeline (torch.profiler) shows where the kernel ran.

    python bench/probes/dx_sm_target.py --out bench/results/dx_sm_target_probe.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from harness import bench, env_info, is_device_sleep, require_cuda, shape_list, write_json
from hoptune import _lib
from hoptune.ops import gemm
from hoptune.ops import nf4_lora as L


def _lead(e) -> bool:
    """The device sleep queued before each profiled call (harness.is_device_sleep: a filter on
    "sleep" alone kept torch's spin_kernel, so no step matched the expected count and the timelines
    came back empty), or any event longer than 1 ms."""
    return is_device_sleep(e.name, e.time_range.end - e.time_range.start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="JSON file to write")
    ap.add_argument("--shapes", default="4096x4096", help="comma-separated KxN (K = N)")
    ap.add_argument("--targets", default="0,128,124,120,116,112,108", help="SM count targets (0: all)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--candidates", type=int, default=8)
    args = ap.parse_args()
    shapes = shape_list(ap, "--shapes", args.shapes)
    targets = [int(t) for t in args.targets.split(",")]
    require_cuda(__file__)
    ext, why = gemm._cublaslt()
    if ext is None or not hasattr(ext.CublasLtPlan, "set_sm_count"):
        sys.exit(f"cuBLASLt plans with an SM count target are not available here: {why}")
    m, dev, rows = 8192, "cuda", []
    main_s, side = torch.cuda.current_stream(), torch.cuda.Stream()
    for k, n in shapes:
        torch.manual_seed(0)
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        g = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        a = torch.randn(16, k, device=dev, dtype=torch.bfloat16) * 0.02
        b = torch.randn(n, 16, device=dev, dtype=torch.bfloat16) * 0.02
        assert L._grads_run(x, g, a, b), "the one-pass kernel does not take this shape"
        bufs = L._grads_buffers(x, g, a, b)
        out = torch.empty(m, k, device=dev, dtype=torch.bfloat16)
        ref = torch.mm(g, w)
        scale = ref.float().abs().max().item()
        handle, code = ext.cublaslt_handle(), _lib.DTYPE_CODES[torch.bfloat16]

        def kernel():
            L._grads_launch(x, g, bufs, 0.5, side.cuda_stream)

        def pair(run_gemm):
            def f():
                side.wait_stream(main_s)
                run_gemm()
                with torch.cuda.stream(side):
                    kernel()
                main_s.wait_stream(side)

            return f

        contenders = {"torch": lambda: torch.mm(g, w, out=out)}
        plans = {}
        for t in targets:
            plan = ext.CublasLtPlan(handle, False, False, k, m, n, code)
            plan.set_sm_count(t)
            plans[t] = plan
            for i in range(plan.search(args.candidates, 0)):

                def run(plan=plan, i=i):
                    plan.run(i, w.data_ptr(), g.data_ptr(), out.data_ptr(), 0.0, 0, 0, main_s.cuda_stream)

                out.fill_(float("nan"))
                try:
                    run()
                except RuntimeError:
                    continue
                err = (out.float() - ref.float()).abs().max().item() / scale
                if err < 1e-2:
                    contenders[f"t{t}_c{i}"] = run
        times = {name: {"alone": [], "pair": []} for name in contenders}
        for _ in range(args.rounds):
            for name, fn in contenders.items():
                times[name]["alone"].append(bench(fn, 2, 10, 3.0) * 1e3)
                times[name]["pair"].append(bench(pair(fn), 2, 10, 3.0) * 1e3)
        serial = []
        for _ in range(args.rounds):

            def ser():
                contenders["torch"]()
                L._grads_launch(x, g, bufs, 0.5, main_s.cuda_stream)

            serial.append(bench(ser, 2, 10, 3.0) * 1e3)
        res = []
        for name, t in times.items():
            row = {"K": k, "N": n, "contender": name}
            if name != "torch":
                tt, i = name[1:].split("_c")
                row["target"], row["candidate"] = int(tt), int(i)
                row["config"] = list(plans[int(tt)].describe(int(i)))
            row["alone_us"] = statistics.median(t["alone"])
            row["pair_us"] = statistics.median(t["pair"])
            res.append(row)
        best = min(res, key=lambda r: r["pair_us"])
        torch_row = next(r for r in res if r["contender"] == "torch")
        # timelines: PyTorch's GEMM and the best pair's
        lines = {}
        for name in ("torch", best["contender"]):
            fn = pair(contenders[name])
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    torch.cuda._sleep(6_000_000)
                    fn()
                torch.cuda.synchronize()
            ev = sorted(
                (e for e in prof.events() if e.device_type.name == "CUDA" and not _lead(e)),
                key=lambda e: e.time_range.start,
            )
            gem = [e for e in ev if "lora_grads" not in e.name and "emset" not in e.name]
            ker = [e for e in ev if "lora_grads_kernel" in e.name]
            fin = [e for e in ev if "lora_grads_finish" in e.name]
            if len(gem) == len(ker) == len(fin) == 5:
                lines[name] = {
                    "gemm_us": statistics.median(e.time_range.end - e.time_range.start for e in gem),
                    "kernel_us": statistics.median(e.time_range.end - e.time_range.start for e in ker),
                    "kernel_start_minus_gemm_end_us": statistics.median(
                        ker[i].time_range.start - gem[i].time_range.end for i in range(5)
                    ),
                    "finish_end_minus_gemm_end_us": statistics.median(
                        fin[i].time_range.end - gem[i].time_range.end for i in range(5)
                    ),
                    "gemm_kernel": gem[0].name[:90],
                }
        summary = {
            "K": k,
            "N": n,
            "serial_us": statistics.median(serial),
            "torch_alone_us": torch_row["alone_us"],
            "torch_pair_us": torch_row["pair_us"],
            "best": best["contender"],
            "best_pair_us": best["pair_us"],
            "best_alone_us": best["alone_us"],
            "timelines": lines,
        }
        for t in targets:
            rs = [r for r in res if r.get("target") == t]
            if rs:
                bp = min(rs, key=lambda r: r["pair_us"])
                summary[f"t{t}"] = {
                    "best_pair_us": bp["pair_us"],
                    "its_alone_us": bp["alone_us"],
                    "best_alone_us": min(r["alone_us"] for r in rs),
                    "candidate": bp["candidate"],
                    "config": bp["config"],
                }
        rows.append({"summary": summary, "rows": res})
        for r in res:
            print(
                f"K={k} {r['contender']:>10} alone {r['alone_us']:7.1f} pair {r['pair_us']:7.1f}  {r.get('config', '')}",
                flush=True,
            )
        for key, v in summary.items():
            print(f"  {key}: {v}", flush=True)
    if args.out:
        write_json(args.out, {"command": " ".join(sys.argv), "env": env_info(), "shapes": rows})


if __name__ == "__main__":
    main()
