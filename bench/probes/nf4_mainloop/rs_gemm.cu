// NF4 mainloop probe, register-sourced: the consumer warpgroups decode their weight rows
// straight into wgmma's A fragments (registers) between wgmmas; x (B) arrives by TMA from a
// producer warp. 384 threads: warpgroups 0-1 consume (64 weight rows x 256 tokens each),
// thread 256 issues the loads.
//
// Build flags (build.sh makes the variants):
//   default    one k16 slice decoded ahead of the wgmma that uses it
//   KBLOCK     a whole 64-wide k-block decoded ahead, its four wgmmas issued together
//   PAIR       one 8-byte table read per code byte (a 64 KB table of the pairs, 32 copies)
//              instead of a 4-byte read per nibble (2 KB, 32 copies)
//   NODECODE   timing only, wrong results: the code bits used as the A fragments
//   FAKE_NOLDS timing only (PAIR): the table read replaced by two ALU operations
//   FAKE_NOALU timing only (PAIR): the multiply and the bf16 conversion replaced by a permute
#include "common.cuh"

#ifndef STAGES
#define STAGES 4
#endif

namespace probe {
namespace {

constexpr int LUT_OFF = STAGES * X_BYTES;
#ifdef PAIR
constexpr int LUT_BYTES = 65536;
#else
constexpr int LUT_BYTES = 2048;
#endif
constexpr int BAR_OFF = LUT_OFF + LUT_BYTES;
constexpr int SMEM_BYTES = BAR_OFF + 2 * STAGES * 8 + 2048;
constexpr int THREADS = 384;

// One bf16 pair from the byte of w at bit 8q (element k: high nibble, k + 1: low), scaled.
__device__ __forceinline__ uint32_t decode_pair(uint32_t w, int shift, uint32_t lutbase, float sc) {
#ifdef PAIR
  // shift rotates byte q to bits 8-15; lutbase = table + 8 * lane (the lane's copy).
  const uint32_t rot = __funnelshift_r(w, w, shift);
  const uint32_t addr = (rot & 0xFF00u) + lutbase;
  float vhi, vlo;
#ifdef FAKE_NOLDS
  vhi = __uint_as_float((addr & 0xFFF0u) | 0x3C000000u);
  vlo = __uint_as_float((addr & 0xFF0Fu) | 0x3D000000u);
#else
  asm("ld.shared.v2.f32 {%0, %1}, [%2];" : "=f"(vhi), "=f"(vlo) : "r"(addr));
#endif
#ifdef FAKE_NOALU
  return __byte_perm(__float_as_uint(vhi), __float_as_uint(vlo), 0x7632);
#else
  return cvt_pair(vhi * sc, vlo * sc);
#endif
#else
  // Entry q of the lane's copy at q * 128 + 4 * lane; lutbase 2048-aligned + 4 * lane.
  const uint32_t ws = w >> shift;
  float vhi, vlo;
  asm("ld.shared.f32 %0, [%1];" : "=f"(vhi) : "r"(((ws << 3) & 0x780u) | lutbase));
  asm("ld.shared.f32 %0, [%1];" : "=f"(vlo) : "r"(((ws << 7) & 0x780u) | lutbase));
  return cvt_pair(vhi * sc, vlo * sc);
#endif
}

struct Codes {
  uint4 r0a, r0b, r1a, r1b;  // 32 code bytes of each of the lane's two rows
  float s0, s1;
};

__device__ __forceinline__ uint32_t word(const uint4& a, const uint4& b, int j) {
  const uint4& v = j < 4 ? a : b;
  switch (j & 3) {
    case 0:
      return v.x;
    case 1:
      return v.y;
    case 2:
      return v.z;
    default:
      return v.w;
  }
}

// The A fragment of k16 slice S: rows g and g + 8, k = 16 S + 2 q (+1) and + 8 (+1).
template <int S>
__device__ __forceinline__ void decode_slice(uint32_t* a, const Codes& c, int shift,
                                             uint32_t lutbase) {
#ifdef NODECODE
  a[0] = word(c.r0a, c.r0b, 2 * S) & 0x3F3F3F3Fu;
  a[1] = word(c.r1a, c.r1b, 2 * S) & 0x3F3F3F3Fu;
  a[2] = word(c.r0a, c.r0b, 2 * S + 1) & 0x3F3F3F3Fu;
  a[3] = word(c.r1a, c.r1b, 2 * S + 1) & 0x3F3F3F3Fu;
#else
  a[0] = decode_pair(word(c.r0a, c.r0b, 2 * S), shift, lutbase, c.s0);
  a[1] = decode_pair(word(c.r1a, c.r1b, 2 * S), shift, lutbase, c.s1);
  a[2] = decode_pair(word(c.r0a, c.r0b, 2 * S + 1), shift, lutbase, c.s0);
  a[3] = decode_pair(word(c.r1a, c.r1b, 2 * S + 1), shift, lutbase, c.s1);
#endif
}

__device__ __forceinline__ void load_codes(Codes& c, const uint8_t* p0, const uint8_t* p1,
                                           const float* s0, const float* s1, int kb, int n) {
  c.r0a = __ldg(reinterpret_cast<const uint4*>(p0 + kb * 32));
  c.r0b = __ldg(reinterpret_cast<const uint4*>(p0 + kb * 32 + 16));
  c.r1a = __ldg(reinterpret_cast<const uint4*>(p1 + kb * 32));
  c.r1b = __ldg(reinterpret_cast<const uint4*>(p1 + kb * 32 + 16));
  c.s0 = __ldg(s0 + static_cast<size_t>(kb) * n);
  c.s1 = __ldg(s1 + static_cast<size_t>(kb) * n);
}

__global__ void __launch_bounds__(THREADS, 1)
    nf4_rs_gemm(const __grid_constant__ CUtensorMap tmap_x, const uint8_t* __restrict__ codes,
                const float* __restrict__ scales, const float* __restrict__ lut,
                __nv_bfloat16* __restrict__ y, int M, int N, int K) {
  extern __shared__ __align__(1024) uint8_t smem_raw[];
  uint8_t* smem = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 2047) &
                                             ~static_cast<uintptr_t>(2047));
  const uint32_t sbase = smem_u32(smem);
  const uint32_t full0 = sbase + BAR_OFF;
  const uint32_t empty0 = full0 + STAGES * 8;
  const int tid = threadIdx.x;
  const int n0 = blockIdx.x * BM;
  const int m0 = blockIdx.y * BN;
  const int KB = K / BK;

#ifdef PAIR
  float2* lut_s = reinterpret_cast<float2*>(smem + LUT_OFF);
  for (int i = tid; i < 8192; i += THREADS) {
    const int b = i >> 5;
    lut_s[i] = make_float2(lut[b >> 4], lut[b & 15]);
  }
#else
  float* lut_s = reinterpret_cast<float*>(smem + LUT_OFF);
  for (int i = tid; i < 512; i += THREADS) lut_s[i] = lut[i >> 5];
#endif
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(full0 + 8 * s, 1);
      mbar_init(empty0 + 8 * s, 8);  // the eight consumer warps
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (tid >= 256) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
    if (tid == 256) {
      for (int kb = 0; kb < KB; ++kb) {
        const int s = kb % STAGES;
        if (kb >= STAGES) mbar_wait(empty0 + 8 * s, ((kb / STAGES) - 1) & 1);
        mbar_expect_tx(full0 + 8 * s, X_BYTES);
        tma_load_2d(sbase + s * X_BYTES, &tmap_x, full0 + 8 * s, kb * BK, m0);
      }
    }
    return;
  }

  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
  const int wg = tid >> 7;
  const int wi = (tid >> 5) & 3;
  const int lane = tid & 31;
  const int q = lane & 3;
  const int r0 = 64 * wg + 16 * wi + (lane >> 2);
  const int r1 = r0 + 8;
  const uint8_t* p0 = codes + static_cast<size_t>(n0 + r0) * (K / 2);
  const uint8_t* p1 = codes + static_cast<size_t>(n0 + r1) * (K / 2);
  const float* s0 = scales + n0 + r0;
  const float* s1 = scales + n0 + r1;
#ifdef PAIR
  const int shift = (8 * q + 24) & 31;
  const uint32_t lutbase = sbase + LUT_OFF + 8 * lane;
#else
  const int shift = 8 * q;
  const uint32_t lutbase = sbase + LUT_OFF + 4 * lane;
#endif

  float acc[128];
  Codes cb[2];
  load_codes(cb[0], p0, p1, s0, s1, 0, N);
  if (KB > 1) load_codes(cb[1], p0, p1, s0, s1, 1, N);

#ifdef KBLOCK
  uint32_t A0[16], A1[16];
  decode_slice<0>(A0, cb[0], shift, lutbase);
  decode_slice<1>(A0 + 4, cb[0], shift, lutbase);
  decode_slice<2>(A0 + 8, cb[0], shift, lutbase);
  decode_slice<3>(A0 + 12, cb[0], shift, lutbase);
  auto step = [&](int kb, Codes& cur, Codes& nxt, uint32_t* Ac, uint32_t* An) {
    const int st = kb % STAGES;
    if (kb + 2 < KB) load_codes(cur, p0, p1, s0, s1, kb + 2, N);  // cur was decoded already
    mbar_wait(full0 + 8 * st, (kb / STAGES) & 1);
    const uint32_t baddr = sbase + st * X_BYTES;
    wg_fence();
    wgmma_rs_256(acc, Ac, desc_sw128(baddr), kb > 0);
    wgmma_rs_256(acc, Ac + 4, desc_sw128(baddr + 32), 1);
    wgmma_rs_256(acc, Ac + 8, desc_sw128(baddr + 64), 1);
    wgmma_rs_256(acc, Ac + 12, desc_sw128(baddr + 96), 1);
    wg_commit();
    wg_wait<1>();  // k-block kb - 1 done: its stage is free and An may be overwritten
    if (kb > 0 && lane == 0) mbar_arrive(empty0 + 8 * ((kb - 1) % STAGES));
    if (kb + 1 < KB) {
      decode_slice<0>(An, nxt, shift, lutbase);
      decode_slice<1>(An + 4, nxt, shift, lutbase);
      decode_slice<2>(An + 8, nxt, shift, lutbase);
      decode_slice<3>(An + 12, nxt, shift, lutbase);
    }
  };
  for (int kb = 0; kb < KB; kb += 2) {
    step(kb, cb[0], cb[1], A0, A1);
    if (kb + 1 < KB) step(kb + 1, cb[1], cb[0], A1, A0);
  }
#else
  uint32_t A0[4], A1[4];
  decode_slice<0>(A0, cb[0], shift, lutbase);
  auto step = [&](int kb, Codes& cur, Codes& nxt) {
    const int st = kb % STAGES;
    mbar_wait(full0 + 8 * st, (kb / STAGES) & 1);
    const uint32_t baddr = sbase + st * X_BYTES;
    wg_fence();
    wgmma_rs_256(acc, A0, desc_sw128(baddr), kb > 0);
    wg_commit();
    wg_wait<1>();
    if (kb > 0 && lane == 0) mbar_arrive(empty0 + 8 * ((kb - 1) % STAGES));
    decode_slice<1>(A1, cur, shift, lutbase);
    wg_fence();
    wgmma_rs_256(acc, A1, desc_sw128(baddr + 32), 1);
    wg_commit();
    wg_wait<1>();
    decode_slice<2>(A0, cur, shift, lutbase);
    wg_fence();
    wgmma_rs_256(acc, A0, desc_sw128(baddr + 64), 1);
    wg_commit();
    wg_wait<1>();
    decode_slice<3>(A1, cur, shift, lutbase);
    if (kb + 2 < KB) load_codes(cur, p0, p1, s0, s1, kb + 2, N);
    wg_fence();
    wgmma_rs_256(acc, A1, desc_sw128(baddr + 96), 1);
    wg_commit();
    wg_wait<1>();
    if (kb + 1 < KB) decode_slice<0>(A0, nxt, shift, lutbase);
  };
  for (int kb = 0; kb < KB; kb += 2) {
    step(kb, cb[0], cb[1]);
    if (kb + 1 < KB) step(kb + 1, cb[1], cb[0]);
  }
#endif
  wg_wait<0>();
  named_bar(1, 256);
  store_tile(acc, sbase, tid, y, M, N, m0, n0);
}

}  // namespace
}  // namespace probe

extern "C" int probe_run(void* x, const void* codes, const void* scales, const void* lut, void* y,
                         int M, int N, int K, void* stream) {
  using namespace probe;
  if (N % BM || K % BK) return 1;
  CUtensorMap map;
  if (!make_map(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, x, K, M, static_cast<uint64_t>(K) * 2, BK,
                BN, CU_TENSOR_MAP_SWIZZLE_128B))
    return 3;
  static bool attr = false;
  if (!attr) {
    cudaFuncSetAttribute(nf4_rs_gemm, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES);
    attr = true;
  }
  dim3 grid(N / BM, (M + BN - 1) / BN);
  nf4_rs_gemm<<<grid, THREADS, SMEM_BYTES, static_cast<cudaStream_t>(stream)>>>(
      map, static_cast<const uint8_t*>(codes), static_cast<const float*>(scales),
      static_cast<const float*>(lut), static_cast<__nv_bfloat16*>(y), M, N, K);
  return static_cast<int>(cudaGetLastError());
}
