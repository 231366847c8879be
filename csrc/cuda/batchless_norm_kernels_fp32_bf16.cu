// The norm kernels of x in float32 and bfloat16 (batchless_norm_kernels.cuh); _fp64_fp16.cu has
// those of float64 and float16, compiled in parallel. The dtypes are paired by weight: a kernel is
// instantiated per access width, and the 16-bit dtypes have the most (8 elements a 16-byte pack:
// 10 (V, W) pairs, float 6, double 3).
#include "cuda/batchless_norm_kernels.cuh"

BATCHLESS_NORM_CUDA_KERNELS(float)
BATCHLESS_NORM_CUDA_KERNELS(c10::BFloat16)
