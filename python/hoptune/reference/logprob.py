"""Pure-PyTorch per-token log-probs: the CPU path and the oracle of ops/logprob.py.

Computes in fp32 (fp64 when given fp64), row chunk by row chunk so the temporaries stay bounded.
For logits z of a row with label y and temperature T (z' = z / T, p = softmax z'):
  logp = z'_y - lse(z'),  H = lse - sum_v p_v z'_v,
  dz = [g_lp (onehot_y - p) - g_H p (log p + H)] / T.
"""

from __future__ import annotations

import torch

_ROWS = 256


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _p_log_p(lsm: torch.Tensor) -> torch.Tensor:
    """p log p for log-probabilities lsm, 0 where p = 0 (a logit of -inf: not 0 * -inf = nan)."""
    p = torch.exp(lsm)
    return torch.where(p > 0, p * lsm, 0)


def token_logprobs_fwd(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (*, V), labels (*) -> (logp, entropy, lse), each (*) fp32 (fp64 for fp64 logits)."""
    v = logits.shape[-1]
    z2 = logits.reshape(-1, v)
    y = labels.reshape(-1)
    acc = _acc_dtype(logits)
    n = y.numel()
    # allocated in labels' shape and filled through flat views: returned views of flat results
    # would refuse in-place ops (lp *= mask), as the CUDA path's outputs do not
    logp = torch.zeros(labels.shape, dtype=acc, device=logits.device)
    ent = torch.zeros_like(logp)
    lse = torch.zeros_like(logp)
    logp_f, ent_f, lse_f = logp.view(-1), ent.view(-1), lse.view(-1)
    for r0 in range(0, n, _ROWS):
        r1 = min(n, r0 + _ROWS)
        z = z2[r0:r1].to(acc) / temperature
        valid = y[r0:r1] != ignore_index
        yc = torch.where(valid, y[r0:r1], 0)
        ls = torch.logsumexp(z, dim=-1)
        lp = z.gather(1, yc[:, None]).squeeze(1) - ls
        lsm = z - ls[:, None]
        h = -_p_log_p(lsm).sum(-1)  # not lse - sum p z: that cancels when H is small
        logp_f[r0:r1] = torch.where(valid, lp, 0)
        ent_f[r0:r1] = torch.where(valid, h, 0)
        lse_f[r0:r1] = torch.where(valid, ls, 0)
    return logp, ent, lse


def token_logprobs_bwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
) -> torch.Tensor:
    """d(sum g_lp logp + g_H H)/d logits, in the logits' dtype and shape."""
    v = logits.shape[-1]
    z2 = logits.reshape(-1, v)
    y = labels.reshape(-1)
    acc = _acc_dtype(logits)
    n = y.numel()
    out = torch.empty(n, v, dtype=logits.dtype, device=logits.device)
    gl_all = grad_logp.reshape(-1).to(acc)
    gh_all = None if grad_entropy is None else grad_entropy.reshape(-1).to(acc)
    for r0 in range(0, n, _ROWS):
        r1 = min(n, r0 + _ROWS)
        z = z2[r0:r1].to(acc) / temperature
        validb = y[r0:r1] != ignore_index
        lp = z - lse.reshape(-1)[r0:r1].to(acc)[:, None]
        # an ignored row's saved lse is 0: exp(z) may overflow there, and 0 * inf = nan
        p = torch.where(validb[:, None], torch.exp(lp), 0)
        # selected, not multiplied by the mask: an upstream nan or inf there would give 0 * inf
        gl = torch.where(validb, gl_all[r0:r1], 0)[:, None]
        d = -gl * p
        if gh_all is not None:
            gh = torch.where(validb, gh_all[r0:r1], 0)[:, None]
            # (p = 0: 0, also where lp is -inf)
            d = d - gh * torch.where(p > 0, p * (lp + entropy.reshape(-1)[r0:r1].to(acc)[:, None]), 0)
        yc = torch.where(y[r0:r1] != ignore_index, y[r0:r1], 0)
        d.scatter_add_(1, yc[:, None], gl)
        out[r0:r1] = (d / temperature).to(logits.dtype)
    return out.view(logits.shape)


def transform_logits(
    z: torch.Tensor, bias: torch.Tensor | None, logit_scale: float, softcap: float, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw lm_head outputs -> (z', dz'/dz): bias, scale, soft-cap (softcap * tanh(z / softcap)), 1/T."""
    if bias is not None:
        z = z + bias.to(z.dtype)
    z = z * logit_scale
    deriv = torch.full_like(z, logit_scale / temperature)
    if softcap > 0:
        t = torch.tanh(z / softcap)
        z = softcap * t
        deriv = deriv * (1 - t * t)
    return z / temperature, deriv


def fused_chunk(
    logits: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    logit_scale: float,
    softcap: float,
    temperature: float,
    write_grad: bool,
    row_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One chunk of raw logits (rows, V), all labels valid -> (logp, entropy, lse, G, label_coef),
    what the CUDA fused-chunk kernel computes: G = -row_scale * p * dz'/dz (the softmax part of
    d logp / d z) and label_coef = row_scale * dz'/dz at the label (the one-hot part)."""
    zp, deriv = transform_logits(logits.to(_acc_dtype(logits)), bias, logit_scale, softcap, temperature)
    lse = torch.logsumexp(zp, dim=-1)
    logp = zp.gather(1, labels[:, None]).squeeze(1) - lse
    lsm = zp - lse[:, None]
    p = torch.exp(lsm)
    ent = -_p_log_p(lsm).sum(-1)
    g = coef = None
    if write_grad:
        rs = torch.ones_like(lse) if row_scale is None else row_scale.to(lse.dtype)
        g = -p * deriv * rs[:, None]
        coef = deriv.gather(1, labels[:, None]).squeeze(1) * rs
    return logp, ent, lse, g, coef


def fused_vchunk(
    logits: torch.Tensor,
    labels: torch.Tensor,
    col0: int,
    bias: torch.Tensor | None,
    logit_scale: float,
    softcap: float,
    temperature: float,
    ref: torch.Tensor,
    write_grad: bool,
    row_scale: torch.Tensor | None = None,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor
]:
    """One vocabulary chunk of raw logits (rows, C), columns [col0, col0 + C), what the CUDA
    vocab-chunk kernel computes. With t = z' - ref (ref (rows,): a per-row shift, the caller's
    estimate of z'_y) and e = exp(t), returns (s0, s1, inside, label_logit, label_coef, G, bad):
    the chunk's sums s0 = sum e and s1 = sum e t (rows,), whether the label lies in the chunk,
    z'_y and row_scale * dz'/dz at the label (meaningful where inside), G = -row_scale * e * dz'/dz
    (rows, C) (unnormalised: the caller scales G @ W by 1 / s0 once every chunk is summed) and a
    0-dim bool: some t > 64 or a sum not finite (the caller redoes the row relative to the max)."""
    c = logits.shape[1]
    b = None if bias is None else bias[col0 : col0 + c]
    zp, deriv = transform_logits(logits.to(_acc_dtype(logits)), b, logit_scale, softcap, temperature)
    t = zp - ref.to(zp.dtype)[:, None]
    e = torch.exp(t)
    s0 = e.sum(1)
    s1 = torch.where(e > 0, e * t, 0).sum(1)  # (a logit of -inf adds 0)
    local = labels - col0
    inside = (local >= 0) & (local < c)
    li = local.clamp(0, c - 1)[:, None]
    rs = torch.ones_like(s0) if row_scale is None else row_scale.to(s0.dtype)
    zy = zp.gather(1, li).squeeze(1)
    coef = deriv.gather(1, li).squeeze(1) * rs
    g = -e * deriv * rs[:, None] if write_grad else None
    bad = (t > 64).any() | ~torch.isfinite(s0).all() | ~torch.isfinite(s1).all()
    return s0, s1, inside, zy, coef, g, bad


def fused_gemm(
    a: torch.Tensor, b: torch.Tensor, scale: float, shift: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """What the CUDA fused lm_head GEMM computes for hidden rows a (rows, H) and lm_head rows
    b (C, H): G = exp(scale * (a @ b^T) - shift[:, None]) (rows, C) in a's dtype and its row sums
    s0 (rows,) in fp32, both from the fp32 values (the logits themselves are never returned)."""
    e = torch.exp((a.float() @ b.float().t()) * scale - shift.float()[:, None])
    return e.to(a.dtype), e.sum(1)
