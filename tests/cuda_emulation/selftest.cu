// Small CUDA kernels, right and wrong, that test the emulation engine itself
// (tests/test_cuda_emulation.py): they go through rewrite.py like csrc/cuda. Each selftest returns
// what its kernel wrote, or throws the engine's error.
#include <c10/cuda/CUDAException.h>

#include <cmath>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace emu_selftest {
namespace {

__device__ float warp_total(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// out[block] = sum of threadIdx.x over the block (256 threads), through warp shuffles and shared memory.
__global__ void __launch_bounds__(256) block_sum_kernel(float* out) {
  __shared__ float partial[8];
  float v = warp_total(static_cast<float>(threadIdx.x));
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    v = warp_total(threadIdx.x < 8 ? partial[threadIdx.x] : 0.0f);
    if (threadIdx.x == 0) out[blockIdx.x] = v;
  }
}

__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

__global__ void barrier_after_exit_kernel(float* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

__global__ void shuffle_exited_lane_kernel(float* out) {
  if (threadIdx.x == 31) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0f, 1);
}

__global__ void shuffle_caller_not_in_mask_kernel(float* out) {
  out[threadIdx.x] = __shfl_sync(0x0000ffffu, 1.0f, 0);
}

__global__ void shuffle_reads_outside_mask_kernel(float* out) {
  const unsigned mask = threadIdx.x < 16 ? 0x0000ffffu : 0xffff0000u;
  out[threadIdx.x] = __shfl_down_sync(mask, static_cast<float>(threadIdx.x), 8);
}

__global__ void shuffle_partial_warp_kernel(float* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<float>(threadIdx.x), 1);
}

__global__ void collective_mismatch_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x % 2 == 0) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    v = __shfl_down_sync(0xffffffffu, v, 1);
  }
  out[threadIdx.x] = v;
}

// Lane i: [shfl(idx 3), shfl_up 1, shfl_xor 1, ballot of odd lanes].
__global__ void collectives_kernel(float* out) {
  const float v = static_cast<float>(threadIdx.x);
  out[threadIdx.x * 4 + 0] = __shfl_sync(0xffffffffu, v, 3);
  out[threadIdx.x * 4 + 1] = __shfl_up_sync(0xffffffffu, v, 1);
  out[threadIdx.x * 4 + 2] = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x * 4 + 3] = static_cast<float>(__ballot_sync(0xffffffffu, threadIdx.x % 2 == 1) == 0xaaaaaaaau);
  __syncwarp();
}

// Reads shared memory no thread of this block wrote.
__global__ void stale_shared_kernel(float* out) {
  __shared__ float buf[4];
  if (blockIdx.x == 0 && threadIdx.x == 0) buf[0] = 1.0f;
  __syncthreads();
  out[blockIdx.x * 2 + threadIdx.x] = buf[threadIdx.x];
}

__global__ void dynamic_shared_kernel(double* out) {
  extern __shared__ __align__(16) unsigned char raw[];
  double* d = reinterpret_cast<double*>(raw);
  if (threadIdx.x == 0) d[0] = 2.5;
  __syncthreads();
  out[threadIdx.x] = d[threadIdx.x];
}

__global__ void __launch_bounds__(128) bounded_kernel(float* out) { out[threadIdx.x] = 1.0f; }

__global__ void index_kernel(float* out) {
  const unsigned block = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  const unsigned thread = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
  out[block * blockDim.x * blockDim.y * blockDim.z + thread] = static_cast<float>(block * 1000 + thread);
}

std::vector<double> to_double(const std::vector<float>& v) { return {v.begin(), v.end()}; }

const std::map<std::string, std::function<std::vector<double>()>>& selftests() {
  static const std::map<std::string, std::function<std::vector<double>()>> tests = {
      {"block_sum", [] {
         std::vector<float> out(3, -1.0f);
         block_sum_kernel<<<3, 256>>>(out.data());
         C10_CUDA_KERNEL_LAUNCH_CHECK();
         return to_double(out);
       }},
      {"divergent_barrier", [] {
         std::vector<float> out(64);
         divergent_barrier_kernel<<<1, 64>>>(out.data());
         C10_CUDA_KERNEL_LAUNCH_CHECK();
         return to_double(out);
       }},
      {"barrier_after_exit", [] {
         std::vector<float> out(64);
         barrier_after_exit_kernel<<<1, 64>>>(out.data());
         C10_CUDA_KERNEL_LAUNCH_CHECK();
         return to_double(out);
       }},
      {"shuffle_exited_lane", [] {
         std::vector<float> out(32);
         shuffle_exited_lane_kernel<<<1, 32>>>(out.data());
         C10_CUDA_KERNEL_LAUNCH_CHECK();
         return to_double(out);
       }},
      {"shuffle_caller_not_in_mask", [] {
         std::vector<float> out(32);
         shuffle_caller_not_in_mask_kernel<<<1, 32>>>(out.data());
         C10_CUDA_KERNEL_LAUNCH_CHECK();
         return to_double(out);
       }},
      {"shuffle_reads_outside_mask", [] {
         std::vector<float> out(32);
         shuffle_reads_outside_mask_kernel<<<1, 32>>>(out.data());
         C10_CUDA_KERNEL_LAUNCH_CHECK();
         return to_double(out);
       }},
      {"shuffle_partial_warp", [] {
         std::vector<float> out(48);
         shuffle_partial_warp_kernel<<<1, 48>>>(out.data());
         C10_CUDA_KERNEL_LAUNCH_CHECK();
         return to_double(out);
       }},
      {"collective_mismatch", [] {
         std::vector<float> out(32);
         collective_mismatch_kernel<<<1, 32>>>(out.data());
         C10_CUDA_KERNEL_LAUNCH_CHECK();
         return to_double(out);
       }},
      {"collectives", [] {
         std::vector<float> out(32 * 4);
         collectives_kernel<<<1, 32>>>(out.data());
         C10_CUDA_KERNEL_LAUNCH_CHECK();
         return to_double(out);
       }},
      {"stale_shared", [] {
         std::vector<float> out(4, -1.0f);
         stale_shared_kernel<<<2, 2>>>(out.data());
         C10_CUDA_KERNEL_LAUNCH_CHECK();
         return to_double(out);
       }},
      {"dynamic_shared", [] {
         std::vector<double> out(2, -1.0);
         dynamic_shared_kernel<<<1, 2, 16>>>(out.data());
         C10_CUDA_KERNEL_LAUNCH_CHECK();
         return out;
       }},
      {"too_much_dynamic_shared", [] {
         std::vector<double> out(2);
         dynamic_shared_kernel<<<1, 2, 64 * 1024>>>(out.data());
         C10_CUDA_KERNEL_LAUNCH_CHECK();
         return out;
       }},
      {"too_many_threads", [] {
         std::vector<float> out(1025);
         index_kernel<<<1, 1025>>>(out.data());
         C10_CUDA_KERNEL_LAUNCH_CHECK();
         return to_double(out);
       }},
      {"grid_y_too_large", [] {
         std::vector<float> out(1);
         index_kernel<<<dim3(1, 65536), 1>>>(out.data());
         C10_CUDA_KERNEL_LAUNCH_CHECK();
         return to_double(out);
       }},
      {"launch_bounds", [] {
         std::vector<float> out(256);
         bounded_kernel<<<1, 256>>>(out.data());
         C10_CUDA_KERNEL_LAUNCH_CHECK();
         return to_double(out);
       }},
      {"unchecked_launch", [] {
         std::vector<float> out(128);
         bounded_kernel<<<1, 128>>>(out.data());
         bounded_kernel<<<1, 128>>>(out.data());
         C10_CUDA_KERNEL_LAUNCH_CHECK();
         return to_double(out);
       }},
      {"indices", [] {
         std::vector<float> out(2 * 3 * 2 * 4 * 2 * 3);
         index_kernel<<<dim3(2, 3, 2), dim3(4, 2, 3)>>>(out.data());
         C10_CUDA_KERNEL_LAUNCH_CHECK();
         return to_double(out);
       }},
  };
  return tests;
}

}  // namespace

std::vector<std::string> selftest_names() {
  std::vector<std::string> names;
  for (const auto& [name, fn] : selftests()) names.push_back(name);
  return names;
}

std::vector<double> run_selftest(const std::string& name) {
  const auto it = selftests().find(name);
  if (it == selftests().end()) throw std::invalid_argument("no selftest " + name);
  return it->second();
}

}  // namespace emu_selftest
