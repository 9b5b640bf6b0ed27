// NF4 quantize / dequantize launchers.
//
// Dequantize is purely bandwidth-bound: it reads n/2 code bytes (+ n/64 absmax) and writes 2n
// bytes of bf16. A thread decodes "units" of 8 elements: one 4-byte load of codes, one 16-byte
// store (bf16/fp16) or two (fp32), so a warp's stores are fully coalesced 512-byte runs; each
// thread keeps 4 units in flight so enough loads are outstanding to cover HBM latency. The
// nested absmax is decoded in the same kernel (two rounded fp32 ops, as bitsandbytes does).
// The 16 code values sit in shared memory; 16 distinct words in 16 banks never conflict.
//
// Quantize runs once per weight at load time: one warp per quant block, two passes over the
// block (max, then codes); the second pass re-reads from L1.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "hoptune/common/dispatch.h"
#include "hoptune/nf4.cuh"

namespace hoptune {
namespace {

__constant__ float kNF4Code[16] = {
    -1.0f,
    -0.6961928009986877f,
    -0.5250730514526367f,
    -0.39491748809814453f,
    -0.28444138169288635f,
    -0.18477343022823334f,
    -0.09105003625154495f,
    0.0f,
    0.07958029955625534f,
    0.16093020141124725f,
    0.24611230194568634f,
    0.33791524171829224f,
    0.44070982933044434f,
    0.5626170039176941f,
    0.7229568362236023f,
    1.0f,
};

constexpr int kDequantThreads = 256;

// Write 8 decoded values (one 16-byte store for bf16/fp16, two for fp32).
template <typename T>
struct Store8;
template <>
struct Store8<__nv_bfloat16> {
  __device__ __forceinline__ static void run(__nv_bfloat16* out, const float (&v)[8]) {
    __nv_bfloat162 h[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
    *reinterpret_cast<uint4*>(out) = *reinterpret_cast<uint4*>(h);
  }
};
template <>
struct Store8<__half> {
  __device__ __forceinline__ static void run(__half* out, const float (&v)[8]) {
    __half2 h[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
    *reinterpret_cast<uint4*>(out) = *reinterpret_cast<uint4*>(h);
  }
};
template <>
struct Store8<float> {
  __device__ __forceinline__ static void run(float* out, const float (&v)[8]) {
    reinterpret_cast<float4*>(out)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(out)[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
};

template <int kBytes>
struct CodeLoad;
template <>
struct CodeLoad<4> {
  using type = uint32_t;
  __device__ __forceinline__ static uint32_t word(const uint32_t& v, int) { return v; }
};

// A thread decodes kUnroll chunks of kBytes code bytes (2 * kBytes elements each), the chunks
// kDequantThreads apart so each load instruction of a warp covers one contiguous run.
template <typename OutT, bool kNested, int kBytes, int kUnroll>
__global__ void __launch_bounds__(kDequantThreads)
    nf4_dequantize_kernel(const uint8_t* __restrict__ packed, NF4Absmax am, int64_t nchunks,
                          int log2_chunks_per_block, int log2_blocksize2, OutT* __restrict__ out) {
  using Load = CodeLoad<kBytes>;
  using Word = typename Load::type;
  __shared__ float lut[16];
  __shared__ float code2[256];
  if (threadIdx.x < 16) lut[threadIdx.x] = kNF4Code[threadIdx.x];
  if (kNested) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) code2[i] = am.code2[i];
  }
  __syncthreads();

  const Word* src = reinterpret_cast<const Word*>(packed);
  // grid-stride over tiles of kDequantThreads * kUnroll chunks (one pass unless the grid is capped)
  for (int64_t tile = blockIdx.x; tile * (kDequantThreads * kUnroll) < nchunks; tile += gridDim.x) {
    const int64_t base = tile * (kDequantThreads * kUnroll) + threadIdx.x;
    Word q[kUnroll];
    float scale[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t c = base + k * kDequantThreads;
      scale[k] = 0.f;
      if (c < nchunks) {
        q[k] = __ldg(src + c);
        const int64_t b = c >> log2_chunks_per_block;
        if (kNested) {
          const float v = code2[__ldg(am.qabsmax + b)];
          scale[k] = __fadd_rn(__fmul_rn(v, __ldg(am.absmax2 + (b >> log2_blocksize2))), am.offset);
        } else {
          scale[k] = __ldg(am.absmax + b);
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t c = base + k * kDequantThreads;
      if (c < nchunks) {
#pragma unroll
        for (int w = 0; w < kBytes / 4; ++w) {
          const uint32_t word = Load::word(q[k], w);
          float v[8];
#pragma unroll
          for (int j = 0; j < 4; ++j) {  // byte j holds elements 2j (high nibble) and 2j+1 (low)
            const uint32_t byte = (word >> (8 * j)) & 0xFFu;
            v[2 * j] = __fmul_rn(lut[byte >> 4], scale[k]);
            v[2 * j + 1] = __fmul_rn(lut[byte & 0xFu], scale[k]);
          }
          Store8<OutT>::run(out + c * (2 * kBytes) + 8 * w, v);
        }
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(256)
    nf4_quantize_kernel(const T* __restrict__ x, int64_t nblocks, int blocksize,
                        uint8_t* __restrict__ packed, float* __restrict__ absmax, int* bad_flag) {
  const int lane = threadIdx.x & 31;
  const int64_t block = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (block >= nblocks) return;
  const T* xb = x + block * blocksize;
  const int npairs = blocksize / 2;

  float amax = 0.f;
  bool bad = false;
  for (int p = lane; p < npairs; p += 32) {
    const float a = to_float(xb[2 * p]);
    const float b = to_float(xb[2 * p + 1]);
    bad |= !isfinite(a) || !isfinite(b);
    amax = fmaxf(amax, fmaxf(fabsf(a), fabsf(b)));
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if (__any_sync(0xffffffffu, bad) && lane == 0) atomicOr(bad_flag, 1);
  if (lane == 0) absmax[block] = amax;

  const float recip = __fdiv_rn(1.0f, amax);
  uint8_t* pb = packed + block * (blocksize / 2);
  for (int p = lane; p < npairs; p += 32) {
    uint32_t byte = 0x77u;  // all-zero block: exact zeros (see nf4.cuh)
    if (amax != 0.f) {
      const uint32_t hi = nf4::quantize_value(__fmul_rn(to_float(xb[2 * p]), recip));
      const uint32_t lo = nf4::quantize_value(__fmul_rn(to_float(xb[2 * p + 1]), recip));
      byte = (hi << 4) | lo;
    }
    pb[p] = static_cast<uint8_t>(byte);
  }
}

__global__ void __launch_bounds__(256)
    nf4_quantize_nested_kernel(const float* __restrict__ absmax, int64_t nblocks, float offset,
                               const float* __restrict__ code2_g, int blocksize2,
                               uint8_t* __restrict__ qabsmax, float* __restrict__ absmax2) {
  __shared__ float code2[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) code2[i] = code2_g[i];
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t blk = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  const int64_t nb2 = (nblocks + blocksize2 - 1) / blocksize2;
  if (blk >= nb2) return;
  const int64_t start = blk * blocksize2;
  const int valid = static_cast<int>(nblocks - start < blocksize2 ? nblocks - start : blocksize2);

  float amax = 0.f;
  for (int i = lane; i < valid; i += 32)
    amax = fmaxf(amax, fabsf(__fsub_rn(absmax[start + i], offset)));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if (lane == 0) absmax2[blk] = amax;
  const float recip = __fdiv_rn(1.0f, amax);
  for (int i = lane; i < valid; i += 32) {
    const float v = __fmul_rn(__fsub_rn(absmax[start + i], offset), recip);
    qabsmax[start + i] = static_cast<uint8_t>(nf4::quantize_dynamic(code2, v));
  }
}

inline bool is_pow2(int64_t v) {
  return v > 0 && (v & (v - 1)) == 0;
}
inline int ilog2(int64_t v) {
  int r = 0;
  while ((int64_t{1} << r) < v) ++r;
  return r;
}

int sm_count() {
  static int count = [] {
    int dev = 0, n = 132;
    if (cudaGetDevice(&dev) == cudaSuccess)
      cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
    return n;
  }();
  return count;
}

template <int kBytes, int kUnroll, bool kPersistent = false>
cudaError_t launch_dequantize(const uint8_t* packed, const NF4Absmax& am, int64_t n, int blocksize,
                              void* out, DType out_dtype, cudaStream_t stream) {
  const int64_t nchunks = n / (2 * kBytes);
  const int per_cta = kDequantThreads * kUnroll;
  int64_t grid = (nchunks + per_cta - 1) / per_cta;
  if (kPersistent) grid = grid < 8 * sm_count() ? grid : 8 * sm_count();
  HOPTUNE_REQUIRE(grid <= 0x7fffffff);
  const int log2_cpb = ilog2(blocksize / (2 * kBytes));
  const bool nested = am.qabsmax != nullptr;
  const int log2_bs2 = nested ? ilog2(am.blocksize2) : 0;
  return HOPTUNE_DISPATCH_FLOAT(out_dtype, OutT, [&] {
    if (nested) {
      nf4_dequantize_kernel<OutT, true, kBytes, kUnroll>
          <<<static_cast<unsigned>(grid), kDequantThreads, 0, stream>>>(
              packed, am, nchunks, log2_cpb, log2_bs2, static_cast<OutT*>(out));
    } else {
      nf4_dequantize_kernel<OutT, false, kBytes, kUnroll>
          <<<static_cast<unsigned>(grid), kDequantThreads, 0, stream>>>(
              packed, am, nchunks, log2_cpb, log2_bs2, static_cast<OutT*>(out));
    }
    return cudaGetLastError();
  });
}

}  // namespace

cudaError_t nf4_dequantize(const uint8_t* packed, const NF4Absmax& absmax, int64_t n, int blocksize,
                           void* out, DType out_dtype, cudaStream_t stream, int variant) {
  HOPTUNE_REQUIRE(packed != nullptr && out != nullptr && n > 0);
  HOPTUNE_REQUIRE(is_pow2(blocksize) && blocksize >= 64 && blocksize <= 4096 && n % blocksize == 0);
  HOPTUNE_REQUIRE(reinterpret_cast<uintptr_t>(packed) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(out) % 16 == 0);
  const bool nested = absmax.qabsmax != nullptr;
  HOPTUNE_REQUIRE(nested ? (absmax.absmax2 && absmax.code2 && is_pow2(absmax.blocksize2))
                         : absmax.absmax != nullptr);
  switch (variant) {  // kernel versions under measurement; 0 is the default
    case 1:
      return launch_dequantize<4, 2>(packed, absmax, n, blocksize, out, out_dtype, stream);
    case 2:
      return launch_dequantize<4, 1>(packed, absmax, n, blocksize, out, out_dtype, stream);
    case 3:
      return launch_dequantize<4, 2, true>(packed, absmax, n, blocksize, out, out_dtype, stream);
    default:
      return launch_dequantize<4, 4>(packed, absmax, n, blocksize, out, out_dtype, stream);
  }
}

cudaError_t nf4_quantize(const void* x, DType dtype, int64_t n, int blocksize, uint8_t* packed,
                         float* absmax, int* bad_flag, cudaStream_t stream) {
  HOPTUNE_REQUIRE(x != nullptr && packed != nullptr && absmax != nullptr && bad_flag != nullptr &&
                  n > 0);
  HOPTUNE_REQUIRE(is_pow2(blocksize) && blocksize >= 64 && blocksize <= 4096 && n % blocksize == 0);
  const int64_t nblocks = n / blocksize;
  const int64_t grid = (nblocks + 7) / 8;  // 8 warps per CTA, one warp per quant block
  HOPTUNE_REQUIRE(grid <= 0x7fffffff);
  return HOPTUNE_DISPATCH_FLOAT(dtype, T, [&] {
    nf4_quantize_kernel<T><<<static_cast<unsigned>(grid), 256, 0, stream>>>(
        static_cast<const T*>(x), nblocks, blocksize, packed, absmax, bad_flag);
    return cudaGetLastError();
  });
}

cudaError_t nf4_quantize_nested(const float* absmax, int64_t nblocks, float offset,
                                const float* code2, int blocksize2, uint8_t* qabsmax,
                                float* absmax2, cudaStream_t stream) {
  HOPTUNE_REQUIRE(absmax && code2 && qabsmax && absmax2 && nblocks > 0 && is_pow2(blocksize2) &&
                  blocksize2 >= 32);
  const int64_t nb2 = (nblocks + blocksize2 - 1) / blocksize2;
  const int64_t grid = (nb2 + 7) / 8;
  nf4_quantize_nested_kernel<<<static_cast<unsigned>(grid), 256, 0, stream>>>(
      absmax, nblocks, offset, code2, blocksize2, qabsmax, absmax2);
  return cudaGetLastError();
}

}  // namespace hoptune
