"""Argument checks shared by the ops: one place, messages that name the argument."""

from __future__ import annotations

import numbers
import operator
from collections import Counter
from collections.abc import Iterable

import torch


def tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def floating(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def zero_one_mask(name: str, mask: torch.Tensor) -> torch.Tensor:
    """``mask`` as bool: a mask of another dtype must hold only 0 and 1 (a 0.5 or a 2 has no
    meaning as a token selection; one device sync, for such masks only)."""
    if mask.dtype == torch.bool:
        return mask
    bad = (mask != 0) & (mask != 1)
    if bool(bad.any()):
        raise ValueError(f"{name} must be bool or hold only 0 and 1, got {mask[bad][0].item()}")
    return mask != 0


def dtype_in(name: str, t: torch.Tensor, allowed: Iterable[torch.dtype]) -> None:
    allowed = tuple(allowed)
    if t.dtype not in allowed:
        names = [str(d).replace("torch.", "") for d in allowed]
        names = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        raise TypeError(f"{name} must be {names}, got {t.dtype}")


def same_device(**tensors: torch.Tensor | None) -> torch.device:
    first = None
    for v in tensors.values():  # (ops call this on every invocation: the common case first)
        if v is None:
            continue
        d = v.device
        if first is None:
            first = d
        elif d != first:
            break
    else:
        return first
    devs = {k: v.device for k, v in tensors.items() if v is not None}
    # name the tensors off the device most of them are on (the first one's on a tie)
    common = Counter(devs.values()).most_common(1)[0][0]
    odd = [k for k, d in devs.items() if d != common]
    desc = ", ".join(f"{n} on {dv}" for n, dv in devs.items())
    verb = "differs" if len(odd) == 1 else "differ"
    raise ValueError(f"all tensors must be on one device, got {desc} ({', '.join(odd)} {verb})")


def contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise ValueError(
            f"{name} must be contiguous (got strides {tuple(t.stride())} for shape {tuple(t.shape)})"
        )


def blocksize(name: str, value: object, allowed: Iterable[int]) -> int:
    """``value`` as an int (a NumPy integer too); a float such as 64.0 compares equal to 64 but
    the ops take ints only, and a bool is no size."""
    allowed = tuple(allowed)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return int(value)


# the floating-point dtypes a model computes in, by the configs' short names (model.dtype) and
# torch's
SHORT_DTYPE_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FLOAT_DTYPE_NAMES = {
    **{str(d).removeprefix("torch."): d for d in SHORT_DTYPE_NAMES.values()},
    **SHORT_DTYPE_NAMES,
}


def float_dtype(name: str, value: object, none: bool = False) -> torch.dtype | None:
    """``value``: torch.float32, torch.bfloat16 or torch.float16, or its name ("bfloat16", "bf16",
    ...); None too when ``none``."""
    if value is None and none:
        return None
    if isinstance(value, str) and value in FLOAT_DTYPE_NAMES:
        return FLOAT_DTYPE_NAMES[value]
    if isinstance(value, torch.dtype) and value in FLOAT_DTYPE_NAMES.values():
        return value
    also = " or None" if none else ""
    raise TypeError(
        f"{name} must be torch.float32, torch.bfloat16 or torch.float16 (or its name, 'bfloat16' or "
        f"'bf16'){also}, got {value!r}"
    )


def boolean(name: str, value: object) -> bool:
    """``value`` must be True or False: None or a string would otherwise be read by its truth."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _is_bool(value: object) -> bool:
    """A Python, NumPy or torch bool, which float() and operator.index() would take as 0 or 1."""
    if isinstance(value, bool):
        return True
    if isinstance(value, (int, float, torch.SymInt, torch.SymFloat)):  # (a traced number: no getattr)
        return False
    if isinstance(value, torch.Tensor):
        return value.dtype == torch.bool
    return type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool")


def real(name: str, value: object, none: str = "") -> float:
    """value as a float (a Python or NumPy number, a one-element tensor); ``none``: what the
    message adds where None is also allowed. Strings and bools are refused, though float() takes
    them ('2', True)."""
    if not isinstance(value, (str, bytes)) and not _is_bool(value):
        try:
            return float(value)
        except (TypeError, ValueError, RuntimeError):
            pass
    raise TypeError(f"{name} must be a real number{none}, got {value!r}")


def integer(name: str, value: object) -> int:
    """value as an int (a Python or NumPy integer, a one-element integer tensor); a float is
    refused, not truncated, and so is a bool."""
    try:
        if not _is_bool(value):
            return operator.index(value)
    except TypeError:
        pass
    raise TypeError(f"{name} must be an integer, got {value!r}")


def device(name: str, value: object) -> torch.device:
    """A device to load or quantize weights on: ``cpu``, ``cuda``, ``cuda:N`` or an int (that GPU,
    as from_pretrained's device_map=0), visible here; ``cuda`` becomes the current GPU."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = torch.device("cuda", value)
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError) as e:  # torch.device("gpu"): torch's own message, no argument named
        raise ValueError(f"{name} must be 'cuda', 'cuda:N' or 'cpu', got {value!r} ({e})") from None
    # the loader fills CPU tensors through numpy and CUDA ones from pinned buffers, nothing else
    if dev.type not in ("cuda", "cpu"):
        raise ValueError(f"{name} must be 'cuda', 'cuda:N' or 'cpu', got {str(dev)!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}={str(dev)!r} but no CUDA device is visible; pass {name}='cpu'")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(
                f"{name}={str(dev)!r} but only {count} CUDA device{'s are' if count > 1 else ' is'} "
                f"visible (cuda:0{f' to cuda:{count - 1}' if count > 1 else ''}); check CUDA_VISIBLE_DEVICES"
            )
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev
