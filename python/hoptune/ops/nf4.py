"""NF4 ops: ``torch.ops.hoptune.nf4_quantize``, ``nf4_quantize_nested``, ``nf4_dequantize``.

Each is a torch.library custom op with a fake (meta) kernel, so quantized models trace and
compile; the CUDA kernel runs on sm_90 tensors and the reference (hoptune.reference.nf4)
everywhere else. hoptune.quant checks its arguments once; the dequantize ops check only that an
NF4 state's sizes agree with each other (host arithmetic: a kernel would read past a short absmax).
"""

from __future__ import annotations

import torch

from hoptune import _lib
from hoptune.ops import _check
from hoptune.reference import nf4 as ref

# The blocksizes the quantize kernel takes (hoptune.quant.nf4.BLOCKSIZES).
QUANT_BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
# The second-level blocksizes of double quantization (hoptune.quant.nf4.NESTED_BLOCKSIZES).
NESTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)

# Dequantize kernel version: 0 the default, 1 the same kernel without programmatic dependent
# launch (bf16 output, nested absmax; for bench/bench_nf4_dequant.py).
_DEQUANT_VARIANT = 0
# Merged dequantize (nf4_dequantize_lora) kernel version: 0 the default, 1 the same kernel with
# the previous stores at ranks up to 32 that are multiples of 8: each warp's 16 x 64 block leaves
# from the lanes' registers instead of by one bulk tensor store (TMA); for
# bench/bench_nf4_dequant.py.
_MERGE_VARIANT = 0


@torch.library.custom_op("hoptune::nf4_quantize", mutates_args=())
def nf4_quantize(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (numel % blocksize == 0) -> (packed uint8 [n/2], absmax fp32 [n/bs], non_finite int32 [1])."""
    n = x.numel()
    # (the kernel refuses these; the reference would drop a trailing partial block silently)
    _check.blocksize("blocksize", blocksize, QUANT_BLOCKSIZES)
    if n == 0 or n % blocksize:
        raise ValueError(
            f"x.numel() must be a positive multiple of blocksize={blocksize}, got {n} (shape {tuple(x.shape)})"
        )
    # (the kernel reads fp32, fp16 and bf16; other dtypes, fp64 among them, take the reference)
    if x.dtype not in _lib.DTYPE_CODES or not _lib.use_kernel(x, "nf4_quantize"):
        packed, absmax = ref.nf4_quantize(x, blocksize)
        bad = (~torch.isfinite(x)).any().to(torch.int32).reshape(1)
        return packed, absmax, bad
    x = x.contiguous()
    packed = torch.empty(n // 2, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(n // blocksize, dtype=torch.float32, device=x.device)
    bad = torch.zeros(1, dtype=torch.int32, device=x.device)
    _lib.extension().nf4_quantize(
        x.data_ptr(),
        _lib.DTYPE_CODES[x.dtype],
        n,
        blocksize,
        packed.data_ptr(),
        absmax.data_ptr(),
        bad.data_ptr(),
        _lib.stream(x),
    )
    return packed, absmax, bad


@nf4_quantize.register_fake
def _(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = x.numel()
    return (
        x.new_empty(n // 2, dtype=torch.uint8),
        x.new_empty(n // blocksize, dtype=torch.float32),
        x.new_empty(1, dtype=torch.int32),
    )


@torch.library.custom_op("hoptune::nf4_quantize_nested", mutates_args=())
def nf4_quantize_nested(
    absmax: torch.Tensor, code2: torch.Tensor, offset: float, blocksize2: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """absmax fp32 [nb] -> (qabsmax uint8 [nb], absmax2 fp32 [ceil(nb/bs2)])."""
    # (the kernel reads 256 code values, absmax as fp32 and a power-of-two blocksize2)
    blocksize2 = _check.blocksize("blocksize2", blocksize2, NESTED_BLOCKSIZES)
    if code2.numel() != 256:
        raise ValueError(f"code2 must hold the 256 values of the 8-bit dynamic code, got {code2.numel()}")
    if absmax.numel() == 0:
        raise ValueError("absmax must hold at least one block maximum, got an empty tensor")
    if not _lib.use_kernel(absmax, "nf4_quantize_nested"):
        return ref.nf4_quantize_nested(absmax, code2, offset, blocksize2)
    nb = absmax.numel()
    absmax = absmax.to(torch.float32).contiguous()  # (the reference computes in fp32 too)
    code2 = code2.to(device=absmax.device, dtype=torch.float32).contiguous()
    qabsmax = torch.empty(nb, dtype=torch.uint8, device=absmax.device)
    absmax2 = torch.empty(-(-nb // blocksize2), dtype=torch.float32, device=absmax.device)
    _lib.extension().nf4_quantize_nested(
        absmax.data_ptr(),
        nb,
        offset,
        code2.data_ptr(),
        blocksize2,
        qabsmax.data_ptr(),
        absmax2.data_ptr(),
        _lib.stream(absmax),
    )
    return qabsmax, absmax2


@nf4_quantize_nested.register_fake
def _(
    absmax: torch.Tensor, code2: torch.Tensor, offset: float, blocksize2: int
) -> tuple[torch.Tensor, torch.Tensor]:
    nb = absmax.numel()
    return absmax.new_empty(nb, dtype=torch.uint8), absmax.new_empty(
        -(-nb // blocksize2), dtype=torch.float32
    )


@torch.library.custom_op("hoptune::nf4_dequantize", mutates_args=())
def nf4_dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    offset: float,
    blocksize: int,
    blocksize2: int,
    shape: list[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """packed uint8 [n/2] + absmax (fp32, or uint8 with absmax2/code2/offset) -> ``dtype`` ``shape``."""
    _check_state(packed, absmax, absmax2, code2, offset, blocksize, blocksize2, shape)
    return dequantize_impl(packed, absmax, absmax2, code2, offset, blocksize, blocksize2, shape, dtype)


def _check_state(packed, absmax, absmax2, code2, offset, blocksize, blocksize2, shape) -> None:
    """NF4Weight's checks of a state given in parts (the sizes agree with each other: a kernel
    would read past a short absmax); the dtype is the caller's, so any float one stands in."""
    from hoptune.quant.nf4 import NF4Weight  # (hoptune.quant imports these ops)

    NF4Weight(packed, absmax, torch.Size(shape), torch.float32, blocksize, absmax2, code2, offset, blocksize2)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """t itself, or a copy when the kernels' 16-byte alignment does not hold (an offset view)."""
    return t.clone() if t.data_ptr() % 16 else t


def rows_read_whole(t: torch.Tensor) -> bool:
    """t (rows, cols)'s rows unit-stride, at least a row and a multiple of 8 elements apart, the
    first 16-byte aligned: the layout the kernels load in 16-byte pieces."""
    s0 = t.stride(0)
    return t.stride(1) == 1 and s0 >= t.shape[1] and s0 % 8 == 0 and t.data_ptr() % 16 == 0


def _kernel_operands(x2, packed, lora_B, xa, bias) -> tuple:
    """The products' operands as their kernels take them: x2 (M, K) with unit column stride, rows
    at least K and a multiple of 8 elements apart and 16-byte aligned (else a contiguous copy),
    packed and lora_B 16-byte aligned (the fused GEMM reads B's rows in 4-byte pairs), lora_B, xa
    and bias contiguous (or None)."""
    if not rows_read_whole(x2):
        # a copy: contiguous() returns x2 itself when it is contiguous but misaligned (a view at
        # an offset), or a single row whose stride PyTorch ignores (a (K, 1) column transposed)
        x2 = x2.clone(memory_format=torch.contiguous_format)
    b = None if lora_B is None else _aligned(lora_B.contiguous())
    xa = None if xa is None else xa.contiguous()
    bias = None if bias is None else bias.contiguous()
    return x2, _aligned(packed), b, xa, bias


def _state_ptrs(packed, absmax, absmax2, code2) -> tuple[int, int, int, int, int]:
    """Kernel arguments of an NF4 state (packed already _aligned): packed, fp32 absmax (0 if
    nested), nested uint8 absmax (0 if not), absmax2, code2."""
    nested = absmax2 is not None
    return (
        packed.data_ptr(),
        0 if nested else absmax.data_ptr(),
        absmax.data_ptr() if nested else 0,
        _lib.ptr(absmax2),
        _lib.ptr(code2),
    )


def dequantize_impl(
    packed, absmax, absmax2, code2, offset, blocksize, blocksize2, shape, dtype
) -> torch.Tensor:
    """The body of nf4_dequantize, callable from other ops without a second op dispatch."""
    if dtype not in _lib.DTYPE_CODES or not _lib.use_kernel(packed, "nf4_dequantize"):
        return ref.nf4_dequantize(packed, absmax, absmax2, code2, offset, blocksize, blocksize2, shape, dtype)
    n = packed.numel() * 2
    packed = _aligned(packed)
    out = torch.empty(n, dtype=dtype, device=packed.device)
    _lib.extension().nf4_dequantize(
        *_state_ptrs(packed, absmax, absmax2, code2),
        float(offset),
        blocksize2,
        n,
        blocksize,
        out.data_ptr(),
        _lib.DTYPE_CODES[dtype],
        _lib.stream(packed),
        _DEQUANT_VARIANT,
    )
    return out.view(shape)


@nf4_dequantize.register_fake
def _(packed, absmax, absmax2, code2, offset, blocksize, blocksize2, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)


LORA_DTYPES = (torch.bfloat16, torch.float16)


@torch.library.custom_op("hoptune::nf4_dequantize_lora", mutates_args=())
def nf4_dequantize_lora(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    absmax2: torch.Tensor | None,
    code2: torch.Tensor | None,
    offset: float,
    blocksize: int,
    blocksize2: int,
    shape: list[int],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The NF4 weight ``shape`` = [N, K] dequantized to lora_A's dtype with ``scale * B @ A`` added
    (lora_A [r, K], lora_B [N, r]): one rounding of w + s B A, w the plain dequantize's output."""
    _check_state(packed, absmax, absmax2, code2, offset, blocksize, blocksize2, shape)
    return dequantize_lora_impl(
        packed, absmax, absmax2, code2, offset, blocksize, blocksize2, shape, lora_A, lora_B, scale
    )


def dequantize_lora_impl(
    packed, absmax, absmax2, code2, offset, blocksize, blocksize2, shape, lora_A, lora_B, scale
) -> torch.Tensor:
    """The body of nf4_dequantize_lora, callable from other ops without a second op dispatch."""
    dtype = lora_A.dtype
    k = shape[1]
    if dtype not in LORA_DTYPES or k % 64 or not _lib.use_kernel(packed, "nf4_dequantize_lora"):
        w = dequantize_impl(packed, absmax, absmax2, code2, offset, blocksize, blocksize2, shape, dtype)
        return ref.merge_lora(w, lora_A, lora_B, scale)
    return dequantize_lora_kernel(
        packed, absmax, absmax2, code2, offset, blocksize, blocksize2, shape, lora_A, lora_B, scale
    )


# Ranks up to which the merged kernel has its main form (B's rows read in aligned runs, A's
# fragments held in registers), and whether factors it cannot take that way are padded so that it
# can (main_kernel_factors).
MERGE_MAIN_MAX_RANK = 128
MERGE_PAD_RANKS = True


def pad_rank(a: torch.Tensor, b: torch.Tensor, multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_A (r, K) and lora_B (N, r) with zero ranks appended up to a multiple of ``multiple``:
    the same product B A (differentiable: the given factors' gradients are the padded ones' first
    r)."""
    pad = -a.shape[0] % multiple
    return torch.nn.functional.pad(a, (0, 0, 0, pad)), torch.nn.functional.pad(b, (0, pad))


def main_kernel_factors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_A (r, K) and lora_B (N, r), contiguous, as the merged kernel's main form takes them.
    That form needs B's rows in aligned runs: an even rank and B 4-byte aligned up to r = 64, a
    multiple of 8 and 16-byte aligned from 65 to MERGE_MAIN_MAX_RANK. Other ranks up to there
    (odd ones, 65-127 not multiples of 8) and a misaligned B (a view into a larger buffer) would
    take the general kernel, which reads A's fragments from shared memory at every rank step and
    took 2.0-2.9x the main form's time (bench/README.md, ranks). So they are copied with zero
    ranks appended up to a multiple of 8: the same product (the kernel pads the rank to 16 with
    zeros itself), through the main form."""
    r = a.shape[0]
    if not MERGE_PAD_RANKS or r > MERGE_MAIN_MAX_RANK:
        return a, b
    ptr = b.data_ptr()
    if (r % 8 == 0 and ptr % 16 == 0) or (r <= 64 and r % 2 == 0 and ptr % 4 == 0):
        return a, b
    if r % 8 == 0:  # (misaligned only: a fresh copy is aligned)
        return a, b.clone()
    return pad_rank(a, b, 8)


def dequantize_lora_kernel(
    packed, absmax, absmax2, code2, offset, blocksize, blocksize2, shape, lora_A, lora_B, scale
) -> torch.Tensor:
    """The CUDA kernel of nf4_dequantize_lora, for a caller that has already decided it runs
    (CUDA on sm_90, 16-bit lora_A, K % 64 == 0): no second dispatch check on the hot path."""
    dtype = lora_A.dtype
    n, k = shape
    packed = _aligned(packed)
    a, b = main_kernel_factors(lora_A.contiguous(), lora_B.contiguous())
    out = torch.empty(n, k, dtype=dtype, device=packed.device)
    _lib.extension().nf4_dequantize_lora(
        *_state_ptrs(packed, absmax, absmax2, code2),
        float(offset),
        blocksize2,
        n,
        k,
        blocksize,
        a.data_ptr(),
        b.data_ptr(),
        a.shape[0],
        float(scale),
        out.data_ptr(),
        _lib.DTYPE_CODES[dtype],
        _lib.stream(packed),
        _MERGE_VARIANT,
    )
    return out


# Rows of x up to which the forward reads the codes (nf4_small_m; the kernel takes up to 32)
# instead of forming the merged weight for a GEMM; SMALL_M_MAX_SMALL_WEIGHT for a weight of fewer
# than SMALL_WEIGHT elements. On an H200 (r = 16, bench/README.md) it beat the merged path at
# every M <= 24 on the weights of 4096 x 14336 and larger (at 32: within 3% or faster), and
# matched it at 12 rows on 4096 x 4096 (16: 11% behind, 32: 1.9x the time).
SMALL_M_MAX = 32
SMALL_M_MAX_SMALL_WEIGHT = 12
SMALL_WEIGHT = 1 << 25
# CTAs per SM that nf4_small_m's column slices aim at (two of 8 warps are resident per SM).
SMALL_M_CTAS_PER_SM = 2
_SMALL_ROWS, _SMALL_STEP = 128, 128  # the kernel's weight rows per CTA and columns per step

_sm_counts: dict[int, int] = {}
# zeroed counters of nf4_small_m, per (device, stream): the kernel leaves them at zero, but two
# launches running at once must not share them
_counters: dict[tuple[int, int], torch.Tensor] = {}


def sm_count(device: torch.device) -> int:
    """The device's SM count (cached)."""
    sms = _sm_counts.get(device.index)
    if sms is None:
        sms = _sm_counts[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return sms


def small_m_slices(n: int, k: int, device: torch.device) -> int:
    """Column slices of nf4_small_m for an [n, k] weight: enough CTAs to fill the GPU."""
    sms = sm_count(device)
    groups = -(-n // _SMALL_ROWS)
    steps = -(-k // _SMALL_STEP)
    return max(1, min(steps, round(SMALL_M_CTAS_PER_SM * sms / groups)))


def small_m_max(n: int, k: int) -> int:
    """Rows of x up to which the forward reads an [n, k] weight's codes directly (fewer on a
    weight the fused GEMM takes: fused_small_m_max)."""
    return SMALL_M_MAX if n * k >= SMALL_WEIGHT else min(SMALL_M_MAX, SMALL_M_MAX_SMALL_WEIGHT)


def small_m_kernel(
    x2, packed, absmax, absmax2, code2, offset, blocksize, blocksize2, n, xa, lora_B, scale, bias
) -> torch.Tensor:
    """y = x2 @ deq(W)^T (+ scale * xa @ lora_B^T) (+ bias) for 1 <= M <= 32 rows of x2 (M, K) in
    bf16/fp16, straight from the codes (nf4_small_m: no dequantized copy of W; on tensor cores,
    the columns cut into slices so that a small N fills the GPU). xa (M, r) fp32 and lora_B (N, r),
    or both None; bias (N,) or None, in x2's dtype. The caller has checked that the kernel runs
    (CUDA on sm_90, 16-bit x2, K % 64 == 0)."""
    m, k = x2.shape
    x2, packed, b, xa, bias = _kernel_operands(x2, packed, lora_B, xa, bias)
    dev = x2.device
    y = torch.empty(m, n, dtype=x2.dtype, device=dev)
    slices = small_m_slices(n, k, dev)
    stream = _lib.stream(x2)
    ws = counters = None
    if slices > 1:
        ws = torch.empty(slices * m * n, dtype=torch.float32, device=dev)
        groups = -(-n // _SMALL_ROWS)
        counters = _counters.get((dev.index, stream))
        if counters is None or counters.numel() < groups:
            counters = _counters[(dev.index, stream)] = torch.zeros(groups, dtype=torch.int32, device=dev)
    _lib.extension().nf4_small_m(
        x2.data_ptr(),
        x2.stride(0),
        m,
        *_state_ptrs(packed, absmax, absmax2, code2),
        float(offset),
        blocksize2,
        n,
        k,
        blocksize,
        _lib.ptr(xa),
        _lib.ptr(b),
        0 if b is None else b.shape[1],
        float(scale),
        _lib.ptr(bias),
        slices,
        _lib.ptr(ws),
        _lib.ptr(counters),
        y.data_ptr(),
        _lib.DTYPE_CODES[x2.dtype],
        stream,
    )
    return y


# The fused GEMM (nf4_lora_gemm) against the merged dequantize + cuBLAS GEMM, on an H200 (device
# time of the forward with r = 16, xs's GEMM included; bench/results/nf4_gemm_tile64_op.json,
# nf4_gemm_tile192.json, nf4_gemm_wide_rows.json, nf4_gemm_split_op.json and
# nf4_gemm_split_sweep.json). It runs on weights of at least FUSED_MIN_WEIGHT elements with N >=
# FUSED_MIN_N: on 4096 x 4096 and N = 1024 it lost at every M (1.15-2.7x even with the K range
# split), on 8192 x 4096 and larger the op's forward with it took 0.43-0.91x the merged forward's
# time from 32 to 256 rows. Above 256 rows its time is flat per tile count while the merged GEMM's
# grows with M: on N >= FUSED_WIDE_MIN_N, two 192-token tiles up to FUSED_TILE192_WIDE_MAX_M rows
# (288-384 rows: 0.74-0.91x, 0.95-0.98x on 4096 x 14336; N = 4096 0.93-1.07x, left to the merged
# path), two 256-token tiles from FUSED_WIDE_MIN_M to FUSED_MAX_M (416 rows: 0.83-0.99x on six
# weights; 448-512 0.78-0.91x on N >= 8192). At 385-415 rows two 256-token tiles win only on
# weights of FUSED_BIG_WEIGHT elements or more (8192 x 28672 and 28672 x 8192: 0.81-0.94x; 8192 x
# 8192 0.97-1.01x, 4096 x 14336 1.03-1.05x, N = 4096 0.98-1.16x; nf4_gemm_wide_rows.json,
# nf4_gemm_rows_385_415.json), so only those take it there; so do 513 to FUSED_TILE192_BIG_MAX_M
# rows (three 192-token tiles) and FUSED_BIG_WIDE_MIN_M to FUSED_BIG_MAX_M (three of 256), all
# stream-K (8192 x 28672 and 28672 x 8192: 544-576 rows 0.88-0.91x, 704-768 0.87-0.88x, but 640
# 0.96-0.97x; 8192 x 8192 0.99-1.11x at 544-768 with its best tile and split; above 768 rows
# 0.96-1.02x: nf4_gemm_rows_513_1024.json; at 2^27 elements, 16384 x 8192 and 8192 x 16384:
# 544-576 0.98-0.99x, 640 1.04-1.05x, 704-768 0.93-0.98x: nf4_gemm_rows_big_op.json). On weights
# of FUSED_HUGE_WEIGHT elements or more (the two largest) three 256-token tiles, stream-K, also
# take FUSED_HUGE_MIN_M to 703 rows (0.81-1.01x, the fastest of the 128-, 192- and 256-token tiles
# timed, 592 rows 1.02-1.05x: nf4_gemm_rows_577_703.json; the op then 0.86-0.99x the merged path:
# nf4_gemm_rows_577_703_op.json). Its mainloop runs at ~0.75x cuBLAS's rate (the decode's issue
# and latency share), so above those rows the merged path's GEMM wins. Tokens per CTA (the wgmma
# runs on the whole tile, filled or not): 64 up to FUSED_TILE64_MAX_M rows (0.86-0.95x the time of
# 128-token tiles at M = 8-64 on six weights, results/nf4_gemm_tile64.json), 128 up to
# FUSED_TILE128_MAX_M rows, 192 up to FUSED_TILE192_MAX_M (160-192 rows: 0.56-0.91x the merged
# forward, against 0.64-1.03x with 256 and 0.82-1.04x with 128 on six weights,
# nf4_gemm_tile192.json); to 256 rows 128 when 256-token tiles would number fewer than
# FUSED_MIN_TILES (8192 x 8192 at M = 256: 0.095 against 0.123 ms), else 256 (each tile decodes
# its weight rows once: twice as many decodes per token at 128); then 192 and 256 as above.
FUSED_MIN_N = 4096
FUSED_MIN_WEIGHT = 1 << 25
FUSED_BIG_WEIGHT = 1 << 27
FUSED_HUGE_WEIGHT = 3 << 26
FUSED_BIG_MAX_M = 768  # (the most rows the fused GEMM takes on any weight)
FUSED_MAX_M = 512
FUSED_NARROW_MAX_M = 256
FUSED_WIDE_MIN_N = 8192
FUSED_WIDE_MIN_M = 416
FUSED_TILE64_MAX_M = 64
FUSED_TILE128_MAX_M = 128
FUSED_TILE192_MAX_M = 192
FUSED_TILE192_WIDE_MAX_M = 384
FUSED_TILE192_BIG_MAX_M = 576
FUSED_BIG_WIDE_MIN_M = 704
FUSED_HUGE_MIN_M = 608
FUSED_MIN_TILES = 100
# The K range split (fused_splits): when the output tiles number at most 1 / FUSED_SPLIT_BELOW
# of the SMs, each tile's K range is cut into up to FUSED_MAX_SPLITS parts of at least
# FUSED_MIN_SPLIT_KBLOCKS 64-wide K blocks, as many as fill the SMs (nf4_gemm_split_op.json:
# the 32 row tiles of 14336 x 4096 at M <= 128 0.064 ms in 4 parts against 0.142 unsplit, the 64
# of 8192 x 8192 0.064-0.065 in 2 parts against 0.090-0.091). From FUSED_STREAM_K_WAVES tiles per
# SM, CUTLASS's stream-K schedule evens out the last wave (8192 x 28672 at 512 rows: 0.406
# against 0.453 ms), and above FUSED_MAX_M rows (28672 x 8192, 192 tiles: 0.91x the merged forward
# at 544-576 rows against 1.13x unsplit, nf4_gemm_rows_513_1024.json); elsewhere it cost time, so
# other shapes keep one CTA per tile.
FUSED_SPLIT_BELOW = 2
FUSED_MAX_SPLITS = 8
FUSED_MIN_SPLIT_KBLOCKS = 8
FUSED_STREAM_K_WAVES = 3
# Below nf4.small_m_max rows the small-M kernel's time grows with M while the fused GEMM's stays
# flat (its tiles are mostly empty), so the fused GEMM takes over above these many rows:
# (N at least, rows). With 64 tokens per CTA (results/nf4_gemm_tile64.json, device time, r = 16),
# at M = 12 the small-M kernel took 0.95-0.96x the fused GEMM's time on 8192 x 8192,
# 8192 x 28672 and 28672 x 8192 (1.07x on 4096 x 14336), at M = 16 1.03-1.16x on the weights
# with N >= 8192; on 14336 x 4096 and 8192 x 4096 0.95-0.97x at M = 16, 1.19-1.21x at 20.
FUSED_OVER_SMALL_M = ((8192, 12), (FUSED_MIN_N, 16))


def fused_small_m_max(n: int) -> int:
    """Rows up to which the small-M kernel stays ahead of the fused GEMM on a weight of N rows
    (where the fused GEMM runs)."""
    for min_n, rows in FUSED_OVER_SMALL_M:
        if n >= min_n:
            return rows
    return SMALL_M_MAX


def fused_rows(m: int, n: int, k: int) -> bool:
    """Whether M rows of x are in the fused GEMM's range for a weight [N, K] (above the small-M
    kernel's range, where the caller checks that)."""
    if m <= FUSED_NARROW_MAX_M:
        return m >= 1
    if n < FUSED_WIDE_MIN_N:
        return False
    numel = n * k
    big = numel >= FUSED_BIG_WEIGHT
    if m > FUSED_MAX_M:
        wide_min = FUSED_HUGE_MIN_M if numel >= FUSED_HUGE_WEIGHT else FUSED_BIG_WIDE_MIN_M
        return big and (m <= FUSED_TILE192_BIG_MAX_M or wide_min <= m <= FUSED_BIG_MAX_M)
    return m <= FUSED_TILE192_WIDE_MAX_M or m >= FUSED_WIDE_MIN_M or big


def fused_tile_n(m: int, n: int) -> int:
    """Tokens per CTA of the fused GEMM for M rows and N output features."""
    if m <= FUSED_TILE64_MAX_M:
        return 64
    if m <= FUSED_TILE128_MAX_M:
        return 128
    if m <= FUSED_TILE192_MAX_M:
        return 192
    if m <= FUSED_NARROW_MAX_M:
        return 128 if -(-n // 128) < FUSED_MIN_TILES else 256
    if m <= FUSED_TILE192_WIDE_MAX_M or FUSED_MAX_M < m <= FUSED_TILE192_BIG_MAX_M:
        return 192
    return 256


def fused_gemm_runs(x2: torch.Tensor, n: int, blocksize: int) -> bool:
    """Whether the forward takes nf4_lora_gemm for x2 (M, K): M and N in the measured range, bf16,
    K % 64 == 0 and the quant blocks within rows, N % 8 == 0 (the caller has checked CUDA on sm_90,
    and pads an odd rank with a zero rank: the kernel reads B's rows in pairs)."""
    m, k = x2.shape
    return (
        fused_rows(m, n, k)
        and n >= FUSED_MIN_N
        and n * k >= FUSED_MIN_WEIGHT
        and x2.dtype == torch.bfloat16
        and k % 64 == 0
        and blocksize % 64 == 0
        and k % blocksize == 0
        and n % 8 == 0
    )


def fused_splits(m: int, n: int, k: int, tile_n: int, sms: int) -> int:
    """Parts of each output tile's K range for the fused GEMM (nf4_lora_gemm's splits) on a GPU of
    ``sms`` SMs: enough that the tiles fill the SMs when there are few tiles; 0 (stream-K) when
    there are many, or above FUSED_MAX_M rows."""
    tiles = -(-n // 128) * -(-m // tile_n)
    if tiles >= FUSED_STREAM_K_WAVES * sms or m > FUSED_MAX_M:
        return 0
    if tiles * FUSED_SPLIT_BELOW > sms:
        return 1
    return max(1, min(FUSED_MAX_SPLITS, k // 64 // FUSED_MIN_SPLIT_KBLOCKS, sms // tiles))


_scratch_bytes: dict[tuple, int] = {}


def _fused_scratch(m, n, k, blocksize, tile_n, splits, device) -> torch.Tensor:
    """The fused GEMM's scratch (the transposed absmax, then the split work's partial sums)."""
    key = (device.index, m, n, k, blocksize, tile_n, splits)
    size = _scratch_bytes.get(key)
    if size is None:
        if len(_scratch_bytes) > 4096:  # many distinct row counts: start over
            _scratch_bytes.clear()
        size = _scratch_bytes[key] = _lib.extension().nf4_lora_gemm_scratch_bytes(
            m, n, k, blocksize, tile_n, splits
        )
    return torch.empty(size, dtype=torch.uint8, device=device)


def fused_gemm_kernel(
    x2,
    packed,
    absmax,
    absmax2,
    code2,
    offset,
    blocksize,
    blocksize2,
    n,
    xs,
    lora_B,
    bias,
    out=None,
    tile_n=0,
    splits=None,
) -> torch.Tensor:
    """y = x2 @ deq(W)^T (+ xs @ lora_B^T) (+ bias) for x2 (M, K) bf16, from one GEMM that decodes
    the codes in its mainloop (nf4_lora_gemm: no dequantized copy of W). xs = s x2 @ A^T (M, r)
    and lora_B (N, r) in bf16, or both None; bias (N,) or None. ``out``: an (M, N) tensor, rows
    contiguous, to write y into. ``tile_n``: tokens per CTA, 64, 128, 192 or 256 (0:
    fused_tile_n(M, N)).
    ``splits``: parts of each output tile's K range, 1-16, summed in fp32 in a fixed order, or 0
    for CUTLASS's stream-K schedule (None: fused_splits). The caller has checked the layout and
    dtype conditions of fused_gemm_runs."""
    m, k = x2.shape
    x2, packed, b, xs, bias = _kernel_operands(x2, packed, lora_B, xs, bias)
    dev = x2.device
    tile_n = tile_n or fused_tile_n(m, n)
    if splits is None:
        splits = fused_splits(m, n, k, tile_n, sm_count(dev))
    y = torch.empty(m, n, dtype=x2.dtype, device=dev) if out is None else out
    scratch = _fused_scratch(m, n, k, blocksize, tile_n, splits, dev)
    _lib.extension().nf4_lora_gemm(
        x2.data_ptr(),
        x2.stride(0),
        m,
        *_state_ptrs(packed, absmax, absmax2, code2),
        float(offset),
        blocksize2,
        n,
        k,
        blocksize,
        scratch.data_ptr(),
        _lib.ptr(xs),
        _lib.ptr(b),
        0 if b is None else b.shape[1],
        _lib.ptr(bias),
        y.data_ptr(),
        y.stride(0),
        tile_n,
        splits,
        _lib.stream(x2),
    )
    return y


@nf4_dequantize_lora.register_fake
def _(packed, absmax, absmax2, code2, offset, blocksize, blocksize2, shape, lora_A, lora_B, scale):
    return lora_A.new_empty(shape)
