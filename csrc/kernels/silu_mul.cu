// SwiGLU's elementwise step, act_fn(gate) * up with act_fn = SiLU, forward and backward.
// Eager PyTorch runs it as two kernels forward (silu, multiply: the rounded silu(gate) written and
// read again) and three backward, and autograd keeps silu(gate) for the multiply's backward; here
// the forward reads gate and up once and writes the product, the backward recomputes silu(gate)
// from gate and writes both gradients in one pass. The roundings are the model's own: silu(g)
// rounded to the dtype before the product, the product's gradient rounded before silu's backward,
// whose formula is PyTorch's (dy * sig * (1 + g * (1 - sig))). 8 elements a thread in one 16-byte
// vector; a tail shorter than that element by element.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "hoptune/common/dispatch.h"
#include "hoptune/decoder_ops.cuh"
#include "vec8.cuh"

namespace hoptune {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float silu(float g) {
  return g / (1.0f + expf(-g));
}

template <typename T>
__device__ __forceinline__ void forward8(const float (&g)[8], const float (&u)[8], float (&o)[8]) {
#pragma unroll
  for (int k = 0; k < 8; ++k) o[k] = __fmul_rn(rnd<T>(silu(g[k])), u[k]);
}

template <typename T>
__device__ __forceinline__ void backward1(float d, float g, float u, float& dg, float& du) {
  du = __fmul_rn(d, rnd<T>(silu(g)));
  const float ds = rnd<T>(__fmul_rn(d, u));
  const float sig = 1.0f / (1.0f + expf(-g));
  dg = ds * sig * (1.0f + g * (1.0f - sig));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    silu_mul_forward_kernel(const T* __restrict__ gate, const T* __restrict__ up,
                            T* __restrict__ out, int64_t n) {
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * 8;
  if (i + 8 <= n) {
    float g[8], u[8], o[8];
    unpack8<T>(load16(gate + i), g);
    unpack8<T>(load16(up + i), u);
    forward8<T>(g, u, o);
    store16(out + i, pack8<T>(o));
  } else {
    for (int64_t j = i; j < n; ++j) {
      out[j] = from_float<T>(__fmul_rn(rnd<T>(silu(to_float<T>(gate[j]))), to_float<T>(up[j])));
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    silu_mul_backward_kernel(const T* __restrict__ dout, const T* __restrict__ gate,
                             const T* __restrict__ up, T* __restrict__ dgate, T* __restrict__ dup,
                             int64_t n) {
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * 8;
  if (i + 8 <= n) {
    float d[8], g[8], u[8], dg[8], du[8];
    unpack8<T>(load16(dout + i), d);
    unpack8<T>(load16(gate + i), g);
    unpack8<T>(load16(up + i), u);
#pragma unroll
    for (int k = 0; k < 8; ++k) backward1<T>(d[k], g[k], u[k], dg[k], du[k]);
    store16(dgate + i, pack8<T>(dg));
    store16(dup + i, pack8<T>(du));
  } else {
    for (int64_t j = i; j < n; ++j) {
      float dg, du;
      backward1<T>(to_float<T>(dout[j]), to_float<T>(gate[j]), to_float<T>(up[j]), dg, du);
      dgate[j] = from_float<T>(dg);
      dup[j] = from_float<T>(du);
    }
  }
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

cudaError_t grid_of(int64_t n, unsigned* grid) {
  const int64_t blocks = (n + kThreads * 8 - 1) / (kThreads * 8);
  HOPTUNE_REQUIRE(blocks <= 0x7fffffff);
  *grid = static_cast<unsigned>(blocks);
  return cudaSuccess;
}

}  // namespace

cudaError_t silu_mul_forward(const void* gate, const void* up, void* out, int64_t n, DType dtype,
                             cudaStream_t stream) {
  HOPTUNE_REQUIRE(gate != nullptr && up != nullptr && out != nullptr && n >= 1);
  HOPTUNE_REQUIRE(aligned16(gate) && aligned16(up) && aligned16(out));
  HOPTUNE_REQUIRE(dtype == DType::kBFloat16 || dtype == DType::kFloat16);
  unsigned grid = 0;
  HOPTUNE_CUDA_TRY(grid_of(n, &grid));
  return HOPTUNE_DISPATCH_HALF(dtype, T, [&] {
    silu_mul_forward_kernel<T><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(gate), static_cast<const T*>(up), static_cast<T*>(out), n);
    return cudaGetLastError();
  });
}

cudaError_t silu_mul_backward(const void* dout, const void* gate, const void* up, void* dgate,
                              void* dup, int64_t n, DType dtype, cudaStream_t stream) {
  HOPTUNE_REQUIRE(dout != nullptr && gate != nullptr && up != nullptr && n >= 1);
  HOPTUNE_REQUIRE(dgate != nullptr && dup != nullptr);
  HOPTUNE_REQUIRE(aligned16(dout) && aligned16(gate) && aligned16(up) && aligned16(dgate) &&
                  aligned16(dup));
  HOPTUNE_REQUIRE(dtype == DType::kBFloat16 || dtype == DType::kFloat16);
  unsigned grid = 0;
  HOPTUNE_CUDA_TRY(grid_of(n, &grid));
  return HOPTUNE_DISPATCH_HALF(dtype, T, [&] {
    silu_mul_backward_kernel<T><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(dout), static_cast<const T*>(gate), static_cast<const T*>(up),
        static_cast<T*>(dgate), static_cast<T*>(dup), n);
    return cudaGetLastError();
  });
}

}  // namespace hoptune
