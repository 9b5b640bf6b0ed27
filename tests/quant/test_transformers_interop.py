"""NF4 checkpoints cross between hoptune and transformers + bitsandbytes in both directions."""

from __future__ import annotations

import bitsandbytes  # noqa: F401
import pytest
import torch
from safetensors.torch import load_file

from hoptune.quant import dequantize_nf4, from_bnb_state_dict, save_pretrained_nf4


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=128,
        intermediate_size=320,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=384,
        max_position_embeddings=128,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def _device():
    from hoptune import _lib

    return "cuda" if _lib.kernels_available() else "cpu"


def _check_our_checkpoint_loads_in_transformers(tmp_path, device):
    from transformers import AutoModelForCausalLM

    model = _tiny_llama()
    names = save_pretrained_nf4(model, tmp_path, device=device)
    assert len(names) == 2 * 7 and "lm_head" not in names
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map=device).eval()
    assert type(loaded.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    for m in loaded.modules():
        if type(m).__name__ == "Linear4bit":
            # on CPUs with AVX512-BF16, bitsandbytes' inference path repacks the weight with its
            # absmax rounded to bf16: not the stored format under test here
            m.support_avx512bf16_for_cpu = False
    # reference: the same model with our dequantized weights in plain nn.Linear layers
    sd = load_file(tmp_path / "model.safetensors")
    for name in names:
        mod = model.get_submodule(name)
        mod.weight.data.copy_(dequantize_nf4(from_bnb_state_dict(sd, f"{name}.weight")))
    model.to(device)
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        ours, theirs = model(ids).logits.float(), loaded(ids).logits.float()
    print("max |logit diff|", (theirs - ours).abs().max().item())
    torch.testing.assert_close(theirs, ours, atol=2e-2, rtol=2e-2)
    # the weights themselves: bitsandbytes' dequantize of what it loaded == ours, bit for bit
    import bitsandbytes.functional as F

    for name in names:
        lin = loaded.get_submodule(name)
        theirs_w = F.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
        ours_w = model.get_submodule(name).weight.data
        assert torch.equal(theirs_w.view(torch.int16), ours_w.view(torch.int16)), name


def _check_bnb_checkpoint_loads_in_hoptune(tmp_path, device):
    import bitsandbytes.functional as F
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    _tiny_llama().save_pretrained(tmp_path / "bf16")
    cfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    qm = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", quantization_config=cfg, device_map=device)
    qm.save_pretrained(tmp_path / "nf4")
    sd = load_file(tmp_path / "nf4" / "model.safetensors")
    n = 0
    for name, mod in qm.named_modules():
        if type(mod).__name__ == "Linear4bit":
            q = from_bnb_state_dict(sd, f"{name}.weight")
            assert q.nested and q.shape == mod.weight.quant_state.shape
            theirs = F.dequantize_4bit(mod.weight.data, mod.weight.quant_state)
            ours = dequantize_nf4(q.to(device))
            assert torch.equal(theirs.view(torch.int16), ours.view(torch.int16)), name
            n += 1
    assert n == 14


def test_nf4_model_from_load_model_saves_for_transformers(tmp_path):
    """A model hoptune.load_model quantized is saved as it is (no re-quantization) and loads in
    transformers + bitsandbytes with the same outputs."""
    from transformers import AutoModelForCausalLM

    import hoptune

    _tiny_llama().save_pretrained(tmp_path / "bf16")
    model = hoptune.load_model(tmp_path / "bf16", device="cpu", dtype=torch.float32, progress=False)
    assert len(save_pretrained_nf4(model, tmp_path / "nf4")) == 14
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "nf4", device_map="cpu").eval()
    assert type(loaded.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    for m in loaded.modules():
        if type(m).__name__ == "Linear4bit":
            # on CPUs with AVX512-BF16, bitsandbytes' inference path repacks the weight with its
            # absmax rounded to bf16 and computes in bf16: not the stored format under test here
            m.support_avx512bf16_for_cpu = False
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids).logits, loaded(ids).logits.float()
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def test_our_checkpoint_loads_in_transformers(tmp_path):
    _check_our_checkpoint_loads_in_transformers(tmp_path, "cpu")


def test_bnb_checkpoint_loads_in_hoptune(tmp_path):
    _check_bnb_checkpoint_loads_in_hoptune(tmp_path, "cpu")


@pytest.mark.gpu
def test_our_checkpoint_loads_in_transformers_gpu(tmp_path):
    _check_our_checkpoint_loads_in_transformers(tmp_path, "cuda")


@pytest.mark.gpu
def test_bnb_checkpoint_loads_in_hoptune_gpu(tmp_path):
    _check_bnb_checkpoint_loads_in_hoptune(tmp_path, "cuda")
