"""A decoder layer's elementwise ops, fused: ``rms_norm``, ``silu_mul`` (SwiGLU) and ``rope``.

In eager PyTorch a Llama-family layer spends a large share of its non-GEMM time in these: the
RMSNorm is seven kernels over fp32 copies of the row, the SwiGLU step two (and three backward),
the rotary embedding five a tensor with strided broadcasts. Each op here is one CUDA pass forward
and one backward (csrc/kernels/rms_norm.cu, silu_mul.cu, rope.cu) that rounds where the model's
own ops round, so swapping them in (hoptune.fuse_decoder_ops) leaves a model's outputs as they
were: bit for bit for silu_mul and rope, and for rms_norm but for the order of the row's fp32 sum.

Dispatch: bf16 / fp16 CUDA tensors on sm_90 run the kernels; anything else (CPU, fp32, a
weight of another dtype, a row width not a multiple of 8 or a head dim not of 16) runs the
reference (hoptune/reference/decoder.py), which is the model's computation itself.
Eager calls go through plain autograd Functions; torch.compile traces the custom ops
(torch.ops.hoptune.rms_norm and friends), which carry fake kernels and autograd.
"""

from __future__ import annotations

import torch

from hoptune import _lib
from hoptune.ops import _check
from hoptune.ops._function import eager_function
from hoptune.reference import decoder as ref

KERNEL_DTYPES = (torch.bfloat16, torch.float16)


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0


def _rows(t: torch.Tensor, cols: int) -> torch.Tensor:
    """``t`` (*, cols) as a (rows, cols) view the kernels take (unit column stride, a row stride of
    at least cols and a multiple of 8, 16-byte aligned), else a contiguous copy."""
    if t.stride(-1) == 1:
        try:
            v = t.view(-1, cols)
        except RuntimeError:  # (leading dims that do not collapse into one stride)
            v = None
        if (
            v is not None
            and _aligned(v)
            and v.stride(0) % 8 == 0
            and (v.shape[0] <= 1 or v.stride(0) >= cols)
        ):
            return v
    return t.clone(memory_format=torch.contiguous_format).view(-1, cols)


def _flat(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and 16-byte aligned (a copy only when it is not)."""
    return t if t.is_contiguous() and _aligned(t) else t.clone(memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------------------------
# rms_norm
# --------------------------------------------------------------------------------------------
def _rms_norm_impl(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x (*, H), weight (H,) -> y (*, H), rstd (*) fp32 (the kernel; callers checked the inputs)."""
    cols = x.shape[-1]
    x2, weight = _rows(x, cols), _flat(weight)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    _lib.extension().rms_norm_forward(
        x2.data_ptr(),
        x2.stride(0),
        weight.data_ptr(),
        y.data_ptr(),
        cols,
        rstd.data_ptr(),
        x2.shape[0],
        cols,
        float(eps),
        _lib.DTYPE_CODES[x.dtype],
        _lib.stream(x),
    )
    return y, rstd


def _rms_norm_backward_impl(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> torch.Tensor:
    """dy, x (*, H), weight (H,), rstd (*) -> dx (*, H)."""
    cols = x.shape[-1]
    dy2, x2, weight = _rows(dy, cols), _rows(x, cols), _flat(weight)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _lib.extension().rms_norm_backward(
        dy2.data_ptr(),
        dy2.stride(0),
        x2.data_ptr(),
        x2.stride(0),
        weight.data_ptr(),
        rstd.data_ptr(),
        dx.data_ptr(),
        cols,
        x2.shape[0],
        cols,
        _lib.DTYPE_CODES[x.dtype],
        _lib.stream(x),
    )
    return dx


_rms_norm_op = torch.library.custom_op("hoptune::rms_norm", _rms_norm_impl, mutates_args=())
_rms_norm_backward_op = torch.library.custom_op(
    "hoptune::rms_norm_backward", _rms_norm_backward_impl, mutates_args=()
)


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


@_rms_norm_backward_op.register_fake
def _(dy, x, weight, rstd):
    return x.new_empty(x.shape)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.mark_non_differentiable(output[1])


def _rms_norm_backward(ctx, dy, _drstd, traced: bool = True):
    x, weight, rstd = ctx.saved_tensors
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = (_rms_norm_backward_op if traced else _rms_norm_backward_impl)(dy, x, weight, rstd)
    if ctx.needs_input_grad[1]:
        # (a full fine-tune's norm weight: the product autograd forms, dy * round(x * rstd), summed
        # over the rows in fp32)
        h = (x.float() * rstd.unsqueeze(-1)).to(x.dtype)
        dw = (dy * h).reshape(-1, x.shape[-1]).sum(0, dtype=torch.float32).to(weight.dtype)
    return dx, dw, None


_rms_norm_op.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)
_EagerRmsNorm = eager_function("RmsNorm", _rms_norm_impl, _rms_norm_setup, _rms_norm_backward)


def rms_norm_runs(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether rms_norm(x, weight) runs the kernel (else the reference)."""
    return (
        x.dtype in KERNEL_DTYPES
        and weight.dtype == x.dtype
        and x.shape[-1] > 0
        and x.shape[-1] % 8 == 0
        and 0 < x.numel() // x.shape[-1] < 2**31  # (rows: the kernel's grid)
        and _lib.use_kernel(x, "rms_norm")
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LlamaRMSNorm: ``weight * (x * rsqrt(mean(x^2, -1) + eps))``, the statistics in fp32 and the
    normalized x rounded to x's dtype before the weight's product (as the model does).

    x (*, H), weight (H,) -> (*, H) in the dtype of ``weight * x`` (x's when they match).
    """
    _check.tensor("x", x)
    _check.tensor("weight", weight)
    _check.floating("x", x)
    _check.floating("weight", weight)
    if weight.dim() != 1 or x.dim() < 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"weight must be 1-D with x's last dimension ({x.shape[-1] if x.dim() else '?'}), "
            f"got weight {tuple(weight.shape)} for x {tuple(x.shape)}"
        )
    _check.same_device(x=x, weight=weight)
    if not rms_norm_runs(x, weight):
        return ref.rms_norm(x, weight, eps)
    if torch.compiler.is_compiling():
        return _rms_norm_op(x, weight, float(eps))[0]
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return _rms_norm_impl(x, weight, eps)[0]
    return _EagerRmsNorm.apply(x, weight, float(eps))[0]


# --------------------------------------------------------------------------------------------
# silu_mul
# --------------------------------------------------------------------------------------------
def _silu_mul_impl(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up (*, I) -> silu(gate) * up (*, I)."""
    gate, up = _flat(gate), _flat(up)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    _lib.extension().silu_mul_forward(
        gate.data_ptr(),
        up.data_ptr(),
        out.data_ptr(),
        gate.numel(),
        _lib.DTYPE_CODES[gate.dtype],
        _lib.stream(gate),
    )
    return out


def _silu_mul_backward_impl(
    dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """dout, gate, up (*, I) -> d gate, d up (*, I)."""
    dout, gate, up = _flat(dout), _flat(gate), _flat(up)
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty_like(dgate)
    _lib.extension().silu_mul_backward(
        dout.data_ptr(),
        gate.data_ptr(),
        up.data_ptr(),
        dgate.data_ptr(),
        dup.data_ptr(),
        gate.numel(),
        _lib.DTYPE_CODES[gate.dtype],
        _lib.stream(gate),
    )
    return dgate, dup


_silu_mul_op = torch.library.custom_op("hoptune::silu_mul", _silu_mul_impl, mutates_args=())
_silu_mul_backward_op = torch.library.custom_op(
    "hoptune::silu_mul_backward", _silu_mul_backward_impl, mutates_args=()
)


@_silu_mul_op.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@_silu_mul_backward_op.register_fake
def _(dout, gate, up):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _silu_mul_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _silu_mul_backward(ctx, dout, traced: bool = True):
    gate, up = ctx.saved_tensors
    dgate, dup = (_silu_mul_backward_op if traced else _silu_mul_backward_impl)(dout, gate, up)
    return (dgate if ctx.needs_input_grad[0] else None), (dup if ctx.needs_input_grad[1] else None)


_silu_mul_op.register_autograd(_silu_mul_backward, setup_context=_silu_mul_setup)
_EagerSiluMul = eager_function("SiluMul", _silu_mul_impl, _silu_mul_setup, _silu_mul_backward)


def silu_mul_runs(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether silu_mul(gate, up) runs the kernel (else the reference)."""
    return (
        gate.dtype in KERNEL_DTYPES
        and up.dtype == gate.dtype
        and gate.shape == up.shape
        and gate.numel() > 0
        and _lib.use_kernel(gate, "silu_mul")
    )


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's elementwise step: ``silu(gate) * up`` (silu(gate) rounded to the dtype before the
    product, as ``act_fn(gate) * up`` is). gate, up (*, I) of one shape -> (*, I)."""
    _check.tensor("gate", gate)
    _check.tensor("up", up)
    _check.floating("gate", gate)
    _check.floating("up", up)
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have one shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    _check.same_device(gate=gate, up=up)
    if not silu_mul_runs(gate, up):
        return ref.silu_mul(gate, up)
    if torch.compiler.is_compiling():
        return _silu_mul_op(gate, up)
    if not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)):
        return _silu_mul_impl(gate, up)
    return _EagerSiluMul.apply(gate, up)


# --------------------------------------------------------------------------------------------
# rope
# --------------------------------------------------------------------------------------------
def _rope_table(t: torch.Tensor) -> torch.Tensor:
    """cos or sin (B or 1, S, D) with a unit last stride, strides multiples of 8, aligned."""
    if t.stride(-1) == 1 and _aligned(t) and t.stride(0) % 8 == 0 and t.stride(1) % 8 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _rope_out(x: torch.Tensor) -> torch.Tensor:
    """The output of rope / its backward for x: x's layout (empty_like: the attention's transposed
    view of its projection) where the kernel can write it, else contiguous. Decided from x's shape
    and strides alone, so the fake kernels give the same layout."""
    out = torch.empty_like(x)
    if out.stride(-1) == 1 and all(s % 8 == 0 for s in out.stride()[:3]):
        return out
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def _rope_run(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    out = _rope_out(x)
    if not (x.stride(-1) == 1 and _aligned(x) and all(s % 8 == 0 for s in x.stride()[:3])):
        x = x.clone(memory_format=torch.contiguous_format)
    cos, sin = _rope_table(cos), _rope_table(sin)
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    b, h, s, d = x.shape
    _lib.extension().rope(
        x.data_ptr(),
        *x.stride()[:3],
        out.data_ptr(),
        *out.stride()[:3],
        cos.data_ptr(),
        sin.data_ptr(),
        cos.stride(0) if cos.shape[0] == b else 0,
        cos.stride(1),
        b,
        h,
        s,
        d,
        backward,
        _lib.DTYPE_CODES[x.dtype],
        _lib.stream(x),
    )
    return out


def _rope_impl(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, Hh, S, D), cos and sin (B or 1, S, D) -> (B, Hh, S, D)."""
    return _rope_run(x, cos, sin, False)


def _rope_backward_impl(grad: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The input gradient of _rope_impl: the rotation transposed, the same roundings."""
    return _rope_run(grad, cos, sin, True)


_rope_op = torch.library.custom_op("hoptune::rope", _rope_impl, mutates_args=())
_rope_backward_op = torch.library.custom_op("hoptune::rope_backward", _rope_backward_impl, mutates_args=())


@_rope_op.register_fake
def _(x, cos, sin):
    return _rope_out(x)


@_rope_backward_op.register_fake
def _(grad, cos, sin):
    return _rope_out(grad)


def _rope_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])  # (the backward needs no x)


def _rope_backward(ctx, grad, traced: bool = True):
    cos, sin = ctx.saved_tensors
    return (_rope_backward_op if traced else _rope_backward_impl)(grad, cos, sin), None, None


_rope_op.register_autograd(_rope_backward, setup_context=_rope_setup)
_EagerRope = eager_function("Rope", _rope_impl, _rope_setup, _rope_backward)


def rope_runs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether rope(x, cos, sin) runs the kernel (else the reference); shapes as rope takes them."""
    return (
        x.dtype in KERNEL_DTYPES
        and cos.dtype == x.dtype
        and sin.dtype == x.dtype
        and x.shape[-1] % 16 == 0
        and x.numel() > 0
        # (the kernel's grid: a batch and the heads of up to 65535, a head's rows in 32-bit indices)
        and x.shape[0] <= 65535
        and x.shape[1] <= 65535
        and x.shape[2] * x.shape[3] // 16 < 2**31 - 256
        and not cos.requires_grad
        and not sin.requires_grad
        and _lib.use_kernel(x, "rope")
    )


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of q or k, as transformers' apply_rotary_pos_emb:
    ``x * cos + rotate_half(x) * sin`` with cos and sin broadcast over the heads.

    x (B, Hh, S, D), cos and sin (B, S, D) or (1, S, D) -> (B, Hh, S, D).
    """
    for name, t in (("x", x), ("cos", cos), ("sin", sin)):
        _check.tensor(name, t)
        _check.floating(name, t)
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (batch, heads, seq, head_dim), got shape {tuple(x.shape)}")
    b, _, s, d = x.shape
    if (
        cos.shape != sin.shape
        or cos.dim() != 3
        or cos.shape[0] not in (1, b)
        or tuple(cos.shape[1:]) != (s, d)
    ):
        raise ValueError(
            f"cos and sin must both be ({b} or 1, {s}, {d}) for x {tuple(x.shape)}, "
            f"got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    if d % 2:
        raise ValueError(f"x's head_dim must be even (its halves are rotated), got {d}")
    _check.same_device(x=x, cos=cos, sin=sin)
    if not rope_runs(x, cos, sin):
        return ref.rope(x, cos, sin)
    if torch.compiler.is_compiling():
        return _rope_op(x, cos, sin)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return _rope_impl(x, cos, sin)
    return _EagerRope.apply(x, cos, sin)
