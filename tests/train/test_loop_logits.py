"""batch_logprobs against the model's own logits: composite models, tuple outputs, 0/1 masks."""

import warnings

import pytest
import torch

from hoptune.train import loop
from tests.conftest import encoder_as_decoder

V = 300
PLE = dict(vocab_size_per_layer_input=V, hidden_size_per_layer_input=8)  # (Gemma 4: per-layer)
TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=V,
    head_dim=16,
)
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=28,
    patch_size=14,
)


def _model_logprobs(model, ids, labels):
    """log_softmax of the model's own logits at the labels of every next-token position."""
    out = model(input_ids=ids, use_cache=False)
    logits = out[0] if isinstance(out, tuple) else out.logits
    lp = torch.log_softmax(logits[:, :-1].float(), -1).reshape(-1, logits.shape[-1])
    return lp.gather(1, labels[:, None]).squeeze(1)


@pytest.mark.parametrize(
    "family,text,extra",
    [
        # soft-capped by its text config's final_logit_softcapping (Gemma 3n's is 30)
        (
            "Gemma4ForConditionalGeneration",
            dict(final_logit_softcapping=0.5, **PLE),
            {},
        ),
        # logits * text_config.logits_scaling (the text model is HyperCLOVA X)
        (
            "HyperCLOVAXVisionV2ForConditionalGeneration",
            dict(logits_scaling=0.25),
            dict(
                vision_config=dict(
                    depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64
                )
            ),
        ),
        # its text config's logit_scale is applied by its forward from transformers 5.25 on
        ("AyaVisionForConditionalGeneration", dict(logit_scale=0.25), dict(vision_config=VISION)),
        # its text config's logit_scale is not applied by its forward
        ("Cohere2VisionForConditionalGeneration", dict(logit_scale=0.25), dict(vision_config=VISION)),
        # logits * text_config.output_multiplier, then soft-capped
        (
            "MuseGlimmerForConditionalGeneration",
            dict(
                output_multiplier=0.2,
                final_logit_softcapping=3.0,
                sliding_window=16,
                bos_token_id=1,
                eos_token_id=2,
            ),
            dict(
                vision_config=dict(
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    pos_emb_height=4,
                    pos_emb_width=4,
                    max_position_embeddings=64,
                ),
                out_hidden_size=64,
                projector_hidden_size=64,
            ),
        ),
    ],
)
def test_batch_logprobs_reads_a_composite_models_text_config(family, text, extra):
    """A composite (multimodal) model keeps the logit soft-cap / scale in its text config: the
    head's log-probs follow it as the model's forward does (they were taken without it)."""
    import transformers

    model_cls = getattr(transformers, family, None)
    if model_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {family}")
    cfg_cls = getattr(transformers, family.replace("ForConditionalGeneration", "Config"))
    cfg = cfg_cls(text_config={**TEXT, **text}, **extra)
    model = model_cls(cfg).eval()
    assert loop._decoder(model) is not None  # (the path that applies the cap / scale itself)
    ids = torch.randint(3, V, (2, 12))
    with torch.no_grad():
        lp, labels = loop.batch_logprobs(
            model, {"input_ids": ids, "loss_mask": torch.ones_like(ids, dtype=torch.bool)}
        )
        ref = _model_logprobs(model, ids, labels)
    assert (lp - ref).abs().max().item() < 1e-4
    assert loop._HEAD_PATH_OK[model] is True  # (by the output layer, not the model's own logits)


@pytest.mark.parametrize("separable", [True, False])
def test_batch_logprobs_of_a_model_returning_tuples(small_model, separable, monkeypatch):
    """A decoder or model that returns tuples (return_dict=False in its config) gives the log-probs
    of the same one returning ModelOutputs (it was AttributeError: 'tuple' object has no attribute
    'last_hidden_state', or 'logits')."""
    model = small_model.eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    mask = torch.rand(2, 10) < 0.6
    mask[:, -1] = True
    batch = {"input_ids": ids, "loss_mask": mask, "attention_mask": torch.ones_like(ids)}
    if not separable:  # the full-logits path, through the model's forward
        monkeypatch.setattr(loop, "_decoder", lambda m: None)
    with torch.no_grad():
        want, want_labels = loop.batch_logprobs(model, batch)
        if separable:
            model.config.return_dict = False
            assert isinstance(loop._decoder(model)(input_ids=ids, use_cache=False), tuple)
        else:  # (transformers >= 5 reads its decoder's output by name: a forward of its own)
            forward = model.forward
            monkeypatch.setattr(model, "forward", lambda *a, **k: forward(*a, **k).to_tuple())
            assert isinstance(model(input_ids=ids, use_cache=False), tuple)
        lp, labels = loop.batch_logprobs(model, batch)
    assert torch.equal(labels, want_labels)
    torch.testing.assert_close(lp, want)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.float32])
def test_batch_logprobs_of_a_0_1_loss_mask(small_model, dtype):
    """A loss mask of 0/1 numbers selects the tokens a bool mask does (an int64 one indexed rows:
    evaluate_nll counted B * (T-1) * (T-1) tokens); any other value is a ValueError."""
    model = small_model.eval()
    ids = torch.randint(0, model.config.vocab_size, (3, 11))
    mask = torch.rand(3, 11) < 0.5
    mask[:, -1] = True
    batch = {"input_ids": ids, "loss_mask": mask, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        want, want_labels = loop.batch_logprobs(model, batch)
        lp, labels = loop.batch_logprobs(model, {**batch, "loss_mask": mask.to(dtype)})
    assert torch.equal(labels, want_labels)
    torch.testing.assert_close(lp, want)
    ev = loop.evaluate_nll(model, [{**batch, "loss_mask": mask.to(dtype)}], torch.device("cpu"))
    assert ev["tokens"] == int(mask[:, 1:].sum())
    assert ev["loss"] == pytest.approx(float(-want.sum()) / want.numel(), rel=1e-5)
    bad = mask.to(dtype).clone()
    bad[1, 4] = 2
    with pytest.raises(ValueError, match="loss_mask must be bool or hold only 0 and 1, got 2"):
        loop.batch_logprobs(model, {**batch, "loss_mask": bad})


@pytest.mark.parametrize(
    ("version", "unused"), [("5.24.0", True), ("5.25.0", False), ("5.25.0.dev0", False), ("6.1", False)]
)
def test_aya_visions_text_logit_scale_follows_the_transformers_version(monkeypatch, version, unused):
    """AyaVision's forward multiplies its logits by text_config.logit_scale from transformers 5.25
    (earlier ones leave it unused): the head's log-probs follow the version installed."""
    import transformers

    monkeypatch.setattr(transformers, "__version__", version)
    assert loop._text_logit_scale_unused("aya_vision") is unused
    assert loop._text_logit_scale_unused("cohere2_vision") is True
    assert loop._text_logit_scale_unused("cohere") is False


def _logits_times(model, factor):
    """The model with its logits multiplied by ``factor`` in its forward (a transform hoptune does
    not know of, as a new architecture's muP multiplier would be)."""
    forward = model.forward

    def scaled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * factor
        return out

    model.forward = scaled
    return model


@pytest.mark.parametrize("case", ["bert", "electra", "unknown_multiplier"])
def test_batch_logprobs_of_logits_that_are_not_the_head_on_the_decoder(small_model, case):
    """BERT as a decoder (its logits take a prediction-head transform between the encoder and the
    output layer), ELECTRA's generator (whose head projects the hidden states to another width
    first: the output layer cannot take them) and a model whose forward scales its logits by a
    factor no config key names: the output layer on the decoder's hidden states would give other
    log-probs (0.35-0.5 nats off for BERT, every logit a factor off for the last) or fail, so the
    first batch checks it against the model's own logits, says so once and takes the model's
    logits from then on."""
    encoder = case in ("bert", "electra")
    model = encoder_as_decoder(case, vocab=V) if encoder else _logits_times(small_model.eval(), 0.2)
    assert loop._decoder(model) is not None  # (the path the check turns away from)
    ids = torch.randint(3, V if encoder else model.config.vocab_size, (2, 10))
    mask = torch.rand(2, 10) < 0.7
    mask[:, -1] = True
    batch = {"input_ids": ids, "loss_mask": mask}
    with torch.no_grad():
        with pytest.warns(UserWarning, match=f"{type(model).__name__}: its logits are not its output layer"):
            lp, labels = loop.batch_logprobs(model, batch)
        want = _model_logprobs(model, ids, ids[:, 1:].reshape(-1))[mask[:, 1:].reshape(-1)]
        torch.testing.assert_close(lp, want)
        assert torch.equal(labels, ids[:, 1:][mask[:, 1:]])
        assert loop._HEAD_PATH_OK[model] is False
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once
            again, _ = loop.batch_logprobs(model, batch)
    torch.testing.assert_close(again, want)


def test_the_head_check_runs_once_and_draws_no_random_numbers(small_model, monkeypatch):
    """A model whose logits are the output layer on its decoder keeps that path; the check runs
    once per model, and in training mode with dropout it leaves the random state as it found it,
    so a run's dropout masks do not depend on whether this process checked the model already (a
    resumed run checks it again)."""
    import copy

    import hoptune

    model = small_model.train()
    model.config.attention_dropout = 0.5
    for m in model.modules():
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.5
    # an adapted output layer with dropout: checked in training mode, its second call would draw
    # another mask than the model's call did, and the path would be refused
    targets = ["q_proj", "lm_head"]
    hoptune.apply_lora(model, r=2, alpha=4, dropout=0.5, target_modules=targets, init_lora_weights=False)
    model.model.layers[0].mlp.eval()  # (a module a user froze in eval mode stays so)
    twin = copy.deepcopy(model)
    modes = {n: m.training for n, m in model.named_modules()}
    assert not modes["model.layers.0.mlp"] and modes["model.layers.0.self_attn.q_proj"]
    calls = []
    real = loop._head_mismatch
    monkeypatch.setattr(loop, "_head_mismatch", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(0, model.config.vocab_size, (2, 10))
    batch = {"input_ids": ids, "loss_mask": torch.ones_like(ids, dtype=torch.bool)}
    with torch.no_grad():
        torch.manual_seed(1)
        first, _ = loop.batch_logprobs(model, batch)
        after_first = torch.get_rng_state()
        assert loop._HEAD_PATH_OK[model] is True and calls == [1]
        assert {n: m.training for n, m in model.named_modules()} == modes
        loop._HEAD_PATH_OK[twin] = True  # (as if checked earlier: no check now)
        torch.manual_seed(1)
        same, _ = loop.batch_logprobs(twin, batch)
        assert torch.equal(torch.get_rng_state(), after_first)
        torch.testing.assert_close(same, first, rtol=0, atol=0)
        loop.batch_logprobs(model, batch)
    assert calls == [1]
