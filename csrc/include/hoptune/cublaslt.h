// cuBLASLt GEMMs with the algorithm chosen by the caller (python/hoptune/ops/gemm.py measures
// the heuristic's candidates). The library is the one the host process has already loaded
// (PyTorch's), opened by path at run time: the wheel links no BLAS and builds without cuBLAS
// headers. Only what these GEMMs use is declared, with the values of cublasLt.h in CUDA 12 and 13.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>
#include <vector>

#include "hoptune/common/check.h"

namespace hoptune::lt {

// Opens the cuBLASLt library at `path` and resolves its entry points; "" on success, else why
// not. Later calls return the first call's answer.
std::string load(const std::string& path);

// A cuBLASLt handle for the current device (created once per device, never destroyed).
uintptr_t handle_for_current_device();

// One problem in cuBLASLt's column-major terms: D (m x n, leading dimension m) = op(A) op(B) + beta
// D, with A stored as (transa ? k x m : m x k) and B as (transb ? n x k : k x n), each with its
// rows as leading dimension; bf16 or fp16 operands and output, fp32 accumulation. Row-major
// PyTorch tensors map onto it transposed (see gemm.py).
class Plan {
 public:
  Plan(uintptr_t handle, bool transa, bool transb, int64_t m, int64_t n, int64_t k, DType dtype);
  ~Plan();
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;

  // The number of SMs the GEMM is to run on (CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET; 0: the
  // device's), for a GEMM that shares the device with a kernel on another stream. Clears the
  // candidates: search again after it.
  void set_sm_count(int sms);
  // Asks the heuristic for up to max_count algorithms that need at most workspace_bytes; returns
  // how many it gave (in its own order of preference).
  int search(int max_count, size_t workspace_bytes);
  int count() const { return static_cast<int>(algos_.size()); }
  // Candidate i's configuration: {algorithm id, tile id, stages id, split-K, cluster id,
  // workspace bytes}; -1 where cuBLASLt does not report one.
  std::vector<int64_t> describe(int i) const;
  // D = op(A) op(B) + beta D with candidate i on `stream`; "" on success, else cuBLASLt's status.
  std::string run(int i, const void* a, const void* b, void* d, float beta, void* workspace,
                  size_t workspace_bytes, cudaStream_t stream) const;

 private:
  void create_descriptors(bool transa, bool transb, int64_t m, int64_t n, int64_t k, int type);
  void release() noexcept;

  struct AlgoBytes {
    uint64_t data[8];
  };
  uintptr_t handle_;
  void* desc_ = nullptr;
  void* layout_a_ = nullptr;
  void* layout_b_ = nullptr;
  void* layout_d_ = nullptr;
  std::vector<AlgoBytes> algos_;
  std::vector<size_t> workspace_;
};

}  // namespace hoptune::lt
