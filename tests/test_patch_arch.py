"""apply_lora across transformers architectures beyond the decoder families of test_patch: GPT-2
(Conv1D), GPT-NeoX (head named embed_out), T5 (encoder-decoder, _keep_in_fp32_modules), Llava
(vision-language), tied embeddings. Target selection is compared with PEFT's on the same model."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers
from torch import nn

import hoptune
from hoptune.nn import LoRALinear
from tests.test_patch import ids, tiny_model
from tests.test_patch_unload import tiny_llava


def _gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    cfg.bos_token_id = cfg.eos_token_id = 2
    return transformers.GPT2LMHeadModel(cfg)


def _neox() -> nn.Module:
    cfg = transformers.GPTNeoXConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=128,
        max_position_embeddings=64,
    )
    return transformers.GPTNeoXForCausalLM(cfg)


def _t5() -> nn.Module:
    dims = dict(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4)
    cfg = transformers.T5Config(vocab_size=128, decoder_start_token_id=0, **dims)
    return transformers.T5ForConditionalGeneration(cfg)


MODELS = {
    "gpt2": _gpt2,
    "neox": _neox,
    "t5": _t5,
    "llava": lambda: tiny_llava(tie=False),
    "llama_tied": lambda: tiny_model("llama", tie_word_embeddings=True),
}


def model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[arch]().eval()


def peft_targets(m: nn.Module, **kw) -> list[str]:
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(copy.deepcopy(m), peft.LoraConfig(r=2, **kw))
    return sorted(
        n.removeprefix("base_model.model.")
        for n, mod in wrapped.named_modules()
        if isinstance(mod, peft.tuners.lora.LoraLayer)
    )


def our_targets(m: nn.Module, **kw) -> list[str]:
    m = copy.deepcopy(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hoptune.apply_lora(m, r=2, **kw)
    return sorted(n for n, mod in m.named_modules() if isinstance(mod, LoRALinear))


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize(
    "kw",
    [
        dict(target_modules="all-linear"),
        dict(target_modules="all-linear", exclude_modules=r".*\.(mlp|DenseReluDense)\..*"),
        dict(target_modules=["lm_head", "q_proj", "c_attn", "q", "query_key_value", "fc1"]),
        dict(target_modules=r".*\.1\..*"),
    ],
    ids=["all-linear", "exclude-regex", "list", "regex"],
)
def test_selection_equals_peft(arch, kw):
    m = model(arch)
    try:
        want = peft_targets(m, **kw)
    except ValueError:  # (PEFT refuses a regex matching a non-linear module: so must we)
        with pytest.raises(ValueError):
            our_targets(m, **kw)
        return
    assert want and our_targets(m, **kw) == want


def test_nf4_keeps_the_modules_kept_in_fp32_dense():
    """T5's feed-forward reads ``wo.weight`` (its _keep_in_fp32_modules, which transformers +
    bitsandbytes and load_model keep dense): quantized, the model's forward failed after apply_lora
    had succeeded. Those layers get an adapter over their dense base; the others are NF4."""
    m = model("t5")
    ref = copy.deepcopy(m)
    ref_weights = {n: mod.weight for n, mod in m.named_modules() if n.endswith(".wo")}
    wo = [n for n, _ in m.named_modules() if n.endswith(".wo")]
    assert len(wo) == 4
    hoptune.apply_lora(m, r=4, quantize="nf4")
    for name, lora in m.named_modules():
        if isinstance(lora, LoRALinear):
            assert lora.quantized is not name.endswith(".wo"), name
            with torch.no_grad():  # the reference: each base as apply_lora holds it
                ref.get_submodule(name).weight.copy_(lora.base_weight(torch.float32))
    x = ids()
    with torch.no_grad():
        got = m(input_ids=x, decoder_input_ids=x).logits
        want = ref(input_ids=x, decoder_input_ids=x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    hoptune.remove_lora(m)
    for n in wo:  # (given back as it was: not a dequantized copy)
        assert m.get_submodule(n).weight is ref_weights[n]


def test_a_string_target_naming_a_layer_says_it_is_a_whole_name_regex():
    """A string is a regular expression over the whole name (PEFT's rule), so "q_proj" matches no
    layer: the error listed 'q_proj' among the layer names without saying why it did not match."""
    m = tiny_model("llama")
    with pytest.raises(ValueError, match=r"regular expression .*whole name.*\['q_proj'\]"):
        hoptune.apply_lora(m, r=2, target_modules="q_proj")
    assert not any(isinstance(mod, LoRALinear) for mod in m.modules())
    with pytest.raises(ValueError) as e:  # (a list that matches nothing: no such hint)
        hoptune.apply_lora(m, r=2, target_modules=["qproj"])
    assert "regular expression" not in str(e.value)


def test_load_adapter_with_nf4_keeps_the_modules_kept_in_fp32_dense(tmp_path):
    """load_adapter(quantize="nf4") checked each layer's NF4 block size even for the layers kept
    dense (T5's wo): a wo whose weight count is no multiple of the block size was refused, though
    apply_lora adapts it over its dense base."""
    from hoptune.adapters import load_adapter, save_adapter

    def t5():
        torch.manual_seed(0)
        dims = dict(d_model=40, d_ff=129, d_kv=10, num_layers=1, num_heads=4)  # wo: 40 x 129
        cfg = transformers.T5Config(vocab_size=128, decoder_start_token_id=0, **dims)
        return transformers.T5ForConditionalGeneration(cfg).eval()

    m = hoptune.apply_lora(t5(), r=4, target_modules=["wo"], quantize="nf4", init_lora_weights=False)
    save_adapter(m, tmp_path / "a")
    again = load_adapter(t5(), tmp_path / "a", quantize="nf4")
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        want = m(input_ids=ids, decoder_input_ids=ids).logits
        torch.testing.assert_close(again(input_ids=ids, decoder_input_ids=ids).logits, want)
