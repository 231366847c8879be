// The sanitizer variants' norm kernels of float64 and float16, not compiled (build.py,
// SANITIZER_SKIPS): in their place, run_forward and run_backward raise. The sanitizers' selections
// (tests/test_cuda_emulation.py) run float32 and bfloat16, the same templates at every vector
// width V (1 to 8 elements) and access width (2 to 16 bytes) the other two use; the main variant
// checks the values of all four. The sanitized build of those kernels cost ~45% of the variant's.
#include <c10/util/Exception.h>

#include "cuda/batchless_norm_cuda.cuh"

namespace batchless_kernels::cuda_norm {
namespace {
[[noreturn]] void not_compiled(const char* dtype) {
  TORCH_CHECK(false, "the CUDA emulation's sanitizer variants compile the norm kernels of float32 and "
                     "bfloat16 only, not ", dtype);
}
}  // namespace

#define BATCHLESS_NOT_IN_SANITIZER_VARIANT(T)                                  \
  template <>                                                                  \
  void run_forward<T>(const ForwardArgs<T>&) { not_compiled(#T); }             \
  template <>                                                                  \
  void run_backward<T>(const BackwardArgs<T>&) { not_compiled(#T); }

BATCHLESS_NOT_IN_SANITIZER_VARIANT(double)
BATCHLESS_NOT_IN_SANITIZER_VARIANT(c10::Half)
}  // namespace batchless_kernels::cuda_norm
