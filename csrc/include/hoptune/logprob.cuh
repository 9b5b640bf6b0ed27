// Per-token log-probabilities over a vocabulary, torch-free.
//
// For row i with logits z (V values) and label y:  z' = transform(z) (temperature, and in the
// fused path bias, logit scale and soft-capping),  lse = log sum exp z',
//   logp_i = z'_y - lse,   H_i = lse - sum_v p_v z'_v   (entropy of p = softmax z').
// Backward: dz'_v = g_lp (1[v = y] - p_v) - g_H p_v (z'_v - lse + H), chained through transform.
// Rows whose label is ignore_index give logp = H = 0 and a zero gradient row; in token_logprobs
// another label outside [0, V) gives logp = nan (and no one-hot term in the backward).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "hoptune/common/check.h"

namespace hoptune {

// Logits viewed as [B, T, V] with arbitrary row strides (the vocabulary dim contiguous):
// row r = b * T + t lives at logits + b * stride_b + t * stride_t.
struct LogitsView {
  const void* ptr = nullptr;
  DType dtype = DType::kBFloat16;
  int64_t batch = 1, seq = 0, vocab = 0;
  int64_t stride_b = 0, stride_t = 0;  // in elements
};

struct TokenLogprobFwd {
  LogitsView logits;
  const int64_t* labels = nullptr;  // [B * T]
  int64_t ignore_index = -100;
  float inv_temperature = 1.f;
  float* logp = nullptr;     // [B * T]
  float* entropy = nullptr;  // [B * T]
  float* lse = nullptr;      // [B * T], kept for the backward
};

struct TokenLogprobBwd {
  LogitsView logits;
  const int64_t* labels = nullptr;
  int64_t ignore_index = -100;
  float inv_temperature = 1.f;
  const float* lse = nullptr;
  const float* entropy = nullptr;
  const float* grad_logp = nullptr;     // [B * T]
  const float* grad_entropy = nullptr;  // [B * T] or null
  void* dlogits = nullptr;              // same dtype and strides as logits; may alias it
};

// `variant` 1 selects a kernel version kept for measurement (0: the default).
cudaError_t token_logprobs_fwd(const TokenLogprobFwd& a, cudaStream_t stream, int variant = 0);
cudaError_t token_logprobs_bwd(const TokenLogprobBwd& a, cudaStream_t stream, int variant = 0);

// One chunk of the fused lm_head path: fp32 logits [rows, V] (row stride ld, written by a GEMM
// into `buf`) -> logp, entropy, lse per row and, when grad is requested, the matrix
//   G[i, v] = -row_scale[i] * p_iv * dz'_iv/dz_iv            (the softmax part of d logp_i / d z_i)
// in grad_dtype (16-bit: row stride 2 * ld, written over the first half of each fp32 row; fp32:
// in place), plus label_coef[i] = row_scale[i] * dz'_iy/dz_iy, the one-hot part, which the caller
// adds in fp32 (J_i += label_coef_i * W[y_i]) so that the largest term of the gradient is never
// rounded to 16 bits. All labels are valid here (the caller drops ignored rows; one outside
// [0, V) gives a nan logp, and in the shifted pass the overflow flag, instead of a stray read).
struct FusedLogprobChunk {
  float* buf = nullptr;  // [rows, ld] fp32
  int64_t rows = 0, vocab = 0, ld = 0;
  const int64_t* labels = nullptr;      // [rows]
  const float* bias = nullptr;          // [V] or null
  float logit_scale = 1.f;              // z <- z * logit_scale (after bias)
  float softcap = 0.f;                  // > 0: z <- softcap * tanh(z / softcap)
  float inv_temperature = 1.f;          // z' = z / temperature
  float* logp = nullptr;                // [rows]
  float* entropy = nullptr;             // [rows]
  float* lse = nullptr;                 // [rows]
  DType grad_dtype = DType::kBFloat16;  // dtype of G (the hidden states' dtype)
  bool write_grad = false;
  const float* row_scale =
      nullptr;                  // [rows] multiplies G and label_coef (upstream gradient), or null
  float* label_coef = nullptr;  // [rows], written when write_grad
  // Single pass: exponents taken relative to the label's logit instead of the row max, so the
  // row is read once; G is then left unnormalised (the caller scales G @ W by row_norm = 1/s0)
  // and overflow (a logit more than ~88 above the label's) is reported through *overflow.
  bool shifted = false;
  float* row_norm = nullptr;  // [rows], written when shifted
  int* overflow = nullptr;    // set to 1 when shifted and a row overflowed
};

cudaError_t fused_logprob_chunk(const FusedLogprobChunk& a, cudaStream_t stream);

// One vocabulary chunk, columns [col0, col0 + cols), of the vocab-chunked fused lm_head path:
// fp32 logits [rows, cols] (row stride ld, written by a GEMM into `buf`). Exponents are taken
// relative to a per-row shift ref[i] (the caller's estimate of z'_iy, fixed for all chunks):
//   t = z'_iv - ref_i,  s0_i += sum_v e^t,  s1_i += sum_v e^t t   (over the chunk's columns)
// and, when grad is requested, G[i, v] = -row_scale[i] * e^t * dz'_iv/dz_iv, unnormalised, in
// grad_dtype (bf16: row stride 2 * ld over the first half of each fp32 row; fp32: in place; fp16
// is refused, unnormalised values can exceed its range). The chunk holding row i's label writes
// label_logit[i] = z'_iy and label_coef[i] = row_scale[i] * dz'_iy/dz_iy. The caller sums the
// chunks and finishes: logp = label_logit - ref - log s0, lse = ref + log s0,
// H = log s0 - s1 / s0, d logp / d h = (G @ W) / s0 + label_coef W[y]. *overflow is set when
// some t > 64 or a sum is not finite (the caller then redoes the rows relative to the max).
struct FusedLogprobVChunk {
  float* buf = nullptr;  // [rows, ld] fp32
  int64_t rows = 0, cols = 0, ld = 0;
  int64_t col0 = 0;                     // vocabulary index of column 0
  const int64_t* labels = nullptr;      // [rows], in [0, V)
  const float* bias = nullptr;          // [V] (indexed by vocabulary id) or null
  float logit_scale = 1.f;              // z <- z * logit_scale (after bias)
  float softcap = 0.f;                  // > 0: z <- softcap * tanh(z / softcap)
  float inv_temperature = 1.f;          // z' = z / temperature
  const float* ref = nullptr;           // [rows] the shift
  float* s0 = nullptr;                  // [rows] sum e^t
  float* s1 = nullptr;                  // [rows] sum e^t t
  bool accumulate = false;              // add to s0, s1 (false: the first chunk writes them)
  float* label_logit = nullptr;         // [rows], written by the chunk holding the label
  DType grad_dtype = DType::kBFloat16;  // dtype of G: bf16 or fp32
  bool write_grad = false;
  const float* row_scale = nullptr;  // [rows] multiplies G and label_coef, or null
  float* label_coef = nullptr;       // [rows], written with label_logit when write_grad
  int* overflow = nullptr;           // set to 1 when a row overflowed
};

cudaError_t fused_logprob_vchunk(const FusedLogprobVChunk& a, cudaStream_t stream);

// The fused lm_head GEMM of the vocab-chunked path (bf16, sm_90a, CUTLASS): for A [m, k] (the
// hidden rows) and B [n, k] (a chunk of lm_head rows), both row-major with row strides lda, ldb
// (in elements; n, k, lda, ldb, ldg multiples of 8 and 16-byte aligned bases, as TMA needs),
//   G[i, v] = exp(scale * (A_i . B_v) - shift_i)   bf16 [m, n], row stride ldg
// without writing the logits, and the row sums of the same fp32 values per tile of
// kFusedLogprobTileN columns:
//   partial[t * ldp + i] = sum over v in tile t of G[i, v],  t < ceil(n / kFusedLogprobTileN),
//   ldp = m rounded up to kFusedLogprobTileM (rows past m get 0).
// Every entry is written once (no atomics): s0 = the sum over t is reproducible bit for bit.
// The caller keeps the fp32 label logit, the one-hot part and the overflow check.
constexpr int kFusedLogprobTileM = 256, kFusedLogprobTileN = 192;

struct FusedLogprobGemm {
  const void* a = nullptr;
  int64_t lda = 0;
  const void* b = nullptr;
  int64_t ldb = 0;
  void* g = nullptr;
  int64_t ldg = 0;
  int m = 0, n = 0, k = 0;
  float scale = 1.f;
  const float* shift = nullptr;  // [m]
  float* partial = nullptr;      // [ceil(n / kFusedLogprobTileN), ldp]
};

cudaError_t fused_logprob_gemm(const FusedLogprobGemm& a, cudaStream_t stream);

// The row-wise steps around the fused lm_head GEMM, for a block of rows (bf16 hidden rows h [rows,
// k] and the lm_head W [V, k], row strides ldh, ldw, 16-byte aligned, k a multiple of 8):
//   before the GEMMs:  shift[i] = scale * (h_i . W[y_i])   (fp32 sum of the exact products)
//   after them:        s0_i = tail[i] + sum over p < n_partial of partial[p * ldp + i],
//                      logp[i] = -log s0_i,  lse[i] = shift[i] + log s0_i,
//                      *overflow = 1 when s0_i is above max_s0 or not a number, and, when acc is
//                      given (acc_i = G_i @ W accumulated in fp32):
//                      acc_i <- scale * (W[y_i] - acc_i / s0_i)   (= d logp_i / d h_i).
// Labels out of [0, V) give a nan shift (and so set the overflow flag in the finish).
struct FusedLogprobGemmRows {
  const void* h = nullptr;  // [rows, k] bf16
  int64_t ldh = 0;
  const void* w = nullptr;  // [V, k] bf16
  int64_t ldw = 0;
  const int64_t* labels = nullptr;  // [rows]
  int64_t rows = 0, k = 0, vocab = 0;
  float scale = 1.f;
  float* shift = nullptr;  // [rows]
  // finish only
  const float* partial = nullptr;  // [n_partial, ldp]
  int64_t n_partial = 0, ldp = 0;
  const float* tail = nullptr;  // [rows] or null
  float max_s0 = 0.f;
  float* logp = nullptr;  // [rows]
  float* lse = nullptr;   // [rows]
  int* overflow = nullptr;
  float* acc = nullptr;  // [rows, k] fp32, row stride ld_acc, or null (no gradient)
  int64_t ld_acc = 0;
};
cudaError_t fused_logprob_gemm_shift(const FusedLogprobGemmRows& a, cudaStream_t stream);
cudaError_t fused_logprob_gemm_finish(const FusedLogprobGemmRows& a, cudaStream_t stream);
// The fused path's backward: out[i, :] = row_scale[i] * J[i, :] in the hidden states' dtype
// (rounded once), J fp32 [rows, k] with row stride ld_j, out [rows, k] contiguous; k a multiple
// of 4, J and out 16-byte aligned.
struct ScaleRows {
  const float* j = nullptr;
  int64_t ld_j = 0;
  const float* row_scale = nullptr;  // [rows]
  void* out = nullptr;
  DType out_dtype = DType::kBFloat16;
  int64_t rows = 0, k = 0;
};
cudaError_t scale_rows(const ScaleRows& a, cudaStream_t stream);
// What the host must know before a log-prob op plans its work, in one pass and one transfer:
// out[0] = how many of the n labels (int64, contiguous) are not ignore_index, out[1] = the first
// position of such a label outside [0, vocab), or -1 (no range check when vocab <= 0). out: two
// int64 the device can write, e.g. host-mapped pinned memory read after the stream's sync.
struct LabelStats {
  const int64_t* labels = nullptr;
  int64_t n = 0, ignore_index = -100, vocab = 0;
  int64_t* out = nullptr;
};
cudaError_t label_stats(const LabelStats& a, cudaStream_t stream);
}  // namespace hoptune
