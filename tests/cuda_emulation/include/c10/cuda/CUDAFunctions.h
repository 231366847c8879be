// Stub of c10/cuda/CUDAFunctions.h for the CUDA emulation: the current device index names the
// engine's current simulated device (one index per distinct setting, so that caches keyed by the
// device, like the launchers' occupancy cache, see each setting as another GPU).
#pragma once

#include <c10/core/Device.h>

#include "emu_cuda.h"

namespace c10 {
namespace cuda {
inline DeviceIndex current_device() { return static_cast<DeviceIndex>(::emu::current_device_index()); }
inline DeviceIndex device_count() { return 1; }
}  // namespace cuda
}  // namespace c10
