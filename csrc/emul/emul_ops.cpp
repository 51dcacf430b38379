// Test-only extension: the CUDA ops of sparsegrad, run on the CPU through the host emulation of the
// CUDA execution model (csrc/cuda/emulation.h). It compiles the very kernel headers nvcc compiles
// (csrc/cuda/*.cuh) and the very host sequence of launches, scans and GEMMs (csrc/cuda/host_ops.h);
// only the launcher differs. Built by tests/test_cuda_emul.py with torch.utils.cpp_extension.load.
//
// Ops: torch.ops.sparsegrad_emul.<op> with the schemas of torch.ops.sparsegrad.<op> (the tests
// check that they stay equal), CPU tensors in and out, plus set_launch_config / launch_counters.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "cuda/conv_host.h"
#include "cuda/host_ops.h"
#include "cuda/neuron_host.h"
#include "cuda/recurrent_host.h"
#include "low_precision.h"
#include "op_schemas.h"

namespace sparsegrad {
namespace {

struct EmulLauncher {
  static constexpr bool kHostReadsFlag = true;  // host memory: reading the error flag is free
  static int forced_dw_route() { return emulation::config().dw_route; }
  static int forced_dx_route() { return emulation::config().dx_route; }

  template <typename... KArgs, typename... Args>
  static void launch(int64_t n, void (*kernel)(KArgs...), Args... args) {
    if (n <= 0) return;  // as on the GPU: a launch with zero blocks is never made
    const emulation::Config& cfg = emulation::config();
    const auto shape = cuda::launch_shape(n, cfg.threads > 0 ? cfg.threads : cuda::kThreadsPerBlock,
                                          cfg.max_blocks > 0 ? cfg.max_blocks : cuda::kMaxBlocks);
    emulation::launch(dim3(unsigned(shape.blocks)), dim3(unsigned(shape.threads)), kernel, args...);
  }

  // Whole warps: the configured block size rounded up to a multiple of 32 (1 -> 32, 100 -> 128).
  static cuda::LaunchShape warp_shape(int64_t n) {
    const emulation::Config& cfg = emulation::config();
    return cuda::warp_launch_shape(n, cfg.threads > 0 ? cfg.threads : cuda::kThreadsPerBlock,
                                   cfg.max_blocks > 0 ? cfg.max_blocks : cuda::kMaxBlocks);
  }
  // The walks: as warp_shape when the tests set a block size, else the GPU's rule for an H100.
  static cuda::LaunchShape walk_shape(int64_t n) {
    const emulation::Config& cfg = emulation::config();
    if (cfg.threads > 0) return warp_shape(n);
    return cuda::walk_launch_shape(n, kEmulatedSms, cfg.max_blocks > 0 ? cfg.max_blocks : cuda::kMaxBlocks);
  }
  static constexpr int64_t kEmulatedSms = 132;
  // split_event_current: walk mode 1 never splits, 2 always does, 0 decides as an H100 would.
  static int64_t resident_threads() {
    const int mode = emulation::config().walk_mode;
    return mode == 1 ? 0 : mode == 2 ? std::numeric_limits<int64_t>::max() : kEmulatedSms * 2048;
  }

  template <typename... KArgs, typename... Args>
  static void launch_in(cuda::LaunchShape shape, void (*kernel)(KArgs...), Args... args) {
    emulation::launch(dim3(unsigned(shape.blocks)), dim3(unsigned(shape.threads)), kernel, args...);
  }
};

// order: 0 forward, 1 reverse, 2 shuffled (seeded); threads / max_blocks: 0 keeps the defaults;
// wide_tiles: for kernels that have a variant with several neurons per thread (none of the
// kernels of csrc/cuda today; kept so that new ops can offer one).
void set_launch_config(int64_t order, int64_t seed, int64_t threads, int64_t max_blocks,
                       bool wide_tiles) {
  TORCH_CHECK(order >= 0 && order <= 2, "sparsegrad_emul.set_launch_config: argument 'order' must be 0, 1 or 2, got ", order);
  TORCH_CHECK(threads >= 0 && max_blocks >= 0, "sparsegrad_emul.set_launch_config: 'threads' and 'max_blocks' must be >= 0");
  emulation::Config& cfg = emulation::config();
  cfg.order = static_cast<emulation::Order>(order);
  cfg.seed = static_cast<uint64_t>(seed);
  cfg.threads = threads;
  cfg.max_blocks = max_blocks;
  cfg.wide_tiles = wide_tiles;
}

// Force the GPU routes of the backwards (csrc/cuda/gpu_routes.h) instead of the cost model's
// choice: dw 0 auto, 1 events, 2 active entries, 3 GEMM; dx 0 auto, 1 dots, 2 GEMM.
void set_routes(int64_t dw_route, int64_t dx_route) {
  TORCH_CHECK(dw_route >= 0 && dw_route <= 3, "sparsegrad_emul.set_routes: 'dw_route' must be 0..3, got ", dw_route);
  TORCH_CHECK(dx_route >= 0 && dx_route <= 2, "sparsegrad_emul.set_routes: 'dx_route' must be 0..2, got ", dx_route);
  emulation::config().dw_route = int(dw_route);
  emulation::config().dx_route = int(dx_route);
}

// The forward walks' input current (split_event_current, kernel_common.cuh): 0 as the H100 rule
// decides (every test-sized problem precomputes the event currents), 1 always inside the walk,
// 2 always precomputed. Results are bit-identical either way (tests/test_emul_forward_shapes.py).
void set_walk_mode(int64_t mode) {
  TORCH_CHECK(mode >= 0 && mode <= 2, "sparsegrad_emul.set_walk_mode: 'mode' must be 0, 1 or 2, got ", mode);
  emulation::config().walk_mode = int(mode);
}

// The GPU's launch-shape rules (kernel_common.cuh) for n threads on a GPU of `sms` SMs holding
// `resident` threads: [walk threads per block, walk blocks, warp-kernel threads per block,
// warp-kernel blocks, whether the walk precomputes its event currents (buffer free)].
std::vector<int64_t> launch_rules(int64_t n, int64_t sms, int64_t resident) {
  const cuda::LaunchShape walk = cuda::walk_launch_shape(n, sms), warp = cuda::warp_launch_shape(n);
  return {walk.threads, walk.blocks, warp.threads, warp.blocks,
          int64_t(cuda::split_event_current(n, resident, 0, true))};
}

// The routes a SPARSEGRAD_CUDA_ROUTES spec forces on the GPU ([dw, dx] as set_routes; the
// parser of the CUDA launcher), or an error for a malformed spec.
std::vector<int64_t> parse_routes(c10::string_view spec) {
  int dw = 0, dx = 0;
  TORCH_CHECK(cuda::routes::parse_forced_routes(std::string(spec), &dw, &dx),
              "sparsegrad_emul.parse_routes: malformed spec '", std::string(spec), "'");
  return {dw, dx};
}

// The cost model's choice for a problem: [dw route, dx route] (values as set_routes).
std::vector<int64_t> gpu_routes(int64_t T, int64_t B, int64_t n_in, int64_t n_out, int64_t nnz,
                                int64_t n_active, int64_t n_prev, int64_t acc_bytes, bool active_route_valid) {
  cuda::routes::Problem p;
  p.T = T;
  p.B = B;
  p.n_in = n_in;
  p.n_out = n_out;
  p.nnz = nnz;
  p.n_active = n_active;
  p.n_prev = n_prev;
  p.acc_bytes = acc_bytes;
  p.scalar_bytes = acc_bytes;
  p.active_route_valid = active_route_valid;
  return {int64_t(cuda::routes::choose_dw(p, cuda::routes::Dw::kAuto)),
          int64_t(cuda::routes::choose_dx(p, cuda::routes::Dx::kAuto))};
}

// [launches, emulated threads, barrier / collective arrivals] since the library was loaded.
std::vector<int64_t> launch_counters() {
  return {emulation::config().launches, emulation::config().threads_run, emulation::config().switches};
}

}  // namespace

// Same schemas as sparsegrad::* (csrc/op_schemas.h), plus the harness controls.
TORCH_LIBRARY(sparsegrad_emul, m) {
  define_ops(m);
  m.def("set_launch_config(int order, int seed, int threads, int max_blocks, bool wide_tiles) -> ()",
        &set_launch_config);
  m.def("set_routes(int dw_route, int dx_route) -> ()", &set_routes);
  m.def("set_walk_mode(int mode) -> ()", &set_walk_mode);
  m.def("launch_rules(int n, int sms, int resident) -> int[]", &launch_rules);
  m.def("gpu_routes(int T, int B, int n_in, int n_out, int nnz, int n_active, int n_prev, int acc_bytes, "
        "bool active_route_valid) -> int[]", &gpu_routes);
  m.def("launch_counters() -> int[]", &launch_counters);
  m.def("parse_routes(str spec) -> int[]", &parse_routes);
}

// CPU only: the emulated kernels read and write host memory.
TORCH_LIBRARY_IMPL(sparsegrad_emul, CPU, m) {
  using L = EmulLauncher;
  m.impl("lif_forward", SG_FLOAT32_MATH(cuda::host::lif_forward<L>));
  m.impl("lif_backward_sparse", SG_FLOAT32_MATH(cuda::host::lif_backward_sparse<L>));
  m.impl("lif_backward_dense", SG_FLOAT32_MATH(cuda::host::lif_backward_dense<L>));
  m.impl("li_readout_forward", SG_FLOAT32_MATH(cuda::host::li_readout_forward<L>));
  m.impl("li_readout_backward", SG_FLOAT32_MATH(cuda::host::li_readout_backward<L>));
  m.impl("lif_neuron_forward", SG_FLOAT32_MATH(cuda::host::lif_neuron_forward<L>));
  m.impl("lif_neuron_backward", SG_FLOAT32_MATH(cuda::host::lif_neuron_backward<L>));
  m.impl("lif_neuron_param_forward", SG_FLOAT32_MATH(cuda::host::lif_neuron_param_forward<L>));
  m.impl("lif_neuron_param_backward", SG_FLOAT32_MATH(cuda::host::lif_neuron_param_backward<L>));
  m.impl("rlif_forward", SG_FLOAT32_MATH(cuda::host::rlif_forward<L>));
  m.impl("rlif_backward_sparse", SG_FLOAT32_MATH(cuda::host::rlif_backward_sparse<L>));
  m.impl("rlif_backward_dense", SG_FLOAT32_MATH(cuda::host::rlif_backward_dense<L>));
  m.impl("rlif_param_forward", SG_FLOAT32_MATH(cuda::host::rlif_param_forward<L>));
  m.impl("rlif_param_backward_sparse", SG_FLOAT32_MATH(cuda::host::rlif_param_backward_sparse<L>));
  m.impl("rlif_param_backward_dense", SG_FLOAT32_MATH(cuda::host::rlif_param_backward_dense<L>));
  // the convolution ops take float32 / float64 (spike_pack any float) as their CPU kernels do
  m.impl("spike_pack", &cuda::host::spike_pack<L>);
  m.impl("spike_conv2d_forward", &cuda::host::spike_conv2d_forward<L>);
  m.impl("conv_pool2d", &cuda::host::conv_pool2d<L>);
  m.impl("conv_unpool2d", &cuda::host::conv_unpool2d<L>);
  m.impl("spike_conv2d_backward", &cuda::host::spike_conv2d_backward<L>);
}

}  // namespace sparsegrad
