"""Pure-PyTorch NF4 quantize / dequantize, bit-identical to csrc/kernels/nf4.cu.

Every rounding step is one fp32 operation in the same order as the kernel (and bitsandbytes):
``x * (1/absmax)``, strict ``>`` against the code midpoints, ``code[q] * absmax`` rounded once to
the output dtype, and for double quantization ``code2[qa] * absmax2`` then ``+ offset``.
"""

from __future__ import annotations

import torch

# bitsandbytes' NF4 code values, nibble 0..15.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# Midpoints between consecutive codes: the fp32 values bitsandbytes' (and our) compiled CUDA code
# compares against, given as bit patterns. They are written there as decimal literals with an
# f suffix, which the compiler rounds straight to fp32; four of them are fp32 ties for which
# Python's decimal -> double -> fp32 route rounds the other way (e.g. 0x3f5c89d9 vs 0x3f5c89da).
NF4_MIDPOINT_BITS = (
    0xBF591CD9,  # -0.8480964004993439
    0xBF1C5270,  # -0.6106329262256622
    0xBEEB8480,  # -0.4599952697753906
    0xBEADEA76,  # -0.33967943489551544
    0xBE703CEC,  # -0.23460740596055984
    0xBE0D38BC,  # -0.13791173323988914
    0xBD3A7871,  # -0.045525018125772476
    0x3D22FAFF,  # 0.03979014977812767
    0x3DF64863,  # 0.1202552504837513
    0x3E5067E0,  # 0.2035212516784668
    0x3E9582D4,  # 0.2920137718319893
    0x3EC753F9,  # 0.3893125355243683
    0x3F006D03,  # 0.5016634166240692
    0x3F248DAF,  # 0.6427869200706482
    0x3F5C89D9,  # 0.8614784181118011
)


def nf4_midpoints(device: torch.device | str | None = None) -> torch.Tensor:
    bits = torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in NF4_MIDPOINT_BITS], dtype=torch.int32)
    return bits.view(torch.float32).to(device)


NF4_MIDPOINTS = tuple(nf4_midpoints().tolist())
ZERO_CODE = 7  # code value 0.0: what an all-zero block stores (exact zeros after dequantize)

# Elements handled per step on the CPU so temporaries stay small for 8B-sized layers.
_CHUNK = 1 << 24


def nf4_code(device: torch.device | str | None = None) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' signed dynamic 8-bit map (256 sorted fp32 values) used for nested absmax."""
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    i = 0
    for i in range(max_exponent_bits):
        fraction_items = int(
            2 ** (i + non_sign_bits - max_exponent_bits) + 1
            if signed
            else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1
        )
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    data += [0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def nf4_quantize(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (any shape, numel % blocksize == 0) -> (packed uint8 [n/2], absmax fp32 [n/blocksize])."""
    flat = x.reshape(-1)
    n = flat.numel()
    nb = n // blocksize
    absmax = torch.empty(nb, dtype=torch.float32, device=x.device)
    packed = torch.empty(n // 2, dtype=torch.uint8, device=x.device)
    mids = nf4_midpoints(x.device)
    step = max(1, _CHUNK // blocksize)
    for b0 in range(0, nb, step):
        b1 = min(nb, b0 + step)
        blk = flat[b0 * blocksize : b1 * blocksize].float().view(-1, blocksize)
        amax = blk.abs().amax(dim=1)
        recip = torch.full_like(amax, 1.0) / amax  # fp32 division; inf for an all-zero block
        scaled = blk * recip[:, None]
        # bucketize(right=False) counts the midpoints strictly below x, i.e. x > mid; but it puts
        # NaN last, which is above no midpoint: code 0, as the kernel's comparisons give (a zero
        # in a block of subnormals, whose 1/absmax overflows: 0 * inf)
        q = torch.bucketize(scaled, mids, right=False).to(torch.uint8)
        q[scaled.isnan()] = 0
        q[amax == 0] = ZERO_CODE
        q = q.view(-1, 2)
        packed[b0 * blocksize // 2 : b1 * blocksize // 2] = (q[:, 0] << 4) | q[:, 1]
        absmax[b0:b1] = amax
    return packed, absmax


def _quantize_dynamic(code: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' 8-bit binary search (dQuantize<0>), vectorized step for step."""
    shape = x.shape
    x = x.reshape(-1)
    pivot = torch.full_like(x, 127, dtype=torch.int64)
    upper_pivot = torch.full_like(pivot, 255)
    lower_pivot = torch.zeros_like(pivot)
    lower = torch.full_like(x, -1.0)
    upper = torch.full_like(x, 1.0)
    val = code[pivot]
    i = 64
    while i > 0:
        gt = x > val
        lower_pivot = torch.where(gt, pivot, lower_pivot)
        lower = torch.where(gt, val, lower)
        upper_pivot = torch.where(gt, upper_pivot, pivot)
        upper = torch.where(gt, upper, val)
        pivot = torch.where(gt, pivot + i, pivot - i)
        val = code[pivot]
        i >>= 1
    upper = torch.where(upper_pivot == 255, code[upper_pivot], upper)
    lower = torch.where(lower_pivot == 0, code[lower_pivot], lower)
    gt = x > val
    mid_up = (upper + val) * 0.5
    mid_lo = (lower + val) * 0.5
    q = torch.where(
        gt,
        torch.where(x > mid_up, upper_pivot, pivot),
        torch.where(x < mid_lo, lower_pivot, pivot),
    )
    return q.to(torch.uint8).view(shape)


def nf4_quantize_nested(
    absmax: torch.Tensor, code2: torch.Tensor, offset: float, blocksize2: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Double quantization: absmax fp32 [nb] -> (qabsmax uint8 [nb], absmax2 fp32 [ceil(nb/bs2)])."""
    nb = absmax.numel()
    nb2 = -(-nb // blocksize2)
    off = torch.tensor(offset, dtype=torch.float32, device=absmax.device)
    centered = absmax.float() - off
    padded = torch.zeros(nb2 * blocksize2, dtype=torch.float32, device=absmax.device)
    padded[:nb] = centered
    blk = padded.view(nb2, blocksize2)
    amax2 = blk.abs().amax(dim=1)
    recip = torch.full_like(amax2, 1.0) / amax2
    scaled = (blk * recip[:, None]).reshape(-1)[:nb]
    q = _quantize_dynamic(code2.to(device=absmax.device, dtype=torch.float32), scaled)
    return q, amax2


def decode_absmax(
    absmax: torch.Tensor,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    offset: float,
    blocksize2: int,
) -> torch.Tensor:
    """The fp32 per-block absmax; for nested storage ``code2[qa] * absmax2 + offset`` (two roundings)."""
    if absmax2 is None:
        return absmax.float()
    assert code2 is not None
    scale = absmax2.float().repeat_interleave(blocksize2)[: absmax.numel()]
    vals = code2.float()[absmax.long()] * scale
    return vals + torch.tensor(offset, dtype=torch.float32, device=absmax.device)


def nf4_dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    offset: float,
    blocksize: int,
    blocksize2: int,
    shape: list[int] | torch.Size,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Inverse of nf4_quantize: ``dtype(code[q] * absmax)`` reshaped to ``shape``."""
    am = decode_absmax(absmax, absmax2, code2, offset, blocksize2)
    code = nf4_code(packed.device)
    flat = packed.reshape(-1)
    n = flat.numel() * 2
    out = torch.empty(n, dtype=dtype, device=packed.device)
    step = max(blocksize, (_CHUNK // blocksize) * blocksize)
    for e0 in range(0, n, step):
        e1 = min(n, e0 + step)
        p = flat[e0 // 2 : e1 // 2]
        q = torch.stack(((p >> 4), (p & 0xF)), dim=1).reshape(-1).long()
        scale = am[e0 // blocksize : e1 // blocksize].repeat_interleave(blocksize)
        out[e0:e1] = (code[q] * scale).to(dtype)
    return out.view(shape)


def merge_lora(w: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """w [N, K] + scale * lora_B [N, r] @ lora_A [r, K], in fp32, rounded once to w's dtype."""
    return torch.addmm(w.float(), lora_B.float(), lora_A.float(), alpha=scale).to(w.dtype)
