// Stub of c10/cuda/CUDAGuard.h for the CUDA emulation: the emulated launchers run on CPU tensors,
// so the guard accepts the CPU device (and any CUDA index) and does nothing.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>

#include "emu_cuda.h"
#include <c10/cuda/CUDAFunctions.h>

namespace c10 {
namespace cuda {

struct CUDAGuard {
  explicit CUDAGuard(Device device) {
    TORCH_CHECK(device.is_cpu() || device.is_cuda(), "CUDA emulation: CUDAGuard on a ", device, " tensor");
  }
  explicit CUDAGuard(DeviceIndex) {}
  CUDAGuard(const CUDAGuard&) = delete;
  CUDAGuard& operator=(const CUDAGuard&) = delete;
};

struct OptionalCUDAGuard {
  OptionalCUDAGuard() = default;
  explicit OptionalCUDAGuard(optional<Device>) {}
  explicit OptionalCUDAGuard(Device) {}
};

}  // namespace cuda
}  // namespace c10
