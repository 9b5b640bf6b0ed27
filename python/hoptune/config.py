"""Recipe configs: typed dataclasses, loaded from YAML with ``key=value`` overrides and strict checks.

A config is a tree of dataclasses (sections ``model``, ``lora``, ``data``, ``train``,
``output``). Loading checks every key and value against the field types:

* an unknown key is an error that names the nearest valid key (``train.learnig_rate`` ->
  did you mean ``train.lr``?);
* a value of the wrong type is an error that names the key, the expected type and what came;
* overrides are dotted ``section.key=value`` strings whose value is parsed as YAML
  (``train.lr=1e-4``, ``lora.target_modules=[q_proj,v_proj]``, ``data.eval=null``); a mapping
  given to a section sets the keys it names (``train={lr: 1e-4, epochs: 2}``), the others stay;
* numbers are read as YAML 1.1 reads them, except that ``0123`` is decimal (not octal) and
  ``1:30`` is a string (not base 60).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import yaml

# -- the SFT recipe's sections -------------------------------------------------------------------

_NAME_LIST = re.compile(r"\s*[\w.-]+(\s*,\s*[\w.-]+)+\s*")
_DEVICE = re.compile(r"auto|(cpu|mps|cuda|xpu)(:\d+)?")
_COMMENT = re.compile(r"(^|\s)#")
# first characters that make a YAML value something other than its text: anchor, alias, tag, block
# scalar, directive and the reserved @ and `
_YAML_MARKS = tuple("&*!|>%@`")


def _expand_user(path: Any) -> Any:
    """``~/x`` as the home folder's ``x``: the shell leaves a ``~`` after an override's ``=`` (and in a
    YAML file) as it is, and ``output.dir=~/runs/a`` wrote into a folder named ``~`` in the current
    one (transformers' TrainingArguments expands ``output_dir`` the same way)."""
    return os.path.expanduser(path) if isinstance(path, str) else path


@dataclass
class ModelConfig:
    path: str = "hoptune/tiny"
    """A local transformers checkpoint folder (nothing is downloaded), or ``hoptune/tiny`` for the
    built-in model."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """auto = bf16 on a GPU, fp32 on a CPU. fp16 trains with dynamic loss scaling (torch.amp.GradScaler):
    a step whose gradients overflow is skipped and the scale halves; the train metrics log loss_scale."""
    device: str = "auto"
    """auto = cuda when available, else cpu; or cpu, cuda, cuda:N, mps."""
    quantize: Literal["nf4"] | None = "nf4"
    """nf4 = QLoRA (frozen NF4 base); null = LoRA over the base in ``dtype``."""
    double_quant: bool = True
    skip_modules: list[str] | None = None
    """With model.quantize=nf4, layers of a checkpoint folder that stay dense (load_model's
    skip_modules, matched as transformers matches llm_int8_skip_modules: [dt_proj] keeps every
    layer named so): for a model that computes with a layer's weight directly, which an NF4 layer
    cannot give it (Mamba's dt_proj, under transformers + bitsandbytes too). null = none beyond
    those load_model keeps dense itself."""
    gradient_checkpointing: bool = True
    """Recompute each decoder layer in the backward instead of keeping its activations (the memory of
    one layer's inputs per layer, for about a third more work per step with a frozen base)."""
    uncheckpointed_layers: int | Literal["auto"] = 0
    """With gradient_checkpointing: the last N decoder layers run without it, their activations kept
    and their recompute saved (``hoptune plan --uncheckpointed N`` estimates the memory). auto = as
    many as the GPU's free memory holds by ``hoptune plan``'s estimate, with a 10% margin (0 on a
    CPU); the choice is logged."""
    fuse_decoder_ops: bool = True
    """Run the decoder layers' RMSNorm, SwiGLU and rotary embedding as hoptune's fused kernels
    (hoptune.fuse_decoder_ops: the same values, fewer passes over memory); modules whose computation
    is not the Llama family's are left as they are."""
    attn_implementation: str | None = None
    """transformers' attention implementation (sdpa, eager, flash_attention_2...); null = its default."""
    chat_template: str | None = None
    """A Jinja chat template (inline, or a path to a file) replacing the tokenizer's own, or the
    name of one of the tokenizer's named templates (``tool_use`` where its chat_template is a dict
    of them); null = the tokenizer's own ("default" of named ones, "tool_use" for a record with
    tools)."""

    def __post_init__(self) -> None:
        self.path = _expand_user(self.path)
        if isinstance(self.chat_template, str) and "{" not in self.chat_template:  # a file, not inline Jinja
            self.chat_template = _expand_user(self.chat_template)


@dataclass
class LoraConfig:
    enabled: bool = True
    """false = full fine-tuning (every parameter trains; needs model.quantize=null)."""
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    """all-linear, a list of module names ([q_proj, v_proj]), or a regular expression matched against
    the whole module name; a comma-separated string of names (q_proj,v_proj) is read as a list."""
    use_dora: bool = False
    use_rslora: bool = False

    def __post_init__(self) -> None:
        # "q_proj,v_proj" is what a list looks like on a shell command line; as a regular expression it
        # could only match module names with a comma in them, and module names have none
        if isinstance(self.target_modules, str) and _NAME_LIST.fullmatch(self.target_modules):
            self.target_modules = [n.strip() for n in self.target_modules.split(",")]


@dataclass
class DataConfig:
    train: str | None = None
    """JSONL of {"prompt","completion"}, {"messages":[...]} or {"text"} records."""
    eval: str | None = None
    """Held-out JSONL; null = split ``eval_fraction`` off the training data."""
    eval_fraction: float = 0.0
    max_seq_len: int = 2048
    truncation: Literal["right", "left"] = "right"
    """Which end of a too-long example is cut (right keeps the prompt, left keeps the answer)."""
    packing: bool = False
    """Pack examples into rows of max_seq_len (best-fit decreasing, per-document positions)."""
    general_data: str | None = None
    """Replay source (same formats) mixed into the training data to limit forgetting."""
    general_fraction: float = 0.05
    """Fraction of the training examples drawn from general_data (5-10% is the usual advice)."""
    skip_bad_examples: bool = False
    """Skip (and report) malformed lines and examples with no loss token instead of stopping."""
    add_eos: bool = True
    """Append EOS where it is missing to prompt/completion completions and to text records (in the
    loss), as TRL does; chat records end with the template's own end-of-turn token."""

    def __post_init__(self) -> None:
        self.train, self.eval, self.general_data = map(
            _expand_user, (self.train, self.eval, self.general_data)
        )


@dataclass
class TrainConfig:
    """A step whose loss or gradient norm is NaN or infinite stops the run, with an error naming the
    step and its loss logged, before its optimizer step: the weights and the checkpoints stay those of
    the steps before (with model.dtype=fp16 an overflowing gradient is a skipped step instead)."""

    epochs: float = 1.0
    max_steps: int = 0
    """Optimizer steps; 0 = epochs x steps per epoch."""
    batch_size: int = 2
    """Rows per micro-batch (examples, or packed rows with data.packing)."""
    grad_accum: int = 8
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    """Used when warmup_steps is 0: warmup = ratio x total steps."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0
    """0 = no clipping."""
    seed: int = 42
    log_every: int = 1
    eval_every: int = 0
    """Optimizer steps between evals (0 = only at the end)."""
    eval_batch_size: int = 0
    """0 = batch_size."""
    save_every: int = 0
    """Optimizer steps between checkpoints (0 = only the final adapter)."""
    keep_checkpoints: int = 2


@dataclass
class OutputConfig:
    dir: str = "runs/sft"
    resume: bool | str = "auto"
    """auto = resume from the newest checkpoint in dir if there is one; true = must resume; false = fresh
    start (an error if dir already has checkpoints); or a path to a checkpoint folder."""
    plots: bool = True
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        self.dir = _expand_user(self.dir)
        if self.resume != "auto":
            self.resume = _expand_user(self.resume)


@dataclass
class SFTConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# -- loading and checking ------------------------------------------------------------------------


class ConfigError(ValueError):
    """A config key or value that is not valid; the message says which and what to write instead."""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"list[{_type_name(inner)}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _kind(value: Any) -> str:
    """The type of ``value`` as YAML names it: int, float (not the loader's _Int, _Float)."""
    return {_Int: "int", _Float: "float"}.get(type(value), type(value).__name__)


def _got(value: Any) -> str:
    """``value`` and its type as YAML writes them: ``'abc' (str)``, ``null``."""
    return "null" if value is None else f"{value!r} ({_kind(value)})"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against (and, for int -> float, converted to) type ``tp``; ConfigError if it
    does not fit."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for alt in typing.get_args(tp):
            try:
                return _coerce(value, alt, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_got(value)}")
    if origin is Literal:
        # compare type too: True == 1 must not pass for a Literal[1]
        if any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            return value
        raise ConfigError(
            f"{key}: expected one of {_type_name(tp)}, got {'null' if value is None else repr(value)}"
        )
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_got(value)}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (_Int, _Float)) and key in _TEXT_KEYS:
            return value.text  # a folder named 2024 or 0123, as written
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, key)
    else:  # pragma: no cover - a field type this loader does not know
        raise ConfigError(f"{key}: unsupported field type {tp!r}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_got(value)}")


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        out.append(name)
        if dataclasses.is_dataclass(hints[f.name]):
            out.extend(_all_keys(hints[f.name], name + "."))
    return out


# names other trainers use for the same settings (TRL / transformers / PEFT)
_ALIASES = {
    "learning_rate": "train.lr",
    "num_train_epochs": "train.epochs",
    "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "max_grad_norm": "train.max_grad_norm",
    "lr_scheduler_type": "train.lr_schedule",
    "max_length": "data.max_seq_len",
    "max_seq_length": "data.max_seq_len",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_r": "lora.r",
    "rank": "lora.r",
    "lora_rank": "lora.r",
    "output_dir": "output.dir",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "save_steps": "train.save_every",
    "eval_steps": "train.eval_every",
    "logging_steps": "train.log_every",
    "save_total_limit": "train.keep_checkpoints",
    "per_device_eval_batch_size": "train.eval_batch_size",
    "adam_epsilon": "train.eps",
    "steps": "train.max_steps",
    "num_steps": "train.max_steps",
    "load_in_4bit": "model.quantize",
    "bf16": "model.dtype",
    "fp16": "model.dtype",
    "save_dir": "output.dir",
}


def _unknown_key(cls: type, key: str, root: type) -> ConfigError:
    """The error for an unknown key, naming the nearest valid one: another trainer's name for a key
    (``learning_rate``), else the same name in another section, else a close name in the same
    section, else a close name anywhere."""
    leaf = key.rsplit(".", 1)[-1]
    prefix = key[: len(key) - len(leaf)]
    siblings = [f.name for f in dataclasses.fields(cls)]
    everywhere = _all_keys(root)
    guess = None
    alias = difflib.get_close_matches(leaf, list(_ALIASES), n=1, cutoff=0.85)
    if alias and _ALIASES[alias[0]] in everywhere:
        guess = _ALIASES[alias[0]]
    if guess is None:
        same = [k for k in everywhere if k.rsplit(".", 1)[-1] == leaf]
        guess = same[0] if same else None
    if guess is None:
        close = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
        guess = prefix + close[0] if close else None
    # a key inside a section is a value, never a section: suggest values only
    candidates = [k for k in everywhere if "." in k] if prefix else everywhere
    if guess is None:
        leaves = {k.rsplit(".", 1)[-1]: k for k in candidates}
        close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
        guess = leaves[close[0]] if close else None
    if guess is None:
        close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.5)
        guess = close[0] if close else None
    if leaf in ("overwrite", "overwrite_output_dir"):  # (transformers' overwrite_output_dir)
        return ConfigError(
            f"unknown config key {key!r}; a run never overwrites another: a new output.dir starts a "
            "run, the same one continues it (output.resume=auto) or refuses to (output.resume=false)"
        )
    hint = f"did you mean {guess!r}?" if guess else f"valid keys here: {', '.join(siblings)}"
    return ConfigError(f"unknown config key {key!r}; {hint}")


def _build(cls: type, values: dict, prefix: str = "", root: type | None = None) -> Any:
    root = root or cls
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            if isinstance(k, str) and "." in k and key in _all_keys(root):
                section, leaf = key.rsplit(".", 1)
                raise ConfigError(
                    f"config key {key!r}: a YAML file nests keys in their section ({section}: then {leaf}: "
                    "indented below it); dotted keys are for command-line overrides"
                )
            raise _unknown_key(cls, key, root)
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _build(tp, v if v is not None else {}, key, root)
        else:
            kwargs[k] = _coerce(v, tp, key)
    return cls(**kwargs)


# keys whose value is a path or a name: a number written there (a folder named 2024, 0123 or 1.10) is
# its text as written, not the number YAML reads (refused as not a string, or 0123 -> 123, 1.10 -> 1.1)
_TEXT_KEYS = {
    "model.path",
    "model.chat_template",
    "data.train",
    "data.eval",
    "data.general_data",
    "output.dir",
    "output.resume",
}


class _Int(int):
    """A YAML int that keeps the text it was read from (for ``_TEXT_KEYS``)."""

    text: str


class _Float(float):
    """A YAML float that keeps the text it was read from (for ``_TEXT_KEYS``)."""

    text: str


def _with_text(value: Any, node: yaml.ScalarNode) -> Any:
    out = (_Int if isinstance(value, int) else _Float)(value)
    out.text = str(node.value)
    return out


class _YamlLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping: YAML readers keep the last one, so a
    second ``train:`` section would silently drop every key of the first. Its numbers are below."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue  # (a merge key's entries may be overridden; a non-scalar key is refused below)
            key = self.construct_object(key_node)
            if key in seen:
                raise ConfigError(
                    f"key {key!r} is written twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1});"
                    " YAML would keep only the second"
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> Any:
        # YAML 1.1 reads 0123 as octal (83): a seed or step count written with a leading zero silently
        # became another number; it is decimal here, as in YAML 1.2 and Python's int("0123")
        text = str(self.construct_scalar(node)).replace("_", "")
        if text.lstrip("+-")[:2] not in ("0b", "0x"):
            try:
                return _with_text(int(text), node)
            except ValueError:
                pass
        return _with_text(super().construct_yaml_int(node), node)

    def construct_yaml_float(self, node: yaml.ScalarNode) -> Any:
        return _with_text(super().construct_yaml_float(node), node)


# YAML 1.1's implicit numbers, less its base-60 forms (1:30 was the int 90, 1:30.5 the float 90.5): such a
# value stays a string, which a number key refuses. No key takes a date: 2024-01-05 stays a string too
# (a folder of that name)
_DROPPED = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:timestamp")
_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in _DROPPED]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0x[0-9a-fA-F_]+|[-+]?[0-9][0-9_]*)$"),
    list("-+0123456789"),
)
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
        |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)
_YamlLoader.add_constructor("tag:yaml.org,2002:int", _YamlLoader.construct_yaml_int)
_YamlLoader.add_constructor("tag:yaml.org,2002:float", _YamlLoader.construct_yaml_float)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-4"`` -> (["train", "lr"], 1e-4); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value (e.g. train.lr=1e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {item!r}: the key {key!r} is not a dotted name like train.lr")
    text = raw.strip()
    if text[:1] not in ("'", '"') and _COMMENT.search(text):
        # on a command line a '#' is part of the value (runs/exp #2, #1.jsonl), not a YAML comment that
        # would silently cut it
        return key.split("."), text
    if key in _TEXT_KEYS and text[:1] in _YAML_MARKS:
        # a path or name starting with an anchor, alias, tag or block mark (&x, *run, !x, |) is its text:
        # YAML would read it as null, an empty string, or drop its first word
        return key.split("."), text
    try:
        value = yaml.load(raw, Loader=_YamlLoader) if text else ""
    except yaml.YAMLError:
        value = raw
    except ConfigError as e:  # a key written twice in a {...} value
        raise ConfigError(f"override {item!r}: {e}") from None
    if value is None and text[:1] == "&" and len(text.split()) == 1:
        raise ConfigError(
            f"override {item!r}: YAML reads {text!r} as an anchor with no value (null); write the value "
            f"after it, null to clear {key}, or quote the text ({key}='{text}')"
        )
    return key.split("."), value


def _merge_override(tree: dict, path: list[str], value: Any, cls: type) -> None:
    node = tree
    cur_cls = cls
    for i, part in enumerate(path):
        hints = typing.get_type_hints(cur_cls)
        if part not in hints:
            raise _unknown_key(cur_cls, ".".join(path[: i + 1]), cls)
        if i == len(path) - 1:
            key = ".".join(path)
            if dataclasses.is_dataclass(hints[part]) and value is None:
                first = dataclasses.fields(hints[part])[0].name
                raise ConfigError(
                    f"override '{key}=null': {key} is a section; set its keys one by one ({key}.{first}=...)"
                )
            if dataclasses.is_dataclass(hints[part]) and isinstance(value, dict):
                # a mapping sets the keys it names, as that many dotted overrides would: replacing the
                # section would reset its other keys (from the file) to their defaults
                for k, v in value.items():
                    _merge_override(tree, [*path, str(k)], v, cls)
                return
            node[part] = value
            return
        if not dataclasses.is_dataclass(hints[part]):
            raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section")
        cur_cls = hints[part]
        sub = node.get(part)
        if sub is not None and not isinstance(sub, dict):
            # (a file's `train: 3`: reported as _build reports it, not replaced by the override)
            section = ".".join(path[: i + 1])
            raise ConfigError(
                f"override {'.'.join(path)}: {section}: expected a mapping of keys, got {sub!r}"
            )
        if not isinstance(sub, dict):
            sub = {}
            node[part] = sub
        node = sub


def load_config(
    source: str | os.PathLike | dict | None, overrides: list[str] | None = None, cls: type = SFTConfig
) -> Any:
    """A checked config of dataclass type ``cls`` from a YAML file (or a dict) plus dotted
    overrides. The overrides apply in order: of a key given twice the last wins, as with other
    command-line tools (``hoptune demo`` puts its own paths before the user's overrides)."""
    if source is None:
        tree: dict = {}
    elif isinstance(source, dict):
        tree = _deepcopy(source)
    else:
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist")
        with open(path, encoding="utf-8") as f:
            try:
                tree = yaml.load(f, Loader=_YamlLoader)
            except yaml.YAMLError as e:
                raise ConfigError(f"config file {path!r} is not valid YAML: {_yaml_error(e)}") from None
            except ConfigError as e:
                raise ConfigError(f"config file {path!r}: {e}") from None
            except UnicodeDecodeError as e:
                raise ConfigError(
                    f"config file {path!r} is not UTF-8 text ({e.reason} at byte {e.start})"
                ) from None
        if tree is None:  # an empty file, or comments only
            tree = {}
        if not isinstance(tree, dict):  # (an empty list or a 0 too: not an empty config)
            got = _kind(tree)
            raise ConfigError(f"config file {path!r} must hold a mapping of sections, got {got}")
    for item in overrides or []:
        keys, value = parse_override(item)
        _merge_override(tree, keys, value, cls)
    return _build(cls, tree)


def _yaml_error(e: yaml.YAMLError) -> str:
    """A YAML error on one line (PyYAML's own text spans four, with the file name twice): the place
    and the problem, then what it was parsing and where that started."""
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if not problem or mark is None:
        return " ".join(str(e).split())
    msg = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, start = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context:
        where = f" started at line {start.line + 1}, column {start.column + 1}" if start is not None else ""
        msg += f" ({context}{where})"
    return msg


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


# (torch.finfo(torch.float32).max and .tiny, without importing torch here)
_FLOAT32_MAX = 3.4028234663852886e38
_FLOAT32_TINY = 1.1754943508222875e-38


def check_sft_config(cfg: SFTConfig) -> None:
    """Value checks the types cannot express; ConfigError naming the key."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    t, d, lo, m = cfg.train, cfg.data, cfg.lora, cfg.model
    need(d.train is not None, "data.train: set the training JSONL (data.train=path/to/train.jsonl)")
    # an empty path (an unset shell variable in `output.dir=$OUT`) would mean the current folder, or
    # for data.eval / data.general_data no data at all, without a word
    for key, value in (
        ("model.path", m.path),
        ("data.train", d.train),
        ("data.eval", d.eval),
        ("data.general_data", d.general_data),
        ("output.dir", cfg.output.dir),
    ):
        need(
            value is None or value.strip() != "",
            f"{key} is an empty string: give a path (or null where none is allowed)",
        )
    u = m.uncheckpointed_layers
    need(
        u == "auto" or u >= 0,
        f"model.uncheckpointed_layers must be an integer >= 0 or auto, got {u}",
    )
    need(
        u in ("auto", 0) or m.gradient_checkpointing,
        f"model.uncheckpointed_layers={u} needs model.gradient_checkpointing=true (without it no layer "
        "is checkpointed, and every layer keeps its activations)",
    )
    need(
        _DEVICE.fullmatch(m.device) is not None,
        f"model.device must be auto, cpu, cuda, cuda:N, mps or xpu (with :N as torch.device reads it), got {m.device!r}",
    )
    # a value that may name one of the tokenizer's chat templates waits for the tokenizer
    from hoptune.data.formatting import may_name_a_template, resolve_chat_template

    if m.chat_template is not None and not may_name_a_template(m.chat_template):
        try:
            resolve_chat_template(m.chat_template)
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(str(e)) from None
    need(
        not os.path.exists(cfg.output.dir) or os.path.isdir(cfg.output.dir),
        f"output.dir={cfg.output.dir!r} is a file, not a folder",
    )
    above = os.path.abspath(cfg.output.dir)  # the nearest part of the path that exists
    while not os.path.exists(above) and os.path.dirname(above) != above:
        above = os.path.dirname(above)
    need(os.path.isdir(above), f"output.dir={cfg.output.dir!r} lies under {above!r}, a file, not a folder")
    need(d.max_seq_len >= 2, f"data.max_seq_len must be >= 2, got {d.max_seq_len}")
    need(0.0 <= d.eval_fraction < 1.0, f"data.eval_fraction must be in [0, 1), got {d.eval_fraction}")
    need(
        0.0 <= d.general_fraction < 1.0, f"data.general_fraction must be in [0, 1), got {d.general_fraction}"
    )
    need(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    need(t.grad_accum >= 1, f"train.grad_accum must be >= 1, got {t.grad_accum}")
    need(t.lr > 0 and math.isfinite(t.lr), f"train.lr must be a finite number > 0, got {t.lr}")
    need(t.epochs > 0 or t.max_steps > 0, "set train.epochs > 0 or train.max_steps > 0")
    need(math.isfinite(t.epochs), f"train.epochs must be a finite number, got {t.epochs}")
    need(t.epochs >= 0, f"train.epochs must be >= 0 (0 with train.max_steps > 0), got {t.epochs}")
    need(t.max_steps >= 0, f"train.max_steps must be >= 0, got {t.max_steps}")
    # (the data order seeds a generator with seed x 1_000_003 + epoch, which must fit in 64 bits)
    need(-(2**32) < t.seed < 2**32, f"train.seed must be a 32-bit number (|seed| < 2**32), got {t.seed}")
    need(len(t.betas) == 2, f"train.betas must be two floats [beta1, beta2], got {t.betas}")
    need(all(0.0 <= b < 1.0 for b in t.betas), f"train.betas must each be in [0, 1), got {t.betas}")
    need(t.eps > 0 and math.isfinite(t.eps), f"train.eps must be a finite number > 0, got {t.eps}")
    # AdamW's first step moves a weight by up to lr / (1 - beta1), a float32 scalar: beyond
    # float32's range it stops with "value cannot be converted to type float without overflow"
    need(
        t.lr / (1.0 - t.betas[0]) <= _FLOAT32_MAX,
        f"train.lr={t.lr} is too large: AdamW's first step size, lr / (1 - beta1) = "
        f"{t.lr / (1.0 - t.betas[0]):.3g}, is beyond float32's range ({_FLOAT32_MAX:.3g})",
    )
    # below float32's normal numbers eps is subnormal, then 0: a weight whose gradient is 0
    # (lora_A's at the first step, lora_B being zero) gets 0 / 0 = NaN
    need(
        t.eps >= _FLOAT32_TINY,
        f"train.eps must be >= {_FLOAT32_TINY:.3g} (float32's smallest normal number), got {t.eps}",
    )
    need(
        t.weight_decay >= 0 and math.isfinite(t.weight_decay),
        f"train.weight_decay must be a finite number >= 0, got {t.weight_decay}",
    )
    need(t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    need(0.0 <= t.warmup_ratio < 1.0, f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    need(0.0 <= t.min_lr_ratio <= 1.0, f"train.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    need(t.max_grad_norm >= 0, f"train.max_grad_norm must be >= 0, got {t.max_grad_norm}")
    need(t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every}")
    need(t.eval_every >= 0, f"train.eval_every must be >= 0 (0 = only at the end), got {t.eval_every}")
    need(
        t.eval_every == 0 or d.eval is not None or d.eval_fraction > 0,
        f"train.eval_every={t.eval_every} needs eval data: set data.eval or data.eval_fraction (or "
        "train.eval_every=0)",
    )
    need(
        t.eval_batch_size >= 0,
        f"train.eval_batch_size must be >= 0 (0 = batch_size), got {t.eval_batch_size}",
    )
    need(t.save_every >= 0, f"train.save_every must be >= 0 (0 = no checkpoints), got {t.save_every}")
    need(t.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}")
    need(lo.r >= 1, f"lora.r must be >= 1, got {lo.r}")
    need(math.isfinite(lo.alpha) and lo.alpha > 0, f"lora.alpha must be a finite number > 0, got {lo.alpha}")
    need(0.0 <= lo.dropout < 1.0, f"lora.dropout must be in [0, 1), got {lo.dropout}")
    # (refused by apply_lora too, but only once the model has loaded)
    tm = lo.target_modules
    need(
        not lo.enabled
        or (tm.strip() != "" if isinstance(tm, str) else len(tm) > 0 and all(n.strip() for n in tm)),
        f"lora.target_modules must name the layers to adapt (all-linear, [q_proj, v_proj] or a regular "
        f"expression), got {tm!r}",
    )
    need(
        lo.enabled or cfg.model.quantize is None,
        "lora.enabled=false (full fine-tuning) needs model.quantize=null: an NF4 base cannot train",
    )
    need(
        lo.enabled or m.dtype != "fp16",
        "lora.enabled=false (full fine-tuning) with model.dtype=fp16 would train fp16 weights with no fp32 "
        "copy: AdamW's eps (1e-8) is 0 in fp16 and the first step turns weights into NaN; use model.dtype=bf16 "
        "or fp32",
    )
