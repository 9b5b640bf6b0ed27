"""Convergence parity: the same tiny SFT run with hoptune (recipe, layers, loss) and with PEFT +
a plain PyTorch loop (transformers' loss with num_items_in_batch, torch AdamW) gives the same
per-step losses (fp32, CPU)."""

import copy

import pytest
import torch

from hoptune.adapters import load_adapter
from hoptune.data.dataset import StepSampler
from hoptune.data.packing import collate
from hoptune.patch import apply_lora
from hoptune.quant import dequantize_nf4, quantize_nf4
from hoptune.train import sft

from .conftest import small_config

STEPS = 12


def _peft_losses(model, rows, cfg):
    """A plain loop: labels -100 outside the loss mask, loss = sum / tokens of the whole step."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    t = cfg.train
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=0.0)
    sampler = StepSampler(len(rows), t.batch_size * t.grad_accum, t.seed)
    losses = []
    model.train()
    for step in range(STEPS):
        idx = sampler.rows_for_step(step)
        micro = []
        for k in range(t.grad_accum):
            b = collate([rows[i] for i in idx[k * t.batch_size : (k + 1) * t.batch_size]], pad_id=0)
            labels = torch.where(b["loss_mask"], b["input_ids"], torch.full_like(b["input_ids"], -100))
            micro.append((b, labels))
        n = sum(int((lab[:, 1:] != -100).sum()) for _, lab in micro)
        total = 0.0
        for b, labels in micro:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            loss = ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1], num_items_in_batch=n)
            loss.backward()
            total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_losses_match_peft(tmp_path, small_model, tokenizer, demo_data, quantize):
    import peft

    cfg = small_config(
        tmp_path,
        demo_data,
        f"train.max_steps={STEPS}",
        "train.lr_schedule=constant",
        "train.lr=3e-3",
        "lora.target_modules=all-linear",
        f"model.quantize={quantize or 'null'}",
    )
    base = small_model
    if quantize == "nf4":  # PEFT sees the weights the NF4 base dequantizes to
        with torch.no_grad():
            for layer in base.model.layers:
                for lin in [
                    *vars(layer.self_attn)["_modules"].values(),
                    *vars(layer.mlp)["_modules"].values(),
                ]:
                    if isinstance(lin, torch.nn.Linear):
                        lin.weight.copy_(dequantize_nf4(quantize_nf4(lin.weight.detach())))

    peft_model = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    )
    with torch.no_grad():  # a non-zero B, so the first steps already exercise the whole path
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    peft_model.save_pretrained(tmp_path / "init")

    ours = copy.deepcopy(base)
    apply_lora(ours, r=4, alpha=8, quantize=quantize)
    load_adapter(ours, tmp_path / "init", trainable=True)

    rows, _, _ = sft.load_data(cfg, tokenizer, log=lambda s: None)
    ref = _peft_losses(peft_model, rows, cfg)

    res = sft.train(cfg, log=lambda s: None, model=ours, tokenizer=tokenizer)  # trains the adapter in place
    assert len(res.train_losses) == STEPS
    assert ref[-1] < ref[0] - 0.3  # it learns
    for i, (a, b) in enumerate(zip(res.train_losses, ref)):
        assert a == pytest.approx(b, rel=2e-4, abs=1e-5), f"step {i}: hoptune {a} vs PEFT {b}"
