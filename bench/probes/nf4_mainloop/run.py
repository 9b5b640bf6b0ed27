"""NF4 mainloop probes against torch bf16 x @ W^T on the same data, in one process.

    bash bench/probes/nf4_mainloop/build.sh BUILD
    python bench/probes/nf4_mainloop/run.py --build BUILD --out bench/results/nf4_mainloop_probe.json

Per variant (each BUILD/<name>.so):
- check: max |y - fp32 reference| over 256 rows against the same for PyTorch's bf16 GEMM,
  on four shapes (a partial last token tile, N = 384, K = 320 among them), y poisoned with NaN
  first; above 2x PyTorch's error (or any NaN) the run stops with an error after writing the
  JSON; variants named *skeleton* or *fake* compute wrong results by construction and are
  only timed;
- timing at M = 8192 on the five forward shapes: CUDA-event medians of 10-call windows, the
  contenders interleaved over 7 rounds;
- sustained: 4096 x 14336 run back to back for 1.2 s each (two rounds), with the SM clock and
  board power sampled by nvidia-smi every 50 ms: TFLOP/s, clock, power and FLOP per clock per
  SM (the H200 runs these GEMMs at its power cap, so the clock differs between kernels).

--checks-only runs the two small checks (for compute-sanitizer); --once only calls each variant
three times at 4096 x 14336 (for ncu).
"""

import argparse
import ctypes
import datetime
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
       -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
       0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
       0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]  # fmt: skip
M = 8192
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672)]  # (K, N)
CHECKS = [(1000, 384, 320), (300, 1024, 2048), (8192, 4096, 4096), (8192, 14336, 4096)]
dev = torch.device("cuda")


def timing_only(name: str) -> bool:
    return "skeleton" in name or "fake" in name


def make(m: int, n: int, k: int, seed: int = 0):
    """x, the NF4 codes [N, K / 2], the fp32 absmax transposed [K / 64, N], W dequantized."""
    g = torch.Generator(device=dev).manual_seed(seed)
    lut = torch.tensor(NF4, dtype=torch.float32, device=dev)
    x = torch.randn(m, k, device=dev, generator=g).to(torch.bfloat16)
    codes = torch.randint(0, 256, (n, k // 2), device=dev, dtype=torch.uint8, generator=g)
    absmax = torch.rand(n, k // 64, device=dev, generator=g) * 0.04 + 0.01
    idx = torch.stack([(codes >> 4).long(), (codes & 15).long()], dim=-1).reshape(n, k)
    w = (lut[idx] * absmax.repeat_interleave(64, dim=1)).to(torch.bfloat16)
    return x, codes, absmax.t().contiguous(), w


class Probe:
    def __init__(self, path: str):
        self.lib = ctypes.CDLL(path)
        self.lut = torch.tensor(NF4, dtype=torch.float32, device=dev)

    def __call__(self, x, codes, scales_t, y) -> None:
        m, k = x.shape
        n = codes.shape[0]
        p = ctypes.c_void_p
        rc = self.lib.probe_run(p(x.data_ptr()), p(codes.data_ptr()), p(scales_t.data_ptr()),
                                p(self.lut.data_ptr()), p(y.data_ptr()), m, n, k,
                                p(torch.cuda.current_stream().cuda_stream))  # fmt: skip
        if rc:
            raise RuntimeError(f"probe_run returned {rc}")


def check(probe: Probe, m: int, n: int, k: int) -> dict:
    x, codes, scales_t, w = make(m, n, k, seed=m + n + k)
    y = torch.full((m, n), float("nan"), device=dev, dtype=torch.bfloat16)
    probe(x, codes, scales_t, y)
    torch.cuda.synchronize()
    rows = torch.cat([torch.arange(0, min(m, 192)), torch.arange(max(0, m - 64), m)]).to(dev)
    ref = x[rows].float() @ w.float().t()
    ours = (y[rows].float() - ref).abs().max().item()
    torch_err = ((x[rows] @ w.t()).float() - ref).abs().max().item()
    return {"m": m, "n": n, "k": k, "err": ours, "err_torch_bf16": torch_err,
            "err_ratio": ours / max(torch_err, 1e-30), "nan": bool(torch.isnan(y).any())}  # fmt: skip


def window_us(fn, reps: int = 10) -> float:
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(reps):
        fn()
    e.record()
    e.synchronize()
    return s.elapsed_time(e) * 1000 / reps


def contenders(probes: dict, x, codes, scales_t, w, y) -> dict:
    fns = {"torch": lambda: torch.mm(x, w.t(), out=y)}
    for name, probe in probes.items():
        fns[name] = lambda probe=probe: probe(x, codes, scales_t, y)
    return fns


def sustained(probes: dict, seconds: float) -> list:
    samples = []
    proc = subprocess.Popen(
        ["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
         "-lms", "50"], stdout=subprocess.PIPE, text=True)  # fmt: skip

    def reader():
        for line in proc.stdout:
            try:
                c, p = (float(v) for v in line.split(","))
            except ValueError:
                continue
            samples.append((time.time(), c, p))

    threading.Thread(target=reader, daemon=True).start()
    k, n = 4096, 14336
    x, codes, scales_t, w = make(M, n, k)
    y = torch.empty(M, n, device=dev, dtype=torch.bfloat16)
    fns = contenders(probes, x, codes, scales_t, w, y)
    rows = []
    for rnd in range(2):
        for name, fn in fns.items():
            torch.cuda.synchronize()
            t0 = time.time()
            us = []
            while time.time() - t0 < seconds:
                us.append(window_us(fn, 20))
            t1 = time.time()
            win = [(c, p) for t, c, p in samples if t0 + 0.4 < t < t1]
            med = statistics.median(us[2:])
            row = {"name": name, "round": rnd, "us": med, "tflops": 2 * M * n * k / med / 1e6}
            if win:
                row["clock_mhz"] = statistics.mean(c for c, _ in win)
                row["power_w"] = statistics.mean(p for _, p in win)
                row["flop_per_clock_per_sm"] = (
                    row["tflops"] * 1e12 / (row["clock_mhz"] * 1e6)
                    / torch.cuda.get_device_properties(0).multi_processor_count)  # fmt: skip
            rows.append(row)
            print("sustained", json.dumps(row), flush=True)
    proc.terminate()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", required=True, help="folder of the variants' .so files")
    ap.add_argument("--variants", default="", help="comma-separated names (default: all)")
    ap.add_argument("--out", default="")
    ap.add_argument("--sustain-s", type=float, default=1.2)
    ap.add_argument("--checks-only", action="store_true", help="the two small checks only (for a sanitizer)")
    ap.add_argument(
        "--once",
        action="store_true",
        help="only run each variant three times at 4096 x 14336 (for a profiler), no JSON",
    )
    args = ap.parse_args()
    if not args.once and not args.out:
        ap.error("--out is required (unless --once)")
    names = args.variants.split(",") if args.variants else sorted(
        f[:-3] for f in os.listdir(args.build) if f.endswith(".so"))  # fmt: skip
    probes = {nm: Probe(os.path.join(args.build, nm + ".so")) for nm in names}
    if args.once:
        x, codes, scales_t, _ = make(M, 14336, 4096)
        y = torch.empty(M, 14336, device=dev, dtype=torch.bfloat16)
        for probe in probes.values():
            for _ in range(3):
                probe(x, codes, scales_t, y)
        torch.cuda.synchronize()
        return
    nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
    out = {
        "command": " ".join([sys.executable, *sys.argv]),
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "nvcc": nvcc.strip().splitlines()[-1] if nvcc else None,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "m": M,
        "checks": [],
        "timing": [],
    }
    for name, probe in probes.items():
        if timing_only(name):
            continue
        for m, n, k in CHECKS[:2] if args.checks_only else CHECKS:
            r = check(probe, m, n, k) | {"variant": name}
            out["checks"].append(r)
            print("check", json.dumps(r), flush=True)
    bad = [c for c in out["checks"] if c["nan"] or not c["err_ratio"] <= 2.0]
    if bad or args.checks_only:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
        if bad:
            sys.exit(f"FAILED: {len(bad)} checks above 2x PyTorch's bf16 error (or NaN): {bad}")
        return
    for k, n in SHAPES:
        x, codes, scales_t, w = make(M, n, k)
        y = torch.empty(M, n, device=dev, dtype=torch.bfloat16)
        fns = contenders(probes, x, codes, scales_t, w, y)
        for fn in fns.values():
            fn()
        times = {nm: [] for nm in fns}
        for _ in range(7):
            for nm, fn in fns.items():
                times[nm].append(window_us(fn))
        med = {nm: statistics.median(v) for nm, v in times.items()}
        row = {"k": k, "n": n, "us": med,
               "ratio_to_torch": {nm: med[nm] / med["torch"] for nm in med if nm != "torch"}}  # fmt: skip
        out["timing"].append(row)
        print("timing", json.dumps(row), flush=True)
    out["sustained"] = sustained(probes, args.sustain_s)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print("\n| variant | " + " | ".join(f"{k}x{n}" for k, n in SHAPES) + " | FLOP/clk/SM |")
    print("|---" * (len(SHAPES) + 2) + "|")
    for nm in ["torch", *names]:
        cells = ["1" if nm == "torch" else f"{t['ratio_to_torch'][nm]:.3f}" for t in out["timing"]]
        fpc = [s.get("flop_per_clock_per_sm", 0) for s in out["sustained"] if s["name"] == nm]
        print(f"| {nm} | " + " | ".join(cells) + f" | {statistics.mean(fpc):.0f} |")


if __name__ == "__main__":
    main()
