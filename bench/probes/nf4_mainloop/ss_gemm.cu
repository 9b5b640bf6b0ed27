// NF4 mainloop probe, shared-memory-sourced: a producer warpgroup decodes the weight tile
// into shared memory (bf16 in the 128-byte swizzle wgmma reads, one tile row per thread) and
// loads x, the codes and the scales by TMA; two consumer warpgroups run wgmma with both
// operands in shared memory, as a plain bf16 GEMM does. 384 threads.
//
// Build flags (build.sh makes the variants):
//   SS_NODECODE  timing only, wrong results: the producer writes no weight tile
//   DOUBLE       the decode done twice per k-block (the same values, another table copy)
//   FAKE_XONCE   timing only: x loaded for the first three k-blocks only
//   FAKE_NOMMA   timing only: the consumers release each stage without a wgmma
//   FAKE_HALF    timing only: each producer thread decodes half of its row (FAKE_QUARTER: a
//                quarter), as if the tile's decode were shared by 2 (4) CTAs
//
// Shared memory at fixed addresses (the dynamic allocation starts at or below 0x400, checked):
// the pair table sits at a 64 KB boundary, so one byte permute of a code word with
// (table | 8 * lane) is a lookup's whole address.
#include "common.cuh"

namespace probe {
namespace {

constexpr int STAGES = 3;
constexpr int THREADS = 384;
constexpr uint32_t X0 = 0x00400, A0_ = 0x08400, BARS = 0x0C400, CODES = 0x0C800;
constexpr uint32_t CSTRIDE = 0x1200;  // per codes stage: 4 KB of codes, 512 B of scales
constexpr uint32_t LUT = 0x10000;     // (code[b >> 4], code[b & 15]) at b * 256 + 8 * copy
constexpr uint32_t X1 = 0x20000, X2 = 0x28000, A1_ = 0x30000, A2_ = 0x34000;
constexpr uint32_t EPI = 0x20000;  // the epilogue's tile over X1, X2 and part of A1_
constexpr int SMEM_BYTES = 0x38000;

__device__ __forceinline__ uint32_t x_stage(int s) {
  return s == 0 ? X0 : (s == 1 ? X1 : X2);
}
__device__ __forceinline__ uint32_t a_stage(int s) {
  return s == 0 ? A0_ : (s == 1 ? A1_ : A2_);
}

__device__ __forceinline__ void sts128(uint32_t addr, uint32_t a, uint32_t b, uint32_t c,
                                       uint32_t d) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(addr), "r"(a), "r"(b), "r"(c),
               "r"(d)
               : "memory");
}

// Row t's 64 weights of one k-block (code words w, scale sc) into its 128-byte swizzled row.
__device__ __forceinline__ void decode_row(const uint32_t* w, float sc, uint32_t bsel,
                                           uint32_t abase, int sw) {
#if defined(FAKE_QUARTER)
  constexpr int CHUNKS = 2;
#elif defined(FAKE_HALF)
  constexpr int CHUNKS = 4;
#else
  constexpr int CHUNKS = 8;
#endif
  float2 v[32];
#pragma unroll
  for (int j = 0; j < 4 * CHUNKS; ++j) {
    const uint32_t addr = __byte_perm(w[j >> 2], bsel, 0x7604 | ((j & 3) << 4));
    asm("ld.shared.v2.f32 {%0, %1}, [%2];" : "=f"(v[j].x), "=f"(v[j].y) : "r"(addr));
  }
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    uint32_t r[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) r[e] = cvt_pair(v[4 * c + e].x * sc, v[4 * c + e].y * sc);
    sts128(abase + ((c ^ sw) << 4), r[0], r[1], r[2], r[3]);
  }
}

__global__ void __launch_bounds__(THREADS, 1)
    nf4_ss_gemm(const __grid_constant__ CUtensorMap tmap_x,
                const __grid_constant__ CUtensorMap tmap_c,
                const __grid_constant__ CUtensorMap tmap_s, const float* __restrict__ lut,
                __nv_bfloat16* __restrict__ y, int M, int N, int K) {
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  const uint32_t sraw = smem_u32(smem_raw);
  if (sraw > X0) __trap();
  uint8_t* gen0 = smem_raw - sraw;    // the generic address of shared address 0
  const uint32_t full0 = BARS;        // x landed and the weight tile written: 1 + 4 arrivals
  const uint32_t empty0 = BARS + 24;  // the stage read by the eight consumer warps
  const uint32_t cfull0 = BARS + 48;  // codes and scales landed
  const int tid = threadIdx.x;
  const int n0 = blockIdx.x * BM;
  const int m0 = blockIdx.y * BN;
  const int KB = K / BK;

  float2* lut_s = reinterpret_cast<float2*>(gen0 + LUT);
  for (int i = tid; i < 8192; i += THREADS) {
    const int b = i >> 5;
    lut_s[i] = make_float2(lut[b >> 4], lut[b & 15]);
  }
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full0 + 8 * s, 5);
      mbar_init(empty0 + 8 * s, 8);
      mbar_init(cfull0 + 8 * s, 1);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (tid >= 256) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 120;");
    const int t = tid - 256;  // the tile row this thread decodes
    const int lane = tid & 31;
    const uint32_t bsel = LUT | (8u * lane);
    const uint32_t rowoff = t * 128;
    const int sw = t & 7;
    auto load_codes = [&](int kb) {
      const int j = kb % 3;
      mbar_expect_tx(cfull0 + 8 * j, 4608);
      tma_load_2d(CODES + j * CSTRIDE, &tmap_c, cfull0 + 8 * j, kb * 32, n0);
      tma_load_2d(CODES + j * CSTRIDE + 4096, &tmap_s, cfull0 + 8 * j, n0, kb);
    };
    if (t == 0) {
      for (int j = 0; j < 2 && j < KB; ++j) load_codes(j);
    }
    for (int kb = 0; kb < KB; ++kb) {
      const int s = kb % STAGES;
      named_bar(2, 128);  // every producer thread is done with k-block kb - 1's codes
      if (t == 0 && kb + 2 < KB) load_codes(kb + 2);
      mbar_wait(cfull0 + 8 * (kb % 3), (kb / 3) & 1);
      uint32_t w[8];
      float sc;
      const uint32_t cbase = CODES + (kb % 3) * CSTRIDE;
      asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                   : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3])
                   : "r"(cbase + t * 32));
      asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];"
                   : "=r"(w[4]), "=r"(w[5]), "=r"(w[6]), "=r"(w[7])
                   : "r"(cbase + t * 32 + 16));
      asm volatile("ld.shared.f32 %0, [%1];" : "=f"(sc) : "r"(cbase + 4096 + t * 4));
      if (kb >= STAGES) mbar_wait(empty0 + 8 * s, ((kb / STAGES) - 1) & 1);
      if (t == 0) {
#ifdef FAKE_XONCE
        if (kb >= STAGES) {
          mbar_arrive(full0 + 8 * s);
        } else
#endif
        {
          mbar_expect_tx(full0 + 8 * s, X_BYTES);
          tma_load_2d(x_stage(s), &tmap_x, full0 + 8 * s, kb * BK, m0);
        }
      }
#ifndef SS_NODECODE
      decode_row(w, sc, bsel, a_stage(s) + rowoff, sw);
#ifdef DOUBLE
      decode_row(w, sc, bsel ^ 8u, a_stage(s) + rowoff, sw);
#endif
#endif
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // for wgmma's reads
      __syncwarp();
      if (lane == 0) mbar_arrive(full0 + 8 * s);
    }
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 184;");
  const int wg = tid >> 7;
  const int lane = tid & 31;
  float acc[128];
  for (int kb = 0; kb < KB; ++kb) {
    const int s = kb % STAGES;
    mbar_wait(full0 + 8 * s, (kb / STAGES) & 1);
#ifdef FAKE_NOMMA
    if (lane == 0) mbar_arrive(empty0 + 8 * s);
    continue;
#endif
    const uint32_t xa = x_stage(s);
    const uint32_t aa = a_stage(s) + wg * 8192;
    wg_fence();
    wgmma_ss_256(acc, desc_sw128(aa), desc_sw128(xa), kb > 0);
    wgmma_ss_256(acc, desc_sw128(aa + 32), desc_sw128(xa + 32), 1);
    wgmma_ss_256(acc, desc_sw128(aa + 64), desc_sw128(xa + 64), 1);
    wgmma_ss_256(acc, desc_sw128(aa + 96), desc_sw128(xa + 96), 1);
    wg_commit();
    wg_wait<1>();
    if (kb > 0 && lane == 0) mbar_arrive(empty0 + 8 * ((kb - 1) % STAGES));
  }
  wg_wait<0>();
  named_bar(1, 256);
  store_tile(acc, EPI, tid, y, M, N, m0, n0);
}

}  // namespace
}  // namespace probe

extern "C" int probe_run(void* x, const void* codes, const void* scales, const void* lut, void* y,
                         int M, int N, int K, void* stream) {
  using namespace probe;
  if (N % BM || K % BK) return 1;
  CUtensorMap xmap, cmap, smap;
  if (!make_map(&xmap, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, x, K, M, static_cast<uint64_t>(K) * 2, BK,
                BN, CU_TENSOR_MAP_SWIZZLE_128B) ||
      !make_map(&cmap, CU_TENSOR_MAP_DATA_TYPE_UINT8, const_cast<void*>(codes), K / 2, N, K / 2, 32,
                BM, CU_TENSOR_MAP_SWIZZLE_NONE) ||
      !make_map(&smap, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, const_cast<void*>(scales), N, K / 64,
                static_cast<uint64_t>(N) * 4, BM, 1, CU_TENSOR_MAP_SWIZZLE_NONE))
    return 3;
  static bool attr = false;
  if (!attr) {
    cudaFuncSetAttribute(nf4_ss_gemm, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES);
    attr = true;
  }
  dim3 grid(N / BM, (M + BN - 1) / BN);
  nf4_ss_gemm<<<grid, THREADS, SMEM_BYTES, static_cast<cudaStream_t>(stream)>>>(
      xmap, cmap, smap, static_cast<const float*>(lut), static_cast<__nv_bfloat16*>(y), M, N, K);
  return static_cast<int>(cudaGetLastError());
}
