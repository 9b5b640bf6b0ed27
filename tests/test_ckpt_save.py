"""save_pretrained_nf4 into a folder that holds a checkpoint already: no crash leaves the files of two
saves side by side, files of an earlier save that this one lacks go, a user's other files stay. And
what it writes for a model that a plain save got wrong: an untied head, a compiled or PEFT-wrapped
model, one built from its config (no architectures)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import hoptune
from hoptune.quant import save_pretrained_nf4
from tests.test_loading import logits, tiny_model

FILES = ("config.json", "model.safetensors", "generation_config.json")


class Crash(BaseException):
    """The process dies: nothing after it runs (no handler cleans up on a kill)."""


def snapshot(folder):
    out = {}
    for name in FILES:
        path = os.path.join(folder, name)
        out[name] = Path(path).read_bytes() if os.path.exists(path) else None
    return out


def user_files(folder):
    os.makedirs(os.path.join(folder, "extra"))
    for name, text in (("README.md", "mine"), ("tokenizer.json", "{}"), ("extra/notes.txt", "keep")):
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)


def assert_user_files(folder):
    for name, text in (("README.md", "mine"), ("tokenizer.json", "{}"), ("extra/notes.txt", "keep")):
        with open(os.path.join(folder, name)) as f:
            assert f.read() == text, name


def _models(new_generates: bool = False):
    old = tiny_model(seed=0)
    old.generation_config.eos_token_id = [2, 5]
    new = tiny_model(seed=1)
    if new_generates:
        new.generation_config.eos_token_id = [2, 7]
    else:
        new.generation_config = None  # no generation settings: the old ones must not stay beside it
    return old, new


def test_a_save_over_a_checkpoint_leaves_no_files_of_the_earlier_one(tmp_path):
    old, new = _models()
    save_pretrained_nf4(old, tmp_path)
    assert os.path.isfile(tmp_path / "generation_config.json")
    user_files(tmp_path)
    save_pretrained_nf4(new, tmp_path, double_quant=False)
    assert not os.path.exists(tmp_path / "generation_config.json")  # the earlier model's stop tokens
    assert_user_files(tmp_path)
    files = ["README.md", "config.json", "extra", "model.safetensors", "tokenizer.json"]
    assert sorted(os.listdir(tmp_path)) == files
    loaded = hoptune.load_model(tmp_path, device="cpu", progress=False)
    assert loaded.generation_config.eos_token_id == 2  # from config.json, as from_pretrained
    save_pretrained_nf4(new, tmp_path / "fresh", double_quant=False)
    fresh = hoptune.load_model(tmp_path / "fresh", device="cpu", progress=False)
    torch.testing.assert_close(logits(loaded), logits(fresh), atol=0, rtol=0)


@pytest.mark.parametrize("new_generates", [True, False], ids=["generation_config", "none"])
def test_a_crash_at_any_point_never_pairs_new_weights_with_an_old_config(
    tmp_path, monkeypatch, new_generates
):
    """Killed before, between or after each rename and removal in the folder, the save leaves the
    old files, the new ones, or no config.json (which names no checkpoint), never a mix."""
    old, new = _models(new_generates)
    save_pretrained_nf4(old, tmp_path / "ref")
    before = snapshot(tmp_path / "ref")
    save_pretrained_nf4(new, tmp_path / "ref", double_quant=False)
    after = snapshot(tmp_path / "ref")
    assert all(before[name] != after[name] for name in FILES)

    mutations = [name for name in ("replace", "rename", "unlink", "remove", "rmdir") if hasattr(os, name)]
    real = {name: getattr(os, name) for name in mutations}
    left = []  # files a killed save left that the next one did not remove
    point = 0
    while True:
        folder = tmp_path / f"crash{point}"
        save_pretrained_nf4(old, folder)
        user_files(folder)
        calls = [0]

        def dying(name, calls=calls, point=point):
            def call(*args, **kwargs):
                calls[0] += 1
                if calls[0] > point:  # dead from this call on
                    raise Crash(name)
                return real[name](*args, **kwargs)

            return call

        for name in mutations:
            monkeypatch.setattr(os, name, dying(name))
        crashed = False
        try:
            save_pretrained_nf4(new, folder, double_quant=False)
        except Crash:
            crashed = True
        finally:
            for name in mutations:
                monkeypatch.setattr(os, name, real[name])
        state = snapshot(folder)
        which = {n: "old" if state[n] == before[n] else "new" if state[n] == after[n] else "?" for n in FILES}
        assert state in (before, after) or state["config.json"] is None, f"killed at {point}: {which}"
        assert_user_files(folder)
        if not crashed:
            assert state == after
            break
        if state["config.json"] is None:  # a folder no loader reads, which says why
            with pytest.raises(FileNotFoundError, match=r"no config.json \(a save into it was stopped"):
                hoptune.load_model(folder, device="cpu", progress=False)
        # the next save finishes the job and leaves nothing of the killed one behind
        save_pretrained_nf4(new, folder, double_quant=False)
        assert snapshot(folder) == after
        left += [n for n in os.listdir(folder) if n.startswith(".")]
        point += 1
    assert not left
    assert point >= 3  # the old config out, the weights and the generation config in (or out), the config in


def test_an_error_while_writing_leaves_the_old_checkpoint_whole(tmp_path, monkeypatch):
    old, new = _models()
    save_pretrained_nf4(old, tmp_path)
    before = snapshot(tmp_path)
    import safetensors.torch

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_pretrained_nf4(new, tmp_path)
    assert snapshot(tmp_path) == before
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]


def test_out_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "ckpt").write_text("")
    with pytest.raises(ValueError, match=r"out_dir .*ckpt' exists and is not a directory"):
        save_pretrained_nf4(tiny_model(), tmp_path / "ckpt")


def test_a_head_untied_in_the_model_is_saved_although_the_config_ties_it(tmp_path):
    # a checkpoint whose head differs from its embeddings loads untied (tie_word_embeddings=True
    # notwithstanding, as from_pretrained); saving it must keep the head, not drop it as a copy
    tiny_model("qwen2", tie=True).save_pretrained(tmp_path / "bf16")
    sd = load_file(tmp_path / "bf16" / "model.safetensors")
    sd["lm_head.weight"] = torch.randn_like(sd["model.embed_tokens.weight"])
    save_file(sd, tmp_path / "bf16" / "model.safetensors", metadata={"format": "pt"})
    model = hoptune.load_model(tmp_path / "bf16", device="cpu", progress=False)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    want = logits(model)
    save_pretrained_nf4(model, tmp_path / "nf4")
    assert "lm_head.weight" in load_file(tmp_path / "nf4" / "model.safetensors")
    loaded = hoptune.load_model(tmp_path / "nf4", device="cpu", progress=False)
    torch.testing.assert_close(logits(loaded), want, atol=0, rtol=0)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", device_map="cpu")
    assert torch.equal(ref.lm_head.weight, model.lm_head.weight)
    # tied in the model: stored once, as save_pretrained does
    tied = tiny_model("qwen2", tie=True)
    save_pretrained_nf4(tied, tmp_path / "tied")
    assert "lm_head.weight" not in load_file(tmp_path / "tied" / "model.safetensors")


def test_config_names_the_architecture_as_save_pretrained_does(tmp_path):
    # a model built from its config has architectures=None; vLLM picks the model class by it
    model = tiny_model()
    assert model.config.architectures is None
    save_pretrained_nf4(model, tmp_path)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["architectures"] == ["LlamaForCausalLM"]


def test_a_save_over_a_sharded_checkpoint_removes_its_shards_and_index(tmp_path):
    # loaders that go by the index (vLLM keeps only the files it lists) would read the old shards,
    # transformers the new model.safetensors; transformers' own save removes such shards too
    model = tiny_model()
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    user_files(tmp_path)
    (tmp_path / "model-00001-of-00002.bin").write_text("not ours to remove")
    save_pretrained_nf4(model, tmp_path)
    assert_user_files(tmp_path)
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("model")) == [
        "model-00001-of-00002.bin",
        "model.safetensors",
    ]


def test_a_compiled_model_saves_as_the_model_it_wraps(tmp_path):
    # torch.compile's wrapper prefixes every module path with "_orig_mod.": saved as such, no key
    # matched the model's and transformers loaded random weights (with a warning only)
    model = tiny_model()
    names = save_pretrained_nf4(torch.compile(model), tmp_path / "compiled")
    assert names == save_pretrained_nf4(model, tmp_path / "plain")
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "compiled" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()


def test_a_peft_model_is_refused(tmp_path):
    # its layers' base weights sit at "...q_proj.base_layer" under "base_model.model.": saved so,
    # transformers matched none of them and loaded random weights in their place
    import peft

    model = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=4, target_modules="all-linear"))
    with pytest.raises(ValueError, match=r"model holds PEFT modules .*merge_and_unload\(\)"):
        save_pretrained_nf4(model, tmp_path)
    assert not os.listdir(tmp_path)
    save_pretrained_nf4(model.merge_and_unload(), tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    assert ref.model.layers[0].self_attn.q_proj.weight.numel() * 2 == 64 * 64  # NF4-packed, as saved
