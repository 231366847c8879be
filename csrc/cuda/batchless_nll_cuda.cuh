// The interface between the host side of the CUDA NLL ops (batchless_nll_cuda.cpp: checks, dtype
// dispatch, registration) and their kernels (batchless_nll_kernels.cu). Plain C++ on the host side:
// no CUDA syntax and no tensor headers here (batchless_common.h says why).
#pragma once

#include <cstdint>

#include "batchless_nll_math.h"

namespace batchless_kernels {
namespace cuda_nll {

// The NLL value (one block) from s2 and std_param, shapes (C,), into out (one element); all device
// pointers of the accumulation dtype. Defined for float and double; launched on the current stream.
template <typename acc_t>
void launch_nll(const acc_t* s2, const acc_t* std_param, int64_t C, acc_t count, nll::Parametrization kind,
                acc_t eps, bool gauge, acc_t* out);

// The NLL's gradients dmean, dparam (shapes (C,)) from grad_nll (one element), s1, s2, std_param.
template <typename acc_t>
void launch_nll_backward(const acc_t* grad_nll, const acc_t* s1, const acc_t* s2, const acc_t* std_param,
                         int64_t C, acc_t count, nll::Parametrization kind, acc_t eps, acc_t* dmean,
                         acc_t* dparam);

}  // namespace cuda_nll
}  // namespace batchless_kernels
