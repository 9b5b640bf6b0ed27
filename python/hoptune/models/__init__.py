"""The built-in tiny model (Llama architecture, character-level tokenizer), built in code."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hoptune.models.tiny import CHAT_TEMPLATE, TINY_CONFIG, build_model, build_tokenizer


def load_tiny(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    pretrained: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[Any, Any]:
    """(model, tokenizer) of the built-in tiny model: pretrained (from the cache, pretraining it
    the first time) or freshly initialised with ``pretrained=False``."""
    if not pretrained:
        return build_model().to(device=device, dtype=dtype), build_tokenizer()
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from hoptune.models.pretrain import pretrained_tiny_path

    path = pretrained_tiny_path(log=log)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a 39-tensor model needs no loading bar
    try:
        model = LlamaForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    model.config.use_cache = False
    # the tokenizer is built in code: a cache written by an older version may hold an older one
    return model, build_tokenizer()


__all__ = ["CHAT_TEMPLATE", "TINY_CONFIG", "build_model", "build_tokenizer", "load_tiny"]
