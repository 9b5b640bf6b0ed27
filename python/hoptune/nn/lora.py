"""``LoRALinear``: a drop-in for ``nn.Linear`` with a frozen base (dense or NF4) and a LoRA or
DoRA adapter, with PEFT's semantics.

    y = base(x) + s * B(A(dropout(x)))                          LoRA,  s = alpha / r
                                                                       (rsLoRA: alpha / sqrt(r))
    y = (m / n) * (x W^T + s * B(A(x))) + bias                  DoRA,  n = ||W + s B A|| per output
                                                                       row, detached (no gradient)

With DoRA and dropout active (training), as PEFT computes it: with d = dropout(x),
    y = x W^T + (m / n - 1) * d W^T + (m / n) * s * B(A(d)) + bias.

A starts kaiming-uniform (a = sqrt(5), i.e. U(+-1/sqrt(in))), or normal with std 1/r with
``init_lora_weights="gaussian"``; B at zero, so a fresh adapter leaves the model unchanged (random
too with ``init_lora_weights=False``); the DoRA magnitude m starts at n, the row norms of
W + s B A (of the dequantized W for an NF4 base).

One deliberate difference from PEFT, for rows of W that are entirely zero (Llama-3.1-8B's o_proj
has such rows): DoRA uses n = max(n, eps) so such a row gives 0 instead of NaN.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from hoptune.nn.nf4_linear import (
    NF4Module,
    check_blocks,
    check_input,
    check_linear_weight,
    nf4_call,
    nf4_device,
    nf4_view,
    register_nf4,
)
from hoptune.ops import _amp
from hoptune.ops.nf4_lora import MAX_RANK
from hoptune.quant.nf4 import FLOAT_DTYPES, NF4Weight, check_quantizable, dequantize_nf4, quantize_nf4

DORA_EPS = 1e-12
INIT_LORA_WEIGHTS = (True, False, "gaussian")
# what a dense base computes in (x, and the weights the conversions give): nn.Linear's floats; an
# NF4 base takes x in FLOAT_DTYPES only, the dtypes of its kernels
DENSE_DTYPES = (*FLOAT_DTYPES, torch.float64)


def _is_real(v) -> bool:
    """An int or float (not a bool, not a string)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_dtype(name: str, dtype) -> None:
    """``dtype`` is one a weight can be converted to (a float: an integer weight would be truncated)."""
    if dtype not in DENSE_DTYPES:
        raise TypeError(f"{name} must be bfloat16, float16, float32 or float64, got {dtype!r}")


def check_init_lora_weights(value) -> None:
    """init_lora_weights must be one of PEFT's initializations that hoptune implements."""
    if not any(value is v if isinstance(v, bool) else value == v for v in INIT_LORA_WEIGHTS):
        raise ValueError(
            f"init_lora_weights must be True, False or 'gaussian', got {value!r} "
            "(PEFT's other initializations, e.g. 'pissa' or 'loftq', are not implemented)"
        )


def check_lora_options(dropout_name: str, dropout, init_lora_weights, **flags) -> None:
    """The options LoRALinear and apply_lora share: the dropout (under the caller's name for it) a
    number in [0, 1), each of ``flags`` True or False, init_lora_weights one that is implemented."""
    if not _is_real(dropout) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{dropout_name} must be a number in [0, 1), got {dropout!r}")
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    check_init_lora_weights(init_lora_weights)


_NORM_ROWS = 2048  # rows per chunk when computing DoRA norms (bounds the transient memory)


class LoRALinear(NF4Module):
    """Frozen base weight (``weight`` dense, or NF4 buffers ``weight_packed``/``weight_absmax``...)
    plus trainable ``lora_A`` ``[r, in]``, ``lora_B`` ``[out, r]`` and, with DoRA,
    ``lora_magnitude`` ``[out]``. Input ``(*, in_features)``, output ``(*, out_features)``."""

    def __init__(
        self,
        base: nn.Linear | NF4Weight,
        r: int = 16,
        lora_alpha: float = 32,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        quantize: str | None = None,
        double_quant: bool = True,
        blocksize: int = 64,
        adapter_dtype: torch.dtype = torch.float32,
        init_lora_weights: bool | str = True,
        bias: torch.Tensor | None = None,
    ) -> None:
        """``base``: an ``nn.Linear`` (its weight is kept, or quantized with ``quantize="nf4"``) or an
        already-quantized ``NF4Weight`` ``[out, in]`` (then ``bias`` may be given separately)."""
        super().__init__()
        if isinstance(base, NF4Weight):
            if len(base.shape) != 2:
                raise ValueError(f"base must be a 2-D [out, in] NF4Weight, got shape {tuple(base.shape)}")
            out_features, in_features = base.shape
        elif isinstance(base, nn.Linear):
            out_features, in_features = base.out_features, base.in_features
            check_linear_weight(base, "base.weight")
            if quantize != "nf4" and not isinstance(base.weight, nn.Parameter):
                # (a computed weight: it cannot be frozen, and held as a plain attribute it would be
                # left out of the state dict and of .to())
                raise ValueError(
                    f"base.weight is a {type(base.weight).__name__} computed on each access, not "
                    "an nn.Parameter (a parametrization, torch.nn.utils.parametrize): a LoRA layer "
                    "cannot freeze nor keep it; remove it first, keeping its values: parametrize."
                    "remove_parametrizations(base, 'weight', leave_parametrized=True)"
                )
            if bias is not None:
                raise ValueError("bias is taken from the nn.Linear; pass it only with an NF4Weight base")
            bias = base.bias
        else:
            raise TypeError(f"base must be an nn.Linear or an NF4Weight, got {type(base).__name__}")
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        # (a rank above min(in, out) is PEFT's too: apply_lora refuses it, adapters PEFT saved have it)
        if r > MAX_RANK:
            raise ValueError(f"r={r} is larger than hoptune's LoRA layers allow (at most {MAX_RANK})")
        if not _is_real(lora_alpha) or not math.isfinite(lora_alpha):
            raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}")
        check_lora_options(
            "lora_dropout",
            lora_dropout,
            init_lora_weights,
            use_rslora=use_rslora,
            use_dora=use_dora,
            double_quant=double_quant,
        )
        if quantize not in (None, "nf4"):
            raise ValueError(f"quantize must be None or 'nf4', got {quantize!r}")
        if quantize == "nf4" and isinstance(base, nn.Linear):
            check_quantizable(base.weight, "base.weight")
            check_blocks(base.weight, "base.weight", blocksize)
        if adapter_dtype not in DENSE_DTYPES:  # (float8: no initialization, no matmul on most devices)
            raise TypeError(
                "adapter_dtype must be a floating-point dtype (bfloat16, float16, float32 or float64), "
                f"got {adapter_dtype!r}"
            )
        if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (out_features,)):
            got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias must have shape ({out_features},) (out_features), got {got}")
        self.in_features = in_features
        self.out_features = out_features
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.use_dora = use_dora
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.lora_dropout_p = lora_dropout
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.adapters_enabled = True
        self._nf4_meta: tuple | None = None

        if isinstance(base, NF4Weight):
            self.quantized = True
            self._set_nf4(base)
            device = base.device
        else:
            w = base.weight.detach()
            device = w.device
            self.quantized = quantize == "nf4"
            if self.quantized:
                self._set_nf4(quantize_nf4(w.contiguous(), blocksize=blocksize, double_quant=double_quant))
            else:  # the layer's own Parameter, frozen: weights tied to it (lm_head) stay tied
                self.weight = base.weight
                self.weight.requires_grad_(False)
        if isinstance(bias, nn.Parameter) and bias.device == device:
            self.bias = bias.requires_grad_(False)
        else:
            self.bias = None if bias is None else nn.Parameter(bias.detach().to(device), requires_grad=False)

        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=adapter_dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, dtype=adapter_dtype, device=device))
        self.lora_magnitude = (
            nn.Parameter(torch.empty(out_features, dtype=adapter_dtype, device=device)) if use_dora else None
        )
        self.reset_lora_parameters(init_lora_weights)

    # -- base weight ------------------------------------------------------------------------
    def _set_nf4(self, q: NF4Weight) -> None:
        register_nf4(self, q)

    @property
    def weight_nf4(self) -> NF4Weight:
        if not self.quantized:
            raise AttributeError("weight_nf4")  # (NF4Module.__getattr__ words it)
        return nf4_view(self)

    @property
    def base_dtype(self) -> torch.dtype:
        return self._nf4_meta[1] if self.quantized else self.weight.dtype

    def base_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The base weight ``[out, in]`` as a dense tensor (dequantized for NF4)."""
        if dtype is not None:
            check_dtype("dtype", dtype)
        if self.quantized:
            if dtype == torch.float64:  # (NF4 dequantizes to 16/32-bit floats; float32 is exact in float64)
                return dequantize_nf4(self.weight_nf4, torch.float32).to(dtype)
            return dequantize_nf4(self.weight_nf4, dtype)
        return self.weight if dtype is None else self.weight.to(dtype)

    # -- adapter ----------------------------------------------------------------------------
    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: bool | str = True) -> None:
        """PEFT's initializations: True (A kaiming-uniform, B zero), "gaussian" (A normal with std
        1/r, B zero) or False (both kaiming-uniform: a non-trivial adapter, for tests); the DoRA
        magnitude then ||W + s B A|| per row."""
        check_init_lora_weights(init_lora_weights)
        if self.lora_A.device.type == "meta":
            return
        if init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init_lora_weights is False:
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)
        if self.lora_magnitude is not None:
            self.lora_magnitude.copy_(self.weight_row_norms(include_lora=True).to(self.lora_magnitude.dtype))

    @torch.no_grad()
    def weight_row_norms(self, include_lora: bool = True) -> torch.Tensor:
        """fp32 ``||W + s B A||`` per output row (``||W||`` with include_lora=False; fp64 for a
        float64 base), in row chunks so the fp32 temporary stays small (an NF4 base is dequantized
        once, transiently)."""
        w = self.base_weight()
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        out = torch.empty(self.out_features, dtype=acc, device=w.device)
        # autocast off: it would run B @ A in its own dtype, and (torch < 2.10) cache its cast of
        # A made here, without grad, for the forward's own products, which then give A no gradient
        with _amp.off(self.lora_A.device):
            a = self.lora_A.to(acc)
            for r0 in range(0, self.out_features, _NORM_ROWS):
                r1 = min(self.out_features, r0 + _NORM_ROWS)
                rows = w[r0:r1].to(acc)
                if include_lora:
                    rows = rows + self.scaling * (self.lora_B[r0:r1].to(acc) @ a)
                out[r0:r1] = torch.linalg.vector_norm(rows, dim=1)
        return out

    def lora_delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``s * B @ A`` as a dense ``[out, in]`` tensor, computed in ``dtype`` (also inside an
        autocast block, which would otherwise round the product to its own dtype)."""
        check_dtype("dtype", dtype)
        with _amp.off(self.lora_A.device):
            return (self.scaling * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))).to(dtype)

    @torch.no_grad()
    def merged_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight of the equivalent plain linear layer: ``W + s B A`` (DoRA: ``m/n * (W + s B A)``)."""
        dtype = dtype or self.base_dtype
        check_dtype("dtype", dtype)  # (the sum below would be rounded to any dtype, integers too)
        # in fp32, or fp64 for a float64 base or result: fp32 would round every weight
        acc = torch.float64 if torch.float64 in (dtype, self.base_dtype) else torch.float32
        w = self.base_weight(acc) + self.lora_delta(acc)
        if self.use_dora:
            n = torch.linalg.vector_norm(w, dim=1).clamp_min(DORA_EPS)
            w = w * (self.lora_magnitude.to(acc) / n)[:, None]
        return w.to(dtype)

    @contextmanager
    def disable_adapter(self):
        """Within the block the layer computes its base only (e.g. the DPO reference model)."""
        prev = self.adapters_enabled
        self.adapters_enabled = False
        try:
            yield self
        finally:
            self.adapters_enabled = prev

    # -- forward ----------------------------------------------------------------------------
    def _base(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.quantized:
            return nf4_call(self, x, None, None, 0.0, bias)
        return F.linear(x, self.weight.to(x.dtype), bias)

    def _check_input(self, x: torch.Tensor) -> None:
        if self.quantized:
            check_input(x, self.in_features, FLOAT_DTYPES, nf4_device(self), "NF4 weight")
        else:
            w = self._parameters.get("weight")  # (None when held elsewhere, a parametrization)
            check_input(x, self.in_features, DENSE_DTYPES, (self.weight if w is None else w).device, "weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)  # once, for every path below
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        if not self.adapters_enabled:
            return self._base(x, bias)
        # (a cast only when the dtypes differ: .to() returning the tensor itself still costs
        # host time on every call)
        params = self._parameters  # (nn.Module's __getattr__ costs ~1 us per parameter)
        a, b = params.get("lora_A"), params.get("lora_B")
        if a is None or b is None:  # held elsewhere (a parametrization)
            a, b = self.lora_A, self.lora_B
        if a.dtype != x.dtype:
            a = a.to(x.dtype)
        if b.dtype != x.dtype:
            b = b.to(x.dtype)
        dropout_active = self.training and self.lora_dropout_p > 0
        if self.use_dora:
            with torch.no_grad():
                n = self.weight_row_norms(include_lora=True).clamp_min(DORA_EPS)
            mn = self.lora_magnitude.to(n.dtype) / n
            # m/n and the bias in the products' dtype: x's, or autocast's (as PEFT's DoRA output, and
            # the LoRA path's), not promoted to float32
            if dropout_active:  # PEFT's form: x W^T + (m/n - 1) d W^T + (m/n) s B A d, d = dropout(x)
                d = self.lora_dropout(x)
                lora = self.scaling * F.linear(F.linear(d, a), b)
                y = self._base(x, None)
                mn = mn.to(y.dtype)
                y = y + (mn - 1) * self._base(d, None) + mn * lora
            else:  # (m/n) (x W^T + s B A x), the LoRA term fused where the base is NF4
                y = self._lora_sum(x, a, b)
                y = mn.to(y.dtype) * y
            if bias is None:
                return y
            return y + (bias if bias.dtype == y.dtype else bias.to(y.dtype))
        if self.quantized and not dropout_active:
            return nf4_call(self, x, a, b, self.scaling, bias)
        y = self._base(x, bias)
        return y + self.scaling * F.linear(F.linear(self.lora_dropout(x), a), b)

    def _lora_sum(self, x, a, b) -> torch.Tensor:
        """x W^T + s B(A(x)) without bias."""
        if self.quantized:
            return nf4_call(self, x, a, b, self.scaling, None)
        return self._base(x, None) + self.scaling * F.linear(F.linear(x, a), b)

    # -- conversion -------------------------------------------------------------------------
    def to_linear(self, merge: bool = True, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain ``nn.Linear``: merged (``W + s B A``, or the DoRA form) or the base alone."""
        dtype = dtype or self.base_dtype
        w = self.merged_weight(dtype) if merge else self.base_weight(dtype)
        lin = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None, device=w.device, dtype=dtype
        )
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias.to(dtype))
        return lin

    def extra_repr(self) -> str:
        if self.quantized:  # (as NF4Linear's)
            dq = ", double_quant" if self.weight_absmax2 is not None else ""
            base = f"nf4(blocksize={self._nf4_meta[2]}{dq})"
        else:
            base = str(self.weight.dtype)
        kind = "rslora" if self.use_rslora else "lora"
        if self.use_dora:  # (DoRA's LoRA term takes rsLoRA's scaling too)
            kind = "dora+rslora" if self.use_rslora else "dora"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, base={base}, "
            f"{kind}(r={self.r}, alpha={self.lora_alpha}, dropout={self.lora_dropout_p}), bias={self.bias is not None}"
        )
