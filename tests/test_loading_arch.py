"""load_model across transformers architectures not covered in test_loading.py: tiny random models
(2 layers, hidden 64, vocab 128) saved sharded by save_pretrained load dense exactly as
from_pretrained loads them, and with quantize="nf4" make NF4 the layers transformers + bitsandbytes
make NF4, with the logits of the dense model whose weights are those NF4 weights dequantized."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import transformers

import hoptune
from hoptune.nn import LoRALinear
from hoptune.quant import dequantize_nf4
from tests.conftest import TINY_DECODER
from tests.test_loading import ids, nf4_layers

BASE = dict(TINY_DECODER, max_position_embeddings=64)
ZAMBA2 = dict(  # a hybrid (attention) block at layers 0 and 2, sharing its weights
    num_hidden_layers=3,
    layers_block_type=["hybrid", "mamba", "hybrid"],
    num_mem_blocks=1,
    mamba_d_state=8,
    n_mamba_heads=8,
    mamba_headdim=16,
    adapter_rank=8,
    chunk_size=8,
    use_mem_rope=True,
)
ARCHS = {
    "qwen3": ("Qwen3Config", dict(head_dim=16)),  # q/k norms
    "mistral": ("MistralConfig", dict(sliding_window=4)),  # a window shorter than the input (9)
    "olmo2": ("Olmo2Config", {}),
    "stablelm": ("StableLmConfig", {}),  # partial rotary, LayerNorm with bias
    "falcon": ("FalconConfig", dict(new_decoder_architecture=True, num_kv_heads=2)),  # FalconLinear
    "cohere": ("CohereConfig", {}),  # logit scale
    "granite": ("GraniteConfig", dict(embedding_multiplier=2.0, logits_scaling=4.0)),
    "zamba2": ("Zamba2Config", ZAMBA2),  # linear layers tied to other linear layers
}


def _save(folder, arch, dtype, tie, shard="40KB"):
    name, extra = ARCHS[arch]
    config = getattr(transformers, name)(**{**BASE, **extra, "tie_word_embeddings": tie})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    with torch.no_grad():  # norms and biases away from their init (ones, zeros) too
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(folder, max_shard_size=shard)
    assert os.path.isfile(folder / "generation_config.json")
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()


def _bnb_layers(folder, dtype):
    """The layers transformers + bitsandbytes make NF4 in this checkpoint."""
    bnb = pytest.importorskip("bitsandbytes")
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    qm = transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=cfg, device_map="cpu", dtype=dtype
    )
    return {n for n, m in qm.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def _logits(model):
    with torch.no_grad():
        return model(ids()).logits


@pytest.mark.parametrize(
    "arch, dtype, tie",
    [
        ("qwen3", torch.bfloat16, True),
        ("qwen3", torch.float32, False),
        ("mistral", torch.bfloat16, False),
        ("olmo2", torch.float32, True),
        ("stablelm", torch.bfloat16, False),
        ("cohere", torch.float32, True),
        ("granite", torch.bfloat16, False),
        ("zamba2", torch.float32, False),
    ],
)
def test_loads_as_from_pretrained_and_quantizes_as_bitsandbytes(tmp_path, arch, dtype, tie):
    ref = _save(tmp_path, arch, dtype, tie)
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    kw = dict(device="cpu", dtype=dtype, progress=False)
    dense = hoptune.load_model(tmp_path, quantize=None, **kw)
    want, got = ref.state_dict(), dense.state_dict()
    assert list(got) == list(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    buffers = dict(dense.named_buffers())
    assert list(buffers) == [k for k, _ in ref.named_buffers()]
    for k, b in ref.named_buffers():
        assert buffers[k].dtype == b.dtype and torch.equal(buffers[k], b), k
    assert (dense.lm_head.weight is dense.get_input_embeddings().weight) == tie
    assert dense.generation_config.to_dict() == ref.generation_config.to_dict()
    torch.testing.assert_close(_logits(dense), _logits(ref), atol=0, rtol=0)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about in these checkpoints
        quant = hoptune.load_model(tmp_path, quantize="nf4", **kw)
    layers = nf4_layers(quant)
    assert set(layers) == _bnb_layers(tmp_path, dtype)
    assert (quant.lm_head.weight is quant.get_input_embeddings().weight) == tie
    # exact reference: the dense model with each NF4 layer's weight replaced by the dequantized
    # NF4 weight, quantized here from the same stored weight
    for name, layer in layers.items():
        w = ref.get_submodule(name).weight.data
        q = hoptune.quantize_nf4(w.contiguous())
        assert torch.equal(layer.weight_packed, q.packed), name
        w.copy_(dequantize_nf4(q))
    torch.testing.assert_close(_logits(quant), _logits(ref), atol=0, rtol=0)


def test_linear_layers_tied_to_others_stay_dense_and_shared(tmp_path):
    """Zamba2 ties the weights of the block it uses at layers 0 and 2 (the files hold layer 0's):
    transformers + bitsandbytes keep such tied layers dense (get_keys_to_not_convert), so both
    copies stay one tensor."""
    ref = _save(tmp_path, "zamba2", torch.bfloat16, tie=True)
    quant = hoptune.load_model(tmp_path, quantize="nf4", device="cpu", progress=False)
    layers = nf4_layers(quant)
    assert set(layers) == _bnb_layers(tmp_path, torch.bfloat16)
    assert not any("shared_transformer" in n for n in layers)
    a, b = (quant.model.layers[i].shared_transformer.self_attn.q_proj for i in (0, 2))
    assert type(a) is torch.nn.Linear and a.weight is b.weight
    for name in layers:
        w = ref.get_submodule(name).weight.data
        w.copy_(dequantize_nf4(hoptune.quantize_nf4(w.contiguous())))
    torch.testing.assert_close(_logits(quant), _logits(ref), atol=0, rtol=0)


def test_model_whose_linear_layers_are_all_subclasses_says_none_became_nf4(tmp_path):
    """Falcon's layers are FalconLinear, an nn.Linear subclass that load_model leaves dense (as
    transformers 5 + bitsandbytes do): quantize="nf4" then quantizes nothing, which is said."""
    ref = _save(tmp_path, "falcon", torch.bfloat16, tie=True)
    with pytest.warns(UserWarning, match=r"no layer of FalconForCausalLM became NF4.*FalconLinear"):
        quant = hoptune.load_model(tmp_path, quantize="nf4", device="cpu", progress=False)
    assert not nf4_layers(quant)
    torch.testing.assert_close(_logits(quant), _logits(ref), atol=0, rtol=0)
    hoptune.apply_lora(quant, r=4, quantize="nf4")  # what the warning offers: it quantizes them
    lora = [m for m in quant.modules() if isinstance(m, LoRALinear)]
    assert len(lora) == 8 and all(m.quantized for m in lora)


def test_save_pretrained_nf4_keeps_tied_linear_layers_dense(tmp_path):
    """save_pretrained_nf4 of Zamba2 quantized the shared block's tied layers, a checkpoint that
    load_model could not read back (a tied copy's NF4 tensors missing); they are saved dense and
    listed in llm_int8_skip_modules, and the checkpoint loads as the model it came from."""
    import json

    from hoptune.quant import save_pretrained_nf4

    ref = _save(tmp_path / "src", "zamba2", torch.bfloat16, tie=True)
    quant = hoptune.load_model(tmp_path / "src", quantize="nf4", device="cpu", progress=False)
    save_pretrained_nf4(quant, tmp_path / "out")
    skips = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert any("shared_transformer" in s for s in skips["llm_int8_skip_modules"])
    back = hoptune.load_model(tmp_path / "out", device="cpu", progress=False)
    assert set(nf4_layers(back)) == set(nf4_layers(quant))
    torch.testing.assert_close(_logits(back), _logits(quant), atol=0, rtol=0)
    del ref


@pytest.mark.parametrize("how", ["load_model", "apply_lora"])
def test_a_mixer_that_reads_dt_proj_runs_with_nf4_as_under_bitsandbytes(tmp_path, how):
    """FalconMamba's mixer reads dt_proj.weight directly unless config._is_quantized is set (as
    transformers' quantizers set it; then it calls the layer): an NF4 dt_proj has no .weight, so the
    forward failed after load_model(quantize="nf4") or apply_lora(quantize="nf4"). The flag is set
    where NF4 layers are made; the logits are those of the model holding the dequantized weights,
    and the saved config does not hold the flag."""
    cfg = transformers.AutoConfig.for_model(
        "falcon_mamba", hidden_size=64, num_hidden_layers=2, vocab_size=128, time_step_rank=64, state_size=16
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "dense")
    if how == "load_model":
        model = hoptune.load_model(tmp_path / "dense", device="cpu", dtype=torch.float32, progress=False)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
        hoptune.apply_lora(model, r=4, quantize="nf4", init_lora_weights=False)
        for _, lora in model.named_modules():
            if isinstance(lora, LoRALinear):
                torch.nn.init.zeros_(lora.lora_B)  # (the base alone, for the comparison)
    mixer = model.backbone.layers[0].mixer
    assert getattr(mixer.dt_proj, "quantized", False) and model.config._is_quantized is True
    dense = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    for name, mod in model.named_modules():
        if getattr(mod, "quantized", False) and not isinstance(mod, LoRALinear):
            w = mod.dequantize(torch.float32)
            dense.get_submodule(name.removesuffix(".base_layer")).weight.data.copy_(w)
        elif isinstance(mod, LoRALinear):
            dense.get_submodule(name).weight.data.copy_(dequantize_nf4(mod.weight_nf4, torch.float32))
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, dense(x).logits, rtol=1e-5, atol=1e-5)
    model.config.save_pretrained(tmp_path / "saved")
    assert "_is_quantized" not in (tmp_path / "saved" / "config.json").read_text()
