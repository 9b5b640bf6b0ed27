// Eight 16-bit floats in one 16-byte vector, unpacked to fp32 and packed back (round to nearest
// even): the unit of the elementwise kernels' loads and stores.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "hoptune/common/dispatch.h"

namespace hoptune {

template <typename T>
__device__ __forceinline__ void unpack8(const uint4& v, float (&f)[8]) {
  const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
  for (int i = 0; i < 8; ++i) f[i] = to_float<T>(e[i]);
}

template <typename T>
__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
  uint4 v;
  T* e = reinterpret_cast<T*>(&v);
#pragma unroll
  for (int i = 0; i < 8; ++i) e[i] = from_float<T>(f[i]);
  return v;
}

// fp32 -> T -> fp32: the value a tensor of dtype T holds for f.
template <typename T>
__device__ __forceinline__ float rnd(float f) {
  return to_float<T>(from_float<T>(f));
}

__device__ __forceinline__ uint4 load16(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

__device__ __forceinline__ void store16(void* p, const uint4& v) {
  *reinterpret_cast<uint4*>(p) = v;
}

}  // namespace hoptune
