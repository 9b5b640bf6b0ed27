"""Small calls of every CUDA kernel, for compute-sanitizer (memcheck, racecheck, initcheck):

compute-sanitizer --tool memcheck python bench/sanitize_kernels.py
"""

from __future__ import annotations

import torch

from hoptune.quant import dequantize_nf4, quantize_nf4


def nf4() -> None:
    for shape, dtype in [((96, 200), torch.bfloat16), ((64, 64), torch.float16), ((130, 64), torch.float32)]:
        w = torch.randn(shape, device="cuda", dtype=dtype)
        for dq in (True, False):
            q = quantize_nf4(w, double_quant=dq)
            for out in (torch.bfloat16, torch.float16, torch.float32):
                dequantize_nf4(q, out)


CASES = {"nf4": nf4}


def main() -> None:
    import sys

    for name in sys.argv[1:] or list(CASES):
        CASES[name]()
        torch.cuda.synchronize()
        print("ok", name)


if __name__ == "__main__":
    main()
