// Stub of c10/cuda/CUDAStream.h for the CUDA emulation (tests/cuda_emulation/build.py): the stream
// is a dummy (launches run synchronously).
#pragma once

#include <c10/core/Device.h>

#include "emu_cuda.h"

namespace c10 {
namespace cuda {

struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
  cudaStream_t stream() const { return nullptr; }
};

inline CUDAStream getCurrentCUDAStream(DeviceIndex = -1) { return {}; }
inline CUDAStream getDefaultCUDAStream(DeviceIndex = -1) { return {}; }

}  // namespace cuda
}  // namespace c10
