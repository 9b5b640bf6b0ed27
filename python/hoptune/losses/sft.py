"""The SFT loss, as TRL defines it (docs/FORMATS.md §3).

    loss = - sum over the accumulated batch of masked log p(token) / (number of loss tokens in
           the whole accumulated batch)

not a mean of per-micro-batch means: with gradient accumulation each micro-batch contributes
``-sum(masked log p) / N_total``, so the summed gradient equals the gradient of the loss over the
whole batch no matter how unevenly the loss tokens fall into micro-batches.
"""

from __future__ import annotations

import torch

from hoptune.ops import _check


def _mask_count(name: str, mask: torch.Tensor) -> torch.Tensor:
    """The number of loss tokens in ``mask`` (0-dim). A mask of another dtype than bool must hold
    only 0 and 1: a 0.5 has no meaning in TRL's loss, and it would weight the sum while the count
    rounds it (one device sync, for such masks only)."""
    return _check.zero_one_mask(name, mask).sum()


def _whole_number(n: int | float | torch.Tensor) -> int:
    """num_loss_tokens as an int; a fractional, infinite or multi-element count is an error (not
    truncated: the loss would be divided by another number than the one given), and so are a bool
    and a string (float() reads True as 1 and '3' as 3)."""
    if isinstance(n, torch.Tensor):
        if n.numel() != 1:
            raise ValueError(f"num_loss_tokens must be one number, got a tensor of shape {tuple(n.shape)}")
        n = n.item()
    if isinstance(n, (bool, str, bytes)) or getattr(getattr(n, "dtype", None), "kind", "") == "b":
        raise TypeError(f"num_loss_tokens must be a number of tokens, got {n!r}")
    try:
        return _check.integer("num_loss_tokens", n)
    except TypeError:
        pass
    if not _check.real("num_loss_tokens", n).is_integer():
        raise ValueError(f"num_loss_tokens must be a whole number of tokens, got {n!r}")
    return int(n)


def sft_loss(
    logprobs: torch.Tensor,
    loss_mask: torch.Tensor | None = None,
    num_loss_tokens: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked negative log-likelihood summed and divided by ``num_loss_tokens``.

    logprobs: ``(*)`` per-token log-probs of the target tokens (already shifted).
    loss_mask: ``(*)`` bool/0-1, the tokens in the loss; None = all of ``logprobs``.
    num_loss_tokens: the number of loss tokens in the *whole accumulated batch* (every micro-batch
    of one optimizer step); None = the tokens in this mask (a single micro-batch).
    Returns a scalar tensor, fp32 (fp64 for fp64 log-probs: summed in at least fp32, never in less
    than the log-probs' own precision).
    """
    _check.tensor("logprobs", logprobs)
    _check.floating("logprobs", logprobs)  # (a bool or integer tensor would sum as counts)
    acc = torch.float64 if logprobs.dtype == torch.float64 else torch.float32
    if loss_mask is not None:
        _check.tensor("loss_mask", loss_mask)
        if loss_mask.shape != logprobs.shape:
            raise ValueError(
                f"loss_mask must have the shape of logprobs {tuple(logprobs.shape)}, got {tuple(loss_mask.shape)}"
            )
        _check.same_device(logprobs=logprobs, loss_mask=loss_mask)
        local = _mask_count("loss_mask", loss_mask)
        # selected, not multiplied: a masked-out position may hold -inf or nan (0 * -inf = nan)
        nll = -torch.where(loss_mask != 0, logprobs.to(acc), 0.0).sum()
    else:
        nll = -logprobs.to(acc).sum()
        local = logprobs.numel()
    n = _whole_number(local if num_loss_tokens is None else num_loss_tokens)
    if num_loss_tokens is not None and (loss_mask is None or loss_mask.device.type == "cpu"):
        # (a count below this micro-batch's own scales the loss up; checked where it costs no
        # device sync: the tokens of a mask on the GPU are not read back for it)
        have = int(local)
        if n < have:
            raise ValueError(
                f"num_loss_tokens must be at least the {have} loss tokens of "
                f"{'logprobs' if loss_mask is None else 'loss_mask'}, got {n}: it counts the loss tokens "
                "of the whole accumulated batch (count_loss_tokens over every micro-batch of the step)"
            )
    if n <= 0:
        raise ValueError(
            "num_loss_tokens must be positive: the batch has no loss token (every target is masked out); "
            "check the loss masks of the data"
        )
    return nll / n


def count_loss_tokens(loss_masks: list[torch.Tensor] | torch.Tensor) -> int:
    """The SFT normaliser: loss tokens over every micro-batch of one optimizer step.

    loss_masks: shifted masks ``(B, T-1)`` bool/0-1 (or a list of them, one per micro-batch)."""
    if isinstance(loss_masks, torch.Tensor):
        loss_masks = [loss_masks]
    elif isinstance(loss_masks, (str, bytes)) or not hasattr(loss_masks, "__iter__"):
        raise TypeError(
            f"loss_masks must be a torch.Tensor or a list of them, got {type(loss_masks).__name__}"
        )
    total = 0
    for i, m in enumerate(loss_masks):
        total += int(_mask_count("loss_masks", _check.tensor(f"loss_masks[{i}]", m)))
    return total
