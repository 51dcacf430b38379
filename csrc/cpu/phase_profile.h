// Optional timers around the phases of the CPU kernels, read by benchmarks/bench_phases.py
// (torch.ops.sparsegrad_profile, csrc/cpu/phase_profile.cpp). Off by default: a disabled timer
// costs one relaxed atomic load. Phases timed on the calling thread around a parallel region
// record wall time; phases timed inside a parallel region (the walk and the event sums of the
// backward's tile groups) record the time summed over threads, which is wall time with 1 thread.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

namespace sparsegrad {
namespace cpu {
namespace profile {

enum Phase : int {
  kFwdScan = 0,         // x read once into events (per-thread scratch)
  kFwdGatherEvents,     // events copied into the output CSR
  kFwdRows,             // currents, recurrence, spikes, active set (LIF) / leaky integration (readout)
  kFwdGatherActive,     // active set copied into the output CSR
  kBwdSetup,            // offsets from counts, index checks, allocations
  kBwdDeltas,           // delta = dL/dS * surrogate at the active entries
  kBwdRegroup,          // events grouped by input
  kBwdWalk,             // reverse walks of the tile groups (+ restricted dx parts)   [thread-summed]
  kBwdEventSums,        // dW^T: G summed over each input's event times              [thread-summed]
  kBwdDxWrite,          // restricted dx written whole
  kBwdOther,            // the active route, full dx (trace_backward)
  kPhaseCount
};

inline const char* phase_name(int p) {
  static const char* names[kPhaseCount] = {
      "fwd.scan", "fwd.gather_events", "fwd.rows", "fwd.gather_active", "bwd.setup",
      "bwd.deltas", "bwd.regroup", "bwd.walk", "bwd.event_sums", "bwd.dx_write", "bwd.other"};
  return names[p];
}

inline std::atomic<bool> g_enabled{false};
inline std::atomic<int64_t> g_ns[kPhaseCount];
inline std::atomic<int64_t> g_calls[kPhaseCount];

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

class Scope {
 public:
  explicit Scope(Phase p) : p_(p), t0_(g_enabled.load(std::memory_order_relaxed) ? now_ns() : 0) {}
  ~Scope() { stop(); }
  void stop() {
    if (t0_ != 0) {
      g_ns[p_].fetch_add(now_ns() - t0_, std::memory_order_relaxed);
      g_calls[p_].fetch_add(1, std::memory_order_relaxed);
      t0_ = 0;
    }
  }
  // Ends this phase and starts p.
  void next(Phase p) {
    stop();
    p_ = p;
    t0_ = g_enabled.load(std::memory_order_relaxed) ? now_ns() : 0;
  }
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 private:
  Phase p_;
  int64_t t0_;
};

}  // namespace profile
}  // namespace cpu
}  // namespace sparsegrad
