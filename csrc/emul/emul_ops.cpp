// Test-only extension: the CUDA ops of sparsegrad, run on the CPU through the host emulation of the
// CUDA execution model (csrc/cuda/emulation.h). It compiles the very kernel headers nvcc compiles
// (csrc/cuda/*.cuh) and the very host sequence of launches, scans and GEMMs (csrc/cuda/host_ops.h);
// only the launcher differs. Built by tests/test_cuda_emul.py with torch.utils.cpp_extension.load.
//
// Ops: torch.ops.sparsegrad_emul.<op> with the schemas of torch.ops.sparsegrad.<op> (the tests
// check that they stay equal), CPU tensors in and out, plus set_launch_config / launch_counters.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "cuda/host_ops.h"
#include "cuda/neuron_host.h"
#include "op_schemas.h"

namespace sparsegrad {
namespace {

struct EmulLauncher {
  static constexpr bool kTileChoice = true;
  static bool wide_tiles() { return emulation::config().wide_tiles; }

  template <typename... KArgs, typename... Args>
  static void launch(int64_t n, void (*kernel)(KArgs...), Args... args) {
    if (n <= 0) return;  // as on the GPU: a launch with zero blocks is never made
    const emulation::Config& cfg = emulation::config();
    const auto shape = cuda::launch_shape(n, cfg.threads > 0 ? cfg.threads : cuda::kThreadsPerBlock,
                                          cfg.max_blocks > 0 ? cfg.max_blocks : cuda::kMaxBlocks);
    emulation::launch(dim3(unsigned(shape.blocks)), dim3(unsigned(shape.threads)), kernel, args...);
  }
};

// order: 0 forward, 1 reverse, 2 shuffled (seeded); threads / max_blocks: 0 keeps the defaults;
// wide_tiles: run the backward walks with kWideTile neurons per thread instead of one.
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

// [launches, emulated threads] since the library was loaded.
std::vector<int64_t> launch_counters() {
  return {emulation::config().launches, emulation::config().threads_run};
}

}  // namespace

// Same schemas as sparsegrad::* (csrc/op_schemas.h), plus the harness controls.
TORCH_LIBRARY(sparsegrad_emul, m) {
  define_ops(m);
  m.def("set_launch_config(int order, int seed, int threads, int max_blocks, bool wide_tiles) -> ()",
        &set_launch_config);
  m.def("launch_counters() -> int[]", &launch_counters);
}

// CPU only: the emulated kernels read and write host memory.
TORCH_LIBRARY_IMPL(sparsegrad_emul, CPU, m) {
  using L = EmulLauncher;
  m.impl("lif_forward", &cuda::host::lif_forward<L>);
  m.impl("lif_backward_sparse", &cuda::host::lif_backward_sparse<L>);
  m.impl("lif_backward_dense", &cuda::host::lif_backward_dense<L>);
  m.impl("li_readout_forward", &cuda::host::li_readout_forward<L>);
  m.impl("li_readout_backward", &cuda::host::li_readout_backward<L>);
  m.impl("lif_neuron_forward", &cuda::host::lif_neuron_forward<L>);
  m.impl("lif_neuron_backward", &cuda::host::lif_neuron_backward<L>);
}

}  // namespace sparsegrad
