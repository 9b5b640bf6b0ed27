// The fused NF4 GEMM's entry points (the kernel: nf4_gemm_kernel.cuh) and its unsplit kernels,
// one CTA per output tile.
#include "nf4_gemm_kernel.cuh"

namespace hoptune {
namespace {

bool shape_ok(const NF4LoraGemm& a) {
  // (blocksize > 0 before the k % blocksize: 0 would divide by zero, a negative one would pass)
  return a.m > 0 && a.n > 0 && a.k > 0 && a.k % 64 == 0 && a.blocksize >= 64 &&
         a.blocksize % 64 == 0 && a.k % a.blocksize == 0 && a.m <= INT32_MAX && a.n <= INT32_MAX &&
         a.k <= INT32_MAX &&
         (a.tile_n == 64 || a.tile_n == 128 || a.tile_n == 192 || a.tile_n == 256) &&
         a.splits >= 0 && a.splits <= 16 && a.splits <= a.k / 64;
}

}  // namespace

size_t nf4_lora_gemm_scratch_bytes(const NF4LoraGemm& a) {
  if (!shape_ok(a)) return 0;
  const size_t ws = a.splits != 1 ? nf4_lora_gemm_split_workspace(a, a.tile_n)
                                  : workspace_tile<false>(a, a.tile_n);
  return static_cast<size_t>(scales_bytes(a)) + ws;
}

cudaError_t nf4_lora_gemm(const NF4LoraGemm& a, cudaStream_t stream) {
  const auto aligned = [](const void* p, int b) { return reinterpret_cast<uintptr_t>(p) % b == 0; };
  HOPTUNE_REQUIRE(a.x && a.packed && a.y && a.scratch && shape_ok(a));
  HOPTUNE_REQUIRE(a.n % 8 == 0 && a.ldx % 8 == 0 && a.ldy % 8 == 0 && a.ldx >= a.k && a.ldy >= a.n);
  HOPTUNE_REQUIRE(aligned(a.x, 16) && aligned(a.y, 16) && aligned(a.packed, 16) &&
                  aligned(a.scratch, 256));
  HOPTUNE_REQUIRE(a.rank >= 0 && a.rank <= 256 && a.rank % 2 == 0);
  HOPTUNE_REQUIRE(a.rank == 0 || (a.xs && a.lora_b && aligned(a.xs, 4) && aligned(a.lora_b, 4)));
  HOPTUNE_CUDA_TRY(nf4_absmax_transposed(a.absmax, a.n, a.k, a.blocksize,
                                         static_cast<float*>(a.scratch), stream));
  if (a.splits != 1) return nf4_lora_gemm_split(a, a.tile_n, stream);
  return launch_tile<false>(a, a.tile_n, stream);
}

}  // namespace hoptune
