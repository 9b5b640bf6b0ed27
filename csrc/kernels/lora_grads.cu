// Both LoRA factor gradients of a layer's backward from one read of x and of dY:
//   xa  = round(s x A^T)   [m, r]      dxa = round(s dY B)   [m, r]     (row sums over K, N)
//   dA  = round(dxa^T x)   [r, K]      dB  = round(dY^T xa)  [N, r]     (sums over the rows)
// cuBLAS' x A^T and dxa^T x and the dY pass (lora.cu) read x twice and dY once; the row sums a
// row's dA and dB terms need are local to the row, but span all of K (or N). Here a cluster of C
// CTAs (C = K / 512 = N / 512, 2 to 8) shares each block of 32 rows: CTA j loads columns [512 j,
// 512 j + 512) of the block's x and dY (cp.async, a 3-stage ring of XOR-swizzled tiles), forms its
// share of both row sums on tensor cores (mma.sync m16n8k16; A's and B's fragments held in
// registers), and the cluster sums the shares through distributed shared memory as a
// reduce-scatter: each CTA pushes the rows CTA d owns (32 / C of them) into d's shared memory,
// each CTA sums its rows over the cluster, rounds them once and pushes them into every CTA. The
// pushes are asynchronous remote stores (st.async) that complete a transaction barrier (mbarrier)
// in the receiving CTA, so no cluster barrier or memory fence sits in the loop (a version with two
// cluster barriers a block ran 1.37x as long), and block i + 1's share is formed while block i's
// sums are on their way. A ninth warp does the cluster's sums (waits for the shares, sums, rounds,
// pushes), so the eight that load and multiply wait only for the rounded sums. Each CTA then adds
// the block's dY^T xa and dxa^T x for its columns into fp32 accumulators it keeps in registers
// across all the row blocks its cluster takes (persistent clusters, one wave), so partial sums
// leave once per CTA (16-byte reductions at L2) and a last small kernel rounds them (dA transposed)
// to the outputs: launched programmatically, once every CTA has left its loop, so its launch
// overlaps those reductions (it waits for this kernel's end). A cluster's first three row blocks
// are fixed (cid, cid + clusters, ...), the rest come from a counter, one at a time: clusters that
// start late (the op runs this kernel beside dX's GEMM, in the SMs its last wave leaves) take fewer
// blocks. st.async needs a cluster of two or more CTAs: K = 512 is not taken.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>

#include "hoptune/common/dispatch.h"
#include "hoptune/common/launch.cuh"
#include "hoptune/common/mma.cuh"
#include "hoptune/common/occupancy.h"
#include "hoptune/lora.cuh"

namespace hoptune {
namespace {

namespace cg = cooperative_groups;

constexpr int kWarps = 8;  // eight warps load and multiply; a ninth sums the cluster's shares
constexpr int kCompute = kWarps * 32;
constexpr int kThreads = kCompute + 32;
constexpr int kCols = 512;  // x's and dY's columns per CTA: 64 a warp
constexpr int kRows = 32;   // rows per block
constexpr int kStages = 3;
constexpr int kRank = 16;
constexpr int kQuadShift = 2;  // log2(kRank / 4): the float4s of a row of the row sums
static_assert(kRank / 4 == 1 << kQuadShift, "the summing warp's indices are shifts");
constexpr uint32_t kTileBytes = kRows * kCols * 2;             // 32 KiB
constexpr uint32_t kStageBytes = 2 * kTileBytes;               // x's tile, then dY's
constexpr uint32_t kPartBytes = kRows * kRank * 4;             // [rows, r] fp32
constexpr uint32_t kFullBytes = kRows * kRank * 2;             // [rows, r] rounded
constexpr uint32_t kWarpOff = kStages * kStageBytes;           // each warp's share
constexpr uint32_t kExchOff = kWarpOff + kWarps * kPartBytes;  // [2][src CTA][xa, dxa][own rows]
constexpr uint32_t kFullOff = kExchOff + 4 * kPartBytes;       // [2 buffers][xa, dxa] rounded
constexpr uint32_t kIdxOff = kFullOff + 4 * kFullBytes;        // [2] a later block's index
constexpr uint32_t kBarOff = kIdxOff + 16;                     // [2] exchange, [2] full mbarriers
constexpr uint32_t kSmemBytes = kBarOff + 32;                  // 220 KiB
constexpr int kStaticBlocks = 3;  // each cluster's first row blocks: cid, cid + clusters, ...
constexpr int kMaxCluster = 8;    // (the portable cluster size)

// Byte offset of 16-byte chunk c (0-63) of row `row` in a tile of 1 KiB rows: within each
// 128-byte line the chunk index XORed with the row's low bits (conflict-free ldmatrix, plain or
// transposed).
__device__ __forceinline__ uint32_t tile_off(int row, int c) {
  return static_cast<uint32_t>(row * (kCols * 2) + (c >> 3) * 128 + (((c & 7) ^ (row & 7)) << 4));
}

// Cluster barrier, once at the start (mbarriers initialized before any CTA pushes to them) and once
// at the end (no CTA leaves while a push to it may be pending).
__device__ __forceinline__ void cluster_arrive() {
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() {
  asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// Transaction barriers (mbarrier) in this CTA's shared memory, completed by the cluster's
// asynchronous remote stores (st.async ... complete_tx): a phase ends when its one arrival (with
// the bytes it expects) is in and those bytes have landed.
__device__ __forceinline__ void mbar_init(uint32_t bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_expect(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], "
        "%2;\n"
        " selp.u32 %0, 1, 0, p;\n}"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}
// The address in CTA `rank` of the cluster of this CTA's shared address `addr`.
__device__ __forceinline__ uint32_t cluster_addr(uint32_t addr, int rank) {
  uint32_t out;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(out) : "r"(addr), "r"(rank));
  return out;
}
__device__ __forceinline__ void push(uint32_t addr, float4 v, uint32_t bar) {
  asm volatile(
      "st.async.shared::cluster.mbarrier::complete_tx::bytes.v4.f32 [%0], {%1, %2, %3, %4}, "
      "[%5];" ::"r"(addr),
      "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w), "r"(bar)
      : "memory");
}
__device__ __forceinline__ void push(uint32_t addr, uint2 v, uint32_t bar) {
  asm volatile(
      "st.async.shared::cluster.mbarrier::complete_tx::bytes.v2.b32 [%0], {%1, %2}, [%3];" ::"r"(
          addr),
      "r"(v.x), "r"(v.y), "r"(bar)
      : "memory");
}

struct GradsArgs {
  const void* x;
  int64_t ldx;
  const void* dy;
  int64_t ldy;
  int64_t m, k;
  const uint16_t* lora_a;  // [r, k]
  const uint16_t* lora_b;  // [n, r]
  float scale;
  float* acc_dat;          // [k, r] fp32, zeroed: dA transposed
  float* acc_db;           // [n, r] fp32, zeroed
  unsigned int* next_blk;  // zeroed: the row blocks after the clusters' first ones, handed out
};

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) lora_grads_kernel(GradsArgs a) {
  extern __shared__ __align__(1024) unsigned char smem[];
  cg::cluster_group cluster = cg::this_cluster();
  const int csize = static_cast<int>(cluster.num_blocks());
  const int rank = static_cast<int>(cluster.block_rank());
  const int64_t cid = blockIdx.x / csize, clusters = gridDim.x / csize;
  const int64_t blocks = (a.m + kRows - 1) / kRows;
  // The row blocks a cluster takes: its first kStaticBlocks by a fixed rule (cid + i clusters),
  // then one at a time from a counter in global memory (rank 0's summing warp takes each a block
  // ahead and pushes it to the cluster with a block's row sums, three blocks before its loads are
  // issued), so clusters that start early (e.g. in a GEMM's last wave) take more blocks. b0 is the
  // current block, b1 and b2 the next two; an index >= blocks ends the sequence (the counter only
  // grows, so every later one does too).
  int64_t b0 = cid, b1 = cid + clusters, b2 = cid + 2 * clusters;
  // (rank 0, the summing warp's lane 0: the index it pushes next, and the counter's value for the
  // one after, read a block later)
  int64_t ahead = blocks;
  unsigned int taken = 0;
  bool fresh = false;

  const uint32_t base = smem_addr(smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, tq = lane & 3, q = lane >> 3, r8 = lane & 7, l16 = lane & 15;
  const T* x = static_cast<const T*>(a.x) + rank * kCols;
  const T* dy = static_cast<const T*>(a.dy) + rank * kCols;

  auto issue = [&](int it, int64_t blk) {  // (by the first eight warps)
    if (tid >= kCompute) return;
    const int64_t row0 = blk * kRows;
    const uint32_t st = base + (it % kStages) * kStageBytes;
#pragma unroll
    for (int i = 0; i < kRows * (kCols / 8) / kCompute; ++i) {
      const int idx = tid + i * kCompute, r = idx >> 6, c = idx & 63;
      const bool ok = row0 + r < a.m;
      const int64_t row = ok ? row0 + r : 0;
      cp_async_16(st + tile_off(r, c), x + row * a.ldx + c * 8, ok);
      cp_async_16(st + kTileBytes + tile_off(r, c), dy + row * a.ldy + c * 8, ok);
    }
  };
  static_assert(kStages == 3 && kStaticBlocks == kStages,
                "the first blocks' loads precede the loop");
  if (b0 < blocks) issue(0, b0);
  cp_async_commit();
  if (b1 < blocks) issue(1, b1);
  cp_async_commit();

  // The row sums' constant operand, as B fragments (k = 2 tq, 2 tq + 1 and + 8; n = g): warps 0-3
  // A^T over a quarter of this CTA's K columns each (xa), warps 4-7 B over a quarter of its N (dxa)
  const int prod = warp >> 2, kq = warp & 3;
  uint32_t fb[8][2][2];
  if (warp < kWarps) {
    const int64_t col0 = static_cast<int64_t>(rank) * kCols + kq * 128 + 2 * tq;
#pragma unroll
    for (int kk = 0; kk < 8; ++kk)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t col = col0 + kk * 16 + h * 8;
          const int n = nt * 8 + g;
          if (prod == 0) {
            fb[kk][nt][h] = *reinterpret_cast<const uint32_t*>(a.lora_a + n * a.k + col);
          } else {
            fb[kk][nt][h] = static_cast<uint32_t>(a.lora_b[col * kRank + n]) |
                            (static_cast<uint32_t>(a.lora_b[(col + 1) * kRank + n]) << 16);
          }
        }
  }

  float acc_a[4][2][4], acc_b[4][2][4];  // dA^T and dB: this warp's 64 columns x r
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc_a[mt][nt][e] = acc_b[mt][nt][e] = 0.f;

  float* warp_part = reinterpret_cast<float*>(smem + kWarpOff);
  const int own = kRows / csize;         // rows of the row sums this CTA reduces for the cluster
  const int own_shift = __ffs(own) - 1;  // (a power of two)
  // the first eight warps' barrier (the summing warp runs its own loop)
  auto sync_compute = []() { asm volatile("bar.sync 1, %0;" ::"n"(kCompute) : "memory"); };
  const uint32_t exch_bar = base + kBarOff, full_bar = exch_bar + 16;  // [2] each, 8 bytes
  constexpr uint32_t kExchBytes = 2 * kPartBytes;                      // a block's, from all CTAs
  constexpr uint32_t kFullPair = 2 * kFullBytes;
  constexpr uint32_t kFullExpect = kFullPair + 8;  // the rows' sums and rank 0's block index
  // block it's share of both row sums, its rows of CTA d pushed into CTA d's exch[it % 2][rank]
  // (tile it landed and visible)
  auto share = [&](int it) {
    const uint32_t st = base + (it % kStages) * kStageBytes;
    {  // this warp's share of xa (or dxa): its 128 columns
      const uint32_t tile = st + prod * kTileBytes;
      float p[2][2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) p[mt][nt][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < 8; ++kk)
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          uint32_t af[4];
          ldmatrix_x4(af, tile + tile_off(mt * 16 + l16, (kq * 8 + kk) * 2 + (lane >> 4)));
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) mma_16816<T>(p[mt][nt], af, fb[kk][nt][0], fb[kk][nt][1]);
        }
      float* wp = warp_part + warp * (kRows * kRank);
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          const int row = mt * 16 + g, col = nt * 8 + 2 * tq;
          *reinterpret_cast<float2*>(wp + row * kRank + col) =
              make_float2(p[mt][nt][0], p[mt][nt][1]);
          *reinterpret_cast<float2*>(wp + (row + 8) * kRank + col) =
              make_float2(p[mt][nt][2], p[mt][nt][3]);
        }
    }
    sync_compute();
    {  // the CTA's share: four elements a thread, summed over the product's four warps
      const int pr = tid >> 7, e = (tid & 127) * 4;
      const float* wp = warp_part + pr * 4 * (kRows * kRank) + e;
      float4 s = *reinterpret_cast<const float4*>(wp);
#pragma unroll
      for (int w = 1; w < 4; ++w) {
        const float4 v = *reinterpret_cast<const float4*>(wp + w * (kRows * kRank));
        s.x += v.x, s.y += v.y, s.z += v.z, s.w += v.w;
      }
      const int row = e / kRank, dst = row >> own_shift;
      const uint32_t slot = base + kExchOff + (it & 1) * kExchBytes +
                            (((rank * 2 + pr) * own + (row & (own - 1))) * kRank + e % kRank) * 4;
      push(cluster_addr(slot, dst), s, cluster_addr(exch_bar + (it & 1) * 8, dst));
    }
  };
  // block it's rows of both sums over the cluster (own rows from every CTA, in exch[it % 2]) into
  // every CTA's full[it % 2], by the summing warp: 2 (32 / C) r / 4 float4s of those rows (32 to
  // 128), each summed over the CTAs by a lane, rounded and pushed to every CTA
  auto reduce = [&](int it) {
    const int per_prod = own * kRank / 4;  // float4s
    const uint32_t bar = exch_bar + (it & 1) * 8;
    mbar_wait(bar, (it >> 1) & 1);
    if (lane == 0 && b2 < blocks) mbar_expect(bar, kExchBytes);  // block it + 2's
    const uint32_t fbar = full_bar + (it & 1) * 8;
    for (int i = lane; i < 2 * per_prod; i += 32) {
      const int pr = i >> (own_shift + kQuadShift), e = (i & (per_prod - 1)) * 4;
      const float* exch = reinterpret_cast<const float*>(smem + kExchOff + (it & 1) * kExchBytes) +
                          pr * own * kRank + e;
      float4 s = *reinterpret_cast<const float4*>(exch);
#pragma unroll
      for (int src = 1; src < kMaxCluster; ++src)
        if (src < csize) {
          const float4 v = *reinterpret_cast<const float4*>(exch + src * 2 * own * kRank);
          s.x += v.x, s.y += v.y, s.z += v.z, s.w += v.w;
        }
      const T h0 = from_float<T>(a.scale * s.x), h1 = from_float<T>(a.scale * s.y);
      const T h2 = from_float<T>(a.scale * s.z), h3 = from_float<T>(a.scale * s.w);
      uint2 packed;
      packed.x = static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(&h0)) |
                 (static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(&h1)) << 16);
      packed.y = static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(&h2)) |
                 (static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(&h3)) << 16);
      const int row = rank * own + e / kRank, col = e % kRank;
      const uint32_t dst = base + kFullOff + (it & 1) * kFullPair + pr * kFullBytes +
                           swizzled<2>(row, col / 8) + (col % 8) * 2;
#pragma unroll
      for (int d = 0; d < kMaxCluster; ++d)
        if (d < csize) push(cluster_addr(dst, d), packed, cluster_addr(fbar, d));
    }
    if (rank == 0 && lane == 0) {  // block it + 3's index, with block it's sums, to every CTA
      if (fresh) ahead = kStaticBlocks * clusters + static_cast<int64_t>(taken), fresh = false;
      const uint32_t slot = base + kIdxOff + (it & 1) * 8;
      const uint2 v = make_uint2(static_cast<uint32_t>(ahead), static_cast<uint32_t>(ahead >> 32));
#pragma unroll
      for (int d = 0; d < kMaxCluster; ++d)
        if (d < csize) push(cluster_addr(slot, d), v, cluster_addr(fbar, d));
      if (ahead < blocks) taken = atomicAdd(a.next_blk, 1u), fresh = true;  // (read at the next)
    }
  };
  // block it's column sums (tile it, full[it % 2])
  auto colsum = [&](int it) {
    const uint32_t st = base + (it % kStages) * kStageBytes;
    const uint32_t full = base + kFullOff + (it & 1) * 2 * kFullBytes;
#pragma unroll
    for (int ks = 0; ks < kRows / 16; ++ks) {
      uint32_t bxa[2][2], bdxa[2][2];
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        ldmatrix_x2_trans(bxa[nt][0], bxa[nt][1], full + swizzled<2>(ks * 16 + l16, nt));
        ldmatrix_x2_trans(bdxa[nt][0], bdxa[nt][1],
                          full + kFullBytes + swizzled<2>(ks * 16 + l16, nt));
      }
      const int tr = ks * 16 + (q >> 1) * 8 + r8;
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
        // the tiles' columns 64 warp + 16 mt .. +15, transposed: rows of dA^T and of dB
        const int ch = warp * 8 + mt * 2 + (q & 1);
        uint32_t ax[4], ay[4];
        ldmatrix_x4_trans(ax, st + tile_off(tr, ch));
        ldmatrix_x4_trans(ay, st + kTileBytes + tile_off(tr, ch));
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          mma_16816<T>(acc_a[mt][nt], ax, bdxa[nt][0], bdxa[nt][1]);
          mma_16816<T>(acc_b[mt][nt], ay, bxa[nt][0], bxa[nt][1]);
        }
      }
    }
  };

  // No cluster barrier per block: the shares and the rounded sums travel as asynchronous remote
  // stores that complete transaction barriers in the receiving CTA (each used by every other block,
  // re-armed once its phase is seen: full[b] by thread 0, exch[b] by the summing warp). Block it +
  // 1's share is formed while block it's rounded sums are on their way, and block it + 2's tiles
  // load under both (the ring holds blocks it, it + 1 and it + 2: the wait for one group below). No
  // buffer is pushed to before its reader is done with it (nor can a barrier's next phase complete
  // before every waiter has seen this one): CTA d's exch[b] gets block it + 2's shares from senders
  // that have waited for block it's sums, which d pushed after reading block it's shares; its
  // full[b] gets block it + 2's sums from CTAs that have d's block it + 2 share, which d pushes
  // after its column sums of block it (a barrier between). The summing warp waits for block it's
  // sums as well before it sums block it + 1's shares: they carry block it + 3's index, which it
  // needs, and so its wait on full[b] never lags a phase (block it + 2's sums need its own).
  static_assert(kStages == 3, "the pipelined loop keeps three blocks' tiles in the ring");
  if (tid == 0) {
#pragma unroll
    for (int b = 0; b < 2; ++b) mbar_init(exch_bar + b * 8), mbar_init(full_bar + b * 8);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#pragma unroll
    for (int b = 0; b < 2; ++b)
      if ((b == 0 ? b0 : b1) < blocks)
        mbar_expect(exch_bar + b * 8, kExchBytes), mbar_expect(full_bar + b * 8, kFullExpect);
  }
  if (tid == kCompute && rank == 0 && b2 < blocks)  // block 3's index (the first handed out)
    ahead = kStaticBlocks * clusters + static_cast<int64_t>(atomicAdd(a.next_blk, 1u));
  cluster_arrive();
  cluster_wait();        // every CTA's barriers are set up before anything is pushed to them
  if (warp == kWarps) {  // the summing warp
    for (int it = 0; b0 < blocks; ++it) {
      reduce(it);
      mbar_wait(full_bar + (it & 1) * 8, (it >> 1) & 1);
      const uint2 nv = *reinterpret_cast<const uint2*>(smem + kIdxOff + (it & 1) * 8);
      b0 = b1, b1 = b2;
      b2 = static_cast<int64_t>(nv.x) | (static_cast<int64_t>(nv.y) << 32);
    }
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    cluster_arrive();
    cluster_wait();
    return;
  }
  if (b0 < blocks) {
    cp_async_wait<kStages - 2>();
    sync_compute();
    share(0);
  }
  for (int it = 0; b0 < blocks; ++it) {
    if (b1 < blocks) {
      sync_compute();  // colsum(it - 1) is done: slot (it + 2) % kStages is free
      if (b2 < blocks) issue(it + kStages - 1, b2);
      cp_async_commit();
      cp_async_wait<1>();
      sync_compute();  // block it + 1 has landed for every thread
      share(it + 1);
    }
    const uint32_t bar = full_bar + (it & 1) * 8;
    mbar_wait(bar, (it >> 1) & 1);  // block it's row sums (and block it + 3's index) are here
    if (tid == 0 && b2 < blocks) mbar_expect(bar, kFullExpect);
    const uint2 nv = *reinterpret_cast<const uint2*>(smem + kIdxOff + (it & 1) * 8);
    colsum(it);
    b0 = b1, b1 = b2;
    b2 = static_cast<int64_t>(nv.x) | (static_cast<int64_t>(nv.y) << 32);
  }
  cp_async_wait<0>();
  // the rounding kernel (launched programmatically) may be scheduled once every CTA is here: its
  // launch overlaps the reductions below, and it waits for this grid's end before reading
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  cluster_arrive();  // (waited after the reductions: no CTA leaves while a push to it may be
                     // pending)
  const int64_t col = static_cast<int64_t>(rank) * kCols + warp * 64;
#pragma unroll
  for (int mt = 0; mt < 4; ++mt)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      red_tile(a.acc_dat + (col + mt * 16) * kRank + nt * 8, kRank, acc_a[mt][nt], lane, 16);
      red_tile(a.acc_db + (col + mt * 16) * kRank + nt * 8, kRank, acc_b[mt][nt], lane, 16);
    }
  cluster_wait();
}

// da[i, c] = round(acc_dat[c, i]) (r x k), db = round(acc_db) (n x r).
template <typename T>
__global__ void __launch_bounds__(256) lora_grads_finish(const float* acc_dat, const float* acc_db,
                                                         int64_t k, int64_t n, T* da, T* db) {
  asm volatile("griddepcontrol.wait;" ::: "memory");  // the main kernel's sums are all in
  const int64_t na = k * kRank, total = na + n * kRank;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    if (i < na) {
      da[i] = from_float<T>(acc_dat[(i % k) * kRank + i / k]);
    } else {
      db[i - na] = from_float<T>(acc_db[i - na]);
    }
  }
}

// The kernel's launch configuration: `grid` CTAs in clusters of `csize` (the attribute written
// into *attr, which must outlive the launch).
cudaLaunchConfig_t cluster_launch(int64_t grid, int csize, cudaStream_t stream,
                                  cudaLaunchAttribute* attr) {
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = static_cast<unsigned>(csize);
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(grid));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = kSmemBytes;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

// Clusters of `csize` CTAs of the kernel for T resident at once on the current device, cached.
template <typename T>
cudaError_t active_clusters(int csize, int* out) {
  constexpr int kDevices = 16;
  static std::atomic<int> cache[kDevices][kMaxCluster + 1];
  int device = 0;
  HOPTUNE_CUDA_TRY(cudaGetDevice(&device));
  if (device < kDevices && cache[device][csize].load(std::memory_order_relaxed) > 0) {
    *out = cache[device][csize].load(std::memory_order_relaxed);
    return cudaSuccess;
  }
  // (set once per device here, with the count: a graph capture then makes no such call)
  HOPTUNE_CUDA_TRY(cudaFuncSetAttribute(lora_grads_kernel<T>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(kSmemBytes)));
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = cluster_launch(csize, csize, nullptr, &attr);
  int n = 0;
  HOPTUNE_CUDA_TRY(cudaOccupancyMaxActiveClusters(&n, lora_grads_kernel<T>, &cfg));
  if (n < 1) return cudaErrorInvalidConfiguration;
  if (device < kDevices) cache[device][csize].store(n, std::memory_order_relaxed);
  *out = n;
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_grads(const GradsArgs& a, int csize, int64_t n, void* da, void* db,
                         cudaStream_t stream) {
  auto* kernel = lora_grads_kernel<T>;
  int clusters = 0;  // (the kernel's shared memory attribute set with it)
  HOPTUNE_CUDA_TRY(active_clusters<T>(csize, &clusters));
  const int64_t blocks = (a.m + kRows - 1) / kRows;
  const int64_t grid = std::min<int64_t>(clusters, blocks) * csize;
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = cluster_launch(grid, csize, stream, &attr);
  HOPTUNE_CUDA_TRY(cudaLaunchKernelEx(&cfg, kernel, a));
  const int64_t total = (a.k + n) * kRank;
  const int64_t fgrid =
      std::min<int64_t>((total + 255) / 256, 4 * static_cast<int64_t>(sm_count()));
  return launch_pdl(lora_grads_finish<T>, dim3(static_cast<unsigned>(fgrid)), dim3(256), 0, stream,
                    a.acc_dat, a.acc_db, a.k, n, static_cast<T*>(da), static_cast<T*>(db));
}

}  // namespace

bool lora_grads_shape(int64_t k, int64_t n, int rank) {
  return rank == kRank && k == n && k % kCols == 0 && k / kCols >= 2 && k / kCols <= kMaxCluster &&
         ((k / kCols) & (k / kCols - 1)) == 0;
}

cudaError_t lora_grads_zero(float* workspace, int64_t k, int64_t n, int rank, cudaStream_t stream) {
  HOPTUNE_REQUIRE(workspace != nullptr && k >= 1 && n >= 1 && rank >= 1);
  return cudaMemsetAsync(workspace, 0, (static_cast<size_t>(k + n) * rank + 4) * 4, stream);
}

cudaError_t lora_grads(const void* x, int64_t ldx, const void* dy, int64_t ldy, int64_t m,
                       int64_t k, int64_t n, const void* lora_a, const void* lora_b, int rank,
                       float scale, float* workspace, bool zeroed, void* da, void* db, DType dtype,
                       cudaStream_t stream) {
  HOPTUNE_REQUIRE(x != nullptr && dy != nullptr && lora_a != nullptr && lora_b != nullptr &&
                  workspace != nullptr && da != nullptr && db != nullptr);
  HOPTUNE_REQUIRE(m >= 1 && lora_grads_shape(k, n, rank));
  HOPTUNE_REQUIRE(ldx >= k && ldx % 8 == 0 && ldy >= n && ldy % 8 == 0);
  HOPTUNE_REQUIRE(dtype == DType::kBFloat16 || dtype == DType::kFloat16);
  const void* ptrs[] = {x, dy, workspace};
  for (const void* p : ptrs) HOPTUNE_REQUIRE(reinterpret_cast<uintptr_t>(p) % 16 == 0);
  const void* small[] = {lora_a, lora_b, da, db};
  for (const void* p : small) HOPTUNE_REQUIRE(reinterpret_cast<uintptr_t>(p) % 4 == 0);
  if (!zeroed) HOPTUNE_CUDA_TRY(lora_grads_zero(workspace, k, n, rank, stream));
  const GradsArgs a{x,
                    ldx,
                    dy,
                    ldy,
                    m,
                    k,
                    static_cast<const uint16_t*>(lora_a),
                    static_cast<const uint16_t*>(lora_b),
                    scale,
                    workspace,
                    workspace + k * rank,
                    reinterpret_cast<unsigned int*>(workspace + (k + n) * rank)};
  const int csize = static_cast<int>(k / kCols);
  return HOPTUNE_DISPATCH_HALF(
      dtype, T, [&]() -> cudaError_t { return launch_grads<T>(a, csize, n, da, db, stream); });
}

}  // namespace hoptune
