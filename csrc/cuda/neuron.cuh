// Kernels of the LIF neuron op (lif_neuron_forward / lif_neuron_backward): the neuron alone,
// driven by a given current [T, B, N]. One thread per (b, j) walks the time steps with its state
// in registers; consecutive threads are consecutive j, so every read and write of a [T, B, N]
// tensor is coalesced. Per-row work (compaction of the active set, scatter of the deltas, packing
// of the reset bits) takes one thread per row or per word, each writing only its own outputs: no
// float atomics anywhere, the results are the same bits on every run and equal the CPU kernel's.
#pragma once

#include "cuda/kernel_common.cuh"

namespace sparsegrad {
namespace cuda {

template <typename scalar_t>
struct NeuronForwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* current = nullptr;  // [T, B, N]
  int64_t T = 0, B = 0, N = 0;
  ParamView<acc_t> alpha{0, nullptr}, threshold{1, nullptr};  // one value, or one per neuron
  acc_t slope = 1;
  bool syn = false;                   // synaptic current syn = alpha_syn*syn + current
  ParamView<acc_t> alpha_syn{0, nullptr};
  const scalar_t* syn_init = nullptr; // [B, N] or null
  scalar_t* syn_final = nullptr;      // [B, N] (syn)
  bool track = false;                 // compute the forward-mode traces P, Q, R, U
  scalar_t* trace[3] = {nullptr, nullptr, nullptr};  // P, Q, U at every entry [T, B, N], or null
  scalar_t* tan_last = nullptr;       // [4, B, N]: P, Q, R, U after the last step (track)
  int surrogate = kFastSigmoid, reset = kResetSubtract;
  int dynamics = kChargeLeaky;        // SpikingJelly: charge kind, with tau and v_reset
  acc_t tau = 2, v_reset = 0;
  const scalar_t* v_init = nullptr;   // [B, N] or null
  const scalar_t* s_init = nullptr;
  scalar_t* spikes = nullptr;         // [T, B, N]
  scalar_t* v_final = nullptr;        // [B, N]
  scalar_t* mem = nullptr;            // [T, B, N] membrane trace (return_mem), or null
  acc_t* v_trace = nullptr;           // sparse mode: V (SpikingJelly: H) at every entry
  scalar_t* sg_dense = nullptr;       // dense mode: the surrogate at every entry
  scalar_t* rg_dense = nullptr;       // dense mode, detach_reset=False: the reset's gradient term
  int64_t* counts = nullptr;          // [spikes, (unused), nonzero currents], integer atomics
};

// The reset's own gradient term (SpikingJelly, detach_reset=False): soft -threshold*sg, hard
// (v_reset - H)*sg.
template <typename acc_t>
__device__ __forceinline__ acc_t sj_reset_term(acc_t h, acc_t sg, acc_t threshold, acc_t v_reset,
                                               int reset) {
  return reset == kResetZero ? (v_reset - h) * sg : -threshold * sg;
}

template <typename scalar_t>
__global__ void neuron_forward_kernel(NeuronForwardArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool leaky = a.dynamics == kChargeLeaky, hard = a.reset == kResetZero;
  SG_KERNEL_LOOP(k, a.B * a.N) {
    const int64_t b = k / a.N, j = k % a.N;
    const acc_t alpha = a.alpha[j], threshold = a.threshold[j], alpha_syn = a.alpha_syn[j];
    acc_t v = a.v_init ? static_cast<acc_t>(a.v_init[k]) : acc_t(0);
    acc_t s = a.s_init ? static_cast<acc_t>(a.s_init[k]) : acc_t(0);
    acc_t syn = a.syn_init ? static_cast<acc_t>(a.syn_init[k]) : acc_t(0);
    math::Tangents<acc_t> tan;  // P, Q, R, U (track)
    int64_t fired = 0, nonzero = 0;
    for (int64_t t = 0; t < a.T; ++t) {
      const int64_t at = (t * a.B + b) * a.N + j;
      const scalar_t cur = a.current[at];
      nonzero += cur != scalar_t(0);
      acc_t h;  // the membrane the spike is read from
      if (leaky) {
        if (a.track) tan.step(v, s, syn, alpha, alpha_syn, a.reset, a.syn);  // as tangent_row
        acc_t in = static_cast<acc_t>(cur);
        if (a.syn) {
          in = math::synaptic(syn, in, alpha_syn);
          syn = in;
        }
        v = math::integrate(v, in, s, alpha, threshold, a.reset);
        s = math::fire(v, threshold);
        h = v;
      } else {
        h = math::sj_charge(v, static_cast<acc_t>(cur), a.tau, a.v_reset, a.dynamics);
        s = math::sj_fire(h, threshold);
        v = math::sj_reset(h, s, threshold, a.v_reset, hard);
      }
      a.spikes[at] = static_cast<scalar_t>(s);
      fired += s > acc_t(0);
      if (a.mem) a.mem[at] = static_cast<scalar_t>(h);
      if (a.v_trace) a.v_trace[at] = h;
      if (a.trace[0]) a.trace[0][at] = static_cast<scalar_t>(tan.p);
      if (a.trace[1]) a.trace[1][at] = static_cast<scalar_t>(tan.q);
      if (a.trace[2]) a.trace[2][at] = static_cast<scalar_t>(tan.u);
      if (a.sg_dense) {
        const acc_t g = math::surrogate(h, threshold, a.slope, a.surrogate);
        a.sg_dense[at] = static_cast<scalar_t>(g);
        if (a.rg_dense)
          a.rg_dense[at] = static_cast<scalar_t>(sj_reset_term(h, g, threshold, a.v_reset, a.reset));
      }
    }
    a.v_final[k] = static_cast<scalar_t>(v);
    if (a.syn_final) a.syn_final[k] = static_cast<scalar_t>(syn);
    if (a.tan_last) {
      const int64_t bn = a.B * a.N;
      a.tan_last[k] = static_cast<scalar_t>(tan.p);
      a.tan_last[bn + k] = static_cast<scalar_t>(tan.q);
      a.tan_last[2 * bn + k] = static_cast<scalar_t>(tan.r);
      a.tan_last[3 * bn + k] = static_cast<scalar_t>(tan.u);
    }
    if (fired) atomic_add_count(a.counts, fired);
    if (nonzero) atomic_add_count(a.counts + 2, nonzero);
  }
}

// rst_bits [T, B, W]: word w of row (t, b) holds S[t-1, b, 32w .. 32w+31] (S[-1] = s_init), or
// with same_step (SpikingJelly) S[t, b, ...]. One thread per word reads the 32 spikes it packs.
template <typename scalar_t>
__global__ void neuron_pack_bits_kernel(const scalar_t* __restrict__ spikes,
                                        const scalar_t* __restrict__ s_init, int64_t T, int64_t B,
                                        int64_t N, int64_t W, bool same_step,
                                        int32_t* __restrict__ bits) {
  SG_KERNEL_LOOP(k, T * B * W) {
    const int64_t t = k / (B * W), b = (k / W) % B, w = k % W;
    const int64_t j0 = w * 32, j1 = j0 + 32 < N ? j0 + 32 : N;
    const scalar_t* src = same_step ? spikes + (t * B) * N
                                    : (t == 0 ? s_init : spikes + ((t - 1) * B) * N);
    uint32_t word = 0;
    if (src != nullptr)
      for (int64_t j = j0; j < j1; ++j)
        word |= static_cast<uint32_t>(src[b * N + j] > scalar_t(0)) << (j - j0);
    bits[k] = static_cast<int32_t>(word);
  }
}

// Active set, as a CSR over rows r = b*T + t: count (one thread per row), offsets (a device-wide
// scan between the launches), fill (one thread per row writes its own entries).
template <typename acc_t>
__global__ void neuron_active_count_kernel(const acc_t* __restrict__ v, int64_t T, int64_t B,
                                           int64_t N, ParamView<acc_t> threshold, acc_t b_th,
                                           int32_t* __restrict__ cnt) {
  SG_KERNEL_LOOP(r, B * T) {
    const int64_t b = r / T, t = r % T;
    const acc_t* row = v + (t * B + b) * N;
    int32_t count = 0;
    for (int64_t j = 0; j < N; ++j) count += math::is_active(row[j], threshold[j], b_th);
    cnt[r] = count;
  }
}

// Copies between the [T, B, N] layout and the active entries of the traces P, Q, U (each pair
// null when that trace is not kept).
template <typename scalar_t>
struct TraceCopy {
  const scalar_t* src[3] = {nullptr, nullptr, nullptr};
  scalar_t* dst[3] = {nullptr, nullptr, nullptr};
};

template <typename scalar_t, typename acc_t>
__global__ void neuron_active_fill_kernel(const acc_t* __restrict__ v, int64_t T, int64_t B,
                                          int64_t N, ParamView<acc_t> threshold, acc_t b_th,
                                          acc_t slope, int surrogate,
                                          const int64_t* __restrict__ offsets,
                                          int32_t* __restrict__ idx, scalar_t* __restrict__ sg,
                                          scalar_t* __restrict__ rg /* or null */, acc_t v_reset,
                                          int reset, TraceCopy<scalar_t> traces /* gather */) {
  SG_KERNEL_LOOP(r, B * T) {
    const int64_t b = r / T, t = r % T;
    const int64_t base = (t * B + b) * N;
    const acc_t* row = v + base;
    int64_t e = offsets[r];
    for (int64_t j = 0; j < N; ++j) {
      const acc_t th = threshold[j];
      if (math::is_active(row[j], th, b_th)) {
        const acc_t g = math::surrogate(row[j], th, slope, surrogate);
        idx[e] = static_cast<int32_t>(j);
        sg[e] = static_cast<scalar_t>(g);
        if (rg) rg[e] = static_cast<scalar_t>(sj_reset_term(row[j], g, th, v_reset, reset));
        for (int q = 0; q < 3; ++q)
          if (traces.dst[q]) traces.dst[q][e] = traces.src[q][base + j];
        ++e;
      }
    }
  }
}

// Sparse backward, step 1: delta = dL/dS * surrogate at each active entry, written into the
// (zeroed) gradient buffer [T, B, N]; with rg, the reset terms into a second zeroed buffer. One
// thread per row; every entry has one writer.
template <typename scalar_t>
__global__ void neuron_scatter_delta_kernel(const scalar_t* __restrict__ grad_spikes,
                                            const int64_t* __restrict__ offsets,
                                            const int32_t* __restrict__ idx,
                                            const scalar_t* __restrict__ sg,
                                            const scalar_t* __restrict__ rg, int64_t T, int64_t B,
                                            int64_t N, scalar_t* __restrict__ out,
                                            scalar_t* __restrict__ rg_out,
                                            TraceCopy<scalar_t> traces /* scatter */) {
  using acc_t = at::opmath_type<scalar_t>;
  SG_KERNEL_LOOP(r, B * T) {
    const int64_t b = r / T, t = r % T;
    const int64_t base = (t * B + b) * N;
    for (int64_t e = offsets[r]; e < offsets[r + 1]; ++e) {
      const int64_t at = base + idx[e];
      out[at] = static_cast<scalar_t>(static_cast<acc_t>(grad_spikes[at]) * static_cast<acc_t>(sg[e]));
      if (rg) rg_out[at] = rg[e];
      for (int q = 0; q < 3; ++q)
        if (traces.dst[q]) traces.dst[q][at] = traces.src[q][e];
    }
  }
}

template <typename scalar_t>
struct NeuronTraceArgs {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t T = 0, B = 0, N = 0, W = 0;
  ParamView<acc_t> alpha{0, nullptr};
  bool syn = false;                        // synaptic current: grad_current = G_I
  ParamView<acc_t> alpha_syn{0, nullptr};
  const scalar_t* grad_syn_final = nullptr;  // [B, N] or null
  scalar_t* dsyn_init = nullptr;           // [B, N] or null
  // parameter gradients: the traces P, Q, U [T, B, N] (null: zero), their last values
  // [4, B, N] (P, Q, R, U) and the outputs [B, N] (d_alpha, d_threshold, d_alpha_syn)
  bool track = false;
  const scalar_t* trace[3] = {nullptr, nullptr, nullptr};
  const scalar_t* tan_last = nullptr;
  scalar_t* dparam[3] = {nullptr, nullptr, nullptr};
  int reset = kResetSubtract;
  bool leaky = true;                       // false: SpikingJelly dynamics (reset in the step)
  acc_t input_scale = 1;                   // SpikingJelly decay_input: 1/tau
  const scalar_t* rg = nullptr;            // [T, B, N] reset gradient terms, or null
  const scalar_t* grad_v_final = nullptr;  // [B, N] or null
  const scalar_t* grad_mem = nullptr;      // [T, B, N] or null
  const int32_t* bits = nullptr;           // rst_bits (reset="zero") or null
  const scalar_t* grad_spikes = nullptr;   // dense mode: delta = grad_spikes * sg_dense
  const scalar_t* sg_dense = nullptr;
  scalar_t* grad_current = nullptr;        // [T, B, N]; sparse mode: holds the deltas on entry
  scalar_t* dv_init = nullptr;             // [B, N] or null
};

// Step 2 (both modes): G[t] = trace_decay(alpha, R[t+1]) G[t+1] + grad_mem[t] + delta[t], in the
// order the CPU kernel uses, written over the deltas.
template <typename scalar_t>
__global__ void neuron_trace_kernel(NeuronTraceArgs<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  SG_KERNEL_LOOP(k, a.B * a.N) {
    const int64_t b = k / a.N, j = k % a.N;
    const int64_t word = j >> 5;
    const uint32_t mask = uint32_t(1) << (j & 31);
    const acc_t alpha = a.alpha[j], alpha_syn = a.alpha_syn[j];
    acc_t g = a.grad_v_final ? static_cast<acc_t>(a.grad_v_final[k]) : acc_t(0);
    acc_t gi = a.grad_syn_final ? static_cast<acc_t>(a.grad_syn_final[k]) : acc_t(0);  // G_I (syn)
    acc_t da = 0, dth = 0, das = 0;
    auto trace = [&](int q, int64_t at) -> acc_t {
      return a.trace[q] ? static_cast<acc_t>(a.trace[q][at]) : acc_t(0);
    };
    if (a.track) {  // the last step's gradients, as the CPU kernel adds them first
      const int64_t bn = a.B * a.N;
      if (a.grad_v_final)
        math::param_grads(da, dth, das, g, static_cast<acc_t>(a.tan_last[k]),
                          static_cast<acc_t>(a.tan_last[bn + k]),
                          static_cast<acc_t>(a.tan_last[3 * bn + k]), false);
      if (a.grad_syn_final) das += gi * static_cast<acc_t>(a.tan_last[2 * bn + k]);
    }
    for (int64_t t = a.T - 1; t >= 0; --t) {
      const int64_t at = (t * a.B + b) * a.N + j;
      acc_t carry = 0;
      if (a.leaky) {
        if (t < a.T - 1) {
          const bool spiked =
              a.bits != nullptr && (static_cast<uint32_t>(a.bits[((t + 1) * a.B + b) * a.W + word]) & mask);
          g *= math::trace_decay(alpha, spiked, a.reset);
        }
      } else {
        if (t < a.T - 1) g *= alpha;
        carry = g;
        if (a.bits != nullptr && (static_cast<uint32_t>(a.bits[(t * a.B + b) * a.W + word]) & mask))
          g = acc_t(0);
      }
      if (a.grad_mem) {
        const acc_t gm = static_cast<acc_t>(a.grad_mem[at]);
        g += gm;
        if (a.track) math::param_grads(da, dth, das, gm, trace(0, at), trace(1, at), trace(2, at), false);
      }
      if (a.rg) g += carry * static_cast<acc_t>(a.rg[at]);
      const acc_t delta = a.sg_dense
                              ? static_cast<acc_t>(a.grad_spikes[at]) * static_cast<acc_t>(a.sg_dense[at])
                              : static_cast<acc_t>(a.grad_current[at]);
      g += delta;
      if (a.track && delta != acc_t(0))
        math::param_grads(da, dth, das, delta, trace(0, at), trace(1, at), trace(2, at), true);
      if (a.syn) {  // G_I[t] = G_V[t] + alpha_syn * G_I[t+1]
        if (t < a.T - 1) gi *= alpha_syn;
        gi += g;
        a.grad_current[at] = static_cast<scalar_t>(gi);
      } else {
        a.grad_current[at] = static_cast<scalar_t>(a.leaky ? g : g * a.input_scale);
      }
    }
    if (a.dv_init) {
      const bool spiked = a.leaky && a.bits != nullptr &&
                          (static_cast<uint32_t>(a.bits[b * a.W + word]) & mask);
      // with no time step V_final is V_init itself: dL/dV_init = grad_v_final
      a.dv_init[k] = static_cast<scalar_t>(a.T > 0 ? math::trace_decay(alpha, spiked, a.reset) * g : g);
    }
    if (a.dsyn_init) a.dsyn_init[k] = static_cast<scalar_t>(a.T > 0 ? alpha_syn * gi : gi);
    if (a.dparam[0]) a.dparam[0][k] = static_cast<scalar_t>(da);
    if (a.dparam[1]) a.dparam[1][k] = static_cast<scalar_t>(dth);
    if (a.dparam[2]) a.dparam[2][k] = static_cast<scalar_t>(das);
  }
}

}  // namespace cuda
}  // namespace sparsegrad
