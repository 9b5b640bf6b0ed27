"""The demo pipeline end to end with a few steps (the real one: ``hoptune demo`` / ``make demo``)."""

import os

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
