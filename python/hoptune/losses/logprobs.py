"""Per-token log-probabilities: the one place the trainers turn logits into ``log p(label)``.

Both entry points run hoptune's log-prob ops (``hoptune.ops.token_logprobs`` from logits,
``hoptune.ops.fused_linear_logprobs`` from hidden states and the output head). The shift by one
(logits at position t score the token at t + 1) is the caller's job, so the head path serves
"hidden states at the loss positions -> lm_head -> log-probs" and never materialises the logits
of prompt tokens.
"""

from __future__ import annotations

import torch

from hoptune.ops import _check
from hoptune.ops.logprob import FLOAT_DTYPES, _label_stats, fused_linear_logprobs, token_logprobs


def token_logprobs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``log softmax(logits / temperature)[label]`` in fp32.

    logits: ``(*, V)`` any float dtype; labels: ``(*)`` integer token ids, already aligned with
    the logits (no shift is done here). Positions whose label is ``ignore_index`` give 0.0.
    Returns fp32 ``(*)`` (fp64 for fp64 logits); differentiable with respect to ``logits``. Runs
    :func:`hoptune.ops.token_logprobs` (one pass over the logits on an sm_90 GPU, the fp32
    reference elsewhere).
    """
    _check.tensor("logits", logits)
    _check.tensor("labels", labels)
    if logits.dim() == 0 or logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels must have the shape of logits without the vocab dim: logits {tuple(logits.shape)}, "
            f"labels {tuple(labels.shape)}"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 or int32 token ids, got {labels.dtype}")
    if not torch.compiler.is_compiling():  # (traced, it may be symbolic: compared as it is)
        temperature = _check.real("temperature", temperature)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    vocab = logits.shape[-1]
    if vocab == 0:
        raise ValueError(f"logits has an empty vocabulary dimension: shape {tuple(logits.shape)}")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be a floating-point tensor, got {logits.dtype}")
    if logits.dtype not in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        logits = logits.float()  # e.g. float8: computed in fp32
    if logits.dim() in (2, 3):  # as they are: a bad label's position is reported in labels' shape
        return token_logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index)
    # the labels' range checked here, so that a bad label is named at its position in labels' own
    # shape (the op's check would see the flattened labels); traced, the op checks as it runs
    compiling = torch.compiler.is_compiling()
    if not compiling:
        _label_stats(labels, _check.integer("ignore_index", ignore_index), vocab)
    flat = logits.reshape(-1, vocab)
    lp = token_logprobs(
        flat,
        labels.reshape(-1),
        temperature=temperature,
        ignore_index=ignore_index,
        check_labels=compiling,
    )
    return lp.view(labels.shape)


def _hooked(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` runs more than its class's forward: its own hooks (those
    nn.Module.__call__ checks) or a forward set on the instance."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or "forward" in vars(module)
    )


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
    ``ignore_index`` needed: only loss positions are passed). Returns fp32 ``(N,)`` (fp64 for an
    fp64 head). A plain ``nn.Linear`` head of hidden's dtype (bf16/fp16/fp32) goes through
    :func:`hoptune.ops.fused_linear_logprobs` (the logits are never held whole; a frozen head
    gets no weight gradient); any other head module (or an fp64 one) is applied as is and its
    logits go through :func:`token_logprobs_from_logits` (so does an ``nn.Linear`` with hooks or
    an instance ``forward``, which the fused op would skip). A plain ``nn.Linear`` head of another
    dtype is an error unless autocast is on (then it runs as autocast casts it, as in the model)."""
    _check.tensor("hidden", hidden)
    if not torch.compiler.is_compiling():  # (traced, they may be symbolic: used as they are)
        logit_scale = _check.real("logit_scale", logit_scale)
        softcap = None if softcap is None else _check.real("softcap", softcap, " (or None for no cap)")
    # one meaning on both paths (the fused op refuses 0 and below; `if softcap:` took 0 as no cap)
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive (or None for no cap), got {softcap}")
    # a head with hooks (a user's, or accelerate's, which replaces forward to place the weights)
    # runs as it is: the fused op reads head.weight and would skip them
    linear = type(head) is torch.nn.Linear and not _hooked(head)
    if linear and head.weight.dtype != hidden.dtype:
        # checked here, by name: F.linear's own error speaks of mat1 and mat2
        dev = hidden.device.type
        if not (torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev)):
            raise TypeError(f"hidden must have head.weight's dtype {head.weight.dtype}, got {hidden.dtype}")
    if linear and head.weight.dtype == hidden.dtype and hidden.dtype in FLOAT_DTYPES:
        return fused_linear_logprobs(
            hidden,
            head.weight,
            labels,
            bias=head.bias,
            temperature=temperature,
            softcap=softcap,
            logit_scale=logit_scale,
        )
    logits = head(hidden)
    if logit_scale != 1.0:
        logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return token_logprobs_from_logits(logits, labels, temperature=temperature)


def shift_for_next_token(
    input_ids: torch.Tensor, loss_mask: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Labels for next-token prediction: ``labels[:, t] = input_ids[:, t + 1]`` where
    ``loss_mask[:, t + 1]`` is set, else ``ignore_index``.

    input_ids, loss_mask: ``(B, T)``. Returns ``(B, T - 1)`` int64, aligned with ``logits[:, :-1]``.
    """
    _check.tensor("input_ids", input_ids)
    _check.tensor("loss_mask", loss_mask)
    if input_ids.dim() != 2:  # (a 3-D batch would be shifted along its second dim)
        raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be integer token ids, got {input_ids.dtype}")
    if input_ids.shape != loss_mask.shape:
        raise ValueError(
            f"loss_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(loss_mask.shape)}"
        )
    _check.same_device(input_ids=input_ids, loss_mask=loss_mask)
    keep = _check.zero_one_mask("loss_mask", loss_mask[:, 1:])
    labels = input_ids[:, 1:].long()
    return torch.where(keep, labels, torch.full_like(labels, ignore_index))
