"""A model from load_model in the QLoRA recipes of PEFT and transformers, as docs/INTEGRATION.md
describes them: PEFT cannot adapt hoptune's NF4 layers (an error, not a silent no-op), and its
prepare_model_for_kbit_training followed by apply_lora trains."""

from __future__ import annotations

import pytest
import torch
import transformers

import hoptune
from hoptune.nn import LoRALinear, NF4Linear
from tests.test_loading import ids, tiny_model


@pytest.fixture
def nf4_model(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    return hoptune.load_model(tmp_path, quantize="nf4", device="cpu", progress=False)


def test_nf4_model_is_not_marked_as_transformers_quantized(nf4_model):
    # the marks of transformers + bitsandbytes would make transformers refuse .half() and .float(),
    # which NF4Linear supports, and its Trainer refuse a model whose adapters are not PEFT's
    for name in ("is_loaded_in_4bit", "is_quantized", "quantization_method", "hf_quantizer"):
        assert not getattr(nf4_model, name, None), name
    hoptune.apply_lora(nf4_model, r=4)
    validate = getattr(transformers.trainer_utils, "validate_quantization_for_training", None)
    if validate is not None:
        validate(nf4_model)


def test_peft_refuses_the_nf4_layers(nf4_model):
    peft = pytest.importorskip("peft")

    with pytest.raises(ValueError, match="NF4Linear.*is not supported"):
        peft.get_peft_model(nf4_model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    # "all-linear" finds no layer (PEFT looks for nn.Linear or bitsandbytes' Linear4bit)
    with pytest.raises(ValueError):
        peft.get_peft_model(nf4_model, peft.LoraConfig(r=4, target_modules="all-linear"))


def test_prepare_model_for_kbit_training_then_apply_lora_trains(nf4_model):
    peft = pytest.importorskip("peft")

    model = peft.prepare_model_for_kbit_training(nf4_model)
    # it casts the dense parameters to float32 but, the model not being marked as 4-bit, does
    # not turn on checkpointing: the recipe does that itself
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    hoptune.apply_lora(model, r=4, init_lora_weights=False)  # A and B random
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    loss = model(input_ids=ids(), labels=ids()).loss
    loss.backward()
    adapted = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(adapted) == 14 and all(m.quantized for m in adapted)
    for m in adapted:
        for p in (m.lora_A, m.lora_B):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert not any(isinstance(m, NF4Linear) for m in model.modules())  # all wrapped
