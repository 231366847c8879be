// Stub of ATen/cuda/CUDAContext.h for the CUDA emulation (tests/cuda_emulation/build.py): the
// current device's properties are the engine's simulated device; the stream is a dummy (launches
// run synchronously).
#pragma once

#include <ATen/core/Tensor.h>

#include "emu_cuda.h"
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace at {
namespace cuda {

// As ATen's: c10's streams under at::cuda.
using c10::cuda::CUDAStream;
using c10::cuda::getCurrentCUDAStream;
using c10::cuda::getDefaultCUDAStream;

inline cudaDeviceProp* getCurrentDeviceProperties() { return ::emu::device_properties(); }
inline cudaDeviceProp* getDeviceProperties(c10::DeviceIndex) { return ::emu::device_properties(); }

}  // namespace cuda
}  // namespace at
