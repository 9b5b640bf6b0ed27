"""apply_lora / remove_lora / merge_and_unload on tiny random transformers models of every family
we cover (Llama, Mistral, Qwen2, Qwen3, Gemma2, Gemma3 text, Phi-3)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers
from torch import nn

import hoptune
from hoptune.nn import LoRALinear, NF4Linear
from tests.conftest import TINY_DECODER, rel_err

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]
LLAMA_TARGETS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **over) -> nn.Module:
    """A 2-layer causal LM of family ``arch`` with random weights (hidden 64, vocab 128)."""
    tf = transformers
    common = dict(TINY_DECODER, max_position_embeddings=64)
    families = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {}),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),  # q/k/v with bias, tied embeddings
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": 16}),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {"head_dim": 16}),
        "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, {"head_dim": 16}),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {}),  # fused qkv_proj and gate_up_proj
    }
    cfg_cls, model_cls, extra = families[arch]
    torch.manual_seed(seed)
    return model_cls(cfg_cls(**{**common, **extra, **over})).to(dtype).eval()


def ids(batch: int = 2, seq: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits.float()


def snapshot(model: nn.Module) -> dict:
    """What 'unchanged' means: module types, tensors and requires_grad."""
    return {
        "types": [(n, type(m).__name__) for n, m in model.named_modules()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def assert_same(model: nn.Module, snap: dict) -> None:
    now = snapshot(model)
    assert now["types"] == snap["types"]
    assert now["grad"] == snap["grad"]
    assert now["state"].keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        torch.testing.assert_close(now["state"][k], v, atol=0, rtol=0, equal_nan=True, msg=k)


def lora_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def test_all_linear_is_read_in_any_case_as_peft_reads_it():
    # PEFT compares target_modules.lower() with "all-linear": any spelling, the output head left out
    a, b = tiny_model(), tiny_model()
    hoptune.apply_lora(a, r=4, target_modules="all-linear")
    hoptune.apply_lora(b, r=4, target_modules="All-Linear")
    assert lora_names(b) == lora_names(a) and "lm_head" not in lora_names(b)


def test_a_model_bitsandbytes_quantized_is_refused_with_the_loader_that_reads_it(tmp_path):
    from tests.test_loading import _bnb_checkpoint
    from tests.test_loading import tiny_model as dense_model

    dense_model().save_pretrained(tmp_path / "dense")
    model = _bnb_checkpoint(tmp_path / "dense", tmp_path / "bnb")
    with pytest.raises(
        TypeError,
        match=r"model\.layers\.0\.self_attn\.q_proj is a bitsandbytes Linear4bit; .*hoptune\.load_model\(path, "
        r"quantize='nf4'\)",
    ):
        hoptune.apply_lora(model, r=4)
    assert not lora_names(model)


# -- every family -----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_apply_all_linear_every_family(arch):
    model = tiny_model(arch)
    x = ids()
    before = logits(model, x)
    out = hoptune.apply_lora(model, r=4, alpha=8)
    assert out is model
    names = lora_names(model)
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    want = ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"] if arch == "phi3" else LLAMA_TARGETS
    assert suffixes == want
    assert len(names) == 2 * len(want)
    assert not isinstance(model.lm_head, LoRALinear)  # the output head is not "all-linear"
    # B starts at zero: the model computes what it did before
    torch.testing.assert_close(logits(model, x), before, atol=1e-6, rtol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert len(trainable) == 2 * len(names)


@pytest.mark.parametrize("arch", ARCHS)
def test_train_step_and_remove_every_family(arch):
    model = tiny_model(arch)
    x = ids()
    before = logits(model, x)
    grads_before = {n: p.requires_grad for n, p in model.named_parameters()}
    hoptune.apply_lora(model, r=4, alpha=8, quantize="nf4" if arch in ("llama", "phi3") else None)
    model.train()
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, n
        else:
            assert p.grad is None, n
    assert any(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_B"))
    model.eval()
    hoptune.remove_lora(model)
    assert not lora_names(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads_before
    if arch not in ("llama", "phi3"):  # a dense base comes back exactly
        torch.testing.assert_close(logits(model, x), before, atol=0, rtol=0)
    else:  # a base quantized by apply_lora comes back dequantized
        assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("proj"))


# -- selection and patterns -------------------------------------------------------------------
def test_target_list_regex_exclude_and_lm_head():
    m = hoptune.apply_lora(tiny_model(), r=2, target_modules=["q_proj", "v_proj"])
    assert sorted({n.rsplit(".", 1)[-1] for n in lora_names(m)}) == ["q_proj", "v_proj"]
    m = hoptune.apply_lora(tiny_model(), r=2, target_modules=r".*\.1\.mlp\.(up|down)_proj")
    assert lora_names(m) == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    m = hoptune.apply_lora(tiny_model(), r=2, exclude_modules=["mlp.down_proj", "o_proj"])
    assert len(lora_names(m)) == 2 * 5
    m = hoptune.apply_lora(tiny_model(), r=2, target_modules=["q_proj", "lm_head"])
    assert isinstance(m.lm_head, LoRALinear)


def test_rank_and_alpha_patterns():
    m = hoptune.apply_lora(
        tiny_model(),
        r=4,
        alpha=8,
        rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 8},
        alpha_pattern={"v_proj": 3},
        use_rslora=True,
    )
    layers = m.model.layers
    assert layers[0].self_attn.q_proj.r == 2 and layers[1].self_attn.q_proj.r == 2
    assert layers[0].mlp.down_proj.r == 4 and layers[1].mlp.down_proj.r == 8
    assert layers[0].self_attn.v_proj.lora_alpha == 3
    assert layers[0].self_attn.v_proj.scaling == pytest.approx(3 / 2)  # rsLoRA: alpha / sqrt(r)
    assert layers[0].self_attn.k_proj.scaling == pytest.approx(8 / 2)


# -- bad input: clear errors, model unchanged --------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(target_modules=["nope_proj"]), "matches no linear layer.*q_proj"),
        (dict(target_modules="model\\.layers\\.9\\..*"), "matches no linear layer"),
        (dict(target_modules=["mlp"]), "not linear layers"),
        (dict(target_modules=["embed_tokens"]), "not linear layers"),
        (dict(r=65), "r=65 is larger than layer"),
        (dict(rank_pattern={"k_proj": 40}), r"r=40 is larger than layer model\.layers\.0\.self_attn\.k_proj"),
        (dict(r=0), "r must be a positive int"),
        (dict(alpha=float("nan")), "alpha must be a finite number, got nan"),
        (dict(alpha="32"), "alpha must be a finite number, got '32'"),
        (dict(quantize="int8"), "quantize must be None or 'nf4'"),
        (dict(dropout=1.0), "dropout must be a number in"),
        (dict(target_modules=[]), "target_modules must be"),
        (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\] must be a positive int"),
        (dict(rank_pattern={"q_proj": True}), r"rank_pattern\['q_proj'\] must be a positive int, got True"),
        (
            dict(alpha_pattern={"q_proj": float("inf")}),
            r"alpha_pattern\['q_proj'\] must be a finite number, got inf",
        ),
        (
            dict(alpha_pattern={"q_proj": True}),
            r"alpha_pattern\['q_proj'\] must be a finite number, got True",
        ),
        (dict(rank_pattern={"": 2}), r"rank_pattern keys must be non-empty strings"),
        (dict(target_modules="(unclosed"), "not a valid regular expression"),
    ],
)
def test_bad_input_leaves_model_unchanged(kwargs, match):
    model = tiny_model()
    snap = snapshot(model)
    with pytest.raises((ValueError, TypeError), match=match):
        hoptune.apply_lora(model, **kwargs)
    assert_same(model, snap)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v biases, kept by the LoRA layers
def test_failure_half_way_rolls_back(arch):
    model = tiny_model(arch)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")  # NF4 cannot hold it
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"layer model\.layers\.1\.mlp\.down_proj: .*inf or NaN"):
        hoptune.apply_lora(model, r=2, quantize="nf4")
    assert_same(model, snap)


def test_a_layer_nf4_cannot_hold_is_named():
    """A weight quantize='nf4' cannot take (here float64) is an error that names the layer, out of
    the model's many."""
    model = tiny_model(dtype=torch.float64)
    with pytest.raises(TypeError, match=r"layer model\.layers\.0\.self_attn\.q_proj: .*float64"):
        hoptune.apply_lora(model, r=2, quantize="nf4")
    assert lora_names(model) == []


def test_interrupted_apply_rolls_back_requires_grad(monkeypatch):
    """A dense base is the layer's own Parameter, frozen when wrapped: an apply that stops half way
    (here a Ctrl-C) gives the layers back with the requires_grad they had."""
    model = tiny_model()
    snap = snapshot(model)
    real_init, calls = LoRALinear.__init__, []

    def init(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(LoRALinear, "__init__", init)
    with pytest.raises(KeyboardInterrupt):
        hoptune.apply_lora(model, r=2)
    assert_same(model, snap)


def test_twice_is_an_error_and_other_models_untouched():
    model = tiny_model()
    other = copy.deepcopy(model)
    snap_other = snapshot(other)
    hoptune.apply_lora(model, r=2)
    with pytest.raises(ValueError, match="already has LoRA layers"):
        hoptune.apply_lora(model, r=2)
    assert_same(other, snap_other)
    with pytest.raises(ValueError, match="no LoRA layers"):
        hoptune.remove_lora(other)


# -- NF4 --------------------------------------------------------------------------------------
def test_quantize_nf4_matches_dequantized_reference():
    model = tiny_model()
    ref = copy.deepcopy(model)
    hoptune.apply_lora(model, r=4, quantize="nf4", init_lora_weights=False)
    for name in lora_names(model):
        lora = model.get_submodule(name)
        assert lora.quantized
        ref_lin = ref.get_submodule(name)
        with torch.no_grad():
            ref_lin.weight.copy_(lora.merged_weight(torch.float32))
    x = ids()
    torch.testing.assert_close(logits(model, x), logits(ref, x), atol=2e-5, rtol=2e-5)


def test_nf4_layers_are_wrapped_without_requantizing():
    model = tiny_model()
    for name in [n for n, m in model.named_modules() if n.endswith("_proj")]:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, NF4Linear.from_linear(model.get_submodule(name)))
    packed = {n: m.weight_packed for n, m in model.named_modules() if isinstance(m, NF4Linear)}
    x = ids()
    before = logits(model, x)
    hoptune.apply_lora(model, r=4)  # no quantize: NF4 layers stay NF4
    for n, buf in packed.items():
        assert model.get_submodule(n).weight_packed is buf  # the same storage, not a copy
    torch.testing.assert_close(logits(model, x), before, atol=1e-6, rtol=0)
    hoptune.remove_lora(model)
    assert all(model.get_submodule(n).weight_packed is buf for n, buf in packed.items())
    assert isinstance(model.model.layers[0].mlp.up_proj, NF4Linear)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(blocksize=128), r"blocksize=128 is not used .*mlp\.up_proj, NF4 with blocksize=64"),
        (
            dict(double_quant=False),
            r"double_quant=False is not used .*mlp\.up_proj, NF4 with double_quant=True",
        ),
    ],
)
def test_nf4_options_an_nf4_layer_does_not_have_are_warned_about(kwargs, match):
    """NF4 layers are wrapped as they are: a blocksize or double_quant asked for that they do not
    have used to be dropped without a word; the defaults (None) take the layers' own quietly."""
    model = tiny_model()
    mlp = model.model.layers[0].mlp
    mlp.up_proj = NF4Linear.from_linear(mlp.up_proj)  # blocksize 64, double_quant
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hoptune.apply_lora(copy.deepcopy(model), r=4, quantize="nf4")
        hoptune.apply_lora(copy.deepcopy(model), r=4, quantize="nf4", blocksize=64, double_quant=True)
    with pytest.warns(UserWarning, match=match):
        hoptune.apply_lora(model, r=4, quantize="nf4", **kwargs)
    assert model.model.layers[0].mlp.up_proj.weight_nf4.blocksize == 64  # kept as it was
    # the dense layers it quantized took the options
    q = model.model.layers[0].mlp.down_proj.weight_nf4
    assert (q.blocksize, q.nested) == (kwargs.get("blocksize", 64), kwargs.get("double_quant", True))


def test_layer_reads_replaced_buffers_and_parametrized_factors():
    """The forward takes the NF4 buffers and LoRA factors from the module's dicts (fast), and still
    follows a buffer assigned anew and a factor under a parametrization (no longer in the dict)."""
    from torch.nn.utils import parametrize

    from hoptune.nn.nf4_linear import register_nf4
    from hoptune.quant import dequantize_nf4, quantize_nf4

    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(128, 48, bias=False), r=4, quantize="nf4", init_lora_weights=False)
    x = torch.randn(5, 128)

    def expected(a):
        w = dequantize_nf4(layer.weight_nf4, torch.float32)
        return x @ w.t() + layer.scaling * (x @ a.t()) @ layer.lora_B.t()

    register_nf4(layer, quantize_nf4(torch.randn(48, 128)))  # new buffers, other values
    torch.testing.assert_close(layer(x), expected(layer.lora_A), rtol=1e-5, atol=1e-5)

    class Doubled(nn.Module):
        def forward(self, a):
            return 2 * a

    a0 = layer.lora_A.detach().clone()
    parametrize.register_parametrization(layer, "lora_A", Doubled())
    assert "lora_A" not in layer._parameters
    torch.testing.assert_close(layer(x), expected(2 * a0), rtol=1e-5, atol=1e-5)


def test_model_to_dtype_keeps_nf4_statistics():
    model = hoptune.apply_lora(tiny_model(), r=2, quantize="nf4")
    lora = model.model.layers[0].self_attn.q_proj
    absmax2 = lora.weight_absmax2.clone()
    model.to(torch.bfloat16)
    assert lora.weight_absmax2.dtype == torch.float32 and torch.equal(lora.weight_absmax2, absmax2)
    assert lora.weight_packed.dtype == torch.uint8
    assert lora.lora_A.dtype == torch.bfloat16
    model(ids())  # still runs


@pytest.mark.parametrize("unload", ["remove_lora", "merge_and_unload"])
def test_nf4_base_follows_a_cast_of_the_model(unload):
    """After model.bfloat16() the NF4 bases dequantize to bf16 (their statistics stay fp32): the
    layers remove_lora / merge_and_unload(dtype=None) give back are bf16 like the rest of the model."""
    model = hoptune.apply_lora(tiny_model(), r=2, quantize="nf4")
    model.bfloat16()
    lora = model.model.layers[0].self_attn.q_proj
    assert lora.base_dtype == torch.bfloat16 and lora.weight_absmax2.dtype == torch.float32
    if unload == "remove_lora":
        hoptune.remove_lora(model)
    else:
        hoptune.merge_and_unload(model, dtype=None)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(ids()).logits.dtype == torch.bfloat16
    nf4 = NF4Linear.from_linear(nn.Linear(128, 64)).half()
    assert nf4.dequantize().dtype == torch.float16 and nf4.to_linear().weight.dtype == torch.float16
    assert nf4.double().base_dtype == torch.float16  # (NF4 does not dequantize to float64)


# -- merge ------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_merge_and_unload_equals_peft(variant, tmp_path):
    import peft

    base = tiny_model()
    kw = {"use_rslora": variant == "rslora", "use_dora": variant == "dora"}
    pm = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **kw),
    )
    pm.save_pretrained(tmp_path)
    ours = hoptune.load_adapter(copy.deepcopy(base), tmp_path)
    merged = hoptune.merge_and_unload(ours, dtype=torch.float32)
    theirs = pm.merge_and_unload()
    assert not any(isinstance(m, (LoRALinear, NF4Linear)) for m in merged.modules())
    sd_ours, sd_theirs = merged.state_dict(), theirs.state_dict()
    assert sd_ours.keys() == sd_theirs.keys()
    for k, v in sd_theirs.items():
        err = (sd_ours[k] - v).abs().max() / v.abs().max().clamp_min(1e-30)
        assert err <= 1e-6, (k, float(err))


def test_merge_and_unload_saves_a_plain_checkpoint(tmp_path):
    model = hoptune.apply_lora(tiny_model(), r=4, quantize="nf4", init_lora_weights=False)
    x = ids()
    want = logits(model, x)
    merged = hoptune.merge_and_unload(model)  # bf16 by default
    assert merged.config.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in merged.parameters())
    assert all(p.requires_grad for p in merged.parameters())  # as before apply_lora
    merged.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(back, x), want, atol=0.05, rtol=0.05)


# -- transformers features ---------------------------------------------------------------------
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_generate(quantize):
    model = tiny_model()
    prompt = ids(2, 5)
    want = model.generate(prompt, max_new_tokens=6, do_sample=False)
    hoptune.apply_lora(model, r=4, quantize=quantize)
    got = model.generate(prompt, max_new_tokens=6, do_sample=False)
    if quantize is None:  # B = 0 and a dense base: the same tokens
        assert torch.equal(got, want)
    assert got.shape == want.shape


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    x = ids()
    grads = []
    for ckpt in (False, True):
        model = hoptune.apply_lora(tiny_model(), r=4, quantize="nf4", init_lora_weights=False)
        model.train()
        if ckpt:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # renamed in transformers 5
                model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": use_reentrant}
                )
        model(input_ids=x, labels=x).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_torch_compile_forward(quantize):
    model = hoptune.apply_lora(tiny_model(), r=4, quantize=quantize, init_lora_weights=False)
    x = ids()
    want = logits(model, x)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    torch.testing.assert_close(logits(compiled, x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_torch_compile_inductor_decoder_layer():
    """Inductor (CPU C++ codegen) over one patched NF4 decoder layer, forward and backward."""
    model = hoptune.apply_lora(tiny_model(), r=4, quantize="nf4", init_lora_weights=False)
    layer = model.model.layers[0]
    h = torch.randn(2, 7, 64, requires_grad=True)
    pos = torch.arange(7)[None].expand(2, 7)
    emb = model.model.rotary_emb(h, pos)
    want = layer(h, position_embeddings=emb)
    want = want[0] if isinstance(want, tuple) else want
    want.sum().backward()
    eager = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    eager["h"] = h.grad.clone()
    layer.zero_grad(set_to_none=True)
    h.grad = None
    torch._dynamo.reset()
    compiled = torch.compile(layer)
    got = compiled(h, position_embeddings=emb)
    got = got[0] if isinstance(got, tuple) else got
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got.sum().backward()
    grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
    grads["h"] = h.grad
    assert "self_attn.q_proj.lora_A" in grads and grads.keys() == eager.keys()
    for n, g in eager.items():  # (the gradients of a sum reach 1e3: fp32 round-off relative to that)
        assert rel_err(grads[n], g) <= 1e-5, n


def test_empty_exclude_modules_excludes_nothing():
    """As in PEFT, an empty exclude_modules (PEFT writes [] to adapter_config.json) excludes nothing."""
    want = lora_names(hoptune.apply_lora(tiny_model(), r=2))
    for empty in ([], (), set()):
        assert lora_names(hoptune.apply_lora(tiny_model(), r=2, exclude_modules=empty)) == want


def test_bad_exclude_modules_message_is_about_exclusion():
    with pytest.raises(TypeError, match="exclude_modules must be a regular expression or a list") as e:
        hoptune.apply_lora(tiny_model(), r=2, exclude_modules=[3])
    assert "all-linear" not in str(e.value)


def test_merge_of_a_tied_lm_head_unties_it_in_the_config(tmp_path):
    """The merged head is no longer the embedding matrix: a config still saying tied would let
    tie_weights() (resize_token_embeddings, loading) put the embeddings back in its place."""
    base = tiny_model("qwen2", tie_word_embeddings=True)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    x = ids()
    model = hoptune.apply_lora(
        copy.deepcopy(base), r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False
    )
    want = logits(model, x)
    merged = hoptune.merge_and_unload(model, dtype=torch.float32)
    assert merged.config.tie_word_embeddings is False
    torch.testing.assert_close(
        merged.model.embed_tokens.weight, base.model.embed_tokens.weight, atol=0, rtol=0
    )
    merged.tie_weights()
    torch.testing.assert_close(logits(merged, x), want, atol=1e-5, rtol=1e-5)
    merged.save_pretrained(tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(back, x), want, atol=1e-5, rtol=1e-5)
    # a head without an adapter stays tied
    kept = hoptune.merge_and_unload(hoptune.apply_lora(copy.deepcopy(base), r=4), dtype=torch.float32)
    assert kept.config.tie_word_embeddings is True and kept.lm_head.weight is kept.model.embed_tokens.weight


@pytest.mark.parametrize("quantize", [None, "nf4"])
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen_embeddings", "trainable_embeddings"])
def test_merge_of_a_tied_head_keeps_its_trainability(frozen, quantize):
    """The merged head gets its own weight in place of the embedding matrix it shared; it takes
    that matrix's requires_grad from before apply_lora (as the embeddings get it back), not that of
    a fresh nn.Linear: frozen embeddings must not leave a trainable head."""
    model = tiny_model("llama", tie_word_embeddings=True)
    model.model.embed_tokens.weight.requires_grad_(not frozen)
    hoptune.apply_lora(
        model, r=4, target_modules=["q_proj", "lm_head"], quantize=quantize, init_lora_weights=False
    )
    merged = hoptune.merge_and_unload(model, dtype=torch.float32)
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight
    assert merged.model.embed_tokens.weight.requires_grad is not frozen
    assert merged.lm_head.weight.requires_grad is not frozen
    assert merged.model.layers[0].self_attn.q_proj.weight.requires_grad  # as before apply_lora


@pytest.mark.parametrize("fn", [hoptune.apply_lora, hoptune.remove_lora, hoptune.merge_and_unload])
def test_model_that_is_not_a_module_is_named(fn):
    """A path or a config where the model goes: an error naming model, not an AttributeError from
    inside (e.g. 'str' object has no attribute 'named_modules')."""
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        fn("out/merged")


def test_merge_of_an_nf4_base_gives_a_frozen_layer():
    """A layer that was an NF4Linear (as load_model makes them; its bias frozen) merges into a dense
    layer frozen as a whole, as NF4Linear.to_linear gives one without an adapter: its weight came
    back trainable beside a frozen bias."""
    model = tiny_model("qwen2")  # (q / k / v projections with a bias)
    attn = model.model.layers[0].self_attn
    attn.q_proj = NF4Linear.from_linear(attn.q_proj)
    attn.o_proj = NF4Linear.from_linear(attn.o_proj)
    hoptune.apply_lora(model, r=4, target_modules=["q_proj", "v_proj"])
    merged = hoptune.merge_and_unload(model, dtype=torch.float32)
    attn = merged.model.layers[0].self_attn
    for layer in (attn.q_proj, attn.o_proj):  # with an adapter, and without one
        assert type(layer) is nn.Linear
        assert not any(p.requires_grad for p in layer.parameters())
    assert attn.v_proj.weight.requires_grad and attn.v_proj.bias.requires_grad  # a dense base: as before


@pytest.mark.parametrize("arg", ["rank_pattern", "alpha_pattern"])
def test_pattern_key_that_matches_no_target_is_named(arg):
    """A rank_pattern / alpha_pattern key that matches no adapted layer (a typo, or a layer that
    target_modules leaves out) was ignored without a word; PEFT warns, naming the keys."""
    pattern = {"q_proj": 2, "qproj": 3, "up_proj": 5}  # (up_proj is not targeted)
    with pytest.warns(RuntimeWarning, match=rf"{arg} keys .*\['qproj', 'up_proj'\].*ignored"):
        m = hoptune.apply_lora(tiny_model(), r=4, target_modules=["q_proj", "v_proj"], **{arg: pattern})
    q = m.model.layers[0].self_attn.q_proj
    assert (q.r if arg == "rank_pattern" else q.lora_alpha) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key used: no warning
        hoptune.apply_lora(tiny_model(), r=4, **{arg: {"q_proj": 2, r"layers\.1\..*": 3}})


@pytest.mark.parametrize("exclude", [["o_prj"], r".*\.9\..*"])
def test_exclude_modules_that_excludes_nothing_is_named(exclude):
    """An exclude_modules that matches no module (a typo) left every layer adapted without a word;
    PEFT warns. An empty one (PEFT's default, []) says nothing."""
    with pytest.warns(UserWarning, match=r"exclude_modules=.* matches no module of LlamaForCausalLM"):
        m = hoptune.apply_lora(tiny_model(), r=2, exclude_modules=exclude)
    assert len(lora_names(m)) == 2 * 7
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hoptune.apply_lora(tiny_model(), r=2, exclude_modules=[])
        hoptune.apply_lora(tiny_model(), r=2, exclude_modules=["o_proj"])


def test_parametrized_layer_is_refused_up_front():
    """A layer whose weight (or bias) is under a torch parametrization is not a plain weight a LoRA
    layer can freeze and keep: refused by name, before any layer changes (it failed half way, in
    requires_grad_, with torch's message about leaf variables); without it the layer takes LoRA."""
    from torch.nn.utils import parametrize

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    for tensor_name in ("weight", "bias"):
        model = tiny_model("qwen2" if tensor_name == "bias" else "llama")  # (qwen2's v_proj has a bias)
        layer = model.model.layers[1].self_attn.v_proj
        parametrize.register_parametrization(layer, tensor_name, Doubled())
        snap = snapshot(model)
        with pytest.raises(
            ValueError,
            match=r"layer model\.layers\.1\.self_attn\.v_proj has a parametrization on its "
            + tensor_name
            + r" .*remove_parametrizations\(layer, '"
            + tensor_name
            + r"', leave_parametrized=True\)",
        ):
            hoptune.apply_lora(model, r=2)
        assert_same(model, snap)
        if tensor_name == "bias":
            continue
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
        x = ids()
        before = logits(model, x)
        hoptune.apply_lora(model, r=2)
        torch.testing.assert_close(logits(model, x), before)
        hoptune.remove_lora(model)
        assert type(model.model.layers[1].self_attn.v_proj) is nn.Linear


@pytest.mark.parametrize("target", ["all-linear", ["q_proj", "proj"]])
def test_modules_inside_a_parametrization_are_not_targets(target):
    """A parametrization that holds a linear layer (here on the embeddings, outside any target) is
    not one of the model's layers: "all-linear" and suffix matching (``...parametrizations.weight.0
    .proj``) leave it as it is, and it keeps computing the weight."""
    from torch.nn.utils import parametrize

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(64, 64)

        def forward(self, w):
            return self.proj(w)

    model = tiny_model()
    parametrize.register_parametrization(model.model.embed_tokens, "weight", Mixed())
    x = ids()
    before = logits(model, x)
    hoptune.apply_lora(model, r=2, target_modules=target)
    names = lora_names(model)
    assert names and not [n for n in names if "parametrizations" in n]
    assert len(names) == (2 * 7 if target == "all-linear" else 2)
    assert type(model.model.embed_tokens.parametrizations.weight[0].proj) is nn.Linear
    torch.testing.assert_close(logits(model, x), before)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # (no input requires grad)
@pytest.mark.parametrize("unload", ["remove_lora", "merge_and_unload"])
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_hooks_on_an_adapted_layer_keep_running(quantize, unload):
    """Hooks a user put on a layer (register_forward_hook, forward pre-hooks, with kwargs, full
    backward hooks) run on the LoRA layer that takes its place and on the layer remove_lora /
    merge_and_unload give back, as PEFT's, which calls the base layer, keeps them; the handles
    the user holds still remove them."""
    model = tiny_model()
    layer = model.model.layers[0].self_attn.q_proj
    seen = []
    layer.register_forward_pre_hook(lambda m, args: seen.append("pre"))
    layer.register_forward_hook(lambda m, args, kwargs, out: seen.append("kw"), with_kwargs=True)
    layer.register_full_backward_hook(lambda m, gin, gout: seen.append("backward"))
    gone = layer.register_forward_hook(lambda m, args, out: seen.append("gone"))
    outputs = []
    layer.register_forward_hook(lambda m, args, out: outputs.append((args[0].detach(), out.detach())))
    x = ids()
    hoptune.apply_lora(model, r=2, quantize=quantize, init_lora_weights=False)
    gone.remove()
    model(x).logits.sum().backward()
    assert seen == ["pre", "kw", "backward"]
    lora = model.model.layers[0].self_attn.q_proj
    assert isinstance(lora, LoRALinear) and len(outputs) == 1
    with torch.no_grad():  # (the output of the LoRA layer, adapter included)
        torch.testing.assert_close(outputs[0][1], lora.forward(outputs[0][0]), atol=0, rtol=0)
    seen.clear()
    if unload == "remove_lora":
        hoptune.remove_lora(model)
    else:
        hoptune.merge_and_unload(model, dtype=torch.float32)
    assert not isinstance(model.model.layers[0].self_attn.q_proj, LoRALinear)
    logits(model, x)
    assert seen == ["pre", "kw"] and len(outputs) == 2


def test_quantize_nf4_keeps_an_explicitly_targeted_output_head_dense():
    """apply_lora(quantize="nf4") with the output head targeted by name quantized the head, where
    transformers + bitsandbytes (and load_model) keep it dense under PEFT's adapter: it stays dense
    now, with its adapter, and the other targets are NF4."""
    from hoptune.nn import LoRALinear

    model = tiny_model(arch="llama", dtype=torch.bfloat16)
    hoptune.apply_lora(model, r=4, target_modules=["lm_head", "q_proj"], quantize="nf4")
    assert isinstance(model.lm_head, LoRALinear) and not model.lm_head.quantized
    assert model.lm_head.weight.dtype == torch.bfloat16
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear) and q.quantized
    # an adapter loaded again with quantize="nf4" into the layers it built: the head's dense base is
    # the one that quantize keeps dense, not a layer load_adapter would have had to re-quantize
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        hoptune.save_adapter(model, d)
        hoptune.load_adapter(model, d, quantize="nf4")
        fresh = hoptune.load_adapter(tiny_model(arch="llama", dtype=torch.bfloat16), d, quantize="nf4")
        assert not fresh.lm_head.quantized and fresh.model.layers[0].self_attn.q_proj.quantized
        hoptune.load_adapter(fresh, d, quantize="nf4")


def test_quantize_nf4_keeps_only_the_output_head_dense_not_layers_named_under_lm_head():
    """XLM-R's output embeddings are lm_head.decoder: lm_head.dense, a hidden layer, is quantized (as
    load_model and transformers + bitsandbytes do), the decoder kept dense."""
    cfg = transformers.XLMRobertaConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=128,
        is_decoder=True,
    )
    model = transformers.XLMRobertaForCausalLM(cfg)
    hoptune.apply_lora(
        model, r=4, target_modules=["lm_head.dense", "lm_head.decoder", "query"], quantize="nf4"
    )
    assert model.lm_head.dense.quantized and not model.lm_head.decoder.quantized


def test_a_layer_named_lm_head_stays_dense_in_a_model_that_names_no_output_head():
    # as transformers + bitsandbytes keep it (and load_model): a model without get_output_embeddings
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(64, 64)
            self.lm_head = nn.Linear(64, 128)

    m = hoptune.apply_lora(Model(), r=4, quantize="nf4", target_modules=["proj", "lm_head"])
    assert m.proj.quantized and not m.lm_head.quantized
