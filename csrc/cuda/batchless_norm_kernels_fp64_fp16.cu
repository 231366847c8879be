// The norm kernels of x in float64 and float16 (batchless_norm_kernels.cuh); _fp32_bf16.cu has
// those of float32 and bfloat16 (it says why the dtypes are paired so).
#include "cuda/batchless_norm_kernels.cuh"

BATCHLESS_NORM_CUDA_KERNELS(double)
BATCHLESS_NORM_CUDA_KERNELS(c10::Half)
