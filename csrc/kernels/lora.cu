// One pass over dY for the two LoRA terms of a layer's backward that read it:
//   dxa = scale * dY @ B   [m, r]   (then dA = dxa^T x, and the dX term dxa @ A)
//   dB  = dY^T @ xa        [n, r]   (xa = scale * x A^T, formed from x beforehand)
// Two cuBLAS GEMMs each read dY, the largest tensor of the backward when N > K (both are
// memory-bound: r is small). Here a CTA streams 64 x 64 tiles of dY through shared memory
// (cp.async, a 4-stage ring, XOR-swizzled 16-byte chunks so ldmatrix reads are conflict-free) and
// feeds both products from each tile on tensor cores (mma.sync m16n8k16, fp32 accumulators): the
// tile as the A operand against 64 rows of B for dxa, and transposed (ldmatrix .trans) against
// the tile's 64 rows of xa for dB. A CTA covers kRb row blocks (kRb * r = 128, 64 at r = 8: the
// accumulators fit in registers) over a run of 64-column chunks, so the grid is rows x column
// runs, as many CTAs as are resident at once. Partial sums meet in an fp32 workspace through
// 16-byte reductions at L2 (red.global.add.v4.f32): dB's per column chunk, dxa's once at the
// end; a second kernel rounds them to the outputs. The reductions grow with the rank and shrink
// with the rows a CTA covers: on an H200 (M = 8192, N = 4096-28672), kRb * r = 128 rather than
// 64, with the grid sized to the resident CTAs, took 3-11% off at r = 16 and 19-27% at r = 32
// (r = 8 was slower so).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "hoptune/common/dispatch.h"
#include "hoptune/common/mma.cuh"
#include "hoptune/common/occupancy.h"
#include "hoptune/lora.cuh"

namespace hoptune {
namespace {

constexpr int kThreads = 128;  // four warps
constexpr int kTile = 64;      // rows and columns of a dY tile
constexpr int kStages = 4;

// Row blocks (of kTile rows) per CTA at rank 8 * r8.
constexpr int row_blocks(int r8) {
  return r8 == 1 ? 8 : 16 / r8;
}

struct DyPassArgs {
  const void* dy;
  int64_t ldy, m, n;
  const void* lora_b;
  const void* xa;
  float* acc_dxa;  // [m, rank] fp32, zeroed
  float* acc_db;   // [n, rank] fp32, zeroed
  int chunks;      // 64-column chunks per CTA
};

template <typename T, int kR8>
__global__ void __launch_bounds__(kThreads) lora_dy_pass_kernel(DyPassArgs a) {
  constexpr int kRank = 8 * kR8;
  constexpr int kRb = row_blocks(kR8);
  constexpr int kRows = kRb * kTile;
  constexpr uint32_t kXBytes = kTile * kTile * 2, kBBytes = kTile * kRank * 2;
  extern __shared__ __align__(128) unsigned char smem[];
  const uint32_t xs = smem_addr(smem);         // kStages dY tiles
  const uint32_t bs = xs + kStages * kXBytes;  // kStages chunks of B
  const uint32_t qs = bs + kStages * kBBytes;  // the CTA's rows of xa

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t chunk0 = static_cast<int64_t>(blockIdx.y) * a.chunks;
  const int nchunks = static_cast<int>(std::min<int64_t>(a.chunks, a.n / kTile - chunk0));
  const int tiles = nchunks * kRb;
  const T* dy = static_cast<const T*>(a.dy);
  const T* lb = static_cast<const T*>(a.lora_b);
  const T* xa = static_cast<const T*>(a.xa);

  // tile t = (column chunk t / kRb, row block t % kRb) into ring slot t % kStages; the chunk's B
  // rows come with its first row block
  auto issue = [&](int t) {
    const int lc = t / kRb, rb = t % kRb, slot = t % kStages;
    const int64_t col = (chunk0 + lc) * kTile;
    const int64_t row0 = m0 + rb * kTile;
#pragma unroll
    for (int i = 0; i < kTile * 8 / kThreads; ++i) {
      const int idx = tid + i * kThreads, r = idx >> 3, ch = idx & 7;
      const bool ok = row0 + r < a.m;
      const T* src = dy + (ok ? (row0 + r) * a.ldy + col + ch * 8 : 0);
      cp_async_16(xs + slot * kXBytes + swizzled<8>(r, ch), src, ok);
    }
    if (rb == 0) {
      const int bslot = lc % kStages;
      for (int idx = tid; idx < kTile * kR8; idx += kThreads) {
        const int r = idx / kR8, ch = idx % kR8;
        cp_async_16(bs + bslot * kBBytes + swizzled<kR8>(r, ch), lb + (col + r) * kRank + ch * 8,
                    true);
      }
    }
  };

  // xa's rows for the whole CTA, with the first group
  for (int idx = tid; idx < kRows * kR8; idx += kThreads) {
    const int r = idx / kR8, ch = idx % kR8;
    const bool ok = m0 + r < a.m;
    cp_async_16(qs + swizzled<kR8>(r, ch), xa + (ok ? (m0 + r) * kRank + ch * 8 : 0), ok);
  }
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < tiles) issue(s);
    cp_async_commit();
  }

  float acc_x[kRb][kR8][4];  // dxa: this warp's 16 rows of each row block
  float acc_b[kR8][4];       // dB: this warp's 16 columns of the current chunk
#pragma unroll
  for (int rb = 0; rb < kRb; ++rb)
#pragma unroll
    for (int j = 0; j < kR8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_x[rb][j][e] = 0.f;
#pragma unroll
  for (int j = 0; j < kR8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc_b[j][e] = 0.f;

  const int q = lane >> 3, r8 = lane & 7, l16 = lane & 15;
  for (int t = 0; t < tiles; ++t) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile t has landed for every thread; slot (t - 1) % kStages is free
    if (t + kStages - 1 < tiles) issue(t + kStages - 1);
    cp_async_commit();

    const int lc = t / kRb, rb_t = t % kRb;
    const uint32_t x_tile = xs + (t % kStages) * kXBytes;
    const uint32_t b_tile = bs + (lc % kStages) * kBBytes;
#pragma unroll
    for (int rb = 0; rb < kRb; ++rb) {
      if (rb != rb_t) continue;  // (a static index into acc_x keeps it in registers)
#pragma unroll
      for (int ks = 0; ks < kTile / 16; ++ks) {
        // dxa: rows 16 warp .. +15 of the tile times B's rows 16 ks .. +15 (the tile's columns)
        uint32_t af[4];
        const int xr = warp * 16 + l16;
        ldmatrix_x4(af, x_tile + swizzled<8>(xr, ks * 2 + (lane >> 4)));
        // dB: the tile's columns 16 warp .. +15 (transposed) times xa's rows 16 ks .. +15
        uint32_t at[4];
        const int tr = ks * 16 + (q >> 1) * 8 + r8;
        ldmatrix_x4_trans(at, x_tile + swizzled<8>(tr, warp * 2 + (q & 1)));
#pragma unroll
        for (int j = 0; j < kR8; ++j) {
          uint32_t b0, b1, c0, c1;
          ldmatrix_x2_trans(b0, b1, b_tile + swizzled<kR8>(ks * 16 + l16, j));
          mma_16816<T>(acc_x[rb][j], af, b0, b1);
          ldmatrix_x2_trans(c0, c1, qs + swizzled<kR8>(rb * kTile + ks * 16 + l16, j));
          mma_16816<T>(acc_b[j], at, c0, c1);
        }
      }
    }
    if (rb_t == kRb - 1) {  // the chunk's last row block: its dB partial sums out
      float* origin = a.acc_db + ((chunk0 + lc) * kTile + warp * 16) * kRank;
#pragma unroll
      for (int j = 0; j < kR8; ++j) {
        red_tile(origin + j * 8, kRank, acc_b[j], lane, 16);
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_b[j][e] = 0.f;
      }
    }
  }
  cp_async_wait<0>();
#pragma unroll
  for (int rb = 0; rb < kRb; ++rb) {
    const int64_t row = m0 + rb * kTile + warp * 16;
    if (row >= a.m) break;
    const int rows = static_cast<int>(std::min<int64_t>(16, a.m - row));
#pragma unroll
    for (int j = 0; j < kR8; ++j)
      red_tile(a.acc_dxa + row * kRank + j * 8, kRank, acc_x[rb][j], lane, rows);
  }
}

// dxa = round(scale * acc[0, m r)), db = round(acc[m r, (m + n) r)); four elements a thread-step
// (m r is a multiple of 8).
template <typename T>
__global__ void __launch_bounds__(256)
    lora_dy_pass_finish(const float* acc, int64_t dxa_elems, int64_t total, float scale, T* dxa,
                        T* db) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * 4;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 4; i < total;
       i += stride) {
    const float4 v = *reinterpret_cast<const float4*>(acc + i);
    const bool first = i < dxa_elems;
    const float s = first ? scale : 1.f;
    T* out = first ? dxa + i : db + (i - dxa_elems);
    out[0] = from_float<T>(s * v.x);
    out[1] = from_float<T>(s * v.y);
    out[2] = from_float<T>(s * v.z);
    out[3] = from_float<T>(s * v.w);
  }
}

template <typename T, int kR8>
cudaError_t launch_dy_pass(const DyPassArgs& base, float scale, void* dxa, void* db,
                           cudaStream_t stream) {
  constexpr int kRb = row_blocks(kR8);
  constexpr int kRank = 8 * kR8;
  const size_t smem = static_cast<size_t>(kStages) * (kTile * kTile * 2 + kTile * kRank * 2) +
                      kRb * kTile * kRank * 2;
  auto* kernel = lora_dy_pass_kernel<T, kR8>;
  if (smem > 48 * 1024) {
    HOPTUNE_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem)));
  }
  DyPassArgs a = base;
  const int64_t row_ctas = (a.m + kRb * kTile - 1) / (kRb * kTile);
  const int64_t chunks = a.n / kTile;
  // column runs so that rows x runs fills the resident CTA slots (one wave)
  int slots = 0;
  HOPTUNE_CUDA_TRY(resident_ctas(reinterpret_cast<const void*>(kernel), kThreads, smem, &slots));
  const int64_t runs = std::min<int64_t>(chunks, std::max<int64_t>(1, slots / row_ctas));
  a.chunks = static_cast<int>((chunks + runs - 1) / runs);
  const int64_t col_ctas = (chunks + a.chunks - 1) / a.chunks;
  if (row_ctas > 0x7fffffff || col_ctas > 65535) return cudaErrorInvalidConfiguration;
  kernel<<<dim3(static_cast<unsigned>(row_ctas), static_cast<unsigned>(col_ctas)), kThreads, smem,
           stream>>>(a);
  HOPTUNE_CUDA_TRY(cudaGetLastError());
  const int64_t total = (a.m + a.n) * kRank;
  const int64_t grid =
      std::min<int64_t>((total / 4 + 255) / 256, 8 * static_cast<int64_t>(sm_count()));
  lora_dy_pass_finish<T><<<static_cast<unsigned>(grid), 256, 0, stream>>>(
      a.acc_dxa, a.m * kRank, total, scale, static_cast<T*>(dxa), static_cast<T*>(db));
  return cudaGetLastError();
}

}  // namespace

cudaError_t lora_dy_pass(const void* dy, int64_t ldy, int64_t m, int64_t n, const void* lora_b,
                         const void* xa, int rank, float scale, float* workspace, void* dxa,
                         void* db, DType dtype, cudaStream_t stream) {
  HOPTUNE_REQUIRE(dy != nullptr && lora_b != nullptr && xa != nullptr && workspace != nullptr &&
                  dxa != nullptr && db != nullptr);
  HOPTUNE_REQUIRE(m >= 1 && n >= kTile && n % kTile == 0 && ldy >= n && ldy % 8 == 0);
  HOPTUNE_REQUIRE(rank == 8 || rank == 16 || rank == 32 || rank == 64);
  HOPTUNE_REQUIRE(dtype == DType::kBFloat16 || dtype == DType::kFloat16);
  const void* ptrs[] = {dy, lora_b, xa, workspace, dxa, db};
  for (const void* p : ptrs) HOPTUNE_REQUIRE(reinterpret_cast<uintptr_t>(p) % 16 == 0);
  HOPTUNE_CUDA_TRY(cudaMemsetAsync(workspace, 0, static_cast<size_t>(m + n) * rank * 4, stream));
  const DyPassArgs a{dy, ldy, m, n, lora_b, xa, workspace, workspace + m * rank, /*chunks=*/1};
  return HOPTUNE_DISPATCH_HALF(dtype, T, [&]() -> cudaError_t {
    switch (rank) {
      case 8:
        return launch_dy_pass<T, 1>(a, scale, dxa, db, stream);
      case 16:
        return launch_dy_pass<T, 2>(a, scale, dxa, db, stream);
      case 32:
        return launch_dy_pass<T, 4>(a, scale, dxa, db, stream);
      default:
        return launch_dy_pass<T, 8>(a, scale, dxa, db, stream);
    }
  });
}

}  // namespace hoptune
