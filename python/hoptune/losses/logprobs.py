"""Per-token log-probabilities: the one place the trainers turn logits into ``log p(label)``.

The reference is an fp32 ``log_softmax`` followed by a gather. The shift by one (logits at
position t score the token at t + 1) is the caller's job, so this function also serves the
"hidden states at selected positions -> lm_head -> log-probs" path that never materialises the
logits of prompt tokens. A fused kernel (lm_head + log-softmax + gather) can replace the body
without changing callers.
"""

from __future__ import annotations

import torch

# Rows of logits turned into fp32 log-softmax at a time: bounds the fp32 transient to
# _CHUNK * vocab floats (a 128k vocabulary makes one fp32 row 0.5 MB).
_CHUNK = 4096


def token_logprobs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``log softmax(logits / temperature)[label]`` in fp32.

    logits: ``(*, V)`` any float dtype; labels: ``(*)`` integer token ids, already aligned with
    the logits (no shift is done here). Positions whose label is ``ignore_index`` give 0.0.
    Returns fp32 ``(*)``; differentiable with respect to ``logits``.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels must have the shape of logits without the vocab dim: logits {tuple(logits.shape)}, "
            f"labels {tuple(labels.shape)}"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 or int32 token ids, got {labels.dtype}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)
    flat_labels = labels.reshape(-1).long()
    valid = flat_labels != ignore_index
    if bool(((flat_labels < 0) & valid).any()) or bool((flat_labels >= vocab).any()):
        bad = flat_labels[valid & ((flat_labels < 0) | (flat_labels >= vocab))][:5].tolist()
        raise ValueError(f"labels must be in [0, {vocab}) or ignore_index={ignore_index}, got e.g. {bad}")
    safe_labels = torch.where(valid, flat_labels, torch.zeros_like(flat_labels))
    out = []
    for s in range(0, flat_logits.shape[0], _CHUNK):
        x = flat_logits[s : s + _CHUNK].float()
        if temperature != 1.0:
            x = x / temperature
        lp = torch.log_softmax(x, dim=-1).gather(-1, safe_labels[s : s + _CHUNK, None]).squeeze(-1)
        out.append(lp)
    lp = torch.cat(out) if out else flat_logits.new_zeros(0, dtype=torch.float32)
    lp = torch.where(valid, lp, torch.zeros_like(lp))
    return lp.view(labels.shape)


def head_logprobs(
    head: torch.nn.Module,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``log softmax(head(hidden) * logit_scale, softcapped) [label]`` in fp32: what the trainers call
    for the output head, on the hidden states of the positions in the loss only.

    head: the model's output layer (``lm_head``); hidden ``(N, H)``; labels ``(N,)`` (no
    ``ignore_index`` needed: only loss positions are passed). Returns fp32 ``(N,)``. This body
    materialises the ``(N, V)`` logits; a fused lm_head + log-softmax kernel can take its place."""
    logits = head(hidden)
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return token_logprobs_from_logits(logits, labels, temperature=temperature)


def shift_for_next_token(
    input_ids: torch.Tensor, loss_mask: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Labels for next-token prediction: ``labels[:, t] = input_ids[:, t + 1]`` where
    ``loss_mask[:, t + 1]`` is set, else ``ignore_index``.

    input_ids, loss_mask: ``(B, T)``. Returns ``(B, T - 1)`` int64, aligned with ``logits[:, :-1]``.
    """
    if input_ids.shape != loss_mask.shape:
        raise ValueError(
            f"loss_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(loss_mask.shape)}"
        )
    labels = input_ids[:, 1:].long()
    return torch.where(loss_mask[:, 1:].bool(), labels, torch.full_like(labels, ignore_index))
