// Deterministic block reductions: a fixed shuffle tree, so a sum has the same bits on every run.
#pragma once

namespace batchless_kernels {

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of v over a 1-D block of kThreads threads; the result is valid in thread 0.
// scratch: kThreads / 32 elements of shared memory, reusable by the next call.
template <int kThreads, typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block_sum needs whole warps");
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // a previous call may still be reading scratch
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) v = warp_sum(lane < kThreads / 32 ? scratch[lane] : T(0));
  return v;
}

}  // namespace batchless_kernels
