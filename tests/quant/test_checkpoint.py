"""save_pretrained_nf4 / bnb_quantization_config: what transformers + bitsandbytes load back."""

from __future__ import annotations

import json
import os

import bitsandbytes
import pytest
import torch
import transformers
from safetensors.torch import load_file
from torch import nn

from hoptune.nn import NF4Linear
from hoptune.quant import bnb_quantization_config, dequantize_nf4, quantize_nf4, save_pretrained_nf4


def _tiny_deepseek_v32(seed=0):
    """A causal LM whose class keeps a linear layer in fp32 (``indexer.weights_proj``)."""
    if not hasattr(transformers, "DeepseekV32Config"):
        pytest.skip("this transformers has no DeepSeek-V3.2")
    cfg = transformers.DeepseekV32Config(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=4,
        n_group=1,
        topk_group=1,
        num_experts_per_tok=2,
        kv_lora_rank=64,
        q_lora_rank=64,
        qk_rope_head_dim=32,
        qk_nope_head_dim=32,
        v_head_dim=32,
        head_dim=32,
        index_topk=16,
        index_head_dim=64,
        index_n_heads=4,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).eval()


def test_modules_kept_in_fp32_stay_dense(tmp_path):
    """transformers never converts a model's _keep_in_fp32_modules to Linear4bit: stored in NF4,
    the checkpoint did not load (a [n/2, 1] uint8 weight for a dense [out, in] layer)."""
    model = _tiny_deepseek_v32()
    assert "indexer.weights_proj" in model._keep_in_fp32_modules
    names = save_pretrained_nf4(model, tmp_path)
    assert names and not [n for n in names if n.endswith("indexer.weights_proj")]
    assert "model.layers.0.self_attn.indexer.wk" in names  # the indexer's other layers are NF4
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    for i in range(2):
        ours = model.model.layers[i].self_attn.indexer.weights_proj
        theirs = loaded.model.layers[i].self_attn.indexer.weights_proj
        assert type(theirs) is nn.Linear
        assert torch.equal(theirs.weight.float(), ours.weight.float())
        assert type(loaded.model.layers[i].self_attn.indexer.wk).__name__ == "Linear4bit"


def test_nf4_module_kept_in_fp32_is_refused(tmp_path):
    model = _tiny_deepseek_v32()
    attn = model.model.layers[1].self_attn.indexer
    attn.weights_proj = NF4Linear.from_linear(attn.weights_proj)
    with pytest.raises(
        ValueError,
        match=r"model\.layers\.1\.self_attn\.indexer\.weights_proj is NF4 already but "
        r"DeepseekV32ForCausalLM keeps it in fp32",
    ):
        save_pretrained_nf4(model, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("bad", [torch.int8, torch.float64, "bfloat16"])
def test_quantization_config_refuses_a_compute_dtype_bitsandbytes_cannot_compute_in(bad):
    # transformers would accept "int8" from the config, and bitsandbytes then casts every input to it
    with pytest.raises(
        TypeError, match=r"compute_dtype must be torch\.bfloat16, torch\.float16 or torch\.float32"
    ):
        bnb_quantization_config(bad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantization_config_loads_in_transformers(dtype):
    cfg = transformers.BitsAndBytesConfig.from_dict(bnb_quantization_config(dtype, skip_modules=["lm_head"]))
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == dtype and cfg.bnb_4bit_quant_storage == torch.uint8
    assert cfg.llm_int8_skip_modules == ["lm_head"]


def test_gpt2_conv1d_layers_are_saved_in_nf4(tmp_path):
    # transformers + bitsandbytes load GPT-2's Conv1D projections as 4-bit layers: stored dense
    # they fail to load ("quantization state not initialized"); stored as W.T in NF4 they load
    from transformers.pytorch_utils import Conv1D

    from hoptune.quant import dequantize_nf4, quantize_nf4

    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).to(torch.bfloat16).eval()
    convs = {n: m for n, m in model.named_modules() if isinstance(m, Conv1D)}
    assert sorted(save_pretrained_nf4(model, tmp_path)) == sorted(convs)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    for name, conv in convs.items():
        layer = loaded.get_submodule(name)
        assert type(layer) is bitsandbytes.nn.Linear4bit, name
        got = bitsandbytes.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        want = dequantize_nf4(quantize_nf4(conv.weight.data.t().contiguous()))
        assert torch.equal(got.to(want.dtype), want), name
        assert torch.equal(layer.bias, conv.bias), name


def test_config_records_the_dtype_of_the_model_as_save_pretrained_does(tmp_path):
    # a model built in float32 and cast to bfloat16 still has dtype=float32 in its config
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        dtype="float32",
    )
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).eval()
    save_pretrained_nf4(model, tmp_path / "nf4")
    model.save_pretrained(tmp_path / "ref")  # (which sets the model's config.dtype)
    ref = transformers.AutoConfig.from_pretrained(tmp_path / "ref")
    ours = transformers.AutoConfig.from_pretrained(tmp_path / "nf4")
    assert ref.dtype == torch.bfloat16 and ours.dtype == ref.dtype
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", device_map="cpu")
    assert loaded.config.dtype == torch.bfloat16 and loaded.model.norm.weight.dtype == torch.bfloat16


def test_embeddings_tied_inside_a_submodel_are_stored_once(tmp_path):
    # BART ties its encoder's and decoder's embed_tokens to model.shared through BartModel's own
    # tied keys: written three times, safetensors refused the shared tensors and nothing was saved
    cfg = transformers.BartConfig(
        vocab_size=128,
        d_model=64,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.BartForConditionalGeneration(cfg).to(torch.bfloat16).eval()
    assert model.model.encoder.embed_tokens.weight is model.model.shared.weight
    save_pretrained_nf4(model, tmp_path / "nf4")
    model.save_pretrained(tmp_path / "ref")
    ours, ref = (set(load_file(tmp_path / d / "model.safetensors")) for d in ("nf4", "ref"))
    assert {k for k in ours if "embed_tokens" in k or "shared" in k} == {"model.shared.weight"}
    assert {k for k in ref if "embed_tokens" in k or "shared" in k} == {"model.shared.weight"}
    loaded = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "nf4", device_map="cpu")
    assert loaded.model.decoder.embed_tokens.weight is loaded.model.shared.weight
    assert torch.equal(loaded.model.shared.weight, model.model.shared.weight)


def _bnb_model(tmp_path):
    """A model that transformers + bitsandbytes quantized on load (its layers are Linear4bit)."""
    from tests.test_loading import _bnb_checkpoint, tiny_model

    tiny_model().save_pretrained(tmp_path / "dense")
    return _bnb_checkpoint(tmp_path / "dense", tmp_path / "bnb")


def test_layers_bitsandbytes_quantized_are_saved_as_nf4_layers(tmp_path):
    # skip_modules naming such a layer wrote a config that keeps it dense beside its packed weight
    # (transformers then refused the checkpoint: size mismatch), and none of them was returned
    model = _bnb_model(tmp_path)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj is in skip_modules"):
        save_pretrained_nf4(model, tmp_path / "nf4", double_quant=False, skip_modules=["lm_head", "q_proj"])
    assert not (tmp_path / "nf4" / "model.safetensors").exists()
    with pytest.raises(ValueError, match=r"pass blocksize=64, double_quant=False"):
        save_pretrained_nf4(model, tmp_path / "nf4", double_quant=True)
    # by default with the layers' own settings (the default double_quant=True was refused for them)
    for out, kw in (("nf4", {"double_quant": False}), ("as_held", {})):
        names = save_pretrained_nf4(model, tmp_path / out, **kw)
        assert names == [n for n, m in model.named_modules() if type(m) is bitsandbytes.nn.Linear4bit]
        ours, ref = (load_file(tmp_path / d / "model.safetensors") for d in (out, "bnb"))
        assert sorted(ours) == sorted(ref) and all(torch.equal(ours[k], ref[k]) for k in ref)
        config = json.loads((tmp_path / out / "config.json").read_text())["quantization_config"]
        assert config["bnb_4bit_use_double_quant"] is False


def test_a_layer_bitsandbytes_repacked_for_its_cpu_path_is_refused(tmp_path):
    # bitsandbytes' CPU inference repacks a layer, and its state then gives other weights: saved as
    # it was, the checkpoint loaded in transformers with weights that were not the model's
    model = _bnb_model(tmp_path)
    if not model.model.layers[0].self_attn.q_proj.support_avx512bf16_for_cpu:
        pytest.skip("bitsandbytes repacks layers only on a CPU with AVX512-BF16")
    with torch.no_grad():
        model(torch.tensor([[1, 5, 7]]))
    with pytest.raises(
        ValueError, match=r"cannot save model\.layers\.0\.self_attn\.q_proj.*its CPU inference path"
    ):
        save_pretrained_nf4(model, tmp_path / "nf4", double_quant=False)
    assert not (tmp_path / "nf4" / "model.safetensors").exists()


def test_a_model_bitsandbytes_quantized_in_fp4_is_refused_naming_a_layer(tmp_path):
    # its layers are bitsandbytes 4-bit layers too, but of the FP4 code: saved under an NF4 config
    # their codes would decode to other weights
    from tests.test_loading import tiny_model

    tiny_model().save_pretrained(tmp_path / "dense")
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "dense", quantization_config=cfg, device_map="cpu"
    )
    with pytest.raises(
        ValueError,
        match=r"cannot save model\.layers\.0\.self_attn\.q_proj, a layer bitsandbytes quantized: "
        r"'model\.layers\.0\.self_attn\.q_proj\.weight' is quantized as FP4; hoptune reads NF4 only",
    ):
        save_pretrained_nf4(model, tmp_path / "nf4", double_quant=False)
    assert not (tmp_path / "nf4").exists()


@pytest.mark.parametrize("skip", [None, 3])
def test_skip_modules_that_is_no_list_is_refused_naming_it(tmp_path, skip):
    # None (BitsAndBytesConfig's "pick the head for me") failed with a bare
    # "'NoneType' object is not iterable"
    from tests.test_loading import tiny_model

    match = rf"skip_modules must be a list of module names, got {skip!r}: pass \[\] to skip none"
    with pytest.raises(TypeError, match=match):
        bnb_quantization_config(skip_modules=skip)
    with pytest.raises(TypeError, match=match):
        save_pretrained_nf4(tiny_model(), tmp_path, skip_modules=skip)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("dq", [None, "False", 1])
def test_double_quant_that_is_no_bool_is_refused_naming_it(tmp_path, dq):
    # None was taken as False: the layers were stored without double quantization and config.json
    # held "bnb_4bit_use_double_quant": null, which transformers refuses to load ("must be a boolean");
    # save_pretrained_nf4 takes None as its default (the NF4 layers' own setting, else True)
    from tests.test_loading import tiny_model

    match = rf"double_quant must be True or False, got {dq!r}"
    with pytest.raises(TypeError, match=match):
        bnb_quantization_config(double_quant=dq)
    if dq is None:
        save_pretrained_nf4(tiny_model(), tmp_path, double_quant=dq)
        config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
        assert config["bnb_4bit_use_double_quant"] is True
        return
    with pytest.raises(TypeError, match=match):
        save_pretrained_nf4(tiny_model(), tmp_path, double_quant=dq)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("make", [lambda w: w, lambda w: NF4Linear.from_linear(nn.Linear(64, 64))])
def test_to_bnb_state_dict_of_no_nf4_weight_is_refused_naming_it(make):
    # a dense tensor (or an NF4 layer) failed with a bare "'Tensor' object has no attribute 'blocksize'"
    from hoptune.quant import to_bnb_state_dict

    q = make(torch.randn(64, 64))
    with pytest.raises(TypeError, match=rf"q must be an NF4Weight .*got {type(q).__name__}"):
        to_bnb_state_dict(q, "model.layers.0.mlp.up_proj.weight")


def test_a_model_bitsandbytes_quantized_is_saved_with_its_own_skip_list_and_compute_dtype(tmp_path):
    # the default skip list was ["lm_head"] whatever the model's quantization_config held: the
    # down_proj layers transformers kept dense were quantized, and the compute dtype written was
    # that of the first parameter (bfloat16), not the model's (float32)
    from tests.test_loading import _bnb_checkpoint, tiny_model

    tiny_model().save_pretrained(tmp_path / "dense")
    model = _bnb_checkpoint(
        tmp_path / "dense",
        tmp_path / "bnb",
        llm_int8_skip_modules=["lm_head", "down_proj"],
        bnb_4bit_compute_dtype=torch.float32,
    )
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    names = save_pretrained_nf4(model, tmp_path / "nf4", double_quant=False)
    assert names == [n for n, m in model.named_modules() if type(m) is bitsandbytes.nn.Linear4bit]
    config = json.loads((tmp_path / "nf4" / "config.json").read_text())["quantization_config"]
    assert config["llm_int8_skip_modules"] == ["lm_head", "down_proj"]
    assert config["bnb_4bit_compute_dtype"] == "float32"
    assert config["bnb_4bit_use_double_quant"] is False  # as saved: no nested absmax in the file
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", device_map="cpu")
    assert loaded.config.quantization_config.bnb_4bit_use_double_quant is False
    assert type(loaded.model.layers[1].mlp.down_proj) is nn.Linear
    assert loaded.model.layers[1].mlp.up_proj.compute_dtype == torch.float32
    ours, ref = (load_file(tmp_path / d / "model.safetensors") for d in ("nf4", "bnb"))
    assert sorted(ours) == sorted(ref) and all(torch.equal(ours[k], ref[k]) for k in ref)
    assert not any(k.endswith("nested_absmax") for k in ours)


def _tiny_biogpt():
    cfg = transformers.BioGptConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return transformers.BioGptForCausalLM(cfg)


def _tiny_gpt_neox_japanese():
    cfg = transformers.GPTNeoXJapaneseConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_multiple_size=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.GPTNeoXJapaneseForCausalLM(cfg)


@pytest.mark.parametrize("make", [_tiny_biogpt, _tiny_gpt_neox_japanese])
def test_the_default_keeps_an_output_head_not_named_lm_head_dense(tmp_path, make):
    # BioGPT's untied output_projection was quantized (transformers keeps the output embeddings
    # dense); GPT-NeoX-Japanese's tied embed_out was refused, asking to keep it in skip_modules
    # "as the default does"
    torch.manual_seed(0)
    model = make().to(torch.bfloat16).eval()
    head = model.get_output_embeddings()
    head_name = next(n for n, m in model.named_modules() if m is head)
    assert head_name != "lm_head"
    names = save_pretrained_nf4(model, tmp_path)
    assert names and head_name not in names
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert head_name in config["llm_int8_skip_modules"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    assert type(loaded.get_output_embeddings()) is nn.Linear
    assert torch.equal(loaded.get_output_embeddings().weight, head.weight)


@pytest.mark.parametrize("source", ["dense", "load_model"])
def test_a_prediction_head_named_lm_head_quantizes_as_in_transformers(tmp_path, source):
    """RoBERTa's lm_head is a prediction head (dense, layer norm, then the output layer
    lm_head.decoder): transformers + bitsandbytes quantize lm_head.dense and keep the decoder dense.
    The default skip list's "lm_head" kept lm_head.dense dense as well, and a model from load_model
    (which quantizes it, as transformers does) could not be saved: "lm_head.dense is in
    skip_modules=['lm_head', 'lm_head.decoder'] but is NF4 already"."""
    import hoptune
    from tests.conftest import encoder_as_decoder

    encoder_as_decoder("roberta", layers=1).save_pretrained(tmp_path / "dense")
    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    want = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "dense", quantization_config=bnb, device_map="cpu", dtype=torch.bfloat16
    )
    if source == "dense":
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.bfloat16)
    else:
        model = hoptune.load_model(tmp_path / "dense", device="cpu", progress=False)
        assert isinstance(model.lm_head.dense, NF4Linear)
    names = save_pretrained_nf4(model, tmp_path / "nf4")
    assert "lm_head.dense" in names and "lm_head.decoder" not in names
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", device_map="cpu")
    types = [{n: type(m) for n, m in x.named_modules()} for x in (loaded, want)]
    assert types[0] == types[1]
    assert type(want.lm_head.dense) is bitsandbytes.nn.Linear4bit


def test_a_model_quantized_by_another_method_is_refused(tmp_path):
    # a model transformers loaded in bitsandbytes 8-bit was saved without an error, its int8 codes
    # written as dense weights under an NF4 quantization_config (no layer in NF4); load_model then
    # cast the codes to bfloat16: wrong weights, with only an "unused tensors" warning
    from tests.test_loading import tiny_model

    tiny_model().save_pretrained(tmp_path / "dense")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "dense",
        quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True),
        device_map="cpu",
    )
    assert type(model.model.layers[0].mlp.up_proj) is bitsandbytes.nn.Linear8bitLt
    match = (
        r"model is quantized by another method than bitsandbytes 4-bit \(quantization_config "
        r"\{'quant_method': 'bitsandbytes', 'load_in_4bit': False, 'load_in_8bit': True\}\)"
    )
    with pytest.raises(ValueError, match=match):
        save_pretrained_nf4(model, tmp_path / "nf4")
    assert not (tmp_path / "nf4").exists()


def test_layers_of_a_size_nf4_cannot_hold_stay_dense_by_default(tmp_path):
    """A layer whose weight count is not a multiple of the block size stays dense by default, with
    a warning, as load_model keeps it (the save of a model load_model gave failed on that layer);
    the checkpoint lists it in llm_int8_skip_modules, so transformers loads it dense too."""
    import hoptune
    from tests.test_loading import ids

    cfg = transformers.LlamaConfig(
        hidden_size=96, intermediate_size=71, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=128, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    dense.save_pretrained(tmp_path / "dense")
    with pytest.warns(UserWarning, match="stays dense"):
        model = hoptune.load_model(tmp_path / "dense", quantize="nf4", device="cpu")
    odd = ["gate_proj", "up_proj", "down_proj"]  # 96 x 71 weights
    assert {type(m) for n, m in model.named_modules() if n.endswith(tuple(odd))} == {nn.Linear}
    with pytest.warns(UserWarning, match=r"6 layers stay dense: .* not a multiple of blocksize=64"):
        names = save_pretrained_nf4(dense, tmp_path / "from_dense")
    assert sorted({n.rsplit(".", 1)[1] for n in names}) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    # a model with NF4 layers keeps the layers it has dense, as they are
    assert save_pretrained_nf4(model, tmp_path / "nf4") == names
    skips = json.loads((tmp_path / "nf4" / "config.json").read_text())["quantization_config"]
    assert "model.layers.1.mlp.down_proj" in skips["llm_int8_skip_modules"]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", device_map="cpu")
    assert type(loaded.model.layers[0].mlp.up_proj) is nn.Linear
    assert type(loaded.model.layers[0].self_attn.q_proj) is bitsandbytes.nn.Linear4bit
    # compared through load_model: bitsandbytes' CPU forward takes no such shapes
    again = hoptune.load_model(tmp_path / "nf4", device="cpu")
    with torch.no_grad():
        assert torch.equal(again(ids()).logits, model(ids()).logits)


@pytest.mark.parametrize(
    ("device", "match"),
    [
        ("gpu", "device must be 'cuda', 'cuda:N' or 'cpu', got 'gpu'"),
        ("meta", "device must be 'cuda', 'cuda:N' or 'cpu', got 'meta'"),
        ("cuda", "device='cuda' but no CUDA device is visible; pass device='cpu'"),
    ],
)
def test_a_device_it_cannot_quantize_on_is_refused_up_front(tmp_path, device, match):
    """save_pretrained_nf4's device is checked as load_model's, before any work (was torch's 'not
    compiled with CUDA' AssertionError from the first layer, or ignored where no layer needed it)."""
    from tests.test_loading import tiny_model

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here")
    with pytest.raises(ValueError, match=match):
        save_pretrained_nf4(tiny_model(), tmp_path / "nf4", device=device)
    assert not (tmp_path / "nf4").exists()


@pytest.mark.parametrize("wrap", ["plain", "data_parallel"])
def test_a_model_that_is_no_transformers_model_is_refused_naming_it(tmp_path, wrap):
    from tests.test_loading import tiny_model

    if wrap == "plain":
        model, match = nn.Sequential(nn.Linear(64, 64)), r"transformers model.*got Sequential$"
    else:  # (on a host without GPUs DataParallel only holds the model)
        model, match = nn.DataParallel(tiny_model()), r"got DataParallel.*pass model\.module"
    with pytest.raises(TypeError, match=match):
        save_pretrained_nf4(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    if wrap == "data_parallel":  # the model it wraps saves
        assert save_pretrained_nf4(model.module, tmp_path / "out")


def test_an_nf4_layer_with_a_nested_blocksize_bitsandbytes_cannot_run_is_refused_naming_it(tmp_path):
    """A layer quantized with blocksize2=64 (bitsandbytes loads such a state but its matmul_4bit
    refuses it) is refused by name, before anything is written."""
    from hoptune.quant import quantize_nf4
    from tests.test_loading import tiny_model

    model = tiny_model()
    proj = model.model.layers[1].mlp.up_proj
    w = proj.weight.detach().float()
    model.model.layers[1].mlp.up_proj = NF4Linear(quantize_nf4(w, blocksize2=64))
    out = tmp_path / "nf4"
    with pytest.raises(
        ValueError, match=r"model\.layers\.1\.mlp\.up_proj is NF4 already with blocksize2=64 .*256"
    ):
        save_pretrained_nf4(model, out)
    assert not out.exists()


def test_keys_transformers_renames_on_loading_are_written_as_it_reads_them(tmp_path):
    """Laguna's checkpoints name its shared experts ``shared_expert.``, which transformers renames to
    ``shared_experts.`` as it loads them (and its routed experts it fuses into one tensor). Written
    under the in-memory names, a quantized shared expert's packed weight was renamed on loading but
    not its quant-state tensors: transformers built it without its quantization state and its
    forward failed ("quant_state is required"). The keys are written as save_pretrained writes them."""
    if not hasattr(transformers, "LagunaForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no Laguna")
    cfg = transformers.LagunaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        sliding_window=16,
    )
    torch.manual_seed(0)
    transformers.LagunaForCausalLM(cfg).save_pretrained(tmp_path / "dense")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    names = save_pretrained_nf4(model, tmp_path / "nf4")
    shared = [n for n in names if ".shared_experts." in n]
    assert shared
    keys = load_file(tmp_path / "nf4" / "model.safetensors").keys()
    on_disk = shared[0].replace(".shared_experts.", ".shared_expert.")
    assert f"{on_disk}.weight.absmax" in keys and f"{shared[0]}.weight" not in keys
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", device_map="cpu")
    layer = loaded.get_submodule(shared[0])
    assert type(layer) is bitsandbytes.nn.Linear4bit and layer.weight.quant_state is not None
    theirs = bitsandbytes.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    want = dequantize_nf4(quantize_nf4(model.get_submodule(shared[0]).weight.detach()), torch.float32)
    assert torch.equal(theirs.float(), want)
