// Warp-level tensor-core and async-copy helpers (PTX of sm_80 and later, used on sm_90a):
// mma.sync m16n8k16 with fp32 accumulators, ldmatrix, cp.async, a vector reduction, the swizzle
// of small tiles and an accumulator tile's reduction into fp32 memory.
#pragma once
#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace hoptune {

// d += a (16x16, row-major fragment) * b (16x8, column-major fragment b0 = k 0-7, b1 = k 8-15).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 16-bit matrices from shared memory; lane l gives the address of row l % 8 of matrix
// l / 8. Plain: lane l receives row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 of each matrix
// (an A fragment when the matrices are a 16x16 tile's quarters); .trans: the same of each
// matrix's transpose.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
// Two matrices (lanes 0-15 give the addresses): with .trans from a row-major K x N tile whose
// rows k0..k0+15 they address, the B fragment (b0, b1) of that 16 x 8 tile.
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t& r0, uint32_t& r1, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];"
               : "=r"(r0), "=r"(r1)
               : "r"(addr)
               : "memory");
}

// 16 bytes global -> shared, bypassing L1; zeros when !valid (src is then not read).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}
// Wait until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
}

// *p += v, four fp32 in one reduction at L2 (p 16-byte aligned, global memory; no return).
__device__ __forceinline__ void red_add_v4(float* p, float a, float b, float c, float d) {
  asm volatile("red.global.add.v4.f32 [%0], {%1,%2,%3,%4};" ::"l"(p), "f"(a), "f"(b), "f"(c), "f"(d)
               : "memory");
}

// Byte offset of 16-byte chunk `chunk` of row `row` in a tile whose rows are kW16 chunks wide
// (kW16 in {1, 2, 4, 8}): the chunk index XORed with the row bits that select the 128-byte line's
// position, so 8 consecutive rows at one logical chunk hit 8 different bank groups.
template <int kW16>
__device__ __forceinline__ uint32_t swizzled(int row, int chunk) {
  constexpr int shift = kW16 == 8 ? 0 : kW16 == 4 ? 1 : kW16 == 2 ? 2 : 3;
  return static_cast<uint32_t>(row * kW16 * 16 + ((chunk ^ ((row >> shift) & (kW16 - 1))) * 16));
}

// Adds a 16 x 8 accumulator tile (mma layout: lane l holds row l / 4 and row l / 4 + 8 at columns
// 2 (l % 4), +1) into fp32 memory at `origin` (row stride ld): lanes pair up so that each issues
// one 16-byte reduction of four consecutive columns. Rows at or past `rows` are skipped.
__device__ __forceinline__ void red_tile(float* origin, int64_t ld, const float (&d)[4], int lane,
                                         int rows) {
  const int g = lane >> 2, tq = lane & 3;
  const bool odd = tq & 1;
  // even lanes keep row g and send their row g + 8 pair; odd lanes the other way round
  const float s0 = __shfl_xor_sync(0xffffffffu, odd ? d[0] : d[2], 1);
  const float s1 = __shfl_xor_sync(0xffffffffu, odd ? d[1] : d[3], 1);
  const int row = odd ? g + 8 : g;
  if (row >= rows) return;
  float* p = origin + row * ld + (odd ? 2 * tq - 2 : 2 * tq);
  if (odd) {
    red_add_v4(p, s0, s1, d[2], d[3]);
  } else {
    red_add_v4(p, d[0], d[1], s0, s1);
  }
}

}  // namespace hoptune
#endif  // __CUDACC__
