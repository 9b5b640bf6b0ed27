"""``torch.ops.hoptune.nf4_lora_linear``: y = x @ deq(W)^T + s * (x @ A^T) @ B^T (+ bias).

W is an NF4 weight ``[N, K]`` (frozen), A ``[r, K]`` and B ``[N, r]`` the LoRA factors, bias
frozen. Gradients flow to x, A and B. The forward saves only x and ``xa = x @ A^T`` (M x r): the
backward dequantizes W again (one bandwidth-bound pass into a transient buffer) instead of
keeping a bf16 copy of W between the passes.

On sm_90 the dequantize runs the NF4 kernel and the products run on cuBLAS; elsewhere the
reference (hoptune.reference.nf4_lora) runs the same math.
"""

from __future__ import annotations

import torch

from hoptune.ops import _check
from hoptune.ops import nf4 as nf4_ops
from hoptune.reference import nf4_lora as ref

MAX_RANK = 256


def _deq(packed, absmax, absmax2, code2, offset, blocksize, blocksize2, n, k, dtype, inside_op=False):
    # inside an op's implementation call the kernel directly (no second dispatch); the backward
    # formula is traced by torch.compile, so there it must go through the registered op
    fn = nf4_ops.dequantize_impl if inside_op else nf4_ops.nf4_dequantize
    return fn(packed, absmax, absmax2, code2, offset, blocksize, blocksize2, [n, k], dtype)


@torch.library.custom_op("hoptune::nf4_lora_linear", mutates_args=())
def nf4_lora_linear_op(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    offset: float,
    blocksize: int,
    blocksize2: int,
    out_features: int,
    lora_A: torch.Tensor | None,
    lora_B: torch.Tensor | None,
    scale: float,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (*, K) -> (y (*, N), xa (M, r)); xa is empty without LoRA."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    w = _deq(packed, absmax, absmax2, code2, offset, blocksize, blocksize2, out_features, k, x.dtype, True)
    y, xa = ref.lora_forward(x2, w, lora_A, lora_B, scale, bias)
    if xa is None:
        xa = x2.new_empty(0)
    return y.view(*x.shape[:-1], out_features), xa


@nf4_lora_linear_op.register_fake
def _(
    x,
    packed,
    absmax,
    absmax2,
    code2,
    offset,
    blocksize,
    blocksize2,
    out_features,
    lora_A,
    lora_B,
    scale,
    bias,
):
    m = x.numel() // x.shape[-1]
    r = 0 if lora_A is None else lora_A.shape[0]
    xa = x.new_empty(m, r) if r else x.new_empty(0)
    return x.new_empty(*x.shape[:-1], out_features), xa


def _setup_context(ctx, inputs, output):
    (
        x,
        packed,
        absmax,
        absmax2,
        code2,
        offset,
        blocksize,
        blocksize2,
        out_features,
        lora_A,
        lora_B,
        scale,
        _bias,
    ) = inputs
    _, xa = output
    ctx.meta = (offset, blocksize, blocksize2, out_features, scale)
    ctx.save_for_backward(x, xa, packed, absmax, absmax2, code2, lora_A, lora_B)
    ctx.has_lora = lora_A is not None


def _backward(ctx, grad_y, grad_xa):
    x, xa, packed, absmax, absmax2, code2, lora_A, lora_B = ctx.saved_tensors
    offset, blocksize, blocksize2, n, scale = ctx.meta
    k = x.shape[-1]
    need_x, need_A, need_B = ctx.needs_input_grad[0], ctx.needs_input_grad[9], ctx.needs_input_grad[10]
    g2 = grad_y.reshape(-1, n)
    x2 = x.reshape(-1, k)
    w = _deq(packed, absmax, absmax2, code2, offset, blocksize, blocksize2, n, k, x.dtype) if need_x else None
    dx, da, db = ref.lora_backward(
        g2, x2, xa if ctx.has_lora else None, w, lora_A, lora_B, scale, need_x, need_A, need_B
    )
    if dx is not None:
        dx = dx.view(x.shape)
    return dx, None, None, None, None, None, None, None, None, da, db, None, None


nf4_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


def nf4_lora_linear(
    x: torch.Tensor,
    w_nf4,
    lora_A: torch.Tensor | None = None,
    lora_B: torch.Tensor | None = None,
    scale: float = 1.0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ deq(W)^T + scale * (x @ A^T) @ B^T (+ bias).

    x (*, K) bf16/fp16/fp32; w_nf4 an NF4Weight of shape (N, K); lora_A (r, K) and lora_B (N, r)
    in x's dtype (both or neither); bias (N,). Returns (*, N) in x's dtype.
    """
    from hoptune.quant.nf4 import FLOAT_DTYPES, NF4Weight

    _check.tensor("x", x)
    _check.dtype_in("x", x, FLOAT_DTYPES)
    if not isinstance(w_nf4, NF4Weight):
        raise TypeError(
            f"w_nf4 must be an NF4Weight (hoptune.quant.quantize_nf4), got {type(w_nf4).__name__}"
        )
    if len(w_nf4.shape) != 2:
        raise ValueError(f"w_nf4 must be 2-D [out_features, in_features], got shape {tuple(w_nf4.shape)}")
    n, k = w_nf4.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(
            f"x must have last dim in_features={k} (w_nf4 is [{n}, {k}]), got shape {tuple(x.shape)}"
        )
    if (lora_A is None) != (lora_B is None):
        raise ValueError("lora_A and lora_B must be given together (or neither)")
    if lora_A is not None:
        _check.tensor("lora_A", lora_A)
        _check.tensor("lora_B", lora_B)
        if lora_A.dim() != 2 or lora_A.shape[1] != k:
            raise ValueError(f"lora_A must be [r, in_features={k}], got {tuple(lora_A.shape)}")
        r = lora_A.shape[0]
        if r == 0:
            raise ValueError("lora_A has rank r = 0; LoRA needs r >= 1 (pass lora_A=None for no adapter)")
        if r > MAX_RANK:
            raise ValueError(f"rank r = {r} exceeds the supported maximum {MAX_RANK}")
        if lora_B.dim() != 2 or tuple(lora_B.shape) != (n, r):
            raise ValueError(f"lora_B must be [out_features={n}, r={r}], got {tuple(lora_B.shape)}")
        for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
            if t.dtype != x.dtype:
                raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    if bias is not None:
        _check.tensor("bias", bias)
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias must be [out_features={n}], got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias must have x's dtype {x.dtype}, got {bias.dtype}")
    _check.same_device(x=x, w_nf4=w_nf4.packed, lora_A=lora_A, lora_B=lora_B, bias=bias)
    y, _ = nf4_lora_linear_op(
        x,
        w_nf4.packed,
        w_nf4.absmax,
        w_nf4.absmax2,
        w_nf4.code2,
        w_nf4.offset,
        w_nf4.blocksize,
        w_nf4.blocksize2,
        n,
        lora_A,
        lora_B,
        float(scale),
        bias,
    )
    return y
