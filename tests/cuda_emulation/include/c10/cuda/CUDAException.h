// Stub of c10/cuda/CUDAException.h for the CUDA emulation. The engine raises launch errors at the
// launch itself; C10_CUDA_KERNEL_LAUNCH_CHECK marks the launch checked (the engine fails a launch
// that follows an unchecked one: a launcher must check each launch, as on a GPU).
#pragma once

#include <c10/util/Exception.h>

#include "emu_cuda.h"

#define C10_CUDA_CHECK(EXPR)                                                                  \
  do {                                                                                        \
    const cudaError_t emu_error = (EXPR);                                                     \
    TORCH_CHECK(emu_error == cudaSuccess, "CUDA error: ", cudaGetErrorString(emu_error));     \
  } while (0)

#define C10_CUDA_KERNEL_LAUNCH_CHECK() ::emu::launch_checked()
