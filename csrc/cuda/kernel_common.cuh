// What every sparsegrad kernel header needs, under nvcc or under the host emulation.
//
// The kernel headers (*.cuh) hold only indexing, loops and the per-thread work; the per-element
// math comes from lif_math.h (shared with the CPU kernels). They use no float atomics, and the few
// that cooperate (warp ballots in the compaction, the per-block spike counts of the forward) do so
// through barriers and warp collectives that csrc/cuda/emulation.h runs faithfully (fibers), so
// their results do not depend on the order in which threads run.
#pragma once

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>

#include "lif_math.h"

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#else
#include "cuda/emulation.h"
#endif

namespace sparsegrad {
namespace cuda {

// Grid-stride loop over [0, n) with 64-bit indices (T*B*N may exceed 2^31).
#define SG_KERNEL_LOOP(k, n)                                                         \
  for (int64_t k = int64_t(blockIdx.x) * int64_t(blockDim.x) + int64_t(threadIdx.x); \
       k < (n); k += int64_t(blockDim.x) * int64_t(gridDim.x))

// Full unrolling of a loop with a compile-time trip count, so that per-thread arrays indexed by
// its counter stay in registers (nvcc; the host compiler of the emulation does not need it).
#if defined(__CUDACC__)
#define SG_DEVICE_UNROLL _Pragma("unroll")
#else
#define SG_DEVICE_UNROLL
#endif

// Launch geometry of every kernel: 1-D, grid-stride, grid capped (the loop covers the rest).
constexpr int64_t kThreadsPerBlock = 256;
constexpr int64_t kMaxBlocks = 65535;

struct LaunchShape {
  int64_t blocks, threads;
};

inline LaunchShape launch_shape(int64_t n, int64_t threads = kThreadsPerBlock,
                                int64_t max_blocks = kMaxBlocks) {
  int64_t blocks = (n + threads - 1) / threads;
  if (blocks > max_blocks) blocks = max_blocks;
  if (blocks < 1) blocks = 1;
  return {blocks, threads};
}

// Kernels with warp collectives or block reductions need whole warps: the block size is rounded
// up to a multiple of 32 (at most 1024), so every warp has 32 lanes and full-mask collectives are
// defined. The extra threads of the last block simply find no work in the grid-stride loop.
constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

inline LaunchShape warp_launch_shape(int64_t n, int64_t threads = kThreadsPerBlock,
                                     int64_t max_blocks = kMaxBlocks) {
  threads = std::min<int64_t>(1024, (std::max<int64_t>(threads, 1) + kWarp - 1) / kWarp * kWarp);
  return launch_shape(n, threads, max_blocks);
}

// The forward walks (one thread per (b, j), T dependent steps) have few threads at small layers
// (12,800 at the SHD layer: 50 blocks of 256 on a 132-SM H100). Smaller blocks spread them over
// more SMs: the largest of 256 / 128 / 64 threads that still gives >= 2 blocks per SM.
inline LaunchShape walk_launch_shape(int64_t n, int64_t sm_count, int64_t max_blocks = kMaxBlocks) {
  int64_t threads = kThreadsPerBlock;
  while (threads > 2 * kWarp && (n + threads - 1) / threads < 2 * sm_count) threads /= 2;
  return launch_shape(n, threads, max_blocks);
}

// A walk (one thread per (b, j), T dependent steps) with fewer threads than the GPU holds at once
// cannot hide the latency of the event path's loads (row pointer -> event index -> weight row each
// step): the host then computes every step's current first with T*B*N threads
// (event_current_kernel) and the walk reads them as a dense current. Only where the buffer is
// free (it is the sparse forward's V buffer) or small: at large layers the walk has threads enough.
constexpr int64_t kSplitCurrentMaxBytes = int64_t(256) << 20;

inline bool split_event_current(int64_t walkers, int64_t resident_threads, int64_t buffer_bytes,
                                bool buffer_free) {
  return walkers < resident_threads && (buffer_free || buffer_bytes <= kSplitCurrentMaxBytes);
}

// Grid-stride loop over warps: all 32 lanes of a warp see the same w and leave the loop together
// (launch with warp_launch_shape), so collectives inside it have every lane of the full mask.
#define SG_WARP_LOOP(w, n)                                                                        \
  for (int64_t w = (int64_t(blockIdx.x) * int64_t(blockDim.x) + int64_t(threadIdx.x)) / kWarp; \
       w < (n); w += int64_t(blockDim.x) / kWarp * int64_t(gridDim.x))

__device__ __forceinline__ int lane_id() { return int(threadIdx.x) & (kWarp - 1); }
__device__ __forceinline__ int warp_in_block() { return int(threadIdx.x) / kWarp; }
__device__ __forceinline__ int thread_in_block() { return int(threadIdx.x); }
__device__ __forceinline__ int64_t block_index() { return int64_t(blockIdx.x); }
// Bits of the lanes below this one: a lane's rank among the set bits of a ballot.
__device__ __forceinline__ unsigned lanes_below() { return (1u << lane_id()) - 1u; }

// Per-block shared memory: a real __shared__ array under nvcc; in the emulation one array per block
// in flight, filled with 0xFF bytes (NaN for floats) so that a read before its write shows.
#if defined(__CUDACC__)
#define SG_SHARED(type, name, count) __shared__ type name[count]
#else
#define SG_SHARED(type, name, count)                                   \
  static ::sparsegrad::emulation::detail::SharedSlot name##_slot_; \
  type* const name = name##_slot_.get<type>(count)
#endif

// Sum of one int64 per thread over the block (every thread of the block must call it; whole
// warps, blockDim.x <= 1024): a shuffle tree in each warp, the warp sums through shared memory,
// then a shuffle tree in warp 0. Integer sums, so the result is exact whatever the order.
__device__ __forceinline__ int64_t block_sum(int64_t v) {
  SG_SHARED(int64_t, warp_sums, 32);
  for (int d = kWarp / 2; d > 0; d /= 2) v += __shfl_down_sync(kFullMask, v, d);
  if (lane_id() == 0) warp_sums[warp_in_block()] = v;
  __syncthreads();
  const int n_warps = int(blockDim.x) / kWarp;
  if (warp_in_block() == 0) {
    v = lane_id() < n_warps ? warp_sums[lane_id()] : int64_t(0);
    for (int d = kWarp / 2; d > 0; d /= 2) v += __shfl_down_sync(kFullMask, v, d);
  }
  __syncthreads();  // warp_sums may be reused by a later call
  return v;         // the block's sum in thread 0
}

// Integer counters only (spike counts): their sums do not depend on the order of the additions.
// No kernel accumulates floats through atomics: every float output has one writer (backward.cuh).
__device__ __forceinline__ void atomic_add_count(int64_t* address, int64_t value) {
  atomicAdd(reinterpret_cast<unsigned long long*>(address), static_cast<unsigned long long>(value));
}

// First position e in [lo, hi) with idx[e] >= value (idx ascending), hi if none.
__device__ __forceinline__ int64_t lower_bound(const int32_t* idx, int64_t lo, int64_t hi,
                                               int64_t value) {
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (int64_t(idx[mid]) < value) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// Bit j of a row of packed int32 words (rst_bits).
__device__ __forceinline__ bool bit_set(const int32_t* words, int64_t j) {
  return (static_cast<uint32_t>(words[j >> 5]) >> (j & 31)) & 1u;
}

// A CSR over rows r = b*T + t (the layout of input events and of active sets).
template <typename scalar_t>
struct CsrView {
  const int64_t* ptr = nullptr;
  const int32_t* idx = nullptr;
  const scalar_t* val = nullptr;  // null: every value is 1 (binary input)
  __device__ __forceinline__ scalar_t value(int64_t e) const { return val ? val[e] : scalar_t(1); }
};

}  // namespace cuda
}  // namespace sparsegrad
