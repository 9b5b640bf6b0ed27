// Error plumbing shared by every launcher: kernels return cudaError_t, never throw or abort.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace hoptune {

// dtype codes shared with python/hoptune/_lib.py (DTYPE_CODES).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace hoptune

// Return the error of a CUDA runtime call to the caller.
#define HOPTUNE_CUDA_TRY(expr)         \
  do {                                 \
    cudaError_t hoptune_err_ = (expr); \
    if (hoptune_err_ != cudaSuccess) { \
      return hoptune_err_;             \
    }                                  \
  } while (0)

// Invalid sizes or pointers reaching a launcher mean the Python boundary let something through:
// report it as cudaErrorInvalidValue instead of launching.
#define HOPTUNE_REQUIRE(cond)                  \
  do {                                         \
    if (!(cond)) return cudaErrorInvalidValue; \
  } while (0)
