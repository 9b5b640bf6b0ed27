"""Losses as pure functions of per-token log-probs and masks (TRL's definitions, FORMATS.md §3)."""

from hoptune.losses.logprobs import head_logprobs, shift_for_next_token, token_logprobs_from_logits
from hoptune.losses.sft import count_loss_tokens, sft_loss

__all__ = [
    "count_loss_tokens",
    "head_logprobs",
    "sft_loss",
    "shift_for_next_token",
    "token_logprobs_from_logits",
]
