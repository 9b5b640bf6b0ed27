// The fused NF4 GEMM (csrc/kernels/nf4_gemm.cu), torch-free.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "hoptune/nf4.cuh"

namespace hoptune {

// The fused forward for many rows of x (bf16): one CUTLASS sm_90a GEMM whose mainloop decodes the
// NF4 codes in registers (TMA + wgmma, the weight as the register operand), with the LoRA term
// and the bias added to its fp32 accumulators before the single rounding:
//   y[i, j] = round(sum_c x[i, c] w[j, c] + sum_r xs[i, r] lora_b[j, r] + bias[j])
// w = nf4_dequantize's bf16 output (the same bits), xs = s x A^T [m, rank] in bf16 (formed by
// the caller). x [m, k] with rows ldx elements apart; y [m, n] with rows
// ldy apart. Requires: k % 64 == 0, blocksize % 64 == 0 and k % blocksize == 0 (quant blocks
// within rows), n % 8 == 0, ldx and ldy % 8 == 0, x, y and packed 16-byte aligned, rank even
// (0 <= rank <= 256; xs and lora_b null when 0), bias [n] bf16 or null. absmax_t is a scratch of
// n * k / blocksize floats (nf4_absmax_transposed's output, written by this call).
struct NF4LoraGemm {
  const void* x = nullptr;
  int64_t ldx = 0;
  int64_t m = 0;
  const uint8_t* packed = nullptr;
  NF4Absmax absmax;
  int64_t n = 0;
  int64_t k = 0;
  int blocksize = 64;
  float* absmax_t = nullptr;
  const void* xs = nullptr;
  const void* lora_b = nullptr;
  int rank = 0;
  const void* bias = nullptr;
  void* y = nullptr;
  int64_t ldy = 0;
  int tile_n = 0;  // tokens per CTA: 128 or 256; 0 picks by m
};
cudaError_t nf4_lora_gemm(const NF4LoraGemm& a, cudaStream_t stream);

}  // namespace hoptune
