"""Put LoRA / QLoRA adapters into a transformers model in place, and take them out again.

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)   # or hoptune.load_model
    hoptune.apply_lora(model, r=16, alpha=32, quantize="nf4")       # nn.Linear -> LoRALinear, base frozen
    ... train ...
    hoptune.save_adapter(model, "out/adapter")                      # PEFT's on-disk format
    merged = hoptune.merge_and_unload(model)                        # plain transformers model again

Only the model passed is changed, and only after every argument and every targeted layer has
been checked: a target that matches nothing, a rank larger than a layer or a layer that NF4
cannot hold is an error before any layer is replaced, as is a model that holds PEFT's LoRA layers
already or sits inside DistributedDataParallel (wrap it after apply_lora). Module selection
follows PEFT:
``target_modules`` as a list matches a module whose name equals an entry or ends with
``"." + entry``; as a string it is a regular expression matched against the whole name; the
shorthand ``"all-linear"`` takes every linear layer but the output head (``lm_head``). Linear
layers are ``nn.Linear`` and, as in PEFT, transformers' ``Conv1D`` (GPT-2's projections: a linear
layer whose weight is stored transposed, ``[in, out]``); a Conv1D is adapted as a LoRALinear over
its weight transposed and given back as a Conv1D by :func:`remove_lora` / :func:`merge_and_unload`.
An ``nn.Linear`` subclass comes back as its own class; one with a forward of its own (a routed or
grouped projection, which a LoRA layer's ``x W^T + b`` would not reproduce) is refused, by name.
``rank_pattern`` / ``alpha_pattern`` keys are regular expressions matched against the end of a
module name (PEFT's ``(.*\\.)?(key)$``); the first key that matches wins. As in PEFT, a key that
matches no adapted layer, or an ``exclude_modules`` that matches no module, is warned about.
"""

from __future__ import annotations

import math
import re
import sys
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from hoptune.nn.lora import LoRALinear, check_lora_options
from hoptune.nn.nf4_linear import NF4Linear, mark_quantized
from hoptune.ops import _check
from hoptune.ops.nf4_lora import MAX_RANK
from hoptune.quant.checkpoint import _kept_dense, _skipped
from hoptune.quant.nf4 import BLOCKSIZES

ALL_LINEAR = "all-linear"
# model types whose layers of these names PEFT refuses to adapt (peft.tuners.tuners_utils.
# _check_lora_target_modules_mamba: the Mamba kernels read out_proj's weight directly), in
# get_peft_model and PeftModel.from_pretrained alike: an adapter holding them does not load in PEFT
PEFT_MAMBA_TYPES = frozenset({"falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h"})
PEFT_MAMBA_REFUSED = frozenset({"out_proj", "conv1d"})
_STATE_ATTR = "_hoptune_lora"  # per-model record: requires_grad of every parameter before apply_lora
# per-layer: (that record, the layer's name in the model that holds it), for remove_lora /
# merge_and_unload of a submodule of that model (a module does not know its parent)
_OWNER_ATTR = "_hoptune_owner"
_ORIGIN_ATTR = "_hoptune_origin"  # per-layer: "linear" (was nn.Linear or Conv1D) or "nf4" (NF4Linear)
_TIED_ATTR = "_hoptune_tied"  # per-layer, when quantized: (its tied dense weight,) for remove_lora
# on a layer that stands for a transformers Conv1D (a LoRALinear over one, an NF4Linear that
# load_model made from one): the model's class holds a Conv1D there, which remove_lora /
# merge_and_unload give back (NF4 stays NF4 in remove_lora)
CONV1D_ATTR = "_hoptune_conv1d"
# per-layer, for a LoRALinear over an nn.Linear subclass (NonDynamicallyQuantizableLinear, the out_proj
# of nn.MultiheadAttention): (that class, its own plain attributes), which remove_lora /
# merge_and_unload give back, as PEFT gives back the base layer itself
_CLASS_ATTR = "_hoptune_linear_class"
_LINEAR_OWN = frozenset(("training", "in_features", "out_features"))
# nn.Linear subclasses whose own forward computes x W^T + b all the same (Falcon's adds the bias
# after the product, rounding in between): a LoRALinear may stand in for them
_SAME_AS_LINEAR = frozenset(("transformers.models.falcon.modeling_falcon.FalconLinear",))
# the hooks a user registers on a layer (register_forward_pre_hook, register_forward_hook, with
# kwargs or always called, register_full_backward_hook ...): the layer that takes its place holds
# the same dicts (not copies, so the handles the user holds still remove them), as PEFT, which
# calls the layer it wraps, keeps them running; and the layer given back holds them again
_HOOK_ATTRS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_is_full_backward_hook",
)


@dataclass(frozen=True)
class _Target:
    name: str
    module: nn.Module
    r: int
    alpha: float


# -- selection (PEFT semantics) ---------------------------------------------------------------
def _is_bnb_layer(mod: nn.Module) -> bool:
    return type(mod).__module__.startswith("bitsandbytes") and isinstance(mod, nn.Linear)


def _conv1d_class() -> type | None:
    """transformers' ``Conv1D``, or None when transformers is not loaded: no model holds one then,
    and ``import hoptune`` stays without transformers."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def _is_conv1d(mod: nn.Module) -> bool:
    conv1d = _conv1d_class()
    return conv1d is not None and isinstance(mod, conv1d)


def _is_peft_layer(mod: nn.Module) -> bool:
    """A PEFT tuner layer (its LoRA ``Linear``...), or False when peft is not loaded: no model
    holds one then."""
    base = getattr(sys.modules.get("peft.tuners.tuners_utils"), "BaseTunerLayer", None)
    return base is not None and isinstance(mod, base)


def _is_linear(mod: nn.Module) -> bool:
    """A layer LoRA goes on: nn.Linear, hoptune's NF4Linear or transformers' Conv1D."""
    return (isinstance(mod, (nn.Linear, NF4Linear)) or _is_conv1d(mod)) and not isinstance(mod, LoRALinear)


def layer_features(mod: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear layer (a Conv1D's weight is ``[in, out]``)."""
    if _is_conv1d(mod):
        fan_in, fan_out = mod.weight.shape
        return fan_in, fan_out
    return mod.in_features, mod.out_features


def fan_in_fan_out(mod: nn.Module) -> bool:
    """PEFT's ``fan_in_fan_out`` of a layer: whether it is a Conv1D, or a LoRALinear or an
    NF4Linear (load_model's) that stands for one."""
    return _is_conv1d(mod) or getattr(mod, CONV1D_ATTR, False)


def _output_head_names(model: nn.Module) -> set[str]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return set()
    return {name for name, mod in model.named_modules() if mod is head}


def _matches(spec: str | Sequence[str], name: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == t or name.endswith("." + t) for t in spec)


def _check_spec(arg: str, spec: object, allow_none: bool = False) -> None:
    if spec is None and allow_none:
        return
    if isinstance(spec, str):
        try:
            re.compile(spec)
        except re.error as e:
            raise ValueError(f"{arg}={spec!r} is not a valid regular expression: {e}") from e
        return
    if (
        not isinstance(spec, (list, tuple, set, frozenset))
        or not spec
        or not all(isinstance(t, str) and t for t in spec)
    ):
        kinds = (
            "'all-linear', a regular expression or a non-empty list"
            if arg == "target_modules"
            else "a regular expression or a list"
        )
        raise TypeError(f"{arg} must be {kinds} of module names, got {spec!r}")


def _parametrizations(model: nn.Module) -> tuple[str, ...]:
    """The name prefixes of the modules inside parametrizations (torch.nn.utils.parametrize:
    ``<layer>.parametrizations.weight.0``): they compute a layer's tensor, they are not the
    model's layers."""
    return tuple(
        f"{n}.parametrizations.".lstrip(".")
        for n, m in model.named_modules()
        if parametrize.is_parametrized(m)
    )


def linear_suffixes(model: nn.Module) -> list[str]:
    """The distinct last name components of the model's linear layers (``q_proj``, ``lm_head``...)."""
    inside = _parametrizations(model)
    names = {
        n.rsplit(".", 1)[-1]
        for n, m in model.named_modules()
        if n and (_is_linear(m) or isinstance(m, LoRALinear)) and not n.startswith(inside)
    }
    return sorted(names - {"lora_A", "lora_B"})


def not_linear_error(target_modules: object, wrong: list[tuple[str, str]]) -> ValueError:
    """The error for a ``target_modules`` that matches ``wrong``, ``(name, class name)`` of modules
    that are not linear layers (as PEFT, which refuses them too)."""
    desc = ", ".join(f"{n} ({cls})" for n, cls in wrong[:5])
    return ValueError(
        f"target_modules={target_modules!r} matches modules that are not linear layers: {desc}"
        f"{' ...' if len(wrong) > 5 else ''}; LoRA goes on nn.Linear, transformers Conv1D (or "
        "hoptune NF4Linear) layers only"
    )


def select_modules(
    model: nn.Module,
    target_modules: str | Sequence[str],
    exclude_modules: str | Sequence[str] | None = None,
    include_lora: bool = False,
) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the layers ``target_modules`` picks (PEFT's rules), in model order;
    with ``include_lora`` existing LoRALinear layers count as linear layers, and the modules inside
    them (``lora_dropout``, which the layer they replaced did not have) are not looked at.

    Raises ValueError when nothing matches, or when a match is not a linear layer."""
    if isinstance(exclude_modules, (list, tuple, set, frozenset)) and not exclude_modules:
        exclude_modules = None  # PEFT: an empty exclude_modules excludes nothing
    _check_spec("target_modules", target_modules)
    _check_spec("exclude_modules", exclude_modules, allow_none=True)
    all_linear = isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR
    heads = _output_head_names(model) if all_linear else set()
    spec = target_modules if isinstance(target_modules, str) else list(target_modules)
    excl = (
        exclude_modules
        if exclude_modules is None or isinstance(exclude_modules, str)
        else list(exclude_modules)
    )

    def linear(mod: nn.Module) -> bool:
        return _is_linear(mod) or _is_bnb_layer(mod) or (include_lora and isinstance(mod, LoRALinear))

    peft_layers = [(n, m) for n, m in model.named_modules() if _is_peft_layer(m)]
    if peft_layers:
        # (its base_layer, lora_A.default, lora_B.default are nn.Linear: "all-linear" nested
        # adapters inside PEFT's, and save_adapter wrote them under PEFT's own names)
        name, mod = peft_layers[0]
        cls = f"{type(mod).__module__}.{type(mod).__qualname__}"
        raise TypeError(
            f"{name} is a PEFT {cls} layer: model already has PEFT's adapters, and hoptune puts "
            "its LoRA layers on the model without them. Fold them in first (model = "
            "model.merge_and_unload()), or load the PEFT adapter into the base model with "
            "hoptune.load_adapter(model, adapter_dir)"
        )
    inside = tuple(n + "." for n, _ in lora_layers(model)) if include_lora else ()
    inside += _parametrizations(model)
    chosen, wrong = [], []
    for name, mod in model.named_modules():
        if not name or (excl is not None and _matches(excl, name)) or name.startswith(inside):
            continue
        if all_linear:
            if linear(mod) and name not in heads:
                chosen.append((name, mod))
        elif _matches(spec, name):
            (chosen if linear(mod) else wrong).append((name, mod))
    if wrong:
        raise not_linear_error(target_modules, [(n, type(m).__name__) for n, m in wrong])
    if not chosen:
        example = next((n for n, m in model.named_modules() if n and linear(m)), "")
        raise ValueError(
            f"target_modules={target_modules!r} matches no linear layer of {type(model).__name__} "
            f"(exclude_modules={exclude_modules!r}); its linear layers are named {linear_suffixes(model)}"
            f"{string_target_hint(spec, example)}"
        )
    bnb = [n for n, m in chosen if _is_bnb_layer(m)]
    if bnb:
        raise TypeError(
            f"{bnb[0]} is a bitsandbytes {type(model.get_submodule(bnb[0])).__name__}; hoptune puts LoRA on "
            "nn.Linear or its own NF4 layers. Load the checkpoint with hoptune.load_model(path, "
            "quantize='nf4') instead (it reads bitsandbytes NF4 checkpoints without re-quantizing)"
        )
    return chosen


def pattern_value(pattern: Mapping[str, float] | None, name: str, default: float) -> float:
    """PEFT's ``get_pattern_key``: the value of the first key matching the end of ``name``."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _check_pattern(arg: str, pattern: object, kind: type) -> None:
    if pattern is None:
        return
    if not isinstance(pattern, Mapping):
        raise TypeError(f"{arg} must be a dict of module-name pattern -> value, got {type(pattern).__name__}")
    for k, v in pattern.items():
        if not isinstance(k, str) or not k:
            raise TypeError(f"{arg} keys must be non-empty strings (regular expressions), got {k!r}")
        try:
            re.compile(k)
        except re.error as e:
            raise ValueError(f"{arg} key {k!r} is not a valid regular expression: {e}") from e
        if kind is int and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"{arg}[{k!r}] must be a positive int, got {v!r}")
        if kind is float and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)):
            # (any finite alpha, as PEFT: 0 turns the LoRA term off, a negative one negates it)
            raise ValueError(f"{arg}[{k!r}] must be a finite number, got {v!r}")


def string_target_hint(spec: object, example: str) -> str:
    """What to add to 'matches no linear layer' for a string target: "q_proj" as a list entry names
    layers, as a string (a regular expression, PEFT's rule) it must match a whole name."""
    if not isinstance(spec, str) or spec.lower() == ALL_LINEAR:
        return ""
    return (
        f"; a string is a regular expression matched against the whole name (e.g. {example!r}): "
        f"pass a list, [{spec!r}], to match names by their last components"
    )


def layer_quantize(model: nn.Module, name: str, quantize: str | None) -> str | None:
    """``quantize`` for layer ``name``, but None for the model's ``_keep_in_fp32_modules`` and its
    output head (its output embeddings by whatever name, XLM-R's ``lm_head.decoder``; a layer named
    ``lm_head`` where the model names none): transformers + bitsandbytes (and load_model) never
    quantize them, and a model may read their weight directly (T5's feed-forward reads
    ``wo.weight``, which an NF4 base does not have)."""
    if quantize is None or _skipped(name, _kept_dense(model)):
        return None
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None if name == "lm_head" or name.endswith(".lm_head") else quantize
    return None if model.get_submodule(name) is head else quantize


def check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def plan_targets(
    model: nn.Module,
    r: int,
    alpha: float,
    target_modules: str | Sequence[str],
    exclude_modules: str | Sequence[str] | None,
    rank_pattern: Mapping[str, int] | None,
    alpha_pattern: Mapping[str, float] | None,
    quantize: str | None,
    blocksize: int,
) -> list[_Target]:
    """Select and check every layer to adapt; touches nothing."""
    check_model(model)
    if any(isinstance(m, nn.parallel.DistributedDataParallel) for m in model.modules()):
        # (its gradient buckets hold the parameters it was built with, the frozen bases here: the
        # adapters made inside it would train apart on every process, with no error)
        raise ValueError(
            "model is wrapped in DistributedDataParallel: apply LoRA to the model before wrapping "
            "it (it synchronizes the gradients of the parameters it was built with only)"
        )
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"r must be a positive int, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize must be None or 'nf4', got {quantize!r}")
    _check.blocksize("blocksize", blocksize, BLOCKSIZES)
    _check_pattern("rank_pattern", rank_pattern, int)
    _check_pattern("alpha_pattern", alpha_pattern, float)
    existing = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    if existing:
        raise ValueError(
            f"model already has LoRA layers ({existing[0]}, ... {len(existing)} in all); call "
            "hoptune.remove_lora(model) or hoptune.merge_and_unload(model) first"
        )
    # nn.MultiheadAttention never calls its out_proj: it reads out_proj.weight and .bias directly, which
    # an NF4 base does not have (the forward would fail). PEFT selects the layer too ("all-linear");
    # dense, its adapter is never used there either
    mha_out = {
        f"{n}.out_proj".lstrip(".") for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
    }
    chosen = select_modules(model, target_modules, exclude_modules)
    chosen = _peft_loadable(model, chosen, target_modules)
    _warn_unused(model, exclude_modules, rank_pattern, alpha_pattern, [n for n, _ in chosen])
    targets = []
    for name, mod in chosen:
        rr = pattern_value(rank_pattern, name, r)
        quant = layer_quantize(model, name, quantize)
        check_target(name, mod, rr, quant, blocksize)
        if name in mha_out and (quant == "nf4" or isinstance(mod, NF4Linear)):
            raise ValueError(
                f"layer {name} is the out_proj of an nn.MultiheadAttention, which reads its weight directly "
                "(an NF4 base has none, and an adapter there is never used); exclude it "
                f"(exclude_modules=[{name!r}]) or use quantize=None"
            )
        targets.append(_Target(name, mod, int(rr), float(pattern_value(alpha_pattern, name, alpha))))
    return targets


def _peft_loadable(
    model: nn.Module, chosen: list[tuple[str, nn.Module]], target_modules: object
) -> list[tuple[str, nn.Module]]:
    """``chosen`` without the layers PEFT refuses to adapt in its Mamba models (``out_proj``): left
    out of "all-linear" with a warning (PeftModel.from_pretrained refuses an adapter that holds
    them, and PEFT's own "all-linear" raises on them), an error when named."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in PEFT_MAMBA_TYPES:
        return chosen
    refused = [n for n, _ in chosen if n.rsplit(".", 1)[-1] in PEFT_MAMBA_REFUSED]
    if not refused:
        return chosen
    kept = [(n, m) for n, m in chosen if n.rsplit(".", 1)[-1] not in PEFT_MAMBA_REFUSED]
    last = sorted({n.rsplit(".", 1)[-1] for n in refused})
    why = (
        f"PEFT does not adapt {last} in {config.model_type} models (the Mamba kernels read the weight "
        "directly), and PeftModel.from_pretrained refuses an adapter that holds them"
    )
    if not (isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR) or not kept:
        raise ValueError(f"layer {refused[0]}: {why}; exclude it (exclude_modules={last!r})")
    warnings.warn(f"all-linear leaves out {len(refused)} layers ({refused[0]}, ...): {why}", stacklevel=4)
    return kept


def _warn_unused(
    model: nn.Module,
    exclude_modules: str | Sequence[str] | None,
    rank_pattern: Mapping[str, int] | None,
    alpha_pattern: Mapping[str, float] | None,
    chosen: list[str],
) -> None:
    """Warn, as PEFT does, about an ``exclude_modules`` that matches no module and about
    ``rank_pattern`` / ``alpha_pattern`` keys that match no adapted layer: each is otherwise
    ignored without a word (a typo, or a layer that target_modules leaves out)."""
    if exclude_modules and not any(_matches(exclude_modules, n) for n, _ in model.named_modules() if n):
        warnings.warn(
            f"exclude_modules={exclude_modules!r} matches no module of {type(model).__name__}, so it "
            "excludes nothing; check its names (a list matches whole names or their last components, "
            "a string is a regular expression over the whole name)",
            UserWarning,
            stacklevel=4,
        )
    for arg, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        unused = [k for k in pattern or {} if not any(pattern_value({k: 1}, n, 0) for n in chosen)]
        if unused:
            warnings.warn(
                f"{arg} keys {unused} match no layer that apply_lora adapts (target_modules, less "
                "exclude_modules), so they are ignored; a key is a regular expression matched against the "
                "end of a layer's name",
                RuntimeWarning,
                stacklevel=4,
            )


def check_target(
    name: str, mod: nn.Module, r: int, quantize: str | None, blocksize: int, rank_above_layer: bool = False
) -> None:
    """Whether layer ``name`` can take a rank-``r`` adapter (and NF4 quantization) — raises if not.
    A rank above min(in, out) adds nothing a smaller one could not hold, so apply_lora takes it for
    a mistake; PEFT accepts it, and ``rank_above_layer`` lets through the adapters PEFT saved so."""
    fan_in, fan_out = layer_features(mod)
    if r > MAX_RANK or (r > min(fan_in, fan_out) and not rank_above_layer):
        raise ValueError(
            f"r={r} is larger than layer {name} allows: it is [{fan_out}, {fan_in}] "
            f"(rank at most min(in, out) = {min(fan_in, fan_out)}, and at most {MAX_RANK}); give it a "
            "smaller rank (rank_pattern) or exclude it (exclude_modules)"
        )
    parametrized = [k for k in ("weight", "bias") if parametrize.is_parametrized(mod, k)]
    if parametrized:
        # (a computed weight: a LoRA layer cannot freeze it, nor keep what computes it; the class is
        # one torch generated, not the model's)
        raise ValueError(
            f"layer {name} has a parametrization on its {parametrized[0]} (torch.nn.utils.parametrize), "
            "which a LoRA layer cannot keep; remove it first, keeping its current values: "
            f"parametrize.remove_parametrizations(layer, {parametrized[0]!r}, leave_parametrized=True), "
            "or exclude the layer (exclude_modules)"
        )
    cls = type(mod)
    if (
        isinstance(mod, nn.Linear)
        and cls.forward is not nn.Linear.forward
        and f"{cls.__module__}.{cls.__qualname__}" not in _SAME_AS_LINEAR
    ):
        # (a grouped or routed projection: a LoRALinear computes x W^T + b in its place, silently
        # changing the model's output, or returns one tensor where the model expects more)
        raise ValueError(
            f"layer {name} is a {cls.__module__}.{cls.__qualname__}, an nn.Linear subclass with its own "
            "forward, which a LoRA layer (x W^T + b + s B A x) cannot stand in for; exclude it "
            f"(exclude_modules=[{name.rsplit('.', 1)[-1]!r}] leaves out every layer of that name)"
        )
    if isinstance(mod, nn.Linear) or _is_conv1d(mod):
        if mod.weight.is_meta:
            raise ValueError(f"layer {name} has its weight on the meta device; load the weights first")
        if quantize == "nf4" and (fan_in * fan_out) % blocksize:
            raise ValueError(
                f"quantize='nf4': layer {name} has {fan_in * fan_out} weights, not a multiple of "
                f"blocksize={blocksize}; exclude it (exclude_modules) or use quantize=None"
            )


# -- replacing layers -------------------------------------------------------------------------
def _carry_hooks(old: nn.Module, new: nn.Module) -> nn.Module:
    """``new`` (taking ``old``'s place) with ``old``'s forward and backward hooks (_HOOK_ATTRS)."""
    for attr in _HOOK_ATTRS:
        if attr in old.__dict__:
            setattr(new, attr, old.__dict__[attr])
    return new


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _conv1d_as_linear(conv: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing what the Conv1D ``conv`` does: its weight ``[in, out]`` as a
    transposed view ``[out, in]`` (no copy: F.linear with it is Conv1D's own ``x @ W``; the bias is
    the layer's own Parameter)."""
    fan_in, fan_out = conv.weight.shape
    lin = nn.Linear(fan_in, fan_out, bias=False, device="meta")
    lin.weight = nn.Parameter(conv.weight.detach().t(), requires_grad=False)
    lin.bias = conv.bias
    return lin


def _to_conv1d(weight: torch.Tensor, bias: nn.Parameter | None) -> nn.Module:
    """A transformers Conv1D holding ``weight`` ``[in, out]`` (contiguous, as from_pretrained gives
    it: transposing the view of _conv1d_as_linear back is the layer's original storage again)."""
    fan_in, fan_out = weight.shape
    with torch.device("meta"):
        conv = _conv1d_class()(fan_out, fan_in)
    conv.weight = nn.Parameter(weight.detach().contiguous())
    conv.bias = bias
    return conv


def _progress(items: list, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="layer", leave=False)


def replace_with_lora(
    model: nn.Module,
    targets: list[_Target],
    *,
    dropout: float,
    use_rslora: bool,
    use_dora: bool,
    quantize: str | None,
    double_quant: bool,
    blocksize: int,
    adapter_dtype: torch.dtype,
    init_lora_weights: bool | str,
    trainable: bool,
    progress: bool,
) -> None:
    """Swap each target for a LoRALinear; on any failure put every layer back and re-raise."""
    check_lora_options(
        "dropout",
        dropout,
        init_lora_weights,
        use_dora=use_dora,
        use_rslora=use_rslora,
        double_quant=double_quant,
    )
    adapter_dtype = _check.float_dtype("adapter_dtype", adapter_dtype)
    # every name of a shared Parameter: a tied head that merge_and_unload unties gets the flag of
    # the matrix it shared under its own name (a fresh nn.Linear's True otherwise)
    record = {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    done: list[tuple[str, nn.Module]] = []
    try:
        for t in _progress(targets, progress, "apply_lora"):
            kw = dict(
                r=t.r,
                lora_alpha=t.alpha,
                lora_dropout=dropout,
                use_rslora=use_rslora,
                use_dora=use_dora,
                adapter_dtype=adapter_dtype,
                init_lora_weights=init_lora_weights,
            )
            if isinstance(t.module, NF4Linear):
                new = LoRALinear(t.module.weight_nf4, bias=t.module.bias, **kw)
                origin = "nf4"
            else:
                base = _conv1d_as_linear(t.module) if _is_conv1d(t.module) else t.module
                try:
                    new = LoRALinear(
                        base,
                        quantize=layer_quantize(model, t.name, quantize),
                        double_quant=double_quant,
                        blocksize=blocksize,
                        **kw,
                    )
                except (TypeError, ValueError) as e:  # (a weight NF4 cannot hold: say which layer)
                    cls = TypeError if isinstance(e, TypeError) else ValueError
                    raise cls(f"layer {t.name}: {e}") from e
                origin = "linear"
                if new.quantized and uses[id(t.module.weight)] > 1:  # tied (lm_head): kept anyway
                    setattr(new, _TIED_ATTR, (t.module.weight,))
            setattr(new, _ORIGIN_ATTR, origin)
            _carry_hooks(t.module, new)
            if isinstance(t.module, nn.Linear) and type(t.module) is not nn.Linear:
                own = {
                    k: v for k, v in vars(t.module).items() if not k.startswith("_") and k not in _LINEAR_OWN
                }
                setattr(new, _CLASS_ATTR, (type(t.module), own))
            if fan_in_fan_out(t.module):
                setattr(new, CONV1D_ATTR, True)
            new.train(t.module.training)
            _set_module(model, t.name, new)
            done.append((t.name, t.module))
    except BaseException:
        for name, old in reversed(done):
            _set_module(model, name, old)
        # a LoRALinear freezes the base Parameters it keeps (the layer's weight and bias)
        for n, p in model.named_parameters():
            p.requires_grad_(record.get(n, p.requires_grad))
        raise
    for p in model.parameters():
        p.requires_grad_(False)
    for name, _ in done:
        lora = model.get_submodule(name)
        for p in (lora.lora_A, lora.lora_B, lora.lora_magnitude):
            if p is not None:
                p.requires_grad_(trainable)
    state = {"requires_grad": record}
    setattr(model, _STATE_ATTR, state)
    for name, _ in done:
        setattr(model.get_submodule(name), _OWNER_ATTR, (state, name))
    mark_quantized(model)


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


# -- public API -------------------------------------------------------------------------------
def apply_lora(
    model: nn.Module,
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.0,
    target_modules: str | Sequence[str] = ALL_LINEAR,
    *,
    exclude_modules: str | Sequence[str] | None = None,
    use_dora: bool = False,
    use_rslora: bool = False,
    quantize: str | None = None,
    double_quant: bool | None = None,
    blocksize: int | None = None,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    adapter_dtype: torch.dtype = torch.float32,
    init_lora_weights: bool | str = True,
    progress: bool | None = None,
) -> nn.Module:
    """Replace the targeted linear layers of ``model`` with ``LoRALinear`` in place; return ``model``.

    Every other parameter is frozen (and given back its ``requires_grad`` by ``remove_lora`` /
    ``merge_and_unload``); the adapters (``lora_A`` ``[r, in]``, ``lora_B`` ``[out, r]``, and with
    DoRA ``lora_magnitude`` ``[out]``) are trainable, in ``adapter_dtype`` (fp32 like PEFT). Scale
    is ``alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``); ``alpha`` is any finite number, as
    in PEFT (negative: the update negated; 0: no LoRA term). ``quantize="nf4"`` quantizes each
    dense base weight as it is wrapped (QLoRA; lossy), with ``blocksize`` and ``double_quant``
    (None, the default: 64 and True), but for the model's ``_keep_in_fp32_modules`` (T5's ``wo``)
    and its output head when targeted, which stay dense as transformers + bitsandbytes and
    load_model keep them; layers that are
    already NF4 (from :func:`hoptune.load_model`) stay as they are, with their own (a
    ``blocksize`` or ``double_quant`` given that they do not have is warned about).
    ``init_lora_weights``: PEFT's True (A kaiming-uniform, B zero), ``"gaussian"`` (A normal
    with std 1/r, B zero) or False (B random too: a non-trivial adapter, for tests). A
    transformers ``Conv1D`` (GPT-2) is adapted as PEFT does with ``fan_in_fan_out``: its
    LoRALinear holds the weight transposed, ``[out, in]`` (a view of the layer's own, or its NF4
    quantization), and the adapters have the shapes above. Forward
    and backward hooks registered on a replaced layer run on its LoRALinear (which they see, with
    its output, adapter included: PEFT's, on the layer it wraps, see the base's alone), then on the
    layer :func:`remove_lora` / :func:`merge_and_unload` give back.
    """
    asked = {"blocksize": blocksize, "double_quant": double_quant}
    blocksize = 64 if blocksize is None else blocksize
    double_quant = True if double_quant is None else double_quant
    targets = plan_targets(
        model, r, alpha, target_modules, exclude_modules, rank_pattern, alpha_pattern, quantize, blocksize
    )
    replace_with_lora(
        model,
        targets,
        dropout=dropout,
        use_rslora=use_rslora,
        use_dora=use_dora,
        quantize=quantize,
        double_quant=double_quant,
        blocksize=blocksize,
        adapter_dtype=adapter_dtype,
        init_lora_weights=init_lora_weights,
        trainable=True,
        progress=(quantize is not None and len(targets) > 32) if progress is None else progress,
    )
    _warn_nf4_kept(targets, asked)
    return model


def _warn_nf4_kept(targets: list[_Target], asked: Mapping[str, object]) -> None:
    """Warn when a ``blocksize`` / ``double_quant`` given to apply_lora differs from that of NF4
    layers, which are wrapped as they are (not re-quantized): the option is not what they use."""
    for arg, value in asked.items():
        if value is None:
            continue
        other = [
            (t.name, have)
            for t in targets
            if isinstance(t.module, NF4Linear)
            and (have := getattr(t.module.weight_nf4, "nested" if arg == "double_quant" else arg)) != value
        ]
        if other:
            name, have = other[0]
            warnings.warn(
                f"{arg}={value!r} is not used by {len(other)} layer(s) that are NF4 already (e.g. {name}, "
                f"NF4 with {arg}={have!r}): apply_lora wraps them as they are, without re-quantizing; "
                f"quantize the model with {arg}={value!r} (hoptune.load_model) to have it, or leave "
                f"{arg} out",
                UserWarning,
                stacklevel=3,
            )


def _restore_requires_grad(model: nn.Module, layers: Iterable[tuple[str, nn.Module]]) -> None:
    """Give back the requires_grad apply_lora recorded, after ``layers`` (``(name, layer)`` under
    ``model``) were taken out."""
    # the record sits on the module apply_lora was given, which may be a submodule (apply_lora(
    # model.model), then merge_and_unload(model)): each one restores the parameters under it
    own = set()
    for mod in model.modules():
        state = getattr(mod, _STATE_ATTR, None)
        if state is None:
            continue
        own.add(id(state))
        flags, done = state["requires_grad"], tuple(state.get("restored", ()))
        for n, p in mod.named_parameters():
            if n.startswith(done):  # (given back already by a remove of the submodule)
                continue
            # a name not recorded is a layer that stands for one without that parameter (an NF4 base
            # holds its weight in buffers): frozen, as that layer was, and as its bias comes back
            # (NF4Linear's to_linear, for an NF4 layer without an adapter, gives the same)
            p.requires_grad_(flags.get(n, False))
        delattr(mod, _STATE_ATTR)
    # or on a module above ``model`` (apply_lora(model), then remove_lora(model.model)): the
    # parameters under ``model`` are given back from it, and dropped from it for a later remove
    for name, lora in layers:
        state, full = getattr(lora, _OWNER_ATTR, (None, ""))
        prefix = full[: len(full) - len(name)]
        under = full.endswith(name) and prefix[-1:] in ("", ".")
        if state is None or id(state) in own or not under:
            continue
        own.add(id(state))
        flags = state["requires_grad"]
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(prefix + n, False))
        for n in [n for n in flags if n.startswith(prefix)]:
            del flags[n]
        state.setdefault("restored", []).append(prefix)


def _as_linear_class(lora: LoRALinear, lin: nn.Linear) -> nn.Linear:
    """``lin`` (a plain nn.Linear) as the nn.Linear subclass the LoRALinear replaced, if it was one,
    with that layer's own attributes."""
    cls, own = getattr(lora, _CLASS_ATTR, (None, None))
    if cls is not None and type(lin) is nn.Linear:
        lin.__class__ = cls
        lin.__dict__.update(own)
    return lin


def _base_layer(lora: LoRALinear) -> nn.Module:
    """The layer the LoRALinear replaced: NF4Linear for an NF4 origin, Conv1D for a Conv1D, else
    nn.Linear (dequantized if apply_lora quantized it: the dense original was not kept, unless it
    was tied to another)."""
    tied = getattr(lora, _TIED_ATTR, None)
    origin = getattr(lora, _ORIGIN_ATTR, "linear")
    conv1d = getattr(lora, CONV1D_ATTR, False)
    if origin == "nf4" and lora.quantized:
        out = NF4Linear(lora.weight_nf4, lora.bias)
        if conv1d:
            setattr(out, CONV1D_ATTR, True)
    elif conv1d:
        out = _to_conv1d(lora.base_weight().t(), lora.bias)
    elif not lora.quantized or tied is not None:
        out = nn.Linear(lora.in_features, lora.out_features, bias=lora.bias is not None, device="meta")
        out.weight = tied[0] if lora.quantized else lora.weight  # the same tensor: no copy
        if lora.bias is not None:
            out.bias = lora.bias
    else:
        out = lora.to_linear(merge=False)
    out = _as_linear_class(lora, out)
    out.train(lora.training)
    return _carry_hooks(lora, out)


def _replace_all(model: nn.Module, layers: Iterable[tuple[str, nn.Module]], make) -> None:
    """Put ``make(module)`` in place of each ``(name, module)``. A failure part way (out of memory
    while dequantizing, an interrupt) would leave the model part converted, with no record of which
    layers were: the layers already replaced are put back (the caller's list still holds them, so
    this keeps nothing in memory twice; the new layers are dropped) and the error propagates."""
    done: list[tuple[str, nn.Module]] = []
    try:
        for name, mod in layers:
            _set_module(model, name, make(mod))
            done.append((name, mod))
    except BaseException:
        for name, old in reversed(done):
            _set_module(model, name, old)
        raise


def remove_lora(model: nn.Module) -> nn.Module:
    """Drop the adapters: every ``LoRALinear`` becomes the layer it replaced (``nn.Linear``, a
    ``Conv1D``, or the ``NF4Linear`` that :func:`hoptune.load_model` made) and parameters get back the
    ``requires_grad`` they had before :func:`apply_lora`. A base that ``apply_lora(quantize="nf4")``
    quantized comes back dequantized (its dense original was not kept). ``model`` may be a submodule
    of the one given to apply_lora: its parameters get theirs back, the rest with a later
    ``remove_lora`` of the whole model. Returns ``model``."""
    check_model(model)
    layers = lora_layers(model)
    if not layers and not hasattr(model, _STATE_ATTR):
        raise ValueError(f"model ({type(model).__name__}) has no LoRA layers to remove")
    # (none, with a record: a remove of its submodules took them out, the rest is given back here)
    _replace_all(model, layers, _base_layer)
    _restore_requires_grad(model, layers)
    return model


@contextmanager
def disable_adapters(model: nn.Module):
    """Within the block every LoRA layer of ``model`` computes its base alone, as under PEFT's
    ``model.disable_adapter()`` (e.g. a DPO reference pass on the same weights); after it (also
    after an error) each layer is as it was. Yields ``model``."""
    check_model(model)
    layers = [m for _, m in lora_layers(model)]
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) has no LoRA layers to disable")
    with ExitStack() as stack:  # each layer's own disable_adapter, undone in reverse order
        for m in layers:
            stack.enter_context(m.disable_adapter())
        yield model


def merge_and_unload(
    model: nn.Module, dtype: torch.dtype | None = torch.bfloat16, progress: bool | None = None
) -> nn.Module:
    """Fold every adapter into its base and return a plain transformers model (in place).

    Each ``LoRALinear`` becomes an ``nn.Linear`` holding ``W + s B A`` (DoRA: ``m / ||W + s B A|| *
    (W + s B A)`` per output row), computed in fp32 from the (dequantized) base and rounded once
    to ``dtype`` (one that replaced a Conv1D becomes a Conv1D holding that weight transposed,
    ``[in, out]``); NF4 layers without an adapter are dequantized too, so ``save_pretrained`` writes
    an ordinary checkpoint. With a ``dtype`` every other floating-point parameter is cast to it as
    well (buffers, e.g. rotary frequencies, are left alone) and ``config.dtype`` is set, but for
    those ``from_pretrained(dtype=dtype)`` keeps in float32 (``_keep_in_fp32_modules_strict``, e.g.
    a MoE router, and for float16 ``_keep_in_fp32_modules``): a layer among them merges to float32;
    with ``dtype=None`` each layer keeps its base dtype. An output head tied to the input embeddings
    that had an adapter gets its own merged weight, and ``tie_word_embeddings`` becomes False in the
    config (and in its text config, where a composite config has one)."""
    check_model(model)
    dtype = _check.float_dtype("dtype", dtype, none=True)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (LoRALinear, NF4Linear))]
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) has no LoRA or NF4 layers to merge")
    heads = _output_head_names(model)
    from hoptune.loading import _keep_in_fp32  # (here: hoptune.loading imports this module)

    keep_fp32 = None if dtype is None else _keep_in_fp32(model, dtype)

    def kept(name: str) -> bool:
        return keep_fp32 is not None and keep_fp32.search(name) is not None

    fp32 = {id(m) for n, m in layers if kept(f"{n}.weight") or kept(f"{n}.bias")}

    def merged(mod: nn.Module) -> nn.Module:
        to = torch.float32 if id(mod) in fp32 else dtype
        if isinstance(mod, LoRALinear):
            new = mod.to_linear(merge=True, dtype=to)
        else:
            new = mod.to_linear(to)
        if fan_in_fan_out(mod):
            new = _to_conv1d(new.weight.t(), new.bias)
        elif isinstance(mod, LoRALinear):
            new = _as_linear_class(mod, new)
        new.train(mod.training)
        return _carry_hooks(mod, new)

    _replace_all(
        model, _progress(layers, len(layers) > 32 if progress is None else progress, "merge"), merged
    )
    config = getattr(model, "config", None)
    # a composite config (Llava's) has the flag in its text config as well, which transformers 4
    # reads and Llava's config copies up on loading when its own is False
    get_text = getattr(config, "get_text_config", None)
    text = get_text(decoder=True) if callable(get_text) else config
    configs = (config,) if text is config else (config, text)
    tied = [c for c in configs if getattr(c, "tie_word_embeddings", False)]
    get_input = getattr(model, "get_input_embeddings", None)
    emb = get_input() if callable(get_input) and heads & {n for n, _ in layers} else None
    if emb is not None and tied:
        # the merged head now has its own weight: a config still saying "tied" would let tie_weights()
        # (resize_token_embeddings, from_pretrained) put the embedding matrix back in its place. Its
        # requires_grad is the embedding matrix's from before apply_lora (_restore_requires_grad).
        # PEFT (0.21) differs: its merge adds the head's s B A into the one shared tensor in place,
        # so the head stays tied and the input embeddings change with it (though the adapter was
        # trained on the head only), and requires_grad stays as get_peft_model left it (frozen)
        head = model.get_output_embeddings()
        if getattr(head, "weight", None) is not getattr(emb, "weight", None):
            for c in tied:
                c.tie_word_embeddings = False
    if dtype is not None:
        for n, p in model.named_parameters():
            to = torch.float32 if kept(n) else dtype
            if p.is_floating_point() and p.dtype != to:
                p.data = p.data.to(to)
        if config is not None and hasattr(config, "dtype"):
            config.dtype = dtype
    _restore_requires_grad(model, [(n, m) for n, m in layers if isinstance(m, LoRALinear)])
    return model


def adapter_parameters(model: nn.Module) -> Iterable[nn.Parameter]:
    """The LoRA parameters of a patched model (for an optimizer)."""
    for _, lora in lora_layers(model):
        yield from (p for p in (lora.lora_A, lora.lora_B, lora.lora_magnitude) if p is not None)
