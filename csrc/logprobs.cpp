// Native CPU implementation of the token-logprob op: registers
//   fastpo_native::logps_forward(logits, labels, ignore_index, temperature, with_logits_sum)
//       -> (logps f32[N], lse f32[N], logits_sum f32[N] or f32[0])
//   fastpo_native::logps_backward(grad_logps, logits, labels, lse, ignore_index, temperature,
//       inplace) -> grad_logits (logits' dtype, [N, V]; `logits` itself when inplace)
//   fastpo_native::cpu_capability() -> str, fastpo_native::_set_cpu_capability(str) -> str
// for 2-D logits [N, V] (vocab stride 1, any row stride) in fp32, bf16 or fp16 with fp32 math.
// Rows are spread over threads with at::parallel_for (so torch.set_num_threads applies); the row
// kernels (logprobs_kernel.h) are compiled twice on x86-64, for the baseline instruction set and
// for AVX2+FMA+F16C, and the second is picked at run time when the CPU has it.

#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FASTPO_HAVE_AVX2_COPY 1
#else
#define FASTPO_HAVE_AVX2_COPY 0
#endif

namespace fastpo_native {

enum class Dtype { kFloat32, kBFloat16, kFloat16 };

struct ForwardArgs {
  const void* logits;
  int64_t row_stride;
  int64_t vocab;
  const int64_t* labels;
  const int64_t* rows;  // the scored rows, in order; threads split this list
  float inv_t;
  float* logps;
  float* lse;
  float* logits_sum;  // nullptr when not asked for
};

struct BackwardArgs {
  const void* logits;
  int64_t row_stride;
  void* grad_logits;  // may be `logits` (in place)
  int64_t out_row_stride;
  int64_t vocab;
  const int64_t* labels;
  const int64_t* rows;
  const float* lse;
  const float* grad;
  float inv_t;
};

}  // namespace fastpo_native

#define FASTPO_ISA baseline
#define FASTPO_F16C 0
#define FASTPO_VEC_BYTES 16
#include "logprobs_kernel.h"
#undef FASTPO_ISA
#undef FASTPO_F16C
#undef FASTPO_VEC_BYTES

#if FASTPO_HAVE_AVX2_COPY
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
#define FASTPO_ISA avx2
#define FASTPO_F16C 1
#define FASTPO_VEC_BYTES 32
#include "logprobs_kernel.h"
#undef FASTPO_ISA
#undef FASTPO_F16C
#undef FASTPO_VEC_BYTES
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

namespace fastpo_native {
namespace {

// ---- run-time choice of the compiled copy ------------------------------------------------------

using ForwardFn = void (*)(Dtype, const ForwardArgs&, int64_t, int64_t);
using BackwardFn = void (*)(Dtype, const BackwardArgs&, int64_t, int64_t);

struct Capability {
  const char* name;
  ForwardFn forward;
  BackwardFn backward;
};

const Capability kBaseline{"baseline", &baseline::forward_rows, &baseline::backward_rows};
#if FASTPO_HAVE_AVX2_COPY
const Capability kAvx2{"avx2", &avx2::forward_rows, &avx2::backward_rows};
#endif

bool avx2_supported() {
#if FASTPO_HAVE_AVX2_COPY
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

const Capability* find_capability(const std::string& name) {
  if (name == "baseline") return &kBaseline;
#if FASTPO_HAVE_AVX2_COPY
  if (name == "avx2" && avx2_supported()) return &kAvx2;
#endif
  return nullptr;
}

// The best copy this CPU runs, unless FASTPO_NATIVE_CPU_CAPABILITY names another one.
const Capability* default_capability() {
  const char* env = std::getenv("FASTPO_NATIVE_CPU_CAPABILITY");
  if (env != nullptr && *env != '\0') {
    const Capability* chosen = find_capability(env);
    TORCH_CHECK_VALUE(chosen != nullptr, "FASTPO_NATIVE_CPU_CAPABILITY=", env,
                      " is not available on this CPU (choose 'baseline' or 'avx2')");
    return chosen;
  }
#if FASTPO_HAVE_AVX2_COPY
  if (avx2_supported()) return &kAvx2;
#endif
  return &kBaseline;
}

std::atomic<const Capability*> g_capability{nullptr};

const Capability& capability() {
  const Capability* c = g_capability.load(std::memory_order_acquire);
  if (c == nullptr) {
    c = default_capability();
    g_capability.store(c, std::memory_order_release);
  }
  return *c;
}

std::string cpu_capability() { return capability().name; }

std::string set_cpu_capability(const std::string& name) {
  const std::string previous = capability().name;
  const Capability* chosen = find_capability(name);
  TORCH_CHECK_VALUE(chosen != nullptr, "cpu capability '", name,
                    "' is not available on this CPU (choose 'baseline'",
                    avx2_supported() ? " or 'avx2')" : ")");
  g_capability.store(chosen, std::memory_order_release);
  return previous;
}

// ---- validation --------------------------------------------------------------------------------

Dtype check_logits(const at::Tensor& logits, const char* op) {
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": logits must be 2-D [N, V], got shape ",
                    logits.sizes());
  TORCH_CHECK_VALUE(logits.size(1) <= 1 || logits.stride(1) == 1, op,
                    ": logits must have vocab stride 1 (any row stride), got strides ",
                    logits.strides());
  TORCH_CHECK_VALUE(logits.size(1) > 0 || logits.size(0) == 0, op,
                    ": logits has an empty vocab dimension, shape ", logits.sizes());
  switch (logits.scalar_type()) {
    case at::kFloat: return Dtype::kFloat32;
    case at::kBFloat16: return Dtype::kBFloat16;
    case at::kHalf: return Dtype::kFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": logits must be float32, bfloat16 or float16, got ",
                       logits.scalar_type());
  }
}

at::Tensor check_labels(const at::Tensor& labels, int64_t n, const char* op) {
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ",
                   labels.scalar_type());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == n, op,
                    ": labels must be 1-D with one entry per logits row (", n, "), got shape ",
                    labels.sizes());
  TORCH_CHECK_VALUE(labels.device().is_cpu(), op, ": labels must be on the CPU, got ",
                    labels.device());
  return labels.contiguous();
}

float inverse_temperature(double temperature, const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0, op,
                    ": temperature must be a finite number > 0, got ", temperature);
  return static_cast<float>(1.0 / temperature);
}

// Splits rows into scored ones and ignored ones, checking each scored label against the vocab
// (no label is ever used as an index before this check).
void split_rows(const int64_t* labels, int64_t n, int64_t vocab, int64_t ignore_index,
                const char* op, std::vector<int64_t>& scored, std::vector<int64_t>* ignored) {
  scored.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t l = labels[i];
    if (l == ignore_index) {
      if (ignored != nullptr) ignored->push_back(i);
      continue;
    }
    TORCH_CHECK_VALUE(l >= 0 && l < vocab, op, ": labels[", i, "] = ", l,
                      " is outside the vocab [0, ", vocab, ") and is not ignore_index (",
                      ignore_index, ")");
    scored.push_back(i);
  }
}

// Rows per task: at least ~64k elements of work, so small inputs stay on one thread.
int64_t grain_rows(int64_t vocab) {
  const int64_t g = (int64_t{1} << 16) / (vocab > 0 ? vocab : 1);
  return g > 0 ? g : 1;
}

// Asks the kernel to back a fresh output buffer with transparent huge pages (Linux, THP in
// "madvise" or "always" mode) before its first write. The out-of-place gradient is as large as the
// logits and written once; with 4 KiB pages its first touch costs one page fault per 4 KiB, which
// is more than the kernel's own time. Only the 2 MiB-aligned interior of the allocation is
// advised, so the hint never reaches memory outside it; a refusal (THP off) changes nothing.
// FASTPO_NATIVE_HUGE_PAGES=0 turns the hint off.
void advise_huge_pages(void* ptr, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool enabled = [] {
    const char* env = std::getenv("FASTPO_NATIVE_HUGE_PAGES");
    return env == nullptr || std::strcmp(env, "0") != 0;
  }();
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (!enabled || bytes < static_cast<int64_t>(4 * kHuge)) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(ptr) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(ptr) + static_cast<uintptr_t>(bytes)) &
                        ~(kHuge - 1);
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)ptr;
  (void)bytes;
#endif
}

// ---- ops ---------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> logps_forward(const at::Tensor& logits,
                                                             const at::Tensor& labels_in,
                                                             int64_t ignore_index,
                                                             double temperature,
                                                             bool with_logits_sum) {
  const char* op = "fastpo_native::logps_forward";
  const Dtype dtype = check_logits(logits, op);
  const int64_t n = logits.size(0);
  const int64_t vocab = logits.size(1);
  const at::Tensor labels = check_labels(labels_in, n, op);
  const float inv_t = inverse_temperature(temperature, op);
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor logps = at::zeros({n}, f32);
  at::Tensor lse = at::zeros({n}, f32);
  at::Tensor logits_sum = with_logits_sum ? at::zeros({n}, f32) : at::empty({0}, f32);

  std::vector<int64_t> scored;
  split_rows(labels.const_data_ptr<int64_t>(), n, vocab, ignore_index, op, scored, nullptr);
  if (scored.empty()) return {logps, lse, logits_sum};

  ForwardArgs a;
  a.logits = logits.const_data_ptr();
  a.row_stride = logits.stride(0);
  a.vocab = vocab;
  a.labels = labels.const_data_ptr<int64_t>();
  a.rows = scored.data();
  a.inv_t = inv_t;
  a.logps = logps.mutable_data_ptr<float>();
  a.lse = lse.mutable_data_ptr<float>();
  a.logits_sum = with_logits_sum ? logits_sum.mutable_data_ptr<float>() : nullptr;
  const ForwardFn fn = capability().forward;
  at::parallel_for(0, static_cast<int64_t>(scored.size()), grain_rows(vocab),
                   [&](int64_t begin, int64_t end) { fn(dtype, a, begin, end); });
  return {logps, lse, logits_sum};
}

at::Tensor logps_backward(const at::Tensor& grad_logps, const at::Tensor& logits,
                          const at::Tensor& labels_in, const at::Tensor& lse_in,
                          int64_t ignore_index, double temperature, bool inplace) {
  const char* op = "fastpo_native::logps_backward";
  const Dtype dtype = check_logits(logits, op);
  const int64_t n = logits.size(0);
  const int64_t vocab = logits.size(1);
  const at::Tensor labels = check_labels(labels_in, n, op);
  const float inv_t = inverse_temperature(temperature, op);
  TORCH_CHECK_VALUE(grad_logps.dim() == 1 && grad_logps.size(0) == n, op,
                    ": grad_logps must have shape [", n, "], got ", grad_logps.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(grad_logps.scalar_type()), op,
                   ": grad_logps must be floating point, got ", grad_logps.scalar_type());
  TORCH_CHECK_VALUE(lse_in.dim() == 1 && lse_in.size(0) == n, op, ": lse must have shape [", n,
                    "], got ", lse_in.sizes());
  TORCH_CHECK_TYPE(lse_in.scalar_type() == at::kFloat, op, ": lse must be float32, got ",
                   lse_in.scalar_type());
  TORCH_CHECK_VALUE(grad_logps.device().is_cpu() && lse_in.device().is_cpu(), op,
                    ": grad_logps and lse must be on the CPU, got ", grad_logps.device(), " and ",
                    lse_in.device());
  if (inplace) {
    TORCH_CHECK_VALUE(n <= 1 || logits.stride(0) >= vocab, op,
                      ": in-place backward needs non-overlapping rows (row stride >= V), got "
                      "strides ", logits.strides());
  }
  const at::Tensor grad = grad_logps.to(at::kFloat).contiguous();  // [N]; no copy when f32
  const at::Tensor lse = lse_in.contiguous();
  at::Tensor out = inplace ? logits : at::empty({n, vocab}, logits.options());
  if (!inplace) advise_huge_pages(out.mutable_data_ptr(), out.nbytes());

  std::vector<int64_t> scored, ignored;
  split_rows(labels.const_data_ptr<int64_t>(), n, vocab, ignore_index, op, scored, &ignored);

  BackwardArgs a;
  a.logits = logits.const_data_ptr();
  a.row_stride = logits.stride(0);
  a.grad_logits = out.mutable_data_ptr();
  a.out_row_stride = out.stride(0);
  a.vocab = vocab;
  a.labels = labels.const_data_ptr<int64_t>();
  a.rows = scored.data();
  a.lse = lse.const_data_ptr<float>();
  a.grad = grad.const_data_ptr<float>();
  a.inv_t = inv_t;
  const int64_t grain = grain_rows(vocab);
  if (!scored.empty()) {
    const BackwardFn fn = capability().backward;
    at::parallel_for(0, static_cast<int64_t>(scored.size()), grain,
                     [&](int64_t begin, int64_t end) { fn(dtype, a, begin, end); });
  }
  if (!ignored.empty()) {
    // ignored rows get a zero gradient; all three dtypes have 0 as the all-zero bit pattern
    char* base = static_cast<char*>(a.grad_logits);
    const int64_t row_bytes = vocab * static_cast<int64_t>(out.element_size());
    const int64_t stride_bytes = a.out_row_stride * static_cast<int64_t>(out.element_size());
    at::parallel_for(0, static_cast<int64_t>(ignored.size()), grain,
                     [&](int64_t begin, int64_t end) {
                       for (int64_t k = begin; k < end; ++k) {
                         std::memset(base + ignored[k] * stride_bytes, 0, row_bytes);
                       }
                     });
  }
  return out;
}

}  // namespace
}  // namespace fastpo_native

TORCH_LIBRARY(fastpo_native, m) {
  m.def(
      "logps_forward(Tensor logits, Tensor labels, int ignore_index, float temperature, "
      "bool with_logits_sum) -> (Tensor logps, Tensor lse, Tensor logits_sum)");
  m.def(
      "logps_backward(Tensor grad_logps, Tensor logits, Tensor labels, Tensor lse, "
      "int ignore_index, float temperature, bool inplace) -> Tensor");
  m.def("cpu_capability() -> str", &fastpo_native::cpu_capability);
  m.def("_set_cpu_capability(str name) -> str", &fastpo_native::set_cpu_capability);
}

TORCH_LIBRARY_IMPL(fastpo_native, CPU, m) {
  m.impl("logps_forward", &fastpo_native::logps_forward);
  m.impl("logps_backward", &fastpo_native::logps_backward);
}

// `import fastpo.kernels._C` loads this library, which registers the ops above as a side effect;
// the Python module itself is empty.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C",
                               "fastpo native CPU kernels (registers torch.ops.fastpo_native)",
                               -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
