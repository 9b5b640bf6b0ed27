// The fused lm_head GEMM of the vocab-chunked log-prob path: one CUTLASS sm_90a GEMM whose
// epilogue turns each logit tile into the unnormalised softmax part of the gradient,
//
//   G[i, v] = exp(scale * (A_i . B_v) - shift_i)  (bf16)    s0_i = sum_v of the same (fp32)
//
// so the fp32 logits never reach memory: a chunk that went GEMM -> fp32 logits -> a streaming
// kernel -> bf16 G (12 bytes per logit through HBM) is now the GEMM writing 2 bytes per logit.
//
// Mainloop: TMA + wgmma, warp-specialized cooperative (two consumer warpgroups on a 256x192
// tile, no cluster), persistent. Epilogue: a CUTLASS epilogue visitor tree (EVT) over the fp32
// accumulators:
//   ExpShift(acc, shift[row])  ->  ColReduction (row sums within the tile: registers, then warp
//   shuffles; one plain store per row and tile into `partial`)  ->  bf16 store through TMA.
// The row sums stay per tile (no atomics), so s0 = the caller's sum over tiles is the same bits
// on every run. exp is exp2 of (scale * acc - shift) * log2(e), the same arithmetic as
// fused_logprob_vchunk, so the two paths agree to the rounding of the GEMM's accumulation order.
//
// The tile: the H200 runs these GEMMs at its board power cap, where the clock (and so the time)
// follows the energy each FLOP takes. On the 2048-row chunk, run back to back for 2.5 s (an
// experimental build of this kernel, the clock sampled by nvidia-smi; docs/KERNELS.md), the
// 256x192 tile without a cluster ran at 691-699 TFLOP/s and 1528-1577 MHz against 664-668 and
// 1470-1492 MHz for the earlier 256x128 tile with a 1x2 cluster (the configuration cuBLAS picks,
// which ran at the same 664-667); 256x128 without a cluster 664-666, 256x192 with a 1x2 cluster
// 633-638, with a 2x1 cluster 688-690, 256x160 531. Earlier (bench/results/
// logprob_gemm_variants.json): pingpong 128x128 and 128x192 tiles and a cooperative 128x256 tile
// at 0.81-1.04x cuBLAS, none faster inside the op; tile-scheduler swizzles 2, 4, 8 gained nothing.
#include <cuda_runtime_api.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/kernel_hardware_info.h"
#include "hoptune/common/occupancy.h"
#include "hoptune/logprob.cuh"

namespace hoptune {
namespace {

using namespace cute;

// exp(scale * acc - shift) for one fragment; `scale` is the node's argument.
struct ExpShiftArgs {
  float scale = 1.f;
};

template <class T>
struct ExpShift {
  using Arguments = ExpShiftArgs;
  CUTLASS_HOST_DEVICE T operator()(T acc, T shift, Arguments const& a) const {
    return exp2f((acc * a.scale - shift) * 1.4426950408889634f);
  }
};

template <int N>
struct ExpShift<cutlass::Array<float, N>> {
  using Arguments = ExpShiftArgs;
  CUTLASS_HOST_DEVICE cutlass::Array<float, N> operator()(cutlass::Array<float, N> const& acc,
                                                          cutlass::Array<float, N> const& shift,
                                                          Arguments const& a) const {
    cutlass::Array<float, N> r;
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) r[i] = exp2f((acc[i] * a.scale - shift[i]) * 1.4426950408889634f);
    return r;
  }
};

namespace fusion = cutlass::epilogue::fusion;
constexpr auto kRound = cutlass::FloatRoundStyle::round_to_nearest;

using TileShape = Shape<Int<kFusedLogprobTileM>, Int<kFusedLogprobTileN>, _64>;
using ClusterShape = Shape<_1, _1, _1>;
using Element = cutlass::bfloat16_t;
using RowVec = Stride<_1, _0, int64_t>;  // one value per row (M), broadcast along N

using ExpNode =
    fusion::Sm90EVT<fusion::Sm90Compute<ExpShift, float, float, kRound>, fusion::Sm90AccFetch,
                    fusion::Sm90ColBroadcast<0, TileShape, float, float, RowVec>>;
// FinalReduction = false: each tile stores its row sums into its own column of `partial`
using SumNode = fusion::Sm90EVT<
    fusion::Sm90ColReduction<cutlass::plus, cutlass::plus, cutlass::plus, 0, TileShape, float,
                             float, kRound, RowVec, 4, true, false>,
    ExpNode>;
using Tree = fusion::Sm90EVT<
    fusion::Sm90Compute<cutlass::epilogue::thread::Identity, Element, float, kRound>, SumNode>;

using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, cutlass::layout::RowMajor,
    8, Element, cutlass::layout::RowMajor, 8, cutlass::epilogue::TmaWarpSpecializedCooperative,
    Tree>::CollectiveOp;

using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, cutlass::layout::RowMajor, 8,
    Element, cutlass::layout::ColumnMajor, 8, float, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
        sizeof(typename Epilogue::SharedStorage))>,
    cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;

using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue,
                                                    cutlass::gemm::PersistentScheduler>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

}  // namespace

cudaError_t fused_logprob_gemm(const FusedLogprobGemm& a, cudaStream_t stream) {
  // TMA: 16-byte aligned rows; CUTLASS also wants the contiguous extents (k, n) in 8s
  if (a.m <= 0 || a.n <= 0 || a.k <= 0 || a.n % 8 || a.k % 8 || a.lda % 8 || a.ldb % 8 ||
      a.ldg % 8 || a.ldg < a.n || a.lda < a.k || a.ldb < a.k || !a.partial || !a.shift)
    return cudaErrorInvalidValue;
  // and 16-byte aligned bases: CUTLASS only asserts that (compiled out with NDEBUG), so a
  // misaligned one would launch with a TMA descriptor that failed to encode
  const auto aligned16 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (!a.a || !a.b || !a.g || !aligned16(a.a) || !aligned16(a.b) || !aligned16(a.g))
    return cudaErrorInvalidValue;

  typename Kernel::StrideA sa{};
  get<0>(sa) = a.lda;
  typename Kernel::StrideB sb{};
  get<0>(sb) = a.ldb;
  typename Kernel::StrideD sd{};
  get<0>(sd) = a.ldg;

  static thread_local int smem_device = -1;
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  const int sm_count = hoptune::sm_count();

  typename Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {a.m, a.n, a.k, 1},
      {reinterpret_cast<const Element*>(a.a), sa, reinterpret_cast<const Element*>(a.b), sb},
      {{}, nullptr, sd, reinterpret_cast<Element*>(a.g), sd},
      cutlass::KernelHardwareInfo{dev, sm_count}};
  // {children..., node args} at every level: Identity(Sum(Exp(acc, shift)))
  args.epilogue.thread = {{
                              {{}, {a.shift, 0.f, RowVec{_1{}, _0{}, 0}}, ExpShiftArgs{a.scale}},
                              {a.partial, 0.f, RowVec{_1{}, _0{}, 0}},
                          },
                          {}};

  // Launched from params directly: GemmUniversalAdapter::initialize would also initialise
  // workspaces through the driver API, which this runtime-only module does not link.
  if (!Kernel::can_implement(args)) return cudaErrorInvalidValue;
  if (Kernel::get_workspace_size(args) != 0) return cudaErrorInvalidValue;
  if (smem_device != dev) {
    err = cudaFuncSetAttribute(cutlass::device_kernel<Kernel>,
                               cudaFuncAttributeMaxDynamicSharedMemorySize,
                               Kernel::SharedStorageSize);
    if (err != cudaSuccess) return err;
    smem_device = dev;
  }
  typename Kernel::Params params = Kernel::to_underlying_arguments(args, nullptr);
  if (Gemm::run(params, stream) != cutlass::Status::kSuccess) {
    err = cudaGetLastError();
    return err == cudaSuccess ? cudaErrorLaunchFailure : err;
  }
  return cudaGetLastError();
}

}  // namespace hoptune
