// NF4 quantize / dequantize launchers.
//
// Dequantize is purely bandwidth-bound: it reads n/2 code bytes (+ n/64 absmax) and writes 2n
// bytes of bf16. A thread decodes "units" of 8 elements: one 4-byte load of codes, one 16-byte
// store (bf16/fp16) or two (fp32), so a warp's stores are fully coalesced 512-byte runs; each
// thread keeps 4 units in flight so enough loads are outstanding to cover HBM latency. The
// nested absmax is decoded in the same kernel (two rounded fp32 ops, as bitsandbytes does).
// The 16 code values sit in shared memory; 16 distinct words in 16 banks never conflict.
//
// Quantize runs once per weight at load time: one warp per quant block, two passes over the
// block (max, then codes); the second pass re-reads from L1.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <algorithm>
#include <type_traits>

#include "hoptune/common/dispatch.h"
#include "hoptune/common/launch.cuh"
#include "hoptune/common/mma.cuh"
#include "hoptune/common/occupancy.h"
#include "hoptune/common/tma.cuh"
#include "hoptune/nf4.cuh"

namespace hoptune {
namespace {

__constant__ float kNF4Code[16] = {HOPTUNE_NF4_CODE_VALUES};

// The absmax of a nested (double-quantized) block: code2[qa] * absmax2 + offset, two separately
// rounded fp32 operations, as bitsandbytes does them.
__device__ __forceinline__ float nested_absmax(float code, float absmax2, float offset) {
  return __fadd_rn(__fmul_rn(code, absmax2), offset);
}

constexpr int kDequantThreads = 256;

// Programmatic dependent launch, in a kernel started by launch_pdl (common/launch.cuh): let the
// next kernel in the stream begin launching now, then wait until the previous kernel's writes are
// visible (the block's setup above the call overlaps that kernel's tail).
__device__ __forceinline__ void pdl_begin() {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("griddepcontrol.wait;" ::: "memory");
}

// Write 8 decoded values (one 16-byte store for bf16/fp16, two for fp32).
template <typename T>
struct Store8;
template <>
struct Store8<__nv_bfloat16> {
  __device__ __forceinline__ static void run(__nv_bfloat16* out, const float (&v)[8]) {
    __nv_bfloat162 h[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
    *reinterpret_cast<uint4*>(out) = *reinterpret_cast<uint4*>(h);
  }
};
template <>
struct Store8<__half> {
  __device__ __forceinline__ static void run(__half* out, const float (&v)[8]) {
    __half2 h[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
    *reinterpret_cast<uint4*>(out) = *reinterpret_cast<uint4*>(h);
  }
};
template <>
struct Store8<float> {
  __device__ __forceinline__ static void run(float* out, const float (&v)[8]) {
    reinterpret_cast<float4*>(out)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(out)[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
};

template <int kBytes>
struct CodeLoad;
template <>
struct CodeLoad<4> {
  using type = uint32_t;
  __device__ __forceinline__ static uint32_t word(const uint32_t& v, int) { return v; }
};

// A thread decodes kUnroll chunks of kBytes code bytes (2 * kBytes elements each), the chunks
// kDequantThreads apart so each load instruction of a warp covers one contiguous run.
template <typename OutT, bool kNested, int kBytes, int kUnroll, int kThreads = kDequantThreads,
          bool kPdl = false>
__global__ void __launch_bounds__(kThreads)
    nf4_dequantize_kernel(const uint8_t* __restrict__ packed, NF4Absmax am, int64_t nchunks,
                          int log2_chunks_per_block, int log2_blocksize2, OutT* __restrict__ out) {
  using Load = CodeLoad<kBytes>;
  using Word = typename Load::type;
  __shared__ float lut[16];
  __shared__ float code2[256];
  if (threadIdx.x < 16) lut[threadIdx.x] = kNF4Code[threadIdx.x];
  if (kPdl) pdl_begin();
  if (kNested) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) code2[i] = am.code2[i];
  }
  __syncthreads();

  const Word* src = reinterpret_cast<const Word*>(packed);
  {  // the CTA's tile: kThreads * kUnroll chunks
    const int64_t base = static_cast<int64_t>(blockIdx.x) * (kThreads * kUnroll) + threadIdx.x;
    Word q[kUnroll];
    float scale[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t c = base + k * kThreads;
      scale[k] = 0.f;
      if (c < nchunks) {
        q[k] = __ldg(src + c);
        const int64_t b = c >> log2_chunks_per_block;
        if (kNested) {
          const float v = code2[__ldg(am.qabsmax + b)];
          scale[k] = nested_absmax(v, __ldg(am.absmax2 + (b >> log2_blocksize2)), am.offset);
        } else {
          scale[k] = __ldg(am.absmax + b);
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) {
      const int64_t c = base + k * kThreads;
      if (c < nchunks) {
#pragma unroll
        for (int w = 0; w < kBytes / 4; ++w) {
          const uint32_t word = Load::word(q[k], w);
          float v[8];
#pragma unroll
          for (int j = 0; j < 4; ++j) {  // byte j holds elements 2j (high nibble) and 2j+1 (low)
            const uint32_t byte = (word >> (8 * j)) & 0xFFu;
            v[2 * j] = __fmul_rn(lut[byte >> 4], scale[k]);
            v[2 * j + 1] = __fmul_rn(lut[byte & 0xFu], scale[k]);
          }
          Store8<OutT>::run(out + c * (2 * kBytes) + 8 * w, v);
        }
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(256)
    nf4_quantize_kernel(const T* __restrict__ x, int64_t nblocks, int blocksize,
                        uint8_t* __restrict__ packed, float* __restrict__ absmax, int* bad_flag) {
  const int lane = threadIdx.x & 31;
  const int64_t block = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (block >= nblocks) return;
  const T* xb = x + block * blocksize;
  const int npairs = blocksize / 2;

  float amax = 0.f;
  bool bad = false;
  for (int p = lane; p < npairs; p += 32) {
    const float a = to_float(xb[2 * p]);
    const float b = to_float(xb[2 * p + 1]);
    bad |= !isfinite(a) || !isfinite(b);
    amax = fmaxf(amax, fmaxf(fabsf(a), fabsf(b)));
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if (__any_sync(0xffffffffu, bad) && lane == 0) atomicOr(bad_flag, 1);
  if (lane == 0) absmax[block] = amax;

  const float recip = __fdiv_rn(1.0f, amax);
  uint8_t* pb = packed + block * (blocksize / 2);
  for (int p = lane; p < npairs; p += 32) {
    uint32_t byte = 0x77u;  // all-zero block: exact zeros (see nf4.cuh)
    if (amax != 0.f) {
      const uint32_t hi = nf4::quantize_value(__fmul_rn(to_float(xb[2 * p]), recip));
      const uint32_t lo = nf4::quantize_value(__fmul_rn(to_float(xb[2 * p + 1]), recip));
      byte = (hi << 4) | lo;
    }
    pb[p] = static_cast<uint8_t>(byte);
  }
}

__global__ void __launch_bounds__(256)
    nf4_quantize_nested_kernel(const float* __restrict__ absmax, int64_t nblocks, float offset,
                               const float* __restrict__ code2_g, int blocksize2,
                               uint8_t* __restrict__ qabsmax, float* __restrict__ absmax2) {
  __shared__ float code2[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) code2[i] = code2_g[i];
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t blk = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + (threadIdx.x >> 5);
  const int64_t nb2 = (nblocks + blocksize2 - 1) / blocksize2;
  if (blk >= nb2) return;
  const int64_t start = blk * blocksize2;
  const int valid = static_cast<int>(nblocks - start < blocksize2 ? nblocks - start : blocksize2);

  float amax = 0.f;
  for (int i = lane; i < valid; i += 32)
    amax = fmaxf(amax, fabsf(__fsub_rn(absmax[start + i], offset)));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if (lane == 0) absmax2[blk] = amax;
  const float recip = __fdiv_rn(1.0f, amax);
  for (int i = lane; i < valid; i += 32) {
    const float v = __fmul_rn(__fsub_rn(absmax[start + i], offset), recip);
    qabsmax[start + i] = static_cast<uint8_t>(nf4::quantize_dynamic(code2, v));
  }
}

inline bool is_pow2(int64_t v) {
  return v > 0 && (v & (v - 1)) == 0;
}
inline int ilog2(int64_t v) {
  int r = 0;
  while ((int64_t{1} << r) < v) ++r;
  return r;
}

// The checks every reader of an NF4 state makes: blocksize a power of two in [64, 4096] that
// divides the element count n, and the absmax arrays of its storage (plain or nested) present.
inline bool valid_state(const NF4Absmax& am, int blocksize, int64_t n) {
  const bool nested = am.qabsmax != nullptr;
  return is_pow2(blocksize) && blocksize >= 64 && blocksize <= 4096 && n % blocksize == 0 &&
         (nested ? (am.absmax2 != nullptr && am.code2 != nullptr && is_pow2(am.blocksize2))
                 : am.absmax != nullptr);
}

template <typename OutT, bool kNested, int kBytes, int kUnroll, int kThreads, bool kPdl>
cudaError_t launch_dequantize_kernel(const uint8_t* packed, const NF4Absmax& am, int64_t nchunks,
                                     int64_t grid, int log2_cpb, int log2_bs2, OutT* out,
                                     cudaStream_t stream) {
  auto* kernel = nf4_dequantize_kernel<OutT, kNested, kBytes, kUnroll, kThreads, kPdl>;
  if (kPdl)
    return launch_pdl(kernel, dim3(static_cast<unsigned>(grid)), dim3(kThreads), 0, stream, packed,
                      am, nchunks, log2_cpb, log2_bs2, out);
  kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(packed, am, nchunks, log2_cpb,
                                                               log2_bs2, out);
  return cudaGetLastError();
}

template <int kBytes, int kUnroll, int kThreads, bool kPdl, bool kAllDtypes = true>
cudaError_t launch_dequantize(const uint8_t* packed, const NF4Absmax& am, int64_t n, int blocksize,
                              void* out, DType out_dtype, cudaStream_t stream) {
  const int64_t nchunks = n / (2 * kBytes);
  const int per_cta = kThreads * kUnroll;
  const int64_t grid = (nchunks + per_cta - 1) / per_cta;
  HOPTUNE_REQUIRE(grid <= 0x7fffffff);
  const int log2_cpb = ilog2(blocksize / (2 * kBytes));
  const bool nested = am.qabsmax != nullptr;
  const int log2_bs2 = nested ? ilog2(am.blocksize2) : 0;
  if (!kAllDtypes) {  // measurement-only versions: bf16 output, nested absmax
    HOPTUNE_REQUIRE(out_dtype == DType::kBFloat16 && nested);
    return launch_dequantize_kernel<__nv_bfloat16, true, kBytes, kUnroll, kThreads, kPdl>(
        packed, am, nchunks, grid, log2_cpb, log2_bs2, static_cast<__nv_bfloat16*>(out), stream);
  }
  return HOPTUNE_DISPATCH_FLOAT(out_dtype, OutT, [&] {
    if (nested)
      return launch_dequantize_kernel<OutT, true, kBytes, kUnroll, kThreads, kPdl>(
          packed, am, nchunks, grid, log2_cpb, log2_bs2, static_cast<OutT*>(out), stream);
    return launch_dequantize_kernel<OutT, false, kBytes, kUnroll, kThreads, kPdl>(
        packed, am, nchunks, grid, log2_cpb, log2_bs2, static_cast<OutT*>(out), stream);
  });
}

// ---- dequantize with the LoRA product folded in: out = deq(W) + scale * B @ A ----------------
// A warp computes 16 x 64 pieces of W (16 rows, one 64-column piece). It forms its part of B @ A
// with mma.sync m16n8k16 (fp32 accumulate, the rank in steps of 16). The columns of A are fed to
// the MMA in a permuted order so that the accumulators a lane holds belong to 16 consecutive
// columns of W: lane (g = lane / 4, q = lane % 4) ends up with rows g and g + 8, columns
// 16 q .. 16 q + 15 of the piece, exactly the 8 code bytes it loads and the 32 bytes it stores per
// row. The epilogue works on registers: decode, round to the output dtype (the plain dequantize's
// value), add scale * acc in fp32, round again.
//
// The main kernel (rank <= 128, B's rows in 4-byte pairs): each warp is one of `walkers` warps on
// a 64-column piece (32 columns above r = 64) and takes every walkers-th 16-row block of it
// (walkers = the resident warps / the pieces), so the grid fills the resident warps whatever the
// shape, and the warps running at once write a band of rows of W. A warp reads its piece's A
// fragments from global memory once and keeps them in registers (no shared-memory staging, no
// barrier). A lane prefetches the next block's codes, absmax and B fragments before it computes the
// current one; rows past the weight's edge are clamped for the loads and not stored, so the loop
// has no branches around its loads. At r <= 16 without the bulk stores (below) a warp's finished
// block goes through shared memory (rows 144 bytes apart) and each lane stores 16 bytes of row 4 j
// + lane / 8, so one store instruction writes four whole 128-byte rows; storing straight from the
// MMA layout writes half of every 32-byte sector of eight rows, and the warps stalled on the stores
// (a build without stores ran 1.66x faster). At r = 32 (128 registers) the staging was 1-3% slower
// and the stores stay direct. On an H200 at r = 16 this ran at 0.64-0.74 of the copy rate (the
// plain dequantize: 0.77-0.92); with the bulk stores below, 0.66-0.76. Ranks 33-64 (A's fragments
// in 64 registers) build with 254 registers, one CTA per SM: 0.35-0.47 of the copy rate at r = 64,
// where the general kernel below, which took those ranks before, ran at 0.21-0.27. With rank % 8 ==
// 0 and B 16-byte aligned (kB16) a lane reads its B values in 16-byte runs (8 at r <= 16) instead
// of 4-byte words, whole 32-byte sectors instead of halves: r = 64 0.77-0.81x the time (176-181
// registers), r = 40 0.80-0.85x, r = 32 0.96-0.99x, r = 16 equal. At ranks up to 32 with kB16
// (kTma) the block is now written to shared memory in the 128-byte swizzle (16-byte chunk c of row
// r at c ^ (r % 8): the lanes' writes conflict-free) and leaves by one bulk tensor store (TMA, a
// map per call) from lane 0, two blocks per warp in turn, so the lanes issue no global stores: on
// the five weights 0.4-2% faster than the staged row stores at r = 8 and 16 (15.17-15.21
// against 15.47-15.48 µs at 4096 x 4096, r = 16) and 1-4.3% faster than the direct stores at r =
// 32; at r = 64 within 0.7%, so it stays direct. The lanes' stores remain for the other ranks and
// as variant 1. Measured on the way there:
// - A contiguous run of 64 x 128 items per CTA, slab-major, so the resident CTAs wrote all over
//   the weight: 0.49-0.58. ncu showed it issue-bound: 575 instructions per warp and item, half
//   of them 64-bit index arithmetic, bounds branches and register moves; trimming those gave
//   0.53-0.63. Then a CTA per 128-column slab taking every parts-th 64-row group (A^T staged in
//   shared memory once): 0.56-0.72, but at 4096 x 14336 only 224 of 264 resident CTAs had work;
//   the warp-level walk above: 0.61-0.75; the staged stores: +7-13% at 4096 x 4096 and
//   4096 x 14336 (r = 8, 16), +0-2% on the other shapes.
// - Fetching the codes further ahead: warp-private cp.async rings of 3-6 items, no faster; L2
//   prefetches 2-4 items ahead, -12% to +5% by shape; two or three blocks ahead in registers,
//   equal. Staging for full-line stores in an earlier, issue-bound kernel: slower; one bulk copy
//   per staged row (cp.async.bulk): 15-20% slower; streaming stores: equal; a lane layout whose
//   16-byte stores fill whole sectors: +4% to -3%. Three CTAs per SM (80 registers): 1-5%
//   slower. The epilogue tile by tile after each tile's MMA (to fit three CTAs per SM):
//   2-2.5x slower. CTA tiles of 32 x 256 or 16 x 512: slower (0.48-0.66). Earlier: a CTA-wide
//   cp.async ring with a barrier per item (0.30-0.40), wmma with a shared-memory accumulator round
//   trip (0.28-0.31).
// Ranks 65-128 that are multiples of 8 (B's rows 16-byte aligned) use 32-column pieces: a lane
// holds 8 columns of its two rows, the 8 rank steps' A fragments (4 n-tiles each) fit the same 64
// registers (196-202 registers, no spills), and a lane's B values for two rank steps are one
// 16-byte load (with 4-byte word loads, a first build: 252-254 registers, 0.64-0.80x the general
// kernel's time at r = 128 against 0.39-0.47x). Other ranks (odd, > 128, above 64 and not a
// multiple of 8, or B misaligned) take nf4_dequantize_lora_any: 64 x 128 items (8 warps, 4 along
// the rows x 2 along the columns), a contiguous run of items per CTA, A^T staged in shared memory
// per slab and the A fragments read from it at every rank step.
constexpr int kMrgThreads = 256;
constexpr int kMrgRows = 64, kMrgCols = 128;  // a work item
constexpr int kPieceRows = 16, kPieceCols = 64;

template <typename T>
__device__ __forceinline__ uint32_t bits16(T v) {
  return static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(&v));
}

// Two consecutive ranks r, r + 1 of one row of B as an MMA operand word (zeros past the rank).
template <typename T>
__device__ __forceinline__ uint32_t b_pair(const T* row, int r, int rank, bool vec) {
  if (vec) return r < rank ? __ldg(reinterpret_cast<const uint32_t*>(row + r)) : 0u;
  const uint32_t lo = r < rank ? bits16(__ldg(row + r)) : 0u;
  const uint32_t hi = r + 1 < rank ? bits16(__ldg(row + r + 1)) : 0u;
  return lo | (hi << 16);
}

// (a, b) rounded to T (round to nearest even) as one packed word, and its two halves in fp32.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
  const __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <typename T>
__device__ __forceinline__ void unpack2(uint32_t u, float& a, float& b);
template <>
__device__ __forceinline__ void unpack2<__nv_bfloat16>(uint32_t u, float& a, float& b) {
  a = __uint_as_float(u << 16);  // a bf16 is the high half of an fp32
  b = __uint_as_float(u & 0xFFFF0000u);
}
template <>
__device__ __forceinline__ void unpack2<__half>(uint32_t u, float& a, float& b) {
  const __half2 h = *reinterpret_cast<const __half2*>(&u);
  a = __low2float(h);
  b = __high2float(h);
}

// The epilogue for one of a lane's two rows (h): 16 consecutive elements from 8 code bytes (byte
// j holds elements 2j, high nibble, and 2j + 1), each the plain dequantize's rounded value plus
// scale * acc in fp32, rounded once more, packed in o. The code values are read from the 16-entry
// table by byte offset: the nibbles of a word are moved to bits 2-5 of their bytes (two masks per
// word), then one byte permute per element.
template <typename T>
__device__ __forceinline__ void merge_values(uint4 (&o)[2], uint2 codes, float sc,
                                             const float (&acc)[8][4], int h, float scale,
                                             const float* lut) {
  const uint32_t hi[2] = {(codes.x >> 2) & 0x3C3C3C3Cu, (codes.y >> 2) & 0x3C3C3C3Cu};
  const uint32_t lo[2] = {(codes.x << 2) & 0x3C3C3C3Cu, (codes.y << 2) & 0x3C3C3C3Cu};
  uint32_t p[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const char* base = reinterpret_cast<const char*>(lut);
    const float c0 =
        *reinterpret_cast<const float*>(base + __byte_perm(hi[j >> 2], 0u, 0x4440u | (j & 3)));
    const float c1 =
        *reinterpret_cast<const float*>(base + __byte_perm(lo[j >> 2], 0u, 0x4440u | (j & 3)));
    float w0, w1;
    unpack2<T>(pack2<T>(__fmul_rn(c0, sc), __fmul_rn(c1, sc)), w0, w1);
    p[j] = pack2<T>(__fmaf_rn(scale, acc[j][2 * h], w0), __fmaf_rn(scale, acc[j][2 * h + 1], w1));
  }
  o[0] = make_uint4(p[0], p[1], p[2], p[3]);
  o[1] = make_uint4(p[4], p[5], p[6], p[7]);
}

// merge_values' result, the code values read from the pair table in shared memory: 256 rows, one
// per code byte b, each of 32 copies of (code[b >> 4], code[b & 15]), elements 2j and 2j + 1
// (bitsandbytes' high nibble first). A lane reads its own copy (row b at b * 256 + 8 * lane
// bytes): the 16 lanes of a half-warp's 8-byte reads fall in distinct bank pairs. One byte permute
// and one conflict-free 8-byte read per element pair instead of two masks, two permutes and two
// reads: 1-3% faster (the main kernel; 64 KiB per CTA, 2 CTAs per SM as before).
// kNT = 8: 16 elements from the 8 code bytes of codes; kNT = 4 (32-column pieces): 8 elements
// from the 4 bytes of codes.x.
constexpr int kPairTableBytes = 256 * 32 * 8;
constexpr int kTmaBlockBytes = 16 * 128;  // a warp's 16 x 64 block (bf16 / fp16) for a bulk store
// ranks (multiples of 8) whose blocks leave by bulk stores: 0.4-4.3% faster than the lanes' stores
// at r = 8-32; at r = 64 (one CTA per SM) within 0.7% (slower on four of five weights), so it
// keeps its direct stores
constexpr int kTmaMaxRank = 32;
// dynamic shared memory with bulk stores: the pair table, 1024 bytes of alignment slack, two
// blocks per warp
constexpr int kTmaSmemBytes = kPairTableBytes + 1024 + kMrgThreads / 32 * 2 * kTmaBlockBytes;
template <typename T, int kNT>
__device__ __forceinline__ void merge_values_pairs(uint4 (&o)[kNT / 4], uint2 codes, float sc,
                                                   const float (&acc)[kNT][4], int h, float scale,
                                                   const char* table, uint32_t lane8) {
  uint32_t p[kNT];
#pragma unroll
  for (int j = 0; j < kNT; ++j) {
    // byte j of the codes into bits 8-15, the lane's 8 * lane below (its copy's offset)
    const uint32_t off = __byte_perm(j < 4 ? codes.x : codes.y, lane8, 0x5504u | ((j & 3) << 4));
    const float2 c = *reinterpret_cast<const float2*>(table + off);
    float w0, w1;
    unpack2<T>(pack2<T>(__fmul_rn(c.x, sc), __fmul_rn(c.y, sc)), w0, w1);
    p[j] = pack2<T>(__fmaf_rn(scale, acc[j][2 * h], w0), __fmaf_rn(scale, acc[j][2 * h + 1], w1));
  }
#pragma unroll
  for (int i = 0; i < kNT / 4; ++i)
    o[i] = make_uint4(p[4 * i], p[4 * i + 1], p[4 * i + 2], p[4 * i + 3]);
}

struct MergeArgs {
  const uint8_t* packed;
  NF4Absmax am;
  int64_t rows, cols;
  int log2_blocksize, log2_blocksize2;
  const void* lora_a;
  const void* lora_b;
  int rank, rank_pad;  // rank_pad: rank rounded up to 16
  float scale;
  bool b_vec;                 // B rows 4-byte aligned pairs (rank even, pointer aligned)
  int64_t row_groups, items;  // nf4_dequantize_lora_any's items (row groups x 128-column slabs)
  int64_t col_pieces;         // main kernel: column pieces (64 or 32 columns), warps per piece
  int walkers;
  void* out;
};

// A^T of the slab starting at column c0 into s_at (rank_pad x 128, zeros past the rank and the
// last column): column c of the slab (piece c / 64) goes to permuted row 64 * piece + 8 * j +
// (2 * quad + e), c % 64 = 16 * quad + 2 * j + e, so MMA n-tile j, column g is the piece's column
// 16 * (g / 2) + 2 * j + (g % 2). Rows are rank_pad / 2 + 4 words apart (= 4 mod 8: no bank
// conflicts on the fragment reads).
template <typename T>
__device__ __forceinline__ void stage_a(uint32_t* s_at, const T* lora_a, const MergeArgs& a,
                                        int64_t c0) {
  const int words = a.rank_pad / 2 + 4;
  uint16_t* s16 = reinterpret_cast<uint16_t*>(s_at);
  for (int idx = threadIdx.x; idx < a.rank_pad * kMrgCols; idx += kMrgThreads) {
    const int r = idx / kMrgCols, c = idx % kMrgCols;
    const int cc = c & 63;
    const int prow = (c & 64) + 8 * ((cc & 15) >> 1) + 2 * (cc >> 4) + (cc & 1);
    uint16_t v = 0;
    if (r < a.rank && c0 + c < a.cols)
      v = bits16(lora_a[static_cast<int64_t>(r) * a.cols + c0 + c]);
    s16[prow * 2 * words + r] = v;
  }
}

// The absmax of quant block b as loaded: nested, its 8-bit code (qa) and absmax2 (amax), decoded
// later with nested_absmax; plain, the fp32 absmax (amax).
template <bool kNested>
__device__ __forceinline__ void load_absmax(const NF4Absmax& am, int64_t b, int log2_blocksize2,
                                            uint32_t& qa, float& amax) {
  if (kNested) {
    qa = __ldg(am.qabsmax + b);
    amax = __ldg(am.absmax2 + (b >> log2_blocksize2));
  } else {
    amax = __ldg(am.absmax + b);
  }
}

// What a lane loads for one item before computing it: its two rows' codes and absmax.
struct MergeLoads {
  uint2 codes[2];
  uint32_t qa[2];  // nested: the 8-bit absmax code
  float amax[2];   // absmax, or nested: absmax2
};

// The main kernel: rank <= 16 * kRegSteps, a.b_vec, rows below 2^30. Each warp is a walker of
// one kCols-column piece (a.walkers per piece) and takes every walkers-th 16-row block of it.
// kCols = 32 (ranks 65-128, multiples of 8: kRegSteps = 8): kNT = 4 MMA n-tiles per step instead
// of 8, so A's fragments still take 64 registers; a lane holds 8 consecutive columns of its two
// rows, and B's rows are read in 16-byte runs (rank_of).
// kB16 (rank % 8 == 0, B 16-byte aligned; always at 32 columns): the ranks regrouped (rank_of) so
// that a lane reads its B values of a row in 16-byte runs (8 bytes at r <= 16).
template <typename T, bool kNested, int kRegSteps, int kCols = 64, bool kB16 = true,
          bool kTma = false>
__global__ void __launch_bounds__(kMrgThreads, kRegSteps <= 2 ? 2 : 1)
    nf4_dequantize_lora_kernel(MergeArgs a, const __grid_constant__ CUtensorMap out_map) {
  static_assert(kCols == 64 || (kCols == 32 && kRegSteps > 1 && kB16),
                "32-column pieces: direct stores, 16-byte B runs");
  static_assert(!kTma || (kCols == 64 && kB16), "bulk stores: 64 columns, B in runs");
  constexpr int kNT = kCols / 8;        // MMA n-tiles (8 columns each) per piece
  constexpr int kLaneCols = kCols / 4;  // consecutive columns per lane and row
  extern __shared__ uint32_t s_at[];    // here the pair table (kPairTableBytes; merge_values_pairs)
  __shared__ float code2[256];
  // kRegSteps == 1: each warp's 16 x 64 block passes through here on its way out (rows of
  // kStageRow bytes), so that one store instruction writes four whole 128-byte rows
  constexpr int kStageRow = 144;  // 128 + 16: the lanes' 16-byte writes fall in distinct banks
  constexpr bool kStaged = kRegSteps == 1 && !kTma;
  __shared__ __align__(
      16) char stage_all[kStaged ? kMrgThreads / 32 : 1][kStaged ? kPieceRows * kStageRow : 16];
  float2* pairs = reinterpret_cast<float2*>(s_at);
  for (int i = threadIdx.x; i < kPairTableBytes / 8; i += kMrgThreads) {
    const int b = i >> 5;
    pairs[i] = make_float2(kNF4Code[b >> 4], kNF4Code[b & 15]);
  }
  pdl_begin();
  if (kNested) {
    for (int i = threadIdx.x; i < 256; i += kMrgThreads) code2[i] = a.am.code2[i];
  }
  __syncthreads();
  const char* pair_table = reinterpret_cast<const char*>(s_at);
  const uint32_t lane8 = 8u * (threadIdx.x & 31);
  const T* __restrict__ lora_a = static_cast<const T*>(a.lora_a);
  const T* __restrict__ lora_b = static_cast<const T*>(a.lora_b);
  T* __restrict__ out = static_cast<T*>(a.out);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, q = lane & 3;
  // kTma: two 16 x 64 blocks per warp after the pair table, 128-byte rows in the 128-byte swizzle
  // of out_map (16-byte chunk c of row r at chunk c ^ (r % 8)), 1024-byte aligned
  char* tma_stage = nullptr;
  if constexpr (kTma) {
    char* after = reinterpret_cast<char*>(s_at) + kPairTableBytes;
    const uint32_t at = static_cast<uint32_t>(__cvta_generic_to_shared(after));
    tma_stage = after + ((1024u - (at & 1023u)) & 1023u) + warp * 2 * kTmaBlockBytes;
  }
  const int64_t cols = a.cols;
  const int rows = static_cast<int>(a.rows);
  const int col_pieces = static_cast<int>(a.col_pieces), walkers = a.walkers;
  const int gw = blockIdx.x * (kMrgThreads / 32) + warp;
  const int walker = gw / col_pieces;
  if (walker >= walkers) return;  // (the grid's last warps; no barrier follows)
  const int row_pieces = (rows + kPieceRows - 1) / kPieceRows;
  const int count = (row_pieces - walker + walkers - 1) / walkers;
  const int64_t kc = static_cast<int64_t>(gw % col_pieces) * kCols;
  // The first of the two ranks in k-slots 2q, 2q + 1 (e = 0) or 2q + 8, 2q + 9 (e = 1) at rank
  // step s. With kB16 two steps' ranks are regrouped so that a lane's 8 values of a B row for
  // them are contiguous: one 16-byte load (one step: 4 values, 8 bytes).
  auto rank_of = [&](int s, int e) {
    if constexpr (!kB16) return 16 * s + 2 * q + 8 * e;
    if constexpr (kRegSteps == 1) return 4 * q + 2 * e;
    return 32 * (s >> 1) + 8 * q + 4 * (s & 1) + 2 * e;
  };
  bool b_ok[kRegSteps][2];  // this lane's B words within the rank
#pragma unroll
  for (int s = 0; s < kRegSteps; ++s) {
    b_ok[s][0] = rank_of(s, 0) < a.rank;
    b_ok[s][1] = rank_of(s, 1) < a.rank;
  }

  // A's fragments for the piece, straight from global memory (read once per warp): n-tile j,
  // column g is the piece's column kLaneCols (g / 2) + 2 j + g % 2 (at 64 columns the stage_a
  // order), ranks rank_of(s, e) and the next; zeros past the rank
  uint32_t afrag[kRegSteps][kNT][2];
#pragma unroll
  for (int s = 0; s < kRegSteps; ++s) {
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
      const T* col = lora_a + kc + kLaneCols * (g >> 1) + 2 * j + (g & 1);
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int r = rank_of(s, e);
        const uint32_t lo = r < a.rank ? bits16(__ldg(col + static_cast<int64_t>(r) * cols)) : 0u;
        const uint32_t hi =
            r + 1 < a.rank ? bits16(__ldg(col + static_cast<int64_t>(r + 1) * cols)) : 0u;
        afrag[s][j][e] = lo | (hi << 16);
      }
    }
  }

  auto load = [&](int piece, MergeLoads& p, uint32_t (&bf)[kRegSteps][4]) {
    const int n0 = piece * kPieceRows + g;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = min(n0 + 8 * h, rows - 1);
      const int64_t idx = static_cast<int64_t>(n) * cols + kc + kLaneCols * q;
      if constexpr (kCols == 64) {
        p.codes[h] = __ldg(reinterpret_cast<const uint2*>(a.packed + (idx >> 1)));
      } else {
        p.codes[h] =
            make_uint2(__ldg(reinterpret_cast<const uint32_t*>(a.packed + (idx >> 1))), 0u);
      }
      load_absmax<kNested>(a.am, idx >> a.log2_blocksize, a.log2_blocksize2, p.qa[h], p.amax[h]);
      if constexpr (!kB16) {
        const uint32_t* brow =
            reinterpret_cast<const uint32_t*>(lora_b + static_cast<int64_t>(n) * a.rank);
#pragma unroll
        for (int s = 0; s < kRegSteps; ++s) {
          bf[s][h] = b_ok[s][0] ? __ldg(brow + 8 * s + q) : 0u;
          bf[s][2 + h] = b_ok[s][1] ? __ldg(brow + 8 * s + q + 4) : 0u;
        }
      } else if constexpr (kRegSteps == 1) {  // ranks 4 q .. 4 q + 3 of the row
        const uint2* brow =
            reinterpret_cast<const uint2*>(lora_b + static_cast<int64_t>(n) * a.rank);
        const uint2 v = b_ok[0][0] ? __ldg(brow + q) : make_uint2(0u, 0u);
        bf[0][h] = v.x;
        bf[0][2 + h] = v.y;
      } else {  // ranks 32 t + 8 q .. + 7 of the row: steps 2 t and 2 t + 1 (rank_of)
        const uint4* brow =
            reinterpret_cast<const uint4*>(lora_b + static_cast<int64_t>(n) * a.rank);
#pragma unroll
        for (int t = 0; t < kRegSteps / 2; ++t) {
          const uint4 v = b_ok[2 * t][0] ? __ldg(brow + 4 * t + q) : make_uint4(0u, 0u, 0u, 0u);
          bf[2 * t][h] = v.x;
          bf[2 * t][2 + h] = v.y;
          bf[2 * t + 1][h] = v.z;
          bf[2 * t + 1][2 + h] = v.w;
        }
      }
    }
  };
  auto compute = [&](int piece, const MergeLoads& p, const uint32_t (&bf)[kRegSteps][4], int buf) {
    float acc[kNT][4];
#pragma unroll
    for (int j = 0; j < kNT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll
    for (int s = 0; s < kRegSteps; ++s) {
#pragma unroll
      for (int j = 0; j < kNT; ++j) mma_16816<T>(acc[j], bf[s], afrag[s][j][0], afrag[s][j][1]);
    }
    const int n0 = piece * kPieceRows + g;
    char* stage = stage_all[kStaged ? warp : 0];
    char* block = kTma ? tma_stage + buf * kTmaBlockBytes : nullptr;
    if constexpr (kTma) {  // the store issued from this block two items ago has read it
      if (lane == 0) tma_wait_read<1>();
      __syncwarp();
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int n = n0 + 8 * h;
      const float sc = kNested ? nested_absmax(code2[p.qa[h]], p.amax[h], a.am.offset) : p.amax[h];
      uint4 o[kNT / 4];
      merge_values_pairs<T, kNT>(o, p.codes[h], sc, acc, h, a.scale, pair_table, lane8);
      if constexpr (kTma) {  // row g + 8 h, chunks 2 q and 2 q + 1, swizzled by (g + 8 h) % 8
        uint4* srow = reinterpret_cast<uint4*>(block + (g + 8 * h) * 128);
        srow[(2 * q) ^ g] = o[0];
        srow[(2 * q + 1) ^ g] = o[1];
      } else if constexpr (kRegSteps == 1) {
        uint4* srow = reinterpret_cast<uint4*>(stage + (g + 8 * h) * kStageRow);
        srow[2 * q] = o[0];
        srow[2 * q + 1] = o[1];
      } else if (n < rows) {
        uint4* dst =
            reinterpret_cast<uint4*>(out + static_cast<int64_t>(n) * cols + kc + kLaneCols * q);
#pragma unroll
        for (int i = 0; i < kNT / 4; ++i) dst[i] = o[i];
      }
    }
    if constexpr (kTma) {  // one bulk store of the block (rows past the weight's are dropped)
      fence_async_shared();
      __syncwarp();
      if (lane == 0) tma_store_2d(&out_map, block, static_cast<int>(kc), piece * kPieceRows);
    } else if constexpr (kRegSteps == 1) {  // lane l stores 16 bytes of row 4 j + l / 8
      __syncwarp();
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int row = 4 * j + (lane >> 3), chunk = lane & 7;
        const uint4 v = *reinterpret_cast<const uint4*>(stage + row * kStageRow + 16 * chunk);
        const int n = piece * kPieceRows + row;
        if (n < rows)
          *reinterpret_cast<uint4*>(out + static_cast<int64_t>(n) * cols + kc + 8 * chunk) = v;
      }
      __syncwarp();  // (the next block overwrites the staging rows)
    }
  };

  // two sets of loads in turn (no register copies between items)
  MergeLoads la, lb;
  uint32_t ba[kRegSteps][4], bb[kRegSteps][4];
  int piece = walker;
  if (count > 0) load(piece, la, ba);
  for (int i = 0; i < count; i += 2) {
    if (i + 1 < count) load(piece + walkers, lb, bb);
    compute(piece, la, ba, 0);
    if (i + 1 >= count) break;
    piece += walkers;
    if (i + 2 < count) load(piece + walkers, la, ba);
    compute(piece, lb, bb, 1);
    piece += walkers;
  }
  if constexpr (kTma) {  // the bulk stores done before the grid counts as complete
    if (lane == 0) tma_wait_all();
  }
}

// The epilogue of nf4_dequantize_lora_any for one of a lane's rows: merge_values, then stores.
template <typename T>
__device__ __forceinline__ void merge_store(T* dst, uint2 codes, float sc, const float (&acc)[8][4],
                                            int h, float scale, const float* lut) {
  uint4 o[2];
  merge_values<T>(o, codes, sc, acc, h, scale, lut);
  reinterpret_cast<uint4*>(dst)[0] = o[0];
  reinterpret_cast<uint4*>(dst)[1] = o[1];
}

// Any rank, B's rows at any alignment: a contiguous run of items per CTA, slab-major (A^T staged
// about once per slab), the rank in steps of 16 with A's fragments from shared memory and B's
// loaded per step.
template <typename T>
__global__ void __launch_bounds__(kMrgThreads, 2) nf4_dequantize_lora_any(MergeArgs a) {
  extern __shared__ uint32_t s_at[];
  __shared__ float lut[16];
  __shared__ float code2[256];
  const bool nested = a.am.qabsmax != nullptr;
  if (threadIdx.x < 16) lut[threadIdx.x] = kNF4Code[threadIdx.x];
  pdl_begin();
  if (nested) {
    for (int i = threadIdx.x; i < 256; i += kMrgThreads) code2[i] = a.am.code2[i];
  }
  const T* __restrict__ lora_b = static_cast<const T*>(a.lora_b);
  T* __restrict__ out = static_cast<T*>(a.out);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, q = lane & 3;
  const int wc = warp & 1, wr = warp >> 1;
  const int words = a.rank_pad / 2 + 4;
  const int steps = a.rank_pad / 16;

  const int64_t per = a.items / gridDim.x, extra = a.items % gridDim.x;
  const int64_t bx = blockIdx.x;
  const int64_t i_begin = bx * per + (bx < extra ? bx : extra);
  const int64_t i_end = i_begin + per + (bx < extra ? 1 : 0);

  // An item is (row group, slab); the walk counts them rather than dividing the item index.
  int64_t slab = -1;
  int64_t group = i_begin % a.row_groups, item_slab = i_begin / a.row_groups;
  for (int64_t item = i_begin; item < i_end; ++item) {
    if (item_slab != slab) {  // uniform across the CTA: every warp walks the same items
      __syncthreads();
      stage_a(s_at, static_cast<const T*>(a.lora_a), a, item_slab * kMrgCols);
      __syncthreads();
      slab = item_slab;
    }
    const int64_t n0 = group * kMrgRows + wr * kPieceRows,
                  k0 = item_slab * kMrgCols + wc * kPieceCols;
    if (k0 < a.cols) {
      // the codes and absmax first: their loads overlap the rank steps
      uint2 codes[2] = {make_uint2(0u, 0u), make_uint2(0u, 0u)};
      float sc[2] = {0.f, 0.f};
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t n = n0 + g + 8 * h;
        if (n >= a.rows) continue;
        const int64_t idx = n * a.cols + k0 + 16 * q;
        codes[h] = __ldg(reinterpret_cast<const uint2*>(a.packed + (idx >> 1)));
        const int64_t b = idx >> a.log2_blocksize;
        sc[h] = nested ? nested_absmax(code2[__ldg(a.am.qabsmax + b)],
                                       __ldg(a.am.absmax2 + (b >> a.log2_blocksize2)), a.am.offset)
                       : __ldg(a.am.absmax + b);
      }
      float acc[8][4];
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
#pragma unroll 1
      for (int s = 0; s < steps; ++s) {
        uint32_t bf[4];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t n = n0 + g + 8 * h;
          const bool ok = n < a.rows;
          const T* row = lora_b + (ok ? n : 0) * a.rank;
          bf[h] = ok ? b_pair(row, 16 * s + 2 * q, a.rank, a.b_vec) : 0u;
          bf[2 + h] = ok ? b_pair(row, 16 * s + 2 * q + 8, a.rank, a.b_vec) : 0u;
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const uint32_t* w = s_at + (wc * 64 + 8 * j + g) * words + 8 * s + q;
          mma_16816<T>(acc[j], bf, w[0], w[4]);
        }
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t n = n0 + g + 8 * h;
        if (n < a.rows)
          merge_store(out + n * a.cols + k0 + 16 * q, codes[h], sc[h], acc, h, a.scale, lut);
      }
    }
    if (++group == a.row_groups) {
      group = 0;
      ++item_slab;
    }
  }
}

// ---- small-M product straight from the codes: y = x deq(W)^T + scale * xa B^T + bias --------
// ---- small-M product on tensor cores, from the codes: y = x deq(W)^T (+ LoRA, bias) --------
// For one to a few dozen rows of x (generation, alone or batched) the weight is read once, as
// codes. A warp owns 16 weight rows and walks 128 columns per step: each lane copies 16 code
// bytes of row g and of row g + 8 (32 consecutive columns, one quant block) into a warp-private
// shared-memory ring of kSmallStages steps (cp.async), decodes them to the plain dequantize's
// rounded values and feeds them to mma.sync m16n8k16 as the A operand (weight rows on the MMA's
// M side), with x's rows on its N side (kMT tiles of 8). The 128 columns are fed in a permuted
// order: at k-step s (0-7), a lane's A slots 2t, 2t + 1 and 2t + 8, 2t + 9 hold columns
// 32t + 4s .. 32t + 4s + 3, so its 32 columns are the 16 bytes it copied, and its B fragment is
// the same 4 columns of one row of x (its four 16-byte loads of x cover the 8 k-steps).
// On an H200 it runs far below the bandwidth limit, on the decode's instruction count (a byte
// permute, a shared-memory table read and an fp32 multiply per element, a conversion per pair)
// and latency with 16 warps per SM; see docs/KERNELS.md.
// A CTA's 8 warps take 128 consecutive weight rows (x's reads are shared through L1) and one of
// `slices` ranges of the columns (blockIdx.y), so that a small N still fills the GPU. With more
// than one slice each CTA writes its fp32 partial sums to a workspace and counts itself in; the
// last CTA of a row group adds the slices in a fixed order (deterministic), then the LoRA term
// and the bias, rounds and stores, and resets the counter for the next launch.
constexpr int kSmallThreads = 256;
constexpr int kSmallRows = 128;  // weight rows per CTA: 8 warps x 16
constexpr int kSmallStep = 128;  // columns per warp step
constexpr int kSmallMaxM = 32;   // rows of x: up to 4 tiles of 8
constexpr int kSmallStages = 4;  // steps per warp in the shared-memory ring

struct SmallArgs {
  const void* x;
  int64_t ldx;
  int m;
  const uint8_t* packed;
  NF4Absmax am;
  int log2_blocksize, log2_blocksize2;
  int64_t n, k;
  int steps, slices;
  const float* xa;
  const void* lora_b;
  int rank;
  float scale;
  const void* bias;
  float* ws;      // slices x m x n fp32 (slices > 1)
  int* counters;  // one per row group, zero between launches (slices > 1)
  void* y;
};

// A lane's absmax for its two rows at one step (the codes go through a shared-memory ring).
struct SmallLoads {
  uint32_t qa[2];  // nested: the 8-bit absmax code
  float amax[2];   // absmax, or nested: absmax2
};

// kMT: tiles of 8 rows of x (rows past m are zeros and not stored)
template <typename T, int kMT, bool kNested>
__global__ void __launch_bounds__(kSmallThreads, 2) nf4_small_m_kernel(SmallArgs a) {
  // the code table 256-byte aligned: a lookup's shared address is the table's with its low byte
  // replaced by the code's offset (one byte permute, no add)
  __shared__ __align__(256) float lut[16];
  __shared__ float code2[256];
  __shared__ int last;
  __shared__ __align__(16) uint4 ring_all[kSmallThreads / 32][kSmallStages][64];
  if (threadIdx.x < 16) lut[threadIdx.x] = kNF4Code[threadIdx.x];
  pdl_begin();
  if (kNested) {
    for (int i = threadIdx.x; i < 256; i += kSmallThreads) code2[i] = a.am.code2[i];
  }
  __syncthreads();
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int64_t n = a.n;
  const int k = static_cast<int>(a.k);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kSmallRows + warp * 16 + g;
  const int slice = blockIdx.y;
  const int s_begin = static_cast<int>(static_cast<int64_t>(a.steps) * slice / a.slices);
  const int s_end = static_cast<int>(static_cast<int64_t>(a.steps) * (slice + 1) / a.slices);
  // the lane's first element of rows g and g + 8 (clamped to the last row for loads) at column
  // 32 t; a step moves 128 columns on
  int64_t first[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) first[h] = min(row0 + 8 * h, n - 1) * k + 32 * t;
  const T* xrow[kMT];  // row 8 j + g of x at column 32 t, or null past m
#pragma unroll
  for (int j = 0; j < kMT; ++j) {
    const int mi = 8 * j + g;
    xrow[j] = mi < a.m ? static_cast<const T*>(a.x) + mi * a.ldx + 32 * t : nullptr;
  }
  const uint32_t lut_s = smem_addr(lut);

  // the codes of step st into ring slot `slot` (16 bytes of row g at [lane], of row g + 8 at
  // [32 + lane]: each lane reads back only what it copied, so no barrier), zeros past k; the
  // step's absmax into p, from ordinary loads
  uint4(*ring)[64] = ring_all[warp];
  auto load = [&](int st, int slot, SmallLoads& p) {
    const bool in = st * kSmallStep + 32 * t < k;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t idx = first[h] + st * kSmallStep;
      cp_async_16(smem_addr(&ring[slot][32 * h + lane]), a.packed + (in ? idx >> 1 : 0), in);
      p.qa[h] = 0u;
      p.amax[h] = 0.f;  // past k: zero weights (and zero x)
      if (in)
        load_absmax<kNested>(a.am, idx >> a.log2_blocksize, a.log2_blocksize2, p.qa[h], p.amax[h]);
    }
  };

  float acc[kMT][4];
#pragma unroll
  for (int j = 0; j < kMT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;

  auto compute = [&](int st, int slot, const SmallLoads& p) {
    const uint4 codes[2] = {ring[slot][lane], ring[slot][32 + lane]};
    // the lane's A fragments: row g + 8 h, byte i of its 16 holds columns 2i (high nibble), 2i + 1
    uint32_t af[8][4];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float sc = kNested ? nested_absmax(code2[p.qa[h]], p.amax[h], a.am.offset) : p.amax[h];
      const uint32_t words[4] = {codes[h].x, codes[h].y, codes[h].z, codes[h].w};
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        const uint32_t hi = (words[w] >> 2) & 0x3C3C3C3Cu, lo = (words[w] << 2) & 0x3C3C3C3Cu;
#pragma unroll
        for (int j = 0; j < 4; ++j) {  // byte i = 4 w + j -> step i / 2, slot pair (i % 2)
          float c0, c1;
          asm("ld.shared.f32 %0, [%1];" : "=f"(c0) : "r"(__byte_perm(hi, lut_s, 0x7650u | j)));
          asm("ld.shared.f32 %0, [%1];" : "=f"(c1) : "r"(__byte_perm(lo, lut_s, 0x7650u | j)));
          const int i = 4 * w + j;
          af[i >> 1][h + 2 * (i & 1)] = pack2<T>(__fmul_rn(c0, sc), __fmul_rn(c1, sc));
        }
      }
    }
    // x: row 8 j + g, columns 128 st + 32 t .. + 31 (four 16-byte loads, served by L1/L2),
    // zeros past m or k
    const bool in = st * kSmallStep + 32 * t < k;
#pragma unroll
    for (int j = 0; j < kMT; ++j) {
      const bool ok = xrow[j] != nullptr && in;
      const uint4* src = reinterpret_cast<const uint4*>(xrow[j] + st * kSmallStep);
      uint4 xv[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) xv[q] = ok ? __ldg(src + q) : make_uint4(0u, 0u, 0u, 0u);
      const uint32_t* xw = reinterpret_cast<const uint32_t*>(xv);
#pragma unroll
      for (int s = 0; s < 8; ++s) mma_16816<T>(acc[j], af[s], xw[2 * s], xw[2 * s + 1]);
    }
  };

  // a ring of kSmallStages steps per warp: kSmallStages - 1 steps' codes in flight while one is
  // computed (one commit group per step, empty past the slice's end)
  constexpr int S = kSmallStages;
  SmallLoads am[S];
  const bool active = row0 - g < n;  // (a warp past the last row only joins the barriers)
  if (active) {
#pragma unroll
    for (int u = 0; u < S - 1; ++u) {
      if (s_begin + u < s_end) load(s_begin + u, u, am[u]);
      cp_async_commit();
    }
  }
  for (int base = s_begin; active && base < s_end; base += S) {
#pragma unroll
    for (int u = 0; u < S; ++u) {
      const int st = base + u;
      if (st >= s_end) break;
      cp_async_wait<S - 2>();  // step st has landed
      if (st + S - 1 < s_end) load(st + S - 1, (u + S - 1) % S, am[(u + S - 1) % S]);
      cp_async_commit();
      compute(st, u, am[u]);
    }
  }

  // accumulator e of tile j: weight row row0 + 8 (e / 2), row of x 8 j + 2 t + e % 2
  T* y = static_cast<T*>(a.y);
  auto finish = [&](int64_t row, int mi, float v) {
    if (a.xa != nullptr) {
      const T* b = static_cast<const T*>(a.lora_b) + row * a.rank;
      const float* xa = a.xa + static_cast<int64_t>(mi) * a.rank;
      float l = 0.f;
      for (int r = 0; r < a.rank; ++r) l = __fmaf_rn(xa[r], to_float(b[r]), l);
      v = __fmaf_rn(a.scale, l, v);
    }
    if (a.bias != nullptr) v += to_float(static_cast<const T*>(a.bias)[row]);
    y[static_cast<int64_t>(mi) * n + row] = from_float<T>(v);
  };
  // f(row, mi, accumulator) for each of this thread's accumulators inside the output
  auto for_each_acc = [&](auto f) {
#pragma unroll
    for (int j = 0; j < kMT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t row = row0 + 8 * (e >> 1);
        const int mi = 8 * j + 2 * t + (e & 1);
        if (row < n && mi < a.m) f(row, mi, acc[j][e]);
      }
    }
  };
  if (a.slices == 1) {
    for_each_acc(finish);
    return;
  }
  const int64_t plane = static_cast<int64_t>(a.m) * n;
  float* part = a.ws + slice * plane;
  for_each_acc([&](int64_t row, int mi, float v) { part[mi * n + row] = v; });
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const int ticket = atomicAdd(a.counters + blockIdx.x, 1);
    last = ticket == a.slices - 1;
    if (last) a.counters[blockIdx.x] = 0;  // (every other CTA of the group has counted)
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  for_each_acc([&](int64_t row, int mi, float) {
    float v = 0.f;
    for (int s = 0; s < a.slices; ++s) v += __ldcg(a.ws + s * plane + mi * n + row);
    finish(row, mi, v);
  });
}

// The fused GEMM's scales: one 32 x 32 tile of (rows, quant blocks) per CTA, read along a row's
// blocks and written along the rows (a transpose through shared memory), decoded to fp32.
template <bool kNested>
__global__ void __launch_bounds__(256)
    nf4_absmax_transposed_kernel(NF4Absmax am, int64_t rows, int64_t kb, int log2_bs2, float* out) {
  __shared__ float tile[32][33];
  __shared__ float code2[256];
  const int tid = threadIdx.y * 32 + threadIdx.x;
  if (kNested) code2[tid] = __ldg(am.code2 + tid);
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * 32;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * 32;
  uint32_t qa[4] = {0, 0, 0, 0};
  float amax[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t r = r0 + threadIdx.y + 8 * i, j = j0 + threadIdx.x;
    if (r < rows && j < kb) load_absmax<kNested>(am, r * kb + j, log2_bs2, qa[i], amax[i]);
  }
  if (kNested) __syncthreads();
#pragma unroll
  for (int i = 0; i < 4; ++i)
    tile[threadIdx.y + 8 * i][threadIdx.x] =
        kNested ? nested_absmax(code2[qa[i]], amax[i], am.offset) : amax[i];
  __syncthreads();
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t j = j0 + threadIdx.y + 8 * i, r = r0 + threadIdx.x;
    if (r < rows && j < kb) out[j * rows + r] = tile[threadIdx.x][threadIdx.y + 8 * i];
  }
}

}  // namespace

cudaError_t nf4_dequantize(const uint8_t* packed, const NF4Absmax& absmax, int64_t n, int blocksize,
                           void* out, DType out_dtype, cudaStream_t stream, int variant) {
  HOPTUNE_REQUIRE(packed != nullptr && out != nullptr && n > 0);
  HOPTUNE_REQUIRE(valid_state(absmax, blocksize, n));
  HOPTUNE_REQUIRE(reinterpret_cast<uintptr_t>(packed) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(out) % 16 == 0);
  const bool nested = absmax.qabsmax != nullptr;
  // Launched with programmatic dependent launch. Version 1 (bf16 output, nested absmax; kept for
  // measurement) is the same kernel without it. Loads per thread (1-8), CTA size (256-1024) and a
  // grid capped at 8 CTAs per SM were measured too: none beat 256 threads with 4 loads each.
  if (variant == 1 && out_dtype == DType::kBFloat16 && nested)
    return launch_dequantize<4, 4, 256, false, false>(packed, absmax, n, blocksize, out, out_dtype,
                                                      stream);
  return launch_dequantize<4, 4, 256, true>(packed, absmax, n, blocksize, out, out_dtype, stream);
}

cudaError_t nf4_dequantize_lora(const uint8_t* packed, const NF4Absmax& absmax, int64_t rows,
                                int64_t cols, int blocksize, const void* lora_a, const void* lora_b,
                                int rank, float scale, void* out, DType dtype, cudaStream_t stream,
                                int variant) {
  HOPTUNE_REQUIRE(packed != nullptr && out != nullptr && lora_a != nullptr && lora_b != nullptr);
  HOPTUNE_REQUIRE(rows > 0 && cols > 0 && cols % 64 == 0 && rank >= 1 && rank <= 256);
  HOPTUNE_REQUIRE(valid_state(absmax, blocksize, rows * cols));
  HOPTUNE_REQUIRE(reinterpret_cast<uintptr_t>(packed) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(out) % 16 == 0);
  HOPTUNE_REQUIRE(dtype == DType::kBFloat16 || dtype == DType::kFloat16);
  const bool nested = absmax.qabsmax != nullptr;
  MergeArgs a;
  a.packed = packed;
  a.am = absmax;
  a.rows = rows;
  a.cols = cols;
  a.log2_blocksize = ilog2(blocksize);
  a.log2_blocksize2 = nested ? ilog2(absmax.blocksize2) : 0;
  a.lora_a = lora_a;
  a.lora_b = lora_b;
  a.rank = rank;
  a.rank_pad = (rank + 15) / 16 * 16;
  a.scale = scale;
  a.b_vec = rank % 2 == 0 && reinterpret_cast<uintptr_t>(lora_b) % 4 == 0;
  a.row_groups = (rows + kMrgRows - 1) / kMrgRows;
  a.items = a.row_groups * ((cols + kMrgCols - 1) / kMrgCols);
  // main kernel: 64-column pieces up to r = 64, 32-column pieces (half the A fragments per
  // step) for 65-128
  const int piece_cols = rank <= 64 ? kPieceCols : kPieceCols / 2;
  a.col_pieces = cols / piece_cols;
  a.walkers = 1;
  a.out = out;
  const size_t at_bytes = static_cast<size_t>(kMrgCols) * (a.rank_pad / 2 + 4) * 4;
  // (B's rows in 16-byte runs: required above r = 64, else the 4-byte word loads)
  const bool b16 = rank % 8 == 0 && reinterpret_cast<uintptr_t>(lora_b) % 16 == 0;
  const bool main = (rank <= 64 || (rank <= 128 && b16)) && a.b_vec && rows < (int64_t{1} << 30) &&
                    a.col_pieces < (int64_t{1} << 30);
  // in the main kernel, at ranks up to kTmaMaxRank with B in runs, each warp's block leaves by one
  // bulk tensor store (variant 1 keeps the lanes' stores: staged rows at r <= 16, direct above);
  // the map is encoded only where it is used
  CUtensorMap out_map{};
  const bool tma = variant == 0 && main && b16 && rank <= kTmaMaxRank &&
                   tensor_map_2d(&out_map, out, rows, cols, cols, dtype == DType::kBFloat16,
                                 kPieceRows, kPieceCols);
  // main: walkers warps per 64-column piece, as many as stay resident together (the last CTA's
  // spare warps exit); any: a run of items per resident CTA
  auto launch = [&](auto* kernel, bool is_main, size_t main_smem = kPairTableBytes) -> cudaError_t {
    // (the main kernel reads A from global memory; its shared memory is the pair table, and with
    // bulk stores the staging blocks)
    const size_t smem = is_main ? main_smem : at_bytes;
    if (smem > 48 * 1024) {
      const cudaError_t e = cudaFuncSetAttribute(
          kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
      if (e != cudaSuccess) return e;
    }
    int resident = 0;
    const cudaError_t e =
        resident_ctas(reinterpret_cast<const void*>(kernel), kMrgThreads, smem, &resident);
    if (e != cudaSuccess) return e;
    int64_t grid = std::min<int64_t>(a.items, resident);
    if (is_main) {
      const int64_t warps = static_cast<int64_t>(resident) * (kMrgThreads / 32);
      const int64_t row_pieces = (rows + kPieceRows - 1) / kPieceRows;
      a.walkers = static_cast<int>(
          std::max<int64_t>(1, std::min<int64_t>(warps / a.col_pieces, row_pieces)));
      grid = (a.walkers * a.col_pieces + kMrgThreads / 32 - 1) / (kMrgThreads / 32);
    }
    if constexpr (std::is_invocable_v<decltype(kernel), MergeArgs>) {
      return launch_pdl(kernel, dim3(static_cast<unsigned>(grid)), dim3(kMrgThreads), smem, stream,
                        a);
    } else {
      return launch_pdl(kernel, dim3(static_cast<unsigned>(grid)), dim3(kMrgThreads), smem, stream,
                        a, out_map);
    }
  };
  return HOPTUNE_DISPATCH_HALF(dtype, T, [&] {
    if (!main) return launch(nf4_dequantize_lora_any<T>, false);
    auto pick = [&](auto nested_tag) -> cudaError_t {
      constexpr bool kN = decltype(nested_tag)::value;
      if (rank > 64) return launch(nf4_dequantize_lora_kernel<T, kN, 8, 32>, true);
      if (tma) {
        return rank <= 16 ? launch(nf4_dequantize_lora_kernel<T, kN, 1, 64, true, true>, true,
                                   kTmaSmemBytes)
                          : launch(nf4_dequantize_lora_kernel<T, kN, 2, 64, true, true>, true,
                                   kTmaSmemBytes);
      }
      if (b16) {
        return rank <= 16   ? launch(nf4_dequantize_lora_kernel<T, kN, 1>, true)
               : rank <= 32 ? launch(nf4_dequantize_lora_kernel<T, kN, 2>, true)
                            : launch(nf4_dequantize_lora_kernel<T, kN, 4>, true);
      }
      return rank <= 16   ? launch(nf4_dequantize_lora_kernel<T, kN, 1, 64, false>, true)
             : rank <= 32 ? launch(nf4_dequantize_lora_kernel<T, kN, 2, 64, false>, true)
                          : launch(nf4_dequantize_lora_kernel<T, kN, 4, 64, false>, true);
    };
    return nested ? pick(std::true_type{}) : pick(std::false_type{});
  });
}

cudaError_t nf4_small_m(const void* x, int64_t ldx, int m, const uint8_t* packed,
                        const NF4Absmax& absmax, int64_t n, int64_t k, int blocksize,
                        const float* xa, const void* lora_b, int rank, float scale,
                        const void* bias, int slices, float* workspace, int* counters, void* y,
                        DType dtype, cudaStream_t stream) {
  HOPTUNE_REQUIRE(x != nullptr && packed != nullptr && y != nullptr);
  HOPTUNE_REQUIRE(m >= 1 && m <= kSmallMaxM && n > 0 && k > 0 && k % 64 == 0 && ldx >= k &&
                  k < (int64_t{1} << 30));
  HOPTUNE_REQUIRE(valid_state(absmax, blocksize, n * k));
  HOPTUNE_REQUIRE(reinterpret_cast<uintptr_t>(packed) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(x) % 16 == 0 && ldx % 8 == 0);
  HOPTUNE_REQUIRE((xa == nullptr) == (lora_b == nullptr) && (xa == nullptr || rank >= 1));
  HOPTUNE_REQUIRE(dtype == DType::kBFloat16 || dtype == DType::kFloat16);
  const int64_t steps = (k + kSmallStep - 1) / kSmallStep;
  const int64_t groups = (n + kSmallRows - 1) / kSmallRows;
  HOPTUNE_REQUIRE(slices >= 1 && slices <= steps && slices <= 65535 && groups <= 0x7fffffff);
  HOPTUNE_REQUIRE(slices == 1 || (workspace != nullptr && counters != nullptr));
  const bool nested = absmax.qabsmax != nullptr;
  SmallArgs a;
  a.x = x;
  a.ldx = ldx;
  a.m = m;
  a.packed = packed;
  a.am = absmax;
  a.log2_blocksize = ilog2(blocksize);
  a.log2_blocksize2 = nested ? ilog2(absmax.blocksize2) : 0;
  a.n = n;
  a.k = k;
  a.steps = static_cast<int>(steps);
  a.slices = slices;
  a.xa = xa;
  a.lora_b = lora_b;
  a.rank = rank;
  a.scale = scale;
  a.bias = bias;
  a.ws = workspace;
  a.counters = counters;
  a.y = y;
  const dim3 grid(static_cast<unsigned>(groups), static_cast<unsigned>(slices));
  auto launch = [&](auto* kernel) {
    return launch_pdl(kernel, grid, dim3(kSmallThreads), 0, stream, a);
  };
  return HOPTUNE_DISPATCH_HALF(dtype, T, [&] {
    if (nested) {
      if (m <= 8) return launch(nf4_small_m_kernel<T, 1, true>);
      if (m <= 16) return launch(nf4_small_m_kernel<T, 2, true>);
      return launch(nf4_small_m_kernel<T, 4, true>);
    }
    if (m <= 8) return launch(nf4_small_m_kernel<T, 1, false>);
    if (m <= 16) return launch(nf4_small_m_kernel<T, 2, false>);
    return launch(nf4_small_m_kernel<T, 4, false>);
  });
}

cudaError_t nf4_quantize(const void* x, DType dtype, int64_t n, int blocksize, uint8_t* packed,
                         float* absmax, int* bad_flag, cudaStream_t stream) {
  HOPTUNE_REQUIRE(x != nullptr && packed != nullptr && absmax != nullptr && bad_flag != nullptr &&
                  n > 0);
  HOPTUNE_REQUIRE(is_pow2(blocksize) && blocksize >= 64 && blocksize <= 4096 && n % blocksize == 0);
  const int64_t nblocks = n / blocksize;
  const int64_t grid = (nblocks + 7) / 8;  // 8 warps per CTA, one warp per quant block
  HOPTUNE_REQUIRE(grid <= 0x7fffffff);
  return HOPTUNE_DISPATCH_FLOAT(dtype, T, [&] {
    nf4_quantize_kernel<T><<<static_cast<unsigned>(grid), 256, 0, stream>>>(
        static_cast<const T*>(x), nblocks, blocksize, packed, absmax, bad_flag);
    return cudaGetLastError();
  });
}

cudaError_t nf4_quantize_nested(const float* absmax, int64_t nblocks, float offset,
                                const float* code2, int blocksize2, uint8_t* qabsmax,
                                float* absmax2, cudaStream_t stream) {
  HOPTUNE_REQUIRE(absmax && code2 && qabsmax && absmax2 && nblocks > 0 && is_pow2(blocksize2) &&
                  blocksize2 >= 32);
  const int64_t nb2 = (nblocks + blocksize2 - 1) / blocksize2;
  const int64_t grid = (nb2 + 7) / 8;
  nf4_quantize_nested_kernel<<<static_cast<unsigned>(grid), 256, 0, stream>>>(
      absmax, nblocks, offset, code2, blocksize2, qabsmax, absmax2);
  return cudaGetLastError();
}

cudaError_t nf4_absmax_transposed(const NF4Absmax& absmax, int64_t rows, int64_t cols,
                                  int blocksize, float* out, cudaStream_t stream) {
  HOPTUNE_REQUIRE(out != nullptr && rows > 0 && cols > 0 && blocksize > 0 && cols % blocksize == 0);
  HOPTUNE_REQUIRE(valid_state(absmax, blocksize, rows * cols));
  const int64_t kb = cols / blocksize;
  HOPTUNE_REQUIRE((kb + 31) / 32 <= 65535 && (rows + 31) / 32 <= INT32_MAX);
  const bool nested = absmax.qabsmax != nullptr;
  const dim3 grid(static_cast<unsigned>((rows + 31) / 32), static_cast<unsigned>((kb + 31) / 32));
  const dim3 block(32, 8);
  if (nested)
    nf4_absmax_transposed_kernel<true>
        <<<grid, block, 0, stream>>>(absmax, rows, kb, ilog2(absmax.blocksize2), out);
  else
    nf4_absmax_transposed_kernel<false><<<grid, block, 0, stream>>>(absmax, rows, kb, 0, out);
  return cudaGetLastError();
}

}  // namespace hoptune
