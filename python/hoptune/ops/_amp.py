"""torch.autocast as the ops meet it: their float inputs cast to its dtype as nn.Linear's are, and
their own matmuls run outside it where they need their output dtypes."""

from __future__ import annotations

import contextlib

import torch

_CAST = (torch.float32, torch.bfloat16, torch.float16)  # what autocast casts (not float64)


def _device_type(device: torch.device) -> str:
    # (meta has no autocast of its own; torch.amp.is_autocast_available does not trace under
    # torch.compile in every torch version)
    return "cuda" if device.type == "cuda" else "cpu"


def enabled(t: torch.Tensor) -> bool:
    """Whether autocast is on for ``t``'s device."""
    return torch.is_autocast_enabled(_device_type(t.device))


def cast_inputs(ref: torch.Tensor, *ts):
    """``ts`` (tensors or None) in the autocast dtype of ``ref``'s device, differentiably (the
    gradients come back in their own dtypes); float64 and non-float tensors as they are."""
    dtype = torch.get_autocast_dtype(_device_type(ref.device))
    cast = tuple(c for c in _CAST if c != dtype)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in cast else t for t in ts)


def off(device: torch.device):
    """A context with autocast off on ``device`` where it is on."""
    t = _device_type(device)
    if torch.is_autocast_enabled(t):
        return torch.autocast(t, enabled=False)
    return contextlib.nullcontext()
