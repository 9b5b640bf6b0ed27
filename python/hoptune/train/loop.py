"""Pieces every trainer shares: devices and dtypes, seeds and RNG state, the optimizer and its
schedule, the forward that returns per-token log-probs, the optimizer step, evaluation, atomic
checkpoints with exact resume, metrics (JSONL, TensorBoard), the progress bar and the plots.

Recipes (``train/sft.py`` ...) are flat scripts over these functions; nothing here knows about a
particular loss.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import math
import os
import random
import re
import shutil
import signal
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hoptune._io import atomic_dir, atomic_write, atomic_write_text, put_back_set_aside
from hoptune.fusion import _mode
from hoptune.losses.logprobs import head_logprobs, token_logprobs_from_logits
from hoptune.ops import _check

# -- device, dtype, seeds --------------------------------------------------------------------------


def resolve_device(name: str = "auto", setting: str | None = "model.device") -> torch.device:
    """'auto' -> cuda when available, else cpu; anything else as torch reads it. ``setting``: the
    caller's name for the device setting (``model.device``, a command-line ``--device``), which a
    message names to say how to run on the CPU; None: the caller has none to name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    # (mps and xpu fail later, at the model's first move, with a traceback)
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} asked for, but this machine (or torch build) has no MPS device")
    if dev.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise ValueError(f"device {name!r} asked for, but this machine (or torch build) has no XPU device")
    if dev.type == "cuda" and not torch.cuda.is_available():
        use = "" if setting is None else f"; use {setting}{' ' if setting.startswith('-') else '='}cpu"
        raise ValueError(f"device {name!r} asked for, but no CUDA device is visible{use}")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(
            f"device {name!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) are "
            f"visible (cuda:0 to cuda:{torch.cuda.device_count() - 1})"
        )
    return dev


def use_device(dev: torch.device) -> None:
    """Make ``dev`` the current CUDA device when it names one (cuda:N): hoptune's kernels launch on
    the current device, and so do the tensors PyTorch makes with device="cuda"."""
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)


DTYPES = _check.SHORT_DTYPE_NAMES  # model.dtype's names


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 on a GPU (training compute), fp32 on a CPU (bf16 matmuls are slow there)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover
        pass


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from (dropout, shuffles): python, numpy, torch CPU/CUDA."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        # as plain numbers (its key a list, not an ndarray): the state file then unpickles with
        # weights_only under any NumPy version
        name, key, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = (name, key.tolist(), int(pos), int(has_gauss), float(cached))
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        # one state per GPU visible when saved: a machine that shows fewer (CUDA_VISIBLE_DEVICES)
        # takes those of its own devices (set_rng_state_all fails on the first one it lacks)
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


# -- parameters, optimizer, schedule ---------------------------------------------------------------


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; an NF4 base counts its weights (2 codes per byte)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(2 * b.numel() for n, b in model.named_buffers() if n.endswith("weight_packed"))
    return trainable, total


# transformers' Trainer.get_decay_parameter_names: what TRL decays is chosen by name (and LayerNorm
# layers), not by shape; a DoRA magnitude is a vector that it decays
_NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters of ``model`` that transformers' Trainer (and so TRL) applies weight
    decay to: all but biases, norms (by name) and the parameters of ``nn.LayerNorm`` layers."""
    in_layernorm = {
        f"{mod_name}.{n}" if mod_name else n
        for mod_name, mod in model.named_modules()
        if isinstance(mod, nn.LayerNorm)
        for n, _ in mod.named_parameters()
    }
    return {
        n for n, _ in model.named_parameters() if n not in in_layernorm and not _NO_DECAY.search(n.lower())
    }


def build_optimizer(
    named_params: list[tuple[str, nn.Parameter]],
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    decay_names: set[str] | None = None,
) -> torch.optim.AdamW:
    """AdamW; weight decay on the parameters named in ``decay_names`` (``decay_parameter_names(model)``:
    what transformers' Trainer decays), or, without it, on matrices only. The fused CUDA
    implementation when every parameter is on a GPU."""
    if not named_params:
        raise ValueError("no trainable parameter: apply_lora (or lora.enabled=false) must leave some")

    def decays(n: str, p: nn.Parameter) -> bool:
        return n in decay_names if decay_names is not None else p.dim() >= 2

    decay = [p for n, p in named_params if decays(n, p)]
    no_decay = [p for n, p in named_params if not decays(n, p)]
    groups = [
        g
        for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
        if g["params"]
    ]
    fused = all(p.is_cuda for _, p in named_params)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None)


@dataclass
class LRSchedule:
    """The learning-rate multiplier at a step: linear warmup from 0, then cosine (or linear) decay
    to ``min_ratio``, or constant. A plain object so the scheduler's state pickles.

    Step for step what transformers' get_{cosine,linear,constant}_schedule_with_warmup (and its
    cosine with ``min_lr_rate``) give, so TRL's curve: warmup is ``step / warmup_steps``, the first
    step at lr 0 (it still starts AdamW's moments), full lr from step ``warmup_steps`` on."""

    total_steps: int
    warmup_steps: int = 0
    kind: str = "cosine"
    min_ratio: float = 0.0
    warmup_from_zero: bool = True
    """False: ``(step + 1) / (warmup_steps + 1)``, the warmup of checkpoints written before the
    schedule matched transformers' (``Checkpointer.load`` sets it), so that their runs resume on the
    schedule they started with."""

    def __post_init__(self) -> None:
        # checked here, not at the first step past warmup: after hours of training, or never for a
        # min_ratio above 1 (a 'decay' that raises the lr above its peak)
        if self.kind not in ("cosine", "linear", "constant"):
            raise ValueError(f"lr_schedule must be cosine, linear or constant, got {self.kind!r}")
        if not 0.0 <= self.min_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_ratio!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps!r}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            if not self.warmup_from_zero:
                return (step + 1) / (self.warmup_steps + 1)
            return step / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        if self.kind == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        elif self.kind == "linear":
            shape = 1.0 - progress
        else:
            raise ValueError(f"lr_schedule must be cosine, linear or constant, got {self.kind!r}")
        return self.min_ratio + (1.0 - self.min_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    kind: str = "cosine",
    min_ratio: float = 0.0,
    warmup_from_zero: bool = True,
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, LRSchedule(total_steps, warmup_steps, kind, min_ratio, warmup_from_zero)
    )


def untrained_note(named: list[tuple[str, nn.Parameter]]) -> str | None:
    """After a step's backward: a note naming the trainable tensors that got no gradient, None when
    every one got one. Nothing on the path to the loss uses such a tensor, so it never trains: an
    adapter whose base layer the model reads the weight of directly (Mamba's ``dt_proj``:
    ``dt_proj.weight @ x``), a layer whose output the loss does not depend on."""
    dead = [n for n, p in named if p.grad is None]
    if not dead:
        return None
    return (
        f"{len(dead)} of the {len(named)} trainable tensors got no gradient in the first step (e.g. "
        f"{dead[:3]}): nothing on the way to the loss uses them, so they do not train (a layer whose "
        "weight the model reads directly, as Mamba's dt_proj, or whose output the loss does not "
        "depend on); leave their layers out of lora.target_modules"
    )


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    params: list[nn.Parameter],
    max_grad_norm: float,
    scaler: torch.amp.GradScaler | None = None,
    loss: torch.Tensor | float | None = None,
) -> float:
    """Clip (when max_grad_norm > 0), step, advance the schedule, clear the gradients.
    Returns the gradient norm before clipping.

    A non-finite gradient norm takes no step: without ``scaler`` it is FloatingPointError (the
    weights stay those before the step, and NaN weights are never written); with ``scaler`` (fp16's
    dynamic loss scaling, whose gradients come scaled) it is GradScaler's skipped step, which halves
    the scale, and the schedule does not advance (as transformers' Trainer does); at a scale of 1 or
    less, FloatingPointError. ``loss`` (the step's loss, a tensor on the device or a number): a
    non-finite one takes no step either (FloatingPointError naming it), whatever the scaler.

    With torch's fused AdamW and no scaler, nothing is read back before the optimizer's kernels are
    launched: whether the step is taken is decided on the device (the optimizer's ``found_inf``, as
    GradScaler drives it: a non-finite norm or loss leaves the weights, the moments and the step
    count as they were), and the norm and the loss come back in one read at the end. So the device
    does not wait, between the backward and the update, for the host to read and to prepare the
    optimizer (its Python over every parameter)."""
    if scaler is not None and not scaler.is_enabled():
        scaler = None  # (its step() would step on inf / NaN gradients)
    on_device = scaler is None and _skips_on_device(optimizer)
    if loss is not None and not on_device:
        # (read first: before GradScaler's unscale_, which a refused step must not leave half done)
        _check_loss(float(loss))
    if scaler is not None:
        scaler.unscale_(optimizer)  # clipping and the reported norm are of the true gradient
    norm_t = _grad_norm(params, max_grad_norm)
    if on_device:
        finite = torch.isfinite(norm_t)
        loss_t = None
        if loss is not None:
            loss_t = torch.as_tensor(loss, device=norm_t.device).float()
            finite = finite & torch.isfinite(loss_t)
        optimizer.found_inf = (~finite).float()  # (1: the fused kernel leaves everything as it was)
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
        optimizer.zero_grad(set_to_none=True)  # (host work while the device steps)
        read = torch.stack([norm_t.float()] + ([] if loss_t is None else [loss_t])).tolist()
        norm = read[0]
        if loss_t is not None:
            _check_loss(read[1])
        if not math.isfinite(norm):
            raise FloatingPointError(f"the gradient norm is {norm}")
        if scheduler is not None:
            scheduler.step()
        return norm
    norm = float(norm_t)
    stepped = True
    if scaler is not None:
        scale = scaler.get_scale()
        scaler.step(optimizer)  # (skips optimizer.step when a gradient is inf or NaN)
        scaler.update()
        stepped = scaler.get_scale() >= scale  # the scale backs off exactly when the step was skipped
        if not stepped and scale <= 1.0:
            # (DeepSpeed's min_loss_scale): gradients that overflow with the loss not scaled up are not
            # the scale's doing, and halving it on would skip every step to the end without a word
            optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"the gradient norm is {norm} even at loss scale {scale:g}")
    elif not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError(f"the gradient norm is {norm}")
    else:
        optimizer.step()
    if scheduler is not None and stepped:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


def _check_loss(loss: float) -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(f"the training loss is {loss}")


def _grad_norm(params: list[nn.Parameter], max_grad_norm: float) -> torch.Tensor:
    """The gradients' total norm as a tensor (not read back); clipped to ``max_grad_norm`` when > 0."""
    if max_grad_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


# Whether optimizer_step decides a non-finite step's skip on the device where it can (torch's fused
# AdamW without a scaler), reading the norm and the loss after the optimizer's launches; False: read
# first, then step (a switch for measurement: bench_sft_8b.py --alternate-step-end).
SKIP_ON_DEVICE = True


def _skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is torch's fused Adam / AdamW, whose step skips itself on the device
    when its ``found_inf`` is 1 (the attribute GradScaler sets; not set by anyone else now)."""
    return (
        SKIP_ON_DEVICE
        and isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
        and all(g.get("fused") for g in optimizer.param_groups)
        and getattr(optimizer, "found_inf", None) is None
        and _adam_takes_found_inf()
    )


_found_inf_known: bool | None = None


def _adam_takes_found_inf() -> bool:
    """Whether this torch's functional Adam and AdamW take ``found_inf`` (what their optimizers'
    step passes on from the attribute): a guard, so that a torch without it would get the
    read-first order rather than a skip that never happens."""
    global _found_inf_known
    if _found_inf_known is None:
        import importlib

        fns = [getattr(importlib.import_module(m), f, None) for m, f in _ADAM_FUNCTIONALS]
        _found_inf_known = all(
            fn is not None and "found_inf" in inspect.signature(fn).parameters for fn in fns
        )
    return _found_inf_known


_ADAM_FUNCTIONALS = (("torch.optim.adam", "adam"), ("torch.optim.adamw", "adamw"))


def grad_scaler(model: nn.Module, device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler | None:
    """A GradScaler (dynamic loss scaling) when ``model`` computes in fp16, else None. fp16 flushes
    values below 6e-8 to zero, and a step's per-token gradients are divided by its loss tokens: with
    thousands of them, gradients underflow silently unless the loss is scaled up for the backward.
    Trainable fp16 parameters are refused (GradScaler cannot unscale fp16 gradients)."""
    fp16 = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype == torch.float16]
    if fp16:
        # (the config refuses model.dtype=fp16 for full fine-tuning; a model passed in may be fp16)
        raise ValueError(
            f"trainable parameter {fp16[0]!r} is float16 ({len(fp16)} such): fp16 weights would "
            "train with no fp32 copy (AdamW's eps, 1e-8, is 0 in fp16) and their loss scaling "
            "cannot unscale fp16 gradients; cast the model to bf16 or fp32 "
            "(model.to(torch.bfloat16)), or train LoRA adapters over the fp16 base"
        )
    if dtype != torch.float16 and all(p.dtype != torch.float16 for p in model.parameters()):
        return None
    return torch.amp.GradScaler(device.type)


# -- model setup ------------------------------------------------------------------------------------


def enable_gradient_checkpointing(model: nn.Module, uncheckpointed: int = 0) -> int:
    """Recompute each decoder layer in the backward (non-reentrant: works with a frozen embedding,
    i.e. inputs that do not require grad), except the last ``uncheckpointed`` decoder layers, which
    keep their activations from the forward to the backward: each such layer's recompute saved
    (about a quarter of its GEMM work with a frozen base) for its activations' memory
    (``hoptune plan`` estimates it). Returns the number of decoder layers checkpointed."""
    uncheckpointed = _check_uncheckpointed(uncheckpointed)
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name is deprecated)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise TypeError(f"{type(model).__name__} has no activation checkpointing (not a transformers model?)")
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False
    return set_uncheckpointed_layers(model, uncheckpointed)


def _check_uncheckpointed(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"uncheckpointed layers must be an integer >= 0, got {n!r}")
    return n


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers that transformers checkpoints one by one (its
    GradientCheckpointingLayer modules), in the order they run."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def set_uncheckpointed_layers(model: nn.Module, n: int) -> int:
    """With checkpointing enabled (``enable_gradient_checkpointing``): the last ``n`` decoder layers
    run without it, the others with it. Can change between steps. Returns the number checkpointed."""
    n = _check_uncheckpointed(n)
    layers = decoder_layers(model)
    if not layers or not all("_gradient_checkpointing_func" in vars(m) for m in layers):
        raise ValueError(
            f"{type(model).__name__} has no checkpointed decoder layers: enable checkpointing first "
            "(hoptune.train.loop.enable_gradient_checkpointing)"
        )
    if n > len(layers):
        raise ValueError(f"uncheckpointed layers = {n}, but the model has {len(layers)} decoder layers")
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i < len(layers) - n
    return len(layers) - n


def _decoder(model: nn.Module) -> nn.Module | None:
    """The model's decoder, whose last hidden states the output layer turns into logits; None when
    the logits take more than that layer (then the model's own forward gives them)."""
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    lm_head = getattr(model, "lm_head", None)
    if isinstance(lm_head, nn.Module) and out is not None and lm_head is not out:
        return None  # (ModernBERT's decoder: a prediction head named lm_head, then the output layer)
    get = getattr(model, "get_decoder", None)
    if callable(get):
        try:
            dec = get()
        except (AttributeError, NotImplementedError):
            dec = None
        if isinstance(dec, nn.Module) and dec is not model and dec is not out:
            return dec
    prefix = getattr(model, "base_model_prefix", None)
    dec = getattr(model, prefix, None) if prefix else None
    return dec if isinstance(dec, nn.Module) and dec is not model else None


# model types whose logits are multiplied by config.logits_scaling (Granite's are divided by it)
_LOGITS_SCALING_MULTIPLIES = frozenset({"hyperclovax"})
# composite models whose forward leaves their text config's logit_scale unused, before the
# transformers version that applies it (None: none yet)
_TEXT_LOGIT_SCALE_UNUSED_BEFORE: dict[str, tuple[int, int] | None] = {
    "aya_vision": (5, 25),
    "cohere2_vision": None,
}


def _text_logit_scale_unused(model_type: object) -> bool:
    if model_type not in _TEXT_LOGIT_SCALE_UNUSED_BEFORE:
        return False
    since = _TEXT_LOGIT_SCALE_UNUSED_BEFORE[model_type]
    if since is None:
        return True
    import transformers

    found = re.match(r"(\d+)\.(\d+)", transformers.__version__)
    return found is not None and (int(found.group(1)), int(found.group(2))) < since


def _logits_setting(cfg: Any, key: str, text: bool = True) -> tuple[Any, Any]:
    """(``key``'s value, the config holding it): the model's config, else (``text``) its text
    config, where a composite model's forward reads it (Gemma 3n's soft-capping). (None, cfg)
    when unset."""
    configs = [cfg]
    get_text = getattr(cfg, "get_text_config", None)
    if text and callable(get_text):
        configs.append(get_text(decoder=True))
    for c in configs:
        value = getattr(c, key, None)
        if value is not None:
            return value, c
    return None, cfg


def _head_settings(model: nn.Module) -> tuple[float, float | None]:
    """(logit scale, soft-cap or None): what the model's forward does to its output layer's
    logits, by architecture (the model's config)."""
    cfg = getattr(model, "config", None)
    text_scale = not _text_logit_scale_unused(getattr(cfg, "model_type", None))
    scale, _ = _logits_setting(cfg, "logit_scale", text_scale)  # Cohere: logits * logit_scale
    scale = float(scale) if isinstance(scale, (int, float)) and not isinstance(scale, bool) else 1.0
    divisor, holder = _logits_setting(cfg, "logits_scaling")  # Granite: logits / logits_scaling
    if isinstance(divisor, (int, float)) and not isinstance(divisor, bool) and divisor:
        # (HyperCLOVA X multiplies by the same key: muP's other convention)
        mult = getattr(holder, "model_type", None) in _LOGITS_SCALING_MULTIPLIES
        scale = scale * float(divisor) if mult else scale / float(divisor)
    # Falcon-H1: logits * lm_head_multiplier; MuseGlimmer / MuseSpark: logits * output_multiplier
    # (their text config's), before the soft-cap
    for key in ("lm_head_multiplier", "output_multiplier"):
        mult, _ = _logits_setting(cfg, key)
        if isinstance(mult, (int, float)) and not isinstance(mult, bool):
            scale *= float(mult)
    softcap, _ = _logits_setting(cfg, "final_logit_softcapping")
    if softcap is None:  # RecurrentGemma's name for it
        softcap, _ = _logits_setting(cfg, "logits_soft_cap")
    return scale, softcap or None


def lm_head_logprobs(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probs of ``labels`` ``(N,)`` from final hidden states ``(N, H)`` through the model's output
    head, with the architecture's logit scale / soft-capping. fp32 ``(N,)``."""
    scale, softcap = _head_settings(model)
    return head_logprobs(model.get_output_embeddings(), hidden, labels, logit_scale=scale, softcap=softcap)


# models checked once: whether their logits are their output layer on their decoder's output
_HEAD_PATH_OK: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
_HEAD_CHECK_TOKENS = 16


def _head_mismatch(model: nn.Module, decoder: nn.Module, ids: torch.Tensor) -> str | None:
    """How the model's own logits for ``ids`` (1, T) differ from its output layer applied to its
    decoder's output with the architecture's scale and soft-cap (``_head_settings``), or None when
    they agree to the rounding of the logits' dtype. One forward, without gradients, in eval mode
    (an adapted output layer's dropout would draw another mask for the second call), leaving every
    module's mode and the random state as they were (nothing that training would have drawn)."""
    seen: list[Any] = []
    hook = decoder.register_forward_hook(lambda m, a, o: seen.append(o))
    devices = [ids.device] if ids.device.type == "cuda" else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices), _mode(model, False):
            out = model(input_ids=ids, use_cache=False)
            if not seen:
                return "its forward did not run its decoder"
            hidden = _first(seen[-1], "last_hidden_state")
            ref = _first(out, "logits")
            head = model.get_output_embeddings()
            width = getattr(head, "in_features", None)
            if isinstance(hidden, torch.Tensor) and isinstance(width, int) and hidden.shape[-1] != width:
                # (ELECTRA's and RemBERT's heads project the hidden states to another width first)
                return f"its decoder's hidden states have {hidden.shape[-1]} features, its output layer takes {width}"
            try:
                ours = head(hidden)
            except (RuntimeError, TypeError, ValueError) as e:
                return f"its output layer does not take its decoder's output ({type(e).__name__}: {e})"
    finally:
        hook.remove()
    if not isinstance(ref, torch.Tensor) or not isinstance(ours, torch.Tensor) or ref.shape != ours.shape:
        got = tuple(ours.shape) if isinstance(ours, torch.Tensor) else type(ours).__name__
        want = tuple(ref.shape) if isinstance(ref, torch.Tensor) else type(ref).__name__
        return f"its logits have shape {want}, its output layer on its decoder's output gives {got}"
    scale, softcap = _head_settings(model)
    eps = max(torch.finfo(ref.dtype).eps, torch.finfo(ours.dtype).eps)
    ours = ours.float() * scale
    if softcap is not None:
        ours = softcap * torch.tanh(ours / softcap)
    ref = ref.float()
    top = float(ref.abs().max())
    diff = float((ours - ref).abs().max())
    if diff <= 4 * eps * max(top, 1.0):  # (a nan on either side fails this)
        return None
    return f"they differ by up to {diff:.3g} (largest logit {top:.3g})"


def _head_path_ok(model: nn.Module, decoder: nn.Module, ids: torch.Tensor) -> bool:
    """Whether the loss may take the output layer on the decoder's hidden states (checked once
    per model, on the first row of its first batch); if not, says why, once, and the model's
    own logits are used from then on."""
    ok = _HEAD_PATH_OK.get(model)
    if ok is None:
        why = _head_mismatch(model, decoder, ids[:1, :_HEAD_CHECK_TOKENS])
        ok = why is None
        _HEAD_PATH_OK[model] = ok
        if not ok:
            warnings.warn(
                f"{type(model).__name__}: its logits are not its output layer applied to its "
                f"decoder's last hidden states ({why}), so the loss takes the model's own logits "
                "(computed at every position: more memory than the output layer on the loss "
                "positions only)",
                stacklevel=3,
            )
    return ok


# attention implementations that find packed documents from position ids in every row of a batch
# (transformers builds their block-diagonal mask); the flash-attention ones do it only in a batch of
# one row and would let a packed row's documents attend to each other
_PACKED_ROWS_OK = (None, "eager", "sdpa", "flex_attention")


def _flatten_packed(model: nn.Module, batch: dict[str, Any]) -> bool:
    """Whether a packed batch of several rows goes to ``model`` as one row of B * T tokens."""
    if batch.get("position_ids") is None or batch.get("attention_mask") is not None:
        return False
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return batch["input_ids"].shape[0] > 1 and impl not in _PACKED_ROWS_OK


def _first(out: Any, name: str) -> torch.Tensor:
    """Output ``name`` of a forward: a model whose config has return_dict=False returns a tuple,
    which (no labels, no cache) starts with it."""
    return out[0] if isinstance(out, tuple) else getattr(out, name)


def router_aux_coef(model: nn.Module) -> float:
    """The weight TRL's SFTTrainer gives a Mixture-of-Experts model's load-balancing loss: the
    ``router_aux_loss_coef`` of a (text) config that has ``output_router_logits``, whatever its
    value (TRL turns it on); 0.0 for other models, and a coefficient of 0 turns it off. A model
    whose forward takes no ``output_router_logits`` (Llama 4) computes no such loss: 0.0."""
    cfg = getattr(model, "config", None)
    get_text = getattr(cfg, "get_text_config", None)
    text = get_text(decoder=True) if callable(get_text) else cfg
    if not hasattr(text, "output_router_logits"):
        return 0.0
    forward = getattr(model, "forward", None)
    if not callable(forward) or "output_router_logits" not in inspect.signature(forward).parameters:
        return 0.0
    coef = getattr(text, "router_aux_loss_coef", None)
    return float(coef) if isinstance(coef, (int, float)) and not isinstance(coef, bool) else 0.0


def batch_logprobs(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of the loss tokens of a batch.

    batch: ``input_ids`` (B, T), ``loss_mask`` (B, T) bool or 0/1, ``attention_mask`` (B, T) or
    None, ``position_ids`` (B, T) or None (packed rows), on the model's device.
    Returns (logprobs fp32 ``(N,)``, labels ``(N,)``) over the N targets ``loss_mask[:, 1:]`` selects,
    in row-major order. The output head runs on those N positions only: prompt positions never
    get logits (a large saving with long prompts and big vocabularies)."""
    lp, labels, _ = _batch_logprobs(model, batch, router_aux=False)
    return lp, labels


def batch_logprobs_and_router_aux(
    model: nn.Module, batch: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``batch_logprobs`` and the batch's MoE load-balancing loss (0-dim, unweighted): the model's
    own ``aux_loss``, from its forward with ``output_router_logits=True`` (whose output head runs
    on the last position only; the log-probs come from its decoder's hidden states, as above)."""
    return _batch_logprobs(model, batch, router_aux=True)


def _batch_logprobs(
    model: nn.Module, batch: dict[str, Any], router_aux: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    ids = batch["input_ids"]
    # (as bool: an integer mask would index rows, ids[:, 1:][mask] gathers, not select tokens)
    targets = _check.zero_one_mask("loss_mask", batch["loss_mask"][:, 1:])
    labels = ids[:, 1:][targets]
    kwargs = {"input_ids": ids, "use_cache": False}
    if batch.get("attention_mask") is not None:
        kwargs["attention_mask"] = batch["attention_mask"]
    if batch.get("position_ids") is not None:
        kwargs["position_ids"] = batch["position_ids"]
    rows = ids.shape
    if _flatten_packed(model, batch):
        # every packed row starts a document at position 0, so one long row keeps the boundaries
        kwargs["input_ids"] = ids.reshape(1, -1)
        kwargs["position_ids"] = batch["position_ids"].reshape(1, -1)
    decoder = _decoder(model)
    head = decoder is not None and model.get_output_embeddings() is not None
    head = head and _head_path_ok(model, decoder, ids)
    aux = None
    if router_aux:
        # the model computes its load-balancing loss itself (each MoE family its own way); its
        # decoder's output is caught on the way for the head below
        kwargs["output_router_logits"] = True
        if head and "logits_to_keep" in inspect.signature(model.forward).parameters:
            kwargs["logits_to_keep"] = 1
        seen: list[Any] = []
        hook = decoder.register_forward_hook(lambda m, a, o: seen.append(o)) if head else None
        try:
            out = model(**kwargs)
        finally:
            if hook is not None:
                hook.remove()
        aux = getattr(out, "aux_loss", None)
        if not isinstance(aux, torch.Tensor) or (head and not seen):
            raise ValueError(
                f"{type(model).__name__} has output_router_logits in its config, but its "
                "forward with output_router_logits=True returned no aux_loss (or did not run "
                "its decoder): set its config's router_aux_loss_coef to 0 to train without "
                "the load-balancing loss"
            )
    if head:
        dec_out = seen[-1] if router_aux else decoder(**kwargs)
        hidden = _first(dec_out, "last_hidden_state").reshape(*rows, -1)  # (B, T, H)
        return lm_head_logprobs(model, hidden[:, :-1][targets], labels), labels, aux
    # models without a separable decoder: full logits
    logits = _first(out if router_aux else model(**kwargs), "logits").reshape(*rows, -1)
    return token_logprobs_from_logits(logits[:, :-1][targets], labels), labels, aux


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {
        k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()
    }


@torch.no_grad()
def evaluate_nll(
    model: nn.Module, batches: Iterable[dict[str, Any]], device: torch.device
) -> dict[str, float]:
    """Token-weighted NLL over ``batches`` (the SFT loss of the whole set) and its perplexity."""
    was_training = model.training
    model.eval()
    nll, n = 0.0, 0
    try:
        for b in batches:
            check_interrupt()  # (an eval inside the training loop stops at a batch's end)
            b = to_device(b, device)
            if not bool(b["loss_mask"][:, 1:].any()):
                continue
            lp, _ = batch_logprobs(model, b)
            nll += float(-lp.sum())
            n += lp.numel()
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("evaluation data has no loss token")
    return {"loss": nll / n, "ppl": math.exp(min(nll / n, 50.0)), "tokens": float(n)}


class LoopGc:
    """Python's garbage collector around a training loop (``with LoopGc() as lgc:``, or
    ``start()`` and ``stop()``; ``lgc.step()`` after each optimizer step).

    On entry: one collection, then every object alive now (the model's modules and parameters, the
    optimizer, the libraries imported) moves out of the collector's generations (``gc.freeze``),
    and the collector's automatic runs stop (``gc.disable``). In their place, ``step()`` collects
    the young generations between steps, when a step's objects are gone (~0.05 ms), and everything
    but the frozen objects every ``full_every`` steps. Without this, a step's many short-lived
    objects set off young collections inside it (3-5 ms of pauses in an 8B QLoRA step on an H200)
    and a full collection, which walks the whole model's objects, every dozen or so steps (0.22-0.30
    s each).

    On exit, also on an error: the frozen objects given back (Python has no partial unfreeze:
    objects frozen earlier by someone else are given back too) and the collector re-enabled. Where
    the collector is off on entry it is left alone (``active`` is False)."""

    def __init__(self, full_every: int = 100) -> None:
        if isinstance(full_every, bool) or not isinstance(full_every, int) or full_every < 1:
            raise ValueError(f"full_every must be an integer >= 1, got {full_every!r}")
        self.full_every = full_every
        self.active = False
        self._steps = 0

    def start(self) -> LoopGc:
        if gc.isenabled() and not self.active:
            gc.collect()
            gc.freeze()
            gc.disable()
            self.active = True
        return self

    def step(self) -> None:
        if self.active:
            self._steps += 1
            gc.collect(2 if self._steps % self.full_every == 0 else 1)

    def stop(self) -> None:
        if self.active:
            self.active = False
            gc.unfreeze()
            gc.enable()

    def __enter__(self) -> LoopGc:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class InterruptLatch:
    """Ctrl-C (SIGINT) in a training loop, taken where the loop can stop cleanly.

    Python raises KeyboardInterrupt wherever the main thread is when the signal comes: inside a
    library's ``with lock:`` (left held: the next user of the lock waits forever), or inside Python
    code that C code calls and whose errors it clears (the interrupt is lost and training goes on).
    Between ``start()`` and ``stop()`` the first Ctrl-C is only recorded, and ``check()`` raises
    KeyboardInterrupt at the loop's safe points (through :func:`check_interrupt`, which SFT's
    ``sft_step`` calls before each micro-batch and :func:`evaluate_nll` before each batch). A second
    Ctrl-C raises at once, as Python's own handler does.

    Active only in the main thread and while SIGINT has Python's default handler: a handler
    installed by the program that runs the loop is left alone (``active`` is False). ``stop()``
    puts the handler back and returns whether a Ctrl-C came while the latch was active: a loop that
    ended without an error raises KeyboardInterrupt for it (one that came after the last check)."""

    def __init__(self) -> None:
        self.active = False
        self.hits = 0
        self._prev: Any = None

    def start(self) -> InterruptLatch:
        global _ACTIVE_LATCH
        if self.active or threading.current_thread() is not threading.main_thread():
            return self
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return self
        self.hits = 0
        self._prev = signal.signal(signal.SIGINT, self._handler)
        self.active = True
        _ACTIVE_LATCH = self  # (one at most: a second one finds this one's handler, not Python's)
        return self

    def _handler(self, signum: int, frame: Any) -> None:
        self.hits += 1
        if self.hits > 1:
            raise KeyboardInterrupt

    def check(self) -> None:
        if self.active and self.hits:
            raise KeyboardInterrupt

    def stop(self) -> bool:
        global _ACTIVE_LATCH
        if not self.active:
            return False
        self.active = False
        signal.signal(signal.SIGINT, self._prev)
        _ACTIVE_LATCH = None
        return self.hits > 0


_ACTIVE_LATCH: InterruptLatch | None = None


def check_interrupt() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C came while an :class:`InterruptLatch` is active (a no-op
    otherwise): the safe points of code that runs inside a training loop."""
    if _ACTIVE_LATCH is not None:
        _ACTIVE_LATCH.check()


def gpu_memory_gib() -> float | None:
    """Peak memory allocated on the current GPU since the start (GiB), or None without one."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    return None


# -- checkpoints ------------------------------------------------------------------------------------

STATE_FILE = "trainer_state.pt"
STATE_JSON = "trainer_state.json"
ADAPTER_DIR = "adapter"
WEIGHTS_FILE = "model.safetensors"  # full fine-tuning: the trainable tensors
LATEST = "latest"


def has_lora(model: nn.Module) -> bool:
    from hoptune.nn.lora import LoRALinear

    return any(isinstance(m, LoRALinear) for m in model.modules())


def save_trainable(model: nn.Module, folder: str) -> None:
    """The model's weights for a checkpoint: the PEFT adapter for a LoRA model, else the trainable
    tensors as safetensors."""
    if has_lora(model):
        from hoptune.adapters import save_adapter

        save_adapter(model, os.path.join(folder, ADAPTER_DIR))
    else:
        from safetensors.torch import save_file

        state = {n: p.detach().cpu().contiguous() for n, p in trainable_parameters(model)}
        atomic_write(
            os.path.join(folder, WEIGHTS_FILE), lambda p: save_file(state, p, metadata={"format": "pt"})
        )


def load_trainable(model: nn.Module, folder: str) -> None:
    if has_lora(model):
        from hoptune.adapters import load_adapter

        load_adapter(model, os.path.join(folder, ADAPTER_DIR), trainable=True)
        return
    from safetensors.torch import load_file

    state = load_file(os.path.join(folder, WEIGHTS_FILE))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    if missing:
        raise ValueError(f"checkpoint {folder} lacks trainable tensors, e.g. {missing[:3]}")
    # every tensor checked before any is copied: a refused checkpoint leaves the model unchanged, and
    # copy_ would broadcast a size-1 tensor without a word
    for n, t in state.items():
        if n not in params:
            raise ValueError(f"checkpoint {folder} has tensor {n!r} the model does not have")
        if t.shape != params[n].shape:
            raise ValueError(
                f"checkpoint {folder}: tensor {n!r} has shape {tuple(t.shape)}, the model's is "
                f"{tuple(params[n].shape)}"
            )
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


LOCK_FILE = ".lock"  # a run folder's lock file (``run_lock``)


def saved_output(run_dir: str | os.PathLike) -> str | None:
    """The ``adapter/`` or ``model/`` folder a finished run saved in ``run_dir``, or None. Only a
    whole one: the file a save puts in last is there."""
    for name, last in ((ADAPTER_DIR, "adapter_config.json"), ("model", "config.json")):
        path = os.path.join(os.fspath(run_dir), name)
        if os.path.isfile(os.path.join(path, last)):
            return path
    return None


def interrupted_hint(cfg: Any, what: str = "run", fresh: bool = False) -> str:
    """What the same command does after an interrupted ``hoptune sft`` (``what="run"``) or
    ``hoptune demo`` (``what="demo"``; ``fresh``: it replaces its own earlier run in output.dir)
    of config ``cfg``: continue from the newest checkpoint, or start over, or refuse a run that had
    saved its output without keeping a checkpoint."""
    try:
        latest = Checkpointer(cfg.output.dir).latest()
    except OSError:
        latest = None
    resume = cfg.output.resume
    if latest is not None:
        if resume in ("auto", True):
            return f"run the same command to continue from the newest checkpoint, {latest}"
        # (output.resume=false refuses a folder with checkpoints; the demo's replaces them)
        again = f"the same command starts the {what} over; run it" if fresh else "run it"
        return f"{again} with output.resume=auto to continue from the newest checkpoint, {latest}"
    if isinstance(resume, str) and resume != "auto":
        return f"no checkpoint was written; the same command starts again from {resume}"
    why = " (train.save_every=0)" if cfg.train.save_every == 0 else ""
    saved = None if fresh else saved_output(cfg.output.dir)
    if saved is not None:  # (without a checkpoint, a rerun refuses a folder holding its output)
        return (
            f"training had finished: {saved} is saved whole; no checkpoint was kept{why}, so the "
            f"same command refuses that folder: give the {what} another output.dir"
        )
    return f"no checkpoint was written{why}; the same command starts the {what} over"


class FolderInUse(ValueError):
    """Another process holds the folder's run lock."""


def _same_file(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


@contextlib.contextmanager
def run_lock(folder: str) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (its ``.lock`` file) for the block: a second run writing
    the same folder would resume from, prune and overwrite the first one's checkpoints. FolderInUse
    when another process holds it; where the file system has no locks, the block runs unguarded."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    path = os.path.join(folder, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        locked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip()
            raise FolderInUse(
                f"{folder} is in use by another run (process {holder or '?'} holds {path}); wait for it "
                "to finish or use another folder"
            ) from None
        except OSError:  # no locks on this file system (some network mounts)
            locked = False
        if locked and not _same_file(fd, path):
            # a run that stopped before writing anything removes its lock file (and the folder it
            # made) while holding the lock: a lock taken on that removed file guards nothing
            raise FolderInUse(
                f"{folder} was removed by a run that stopped as this one started; start it again"
            )
        if locked:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (cut short, corrupted or edited after it was saved);
    the message names the file."""


def _state_globals() -> list[Any]:
    """What a ``trainer_state.pt`` of an earlier version holds besides tensors and plain containers:
    NumPy's RNG state as an array of uint32, pickled under the name of the NumPy that saved it
    (``numpy.core`` in 1.x, ``numpy._core`` in 2.x), each name allowed whichever NumPy reads it."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return []
    import importlib

    out: list[Any] = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    names = []
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            with warnings.catch_warnings():  # (NumPy 2 warns on numpy.core)
                warnings.simplefilter("ignore")
                fn = importlib.import_module(mod)._reconstruct
        except (ImportError, AttributeError):
            continue
        names.append((fn, f"{mod}._reconstruct"))
    return [*out, *names]  # (object, name) pairs, which torch takes from 2.6


def _torch_load_state(folder: str) -> dict[str, Any]:
    """``trainer_state.pt``'s contents, unpickled with torch's ``weights_only`` (tensors, containers
    and NumPy's RNG state only: a checkpoint from elsewhere runs no code); CheckpointError when it
    cannot be read."""
    path = os.path.join(folder, STATE_FILE)
    allowed = _state_globals()  # (outside the try: a fault here is not a damaged file)
    try:
        with torch.serialization.safe_globals(allowed):
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # (a cut or corrupt pickle fails in many ways: each means the same here)
        why = (
            str(e).split("\n")[0]
            if "Unsupported global" not in str(e)
            else (
                "it holds objects other than the optimizer, scheduler and RNG states a run saves ("
                + next((ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln), "")
                + "); it is loaded with torch.load(weights_only=True), which runs no code from the file"
            )
        )
        raise CheckpointError(f"{STATE_FILE} cannot be read ({type(e).__name__}: {why})") from e
    if not isinstance(blob, dict) or "state" not in blob:
        raise CheckpointError(f"{STATE_FILE} holds no training state (got {type(blob).__name__})")
    return blob


def step_folders(parent: str) -> list[str]:
    """The names of the whole checkpoints in ``parent`` (``step-<digits>`` folders holding their
    state file), oldest first. A folder the user keeps beside them (``step-00000500-best``) is not
    one of them, so it is never pruned."""
    if not os.path.isdir(parent):
        return []
    names = [
        n
        for n in os.listdir(parent)
        if re.fullmatch(r"step-\d+", n) and os.path.isfile(os.path.join(parent, n, STATE_FILE))
    ]
    return sorted(names, key=lambda n: int(n[5:]))


class Checkpointer:
    """Checkpoints under ``<run>/checkpoints/step-XXXXXXXX/`` (weights or PEFT adapter,
    ``trainer_state.pt`` with optimizer, scheduler, RNG and data position, and a readable
    ``trainer_state.json``).

    A checkpoint is written in a hidden temporary folder, fsynced, then renamed into place, and
    only then does the ``latest`` pointer (itself written atomically) move to it: a crash at any
    moment leaves the previous checkpoint whole and ``latest`` pointing at a complete one. Older
    checkpoints beyond ``keep`` are removed after each save, never the one just written."""

    def __init__(self, run_dir: str | os.PathLike, keep: int = 2) -> None:
        self.dir = os.path.join(os.fspath(run_dir), "checkpoints")
        self.keep = max(1, keep)

    def _steps(self) -> list[str]:
        return step_folders(self.dir)

    def pointed(self) -> str | None:
        """The folder name the ``latest`` pointer file holds, or None (no file, or an empty one)."""
        try:
            with open(os.path.join(self.dir, LATEST), encoding="utf-8") as f:
                return f.read().strip() or None
        except (OSError, UnicodeDecodeError):
            return None

    def latest(self) -> str | None:
        """The newest complete checkpoint folder, or None. A checkpoint that a killed save of its
        step again left aside is put back first (the one ``latest`` names, most often)."""
        self._put_back_set_aside()
        name = self.pointed()
        if name and os.path.isfile(os.path.join(self.dir, name, STATE_FILE)):
            return os.path.join(self.dir, name)
        steps = self._steps()
        return os.path.join(self.dir, steps[-1]) if steps else None

    def resumed_from(self, folder: str) -> None:
        """A run resumed from ``folder``: when it is one of this run's checkpoints, ``latest`` names
        it, so that a run stopped before its next save resumes (``output.resume=auto``, and the
        interruption's hint) from there as well, where metrics.jsonl was cut back to, and not from
        a later checkpoint of the run this one went back from (removed at the next save)."""
        if os.path.dirname(os.path.realpath(folder)) != os.path.realpath(self.dir):
            return
        name = os.path.basename(os.path.realpath(folder))
        if self.pointed() != name:
            atomic_write_text(os.path.join(self.dir, LATEST), name + "\n")

    def _put_back_set_aside(self) -> None:
        """A checkpoint that a save of its step again, killed between its two renames, left aside in
        ``.tmp-old-step-N-*/old`` (``latest`` may name it) goes back under its name."""
        if not os.path.isdir(self.dir):
            return
        for n in sorted(os.listdir(self.dir)):
            m = re.match(r"\.tmp-old-(step-\d+)-", n)
            if m:
                put_back_set_aside(os.path.join(self.dir, m[1]))

    def check_writable(self) -> None:
        """Raise OSError now if checkpoints cannot be written into an existing ``checkpoints/``
        (read-only, or a file by that name), instead of at the first save, after training up to it."""
        if os.path.lexists(self.dir):
            os.rmdir(tempfile.mkdtemp(dir=self.dir, prefix=".tmp-probe-"))

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        state: dict[str, Any],
        scaler: torch.amp.GradScaler | None = None,
    ) -> str:
        """Write checkpoint ``step``; returns its folder. ``state``: JSON-able training state (step,
        data position, ...), stored with the optimizer, scheduler, loss scaler and RNG states."""
        os.makedirs(self.dir, exist_ok=True)
        self._put_back_set_aside()  # deleted with the leftovers below, it would be lost
        for n in os.listdir(self.dir):
            if n.startswith(".tmp-"):  # leftovers of an interrupted save, or of the latest pointer's write
                path = os.path.join(self.dir, n)
                if os.path.isdir(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
        name = f"step-{step:08d}"
        final = os.path.join(self.dir, name)

        def write(tmp: str) -> None:
            save_trainable(model, tmp)
            blob = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rng_state(),
                "state": state,
            }
            torch.save(blob, os.path.join(tmp, STATE_FILE))
            with open(os.path.join(tmp, STATE_JSON), "w", encoding="utf-8") as f:
                json.dump(state, f, indent=2, sort_keys=True, default=str)

        # (the same step again, e.g. after a resume, replaces its folder; synced before the latest
        # pointer names it)
        atomic_dir(final, write)
        atomic_write_text(os.path.join(self.dir, LATEST), name + "\n")
        # keep this checkpoint and the newest keep - 1 before it. Checkpoints of later steps are left
        # from a run that went further before being resumed from an earlier one; this run writes those
        # steps again, so they go first (the newest checkpoint on disk is always the one just written)
        steps = self._steps()
        older = [n for n in steps if int(n[5:]) < step]
        for old in [n for n in steps if int(n[5:]) > step] + older[: max(0, len(older) - (self.keep - 1))]:
            # renamed out of the way first: a kill during the deletion leaves a .tmp- folder (removed
            # at the next save), never a step folder that has lost some of its files
            path = os.path.join(self.dir, old)
            try:
                os.replace(
                    path, os.path.join(tempfile.mkdtemp(dir=self.dir, prefix=f".tmp-del-{old}-"), "old")
                )
            except OSError:
                shutil.rmtree(path, ignore_errors=True)
        for n in os.listdir(self.dir):
            if n.startswith(".tmp-del-"):  # (not ".tmp-old-": those are put back, above)
                shutil.rmtree(os.path.join(self.dir, n), ignore_errors=True)
        return final

    @staticmethod
    def check_files(folder: str) -> None:
        """Raise CheckpointError naming the file when one of the checkpoint's files cannot be read:
        the training state's JSON and the adapter's config (parsed), the zip container of
        ``trainer_state.pt`` (its directory, not its contents) and the safetensors headers of the
        weights (saves are atomic, so this is a file changed or cut after it was written). Cheap: no
        tensor is read."""
        import zipfile

        from hoptune.loading import read_safetensors_header

        def bad(path: str, e: BaseException) -> CheckpointError:
            return CheckpointError(
                f"{os.path.relpath(path, folder)} cannot be read ({type(e).__name__}: {e})"
            )

        path = os.path.join(folder, STATE_JSON)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    state = json.load(f)
            except (ValueError, UnicodeDecodeError) as e:  # (JSONDecodeError is a ValueError)
                raise bad(path, e) from e
            if not isinstance(state, dict) or not isinstance(state.get("step"), int):
                raise bad(path, ValueError(f"expected an object with an int 'step', got {str(state)[:80]!r}"))
        path = os.path.join(folder, STATE_FILE)
        try:
            with zipfile.ZipFile(path):
                pass
        except (OSError, zipfile.BadZipFile) as e:
            raise bad(path, e) from e
        path = os.path.join(folder, ADAPTER_DIR, "adapter_config.json")
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    json.load(f)
            except (ValueError, UnicodeDecodeError) as e:
                raise bad(path, e) from e
        for sub in (ADAPTER_DIR, ""):
            d = os.path.join(folder, sub)
            names = sorted(n for n in os.listdir(d) if n.endswith(".safetensors")) if os.path.isdir(d) else []
            for n in names:
                try:
                    read_safetensors_header(os.path.join(d, n), exact=True)
                except (OSError, ValueError) as e:
                    raise bad(os.path.join(d, n), e) from e

    @staticmethod
    def read_state(folder: str) -> dict[str, Any]:
        """The training state of a checkpoint (its ``trainer_state.json``), without loading anything
        else: what a resume checks before it builds the model. A file that cannot be read raises
        CheckpointError (``check_files``)."""
        Checkpointer.check_files(folder)
        path = os.path.join(folder, STATE_JSON)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        return _torch_load_state(folder)["state"]

    @staticmethod
    def load(
        folder: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        restore_rng: bool = True,
        scaler: torch.amp.GradScaler | None = None,
    ) -> dict[str, Any]:
        """Load the weights (and, when given, optimizer, scheduler and loss scaler); returns the
        training state. Load the weights before building the optimizer or after: parameters are
        updated in place."""
        path = os.path.join(folder, STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder} is not a checkpoint (no {STATE_FILE})")
        Checkpointer.check_files(folder)  # (a damaged file named before anything is loaded)
        blob = _torch_load_state(folder)
        load_trainable(model, folder)
        if optimizer is not None:
            try:
                optimizer.load_state_dict(blob["optimizer"])
            except ValueError as e:  # (the weights above loaded: say which part does not fit)
                raise ValueError(f"its optimizer state does not fit the optimizer ({e})") from e
        if scheduler is not None and blob["scheduler"] is not None:
            scheduler.load_state_dict(blob["scheduler"])
            # a schedule saved without warmup_from_zero warmed up as (step + 1) / (warmup + 1): the
            # loaded state leaves the new default in place, and its run would go on at another lr
            saved = blob["scheduler"].get("lr_lambdas") or []
            for fn, d in zip(getattr(scheduler, "lr_lambdas", []), saved):
                if isinstance(fn, LRSchedule) and isinstance(d, dict) and "warmup_from_zero" not in d:
                    fn.warmup_from_zero = False
        if scaler is not None and blob.get("scaler"):  # (none in a checkpoint of an earlier version)
            scaler.load_state_dict(blob["scaler"])
        if restore_rng:
            set_rng_state(blob["rng"])
        return blob["state"]


# -- metrics, progress, plots -----------------------------------------------------------------------


NONFINITE = "nonfinite"  # a metrics line's field naming its NaN / inf values, written as null


def _metrics_line(rec: dict) -> str:
    """``rec`` as one line of strict JSON: jq, JSON.parse and others reject json.dumps' NaN and
    Infinity, so a non-finite value (a stopped step's loss, a skipped fp16 step's grad norm) is
    null, and ``"nonfinite": {key: "nan" | "inf" | "-inf"}`` keeps what it was."""
    bad = {k: str(v) for k, v in rec.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        rec = {**{k: None if k in bad else v for k, v in rec.items()}, NONFINITE: bad}
    return json.dumps(rec, allow_nan=False) + "\n"


class MetricsLog:
    """Metrics as JSONL lines ``{"step": ..., "split": "train"|"eval", ...}`` (appended and flushed at
    each call; strict JSON, NaN / inf as null named in a ``nonfinite`` field), mirrored to
    TensorBoard when it is installed and asked for."""

    def __init__(
        self, path: str | os.PathLike, tensorboard: bool = True, resume_step: int | None = None
    ) -> None:
        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if resume_step is not None and os.path.isfile(self.path):
            # drop what the interrupted run logged after the checkpoint we resume from
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(_metrics_line(r) for r in kept))
        elif resume_step is None and os.path.exists(self.path):
            os.remove(self.path)
        self._f = open(self.path, "a", encoding="utf-8")  # closed in close()
        self.tb = None
        self.tb_note = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # TensorBoard reads every event file of the folder: purge the points an interrupted run
                # logged after the checkpoint (or, on a fresh start, those of an earlier run), as above
                self.tb = SummaryWriter(
                    os.path.join(os.path.dirname(os.path.abspath(self.path)), "tensorboard"),
                    purge_step=0 if resume_step is None else resume_step + 1,
                )
            except Exception:  # tensorboard not installed
                self.tb_note = "TensorBoard logging skipped (tensorboard is not installed)"

    def log(self, step: int, split: str, values: dict[str, float]) -> None:
        rec = {
            "step": step,
            "split": split,
            **{k: (float(v) if v is not None else None) for k, v in values.items()},
        }
        self._f.write(_metrics_line(rec))
        self._f.flush()
        if self.tb is not None:
            for k, v in values.items():
                if v is not None:
                    self.tb.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        self._f.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics JSONL, with the NaN / inf values its ``nonfinite`` fields name."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a crash
                    continue
                bad = rec.pop(NONFINITE, None) if isinstance(rec, dict) else None
                if isinstance(bad, dict):
                    for k, v in bad.items():
                        if rec.get(k) is None and v in ("nan", "inf", "-inf"):
                            rec[k] = float(v)
                out.append(rec)
    return out


class Progress:
    """A tqdm bar over optimizer steps showing loss, lr, tokens/s and peak GPU memory."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "train") -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)

    def update(self, loss: float, lr: float, tokens_per_s: float, mem_gib: float | None) -> None:
        if self.bar is None:
            return
        post = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{tokens_per_s:,.0f}"}
        if mem_gib is not None:
            post["mem"] = f"{mem_gib:.1f}G"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Timer:
    """Tokens per second of the last step."""

    def __init__(self) -> None:
        self.t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt


def plot_metrics(metrics_path: str | os.PathLike, out_dir: str | os.PathLike) -> tuple[list[str], str | None]:
    """PNG plots of the curves in a metrics JSONL (loss with eval points, lr, tokens/s, grad norm).
    Returns (files written, a note when plotting was skipped)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "plots skipped: matplotlib is not installed (pip install matplotlib)"
    recs = read_metrics(metrics_path)
    train = [r for r in recs if r.get("split") == "train"]
    evals = [r for r in recs if r.get("split") == "eval"]
    if not train:
        return [], "plots skipped: no training metrics"
    os.makedirs(out_dir, exist_ok=True)
    written = []
    panels = [
        ("loss", "loss"),
        ("lr", "learning rate"),
        ("tokens_per_s", "tokens / s"),
        ("grad_norm", "grad norm"),
    ]
    for key, title in panels:
        xs = [r["step"] for r in train if r.get(key) is not None]
        ys = [r[key] for r in train if r.get(key) is not None]
        if not xs:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
        ax.plot(xs, ys, label=f"train {key}", lw=1.2)
        if key == "loss" and evals:
            ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval loss")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if key == "loss":
            ax.legend()
        fig.tight_layout()
        path = os.path.join(os.fspath(out_dir), f"{key}.png")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            atomic_write(path, lambda p, fig=fig: fig.savefig(p, format="png"))
        plt.close(fig)
        written.append(path)
    return written, None
