"""LoRA / DoRA adapters in PEFT's on-disk format (``docs/FORMATS.md`` section 2).

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (metadata
``{"format": "pt"}``) with, for each adapted layer ``<path>`` of the transformers model::

    base_model.model.<path>.lora_A.weight           [r, in]   fp32 by default
    base_model.model.<path>.lora_B.weight           [out, r]
    base_model.model.<path>.lora_magnitude_vector   [out]     (DoRA only; no ".weight" on disk)

``PeftModel.from_pretrained(base, folder)`` loads what :func:`save_adapter` writes, and
:func:`load_adapter` loads what ``PeftModel.save_pretrained`` writes (LoRA, rsLoRA, DoRA,
``rank_pattern`` / ``alpha_pattern``, ``layers_to_transform``; ``adapter_model.bin`` from
``safe_serialization=False`` too; keys holding the adapter name "default" as a PeftModel's
``state_dict()`` has them, ``<path>.lora_A.default.weight``, load as PEFT loads them). A config
field hoptune does not implement (``lora_bias``, ``layer_replication``, ``modules_to_save``...) is
an error when it is switched on, and a field it does not know at all is an error too unless it
holds an off value (null, false, an empty list or object: a newer PEFT's default), which loads
with a warning. With ``bias="lora_only"`` / ``"all"`` PEFT saves the biases whether or not they were
trained: those equal to the model's own load, trained ones that differ are an error. PEFT's copies
of base weights (``<head>.base_layer.weight`` beside an adapted output head;
``embed_tokens.weight`` / ``lm_head.weight`` with ``save_embedding_layers``) load when they equal
the model's own weights: hoptune never replaces base weights.

transformers' ``Conv1D`` layers (GPT-2) have the tensors above too (``[in, out]`` is the layer's
own weight, not the adapter's); ``fan_in_fan_out`` in the config is PEFT's record of such layers:
PEFT sets it per layer it adapts, in model order, True for a Conv1D and False for an nn.Linear,
and saves the last value. It never changes how the tensors are read (true without any Conv1D
layer loads with a warning, as in PEFT).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Mapping

import torch
from torch import nn

from hoptune._io import STAGE_PREFIX, replace_files
from hoptune.nn.lora import LoRALinear
from hoptune.ops import _check
from hoptune.ops.nf4_lora import MAX_RANK
from hoptune.patch import (
    _check_pattern,
    _check_spec,
    _is_linear,
    _is_peft_layer,
    _matches,
    _Target,
    check_target,
    fan_in_fan_out,
    layer_features,
    layer_quantize,
    lora_layers,
    pattern_value,
    replace_with_lora,
    select_modules,
)
from hoptune.quant.nf4 import BLOCKSIZES

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BIN_WEIGHTS_NAME = "adapter_model.bin"  # PEFT with safe_serialization=False; read, never written
PREFIX = "base_model.model."

# Config fields, by what hoptune does with them (PEFT 0.21's LoraConfig has all of these).
_USED = {
    "peft_type",
    "r",
    "lora_alpha",
    "target_modules",
    "exclude_modules",
    "lora_dropout",
    "use_rslora",
    "use_dora",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "layers_pattern",
    "fan_in_fan_out",
    "bias",  # "lora_only" / "all" only with the model's own biases (untrained) in the file
}
# informational, or used only to initialise a fresh adapter (the weights on disk replace that)
_IGNORED = {
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "auto_mapping",
    "peft_version",
    "task_type",
    "init_lora_weights",  # except the initializations that change the base weights (_BASE_CHANGING_INITS)
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
    "runtime_config",
    "megatron_core",  # only read together with megatron_config, which must be off
    "qalora_group_size",  # only read with use_qalora, which must be off
    "ensure_weight_tying",  # only about modules_to_save / trainable tokens, which must be off
}
# features hoptune does not implement: allowed only with the value that switches them off
_OFF: dict[str, tuple] = {
    "modules_to_save": (None, []),
    "layer_replication": (None, []),
    "lora_bias": (False,),
    "use_qalora": (False,),
    "megatron_config": (None,),
    "trainable_token_indices": (None,),
    "target_parameters": (None, []),
    "use_bdlora": (None,),
    "alora_invocation_tokens": (None,),
    "arrow_config": (None,),
    "monteclora_config": (None,),
    "velora_config": (None,),
    "kasa_config": (None,),
}
# PEFT's bias: which biases were trained beside the LoRA factors (and saved with them)
_BIAS = ("none", "lora_only", "all")
# PEFT initializations that change the base layer's weight (and are repeated by PEFT when it loads
# the adapter): the A / B on disk only fit that changed weight, which hoptune does not compute
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq")
# the LoRALinear attribute holding the init_lora_weights of a loaded adapter that is not PEFT's
# plain LoRA ("mica": lora_B stays frozen in training), for save_adapter to write it back
_INIT_ATTR = "peft_init_lora_weights"
# the LoRALinear attribute holding (base_model_name_or_path, revision) of a loaded adapter: PEFT's
# save_pretrained writes a loaded config's values back, and save_adapter does too
_BASE_ATTR = "peft_base_model"


# -- config -----------------------------------------------------------------------------------
def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def _common(values: list) -> object:
    return Counter(values).most_common(1)[0][0]


def _pattern_keys(names: list[str], value_of: dict[str, object], default: object) -> dict[str, object]:
    r"""Per-module exceptions to ``default`` as PEFT pattern keys: the last name component when every
    adapted module with that component agrees, else the escaped full path anchored with ``^`` (PEFT
    matches a key against the end of a name, ``(.*\.)?(key)$``: without the anchor ``x\.proj`` would
    also match ``y.x.proj``, and the first matching key wins)."""
    out: dict[str, object] = {}
    by_suffix: dict[str, list[str]] = {}
    for n in names:
        by_suffix.setdefault(n.rsplit(".", 1)[-1], []).append(n)
    for suffix, group in by_suffix.items():
        vals = {value_of[n] for n in group}
        if vals == {default}:
            continue
        if len(vals) == 1:
            out[re.escape(suffix)] = next(iter(vals))
        else:
            out.update({"^" + re.escape(n): value_of[n] for n in group if value_of[n] != default})
    return out


def _module_names_without_lora(model: nn.Module) -> list[str]:
    """The module paths PEFT sees in the base model: those of ``model`` but the children a LoRALinear
    adds (``lora_dropout``); the layer it replaced had none."""
    inside = tuple(n + "." for n, m in model.named_modules() if isinstance(m, LoRALinear))
    return [n for n, _ in model.named_modules() if n and not n.startswith(inside)]


def _target_modules(model: nn.Module, names: list[str]) -> list[str] | str:
    """target_modules for the config, the first of these forms that selects exactly the adapted layers
    among all the modules of the model (PEFT's rules: a list entry matches a path equal to it or
    ending in ``"." + entry``, a string must match the whole path): the last name components, the
    full paths, a regular expression of the full paths. A form that selected more (a nested
    ``y.x.proj`` for ``x.proj``; a LayerNorm or a convolution that shares a layer's last component)
    makes PEFT adapt layers the file has no weights for, or fail, and hoptune refuse the file."""
    every = _module_names_without_lora(model)
    want = set(names)
    for spec in (sorted({n.rsplit(".", 1)[-1] for n in names}), sorted(names)):
        if {n for n in every if _matches(spec, n)} == want:
            return spec
    return "|".join(re.escape(n) for n in sorted(names))


_PARALLEL = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's wrapper and DataParallel / DistributedDataParallel: their
    ``_orig_mod.`` and ``module.`` are no part of the model's module paths, of which PEFT's keys are
    made (PEFT ignores keys it does not know: it would load the base model alone)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(model, _PARALLEL):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _peft_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    """``(name, layer)`` of the first PEFT tuner layer (its LoRA ``Linear``...) in ``model``; None
    when there is none (or peft is not loaded: no model holds one then)."""
    return next(((n, m) for n, m in model.named_modules() if _is_peft_layer(m)), None)


def _parallel_wrapper(model: nn.Module) -> str | None:
    """The name of the DataParallel / DistributedDataParallel wrapping ``model``, if one does."""
    while isinstance(model, nn.Module):
        if isinstance(model, _PARALLEL):
            return type(model).__name__
        model = getattr(model, "_orig_mod", None)
    return None


def adapter_config(
    model: nn.Module,
    base_model_name_or_path: str | os.PathLike | None = None,
    revision: str | None = None,
) -> dict:
    """The ``adapter_config.json`` content describing the LoRA layers of ``model``."""
    if isinstance(base_model_name_or_path, os.PathLike):
        base_model_name_or_path = os.fspath(base_model_name_or_path)
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise TypeError(
            f"base_model_name_or_path must be a str, a path or None, got {base_model_name_or_path!r}"
        )
    if revision is not None and not isinstance(revision, str):
        raise TypeError(f"revision must be a str or None, got {revision!r}")
    model = _unwrap(model)
    layers = lora_layers(model)
    held = _peft_layer(model) if not layers else None
    if held is not None:
        name, mod = held
        raise TypeError(
            f"{name} is a PEFT {type(mod).__module__}.{type(mod).__qualname__} layer: model holds "
            "PEFT's adapters, not hoptune's LoRA layers; PEFT saves them in this format: "
            "model.save_pretrained(adapter_dir)"
        )
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) has no LoRA layers; call hoptune.apply_lora first")
    for field in ("use_dora", "use_rslora", "lora_dropout_p", _INIT_ATTR):
        vals = {getattr(m, field, True) for _, m in layers}
        if len(vals) > 1:
            name = "init_lora_weights" if field == _INIT_ATTR else field
            raise ValueError(
                f"the LoRA layers differ in {name} ({sorted(vals, key=repr)}); PEFT's format holds one "
                "value per adapter"
            )
    names = [n for n, _ in layers]
    ranks = {n: m.r for n, m in layers}
    alphas = {n: _num(m.lora_alpha) for n, m in layers}
    r = _common(list(ranks.values()))
    alpha = _common(list(alphas.values()))
    first = layers[0][1]
    # a loaded adapter's base and revision, as PEFT keeps them; its revision is that of its base,
    # so it is dropped when another base is given
    loaded = {getattr(m, _BASE_ATTR) for _, m in layers if hasattr(m, _BASE_ATTR)}
    loaded_name, loaded_revision = loaded.pop() if len(loaded) == 1 else (None, None)
    if revision is None and base_model_name_or_path in (None, loaded_name):
        revision = loaded_revision
    if base_model_name_or_path is None:
        base_model_name_or_path = loaded_name
    if base_model_name_or_path is None:
        config = getattr(model, "config", None)
        base_model_name_or_path = getattr(config, "_name_or_path", None) or getattr(
            config, "name_or_path", None
        )
    # PEFT's task_type picks the PeftModel class from_pretrained builds: CAUSAL_LM's needs a model
    # that generates (a masked LM, which has output embeddings too, fails to load), an encoder-decoder
    # is SEQ_2_SEQ_LM's; None gives the plain PeftModel, which fits any model
    can_generate = getattr(model, "can_generate", None)
    task_type = None
    if callable(can_generate) and can_generate():
        encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
        task_type = "SEQ_2_SEQ_LM" if encoder_decoder else "CAUSAL_LM"
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path or None,
        "revision": revision,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": _target_modules(model, names),
        "exclude_modules": None,
        "rank_pattern": _pattern_keys(names, ranks, r),
        "alpha_pattern": _pattern_keys(names, alphas, alpha),
        "use_rslora": bool(first.use_rslora),
        "use_dora": bool(first.use_dora),
        "lora_dropout": float(first.lora_dropout_p),
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out(layers[-1][1]),  # PEFT's value: that of the last layer
        "modules_to_save": None,
        "init_lora_weights": getattr(first, _INIT_ATTR, True),
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }


def check_adapter_config(cfg: object, where: str = CONFIG_NAME) -> dict:
    """Validate an adapter config (a parsed ``adapter_config.json``); returns it with defaults filled."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{where} must hold a JSON object, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - _USED - _IGNORED - set(_OFF))
    # a newer PEFT adds fields whose default switches a feature off (None, False, an empty list or
    # object): those cannot change what the adapter computes, so they load with a warning
    # (by identity: 0 == False in Python, and a 0 may well mean something)
    switched_on = [f for f in unknown if not (cfg[f] is None or cfg[f] is False or cfg[f] in ([], {}))]
    if switched_on:
        fields = {f: cfg[f] for f in switched_on}
        raise ValueError(
            f"{where} has fields hoptune does not know: {fields}; refusing to drop them silently "
            "(they may change what the adapter computes)"
        )
    if unknown:
        warnings.warn(
            f"{where}: fields hoptune does not know, set to their off value, are ignored: {unknown}",
            stacklevel=3,
        )
    for field, off in _OFF.items():
        if field in cfg and cfg[field] not in off:
            raise ValueError(
                f"{where}: {field}={cfg[field]!r} is not supported by hoptune (supported: {off[0]!r})"
            )
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type must be 'LORA', got {cfg.get('peft_type')!r}")
    out = dict(cfg)
    out.setdefault("lora_alpha", 8)  # PEFT's defaults
    out.setdefault("lora_dropout", 0.0)
    out.setdefault("use_rslora", False)  # FORMATS.md: a missing use_rslora means alpha / r
    out.setdefault("use_dora", False)
    out.setdefault("fan_in_fan_out", False)
    out.setdefault("bias", "none")
    if out["bias"] not in _BIAS:
        got = out["bias"]
        raise ValueError(f"{where}: bias must be 'none', 'lora_only' or 'all', got {got!r}")
    out["rank_pattern"] = out.get("rank_pattern") or {}
    out["alpha_pattern"] = out.get("alpha_pattern") or {}
    r = out.get("r", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"{where}: r must be a positive int, got {r!r}")
    out["r"] = r
    a = out["lora_alpha"]
    if not isinstance(a, (int, float)) or isinstance(a, bool) or not math.isfinite(a):
        raise ValueError(f"{where}: lora_alpha must be a finite number, got {a!r}")
    for field in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if not isinstance(out[field], bool):
            raise ValueError(f"{where}: {field} must be true or false, got {out[field]!r}")
    d = out["lora_dropout"]
    if not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
        raise ValueError(f"{where}: lora_dropout must be a number in [0, 1), got {d!r}")
    if out.get("target_modules") is None:
        raise ValueError(f"{where}: target_modules is missing")
    for field in ("target_modules", "exclude_modules"):
        if field == "exclude_modules" and out.get(field) == []:
            continue  # PEFT: an empty exclude_modules excludes nothing
        try:
            _check_spec(field, out.get(field), allow_none=field == "exclude_modules")
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from e
    _check_layers(out, where)
    for field, kind in (("rank_pattern", int), ("alpha_pattern", float)):
        if not isinstance(out[field], dict):
            raise ValueError(f"{where}: {field} must be an object, got {out[field]!r}")
        try:
            _check_pattern(field, out[field], kind)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from e
    init = out.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise ValueError(
            f"{where}: init_lora_weights={init!r} is not supported: that initialization changes the base weights "
            "(PEFT repeats it when it loads the adapter) and the lora_A / lora_B on disk only fit those changed "
            "weights; convert the adapter to a plain LoRA with PEFT first (save_pretrained with "
            "path_initial_model_for_weight_conversion), or merge it with PEFT"
        )
    return out


def _is_index(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_layers(cfg: dict, where: str) -> None:
    """layers_to_transform (a layer index or a list of them) and layers_pattern (a regular expression
    or a list of them), as PEFT's LoraConfig accepts them: only beside a list target_modules."""
    idx = cfg.get("layers_to_transform")
    if idx is None or idx == []:
        return
    if not (_is_index(idx) or (isinstance(idx, list) and all(_is_index(i) for i in idx))):
        raise ValueError(f"{where}: layers_to_transform must be a layer index or a list of them, got {idx!r}")
    if isinstance(cfg["target_modules"], str):
        raise ValueError(
            f"{where}: layers_to_transform needs a list target_modules (PEFT refuses it beside the regular "
            f"expression {cfg['target_modules']!r})"
        )
    pattern = cfg.get("layers_pattern")
    patterns = [pattern] if isinstance(pattern, str) else pattern
    if patterns is not None and not (
        isinstance(patterns, list) and all(isinstance(p, str) for p in patterns)
    ):
        raise ValueError(
            f"{where}: layers_pattern must be a string, a list of strings or null, got {pattern!r}"
        )
    for p in patterns or []:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"{where}: layers_pattern {p!r} is not a valid regular expression: {e}") from e


def _layer_filter(cfg: dict) -> Callable[[str], bool | None] | None:
    r"""PEFT's layers_to_transform: None when every layer counts, else whether a module path lies in one
    of the layers it names. The layer index is the number after the first ``<layers_pattern>.`` in the
    path, or without a pattern the first number that follows a name component (``model.layers.3.``).
    The first pattern that matches decides; one that matches without capturing the index (a ``|``
    outside a group: ``h|layers`` reads as ``(?:^|.*?\.)h`` or ``layers\.(?P<idx>\d+)\.``) gives
    None, a path PEFT takes as not in the layers."""
    idx = cfg.get("layers_to_transform")
    if idx is None or idx == []:
        return None
    wanted = {idx} if isinstance(idx, int) else set(idx)
    pattern = cfg.get("layers_pattern")
    if not pattern:  # None, "" or []: any name before the index, as in PEFT
        regexes = [re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")]
    else:
        patterns = [pattern] if isinstance(pattern, str) else pattern
        regexes = [re.compile(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.") for p in patterns]

    def in_layers(name: str) -> bool:
        for rx in regexes:
            m = rx.match(name)
            if m is not None:
                return None if m["idx"] is None else int(m["idx"]) in wanted
        return False

    return in_layers


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict:
    folder = os.fspath(adapter_dir)
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        # PEFT's save_pretrained puts an adapter not named "default" in a subfolder of its name
        named = (
            sorted(d for d in os.listdir(folder) if os.path.isfile(os.path.join(folder, d, CONFIG_NAME)))
            if os.path.isdir(folder)
            else []
        )
        hint = f"; adapters are in its subfolders {named}: pass one of those" if named else ""
        if os.path.isdir(folder) and (
            os.path.isfile(os.path.join(folder, WEIGHTS_NAME))
            or any(n.startswith(STAGE_PREFIX) for n in os.listdir(folder))
        ):
            hint = (
                f"; {folder} holds adapter weights without their config (a save_adapter into it stopped "
                "while it replaced the adapter there, or the config was not copied): save the adapter again"
            )
        raise FileNotFoundError(f"{path} does not exist{hint}")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    return check_adapter_config(cfg, path)


# -- save -------------------------------------------------------------------------------------
def adapter_state_dict(
    model: nn.Module, dtype: torch.dtype | None = torch.float32
) -> dict[str, torch.Tensor]:
    """The PEFT-keyed adapter tensors of ``model`` on the CPU (``dtype=None`` keeps their dtype)."""
    model = _unwrap(model)
    out = {}
    for name, lora in lora_layers(model):
        parts = {"lora_A.weight": lora.lora_A, "lora_B.weight": lora.lora_B}
        if lora.lora_magnitude is not None:
            parts["lora_magnitude_vector"] = lora.lora_magnitude
        for suffix, t in parts.items():
            t = t.detach()
            out[f"{PREFIX}{name}.{suffix}"] = (t if dtype is None else t.to(dtype)).cpu().contiguous()
    return out


def save_adapter(
    model: nn.Module,
    adapter_dir: str | os.PathLike,
    dtype: torch.dtype | None = torch.float32,
    base_model_name_or_path: str | os.PathLike | None = None,
    revision: str | None = None,
) -> None:
    """Write the adapters of ``model`` to ``adapter_dir`` in PEFT's format, the two files replaced
    together (other files in the folder are left alone): both are written and synced before either
    replaces anything (a full disk leaves the old adapter whole), and a crash while they go in
    leaves the old adapter, the new one, or weights without a config, which every reader refuses
    (:func:`read_adapter_config` says what happened).

    ``dtype``: of the saved tensors (fp32 like PEFT; None keeps the training dtype).
    ``base_model_name_or_path``: recorded in the config (default: that of the adapter
    :func:`load_adapter` loaded, else ``model.config._name_or_path``).
    ``revision``: the base model's revision, recorded in the config (default: that of the loaded
    adapter, unless another ``base_model_name_or_path`` is given; else null).
    A model wrapped by torch.compile, DataParallel or DistributedDataParallel is saved as the model
    inside (the wrappers' ``_orig_mod.`` / ``module.`` are not in the keys)."""
    dtype = _check.float_dtype("dtype", dtype, none=True)
    from safetensors.torch import save_file

    model = _unwrap(model)
    cfg = adapter_config(model, base_model_name_or_path, revision)
    cfg_text = json.dumps(cfg, indent=2, sort_keys=True) + "\n"
    state = adapter_state_dict(model, dtype)
    _warn_unsaved_trainables(model)
    folder = os.fspath(adapter_dir)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"adapter_dir {folder!r} exists and is not a directory")
    os.makedirs(folder, exist_ok=True)

    def write_config(path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(cfg_text)

    # the config goes in last and the old one out first: a reader (PEFT included) never sees the new
    # weights beside the old config (same shapes, another alpha or rank pattern: a silently wrong scale)
    replace_files(
        folder,
        {WEIGHTS_NAME: lambda p: save_file(state, p, metadata={"format": "pt"}), CONFIG_NAME: write_config},
        last=CONFIG_NAME,
    )


def _warn_unsaved_trainables(model: nn.Module) -> None:
    """A warning when parameters other than the LoRA factors require grad: the adapter (PEFT's
    ``bias="none"``, no ``modules_to_save``) does not hold them, so their training would be lost."""
    saved = {
        id(t)
        for _, lora in lora_layers(model)
        for t in (lora.lora_A, lora.lora_B, lora.lora_magnitude)
        if t is not None
    }
    left = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in saved]
    if left:
        warnings.warn(
            f"save_adapter writes the LoRA factors only: {len(left)} other trainable parameter(s) are "
            f"not in the adapter, e.g. {left[:3]}; save them separately (from model.state_dict()) "
            "or freeze them",
            stacklevel=3,
        )


# -- load -------------------------------------------------------------------------------------
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def _check_not_lfs_pointer(path: str) -> None:
    """A clone made without git-lfs holds a small text pointer in place of each large file."""
    with open(path, "rb") as f:
        head = f.read(len(_LFS_POINTER))
    if head == _LFS_POINTER:
        raise ValueError(
            f"{path} is a git-lfs pointer, not the weights: the repository was cloned "
            "without git-lfs fetching its large files; run `git lfs pull` in it (after "
            "`git lfs install`), or download the file itself"
        )


def _read_weights(adapter_dir: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors: ``adapter_model.safetensors``, else ``adapter_model.bin`` (what PEFT
    writes with ``safe_serialization=False``), read as PEFT reads it: ``torch.load`` with
    ``weights_only=True``, so a pickle can restore tensors only."""
    path = os.path.join(adapter_dir, WEIGHTS_NAME)
    if not os.path.isfile(path):
        bin_path = os.path.join(adapter_dir, BIN_WEIGHTS_NAME)
        if os.path.isfile(bin_path):
            return _read_bin(bin_path)
        hint = ""
        if os.path.isfile(os.path.join(adapter_dir, "adapter_model.pt")):
            hint = f" (found adapter_model.pt: hoptune reads {WEIGHTS_NAME} or {BIN_WEIGHTS_NAME})"
        raise FileNotFoundError(f"{path} does not exist{hint}")
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as e:  # safetensors raises its own error types for truncated / corrupt files
        _check_not_lfs_pointer(path)
        raise ValueError(f"cannot read {path}: {e} (the file may be truncated or corrupt)") from e


def _read_bin(path: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, or a pickle that holds more than tensors
        _check_not_lfs_pointer(path)
        raise ValueError(
            f"cannot read {path}: {e} (the file may be truncated or corrupt, or hold objects "
            "other than tensors)"
        ) from e
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{path} must hold a dict of tensor names to tensors, got {type(state).__name__}")
    return state


# on-disk suffix of each LoRA tensor -> its name in _group's output
_LORA_PARTS = {
    "lora_A.weight": "lora_A.weight",
    "lora_B.weight": "lora_B.weight",
    "lora_magnitude_vector": "lora_magnitude_vector",
    "lora_magnitude_vector.weight": "lora_magnitude_vector",  # older PEFT versions
}


# <module>.<part>.<adapter name>.weight: the key of a LoRA tensor in a PeftModel's state_dict
_NAMED_KEY = re.compile(
    r"(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_magnitude_vector)\.(?P<adapter>[^.]+)\.weight"
)


def _unknown_key(path: str, key: str) -> ValueError:
    return ValueError(
        f"{path}: key {key!r} is not a LoRA A/B or DoRA magnitude tensor; hoptune does not support it "
        "(lora_bias, embedding adapters, modules_to_save and trainable tokens are not implemented)"
    )


def _group(
    tensors: Mapping[str, torch.Tensor], path: str
) -> tuple[
    dict[str, dict[str, torch.Tensor]],
    dict[str, tuple[str, str, bool, torch.Tensor]],
    dict[tuple[str, str], str],
]:
    """``{module path: {part: tensor}}`` of the LoRA tensors (parts ``lora_A.weight``,
    ``lora_B.weight``, ``lora_magnitude_vector``), and ``{key: (module path, "weight" | "bias",
    under base_layer, tensor)}`` of PEFT's copies of base weights: ``<m>.base_layer.weight`` beside
    an output head it adapts, ``<m>.weight`` of an embedding layer (its ``save_embedding_layers``),
    both checked in load_adapter; and ``{(module path, part): key}`` of the LoRA tensors, for
    messages. Other keys are errors."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    copies: dict[str, tuple[str, str, bool, torch.Tensor]] = {}
    seen: dict[tuple[str, str], str] = {}
    for key, t in tensors.items():
        if not key.startswith(PREFIX):
            raise ValueError(
                f"{path}: key {key!r} does not start with {PREFIX!r}; this is not a PEFT LoRA adapter"
            )
        # a PeftModel made on a torch.compile'd model saves its keys with the wrapper's "_orig_mod.",
        # no part of the model's module paths: PEFT strips it when it matches keys to modules
        rest = key[len(PREFIX) :].removeprefix("_orig_mod.")
        named = _NAMED_KEY.fullmatch(rest)
        if named is not None:
            # a PeftModel's own state_dict key, with the adapter name PEFT's files leave out: PEFT's
            # from_pretrained loads it under that name (its default "default"), and so does hoptune
            part = named["part"]
            plain = f"{named['module']}.{part}{'' if part == 'lora_magnitude_vector' else '.weight'}"
            if named["adapter"] != "default":
                raise ValueError(
                    f"{path}: key {key!r} holds the adapter name {named['adapter']!r} (a PeftModel's "
                    "state_dict key); PEFT loads it only as that named adapter, and hoptune reads the name "
                    f"'default' only: save the adapter with PeftModel.save_pretrained, or rename the key to "
                    f"{PREFIX + plain!r}"
                )
            rest = plain
        for suffix, part in _LORA_PARTS.items():
            if rest.endswith("." + suffix):
                module = rest[: -len(suffix) - 1]
                if (module, part) in seen:  # else the one read last would win, silently
                    raise ValueError(
                        f"{path}: keys {seen[module, part]!r} and {key!r} both hold {part} of {module}"
                    )
                seen[module, part] = key
                groups.setdefault(module, {})[part] = t
                break
        else:
            module, _, param = rest.rpartition(".")
            under_base = module.endswith(".base_layer")
            module = module.removesuffix(".base_layer")
            if (
                param not in ("weight", "bias")
                or not module
                or any(c.startswith("lora_") for c in module.split("."))
            ):
                raise _unknown_key(path, key)
            copies[key] = (module, param, under_base, t)
    return groups, copies, seen


def _embedding_names(model: nn.Module) -> set[str]:
    """Paths of the model's input and output embeddings: the layers PEFT saves whole (its
    ``save_embedding_layers``)."""
    layers = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        get = getattr(model, getter, None)
        try:
            layers.append(get() if callable(get) else None)
        except (NotImplementedError, AttributeError):  # transformers' default for models without one
            continue
    return {n for n, m in model.named_modules() if any(m is e for e in layers if e is not None)}


def _check_base_copy(
    key: str,
    name: str,
    mod: nn.Module,
    param: str,
    stored: torch.Tensor,
    path: str,
    may_differ: bool = False,
) -> bool:
    """``key`` is PEFT's copy of the ``param`` of layer ``name``; the adapter fits the model only when
    that copy is the model's own tensor (compared in the coarser of the two dtypes: a bf16 model
    loaded from the fp32 weights PEFT saved matches). Returns whether it is; a copy that differs is
    an error unless ``may_differ`` (a bias PEFT trained, which the caller refuses with the others)."""
    if param == "weight" and getattr(mod, "quantized", False):  # (an NF4 layer's bias is dense)
        raise ValueError(
            f"{path}: {key} is PEFT's copy of the layer's {param}, which cannot be checked against the "
            f"model's NF4 {name}; load this adapter on a model whose {name} is not quantized"
        )
    own = getattr(mod, param, None)
    if not isinstance(own, torch.Tensor):
        raise ValueError(
            f"{path}: {key} is PEFT's copy of the {param} of {name}, but the model's {name} has no {param}; "
            "hoptune does not replace base weights: load the adapter on the model it was trained on"
        )
    if not stored.is_floating_point():
        raise ValueError(f"{path}: {key} must hold floating-point values, got {stored.dtype}")
    own = own.detach()
    dtype = max((stored.dtype, own.dtype), key=lambda d: torch.finfo(d).eps)
    if stored.shape == own.shape and torch.equal(stored.to(own.device, dtype), own.to(dtype)):
        return True
    if not may_differ:
        raise ValueError(
            f"{path}: {key} (PEFT's copy of the layer's {param}, shape {list(stored.shape)}) differs from the "
            f"model's {name}.{param} (shape {list(own.shape)}); hoptune does not replace base weights: load "
            "the adapter on the model it was trained on (PEFT saves such a copy when the vocabulary was resized "
            "or the layer trained; that adapter needs the same resized or trained layer)"
        )
    return False


def _expected_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _check_fits(weights_path: str, name: str, g: dict[str, torch.Tensor], held: dict, fix: str) -> None:
    """The tensors ``g`` of module ``name`` go into the dtypes ``held`` (part -> dtype): a value
    beyond such a dtype's range (float16's 65504) would become inf there, after the file's values
    were checked finite."""
    for part, t in g.items():
        dtype = held[part]
        if t.dtype != dtype and not torch.isfinite(t.to(dtype)).all():
            raise ValueError(
                f"{weights_path}: {name}.{part} holds values beyond the range of {dtype} (up to "
                f"{float(t.abs().max()):g}), which would become inf in the LoRA layer; {fix}"
            )


def load_adapter(
    model: nn.Module,
    adapter_dir: str | os.PathLike,
    *,
    trainable: bool = False,
    quantize: str | None = None,
    double_quant: bool | None = None,
    blocksize: int | None = None,
    adapter_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Load a PEFT-format LoRA/DoRA adapter from ``adapter_dir`` into ``model`` (in place); return it.

    A model without LoRA layers gets them (as :func:`hoptune.apply_lora` would make them, with
    the ranks, alphas and ``lora_dropout`` of the file, in ``adapter_dtype``, float32 when None;
    NF4 layers stay NF4, ``quantize="nf4"`` quantizes dense ones). A model that already has LoRA
    layers must have exactly the layers, ranks and scales of the adapter (and its dropout, when
    loaded ``trainable``): its weights
    are replaced, in the layers' own dtype (an ``adapter_dtype`` other than that, a ``blocksize``
    or ``double_quant`` other than that of its NF4 layers, or ``quantize="nf4"`` over a dense base,
    is an error: such a model's layers are not rebuilt). ``blocksize`` and ``double_quant`` are the
    NF4 block size and double quantization of the bases ``quantize="nf4"`` quantizes (None, the
    default: 64 and True); NF4 bases keep their own, and dense bases left dense do not use them.
    ``trainable`` sets ``requires_grad`` of the loaded adapter (False by default, as in PEFT; the
    ``lora_B`` of a MiCA adapter, ``init_lora_weights="mica"``, stays frozen, as in PEFT, and
    :func:`save_adapter` writes that initialization back).
    Everything is checked first: an adapter for another architecture or with other shapes is an
    error and the model is left unchanged. A model wrapped by torch.compile is patched inside its
    wrapper (and the wrapper returned); one wrapped in DataParallel / DistributedDataParallel is an
    error (load before wrapping), and so is a model holding PEFT's adapter layers (a PeftModel).
    Keys PEFT saved from a torch.compile'd model (``_orig_mod.``) load as PEFT matches them."""
    if not isinstance(trainable, bool):
        raise TypeError(f"trainable must be True or False, got {trainable!r}")
    # checked whether or not the model has LoRA layers yet: those are kept, not rebuilt with these
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize must be None or 'nf4', got {quantize!r}")
    if blocksize is not None and blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES} or None, got {blocksize!r}")
    if double_quant is not None and not isinstance(double_quant, bool):
        raise TypeError(f"double_quant must be True, False or None, got {double_quant!r}")
    adapter_dtype = _check.float_dtype("adapter_dtype", adapter_dtype, none=True)
    wrapper = _parallel_wrapper(model)
    if wrapper is not None:
        raise ValueError(
            f"model is wrapped in {wrapper}: load the adapter into the model before wrapping it (LoRA "
            f"layers made inside {wrapper} are not synchronized by it), or into model.module when that "
            "has the adapter's LoRA layers already"
        )
    given, model = model, _unwrap(model)
    held = _peft_layer(model)
    if held is not None:
        # (else its paths, base_model.model.<path>, or its layers, not nn.Linear, read as the
        # model of another adapter)
        name, mod = held
        kind = f"{type(mod).__module__}.{type(mod).__qualname__}"
        raise TypeError(
            f"{name} is a PEFT {kind} layer: model holds PEFT's adapters, and load_adapter "
            "puts hoptune's LoRA layers on the model without them. Load the adapter into the "
            "base model (a PeftModel's unload() gives it back, merge_and_unload() with PEFT's "
            "adapters folded in), or with PEFT: model.load_adapter(adapter_dir, adapter_name)"
        )
    folder = os.fspath(adapter_dir)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"adapter_dir {folder!r} is not a directory")
    cfg = read_adapter_config(folder)
    weights_path = os.path.join(folder, WEIGHTS_NAME)
    groups, copies, keys = _group(_read_weights(folder), weights_path)
    if not groups:
        raise ValueError(f"{weights_path} holds no LoRA tensors")
    # 1. every module of the file exists, is a linear layer, and its tensors fit it
    modules = dict(model.named_modules())
    missing = [n for n in dict.fromkeys([*groups, *(c[0] for c in copies.values())]) if n not in modules]
    if missing:
        unwrapped = missing[0].replace("_fsdp_wrapped_module.", "").removeprefix("module.")
        if unwrapped != missing[0] and unwrapped in modules:
            raise ValueError(
                f"the keys of {weights_path} hold the module paths of a wrapped model ({missing[0]!r} for "
                f"{unwrapped!r}): the adapter was saved from inside DataParallel, DistributedDataParallel "
                "or FSDP, whose 'module.' / '_fsdp_wrapped_module.' are not part of the model's paths (PEFT "
                "loads none of these keys); save it again from the unwrapped model, or rename the keys "
                "without them"
            )
        have = sorted(
            {n.rsplit(".", 1)[-1] for n, m in modules.items() if _is_linear(m) or isinstance(m, LoRALinear)}
        )
        raise ValueError(
            f"the adapter in {folder} is for another model: {type(model).__name__} has no module {missing[0]!r}"
            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; its linear layers are named {have}"
        )
    targets: list[_Target] = []
    for name, g in groups.items():
        mod = modules[name]
        if not (_is_linear(mod) or isinstance(mod, LoRALinear)):
            raise ValueError(
                f"adapter module {name!r} is a {type(mod).__name__} in the model, not a linear layer"
            )
        for part in ("lora_A.weight", "lora_B.weight"):
            if part not in g:
                raise ValueError(f"{weights_path}: {name} has no {part}")
        a, b = g["lora_A.weight"], g["lora_B.weight"]
        if a.dim() != 2 or b.dim() != 2:
            raise ValueError(
                f"{weights_path}: {name} lora_A / lora_B must be 2-D, got {tuple(a.shape)} / {tuple(b.shape)}"
            )
        if a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{weights_path}: {name}: lora_A.weight has rank {a.shape[0]} but lora_B.weight has {b.shape[1]} "
                f"(shapes {tuple(a.shape)} and {tuple(b.shape)}; lora_A is [r, in], lora_B [out, r])"
            )
        r = a.shape[0]
        fan_in, fan_out = layer_features(mod)
        if tuple(a.shape) != (r, fan_in) or tuple(b.shape) != (fan_out, r):
            key_a, key_b = keys[name, "lora_A.weight"], keys[name, "lora_B.weight"]
            raise ValueError(
                f"{weights_path}: shape mismatch for {name}: the model's layer is "
                f"[out={fan_out}, in={fan_in}], so {key_a} must be [r, {fan_in}] and {key_b} "
                f"[{fan_out}, r]; the file has {tuple(a.shape)} and {tuple(b.shape)} (an adapter "
                "for another model size?)"
            )
        want_r = pattern_value(cfg["rank_pattern"], name, cfg["r"])
        if r != want_r:
            raise ValueError(
                f"{weights_path}: {name} has rank {r} but the config (r / rank_pattern) says {want_r}"
            )
        if cfg["use_dora"] != ("lora_magnitude_vector" in g):
            raise ValueError(
                f"{weights_path}: {name} {'lacks' if cfg['use_dora'] else 'has'} lora_magnitude_vector but the "
                f"config says use_dora={cfg['use_dora']}"
            )
        m = g.get("lora_magnitude_vector")
        if m is not None and tuple(m.shape) != (fan_out,):
            key, got = keys[name, "lora_magnitude_vector"], tuple(m.shape)
            raise ValueError(
                f"{weights_path}: shape mismatch for {name}: {key} must be [{fan_out}], got {got}"
            )
        for part, t in g.items():
            if not t.is_floating_point() or not torch.isfinite(t).all():
                raise ValueError(f"{weights_path}: {name}.{part} must hold finite floating-point values")
        alpha = float(pattern_value(cfg["alpha_pattern"], name, cfg["lora_alpha"]))
        targets.append(_Target(name, mod, int(r), alpha))
    if cfg["fan_in_fan_out"] and not any(fan_in_fan_out(t.module) for t in targets):
        # PEFT writes true only when a Conv1D is among the layers it adapts; given true for nn.Linear
        # layers it warns and reads false, and so does hoptune. False it writes for Conv1D layers too
        # (an nn.Linear adapted last; a GPT-2 whose Conv1D bitsandbytes made Linear4bit): the tensors
        # read the same either way
        warnings.warn(
            f"{os.path.join(folder, CONFIG_NAME)}: fan_in_fan_out=true, but none of the layers the "
            f"adapter adapts in {type(model).__name__} is a transformers Conv1D ({targets[0].name} is a "
            f"{type(targets[0].module).__name__}): as in PEFT it is ignored for nn.Linear layers (lora_A / "
            "lora_B are read the same either way); was the adapter trained on another model?",
            stacklevel=2,
        )
    embeddings = _embedding_names(model)
    trained = []
    for key, (name, param, under_base, t) in copies.items():
        # PEFT writes base_layer copies for the layers it adapts, whole copies for the embedding layers,
        # and with bias="all" the bias of every other module
        other_bias = cfg["bias"] == "all" and param == "bias" and not under_base and name not in groups
        if not other_bias and name not in (groups if under_base else embeddings):
            raise _unknown_key(weights_path, key)
        # with bias="lora_only" / "all" PEFT saves the biases whether or not they were trained: those
        # still equal to the model's load as in PEFT (a model without biases, Llama, has none to save)
        trainable_bias = cfg["bias"] != "none" and param == "bias"
        if not _check_base_copy(
            key[len(PREFIX) :], name, modules[name], param, t, weights_path, may_differ=trainable_bias
        ):
            trained.append(key)
    if trained:
        more = " ..." if len(trained) > 3 else ""
        raise ValueError(
            f"{os.path.join(folder, CONFIG_NAME)}: bias={cfg['bias']!r}: the adapter holds biases "
            f"trained with it, which differ from the model's ({trained[:3]}{more}), and hoptune does not "
            "replace base weights; merge the adapter with PEFT (merge_and_unload) instead"
        )

    # 2. the config selects exactly the modules the file has weights for
    try:
        picked = select_modules(model, cfg["target_modules"], cfg.get("exclude_modules"), include_lora=True)
        selected = {n for n, _ in picked}
    except ValueError as e:
        raise ValueError(f"the adapter in {folder} does not fit {type(model).__name__}: {e}") from e
    in_layers = _layer_filter(cfg)
    if in_layers is not None:
        # PEFT filters by layer only the modules an entry matches as a suffix: one that target_modules
        # names in full is adapted in whatever layer it lies
        named = set(cfg["target_modules"])
        found = {n: in_layers(n) for n in selected if n not in named}
        unindexed = sorted(n for n, v in found.items() if v is None)
        if unindexed:
            # PEFT adapts none of these, silently: the adapter was most likely meant for them
            warnings.warn(
                f"{os.path.join(folder, CONFIG_NAME)}: layers_pattern={cfg['layers_pattern']!r} matches "
                f"{unindexed[:3]}{' ...' if len(unindexed) > 3 else ''} without capturing the layer index "
                "(a '|' outside a group), so, as in PEFT, they are not in layers_to_transform and were not "
                "adapted; to select the layers of each alternative, train with them in a list or a group "
                "(e.g. ['h', 'layers'] or '(?:h|layers)')",
                stacklevel=2,
            )
        selected = {n for n in selected if n in named or found[n]}
    if selected != set(groups):
        extra = sorted(selected - set(groups))
        by = "target_modules" + (" with layers_to_transform" if in_layers is not None else "")
        raise ValueError(
            f"{folder}: {by} selects {len(selected)} layers but the weights cover {len(groups)}"
            + (
                f"; no weights for {extra[:3]}"
                if extra
                else f"; weights for unselected {sorted(set(groups) - selected)[:3]}"
            )
        )

    # 3. a model that already has LoRA layers must have exactly these
    existing = dict(lora_layers(model))
    if existing:
        if set(existing) != set(groups):
            raise ValueError(
                f"model already has LoRA layers on other modules ({len(existing)} vs the adapter's {len(groups)}); "
                "call hoptune.remove_lora(model) first"
            )
        for t in targets:
            lora = existing[t.name]
            want = _expected_scaling(t.alpha, t.r, cfg["use_rslora"])
            if (
                lora.r != t.r
                or not math.isclose(lora.scaling, want, rel_tol=1e-6)
                or lora.use_dora != cfg["use_dora"]
            ):
                raise ValueError(
                    f"{t.name}: the model's LoRA layer (r={lora.r}, scaling={lora.scaling:g}, dora={lora.use_dora}) "
                    f"differs from the adapter's (r={t.r}, scaling={want:g}, dora={cfg['use_dora']}); "
                    "call hoptune.remove_lora(model) first"
                )
            # the layers keep their own dropout: training the adapter (trainable=True) would go on
            # with another one than it was trained with (for inference dropout does not apply)
            dropout = float(cfg["lora_dropout"])
            if trainable and not math.isclose(lora.lora_dropout_p, dropout, rel_tol=1e-6):
                raise ValueError(
                    f"{os.path.join(folder, CONFIG_NAME)}: lora_dropout={dropout:g}, but the model's "
                    f"LoRA layer {t.name} has dropout {lora.lora_dropout_p:g}, and load_adapter "
                    "does not change the dropout of the LoRA layers a model has already; call "
                    "hoptune.remove_lora(model) first, or make the layers with "
                    f"hoptune.apply_lora(..., dropout={dropout:g})"
                )
            # the layers are kept as they are: options that would have built them otherwise are errors,
            # not silently dropped (the weights would load dense, or in another dtype, than asked)
            # (a dense base that quantize keeps dense, an output head, is as asked)
            if quantize == "nf4" and not lora.quantized and layer_quantize(model, t.name, quantize):
                raise ValueError(
                    f"quantize='nf4': the model's LoRA layer {t.name} has a dense base, and load_adapter "
                    "does not re-quantize the layers of a model that has LoRA layers already; call "
                    "hoptune.remove_lora(model) first, or pass quantize=None"
                )
            if adapter_dtype is not None and lora.lora_A.dtype != adapter_dtype:
                raise ValueError(
                    f"adapter_dtype={adapter_dtype}: the model's LoRA layer {t.name} holds its adapter in "
                    f"{lora.lora_A.dtype}, and load_adapter does not convert the LoRA layers a model has "
                    "already; call hoptune.remove_lora(model) first, or pass adapter_dtype=None"
                )
            if blocksize is not None and lora.quantized and lora.weight_nf4.blocksize != blocksize:
                raise ValueError(
                    f"blocksize={blocksize}: the model's LoRA layer {t.name} has an NF4 base of "
                    f"blocksize={lora.weight_nf4.blocksize}, and load_adapter does not re-quantize "
                    "the layers of a model that has LoRA layers already; call "
                    "hoptune.remove_lora(model) first, or pass blocksize=None"
                )
            nested = lora.weight_nf4.nested if lora.quantized else None
            if double_quant is not None and lora.quantized and nested != double_quant:
                raise ValueError(
                    f"double_quant={double_quant}: the model's LoRA layer {t.name} has an NF4 base "
                    f"with double_quant={nested}, and load_adapter does not "
                    "re-quantize the layers of a model that has LoRA layers already; call "
                    "hoptune.remove_lora(model) first, or pass double_quant=None"
                )
            held = {"lora_A.weight": lora.lora_A.dtype, "lora_B.weight": lora.lora_B.dtype}
            if lora.lora_magnitude is not None:
                held["lora_magnitude_vector"] = lora.lora_magnitude.dtype
            _check_fits(
                weights_path,
                t.name,
                groups[t.name],
                held,
                f"the model's LoRA layer {t.name} holds its adapter in {lora.lora_A.dtype}; call "
                "hoptune.remove_lora(model) first and load with adapter_dtype=torch.float32",
            )
    else:
        dtype = torch.float32 if adapter_dtype is None else adapter_dtype
        for name, g in groups.items():
            _check_fits(
                weights_path,
                name,
                g,
                dict.fromkeys(g, dtype),
                "load it with adapter_dtype=torch.float32 or torch.bfloat16",
            )
        blocksize = 64 if blocksize is None else blocksize  # apply_lora's defaults
        double_quant = True if double_quant is None else double_quant
        for t in targets:  # the checks apply_lora makes (rank vs layer, NF4 block size), before any change
            if t.r > MAX_RANK:  # (the file's rank: apply_lora's advice to lower it does not apply)
                raise ValueError(
                    f"{weights_path}: layer {t.name} has a rank-{t.r} adapter, above {MAX_RANK}, the most "
                    "hoptune's LoRA layers take: hoptune cannot load this adapter (PEFT can, and its "
                    "merge_and_unload folds it into the base model)"
                )
            quant = layer_quantize(model, t.name, quantize)  # (None for a layer kept dense)
            check_target(t.name, t.module, t.r, quant, blocksize, rank_above_layer=True)
        replace_with_lora(
            model,
            targets,
            dropout=float(cfg["lora_dropout"]),
            use_rslora=cfg["use_rslora"],
            use_dora=cfg["use_dora"],
            quantize=quantize,
            double_quant=double_quant,
            blocksize=blocksize,
            adapter_dtype=dtype,
            init_lora_weights=True,
            trainable=trainable,
            progress=False,
        )

    # 4. copy the weights (cannot fail: shapes were checked)
    # PEFT's MiCA (init_lora_weights="mica") trains lora_A only: its lora_B stays frozen, loaded trainable too
    # (the exact value, as PEFT selects its MiCA variant, which freezes lora_B: with "MiCA" PEFT
    # trains and loads lora_B as a plain LoRA's)
    init = cfg.get("init_lora_weights", True)
    frozen_b = init == "mica"
    # informational fields, not checked: a value other than a non-empty str reads as null
    base = tuple(
        v if isinstance(v, str) and v else None
        for v in (cfg.get("base_model_name_or_path"), cfg.get("revision"))
    )
    with torch.no_grad():
        for name, g in groups.items():
            lora = model.get_submodule(name)
            lora.lora_A.copy_(g["lora_A.weight"])
            lora.lora_B.copy_(g["lora_B.weight"])
            if lora.lora_magnitude is not None:
                lora.lora_magnitude.copy_(g["lora_magnitude_vector"])
            for p in (lora.lora_A, lora.lora_B, lora.lora_magnitude):
                if p is not None:
                    p.requires_grad_(trainable and not (frozen_b and p is lora.lora_B))
            if frozen_b:  # saved again as MiCA, so that PEFT and load_adapter keep lora_B frozen
                setattr(lora, _INIT_ATTR, "mica")
            elif hasattr(lora, _INIT_ATTR):
                delattr(lora, _INIT_ATTR)
            if base != (None, None):  # saved again by save_adapter, as PEFT saves a loaded config
                setattr(lora, _BASE_ATTR, base)
            elif hasattr(lora, _BASE_ATTR):
                delattr(lora, _BASE_ATTR)
    return given
