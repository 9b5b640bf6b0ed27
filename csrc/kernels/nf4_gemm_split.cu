// The fused NF4 GEMM with each output tile's K range split (split-K or stream-K; partial sums in
// the scratch): its own translation unit, so that the two schedulers' kernels compile in parallel.
#include "nf4_gemm_kernel.cuh"

namespace hoptune {

cudaError_t nf4_lora_gemm_split(const NF4LoraGemm& a, int tile_n, cudaStream_t stream) {
  return tile_n == 128 ? launch<128, true>(a, stream) : launch<256, true>(a, stream);
}

size_t nf4_lora_gemm_split_workspace(const NF4LoraGemm& a, int tile_n) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  return tile_n == 128 ? workspace_bytes<128, true>(a, dev) : workspace_bytes<256, true>(a, dev);
}

}  // namespace hoptune
