// One macro to turn a runtime dtype code into a compile-time element type.
#pragma once
#include "hoptune/common/check.h"

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// HOPTUNE_DISPATCH_FLOAT(code, T, ...) runs the body with T = float, __half or __nv_bfloat16.
#define HOPTUNE_DISPATCH_FLOAT(code, T, ...) \
  [&]() -> cudaError_t {                     \
    switch (code) {                          \
      case ::hoptune::DType::kFloat32: {     \
        using T = float;                     \
        return __VA_ARGS__();                \
      }                                      \
      case ::hoptune::DType::kFloat16: {     \
        using T = __half;                    \
        return __VA_ARGS__();                \
      }                                      \
      case ::hoptune::DType::kBFloat16: {    \
        using T = __nv_bfloat16;             \
        return __VA_ARGS__();                \
      }                                      \
    }                                        \
    return cudaErrorInvalidValue;            \
  }()

namespace hoptune {
template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

// Round-to-nearest-even conversions from fp32.
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
}  // namespace hoptune
#endif
