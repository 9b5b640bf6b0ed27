"""The recipe against transformers' Trainer / TRL where a setting's meaning is theirs (warmup ratio,
which parameters decay), and a second run in a folder that holds a finished one."""

import os
import shutil

import pytest
import torch

from hoptune.config import ConfigError
from hoptune.models.tiny import build_model
from hoptune.train import loop, sft
from tests.conftest import SMALL

from .conftest import small_config


def _metrics(run_dir):
    return loop.read_metrics(os.path.join(run_dir, "metrics.jsonl"))


def test_warmup_ratio_rounds_up_as_transformers_does(tmp_path, tokenizer, demo_data):
    # transformers: warmup = ceil(ratio x steps), so 0.1 of 5 steps is one warmup step (round() gave 0:
    # the warmup the config asks for silently skipped)
    cfg = small_config(tmp_path, demo_data, "train.max_steps=5", "train.warmup_ratio=0.1")
    lines = []
    sft.train(cfg, log=lines.append, model=build_model(seed=0, **SMALL), tokenizer=tokenizer)
    assert any("warmup 1," in s for s in lines)
    lrs = [r["lr"] for r in _metrics(cfg.output.dir) if r["split"] == "train"]
    assert lrs[0] == 0.0  # transformers' warmup: step / warmup, from 0
    assert lrs[1] == pytest.approx(1e-3)


def test_dora_magnitude_is_decayed_as_transformers_trainer_does(tmp_path, tokenizer, demo_data, monkeypatch):
    # Trainer.get_decay_parameter_names leaves out biases and norms by name (and LayerNorm layers), not
    # every vector: PEFT's lora_magnitude_vector is decayed under TRL
    groups = []
    build = loop.build_optimizer

    def spy(*a, **k):
        opt = build(*a, **k)
        groups.append(opt.param_groups)
        return opt

    monkeypatch.setattr(loop, "build_optimizer", spy)
    cfg = small_config(
        tmp_path, demo_data, "train.max_steps=1", "train.weight_decay=0.1", "lora.use_dora=true"
    )
    res = sft.train(cfg, log=lambda s: None, model=build_model(seed=0, **SMALL), tokenizer=tokenizer)
    decay = {id(p): g["weight_decay"] for g in groups[0] for p in g["params"]}
    names = dict(res.model.named_parameters())
    magnitudes = [n for n in names if "magnitude" in n and names[n].requires_grad]
    assert magnitudes
    assert all(decay[id(names[n])] == 0.1 for n in magnitudes)
    assert all(decay[id(names[n])] == 0.1 for n in names if n.endswith(("lora_A", "lora_B")))


def test_decay_parameter_names_match_transformers(small_model):
    import torch
    from transformers import Trainer

    class WithLayerNorm(torch.nn.Module):  # a LayerNorm whose name says nothing (GPT-2's ln_1)
        def __init__(self):
            super().__init__()
            self.ln_1 = torch.nn.LayerNorm(4)
            self.proj = torch.nn.Linear(4, 4)
            self.gate = torch.nn.Parameter(torch.zeros(4))

    for model in (small_model, WithLayerNorm()):
        theirs = set(Trainer.get_decay_parameter_names(None, model))
        assert loop.decay_parameter_names(model) == theirs
    assert loop.decay_parameter_names(WithLayerNorm()) == {"proj.weight", "gate"}


@pytest.mark.parametrize("resume", ["auto", "false"])
def test_finished_run_without_checkpoints_is_not_overwritten(tmp_path, tokenizer, demo_data, resume):
    # train.save_every=0 (the default) leaves no checkpoint: a second run in the same folder would train
    # again from scratch and replace the first one's adapter and metrics without a word
    cfg = small_config(tmp_path, demo_data, "train.max_steps=2")
    res = sft.train(cfg, log=lambda s: None, model=build_model(seed=0, **SMALL), tokenizer=tokenizer)
    weights = os.path.join(res.output_dir, "adapter_model.safetensors")
    before = open(weights, "rb").read()
    metrics = open(os.path.join(res.run_dir, "metrics.jsonl"), "rb").read()
    again = small_config(tmp_path, demo_data, "train.max_steps=2", "train.lr=5e-3", f"output.resume={resume}")
    with pytest.raises(ConfigError, match="output.dir"):
        sft.train(again, log=lambda s: None, model=build_model(seed=1, **SMALL), tokenizer=tokenizer)
    assert open(weights, "rb").read() == before
    assert open(os.path.join(res.run_dir, "metrics.jsonl"), "rb").read() == metrics
    assert "lr: 0.001" in open(os.path.join(res.run_dir, "config.yaml")).read()


def test_logged_loss_is_the_mean_since_the_last_log(tmp_path, tokenizer, demo_data, monkeypatch):
    # as transformers' Trainer logs it: the loss of train.log_every=3 is the mean of those three steps,
    # not the last step's alone; a run killed between two logs and resumed logs the same values
    # (and loss_tokens, tokens and tokens_per_s are those of the window's steps: each step timed 0.5 s)
    common = ["train.max_steps=7", "train.log_every=3", "train.save_every=2"]
    counts = []
    real_step = sft.sft_step

    def counted(*a, **k):
        out = real_step(*a, **k)
        counts.append(out[1:])
        return out

    with monkeypatch.context() as m:
        m.setattr(sft, "sft_step", counted)
        m.setattr(loop.Timer, "lap", lambda self: 0.5)
        res = sft.train(
            small_config(tmp_path / "a", demo_data, *common),
            log=lambda s: None,
            model=build_model(seed=0, **SMALL),
            tokenizer=tokenizer,
        )
    train = [r for r in _metrics(res.run_dir) if r["split"] == "train"]
    assert [r["step"] for r in train] == [3, 6, 7]
    losses = res.train_losses
    assert train[0]["loss"] == pytest.approx(sum(losses[0:3]) / 3, rel=1e-12)
    assert train[1]["loss"] == pytest.approx(sum(losses[3:6]) / 3, rel=1e-12)
    assert train[2]["loss"] == pytest.approx(losses[6], rel=1e-12)
    assert len(counts) == 7 and len({c[1] for c in counts}) > 1
    for r, (a, b) in zip(train, [(0, 3), (3, 6), (6, 7)]):
        assert r["loss_tokens"] == sum(c[0] for c in counts[a:b])
        assert r["tokens"] == sum(c[1] for c in counts[a:b])
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / (0.5 * (b - a)), rel=1e-12)

    cfg_b = small_config(tmp_path / "b", demo_data, *common)
    calls = {"n": 0}

    def dies(*a, **k):
        calls["n"] += 1
        if calls["n"] == 6:  # killed in step 6: the checkpoint of step 4 is mid-window (steps 4..6)
            raise KeyboardInterrupt("killed")
        return real_step(*a, **k)

    monkeypatch.setattr(sft, "sft_step", dies)
    with pytest.raises(KeyboardInterrupt):
        sft.train(cfg_b, log=lambda s: None, model=build_model(seed=0, **SMALL), tokenizer=tokenizer)
    monkeypatch.setattr(sft, "sft_step", real_step)
    sft.train(cfg_b, log=lambda s: None, model=build_model(seed=0, **SMALL), tokenizer=tokenizer)
    resumed = [r for r in _metrics(cfg_b.output.dir) if r["split"] == "train"]
    assert [r["step"] for r in resumed] == [3, 6, 7]
    for r, ref in zip(resumed, train):
        assert (r["loss"], r["loss_tokens"], r["tokens"]) == (ref["loss"], ref["loss_tokens"], ref["tokens"])


def _full_config(tmp_path, data, *overrides):
    return small_config(tmp_path, data, "lora.enabled=false", "train.max_steps=1", *overrides)


def test_full_model_is_not_left_half_written(tmp_path, tokenizer, demo_data, monkeypatch):
    # a kill while model/ is written (the only copy of the weights with train.save_every=0) must not
    # leave a model/ folder that looks finished but holds a cut file
    cfg = _full_config(tmp_path, demo_data)
    model = build_model(seed=0, **SMALL)

    def killed(folder, *a, **k):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "model.safetensors"), "wb") as f:
            f.write(b"cut")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(model, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        sft.train(cfg, log=lambda s: None, model=model, tokenizer=tokenizer)
    assert not os.path.exists(os.path.join(cfg.output.dir, "model"))
    # and the run can be started again in that folder, which then holds a whole model
    res = sft.train(cfg, log=lambda s: None, model=build_model(seed=0, **SMALL), tokenizer=tokenizer)
    assert os.path.isfile(os.path.join(res.output_dir, "config.json"))
    assert [n for n in os.listdir(res.run_dir) if n.startswith(".tmp")] == []


def test_finished_full_run_started_again_keeps_its_model(tmp_path, tokenizer, demo_data, monkeypatch):
    cfg = _full_config(tmp_path, demo_data, "train.save_every=1")
    res = sft.train(cfg, log=lambda s: None, model=build_model(seed=0, **SMALL), tokenizer=tokenizer)
    weights = os.path.join(res.output_dir, "model.safetensors")
    before = open(weights, "rb").read()
    model = build_model(seed=0, **SMALL)

    def killed(folder, *a, **k):
        with open(os.path.join(folder, "model.safetensors"), "wb") as f:
            f.write(b"cut")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(model, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):  # the finished run writes its model again, and is killed
        sft.train(cfg, log=lambda s: None, model=model, tokenizer=tokenizer)
    assert open(weights, "rb").read() == before


def test_a_peft_model_is_refused_not_nested(tmp_path, tokenizer, demo_data):
    # a PeftModel passed to train() got hoptune's LoRA inside PEFT's (on lora_A, lora_B and base_layer),
    # trained and saved under names no loader reads
    import peft

    model = peft.get_peft_model(
        build_model(seed=0, **SMALL), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    cfg = small_config(tmp_path, demo_data, "train.max_steps=1", "lora.r=2")
    with pytest.raises(ValueError, match="holds PEFT layers.*hoptune.load_adapter"):
        sft.train(cfg, log=lambda s: None, model=model, tokenizer=tokenizer)
    assert not os.path.exists(os.path.join(cfg.output.dir, "adapter"))


def _adapter_base(res):
    import json

    with open(os.path.join(res.output_dir, "adapter_config.json")) as f:
        return json.load(f)["base_model_name_or_path"]


def test_adapter_of_a_passed_model_names_that_model_as_its_base(tmp_path, tokenizer, demo_data):
    # model.path at its default (hoptune/tiny) named the built-in model as the base of an adapter
    # trained on another one: AutoPeftModelForCausalLM would load the wrong base under it
    model = build_model(seed=0, **SMALL)
    model.config.name_or_path = "/models/my-llama"
    lines = []
    cfg = small_config(tmp_path / "a", demo_data, "train.max_steps=1")
    res = sft.train(cfg, log=lines.append, model=model, tokenizer=tokenizer)
    assert _adapter_base(res) == "/models/my-llama"  # as PEFT's get_peft_model records it
    assert any(s.startswith("model: /models/my-llama on cpu") for s in lines)
    # a model without a name: no base is better than a wrong one; a path the config names is the base
    assert sft.base_model_name(cfg, build_model(seed=0, **SMALL)) is None
    explicit = small_config(tmp_path / "b", demo_data, f"model.path={tmp_path}")
    assert sft.base_model_name(explicit, model) == str(tmp_path)
    assert sft.base_model_name(cfg) == "hoptune/tiny"  # (the built-in model, loaded by the recipe)


def test_full_finetuning_of_a_model_with_lora_layers_is_refused(tmp_path, tokenizer, demo_data):
    # lora.enabled=false trained every weight of a model with LoRA layers, then saved the LoRA factors
    # alone (checkpoints too): the base weights' training was lost, and a resume did not bring it back
    from hoptune.patch import apply_lora

    model = apply_lora(build_model(seed=0, **SMALL), r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    cfg = _full_config(tmp_path, demo_data, "train.save_every=1")
    with pytest.raises(ValueError, match=r"lora.enabled=false.*LoRA layers.*merge_and_unload"):
        sft.train(cfg, log=lambda s: None, model=model, tokenizer=tokenizer)
    assert not os.path.exists(cfg.output.dir)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora" not in n)


def test_an_nf4_model_keeps_its_own_double_quant_without_a_warning(tmp_path, tokenizer, demo_data):
    # a base quantized without double quantization (a bitsandbytes checkpoint saved so, which
    # load_model keeps as stored) trained under the default config warned that the config's
    # double_quant=true was not used: a warning about a setting the user never made
    import warnings

    from hoptune.nn import NF4Linear

    model = build_model(seed=0, **SMALL)
    for mod in list(model.modules()):
        for child, sub in list(mod.named_children()):
            if isinstance(sub, torch.nn.Linear) and child != "lm_head":
                setattr(mod, child, NF4Linear.from_linear(sub, double_quant=False))
    cfg = small_config(tmp_path, demo_data, "train.max_steps=1", "model.quantize=nf4")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        sft.train(cfg, log=lambda s: None, model=model, tokenizer=tokenizer)
    assert all(not m.weight_nf4.nested for m in model.modules() if isinstance(m, NF4Linear))


TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@pytest.mark.parametrize("lora", [True, False])
def test_the_output_holds_the_tokenizer_with_the_template_it_trained(tmp_path, tokenizer, demo_data, lora):
    # with model.chat_template the run trained on chats in that format, but its adapter folder held no
    # tokenizer and the full model's the tokenizer's own template: whoever loads the result chats in
    # another format than the one trained (TRL saves its tokenizer with the template it set)
    import json

    from transformers import AutoTokenizer

    overrides = [f"model.chat_template={json.dumps(TEMPLATE)}", "train.max_steps=1"]
    if not lora:
        overrides += ["lora.enabled=false", "model.quantize=null"]
    cfg = small_config(tmp_path, demo_data, *overrides)
    own = tokenizer.chat_template
    res = sft.train(cfg, log=lambda s: None, model=build_model(seed=0, **SMALL), tokenizer=tokenizer)
    assert os.path.basename(res.output_dir) == ("adapter" if lora else "model")
    saved = AutoTokenizer.from_pretrained(res.output_dir)
    assert saved.chat_template == TEMPLATE
    assert saved.get_vocab() == tokenizer.get_vocab()
    assert tokenizer.chat_template == own  # the tokenizer passed in is left as it was


def test_the_log_gives_the_rows_a_step_takes_from_a_small_dataset(tmp_path, tokenizer, demo_data):
    """3 rows, 4 x 2 a step: a step takes the 3 rows once, and the log says 3, not 8."""
    from hoptune.data import demo_task

    from .conftest import write_jsonl

    train = write_jsonl(tmp_path / "three.jsonl", demo_task.sft_records(demo_task.split_pairs()[0][:3]))
    cfg = small_config(tmp_path, {**demo_data, "train": train}, "train.max_steps=1")
    lines = []
    sft.train(cfg, log=lines.append, model=build_model(seed=0, **SMALL), tokenizer=tokenizer)
    assert any(s.startswith("training: 1 steps x 3 rows (4 x 2 accumulation) from 3 rows") for s in lines)


def test_the_data_log_says_what_is_held_out(tmp_path, tokenizer, demo_data):
    """data.eval_fraction's split was not logged, and data.eval naming data.train's file (an eval loss
    on training rows) went unsaid."""
    cfg = small_config(tmp_path, demo_data, "data.eval=null", "data.eval_fraction=0.25")
    lines = []
    train, evals, _ = sft.load_data(cfg, tokenizer, log=lines.append)
    assert (
        evals
        and f"data.eval_fraction=0.25: {len(evals)} of the {len(train) + len(evals)} examples held out for eval"
        in lines
    )
    assert not [s for s in lines if "same file" in s]
    lines = []
    cfg = small_config(tmp_path, demo_data, f"data.eval={demo_data['train']}")
    sft.load_data(cfg, tokenizer, log=lines.append)
    assert [s for s in lines if s.startswith("warning: data.eval is the same file as data.train")]


@pytest.mark.parametrize("packing", [False, True])
def test_examples_beyond_the_models_positions_are_warned_of(tmp_path, tokenizer, demo_data, packing):
    """An example longer than the model's max_position_embeddings trained at positions the model
    never saw, without a word. A packed row's positions restart at each document, so the longest
    document counts there, not the row."""
    cfg = small_config(tmp_path, demo_data, "train.max_steps=1", "data.eval=null", f"data.packing={packing}")
    rows, _, _ = sft.load_data(cfg, tokenizer, log=lambda *_: None)
    docs = [max(r.position_ids) + 1 if r.position_ids else len(r) for r in rows]
    if packing:
        assert max(docs) < max(len(r) for r in rows)  # (rows of several documents)
    for n, said in ((10**6, False), (max(docs) - 1, True), (max(docs), False)):
        model = build_model(seed=0, **SMALL)
        model.config.max_position_embeddings = n
        lines = []
        sft.train(cfg, log=lines.append, model=model, tokenizer=tokenizer)
        warned = [s for s in lines if "max_position_embeddings" in s]
        assert warned == (
            [
                f"warning: the data has examples of up to {max(docs)} tokens, beyond the "
                f"max_position_embeddings={n} of the model passed in: the model was not trained at those "
                f"positions; lower data.max_seq_len to {n} unless the model is known to hold good beyond it"
            ]
            if said
            else []
        ), n
        shutil.rmtree(cfg.output.dir)


def test_step_loss_of_text_rows_counts_the_predicted_tokens():
    """Text records train on every token, the first included in their mask: the loss still counts
    only the tokens a position predicts (mask[1:], T - 1 per row), as TRL's shifted labels do, over
    every micro-batch of the step."""
    from hoptune.data import collate
    from hoptune.data.formatting import Example
    from hoptune.data.packing import rows_from_examples

    torch.manual_seed(0)
    model = build_model(seed=0, **SMALL).float().eval()
    g = torch.Generator().manual_seed(1)
    lengths = [[7, 4], [9]]
    micro = [
        collate(
            rows_from_examples(
                [Example(torch.randint(3, 60, (t,), generator=g).tolist(), [1] * t) for t in mb]
            ),
            0,
        )
        for mb in lengths
    ]
    loss, n_loss, tokens = sft.sft_step(model, micro, torch.device("cpu"))
    assert n_loss == (7 - 1) + (4 - 1) + (9 - 1) and tokens == 7 + 4 + 9
    total = 0.0
    with torch.no_grad():
        for mb, b in zip(lengths, micro):
            lp = torch.log_softmax(
                model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double(), -1
            )
            for i, t in enumerate(mb):
                ids = b["input_ids"][i, :t]
                total -= float(lp[i, : t - 1].gather(1, ids[1:, None]).sum())
    assert loss == pytest.approx(total / n_loss, rel=1e-5)
