// Row helpers shared by the CPU neuron kernels (the LIF neuron op, lif_neuron_cpu.cpp, and the
// recurrent layer, recurrent_walk.h): one step of the membrane and of its forward-mode traces
// over a row of N neurons, built from lif_math.h's per-element functions.
#pragma once

#include <cstdint>
#include <type_traits>

#include "lif_math.h"

namespace sparsegrad {
namespace cpu {

// Row helpers of the forward: each is one loop over a row of N neurons with restrict pointers
// and the reset / surrogate fixed at compile time, so that the compiler vectorises it (a loop
// over math:: calls with a run-time kind and possibly aliasing rows stays scalar and branchy).
// Param is ScalarParam (the float API: one value, vectorises as before), RowParam (per-neuron
// values, the LIF neuron op) or ParamView (a value or per-neuron values, the recurrent layer);
// kSyn adds the synaptic current. Both ops instantiate these same loops.

// Compile-time dispatch of the reset kind.
template <class F>
inline void with_reset(int reset, F&& f) {
  switch (reset) {
    case kResetZero: return f(std::integral_constant<int, kResetZero>{});
    case kResetNone: return f(std::integral_constant<int, kResetNone>{});
    default: return f(std::integral_constant<int, kResetSubtract>{});
  }
}

// The neuron's parameters (alpha, threshold, alpha_syn) as views of one kind.
template <class Param>
struct NeuronParams {
  Param alpha, threshold, alpha_syn;
};

// One step of the leaky membrane for a row: (syn = synaptic(syn, I)), V = integrate(V, I or syn,
// S), S = fire(V), spikes out.
template <int kReset, bool kSyn, class Param, typename cur_t, typename scalar_t, typename acc_t>
inline void leaky_step_row(int64_t n, const cur_t* __restrict__ cur, acc_t* __restrict__ v,
                           acc_t* __restrict__ s, acc_t* __restrict__ syn,
                           scalar_t* __restrict__ spk, const NeuronParams<Param>& p) {
  for (int64_t j = 0; j < n; ++j) {
    acc_t in = static_cast<acc_t>(cur[j]);
    if constexpr (kSyn) {
      in = math::synaptic(syn[j], in, p.alpha_syn[j]);
      syn[j] = in;
    }
    const acc_t vj = math::integrate(v[j], in, s[j], p.alpha[j], p.threshold[j], kReset);
    const acc_t sj = math::fire(vj, p.threshold[j]);
    v[j] = vj;
    s[j] = sj;
    spk[j] = static_cast<scalar_t>(sj);
  }
}

// The forward-mode traces of a row (math::tangent_*), from the state of the previous step.
template <int kReset, bool kSyn, class Param, typename acc_t>
inline void tangent_row(int64_t n, const acc_t* __restrict__ v, const acc_t* __restrict__ s,
                        const acc_t* __restrict__ syn, acc_t* __restrict__ tp,
                        acc_t* __restrict__ tq, acc_t* __restrict__ tr, acc_t* __restrict__ tu,
                        const NeuronParams<Param>& p) {
  for (int64_t j = 0; j < n; ++j) {
    const acc_t a = p.alpha[j];
    tp[j] = math::tangent_alpha(tp[j], v[j], s[j], a, kReset);
    tq[j] = math::tangent_threshold(tq[j], s[j], a, kReset);
    if constexpr (kSyn) {
      tr[j] = math::tangent_syn(tr[j], syn[j], p.alpha_syn[j]);
      tu[j] = math::tangent_alpha_syn(tu[j], tr[j], s[j], a, kReset);
    }
  }
}

}  // namespace cpu
}  // namespace sparsegrad
