// Per-token log-probs: one CTA per row, one pass over the row for the forward.
//
// Each thread keeps an online (max m, s0 = sum e^(z-m), s1 = sum e^(z-m) (z-m)) over its slice of
// the row; slices are merged with a shuffle + shared-memory tree. Keeping s1 relative to m gives
// the entropy as log(s0) - s1/s0 without the cancellation of lse - mean(z). Loads are 16 bytes
// per thread (8 bf16/fp16 or 4+4 fp32), two in flight; rows that are not 16-byte aligned (odd
// vocab sizes, odd strides) take a scalar path. exp is exp2 of a pre-scaled argument (one FFMA).
//
// The backward recomputes p = exp(z' - lse) from the saved lse and writes dlogits in the logits'
// dtype (in place when the caller passes the logits buffer as dlogits: each element is read and
// then written by the same thread).
//
// The fused-chunk kernel works on fp32 logits a GEMM just wrote: pass 1 gathers the row stats,
// pass 2 re-reads the row and writes the softmax part of d logp / d z (-p dz'/dz) as 16-bit
// values over the first half of the same row; a barrier per iteration orders every read of the
// overlapped fp32 words before their overwrite. The one-hot part goes out per row in fp32.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <type_traits>

#include "hoptune/common/dispatch.h"
#include "hoptune/logprob.cuh"

namespace hoptune {
namespace {

constexpr int kThreads = 512;
constexpr int kBwdThreads = 256;
constexpr float kLog2e = 1.4426950408889634f;

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
// s0 = sum 2^((z - m) c), s1 = sum 2^((z - m) c) (z - m), c = log2(e) / T (the caller scales s1
// and m by 1/T at the end).
template <int N>
__device__ __forceinline__ void stats_add_scaled(Stats& st, const float (&z)[N], float c) {
  float gm = z[0];
#pragma unroll
  for (int j = 1; j < N; ++j) gm = fmaxf(gm, z[j]);
  if (gm > st.m) {
    if (st.m != -INFINITY) {
      const float d = st.m - gm;
      const float f = fast_exp2(d * c);
      st.s1 = f * (st.s1 + st.s0 * d);
      st.s0 *= f;
    }
    st.m = gm;
  }
  const float mc = st.m * c;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    const float e = fast_exp2(fmaf(z[j], c, -mc));
    st.s0 += e;
    st.s1 = fmaf(e, z[j] - st.m, st.s1);
  }
}

// Merge for stats_add_scaled (c as there).
__device__ __forceinline__ Stats combine_scaled(Stats a, Stats b, float c) {
  const float mn = fmaxf(a.m, b.m);
  if (mn == -INFINITY) return a;
  Stats r{mn, 0.f, 0.f};
  if (a.m != -INFINITY) {
    const float d = a.m - mn, f = fast_exp2(d * c);
    r.s0 += f * a.s0;
    r.s1 += f * (a.s1 + a.s0 * d);
  }
  if (b.m != -INFINITY) {
    const float d = b.m - mn, f = fast_exp2(d * c);
    r.s0 += f * b.s0;
    r.s1 += f * (b.s1 + b.s0 * d);
  }
  return r;
}

template <int kBlock>
__device__ Stats block_stats_scaled(Stats st, float c) {
  __shared__ Stats warp_st[kBlock / 32];
  __shared__ Stats result;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    Stats other{__shfl_xor_sync(0xffffffffu, st.m, o), __shfl_xor_sync(0xffffffffu, st.s0, o),
                __shfl_xor_sync(0xffffffffu, st.s1, o)};
    st = combine_scaled(st, other, c);
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
      st = combine_scaled(st, other, c);
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
  const float ml = st.m * kLog2e;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    const float e = exp2f(fmaf(z[j], kLog2e, -ml));
    st.s0 += e;
    st.s1 = fmaf(e, z[j] - st.m, st.s1);
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

template <typename T, bool kVec, int kRowThreads>
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
      for (int u = 0; u < kU; ++u) stats_add_scaled(st, v[u], c);
    }
    for (; g < groups; g += kRowThreads) {
      float v0[8];
      Vec8<T>::load(z + 8 * g, v0);
      stats_add_scaled(st, v0, c);
    }
  } else {
    for (int64_t i = threadIdx.x; i < V; i += kRowThreads) {
      float v0[1] = {to_float(z[i])};
      stats_add_scaled(st, v0, c);
    }
  }
  st = block_stats_scaled<kRowThreads>(st, c);
  if (threadIdx.x == 0) {
    // in units of z' = z / T: max m' = m it, log s0 is natural, s1' = s1 it
    const float log_s0 = logf(st.s0);
    const float zy = to_float(z[y]);
    a.logp[row] = (zy - st.m) * it - log_s0;
    a.lse[row] = st.m * it + log_s0;
    if (a.entropy) a.entropy[row] = log_s0 - it * st.s1 / st.s0;
  }
}

template <typename T, bool kVec, int kRowThreads>
__global__ void __launch_bounds__(kRowThreads) token_logprobs_bwd_kernel(TokenLogprobBwd a) {
  const int64_t row = blockIdx.x;
  const int64_t y = a.labels[row];
  const int64_t off = row_offset(a.logits, row);
  const T* z = static_cast<const T*>(a.logits.ptr) + off;
  T* dz = static_cast<T*>(a.dlogits) + off;
  const int64_t V = a.logits.vocab;
  const bool ignored = y == a.ignore_index;
  const float it = a.inv_temperature;
  const float lse = a.lse[row];
  const float gl = ignored ? 0.f : a.grad_logp[row];
  const float gh = (ignored || !a.grad_entropy) ? 0.f : a.grad_entropy[row];
  const float H = (ignored || !a.entropy) ? 0.f : a.entropy[row];
  // dz_v = it [gl (1[v=y] - p) - gh p (lp + H)],  lp = z it - lse,  p = 2^(lp log2 e)
  const float c = it * kLog2e, lse2 = lse * kLog2e;
  const float k0 = -(gl + gh * H) * it, k1 = -gh * it;
  auto grad = [&](float zv, int64_t v) -> float {
    const float p = fast_exp2(fmaf(zv, c, -lse2));
    const float lp = fmaf(zv, it, -lse);
    float d = p * fmaf(k1, lp, k0);
    if (v == y) d += gl * it;
    return ignored ? 0.f : d;
  };
  if (kVec) {
    const int64_t groups = V / 8;
    int64_t g = threadIdx.x;
    for (; g + kRowThreads < groups; g += 2 * kRowThreads) {  // two 16-byte loads in flight
      float v0[8], v1[8];
      Vec8<T>::load(z + 8 * g, v0);
      Vec8<T>::load(z + 8 * (g + kRowThreads), v1);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        v0[j] = grad(v0[j], 8 * g + j);
        v1[j] = grad(v1[j], 8 * (g + kRowThreads) + j);
      }
      Vec8<T>::store(dz + 8 * g, v0);
      Vec8<T>::store(dz + 8 * (g + kRowThreads), v1);
    }
    for (; g < groups; g += kRowThreads) {
      float v[8];
      Vec8<T>::load(z + 8 * g, v);
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = grad(v[j], 8 * g + j);
      Vec8<T>::store(dz + 8 * g, v);
    }
  } else {
    for (int64_t i = threadIdx.x; i < V; i += kRowThreads)
      dz[i] = from_float<T>(grad(to_float(z[i]), i));
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
    float dy;
    a.logp[row] = tf(z[y], y, &dy) - lse;
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
    float dy;
    s_zy = tf(z[y], y, &dy);
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
    s1 = fmaf(e, t, s1);
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

}  // namespace

template <int kRowThreads>
cudaError_t launch_fwd(const TokenLogprobFwd& a, int64_t rows, bool vec, cudaStream_t stream) {
  return HOPTUNE_DISPATCH_FLOAT(a.logits.dtype, T, [&] {
    if (vec) {
      token_logprobs_fwd_kernel<T, true, kRowThreads>
          <<<static_cast<unsigned>(rows), kRowThreads, 0, stream>>>(a);
    } else {
      token_logprobs_fwd_kernel<T, false, kRowThreads>
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
  switch (variant) {  // threads per row (kernel versions under measurement; 0 is the default)
    case 1:
      return launch_fwd<256>(a, rows, vec, stream);
    case 2:
      return launch_fwd<512>(a, rows, vec, stream);
    default:  // 128 threads per row: measured fastest on an H200 (bench/results/logprob.json)
      return launch_fwd<128>(a, rows, vec, stream);
  }
}

cudaError_t token_logprobs_bwd(const TokenLogprobBwd& a, cudaStream_t stream) {
  const int64_t rows = a.logits.batch * a.logits.seq;
  HOPTUNE_REQUIRE(a.logits.ptr && a.labels && a.lse && a.grad_logp && a.dlogits &&
                  a.logits.seq > 0);
  if (rows == 0) return cudaSuccess;
  HOPTUNE_REQUIRE(rows <= 0x7fffffff);
  HOPTUNE_REQUIRE(!a.grad_entropy || a.entropy);
  LogitsView out = a.logits;
  out.ptr = a.dlogits;
  const bool vec = vector_ok(a.logits) && vector_ok(out);
  return HOPTUNE_DISPATCH_FLOAT(a.logits.dtype, T, [&] {
    if (vec) {
      token_logprobs_bwd_kernel<T, true, kBwdThreads>
          <<<static_cast<unsigned>(rows), kBwdThreads, 0, stream>>>(a);
    } else {
      token_logprobs_bwd_kernel<T, false, kBwdThreads>
          <<<static_cast<unsigned>(rows), kBwdThreads, 0, stream>>>(a);
    }
    return cudaGetLastError();
  });
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

}  // namespace hoptune
