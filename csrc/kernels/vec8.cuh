// Eight 16-bit floats in one 16-byte vector, unpacked to fp32 and packed back (round to nearest
// even): the unit of the elementwise kernels' loads and stores.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "hoptune/common/dispatch.h"

namespace hoptune {

// (bit operations on the four 32-bit words, not a reinterpreted array: indexing one makes ptxas
// put the vector on the stack)
template <typename T>
__device__ __forceinline__ void unpack2(uint32_t w, float& lo, float& hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
  } else {
    lo = __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
    hi = __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  }
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 p = __floats2bfloat162_rn(lo, hi);
    return (static_cast<uint32_t>(__bfloat16_as_ushort(p.y)) << 16) | __bfloat16_as_ushort(p.x);
  } else {
    const __half2 p = __floats2half2_rn(lo, hi);
    return (static_cast<uint32_t>(__half_as_ushort(p.y)) << 16) | __half_as_ushort(p.x);
  }
}

template <typename T>
__device__ __forceinline__ void unpack8(const uint4& v, float (&f)[8]) {
  unpack2<T>(v.x, f[0], f[1]);
  unpack2<T>(v.y, f[2], f[3]);
  unpack2<T>(v.z, f[4], f[5]);
  unpack2<T>(v.w, f[6], f[7]);
}

template <typename T>
__device__ __forceinline__ uint4 pack8(const float (&f)[8]) {
  return make_uint4(pack2<T>(f[0], f[1]), pack2<T>(f[2], f[3]), pack2<T>(f[4], f[5]),
                    pack2<T>(f[6], f[7]));
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
