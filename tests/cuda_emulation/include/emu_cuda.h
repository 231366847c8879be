// CUDA emulation for g++ (tests only; see tests/cuda_emulation/build.py for the whole picture).
//
// What the kernels of csrc/cuda use, for a host compiler: the execution-space keywords, the built-in
// indices (threadIdx, blockIdx, blockDim, gridDim), dim3 and the vector types, __syncthreads, the
// warp shuffles and votes, the cache-hint loads and stores, and kernel launches. A launch runs its
// blocks one after another; each CUDA thread of a block runs as a fiber (ucontext) that yields at
// every barrier and warp collective, where the engine (engine.cpp) checks what the hardware would
// punish: barriers reached from different call sites or after threads exited, warp collectives
// whose mask names exited or absent lanes or lanes waiting elsewhere, launch limits. Shared memory
// is fresh for every block and starts as 0xFF bytes (NaN in every floating type).
//
// The source rewrite (rewrite.py) turns what g++ cannot parse into calls of this header:
//   k<<<grid, block, shmem, stream>>>(args)     ->  ::emu::launch(k, "k", grid, block, shmem, stream)(args)
//   __shared__ T name[dims];                    ->  a reference to ::emu::static_shared<T[dims]>("file:line:name")
//   extern __shared__ __align__(a) T name[];    ->  T* const name = ::emu::dynamic_shared<T>(a);
//   __launch_bounds__(n) ... kernel(...) {      ->  kernel(...) { EMU_LAUNCH_BOUNDS(n);
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
// Static shared memory must go through rewrite.py (::emu::static_shared): a plain declaration would
// give every fiber its own copy.
#define __shared__ _Pragma("GCC error \"__shared__ left in the source: run it through tests/cuda_emulation/rewrite.py\"")

#define EMU_STR2(x) #x
#define EMU_STR(x) EMU_STR2(x)

// ------------------------------------------------------------------------------------------------
// Vector types
// ------------------------------------------------------------------------------------------------

#define EMU_VECTOR_TYPES(T, name, align2, align4)                        \
  struct __attribute__((aligned(sizeof(T)))) name##1 { T x; };           \
  struct __attribute__((aligned(align2))) name##2 { T x, y; };           \
  struct name##3 { T x, y, z; };                                         \
  struct __attribute__((aligned(align4))) name##4 { T x, y, z, w; };     \
  inline name##2 make_##name##2(T x, T y) { return {x, y}; }            \
  inline name##3 make_##name##3(T x, T y, T z) { return {x, y, z}; }     \
  inline name##4 make_##name##4(T x, T y, T z, T w) { return {x, y, z, w}; }

EMU_VECTOR_TYPES(char, char, 2, 4)
EMU_VECTOR_TYPES(unsigned char, uchar, 2, 4)
EMU_VECTOR_TYPES(short, short, 4, 8)
EMU_VECTOR_TYPES(unsigned short, ushort, 4, 8)
EMU_VECTOR_TYPES(int, int, 8, 16)
EMU_VECTOR_TYPES(unsigned int, uint, 8, 16)
EMU_VECTOR_TYPES(long long, longlong, 16, 16)
EMU_VECTOR_TYPES(unsigned long long, ulonglong, 16, 16)
EMU_VECTOR_TYPES(float, float, 8, 16)
EMU_VECTOR_TYPES(double, double, 16, 16)
#undef EMU_VECTOR_TYPES

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

// ------------------------------------------------------------------------------------------------
// Runtime types (the parts the CUDA headers' stubs need)
// ------------------------------------------------------------------------------------------------

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "unspecified launch failure";
  }
}
struct CUstream_st;
using cudaStream_t = CUstream_st*;

struct cudaDeviceProp {
  char name[256];
  int major, minor;
  int multiProcessorCount;
  int maxThreadsPerBlock;
  int maxThreadsDim[3];
  int maxGridSize[3];
  size_t sharedMemPerBlock;
  size_t sharedMemPerBlockOptin;
  size_t sharedMemPerMultiprocessor;
  int maxThreadsPerMultiProcessor;
  int maxBlocksPerMultiProcessor;
  int warpSize;
  int regsPerBlock;
};

constexpr int warpSize = 32;

namespace emu {

// What the built-in indices read: the running fiber's thread and its block.
struct BlockView {
  uint3 block_idx;
  dim3 block_dim, grid_dim;
};
struct ThreadView {
  uint3 thread_idx;
  const BlockView* block;
};
extern thread_local const ThreadView* tls_thread;

[[noreturn]] void fail(const char* what, const char* file, int line);
void syncthreads(const char* file, int line);
void syncwarp(unsigned mask, const char* file, int line);

enum class Collective { kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kSync };
// One lane's part of a warp collective: `bytes` bytes of value in and out (shuffles), or the vote.
uint64_t warp_collective(Collective kind, unsigned mask, uint64_t value, int bytes, int arg, int width,
                         const char* file, int line);

void* static_shared_bytes(const char* key, size_t bytes, size_t align);
void* dynamic_shared_bytes(size_t align);
// Also records the kernel's instance (its __PRETTY_FUNCTION__: template arguments) in the launch log.
void check_launch_bounds(int max_threads, const char* file, int line, const char* instance);
// The mutant switched on (set_mutant; 0: none), and whether it is `id`: rewrite.py's mutations,
// compiled into every variant, test the test stage. Inline, a load and a compare: the mutants of the
// loop bounds test it once per iteration.
inline int active_mutant = 0;
inline bool mutant(int id) { return active_mutant == id; }

// The current simulated device (settings of the engine).
cudaDeviceProp* device_properties();
int current_device_index();
int occupancy_blocks_per_sm(int block_threads, size_t dynamic_shared);
void launch_checked();

struct LaunchConfig {
  dim3 grid, block;
  size_t dynamic_shared;
  const char* kernel;
};
void run_grid(const LaunchConfig& config, void (*body)(void*), void* closure);

template <typename T>
T& static_shared(const char* key) {
  return *static_cast<T*>(static_shared_bytes(key, sizeof(T), alignof(T)));
}
template <typename T>
T* dynamic_shared(size_t align) {
  return static_cast<T*>(dynamic_shared_bytes(align < alignof(T) ? alignof(T) : align));
}

template <typename... P>
struct Launcher {
  void (*kernel)(P...);
  LaunchConfig config;

  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
    // The arguments are copied once at launch (CUDA copies them to the constant bank): every thread
    // sees the same values.
    std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    static_assert((std::is_trivially_copyable_v<std::decay_t<P>> && ...),
                  "kernel arguments must be trivially copyable");
    auto body = [&] { std::apply(kernel, params); };
    using Body = decltype(body);
    run_grid(config, [](void* b) { (*static_cast<Body*>(b))(); }, &body);
  }
};

template <typename... P>
Launcher<P...> launch(void (*kernel)(P...), const char* name, dim3 grid, dim3 block, size_t shared = 0,
                      cudaStream_t = nullptr) {
  return Launcher<P...>{kernel, LaunchConfig{grid, block, shared, name}};
}

template <typename T>
uint64_t to_bits(const T& v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp shuffles move up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}
template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

}  // namespace emu

#define threadIdx (::emu::tls_thread->thread_idx)
#define blockIdx (::emu::tls_thread->block->block_idx)
#define blockDim (::emu::tls_thread->block->block_dim)
#define gridDim (::emu::tls_thread->block->grid_dim)

#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::emu::syncwarp(::emu::mask_or_full(__VA_ARGS__), __FILE__, __LINE__)

#define EMU_LAUNCH_BOUNDS(...) ::emu::check_launch_bounds(::emu::first_arg(__VA_ARGS__), __FILE__, __LINE__, __PRETTY_FUNCTION__)
namespace emu {
template <typename... Rest>
constexpr int first_arg(int n, Rest...) { return n; }
constexpr unsigned mask_or_full() { return 0xffffffffu; }
constexpr unsigned mask_or_full(unsigned mask) { return mask; }
}  // namespace emu

// Warp shuffles and votes. The macros pass the call site for the engine's messages.
#define __shfl_sync(mask, var, lane, ...) ::emu::shfl(::emu::Collective::kShflIdx, mask, var, lane, __FILE__, __LINE__, ##__VA_ARGS__)
#define __shfl_up_sync(mask, var, delta, ...) ::emu::shfl(::emu::Collective::kShflUp, mask, var, delta, __FILE__, __LINE__, ##__VA_ARGS__)
#define __shfl_down_sync(mask, var, delta, ...) ::emu::shfl(::emu::Collective::kShflDown, mask, var, delta, __FILE__, __LINE__, ##__VA_ARGS__)
#define __shfl_xor_sync(mask, var, lane_mask, ...) ::emu::shfl(::emu::Collective::kShflXor, mask, var, lane_mask, __FILE__, __LINE__, ##__VA_ARGS__)
#define __ballot_sync(mask, pred) static_cast<unsigned>(::emu::warp_collective(::emu::Collective::kBallot, mask, (pred) ? 1 : 0, 4, 0, 32, __FILE__, __LINE__))
#define __any_sync(mask, pred) (__ballot_sync(mask, pred) != 0u)
#define __all_sync(mask, pred) (__ballot_sync(mask, pred) == (mask))

namespace emu {
template <typename T>
T shfl(Collective kind, unsigned mask, T var, int arg, const char* file, int line, int width = warpSize) {
  return from_bits<T>(warp_collective(kind, mask, to_bits(var), sizeof(T), arg, width, file, line));
}
}  // namespace emu

// Cache-hint loads and stores: plain accesses here.
template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldca(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
template <typename T> inline T __ldcs(const T* p) { return *p; }
template <typename T> inline T __ldlu(const T* p) { return *p; }
template <typename T> inline T __ldcv(const T* p) { return *p; }
template <typename T> inline void __stwb(T* p, T v) { *p = v; }
template <typename T> inline void __stcg(T* p, T v) { *p = v; }
template <typename T> inline void __stcs(T* p, T v) { *p = v; }
template <typename T> inline void __stwt(T* p, T v) { *p = v; }

inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
// Integer atomics (returning the old value, as CUDA's do); float atomics are left out on purpose:
// the kernels must not use them (determinism).
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }

// Occupancy and device queries (the settings of the simulated device).
template <typename F>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, F, int block_threads, size_t dynamic_shared) {
  *blocks = ::emu::occupancy_blocks_per_sm(block_threads, dynamic_shared);
  return cudaSuccess;
}
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
// The current simulated device's (the engine has one device at a time: its settings).
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = ::emu::device_properties()->multiProcessorCount;
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaPeekAtLastError() { return cudaSuccess; }
