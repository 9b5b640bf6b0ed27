"""hoptune plan: the memory audit, checked against the peaks the HF stack reached on the H200
(docs/TARGETS.md section 5), and the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

import hoptune
from hoptune.plan import KNOWN_MODELS, GiB, MemoryPlan, main
from tests.conftest import TINY_DECODER

# measured by ../anchors (bench_anchors.py e2e_llama8b, bench_70b.py): torch.cuda.max_memory_allocated
# of a transformers + bitsandbytes NF4 (double quant) + PEFT step, LoRA r=16 on all seven projections,
# gradient checkpointing, AdamW; the scripts cast the adapters to bf16.
ANCHORS = [("llama-3-8b", 2, 13.52), ("llama-3-70b", 1, 44.06)]


@pytest.mark.parametrize("model, batch, measured", ANCHORS)
def test_hf_stack_within_10_percent_of_measured_peak(model, batch, measured):
    p = hoptune.plan(model, seq=2048, batch=batch, r=16, stack="hf", adapter_dtype="bf16")
    print(p)
    assert isinstance(p, MemoryPlan)
    assert abs(p.peak_gib - measured) / measured <= 0.10, (p.peak_gib, measured)
    # with PEFT's default fp32 adapters it is still within 10%
    p32 = hoptune.plan(model, seq=2048, batch=batch, r=16, stack="hf")
    assert abs(p32.peak_gib - measured) / measured <= 0.10, (p32.peak_gib, measured)


def test_weights_match_the_anchor_measurement():
    # the 70B anchor measured 36.85 GiB of weights (NF4 + double quant, bf16 embeddings and head)
    p = hoptune.plan("llama-3-70b", alternatives=False)
    assert abs(p.weights / GiB - 36.85) / 36.85 < 0.01
    assert p.trainable_params == 207_093_760  # what PEFT counted on that model


def test_components_and_options_move_the_right_way():
    hf = hoptune.plan("llama-3-8b", batch=2, stack="hf")
    ours = hoptune.plan("llama-3-8b", batch=2)
    assert ours.logits == "fused" and hf.logits == "full"
    assert ours.peak < hf.peak
    assert ours.peak_phase in ours.phases and ours.peak == max(ours.phases.values())
    no_ckpt = hoptune.plan("llama-3-8b", batch=2, grad_ckpt=False)
    assert no_ckpt.stored_activations > 10 * ours.stored_activations
    assert no_ckpt.peak == pytest.approx(ours.alternatives["without gradient checkpointing"])
    paged = hoptune.plan("llama-3-8b", batch=2, optimizer="paged_adamw")
    assert paged.optimizer_state == 0 and paged.peak < ours.peak
    # AdamW: two moments of the adapters' size, gradients of it, and in its step the gradients
    # twice (foreach temporaries); paged: the gradients once
    assert ours.gradients == ours.adapters and ours.optimizer_state == 2 * ours.adapters
    base = ours.weights + ours.adapters
    assert ours.phases["optimizer step"] == pytest.approx(base + ours.optimizer_state + 2 * ours.gradients)
    assert paged.phases["optimizer step"] == pytest.approx(base + paged.gradients)
    bf16 = hoptune.plan("llama-3-8b", batch=2, quantize=None)
    assert bf16.weights > 2.5 * ours.weights
    single = hoptune.plan("llama-3-8b", batch=2, double_quant=False)
    assert single.weights_quantized > ours.weights_quantized
    qv = hoptune.plan("llama-3-8b", batch=2, target_modules=["q_proj", "v_proj"])
    assert qv.adapted_layers == 64 and qv.trainable_params < ours.trainable_params
    dora = hoptune.plan("llama-3-8b", use_dora=True)
    assert dora.trainable_params > hoptune.plan("llama-3-8b").trainable_params
    assert ours.device_total > ours.peak
    d = ours.as_dict()
    json.dumps(d)
    assert d["peak_gib"] == pytest.approx(ours.peak / GiB)


def test_config_sources(tmp_path):
    import transformers

    cfg = dict(KNOWN_MODELS["llama-3.2-1b"])
    a = hoptune.plan(cfg, alternatives=False)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    b = hoptune.plan(tmp_path / "config.json", alternatives=False)
    c = hoptune.plan(tmp_path, alternatives=False)
    d = hoptune.plan(transformers.AutoConfig.for_model(**cfg), alternatives=False)
    assert a.peak == b.peak == c.peak == d.peak
    # tied embeddings: the head is the embedding, counted once
    assert a.params == pytest.approx(1.236e9, rel=0.01)
    # biases counted (Qwen2's q, k and v projections have them): the parameters of the model itself
    qwen = transformers.Qwen2Config(**TINY_DECODER, tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(qwen)
    assert hoptune.plan(qwen, seq=16, alternatives=False).params == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("tied", [True, False])
def test_lora_on_the_output_head(tied):
    """The head is a target like any linear layer, tied or not: its adapter counts as apply_lora
    makes it, and the log-probs then come from its whole logits (no fused path for a wrapped head)."""
    import transformers

    small = dict(KNOWN_MODELS["llama-3.2-1b"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=300,
                 tie_word_embeddings=tied)  # fmt: skip
    p = hoptune.plan(small, r=4, target_modules=["lm_head", "q_proj"], alternatives=False)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**small))
    hoptune.apply_lora(model, r=4, target_modules=["lm_head", "q_proj"])
    assert p.trainable_params == sum(t.numel() for t in model.parameters() if t.requires_grad)
    assert p.logits == "full"
    assert hoptune.plan(small, r=4, target_modules=["q_proj"], alternatives=False).logits == "fused"
    assert (
        hoptune.plan(small, r=4, target_modules=["lm_head"], logits="fused", alternatives=False).logits
        == "fused"
    )


def test_other_families():
    import transformers

    phi3 = transformers.Phi3Config(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                                   num_attention_heads=32, vocab_size=32064)  # fmt: skip
    p = hoptune.plan(phi3, alternatives=False)
    assert p.adapted_layers == 4 * 32  # qkv_proj, o_proj, gate_up_proj, down_proj
    g = transformers.Gemma2Config(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                                  num_attention_heads=8, num_key_value_heads=4, head_dim=256)  # fmt: skip
    assert hoptune.plan(g, alternatives=False).peak > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(config="llama-9b"), "neither a known model"),
        (dict(config="llama-3-8b", stack="vllm"), "stack must be"),
        (dict(config="llama-3-8b", seq=0), "seq must be a positive int"),
        (dict(config="llama-3-8b", r=5000), "r=5000 is larger"),
        (dict(config="llama-3-8b", r=512), "at most 256"),  # apply_lora's limit
        (dict(config="llama-3-8b", target_modules=["w1"]), "matches no linear layer"),
        (dict(config="llama-3-8b", optimizer="sgd"), "optimizer must be"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hoptune.plan(**kwargs)


def test_cli(capsys):
    assert main(["--model", "llama-3-8b", "--seq", "2048", "--batch", "2", "--r", "16", "--stack", "hf"]) == 0
    out = capsys.readouterr().out
    assert "peak allocated" in out and "logits" in out and "without gradient checkpointing" in out
    assert (
        main(["--model", "llama-3-70b", "--json", "--targets", "q_proj,v_proj", "--optimizer", "paged_adamw"])
        == 0
    )
    d = json.loads(capsys.readouterr().out)
    assert d["adapted_layers"] == 160 and d["optimizer_state"] == 0
    assert main(["--model", "no-such-model"]) == 2
    assert "error" in capsys.readouterr().err


def test_python_dash_m():
    out = subprocess.run(
        [sys.executable, "-m", "hoptune.plan", "--model", "llama-3.2-1b", "--quantize", "none"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "device total" in out.stdout


@pytest.mark.parametrize(
    "text, match",
    [
        ('["llama"]', "not a JSON object"),
        ('"llama"', "not a JSON object"),
        ('{"model_type": "no_such_arch"}', "unknown model_type 'no_such_arch'"),
        ('{"model_type": "t5"}', "not a causal LM"),
        ('{"model_type": "llama", "hidden_size": "abc"}', "hidden_size"),
        ('{"model_type": "llama", "vocab_size": null}', "vocab_size"),
        ('{"model_type": "llama", "hidden_size": 100, "num_attention_heads": 3}', "multiple"),
        ('{"model_type": "llama", "num_attention_heads": 0}', "config"),
        ('{"model_type": "llama", "hidden_size": -64}', "config"),
    ],
)
def test_bad_config_json_is_a_one_line_error(tmp_path, capsys, text, match):
    path = tmp_path / "config.json"
    path.write_text(text)
    assert main(["--model", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hoptune plan: error:") and "\n" not in err and len(err) < 400, err
    assert match in err and str(path) in err, err


def test_all_linear_matching_nothing_is_an_error():
    # a plan with LoRA on 0 layers would describe a run that cannot happen
    with pytest.raises(ValueError, match="matches no linear layer"):
        hoptune.plan("llama-3-8b", target_modules=["no_such_proj"], alternatives=False)


def test_gpt2_conv1d_layers_are_linear_layers():
    """GPT-2's projections are transformers Conv1D (weight [in, out]): apply_lora adapts them (as
    PEFT does), so the plan counts them, with their in / out the right way round."""
    import transformers

    from hoptune.patch import apply_lora, lora_layers

    gpt2 = transformers.GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=128, bos_token_id=0, eos_token_id=0
    )
    p = hoptune.plan(gpt2, r=4, alternatives=False)
    model = apply_lora(transformers.GPT2LMHeadModel(gpt2), r=4)
    layers = lora_layers(model)
    assert p.adapted_layers == len(layers) == 8  # c_attn, c_proj (attention), c_fc, c_proj (MLP) x 2
    assert p.trainable_params == sum(m.lora_A.numel() + m.lora_B.numel() for _, m in layers)


def test_string_target_modules_is_a_regex_as_in_apply_lora():
    # apply_lora (PEFT's rules): a string is a regular expression over the full module name
    listed = hoptune.plan("llama-3-8b", target_modules=["q_proj", "v_proj"], alternatives=False)
    regex = hoptune.plan("llama-3-8b", target_modules=r".*\.(q|v)_proj", alternatives=False)
    assert regex.adapted_layers == listed.adapted_layers == 64
    assert regex.trainable_params == listed.trainable_params
    with pytest.raises(ValueError, match=r"matches no linear layer.*whole name .*pass a list, \['q_proj'\]"):
        hoptune.plan("llama-3-8b", target_modules="q_proj", alternatives=False)  # no full name


def test_moe_experts_outside_nn_linear_are_shown_as_dense():
    # transformers keeps an MoE layer's experts in one 3-D tensor, not in nn.Linear layers: neither
    # NF4 (apply_lora(quantize="nf4"), bitsandbytes) nor LoRA's all-linear touches them, so they
    # stay bf16, and the table says so instead of calling them embeddings, head and norms
    import transformers

    cfg = transformers.MixtralConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                                     num_local_experts=8, num_experts_per_tok=2)  # fmt: skip
    p = hoptune.plan(cfg, alternatives=False)
    experts = 2 * 8 * 3 * 256 * 512 + 2 * 8 * 256  # the experts and the routers
    assert p.dense_other_params == experts
    assert p.weights_dense >= 2 * experts
    row = next(line for line in p.table().splitlines() if line.startswith("weights, dense"))
    assert "outside nn.Linear" in row and f"{experts / 1e9:.2f} B" in row, row
    assert hoptune.plan("llama-3-8b", alternatives=False).dense_other_params == 0


def test_config_without_attention_fields_is_an_error(tmp_path, capsys):
    # a causal LM that is no transformer decoder (Mamba: no attention heads) is named, not a traceback
    (tmp_path / "config.json").write_text(
        '{"model_type": "mamba", "hidden_size": 64, "num_hidden_layers": 2}'
    )
    assert main(["--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "num_attention_heads" in err and "mamba" in err, err


def test_bf16_weights_have_no_dequantized_copy_in_backward():
    # the transient of one dequantized weight exists only for NF4 weights
    n = 2 * 2048
    H, I = 4096, 14336  # noqa: E741
    bf16 = hoptune.plan("llama-3-8b", batch=2, quantize=None, alternatives=False)
    nf4 = hoptune.plan("llama-3-8b", batch=2, alternatives=False)
    assert bf16.backward_transients == (6 * I + 6 * H) * n
    assert nf4.backward_transients == (6 * I + 6 * H) * n + 2 * I * H


def test_config_json_not_utf8_names_the_file(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_bytes(b"\xff\xfe{")
    assert main(["--model", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(path) in err and "\n" not in err, err


def test_tiny_tokenizer_keeps_every_newline():
    # the built-in model's tokenizer is one token per character, newlines included: a blank line
    # ("\n\n") is two newline tokens, not one unknown token (hoptune sft uses it with model.path=hoptune/tiny)
    from hoptune.models import build_tokenizer

    tok = build_tokenizer()
    nl = tok.convert_tokens_to_ids("\n")
    ids = tok("a\n\n\nb", add_special_tokens=False)["input_ids"]
    assert ids == [tok.convert_tokens_to_ids("a"), nl, nl, nl, tok.convert_tokens_to_ids("b")]
    assert tok.decode(ids) == "a\n\n\nb"


def test_fused_logits_never_cost_more_than_full_ones_on_a_small_model():
    """The fused log-probs hold one chunk of fp32 logits, never more than all of them: on a small
    vocabulary and few tokens the fused estimate is no larger than the full-logits one."""
    small = dict(KNOWN_MODELS["llama-3.2-1b"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=300)  # fmt: skip
    fused = hoptune.plan(small, seq=64, logits="fused", alternatives=False)
    full = hoptune.plan(small, seq=64, logits="full", alternatives=False)
    assert fused.peak <= full.peak
    assert fused.peak < 2**20  # not the 128 MiB chunk of a large vocabulary


def test_rank_limit_is_hoptunes_alone():
    # PEFT (the HF stack) takes any rank; hoptune's LoRA layers stop at MAX_RANK
    assert hoptune.plan("llama-3-8b", r=512, stack="hf", alternatives=False).r == 512
    assert hoptune.plan("llama-3-8b", r=256, alternatives=False).r == 256


@pytest.mark.parametrize(
    "cfg",
    [
        dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_inner=96),
        dict(model_type="gptj", n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_inner=96, rotary_dim=8),
        dict(model_type="opt", hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
             vocab_size=128, word_embed_proj_dim=64),
        dict(model_type="falcon", hidden_size=64, ffn_hidden_size=96, num_hidden_layers=2,
             num_attention_heads=4, vocab_size=128),
    ],
    ids=["gpt2", "gptj", "opt", "falcon"],
)  # fmt: skip
def test_mlp_width_of_configs_without_intermediate_size(cfg):
    """GPT-2 / GPT-J (n_inner), OPT (ffn_dim) and Falcon (ffn_hidden_size) name the MLP's width
    otherwise: the estimate uses it, not 4 x hidden."""
    p = hoptune.plan(cfg, seq=8, r=4, quantize=None, alternatives=False)
    assert p.backward_transients == (6 * 96 + 6 * 64) * 8


@pytest.mark.parametrize(
    "cfg",
    [
        dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=128),
        dict(model_type="opt", hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
             vocab_size=128, word_embed_proj_dim=64),
    ],
    ids=["gpt2", "opt"],
)  # fmt: skip
def test_learned_position_embeddings_are_embeddings(cfg):
    # GPT-2's wpe and OPT's embed_positions are nn.Embedding: no "params outside nn.Linear" (MoE experts)
    p = hoptune.plan(cfg, r=4, alternatives=False)
    assert p.dense_other_params == 0
    assert "outside nn.Linear" not in p.table()


def test_fallback_chunk_size_is_the_ops_chunk_size():
    # the fused estimate's chunk when hoptune.ops cannot be imported: the same as the op's own
    from hoptune.ops.logprob import CHUNK_BYTES
    from hoptune.plan import _FUSED_CHUNK_BYTES

    assert _FUSED_CHUNK_BYTES == CHUNK_BYTES


def _saved_bytes_per_token(model, seq: int) -> float:
    """Bytes the first decoder layer of ``model`` (frozen, bf16) keeps for its backward, per token
    of one row of ``seq`` tokens: the storages its autograd graph saves, parameters left out."""
    from transformers.masking_utils import create_causal_mask

    inner = model.model
    params = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    x = torch.randn(1, seq, model.config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(seq)[None]
    pe = inner.rotary_emb(x, pos)
    mask = create_causal_mask(
        config=model.config, inputs_embeds=x, attention_mask=None, cache=None, position_ids=pos
    )
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params and t is not x:
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        inner.layers[0](x, position_embeddings=pe, position_ids=pos, attention_mask=mask)
    return sum(saved.values()) / seq


def _cpu_sdpa_keeps_scores() -> bool:
    """Whether causal SDPA with grouped KV heads (as transformers calls it) saves per-token bytes
    that grow with the row on this CPU (torch 2.7's CPU kernel falls back to the math path)."""
    import torch.nn.functional as F

    def saved(seq):
        q = torch.randn(1, 4, seq, 16, dtype=torch.bfloat16, requires_grad=True)
        kv = torch.randn(2, 1, 2, seq, 16, dtype=torch.bfloat16, requires_grad=True)
        sizes = {}

        def pack(t):
            sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            F.scaled_dot_product_attention(q, kv[0], kv[1], is_causal=True, enable_gqa=True)
        return sum(sizes.values()) / seq

    return saved(256) - saved(128) > 1


@pytest.mark.parametrize(
    "model_type, extra, score_bytes",
    [
        ("gemma2", {}, 8),
        ("gpt_oss", dict(num_local_experts=4, num_experts_per_tok=2, layer_types=["full_attention"]), 2),
        ("llama", {}, 0),
    ],
)
def test_eager_attention_scores_are_counted(model_type, extra, score_bytes):
    """transformers runs Gemma 2 and GPT-OSS with eager attention (no SDPA for soft-capped scores or
    sinks), which keeps each token's scores over the whole row for the backward (Gemma 2: softmax in
    fp32, its bf16 copy, the tanh of the capping; GPT-OSS: a bf16 softmax): per token they grow with
    the sequence, as the estimate must. SDPA keeps no scores."""
    import transformers

    cfg = dict(model_type=model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128, **extra)  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(**cfg), dtype=torch.bfloat16
    ).requires_grad_(False)
    assert model.config._attn_implementation == ("eager" if score_bytes else "sdpa")
    if not score_bytes and _cpu_sdpa_keeps_scores():
        pytest.skip(
            "this torch's CPU SDPA keeps the scores for grouped KV heads (math fallback), as the GPU's kernels do not"
        )
    kept = _saved_bytes_per_token(model, 256) - _saved_bytes_per_token(model, 128)
    plans = [hoptune.plan(cfg, seq=s, r=4, alternatives=False) for s in (128, 256)]
    planned = plans[1].layer_activations / 256 - plans[0].layer_activations / 128
    # (a few constant bytes, e.g. scalars, make the measured difference not quite exact)
    assert planned == score_bytes * 4 * 128
    assert kept == pytest.approx(planned, abs=0.01 * 8 * 4 * 128)


@pytest.mark.parametrize(
    "model_type, like, planned_extra",
    [
        # Qwen3 normalises q and k per head (fp32 copies: 4 x (64 + 32) bytes a token); measured
        # with each head's fp32 statistic too (4 x (4 + 2)), which the estimate leaves out
        ("qwen3", "qwen2", 4 * (64 + 32)),
        # Gemma 2 has a norm after attention and after the MLP (4H each), and eager attention's
        # scores (8 bytes x 4 heads x 128 tokens, the test above)
        ("gemma2", "gemma", 2 * 4 * 64 + 8 * 4 * 128),
    ],
)
def test_the_extra_norms_of_a_layer_are_counted_as_transformers_keeps_them(model_type, like, planned_extra):
    import transformers

    if like == "gemma" and _cpu_sdpa_keeps_scores():  # (Gemma runs SDPA, Gemma 2 eager attention)
        pytest.skip(
            "this torch's CPU SDPA keeps the scores for grouped KV heads (math fallback), as the GPU's kernels do not"
        )
    seq, r = 128, 4

    def both(mt):
        cfg = dict(model_type=mt, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128)  # fmt: skip
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(**cfg), dtype=torch.bfloat16
        ).requires_grad_(False)
        p = hoptune.plan(cfg, seq=seq, r=r, stack="hf", adapter_dtype="bf16", alternatives=False)
        return _saved_bytes_per_token(model, seq), p.layer_activations / seq

    (kept, planned), (kept_like, planned_like) = both(model_type), both(like)
    assert planned - planned_like == planned_extra
    assert kept - kept_like == pytest.approx(planned_extra, abs=32)


def _peak_bytes(fn) -> int:
    """The most bytes of tensors created by ``fn()`` alive at once (what the caching allocator would
    hold for them), tracked op by op on the CPU."""
    import weakref

    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Track(TorchDispatchMode):
        live, now, peak = {}, 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    s = t.untyped_storage()
                    if s.data_ptr() not in Track.live and s.nbytes():
                        Track.live[s.data_ptr()] = s.nbytes()
                        Track.now += s.nbytes()
                        Track.peak = max(Track.peak, Track.now)
                        weakref.finalize(s, Track._free, s.data_ptr())
            return out

        @staticmethod
        def _free(ptr):
            Track.now -= Track.live.pop(ptr, 0)

    with Track():
        fn()
    return Track.peak


def test_soft_capped_logits_of_the_hf_stack():
    """Gemma 2 soft-caps its logits (tanh of logits / cap, saved for the backward): transformers'
    loss over them holds 2V bytes per token more than over plain logits, as the full estimate says."""
    import transformers

    seq, vocab = 128, 8192
    peaks, planned = [], []
    for cap in (None, 30.0):
        cfg = dict(model_type="gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=vocab,
                   final_logit_softcapping=cap)  # fmt: skip
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(**cfg), dtype=torch.bfloat16
        )
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith("q_proj.weight"))
        ids = torch.randint(0, vocab, (1, seq))
        peaks.append(_peak_bytes(lambda m=model, x=ids: m(input_ids=x, labels=x).loss.backward()))
        planned.append(hoptune.plan(cfg, seq=seq, r=4, stack="hf", alternatives=False).logits_bytes)
    assert planned[0] == 14 * vocab * seq
    assert planned[1] - planned[0] == 2 * vocab * seq
    assert peaks[1] - peaks[0] == pytest.approx(2 * vocab * seq, rel=0.01)
    assert "16V bytes per token" in hoptune.plan(cfg, seq=seq, r=4, stack="hf", alternatives=False).table()


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_hidden_layers", 0),
        ("num_hidden_layers", -1),
        ("vocab_size", 0),
        ("num_key_value_heads", 0),
        ("head_dim", 0),
        ("head_dim", -8),
    ],
)
def test_zero_or_negative_sizes_are_named(tmp_path, capsys, field, value):
    # transformers builds some of these models (no layers, no vocabulary) or fails deep inside
    # (a division by zero in the rotary embedding): the error names the field and the file
    cfg = dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=300)  # fmt: skip
    cfg[field] = value
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    assert main(["--model", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(path) in err, err
    assert f"{field} must be a positive int, got {value}" in err, err


def test_hf_stack_takes_ranks_above_a_layers_size_as_peft_does():
    # PEFT (the HF stack) makes lora_A [r, in] and lora_B [out, r] whatever r is; only hoptune's
    # LoRA layers refuse a rank above min(in, out)
    peft = pytest.importorskip("peft")
    import transformers

    small = dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=300)  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**small))
    model = peft.get_peft_model(model, peft.LoraConfig(r=40, target_modules="all-linear"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    p = hoptune.plan(small, r=40, stack="hf", alternatives=False)
    assert p.trainable_params == trainable
    with pytest.raises(ValueError, match="r=40 is larger than layer"):
        hoptune.plan(small, r=40, alternatives=False)


def test_config_path_starting_with_a_tilde_is_in_the_home_folder(tmp_path, monkeypatch, capsys):
    """The shell leaves ``~`` after ``--model=`` as it is: ``--model=~/ckpt`` was "neither a known
    model nor a config.json file" while the folder was there (hoptune sft reads ``~`` in its paths
    as the home folder)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(KNOWN_MODELS["llama-3.2-1b"]))
    assert main(["--model=~/ckpt", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "ckpt"
    assert hoptune.plan("~/ckpt/config.json", alternatives=False).model == "ckpt"


def test_cli_targets_take_what_lora_target_modules_takes(capsys):
    # --targets split every value on commas as names: a regular expression (which lora.target_modules
    # and plan() take) matched nothing, and ALL-LINEAR (any case, as in PEFT) was refused
    counts = {}
    for targets in ("q_proj,v_proj", r".*\.(q|v)_proj", "ALL-LINEAR", "all-linear"):
        assert main(["--model", "llama-3-8b", "--json", "--targets", targets]) == 0
        counts[targets] = json.loads(capsys.readouterr().out)["adapted_layers"]
    assert counts["q_proj,v_proj"] == counts[r".*\.(q|v)_proj"] == 64
    assert counts["ALL-LINEAR"] == counts["all-linear"] == 224


@pytest.mark.parametrize("target", [["q_proj", "mlp"], r".*mlp.*", ["embed_tokens"]])
def test_targets_that_are_not_linear_layers_are_refused_as_apply_lora_does(target):
    # apply_lora (as PEFT) refuses a target_modules that matches a module other than a linear layer
    # (an MLP block, an embedding); the plan counted only the linear layers matched and estimated
    # a run that stops at apply_lora
    import transformers

    small = dict(KNOWN_MODELS["llama-3.2-1b"], hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 vocab_size=300)  # fmt: skip
    config = transformers.AutoConfig.for_model(**small)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="not linear layers: model") as applied:
        hoptune.apply_lora(model, r=4, target_modules=target)
    with pytest.raises(ValueError, match="not linear layers: model") as planned:
        hoptune.plan(small, r=4, target_modules=target, alternatives=False)
    assert str(planned.value) == str(applied.value)  # the same modules named


@pytest.mark.parametrize("option", ["double_quant", "grad_ckpt", "use_dora", "alternatives"])
@pytest.mark.parametrize("value", ["no", None, 0])
def test_boolean_options_must_be_true_or_false(option, value):
    # a string or None was read by its truth: double_quant="no" planned double quantization,
    # grad_ckpt="false" gradient checkpointing
    with pytest.raises(TypeError, match=f"{option} must be True or False, got {value!r}"):
        hoptune.plan("llama-3.2-1b", **{option: value})


@pytest.mark.parametrize("kv_heads", [3, 8])
def test_key_value_heads_that_do_not_divide_the_heads_are_refused(tmp_path, capsys, kv_heads):
    # transformers builds such a model, and its attention fails at the first forward (each key /
    # value head serves num_attention_heads / num_key_value_heads query heads)
    cfg = dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=kv_heads, vocab_size=300)  # fmt: skip
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    assert main(["--model", str(path), "--r", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(path) in err, err
    assert f"num_key_value_heads must divide num_attention_heads (4), got {kv_heads}" in err, err


@pytest.mark.parametrize("stack", ["hoptune", "hf"])
@pytest.mark.parametrize(
    "cfg, field",
    [
        (dict(model_type="llama", hidden_size=64, intermediate_size=0, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=300), "intermediate_size"),
        (dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_inner=0),
         "n_inner"),
    ],
    ids=["llama", "gpt2"],
)  # fmt: skip
def test_a_size_of_zero_is_named_not_taken_for_a_rank_error(cfg, field, stack):
    # transformers builds an MLP of no weights from a width of 0: the hoptune stack blamed the rank
    # ("r=4 is larger than layer ...gate_proj allows ([0, 64])"), the HF stack planned the model
    with pytest.raises(ValueError, match=f"config field {field} must be a positive int, got 0"):
        hoptune.plan(cfg, r=4, stack=stack, alternatives=False)


@pytest.mark.parametrize("targets", ["", ",", " , "])
def test_cli_empty_targets_name_the_option(capsys, targets):
    # --targets "" reached plan() as target_modules=[]: the error named an argument the command
    # does not have
    assert main(["--model", "llama-3.2-1b", "--targets", targets]) == 2
    err = capsys.readouterr().err.strip()
    assert "--targets must name at least one layer" in err and "target_modules" not in err, err


def test_numpy_integers_are_taken_as_the_library_takes_them():
    # seq / batch / r of NumPy integers (a sweep over np.arange) were refused as "not a positive
    # int", where apply_lora and load_model take them
    import numpy as np

    want = hoptune.plan("llama-3-8b", seq=2048, batch=2, r=16)
    got = hoptune.plan("llama-3-8b", seq=np.int64(2048), batch=np.int32(2), r=np.int64(16))
    assert got.peak == want.peak
    with pytest.raises(ValueError, match=r"seq must be a positive int, got 2048\.0"):
        hoptune.plan("llama-3-8b", seq=2048.0)


def test_fused_decoder_ops_keep_less_for_llama_and_nothing_changes_for_gemma():
    from hoptune.plan import plan

    llama = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 128,
        "hidden_act": "silu",
    }
    # (bf16 adapters: the HF stack then casts no activation to fp32, the one other difference)
    ours = plan(llama, seq=64, stack="hoptune", adapter_dtype="bf16")
    hf = plan(llama, seq=64, stack="hf", adapter_dtype="bf16")
    h, i, n = 64, 128, 64
    # per token: two norms' fp32 copies (4H each, a 4-byte statistic instead) and act(gate) (2I)
    assert hf.layer_activations - ours.layer_activations == (2 * (4 * h - 4) + 2 * i) * n
    gemma = {**llama, "model_type": "gemma", "hidden_act": "gelu_pytorch_tanh", "head_dim": 16}
    kw = {"seq": 64, "adapter_dtype": "bf16"}
    assert (
        plan(gemma, stack="hoptune", **kw).layer_activations
        == plan(gemma, stack="hf", **kw).layer_activations
    )


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_weight_bytes_are_those_of_the_layers_load_model_makes(tmp_path, double_quant):
    # what the quantized linear layers of a loaded model hold: codes, statistics (with double
    # quantization the nested absmax, rounded up to whole blocks of 256, and the 1 KiB table) and
    # their biases (Qwen2's q/k/v), exactly
    import transformers

    from hoptune.nn import NF4Linear

    cfg = transformers.Qwen2Config(**TINY_DECODER)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(tmp_path)
    model = hoptune.load_model(
        tmp_path, device="cpu", dtype=torch.bfloat16, double_quant=double_quant, progress=False
    )
    layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    assert len(layers) == 14 and sum(m.bias is not None for m in layers) == 6
    held = sum(m.weight_nf4.nbytes + (0 if m.bias is None else m.bias.nbytes) for m in layers)
    p = hoptune.plan(cfg, double_quant=double_quant, alternatives=False)
    assert p.weights_quantized == held


def test_the_hf_stack_with_fp32_adapters_keeps_the_fp32_copy_of_each_adapted_layers_input():
    # PEFT casts x to the adapter dtype before lora_A: 4 bytes per input feature and 4 per rank
    # for every adapted layer (Llama-3-8B: q, k, v, o, gate and up take 4096 features, down 14336)
    kw = dict(seq=2048, batch=1, r=16, stack="hf", alternatives=False)
    fp32, bf16 = (hoptune.plan("llama-3-8b", adapter_dtype=d, **kw) for d in ("fp32", "bf16"))
    per_token = 4 * (6 * 4096 + 14336) + 4 * 7 * 16
    assert fp32.layer_activations - bf16.layer_activations == per_token * 2048


@pytest.mark.parametrize("stack, final_norm", [("hf", 4 * 64 + 2 * 64), ("hoptune", 4 + 2 * 64)])
def test_checkpointed_layers_keep_their_inputs_and_the_final_norm_its_own(stack, final_norm):
    # with checkpointing each decoder layer keeps its input (2H a token); the final norm, outside
    # the layers, keeps an fp32 copy of its input (fused: a 4-byte statistic) and its output, the
    # head's input
    cfg = dict(TINY_DECODER, model_type="llama")
    p = hoptune.plan(cfg, seq=32, batch=2, stack=stack, alternatives=False)
    assert p.stored_activations == (2 * 2 * 64 + final_norm) * 64


def test_the_layer_backward_holds_the_full_logits_and_one_layers_adapter_gradients():
    cfg = dict(TINY_DECODER, model_type="llama")  # 2 layers, 7 adapted each, V = 128
    kw = dict(seq=32, batch=2, optimizer="none", alternatives=False)
    n, vocab = 64, 128
    full, fused = (hoptune.plan(cfg, logits=how, **kw) for how in ("full", "fused"))
    # the bf16 logits the model's output keeps referenced until the step ends
    assert full.phases["layer backward"] - fused.phases["layer backward"] == 2 * vocab * n
    r16, r8 = (hoptune.plan(cfg, r=r, logits="fused", **kw) for r in (16, 8))
    more = r16.adapters - r8.adapters
    # the adapters, the recomputed layer's x A^T (2r bytes a token per adapted layer) and the
    # adapter gradients of the one layer in backward (half of them: one of two layers)
    assert r16.phases["layer backward"] - r8.phases["layer backward"] == more + 2 * 8 * 7 * n + more / 2
