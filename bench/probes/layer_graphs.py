"""Probe: the 8B QLoRA step with each checkpointed decoder layer replayed as CUDA graphs.

The eager step's profile shows the device idle between kernels, mostly in the backward (each
layer's recompute and its projections' backward). This probe measures how much of the step that
host launch time is: the same model, data and optimizer as ``bench_sft_8b.py``, first
eager, then with every decoder layer (its activation checkpointing inside) captured by
``torch.cuda.make_graphed_callables`` (a forward graph and a backward graph per layer, the
backward's recompute in it, one memory pool), the rest of the step (embedding, output head and
loss, optimizer) eager. Static shapes only (2 x 2048 tokens, no padding): a probe, not a trainer
feature. Reports both medians, their ratio, the peak memory of each, the two kinds one step apart
in the same process (the layer list switched between them), and one fixed batch's loss and
gradients with the graphs against eager (and eager against eager again: the backward's own
spread, its fp32 sums in no fixed order).

    python bench/probes/layer_graphs.py --out bench/results/sft_8b_layer_graphs_probe.json

Found (bench/README.md): about as fast as eager, the graphed kernels slower by what the idle
time had been; the GPU runs at its power cap, so the idle time comes back as a lower clock.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bench_sft_8b as b8
import hoptune
from harness import LLAMA_8B, env_info, write_json
from hoptune.data.packing import Row, collate
from hoptune.train import loop
from hoptune.train.sft import sft_step

GiB = 2**30


class _LayerCall(nn.Module):
    """layer(h, attention_mask=mask, position_embeddings=(cos, sin)) with positional tensors only
    (what make_graphed_callables takes); the layer's own checkpointing applies inside."""

    def __init__(self, layer: nn.Module, with_mask: bool):
        super().__init__()
        self.layer = layer
        self.with_mask = with_mask

    def forward(self, h, cos, sin, *mask):
        return self.layer(
            h, attention_mask=mask[0] if self.with_mask else None, position_embeddings=(cos, sin)
        )


class _Replay(nn.Module):
    """Stands in the decoder's layer list for a graphed layer: the model's keyword call mapped onto
    the graphed callable's positional one (the graphed _LayerCall a child, so the layer's
    parameters stay in the model)."""

    def __init__(self, graphed: nn.Module, with_mask: bool):
        super().__init__()
        self.graphed = graphed
        self.with_mask = with_mask

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, **_):
        args = (hidden_states, *position_embeddings)
        if self.with_mask:
            args += (attention_mask,)
        return self.graphed(*args)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak() -> float | None:
    return torch.cuda.max_memory_allocated() / GiB if torch.cuda.is_available() else None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8, help="timed steps of each kind")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 32)")
    p.add_argument("--out", default=None, help="JSON path")
    p.add_argument(
        "--profile",
        action="store_true",
        help="then one graphed and one eager step under torch.profiler: kernel time and idle gaps of each",
    )
    p.add_argument(
        "--dry-run-cpu",
        action="store_true",
        help="the tiny model on the CPU with the layers wrapped but not captured (the probe's logic only)",
    )
    args = p.parse_args(argv)
    dry = args.dry_run_cpu
    if not dry and not torch.cuda.is_available():
        raise SystemExit("layer_graphs.py needs a CUDA device (CUDA graphs); --dry-run-cpu checks its logic")
    device = torch.device("cpu" if dry else "cuda")
    shape = dict(b8.TINY if dry else LLAMA_8B)
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    loop.seed_everything(0)
    model = b8.build(shape, device, torch.float32 if dry else torch.bfloat16, None)
    hoptune.apply_lora(model, r=16, alpha=32, target_modules="all-linear", quantize="nf4")
    sync()
    if not dry:
        torch.cuda.empty_cache()
    hoptune.fuse_decoder_ops(model)
    loop.enable_gradient_checkpointing(model)
    model.train()
    named = loop.trainable_parameters(model)
    opt = loop.build_optimizer(named, lr=1e-4)
    params = [q for _, q in named]
    gen = torch.Generator().manual_seed(0)
    seq, batch = (64 if dry else 2048), 2

    def micro():
        rows = [
            Row(torch.randint(3, shape["vocab_size"], (seq,), generator=gen).tolist(), [1] * seq)
            for _ in range(batch)
        ]
        return [collate(rows, pad_id=0)]

    def step(m) -> float:
        loss, _, _ = sft_step(model, m, device, read=False)
        loop.optimizer_step(opt, None, params, 1.0, loss=loss)
        return float(loss)

    def timed(n: int) -> tuple[list[float], list[float]]:
        times, losses = [], []
        for _ in range(n):
            m = micro()
            sync()
            t = time.perf_counter()
            losses.append(step(m))
            sync()
            times.append(time.perf_counter() - t)
        return times, losses

    result = {**env_info(), "shape": shape, "batch": batch, "seq": seq, "steps": args.steps}
    collector = loop.LoopGc().start()
    try:
        phases = result["phases_unix_s"] = {}  # (to line up with a clock / power log taken beside)

        def series(kind: str) -> None:
            """Two untimed steps (the GEMM choices, the allocator), then the timed ones."""
            timed(2)
            reset_peak()
            phases[kind] = [time.time()]
            times, losses = timed(args.steps)
            phases[kind].append(time.time())
            result[kind] = {
                "step_s": times,
                "median_step_s": statistics.median(times),
                "peak_gib": peak(),
                "losses": losses,
            }

        series("eager")
        print(
            f"eager: median {result['eager']['median_step_s']:.3f} s, peak {result['eager']['peak_gib']} GiB"
        )

        # what the layers receive in this model's forward (mask, rotary tables), for the sample args
        seen = {}
        layers = model.model.layers

        def grab(mod, a, kw):
            seen.setdefault("kw", kw)
            seen.setdefault("h", a[0] if a else kw["hidden_states"])

        hook = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
        with torch.no_grad():
            b = loop.to_device(micro()[0], device)
            loop.batch_logprobs(model, b)
        hook.remove()
        kw = seen["kw"]
        mask = kw.get("attention_mask")
        cos, sin = kw["position_embeddings"]
        with_mask = isinstance(mask, torch.Tensor)
        result["layer_call"] = {
            "attention_mask": None if mask is None else [list(mask.shape), str(mask.dtype)],
            "cos": [list(cos.shape), str(cos.dtype)],
        }
        print(
            f"layer inputs: mask {result['layer_call']['attention_mask']}, cos {result['layer_call']['cos']}"
        )

        # one fixed batch's loss and gradients, eager, to compare with the graphed layers' (no step)
        fixed = micro()
        opt.zero_grad(set_to_none=True)
        ref_loss = float(sft_step(model, fixed, device)[0])
        ref_grads = [q.grad.detach().clone() for q in params]
        opt.zero_grad(set_to_none=True)
        again_loss = float(sft_step(model, fixed, device)[0])  # (eager twice: the backward's own spread)
        base_errs = _rel_errs(params, ref_grads)
        opt.zero_grad(set_to_none=True)

        calls, samples = [], []
        for i, layer in enumerate(layers):
            calls.append(_LayerCall(layer, with_mask))
            h = torch.randn_like(seen["h"]).requires_grad_(i > 0)  # (layer 0's input: the frozen embedding's)
            s = (h, cos.clone(), sin.clone()) + ((mask.clone(),) if with_mask else ())
            samples.append(s)
        t0 = time.perf_counter()
        try:
            if dry:  # (no capture on a CPU: the wrappers around the eager layers)
                graphed = tuple(calls)
            else:
                graphed = torch.cuda.make_graphed_callables(tuple(calls), tuple(samples), num_warmup_iters=3)
        except Exception as e:  # (what the capture refused: the probe's finding)
            result["graphs"] = {
                "error": f"{type(e).__name__}: {e}"[:2000],
                "trace": traceback.format_exc()[-4000:],
            }
            print("capture failed:", result["graphs"]["error"][:600])
            return _finish(result, args.out)
        result["capture_s"] = time.perf_counter() - t0
        print(f"captured {len(calls)} layers in {result['capture_s']:.1f} s")
        eager_layers = list(layers)
        replays = [_Replay(graphed[i], with_mask) for i in range(len(layers))]

        def use(kind: str) -> None:
            for i, m in enumerate(replays if kind == "graphs" else eager_layers):
                layers[i] = m

        use("graphs")
        opt.zero_grad(set_to_none=True)
        got_loss = float(sft_step(model, fixed, device)[0])
        errs = _rel_errs(params, ref_grads)
        opt.zero_grad(set_to_none=True)
        result["check"] = {
            "eager_loss": ref_loss,
            "eager_again_loss": again_loss,
            "graphs_loss": got_loss,
            "grad_rel_err_max": max(errs),
            "grad_rel_err_median": statistics.median(errs),
            "eager_again_grad_rel_err_max": max(base_errs),
            "eager_again_grad_rel_err_median": statistics.median(base_errs),
        }
        print(
            f"check: loss {ref_loss:.6f} eager, {again_loss:.6f} eager again, {got_loss:.6f} graphs; "
            f"grads' relative error (max / median) graphs {max(errs):.2e} / {statistics.median(errs):.2e}, "
            f"eager again {max(base_errs):.2e} / {statistics.median(base_errs):.2e}"
        )
        series("graphs")
        result["eager_over_graphs"] = result["eager"]["median_step_s"] / result["graphs"]["median_step_s"]
        # one step apart in this process, the layer list switched between the two (after one of each)
        alt = {"eager": [], "graphs": []}
        phases["alternated"] = [time.time()]
        for i in range(2 * (args.steps + 1)):
            kind = ("eager", "graphs")[i % 2]
            use(kind)
            t, _ = timed(1)
            if i >= 2:
                alt[kind] += t
        use("graphs")
        phases["alternated"].append(time.time())
        if args.profile and not dry:
            from harness import device_breakdown, print_breakdown

            result["profile"] = {}
            for kind in ("graphs", "eager"):
                use(kind)
                m = micro()
                prof = device_breakdown(lambda m=m: step(m))
                prof["kernels"] = prof["kernels"][:40]
                result["profile"][kind] = prof
                print_breakdown(prof, f"profiled {kind} step")
            use("graphs")
        meds = {k: statistics.median(v) for k, v in alt.items()}
        result["alternated"] = {
            "step_s": alt,
            "median_step_s": meds,
            "eager_over_graphs": meds["eager"] / meds["graphs"],
        }
        print(
            f"alternated, {args.steps} steps each: graphs {meds['graphs']:.3f} s, eager {meds['eager']:.3f} s "
            f"({meds['eager'] / meds['graphs']:.3f}x)"
        )
        print(
            f"graphs: median {result['graphs']['median_step_s']:.3f} s, peak {result['graphs']['peak_gib']} GiB; "
            f"eager / graphs {result['eager_over_graphs']:.3f}"
        )
    finally:
        collector.stop()
    return _finish(result, args.out)


def _rel_errs(params, refs) -> list[float]:
    """Each parameter's gradient against ``refs``: |g - ref| / |ref| (Frobenius norms)."""
    return [
        (
            torch.linalg.vector_norm(q.grad.float() - r.float())
            / torch.linalg.vector_norm(r.float()).clamp_min(1e-30)
        ).item()
        for q, r in zip(params, refs)
    ]


def _finish(result: dict, out: str | None) -> dict:
    if out:
        write_json(out, result)
    return result


if __name__ == "__main__":
    main()
