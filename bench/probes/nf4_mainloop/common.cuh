// Shared pieces of the two NF4 mainloop probes (rs_gemm.cu, ss_gemm.cu): PTX wrappers, the
// epilogue and the host's tensor maps. A probe, not a library kernel: y[M, N] = x[M, K] @
// deq(W)[N, K]^T for bf16 x, bitsandbytes' NF4 codes (element 2j in the high nibble),
// blocksize 64 and the absmax already decoded to fp32 and transposed to [K / 64, N]; N a
// multiple of 128, K of 64. No LoRA, no bias.
#pragma once
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "wgmma_256.h"

namespace probe {

constexpr int BM = 128;  // weight rows per CTA (wgmma's M: two consumer warpgroups of 64)
constexpr int BN = 256;  // tokens per CTA (wgmma's N)
constexpr int BK = 64;   // one quant block per k-block
constexpr int X_BYTES = BN * BK * 2;
constexpr int EPI_STRIDE = 272;  // bytes per token row of the epilogue's transposed tile

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred P1;\nLAB_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
      "@P1 bra DONE;\nbra LAB_WAIT;\nDONE:\n}" ::"r"(bar),
      "r"(parity));
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar));
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes));
}
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, uint32_t bar,
                                            int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4}], [%2];" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1)
      : "memory");
}
__device__ __forceinline__ void wg_fence() {
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}
__device__ __forceinline__ void wg_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
__device__ __forceinline__ void named_bar(int id, int n) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(n) : "memory");
}
// bf16x2 of (lo, hi): lo in the low half (the lower k or column).
__device__ __forceinline__ uint32_t cvt_pair(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
// Shared-memory matrix descriptor: K-major, 128-byte swizzle, 8-row groups 1024 bytes apart.
__device__ __forceinline__ uint64_t desc_sw128(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (1ull << 16) | (64ull << 32) | (1ull << 62);
}

// The consumer warpgroups' accumulators (64 weight rows x 256 tokens each) to y[M, N]: bf16
// pairs transposed into shared memory by stmatrix (token rows of 128 weights), then 16-byte
// stores of whole 256-byte row pieces. tbase: 69632 free bytes; threads 0-255 only.
__device__ __forceinline__ void store_tile(const float* acc, uint32_t tbase, int tid,
                                           __nv_bfloat16* y, int M, int N, int m0, int n0) {
  const int wg = tid >> 7;
  const int wi = (tid >> 5) & 3;
  const int lane = tid & 31;
  const int i_mat = lane >> 3;
  const uint32_t lane_addr = tbase + (8 * (i_mat >> 1) + (lane & 7)) * EPI_STRIDE +
                             (64 * wg + 16 * wi + 8 * (i_mat & 1)) * 2;
#pragma unroll
  for (int j = 0; j < 32; j += 2) {
    const uint32_t p00 = cvt_pair(acc[4 * j], acc[4 * j + 1]);
    const uint32_t p01 = cvt_pair(acc[4 * j + 2], acc[4 * j + 3]);
    const uint32_t p10 = cvt_pair(acc[4 * j + 4], acc[4 * j + 5]);
    const uint32_t p11 = cvt_pair(acc[4 * j + 6], acc[4 * j + 7]);
    asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(
                     lane_addr + 8 * j * EPI_STRIDE),
                 "r"(p00), "r"(p01), "r"(p10), "r"(p11)
                 : "memory");
  }
  named_bar(1, 256);
#pragma unroll 4
  for (int it = 0; it < 16; ++it) {
    const int idx = it * 256 + tid;
    const int t = idx >> 4;
    const int c = idx & 15;
    uint4 v;
    asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "r"(tbase + t * EPI_STRIDE + c * 16));
    if (m0 + t < M) *reinterpret_cast<uint4*>(y + static_cast<size_t>(m0 + t) * N + n0 + c * 8) = v;
  }
}

using EncodeFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*,
                              const cuuint64_t*, const cuuint64_t*, const cuuint32_t*,
                              const cuuint32_t*, CUtensorMapInterleave, CUtensorMapSwizzle,
                              CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

inline EncodeFn encode_fn() {
  static EncodeFn fn = nullptr;
  if (!fn) {
    cudaDriverEntryPointQueryResult qr;
    void* p = nullptr;
    cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &qr);
    fn = reinterpret_cast<EncodeFn>(p);
  }
  return fn;
}

// A 2-D tensor map: dims {inner, outer}, the outer stride in bytes, a box of {bi, bo}.
inline bool make_map(CUtensorMap* map, CUtensorMapDataType type, void* base, uint64_t inner,
                     uint64_t outer, uint64_t stride_bytes, uint32_t bi, uint32_t bo,
                     CUtensorMapSwizzle swizzle) {
  EncodeFn fn = encode_fn();
  if (!fn) return false;
  const cuuint64_t dims[2] = {inner, outer};
  const cuuint64_t strides[1] = {stride_bytes};
  const cuuint32_t box[2] = {bi, bo};
  const cuuint32_t estr[2] = {1, 1};
  return fn(map, type, 2, base, dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace probe
