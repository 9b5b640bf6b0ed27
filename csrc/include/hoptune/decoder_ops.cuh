// A decoder layer's elementwise work, fused: RMSNorm, SiLU-and-multiply (SwiGLU), rotary
// embeddings. Each matches the PyTorch ops of transformers' Llama-family modules rounding for
// rounding (every product and sum in fp32, rounded to the tensor dtype where the model rounds), so
// a patched model computes what the original does; the kernels only save the passes over memory.
// dtype: bf16 or fp16 (kBFloat16 / kFloat16) throughout. Torch-free: pointers, sizes, strides in
// elements, a stream.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "hoptune/common/check.h"

namespace hoptune {

// y[i, :] = round(w * round(x[i, :] * rstd[i])), rstd[i] = rsqrt(mean(x[i, :]^2) + eps) in fp32
// (LlamaRMSNorm). x [rows, cols] rows ldx apart, y rows ldy apart, w [cols]; rstd [rows] fp32
// (written, may be null). cols % 8 == 0, ldx % 8 == 0, ldy % 8 == 0, pointers 16-byte aligned.
struct RmsNormForward {
  const void* x = nullptr;
  int64_t ldx = 0;
  const void* w = nullptr;
  void* y = nullptr;
  int64_t ldy = 0;
  float* rstd = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  float eps = 0.f;
  DType dtype = DType::kBFloat16;
};
cudaError_t rms_norm_forward(const RmsNormForward& a, cudaStream_t stream);

// The input gradient of rms_norm_forward, as autograd takes it through the model's ops:
// dh = round(dy * w), dx = round(rstd * dh - x * rstd^3 * mean(dh * x)) (fp32 inside).
// dy, x, dx [rows, cols] with their own row strides (multiples of 8), w [cols], rstd [rows].
struct RmsNormBackward {
  const void* dy = nullptr;
  int64_t lddy = 0;
  const void* x = nullptr;
  int64_t ldx = 0;
  const void* w = nullptr;
  const float* rstd = nullptr;
  void* dx = nullptr;
  int64_t lddx = 0;
  int64_t rows = 0;
  int64_t cols = 0;
  DType dtype = DType::kBFloat16;
};
cudaError_t rms_norm_backward(const RmsNormBackward& a, cudaStream_t stream);

// out = round(round(silu(gate)) * up) over n contiguous elements (act_fn(gate_proj(x)) *
// up_proj(x)); silu(g) = g / (1 + exp(-g)). Pointers 16-byte aligned; any n >= 1.
cudaError_t silu_mul_forward(const void* gate, const void* up, void* out, int64_t n, DType dtype,
                             cudaStream_t stream);

// Its gradients as autograd computes them: du = round(dout * round(silu(g))),
// dg = round(round(dout * up) * sig * (1 + g * (1 - sig))), sig = 1 / (1 + exp(-g)).
cudaError_t silu_mul_backward(const void* dout, const void* gate, const void* up, void* dgate,
                              void* dup, int64_t n, DType dtype, cudaStream_t stream);

// Rotary embedding of one tensor, transformers' apply_rotary_pos_emb for q or k:
//   out = round(round(x * cos) + round(rotate_half(x) * sin)), rotate_half(x) = [-x2, x1]
// x and out [B, H, S, D] with strides (sb, sh, ss, 1) each; cos, sin [B, S, D] with strides
// (cb, cs, 1) (cb may be 0: one table for the batch). backward = true computes the input gradient
// from the output gradient in x: round(round(g * cos) + rotate_half^T(round(g * sin))).
// D % 16 == 0, pointers 16-byte aligned, every stride but the last a multiple of 8.
struct Rope {
  const void* x = nullptr;
  int64_t xb = 0, xh = 0, xs = 0;
  void* out = nullptr;
  int64_t ob = 0, oh = 0, os = 0;
  const void* cos = nullptr;
  const void* sin = nullptr;
  int64_t cb = 0, cs = 0;
  int64_t batch = 0, heads = 0, seq = 0, dim = 0;
  bool backward = false;
  DType dtype = DType::kBFloat16;
};
cudaError_t rope(const Rope& a, cudaStream_t stream);

}  // namespace hoptune
