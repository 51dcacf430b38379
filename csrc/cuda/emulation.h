// Host emulation of the part of the CUDA execution model that sparsegrad's kernels use, so that the
// very same kernel source (csrc/cuda/*.cuh) compiles with g++ and runs on the CPU in the tests
// (csrc/emul/, tests/test_cuda_emul.py, tests/test_emulation_collectives.py).
//
// What is emulated:
//   - the built-in index variables (threadIdx, blockIdx, blockDim, gridDim, warpSize), the
//     function qualifiers, atomicAdd / atomicOr, __popc / __popcll / __ffs / __clz;
//   - per-block shared memory (SG_SHARED in kernel_common.cuh; filled with 0xFF bytes, a NaN for
//     floats, at the start of every block so that a read before the write shows);
//   - __syncthreads (and its _count / _and / _or forms), __syncwarp and the warp collectives
//     __ballot_sync, __any_sync, __all_sync, __shfl_sync, __shfl_up_sync, __shfl_down_sync,
//     __shfl_xor_sync.
//
// How: blocks run one after another (in the configured order); inside a block every thread is a
// fiber (ucontext) with its own stack. Each fiber runs until it reaches a barrier or a collective
// (or returns) and then yields; a "round" resumes every runnable thread once, in the configured
// order (forward, reverse, or a fresh seeded shuffle each round). After a round, every warp
// collective whose participating lanes (its mask) have all arrived completes, with the values the
// lanes passed; if none can, the block barrier completes once every thread of the block waits at
// it. So memory written before a barrier is visible after it, and memory read without one sees
// whichever order the round took: a kernel missing a barrier gives different results in different
// orders (tests/test_emulation_collectives.py shows it). Undefined behaviour is reported as an
// error instead of guessed at: a mask naming a lane that does not exist, lanes of one mask
// arriving at different collectives or with different masks, a lane that exits while the others
// of its mask wait, a shuffle from a lane outside the mask, a block barrier that some thread never
// reaches (it exited, or waits at a warp collective whose other lanes never come).
//
// Everything is deterministic: the same configuration runs the same interleaving.
#pragma once

#ifdef __CUDACC__
#error "csrc/cuda/emulation.h is for host compilers only; nvcc uses the real CUDA runtime"
#endif

#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define SG_EMUL_ASAN 1
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Plain __shared__ variables become one static per kernel instantiation: correct because blocks
// run one at a time, but not reset between blocks; SG_SHARED (kernel_common.cuh) is poisoned.
#define __shared__ static

struct uint3 {
  unsigned int x = 0, y = 0, z = 0;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The built-in variables, per host thread (the scheduler sets them before resuming each fiber).
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

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

inline void __threadfence() {}

// Bit intrinsics, as the CUDA math API defines them.
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }

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
  int walk_mode = 0;       // forward walks: 0 as an H100 decides, 1 fused event current, 2 split
  int64_t launches = 0;    // counter of launches (tests check that kernels really ran)
  int64_t threads_run = 0;  // counter of emulated threads
  int64_t switches = 0;    // counter of barrier / collective arrivals (tests check they happen)
};

inline Config& config() {
  static Config c;
  return c;
}

namespace detail {

constexpr unsigned kFullMask = 0xffffffffu;

enum class State { kReady, kBlockWait, kWarpWait, kDone };
enum class WarpOp { kSync, kBallot, kAny, kAll, kShfl, kShflUp, kShflDown, kShflXor };
enum class BlockOp { kSync, kCount, kAnd, kOr };

inline const char* warp_op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kSync: return "__syncwarp";
    case WarpOp::kBallot: return "__ballot_sync";
    case WarpOp::kAny: return "__any_sync";
    case WarpOp::kAll: return "__all_sync";
    case WarpOp::kShfl: return "__shfl_sync";
    case WarpOp::kShflUp: return "__shfl_up_sync";
    case WarpOp::kShflDown: return "__shfl_down_sync";
    default: return "__shfl_xor_sync";
  }
}

struct Fiber {
  ucontext_t ctx;
  State state = State::kReady;
  uint3 tid;
  // the pending barrier or collective
  BlockOp block_op = BlockOp::kSync;
  WarpOp warp_op = WarpOp::kSync;
  unsigned mask = 0;
  int arg = 0, width = 32;  // shuffle: source lane / delta / lane mask, segment width
  uint64_t value = 0;       // predicate or the shuffled value's bytes
  uint64_t result = 0;
#ifdef SG_EMUL_ASAN
  void* fake_stack = nullptr;
#endif
};

// One block in flight: its fibers, their stacks (reused across blocks and launches), the shared
// memory arena, and the scheduler's context.
struct Block {
  std::vector<Fiber> fibers;
  std::vector<std::unique_ptr<char[]>> stacks;
  std::vector<std::unique_ptr<unsigned char[]>> shared;  // freed at the end of the block
  ucontext_t scheduler;
  int current = -1;
  uint64_t serial = 0;  // increases with every block: SG_SHARED slots know when to reallocate
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  std::string error;
#ifdef SG_EMUL_ASAN
  void* fake_stack = nullptr;
  const void* main_bottom = nullptr;
  size_t main_size = 0;
#endif
};

#ifdef SG_EMUL_ASAN
constexpr size_t kStackBytes = size_t(1) << 20;  // ASan's redzones make frames larger
#else
constexpr size_t kStackBytes = size_t(256) << 10;  // pages are committed only where touched
#endif

inline Block& block() {
  static thread_local Block b;
  return b;
}

inline bool in_kernel() { return block().current >= 0; }

inline int linear_tid(const uint3& t) {
  return int(t.x + t.y * blockDim.x + t.z * blockDim.x * blockDim.y);
}

// Fiber -> scheduler.
inline void yield_to_scheduler() {
  Block& b = block();
  Fiber& f = b.fibers[size_t(b.current)];
#ifdef SG_EMUL_ASAN
  __sanitizer_start_switch_fiber(&f.fake_stack, b.main_bottom, b.main_size);
#endif
  swapcontext(&f.ctx, &b.scheduler);
#ifdef SG_EMUL_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
}

inline void fiber_entry() {
#ifdef SG_EMUL_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &block().main_bottom, &block().main_size);
#endif
  Block& b = block();
  try {  // an exception cannot cross the context switch: the scheduler rethrows its message
    b.body(b.body_arg);
  } catch (const std::exception& e) {
    b.error = e.what();
  } catch (...) {
    b.error = "unknown exception in an emulated thread";
  }
  b.fibers[size_t(b.current)].state = State::kDone;
  Fiber& f = b.fibers[size_t(b.current)];
#ifdef SG_EMUL_ASAN
  __sanitizer_start_switch_fiber(nullptr, b.main_bottom, b.main_size);  // this fiber ends
#endif
  swapcontext(&f.ctx, &b.scheduler);
}

// Scheduler -> fiber i.
inline void resume(int i) {
  Block& b = block();
  b.current = i;
  threadIdx = b.fibers[size_t(i)].tid;
#ifdef SG_EMUL_ASAN
  __sanitizer_start_switch_fiber(&b.fake_stack, b.stacks[size_t(i)].get(), kStackBytes);
#endif
  swapcontext(&b.scheduler, &b.fibers[size_t(i)].ctx);
#ifdef SG_EMUL_ASAN
  __sanitizer_finish_switch_fiber(b.fake_stack, nullptr, nullptr);
#endif
  b.current = -1;
}

inline std::string lane_list(unsigned bits) {
  std::string s;
  for (int l = 0; l < 32; ++l)
    if ((bits >> l) & 1u) s += (s.empty() ? "" : ",") + std::to_string(l);
  return s;
}

inline std::string hex(unsigned v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}

// The lanes of warp w that exist in this block (a last, partial warp has fewer).
inline unsigned existing_lanes(int w, int n_threads) {
  const int n = std::min(32, n_threads - 32 * w);
  return n >= 32 ? kFullMask : ((1u << n) - 1u);
}

// Completes every warp collective whose lanes have all arrived; returns whether any did, and sets
// b.error (and returns false) on undefined behaviour that can never resolve.
inline bool complete_warp_ops(Block& b, int n_threads) {
  bool any = false;
  const int n_warps = (n_threads + 31) / 32;
  for (int w = 0; w < n_warps; ++w) {
    Fiber* lane[32] = {};
    for (int l = 0; l < 32 && 32 * w + l < n_threads; ++l) lane[l] = &b.fibers[size_t(32 * w + l)];
    const unsigned exist = existing_lanes(w, n_threads);
    unsigned handled = 0;
    for (int l = 0; l < 32; ++l) {
      if (!lane[l] || lane[l]->state != State::kWarpWait || ((handled >> l) & 1u)) continue;
      const Fiber& f = *lane[l];
      const std::string where = std::string(warp_op_name(f.warp_op)) + "(" + hex(f.mask) + ") by lane " +
                                std::to_string(l) + " of warp " + std::to_string(w) + " in block (" +
                                std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
                                std::to_string(blockIdx.z) + ")";
      if (!((f.mask >> l) & 1u)) {
        b.error = where + ": the mask does not include the calling lane";
        return false;
      }
      if (f.mask & ~exist) {
        b.error = where + ": the mask names lanes that do not exist in this block (" +
                  lane_list(f.mask & ~exist) + "); blocks must be whole warps";
        return false;
      }
      bool complete = true;
      for (int m = 0; m < 32; ++m) {
        if (!((f.mask >> m) & 1u)) continue;
        const Fiber& g = *lane[m];
        if (g.state == State::kDone) {
          b.error = where + ": lane " + std::to_string(m) + " of the mask exited without joining";
          return false;
        }
        if (g.state != State::kWarpWait) {
          complete = false;  // still running, or at a block barrier (reported if nothing moves)
          continue;
        }
        if (g.warp_op != f.warp_op || g.mask != f.mask) {
          b.error = where + ": lane " + std::to_string(m) + " of the mask waits at " +
                    warp_op_name(g.warp_op) + "(" + hex(g.mask) + ") instead (divergent collectives)";
          return false;
        }
      }
      if (!complete) continue;
      handled |= f.mask;
      unsigned ballot = 0;
      for (int m = 0; m < 32; ++m)
        if (((f.mask >> m) & 1u) && lane[m]->value != 0) ballot |= 1u << m;
      for (int m = 0; m < 32; ++m) {
        if (!((f.mask >> m) & 1u)) continue;
        Fiber& g = *lane[m];
        switch (f.warp_op) {
          case WarpOp::kSync: g.result = 0; break;
          case WarpOp::kBallot: g.result = ballot; break;
          case WarpOp::kAny: g.result = ballot != 0; break;
          case WarpOp::kAll: g.result = ballot == f.mask; break;
          default: {
            const int width = g.width, base = m & ~(width - 1), in_seg = m - base;
            int src = m;
            if (f.warp_op == WarpOp::kShfl) src = base + (g.arg % width + width) % width;
            else if (f.warp_op == WarpOp::kShflUp) src = in_seg >= g.arg ? m - g.arg : m;
            else if (f.warp_op == WarpOp::kShflDown) src = in_seg + g.arg < width ? m + g.arg : m;
            else src = ((m ^ g.arg) < base + width) ? (m ^ g.arg) : m;
            if (src < 0 || src > 31 || !((f.mask >> src) & 1u)) {
              b.error = std::string(warp_op_name(f.warp_op)) + "(" + hex(f.mask) + ") in warp " +
                        std::to_string(w) + ": lane " + std::to_string(m) + " reads lane " +
                        std::to_string(src) + ", which is not in the mask";
              return false;
            }
            g.result = lane[src]->value;
          }
        }
      }
      for (int m = 0; m < 32; ++m)
        if ((f.mask >> m) & 1u) lane[m]->state = State::kReady;
      any = true;
    }
  }
  return any;
}

// Completes the block barrier if every thread waits at it; sets b.error if that can never happen.
inline bool complete_block_barrier(Block& b, int n_threads) {
  int waiting = 0, done = -1, at_warp = -1;
  for (int i = 0; i < n_threads; ++i) {
    const State s = b.fibers[size_t(i)].state;
    if (s == State::kBlockWait) ++waiting;
    else if (s == State::kDone && done < 0) done = i;
    else if (s == State::kWarpWait && at_warp < 0) at_warp = i;
  }
  if (waiting == 0) return false;
  const std::string where = "__syncthreads in block (" + std::to_string(blockIdx.x) + "," +
                            std::to_string(blockIdx.y) + "," + std::to_string(blockIdx.z) + ")";
  if (done >= 0) {
    b.error = where + ": thread " + std::to_string(done) + " exited without reaching it";
    return false;
  }
  if (at_warp >= 0) {
    b.error = where + ": thread " + std::to_string(at_warp) + " waits at " +
              warp_op_name(b.fibers[size_t(at_warp)].warp_op) +
              " whose other lanes wait at the block barrier (deadlock)";
    return false;
  }
  const BlockOp op = b.fibers[0].block_op;
  int64_t count = 0;
  for (int i = 0; i < n_threads; ++i) {
    if (b.fibers[size_t(i)].block_op != op) {
      b.error = where + ": threads 0 and " + std::to_string(i) + " wait at different barrier kinds";
      return false;
    }
    count += b.fibers[size_t(i)].value != 0;
  }
  for (int i = 0; i < n_threads; ++i) {
    Fiber& f = b.fibers[size_t(i)];
    switch (op) {
      case BlockOp::kSync: f.result = 0; break;
      case BlockOp::kCount: f.result = uint64_t(count); break;
      case BlockOp::kAnd: f.result = count == n_threads; break;
      case BlockOp::kOr: f.result = count != 0; break;
    }
    f.state = State::kReady;
  }
  return true;
}

// Runs every thread of the current block (blockIdx set) to completion.
inline void run_block(int n_threads, const dim3& block_dim, std::vector<int>& order, std::mt19937_64& rng,
                      Order mode) {
  Block& b = block();
  if (b.fibers.size() < size_t(n_threads)) b.fibers.resize(size_t(n_threads));
  while (b.stacks.size() < size_t(n_threads)) b.stacks.emplace_back(new char[kStackBytes]);
  ++b.serial;
  b.error.clear();
  for (int i = 0; i < n_threads; ++i) {
    Fiber& f = b.fibers[size_t(i)];
    f.state = State::kReady;
    f.tid.x = unsigned(i) % block_dim.x;
    f.tid.y = (unsigned(i) / block_dim.x) % block_dim.y;
    f.tid.z = unsigned(i) / (block_dim.x * block_dim.y);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = b.stacks[size_t(i)].get();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;  // fiber_entry switches back itself
    makecontext(&f.ctx, &fiber_entry, 0);
  }
  for (;;) {
    if (mode == Order::kShuffled) std::shuffle(order.begin(), order.end(), rng);
    for (int i : order) {
      if (b.fibers[size_t(i)].state != State::kReady) continue;
      resume(i);
      if (!b.error.empty()) {
        b.shared.clear();
        throw std::runtime_error("CUDA emulation: " + b.error);
      }
    }
    bool all_done = true;
    for (int i = 0; i < n_threads; ++i) all_done &= b.fibers[size_t(i)].state == State::kDone;
    if (all_done) break;
    if (complete_warp_ops(b, n_threads)) continue;
    if (b.error.empty() && complete_block_barrier(b, n_threads)) continue;
    if (b.error.empty()) b.error = "emulated block cannot make progress (a warp collective never completes)";
    b.shared.clear();
    throw std::runtime_error("CUDA emulation: " + b.error);
  }
  b.shared.clear();
}

// Called by a fiber at a barrier / collective: record what it waits for, yield, return the result.
inline uint64_t arrive_block(BlockOp op, int pred) {
  Block& b = block();
  if (!in_kernel()) throw std::logic_error("CUDA emulation: __syncthreads outside an emulated kernel");
  Fiber& f = b.fibers[size_t(b.current)];
  f.state = State::kBlockWait;
  f.block_op = op;
  f.value = pred != 0;
  ++config().switches;
  yield_to_scheduler();
  return b.fibers[size_t(b.current)].result;
}

inline uint64_t arrive_warp(WarpOp op, unsigned mask, uint64_t value, int arg = 0, int width = 32) {
  Block& b = block();
  if (!in_kernel()) throw std::logic_error("CUDA emulation: a warp collective outside an emulated kernel");
  Fiber& f = b.fibers[size_t(b.current)];
  f.state = State::kWarpWait;
  f.warp_op = op;
  f.mask = mask;
  f.value = value;
  f.arg = arg;
  f.width = width;
  ++config().switches;
  yield_to_scheduler();
  return b.fibers[size_t(b.current)].result;
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffled values are at most 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}

template <typename T>
T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

inline int checked_width(int width) {
  if (width < 1 || width > 32 || (width & (width - 1)))
    throw std::logic_error("CUDA emulation: a shuffle's width must be a power of two in [1, 32]");
  return width;
}

// The memory of one SG_SHARED array for the block in flight (0xFF-filled at its first use in the
// block; every thread of the block gets the same address).
struct SharedSlot {
  uint64_t serial = 0;
  void* ptr = nullptr;
  template <typename T>
  T* get(size_t count) {
    Block& b = block();
    if (serial != b.serial || !ptr) {
      b.shared.emplace_back(new unsigned char[count * sizeof(T) + alignof(std::max_align_t)]);
      unsigned char* raw = b.shared.back().get();
      std::memset(raw, 0xFF, count * sizeof(T) + alignof(std::max_align_t));
      ptr = raw;
      serial = b.serial;
    }
    return static_cast<T*>(ptr);
  }
};

template <typename F>
void call_body(void* p) {
  (*static_cast<F*>(p))();
}

}  // namespace detail

// Runs kernel(args...) for every (block, thread) of a 1-, 2- or 3-D launch (blocks one at a time,
// the threads of a block as fibers; see the top of this file).
template <typename... KArgs, typename... Args>
void launch(dim3 grid, dim3 block, void (*kernel)(KArgs...), Args&&... args) {
  Config& cfg = config();
  const uint64_t n_blocks = uint64_t(grid.x) * grid.y * grid.z;
  const uint64_t n_threads = uint64_t(block.x) * block.y * block.z;
  if (n_blocks == 0 || n_threads == 0) throw std::invalid_argument("emulated launch with an empty grid or block");
  if (n_threads > 1024) throw std::invalid_argument("emulated launch with more than 1024 threads per block");
  if (detail::in_kernel()) throw std::logic_error("emulated launch from inside a kernel");
  std::vector<uint64_t> block_order(n_blocks);
  std::iota(block_order.begin(), block_order.end(), uint64_t(0));
  std::vector<int> order(n_threads);
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 rng(cfg.seed + uint64_t(cfg.launches));
  if (cfg.order == Order::kReverse) {
    std::reverse(block_order.begin(), block_order.end());
    std::reverse(order.begin(), order.end());
  } else if (cfg.order == Order::kShuffled) {
    std::shuffle(block_order.begin(), block_order.end(), rng);
  }
  ++cfg.launches;
  gridDim = grid;
  blockDim = block;
  auto body = [&]() { kernel(static_cast<KArgs>(args)...); };
  detail::Block& b = detail::block();
  b.body = &detail::call_body<decltype(body)>;
  b.body_arg = &body;
  for (uint64_t bid : block_order) {
    blockIdx.x = unsigned(bid % grid.x);
    blockIdx.y = unsigned((bid / grid.x) % grid.y);
    blockIdx.z = unsigned(bid / (uint64_t(grid.x) * grid.y));
    detail::run_block(int(n_threads), block, order, rng, cfg.order);
  }
  b.body = nullptr;
  b.body_arg = nullptr;
  cfg.threads_run += int64_t(n_blocks * n_threads);
}

}  // namespace emulation
}  // namespace sparsegrad

// The CUDA barrier and warp-collective intrinsics, on the fibers above.
inline void __syncthreads() {
  sparsegrad::emulation::detail::arrive_block(sparsegrad::emulation::detail::BlockOp::kSync, 0);
}
inline int __syncthreads_count(int pred) {
  return int(sparsegrad::emulation::detail::arrive_block(sparsegrad::emulation::detail::BlockOp::kCount, pred));
}
inline int __syncthreads_and(int pred) {
  return int(sparsegrad::emulation::detail::arrive_block(sparsegrad::emulation::detail::BlockOp::kAnd, pred));
}
inline int __syncthreads_or(int pred) {
  return int(sparsegrad::emulation::detail::arrive_block(sparsegrad::emulation::detail::BlockOp::kOr, pred));
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  sparsegrad::emulation::detail::arrive_warp(sparsegrad::emulation::detail::WarpOp::kSync, mask, 0);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return unsigned(sparsegrad::emulation::detail::arrive_warp(sparsegrad::emulation::detail::WarpOp::kBallot,
                                                             mask, pred != 0));
}
inline int __any_sync(unsigned mask, int pred) {
  return int(sparsegrad::emulation::detail::arrive_warp(sparsegrad::emulation::detail::WarpOp::kAny, mask, pred != 0));
}
inline int __all_sync(unsigned mask, int pred) {
  return int(sparsegrad::emulation::detail::arrive_warp(sparsegrad::emulation::detail::WarpOp::kAll, mask, pred != 0));
}
template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  namespace d = sparsegrad::emulation::detail;
  return d::from_bits<T>(d::arrive_warp(d::WarpOp::kShfl, mask, d::to_bits(var), src_lane, d::checked_width(width)));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  namespace d = sparsegrad::emulation::detail;
  return d::from_bits<T>(d::arrive_warp(d::WarpOp::kShflUp, mask, d::to_bits(var), int(delta), d::checked_width(width)));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  namespace d = sparsegrad::emulation::detail;
  return d::from_bits<T>(d::arrive_warp(d::WarpOp::kShflDown, mask, d::to_bits(var), int(delta), d::checked_width(width)));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  namespace d = sparsegrad::emulation::detail;
  return d::from_bits<T>(d::arrive_warp(d::WarpOp::kShflXor, mask, d::to_bits(var), lane_mask, d::checked_width(width)));
}
