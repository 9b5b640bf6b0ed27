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
// (0 <= rank <= 256; xs and lora_b null when 0), bias [n] bf16 or null. scratch: a 256-byte
// aligned buffer of nf4_lora_gemm_scratch_bytes(a) bytes (the absmax decoded and transposed, then
// the tile scheduler's partial sums and flags when the K range is split; written by this call).
//
// Work split: with splits = 1 each output tile (128 weight rows x tile_n tokens) is one CTA's
// work, which leaves SMs idle when there are few tiles (n = 4096 and a few hundred tokens: 32 or
// 64 tiles on 132 SMs). splits >= 2 cuts each tile's K range into that many parts, summed in fp32
// in the scratch in a fixed order (the same bits every run); splits = 0 lets CUTLASS's stream-K
// heuristic balance the K iterations over the SMs.
struct NF4LoraGemm {
  const void* x = nullptr;
  int64_t ldx = 0;
  int64_t m = 0;
  const uint8_t* packed = nullptr;
  NF4Absmax absmax;
  int64_t n = 0;
  int64_t k = 0;
  int blocksize = 64;
  void* scratch = nullptr;
  const void* xs = nullptr;
  const void* lora_b = nullptr;
  int rank = 0;
  const void* bias = nullptr;
  void* y = nullptr;
  int64_t ldy = 0;
  int tile_n = 256;  // tokens per CTA: 64, 128, 192 or 256 (hoptune.ops.nf4.fused_tile_n picks)
  int splits = 1;    // parts of each tile's K range (1 to 16); 0: stream-K
};
cudaError_t nf4_lora_gemm(const NF4LoraGemm& a, cudaStream_t stream);
// The scratch nf4_lora_gemm needs for a's shape (m, n, k, blocksize), tile_n and splits; 0 when
// they are invalid.
size_t nf4_lora_gemm_scratch_bytes(const NF4LoraGemm& a);

}  // namespace hoptune
