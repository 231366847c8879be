// Fused CPU kernels of batchless normalization (schemas in csrc/ops.cpp).
//
// Forward reads x once and writes y once, accumulating s1 = sum xhat and s2 = sum xhat^2 per
// channel on the way. Backward reads grad_y (and x, only when dweight is wanted) once and writes
// dx once, accumulating dweight and dbias on the way.
//
// Two layouts are read without copies:
//   channels-first  (N, C, S) contiguous, S = product of the spatial dims (NCHW, NCDHW, NCL);
//   channels-last   (M, C) with channels innermost (channels_last 4-D/5-D, (N, C), transposed (N, L, C)).
// Any other strides are copied to contiguous first.
//
// Determinism: the work is cut into tasks whose bounds depend only on the shape, never on the
// thread count; each task writes its partial sums to its own slot, and the slots are summed per
// channel in a fixed order. The result has the same bits whatever the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "batchless_host.h"
#include "batchless_nll.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <utility>

namespace batchless_kernels {
namespace {

using at::Tensor;
using at::vec::Vectorized;

// Elements one task handles at most, about 64 KiB of fp32: large enough to amortize the task, small
// enough to give every core work; and the elements one parallel_for chunk takes at least.
constexpr int64_t kTaskElements = 16384;
// The sequential adds into one accumulator (a vector lane, a partial sum) a task makes before it
// starts afresh (a plane's last segment: fewer than twice; a narrow task then adds its blocks, see
// kNarrow): each adds its rounding error, so the tiles bound them, and the partials are summed as
// a tree (reduce_partials). A chain of up to 16384 / C rows (channels-last, narrow C) made float32 sums
// 20-70x less accurate than torch.sum's, whose cascade sums grow their error with log(n).
constexpr int64_t kMaxChain = 128;
// Channels-last: channels one task handles at most, so its partial-sum row stays in L1.
constexpr int64_t kMaxTaskChannels = 2048;
// Tasks of narrow inputs (C < kNarrow channels-last, C * S < kNarrow small planes) hold more than
// kMaxChain rows or planes: they sum each block of kMaxChain afresh, in a (2, kNarrow) array on the
// stack, before adding it to their partials, which keeps their tasks and partials as large as wide
// inputs' (a chain of kMaxChain + kTaskElements / kMaxChain adds at most).
constexpr int64_t kNarrow = kTaskElements / kMaxChain;
// A cache line, and the elements of T it holds.
constexpr int64_t kLineBytes = 64;
template <typename T>
constexpr int64_t kLineElements = kLineBytes / sizeof(T);
// Channels-first: planes (one n, one c) of at least this many elements get a partial sum each.
constexpr int64_t kMinPlane = 64;

using host::ceil_div;
using host::dispatch_bool;

// Outputs (y, dx) of at least this many bytes are written with non-temporal stores, which go to
// memory without first reading the line into the cache (a plain store reads it: 3 passes of memory
// traffic for a copy's 2) and without evicting the inputs: a quarter of the last-level cache, read
// from Linux's sysfs as lscpu reads it (glibc's sysconf(_SC_LEVEL3_CACHE_SIZE) said 256 MiB on a VM
// whose L3 is 16 MiB); 8 MiB where sysfs says nothing. Such an output, with the op's inputs and the
// layers' other tensors, leaves little of itself in the cache for the next op to read. Measured on
// the 2-core AVX-512 VM (32 MiB L3), 2 threads, thresholds alternated in one process, 4 times: a stack
// norm -> relu -> norm -> relu -> norm, forward+backward (the next op reads each output), (2048, 1024)
// float32 (8 MB outputs) 5.9-7.2 ms a step streamed against 7.0-7.8 plain, (4096, 1024) bfloat16
// 6.5-7.9 against 6.9-10.1, (4096, 1024) float32 11.0-12.2 against 11.8-13.3; but 4 MB outputs,
// (64, 64, 16, 16) float32, 2.6-3.2 streamed against 2.2-2.6 plain. The ops alone, on inputs rotated
// past the cache: (4096, 1024) float32 forward 0.54-0.57 ms streamed against 0.69-0.74, bfloat16
// 0.37-0.40 against 0.49-0.53. On the AVX2 VM (16 MiB L3; streamed from 16 MiB then): (4096, 1024)
// float32 forward 1.16-1.49 ms against 1.69-2.03, backward 1.79-2.55 against 2.31-2.64.
std::atomic<int64_t>& stream_threshold() {
  static std::atomic<int64_t> threshold([] {
    int64_t largest = 0;
    for (int index = 0; index < 8; ++index) {
      const std::string path = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/size";
      std::FILE* file = std::fopen(path.c_str(), "r");
      if (file == nullptr) continue;
      long long size = 0;
      char unit = 0;
      if (std::fscanf(file, "%lld%c", &size, &unit) >= 1) {
        largest = std::max<int64_t>(largest, size << (unit == 'K' ? 10 : unit == 'M' ? 20 : unit == 'G' ? 30 : 0));
      }
      std::fclose(file);
    }
    return largest > 0 ? largest / 4 : int64_t(8) << 20;
  }());
  return threshold;
}
int64_t stream_threshold_bytes() { return stream_threshold().load(std::memory_order_relaxed); }

// Inference (no_grad) streams its output from twice that size: its live set is the input and the
// output alone, where training keeps x for the backward and the layers' other activations, so a
// cached output is more often still there for the next op to read. Measured on the 2-core AVX-512
// VM (32 MiB L3), 2 threads, norm -> relu -> norm -> relu -> norm under no_grad (the next op reads
// each output), thresholds alternated in one process, medians of 30 steps, 12 times: outputs of 8 MB,
// (2048, 1024) float32, 0.99-1.38 ms a step plain against 1.55-1.94 streamed; (4096, 1024) bfloat16
// 1.53-3.51 against 1.67-3.48; 12.8 MB, (64, 256, 14, 14) float32, 2.58-3.75 against 2.91-4.52; 12
// and 14.7 MB even; 20 MB, (5120, 1024) float32, 5.19-7.03 plain against 4.21-5.50 streamed.
int64_t inference_stream_threshold_bytes() {
  const int64_t training = stream_threshold_bytes();
  return training > std::numeric_limits<int64_t>::max() / 2 ? std::numeric_limits<int64_t>::max() : 2 * training;
}

// Non-temporal store of one vector register at p, which must be aligned to the register's size
// (the instructions' requirement; kStreamAlign, 0 where the ISA has none). The same bits as a store.
#if defined(CPU_CAPABILITY_AVX512)
constexpr uintptr_t kStreamAlign = 64;
C10_ALWAYS_INLINE void stream_register(void* p, __m512 v) { _mm512_stream_ps(static_cast<float*>(p), v); }
C10_ALWAYS_INLINE void stream_register(void* p, __m512d v) { _mm512_stream_pd(static_cast<double*>(p), v); }
C10_ALWAYS_INLINE void stream_register(void* p, __m512i v) { _mm512_stream_si512(static_cast<__m512i*>(p), v); }
#elif defined(CPU_CAPABILITY_AVX2)
constexpr uintptr_t kStreamAlign = 32;
C10_ALWAYS_INLINE void stream_register(void* p, __m256 v) { _mm256_stream_ps(static_cast<float*>(p), v); }
C10_ALWAYS_INLINE void stream_register(void* p, __m256d v) { _mm256_stream_pd(static_cast<double*>(p), v); }
C10_ALWAYS_INLINE void stream_register(void* p, __m256i v) { _mm256_stream_si256(static_cast<__m256i*>(p), v); }
#else
constexpr uintptr_t kStreamAlign = 0;
#endif

// Non-temporal stores of the registers `vectors` (at::vec vectors or raw registers of the ISA's width)
// one after another from p, if p is aligned; false where not done.
template <typename... V>
C10_ALWAYS_INLINE bool stream_registers(void* p, const V&... vectors) {
  if constexpr (kStreamAlign == 0) {
    return false;
  } else {
    if (reinterpret_cast<uintptr_t>(p) % kStreamAlign != 0) return false;
    char* at = static_cast<char*>(p);
    ((stream_register(at, vectors), at += kStreamAlign), ...);
    return true;
  }
}

// Whether a kernel writes `buffer` with non-temporal stores: `threshold` bytes or more (each entry
// point passes its own: stream_threshold_bytes or inference_stream_threshold_bytes), and the op's
// output itself, not a buffer of other strides that the op copies into it at once (that copy would
// read it back from memory).
bool streams(const Tensor& buffer, const Tensor& output, int64_t threshold) {
  return buffer.is_same(output) && static_cast<int64_t>(buffer.nbytes()) >= threshold;
}

// Whether non-temporal stores write every chunk of an output at `out` that the kernels walk as `g`
// in chunks of K elements: each run they walk (a channels-first plane, a channels-last row) starts on
// kStreamAlign bytes and holds a full chunk or more, so its chunks, the overlapping last one included
// (for_each_chunk), are all full and aligned. Otherwise the chunks off the alignment and the masked
// tails take plain stores into lines that streamed chunks write too, and such a line is read into the
// cache and written to memory twice: (256, 256, 14, 14) float32 NCHW, whose 784-byte planes put 3 of 4
// on 16 bytes only, took 5.1-5.8 ms a forward streamed against 2.6-2.7 ms with plain stores, backward
// 6.1-6.9 against 4.1-4.3 (alternated in one process, 3 times, AVX-512 VM); such outputs now take
// plain stores, or a buffer (output_stores).
template <typename scalar_t>
bool streams_every_chunk(const scalar_t* out, const host::Geometry& g, int64_t K) {
  if constexpr (kStreamAlign == 0) {
    return false;
  } else {
    const int64_t run = g.layout == host::Layout::kChannelsFirst ? g.S : g.C;
    return reinterpret_cast<uintptr_t>(out) % kStreamAlign == 0 && run >= K &&
           (run * static_cast<int64_t>(sizeof(scalar_t))) % static_cast<int64_t>(kStreamAlign) == 0;
  }
}

// Makes this thread's non-temporal stores globally visible before its task ends: they are not ordered
// with later stores, and the next op may read the output on another core.
C10_ALWAYS_INLINE void store_fence() {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  _mm_sfence();
#endif
}

// The bytes from p to the next cache line's start (0 where p starts one).
int64_t bytes_to_line(const void* p) {
  return (kLineBytes - static_cast<int64_t>(reinterpret_cast<uintptr_t>(p) % kLineBytes)) % kLineBytes;
}

// Copies `bytes` from `in` to `out` (any alignment): the lines that lie wholly inside out's range with
// non-temporal stores, the partial lines at its two ends with plain ones. So a line that two ranges
// share (two planes' outputs) only ever takes plain stores: none is both streamed and cached.
void stream_bytes(char* out, const char* in, int64_t bytes) {
  using fVec = Vectorized<float>;
  int64_t at = std::min(bytes, bytes_to_line(out));
  std::memcpy(out, in, at);
  if constexpr (kStreamAlign != 0) {
    // (checked even where kStreamAlign is 0: this is no template, so the branch is compiled)
    static_assert(kStreamAlign == 0 || (kLineBytes % kStreamAlign == 0 && fVec::size() * sizeof(float) == kStreamAlign));
    const int64_t full_end = at + (bytes - at) / kLineBytes * kLineBytes;
    for (; at < full_end; at += kStreamAlign) {
      stream_registers(out + at, fVec::loadu(reinterpret_cast<const float*>(in + at)));  // bits moved, not computed on
    }
  }
  std::memcpy(out + at, in + at, bytes - at);
}

// Sums of a vector's lanes by one fixed tree: lane j is added to lane j + W/2 (W lanes), the results
// pairwise at distance W/4, and so on (at::vec's vec_reduce_all tree, written out here so that both
// functions below follow it by construction). `sum` reduces one vector; `sum_batch` reduces kBatch
// vectors at once, transposed: each level adds the same pairs for all of them, in kBatch - 1 shuffle
// pairs and adds where kBatch sums take kBatch log2(W), and with no chain of dependent shuffles per
// vector. The same bits as kBatch calls of `sum`. Channels-first planes of 196 elements (7 chunks)
// spent about a sixth of a bfloat16 training forward in their per-plane sums (AVX-512 VM).
// kBatch = 1 (no batching) where no transposed tree is written: float64, and at::vec's DEFAULT ISA.
template <typename T>
struct LaneSums {
  using Vec = Vectorized<T>;
#if defined(CPU_CAPABILITY_AVX512)
  static constexpr int kBatch = std::is_same_v<T, float> ? 16 : 1;
#elif defined(CPU_CAPABILITY_AVX2)
  static constexpr int kBatch = std::is_same_v<T, float> ? 8 : 1;
#else
  static constexpr int kBatch = 1;
#endif

  static T sum(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, float>) {
      __m512 x = v;
      x = _mm512_add_ps(x, _mm512_shuffle_f32x4(x, x, 0x4E));  // distance 8: 256-bit halves
      x = _mm512_add_ps(x, _mm512_shuffle_f32x4(x, x, 0xB1));  // 4: 128-bit quarters
      x = _mm512_add_ps(x, _mm512_shuffle_ps(x, x, 0x4E));     // 2
      x = _mm512_add_ps(x, _mm512_shuffle_ps(x, x, 0xB1));     // 1
      return _mm512_cvtss_f32(x);
    }
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, float>) {
      __m256 x = v;
      x = _mm256_add_ps(x, _mm256_permute2f128_ps(x, x, 0x01));  // distance 4: 128-bit halves
      x = _mm256_add_ps(x, _mm256_shuffle_ps(x, x, 0x4E));       // 2
      x = _mm256_add_ps(x, _mm256_shuffle_ps(x, x, 0xB1));       // 1
      return _mm256_cvtss_f32(x);
    }
#endif
    return at::vec::vec_reduce_all<T>([](const Vec& a, const Vec& b) { return a + b; }, v);
  }

  // out[i] = sum(v[i]) for i < kBatch.
  static void sum_batch(const Vec* v, T* out) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<T, float>) {
      // Distance 8: w[k] holds vector 2k's 8 pair sums in its low half, 2k + 1's in its high half.
      __m512 w[8], u[4], t[2];
      for (int k = 0; k < 8; ++k) {
        const __m512 a = v[2 * k], b = v[2 * k + 1];
        w[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
      }
      // Distance 4 (quarters 0 + 1, 2 + 3 of each): quarter i of u[k] holds vector 4k + i's 4 sums.
      for (int k = 0; k < 4; ++k) {
        const __m512 a = w[2 * k], b = w[2 * k + 1];
        u[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
      }
      // Distance 2 within each quarter: quarter i of t[k] holds vectors 8k + i and 8k + 4 + i, 2 sums each.
      for (int k = 0; k < 2; ++k) {
        const __m512 a = u[2 * k], b = u[2 * k + 1];
        t[k] = _mm512_add_ps(_mm512_shuffle_ps(a, b, 0x44), _mm512_shuffle_ps(a, b, 0xEE));
      }
      // Distance 1: lane 4i + m holds vector 4m + i's total; put vector p's in lane p.
      const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(t[0], t[1], 0x88), _mm512_shuffle_ps(t[0], t[1], 0xDD));
      const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
      _mm512_storeu_ps(out, _mm512_permutexvar_ps(order, r));
      return;
    }
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<T, float>) {
      // Distance 4: w[k] holds vector 2k's 4 pair sums in its low half, 2k + 1's in its high half.
      __m256 w[4], t[2];
      for (int k = 0; k < 4; ++k) {
        const __m256 a = v[2 * k], b = v[2 * k + 1];
        w[k] = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
      }
      // Distance 2 within each half: half h of t[k] holds vectors 4k + h and 4k + 2 + h, 2 sums each.
      for (int k = 0; k < 2; ++k) {
        const __m256 a = w[2 * k], b = w[2 * k + 1];
        t[k] = _mm256_add_ps(_mm256_shuffle_ps(a, b, 0x44), _mm256_shuffle_ps(a, b, 0xEE));
      }
      // Distance 1: lane 4h + m holds vector 2m + h's total; put vector p's in lane p.
      const __m256 r = _mm256_add_ps(_mm256_shuffle_ps(t[0], t[1], 0x88), _mm256_shuffle_ps(t[0], t[1], 0xDD));
      _mm256_storeu_ps(out, _mm256_permutevar8x32_ps(r, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
      return;
    }
#endif
    for (int i = 0; i < kBatch; ++i) out[i] = sum(v[i]);
  }
};

// Loads and stores chunks of kSize = 2 * Vectorized<opmath_t>::size() elements of scalar_t as two
// opmath vectors; a chunk of n < kSize elements (a row's or plane's tail) uses masked accesses, and
// the lanes beyond n load as zero. Always inlined: with n the constant kSize (for_each_chunk) the
// test of n and the masked path fold away (GCC kept `load` out of line, a call for every chunk).
template <typename scalar_t>
struct Chunk {
  using opmath_t = at::opmath_type<scalar_t>;
  using fVec = Vectorized<opmath_t>;
  static constexpr int64_t kW = fVec::size();
  static constexpr int64_t kSize = 2 * kW;

  C10_ALWAYS_INLINE static std::pair<fVec, fVec> load(const scalar_t* p, int64_t n = kSize) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      // Each half zero-extended from memory and shifted into the high 16 bits (the same bits):
      // at::vec loads the chunk into one register and extracts its upper half first. (64, 256, 14, 14)
      // NCHW forward 0.147 ms against 0.152, backward 0.180 against 0.189, inference 0.100 against
      // 0.116; (2048, 1024) forward 0.079 against 0.089 (best of 6 alternations, from the cache).
      if (n == kSize) {
        const auto widen = [](const scalar_t* q) C10_ALWAYS_INLINE_ATTRIBUTE {
          const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
          return fVec(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
        };
        return {widen(p), widen(p + kW)};
      }
    }
#endif
    if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
      const auto v = n == kSize ? Vectorized<scalar_t>::loadu(p) : Vectorized<scalar_t>::loadu(p, n);
      auto [a, b] = at::vec::convert_to_float<scalar_t>(v);
      return {a, b};
    } else {
      return load_acc(p, n);
    }
  }
  // stream: non-temporal stores where they can be (full chunks at aligned addresses).
  C10_ALWAYS_INLINE static void store(scalar_t* p, const fVec& a, const fVec& b, int64_t n = kSize,
                                      bool stream = false) {
    if constexpr (std::is_same_v<scalar_t, opmath_t>) {
      if (stream && n == kSize && stream_registers(p, a, b)) return;
    }
#if defined(CPU_CAPABILITY_AVX512) && defined(__AVX512BF16__)
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      // One instruction rounds 32 floats to nearest even (at::vec's emulation takes ~16): on AVX-512
      // the bf16 loops are bound by this conversion, not by memory. NaN stays NaN; fp32 denormals
      // (below 1.2e-38) become zero (the instruction's DAZ), where at::vec keeps bf16 denormals.
      const __m512i packed = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));  // a: low half
      if (n == kSize) {
        if (!stream || !stream_registers(p, packed)) _mm512_storeu_si512(p, packed);
      } else {
        _mm512_mask_storeu_epi16(p, static_cast<__mmask32>((uint64_t(1) << n) - 1), packed);
      }
      return;
    }
#endif
    if constexpr (at::vec::is_reduced_floating_point_v<scalar_t>) {
      const Vectorized<scalar_t> packed = at::vec::convert_from_float<scalar_t>(a, b);
      if (!stream || n != kSize || !stream_registers(p, packed)) packed.store(p, n);
    } else {
      store_acc(p, a, b, n);
    }
  }
  // The same for arrays of opmath_t (per-channel parameters and partial sums).
  C10_ALWAYS_INLINE static std::pair<fVec, fVec> load_acc(const opmath_t* p, int64_t n = kSize) {
    if (n == kSize) return {fVec::loadu(p), fVec::loadu(p + kW)};
    if (n <= kW) return {fVec::loadu(p, n), fVec(0)};
    return {fVec::loadu(p), fVec::loadu(p + kW, n - kW)};
  }
  C10_ALWAYS_INLINE static void store_acc(opmath_t* p, const fVec& a, const fVec& b, int64_t n = kSize) {
    if (n == kSize) {
      a.store(p);
      b.store(p + kW);
    } else {
      a.store(p, std::min(n, kW));
      if (n > kW) b.store(p + kW, n - kW);
    }
  }
  // a, b with only the lanes [skip, n) kept, the others zeroed: what a chunk adds to a sum when its
  // lanes from n on lie beyond the data, and its first `skip` lanes were added already (for_each_chunk).
  // Zeroed by a bitwise and with a mask from lane-index comparisons (a NaN or inf lane becomes 0 too),
  // not by at::vec's set(a, b, count), which GCC calls out of line (a switch over the count): the call
  // spilled every live vector register once per plane, in the tail chunk of each.
  C10_ALWAYS_INLINE static std::pair<fVec, fVec> lanes(const fVec& a, const fVec& b, int64_t n, int64_t skip) {
    if (n >= kSize && skip <= 0) return {a, b};
    const fVec lane = fVec::arange(opmath_t(0), opmath_t(1));
    return {keep_lanes(a, lane, skip, n), keep_lanes(b, lane + fVec(static_cast<opmath_t>(kW)), skip, n)};
  }
  // f's lanes whose element index (j, exact small integers) lies in [lo, hi), the others zeroed.
  C10_ALWAYS_INLINE static fVec keep_lanes(const fVec& f, const fVec& j, int64_t lo, int64_t hi) {
    const fVec vlo(static_cast<opmath_t>(lo)), vhi(static_cast<opmath_t>(hi));
    return f & ((j >= vlo) & (j < vhi));  // comparisons set every bit of a true lane
  }
  // The same three in an order of the vectors' lanes of their choosing, which store_any_order undoes:
  // for loops that treat every element of a chunk alike (a channels-first plane: one channel's
  // constants) and sum them (in a fixed order, whichever). bfloat16 on AVX2 takes the chunk's even
  // elements into the first vector and its odd ones into the second: a bfloat16 is the high half of
  // a float32, so the 32-bit lanes of the loaded chunk become floats by a shift (even) or a mask
  // (odd), and the rounded floats go back by a shift and a blend of 16-bit halves, where at::vec
  // zero-extends and shifts each half, and packs and permutes across the 128-bit lanes. These loops
  // are bound by instructions, not memory: a bfloat16 load, scale and store took 0.166 ns an element
  // from L2 against 0.216 (one core of this VM, 1.6 MB; 0.236 against 0.286 from L3).
  // Not on AVX-512 (with AVX512-BF16: load by a shift and an and, store by the rounding instruction and
  // a permutation of 16-bit elements): (64, 256, 14, 14) bfloat16 forward 0.191 ms against 0.170,
  // inference 0.116 against 0.106 (best of 6 alternations of the two builds, from the cache).
#if defined(CPU_CAPABILITY_AVX2)
  static constexpr bool kEvenOdd = std::is_same_v<scalar_t, at::BFloat16>;
#else
  static constexpr bool kEvenOdd = false;
#endif
  template <typename Len>
  C10_ALWAYS_INLINE static std::pair<fVec, fVec> load_any_order(const scalar_t* p, Len n) {
#if defined(CPU_CAPABILITY_AVX2)
    if constexpr (kEvenOdd) {
      const __m256i v = n == kSize ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                   : static_cast<__m256i>(Vectorized<scalar_t>::loadu(p, n));
      return {_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)),
              _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xffff0000u))))};
    }
#endif
    return load(p, n);
  }
  template <typename Len>
  C10_ALWAYS_INLINE static void store_any_order(scalar_t* p, const fVec& a, const fVec& b, Len n,
                                                bool stream = false) {
#if defined(CPU_CAPABILITY_AVX2)
    if constexpr (kEvenOdd) {
      // Rounded to nearest even in the high 16 bits, as at::vec and c10::BFloat16 round; a NaN
      // becomes 0xffff (a NaN), as in at::vec.
      const auto round = [](const fVec& f) C10_ALWAYS_INLINE_ATTRIBUTE {
        const __m256i i = _mm256_castps_si256(f);
        const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(i, 16), _mm256_set1_epi32(1));
        const __m256i t = _mm256_add_epi32(_mm256_add_epi32(i, _mm256_set1_epi32(0x7fff)), lsb);
        return _mm256_or_si256(t, _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q)));
      };
      const __m256i v = _mm256_blend_epi16(_mm256_srli_epi32(round(a), 16), round(b), 0xAA);
      if (n == kSize) {
        if (!stream || !stream_registers(p, v)) _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v);
      } else {
        Vectorized<scalar_t>(v).store(p, n);
      }
      return;
    }
#endif
    store(p, a, b, n, stream);
  }
  template <typename Len, typename Skip>
  C10_ALWAYS_INLINE static std::pair<fVec, fVec> lanes_any_order(const fVec& a, const fVec& b, Len n, Skip skip) {
    if constexpr (kEvenOdd) {
      if (n >= kSize && skip <= 0) return {a, b};
      // Element j of the chunk is lane j / 2 of a (even j) or of b (odd j): kept when skip <= j < n.
      const fVec even = fVec::arange(opmath_t(0), opmath_t(2));
      return {keep_lanes(a, even, skip, n), keep_lanes(b, even + fVec(opmath_t(1)), skip, n)};
    }
    return lanes(a, b, n, skip);
  }
  // The ordered or the any-order access, chosen at compile time.
  template <bool kAnyOrder, typename Len>
  C10_ALWAYS_INLINE static std::pair<fVec, fVec> load_in(const scalar_t* p, Len n) {
    if constexpr (kAnyOrder) return load_any_order(p, n);
    else return load(p, n);
  }
  template <bool kAnyOrder, typename Len>
  C10_ALWAYS_INLINE static void store_in(scalar_t* p, const fVec& a, const fVec& b, Len n, bool stream = false) {
    if constexpr (kAnyOrder) store_any_order(p, a, b, n, stream);
    else store(p, a, b, n, stream);
  }
};

using host::Geometry;
using host::Layout;

// Cuts a channels-first (N, C, S) tensor into segments of one channel each: a block of n and a
// block of s, with partial sums in slots t = (nb * C + c) * num_sb + sb.
//   Planes (one n, one c) of kMinPlane elements or more: a segment per plane, or per kMaxChain
//   chunks of a larger plane (n_block = 1; the last segment takes the rest, so that it holds a
//   chunk or more: a lane adds fewer than 2 kMaxChain chunks). Slot order is then memory order: a
//   thread walks contiguous memory, and the partials stay under 2/kMinPlane of x.
//   Smaller planes: a task takes n_block whole samples, contiguous, and adds each plane's sums to
//   the slot of its channel (by blocks of kMaxChain samples when n_block is larger, see kNarrow);
//   n_block * S >= kMinPlane bounds the partials alike.
struct ChannelsFirstTiling {
  int64_t n_block, s_block, num_nb, num_sb;
  ChannelsFirstTiling(int64_t N, int64_t C, int64_t S, int64_t chunk) {
    n_block = 1;
    s_block = S;
    if (S > kMaxChain * chunk) {
      s_block = kMaxChain * chunk;
    } else if (S < kMinPlane) {
      n_block = std::min(N, std::max(ceil_div(kMinPlane, S), ceil_div(kTaskElements, C * S)));
    }
    num_nb = ceil_div(N, n_block);
    num_sb = S / s_block;
  }
  bool small_planes() const { return n_block > 1; }
  int64_t segment_end(int64_t sb, int64_t S) const { return sb + 1 == num_sb ? S : (sb + 1) * s_block; }
  int64_t num_slots(int64_t C) const { return num_nb * C * num_sb; }
};

// Cuts a channels-last (M, C) tensor into tasks of a block of rows and a block of channels: at least
// kMaxChain rows, which bounds the partial sums to 1/kMaxChain of x, and more for narrow C (each
// block of kMaxChain rows then summed on its own, see kNarrow). Partial sums are laid out (num_rb, C).
struct ChannelsLastTiling {
  int64_t r_block, c_block, num_rb, num_cb;
  ChannelsLastTiling(int64_t M, int64_t C) {
    c_block = std::min(C, kMaxTaskChannels);
    r_block = std::min(M, std::max(kMaxChain, kTaskElements / c_block));
    num_rb = ceil_div(M, r_block);
    num_cb = ceil_div(C, c_block);
  }
};

// Calls add(i, j), meaning "item i += item j", so that item 0 ends holding the sum of items [0, n)
// added as a balanced tree: pass k adds item i + 2^k into item i for every i divisible by 2^(k+1).
// The order depends on n alone, and each item passes through at most ceil(log2(n)) adds.
template <typename Add>
C10_ALWAYS_INLINE void tree_sum(int64_t n, const Add& add) {
  for (int64_t step = 1; step < n; step *= 2) {
    for (int64_t i = 0; i + step < n; i += 2 * step) add(i, i + step);
  }
}

// Sums the partials of K statistics, laid out (num_outer, C, num_inner), into per-channel totals:
// channel c's num_outer * num_inner partials, in the order j = o * num_inner + i, by tree_sum, in
// place (the partials are scratch). With num_inner == 1 the rows of C partials may lie
// row_stride >= C apart (padded rows).
template <typename opmath_t, int K>
void reduce_partials(int64_t C, const std::array<opmath_t*, K>& partials, const std::array<opmath_t*, K>& out,
                     int64_t num_outer, int64_t num_inner, int64_t row_stride) {
  // Whole cache lines of channels per thread, as the tree writes the partials it reads: parallel over
  // lines, not channels (ATen's OpenMP parallel_for cuts a range in equal parts, not at multiples of
  // the grain).
  constexpr int64_t kLine = kLineElements<opmath_t>;
  const int64_t grain = ceil_div(std::max<int64_t>(1, kTaskElements / (num_outer * num_inner)), kLine);
  const auto by_lines = [&](const auto& body) {
    at::parallel_for(0, ceil_div(C, kLine), grain,
                     [&](int64_t l0, int64_t l1) { body(l0 * kLine, std::min(C, l1 * kLine)); });
  };
  if (num_inner == 1) {
    // Row into row, across channels in vector lanes (each channel's adds in the tree's order), not
    // channel after channel down a column: a (64, 256, 14, 14) bf16 forward spent 8.5% of its time
    // here in serial scalar adds strided by C.
    by_lines([&](int64_t c0, int64_t c1) {
      for (int k = 0; k < K; ++k) {
        opmath_t* const base = partials[k];
        tree_sum(num_outer, [&](int64_t i, int64_t j) {
          opmath_t* __restrict__ into = base + i * row_stride;
          const opmath_t* __restrict__ from = base + j * row_stride;
          for (int64_t c = c0; c < c1; ++c) into[c] += from[c];
        });
        std::copy(base + c0, base + c1, out[k] + c0);
      }
    });
    return;
  }
  by_lines([&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      for (int k = 0; k < K; ++k) {
        opmath_t* const p = partials[k];
        const auto at = [&](int64_t j) -> opmath_t& { return p[(j / num_inner * C + c) * num_inner + j % num_inner]; };
        tree_sum(num_outer * num_inner, [&](int64_t i, int64_t j) { at(i) += at(j); });
        out[k][c] = at(0);
      }
    }
  });
}

// A scratch array (partial sums, per-channel factors), zeroed unless `zeroed` is false: on the stack
// when it is small (a small input's step allocates nothing more than its outputs), else a tensor.
// The partial sums are zeroed by the tasks that fill them, in parallel and in their own cache, not
// here: one thread's at::zeros of a (4096, 1024) float32 pass's 256 KB took 25-30 us of its 1-2 ms.
template <typename opmath_t>
class Scratch {
 public:
  static constexpr int64_t kOnStack = 1024;
  Scratch(const Scratch&) = delete;  // data_ may point into this object
  Scratch& operator=(const Scratch&) = delete;
  explicit Scratch(int64_t n, bool zeroed = true) {
    if (n > kOnStack) {
      const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<opmath_t>::value);
      tensor_ = zeroed ? at::zeros({n}, options) : at::empty({n}, options);
      data_ = tensor_.data_ptr<opmath_t>();
    } else {
      if (zeroed) std::fill_n(stack_, n, opmath_t(0));
      data_ = stack_;
    }
  }
  opmath_t* data() { return data_; }

 private:
  alignas(kLineBytes) opmath_t stack_[kOnStack];  // tensors' data is 64-byte aligned too
  Tensor tensor_;
  opmath_t* data_;
};

// scale[c] = r[c] * w[c] (C,), written into `buffer`: the per-channel factor of the forward's
// y = (x - m) * scale + b and of the backward's dx = grad_y * scale.
template <typename opmath_t>
const opmath_t* channel_scale(Scratch<opmath_t>& buffer, const opmath_t* r, const Tensor& weight, int64_t C) {
  const opmath_t* w = weight.data_ptr<opmath_t>();
  for (int64_t c = 0; c < C; ++c) buffer.data()[c] = r[c] * w[c];
  return buffer.data();
}

// Rows narrower than a chunk: a channels-last row of C < K channels, or a channels-first sample of
// planes smaller than a chunk (S < K). Walked as they lie, each row or plane is a masked chunk, which
// at::vec's AVX2 code copies through a stack buffer: float32 (16, 2, 128, 128) channels_last
// forward+backward took 21 ms (2% of the copy bandwidth), (4096, 64, 2, 2) NCHW 23 ms. Such inputs
// are walked instead as channels-last rows of P "wide channels": x flattened and cut every P
// elements, P a multiple of the row's R elements (R = C channels-last, C * S channels-first) and of K
// when R < K (when R >= K a row's tail is an overlapping full chunk, see for_each_chunk), of at least
// kMinWideChannels. Wide channel j belongs to channel channel(j) = (j % R) / Q (Q = 1 channels-last,
// S channels-first); the kernels read the per-channel parameters expanded to the P wide channels
// (expand), and their sums are folded back (fold). Those two inputs now take 0.5-0.7 ms and 0.9-2.4 ms.
// Rows of P >= 256 rather than the least multiple (16 for C = 2): (64, 2, 256, 256) channels_last
// 11.7-15 ms against 16-17.6 ms (3 alternations of the builds, this VM; 512: 14.5-23.5 ms).
// Only inputs of kMinWideRows rows of P or more: the expansion writes a few P elements. Planes of K to
// 63 elements keep their own path: (64, 256, 7, 7) as 64 rows of 12544 took twice as long.
constexpr int64_t kMinWideRows = 8;
constexpr int64_t kMinWideChannels = 256;
struct WideRows {
  Geometry geometry;  // what the kernels walk: the input's own, or (rows, P) channels-last
  bool active = false;
  int64_t R = 0, Q = 1, P = 0;
  int64_t full_rows;  // channels-last: the rows of geometry that x fills
  int64_t tail = 0;   // then the elements of the last, partial row, if any

  WideRows(const Geometry& g, int64_t K) : geometry(g), full_rows(g.N * g.S) {
    const bool channels_last = g.layout == Layout::kChannelsLast;
    if (channels_last ? g.C >= K : g.S >= K) return;
    R = channels_last ? g.C : g.C * g.S;
    Q = channels_last ? 1 : g.S;
    P = R < K ? std::lcm(R, K) : R;
    P *= ceil_div(kMinWideChannels, P);
    const int64_t numel = g.N * g.C * g.S;
    if (numel < kMinWideRows * P) return;
    active = true;
    geometry = Geometry{Layout::kChannelsLast, ceil_div(numel, P), P, 1};
    full_rows = numel / P;
    tail = numel % P;
  }
  // The end of the channel range [c0, c1) of a row within x.
  int64_t row_end(int64_t row, int64_t c0, int64_t c1) const {
    return row < full_rows ? c1 : std::max(c0, std::min(c1, tail));
  }
  // into[j] = from[channel(j)] for j in [0, P): each wide channel's parameter (no division: with
  // j % R / Q per element, a (8, 256, 3, 3) inference took 65-75 us, against 19-20 us without).
  template <typename T>
  const T* expand(const T* from, T* into) const {
    for (int64_t c = 0; c < R / Q; ++c) std::fill_n(into + c * Q, Q, from[c]);
    for (int64_t j = R; j < P; ++j) into[j] = into[j - R];
    return into;
  }
  // into[c] = the sum of from[j] over the wide channels j of channel c: the P / R rows of R as a
  // tree (in place: from is scratch), then a channel's Q < K terms in sequence.
  template <typename T>
  void fold(T* from, T* into) const {
    tree_sum(P / R, [&](int64_t i, int64_t j) {
      for (int64_t k = 0; k < R; ++k) from[i * R + k] += from[j * R + k];
    });
    for (int64_t c = 0; c < R / Q; ++c) into[c] = std::accumulate(from + c * Q, from + (c + 1) * Q, T(0));
  }
};

// A kernel's per-channel parameters as the walk reads them: with `wide` active, each pointer is
// replaced by its expansion to the P wide channels, and the sums go to (2, P) wide sums, folded back
// afterwards; otherwise nothing changes.
template <typename opmath_t, size_t N>
class WideParams {
 public:
  WideParams(const WideRows& wide, const std::array<const opmath_t**, N>& params)
      : wide_(wide), buffer_(wide.active ? (N + 2) * wide.P : 0) {
    if (!wide.active) return;
    for (size_t i = 0; i < N; ++i) *params[i] = wide.expand(*params[i], buffer_.data() + i * wide.P);
  }
  // Where run_tiled is to put the totals of out0, out1 (C,).
  std::pair<opmath_t*, opmath_t*> sums_for(opmath_t* out0, opmath_t* out1) {
    if (!wide_.active) return {out0, out1};
    return {sums(), sums() + wide_.P};
  }
  // Then the totals of out0, out1.
  void fold(opmath_t* out0, opmath_t* out1) {
    if (!wide_.active) return;
    wide_.fold(sums(), out0);
    wide_.fold(sums() + wide_.P, out1);
  }

 private:
  opmath_t* sums() { return buffer_.data() + N * wide_.P; }
  const WideRows& wide_;
  Scratch<opmath_t> buffer_;
};

// Channels-last rows in the chunks' lane order (Chunk::load_any_order; bfloat16 on AVX2): a row's
// full chunks, which start at multiples of K, read x in that order, so they read the per-channel
// parameters from copies permuted alike, block by block of K channels (`permuted`), and add to the
// partial sums at the permuted places; `restore` puts the totals back in channel order. The row's
// last C % K channels stay in channel order: its tail (an overlapping full chunk, or a masked one)
// runs the ordered path on the parameters as given, and adds its new lanes only to sums there. Not
// for rows of wide channels (WideRows), whose partial last row would break the block pattern.
template <typename V, size_t N>
class LaneOrder {
  using opmath_t = typename V::opmath_t;
  static constexpr int64_t K = V::kSize;

 public:
  LaneOrder(const WideRows& wide, const std::array<const opmath_t*, N>& params)
      : active_(V::kEvenOdd && !wide.active && wide.geometry.layout == Layout::kChannelsLast),
        blocks_(active_ ? wide.geometry.C / K : 0),
        buffer_(N * blocks_ * K) {
    for (size_t i = 0; i < N; ++i) {
      permuted_[i] = buffer_.data() + i * blocks_ * K;
      for (int64_t c = 0; c < blocks_ * K; ++c) permuted_[i][place(c)] = params[i][c];
    }
  }
  const opmath_t* permuted(size_t i) const { return permuted_[i]; }
  // f(std::bool_constant<active>): instantiated for false alone where no chunk has a lane order.
  template <typename F>
  void dispatch(const F& f) const {
    if constexpr (V::kEvenOdd) {
      dispatch_bool(active_, f);
    } else {
      f(std::false_type{});
    }
  }
  // sums (C,) from permuted to channel order (in place).
  void restore(opmath_t* sums) const {
    if (!active_) return;
    Scratch<opmath_t> copy(blocks_ * K);
    std::copy_n(sums, blocks_ * K, copy.data());
    for (int64_t c = 0; c < blocks_ * K; ++c) sums[c] = copy.data()[place(c)];
  }

 private:
  // Where channel c sits: even elements of a block in its first half, odd ones in its second.
  static int64_t place(int64_t c) {
    const int64_t j = c % K;
    return c - j + (j % 2 ? K / 2 : 0) + j / 2;
  }
  bool active_;
  int64_t blocks_;
  Scratch<opmath_t> buffer_;
  std::array<opmath_t*, N> permuted_{};
};

// Calls body(sum0, sum1) with sum0, sum1 the slot's partial sums (C,), or in blocks (a narrow task's
// block of kMaxChain rows or samples, see kNarrow) with a zeroed (2, kNarrow) block, then added into
// the slot's. One call of body in the code: with a second one for the blocks, the float32
// (16, 2, 128, 128) channels_last inference took 4.5-7.5 ms against 2.4-3.8 ms (A/B of the two
// builds, this VM, before WideRows).
template <typename opmath_t, typename Body>
C10_ALWAYS_INLINE void sum_in_block(bool in_blocks, int64_t C, opmath_t* slot0, opmath_t* slot1,
                                    opmath_t (&block)[2][kNarrow], const Body& body) {
  opmath_t* const sum0 = in_blocks ? block[0] : slot0;
  opmath_t* const sum1 = in_blocks ? block[1] : slot1;
  if (in_blocks) {
    std::fill_n(sum0, C, opmath_t(0));
    std::fill_n(sum1, C, opmath_t(0));
  }
  body(sum0, sum1);
  if (in_blocks) {
    for (int64_t c = 0; c < C; ++c) {
      slot0[c] += sum0[c];
      slot1[c] += sum1[c];
    }
  }
}

// The two vectors that a channels-first body emits per segment, collected for consecutive segments
// and reduced LaneSums::kBatch at a time: store(index, sum0, sum1) for each, in the order of add.
template <typename opmath_t>
class SegmentSums {
  using fVec = Vectorized<opmath_t>;
  using Sums = LaneSums<opmath_t>;

 public:
  template <typename Store>
  C10_ALWAYS_INLINE void add(int64_t index, const fVec& u0, const fVec& u1, const Store& store) {
    index_[held_] = index;
    v0_[held_] = u0;
    v1_[held_] = u1;
    if (++held_ == Sums::kBatch) flush(store);
  }
  template <typename Store>
  void flush(const Store& store) {
    if (held_ == Sums::kBatch) {
      Sums::sum_batch(v0_, s0_);
      Sums::sum_batch(v1_, s1_);
    } else {
      for (int i = 0; i < held_; ++i) {
        s0_[i] = Sums::sum(v0_[i]);
        s1_[i] = Sums::sum(v1_[i]);
      }
    }
    for (int i = 0; i < held_; ++i) store(index_[i], s0_[i], s1_[i]);
    held_ = 0;
  }

 private:
  fVec v0_[Sums::kBatch], v1_[Sums::kBatch];
  opmath_t s0_[Sums::kBatch], s1_[Sums::kBatch];
  int64_t index_[Sums::kBatch];
  int held_ = 0;
};

// Runs `body` over every task of the geometry with two partial-sum slots per task, then reduces
// the partials into out0, out1 (C,) when `reduce` is set.
//   channels-first body(n0, n1, c, s0, s1, emit): calls emit(u0, u1) once with two vectors whose
//                  lanes sum to its segment's two sums (reduced in batches of a task's consecutive
//                  segments, SegmentSums);
//   channels-last  body(r0, r1, c0, c1, p0, p1): p0, p1 point at this task's (C,) partial rows,
//                  zeroed, indexed by absolute channel.
template <typename opmath_t, typename FirstBody, typename LastBody>
void run_tiled(const Geometry& g, int64_t chunk, bool reduce, opmath_t* out0, opmath_t* out1,
               const FirstBody& first_body, const LastBody& last_body) {
  using fVec = Vectorized<opmath_t>;
  if (g.layout == Layout::kChannelsFirst) {
    const ChannelsFirstTiling t(g.N, g.C, g.S, chunk);
    // One slot per channel (one sample block, one segment per plane): the totals themselves.
    const bool direct = reduce && t.num_slots(g.C) == g.C;
    const int64_t slots = reduce && !direct ? t.num_slots(g.C) : 0;
    // Zeroed where the tasks add into their slots (small planes); a plane's segment is stored.
    Scratch<opmath_t> partials(2 * slots, /*zeroed=*/false);
    opmath_t* p0 = slots ? partials.data() : direct ? out0 : nullptr;  // null: a task that does not reduce
    opmath_t* p1 = slots ? p0 + slots : direct ? out1 : nullptr;
    if (direct) {
      std::fill_n(out0, g.C, opmath_t(0));
      std::fill_n(out1, g.C, opmath_t(0));
    }
    if (t.small_planes()) {
      const int64_t grain = std::max<int64_t>(1, kTaskElements / (t.n_block * g.C * g.S));
      const bool in_blocks = reduce && t.n_block > kMaxChain;  // then C * S < kNarrow
      TORCH_INTERNAL_ASSERT_DEBUG_ONLY(!in_blocks || g.C <= kNarrow);
      at::parallel_for(0, t.num_nb, grain, [&](int64_t begin, int64_t end) {
        alignas(kLineBytes) opmath_t block[2][kNarrow];
        for (int64_t nb = begin; nb < end; ++nb) {
          opmath_t* const slot0 = reduce ? p0 + nb * g.C : nullptr;
          opmath_t* const slot1 = reduce ? p1 + nb * g.C : nullptr;
          if (slots) {
            std::fill_n(slot0, g.C, opmath_t(0));
            std::fill_n(slot1, g.C, opmath_t(0));
          }
          const int64_t n_end = std::min(g.N, (nb + 1) * t.n_block);
          for (int64_t b0 = nb * t.n_block; b0 < n_end; b0 += kMaxChain) {
            sum_in_block(in_blocks, g.C, slot0, slot1, block, [&](opmath_t* sum0, opmath_t* sum1) {
              // Each channel's planes added in the order of n, as one at a time would add them.
              const auto add_to_channel = [&](int64_t c, opmath_t plane0, opmath_t plane1) {
                sum0[c] += plane0;
                sum1[c] += plane1;
              };
              SegmentSums<opmath_t> sums;
              for (int64_t n = b0; n < std::min(n_end, b0 + kMaxChain); ++n) {
                for (int64_t c = 0; c < g.C; ++c) {
                  first_body(n, n + 1, c, 0, g.S, [&](const fVec& u0, const fVec& u1) C10_ALWAYS_INLINE_ATTRIBUTE {
                    if (reduce) sums.add(c, u0, u1, add_to_channel);
                  });
                }
              }
              if (reduce) sums.flush(add_to_channel);
            });
          }
        }
        store_fence();
      });
    } else {
      const int64_t grain = std::max<int64_t>(1, kTaskElements / t.s_block);
      at::parallel_for(0, t.num_slots(g.C), grain, [&](int64_t begin, int64_t end) {
        // The slot's (n, c, sb) counted along, not divided out of it (three 64-bit divisions a
        // plane): (64, 256, 14, 14) bfloat16 inference 0.51-0.52 ms against 0.53-0.56 ms (A/B of
        // the two builds, 3 alternations, this VM).
        int64_t sb = begin % t.num_sb;
        int64_t c = (begin / t.num_sb) % g.C;
        int64_t n = begin / (t.num_sb * g.C);
        const auto to_slot = [&](int64_t slot, opmath_t sum0, opmath_t sum1) {
          p0[slot] = sum0;
          p1[slot] = sum1;
        };
        SegmentSums<opmath_t> sums;
        for (int64_t slot = begin; slot < end; ++slot) {
          first_body(n, n + 1, c, sb * t.s_block, t.segment_end(sb, g.S),
                     [&](const fVec& u0, const fVec& u1) C10_ALWAYS_INLINE_ATTRIBUTE {
            if (reduce) sums.add(slot, u0, u1, to_slot);  // a task that does not reduce drops its sums
          });
          if (++sb == t.num_sb) {
            sb = 0;
            if (++c == g.C) {
              c = 0;
              ++n;
            }
          }
        }
        if (reduce) sums.flush(to_slot);
        store_fence();
      });
    }
    if (slots) reduce_partials<opmath_t, 2>(g.C, {p0, p1}, {out0, out1}, t.num_nb, t.num_sb, g.C);
  } else {
    const int64_t M = g.N * g.S;
    const ChannelsLastTiling t(M, g.C);
    // Partial rows (num_rb, C) per statistic; with one block of rows, the totals themselves. A task
    // that does not reduce writes none. Each row starts on a cache line of its own: a task stores its
    // row once per row of x, and a line shared by two tasks' rows would bounce between the cores
    // (false sharing: the (8, 64, 8, 8) channels_last training forward took 27 us on 2 threads
    // against 17.6 us on one).
    const bool direct = reduce && t.num_rb == 1;
    const int64_t row_stride = ceil_div(g.C, kLineElements<opmath_t>) * kLineElements<opmath_t>;
    Scratch<opmath_t> partials(reduce && !direct ? 2 * t.num_rb * row_stride : 0, /*zeroed=*/false);
    opmath_t* q0 = direct ? out0 : reduce ? partials.data() : nullptr;
    opmath_t* q1 = direct ? out1 : reduce ? q0 + t.num_rb * row_stride : nullptr;
    if (direct) {
      std::fill_n(out0, g.C, opmath_t(0));
      std::fill_n(out1, g.C, opmath_t(0));
    }
    const bool in_blocks = reduce && t.r_block > kMaxChain;  // then C = c_block < kNarrow
    TORCH_INTERNAL_ASSERT_DEBUG_ONLY(!in_blocks || (t.num_cb == 1 && g.C <= kNarrow));
    at::parallel_for(0, t.num_rb * t.num_cb, 1, [&](int64_t begin, int64_t end) {
      alignas(kLineBytes) opmath_t block[2][kNarrow];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t rb = task / t.num_cb;
        const int64_t cb = task % t.num_cb;
        const int64_t row = reduce ? rb * row_stride : 0;
        const int64_t r0 = rb * t.r_block, r1 = std::min(M, (rb + 1) * t.r_block);
        const int64_t c0 = cb * t.c_block, c1 = std::min(g.C, (cb + 1) * t.c_block);
        const int64_t step = in_blocks ? kMaxChain : r1 - r0;
        if (reduce && !direct) {  // this task's channels of its partial rows (the totals: zeroed above)
          std::fill(q0 + row + c0, q0 + row + c1, opmath_t(0));
          std::fill(q1 + row + c0, q1 + row + c1, opmath_t(0));
        }
        for (int64_t b0 = r0; b0 < r1; b0 += step) {
          sum_in_block(in_blocks, g.C, q0 + row, q1 + row, block, [&](opmath_t* sum0, opmath_t* sum1) {
            last_body(b0, std::min(r1, b0 + step), c0, c1, sum0, sum1);
          });
        }
      }
      store_fence();
    });
    if (reduce && !direct) reduce_partials<opmath_t, 2>(g.C, {q0, q1}, {out0, out1}, t.num_rb, 1, row_stride);
  }
}

// ------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------

// Adds one chunk's two vectors ha, hb to the sums of their elements and of their squares.
template <typename fVec>
inline void add_stats(const fVec& ha, const fVec& hb, fVec& s1a, fVec& s1b, fVec& s2a, fVec& s2b) {
  s1a = s1a + ha;
  s1b = s1b + hb;
  s2a = at::vec::fmadd(ha, ha, s2a);
  s2b = at::vec::fmadd(hb, hb, s2b);
}

// Calls body(i, len, skip) for chunks of kSize elements that cover [begin, end): the full chunks, with
// len = kSize and skip = 0 as compile-time constants so that their loop holds no masked path nor
// length test; then a tail of t < kSize elements, if any. When [begin, end) holds a full chunk, the
// tail is the full chunk that ends at `end`, with skip = kSize - t: its first skip elements were
// handled already, so its elementwise outputs are written twice with the same values, and its sums
// must drop those lanes (Chunk::lanes). Masked loads and stores, which at::vec's AVX2 code runs
// through memcpy into a stack buffer (a quarter of a (64, 256, 14, 14) bfloat16 forward's time, in
// tails of 4 of 196 elements), remain only for ranges shorter than a chunk (len = t). The range is
// one task's own, so the rewritten outputs are never another thread's.
// The kernels' bodies are lambdas marked C10_ALWAYS_INLINE_ATTRIBUTE: GCC kept the bfloat16 backward's
// out of line, a call per chunk with its prologue, stack realignment and reloads of the captured
// pointers ((64, 256, 14, 14) bfloat16 channels_last training backward 1.7-2.1 ms against 2.45-2.95,
// A/B of the two builds, 2 alternations, this VM; float32 unchanged).
template <int64_t kSize>
using FullChunk = std::integral_constant<int64_t, kSize>;
using NoSkip = std::integral_constant<int64_t, 0>;
// Whether for_each_chunk called its body for one of the full chunks that start at begin + k * kSize.
template <typename Len, typename Skip>
struct StridedFullChunk : std::false_type {};
template <int64_t n>
struct StridedFullChunk<std::integral_constant<int64_t, n>, NoSkip> : std::bool_constant<(n > 0)> {};
template <typename Len, typename Skip>
constexpr bool kStridedFullChunk = StridedFullChunk<Len, Skip>::value;

template <int64_t kSize, typename Body>
C10_ALWAYS_INLINE void for_each_chunk(int64_t begin, int64_t end, const Body& body) {
  using Full = FullChunk<kSize>;
  using None = NoSkip;
  int64_t i = begin;
  for (; i + kSize <= end; i += kSize) body(i, Full{}, None{});
  if (i == end) return;
  if (end - begin >= kSize) {
    body(end - kSize, Full{}, kSize - (end - i));
  } else {
    body(i, end - i, None{});
  }
}

// How a channels-first kernel writes its elementwise output (y, dx).
enum class OutputStores { kPlain, kStreamed, kBuffered };

// The stores of an output of `stream`-worthy size at `out`, walked as `g` in chunks of K: streamed
// where every chunk is full and aligned (streams_every_chunk); else, channels-first, buffered: each
// segment's chunks go to a buffer on the stack at out's offset within a line, which stream_bytes then
// writes out, its whole lines streamed and the partial lines that planes share with plain stores.
// Thresholds alternated in one process, 3 times, AVX-512 VM: (256, 256, 14, 14) float32 NCHW
// (784-byte planes) forward 2.03-2.49 ms buffered against 2.67-3.22 plain, backward 2.90-3.72
// against 4.51-5.00; (128, 256, 14, 14) float64 forward+backward 6.48-6.54 against 7.57-8.33. Not for
// 16-bit outputs: bfloat16 (256, 256, 14, 14) took 5.2-7.3 ms forward+backward buffered against
// 2.6-3.7 plain (those loops are bound by instructions, and the buffer's line loads straddle two
// chunk stores still in flight, which defeats store forwarding: our reading, not measured).
template <typename scalar_t>
OutputStores output_stores(bool stream, const scalar_t* out, const host::Geometry& g, int64_t K) {
  if (!stream || kStreamAlign == 0) return OutputStores::kPlain;
  if (streams_every_chunk(out, g, K)) return OutputStores::kStreamed;
  const bool buffered = g.layout == host::Layout::kChannelsFirst && sizeof(scalar_t) >= 4;
  return buffered ? OutputStores::kBuffered : OutputStores::kPlain;
}

// for_each_chunk<K>(s0, s1, ...) over a channels-first segment whose elementwise output lies at `out`:
// body(i, len, skip, dst, stream) writes chunk i's output at dst, with non-temporal stores if `stream`.
// Buffered, the segment runs in pieces of kPiece elements (the last one takes the rest, kPiece + K - 1
// at most, so that it holds the overlapping last chunk: the same chunks, with the same lanes summed,
// as one for_each_chunk over the segment), each written to the buffer, then out.
template <int64_t K, typename T, typename Body>
C10_ALWAYS_INLINE void for_each_output_chunk(OutputStores stores, T* out, int64_t s0, int64_t s1, const Body& body) {
  if (stores != OutputStores::kBuffered) {
    const bool stream = stores == OutputStores::kStreamed;
    for_each_chunk<K>(s0, s1, [&](int64_t i, auto len, auto skip) C10_ALWAYS_INLINE_ATTRIBUTE {
      body(i, len, skip, out == nullptr ? nullptr : out + i, stream);  // null: an output not written
    });
    return;
  }
  constexpr int64_t kPiece = 16 * K;
  constexpr int64_t kLine = kLineBytes / static_cast<int64_t>(sizeof(T));
  alignas(kLineBytes) T buffer[kLine + kPiece + K];
  for (int64_t p0 = s0; p0 < s1;) {
    const int64_t p1 = s1 - p0 >= kPiece + K ? p0 + kPiece : s1;
    const int64_t shift = static_cast<int64_t>(reinterpret_cast<uintptr_t>(out + p0) % kLineBytes) / static_cast<int64_t>(sizeof(T));
    T* const at = buffer + shift;  // buffer element shift + (i - p0) stands for out's element i
    for_each_chunk<K>(p0, p1, [&](int64_t i, auto len, auto skip) C10_ALWAYS_INLINE_ATTRIBUTE {
      body(i, len, skip, at + (i - p0), false);
    });
    stream_bytes(reinterpret_cast<char*>(out + p0), reinterpret_cast<const char*>(at), (p1 - p0) * static_cast<int64_t>(sizeof(T)));
    p0 = p1;
  }
}

// Rows per group in the channels-last training forward and, for 32- and 64-bit elements, backward
// (see `rows` there), in tasks at least kRowGroupMinChannels wide. Measured on the 2-core EPYC VM
// against a same-run copy, A/B of two builds, 3-4 alternations each: forward with sums (8192, 1024)
// float32 0.70-0.73 of the copy (0.58-0.65 a row at a time), (4096, 1024) bfloat16 0.25-0.35
// (0.22-0.25); backward (8192, 1024) float32 0.80-0.88 of 1.5 copies (0.61-0.79), (4096, 1024)
// float32 0.75-0.83 (0.56-0.72). Not taken: narrower tasks ((64, 256, 14, 14) channels_last float32
// forward 0.40-0.56 against 0.47-0.71), the bfloat16 backward ((8192, 1024) 0.41-0.57 against
// 0.36-0.63: no better), and without sums (inference: 4 rows' streams at a time for fewer parameter
// loads, (8192, 1024) float32 0.77-0.81 against 0.84-0.90, bfloat16 0.56-0.59 against 0.75-0.81).
constexpr int kRowGroup = 4;
constexpr int64_t kRowGroupMinChannels = 512;

template <typename scalar_t, bool kStats>
void forward_kernel(const Geometry& g, const scalar_t* x, scalar_t* y, const Tensor& mean,
                    const Tensor& rstd, const Tensor& weight, const Tensor& bias, Tensor& s1,
                    Tensor& s2, bool stream) {
  using V = Chunk<scalar_t>;
  using opmath_t = typename V::opmath_t;
  using fVec = typename V::fVec;
  constexpr int64_t K = V::kSize;
  const opmath_t* m = mean.data_ptr<opmath_t>();
  const opmath_t* r = rstd.data_ptr<opmath_t>();
  const int64_t C = g.C, S = g.S;
  const opmath_t* b = bias.data_ptr<opmath_t>();
  // y = (x - m) * scale + b with scale = r * w per channel: a subtraction and an FMA an element where
  // ((x - m) * r) * w + b takes three operations. Training and inference both run this kernel, so
  // their y keep the same bits. Not BatchNorm eval's x * scale + (b - m * scale): its rounding of
  // m * scale costs y about eps * |m| / sigma, 1e-4 in float32 for activations at 1000 sigmas from 0
  // (test_large_offset_inputs).
  Scratch<opmath_t> scale_buffer(C, /*zeroed=*/false);
  const opmath_t* scale = channel_scale(scale_buffer, r, weight, C);
  // Rows narrower than a chunk are walked as rows of wide channels (WideRows).
  const WideRows wide(g, K);
  WideParams<opmath_t, 4> wide_params(wide, {&m, &r, &scale, &b});
  const OutputStores stores = output_stores(stream, y, wide.geometry, K);
  stream = stores == OutputStores::kStreamed;  // what the channels-last rows take
  const int64_t row_length = wide.geometry.C;  // channels-last

  // A plane's segment, inlined into run_tiled's loop over them: GCC called it, a prologue that
  // realigned the stack a plane. One thread, from the cache, A/B of the two builds in both orders:
  // (64, 256, 14, 14) bfloat16 forward 0.245-0.260 ms against 0.269-0.290, (32, 256, 14, 14) float32
  // 0.169-0.180 against 0.179-0.187, (16, 256, 28, 28) bfloat16 0.170-0.184 against 0.184-0.193. The
  // backward's (the same change) measured no different.
  auto first = [&](int64_t n0, int64_t n1, int64_t c, int64_t s0, int64_t s1_, const auto& emit) C10_ALWAYS_INLINE_ATTRIBUTE {
    const fVec vm(m[c]), vr(r[c]), vscale(scale[c]), vb(b[c]);
    fVec a1(0), b1(0), a2(0), b2(0);
    for (int64_t n = n0; n < n1; ++n) {
      const scalar_t* const xp = x + (n * C + c) * S;
      for_each_output_chunk<K>(stores, y + (n * C + c) * S, s0, s1_,
                               [&](int64_t i, auto len, auto skip, scalar_t* yp, bool stream) C10_ALWAYS_INLINE_ATTRIBUTE {
        auto [xa, xb] = V::load_any_order(xp + i, len);
        const fVec ca = xa - vm, cb = xb - vm;  // x centred
        if constexpr (kStats) {
          auto [ha, hb] = V::lanes_any_order(ca * vr, cb * vr, len, skip);
          add_stats(ha, hb, a1, b1, a2, b2);
        }
        V::store_any_order(yp, at::vec::fmadd(ca, vscale, vb), at::vec::fmadd(cb, vscale, vb), len, stream);
      });
    }
    if constexpr (kStats) {
      emit(a1 + b1, a2 + b2);
    }
  };

  // kRows consecutive rows at a time: the per-channel parameters and partial sums are loaded (and
  // the sums stored) once per group, not per row; the rows are still added one after the other, so
  // the sums have the bits of a row at a time.
  // Channels-last rows in lane order where the chunks have one (LaneOrder).
  const LaneOrder<V, 4> lane_order(wide, {m, r, scale, b});
  auto rows = [&](auto rows_constant, auto order_constant, int64_t row, int64_t c0, int64_t c1, opmath_t* p1,
                  opmath_t* p2) {
    constexpr int kRows = decltype(rows_constant)::value;
    // Locals, not the captured references: a bf16 store may alias anything, and would make the
    // compiler reload every pointer through the closure for every chunk.
    const int64_t ld = row_length;
    const scalar_t* const xp = x + row * ld;
    scalar_t* const yp = y + row * ld;
    const opmath_t *const mp = m, *const rp = r, *const scale_p = scale, *const bp = b;
    const opmath_t *const mq = lane_order.permuted(0), *const rq = lane_order.permuted(1),
                          *const scale_q = lane_order.permuted(2), *const bq = lane_order.permuted(3);
    // Beyond len x and the parameters load as 0, and so add 0 to the sums.
    for_each_chunk<K>(c0, c1, [&](int64_t c, auto len, auto skip) C10_ALWAYS_INLINE_ATTRIBUTE {
      constexpr bool kAnyOrder = decltype(order_constant)::value && kStridedFullChunk<decltype(len), decltype(skip)>;
      fVec ra(0), rb(0), s1a(0), s1b(0), s2a(0), s2b(0);
      if constexpr (kStats) {
        std::tie(ra, rb) = V::load_acc((kAnyOrder ? rq : rp) + c, len);
        std::tie(s1a, s1b) = V::load_acc(p1 + c, len);
        std::tie(s2a, s2b) = V::load_acc(p2 + c, len);
      }
      auto [ma, mb] = V::load_acc((kAnyOrder ? mq : mp) + c, len);
      auto [ka, kb] = V::load_acc((kAnyOrder ? scale_q : scale_p) + c, len);
      auto [ba, bb] = V::load_acc((kAnyOrder ? bq : bp) + c, len);
      for (int i = 0; i < kRows; ++i) {
        auto [xa, xb] = V::template load_in<kAnyOrder>(xp + i * ld + c, len);
        const fVec ca = xa - ma, cb = xb - mb;  // x centred
        if constexpr (kStats) {
          auto [ha, hb] = V::lanes(ca * ra, cb * rb, K, skip);  // skip: 0 in lane order
          add_stats(ha, hb, s1a, s1b, s2a, s2b);
        }
        V::template store_in<kAnyOrder>(yp + i * ld + c, at::vec::fmadd(ca, ka, ba), at::vec::fmadd(cb, kb, bb), len,
                                        stream);
      }
      if constexpr (kStats) {
        V::store_acc(p1 + c, s1a, s1b, len);
        V::store_acc(p2 + c, s2a, s2b, len);
      }
    });
  };
  const auto last_in = [&](auto order) {
    return [&, order](int64_t r0, int64_t r1, int64_t c0, int64_t c1, opmath_t* p1, opmath_t* p2) {
      int64_t row = r0;
      if (kStats && c1 - c0 >= kRowGroupMinChannels) {
        const int64_t full = std::min(r1, wide.full_rows);
        for (; row + kRowGroup <= full; row += kRowGroup) {
          rows(std::integral_constant<int, kRowGroup>{}, order, row, c0, c1, p1, p2);
        }
      }
      for (; row < r1; ++row) rows(std::integral_constant<int, 1>{}, order, row, c0, wide.row_end(row, c0, c1), p1, p2);
    };
  };

  opmath_t* o1 = kStats ? s1.data_ptr<opmath_t>() : nullptr;
  opmath_t* o2 = kStats ? s2.data_ptr<opmath_t>() : nullptr;
  const auto [t1, t2] = wide_params.sums_for(o1, o2);
  lane_order.dispatch([&](auto order) {
    run_tiled<opmath_t>(wide.geometry, K, kStats, t1, t2, first, last_in(order));
  });
  if constexpr (kStats) {
    lane_order.restore(t1);
    lane_order.restore(t2);
    wide_params.fold(o1, o2);
  }
}

// The forward kernel over a plan (its outputs written, not yet finished); y streamed from
// stream_threshold bytes on.
void run_forward(host::ForwardPlan& plan, bool compute_stats, int64_t stream_threshold) {
  if (plan.empty) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.x.scalar_type(), "batchless_forward", [&] {
    dispatch_bool(compute_stats, [&](auto stats) {
      forward_kernel<scalar_t, decltype(stats)::value>(
          plan.geometry, plan.x.const_data_ptr<scalar_t>(), plan.y_buffer.data_ptr<scalar_t>(),
          plan.mean, plan.rstd, plan.weight, plan.bias, plan.s1, plan.s2,
          streams(plan.y_buffer, plan.y, stream_threshold));
    });
  });
}

std::tuple<Tensor, Tensor, Tensor> forward_cpu(const Tensor& x, const Tensor& mean,
                                               const Tensor& rstd,
                                               const c10::optional<Tensor>& weight,
                                               const c10::optional<Tensor>& bias,
                                               bool compute_stats) {
  auto plan = host::plan_forward(x, mean, rstd, weight, bias, compute_stats, c10::DeviceType::CPU);
  run_forward(plan, compute_stats, stream_threshold_bytes());
  return plan.finish();
}

// ------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------

template <typename scalar_t, bool kDx, bool kDw, bool kDb>
void backward_kernel(const Geometry& g, const scalar_t* gy, const scalar_t* x, scalar_t* dx,
                     const Tensor& mean, const Tensor& rstd, const Tensor& weight, Tensor& dw,
                     Tensor& db, bool stream) {
  using V = Chunk<scalar_t>;
  using opmath_t = typename V::opmath_t;
  using fVec = typename V::fVec;
  constexpr int64_t K = V::kSize;
  constexpr bool kReduce = kDw || kDb;
  const opmath_t* m = mean.data_ptr<opmath_t>();
  const opmath_t* const r = rstd.data_ptr<opmath_t>();
  const int64_t C = g.C, S = g.S;
  // dx = grad_y * scale with scale = w * r per channel; dweight = r sum grad_y * (x - m), scaled once
  // per channel at the end, as the forward's sums (a multiply an element fewer).
  Scratch<opmath_t> scale_buffer(C, /*zeroed=*/false);
  const opmath_t* scale = channel_scale(scale_buffer, r, weight, C);
  // Rows narrower than a chunk, as in the forward: wide channels.
  const WideRows wide(g, K);
  WideParams<opmath_t, 2> wide_params(wide, {&m, &scale});
  const OutputStores stores = kDx ? output_stores(stream, dx, wide.geometry, K) : OutputStores::kPlain;
  stream = stores == OutputStores::kStreamed;  // what the channels-last rows take
  const int64_t row_length = wide.geometry.C;  // channels-last

  auto first = [&](int64_t n0, int64_t n1, int64_t c, int64_t s0, int64_t s1_, const auto& emit) {
    const fVec vm(m[c]), vscale(scale[c]);
    fVec aw(0), bw(0), ab(0), bb(0);
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t base = (n * C + c) * S;
      const scalar_t* const gp = gy + base;
      const scalar_t* const xp = kDw ? x + base : nullptr;  // null when not read or written
      // Beyond len grad_y and x load as 0: they add nothing. (dx null when not written.)
      for_each_output_chunk<K>(stores, kDx ? dx + base : nullptr, s0, s1_,
                               [&](int64_t i, auto len, auto skip, scalar_t* dxp, bool stream) C10_ALWAYS_INLINE_ATTRIBUTE {
        auto [ga, gb] = V::load_any_order(gp + i, len);
        if constexpr (kDx) V::store_any_order(dxp, ga * vscale, gb * vscale, len, stream);
        std::tie(ga, gb) = V::lanes_any_order(ga, gb, K, skip);
        if constexpr (kDw) {
          auto [xa, xb] = V::load_any_order(xp + i, len);
          auto [ha, hb] = V::lanes_any_order(xa - vm, xb - vm, len, skip);  // len: beyond it x loads as 0
          aw = at::vec::fmadd(ga, ha, aw);
          bw = at::vec::fmadd(gb, hb, bw);
        }
        if constexpr (kDb) {
          ab = ab + ga;
          bb = bb + gb;
        }
      });
    }
    // Both sums emitted (the partials are not zeroed beforehand): zeros for the one not asked for.
    // None for dx alone, which reduces nothing.
    if constexpr (kReduce) {
      emit(kDw ? aw + bw : fVec(0), kDb ? ab + bb : fVec(0));
    }
  };

  // kRows rows at a time, as the forward's `rows`: the same bits as a row at a time.
  // Channels-last rows in lane order where the chunks have one (LaneOrder).
  const LaneOrder<V, 2> lane_order(wide, {m, scale});
  auto rows = [&](auto rows_constant, auto order_constant, int64_t row, int64_t c0, int64_t c1, opmath_t* pw,
                  opmath_t* pb) {
    constexpr int kRows = decltype(rows_constant)::value;
    // Locals, not the captured references (see the forward's `rows`).
    const int64_t ld = row_length;
    const scalar_t* const gp = gy + row * ld;
    const scalar_t* const xp = kDw ? x + row * ld : nullptr;  // null when not read or written
    scalar_t* const dxp = kDx ? dx + row * ld : nullptr;
    const opmath_t *const mp = m, *const scale_p = scale;
    const opmath_t *const mq = lane_order.permuted(0), *const scale_q = lane_order.permuted(1);
    // Beyond len grad_y, x and the parameters load as 0, and partial stores leave memory alone.
    for_each_chunk<K>(c0, c1, [&](int64_t c, auto len, auto skip) C10_ALWAYS_INLINE_ATTRIBUTE {
      constexpr bool kAnyOrder = decltype(order_constant)::value && kStridedFullChunk<decltype(len), decltype(skip)>;
      fVec sa(0), sb(0), ta(0), tb(0), ka(0), kb(0), ma(0), mb(0);
      if constexpr (kDx) std::tie(ka, kb) = V::load_acc((kAnyOrder ? scale_q : scale_p) + c, len);
      if constexpr (kDw) {
        std::tie(ma, mb) = V::load_acc((kAnyOrder ? mq : mp) + c, len);
        std::tie(sa, sb) = V::load_acc(pw + c, len);
      }
      if constexpr (kDb) std::tie(ta, tb) = V::load_acc(pb + c, len);
      for (int i = 0; i < kRows; ++i) {
        auto [ga, gb] = V::template load_in<kAnyOrder>(gp + i * ld + c, len);
        if constexpr (kDx) {
          V::template store_in<kAnyOrder>(dxp + i * ld + c, ga * ka, gb * kb, len, stream);
        }
        std::tie(ga, gb) = V::lanes(ga, gb, K, skip);  // skip: 0 in lane order
        if constexpr (kDw) {
          auto [xa, xb] = V::template load_in<kAnyOrder>(xp + i * ld + c, len);
          auto [ha, hb] = V::lanes(xa - ma, xb - mb, K, skip);
          sa = at::vec::fmadd(ga, ha, sa);
          sb = at::vec::fmadd(gb, hb, sb);
        }
        if constexpr (kDb) {
          ta = ta + ga;
          tb = tb + gb;
        }
      }
      if constexpr (kDw) V::store_acc(pw + c, sa, sb, len);
      if constexpr (kDb) V::store_acc(pb + c, ta, tb, len);
    });
  };
  const auto last_in = [&](auto order) {
    return [&, order](int64_t r0, int64_t r1, int64_t c0, int64_t c1, opmath_t* pw, opmath_t* pb) {
      int64_t row = r0;
      if (kReduce && sizeof(scalar_t) >= 4 && c1 - c0 >= kRowGroupMinChannels) {
        const int64_t full = std::min(r1, wide.full_rows);
        for (; row + kRowGroup <= full; row += kRowGroup) {
          rows(std::integral_constant<int, kRowGroup>{}, order, row, c0, c1, pw, pb);
        }
      }
      for (; row < r1; ++row) rows(std::integral_constant<int, 1>{}, order, row, c0, wide.row_end(row, c0, c1), pw, pb);
    };
  };

  opmath_t* o1 = kDw ? dw.data_ptr<opmath_t>() : nullptr;
  opmath_t* o2 = kDb ? db.data_ptr<opmath_t>() : nullptr;
  Tensor scratch;
  if constexpr (kReduce) {
    // Reduce both slots; the one not asked for is summed into a scratch buffer of its own.
    if (!(kDw && kDb)) scratch = at::empty({g.C}, kDw ? dw.options() : db.options());
    if (!o1) o1 = scratch.data_ptr<opmath_t>();
    if (!o2) o2 = scratch.data_ptr<opmath_t>();
  }
  const auto [t1, t2] = kReduce ? wide_params.sums_for(o1, o2) : std::pair<opmath_t*, opmath_t*>{o1, o2};
  lane_order.dispatch([&](auto order) {
    run_tiled<opmath_t>(wide.geometry, K, kReduce, t1, t2, first, last_in(order));
  });
  if constexpr (kReduce) {
    if (kDw) lane_order.restore(t1);
    if (kDb) lane_order.restore(t2);
    wide_params.fold(o1, o2);
    if (kDw) {
      for (int64_t c = 0; c < C; ++c) o1[c] *= r[c];  // sum grad_y * (x - m) to sum grad_y * xhat
    }
  }
}

std::tuple<Tensor, Tensor, Tensor> backward_cpu(const Tensor& grad_y,
                                                const c10::optional<Tensor>& x_opt,
                                                const Tensor& mean, const Tensor& rstd,
                                                const c10::optional<Tensor>& weight,
                                                std::array<bool, 3> output_mask) {
  auto plan = host::plan_backward(grad_y, x_opt, mean, rstd, weight, output_mask, c10::DeviceType::CPU);
  if (plan.empty) return plan.finish();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_y.scalar_type(), "batchless_backward", [&] {
    const scalar_t* xp = output_mask[1] ? plan.x.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dxp = output_mask[0] ? plan.dx_buffer.data_ptr<scalar_t>() : nullptr;
    dispatch_bool(output_mask[0], [&](auto kdx) {
      dispatch_bool(output_mask[1], [&](auto kdw) {
        dispatch_bool(output_mask[2], [&](auto kdb) {
          backward_kernel<scalar_t, decltype(kdx)::value, decltype(kdw)::value, decltype(kdb)::value>(
              plan.geometry, plan.grad_y.const_data_ptr<scalar_t>(), xp, dxp, plan.mean, plan.rstd,
              plan.weight, plan.dweight, plan.dbias,
              output_mask[0] && streams(plan.dx_buffer, plan.dx, stream_threshold_bytes()));
        });
      });
    });
  });
  return plan.finish();
}

// ------------------------------------------------------------------------------------------
// Training ops and inference: the kernels above and the NLL's loop, called directly (no dispatcher,
// no autograd in between), so that a small layer costs the host as little as possible.
// ------------------------------------------------------------------------------------------

// r = 1/sigma (C,) in the accumulation dtype, a fresh tensor: one loop over the channels by
// nll::rstd_value (the NLL's own r), not tensor ops (two to three dispatched ops and allocations
// for abs and log: microseconds at small shapes). Training and inference share it: the same bits.
Tensor rstd_cpu(const Tensor& x, const Tensor& std_param, nll::Parametrization kind, double eps) {
  host::check_x(x, "x", c10::DeviceType::CPU);
  nll::check_eps(eps, host::accumulation_type(x.scalar_type()), "batchless_norm");
  host::check_channel_tensor(std_param, "std_param", x);
  const Tensor p = host::in_dtype(std_param, host::accumulation_type(x.scalar_type())).contiguous();
  Tensor r = at::empty({p.numel()}, p.options());
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "batchless_rstd_cpu", [&] {
    const scalar_t* in = p.const_data_ptr<scalar_t>();
    scalar_t* out = r.data_ptr<scalar_t>();
    for (int64_t c = 0; c < p.numel(); ++c) out[c] = nll::rstd_value(in[c], kind, static_cast<scalar_t>(eps));
  });
  return r;
}

// batchless_norm_train_forward (csrc/ops.cpp): y, the sums, r and the NLL.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> train_forward_cpu(
    const Tensor& x, const Tensor& mean, const Tensor& std_param, const c10::optional<Tensor>& weight,
    const c10::optional<Tensor>& bias, c10::string_view parametrization, double eps, bool gauge) {
  const Tensor rstd = rstd_cpu(x, std_param, nll::parse_parametrization(parametrization, "batchless_norm"), eps);
  auto [y, s1, s2] = forward_cpu(x, mean, rstd, weight, bias, /*compute_stats=*/true);
  // An empty x has no elements to average: nll = 0 with zero gradients (reference.py).
  Tensor nll = x.numel() == 0 ? at::zeros({}, s1.options())
                              : nll_cpu(s1, s2, mean, std_param, x.numel() / x.size(1), parametrization, eps, gauge);
  return {y, s1, s2, rstd, nll};
}

// batchless_norm_train_backward (csrc/ops.cpp): the backward kernel and the NLL's gradients.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> train_backward_cpu(
    const Tensor& grad_y, const Tensor& grad_nll, const c10::optional<Tensor>& x, const Tensor& mean,
    const Tensor& std_param, const Tensor& rstd, const c10::optional<Tensor>& weight, const Tensor& s1,
    const Tensor& s2, int64_t count, c10::string_view parametrization, double eps, std::array<bool, 5> mask) {
  auto [dx, dw, db] = backward_cpu(grad_y, x, mean, rstd, weight, {mask[0], mask[1], mask[2]});
  Tensor dmean, dparam;
  if (mask[3] || mask[4]) {
    std::tie(dmean, dparam) = nll_backward_cpu(grad_nll, s1, s2, mean, std_param, count, parametrization, eps);
  }
  if (!mask[3]) dmean = at::empty({0}, mean.options());
  if (!mask[4]) dparam = at::empty({0}, std_param.options());
  return {dx, dw, db, dmean, dparam};
}

// batchless_norm_inference (csrc/ops.cpp): y alone, r computed here.
Tensor inference_cpu(const Tensor& x, const Tensor& mean, const Tensor& std_param, const c10::optional<Tensor>& weight,
                     const c10::optional<Tensor>& bias, c10::string_view parametrization, double eps) {
  const Tensor rstd = rstd_cpu(x, std_param, nll::parse_parametrization(parametrization, "batchless_norm"), eps);
  auto plan = host::plan_forward(x, mean, rstd, weight, bias, /*compute_stats=*/false, c10::DeviceType::CPU);
  run_forward(plan, /*compute_stats=*/false, inference_stream_threshold_bytes());
  return plan.finish_y();
}

}  // namespace

int64_t set_cpu_stream_threshold(int64_t bytes) {
  return bytes < 0 ? stream_threshold_bytes() : stream_threshold().exchange(bytes);
}

// A plain store reads each line before writing it: torch's copy_ moves 3 passes of memory for the 2 a
// copy counts, and kernels that stream their outputs would read as more than 100% of it. This copy
// writes as they do, in tasks of kTaskBytes cut at cache lines, each ending with the fence.
at::Tensor cpu_stream_copy(const at::Tensor& src) {
  TORCH_CHECK(src.device().is_cpu() && src.is_non_overlapping_and_dense(),
              "cpu_stream_copy: expected a dense CPU tensor for src (contiguous in some dim order, e.g. "
              "channels_last), got one on ", src.device(), " with sizes ", src.sizes(), " and strides ", src.strides());
  Tensor dst = at::empty_like(src);  // the same strides: both hold their elements in one block
  const char* in = static_cast<const char*>(src.const_data_ptr());
  char* out = static_cast<char*>(dst.data_ptr());
  const int64_t bytes = static_cast<int64_t>(src.nbytes());
  constexpr int64_t kTaskBytes = kTaskElements * sizeof(float);
  static_assert(kTaskBytes % kLineBytes == 0);
  // Tasks start where out is aligned to a line (the first one at out itself).
  const int64_t head = std::min(bytes, bytes_to_line(out));
  std::memcpy(out, in, head);
  at::parallel_for(0, ceil_div(bytes - head, kTaskBytes), 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t lo = head + task * kTaskBytes, hi = std::min(bytes, lo + kTaskBytes);
      stream_bytes(out + lo, in + lo, hi - lo);
    }
    store_fence();
  });
  return dst;
}

TORCH_LIBRARY_IMPL(batchless_kernels, CPU, m) {
  m.impl("batchless_norm_forward", &forward_cpu);
  m.impl("batchless_norm_backward", &backward_cpu);
  m.impl("batchless_norm_train_forward", &train_forward_cpu);
  m.impl("batchless_norm_train_backward", &train_backward_cpu);
  m.impl("batchless_norm_inference", &inference_cpu);
}

}  // namespace batchless_kernels
