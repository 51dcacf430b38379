// The GPU's own cost model for the routes of the sparse backwards (docs/cuda.md, "Route choice").
//
// Plain host C++ (no ATen, no CUDA): it sees only sizes and counts that the host already knows
// without a synchronisation (tensor numels), and returns which kernels to run. The CPU has its own
// model (cpu::choose_dw_route); the GPU's economics differ (DESIGN.md §6): a dense G [T, B, N_out]
// costs a few microseconds of bandwidth, fp32 GEMMs run at tens of TFLOP/s, and a gather is cheap
// when its working set stays in the 50 MB L2.
//
// Each route's time is estimated as bytes over bandwidth plus flops over GEMM throughput plus a
// fixed cost per launch, with H100 figures (below). Only the ratios matter; the constants are the
// first thing to calibrate once a GPU can measure the routes (scripts/gpu_check.sh).
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>

namespace sparsegrad {
namespace cuda {
namespace routes {

constexpr double kHbmBytesPerS = 3.35e12;  // H100 SXM HBM3
constexpr double kL2BytesPerS = 1.0e13;    // gathers whose working set stays in L2
constexpr double kL2Bytes = 40e6;          // of the 50 MB L2, what a working set may use
constexpr double kGemmFlopsPerS = 5.0e13;  // cuBLAS fp32 (no TF32) / fp64 (DMMA), sustained
constexpr double kLaunchS = 4e-6;          // one kernel launch (or one small ATen call)

// dW routes. kEvents: segmented sum over the input events grouped by input neuron (one stable
// sort); kActive: segmented sum over the active entries grouped by output neuron against the dense
// input trace (invalid under reset-to-zero); kGemm: dW = G^T X with X scattered densely (cuBLAS).
enum class Dw : int { kAuto = 0, kEvents = 1, kActive = 2, kGemm = 3 };
// dx routes when the producer's active set is known. kDots: one independent dot product
// G[t,b,:] . W[:, i] per producer entry, zero elsewhere; kGemm: dx = G W everywhere (also correct:
// the producer reads dx only on its active set). Without a producer set dx is always the GEMM.
enum class Dx : int { kAuto = 0, kDots = 1, kGemm = 2 };

struct Problem {
  int64_t T = 0, B = 0, n_in = 0, n_out = 0;
  int64_t nnz = 0;       // input events
  int64_t n_active = 0;  // active entries (LIF) / 0 for the readout
  int64_t n_prev = -1;   // producer's active entries, -1 when there is no producer set
  int64_t acc_bytes = 4;     // float: 4, double: 8
  int64_t scalar_bytes = 4;  // of the inputs and weights
  bool active_route_valid = true;  // false for the readout and under reset-to-zero
};

inline double seconds_for_bytes(double bytes, double working_set) {
  return bytes / (working_set <= kL2Bytes ? kL2BytesPerS : kHbmBytesPerS);
}

// Group n entries of a CSR by column: expand rows (n int64), one stable radix sort of int32 keys
// with an int64 permutation (~4 passes reading and writing both), column bounds, and a gather of
// (G row, weight) per sorted position.
inline double regroup_seconds(double n) {
  return n * (8.0 + 4 * 2 * (4 + 8) + 16.0) / kHbmBytesPerS + 6 * kLaunchS;
}

inline double gemm_seconds(double m, double k, double n, double acc) {
  // flops, plus reading both operands and writing the result once (large GEMMs are not
  // bandwidth-bound, small ones are)
  return 2.0 * m * k * n / kGemmFlopsPerS + (m * k + k * n + m * n) * acc / kHbmBytesPerS + kLaunchS;
}

inline double dw_seconds(const Problem& p, Dw route) {
  const double TB = double(p.T) * double(p.B), acc = double(p.acc_bytes);
  const double n_in = double(p.n_in), n_out = double(p.n_out);
  switch (route) {
    case Dw::kEvents:  // every event reads a row of G (coalesced over N_out)
      return regroup_seconds(double(p.nnz)) +
             seconds_for_bytes(double(p.nnz) * n_out * acc, TB * n_out * acc) +
             n_in * n_out * acc / kHbmBytesPerS + kLaunchS;
    case Dw::kActive:  // dense input trace (zero, scatter, scan), every active entry reads a row
      return 3.0 * TB * n_in * acc / kHbmBytesPerS + 3 * kLaunchS + regroup_seconds(double(p.n_active)) +
             seconds_for_bytes(double(p.n_active) * n_in * acc, TB * n_in * acc) +
             gemm_seconds(n_out, double(p.B), n_in, acc);
    default:  // dense X (zero, scatter), one GEMM
      return TB * n_in * acc / kHbmBytesPerS + 2 * kLaunchS + gemm_seconds(n_out, TB, n_in, acc);
  }
}

inline double dx_seconds(const Problem& p, Dx route) {
  const double TB = double(p.T) * double(p.B), acc = double(p.acc_bytes);
  const double n_in = double(p.n_in), n_out = double(p.n_out), n_prev = double(std::max<int64_t>(p.n_prev, 0));
  if (route == Dx::kDots) {
    // zero-filled dx, the producer rows expanded, then per entry a row of W^T (from L2 when W
    // fits) against a row of G (shared by the entries of one (t, b): read about once)
    return TB * n_in * acc / kHbmBytesPerS + n_prev * 16.0 / kHbmBytesPerS + 3 * kLaunchS +
           seconds_for_bytes(n_prev * n_out * double(p.scalar_bytes), n_in * n_out * double(p.scalar_bytes)) +
           TB * n_out * acc / kHbmBytesPerS;
  }
  return gemm_seconds(TB, n_out, n_in, acc);
}

inline Dw choose_dw(const Problem& p, Dw asked) {
  if (asked == Dw::kActive && !p.active_route_valid) return Dw::kEvents;
  if (asked != Dw::kAuto) return asked;
  Dw best = Dw::kEvents;
  double best_s = dw_seconds(p, Dw::kEvents);
  for (Dw r : {Dw::kActive, Dw::kGemm}) {
    if (r == Dw::kActive && !p.active_route_valid) continue;
    const double s = dw_seconds(p, r);
    if (s < best_s) {
      best = r;
      best_s = s;
    }
  }
  return best;
}

inline Dx choose_dx(const Problem& p, Dx asked) {
  if (p.n_prev < 0) return Dx::kGemm;  // no producer set: dx everywhere
  if (asked != Dx::kAuto) return asked;
  return dx_seconds(p, Dx::kDots) <= dx_seconds(p, Dx::kGemm) ? Dx::kDots : Dx::kGemm;
}

// Routes forced instead of the model's choice, from a spec such as "dw=events,dx=dots" (either
// part may be left out; "auto" is the model): what SPARSEGRAD_CUDA_ROUTES holds (docs/cuda.md).
// Values as Dw / Dx. Returns false, leaving *dw / *dx as they were, on anything else.
inline bool parse_forced_routes(const std::string& spec, int* dw, int* dx) {
  static const std::pair<const char*, int> kDw[] = {{"auto", 0}, {"events", 1}, {"active", 2}, {"gemm", 3}};
  static const std::pair<const char*, int> kDx[] = {{"auto", 0}, {"dots", 1}, {"gemm", 2}};
  int new_dw = *dw, new_dx = *dx;
  size_t pos = 0;
  while (pos <= spec.size()) {
    size_t end = spec.find(',', pos);
    if (end == std::string::npos) end = spec.size();
    const std::string item = spec.substr(pos, end - pos);
    pos = end + 1;
    if (item.empty()) continue;
    const size_t eq = item.find('=');
    if (eq == std::string::npos) return false;
    const std::string key = item.substr(0, eq), value = item.substr(eq + 1);
    bool found = false;
    if (key == "dw") {
      for (const auto& [name, v] : kDw) if (value == name) { new_dw = v; found = true; }
    } else if (key == "dx") {
      for (const auto& [name, v] : kDx) if (value == name) { new_dx = v; found = true; }
    }
    if (!found) return false;
  }
  *dw = new_dw;
  *dx = new_dx;
  return true;
}

}  // namespace routes
}  // namespace cuda
}  // namespace sparsegrad
