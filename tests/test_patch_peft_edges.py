"""apply_lora / remove_lora / merge_and_unload at the edges: a merge or removal that fails part way,
a layer whose module reads its weight directly (nn.MultiheadAttention's out_proj), a layer smaller
than the rank (Qwen2-MoE's shared_expert_gate)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import hoptune
from hoptune.nn import LoRALinear
from tests.test_patch import assert_same, ids, logits, lora_names, snapshot, tiny_model


def test_merge_that_fails_part_way_leaves_the_model_as_it_was(monkeypatch):
    """An error while merging one layer (out of memory, say) must not leave the layers before it
    merged and the rest still LoRA: the model is as it was, and a second merge gives the result."""
    model = hoptune.apply_lora(tiny_model("llama"), r=4, init_lora_weights=False)
    x = ids()
    want = logits(model, x)
    snap = snapshot(model)
    to_linear, calls = LoRALinear.to_linear, []

    def failing(self, *a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("CUDA out of memory (simulated)")
        return to_linear(self, *a, **kw)

    monkeypatch.setattr(LoRALinear, "to_linear", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        hoptune.merge_and_unload(model, dtype=torch.float32)
    assert len(calls) == 3
    assert_same(model, snap)  # (module types, tensors and requires_grad)
    torch.testing.assert_close(logits(model, x), want, atol=0, rtol=0)
    monkeypatch.setattr(LoRALinear, "to_linear", to_linear)
    merged = hoptune.merge_and_unload(copy.deepcopy(model), dtype=torch.float32)
    torch.testing.assert_close(logits(merged, x), want, atol=1e-5, rtol=1e-5)


def test_remove_lora_that_fails_part_way_leaves_the_model_as_it_was(monkeypatch):
    """remove_lora dequantizes the bases apply_lora(quantize="nf4") quantized: an error there (out of
    memory) must not leave some layers dense and the rest still LoRA."""
    model = hoptune.apply_lora(tiny_model("llama"), r=4, quantize="nf4", init_lora_weights=False)
    x = ids()
    want = logits(model, x)
    snap = snapshot(model)
    to_linear, calls = LoRALinear.to_linear, []

    def failing(self, *a, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("CUDA out of memory (simulated)")
        return to_linear(self, *a, **kw)

    monkeypatch.setattr(LoRALinear, "to_linear", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        hoptune.remove_lora(model)
    assert len(calls) == 5
    assert_same(model, snap)
    torch.testing.assert_close(logits(model, x), want, atol=0, rtol=0)


def tiny_siglip() -> torch.nn.Module:
    """A SigLIP vision tower: its pooling head holds an nn.MultiheadAttention."""
    cfg = transformers.SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=16,
        patch_size=8,
    )
    torch.manual_seed(0)
    return transformers.SiglipVisionModel(cfg).eval()


def test_nf4_on_a_multihead_attention_out_proj_is_refused_up_front():
    """nn.MultiheadAttention reads out_proj.weight itself: with an NF4 base there is no weight, and
    the forward failed with "'LoRALinear' object has no attribute 'weight'". Refused before any
    layer is replaced, naming the layer and the way out."""
    model = tiny_siglip()
    snap = snapshot(model)
    with pytest.raises(
        ValueError, match=r"head\.attention\.out_proj is the out_proj of an nn\.MultiheadAttention"
    ):
        hoptune.apply_lora(model, r=4, quantize="nf4")
    assert_same(model, snap)
    hoptune.apply_lora(model, r=4, quantize="nf4", exclude_modules=["head.attention.out_proj"])
    pixels = torch.randn(2, 3, 16, 16)
    assert model(pixel_values=pixels).pooler_output.shape == (2, 64)
    # dense, it is selected as PEFT selects it ("all-linear")
    dense = hoptune.apply_lora(tiny_siglip(), r=4)
    assert isinstance(dense.head.attention.out_proj, LoRALinear)


def test_rank_above_a_layer_names_the_way_out():
    """Qwen2-MoE's shared_expert_gate has one output: "all-linear" with r > 1 is refused, and the
    error says how to go on (PEFT would give it rank r)."""
    cfg = transformers.Qwen2MoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
    )
    model = transformers.Qwen2MoeForCausalLM(cfg)
    with pytest.raises(ValueError, match=r"shared_expert_gate .*rank_pattern.*exclude_modules"):
        hoptune.apply_lora(model, r=4)
    hoptune.apply_lora(model, r=4, rank_pattern={"shared_expert_gate": 1})
    assert model.model.layers[0].mlp.shared_expert_gate.r == 1


@pytest.mark.parametrize("unload", ["remove_lora", "merge_and_unload"])
def test_a_linear_subclass_comes_back_as_its_own_class(unload):
    """nn.MultiheadAttention's out_proj is a NonDynamicallyQuantizableLinear: taking the adapters
    out gives that class back (as PEFT gives back the base layer itself), not a plain nn.Linear."""
    model = tiny_siglip()
    cls = type(model.head.attention.out_proj)
    assert cls is not torch.nn.Linear
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = model(pixel_values=pixels).pooler_output
    hoptune.apply_lora(model, r=4)
    getattr(hoptune, unload)(model, **({"dtype": None} if unload == "merge_and_unload" else {}))
    assert type(model.head.attention.out_proj) is cls
    assert type(model.encoder.layers[0].self_attn.q_proj) is torch.nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixels).pooler_output, want, atol=1e-6, rtol=0)


class _Doubled(torch.nn.Linear):
    """A linear subclass with its own forward (as a grouped or routed projection has)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_a_linear_subclass_with_its_own_forward_is_refused():
    """A LoRALinear computes x W^T + b: in place of a layer that computes something else it changed
    the model's output silently. Refused before any layer is replaced, naming the layer, its class
    and the way out."""
    model = tiny_model("llama")
    mlp = model.model.layers[1].mlp
    mlp.down_proj = _Doubled(128, 64, bias=False)
    snap = snapshot(model)
    with pytest.raises(
        ValueError,
        match=r"model\.layers\.1\.mlp\.down_proj is a .*_Doubled.*own forward.*exclude_modules=\['down_proj'\]",
    ):
        hoptune.apply_lora(model, r=4)
    assert_same(model, snap)
    x = ids()
    want = logits(model, x)
    hoptune.apply_lora(model, r=4, exclude_modules=["model.layers.1.mlp.down_proj"])
    assert type(model.model.layers[1].mlp.down_proj) is _Doubled
    torch.testing.assert_close(logits(model, x), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("target", ["all-linear", ["q_proj"], ["o_proj"]])
def test_a_model_peft_has_wrapped_is_refused(target):
    """PEFT's LoRA layers hold nn.Linear children (base_layer, lora_A.default, lora_B.default):
    "all-linear" put hoptune's adapters inside them, an adapter on PEFT's adapter, and a name list
    called PEFT's layer "not a linear layer". Either way the error says what the model is."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, target_modules=["q_proj"])
    model = peft.get_peft_model(tiny_model("llama"), config)
    snap = snapshot(model)
    match = r"q_proj is a PEFT .*Linear.*merge_and_unload\(\).*load_adapter"
    with pytest.raises(TypeError, match=match):
        hoptune.apply_lora(model, r=2, target_modules=target)
    assert_same(model, snap)


@pytest.fixture
def process_group():
    """A one-process gloo group on the CPU, as DistributedDataParallel needs one."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("compiled", [False, True])
def test_a_model_inside_distributed_data_parallel_is_refused(process_group, compiled):
    """DistributedDataParallel all-reduces the gradients of the parameters it was built with: LoRA
    layers made inside it afterwards were trained apart on every process (silently: its buckets
    hold the frozen base weights, which get no gradient). As load_adapter, apply_lora refuses."""
    model = tiny_model("llama")
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    wrapped = torch.compile(ddp) if compiled else ddp
    snap = snapshot(model)
    with pytest.raises(ValueError, match="DistributedDataParallel: apply LoRA to the model before"):
        hoptune.apply_lora(wrapped, r=4)
    assert_same(model, snap)
    hoptune.apply_lora(model, r=4)  # before wrapping: fine
    assert len(lora_names(model)) == 14
