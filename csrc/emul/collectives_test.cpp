// Test-only extension: small kernels that exercise the host emulation's barriers, shared memory and
// warp collectives (csrc/cuda/emulation.h), each with a variant that omits a barrier, so that
// tests/test_emulation_collectives.py can check that the emulation computes every collective as
// CUDA defines it, that correct kernels give the same result in every thread order, and that a
// missing __syncthreads / __syncwarp (or undefined behaviour such as divergent collectives) is
// caught. Built with torch.utils.cpp_extension.load; op: torch.ops.sparsegrad_emul_tests.run.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "cuda/kernel_common.cuh"

namespace sparsegrad {
namespace {

using namespace cuda;  // kFullMask, lane_id, SG_SHARED, block_sum

struct Args {
  const int64_t* in = nullptr;
  int64_t* out = nullptr;
  int64_t n = 0;        // elements of in / out (one per thread of the grid)
  int64_t param = 0;    // a kernel-specific parameter (shuffle delta, width, ...)
  bool barrier = true;  // false: the variant without the barrier
};

inline int64_t gtid() { return int64_t(blockIdx.x) * blockDim.x + threadIdx.x; }

// out[t] = in[blockDim - 1 - t] within the block, through shared memory.
__global__ void block_reverse(Args a) {
  SG_SHARED(int64_t, s, 1024);
  const int64_t g = gtid();
  s[threadIdx.x] = a.in[g];
  if (a.barrier) __syncthreads();
  a.out[g] = s[blockDim.x - 1 - threadIdx.x];
}

// out = the value of the next lane (mod 32) within the warp, through shared memory.
__global__ void warp_rotate(Args a) {
  SG_SHARED(int64_t, s, 1024);
  const int64_t g = gtid();
  const int w = int(threadIdx.x) / 32, l = int(threadIdx.x) % 32;
  s[threadIdx.x] = a.in[g];
  if (a.barrier) __syncwarp();
  a.out[g] = s[32 * w + (l + 1) % 32];
}

// A two-phase in-place update: every thread reads its neighbour's slot, then overwrites its own;
// the second barrier separates the read from the write (a write-after-read hazard).
__global__ void block_shift_in_place(Args a) {
  SG_SHARED(int64_t, s, 1024);
  const int64_t g = gtid();
  const unsigned t = threadIdx.x;
  s[t] = a.in[g];
  __syncthreads();
  const int64_t left = t > 0 ? s[t - 1] : 0;
  if (a.barrier) __syncthreads();
  s[t] = left;
  __syncthreads();
  a.out[g] = s[t];
}

__global__ void ballot(Args a) {  // out = the warp's ballot of (in != 0)
  a.out[gtid()] = int64_t(__ballot_sync(kFullMask, a.in[gtid()] != 0));
}
__global__ void any_all(Args a) {  // out = any + 2 * all
  const int p = a.in[gtid()] != 0;
  a.out[gtid()] = __any_sync(kFullMask, p) + 2 * __all_sync(kFullMask, p);
}
__global__ void shfl_idx(Args a) {  // out = in of lane (lane * 7 + param) within width 32
  a.out[gtid()] = __shfl_sync(kFullMask, a.in[gtid()], int(lane_id() * 7 + a.param));
}
__global__ void shfl_up(Args a) { a.out[gtid()] = __shfl_up_sync(kFullMask, a.in[gtid()], unsigned(a.param)); }
__global__ void shfl_down(Args a) { a.out[gtid()] = __shfl_down_sync(kFullMask, a.in[gtid()], unsigned(a.param)); }
__global__ void shfl_xor(Args a) { a.out[gtid()] = __shfl_xor_sync(kFullMask, a.in[gtid()], int(a.param)); }
__global__ void shfl_down_w8(Args a) { a.out[gtid()] = __shfl_down_sync(kFullMask, a.in[gtid()], unsigned(a.param), 8); }
__global__ void shfl_idx_w16(Args a) { a.out[gtid()] = __shfl_sync(kFullMask, a.in[gtid()], int(a.param), 16); }
__global__ void shfl_double(Args a) {  // a double through the shuffle: bits preserved
  const double v = double(a.in[gtid()]) * 0.5;
  a.out[gtid()] = int64_t(2.0 * __shfl_xor_sync(kFullMask, v, 1));
}
__global__ void sync_count(Args a) {  // out = count + 1000 * and + 2000 * or over the block
  const int p = a.in[gtid()] != 0;
  const int c = __syncthreads_count(p);
  const int x = __syncthreads_and(p);
  const int y = __syncthreads_or(p);
  a.out[gtid()] = c + 1000 * x + 2000 * y;
}
__global__ void bit_ops(Args a) {  // popc, ffs, clz of the 32-bit value, packed
  const unsigned v = unsigned(a.in[gtid()]);
  a.out[gtid()] = __popc(v) + 100 * __ffs(int(v)) + 10000 * __clz(int(v));
}
// Half a warp's lanes (the odd ones) ballot on a mask of their own; the even lanes shuffle.
__global__ void half_warp_masks(Args a) {
  const int l = lane_id();
  if (l & 1) a.out[gtid()] = __ballot_sync(0xaaaaaaaau, a.in[gtid()] != 0);
  else a.out[gtid()] = __shfl_xor_sync(0x55555555u, a.in[gtid()], 2);
}
// kernel_common.cuh's block reduction; thread 0 of each block writes the sum.
__global__ void block_sum_kernel(Args a) {
  const int64_t v = block_sum(a.in[gtid()]);
  a.out[gtid()] = thread_in_block() == 0 ? v : -7;
}
// A warp-reduction written with warp-synchronous shared memory (the pre-Volta idiom), with or
// without __syncwarp between the steps: lane 0 ends with the warp's sum.
__global__ void warp_tree_sum(Args a) {
  SG_SHARED(int64_t, s, 1024);
  const int w = int(threadIdx.x) / 32, l = int(threadIdx.x) % 32;
  int64_t* sw = s + 32 * w;
  sw[l] = a.in[gtid()];
  if (a.barrier) __syncwarp();
  for (int d = 16; d > 0; d /= 2) {
    int64_t v = sw[l];
    if (l < d) v += sw[l + d];
    if (a.barrier) __syncwarp();
    sw[l] = v;
    if (a.barrier) __syncwarp();
  }
  a.out[gtid()] = l == 0 ? sw[0] : 0;
}

// Undefined behaviour the emulation must report.
__global__ void divergent_collectives(Args a) {  // lanes 0..15 ballot, 16..31 any: same mask
  if (lane_id() < 16) a.out[gtid()] = __ballot_sync(kFullMask, 1);
  else a.out[gtid()] = __any_sync(kFullMask, 1);
}
__global__ void lane_exits(Args a) {  // lane 5 returns before the full-mask ballot
  if (lane_id() == 5) return;
  a.out[gtid()] = __ballot_sync(kFullMask, 1);
}
__global__ void barrier_skipped(Args a) {  // thread 0 never reaches __syncthreads
  if (threadIdx.x == 0) return;
  __syncthreads();
  a.out[gtid()] = 1;
}
__global__ void shfl_outside_mask(Args a) {  // the lower half reads from the upper half
  if (lane_id() < 16) a.out[gtid()] = __shfl_xor_sync(0x0000ffffu, a.in[gtid()], 16);
}
__global__ void full_mask_any(Args a) {  // a full mask in a block that is not whole warps
  a.out[gtid()] = __ballot_sync(kFullMask, 1);
}

using Kernel = void (*)(Args);

Kernel kernel_named(const std::string& name) {
  static const std::pair<const char*, Kernel> table[] = {
      {"block_reverse", &block_reverse}, {"warp_rotate", &warp_rotate},
      {"block_shift_in_place", &block_shift_in_place}, {"ballot", &ballot}, {"any_all", &any_all},
      {"shfl_idx", &shfl_idx}, {"shfl_up", &shfl_up}, {"shfl_down", &shfl_down}, {"shfl_xor", &shfl_xor},
      {"shfl_down_w8", &shfl_down_w8}, {"shfl_idx_w16", &shfl_idx_w16}, {"shfl_double", &shfl_double},
      {"sync_count", &sync_count}, {"bit_ops", &bit_ops}, {"half_warp_masks", &half_warp_masks},
      {"block_sum", &block_sum_kernel}, {"warp_tree_sum", &warp_tree_sum},
      {"divergent_collectives", &divergent_collectives}, {"lane_exits", &lane_exits},
      {"barrier_skipped", &barrier_skipped}, {"shfl_outside_mask", &shfl_outside_mask},
      {"full_mask_any", &full_mask_any}};
  for (const auto& e : table)
    if (name == e.first) return e.second;
  TORCH_CHECK(false, "sparsegrad_emul_tests.run: unknown kernel '", name, "'");
}

// Runs kernel `name` on `blocks` blocks of `threads` threads (one int64 of `input` per thread) in
// thread order `order` (0 forward, 1 reverse, 2 shuffled with `seed`); returns out (zero-filled
// before the launch) and the number of barrier / collective arrivals.
std::tuple<at::Tensor, int64_t> run(c10::string_view name, const at::Tensor& input, int64_t blocks,
                                    int64_t threads, int64_t order, int64_t seed, int64_t param,
                                    bool barrier) {
  TORCH_CHECK(input.scalar_type() == at::kLong && input.dim() == 1 && input.numel() == blocks * threads,
              "sparsegrad_emul_tests.run: 'input' must be a 1-D int64 tensor of blocks * threads elements");
  TORCH_CHECK(order >= 0 && order <= 2, "sparsegrad_emul_tests.run: 'order' must be 0, 1 or 2");
  const Kernel k = kernel_named(std::string(name));
  const at::Tensor in = input.contiguous();
  at::Tensor out = at::zeros_like(in);
  Args a;
  a.in = in.data_ptr<int64_t>();
  a.out = out.data_ptr<int64_t>();
  a.n = in.numel();
  a.param = param;
  a.barrier = barrier;
  emulation::Config& cfg = emulation::config();
  const emulation::Config saved = cfg;
  cfg.order = static_cast<emulation::Order>(order);
  cfg.seed = uint64_t(seed);
  cfg.launches = 0;  // the shuffles are seeded by seed + launches: the same call, the same interleaving
  const int64_t switches = cfg.switches;
  auto restore = [&] {
    cfg.order = saved.order;
    cfg.seed = saved.seed;
    cfg.launches = saved.launches + 1;
  };
  try {
    emulation::launch(dim3(unsigned(blocks)), dim3(unsigned(threads)), k, a);
  } catch (...) {
    restore();
    throw;
  }
  const int64_t arrivals = cfg.switches - switches;
  restore();
  return {out, arrivals};
}

}  // namespace

TORCH_LIBRARY(sparsegrad_emul_tests, m) {
  m.def("run(str name, Tensor input, int blocks, int threads, int order, int seed, int param, bool barrier) "
        "-> (Tensor, int)", &run);
}

}  // namespace sparsegrad
