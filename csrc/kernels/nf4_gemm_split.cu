// The fused NF4 GEMM with each output tile's K range split (split-K or stream-K; partial sums in
// the scratch): its own translation unit, so that the two schedulers' kernels compile in parallel.
#include "nf4_gemm_kernel.cuh"

namespace hoptune {

cudaError_t nf4_lora_gemm_split(const NF4LoraGemm& a, int tile_n, cudaStream_t stream) {
  return launch_tile<true>(a, tile_n, stream);
}

size_t nf4_lora_gemm_split_workspace(const NF4LoraGemm& a, int tile_n) {
  return workspace_tile<true>(a, tile_n);
}

}  // namespace hoptune
