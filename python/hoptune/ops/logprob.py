"""Per-token log-probs: ``token_logprobs`` (from logits) and ``fused_linear_logprobs`` (from
hidden states and the lm_head weight, never holding the full logits).

token_logprobs: one CUDA pass over the logits (online max / sum-exp in fp32) gives log-probs,
entropy and the log-sum-exp saved for the backward, which recomputes softmax and writes dlogits
(optionally into the logits buffer itself).

fused_linear_logprobs: rows whose label is ignore_index are dropped before any matmul. For each
chunk a cuBLAS GEMM writes logits in fp32, a kernel turns them into log-prob statistics and,
over the same buffer, into G = d logp / d logits, and a second GEMM forms J = G @ W, the
gradient of each row's log-prob with respect to its hidden state. Since d loss / d h_i =
g_i * J_i for any upstream gradient g, the backward is one scaling: the lm_head runs twice in
total (as many GEMMs as the logits forward + input gradient of a plain lm_head) and the extra
memory is J (rows x H, fp32) plus one chunk of fp32 logits. The one-hot part of the gradient (the
largest term) is added to J in fp32 and only the softmax part passes through the 16-bit GEMM
operand, so the hidden-state gradient is rounded to 16 bits once. The label's own softmax term
joins the one-hot part as (1 - p_y) from the fp32 log-prob (its entry in G is zeroed): rounded
in G, a confident token's p_y (above 1 - 2^-9 in bf16) would be 1 and its whole pull lost.

Chunks: by default (CUDA, bf16/fp32) rows go in blocks of R (VCHUNK_ROWS, or CHUNK_BYTES // (4 *
VCHUNK_COLS)) and each block walks the vocabulary in chunks of VCHUNK_COLS columns, so the weight
is read once per block rather than once per row chunk. Exponents are taken relative to each row's
label logit (a gather-dot before the walk), so the chunks' sums add up without rescaling and G is
written in the same read, unnormalised; J accumulates G @ W_chunk over the chunks and is scaled by
1 / sum at the end. fp16 keeps row chunks (whole vocabulary rows, two passes relative to the max:
unnormalised G can exceed its range); a logit more than 64 above the label's flags the row and
the op redoes the forward that way.

Fused GEMM (the default for bf16 on sm_90 without bias, soft-cap or entropy): the same walk (rows
in blocks of GEMM_ROWS, the vocabulary in chunks of GEMM_COLS), but each chunk is one CUTLASS
GEMM whose epilogue writes G = exp(c z - c z_y) in bf16 and per-tile row sums directly
(csrc/kernels/logprob_gemm.cu), so no fp32 logits and no separate kernel exist. The label's
logit c z_y comes from an fp32 dot product before each row block's GEMMs (the shift, and
logp = -log s0); a second small kernel ends the block (sums, logp, lse, overflow flag, J). The
entropy is not formed on this path (return_entropy=True keeps the vocab-chunked one).
"""

from __future__ import annotations

import math
import warnings

import torch

from hoptune import _lib
from hoptune.ops import _amp, _check
from hoptune.ops._function import eager_function as _eager_function
from hoptune.reference import logprob as ref

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CHUNK_BYTES = 128 << 20  # fp32 logits of one chunk: with J, keeps the extra memory near 0.5 GiB at 16k tokens
# fused_linear_logprobs, vocab-chunked forward: vocabulary columns per chunk, and rows per block
# (0: CHUNK_BYTES // (4 * VCHUNK_COLS), rounded down to a multiple of 64). Read on every call, so
# a benchmark may set them.
VCHUNK = True  # False: the row-chunked single-pass forward instead
VCHUNK_COLS = 8192
VCHUNK_ROWS = 0
_VCHUNK_ON_CPU = False  # tests: run the vocab-chunked loop on CPU through the reference
# bf16 without bias, soft-cap or entropy: the vocab-chunked walk with the fused lm_head GEMM
# (csrc/kernels/logprob_gemm.cu) instead of cuBLAS + fp32 logits + the vocab-chunk kernel.
GEMM = True
# Vocabulary columns per GEMM, about (rounded to whole waves, see _gemm_cols), and rows per block:
# G of one block and chunk is then 2048 x 31680 bf16 (124 MiB) on 132 SMs; extra peak at 16k
# tokens 0.26 GiB. 4096-row blocks and 65536-column chunks measured the same within noise at
# 0.40-0.42 GiB (bench/results/logprob_gemm_blocks.json).
GEMM_COLS = 32768
GEMM_ROWS = 2048
_GEMM_ON_CPU = False  # tests: run the fused-GEMM loop on CPU through the reference
# token_logprobs backward kernel version (csrc/kernels/logprob.cu; 1 and 2 are kept for measurement).
_BWD_VARIANT = 0
_BWD_VARIANTS = (0, 1, 2)  # every version, for the benchmark and the tests
# token_logprobs forward kernel version (csrc/kernels/logprob.cu; 1, the entropy's sum in logit
# units instead of the exponent's, is kept for measurement).
_FWD_VARIANT = 0
_FWD_VARIANTS = (0, 1)


# --------------------------------------------------------------------------------------------
# token_logprobs
# --------------------------------------------------------------------------------------------
def _view3(logits: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(batch, seq, vocab, stride_b, stride_t) of a 2-D (N, V) or 3-D (B, T, V) logits tensor."""
    if logits.dim() == 2:
        return 1, logits.shape[0], logits.shape[1], 0, logits.stride(0)
    b, t, v = logits.shape
    return b, t, v, logits.stride(0), logits.stride(1)


def _may_overlap(t: torch.Tensor) -> bool:
    """Whether two elements of t may share memory (expand's zero strides, unfold's windows). The
    dims, by increasing stride, must each step past the span of those before them; a layout this
    cannot clear counts as overlapping (and is copied), whether or not it does."""
    if t.numel() <= 1:
        return False
    dims = [(st, n) for st, n in zip(t.stride(), t.shape) if n > 1]
    # an insertion sort by stride, not sorted(): torch.compile cannot sort symbolic strides (the
    # dynamic shapes it switches to when the sequence length changes), but it can compare them
    for i in range(1, len(dims)):
        j = i
        while j > 0 and dims[j][0] < dims[j - 1][0]:
            dims[j - 1], dims[j] = dims[j], dims[j - 1]
            j -= 1
    span = 1
    for st, n in dims:
        if st < span:
            return True
        span += st * (n - 1)
    return False


def _kernel_runs(logits: torch.Tensor) -> bool:
    """Whether the CUDA kernels take these logits (fp64 runs the reference everywhere, and so do
    zero rows: the launchers refuse an empty view, and the reference has nothing to compute)."""
    if logits.dtype == torch.float64 or logits.numel() == 0:
        return False
    return _lib.use_kernel(logits, "token_logprobs")


def _token_logprobs_impl(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    ignore_index: int,
    inplace_backward: bool,
    check_labels: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy, lse); inplace_backward only tells the backward where to write dlogits;
    check_labels (always on the CPU) raises on a label outside [0, V) other than ignore_index
    (one device sync)."""
    if check_labels or logits.device.type == "cpu":  # (free on the CPU: no sync)
        _label_stats(labels, ignore_index, logits.shape[-1])
    if not _kernel_runs(logits):
        return ref.token_logprobs_fwd(logits, labels, temperature, ignore_index)
    labels = labels.contiguous()
    logp = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
    ent = torch.empty_like(logp)
    lse = torch.empty_like(logp)
    b, t, v, sb, st = _view3(logits)
    _lib.extension().token_logprobs_fwd(
        logits.data_ptr(),
        _lib.DTYPE_CODES[logits.dtype],
        b,
        t,
        v,
        sb,
        st,
        labels.data_ptr(),
        ignore_index,
        1.0 / temperature,
        logp.data_ptr(),
        ent.data_ptr(),
        lse.data_ptr(),
        _lib.stream(logits),
        _FWD_VARIANT,
    )
    return logp, ent, lse


# the custom ops (forward and the two backward forms) are what torch.compile traces; eager calls
# go through _EagerTokenLogprobs, which calls the same functions without the ops' dispatch
_token_logprobs = torch.library.custom_op("hoptune::token_logprobs", _token_logprobs_impl, mutates_args=())


@_token_logprobs.register_fake
def _(logits, labels, temperature, ignore_index, inplace_backward, check_labels=False):
    # fp64 logits run the reference, which returns fp64
    out = logits.new_empty(
        labels.shape, dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32
    )
    return out, torch.empty_like(out), torch.empty_like(out)


def _bwd_impl(logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index, out):
    b, t, v, sb, st = _view3(logits)
    # the contiguous copies held until the launch: a temporary freed inside the argument list goes
    # back to the allocator, and the next copy (queued before the kernel) could take its memory
    grad_logp = grad_logp.contiguous()
    grad_entropy = None if grad_entropy is None else grad_entropy.contiguous()
    _lib.extension().token_logprobs_bwd(
        logits.data_ptr(),
        _lib.DTYPE_CODES[logits.dtype],
        b,
        t,
        v,
        sb,
        st,
        labels.data_ptr(),
        ignore_index,
        1.0 / temperature,
        lse.data_ptr(),
        entropy.data_ptr(),
        grad_logp.data_ptr(),
        _lib.ptr(grad_entropy),
        out.data_ptr(),
        _lib.stream(logits),
        _BWD_VARIANT,
    )


def _tl_bwd_out(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
) -> torch.Tensor:
    if not _kernel_runs(logits):
        grad = ref.token_logprobs_bwd(
            logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index
        )
        if grad.stride() == logits.stride():
            return grad
        # the layout the fake (and the kernel) gives: the logits' strides, as for a shifted view
        out = torch.empty_strided(logits.shape, logits.stride(), dtype=logits.dtype, device=logits.device)
        return out.copy_(grad)
    out = torch.empty_strided(logits.shape, logits.stride(), dtype=logits.dtype, device=logits.device)
    _bwd_impl(
        logits, labels.contiguous(), lse, entropy, grad_logp, grad_entropy, temperature, ignore_index, out
    )
    return out


_token_logprobs_backward = torch.library.custom_op(
    "hoptune::token_logprobs_backward", _tl_bwd_out, mutates_args=()
)


@_token_logprobs_backward.register_fake
def _(logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index):
    return torch.empty_strided(logits.shape, logits.stride(), dtype=logits.dtype, device=logits.device)


def _tl_bwd_inplace(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor,
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
) -> None:
    if not _kernel_runs(logits):
        logits.copy_(
            ref.token_logprobs_bwd(
                logits, labels, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index
            )
        )
        return
    _bwd_impl(
        logits, labels.contiguous(), lse, entropy, grad_logp, grad_entropy, temperature, ignore_index, logits
    )
    # the kernel wrote through the pointer: as copy_ above, tell autograd, so that a node that saved
    # the logits (or a second backward through this graph) raises instead of reading the gradient
    torch.autograd.graph.increment_version(logits)


_token_logprobs_backward_inplace = torch.library.custom_op(
    "hoptune::token_logprobs_backward_", _tl_bwd_inplace, mutates_args=("logits",)
)


def _tl_setup(ctx, inputs, output):
    logits, labels, temperature, ignore_index, inplace_backward = inputs[:5]
    _, ent, lse = output
    ctx.temperature, ctx.ignore_index = temperature, ignore_index
    ctx.inplace = inplace_backward
    ctx.save_for_backward(logits, labels, lse, ent)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # an unused entropy passes None, not a tensor of zeros


def _tl_backward(ctx, grad_logp, grad_entropy, grad_lse, traced: bool = True):
    """The backward of both forms: ``traced`` (the custom op's) through the backward ops."""
    logits, labels, lse, ent = ctx.saved_tensors
    if grad_logp is None:
        grad_logp = torch.zeros_like(lse)
    args = (logits, labels, lse, ent, grad_logp, grad_entropy, ctx.temperature, ctx.ignore_index)
    if ctx.inplace:
        (_token_logprobs_backward_inplace if traced else _tl_bwd_inplace)(*args)
        return logits, None, None, None, None, None
    return (_token_logprobs_backward if traced else _tl_bwd_out)(*args), None, None, None, None, None


_token_logprobs.register_autograd(_tl_backward, setup_context=_tl_setup)


_EagerTokenLogprobs = _eager_function("TokenLogprobs", _token_logprobs_impl, _tl_setup, _tl_backward)


def _label_stats(labels: torch.Tensor, ignore_index: int, vocab: int = 0) -> int:
    """How many labels are not ignore_index, read on the host (one sync); with vocab > 0 a label
    outside [0, vocab) raises, naming its position in labels' own shape. On sm_90 one kernel
    writes both answers to pinned host memory; elsewhere a few PyTorch ops."""
    n = labels.numel()
    if _lib.use_kernel(labels, "label_stats") and labels.dtype == torch.int64:
        flat = labels.reshape(-1).contiguous()
        host = torch.empty(2, dtype=torch.int64, pin_memory=True)
        nv, first = _lib.extension().label_stats(
            flat.data_ptr(), n, ignore_index, vocab, host.data_ptr(), _lib.stream(labels)
        )
    else:
        valid = labels != ignore_index
        if vocab > 0:
            bad = (valid & ((labels < 0) | (labels >= vocab))).reshape(-1)
            nv, nbad = torch.stack((valid.reshape(-1), bad)).sum(1).tolist()
            first = int(bad.nonzero()[0, 0]) if nbad else -1
        else:
            nv, first = int(valid.sum()), -1
    if first >= 0:
        pos = []
        for d in reversed(labels.shape):
            pos.append(first % d)
            first //= d
        pos = tuple(reversed(pos))
        raise ValueError(
            f"labels must be in [0, {vocab}) or ignore_index={ignore_index}; got {int(labels[pos])} at position {pos}"
        )
    return nv


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    inplace_backward: bool = False,
    check_labels: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each label under ``softmax(logits / temperature)``.

    logits ``(N, V)`` or ``(B, T, V)`` bf16/fp16/fp32, or fp64 (through the reference; fp64
    results) (any row strides; the vocabulary dim contiguous; rows that share memory, as from
    ``expand``, are copied); labels ``(N,)`` / ``(B, T)`` int64. Returns fp32 log-probs shaped like
    labels (and the entropy of the same distribution with ``return_entropy``; a logit of -inf, a
    masked token, adds nothing to it and gets a zero gradient). Positions whose label is
    ``ignore_index`` give 0 and no gradient. The shift between logits and labels is the
    caller's (``logits[:, :-1]`` with ``labels[:, 1:]`` works without a copy).

    ``inplace_backward=True`` writes the logits' gradient into the logits tensor itself (saves
    one logits-sized buffer; the logits must not be used after the backward; a leaf tensor that
    requires grad is refused where a graph is built).
    ``check_labels`` validates the label range on the host (one device sync). Without it, a label
    outside [0, V) gives nan on the CUDA kernels; on the CPU the labels are checked anyway (no
    sync there), so it raises as with the check.
    """
    _check.tensor("logits", logits)
    _check.tensor("labels", labels)
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be (N, V) or (B, T, V), got shape {tuple(logits.shape)}")
    _check.dtype_in("logits", logits, (*FLOAT_DTYPES, torch.float64))
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 (or int32), got {labels.dtype}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels must have shape {tuple(logits.shape[:-1])} (logits without V), got {tuple(labels.shape)}"
        )
    _check.same_device(logits=logits, labels=labels)
    if not torch.compiler.is_compiling():  # (traced, they may be symbolic: compared as they are)
        temperature = _check.real("temperature", temperature)
        ignore_index = _check.integer("ignore_index", ignore_index)
    if not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    if logits.shape[-1] == 0:
        raise ValueError("logits has an empty vocabulary dimension")
    if inplace_backward and logits.requires_grad and torch.is_grad_enabled():
        if (logits if logits._base is None else logits._base).is_leaf:
            # its gradient would be written into it, and autograd would hand the same tensor back
            # as its .grad: the values the caller holds replaced by their gradient (through a view,
            # such as the shifted logits[:, :-1], the leaf's own values)
            raise ValueError(
                "inplace_backward=True overwrites the logits with their gradient, so logits must be "
                "computed by the model (not a leaf tensor that requires grad, nor a view of one)"
            )
    labels = labels.long()
    if logits.stride(-1) != 1 or _may_overlap(logits):
        # (rows that share memory, e.g. from expand() or unfold(), would share their gradient's
        # elements too: the backward writes dlogits with the logits' strides)
        logits = logits.contiguous()
    args = (logits, labels, float(temperature), int(ignore_index), bool(inplace_backward), bool(check_labels))
    if torch.compiler.is_compiling():
        logp, ent, _ = _token_logprobs(*args)
    else:
        logp, ent, _ = _EagerTokenLogprobs.apply(*args)
    return (logp, ent) if return_entropy else logp


# --------------------------------------------------------------------------------------------
# fused_linear_logprobs
# --------------------------------------------------------------------------------------------
def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated and returned in fp32 (bf16/fp16 operands stay on the tensor cores)."""
    if a.dtype == torch.float32 or a.device.type != "cuda":
        return torch.mm(a.float(), b.float())
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError) as e:  # torch without mm(out_dtype=)
        if "fp32_mm" not in _lib._warned:
            _lib._warned.add("fp32_mm")
            warnings.warn(
                f"torch.mm(out_dtype=float32) unavailable ({e}); logits pass through {a.dtype}", stacklevel=3
            )
        return torch.mm(a, b).float()


def _chunk_rows(vocab: int, chunk_rows: int) -> int:
    if chunk_rows > 0:
        return chunk_rows
    return max(64, (CHUNK_BYTES // (4 * vocab)) // 64 * 64)


def _valid_rows(labels: torch.Tensor, ignore_index: int, vocab: int = 0) -> torch.Tensor | None:
    """Flat indices of the rows with a valid label, or None when no row is ignored (then the
    count was the only transfer to the host); with vocab > 0 the labels' range is checked in the
    same transfer (``_label_stats``)."""
    nv = _label_stats(labels, ignore_index, vocab)
    return None if nv == labels.numel() else (labels.reshape(-1) != ignore_index).nonzero().squeeze(1)


def _chunks(valid: torch.Tensor | None, n: int, rows_per_chunk: int):
    """Row selections of at most rows_per_chunk of the n rows, in order, over the valid rows
    (``_valid_rows``): slices when no row is ignored, else index tensors; ignored rows never
    reach a matmul."""
    nv = n if valid is None else valid.numel()
    for c0 in range(0, nv, rows_per_chunk):
        c1 = min(nv, c0 + rows_per_chunk)
        yield slice(c0, c1) if valid is None else valid[c0:c1]


def _chunk_stats(hc, weight, yc, bias_f, softcap, logit_scale, temperature, want_grad, row_scale, overflow):
    """One chunk: fp32 logits, then (logp, entropy, lse, G, label_coef, row_norm) — the kernel on
    sm_90, the reference elsewhere. G (rows, V), in hidden's dtype, is the softmax part of
    row_scale * d logp / d logits, times row_norm[i] when row_norm is returned (the single-pass
    kernel leaves G unnormalised); label_coef (fp32) the one-hot part. ``overflow`` (an int32
    device flag) selects the single-pass kernel, which sets it if a row overflowed."""
    logits = _mm_fp32(hc, weight.t())
    rows, v = logits.shape
    if not _lib.use_kernel(hc, "fused_linear_logprobs"):
        lp, en, ls, g, coef = ref.fused_chunk(
            logits, yc, bias_f, logit_scale, softcap, temperature, want_grad, row_scale
        )
        return lp, en, ls, (None if g is None else g.to(hc.dtype)), coef, None
    lp = torch.empty(rows, dtype=torch.float32, device=hc.device)
    en, ls = torch.empty_like(lp), torch.empty_like(lp)
    coef = torch.empty_like(lp) if want_grad else None
    norm = torch.empty_like(lp) if overflow is not None else None
    _lib.extension().fused_logprob_chunk(
        logits.data_ptr(),
        rows,
        v,
        v,
        yc.data_ptr(),
        _lib.ptr(bias_f),
        float(logit_scale),
        float(softcap),
        1.0 / temperature,
        lp.data_ptr(),
        en.data_ptr(),
        ls.data_ptr(),
        _lib.DTYPE_CODES[hc.dtype],
        want_grad,
        _lib.ptr(row_scale),
        _lib.ptr(coef),
        overflow is not None,
        _lib.ptr(norm),
        _lib.ptr(overflow),
        _lib.stream(hc),
    )
    g = None
    if want_grad:  # 16-bit G sits in the first half of each fp32 row
        g = logits if hc.dtype == torch.float32 else logits.view(hc.dtype)[:, :v]
    return lp, en, ls, g, coef, norm


def _drop_label_entry(g: torch.Tensor, col: torch.Tensor, inside: torch.Tensor | None = None) -> None:
    """Zero G's label entry (``col`` (rows,): the label's column in G; only rows where ``inside``,
    when given), in place; the caller then scales label_coef by (1 - p_y) (``_one_minus_p``).

    G holds -p * dz'/dz in hidden's dtype, the label's entry included, and label_coef the one-hot
    part in fp32, so the label's column sums to (1 - p_y) dz'/dz. Rounded to 16 bits, p_y of a
    confident token (above 1 - 2^-9 in bf16) is 1 and the whole (1 - p_y) W_y pull is lost, where
    PyTorch's log_softmax backward keeps it to bf16's relative precision. Taken out of G and
    folded into label_coef from the fp32 log-prob, it stays exact to fp32."""
    if inside is None:
        g.scatter_(1, col[:, None], 0)
    else:
        c = col.clamp(0, g.shape[1] - 1)[:, None]
        g.scatter_(1, c, torch.where(inside[:, None], 0, g.gather(1, c)))


def _one_minus_p(logp: torch.Tensor) -> torch.Tensor:
    """1 - p_y from the label's fp32 log-prob, without cancellation."""
    return torch.expm1(logp).neg_()


def _fused_outputs(hidden: torch.Tensor, compute_grad: bool, valid, accumulate_j: bool):
    """(logp, entropy, lse) (N,) fp32 and J (N, H) fp32 (empty without compute_grad): what every
    fused forward fills block by block. Zeros where some rows are ignored (valid not None: those
    rows stay 0) and, for J, where the blocks accumulate into it (accumulate_j); otherwise
    uninitialised, every element being written."""
    n, h = hidden.shape
    new = torch.empty if valid is None else torch.zeros
    new_j = torch.zeros if valid is not None or accumulate_j else torch.empty
    J = new_j(n if compute_grad else 0, h, dtype=torch.float32, device=hidden.device)
    logp, ent, lse = (new(n, dtype=torch.float32, device=hidden.device) for _ in range(3))
    return logp, ent, lse, J


def _block_acc(J: torch.Tensor, rows, r: int, zero: bool = True) -> torch.Tensor:
    """Where a row block accumulates its J rows: J's rows themselves when the block is a slice,
    else a buffer (zeros, or uninitialised without ``zero``) that _store_block_acc copies back."""
    if isinstance(rows, slice):
        return J[rows]
    return J.new_zeros(r, J.shape[1]) if zero else J.new_empty(r, J.shape[1])


def _store_block_acc(J: torch.Tensor, rows, acc: torch.Tensor) -> None:
    if not isinstance(rows, slice):
        J.index_copy_(0, rows, acc)


def _forward(
    hidden,
    weight,
    labels,
    bias,
    temperature,
    valid,
    softcap,
    logit_scale,
    chunk_rows,
    compute_grad,
    single_pass,
):
    dev = hidden.device
    logp, ent, lse, J = _fused_outputs(hidden, compute_grad, valid, accumulate_j=False)
    bias_f = None if bias is None else bias.float().contiguous()
    overflow = torch.zeros(1, dtype=torch.int32, device=dev) if single_pass else None
    for rows in _chunks(valid, hidden.shape[0], _chunk_rows(weight.shape[0], chunk_rows)):
        hc, yc = hidden[rows], labels[rows].contiguous()
        lp, en, ls, g, coef, norm = _chunk_stats(
            hc, weight, yc, bias_f, softcap, logit_scale, temperature, compute_grad, None, overflow
        )
        logp[rows], ent[rows], lse[rows] = lp, en, ls
        if compute_grad:
            _drop_label_entry(g, yc)
            coef.mul_(_one_minus_p(lp))
            jc = _mm_fp32(g, weight)
            if norm is not None:
                jc.mul_(norm[:, None])
            jc.add_(weight.index_select(0, yc).float() * coef[:, None])  # the one-hot part, in fp32
            J[rows] = jc
    return logp, ent, lse, J, overflow


def _vchunk_rows(chunk_rows: int) -> int:
    if chunk_rows > 0:
        return chunk_rows
    if VCHUNK_ROWS > 0:
        return VCHUNK_ROWS
    return max(64, (CHUNK_BYTES // (4 * VCHUNK_COLS)) // 64 * 64)


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool = False) -> None:
    """acc += a @ b, or acc = a @ b when ``first`` (acc's contents, possibly uninitialised, are
    ignored); acc fp32, accumulated in fp32 (bf16/fp16 operands stay on the tensor cores)."""
    beta = 0.0 if first else 1.0
    if a.dtype == torch.float32 or a.device.type != "cuda":
        acc.addmm_(a.float(), b.float(), beta=beta)
        return
    try:
        torch.addmm(acc, a, b, out_dtype=torch.float32, beta=beta, out=acc)
    except (TypeError, RuntimeError) as e:  # torch without addmm(out_dtype=) or with a stricter one
        if "fp32_addmm" not in _lib._warned:
            _lib._warned.add("fp32_addmm")
            warnings.warn(
                f"torch.addmm(out_dtype=float32) unavailable ({e}); G @ W goes through a temporary",
                stacklevel=3,
            )
        mm = _mm_fp32(a, b)
        if first:
            acc.copy_(mm)
        else:
            acc.add_(mm)


def _vchunk_step(
    logits,
    gdtype,
    yc,
    v0,
    bias_f,
    softcap,
    logit_scale,
    temperature,
    zref,
    st,
    first,
    want_grad,
    overflow,
    kernel,
):
    """One vocabulary chunk (columns v0 .. v0 + logits.shape[1]) of a row block: adds its sums to
    st = (s0, s1, label_logit, label_coef) and returns G (rows, C) in gdtype (None without
    want_grad) — the kernel on sm_90 (G over the logits buffer), the reference elsewhere."""
    rows, c = logits.shape
    s0, s1, zy, coef = st
    if not kernel:
        s0c, s1c, inside, zyc, coefc, g, bad = ref.fused_vchunk(
            logits, yc, v0, bias_f, logit_scale, softcap, temperature, zref, want_grad
        )
        if first:
            s0.copy_(s0c)
            s1.copy_(s1c)
        else:
            s0.add_(s0c)
            s1.add_(s1c)
        zy.copy_(torch.where(inside, zyc, zy))
        if want_grad:
            coef.copy_(torch.where(inside, coefc, coef))
        overflow.bitwise_or_(bad)
        return None if g is None else g.to(gdtype)
    _lib.extension().fused_logprob_vchunk(
        logits.data_ptr(),
        rows,
        c,
        c,
        v0,
        yc.data_ptr(),
        _lib.ptr(bias_f),
        float(logit_scale),
        float(softcap),
        1.0 / temperature,
        zref.data_ptr(),
        s0.data_ptr(),
        s1.data_ptr(),
        not first,
        zy.data_ptr(),
        _lib.DTYPE_CODES[gdtype],
        want_grad,
        0,
        _lib.ptr(coef),
        overflow.data_ptr(),
        _lib.stream(logits),
    )
    if not want_grad:
        return None
    return (
        logits if gdtype == torch.float32 else logits.view(gdtype)[:, :c]
    )  # 16-bit G: first half of each row


def _forward_vchunk(
    hidden,
    weight,
    labels,
    bias,
    temperature,
    valid,
    softcap,
    logit_scale,
    chunk_rows,
    compute_grad,
    kernel,
):
    """Row blocks x vocabulary chunks: each chunk of the weight is read once per row block (twice
    with compute_grad: logits, then G @ W into J) and the block's rows are finished at the end.
    Exponents are relative to each row's label logit, estimated by a gather-dot before the loop,
    so the chunks' sums add without rescaling."""
    v = weight.shape[0]
    dev = hidden.device
    logp, ent, lse, J = _fused_outputs(hidden, compute_grad, valid, accumulate_j=True)
    bias_f = None if bias is None else bias.float().contiguous()
    overflow = torch.zeros(1, dtype=torch.int32, device=dev)
    vc = max(1, VCHUNK_COLS)
    for rows in _chunks(valid, hidden.shape[0], _vchunk_rows(chunk_rows)):
        hc, yc = hidden[rows], labels[rows].contiguous()
        r = yc.numel()
        wy = weight.index_select(0, yc)
        # the shift: z'_y from a gather-dot (only a shift: its rounding does not matter)
        raw = (hc * wy).sum(1, dtype=torch.float32)
        zref = ref.transform_logits(
            raw, None if bias_f is None else bias_f.index_select(0, yc), logit_scale, softcap, temperature
        )[0].contiguous()
        s0 = torch.empty(r, dtype=torch.float32, device=dev)
        s1, zy = torch.empty_like(s0), torch.empty_like(s0)
        coef = torch.empty_like(s0) if compute_grad else None
        acc = _block_acc(J, rows, r) if compute_grad else None
        for v0 in range(0, v, vc):
            wc = weight[v0 : v0 + vc]
            logits = _mm_fp32(hc, wc.t())
            g = _vchunk_step(
                logits,
                hidden.dtype,
                yc,
                v0,
                bias_f,
                softcap,
                logit_scale,
                temperature,
                zref,
                (s0, s1, zy, coef),
                v0 == 0,
                compute_grad,
                overflow,
                kernel,
            )
            if compute_grad:
                local = yc - v0
                _drop_label_entry(g, local, (local >= 0) & (local < wc.shape[0]))
                _addmm_fp32(acc, g, wc)
            del logits, g
        log_s0 = torch.log(s0)
        lp = zy - zref - log_s0
        logp[rows] = lp
        lse[rows] = zref + log_s0
        ent[rows] = log_s0 - s1 / s0
        if compute_grad:
            # normalise the softmax part, then add the label's whole term in fp32
            coef.mul_(_one_minus_p(lp))
            acc.mul_(s0.reciprocal()[:, None]).addcmul_(coef[:, None], wy)
            _store_block_acc(J, rows, acc)
    return logp, ent, lse, J, overflow


_MAX_S0 = 6.2e27  # e^64: a row whose sum passes it had a logit more than ~64 above its label's


class _HostFlag:
    """A device int32 flag copied to pinned host memory behind the work queued so far: item()
    waits for that work alone, not for what the stream is given afterwards."""

    def __init__(self, flag: torch.Tensor):
        self.host = torch.empty(1, dtype=torch.int32, pin_memory=True)
        self.host.copy_(flag, non_blocking=True)
        self.ready = torch.cuda.Event()
        self.ready.record()

    def item(self) -> int:
        self.ready.synchronize()
        return int(self.host[0])


def _gemm_eligible(hidden, weight, bias, softcap, need_entropy, kernel) -> bool:
    """Whether the fused lm_head GEMM (exp and row sums in the GEMM's epilogue) can serve the
    call: bf16 on sm_90 (or the CPU loop of the tests), no bias, no soft-cap, no entropy (those
    keep the vocab-chunked path), TMA-friendly rows (H a multiple of 8, unit column stride)."""
    if not (GEMM and (kernel or _GEMM_ON_CPU)) or hidden.dtype != torch.bfloat16:
        return False
    if bias is not None or softcap > 0 or need_entropy:
        return False
    h = hidden.shape[1]
    return h % 8 == 0 and weight.stride(1) == 1 and weight.stride(0) % 8 == 0 and weight.data_ptr() % 16 == 0


def _gemm_shift(hc: torch.Tensor, weight: torch.Tensor, yc: torch.Tensor, c: float, kernel: bool):
    """The block's shift c * z_y (rows,) fp32: one kernel on the GPU, the exact-product dot on CPU."""
    if not kernel:  # bf16 x bf16 products are exact in fp32
        return (hc.float() * weight.index_select(0, yc).float()).sum(1).mul_(c)
    shift = torch.empty(hc.shape[0], dtype=torch.float32, device=hc.device)
    _lib.extension().fused_logprob_gemm_shift(
        hc.data_ptr(),
        hc.stride(0),
        weight.data_ptr(),
        weight.stride(0),
        yc.data_ptr(),
        hc.shape[0],
        hc.shape[1],
        weight.shape[0],
        c,
        shift.data_ptr(),
        _lib.stream(hc),
    )
    return shift


def _gemm_finish(part, tail, shift, yc, rows, c, outs, overflow, acc, weight, kernel) -> None:
    """The block's end: s0 = the sum of its tiles' row sums (and the tail), logp = -log s0 and
    lse = shift + log s0 into outs = (logp, lse) at rows, the overflow flag, and, with acc (the
    block's G @ W in fp32), acc <- c (W[y] - acc / s0) in place: d logp / d h of each row."""
    r = shift.shape[0]
    logp, lse = outs
    if not kernel:
        s0 = part.view(-1, part.shape[-1]).sum(0)[:r]
        if tail is not None:
            s0.add_(tail)
        log_s0 = torch.log(s0)
        logp[rows] = -log_s0
        lse[rows] = shift + log_s0
        overflow.bitwise_or_((~(s0 <= _MAX_S0)).any().int())  # also catches nan
        if acc is not None:  # the one-hot part added in fp32
            acc.mul_((-c / s0)[:, None]).add_(weight.index_select(0, yc), alpha=c)
        return
    direct = isinstance(rows, slice)
    lp_out = logp[rows] if direct else torch.empty_like(shift)
    lse_out = lse[rows] if direct else torch.empty_like(shift)
    _lib.extension().fused_logprob_gemm_finish(
        part.data_ptr(),
        part.numel() // part.shape[-1],
        part.shape[-1],
        _lib.ptr(tail),
        shift.data_ptr(),
        yc.data_ptr(),
        r,
        weight.shape[0],
        c,
        _MAX_S0,
        lp_out.data_ptr(),
        lse_out.data_ptr(),
        overflow.data_ptr(),
        _lib.ptr(acc),
        0 if acc is None else acc.stride(0),
        weight.data_ptr(),
        weight.stride(0),
        weight.shape[1],
        _lib.stream(shift),
    )
    if not direct:
        logp[rows], lse[rows] = lp_out, lse_out


def _gemm_tile(kernel: bool) -> tuple[int, int]:
    """(rows, columns) of the fused GEMM's tile: the layout of its per-tile row sums (the CPU
    reference writes one column of sums, any layout does)."""
    return tuple(_lib.extension().FUSED_LOGPROB_GEMM_TILE) if kernel else (256, 192)


def _gemm_cols(rows: int, tile: tuple[int, int], device: torch.device) -> int:
    """Vocabulary columns per GEMM: GEMM_COLS rounded to the nearest whole number of waves of the
    persistent kernel (one tile per SM and wave), so that a chunk does not end on a partly filled
    wave: with 2048 rows and 132 SMs, 31680 (10 waves of 256x192 tiles) rather than 32768 (10.3).
    Widths below one such unit (the tests' small knobs) are taken as they are."""
    cols = max(8, GEMM_COLS // 8 * 8)
    if device.type != "cuda":
        return cols
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    row_tiles = -(-rows // tile[0])
    unit = sms // math.gcd(sms, row_tiles) * tile[1]  # columns whose tiles fill whole waves
    return cols if cols < unit else max(1, round(cols / unit)) * unit


def _gemm_chunk(hc, wc, g, scale, shift, part, tail, kernel) -> None:
    """One (row block, vocabulary chunk): g (rows, C) <- exp(scale * hc @ wc^T - shift) in bf16,
    part (column tiles, padded rows) <- its row sums per column tile. The kernel takes columns in
    multiples of 8 (TMA and CUTLASS alignment); the last chunk's 1-7 leftover columns go through
    a small fp32 matmul, their sums into tail (rows,)."""
    r, h = hc.shape
    nw = wc.shape[0]
    n8 = nw // 8 * 8
    if n8 and (g.stride(0) % 8 or hc.stride(0) % 8 or wc.stride(0) % 8):  # checked on CPU too
        raise RuntimeError(
            f"fused lm_head GEMM: row strides must be multiples of 8, got {g.stride(0)}, {hc.stride(0)}, {wc.stride(0)}"
        )
    if n8 and kernel:
        _lib.extension().fused_logprob_gemm(
            hc.data_ptr(),
            hc.stride(0),
            wc.data_ptr(),
            wc.stride(0),
            g.data_ptr(),
            g.stride(0),
            r,
            n8,
            h,
            scale,
            shift.data_ptr(),
            part.data_ptr(),
            _lib.stream(hc),
        )
    elif n8:
        gref, s0ref = ref.fused_gemm(hc, wc[:n8], scale, shift)
        g[:, :n8] = gref
        part[0, :r] = s0ref
    if n8 < nw:
        e = torch.exp(_mm_fp32(hc, wc[n8:].t()).mul_(scale).sub_(shift[:, None]))
        g[:, n8:] = e
        tail.add_(e.sum(1))


def _forward_gemm(
    hidden,
    weight,
    labels,
    bias,
    temperature,
    valid,
    softcap,
    logit_scale,
    chunk_rows,
    compute_grad,
    kernel,
):
    """The vocab-chunked walk with the fused lm_head GEMM: each (row block, vocabulary chunk) is
    one GEMM whose epilogue writes G = exp(c z - c z_y) in bf16 and the row sums of each tile, so
    no fp32 logits exist; J accumulates G @ W_chunk in fp32 as in the vocab-chunked path (the
    first chunk's product overwrites, so J needs no zeroing). c = logit_scale / temperature; the
    shift is the label's own logit c z_y, computed in fp32 before the walk, so logp = -log s0 and
    lse = c z_y + log s0. No entropy (nan)."""
    v = weight.shape[0]
    dev = hidden.device
    c = float(logit_scale) / temperature
    tm, tn = _gemm_tile(kernel)
    blocks = list(_chunks(valid, hidden.shape[0], chunk_rows if chunk_rows > 0 else max(1, GEMM_ROWS)))
    first = blocks[0] if blocks else slice(0, 0)
    vc = _gemm_cols(first.stop - first.start if isinstance(first, slice) else first.numel(), (tm, tn), dev)
    starts = list(range(0, v, vc))
    if len(starts) > 1 and v - starts[-1] < vc // 4:
        starts.pop()  # a narrow remainder joins the last full chunk: no GEMM pair for a few tiles
    chunks = [weight[v0:v1] for v0, v1 in zip(starts, [*starts[1:], v])]
    vc = -(-max((w.shape[0] for w in chunks), default=vc) // 8) * 8  # G's rows 16-byte aligned (TMA)
    # narrowest chunk (the vocabulary's remainder, unless it joined the last one) first: the last
    # block's last G @ W, which runs while the host takes the overflow flag and returns, is then a
    # full-width one
    order = sorted(range(len(chunks)), key=lambda j: chunks[j].shape[0])

    def outputs():
        logp, ent, lse, J = _fused_outputs(hidden, compute_grad, valid, accumulate_j=False)
        ent.fill_(float("nan"))
        return logp, ent, lse, J, torch.zeros(1, dtype=torch.int32, device=dev)

    g = flag = out = None
    for b, rows in enumerate(blocks):
        hc, yc = hidden[rows], labels[rows].contiguous()
        if hc.stride(1) != 1 or hc.stride(0) % 8 != 0 or hc.data_ptr() % 16 != 0:
            # a fresh copy: .contiguous() returns a one-row block as it is (a single row counts
            # as contiguous whatever its row stride or alignment)
            hc = torch.empty(hc.shape, dtype=hc.dtype, device=hc.device).copy_(hc)
        r = hc.shape[0]
        shift = _gemm_shift(hc, weight, yc, c, kernel)
        # per chunk, per column tile, per (padded) row: every tile's row sums, summed once at the end
        part = torch.zeros(len(chunks), -(-vc // tn), -(-r // tm) * tm, dtype=torch.float32, device=dev)
        tail = torch.zeros(r, dtype=torch.float32, device=dev) if v % 8 else None
        if g is None or g.shape[0] < r:
            g = torch.empty(r, vc, dtype=hidden.dtype, device=dev)
        last = b == len(blocks) - 1
        for i, j in enumerate(order):
            wc = chunks[j]
            gc = g[:r, : wc.shape[0]]
            _gemm_chunk(hc, wc, gc, c, shift, part[j], tail, kernel)
            if out is None:  # the first GEMM is queued: the host allocates while it runs
                out = logp, ent, lse, J, overflow = outputs()
            if i == 0:
                acc = _block_acc(J, rows, r, zero=False) if compute_grad else None
            if last and i == len(order) - 1 and kernel and compute_grad:
                # the last row sums are in: finish the statistics and send the overflow flag to
                # the host now, so that the caller's wait for it ends while this G @ W still runs
                _gemm_finish(part, tail, shift, yc, rows, c, (logp, lse), overflow, None, weight, kernel)
                flag = _HostFlag(overflow)
            if compute_grad:
                _addmm_fp32(acc, gc, wc, first=i == 0)
        _gemm_finish(part, tail, shift, yc, rows, c, (logp, lse), overflow, acc, weight, kernel)
        if compute_grad:
            _store_block_acc(J, rows, acc)
    logp, ent, lse, J, overflow = outputs() if out is None else out
    return logp, ent, lse, J, overflow if flag is None else flag


def _fused_impl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    softcap: float,
    logit_scale: float,
    chunk_rows: int,
    compute_grad: bool,
    need_entropy: bool = True,
    check_labels: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden (N, H), weight (V, H), labels (N elements, any shape) -> (logp, entropy, lse, J),
    each (N,) but J (N, H) fp32, d logp_i / d hidden_i (empty without compute_grad; zero rows for
    ignored labels). Without need_entropy the entropy may come back as nan (the fused-GEMM path
    does not form it). check_labels (always on the CPU) raises on a label outside [0, V) other
    than ignore_index. The body of the custom op and of the eager Function."""
    # (fp32 logits: the kernels read them as such, and the inputs were cast as nn.Linear's already)
    with _amp.off(hidden.device):
        # one device-to-host transfer: the valid rows' count, and with check_labels the labels'
        # range (on the CPU always: free there, and the reference would fail on the label with a
        # bare error)
        check = check_labels or hidden.device.type == "cpu"
        valid = _valid_rows(labels, ignore_index, weight.shape[0] if check else 0)
        args = (
            hidden,
            weight,
            labels.reshape(-1),
            bias,
            temperature,
            valid,
            softcap,
            logit_scale,
            chunk_rows,
            compute_grad,
        )
        # single pass (exponents relative to the label's logit) where G's dtype can hold
        # unnormalised values: vocab-chunked by default, else row-chunked; a logit far above the
        # label's overflows it: then redo relative to the row max, in two passes
        kernel = _lib.use_kernel(hidden, "fused_linear_logprobs")
        single = hidden.dtype != torch.float16 and kernel
        if _gemm_eligible(hidden, weight, bias, softcap, need_entropy, kernel):
            logp, ent, lse, J, overflow = _forward_gemm(*args, kernel=kernel)
        elif hidden.dtype != torch.float16 and VCHUNK and (kernel or _VCHUNK_ON_CPU):
            logp, ent, lse, J, overflow = _forward_vchunk(*args, kernel=kernel)
        else:
            logp, ent, lse, J, overflow = _forward(*args, single_pass=single)
        if overflow is not None and bool(overflow.item()):
            logp, ent, lse, J, _ = _forward(*args, single_pass=False)
        return logp, ent, lse, J


# the op torch.compile traces; eager calls go through _EagerFusedLinearLogprobs
_fused_linear_logprobs = torch.library.custom_op(
    "hoptune::fused_linear_logprobs", _fused_impl, mutates_args=()
)


@_fused_linear_logprobs.register_fake
def _(
    hidden,
    weight,
    labels,
    bias,
    temperature,
    ignore_index,
    softcap,
    logit_scale,
    chunk_rows,
    compute_grad,
    need_entropy=True,
    check_labels=False,
):
    n, h = hidden.shape
    logp = hidden.new_empty(n, dtype=torch.float32)
    J = hidden.new_empty(n if compute_grad else 0, h, dtype=torch.float32)
    return logp, torch.empty_like(logp), torch.empty_like(logp), J


def _fl_setup(ctx, inputs, output):
    hidden, weight, labels, bias, temperature, ignore_index, softcap, logit_scale, chunk_rows = inputs[:9]
    _, ent, lse, J = output
    ctx.meta = (temperature, ignore_index, softcap, logit_scale, chunk_rows, hidden.dtype)
    need_w = ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[3])
    ctx.save_for_backward(J, hidden if need_w else None, weight if need_w else None, labels, bias)
    # an entropy asked for stays differentiable, so that a backward through it raises (in
    # _fl_backward) rather than dropping the entropy term of a loss silently
    need_entropy = inputs[10] if len(inputs) > 10 else True
    ctx.mark_non_differentiable(lse, J, *(() if need_entropy else (ent,)))
    # the unused outputs' gradients stay None: materialised, J's alone would be (N, H) fp32 zeros
    ctx.set_materialize_grads(False)


def _fl_backward(ctx, grad_logp, grad_ent, grad_lse, grad_J, traced: bool = True):
    """The backward of both forms; ``traced`` (the custom op's, which torch.compile traces) goes
    through the registered ops, the eager Function calls their bodies directly."""
    J, hidden, weight, labels, bias = ctx.saved_tensors
    hdtype = ctx.meta[-1]
    dh = dw = db = None
    if grad_ent is not None:  # (None unless the entropy is in the loss: grads not materialised)
        raise RuntimeError(
            "fused_linear_logprobs's entropy carries no gradient: for an entropy term in the "
            "loss, compute the logits and use token_logprobs(logits, labels, return_entropy=True); "
            "for logging, detach the entropy (or compute it under torch.no_grad())"
        )
    if grad_logp is None:
        return (None,) * 12
    # selected away at the ignored rows, not left to J's zero rows: a nan or inf there (a caller's
    # 0 * inf at a masked position) would make the row's gradient nan (0 * nan)
    grad_logp = torch.where(labels.reshape(-1) != ctx.meta[1], grad_logp, 0)
    if ctx.needs_input_grad[0]:
        if J.numel() == 0 and labels.numel() > 0:
            raise RuntimeError("fused_linear_logprobs ran its forward without gradients (compute_grad=False)")
        scale = _scale_rows_op if traced else _scale_rows
        dh = scale(J, grad_logp, hdtype)
    if ctx.needs_input_grad[1] or (bias is not None and ctx.needs_input_grad[3]):
        args = (hidden, weight, labels, bias, grad_logp, *ctx.meta[:5])
        dw, db = (_weight_grad_op if traced else _weight_grad)(*args)
        dw = dw.to(weight.dtype) if ctx.needs_input_grad[1] else None
        db = db.to(bias.dtype) if bias is not None and ctx.needs_input_grad[3] else None
    return dh, dw, None, db, None, None, None, None, None, None, None, None


def _scale_rows(J: torch.Tensor, grad_logp: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """grad_logp[:, None] * J in fp32, rounded once to dtype: one pass over J (a kernel on CUDA)."""
    out = torch.empty(J.shape, dtype=dtype, device=J.device)
    rs = grad_logp.float().contiguous()
    aligned = J.shape[1] % 4 == 0 and J.stride(1) == 1 and J.stride(0) % 4 == 0 and J.data_ptr() % 16 == 0
    # (no rows: J's pointer is null, which the kernel refuses)
    if J.shape[0] > 0 and _lib.use_kernel(J, "fused_linear_logprobs") and aligned:
        _lib.extension().scale_rows(
            J.data_ptr(),
            J.stride(0),
            rs.data_ptr(),
            out.data_ptr(),
            _lib.DTYPE_CODES[dtype],
            J.shape[0],
            J.shape[1],
            _lib.stream(J),
        )
        return out
    return torch.mul(J, rs[:, None], out=out)


# the backward's pieces as ops, for the custom op's backward that torch.compile traces (the
# eager Function calls the functions themselves)
_scale_rows_op = torch.library.custom_op(
    "hoptune::fused_linear_logprobs_scale_rows", _scale_rows, mutates_args=()
)


@_scale_rows_op.register_fake
def _(J, grad_logp, dtype):
    return torch.empty(J.shape, dtype=dtype, device=J.device)


def _weight_grad(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    grad_logp: torch.Tensor,
    temperature: float,
    ignore_index: int,
    softcap: float,
    logit_scale: float,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dW, db) in fp32, dW = sum_i g_i (d logp_i / d z_i)^T h_i, recomputing each chunk's
    logits; db is empty without a bias."""
    with _amp.off(weight.device):
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        nb = 0 if bias is None else bias.shape[0]
        db = torch.zeros(nb, dtype=torch.float32, device=weight.device)
        bias_f = None if bias is None else bias.float().contiguous()
        labels = labels.reshape(-1)
        valid = _valid_rows(labels, ignore_index)
        for rows in _chunks(valid, labels.numel(), _chunk_rows(weight.shape[0], chunk_rows)):
            hc, yc = hidden[rows], labels[rows].contiguous()
            rs = grad_logp[rows].float().contiguous()
            lp, _, _, g, coef, _ = _chunk_stats(
                hc, weight, yc, bias_f, softcap, logit_scale, temperature, True, rs, None
            )
            _drop_label_entry(g, yc)
            coef.mul_(_one_minus_p(lp))
            dw += _mm_fp32(g.t(), hc)
            dw.index_add_(0, yc, hc.float() * coef[:, None])
            if bias is not None:
                db += g.float().sum(0)
                db.index_add_(0, yc, coef)
        return dw, db


_weight_grad_op = torch.library.custom_op(
    "hoptune::fused_linear_logprobs_weight_grad", _weight_grad, mutates_args=()
)


@_weight_grad_op.register_fake
def _(hidden, weight, labels, bias, grad_logp, temperature, ignore_index, softcap, logit_scale, chunk_rows):
    db = weight.new_empty(0 if bias is None else bias.shape[0], dtype=torch.float32)
    return weight.new_empty(weight.shape, dtype=torch.float32), db


_fused_linear_logprobs.register_autograd(_fl_backward, setup_context=_fl_setup)


_EagerFusedLinearLogprobs = _eager_function("FusedLinearLogprobs", _fused_impl, _fl_setup, _fl_backward)


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    chunk_rows: int = 0,
    check_labels: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of ``labels`` under ``softmax(lm_head(hidden) / temperature)`` without
    materialising the logits.

    hidden ``(*, H)`` bf16/fp16/fp32, weight ``(V, H)`` (the lm_head), labels ``(*)`` int64,
    bias ``(V,)``. Logits are ``(hidden @ weight^T + bias) * logit_scale``, then soft-capped
    ``softcap * tanh(z / softcap)`` when ``softcap`` is given (Gemma-2), then divided by the
    temperature. Returns fp32 log-probs shaped like labels (and the entropy with
    ``return_entropy``: it carries no gradient, and a backward through it raises; an entropy term
    in a loss needs ``token_logprobs`` on the logits; for logging, detach it). Ignored rows give
    0 and no gradient and cost no matmul. The weight (and bias) gradient is computed only if they
    require grad (a frozen lm_head, the QLoRA case, skips it). ``chunk_rows`` (0 = auto) bounds
    the fp32 logits held at once. ``check_labels`` raises on a label outside [0, V) other than
    ``ignore_index``; it rides on the host transfer of the valid-row count that the op makes
    anyway. Without it, such a label gives nan on the CUDA kernels; on the CPU the labels are
    checked anyway, so it raises. Inside ``torch.autocast`` hidden, weight and bias are cast to
    its dtype, as ``nn.Linear``'s are (they may then differ in dtype).
    """
    _check.tensor("hidden", hidden)
    _check.tensor("weight", weight)
    _check.tensor("labels", labels)
    _check.dtype_in("hidden", hidden, FLOAT_DTYPES)
    if _amp.enabled(hidden):
        # as nn.Linear's inside autocast, so that they may differ in dtype there; the op itself
        # then runs with autocast off
        hidden, weight, bias = _amp.cast_inputs(hidden, hidden, weight, bias)
    if hidden.dim() == 0:
        raise ValueError("hidden must be (*, H), got a 0-dim tensor")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be (V, H) with H = hidden.shape[-1] = {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary dimension (V = 0)")
    if hidden.shape[-1] == 0:
        raise ValueError("hidden and weight have an empty hidden dimension (H = 0)")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 (or int32), got {labels.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"labels must have shape {tuple(hidden.shape[:-1])} (hidden without H), got {tuple(labels.shape)}"
        )
    v = weight.shape[0]
    if bias is not None:
        _check.tensor("bias", bias)
        if tuple(bias.shape) != (v,):
            raise ValueError(f"bias must be ({v},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:  # (as F.linear: not cast silently)
            raise TypeError(f"bias must have hidden's dtype {hidden.dtype}, got {bias.dtype}")
    _check.same_device(hidden=hidden, weight=weight, labels=labels, bias=bias)
    if not torch.compiler.is_compiling():  # (traced, they may be symbolic: compared as they are)
        temperature = _check.real("temperature", temperature)
        ignore_index = _check.integer("ignore_index", ignore_index)
        softcap = None if softcap is None else _check.real("softcap", softcap, " (or None)")
        logit_scale = _check.real("logit_scale", logit_scale)
        chunk_rows = _check.integer("chunk_rows", chunk_rows)
    if chunk_rows < 0:
        raise ValueError(f"chunk_rows must be 0 (auto) or a positive number of rows, got {chunk_rows}")
    if not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    # (comparisons, not math.isfinite: under torch.compile with dynamic shapes a float argument
    # can be symbolic, which math.isfinite cannot take)
    if softcap is not None and not (softcap > 0 and softcap < float("inf")):
        # (inf: softcap * tanh(z / softcap) = inf * 0, every log-prob nan, silently)
        raise ValueError(f"softcap must be a positive finite number (or None), got {softcap}")
    if not (-float("inf") < logit_scale < float("inf")):  # (every log-prob would be nan, silently)
        raise ValueError(f"logit_scale must be a finite number, got {logit_scale}")
    labels = labels.long()
    shape = labels.shape
    args = (
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        labels,
        bias,
        float(temperature),
        int(ignore_index),
        float(softcap or 0.0),
        float(logit_scale),
        int(chunk_rows),
        torch.is_grad_enabled() and hidden.requires_grad,
        bool(return_entropy),
        bool(check_labels),
    )
    if torch.compiler.is_compiling():
        logp, ent, _, _ = _fused_linear_logprobs(*args)
    else:
        logp, ent, _, _ = _EagerFusedLinearLogprobs.apply(*args)
    # the views made with grad on: a view made under no_grad refuses a later in-place op that
    # autograd records (a reference model's log-probs combined in place with a trained term)
    with torch.enable_grad():
        logp, ent = logp.view(shape), ent.view(shape)
    return (logp, ent) if return_entropy else logp
