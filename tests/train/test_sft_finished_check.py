"""What a rerun in a run folder does with what an earlier run left there: an adapter whose save was
killed half-way, and an output.resume that names the run rather than one of its checkpoints."""

import os

import pytest

from hoptune.config import ConfigError
from hoptune.models.tiny import build_model
from hoptune.train import loop, sft
from tests.conftest import SMALL

from .conftest import small_config


def _train(cfg, tokenizer):
    model = build_model(seed=0, **SMALL)
    return sft.train(cfg, log=lambda s: None, model=model, tokenizer=tokenizer)


def test_an_adapter_save_killed_before_its_config_is_not_a_finished_run(
    tmp_path, tokenizer, demo_data, monkeypatch
):
    # save_adapter moves the weights in, then the config: a kill between the two leaves weights that
    # no reader loads. With train.save_every=0 a rerun was refused as if the run had finished
    cfg = small_config(tmp_path, demo_data, "train.max_steps=2")
    real_replace = os.replace

    def killed(src, dst, *a, **k):
        if os.path.basename(dst) == "adapter_config.json":
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        _train(cfg, tokenizer)
    monkeypatch.setattr(os, "replace", real_replace)
    adapter = os.path.join(cfg.output.dir, "adapter")
    names = os.listdir(adapter)  # (the tokenizer, saved first, and the weights)
    assert "adapter_model.safetensors" in names and "tokenizer_config.json" in names
    assert "adapter_config.json" not in names
    killed_weights = open(os.path.join(adapter, "adapter_model.safetensors"), "rb").read()

    res = _train(cfg, tokenizer)  # the same command: the run again, then a whole adapter
    assert os.path.isfile(os.path.join(res.output_dir, "adapter_config.json"))
    weights = os.path.join(res.output_dir, "adapter_model.safetensors")
    assert open(weights, "rb").read() == killed_weights
    assert len(res.train_losses) == 2
    # a whole adapter is a finished run: still refused
    with pytest.raises(ConfigError, match="holds the adapter/ of an earlier run"):
        _train(cfg, tokenizer)


_NO_DATA = {"train": "t.jsonl", "eval": "e.jsonl"}  # (the resume check comes before the data)


@pytest.mark.parametrize("given", ["run", "checkpoints", "latest"])
def test_resume_from_a_run_folder_names_its_checkpoints(tmp_path, given):
    # output.resume=<the run folder> (or its checkpoints/, or the `latest` pointer file) said only
    # "is not a checkpoint folder", without the folder to give instead
    run = tmp_path / "old"
    step = run / "checkpoints" / "step-00000004"
    step.mkdir(parents=True)
    (step / loop.STATE_FILE).write_bytes(b"x")
    (run / "checkpoints" / loop.LATEST).write_text("step-00000004")
    ckpts = run / "checkpoints"
    path = {"run": run, "checkpoints": ckpts, "latest": ckpts / loop.LATEST}
    cfg = small_config(tmp_path, _NO_DATA, f"output.resume={path[given]}")
    with pytest.raises(ConfigError) as e:
        sft._resume_folder(cfg, loop.Checkpointer(cfg.output.dir))
    msg = str(e.value)
    assert "is not a checkpoint folder" in msg
    assert f"output.resume={step}" in msg, msg


def test_resume_from_a_folder_without_checkpoints_says_what_one_is(tmp_path):
    cfg = small_config(tmp_path, _NO_DATA, f"output.resume={tmp_path}")
    with pytest.raises(ConfigError) as e:
        sft._resume_folder(cfg, loop.Checkpointer(cfg.output.dir))
    assert "checkpoints/step-N" in str(e.value) and "output.resume=auto" in str(e.value)


def test_a_run_killed_while_its_tokenizer_is_saved_is_not_finished(
    tmp_path, tokenizer, demo_data, monkeypatch
):
    # the adapter went in first, the tokenizer beside it after: a kill in between left a whole adapter,
    # a "finished" run whose rerun was refused, and no tokenizer beside the adapter
    cfg = small_config(tmp_path, demo_data, "train.max_steps=2")
    real = sft._save_tokenizer_beside

    def killed(*a, **k):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(sft, "_save_tokenizer_beside", killed)
    with pytest.raises(KeyboardInterrupt):
        _train(cfg, tokenizer)
    assert loop.saved_output(cfg.output.dir) is None
    monkeypatch.setattr(sft, "_save_tokenizer_beside", real)
    res = _train(cfg, tokenizer)  # the same command: the run again, then the whole output
    names = os.listdir(res.output_dir)
    assert "adapter_config.json" in names and "tokenizer_config.json" in names
