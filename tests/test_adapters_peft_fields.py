"""PEFT-format adapters, continued: the config's task_type as PEFT reads it, the key forms PEFT's
loader takes (a PeftModel's own ``.default.`` keys), load_adapter's options on a model that
already has LoRA layers (never silently dropped), PEFT's bias field, and models that hold PEFT's
own adapter layers."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import hoptune
from hoptune.patch import lora_layers
from tests.test_adapters import assert_unchanged, logits, ours, rel, snapshot, tiny_model


# -- task_type ---------------------------------------------------------------------------------
def _bert_mlm():
    cfg = transformers.BertConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128
    )
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(cfg).eval()


def _t5():
    cfg = transformers.T5Config(
        vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4, decoder_start_token_id=0
    )
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize(
    "make, targets, task_type",
    [
        (tiny_model, ["q_proj"], "CAUSAL_LM"),
        # output embeddings but no generation: PEFT's CAUSAL_LM class failed to load it at all
        (_bert_mlm, ["query"], None),
        (_t5, ["q"], "SEQ_2_SEQ_LM"),
    ],
)
def test_task_type_is_one_peft_loads_the_model_with(make, targets, task_type, tmp_path):
    base = make()
    torch.manual_seed(1)
    model = hoptune.apply_lora(
        copy.deepcopy(base), r=2, alpha=4, target_modules=targets, init_lora_weights=False
    )
    hoptune.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == task_type
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    x = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        if task_type == "SEQ_2_SEQ_LM":
            kw = dict(input_ids=x, max_new_tokens=4, do_sample=False)
            assert torch.equal(pm.generate(**kw), model.generate(**kw))
        else:
            assert rel(pm(input_ids=x).logits, model(input_ids=x).logits) <= 1e-6


# -- keys with the adapter name ----------------------------------------------------------------
def _peft_with_model_keys(base, folder, use_dora: bool):
    """A PEFT adapter whose file holds the PeftModel's own state_dict keys (``<m>.lora_A.default.weight``,
    ``<m>.lora_magnitude_vector.default.weight``), as saved from ``model.state_dict()``."""
    torch.manual_seed(2)
    cfg = peft.LoraConfig(
        target_modules=["q_proj", "down_proj"], r=4, lora_alpha=8, use_dora=use_dora, init_lora_weights=False
    )
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    if use_dora:
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_magnitude_vector" in n:
                    p.mul_(torch.linspace(0.5, 1.5, p.numel()))
    pm.save_pretrained(folder)
    state = {k: v.contiguous() for k, v in pm.state_dict().items() if ".lora_" in k}
    assert state and all(".default." in k for k in state)
    save_file(state, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    return pm


@pytest.mark.parametrize("use_dora", [False, True])
def test_keys_with_the_default_adapter_name_load_as_in_peft(use_dora, tmp_path):
    """PEFT's from_pretrained loads such keys (they are its model's own): so does load_adapter, with
    the same result. Before, the file was refused as holding no LoRA tensors."""
    base = tiny_model()
    pm = _peft_with_model_keys(base, tmp_path, use_dora)
    want = logits(pm)
    assert rel(want, logits(base)) > 1e-3
    assert rel(logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()), want) <= 1e-6
    assert rel(logits(hoptune.load_adapter(copy.deepcopy(base), tmp_path)), want) <= 1e-6


def test_keys_with_another_adapter_name_are_refused_by_key(tmp_path):
    """PEFT loads ``.math.`` keys only into an adapter named "math" (as "default" it loads nothing and
    warns): refused, naming the key and the name it should have."""
    base = tiny_model()
    _peft_with_model_keys(base, tmp_path, use_dora=False)
    path = tmp_path / "adapter_model.safetensors"
    save_file({k.replace(".default.", ".math."): v for k, v in load_file(path).items()}, path)
    model = copy.deepcopy(base)
    snap = snapshot(model)
    key = "base_model.model.model.layers.0.mlp.down_proj.lora_A.math.weight"
    with pytest.raises(
        ValueError, match=rf"key '{key}' holds the adapter name 'math'.*down_proj\.lora_A\.weight'"
    ):
        hoptune.load_adapter(model, tmp_path)
    assert_unchanged(model, snap)


@pytest.mark.parametrize(
    "first, second",
    [
        ("lora_A.weight", "lora_A.default.weight"),
        ("lora_magnitude_vector", "lora_magnitude_vector.weight"),  # the older PEFT form beside the new
    ],
)
def test_two_keys_for_one_tensor_are_refused(first, second, tmp_path):
    """Two keys that name the same tensor: one of them would win, silently."""
    hoptune.save_adapter(ours(tiny_model(), "dora"), tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    stem = "base_model.model.model.layers.0.self_attn.q_proj."
    tensors[stem + second] = torch.zeros_like(tensors[stem + first])
    save_file(tensors, path, metadata={"format": "pt"})
    model = tiny_model()
    snap = snapshot(model)
    with pytest.raises(
        ValueError, match=r"keys .* both hold lora_.* of model\.layers\.0\.self_attn\.q_proj"
    ) as e:
        hoptune.load_adapter(model, tmp_path)
    assert f"'{stem}{first}'" in str(e.value) and f"'{stem}{second}'" in str(e.value)
    assert_unchanged(model, snap)


# -- options on a model that already has LoRA layers ---------------------------------------------
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            dict(quantize="nf4"),
            ValueError,
            r"quantize='nf4'.*layer model\.layers\.0\.mlp\.down_proj has a dense base.*remove_lora",
        ),
        (
            dict(adapter_dtype=torch.bfloat16),
            ValueError,
            r"adapter_dtype=torch\.bfloat16.*mlp\.down_proj holds its adapter in torch\.float32",
        ),
        (dict(quantize="int8"), ValueError, r"quantize must be None or 'nf4', got 'int8'"),
        (dict(blocksize=100), ValueError, r"blocksize must be one of"),
        (dict(double_quant="no"), TypeError, r"double_quant must be True, False or None, got 'no'"),
        (dict(adapter_dtype=torch.int8), TypeError, r"adapter_dtype must be"),
    ],
)
def test_options_the_lora_layers_in_place_do_not_have_are_refused(kwargs, error, match, tmp_path):
    """These were ignored: the adapter loaded dense, or in fp32, though NF4 or bf16 was asked for."""
    base = tiny_model()
    hoptune.save_adapter(ours(base, "lora"), tmp_path)
    model = hoptune.apply_lora(copy.deepcopy(base), r=4, alpha=8)
    snap = snapshot(model)
    with pytest.raises(error, match=match):
        hoptune.load_adapter(model, tmp_path, **kwargs)
    assert_unchanged(model, snap)


def test_options_the_lora_layers_in_place_have_load(tmp_path):
    base = tiny_model()
    src = ours(base, "lora")
    hoptune.save_adapter(src, tmp_path)
    nf4 = hoptune.apply_lora(copy.deepcopy(base), r=4, alpha=8, quantize="nf4")
    hoptune.load_adapter(nf4, tmp_path, quantize="nf4", adapter_dtype=torch.float32)
    again = hoptune.load_adapter(copy.deepcopy(base), tmp_path, quantize="nf4")
    assert rel(logits(nf4), logits(again)) <= 1e-7
    # no adapter_dtype: the layers keep their own
    bf16 = hoptune.apply_lora(copy.deepcopy(base), r=4, alpha=8, adapter_dtype=torch.bfloat16)
    hoptune.load_adapter(bf16, tmp_path)
    q = bf16.model.layers[0].self_attn.q_proj
    assert q.lora_A.dtype == torch.bfloat16
    assert torch.equal(q.lora_A, src.model.layers[0].self_attn.q_proj.lora_A.to(torch.bfloat16))
    # and a new adapter takes the one asked for
    fresh = hoptune.load_adapter(copy.deepcopy(base), tmp_path, adapter_dtype=torch.bfloat16)
    assert fresh.model.layers[0].self_attn.q_proj.lora_A.dtype == torch.bfloat16


def _nf4_blocksizes(model) -> set[int]:
    return {m.weight_nf4.blocksize for _, m in lora_layers(model)}


@pytest.mark.parametrize("layers, given", [(64, 256), (256, 64)])
@pytest.mark.parametrize("quantize", ["nf4", None])
def test_a_blocksize_other_than_the_nf4_layers_is_refused(layers, given, quantize, tmp_path):
    """This was ignored: the adapter loaded over NF4 blocks of another size than asked for."""
    base = tiny_model()
    hoptune.save_adapter(ours(base, "lora"), tmp_path)
    model = hoptune.apply_lora(copy.deepcopy(base), r=4, alpha=8, quantize="nf4", blocksize=layers)
    snap = snapshot(model)
    with pytest.raises(
        ValueError,
        match=rf"blocksize={given}: the model's LoRA layer model\.layers\.0\.\S+ has an NF4 base "
        rf"of blocksize={layers}, .*remove_lora.*blocksize=None",
    ):
        hoptune.load_adapter(model, tmp_path, quantize=quantize, blocksize=given)
    assert_unchanged(model, snap)


def test_the_default_blocksize_loads_into_nf4_layers_of_any(tmp_path):
    base = tiny_model()
    hoptune.save_adapter(ours(base, "lora"), tmp_path)
    want = hoptune.load_adapter(copy.deepcopy(base), tmp_path, quantize="nf4", blocksize=256)
    assert _nf4_blocksizes(want) == {256}
    for kwargs in (dict(quantize="nf4"), dict(blocksize=None), dict(quantize="nf4", blocksize=256)):
        model = hoptune.apply_lora(copy.deepcopy(base), r=4, alpha=8, quantize="nf4", blocksize=256)
        hoptune.load_adapter(model, tmp_path, **kwargs)
        assert _nf4_blocksizes(model) == {256}
        assert rel(logits(model), logits(want)) <= 1e-7
    # new layers: None means 64, as in apply_lora
    fresh = hoptune.load_adapter(copy.deepcopy(base), tmp_path, quantize="nf4", blocksize=None)
    assert _nf4_blocksizes(fresh) == {64}


@pytest.mark.parametrize("option", [dict(blocksize=256), dict(double_quant=False)])
def test_nf4_options_for_dense_layers_left_dense_are_not_used(option, tmp_path):
    """Without quantize="nf4" a dense base stays dense, new or in place: no block size or double
    quantization applies."""
    base = tiny_model()
    src = ours(base, "lora")
    hoptune.save_adapter(src, tmp_path)
    model = hoptune.apply_lora(copy.deepcopy(base), r=4, alpha=8)
    hoptune.load_adapter(model, tmp_path, **option)
    fresh = hoptune.load_adapter(copy.deepcopy(base), tmp_path, **option)
    for m in (model, fresh):
        assert not any(lora.quantized for _, lora in lora_layers(m))
        assert rel(logits(m), logits(src)) <= 1e-7


def _nf4_nested(model) -> set[bool]:
    return {m.weight_nf4.nested for _, m in lora_layers(model)}


def _nf4_lora(base, dq: bool):
    return hoptune.apply_lora(copy.deepcopy(base), r=4, alpha=8, quantize="nf4", double_quant=dq)


@pytest.mark.parametrize("layers", [True, False])
@pytest.mark.parametrize("quantize", ["nf4", None])
def test_a_double_quant_other_than_the_nf4_layers_is_refused(layers, quantize, tmp_path):
    """This was ignored: the adapter loaded over NF4 bases quantized otherwise than asked for."""
    base = tiny_model()
    hoptune.save_adapter(ours(base, "lora"), tmp_path)
    model = _nf4_lora(base, layers)
    snap = snapshot(model)
    given = not layers
    with pytest.raises(
        ValueError,
        match=rf"double_quant={given}: the model's LoRA layer model\.layers\.0\.\S+ has an NF4 "
        rf"base with double_quant={layers}, .*remove_lora.*double_quant=None",
    ):
        hoptune.load_adapter(model, tmp_path, quantize=quantize, double_quant=given)
    assert_unchanged(model, snap)


def test_the_default_double_quant_loads_into_nf4_layers_of_either(tmp_path):
    base = tiny_model()
    hoptune.save_adapter(ours(base, "lora"), tmp_path)
    want = hoptune.load_adapter(copy.deepcopy(base), tmp_path, quantize="nf4", double_quant=False)
    assert _nf4_nested(want) == {False}
    for kwargs in (
        dict(quantize="nf4"),
        dict(double_quant=None),
        dict(quantize="nf4", double_quant=False),
    ):
        model = _nf4_lora(base, False)
        hoptune.load_adapter(model, tmp_path, **kwargs)
        assert _nf4_nested(model) == {False}
        assert rel(logits(model), logits(want)) <= 1e-7
    # new layers: None means True, as in apply_lora
    fresh = hoptune.load_adapter(copy.deepcopy(base), tmp_path, quantize="nf4", double_quant=None)
    assert _nf4_nested(fresh) == {True}


def _peft_adapter(base, folder, dropout: float):
    torch.manual_seed(2)
    cfg = peft.LoraConfig(
        target_modules="all-linear", r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False
    )
    peft.get_peft_model(copy.deepcopy(base), cfg).save_pretrained(folder)


@pytest.mark.parametrize("saved, layers", [(0.1, 0.0), (0.0, 0.05), (0.1, 0.2)])
def test_a_lora_dropout_other_than_the_layers_is_refused(saved, layers, tmp_path):
    """The LoRA layers in place keep their dropout: an adapter saved with another lora_dropout
    loaded silently, and training went on with a dropout it was not saved with."""
    base = tiny_model()
    _peft_adapter(base, tmp_path, saved)
    model = hoptune.apply_lora(copy.deepcopy(base), r=4, alpha=8, dropout=layers)
    snap = snapshot(model)
    with pytest.raises(
        ValueError,
        match=rf"adapter_config\.json: lora_dropout={saved:g}, but the model's LoRA layer "
        rf"model\.layers\.\d+\.\S+ has dropout {layers:g}.*remove_lora.*dropout={saved:g}\)",
    ):
        hoptune.load_adapter(model, tmp_path, trainable=True)
    assert_unchanged(model, snap)
    assert all(m.lora_dropout_p == layers for _, m in lora_layers(model))


def test_a_config_without_lora_dropout_means_none_for_the_layers_in_place(tmp_path):
    """PEFT's default, 0.0, is the adapter's dropout when its config has no lora_dropout."""
    base = tiny_model()
    hoptune.save_adapter(ours(base, "lora"), tmp_path)
    path = tmp_path / "adapter_config.json"
    cfg = json.loads(path.read_text())
    del cfg["lora_dropout"]
    path.write_text(json.dumps(cfg))
    model = hoptune.apply_lora(copy.deepcopy(base), r=4, alpha=8, dropout=0.1)
    with pytest.raises(ValueError, match=r"lora_dropout=0, but .* has dropout 0\.1"):
        hoptune.load_adapter(model, tmp_path, trainable=True)
    hoptune.load_adapter(hoptune.apply_lora(copy.deepcopy(base), r=4, alpha=8), tmp_path, trainable=True)
    # a frozen adapter (for inference, where dropout does not apply) loads into either
    hoptune.load_adapter(model, tmp_path)
    assert all(m.lora_dropout_p == 0.1 for _, m in lora_layers(model))


@pytest.mark.parametrize("rslora", [False, True])
def test_a_config_without_r_or_alpha_takes_peft_defaults(rslora, tmp_path):
    """A hand-written adapter_config.json may leave out r, lora_alpha and use_rslora: PEFT's
    LoraConfig defaults (r 8, lora_alpha 8, use_rslora false) apply, so the same scale as PEFT's."""
    base = tiny_model()
    torch.manual_seed(4)
    src = hoptune.apply_lora(
        copy.deepcopy(base),
        r=8,
        alpha=32,
        use_rslora=rslora,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
    )
    hoptune.save_adapter(src, tmp_path)
    path = tmp_path / "adapter_config.json"
    cfg = json.loads(path.read_text())
    for field in ("r", "lora_alpha", "use_rslora"):
        del cfg[field]
    path.write_text(json.dumps(cfg))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    model = hoptune.load_adapter(copy.deepcopy(base), tmp_path).eval()
    layers = lora_layers(model)
    assert layers and all(m.r == 8 and m.scaling == 1.0 for _, m in layers)
    assert rel(logits(model), logits(pm)) <= 1e-6
    # and the scale matters here: the adapter as saved (alpha 32) gives other logits
    assert rel(logits(src.eval()), logits(pm)) > 1e-3


def test_an_adapter_of_a_rank_above_the_limit_is_refused_saying_so(tmp_path):
    """PEFT saves any rank; hoptune's LoRA layers take at most 256. Loading such an adapter is refused
    naming the layer and its rank, without apply_lora's advice (its rank is the file's), and the
    model is left as it was."""
    base = tiny_model()
    peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(target_modules=["q_proj"], r=300)
    ).save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    snap = snapshot(model)
    with pytest.raises(
        ValueError, match=r"layer model\.layers\.0\.self_attn\.q_proj has a rank-300 adapter"
    ) as e:
        hoptune.load_adapter(model, tmp_path)
    assert "rank_pattern" not in str(e.value) and "cannot load this adapter" in str(e.value)
    assert_unchanged(model, snap)


def test_an_adapter_of_the_largest_rank_loads(tmp_path):
    """A rank of exactly 256, the most hoptune's LoRA layers take, loads, with PEFT's outputs."""
    base = tiny_model()
    torch.manual_seed(0)
    cfg = peft.LoraConfig(target_modules=["q_proj"], r=256, lora_alpha=16, init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    pm.save_pretrained(tmp_path)
    model = hoptune.load_adapter(copy.deepcopy(base), tmp_path)
    assert model.model.layers[0].self_attn.q_proj.r == 256
    assert rel(logits(model), logits(pm)) <= 1e-5


def test_the_same_lora_dropout_loads_into_the_layers_in_place(tmp_path):
    base = tiny_model()
    src = ours(base, "lora", dropout=0.1)
    hoptune.save_adapter(src, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_dropout"] == 0.1
    model = hoptune.apply_lora(copy.deepcopy(base), r=4, alpha=8, dropout=0.1)
    hoptune.load_adapter(model, tmp_path)
    assert rel(logits(model.eval()), logits(src.eval())) <= 1e-7


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_new_layers_take_lora_dropout_from_the_config(dropout, tmp_path):
    """A model without LoRA layers gets the adapter's dropout, as PEFT builds them."""
    base = tiny_model()
    _peft_adapter(base, tmp_path, dropout)
    model = hoptune.load_adapter(copy.deepcopy(base), tmp_path, trainable=True)
    layers = lora_layers(model)
    assert layers and all(m.lora_dropout_p == dropout for _, m in layers)
    kind = torch.nn.Dropout if dropout else torch.nn.Identity
    assert all(type(m.lora_dropout) is kind for _, m in layers)
    assert all(m.lora_dropout.p == dropout for _, m in layers if dropout)


# -- init_lora_weights ---------------------------------------------------------------------------
@pytest.mark.parametrize("existing", [False, True])
def test_a_mica_adapter_loaded_trainable_keeps_lora_b_frozen_as_in_peft(existing, tmp_path):
    """PEFT's MiCA (``init_lora_weights="mica"``) trains lora_A only, and loads lora_B frozen with
    ``is_trainable=True``: load_adapter made lora_B trainable, and training changed it."""
    base = tiny_model()
    torch.manual_seed(2)
    cfg = peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, init_lora_weights="mica")
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():  # trained: a non-zero lora_A
        for name, p in pm.named_parameters():
            if "lora_A" in name:
                p.normal_()
    pm.save_pretrained(tmp_path)
    want = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    assert {n.split(".")[-3]: p.requires_grad for n, p in want.named_parameters() if "lora_" in n} == {
        "lora_A": True,
        "lora_B": False,
    }
    model = copy.deepcopy(base)
    if existing:
        model = hoptune.apply_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    model = hoptune.load_adapter(model, tmp_path, trainable=True)
    layers = lora_layers(model)
    assert layers and all(m.lora_A.requires_grad and not m.lora_B.requires_grad for _, m in layers)
    assert rel(logits(model), logits(want.eval())) <= 1e-6


def _peft_mica_adapter(base, folder):
    torch.manual_seed(2)
    cfg = peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, init_lora_weights="mica")
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():  # trained: a non-zero lora_A
        for name, p in pm.named_parameters():
            if "lora_A" in name:
                p.normal_()
    pm.save_pretrained(folder)


def _grads(pm) -> dict[str, bool]:
    return {n.split(".")[-3]: p.requires_grad for n, p in pm.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("init", ["mica", "MiCA", "MICA"])
def test_which_mica_spellings_keep_lora_b_frozen_as_in_peft(init, tmp_path):
    """PEFT freezes lora_B for init_lora_weights="mica" exactly (its MiCA variant); another
    spelling ("MiCA") loads with lora_B trainable there, as a plain LoRA's: load_adapter's
    trainable lora_B follows PEFT's for each."""
    base = tiny_model()
    _peft_mica_adapter(base, tmp_path)
    path = tmp_path / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["init_lora_weights"] = init
    path.write_text(json.dumps(cfg))
    want = _grads(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True))
    assert want == {"lora_A": True, "lora_B": init != "mica"}
    model = hoptune.load_adapter(copy.deepcopy(base), tmp_path, trainable=True)
    layers = lora_layers(model)
    assert layers and all(
        m.lora_A.requires_grad and m.lora_B.requires_grad == want["lora_B"] for _, m in layers
    )


@pytest.mark.parametrize("trainable", [False, True])
def test_a_mica_adapter_saved_again_stays_mica(trainable, tmp_path):
    """save_adapter wrote init_lora_weights=true for a MiCA adapter load_adapter had read: PEFT and
    load_adapter then loaded the saved adapter as a plain LoRA, lora_B trainable."""
    base = tiny_model()
    _peft_mica_adapter(base, tmp_path / "peft")
    model = hoptune.load_adapter(copy.deepcopy(base), tmp_path / "peft", trainable=trainable)
    hoptune.save_adapter(model, tmp_path / "again")
    cfg = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] == "mica"
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "again", is_trainable=True)
    assert _grads(pm) == {"lora_A": True, "lora_B": False}
    assert rel(logits(pm.eval()), logits(model)) <= 1e-6
    again = hoptune.load_adapter(copy.deepcopy(base), tmp_path / "again", trainable=True)
    layers = lora_layers(again)
    assert layers and all(m.lora_A.requires_grad and not m.lora_B.requires_grad for _, m in layers)


def test_a_plain_adapter_loaded_over_a_mica_one_saves_as_plain(tmp_path):
    """The layers keep no trace of a MiCA adapter that another adapter replaced."""
    base = tiny_model()
    _peft_mica_adapter(base, tmp_path / "mica")
    model = hoptune.load_adapter(copy.deepcopy(base), tmp_path / "mica")
    src = hoptune.apply_lora(
        copy.deepcopy(base), r=4, alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    hoptune.save_adapter(src, tmp_path / "plain")
    hoptune.load_adapter(model, tmp_path / "plain", trainable=True)
    assert all(m.lora_B.requires_grad for _, m in lora_layers(model))
    hoptune.save_adapter(model, tmp_path / "again")
    cfg = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True


# -- bias ----------------------------------------------------------------------------------------
def _peft_bias_adapter(base, folder, bias: str):
    torch.manual_seed(2)
    cfg = peft.LoraConfig(
        target_modules=["q_proj", "down_proj"],
        r=4,
        lora_alpha=8,
        bias=bias,
        init_lora_weights=False,
    )
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    pm.save_pretrained(folder)
    assert json.loads((folder / "adapter_config.json").read_text())["bias"] == bias
    return pm


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_peft_bias_adapter_of_a_model_without_biases_loads(bias, tmp_path):
    """PEFT's bias="lora_only" / "all" train the model's biases too; a model without any (Llama)
    has none to save, so the file is a plain LoRA, which PEFT loads. It was refused."""
    base = tiny_model()
    pm = _peft_bias_adapter(base, tmp_path, bias)
    assert all(".lora_" in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    want = logits(pm)
    assert rel(want, logits(base)) > 1e-3
    assert rel(logits(hoptune.load_adapter(copy.deepcopy(base), tmp_path)), want) <= 1e-6


def _gpt2():
    cfg = transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=128, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.mark.parametrize("bias", ["lora_only", "all"])
@pytest.mark.parametrize("arch, targets", [("qwen2", ["q_proj", "down_proj"]), ("gpt2", ["c_attn"])])
def test_peft_bias_adapter_with_untrained_biases_loads(bias, arch, targets, tmp_path):
    """PEFT's bias="lora_only" saves the biases of the layers it adapts (``<layer>.base_layer.bias``),
    "all" every bias of the model (GPT-2's LayerNorms too), whether or not training changed them:
    biases equal to the model's load, as in PEFT, also into the model's LoRA layers. They were
    refused as trained."""
    base = tiny_model("qwen2") if arch == "qwen2" else _gpt2()
    torch.manual_seed(2)
    cfg = peft.LoraConfig(target_modules=targets, r=4, lora_alpha=8, bias=bias, init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    pm.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert any(k.endswith(".base_layer.bias") for k in keys)
    assert any(k.endswith(".bias") and ".base_layer." not in k for k in keys) == (bias == "all")
    x = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    want = logits(peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval(), x)
    assert rel(want, logits(base, x)) > 1e-3
    model = hoptune.load_adapter(copy.deepcopy(base), tmp_path)
    assert rel(logits(model, x), want) <= 1e-6
    assert rel(logits(hoptune.load_adapter(model, tmp_path), x), want) <= 1e-6


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_peft_bias_adapter_with_trained_biases_is_refused_naming_the_key(bias, tmp_path):
    """Qwen2's q_proj has a bias, which such an adapter trained and holds: a bias that differs from
    the model's is refused (hoptune does not replace base weights), naming that key only."""
    base = tiny_model("qwen2")
    torch.manual_seed(2)
    cfg = peft.LoraConfig(target_modules=["q_proj", "down_proj"], r=4, lora_alpha=8, bias=bias)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    with torch.no_grad():  # what training with bias=... does to it
        pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer.bias.add_(0.1)
    pm.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    snap = snapshot(model)
    key = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias"
    with pytest.raises(ValueError, match=rf"bias='{bias}'.*differ from the model's \(\['{key}'\]\)"):
        hoptune.load_adapter(model, tmp_path)
    assert_unchanged(model, snap)


def test_a_bias_value_peft_does_not_have_is_refused(tmp_path):
    hoptune.save_adapter(ours(tiny_model(), "lora"), tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "bias": "some"}))
    with pytest.raises(ValueError, match=r"bias must be 'none', 'lora_only' or 'all'.*got 'some'"):
        hoptune.load_adapter(tiny_model(), tmp_path)


# -- a model that holds PEFT's adapters ----------------------------------------------------------
@pytest.mark.parametrize("part", ["peft_model", "its_model"])
def test_load_into_a_model_with_peft_layers_says_so(part, tmp_path):
    """Into a PeftModel, or the model inside it (its LoRA layers in place), the errors were that the
    adapter is for another model, or that its q_proj "is a Linear, not a linear layer"."""
    base = tiny_model()
    hoptune.save_adapter(ours(base, "lora"), tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    model = pm if part == "peft_model" else pm.base_model.model
    snap = snapshot(model)
    peft_linear = r"peft\.tuners\.lora\.layer\.Linear"
    with pytest.raises(TypeError, match=rf"q_proj is a PEFT {peft_linear} layer.*unload\(\)"):
        hoptune.load_adapter(model, tmp_path)
    assert_unchanged(model, snap)


def test_save_of_a_model_with_peft_layers_says_to_save_with_peft(tmp_path):
    """Its error was that the model has no LoRA layers, and to call hoptune.apply_lora."""
    base = tiny_model()
    hoptune.save_adapter(ours(base, "lora"), tmp_path / "a")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    match = r"q_proj is a PEFT .*Linear layer.*save_pretrained\(adapter_dir\)"
    with pytest.raises(TypeError, match=match):
        hoptune.save_adapter(pm, tmp_path / "b")
    assert not (tmp_path / "b").exists()
