"""Small calls of every CUDA kernel, for compute-sanitizer (memcheck, racecheck, initcheck):

compute-sanitizer --tool memcheck python bench/sanitize_kernels.py
"""

from __future__ import annotations

import torch

from hoptune.ops import decoder as decoder_ops
from hoptune.ops import logprob as logprob_ops
from hoptune.ops import nf4 as nf4_ops
from hoptune.quant import dequantize_nf4, quantize_nf4


def nf4() -> None:
    for shape, dtype in [((96, 200), torch.bfloat16), ((64, 64), torch.float16), ((130, 64), torch.float32)]:
        w = torch.randn(shape, device="cuda", dtype=dtype)
        for dq in (True, False):
            q = quantize_nf4(w, double_quant=dq)
            for out in (torch.bfloat16, torch.float16, torch.float32):
                dequantize_nf4(q, out)
    # every numbered dequantize version (bf16 out, nested absmax)
    q = quantize_nf4(torch.randn(333, 64, device="cuda", dtype=torch.bfloat16))
    for v in range(2):
        nf4_ops._DEQUANT_VARIANT = v
        dequantize_nf4(q)
    nf4_ops._DEQUANT_VARIANT = 0


def logprob() -> None:
    """token_logprobs (every backward version) and the vocab-chunked fused path; every call also
    runs the label-stats kernel (the labels' check and the valid-row count)."""
    from hoptune.ops import fused_linear_logprobs, token_logprobs

    for v, dtype in [(1000, torch.bfloat16), (333, torch.float32), (32001, torch.float16)]:
        z = torch.randn(3, 5, v, device="cuda", dtype=dtype, requires_grad=True)
        y = torch.randint(0, v, (3, 5), device="cuda")
        y[0, 0] = -100
        for bwd in logprob_ops._BWD_VARIANTS:
            logprob_ops._BWD_VARIANT = bwd
            lp, ent = token_logprobs(z[:, 1:], y[:, 1:], temperature=0.8, return_entropy=True)
            (lp.sum() + ent.sum()).backward()
        logprob_ops._BWD_VARIANT = 0
        for fwd in logprob_ops._FWD_VARIANTS[1:]:
            logprob_ops._FWD_VARIANT = fwd
            token_logprobs(z[:, 1:], y[:, 1:], temperature=0.8, return_entropy=True)
        logprob_ops._FWD_VARIANT = 0
        h = torch.randn(13, 64, device="cuda", dtype=torch.bfloat16 if dtype != torch.float32 else dtype)
        h.requires_grad_(True)
        w = torch.randn(v, 64, device="cuda", dtype=h.dtype, requires_grad=True)
        yy = torch.randint(0, v, (13,), device="cuda")
        yy[3] = -100
        for cols in (8192, 96, 101):  # vocab chunks: one, several (vector path), several (scalar)
            logprob_ops.VCHUNK_COLS = cols
            fused_linear_logprobs(h, w, yy, softcap=10.0, chunk_rows=5).sum().backward()
        logprob_ops.VCHUNK_COLS = 8192


def logprob_gemm() -> None:
    """The fused lm_head GEMM and the kernels around it: one chunk, several (and a 1-7 column
    tail), row blocks of 16; with an ignored row (index-selected blocks) and without (slices, 41
    rows: a last block not a multiple of 4)."""
    from hoptune.ops import fused_linear_logprobs

    for v, ignored in ((1000, True), (1003, True), (1003, False)):
        h = torch.randn(41, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(v, 64, device="cuda", dtype=torch.bfloat16) * 0.1
        yy = torch.randint(0, v, (41,), device="cuda")
        if ignored:
            yy[3] = -100
        for cols, rows in ((32768, 0), (96, 16)):
            logprob_ops.GEMM_COLS = cols
            fused_linear_logprobs(h, w, yy, chunk_rows=rows).sum().backward()
        logprob_ops.GEMM_COLS = 32768


def nf4_lora() -> None:
    from hoptune.ops import nf4_lora_linear

    q = quantize_nf4(torch.randn(200, 192, device="cuda", dtype=torch.bfloat16))
    x = torch.randn(7, 192, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    a = torch.randn(8, 192, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(200, 8, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    nf4_lora_linear(x, q, a, b, 0.5).sum().backward()
    # the LoRA-merged dequantize: odd rank, largest rank, ranks in registers, runs of items per CTA
    cases = [
        (False, 17, 197, 320, torch.float16),
        (True, 256, 197, 320, torch.float16),
        (True, 16, 2000, 1088, torch.bfloat16),
        (False, 32, 2000, 1088, torch.bfloat16),
        (True, 16, 300, 512, torch.float16),
        (True, 64, 197, 320, torch.bfloat16),
        (False, 40, 300, 512, torch.float16),
        (True, 128, 197, 320, torch.bfloat16),
        (False, 72, 2000, 1088, torch.float16),
        (True, 8, 300, 512, torch.bfloat16),
        (True, 24, 300, 512, torch.float16),
        (False, 36, 300, 512, torch.bfloat16),
    ]
    for dq, r, n, k, dt in cases:
        q = quantize_nf4(torch.randn(n, k, device="cuda", dtype=dt), double_quant=dq)
        a = torch.randn(r, k, device="cuda", dtype=dt)
        b = torch.randn(n, r, device="cuda", dtype=dt)
        # every numbered version (at ranks 8-32, multiples of 8: 0 bulk tensor stores, 1 the lanes')
        for v in range(2):
            nf4_ops._MERGE_VARIANT = v
            nf4_ops.nf4_dequantize_lora(
                q.packed, q.absmax, q.absmax2, q.code2, q.offset, q.blocksize, q.blocksize2, [n, k], a, b, 0.5
            )
        nf4_ops._MERGE_VARIANT = 0
    # the small-M product from the codes (nf4_small_m): each of its row tilings, sliced columns
    # (partial sums through the workspace; twice, so the second launch finds the counters reset)
    # and one slice, N not a multiple of 16, K not a multiple of the 128-column step
    for m, dq, r, n, k, dt, ctas in [
        (1, True, 8, 197, 320, torch.bfloat16, None),
        (12, False, 0, 60, 4160, torch.float16, None),
        (32, True, 256, 33, 1088, torch.bfloat16, 1e-6),
        (7, False, 16, 300, 1024, torch.float16, 1e-6),
    ]:
        q = quantize_nf4(torch.randn(n, k, device="cuda", dtype=dt), double_quant=dq)
        x = torch.randn(m, k + 8, device="cuda", dtype=dt)[:, 8:]
        a = torch.randn(r, k, device="cuda", dtype=dt) if r else None
        b = torch.randn(n, r, device="cuda", dtype=dt) if r else None
        bias = torch.randn(n, device="cuda", dtype=dt) if r != 16 else None
        saved = (nf4_ops.SMALL_M_MAX_SMALL_WEIGHT, nf4_ops.SMALL_M_CTAS_PER_SM)
        nf4_ops.SMALL_M_MAX_SMALL_WEIGHT = 32  # (every row count the kernel takes)
        if ctas is not None:
            nf4_ops.SMALL_M_CTAS_PER_SM = ctas
        with torch.no_grad():
            for _ in range(2):
                nf4_lora_linear(x, q, a, b, 0.5, bias)
        nf4_ops.SMALL_M_MAX_SMALL_WEIGHT, nf4_ops.SMALL_M_CTAS_PER_SM = saved
    # the one-pass dY kernel of the backward: every rank, a row tail, strided dY, one chunk
    from hoptune.ops import nf4_lora as nf4_lora_ops

    for m, n, r, dt in [
        (1, 64, 8, torch.bfloat16),
        (77, 320, 16, torch.float16),
        (300, 192, 32, torch.bfloat16),
    ]:
        dy = torch.randn(m, n + 8, device="cuda", dtype=dt)[:, :n]
        nf4_lora_ops.dy_pass_kernel(
            dy, torch.randn(n, r, device="cuda", dtype=dt), torch.randn(m, r, device="cuda", dtype=dt), 0.5
        )
    dy = torch.randn(130, 128, device="cuda", dtype=torch.float16)
    nf4_lora_ops.dy_pass_kernel(
        dy,
        torch.randn(128, 64, device="cuda", dtype=torch.float16),
        torch.randn(130, 64, device="cuda", dtype=torch.float16),
        2.0,
    )
    # the one-pass LoRA gradients (a cluster kernel): clusters of 2 and 8, row tails, strided rows
    for m, k, dt in [(33, 1024, torch.bfloat16), (200, 4096, torch.float16)]:
        x = torch.randn(m, k + 8, device="cuda", dtype=dt)[:, :k]
        dy = torch.randn(m, k + 8, device="cuda", dtype=dt)[:, :k]
        nf4_lora_ops.grads_kernel(
            x,
            dy,
            torch.randn(16, k, device="cuda", dtype=dt),
            torch.randn(k, 16, device="cuda", dtype=dt),
            0.5,
        )
    # and inside the layer's backward, on the second stream beside dX's GEMM (M = 700, K = N = 1024:
    # dX from the merged weight)
    assert nf4_lora_ops.GRADS_BESIDE_DX
    q = quantize_nf4(torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16))
    x = torch.randn(700, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    a = torch.randn(16, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(1024, 16, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    nf4_lora_linear(x, q, a, b, 0.5).backward(torch.randn(700, 1024, device="cuda", dtype=torch.bfloat16))
    torch.cuda.synchronize()


def nf4_gemm() -> None:
    """The fused GEMM (nf4_lora_gemm): every token tile (64, 128, 192, 256), row and token tails, a strided x, LoRA
    ranks 0 / 2 / 64, bias or none, block sizes 64 and 128, nested and plain absmax, each tile's
    K range whole, split in 3 or 5 (partial sums in the scratch) and stream-K (0)."""
    for m, dq, r, n, k, bs, tile, splits in [
        (37, True, 2, 200, 320, 64, 128, 1),
        (300, False, 64, 136, 1088, 64, 256, 1),
        (129, True, 0, 392, 512, 128, 128, 1),
        (513, False, 16, 264, 256, 64, 256, 1),
        (37, False, 16, 200, 320, 64, 128, 5),
        (300, True, 8, 392, 1088, 64, 256, 3),
        (129, False, 64, 136, 4096, 128, 128, 0),
        (37, True, 16, 200, 320, 64, 64, 1),
        (129, False, 8, 392, 1088, 64, 64, 3),
        (385, True, 16, 264, 1088, 64, 192, 1),
        (200, False, 8, 392, 4096, 64, 192, 0),
        (544, True, 16, 264, 1088, 64, 192, 0),
        (720, False, 8, 392, 512, 64, 256, 0),
    ]:
        q = quantize_nf4(
            torch.randn(n, k, device="cuda", dtype=torch.bfloat16), blocksize=bs, double_quant=dq
        )
        qa = (q.packed, q.absmax, q.absmax2, q.code2, q.offset, q.blocksize, q.blocksize2)
        x = torch.randn(m, k + 8, device="cuda", dtype=torch.bfloat16)[:, 8:]
        xs = torch.randn(m, r, device="cuda", dtype=torch.bfloat16) if r else None
        b = torch.randn(n, r, device="cuda", dtype=torch.bfloat16) if r else None
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) if r != 16 else None
        nf4_ops.fused_gemm_kernel(x, *qa, n, xs, b, bias, tile_n=tile, splits=splits)


def decoder() -> None:
    """rms_norm (warp rows, block rows, rows past the register cache), silu_mul (with a tail),
    rope (a transposed view, a broadcast table), forward and backward."""
    for rows, cols in [(5, 64), (3, 1032), (2, 4104 + 64)]:
        x = torch.randn(rows, cols + 8, device="cuda", dtype=torch.bfloat16)[:, :cols].requires_grad_(True)
        w = torch.randn(cols, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
        decoder_ops.rms_norm(x, w).sum().backward()
    g = torch.randn(3, 333, device="cuda", dtype=torch.float16).requires_grad_(True)
    u = torch.randn(3, 333, device="cuda", dtype=torch.float16).requires_grad_(True)
    decoder_ops.silu_mul(g, u).sum().backward()
    q = torch.randn(2, 5, 3 * 64, device="cuda", dtype=torch.bfloat16).view(2, 5, 3, 64).transpose(1, 2)
    q.requires_grad_(True)
    cos, sin = (torch.randn(1, 5, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    decoder_ops.rope(q, cos, sin).sum().backward()


def probe_cublas() -> None:
    """Not a hoptune kernel: PyTorch reading an fp32-output cuBLAS GEMM's result. If initcheck
    flags this, its reports on kernels that read GEMM outputs (the fused log-prob chunk) come from
    the tool not seeing cuBLAS' (bulk-copy) stores, not from uninitialised memory."""
    a = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16)
    c = torch.mm(a, b, out_dtype=torch.float32)
    print("probe sum", float(c.sum()))


CASES = {
    "nf4": nf4,
    "logprob": logprob,
    "logprob_gemm": logprob_gemm,
    "nf4_lora": nf4_lora,
    "nf4_gemm": nf4_gemm,
    "decoder": decoder,
    "probe_cublas": probe_cublas,
}


def main() -> None:
    import argparse

    from hoptune import _lib

    ap = argparse.ArgumentParser(description="Small calls of every CUDA kernel, for compute-sanitizer.")
    ap.add_argument("cases", nargs="*", help=f"any of {', '.join(CASES)} (default: all but probe_*)")
    args = ap.parse_args()
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case {', '.join(unknown)}; the cases are {', '.join(CASES)}")
    cases = args.cases or [c for c in CASES if not c.startswith("probe")]
    # without the kernels every op runs its PyTorch reference, and the sanitizer finds nothing to report
    reason = _lib.unavailable_reason()
    if reason is not None and not all(c.startswith("probe") for c in cases):
        ap.error(f"hoptune's CUDA kernels cannot run here ({reason}): there is nothing to sanitize")
    for name in cases:
        CASES[name]()
        torch.cuda.synchronize()
        print("ok", name)


if __name__ == "__main__":
    main()
