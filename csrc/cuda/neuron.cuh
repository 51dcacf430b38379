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
  acc_t alpha = 0, threshold = 1, slope = 1;
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
    acc_t v = a.v_init ? static_cast<acc_t>(a.v_init[k]) : acc_t(0);
    acc_t s = a.s_init ? static_cast<acc_t>(a.s_init[k]) : acc_t(0);
    int64_t fired = 0, nonzero = 0;
    for (int64_t t = 0; t < a.T; ++t) {
      const int64_t at = (t * a.B + b) * a.N + j;
      const scalar_t cur = a.current[at];
      nonzero += cur != scalar_t(0);
      acc_t h;  // the membrane the spike is read from
      if (leaky) {
        v = math::integrate(v, static_cast<acc_t>(cur), s, a.alpha, a.threshold, a.reset);
        s = math::fire(v, a.threshold);
        h = v;
      } else {
        h = math::sj_charge(v, static_cast<acc_t>(cur), a.tau, a.v_reset, a.dynamics);
        s = math::sj_fire(h, a.threshold);
        v = math::sj_reset(h, s, a.threshold, a.v_reset, hard);
      }
      a.spikes[at] = static_cast<scalar_t>(s);
      fired += s > acc_t(0);
      if (a.mem) a.mem[at] = static_cast<scalar_t>(h);
      if (a.v_trace) a.v_trace[at] = h;
      if (a.sg_dense) {
        const acc_t g = math::surrogate(h, a.threshold, a.slope, a.surrogate);
        a.sg_dense[at] = static_cast<scalar_t>(g);
        if (a.rg_dense)
          a.rg_dense[at] = static_cast<scalar_t>(sj_reset_term(h, g, a.threshold, a.v_reset, a.reset));
      }
    }
    a.v_final[k] = static_cast<scalar_t>(v);
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
                                           int64_t N, acc_t threshold, acc_t b_th,
                                           int32_t* __restrict__ cnt) {
  SG_KERNEL_LOOP(r, B * T) {
    const int64_t b = r / T, t = r % T;
    const acc_t* row = v + (t * B + b) * N;
    int32_t count = 0;
    for (int64_t j = 0; j < N; ++j) count += math::is_active(row[j], threshold, b_th);
    cnt[r] = count;
  }
}

template <typename scalar_t, typename acc_t>
__global__ void neuron_active_fill_kernel(const acc_t* __restrict__ v, int64_t T, int64_t B,
                                          int64_t N, acc_t threshold, acc_t b_th, acc_t slope,
                                          int surrogate, const int64_t* __restrict__ offsets,
                                          int32_t* __restrict__ idx, scalar_t* __restrict__ sg,
                                          scalar_t* __restrict__ rg /* or null */, acc_t v_reset,
                                          int reset) {
  SG_KERNEL_LOOP(r, B * T) {
    const int64_t b = r / T, t = r % T;
    const acc_t* row = v + (t * B + b) * N;
    int64_t e = offsets[r];
    for (int64_t j = 0; j < N; ++j) {
      if (math::is_active(row[j], threshold, b_th)) {
        const acc_t g = math::surrogate(row[j], threshold, slope, surrogate);
        idx[e] = static_cast<int32_t>(j);
        sg[e] = static_cast<scalar_t>(g);
        if (rg) rg[e] = static_cast<scalar_t>(sj_reset_term(row[j], g, threshold, v_reset, reset));
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
                                            scalar_t* __restrict__ rg_out) {
  using acc_t = at::opmath_type<scalar_t>;
  SG_KERNEL_LOOP(r, B * T) {
    const int64_t b = r / T, t = r % T;
    const int64_t base = (t * B + b) * N;
    for (int64_t e = offsets[r]; e < offsets[r + 1]; ++e) {
      const int64_t at = base + idx[e];
      out[at] = static_cast<scalar_t>(static_cast<acc_t>(grad_spikes[at]) * static_cast<acc_t>(sg[e]));
      if (rg) rg_out[at] = rg[e];
    }
  }
}

template <typename scalar_t>
struct NeuronTraceArgs {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t T = 0, B = 0, N = 0, W = 0;
  acc_t alpha = 0;
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
    acc_t g = a.grad_v_final ? static_cast<acc_t>(a.grad_v_final[k]) : acc_t(0);
    for (int64_t t = a.T - 1; t >= 0; --t) {
      const int64_t at = (t * a.B + b) * a.N + j;
      acc_t carry = 0;
      if (a.leaky) {
        if (t < a.T - 1) {
          const bool spiked =
              a.bits != nullptr && (static_cast<uint32_t>(a.bits[((t + 1) * a.B + b) * a.W + word]) & mask);
          g *= math::trace_decay(a.alpha, spiked, a.reset);
        }
      } else {
        if (t < a.T - 1) g *= a.alpha;
        carry = g;
        if (a.bits != nullptr && (static_cast<uint32_t>(a.bits[(t * a.B + b) * a.W + word]) & mask))
          g = acc_t(0);
      }
      if (a.grad_mem) g += static_cast<acc_t>(a.grad_mem[at]);
      if (a.rg) g += carry * static_cast<acc_t>(a.rg[at]);
      if (a.sg_dense)
        g += static_cast<acc_t>(a.grad_spikes[at]) * static_cast<acc_t>(a.sg_dense[at]);
      else
        g += static_cast<acc_t>(a.grad_current[at]);
      a.grad_current[at] = static_cast<scalar_t>(a.leaky ? g : g * a.input_scale);
    }
    if (a.dv_init) {
      const bool spiked = a.leaky && a.bits != nullptr &&
                          (static_cast<uint32_t>(a.bits[b * a.W + word]) & mask);
      // with no time step V_final is V_init itself: dL/dV_init = grad_v_final
      a.dv_init[k] = static_cast<scalar_t>(a.T > 0 ? math::trace_decay(a.alpha, spiked, a.reset) * g : g);
    }
  }
}

}  // namespace cuda
}  // namespace sparsegrad
