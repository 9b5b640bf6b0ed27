// How many CTAs of a kernel fit on the current device at once, for launchers that size one-wave
// grids. Cached per host thread: the occupancy query costs microseconds on every layer call.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>

namespace hoptune {

// SMs of the current device (132 when the query fails: an H100/H200 SXM).
inline int sm_count() {
  thread_local int device = -1, sms = 0;
  int d = 0;
  if (cudaGetDevice(&d) != cudaSuccess) return 132;
  if (d != device) {
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, d) != cudaSuccess) sms = 132;
    device = d;
  }
  return sms;
}

// SMs x resident CTAs per SM of `kernel` launched with `threads` threads and `smem` bytes of
// dynamic shared memory, into *out (at least one per SM).
inline cudaError_t resident_ctas(const void* kernel, int threads, size_t smem, int* out) {
  struct Entry {
    const void* kernel;
    int threads;
    size_t smem;
    int device, ctas;
  };
  constexpr int kSlots = 32;
  thread_local Entry cache[kSlots];
  thread_local int used = 0, next = 0;
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  for (int i = 0; i < used; ++i) {
    const Entry& c = cache[i];
    if (c.kernel == kernel && c.threads == threads && c.smem == smem && c.device == device) {
      *out = c.ctas;
      return cudaSuccess;
    }
  }
  int per_sm = 0;
  e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem);
  if (e != cudaSuccess) return e;
  *out = std::max(per_sm, 1) * sm_count();
  // (a full table is overwritten in turn: more than kSlots launch configurations is unusual)
  const int slot = used < kSlots ? used++ : (next++ % kSlots);
  cache[slot] = Entry{kernel, threads, smem, device, *out};
  return cudaSuccess;
}

}  // namespace hoptune
