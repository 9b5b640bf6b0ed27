"""The built-in tiny model's cache as a new user meets it: where it goes, two processes that need it at
once, a cache that cannot be written, the device it is pretrained on, older transformers."""

from __future__ import annotations

import os
import shutil
import threading
import time

import pytest
import torch

from hoptune.models import pretrain


class Stop(Exception):
    pass


def _fake_pretrain(calls, started=None, go=None):
    """Stands for pretraining: a fresh tiny model (no steps), after ``go`` is set when given."""
    from hoptune.models import build_model, build_tokenizer

    def fake(steps=None, device="cpu", log=print, progress=True):
        calls.append(str(device))
        if started is not None:
            started.set()
            assert go.wait(60), "the test never let pretraining finish"
        return build_model(), build_tokenizer(), [1.0]

    return fake


def test_cache_folder_may_start_with_a_tilde(tmp_path, monkeypatch):
    """HOPTUNE_CACHE=~/somewhere is the home folder's, as in a shell, not a folder named ~ here."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HOPTUNE_CACHE", "~/models/hoptune")
    assert pretrain.cache_root() == str(tmp_path / "home" / "models" / "hoptune")
    monkeypatch.delenv("HOPTUNE_CACHE")
    assert pretrain.cache_root() == str(tmp_path / "home" / ".cache" / "hoptune")


def test_two_processes_needing_the_model_pretrain_it_once(tmp_path, monkeypatch):
    """While one process pretrains, a second one waits for it (and says so), then loads its copy,
    instead of pretraining the same model at the same time (twice the minutes on a small CPU)."""
    monkeypatch.setenv("HOPTUNE_CACHE", str(tmp_path / "cache"))
    calls, started, go = [], threading.Event(), threading.Event()
    monkeypatch.setattr(pretrain, "pretrain", _fake_pretrain(calls, started, go))
    results, second_log = {}, []

    def first():
        results["first"] = pretrain.pretrained_tiny_path(log=lambda s: None, progress=False)

    def second():
        results["second"] = pretrain.pretrained_tiny_path(log=second_log.append, progress=False)

    a = threading.Thread(target=first)
    b = threading.Thread(target=second)  # (flock: two open files conflict within a process too)
    a.start()
    try:
        assert started.wait(60)
        b.start()
        for _ in range(600):
            if any("waiting" in s for s in second_log) or not b.is_alive():
                break
            time.sleep(0.05)
    finally:
        go.set()
        a.join(60)
    if b.ident is not None:  # (started)
        b.join(60)
    final = pretrain.tiny_cache_dir()
    assert results == {"first": final, "second": final}
    assert len(calls) == 1, calls  # pretrained once
    assert any("waiting for another process" in s for s in second_log), second_log
    assert not any("pretraining the built-in" in s for s in second_log), second_log
    assert pretrain.cache_problem(final) is None


def test_a_killed_pretraining_leaves_no_folder_behind_after_the_next_run(tmp_path, monkeypatch):
    """A pretraining killed before it cleaned up (SIGKILL, a power cut) leaves its temporary
    folder; the next run, holding the lock, removes it. Other models' temporary folders and other
    files in the cache stay."""
    monkeypatch.setenv("HOPTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrain, "pretrain", _fake_pretrain([]))
    final = pretrain.tiny_cache_dir()
    root = os.path.dirname(final)
    os.makedirs(root)
    killed = os.path.join(root, f".tmp-{os.path.basename(final)}-k1ll3d")
    os.makedirs(killed)
    with open(os.path.join(killed, "model.safetensors"), "wb") as f:
        f.write(b"\0" * 1024)
    other = os.path.join(root, ".tmp-tiny-llama-0000000000-x")  # another version's, maybe in use
    os.makedirs(other)
    keep = os.path.join(root, "notes.txt")
    open(keep, "w").close()
    assert pretrain.pretrained_tiny_path(log=lambda s: None, progress=False) == final
    assert sorted(os.listdir(root)) == sorted(
        [os.path.basename(final), os.path.basename(final) + ".lock", os.path.basename(other), "notes.txt"]
    )


def test_a_damaged_copy_whose_removal_was_killed_is_removed_at_the_next_use(tmp_path, monkeypatch):
    """A damaged copy is renamed into ``.bad-tiny-*`` and deleted; a kill during the delete left the
    folder for good. The next use removes it; other files in the cache stay."""
    monkeypatch.setenv("HOPTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrain, "pretrain", _fake_pretrain([]))
    final = pretrain.pretrained_tiny_path(log=lambda s: None, progress=False)
    root = os.path.dirname(final)
    with open(os.path.join(final, "model.safetensors"), "r+b") as f:
        f.truncate(100)
    monkeypatch.setattr(pretrain.shutil, "rmtree", lambda *a, **k: None)  # (killed before it deleted)
    pretrain.pretrained_tiny_path(log=lambda s: None, progress=False)
    monkeypatch.undo()
    monkeypatch.setenv("HOPTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrain, "pretrain", _fake_pretrain([]))
    (bad,) = [n for n in os.listdir(root) if n.startswith(".bad-tiny-")]
    assert os.path.isdir(os.path.join(root, bad, "old"))
    shutil.rmtree(final)  # (the next use pretrains again, holding the lock)
    keep = os.path.join(root, ".bad-tiny-notes.txt")
    open(keep, "w").close()
    assert pretrain.pretrained_tiny_path(log=lambda s: None, progress=False) == final
    assert sorted(os.listdir(root)) == sorted(
        [os.path.basename(final), os.path.basename(final) + ".lock", ".bad-tiny-notes.txt"]
    )


def test_setting_a_damaged_copy_aside_survives_its_folder_removed_meanwhile(tmp_path, monkeypatch):
    """Another process that removes a ``.bad-tiny-*`` folder left behind may remove the one this
    process has just made for a damaged copy: the copy is still set aside, not left in place."""
    monkeypatch.setenv("HOPTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrain, "pretrain", _fake_pretrain([]))
    final = pretrain.pretrained_tiny_path(log=lambda s: None, progress=False)
    real, made = pretrain.tempfile.mkdtemp, []

    def mkdtemp_then_removed(*a, **k):
        made.append(real(*a, **k))
        if len(made) == 1:
            os.rmdir(made[-1])  # (by the other process, before the rename)
        return made[-1]

    monkeypatch.setattr(pretrain.tempfile, "mkdtemp", mkdtemp_then_removed)
    pretrain._set_aside(final)
    assert not os.path.exists(final) and len(made) == 2
    assert not [n for n in os.listdir(os.path.dirname(final)) if n.startswith(".bad-tiny-")]


def test_a_cache_that_cannot_be_written_fails_before_pretraining(tmp_path, monkeypatch):
    """The error names the folder and HOPTUNE_CACHE, and comes before the minutes of pretraining."""
    calls = []
    monkeypatch.setattr(pretrain, "pretrain", _fake_pretrain(calls))
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    monkeypatch.setenv("HOPTUNE_CACHE", str(not_a_folder / "cache"))
    with pytest.raises(OSError, match="HOPTUNE_CACHE"):
        pretrain.pretrained_tiny_path(log=lambda s: None, progress=False)

    # the folder is there but no file can be made in it (a read-only mount; root ignores chmod)
    monkeypatch.setenv("HOPTUNE_CACHE", str(tmp_path / "cache"))

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "cache"))

    monkeypatch.setattr(pretrain.tempfile, "mkdtemp", refuse)
    with pytest.raises(OSError, match=r"Permission denied.*set HOPTUNE_CACHE to a writable folder"):
        pretrain.pretrained_tiny_path(log=lambda s: None, progress=False)
    assert calls == []


def test_a_damaged_cache_that_cannot_be_replaced_names_hoptune_cache(tmp_path, monkeypatch):
    """A damaged copy in a cache that cannot be written (a read-only mount): the error says the
    cache cannot be written and what to do, not which temporary name could not be made."""
    monkeypatch.setenv("HOPTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrain, "pretrain", _fake_pretrain([]))
    final = pretrain.pretrained_tiny_path(log=lambda s: None, progress=False)
    with open(os.path.join(final, "model.safetensors"), "r+b") as f:
        f.truncate(100)

    def refuse(*a, dir=None, prefix="", **k):
        raise PermissionError(13, "Permission denied", os.path.join(dir, prefix + "x1y2"))

    monkeypatch.setattr(pretrain.tempfile, "mkdtemp", refuse)
    logs = []
    with pytest.raises(OSError, match=r"cannot write the tiny model's cache in .*set HOPTUNE_CACHE") as e:
        pretrain.pretrained_tiny_path(log=logs.append, progress=False)
    assert e.value.errno == 13 and any("damaged" in s for s in logs)
    assert os.path.isdir(final)  # (left where it was)


def test_demo_with_an_unwritable_cache_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    from hoptune.cli import main

    monkeypatch.setattr(pretrain, "pretrain", _fake_pretrain([]))
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("HOPTUNE_CACHE", str(tmp_path / "file" / "cache"))
    assert main(["demo", "--out", str(tmp_path / "demo"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hoptune demo: error:") and "HOPTUNE_CACHE" in err and "Traceback" not in err


def test_pretraining_runs_on_the_device_asked_for(tmp_path, monkeypatch):
    """hoptune demo --device cpu (and model.device=cpu) pretrain the base on the CPU even where a GPU
    is visible: the user kept the GPU out (busy, or not one this torch can run on)."""
    from hoptune.models import load_tiny
    from hoptune.train.demo import run_demo

    monkeypatch.setenv("HOPTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU is visible
    calls = []
    fake = _fake_pretrain(calls)

    def stop_after(*a, **k):
        fake(*a, **k)
        raise Stop

    monkeypatch.setattr(pretrain, "pretrain", stop_after)
    with pytest.raises(Stop):
        run_demo(str(tmp_path / "demo"), "cpu")
    with pytest.raises(Stop):
        load_tiny(device="cpu", log=lambda s: None)
    assert calls == ["cpu", "cpu"]


def test_caching_and_loading_the_tiny_model_show_no_transformers_bar(tmp_path, monkeypatch, capfd):
    """The demo's output has its own progress bars; transformers' saving and loading bars (one
    shard, 39 tensors) only add lines."""
    from hoptune.models import load_tiny

    monkeypatch.setenv("HOPTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrain, "pretrain", _fake_pretrain([]))
    capfd.readouterr()
    load_tiny(log=lambda s: None)
    err = capfd.readouterr().err
    assert "%|" not in err, err


def test_transformers_bars_are_back_as_they_were_after_the_tiny_model(tmp_path, monkeypatch):
    from transformers.utils import logging as hf_logging

    monkeypatch.setenv("HOPTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrain, "pretrain", _fake_pretrain([]))
    was = hf_logging.is_progress_bar_enabled()
    try:
        for on in (True, False):
            (hf_logging.enable_progress_bar if on else hf_logging.disable_progress_bar)()
            with pretrain.no_hf_progress_bars():
                assert not hf_logging.is_progress_bar_enabled()
            assert hf_logging.is_progress_bar_enabled() is on
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def test_a_pretrained_model_that_cannot_be_renamed_into_place_is_an_error(tmp_path, monkeypatch):
    # (a rename fails quietly only when another process has put its own copy there first)
    monkeypatch.setenv("HOPTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pretrain, "pretrain", _fake_pretrain([]))
    final = pretrain.tiny_cache_dir()
    real = os.replace

    def replace(src, dst):
        if os.fspath(dst) == final:
            raise PermissionError(13, "Permission denied", final)
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(PermissionError):
        pretrain.pretrained_tiny_path(log=lambda s: None, progress=False)
    assert not os.path.exists(final)
    assert [n for n in os.listdir(tmp_path / "cache") if not n.endswith(".lock")] == []


def test_demo_device_override_is_the_demo_device(tmp_path, monkeypatch):
    """hoptune demo model.device=cpu (an override of the demo's config, as its help offers) puts the
    whole demo on the CPU, not only the SFT step: pretraining and scoring went to the GPU before."""
    from hoptune.train.demo import run_demo

    monkeypatch.setenv("HOPTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    calls = []
    fake = _fake_pretrain(calls)

    def stop_after(*a, **k):
        fake(*a, **k)
        raise Stop

    monkeypatch.setattr(pretrain, "pretrain", stop_after)
    with pytest.raises(Stop):
        run_demo(str(tmp_path / "demo"), "auto", ["model.device=cpu"])
    assert calls == ["cpu"]


def test_demo_device_errors_name_the_option_given(tmp_path, monkeypatch):
    from hoptune.config import ConfigError
    from hoptune.train.demo import run_demo

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^--device cuda: .*use --device cpu$"):
        run_demo(str(tmp_path / "demo"), "cuda")
    with pytest.raises(ConfigError, match=r"^model\.device=cuda: .*use model\.device=cpu$"):
        run_demo(str(tmp_path / "demo"), "auto", ["model.device=cuda"])
    assert not (tmp_path / "demo").exists()


def test_pretraining_keeps_the_warmup_its_cached_models_were_made_with(monkeypatch):
    """The cache folder is named after the recipe, so the recipe's model must not change with the SFT
    schedule (whose warmup follows transformers' from lr 0): pretraining warms up as (s + 1) / (w + 1)."""
    from hoptune.train import loop

    made = []
    real = loop.build_scheduler

    def spy(*a, **k):
        made.append(real(*a, **k))
        return made[-1]

    monkeypatch.setattr(loop, "build_scheduler", spy)
    pretrain.pretrain(steps=1, device="cpu", log=lambda s: None, progress=False)
    (sched,) = made
    fn = sched.lr_lambdas[0]  # (one per parameter group, all alike)
    w = pretrain.RECIPE["warmup"]
    assert fn(0) == 1 / (w + 1) and fn(w - 1) == w / (w + 1)


def test_pretraining_leaves_the_callers_random_stream_as_it_was():
    # it seeds its own: a caller's later draws (its LoRA init, its data order) must not depend on
    # whether the tiny model was pretrained in this process or loaded from the cache
    torch.manual_seed(5)
    want = torch.rand(4)
    torch.manual_seed(5)
    pretrain.pretrain(steps=1, device="cpu", log=lambda s: None, progress=False)
    assert torch.equal(torch.rand(4), want)


def test_the_cache_folder_is_named_after_the_recipe_and_the_model_config(monkeypatch):
    # a cached model pretrained by another recipe (more steps, another lr) or for another config is
    # another model: it must not be loaded in place of this one
    from hoptune.models import tiny

    before = pretrain.tiny_cache_dir()
    monkeypatch.setitem(pretrain.RECIPE, "steps", pretrain.RECIPE["steps"] + 1)
    recipe = pretrain.tiny_cache_dir()
    monkeypatch.undo()
    monkeypatch.setitem(tiny.TINY_CONFIG, "hidden_size", tiny.TINY_CONFIG["hidden_size"] * 2)
    assert len({before, recipe, pretrain.tiny_cache_dir()}) == 3


def test_a_lock_file_of_another_user_in_a_shared_cache_still_locks(tmp_path, monkeypatch):
    # flock needs no write access: a lock file this user may only read is opened read-only, and two
    # processes still do not pretrain at once
    real = os.open

    def open_(path, flags, *args):
        if str(path).endswith(".lock") and flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied", path)
        return real(path, flags, *args)

    (tmp_path / "tiny.lock").write_text("")
    monkeypatch.setattr(os, "open", open_)
    with pretrain._pretraining_lock(str(tmp_path / "tiny"), print) as held:
        assert held


# the recipe version the corpus digest below was recorded for, and that digest
_CORPUS = (1, "a202166bad8bd9c5042ef9dc37a8f2fc63081dc676f1233a3de13950574557d7")


def test_the_cache_key_s_recipe_version_covers_the_corpus():
    """The cache folder is named after TINY_CONFIG and RECIPE, not after the corpus code: a change to
    the pretraining corpus or the tokenizer without a RECIPE version bump would leave users on a
    cached model pretrained on the old one. This digest of the tokenizer's vocabulary and the first
    batches changes with them: bump RECIPE["version"] and record the new digest here."""
    import hashlib
    import json
    import random

    from hoptune.data.demo_task import pretraining_batch
    from hoptune.models.tiny import build_tokenizer

    r = pretrain.RECIPE
    tok = build_tokenizer()
    rng = random.Random(r["seed"])
    h = hashlib.sha256(json.dumps(tok.get_vocab(), sort_keys=True).encode())
    for _ in range(3):
        h.update(pretraining_batch(tok, rng, r["batch"], r["seq_len"]).numpy().tobytes())
    assert (r["version"], h.hexdigest()) == _CORPUS, "the corpus changed: bump RECIPE['version']"
