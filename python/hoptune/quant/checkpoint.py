"""Write a model as a pre-quantized bitsandbytes NF4 checkpoint that transformers loads as is."""

from __future__ import annotations

import json
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable

import torch
from torch import nn

from hoptune._io import replace_files
from hoptune.ops import _check
from hoptune.quant.bnb_format import BNB_BLOCKSIZE2, from_bnb_state_dict, is_bnb_quantized, to_bnb_state_dict
from hoptune.quant.nf4 import BLOCKSIZES, FLOAT_DTYPES, quantize_nf4

_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")  # transformers' shard names
# transformers' should_convert_module: an entry of llm_int8_skip_modules matches a module name
# from its start, as a regular expression, up to a name boundary, or is a suffix of the name
_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"
_SKIP_RULE = (
    "entries are matched as transformers matches llm_int8_skip_modules: a regular expression from the "
    "start of a module name up to a '.' or its end ('model.layers.1' skips model.layers.1.*, not "
    "model.layers.11; 'model.layers.*.mlp' every layer's MLP), or a plain suffix of the name ('lm_head', "
    "'down_proj'; 'proj' skips every *proj)"
)


_DEFAULT_SKIP = ("lm_head",)  # save_pretrained_nf4's default: the model's own (_default_skips)


def _skip_names(skip_modules: Iterable[str]) -> tuple[str, ...]:
    """``skip_modules`` as a tuple of names; a bare string is an error (it would be read as its
    characters, skipping none of the layers it names)."""
    if isinstance(skip_modules, str):
        raise TypeError(
            f"skip_modules must be a list of module names, got the string {skip_modules!r}: "
            f"pass [{skip_modules!r}]"
        )
    try:
        skip = tuple(skip_modules)
    except TypeError:  # None (BitsAndBytesConfig's "the head, found for me") or a single non-string
        raise TypeError(
            f"skip_modules must be a list of module names, got {skip_modules!r}: pass [] to skip none, "
            "or name the layers to keep dense (e.g. ['lm_head'])"
        ) from None
    if not all(isinstance(s, str) for s in skip):
        raise TypeError(f"skip_modules must be a list of module names (strings), got {list(skip)!r}")
    for s in skip:
        if not s:  # a suffix of every name: transformers would keep the whole model dense
            raise ValueError(f"skip_modules has an empty entry: {list(skip)!r}")
        try:
            re.compile(s)
        except re.error as e:
            raise ValueError(
                f"skip_modules entry {s!r} is not a valid regular expression ({e}); {_SKIP_RULE}"
            ) from e
    return skip


def _check_skips_match(model: nn.Module, skip: Iterable[str]) -> None:
    """An entry of ``skip_modules`` that matches no linear layer of ``model`` is an error: a
    misspelt name would otherwise leave quantized the layer it was meant to keep dense. Only the
    layers count, as in transformers: "layers.1" matches the module model.layers.1 (a suffix) but
    none of its layers, so it keeps nothing dense."""
    from hoptune.nn.nf4_linear import NF4Module  # not at the top: hoptune.nn imports hoptune.quant
    from hoptune.patch import _is_conv1d

    names = [
        n for n, m in model.named_modules() if n and (isinstance(m, (nn.Linear, NF4Module)) or _is_conv1d(m))
    ]
    unmatched = [s for s in skip if not any(_skipped(n, (s,)) for n in names)]
    if unmatched:
        raise ValueError(
            f"skip_modules entries {unmatched} match no linear layer of {type(model).__name__} (it has "
            f"e.g. {names[-3:]}); {_SKIP_RULE}"
        )


def bnb_quantization_config(
    compute_dtype: torch.dtype = torch.bfloat16,
    double_quant: bool = True,
    skip_modules: Iterable[str] = ("lm_head",),
) -> dict:
    """The ``quantization_config`` block transformers expects for an NF4 bitsandbytes checkpoint."""
    # transformers takes any torch dtype name here and bitsandbytes then casts the inputs of every
    # layer to it: an integer dtype would load without an error and compute garbage
    if compute_dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"compute_dtype must be torch.bfloat16, torch.float16 or torch.float32, got {compute_dtype!r}"
        )
    _check.boolean("double_quant", double_quant)
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": str(compute_dtype).replace("torch.", ""),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": list(_skip_names(skip_modules)),
        "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_enable_fp32_cpu_offload": False,
    }


def _skipped(name: str, skip: Iterable[str]) -> bool:
    """Whether module ``name`` is in ``skip``, by transformers' rule for llm_int8_skip_modules (and
    ``_keep_in_fp32_modules``): a checkpoint saved with a skip list must keep dense exactly the
    layers that transformers builds dense when it loads the file, or it does not load there."""
    return any(re.match(rf"(?:{s}){_BOUNDARY}", name) or name.endswith(s) for s in skip)


def _kept_dense(model: nn.Module) -> tuple[str, ...]:
    """The model's ``_keep_in_fp32_modules``: transformers + bitsandbytes never convert them to
    NF4, whatever the dtype or llm_int8_skip_modules (e.g. DeepSeek-V3.2's indexer.weights_proj)."""
    return tuple(sorted(k for k in getattr(model, "_keep_in_fp32_modules", None) or () if isinstance(k, str)))


def _model_bnb_config(model: nn.Module) -> dict | None:
    """The bitsandbytes 4-bit ``quantization_config`` a model transformers quantized on load keeps
    in its config (as a dict), or None."""
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict() if callable(getattr(qc, "to_dict", None)) else None
    if not qc or qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit"):
        return None
    return qc


def _default_skips(model: nn.Module, nf4_names: Iterable[str], plain_names: Iterable[str]) -> tuple[str, ...]:
    """The layers kept dense when ``skip_modules`` is not given: "lm_head" and the model's output
    embeddings, whatever their name (transformers' get_keys_to_not_convert: BioGPT's
    output_projection, GPT-NeoX-Japanese's embed_out). A model transformers + bitsandbytes
    quantized starts from its ``llm_int8_skip_modules`` instead (as save_pretrained records them).
    A model with NF4 layers already (``nf4_names``: from load_model, or transformers + bitsandbytes)
    is saved as it is: those layers stay NF4 (a head the checkpoint stored in NF4 too), and its
    other plain linear layers (``plain_names``) stay dense, as the checkpoint or load_model's
    ``skip_modules`` left them."""
    from hoptune.patch import _is_conv1d  # (not at the top: hoptune.patch imports hoptune.quant)

    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    lm = dict(model.named_children()).get("lm_head")
    # RoBERTa's lm_head is a prediction head (dense, norm, then the output layer, lm_head.decoder):
    # "lm_head" would keep its dense layer dense too, which transformers + bitsandbytes quantize
    whole = lm is not None and lm is not head and not isinstance(lm, nn.Linear) and not _is_conv1d(lm)
    skip = [] if whole else ["lm_head"]
    skip += [n for n, m in model.named_modules() if n and head is not None and m is head]
    # linear layers whose weight is tied to another's (Zamba2's shared blocks): transformers +
    # bitsandbytes keep them dense (get_keys_to_not_convert), and tie_weights shares the dense tensor
    tied = {
        k.removesuffix(".weight")
        for pair in _tied_keys(model, getattr(model, "config", None)).items()
        for k in pair
    }
    skip += [n for n, m in model.named_modules() if n in tied and isinstance(m, nn.Linear)]
    qc = _model_bnb_config(model)
    if qc is not None:
        listed = qc.get("llm_int8_skip_modules")
        if isinstance(listed, (list, tuple)):  # (None: transformers kept its default, the head)
            skip = [s for s in listed if isinstance(s, str) and s]
    # a head stored in NF4 (a checkpoint saved with llm_int8_skip_modules=[]) is saved as it is,
    # whether transformers or load_model (which keeps no quantization_config) loaded it
    nf4_names = set(nf4_names)
    skip = [s for s in skip if not any(_skipped(n, [s]) for n in nf4_names)]
    # load_model keeps no record of the checkpoint's skip list (or of its own skip_modules): the
    # dense layers of a model that has NF4 ones are those the two kept dense
    if nf4_names or qc is not None:
        skip += [n for n in plain_names if not _skipped(n, skip)]
    return tuple(dict.fromkeys(skip))


def _setting(name: str, given: object, held: set, default: object) -> object:
    """``given``, else the one value the model's NF4 layers hold, else ``default`` (no NF4 layer)."""
    if given is not None:
        return given
    if len(held) > 1:
        raise ValueError(
            f"the model's NF4 layers were quantized with {name} {sorted(held)}, and one checkpoint holds "
            f"one; pass {name} (the layers of another {name} are refused by name)"
        )
    return next(iter(held)) if held else default


def _checkpoint_keys(model: nn.Module, state: dict[str, torch.Tensor], quantized: list[str]) -> dict:
    """``state`` under the keys ``from_pretrained`` reads. transformers 5 renames some checkpoints'
    keys as it loads them (Laguna's ``shared_expert.`` becomes ``shared_experts.``) and converts
    others (MoE experts fused into one tensor); its save_pretrained reverts both, and so does this:
    written under the in-memory names, such a layer's packed weight was renamed on loading but not
    its quant-state tensors, and transformers built it without its quantization state. A conversion
    that would reshape an NF4 layer's packed weight (not only rename it) is refused by name."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # (a transformers that converts no keys)
        return state
    out = revert_weight_conversion(model, state)
    if out is state or not quantized:
        return out
    suffix = ".weight.quant_state.bitsandbytes__nf4"
    held = {k[: -len(suffix)]: k for k in out if k.endswith(suffix)}
    whole = all(f"{p}.weight" in out and f"{p}.weight.absmax" in out for p in held)
    if len(held) != len(quantized) or not whole:
        raise ValueError(
            f"{type(model).__name__}: transformers converts (not only renames) the weights of some of "
            f"its NF4 layers on saving and loading (e.g. {quantized[:3]}), which packed NF4 weights "
            "cannot take; keep those layers dense (skip_modules)"
        )
    return out


def save_pretrained_nf4(
    model: nn.Module,
    out_dir: str | os.PathLike,
    blocksize: int | None = None,
    double_quant: bool | None = None,
    skip_modules: Iterable[str] = _DEFAULT_SKIP,
    device: torch.device | str | None = None,
) -> list[str]:
    """Save a transformers model with every ``nn.Linear`` and transformers ``Conv1D`` (GPT-2's,
    stored as its weight transposed) but ``skip_modules`` quantized to NF4; subclasses of
    ``nn.Linear`` stay dense, as transformers + bitsandbytes load them.

    Writes ``config.json`` (with ``quantization_config``), ``model.safetensors`` and, for a model
    that generates, ``generation_config.json`` into ``out_dir``, where the files of an earlier save
    that this one does not write go (``generation_config.json``, the shards ``model-*-of-*`` and
    index of a sharded save) and other files stay; ``AutoModelForCausalLM.from_pretrained(out_dir)``
    then loads it through bitsandbytes. A crash leaves the earlier checkpoint, the new one, or a
    folder without ``config.json``, never files of two saves side by side. Quantizes
    on ``device`` (default: where each weight lives). Layers that are NF4 already
    (:class:`hoptune.nn.NF4Linear`, as :func:`hoptune.load_model` makes them, and bitsandbytes'
    ``Linear4bit``, as transformers makes them) are written as they are, not re-quantized; they must
    have been quantized with ``blocksize`` and ``double_quant``, which by default (None) are theirs
    (64 and True for a model without NF4 layers, bitsandbytes' and load_model's defaults). ``skip_modules`` is matched as
    transformers matches the ``llm_int8_skip_modules`` it is saved as (a regular expression from the
    start of a module name up to a ``.``, or a suffix of the name); an entry that matches no linear
    layer is an error (but ``"lm_head"``). By default the output head stays dense (``lm_head``, or
    the model's output embeddings by any name, as transformers keeps them); a model with NF4 layers
    already (from load_model, or transformers + bitsandbytes) keeps by default the layers it has
    dense (those its checkpoint's ``llm_int8_skip_modules`` or load_model's ``skip_modules`` kept
    dense), and its NF4 layers, the head included, stay NF4: a loaded checkpoint is saved as it was.
    A model transformers + bitsandbytes quantized is saved with its ``bnb_4bit_compute_dtype``. A
    layer whose weight count is not a multiple of ``blocksize`` stays dense, with a warning, whatever
    ``skip_modules`` holds (as load_model keeps it), and is listed in the saved skip list. Modules
    the model keeps in fp32 (``_keep_in_fp32_modules``) stay dense, as transformers never converts
    them. A model with LoRA layers (or PEFT's) is refused: fold them in
    (``hoptune.merge_and_unload``) or take them out (``hoptune.remove_lora``) first. A
    ``torch.compile`` wrapper is saved as the model it wraps.
    Returns the names of the modules stored in NF4.
    """
    from safetensors.torch import save_file

    from hoptune.nn import LoRALinear  # not at the top: hoptune.nn imports hoptune.quant
    from hoptune.patch import _is_conv1d

    # torch.compile's wrapper: its "_orig_mod." would prefix every key (transformers then loads none)
    inner = getattr(model, "_orig_mod", None)
    model = inner if isinstance(inner, nn.Module) else model
    # its config goes into config.json: a wrapper (DataParallel, DDP) has none, its model has
    if not callable(getattr(getattr(model, "config", None), "to_dict", None)):
        inner = getattr(model, "module", None)
        wraps = isinstance(inner, nn.Module)
        hint = f": pass model.module, the {type(inner).__name__} it wraps" if wraps else ""
        raise TypeError(
            f"model must be a transformers model (with a config, as from_pretrained makes it), got "
            f"{type(model).__name__}{hint}"
        )
    default_skip = skip_modules is _DEFAULT_SKIP
    skip = _skip_names(skip_modules)
    if blocksize is not None:
        blocksize = _check.blocksize("blocksize", blocksize, BLOCKSIZES)
    if double_quant is not None:
        _check.boolean("double_quant", double_quant)
    if device is not None:
        device = _check.device("device", device)
    folder = os.fspath(out_dir)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"out_dir {folder!r} exists and is not a directory")
    # all but "lm_head", which a model without an output head (a base model) lacks
    if not default_skip:
        _check_skips_match(model, [s for s in skip if s != "lm_head"])
    keep_fp32 = _kept_dense(model)  # stored in NF4 they would not load into transformers' dense layers

    def to_quantize(name: str, mod: nn.Module) -> bool:
        # plain nn.Linear only (transformers converts no subclass), and transformers' Conv1D (GPT-2),
        # which transformers + bitsandbytes load as a 4-bit layer: stored dense, it would not load
        plain = type(mod) is nn.Linear or _is_conv1d(mod)
        return plain and not _skipped(name, skip) and not _skipped(name, keep_fp32)

    # checked before anything is quantized: LoRA layers, and NF4 layers that cannot be saved as asked
    lora = [name for name, mod in model.named_modules() if isinstance(mod, LoRALinear)]
    if lora:
        raise ValueError(
            f"model has {len(lora)} LoRA layers (e.g. {lora[:3]}); save_pretrained_nf4 writes a base model "
            "only: fold the adapters in with hoptune.merge_and_unload(model), or take them out with "
            "hoptune.remove_lora(model) after hoptune.save_adapter(model, dir), then save"
        )
    # PEFT's wrapper and layers: their base layers and factors would be saved under paths transformers
    # does not know (".base_layer", "base_model.model."), and it would load random weights in their place
    peft_mods = [name or type(mod).__name__ for name, mod in model.named_modules() if _from_peft(mod)]
    if peft_mods:
        raise ValueError(
            f"model holds PEFT modules (e.g. {peft_mods[:3]}); save_pretrained_nf4 writes a base model "
            "only: fold the adapters in with PEFT's merge_and_unload() (or drop them with unload()) first"
        )
    # another quantization (bitsandbytes 8-bit, GPTQ, ...): its layers are no plain nn.Linear, so
    # their integer codes would be written as dense weights under an NF4 config
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc and _model_bnb_config(model) is None:
        qd = qc if isinstance(qc, dict) else getattr(qc, "to_dict", dict)()
        keys = ("quant_method", "load_in_4bit", "load_in_8bit")
        what = {k: getattr(qd[k], "value", qd[k]) for k in keys if k in qd}  # (enum -> its string)
        raise ValueError(
            f"model is quantized by another method than bitsandbytes 4-bit (quantization_config "
            f"{what}); save_pretrained_nf4 writes dense and NF4 layers only: load the model "
            "unquantized (or with hoptune.load_model), then save"
        )
    nf4 = {name: mod.weight_nf4 for name, mod in model.named_modules() if getattr(mod, "quantized", False)}
    full = model.state_dict()
    # layers bitsandbytes quantized (transformers' Linear4bit): read from their state as a checkpoint
    # holds it, then checked and saved as the NF4 layers above are
    for name, _ in model.named_modules():
        if name and name not in nf4 and is_bnb_quantized(full, f"{name}.weight"):
            try:
                nf4[name] = from_bnb_state_dict(full, f"{name}.weight")
            except ValueError as err:
                raise ValueError(f"cannot save {name}, a layer bitsandbytes quantized: {err}") from err
    # by default the settings of the NF4 layers the model has (one checkpoint's: all alike)
    blocksize = _setting("blocksize", blocksize, {q.blocksize for q in nf4.values()}, 64)
    double_quant = _setting("double_quant", double_quant, {q.nested for q in nf4.values()}, True)
    mods = dict(model.named_modules())
    plain = [
        n
        for n, m in mods.items()
        if n and n not in nf4 and (type(m) is nn.Linear or _is_conv1d(m)) and not _skipped(n, keep_fp32)
    ]
    if default_skip:
        skip = _default_skips(model, nf4, plain)
    # a weight NF4 blocks do not fill: dense, listed for transformers to keep dense, whatever
    # skip_modules holds (as load_model keeps it dense whatever its skip_modules hold)
    odd = [n for n in plain if not _skipped(n, skip) and mods[n].weight.numel() % blocksize]
    if odd:
        warnings.warn(
            f"{len(odd)} layers stay dense: their weights are not a multiple of "
            f"blocksize={blocksize} (e.g. {odd[:3]})",
            stacklevel=2,
        )
        skip = (*skip, *odd)
    for name, q in nf4.items():
        if _skipped(name, skip):
            raise ValueError(
                f"{name} is in skip_modules={list(skip)} but is NF4 already; leave it out of "
                "skip_modules, or make it dense first (NF4Linear.to_linear)"
            )
        if _skipped(name, keep_fp32):
            raise ValueError(
                f"{name} is NF4 already but {type(model).__name__} keeps it in fp32 "
                f"(_keep_in_fp32_modules={list(keep_fp32)}), so transformers loads it as a dense layer; "
                "make it dense first (NF4Linear.to_linear)"
            )
        if q.blocksize != blocksize or q.nested != bool(double_quant):
            raise ValueError(
                f"{name} is NF4 already with blocksize={q.blocksize}, double_quant={q.nested}, but "
                f"blocksize={blocksize}, double_quant={double_quant} were asked for; pass "
                f"blocksize={q.blocksize}, double_quant={q.nested} (NF4 layers are saved as they are)"
            )
        if q.nested and q.blocksize2 != BNB_BLOCKSIZE2:
            raise ValueError(
                f"{name} is NF4 already with blocksize2={q.blocksize2} (nested absmax blocks), but "
                f"bitsandbytes runs only blocksize2={BNB_BLOCKSIZE2}; quantize it with "
                f"blocksize2={BNB_BLOCKSIZE2} (NF4 layers are saved as they are)"
            )
    # a head tied to the input embeddings is stored once, as the embeddings: it cannot be NF4 too
    tied = set()
    if getattr(model.config, "tie_word_embeddings", False):
        tied = {k for k in getattr(model, "_tied_weights_keys", None) or [] if isinstance(k, str)}
    for name, mod in model.named_modules():
        if f"{name}.weight" in tied and (name in nf4 or to_quantize(name, mod)):
            raise ValueError(
                f"{name}.weight is tied to the input embeddings (tie_word_embeddings=True), which stay "
                f"dense, so it cannot be stored in NF4; keep {name!r} in skip_modules (as the default does)"
            )
    state: dict[str, torch.Tensor] = {}
    quantized: list[str] = []
    replaced: set[str] = set()  # state-dict keys whose tensors the bitsandbytes ones replace
    for name, mod in model.named_modules():
        if name in nf4:  # NF4 already: saved as it is (re-quantizing would change the weight)
            q = nf4[name]
        elif to_quantize(name, mod):
            w = mod.weight.detach()
            if _is_conv1d(mod):  # Conv1D stores W as (in, out): bitsandbytes quantizes W.T, (out, in)
                w = w.t()
            dev = w.device if device is None else device
            try:
                q = quantize_nf4(w.to(dev).contiguous(), blocksize=blocksize, double_quant=double_quant)
            except ValueError as err:
                raise ValueError(
                    f"cannot quantize {name}.weight to NF4: {err} (skip_modules keeps a layer dense)"
                ) from err
        else:
            continue
        state.update({k: v.cpu() for k, v in to_bnb_state_dict(q, f"{name}.weight").items()})
        # all the layer holds but its bias: the dense weight, or the NF4 buffers and their metadata
        replaced.update(k for k in mod.state_dict(prefix=f"{name}.") if k != f"{name}.bias")
        quantized.append(name)
    for key, t in full.items():
        if key not in replaced and key not in state:
            state[key] = t.detach().cpu().contiguous()
    # tied weights (lm_head / embed_tokens) are stored once, as transformers does; a head that is
    # not one tensor with the embeddings (a checkpoint that stores another one loads untied) stays
    storages = Counter(_storage(t) for t in full.values() if t.numel())
    for key in _tied_keys(model, model.config):
        if key in state and key in full and storages[_storage(full[key])] > 1:
            state.pop(key)
    state = _checkpoint_keys(model, state, quantized)
    config = model.config.to_dict()
    dtype = next(model.parameters()).dtype
    # the model's dtype, as save_pretrained records it (the config may still hold the one it was built in)
    dtype_key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
    config[dtype_key] = str(dtype).replace("torch.", "")
    # as save_pretrained: serving stacks (vLLM, TGI) pick the model class by this field
    config["architectures"] = [type(model).__name__]
    # bitsandbytes computes in the model's own compute dtype (transformers records it), not its dtype
    qc = _model_bnb_config(model)
    compute = (qc or {}).get("bnb_4bit_compute_dtype") or dtype
    compute = getattr(torch, compute, compute) if isinstance(compute, str) else compute
    config["quantization_config"] = bnb_quantization_config(compute, double_quant, skip)
    config_text = json.dumps(config, indent=2, sort_keys=True)
    # the stop tokens and sampling defaults, written as save_pretrained writes them
    generation = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", None)
    generation_text = None
    if generation is not None and callable(can_generate) and can_generate():
        generation_text = generation.to_json_string(use_diff=True)
    # config.json goes in last and the old one out first, so a crash at any point leaves the old
    # checkpoint, the new one, or a folder without config.json: never weights beside the config of
    # another save. A generation_config.json of an earlier save goes when this model has none, and
    # the shards and index of an earlier sharded save go (transformers removes such shards too):
    # loaders that go by the index (vLLM) would read them instead of model.safetensors
    stale = [n for n in os.listdir(folder) if _SHARD.fullmatch(n)] if os.path.isdir(folder) else []
    replace_files(
        folder,
        {
            **dict.fromkeys([*stale, "model.safetensors.index.json"]),
            "model.safetensors": lambda p: save_file(state, p, metadata={"format": "pt"}),
            "generation_config.json": None if generation_text is None else _text_writer(generation_text),
            "config.json": _text_writer(config_text),
        },
        last="config.json",
    )
    return quantized


def _from_peft(mod: nn.Module) -> bool:
    return type(mod).__module__.partition(".")[0] == "peft"


def _tied_keys(model: nn.Module, config) -> dict[str, str]:
    """``{tied key: source key}`` (lm_head.weight -> model.embed_tokens.weight when tied): in
    transformers 5 those of every submodel (BART's encoder and decoder embed_tokens), each as its own
    config says."""
    keys = getattr(model, "all_tied_weights_keys", None)  # transformers 5
    if keys is not None:
        return dict(keys)
    if not getattr(config, "tie_word_embeddings", False):
        return {}
    emb = model.get_input_embeddings()
    src = next((f"{n}.weight" for n, m in model.named_modules() if m is emb), None)
    old = getattr(model, "_tied_weights_keys", None) or []  # transformers 4: a list of tied keys
    return {k: src for k in old if src is not None and k != src}


def _storage(t: torch.Tensor) -> tuple[torch.device, int]:
    return t.device, t.untyped_storage().data_ptr()


def _text_writer(text: str):
    def write(path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)

    return write
