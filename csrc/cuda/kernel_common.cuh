// What every sparsegrad kernel header needs, under nvcc or under the host emulation.
//
// The kernel headers (*.cuh) hold only indexing, loops and the per-thread work; the per-element
// math comes from lif_math.h (shared with the CPU kernels). They use no __syncthreads, no shared
// memory, no warp primitives and no float atomics, so csrc/cuda/emulation.h can run them on the
// CPU unchanged and their results do not depend on the order in which threads run.
#pragma once

#include <ATen/OpMathType.h>

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
