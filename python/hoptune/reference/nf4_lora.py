"""Pure-PyTorch NF4 + LoRA linear: the CPU path and the oracle of ops/nf4_lora.py.

Forward:  y = x @ W^T + s * (x @ A^T) @ B^T (+ bias), W = dequantize(NF4) in x's dtype.
Backward (W and bias frozen; the op's autograd formula, shared by both paths):
  dxa = s * dY @ B            [M, r]
  dB  = s * dY^T @ (x @ A^T)  [N, r]
  dA  = dxa^T @ x             [r, K]
  dX  = dY @ W + dxa @ A      [M, K]   (= dY @ (W + s B A) on the merged CUDA path)
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
) -> torch.Tensor:
    """x2 (M, K), w (N, K) -> y (M, N)."""
    # bias rides in the GEMM epilogue (addmm); the LoRA term accumulates into y in place
    y = torch.mm(x2, w.t()) if bias is None else torch.addmm(bias, x2, w.t())
    if lora_A is not None and lora_B is not None:
        y.addmm_(x2 @ lora_A.t(), lora_B.t(), alpha=scale)
    return y
