// cuBLASLt through the library the host process loaded (see hoptune/cublaslt.h).
#include "hoptune/cublaslt.h"

#include <dlfcn.h>

#include <map>
#include <mutex>
#include <stdexcept>

namespace hoptune::lt {
namespace {

// cublasLt.h, library_types.h and cublas_api.h (CUDA 12 and 13).
constexpr int kCudaR32F = 0;
constexpr int kCudaR16F = 2;
constexpr int kCudaR16BF = 14;
constexpr int kComputeF32 = 68;  // CUBLAS_COMPUTE_32F
constexpr int kDescTransA = 3;   // CUBLASLT_MATMUL_DESC_TRANSA
constexpr int kDescTransB = 4;
constexpr int kDescSmCountTarget = 15;  // CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET
constexpr int kPrefMaxWorkspace = 1;    // CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES
constexpr int kOpN = 0;
constexpr int kOpT = 1;
// CUBLASLT_ALGO_CONFIG_{ID, TILE_ID, STAGES_ID, SPLITK_NUM, CLUSTER_SHAPE_ID}
constexpr int kConfigAttrs[5] = {0, 1, 6, 2, 8};

struct Algo {
  uint64_t data[8];
};
struct HeuristicResult {  // cublasLtMatmulHeuristicResult_t
  Algo algo;
  size_t workspace;
  int state;
  float waves;
  int reserved[4];
};
static_assert(sizeof(HeuristicResult) == 96, "cublasLtMatmulHeuristicResult_t is 96 bytes");

using Status = int;
struct Api {
  Status (*create)(void**);
  Status (*desc_create)(void**, int, int);
  Status (*desc_destroy)(void*);
  Status (*desc_set)(void*, int, const void*, size_t);
  Status (*layout_create)(void**, int, uint64_t, uint64_t, int64_t);
  Status (*layout_destroy)(void*);
  Status (*pref_create)(void**);
  Status (*pref_destroy)(void*);
  Status (*pref_set)(void*, int, const void*, size_t);
  Status (*heuristic)(void*, void*, void*, void*, void*, void*, void*, int, HeuristicResult*, int*);
  Status (*matmul)(void*, void*, const void*, const void*, void*, const void*, void*, const void*,
                   const void*, void*, void*, void*, const Algo*, void*, size_t, cudaStream_t);
  Status (*config_get)(const Algo*, int, void*, size_t, size_t*);
  const char* (*status_name)(Status);
};

std::mutex g_mutex;
bool g_tried = false;
std::string g_error = "cuBLASLt is not loaded (hoptune._C.cublaslt_load was not called)";
Api g_api{};

template <typename F>
bool resolve(void* lib, const char* name, F& fn, std::string& error) {
  fn = reinterpret_cast<F>(dlsym(lib, name));
  if (fn == nullptr) error = std::string("cuBLASLt has no symbol ") + name;
  return fn != nullptr;
}

std::string status_text(const char* what, Status s) {
  const char* name = g_api.status_name != nullptr ? g_api.status_name(s) : nullptr;
  return std::string(what) + " returned " + (name != nullptr ? name : "status") + " (" +
         std::to_string(s) + ")";
}

void require(Status s, const char* what) {
  if (s != 0) throw std::runtime_error("cuBLASLt: " + status_text(what, s));
}

void require_loaded() {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (!g_error.empty()) throw std::runtime_error("cuBLASLt: " + g_error);
}

}  // namespace

std::string load(const std::string& path) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_tried) return g_error;
  g_tried = true;
  void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    const char* why = dlerror();
    g_error = "cannot open " + path + ": " + (why != nullptr ? why : "unknown error");
    return g_error;
  }
  std::string error;
  Api api{};
  const bool ok = resolve(lib, "cublasLtCreate", api.create, error) &&
                  resolve(lib, "cublasLtMatmulDescCreate", api.desc_create, error) &&
                  resolve(lib, "cublasLtMatmulDescDestroy", api.desc_destroy, error) &&
                  resolve(lib, "cublasLtMatmulDescSetAttribute", api.desc_set, error) &&
                  resolve(lib, "cublasLtMatrixLayoutCreate", api.layout_create, error) &&
                  resolve(lib, "cublasLtMatrixLayoutDestroy", api.layout_destroy, error) &&
                  resolve(lib, "cublasLtMatmulPreferenceCreate", api.pref_create, error) &&
                  resolve(lib, "cublasLtMatmulPreferenceDestroy", api.pref_destroy, error) &&
                  resolve(lib, "cublasLtMatmulPreferenceSetAttribute", api.pref_set, error) &&
                  resolve(lib, "cublasLtMatmulAlgoGetHeuristic", api.heuristic, error) &&
                  resolve(lib, "cublasLtMatmul", api.matmul, error) &&
                  resolve(lib, "cublasLtMatmulAlgoConfigGetAttribute", api.config_get, error) &&
                  resolve(lib, "cublasLtGetStatusName", api.status_name, error);
  if (!ok) {
    g_error = error;
    return g_error;
  }
  g_api = api;
  g_error.clear();
  return g_error;
}

uintptr_t handle_for_current_device() {
  require_loaded();
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess)
    throw std::runtime_error("cuBLASLt: no current device");
  static std::map<int, void*> handles;
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = handles.find(device);
  if (it == handles.end()) {
    void* h = nullptr;
    require(g_api.create(&h), "cublasLtCreate");
    it = handles.emplace(device, h).first;
  }
  return reinterpret_cast<uintptr_t>(it->second);
}

Plan::Plan(uintptr_t handle, bool transa, bool transb, int64_t m, int64_t n, int64_t k, DType dtype)
    : handle_(handle) {
  require_loaded();
  if (m <= 0 || n <= 0 || k <= 0) throw std::invalid_argument("cuBLASLt plan: m, n, k must be > 0");
  if (dtype != DType::kBFloat16 && dtype != DType::kFloat16) {
    throw std::invalid_argument("cuBLASLt plan: dtype must be bfloat16 or float16");
  }
  const int type = dtype == DType::kBFloat16 ? kCudaR16BF : kCudaR16F;
  // The destructor does not run when the constructor throws: release what was created so far.
  try {
    create_descriptors(transa, transb, m, n, k, type);
  } catch (...) {
    release();
    throw;
  }
}

void Plan::create_descriptors(bool transa, bool transb, int64_t m, int64_t n, int64_t k, int type) {
  require(g_api.desc_create(&desc_, kComputeF32, kCudaR32F), "cublasLtMatmulDescCreate");
  const int32_t op_a = transa ? kOpT : kOpN;
  const int32_t op_b = transb ? kOpT : kOpN;
  require(g_api.desc_set(desc_, kDescTransA, &op_a, sizeof(op_a)),
          "cublasLtMatmulDescSetAttribute");
  require(g_api.desc_set(desc_, kDescTransB, &op_b, sizeof(op_b)),
          "cublasLtMatmulDescSetAttribute");
  const int64_t a_rows = transa ? k : m, a_cols = transa ? m : k;
  const int64_t b_rows = transb ? n : k, b_cols = transb ? k : n;
  require(g_api.layout_create(&layout_a_, type, a_rows, a_cols, a_rows),
          "cublasLtMatrixLayoutCreate");
  require(g_api.layout_create(&layout_b_, type, b_rows, b_cols, b_rows),
          "cublasLtMatrixLayoutCreate");
  require(g_api.layout_create(&layout_d_, type, m, n, m), "cublasLtMatrixLayoutCreate");
}

Plan::~Plan() {
  release();
}

void Plan::release() noexcept {
  if (layout_d_ != nullptr) g_api.layout_destroy(layout_d_);
  if (layout_b_ != nullptr) g_api.layout_destroy(layout_b_);
  if (layout_a_ != nullptr) g_api.layout_destroy(layout_a_);
  if (desc_ != nullptr) g_api.desc_destroy(desc_);
  layout_d_ = layout_b_ = layout_a_ = desc_ = nullptr;
}

void Plan::set_sm_count(int sms) {
  if (sms < 0)
    throw std::invalid_argument("cuBLASLt plan: sm_count must be >= 0 (0: the device's)");
  const int32_t v = sms;
  require(g_api.desc_set(desc_, kDescSmCountTarget, &v, sizeof(v)),
          "cublasLtMatmulDescSetAttribute");
  algos_.clear();
  workspace_.clear();
}

int Plan::search(int max_count, size_t workspace_bytes) {
  if (max_count <= 0 || max_count > 64) throw std::invalid_argument("max_count must be in 1..64");
  void* pref = nullptr;
  require(g_api.pref_create(&pref), "cublasLtMatmulPreferenceCreate");
  const uint64_t ws = workspace_bytes;
  Status s = g_api.pref_set(pref, kPrefMaxWorkspace, &ws, sizeof(ws));
  std::vector<HeuristicResult> results(max_count);
  int returned = 0;
  if (s == 0) {
    s = g_api.heuristic(reinterpret_cast<void*>(handle_), desc_, layout_a_, layout_b_, layout_d_,
                        layout_d_, pref, max_count, results.data(), &returned);
  }
  g_api.pref_destroy(pref);
  algos_.clear();
  workspace_.clear();
  if (s != 0) return 0;  // no algorithm for this problem (e.g. CUBLAS_STATUS_NOT_SUPPORTED)
  for (int i = 0; i < returned; ++i) {
    if (results[i].state != 0) continue;
    AlgoBytes a;
    for (int w = 0; w < 8; ++w) a.data[w] = results[i].algo.data[w];
    algos_.push_back(a);
    workspace_.push_back(results[i].workspace);
  }
  return count();
}

std::vector<int64_t> Plan::describe(int i) const {
  if (i < 0 || i >= count()) throw std::out_of_range("candidate index out of range");
  std::vector<int64_t> out;
  for (int attr : kConfigAttrs) {
    uint32_t v = 0;
    size_t written = 0;
    const Status s =
        g_api.config_get(reinterpret_cast<const Algo*>(&algos_[i]), attr, &v, sizeof(v), &written);
    out.push_back(s == 0 ? static_cast<int64_t>(v) : -1);
  }
  out.push_back(static_cast<int64_t>(workspace_[i]));
  return out;
}

std::string Plan::run(int i, const void* a, const void* b, void* d, float beta, void* workspace,
                      size_t workspace_bytes, cudaStream_t stream) const {
  if (i < 0 || i >= count()) return "candidate index out of range";
  if (workspace_[i] > workspace_bytes) return "workspace smaller than the candidate needs";
  const float alpha = 1.0f;
  const Status s =
      g_api.matmul(reinterpret_cast<void*>(handle_), desc_, &alpha, a, layout_a_, b, layout_b_,
                   &beta, d, layout_d_, d, layout_d_, reinterpret_cast<const Algo*>(&algos_[i]),
                   workspace, workspace_bytes, stream);
  return s == 0 ? std::string() : status_text("cublasLtMatmul", s);
}

}  // namespace hoptune::lt
