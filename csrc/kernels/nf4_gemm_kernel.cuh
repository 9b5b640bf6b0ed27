// The fused NF4 GEMM's kernel (nf4_lora_gemm), shared by its two translation units:
// nf4_gemm.cu (the entry points; each output tile one CTA's work) and nf4_gemm_split.cu (each
// tile's K range split). Everything here is local to the unit that includes it.
//
// The fused NF4 forward for many rows of x: one CUTLASS sm_90a GEMM that reads the weight as
// 4-bit codes, y = x deq(W)^T + xs B^T + bias, with xs = s x A^T formed by the caller.
//
// Orientation: the weight is CUTLASS's A operand (out_features on the M side, K-major as stored),
// x the B operand (tokens on the N side, K-major), so D = W x^T is y^T, and y [m, n] row-major is
// D column-major. The mainloop is CUTLASS's mixed-input one (TMA + warp-specialized cooperative
// wgmma, A through registers), in its convert-and-scale mode with a scale type of our own:
//   * the codes travel as uint4b_t (bitsandbytes' bytes as they are);
//   * `Nf4Scale` (an fp32 in a struct) is the type the codes are converted to: the conversion looks
//     the code values up in a 16-entry table in shared memory, the scale multiply is an fp32
//     multiply, and the conversion to bf16 rounds once, so every decoded weight is
//     bf16_round(code[q] * absmax), the bits nf4_dequantize writes;
//   * the scales are the decoded absmax, transposed to [k / blocksize, n] (nf4_absmax_transposed).
// bitsandbytes packs element 2j in the high nibble of byte j, uint4b_t in the low one; the
// register fragment keeps each byte's two elements together and in order (k even, k + 1), so the
// converter swaps the pair.
//
// The LoRA term is added to the accumulators before the epilogue: each consumer warp's share of
// the wgmma accumulators (16 rows x the tile's 64-256 tokens) is laid out as m16n8 mma.sync
// fragments, so a rank-r product lora_b[rows, r] xs[cols, r]^T is r / 16 x tokens / 8 mma.sync per
// warp, from registers loaded straight from global memory. The epilogue then adds the bias
// (CUTLASS's per-row bias) and stores bf16 through TMA.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <type_traits>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/kernel_hardware_info.h"
#include "cutlass/numeric_conversion.h"
#include "hoptune/common/mma.cuh"
#include "hoptune/common/occupancy.h"
#include "hoptune/nf4.cuh"
#include "hoptune/nf4_gemm.cuh"

namespace hoptune {
namespace {  // everything here is local to each translation unit that includes it

// The type the codes are converted to before the scale multiply: an fp32 value. Its own type (not
// float) so that the uint4b_t conversion to it can be the NF4 table lookup below.
struct Nf4Scale {
  float v;
};

CUTLASS_HOST_DEVICE Nf4Scale& operator*=(Nf4Scale& a, Nf4Scale const& b) {
  a.v = a.v * b.v;
  return a;
}

// The code table sits at the start of dynamic shared memory (the kernel's own storage follows,
// kTableBytes later, keeping its 1024-byte alignment); one byte permute gives a code's address.
constexpr int kTableBytes = 1024;
__constant__ float kNF4GemmCode[16] = {HOPTUNE_NF4_CODE_VALUES};
extern __shared__ __align__(1024) char nf4_gemm_smem[];

}  // namespace
}  // namespace hoptune

namespace cutlass {

// Codes (uint4b_t, bitsandbytes' nibble order) to their NF4 values.
template <int N, FloatRoundStyle Round>
struct NumericArrayConverter<hoptune::Nf4Scale, uint4b_t, N, Round> {
  static_assert(N % 8 == 0, "whole 32-bit words of codes");
  using result_type = Array<hoptune::Nf4Scale, N>;
  using source_type = Array<uint4b_t, N>;

  CUTLASS_DEVICE static result_type convert(source_type const& s) {
    result_type r;
    const uint32_t* w = reinterpret_cast<const uint32_t*>(&s);
    const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(hoptune::nf4_gemm_smem));
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N / 8; ++i) {
      const uint32_t hi = (w[i] >> 2) & 0x3c3c3c3cu;  // 4 x the high nibbles: elements 2j
      const uint32_t lo = (w[i] << 2) & 0x3c3c3c3cu;  // 4 x the low nibbles: elements 2j + 1
      CUTLASS_PRAGMA_UNROLL
      for (int b = 0; b < 4; ++b) {
        // the table's address (256-byte aligned, low byte 0) with the byte of 4 q as its low byte
        const uint32_t even = __byte_perm(hi, base, 0x7650u | b);
        const uint32_t odd = __byte_perm(lo, base, 0x7650u | b);
        asm("ld.shared.f32 %0, [%1];" : "=f"(r[8 * i + 2 * b].v) : "r"(even));
        asm("ld.shared.f32 %0, [%1];" : "=f"(r[8 * i + 2 * b + 1].v) : "r"(odd));
      }
    }
    return r;
  }
  CUTLASS_DEVICE result_type operator()(source_type const& s) const { return convert(s); }
};

// The scaled values to bf16: one rounding, pairs at a time.
template <int N, FloatRoundStyle Round>
struct NumericArrayConverter<bfloat16_t, hoptune::Nf4Scale, N, Round> {
  static_assert(N % 2 == 0, "pairs");
  using result_type = Array<bfloat16_t, N>;
  using source_type = Array<hoptune::Nf4Scale, N>;

  CUTLASS_DEVICE static result_type convert(source_type const& s) {
    result_type r;
    __nv_bfloat162* out = reinterpret_cast<__nv_bfloat162*>(&r);
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N / 2; ++i) out[i] = __floats2bfloat162_rn(s[2 * i].v, s[2 * i + 1].v);
    return r;
  }
  CUTLASS_DEVICE result_type operator()(source_type const& s) const { return convert(s); }
};

}  // namespace cutlass

namespace hoptune {
namespace {

using namespace cute;

constexpr int kTileM = 128;  // weight rows (out_features) per CTA
using ClusterShape = Shape<_1, _1, _1>;
using Bf16 = cutlass::bfloat16_t;

struct LoraTerm {
  const uint32_t* xs = nullptr;      // [m, rank] bf16 pairs
  const uint32_t* lora_b = nullptr;  // [n, rank] bf16 pairs
  int rank = 0;
  int64_t m = 0;
  int64_t n = 0;
};

// CUTLASS's TMA epilogue with the LoRA product added to the accumulators first; kTileN tokens per
// CTA.
template <class Base, int kTileN>
struct LoraEpilogue : Base {
  struct Arguments : Base::Arguments {
    LoraTerm lora;
  };
  struct Params : Base::Params {
    LoraTerm lora;
  };

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const& problem,
                                                  Arguments const& args, void* workspace) {
    return Params{Base::to_underlying_arguments(problem, args, workspace), args.lora};
  }

  CUTLASS_HOST_DEVICE LoraEpilogue(Params const& params, typename Base::TensorStorage& storage)
      : Base(params, storage), lora_(params.lora) {}

  template <class ProblemShapeMNKL, class TileShapeMNK, class TileCoordMNKL, class AccEngine,
            class AccLayout, class TiledMma>
  CUTLASS_DEVICE auto store(typename Base::LoadPipeline load_pipeline,
                            typename Base::LoadPipelineState load_state,
                            typename Base::StorePipeline store_pipeline,
                            typename Base::StorePipelineState store_state, ProblemShapeMNKL problem,
                            TileShapeMNK tile, TileCoordMNKL coord,
                            cute::Tensor<AccEngine, AccLayout> accumulators, TiledMma tiled_mma,
                            int thread_idx, typename Base::TensorStorage& storage,
                            int subtile_idx = -1) {
    if (lora_.rank > 0) add_lora(accumulators, get<0>(coord), get<1>(coord), thread_idx);
    return Base::store(load_pipeline, load_state, store_pipeline, store_state, problem, tile, coord,
                       accumulators, tiled_mma, thread_idx, storage, subtile_idx);
  }

 private:
  // acc(4 j + v): the m16n8 fragment of columns 8 j .. 8 j + 7 of this warp's 16 rows (rows
  // 16 w + lane / 4 (+ 8 for v >= 2), columns 8 j + 2 (lane % 4) + v % 2), w = the consumer warp
  template <class Acc>
  CUTLASS_DEVICE void add_lora(Acc& acc, int m_blk, int n_blk, int thread_idx) const {
    static_assert(decltype(size(acc))::value == kTileN / 2,
                  "64 x kTileN accumulators per warpgroup");
    const int lane = thread_idx % 32, warp = thread_idx / 32;
    const int g = lane / 4, t = lane % 4;
    const int64_t row = static_cast<int64_t>(m_blk) * kTileM + 16 * warp + g;
    const int64_t col = static_cast<int64_t>(n_blk) * kTileN + g;
    const int pairs = lora_.rank / 2;
    const bool row_ok[2] = {row < lora_.n, row + 8 < lora_.n};
    for (int k0 = 0; k0 < pairs; k0 += 8) {  // 16 ranks per step: pairs k0 + t and k0 + t + 4
      const bool k_ok[2] = {k0 + t < pairs, k0 + t + 4 < pairs};
      uint32_t a[4];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t* b = lora_.lora_b + (row + 8 * h) * pairs + k0 + t;
        a[h] = row_ok[h] && k_ok[0] ? __ldg(b) : 0u;
        a[2 + h] = row_ok[h] && k_ok[1] ? __ldg(b + 4) : 0u;
      }
#pragma unroll
      for (int j = 0; j < kTileN / 8; ++j) {
        const int64_t c = col + 8 * j;
        const uint32_t* x = lora_.xs + c * pairs + k0 + t;
        const bool c_ok = c < lora_.m;
        const uint32_t b0 = c_ok && k_ok[0] ? __ldg(x) : 0u;
        const uint32_t b1 = c_ok && k_ok[1] ? __ldg(x + 4) : 0u;
        float d[4] = {acc(4 * j), acc(4 * j + 1), acc(4 * j + 2), acc(4 * j + 3)};
        mma_16816<__nv_bfloat16>(d, a, b0, b1);
        acc(4 * j) = d[0];
        acc(4 * j + 1) = d[1];
        acc(4 * j + 2) = d[2];
        acc(4 * j + 3) = d[3];
      }
    }
  }

  LoraTerm lora_;
};

namespace fusion = cutlass::epilogue::fusion;

// The kernel for kTileN tokens per CTA (256 for many rows; 192, 128 or 64 waste less of a tile
// when there are fewer: the wgmma runs on the whole tile), each output tile one CTA's work (kSplit
// false: CUTLASS's persistent scheduler), or with the K range split (kSplit: its stream-K
// scheduler, which also does split-K; it costs ~5% in the unsplit case, hence two kernels).
template <int kTileN, bool kSplit>
struct Config {
  using TileShape = Shape<Int<kTileM>, Int<kTileN>, _64>;
  using BaseEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void,
      cutlass::layout::ColumnMajor, 8, Bf16, cutlass::layout::ColumnMajor, 8,
      cutlass::epilogue::TmaWarpSpecializedCooperative,
      fusion::LinCombPerRowBias<Bf16, float, Bf16, Bf16, float>>::CollectiveOp;
  using Epilogue = LoraEpilogue<BaseEpilogue, kTileN>;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cute::tuple<cutlass::uint4b_t, Nf4Scale>,
      cutlass::layout::RowMajor, 32, Bf16, cutlass::layout::ColumnMajor, 8, float, TileShape,
      ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<
          static_cast<int>(sizeof(typename Epilogue::SharedStorage)) + kTableBytes>,
      cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;

  using BaseKernel = cutlass::gemm::kernel::GemmUniversal<
      Shape<int, int, int, int>, Mainloop, Epilogue,
      std::conditional_t<kSplit, cutlass::gemm::StreamKScheduler,
                         cutlass::gemm::PersistentScheduler>>;

  // The GEMM kernel behind the code table: the table first, then the kernel's own storage.
  struct Kernel : BaseKernel {
    static constexpr int SharedStorageSize = BaseKernel::SharedStorageSize + kTableBytes;
    CUTLASS_DEVICE void operator()(typename BaseKernel::Params const& params, char* smem) {
      if (threadIdx.x < 16) reinterpret_cast<float*>(smem)[threadIdx.x] = kNF4GemmCode[threadIdx.x];
      __syncthreads();
      BaseKernel::operator()(params, smem + kTableBytes);
    }
  };
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// The scratch's first part: the transposed absmax (n * k / blocksize floats), 256-byte aligned.
int64_t scales_bytes(const NF4LoraGemm& a) {
  return (a.n * (a.k / a.blocksize) * static_cast<int64_t>(sizeof(float)) + 255) / 256 * 256;
}

template <int kTileN, bool kSplit>
typename Config<kTileN, kSplit>::Gemm::Arguments make_args(const NF4LoraGemm& a, int dev) {
  using C = Config<kTileN, kSplit>;
  using Kernel = typename C::Kernel;
  typename Kernel::StrideA sa{};
  get<0>(sa) = a.k;  // the codes: rows of k elements
  typename Kernel::StrideB sb{};
  get<0>(sb) = a.ldx;
  typename Kernel::StrideD sd{};
  get<1>(sd) = a.ldy;
  typename C::Mainloop::StrideScale ss{};
  get<1>(ss) = a.n;

  typename C::Gemm::Arguments args{};
  args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
  // D = W x^T: the weight's rows are the GEMM's M, the tokens its N
  args.problem_shape = {static_cast<int>(a.n), static_cast<int>(a.m), static_cast<int>(a.k), 1};
  args.mainloop.ptr_A = reinterpret_cast<const cutlass::uint4b_t*>(a.packed);
  args.mainloop.dA = sa;
  args.mainloop.ptr_B = reinterpret_cast<const Bf16*>(a.x);
  args.mainloop.dB = sb;
  args.mainloop.ptr_S = reinterpret_cast<const Nf4Scale*>(a.scratch);
  args.mainloop.dS = ss;
  args.mainloop.group_size = a.blocksize;
  args.epilogue.thread.alpha = 1.f;
  args.epilogue.thread.beta = 0.f;
  args.epilogue.thread.bias_ptr = reinterpret_cast<const Bf16*>(a.bias);
  args.epilogue.ptr_C = nullptr;
  args.epilogue.ptr_D = reinterpret_cast<Bf16*>(a.y);
  args.epilogue.dD = sd;
  args.epilogue.lora.xs = reinterpret_cast<const uint32_t*>(a.xs);
  args.epilogue.lora.lora_b = reinterpret_cast<const uint32_t*>(a.lora_b);
  args.epilogue.lora.rank = a.rank;
  args.epilogue.lora.m = a.m;
  args.epilogue.lora.n = a.n;
  args.hw_info = cutlass::KernelHardwareInfo{dev, sm_count()};
  if constexpr (kSplit) {
    using Scheduler = typename Kernel::TileScheduler;
    using Mode = typename Scheduler::DecompositionMode;
    args.scheduler.splits = a.splits > 1 ? a.splits : 1;
    args.scheduler.decomposition_mode =
        a.splits == 0 ? Mode::Heuristic : (a.splits == 1 ? Mode::DataParallel : Mode::SplitK);
    // the partial sums added in the order of their K ranges: the same bits every run
    args.scheduler.reduction_mode = Scheduler::ReductionMode::Deterministic;
  }
  return args;
}

template <int kTileN, bool kSplit>
size_t workspace_bytes(const NF4LoraGemm& a, int dev) {
  return Config<kTileN, kSplit>::Kernel::get_workspace_size(make_args<kTileN, kSplit>(a, dev));
}

template <int kTileN, bool kSplit>
cudaError_t launch(const NF4LoraGemm& a, cudaStream_t stream) {
  using C = Config<kTileN, kSplit>;
  using Kernel = typename C::Kernel;
  static thread_local int smem_device = -1;
  int dev = 0;
  HOPTUNE_CUDA_TRY(cudaGetDevice(&dev));
  const typename C::Gemm::Arguments args = make_args<kTileN, kSplit>(a, dev);

  // Launched from params directly: GemmUniversalAdapter::initialize would also initialise
  // workspaces through the driver API, which this runtime-only module does not link. The split
  // work's flags are cleared by initialize_workspace (cudaMemsetAsync).
  if (!Kernel::can_implement(args)) return cudaErrorInvalidValue;
  void* workspace = static_cast<char*>(a.scratch) + scales_bytes(a);
  if (Kernel::get_workspace_size(args) > 0 &&
      Kernel::initialize_workspace(args, workspace, stream) != cutlass::Status::kSuccess) {
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? cudaErrorInvalidValue : err;
  }
  if (smem_device != dev) {
    HOPTUNE_CUDA_TRY(cudaFuncSetAttribute(cutlass::device_kernel<Kernel>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          Kernel::SharedStorageSize));
    smem_device = dev;
  }
  typename Kernel::Params params = Kernel::to_underlying_arguments(args, workspace);
  // The LoRA term is added in the epilogue's store, which a separate-reduction schedule would
  // call per subtile (CUTLASS 4.2 has that schedule disabled): refused rather than added twice.
  if constexpr (kSplit) {
    if (params.scheduler.requires_separate_reduction()) return cudaErrorNotSupported;
  }
  if (C::Gemm::run(params, stream) != cutlass::Status::kSuccess) {
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? cudaErrorLaunchFailure : err;
  }
  return cudaGetLastError();
}

// f(the tile as a compile-time constant) for tile_n tokens per CTA: 64, 128, 192, else 256.
template <class F>
auto with_tile(int tile_n, F&& f) {
  switch (tile_n) {
    case 64:
      return f(std::integral_constant<int, 64>{});
    case 128:
      return f(std::integral_constant<int, 128>{});
    case 192:
      return f(std::integral_constant<int, 192>{});
    default:
      return f(std::integral_constant<int, 256>{});
  }
}

template <bool kSplit>
cudaError_t launch_tile(const NF4LoraGemm& a, int tile_n, cudaStream_t stream) {
  return with_tile(tile_n, [&](auto t) { return launch<decltype(t)::value, kSplit>(a, stream); });
}

template <bool kSplit>
size_t workspace_tile(const NF4LoraGemm& a, int tile_n) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  return with_tile(tile_n,
                   [&](auto t) { return workspace_bytes<decltype(t)::value, kSplit>(a, dev); });
}

}  // namespace

// nf4_gemm_split.cu: the K-split kernels' launch and workspace (scratch past the scales)
cudaError_t nf4_lora_gemm_split(const NF4LoraGemm& a, int tile_n, cudaStream_t stream);
size_t nf4_lora_gemm_split_workspace(const NF4LoraGemm& a, int tile_n);

}  // namespace hoptune
