// Fused CUDA kernels of batchless normalization (schemas in csrc/ops.cpp; host-side preparation in
// csrc/batchless_host.h, shared with the CPU kernels).
//
// Forward reads x once and writes y once, with s1 = sum xhat and s2 = sum xhat^2 per channel on the
// way. Backward reads grad_y (and x, only when dweight is wanted) once and writes dx once, with
// dweight = sum grad_y * xhat and dbias = sum grad_y on the way.
//
// Work is cut into tiles, one thread block each:
//   channels-first (N, C, S): a tile is one channel c, a block of samples n and a segment of the
//     plane; the block's threads cover `rows` planes at a time, `cols` vectors of each.
//   channels-last (M, C): a tile is a block of rows and a block of channels; each thread owns V
//     consecutive channels and walks rows.
// Tiles are sized from the multiprocessor count and the kernel's occupancy. Each tile writes its
// partial sums to its own slot, and a second kernel sums the slots per channel in a fixed order:
// no float atomics, the same bits on every run on a given GPU for inputs of the same shape (the
// vector width V, which groups the sums, depends on the shape only; a misaligned pointer only
// makes the accesses narrower).
//
// Memory access: V elements (up to 16 bytes) per load and store when the inner extent allows it and
// every pointer is aligned to it, else the widest access the alignment allows (V / W instructions a
// pack); each thread issues kUnroll independent loads before using them, so that enough bytes are
// in flight; offsets are 64-bit.
//
// This header is compiled by batchless_norm_kernels_fp32_bf16.cu and _fp64_fp16.cu: each defines
// run_forward and run_backward of its dtypes (BATCHLESS_NORM_CUDA_KERNELS below), which the ops' host
// side (batchless_norm_cuda.cpp) calls through batchless_norm_cuda.cuh.
#pragma once

// c10's CUDA headers, not ATen's: no tensor headers here (batchless_common.h says why).
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <utility>
#include <mutex>
#include <tuple>
#include <type_traits>

#include "batchless_common.h"
#include "batchless_nll_math.h"
#include "cuda/batchless_norm_cuda.cuh"
#include "cuda/block_reduce.cuh"

namespace batchless_kernels {
// The kernels have internal linkage: each translation unit has its own (the second stage's, which
// both use, included).
namespace {

using cuda_norm::NllEpilogue;
using cuda_norm::Params;
using host::Geometry;
using host::Layout;

constexpr int kThreads = 256;
// Independent vector loads a thread issues before using them (memory-level parallelism).
constexpr int kUnroll = 4;
// Channels-first tiles per launch: this many waves of resident blocks, so the tail stays short.
constexpr int kWaves = 4;
// Elements per tile at least, so that a tile amortizes its reduction.
constexpr int64_t kMinTileElements = 4096;
// Vectors a thread adds into its accumulators at most, and rows the channels-last epilogue adds one
// after another: each add rounds, so a long chain loses accuracy that torch.sum's cascade keeps (the
// CPU kernels' kMaxChain). Huge inputs get more tiles than the waves above instead.
constexpr int64_t kMaxChain = 128;
constexpr int kFoldRows = 16;
// Channels-last: a block spans one warp of V-wide channel vectors (32 * V channels, coalesced
// rows of up to 512 bytes) and walks rows; about one wave of blocks keeps the partial sums small.
constexpr int kWarp = 32;

using host::ceil_div;
using host::dispatch_bool;

// V elements, moved by V / W load or store instructions of W elements each (load_pack, store_pack).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// W: elements per instruction, the widest power of two up to V that p's alignment allows
// (access_width): V / W instructions move the pack (the same V lanes, hence the same sums: only the
// speed depends on alignment).
template <int V, int W, typename T>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  static_assert(V % W == 0, "the access width divides the pack");
  Pack<T, V> pack;
#pragma unroll
  for (int j = 0; j < V / W; ++j) {
    reinterpret_cast<Pack<T, W>*>(&pack)[j] = reinterpret_cast<const Pack<T, W>*>(p)[j];
  }
  return pack;
}

// Stores through a plain vector type: nvcc split struct stores into scalar ones on some paths.
template <int V, int W, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& pack) {
  static_assert(V % W == 0, "the access width divides the pack");
  constexpr int kBytes = sizeof(T) * W;
#pragma unroll
  for (int j = 0; j < V / W; ++j) {
    if constexpr (kBytes == 16) {
      uint4 u;
      __builtin_memcpy(&u, reinterpret_cast<const uint4*>(&pack) + j, 16);
      __stwb(reinterpret_cast<uint4*>(p) + j, u);
    } else if constexpr (kBytes == 8) {
      uint2 u;
      __builtin_memcpy(&u, reinterpret_cast<const uint2*>(&pack) + j, 8);
      __stwb(reinterpret_cast<uint2*>(p) + j, u);
    } else {
      reinterpret_cast<Pack<T, W>*>(p)[j] = reinterpret_cast<const Pack<T, W>*>(&pack)[j];
    }
  }
}


// The parameters of P channels: P = V consecutive channels (channels-last), or P = 1 channel that
// every lane shares (channels-first).
template <typename acc_t, int P>
struct Lanes {
  acc_t m[P], r[P], w[P], b[P];
  __device__ __forceinline__ Lanes(const Params<acc_t>& p, int64_t c) {
#pragma unroll
    for (int k = 0; k < P; ++k) {
      m[k] = p.mean[c + k];
      r[k] = p.rstd != nullptr ? p.rstd[c + k] : nll::Sigma<acc_t>(p.std_param[c + k], p.kind, p.eps).r;
      w[k] = p.weight[c + k];
      b[k] = p.bias != nullptr ? p.bias[c + k] : acc_t(0);
    }
  }
};

// The ops read their inputs with load() and consume them with apply(), so that a thread can issue
// several loads before the first apply.

// Forward at offset i: y = xhat * w + b with xhat = (x - m) * r; a0 += xhat, a1 += xhat^2.
template <typename scalar_t, bool kStats>
struct ForwardOp {
  using scalar_type = scalar_t;
  using acc_t = at::opmath_type<scalar_t>;
  template <int V>
  struct In {
    Pack<scalar_t, V> x;
  };
  static constexpr bool kReduce = kStats;
  const scalar_t* x;
  scalar_t* y;

  template <int V, int W>
  __device__ __forceinline__ In<V> load(int64_t i) const {
    return {load_pack<V, W>(x + i)};
  }

  template <int V, int P, int W>
  __device__ __forceinline__ void apply(int64_t i, const In<V>& in, const Lanes<acc_t, P>& p,
                                        acc_t (&a0)[V], acc_t (&a1)[V]) const {
    Pack<scalar_t, V> yv;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const int k = P == 1 ? 0 : v;
      const acc_t h = (static_cast<acc_t>(in.x.v[v]) - p.m[k]) * p.r[k];
      if constexpr (kStats) {
        a0[v] += h;
        a1[v] += h * h;
      }
      yv.v[v] = static_cast<scalar_t>(h * p.w[k] + p.b[k]);
    }
    store_pack<V, W>(y + i, yv);
  }
};

// Backward at offset i: dx = g * w * r; a0 += g * xhat (dweight, reads x), a1 += g (dbias).
template <typename scalar_t, bool kDx, bool kDw, bool kDb>
struct BackwardOp {
  using scalar_type = scalar_t;
  using acc_t = at::opmath_type<scalar_t>;
  template <int V>
  struct In {
    Pack<scalar_t, V> g, x;
  };
  static constexpr bool kReduce = kDw || kDb;
  const scalar_t* grad_y;
  const scalar_t* x;  // null unless kDw
  scalar_t* dx;       // null unless kDx

  template <int V, int W>
  __device__ __forceinline__ In<V> load(int64_t i) const {
    In<V> in;
    in.g = load_pack<V, W>(grad_y + i);
    if constexpr (kDw) in.x = load_pack<V, W>(x + i);
    return in;
  }

  template <int V, int P, int W>
  __device__ __forceinline__ void apply(int64_t i, const In<V>& in, const Lanes<acc_t, P>& p,
                                        acc_t (&a0)[V], acc_t (&a1)[V]) const {
    Pack<scalar_t, V> dxv;
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const int k = P == 1 ? 0 : v;
      const acc_t g = static_cast<acc_t>(in.g.v[v]);
      if constexpr (kDx) dxv.v[v] = static_cast<scalar_t>(g * (p.w[k] * p.r[k]));
      if constexpr (kDw) a0[v] += g * ((static_cast<acc_t>(in.x.v[v]) - p.m[k]) * p.r[k]);
      if constexpr (kDb) a1[v] += g;
    }
    if constexpr (kDx) store_pack<V, W>(dx + i, dxv);
  }
};

// Runs op at offsets first + k * stride for k in [0, count), kUnroll loads in flight at a time.
template <int V, int P, int W, typename Op>
__device__ __forceinline__ void run_strided(const Op& op, int64_t first, int64_t stride, int64_t count,
                                            const Lanes<typename Op::acc_t, P>& p,
                                            typename Op::acc_t (&a0)[V], typename Op::acc_t (&a1)[V]) {
  int64_t k = 0;
  for (; k + kUnroll <= count; k += kUnroll) {
    typename Op::template In<V> in[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) in[u] = op.template load<V, W>(first + (k + u) * stride);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) op.template apply<V, P, W>(first + (k + u) * stride, in[u], p, a0, a1);
  }
  for (; k < count; ++k) {
    const auto in = op.template load<V, W>(first + k * stride);
    op.template apply<V, P, W>(first + k * stride, in, p, a0, a1);
  }
}

// Runs op over the vectors of a channels-first tile: `planes` planes (stride plane_stride) of `len`
// vectors each, from offset base. The tile's (plane, vector) items are numbered plane-major and
// thread t takes items t, t + kThreads, ...: kUnroll independent loads in flight per thread even
// when a plane segment holds fewer than kUnroll * kThreads vectors (walking one plane at a time left
// one or two loads in flight: 40% of the DRAM bandwidth on (256, 64, 56, 56) bf16, by ncu).
template <int V, int W, typename Op>
__device__ __forceinline__ void run_planes(const Op& op, int64_t base, int64_t plane_stride, int len,
                                           int64_t planes, const Lanes<typename Op::acc_t, 1>& p,
                                           typename Op::acc_t (&a0)[V], typename Op::acc_t (&a1)[V]) {
  const int64_t count = planes * len;
  // The item after (n, j) for this thread is kThreads items on: step_n planes and step_j vectors.
  const int step_n = kThreads / len, step_j = kThreads % len;
  int64_t n = threadIdx.x / len;
  int j = threadIdx.x % len;
  const auto offset_and_advance = [&]() {
    const int64_t offset = base + n * plane_stride + int64_t(j) * V;
    n += step_n;
    j += step_j;
    if (j >= len) {
      j -= len;
      ++n;
    }
    return offset;
  };
  int64_t k = threadIdx.x;
  for (; k + (kUnroll - 1) * kThreads < count; k += kUnroll * kThreads) {
    int64_t offsets[kUnroll];
    typename Op::template In<V> in[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) offsets[u] = offset_and_advance();
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) in[u] = op.template load<V, W>(offsets[u]);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) op.template apply<V, 1, W>(offsets[u], in[u], p, a0, a1);
  }
  for (; k < count; k += kThreads) {
    const int64_t offset = offset_and_advance();
    const auto in = op.template load<V, W>(offset);
    op.template apply<V, 1, W>(offset, in, p, a0, a1);
  }
}

// Channels-first tile `blockIdx.x` = (nb, c, sb): samples [nb * n_block, +n_block), plane segment
// [sb * s_block, +s_block) of channel c. Its sums go to slot blockIdx.x of part0/part1, laid out
// (num_nb, C, num_sb). S and s_block are multiples of V. The misaligned variants (W < V) ask for a
// minimum of 1 block per SM: under the bound on threads alone ptxas gave the fp32 dx+dbias variant
// of 8-byte accesses 40 registers and a stack spill; the aligned variants keep the register counts
// measured on the H200 (a minimum of 0 is no minimum: nvcc emits no .minnctapersm).
template <typename Op, int V, int W>
__global__ void __launch_bounds__(kThreads, W == V ? 0 : 1)
    channels_first_kernel(const Op op, const Params<typename Op::acc_t> params, int64_t N, int64_t C, int64_t S,
                          int64_t n_block, int64_t s_block, int64_t num_sb,
                          typename Op::acc_t* part0, typename Op::acc_t* part1, unsigned int* counter) {
  using acc_t = typename Op::acc_t;
  if (counter != nullptr && blockIdx.x == 0 && threadIdx.x == 0) *counter = 0;  // for the second stage
  const int64_t tile = blockIdx.x;
  const int64_t sb = tile % num_sb;
  const int64_t c = (tile / num_sb) % C;
  const int64_t n0 = tile / (num_sb * C) * n_block;
  const int64_t n1 = std::min(N, n0 + n_block);
  const int64_t s0 = sb * s_block;
  const int len = static_cast<int>((std::min(S, s0 + s_block) - s0) / V);  // vectors per segment

  const Lanes<acc_t, 1> p(params, c);
  acc_t a0[V], a1[V];
#pragma unroll
  for (int v = 0; v < V; ++v) a0[v] = a1[v] = acc_t(0);
  run_planes<V, W>(op, (n0 * C + c) * S + s0, C * S, len, n1 - n0, p, a0, a1);
  if constexpr (!Op::kReduce) return;
  acc_t t0 = 0, t1 = 0;
#pragma unroll
  for (int v = 0; v < V; ++v) {
    t0 += a0[v];
    t1 += a1[v];
  }
  __shared__ acc_t scratch[kThreads / 32];
  t0 = block_sum<kThreads>(t0, scratch);
  t1 = block_sum<kThreads>(t1, scratch);
  if (threadIdx.x == 0) {
    part0[tile] = t0;
    part1[tile] = t1;
  }
}

// Channels-last tile (blockIdx.x, blockIdx.y) = rows [rb * r_block, +r_block) x channels
// [cb * c_block, +c_block). Its sums go to row rb of part0/part1, laid out (num_rb, C). C and
// c_block are multiples of V, and c_block <= kWarp * V <= kThreads * V.
// (The launch bound's minimum of 1 block per SM is a floor, not a target: with it ptxas kept every
// variant's register count and no longer spilled a 64-bit index to the stack in three misaligned
// dbias-only variants, which it did under the bound on threads alone; measured when misaligned
// variants moved one element per access, before the access-width fallback.)
template <typename Op, int V, int W>
__global__ void __launch_bounds__(kThreads, 1)
    channels_last_kernel(const Op op, const Params<typename Op::acc_t> params, int64_t M, int64_t C,
                         int64_t r_block, int64_t c_block, typename Op::acc_t* part0,
                         typename Op::acc_t* part1, unsigned int* counter) {
  using acc_t = typename Op::acc_t;
  if (counter != nullptr && blockIdx.x == 0 && blockIdx.y == 0 && threadIdx.x == 0) *counter = 0;
  const int64_t rb = blockIdx.x;
  const int64_t r0 = rb * r_block, r1 = std::min(M, r0 + r_block);
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * c_block;
  const int c_len = static_cast<int>(std::min(C - c0, c_block));
  const int cols = c_len / V;
  const int rows = kThreads / cols;  // rows the block covers at once
  const int row = threadIdx.x / cols, col = threadIdx.x % cols;
  const bool active = row < rows;
  const int64_t c = c0 + int64_t(col) * V;

  acc_t a0[V], a1[V];
#pragma unroll
  for (int v = 0; v < V; ++v) a0[v] = a1[v] = acc_t(0);
  if (active && r0 + row < r1) {
    const Lanes<acc_t, V> p(params, c);
    run_strided<V, V, W>(op, (r0 + row) * C + c, int64_t(rows) * C, (r1 - r0 - row + rows - 1) / rows, p, a0, a1);
  }
  if constexpr (!Op::kReduce) return;
  // Sum the rows' accumulators per channel in row order, through shared memory.
  extern __shared__ __align__(16) unsigned char shared_raw[];
  acc_t* sh0 = reinterpret_cast<acc_t*>(shared_raw);  // (rows, c_len)
  acc_t* sh1 = sh0 + rows * c_len;
  if (active) {
    // Slot (row, col * V + v) = threadIdx.x * V + v, since threadIdx.x = row * cols + col: written from
    // threadIdx.x, rather than keeping row and col live across the loop (ptxas spilled that index).
#pragma unroll
    for (int v = 0; v < V; ++v) {
      sh0[threadIdx.x * V + v] = a0[v];
      sh1[threadIdx.x * V + v] = a1[v];
    }
  }
  __syncthreads();
  for (int j = threadIdx.x; j < c_len; j += kThreads) {
    // kFoldRows rows at a time summed afresh (up to 256 rows when C <= V): a chain of
    // kFoldRows + rows / kFoldRows adds, not rows.
    acc_t t0 = 0, t1 = 0;
    for (int k0 = 0; k0 < rows; k0 += kFoldRows) {
      acc_t f0 = 0, f1 = 0;
      for (int k = k0; k < std::min(rows, k0 + kFoldRows); ++k) {
        f0 += sh0[k * c_len + j];
        f1 += sh1[k * c_len + j];
      }
      t0 += f0;
      t1 += f1;
    }
    part0[rb * C + c0 + j] = t0;
    part1[rb * C + c0 + j] = t1;
  }
}

// Per-channel totals of partials laid out (num_outer, C, num_inner), in a fixed order: one warp per
// channel, kReduceWarps channels per block. Lane l sums partials l, l + 32, ... (kReduceLoads loads
// in flight, into as many accumulators taken in turn), then the warp adds its lanes' sums by a
// shuffle tree. A warp per channel rather than a block of 32 channels x 16 lanes: with few channels
// (C = 64: two blocks) each lane summed ~17 partials in dependent rounds of loads, and the second
// stage took 6-13 us against a 56-59 us forward on the H200 (ncu). out0 / out1 may be null
// (statistic not wanted).
constexpr int kReduceWarps = 8;
constexpr int kReduceLoads = 4;

template <typename acc_t>
__global__ void __launch_bounds__(kReduceWarps * 32)
    reduce_partials_kernel(const acc_t* __restrict__ part0, const acc_t* __restrict__ part1,
                           int64_t C, int64_t num_outer, int64_t num_inner, acc_t* out0,
                           acc_t* out1, const NllEpilogue<acc_t> epilogue) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kReduceWarps + warp;  // the same in a warp
  acc_t t0 = 0, t1 = 0;
  if (c < C) {
    // Partial k of channel c sits at (k / num_inner * C + c) * num_inner + k % num_inner.
    int64_t o = lane / num_inner, i = lane % num_inner;
    const int64_t step_o = 32 / num_inner, step_i = 32 % num_inner;
    const auto next_index = [&]() -> int64_t {  // this lane's next partial, then advance; -1 past the end
      if (o >= num_outer) return -1;
      const int64_t index = (o * C + c) * num_inner + i;
      o += step_o;
      i += step_i;
      if (i >= num_inner) {
        i -= num_inner;
        ++o;
      }
      return index;
    };
    // kReduceLoads partials per statistic loaded before any is added, into as many accumulators
    // (one dependent load after another left a lane's loop latency-bound), summed in a fixed order.
    acc_t u0[kReduceLoads] = {}, u1[kReduceLoads] = {};
    for (bool more = true; more;) {
      int64_t index[kReduceLoads];
#pragma unroll
      for (int u = 0; u < kReduceLoads; ++u) index[u] = next_index();
#pragma unroll
      for (int u = 0; u < kReduceLoads; ++u) {
        if (index[u] < 0) continue;
        if (out0 != nullptr) u0[u] += part0[index[u]];
        if (out1 != nullptr) u1[u] += part1[index[u]];
      }
      more = index[kReduceLoads - 1] >= 0;
    }
#pragma unroll
    for (int u = 0; u < kReduceLoads; ++u) {
      t0 += u0[u];
      t1 += u1[u];
    }
    // Every lane of the warp is here (c is the warp's): the shuffles' full mask holds.
    t0 = warp_sum(t0);
    t1 = warp_sum(t1);
  }
  acc_t log_sigma = 0;
  if (c < C && lane == 0) {
    if (out0 != nullptr) out0[c] = t0;
    if (out1 != nullptr) out1[c] = t1;
    if (epilogue.std_param != nullptr) {
      const nll::Sigma<acc_t> sigma(epilogue.std_param[c], epilogue.kind, epilogue.eps);
      if (epilogue.rstd != nullptr) epilogue.rstd[c] = sigma.r;
      log_sigma = sigma.log_sigma;
      if (epilogue.dmean != nullptr) {
        const nll::NllGrads<acc_t> grads(sigma, *epilogue.grad_nll / static_cast<acc_t>(C), epilogue.s1[c],
                                         epilogue.s2[c], epilogue.count);
        epilogue.dmean[c] = grads.dmean;
        epilogue.dparam[c] = grads.dparam;
      }
    }
  }
  if (epilogue.nll == nullptr) return;  // the same in every thread
  // The block's terms, added by thread 0 in channel order.
  __shared__ acc_t terms[2][kReduceWarps];
  __shared__ bool last_block;
  if (lane == 0) {
    terms[0][warp] = log_sigma;
    terms[1][warp] = c < C ? t1 : acc_t(0);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    log_sigma = 0;
    t1 = 0;
    for (int w = 0; w < kReduceWarps; ++w) {
      log_sigma += terms[0][w];
      t1 += terms[1][w];
    }
    epilogue.block_sums[2 * blockIdx.x] = log_sigma;
    epilogue.block_sums[2 * blockIdx.x + 1] = t1;
    __threadfence();  // the sums are visible before the counter says so
    last_block = atomicAdd(epilogue.counter, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last_block) return;  // the same in every thread of the block
  // The last block adds the blocks' sums: thread t takes blocks t, t + 256, ..., then a fixed tree
  // (block_sum). One thread adding them one after another cost ~30 ns a block on the H200 (the NLL
  // epilogue took 1.8 us at C = 64, 4.6-6 us at C = 1024: bench/results/nvidia-h200/stages).
  __threadfence();
  const volatile acc_t* block_sums = epilogue.block_sums;  // written by other blocks: not from cache
  acc_t log_total = 0, data_total = 0;
  for (unsigned b = threadIdx.x; b < gridDim.x; b += kReduceWarps * 32) {
    log_total += block_sums[2 * b];
    data_total += block_sums[2 * b + 1];
  }
  __shared__ acc_t scratch[kReduceWarps];
  log_total = block_sum<kReduceWarps * 32>(log_total, scratch);
  data_total = block_sum<kReduceWarps * 32>(data_total, scratch);
  if (threadIdx.x != 0) return;
  const acc_t channels = static_cast<acc_t>(C);
  const acc_t data = data_total / (acc_t(2) * epilogue.count * channels);
  // With the gauge, the mean log sigma cancels in value (it stays in the gradient), as
  // mean_log - sg(mean_log): NaN, as in the reference, where a sigma is not finite.
  const acc_t mean_log = log_total / channels;
  *epilogue.nll = epilogue.gauge ? data - acc_t(0.5) + (mean_log - mean_log) : mean_log + data;
}

// The widest V (elements per access, up to 16 bytes) that divides the inner extent. It depends on
// the shape only, so that the sums (grouped by V) have the same bits whatever the alignment.
int vector_width(int64_t inner, int64_t elem_size) {
  int v = static_cast<int>(16 / elem_size);
  while (v > 1 && inner % v != 0) v /= 2;
  return v;
}

// The widest access, in elements (a power of two up to v), to which every pointer is aligned: a
// tensor whose storage offset breaks the 16-byte alignment still moves 8, 4 or 2 bytes at a time.
// (The tensors' strides are multiples of v, so every access of a thread keeps that alignment.)
int access_width(int v, int64_t elem_size, std::initializer_list<const void*> pointers) {
  for (const void* p : pointers) {
    while (v > 1 && reinterpret_cast<std::uintptr_t>(p) % (v * elem_size) != 0) v /= 2;
  }
  return v;
}

template <int kMaxV, typename F>
void dispatch_width(int v, const F& f) {
  switch (v) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: if constexpr (kMaxV >= 2) return f(std::integral_constant<int, 2>{}); break;
    case 4: if constexpr (kMaxV >= 4) return f(std::integral_constant<int, 4>{}); break;
    case 8: if constexpr (kMaxV >= 8) return f(std::integral_constant<int, 8>{}); break;
  }
  TORCH_CHECK(false, "batchless_norm (cuda): unsupported vector width ", v);
}

// Blocks of this kernel resident on the whole current GPU at once (multiprocessors x occupancy).
// Cached: the occupancy query costs microseconds, which small inputs would feel on every call.
int64_t resident_blocks(const void* kernel, size_t shared_bytes) {
  using Key = std::tuple<const void*, size_t, int>;
  static std::mutex mutex;
  static std::map<Key, int64_t> cache;
  const int device = c10::cuda::current_device();
  const Key key{kernel, shared_bytes, device};
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it == cache.end()) {
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, shared_bytes));
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    it = cache.emplace(key, int64_t(std::max(per_sm, 1)) * sms).first;
  }
  return it->second;
}

// Runs op over the geometry; when op reduces, its two sums per channel go to out0 / out1 (either
// may be null). `pointers` are the tensors op reads and writes, for the vector width. With an NLL
// epilogue (the training op; its rstd, nll and std_param set), the second stage always runs and also
// computes r and the NLL.
template <typename Op>
void launch(const Geometry& g, const Op& op, const Params<typename Op::acc_t>& params,
            typename Op::acc_t* out0, typename Op::acc_t* out1,
            std::initializer_list<const void*> pointers, cuda_norm::ScratchAllocator* scratch,
            NllEpilogue<typename Op::acc_t> epilogue = {}) {
  using acc_t = typename Op::acc_t;
  using scalar_t = typename Op::scalar_type;
  constexpr bool reduce = Op::kReduce;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  acc_t* partials = nullptr;
  int64_t num_outer = 0, num_inner = 0, num_slots = 0;
  const bool with_nll = epilogue.nll != nullptr;  // the forward's NLL: block sums and counter
  const bool second_stage = reduce && epilogue.std_param != nullptr;  // runs even with one slot per channel
  const auto reduce_blocks = static_cast<unsigned>(ceil_div(g.C, kReduceWarps));
  unsigned int* counter = nullptr;
  // Where the tiles write their sums: (2, count) partial slots, or straight into out0 / out1 when
  // there is one slot per channel and both are wanted (small inputs: no second kernel).
  bool direct = false;
  const auto slots = [&](int64_t count) -> std::pair<acc_t*, acc_t*> {
    if (!reduce) return {nullptr, nullptr};
    if (count == g.C && out0 != nullptr && out1 != nullptr && !second_stage) {
      direct = true;
      return {out0, out1};
    }
    // The NLL epilogue's block sums and counter after the slots, in the same allocation.
    num_slots = count;
    TORCH_CHECK(scratch != nullptr, "batchless_norm (cuda): the launcher has no scratch memory for its partial sums");
    partials = static_cast<acc_t*>(scratch->allocate(2 * count + (with_nll ? 2 * int64_t(reduce_blocks) + 1 : 0)));
    acc_t* base = partials;
    if (with_nll) {
      epilogue.block_sums = base + 2 * count;
      counter = reinterpret_cast<unsigned int*>(epilogue.block_sums + 2 * reduce_blocks);
      epilogue.counter = counter;
    }
    return {base, base + count};
  };

  if (g.layout == Layout::kChannelsFirst) {
    const int v = vector_width(g.S, sizeof(scalar_t));
    dispatch_width<16 / sizeof(scalar_t)>(v, [&](auto width) {
      constexpr int V = decltype(width)::value;
      dispatch_width<V>(access_width(V, sizeof(scalar_t), pointers), [&](auto access) {
        const auto kernel = channels_first_kernel<Op, V, decltype(access)::value>;
        // Tiles from the aligned variant's occupancy, so that alignment never changes the tiling.
        const auto sized_by = channels_first_kernel<Op, V, V>;
        const int64_t tiles_wanted = resident_blocks(reinterpret_cast<const void*>(sized_by), 0) * kWaves;
        const int64_t per_tile = std::min(std::max(kMinTileElements, ceil_div(g.N * g.C * g.S, tiles_wanted)),
                                          kMaxChain * kThreads * V);
        int64_t n_block = 1, s_block = g.S, num_sb = 1;
        if (g.S >= per_tile) {  // large planes: split each along S
          num_sb = ceil_div(g.S, per_tile);
          s_block = ceil_div(ceil_div(g.S, num_sb), V) * V;
          num_sb = ceil_div(g.S, s_block);
        } else {  // small planes: several samples of one channel per tile, in even blocks
          n_block = std::min(g.N, std::max<int64_t>(1, per_tile / g.S));
          n_block = ceil_div(g.N, ceil_div(g.N, n_block));
        }
        const int64_t num_nb = ceil_div(g.N, n_block);
        const int64_t tiles = num_nb * g.C * num_sb;
        TORCH_CHECK(tiles <= INT32_MAX, "batchless_norm (cuda): input too large (", tiles, " tiles)");
        const auto [p0, p1] = slots(tiles);
        kernel<<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(
            op, params, g.N, g.C, g.S, n_block, s_block, num_sb, p0, p1, counter);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        num_outer = num_nb;
        num_inner = num_sb;
      });
    });
  } else {
    const int64_t M = g.N * g.S;
    const int v = vector_width(g.C, sizeof(scalar_t));
    dispatch_width<16 / sizeof(scalar_t)>(v, [&](auto width) {
      constexpr int V = decltype(width)::value;
      dispatch_width<V>(access_width(V, sizeof(scalar_t), pointers), [&](auto access) {
        const auto kernel = channels_last_kernel<Op, V, decltype(access)::value>;
        const size_t shared = reduce ? 2 * size_t(kThreads) * V * sizeof(acc_t) : 0;
        const int64_t c_block = std::min<int64_t>(g.C, int64_t(kWarp) * V);
        const int64_t num_cb = ceil_div(g.C, c_block);
        TORCH_CHECK(num_cb <= 65535, "batchless_norm (cuda): too many channels (", g.C, ")");
        // About one wave of blocks, each walking at least a few rows per thread and at most
        // kMaxChain (huge inputs: more waves).
        const int64_t rows_per_pass = kThreads / (c_block / V);
        const auto sized_by = channels_last_kernel<Op, V, V>;  // as above: alignment-independent
        const int64_t wave = resident_blocks(reinterpret_cast<const void*>(sized_by), shared);
        const int64_t r_block = std::min(std::max(ceil_div(M, std::max<int64_t>(1, wave / num_cb)),
                                                  std::max<int64_t>(rows_per_pass, ceil_div(kMinTileElements, c_block))),
                                         rows_per_pass * kMaxChain);
        const int64_t num_rb = ceil_div(M, r_block);
        TORCH_CHECK(num_rb <= INT32_MAX, "batchless_norm (cuda): input too large (", num_rb, " row tiles)");
        const auto [p0, p1] = slots(num_rb * g.C);
        const dim3 grid(static_cast<unsigned>(num_rb), static_cast<unsigned>(num_cb));
        kernel<<<grid, kThreads, shared, stream>>>(op, params, M, g.C, r_block, c_block, p0, p1, counter);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        num_outer = num_rb;
        num_inner = 1;
      });
    });
  }
  if (reduce && !direct) {
    const acc_t* p0 = partials;
    reduce_partials_kernel<acc_t><<<reduce_blocks, kReduceWarps * 32, 0, stream>>>(
        p0, p0 + num_slots, g.C, num_outer, num_inner, out0, out1, epilogue);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename scalar_t>
void forward_kernels(const cuda_norm::ForwardArgs<scalar_t>& a) {
  dispatch_bool(a.s1 != nullptr, [&](auto stats) {
    using Op = ForwardOp<scalar_t, decltype(stats)::value>;
    launch(a.geometry, Op{a.x, a.y}, a.params, a.s1, a.s2, {a.x, a.y}, a.scratch, a.epilogue);
  });
}

template <typename scalar_t>
void backward_kernels(const cuda_norm::BackwardArgs<scalar_t>& a) {
  dispatch_bool(a.dx != nullptr, [&](auto kdx) {
    dispatch_bool(a.dweight != nullptr, [&](auto kdw) {
      dispatch_bool(a.dbias != nullptr, [&](auto kdb) {
        // decay_t: inside this function template, g++ sees the captured flags as references
        using Op = BackwardOp<scalar_t, std::decay_t<decltype(kdx)>::value, std::decay_t<decltype(kdw)>::value,
                              std::decay_t<decltype(kdb)>::value>;
        if constexpr (std::decay_t<decltype(kdx)>::value || Op::kReduce) {  // the plan returned early otherwise
          launch(a.geometry, Op{a.grad_y, a.x, a.dx}, a.params, a.dweight, a.dbias, {a.grad_y, a.x, a.dx},
                 a.scratch, a.epilogue);
        }
      });
    });
  });
}

}  // namespace
}  // namespace batchless_kernels

// run_forward and run_backward of dtype T (batchless_norm_cuda.cuh), in the translation unit that
// expands it.
#define BATCHLESS_NORM_CUDA_KERNELS(T)                                              \
  namespace batchless_kernels::cuda_norm {                                          \
  template <>                                                                       \
  void run_forward<T>(const ForwardArgs<T>& args) { forward_kernels(args); }        \
  template <>                                                                       \
  void run_backward<T>(const BackwardArgs<T>& args) { backward_kernels(args); }     \
  }
