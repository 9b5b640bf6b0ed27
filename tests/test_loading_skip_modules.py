"""skip_modules as transformers matches llm_int8_skip_modules (load_model and save_pretrained_nf4
alike), entries that match nothing, and the errors for bitsandbytes NF4 weights hoptune does not
read (blocksize 32, a partial last block), which name the file."""

from __future__ import annotations

import re

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import hoptune
from hoptune.quant import save_pretrained_nf4
from hoptune.quant.checkpoint import _skipped
from tests.test_loading import _bnb_checkpoint, logits, nf4_layers, tiny_model

ENTRIES = [
    "lm_head",
    "down_proj",
    "self_attn.k_proj",
    "model.layers.1",  # that layer's modules, not a model.layers.11
    "model.layers.*.mlp",  # a regular expression from the start of the name
    "model.layers.0.self_attn.[qk]_proj",
    "proj",  # a plain suffix: every *proj
    "mlp.gate",  # neither gate_proj (no boundary) nor a suffix
    "model.layers.0.mlp.gate",  # from the start, but gate_proj goes on past a name boundary
]


@pytest.mark.parametrize("entry", ENTRIES)
def test_skip_entries_match_the_modules_transformers_keeps_dense(entry):
    from transformers.quantizers.quantizers_utils import should_convert_module

    names = [n for n, _ in tiny_model().named_modules() if n]
    ours = [n for n in names if _skipped(n, (entry,))]
    theirs = [n for n in names if not should_convert_module(n, [entry])]
    assert ours == theirs


def test_load_model_skips_by_regular_expression(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    model = hoptune.load_model(tmp_path, device="cpu", progress=False, skip_modules=["model.layers.*.mlp"])
    layers = nf4_layers(model)
    assert len(layers) == 8 and not [n for n in layers if ".mlp." in n]
    assert type(model.model.layers[1].mlp.up_proj) is torch.nn.Linear


def test_saved_skip_list_loads_in_transformers(tmp_path):
    # the layers kept dense must be those transformers builds dense from the saved
    # llm_int8_skip_modules, else from_pretrained refuses the file (packed codes for a dense layer)
    import bitsandbytes  # noqa: F401

    model = tiny_model()
    names = save_pretrained_nf4(model, tmp_path, skip_modules=["lm_head", "model.layers.0.*"])
    assert len(names) == 7 and not [n for n in names if n.startswith("model.layers.0.")]
    qm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    assert type(qm.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert type(qm.model.layers[1].self_attn.q_proj) is not torch.nn.Linear
    ours = hoptune.load_model(tmp_path, device="cpu", progress=False)
    assert sorted(nf4_layers(ours)) == sorted(names)
    torch.testing.assert_close(logits(ours), logits(qm), atol=2e-2, rtol=2e-2)  # bnb's CPU matmul path


def test_skip_entry_that_matches_nothing_is_an_error(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "bf16")
    with pytest.raises(
        ValueError, match=r"skip_modules entries \['dwon_proj'\] match no linear layer of LlamaForCausalLM"
    ):
        hoptune.load_model(
            tmp_path / "bf16", device="cpu", progress=False, skip_modules=["down_proj", "dwon_proj"]
        )
    # "layers.1" is a suffix of model.layers.1 but of none of its layers: transformers skips nothing
    with pytest.raises(ValueError, match=r"\['layers\.1'\] match no linear layer.*'model\.layers\.1' skips"):
        save_pretrained_nf4(model, tmp_path / "nf4", skip_modules=["lm_head", "layers.1"])
    assert not (tmp_path / "nf4" / "model.safetensors").exists()
    # the default "lm_head" is no error for a model without an output head
    base = transformers.LlamaModel(model.config)
    save_pretrained_nf4(base, tmp_path / "base")


@pytest.mark.parametrize(
    "skip, match",
    [
        (["lm_head", "q_proj("], r"skip_modules entry 'q_proj\(' is not a valid regular expression"),
        (["lm_head", ""], r"skip_modules has an empty entry"),
    ],
)
def test_bad_skip_entries_are_refused(tmp_path, skip, match):
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=match):
        hoptune.load_model(tmp_path, device="cpu", progress=False, skip_modules=skip)
    with pytest.raises(ValueError, match=match):
        save_pretrained_nf4(tiny_model(), tmp_path / "nf4", skip_modules=skip)


def test_bnb_weight_with_a_partial_last_block_is_refused_as_such(tmp_path):
    # 35 x 35 = 1225 weights: bitsandbytes stores 613 bytes, a partial last block of 9 codes
    import bitsandbytes  # noqa: F401

    cfg = transformers.LlamaConfig(
        hidden_size=35,
        intermediate_size=35,
        num_hidden_layers=1,
        num_attention_heads=5,
        num_key_value_heads=5,
        head_dim=8,
        vocab_size=128,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    _bnb_checkpoint(tmp_path / "bf16", tmp_path / "nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    with pytest.raises(
        ValueError,
        match=r"model\.safetensors: .*down_proj\.weight.*has 1225 elements, not a "
        r"multiple of blocksize 64; .*partial last block",
    ) as e:
        hoptune.load_model(tmp_path / "nf4", device="cpu", progress=False)
    assert "another configuration" not in str(e.value)
    # the dense checkpoint loads, such a layer kept dense
    with pytest.warns(UserWarning, match="stays dense"):
        model = hoptune.load_model(tmp_path / "bf16", device="cpu", progress=False)
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear


def test_bnb_blocksize_32_is_refused_naming_the_file(tmp_path):
    import bitsandbytes.functional as bnbf

    save_pretrained_nf4(tiny_model(), tmp_path)
    path = tmp_path / "model.safetensors"
    sd = load_file(path)
    key = "model.layers.1.self_attn.q_proj.weight"
    for k in [k for k in sd if k.startswith(key)]:
        del sd[k]
    packed, state = bnbf.quantize_4bit(
        torch.randn(64, 64, dtype=torch.bfloat16), blocksize=32, quant_type="nf4", compress_statistics=True
    )
    sd[key] = packed
    sd.update({f"{key}.{k}": v for k, v in state.as_dict(packed=True).items()})
    save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(
        ValueError,
        match=rf"{re.escape(str(path))}: '{re.escape(key)}\.quant_state\.bitsandbytes__nf4': "
        r"blocksize 32 is not supported; hoptune reads NF4 weights of blocksize 64, 128",
    ):
        hoptune.load_model(tmp_path, device="cpu", progress=False)


def test_skip_modules_naming_layers_stored_in_nf4_is_reported(tmp_path):
    # a pre-quantized checkpoint loads as stored: the layers skip_modules names stay NF4, said aloud
    save_pretrained_nf4(tiny_model(), tmp_path)
    with pytest.warns(UserWarning, match=r"stores 2 layers of skip_modules=\['down_proj'\] in NF4"):
        model = hoptune.load_model(tmp_path, device="cpu", progress=False, skip_modules=["down_proj"])
    assert len(nf4_layers(model)) == 14
