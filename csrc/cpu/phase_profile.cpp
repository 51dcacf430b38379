// torch.ops.sparsegrad_profile: the CPU kernels' phase timers (phase_profile.h) and two probes of
// the machine, for benchmarks/bench_phases.py. Not part of the user API.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "cpu/phase_profile.h"
#include "cpu/row_kernels.h"

namespace sparsegrad {
namespace cpu {
namespace {

void enable(bool on) { profile::g_enabled.store(on); }

// [phases, 2] int64: nanoseconds and calls since the last reset.
at::Tensor read_timers() {
  at::Tensor out = at::empty({profile::kPhaseCount, 2}, at::kLong);
  int64_t* p = out.data_ptr<int64_t>();
  for (int k = 0; k < profile::kPhaseCount; ++k) {
    p[2 * k] = profile::g_ns[k].load();
    p[2 * k + 1] = profile::g_calls[k].load();
  }
  return out;
}

void reset_timers() {
  for (int k = 0; k < profile::kPhaseCount; ++k) {
    profile::g_ns[k].store(0);
    profile::g_calls[k].store(0);
  }
}

std::vector<std::string> phase_names() {
  std::vector<std::string> names;
  for (int k = 0; k < profile::kPhaseCount; ++k) names.emplace_back(profile::phase_name(k));
  return names;
}

// Writes zeros over `out` (float32, contiguous) with the kernels' non-temporal stores, in chunks
// per thread: the write bandwidth the outputs of the kernels see.
void stream_zero(at::Tensor out) {
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.is_cpu(),
              "stream_zero: out must be a contiguous float32 CPU tensor");
  float* p = out.data_ptr<float>();
  const int64_t n = out.numel();
  constexpr int64_t kChunk = 4096;
  at::parallel_for(0, (n + kChunk - 1) / kChunk, 16, [&](int64_t c0, int64_t c1) {
    alignas(64) float zeros[kChunk] = {};
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t i0 = c * kChunk, m = std::min(kChunk, n - i0);
      stream_copy(p + i0, zeros, m);
    }
    stream_fence();
  });
}

// Sums rows of `table` ([rows, width] float32, width a multiple of 16) picked by `idx` into one
// row, `reps` times over: the access pattern of the event-driven current and of the backward's
// event sums (whole rows of an L2-resident table, random rows, 16-lane adds). Returns the sum.
at::Tensor gather_add(const at::Tensor& table, const at::Tensor& idx, int64_t reps) {
  TORCH_CHECK(table.scalar_type() == at::kFloat && table.dim() == 2 && table.is_contiguous() &&
                  table.size(1) % 16 == 0 && table.size(1) <= 256,
              "gather_add: table must be contiguous float32 [rows, 16k] with 16k <= 256");
  TORCH_CHECK(idx.scalar_type() == at::kInt && idx.dim() == 1, "gather_add: idx must be int32 [n]");
  const int64_t width = table.size(1), n = idx.numel(), rows = table.size(0);
  const int32_t* ix = idx.data_ptr<int32_t>();
  for (int64_t e = 0; e < n; ++e) TORCH_CHECK(ix[e] >= 0 && ix[e] < rows, "gather_add: idx out of range");
  at::Tensor out = at::zeros({width}, table.options());
  float* acc = out.data_ptr<float>();
  std::vector<float> cur(width);
  for (int64_t r = 0; r < reps; ++r) {
    event_current_group<true, float>(static_cast<int>(width / 16), table.data_ptr<float>(), width, ix,
                                     nullptr, n, acc, cur.data());
    for (int64_t j = 0; j < width; ++j) acc[j] = cur[j] * 0.5f;  // keep the result live
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(sparsegrad_profile, m) {
  m.def("enable(bool on) -> ()", &enable);
  m.def("read() -> Tensor", &read_timers);
  m.def("reset() -> ()", &reset_timers);
  m.def("phase_names() -> str[]", &phase_names);
  m.def("stream_zero(Tensor(a!) out) -> ()");
  m.def("gather_add(Tensor table, Tensor idx, int reps) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparsegrad_profile, CPU, m) {
  m.impl("stream_zero", &stream_zero);
  m.impl("gather_add", &gather_add);
}

}  // namespace cpu
}  // namespace sparsegrad
