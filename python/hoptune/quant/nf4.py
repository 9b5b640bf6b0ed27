"""The NF4 weight type and its quantize / dequantize entry points (bitsandbytes-compatible)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from hoptune.ops import _check
from hoptune.ops import nf4 as nf4_ops
from hoptune.reference.nf4 import dynamic_map

BLOCKSIZES = nf4_ops.QUANT_BLOCKSIZES
NESTED_BLOCKSIZES = nf4_ops.NESTED_BLOCKSIZES
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _dtype_error(dtype: object) -> str:
    # a name ("bfloat16") printed bare would read as one of the dtypes allowed
    got = str(dtype) if isinstance(dtype, torch.dtype) else f"{dtype!r} (a {type(dtype).__name__})"
    allowed = "torch.bfloat16, torch.float16 or torch.float32"
    return f"dtype must be a torch.dtype ({allowed}), got {got}"


@dataclass(frozen=True, eq=False)  # (== of tensors is no bool: two states are equal when one)
class NF4Weight:
    """An NF4-quantized tensor in bitsandbytes' layout.

    packed:   uint8 ``[n/2]``, element 2j in the high nibble of byte j.
    absmax:   fp32 ``[n/blocksize]``, or uint8 codes of the same length when double-quantized.
    absmax2:  fp32 ``[ceil(nblocks/blocksize2)]`` (double quantization only).
    code2:    fp32 ``[256]`` signed dynamic map (double quantization only).
    offset:   mean of the absmax before double quantization (a Python float holding an fp32).
    shape, dtype: the original tensor's shape and dtype (what dequantize returns by default).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    absmax2: torch.Tensor | None = None
    code2: torch.Tensor | None = None
    offset: float = 0.0
    blocksize2: int = 256

    def __post_init__(self) -> None:
        _check.tensor("packed", self.packed)
        _check.tensor("absmax", self.absmax)
        if self.packed.dtype != torch.uint8:
            raise TypeError(f"packed must be uint8 codes, got {self.packed.dtype}")
        _check.contiguous("packed", self.packed)
        _check.contiguous("absmax", self.absmax)
        _check.same_device(packed=self.packed, absmax=self.absmax, absmax2=self.absmax2, code2=self.code2)
        # the fields as Python numbers (a NumPy blocksize, bitsandbytes' 0-d tensor offset): the
        # quant state is written as JSON, which takes no other numbers
        bs = _check.blocksize("blocksize", self.blocksize, BLOCKSIZES)
        object.__setattr__(self, "blocksize", bs)
        object.__setattr__(self, "offset", _check.real("offset", self.offset))
        try:
            shape = torch.Size(_check.integer("shape", d) for d in self.shape)
        except TypeError:
            raise TypeError(f"shape must be a sequence of ints, got {self.shape!r}") from None
        if any(d < 0 for d in shape):
            raise ValueError(f"shape must have sizes >= 0, got {tuple(shape)}")
        object.__setattr__(self, "shape", shape)
        n = self.packed.numel() * 2
        if n != math.prod(self.shape):
            raise ValueError(
                f"packed holds {n} codes but shape {tuple(self.shape)} has {math.prod(self.shape)} elements"
            )
        if n % self.blocksize or self.absmax.numel() != n // self.blocksize:
            raise ValueError(
                f"absmax must have numel/blocksize = {n // self.blocksize} values, got {self.absmax.numel()}"
            )
        if self.dtype not in FLOAT_DTYPES:
            raise TypeError(_dtype_error(self.dtype))
        if self.absmax2 is None:
            if self.absmax.dtype != torch.float32:
                raise TypeError(
                    f"absmax must be float32 without double quantization, got {self.absmax.dtype}"
                )
            return
        if self.code2 is None:
            raise ValueError("code2 (the nested quant map) is required with absmax2")
        bs2 = _check.blocksize("blocksize2", self.blocksize2, NESTED_BLOCKSIZES)
        object.__setattr__(self, "blocksize2", bs2)
        if self.absmax.dtype != torch.uint8:
            raise TypeError(f"absmax must be uint8 codes with double quantization, got {self.absmax.dtype}")
        nb2 = -(-self.absmax.numel() // self.blocksize2)
        if self.absmax2.dtype != torch.float32 or self.absmax2.numel() != nb2:
            raise ValueError(
                f"absmax2 must be float32 [{nb2}], got {self.absmax2.dtype} {tuple(self.absmax2.shape)}"
            )
        if self.code2.dtype != torch.float32 or self.code2.numel() != 256:
            raise ValueError(f"code2 must be float32 [256], got {self.code2.dtype} {tuple(self.code2.shape)}")
        _check.contiguous("absmax2", self.absmax2)
        _check.contiguous("code2", self.code2)
        if not math.isfinite(self.offset):
            raise ValueError(f"offset must be finite, got {self.offset}")

    @classmethod
    def trusted(
        cls,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        shape: torch.Size,
        dtype: torch.dtype,
        blocksize: int,
        absmax2: torch.Tensor | None,
        code2: torch.Tensor | None,
        offset: float,
        blocksize2: int,
    ) -> NF4Weight:
        """Build without re-validating: for layers that rebuild the view of buffers they validated
        when they were constructed (every forward; the checks would cost more than the op)."""
        obj = object.__new__(cls)
        fields = {
            "packed": packed,
            "absmax": absmax,
            "shape": shape,
            "dtype": dtype,
            "blocksize": blocksize,
            "absmax2": absmax2,
            "code2": code2,
            "offset": offset,
            "blocksize2": blocksize2,
        }
        for name, value in fields.items():
            object.__setattr__(obj, name, value)
        return obj

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def numel(self) -> int:
        return self.packed.numel() * 2

    @property
    def nbytes(self) -> int:
        ts = [self.packed, self.absmax, self.absmax2, self.code2]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    def to(self, device: torch.device | str) -> NF4Weight:
        if isinstance(device, torch.dtype):  # (else: "packed must be uint8 codes", about the copy)
            raise TypeError(
                f"NF4Weight.to takes a device, got the dtype {device}; the codes stay NF4 (dequantize("
                "dtype) returns the weight in another dtype)"
            )

        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return dataclasses.replace(
            self,
            packed=mv(self.packed),
            absmax=mv(self.absmax),
            absmax2=mv(self.absmax2),
            code2=mv(self.code2),
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_nf4(self, dtype)

    def __repr__(self) -> str:
        dq = f", double_quant(blocksize2={self.blocksize2})" if self.nested else ""
        return (
            f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}{dq}, "
            f"device={self.device}, {self.nbytes / 2**20:.2f} MiB)"
        )


def check_quantizable(w: torch.Tensor, name: str, dtype_hint: str = "") -> None:
    """Errors naming ``name`` for a weight quantize_nf4 cannot take: one on the meta device (not
    loaded yet) or of a dtype other than FLOAT_DTYPES (``dtype_hint`` ends that message)."""
    if w.is_meta:
        raise ValueError(f"{name} is on the meta device; load the weights first")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} is {w.dtype}; NF4 quantizes bfloat16, float16 or float32 weights{dtype_hint}"
        )


def check_nested_offset(offset: float) -> None:
    """The error for a double quantization whose offset, the mean of the block maxima (absmax), is
    not finite: fp32 weights near float32's limit are finite, but their absmax sum to inf (blocks
    of 3e38); bitsandbytes stores that offset, and its dequantize then gives NaN."""
    if not math.isfinite(offset):
        raise ValueError(
            f"double_quant=True cannot store these weights: the mean of their block maxima (absmax), "
            f"its offset, overflows float32 ({offset}); pass double_quant=False"
        )


def quantize_nf4(
    w: torch.Tensor, blocksize: int = 64, double_quant: bool = True, blocksize2: int = 256
) -> NF4Weight:
    """Quantize ``w`` (bf16/fp16/fp32, numel a multiple of ``blocksize``) to NF4.

    Produces bitsandbytes' bytes (``quantize_4bit(w, blocksize, compress_statistics=double_quant,
    quant_type="nf4")`` on CUDA), except that an all-zero block stores code 0.0 so it dequantizes
    to exact zeros. Runs the CUDA kernel for tensors on an sm_90 GPU, the reference elsewhere.
    """
    _check.tensor("w", w)
    if w.is_meta:  # (else the non-finite check below fails on .item() of a meta tensor)
        raise ValueError("w is on the meta device; load the weights first")
    _check.dtype_in("w", w, FLOAT_DTYPES)
    blocksize = _check.blocksize("blocksize", blocksize, BLOCKSIZES)
    _check.boolean("double_quant", double_quant)
    if double_quant:
        blocksize2 = _check.blocksize("blocksize2", blocksize2, NESTED_BLOCKSIZES)
    if not w.is_contiguous():
        raise ValueError(
            "w must be contiguous: NF4 blocks run along the flattened row-major order; pass w.contiguous() "
            f"(got strides {tuple(w.stride())} for shape {tuple(w.shape)})"
        )
    if w.numel() == 0 or w.numel() % blocksize:
        raise ValueError(
            f"w.numel() must be a positive multiple of blocksize={blocksize}, got {w.numel()} (shape {tuple(w.shape)})"
        )
    packed, absmax, bad = nf4_ops.nf4_quantize(w.detach(), blocksize)
    if bool(bad.item()):
        raise ValueError("w contains inf or NaN values; NF4 cannot represent them (check the checkpoint)")
    if not double_quant:
        return NF4Weight(packed, absmax, torch.Size(w.shape), w.dtype, blocksize)
    # offset: torch's mean on the tensor's device, as bitsandbytes computes it (CUDA and CPU sums
    # differ in order, so a CPU quantization may differ from a CUDA one by one nested code).
    offset = float(absmax.mean().item())
    check_nested_offset(offset)
    code2 = dynamic_map().to(w.device)
    qabsmax, absmax2 = nf4_ops.nf4_quantize_nested(absmax, code2, offset, blocksize2)
    return NF4Weight(
        packed, qabsmax, torch.Size(w.shape), w.dtype, blocksize, absmax2, code2, offset, blocksize2
    )


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantize to ``dtype`` (default: the original dtype): ``dtype(code[q] * absmax)``, shape restored."""
    if not isinstance(q, NF4Weight):
        raise TypeError(f"q must be an NF4Weight, got {type(q).__name__}")
    dtype = q.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(_dtype_error(dtype))
    return nf4_ops.nf4_dequantize(
        q.packed, q.absmax, q.absmax2, q.code2, q.offset, q.blocksize, q.blocksize2, list(q.shape), dtype
    )
