"""Probe: the QLoRA forward at M = 8192 with the merged dequantize and the GEMM in row chunks of
the weight, the chunks' merged weight written into one reused scratch (so it may stay in L2
between the dequantize and the GEMM that reads it), against the frozen bf16 x @ W^T.

Device time (each call behind a device sleep), ratios against torch bf16 in the same rounds.
The chunk GEMMs write separate contiguous outputs (same FLOPs and bytes as column blocks of y):
a timing proxy, not a layer.

    python bench/probes/chunked_forward.py --out bench/results/chunked_forward_probe.json
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from harness import env_info, ratio_interleaved, table, write_json
from hoptune import _lib
from hoptune.ops import nf4 as nf4_ops
from hoptune.ops import nf4_lora_linear
from hoptune.quant import quantize_nf4

M, R = 8192, 16
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (K, N)


def chunked(x, q, a, b, scale, n, k, chunks, reuse, plain=False):
    ext = _lib.extension()
    nc = n // chunks
    bytes_row = k // 2
    blocks_row = k // q.blocksize
    stream = _lib.stream(x)
    scratches = [torch.empty(nc, k, dtype=x.dtype, device=x.device) for _ in range(1 if reuse else chunks)]
    outs = [torch.empty(x.shape[0], nc, dtype=x.dtype, device=x.device) for _ in range(chunks)]
    packed = q.packed
    absmax = q.absmax
    absmax2 = q.absmax2
    per2 = blocks_row * nc // q.blocksize2

    def run():
        for c in range(chunks):
            w = scratches[0 if reuse else c]
            pk = packed.data_ptr() + c * nc * bytes_row
            am = absmax.data_ptr() + c * nc * blocks_row  # uint8 codes (nested)
            am2 = absmax2.data_ptr() + c * per2 * 4
            if plain:
                ext.nf4_dequantize(
                    pk,
                    0,
                    am,
                    am2,
                    q.code2.data_ptr(),
                    float(q.offset),
                    q.blocksize2,
                    nc * k,
                    q.blocksize,
                    w.data_ptr(),
                    _lib.DTYPE_CODES[x.dtype],
                    stream,
                    nf4_ops._DEQUANT_VARIANT,
                )
            else:
                ext.nf4_dequantize_lora(
                    pk,
                    0,
                    am,
                    am2,
                    q.code2.data_ptr(),
                    float(q.offset),
                    q.blocksize2,
                    nc,
                    k,
                    q.blocksize,
                    a.data_ptr(),
                    b.data_ptr() + c * nc * R * 2,
                    R,
                    float(scale),
                    w.data_ptr(),
                    _lib.DTYPE_CODES[x.dtype],
                    stream,
                )
            torch.mm(x, w.t(), out=outs[c])
        return outs

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/chunked_forward_probe.json")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for k, n in SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        q = quantize_nf4(w)
        x = torch.randn(M, k, device="cuda", dtype=torch.bfloat16)
        a = torch.randn(R, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        b = torch.randn(n, R, device="cuda", dtype=torch.bfloat16) * 0.01
        scale = 2.0

        def bf16():
            return torch.mm(x, w.t())

        def op():
            return nf4_lora_linear(x, q, a, b, scale)

        cases = {"op": op}
        for chunks in (1, 2, 4, 8):
            cases[f"merged_c{chunks}_reuse"] = chunked(x, q, a, b, scale, n, k, chunks, True)
        for chunks in (2, 4):
            cases[f"merged_c{chunks}_apart"] = chunked(x, q, a, b, scale, n, k, chunks, False)
        cases["plain_c1"] = chunked(x, q, a, b, scale, n, k, 1, True, plain=True)
        cases["plain_c4_reuse"] = chunked(x, q, a, b, scale, n, k, 4, True, plain=True)
        # correctness of the chunked merged weight against the unchunked one
        full = nf4_ops.dequantize_lora_kernel(
            q.packed, q.absmax, q.absmax2, q.code2, q.offset, q.blocksize, q.blocksize2, [n, k], a, b, scale
        )
        y_full = torch.mm(x, full.t())
        outs = cases["merged_c4_reuse"]()
        diff = (torch.cat(outs, dim=1) - y_full).abs().max().item()
        row = {"K": k, "N": n, "c4_max_abs_diff": diff}
        for name, fn in cases.items():
            row[name] = round(ratio_interleaved(fn, bf16, rounds=args.rounds, covered=True), 4)
        rows.append(row)
        print(row, flush=True)
    cols = ["K", "N", *[c for c in rows[0] if c not in ("K", "N")]]
    print(table(rows, cols))
    write_json(args.out, {"command": " ".join(sys.argv), "env": env_info(), "rows": rows})


if __name__ == "__main__":
    main()
