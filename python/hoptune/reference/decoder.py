"""Pure-PyTorch decoder-layer ops: the CPU path and the oracle of ops/decoder.py.

Each is the computation of transformers' Llama-family modules, op for op (the same roundings):
``rms_norm`` is LlamaRMSNorm.forward, ``silu_mul`` the SwiGLU step of LlamaMLP.forward
(act_fn(gate_proj(x)) * up_proj(x) with act_fn = SiLU), ``rope`` one tensor of
apply_rotary_pos_emb. Autograd through them is the gradient the kernels reproduce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (*, H), weight (H,) -> (*, H): weight * (x * rsqrt(mean(x^2) + eps)) in x's dtype, the
    statistics in fp32."""
    dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up (*, I) -> silu(gate) * up (*, I)."""
    return F.silu(gate) * up


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, Hh, S, D), cos and sin (B, S, D) -> (B, Hh, S, D): x * cos + rotate_half(x) * sin,
    cos and sin broadcast over the heads."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (rotate_half(x) * sin)
