// hoptune._C: declarations and exports only. Pointers arrive as Python ints, the stream as
// its integer handle; each call returns None or raises RuntimeError naming the CUDA error.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "hoptune/nf4.cuh"

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

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "hoptune CUDA kernels (torch-free: raw device pointers, sizes and a CUDA stream)";
  m.attr("CUDA_RUNTIME_VERSION") = CUDART_VERSION;

  m.def(
      "nf4_dequantize",
      [](uintptr_t packed, uintptr_t absmax, uintptr_t qabsmax, uintptr_t absmax2, uintptr_t code2,
         float offset, int blocksize2, int64_t n, int blocksize, uintptr_t out, int out_dtype,
         uintptr_t stream) {
        hoptune::NF4Absmax am;
        am.absmax = ptr<const float*>(absmax);
        am.qabsmax = ptr<const uint8_t*>(qabsmax);
        am.absmax2 = ptr<const float*>(absmax2);
        am.code2 = ptr<const float*>(code2);
        am.offset = offset;
        am.blocksize2 = blocksize2;
        check(
            hoptune::nf4_dequantize(ptr<const uint8_t*>(packed), am, n, blocksize, ptr<void*>(out),
                                    static_cast<DType>(out_dtype), stream_of(stream)),
            "nf4_dequantize");
      },
      py::arg("packed"), py::arg("absmax"), py::arg("qabsmax"), py::arg("absmax2"),
      py::arg("code2"), py::arg("offset"), py::arg("blocksize2"), py::arg("n"),
      py::arg("blocksize"), py::arg("out"), py::arg("out_dtype"), py::arg("stream"),
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
}
