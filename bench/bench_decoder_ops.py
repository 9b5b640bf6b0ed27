"""hoptune's fused decoder elementwise ops (hoptune.ops.decoder: rms_norm, silu_mul, rope) against
the eager PyTorch computation of transformers' Llama modules (hoptune.reference.decoder, op for op)
and Liger-Kernel's Triton ops where liger_kernel imports, in one process on the same inputs.

Llama-3-8B shapes at 2 x 2048 tokens (T = 4096), bf16:

* rms_norm: x (T, 4096), a bf16 weight, eps 1e-5 (Liger: LigerRMSNormFunction, offset 0, casting
  mode "llama", its default in-place backward); the weight frozen unless --norm-weight-grad;
* silu_mul: gate, up (T, 14336) (Liger: LigerSiLUMulFunction);
* rope: q (2, 32, 2048, 128) and k (2, 8, 2048, 128) as the attention makes them (a (2, 2048, H * 128)
  projection viewed (2, 2048, H, 128) and transposed(1, 2): not contiguous), cos / sin
  (2, 2048, 128) built as LlamaRotaryEmbedding builds them, in bf16; q and k in one timed call for
  every implementation (Liger: LigerRopeFunction takes both). The upstream gradients have the
  same layout as q and k.

Each op's forward, and forward + backward (torch.autograd.grad with a random upstream gradient,
so no .grad accumulates), is timed with CUDA events (harness.bench), every call queued behind a
3 ms device sleep: device time, the host's launch work hidden as in a busy training step. The
ratios hoptune / eager and hoptune / Liger are medians of back-to-back rounds
(harness.ratio_interleaved). Each implementation gets its own copies of the inputs (Liger's ops
write into their inputs and upstream gradients), cycled so a call does not find the previous
call's data in L2. hoptune's GB/s counts the bytes its kernels must read and write (inputs,
outputs, rstd), not the weight gradient's PyTorch reduction. Before timing, hoptune's forward is
checked against eager's: bitwise for silu_mul and rope, max |diff| <= 2^-7 max |eager| for
rms_norm (its row sum runs in another order); the backward and Liger's outputs are compared too.

    python bench/bench_decoder_ops.py --out bench/results/decoder_ops.json
    python bench/bench_decoder_ops.py --tiny     # small shapes, CPU where there is no GPU: the logic only
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import (
    LLAMA_8B,
    bench,
    copy_rate_tbps,
    env_info,
    ratio_interleaved,
    require_cuda,
    table,
    write_json,
)
from hoptune import _lib
from hoptune.ops import decoder as ops
from hoptune.reference import decoder as ref

OPS = ("rms_norm", "silu_mul", "rope")
IMPLS = ("hoptune", "eager", "liger")
EPS = 1e-5
LEAD_MS = 3.0  # each timed call queued behind this device sleep (harness.bench's lead_ms)
RATIO_ROUNDS, RATIO_REP = 7, 5
RMS_NORM_TOL = 2.0**-7  # max |hoptune - eager| over max |eager| (about one bf16 ulp)

FULL = dict(
    batch=2,
    seq=2048,
    hidden=LLAMA_8B["hidden_size"],
    inter=LLAMA_8B["intermediate_size"],
    heads=LLAMA_8B["num_attention_heads"],
    kv_heads=LLAMA_8B["num_key_value_heads"],
    head_dim=LLAMA_8B["hidden_size"] // LLAMA_8B["num_attention_heads"],
    rope_theta=LLAMA_8B["rope_theta"],
)
TINY = dict(batch=2, seq=16, hidden=64, inter=160, heads=4, kv_heads=2, head_dim=32, rope_theta=10000.0)


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------
def _clone(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with its strides (the attention's transposed layout kept) and its
    requires_grad, as a leaf."""
    c = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    c.copy_(t.detach())
    return c.requires_grad_(t.requires_grad)


def _clone_set(s: dict) -> dict:
    return {
        "inputs": {k: _clone(v) for k, v in s["inputs"].items()},
        "grads": tuple(_clone(g) for g in s["grads"]),
    }


def _heads(batch: int, seq: int, heads: int, head_dim: int, dtype, device) -> torch.Tensor:
    """(batch, heads, seq, head_dim) as the attention makes q / k: its projection's output
    (batch, seq, heads * head_dim) viewed per head and transposed(1, 2)."""
    proj = torch.randn(batch, seq, heads * head_dim, dtype=dtype, device=device)
    return proj.view(batch, seq, heads, head_dim).transpose(1, 2)


def rotary_tables(batch: int, seq: int, head_dim: int, theta: float, dtype, device) -> tuple:
    """cos, sin (batch, seq, head_dim) as LlamaRotaryEmbedding makes them (default rope type,
    attention scaling 1): inv_freq, freqs = positions x inv_freq, emb = cat(freqs, freqs),
    cos / sin in fp32, cast to the activations' dtype."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim)
    )
    position_ids = torch.arange(seq, device=device)[None].expand(batch, -1)
    inv = inv_freq[None, :, None].float().expand(batch, -1, 1)
    freqs = (inv @ position_ids[:, None, :].float()).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rms_norm_case(sh: dict, dtype, device, weight_grad: bool) -> dict:
    t, h = sh["batch"] * sh["seq"], sh["hidden"]
    e = torch.finfo(dtype).bits // 8
    x = torch.randn(t, h, dtype=dtype, device=device).requires_grad_()
    w = (1.0 + 0.1 * torch.randn(h, device=device)).to(dtype).requires_grad_(weight_grad)
    return {
        "set": {"inputs": {"x": x, "weight": w}, "grads": (torch.randn(t, h, dtype=dtype, device=device),)},
        "wrt": ("x", "weight") if weight_grad else ("x",),
        "shapes": {"x": [t, h], "weight": [h], "eps": EPS, "weight_requires_grad": weight_grad},
        # x, weight in, y and rstd out; backward: dy, x, weight, rstd in, dx out
        "bytes_fwd": 2 * t * h * e + h * e + 4 * t,
        "bytes_bwd": 3 * t * h * e + h * e + 4 * t,
        "fwd_check": "rel",
    }


def silu_mul_case(sh: dict, dtype, device) -> dict:
    t, i = sh["batch"] * sh["seq"], sh["inter"]
    e = torch.finfo(dtype).bits // 8
    gate = torch.randn(t, i, dtype=dtype, device=device).requires_grad_()
    up = torch.randn(t, i, dtype=dtype, device=device).requires_grad_()
    return {
        "set": {
            "inputs": {"gate": gate, "up": up},
            "grads": (torch.randn(t, i, dtype=dtype, device=device),),
        },
        "wrt": ("gate", "up"),
        "shapes": {"gate": [t, i], "up": [t, i]},
        "bytes_fwd": 3 * t * i * e,  # gate, up in, out
        "bytes_bwd": 5 * t * i * e,  # dout, gate, up in, dgate, dup out
        "fwd_check": "bitwise",
    }


def rope_case(sh: dict, dtype, device) -> dict:
    b, s, d = sh["batch"], sh["seq"], sh["head_dim"]
    e = torch.finfo(dtype).bits // 8
    q = _heads(b, s, sh["heads"], d, dtype, device).requires_grad_()
    k = _heads(b, s, sh["kv_heads"], d, dtype, device).requires_grad_()
    cos, sin = rotary_tables(b, s, d, sh["rope_theta"], dtype, device)
    dq, dk = _heads(b, s, sh["heads"], d, dtype, device), _heads(b, s, sh["kv_heads"], d, dtype, device)
    qk = (q.numel() + k.numel()) * e
    return {
        "set": {"inputs": {"q": q, "k": k, "cos": cos, "sin": sin}, "grads": (dq, dk)},
        "wrt": ("q", "k"),
        "shapes": {
            "q": list(q.shape),
            "k": list(k.shape),
            "q_stride": list(q.stride()),
            "cos": list(cos.shape),
            "layout": "projection (B, S, H * D) viewed (B, S, H, D), transposed(1, 2); grads alike",
        },
        "bytes_fwd": 2 * qk + 2 * cos.numel() * e,  # q, k, cos, sin in; q', k' out
        "bytes_bwd": 2 * qk + 2 * cos.numel() * e,
        "fwd_check": "bitwise",
    }


# --------------------------------------------------------------------------------------------
# implementations: (inputs) -> tuple of outputs
# --------------------------------------------------------------------------------------------
def _liger(cuda: bool) -> tuple[dict | None, str]:
    """Liger's three autograd Functions, or None and why not (its Triton kernels need a GPU)."""
    if not cuda:
        return None, "not run: no CUDA device (Triton kernels)"
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.rope import LigerRopeFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except Exception as e:  # (ImportError; Triton missing or failing at import)
        return None, f"unavailable: {type(e).__name__}: {e}"
    return {"rms_norm": LigerRMSNormFunction, "silu_mul": LigerSiLUMulFunction, "rope": LigerRopeFunction}, (
        "liger_kernel.ops: LigerRMSNormFunction (offset 0, casting_mode llama), "
        "LigerSiLUMulFunction, LigerRopeFunction (q, k together)"
    )


def implementations(op: str, liger: dict | None) -> dict[str, Callable[[dict], tuple]]:
    if op == "rms_norm":
        impls = {
            "hoptune": lambda a: (ops.rms_norm(a["x"], a["weight"], EPS),),
            "eager": lambda a: (ref.rms_norm(a["x"], a["weight"], EPS),),
        }
        if liger:
            impls["liger"] = lambda a: (liger["rms_norm"].apply(a["x"], a["weight"], EPS, 0.0, "llama"),)
    elif op == "silu_mul":
        impls = {
            "hoptune": lambda a: (ops.silu_mul(a["gate"], a["up"]),),
            "eager": lambda a: (ref.silu_mul(a["gate"], a["up"]),),
        }
        if liger:
            impls["liger"] = lambda a: (liger["silu_mul"].apply(a["gate"], a["up"]),)
    else:
        impls = {
            "hoptune": lambda a: (ops.rope(a["q"], a["cos"], a["sin"]), ops.rope(a["k"], a["cos"], a["sin"])),
            "eager": lambda a: (ref.rope(a["q"], a["cos"], a["sin"]), ref.rope(a["k"], a["cos"], a["sin"])),
        }
        if liger:
            impls["liger"] = lambda a: tuple(liger["rope"].apply(a["q"], a["k"], a["cos"], a["sin"]))
    return impls


def _grads(call: Callable[[dict], tuple], s: dict, wrt: tuple) -> tuple:
    outs = call(s["inputs"])
    return torch.autograd.grad(outs, [s["inputs"][n] for n in wrt], s["grads"])


# --------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------
def compare(got: tuple, want: tuple) -> dict:
    """``got`` against ``want`` (tuples of tensors of one shape each): bitwise equality, the
    largest difference (absolute, over the largest |want|, and per element relative to |want|)
    and the share of elements that differ."""
    a = torch.cat([t.detach().float().reshape(-1) for t in got])
    b = torch.cat([t.detach().float().reshape(-1) for t in want])
    d = (a - b).abs()
    scale = b.abs()
    return {
        "bitwise_equal": all(torch.equal(x, y) for x, y in zip(got, want)),
        "max_abs_diff": d.max().item(),
        "max_abs_diff_over_max_abs": (
            d.max() / scale.max().clamp_min(torch.finfo(torch.float32).tiny)
        ).item(),
        "max_elem_rel_diff": (d / scale.clamp_min(torch.finfo(torch.float32).tiny)).max().item(),
        "differ_frac": (a != b).float().mean().item(),
    }


def checks(case: dict, impls: dict) -> dict:
    """hoptune's (and Liger's) forward outputs and input gradients against eager's, each
    implementation on its own fresh copy of the inputs."""
    base, wrt = case["set"], case["wrt"]
    fwd, bwd = {}, {}
    for name, call in impls.items():
        s = _clone_set(base)
        fwd[name] = tuple(t.detach().clone() for t in call(s["inputs"]))
        bwd[name] = tuple(g.detach().clone() for g in _grads(call, _clone_set(base), wrt))
    res: dict = {}
    for name in impls:
        if name == "eager":
            continue
        res[f"{name}_fwd"] = compare(fwd[name], fwd["eager"])
        res[f"{name}_bwd"] = compare(bwd[name], bwd["eager"])
    h = res["hoptune_fwd"]
    if case["fwd_check"] == "bitwise":
        res["fwd_criterion"] = "hoptune forward bitwise equal to eager"
        res["fwd_pass"] = h["bitwise_equal"]
    else:
        res["fwd_criterion"] = f"hoptune forward: max |diff| <= {RMS_NORM_TOL} max |eager|"
        res["fwd_pass"] = h["max_abs_diff_over_max_abs"] <= RMS_NORM_TOL
    return res


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
def _wall_ms(fn: Callable[[], object], rep: int) -> float:
    """CPU only (--tiny without a GPU, the logic check): median wall-clock milliseconds."""
    fn()
    times = []
    for _ in range(rep):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _cycled(sets: list[dict], body: Callable[[dict], object]) -> Callable[[], object]:
    it = itertools.cycle(sets)
    return lambda: body(next(it))


def time_op(case: dict, impls: dict, copies: int, iters: int, cuda: bool) -> dict:
    wrt = case["wrt"]
    fns: dict[str, dict[str, Callable[[], object]]] = {}
    for name, call in impls.items():
        sets = [_clone_set(case["set"]) for _ in range(copies)]
        fns[name] = {
            "fwd": _cycled(sets, lambda s, call=call: call(s["inputs"])),
            "fwd_bwd": _cycled(sets, lambda s, call=call: _grads(call, s, wrt)),
        }
    row: dict = {}
    for mode in ("fwd", "fwd_bwd"):
        for name in impls:
            fn = fns[name][mode]
            row[f"{name}_{mode}_ms"] = (
                bench(fn, warmup=3, rep=iters, lead_ms=LEAD_MS) if cuda else _wall_ms(fn, iters)
            )
        for other in ("eager", "liger"):
            if other not in impls:
                continue
            if cuda:
                r = ratio_interleaved(
                    fns["hoptune"][mode], fns[other][mode], rounds=RATIO_ROUNDS, rep=RATIO_REP, covered=True
                )
            else:
                r = row[f"hoptune_{mode}_ms"] / row[f"{other}_{mode}_ms"]
            row[f"{mode}_hoptune_over_{other}"] = r
    row["hoptune_fwd_GBps"] = case["bytes_fwd"] / row["hoptune_fwd_ms"] / 1e6
    row["hoptune_fwd_bwd_GBps"] = (case["bytes_fwd"] + case["bytes_bwd"]) / row["hoptune_fwd_bwd_ms"] / 1e6
    return row


# --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--tiny", action="store_true", help="small shapes, on the CPU where there is no GPU: the logic only"
    )
    p.add_argument(
        "--out", default=None, help="JSON (default bench/results/decoder_ops.json, _tiny with --tiny)"
    )
    p.add_argument("--iters", type=int, default=20, help="timed calls per measurement (median)")
    p.add_argument("--copies", type=int, default=2, help="input copies each implementation cycles through")
    p.add_argument("--norm-weight-grad", action="store_true", help="rms_norm's weight requires grad too")
    p.add_argument("--ops", default=",".join(OPS), help="comma-separated: " + ", ".join(OPS))
    args = p.parse_args(argv)
    chosen = args.ops.split(",")
    if bad := [o for o in chosen if o not in OPS]:
        p.error(f"--ops: unknown {bad}; known: {', '.join(OPS)}")
    if args.iters < 1 or args.copies < 1:
        p.error("--iters and --copies must be at least 1")
    out = args.out or (
        "bench/results/decoder_ops_tiny.json" if args.tiny else "bench/results/decoder_ops.json"
    )
    cuda = torch.cuda.is_available()
    if not args.tiny:
        require_cuda(__file__)
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16
    sh = TINY if args.tiny else FULL
    liger, liger_note = _liger(cuda)
    torch.manual_seed(0)

    res: dict = {"env": env_info()}
    res["command"] = res["env"]["command"]
    res.update(
        {
            "shape": "tiny" if args.tiny else "llama-3-8b, 2 x 2048 tokens",
            "dims": sh,
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            "timer": (
                f"CUDA events (harness.bench), each call behind a {LEAD_MS} ms device sleep; ratios: "
                f"harness.ratio_interleaved, {RATIO_ROUNDS} rounds of {RATIO_REP}"
                if cuda
                else "CPU wall clock (--tiny without a GPU: the logic only, no meaningful times)"
            ),
            "iters": args.iters,
            "copies": args.copies,
            "implementations": {
                "hoptune": "hoptune.ops.decoder",
                "eager": "hoptune.reference.decoder (transformers' Llama ops, PyTorch eager)",
                "liger": liger_note,
            },
            "hoptune_path": "kernels"
            if _lib.kernels_run_on(torch.empty(0, device=device))
            else "PyTorch reference",
            "ops": {},
        }
    )
    if cuda:
        res["copy_TBps"] = copy_rate_tbps(256 << 20 if args.tiny else 2 << 30)
        torch.cuda.empty_cache()
    makers = {
        "rms_norm": lambda: rms_norm_case(sh, dtype, device, args.norm_weight_grad),
        "silu_mul": lambda: silu_mul_case(sh, dtype, device),
        "rope": lambda: rope_case(sh, dtype, device),
    }
    for op in chosen:
        case = makers[op]()
        impls = implementations(op, liger)
        entry = {"shapes": case["shapes"], "bytes_fwd": case["bytes_fwd"], "bytes_bwd": case["bytes_bwd"]}
        entry["check"] = checks(case, impls)
        print(
            f"{op}: check {'pass' if entry['check']['fwd_pass'] else 'FAIL'} ({entry['check']['fwd_criterion']})"
        )
        entry.update(time_op(case, impls, args.copies, args.iters, cuda))
        if cuda:
            entry["hoptune_fwd_frac_copy"] = entry["hoptune_fwd_GBps"] / 1e3 / res["copy_TBps"]
            entry["hoptune_fwd_bwd_frac_copy"] = entry["hoptune_fwd_bwd_GBps"] / 1e3 / res["copy_TBps"]
        res["ops"][op] = entry
        write_json(out, res)  # (after each op: an interrupted run keeps the ops before)
        del case, impls
        if cuda:
            torch.cuda.empty_cache()
    res["checks_pass"] = all(e["check"]["fwd_pass"] for e in res["ops"].values())
    write_json(out, res)

    rows = [{"op": op, **e} for op, e in res["ops"].items()]
    impls_run = [i for i in IMPLS if any(f"{i}_fwd_ms" in r for r in rows)]
    print(f"times in ms ({res['timer']})")
    print(table(rows, ["op", *[f"{i}_fwd_ms" for i in impls_run], *[f"{i}_fwd_bwd_ms" for i in impls_run]]))
    ratio_cols = [f"{m}_hoptune_over_{o}" for m in ("fwd", "fwd_bwd") for o in impls_run if o != "hoptune"]
    print(table(rows, ["op", *ratio_cols, "hoptune_fwd_GBps", "hoptune_fwd_bwd_GBps"]))
    for r in rows:
        c = r["check"]
        extra = "".join(
            f", {k.split('_')[0]} {k.split('_')[1]} max|d| {v['max_abs_diff']:.3g}"
            for k, v in c.items()
            if isinstance(v, dict) and k != "hoptune_fwd"
        )
        print(
            f"{r['op']}: hoptune fwd vs eager: bitwise {c['hoptune_fwd']['bitwise_equal']}, "
            f"max|d| {c['hoptune_fwd']['max_abs_diff']:.3g}{extra}: {'pass' if c['fwd_pass'] else 'FAIL'}"
        )
    print("PASS" if res["checks_pass"] else "FAIL", "(forward checks)")
    return 0 if res["checks_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
