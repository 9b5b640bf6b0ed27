"""sft.train on models passed in, across architectures (CPU, fp32): a short run trains, saves an
adapter that PEFT loads on a fresh copy of the base with the same logits, and a step's loss and
gradients are those TRL computes from the model's own forward (soft-capped or scaled logits, an MoE
model's load-balancing loss)."""

import copy
import re

import pytest
import torch

from hoptune.config import ConfigError
from hoptune.data.dataset import StepSampler
from hoptune.data.packing import collate
from hoptune.train import sft
from tests.conftest import TINY_DECODER

from .conftest import small_config

V = 128  # (the tiny tokenizer has 95 tokens)
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
DECODER = dict(TINY_DECODER, vocab_size=V)
ARCHS = {
    "Qwen2ForCausalLM": DECODER,
    # tied embeddings, soft-capped logits
    "Gemma2ForCausalLM": dict(DECODER, head_dim=16, final_logit_softcapping=3.0)
    | dict(tie_word_embeddings=True),
    "Phi3ForCausalLM": DECODER,  # fused qkv_proj and gate_up_proj
    "MistralForCausalLM": DECODER,
    "CohereForCausalLM": dict(DECODER, logit_scale=0.25),
    # transformers Conv1D layers; dropout off: the loss comparison runs the same forward twice
    "GPT2LMHeadModel": dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=V, **IDS)
    | dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    # output_router_logits off in its config: TRL turns the load-balancing loss on for it
    "MixtralForCausalLM": dict(DECODER, num_local_experts=4, num_experts_per_tok=2)
    | dict(router_aux_loss_coef=0.5),
    # router_aux_loss_coef in its config, but no load-balancing loss in its forward
    "Llama4ForCausalLM": dict(DECODER, head_dim=16, intermediate_size_mlp=128, num_local_experts=4),
}


# all-linear takes Llama 4's router, an nn.Linear subclass a LoRA layer cannot stand in for
TARGETS = {"Llama4ForCausalLM": "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"}


def _model(family, **over):
    import transformers

    model_cls = getattr(transformers, family)
    torch.manual_seed(0)
    return model_cls(model_cls.config_class(**{**ARCHS.get(family, DECODER), **over})).float()


def _lora(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", list(ARCHS))
def test_a_short_run_trains_an_adapter_peft_loads(tmp_path, tokenizer, demo_data, family):
    import peft

    base = _model(family)
    model = copy.deepcopy(base)
    targets = TARGETS.get(family, "all-linear")
    cfg = small_config(
        tmp_path, demo_data, "train.max_steps=2", "train.lr=1e-2", f"lora.target_modules={targets}"
    )
    res = sft.train(cfg, log=lambda s: None, model=model, tokenizer=tokenizer)
    assert len(res.train_losses) == 2 and all(torch.isfinite(torch.tensor(res.train_losses)))
    trained = _lora(model)
    assert trained and all(p.abs().max() > 0 for n, p in trained.items() if "lora_B" in n)

    ids = torch.randint(3, len(tokenizer), (2, 12))
    with torch.no_grad():
        ours = model.eval()(input_ids=ids).logits
        before = base.eval()(input_ids=ids).logits
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), res.output_dir).eval()
        theirs = theirs(input_ids=ids).logits
    assert (ours - before).abs().max() > 1e-3  # the adapter changes the model
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def _trl_step(model, micro, n_loss):
    """TRL's SFT loss of one step from the model's own forward: per micro-batch transformers'
    ForCausalLMLoss over the step's loss tokens, plus for an MoE model its router_aux_loss_coef
    times the load-balancing loss averaged over the micro-batches. Returns (loss, gradients)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    cfg = model.config
    moe = hasattr(cfg, "output_router_logits") and cfg.router_aux_loss_coef
    total = 0.0
    for b in micro:
        labels = torch.where(b["loss_mask"], b["input_ids"], -100)
        kw = {k: b[k] for k in ("attention_mask", "position_ids") if b[k] is not None}
        if moe:
            kw["output_router_logits"] = True
        out = model(input_ids=b["input_ids"], use_cache=False, **kw)
        loss = ForCausalLMLoss(out.logits, labels, vocab_size=V, num_items_in_batch=n_loss)
        if moe:
            loss = loss + cfg.router_aux_loss_coef * out.aux_loss / len(micro)
        loss.backward()
        total += float(loss.detach())
    return total, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("family", ["Gemma2ForCausalLM", "CohereForCausalLM", "MixtralForCausalLM"])
def test_a_steps_loss_and_gradients_are_trls(tmp_path, tokenizer, demo_data, family, packing):
    """Mixtral's load-balancing loss was left out (hoptune's loss 0.5 x aux below TRL's)."""
    cfg = small_config(tmp_path, demo_data, f"data.packing={str(packing).lower()}")
    rows, _, _ = sft.load_data(cfg, tokenizer, log=lambda s: None)
    t = cfg.train
    idx = StepSampler(len(rows), t.batch_size * t.grad_accum, t.seed).rows_for_step(0)
    bs = t.batch_size
    micro = [collate([rows[i] for i in idx[k : k + bs]], 0) for k in range(0, len(idx), bs)]
    ours = _model(family)
    ref = copy.deepcopy(ours)
    loss, n_loss, _ = sft.sft_step(ours, micro, torch.device("cpu"))
    ref_loss, ref_grads = _trl_step(ref, micro, n_loss)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], atol=1e-6, rtol=1e-4, msg=n)


def test_lora_settings_that_do_not_fit_name_the_model_passed_in(tmp_path, tokenizer, demo_data):
    """The error named the built-in model (model.path's default), not the Phi-3 passed in."""
    cfg = small_config(tmp_path, demo_data, "lora.target_modules=[q_proj,v_proj]")
    match = r"lora settings do not fit the model passed in \(Phi3"
    with pytest.raises(ConfigError, match=match) as e:
        sft.train(cfg, log=lambda s: None, model=_model("Phi3ForCausalLM"), tokenizer=tokenizer)
    assert "hoptune/tiny" not in str(e.value) and "qkv_proj" in str(e.value)


@pytest.mark.parametrize(
    ("family", "over"),
    [
        # all-linear takes its router, an nn.Linear subclass
        ("Llama4ForCausalLM", {}),
        # all-linear takes its shared_expert_gate, [1, 64]: no room for r=4
        (
            "Qwen2MoeForCausalLM",
            dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
            | dict(shared_expert_intermediate_size=32),
        ),
    ],
)
def test_a_layer_all_linear_cannot_adapt_is_refused_with_a_setting_the_config_has(
    tmp_path, tokenizer, demo_data, family, over
):
    """The remedy named was apply_lora's exclude_modules (or rank_pattern): no config key."""
    cfg = small_config(tmp_path, demo_data)
    with pytest.raises(ConfigError, match=r"exclude_modules") as e:
        sft.train(cfg, log=lambda s: None, model=_model(family, **over), tokenizer=tokenizer)
    assert re.search(r"name the layers to adapt in lora\.target_modules", str(e.value))


def test_adapters_that_get_no_gradient_are_named(tmp_path, tokenizer, demo_data):
    """Mamba's mixer reads dt_proj's weight directly (``dt_proj.weight @ x``), so the adapter
    all-linear puts on dt_proj never gets a gradient and never trains, without a word: the first
    step names such tensors (while it runs, and among the run's notes); the other layers train."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.MambaConfig(
        vocab_size=V, hidden_size=64, state_size=8, num_hidden_layers=2, expand=2, **IDS
    )
    model = transformers.MambaForCausalLM(cfg).float()
    seen = []
    run = small_config(tmp_path, demo_data, "train.max_steps=2", "train.lr=1e-2")
    res = sft.train(run, log=seen.append, model=model, tokenizer=tokenizer)
    (note,) = [n for n in res.notes if "got no gradient" in n]
    dead = sorted(n for n, p in model.named_parameters() if p.requires_grad and "dt_proj" in n)
    assert len(dead) == 4 and f"{len(dead)} of the " in note and dead[0] in note
    assert note in seen  # (the run's closing notes)
    trained = _lora(model)
    assert all(p.abs().max() > 0 for n, p in trained.items() if "lora_B" in n and "dt_proj" not in n)
    assert all(p.abs().max() == 0 for n, p in trained.items() if "lora_B" in n and "dt_proj" in n)
    # a model whose adapters all train gets no such note
    res = sft.train(
        small_config(tmp_path / "qwen2", demo_data, "train.max_steps=1"),
        log=lambda s: None,
        model=_model("Qwen2ForCausalLM"),
        tokenizer=tokenizer,
    )
    assert not [n for n in res.notes if "got no gradient" in n]


def test_qlora_of_a_checkpoint_keeps_the_layers_load_model_keeps_dense(tmp_path, tokenizer, demo_data):
    """load_model keeps dense a layer whose weight count is not a multiple of NF4's block size
    (transformers + bitsandbytes pad its last block, a layout NF4 layers do not take), with a
    warning; the trainer's apply_lora then quantized it anyway with model.quantize=nf4 and refused
    it ("not a multiple of blocksize"), so `hoptune sft` failed on such a checkpoint (Gemma 3n's
    altup.correction_coefs, 4 x 4). The adapters go over the layers as load_model left them."""
    import transformers

    # head_dim 10: k_proj and v_proj hold 20 x 40 = 800 weights
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**dict(DECODER, hidden_size=40))).save_pretrained(
        tmp_path / "base"
    )
    cfg = small_config(
        tmp_path, demo_data, f"model.path={tmp_path / 'base'}", "model.quantize=nf4", "train.max_steps=2"
    )
    with pytest.warns(UserWarning, match=r"k_proj stays dense: its 800 weights"):
        res = sft.train(cfg, log=lambda s: None, tokenizer=tokenizer)
    assert len(res.train_losses) == 2 and all(torch.isfinite(torch.tensor(res.train_losses)))
    attn = res.model.model.layers[0].self_attn
    assert attn.q_proj.quantized and attn.o_proj.quantized
    assert not attn.k_proj.quantized and not attn.v_proj.quantized
    assert all(p.abs().max() > 0 for n, p in _lora(res.model).items() if "lora_B" in n)


def test_qlora_of_a_checkpoint_keeps_tied_layers_dense_and_shared(tmp_path, tokenizer, demo_data):
    """Zamba2's shared block, at layers 0 and 2, is one set of weights: load_model keeps those tied
    layers dense and shared (as transformers + bitsandbytes do), and the trainer's apply_lora then
    quantized each copy on its own with model.quantize=nf4 (two NF4 copies, untied, numerics other
    than the Hugging Face stack's)."""
    import transformers

    from tests.test_loading_arch import BASE, ZAMBA2

    torch.manual_seed(0)
    transformers.Zamba2ForCausalLM(transformers.Zamba2Config(**{**BASE, **ZAMBA2})).save_pretrained(
        tmp_path / "base"
    )
    cfg = small_config(
        tmp_path, demo_data, f"model.path={tmp_path / 'base'}", "model.quantize=nf4", "train.max_steps=1"
    )
    res = sft.train(cfg, log=lambda s: None, tokenizer=tokenizer)
    a, b = (res.model.model.layers[i].shared_transformer.self_attn.q_proj for i in (0, 2))
    assert not a.quantized and not b.quantized and a.weight is b.weight
    assert res.model.model.layers[1].mamba.in_proj.quantized  # (the other layers NF4)


def test_a_mamba_adapter_loads_in_peft(tmp_path, tokenizer, demo_data):
    """PEFT refuses LoRA on the out_proj of its Mamba models (Mamba, Mamba2, FalconMamba, FalconH1,
    NemotronH), in PeftModel.from_pretrained too: all-linear adapted it, and the run's adapter/ did
    not load in PEFT ("Module 'out_proj' is incompatible with Mamba-based models"). all-linear leaves
    it out, with a warning; naming it is a config error."""
    import peft
    import transformers

    torch.manual_seed(0)
    cfg = transformers.MambaConfig(
        vocab_size=V, hidden_size=64, state_size=8, num_hidden_layers=2, expand=2, **IDS
    )
    base = transformers.MambaForCausalLM(cfg).float()
    model = copy.deepcopy(base)
    run = small_config(tmp_path, demo_data, "train.max_steps=2", "train.lr=1e-2")
    with pytest.warns(
        UserWarning, match=r"all-linear leaves out 2 layers \(backbone\.layers\.0\.mixer\.out_proj"
    ):
        res = sft.train(run, log=lambda s: None, model=model, tokenizer=tokenizer)
    assert not any("out_proj" in n for n in _lora(model))
    ids = torch.randint(3, len(tokenizer), (2, 12))
    with torch.no_grad():
        ours = model.eval()(input_ids=ids).logits
        theirs = (
            peft.PeftModel.from_pretrained(copy.deepcopy(base), res.output_dir).eval()(input_ids=ids).logits
        )
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    named = small_config(
        tmp_path / "named", demo_data, "train.max_steps=1", "lora.target_modules=[in_proj,out_proj]"
    )
    with pytest.raises(ConfigError, match=r"out_proj.*PeftModel\.from_pretrained refuses"):
        sft.train(named, log=lambda s: None, model=copy.deepcopy(base), tokenizer=tokenizer)


def test_skip_modules_keeps_a_layer_the_model_reads_directly_dense(tmp_path, tokenizer, demo_data):
    """Mamba's mixer computes with dt_proj.weight itself, which an NF4 layer cannot give it (nor can
    transformers + bitsandbytes'): its error names load_model's skip_modules, which `hoptune sft` had
    no key for. model.skip_modules=[dt_proj] keeps those layers dense and the run trains; the
    built-in model refuses the key, and a resume with other layers kept dense is refused."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.MambaConfig(
        vocab_size=V, hidden_size=64, state_size=8, num_hidden_layers=2, expand=2, **IDS
    )
    transformers.MambaForCausalLM(cfg).save_pretrained(tmp_path / "base")
    args = (
        f"model.path={tmp_path / 'base'}",
        "model.quantize=nf4",
        "train.max_steps=2",
        "train.save_every=1",
    )
    with pytest.raises(RuntimeError, match=r"dense: keep it out of quantization.*model\.skip_modules"):
        sft.train(small_config(tmp_path / "plain", demo_data, *args), log=lambda s: None, tokenizer=tokenizer)
    run = small_config(tmp_path, demo_data, *args, "model.skip_modules=[dt_proj]")
    res = sft.train(run, log=lambda s: None, tokenizer=tokenizer)
    mixer = res.model.backbone.layers[0].mixer
    assert mixer.in_proj.quantized and not mixer.dt_proj.quantized
    assert len(res.train_losses) == 2 and all(torch.isfinite(torch.tensor(res.train_losses)))
    other = small_config(
        tmp_path, demo_data, *args, "model.skip_modules=[dt_proj,x_proj]", "output.resume=auto"
    )
    with pytest.raises(ConfigError, match=r"model\.skip_modules"):
        sft.train(other, log=lambda s: None, tokenizer=tokenizer)
    with pytest.raises(
        ConfigError, match=r"model\.skip_modules=\['dt_proj'\] keeps layers out of NF4.*quantizes none"
    ):
        sft.train(
            small_config(
                tmp_path / "dense", demo_data, *args, "model.quantize=null", "model.skip_modules=[dt_proj]"
            ),
            log=lambda s: None,
            tokenizer=tokenizer,
        )
    with pytest.raises(ConfigError, match=r"model\.skip_modules=\['dt_proj'\] names layers of a checkpoint"):
        sft.train(
            small_config(tmp_path / "tiny", demo_data, "model.quantize=nf4", "model.skip_modules=[dt_proj]"),
            log=lambda s: None,
            tokenizer=tokenizer,
        )
