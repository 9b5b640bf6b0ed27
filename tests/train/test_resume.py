"""Exact resume: 20 steps in one go == 10 steps, killed, resumed for 10 more (losses and adapter)."""

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file

from hoptune.config import ConfigError
from hoptune.models.tiny import build_model
from hoptune.train import loop, sft
from tests.conftest import SMALL

from .conftest import small_config


def _run(cfg, tokenizer):
    return sft.train(cfg, log=lambda s: None, model=build_model(seed=0, **SMALL), tokenizer=tokenizer)


def _run_killed_at_step(cfg, tokenizer, n: int, monkeypatch) -> None:
    """Run ``cfg`` until its n-th optimizer step, which raises KeyboardInterrupt (a killed run)."""
    real_step = sft.sft_step
    calls = {"n": 0}

    def dies(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt("killed")
        return real_step(*a, **k)

    monkeypatch.setattr(sft, "sft_step", dies)
    with pytest.raises(KeyboardInterrupt):
        _run(cfg, tokenizer)
    monkeypatch.setattr(sft, "sft_step", real_step)


@pytest.mark.parametrize("packing", [False, True])
def test_resume_is_exact(tmp_path, tokenizer, demo_data, monkeypatch, packing):
    common = [
        "train.max_steps=20",
        "train.save_every=5",
        "train.eval_every=5",
        "lora.dropout=0.1",  # dropout draws random numbers: the RNG state must come back too
        "train.warmup_steps=3",
        f"data.packing={str(packing).lower()}",
        f"data.general_data={demo_data['general']}",
        "data.general_fraction=0.2",
    ]
    full = _run(small_config(tmp_path / "a", demo_data, *common), tokenizer)
    assert len(full.train_losses) == 20

    cfg_b = small_config(tmp_path / "b", demo_data, *common)
    _run_killed_at_step(cfg_b, tokenizer, 11, monkeypatch)
    ck = loop.Checkpointer(cfg_b.output.dir)
    assert os.path.basename(ck.latest()) == "step-00000010"

    second = _run(cfg_b, tokenizer)  # output.resume=auto picks up step 10
    assert second.steps == 20
    assert second.train_losses == full.train_losses[10:]  # bit-identical, not just close

    a = load_file(os.path.join(full.output_dir, "adapter_model.safetensors"))
    b = load_file(os.path.join(second.output_dir, "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    # the metrics file reads as one run: steps 1..20 once each, evals at 5, 10, 15 and 20
    recs = loop.read_metrics(os.path.join(cfg_b.output.dir, "metrics.jsonl"))
    assert [r["step"] for r in recs if r["split"] == "train"] == list(range(1, 21))
    assert [r["step"] for r in recs if r["split"] == "eval"] == [5, 10, 15, 20]
    ref = loop.read_metrics(os.path.join(tmp_path / "a" / "run", "metrics.jsonl"))
    assert [r["loss"] for r in recs if r["split"] == "eval"] == [
        r["loss"] for r in ref if r["split"] == "eval"
    ]
    with open(os.path.join(ck.latest(), loop.STATE_JSON)) as f:
        assert json.load(f)["step"] == 20

    # the finished run started again: nothing to train, and its final eval is not logged twice
    third = _run(cfg_b, tokenizer)
    assert third.steps == 20 and third.train_losses == [] and third.eval == second.eval
    recs = loop.read_metrics(os.path.join(cfg_b.output.dir, "metrics.jsonl"))
    assert [r["step"] for r in recs if r["split"] == "eval"] == [5, 10, 15, 20]


def test_a_run_resumed_from_an_earlier_checkpoint_and_stopped_resumes_from_there(
    tmp_path, tokenizer, demo_data, monkeypatch
):
    """Checkpoints 2 and 4, the run killed in step 6; resumed on purpose from step 2 and killed again
    before its next save; then output.resume=auto. metrics.jsonl was cut back to step 2 by that
    resume, but latest still named step 4, so auto went on from step 4 and step 4's line (and any
    eval there) was missing for good. latest now names the checkpoint a run resumes from."""
    common = ["train.max_steps=8", "train.save_every=2", "train.keep_checkpoints=3"]
    full = _run(small_config(tmp_path / "a", demo_data, *common), tokenizer)
    cfg = small_config(tmp_path / "b", demo_data, *common)
    _run_killed_at_step(cfg, tokenizer, 6, monkeypatch)
    ck = loop.Checkpointer(cfg.output.dir)
    assert loop.step_folders(ck.dir) == ["step-00000002", "step-00000004"]
    back = small_config(
        tmp_path / "b", demo_data, *common, f"output.resume={os.path.join(ck.dir, 'step-00000002')}"
    )
    _run_killed_at_step(back, tokenizer, 2, monkeypatch)  # (killed in step 4: no save)
    assert os.path.basename(ck.latest()) == "step-00000002"
    assert "step-00000002" in loop.interrupted_hint(back)
    again = _run(cfg, tokenizer)
    assert again.train_losses == full.train_losses[2:]
    recs = loop.read_metrics(os.path.join(cfg.output.dir, "metrics.jsonl"))
    assert [r["step"] for r in recs if r["split"] == "train"] == list(range(1, 9))


def test_resume_refuses_other_data(tmp_path, tokenizer, demo_data):
    cfg = small_config(tmp_path, demo_data, "train.max_steps=2", "train.save_every=1")
    _run(cfg, tokenizer)
    cfg = small_config(
        tmp_path,
        demo_data,
        "train.max_steps=2",
        "train.save_every=1",
        "data.max_seq_len=12",
        "data.truncation=left",
    )
    # the explanation names the settings that changed here, from the run's config.yaml (it named
    # every data.* key that could have, and said that no setting changed)
    with pytest.raises(ConfigError, match=r"cannot resume exactly.*data_fingerprint") as e:
        _run(cfg, tokenizer)
    msg = str(e.value)
    assert "data.max_seq_len was 64 and is now 12; data.truncation was 'right' and is now 'left'" in msg
    assert "No setting a checkpoint records changed" not in msg and "data.packing was" not in msg
    cfg = small_config(tmp_path, demo_data, "train.max_steps=2", "output.resume=false")
    with pytest.raises(ConfigError, match="already has checkpoints"):
        _run(cfg, tokenizer)


def test_resume_refuses_another_eval_set(tmp_path, tokenizer, demo_data):
    # a finished run started again reports the final eval it logged: with another data.eval it
    # reported the loss of the old held-out set as that of the new one
    cfg = small_config(tmp_path, demo_data, "train.max_steps=2", "train.save_every=1")
    first = _run(cfg, tokenizer)
    other = tmp_path / "other_eval.jsonl"
    with open(demo_data["train"]) as f:
        other.write_text("".join(f.readlines()[:5]))
    cfg = small_config(tmp_path, demo_data, "train.max_steps=2", "train.save_every=1", f"data.eval={other}")
    with pytest.raises(ConfigError, match="cannot resume exactly.*eval_fingerprint"):
        _run(cfg, tokenizer)
    # the same eval set resumes (here: a finished run, its logged eval reported again)
    again = _run(small_config(tmp_path, demo_data, "train.max_steps=2", "train.save_every=1"), tokenizer)
    assert again.train_losses == [] and again.eval == first.eval


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.max_steps=3", r"total_steps \(train.max_steps, or train.epochs .*\) was 2 and is now 3"),
        ("train.grad_accum=1", r"rows_per_step \(train.batch_size x train.grad_accum\) was 8 and is now 4"),
        ("train.lr=1e-4", "train.lr was 0.001 and is now 0.0001"),
        ("train.seed=1", "train.seed was 0 and is now 1"),
        ("train.warmup_steps=1", "train.warmup_steps was 0 and is now 1"),
        ("train.lr_schedule=constant", "train.lr_schedule was 'cosine' and is now 'constant'"),
        ("train.weight_decay=0.1", "train.weight_decay was 0.0 and is now 0.1"),
        ("train.betas=[0.8, 0.999]", r"train.betas was \[0.9, 0.999\] and is now \[0.8, 0.999\]"),
        ("lora.r=8", "lora.r was 4 and is now 8"),
        ("lora.dropout=0.1", "lora.dropout was 0.0 and is now 0.1"),
        ("train.max_grad_norm=0.5", "train.max_grad_norm was 1.0 and is now 0.5"),
        ("model.quantize=nf4", "model.quantize was None and is now 'nf4'"),
        ("model.dtype=bf16", "model.dtype \\(resolved\\) was 'fp32' and is now 'bf16'"),
        ("model.path=/elsewhere/llama", "model.path was 'hoptune/tiny' and is now '/elsewhere/llama'"),
    ],
)
def test_resume_refuses_changed_settings(tmp_path, tokenizer, demo_data, override, message):
    """The optimizer, schedule and seed come back from the checkpoint, so a changed value would be
    ignored while config.yaml claimed it: refused, naming the key, and config.yaml stays as it was."""
    cfg = small_config(tmp_path, demo_data, "train.max_steps=2", "train.save_every=1")
    _run(cfg, tokenizer)
    config_yaml = os.path.join(cfg.output.dir, "config.yaml")
    with open(config_yaml) as f:
        before = f.read()
    cfg = small_config(tmp_path, demo_data, "train.max_steps=2", "train.save_every=1", override)
    with pytest.raises(ConfigError, match=f"cannot resume exactly from .*step-00000002: {message}") as e:
        _run(cfg, tokenizer)
    assert str(e.value).endswith("or start afresh in a new output.dir")
    with open(config_yaml) as f:
        assert f.read() == before


def test_resume_compares_the_precision_model_dtype_auto_resolves_to(
    tmp_path, tokenizer, demo_data, monkeypatch
):
    """model.dtype=auto is fp32 on a CPU and bf16 on a GPU: a run checkpointed on one and resumed on
    the other trained its adapter through another function (it went on silently, "auto" == "auto"),
    refused with the way out; the precision written out resumes, the same setting on the same kind of
    machine too."""
    common = ["train.max_steps=2", "train.save_every=1"]
    _run(small_config(tmp_path, demo_data, *common), tokenizer)  # auto on a CPU: fp32
    monkeypatch.setattr(loop, "resolve_dtype", lambda name, device: torch.bfloat16)  # auto on a GPU
    with pytest.raises(
        ConfigError, match=r"model.dtype \(resolved\) was 'fp32' and is now 'bf16'.*set model.dtype to"
    ):
        _run(small_config(tmp_path, demo_data, *common), tokenizer)
    monkeypatch.undo()
    assert _run(small_config(tmp_path, demo_data, *common, "model.dtype=fp32"), tokenizer).train_losses == []
    assert _run(small_config(tmp_path, demo_data, *common), tokenizer).train_losses == []


def test_resume_compares_the_base_model_folder_not_its_spelling(tmp_path, tokenizer, demo_data, monkeypatch):
    """A checkpoint's adapter was trained on one base: resuming it on another folder is refused (it
    went on silently), while the same folder named another way (relative, through a link) resumes."""
    base = tmp_path / "models" / "base"
    base.mkdir(parents=True)
    (tmp_path / "link").symlink_to(base)
    monkeypatch.chdir(tmp_path)
    common = ["train.max_steps=2", "train.save_every=1"]
    _run(small_config(tmp_path, demo_data, *common, f"model.path={base}"), tokenizer)
    for same in ("models/base", "./models//base/", "link"):
        again = _run(small_config(tmp_path, demo_data, *common, f"model.path={same}"), tokenizer)
        assert again.train_losses == []  # (finished: resumed at its last step)
    other = tmp_path / "models" / "other"
    other.mkdir()
    with pytest.raises(ConfigError, match=f"model.path was '{base}' and is now '{other}'"):
        _run(small_config(tmp_path, demo_data, *common, "model.path=models/other"), tokenizer)
    # the built-in model under either of its names
    cfg = small_config(tmp_path / "tiny", demo_data, *common, "model.path=tiny")
    _run(cfg, tokenizer)
    cfg = small_config(tmp_path / "tiny", demo_data, *common, "model.path=hoptune/tiny")
    assert _run(cfg, tokenizer).train_losses == []


def test_resume_follows_a_base_folder_that_moved(tmp_path, tokenizer, demo_data, monkeypatch):
    """A base folder moved since the checkpoint was written resumes from its new place when its files
    are the same (it was refused, with the advice to use a folder that no longer exists); other files
    in its place are refused, naming the folder that is gone."""

    def base(folder, weights):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text('{"model_type": "llama"}')
        (folder / "model.safetensors").write_bytes(weights)
        return folder

    old = base(tmp_path / "disk1" / "base", bytes(range(256)) * 600)
    common = ["train.max_steps=2", "train.save_every=1"]
    _run_killed_at_step(
        small_config(tmp_path, demo_data, *common, f"model.path={old}"), tokenizer, 2, monkeypatch
    )
    moved = tmp_path / "disk2" / "base"
    moved.parent.mkdir()
    os.rename(old, moved)
    lines = []
    cfg = small_config(tmp_path, demo_data, *common, f"model.path={moved}")
    res = sft.train(cfg, log=lines.append, model=build_model(seed=0, **SMALL), tokenizer=tokenizer)
    assert len(res.train_losses) == 1 and any(f"moved to {moved}" in s for s in lines)
    # (the run's next checkpoint records the new folder)
    state = loop.Checkpointer.read_state(loop.Checkpointer(cfg.output.dir).latest())
    assert state["settings"]["model.path"] == str(moved)

    cfg = small_config(tmp_path / "b", demo_data, *common, f"model.path={moved}")
    _run(cfg, tokenizer)
    other = base(tmp_path / "disk3" / "base", bytes(range(256)) * 599 + bytes(256))  # (a fine-tune)
    os.rename(moved, tmp_path / "disk2" / "gone")
    with pytest.raises(
        ConfigError, match=f"model.path was '{moved}' and is now '{other}'.*{moved} no longer"
    ):
        _run(small_config(tmp_path / "b", demo_data, *common, f"model.path={other}"), tokenizer)


def test_resume_from_a_checkpoint_without_data_order(tmp_path, tokenizer, demo_data, monkeypatch):
    """A checkpoint that records no data order nor settings (an earlier version's, whose runs cut
    train.epochs as one stream of rows) resumes with the same config, in its own order and step
    count: the same losses as an uninterrupted run of that version."""
    common = ["train.max_steps=0", "train.epochs=0.5", "train.save_every=1"]
    real_sampler = sft.StepSampler

    def streamed(*a, whole_epochs=False, **k):  # the earlier versions' order
        return real_sampler(*a, whole_epochs=False, **k)

    monkeypatch.setattr(sft, "StepSampler", streamed)
    full = _run(small_config(tmp_path / "a", demo_data, *common), tokenizer)
    assert full.steps > 2
    cfg = small_config(tmp_path / "b", demo_data, *common)
    _run_killed_at_step(cfg, tokenizer, 3, monkeypatch)
    monkeypatch.setattr(sft, "StepSampler", real_sampler)
    folder = loop.Checkpointer(cfg.output.dir).latest()
    assert os.path.basename(folder) == "step-00000002"
    pt = os.path.join(folder, loop.STATE_FILE)
    blob = torch.load(pt, map_location="cpu", weights_only=False)
    js = os.path.join(folder, loop.STATE_JSON)
    with open(js) as f:
        state = json.load(f)
    for d in (blob["state"], state):  # the fields the earlier versions did not write
        d.pop("data_order", None)
        d.pop("settings", None)
    torch.save(blob, pt)
    with open(js, "w") as f:
        json.dump(state, f)
    second = _run(cfg, tokenizer)  # (refused before: "data_order was 'steps' and is now 'epochs'")
    assert second.steps == full.steps
    assert second.train_losses == full.train_losses[2:]


def test_resume_settings_as_json_keeps_them(tmp_path, demo_data):
    """The settings a checkpoint stores compare equal after a JSON round trip (a tuple of target
    modules comes back as a list)."""
    cfg = small_config(tmp_path, demo_data)
    cfg.lora.target_modules = ("q_proj", "v_proj")
    settings = sft._resume_settings(cfg)
    assert json.loads(json.dumps(settings)) == settings


def test_full_fine_tuning_resume_ignores_lora_keys(tmp_path, demo_data):
    """A full fine-tuning run trains no adapter: its lora.* settings are not compared on resume
    (lora.enabled is); a LoRA run's are."""
    full = small_config(tmp_path, demo_data, "lora.enabled=false")
    settings = sft._resume_settings(full)
    assert settings["lora.enabled"] is False
    assert not any(k.startswith("lora.") and k != "lora.enabled" for k in settings)
    state = {"settings": settings}
    full.lora.r = 64  # (changed after the checkpoint: no effect on a full fine-tuning run)
    sft._check_resume("ckpt", state, sft._resume_settings(full), "in a new output.dir")
    lora_run = small_config(tmp_path, demo_data)
    state = {"settings": sft._resume_settings(lora_run)}
    lora_run.lora.r = 64
    with pytest.raises(ConfigError, match="lora.r was 4 and is now 64"):
        sft._check_resume("ckpt", state, sft._resume_settings(lora_run), "in a new output.dir")


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.eps=1e-6", "train.eps was 1e-08 and is now 1e-06"),
        ("train.warmup_ratio=0.1", "train.warmup_ratio was 0.0 and is now 0.1"),
        ("train.min_lr_ratio=0.5", "train.min_lr_ratio was 0.0 and is now 0.5"),
        ("lora.alpha=16", "lora.alpha was 8.0 and is now 16.0"),
        ("lora.use_rslora=true", "lora.use_rslora was False and is now True"),
        ("lora.use_dora=true", "lora.use_dora was False and is now True"),
        ("lora.target_modules=[q_proj]", r"lora.target_modules was '\S+' and is now \['q_proj'\]"),
        ("lora.enabled=false", "lora.enabled was True and is now False"),
    ],
)
def test_each_setting_a_checkpoint_depends_on_is_compared(tmp_path, demo_data, override, message):
    """The keys the run-based test above leaves out, compared as a resume compares them (the
    checkpoint's settings after their JSON round trip)."""
    state = {"settings": json.loads(json.dumps(sft._resume_settings(small_config(tmp_path, demo_data))))}
    now = sft._resume_settings(small_config(tmp_path, demo_data, override))
    with pytest.raises(ConfigError, match=f"cannot resume exactly from ckpt: {message}"):
        sft._check_resume("ckpt", state, now, "in a new output.dir")


def test_double_quant_is_compared_on_resume_for_a_quantized_base_only(tmp_path, demo_data):
    """model.double_quant changes the base's weights only when the base is quantized: a dense run
    resumes whatever it says, an NF4 run does not."""
    for quantize, same in (("null", True), ("nf4", False)):
        cfg = small_config(tmp_path, demo_data, f"model.quantize={quantize}")
        state = {"settings": sft._resume_settings(cfg)}
        cfg.model.double_quant = not cfg.model.double_quant
        now = sft._resume_settings(cfg)
        if same:
            sft._check_resume("ckpt", state, now, "in a new output.dir")
            continue
        with pytest.raises(ConfigError, match="model.double_quant was True and is now False"):
            sft._check_resume("ckpt", state, now, "in a new output.dir")


def test_a_second_run_on_the_same_output_dir_is_refused(tmp_path, tokenizer, demo_data):
    """Two runs writing one output.dir would resume from, prune and overwrite each other's
    checkpoints: the second is refused while the first holds the folder, and runs once it is free."""
    cfg = small_config(tmp_path, demo_data, "train.max_steps=1")
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    with loop.run_lock(run_dir):
        with pytest.raises(ConfigError, match=r"output.dir: .* is in use by another run \(process \d+"):
            _run(cfg, tokenizer)
        assert not os.path.exists(os.path.join(run_dir, "config.yaml"))  # refused before anything
    assert _run(cfg, tokenizer).steps == 1
    with loop.run_lock(run_dir):  # and the finished run let it go
        pass


def test_a_run_refused_before_training_leaves_no_folder(tmp_path, tokenizer, demo_data):
    """A run that stops before its first step (a missing data file, a resume that cannot be exact)
    removes the output.dir it made, and the parents made with it, lock file and all; a folder that
    was there before, or that holds anything, stays."""
    missing = f"data.train={tmp_path / 'missing.jsonl'}"
    nested = tmp_path / "runs" / "exp" / "run"
    cfg = small_config(tmp_path, demo_data, missing, f"output.dir={nested}")
    with pytest.raises(ValueError, match="missing.jsonl' does not exist"):
        _run(cfg, tokenizer)
    assert not os.path.exists(tmp_path / "runs")

    (tmp_path / "runs").mkdir()
    with pytest.raises(ValueError, match="does not exist"):
        _run(cfg, tokenizer)
    assert os.listdir(tmp_path / "runs") == []  # (made before the run: kept)

    nested.mkdir(parents=True)
    with pytest.raises(ValueError, match="does not exist"):
        _run(cfg, tokenizer)
    assert os.path.isdir(nested)

    # a resume refused after the checks of the data: the new folder goes, the checkpoint stays
    done = small_config(tmp_path, demo_data, "train.max_steps=2", "train.save_every=1")
    _run(done, tokenizer)
    latest = loop.Checkpointer(done.output.dir).latest()
    other = tmp_path / "other"
    cfg = small_config(
        tmp_path,
        demo_data,
        "train.max_steps=2",
        f"output.resume={latest}",
        f"output.dir={other}",
        "lora.r=8",
    )
    with pytest.raises(ConfigError, match="lora.r was 4 and is now 8") as e:
        _run(cfg, tokenizer)
    assert not os.path.exists(other) and os.path.isfile(os.path.join(latest, loop.STATE_FILE))
    # (already a new output.dir: starting afresh there means leaving output.resume out)
    assert str(e.value).endswith("or start afresh without output.resume")


def test_a_run_killed_in_training_keeps_its_folder(tmp_path, tokenizer, demo_data, monkeypatch):
    cfg = small_config(tmp_path, demo_data, f"output.dir={tmp_path / 'runs' / 'run'}")
    _run_killed_at_step(cfg, tokenizer, 1, monkeypatch)
    assert os.path.isfile(tmp_path / "runs" / "run" / "config.yaml")


def test_run_lock_refuses_a_lock_file_removed_under_it(tmp_path, monkeypatch):
    """A refused run removes its lock file while it holds it: a second run that opened that file
    just before and locks it after must not take the removed file for the folder's lock."""
    fcntl = pytest.importorskip("fcntl")
    real_flock = fcntl.flock

    def removed_first(fd, op):
        os.unlink(tmp_path / ".lock")
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", removed_first)
    with pytest.raises(loop.FolderInUse, match="was removed by a run that stopped as"):
        with loop.run_lock(str(tmp_path)):
            pass
    monkeypatch.setattr(fcntl, "flock", real_flock)
    with loop.run_lock(str(tmp_path)):
        pass


def test_a_model_interrupted_mid_step_resumes_without_its_gradients(
    tmp_path, tokenizer, demo_data, monkeypatch
):
    """A run stopped between a step's backward and its optimizer step (Ctrl-C in a notebook) leaves
    that step's gradients on the model's parameters: train() again on the same model object resumed
    with them added to its first step's gradient (transformers' Trainer zeroes them before training),
    so its adapter was not the one an uninterrupted run trains."""
    common = ["train.max_steps=2", "train.save_every=1", "train.max_grad_norm=0", "data.eval=null"]
    full = _run(small_config(tmp_path / "a", demo_data, *common), tokenizer)

    cfg = small_config(tmp_path / "b", demo_data, *common)
    model = build_model(seed=0, **SMALL)
    real_step = loop.optimizer_step
    calls = {"n": 0}

    def dies(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # step 2's gradients accumulated, not yet applied
            raise KeyboardInterrupt("killed")
        return real_step(*a, **k)

    monkeypatch.setattr(loop, "optimizer_step", dies)
    with pytest.raises(KeyboardInterrupt):
        sft.train(cfg, log=lambda s: None, model=model, tokenizer=tokenizer)
    monkeypatch.setattr(loop, "optimizer_step", real_step)
    assert any(p.grad is not None for p in model.parameters())
    again = sft.train(cfg, log=lambda s: None, model=model, tokenizer=tokenizer)
    assert again.train_losses == full.train_losses[1:]
    a = load_file(os.path.join(full.output_dir, "adapter_model.safetensors"))
    b = load_file(os.path.join(again.output_dir, "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_refuses_another_model_passed_in(tmp_path, tokenizer, demo_data, monkeypatch):
    """A run whose model was passed to train() (model.path left at the built-in model) recorded
    nothing of that model: resumed on another one, its adapter went on training on a base it was
    not trained on, without a word. Refused now; the same weights passed again resume."""
    cfg = small_config(tmp_path, demo_data, "train.max_steps=2", "train.save_every=1", "data.eval=null")
    _run_killed_at_step(cfg, tokenizer, 2, monkeypatch)
    other = build_model(seed=1, **SMALL)  # the same architecture, other weights
    with pytest.raises(
        ConfigError,
        match=r"cannot resume exactly from .*step-00000001: model_fingerprint \(the frozen weights of "
        r"the model passed to sft.train.*pass the model that run was started with",
    ):
        sft.train(cfg, log=lambda s: None, model=other, tokenizer=tokenizer)
    assert len(_run(cfg, tokenizer).train_losses) == 1


def test_the_model_fingerprint_covers_both_ends_of_each_frozen_tensor():
    # a fine-tune of the same architecture differs anywhere in its tensors, not at their starts only
    model = build_model(seed=0, **SMALL).requires_grad_(False)
    emb = model.get_input_embeddings().weight
    assert emb.numel() > 4096  # (its last value is not among its first 4096)
    before = sft._model_fingerprint(model)
    with torch.no_grad():
        emb.view(-1)[-1] += 1.0
    assert sft._model_fingerprint(model) != before


@pytest.mark.parametrize("first", ["passed", "built-in"])
def test_resume_refuses_switching_between_a_model_passed_in_and_the_built_in_one(
    tmp_path, tokenizer, demo_data, monkeypatch, first
):
    """A run on a model passed to train() resumed without one (model.path at the built-in model),
    or the other way round, went on training its adapter on another base without a word: only a
    model passed in had its weights recorded and compared. Both are refused now; the built-in
    model again resumes."""
    # (a stand-in for the pretrained built-in model: other weights than the model passed in)
    monkeypatch.setattr(sft, "load_base_model", lambda *a: build_model(seed=1, **SMALL))
    common = ["train.max_steps=2", "train.save_every=1", "data.eval=null"]
    cfg = small_config(tmp_path, demo_data, *common)
    passed = build_model(seed=0, **SMALL)

    def run(model):
        return sft.train(cfg, log=lambda s: None, model=model, tokenizer=tokenizer)

    real_step, calls = sft.sft_step, []

    def dies(*a, **k):  # killed at step 2, after the checkpoint of step 1
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real_step(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(sft, "sft_step", dies)
        with pytest.raises(KeyboardInterrupt):
            run(passed if first == "passed" else None)
    with pytest.raises(
        ConfigError, match=r"cannot resume exactly from .*step-00000001: model_fingerprint \(the"
    ):
        run(None if first == "passed" else build_model(seed=0, **SMALL))
    if first == "built-in":
        assert len(run(None).train_losses) == 1


def test_resume_takes_target_modules_listed_in_another_order(tmp_path, demo_data):
    """A list of target modules names a set of layers (PEFT's rule): [q_proj, v_proj] resumes a run
    started with [v_proj, q_proj] (or with a name listed twice); another set is refused."""
    cfg = small_config(tmp_path, demo_data)
    cfg.lora.target_modules = ["v_proj", "q_proj"]
    state = {"settings": json.loads(json.dumps(sft._resume_settings(cfg)))}
    for same in (["q_proj", "v_proj"], ("q_proj", "v_proj", "q_proj")):
        cfg.lora.target_modules = same
        sft._check_resume("ckpt", state, sft._resume_settings(cfg), "in a new output.dir")
    cfg.lora.target_modules = ["q_proj", "k_proj"]
    with pytest.raises(ConfigError, match=r"lora.target_modules was \['v_proj', 'q_proj'\]"):
        sft._check_resume("ckpt", state, sft._resume_settings(cfg), "in a new output.dir")


def test_resume_names_an_optimizer_state_that_does_not_fit(tmp_path, tokenizer, demo_data, monkeypatch):
    """A checkpoint whose optimizer state does not fit (a parameter group of another size) was
    reported as "its weights do not fit"; the refusal names the optimizer state now."""
    cfg = small_config(tmp_path, demo_data, "train.max_steps=2", "train.save_every=1", "data.eval=null")
    _run_killed_at_step(cfg, tokenizer, 2, monkeypatch)
    path = os.path.join(cfg.output.dir, "checkpoints", "step-00000001", loop.STATE_FILE)
    blob = torch.load(path, map_location="cpu", weights_only=False)
    blob["optimizer"]["param_groups"][0]["params"].pop()
    torch.save(blob, path)
    with pytest.raises(
        ConfigError, match=r"step-00000001: its optimizer state does not fit .*parameter group"
    ):
        _run(cfg, tokenizer)


def _cut(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def _write(path, text):
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _three_checkpoints(tmp_path, tokenizer, demo_data, monkeypatch):
    """A 4-step run killed in its 4th step, its checkpoints of steps 1-3 kept: (config, checkpoints/)."""
    cfg = small_config(tmp_path, demo_data, *_FOUR_STEPS)
    _run_killed_at_step(cfg, tokenizer, 4, monkeypatch)
    return cfg, os.path.join(cfg.output.dir, "checkpoints")


_FOUR_STEPS = ("train.max_steps=4", "train.save_every=1", "train.keep_checkpoints=3", "data.eval=null")


@pytest.mark.parametrize(
    "damage, file",
    [
        (lambda d: _cut(os.path.join(d, loop.STATE_FILE), 100), loop.STATE_FILE),
        (lambda d: _cut(os.path.join(d, loop.STATE_FILE), 0), loop.STATE_FILE),
        (lambda d: _write(os.path.join(d, loop.STATE_JSON), '{"step": 3,'), loop.STATE_JSON),
        (lambda d: _write(os.path.join(d, loop.STATE_JSON), "[]"), loop.STATE_JSON),
        (
            lambda d: _cut(os.path.join(d, loop.ADAPTER_DIR, "adapter_model.safetensors"), 50),
            "adapter/adapter_model.safetensors",
        ),
        (
            lambda d: _cut(os.path.join(d, loop.ADAPTER_DIR, "adapter_config.json"), 40),
            "adapter/adapter_config.json",
        ),
    ],
)
def test_a_damaged_checkpoint_is_named_with_the_one_before_it(
    tmp_path, tokenizer, demo_data, monkeypatch, damage, file
):
    """A checkpoint file cut short or edited after it was saved raised a raw traceback (torch.load,
    json), or was reported as weights that do not fit the config."""
    cfg, ckpts = _three_checkpoints(tmp_path, tokenizer, demo_data, monkeypatch)
    damage(os.path.join(ckpts, "step-00000003"))
    want = (
        rf"cannot resume from .*step-00000003: the checkpoint is damaged, {re.escape(file)} cannot be read "
        rf"\(.*\); resume from the checkpoint before it with output\.resume=.*step-00000002$"
    )
    with pytest.raises(ConfigError, match=want):
        _run(cfg, tokenizer)
    # that one resumes, and the run finishes
    cfg = small_config(
        tmp_path, demo_data, *_FOUR_STEPS, f"output.resume={os.path.join(ckpts, 'step-00000002')}"
    )
    assert _run(cfg, tokenizer).steps == 4


def test_a_checkpoint_damaged_after_the_resume_checks_is_named(tmp_path, tokenizer, demo_data, monkeypatch):
    cfg = small_config(tmp_path, demo_data, "train.max_steps=2", "train.save_every=1", "data.eval=null")
    _run_killed_at_step(cfg, tokenizer, 2, monkeypatch)
    real = loop.Checkpointer.read_state

    def read_then_cut(folder):  # (cut between the state's read and the load, as by another process)
        state = real(folder)
        _cut(os.path.join(folder, loop.STATE_FILE), 100)
        return state

    monkeypatch.setattr(loop.Checkpointer, "read_state", staticmethod(read_then_cut))
    with pytest.raises(
        ConfigError,
        match=r"step-00000001: the checkpoint is damaged, trainer_state\.pt cannot be read.*new output\.dir$",
    ):
        _run(cfg, tokenizer)


def test_data_changed_under_the_same_config_is_said_so(tmp_path, tokenizer, demo_data, monkeypatch):
    """A data file whose contents changed (the config as it was) was refused with 'Use the config
    that run was started with', as if a key had changed."""
    cfg = small_config(tmp_path, demo_data, "train.max_steps=3", "train.save_every=1")
    _run_killed_at_step(cfg, tokenizer, 2, monkeypatch)
    with open(demo_data["train"]) as f:
        lines = f.readlines()
    with open(demo_data["train"], "w") as f:
        f.writelines(lines[:-1])
    with pytest.raises(ConfigError) as e:
        _run(cfg, tokenizer)
    msg = str(e.value)
    assert "data_fingerprint (the training rows" in msg and "eval_fingerprint" not in msg
    assert msg.endswith(
        "No setting a checkpoint records changed: the rows differ, by the data.* keys or "
        "model.chat_template of the config, the contents of the data files, or the tokenizer. Train on "
        "the rows of that run, or on these in a new output.dir"
    )
    with open(demo_data["train"], "w") as f:  # restored: the run resumes
        f.writelines(lines)
    assert _run(cfg, tokenizer).steps == 3


def test_a_newest_checkpoint_without_its_state_file_is_passed_over_aloud(
    tmp_path, tokenizer, demo_data, monkeypatch
):
    """The run resumed from the checkpoint before it without a word."""
    cfg, ckpts = _three_checkpoints(tmp_path, tokenizer, demo_data, monkeypatch)
    os.remove(os.path.join(ckpts, "step-00000003", loop.STATE_FILE))
    lines = []
    res = sft.train(cfg, log=lines.append, model=build_model(seed=0, **SMALL), tokenizer=tokenizer)
    assert res.steps == 4
    said = [s for s in lines if "names step-00000003" in s]
    assert said == [
        f"{os.path.join(ckpts, loop.LATEST)} names step-00000003, which has no {loop.STATE_FILE}: resuming "
        "from the newest checkpoint that has one, step-00000002"
    ]
    assert f"resumed from {os.path.join(ckpts, 'step-00000002')} at step 2" in lines


def test_a_state_file_with_other_objects_runs_no_code(tmp_path, tokenizer, demo_data, monkeypatch):
    """trainer_state.pt was unpickled with weights_only=False: a checkpoint from elsewhere
    (output.resume=<its folder>) could run code."""
    cfg = small_config(tmp_path, demo_data, "train.max_steps=2", "train.save_every=1", "data.eval=null")
    _run_killed_at_step(cfg, tokenizer, 2, monkeypatch)
    path = os.path.join(cfg.output.dir, "checkpoints", "step-00000001", loop.STATE_FILE)
    blob = torch.load(path, map_location="cpu", weights_only=False)
    blob["state"]["extra"] = _Called()
    torch.save(blob, path)
    _Called.calls = 0
    with pytest.raises(
        ConfigError, match=r"trainer_state\.pt cannot be read .*holds objects other than the optimizer"
    ):
        _run(cfg, tokenizer)
    assert _Called.calls == 0


class _Called:
    calls = 0

    def __reduce__(self):
        return (_Called._ran, ())

    @staticmethod
    def _ran():
        _Called.calls += 1
        return "ran"


def test_a_checkpoints_folder_that_cannot_be_written_is_refused_before_training(
    tmp_path, tokenizer, demo_data, monkeypatch
):
    """A checkpoints/ that cannot take a checkpoint (here a file by that name) failed with an OS
    error at the first save, after training up to it; now the run is refused before it trains, and
    a run that saves no checkpoints is not concerned."""
    cfg = small_config(tmp_path, demo_data, "train.max_steps=2", "train.save_every=1")
    os.makedirs(cfg.output.dir)
    with open(os.path.join(cfg.output.dir, "checkpoints"), "w") as f:
        f.write("not a folder")
    monkeypatch.setattr(sft, "sft_step", lambda *a, **k: pytest.fail("trained before the refusal"))
    with pytest.raises(
        ConfigError,
        match=r"its checkpoints/ cannot be written \(Not a directory\), and the run saves one every train.save_every=1 steps; make it writable, or use another output.dir$",
    ):
        _run(cfg, tokenizer)
    monkeypatch.undo()
    assert (
        _run(small_config(tmp_path, demo_data, "train.max_steps=2", "train.save_every=0"), tokenizer).steps
        == 2
    )


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_checkpoints_folder_is_refused_before_training(tmp_path, tokenizer, demo_data):
    cfg = small_config(tmp_path, demo_data, "train.max_steps=2", "train.save_every=1")
    ckpts = os.path.join(cfg.output.dir, "checkpoints")
    os.makedirs(ckpts)
    os.chmod(ckpts, 0o555)
    try:
        with pytest.raises(ConfigError, match=r"its checkpoints/ cannot be written \(Permission denied\)"):
            _run(cfg, tokenizer)
    finally:
        os.chmod(ckpts, 0o755)
