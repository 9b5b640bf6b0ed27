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
