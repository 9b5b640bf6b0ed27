// The fused NF4 GEMM's entry points (the kernel: nf4_gemm_kernel.cuh) and its unsplit kernels,
// one CTA per output tile.
#include "nf4_gemm_kernel.cuh"

namespace hoptune {
namespace {

constexpr int64_t kSmallTileMaxRows = 128;  // up to this many tokens: 128 per CTA, else 256

int pick_tile_n(const NF4LoraGemm& a) {
  return a.tile_n ? a.tile_n : (a.m <= kSmallTileMaxRows ? 128 : 256);
}

bool shape_ok(const NF4LoraGemm& a) {
  return a.m > 0 && a.n > 0 && a.k > 0 && a.k % 64 == 0 && a.blocksize % 64 == 0 &&
         a.k % a.blocksize == 0 && a.m <= INT32_MAX && a.n <= INT32_MAX && a.k <= INT32_MAX &&
         (a.tile_n == 0 || a.tile_n == 128 || a.tile_n == 256) && a.splits >= 0 && a.splits <= 16 &&
         a.splits <= a.k / 64;
}

}  // namespace

size_t nf4_lora_gemm_scratch_bytes(const NF4LoraGemm& a) {
  if (!shape_ok(a)) return 0;
  const int tile_n = pick_tile_n(a);
  size_t ws = 0;
  if (a.splits != 1) {
    ws = nf4_lora_gemm_split_workspace(a, tile_n);
  } else {
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return 0;
    ws = tile_n == 128 ? workspace_bytes<128, false>(a, dev) : workspace_bytes<256, false>(a, dev);
  }
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
  const int tile_n = pick_tile_n(a);
  if (a.splits != 1) return nf4_lora_gemm_split(a, tile_n, stream);
  return tile_n == 128 ? launch<128, false>(a, stream) : launch<256, false>(a, stream);
}

}  // namespace hoptune
