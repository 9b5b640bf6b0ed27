"""Models that read an NF4 layer's .weight for its dtype or pass it along without computing with it
run as under transformers + bitsandbytes (which quantize these layers too)."""

from __future__ import annotations

import pytest
import torch
import transformers

import hoptune
from hoptune.nn import LoRALinear
from hoptune.quant import dequantize_nf4
from tests.test_loading import ids

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128)  # fmt: skip


@pytest.mark.parametrize("arch", ["granitemoehybrid", "bamba"])
def test_a_mamba2_mixer_trains_without_a_cache_with_nf4(tmp_path, arch):
    """The Mamba-2 mixers (Bamba, GraniteMoeHybrid, Mamba2, Zamba2, FalconH1, NemotronH) pass
    out_proj.weight to their fused-kernel hook in training without a cache, whether a kernel runs or
    not (on CPU the hook returns None and the torch path follows): with out_proj NF4 the forward
    failed ("has no .weight") in train mode with use_cache=False only, where transformers +
    bitsandbytes run it. The loss is eval mode's (no dropout in these configs)."""
    extra = dict(mamba_n_heads=8, mamba_d_head=16, mamba_d_state=16, mamba_n_groups=1)
    extra |= (
        {"layer_types": ["mamba", "attention"]} if arch == "granitemoehybrid" else {"attn_layer_indices": [1]}
    )
    cfg = transformers.AutoConfig.for_model(arch, **SIZES, **extra)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "dense")
    model = hoptune.load_model(tmp_path / "dense", device="cpu", dtype=torch.float32, progress=False)
    hoptune.apply_lora(model, r=4, alpha=8)
    assert model.model.layers[0].mamba.out_proj.quantized
    x = ids()
    with torch.no_grad():
        want = model(x, labels=x, use_cache=False).loss
    model.train()
    loss = model(x, labels=x, use_cache=False).loss
    loss.backward()
    torch.testing.assert_close(loss.detach(), want)


def test_hunyuan_moe_router_reads_its_gate_dtype_with_nf4(tmp_path):
    """HunYuan-MoE's router reads `self.wg.weight.dtype` every forward: with wg NF4 (as
    transformers + bitsandbytes quantize it) the forward failed ("has no .weight"). The dtype read
    is the one the layer computes in; the logits are those of the model holding the dequantized
    weights."""
    cfg = transformers.AutoConfig.for_model("hunyuan_v1_moe", **SIZES, head_dim=16, num_experts=4, moe_topk=2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "dense")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    hoptune.apply_lora(model, r=2, quantize="nf4", init_lora_weights=False)
    for mod in model.modules():
        if isinstance(mod, LoRALinear):
            torch.nn.init.zeros_(mod.lora_B)  # (the base alone, for the comparison)
    gate = model.model.layers[0].mlp.gate.wg
    assert gate.quantized and gate.weight.dtype == torch.float32
    dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            dense.get_submodule(name).weight.data.copy_(dequantize_nf4(mod.weight_nf4, torch.float32))
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, dense(x).logits, rtol=1e-5, atol=1e-5)
    model.train()
    model(x, labels=x).loss.backward()
