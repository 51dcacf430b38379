// Per-element LIF math, written once and shared by the CPU kernels, the CUDA kernels and the
// host emulation of the CUDA kernels. Only plain arithmetic: no ATen, no torch/extension.h.
//
// Every neuron model of the package (the fused Linear+LIF layer, the LIF neuron op, the recurrent
// layer) takes its update, its surrogate and the backward decay of its gradient trace from here.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <type_traits>

namespace sparsegrad {

// Surrogate derivative dS/dV, with u = V - threshold and a = slope (names as in sparsegrad's API;
// the peers' names for each are in docs/surrogates.md).
enum SurrogateKind : int {
  kFastSigmoid = 0,  // 1 / (a*|u| + 1)^2                      snnTorch fast_sigmoid(slope=a)
  kAtan = 1,         // (a/2) / (1 + (pi/2 * a * u)^2)          snnTorch atan(alpha=a), SJ ATan(alpha=a)
  kSigmoid = 2,      // a * sig(a*u) * (1 - sig(a*u))           snnTorch sigmoid(slope=a), SJ Sigmoid
  kTriangle = 3,     // a * max(0, 1 - a*|u|)                   SJ PiecewiseQuadratic(alpha=a)
};

// Reset after a spike, as snnTorch's Leaky (S[t-1] is detached in every case):
enum ResetKind : int {
  kResetSubtract = 0,  // V[t] = alpha*V[t-1] + I[t] - threshold*S[t-1]
  kResetZero = 1,      // V[t] = alpha*((1 - S[t-1])*V[t-1]) + I[t]    (V carries gradient)
  kResetNone = 2,      // V[t] = alpha*V[t-1] + I[t]
};

// SpikingJelly's neurons (LIFNode / IFNode), for exact conversion: a charge H from the post-reset
// membrane V, a spike at H >= threshold, then the reset in the same step. Written in SpikingJelly's
// order of operations, so that the spikes agree bit for bit.
enum ChargeKind : int {
  kChargeLeaky = 0,         // sparsegrad / snnTorch: math::integrate(), reset at the next step
  kChargeSJDecayInput = 1,  // LIFNode(decay_input=True):  H = V + (X - (V - V_reset)) / tau
  kChargeSJ = 2,            // LIFNode(decay_input=False): H = V - (V - V_reset) / tau + X
  kChargeSJIF = 3,          // IFNode:                     H = V + X
};

// A neuron parameter (alpha, threshold, alpha_syn): one value for all neurons, or one per
// neuron j of a row. Kernels are templates over the view, so the per-neuron and the scalar model
// are one code path; ScalarParam is the compile-time scalar the float API instantiates (its
// loops vectorise as before), ParamView the run-time choice (a per-neuron pointer, or a value
// when the pointer is null) that the tensor-parameter ops use on the CPU and on the GPU.
template <typename acc_t>
struct ScalarParam {
  acc_t value;
  C10_HOST_DEVICE acc_t operator[](int64_t) const { return value; }
};

template <typename acc_t>
struct ParamView {
  acc_t value;
  const acc_t* ptr;  // [N] or null
  C10_HOST_DEVICE acc_t operator[](int64_t j) const { return ptr != nullptr ? ptr[j] : value; }
};

// A per-neuron parameter that is always given (the CPU tensor-parameter ops receive [N] rows):
// no null test per read, so that the CPU's row loops vectorise as with ScalarParam.
template <typename acc_t>
struct RowParam {
  const acc_t* ptr;  // [N]
  C10_HOST_DEVICE acc_t operator[](int64_t j) const { return ptr[j]; }
};

// Whether Param is a run-time parameter view (ParamView, RowParam) rather than the float API's
// compile-time ScalarParam: the tensor-parameter kernels keep their extra state and traces then.
template <class Param>
struct IsScalarParam : std::false_type {};
template <typename acc_t>
struct IsScalarParam<ScalarParam<acc_t>> : std::true_type {};
template <class Param>
constexpr bool is_param_view() {
  return !IsScalarParam<Param>::value;
}

namespace math {

// The membrane update for a given reset.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t integrate(acc_t v_prev, acc_t current, acc_t s_prev, acc_t alpha,
                                       acc_t threshold, int reset) {
  if (reset == kResetZero) return alpha * ((acc_t(1) - s_prev) * v_prev) + current;
  if (reset == kResetNone) return alpha * v_prev + current;
  return alpha * v_prev + current - threshold * s_prev;
}

// Subtract reset (the model of DESIGN.md §2): V[t] = alpha*V[t-1] + I[t] - threshold*S[t-1]
template <typename acc_t>
C10_HOST_DEVICE inline acc_t integrate(acc_t v_prev, acc_t current, acc_t s_prev, acc_t alpha,
                                       acc_t threshold) {
  return integrate(v_prev, current, s_prev, alpha, threshold, kResetSubtract);
}

// S[t] = H(V[t] - threshold), H(u) = 1 if u > 0 else 0 (NaN never fires)
template <typename acc_t>
C10_HOST_DEVICE inline acc_t fire(acc_t v, acc_t threshold) {
  return (v - threshold) > acc_t(0) ? acc_t(1) : acc_t(0);
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t abs_value(acc_t u) {
  return u < acc_t(0) ? -u : u;
}

// dS/dV at V for the chosen surrogate (see SurrogateKind). Every form is even in u.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t surrogate(acc_t v, acc_t threshold, acc_t slope, int kind) {
  const acc_t u = abs_value(v - threshold);
  switch (kind) {
    case kAtan: {
      const acc_t z = acc_t(1.57079632679489661923) * slope * u;  // pi/2 * a * |u|
      return (slope / acc_t(2)) / (acc_t(1) + z * z);
    }
    case kSigmoid: {
      // a * e / (1 + e)^2 with e = exp(-a|u|) <= 1: the same value as a*sig*(1 - sig), without
      // the overflow of exp(+a|u|) far from threshold.
      const acc_t e = std::exp(-slope * u);
      const acc_t d = acc_t(1) + e;
      return slope * e / (d * d);
    }
    case kTriangle: {
      const acc_t r = acc_t(1) - slope * u;
      return r > acc_t(0) ? slope * r : acc_t(0);
    }
    default: {  // kFastSigmoid
      const acc_t d = slope * u + acc_t(1);
      return acc_t(1) / (d * d);
    }
  }
}

// The fast sigmoid (the default surrogate): 1 / (slope*|V - threshold| + 1)^2
template <typename acc_t>
C10_HOST_DEVICE inline acc_t surrogate(acc_t v, acc_t threshold, acc_t slope) {
  return surrogate(v, threshold, slope, kFastSigmoid);
}

// An entry carries gradient in sparse mode iff |V - threshold| < b_th (b_th = inf: always).
template <typename acc_t>
C10_HOST_DEVICE inline bool is_active(acc_t v, acc_t threshold, acc_t b_th) {
  return abs_value(v - threshold) < b_th;
}

// Leaky readout: U[t] = alpha*U[t-1] + (1-alpha)*I[t]. alpha = 0 is U[t] = I[t] exactly (the
// tensor-parameter layer's current, sparsegrad/functional.py): a non-finite U[t-1] must not
// turn into 0 * inf = NaN there; for finite values the two forms agree bit for bit.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t leaky_integrate(acc_t u_prev, acc_t current, acc_t alpha) {
  return alpha == acc_t(0) ? current : alpha * u_prev + (acc_t(1) - alpha) * current;
}

// Reverse-time trace of a gradient: G[t] = alpha*G[t+1] + delta[t]
template <typename acc_t>
C10_HOST_DEVICE inline acc_t decay_add(acc_t trace, acc_t delta, acc_t alpha) {
  return alpha * trace + delta;
}

// dV[t+1]/dV[t] given the spike S[t]: alpha, except under reset-to-zero, where a spike at t
// cuts the path (V[t+1] = alpha*(1 - S[t])*V[t] + ...). So G[t] = trace_decay(...)*G[t+1] + delta[t].
template <typename acc_t>
C10_HOST_DEVICE inline acc_t trace_decay(acc_t alpha, bool spiked, int reset) {
  return (reset == kResetZero && spiked) ? acc_t(0) : alpha;
}

// Synaptic current (snnTorch's Synaptic, NIR's CubaLIF): syn[t] = alpha_syn*syn[t-1] + I[t]; the
// membrane then integrates syn[t] in place of I[t].
template <typename acc_t>
C10_HOST_DEVICE inline acc_t synaptic(acc_t syn_prev, acc_t current, acc_t alpha_syn) {
  return alpha_syn * syn_prev + current;
}

// Forward-mode derivatives of the state with respect to the parameters (the traces P, Q of
// DESIGN.md §3c; the reset detached). They start at 0 before step 0 and are updated from the
// previous step's state before the membrane step:
//   P[t] = dV[t]/dalpha       = keep*(alpha*P[t-1] + V[t-1])      keep = 1 - S[t-1] (zero reset), else 1
//   Q[t] = -dV[t]/dthreshold  = alpha*Q[t-1] + S[t-1]            (subtract reset; 0 otherwise)
//   R[t] = dsyn[t]/dalpha_syn = alpha_syn*R[t-1] + syn[t-1]
//   U[t] = dV[t]/dalpha_syn   = keep*(alpha*U[t-1]) + R[t]
// so that a gradient g arriving at V[t] contributes g*P[t] to dL/dalpha, -g*Q[t] to dL/dthreshold
// and g*U[t] to dL/dalpha_syn (param_grads below): the backward needs them only where g is nonzero.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t reset_keep(acc_t s_prev, int reset) {
  return reset == kResetZero ? acc_t(1) - s_prev : acc_t(1);
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t tangent_alpha(acc_t p, acc_t v_prev, acc_t s_prev, acc_t alpha,
                                           int reset) {
  return reset_keep(s_prev, reset) * (alpha * p + v_prev);
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t tangent_threshold(acc_t q, acc_t s_prev, acc_t alpha, int reset) {
  return reset == kResetSubtract ? alpha * q + s_prev : acc_t(0);
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t tangent_syn(acc_t r, acc_t syn_prev, acc_t alpha_syn) {
  return alpha_syn * r + syn_prev;
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t tangent_alpha_syn(acc_t u, acc_t r_new, acc_t s_prev, acc_t alpha,
                                               int reset) {
  return reset_keep(s_prev, reset) * (alpha * u) + r_new;
}

// The four traces of one neuron advanced by one step, from the previous step's state (v_prev,
// s_prev, syn_prev) before the membrane step; R and U only with a synaptic current. The CUDA
// kernels keep them per thread; the CPU's row loops (cpu/neuron_rows.h) call the same functions.
template <typename acc_t>
struct Tangents {
  acc_t p = 0, q = 0, r = 0, u = 0;
  C10_HOST_DEVICE void step(acc_t v_prev, acc_t s_prev, acc_t syn_prev, acc_t alpha,
                            acc_t alpha_syn, int reset, bool syn) {
    p = tangent_alpha(p, v_prev, s_prev, alpha, reset);
    q = tangent_threshold(q, s_prev, alpha, reset);
    if (syn) {
      r = tangent_syn(r, syn_prev, alpha_syn);
      u = tangent_alpha_syn(u, r, s_prev, alpha, reset);
    }
  }
};

// The parameter gradients of one entry: g = dL/dV[t] arriving there (grad_mem, grad_v_final, or
// delta = dL/dS * surrogate, which also reaches threshold through S = H(V - threshold), fires =
// true). Every kernel accumulates with this one function, in the order t = T-1 .. 0.
template <typename acc_t>
C10_HOST_DEVICE inline void param_grads(acc_t& d_alpha, acc_t& d_threshold, acc_t& d_alpha_syn,
                                        acc_t g, acc_t p, acc_t q, acc_t u, bool fires) {
  d_alpha += g * p;
  d_threshold -= fires ? g * (q + acc_t(1)) : g * q;
  d_alpha_syn += g * u;
}

// SpikingJelly charge, fire and reset (ChargeKind above).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t sj_charge(acc_t v, acc_t x, acc_t tau, acc_t v_reset, int kind) {
  if (kind == kChargeSJDecayInput) return v + (x - (v - v_reset)) / tau;
  if (kind == kChargeSJ) return v - (v - v_reset) / tau + x;
  return v + x;
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t sj_fire(acc_t h, acc_t threshold) {
  return h >= threshold ? acc_t(1) : acc_t(0);
}

// Soft reset (v_reset None): V = H - threshold*S; hard: V = S*v_reset + (1 - S)*H.
template <typename acc_t>
C10_HOST_DEVICE inline acc_t sj_reset(acc_t h, acc_t s, acc_t threshold, acc_t v_reset, bool hard) {
  return hard ? s * v_reset + (acc_t(1) - s) * h : h - s * threshold;
}

}  // namespace math

// Time reductions of the readout (host and device code).
enum ReduceKind : int { kReduceMax = 0, kReduceSum = 1, kReduceMean = 2, kReduceNone = 3 };

}  // namespace sparsegrad
