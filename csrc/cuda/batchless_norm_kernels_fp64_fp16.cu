// The norm kernels of x in float64 and float16 (batchless_norm_kernels.cuh), compiled in parallel
// with batchless_norm_cuda.cu, which has those of float32 and bfloat16. The dtypes are paired by
// weight: a kernel is instantiated per access width, and the 16-bit dtypes have the most (8
// elements a 16-byte pack: 10 (V, W) pairs, float 6, double 3).
#include "cuda/batchless_norm_kernels.cuh"

BATCHLESS_NORM_CUDA_KERNELS(double)
BATCHLESS_NORM_CUDA_KERNELS(c10::Half)
