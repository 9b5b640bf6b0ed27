// LoRA terms of a layer's backward, torch-free.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "hoptune/common/check.h"

namespace hoptune {

// One pass over the upstream gradient dy [m, n] for both LoRA terms that read it:
//   dxa[i, r] = round(scale * sum_c dy[i, c] * lora_b[c, r])     [m, rank]
//   db[c, r]  = round(sum_i dy[i, c] * xa[i, r])                 [n, rank]
// (xa = scale * x A^T, so db is the gradient of B and dxa feeds dA = dxa^T x.) Every sum in fp32.
// dtype bf16 or fp16 for dy, lora_b, xa, dxa and db; dy rows ldy elements apart (ldy % 8 == 0),
// lora_b [n, rank], xa [m, rank], dxa and db contiguous; every pointer 16-byte aligned;
// rank in {8, 16, 32, 64}; n % 64 == 0; m >= 1. workspace: fp32 [(m + n) * rank], overwritten.
// Sums are reduced across CTAs with fp32 atomics, so their order (and a last bit) may vary
// between runs.
cudaError_t lora_dy_pass(const void* dy, int64_t ldy, int64_t m, int64_t n, const void* lora_b,
                         const void* xa, int rank, float scale, float* workspace, void* dxa,
                         void* db, DType dtype, cudaStream_t stream);

// Both factor gradients from one read of x [m, k] and dy [m, n] (a cluster kernel):
//   da[i, c] = round(sum_t dxa[t, i] * x[t, c])   [rank, k],  dxa = round(scale * dy @ lora_b)
//   db[c, i] = round(sum_t dy[t, c] * xa[t, i])   [n, rank],  xa  = round(scale * x @ lora_a^T)
// Every sum in fp32; xa and dxa rounded to the dtype once, as the two GEMMs that form them would.
// lora_grads_shape(k, n, rank) must hold: rank 16 and k == n == 512 C for C in {2, 4, 8}.
// dtype bf16 or fp16 for x, dy, lora_a [rank, k], lora_b [n, rank], da and db (those four
// contiguous, 4-byte aligned); x and dy rows ldx and ldy elements apart (multiples of 8), x, dy and
// workspace 16-byte aligned; m >= 1. workspace: fp32 [(k + n) * rank + 4], overwritten; zeroed
// first on `stream` unless `zeroed` (lora_grads_zero ran on it, on this stream or ordered before
// it). Sums are reduced across CTAs with fp32 atomics: their order (and a last bit) may vary
// between runs.
bool lora_grads_shape(int64_t k, int64_t n, int rank);
cudaError_t lora_grads_zero(float* workspace, int64_t k, int64_t n, int rank, cudaStream_t stream);
cudaError_t lora_grads(const void* x, int64_t ldx, const void* dy, int64_t ldy, int64_t m,
                       int64_t k, int64_t n, const void* lora_a, const void* lora_b, int rank,
                       float scale, float* workspace, bool zeroed, void* da, void* db, DType dtype,
                       cudaStream_t stream);

}  // namespace hoptune
