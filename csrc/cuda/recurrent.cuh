// Kernels of the recurrent LIF layer (rlif_*), shared by nvcc and the host emulation.
//
// The recurrence couples every neuron of a batch element from one step to the next (S[t-1] R^T
// in the forward, G[t+1] R in the backward), and no barrier can order that across blocks. So both
// directions launch one kernel per time step over (b, j), one thread per neuron: step t reads
// only what the launch of the previous step wrote. (The compaction of the active set takes a warp
// per row, with ballots.)
//   forward step t:  V = integrate(V, I[t] + S[t-1] R^T, S[t-1]), S[t] = H(V - threshold); the
//                    spike sets bit j of spk_bits[t, b] (integer atomicOr: exact in any order).
//   backward step t: G[t] = d[t]*G[t+1] + sg*(e + G[t+1] . R[:, j]) at active entries (the dot
//                    only there), G[t] = d[t]*G[t+1] elsewhere, into a [T, B, N] scratch buffer
//                    of the backward (nothing dense is saved by the forward).
// The gradients then come from G by segment sums (dW: input events grouped by input; dR: each
// neuron's spike bits scanned row by row), one writer per output element in a fixed order
// (deterministic, no float atomics), dot products on the producer's active set, and ATen
// reductions / GEMMs.
#pragma once

#include "cuda/forward.cuh"  // InputCurrent

namespace sparsegrad {
namespace cuda {

// Index of the lowest set bit of m != 0.
__device__ __forceinline__ int lowest_bit(uint32_t m) {
#if defined(__CUDA_ARCH__)
  return __ffs(static_cast<int>(m)) - 1;
#else
  return __builtin_ctz(m);
#endif
}


// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------
// Param: ScalarParam (the float API, rlif_forward) or ParamView (rlif_param_forward: per-neuron
// alpha / threshold, the synaptic current and the forward-mode traces P, Q, R, U of lif_math.h).
template <typename scalar_t, typename Param = ScalarParam<at::opmath_type<scalar_t>>>
struct RlifStepArgs {
  using acc_t = at::opmath_type<scalar_t>;
  InputCurrent<scalar_t> current;
  int64_t T = 0, B = 0, n = 0, words = 0;
  Param alpha{}, threshold{};
  acc_t slope = 1;
  int surrogate = kFastSigmoid, reset = kResetSubtract;
  const scalar_t* rec_t = nullptr;   // [N, N]: row i = R[:, i]
  const scalar_t* s_init = nullptr;  // [B, N] or null
  acc_t* v = nullptr;                // [B, N] membrane state, initialised by the host
  scalar_t* spikes = nullptr;        // [T, B, N]
  int32_t* bits = nullptr;           // [T, B, words], zeroed
  acc_t* v_trace = nullptr;          // sparse mode: V at every (t, b, j), for the compaction
  scalar_t* sg_dense = nullptr;      // dense mode: the surrogate at every (t, b, j)
  // rlif_param_forward only (null: absent)
  Param alpha_syn{};
  acc_t* syn = nullptr;              // [B, N] synaptic current state, initialised by the host
  acc_t* tan = nullptr;              // [4, B, N] traces P, Q, R, U (zeroed), when tracked
  scalar_t* trace[3] = {nullptr, nullptr, nullptr};  // P, Q, U at every (t, b, j), when kept
};

template <typename scalar_t, typename Param>
__global__ void rlif_forward_step_kernel(RlifStepArgs<scalar_t, Param> a, int64_t t) {
  using acc_t = at::opmath_type<scalar_t>;
  SG_KERNEL_LOOP(k, a.B * a.n) {
    const int64_t b = k / a.n, j = k % a.n;
    const acc_t alpha = a.alpha[j], threshold = a.threshold[j];
    acc_t cur = a.current(b, t, j);
    acc_t s_prev = 0;
    // S[t-1] R^T in ascending order of the spiking neuron, as the CPU kernel adds it
    if (t == 0) {
      if (a.s_init) {
        s_prev = static_cast<acc_t>(a.s_init[k]);
        for (int64_t i = 0; i < a.n; ++i) {
          const acc_t si = static_cast<acc_t>(a.s_init[b * a.n + i]);
          if (si != acc_t(0)) cur += si * static_cast<acc_t>(a.rec_t[i * a.n + j]);
        }
      }
    } else {
      const int32_t* row = a.bits + ((t - 1) * a.B + b) * a.words;
      s_prev = bit_set(row, j) ? acc_t(1) : acc_t(0);
      for (int64_t w = 0; w < a.words; ++w)
        for (uint32_t m = static_cast<uint32_t>(row[w]); m != 0; m &= m - 1)
          cur += static_cast<acc_t>(a.rec_t[(w * 32 + lowest_bit(m)) * a.n + j]);
    }
    const int64_t at = (t * a.B + b) * a.n + j;
    if (a.tan) {  // from the previous step's state, as the CPU's tangent_row
      const int64_t bn = a.B * a.n;
      math::Tangents<acc_t> tan{a.tan[k], a.tan[bn + k], a.tan[2 * bn + k], a.tan[3 * bn + k]};
      tan.step(a.v[k], s_prev, a.syn ? a.syn[k] : acc_t(0), alpha, a.alpha_syn[j], a.reset,
               a.syn != nullptr);
      a.tan[k] = tan.p;
      a.tan[bn + k] = tan.q;
      a.tan[2 * bn + k] = tan.r;
      a.tan[3 * bn + k] = tan.u;
      const acc_t kept[3] = {tan.p, tan.q, tan.u};
      for (int q = 0; q < 3; ++q)
        if (a.trace[q]) a.trace[q][at] = static_cast<scalar_t>(kept[q]);
    }
    if (a.syn) {
      cur = math::synaptic(a.syn[k], cur, a.alpha_syn[j]);
      a.syn[k] = cur;
    }
    const acc_t v = math::integrate(a.v[k], cur, s_prev, alpha, threshold, a.reset);
    const acc_t s = math::fire(v, threshold);
    a.v[k] = v;
    a.spikes[at] = static_cast<scalar_t>(s);
    if (s > acc_t(0))
      atomicOr(reinterpret_cast<unsigned int*>(a.bits + (t * a.B + b) * a.words + (j >> 5)),
               1u << (j & 31));
    if (a.v_trace) a.v_trace[at] = v;
    if (a.sg_dense)
      a.sg_dense[at] = static_cast<scalar_t>(math::surrogate(v, threshold, a.slope, a.surrogate));
  }
}

// Active set from the membrane trace: per-row int32 counts here, then (after a scan) the entries
// by compaction.cuh's active_fill_kernel; one warp per row with ballots (coalesced reads; the same
// CSR, ascending j).
template <typename acc_t>
__global__ void rlif_active_count_kernel(const acc_t* __restrict__ v, int64_t T, int64_t B, int64_t n,
                                         acc_t threshold, acc_t b_th, int32_t* __restrict__ cnt) {
  SG_WARP_LOOP(r, B * T) {
    const int64_t b = r / T, t = r % T;
    const acc_t* row = v + (t * B + b) * n;
    int32_t count = 0;
    for (int64_t j0 = 0; j0 < n; j0 += kWarp) {
      const int64_t j = j0 + lane_id();
      const bool active = j < n && math::is_active(row[j], threshold, b_th);
      count += __popc(__ballot_sync(kFullMask, active));
    }
    if (lane_id() == 0) cnt[r] = count;
  }
}

// ---------------------------------------------------------------------------------------------
// Backward: the reverse walk, one launch per step
// ---------------------------------------------------------------------------------------------
// Where sg is nonzero and which neurons spiked. Sparse: the active set (CSR over b*T + t, sorted
// within a row) and spk_bits; dense: sg and the spikes at every entry.
template <typename scalar_t>
struct RlifEntries {
  const int64_t* act_off = nullptr;  // sparse
  const int32_t* act_idx = nullptr;
  const scalar_t* act_sg = nullptr;
  const int32_t* bits = nullptr;
  int64_t words = 0;
  const scalar_t* sg = nullptr;      // dense [T, B, N]
  const scalar_t* spikes = nullptr;  // dense [T, B, N]

  // The surrogate at (t, b, j) if the entry carries gradient, and where its values are stored
  // (the active entry's index, or the [T, B, N] offset in dense mode): the forward's traces P, Q, U
  // are laid out the same way.
  __device__ __forceinline__ bool surrogate_at(int64_t b, int64_t t, int64_t j, int64_t T, int64_t B,
                                               int64_t n, scalar_t* value, int64_t* where) const {
    if (sg) {
      *where = (t * B + b) * n + j;
      *value = sg[*where];
      return true;
    }
    const int64_t r = b * T + t, hi = act_off[r + 1];
    const int64_t e = lower_bound(act_idx, act_off[r], hi, j);
    if (e == hi || int64_t(act_idx[e]) != j) return false;
    *where = e;
    *value = act_sg[e];
    return true;
  }

  __device__ __forceinline__ bool spiked(int64_t b, int64_t t, int64_t j, int64_t B, int64_t n) const {
    if (spikes) return spikes[(t * B + b) * n + j] > scalar_t(0);
    return bit_set(bits + (t * B + b) * words, j);
  }
};

// Param as in the forward. With a synaptic current the walk keeps two gradients, as the CPU's:
// G_V = dL/dV (its decay forms the recurrence, it meets the traces) in a [B, N] state, and
// G_I = dL/dI = G_V[t] + alpha_syn*G_I[t+1] in G, which the input, the recurrent spikes and the
// bias receive; without one G_I is G_V.
template <typename scalar_t, typename Param = ScalarParam<at::opmath_type<scalar_t>>>
struct RlifBackStepArgs {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t T = 0, B = 0, n = 0;
  Param alpha{};
  int reset = kResetSubtract;
  RlifEntries<scalar_t> entries;
  const scalar_t* grad = nullptr;    // dL/dS [T, B, N]
  const scalar_t* g_init = nullptr;  // dL/dV_final [B, N] or null
  const scalar_t* rec = nullptr;     // R [N, N]: column j = what neuron j's spike fed
  acc_t* G = nullptr;                // [T, B, N]: G_I
  // rlif_param_backward_* only (null: absent)
  Param alpha_syn{};
  const scalar_t* g_syn = nullptr;   // dL/dsyn_final [B, N] or null
  acc_t* gv = nullptr;               // [B, N]: G_V of the last step walked (synaptic current)
  acc_t* dparam = nullptr;           // [3, B, N]: d_alpha, d_threshold, d_alpha_syn so far
  const scalar_t* trace[3] = {nullptr, nullptr, nullptr};  // P, Q, U laid out as the surrogate
};

// The parameter gradients that arrive with the final state (dL/dV_final, dL/dsyn_final meet the
// last step's traces), before the walk; the walk's steps add the rest, t = T-1 .. 0, as the CPU.
template <typename scalar_t, typename Param>
__global__ void rlif_param_grads_init_kernel(RlifBackStepArgs<scalar_t, Param> a,
                                             const scalar_t* __restrict__ tan_last) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t bn = a.B * a.n;
  SG_KERNEL_LOOP(k, bn) {
    acc_t da = 0, dth = 0, das = 0;
    if (a.g_init)
      math::param_grads(da, dth, das, static_cast<acc_t>(a.g_init[k]), static_cast<acc_t>(tan_last[k]),
                        static_cast<acc_t>(tan_last[bn + k]), static_cast<acc_t>(tan_last[3 * bn + k]),
                        false);
    if (a.g_syn) das += static_cast<acc_t>(a.g_syn[k]) * static_cast<acc_t>(tan_last[2 * bn + k]);
    a.dparam[k] = da;
    a.dparam[bn + k] = dth;
    a.dparam[2 * bn + k] = das;
  }
}

template <typename scalar_t, typename Param>
__global__ void rlif_backward_step_kernel(RlifBackStepArgs<scalar_t, Param> a, int64_t t) {
  using acc_t = at::opmath_type<scalar_t>;
  SG_KERNEL_LOOP(k, a.B * a.n) {
    const int64_t b = k / a.n, j = k % a.n;
    const bool carry = t < a.T - 1;
    const acc_t* next = a.G + ((t + 1) * a.B + b) * a.n;  // G_I[t+1, b, :] (read only if carry)
    acc_t g;  // G_V[t]
    if (carry) {
      const acc_t g_next = a.gv ? a.gv[k] : next[j];
      g = math::trace_decay(a.alpha[j], a.entries.spiked(b, t, j, a.B, a.n), a.reset) * g_next;
    } else {
      g = a.g_init ? static_cast<acc_t>(a.g_init[k]) : acc_t(0);
    }
    scalar_t sg;
    int64_t where;
    if (a.entries.surrogate_at(b, t, j, a.T, a.B, a.n, &sg, &where)) {
      acc_t u = 0;
      if (carry)
        for (int64_t q = 0; q < a.n; ++q) u += next[q] * static_cast<acc_t>(a.rec[q * a.n + j]);
      const acc_t e = static_cast<acc_t>(a.grad[(t * a.B + b) * a.n + j]);
      const acc_t delta = static_cast<acc_t>(sg) * (e + u);
      g = g + delta;
      if (a.dparam) {
        const int64_t bn = a.B * a.n;
        auto trace = [&](int q) { return a.trace[q] ? static_cast<acc_t>(a.trace[q][where]) : acc_t(0); };
        math::param_grads(a.dparam[k], a.dparam[bn + k], a.dparam[2 * bn + k], delta, trace(0),
                          trace(1), trace(2), true);
      }
    }
    if (a.gv) {  // G_I[t] = G_V[t] + alpha_syn * G_I[t+1] (dL/dsyn_final at the last step)
      const acc_t gi_next = carry ? a.alpha_syn[j] * next[j]
                                  : (a.g_syn ? static_cast<acc_t>(a.g_syn[k]) : acc_t(0));
      a.gv[k] = g;
      g = gi_next + g;
    }
    a.G[(t * a.B + b) * a.n + j] = g;
  }
}

// dR^T[i, k] = sum over rows r = t*B + b, t < T-1, with S[t, b, i] = 1 of G[t+1, b, k] (row r + B
// of G). One thread per (i, k) scans neuron i's bit in each row: the threads of a warp share i,
// so each row costs one broadcast word load, and only spikes add a (coalesced) G value. No spike
// list, so no host synchronisation to size one; a fixed order, one writer: deterministic.
template <typename scalar_t>
__global__ void rlif_drec_kernel(const int32_t* __restrict__ bits, int64_t rows, int64_t words,
                                 int64_t B, int64_t n, const at::opmath_type<scalar_t>* __restrict__ G,
                                 at::opmath_type<scalar_t>* __restrict__ drec_t) {
  using acc_t = at::opmath_type<scalar_t>;
  SG_KERNEL_LOOP(q, n * n) {
    const int64_t i = q / n, k = q % n;
    const int32_t* column = bits + (i >> 5);
    const uint32_t mask = 1u << (i & 31);
    acc_t sum = 0;
    for (int64_t r = 0; r < rows; ++r)
      if (static_cast<uint32_t>(column[r * words]) & mask) sum += G[(r + B) * n + k];
    drec_t[q] = sum;
  }
}

// out[c, k] = sum over the entries e of column c (rows[off[c]] .. rows[off[c+1]-1], in order) of
// val[e] * G[g_row[e], k]: dW^T (input events grouped by input).
// One thread per (c, k): a single writer per output, a fixed order, consecutive k coalesced.
template <typename scalar_t>
__global__ void rlif_column_sum_kernel(const int64_t* __restrict__ off, const int64_t* __restrict__ g_row,
                                       const scalar_t* __restrict__ val, int64_t cols, int64_t n,
                                       const at::opmath_type<scalar_t>* __restrict__ G,
                                       at::opmath_type<scalar_t>* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  SG_KERNEL_LOOP(q, cols * n) {
    const int64_t c = q / n, k = q % n;
    acc_t sum = 0;
    for (int64_t e = off[c]; e < off[c + 1]; ++e) {
      const acc_t g = G[g_row[e] * n + k];
      sum += val ? static_cast<acc_t>(val[e]) * g : g;
    }
    out[q] = sum;
  }
}

// dx[t, b, i] = G[t, b, :] . W[:, i] on the producer's active set (entry e in row r = b*T + t).
template <typename scalar_t>
__global__ void rlif_dx_restricted_kernel(const int64_t* __restrict__ entry_row,
                                          const int32_t* __restrict__ prev_idx, int64_t entries,
                                          int64_t T, int64_t B, int64_t n, int64_t n_in,
                                          const at::opmath_type<scalar_t>* __restrict__ G,
                                          const scalar_t* __restrict__ weight,
                                          at::opmath_type<scalar_t>* __restrict__ dx) {
  using acc_t = at::opmath_type<scalar_t>;
  SG_KERNEL_LOOP(e, entries) {
    const int64_t r = entry_row[e], b = r / T, t = r % T, i = prev_idx[e];
    const acc_t* g = G + (t * B + b) * n;
    acc_t sum = 0;
    for (int64_t k = 0; k < n; ++k) sum += g[k] * static_cast<acc_t>(weight[k * n_in + i]);
    dx[(t * B + b) * n_in + i] = sum;
  }
}

}  // namespace cuda
}  // namespace sparsegrad
