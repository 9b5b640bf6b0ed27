"""QLoRA SFT steps of a Llama-3-8B-shaped model through hoptune's training loop: tokens/s and peak
GPU memory.

    python bench/bench_sft_8b.py                                   # H200: ~2 minutes
    python bench/bench_sft_8b.py --tiny --out /tmp/sft_tiny.json   # CPU: the logic only

Steps: (1) build the model with random bf16 weights directly on the GPU; (2)
``hoptune.apply_lora(model, r=16, alpha=32, target_modules="all-linear", quantize="nf4")`` (NF4
base, double quantization, fp32 adapters), activation checkpointing on; (3) run ``--warmup``
then ``--steps`` optimizer steps of ``--batch`` x ``--seq`` random tokens (every target in the
loss) with the SFT recipe's own pieces: ``collate``, ``sft_step`` (decoder forward, output head
on the loss positions, TRL's SFT loss, backward), ``optimizer_step`` (clip, fused AdamW, cosine
schedule); (4) print and write JSON: tokens/s (median step), peak GPU memory of setup and of
training, the per-step times and losses, the command, GPU, versions and date.

With ``--anchor-script PATH`` (the project's ``bench_anchors.py``, which measures the Hugging Face
stack: transformers + bitsandbytes NF4 + PEFT, same shape, batch, sequence and rank), that script
runs after ours in a process of its own on the same GPU, and the JSON gets its end-to-end figures
(``anchor``) and ours over them (``vs_anchor``): the comparison in one run.

``--uncheckpointed N``: the last N decoder layers run without activation checkpointing (their
activations kept, their recompute saved: ``model.uncheckpointed_layers`` in ``hoptune sft``), or
``auto``: as many as the trainer's auto takes (``hoptune.train.sft.auto_uncheckpointed``), with
``--reserve-gib`` holding GPU memory from before that choice to the end (a smaller GPU). The
anchor always checkpoints every layer; the JSON records N (``config.uncheckpointed_layers``).

The speed targets belong to the end-to-end benchmark; this one reports.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hoptune
from harness import LLAMA_8B, GcPauses, device_breakdown, env_info, print_breakdown, write_json
from hoptune.data.packing import Row, collate
from hoptune.train import loop
from hoptune.train.sft import sft_step

TINY = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
GiB = 2**30
ANCHOR_RUN = (2, 2048, 1, 16, False)  # batch, seq, accum, r, no_grad_ckpt of the anchor's e2e step
ANCHOR_SECTION = "e2e_llama8b"


def _count_or_auto(text: str):
    """--uncheckpointed's value: an integer, or auto."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or auto, got {text!r}") from None


def run_anchor(script: str) -> dict:
    """Run the anchor script in a process of its own (OUT set to a scratch folder, where it writes
    anchors.json) and return its end-to-end section, its environment and its wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, script], env={**os.environ, "OUT": tmp}, capture_output=True, text=True
        )
        wall = time.perf_counter() - t0
        path = os.path.join(tmp, "anchors.json")
        if proc.returncode != 0 or not os.path.isfile(path):
            tail = (proc.stdout + proc.stderr)[-2000:]
            raise SystemExit(f"the anchor script {script} failed (status {proc.returncode}):\n{tail}")
        with open(path, encoding="utf-8") as f:
            res = json.load(f)
    e2e = res.get(ANCHOR_SECTION)
    if not isinstance(e2e, dict) or "error" in e2e or "bnb_qlora_tok_per_s" not in e2e:
        raise SystemExit(f"the anchor script {script} measured no {ANCHOR_SECTION} step: {e2e!r}"[:2000])
    return {"script": os.path.basename(script), "env": res.get("env"), ANCHOR_SECTION: e2e, "wall_s": wall}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def build(shape: dict, device: torch.device, dtype: torch.dtype, attn: str | None):
    """A LlamaForCausalLM with random weights, created on ``device`` in ``dtype`` (no host copy)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config.use_cache = False
    if attn:
        config._attn_implementation = attn
    with default_dtype(dtype), torch.device(device):
        model = LlamaForCausalLM(config)
    return model


def compile_layers(model) -> int:
    """torch.compile (inductor) on each decoder layer in place; the number compiled. The layers
    share one traced graph; instance forwards (the fused decoder ops') guard on each layer's own
    functions, so the recompile limit is raised to cover every layer."""
    layers = model.model.layers
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 2 * len(layers) + 8))
    for layer in layers:
        layer.compile()
    return len(layers)


def _dynamo_counts() -> tuple[dict, int]:
    """torch.compile's graph breaks by reason and its graphs so far in this process."""
    from torch._dynamo.utils import counters

    return dict(counters["graph_break"]), counters["stats"].get("unique_graphs", 0)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a tiny model (tests the logic on a CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", type=int, default=2, help="sequences per micro-batch (default 2)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048; 64 with --tiny)")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps (default 6)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help="decoder layers (default: the shape's, 32 for the 8B, 2 with --tiny)",
    )
    p.add_argument("--no-grad-ckpt", action="store_true", help="without activation checkpointing")
    p.add_argument(
        "--uncheckpointed",
        type=_count_or_auto,
        default=0,
        metavar="N",
        help="with activation checkpointing, the last N decoder layers without it (their activations "
        "kept, their recompute saved; default 0), or auto: as the trainer's "
        "model.uncheckpointed_layers=auto sizes it to the GPU's free memory",
    )
    p.add_argument(
        "--reserve-gib",
        type=float,
        default=0.0,
        metavar="GIB",
        help="hold GIB of GPU memory from before the layers are chosen to the end (a smaller GPU, for "
        "--uncheckpointed auto)",
    )
    p.add_argument(
        "--alternate-uncheckpointed",
        type=int,
        default=0,
        metavar="STEPS",
        help="then STEPS more steps each with --uncheckpointed's N layers uncheckpointed and with "
        "every layer checkpointed, alternated in this process (each kind's peak memory recorded)",
    )
    p.add_argument(
        "--no-fuse",
        action="store_true",
        help="keep transformers' RMSNorm / SwiGLU / rotary ops (no hoptune.fuse_decoder_ops)",
    )
    p.add_argument(
        "--alternate-fuse",
        type=int,
        default=0,
        metavar="N",
        help="then N more steps each with and without the fused decoder ops, alternated in this "
        "process (the fusion's gain on one machine, one step apart)",
    )
    p.add_argument(
        "--alternate-saves-first",
        type=int,
        default=0,
        metavar="N",
        help="then N more steps each with the NF4 op running its autograd Function before it "
        "computes its product under activation checkpointing (the default: the recompute stops "
        "before the layer's last projection) and after, alternated in this process",
    )
    p.add_argument(
        "--alternate-step-end",
        type=int,
        default=0,
        metavar="N",
        help="then N more steps each with the step's end as the trainer runs it (the optimizer "
        "launched before the loss and the gradient norm are read, a non-finite step skipped on the "
        "device) and with those read first, alternated in this process",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile each decoder layer (inductor; the first steps compile)",
    )
    p.add_argument(
        "--gc",
        choices=("loop", "frozen", "python"),
        default="loop",
        help="Python's collector during the steps. loop: as the trainer runs it (loop.LoopGc: the "
        "objects alive before the loop frozen, collections only between steps); frozen: those objects "
        "frozen, the automatic collections left on; python: left as it is",
    )
    p.add_argument(
        "--no-gc-freeze", action="store_const", dest="gc", const="python", help="the same as --gc python"
    )
    p.add_argument("--attn", default=None, help="attention implementation (default: transformers' choice)")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/sft_8b[_tiny].json)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="one more step under torch.profiler: device time by kernel category",
    )
    p.add_argument(
        "--anchor-script",
        default=None,
        help="the Hugging Face stack's anchor script (bench_anchors.py), run after ours on the same GPU",
    )
    args = p.parse_args(argv)
    for flag in ("steps", "batch", "seq", "accum", "layers"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag} must be at least 1, got {value}")
    for flag in (
        "warmup",
        "alternate_fuse",
        "alternate_saves_first",
        "alternate_step_end",
        "alternate_uncheckpointed",
        "reserve_gib",
    ):
        value = getattr(args, flag)
        if value < 0:
            p.error(f"--{flag.replace('_', '-')} must be at least 0, got {value}")
    if args.uncheckpointed != "auto" and args.uncheckpointed < 0:
        p.error(f"--uncheckpointed must be at least 0 or auto, got {args.uncheckpointed}")
    if (args.uncheckpointed or args.alternate_uncheckpointed) and args.no_grad_ckpt:
        p.error(
            "--uncheckpointed and --alternate-uncheckpointed choose layers of the checkpointed step: leave out --no-grad-ckpt"
        )
    if args.alternate_uncheckpointed and not args.uncheckpointed:
        p.error("--alternate-uncheckpointed alternates --uncheckpointed N (>= 1) with 0: give N")
    if args.alternate_saves_first and (args.compile or args.no_grad_ckpt):
        p.error(
            "--alternate-saves-first alternates the eager op's order under activation checkpointing: "
            "leave out --compile and --no-grad-ckpt"
        )
    if args.alternate_fuse and args.compile:
        p.error(
            "--alternate-fuse changes the layers' forwards, which --compile has traced: use one of the two"
        )
    if args.alternate_fuse and args.no_fuse:
        p.error("--alternate-fuse alternates the fused and unfused step itself: leave out --no-fuse")
    if args.anchor_script is not None:
        if not os.path.isfile(args.anchor_script):
            p.error(f"--anchor-script {args.anchor_script!r} is not a file")
        run = (args.batch, args.seq or 2048, args.accum, args.r, args.no_grad_ckpt)
        if not args.tiny and args.layers not in (None, LLAMA_8B["num_hidden_layers"]):
            p.error("--anchor-script measures the 8B model's 32 decoder layers: leave out --layers")
        if not args.tiny and run != ANCHOR_RUN:
            p.error(
                "--anchor-script measures 2 x 2048 tokens, one micro-batch, r = 16, with activation "
                f"checkpointing: run with those (got --batch {args.batch} --seq {args.seq or 2048} --accum {args.accum} "
                f"--r {args.r}{' --no-grad-ckpt' if args.no_grad_ckpt else ''})"
            )

    device = loop.resolve_device(args.device, setting="--device")
    cuda = device.type == "cuda"
    if not cuda and not args.tiny:
        why = (
            "no CUDA device is visible" if args.device == "auto" else f"--device {args.device} was asked for"
        )
        p.error(
            f"the 8B model needs a CUDA device ({why}); on a CPU it would take hours: use --tiny for the logic"
        )
    shape = dict(TINY if args.tiny else LLAMA_8B)
    if args.layers is not None:
        shape["num_hidden_layers"] = args.layers
    if args.uncheckpointed != "auto" and args.uncheckpointed > shape["num_hidden_layers"]:
        p.error(
            f"--uncheckpointed {args.uncheckpointed}: the model has {shape['num_hidden_layers']} decoder layers"
        )
    seq = args.seq or (64 if args.tiny else 2048)
    dtype = torch.bfloat16 if cuda else torch.float32
    out = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        "results",
        "sft_8b_tiny.json" if args.tiny else "sft_8b.json",
    )
    loop.seed_everything(0)

    # 1-2. model, adapters, checkpointing
    t0 = time.perf_counter()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = build(shape, device, dtype, args.attn)
    t_build = time.perf_counter() - t0
    t1 = time.perf_counter()
    hoptune.apply_lora(model, r=args.r, alpha=2 * args.r, target_modules="all-linear", quantize="nf4")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    t_quant = time.perf_counter() - t1
    fused = None if args.no_fuse else hoptune.fuse_decoder_ops(model)
    reserve = None
    if args.reserve_gib and cuda:
        reserve = torch.empty(int(args.reserve_gib * GiB), dtype=torch.uint8, device=device)
    elif args.reserve_gib:
        print("--reserve-gib: no CUDA device, so no GPU memory to hold: skipped")
    unckpt, auto_why = args.uncheckpointed, None
    if unckpt == "auto":  # (as the trainer chooses it, from a config of this run's sizes)
        from hoptune.config import load_config
        from hoptune.train.sft import auto_uncheckpointed

        cfg = load_config(
            None, [f"data.max_seq_len={seq}", f"train.batch_size={args.batch}", f"lora.r={args.r}"]
        )
        unckpt, auto_why = auto_uncheckpointed(model, cfg)
        print(f"--uncheckpointed auto: {auto_why}")
        if args.alternate_uncheckpointed and not unckpt:
            p.error(
                "--uncheckpointed auto chose no layer: --alternate-uncheckpointed has nothing to alternate"
            )
    if not args.no_grad_ckpt:
        loop.enable_gradient_checkpointing(model, unckpt)
    model.train()
    compiled = compile_layers(model) if args.compile else None
    dynamo_before = _dynamo_counts() if args.compile else None
    named = loop.trainable_parameters(model)
    n_train, n_total = loop.count_parameters(model)
    setup_peak = loop.gpu_memory_gib()
    weights_gib = torch.cuda.memory_allocated() / GiB if cuda else None
    opt = loop.build_optimizer(named, lr=1e-4)
    total_steps = args.warmup + args.steps
    sched = loop.build_scheduler(opt, total_steps, warmup_steps=1)
    params = [p for _, p in named]
    print(
        f"model: {'tiny' if args.tiny else 'Llama-3-8B-shaped'} on {device} ({dtype}); "
        f"{n_train:,} trainable of {n_total:,}; built {t_build:.1f}s, NF4 {t_quant:.1f}s"
    )

    # 3. steps
    data_gen = torch.Generator().manual_seed(0)

    def micro_batch():
        rows = []
        for _ in range(args.batch):
            ids = torch.randint(3, shape["vocab_size"], (seq,), generator=data_gen).tolist()
            rows.append(Row(ids, [1] * seq))
        return collate(rows, pad_id=0)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    tokens_per_step = args.batch * seq * args.accum
    gc_steps: list[list[tuple[int, float]]] = []

    def train_step(micro) -> float:
        """One optimizer step as the trainer takes it: the loss read with the gradient norm, after
        the optimizer's launches (with loop.SKIP_ON_DEVICE off: the loss read first, as before)."""
        loss, _, _ = sft_step(model, micro, device, read=not loop.SKIP_ON_DEVICE)
        loop.optimizer_step(opt, sched, params, 1.0, loss=loss)
        return float(loss)

    def timed_step() -> tuple[float, float]:
        micro = [micro_batch() for _ in range(args.accum)]
        if cuda:
            torch.cuda.synchronize()
        ts = time.perf_counter()
        loss = train_step(micro)
        collector.step()  # (no-op unless --gc loop)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - ts, loss

    collector = loop.LoopGc()
    frozen = False
    if args.gc == "loop":  # (as the trainer does around its loop)
        frozen = collector.start().active
    elif args.gc == "frozen" and gc.isenabled():
        gc.collect()
        gc.freeze()
        frozen = True

    def restore_gc() -> None:  # (after the profile and the alternations, which run under the same policy)
        collector.stop()
        if args.gc == "frozen" and frozen and gc.get_freeze_count():
            gc.unfreeze()

    try:
        with GcPauses() as gc_pauses:
            for step in range(total_steps):
                dt, loss = timed_step()
                losses.append(loss)
                tag = "warmup" if step < args.warmup else "timed"
                print(
                    f"step {step + 1}/{total_steps} ({tag}): {dt:.3f}s, {tokens_per_step / dt:,.0f} tok/s, "
                    f"loss {loss:.4f}"
                )
                pauses = gc_pauses.take()
                if step >= args.warmup:
                    times.append(dt)
                    gc_steps.append(pauses)
    except BaseException:
        restore_gc()
        raise
    train_peak = loop.gpu_memory_gib()
    med = statistics.median(times)
    full = [[ms for gen, ms in st if gen == 2] for st in gc_steps]
    gc_record = {
        "policy": args.gc,
        "frozen": frozen,
        "pause_ms_per_step": [sum(ms for _, ms in st) for st in gc_steps],
        "full_collections_per_step": [len(f) for f in full],
        "full_collection_ms": [ms for f in full for ms in f],
    }
    print(
        f"gc ({args.gc}: {'objects frozen before the loop' if frozen else 'not frozen'}): "
        f"{sum(gc_record['full_collections_per_step'])} full collections in the timed steps, "
        f"{sum(gc_record['full_collection_ms']):.1f} ms; all pauses {sum(gc_record['pause_ms_per_step']):.1f} ms"
    )
    try:

        def alternated(n: int, kinds: tuple[str, str], set_kind) -> dict:
            """One step apart on the same machine, the model and optimizer carried on: kinds[0],
            kinds[1], kinds[0], ... after one untimed step of each."""
            runs: dict[str, list[float]] = {k: [] for k in kinds}
            peaks: dict[str, float] = {}
            for i in range(2 * (n + 1)):
                kind = kinds[i % 2]
                set_kind(kind)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                dt, _ = timed_step()
                if cuda:
                    peaks[kind] = max(peaks.get(kind, 0.0), loop.gpu_memory_gib())
                if i >= 2:
                    runs[kind].append(dt)
            meds = {k: statistics.median(v) for k, v in runs.items()}
            ratio = meds[kinds[0]] / meds[kinds[1]]
            print(
                f"alternated, {n} steps each: {kinds[1]} {meds[kinds[1]]:.3f}s, {kinds[0]} "
                f"{meds[kinds[0]]:.3f}s median ({ratio:.3f}x the {kinds[1]} step's time)"
                + (f"; peak {', '.join(f'{k} {v:.2f}' for k, v in peaks.items())} GiB" if peaks else "")
            )
            return {
                "steps_each": n,
                "step_s": runs,
                "median_step_s": meds,
                "peak_gib": peaks or None,
                f"{kinds[0]}_over_{kinds[1]}": ratio,
            }

        alternate = alternate_saves = alternate_end = alternate_unckpt = None
        if args.alternate_fuse:
            # (the unfused GEMM shapes are the same ones, but transformers' own ops meet the allocator
            # and the GEMM choice for the first time: hence the untimed first steps)
            alternate = alternated(
                args.alternate_fuse,
                ("unfused", "fused"),
                lambda k: (
                    hoptune.unfuse_decoder_ops(model) if k == "unfused" else hoptune.fuse_decoder_ops(model)
                ),
            )
        if args.alternate_saves_first:
            from hoptune.ops import nf4_lora as nf4_lora_ops

            def set_saves(kind: str) -> None:
                nf4_lora_ops.SAVES_FIRST = kind == "saves_first"

            try:
                alternate_saves = alternated(
                    args.alternate_saves_first, ("launch_first", "saves_first"), set_saves
                )
            finally:
                nf4_lora_ops.SAVES_FIRST = True
        if args.alternate_step_end:

            def set_end(kind: str) -> None:
                loop.SKIP_ON_DEVICE = kind == "device_skip"

            try:
                alternate_end = alternated(args.alternate_step_end, ("read_first", "device_skip"), set_end)
            finally:
                loop.SKIP_ON_DEVICE = True
        if args.alternate_uncheckpointed:
            kinds = ("all_checkpointed", f"last_{unckpt}_uncheckpointed")
            try:
                alternate_unckpt = alternated(
                    args.alternate_uncheckpointed,
                    kinds,
                    lambda k: loop.set_uncheckpointed_layers(model, 0 if k == kinds[0] else unckpt),
                )
            finally:
                loop.set_uncheckpointed_layers(model, unckpt)
        profile = None
        if args.profile and not cuda:
            print("--profile: no CUDA device, so no kernels to time: skipped")
        # (after the peak is read: the profiler's own memory is not counted; and after the
        # alternations, as steps that followed a profiled one have been seen to run slower)
        if args.profile and cuda:
            micro = [micro_batch() for _ in range(args.accum)]

            def one_step():
                train_step(micro)

            profile = device_breakdown(one_step)
            print_breakdown(profile)
    finally:
        restore_gc()

    # 4. report
    info = env_info()
    if argv is not None:  # called from Python: this benchmark's arguments, not the caller's command line
        info["command"] = " ".join(
            [os.path.basename(sys.executable), os.path.join("bench", os.path.basename(__file__)), *argv]
        )
    result = {
        **info,
        "model": "tiny" if args.tiny else "llama-3-8b-shaped",
        "shape": shape,
        "config": {
            "batch": args.batch,
            "seq": seq,
            "accum": args.accum,
            "tokens_per_step": tokens_per_step,
            "r": args.r,
            "alpha": 2 * args.r,
            "target_modules": "all-linear",
            "quantize": "nf4",
            "double_quant": True,
            "grad_ckpt": not args.no_grad_ckpt,
            "uncheckpointed_layers": unckpt,
            "uncheckpointed_auto": auto_why,
            "reserved_gib": args.reserve_gib if reserve is not None else 0.0,
            "dtype": str(dtype),
            "device": str(device),
            "attn_implementation": model.config._attn_implementation,
            "kernels": hoptune.kernels_available(),
            "fused_decoder_ops": fused,
            "compiled_layers": compiled,
        },
        "trainable_params": n_train,
        "total_params": n_total,
        "build_s": t_build,
        "quantize_s": t_quant,
        "weights_gib": weights_gib,
        "setup_peak_gib": setup_peak,
        "train_peak_gib": train_peak,
        "step_s": times,
        "mean_step_s": statistics.fmean(times),
        "median_step_s": med,
        "tokens_per_s": tokens_per_step / med,
        "losses": losses,
        "gc": gc_record,
    }
    if profile is not None:
        result["profile"] = profile
    if alternate is not None:
        result["alternate_fuse"] = alternate
    if alternate_saves is not None:
        result["alternate_saves_first"] = alternate_saves
    if alternate_end is not None:
        result["alternate_step_end"] = alternate_end
    if alternate_unckpt is not None:
        result["alternate_uncheckpointed"] = alternate_unckpt
    if args.compile:  # (this run's: the counters are the process's)
        now = _dynamo_counts()
        breaks = {k: v - dynamo_before[0].get(k, 0) for k, v in now[0].items()}
        breaks = {k: v for k, v in breaks.items() if v}
        result["compile"] = {
            "graph_breaks": sum(breaks.values()),
            "graph_break_reasons": {k[:300]: v for k, v in breaks.items()},
            "unique_graphs": now[1] - dynamo_before[1],
        }
        print(
            f"compiled: {result['compile']['unique_graphs']} graphs, {result['compile']['graph_breaks']} graph breaks"
        )
    mem = f", peak GPU memory {train_peak:.2f} GiB (setup {setup_peak:.2f} GiB)" if cuda else ""
    print(f"median step {med:.3f}s: {tokens_per_step / med:,.0f} tokens/s{mem}")
    if args.anchor_script is not None:
        del model, opt, sched, params, named, reserve
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        anchor = run_anchor(args.anchor_script)
        e2e = anchor[ANCHOR_SECTION]
        result["anchor"] = anchor
        result["vs_anchor"] = {
            "anchor_tokens_per_s": e2e["bnb_qlora_tok_per_s"],
            "anchor_peak_gib": e2e.get("bnb_qlora_peak_GiB"),
            "tokens_per_s_ratio": result["tokens_per_s"] / e2e["bnb_qlora_tok_per_s"],
            "train_peak_ratio": (
                train_peak / e2e["bnb_qlora_peak_GiB"]
                if train_peak is not None and e2e.get("bnb_qlora_peak_GiB")
                else None
            ),
        }
        v = result["vs_anchor"]
        peak = f", peak {v['anchor_peak_gib']:.2f} GiB" if v["anchor_peak_gib"] is not None else ""
        print(
            f"HF stack (transformers + bitsandbytes + PEFT, same run): {v['anchor_tokens_per_s']:,.0f} "
            f"tokens/s{peak}; ours {v['tokens_per_s_ratio']:.2f}x its tokens/s"
        )
    write_json(out, result)
    return result


if __name__ == "__main__":
    main()
