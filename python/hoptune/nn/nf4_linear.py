"""``NF4Linear``: a frozen linear layer whose weight is stored in NF4 (bitsandbytes' layout).

    y = x deq(W)^T + bias          x (*, in_features) -> y (*, out_features)

This is what :func:`hoptune.load_model` puts in place of each ``nn.Linear`` when it quantizes on
load, before any adapter exists. :func:`hoptune.apply_lora` wraps its ``NF4Weight`` in a
``LoRALinear`` as is (no dequantize, no re-quantize), and :func:`hoptune.remove_lora` gives it back.
Its buffers have the same names as ``LoRALinear``'s NF4 base (``weight_packed``, ``weight_absmax``,
``weight_absmax2``, ``weight_code2``); the state dict adds ``weight_nf4_meta`` (the double
quantization's offset, the two blocksizes and the weight's shape), which loading requires with
double quantization.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hoptune.ops import _check
from hoptune.ops.nf4_lora import nf4_lora_linear_trusted
from hoptune.quant.nf4 import (
    BLOCKSIZES,
    FLOAT_DTYPES,
    NF4Weight,
    check_quantizable,
    dequantize_nf4,
    quantize_nf4,
)

# buffers that hold NF4 codes and statistics: their dtypes are part of the format
NF4_BUFFERS = ("weight_packed", "weight_absmax", "weight_absmax2", "weight_code2")
# the state-dict entry of the rest of an NF4 weight: float64 (offset, blocksize, blocksize2, *shape),
# the offset being the double quantization's (without it, absmax2 and code2 decode to other scales);
# the shape because the buffers are flat: [out, in] and [in, out] have buffers of the same sizes.
# (State dicts saved before the shape was added hold the first three values only.)
NF4_META_KEY = "weight_nf4_meta"


def check_blocks(w: torch.Tensor, name: str, blocksize: int) -> None:
    """``w`` (the caller's ``name``) fills whole NF4 blocks of ``blocksize`` elements (an invalid
    blocksize is left to quantize_nf4, which names it)."""
    if blocksize in BLOCKSIZES and (w.numel() == 0 or w.numel() % blocksize):
        raise ValueError(
            f"{name} has {w.numel()} elements (shape {tuple(w.shape)}), not a positive multiple of "
            f"blocksize={blocksize}: NF4 cannot quantize it"
        )


def check_linear_weight(linear: nn.Linear, name: str) -> None:
    """``linear.weight`` (the caller's ``name``) is a floating-point ``[out_features, in_features]``
    tensor. A quantized ``nn.Linear`` subclass (bitsandbytes' Linear8bitLt, Linear4bit) holds integer
    codes there: cast to floats they would compute (or be quantized) as if they were the weights."""
    w = linear.weight
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        what = f"{w.dtype} {tuple(w.shape)}" if isinstance(w, torch.Tensor) else type(w).__name__
        raise TypeError(
            f"{name} is {what} (of a {type(linear).__name__}); a floating-point weight [out_features, "
            "in_features] is needed: a quantized layer (bitsandbytes' Linear8bitLt or Linear4bit) holds "
            "codes, not weights (load the model with hoptune.load_model(quantize='nf4'), or dequantize "
            "the layer first)"
        )
    if tuple(w.shape) != (linear.out_features, linear.in_features):
        raise ValueError(
            f"{name} has shape {tuple(w.shape)}, expected ({linear.out_features}, {linear.in_features}) "
            "(out_features, in_features)"
        )


def read_nf4_meta(t: object, ndim: int, key: str) -> tuple[float, int, int, tuple[int, ...]]:
    """(offset, blocksize, blocksize2, shape) of a ``weight_nf4_meta`` entry (``key``) of a weight
    of ``ndim`` dims; the shape is () in an entry saved before it held one."""
    if not isinstance(t, torch.Tensor) or t.numel() not in (3, 3 + ndim):
        raise ValueError(
            f"{key}: expected {3 + ndim} values (offset, blocksize, blocksize2, then the weight's "
            f"shape), or 3 without the shape, got {t!r}"
        )
    offset, bs, bs2, *shape = t.detach().to("cpu", torch.float64).tolist()
    return offset, int(bs), int(bs2), tuple(int(n) for n in shape)


def register_nf4(module: nn.Module, q: NF4Weight) -> None:
    """Store ``q`` on ``module`` as the NF4 buffers (state-dict keys ``weight_packed`` ...) plus
    the Python-side metadata; :func:`nf4_view` rebuilds the ``NF4Weight``."""
    module.register_buffer("weight_packed", q.packed, persistent=True)
    module.register_buffer("weight_absmax", q.absmax, persistent=True)
    module.register_buffer("weight_absmax2", q.absmax2, persistent=True)
    module.register_buffer("weight_code2", q.code2, persistent=True)
    module._nf4_meta = (tuple(q.shape), q.dtype, q.blocksize, q.offset, q.blocksize2)


def nf4_view(module: nn.Module) -> NF4Weight:
    """The ``NF4Weight`` over ``module``'s NF4 buffers (validated when they were registered; not
    again here, this runs every forward)."""
    shape, dtype, bs, offset, bs2 = module._nf4_meta
    return NF4Weight.trusted(
        module.weight_packed,
        module.weight_absmax,
        torch.Size(shape),
        dtype,
        bs,
        module.weight_absmax2,
        module.weight_code2,
        offset,
        bs2,
    )


def check_input(x, in_features: int, dtypes: tuple, device: torch.device, weight: str) -> None:
    """A layer's input, which comes from its caller: a tensor of one of ``dtypes``, ``(*,
    in_features)``, on the device of the layer's ``weight``. Checked once, first thing in the
    forward: else a wrong width or device fails deep inside torch, and an integer x over a dense
    weight (cast to x's dtype) computes with the weight truncated to integers, silently."""
    if not isinstance(x, torch.Tensor) or x.dtype not in dtypes or x.dim() < 1 or x.shape[-1] != in_features:
        what = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        names = "/".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"x must be a {names} tensor with last dim in_features={in_features}, got {what}")
    if x.device != device:
        raise ValueError(f"x is on {x.device} but the layer's {weight} is on {device}")


def nf4_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s NF4 weight."""
    packed = module._buffers.get("weight_packed")  # (held elsewhere, a wrapper's property: None)
    return (module.weight_packed if packed is None else packed).device


def nf4_call(module: nn.Module, x: torch.Tensor, lora_A, lora_B, scale: float, bias) -> torch.Tensor:
    """``nf4_lora_linear`` on ``module``'s NF4 buffers without re-checking them (validated when they
    were registered; this runs every forward), nor x: the layer's forward has checked it
    (``check_input`` with FLOAT_DTYPES and ``nf4_device``), once for all the calls it makes."""
    shape, _, bs, offset, bs2 = module._nf4_meta
    try:  # the registered buffers straight from their dict (nn.Module's __getattr__ costs ~1 us each)
        b = module._buffers
        w = (b["weight_packed"], b["weight_absmax"], b["weight_absmax2"], b["weight_code2"])
    except KeyError:  # held elsewhere (a wrapper's property)
        w = tuple(getattr(module, name) for name in NF4_BUFFERS)
    return nf4_lora_linear_trusted(x, (*w, offset, bs, bs2), shape[0], lora_A, lora_B, scale, bias)


def apply_keeping_nf4_dtypes(
    module: nn.Module, apply: Callable[..., nn.Module], fn: Callable, recurse: bool = True
) -> nn.Module:
    """``nn.Module._apply`` that applies ``fn`` to the NF4 buffers of ``module`` too but never lets it
    change their dtype: ``model.to(torch.bfloat16)`` or ``model.half()`` must not turn the fp32
    absmax statistics into bf16 (they would no longer dequantize to the same weight); such a buffer
    only moves to the device ``fn`` would put it on. An ``fn`` that keeps the dtype is applied as it
    is: ``to_empty()`` must not copy out of a meta tensor, ``share_memory()`` must share them. The
    dtype the weight dequantizes to does follow a cast to bfloat16, float16 or float32, as a dense
    weight would: else ``remove_lora`` / ``merge_and_unload(dtype=None)`` after ``model.half()`` give
    layers in the old dtype, which the rest of the model cannot feed."""
    saved = {n: module._buffers.pop(n) for n in NF4_BUFFERS if n in module._buffers}
    meta = getattr(module, "_nf4_meta", None) if "weight_packed" in saved else None
    try:
        apply(fn, recurse)
        done = {n: None if t is None else _apply_keeping_dtype(fn, t) for n, t in saved.items()}
        cast = (
            None if meta is None else fn(torch.empty(0, dtype=meta[1], device=saved["weight_packed"].device))
        )
    except BaseException:
        module._buffers.update(saved)  # (back in the module, not lost with the failed call)
        raise
    module._buffers.update(done)
    if cast is not None and cast.dtype in FLOAT_DTYPES:  # (NF4 does not dequantize to float64)
        module._nf4_meta = (meta[0], cast.dtype, *meta[2:])
    return module


def _apply_keeping_dtype(fn: Callable, t: torch.Tensor) -> torch.Tensor:
    """fn(t) where fn keeps t's dtype, else t moved to the device fn gives (probed on an empty
    tensor of t's dtype and device)."""
    probe = fn(torch.empty(0, dtype=t.dtype, device=t.device))
    return fn(t) if probe.dtype == t.dtype else t.to(probe.device)


# what the stand-in for an NF4 layer's .weight answers (torch.overrides.resolve_name of the call)
_STAND_IN_METADATA = frozenset(
    f"torch.Tensor.{n}"
    for n in (
        "dtype.__get__", "device.__get__", "shape.__get__", "ndim.__get__", "is_cuda.__get__",
        "is_meta.__get__", "is_cpu.__get__", "layout.__get__", "requires_grad.__get__",
        "is_leaf.__get__", "grad.__get__", "size", "dim", "numel", "nelement", "get_device",
        "is_floating_point", "is_complex", "element_size", "__len__",
    )
)  # fmt: skip


class NF4WeightStandIn(torch.Tensor):
    """What an NF4 layer gives for ``.weight``: a tensor of the weight's dtype (the one it
    dequantizes to), device and shape ``[out, in]`` that holds no values (one element, expanded)
    and refuses any computation with the layer's message. Code that reads ``.weight.dtype`` or
    ``.weight.device`` runs as with a dense layer; code that would compute with the weight fails
    saying what to do, where bitsandbytes' ``Params4bit`` (uint8 codes) computes garbage or fails
    on shapes."""

    @staticmethod
    def __new__(cls, shape, dtype: torch.dtype, device: torch.device, message: str):
        base = torch.empty((), dtype=dtype, device=device).expand(*shape)
        t = torch.Tensor._make_subclass(cls, base, False)
        t._message = message
        return t

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if torch.overrides.resolve_name(func) in _STAND_IN_METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        # (the stand-in may sit inside a list argument, as in torch.cat([w, ...]))
        flat = torch.utils._pytree.tree_leaves((args, kwargs or {}))
        stand_in = next((a for a in flat if isinstance(a, cls)), None)
        raise RuntimeError(getattr(stand_in, "_message", "an NF4 layer's .weight holds no values"))

    def __repr__(self) -> str:
        return f"NF4WeightStandIn(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"

    def __reduce_ex__(self, protocol):  # (never saved or copied as if it were a weight)
        raise RuntimeError(self._message)


class NF4Module(nn.Module):
    """A module that may hold an NF4 weight as the buffers of ``register_nf4`` (``_nf4_meta`` None
    when it does not): casts keep the buffers' dtypes, and the state dict carries the rest of the
    weight (``weight_nf4_meta``)."""

    _nf4_meta: tuple | None = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            dense_base = self.__dict__.get("_nf4_meta") is None
            if name == "weight_nf4" and dense_base:
                # (a weight_nf4 property that raises AttributeError lands here, its message lost)
                raise AttributeError(
                    f"this {type(self).__name__} has a dense base, so it has no .weight_nf4; its weight "
                    "is .weight"
                ) from None
            if name != "weight" or dense_base:
                raise
        # A model may read a layer's .weight for its dtype or device only (HunYuan-MoE's router:
        # `if self.wg.weight.dtype == torch.float32`), or pass it to a fused kernel it then does not
        # call (the Mamba-2 mixers' out_proj.weight, in training without a cache), both of which run
        # under transformers + bitsandbytes. No dense weight exists to compute with (Mamba's
        # dt_proj.weight @ x): the stand-in answers dtype, device and shape and names the way out
        # on anything else.
        dense = "dequantize" if hasattr(type(self), "dequantize") else "base_weight"
        shape, dtype = self._nf4_meta[0], self._nf4_meta[1]
        return NF4WeightStandIn(
            shape,
            dtype,
            nf4_device(self),
            f"this {type(self).__name__} holds its weight in NF4 (.weight_nf4; .{dense}() gives it "
            "dense), so its .weight gives the weight's dtype, device and shape only; a model that "
            "computes with a layer's .weight directly needs that layer dense: keep it out of "
            "quantization (load_model's skip_modules, hoptune sft's model.skip_modules)",
        )

    def _apply(self, fn, recurse=True):
        # model.to(dtype) / .half() move the NF4 buffers but keep their dtypes (part of the format)
        return apply_keeping_nf4_dtypes(self, super()._apply, fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._nf4_meta is None:
            return
        shape, _, bs, offset, bs2 = self._nf4_meta
        destination[prefix + NF4_META_KEY] = torch.tensor(
            [offset, bs, bs2, *shape], dtype=torch.float64, device=self.weight_packed.device
        )

    def _nf4_differing(self, state_dict, prefix: str, attr: str) -> list[tuple[str, object, object]]:
        """(name, the state dict's, this module's) ``attr`` of the NF4 buffers where they differ."""
        return [
            (n, getattr(t, attr), getattr(mine, attr))
            for n in NF4_BUFFERS
            if isinstance(t := state_dict.get(prefix + n), torch.Tensor)
            and (mine := self._buffers.get(n)) is not None
            and getattr(t, attr) != getattr(mine, attr)
        ]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        """The buffers, then the metadata; with double quantization the entry is required: the codes
        alone would decode to other weights. What would load other weights (other dtypes, blocksizes
        or shapes) is refused before anything is copied, so the layer keeps its own."""
        key = prefix + NF4_META_KEY
        offset = None
        if self._nf4_meta is not None:
            # the NF4 buffers' dtypes are part of the format: a copy would convert uint8 codes to
            # float statistics (or back) and silently give other weights
            bad = [
                f"{prefix}{n}: the state dict holds {theirs}, this module {mine}"
                for n, theirs, mine in self._nf4_differing(state_dict, prefix, "dtype")
            ]
            if bad:
                errors.append(
                    f"NF4 buffers of other dtypes ({'; '.join(bad)}): NF4 codes and statistics are not "
                    "converted (a double-quantized weight, uint8 absmax, loads only into a double-quantized "
                    "layer, and a plain one, float32 absmax, only into a plain one)"
                )
                return
            t = state_dict.get(key)
            if t is None and self.weight_absmax2 is not None:
                # double-quantized codes without their offset would decode to other weights (with the
                # layer's old offset): refused before anything is copied, strict or not
                held = [prefix + n for n in NF4_BUFFERS if prefix + n in state_dict]
                if held:
                    errors.append(
                        f"{key}: missing, and the state dict holds this double-quantized layer's NF4 "
                        f"buffers ({', '.join(held)}): without that entry (the double quantization's "
                        "offset) the codes would decode to other weights; load a state dict that "
                        "holds it, as a hoptune model's state_dict() and save_pretrained write it"
                    )
                    return
            if t is not None:
                shape, _, bs, _, bs2 = self._nf4_meta
                try:
                    offset, new_bs, new_bs2, new_shape = read_nf4_meta(t, len(shape), key)
                except ValueError as e:
                    errors.append(str(e))
                    return
                # (the buffers are flat: a weight of another shape with as many elements would load)
                if new_shape and new_shape != tuple(shape):
                    errors.append(
                        f"{key}: the state dict's NF4 weight has shape {new_shape}, "
                        f"this module's {tuple(shape)} (load it into a layer of the same shape)"
                    )
                    return
                if (new_bs, new_bs2) != (bs, bs2):
                    errors.append(
                        f"{key}: the state dict's NF4 weight has blocksize {new_bs} / blocksize2 "
                        f"{new_bs2}, this module's {bs} / {bs2} (quantize the module with the same "
                        "settings)"
                    )
                    return
            # (an entry without the shape cannot refuse another one: torch would skip these buffers,
            # copy the rest, and the offset below would still be taken)
            sized = [
                f"{prefix}{n}: the state dict holds {tuple(theirs)}, this module {tuple(mine)}"
                for n, theirs, mine in self._nf4_differing(state_dict, prefix, "shape")
            ]
            # the other entries (bias, adapter) too, as torch checks them, but before any is copied:
            # an entry without the shape cannot tell [out, in] from [in, out], the bias can
            others = [
                f"size mismatch for {prefix}{n}: copying a param with shape {t.shape} from checkpoint, "
                f"the shape in current model is {mine.shape}."
                for n, mine in (*self._parameters.items(), *self._buffers.items())
                if n not in NF4_BUFFERS
                and n not in self._non_persistent_buffers_set
                and mine is not None
                and not nn.parameter.is_lazy(mine)
                and isinstance(t := state_dict.get(prefix + n), torch.Tensor)
                and t.shape != mine.shape
                and not (mine.dim() == 0 and t.shape == (1,))  # (torch loads these)
            ]
            if sized:
                errors.append(
                    f"NF4 buffers of other sizes ({'; '.join(sized)}): the state dict's NF4 weight is not "
                    f"one of this module's shape {tuple(self._nf4_meta[0])} (load it into a layer of the "
                    "same shape)"
                )
            errors.extend(others)
            if sized or others:
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        if key in unexpected:
            unexpected.remove(key)
        if self._nf4_meta is None:  # (a dense base)
            if key in state_dict and strict:
                unexpected.append(key)
            return
        if offset is None:
            if self.weight_absmax2 is not None and strict:
                missing.append(key)
            return
        shape, dtype, bs, _, bs2 = self._nf4_meta
        self._nf4_meta = (shape, dtype, bs, float(offset), bs2)


def _check_cast_fits(linear: nn.Linear, w: torch.Tensor, bias: torch.Tensor | None, dtype) -> None:
    """``linear``'s finite weight and bias stay finite as ``w`` and ``bias`` in ``dtype``: a float32
    value above 65504 is inf in float16, which quantize_nf4 would blame on the checkpoint."""
    for name, old, new in (("weight", linear.weight, w), ("bias", linear.bias, bias)):
        if new is None or bool(torch.isfinite(new).all()) or not bool(torch.isfinite(old).all()):
            continue
        big = old.detach().abs().amax().item()
        raise ValueError(
            f"linear.{name} holds values up to {big:g} in magnitude, beyond the range of "
            f"dtype={dtype} (+-{torch.finfo(dtype).max:g}), where they would be inf; pass "
            f"dtype=torch.bfloat16 or torch.float32, or dtype=None to keep {old.dtype}"
        )


class NF4Linear(NF4Module):
    """Frozen ``y = x deq(W)^T + b`` with W an NF4 weight ``[out, in]``; no trainable parameters
    besides the (frozen by default) bias."""

    def __init__(self, weight: NF4Weight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if not isinstance(weight, NF4Weight):
            raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
        if len(weight.shape) != 2:
            raise ValueError(f"weight must be a 2-D [out, in] NF4Weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (self.out_features,):
                raise ValueError(
                    f"bias must be a tensor of shape ({self.out_features},), got "
                    f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}"
                )
        register_nf4(self, weight)
        # (on the weight's device, as LoRALinear puts it: else the first forward fails)
        self.bias = (
            None if bias is None else nn.Parameter(bias.detach().to(weight.device), requires_grad=False)
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        blocksize: int = 64,
        double_quant: bool = True,
        dtype: torch.dtype | None = None,
    ) -> NF4Linear:
        """Quantize ``linear.weight`` (where it lives) into a new ``NF4Linear``; ``dtype`` is the
        weight's dtype after dequantization, and the bias's (default: the linear's)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        _check.boolean("double_quant", double_quant)
        check_linear_weight(linear, "linear.weight")
        w = linear.weight.detach() if dtype is None else linear.weight.detach().to(dtype)
        check_quantizable(w, "linear.weight", " (pass dtype=torch.float32 or another of them)")
        check_blocks(w, "linear.weight", blocksize)
        bias = linear.bias
        if dtype is not None:
            bias = None if bias is None else bias.detach().to(dtype)
            _check_cast_fits(linear, w, bias, dtype)
        q = quantize_nf4(w.contiguous(), blocksize=blocksize, double_quant=double_quant)
        return cls(q, bias)

    @property
    def weight_nf4(self) -> NF4Weight:
        return nf4_view(self)

    @property
    def quantized(self) -> bool:
        return True

    @property
    def base_dtype(self) -> torch.dtype:
        return self._nf4_meta[1]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight ``[out, in]`` as a dense tensor (float64 as LoRALinear.base_weight gives it)."""
        if dtype is not None and dtype not in (*FLOAT_DTYPES, torch.float64):
            raise TypeError(f"dtype must be bfloat16, float16, float32 or float64, got {dtype!r}")
        if dtype == torch.float64:  # (NF4 dequantizes to 16/32-bit floats; float32 is exact in float64)
            return dequantize_nf4(self.weight_nf4, torch.float32).to(dtype)
        return dequantize_nf4(self.weight_nf4, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_features, FLOAT_DTYPES, nf4_device(self), "NF4 weight")
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nf4_call(self, x, None, None, 0.0, bias)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain ``nn.Linear`` with the dequantized weight (frozen like this layer)."""
        dtype = dtype or self.base_dtype
        w = self.dequantize(dtype)
        lin = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=dtype
        )
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias.to(dtype))
        lin.requires_grad_(False)
        return lin

    def extra_repr(self) -> str:
        dq = ", double_quant" if self.weight_absmax2 is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"nf4(blocksize={self._nf4_meta[2]}{dq}), bias={self.bias is not None}"
        )


def mark_quantized(model: nn.Module) -> None:
    """When ``model`` holds NF4 layers, set ``config._is_quantized`` on the transformers models in
    it, as transformers' quantizers do (its config writer leaves the key out). Models read it:
    FalconMamba's and Jamba's mixers then call ``dt_proj`` instead of reading ``dt_proj.weight``
    (which an NF4 layer does not have: their forward failed), and flash attention takes the
    config's dtype for fp32 inputs instead of the first linear layer's ``.weight.dtype``."""
    if not any(getattr(m, "quantized", False) for m in model.modules()):
        return
    from transformers import PreTrainedModel  # (not at the top: the layer needs no transformers)

    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            m.config._is_quantized = True
