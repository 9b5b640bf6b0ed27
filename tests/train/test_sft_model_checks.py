"""The recipe's checks of the model a config names (or a caller passes): what cannot train, or
cannot run on this data or machine, is a config error before the first step, not a broken output
or a bare traceback."""

import os

import pytest
import torch

from hoptune.config import ConfigError
from hoptune.models.tiny import build_model
from hoptune.train import sft
from tests.conftest import SMALL

from .conftest import small_config

FLASH = "model.attn_implementation=flash_attention_2"


def _folder_config(tmp_path, data, base, *overrides):
    return small_config(tmp_path, data, f"model.path={base}", "train.max_steps=1", *overrides)


def test_full_finetuning_of_an_nf4_checkpoint_is_refused(tmp_path, tokenizer, demo_data):
    # a pre-quantized (bitsandbytes NF4) checkpoint loads as stored, with model.quantize=null too:
    # lora.enabled=false trained its embeddings, norms and head alone, and wrote a model/ without
    # any of its linear weights, which no loader reads
    from hoptune.quant.checkpoint import save_pretrained_nf4

    base = tmp_path / "base-nf4"
    save_pretrained_nf4(build_model(seed=0, **SMALL), base)
    tokenizer.save_pretrained(base)
    cfg = _folder_config(tmp_path, demo_data, base, "lora.enabled=false", "model.quantize=null")
    with pytest.raises(ConfigError, match=r"lora.enabled=false .*NF4.*lora.enabled=true"):
        sft.train(cfg, log=lambda s: None)
    assert not os.path.exists(cfg.output.dir)


@pytest.mark.parametrize("where", ["checkpoint", "tiny"])
def test_an_attention_implementation_not_installed_is_a_config_error(
    tmp_path, tokenizer, demo_data, monkeypatch, where
):
    # transformers raises ImportError for flash_attention_2 without its package: `hoptune sft`
    # ended in a traceback instead of the one-line error naming the key
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available():
        pytest.skip("flash-attn is installed here")
    if where == "tiny":
        import hoptune.models

        tiny = build_model(seed=0, **SMALL)
        monkeypatch.setattr(hoptune.models, "load_tiny", lambda **k: (tiny, tokenizer))
        cfg = small_config(tmp_path, demo_data, FLASH)
    else:
        base = tmp_path / "base"
        build_model(seed=0, **SMALL).save_pretrained(base)
        tokenizer.save_pretrained(base)
        cfg = _folder_config(tmp_path, demo_data, base, FLASH)
    with pytest.raises(ConfigError, match=r"model.attn_implementation='flash_attention_2': .*sdpa"):
        sft.load_base_model(cfg, torch.device("cpu"), torch.float32)


def test_token_ids_beyond_the_embedding_are_a_config_error(tmp_path, tokenizer, demo_data, capsys):
    # a tokenizer with more tokens than the model has embedding rows (tokens added, the model not
    # resized): the first step failed with a bare "IndexError: index out of range in self" (on a
    # GPU, a device-side assert)
    from hoptune.cli import main

    base = tmp_path / "base"
    build_model(seed=0, vocab_size=64, **SMALL).save_pretrained(base)
    tokenizer.save_pretrained(base)
    cfg = _folder_config(tmp_path, demo_data, base)
    beyond = r"model.path=.*token id (6[4-9]|[7-9]\d)\b.* has 64 rows"
    with pytest.raises(ConfigError, match=beyond):
        sft.train(cfg, log=lambda s: None)
    assert not os.path.exists(cfg.output.dir)

    # `hoptune sft`: one line, exit status 2
    yaml = tmp_path / "sft.yaml"
    yaml.write_text("train:\n  max_steps: 1\n  batch_size: 2\n  grad_accum: 1\n")
    args = [f"model.path={base}", f"data.train={demo_data['train']}", "model.quantize=null"]
    args += ["model.device=cpu", f"output.dir={tmp_path / 'cli'}", "output.progress=false"]
    assert main(["sft", str(yaml), *args]) == 2
    assert "embedding has 64 rows" in capsys.readouterr().err

    # the data's ids fit, a pad token added to the tokenizer does not
    model = build_model(seed=0, vocab_size=len(tokenizer), **SMALL)
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    assert tokenizer.pad_token_id == model.config.vocab_size
    pad = rf"passed in: .*pad token id {tokenizer.pad_token_id}\b.* has {len(tokenizer) - 1} rows"
    with pytest.raises(ConfigError, match=pad):
        cfg = small_config(tmp_path, demo_data)
        sft.train(cfg, log=lambda s: None, model=model, tokenizer=tokenizer)


def test_a_model_passed_in_on_another_device_is_a_config_error(tmp_path, tokenizer, demo_data):
    # sft.train does not move a model it is given: one on another device than model.device (a CPU
    # model on a GPU machine, model.device=auto) failed at the first forward with torch's device
    # mismatch; a meta model stands in here for one on another device
    cfg = small_config(tmp_path, demo_data, "model.device=cpu")
    with torch.device("meta"):
        model = build_model(seed=0, **SMALL)
    with pytest.raises(ConfigError, match=r"the model passed in is on meta, but model.device=cpu"):
        sft.train(cfg, log=lambda s: None, model=model, tokenizer=tokenizer)
    assert not os.path.exists(cfg.output.dir)


def test_a_model_passed_in_with_frozen_adapters_says_so(tmp_path, tokenizer, demo_data):
    # an adapter loaded to run (load_adapter's default trainable=False) leaves nothing to train:
    # the error said "apply_lora (or lora.enabled=false) must leave some", the wrong way round
    import hoptune

    model = build_model(seed=0, **SMALL)
    hoptune.apply_lora(model, r=4)
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = small_config(tmp_path, demo_data)
    with pytest.raises(ConfigError, match=r"passed in has LoRA layers, all frozen.*trainable=True"):
        sft.train(cfg, log=lambda s: None, model=model, tokenizer=tokenizer)
    assert not os.path.exists(cfg.output.dir)


def test_training_a_loaded_adapter_keeps_its_base_and_revision(tmp_path, tokenizer, demo_data):
    # an adapter loaded with load_adapter(trainable=True) and trained on with model.path left at the
    # built-in model: its final adapter_config named the model's config._name_or_path (here
    # a local folder) instead of the loaded base, and dropped its revision; PEFT keeps both
    import json

    import hoptune

    base = tmp_path / "base"
    build_model(seed=0, **SMALL).save_pretrained(base)
    first = hoptune.apply_lora(build_model(seed=0, **SMALL), r=4, init_lora_weights=False)
    loaded = {"base_model_name_or_path": "org/base", "revision": "abc123"}
    hoptune.save_adapter(first, tmp_path / "a0", **loaded)
    model = build_model(seed=0, **SMALL)
    model.config._name_or_path = str(base)
    hoptune.load_adapter(model, tmp_path / "a0", trainable=True)
    cfg = small_config(tmp_path, demo_data, "train.max_steps=1")
    res = sft.train(cfg, log=lambda s: None, model=model, tokenizer=tokenizer)
    with open(os.path.join(res.output_dir, "adapter_config.json")) as f:
        saved = json.load(f)
    assert {k: saved[k] for k in loaded} == loaded


def test_a_model_without_activation_checkpointing_names_the_setting_to_change(tmp_path, tokenizer, demo_data):
    """transformers' models that do not support activation checkpointing (OpenAI GPT, CTRL, XLNet,
    CPM-Ant...) refuse it: with model.gradient_checkpointing=true (the default) the run's error blamed
    model.uncheckpointed_layers=0, a setting that cannot help, and came after the adapters were put
    in the model passed in. It names model.gradient_checkpointing, before the model changes; with it
    off the model trains."""
    import transformers

    from hoptune.patch import lora_layers

    torch.manual_seed(0)
    config = transformers.OpenAIGPTConfig(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=128)
    model = transformers.OpenAIGPTLMHeadModel(config)
    cfg = small_config(tmp_path, demo_data, "train.max_steps=1", "model.gradient_checkpointing=true")
    with pytest.raises(
        ConfigError, match=r"model\.gradient_checkpointing=true.*set model\.gradient_checkpointing=false"
    ) as e:
        sft.train(cfg, log=lambda s: None, model=model, tokenizer=tokenizer)
    assert "uncheckpointed_layers" not in str(e.value)
    assert not lora_layers(model)
    res = sft.train(
        small_config(tmp_path / "off", demo_data, "train.max_steps=1"),
        log=lambda s: None,
        model=model,
        tokenizer=tokenizer,
    )
    assert len(res.train_losses) == 1
