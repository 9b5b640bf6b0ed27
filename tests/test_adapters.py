"""PEFT-format adapters: what hoptune saves loads in PEFT with the same logits, and the other way
round (LoRA, rsLoRA, DoRA, rank/alpha patterns); bad adapters are clear errors."""

from __future__ import annotations

import copy
import json
import os

import peft
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import hoptune
from hoptune._io import STAGE_PREFIX
from hoptune.adapters import adapter_config, adapter_state_dict
from hoptune.nn import LoRALinear

VARIANTS = {
    "lora": dict(r=4, lora_alpha=8),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True),
    "dora": dict(r=4, lora_alpha=8, use_dora=True),
    "patterns": dict(
        r=4, lora_alpha=8, rank_pattern={"q_proj": 2, "down_proj": 8}, alpha_pattern={"v_proj": 3}
    ),
    # PEFT takes any alpha: a negative one negates the update, 0 turns a layer's LoRA term off
    "negated": dict(r=4, lora_alpha=-8, alpha_pattern={"v_proj": 0}),
    "dora_negated": dict(r=4, lora_alpha=-6, use_dora=True, use_rslora=True),
}


def tiny_model(arch: str = "llama", seed: int = 0, hidden: int = 64, layers: int = 2):
    tf = transformers
    kw = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg_cls, model_cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM),
    }[arch]
    torch.manual_seed(seed)
    return model_cls(cfg_cls(**kw)).eval()


def ids() -> torch.Tensor:
    return torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(model, x=None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids() if x is None else x).logits.double()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def peft_model(base, variant: str, seed: int = 3):
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(target_modules="all-linear", init_lora_weights=False, **VARIANTS[variant])
    return peft.get_peft_model(copy.deepcopy(base), cfg).eval()


def ours(base, variant: str, seed: int = 3, **extra):
    v = dict(VARIANTS[variant])
    kw = dict(r=v.pop("r"), alpha=v.pop("lora_alpha"), init_lora_weights=False, **extra)
    kw.update(v)
    torch.manual_seed(seed)
    m = hoptune.apply_lora(copy.deepcopy(base), **kw)
    with torch.no_grad():  # a magnitude different from ||W|| so DoRA's m matters
        for _, lora in m.named_modules():
            if isinstance(lora, LoRALinear) and lora.lora_magnitude is not None:
                lora.lora_magnitude.mul_(torch.linspace(0.5, 1.5, lora.out_features))
    return m


def snapshot(model):
    return [(n, type(m).__name__) for n, m in model.named_modules()], {
        k: v.clone() for k, v in model.state_dict().items()
    }


def assert_unchanged(model, snap):
    types, state = snap
    assert [(n, type(m).__name__) for n, m in model.named_modules()] == types
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


# -- interop with PEFT ------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_our_adapter_loads_in_peft(variant, tmp_path):
    base = tiny_model()
    model = ours(base, variant)
    want = logits(model)
    assert rel(want, logits(base)) > 1e-3  # the adapter does something
    hoptune.save_adapter(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert rel(logits(loaded), want) <= 1e-5


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_adapter_loads_in_hoptune(variant, tmp_path):
    base = tiny_model()
    pm = peft_model(base, variant)
    if "dora" in variant:
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_magnitude_vector" in name:
                    p.mul_(torch.linspace(0.5, 1.5, p.numel()))
    want = logits(pm)
    pm.save_pretrained(tmp_path)
    model = hoptune.load_adapter(copy.deepcopy(base), tmp_path)
    assert rel(logits(model), want) <= 1e-5
    layers = model.model.layers
    if variant == "patterns":
        assert layers[0].self_attn.q_proj.r == 2 and layers[1].mlp.down_proj.r == 8
        assert layers[0].self_attn.v_proj.scaling == pytest.approx(3 / 4)
    if variant == "negated":
        assert layers[0].self_attn.q_proj.scaling == -2 and layers[0].self_attn.v_proj.scaling == 0
    assert not any(p.requires_grad for p in model.parameters())  # PEFT's default: inference
    hoptune.remove_lora(model)
    model2 = hoptune.load_adapter(model, tmp_path, trainable=True)
    assert {n for n, p in model2.named_parameters() if p.requires_grad} == {
        n for n, _ in model2.named_parameters() if ".lora_" in n
    }


def test_phi3_fused_layers_roundtrip_with_peft(tmp_path):
    base = tiny_model("phi3")
    model = ours(base, "lora")
    hoptune.save_adapter(model, tmp_path / "ours")
    assert (
        rel(logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")), logits(model))
        <= 1e-5
    )
    pm = peft_model(base, "dora")
    pm.save_pretrained(tmp_path / "peft")
    assert rel(logits(hoptune.load_adapter(copy.deepcopy(base), tmp_path / "peft")), logits(pm)) <= 1e-5


def test_qlora_adapter_roundtrip(tmp_path):
    base = tiny_model()
    model = ours(base, "dora", quantize="nf4")
    hoptune.save_adapter(model, tmp_path)
    again = hoptune.load_adapter(copy.deepcopy(base), tmp_path, quantize="nf4")
    assert rel(logits(again), logits(model)) <= 1e-6


# -- the files --------------------------------------------------------------------------------
def test_saved_files_are_peft_format(tmp_path):
    model = ours(tiny_model(), "dora")
    hoptune.save_adapter(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
        a = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        b = f.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
        m = f.get_tensor("base_model.model.model.layers.0.mlp.down_proj.lora_magnitude_vector")
    assert a.shape == (4, 64) and b.shape == (64, 4) and m.shape == (64,)
    assert a.dtype == b.dtype == m.dtype == torch.float32
    assert len(keys) == 14 * 3
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["use_dora"] is True and cfg["use_rslora"] is False
    assert cfg["target_modules"] == [
        "down_proj",
        "gate_proj",
        "k_proj",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]
    assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {}
    for field in ("lora_dropout", "bias", "fan_in_fan_out", "modules_to_save", "base_model_name_or_path"):
        assert field in cfg


def test_partial_targets_are_written_as_full_paths(tmp_path):
    model = hoptune.apply_lora(tiny_model(), r=2, target_modules=r"model\.layers\.1\.self_attn\.q_proj")
    hoptune.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["model.layers.1.self_attn.q_proj"]
    again = hoptune.load_adapter(tiny_model(), tmp_path)
    assert [n for n, m in again.named_modules() if isinstance(m, LoRALinear)] == [
        "model.layers.1.self_attn.q_proj"
    ]


def test_save_is_atomic(tmp_path, monkeypatch):
    model = ours(tiny_model(), "lora")
    hoptune.save_adapter(model, tmp_path)
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}

    def broken(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        hoptune.save_adapter(ours(tiny_model(), "lora", seed=9), tmp_path)
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before  # no temp files left


def test_load_into_a_patched_model_replaces_weights(tmp_path):
    base = tiny_model()
    src = ours(base, "lora", seed=4)
    hoptune.save_adapter(src, tmp_path)
    dst = ours(base, "lora", seed=5)
    hoptune.load_adapter(dst, tmp_path)
    assert rel(logits(dst), logits(src)) <= 1e-7
    other_rank = hoptune.apply_lora(copy.deepcopy(base), r=2)
    snap = snapshot(other_rank)
    with pytest.raises(ValueError, match="rank 4|r=2"):
        hoptune.load_adapter(other_rank, tmp_path)
    assert_unchanged(other_rank, snap)


@pytest.mark.parametrize("layers", [dict(alpha=16), dict(alpha=8, use_rslora=True)])
def test_load_into_lora_layers_of_another_scale_is_refused(tmp_path, layers):
    """LoRA layers in place with the adapter's rank but another scaling (another alpha, or rsLoRA's
    alpha / sqrt(r) for the adapter's alpha / r) are refused, not given weights that they would
    scale differently from the adapter's training."""
    base = tiny_model()
    hoptune.save_adapter(ours(base, "lora", seed=4), tmp_path)  # r=4, alpha=8: scaling 2
    model = hoptune.apply_lora(copy.deepcopy(base), r=4, **layers)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"scaling=(4|2).*differs from the adapter's \(r=4, scaling=2"):
        hoptune.load_adapter(model, tmp_path)
    assert_unchanged(model, snap)


# -- bad adapters: clear errors, model unchanged ----------------------------------------------
@pytest.fixture
def saved(tmp_path):
    model = ours(tiny_model(), "lora")
    hoptune.save_adapter(model, tmp_path)
    return tmp_path


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _put_tensor(folder, key, value):
    """Set tensor ``base_model.model.<key>`` of the adapter file in ``folder``."""
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors[f"base_model.model.{key}"] = value
    save_file(tensors, path, metadata={"format": "pt"})


def assert_refused(folder, match):
    """load_adapter refuses the adapter in ``folder`` with ``match`` and leaves the model unchanged."""
    model = tiny_model()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        hoptune.load_adapter(model, folder)
    assert_unchanged(model, snap)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"some_future_field": 1}, "does not know.*some_future_field"),
        ({"some_future_field": 0}, "does not know.*some_future_field"),  # 0 == False, but not off
        ({"some_future_field": "on", "other_field": None}, r"does not know: \{'some_future_field': 'on'\}"),
        ({"lora_bias": True}, "lora_bias=True is not supported"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"layers_to_transform": [0]}, "layers_to_transform"),
        ({"fan_in_fan_out": 1}, "fan_in_fan_out must be true or false"),
        ({"peft_type": "IA3"}, "peft_type must be 'LORA'"),
        ({"r": 8}, "has rank 4 but the config"),
        ({"use_dora": True}, "lacks lora_magnitude_vector"),
        ({"target_modules": ["q_proj"]}, "target_modules selects"),
        ({"alpha_pattern": {"q_proj": "x"}}, r"alpha_pattern\['q_proj'\] must be a finite number"),
        ({"lora_alpha": "16"}, "lora_alpha must be a finite number, got '16'"),
        ({"rank_pattern": {"q_proj": "4"}}, r"rank_pattern\['q_proj'\] must be a positive int"),
        ({"rank_pattern": {"(": 4}}, "rank_pattern key '\\(' is not a valid regular expression"),
        # initializations that change the base weights (PEFT recomputes them on load): the A / B on
        # disk alone do not describe the adapter (PEFT can convert it to a plain LoRA)
        *[
            ({"init_lora_weights": init}, f"init_lora_weights={init!r}.*base weights")
            for init in ("pissa", "pissa_niter_4", "olora", "corda", "loftq")
        ],
        # errors that name the file
        ({"target_modules": 5}, r"adapter_config\.json: target_modules must be"),
        ({"target_modules": []}, r"adapter_config\.json: target_modules must be"),
        ({"exclude_modules": 3}, r"adapter_config\.json: exclude_modules must be"),
        # layers_to_transform / layers_pattern as PEFT's LoraConfig accepts them
        ({"layers_to_transform": "0"}, "layers_to_transform must be a layer index or a list of them"),
        (
            {"layers_to_transform": [0], "target_modules": ".*q_proj"},
            "layers_to_transform.*list target_modules",
        ),
        ({"layers_to_transform": [0], "layers_pattern": 3}, "layers_pattern must be"),
        (
            {"layers_to_transform": [0], "layers_pattern": "("},
            "layers_pattern.*not a valid regular expression",
        ),
    ],
)
def test_bad_config(saved, changes, match):
    _edit_config(saved, **changes)
    assert_refused(saved, match)


@pytest.mark.parametrize("off", [None, False, [], {}])
def test_unknown_fields_set_off_load_with_a_warning(saved, off):
    """A newer PEFT's config adds fields whose default switches a feature off: they cannot change
    what the adapter computes, so the adapter loads (a warning names them) with the same outputs."""
    model = tiny_model()
    want = logits(hoptune.load_adapter(copy.deepcopy(model), saved))
    _edit_config(saved, some_future_field=off)
    with pytest.warns(UserWarning, match=r"ignored: \['some_future_field'\]"):
        got = logits(hoptune.load_adapter(model, saved))
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    "other, match",
    [
        (dict(arch="phi3"), "another model.*has no module"),
        (dict(layers=1), "has no module 'model.layers.1"),
        (dict(hidden=128), "shape mismatch"),
    ],
)
def test_adapter_for_another_model(saved, other, match):
    model = tiny_model(**other)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        hoptune.load_adapter(model, saved)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_peft_bin_adapter_loads(variant, tmp_path):
    """PEFT's ``safe_serialization=False`` writes ``adapter_model.bin`` (a torch pickle): read as
    PEFT reads it (``weights_only``), the same outputs as PEFT's model."""
    base = tiny_model()
    pm = peft_model(base, variant)
    want = logits(pm)
    pm.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file()
    assert not (tmp_path / "adapter_model.safetensors").exists()
    model = hoptune.load_adapter(copy.deepcopy(base), tmp_path)
    assert rel(logits(model), want) <= 1e-5


def test_bad_bin_adapters_are_refused(saved):
    """A truncated .bin, and a pickle that would run code or holds something other than a dict
    of tensors, are errors naming the file; the model is left as it was."""
    model = tiny_model()
    snap = snapshot(model)
    from safetensors.torch import load_file

    state = load_file(saved / "adapter_model.safetensors")
    (saved / "adapter_model.safetensors").unlink()
    bin_path = saved / "adapter_model.bin"
    torch.save(state, bin_path)
    data = bin_path.read_bytes()
    bin_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="(?s)adapter_model.bin.*truncated or corrupt"):
        hoptune.load_adapter(model, saved)
    torch.save({"weights": state, "step": object()}, bin_path)  # not loadable with weights_only
    with pytest.raises(ValueError, match="(?s)adapter_model.bin.*other than tensors"):
        hoptune.load_adapter(model, saved)
    torch.save([1, 2], bin_path)
    with pytest.raises(
        ValueError, match="adapter_model.bin must hold a dict of tensor names to tensors, got list"
    ):
        hoptune.load_adapter(model, saved)
    torch.save({**state, 7: next(iter(state.values()))}, bin_path)  # a key that is no name
    with pytest.raises(ValueError, match="adapter_model.bin must hold a dict of tensor names to tensors"):
        hoptune.load_adapter(model, saved)
    assert_unchanged(model, snap)


def test_truncated_and_missing_files(saved, tmp_path_factory):
    model = tiny_model()
    snap = snapshot(model)
    weights = saved / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="adapter_model.safetensors.*truncated or corrupt"):
        hoptune.load_adapter(model, saved)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        hoptune.load_adapter(model, saved)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        hoptune.load_adapter(model, saved / "nope")
    (saved / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        hoptune.load_adapter(model, saved)
    assert_unchanged(model, snap)


def test_unknown_tensor_keys(saved):
    path = saved / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"] = torch.zeros(64)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lora_B.bias.*not a LoRA A/B"):
        hoptune.load_adapter(tiny_model(), saved)


def test_save_without_lora_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers"):
        hoptune.save_adapter(tiny_model(), tmp_path)
    assert not os.listdir(tmp_path)


def test_peft_pissa_adapter_is_refused_not_loaded_wrongly(tmp_path):
    base = tiny_model()
    cfg = peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, init_lora_weights="pissa")
    peft.get_peft_model(copy.deepcopy(base), cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="init_lora_weights='pissa'"):
        hoptune.load_adapter(copy.deepcopy(base), tmp_path)


@pytest.mark.parametrize("init", ["gaussian", "eva", "orthogonal", "mica", True, False])
def test_inits_that_leave_the_base_alone_load(saved, init):
    _edit_config(saved, init_lora_weights=init)
    hoptune.load_adapter(tiny_model(), saved)


def test_peft_adapter_with_empty_exclude_modules_loads(tmp_path):
    base = tiny_model()
    torch.manual_seed(0)
    cfg = peft.LoraConfig(
        target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, exclude_modules=[], init_lora_weights=False
    )
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    pm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["exclude_modules"] == []
    assert rel(logits(hoptune.load_adapter(copy.deepcopy(base), tmp_path)), logits(pm)) <= 1e-6


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(quantize="nf4", blocksize=0), "blocksize must be one of"),
        (dict(quantize="nf4", blocksize=100), "blocksize must be one of"),
        (dict(trainable="yes"), "trainable must be True or False"),
    ],
)
def test_load_adapter_bad_arguments(saved, kwargs, match):
    model = tiny_model()
    snap = snapshot(model)
    with pytest.raises((ValueError, TypeError), match=match):
        hoptune.load_adapter(model, saved, **kwargs)
    assert_unchanged(model, snap)


def test_save_warns_about_trainable_parameters_it_does_not_hold(tmp_path):
    """An unfrozen bias (or any parameter besides the LoRA factors) is not in PEFT's adapter: saving
    says so instead of dropping its training silently; a plain LoRA model saves without a word."""
    import warnings

    model = hoptune.apply_lora(tiny_model(), r=2, target_modules=["q_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hoptune.save_adapter(model, tmp_path / "plain")
    model.model.norm.weight.requires_grad_(True)
    with pytest.warns(UserWarning, match=r"1 other trainable parameter\(s\).*model\.norm\.weight"):
        hoptune.save_adapter(model, tmp_path / "with_norm")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_peft_adapter_on_the_output_head_loads(arch, tmp_path):
    """PEFT saves a LoRA on ``lm_head`` with a copy of the head's weight (its
    ``save_embedding_layers="auto"``): a copy equal to the model's own head loads; one that differs
    (a resized or retrained head) is refused, as hoptune does not replace base weights."""
    base = tiny_model(arch)
    torch.manual_seed(0)
    cfg = peft.LoraConfig(target_modules=["q_proj", "lm_head"], r=4, lora_alpha=8, init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    pm.save_pretrained(tmp_path)
    assert "base_model.model.lm_head.base_layer.weight" in load_file(tmp_path / "adapter_model.safetensors")
    assert rel(logits(hoptune.load_adapter(copy.deepcopy(base), tmp_path)), logits(pm)) <= 1e-6

    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.lm_head.base_layer.weight"][0, 0] += 1.0
    save_file(tensors, path, metadata={"format": "pt"})
    model = copy.deepcopy(base)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="lm_head.base_layer.weight.*differs from the model's"):
        hoptune.load_adapter(model, tmp_path)
    assert_unchanged(model, snap)


def test_peft_head_copy_in_fp32_loads_into_a_bf16_model(tmp_path):
    """PEFT's fp32 copy of the output head's weight (saved from the fp32 model) matches the same
    model loaded in bf16: the copy is compared in the coarser dtype, so the bf16 head, the fp32
    values rounded, is the model's own head and the adapter loads."""
    base = tiny_model()
    torch.manual_seed(0)
    cfg = peft.LoraConfig(target_modules=["q_proj", "lm_head"], r=4, lora_alpha=8, init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    pm.save_pretrained(tmp_path)
    stored = load_file(tmp_path / "adapter_model.safetensors")["base_model.model.lm_head.base_layer.weight"]
    assert stored.dtype == torch.float32 and not torch.equal(stored.bfloat16().float(), stored)
    model = hoptune.load_adapter(copy.deepcopy(base).to(torch.bfloat16), tmp_path)
    assert isinstance(model.lm_head, LoRALinear)
    assert rel(logits(model), logits(pm)) <= 0.05


def test_base_weight_copy_of_an_nf4_layer_is_refused_saying_so(tmp_path):
    """PEFT's copy of a layer's base weight cannot be compared with a layer the model holds in
    NF4: the adapter is refused naming the copy and the NF4 layer, and the model is unchanged."""
    base = tiny_model()
    hoptune.save_adapter(ours(base, "lora"), tmp_path)
    key = "model.layers.0.self_attn.q_proj"
    _put_tensor(tmp_path, f"{key}.base_layer.weight", base.get_submodule(key).weight.detach().clone())
    model = hoptune.apply_lora(copy.deepcopy(base), r=4, alpha=8, quantize="nf4")
    snap = snapshot(model)
    with pytest.raises(ValueError, match=rf"{key}\.base_layer\.weight is PEFT's copy.*model's NF4 {key}"):
        hoptune.load_adapter(model, tmp_path)
    assert_unchanged(model, snap)


# -- module paths that nest: what the config selects and the patterns match -------------------
class _Block(torch.nn.Module):
    def __init__(self, inner: bool = False):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)
        self.x = _Block() if inner else None

    def forward(self, h):
        h = h + torch.tanh(self.proj(h))
        return h if self.x is None else self.x(h)


class _Nested(torch.nn.Module):
    """Linear layers ``x.proj``, ``y.proj``, ``y.x.proj`` (whose path ends with ``x.proj``) and
    ``z.proj``; with ``norm`` also a LayerNorm ``norm.proj`` that shares their last name component."""

    def __init__(self, norm: bool = True):
        super().__init__()
        self.x, self.y, self.z = _Block(), _Block(inner=True), _Block()
        self.norm = torch.nn.ModuleDict({"proj": torch.nn.LayerNorm(16)}) if norm else None

    def forward(self, h):
        h = self.z(self.y(self.x(h)))
        return h if self.norm is None else self.norm["proj"](h)


def _nested_out(model) -> torch.Tensor:
    h = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model(h).double()


def _adapted(model) -> list[str]:
    """The adapted module paths of a hoptune or a PEFT model, without PEFT's prefix."""
    out = []
    for n, m in model.named_modules():
        if isinstance(m, LoRALinear) or isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict):
            out.append(n.removeprefix("base_model.model."))
    return sorted(out)


@pytest.mark.parametrize(
    "kwargs",
    [
        # a layer whose path ends with another's (y.x.proj / x.proj) gets its own rank / alpha
        dict(rank_pattern={r"^x\.proj$": 2}),
        dict(alpha_pattern={r"^x\.proj$": 4}),
        dict(rank_pattern={r"^y\.x\.proj$": 2}, alpha_pattern={r"^z\.proj$": 4}),
    ],
)
def test_patterns_for_nested_paths_roundtrip_with_peft(kwargs, tmp_path):
    """A per-layer rank / alpha is written as a key that matches that layer only: ``x\\.proj``
    alone also matches ``y.x.proj`` (PEFT matches keys against the end of a name), which gave
    ``y.x.proj`` the rank of ``x.proj`` (PEFT refused the shapes) or, silently, its alpha."""
    base = _Nested(norm=False).eval()
    torch.manual_seed(1)
    model = hoptune.apply_lora(copy.deepcopy(base), r=4, alpha=8, init_lora_weights=False, **kwargs)
    want = _nested_out(model)
    hoptune.save_adapter(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert rel(_nested_out(pm), want) <= 1e-6
    again = hoptune.load_adapter(copy.deepcopy(base), tmp_path)
    assert rel(_nested_out(again), want) <= 1e-7
    scales = {n: m.scaling for n, m in again.named_modules() if isinstance(m, LoRALinear)}
    assert scales == {n: m.scaling for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@pytest.mark.parametrize(
    "pattern",
    [
        {"p_proj": 2},
        {"mlp.up_proj": 2},
        {"up_proj|o_proj": 2},
        {"layers.1.*": 2},
        {"q_proj": 2, r"layers\.0\.self_attn\.q_proj": 8},  # (both match: the first key wins)
    ],
)
def test_rank_pattern_keys_match_as_in_peft(pattern):
    """A pattern key matches the end of a layer's path at a dot (PEFT's get_pattern_key:
    ``(.*\\.)?(key)$``): "p_proj" is not the end of "mlp.up_proj"."""
    import warnings

    base = tiny_model()
    pm = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(target_modules="all-linear", r=4, rank_pattern=pattern)
    )
    want = {
        n.removeprefix("base_model.model."): m.r["default"]
        for n, m in pm.named_modules()
        if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a key that matches no layer is warned of)
        model = hoptune.apply_lora(copy.deepcopy(base), r=4, rank_pattern=pattern)
    got = {n: m.r for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert got == want and len(set(got.values())) == (1 if "p_proj" in pattern else 2)


@pytest.mark.parametrize(
    "target, adapted",
    [
        (r"x\.proj", ["x.proj"]),  # the list ["x.proj"] would select y.x.proj too
        (r"y\.x\.proj|z\.proj", ["y.x.proj", "z.proj"]),  # full paths that select no more
        # ["proj"] would select the LayerNorm norm.proj (PEFT refused it; hoptune refused its own file)
        ("all-linear", ["x.proj", "y.proj", "y.x.proj", "z.proj"]),
    ],
)
def test_target_modules_select_exactly_the_adapted_layers(target, adapted, tmp_path):
    """The saved target_modules select, under PEFT's rules and among all modules (not only linear
    ones), exactly the layers in the file: PEFT then adapts no extra layer (nor fails on a LayerNorm
    that shares a name), and hoptune loads what it saved."""
    base = _Nested().eval()
    torch.manual_seed(1)
    model = hoptune.apply_lora(
        copy.deepcopy(base), r=2, alpha=4, target_modules=target, init_lora_weights=False
    )
    assert _adapted(model) == adapted
    want = _nested_out(model)
    hoptune.save_adapter(model, tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert _adapted(pm) == adapted
    assert rel(_nested_out(pm), want) <= 1e-6
    again = hoptune.load_adapter(copy.deepcopy(base), tmp_path)
    assert _adapted(again) == adapted
    assert rel(_nested_out(again), want) <= 1e-7


# -- saving: the pair of files, the arguments --------------------------------------------------
def test_failed_config_write_leaves_the_previous_adapter_whole(tmp_path, monkeypatch):
    """The disk filling up while the config is written must not leave the new weights beside the
    old config: with the same shapes they would load with the old alpha, silently."""
    import builtins

    hoptune.save_adapter(ours(tiny_model(), "lora"), tmp_path)
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    real_open = builtins.open

    def full_disk(file, mode="r", *args, **kwargs):
        if "adapter_config.json" in os.fspath(file) and any(c in mode for c in "wax"):
            raise OSError(28, "No space left on device")
        return real_open(file, mode, *args, **kwargs)

    other = hoptune.apply_lora(tiny_model(), r=4, alpha=32, init_lora_weights=False)
    monkeypatch.setattr(builtins, "open", full_disk)
    with pytest.raises(OSError, match="No space left"):
        hoptune.save_adapter(other, tmp_path)
    monkeypatch.undo()
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before  # no temp files left


def test_base_model_name_or_path_may_be_a_path(tmp_path):
    import pathlib

    model = ours(tiny_model(), "lora")
    hoptune.save_adapter(model, tmp_path / "a", base_model_name_or_path=pathlib.Path("models/base"))
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == os.path.join("models", "base")
    with pytest.raises(TypeError, match="base_model_name_or_path must be a str, a path or None, got 5"):
        hoptune.save_adapter(model, tmp_path / "b", base_model_name_or_path=5)
    assert not (tmp_path / "b").exists()


def test_save_and_load_through_torch_compile(tmp_path):
    """torch.compile's wrapper puts ``_orig_mod.`` in front of every module path: not a part of the
    model's paths, so not of the keys (PEFT ignored such keys and loaded the base model alone)."""
    base = tiny_model()
    model = ours(base, "lora")
    want = logits(model)
    hoptune.save_adapter(torch.compile(model), tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert all(k.startswith("base_model.model.model.layers.") for k in keys)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert rel(logits(pm), want) <= 1e-6
    compiled = torch.compile(copy.deepcopy(base))
    assert hoptune.load_adapter(compiled, tmp_path) is compiled
    assert rel(logits(compiled._orig_mod), want) <= 1e-7


def test_peft_adapter_saved_from_a_compiled_model_loads(tmp_path):
    """get_peft_model on a torch.compile'd model saves keys with ``_orig_mod.``, which PEFT's own
    loader strips when it matches them to modules (``_orig_mod.`` is the wrapper's, no part of the
    model's paths): load_adapter refused them as an adapter for another model."""
    base = tiny_model()
    torch.manual_seed(2)
    cfg = peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, init_lora_weights=False)
    pm = peft.get_peft_model(torch.compile(copy.deepcopy(base)), cfg)
    pm.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert keys and all(k.startswith("base_model.model._orig_mod.model.layers.") for k in keys)
    want = logits(pm.base_model.model._orig_mod)  # the adapted model, run uncompiled
    assert rel(want, logits(base)) > 1e-3
    assert rel(logits(hoptune.load_adapter(copy.deepcopy(base), tmp_path)), want) <= 1e-6
    compiled = torch.compile(copy.deepcopy(base))
    assert hoptune.load_adapter(compiled, tmp_path) is compiled
    assert rel(logits(compiled._orig_mod), want) <= 1e-6


@pytest.fixture
def process_group():
    """A one-process gloo group on the CPU, as DistributedDataParallel needs one."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _data_parallel(model):
    return torch.nn.DataParallel(model)


def _ddp(model):
    return torch.nn.parallel.DistributedDataParallel(model)


@pytest.mark.parametrize("wrap", [_data_parallel, _ddp, lambda m: torch.compile(_ddp(m))])
def test_save_through_a_data_parallel_wrapper(wrap, process_group, tmp_path):
    """DataParallel / DistributedDataParallel put ``module.`` in front of every module path: the
    keys held it, and PEFT loaded none of them (a warning, then the base model alone)."""
    base = tiny_model()
    model = ours(base, "lora")
    want = logits(model)
    wrapped = wrap(model)
    hoptune.save_adapter(wrapped, tmp_path)
    state = adapter_state_dict(wrapped)
    assert state.keys() == load_file(tmp_path / "adapter_model.safetensors").keys()
    assert all(k.startswith("base_model.model.model.layers.") for k in state)
    assert adapter_config(wrapped)["task_type"] == "CAUSAL_LM"
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert rel(logits(pm), want) <= 1e-6


@pytest.mark.parametrize("wrap", [_data_parallel, _ddp])
def test_load_into_a_data_parallel_wrapper_says_what_to_do(wrap, process_group, saved):
    """LoRA layers made inside the wrapper would not be synchronized by it; before, the adapter was
    refused as one for another model."""
    model = wrap(tiny_model())
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"model is wrapped in \w*DataParallel: load the adapter"):
        hoptune.load_adapter(model, saved)
    assert_unchanged(model, snap)


@pytest.mark.parametrize(
    "old, new",
    [
        ("base_model.model.", "base_model.model.module."),
        (".layers.0.", "._fsdp_wrapped_module.layers.0._fsdp_wrapped_module."),
    ],
)
def test_keys_saved_through_a_parallel_wrapper_are_refused_naming_it(saved, old, new):
    """Keys saved from a model inside DataParallel / DistributedDataParallel / FSDP hold the
    wrapper's ``module.``; PEFT loads none of them. The error said "another model"."""
    path = saved / "adapter_model.safetensors"
    save_file({k.replace(old, new): v for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
    model = tiny_model()
    snap = snapshot(model)
    with pytest.raises(
        ValueError, match=r"module paths of a wrapped model.*'module\.' / '_fsdp_wrapped_module\.'"
    ):
        hoptune.load_adapter(model, saved)
    assert_unchanged(model, snap)


# -- loading: PEFT's copies of base weights ----------------------------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_peft_adapter_with_saved_embedding_layers_loads(arch, tmp_path):
    """``save_pretrained(save_embedding_layers=True)`` (or PEFT's "auto" after a vocabulary resize)
    adds full copies of the input and output embeddings: copies equal to the model's own load, as
    in PEFT; copies that differ (a resized or retrained vocabulary) are refused, not dropped."""
    base = tiny_model(arch)
    torch.manual_seed(0)
    cfg = peft.LoraConfig(target_modules=["q_proj"], r=4, lora_alpha=8, init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    pm.save_pretrained(tmp_path, save_embedding_layers=True)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    assert {"base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"} <= tensors.keys()
    assert rel(logits(hoptune.load_adapter(copy.deepcopy(base), tmp_path)), logits(pm)) <= 1e-6

    tensors["base_model.model.model.embed_tokens.weight"] = torch.cat(
        [tensors["base_model.model.model.embed_tokens.weight"], torch.zeros(2, 64)]
    )
    save_file(tensors, path, metadata={"format": "pt"})
    model = copy.deepcopy(base)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight.*differs from the model's.*resized"):
        hoptune.load_adapter(model, tmp_path)
    assert_unchanged(model, snap)


@pytest.mark.parametrize(
    "key, value, match",
    [
        # PEFT saves whole weights of the embedding layers only (and of modules_to_save, which is off)
        ("model.layers.0.mlp.up_proj.weight", torch.zeros(128, 64), r"mlp\.up_proj\.weight.*not a LoRA A/B"),
        (
            "lm_head.weight",
            torch.zeros(128, 64, dtype=torch.int64),
            r"lm_head\.weight must hold floating-point",
        ),
        ("lm_head.bias", torch.zeros(128), r"lm_head\.bias.*model's lm_head has no bias"),
    ],
)
def test_bad_copies_of_base_weights_are_refused(saved, key, value, match):
    _put_tensor(saved, key, value)
    assert_refused(saved, match)


# -- clearer errors ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key, value, match",
    [
        ("lora_A.weight", torch.zeros(4, 64, dtype=torch.int32), r"q_proj\.lora_A\.weight must hold finite"),
        ("lora_B.weight", torch.full((64, 4), float("nan")), r"q_proj\.lora_B\.weight must hold finite"),
        ("lora_B.weight", torch.zeros(64, 2), r"q_proj: lora_A\.weight has rank 4 but lora_B\.weight has 2"),
    ],
)
def test_bad_tensors_name_the_key(saved, key, value, match):
    _put_tensor(saved, f"model.layers.0.self_attn.q_proj.{key}", value)
    assert_refused(saved, match)


@pytest.mark.parametrize("shape", [(1,), (32,), (64, 1)])
def test_dora_magnitude_of_another_shape_is_refused(tmp_path, shape):
    """A DoRA adapter whose lora_magnitude_vector is not [out] of its layer (one value that would
    broadcast over every output, a vector of another layer's size, a column) is refused naming
    the key, before the model is changed."""
    hoptune.save_adapter(ours(tiny_model(), "dora"), tmp_path)
    key = "model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    _put_tensor(tmp_path, key, torch.rand(shape) + 0.5)
    assert_refused(tmp_path, rf"shape mismatch for .*q_proj.*{key}.* must be \[64\]")


@pytest.mark.parametrize(
    "extra, adapted_layers",
    [
        (dict(layers_to_transform=[1]), {1}),
        (dict(layers_to_transform=0), {0}),
        (dict(layers_to_transform=[0, 1], layers_pattern="layers"), {0, 1}),
        (dict(layers_to_transform=[1], layers_pattern=["h", "layers"]), {1}),
        (dict(layers_to_transform=[1], layers_pattern=""), {1}),
    ],
)
def test_peft_adapter_with_layers_to_transform_loads(extra, adapted_layers, tmp_path):
    """PEFT's layers_to_transform (with layers_pattern) only narrows which layers target_modules
    selects: such an adapter loads, with LoRA on exactly the layers PEFT adapted."""
    base = tiny_model()
    torch.manual_seed(0)
    cfg = peft.LoraConfig(
        target_modules=["q_proj", "down_proj"], r=4, lora_alpha=8, init_lora_weights=False, **extra
    )
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    pm.save_pretrained(tmp_path)
    model = hoptune.load_adapter(copy.deepcopy(base), tmp_path)
    assert rel(logits(model), logits(pm)) <= 1e-6
    assert _adapted(model) == _adapted(pm)
    assert {int(n.split(".")[2]) for n in _adapted(model)} == adapted_layers


class _Experts(torch.nn.Module):
    """model.layers.<i>.{proj, experts.<j>.proj} and model.sublayers.<i>.proj: a layer index
    followed by an expert index, and a component that ends with "layers"."""

    def __init__(self):
        super().__init__()

        def block():
            b = torch.nn.Module()
            b.proj = torch.nn.Linear(8, 8)
            b.experts = torch.nn.ModuleList(torch.nn.Module() for _ in range(3))
            for e in b.experts:
                e.proj = torch.nn.Linear(8, 8)
            return b

        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList(block() for _ in range(3))
        self.model.sublayers = torch.nn.ModuleList(block() for _ in range(3))

    def forward(self, x):
        for b in [*self.model.layers, *self.model.sublayers]:
            x = x + b.proj(x) + sum(e.proj(x) for e in b.experts)
        return x


@pytest.mark.parametrize("pattern", [None, "layers", ["sublayers"]])
@pytest.mark.parametrize("layers", [[1], [2, 0]])
def test_layers_to_transform_takes_the_layer_index_as_peft(pattern, layers, tmp_path):
    """The layer index is the first number after a name component (not an expert's index after
    it), and a layers_pattern names a whole component ("layers" is not the end of "sublayers")."""
    torch.manual_seed(0)
    base = _Experts().eval()
    cfg = peft.LoraConfig(
        target_modules=["proj"],
        layers_to_transform=layers,
        layers_pattern=pattern,
        r=2,
        lora_alpha=4,
        init_lora_weights=False,
    )
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    pm.save_pretrained(tmp_path)
    model = hoptune.load_adapter(copy.deepcopy(base), tmp_path).eval()
    assert _adapted(model) == _adapted(pm)
    assert any(".experts." in n for n in _adapted(pm)) and len(_adapted(pm)) < 24
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert rel(model(x), pm(x)) <= 1e-6


def test_layers_pattern_that_matches_without_the_layer_index_selects_as_peft(tmp_path):
    r"""A layers_pattern with a '|' outside a group ("h|layers": PEFT's regex reads as ``(?:^|.*?\.)h``
    or ``layers\.(?P<idx>\d+)\.``) matches GPT-2's ``transformer.h.0.attn.c_attn`` without capturing
    the layer index: PEFT takes that as not in layers_to_transform and adapts only the output head
    the list names in full. Such an adapter loads as in PEFT (it was a TypeError), with a warning
    naming the layers the pattern left out."""
    cfg = transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=128, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(cfg).eval()
    lora = peft.LoraConfig(
        target_modules=["c_attn", "lm_head"],
        layers_to_transform=[0, 1],
        layers_pattern="h|layers",
        r=4,
        lora_alpha=8,
        init_lora_weights=False,
    )
    pm = peft.get_peft_model(copy.deepcopy(base), lora).eval()
    assert _adapted(pm) == ["lm_head"]
    pm.save_pretrained(tmp_path)
    left_out = r"\['transformer\.h\.0\.attn\.c_attn', 'transformer\.h\.1\.attn\.c_attn'\]"
    with pytest.warns(
        UserWarning, match=rf"layers_pattern='h\|layers' matches {left_out} without .* not adapted"
    ):
        model = hoptune.load_adapter(copy.deepcopy(base), tmp_path)
    assert _adapted(model) == ["lm_head"]
    assert rel(logits(model), logits(pm)) <= 1e-6


def test_peft_adapter_with_layers_to_transform_and_a_full_path_loads(tmp_path):
    """PEFT filters by layers_to_transform only the modules a target_modules entry matches as a
    suffix: a module the list names in full is adapted in any layer, and so it is in hoptune."""
    base = tiny_model()
    torch.manual_seed(0)
    cfg = peft.LoraConfig(
        target_modules=["model.layers.1.self_attn.q_proj", "v_proj"],
        layers_to_transform=[0],
        r=4,
        lora_alpha=8,
        init_lora_weights=False,
    )
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    assert _adapted(pm) == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj"]
    pm.save_pretrained(tmp_path)
    model = hoptune.load_adapter(copy.deepcopy(base), tmp_path)
    assert _adapted(model) == _adapted(pm)
    assert rel(logits(model), logits(pm)) <= 1e-6


def test_regex_targets_load_into_a_model_that_has_the_adapter_layers(tmp_path):
    """A PEFT regex that also matches below a layer (``.*q_proj.*``) selects the same layers in a
    model that already has LoRA layers (resuming, or loading new weights): the LoRALinear's own
    lora_dropout, which the base layer PEFT matched against did not have, is not a target."""
    base = tiny_model()
    torch.manual_seed(0)
    cfg = peft.LoraConfig(
        target_modules=r".*q_proj.*", r=4, lora_alpha=8, lora_dropout=0.1, init_lora_weights=False
    )
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    pm.save_pretrained(tmp_path)
    model = hoptune.load_adapter(
        hoptune.apply_lora(copy.deepcopy(base), r=4, alpha=8, dropout=0.1, target_modules=["q_proj"]),
        tmp_path,
    )
    assert _adapted(model) == _adapted(pm)
    assert rel(logits(model.eval()), logits(pm)) <= 1e-6


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_peft_adapter_with_a_rank_above_the_layer_loads(quantize, tmp_path):
    """PEFT takes a rank above min(in, out) (say r = 256 on SmolLM2-135M, whose k_proj is [192,
    576]): such an adapter loads, computes what PEFT's does and saves back, though apply_lora
    refuses that rank."""
    base = tiny_model()
    torch.manual_seed(0)
    cfg = peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=80, lora_alpha=16, init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    pm.save_pretrained(tmp_path / "peft")
    model = hoptune.load_adapter(copy.deepcopy(base), tmp_path / "peft", quantize=quantize)
    assert model.model.layers[0].self_attn.q_proj.r == 80  # the layer is [64, 64], v_proj [32, 64]
    assert rel(logits(model), logits(pm)) <= (1e-6 if quantize is None else 0.1)
    hoptune.save_adapter(model, tmp_path / "again")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "again").eval()
    assert rel(logits(again), logits(pm)) <= 1e-6
    merged = hoptune.merge_and_unload(model, dtype=torch.float32)
    assert rel(logits(merged), logits(pm)) <= (1e-6 if quantize is None else 0.1)


def test_folder_of_named_adapters_says_where_they_are(tmp_path):
    """PEFT saves an adapter not named "default" in a subfolder of that name: the error for the
    parent folder points there instead of only naming the missing file."""
    base = tiny_model()
    cfg = peft.LoraConfig(target_modules=["q_proj"], r=2, lora_alpha=4)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name="math")
    pm.save_pretrained(tmp_path)
    assert (
        not (tmp_path / "adapter_config.json").exists()
        and (tmp_path / "math" / "adapter_config.json").exists()
    )
    with pytest.raises(FileNotFoundError, match=r"adapter_config\.json does not exist.*subfolders.*'math'"):
        hoptune.load_adapter(copy.deepcopy(base), tmp_path)
    hoptune.load_adapter(copy.deepcopy(base), tmp_path / "math")


@pytest.mark.parametrize("stop_at", ["adapter_model.safetensors", "adapter_config.json"])
def test_save_stopped_between_the_renames_never_pairs_new_weights_with_the_old_config(
    stop_at, tmp_path, monkeypatch
):
    """Stopped (killed, interrupted) while the new files go in: the old config (another alpha) must
    never stand beside the new weights, where PEFT and load_adapter would read them with a silently
    wrong scale. The folder then holds no config, which both refuse, and a new save makes it whole."""
    hoptune.save_adapter(ours(tiny_model(), "lora"), tmp_path)
    (tmp_path / "README.md").write_text("mine")
    other = hoptune.apply_lora(tiny_model(), r=4, alpha=32, init_lora_weights=False)
    real_replace = os.replace

    def stopped(src, dst):
        if os.path.basename(dst) == stop_at and STAGE_PREFIX in src:
            raise SystemExit("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", stopped)
    with pytest.raises(SystemExit):
        hoptune.save_adapter(other, tmp_path)
    monkeypatch.undo()
    if stop_at == "adapter_model.safetensors":  # nothing moved yet: the old adapter whole
        assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_alpha"] == 8
        hoptune.load_adapter(tiny_model(), tmp_path)
    else:
        assert not (tmp_path / "adapter_config.json").exists()
        with pytest.raises(FileNotFoundError, match="stopped while it replaced the adapter"):
            hoptune.load_adapter(tiny_model(), tmp_path)
        with pytest.raises(ValueError):
            peft.PeftModel.from_pretrained(tiny_model(), tmp_path)
    hoptune.save_adapter(other, tmp_path)  # saved again: whole
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert (tmp_path / "README.md").read_text() == "mine"
    assert rel(logits(hoptune.load_adapter(tiny_model(), tmp_path)), logits(other)) <= 1e-6
    loaded = peft.PeftModel.from_pretrained(tiny_model(), tmp_path).eval()
    assert rel(logits(loaded), logits(other)) <= 1e-5


def test_values_the_adapter_dtype_cannot_hold_are_refused(saved):
    """float16 holds up to 65504: a larger value of the file became inf in the layer (the check
    that the file's values are finite ran on them before the conversion). Refused, naming the
    tensor, for new layers (adapter_dtype) and for a model's own float16 LoRA layers alike."""
    key = "model.layers.1.mlp.up_proj.lora_B.weight"
    _put_tensor(saved, key, torch.full((128, 4), 1e5))
    model = tiny_model()
    snap = snapshot(model)
    with pytest.raises(
        ValueError,
        match=r"up_proj\.lora_B\.weight holds values beyond the range of torch\.float16 \(up to 100000\)"
        r".*adapter_dtype=torch\.float32 or torch\.bfloat16",
    ):
        hoptune.load_adapter(model, saved, adapter_dtype=torch.float16)
    assert_unchanged(model, snap)
    patched = hoptune.apply_lora(tiny_model(), r=4, alpha=8, adapter_dtype=torch.float16)
    snap = snapshot(patched)
    with pytest.raises(ValueError, match=r"up_proj\.lora_B\.weight holds values beyond.*remove_lora"):
        hoptune.load_adapter(patched, saved)
    assert_unchanged(patched, snap)
    # bfloat16 holds them (rounded)
    loaded = hoptune.load_adapter(tiny_model(), saved, adapter_dtype=torch.bfloat16)
    up = loaded.model.layers[1].mlp.up_proj
    assert up.lora_B.dtype == torch.bfloat16 and bool((up.lora_B == torch.tensor(1e5).bfloat16()).all())


def test_saved_patterns_are_as_short_as_peft_writes_them():
    """A value every layer of one name shares is keyed by the name; a value that differs between
    layers of one name is keyed by the anchored paths of the layers that differ from the default
    only; whole numbers stay ints (PEFT's own files read ``"lora_alpha": 8``)."""
    model = hoptune.apply_lora(
        tiny_model(),
        r=4,
        alpha=8,
        rank_pattern={"q_proj": 8},
        alpha_pattern={"model.layers.1.mlp.down_proj": 16},
    )
    cfg = adapter_config(model)
    # (a model built from its config has the name "": no base model, as PEFT writes null)
    assert model.config._name_or_path == "" and cfg["base_model_name_or_path"] is None
    assert (cfg["r"], cfg["lora_alpha"], type(cfg["lora_alpha"])) == (4, 8, int)
    assert cfg["rank_pattern"] == {"q_proj": 8}
    assert cfg["alpha_pattern"] == {r"^model\.layers\.1\.mlp\.down_proj": 16}


@pytest.mark.parametrize("setting", [dict(use_rslora=True), dict(use_dora=True), dict(lora_dropout=0.1)])
def test_layers_that_differ_in_a_setting_peft_holds_once_are_refused(setting):
    # a layer put in by hand with another setting: one adapter_config cannot say both, and writing
    # the first layer's would load the others wrongly
    model = hoptune.apply_lora(tiny_model(), r=4, alpha=8)
    attn = model.model.layers[1].self_attn
    attn.v_proj = LoRALinear(attn.v_proj.to_linear(merge=False), r=4, lora_alpha=8, **setting)
    with pytest.raises(
        ValueError, match=r"the LoRA layers differ in \w+ \(.*\); PEFT's format holds one value"
    ):
        adapter_config(model)


def test_adapter_state_dict_in_fp32_or_kept_dtype():
    """adapter_state_dict gives fp32 CPU tensors by default (as PEFT saves), a dtype asked for, or
    with dtype=None the layers' own dtype (bf16 here), the same values each time."""
    model = ours(tiny_model(), "dora").to(torch.bfloat16)
    kept = adapter_state_dict(model, dtype=None)
    assert kept and {t.dtype for t in kept.values()} == {torch.bfloat16}
    for dtype in (torch.float32, torch.float16):
        got = adapter_state_dict(model) if dtype == torch.float32 else adapter_state_dict(model, dtype)
        assert got.keys() == kept.keys()
        for key, t in got.items():
            assert t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous(), key
            assert torch.equal(t, kept[key].to(dtype)), key
