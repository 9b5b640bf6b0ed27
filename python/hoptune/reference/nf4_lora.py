"""Pure-PyTorch NF4 + LoRA linear: the CPU path and the oracle of ops/nf4_lora.py.

Forward:  y = x @ W^T + s * (x @ A^T) @ B^T (+ bias), W = dequantize(NF4) in x's dtype.
Backward (W and bias frozen), with xa = x @ A^T saved from the forward:
  dxa = s * dY @ B          [M, r]
  dB  = s * dY^T @ xa       [N, r]
  dA  = dxa^T @ x           [r, K]
  dX  = dY @ W + dxa @ A    [M, K]
"""

from __future__ import annotations

import torch


def lora_forward(
    x2: torch.Tensor,
    w: torch.Tensor,
    lora_A: torch.Tensor | None,
    lora_B: torch.Tensor | None,
    scale: float,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x2 (M, K), w (N, K) -> (y (M, N), xa (M, r) or None)."""
    # bias rides in the GEMM epilogue (addmm); the LoRA term accumulates into y in place
    y = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias, x2, w.t())
    xa = None
    if lora_A is not None and lora_B is not None:
        xa = x2 @ lora_A.t()
        y.addmm_(xa, lora_B.t(), alpha=scale)
    return y, xa


def lora_backward(
    grad: torch.Tensor,
    x2: torch.Tensor,
    xa: torch.Tensor | None,
    w: torch.Tensor | None,
    lora_A: torch.Tensor | None,
    lora_B: torch.Tensor | None,
    scale: float,
    need_x: bool,
    need_A: bool,
    need_B: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """grad (M, N) -> (dX (M, K), dA (r, K), dB (N, r)); None where not needed."""
    dx = da = db = None
    dxa = None
    if xa is not None and (need_x or need_A):
        dxa = torch.mm(grad, lora_B).mul_(scale)
    if need_x:
        assert w is not None
        dx = grad @ w
        if dxa is not None:
            dx.addmm_(dxa, lora_A)
    if need_A and dxa is not None:
        da = dxa.t() @ x2
    if need_B and xa is not None:
        db = torch.mm(grad.t(), xa).mul_(scale)
    return dx, da, db
