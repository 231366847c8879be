// Stub of ATen/cuda/CUDAContext.h for the CUDA emulation (tests/cuda_emulation/build.py): the
// current device's properties are the engine's simulated device; the stream is a dummy (launches
// run synchronously).
#pragma once

#include <ATen/core/Tensor.h>

#include "emu_cuda.h"
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>

namespace at {
namespace cuda {

struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
  cudaStream_t stream() const { return nullptr; }
};

inline cudaDeviceProp* getCurrentDeviceProperties() { return ::emu::device_properties(); }
inline cudaDeviceProp* getDeviceProperties(c10::DeviceIndex) { return ::emu::device_properties(); }
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
inline CUDAStream getDefaultCUDAStream(c10::DeviceIndex = -1) { return {}; }

}  // namespace cuda
}  // namespace at
