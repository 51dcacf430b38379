// Host emulation of the small part of the CUDA execution model that sparsegrad's kernels use, so
// that the very same kernel source (csrc/cuda/*.cuh) compiles with g++ and runs on the CPU in the
// tests (csrc/emul/, tests/test_cuda_emul.py).
//
// What is emulated: the built-in index variables (threadIdx, blockIdx, blockDim, gridDim), the
// function qualifiers, atomicAdd / atomicOr, and a launcher that runs every thread of every block
// to completion, one after the other, in a configurable order (forward, reverse or shuffled).
//
// What is deliberately NOT emulated: __syncthreads, __shared__ memory and warp primitives. The
// kernels are written without them (one thread owns one independent piece of work; cross-thread
// combination goes through atomics or through a separate device-wide step such as at::cumsum
// between two launches), which is exactly the class of kernel that sequential emulation executes
// faithfully. Running the threads in several orders checks that no kernel depends on thread order.
#pragma once

#ifdef __CUDACC__
#error "csrc/cuda/emulation.h is for host compilers only; nvcc uses the real CUDA runtime"
#endif

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <stdexcept>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct uint3 {
  unsigned int x = 0, y = 0, z = 0;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The built-in variables, per host thread (the launcher sets them before running each thread).
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

// Atomics: the emulated threads run one at a time, so a plain read-modify-write is atomic.
template <typename T>
inline T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

template <typename T>
inline T atomicOr(T* address, T value) {
  const T old = *address;
  *address = old | value;
  return old;
}

namespace sparsegrad {
namespace emulation {

enum class Order : int { kForward = 0, kReverse = 1, kShuffled = 2 };

// Launch settings of the emulation (set by the tests through sparsegrad_emul::set_launch_config).
// threads/max_blocks override the launch geometry chosen by the host code, so that tests can use
// tiny blocks and grids (grid-stride loops wrap, sizes are not multiples of the block size).
struct Config {
  Order order = Order::kForward;
  uint64_t seed = 0;
  int64_t threads = 0;     // threads per block; 0 = as the host code asks
  int64_t max_blocks = 0;  // cap on the grid; 0 = as the host code asks
  bool wide_tiles = false;  // kernels with a tiled variant: several neurons per thread
  int dw_route = 0;        // forced GPU routes of the backwards (host_ops.h, gpu_routes.h); 0: model
  int dx_route = 0;
  int64_t launches = 0;    // counter of launches (tests check that kernels really ran)
  int64_t threads_run = 0;  // counter of emulated threads
};

inline Config& config() {
  static Config c;
  return c;
}

// Runs kernel(args...) for every (block, thread) of a 1-, 2- or 3-D launch.
template <typename... KArgs, typename... Args>
void launch(dim3 grid, dim3 block, void (*kernel)(KArgs...), Args&&... args) {
  Config& cfg = config();
  const uint64_t n_blocks = uint64_t(grid.x) * grid.y * grid.z;
  const uint64_t n_threads = uint64_t(block.x) * block.y * block.z;
  if (n_blocks == 0 || n_threads == 0) throw std::invalid_argument("emulated launch with an empty grid or block");
  std::vector<uint64_t> order(n_blocks * n_threads);
  std::iota(order.begin(), order.end(), uint64_t(0));
  if (cfg.order == Order::kReverse) {
    std::reverse(order.begin(), order.end());
  } else if (cfg.order == Order::kShuffled) {
    std::mt19937_64 rng(cfg.seed + uint64_t(cfg.launches));
    std::shuffle(order.begin(), order.end(), rng);
  }
  ++cfg.launches;
  gridDim = grid;
  blockDim = block;
  for (uint64_t k : order) {
    const uint64_t bid = k / n_threads, tid = k % n_threads;
    blockIdx.x = unsigned(bid % grid.x);
    blockIdx.y = unsigned((bid / grid.x) % grid.y);
    blockIdx.z = unsigned(bid / (uint64_t(grid.x) * grid.y));
    threadIdx.x = unsigned(tid % block.x);
    threadIdx.y = unsigned((tid / block.x) % block.y);
    threadIdx.z = unsigned(tid / (uint64_t(block.x) * block.y));
    kernel(static_cast<KArgs>(args)...);
  }
  cfg.threads_run += int64_t(order.size());
}

}  // namespace emulation
}  // namespace sparsegrad
