// Per-token log-probs: one CTA per row, one pass over the row for the forward.
//
// Each thread keeps an online (max m, s0 = sum e^(z-m), s1 = sum e^(z-m) (z-m)) over its slice of
// the row; slices are merged with a shuffle + shared-memory tree. Keeping s1 relative to m gives
// the entropy as log(s0) - s1/s0 without the cancellation of lse - mean(z). Loads are 16 bytes
// per thread (8 bf16/fp16 or 4+4 fp32), two in flight; rows that are not 16-byte aligned (odd
// vocab sizes, odd strides) take a scalar path. exp is exp2 of a pre-scaled argument (one FFMA),
// and the token kernel sums s1 in that argument's units (2^t t), saving the subtraction z - m.
//
// The backward recomputes p = exp(z' - lse) from the saved lse and writes dlogits in the logits'
// dtype (in place when the caller passes the logits buffer as dlogits: each element is read and
// then written by the same thread), as a pure stream (see "backward").
//
// The fused-chunk kernel works on fp32 logits a GEMM just wrote: pass 1 gathers the row stats,
// pass 2 re-reads the row and writes the softmax part of d logp / d z (-p dz'/dz) as 16-bit
// values over the first half of the same row; a barrier per iteration orders every read of the
// overlapped fp32 words before their overwrite. The one-hot part goes out per row in fp32.
//
// The vocab-chunk kernel serves a caller that walks the vocabulary in column chunks for a block
// of rows (so each chunk of the lm_head weight is read once per row block): exponents are taken
// relative to a per-row shift fixed before the first chunk, so the chunks' sums simply add up
// (no running max to rescale by) and G can be written in the same single read of the chunk, left
// unnormalised; the caller divides G @ W by the final sum. A shift too far below the row's
// largest logit is reported, and the caller falls back to the two-pass path.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <type_traits>

#include "hoptune/common/dispatch.h"
#include "hoptune/logprob.cuh"

namespace hoptune {
namespace {

constexpr int kThreads = 512;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct Stats {
  float m;   // running max
  float s0;  // sum exp(z - m)
  float s1;  // sum exp(z - m) * (z - m)
};

__device__ __forceinline__ Stats stats_empty() {
  return {-INFINITY, 0.f, 0.f};
}

// Rescale a to a new max mn: s1' = c (s1 + s0 (m - mn)), s0' = c s0.
__device__ __forceinline__ void rescale(Stats& a, float mn) {
  if (a.m == -INFINITY) {
    a.m = mn;
    return;
  }
  const float d = a.m - mn;
  const float c = exp2f(d * kLog2e);
  a.s1 = c * (a.s1 + a.s0 * d);
  a.s0 = c * a.s0;
  a.m = mn;
}

__device__ __forceinline__ Stats combine(Stats a, Stats b) {
  const float mn = fmaxf(a.m, b.m);
  if (mn == -INFINITY) return a;
  rescale(a, mn);
  rescale(b, mn);
  return {mn, a.s0 + b.s0, a.s1 + b.s1};
}

// 2^x, approximate (2 ulp), denormal results flushed: the softmax sums need no more.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Stats of raw values z with the temperature folded into the exponent: m is the max of raw z,
// s0 = sum 2^((z - m) c), c = log2(e) / T. s1 = sum 2^((z - m) c) (z - m) (the caller scales s1
// and m by 1/T at the end), or with kExpUnits sum 2^t t for the exponent t = z c - m c that the
// exp already formed (s1 in units of 1 / c: one subtraction less per element).
template <bool kExpUnits, int N>
__device__ __forceinline__ void stats_add_scaled(Stats& st, const float (&z)[N], float c) {
  float gm = z[0];
#pragma unroll
  for (int j = 1; j < N; ++j) gm = fmaxf(gm, z[j]);
  if (gm > st.m) {
    if (st.m != -INFINITY) {
      const float d = st.m - gm;
      const float f = fast_exp2(d * c);
      st.s1 = f * (st.s1 + st.s0 * (kExpUnits ? d * c : d));
      st.s0 *= f;
    }
    st.m = gm;
  }
  // (every value so far -inf, this group's too: m * c would make the exponents -inf + inf = nan)
  const float mc = st.m == -INFINITY ? 0.f : st.m * c;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    const float t = fmaf(z[j], c, -mc);
    const float e = fast_exp2(t);
    st.s0 += e;
    // (clamped: a logit of -inf has e = 0 and must add 0, not 0 * -inf)
    st.s1 = fmaf(e, fmaxf(kExpUnits ? t : z[j] - st.m, -FLT_MAX), st.s1);
  }
}

// Merge for stats_add_scaled (c and kExpUnits as there).
template <bool kExpUnits>
__device__ __forceinline__ Stats combine_scaled(Stats a, Stats b, float c) {
  const float mn = fmaxf(a.m, b.m);
  if (mn == -INFINITY) return a;
  Stats r{mn, 0.f, 0.f};
  if (a.m != -INFINITY) {
    const float d = a.m - mn, f = fast_exp2(d * c);
    r.s0 += f * a.s0;
    r.s1 += f * (a.s1 + a.s0 * (kExpUnits ? d * c : d));
  }
  if (b.m != -INFINITY) {
    const float d = b.m - mn, f = fast_exp2(d * c);
    r.s0 += f * b.s0;
    r.s1 += f * (b.s1 + b.s0 * (kExpUnits ? d * c : d));
  }
  return r;
}

template <bool kExpUnits, int kBlock>
__device__ Stats block_stats_scaled(Stats st, float c) {
  __shared__ Stats warp_st[kBlock / 32];
  __shared__ Stats result;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    Stats other{__shfl_xor_sync(0xffffffffu, st.m, o), __shfl_xor_sync(0xffffffffu, st.s0, o),
                __shfl_xor_sync(0xffffffffu, st.s1, o)};
    st = combine_scaled<kExpUnits>(st, other, c);
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) warp_st[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < kBlock / 32 ? warp_st[lane] : stats_empty();
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      Stats other{__shfl_xor_sync(0xffffffffu, st.m, o), __shfl_xor_sync(0xffffffffu, st.s0, o),
                  __shfl_xor_sync(0xffffffffu, st.s1, o)};
      st = combine_scaled<kExpUnits>(st, other, c);
    }
    if (lane == 0) result = st;
  }
  __syncthreads();
  return result;
}

template <int N>
__device__ __forceinline__ void stats_add(Stats& st, const float (&z)[N]) {
  float gm = z[0];
#pragma unroll
  for (int j = 1; j < N; ++j) gm = fmaxf(gm, z[j]);
  if (gm > st.m) rescale(st, gm);
  const float ml = st.m == -INFINITY ? 0.f : st.m * kLog2e;  // (as in stats_add_scaled)
#pragma unroll
  for (int j = 0; j < N; ++j) {
    const float e = exp2f(fmaf(z[j], kLog2e, -ml));
    st.s0 += e;
    // (clamped: a logit of -inf has e = 0 and must add 0, not 0 * -inf)
    st.s1 = fmaf(e, fmaxf(z[j] - st.m, -FLT_MAX), st.s1);
  }
}

// Block-wide merge; every thread gets the result.
template <int kBlock = kThreads>
__device__ Stats block_stats(Stats st) {
  __shared__ Stats warp_st[kBlock / 32];
  __shared__ Stats result;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    Stats other{__shfl_xor_sync(0xffffffffu, st.m, o), __shfl_xor_sync(0xffffffffu, st.s0, o),
                __shfl_xor_sync(0xffffffffu, st.s1, o)};
    st = combine(st, other);
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) warp_st[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < static_cast<int>(blockDim.x >> 5) ? warp_st[lane] : stats_empty();
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      Stats other{__shfl_xor_sync(0xffffffffu, st.m, o), __shfl_xor_sync(0xffffffffu, st.s0, o),
                  __shfl_xor_sync(0xffffffffu, st.s1, o)};
      st = combine(st, other);
    }
    if (lane == 0) result = st;
  }
  __syncthreads();
  return result;
}

// 8 consecutive elements as floats, one 16-byte load for 16-bit types, two for fp32.
template <typename T>
struct Vec8;
template <>
struct Vec8<__nv_bfloat16> {
  __device__ __forceinline__ static void load(const __nv_bfloat16* p, float (&v)[8]) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(h[i]);
      v[2 * i] = f.x;
      v[2 * i + 1] = f.y;
    }
  }
  __device__ __forceinline__ static void store(__nv_bfloat16* p, const float (&v)[8]) {
    uint4 u;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
    *reinterpret_cast<uint4*>(p) = u;
  }
};
template <>
struct Vec8<__half> {
  __device__ __forceinline__ static void load(const __half* p, float (&v)[8]) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(h[i]);
      v[2 * i] = f.x;
      v[2 * i + 1] = f.y;
    }
  }
  __device__ __forceinline__ static void store(__half* p, const float (&v)[8]) {
    uint4 u;
    __half2* h = reinterpret_cast<__half2*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
    *reinterpret_cast<uint4*>(p) = u;
  }
};
template <>
struct Vec8<float> {
  __device__ __forceinline__ static void load(const float* p, float (&v)[8]) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  }
  __device__ __forceinline__ static void store(float* p, const float (&v)[8]) {
    reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
};

__device__ __forceinline__ int64_t row_offset(const LogitsView& v, int64_t row) {
  const int64_t b = row / v.seq, t = row - b * v.seq;
  return b * v.stride_b + t * v.stride_t;
}

template <typename T, bool kVec, int kRowThreads, bool kExpUnits>
__global__ void __launch_bounds__(kRowThreads) token_logprobs_fwd_kernel(TokenLogprobFwd a) {
  const int64_t row = blockIdx.x;
  const int64_t y = a.labels[row];
  if (y == a.ignore_index) {
    if (threadIdx.x == 0) {
      a.logp[row] = 0.f;
      a.lse[row] = 0.f;
      if (a.entropy) a.entropy[row] = 0.f;
    }
    return;
  }
  const T* z = static_cast<const T*>(a.logits.ptr) + row_offset(a.logits, row);
  const int64_t V = a.logits.vocab;
  const float it = a.inv_temperature;
  const float c = kLog2e * it;  // the temperature rides in the exponent: one FFMA per element
  Stats st = stats_empty();
  if (kVec) {
    constexpr int kU = 4;  // 16-byte loads in flight per thread
    const int64_t groups = V / 8;
    int64_t g = threadIdx.x;
    for (; g + (kU - 1) * kRowThreads < groups; g += kU * kRowThreads) {
      float v[kU][8];
#pragma unroll
      for (int u = 0; u < kU; ++u) Vec8<T>::load(z + 8 * (g + u * kRowThreads), v[u]);
#pragma unroll
      for (int u = 0; u < kU; ++u) stats_add_scaled<kExpUnits>(st, v[u], c);
    }
    for (; g < groups; g += kRowThreads) {
      float v0[8];
      Vec8<T>::load(z + 8 * g, v0);
      stats_add_scaled<kExpUnits>(st, v0, c);
    }
  } else {
    for (int64_t i = threadIdx.x; i < V; i += kRowThreads) {
      float v0[1] = {to_float(z[i])};
      stats_add_scaled<kExpUnits>(st, v0, c);
    }
  }
  st = block_stats_scaled<kExpUnits, kRowThreads>(st, c);
  if (threadIdx.x == 0) {
    // in units of z' = z / T: max m' = m it, log s0 is natural, s1' = s1 it (s1 / c it = s1 ln 2
    // with kExpUnits)
    const float log_s0 = logf(st.s0);
    // a label outside [0, V) (labels unchecked by the caller) reads no memory: its logp is nan
    const float zy = y >= 0 && y < V ? to_float(z[y]) : NAN;
    a.logp[row] = (zy - st.m) * it - log_s0;
    a.lse[row] = st.m * it + log_s0;
    if (a.entropy) a.entropy[row] = log_s0 - (kExpUnits ? kLn2 : it) * st.s1 / st.s0;
  }
}

// --- backward -------------------------------------------------------------------------------
// The backward has no reduction: it reads each logit once and writes one gradient, so it can
// only be as fast as a copy of the logits. The kernel is built for that:
// each thread keeps kU 16-byte loads in flight (all issued before any is used: the compiler may
// not hoist a later load above a store that could alias it), the one-hot term is tested once
// per round and ignore_index once per CTA instead of per element, the row's scalars are loaded
// together with the first round of data (no dependent-load chain before the stream starts), and
// each 16-byte unit is stored with one 16-byte store. Its configuration (BwdCfg: threads per
// CTA, loads in flight, cache hints; and tiles per row) was chosen by measurement.

// kThreads threads per CTA, kU units in flight per thread, ptxas asked to fit kMinBlocks CTAs
// per SM (a register cap: occupancy is what keeps bytes in flight), kStream: evict-first loads
// and stores (each byte is touched once; L2 need not keep it).
template <int kThreads_, int kU_, int kMinBlocks_, bool kStream_>
struct BwdCfg {
  static constexpr int kThreads = kThreads_, kU = kU_, kMinBlocks = kMinBlocks_;
  static constexpr bool kStream = kStream_;
};

// Two 16-bit values in one 32-bit word, to and from fp32 (round to nearest even).
template <typename T>
struct Pair;
template <>
struct Pair<__nv_bfloat16> {
  __device__ __forceinline__ static float2 unpack(uint32_t w) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w));
  }
  __device__ __forceinline__ static uint32_t pack(float a, float b) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
};
template <>
struct Pair<__half> {
  __device__ __forceinline__ static float2 unpack(uint32_t w) {
    return __half22float2(*reinterpret_cast<const __half2*>(&w));
  }
  __device__ __forceinline__ static uint32_t pack(float a, float b) {
    const __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
};

// A unit of work: 16 bytes (N = 16 / sizeof(T) elements, kept packed while the load is in
// flight) on the vector path, one element on the scalar path (the unaligned fallback, which
// takes no cache hints). Rows are addressed as arrays of Raw: a uint4 access at an address
// formed in T units can reach the PTX as four 4-byte accesses, and with the thread's first unit
// as base every other unit of a round is a constant offset.
template <typename T, bool kVec>
struct BwdUnit;
template <typename T>
struct BwdUnit<T, true> {
  using Raw = uint4;
  static constexpr int N = 16 / sizeof(T);
  template <bool kStream>
  __device__ __forceinline__ static Raw load(const Raw* p) {
    if constexpr (kStream) {
      // __ldcs without its volatile, so that the compiler may predicate it and fold the
      // address like a plain load's (each address is read once, before its only store)
      Raw r;
      asm("ld.global.cs.v4.u32 {%0, %1, %2, %3}, [%4];"
          : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
          : "l"(p));
      return r;
    }
    return *p;
  }
  template <bool kStream>
  __device__ __forceinline__ static void store(Raw* p, Raw r) {
    if constexpr (kStream) {
      __stcs(p, r);
    } else {
      *p = r;
    }
  }
  __device__ __forceinline__ static void unpack(const Raw& r, float (&v)[N]) {
    const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if constexpr (std::is_same<T, float>::value) {
        v[k] = __uint_as_float(w[k]);
      } else {
        const float2 f = Pair<T>::unpack(w[k]);
        v[2 * k] = f.x;
        v[2 * k + 1] = f.y;
      }
    }
  }
  __device__ __forceinline__ static Raw pack(const float (&v)[N]) {
    if constexpr (std::is_same<T, float>::value) {
      return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]),
                        __float_as_uint(v[3]));
    } else {
      return make_uint4(Pair<T>::pack(v[0], v[1]), Pair<T>::pack(v[2], v[3]),
                        Pair<T>::pack(v[4], v[5]), Pair<T>::pack(v[6], v[7]));
    }
  }
  __device__ __forceinline__ static Raw zero() { return make_uint4(0u, 0u, 0u, 0u); }
};
template <typename T>
struct BwdUnit<T, false> {
  using Raw = T;
  static constexpr int N = 1;
  template <bool kStream>
  __device__ __forceinline__ static Raw load(const Raw* p) {
    return *p;
  }
  template <bool kStream>
  __device__ __forceinline__ static void store(Raw* p, Raw r) {
    *p = r;
  }
  __device__ __forceinline__ static void unpack(const Raw& r, float (&v)[1]) { v[0] = to_float(r); }
  __device__ __forceinline__ static Raw pack(const float (&v)[1]) { return from_float<T>(v[0]); }
  __device__ __forceinline__ static Raw zero() { return from_float<T>(0.f); }
};

// One row's backward constants; per element the same arithmetic as token_logprobs_bwd_kernel.
struct BwdRow {
  float c, lse2, it, lse, k0, k1, gl;
  int yu;  // the unit holding the label (-1: none)
  int jy;  // the label's place in that unit
};

// The kU units of one thread in a round: i, i + kThreads, ... (those at or past end skipped).
// Every round is guarded, the last one of a row and the full ones alike: one compare per unit,
// and one loop body (with an unguarded copy of it for the full rounds, ptxas spills).
template <class U, int kThreads, int kU, bool kStream>
__device__ __forceinline__ void bwd_load(typename U::Raw (&q)[kU], const typename U::Raw* z, int i,
                                         int end) {
  const typename U::Raw* p = z + i;
#pragma unroll
  for (int u = 0; u < kU; ++u)
    q[u] = i + u * kThreads < end ? U::template load<kStream>(p + u * kThreads) : U::zero();
}

template <class U, int kThreads, int kU, bool kStream>
__device__ __forceinline__ void bwd_store(const typename U::Raw (&q)[kU], typename U::Raw* dz,
                                          int i, int end) {
  typename U::Raw* p = dz + i;
#pragma unroll
  for (int u = 0; u < kU; ++u)
    if (i + u * kThreads < end) U::template store<kStream>(p + u * kThreads, q[u]);
}

// kLabel: unit dy of the round (0 <= dy < kU kThreads, a multiple of kThreads for this thread)
// holds the label, at place r.jy.
template <class U, int kThreads, int kU, bool kLabel>
__device__ __forceinline__ void bwd_grad_round(typename U::Raw (&q)[kU], const BwdRow& r, int dy) {
#pragma unroll
  for (int u = 0; u < kU; ++u) {
    float v[U::N];
    U::unpack(q[u], v);
#pragma unroll
    for (int j = 0; j < U::N; ++j) {
      const float p = fast_exp2(fmaf(v[j], r.c, -r.lse2));
      const float lp = fmaf(v[j], r.it, -r.lse);
      // (lp clamped: a logit of -inf has p = 0 and must give 0, not 0 * -inf; at -1e30 the
      // product with k1 stays finite unless the entropy's gradient passes 3e8)
      v[j] = p * fmaf(r.k1, fmaxf(lp, -1e30f), r.k0);
      if (kLabel && dy == u * kThreads && j == r.jy) v[j] = fmaf(r.gl, r.it, v[j]);
    }
    q[u] = U::pack(v);
  }
}

// The units of one round, i the thread's first: one test per round for the label, so the rounds
// without it (all but one per row) run straight-line code.
template <class U, int kThreads, int kU>
__device__ __forceinline__ void bwd_grad(typename U::Raw (&q)[kU], int i, const BwdRow& r) {
  const int dy = r.yu - i;
  if (static_cast<unsigned>(dy) < static_cast<unsigned>(kU * kThreads)) {
    bwd_grad_round<U, kThreads, kU, true>(q, r, dy);
  } else {
    bwd_grad_round<U, kThreads, kU, false>(q, r, dy);
  }
}

// CTA b handles units [t * tile, min((t + 1) * tile, units)) of row b / tiles, t = b % tiles:
// tiles = 1 is one CTA per row; with several, consecutive CTAs (resident together) stream
// adjacent memory and each CTA is short, so the last wave leaves little of the GPU idle. Unit
// indices are 32-bit (the launcher rejects rows of 2^30 elements or more): fewer registers for
// the loop state.
template <typename T, bool kVec, class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks)
    token_logprobs_bwd_stream_kernel(TokenLogprobBwd a, unsigned tiles, int tile) {
  using U = BwdUnit<T, kVec>;
  constexpr int kT = Cfg::kThreads, kU = Cfg::kU;
  constexpr bool kS = Cfg::kStream;
  const unsigned row = blockIdx.x / tiles;  // the only division, once per CTA
  const int units = static_cast<int>(a.logits.vocab / U::N);
  const int begin = static_cast<int>(blockIdx.x - row * tiles) * tile;
  const int end = units - begin > tile ? begin + tile : units;
  // every scalar of the row is read unconditionally (valid for ignored rows too), so none of
  // the loads waits for the label
  const int64_t y = a.labels[row];
  const float lse = a.lse[row], gl = a.grad_logp[row];
  const float gh = a.grad_entropy ? a.grad_entropy[row] : 0.f;
  const float H = a.entropy ? a.entropy[row] : 0.f;
  // row_offset with a 32-bit division (rows < 2^31, so seq < 2^31 too)
  const unsigned seq = static_cast<unsigned>(a.logits.seq);
  const unsigned b = row / seq, t = row - b * seq;
  const int64_t off =
      static_cast<int64_t>(b) * a.logits.stride_b + static_cast<int64_t>(t) * a.logits.stride_t;
  using Raw = typename U::Raw;
  const Raw* z = reinterpret_cast<const Raw*>(static_cast<const T*>(a.logits.ptr) + off);
  Raw* dz = reinterpret_cast<Raw*>(static_cast<T*>(a.dlogits) + off);
  // the first round's data loads go out before the label is known (an ignored row reads one
  // round for nothing), so a CTA never waits on its row's scalars with no data in flight
  int i = begin + static_cast<int>(threadIdx.x);
  Raw q[kU];
  bwd_load<U, kT, kU, kS>(q, z, i, end);
  const bool ignored = y == a.ignore_index;
  const float it = a.inv_temperature;
  BwdRow r;
  r.c = it * kLog2e;
  r.lse2 = lse * kLog2e;
  r.it = it;
  r.lse = lse;
  r.k0 = -(gl + gh * H) * it;
  r.k1 = -gh * it;
  r.gl = gl;
  // a label outside [0, V) matches no element
  const bool in_row = y >= 0 && y < a.logits.vocab;
  r.yu = in_row ? static_cast<int>(y / U::N) : -1;
  r.jy = in_row ? static_cast<int>(y % U::N) : 0;
  bwd_grad<U, kT, kU>(q, i, r);
  if (ignored) {  // uniform over the CTA: zeros, and no more reads
#pragma unroll
    for (int u = 0; u < kU; ++u) q[u] = U::zero();
  }
  bwd_store<U, kT, kU, kS>(q, dz, i, end);
  i += kU * kT;
  if (ignored) {
    for (; i < end; i += kT) U::template store<kS>(dz + i, U::zero());
    return;
  }
  for (; i < end; i += kU * kT) {
    bwd_load<U, kT, kU, kS>(q, z, i, end);
    bwd_grad<U, kT, kU>(q, i, r);
    bwd_store<U, kT, kU, kS>(q, dz, i, end);
  }
}

// --- fused chunk ----------------------------------------------------------------------------
struct Transform {
  const float* bias;
  float scale, softcap, it;
  // z' and dz'/dz for one raw logit
  __device__ __forceinline__ float operator()(float z, int64_t v, float* deriv) const {
    if (bias) z += bias[v];
    z *= scale;
    float d = scale * it;
    if (softcap > 0.f) {
      const float t = tanhf(z / softcap);
      z = softcap * t;
      d *= 1.f - t * t;
    }
    *deriv = d;
    return z * it;
  }
};

template <typename G, bool kVec>
__global__ void __launch_bounds__(kThreads) fused_logprob_chunk_kernel(FusedLogprobChunk a) {
  const int64_t row = blockIdx.x;
  float* z = a.buf + row * a.ld;
  const int64_t V = a.vocab;
  const int64_t y = a.labels[row];
  const Transform tf{a.bias, a.logit_scale, a.softcap, a.inv_temperature};
  float dummy;
  Stats st = stats_empty();
  if (kVec) {
    const int64_t groups = V / 4;
    for (int64_t g = threadIdx.x; g < groups; g += kThreads) {
      const float4 q = reinterpret_cast<const float4*>(z)[g];
      float v[4] = {tf(q.x, 4 * g, &dummy), tf(q.y, 4 * g + 1, &dummy), tf(q.z, 4 * g + 2, &dummy),
                    tf(q.w, 4 * g + 3, &dummy)};
      stats_add(st, v);
    }
  } else {
    for (int64_t i = threadIdx.x; i < V; i += kThreads) {
      float v[1] = {tf(z[i], i, &dummy)};
      stats_add(st, v);
    }
  }
  st = block_stats(st);
  const float log_s0 = logf(st.s0);
  const float lse = st.m + log_s0;
  const float rs = a.row_scale ? a.row_scale[row] : 1.f;
  if (threadIdx.x == 0) {
    float dy = 0.f;  // (a label outside [0, V) reads no memory: nan logp, no one-hot part)
    a.logp[row] = (y >= 0 && y < V ? tf(z[y], y, &dy) : NAN) - lse;
    a.lse[row] = lse;
    if (a.entropy) a.entropy[row] = log_s0 - st.s1 / st.s0;
    if (a.write_grad) a.label_coef[row] = rs * dy;
  }
  if (!a.write_grad) return;
  __syncthreads();  // z[y] above is read before pass 2 overwrites the row
  G* out = reinterpret_cast<G*>(z);
  const float nrs = -rs;
  auto grad = [&](float raw, int64_t v) -> float {
    float d;
    const float zp = tf(raw, v, &d);
    return nrs * exp2f((zp - lse) * kLog2e) * d;
  };
  if (kVec) {
    const int64_t groups = V / 4;
    for (int64_t base = 0; base < groups; base += kThreads) {
      const int64_t g = base + threadIdx.x;
      float4 q = make_float4(0.f, 0.f, 0.f, 0.f);
      if (g < groups) q = reinterpret_cast<const float4*>(z)[g];
      __syncthreads();
      if (g < groups) {
        const float r0 = grad(q.x, 4 * g), r1 = grad(q.y, 4 * g + 1), r2 = grad(q.z, 4 * g + 2),
                    r3 = grad(q.w, 4 * g + 3);
        if constexpr (std::is_same<G, float>::value) {
          reinterpret_cast<float4*>(out)[g] =
              make_float4(r0, r1, r2, r3);  // same words: no overlap
        } else if constexpr (std::is_same<G, __nv_bfloat16>::value) {
          __nv_bfloat162 h[2] = {__floats2bfloat162_rn(r0, r1), __floats2bfloat162_rn(r2, r3)};
          reinterpret_cast<uint2*>(out)[g] = *reinterpret_cast<uint2*>(h);
        } else {
          __half2 h[2] = {__floats2half2_rn(r0, r1), __floats2half2_rn(r2, r3)};
          reinterpret_cast<uint2*>(out)[g] = *reinterpret_cast<uint2*>(h);
        }
      }
    }
  } else {
    for (int64_t base = 0; base < V; base += kThreads) {
      const int64_t i = base + threadIdx.x;
      const float raw = i < V ? z[i] : 0.f;
      __syncthreads();
      if (i < V) out[i] = from_float<G>(grad(raw, i));
    }
  }
}

// Single-pass variant: z' - z'_y replaces z' - max, so stats and G come from one read of the row.
template <typename G, bool kVec>
__global__ void __launch_bounds__(kThreads) fused_logprob_shifted_kernel(FusedLogprobChunk a) {
  __shared__ float s_zy, s_dy;
  __shared__ float partial[2][kThreads / 32];
  const int64_t row = blockIdx.x;
  float* z = a.buf + row * a.ld;
  const int64_t V = a.vocab;
  const int64_t y = a.labels[row];
  const Transform tf{a.bias, a.logit_scale, a.softcap, a.inv_temperature};
  if (threadIdx.x == 0) {
    float dy = 0.f;  // (a label outside [0, V): nan, which the overflow flag reports)
    s_zy = y >= 0 && y < V ? tf(z[y], y, &dy) : NAN;
    s_dy = dy;
  }
  __syncthreads();
  const float zy = s_zy;
  const float nrs = -(a.row_scale ? a.row_scale[row] : 1.f);
  G* out = reinterpret_cast<G*>(z);
  float s0 = 0.f, s1 = 0.f;
  auto one = [&](float raw, int64_t v) -> float {
    float d;
    const float t = tf(raw, v, &d) - zy;
    const float e = exp2f(t * kLog2e);
    s0 += e;
    s1 = fmaf(e, fmaxf(t, -FLT_MAX), s1);  // (a logit of -inf adds 0)
    return nrs * e * d;
  };
  if (kVec) {
    const int64_t groups = V / 4;
    for (int64_t base = 0; base < groups; base += kThreads) {
      const int64_t g = base + threadIdx.x;
      float4 q = make_float4(0.f, 0.f, 0.f, 0.f);
      if (g < groups) q = reinterpret_cast<const float4*>(z)[g];
      if (a.write_grad)
        __syncthreads();  // every read of the words this iteration overwrites is done
      if (g < groups) {
        const float r0 = one(q.x, 4 * g), r1 = one(q.y, 4 * g + 1), r2 = one(q.z, 4 * g + 2),
                    r3 = one(q.w, 4 * g + 3);
        if (a.write_grad) {
          if constexpr (std::is_same<G, float>::value) {
            reinterpret_cast<float4*>(out)[g] = make_float4(r0, r1, r2, r3);
          } else {
            __nv_bfloat162 h[2] = {__floats2bfloat162_rn(r0, r1), __floats2bfloat162_rn(r2, r3)};
            reinterpret_cast<uint2*>(out)[g] = *reinterpret_cast<uint2*>(h);
          }
        }
      }
    }
  } else {
    for (int64_t base = 0; base < V; base += kThreads) {
      const int64_t i = base + threadIdx.x;
      const float raw = i < V ? z[i] : 0.f;
      if (a.write_grad) __syncthreads();
      if (i < V) {
        const float r = one(raw, i);
        if (a.write_grad) out[i] = from_float<G>(r);
      }
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    s0 += __shfl_xor_sync(0xffffffffu, s0, o);
    s1 += __shfl_xor_sync(0xffffffffu, s1, o);
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) partial[0][warp] = s0, partial[1][warp] = s1;
  __syncthreads();
  if (threadIdx.x == 0) {
    s0 = s1 = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) s0 += partial[0][w], s1 += partial[1][w];
    const float log_s0 = logf(s0);
    a.logp[row] = -log_s0;
    a.lse[row] = zy + log_s0;
    if (a.entropy) a.entropy[row] = log_s0 - s1 / s0;
    if (a.write_grad) a.label_coef[row] = -nrs * s_dy;
    a.row_norm[row] = 1.f / s0;
    if (!(s0 < INFINITY)) atomicOr(a.overflow, 1);  // inf or NaN
  }
}

// Vocab-chunk variant: the shifted kernel over columns [col0, col0 + cols) of a row, the shift
// given (ref) rather than read, its sums added to the row's running s0, s1. t <= 64 bounds every
// e^t by 6.2e27, so the sums over a whole vocabulary, the 16-bit G and G @ W stay finite; past
// that the row is flagged. A row is 32 KiB at 8192 columns: 256 threads give each 8 float4.
constexpr int kVThreads = 256;
constexpr float kMaxShift = 64.f;

template <typename G, bool kVec>
__global__ void __launch_bounds__(kVThreads) fused_logprob_vchunk_kernel(FusedLogprobVChunk a) {
  __shared__ float partial[3][kVThreads / 32];
  const int64_t row = blockIdx.x;
  float* z = a.buf + row * a.ld;
  const int64_t C = a.cols, c0 = a.col0;
  const Transform tf{a.bias, a.logit_scale, a.softcap, a.inv_temperature};
  const float ref = a.ref[row];
  const float rs = a.row_scale ? a.row_scale[row] : 1.f;
  if (threadIdx.x == 0) {
    // read before thread 0 reaches the loop's first barrier, after which G overwrites the row
    const int64_t y = a.labels[row];
    if (y >= c0 && y - c0 < C) {
      float dy;
      a.label_logit[row] = tf(z[y - c0], y, &dy);
      if (a.write_grad) a.label_coef[row] = rs * dy;
    }
  }
  const float nrs = -rs;
  G* out = reinterpret_cast<G*>(z);
  float s0 = 0.f, s1 = 0.f;
  bool big = false;
  auto one = [&](float raw, int64_t v) -> float {
    float d;
    const float t = tf(raw, v, &d) - ref;
    big |= t > kMaxShift;
    const float e = exp2f(t * kLog2e);
    s0 += e;
    s1 = fmaf(e, fmaxf(t, -FLT_MAX), s1);  // (a logit of -inf adds 0)
    return nrs * e * d;
  };
  if (kVec) {
    const int64_t groups = C / 4;
    for (int64_t base = 0; base < groups; base += kVThreads) {
      const int64_t g = base + threadIdx.x;
      float4 q = make_float4(0.f, 0.f, 0.f, 0.f);
      if (g < groups) q = reinterpret_cast<const float4*>(z)[g];
      if (a.write_grad)
        __syncthreads();  // every read of the words this iteration overwrites is done
      if (g < groups) {
        const int64_t v = c0 + 4 * g;
        const float r0 = one(q.x, v), r1 = one(q.y, v + 1), r2 = one(q.z, v + 2),
                    r3 = one(q.w, v + 3);
        if (a.write_grad) {
          if constexpr (std::is_same<G, float>::value) {
            reinterpret_cast<float4*>(out)[g] = make_float4(r0, r1, r2, r3);
          } else {
            __nv_bfloat162 h[2] = {__floats2bfloat162_rn(r0, r1), __floats2bfloat162_rn(r2, r3)};
            reinterpret_cast<uint2*>(out)[g] = *reinterpret_cast<uint2*>(h);
          }
        }
      }
    }
  } else {
    for (int64_t base = 0; base < C; base += kVThreads) {
      const int64_t i = base + threadIdx.x;
      const float raw = i < C ? z[i] : 0.f;
      if (a.write_grad) __syncthreads();
      if (i < C) {
        const float r = one(raw, c0 + i);
        if (a.write_grad) out[i] = from_float<G>(r);
      }
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    s0 += __shfl_xor_sync(0xffffffffu, s0, o);
    s1 += __shfl_xor_sync(0xffffffffu, s1, o);
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const bool warp_big = __any_sync(0xffffffffu, big);
  if (lane == 0) partial[0][warp] = s0, partial[1][warp] = s1, partial[2][warp] = warp_big;
  __syncthreads();
  if (threadIdx.x == 0) {
    s0 = s1 = 0.f;
    bool any_big = false;
    for (int w = 0; w < kVThreads / 32; ++w)
      s0 += partial[0][w], s1 += partial[1][w], any_big |= partial[2][w] != 0.f;
    // one CTA per row and chunks in stream order: a plain read-add-write is race-free
    if (a.accumulate) s0 += a.s0[row], s1 += a.s1[row];
    a.s0[row] = s0;
    a.s1[row] = s1;
    if (any_big || !isfinite(s0) || !isfinite(s1)) atomicOr(a.overflow, 1);
  }
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

size_t dtype_size(DType d) {
  return d == DType::kFloat32 ? 4 : 2;
}

bool vector_ok(const LogitsView& v) {
  const size_t es = dtype_size(v.dtype);
  return aligned16(v.ptr) && v.vocab % 8 == 0 && (v.stride_b * es) % 16 == 0 &&
         (v.stride_t * es) % 16 == 0;
}

// ---- the row-wise steps around the fused lm_head GEMM -------------------------------------------
// shift: one warp per row, 16-byte loads of the hidden row and its label's lm_head row; bf16
// products are exact in fp32, accumulated by FMA in fp32.
constexpr int kShiftWarps = 8;

__global__ void __launch_bounds__(kShiftWarps * 32)
    fused_gemm_shift_kernel(FusedLogprobGemmRows a) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kShiftWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= a.rows) return;
  const int64_t y = a.labels[row];
  if (y < 0 || y >= a.vocab) {
    if (lane == 0) a.shift[row] = NAN;
    return;
  }
  const uint4* hp =
      reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(a.h) + row * a.ldh);
  const uint4* wp =
      reinterpret_cast<const uint4*>(static_cast<const __nv_bfloat16*>(a.w) + y * a.ldw);
  const int64_t n = a.k / 8;
  float s = 0.f;
#pragma unroll 4
  for (int64_t j = lane; j < n; j += 32) {
    const uint4 hv = __ldg(hp + j), wv = __ldg(wp + j);
    const __nv_bfloat162* h2 = reinterpret_cast<const __nv_bfloat162*>(&hv);
    const __nv_bfloat162* w2 = reinterpret_cast<const __nv_bfloat162*>(&wv);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const float2 hf = __bfloat1622float2(h2[q]), wf = __bfloat1622float2(w2[q]);
      s = fmaf(hf.x, wf.x, s);
      s = fmaf(hf.y, wf.y, s);
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (lane == 0) a.shift[row] = a.scale * s;
}

// finish: kFinRows rows per CTA. The per-tile sums of those rows (kFinRows consecutive floats per
// tile) are summed in a fixed order (per thread, then warps, then the CTA), so s0 is the same
// bits on every run; then the rows of acc are finished in place with float4 / 4 x bf16 loads.
constexpr int kFinRows = 4, kFinThreads = 256;

__global__ void __launch_bounds__(kFinThreads) fused_gemm_finish_kernel(FusedLogprobGemmRows a) {
  __shared__ float red[kFinThreads / 32][kFinRows];
  __shared__ float coef[kFinRows];
  __shared__ int64_t label[kFinRows];
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kFinRows;
  const int nr = static_cast<int>(min(static_cast<int64_t>(kFinRows), a.rows - r0));
  float s[kFinRows] = {};
  for (int64_t p = threadIdx.x; p < a.n_partial; p += kFinThreads) {
    const float4 v = *reinterpret_cast<const float4*>(a.partial + p * a.ldp + r0);
    s[0] += v.x;
    s[1] += v.y;
    s[2] += v.z;
    s[3] += v.w;
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int j = 0; j < kFinRows; ++j) {
#pragma unroll
    for (int o = 16; o > 0; o /= 2) s[j] += __shfl_xor_sync(0xffffffffu, s[j], o);
    if (lane == 0) red[warp][j] = s[j];
  }
  __syncthreads();
  if (threadIdx.x < nr) {
    const int j = threadIdx.x;
    const int64_t row = r0 + j;
    float s0 = a.tail ? a.tail[row] : 0.f;
#pragma unroll
    for (int w = 0; w < kFinThreads / 32; ++w) s0 += red[w][j];
    const float log_s0 = logf(s0);
    a.logp[row] = -log_s0;
    a.lse[row] = a.shift[row] + log_s0;
    if (!(s0 <= a.max_s0) || isnan(a.shift[row])) atomicOr(a.overflow, 1);
    coef[j] = -a.scale / s0;
    const int64_t y = a.labels[row];
    label[j] = (y >= 0 && y < a.vocab) ? y : -1;
  }
  if (!a.acc) return;
  __syncthreads();
  const int64_t n4 = a.k / 4;
  for (int64_t idx = threadIdx.x; idx < nr * n4; idx += kFinThreads) {
    const int j = static_cast<int>(idx / n4);
    const int64_t c4 = idx - j * n4;
    float4* ap = reinterpret_cast<float4*>(a.acc + (r0 + j) * a.ld_acc) + c4;
    float4 v = *ap;
    if (label[j] < 0) {
      v = make_float4(NAN, NAN, NAN, NAN);
    } else {
      const uint2 wv = __ldg(reinterpret_cast<const uint2*>(static_cast<const __nv_bfloat16*>(a.w) +
                                                            label[j] * a.ldw) +
                             c4);
      const float2 w01 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&wv.x));
      const float2 w23 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&wv.y));
      const float c = coef[j];
      v.x = fmaf(c, v.x, a.scale * w01.x);
      v.y = fmaf(c, v.y, a.scale * w01.y);
      v.z = fmaf(c, v.z, a.scale * w23.x);
      v.w = fmaf(c, v.w, a.scale * w23.y);
    }
    *ap = v;
  }
}

// scale_rows: one float4 of J per thread, one vector store of the rounded values.
template <typename T>
__global__ void __launch_bounds__(256) scale_rows_kernel(ScaleRows a) {
  const int64_t k4 = a.k / 4;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  if (idx >= a.rows * k4) return;
  const int64_t row = idx / k4, c4 = idx - row * k4;
  const float s = a.row_scale[row];
  const float4 v = *(reinterpret_cast<const float4*>(a.j + row * a.ld_j) + c4);
  struct alignas(4 * sizeof(T)) Pack {
    T x[4];
  } o;
  o.x[0] = from_float<T>(v.x * s);
  o.x[1] = from_float<T>(v.y * s);
  o.x[2] = from_float<T>(v.z * s);
  o.x[3] = from_float<T>(v.w * s);
  reinterpret_cast<Pack*>(static_cast<T*>(a.out) + row * a.k)[c4] = o;  // one 8- or 16-byte store
}

// label_stats: one CTA walks the labels (a few microseconds at 16k tokens: it stands in for
// half a dozen elementwise ops and a reduction on the path to the host's sync).
constexpr int kLabelThreads = 1024;
__global__ void __launch_bounds__(kLabelThreads) label_stats_kernel(LabelStats a) {
  long long count = 0, first = LLONG_MAX;
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < a.n; i += kLabelThreads) {
    const int64_t y = a.labels[i];
    if (y != a.ignore_index) {
      ++count;
      if (a.vocab > 0 && (y < 0 || y >= a.vocab) && i < first) first = i;
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    count += __shfl_xor_sync(0xffffffffu, count, o);
    first = min(first, __shfl_xor_sync(0xffffffffu, first, o));
  }
  __shared__ long long warp_count[kLabelThreads / 32], warp_first[kLabelThreads / 32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) {
    warp_count[warp] = count;
    warp_first[warp] = first;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kLabelThreads / 32; ++w) {
      count += warp_count[w];
      first = min(first, warp_first[w]);
    }
    a.out[0] = count;
    a.out[1] = first == LLONG_MAX ? -1 : first;
  }
}

}  // namespace

template <int kRowThreads, bool kExpUnits>
cudaError_t launch_fwd(const TokenLogprobFwd& a, int64_t rows, bool vec, cudaStream_t stream) {
  return HOPTUNE_DISPATCH_FLOAT(a.logits.dtype, T, [&] {
    if (vec) {
      token_logprobs_fwd_kernel<T, true, kRowThreads, kExpUnits>
          <<<static_cast<unsigned>(rows), kRowThreads, 0, stream>>>(a);
    } else {
      token_logprobs_fwd_kernel<T, false, kRowThreads, kExpUnits>
          <<<static_cast<unsigned>(rows), kRowThreads, 0, stream>>>(a);
    }
    return cudaGetLastError();
  });
}

cudaError_t token_logprobs_fwd(const TokenLogprobFwd& a, cudaStream_t stream, int variant) {
  const int64_t rows = a.logits.batch * a.logits.seq;
  HOPTUNE_REQUIRE(a.logits.ptr && a.labels && a.logp && a.lse && a.logits.vocab > 0 &&
                  a.logits.seq > 0);
  if (rows == 0) return cudaSuccess;
  HOPTUNE_REQUIRE(rows <= 0x7fffffff);
  const bool vec = vector_ok(a.logits);
  // 128 threads per row: faster on an H200 than 256 or 512 (bench/results/logprob_breakdown.json,
  // tl_fwd_v0 / v1 / v2: 128 / 256 / 512 threads). The entropy's sum in the exponent's units:
  // 0.93-0.96x the time of version 1, kept for measurement, which sums e (z - m)
  // (bench/results/logprob_fwd_exp_units_trial.json, where the two were numbered the other way).
  if (variant == 1) return launch_fwd<128, false>(a, rows, vec, stream);
  return launch_fwd<128, true>(a, rows, vec, stream);
}

// rounds_per_tile = 0: one CTA per row; else rows split in tiles of that many rounds (kThreads *
// kU units each), unless rows * tiles overflows the grid. Needs V < 2^30 (the caller checks).
template <class Cfg>
cudaError_t launch_bwd_stream(const TokenLogprobBwd& a, int64_t rows, bool vec, int rounds_per_tile,
                              cudaStream_t stream) {
  return HOPTUNE_DISPATCH_FLOAT(a.logits.dtype, T, [&] {
    const int64_t units = a.logits.vocab / (vec ? 16 / static_cast<int64_t>(sizeof(T)) : 1);
    int64_t tile = units > 0 ? units : 1, tiles = 1;
    if (rounds_per_tile > 0) {
      const int64_t t = static_cast<int64_t>(rounds_per_tile) * Cfg::kThreads * Cfg::kU;
      const int64_t n = (units + t - 1) / t;
      if (n > 1 && rows * n <= 0x7fffffff) tile = t, tiles = n;
    }
    const unsigned grid = static_cast<unsigned>(rows * tiles);
    if (vec) {
      token_logprobs_bwd_stream_kernel<T, true, Cfg><<<grid, Cfg::kThreads, 0, stream>>>(
          a, static_cast<unsigned>(tiles), static_cast<int>(tile));
    } else {
      token_logprobs_bwd_stream_kernel<T, false, Cfg><<<grid, Cfg::kThreads, 0, stream>>>(
          a, static_cast<unsigned>(tiles), static_cast<int>(tile));
    }
    return cudaGetLastError();
  });
}

cudaError_t token_logprobs_bwd(const TokenLogprobBwd& a, cudaStream_t stream, int variant) {
  const int64_t rows = a.logits.batch * a.logits.seq;
  HOPTUNE_REQUIRE(a.logits.ptr && a.labels && a.lse && a.grad_logp && a.dlogits &&
                  a.logits.seq > 0);
  if (rows == 0) return cudaSuccess;
  HOPTUNE_REQUIRE(rows <= 0x7fffffff);
  HOPTUNE_REQUIRE(!a.grad_entropy || a.entropy);
  LogitsView out = a.logits;
  out.ptr = a.dlogits;
  const bool vec = vector_ok(a.logits) && vector_ok(out);
  HOPTUNE_REQUIRE(a.logits.vocab < (int64_t{1} << 30));  // 32-bit unit indices
  // Short CTAs: 64 threads, 4 loads in flight each, one round per tile (4 KiB of 16-bit logits:
  // 63 CTAs per row at V = 128k, 32 resident per SM), evict-first loads and stores; 0.997-1.015
  // of the copy rate on an H200. Kept for measurement: version 1, the earlier default (256
  // threads, tiles of 2 rounds = 32 KiB; 0.96-0.98) and version 2 (128 threads, one round: 8 KiB
  // tiles; 0.98-1.01).
  // Measured and dropped (bench/results/logprob_bwd_versions.json): 128 threads with 2 loads
  // (as fast as version 0, but ptxas spills), 256 threads over one round, 2 loads, or with a
  // thread's units 32 apart (a warp covering a contiguous run), 8 loads in flight, no cache
  // hints; earlier, one CTA per row (2-6% slower than version 1) and a per-row kernel (0.80).
  if (variant == 1) return launch_bwd_stream<BwdCfg<256, 4, 8, true>>(a, rows, vec, 2, stream);
  if (variant == 2) return launch_bwd_stream<BwdCfg<128, 4, 16, true>>(a, rows, vec, 1, stream);
  return launch_bwd_stream<BwdCfg<64, 4, 32, true>>(a, rows, vec, 1, stream);
}

cudaError_t fused_logprob_chunk(const FusedLogprobChunk& a, cudaStream_t stream) {
  HOPTUNE_REQUIRE(a.buf && a.labels && a.logp && a.lse && a.vocab > 0 && a.ld >= a.vocab);
  HOPTUNE_REQUIRE(!a.write_grad || a.label_coef);
  if (a.rows == 0) return cudaSuccess;
  HOPTUNE_REQUIRE(a.rows <= 0x7fffffff);
  const bool vec = aligned16(a.buf) && a.vocab % 4 == 0 && a.ld % 4 == 0;
  const unsigned grid = static_cast<unsigned>(a.rows);
  if (a.shifted) {  // unnormalised G can exceed the fp16 range: bf16 or fp32 only
    HOPTUNE_REQUIRE(a.row_norm && a.overflow && a.grad_dtype != DType::kFloat16);
    if (a.grad_dtype == DType::kBFloat16) {
      if (vec) {
        fused_logprob_shifted_kernel<__nv_bfloat16, true><<<grid, kThreads, 0, stream>>>(a);
      } else {
        fused_logprob_shifted_kernel<__nv_bfloat16, false><<<grid, kThreads, 0, stream>>>(a);
      }
    } else if (vec) {
      fused_logprob_shifted_kernel<float, true><<<grid, kThreads, 0, stream>>>(a);
    } else {
      fused_logprob_shifted_kernel<float, false><<<grid, kThreads, 0, stream>>>(a);
    }
    return cudaGetLastError();
  }
  return HOPTUNE_DISPATCH_FLOAT(a.grad_dtype, G, [&] {
    if (vec) {
      fused_logprob_chunk_kernel<G, true><<<grid, kThreads, 0, stream>>>(a);
    } else {
      fused_logprob_chunk_kernel<G, false><<<grid, kThreads, 0, stream>>>(a);
    }
    return cudaGetLastError();
  });
}

cudaError_t fused_logprob_vchunk(const FusedLogprobVChunk& a, cudaStream_t stream) {
  HOPTUNE_REQUIRE(a.buf && a.labels && a.ref && a.s0 && a.s1 && a.label_logit && a.overflow &&
                  a.cols > 0 && a.ld >= a.cols && a.col0 >= 0);
  HOPTUNE_REQUIRE(!a.write_grad || a.label_coef);
  // unnormalised G can exceed the fp16 range: bf16 or fp32 only
  HOPTUNE_REQUIRE(a.grad_dtype == DType::kBFloat16 || a.grad_dtype == DType::kFloat32);
  if (a.rows == 0) return cudaSuccess;
  HOPTUNE_REQUIRE(a.rows <= 0x7fffffff);
  const bool vec = aligned16(a.buf) && a.cols % 4 == 0 && a.ld % 4 == 0;
  const unsigned grid = static_cast<unsigned>(a.rows);
  if (a.grad_dtype == DType::kBFloat16) {
    if (vec) {
      fused_logprob_vchunk_kernel<__nv_bfloat16, true><<<grid, kVThreads, 0, stream>>>(a);
    } else {
      fused_logprob_vchunk_kernel<__nv_bfloat16, false><<<grid, kVThreads, 0, stream>>>(a);
    }
  } else if (vec) {
    fused_logprob_vchunk_kernel<float, true><<<grid, kVThreads, 0, stream>>>(a);
  } else {
    fused_logprob_vchunk_kernel<float, false><<<grid, kVThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

cudaError_t fused_logprob_gemm_shift(const FusedLogprobGemmRows& a, cudaStream_t stream) {
  HOPTUNE_REQUIRE(a.h && a.w && a.labels && a.shift && a.vocab > 0 && a.k > 0 && a.k % 8 == 0 &&
                  a.ldh >= a.k && a.ldw >= a.k && a.ldh % 8 == 0 && a.ldw % 8 == 0 &&
                  aligned16(a.h) && aligned16(a.w));
  if (a.rows == 0) return cudaSuccess;
  const int64_t grid = (a.rows + kShiftWarps - 1) / kShiftWarps;
  HOPTUNE_REQUIRE(grid <= 0x7fffffff);
  fused_gemm_shift_kernel<<<static_cast<unsigned>(grid), kShiftWarps * 32, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t fused_logprob_gemm_finish(const FusedLogprobGemmRows& a, cudaStream_t stream) {
  // the float4 loads of the partial sums read kFinRows rows from a multiple of kFinRows
  HOPTUNE_REQUIRE(a.partial && a.n_partial > 0 && a.ldp % kFinRows == 0 &&
                  a.ldp >= (a.rows + kFinRows - 1) / kFinRows * kFinRows && aligned16(a.partial));
  HOPTUNE_REQUIRE(a.labels && a.shift && a.logp && a.lse && a.overflow && a.vocab > 0);
  if (a.acc) {
    HOPTUNE_REQUIRE(a.w && a.k > 0 && a.k % 8 == 0 && a.ldw >= a.k && a.ldw % 8 == 0 &&
                    aligned16(a.w) && a.ld_acc >= a.k && a.ld_acc % 4 == 0 && aligned16(a.acc));
  }
  if (a.rows == 0) return cudaSuccess;
  const int64_t grid = (a.rows + kFinRows - 1) / kFinRows;
  HOPTUNE_REQUIRE(grid <= 0x7fffffff);
  fused_gemm_finish_kernel<<<static_cast<unsigned>(grid), kFinThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t scale_rows(const ScaleRows& a, cudaStream_t stream) {
  HOPTUNE_REQUIRE(a.j && a.row_scale && a.out && a.k > 0 && a.k % 4 == 0 && a.ld_j >= a.k &&
                  a.ld_j % 4 == 0 && aligned16(a.j) && aligned16(a.out));
  if (a.rows == 0) return cudaSuccess;
  const int64_t grid = (a.rows * (a.k / 4) + 255) / 256;
  HOPTUNE_REQUIRE(grid <= 0x7fffffff);
  return HOPTUNE_DISPATCH_FLOAT(a.out_dtype, T, [&] {
    scale_rows_kernel<T><<<static_cast<unsigned>(grid), 256, 0, stream>>>(a);
    return cudaGetLastError();
  });
}

cudaError_t label_stats(const LabelStats& a, cudaStream_t stream) {
  HOPTUNE_REQUIRE(a.out && a.n >= 0 && (a.n == 0 || a.labels));
  label_stats_kernel<<<1, kLabelThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace hoptune
