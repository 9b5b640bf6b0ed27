"""model.uncheckpointed_layers: the last N decoder layers without activation checkpointing, or as
many as hoptune plan says the GPU's memory holds (auto)."""

import pytest
import torch

from hoptune.config import ConfigError, check_sft_config, load_config
from hoptune.models.tiny import build_model
from hoptune.plan import main as plan_main
from hoptune.plan import plan
from hoptune.train import loop, sft
from tests.conftest import SMALL

from .conftest import small_config


def _flags(model):
    return [layer.gradient_checkpointing for layer in loop.decoder_layers(model)]


def test_config_takes_a_count_or_auto_and_refuses_the_rest():
    base = ["data.train=x.jsonl"]
    assert (
        load_config(None, [*base, "model.uncheckpointed_layers=auto"]).model.uncheckpointed_layers == "auto"
    )
    cfg = load_config(None, [*base, "model.uncheckpointed_layers=3"])
    assert cfg.model.uncheckpointed_layers == 3
    check_sft_config(cfg)
    assert load_config(None, base).model.uncheckpointed_layers == 0
    with pytest.raises(ConfigError, match=r"model.uncheckpointed_layers: expected int \| 'auto', got 'all'"):
        load_config(None, [*base, "model.uncheckpointed_layers=all"])
    with pytest.raises(
        ConfigError, match="model.uncheckpointed_layers must be an integer >= 0 or auto, got -1"
    ):
        check_sft_config(load_config(None, [*base, "model.uncheckpointed_layers=-1"]))
    with pytest.raises(ConfigError, match=r"uncheckpointed_layers=2 needs model.gradient_checkpointing=true"):
        check_sft_config(
            load_config(None, [*base, "model.uncheckpointed_layers=2", "model.gradient_checkpointing=false"])
        )
    # auto without checkpointing is no contradiction: nothing is checkpointed anyway
    check_sft_config(
        load_config(None, [*base, "model.uncheckpointed_layers=auto", "model.gradient_checkpointing=false"])
    )


def test_prepare_model_leaves_the_last_layers_uncheckpointed(tmp_path, demo_data):
    on = ("model.gradient_checkpointing=true",)
    model = sft.prepare_model(
        build_model(seed=0, **SMALL), small_config(tmp_path, demo_data, *on, "model.uncheckpointed_layers=1")
    )
    assert _flags(model) == [True, False]
    model = sft.prepare_model(build_model(seed=0, **SMALL), small_config(tmp_path, demo_data, *on))
    assert _flags(model) == [True, True]
    with pytest.raises(ConfigError, match=r"model.uncheckpointed_layers=3: .*the model has 2 decoder layers"):
        sft.prepare_model(
            build_model(seed=0, **SMALL),
            small_config(tmp_path, demo_data, *on, "model.uncheckpointed_layers=3"),
        )
    logs = []
    cfg = small_config(tmp_path, demo_data, *on, "model.uncheckpointed_layers=auto")
    model = sft.prepare_model(build_model(seed=0, **SMALL), cfg, log=logs.append)
    assert _flags(model) == [True, True]
    assert (
        logs[-1] == "model.uncheckpointed_layers=auto: on cpu every layer stays checkpointed (0 of 2 without)"
    )


def test_auto_takes_the_most_layers_the_planned_peak_fits(tmp_path, demo_data, monkeypatch):
    """On a GPU (its memory queries stubbed here), auto picks the largest count whose planned peak
    (hoptune plan, slack included) beyond the weights stays within 90% of the free memory plus what
    this process has cached and not used; none when even that does not fit, said so."""
    cfg = small_config(
        tmp_path, demo_data, "model.gradient_checkpointing=true", "model.uncheckpointed_layers=auto"
    )
    model = build_model(seed=0, **{**SMALL, "num_hidden_layers": 4}).to(torch.bfloat16)
    loop.enable_gradient_checkpointing(model)
    kw = dict(seq=64, batch=4, r=4, quantize=None, alternatives=False)
    peaks = [
        (p.peak + p.slack - p.weights) for p in (plan(model.config, uncheckpointed=u, **kw) for u in range(5))
    ]
    # (with all 4 uncheckpointed no layer is recomputed: a little below 3)
    assert peaks[0] < peaks[1] < peaks[2] < peaks[4] < peaks[3]
    cached, allocated = 3000, 2000  # (1000 bytes cached and unused count; the allocated ones do not)
    held = cached - allocated

    def with_free(free):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (free, 10 * free))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: cached)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: allocated)
        return sft.auto_uncheckpointed(model, cfg, device=torch.device("cuda"))

    for n, at in ((0, 0), (1, 1), (2, 2), (4, 4), (4, 3)):  # capacity just above the peak at ``at``
        n_got, why = with_free(peaks[at] / sft.AUTO_MEMORY_FRACTION - held + 1)
        assert n_got == n, why
        assert f"the last {n} of 4 decoder layers without checkpointing" in why
    n_got, why = with_free(peaks[1] / sft.AUTO_MEMORY_FRACTION - held - 1)
    assert n_got == 0
    n_got, why = with_free(peaks[0] / 2)
    assert n_got == 0 and "may run out of memory" in why
    # what the plan does not model: full fine-tuning, fp32 compute
    full = small_config(tmp_path, demo_data, "lora.enabled=false", "model.gradient_checkpointing=true")
    assert sft.auto_uncheckpointed(model, full, device=torch.device("cuda"))[0] == 0
    n_got, why = sft.auto_uncheckpointed(model.float(), cfg, device=torch.device("cuda"))
    assert n_got == 0 and "torch.float32" in why


def test_plan_counts_uncheckpointed_layers():
    kw = dict(seq=2048, batch=2)
    base = plan("llama-3-8b", **kw)
    four = plan("llama-3-8b", uncheckpointed=4, **kw)
    every = plan("llama-3-8b", uncheckpointed=32, **kw)
    none = plan("llama-3-8b", grad_ckpt=False, **kw)
    assert plan("llama-3-8b", uncheckpointed=0, **kw).peak == base.peak
    n, act = 4096, 2
    extra = 4 * (base.layer_activations - act * 4096 * n)  # 4 layers' activations for their inputs
    assert four.stored_activations == pytest.approx(base.stored_activations + extra)
    assert base.peak < four.peak < every.peak
    assert every.peak == pytest.approx(none.peak)
    assert "gradient checkpointing on 28 of 32 layers" in four.table()
    assert "28 x 2H per token, and 4 layers' activations" in four.table()
    for bad, msg in (
        (-1, "uncheckpointed must be an int >= 0"),
        (True, "uncheckpointed must be an int >= 0"),
        (33, "uncheckpointed=33, but llama-3-8b has 32 decoder layers"),
    ):
        with pytest.raises(ValueError, match=msg):
            plan("llama-3-8b", uncheckpointed=bad, **kw)
    with pytest.raises(
        ValueError,
        match=r"needs gradient checkpointing \(grad_ckpt=True; hoptune plan without --no-grad-ckpt\)",
    ):
        plan("llama-3-8b", uncheckpointed=2, grad_ckpt=False, **kw)


def test_plan_cli_uncheckpointed(capsys):
    assert plan_main(["--model", "llama-3-8b", "--batch", "2", "--uncheckpointed", "4"]) == 0
    assert "gradient checkpointing on 28 of 32 layers" in capsys.readouterr().out
    assert plan_main(["--model", "llama-3-8b", "--uncheckpointed", "40"]) == 2
    assert "has 32 decoder layers" in capsys.readouterr().err


@pytest.mark.gpu
def test_auto_on_the_gpu_uncheckpoints_a_small_model_whole(tmp_path, demo_data):
    """On a real GPU (its memory queried, not stubbed) a 2-layer model's step fits many times over:
    auto leaves both layers uncheckpointed, and a training step runs and gives gradients."""
    cfg = small_config(
        tmp_path,
        demo_data,
        "model.device=cuda",
        "model.gradient_checkpointing=true",
        "model.uncheckpointed_layers=auto",
    )
    logs = []
    model = sft.prepare_model(build_model(seed=0, **SMALL).to("cuda", torch.bfloat16), cfg, log=logs.append)
    assert _flags(model) == [False, False]
    assert "the last 2 of 2 decoder layers without checkpointing" in logs[-1] and "GiB" in logs[-1]
    ids = torch.randint(10, 60, (2, 9), device="cuda")
    lp, _ = loop.batch_logprobs(
        model, {"input_ids": ids, "loss_mask": torch.ones_like(ids, dtype=torch.bool)}
    )
    (-lp.float().mean()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(
    "settings,tip",
    [
        (
            ("model.gradient_checkpointing=true", "model.uncheckpointed_layers=1"),
            "fewer model.uncheckpointed_layers (set to 1, so 1 of 2 decoder layers are not checkpointed)",
        ),
        (("model.gradient_checkpointing=false",), "model.gradient_checkpointing=true"),
    ],
    ids=["uncheckpointed", "no_checkpointing"],
)
@pytest.mark.parametrize("where", ["step", "optimizer"])
def test_a_step_out_of_memory_says_what_to_change(
    tmp_path, tokenizer, demo_data, monkeypatch, capsys, settings, tip, where
):
    """A step that runs out of GPU memory (raised here on the CPU) ends the run with the same error
    type, naming the step, the newest checkpoint (untouched) and the settings that shrink a step,
    this run's own first."""
    cfg = small_config(tmp_path, demo_data, "train.max_steps=4", "train.save_every=1", *settings)
    calls = {"n": 0}
    target = (sft, "sft_step") if where == "step" else (loop, "optimizer_step")
    real = getattr(*target)

    def fail_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*a, **k)

    monkeypatch.setattr(*target, fail_third)
    with pytest.raises(torch.OutOfMemoryError) as e:
        sft.train(cfg, log=lambda s: None, model=build_model(seed=0, **SMALL), tokenizer=tokenizer)
    msg = str(e.value)
    assert msg.startswith("training step 3 of 4 ran out of GPU memory; nothing was saved for it")
    assert "the newest checkpoint" in msg and "step-00000002, is untouched" in msg
    assert tip in msg and "a smaller train.batch_size (now 4)" in msg and "data.max_seq_len (now 64)" in msg
    assert "model.quantize=nf4" in msg  # (this config trains LoRA over the dense base)
    assert isinstance(e.value.__cause__, torch.OutOfMemoryError)
    if where == "step" and len(settings) == 1:  # `hoptune sft`: that message on one line, status 1
        import shutil

        shutil.rmtree(cfg.output.dir)
        calls["n"] = 0
        monkeypatch.setattr(sft, "load_base_model", lambda *a, **k: build_model(seed=0, **SMALL))
        monkeypatch.setattr(sft, "load_tokenizer", lambda *a, **k: tokenizer, raising=False)
        assert sft.main(cfg) == 1
        err = capsys.readouterr().err
        assert (
            err.startswith("hoptune sft: error: training step 3 of 4 ran out of GPU memory")
            and err.count("\n") == 1
        )


@pytest.mark.gpu
def test_a_real_out_of_memory_on_the_gpu_is_named(tmp_path, tokenizer, demo_data, monkeypatch):
    """On the GPU, with the device's memory taken by other tensors before the third step, the step
    fails the way torch fails it, and the run ends with StepOutOfMemory naming that step."""
    cfg = small_config(
        tmp_path, demo_data, "model.device=cuda", "train.max_steps=4", "model.gradient_checkpointing=true"
    )
    real, calls, filler = sft.sft_step, {"n": 0}, []

    def step_in_a_full_gpu(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            torch.cuda.empty_cache()  # (the cached blocks back to the device, then all of it taken)
            size = 1 << 34
            while size >= 1 << 16:
                try:
                    filler.append(torch.empty(size, dtype=torch.uint8, device="cuda"))
                except torch.OutOfMemoryError:
                    size //= 2
        return real(*a, **k)

    monkeypatch.setattr(sft, "sft_step", step_in_a_full_gpu)
    try:
        with pytest.raises(sft.StepOutOfMemory, match=r"^training step 3 of 4 ran out of GPU memory \(peak"):
            sft.train(
                cfg, log=lambda s: None, model=build_model(seed=0, **SMALL).to("cuda"), tokenizer=tokenizer
            )
    finally:
        filler.clear()
        torch.cuda.empty_cache()
    assert calls["n"] == 3
