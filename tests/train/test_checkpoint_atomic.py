"""Checkpoint saves killed at any point leave the previous checkpoint or the new one, never none."""

import os
import shutil

import pytest

from hoptune.patch import apply_lora
from hoptune.train import loop


def _kill_between_the_renames(ck, step, model, opt, state, monkeypatch):
    """Save ``step`` again, killed after its folder went aside and before the new one went in (a
    real kill runs no cleanup: the except branch's put-back and the finally's deletion fail too)."""
    final = os.path.join(ck.dir, f"step-{step:08d}")
    real_replace = os.replace

    def killed(src, dst):
        if os.fspath(dst) == final:
            raise SystemExit("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(SystemExit):
        ck.save(step, model, opt, None, state)
    monkeypatch.undo()
    assert not os.path.exists(final)  # set aside, and `latest` still names it


@pytest.mark.parametrize("next_step", [1, 2])
def test_a_checkpoint_a_killed_resave_left_aside_survives_the_next_save(
    tmp_path, small_model, monkeypatch, next_step
):
    """A re-save of step 1 killed between its renames leaves step 1 aside; the next save (of the same
    step or another) that fails (a full disk) must leave it whole, and ``latest`` naming it."""
    model = apply_lora(small_model, r=2, alpha=4)
    opt = loop.build_optimizer(loop.trainable_parameters(model), 1e-2)
    ck = loop.Checkpointer(tmp_path, keep=2)
    ck.save(1, model, opt, None, {"step": 1, "v": "old"})
    _kill_between_the_renames(ck, 1, model, opt, {"step": 1, "v": "new"}, monkeypatch)

    def full_disk(*a, **k):
        raise OSError("No space left on device")

    monkeypatch.setattr(loop.torch, "save", full_disk)
    with pytest.raises(OSError, match="No space"):
        ck.save(next_step, model, opt, None, {"step": next_step})
    monkeypatch.undo()
    assert ck.latest() == os.path.join(ck.dir, "step-00000001")
    assert loop.Checkpointer.read_state(ck.latest()) == {"step": 1, "v": "old"}
    loop.Checkpointer.load(ck.latest(), model, opt, restore_rng=False)
    assert sorted(os.listdir(ck.dir)) == [loop.LATEST, "step-00000001"]  # no leftovers


def test_latest_finds_a_checkpoint_a_killed_resave_left_aside(tmp_path, small_model, monkeypatch):
    """A resumed run (``latest`` on a new Checkpointer) continues from the checkpoint a killed re-save
    set aside, not from an older one or from none."""
    model = apply_lora(small_model, r=2, alpha=4)
    opt = loop.build_optimizer(loop.trainable_parameters(model), 1e-2)
    ck = loop.Checkpointer(tmp_path, keep=3)
    ck.save(1, model, opt, None, {"step": 1})
    ck.save(2, model, opt, None, {"step": 2, "v": "old"})
    _kill_between_the_renames(ck, 2, model, opt, {"step": 2, "v": "new"}, monkeypatch)
    again = loop.Checkpointer(tmp_path, keep=3)
    assert again.latest() == os.path.join(again.dir, "step-00000002")
    assert loop.Checkpointer.read_state(again.latest()) == {"step": 2, "v": "old"}
