"""PEFT-format adapters, round trip details: a loaded adapter's base model and revision are saved
again as PEFT's save_pretrained keeps them; errors on a bad file name the file and the key; a
git-lfs pointer in place of the weights is named as such."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch

import hoptune
from tests.test_adapters import ours, tiny_model

BASE = "org/base-model"
REVISION = "3f2c1a9"


def _peft_adapter(base, folder):
    """An adapter PEFT saved for ``BASE`` at ``REVISION`` (get_peft_model's ``revision``)."""
    torch.manual_seed(5)
    targets = ["q_proj", "v_proj"]
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    m = copy.deepcopy(base)
    m.config._name_or_path = m.name_or_path = BASE  # (PEFT reads the model's own name_or_path)
    pm = peft.get_peft_model(m, cfg, revision=REVISION)
    pm.save_pretrained(folder)
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert (saved["base_model_name_or_path"], saved["revision"]) == (BASE, REVISION)


def _config(folder):
    return json.loads((folder / "adapter_config.json").read_text())


# -- base_model_name_or_path / revision ---------------------------------------------------------
def test_resave_keeps_the_loaded_base_and_revision_as_peft_does(tmp_path):
    base = tiny_model()
    _peft_adapter(base, tmp_path / "peft")
    # the base loaded from a local copy: its own name is not the one the adapter records
    model = copy.deepcopy(base)
    model.config._name_or_path = "/data/local-copy"
    hoptune.load_adapter(model, tmp_path / "peft", trainable=True)
    hoptune.save_adapter(model, tmp_path / "ours")
    # PEFT: from_pretrained then save_pretrained writes the loaded config's values back
    local = copy.deepcopy(base)
    local.config._name_or_path = local.name_or_path = "/data/local-copy"
    peft.PeftModel.from_pretrained(local, tmp_path / "peft").save_pretrained(tmp_path / "peft2")
    want = _config(tmp_path / "peft2")
    got = _config(tmp_path / "ours")
    assert (got["base_model_name_or_path"], got["revision"]) == (BASE, REVISION)
    assert (got["base_model_name_or_path"], got["revision"]) == (
        want["base_model_name_or_path"],
        want["revision"],
    )


def test_an_adapter_without_a_base_loaded_over_one_with_it_saves_without_it(tmp_path):
    """A model's LoRA layers forget the base model and revision of the adapter they held before:
    an adapter whose config records none, loaded over one that did, is saved again without them
    (the model's own name, here none), not with the earlier adapter's."""
    base = tiny_model()
    _peft_adapter(base, tmp_path / "peft")
    plain = ours(base, "lora", seed=6, target_modules=["q_proj", "v_proj"])
    hoptune.save_adapter(plain, tmp_path / "plain")
    assert _config(tmp_path / "plain")["base_model_name_or_path"] is None
    model = hoptune.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    hoptune.load_adapter(model, tmp_path / "plain")
    hoptune.save_adapter(model, tmp_path / "again")
    got = _config(tmp_path / "again")
    assert (got["base_model_name_or_path"], got["revision"]) == (None, None)


def test_an_empty_base_in_the_config_reads_as_none(tmp_path):
    """base_model_name_or_path "" in a loaded adapter's config records no base: the adapter saved
    again names the model's own base, not an empty one."""
    base = tiny_model()
    hoptune.save_adapter(ours(base, "lora", seed=7), tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    cfg = _config(tmp_path / "a")
    cfg["base_model_name_or_path"] = ""
    path.write_text(json.dumps(cfg))
    model = copy.deepcopy(base)
    model.config._name_or_path = BASE
    hoptune.load_adapter(model, tmp_path / "a")
    hoptune.save_adapter(model, tmp_path / "again")
    assert _config(tmp_path / "again")["base_model_name_or_path"] == BASE


def test_resave_with_the_same_base_keeps_the_revision_another_base_drops_it(tmp_path):
    base = tiny_model()
    _peft_adapter(base, tmp_path / "peft")
    model = hoptune.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    hoptune.save_adapter(model, tmp_path / "same", base_model_name_or_path=BASE)
    assert _config(tmp_path / "same")["revision"] == REVISION
    # a revision names a commit of the base it was recorded with, not of another one
    hoptune.save_adapter(model, tmp_path / "other", base_model_name_or_path="org/other")
    got = _config(tmp_path / "other")
    assert (got["base_model_name_or_path"], got["revision"]) == ("org/other", None)
    given = dict(base_model_name_or_path="org/other", revision="v2")
    hoptune.save_adapter(model, tmp_path / "given", **given)
    got = _config(tmp_path / "given")
    assert (got["base_model_name_or_path"], got["revision"]) == ("org/other", "v2")


def test_revision_of_a_fresh_adapter(tmp_path):
    model = ours(tiny_model(), "lora")
    hoptune.save_adapter(model, tmp_path / "a")
    assert _config(tmp_path / "a")["revision"] is None
    hoptune.save_adapter(model, tmp_path / "b", base_model_name_or_path=BASE, revision=REVISION)
    got = _config(tmp_path / "b")
    assert (got["base_model_name_or_path"], got["revision"]) == (BASE, REVISION)
    with pytest.raises(TypeError, match="revision must be a str or None, got 3"):
        hoptune.save_adapter(model, tmp_path / "c", revision=3)
    assert not (tmp_path / "c").exists()


def test_loading_another_adapter_replaces_the_recorded_base(tmp_path):
    base = tiny_model()
    _peft_adapter(base, tmp_path / "peft")
    model = hoptune.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    # the same layers, saved without a base or revision: loading it forgets the first one's
    cfg = _config(tmp_path / "peft")
    cfg.update(base_model_name_or_path=None, revision=None)
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(cfg))
    hoptune.load_adapter(model, tmp_path / "peft")
    model.config._name_or_path = "org/mine"
    hoptune.save_adapter(model, tmp_path / "ours")
    got = _config(tmp_path / "ours")
    assert (got["base_model_name_or_path"], got["revision"]) == ("org/mine", None)
    hoptune.remove_lora(model)
    hoptune.apply_lora(model, r=2, alpha=4, target_modules=["q_proj"])
    hoptune.save_adapter(model, tmp_path / "fresh")
    assert _config(tmp_path / "fresh")["revision"] is None


# -- error messages -----------------------------------------------------------------------------
def test_shape_mismatch_names_the_file_and_key(tmp_path):
    hoptune.save_adapter(ours(tiny_model(hidden=64), "lora"), tmp_path)
    with pytest.raises(ValueError, match="shape mismatch") as e:
        hoptune.load_adapter(tiny_model(hidden=32), tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "adapter_model.safetensors") in msg
    # the first layer in the file whose shapes differ, by the keys of its tensors
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight" in msg
    assert "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight" in msg


def test_git_lfs_pointer_is_named(tmp_path):
    hoptune.save_adapter(ours(tiny_model(), "lora"), tmp_path)
    pointer = (
        "version https://git-lfs.github.com/spec/v1\n"
        "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
        "size 123456\n"
    )
    (tmp_path / "adapter_model.safetensors").write_text(pointer)
    with pytest.raises(ValueError, match="git-lfs pointer") as e:
        hoptune.load_adapter(tiny_model(), tmp_path)
    assert "git lfs pull" in str(e.value)
    (tmp_path / "adapter_model.safetensors").unlink()
    (tmp_path / "adapter_model.bin").write_text(pointer)
    with pytest.raises(ValueError, match="git-lfs pointer"):
        hoptune.load_adapter(tiny_model(), tmp_path)
