// One macro to turn a runtime dtype code into a compile-time element type.
#pragma once
#include "hoptune/common/check.h"

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define HOPTUNE_DISPATCH_CASE_(dtype, ctype, T, ...) \
  case ::hoptune::DType::dtype: {                    \
    using T = ctype;                                 \
    return __VA_ARGS__();                            \
  }

// HOPTUNE_DISPATCH_FLOAT(code, T, ...) runs the body with T = float, __half or __nv_bfloat16.
#define HOPTUNE_DISPATCH_FLOAT(code, T, ...)                           \
  [&]() -> cudaError_t {                                               \
    switch (code) {                                                    \
      HOPTUNE_DISPATCH_CASE_(kFloat32, float, T, __VA_ARGS__)          \
      HOPTUNE_DISPATCH_CASE_(kFloat16, __half, T, __VA_ARGS__)         \
      HOPTUNE_DISPATCH_CASE_(kBFloat16, __nv_bfloat16, T, __VA_ARGS__) \
    }                                                                  \
    return cudaErrorInvalidValue;                                      \
  }()

// HOPTUNE_DISPATCH_HALF(code, T, ...): the 16-bit types only (__half, __nv_bfloat16), for kernels
// with no float32 instance; any other code is cudaErrorInvalidValue.
#define HOPTUNE_DISPATCH_HALF(code, T, ...)                            \
  [&]() -> cudaError_t {                                               \
    switch (code) {                                                    \
      HOPTUNE_DISPATCH_CASE_(kFloat16, __half, T, __VA_ARGS__)         \
      HOPTUNE_DISPATCH_CASE_(kBFloat16, __nv_bfloat16, T, __VA_ARGS__) \
      default:                                                         \
        break;                                                         \
    }                                                                  \
    return cudaErrorInvalidValue;                                      \
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
