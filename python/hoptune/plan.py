"""``hoptune plan``: how much GPU memory a LoRA / QLoRA training step will need, before you run it.

    hoptune plan --model llama-3-8b --seq 2048 --batch 2 --r 16
    python -m hoptune.plan --model /ckpt/Qwen2.5-7B/config.json --stack hf
    hoptune.plan("llama-3-70b", seq=2048, batch=1)         # -> MemoryPlan (print it for the table)

The estimate counts bytes the way the PyTorch caching allocator sees them (what
``torch.cuda.max_memory_allocated`` reports), phase by phase, and takes the largest phase:

* **weights**: NF4 linear layers at 0.5 byte per weight plus absmax statistics (fp32 per 64
  weights; with double quantization one uint8 per 64 plus an fp32 per 256 blocks and a 1 KiB
  table per layer); embeddings, the output head and norms in ``dtype`` (2 bytes).
* **adapters / gradients / optimizer**: r x (in + out) per adapted layer (+ out for DoRA) in the
  adapter dtype; gradients of the same size; AdamW keeps two moments of the parameter dtype
  (a paged optimizer keeps them in host memory: 0 on the GPU).
* **activations**, per token, for a Llama-style layer in transformers (SDPA attention without a
  padding mask, so grouped-query attention runs natively; bf16 compute; frozen norms). With
  H = hidden, I = intermediate, q = heads x head_dim, kv = kv_heads x head_dim, r = rank::

      each pre-norm (RMSNorm in fp32)       4H (fp32 copy of its input) + 2H (its output, the
                                            input the next linear layers save)
      each post-norm (Gemma 2 / 3)          4H
      q/k norm (Qwen3, Gemma 3)             4q + 4kv
      attention                             2q (q after RoPE) + 2kv + 2kv (k, v) + 2q (SDPA
                                            output, kept for its backward) + 2q (the contiguous
                                            copy o_proj saves)
      eager attention (what transformers    2q (q) + 2q + 2q (k, v repeated to every head) + 2q
        runs for a model without SDPA,      (the copy o_proj saves), and each token's scores
        e.g. Gemma 2)                       over its row of T = seq tokens: 4hT (fp32 softmax) +
                                            2hT (bf16 probabilities) + 2hT (tanh of soft-capped
                                            scores, Gemma 2), h = heads; GPT-OSS: 2hT (a bf16
                                            softmax)
      gated MLP                             2I (gate) + 2I (up) + 2I (act(gate)) + 2I (product)
      hoptune's fused ops (Llama, Mistral,  each norm 4 (a statistic per row) instead of its 4H
        Qwen2 / Qwen3: fuse_decoder_ops,    fp32 copy (q/k norms: none), the MLP 6I (no act(gate))
        which hoptune sft runs)
      LoRA, per adapted layer               2r (x A^T, saved for the B product); the HF stack
                                            with fp32 adapters also casts x to fp32 per layer:
                                            +4 in + 4r
  Without checkpointing every layer keeps all of it. With gradient checkpointing (transformers
  checkpoints each decoder layer) a layer keeps only its input, 2H per token (but the last
  ``uncheckpointed`` layers, which keep all of it), and the backward recomputes one layer at a
  time: one layer's activations plus the gradients in flight (about 6I + 6H per token) and, for
  NF4 weights, the dequantized weight of the largest layer (bf16).
* **logits**: full (the HF stack): the lm_head writes bf16 logits (2V per token, held by the
  model output until the step ends); the loss casts them to fp32 (4V) and ``cross_entropy`` keeps
  its fp32 log-softmax (4V); its backward holds the fp32 gradient of the log-softmax (4V) and
  writes the fp32 gradient of the logits (4V): 2V + 4V + 4V + 4V = **14V bytes per token** at the
  peak; a final soft-cap of the logits (Gemma 2) also keeps its tanh (2V): 16V. Fused (hoptune's
  ``fused_linear_logprobs``): one fp32 chunk of logits (``hoptune.ops.logprob.CHUNK_BYTES``), the
  per-row gradient J in fp32 (4H per token) and the hidden-state gradient made from it (2H per
  token). With LoRA on the output head (tied or not: it is a target like any linear layer) the
  head is no plain linear layer and its whole logits are formed, so the default there is the
  full estimate (an upper bound for hoptune's path).
* **phases**: the *loss* phase (weights, optimizer state, stored activations, logits) and the
  *layer backward* phase (weights, state, stored activations, one recomputed layer, transients,
  the logits still held) and the *optimizer step* (state + all gradients, twice for AdamW's
  temporaries). Gradients are set to None between steps (no accumulation buffers at the loss).

Not counted by ``max_memory_allocated`` and shown separately: the CUDA context and libraries
(~0.5 GiB) and the allocator's slack (reserved minus allocated, ~5 %).

Checked against the HF stack (transformers + bitsandbytes + PEFT, ``docs/TARGETS.md`` section 5)
on one H200: Llama-3-8B, batch 2 x 2048, QLoRA r=16 on all linear layers, checkpointing, AdamW,
bf16 adapters as the anchor script makes them: measured 13.5 GiB, ``--stack hf`` says 13.5;
Llama-3-70B, 1 x 2048: measured 44.1 GiB, ``--stack hf`` says 44.0. hoptune's own step
(``bench/bench_sft_8b.py``, the decoder ops fused, fp32 adapters): measured 8.05 GiB, the
default stack says 7.88 (an underestimate of 2 %: a transient not modelled).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

GiB = 2**30
_FUSED_CHUNK_BYTES = 128 * 2**20  # hoptune.ops.logprob.CHUNK_BYTES, when that cannot be imported
_CONTEXT_BYTES = 0.5 * GiB  # CUDA context + cuBLAS/cuDNN handles on an H100/H200, torch 2.x
_SLACK = 0.05  # caching-allocator reserved / allocated - 1, seen on the 70B anchor (46.2 / 44.1)
_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# public shapes (config.json of the released checkpoints) so `plan` runs without any file
KNOWN_MODELS: dict[str, dict] = {
    "llama-3-8b": dict(
        model_type="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
    "llama-3-70b": dict(
        model_type="llama",
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
    "llama-3.2-1b": dict(
        model_type="llama",
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "llama-3.2-3b": dict(
        model_type="llama",
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
}
KNOWN_MODELS["llama-3.1-8b"] = KNOWN_MODELS["llama-3-8b"]
KNOWN_MODELS["llama-3.1-70b"] = KNOWN_MODELS["llama-3-70b"]


@dataclass
class MemoryPlan:
    """GPU memory of one training step, in bytes per component (``table()`` prints GiB)."""

    model: str
    stack: str
    batch: int
    seq: int
    r: int
    quantize: str | None
    double_quant: bool
    grad_ckpt: bool
    logits: str
    optimizer: str
    adapter_dtype: str
    use_dora: bool
    layers: int
    adapted_layers: int
    params: int
    quantized_params: int
    trainable_params: int
    weights_quantized: float
    weights_dense: float
    adapters: float
    gradients: float
    optimizer_state: float
    stored_activations: float  # kept from forward to backward (layer inputs with checkpointing)
    layer_activations: float  # one decoder layer's saved activations
    logits_bytes: float
    backward_transients: float
    phases: dict[str, float] = field(default_factory=dict)
    peak: float = 0.0
    peak_phase: str = ""
    context: float = _CONTEXT_BYTES
    slack: float = 0.0
    alternatives: dict[str, float] = field(default_factory=dict)
    # dense parameters in matrices outside nn.Linear (an MoE layer's experts): never NF4, no LoRA
    dense_other_params: int = 0
    vocab: int = 0
    # with checkpointing, the last decoder layers that run without it (their activations kept)
    uncheckpointed: int = 0

    @property
    def weights(self) -> float:
        return self.weights_quantized + self.weights_dense

    @property
    def peak_gib(self) -> float:
        return self.peak / GiB

    @property
    def device_total(self) -> float:
        return self.peak + self.slack + self.context

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(weights=self.weights, peak_gib=self.peak_gib, device_total=self.device_total)
        return d

    def table(self) -> str:
        g = lambda b: f"{b / GiB:8.2f}"  # noqa: E731
        tok = self.batch * self.seq
        quant = (
            f"{self.quantize}{' + double quant' if self.double_quant else ''}" if self.quantize else "bf16"
        )
        head = (
            f"{self.model}: batch {self.batch} x seq {self.seq} ({tok} tokens), {quant} weights, "
            f"{'DoRA' if self.use_dora else 'LoRA'} r={self.r} on {self.adapted_layers} layers, "
            f"{self._ckpt_words()}, {self.optimizer}, "
            f"{self.logits} logits  [stack: {self.stack}]"
        )
        act_note = "every layer's activations"
        if self.grad_ckpt:
            act_note = f"layer inputs, {self.layers - self.uncheckpointed} x 2H per token"
            if self.uncheckpointed:
                act_note += f", and {self.uncheckpointed} layers' activations"
        rows = []
        if self.quantize:
            rows.append(
                (
                    f"weights, NF4 linear ({self.quantized_params / 1e9:.2f} B params)",
                    self.weights_quantized,
                    "",
                )
            )
        dense_what = "embeddings, head, norms" if self.quantize else "all"
        if self.quantize and self.dense_other_params:
            dense_what += f", {self.dense_other_params / 1e9:.2f} B params outside nn.Linear"
        rows += [
            (f"weights, dense ({dense_what})", self.weights_dense, "bf16"),
            (f"adapters ({self.trainable_params / 1e6:.1f} M params)", self.adapters, self.adapter_dtype),
            ("gradients", self.gradients, self.adapter_dtype),
            ("optimizer state", self.optimizer_state, self.optimizer),
            ("activations kept for backward", self.stored_activations, act_note),
            (
                "activations of one layer",
                self.layer_activations,
                "recomputed in backward" if self.grad_ckpt else "(included above)",
            ),
            (
                "logits / log-probs",
                self.logits_bytes,
                f"{self.logits_bytes / max(1, self.batch * self.seq * self.vocab):.0f}V bytes per token"
                if self.logits == "full"
                else "one fp32 chunk + J + dh",
            ),
            (
                "backward transients",
                self.backward_transients,
                "grads in flight + one dequantized weight" if self.quantize else "grads in flight",
            ),
        ]
        width = max(len(r[0]) for r in rows) + 2
        lines = [head, "", f"{'component':<{width}}{'GiB':>8}  notes", "-" * (width + 40)]
        lines += [f"{name:<{width}}{g(b)}  {note}" for name, b, note in rows]
        lines.append("-" * (width + 40))
        for phase, b in self.phases.items():
            mark = "  <- peak" if phase == self.peak_phase else ""
            lines.append(f"{'phase: ' + phase:<{width}}{g(b)}{mark}")
        lines += [
            f"{'peak allocated (max_memory_allocated)':<{width}}{g(self.peak)}",
            f"{'+ allocator slack (~5%)':<{width}}{g(self.slack)}",
            f"{'+ CUDA context and libraries':<{width}}{g(self.context)}",
            f"{'= device total (as nvidia-smi shows)':<{width}}{g(self.device_total)}",
        ]
        if self.alternatives:
            lines += ["", "peak allocated with one change:"]
            lines += [f"  {name:<{width - 2}}{g(b)}" for name, b in self.alternatives.items()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def _ckpt_words(self) -> str:
        if not self.grad_ckpt:
            return "no checkpointing"
        if self.uncheckpointed:
            return f"gradient checkpointing on {self.layers - self.uncheckpointed} of {self.layers} layers"
        return "gradient checkpointing"


# -- model shape ------------------------------------------------------------------------------
def _load_config(config: object):
    """A transformers config from a known name, a config.json path (or its folder), a dict or a
    config object."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config, getattr(config, "_name_or_path", "") or config.model_type
    if isinstance(config, Mapping):
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        d = dict(config)
        if "model_type" not in d:
            raise ValueError("config dict needs a 'model_type' (e.g. 'llama')")
        mt = d.pop("model_type")
        if not isinstance(mt, str) or mt not in CONFIG_MAPPING:
            raise ValueError(f"unknown model_type {mt!r} (not a model type this transformers knows)")
        try:
            return AutoConfig.for_model(mt, **d), mt
        except Exception as e:  # transformers' own validation: a bad field, a bad combination
            raise ValueError(f"invalid {mt} config: {_reason(e)}") from e
    if isinstance(config, (str, os.PathLike)):
        s = os.fspath(config)
        if s.lower() in KNOWN_MODELS:
            return _load_config(KNOWN_MODELS[s.lower()])[0], s.lower()
        # (the shell leaves a ~ after --model= as it is; hoptune sft's paths read it as home, too)
        s = os.path.expanduser(s)
        path = os.path.join(s, "config.json") if os.path.isdir(s) else s
        if not os.path.isfile(path):
            import difflib

            near = difflib.get_close_matches(s.lower(), list(KNOWN_MODELS), n=1, cutoff=0.8)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ValueError(
                f"{s!r} is neither a known model ({sorted(KNOWN_MODELS)}) nor a config.json file or a "
                f"folder holding one{hint}"
            )
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        except OSError as e:
            raise ValueError(f"cannot read {path}: {e.strerror or e}") from e
        if not isinstance(d, dict):
            raise ValueError(f"{path} is not a JSON object (a model's config.json), got {type(d).__name__}")
        d.pop("quantization_config", None)
        try:
            cfg = _load_config(d)[0]
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
        return cfg, os.path.basename(os.path.dirname(os.path.abspath(path))) or path
    raise TypeError(
        f"config must be a model name, a path, a dict or a transformers config, got {type(config).__name__}"
    )


def _reason(e: BaseException) -> str:
    """The first line of the innermost cause of ``e`` (transformers wraps its validation errors)."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= 200 else text[:200] + " ..."


@dataclass
class _Shape:
    layers: int
    hidden: int
    intermediate: int
    q_dim: int
    kv_dim: int
    vocab: int
    pre_norms: int
    post_norms: int
    qk_norm: bool
    linears: list[tuple[str, int, int, bool]]  # (name, in, out, has_bias) of every nn.Linear / Conv1D
    head: str | None
    other_params: int  # embeddings, norms... (tied weights counted once)
    # the output head as a layer LoRA can target, tied or not: (name, in, out, has_bias)
    head_linear: tuple[str, int, int, bool] | None = None
    # of other_params: matrices outside nn.Linear besides the embedding (an MoE layer's experts)
    outside_linear: int = 0
    heads: int = 0
    # bytes eager attention keeps per score (head x query x key); 0 for SDPA / flash, which keep none
    score_bytes: int = 0
    logit_softcap: bool = False  # the model soft-caps its logits (config.final_logit_softcapping)
    # hoptune.fuse_decoder_ops fuses its norms (Llama's RMSNorm) and its MLP (SiLU-gated)
    fused_norms: bool = False
    fused_mlp: bool = False
    # (name, class name) of every other module (blocks, embeddings, norms): no LoRA target
    not_linear: list[tuple[str, str]] = field(default_factory=list)


def _shape(config) -> _Shape:
    from torch import nn
    from transformers import AutoModelForCausalLM

    from hoptune.patch import _is_conv1d, _output_head_names

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    # transformers builds a model of 0 layers or an empty vocabulary, and fails deep inside on others
    sizes = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    for f in (*sizes, "vocab_size"):
        v = getattr(text, f, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v < 1:
            raise ValueError(f"config field {f} must be a positive int, got {v!r}")
    nh, nkv = getattr(text, "num_attention_heads", None), getattr(text, "num_key_value_heads", None)
    if isinstance(nh, int) and isinstance(nkv, int) and nh % nkv:
        # (transformers builds the model; its attention fails at the first forward)
        raise ValueError(
            f"config field num_key_value_heads must divide num_attention_heads ({nh}), got {nkv}: "
            "each key / value head serves num_attention_heads / num_key_value_heads query heads"
        )
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        mt = getattr(config, "model_type", type(config).__name__)
        if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
            raise ValueError(
                f"model_type {mt!r} is not a causal LM (AutoModelForCausalLM has no class for it)"
            ) from e
        raise ValueError(f"cannot build the {mt} model from this config: {_reason(e)}") from e
    required = ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size")
    missing = [f for f in required if getattr(text, f, None) is None]
    if missing:
        raise ValueError(
            f"model_type {getattr(text, 'model_type', '')!r} is no transformer decoder this estimate "
            f"knows: its config has no {', '.join(missing)}"
        )
    heads = _output_head_names(model)
    head = next(iter(heads), None)
    embed = model.get_input_embeddings().weight
    tied = head is not None and model.get_submodule(head).weight is embed
    linears, seen, not_linear = [], set(), []
    for name, m in model.named_modules():
        # (transformers' Conv1D, GPT-2's projections, is a linear layer to LoRA and bitsandbytes too)
        linear = isinstance(m, nn.Linear) or _is_conv1d(m)
        if linear and not (tied and name == head):
            # a tied head's weight is the embedding: stored once, as the embedding
            linears.append(_linear_dims(name, m))
            seen.update(id(p) for p in m.parameters())
        elif name and not linear:
            not_linear.append((name, type(m).__name__))
    empty = next(((n, i, o) for n, i, o, _ in linears if not i or not o), None)
    if empty is not None:
        # transformers builds a layer of no weights from a size of 0 (intermediate_size=0: no MLP)
        sized = ("_size", "_dim", "n_inner")  # (GPT-2's MLP width: n_inner)
        fields = text.to_dict().items()
        zero = [k for k, v in fields if type(v) is int and v == 0 and k.endswith(sized)]
        n, i, o = empty
        named = f"; config field {' / '.join(zero)} must be a positive int, got 0" if zero else ""
        raise ValueError(f"the config makes layer {n} [{o}, {i}], with no weights{named}")
    other = sum(p.numel() for p in model.parameters() if id(p) not in seen)
    # embeddings (token, and GPT-2's / OPT's learned positions) are no weights outside nn.Linear
    seen.update(id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters())
    seen.add(id(embed))
    outside = sum(p.numel() for p in model.parameters() if id(p) not in seen and p.ndim >= 2)
    nh = text.num_attention_heads
    hd = getattr(text, "head_dim", None) or text.hidden_size // nh
    mt = getattr(text, "model_type", "")
    score_bytes = 0
    if getattr(model.config, "_attn_implementation", None) == "eager":
        # the fp32 softmax and its bf16 copy (saved by the product with v), and the tanh of
        # soft-capped scores: each (B, heads, T, T); GPT-OSS's eager attention (with its sinks) takes
        # the softmax in bf16 and keeps only that
        score_bytes = 4 + 2 + (2 if getattr(text, "attn_logit_softcapping", None) else 0)
        if mt.startswith("gpt_oss"):
            score_bytes = 2
    # (the families whose norms and MLP fuse_decoder_ops is known to take: its check decides at run time)
    llama_family = mt.startswith(_FUSED_FAMILIES) and "moe" not in mt
    return _Shape(
        layers=text.num_hidden_layers,
        hidden=text.hidden_size,
        intermediate=_intermediate(text),
        q_dim=nh * hd,
        kv_dim=(getattr(text, "num_key_value_heads", None) or nh) * hd,
        vocab=text.vocab_size,
        pre_norms=2,
        post_norms=2 if mt.startswith(("gemma2", "gemma3")) else 0,
        qk_norm=mt.startswith(("qwen3", "gemma3", "olmo2")),
        linears=linears,
        head=None if tied else head,
        other_params=other,
        head_linear=None if head is None else _linear_dims(head, model.get_submodule(head)),
        outside_linear=outside,
        heads=nh,
        score_bytes=score_bytes,
        logit_softcap=bool(getattr(text, "final_logit_softcapping", None)),
        fused_norms=llama_family,
        fused_mlp=llama_family and getattr(text, "hidden_act", None) in ("silu", "swish"),
        not_linear=not_linear,
    )


_FUSED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def _intermediate(text) -> int:
    """The MLP's inner width: ``intermediate_size``, or GPT-2's / GPT-J's ``n_inner``, OPT's
    ``ffn_dim``, Falcon's ``ffn_hidden_size`` (4 x hidden where the config leaves it unset)."""
    for key in ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size"):
        value = getattr(text, key, None)
        if value:
            return value
    return 4 * text.hidden_size


def _linear_dims(name: str, m) -> tuple[str, int, int, bool]:
    """(name, in, out, has_bias) of a linear layer (nn.Linear or Conv1D)."""
    from hoptune.patch import layer_features

    fan_in, fan_out = layer_features(m)
    return name, fan_in, fan_out, getattr(m, "bias", None) is not None


def _fused_chunk_bytes() -> int:
    try:
        from hoptune.ops.logprob import CHUNK_BYTES

        return int(CHUNK_BYTES)
    except (ImportError, AttributeError):
        return _FUSED_CHUNK_BYTES


def _nf4_bytes(numel: int, double_quant: bool, blocksize: int = 64) -> float:
    blocks = math.ceil(numel / blocksize)
    if double_quant:
        return numel / 2 + blocks + 4 * math.ceil(blocks / 256) + 4 * 256
    return numel / 2 + 4 * blocks


def _targets(shape: _Shape, target_modules: str | Sequence[str]) -> list[tuple[str, int, int, bool]]:
    from hoptune.patch import _check_spec, _matches, not_linear_error, string_target_hint

    _check_spec("target_modules", target_modules)
    if isinstance(target_modules, str) and target_modules.lower() == "all-linear":
        out = [t for t in shape.linears if t[0] != shape.head]
        if not out:
            raise ValueError(
                f"target_modules={target_modules!r} matches no linear layer: the model has no nn.Linear "
                "or Conv1D layer besides its output head"
            )
        return out
    # apply_lora's (PEFT's) rules: a string is a regular expression over the full name, a list
    # matches a name that equals an entry or ends with "." + entry
    spec = target_modules if isinstance(target_modules, str) else list(target_modules)
    layers = list(shape.linears)
    if shape.head_linear is not None and all(t[0] != shape.head_linear[0] for t in layers):
        # a tied head: its weight is the embedding's, LoRA wraps it all the same
        layers.append(shape.head_linear)
    wrong = [(n, cls) for n, cls in shape.not_linear if _matches(spec, n)]
    if wrong:  # (apply_lora refuses them)
        raise not_linear_error(target_modules, wrong)
    out = [t for t in layers if _matches(spec, t[0])]
    if not out:
        suffixes = sorted({t[0].rsplit(".", 1)[-1] for t in shape.linears})
        raise ValueError(
            f"target_modules={target_modules!r} matches no linear layer; they are named {suffixes}"
            f"{string_target_hint(spec, shape.linears[0][0] if shape.linears else '')}"
        )
    return out


# -- the estimate -----------------------------------------------------------------------------
def plan(
    config: object,
    seq: int = 2048,
    batch: int = 1,
    r: int = 16,
    *,
    target_modules: str | Sequence[str] = "all-linear",
    quantize: str | None = "nf4",
    double_quant: bool = True,
    stack: str = "hoptune",
    grad_ckpt: bool = True,
    uncheckpointed: int = 0,
    logits: str | None = None,
    optimizer: str = "adamw",
    adapter_dtype: str = "fp32",
    use_dora: bool = False,
    alternatives: bool = True,
) -> MemoryPlan:
    """Estimate the peak GPU memory of one LoRA / QLoRA training step (see the module docstring
    for every formula). ``config``: a known name (``llama-3-8b``, ``llama-3-70b``...), a
    ``config.json`` path or its folder, a dict or a transformers config. ``stack``: "hoptune"
    (fused log-probs by default) or "hf" (transformers + bitsandbytes + PEFT: full fp32 logits).
    ``logits``: "full" or "fused" (default: the stack's). ``optimizer``: "adamw",
    "paged_adamw" (state in host memory) or "none". ``uncheckpointed``: with ``grad_ckpt``, the
    last decoder layers that run without checkpointing (their activations kept, as
    ``model.uncheckpointed_layers`` in ``hoptune sft``). Returns a :class:`MemoryPlan`."""
    if stack not in ("hoptune", "hf"):
        raise ValueError(f"stack must be 'hoptune' or 'hf', got {stack!r}")
    logits_given = logits
    logits = logits or ("full" if stack == "hf" else "fused")
    if logits not in ("full", "fused"):
        raise ValueError(f"logits must be 'full' or 'fused', got {logits!r}")
    if quantize not in ("nf4", None):
        raise ValueError(f"quantize must be 'nf4' or None, got {quantize!r}")
    if optimizer not in ("adamw", "paged_adamw", "none"):
        raise ValueError(f"optimizer must be 'adamw', 'paged_adamw' or 'none', got {optimizer!r}")
    if adapter_dtype not in _DTYPE_BYTES:
        raise ValueError(f"adapter_dtype must be one of {sorted(_DTYPE_BYTES)}, got {adapter_dtype!r}")
    from hoptune.ops import _check

    sizes = {"seq": seq, "batch": batch, "r": r}
    for name, v in sizes.items():
        try:  # (a NumPy integer too, as the rest of the library takes it)
            sizes[name] = _check.integer(name, v) if not isinstance(v, bool) else 0
        except TypeError:
            sizes[name] = 0
        if sizes[name] < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    seq, batch, r = sizes["seq"], sizes["batch"], sizes["r"]
    if isinstance(uncheckpointed, bool) or not isinstance(uncheckpointed, int) or uncheckpointed < 0:
        raise ValueError(f"uncheckpointed must be an int >= 0, got {uncheckpointed!r}")

    # (a string such as "no" would be read by its truth)
    for name, v in (
        ("double_quant", double_quant),
        ("grad_ckpt", grad_ckpt),
        ("use_dora", use_dora),
        ("alternatives", alternatives),
    ):
        _check.boolean(name, v)
    if stack == "hoptune":
        from hoptune.ops.nf4_lora import MAX_RANK

        if r > MAX_RANK:  # apply_lora refuses it (PEFT, the HF stack, has no such limit)
            raise ValueError(f"r={r} is larger than hoptune's LoRA layers allow (at most {MAX_RANK})")
    cfg, label = _load_config(config)
    try:
        shape = _shape(cfg)
    except ValueError as e:
        src = os.path.expanduser(os.fspath(config)) if isinstance(config, (str, os.PathLike)) else label
        if os.path.isdir(src):
            src = os.path.join(src, "config.json")
        raise ValueError(f"{src}: {e}") from e
    if uncheckpointed and not grad_ckpt:
        raise ValueError(
            f"uncheckpointed={uncheckpointed} needs gradient checkpointing (grad_ckpt=True; hoptune plan "
            "without --no-grad-ckpt): without it no layer is checkpointed"
        )
    if uncheckpointed > shape.layers:
        raise ValueError(f"uncheckpointed={uncheckpointed}, but {label} has {shape.layers} decoder layers")
    head = shape.head_linear
    if (
        logits_given is None
        and head is not None
        and any(t[0] == head[0] for t in _targets(shape, target_modules))
    ):
        # a LoRA-wrapped head is no plain linear layer: the log-probs come from its whole logits
        # (losses.head_logprobs), estimated as the HF stack's full logits (an upper bound)
        logits = "full"
    return _estimate(
        shape, label, seq, batch, r, target_modules, quantize, double_quant, stack, grad_ckpt, logits,
        optimizer, adapter_dtype, use_dora, alternatives, uncheckpointed,
    )  # fmt: skip


def _estimate(
    shape: _Shape,
    label: str,
    seq: int,
    batch: int,
    r: int,
    target_modules,
    quantize,
    double_quant,
    stack,
    grad_ckpt,
    logits,
    optimizer,
    adapter_dtype,
    use_dora,
    alternatives,
    uncheckpointed=0,
) -> MemoryPlan:
    n = batch * seq  # tokens
    H, I, V, L = shape.hidden, shape.intermediate, shape.vocab, shape.layers  # noqa: E741
    act = 2  # bf16 compute
    ab = _DTYPE_BYTES[adapter_dtype]

    # weights
    quantized = [t for t in shape.linears if t[0] != shape.head] if quantize == "nf4" else []
    qnames = {t[0] for t in quantized}
    w_q = sum(_nf4_bytes(i * o, double_quant) for _, i, o, _ in quantized)
    w_q += sum(act * o for _, i, o, b in quantized if b)
    dense_linear = sum(i * o + (o if b else 0) for name, i, o, b in shape.linears if name not in qnames)
    w_dense = act * (dense_linear + shape.other_params)
    q_params = sum(i * o for _, i, o, _ in quantized)
    params = sum(i * o + (o if b else 0) for _, i, o, b in shape.linears) + shape.other_params

    # adapters, gradients, optimizer
    targets = _targets(shape, target_modules)
    for name, i, o, _ in targets:
        if stack == "hoptune" and r > min(i, o):  # PEFT (the HF stack) takes any rank
            raise ValueError(f"r={r} is larger than layer {name} allows ([{o}, {i}])")
    trainable = sum(r * (i + o) + (o if use_dora else 0) for _, i, o, _ in targets)
    adapters = ab * trainable
    grads = adapters
    opt_state = {"adamw": 2 * adapters, "paged_adamw": 0.0, "none": 0.0}[optimizer]
    # adapters inside the repeated decoder layers (names with a layer index, "...layers.3...")
    per_layer_targets = [t for t in targets if re.search(r"\.\d+\.", f".{t[0]}.")]
    grads_one_layer = grads * len(per_layer_targets) / max(1, len(targets)) / max(1, L)

    # activations, per token
    lora_per_layer = sum(act * r for _ in per_layer_targets) / max(1, L)
    if stack == "hf" and ab != act:  # PEFT casts x to the adapter dtype before lora_A
        lora_per_layer += sum(ab * (i + r) for _, i, _, _ in per_layer_targets) / max(1, L)
    # hoptune fuses the decoder ops by default (hoptune.fuse_decoder_ops): a fused norm keeps its
    # bf16 input and a 4-byte statistic per row, not an fp32 copy; a fused SwiGLU keeps gate and
    # up, not act(gate)
    fused_norms = stack == "hoptune" and shape.fused_norms
    norm_keep = 4 if fused_norms else 4 * H
    layer = (
        shape.pre_norms * (norm_keep + act * H)
        + shape.post_norms * 4 * H
        + (4 * (shape.q_dim + shape.kv_dim) if shape.qk_norm and not fused_norms else 0)
        + (act * 4 * shape.q_dim if shape.score_bytes else act * (3 * shape.q_dim + 2 * shape.kv_dim))
        + act * (3 if stack == "hoptune" and shape.fused_mlp else 4) * I
        + shape.score_bytes * shape.heads * seq
        + lora_per_layer
    ) * n
    final_norm = (norm_keep + act * H) * n
    u = uncheckpointed if grad_ckpt else 0
    stored = ((L - u) * act * H * n + u * layer if grad_ckpt else L * layer) + final_norm
    # logits
    if logits == "full":
        # bf16 logits + fp32 cast + fp32 log-softmax + two fp32 grads (+ the soft-cap's bf16 tanh)
        logit_peak = (16 if shape.logit_softcap else 14) * V * n
        logits_held = act * V * n  # the bf16 logits stay referenced by the output during backward
    else:
        # one fp32 chunk of logits (no larger than all of them), J (fp32) and the hidden gradient
        # made from it, per-row outputs
        logit_peak = min(_fused_chunk_bytes(), 4 * V * n) + 4 * H * n + act * H * n + 16 * n
        logits_held = 0.0
    max_w = max((i * o for name, i, o, _ in shape.linears if name != shape.head), default=0)
    transients = (6 * I + 6 * H) * n + (act * max_w if quantize else 0)  # dequantized NF4 weight

    base = w_q + w_dense + adapters + opt_state
    phases = {
        "loss": base + stored + logit_peak,
        "layer backward": base
        + stored
        + (layer if grad_ckpt and u < L else 0)
        + transients
        + logits_held
        + act * H * n
        + grads_one_layer,
        "optimizer step": base + grads * (2 if optimizer == "adamw" else 1),
    }
    peak_phase = max(phases, key=phases.get)
    peak = phases[peak_phase]
    plan_ = MemoryPlan(
        model=label,
        stack=stack,
        batch=batch,
        seq=seq,
        r=r,
        quantize=quantize,
        double_quant=double_quant,
        grad_ckpt=grad_ckpt,
        logits=logits,
        optimizer=optimizer,
        adapter_dtype=adapter_dtype,
        use_dora=use_dora,
        layers=L,
        adapted_layers=len(targets),
        params=params,
        quantized_params=q_params,
        trainable_params=trainable,
        weights_quantized=w_q,
        weights_dense=w_dense,
        adapters=adapters,
        gradients=grads,
        optimizer_state=opt_state,
        stored_activations=stored,
        layer_activations=layer,
        logits_bytes=logit_peak,
        backward_transients=transients,
        phases=phases,
        peak=peak,
        peak_phase=peak_phase,
        slack=_SLACK * peak,
        dense_other_params=shape.outside_linear,
        vocab=V,
        uncheckpointed=u,
    )
    if alternatives:
        args = [shape, label, seq, batch, r, target_modules, quantize, double_quant, stack, grad_ckpt, logits]
        rest = [optimizer, adapter_dtype, use_dora, False, u]
        alt = {}
        a = list(args)
        a[9] = not grad_ckpt
        alt["without gradient checkpointing" if grad_ckpt else "with gradient checkpointing"] = _estimate(
            *a, optimizer, adapter_dtype, use_dora, False
        ).peak
        a = list(args)
        a[10] = "full" if logits == "fused" else "fused"
        alt[f"with {a[10]} logits"] = _estimate(*a, *rest).peak
        if optimizer == "adamw":
            alt["with paged AdamW (state in host memory)"] = _estimate(
                *args, "paged_adamw", adapter_dtype, use_dora, False, u
            ).peak
        a = list(args)
        a[6] = None if quantize else "nf4"
        alt["with bf16 weights" if quantize else "with NF4 weights"] = _estimate(*a, *rest).peak
        plan_.alternatives = alt
    return plan_


# -- command line -----------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hoptune plan",
        description="GPU memory audit of a LoRA / QLoRA training step (weights, adapters, gradients, "
        "optimizer state, activations, logits), before running it.",
    )
    p.add_argument(
        "--model", required=True, help=f"one of {sorted(KNOWN_MODELS)}, or a config.json (or its folder)"
    )
    p.add_argument("--seq", type=int, default=2048, help="sequence length (default 2048)")
    p.add_argument("--batch", type=int, default=1, help="sequences per step (default 1)")
    p.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument(
        "--targets",
        default="all-linear",
        help="'all-linear' (default), layer names (q_proj,v_proj; one name, q_proj, is a list of one, "
        "as [q_proj] in a config's lora.target_modules), or a regular expression over the full names "
        "(.*\\.(q|v)_proj)",
    )
    p.add_argument("--quantize", choices=["nf4", "none"], default="nf4", help="base weights (default nf4)")
    p.add_argument("--no-double-quant", action="store_true", help="NF4 without double quantization")
    p.add_argument(
        "--stack",
        choices=["hoptune", "hf"],
        default="hoptune",
        help="model the HF stack or hoptune (default hoptune)",
    )
    p.add_argument(
        "--logits", choices=["full", "fused"], default=None, help="default: full for hf, fused for hoptune"
    )
    p.add_argument("--no-grad-ckpt", action="store_true", help="without gradient checkpointing")
    p.add_argument(
        "--uncheckpointed",
        type=int,
        default=0,
        metavar="N",
        help="with checkpointing, the last N decoder layers without it (model.uncheckpointed_layers)",
    )
    p.add_argument(
        "--optimizer",
        choices=["adamw", "paged_adamw", "none"],
        default="adamw",
        help="the optimizer whose state is counted (paged_adamw: kept in CPU memory; default adamw)",
    )
    p.add_argument(
        "--adapter-dtype",
        choices=sorted(_DTYPE_BYTES),
        default="fp32",
        help="the adapters' dtype (default fp32)",
    )
    p.add_argument("--dora", action="store_true", help="DoRA adapters")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return p


# characters that make --targets a regular expression (as a string lora.target_modules is one);
# layer names hold none of them
_REGEX_CHARS = set("*+?|()[]{}^$\\")


def main(argv: list[str] | None = None) -> int:
    """``hoptune plan ...``: prints the table (or JSON); returns the exit status."""
    args = _parser().parse_args(argv)
    targets = args.targets
    if targets.lower() != "all-linear" and not set(targets) & _REGEX_CHARS:
        targets = [t.strip() for t in targets.split(",") if t.strip()]
        if not targets:
            print(
                "hoptune plan: error: --targets must name at least one layer (or be 'all-linear'), "
                f"got {args.targets!r}",
                file=sys.stderr,
            )
            return 2
    try:
        result = plan(
            args.model,
            seq=args.seq,
            batch=args.batch,
            r=args.r,
            target_modules=targets,
            quantize=None if args.quantize == "none" else "nf4",
            double_quant=not args.no_double_quant,
            stack=args.stack,
            grad_ckpt=not args.no_grad_ckpt,
            uncheckpointed=args.uncheckpointed,
            logits=args.logits,
            optimizer=args.optimizer,
            adapter_dtype=args.adapter_dtype,
            use_dora=args.dora,
        )
    except (ValueError, TypeError) as e:
        print(f"hoptune plan: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result.as_dict(), indent=2) if args.json else result.table())
    return 0


class _CallableModule(types.ModuleType):
    """``hoptune.plan`` is both this module and the function ``plan``: once the module is imported,
    Python binds the attribute ``hoptune.plan`` to the module, so the module forwards calls to the
    function and ``hoptune.plan("llama-3-8b")`` works however it was reached."""

    def __call__(self, *args, **kwargs) -> MemoryPlan:
        return plan(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
