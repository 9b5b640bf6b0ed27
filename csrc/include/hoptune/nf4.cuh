// NF4 (bitsandbytes' 4-bit NormalFloat) quantize / dequantize, torch-free.
//
// Format (bit-compatible with bitsandbytes 0.50, CUDA path):
//   * the tensor is flattened; blocks of `blocksize` consecutive elements share one fp32 absmax;
//   * x is scaled by the fp32 reciprocal of absmax (x * (1/absmax)) and mapped to the nearest of
//     16 code values by strict `>` against the midpoints between them;
//   * element 2j goes to the high nibble of byte j, element 2j+1 to the low nibble;
//   * double quantization stores absmax - offset (offset = mean(absmax)) as 8-bit codes of the
//     signed dynamic map, blockwise (blocksize2 = 256) with one fp32 scale per block;
//   * dequantize is bf16_round(code[q] * absmax), absmax = code2[qa] * absmax2 + offset (two
//     separately rounded fp32 operations, as bitsandbytes does them in two kernels).
// One deliberate difference: an all-zero block gets code 7 (0.0) in every element so it
// dequantizes to exact zeros (bitsandbytes' CUDA kernel computes 0 * (1/0) = NaN and stores
// code 0 = -1.0, which double quantization turns into -absmax' instead of 0).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "hoptune/common/check.h"

// The 16 NF4 code values (bitsandbytes' fp32 literals), for tables in device memory.
#define HOPTUNE_NF4_CODE_VALUES                                                                    \
  -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f, \
      -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f,                    \
      0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f,      \
      0.5626170039176941f, 0.7229568362236023f, 1.0f

namespace hoptune {

// How the per-block absmax is stored: plain fp32, or nested (double-quantized).
struct NF4Absmax {
  const float* absmax = nullptr;     // fp32 [nblocks]; null when nested
  const uint8_t* qabsmax = nullptr;  // nested: uint8 [nblocks]
  const float* absmax2 = nullptr;    // nested: fp32 [ceil(nblocks / blocksize2)]
  const float* code2 = nullptr;      // nested: fp32 [256], the signed dynamic map
  float offset = 0.f;                // nested: mean(absmax) before the nested quantization
  int blocksize2 = 256;
};

// out[i] = bf16/fp16/fp32(code[q_i] * absmax[i / blocksize]) for i < n.
// n % blocksize == 0, blocksize a power of two in [64, 4096], packed and out 16-byte aligned.
// `variant` selects a numbered kernel version (0: the default; others kept for measurement).
cudaError_t nf4_dequantize(const uint8_t* packed, const NF4Absmax& absmax, int64_t n, int blocksize,
                           void* out, DType out_dtype, cudaStream_t stream, int variant = 0);

// The dequantized weight with a LoRA product folded in, for an NF4 weight [rows, cols] (row-major):
//   out[i, j] = round(w[i, j] + scale * sum_r lora_b[i, r] * lora_a[r, j]),  w = nf4_dequantize's
// output in dtype (bf16 or fp16); lora_a [rank, cols] and lora_b [rows, rank] contiguous in dtype,
// 1 <= rank <= 256, cols % 64 == 0, packed and out 16-byte aligned.
// `variant` selects a numbered kernel version (0: the default; others kept for measurement).
cudaError_t nf4_dequantize_lora(const uint8_t* packed, const NF4Absmax& absmax, int64_t rows,
                                int64_t cols, int blocksize, const void* lora_a, const void* lora_b,
                                int rank, float scale, void* out, DType dtype, cudaStream_t stream,
                                int variant = 0);

// Small-M product with an NF4 weight [n, k] (row-major), for generation (1 <= m <= 32 rows):
//   y[i, j] = round(sum_c x[i, c] w[j, c] + scale * sum_r xa[i, r] lora_b[j, r] + bias[j])
// w = nf4_dequantize's output in dtype (bf16 or fp16), the sums in fp32 (the first on tensor
// cores: mma.sync with the decoded codes as one operand); x [m, k] in dtype with rows ldx elements
// apart (x and ldx * 2 bytes 16-byte aligned), 64 <= k < 2^30 with k % 64 == 0, packed 16-byte
// aligned. xa [m, rank] fp32 (x A^T) and lora_b [n, rank] in dtype, or both null; bias [n] in
// dtype or null; y [m, n] contiguous in dtype. The weight is read once, as codes: no bf16 copy.
// The columns are cut into `slices` ranges (1 <= slices <= ceil(k / 128)) so that a small n
// still fills the GPU; with slices > 1, workspace holds slices * m * n floats (no initial value
// needed) and counters ceil(n / 128) ints that are zero before the launch and are left at zero
// after it (one set per stream: concurrent launches must not share them). The sums over the slices
// are added in a fixed order: the result does not depend on the schedule.
cudaError_t nf4_small_m(const void* x, int64_t ldx, int m, const uint8_t* packed,
                        const NF4Absmax& absmax, int64_t n, int64_t k, int blocksize,
                        const float* xa, const void* lora_b, int rank, float scale,
                        const void* bias, int slices, float* workspace, int* counters, void* y,
                        DType dtype, cudaStream_t stream);

// The absmax of an NF4 weight [rows, cols] (cols % blocksize == 0) decoded to fp32 and
// transposed: out[j * rows + i] = absmax of row i's quant block j (j < cols / blocksize), the
// layout the fused GEMM's mainloop loads its scales in (rows % 4 == 0: 16-byte aligned rows).
cudaError_t nf4_absmax_transposed(const NF4Absmax& absmax, int64_t rows, int64_t cols,
                                  int blocksize, float* out, cudaStream_t stream);

// packed[n/2], absmax[n/blocksize] from x[n]. Sets *bad_flag (device int) to 1 when x holds
// a non-finite value. Same size constraints as nf4_dequantize.
cudaError_t nf4_quantize(const void* x, DType dtype, int64_t n, int blocksize, uint8_t* packed,
                         float* absmax, int* bad_flag, cudaStream_t stream);

// Double quantization of absmax[nblocks]: qabsmax[i] = dynamic-map code of
// (absmax[i] - offset) / absmax2[i / blocksize2], absmax2 = blockwise max |absmax - offset|.
cudaError_t nf4_quantize_nested(const float* absmax, int64_t nblocks, float offset,
                                const float* code2, int blocksize2, uint8_t* qabsmax,
                                float* absmax2, cudaStream_t stream);

#ifdef __CUDACC__
namespace nf4 {

// Nearest NF4 code: the number of code midpoints that x exceeds. The literals are bitsandbytes'
// (fp32-rounded midpoints); comparing with strict `>` keeps a NaN at code 0 like its tree does.
__device__ __forceinline__ uint32_t quantize_value(float x) {
  uint32_t q = 0;
  q += x > -0.8480964004993439f;
  q += x > -0.6106329262256622f;
  q += x > -0.4599952697753906f;
  q += x > -0.33967943489551544f;
  q += x > -0.23460740596055984f;
  q += x > -0.13791173323988914f;
  q += x > -0.045525018125772476f;
  q += x > 0.03979014977812767f;
  q += x > 0.1202552504837513f;
  q += x > 0.2035212516784668f;
  q += x > 0.2920137718319893f;
  q += x > 0.3893125355243683f;
  q += x > 0.5016634166240692f;
  q += x > 0.6427869200706482f;
  q += x > 0.8614784181118011f;
  return q;
}

// bitsandbytes' 8-bit blockwise quantizer: a 7-step binary search over the sorted 256-entry
// map, then the nearer neighbour by midpoint. Kept step for step so the codes match exactly.
__device__ __forceinline__ uint32_t quantize_dynamic(const float* code, float x) {
  int pivot = 127, upper_pivot = 255, lower_pivot = 0;
  float lower = -1.0f, upper = 1.0f;
  float val = code[pivot];
#pragma unroll
  for (int i = 64; i > 0; i >>= 1) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += i;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= i;
    }
    val = code[pivot];
  }
  if (upper_pivot == 255) upper = code[upper_pivot];
  if (lower_pivot == 0) lower = code[lower_pivot];
  if (x > val) {
    const float mid = __fmul_rn(__fadd_rn(upper, val), 0.5f);
    return x > mid ? upper_pivot : pivot;
  }
  const float mid = __fmul_rn(__fadd_rn(lower, val), 0.5f);
  return x < mid ? lower_pivot : pivot;
}

}  // namespace nf4
#endif  // __CUDACC__

}  // namespace hoptune
