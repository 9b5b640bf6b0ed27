"""The SFT loss, as TRL defines it (docs/FORMATS.md §3).

    loss = - sum over the accumulated batch of masked log p(token) / (number of loss tokens in
           the whole accumulated batch)

not a mean of per-micro-batch means: with gradient accumulation each micro-batch contributes
``-sum(masked log p) / N_total``, so the summed gradient equals the gradient of the loss over the
whole batch no matter how unevenly the loss tokens fall into micro-batches.
"""

from __future__ import annotations

import torch


def sft_loss(
    logprobs: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    num_loss_tokens: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked negative log-likelihood summed and divided by ``num_loss_tokens``.

    logprobs: fp32 ``(*)`` per-token log-probs of the target tokens (already shifted).
    loss_mask: ``(*)`` bool/0-1, the tokens in the loss; None = all of ``logprobs``.
    num_loss_tokens: the number of loss tokens in the *whole accumulated batch* (every micro-batch
    of one optimizer step); None = the tokens in this mask (a single micro-batch).
    Returns a scalar fp32 tensor.
    """
    if loss_mask is not None:
        if loss_mask.shape != logprobs.shape:
            raise ValueError(
                f"loss_mask must have the shape of logprobs {tuple(logprobs.shape)}, got {tuple(loss_mask.shape)}"
            )
        # selected, not multiplied: a masked-out position may hold -inf or nan (0 * -inf = nan)
        nll = -torch.where(loss_mask != 0, logprobs.float() * loss_mask.to(torch.float32), 0.0).sum()
        local = loss_mask.sum()
    else:
        nll = -logprobs.float().sum()
        local = logprobs.numel()
    n = local if num_loss_tokens is None else num_loss_tokens
    if not isinstance(n, torch.Tensor) and n != int(n):
        raise ValueError(f"num_loss_tokens must be a whole number of tokens, got {n!r}")
    n = int(n)
    if n <= 0:
        raise ValueError(
            "num_loss_tokens must be positive: the batch has no loss token (every target is masked out); "
            "check the loss masks of the data"
        )
    return nll / n


def count_loss_tokens(loss_masks: list[torch.Tensor] | torch.Tensor) -> int:
    """The SFT normaliser: loss tokens over every micro-batch of one optimizer step.

    loss_masks: shifted masks ``(B, T-1)`` (or a list of them, one per micro-batch)."""
    if isinstance(loss_masks, torch.Tensor):
        loss_masks = [loss_masks]
    return int(sum(int(m.sum()) for m in loss_masks))
