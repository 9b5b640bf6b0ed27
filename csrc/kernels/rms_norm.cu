// RMSNorm forward and input gradient, as transformers' LlamaRMSNorm computes them:
//   forward   h = round(x * rstd), y = round(w * h), rstd = rsqrt(mean(x^2) + eps)  (fp32)
//   backward  dh = round(dy * w), dx = round(rstd * dh - x * rstd^3 * mean(dh * x))
// In eager PyTorch the forward is seven kernels over the row (cast up, square, mean, rsqrt,
// multiply, cast down, weight) with fp32 intermediates written to memory, and autograd's backward
// more; here each is one read of its inputs and one write. A group of kTpr threads owns a row
// (a warp up to 512 columns, four warps beyond, so short rows such as per-head norms still fill
// the block), moves it in 16-byte vectors and keeps the first kCache vectors per thread in
// registers between the reduction and the write; the rest of a longer row is read again (an L1
// hit). The row's sum is fp32 in the threads' order, the only difference from PyTorch's.
// rstd goes to memory for the backward (4 bytes a row).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "hoptune/common/dispatch.h"
#include "hoptune/decoder_ops.cuh"
#include "vec8.cuh"

namespace hoptune {
namespace {

constexpr int kThreads = 128;

// Sum over the kTpr threads of a row (a warp's shuffles; across four warps through shared memory,
// where a block is one row).
template <int kTpr>
__device__ __forceinline__ float row_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if constexpr (kTpr == 32) {
    return v;
  } else {
    static_assert(kTpr == kThreads, "a row is one warp or the whole block");
    __shared__ float part[kThreads / 32];
    if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
    __syncthreads();
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < kThreads / 32; ++i) s += part[i];
    return s;
  }
}

template <typename T, int kTpr, int kCache>
__global__ void __launch_bounds__(kThreads) rms_norm_forward_kernel(RmsNormForward a) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / kTpr) + threadIdx.x / kTpr;
  if (row >= a.rows) return;  // (uniform within a row's threads: a whole block when kTpr = 128)
  const int lane = threadIdx.x % kTpr;
  const int nvec = static_cast<int>(a.cols / 8);
  const T* x = static_cast<const T*>(a.x) + row * a.ldx;
  const T* w = static_cast<const T*>(a.w);
  T* y = static_cast<T*>(a.y) + row * a.ldy;

  // the weight's vectors are loaded with the row's, so the write below waits on no load
  uint4 cache[kCache] = {}, wcache[kCache] = {};
  float ss = 0.f;
#pragma unroll
  for (int i = 0; i < kCache; ++i) {
    const int v = lane + i * kTpr;
    if (v < nvec) {
      cache[i] = load16(x + v * 8);
      wcache[i] = load16(w + v * 8);
      float f[8];
      unpack8<T>(cache[i], f);
#pragma unroll
      for (int k = 0; k < 8; ++k) ss += f[k] * f[k];
    }
  }
  for (int v = lane + kCache * kTpr; v < nvec; v += kTpr) {
    float f[8];
    unpack8<T>(load16(x + v * 8), f);
#pragma unroll
    for (int k = 0; k < 8; ++k) ss += f[k] * f[k];
  }
  ss = row_sum<kTpr>(ss);
  // (the mean as torch's: the sum times the rounded reciprocal of the count)
  const float rstd = rsqrtf(__fmul_rn(ss, __frcp_rn(static_cast<float>(a.cols))) + a.eps);
  if (a.rstd != nullptr && lane == 0) a.rstd[row] = rstd;

  auto write = [&](int v, const uint4& xv, const uint4& wv) {
    float f[8], g[8];
    unpack8<T>(xv, f);
    unpack8<T>(wv, g);
#pragma unroll
    for (int k = 0; k < 8; ++k) f[k] = __fmul_rn(g[k], rnd<T>(__fmul_rn(f[k], rstd)));
    store16(y + v * 8, pack8<T>(f));
  };
#pragma unroll
  for (int i = 0; i < kCache; ++i) {
    const int v = lane + i * kTpr;
    if (v < nvec) write(v, cache[i], wcache[i]);
  }
  for (int v = lane + kCache * kTpr; v < nvec; v += kTpr) {
    write(v, load16(x + v * 8), load16(w + v * 8));
  }
}

template <typename T, int kTpr, int kCache>
__global__ void __launch_bounds__(kThreads) rms_norm_backward_kernel(RmsNormBackward a) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / kTpr) + threadIdx.x / kTpr;
  if (row >= a.rows) return;
  const int lane = threadIdx.x % kTpr;
  const int nvec = static_cast<int>(a.cols / 8);
  const T* dy = static_cast<const T*>(a.dy) + row * a.lddy;
  const T* x = static_cast<const T*>(a.x) + row * a.ldx;
  const T* w = static_cast<const T*>(a.w);
  T* dx = static_cast<T*>(a.dx) + row * a.lddx;
  const float rstd = a.rstd[row];

  // dh = round(dy * w) as autograd's bf16/fp16 product gives it
  auto grad_h = [&](int v, const uint4& dyv, float (&dh)[8]) {
    float g[8];
    unpack8<T>(dyv, dh);
    unpack8<T>(load16(w + v * 8), g);
#pragma unroll
    for (int k = 0; k < 8; ++k) dh[k] = rnd<T>(__fmul_rn(dh[k], g[k]));
  };
  uint4 cx[kCache], cdy[kCache];
  float dot = 0.f;
#pragma unroll
  for (int i = 0; i < kCache; ++i) {
    const int v = lane + i * kTpr;
    if (v < nvec) {
      cx[i] = load16(x + v * 8);
      cdy[i] = load16(dy + v * 8);
      float f[8], dh[8];
      unpack8<T>(cx[i], f);
      grad_h(v, cdy[i], dh);
#pragma unroll
      for (int k = 0; k < 8; ++k) dot += dh[k] * f[k];
    }
  }
  for (int v = lane + kCache * kTpr; v < nvec; v += kTpr) {
    float f[8], dh[8];
    unpack8<T>(load16(x + v * 8), f);
    grad_h(v, load16(dy + v * 8), dh);
#pragma unroll
    for (int k = 0; k < 8; ++k) dot += dh[k] * f[k];
  }
  dot = row_sum<kTpr>(dot);
  const float c = rstd * rstd * rstd * dot / static_cast<float>(a.cols);

  auto write = [&](int v, const uint4& xv, const uint4& dyv) {
    float f[8], dh[8];
    unpack8<T>(xv, f);
    grad_h(v, dyv, dh);
#pragma unroll
    for (int k = 0; k < 8; ++k) f[k] = rstd * dh[k] - c * f[k];
    store16(dx + v * 8, pack8<T>(f));
  };
#pragma unroll
  for (int i = 0; i < kCache; ++i) {
    const int v = lane + i * kTpr;
    if (v < nvec) write(v, cx[i], cdy[i]);
  }
  for (int v = lane + kCache * kTpr; v < nvec; v += kTpr) {
    write(v, load16(x + v * 8), load16(dy + v * 8));
  }
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Rows of up to 512 columns take a warp each (4 rows a block), longer ones a block each.
template <typename Args, typename Launch>
cudaError_t launch_rows(const Args& a, Launch launch) {
  if (a.cols <= 512) {
    const int64_t blocks = (a.rows + kThreads / 32 - 1) / (kThreads / 32);
    HOPTUNE_REQUIRE(blocks <= 0x7fffffff);
    return launch(std::integral_constant<int, 32>{}, blocks);
  }
  HOPTUNE_REQUIRE(a.rows <= 0x7fffffff);
  return launch(std::integral_constant<int, kThreads>{}, a.rows);
}

}  // namespace

cudaError_t rms_norm_forward(const RmsNormForward& a, cudaStream_t stream) {
  HOPTUNE_REQUIRE(a.x != nullptr && a.w != nullptr && a.y != nullptr && a.rows >= 1);
  HOPTUNE_REQUIRE(a.cols >= 8 && a.cols % 8 == 0 && a.ldx % 8 == 0 && a.ldy % 8 == 0);
  HOPTUNE_REQUIRE(a.cols <= 0x7fffffff - 8 * kThreads);  // (32-bit column indices)
  HOPTUNE_REQUIRE(a.ldx >= a.cols && a.ldy >= a.cols);
  HOPTUNE_REQUIRE(aligned16(a.x) && aligned16(a.w) && aligned16(a.y));
  HOPTUNE_REQUIRE(a.dtype == DType::kBFloat16 || a.dtype == DType::kFloat16);
  return HOPTUNE_DISPATCH_HALF(a.dtype, T, [&] {
    return launch_rows(a, [&](auto tpr, int64_t blocks) {
      constexpr int kTpr = decltype(tpr)::value;
      // registers for the whole row up to 512 columns a warp, 4096 a block
      rms_norm_forward_kernel<T, kTpr, kTpr == 32 ? 2 : 4>
          <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
      return cudaGetLastError();
    });
  });
}

cudaError_t rms_norm_backward(const RmsNormBackward& a, cudaStream_t stream) {
  HOPTUNE_REQUIRE(a.dy != nullptr && a.x != nullptr && a.w != nullptr && a.rstd != nullptr);
  HOPTUNE_REQUIRE(a.dx != nullptr && a.rows >= 1);
  HOPTUNE_REQUIRE(a.cols >= 8 && a.cols % 8 == 0 && a.cols <= 0x7fffffff - 8 * kThreads);
  HOPTUNE_REQUIRE(a.lddy % 8 == 0 && a.ldx % 8 == 0 && a.lddx % 8 == 0);
  HOPTUNE_REQUIRE(a.lddy >= a.cols && a.ldx >= a.cols && a.lddx >= a.cols);
  HOPTUNE_REQUIRE(aligned16(a.dy) && aligned16(a.x) && aligned16(a.w) && aligned16(a.dx));
  HOPTUNE_REQUIRE(a.dtype == DType::kBFloat16 || a.dtype == DType::kFloat16);
  return HOPTUNE_DISPATCH_HALF(a.dtype, T, [&] {
    return launch_rows(a, [&](auto tpr, int64_t blocks) {
      constexpr int kTpr = decltype(tpr)::value;
      rms_norm_backward_kernel<T, kTpr, kTpr == 32 ? 2 : 4>
          <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a);
      return cudaGetLastError();
    });
  });
}

}  // namespace hoptune
