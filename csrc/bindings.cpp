// hoptune._C: declarations and exports only. Pointers arrive as Python ints, the stream as
// its integer handle; each call returns None (label_stats: two ints) or raises RuntimeError naming
// the CUDA error.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>

#include "hoptune/cublaslt.h"
#include "hoptune/decoder_ops.cuh"
#include "hoptune/logprob.cuh"
#include "hoptune/lora.cuh"
#include "hoptune/nf4.cuh"
#include "hoptune/nf4_gemm.cuh"

namespace py = pybind11;
using hoptune::DType;

namespace {

void check(cudaError_t err, const char* op) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("hoptune._C.") + op + " failed: " + cudaGetErrorName(err) +
                             " (" + cudaGetErrorString(err) + ")");
  }
}

template <typename T>
T ptr(uintptr_t p) {
  return reinterpret_cast<T>(p);
}

cudaStream_t stream_of(uintptr_t s) {
  return reinterpret_cast<cudaStream_t>(s);
}

// An NF4 state's absmax as the kernels take it: plain fp32 (qabsmax 0) or nested.
hoptune::NF4Absmax nf4_absmax(uintptr_t absmax, uintptr_t qabsmax, uintptr_t absmax2,
                              uintptr_t code2, float offset, int blocksize2) {
  hoptune::NF4Absmax am;
  am.absmax = ptr<const float*>(absmax);
  am.qabsmax = ptr<const uint8_t*>(qabsmax);
  am.absmax2 = ptr<const float*>(absmax2);
  am.code2 = ptr<const float*>(code2);
  am.offset = offset;
  am.blocksize2 = blocksize2;
  return am;
}

// An event of the current device for stream_wait: one per device and host thread, created on first
// use and kept (a wait takes the event's last record when it is queued, so the next record may
// reuse it; per thread, so two threads' records and waits do not interleave).
cudaError_t wait_event_for_current_device(cudaEvent_t* out) {
  constexpr int kDevices = 64;
  thread_local cudaEvent_t events[kDevices] = {};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < 0 || device >= kDevices) return cudaErrorInvalidDevice;
  if (events[device] == nullptr) {
    err = cudaEventCreateWithFlags(&events[device], cudaEventDisableTiming);
    if (err != cudaSuccess) return err;
  }
  *out = events[device];
  return cudaSuccess;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "hoptune CUDA kernels (torch-free: raw device pointers, sizes and a CUDA stream)";
  m.attr("CUDA_RUNTIME_VERSION") = CUDART_VERSION;

  m.def(
      "nf4_dequantize",
      [](uintptr_t packed, uintptr_t absmax, uintptr_t qabsmax, uintptr_t absmax2, uintptr_t code2,
         float offset, int blocksize2, int64_t n, int blocksize, uintptr_t out, int out_dtype,
         uintptr_t stream, int variant) {
        const hoptune::NF4Absmax am =
            nf4_absmax(absmax, qabsmax, absmax2, code2, offset, blocksize2);
        check(
            hoptune::nf4_dequantize(ptr<const uint8_t*>(packed), am, n, blocksize, ptr<void*>(out),
                                    static_cast<DType>(out_dtype), stream_of(stream), variant),
            "nf4_dequantize");
      },
      py::arg("packed"), py::arg("absmax"), py::arg("qabsmax"), py::arg("absmax2"),
      py::arg("code2"), py::arg("offset"), py::arg("blocksize2"), py::arg("n"),
      py::arg("blocksize"), py::arg("out"), py::arg("out_dtype"), py::arg("stream"),
      py::arg("variant") = 0, py::call_guard<py::gil_scoped_release>());

  m.def(
      "nf4_dequantize_lora",
      [](uintptr_t packed, uintptr_t absmax, uintptr_t qabsmax, uintptr_t absmax2, uintptr_t code2,
         float offset, int blocksize2, int64_t rows, int64_t cols, int blocksize, uintptr_t lora_a,
         uintptr_t lora_b, int rank, float scale, uintptr_t out, int dtype, uintptr_t stream,
         int variant) {
        const hoptune::NF4Absmax am =
            nf4_absmax(absmax, qabsmax, absmax2, code2, offset, blocksize2);
        check(hoptune::nf4_dequantize_lora(ptr<const uint8_t*>(packed), am, rows, cols, blocksize,
                                           ptr<const void*>(lora_a), ptr<const void*>(lora_b), rank,
                                           scale, ptr<void*>(out), static_cast<DType>(dtype),
                                           stream_of(stream), variant),
              "nf4_dequantize_lora");
      },
      py::arg("packed"), py::arg("absmax"), py::arg("qabsmax"), py::arg("absmax2"),
      py::arg("code2"), py::arg("offset"), py::arg("blocksize2"), py::arg("rows"), py::arg("cols"),
      py::arg("blocksize"), py::arg("lora_a"), py::arg("lora_b"), py::arg("rank"), py::arg("scale"),
      py::arg("out"), py::arg("dtype"), py::arg("stream"), py::arg("variant") = 0,
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "nf4_small_m",
      [](uintptr_t x, int64_t ldx, int rows, uintptr_t packed, uintptr_t absmax, uintptr_t qabsmax,
         uintptr_t absmax2, uintptr_t code2, float offset, int blocksize2, int64_t n, int64_t k,
         int blocksize, uintptr_t xa, uintptr_t lora_b, int rank, float scale, uintptr_t bias,
         int slices, uintptr_t workspace, uintptr_t counters, uintptr_t y, int dtype,
         uintptr_t stream) {
        const hoptune::NF4Absmax am =
            nf4_absmax(absmax, qabsmax, absmax2, code2, offset, blocksize2);
        check(hoptune::nf4_small_m(ptr<const void*>(x), ldx, rows, ptr<const uint8_t*>(packed), am,
                                   n, k, blocksize, ptr<const float*>(xa), ptr<const void*>(lora_b),
                                   rank, scale, ptr<const void*>(bias), slices,
                                   ptr<float*>(workspace), ptr<int*>(counters), ptr<void*>(y),
                                   static_cast<DType>(dtype), stream_of(stream)),
              "nf4_small_m");
      },
      py::arg("x"), py::arg("ldx"), py::arg("rows"), py::arg("packed"), py::arg("absmax"),
      py::arg("qabsmax"), py::arg("absmax2"), py::arg("code2"), py::arg("offset"),
      py::arg("blocksize2"), py::arg("n"), py::arg("k"), py::arg("blocksize"), py::arg("xa"),
      py::arg("lora_b"), py::arg("rank"), py::arg("scale"), py::arg("bias"), py::arg("slices"),
      py::arg("workspace"), py::arg("counters"), py::arg("y"), py::arg("dtype"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "nf4_lora_gemm",
      [](uintptr_t x, int64_t ldx, int64_t rows, uintptr_t packed, uintptr_t absmax,
         uintptr_t qabsmax, uintptr_t absmax2, uintptr_t code2, float offset, int blocksize2,
         int64_t n, int64_t k, int blocksize, uintptr_t scratch, uintptr_t xs, uintptr_t lora_b,
         int rank, uintptr_t bias, uintptr_t y, int64_t ldy, int tile_n, int splits,
         uintptr_t stream) {
        hoptune::NF4LoraGemm a;
        a.x = ptr<const void*>(x);
        a.ldx = ldx;
        a.m = rows;
        a.packed = ptr<const uint8_t*>(packed);
        a.absmax = nf4_absmax(absmax, qabsmax, absmax2, code2, offset, blocksize2);
        a.n = n;
        a.k = k;
        a.blocksize = blocksize;
        a.scratch = ptr<void*>(scratch);
        a.xs = ptr<const void*>(xs);
        a.lora_b = ptr<const void*>(lora_b);
        a.rank = rank;
        a.bias = ptr<const void*>(bias);
        a.y = ptr<void*>(y);
        a.ldy = ldy;
        a.tile_n = tile_n;
        a.splits = splits;
        check(hoptune::nf4_lora_gemm(a, stream_of(stream)), "nf4_lora_gemm");
      },
      py::arg("x"), py::arg("ldx"), py::arg("rows"), py::arg("packed"), py::arg("absmax"),
      py::arg("qabsmax"), py::arg("absmax2"), py::arg("code2"), py::arg("offset"),
      py::arg("blocksize2"), py::arg("n"), py::arg("k"), py::arg("blocksize"), py::arg("scratch"),
      py::arg("xs"), py::arg("lora_b"), py::arg("rank"), py::arg("bias"), py::arg("y"),
      py::arg("ldy"), py::arg("tile_n"), py::arg("splits"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "nf4_lora_gemm_scratch_bytes",
      [](int64_t rows, int64_t n, int64_t k, int blocksize, int tile_n, int splits) {
        hoptune::NF4LoraGemm a;
        a.m = rows;
        a.n = n;
        a.k = k;
        a.blocksize = blocksize;
        a.tile_n = tile_n;
        a.splits = splits;
        const size_t bytes = hoptune::nf4_lora_gemm_scratch_bytes(a);
        if (bytes == 0) throw std::invalid_argument("nf4_lora_gemm_scratch_bytes: invalid shape");
        return bytes;
      },
      py::arg("rows"), py::arg("n"), py::arg("k"), py::arg("blocksize"), py::arg("tile_n"),
      py::arg("splits"));

  m.def(
      "lora_dy_pass",
      [](uintptr_t dy, int64_t ldy, int64_t rows, int64_t n, uintptr_t lora_b, uintptr_t xa,
         int rank, float scale, uintptr_t workspace, uintptr_t dxa, uintptr_t db, int dtype,
         uintptr_t stream) {
        check(hoptune::lora_dy_pass(ptr<const void*>(dy), ldy, rows, n, ptr<const void*>(lora_b),
                                    ptr<const void*>(xa), rank, scale, ptr<float*>(workspace),
                                    ptr<void*>(dxa), ptr<void*>(db), static_cast<DType>(dtype),
                                    stream_of(stream)),
              "lora_dy_pass");
      },
      py::arg("dy"), py::arg("ldy"), py::arg("rows"), py::arg("n"), py::arg("lora_b"),
      py::arg("xa"), py::arg("rank"), py::arg("scale"), py::arg("workspace"), py::arg("dxa"),
      py::arg("db"), py::arg("dtype"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());

  m.def(
      "lora_grads",
      [](uintptr_t x, int64_t ldx, uintptr_t dy, int64_t ldy, int64_t rows, int64_t k, int64_t n,
         uintptr_t lora_a, uintptr_t lora_b, int rank, float scale, uintptr_t workspace,
         uintptr_t da, uintptr_t db, int dtype, uintptr_t stream, bool zeroed) {
        check(hoptune::lora_grads(ptr<const void*>(x), ldx, ptr<const void*>(dy), ldy, rows, k, n,
                                  ptr<const void*>(lora_a), ptr<const void*>(lora_b), rank, scale,
                                  ptr<float*>(workspace), zeroed, ptr<void*>(da), ptr<void*>(db),
                                  static_cast<DType>(dtype), stream_of(stream)),
              "lora_grads");
      },
      py::arg("x"), py::arg("ldx"), py::arg("dy"), py::arg("ldy"), py::arg("rows"), py::arg("k"),
      py::arg("n"), py::arg("lora_a"), py::arg("lora_b"), py::arg("rank"), py::arg("scale"),
      py::arg("workspace"), py::arg("da"), py::arg("db"), py::arg("dtype"), py::arg("stream"),
      py::arg("zeroed") = false, py::call_guard<py::gil_scoped_release>());
  m.def(
      "lora_grads_zero",
      [](uintptr_t workspace, int64_t k, int64_t n, int rank, uintptr_t stream) {
        check(hoptune::lora_grads_zero(ptr<float*>(workspace), k, n, rank, stream_of(stream)),
              "lora_grads_zero");
      },
      py::arg("workspace"), py::arg("k"), py::arg("n"), py::arg("rank"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "nf4_quantize",
      [](uintptr_t x, int dtype, int64_t n, int blocksize, uintptr_t packed, uintptr_t absmax,
         uintptr_t bad_flag, uintptr_t stream) {
        check(hoptune::nf4_quantize(ptr<const void*>(x), static_cast<DType>(dtype), n, blocksize,
                                    ptr<uint8_t*>(packed), ptr<float*>(absmax), ptr<int*>(bad_flag),
                                    stream_of(stream)),
              "nf4_quantize");
      },
      py::arg("x"), py::arg("dtype"), py::arg("n"), py::arg("blocksize"), py::arg("packed"),
      py::arg("absmax"), py::arg("bad_flag"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "nf4_quantize_nested",
      [](uintptr_t absmax, int64_t nblocks, float offset, uintptr_t code2, int blocksize2,
         uintptr_t qabsmax, uintptr_t absmax2, uintptr_t stream) {
        check(hoptune::nf4_quantize_nested(
                  ptr<const float*>(absmax), nblocks, offset, ptr<const float*>(code2), blocksize2,
                  ptr<uint8_t*>(qabsmax), ptr<float*>(absmax2), stream_of(stream)),
              "nf4_quantize_nested");
      },
      py::arg("absmax"), py::arg("nblocks"), py::arg("offset"), py::arg("code2"),
      py::arg("blocksize2"), py::arg("qabsmax"), py::arg("absmax2"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>());

  // logits viewed as [batch, seq, vocab] with strides (stride_b, stride_t, 1) in elements
  m.def(
      "token_logprobs_fwd",
      [](uintptr_t logits, int dtype, int64_t batch, int64_t seq, int64_t vocab, int64_t stride_b,
         int64_t stride_t, uintptr_t labels, int64_t ignore_index, float inv_temperature,
         uintptr_t logp, uintptr_t entropy, uintptr_t lse, uintptr_t stream, int variant) {
        hoptune::TokenLogprobFwd a;
        a.logits = {ptr<const void*>(logits),
                    static_cast<DType>(dtype),
                    batch,
                    seq,
                    vocab,
                    stride_b,
                    stride_t};
        a.labels = ptr<const int64_t*>(labels);
        a.ignore_index = ignore_index;
        a.inv_temperature = inv_temperature;
        a.logp = ptr<float*>(logp);
        a.entropy = ptr<float*>(entropy);
        a.lse = ptr<float*>(lse);
        check(hoptune::token_logprobs_fwd(a, stream_of(stream), variant), "token_logprobs_fwd");
      },
      py::arg("logits"), py::arg("dtype"), py::arg("batch"), py::arg("seq"), py::arg("vocab"),
      py::arg("stride_b"), py::arg("stride_t"), py::arg("labels"), py::arg("ignore_index"),
      py::arg("inv_temperature"), py::arg("logp"), py::arg("entropy"), py::arg("lse"),
      py::arg("stream"), py::arg("variant") = 0, py::call_guard<py::gil_scoped_release>());

  m.def(
      "token_logprobs_bwd",
      [](uintptr_t logits, int dtype, int64_t batch, int64_t seq, int64_t vocab, int64_t stride_b,
         int64_t stride_t, uintptr_t labels, int64_t ignore_index, float inv_temperature,
         uintptr_t lse, uintptr_t entropy, uintptr_t grad_logp, uintptr_t grad_entropy,
         uintptr_t dlogits, uintptr_t stream, int variant) {
        hoptune::TokenLogprobBwd a;
        a.logits = {ptr<const void*>(logits),
                    static_cast<DType>(dtype),
                    batch,
                    seq,
                    vocab,
                    stride_b,
                    stride_t};
        a.labels = ptr<const int64_t*>(labels);
        a.ignore_index = ignore_index;
        a.inv_temperature = inv_temperature;
        a.lse = ptr<const float*>(lse);
        a.entropy = ptr<const float*>(entropy);
        a.grad_logp = ptr<const float*>(grad_logp);
        a.grad_entropy = ptr<const float*>(grad_entropy);
        a.dlogits = ptr<void*>(dlogits);
        check(hoptune::token_logprobs_bwd(a, stream_of(stream), variant), "token_logprobs_bwd");
      },
      py::arg("logits"), py::arg("dtype"), py::arg("batch"), py::arg("seq"), py::arg("vocab"),
      py::arg("stride_b"), py::arg("stride_t"), py::arg("labels"), py::arg("ignore_index"),
      py::arg("inv_temperature"), py::arg("lse"), py::arg("entropy"), py::arg("grad_logp"),
      py::arg("grad_entropy"), py::arg("dlogits"), py::arg("stream"), py::arg("variant") = 0,
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "fused_logprob_chunk",
      [](uintptr_t buf, int64_t rows, int64_t vocab, int64_t ld, uintptr_t labels, uintptr_t bias,
         float logit_scale, float softcap, float inv_temperature, uintptr_t logp, uintptr_t entropy,
         uintptr_t lse, int grad_dtype, bool write_grad, uintptr_t row_scale, uintptr_t label_coef,
         bool shifted, uintptr_t row_norm, uintptr_t overflow, uintptr_t stream) {
        hoptune::FusedLogprobChunk a;
        a.buf = ptr<float*>(buf);
        a.rows = rows;
        a.vocab = vocab;
        a.ld = ld;
        a.labels = ptr<const int64_t*>(labels);
        a.bias = ptr<const float*>(bias);
        a.logit_scale = logit_scale;
        a.softcap = softcap;
        a.inv_temperature = inv_temperature;
        a.logp = ptr<float*>(logp);
        a.entropy = ptr<float*>(entropy);
        a.lse = ptr<float*>(lse);
        a.grad_dtype = static_cast<DType>(grad_dtype);
        a.write_grad = write_grad;
        a.row_scale = ptr<const float*>(row_scale);
        a.label_coef = ptr<float*>(label_coef);
        a.shifted = shifted;
        a.row_norm = ptr<float*>(row_norm);
        a.overflow = ptr<int*>(overflow);
        check(hoptune::fused_logprob_chunk(a, stream_of(stream)), "fused_logprob_chunk");
      },
      py::arg("buf"), py::arg("rows"), py::arg("vocab"), py::arg("ld"), py::arg("labels"),
      py::arg("bias"), py::arg("logit_scale"), py::arg("softcap"), py::arg("inv_temperature"),
      py::arg("logp"), py::arg("entropy"), py::arg("lse"), py::arg("grad_dtype"),
      py::arg("write_grad"), py::arg("row_scale"), py::arg("label_coef"), py::arg("shifted"),
      py::arg("row_norm"), py::arg("overflow"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>());

  m.def(
      "fused_logprob_vchunk",
      [](uintptr_t buf, int64_t rows, int64_t cols, int64_t ld, int64_t col0, uintptr_t labels,
         uintptr_t bias, float logit_scale, float softcap, float inv_temperature, uintptr_t ref,
         uintptr_t s0, uintptr_t s1, bool accumulate, uintptr_t label_logit, int grad_dtype,
         bool write_grad, uintptr_t row_scale, uintptr_t label_coef, uintptr_t overflow,
         uintptr_t stream) {
        hoptune::FusedLogprobVChunk a;
        a.buf = ptr<float*>(buf);
        a.rows = rows;
        a.cols = cols;
        a.ld = ld;
        a.col0 = col0;
        a.labels = ptr<const int64_t*>(labels);
        a.bias = ptr<const float*>(bias);
        a.logit_scale = logit_scale;
        a.softcap = softcap;
        a.inv_temperature = inv_temperature;
        a.ref = ptr<const float*>(ref);
        a.s0 = ptr<float*>(s0);
        a.s1 = ptr<float*>(s1);
        a.accumulate = accumulate;
        a.label_logit = ptr<float*>(label_logit);
        a.grad_dtype = static_cast<DType>(grad_dtype);
        a.write_grad = write_grad;
        a.row_scale = ptr<const float*>(row_scale);
        a.label_coef = ptr<float*>(label_coef);
        a.overflow = ptr<int*>(overflow);
        check(hoptune::fused_logprob_vchunk(a, stream_of(stream)), "fused_logprob_vchunk");
      },
      py::arg("buf"), py::arg("rows"), py::arg("cols"), py::arg("ld"), py::arg("col0"),
      py::arg("labels"), py::arg("bias"), py::arg("logit_scale"), py::arg("softcap"),
      py::arg("inv_temperature"), py::arg("ref"), py::arg("s0"), py::arg("s1"),
      py::arg("accumulate"), py::arg("label_logit"), py::arg("grad_dtype"), py::arg("write_grad"),
      py::arg("row_scale"), py::arg("label_coef"), py::arg("overflow"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "fused_logprob_gemm_shift",
      [](uintptr_t h, int64_t ldh, uintptr_t w, int64_t ldw, uintptr_t labels, int64_t rows,
         int64_t k, int64_t vocab, float scale, uintptr_t shift, uintptr_t stream) {
        hoptune::FusedLogprobGemmRows a;
        a.h = ptr<const void*>(h);
        a.ldh = ldh;
        a.w = ptr<const void*>(w);
        a.ldw = ldw;
        a.labels = ptr<const int64_t*>(labels);
        a.rows = rows;
        a.k = k;
        a.vocab = vocab;
        a.scale = scale;
        a.shift = ptr<float*>(shift);
        check(hoptune::fused_logprob_gemm_shift(a, stream_of(stream)), "fused_logprob_gemm_shift");
      },
      py::arg("h"), py::arg("ldh"), py::arg("w"), py::arg("ldw"), py::arg("labels"),
      py::arg("rows"), py::arg("k"), py::arg("vocab"), py::arg("scale"), py::arg("shift"),
      py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "fused_logprob_gemm_finish",
      [](uintptr_t partial, int64_t n_partial, int64_t ldp, uintptr_t tail, uintptr_t shift,
         uintptr_t labels, int64_t rows, int64_t vocab, float scale, float max_s0, uintptr_t logp,
         uintptr_t lse, uintptr_t overflow, uintptr_t acc, int64_t ld_acc, uintptr_t w, int64_t ldw,
         int64_t k, uintptr_t stream) {
        hoptune::FusedLogprobGemmRows a;
        a.partial = ptr<const float*>(partial);
        a.n_partial = n_partial;
        a.ldp = ldp;
        a.tail = ptr<const float*>(tail);
        a.shift = ptr<float*>(shift);
        a.labels = ptr<const int64_t*>(labels);
        a.rows = rows;
        a.vocab = vocab;
        a.scale = scale;
        a.max_s0 = max_s0;
        a.logp = ptr<float*>(logp);
        a.lse = ptr<float*>(lse);
        a.overflow = ptr<int*>(overflow);
        a.acc = ptr<float*>(acc);
        a.ld_acc = ld_acc;
        a.w = ptr<const void*>(w);
        a.ldw = ldw;
        a.k = k;
        check(hoptune::fused_logprob_gemm_finish(a, stream_of(stream)),
              "fused_logprob_gemm_finish");
      },
      py::arg("partial"), py::arg("n_partial"), py::arg("ldp"), py::arg("tail"), py::arg("shift"),
      py::arg("labels"), py::arg("rows"), py::arg("vocab"), py::arg("scale"), py::arg("max_s0"),
      py::arg("logp"), py::arg("lse"), py::arg("overflow"), py::arg("acc"), py::arg("ld_acc"),
      py::arg("w"), py::arg("ldw"), py::arg("k"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "scale_rows",
      [](uintptr_t j, int64_t ld_j, uintptr_t row_scale, uintptr_t out, int out_dtype, int64_t rows,
         int64_t k, uintptr_t stream) {
        hoptune::ScaleRows a;
        a.j = ptr<const float*>(j);
        a.ld_j = ld_j;
        a.row_scale = ptr<const float*>(row_scale);
        a.out = ptr<void*>(out);
        a.out_dtype = static_cast<DType>(out_dtype);
        a.rows = rows;
        a.k = k;
        check(hoptune::scale_rows(a, stream_of(stream)), "scale_rows");
      },
      py::arg("j"), py::arg("ld_j"), py::arg("row_scale"), py::arg("out"), py::arg("out_dtype"),
      py::arg("rows"), py::arg("k"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "label_stats",
      [](uintptr_t labels, int64_t n, int64_t ignore_index, int64_t vocab, uintptr_t host_out,
         uintptr_t stream) {
        // host_out: two int64 of pinned host memory, which the kernel writes through its mapping
        void* dev = nullptr;
        const cudaError_t err = cudaHostGetDevicePointer(&dev, ptr<void*>(host_out), 0);
        if (err != cudaSuccess) {
          cudaGetLastError();  // not sticky: clear it so that no later launch check reports it
          check(err, "label_stats (host_out must be mapped pinned memory)");
        }
        hoptune::LabelStats a;
        a.labels = ptr<const int64_t*>(labels);
        a.n = n;
        a.ignore_index = ignore_index;
        a.vocab = vocab;
        a.out = static_cast<int64_t*>(dev);
        check(hoptune::label_stats(a, stream_of(stream)), "label_stats");
        check(cudaStreamSynchronize(stream_of(stream)), "label_stats");
        const int64_t* out = ptr<const int64_t*>(host_out);
        return std::make_pair(out[0], out[1]);
      },
      py::arg("labels"), py::arg("n"), py::arg("ignore_index"), py::arg("vocab"),
      py::arg("host_out"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.attr("FUSED_LOGPROB_GEMM_TILE") =
      py::make_tuple(hoptune::kFusedLogprobTileM, hoptune::kFusedLogprobTileN);
  m.def(
      "fused_logprob_gemm",
      [](uintptr_t a, int64_t lda, uintptr_t b, int64_t ldb, uintptr_t g, int64_t ldg, int m, int n,
         int k, float scale, uintptr_t shift, uintptr_t partial, uintptr_t stream) {
        hoptune::FusedLogprobGemm p;
        p.a = ptr<const void*>(a);
        p.lda = lda;
        p.b = ptr<const void*>(b);
        p.ldb = ldb;
        p.g = ptr<void*>(g);
        p.ldg = ldg;
        p.m = m;
        p.n = n;
        p.k = k;
        p.scale = scale;
        p.shift = ptr<const float*>(shift);
        p.partial = ptr<float*>(partial);
        check(hoptune::fused_logprob_gemm(p, stream_of(stream)), "fused_logprob_gemm");
      },
      py::arg("a"), py::arg("lda"), py::arg("b"), py::arg("ldb"), py::arg("g"), py::arg("ldg"),
      py::arg("m"), py::arg("n"), py::arg("k"), py::arg("scale"), py::arg("shift"),
      py::arg("partial"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());

  // A decoder layer's elementwise ops (python/hoptune/ops/decoder.py).
  m.def(
      "rms_norm_forward",
      [](uintptr_t x, int64_t ldx, uintptr_t w, uintptr_t y, int64_t ldy, uintptr_t rstd,
         int64_t rows, int64_t cols, float eps, int dtype, uintptr_t stream) {
        hoptune::RmsNormForward a;
        a.x = ptr<const void*>(x);
        a.ldx = ldx;
        a.w = ptr<const void*>(w);
        a.y = ptr<void*>(y);
        a.ldy = ldy;
        a.rstd = ptr<float*>(rstd);
        a.rows = rows;
        a.cols = cols;
        a.eps = eps;
        a.dtype = static_cast<DType>(dtype);
        check(hoptune::rms_norm_forward(a, stream_of(stream)), "rms_norm_forward");
      },
      py::arg("x"), py::arg("ldx"), py::arg("w"), py::arg("y"), py::arg("ldy"), py::arg("rstd"),
      py::arg("rows"), py::arg("cols"), py::arg("eps"), py::arg("dtype"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "rms_norm_backward",
      [](uintptr_t dy, int64_t lddy, uintptr_t x, int64_t ldx, uintptr_t w, uintptr_t rstd,
         uintptr_t dx, int64_t lddx, int64_t rows, int64_t cols, int dtype, uintptr_t stream) {
        hoptune::RmsNormBackward a;
        a.dy = ptr<const void*>(dy);
        a.lddy = lddy;
        a.x = ptr<const void*>(x);
        a.ldx = ldx;
        a.w = ptr<const void*>(w);
        a.rstd = ptr<const float*>(rstd);
        a.dx = ptr<void*>(dx);
        a.lddx = lddx;
        a.rows = rows;
        a.cols = cols;
        a.dtype = static_cast<DType>(dtype);
        check(hoptune::rms_norm_backward(a, stream_of(stream)), "rms_norm_backward");
      },
      py::arg("dy"), py::arg("lddy"), py::arg("x"), py::arg("ldx"), py::arg("w"), py::arg("rstd"),
      py::arg("dx"), py::arg("lddx"), py::arg("rows"), py::arg("cols"), py::arg("dtype"),
      py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "silu_mul_forward",
      [](uintptr_t gate, uintptr_t up, uintptr_t out, int64_t n, int dtype, uintptr_t stream) {
        check(
            hoptune::silu_mul_forward(ptr<const void*>(gate), ptr<const void*>(up), ptr<void*>(out),
                                      n, static_cast<DType>(dtype), stream_of(stream)),
            "silu_mul_forward");
      },
      py::arg("gate"), py::arg("up"), py::arg("out"), py::arg("n"), py::arg("dtype"),
      py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "silu_mul_backward",
      [](uintptr_t dout, uintptr_t gate, uintptr_t up, uintptr_t dgate, uintptr_t dup, int64_t n,
         int dtype, uintptr_t stream) {
        check(hoptune::silu_mul_backward(ptr<const void*>(dout), ptr<const void*>(gate),
                                         ptr<const void*>(up), ptr<void*>(dgate), ptr<void*>(dup),
                                         n, static_cast<DType>(dtype), stream_of(stream)),
              "silu_mul_backward");
      },
      py::arg("dout"), py::arg("gate"), py::arg("up"), py::arg("dgate"), py::arg("dup"),
      py::arg("n"), py::arg("dtype"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def(
      "rope",
      [](uintptr_t x, int64_t xb, int64_t xh, int64_t xs, uintptr_t out, int64_t ob, int64_t oh,
         int64_t os, uintptr_t cos, uintptr_t sin, int64_t cb, int64_t cs, int64_t batch,
         int64_t heads, int64_t seq, int64_t dim, bool backward, int dtype, uintptr_t stream) {
        hoptune::Rope a;
        a.x = ptr<const void*>(x);
        a.xb = xb;
        a.xh = xh;
        a.xs = xs;
        a.out = ptr<void*>(out);
        a.ob = ob;
        a.oh = oh;
        a.os = os;
        a.cos = ptr<const void*>(cos);
        a.sin = ptr<const void*>(sin);
        a.cb = cb;
        a.cs = cs;
        a.batch = batch;
        a.heads = heads;
        a.seq = seq;
        a.dim = dim;
        a.backward = backward;
        a.dtype = static_cast<DType>(dtype);
        check(hoptune::rope(a, stream_of(stream)), "rope");
      },
      py::arg("x"), py::arg("xb"), py::arg("xh"), py::arg("xs"), py::arg("out"), py::arg("ob"),
      py::arg("oh"), py::arg("os"), py::arg("cos"), py::arg("sin"), py::arg("cb"), py::arg("cs"),
      py::arg("batch"), py::arg("heads"), py::arg("seq"), py::arg("dim"), py::arg("backward"),
      py::arg("dtype"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  // `waiter` waits for the work queued on `stream` so far (a fork or join of two streams of the
  // current device, also inside a CUDA graph capture): one call instead of an event's creation,
  // record and wait from Python.
  m.def(
      "stream_wait",
      [](uintptr_t waiter, uintptr_t stream) {
        cudaEvent_t ev = nullptr;
        check(wait_event_for_current_device(&ev), "stream_wait");
        check(cudaEventRecord(ev, stream_of(stream)), "stream_wait");
        check(cudaStreamWaitEvent(stream_of(waiter), ev, 0), "stream_wait");
      },
      py::arg("waiter"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  // cuBLASLt with a caller-chosen algorithm (python/hoptune/ops/gemm.py).
  m.def(
      "cublaslt_load", [](const std::string& path) { return hoptune::lt::load(path); },
      py::arg("path"));
  m.def("cublaslt_handle", [] { return hoptune::lt::handle_for_current_device(); });
  using hoptune::lt::Plan;
  py::class_<Plan>(m, "CublasLtPlan")
      .def(py::init([](uintptr_t handle, bool transa, bool transb, int64_t m, int64_t n, int64_t k,
                       int dtype) {
             return std::make_unique<Plan>(handle, transa, transb, m, n, k,
                                           static_cast<DType>(dtype));
           }),
           py::arg("handle"), py::arg("transa"), py::arg("transb"), py::arg("m"), py::arg("n"),
           py::arg("k"), py::arg("dtype"))
      .def("set_sm_count", &Plan::set_sm_count, py::arg("sms"))
      .def("search", &Plan::search, py::arg("max_count"), py::arg("workspace_bytes"))
      .def("count", &Plan::count)
      .def("describe", &Plan::describe, py::arg("index"))
      .def(
          "run",
          [](const Plan& p, int index, uintptr_t a, uintptr_t b, uintptr_t d, float beta,
             uintptr_t workspace, size_t workspace_bytes, uintptr_t stream) {
            const std::string err =
                p.run(index, ptr<const void*>(a), ptr<const void*>(b), ptr<void*>(d), beta,
                      ptr<void*>(workspace), workspace_bytes, stream_of(stream));
            if (!err.empty()) throw std::runtime_error("hoptune._C.CublasLtPlan.run: " + err);
          },
          py::arg("index"), py::arg("a"), py::arg("b"), py::arg("d"), py::arg("beta"),
          py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"),
          py::call_guard<py::gil_scoped_release>());
}
