"""hoptune.disable_adapters(model): PEFT's ``model.disable_adapter()`` for a model adapted in place
(e.g. a DPO reference pass on the same weights)."""

from __future__ import annotations

import pytest
import torch

import hoptune
from tests.test_patch import ids, logits, tiny_model


def _adapted(use_dora=False):
    base = tiny_model(seed=3)
    want = logits(base, ids())
    model = hoptune.apply_lora(base, r=4, alpha=8, target_modules="all-linear", use_dora=use_dora)
    with torch.no_grad():  # B != 0, so the adapters change the output
        for _, mod in hoptune.patch.lora_layers(model):
            mod.lora_B.normal_(0, 0.2)
            if use_dora:
                mod.lora_magnitude.mul_(1.5)
    return model, want


@pytest.mark.parametrize("use_dora", [False, True])
def test_disable_adapters_gives_the_base_and_restores(use_dora):
    model, base = _adapted(use_dora)
    adapted = logits(model, ids())
    assert not torch.allclose(adapted, base, atol=1e-3)
    with hoptune.disable_adapters(model) as m:
        assert m is model
        torch.testing.assert_close(logits(model, ids()), base, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(model, ids()), adapted, rtol=0, atol=0)


def test_disable_adapters_restores_after_an_error_and_keeps_disabled_layers_disabled():
    model, _ = _adapted()
    layers = hoptune.patch.lora_layers(model)
    layers[0][1].adapters_enabled = False  # disabled by the user before: stays so after the block
    with pytest.raises(RuntimeError, match="in the block"):
        with hoptune.disable_adapters(model):
            assert not any(m.adapters_enabled for _, m in layers)
            raise RuntimeError("in the block")
    assert [m.adapters_enabled for _, m in layers] == [False] + [True] * (len(layers) - 1)


def test_disable_adapters_on_a_model_without_lora_layers_is_an_error():
    with pytest.raises(ValueError, match=r"model \(LlamaForCausalLM\) has no LoRA layers to disable"):
        with hoptune.disable_adapters(tiny_model()):
            pass
