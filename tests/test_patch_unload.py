"""remove_lora / merge_and_unload against what transformers does with the result: the tensors a
model keeps in float32, the tying flag of a composite (vision-language) config, and a model whose
LoRA layers went on a submodule."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from torch import nn

import hoptune
from tests.test_patch import ids, logits, tiny_model


def tiny_deepseek_v3() -> nn.Module:
    """A 2-layer DeepSeek-V3 (its second layer MoE): the router's ``gate.weight`` is in
    ``_keep_in_fp32_modules_strict``, fp32 in a bf16 model."""
    config = transformers.DeepseekV3Config(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=128,
        max_position_embeddings=64,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=16,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return transformers.DeepseekV3ForCausalLM(config).eval()


def dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    return {n: p.dtype for n, p in model.named_parameters()}


def test_merge_keeps_the_tensors_the_model_keeps_in_fp32(tmp_path):
    """merge_and_unload(dtype=bf16) gives the dtypes from_pretrained(dtype=bf16) gives: the MoE
    router stays fp32 (it was rounded to bf16, and saved so) and keeps its values exactly."""
    base = tiny_deepseek_v3()
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.01 * torch.randn_like(p))  # (weights not exactly representable in bf16)
    base.save_pretrained(tmp_path)
    want = dtypes(transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16))
    assert want["model.layers.1.mlp.gate.weight"] == torch.float32  # (what is tested)
    model = hoptune.apply_lora(copy.deepcopy(base), r=2, target_modules=["q_proj"])
    merged = hoptune.merge_and_unload(model)
    assert dtypes(merged) == want
    gate = merged.model.layers[1].mlp.gate.weight
    torch.testing.assert_close(gate, base.model.layers[1].mlp.gate.weight, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_keeps_an_adapted_layer_the_model_keeps_in_fp32(dtype):
    """A layer named in ``_keep_in_fp32_modules_strict`` (HunYuan-V4 names its lm_head) that had
    an adapter: merged in fp32, not rounded to ``dtype``; ``_keep_in_fp32_modules`` for float16
    only."""
    model = tiny_model("llama")
    model._keep_in_fp32_modules_strict = ["lm_head"]
    model._keep_in_fp32_modules = ["post_attention_layernorm"]
    hoptune.apply_lora(model, r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    want = model.lm_head.to_linear(merge=True, dtype=torch.float32).weight
    merged = hoptune.merge_and_unload(model, dtype=dtype)
    assert merged.lm_head.weight.dtype == torch.float32
    torch.testing.assert_close(merged.lm_head.weight, want, atol=0, rtol=0)
    norm = merged.model.layers[0].post_attention_layernorm.weight.dtype
    assert norm == (torch.float32 if dtype == torch.float16 else dtype)
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == dtype


def tiny_llava(tie: bool = True) -> nn.Module:
    """A Llava whose text config says the head is tied (where pre-v5 checkpoints keep it)."""
    text = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    vision = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
    )
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=127)
    return transformers.LlavaForConditionalGeneration(config).eval()


def test_merge_of_a_tied_head_unties_a_composite_config(tmp_path):
    """Llava's config takes ``tie_word_embeddings`` from its text config when its own is False:
    a merged head that had an adapter must be untied there too, or the reloaded model says tied
    and tie_weights() (resize_token_embeddings) puts the embedding matrix in the head's place."""
    model = tiny_llava()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    x = ids()
    hoptune.apply_lora(model, r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    want = logits(model, x)
    merged = hoptune.merge_and_unload(model, dtype=torch.float32)
    assert merged.config.get_text_config(decoder=True).tie_word_embeddings is False
    merged.save_pretrained(tmp_path)
    back = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert back.config.tie_word_embeddings is False
    back.tie_weights()
    torch.testing.assert_close(logits(back, x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("unload", ["remove_lora", "merge_and_unload"])
def test_unload_of_a_model_adapted_through_a_submodule(unload):
    """apply_lora(model.model) keeps the requires_grad it changed on model.model: remove_lora /
    merge_and_unload of the whole model must give them back (they stayed frozen)."""
    model = tiny_model("llama")
    model.model.embed_tokens.weight.requires_grad_(False)
    want = {n: p.requires_grad for n, p in model.named_parameters()}
    hoptune.apply_lora(model.model, r=2)
    assert not model.model.layers[0].input_layernorm.weight.requires_grad
    if unload == "remove_lora":
        hoptune.remove_lora(model)
    else:
        hoptune.merge_and_unload(model, dtype=torch.float32)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == want
    assert not any(hasattr(m, "_hoptune_lora") for m in model.modules())


@pytest.mark.parametrize("unload", ["remove_lora", "merge_and_unload"])
def test_unload_of_a_submodule_of_the_adapted_model(unload):
    """apply_lora(model), then remove_lora / merge_and_unload(model.model): the parameters under
    model.model get their requires_grad back from model's record; the rest (lm_head, adapted too)
    come back with a later remove_lora(model)."""
    model = tiny_model("llama")
    model.model.embed_tokens.weight.requires_grad_(False)
    want = {n: p.requires_grad for n, p in model.named_parameters()}
    hoptune.apply_lora(model, r=2, target_modules=["q_proj", "lm_head"])
    if unload == "remove_lora":
        hoptune.remove_lora(model.model)
    else:
        hoptune.merge_and_unload(model.model, dtype=torch.float32)
    now = {n: p.requires_grad for n, p in model.model.named_parameters()}
    assert now == {n[len("model.") :]: g for n, g in want.items() if n.startswith("model.")}
    assert not model.lm_head.base_weight().requires_grad
    hoptune.remove_lora(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == want
    assert not any(hasattr(m, "_hoptune_lora") for m in model.modules())


def test_remove_of_the_model_after_its_only_adapted_submodule():
    """apply_lora(model) (all-linear: model.model only), remove_lora(model.model), then
    remove_lora(model) gives back the rest of the record (lm_head) instead of raising."""
    model = tiny_model("llama")
    want = {n: p.requires_grad for n, p in model.named_parameters()}
    hoptune.apply_lora(model, r=2)
    hoptune.remove_lora(model.model)
    assert model.model.layers[0].input_layernorm.weight.requires_grad
    hoptune.remove_lora(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == want
    with pytest.raises(ValueError, match="no LoRA layers"):
        hoptune.remove_lora(model)


def test_merge_and_unload_and_save_adapter_take_dtype_names(tmp_path):
    """dtype="bfloat16" was refused with 'dtype must be float32, bfloat16, float16 or None, got
    bfloat16' (str(torch.bfloat16) reads the same)."""
    from safetensors.torch import load_file

    from tests.test_loading import tiny_model as tiny_llama

    model = tiny_llama(dtype=torch.float32)
    hoptune.apply_lora(model, r=4)
    by_name = hoptune.merge_and_unload(copy.deepcopy(model), dtype="bf16")
    by_type = hoptune.merge_and_unload(copy.deepcopy(model), dtype=torch.bfloat16)
    assert by_name.dtype == torch.bfloat16
    for (n, a), (_, b) in zip(by_name.named_parameters(), by_type.named_parameters()):
        assert torch.equal(a, b), n
    with pytest.raises(
        TypeError, match=r"dtype must be torch\.float32, .*\(or its name, .*\) or None, got 'bfloat'"
    ):
        hoptune.merge_and_unload(copy.deepcopy(model), dtype="bfloat")
    hoptune.save_adapter(model, tmp_path / "a", dtype="bfloat16")
    bf16 = tiny_llama(dtype=torch.float32)
    hoptune.apply_lora(bf16, r=4, adapter_dtype="bf16")  # (apply_lora too)
    assert {p.dtype for n, p in bf16.named_parameters() if "lora_" in n} == {torch.bfloat16}
    assert {t.dtype for t in load_file(tmp_path / "a" / "adapter_model.safetensors").values()} == {
        torch.bfloat16
    }
