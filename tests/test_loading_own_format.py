"""load_model reads back what transformers' save_pretrained writes for a model with hoptune's NF4
layers (their own state-dict form: weight_packed, weight_absmax, ..., weight_nf4_meta; a Trainer
checkpoint holds the same), and says what happens to LoRA factors saved that way."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import hoptune
from hoptune.nn import LoRALinear, NF4Linear
from hoptune.quant import quantize_nf4, to_bnb_state_dict
from tests.conftest import poison_cuda_cache
from tests.test_conv1d import tiny_gpt2
from tests.test_loading import ids, logits, nf4_layers, tiny_model


def _nf4_model(tmp_path, arch="qwen2", **kw):
    tiny_model(arch, seed=3).save_pretrained(tmp_path / "bf16")
    return hoptune.load_model(tmp_path / "bf16", device="cpu", progress=False, **kw)


def _same_layers(a, b):
    la, lb = nf4_layers(a), nf4_layers(b)
    assert sorted(la) == sorted(lb) and la
    for name, m in la.items():
        n = lb[name]
        for buf in ("weight_packed", "weight_absmax", "weight_absmax2", "weight_code2"):
            x, y = getattr(m, buf), getattr(n, buf)
            assert (x is None) == (y is None), (name, buf)
            assert x is None or (x.dtype == y.dtype and torch.equal(x, y)), (name, buf)
        assert m._nf4_meta == n._nf4_meta, name


@pytest.mark.parametrize(
    "kw", [{}, {"double_quant": False}, {"blocksize": 128, "skip_modules": ["down_proj"]}]
)
def test_save_pretrained_of_an_nf4_model_loads_back_as_stored(tmp_path, kw):
    model = _nf4_model(tmp_path, **kw)
    model.save_pretrained(tmp_path / "saved")
    sd = load_file(tmp_path / "saved" / "model.safetensors")
    assert "model.layers.0.self_attn.q_proj.weight_packed" in sd  # hoptune's own form, not bnb's
    for quantize in ("nf4", None):  # stored NF4 loads as stored either way
        back = hoptune.load_model(tmp_path / "saved", quantize=quantize, device="cpu", progress=False)
        _same_layers(back, model)
        if "skip_modules" in kw:
            assert type(back.model.layers[0].mlp.down_proj) is torch.nn.Linear
        torch.testing.assert_close(logits(back), logits(model), atol=0, rtol=0)


def test_save_pretrained_of_an_nf4_gpt2_loads_back(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "dense")
    model = hoptune.load_model(tmp_path / "dense", device="cpu", dtype=torch.float32, progress=False)
    assert nf4_layers(model)
    model.save_pretrained(tmp_path / "saved")
    back = hoptune.load_model(tmp_path / "saved", device="cpu", dtype=torch.float32, progress=False)
    _same_layers(back, model)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=0, rtol=0)
    # merge_and_unload still gives GPT-2's Conv1D back for a layer read this way
    layer = back.transformer.h[0].attn.c_attn
    assert isinstance(layer, NF4Linear)
    merged = hoptune.merge_and_unload(back, dtype=torch.float32)
    assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"


def test_lora_factors_saved_with_the_model_are_named_and_can_be_read_in(tmp_path):
    model = _nf4_model(tmp_path)
    hoptune.apply_lora(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    for m in model.modules():  # adapters that change the output
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.5)
    want = logits(model)
    model.save_pretrained(tmp_path / "saved")
    with pytest.warns(
        UserWarning, match=r"holds the LoRA factors of 4 layers .*loads the base model only"
    ) as rec:
        back = hoptune.load_model(tmp_path / "saved", device="cpu", progress=False)
    assert not [w for w in rec if "not used by" in str(w.message)]  # (said once, by what they are)
    assert len(nf4_layers(back)) == 14
    hoptune.apply_lora(back, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    result = back.load_state_dict(load_file(tmp_path / "saved" / "model.safetensors"), strict=False)
    assert not result.unexpected_keys
    torch.testing.assert_close(logits(back), want, atol=0, rtol=0)


def _edit(tmp_path, fn):
    model = _nf4_model(tmp_path)
    model.save_pretrained(tmp_path / "saved")
    path = tmp_path / "saved" / "model.safetensors"
    sd = load_file(path)
    fn(sd)
    save_file(sd, path, metadata={"format": "pt"})
    return tmp_path / "saved"


Q = "model.layers.1.self_attn.k_proj"


@pytest.mark.parametrize(
    "edit, err, match",
    [
        (
            lambda sd: sd.pop(f"{Q}.weight_nf4_meta"),
            ValueError,
            rf"NF4 weight of {Q} lacks its tensor {Q}\.weight_nf4_meta",
        ),
        (lambda sd: sd.pop(f"{Q}.weight_absmax"), ValueError, rf"lacks its tensor {Q}\.weight_absmax"),
        (
            lambda sd: sd.pop(f"{Q}.weight_code2"),
            ValueError,
            r"only one of .*weight_absmax2 and .*weight_code2",
        ),
        (
            lambda sd: sd.__setitem__(f"{Q}.weight", torch.rand(32, 64)),
            ValueError,
            rf"{Q} is stored both dense .* and in NF4",
        ),
        (
            lambda sd: sd.__setitem__(f"{Q}.weight_packed", sd[f"{Q}.weight_packed"][:-32].clone()),
            ValueError,
            rf"{Q}\.weight_packed holds \d+ 4-bit codes but Qwen2ForCausalLM needs \[32, 64\]",
        ),
        (
            lambda sd: sd.__setitem__(
                f"{Q}.weight_nf4_meta", torch.tensor([0.0, 64, 256, 64, 32], dtype=torch.float64)
            ),
            ValueError,
            rf"NF4 weight of {Q} has shape \[64, 32\] but the model needs \[32, 64\]",
        ),
        (
            lambda sd: sd.__setitem__(f"{Q}.weight_absmax", sd[f"{Q}.weight_absmax"].float()),
            TypeError,
            rf"the NF4 weight of {Q}: absmax must be uint8 codes with double quantization",
        ),
        (
            lambda sd: sd.__setitem__(
                "model.layers.0.mlp.act.weight_packed", torch.zeros(8, dtype=torch.uint8)
            ),
            ValueError,
            r"NF4 weights for \['model\.layers\.0\.mlp\.act'\], which are not linear layers",
        ),
        (  # a layer in both forms, hoptune's and bitsandbytes'
            lambda sd: sd.update(to_bnb_state_dict(quantize_nf4(torch.randn(32, 64)), f"{Q}.weight")),
            ValueError,
            rf"NF4 weights for \['{Q}'\], .*\(or are stored twice, in bitsandbytes' form too\)",
        ),
        (  # bitsandbytes' form for a module that is no linear layer
            lambda sd: sd.update(
                to_bnb_state_dict(quantize_nf4(torch.randn(8, 64)), "model.layers.0.mlp.act.weight")
            ),
            ValueError,
            r"NF4 weights for \['model\.layers\.0\.mlp\.act'\], which are not linear layers of Qwen2ForCausalLM$",
        ),
    ],
)
def test_bad_own_form_entries_name_the_tensor(tmp_path, edit, err, match):
    folder = _edit(tmp_path, edit)
    with pytest.raises(err, match=match):
        hoptune.load_model(folder, device="cpu", progress=False)


@pytest.mark.gpu
def test_own_form_loads_onto_the_gpu_as_on_the_cpu(tmp_path):
    model = _nf4_model(tmp_path)
    model.save_pretrained(tmp_path / "saved", max_shard_size="40KB")  # parts across shards
    cpu = hoptune.load_model(tmp_path / "saved", device="cpu", progress=False)
    poison_cuda_cache()
    gpu = hoptune.load_model(tmp_path / "saved", device="cuda", progress=False)
    assert all(m.weight_packed.is_cuda for m in nf4_layers(gpu).values())
    with torch.no_grad():
        got = gpu(ids().cuda()).logits.float().cpu()
    _same_layers(gpu.cpu(), cpu)
    torch.testing.assert_close(got, logits(cpu), atol=2e-2, rtol=2e-2)  # CUDA kernels against the CPU's
