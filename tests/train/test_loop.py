import json
import os

import pytest
import torch

from hoptune._io import STAGE_PREFIX
from hoptune.train import loop


def test_lr_schedule_warmup_cosine():
    s = loop.LRSchedule(total_steps=110, warmup_steps=10, kind="cosine", min_ratio=0.1)
    assert s(0) == 0.0
    assert s(9) == pytest.approx(9 / 10)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)
    assert loop.LRSchedule(10, 0, "linear")(5) == pytest.approx(0.5)
    assert loop.LRSchedule(10, 2, "constant")(7) == 1.0


@pytest.mark.parametrize(
    ("kind", "total", "warmup", "min_ratio"),
    [
        ("linear", 20, 5, 0.0),
        ("cosine", 20, 5, 0.0),
        ("cosine", 17, 3, 0.1),
        ("constant", 12, 4, 0.0),
        ("linear", 10, 0, 0.0),
        ("cosine", 7, 1, 0.0),
        ("cosine", 34, 2, 0.0),  # (warmup_ratio=0.03 of 34 steps, rounded up as transformers does)
    ],
)
def test_lr_schedule_matches_transformers(kind, total, warmup, min_ratio):
    """The lr of every step, warmup included (it was (step + 1) / (warmup + 1), not transformers'
    step / warmup), is the one transformers' schedule (TRL's) gives with the same settings."""
    from transformers import get_scheduler

    def lrs(make):
        p = torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.SGD([p], lr=1.0)
        sch = make(opt)
        out = []
        for _ in range(total):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sch.step()
        return out

    name = "cosine_with_min_lr" if min_ratio else kind + ("_with_warmup" if kind == "constant" else "")
    extra = {"scheduler_specific_kwargs": {"min_lr_rate": min_ratio}} if min_ratio else {}
    theirs = lrs(lambda opt: get_scheduler(name, opt, warmup, total, **extra))
    ours = lrs(lambda opt: loop.build_scheduler(opt, total, warmup, kind, min_ratio))
    assert ours == pytest.approx(theirs, abs=1e-12)
    assert ours[0] == (0.0 if warmup else 1.0)


def test_checkpoint_of_the_earlier_warmup_resumes_on_it(tmp_path, small_model):
    """A checkpoint whose schedule was saved before it matched transformers' warmup resumes on the
    warmup it started with: the rest of its run goes on at the lrs it would have had."""
    model = _lora_model(small_model)
    params = loop.trainable_parameters(model)

    def run(sch, opt, n):
        out = []
        for _ in range(n):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sch.step()
        return out

    opt = loop.build_optimizer(params, 1.0)
    sch = loop.build_scheduler(opt, 20, 8)
    sch.lr_lambdas[0].warmup_from_zero = False  # the earlier schedule
    run(sch, opt, 3)
    ck = loop.Checkpointer(tmp_path)
    folder = ck.save(3, model, opt, sch, {"step": 3})
    pt = os.path.join(folder, loop.STATE_FILE)
    blob = torch.load(pt, map_location="cpu", weights_only=False)
    del blob["scheduler"]["lr_lambdas"][0]["warmup_from_zero"]  # (the earlier version saved no such field)
    torch.save(blob, pt)
    expected = run(sch, opt, 6)
    assert expected[0] == pytest.approx(4 / 9)  # (step + 1) / (warmup + 1)
    opt2 = loop.build_optimizer(params, 1.0)
    sch2 = loop.build_scheduler(opt2, 20, 8)
    loop.Checkpointer.load(folder, model, opt2, sch2, restore_rng=False)
    assert run(sch2, opt2, 6) == pytest.approx(expected)
    # a checkpoint of this version keeps transformers' warmup
    opt3 = loop.build_optimizer(params, 1.0)
    sch3 = loop.build_scheduler(opt3, 20, 8)
    run(sch3, opt3, 3)
    folder = ck.save(3, model, opt3, sch3, {"step": 3})
    opt4 = loop.build_optimizer(params, 1.0)
    sch4 = loop.build_scheduler(opt4, 20, 8)
    loop.Checkpointer.load(folder, model, opt4, sch4, restore_rng=False)
    assert run(sch4, opt4, 2) == pytest.approx([3 / 8, 4 / 8])


def test_scheduler_state_round_trip():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = loop.build_optimizer([("p", p)], lr=1.0)
    sch = loop.build_scheduler(opt, 100, 5)
    for _ in range(7):
        opt.step()
        sch.step()
    opt2 = loop.build_optimizer([("p", p)], lr=1.0)
    sch2 = loop.build_scheduler(opt2, 100, 5)
    sch2.load_state_dict(sch.state_dict())
    assert sch2.get_last_lr() == sch.get_last_lr()


def test_no_weight_decay_on_vectors():
    w = torch.nn.Parameter(torch.zeros(3, 3))
    b = torch.nn.Parameter(torch.zeros(3))
    opt = loop.build_optimizer([("w", w), ("b", b)], lr=1.0, weight_decay=0.1)
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays[id(w)] == 0.1 and decays[id(b)] == 0.0


def _lora_model(small_model):
    from hoptune.patch import apply_lora

    return apply_lora(small_model, r=2, alpha=4)


def test_checkpoint_interrupted_mid_write_keeps_previous(tmp_path, small_model, monkeypatch):
    model = _lora_model(small_model)
    params = loop.trainable_parameters(model)
    opt = loop.build_optimizer(params, 1e-2)
    sch = loop.build_scheduler(opt, 10)
    ck = loop.Checkpointer(tmp_path, keep=2)
    first = ck.save(1, model, opt, sch, {"step": 1})
    a1 = {n: p.detach().clone() for n, p in params}

    with torch.no_grad():
        for _, p in params:
            p.add_(1.0)
    real_save = torch.save

    def crash(obj, path, *a, **k):  # dies half-way through writing the state file
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ck.save(2, model, opt, sch, {"step": 2})
    monkeypatch.setattr(torch, "save", real_save)

    assert ck.latest() == first
    assert not os.path.exists(os.path.join(ck.dir, "step-00000002"))
    state = loop.Checkpointer.load(first, model, opt, sch)
    assert state == {"step": 1}
    for n, p in params:
        assert torch.equal(p.detach(), a1[n]), n

    # a temporary folder left by a process killed outright is ignored, then cleaned by the next save
    os.makedirs(os.path.join(ck.dir, ".tmp-step-00000003-x", "adapter"))
    assert ck.latest() == first
    ck.save(3, model, opt, sch, {"step": 3})
    assert not [n for n in os.listdir(ck.dir) if n.startswith(".tmp-")]
    assert os.path.basename(ck.latest()) == "step-00000003"


def test_checkpoint_cleans_a_pointer_file_left_by_a_kill(tmp_path, small_model):
    """A kill while ``latest`` is rewritten leaves the pointer's temporary file (a file, not a
    folder): the next save removes it as it removes leftover folders."""
    model = _lora_model(small_model)
    opt = loop.build_optimizer(loop.trainable_parameters(model), 1e-2)
    ck = loop.Checkpointer(tmp_path, keep=2)
    ck.save(1, model, opt, None, {"step": 1})
    with open(os.path.join(ck.dir, ".tmp-abcd1234-latest"), "w") as f:
        f.write("step-0000")
    ck.save(2, model, opt, None, {"step": 2})
    assert not [n for n in os.listdir(ck.dir) if n.startswith(".tmp-")]
    assert os.path.basename(ck.latest()) == "step-00000002"


def test_checkpoint_keeps_the_newest(tmp_path, small_model):
    model = _lora_model(small_model)
    opt = loop.build_optimizer(loop.trainable_parameters(model), 1e-2)
    ck = loop.Checkpointer(tmp_path, keep=2)
    for s in (1, 2, 3, 3):  # the same step twice replaces it
        ck.save(s, model, opt, None, {"step": s})
    assert sorted(n for n in os.listdir(ck.dir) if n.startswith("step-")) == [
        "step-00000002",
        "step-00000003",
    ]
    with open(os.path.join(ck.latest(), loop.STATE_JSON)) as f:
        assert json.load(f)["step"] == 3
    assert os.path.isfile(os.path.join(ck.latest(), "adapter", "adapter_model.safetensors"))


def test_checkpoint_pruning_killed_midway_leaves_only_whole_checkpoints(tmp_path, small_model, monkeypatch):
    """A kill while an old checkpoint is being deleted leaves no step folder with part of its files
    (it would look complete to a resume that names it); the next save removes what is left."""
    import shutil

    model = _lora_model(small_model)
    opt = loop.build_optimizer(loop.trainable_parameters(model), 1e-2)
    ck = loop.Checkpointer(tmp_path, keep=1)
    ck.save(1, model, opt, None, {"step": 1})
    whole = sorted(
        os.path.relpath(os.path.join(r, f), ck.latest()) for r, _, fs in os.walk(ck.latest()) for f in fs
    )
    real_rmtree = shutil.rmtree

    def killed(path, *a, **k):  # deletes one file, then the process dies
        if STAGE_PREFIX in os.fspath(path):  # (save_adapter's staging folder: not the pruning)
            return real_rmtree(path, *a, **k)
        for r, _, fs in os.walk(path):
            if fs:
                os.remove(os.path.join(r, fs[0]))
                break
        raise KeyboardInterrupt

    monkeypatch.setattr(loop.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        ck.save(2, model, opt, None, {"step": 2})
    monkeypatch.setattr(loop.shutil, "rmtree", real_rmtree)
    steps = [n for n in os.listdir(ck.dir) if n.startswith("step-")]
    assert steps == ["step-00000002"]
    for n in steps:
        d = os.path.join(ck.dir, n)
        assert sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs) == whole
    ck.save(3, model, opt, None, {"step": 3})
    assert sorted(os.listdir(ck.dir)) == [loop.LATEST, "step-00000003"]


def test_checkpoint_cleanup_keeps_the_one_just_written(tmp_path, small_model):
    """A run resumed from an earlier checkpoint: its next save is the newest checkpoint on disk and
    ``latest`` points at it, whatever checkpoints of later steps the first run left."""
    model = _lora_model(small_model)
    opt = loop.build_optimizer(loop.trainable_parameters(model), 1e-2)

    def on_disk(ck):
        return sorted(n for n in os.listdir(ck.dir) if n.startswith("step-"))

    ck = loop.Checkpointer(tmp_path / "a", keep=3)
    for s in (2, 4, 6):
        ck.save(s, model, opt, None, {"step": s})
    loop.Checkpointer(tmp_path / "a", keep=1).save(4, model, opt, None, {"step": 4})
    assert on_disk(ck) == ["step-00000004"]
    assert os.path.basename(ck.latest()) == "step-00000004"

    ck = loop.Checkpointer(tmp_path / "b", keep=4)
    for s in (2, 4, 6, 8):
        ck.save(s, model, opt, None, {"step": s})
    loop.Checkpointer(tmp_path / "b", keep=2).save(4, model, opt, None, {"step": 4})
    assert on_disk(ck) == ["step-00000002", "step-00000004"]
    assert os.path.basename(ck.latest()) == "step-00000004"
    assert loop.Checkpointer.read_state(ck.latest()) == {"step": 4}


def test_metrics_resume_drops_later_lines(tmp_path):
    path = tmp_path / "m.jsonl"
    m = loop.MetricsLog(path, tensorboard=False)
    for s in range(1, 6):
        m.log(s, "train", {"loss": 1.0 / s})
    m.close()
    m = loop.MetricsLog(path, tensorboard=False, resume_step=3)
    m.log(4, "train", {"loss": 0.0})
    m.close()
    assert [r["step"] for r in loop.read_metrics(path)] == [1, 2, 3, 4]
    m = loop.MetricsLog(path, tensorboard=False)  # a fresh run starts a fresh file
    m.close()
    assert loop.read_metrics(path) == []


def test_tensorboard_mirror_drops_later_steps_on_resume(tmp_path, monkeypatch):
    """TensorBoard keeps the event files of the interrupted run: the writer of a resumed run must
    purge what was logged after the checkpoint, as metrics.jsonl does, or TensorBoard shows those
    steps twice. A fresh run purges the earlier run's points."""
    import sys
    import types

    made = []

    class Writer:
        def __init__(self, log_dir, **kwargs):
            made.append(kwargs)

        def add_scalar(self, *a, **k):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    loop.MetricsLog(tmp_path / "m.jsonl", tensorboard=True, resume_step=10).close()
    loop.MetricsLog(tmp_path / "m.jsonl", tensorboard=True).close()
    assert [k.get("purge_step") for k in made] == [11, 0]


def test_plots(tmp_path):
    import matplotlib  # noqa: F401

    path = tmp_path / "m.jsonl"
    m = loop.MetricsLog(path, tensorboard=False)
    for s in range(1, 6):
        m.log(s, "train", {"loss": 1.0 / s, "lr": 1e-3, "tokens_per_s": 100.0, "grad_norm": 1.0})
    m.log(5, "eval", {"loss": 0.3})
    m.close()
    files, note = loop.plot_metrics(path, tmp_path / "plots")
    assert note is None and {os.path.basename(f) for f in files} == {
        "loss.png",
        "lr.png",
        "tokens_per_s.png",
        "grad_norm.png",
    }
    assert all(open(f, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for f in files)


def test_resolve_device_and_dtype():
    assert loop.resolve_device("cpu").type == "cpu"
    assert loop.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert loop.resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of"):
        loop.resolve_dtype("fp8", torch.device("cpu"))


def test_resolve_device_refuses_absent_mps_and_xpu(monkeypatch):
    # they passed here and failed at the model's first move, with a traceback instead of a config error
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="'mps' asked for, but .* no MPS device"):
        loop.resolve_device("mps")
    if hasattr(torch, "xpu"):
        monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    with pytest.raises(ValueError, match="'xpu:0' asked for, but .* no XPU device"):
        loop.resolve_device("xpu:0")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert loop.resolve_device("mps") == torch.device("mps")


def test_resolve_device_names_the_visible_gpus(monkeypatch):
    """cuda:N beyond the visible GPUs fails at once, naming how many there are."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert loop.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"'cuda:2'.*only 2 CUDA device\(s\).*cuda:0 to cuda:1"):
        loop.resolve_device("cuda:2")
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    loop.use_device(torch.device("cuda", 1))
    loop.use_device(torch.device("cuda"))  # no index: the current device stays
    loop.use_device(torch.device("cpu"))
    assert calls == [torch.device("cuda", 1)]


def test_activation_checkpointing_is_active(small_model):
    """Through the decoder-only forward the trainer uses, each layer runs again in the backward,
    and the gradients are those of the plain run."""
    from hoptune.patch import apply_lora

    model = apply_lora(small_model, r=2, alpha=4, init_lora_weights=False)
    model.train()
    ids = torch.randint(10, 60, (2, 9))
    batch = {"input_ids": ids, "loss_mask": torch.ones_like(ids, dtype=torch.bool)}
    calls = []
    mlp = model.model.layers[0].mlp
    real_forward = mlp.forward

    def counting_forward(*a, **k):  # (module hooks are not re-run by the recompute; forward is)
        calls.append(1)
        return real_forward(*a, **k)

    mlp.forward = counting_forward

    def grads():
        calls.clear()
        lp, _ = loop.batch_logprobs(model, batch)
        (-lp.mean()).backward()
        g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return g, len(calls)

    with torch.no_grad():  # (the first batch of a model checks its output path: a forward of its own)
        loop.batch_logprobs(model, batch)
    g_plain, n_plain = grads()
    loop.enable_gradient_checkpointing(model)
    g_ckpt, n_ckpt = grads()
    del mlp.forward
    assert (n_plain, n_ckpt) == (1, 2)
    for n in g_plain:
        torch.testing.assert_close(g_ckpt[n], g_plain[n])


def test_uncheckpointed_layers_keep_their_activations(small_model):
    """enable_gradient_checkpointing(model, n): the last n decoder layers run once (no recompute),
    the others twice, and the gradients are those of the fully checkpointed run; n can change
    between steps; a count outside 0..layers, or checkpointing never enabled, is refused."""
    from hoptune.patch import apply_lora

    model = apply_lora(small_model, r=2, alpha=4, init_lora_weights=False)
    model.train()
    layers = loop.decoder_layers(model)
    assert len(layers) == 2
    with pytest.raises(ValueError, match="enable checkpointing first"):
        loop.set_uncheckpointed_layers(model, 1)
    ids = torch.randint(10, 60, (2, 9))
    batch = {"input_ids": ids, "loss_mask": torch.ones_like(ids, dtype=torch.bool)}
    calls = {0: 0, 1: 0}
    for i, layer in enumerate(layers):
        real = layer.mlp.forward

        def counting(*a, _i=i, _real=real, **k):
            calls[_i] += 1
            return _real(*a, **k)

        layer.mlp.forward = counting

    def grads():
        calls.update({0: 0, 1: 0})
        lp, _ = loop.batch_logprobs(model, batch)
        (-lp.mean()).backward()
        g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return g, dict(calls)

    assert loop.enable_gradient_checkpointing(model) == 2
    with torch.no_grad():  # (the first batch of a model checks its output path: a forward of its own)
        loop.batch_logprobs(model, batch)
    g_all, n_all = grads()
    assert loop.set_uncheckpointed_layers(model, 1) == 1
    g_one, n_one = grads()
    assert loop.set_uncheckpointed_layers(model, 2) == 0
    g_none, n_none = grads()
    assert (n_all, n_one, n_none) == ({0: 2, 1: 2}, {0: 2, 1: 1}, {0: 1, 1: 1})
    assert loop.enable_gradient_checkpointing(model, 1) == 1
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]
    for n in g_all:
        torch.testing.assert_close(g_one[n], g_all[n])
        torch.testing.assert_close(g_none[n], g_all[n])
    for bad in (3, -1, 1.5, True):
        with pytest.raises(ValueError, match="uncheckpointed layers"):
            loop.set_uncheckpointed_layers(model, bad)
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]  # (left as it was)


@pytest.mark.parametrize(
    "family,over",
    [
        ("GraniteForCausalLM", {"logits_scaling": 8.0}),  # logits / logits_scaling
        ("CohereForCausalLM", {"logit_scale": 0.25}),  # logits * logit_scale
        ("Gemma2ForCausalLM", {"final_logit_softcapping": 3.0, "head_dim": 16}),
        ("HyperCLOVAXForCausalLM", {"logits_scaling": 0.25}),  # logits * logits_scaling
        # soft-capped under its own key (its logits were taken as they come out of the head)
        ("RecurrentGemmaForCausalLM", {"logits_soft_cap": 1.0, "lru_width": 64, "attention_window_size": 8}),
        # get_decoder() is its output layer, and its logits come through a prediction head before it
        # (a TypeError of Linear.forward, or the head left out)
        (
            "ModernBertDecoderForCausalLM",
            dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2),
        ),
        (
            "FalconH1ForCausalLM",  # logits * lm_head_multiplier
            dict(
                lm_head_multiplier=0.25,
                mamba_d_ssm=64,
                mamba_n_heads=4,
                mamba_d_head=16,
                mamba_d_state=16,
                mamba_n_groups=1,
                mamba_chunk_size=16,
            ),
        ),
    ],
)
def test_batch_logprobs_follows_the_architectures_logits(family, over):
    """The output head's log-probs equal log_softmax of the model's own logits for architectures
    that scale or soft-cap them."""
    import transformers

    model_cls = getattr(transformers, family, None)
    if model_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {family}")
    cfg_cls = getattr(transformers, family.replace("ForCausalLM", "Config"))
    cfg = cfg_cls(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        **over,
    )
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        lp, labels = loop.batch_logprobs(
            model, {"input_ids": ids, "loss_mask": torch.ones_like(ids, dtype=torch.bool)}
        )
        ref = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)
    ref = ref.reshape(-1, 300).gather(1, labels[:, None]).squeeze(1)
    assert (lp - ref).abs().max().item() < 1e-4
    # (by the output layer where the model has one on its decoder, not through the check's fallback)
    assert loop._HEAD_PATH_OK.get(model) is not False


def test_full_fine_tuning_checkpoint_of_other_shapes_is_refused(tmp_path, small_model):
    """A full fine-tuning checkpoint whose tensors do not have the model's shapes is a ValueError
    naming the tensor and both shapes (it was a bare copy_ error, or a silent broadcast of a
    size-1 tensor), and the model is left unchanged."""
    from safetensors.torch import save_file

    from hoptune.models.tiny import build_model
    from tests.conftest import SMALL

    model = small_model.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    other = build_model(seed=1, **{**SMALL, "intermediate_size": 192}).requires_grad_(True)
    loop.save_trainable(other, str(tmp_path / "a"))
    with pytest.raises(
        ValueError, match=r"down_proj.weight' has shape \(64, 192\), the model's is \(64, 128\)"
    ):
        loop.load_trainable(model, str(tmp_path / "a"))
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    state["model.norm.weight"] = torch.full((1,), 3.0)  # would broadcast into (64,)
    os.makedirs(tmp_path / "b")
    save_file(state, str(tmp_path / "b" / loop.WEIGHTS_FILE))
    with pytest.raises(ValueError, match=r"model.norm.weight.*\(1,\).*\(64,\)"):
        loop.load_trainable(model, str(tmp_path / "b"))
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), n


def test_checkpoint_replaced_at_the_same_step_survives_an_interrupt(tmp_path, small_model, monkeypatch):
    """Saving a step that is on disk already moves the old folder aside, then renames the new one in:
    Ctrl-C between the two renames puts the old one back (with keep=1 it is the only checkpoint)."""
    model = _lora_model(small_model)
    opt = loop.build_optimizer(loop.trainable_parameters(model), 1e-2)
    ck = loop.Checkpointer(tmp_path, keep=1)
    first = ck.save(3, model, opt, None, {"step": 3})
    real_replace = os.replace

    def killed(src, dst):
        if os.path.basename(os.fspath(src)).startswith(".tmp-step-"):
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        ck.save(3, model, opt, None, {"step": 3, "again": True})
    monkeypatch.setattr(os, "replace", real_replace)
    assert ck.latest() == first
    assert loop.Checkpointer.read_state(first) == {"step": 3}
    assert os.path.isfile(os.path.join(first, "adapter", "adapter_model.safetensors"))


def test_checkpoint_pruning_touches_only_its_own_folders(tmp_path, small_model):
    """Only ``step-<digits>`` folders are checkpoints: a copy the user keeps beside them (say
    ``step-00000002-best``) is neither pruned nor taken for the newest checkpoint."""
    import shutil

    model = _lora_model(small_model)
    opt = loop.build_optimizer(loop.trainable_parameters(model), 1e-2)
    ck = loop.Checkpointer(tmp_path, keep=1)
    shutil.copytree(ck.save(2, model, opt, None, {"step": 2}), os.path.join(ck.dir, "step-00000002-best"))
    for s in (4, 6):
        ck.save(s, model, opt, None, {"step": s})
    assert sorted(n for n in os.listdir(ck.dir) if n.startswith("step-")) == [
        "step-00000002-best",
        "step-00000006",
    ]
    os.remove(os.path.join(ck.dir, loop.LATEST))
    assert os.path.basename(ck.latest()) == "step-00000006"


def test_tiny_model_and_its_pretraining_leave_the_callers_rngs_alone(monkeypatch):
    """build_model and pretrain seed their own generators: the caller's python, numpy and torch
    RNGs are as they were, and no GPU generator is reseeded (on a GPU, torch.manual_seed reseeds
    every device, which fork_rng(devices=[]) does not restore: a run that pretrained the tiny model
    first drew its LoRA init and dropout from seed 0 instead of train.seed)."""
    import random

    import numpy as np

    from hoptune.models.pretrain import pretrain
    from hoptune.models.tiny import build_model

    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeded.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", seeded.append)
    loop.seed_everything(7)
    want = (random.random(), float(np.random.rand()), float(torch.rand(())))
    loop.seed_everything(7)
    seeded.clear()
    a = build_model(seed=3)
    pretrain(steps=1, progress=False)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == want
    assert seeded == []
    b = build_model(seed=3)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names fsynced files through /proc")
def test_pretrained_tiny_cache_is_on_disk_before_its_rename(tmp_path, monkeypatch):
    """The cached tiny model is renamed into place only once its files are fsynced: after a power
    cut, the renamed folder could otherwise hold empty files that every later load fails on."""
    from hoptune.models import pretrain

    monkeypatch.setenv("HOPTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(pretrain.RECIPE, "steps", 2)
    synced, at_rename = set(), {}
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.add(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        at_rename[os.fspath(dst)] = set(synced)
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    final = pretrain.pretrained_tiny_path(log=lambda s: None, progress=False)
    assert set(os.listdir(final)) - at_rename[final] == set()


def test_rng_state_of_a_machine_with_more_gpus(monkeypatch):
    """A checkpoint saved where 8 GPUs were visible resumes where 1 is: the states of the devices
    seen here come back (torch.cuda.set_rng_state_all failed with an IndexError on device 1)."""
    state = loop.rng_state()
    state["cuda"] = [torch.full((8,), i, dtype=torch.uint8) for i in range(8)]
    restored = []

    def set_one(s, device="cuda"):
        if device >= 1:
            raise IndexError("tuple index out of range")
        restored.append((int(s[0]), device))

    def set_all(states):
        for i, s in enumerate(states):
            set_one(s, i)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_one)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)
    loop.set_rng_state(state)
    assert restored == [(0, 0)]


def test_resolve_device_without_a_gpu_names_the_callers_setting(monkeypatch):
    """cuda on a machine without a GPU: the SFT recipe's message names model.device; a caller with
    another setting (a benchmark's --device) has the message name that one instead, or none."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        ValueError, match=r"'cuda' asked for, but no CUDA device is visible; use model.device=cpu"
    ):
        loop.resolve_device("cuda")
    with pytest.raises(ValueError, match="no CUDA device is visible; use --device cpu$"):
        loop.resolve_device("cuda", setting="--device")
    with pytest.raises(ValueError, match="no CUDA device is visible$") as e:
        loop.resolve_device("cuda:0", setting=None)
    assert "model.device" not in str(e.value)


def test_loop_gc_freezes_collects_between_steps_and_gives_back():
    import gc

    gc.collect()
    before = gc.get_freeze_count()  # (0, unless the environment froze objects at its start)
    keep = [[] for _ in range(1000)]  # (new objects, tracked by the collector)
    seen = []

    def record(phase, info):
        if phase == "start":
            seen.append(info["generation"])

    with loop.LoopGc(full_every=3) as lgc:
        assert lgc.active and not gc.isenabled()
        assert gc.get_freeze_count() >= before + len(keep)
        gc.callbacks.append(record)
        try:
            for _ in range(200):  # no automatic collection inside a step, however many objects
                cycle = []
                cycle.append(cycle)
            del cycle
            assert seen == []
            for _ in range(6):
                lgc.step()
        finally:
            gc.callbacks.remove(record)
    assert seen == [1, 1, 2, 1, 1, 2]  # young between steps, all but the frozen every full_every
    assert gc.isenabled() and gc.get_freeze_count() == 0 and not lgc.active
    lgc.step()  # (after the loop: nothing)


def test_loop_gc_gives_back_on_an_error_freezes_beside_an_earlier_freeze_and_not_with_the_collector_off():
    """Objects already frozen (an environment's own gc.freeze) do not stop it: the loop's objects
    are frozen too, and all are given back after it (Python has no partial unfreeze)."""
    import gc

    gc.freeze()
    try:
        before = gc.get_freeze_count()
        keep = [[] for _ in range(1000)]  # (new objects, tracked by the collector)
        with pytest.raises(RuntimeError, match="a failing step"):
            with loop.LoopGc():
                assert gc.get_freeze_count() >= before + len(keep) and not gc.isenabled()
                raise RuntimeError("a failing step")
        assert gc.get_freeze_count() == 0 and gc.isenabled()
    finally:
        gc.unfreeze()
    gc.disable()
    try:
        with loop.LoopGc() as lgc:
            assert not lgc.active and gc.get_freeze_count() == 0
            lgc.step()
        assert not gc.isenabled()  # (left as it was)
    finally:
        gc.enable()
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="full_every must be an integer >= 1"):
            loop.LoopGc(full_every=bad)


def _respell(src, dst, old: bytes, new: bytes) -> None:
    """A copy of the torch.save file ``src`` whose pickle names ``new`` where it named ``old``."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info, data.replace(old, new) if info.filename.endswith("data.pkl") else data)


def test_state_files_of_any_numpy_load_with_weights_only(tmp_path):
    """trainer_state.pt is read with weights_only: NumPy's RNG state, an ndarray in the files of
    earlier versions, is pickled under numpy.core (NumPy 1) or numpy._core (NumPy 2) and must load
    under either; new files hold it as plain numbers."""
    import numpy as np

    state = loop.rng_state()
    assert isinstance(state["numpy"][1], list)  # (no NumPy object in a new file)
    for i, key in enumerate(
        [np.random.get_state()[1], state["numpy"][1]]
    ):  # an earlier version's, a new one's
        blob = {"optimizer": {}, "scheduler": None, "scaler": None, "state": {"step": 1}}
        blob["rng"] = dict(state, numpy=("MT19937", key, 3, 0, 0.0))
        for spelling in (b"numpy._core.multiarray", b"numpy.core.multiarray"):
            folder = tmp_path / f"{i}-{spelling.decode()}"
            folder.mkdir()
            torch.save(blob, tmp_path / "saved.pt")
            _respell(tmp_path / "saved.pt", folder / loop.STATE_FILE, b"numpy._core.multiarray", spelling)
            got = loop._torch_load_state(str(folder))["rng"]["numpy"]
            assert got[0] == "MT19937" and list(got[1]) == list(np.asarray(key)) and got[2] == 3
            loop.set_rng_state(loop._torch_load_state(str(folder))["rng"])
            assert np.random.get_state()[2] == 3


def test_the_parameters_decayed_are_those_transformers_trainer_decays():
    # by name (biases, norms, however they are spelt) and by LayerNorm class, as TRL's trainer
    import transformers
    from torch import nn

    from tests.conftest import TINY_DECODER

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.Final_RMSNorm = nn.Linear(8, 8, bias=False)  # (a name only, in capitals)
            self.ln = nn.LayerNorm(8)  # (a class only)
            self.norm = nn.Linear(8, 8)
            self.norm_gate = nn.Linear(8, 8, bias=False)  # ("norm" not as a whole component)

    models = [
        transformers.Qwen3ForCausalLM(
            transformers.Qwen3Config(**TINY_DECODER, head_dim=16)
        ),  # q_norm, k_norm
        transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)),
        Custom(),
    ]
    for model in models:
        names = {n for n, _ in model.named_parameters()}  # (a tied head: its weight once, as wte)
        want = set(transformers.Trainer.get_decay_parameter_names(None, model)) & names
        assert loop.decay_parameter_names(model) == want
        assert any(not n.endswith("bias") for n in names - want)  # (a norm's weight left out)


def test_the_parameter_count_counts_nf4_weights_as_their_dense_ones():
    import hoptune
    from hoptune.models.tiny import build_model
    from tests.conftest import SMALL

    dense = hoptune.apply_lora(build_model(seed=0, **SMALL), r=4)
    nf4 = hoptune.apply_lora(build_model(seed=0, **SMALL), r=4, quantize="nf4")
    assert loop.count_parameters(nf4) == loop.count_parameters(dense)


def test_a_training_state_without_an_int_step_is_named(tmp_path):
    # (the step is what a resume goes by: a file that holds another one is damaged)
    (tmp_path / loop.STATE_JSON).write_text('{"step": "3"}')
    with pytest.raises(
        loop.CheckpointError,
        match=rf"{loop.STATE_JSON} cannot be read \(ValueError: expected an object with an int 'step'",
    ):
        loop.Checkpointer.check_files(str(tmp_path))
