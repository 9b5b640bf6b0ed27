"""The built-in tiny model (Llama architecture, character-level tokenizer), built in code."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hoptune.models.tiny import CHAT_TEMPLATE, TINY_CONFIG, build_model, build_tokenizer, stop_at_end_of_turn


def load_tiny(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    pretrained: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[Any, Any]:
    """(model, tokenizer) of the built-in tiny model: pretrained (from the cache, pretraining it
    the first time, on ``device``) or freshly initialised with ``pretrained=False``."""
    if not pretrained:
        return build_model().to(device=device, dtype=dtype), build_tokenizer()
    from transformers import LlamaForCausalLM

    from hoptune.models.pretrain import no_hf_progress_bars, pretrained_tiny_path

    path = pretrained_tiny_path(log=log, device=device)
    with no_hf_progress_bars():
        model = LlamaForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model.config.use_cache = False
    stop_at_end_of_turn(model)  # (a cache written by an earlier version stops at </s> alone)
    # the tokenizer is built in code: a cache written by an older version may hold an older one
    return model, build_tokenizer()


__all__ = ["CHAT_TEMPLATE", "TINY_CONFIG", "build_model", "build_tokenizer", "load_tiny"]
