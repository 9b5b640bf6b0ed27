// Rotary position embedding of q or k, transformers' apply_rotary_pos_emb:
//   out = round(round(x * cos) + round(rotate_half(x) * sin)), rotate_half(x) = [-x2, x1]
// Eager PyTorch runs five kernels a tensor (two products, a negation, a concatenation, a sum),
// the products broadcasting cos / sin over the heads through strided (unvectorized) loops; here a
// thread reads 8 elements of each half of a head's row (x1 and x2, the pair the rotation mixes)
// and the matching cos / sin, and writes both halves of the output, each rounding where PyTorch
// rounds. The backward is the same pass with the rotation transposed:
//   dx1 = round(round(g1 * cos1) + round(g2 * sin2)),  dx2 = round(round(g2 * cos2) - round(g1 *
//   sin1))
// Input and output take their own strides, so q and k come as the attention layer makes them
// (a transposed view of the projection) and the output keeps that layout.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "hoptune/common/dispatch.h"
#include "hoptune/decoder_ops.cuh"
#include "vec8.cuh"

namespace hoptune {
namespace {

constexpr int kThreads = 256;

// grid: x over a head's (position, chunk) pairs, y the heads, z the batch (32-bit index math: a
// 64-bit division per element costs more than the element's loads)
template <typename T, bool kBackward>
__global__ void __launch_bounds__(kThreads) rope_kernel(Rope a, int per_head) {
  const int t = static_cast<int>(blockIdx.x) * kThreads + static_cast<int>(threadIdx.x);
  if (t >= per_head) return;
  const int half = static_cast<int>(a.dim / 2);
  const int chunks = half / 8;  // 8-element chunks of a half row
  const int64_t s = t / chunks;
  const int c = (t - static_cast<int>(s) * chunks) * 8;
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const T* x = static_cast<const T*>(a.x) + b * a.xb + h * a.xh + s * a.xs + c;
  T* out = static_cast<T*>(a.out) + b * a.ob + h * a.oh + s * a.os + c;
  const int64_t tab = b * a.cb + s * a.cs + c;
  const T* cs = static_cast<const T*>(a.cos) + tab;
  const T* sn = static_cast<const T*>(a.sin) + tab;

  float x1[8], x2[8], c1[8], c2[8], s1[8], s2[8], o1[8], o2[8];
  unpack8<T>(load16(x), x1);
  unpack8<T>(load16(x + half), x2);
  unpack8<T>(load16(cs), c1);
  unpack8<T>(load16(cs + half), c2);
  unpack8<T>(load16(sn), s1);
  unpack8<T>(load16(sn + half), s2);
#pragma unroll
  for (int k = 0; k < 8; ++k) {
    const float a1 = rnd<T>(__fmul_rn(x1[k], c1[k]));
    const float a2 = rnd<T>(__fmul_rn(x2[k], c2[k]));
    if constexpr (kBackward) {
      o1[k] = __fadd_rn(a1, rnd<T>(__fmul_rn(x2[k], s2[k])));
      o2[k] = __fsub_rn(a2, rnd<T>(__fmul_rn(x1[k], s1[k])));
    } else {
      o1[k] = __fadd_rn(a1, rnd<T>(__fmul_rn(-x2[k], s1[k])));
      o2[k] = __fadd_rn(a2, rnd<T>(__fmul_rn(x1[k], s2[k])));
    }
  }
  store16(out, pack8<T>(o1));
  store16(out + half, pack8<T>(o2));
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

}  // namespace

cudaError_t rope(const Rope& a, cudaStream_t stream) {
  HOPTUNE_REQUIRE(a.x != nullptr && a.out != nullptr && a.cos != nullptr && a.sin != nullptr);
  HOPTUNE_REQUIRE(a.batch >= 1 && a.heads >= 1 && a.seq >= 1 && a.dim >= 16 && a.dim % 16 == 0);
  HOPTUNE_REQUIRE(aligned16(a.x) && aligned16(a.out) && aligned16(a.cos) && aligned16(a.sin));
  for (int64_t s : {a.xb, a.xh, a.xs, a.ob, a.oh, a.os, a.cb, a.cs}) HOPTUNE_REQUIRE(s % 8 == 0);
  HOPTUNE_REQUIRE(a.dtype == DType::kBFloat16 || a.dtype == DType::kFloat16);
  const int64_t per_head = a.seq * (a.dim / 16);
  HOPTUNE_REQUIRE(per_head <= 0x7fffffff - kThreads && a.heads <= 65535 && a.batch <= 65535);
  const dim3 grid(static_cast<unsigned>((per_head + kThreads - 1) / kThreads),
                  static_cast<unsigned>(a.heads), static_cast<unsigned>(a.batch));
  return HOPTUNE_DISPATCH_HALF(a.dtype, T, [&] {
    if (a.backward) {
      rope_kernel<T, true><<<grid, kThreads, 0, stream>>>(a, static_cast<int>(per_head));
    } else {
      rope_kernel<T, false><<<grid, kThreads, 0, stream>>>(a, static_cast<int>(per_head));
    }
    return cudaGetLastError();
  });
}

}  // namespace hoptune
