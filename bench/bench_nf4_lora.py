"""NF4 + LoRA linear on the shapes of TARGETS.md §1-2, all anchors in the same run:

* forward y = x W^T + s (x A^T) B^T at M = 8192 (r = 16) against torch bf16 x @ W^T without LoRA,
  and bitsandbytes matmul_4bit; at small M (generation) also the device time of ours, of bf16 and
  of our merged dequantize + GEMM path (what runs above nf4.small_m_max rows);
* layer forward + backward (grads of x, A, B) at M = 8192 against the frozen bf16 dense layer,
  bf16 + LoRA, bitsandbytes + LoRA and PEFT QLoRA;
* both M = 8192 ratios twice: ratio_interleaved (each call timed alone, after a sync: the
  protocol of the anchors, host launch latency included) and ratio_covered (each call queued behind
  a device sleep: device time, as when the GPU is kept busy);
* where the big GEMMs' algorithm choice by measurement (hoptune.ops.gemm) accounts for part of
  the ratio: ratio_covered_untuned (ours with it off) and, for the forward,
  ratio_covered_vs_tuned_bf16 (against the bf16 x @ W^T through the same choice); the choices made
  are listed under ``gemm_choices``;
* where the one-pass gradient kernel runs (K == N): the layer with it run on the current stream
  before dX's weight and GEMM instead of on a second stream beside the GEMM
  (ratio_covered_serial_grads, ratio_interleaved_serial_grads,
  q_ours_serial_grads_over_bf16_frozen) and with the three passes it replaces
  (ratio_covered_three_passes, ratio_interleaved_three_passes);
* the backward's one-pass dY kernel (dxa and dB) against the two cuBLAS GEMMs it replaces, per
  rank (device time).
* the layer against bitsandbytes + LoRA head to head as well (both ratios), since the per-call
  times move with the board between measurements;
* ``rank_paths``: the LoRA product folded into the weight (merged) or applied to the activations,
  forced, against the default rule (nf4_lora.MERGED_MAX_RANK) at r = 64, 128 and 256.

    python bench/bench_nf4_lora.py --out bench/results/nf4_lora.json
    python bench/bench_nf4_lora.py --rank 64 --sections layer --out bench/results/nf4_lora_r64.json
    python bench/bench_nf4_lora.py --sections rank_paths --out bench/results/nf4_lora_rank_paths.json
    python bench/bench_nf4_lora.py --sections layer --layer-shapes 2048x2048 --out /tmp/layer_2048.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import sys
from unittest import mock

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (
    bench,
    bench_queued,
    device_ms,
    env_info,
    int_list,
    peak_extra_gib,
    ratio_interleaved,
    require_cuda,
    shape_list,
    table,
    write_json,
)
from hoptune.nn import LoRALinear
from hoptune.ops import gemm, nf4_lora_linear
from hoptune.ops import nf4 as nf4_ops
from hoptune.ops import nf4_lora as nf4_lora_ops
from hoptune.quant import quantize_nf4

FWD_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672)]  # (K, N)
LAYER_SHAPES = [(4096, 4096), (4096, 14336), (8192, 28672)]
R = 16
dev = "cuda"


class PlainLora(nn.Module):
    """The anchor's LoRA on a frozen base: y = base(x) + s * B(A(x))."""

    def __init__(self, base, k, n, r=None, alpha=32):
        super().__init__()
        r = R if r is None else r
        self.base = base
        self.A = nn.Parameter(torch.randn(r, k, device=dev, dtype=torch.bfloat16) / math.sqrt(k))
        self.B = nn.Parameter(torch.randn(n, r, device=dev, dtype=torch.bfloat16) * 0.01)
        self.s = alpha / r

    def forward(self, x):
        return self.base(x) + self.s * ((x @ self.A.t()) @ self.B.t())


def qlora_layer(dense: nn.Linear, **kw) -> LoRALinear:
    """hoptune's LoRALinear on an NF4 copy of ``dense`` (rank R, alpha 32, B non-zero)."""
    return LoRALinear(
        copy.deepcopy(dense),
        r=R,
        lora_alpha=32,
        quantize="nf4",
        adapter_dtype=torch.bfloat16,
        init_lora_weights=False,
        **kw,
    )


def layer_step(mod: nn.Module, x: torch.Tensor, g: torch.Tensor):
    """One layer training step: forward, backward with upstream gradient g, grads cleared first."""

    def f():
        x.grad = None
        for p in mod.parameters():
            p.grad = None
        mod(x).backward(g)

    return f


def bnb_linear(w):
    import bitsandbytes as bnb

    k, n = w.shape[1], w.shape[0]
    lin = bnb.nn.Linear4bit(
        k, n, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True, device=dev
    )
    lin.weight = bnb.nn.Params4bit(
        w.detach().cpu(), requires_grad=False, quant_type="nf4", compress_statistics=True, blocksize=64
    ).to(dev)
    return lin


def untuned(fn):
    """fn with the big GEMMs' measured algorithm choice turned off (PyTorch's GEMM)."""

    def run():
        previous = gemm.enable(False)
        try:
            return fn()
        finally:
            gemm.enable(previous)

    return run


def _flag_off(fn, name: str):
    """fn with the module flag nf4_lora.<name> off."""

    def run():
        previous = getattr(nf4_lora_ops, name)
        setattr(nf4_lora_ops, name, False)
        try:
            return fn()
        finally:
            setattr(nf4_lora_ops, name, previous)

    return run


def three_passes(fn):
    """fn with the backward's LoRA gradients from x A^T, the dY pass and dA (three passes, x read
    twice) instead of the one-pass kernel (nf4_lora.ONE_PASS_GRADS off)."""
    return _flag_off(fn, "ONE_PASS_GRADS")


def serial_grads(fn):
    """fn with the one-pass kernel run before dX's weight and GEMM on the current stream, not on a
    second stream beside the GEMM (nf4_lora.GRADS_BESIDE_DX off)."""
    return _flag_off(fn, "GRADS_BESIDE_DX")


def _forward_case(k: int, n: int):
    """A bf16 weight [n, k], its NF4 copy and rank-R LoRA factors (B non-zero)."""
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
    a = torch.randn(R, k, device=dev, dtype=torch.bfloat16) / math.sqrt(k)
    b = torch.randn(n, R, device=dev, dtype=torch.bfloat16) * 0.01
    return w, quantize_nf4(w), a, b


def forward_rows(have_bnb: bool) -> list[dict]:
    rows = []
    for k, n in FWD_SHAPES:
        w, q, a, b = _forward_case(k, n)
        if have_bnb:
            import bitsandbytes as bnb
            import bitsandbytes.functional as bnbf

            qb, st = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        for m in (1, 3, 8, 64, 8192):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            row = {"M": m, "K": k, "N": n}
            row["bf16_ms"] = bench(lambda: x @ w.t())
            row["ours_lora_ms"] = bench(lambda: nf4_lora_linear(x, q, a, b, 2.0))
            if m == 8192:  # the target's ratio, bf16 and ours measured back to back in rounds
                row["ratio_interleaved"] = ratio_interleaved(
                    lambda: nf4_lora_linear(x, q, a, b, 2.0), lambda: x @ w.t()
                )
                # the same with the host's launch work hidden behind a device sleep: device time
                row["ratio_covered"] = ratio_interleaved(
                    lambda: nf4_lora_linear(x, q, a, b, 2.0), lambda: x @ w.t(), covered=True
                )
                row["ratio_covered_untuned"] = ratio_interleaved(
                    untuned(lambda: nf4_lora_linear(x, q, a, b, 2.0)), lambda: x @ w.t(), covered=True
                )
                row["ratio_covered_vs_tuned_bf16"] = ratio_interleaved(
                    lambda: nf4_lora_linear(x, q, a, b, 2.0), lambda: gemm.linear(x, w), covered=True
                )
            # device time only (kernels summed, host time and launch gaps excluded)
            row["dev_bf16_ms"] = device_ms(lambda: x @ w.t())
            row["dev_ours_lora_ms"] = device_ms(lambda: nf4_lora_linear(x, q, a, b, 2.0))
            row["dev_ratio"] = row["dev_ours_lora_ms"] / row["dev_bf16_ms"]
            if m < 8192:  # small M: the codes-reading kernel (nf4.small_m_max) against the
                # merged dequantize + GEMM as well
                with _forced(0):
                    row["dev_ours_merged_path_ms"] = device_ms(lambda: nf4_lora_linear(x, q, a, b, 2.0))
            row["ours_base_ms"] = bench(lambda: nf4_lora_linear(x, q))
            row["ours_lora_over_bf16"] = row["ours_lora_ms"] / row["bf16_ms"]
            # back to back (host launch work hidden behind device work, as inside a model)
            row["q_bf16_ms"] = bench_queued(lambda: x @ w.t())
            row["q_ours_lora_ms"] = bench_queued(lambda: nf4_lora_linear(x, q, a, b, 2.0))
            row["q_ours_lora_over_bf16"] = row["q_ours_lora_ms"] / row["q_bf16_ms"]
            row["ours_base_over_bf16"] = row["ours_base_ms"] / row["bf16_ms"]
            if have_bnb:
                row["bnb_ms"] = bench(lambda: bnb.matmul_4bit(x, qb.t(), quant_state=st))
                row["bnb_over_bf16"] = row["bnb_ms"] / row["bf16_ms"]
            rows.append(row)
            print(row, flush=True)
        torch.cuda.empty_cache()
    return rows


SMALL_MS = (1, 2, 3, 4, 8, 12, 16, 24, 32, 48, 64)


def _forced(small_max: int, ctas_per_sm: float | None = None):
    """A context that makes the forward read the codes (nf4_small_m) up to small_max rows on every
    weight and take the merged dequantize + GEMM above (and ctas_per_sm for nf4_small_m): the fused
    NF4 GEMM, which the dispatch would pick above nf4.fused_small_m_max rows, is turned off."""
    import contextlib

    names = ("SMALL_M_MAX", "SMALL_M_MAX_SMALL_WEIGHT", "SMALL_M_CTAS_PER_SM", "fused_gemm_runs")

    @contextlib.contextmanager
    def ctx():
        old = [getattr(nf4_ops, a) for a in names]
        nf4_ops.SMALL_M_MAX = nf4_ops.SMALL_M_MAX_SMALL_WEIGHT = small_max
        nf4_ops.fused_gemm_runs = lambda x2, n, blocksize: False
        if ctas_per_sm is not None:
            nf4_ops.SMALL_M_CTAS_PER_SM = ctas_per_sm
        try:
            yield
        finally:
            for a, v in zip(names, old):
                setattr(nf4_ops, a, v)

    return ctx()


def small_m_rows() -> list[dict]:
    """Generation-sized M (r = 16, with LoRA): device time of each forward path against torch bf16
    x @ W^T: the codes read on tensor cores (nf4_small_m, M <= 32; with 1, 2 (the default) and 4
    CTAs per SM as its slice target) and the merged dequantize + GEMM; and per call, the default
    dispatch against bf16."""
    rows = []
    for k, n in FWD_SHAPES:
        w, q, a, b = _forward_case(k, n)
        for m in SMALL_MS:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            f = lambda: nf4_lora_linear(x, q, a, b, 2.0)  # noqa: E731
            row = {"M": m, "K": k, "N": n, "dev_bf16_ms": device_ms(lambda: x @ w.t())}
            if m <= 32:
                for c in (1, 2, 4):
                    with _forced(32, c):
                        row[f"dev_small_c{c}_ms"] = device_ms(f)
            with _forced(0):
                row["dev_merged_ms"] = device_ms(f)
            row["dev_default_ms"] = device_ms(f)
            row["dev_default_over_bf16"] = row["dev_default_ms"] / row["dev_bf16_ms"]
            row["bf16_ms"] = bench(lambda: x @ w.t())
            row["default_ms"] = bench(f)
            row["default_over_bf16"] = row["default_ms"] / row["bf16_ms"]
            rows.append(row)
            print(row, flush=True)
        torch.cuda.empty_cache()
    return rows


def kernel_breakdown(fn, steps: int = 5) -> list[dict]:
    """CUDA time per kernel name over ``steps`` calls (torch.profiler), largest first."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    out = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", getattr(ev, "cuda_time_total", 0))
        if t > 0 and ev.device_type.name == "CUDA":
            out.append({"name": ev.key[:90], "calls": ev.count // steps, "us_per_step": t / steps})
    out.sort(key=lambda d: -d["us_per_step"])
    for d in out[:12]:
        print(f"  {d['us_per_step']:9.1f} us  x{d['calls']:<3d} {d['name']}")
    return out


def layer_rows(have_bnb: bool, have_peft: bool, breakdown: bool = False) -> list[dict]:
    rows = []
    m = 8192
    for k, n in LAYER_SHAPES:
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
        row = {"M": m, "K": k, "N": n}
        dense = nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16)
        dense.weight.data.copy_(w)
        dense.weight.requires_grad_(False)

        def step(mod):
            return layer_step(mod, x, g)

        row["bf16_frozen_ms"] = bench(step(dense))
        row["bf16_lora_ms"] = bench(step(PlainLora(dense, k, n)))
        ours = qlora_layer(dense)
        row["ours_qlora_ms"] = bench(step(ours))
        if breakdown:
            row["breakdown"] = kernel_breakdown(step(ours))
        row["ours_qlora_peak_GiB"] = peak_extra_gib(step(ours))
        row["layer_bf16_weight_GiB"] = n * k * 2 / 2**30
        row["ours_over_bf16_frozen"] = row["ours_qlora_ms"] / row["bf16_frozen_ms"]
        row["q_bf16_frozen_ms"] = bench_queued(step(dense), calls=5)
        row["q_ours_qlora_ms"] = bench_queued(step(ours), calls=5)
        row["q_ours_over_bf16_frozen"] = row["q_ours_qlora_ms"] / row["q_bf16_frozen_ms"]
        row["ratio_interleaved"] = ratio_interleaved(step(ours), step(dense))
        row["ratio_covered"] = ratio_interleaved(step(ours), step(dense), covered=True)
        row["ratio_covered_untuned"] = ratio_interleaved(untuned(step(ours)), step(dense), covered=True)
        row["one_pass_grads"] = nf4_lora_ops._grads_run(x, g, ours.lora_A, ours.lora_B)
        if row["one_pass_grads"]:
            row["ratio_covered_three_passes"] = ratio_interleaved(
                three_passes(step(ours)), step(dense), covered=True
            )
            row["ratio_interleaved_three_passes"] = ratio_interleaved(three_passes(step(ours)), step(dense))
            row["ratio_covered_serial_grads"] = ratio_interleaved(
                serial_grads(step(ours)), step(dense), covered=True
            )
            row["ratio_interleaved_serial_grads"] = ratio_interleaved(serial_grads(step(ours)), step(dense))
            row["q_ours_qlora_serial_grads_ms"] = bench_queued(serial_grads(step(ours)), calls=5)
            row["q_ours_serial_grads_over_bf16_frozen"] = (
                row["q_ours_qlora_serial_grads_ms"] / row["q_bf16_frozen_ms"]
            )
        row["dev_bf16_frozen_ms"] = device_ms(step(dense), calls=5)
        row["dev_ours_qlora_ms"] = device_ms(step(ours), calls=5)
        row["dev_ratio"] = row["dev_ours_qlora_ms"] / row["dev_bf16_frozen_ms"]
        dora = qlora_layer(dense, use_dora=True)
        row["ours_qdora_ms"] = bench(step(dora))
        del dora
        if have_bnb:
            q = bnb_linear(w)
            bnb_lora = PlainLora(q, k, n)
            row["bnb_lora_ms"] = bench(step(bnb_lora))
            # head to head, alternated in rounds: the per-call times above move with the board
            row["ours_over_bnb_interleaved"] = ratio_interleaved(step(ours), step(bnb_lora))
            row["ours_over_bnb_covered"] = ratio_interleaved(step(ours), step(bnb_lora), covered=True)
            del bnb_lora
            if have_peft:
                import peft

                holder = nn.Module()
                holder.proj = bnb_linear(w)
                cfg = peft.LoraConfig(r=R, lora_alpha=32, target_modules=["proj"], lora_dropout=0.0)
                holder = peft.inject_adapter_in_model(cfg, holder).to(dev)
                for name, p in holder.named_parameters():
                    if "lora_" in name:
                        p.data = p.data.to(torch.bfloat16)
                row["peft_qlora_ms"] = bench(step(holder.proj))
                del holder
        rows.append(row)
        print(row, flush=True)
        del dense, ours
        torch.cuda.empty_cache()
    return rows


RANK_PATH_RANKS = (64, 128, 256)
RANK_PAD_RANKS = (12, 15, 100)


def variant_rows(ranks, variants, extra=lambda r: {}) -> list[dict]:
    """At each rank of ``ranks``, M = 8192, on the layer shapes: the layer step's ratio to the
    frozen bf16 layer and the forward's (no grad) to bf16 x @ W^T, covered (device time) and
    interleaved (per call), under each of ``variants``: (name, [(module, attribute, value), ...]),
    the attributes patched while that variant is timed. ``extra(r)``: more fields of the row."""
    rows = []
    m = 8192
    for k, n in LAYER_SHAPES:
        dense = nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16)
        dense.weight.requires_grad_(False)
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
        xd = x.detach()
        for r in ranks:
            ours = LoRALinear(
                copy.deepcopy(dense),
                r=r,
                lora_alpha=2 * r,
                quantize="nf4",
                adapter_dtype=torch.bfloat16,
                init_lora_weights=False,
            )
            row = {"M": m, "K": k, "N": n, "r": r, **extra(r)}

            def fwd(mod=ours):
                with torch.no_grad():
                    return mod(xd)

            def bf16_fwd(mod=dense):
                with torch.no_grad():
                    return mod(xd)

            for name, patches in variants:
                for what, fa, fb in (
                    ("layer", layer_step(ours, x, g), layer_step(dense, x, g)),
                    ("fwd", fwd, bf16_fwd),
                ):
                    with contextlib.ExitStack() as stack:
                        for obj, attr, value in patches:
                            stack.enter_context(mock.patch.object(obj, attr, value))
                        fa()
                        row[f"{what}_{name}_covered"] = ratio_interleaved(fa, fb, covered=True)
                        row[f"{what}_{name}_interleaved"] = ratio_interleaved(fa, fb)
            rows.append(row)
            print(row, flush=True)
            del ours
            torch.cuda.empty_cache()
        del dense
    return rows


def rank_path_rows() -> list[dict]:
    """The LoRA product folded into the dequantized weight (merged) or applied to the activations
    (unmerged), forced, against the default (MERGED_MAX_RANK) at ranks RANK_PATH_RANKS."""
    # the rank up to which the product is folded in: the rule's, always (256), never (0)
    variants = [
        (path, [(nf4_lora_ops, "MERGED_MAX_RANK", max_rank)])
        for path, max_rank in (("default", nf4_lora_ops.MERGED_MAX_RANK), ("merged", 256), ("unmerged", 0))
    ]
    return variant_rows(
        RANK_PATH_RANKS, variants, lambda r: {"merged_by_default": r <= nf4_lora_ops.MERGED_MAX_RANK}
    )


def rank_padding_rows() -> list[dict]:
    """Ranks that are not multiples of 8 (RANK_PAD_RANKS) with the factors padded with zero ranks
    to a multiple of 8 at the op in training (nf4_lora.RANK_ALIGN, the default: every rank-r GEMM
    and kernel on the padded rank), only for the merged kernel (nf4.MERGE_PAD_RANKS), or not at
    all."""
    variants = [
        (name, [(nf4_lora_ops, "RANK_ALIGN", align), (nf4_ops, "MERGE_PAD_RANKS", kernel_pad)])
        for name, align, kernel_pad in (("op", 8, True), ("kernel", 1, True), ("none", 1, False))
    ]
    return variant_rows(RANK_PAD_RANKS, variants)


def dy_pass_rows() -> list[dict]:
    """Device time of the backward's one-pass dY kernel (dxa = s dY B and dB = dY^T xa) against the
    two cuBLAS GEMMs it replaces, at M = 8192 on the layer shapes' N, per rank."""
    rows = []
    m = 8192
    for n in sorted({n for _, n in LAYER_SHAPES}):
        g = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
        for r in nf4_lora_ops.DY_PASS_RANKS:
            b = torch.randn(n, r, device=dev, dtype=torch.bfloat16) * r**-0.5
            xa = torch.randn(m, r, device=dev, dtype=torch.bfloat16)
            row = {"M": m, "N": n, "r": r}
            row["dev_dy_pass_ms"] = device_ms(lambda: nf4_lora_ops.dy_pass_kernel(g, b, xa, 2.0))
            row["dev_cublas_pair_ms"] = device_ms(
                lambda: (nf4_lora_ops._mm_scaled(g, b, 2.0, True), g.t() @ xa)
            )
            row["ratio"] = row["dev_dy_pass_ms"] / row["dev_cublas_pair_ms"]
            row["dy_pass_TBps"] = m * n * 2 / (row["dev_dy_pass_ms"] * 1e-3) / 1e12
            row["used"] = n >= nf4_lora_ops.DY_PASS_MIN_N.get(r, 1 << 62)
            rows.append(row)
            print(row, flush=True)
    return rows


def grads_rows() -> list[dict]:
    """Device time of the one-pass LoRA gradient kernel (dA and dB from one read of x and dY)
    against what the backward runs without it: s x A^T (cuBLAS), the dY pass (dxa, dB) and
    dA = dxa^T x (cuBLAS), at M = 8192, r = 16, K = N where the kernel's rule holds."""
    rows = []
    m, r = 8192, 16
    for k in (2048, 4096):
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        g = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        a = torch.randn(r, k, device=dev, dtype=torch.bfloat16) * k**-0.5
        b = torch.randn(k, r, device=dev, dtype=torch.bfloat16) * r**-0.5
        row = {"M": m, "K": k, "N": k, "r": r}

        def three():
            xa = nf4_lora_ops._mm_scaled(x, a.t(), 2.0, True)
            dxa, db = nf4_lora_ops.dy_pass_kernel(g, b, xa, 2.0)
            return dxa.t() @ x, db

        row["dev_one_pass_ms"] = device_ms(lambda: nf4_lora_ops.grads_kernel(x, g, a, b, 2.0))
        row["dev_three_passes_ms"] = device_ms(three)
        row["ratio"] = row["dev_one_pass_ms"] / row["dev_three_passes_ms"]
        row["one_pass_TBps"] = 2 * m * k * 2 / (row["dev_one_pass_ms"] * 1e-3) / 1e12
        rows.append(row)
        print(row, flush=True)
    return rows


def grads_sweep_rows(ks=(2048, 4096), ms=(1024, 2048, 4096, 8192, 16384, 32768)) -> list[dict]:
    """Device time of the one-pass LoRA gradient kernel alone against M (K = N, r = 16): the slope
    is its cost per row block, the intercept its fixed cost (launches, the first tiles, the last
    reductions)."""
    rows = []
    for k in ks:
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            g = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            a = torch.randn(16, k, device=dev, dtype=torch.bfloat16) * k**-0.5
            b = torch.randn(k, 16, device=dev, dtype=torch.bfloat16) * 0.25
            t = device_ms(lambda: nf4_lora_ops.grads_kernel(x, g, a, b, 2.0))
            row = {"M": m, "K": k, "ms": t, "TBps": 2 * m * k * 2 / (t * 1e-3) / 1e12}
            rows.append(row)
            print(row, flush=True)
    return rows


def main() -> None:
    global R, RANK_PATH_RANKS, LAYER_SHAPES
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/nf4_lora.json")
    ap.add_argument("--breakdown", action="store_true", help="profile the layer step per kernel")
    ap.add_argument(
        "--small-m", action="store_true", help="only the generation-sized M table (each forward path)"
    )
    ap.add_argument("--rank", type=int, default=R, help="LoRA rank of every row (default 16)")
    ap.add_argument(
        "--layer-shapes",
        default=",".join(f"{k}x{n}" for k, n in LAYER_SHAPES),
        help="comma-separated KxN shapes of the layer section (default: TARGETS.md's three)",
    )
    ap.add_argument(
        "--merge-variant",
        type=int,
        default=0,
        help="merged dequantize kernel version (hoptune.ops.nf4._MERGE_VARIANT; 0 the default)",
    )
    ap.add_argument(
        "--rank-path-ranks",
        default=",".join(map(str, RANK_PATH_RANKS)),
        help="comma-separated ranks of the rank_paths section",
    )
    ap.add_argument(
        "--sections",
        default="forward,layer,dy_pass,grads",
        help="comma-separated: forward, layer, dy_pass, grads (the one-pass LoRA gradients), grads_sweep (that "
        "kernel alone against M), rank_paths (merged vs unmerged LoRA at r = 64-256), "
        "rank_padding (ranks not multiples of 8, padded or not)",
    )
    args = ap.parse_args()
    ranks = tuple(int_list(ap, "--rank-path-ranks", args.rank_path_ranks))  # (before any timing)
    layer_shapes = shape_list(ap, "--layer-shapes", args.layer_shapes)
    require_cuda(__file__)
    R = args.rank
    RANK_PATH_RANKS = ranks
    LAYER_SHAPES = layer_shapes
    nf4_ops._MERGE_VARIANT = args.merge_variant
    sections = set(args.sections.split(","))
    known = {"forward", "layer", "dy_pass", "grads", "grads_sweep", "rank_paths", "rank_padding"}
    if not sections <= known:
        ap.error(f"--sections: unknown {sorted(sections - known)}")
    if args.small_m:
        res = {"env": env_info(), "r": R, "small_m": small_m_rows()}
        write_json(args.out, res)
        cols = ["M", "K", "N", "dev_bf16_ms", "dev_small_c1_ms", "dev_small_c2_ms"]
        cols += ["dev_small_c4_ms", "dev_merged_ms", "dev_default_over_bf16", "default_over_bf16"]
        print(table(res["small_m"], cols))
        return
    try:
        import bitsandbytes  # noqa: F401

        have_bnb = True
    except Exception:
        have_bnb = False
    try:
        import peft  # noqa: F401

        have_peft = True
    except Exception:
        have_peft = False
    res = {"env": env_info(), "r": R, "merge_variant": args.merge_variant}
    if "forward" in sections:
        res["forward"] = forward_rows(have_bnb)
        write_json(args.out, res)
    if "layer" in sections:
        res["layer"] = layer_rows(have_bnb, have_peft, args.breakdown)
        write_json(args.out, res)
    if "dy_pass" in sections:
        res["dy_pass"] = dy_pass_rows()
        write_json(args.out, res)
    if "grads" in sections:
        res["grads"] = grads_rows()
        write_json(args.out, res)
    if "grads_sweep" in sections:
        res["grads_sweep"] = grads_sweep_rows()
        write_json(args.out, res)
    if "rank_paths" in sections:
        res["rank_paths"] = rank_path_rows()
        write_json(args.out, res)
    if "rank_padding" in sections:
        res["rank_padding"] = rank_padding_rows()
        write_json(args.out, res)
    res["gemm_choices"] = [{"problem": [str(v) for v in key], "choice": c} for key, c in gemm.tuned().items()]
    res["gemm_measured"] = [{"problem": [str(v) for v in key], **t} for key, t in gemm.measured().items()]
    write_json(args.out, res)
    columns = {
        "forward": [
            "M",
            "K",
            "N",
            "bf16_ms",
            "ours_lora_ms",
            "ours_lora_over_bf16",
            "ratio_interleaved",
            "ratio_covered",
            "ratio_covered_untuned",
            "ratio_covered_vs_tuned_bf16",
            "ours_base_over_bf16",
            "bnb_over_bf16",
            "q_ours_lora_over_bf16",
            "dev_ratio",
            "dev_bf16_ms",
            "dev_ours_lora_ms",
            "dev_ours_merged_path_ms",
        ],
        "layer": [
            "K",
            "N",
            "bf16_frozen_ms",
            "bf16_lora_ms",
            "ours_qlora_ms",
            "ours_over_bf16_frozen",
            "ratio_interleaved",
            "ratio_covered",
            "ratio_covered_untuned",
            "ratio_covered_serial_grads",
            "bnb_lora_ms",
            "peft_qlora_ms",
            "ours_over_bnb_interleaved",
            "ours_qdora_ms",
            "ours_qlora_peak_GiB",
            "q_ours_over_bf16_frozen",
            "dev_ratio",
        ],
        "dy_pass": ["N", "r", "dev_dy_pass_ms", "dev_cublas_pair_ms", "ratio", "dy_pass_TBps", "used"],
        "rank_paths": ["K", "N", "r", "merged_by_default"]
        + [f"{w}_{p}_covered" for w in ("layer", "fwd") for p in ("default", "merged", "unmerged")],
    }
    for name, cols in columns.items():
        if name in res:
            print(table(res[name], cols))


if __name__ == "__main__":
    main()
