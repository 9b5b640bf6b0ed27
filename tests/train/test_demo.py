"""The demo pipeline end to end with a few steps (the real one: ``hoptune demo`` / ``make demo``)."""

import os

import pytest

from hoptune.models import pretrain
from hoptune.train.demo import run_demo


def test_demo_pipeline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOPTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(pretrain.RECIPE, "steps", 4)
    res = run_demo(
        str(tmp_path / "demo"), "cpu", ["train.max_steps=3", "train.eval_every=0", "output.progress=false"]
    )
    out = capsys.readouterr().out
    assert "exact-match accuracy" in out and "held-out addition questions (30)" in out
    assert os.path.isfile(os.path.join(res["adapter"], "adapter_model.safetensors"))
    assert set(res["before"]) == set(res["after"]) == {"held", "train", "minus"}
    # the pretrained base is cached: a second load does not pretrain again
    assert (
        os.listdir(tmp_path / "cache")
        and pretrain.pretrained_tiny_path(log=print) == pretrain.tiny_cache_dir()
    )
    assert "pretraining" not in capsys.readouterr().out


def test_tiny_model_and_tokenizer_are_deterministic():
    import torch

    from hoptune.models import TINY_CONFIG, build_model, build_tokenizer

    a, b = build_tokenizer(), build_tokenizer()
    assert a.get_vocab() == b.get_vocab() and a.chat_template == b.chat_template
    text = "What is 3+4? The answer: 7.\n"
    ids = a(text)["input_ids"]
    assert ids[0] == a.bos_token_id and a.decode(ids[1:]) == text
    assert max(a.get_vocab().values()) < TINY_CONFIG["vocab_size"]
    m1, m2 = build_model(seed=3), build_model(seed=3)
    for (n, p), (_, q) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(p, q), n
    # every linear layer can be stored in NF4 (blocks of 64)
    assert all(mod.weight.numel() % 64 == 0 for mod in m1.modules() if isinstance(mod, torch.nn.Linear))


def test_pretrained_cache_written_meanwhile_by_another_process(tmp_path, monkeypatch):
    """Two processes pretraining at once: when the other one's folder lands just before this one's
    rename, that rename fails on the non-empty folder, and the finished copy is used."""
    monkeypatch.setenv("HOPTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(pretrain.RECIPE, "steps", 2)
    final = pretrain.tiny_cache_dir()
    real_replace = os.replace

    def other_process_first(src, dst):
        if dst == final and not os.path.exists(final):
            os.makedirs(final)
            with open(os.path.join(final, "config.json"), "w") as f:
                f.write("{}")  # the other process's finished copy
        return real_replace(src, dst)

    monkeypatch.setattr(pretrain.os, "replace", other_process_first)
    assert pretrain.pretrained_tiny_path(log=lambda s: None, progress=False) == final
    assert os.listdir(final) == ["config.json"]  # (left as the other process wrote it)
    assert not [n for n in os.listdir(os.path.dirname(final)) if n.startswith(".tmp-")]


def test_demo_paths_are_read_as_written(tmp_path, monkeypatch):
    """An output folder whose name YAML would read otherwise (a comment, a mapping)."""
    import hoptune.config

    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    seen = []
    real_load = hoptune.config.load_config
    monkeypatch.setattr(
        hoptune.config, "load_config", lambda *a, **k: seen.append(real_load(*a, **k)) or seen[-1]
    )
    monkeypatch.setattr(pretrain, "pretrained_tiny_path", stop)
    out = tmp_path / "exp #2: r=8"
    with pytest.raises(Stop):
        run_demo(str(out), "cpu")
    (cfg,) = seen
    assert cfg.data.train == str(out / "data" / "train.jsonl") and cfg.output.dir == str(out / "sft")


@pytest.mark.parametrize(
    "overrides",
    [["model.quantize=null"], ["model.quantize=null", "lora.enabled=false"]],
    ids=["lora", "full-fine-tuning"],
)
def test_demo_evaluates_the_model_it_trained(tmp_path, monkeypatch, capsys, overrides):
    """Without NF4 the scores are those of the dense base and of what was trained over it."""
    import hoptune.adapters
    import hoptune.patch

    monkeypatch.setenv("HOPTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(pretrain.RECIPE, "steps", 2)
    quantize = []
    for mod, name in ((hoptune.patch, "apply_lora"), (hoptune.adapters, "load_adapter")):
        real = getattr(mod, name)

        def spy(*a, _real=real, **k):
            quantize.append(k.get("quantize"))
            return _real(*a, **k)

        monkeypatch.setattr(mod, name, spy)
    res = run_demo(
        str(tmp_path / "demo"),
        "cpu",
        ["train.max_steps=1", "train.eval_every=0", "output.progress=false", *overrides],
    )
    assert quantize and not any(quantize)
    assert set(res["after"]) == {"held", "train", "minus"}
    assert "base (NF4)" not in capsys.readouterr().out
