// A plain bf16 CUTLASS GEMM (TMA + wgmma, warp-specialized cooperative, persistent) for timing
// against PyTorch's (cuBLAS) GEMM on the QLoRA layer's two big products at M = 8192:
//   forward  y  = x  W'^T   (LAYOUT_NN 0: A [m, k] and B [n, k], both K-major)
//   backward dX = dY W'     (LAYOUT_NN 1: A [m, k] K-major, B [k, n] N-major)
// Compile-time choices: TILE_M x TILE_N, cluster CLUSTER_M x CLUSTER_N, STREAM_K (the stream-K
// scheduler with its heuristic decomposition and deterministic reduction, else the persistent
// data-parallel one). Built as a shared library with an extern "C" probe_run (build.sh).
#include <cuda_runtime_api.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/kernel_hardware_info.h"

#ifndef TILE_M
#define TILE_M 256
#endif
#ifndef TILE_N
#define TILE_N 128
#endif
#ifndef CLUSTER_M
#define CLUSTER_M 1
#endif
#ifndef CLUSTER_N
#define CLUSTER_N 1
#endif
#ifndef STREAM_K
#define STREAM_K 0
#endif
#ifndef LAYOUT_NN
#define LAYOUT_NN 0
#endif

namespace probe {
using namespace cute;
using Element = cutlass::bfloat16_t;
using TileShape = Shape<Int<TILE_M>, Int<TILE_N>, _64>;
using ClusterShape = Shape<Int<CLUSTER_M>, Int<CLUSTER_N>, _1>;
using LayoutB =
    std::conditional_t<LAYOUT_NN != 0, cutlass::layout::RowMajor, cutlass::layout::ColumnMajor>;

using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
    cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, cutlass::layout::RowMajor,
    8, Element, cutlass::layout::RowMajor, 8,
    cutlass::epilogue::TmaWarpSpecializedCooperative>::CollectiveOp;

using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
    cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, cutlass::layout::RowMajor, 8,
    Element, LayoutB, 8, float, TileShape, ClusterShape,
    cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
        sizeof(typename Epilogue::SharedStorage))>,
    cutlass::gemm::KernelTmaWarpSpecializedCooperative>::CollectiveOp;

using Kernel = cutlass::gemm::kernel::GemmUniversal<
    Shape<int, int, int, int>, Mainloop, Epilogue,
    std::conditional_t<STREAM_K != 0, cutlass::gemm::StreamKScheduler,
                       cutlass::gemm::PersistentScheduler>>;
using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

void* g_workspace = nullptr;
size_t g_workspace_bytes = 0;
int g_smem_set = 0;
}  // namespace probe
using namespace probe;

// 0 on success, else a cudaError_t (or 1000 + a refusal reason).
extern "C" int probe_run(const void* a, const void* b, void* d, int m, int n, int k,
                         void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  typename Kernel::StrideA sa{};
  get<0>(sa) = k;
  typename Kernel::StrideB sb{};
#if LAYOUT_NN
  get<1>(sb) = n;  // B viewed as [n, k]: n contiguous, k strided
#else
  get<0>(sb) = k;
#endif
  typename Kernel::StrideD sd{};
  get<0>(sd) = n;
  int dev = 0, sms = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 1001;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) return 1002;
  typename Gemm::Arguments args{};
  args.mode = cutlass::gemm::GemmUniversalMode::kGemm;
  args.problem_shape = {m, n, k, 1};
  args.mainloop.ptr_A = static_cast<const Element*>(a);
  args.mainloop.dA = sa;
  args.mainloop.ptr_B = static_cast<const Element*>(b);
  args.mainloop.dB = sb;
  args.epilogue.thread.alpha = 1.f;
  args.epilogue.thread.beta = 0.f;
  args.epilogue.ptr_C = nullptr;
  args.epilogue.ptr_D = static_cast<Element*>(d);
  args.epilogue.dD = sd;
  args.hw_info = cutlass::KernelHardwareInfo{dev, sms};
#if STREAM_K
  using Scheduler = typename Kernel::TileScheduler;
  args.scheduler.decomposition_mode = Scheduler::DecompositionMode::Heuristic;
  args.scheduler.reduction_mode = Scheduler::ReductionMode::Deterministic;
#endif
  if (!Kernel::can_implement(args)) return 1003;
  const size_t ws = Kernel::get_workspace_size(args);
  if (ws > g_workspace_bytes) {
    if (g_workspace) cudaFree(g_workspace);
    if (cudaMalloc(&g_workspace, ws) != cudaSuccess) return 1004;
    g_workspace_bytes = ws;
  }
  if (ws > 0 &&
      Kernel::initialize_workspace(args, g_workspace, stream) != cutlass::Status::kSuccess)
    return 1005;
  if (!g_smem_set) {
    const cudaError_t e = cudaFuncSetAttribute(cutlass::device_kernel<Kernel>,
                                               cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               Kernel::SharedStorageSize);
    if (e != cudaSuccess) return e;
    g_smem_set = 1;
  }
  typename Kernel::Params params = Kernel::to_underlying_arguments(args, g_workspace);
  if (Gemm::run(params, stream) != cutlass::Status::kSuccess) {
    const cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? 1006 : e;
  }
  return cudaGetLastError();
}
