"""The recipe end to end on a checkpoint folder: NF4 on load (QLoRA), packing, eval split, replay,
gradient checkpointing, checkpoints, metrics, plots, and an adapter PEFT can load."""

import json
import os

import pytest
import torch

from hoptune.cli import main
from hoptune.models.tiny import build_model
from hoptune.train import loop, sft
from tests.conftest import SMALL

from .conftest import small_config


@pytest.fixture
def checkpoint(tmp_path, small_model, tokenizer):
    path = tmp_path / "base"
    small_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_sft_cli_end_to_end(tmp_path, checkpoint, demo_data, capsys):
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(
        "# hoptune sft sft.yaml\n"
        f"model:\n  path: {checkpoint}\n  quantize: nf4\n  gradient_checkpointing: true\n  device: cpu\n"
        "lora:\n  r: 4\n  alpha: 8\n"
        f"data:\n  train: {demo_data['train']}\n  eval_fraction: 0.2\n  packing: true\n  max_seq_len: 64\n"
        f"  general_data: {demo_data['general']}\n  general_fraction: 0.1\n"
        "train:\n  max_steps: 4\n  batch_size: 2\n  grad_accum: 2\n  save_every: 2\n  eval_every: 2\n  lr: 1.0e-3\n"
        f"output:\n  dir: {tmp_path / 'run'}\n  progress: false\n"
    )
    assert main(["sft", str(cfg), "train.warmup_steps=1"]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "run"
    assert "done in" in out and str(run / "adapter") in out
    assert "packing:" in out and "replay:" in out

    recs = loop.read_metrics(run / "metrics.jsonl")
    train = [r for r in recs if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 and r["loss_tokens"] > 0 for r in train)
    assert [r["step"] for r in recs if r["split"] == "eval"] == [2, 4]
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step-00000002", "step-00000004"]
    assert os.path.isfile(run / "plots" / "loss.png")

    # PEFT reads the adapter; on the same dequantized base it computes what hoptune computes
    from peft import PeftModel

    from hoptune.adapters import load_adapter
    from hoptune.loading import load_model

    with open(run / "adapter" / "adapter_config.json") as f:
        assert json.load(f)["r"] == 4
    ours = load_model(checkpoint, quantize="nf4", device="cpu", dtype=torch.float32, progress=False)
    load_adapter(ours, run / "adapter")
    x = torch.randint(10, 60, (2, 12))
    y_ours = ours(input_ids=x).logits
    from hoptune.patch import merge_and_unload

    dense = merge_and_unload(
        load_model(checkpoint, quantize="nf4", device="cpu", dtype=torch.float32, progress=False),
        dtype=torch.float32,
    )
    peft = PeftModel.from_pretrained(dense, run / "adapter")
    torch.testing.assert_close(peft(input_ids=x).logits, y_ours, atol=1e-4, rtol=1e-4)
    assert SMALL["hidden_size"] == ours.config.hidden_size


def test_full_finetuning(tmp_path, checkpoint, demo_data):
    from hoptune.config import load_config
    from hoptune.train import sft

    cfg = load_config(
        None,
        [
            f"model.path={checkpoint}",
            "model.quantize=null",
            "model.device=cpu",
            "lora.enabled=false",
            f"data.train={demo_data['train']}",
            "train.max_steps=2",
            "train.save_every=1",
            "train.batch_size=2",
            "train.grad_accum=1",
            f"output.dir={tmp_path / 'full'}",
            "output.progress=false",
            "output.plots=false",
        ],
    )
    res = sft.train(cfg, log=lambda s: None)
    assert os.path.isfile(os.path.join(res.output_dir, "config.json"))
    assert os.path.isfile(os.path.join(res.run_dir, "checkpoints", "step-00000002", "model.safetensors"))


def test_adapter_is_saved_before_the_final_eval(tmp_path, tokenizer, demo_data, monkeypatch):
    cfg = small_config(tmp_path, demo_data, "train.max_steps=2")

    def eval_fails(*a, **k):
        raise RuntimeError("out of memory in the eval")

    monkeypatch.setattr(loop, "evaluate_nll", eval_fails)
    with pytest.raises(RuntimeError, match="out of memory"):
        sft.train(cfg, log=lambda s: None, model=build_model(seed=0, **SMALL), tokenizer=tokenizer)
    assert os.path.isfile(os.path.join(cfg.output.dir, "adapter", "adapter_model.safetensors"))


def test_loop_runs_with_the_setup_frozen_and_gives_it_back(tmp_path, tokenizer, demo_data, monkeypatch):
    """The objects alive before the loop are frozen out of the collector's collections while it
    runs and the collector collects only between steps (loop.LoopGc); all is given back after the
    loop, on a failure too."""
    import gc

    seen = []
    step = sft.sft_step

    def counting_step(*a, **k):
        seen.append(gc.get_freeze_count() if not gc.isenabled() else -1)
        if len(seen) == 3:
            raise RuntimeError("stop here")
        return step(*a, **k)

    monkeypatch.setattr(sft, "sft_step", counting_step)
    cfg = small_config(tmp_path, demo_data, "train.max_steps=2")
    sft.train(cfg, log=lambda s: None, model=build_model(seed=0, **SMALL), tokenizer=tokenizer)
    assert len(seen) == 2 and all(n > 0 for n in seen)
    assert gc.get_freeze_count() == 0 and gc.isenabled()
    cfg = small_config(tmp_path / "again", demo_data, "train.max_steps=4")
    with pytest.raises(RuntimeError, match="stop here"):
        sft.train(cfg, log=lambda s: None, model=build_model(seed=0, **SMALL), tokenizer=tokenizer)
    assert gc.get_freeze_count() == 0 and gc.isenabled()


def test_epochs_cover_each_row_once(tmp_path, tokenizer, demo_data, monkeypatch):
    """train.epochs=1 over 70 rows, 8 rows a step: 9 steps, the last one the 6 rows left over, and
    the run ends exactly at epoch 1 (no step spills into the next epoch)."""
    events = []

    class Bar(loop.Progress):
        def __init__(self, *a, **k):
            events.append("progress bar")
            super().__init__(*a, **{**k, "enabled": False})

    monkeypatch.setattr(loop, "Progress", Bar)
    cfg = small_config(tmp_path, demo_data, "train.max_steps=0", "train.epochs=1", "data.eval=null")
    res = sft.train(cfg, log=events.append, model=build_model(seed=0, **SMALL), tokenizer=tokenizer)
    assert res.steps == 9
    train = [
        r for r in loop.read_metrics(os.path.join(res.run_dir, "metrics.jsonl")) if r["split"] == "train"
    ]
    assert train[-1]["epoch"] == 1.0 and train[-2]["epoch"] == 64 / 70
    # the "training: ..." line comes before the bar, not printed onto the bar's line
    first = next(i for i, e in enumerate(events) if e.startswith("training: 9 steps"))
    assert events.index("progress bar") == first + 1


def test_eval_file_and_eval_fraction_note(tmp_path, demo_data, tokenizer):
    """With data.eval given, data.eval_fraction splits nothing off: the run says so."""
    notes = []
    cfg = small_config(tmp_path, demo_data, "data.eval_fraction=0.2")
    rows, _, _ = sft.load_data(cfg, tokenizer, log=notes.append)
    assert any("data.eval_fraction=0.2 is not used" in n for n in notes)
    plain, _, _ = sft.load_data(small_config(tmp_path, demo_data), tokenizer, log=notes.append)
    assert len(rows) == len(plain)  # (the training rows are all kept)


def test_replay_log_says_what_was_mixed_in(tmp_path, demo_data, tokenizer):
    """data.general_fraction=0.05 of fewer than 10 examples rounds to no replay example: the log said
    "(5% of training)" all the same."""
    from .conftest import write_jsonl

    few = write_jsonl(tmp_path / "few.jsonl", [json.loads(s) for s in open(demo_data["train"])][:8])
    data = {**demo_data, "train": few}
    notes = []
    cfg = small_config(tmp_path, data, f"data.general_data={demo_data['general']}")  # (0.05 by default)
    rows, _, _ = sft.load_data(cfg, tokenizer, log=notes.append)
    assert len(rows) == 8
    replay = [n for n in notes if n.startswith("replay:")]
    assert len(replay) == 1 and "5%" not in replay[0]
    assert "no example" in replay[0] and "data.general_fraction=0.05" in replay[0]
    # mixed in: the share of the training rows it is, not the one asked for
    notes.clear()
    cfg = small_config(
        tmp_path, data, f"data.general_data={demo_data['general']}", "data.general_fraction=0.3"
    )
    rows, _, _ = sft.load_data(cfg, tokenizer, log=notes.append)
    assert len(rows) == 11
    assert [n for n in notes if n.startswith("replay:")] == [
        f"replay: 3 examples from {demo_data['general']} mixed in (27% of 11 training examples; "
        "data.general_fraction=0.3)"
    ]


def test_unused_length_and_warmup_settings_are_said(tmp_path, tokenizer, demo_data):
    """train.max_steps sets the run's length: a train.epochs beside it is not used, and a warmup as
    long as the run never reaches train.lr; warmup_steps beside warmup_ratio wins. Each is said."""
    notes = []
    cfg = small_config(
        tmp_path,
        demo_data,
        "train.max_steps=2",
        "train.epochs=3",
        "train.warmup_steps=2",
        "train.warmup_ratio=0.5",
        "data.eval=null",
    )
    sft.train(cfg, log=notes.append, model=build_model(seed=0, **SMALL), tokenizer=tokenizer)
    said = "\n".join(notes)
    assert "train.epochs=3 is not used: train.max_steps=2 sets the run's length" in said
    assert "train.warmup_ratio=0.5 is not used: train.warmup_steps=2 is set" in said
    assert "warmup of 2 steps is not shorter than the run (2 steps)" in said

    quiet = []
    cfg = small_config(
        tmp_path / "b",
        demo_data,
        "train.max_steps=3",
        "train.epochs=0",
        "train.warmup_steps=1",
        "data.eval=null",
    )
    sft.train(cfg, log=quiet.append, model=build_model(seed=0, **SMALL), tokenizer=tokenizer)
    assert not any("is not used" in n or "not shorter" in n for n in quiet)
    # train.epochs at its default beside max_steps was not set by the user: nothing to say
    cfg = small_config(tmp_path / "c", demo_data, "train.max_steps=3")
    assert cfg.train.epochs == type(cfg.train)().epochs
    assert sft._unused_length_settings(cfg.train, total=3, warmup=0) == []
