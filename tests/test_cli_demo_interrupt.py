"""An interrupted ``hoptune demo`` says what the same command does next (it said only
'interrupted'): its config writes no checkpoint and starts over."""

import os

from hoptune.cli import main
from hoptune.models import pretrain


def _last_err_line(capsys) -> str:
    return capsys.readouterr().err.rstrip("\n").split("\n")[-1]


def test_an_interrupted_demo_starts_over(tmp_path, monkeypatch, capsys):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain, "pretrained_tiny_path", interrupt)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--device", "cpu"]) == 130
    assert _last_err_line(capsys) == (
        "hoptune demo: interrupted; no checkpoint was written (train.save_every=0); the same "
        "command starts the demo over"
    )


def test_an_interrupted_demo_names_its_checkpoint(tmp_path, monkeypatch, capsys):
    """train.save_every>0: the same command still starts over (output.resume=false), and
    output.resume=auto continues from the checkpoint the message names."""
    from hoptune.train import loop

    monkeypatch.setenv("HOPTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(pretrain.RECIPE, "steps", 4)
    save = loop.Checkpointer.save

    def save_then_interrupt(self, *a, **k):
        save(self, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop.Checkpointer, "save", save_then_interrupt)
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--device", "cpu", "train.max_steps=3", "train.save_every=1"]
    args += ["train.eval_every=0", "output.progress=false", "output.plots=false"]
    assert main(args) == 130
    ckpt = os.path.join(out, "sft", "checkpoints", "step-00000001")
    assert _last_err_line(capsys) == (
        "hoptune demo: interrupted; the same command starts the demo over; run it with "
        f"output.resume=auto to continue from the newest checkpoint, {ckpt}"
    )
    monkeypatch.setattr(loop.Checkpointer, "save", save)
    assert main([*args, "output.resume=auto"]) == 0
    assert f"resumed from {ckpt} at step 1" in capsys.readouterr().out


def test_an_interrupted_demo_that_resumes_and_kept_no_checkpoint(tmp_path, monkeypatch, capsys):
    """output.resume=auto, Ctrl-C once the adapter is saved: without a checkpoint the same command
    refuses the folder (it does not start over), and the message says so."""
    from hoptune.train import demo

    monkeypatch.setenv("HOPTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(pretrain.RECIPE, "steps", 4)
    tiny_model = demo._tiny_model

    def interrupt_after_training(cfg, device, dtype, trained=None):
        if trained is not None:
            raise KeyboardInterrupt
        return tiny_model(cfg, device, dtype)

    monkeypatch.setattr(demo, "_tiny_model", interrupt_after_training)
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--device", "cpu", "train.max_steps=2", "output.resume=auto"]
    args += ["train.eval_every=0", "output.progress=false", "output.plots=false"]
    assert main(args) == 130
    assert _last_err_line(capsys) == (
        f"hoptune demo: interrupted; training had finished: {out / 'sft' / 'adapter'} is saved "
        "whole; no checkpoint was kept (train.save_every=0), so the same command refuses that "
        "folder: give the demo another output.dir"
    )
    assert main(args) == 2
    assert "holds the adapter/ of an earlier run and no checkpoint" in _last_err_line(capsys)
