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

}  // namespace hoptune
