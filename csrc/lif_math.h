// Per-element LIF math, written once and shared by the CPU kernels, the CUDA kernels and the
// host emulation of the CUDA kernels. Only plain arithmetic: no ATen, no torch/extension.h.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace sparsegrad {
namespace math {

// V[t] = alpha*V[t-1] + I[t] - threshold*S[t-1]   (the reset term carries no gradient)
template <typename acc_t>
C10_HOST_DEVICE inline acc_t integrate(acc_t v_prev, acc_t current, acc_t s_prev, acc_t alpha,
                                       acc_t threshold) {
  return alpha * v_prev + current - threshold * s_prev;
}

// S[t] = H(V[t] - threshold), H(u) = 1 if u > 0 else 0 (NaN never fires)
template <typename acc_t>
C10_HOST_DEVICE inline acc_t fire(acc_t v, acc_t threshold) {
  return (v - threshold) > acc_t(0) ? acc_t(1) : acc_t(0);
}

// dS/dV ~ 1 / (slope*|V - threshold| + 1)^2  (SuperSpike / fast sigmoid)
template <typename acc_t>
C10_HOST_DEVICE inline acc_t surrogate(acc_t v, acc_t threshold, acc_t slope) {
  const acc_t u = v - threshold;
  const acc_t d = slope * (u < acc_t(0) ? -u : u) + acc_t(1);
  return acc_t(1) / (d * d);
}

// An entry carries gradient in sparse mode iff |V - threshold| < b_th (b_th = inf: always).
template <typename acc_t>
C10_HOST_DEVICE inline bool is_active(acc_t v, acc_t threshold, acc_t b_th) {
  const acc_t u = v - threshold;
  return (u < acc_t(0) ? -u : u) < b_th;
}

// Leaky readout: U[t] = alpha*U[t-1] + (1-alpha)*I[t]
template <typename acc_t>
C10_HOST_DEVICE inline acc_t leaky_integrate(acc_t u_prev, acc_t current, acc_t alpha) {
  return alpha * u_prev + (acc_t(1) - alpha) * current;
}

// Reverse-time trace of a gradient: G[t] = alpha*G[t+1] + delta[t]
template <typename acc_t>
C10_HOST_DEVICE inline acc_t decay_add(acc_t trace, acc_t delta, acc_t alpha) {
  return alpha * trace + delta;
}

}  // namespace math

// Time reductions of the readout (host and device code).
enum ReduceKind : int { kReduceMax = 0, kReduceSum = 1, kReduceMean = 2, kReduceNone = 3 };

}  // namespace sparsegrad
