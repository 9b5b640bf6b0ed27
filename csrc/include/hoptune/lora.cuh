// LoRA terms of a layer's backward, torch-free.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
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

// Every LoRA factor gradient of a layer's backward, from x [m, k] and dy [m, n], in one call:
//   xa  = round(scale * x A^T)        [m, rank]  (internal: dB's operand)
//   dxa = round(scale * dy B)         [m, rank]  (for dX's rank-r term where it is needed)
//   db  = round(dy^T xa)              [n, rank]  (the gradient of B)
//   da  = round(dxa^T x)              [rank, k]  (the gradient of A)
// x A^T and dxa^T x come from the dy pass' kernel run over x for one product each, dxa and db
// from the dy pass; every sum in fp32 (with fp32 atomics across CTAs, as lora_dy_pass).
// dtype bf16 or fp16 for every tensor; x rows ldx apart, dy rows ldy apart (both % 8 == 0);
// lora_a [rank, k] and lora_b [n, rank] contiguous; dxa, da, db contiguous; every pointer 16-byte
// aligned; rank 8 or 16; k % 64 == 0, n % 64 == 0; m >= 1. workspace: at least
// lora_grads_workspace(m, n, k, rank) bytes, overwritten.
size_t lora_grads_workspace(int64_t m, int64_t n, int64_t k, int rank);
cudaError_t lora_grads(const void* x, int64_t ldx, const void* dy, int64_t ldy, int64_t m,
                       int64_t n, int64_t k, const void* lora_a, const void* lora_b, int rank,
                       float scale, void* workspace, size_t workspace_bytes, void* dxa, void* da,
                       void* db, DType dtype, cudaStream_t stream);

}  // namespace hoptune
