"""The snippets, commands and config keys of README.md and docs/*.md, run against the code on a
CPU (a tiny checkpoint stands in for the 8B folders the docs name)."""

from __future__ import annotations

import json
import os
import re
import shlex

import pytest
import torch

import hoptune
from hoptune.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the user-facing docs (KERNELS.md holds kernel notes and benchmark tables, no commands to run)
DOCS = ["README.md", *(f"docs/{n}" for n in ("ARCHITECTURE.md", "INTEGRATION.md", "TRAINING.md"))]
FENCE = re.compile(r"```[a-z]*\n(.*?)```", re.S)


def _read(doc: str) -> str:
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        return f.read()


def _code_block(doc: str, heading: str) -> str:
    """The first fenced block after ``heading`` in ``doc``."""
    text = _read(doc)
    assert heading in text, f"{doc} has no heading {heading!r}"
    m = FENCE.search(text, text.index(heading))
    assert m is not None, f"{doc}: no code block after {heading!r}"
    return m.group(1)


def _command_lines(prefix: str) -> list[tuple[str, list[str]]]:
    """(doc, argv after ``prefix``) of every line of a fenced block that starts with ``prefix``."""
    found = []
    for doc in DOCS:
        for block in FENCE.findall(_read(doc)):
            for line in block.splitlines():
                if line.startswith(prefix + " "):
                    found.append((doc, shlex.split(line[len(prefix) :], comments=True)))
    return found


@pytest.fixture
def checkpoint(tmp_path):
    """A small Llama checkpoint folder (bf16, every linear layer a multiple of 64 wide)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    folder = str(tmp_path / "ckpt")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def _checkpointing_as_transformers_4(monkeypatch) -> None:
    """``gradient_checkpointing_enable`` as transformers 4.x has it:
    reentrant unless told otherwise, and no gradient hook on the input embeddings (transformers 5
    adds one for every model; 4.x only for a model holding PEFT adapters)."""
    from transformers import PreTrainedModel

    if not hasattr(PreTrainedModel, "activation_checkpointing_enable"):
        return  # transformers 4.x: its own method already behaves so

    def enable(self, gradient_checkpointing_kwargs=None):
        kwargs = gradient_checkpointing_kwargs
        self.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": True} if kwargs is None else kwargs
        )
        self.disable_input_require_grads()

    monkeypatch.setattr(PreTrainedModel, "gradient_checkpointing_enable", enable)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_integration_training_snippet_trains_every_adapter(checkpoint, tmp_path, monkeypatch):
    # with transformers 4's reentrant default the snippet's loss.backward() failed ("element 0
    # of tensors does not require grad"): the frozen embedding left the checkpointed layers
    # without gradients
    _checkpointing_as_transformers_4(monkeypatch)
    code = _code_block("docs/INTEGRATION.md", "## Load, patch, train, save")
    code = code.replace('"/ckpt/Meta-Llama-3-8B"', repr(checkpoint))
    code = code.replace('device="cuda"', 'device="cpu", progress=False')
    code = code.replace('"out/adapter"', repr(str(tmp_path / "adapter")))
    # one step of an ordinary loop (which puts the model in training mode: checkpointing runs there)
    batch = "x = torch.randint(0, 256, (2, 16))"
    step = f"model.train(); {batch}; model(input_ids=x, labels=x).loss.backward()"
    code, n = re.subn(r"^\.\.\. .*$", step, code, flags=re.M)
    assert n == 1, "the snippet's '...' training loop line moved"
    scope: dict = {}
    exec(compile(code, "docs/INTEGRATION.md", "exec"), scope)
    model = scope["model"]
    grads = {n: p.grad for n, p in model.named_parameters() if n.endswith("lora_B")}
    assert len(grads) == 2 * 7
    no_grad = [n for n, g in grads.items() if g is None or not g.abs().sum() > 0]
    assert not no_grad, f"adapters without a gradient: {no_grad}"
    saved = sorted(os.listdir(tmp_path / "adapter"))
    assert saved == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_readme_qlora_snippet_saves_and_merges(checkpoint, tmp_path):
    from hoptune.nn import LoRALinear, NF4Linear

    code = _code_block("README.md", "### Fine-tune a local checkpoint with QLoRA")
    code = code.replace('"/ckpt/Meta-Llama-3-8B"', repr(checkpoint))
    code = code.replace('device="cuda"', 'device="cpu", progress=False')
    code = code.replace('"out/adapter"', repr(str(tmp_path / "adapter")))
    # in place of the loop: trained-looking adapters (B != 0), and the adapted model's logits
    step = (
        '[p.data.normal_(0, 0.05) for n, p in model.named_parameters() if n.endswith("lora_B")]; '
        "x = torch.randint(0, 256, (2, 16)); adapted = model(input_ids=x).logits.float()"
    )
    code, n = re.subn(r"^\.\.\. .*$", step, code, flags=re.M)
    assert n == 1, "the snippet's '...' training loop line moved"
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    merged, x, adapted = scope["merged"], scope["x"], scope["adapted"]
    kinds = {type(m).__name__ for m in merged.modules() if isinstance(m, (LoRALinear, NF4Linear))}
    assert not kinds, f"merge_and_unload left {kinds} in the model"
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        out = merged(input_ids=x).logits.float()
    assert (out - adapted).abs().max() < 0.05 * adapted.abs().max()
    # the saved adapter on a fresh NF4 base computes the adapted model
    fresh = hoptune.load_model(checkpoint, quantize="nf4", device="cpu", progress=False)
    hoptune.load_adapter(fresh, str(tmp_path / "adapter"))
    with torch.no_grad():
        assert torch.allclose(fresh(input_ids=x).logits.float(), adapted, atol=1e-5, rtol=1e-5)


def test_readme_nf4_snippet_round_trips_through_the_bnb_keys():
    from hoptune.quant import dequantize_nf4, from_bnb_state_dict

    code = _code_block("README.md", "### NF4, bit-compatible with bitsandbytes")
    w = torch.randn(128, 256, dtype=torch.bfloat16) * 0.05
    scope = {"w": w}
    exec(compile(code, "README.md", "exec"), scope)
    key = "model.layers.0.self_attn.q_proj.weight"
    suffixes = {k[len(key) :] for k in scope["sd"]}
    # the keys docs/FORMATS.md lists for a double-quantized weight
    assert suffixes == {
        "",
        ".absmax",
        ".quant_map",
        ".nested_absmax",
        ".nested_quant_map",
        ".quant_state.bitsandbytes__nf4",
    }
    w_hat = scope["w_hat"]
    assert w_hat.shape == w.shape and w_hat.dtype == w.dtype
    assert torch.equal(dequantize_nf4(from_bnb_state_dict(scope["sd"], key)), w_hat)
    assert 0 < (w_hat.float() - w.float()).abs().max() < 0.05


def test_plan_commands_in_docs_run(tmp_path, capsys):
    # the Qwen2.5-7B config.json the docs point at, with its public shape
    qwen = tmp_path / "config.json"
    qwen.write_text(
        json.dumps(
            dict(
                architectures=["Qwen2ForCausalLM"],
                model_type="qwen2",
                hidden_size=3584,
                intermediate_size=18944,
                num_hidden_layers=28,
                num_attention_heads=28,
                num_key_value_heads=4,
                vocab_size=152064,
                tie_word_embeddings=False,
            )
        )
    )
    commands = _command_lines("hoptune plan") + _command_lines("python -m hoptune.plan")
    assert len(commands) >= 4
    for doc, argv in commands:
        argv = [str(qwen) if a == "/ckpt/Qwen2.5-7B/config.json" else a for a in argv]
        assert main(["plan", *argv]) == 0, f"{doc}: hoptune plan {shlex.join(argv)}"
        out = capsys.readouterr().out
        assert ("peak" in out) if "--json" in argv else ("<- peak" in out), out
    # the Python form INTEGRATION.md gives
    result = hoptune.plan("llama-3-8b", seq=2048, batch=2)
    assert "<- peak" in str(result) and result.peak > 0


def test_sft_commands_in_docs_resolve_their_config(monkeypatch, capsys):
    # from the repository root, where the README's paths to the shipped configs hold
    monkeypatch.chdir(ROOT)
    commands = [(d, a) for d, a in _command_lines("hoptune sft") if not a[0].startswith("CONFIG")]
    assert len(commands) >= 2
    for doc, argv in commands:
        args = argv if "--print-config" in argv else [*argv, "--print-config"]
        assert main(["sft", *args]) == 0, f"{doc}: hoptune sft {shlex.join(argv)}"
        printed = capsys.readouterr().out
        for override in (a for a in argv if "=" in a):
            key, value = override.split("=", 1)
            section, leaf = key.split(".")
            assert f"{section}:\n" in printed and f"  {leaf}: {value}\n" in printed, (doc, override)


def test_config_keys_named_in_docs_exist():
    from hoptune.config import SFTConfig, _all_keys

    keys = set(_all_keys(SFTConfig))
    # a file name, and the unknown key TRAINING.md shows the error of
    not_keys = {"model.safetensors", "train.learning_rate"}
    key = re.compile(r"(?<![\w./-])((?:model|lora|data|train|output)\.[a-z_]+)(?=$|[=\s,])")
    named = set()
    for doc in DOCS:
        prose = FENCE.sub("", _read(doc))
        for span in re.findall(r"`([^`\n]+)`", prose):
            named.update((doc, m.group(1)) for m in key.finditer(span))
    assert len(named) > 30
    unknown = sorted((doc, k) for doc, k in named if k not in keys and k not in not_keys)
    assert not unknown, f"config keys the docs name that config.py does not have: {unknown}"


def test_training_demo_adapter_snippet_runs(tmp_path, monkeypatch, capsys):
    """TRAINING.md's Python lines for the demo's adapter (the trained adapter and its base stand in:
    a fresh adapter over the built-in model's random initialisation), and the generation config
    they rely on: generate() stops at <|end|>, which ends each chat turn, as well as at </s>."""
    import hoptune.models as models
    from hoptune.models import build_model, build_tokenizer

    tok = build_tokenizer()
    assert build_model().generation_config.eos_token_id == [
        tok.eos_token_id,
        tok.convert_tokens_to_ids("<|end|>"),
    ]
    base = build_model()
    hoptune.apply_lora(base, r=4, target_modules="all-linear")
    hoptune.save_adapter(base, tmp_path / "adapter")
    monkeypatch.setattr(models, "load_tiny", lambda: (build_model(), build_tokenizer()))
    code = _code_block("docs/TRAINING.md", "The demo's adapter in Python")
    assert '"runs/demo/sft/adapter"' in code
    exec(code.replace('"runs/demo/sft/adapter"', repr(str(tmp_path / "adapter"))), {})
    assert capsys.readouterr().out.endswith("\n")  # (its print ran: a random model answers anything)
