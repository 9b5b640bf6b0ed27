"""``torch.ops.hoptune.nf4_lora_linear``: y = x @ deq(W)^T + s * (x @ A^T) @ B^T (+ bias).

W is an NF4 weight ``[N, K]`` (frozen), A ``[r, K]`` and B ``[N, r]`` the LoRA factors, bias
usually frozen. Gradients flow to x, A, B and a bias that requires grad (the sum of dY over the
tokens). The forward saves only x; no copy of W, dequantized or merged, lives between the passes.

On sm_90 with 16-bit x, K % 64 == 0 and r <= MERGED_MAX_RANK (128), one kernel dequantizes W
with the LoRA product folded in, W' = deq(W) + s * B @ A (the rank-r product on tensor cores,
mma.sync with the epilogue in registers; the same DRAM traffic as the plain dequantize, at
0.80-0.83x its speed for r = 16), into a transient buffer of one layer's weight, and a single
cuBLAS GEMM gives y = x @ W'^T (from 2048 rows, with the algorithm chosen by measurement:
hoptune.ops.gemm, as for dX). For
a few rows of x (M <= nf4.small_m_max(N, K), 12 to 32: generation) the forward instead reads the
codes once (nf4_small_m, on tensor cores: no dequantized weight at all), with x A^T formed first
in fp32 and the LoRA term added in the kernel; for more rows of a weight of 2^25 elements or
more (bf16; above nf4.fused_small_m_max(N) = 12 or 16 rows, up to 256, 512 or 768: nf4.fused_rows),
one CUTLASS GEMM decodes the codes in its mainloop (nf4_lora_gemm, each tile's K range split
when the tiles are few), with s x A^T formed first and the LoRA term added to its accumulators.
The backward takes dX = dY @ W' when N <= 2 M, else dY @ deq(W) + (s dY B) @ A (that term
written first and added in the GEMM's epilogue; MERGED_DX_MAX_N_PER_ROW); the other LoRA terms
are x @ A^T, dY @ B and the two reductions over the tokens dA = (s dY B)^T x and dB = s dY^T (x
A^T). In eager mode on CUDA, for N >= DY_PASS_MIN_N[r] (r = 8, 16, 32) and N % 64 == 0, dY @ B
and dB come from one read of dY (lora_dy_pass) instead of two GEMMs; where K == N = 512 C (C = 2,
4, 8), r = 16 and dX needs no dY B (merged weight, or a frozen x), dA and dB come from one read
of x and dY instead (lora_grads, a cluster kernel: ONE_PASS_GRADS), beside dX's GEMM on a second
stream when dX is needed, in the SMs that the GEMM's last wave leaves idle (GRADS_BESIDE_DX).
Elsewhere (CPU, fp32, K not a multiple of 64, ranks above 128) the LoRA terms are applied to the
activations (hoptune.reference.nf4_lora on CPU; on the GPU, K not a multiple of 64 warns once per
K). In training on the GPU a rank that is not a
multiple of 8 is first padded with zero ranks to one (RANK_ALIGN): the same results, aligned
rank-r GEMMs. Under activation checkpointing the eager op runs its autograd Function before it
computes the product, so that a layer's recompute stops before its last projection (SAVES_FIRST).
"""

from __future__ import annotations

import math

import torch

from hoptune import _lib
from hoptune.ops import _amp, _check, gemm
from hoptune.ops import nf4 as nf4_ops
from hoptune.reference import nf4_lora as ref

MAX_RANK = 256

# The largest rank whose LoRA product is folded into the dequantized weight. Above it (ranks that
# only the general merged kernel takes, whose time grows with the rank) the LoRA terms go on the
# activations, forward and backward. On an H200 at M = 8192 (bench_nf4_lora.py --sections
# rank_paths, results/nf4_lora_rank_paths.json; covered ratios on the three layer shapes): at
# r = 256 the layer step took 1.10-1.38x the frozen bf16 layer unmerged against 1.19-1.64x merged,
# the forward 1.13-1.27x x @ W^T against 1.28-1.47x; at r = 128 (the main merged kernel) merged was
# the faster, layer 1.09-1.24x against 1.11-1.33x, forward 1.07-1.11x against 1.13-1.25x.
MERGED_MAX_RANK = 128

# When autograd records the call on the GPU, a rank that is not a multiple of RANK_ALIGN is padded
# with zero ranks up to one (_aligned_rank): the same product and, through the padding's backward,
# the same gradients for the given factors. Unpadded, the rank-r GEMMs work on rows of r elements
# (x A^T, dY B, dA, dB: cuBLAS with leading dimensions that are not 16-byte multiples), and the dY
# pass refuses such ranks. On an H200 at M = 8192 (bench_nf4_lora.py --sections rank_padding,
# results/nf4_lora_rank_padding.json, _2; covered, the three layer shapes, two runs) the layer step
# took 1.03-1.30x the frozen layer padded against 1.08-1.49x unpadded at r = 12, 15 and 100. A forward
# without grad runs no rank-r GEMM on the merged path, and there the two copies cost up to 3% at
# 4096 x 4096 (r = 12), so it is left as is: the merged kernel pads the ranks it cannot take
# (nf4.main_kernel_factors), the fused GEMM refuses odd ranks.
RANK_ALIGN = 8


def _merged(x: torch.Tensor, lora_A: torch.Tensor | None) -> bool:
    """Whether the LoRA product is folded into the dequantized weight (CUDA, 16-bit x, rank up to
    MERGED_MAX_RANK)."""
    return (
        lora_A is not None
        and lora_A.shape[0] <= MERGED_MAX_RANK
        and x.dtype in nf4_ops.LORA_DTYPES
        and lora_A.dtype == x.dtype
        and x.shape[-1] % 64 == 0
        and _lib.use_kernel(x, "nf4_lora_linear")
    )


def _from_codes(x2: torch.Tensor, lora_A: torch.Tensor | None, n: int) -> bool:
    """Whether the product can read the codes directly, for 1 <= M <= nf4.small_m_max(N, K) rows
    (generation): CUDA, 16-bit x, K % 64 == 0. Above nf4.fused_small_m_max(N) rows the fused
    GEMM takes the call instead where it runs (_forward)."""
    m = x2.shape[0]
    return (
        1 <= m <= nf4_ops.small_m_max(n, x2.shape[1])
        and x2.dtype in nf4_ops.LORA_DTYPES
        and (lora_A is None or lora_A.dtype == x2.dtype)
        and x2.shape[1] % 64 == 0
        and _lib.use_kernel(x2, "nf4_lora_linear")
    )


def _fused(x2: torch.Tensor, lora_A: torch.Tensor | None, n: int, blocksize: int) -> bool:
    """Whether the product is the fused NF4 GEMM (nf4_lora_gemm: the codes decoded in its
    mainloop), for the rows and shapes where it beats the merged weight (nf4.fused_gemm_runs)."""
    return (
        nf4_ops.fused_gemm_runs(x2, n, blocksize)
        and (lora_A is None or lora_A.dtype == x2.dtype)
        and _lib.use_kernel(x2, "nf4_lora_linear")
    )


def _weight(q, n, k, dtype, lora_A, lora_B, scale, merged, inside_op=False):
    """deq(W), or deq(W) + s B A when merged. Inside an op's implementation the kernel is called
    directly (no second dispatch); the backward formula is traced by torch.compile, so there it
    goes through the registered ops."""
    packed, absmax, absmax2, code2, offset, blocksize, blocksize2 = q
    if merged:  # _merged() has decided that the kernel runs
        fn = nf4_ops.dequantize_lora_kernel if inside_op else nf4_ops.nf4_dequantize_lora
        return fn(
            packed, absmax, absmax2, code2, offset, blocksize, blocksize2, [n, k], lora_A, lora_B, scale
        )
    fn = nf4_ops.dequantize_impl if inside_op else nf4_ops.nf4_dequantize
    return fn(packed, absmax, absmax2, code2, offset, blocksize, blocksize2, [n, k], dtype)


_zeros: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _mm_scaled(a: torch.Tensor, b: torch.Tensor, scale: float, eager: bool) -> torch.Tensor:
    """scale * (a @ b) in one GEMM (alpha), not a GEMM and a scaling pass. ``eager``: the zero
    that addmm ignores (beta = 0) is cached; a traced graph makes its own."""
    zero = None
    if eager:
        zero = _zeros.get((a.device, a.dtype))
        if zero is None:
            zero = _zeros[(a.device, a.dtype)] = torch.zeros((), device=a.device, dtype=a.dtype)
    else:
        zero = a.new_zeros(())
    return torch.addmm(zero, a, b, beta=0, alpha=scale)


# The backward's dX takes the merged weight when N <= this x M, else deq(W) and the rank-r term
# added in the GEMM's epilogue (see _backward_impl). The merged pass costs about one more copy
# byte per weight element than the plain one (0.64-0.74 of the copy rate against 0.77-0.92), the
# addition writes dX once more and reads it in the epilogue. On an H200 (layer step, M = 8192,
# four alternations each): 4096 x 14336 1.100x the frozen layer merged vs 1.109x, 8192 x 28672
# 1.057x vs 1.048x; 2 sits between the two.
MERGED_DX_MAX_N_PER_ROW = 2.0

# Ranks the one-pass dY kernel (lora_dy_pass) supports, and the smallest N at which the backward
# uses it for each: on an H200 at M = 8192 it takes 0.52-0.72x the time of the two cuBLAS GEMMs at
# r = 8 and 16; at r = 32 0.74-0.81x for N >= 14336 but 1.00-1.09x at N = 4096; at r = 64 it is
# slower (1.35-1.94x: its fp32 reductions across CTAs grow with r), so that rank keeps the GEMMs
# (bench/README.md). Against the pair with dB as one GEMM (no longer in 2048-row slices;
# results/nf4_lora_token_gemm_run.json, dy_pass): 0.55-0.70x at r = 8 and 16, 0.81-0.87x at r = 32
# for N >= 14336, 1.08x at N = 4096; r = 64 1.58-1.70x.
DY_PASS_RANKS = (8, 16, 32, 64)
DY_PASS_MIN_N = {8: 64, 16: 64, 32: 8192}


def _dy_pass_runs(g2: torch.Tensor, lora_B: torch.Tensor) -> bool:
    """Whether dxa and dB come from one read of dY (g2, (M, N)) by dy_pass_kernel; the caller has
    decided that the CUDA kernels run (eager, 16-bit). N % 64 == 0; dY's rows at least N elements
    apart (not a gradient broadcast over the tokens, rows 0 apart) and 16-byte aligned, B 16-byte
    aligned (B is copied when not contiguous)."""
    return (
        g2.shape[1] >= DY_PASS_MIN_N.get(lora_B.shape[1], 1 << 62)
        and g2.shape[0] >= 1
        and g2.shape[1] % 64 == 0
        and g2.dtype == lora_B.dtype
        and nf4_ops.rows_read_whole(g2)
        and (not lora_B.is_contiguous() or lora_B.data_ptr() % 16 == 0)
    )


def dy_pass_kernel(
    g2: torch.Tensor, lora_B: torch.Tensor, xa: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale * g2 @ lora_B, g2^T @ xa) for g2 (M, N), lora_B (N, r), xa (M, r), from one read of
    g2 (the CUDA kernel lora_dy_pass; fp32 sums, one rounding each). The caller has checked
    _dy_pass_runs; xa is scale * x @ A^T in the backward, which makes the second term dB."""
    m, n = g2.shape
    r = lora_B.shape[1]
    b = lora_B.contiguous()
    xa = xa.contiguous()
    work = torch.empty((m + n) * r, dtype=torch.float32, device=g2.device)
    dxa = torch.empty(m, r, dtype=g2.dtype, device=g2.device)
    db = torch.empty(n, r, dtype=g2.dtype, device=g2.device)
    _lib.extension().lora_dy_pass(
        g2.data_ptr(),
        g2.stride(0),
        m,
        n,
        b.data_ptr(),
        xa.data_ptr(),
        r,
        float(scale),
        work.data_ptr(),
        dxa.data_ptr(),
        db.data_ptr(),
        _lib.DTYPE_CODES[g2.dtype],
        _lib.stream(g2),
    )
    return dxa, db


# Both factor gradients from one read of x and of dY (lora_grads, a cluster kernel: docs/
# KERNELS.md) instead of x A^T, the dY pass and dA (x read twice): in eager mode on CUDA where its
# shape rule holds (r = 16, K == N = 512 C for C in 2, 4, 8: its CTAs push to each other with
# asynchronous remote stores, which need a cluster of two or more) and dX takes the merged weight
# (which needs no dxa).
ONE_PASS_GRADS = True
ONE_PASS_GRADS_RANK = 16
_ONE_PASS_CLUSTERS = (2, 4, 8)


def _grads_run(x2: torch.Tensor, g2: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor) -> bool:
    """Whether dA and dB come from grads_kernel: the shape rule above, one 16-bit dtype for x, dY
    and both factors, x's and dY's rows unit-stride, at least a row apart, a multiple of 8
    elements apart and 16-byte aligned, contiguous factors 4-byte aligned (strided ones are
    copied)."""
    k, n = x2.shape[1], g2.shape[1]
    return (
        ONE_PASS_GRADS
        and lora_A.shape[0] == ONE_PASS_GRADS_RANK
        and k == n
        and k % 512 == 0
        and k // 512 in _ONE_PASS_CLUSTERS
        and x2.shape[0] >= 1
        and x2.dtype == g2.dtype == lora_A.dtype == lora_B.dtype
        and x2.dtype in nf4_ops.LORA_DTYPES
        and nf4_ops.rows_read_whole(x2)
        and nf4_ops.rows_read_whole(g2)
        and (not lora_A.is_contiguous() or lora_A.data_ptr() % 4 == 0)
        and (not lora_B.is_contiguous() or lora_B.data_ptr() % 4 == 0)
    )


def grads_kernel(
    x2: torch.Tensor, g2: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dA, dB) = ((s g2 B)^T x2, g2^T (s x2 A^T)) for x2 (M, K), g2 (M, N), from one read of each
    (the CUDA kernel lora_grads; fp32 sums, s x2 A^T and s g2 B rounded once each, as the GEMMs
    that would form them round them). The caller has checked _grads_run."""
    bufs = _grads_buffers(x2, g2, lora_A, lora_B)
    _grads_launch(x2, g2, bufs, scale, _lib.stream(x2))
    return bufs[3], bufs[4]


def _grads_buffers(x2, g2, lora_A, lora_B) -> tuple[torch.Tensor, ...]:
    """grads_kernel's operands and outputs: (A and B contiguous, the fp32 workspace, dA, dB)."""
    k, n, r = x2.shape[1], g2.shape[1], lora_A.shape[0]
    work = torch.empty((k + n) * r + 4, dtype=torch.float32, device=x2.device)  # (+ a counter)
    da = torch.empty(r, k, dtype=x2.dtype, device=x2.device)
    db = torch.empty(n, r, dtype=x2.dtype, device=x2.device)
    return lora_A.contiguous(), lora_B.contiguous(), work, da, db


def _grads_launch(x2, g2, bufs, scale: float, stream: int, zeroed: bool = False) -> None:
    """lora_grads on the stream handle ``stream``, into _grads_buffers' tensors (the workspace
    zeroed first on that stream, unless ``zeroed``: _grads_zero ran on it, ordered before)."""
    a, b, work, da, db = bufs
    _lib.extension().lora_grads(
        x2.data_ptr(),
        x2.stride(0),
        g2.data_ptr(),
        g2.stride(0),
        x2.shape[0],
        x2.shape[1],
        g2.shape[1],
        a.data_ptr(),
        b.data_ptr(),
        a.shape[0],
        float(scale),
        work.data_ptr(),
        da.data_ptr(),
        db.data_ptr(),
        _lib.DTYPE_CODES[x2.dtype],
        stream,
        zeroed,
    )


def _grads_zero(x2, g2, bufs, stream: int) -> None:
    """Zeroes lora_grads' workspace (of _grads_buffers) on the stream handle ``stream``."""
    _lib.extension().lora_grads_zero(bufs[2].data_ptr(), x2.shape[1], g2.shape[1], bufs[0].shape[0], stream)


# The one-pass kernel beside dX's GEMM: dX's merged weight and GEMM on the current stream, then the
# kernel on a second stream that waits only for the weight, so the GEMM's CTAs take the SMs first
# and the kernel's clusters start on those its last wave leaves idle (the GEMM's tiles are not a
# whole number of waves), its rounding kernel too. Its workspace is zeroed on the second stream
# before the weight (a first fork), beside the dequantize: zeroed after the second fork, the
# memset waited for an SM in the GEMM's last wave and held the kernel back (docs/KERNELS.md). The
# current stream waits for the second one before the backward returns; every tensor the kernel
# touches is allocated on the current stream before the first fork. Launched before the weight
# instead (an earlier version), the kernel shared the bandwidth with the dequantize and held SMs
# the GEMM then waited for (docs/KERNELS.md). bench_nf4_lora.py's ratio_covered_serial_grads has
# it off.
GRADS_BESIDE_DX = True
_side_streams: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream | None:
    """The device's second stream; None while a CUDA graph is being captured and none exists yet
    (no stream is created inside a capture: the kernel then runs on the current stream)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    s = _side_streams.get(index)
    if s is None and not torch.cuda.is_current_stream_capturing():
        s = _side_streams[index] = torch.cuda.Stream(device=index)
    return s


def _merged_weight(x, q, out_features, lora_A, lora_B, scale) -> tuple[torch.Tensor | None, bool | None]:
    """(W', None), W' = deq(W) + s B A from the merged kernel, when it runs for x; (None, True)
    when the fused GEMM takes the call instead; else (None, None): _forward decides. The eager
    path launches the kernel before the autograd Function's host work, which its device time
    covers."""
    k = x.shape[-1]
    if x.numel() <= nf4_ops.small_m_max(out_features, k) * k or not _merged(x, lora_A):
        return None, None  # (a few rows: the small-M product reads the codes instead)
    if x.numel() <= nf4_ops.FUSED_BIG_MAX_M * k and _fused(x.reshape(-1, k), lora_A, out_features, q[5]):
        return None, True  # (the fused GEMM reads the codes; _forward need not ask again)
    return nf4_ops.dequantize_lora_kernel(*q, (out_features, x.shape[-1]), lora_A, lora_B, scale), None


def _forward(x, q, out_features, lora_A, lora_B, scale, bias, merged_w, fused=None, out=None) -> torch.Tensor:
    """y from the merged weight (_merged_weight's result); else, for a few rows, from the codes
    directly (nf4_small_m), or for more rows of a wide weight through the fused GEMM (``fused``:
    True when _merged_weight has already found that it runs, None to decide here); else from
    deq(W) with the LoRA term applied to the activations. ``out`` (x's leading shape by N): y
    written into it, on the merged path or with ``fused`` True."""
    if merged_w is not None:  # the LoRA term is in the weight: one GEMM
        if bias is None:  # a fresh tensor of x's leading shape (not a view), or out
            return gemm.linear(x, merged_w, out=out)
        # written into y of x's leading shape (not a view of a 2-D result: the Function's
        # output must not be a view, or an in-place op on it would be refused)
        y = (
            out
            if out is not None
            else torch.empty(*x.shape[:-1], out_features, dtype=x.dtype, device=x.device)
        )
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        torch.addmm(bias, x2, merged_w.t(), out=y if x.dim() == 2 else y.view(-1, out_features))
        return y
    k = x.shape[-1]
    flat = x.dim() == 2
    x2 = x if flat else x.reshape(-1, k)
    if fused:  # (_merged_weight's rows: more than small_m_max, so not from the codes)
        codes = False
    else:
        codes = _from_codes(x2, lora_A, out_features)
        # (the fused check only where it can change the answer: not for the fewest rows)
        fused = (not codes or x2.shape[0] > nf4_ops.fused_small_m_max(out_features)) and _fused(
            x2, lora_A, out_features, q[5]
        )
    if codes and not fused:  # a few rows: one pass over the codes
        xa = None if lora_A is None else torch.mm(x2, lora_A.t(), out_dtype=torch.float32)
        y = nf4_ops.small_m_kernel(x2, *q, out_features, xa, lora_B, scale, bias)
    elif fused:  # the codes decoded in the GEMM's mainloop
        if lora_A is not None and lora_A.shape[0] % 2:  # (without grad: not padded at the op)
            lora_A, lora_B = _aligned_rank(lora_A, lora_B)
        xs = None if lora_A is None else _mm_scaled(x2, lora_A.t(), scale, True)
        y2 = None if out is None else out.view(-1, out_features)
        y = nf4_ops.fused_gemm_kernel(x2, *q, out_features, xs, lora_B, bias, out=y2)
    else:
        if k % 64 and _lib.kernels_run_on(x2):
            _warn_unaligned_k(k)
        w = _weight(q, out_features, k, x.dtype, None, None, scale, False, inside_op=True)
        if x2.is_cuda and bias is None and lora_A is not None:
            # (on the GPU: ranks above MERGED_MAX_RANK, fp32 x, K not a multiple of 64) the big
            # GEMM with the measured algorithm choice, then the LoRA term added in place
            y = gemm.linear(x2, w)
            y.addmm_(x2 @ lora_A.t(), lora_B.t(), alpha=scale)
        else:
            y = ref.lora_forward(x2, w, lora_A, lora_B, scale, bias)
    if out is not None:
        if not fused:  # (a caller's slip, not a user's: the paths above that write into out)
            raise AssertionError("_forward writes into out only on the merged and fused paths")
        return out
    # x's leading shape as a tensor of its own, not a view of the 2-D result (as F.linear's and
    # matmul's are): a view made under no_grad refuses in-place ops once grad mode is back on, and
    # the autograd Function's output must not be a view
    return y if flat else torch.ops.aten._unsafe_view(y, (*x.shape[:-1], out_features))


def _forward_into(y, x, q, out_features, lora_A, lora_B, scale, bias) -> None:
    """_forward's y written into ``y`` (x's leading shape by N): by the merged weight's GEMM or
    the fused GEMM directly, else copied (a few rows, or the unfused paths)."""
    w, fused = _merged_weight(x, q, out_features, lora_A, lora_B, scale)
    if w is not None or fused:
        _forward(x, q, out_features, lora_A, lora_B, scale, bias, w, fused, out=y)
    else:
        y.copy_(_forward(x, q, out_features, lora_A, lora_B, scale, bias, None))


def _warn_unaligned_k(k: int) -> None:
    _lib.warn_once(
        f"nf4_lora_linear:k={k}",
        f"hoptune.nf4_lora_linear: in_features = {k} is not a multiple of 64, so this layer takes the "
        "unfused path on the GPU (the weight dequantized, then PyTorch's GEMMs with the LoRA term on "
        "the activations), slower than the NF4 kernels",
    )


def _backward_impl(saved, meta, needs, grad_y, inside_op, kernels=True):
    x, packed, absmax, absmax2, code2, lora_A, lora_B = saved
    offset, blocksize, blocksize2, n, scale = meta
    need_x, need_A, need_B, need_bias = needs
    k = x.shape[-1]
    has_lora = lora_A is not None
    g2 = grad_y.reshape(-1, n)
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    q = (packed, absmax, absmax2, code2, offset, blocksize, blocksize2)
    # dX: with the LoRA product folded into the weight, or added on the activations (dxa @ A,
    # one read and write of dX) when that is cheaper: the merged weight costs a pass over N x K,
    # the addition one over M x K, and dxa is formed for dA anyway
    kernels = kernels and _merged(x, lora_A)
    merged = kernels and n <= MERGED_DX_MAX_N_PER_ROW * m
    dx = da = db = None
    dxa = None  # s dY B
    one_pass = (
        inside_op
        and kernels
        and need_A
        and need_B
        and (merged or not need_x)
        and _grads_run(x2, g2, lora_A, lora_B)
    )
    side = _side_stream(x2.device) if one_pass and need_x and GRADS_BESIDE_DX else None
    if side is not None:  # dX from the merged weight (one_pass: merged), the kernel beside its GEMM
        bufs = _grads_buffers(x2, g2, lora_A, lora_B)  # (before the forks: see GRADS_BESIDE_DX)
        ext, main, other = _lib.extension(), _lib.stream(x2), side.cuda_stream
        ext.stream_wait(other, main)  # the first fork: bufs are the second stream's to zero
        try:
            _grads_zero(x2, g2, bufs, other)
            w = _weight(q, n, k, x.dtype, lora_A, lora_B, scale, True, inside_op)
            ext.stream_wait(other, main)  # the second fork, after the weight and before the GEMM
            dx = gemm.mm(g2, w).view(x.shape)
            _grads_launch(x2, g2, bufs, scale, other, zeroed=True)
        finally:  # (the join: bufs, x and dY live until the current stream has waited for it)
            ext.stream_wait(main, other)
        da, db = bufs[3], bufs[4]
    elif one_pass:
        da, db = grads_kernel(x2, g2, lora_A, lora_B, scale)  # (dX needs no dxa)
    elif inside_op and kernels and need_A and need_B and _dy_pass_runs(g2, lora_B):
        # eager CUDA: dxa and dB from one read of dY (xa = s x A^T first: the forward keeps only x)
        dxa, db = dy_pass_kernel(g2, lora_B, _mm_scaled(x2, lora_A.t(), scale, True), scale)
    elif has_lora and (need_A or (need_x and not merged)):
        dxa = _mm_scaled(g2, lora_B, scale, inside_op)
    if need_x and dx is None:
        w = _weight(q, n, k, x.dtype, lora_A, lora_B, scale, merged, inside_op)
        if dxa is not None and not merged:
            # the rank-r term written first and taken in by the GEMM's epilogue (beta = 1): one
            # write of dX, not a GEMM followed by a read and write of dX for the addition
            dx = (
                gemm.mm(g2, w, acc=torch.mm(dxa, lora_A))
                if inside_op
                else torch.mm(dxa, lora_A).addmm_(g2, w)
            )
        else:
            dx = gemm.mm(g2, w) if inside_op else g2 @ w
        dx = dx.view(x.shape)
    # the token reductions, one cuBLAS GEMM each (M cut into 2048-row slices with fp32 partial
    # sums was slower on every shape measured: bench/bench_lora_passes.py)
    if has_lora and need_A and da is None:
        da = dxa.t() @ x2
    if has_lora and need_B and db is None:
        db = g2.t() @ _mm_scaled(x2, lora_A.t(), scale, inside_op)  # s x A^T: the forward keeps only x
    dbias = g2.sum(0) if need_bias else None  # (a bias the caller trains: frozen is the usual case)
    return dx, da, db, dbias


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
) -> torch.Tensor:
    """x (*, K) -> y (*, N)."""
    q = (packed, absmax, absmax2, code2, offset, blocksize, blocksize2)
    w, fused = _merged_weight(x, q, out_features, lora_A, lora_B, scale)
    return _forward(x, q, out_features, lora_A, lora_B, scale, bias, w, fused)


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
    return x.new_empty(*x.shape[:-1], out_features)


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
        _,
    ) = inputs
    ctx.meta = (offset, blocksize, blocksize2, out_features, scale)
    ctx.save_for_backward(x, packed, absmax, absmax2, code2, lora_A, lora_B)


def _backward(ctx, grad_y):
    needs = tuple(ctx.needs_input_grad[i] for i in (0, 9, 10, 12))
    # traced by torch.compile: the weight goes through the registered ops
    dx, da, db, dbias = _backward_impl(ctx.saved_tensors, ctx.meta, needs, grad_y, inside_op=False)
    return dx, None, None, None, None, None, None, None, None, da, db, None, dbias


nf4_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerNF4LoraLinear(torch.autograd.Function):
    """The same forward and backward as the custom op, for eager mode: a plain autograd.Function
    costs far less host time per call than a custom op's dispatch, and in a layer whose device
    work takes a millisecond or less that host time is the step time. torch.compile traces the
    custom op instead."""

    @staticmethod
    def forward(ctx, x, q, out_features, lora_A, lora_B, scale, bias, early):
        # early: (y, None) when the caller has already run the merged weight's GEMM, (None,
        # fused) with _merged_weight's fused decision, or None: y returned unwritten, for the
        # caller to fill once autograd has packed the saves (_saves_first); in a tuple, so that
        # y is not an input returned as is (autograd would make it a view). No copy of W,
        # dequantized or merged, is saved for the backward.
        ctx.meta = (q[4], q[5], q[6], out_features, scale)
        ctx.save_for_backward(x, *q[:4], lora_A, lora_B)
        if early is None:  # y is written by the caller after autograd has packed the saves
            return torch.empty(*x.shape[:-1], out_features, dtype=x.dtype, device=x.device)
        y, fused = early
        if y is None:
            y = _forward(x, q, out_features, lora_A, lora_B, scale, bias, None, fused)
        # a view as the output would refuse in-place ops on it (_forward returns none; a guard)
        return y.clone() if y._is_view() else y

    @staticmethod
    def backward(ctx, grad_y):
        needs = tuple(ctx.needs_input_grad[i] for i in (0, 3, 4, 6))
        # create_graph (a penalty on a gradient): PyTorch's GEMMs, whose graph gives the second
        # derivatives; the kernels' outputs carry none (the merged weight's terms in A, B)
        graph = torch.is_grad_enabled()
        dx, da, db, dbias = _backward_impl(
            ctx.saved_tensors, ctx.meta, needs, grad_y, inside_op=not graph, kernels=not graph
        )
        return dx, None, None, da, db, None, dbias, None


_quant_types: tuple | None = None


def _load_quant_types() -> tuple:
    """hoptune.quant.nf4's FLOAT_DTYPES and NF4Weight, imported on first use (that module imports
    this package; an import statement in the op would cost ~2 us of host time per call). A global,
    not functools.cache, which torch.compile warns about when it traces the op."""
    global _quant_types
    from hoptune.quant.nf4 import FLOAT_DTYPES, NF4Weight

    _quant_types = (FLOAT_DTYPES, NF4Weight)
    return _quant_types


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
    in x's dtype (both or neither); bias (N,). Returns (*, N) in x's dtype. Inside torch.autocast
    the float inputs may differ in dtype: all are cast to the autocast dtype, as nn.Linear's are.
    """
    FLOAT_DTYPES, NF4Weight = _quant_types or _load_quant_types()
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
    # inside torch.autocast the float inputs are all cast to its dtype (_amp.cast_inputs), as
    # nn.Linear's are: there x (bf16 from an earlier op) and fp32 adapter parameters may meet
    mixed_ok = _amp.enabled(x)
    if isinstance(scale, torch.Tensor) and scale.requires_grad and torch.is_grad_enabled():
        # (float() would detach it with only a warning: a learned scale would silently not learn)
        raise TypeError("scale must not require grad (the op gives it no gradient): pass a float")
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
            if t.dtype != x.dtype and not (mixed_ok and t.dtype in FLOAT_DTYPES):
                raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    if bias is not None:
        _check.tensor("bias", bias)
        if tuple(bias.shape) != (n,):
            raise ValueError(f"bias must be [out_features={n}], got {tuple(bias.shape)}")
        if bias.dtype != x.dtype and not (mixed_ok and bias.dtype in FLOAT_DTYPES):
            raise TypeError(f"bias must have x's dtype {x.dtype}, got {bias.dtype}")
    _check.same_device(x=x, w_nf4=w_nf4.packed, lora_A=lora_A, lora_B=lora_B, bias=bias)
    scale = _check.real("scale", scale)
    # (every output would be nan; comparisons, not math.isfinite, which a symbolic float of
    # torch.compile's dynamic shapes cannot take)
    if not (-math.inf < scale < math.inf):
        raise ValueError(f"scale must be a finite number, got {scale}")
    q = (
        w_nf4.packed,
        w_nf4.absmax,
        w_nf4.absmax2,
        w_nf4.code2,
        w_nf4.offset,
        w_nf4.blocksize,
        w_nf4.blocksize2,
    )
    return nf4_lora_linear_trusted(x, q, n, lora_A, lora_B, scale, bias)


def _aligned_rank(lora_A: torch.Tensor, lora_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_A and lora_B padded with zero ranks to a multiple of RANK_ALIGN (nf4.pad_rank)."""
    return nf4_ops.pad_rank(lora_A, lora_B, RANK_ALIGN)


def nf4_lora_linear_trusted(x, q, out_features, lora_A, lora_B, scale: float, bias) -> torch.Tensor:
    """nf4_lora_linear without the argument checks, for layers that validated their weights when
    they were built (hoptune.nn) and call this every forward; ``q`` is (packed, absmax, absmax2,
    code2, offset, blocksize, blocksize2)."""
    if _amp.enabled(x):
        x, lora_A, lora_B, bias = _amp.cast_inputs(x, x, lora_A, lora_B, bias)
    records = _records_graph(x, lora_A, lora_B, bias)
    if records and lora_A is not None and lora_A.shape[0] % RANK_ALIGN and x.is_cuda:
        lora_A, lora_B = _aligned_rank(lora_A, lora_B)
    if torch.compiler.is_compiling():
        return nf4_lora_linear_op(x, *q, out_features, lora_A, lora_B, scale, bias)
    if records and _saves_first():
        # the Function first, its output unwritten: autograd packs its saves as it returns, and
        # in a checkpointed layer's recompute the last save the backward needs ends the recompute
        # there (an exception from the hook), before the product below is computed for nothing
        y = _EagerNF4LoraLinear.apply(x, q, out_features, lora_A, lora_B, scale, bias, None)
        with torch.no_grad():
            _forward_into(y, x, q, out_features, lora_A, lora_B, scale, bias)
        return y
    # the merged kernel first: the host work below runs while the device dequantizes
    w, fused = _merged_weight(x, q, out_features, lora_A, lora_B, scale)
    if records:
        y = None
        if w is not None:  # and the GEMM, before the Function's host work (on detached inputs)
            b = None if bias is None else bias.detach()
            y = _forward(x.detach(), q, out_features, None, None, scale, b, w)
        return _EagerNF4LoraLinear.apply(x, q, out_features, lora_A, lora_B, scale, bias, (y, fused))
    # nothing to differentiate (no_grad, inference_mode, or no input that requires grad): the
    # forward alone, without the autograd Function's host work (~10 us a call)
    return _forward(x, q, out_features, lora_A, lora_B, scale, bias, w, fused)


# Whether, under saved-tensor hooks, the eager op runs its autograd Function before it computes
# anything and writes the Function's output after (a switch for measurement: bench_sft_8b.py
# --alternate-saves-first).
# Activation checkpointing (non-reentrant, as transformers runs it) recomputes a layer's forward in
# the backward and stops it at the last save the backward needs, by an exception from that save's
# hook: in a Llama layer, the down projection's input. Autograd packs an autograd.Function's saves
# when its forward returns; with the product computed before that (the merged dequantize and GEMM
# launched first, as the eager path otherwise does to overlap the Function's host work with the
# device, or inside the Function's forward), that projection ran in every layer's recompute for
# an output nobody reads.
SAVES_FIRST = True

# torch's innermost saved-tensor hooks (a private query; where a torch lacks it, the Function runs
# first whenever autograd records the call)
_top_saved_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def _saves_first() -> bool:
    """Whether saved-tensor hooks (activation checkpointing's, or any other) see this call's saves:
    then the Function runs before the product is computed (SAVES_FIRST)."""
    if not SAVES_FIRST:
        return False
    return _top_saved_hooks is None or _top_saved_hooks(False) is not None


def _records_graph(x, lora_A, lora_B, bias) -> bool:
    """Whether autograd records this call: grad mode on and an input requires grad (the bias
    too: it then gets its gradient)."""
    return torch.is_grad_enabled() and (
        x.requires_grad
        or (lora_A is not None and (lora_A.requires_grad or lora_B.requires_grad))
        or (bias is not None and bias.requires_grad)
    )
