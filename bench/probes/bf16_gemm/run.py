"""CUTLASS bf16 GEMM variants against PyTorch's GEMM (cuBLAS) on the QLoRA layer's big products.

    bash bench/probes/bf16_gemm/build.sh BUILD
    python bench/probes/bf16_gemm/run.py --build BUILD --out bench/results/bf16_gemm_probe.json

Variants are BUILD/<layout>_<tile>[_c<cluster>][_sk].so: `tn_*` compute y = x W^T (x [M, K],
W [N, K]) against `torch.mm(x, W.t())`, `nn_*` dX = dY W (dY [M, N], W [N, K]) against
`torch.mm(dY, W)`, at M = 8192 on the forward's five (K, N) and the layer's three.
- check: max |out - fp32 reference| over 256 rows against the same for PyTorch's GEMM, the
  output poisoned with NaN first; above 2x PyTorch's error (or NaN) the run exits with an error
  after writing the JSON;
- ratios (variant time / PyTorch's): "interleaved", each call timed from its launch after a
  sync, the two alternated over 7 rounds (median); "covered", the same with each call queued
  behind a 3 ms device sleep (bench/harness.py);
- sustained: the 4096 x 4096 forward and dX run back to back for --sustain-s seconds each, the SM
  clock and board power sampled by nvidia-smi (harness.sustained_clocks).
"""

import argparse
import ctypes
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import harness

M = 8192
FORWARD = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672)]  # (K, N)
LAYER = [(4096, 4096), (4096, 14336), (8192, 28672)]
dev = torch.device("cuda")


class Probe:
    def __init__(self, path: str):
        self.lib = ctypes.CDLL(path)

    def __call__(self, a, b, out, n: int, k: int) -> None:
        p = ctypes.c_void_p
        rc = self.lib.probe_run(p(a.data_ptr()), p(b.data_ptr()), p(out.data_ptr()),
                                a.shape[0], n, k, p(torch.cuda.current_stream().cuda_stream))  # fmt: skip
        if rc:
            raise RuntimeError(f"probe_run returned {rc}")


def operands(nn: bool, m: int, k_layer: int, n_layer: int, seed: int = 0):
    """(a, w, out, gemm n, gemm k, torch call) for the forward (tn) or the dX (nn) product."""
    g = torch.Generator(device=dev).manual_seed(seed)
    w = (torch.randn(n_layer, k_layer, device=dev, generator=g) * 0.02).to(torch.bfloat16)
    if nn:
        a = torch.randn(m, n_layer, device=dev, generator=g).to(torch.bfloat16)
        out = torch.empty(m, k_layer, device=dev, dtype=torch.bfloat16)
        return a, w, out, k_layer, n_layer, lambda: torch.mm(a, w, out=out)
    a = torch.randn(m, k_layer, device=dev, generator=g).to(torch.bfloat16)
    out = torch.empty(m, n_layer, device=dev, dtype=torch.bfloat16)
    return a, w, out, n_layer, k_layer, lambda: torch.mm(a, w.t(), out=out)


def check(probe: Probe, nn: bool, m: int, k_layer: int, n_layer: int) -> dict:
    a, w, out, n, k, torch_fn = operands(nn, m, k_layer, n_layer, seed=m + k_layer + n_layer)
    out.fill_(float("nan"))
    probe(a, w, out, n, k)
    torch.cuda.synchronize()
    rows = torch.cat([torch.arange(0, min(m, 192)), torch.arange(max(0, m - 64), m)]).to(dev)
    wf = w.float() if nn else w.float().t()
    ref = a[rows].float() @ wf
    ours = (out[rows].float() - ref).abs().max().item()
    nan = bool(torch.isnan(out).any())
    torch_fn()
    theirs = (out[rows].float() - ref).abs().max().item()
    return {"m": m, "k_layer": k_layer, "n_layer": n_layer, "err": ours, "err_torch": theirs,
            "err_ratio": ours / max(theirs, 1e-30), "nan": nan}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", required=True, help="folder of the variants' .so files")
    ap.add_argument("--variants", default="", help="comma-separated names (default: all)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--sustain-s", type=float, default=2.0)
    args = ap.parse_args()
    names = args.variants.split(",") if args.variants else sorted(
        f[:-3] for f in os.listdir(args.build) if f.endswith(".so"))  # fmt: skip
    probes = {nm: Probe(os.path.join(args.build, nm + ".so")) for nm in names}
    out = {"command": " ".join([sys.executable, *sys.argv]), "m": M, "env": harness.env_info(),
           "checks": [], "timing": [], "sustained": []}  # fmt: skip

    for name, probe in probes.items():
        nn = name.startswith("nn_")
        for m, k, n in [(1000, 320, 384), (8192, 4096, 4096), (8192, 4096, 14336)]:
            r = check(probe, nn, m, k, n) | {"variant": name}
            out["checks"].append(r)
            print("check", r, flush=True)
    bad = [c for c in out["checks"] if c["nan"] or not c["err_ratio"] <= 2.0]

    if not bad:
        for layout, shapes in (("tn", FORWARD), ("nn", LAYER)):
            mine = {nm: p for nm, p in probes.items() if nm.startswith(layout + "_")}
            for k, n in shapes:
                a, w, o, gn, gk, torch_fn = operands(layout == "nn", M, k, n)
                torch_ms = harness.bench(torch_fn, rep=10)
                for nm, p in mine.items():
                    fn = lambda p=p: p(a, w, o, gn, gk)  # noqa: E731
                    row = {"variant": nm, "k_layer": k, "n_layer": n, "torch_ms": torch_ms,
                           "interleaved": harness.ratio_interleaved(fn, torch_fn),
                           "covered": harness.ratio_interleaved(fn, torch_fn, covered=True)}  # fmt: skip
                    out["timing"].append(row)
                    print("timing", row, flush=True)
                del a, w, o
        for layout in ("tn", "nn"):
            a, w, o, gn, gk, torch_fn = operands(layout == "nn", M, 4096, 4096)
            cases = [(f"{layout}_torch", torch_fn, 2.0 * M * 4096 * 4096)]
            for nm, p in probes.items():
                if nm.startswith(layout + "_"):
                    cases.append((nm, lambda p=p: p(a, w, o, gn, gk), 2.0 * M * 4096 * 4096))
            rows = harness.sustained_clocks(cases, seconds=args.sustain_s)
            out["sustained"] += rows
            for r in rows:
                print("sustained", r, flush=True)

    harness.write_json(args.out, out)
    print(f"\n{'variant':18} {'K x N':>12} {'torch ms':>9} {'interl.':>8} {'covered':>8}")
    for r in out["timing"]:
        print(f"{r['variant']:18} {r['k_layer']:>5} x {r['n_layer']:<5} {r['torch_ms']:9.3f} "
              f"{r['interleaved']:8.3f} {r['covered']:8.3f}")  # fmt: skip
    for r in out["sustained"]:
        print(f"sustained {r['case']:18} {r.get('TFLOPs', 0):7.1f} TFLOP/s "
              f"{r.get('sm_clock_MHz', 0):6.0f} MHz {r.get('power_W', 0):5.0f} W "
              f"{r.get('flop_per_clock_per_sm', 0):7.0f} FLOP/clk/SM")  # fmt: skip
    if bad:
        sys.exit(f"FAILED: {len(bad)} checks above 2x PyTorch's error (or NaN): {bad}")


if __name__ == "__main__":
    main()
