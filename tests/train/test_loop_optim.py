"""The optimizer side of the loop: what it refuses before any step is taken."""

import os

import pytest
import torch

from hoptune.train import loop, sft

from .conftest import small_config


def test_grad_scaler_refuses_trainable_fp16_parameters():
    """fp16 weights that train (a full fine-tuning of an fp16 model) are refused by name: GradScaler
    failed at the first step with its bare 'Attempting to unscale FP16 gradients.'."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)).half()
    with pytest.raises(ValueError, match=r"'0.weight'.*float16.*bf16 or fp32"):
        loop.grad_scaler(model, torch.device("cpu"), torch.float32)
    # fp32 adapters over a frozen fp16 base: loss scaling, and a step that unscales and trains
    model.requires_grad_(False)
    adapter = torch.nn.Linear(8, 8)
    both = torch.nn.ModuleList([model, adapter])
    scaler = loop.grad_scaler(both, torch.device("cpu"), torch.float16)
    assert isinstance(scaler, torch.amp.GradScaler)
    opt = loop.build_optimizer(list(adapter.named_parameters()), 1e-3)
    before = adapter.weight.detach().clone()
    x = torch.randn(3, 8)
    scaler.scale(model(adapter(x).half()).float().square().mean()).backward()
    norm = loop.optimizer_step(opt, None, list(adapter.parameters()), 1.0, scaler)
    assert norm > 0 and not torch.equal(adapter.weight, before)


def test_full_fine_tuning_of_an_fp16_model_passed_in_is_refused(tmp_path, tokenizer, demo_data):
    """sft.train with an fp16 model and lora.enabled=false: model.dtype=fp16 is refused by the
    config, a model passed in fp16 was not, and its first step failed inside GradScaler."""
    from hoptune.models.tiny import build_model
    from tests.conftest import SMALL

    cfg = small_config(tmp_path, demo_data, "train.max_steps=2", "lora.enabled=false")
    model = build_model(seed=0, **SMALL).half()
    with pytest.raises(ValueError, match=r"trainable parameter .* is float16") as e:
        sft.train(cfg, log=lambda s: None, model=model, tokenizer=tokenizer)
    assert "Attempting to unscale" not in str(e.value)
    assert not os.path.exists(cfg.output.dir)  # refused before anything was written


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "cosin"}, r"lr_schedule must be cosine, linear or constant, got 'cosin'"),
        ({"min_ratio": 1.5}, r"min_lr_ratio must be in \[0, 1\], got 1.5"),
        ({"min_ratio": -0.2}, r"min_lr_ratio must be in \[0, 1\], got -0.2"),
        ({"warmup_steps": -3}, r"warmup_steps must be >= 0, got -3"),
    ],
)
def test_scheduler_settings_are_checked_before_the_first_step(kwargs, match):
    """A misspelt schedule failed only once warmup was over (after that many optimizer steps), and a
    min_lr_ratio above 1 made the 'decay' raise the lr above its peak without a word."""
    p = torch.nn.Parameter(torch.randn(4))
    opt = loop.build_optimizer([("p", p)], lr=0.1)
    args = {"total_steps": 20, "warmup_steps": 5, **kwargs}
    with pytest.raises(ValueError, match=match):
        loop.build_scheduler(opt, **args)
    with pytest.raises(ValueError, match=match):
        loop.LRSchedule(**args)


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.5, 100.0])
def test_optimizer_step_reports_the_norm_before_clipping_and_clips_to_it(max_grad_norm):
    """The norm reported is the gradients' total norm before clipping (as transformers' Trainer logs
    grad_norm), with clipping off too; the step takes the clipped gradients."""
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(2, 2))
    a.grad = torch.tensor([3.0, 0.0, 4.0])
    b.grad = torch.tensor([[0.0, 12.0], [0.0, 0.0]])
    total = 13.0  # sqrt(9 + 16 + 144)
    opt = torch.optim.SGD([a, b], lr=1.0)
    norm = loop.optimizer_step(opt, None, [a, b], max_grad_norm)
    assert norm == pytest.approx(total)
    shrink = max_grad_norm / total if 0 < max_grad_norm < total else 1.0
    # (clip_grad_norm_ scales by max / (norm + 1e-6))
    torch.testing.assert_close(a.detach(), -torch.tensor([3.0, 0.0, 4.0]) * shrink, rtol=1e-5, atol=0)
    torch.testing.assert_close(
        b.detach(), -torch.tensor([[0.0, 12.0], [0.0, 0.0]]) * shrink, rtol=1e-5, atol=0
    )
    assert a.grad is None and b.grad is None


def test_the_configs_adamw_settings_reach_the_optimizer(tmp_path, tokenizer, demo_data, monkeypatch):
    """train.betas, train.eps, train.weight_decay and train.lr are the AdamW's (transformers'
    adam_beta1/2, adam_epsilon, weight_decay, learning_rate)."""
    from hoptune.models.tiny import build_model
    from tests.conftest import SMALL

    seen = []
    build = loop.build_optimizer

    def spy(*a, **k):
        opt = build(*a, **k)
        seen.append(opt)
        return opt

    monkeypatch.setattr(loop, "build_optimizer", spy)
    cfg = small_config(
        tmp_path,
        demo_data,
        "train.max_steps=1",
        "train.betas=[0.8,0.95]",
        "train.eps=1e-6",
        "train.weight_decay=0.05",
        "train.lr=3e-4",
        "train.warmup_ratio=0",
    )
    sft.train(cfg, log=lambda s: None, model=build_model(seed=0, **SMALL), tokenizer=tokenizer)
    (opt,) = seen
    assert isinstance(opt, torch.optim.AdamW)
    for g in opt.param_groups:
        assert tuple(g["betas"]) == (0.8, 0.95) and g["eps"] == 1e-6 and g["initial_lr"] == 3e-4
    assert sorted({g["weight_decay"] for g in opt.param_groups if g["params"]}) in ([0.05], [0.0, 0.05])
