"""Supervised fine-tuning (LoRA / QLoRA / full), as a flat recipe.

    hoptune sft python/hoptune/configs/sft_qlora_8b.yaml model.path=/path/to/model data.train=my.jsonl

Steps: load model and tokenizer -> put in adapters (NF4 base for QLoRA) -> read, mask, check,
split, mix and pack the data -> AdamW + warmup/cosine -> for each optimizer step: every
micro-batch's masked NLL divided by the loss tokens of the *whole* step (TRL's SFT loss, with an
MoE model's load-balancing loss), one backward per micro-batch, clip, step -> eval, checkpoints,
metrics -> final adapter and plots.

Copy this file to make a variant; the shared pieces live in ``hoptune.train.loop``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hoptune._io import atomic_dir
from hoptune.config import ConfigError, SFTConfig, check_sft_config, config_to_dict, dump_config, load_config
from hoptune.data.dataset import (
    DataReport,
    StepSampler,
    fingerprint,
    load_examples,
    make_rows,
    mix_replay,
    split_eval,
)
from hoptune.data.formatting import resolve_chat_template, template_syntax_error
from hoptune.data.jsonl import DataError
from hoptune.data.packing import Row, collate, rows_from_examples
from hoptune.losses.sft import count_loss_tokens, sft_loss
from hoptune.train import loop

TINY = ("hoptune/tiny", "tiny")


@dataclass
class SFTResult:
    run_dir: str
    output_dir: str  # the final adapter (or full model) folder
    steps: int
    train_losses: list[float]
    eval: dict[str, float] | None
    plots: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    model: Any = None
    tokenizer: Any = None


def load_tokenizer(cfg: SFTConfig) -> Any:
    """The tokenizer alone (cheap), so the data can be checked before the model is loaded."""
    if cfg.model.path in TINY:
        from hoptune.models import build_tokenizer

        return build_tokenizer()
    if not os.path.isdir(cfg.model.path):
        raise ConfigError(
            f"model.path={cfg.model.path!r} is not a folder; hoptune trains local checkpoints (config.json + "
            "safetensors + tokenizer files) and never downloads, or the built-in model with model.path=hoptune/tiny"
        )
    path = cfg.model.path
    # (called only when the model too comes from model.path: a folder that is no model is said so)
    _check_model_folder(path)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:  # no tokenizer files, or files transformers cannot read
        why = str(e).strip().split("\n")[0]
        why = "" if why.rstrip().endswith("from one of:") else f" ({why})"  # (an empty list of files)
        raise ConfigError(
            f"model.path={path!r}: cannot load its tokenizer{why}; the folder needs the tokenizer files "
            "(tokenizer.json, tokenizer_config.json) saved with the model"
        ) from e


def _check_model_folder(path: str) -> None:
    """ConfigError when the folder ``model.path`` names has no config.json (an adapter folder named
    as one)."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        adapter = os.path.join(path, "adapter_config.json")
        if os.path.isfile(adapter):  # (a run's adapter/ passed as the model)
            base = None
            try:
                with open(adapter, encoding="utf-8") as f:
                    base = json.load(f).get("base_model_name_or_path")
            except (OSError, ValueError, AttributeError):
                pass
            named = f" (its base: {base!r})" if base else ""
            raise ConfigError(
                f"model.path={path!r} is a LoRA adapter folder{named}, not a model; model.path takes the "
                "base model's folder (config.json + safetensors + tokenizer files)"
            )
        raise ConfigError(
            f"model.path={path!r} has no config.json; it takes a checkpoint folder as save_pretrained "
            "writes it (config.json + safetensors + tokenizer files)"
        )


def base_model_name(cfg: SFTConfig, model: nn.Module | None = None) -> str | None:
    """The base an adapter names (its ``base_model_name_or_path``): ``model.path``, or for a model
    passed in while ``model.path`` is at the built-in model, that model's own name, as PEFT records
    it (``config._name_or_path``; None when it has none: no base is better than a wrong one)."""
    if model is None or cfg.model.path not in TINY:
        return cfg.model.path
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None)
    return os.fspath(name) if isinstance(name, (str, os.PathLike)) and os.fspath(name) else None


def load_base_model(cfg: SFTConfig, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The base model: NF4 on load for a checkpoint folder with model.quantize=nf4 (QLoRA)."""
    m = cfg.model
    if m.skip_modules and (m.quantize is None or not cfg.lora.enabled):
        raise ConfigError(
            f"model.skip_modules={m.skip_modules!r} keeps layers out of NF4 quantization, and this run "
            "quantizes none (model.quantize=null or lora.enabled=false): leave it null"
        )
    if m.skip_modules and m.path in TINY:
        raise ConfigError(
            f"model.skip_modules={m.skip_modules!r} names layers of a checkpoint folder to keep "
            f"dense, and model.path={m.path!r} is the built-in model: leave it null"
        )
    try:
        if m.path in TINY:
            from hoptune.models import load_tiny

            model, _ = load_tiny(device=device, dtype=dtype, log=print)
            if m.attn_implementation is not None:
                model.set_attn_implementation(m.attn_implementation)
            return model
        from hoptune.loading import load_model

        return load_model(
            m.path,
            quantize=m.quantize if cfg.lora.enabled else None,
            device=device,
            dtype=dtype,
            double_quant=m.double_quant,
            skip_modules=m.skip_modules or (),
            attn_implementation=m.attn_implementation,
        )
    except (ValueError, ImportError) as e:
        # transformers refuses an attention implementation it does not know (ValueError) or whose
        # package is missing (ImportError: "FlashAttention2 has been toggled on, but ...")
        missing = isinstance(e, ImportError)
        if m.attn_implementation is not None and (missing or "attn" in str(e).lower()):
            why = str(e).strip()
            if missing:
                why = why.rstrip(".") + "; install it, or use model.attn_implementation=sdpa "
                why += "(null: transformers' default)"
            raise ConfigError(f"model.attn_implementation={m.attn_implementation!r}: {why}") from e
        if isinstance(e, ValueError) and m.path not in TINY:
            # load_model refuses a checkpoint it cannot read (truncated, another configuration, an MoE
            # layout transformers converts while loading) with a message that says why
            raise ConfigError(f"model.path={m.path!r}: {e}") from e
        raise


def _nf4_layers(model: nn.Module) -> list[str]:
    from hoptune.nn import NF4Linear

    return [n for n, m in model.named_modules() if isinstance(m, NF4Linear)]


def prepare_model(model: nn.Module, cfg: SFTConfig, passed_in: bool = False, log=None) -> nn.Module:
    """Adapters (or full fine-tuning), fused decoder ops, gradient checkpointing, train mode. A model that already has
    LoRA layers keeps them (and trains whichever of their parameters require grad); with
    lora.enabled=false it is refused. ``passed_in``: the model is not ``model.path``'s (a caller
    built it), and errors name it, not that path."""
    lo = cfg.lora
    peft_layers = [n for n, m in model.named_modules() if type(m).__module__.split(".")[0] == "peft"]
    if peft_layers:
        # apply_lora would put hoptune's LoRA inside PEFT's (on its base_layer, lora_A and lora_B) and
        # train and save that nesting, which no loader reads back
        raise ValueError(
            f"the model holds PEFT layers ({peft_layers[0] or type(model).__name__}...): hoptune trains its own "
            "LoRA layers. Pass the plain base model, or load a PEFT adapter to train on with "
            "hoptune.load_adapter(model, adapter_dir, trainable=True)"
        )
    if cfg.model.gradient_checkpointing and getattr(model, "supports_gradient_checkpointing", True) is False:
        # (said before the model changes; transformers' own refusal, raised once the adapters were in,
        # was reported as one of model.uncheckpointed_layers, whatever its value)
        who = "the model passed in" if passed_in else cfg.model.path
        raise ConfigError(
            f"model.gradient_checkpointing=true, but {who} ({type(model).__name__}) does not support "
            "activation checkpointing in transformers; set model.gradient_checkpointing=false"
        )
    if lo.enabled and loop.has_lora(model):
        pass  # adapters already in place (e.g. hoptune.load_adapter(..., trainable=True)): train those
    elif lo.enabled:
        from hoptune.patch import ALL_LINEAR, apply_lora

        # a model with NF4 layers already (load_model's, or a checkpoint's as stored) has every layer
        # transformers + bitsandbytes quantize in NF4, and the others dense on purpose: a weight NF4
        # blocks cannot fill (which apply_lora's quantize refuses) or one tied to another's (which it
        # would quantize twice, untied); its adapters go over the layers as they are
        quantize = None if _nf4_layers(model) else cfg.model.quantize
        try:  # apply_lora checks every argument and layer before it changes anything
            apply_lora(
                model,
                r=lo.r,
                alpha=lo.alpha,
                dropout=lo.dropout,
                target_modules=lo.target_modules,
                use_dora=lo.use_dora,
                use_rslora=lo.use_rslora,
                quantize=quantize,
                # for the layers it quantizes: NF4 layers (load_model's, or a checkpoint's as stored)
                # keep their own, and apply_lora would warn about the config's default
                double_quant=None if quantize is None else cfg.model.double_quant,
            )
        except (ValueError, TypeError) as e:
            hint, msg = "", str(e)
            if (
                isinstance(lo.target_modules, str)
                and lo.target_modules.lower() != ALL_LINEAR
                and "target_modules" in msg
            ):
                hint = (
                    "; in a config a list is lora.target_modules=[q_proj, v_proj] (on the command line "
                    "lora.target_modules=q_proj,v_proj, or [q_proj] for one name)"
                    if "a string is a regular expression" in msg
                    else "; a string in lora.target_modules is a regular expression matched against the whole "
                    "module name, a list ([q_proj, v_proj]) matches names"
                )
            elif "is larger than layer" in msg and "; give it a smaller rank" in msg:
                # (apply_lora's advice names its own arguments, which the config has no keys for)
                msg = msg.split("; give it a smaller rank")[0]
                hint = (
                    "; lower lora.r, or name the layers to adapt in lora.target_modules instead, a list "
                    "([q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]) or a regular "
                    "expression (lora.* has no exclude_modules or rank_pattern)"
                )
            elif "exclude_modules" in msg or "rank_pattern" in msg:
                # (apply_lora's advice names its arguments, which the config has no keys for)
                hint = (
                    "; lora.* has no exclude_modules or rank_pattern: name the layers to adapt "
                    "in lora.target_modules instead, a list ([q_proj, k_proj, v_proj, o_proj, "
                    "gate_proj, up_proj, down_proj]) or a regular expression"
                )
            who = f"the model passed in ({type(model).__name__})" if passed_in else cfg.model.path
            raise ConfigError(f"lora settings do not fit {who}: {msg}{hint}") from e
    elif loop.has_lora(model):
        # every weight would train, but checkpoints and the output hold an adapter: the LoRA factors
        # alone (the base weights' training lost, a resume not bringing it back)
        raise ValueError(
            "lora.enabled=false (full fine-tuning) but the model holds LoRA layers, whose checkpoints and "
            "output are the adapter alone. Set lora.enabled=true to train those adapters, or pass a plain "
            "model (fold them in first with hoptune.merge_and_unload(model))"
        )
    else:
        nf4 = _nf4_layers(model)
        if nf4:
            # (a pre-quantized checkpoint loads as stored, model.quantize=null too): NF4 weights are
            # buffers, so the rest alone would train, and model/ would be saved without them
            own = not passed_in and cfg.model.path not in TINY
            src = f"; model.path={cfg.model.path!r} is in NF4" if own else ""
            raise ConfigError(
                "lora.enabled=false (full fine-tuning) but the model holds NF4 layers "
                f"({nf4[0]}...{src}), whose weights cannot train. Use lora.enabled=true (QLoRA "
                "over the NF4 base), or a dense checkpoint"
            )
        for p in model.parameters():
            p.requires_grad_(True)
    if cfg.model.fuse_decoder_ops:
        from hoptune.fusion import fuse_decoder_ops, fused_counts

        fused = fused_counts(model)
        if not any(fused.values()):  # (a model passed in fused already keeps the caller's choice)
            fused = fuse_decoder_ops(model)
        if log is not None:
            log("fused decoder ops: " + ", ".join(f"{n} {kind}" for kind, n in fused.items()))
    if cfg.model.gradient_checkpointing:
        n = cfg.model.uncheckpointed_layers
        if n == "auto":
            n, why = auto_uncheckpointed(model, cfg)
            if log is not None:
                log(f"model.uncheckpointed_layers=auto: {why}")
        try:
            loop.enable_gradient_checkpointing(model, n)
        except ValueError as e:
            raise ConfigError(f"model.uncheckpointed_layers={n}: {e}") from None
    model.train()
    return model


class StepOutOfMemory(torch.OutOfMemoryError):
    """A training step ran out of GPU memory (a torch.OutOfMemoryError whose message says what to change)."""


def out_of_memory(cfg: SFTConfig, model: nn.Module, step: int, total: int, latest) -> StepOutOfMemory:
    """The error for a training step that ran out of GPU memory: what the step held, that nothing
    was saved, and the settings that make a step smaller, the ones this run uses first."""
    m, t = cfg.model, cfg.train
    where = ""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        gib = 2**30
        where = (
            f" (peak {torch.cuda.max_memory_allocated() / gib:.1f} GiB allocated by this run, "
            f"{torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / gib:.1f} GiB on the GPU)"
        )
    layers = loop.decoder_layers(model)
    whole = [layer for layer in layers if not getattr(layer, "gradient_checkpointing", False)]
    tips = []
    if m.gradient_checkpointing and whole:
        tips.append(
            f"fewer model.uncheckpointed_layers (set to {m.uncheckpointed_layers}, so {len(whole)} of "
            f"{len(layers)} decoder layers are not checkpointed)"
        )
    elif not m.gradient_checkpointing:
        tips.append(
            "model.gradient_checkpointing=true (each layer recomputed instead of keeping its activations)"
        )
    tips.append(
        f"a smaller train.batch_size (now {t.batch_size}) with a larger train.grad_accum: the same rows a step"
    )
    tips.append(f"a shorter data.max_seq_len (now {cfg.data.max_seq_len})")
    if m.quantize is None and cfg.lora.enabled:
        tips.append("model.quantize=nf4 (QLoRA: the frozen base in 4 bits)")
    kept = f"the newest checkpoint, {latest}, is untouched" if latest else "there is no checkpoint"
    return StepOutOfMemory(
        f"training step {step} of {total} ran out of GPU memory{where}; nothing was saved for it ({kept}). "
        f"To fit, try {'; '.join(tips)}. `hoptune plan` estimates a step's memory before you run it"
    )


# model.uncheckpointed_layers=auto plans the step's peak beyond the loaded weights (hoptune plan's
# estimate, allocator slack included) within this fraction of the GPU memory free or cached unused
AUTO_MEMORY_FRACTION = 0.9


def auto_uncheckpointed(
    model: nn.Module, cfg: SFTConfig, device: torch.device | None = None
) -> tuple[int, str]:
    """(n, why): the most decoder layers that can run without checkpointing (the last n) such that
    ``hoptune plan``'s estimate of the step (micro-batches of train.batch_size rows of
    data.max_seq_len tokens, the allocator's slack included), less the model's weights (on the GPU
    already), stays within AUTO_MEMORY_FRACTION of the GPU memory still to be had: free, or cached
    by this process and unused. Memory the process holds otherwise is not counted as available.
    0 on a CPU, for full fine-tuning and 32-bit models, or where the plan cannot read the model.
    ``device``: the model's (its first parameter's) when None."""
    layers = len(loop.decoder_layers(model))
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    if device.type != "cuda":
        return 0, f"on {device.type} every layer stays checkpointed (0 of {layers} without)"
    from hoptune.plan import plan as plan_step

    lc = cfg.lora
    if not lc.enabled:
        return 0, "hoptune plan estimates LoRA training, not full fine-tuning: every layer stays checkpointed"
    kwargs = dict(
        seq=cfg.data.max_seq_len,
        batch=cfg.train.batch_size,
        r=lc.r,
        target_modules=lc.target_modules,
        quantize=cfg.model.quantize,
        double_quant=cfg.model.double_quant,
        use_dora=lc.use_dora,
        alternatives=False,
    )
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    dtype = getattr(getattr(emb, "weight", None), "dtype", None)
    if dtype not in (torch.bfloat16, torch.float16):
        return (
            0,
            f"hoptune plan estimates 16-bit models, this one computes in {dtype}: every layer stays checkpointed",
        )

    def need(u: int) -> tuple[float, float]:
        """(the step's planned peak with the allocator's slack, what it adds to the weights)"""
        p = plan_step(model.config, uncheckpointed=u, **kwargs)
        if p.layers != layers:
            raise ValueError(f"it reads {p.layers} decoder layers in the config, the model has {layers}")
        return p.peak + p.slack, p.peak + p.slack - p.weights

    free, _ = torch.cuda.mem_get_info(device)
    unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    capacity = AUTO_MEMORY_FRACTION * (free + unused)
    try:
        # the planned peak grows with the count up to layers - 1; with every layer uncheckpointed
        # none is recomputed, a little below that
        lo, hi = (layers, layers) if need(layers)[1] <= capacity else (0, layers - 1)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if need(mid)[1] <= capacity:
                lo = mid
            else:
                hi = mid - 1
        n, (planned, extra) = lo, need(lo)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        return 0, f"hoptune plan cannot estimate this model ({e}): every layer stays checkpointed"
    gib = 2**30
    said = (
        f"planned peak {planned / gib:.1f} GiB with slack, {extra / gib:.1f} GiB of it beyond the "
        f"weights, against {AUTO_MEMORY_FRACTION:.0%} of {capacity / AUTO_MEMORY_FRACTION / gib:.1f} GiB free"
    )
    if extra > capacity:
        return 0, (
            f"every layer stays checkpointed, and even so the step may run out of memory ({said}; "
            "hoptune plan shows what takes it)"
        )
    return n, f"the last {n} of {layers} decoder layers without checkpointing ({said})"


def load_data(cfg: SFTConfig, tokenizer: Any, log=print) -> tuple[list[Row], list[Row], list[DataReport]]:
    """(train rows, eval rows, reports): examples checked and truncated, eval split or read, the
    replay source mixed in, packing applied to the training rows."""
    d = cfg.data
    for key in ("train", "eval", "general_data"):  # (named by key: three paths may be set)
        path = getattr(d, key)
        if path and not os.path.exists(path):
            where = "" if os.path.isabs(path) else f", relative to the current folder, {os.getcwd()}"
            raise DataError(f"data file {path!r} does not exist (data.{key}{where})")
    try:  # a name of one of the tokenizer's chat templates is checked only now
        chat_template = resolve_chat_template(cfg.model.chat_template, tokenizer)
    except (OSError, ValueError) as e:
        raise ConfigError(str(e)) from None
    # before any example is read, chat data or not: the run saves the template with its adapter
    bad = template_syntax_error(tokenizer, chat_template) if isinstance(chat_template, str) else None
    if bad:
        raise ConfigError(f"the chat template (model.chat_template) is not valid Jinja: {bad}")
    kw = dict(
        max_seq_len=d.max_seq_len,
        truncation=d.truncation,
        add_eos=d.add_eos,
        chat_template=chat_template,
        skip_bad=d.skip_bad_examples,
    )
    train, rep = load_examples(d.train, tokenizer, **kw)
    reports = [rep]
    if d.eval:
        evals, rep_e = load_examples(d.eval, tokenizer, **kw)
        reports.append(rep_e)
        if d.eval_fraction:
            log(f"data.eval is set: data.eval_fraction={d.eval_fraction} is not used (nothing is split off)")
        with contextlib.suppress(OSError):
            if os.path.samefile(d.eval, d.train):
                log(
                    f"warning: data.eval is the same file as data.train ({d.train}): its eval loss is on "
                    "rows the run trains on, which says nothing of held-out data (data.eval_fraction "
                    "holds some out instead)"
                )
    else:
        n = len(train)
        train, evals = split_eval(train, d.eval_fraction, cfg.train.seed)
        if evals:
            log(f"data.eval_fraction={d.eval_fraction}: {len(evals)} of the {n} examples held out for eval")
    if d.general_data:
        general, rep_g = load_examples(d.general_data, tokenizer, **kw)
        reports.append(rep_g)
        n_train = len(train)
        train, added = mix_replay(train, general, d.general_fraction, cfg.train.seed)
        if added:  # (rounded to whole examples: of few, not quite the share asked for)
            log(
                f"replay: {added} examples from {d.general_data} mixed in ({added / len(train):.0%} of "
                f"{len(train)} training examples; data.general_fraction={d.general_fraction:g})"
            )
        elif d.general_fraction:
            log(
                f"replay: warning: no example from {d.general_data} mixed in: data.general_fraction="
                f"{d.general_fraction:g} of {n_train} training examples rounds to none; raise "
                "data.general_fraction to mix some in"
            )
    rows = make_rows(train, d.packing, d.max_seq_len)
    if d.packing:
        log(f"packing: {len(train)} examples -> {len(rows)} rows of <= {d.max_seq_len} tokens")
    eval_rows = rows_from_examples(sorted(evals, key=len))  # similar lengths together: less padding
    return rows, eval_rows, reports


def eval_batches(rows: list[Row], batch_size: int, pad_id: int):
    for i in range(0, len(rows), batch_size):
        yield collate(rows[i : i + batch_size], pad_id)


def sft_step(
    model: nn.Module,
    micro_batches: list[dict[str, Any]],
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
    read: bool = True,
) -> tuple[float | torch.Tensor, int, int]:
    """Forward + backward of one optimizer step's micro-batches (gradients accumulate in ``.grad``).

    Each micro-batch's loss is its masked NLL sum divided by the loss tokens of *all* the
    micro-batches, so the accumulated gradient is that of TRL's SFT loss over the whole step; for
    an MoE model (``loop.router_aux_coef``) plus its load-balancing loss, weighted as TRL does.
    ``scaler``: fp16's loss scaling (the gradients come scaled, ``loop.optimizer_step`` unscales them).
    Returns (loss of the step, loss tokens, tokens); the loss a number, or with ``read=False`` a
    0-dim float32 tensor on the device, not read back (``loop.optimizer_step`` reads it after the
    optimizer's launches). Inside a ``loop.InterruptLatch`` a Ctrl-C raises KeyboardInterrupt before
    the next micro-batch."""
    n_loss = count_loss_tokens([b["loss_mask"][:, 1:] for b in micro_batches])
    if n_loss == 0:
        raise ValueError("an optimizer step has no loss token; the data checks should have caught this")
    total = torch.zeros((), dtype=torch.float32, device=device)  # summed on device: no sync per micro-batch
    tokens = 0
    coef = loop.router_aux_coef(model)
    for b in micro_batches:
        loop.check_interrupt()  # (a Ctrl-C in the training loop stops here, between micro-batches)
        tokens += int(b["num_tokens"])
        if not bool(b["loss_mask"][:, 1:].any()):
            continue
        b = loop.to_device(b, device)
        if coef:
            # an MoE model's load-balancing loss, as TRL adds it: weighted by the config's
            # router_aux_loss_coef and averaged over the step's micro-batches
            logprobs, _, aux = loop.batch_logprobs_and_router_aux(model, b)
            loss = sft_loss(logprobs, None, n_loss) + coef * aux.float() / len(micro_batches)
        else:
            logprobs, _ = loop.batch_logprobs(model, b)
            loss = sft_loss(logprobs, None, n_loss)
        (loss if scaler is None else scaler.scale(loss)).backward()
        total += loss.detach()
    return (float(total) if read else total), n_loss, tokens


def _resume_folder(cfg: SFTConfig, ckpt: loop.Checkpointer, log=print) -> str | None:
    r = cfg.output.resume
    latest = ckpt.latest()
    if r is True or r == "auto":
        if latest is None and r is True:
            raise ConfigError(f"output.resume=true but {ckpt.dir} has no checkpoint")
        named = ckpt.pointed()
        if (
            named
            and latest
            and os.path.basename(latest) != named
            and os.path.isdir(os.path.join(ckpt.dir, named))
        ):
            # (a checkpoint whose state file went: said, not resumed from an older one in silence)
            log(
                f"{os.path.join(ckpt.dir, loop.LATEST)} names {named}, which has no {loop.STATE_FILE}: "
                f"resuming from the newest checkpoint that has one, {os.path.basename(latest)}"
            )
        return latest
    if r is False:
        if latest is not None:
            raise ConfigError(
                f"output.dir {cfg.output.dir!r} already has checkpoints ({os.path.basename(latest)}); use "
                "output.resume=auto to continue that run, or another output.dir"
            )
        return None
    if not os.path.isfile(os.path.join(r, loop.STATE_FILE)):
        what = f"output.resume={r!r} is not a checkpoint folder (no {loop.STATE_FILE})"
        raise ConfigError(f"{what}; {_resume_hint(r)}")
    return r


# the first line of the resolved config a run writes into output.dir
RESOLVED_HEADER = "# the resolved config of the hoptune sft run in this folder, written by the run\n"


def _config_path(run_dir: str) -> str:
    """Where the run writes its resolved config: ``config.yaml``, unless one is there that no run
    wrote (a config kept in the folder it names as output.dir, comments and all), which is never
    overwritten: then ``config.resolved.yaml``. A run's own is one with the header, or (written
    before the header was) exactly a dump of the config it holds."""
    path = os.path.join(run_dir, "config.yaml")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return path
    except (OSError, UnicodeDecodeError):
        return os.path.join(run_dir, "config.resolved.yaml")
    if text.startswith(RESOLVED_HEADER):
        return path
    import yaml

    try:
        own = yaml.safe_dump(yaml.safe_load(text), sort_keys=False) == text
    except yaml.YAMLError:
        own = False
    return path if own else os.path.join(run_dir, "config.resolved.yaml")


def _afresh(cfg: SFTConfig, ckpt: loop.Checkpointer) -> str:
    """How a refused resume starts over instead: another run's checkpoint named by output.resume
    into an output.dir with none of its own (a new output.dir already) by leaving output.resume
    out, else in a new output.dir."""
    r = cfg.output.resume
    if isinstance(r, str) and r != "auto" and ckpt.latest() is None:
        return "without output.resume"
    return "in a new output.dir"


def _damaged(folder: str, e: Exception, afresh: str) -> ConfigError:
    """The error for a checkpoint with a file that cannot be read, naming the one before it."""
    parent, name = os.path.split(os.path.normpath(folder))
    m = re.fullmatch(r"step-(\d+)", name)
    earlier = [n for n in loop.step_folders(parent) if m and int(n[5:]) < int(m[1])]
    hint = (
        f"resume from the checkpoint before it with output.resume={os.path.join(parent, earlier[-1])}"
        if earlier
        else f"start again {afresh}"
    )
    return ConfigError(f"cannot resume from {folder}: the checkpoint is damaged, {e}; {hint}")


def _read_checkpoint_state(folder: str, afresh: str) -> dict[str, Any]:
    try:
        return loop.Checkpointer.read_state(folder)
    except loop.CheckpointError as e:
        raise _damaged(folder, e, afresh) from e


def _resume_hint(r: str) -> str:
    """What output.resume takes instead of ``r``: the newest checkpoint of the run ``r`` names (its
    folder, its checkpoints/ or the ``latest`` pointer file in there), else what one looks like."""
    path = os.path.abspath(r)
    if os.path.basename(path) == loop.LATEST and os.path.isfile(path):
        path = os.path.dirname(path)
    run = os.path.dirname(path) if os.path.basename(path) == "checkpoints" else path
    try:
        latest = loop.Checkpointer(run).latest() if os.path.isdir(run) else None
    except OSError:  # (a folder it may not read: the hint below still holds)
        latest = None
    if latest is not None:
        return f"give one of its run's checkpoints, the newest is output.resume={latest}"
    return (
        "give a checkpoint folder (<run>/checkpoints/step-N), or output.resume=auto to continue "
        "from the newest checkpoint of output.dir"
    )


def _resume_settings(cfg: SFTConfig, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The settings a resumed run must share with the run that wrote its checkpoint, by config key:
    the optimizer and its schedule (their state comes back from the checkpoint, so a new value would
    be silently ignored), the seed (the data order), gradient clipping, the base model (its folder)
    and its precision (quantized or not, and how: the function the weights were trained in) and the
    adapters (the weights that come back, and their dropout). Checkpoints store them;
    ``_check_resume`` compares them. ``dtype``: what model.dtype resolved to on this machine
    (``auto`` is bf16 on a GPU and fp32 on a CPU: the same setting, another function)."""
    t, lo, m = cfg.train, cfg.lora, cfg.model
    adapters = {  # (a full fine-tuning run trains no adapter: its lora.* keys do not matter)
        "lora.r": lo.r,
        "lora.alpha": lo.alpha,
        "lora.dropout": lo.dropout,
        # (as JSON keeps it: a tuple comes back from the checkpoint as a list)
        "lora.target_modules": lo.target_modules
        if isinstance(lo.target_modules, str)
        else list(lo.target_modules),
        "lora.use_dora": lo.use_dora,
        "lora.use_rslora": lo.use_rslora,
    }
    return {
        "train.seed": t.seed,
        "train.lr": t.lr,
        "train.lr_schedule": t.lr_schedule,
        "train.warmup_steps": t.warmup_steps,
        "train.warmup_ratio": t.warmup_ratio,
        "train.min_lr_ratio": t.min_lr_ratio,
        "train.weight_decay": t.weight_decay,
        "train.betas": list(t.betas),
        "train.eps": t.eps,
        "train.max_grad_norm": t.max_grad_norm,
        "model.path": _base_model_id(m.path),
        "model.dtype": m.dtype,
        **({"model.dtype (resolved)": _DTYPE_NAMES.get(dtype, str(dtype))} if dtype is not None else {}),
        "model.quantize": m.quantize,
        # (double quantization changes the base's values only when it is quantized)
        **({"model.double_quant": m.double_quant} if m.quantize else {}),
        # (the layers kept dense: only where some are named, as a run before the key compares)
        **({"model.skip_modules": list(m.skip_modules)} if m.quantize and m.skip_modules else {}),
        "lora.enabled": lo.enabled,
        **(adapters if lo.enabled else {}),
    }


_DTYPE_NAMES = {dtype: name for name, dtype in loop.DTYPES.items()}


def _base_model_id(path: str) -> str:
    """``model.path`` as a resume compares it: the folder itself (a relative path, a link or another
    spelling of the same folder is the same base), or the built-in model under either name."""
    return TINY[0] if path in TINY else os.path.realpath(path)


def _unused_length_settings(t, total: int, warmup: int) -> list[str]:
    """What of the run's length and warmup settings does not act (as in transformers, where
    max_steps overrides num_train_epochs and warmup_steps warmup_ratio), said rather than silent."""
    notes = []
    if t.max_steps and t.epochs not in (0, type(t)().epochs):  # (0: the config check's own advice)
        notes.append(
            f"train.epochs={t.epochs:g} is not used: train.max_steps={t.max_steps} sets the run's length"
        )
    if t.warmup_steps and t.warmup_ratio:
        notes.append(
            f"train.warmup_ratio={t.warmup_ratio:g} is not used: train.warmup_steps={t.warmup_steps} is set"
        )
    if warmup >= total:
        notes.append(
            f"warmup of {warmup} steps is not shorter than the run ({total} steps): the learning rate "
            f"does not reach train.lr={t.lr:g}"
        )
    return notes


def _base_fingerprint(path: str) -> str | None:
    """What identifies a base model folder wherever it lies: its config.json and, for each weights file,
    its name, size, first and last 64 KiB (a fine-tune of the same architecture has the same config and
    sizes, not the same bytes). None for the built-in model or a path that is not a folder."""
    if path in TINY or not os.path.isdir(path):
        return None
    h = hashlib.sha256()
    chunk = 1 << 16
    for name in sorted(os.listdir(path)):
        if name != "config.json" and not name.endswith((".safetensors", ".bin")):
            continue
        file = os.path.join(path, name)
        size = os.path.getsize(file)
        h.update(f"{name}\0{size}\0".encode())
        with open(file, "rb") as f:
            h.update(f.read(chunk))
            if size > chunk:
                f.seek(max(chunk, size - chunk))
                h.update(f.read())
    return h.hexdigest()


def _model_fingerprint(model: nn.Module) -> str:
    """What identifies the base weights while ``model.path`` is the built-in model (which names
    neither it nor a model passed to ``train``): the name, shape, dtype and first and last 4096
    values of each frozen parameter and buffer, as ``prepare_model`` leaves them (a fine-tune of the
    same architecture has the same names and shapes, not the same values). 16 hex digits."""
    h = hashlib.sha256()
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    for name, t in sorted(frozen + list(model.named_buffers()), key=lambda nt: nt[0]):
        h.update(f"{name}\0{tuple(t.shape)}\0{t.dtype}\0".encode())
        if t.is_meta or t.numel() == 0:
            continue
        flat = t.detach().reshape(-1)
        for part in (flat[:4096], flat[-4096:]):
            h.update(part.contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _moved_base(state: dict[str, Any], now: dict[str, Any], fp: str | None) -> str | None:
    """The base folder a checkpoint recorded, when it no longer exists and ``model.path`` now names
    the same files (``fp``: their ``_base_fingerprint``): the base moved, and the run resumes on it."""
    was = (state.get("settings") or {}).get("model.path")
    if was is None or was == now.get("model.path") or was == TINY[0] or os.path.exists(was):
        return None
    return was if fp is not None and state.get("base_fingerprint") == fp else None


# what sets each value a checkpoint records under a name of its own (the others are config keys)
_RESUME_FIELDS = {
    "data_fingerprint": "the training rows (data.train, data.general_data, data.general_fraction, "
    "data.max_seq_len, data.truncation, data.packing, data.add_eos, data.skip_bad_examples, "
    "data.eval_fraction, model.chat_template and the tokenizer)",
    "eval_fingerprint": "the held-out rows (data.eval, or data.train with data.eval_fraction, and as for the training "
    "rows data.max_seq_len, data.truncation, data.add_eos, data.skip_bad_examples, "
    "model.chat_template and the tokenizer)",
    "rows_per_step": "train.batch_size x train.grad_accum",
    "total_steps": "train.max_steps, or train.epochs with the number of rows",
    "data_order": "train.max_steps (steps) or train.epochs alone (whole epochs)",
    "model_fingerprint": "the frozen weights of the model passed to sft.train, else of the "
    "built-in model, model.path being the built-in model",
}


def _same_setting(key: str, was: Any, now: Any) -> bool:
    if key == "lora.target_modules" and isinstance(was, list) and isinstance(now, list):
        return set(was) == set(now)  # a list names a set of layers (PEFT's rule): order aside
    return was == now


def _row_settings_changed(folder: str, cfg: SFTConfig) -> list[str]:
    """The settings that make the rows (data.*, model.chat_template), which a checkpoint does not
    record, whose values in ``cfg`` differ from those in the resolved config of the run that wrote
    checkpoint ``folder`` (``<run>/config.yaml``, written once a run's checks pass), each said as
    "key was X and is now Y"; [] when that file is not there or cannot be read."""
    checkpoints = os.path.dirname(os.path.abspath(folder))
    if os.path.basename(checkpoints) != "checkpoints":
        return []
    try:
        was = config_to_dict(load_config(_config_path(os.path.dirname(checkpoints))))
    except (ConfigError, OSError):
        return []
    now = config_to_dict(cfg)
    keys = [("data", k) for k in now["data"]] + [("model", "chat_template")]
    return [
        f"{a}.{b} was {was[a].get(b)!r} and is now {now[a][b]!r}"
        for a, b in keys
        if was[a].get(b) != now[a][b]
    ]


def _check_resume(
    folder: str, state: dict[str, Any], now: dict[str, Any], afresh: str, rows_by: list[str] | None = None
) -> None:
    """ConfigError naming every key of ``now`` whose value differs from the checkpoint's ``state``.
    Settings a checkpoint of an older hoptune does not record are not compared (but its seed is).
    ``afresh``: how to start over instead (``_afresh``); ``rows_by``: the row-making settings that
    differ from the run's config.yaml (``_row_settings_changed``), named when the rows differ."""
    was = {k: state.get(k) for k in ("data_fingerprint", "rows_per_step", "total_steps")}
    if "eval_fingerprint" in state:  # (not recorded by older checkpoints)
        was["eval_fingerprint"] = state["eval_fingerprint"]
    if state.get("model_fingerprint") is not None:  # (a model passed in; not recorded by older checkpoints)
        was["model_fingerprint"] = state["model_fingerprint"]
    was["data_order"] = state.get("data_order", "steps")
    was.update(state.get("settings") or {"train.seed": state.get("seed")})
    if "model.dtype (resolved)" in was:
        # the precision trained in is what counts: model.dtype=bf16 resumes a GPU's auto run on a CPU
        was.pop("model.dtype", None)
    changed = [
        f"{k}{f' ({_RESUME_FIELDS[k]})' if k in _RESUME_FIELDS else ''} was {was[k]!r} and is now {v!r}"
        for k, v in now.items()
        if k in was and not _same_setting(k, was[k], v)
    ]
    if "model.path" in now and was.get("model.path") not in (None, now["model.path"], TINY[0]):
        if not os.path.exists(was["model.path"]):
            changed.append(
                f"{was['model.path']} no longer exists: a moved base resumes from its new folder when its "
                "files (config.json, weights) are the ones the run started on"
            )
    if any(c.startswith("model.dtype (resolved) ") for c in changed):
        changed.append(
            "model.dtype=auto is bf16 on a GPU and fp32 on a CPU: set model.dtype to the precision the "
            "run was trained in"
        )
    if any(c.startswith("model_fingerprint ") for c in changed):
        changed.append(
            "pass the model that run was started with (the same base weights), or none if it "
            "trained the built-in model"
        )
    if changed:
        keys = [k for k, v in now.items() if k in was and not _same_setting(k, was[k], v)]
        if keys and set(keys) <= {"data_fingerprint", "eval_fingerprint"}:
            # no recorded setting differs: the data.* keys and model.chat_template (not recorded), the
            # files' contents or the tokenizer made other rows
            if rows_by:
                what = (
                    f"The rows differ; of the settings that make them (a checkpoint does not record "
                    f"them), these differ from that run's config.yaml: {'; '.join(rows_by)}. Train on "
                    f"the rows of that run, or on these {afresh}"
                )
            else:
                what = (
                    "No setting a checkpoint records changed: the rows differ, by the data.* keys or "
                    "model.chat_template of the config, the contents of the data files, or the tokenizer. "
                    f"Train on the rows of that run, or on these {afresh}"
                )
        else:
            what = f"Use the config that run was started with (see its config.yaml), or start afresh {afresh}"
        raise ConfigError(f"cannot resume exactly from {folder}: {'; '.join(changed)}. {what}")


def train(cfg: SFTConfig, log=print, model: nn.Module | None = None, tokenizer: Any = None) -> SFTResult:
    """Run the recipe; returns where things went, the losses and the trained model.

    ``model`` / ``tokenizer``: an already-built model (with or without adapters) to train instead
    of loading ``cfg.model.path`` (tests and benchmarks use this)."""
    check_sft_config(cfg)
    try:
        device = loop.resolve_device(cfg.model.device)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(f"model.device: {e}") from e
    run_dir = os.path.abspath(cfg.output.dir)
    entered, created = False, []
    try:
        created = _make_run_dir(run_dir)
        # (a folder that cannot be made, or cannot take the lock file, is named as output.dir)
        with loop.run_lock(run_dir):
            entered = True
            try:
                return _train(cfg, log, model, tokenizer, device, run_dir)
            except BaseException:
                # a run refused before it wrote anything (a missing data file, a resume that cannot
                # be exact, lora settings that do not fit) leaves no folder of its own behind
                _remove_unused_run_dir(run_dir, created)
                raise
    except loop.FolderInUse as e:
        raise ConfigError(f"output.dir: {e}") from e
    except OSError as e:
        if entered:  # (in the run: its own message)
            raise
        for path in created:  # (the folders made for it, empty)
            with contextlib.suppress(OSError):
                os.rmdir(path)
        why = e.strerror or type(e).__name__
        where = f" ({e.filename})" if e.filename and os.path.abspath(e.filename) != run_dir else ""
        raise ConfigError(f"output.dir {cfg.output.dir!r} cannot be written: {why}{where}") from e


def _make_run_dir(run_dir: str) -> list[str]:
    """Make ``run_dir`` and its missing parents; returns the folders this call made, innermost
    first (a folder another process makes at the same moment is not among them)."""
    missing = []
    path = run_dir
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    made = []
    for path in reversed(missing):
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        except OSError:  # (a file in the way): os.makedirs below raises what it always did
            break
        made.append(path)
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError:
        for path in reversed(made):  # (the parents made on the way, empty: not left behind)
            with contextlib.suppress(OSError):
                os.rmdir(path)
        raise
    return made[::-1]


def _remove_unused_run_dir(run_dir: str, created: list[str]) -> None:
    """Remove ``run_dir`` and the parents made with it (``created``, innermost first) when this run
    made it and it holds nothing but its lock file. Called with the lock held: the lock file goes
    first (``loop.run_lock`` refuses a lock file removed under it), then each folder while empty."""
    if not created or created[0] != run_dir:
        return  # a folder that existed before this run is never removed
    lock = os.path.join(run_dir, loop.LOCK_FILE)
    try:
        names = os.listdir(run_dir)
        if set(names) - {loop.LOCK_FILE}:
            return
        if names:
            os.unlink(lock)
    except OSError:
        return
    for path in created:
        try:
            os.rmdir(path)  # only ever an empty folder
        except OSError:
            return


def _train(
    cfg: SFTConfig, log, model: nn.Module | None, tokenizer: Any, device: torch.device, run_dir: str
) -> SFTResult:
    t, out = cfg.train, cfg.output
    loop.use_device(device)
    dtype = loop.resolve_dtype(cfg.model.dtype, device)
    if dtype == torch.float16 and device.type == "cpu":
        log(
            "model.dtype=fp16 on a CPU: its matmuls are slow there, and fp16 overflows where bf16 and "
            "fp32 do not (loss scaling skips those steps); model.dtype=auto trains in fp32 on a CPU"
        )
    ckpt = loop.Checkpointer(run_dir, keep=t.keep_checkpoints)
    resume_from = _resume_folder(cfg, ckpt, log)
    afresh = _afresh(cfg, ckpt)
    if t.save_every:
        try:
            ckpt.check_writable()
        except OSError as e:
            raise ConfigError(
                f"output.dir {cfg.output.dir!r}: its checkpoints/ cannot be written "
                f"({e.strerror or type(e).__name__}), and the run saves one every train.save_every="
                f"{t.save_every} steps; make it writable, or use another output.dir"
            ) from e
    # a whole adapter/ or model/ (weights without their config are a save that was killed, not a
    # finished run): a run without checkpoints (train.save_every=0) would train over it
    finished = loop.saved_output(run_dir)
    if resume_from is None and finished is not None:
        raise ConfigError(
            f"output.dir {cfg.output.dir!r} holds the {os.path.basename(finished)}/ of an earlier run "
            "and no checkpoint to resume from; training would replace it. Use another output.dir, or "
            "remove that folder first"
        )
    loop.seed_everything(t.seed)

    # 1. data first: a data problem (or a resume that cannot be exact) shows before an expensive model load
    if model is not None and tokenizer is None:
        raise ValueError("pass the tokenizer together with the model")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg)
    rows, eval_rows, reports = load_data(cfg, tokenizer, log)
    for r in reports:
        log("data: " + r.summary())
    rows_per_step = t.batch_size * t.grad_accum
    prior = None if resume_from is None else _read_checkpoint_state(resume_from, afresh)
    # train.epochs: whole epochs, each seen once (its last step smaller); train.max_steps: a stream of
    # rows. A checkpoint that records no data order comes from a version that always streamed: its
    # run resumes as it started
    whole_epochs = not t.max_steps and (prior is None or "data_order" in prior)
    sampler = StepSampler(len(rows), rows_per_step, t.seed, whole_epochs=whole_epochs)
    total = t.max_steps or sampler.steps_for_epochs(t.epochs)
    warmup = t.warmup_steps or math.ceil(t.warmup_ratio * total)  # as transformers rounds it
    data_fp = fingerprint(rows)
    # the held-out set too: a resumed run's eval curve (and a finished run's logged final eval, which a
    # rerun reports instead of evaluating again) must be of the same examples
    eval_fp = fingerprint(eval_rows)
    data_order = "epochs" if sampler.whole_epochs else "steps"
    base_fp = _base_fingerprint(cfg.model.path)
    if resume_from is not None:
        now = {
            "data_fingerprint": data_fp,
            "eval_fingerprint": eval_fp,
            "rows_per_step": rows_per_step,
            "total_steps": total,
            "data_order": data_order,
            **_resume_settings(cfg, dtype),
        }
        moved = _moved_base(prior, now, base_fp)
        if moved is not None:
            log(
                f"model.path: the base {moved} of {resume_from} moved to {now['model.path']} (the same files)"
            )
            now["model.path"] = moved
        _check_resume(resume_from, prior, now, afresh, _row_settings_changed(resume_from, cfg))

    # 2. model
    base_name = base_model_name(cfg, model)
    passed_in = model is not None
    if model is None:
        model = load_base_model(cfg, device, dtype)
    else:
        _check_model_device(model, device, cfg.model.device)
    prepare_model(model, cfg, passed_in=passed_in, log=log)
    # model.path at the built-in model: a model passed in has no other name, and a run on one
    # resumed on the built-in model (or the other way round) would compare equal; their frozen
    # weights tell them apart (a full fine-tuning checkpoint holds every weight: no base to compare)
    model_fp = _model_fingerprint(model) if cfg.model.path in TINY and cfg.lora.enabled else None
    if resume_from is not None and model_fp is not None:
        _check_resume(resume_from, prior, {"model_fingerprint": model_fp}, afresh)
    named = loop.trainable_parameters(model)
    if not named and passed_in and cfg.lora.enabled:
        from hoptune.patch import lora_layers

        if lora_layers(model):  # (load_adapter's default loads an adapter to run, frozen)
            raise ConfigError(
                "the model passed in has LoRA layers, all frozen: nothing would train; load the "
                "adapter to train on with hoptune.load_adapter(model, dir, trainable=True)"
            )
    n_train, n_total = loop.count_parameters(model)
    log(
        f"model: {base_name or 'the model passed in'} on {device} ({dtype}); {n_train:,} trainable of "
        f"{n_total:,} parameters"
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    who = "the model passed in" if passed_in else f"model.path={cfg.model.path!r}"
    _check_token_ids(model, rows + eval_rows, pad_id, who)
    _warn_beyond_positions(model, rows + eval_rows, who, log)

    # 3. optimizer, schedule, loss scaling (fp16), resume
    scaler = loop.grad_scaler(model, device, dtype)
    optimizer = loop.build_optimizer(
        named, t.lr, t.weight_decay, tuple(t.betas), t.eps, decay_names=loop.decay_parameter_names(model)
    )
    scheduler = loop.build_scheduler(optimizer, total, warmup, t.lr_schedule, t.min_lr_ratio)
    # gradients already on the model (a run stopped between a backward and its optimizer step, a
    # check the caller ran) would be added to the first step's: transformers' Trainer zeroes them too
    model.zero_grad(set_to_none=True)
    step = 0
    # the steps since the last train log: its loss is their mean, as transformers' Trainer logs it (a
    # checkpoint between two logs keeps them, so a resumed run logs what an uninterrupted one does)
    window = {"steps": 0, "loss": 0.0, "loss_tokens": 0, "tokens": 0, "seconds": 0.0}
    if resume_from is not None:
        try:
            state = loop.Checkpointer.load(resume_from, model, optimizer, scheduler, scaler=scaler)
        except loop.CheckpointError as e:  # (checked before the model was built; changed since)
            raise _damaged(resume_from, e, afresh) from e
        except ValueError as e:  # a checkpoint of an older hoptune, which does not record its settings
            what = str(e) if str(e).startswith("its optimizer") else f"its weights do not fit the model ({e})"
            raise ConfigError(
                f"cannot resume from {resume_from}: {what}, as this config builds them; "
                f"use the config that run was started with, or start afresh {afresh}"
            ) from e
        step = int(state["step"])
        window.update(state.get("log_window") or {})
        ckpt.resumed_from(resume_from)
        log(f"resumed from {resume_from} at step {step}")
    start = step
    # written once every check has passed: a refused run leaves the config of the run in output.dir
    from hoptune._io import atomic_write_text

    config_path = _config_path(run_dir)
    if os.path.basename(config_path) != "config.yaml":
        log(
            f"{os.path.join(run_dir, 'config.yaml')} is a config a run did not write (kept as it is); "
            f"the run's resolved config goes to {config_path}"
        )
    atomic_write_text(config_path, RESOLVED_HEADER + dump_config(cfg))
    metrics = loop.MetricsLog(
        os.path.join(run_dir, "metrics.jsonl"), out.tensorboard, resume_step=step if resume_from else None
    )
    notes = [metrics.tb_note] if metrics.tb_note else []
    skipped = 0  # fp16: steps GradScaler skipped (gradients that overflowed at the current scale)
    params = [p for _, p in named]
    eval_bs = t.eval_batch_size or t.batch_size

    def run_eval(at: int) -> dict[str, float] | None:
        if not eval_rows:
            return None
        ev = loop.evaluate_nll(model, eval_batches(eval_rows, eval_bs, pad_id), device)
        metrics.log(at, "eval", ev)
        return ev

    def save(at: int) -> str:
        return ckpt.save(
            at,
            model,
            optimizer,
            scheduler,
            {
                "step": at,
                "epoch": sampler.epoch_at(at),
                "rows_per_step": rows_per_step,
                "total_steps": total,
                "data_fingerprint": data_fp,
                "eval_fingerprint": eval_fp,
                "data_order": data_order,
                "seed": t.seed,
                "settings": _resume_settings(cfg, dtype),
                "base_fingerprint": base_fp,
                "model_fingerprint": model_fp,
                "log_window": dict(window),
            },
            scaler=scaler,
        )

    # 4. the loop
    for note in _unused_length_settings(t, total, warmup):
        log(note)
    losses: list[float] = []
    log(  # before the progress bar starts: not printed onto its line
        f"training: {total} steps x {min(rows_per_step, len(rows))} rows ({t.batch_size} x "
        f"{t.grad_accum} accumulation) from {len(rows)} rows, warmup {warmup}, lr {t.lr:g} {t.lr_schedule}"
    )
    progress = loop.Progress(total, initial=step, enabled=out.progress, desc="sft")
    timer = loop.Timer()
    last_eval = None
    # a Ctrl-C in the loop is taken before each micro-batch and eval batch (sft_step's and
    # evaluate_nll's checks; a second one at once): raised wherever the signal comes, it can be lost
    # in a library, or leave its lock held
    latch = loop.InterruptLatch().start()
    collector = loop.LoopGc().start()
    try:
        while step < total:
            idx = sampler.rows_for_step(step)
            micro = [  # grad_accum micro-batches (fewer in an epoch's smaller last step)
                collate([rows[i] for i in idx[k : k + t.batch_size]], pad_id)
                for k in range(0, len(idx), t.batch_size)
            ]
            lr = optimizer.param_groups[0]["lr"]
            try:
                loss, n_loss, n_tok = sft_step(model, micro, device, scaler, read=False)
            except torch.OutOfMemoryError as e:
                raise out_of_memory(cfg, model, step + 1, total, ckpt.latest()) from e
            if step == start:
                note = loop.untrained_note(named)
                if note:  # said when it is seen, and again at the end
                    progress.write(note)
                    notes.append(note)
            try:  # (the loss is read with the gradient norm, after the optimizer's launches)
                grad_norm = loop.optimizer_step(optimizer, scheduler, params, t.max_grad_norm, scaler, loss)
                if scaler is not None and not math.isfinite(grad_norm):
                    skipped += 1  # (GradScaler's skipped step: the scale halves, nothing is updated)
            except torch.OutOfMemoryError as e:
                raise out_of_memory(cfg, model, step + 1, total, ckpt.latest()) from e
            except FloatingPointError as e:
                loss = float(loss)
                # stopped before the optimizer step: no NaN weights are trained on, nor saved over a good
                # checkpoint; the step is logged (a resume drops the line) and named
                optimizer.zero_grad(set_to_none=True)
                metrics.log(
                    step + 1, "train", {"loss": loss, "lr": lr, "loss_tokens": n_loss, "tokens": n_tok}
                )
                latest = ckpt.latest()
                kept = (
                    f"the newest checkpoint, {latest}, is untouched" if latest else "there is no checkpoint"
                )
                raise FloatingPointError(
                    f"training stopped at step {step + 1} of {total}: {e}. No optimizer step was taken and "
                    f"nothing was saved ({kept}); resumed as it is, the run would likely stop here again: "
                    "check the data of this step, or train with a lower train.lr in a new output.dir"
                ) from None
            loss = float(loss)  # (read back by optimizer_step already)
            step += 1
            collector.step()  # (between steps: none of the collector's pauses inside one)
            dt = timer.lap()
            losses.append(loss)
            mem = loop.gpu_memory_gib()
            window["steps"] += 1
            window["loss"] += loss
            window["loss_tokens"] += n_loss
            window["tokens"] += n_tok
            window["seconds"] += dt
            if step % t.log_every == 0 or step == total:
                metrics.log(
                    step,
                    "train",
                    {
                        "loss": window["loss"] / window["steps"],
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "loss_tokens": window["loss_tokens"],
                        "tokens": window["tokens"],
                        "tokens_per_s": window["tokens"] / window["seconds"],
                        "epoch": sampler.epoch_at(step),
                        "gpu_mem_gib": mem,
                        **({"loss_scale": scaler.get_scale()} if scaler is not None else {}),
                    },
                )
                window.update(steps=0, loss=0.0, loss_tokens=0, tokens=0, seconds=0.0)
            progress.update(loss, lr, n_tok / dt, mem)
            if t.eval_every and step % t.eval_every == 0 and step < total:
                last_eval = run_eval(step)
                if last_eval:
                    progress.write(f"step {step}: eval loss {last_eval['loss']:.4f}")
                timer.lap()
            if t.save_every and step % t.save_every == 0 and step < total:
                save(step)
                timer.lap()
    except BaseException:
        metrics.close()  # TensorBoard's writer flushes every 2 minutes: the steps up to the stop stay
        raise
    finally:
        interrupted = latch.stop()
        progress.close()
        collector.stop()
    if interrupted:  # (a Ctrl-C in the last step, after its last check)
        metrics.close()
        raise KeyboardInterrupt
    try:
        if t.save_every and step > start:
            save(step)

        # 5. outputs, then the final eval: an eval that fails loses no training
        if loop.has_lora(model):
            from hoptune.adapters import save_adapter

            final = os.path.join(run_dir, "adapter")
            # a model passed in without a model.path: save_adapter names the base of an adapter
            # loaded into it, with its revision (as PEFT keeps them), else the model's own name
            own = passed_in and cfg.model.path in TINY
            # the tokenizer first: the adapter's config, which goes in last, marks a finished run
            _save_tokenizer_beside(tokenizer, cfg, final)
            save_adapter(model, final, base_model_name_or_path=None if own else base_name)
        else:
            final = os.path.join(run_dir, "model")

            def write(tmp: str) -> None:
                model.save_pretrained(tmp)
                _save_tokenizer(tokenizer, cfg, tmp)

            atomic_dir(final, write)  # whole or not at all: with train.save_every=0 the only copy
        if eval_rows:
            # a finished run started again: its final eval is in metrics.jsonl already
            done = [] if step > start else _logged_eval(metrics.path, step)
            last_eval = done[-1] if done else run_eval(step)
    except BaseException:
        metrics.close()  # (as above: the points of the run's last steps reach TensorBoard)
        raise
    metrics.close()
    if skipped:
        notes.append(
            f"fp16 loss scaling skipped {skipped} of the {step - start} steps this run took (their "
            "gradients overflowed: no update, the loss scale halved, the schedule held); metrics.jsonl "
            "names them (grad_norm null). A few at the start are usual; many mean the scale keeps "
            "overflowing: bf16 (model.dtype=bf16) has fp32's range"
        )
    plots: list[str] = []
    if out.plots:
        plots, note = loop.plot_metrics(
            os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "plots")
        )
        if note:
            notes.append(note)
    for n in notes:
        log(n)
    return SFTResult(run_dir, final, step, losses, last_eval, plots, notes, model, tokenizer)


def _save_tokenizer(tokenizer: Any, cfg: SFTConfig, folder: str) -> None:
    """The tokenizer as the run trained with it, into ``folder``: with ``model.chat_template`` that
    template (TRL saves its tokenizer with the template it set), else its own. The tokenizer
    passed in is left as it was."""
    template = resolve_chat_template(cfg.model.chat_template, tokenizer)
    if template is None:
        tokenizer.save_pretrained(folder)
        return
    own = tokenizer.__dict__.get("chat_template", _NOT_SET)
    tokenizer.chat_template = template
    try:
        tokenizer.save_pretrained(folder)
    finally:
        if own is _NOT_SET:
            del tokenizer.chat_template
        else:
            tokenizer.chat_template = own


_NOT_SET = object()
# tokenizer files that a tokenizer without them leaves alone when it saves: one from an earlier run
# in the adapter folder would give the tokenizer saved beside it another chat template
_TOKENIZER_EXTRAS = ("chat_template.jinja", "chat_template.json")


def _save_tokenizer_beside(tokenizer: Any, cfg: SFTConfig, adapter_dir: str) -> None:
    """The tokenizer (``_save_tokenizer``) into the adapter folder, as TRL's output folder holds it
    (AutoTokenizer reads it from there): its files replaced together, the adapter's left alone."""
    import functools
    import shutil
    import tempfile

    from hoptune._io import replace_files

    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(adapter_dir))) as tmp:
        _save_tokenizer(tokenizer, cfg, tmp)
        names = sorted(n for n in os.listdir(tmp) if os.path.isfile(os.path.join(tmp, n)))
        writes: dict[str, Any] = {n: functools.partial(shutil.copyfile, os.path.join(tmp, n)) for n in names}
        for n in _TOKENIZER_EXTRAS:
            if n not in writes and os.path.isfile(os.path.join(adapter_dir, n)):
                writes[n] = None
        if "tokenizer_config.json" not in writes:  # (every tokenizer writes it)
            raise RuntimeError(f"the tokenizer saved no tokenizer_config.json: {names}")
        replace_files(adapter_dir, writes, last="tokenizer_config.json")


def _check_model_device(model: nn.Module, device: torch.device, setting: str) -> None:
    """ConfigError when a model passed in is not on ``device`` (it is not moved: its memory is the
    caller's), which the batches go to: the first forward would fail with a device mismatch."""
    where = {t.device for t in (*model.parameters(), *model.buffers())}
    wrong = sorted(
        str(d)
        for d in where
        if d.type != device.type or (device.index is not None and d.index != device.index)
    )
    if wrong:
        raise ConfigError(
            f"the model passed in is on {', '.join(wrong)}, but model.device={setting} is {device}: "
            f"move it there first (model.to({str(device)!r})), or set model.device"
        )


def _check_token_ids(model: nn.Module, rows: list[Row], pad_id: int, who: str) -> None:
    """ConfigError when the data or the pad token has an id the model's input embedding has no row
    for: the first step would fail with a bare IndexError (on a GPU, a device-side assert)."""
    get = getattr(model, "get_input_embeddings", None)
    n = getattr(get() if callable(get) else None, "num_embeddings", None)
    if not isinstance(n, int):
        return
    top = max((max(r.input_ids) for r in rows if r.input_ids), default=-1)
    what = f"the data holds token id {top}" if top >= n else f"the pad token id {pad_id}"
    if top >= n or pad_id >= n:
        raise ConfigError(
            f"{who}: {what}, but the model's input embedding has {n} rows (ids 0 to {n - 1}): "
            "the tokenizer has tokens the model was not resized for (resize_token_embeddings("
            "len(tokenizer)) before saving the model), or it is not this model's tokenizer"
        )


def _warn_beyond_positions(model: nn.Module, rows: list[Row], who: str, log) -> None:
    """A warning when a row puts tokens at positions beyond the model's ``max_position_embeddings``
    (a packed row's positions restart at each document): positions it was not trained at, where
    rotary embeddings without scaling extrapolate poorly. Not an error: some models hold good beyond
    that value, and transformers does not refuse such inputs either."""
    n = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(n, int) or n <= 0:
        return
    longest = max(
        (max(r.position_ids) + 1 if r.position_ids else len(r.input_ids) for r in rows if r.input_ids),
        default=0,
    )
    if longest > n:
        log(
            f"warning: the data has examples of up to {longest} tokens, beyond the "
            f"max_position_embeddings={n} of {who}: the model was not trained at those positions; "
            f"lower data.max_seq_len to {n} unless the model is known to hold good beyond it"
        )


def _logged_eval(path: str, step: int) -> list[dict[str, float]]:
    """The eval records of ``step`` in a metrics JSONL, without their step and split."""
    return [
        {k: v for k, v in r.items() if k not in ("step", "split")}
        for r in loop.read_metrics(path)
        if r.get("split") == "eval" and r.get("step") == step
    ]


def main(cfg: SFTConfig) -> int:
    t0 = time.time()
    try:
        res = train(cfg)
    except (FloatingPointError, StepOutOfMemory) as e:  # the message names the step and what to do
        print(f"hoptune sft: error: {e}", file=sys.stderr)
        return 1
    ev = f", eval loss {res.eval['loss']:.4f}" if res.eval else ""
    last = (
        f"final train loss {res.train_losses[-1]:.4f}" if res.train_losses else "no step run (already done)"
    )
    print(f"done in {time.time() - t0:.0f}s: {res.steps} steps, {last}{ev}")
    print(f"  adapter: {res.output_dir}" if loop.has_lora(res.model) else f"  model: {res.output_dir}")
    print(f"  metrics: {os.path.join(res.run_dir, 'metrics.jsonl')}")
    if res.plots:
        print(f"  plots:   {os.path.dirname(res.plots[0])}")
    return 0
