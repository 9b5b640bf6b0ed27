"""LoRA on transformers' Conv1D (GPT-2's projections: a linear layer whose weight is stored
transposed, [in, out]) with PEFT's semantics: selection, forward and gradients equal to PEFT's,
remove / merge giving back Conv1D layers, adapters (``fan_in_fan_out``) both ways."""

from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
import transformers
from torch import nn
from transformers.pytorch_utils import Conv1D

import hoptune
from hoptune.nn import LoRALinear
from tests.conftest import poison_cuda_cache

GPT2_TARGETS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}


def tiny_gpt2(seed: int = 0) -> nn.Module:
    cfg = transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=128, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg).eval()


def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(ids()).logits.double()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def adapted(model: nn.Module) -> list[str]:
    """The adapted module paths of a hoptune or a PEFT model, without PEFT's prefix."""
    out = []
    for n, m in model.named_modules():
        if isinstance(m, LoRALinear) or isinstance(getattr(m, "lora_A", None), nn.ModuleDict):
            out.append(n.removeprefix("base_model.model."))
    return sorted(out)


def peft_model(base: nn.Module, variant: str = "lora", target_modules="all-linear") -> nn.Module:
    torch.manual_seed(3)
    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=target_modules, init_lora_weights=False, **VARIANTS[variant]
    )
    with pytest.warns(UserWarning, match="fan_in_fan_out"):  # PEFT sets it itself, with a warning
        pm = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    with torch.no_grad():  # a magnitude different from ||W|| so DoRA's m matters
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.linspace(0.5, 1.5, p.numel()))
    return pm


def ours_like(base: nn.Module, pm: nn.Module, variant: str = "lora", **kw) -> nn.Module:
    """hoptune's model with the adapter weights of the PEFT model ``pm``, copied tensor by tensor."""
    model = hoptune.apply_lora(copy.deepcopy(base), r=4, alpha=8, **VARIANTS[variant], **kw)
    theirs = dict(pm.named_parameters())
    with torch.no_grad():
        for name, lora in model.named_modules():
            if isinstance(lora, LoRALinear):
                for mine, key in (("lora_A", "lora_A"), ("lora_B", "lora_B"), ("lora_magnitude", None)):
                    p = getattr(lora, mine)
                    if p is not None:
                        key = f"{key}.default.weight" if key else "lora_magnitude_vector.default.weight"
                        p.copy_(theirs[f"base_model.model.{name}.{key}"])
    return model


# -- selection --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "target, suffixes",
    [
        ("all-linear", GPT2_TARGETS),  # the output head (an nn.Linear) is not "all-linear"
        (["c_attn"], ["attn.c_attn"]),
        (r".*\.mlp\.c_(fc|proj)", ["mlp.c_fc", "mlp.c_proj"]),
        (["c_attn", "lm_head"], ["attn.c_attn"]),  # a Conv1D and an nn.Linear
    ],
)
def test_selects_conv1d_layers_as_peft_does(target, suffixes):
    base = tiny_gpt2()
    model = hoptune.apply_lora(copy.deepcopy(base), r=4, target_modules=target)
    want = sorted(f"transformer.h.{i}.{s}" for i in range(2) for s in suffixes)
    if isinstance(target, list) and "lm_head" in target:
        want = ["lm_head", *want]
    assert adapted(model) == want
    with pytest.warns(UserWarning):
        pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=target))
    assert adapted(pm) == want
    # B starts at zero: the model computes what it did before; only the adapters train
    assert rel(logits(model), logits(base)) < 1e-7
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.{p}" for n in want for p in ("lora_A", "lora_B")}


def test_rank_larger_than_the_layer_names_its_shape():
    model = tiny_gpt2()
    with pytest.raises(
        ValueError, match=r"r=65 is larger than layer transformer\.h\.0\.attn\.c_attn .*\[192, 64\]"
    ):
        hoptune.apply_lora(model, r=65, target_modules=["c_attn"])
    assert all(isinstance(model.get_submodule(f"transformer.h.0.{s}"), Conv1D) for s in GPT2_TARGETS)


# -- forward and gradients --------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_and_gradients_equal_peft(variant):
    base = tiny_gpt2()
    pm = peft_model(base, variant)
    model = ours_like(base, pm, variant)
    lora = model.transformer.h[0].attn.c_attn
    assert (lora.in_features, lora.out_features) == (64, 192)
    assert rel(logits(model), logits(base)) > 1e-3  # the adapter does something
    assert rel(logits(model), logits(pm)) <= 1e-6
    x = ids()
    for m in (model, pm):  # (in eval mode: GPT-2's own dropout off)
        m(input_ids=x, labels=x).loss.backward()
    theirs = {
        n.removeprefix("base_model.model."): p.grad for n, p in pm.named_parameters() if p.requires_grad
    }
    for name, lora in model.named_modules():
        if isinstance(lora, LoRALinear):
            for mine, key in (("lora_A", "lora_A.default.weight"), ("lora_B", "lora_B.default.weight")):
                torch.testing.assert_close(
                    getattr(lora, mine).grad, theirs[f"{name}.{key}"], atol=1e-6, rtol=1e-5
                )
            if lora.lora_magnitude is not None:
                want = theirs[f"{name}.lora_magnitude_vector.default.weight"]
                torch.testing.assert_close(lora.lora_magnitude.grad, want, atol=1e-6, rtol=1e-5)


def test_dense_base_is_a_view_of_the_layer_weight():
    """No copy of the base weight: the LoRALinear holds the Conv1D's storage, transposed."""
    base = tiny_gpt2()
    conv = base.transformer.h[0].mlp.c_fc
    hoptune.apply_lora(base, r=4)
    lora = base.transformer.h[0].mlp.c_fc
    assert lora.weight.shape == (256, 64) and lora.weight.data_ptr() == conv.weight.data_ptr()
    assert lora.bias is conv.bias


def test_quantize_nf4_matches_dequantized_reference():
    base = tiny_gpt2()
    model = hoptune.apply_lora(copy.deepcopy(base), r=4, quantize="nf4", init_lora_weights=False)
    ref = copy.deepcopy(base)
    for name in adapted(model):
        lora = model.get_submodule(name)
        assert lora.quantized
        with torch.no_grad():
            ref.get_submodule(name).weight.copy_(lora.merged_weight(torch.float32).t())
    assert rel(logits(model), logits(ref)) <= 1e-5


# -- remove and merge -------------------------------------------------------------------------
def test_remove_lora_gives_back_conv1d_and_requires_grad():
    model = tiny_gpt2()
    model.transformer.wte.weight.requires_grad_(False)
    model.transformer.h[1].attn.c_attn.bias.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    want = logits(model)
    hoptune.apply_lora(model, r=4, target_modules=["c_attn", "c_fc", "lm_head"], init_lora_weights=False)
    hoptune.remove_lora(model)
    assert adapted(model) == []
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D) and isinstance(model.lm_head, nn.Linear)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert now[k].shape == v.shape and torch.equal(now[k], v), k
        assert now[k].data_ptr() == ptrs[k], k  # the layers' own storage, not copies
    assert rel(logits(model), want) == 0


def test_remove_lora_of_nf4_gives_dequantized_conv1d():
    model = hoptune.apply_lora(tiny_gpt2(), r=4, quantize="nf4")
    lora = model.transformer.h[0].mlp.c_proj
    w = lora.base_weight(torch.float32)
    hoptune.remove_lora(model)
    conv = model.transformer.h[0].mlp.c_proj
    assert isinstance(conv, Conv1D) and conv.weight.shape == (256, 64) and conv.weight.is_contiguous()
    assert torch.equal(conv.weight, w.t())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merge_and_unload_equals_peft(variant):
    base = tiny_gpt2()
    pm = peft_model(base, variant, target_modules=["c_attn", "c_proj", "c_fc", "lm_head"])
    model = ours_like(base, pm, variant, target_modules=["c_attn", "c_proj", "c_fc", "lm_head"])
    merged = hoptune.merge_and_unload(model, dtype=torch.float32)
    theirs = pm.merge_and_unload()
    assert [type(m) for m in merged.modules()] == [type(m) for m in theirs.modules()]
    sd_ours, sd_theirs = merged.state_dict(), theirs.state_dict()
    assert sd_ours.keys() == sd_theirs.keys()
    for k, v in sd_theirs.items():
        if k == "transformer.wte.weight":  # PEFT adds the tied head's update to the embeddings too
            continue
        err = (sd_ours[k] - v).abs().max() / v.abs().max().clamp_min(1e-30)
        assert sd_ours[k].shape == v.shape and err <= 1e-6, (k, float(err))


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_merged_model_roundtrips_through_save_pretrained(quantize, tmp_path):
    model = hoptune.apply_lora(tiny_gpt2(), r=4, quantize=quantize, init_lora_weights=False)
    want = logits(model)
    merged = hoptune.merge_and_unload(model, dtype=torch.float32)
    assert all(isinstance(merged.transformer.h[1].get_submodule(s), Conv1D) for s in GPT2_TARGETS)
    assert all(p.requires_grad for p in merged.parameters())  # as before apply_lora
    assert rel(logits(merged), want) <= 1e-5  # (W + s B A rounded to fp32 once)
    merged.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert rel(logits(back), logits(merged)) == 0


# -- adapters ---------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_our_adapter_loads_in_peft(variant, tmp_path):
    base = tiny_gpt2()
    model = ours_like(base, peft_model(base, variant), variant)
    hoptune.save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["target_modules"] == ["c_attn", "c_fc", "c_proj"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]  # as PEFT wants it
    assert rel(logits(pm), logits(model)) <= 1e-6


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_peft_adapter_loads_in_hoptune(variant, tmp_path):
    base = tiny_gpt2()
    pm = peft_model(base, variant)
    pm.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    model = hoptune.load_adapter(copy.deepcopy(base), tmp_path)
    assert adapted(model) == adapted(pm)
    assert rel(logits(model), logits(pm)) <= 1e-6
    again = hoptune.load_adapter(model, tmp_path)  # into the patched model: weights replaced
    assert rel(logits(again), logits(pm)) <= 1e-6


def test_peft_adapter_with_fan_in_fan_out_false_loads(tmp_path):
    """PEFT writes false for Conv1D layers too (trained on a GPT-2 whose projections bitsandbytes
    made nn.Linear, or with an nn.Linear adapted last); the tensors read the same."""
    base = tiny_gpt2()
    pm = peft_model(base)
    pm.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "fan_in_fan_out": False}))
    assert rel(logits(hoptune.load_adapter(copy.deepcopy(base), tmp_path)), logits(pm)) <= 1e-6


class _Mixed(nn.Module):
    """An nn.Linear and a Conv1D, in the order given: PEFT's config ends with the last one's
    fan_in_fan_out."""

    def __init__(self, conv_last: bool):
        super().__init__()
        layers = [("lin", nn.Linear(16, 24)), ("conv", Conv1D(24, 16))]
        for name, layer in layers if conv_last else layers[::-1]:
            self.add_module(name, layer)

    def forward(self, h):
        return self.conv(h) + self.lin(h)


@pytest.mark.parametrize("conv_last", [True, False])
def test_mixed_layers_roundtrip_with_peft(conv_last, tmp_path):
    torch.manual_seed(0)
    base = _Mixed(conv_last).eval()
    h = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(1)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        pm = peft.get_peft_model(
            copy.deepcopy(base), peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
        )
    pm.save_pretrained(tmp_path / "peft")
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft_cfg["fan_in_fan_out"] is conv_last
    model = hoptune.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    with torch.no_grad():
        assert rel(model(h), pm(h)) <= 1e-6
    hoptune.save_adapter(model, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["fan_in_fan_out"] is conv_last
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    with torch.no_grad():
        assert rel(back(h), pm(h)) <= 1e-6


def test_fan_in_fan_out_true_without_conv1d_layers_loads_with_a_warning(tmp_path):
    """PEFT warns and reads fan_in_fan_out=true on nn.Linear layers as false (lora_A / lora_B are
    read the same either way): so does hoptune, which refused it, with a warning naming the field;
    the adapter is saved again with false, as PEFT saves it."""
    cfg = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, vocab_size=128
    )
    base = transformers.LlamaForCausalLM(cfg).eval()
    model = hoptune.apply_lora(copy.deepcopy(base), r=4, init_lora_weights=False)
    hoptune.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    assert json.loads(path.read_text())["fan_in_fan_out"] is False
    path.write_text(json.dumps({**json.loads(path.read_text()), "fan_in_fan_out": True}))
    with pytest.warns(
        UserWarning, match="fan_in_fan_out is set to True but the target module is `torch.nn.Linear`"
    ):
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with pytest.warns(UserWarning, match=r"fan_in_fan_out=true, .* Conv1D .* ignored for nn\.Linear layers"):
        loaded = hoptune.load_adapter(copy.deepcopy(base), tmp_path)
    assert rel(logits(loaded), logits(pm)) <= 1e-6 and rel(logits(loaded), logits(model)) <= 1e-6
    hoptune.save_adapter(loaded, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["fan_in_fan_out"] is False


def test_fan_in_fan_out_not_a_bool_is_an_error(tmp_path):
    base = tiny_gpt2()
    hoptune.save_adapter(hoptune.apply_lora(copy.deepcopy(base), r=4, target_modules=["c_attn"]), tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "fan_in_fan_out": "yes"}))
    with pytest.raises(ValueError, match="fan_in_fan_out must be true or false"):
        hoptune.load_adapter(base, tmp_path)
    assert adapted(base) == []


@pytest.mark.gpu
def test_nf4_conv1d_layers_on_the_gpu():
    """On the GPU the NF4 Conv1D layers run the CUDA kernels (bf16, 3-D x): the logits' error
    against the same model in fp32 on the merged weights (W + s B A of the same codes) is at most
    twice that of the dense model run in bf16, and the LoRA factors get gradients."""
    model = hoptune.apply_lora(tiny_gpt2(), r=4, quantize="nf4", init_lora_weights=False)
    ref = hoptune.remove_lora(copy.deepcopy(model))  # dense Conv1D layers, weights set below
    with torch.no_grad():
        for name in adapted(model):
            ref.get_submodule(name).weight.copy_(model.get_submodule(name).merged_weight(torch.float32).t())
    model, ref = model.to("cuda", torch.bfloat16), ref.cuda()
    x = ids().cuda()
    poison_cuda_cache()
    out = model(x).logits
    with torch.no_grad():
        want = ref(x).logits.double()
        dense_bf16 = copy.deepcopy(ref).bfloat16()(x).logits.double()
    assert rel(out.detach().double(), want) <= 2 * rel(dense_bf16, want) + 1e-3
    out.float().square().mean().backward()
    lora = model.transformer.h[1].attn.c_attn
    assert torch.isfinite(lora.lora_A.grad).all() and float(lora.lora_A.grad.abs().sum()) > 0
    assert torch.isfinite(lora.lora_B.grad).all() and float(lora.lora_B.grad.abs().sum()) > 0
