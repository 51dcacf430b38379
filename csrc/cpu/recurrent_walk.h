// The recurrent LIF layer on the CPU: the forward recurrence and the reverse walks of its
// backward (docs/design.md, "Recurrent layers").
//
//     V[t] = alpha*V[t-1] + x[t] W^T + b + S[t-1] R^T  (- threshold*S[t-1] | zero | none reset)
//     G[t] = d[t]*G[t+1] + sg[t] * (e[t] + G[t+1] R)     d[t] = trace_decay(alpha, S[t], reset)
//
// Per batch element the walk keeps G [N] (the gradient at V of one step) and, going back in time,
//   - delta = sg * (e + G[t+1] . R[:, j])  at each active (t, b, j)  (|A| * N)
//   - G = d * G + delta, db += G                                   (N per live step)
//   - dx[t, b, i] = G[t] . W[:, i] on the producer's active set     (|A_prev| * N)
//     or everywhere through the input-space trace D[t] = G[t] W     (|A| * N_in + T*B*N_in)
// and stores G[t] in a [T, N] buffer; after the walk, from that buffer,
//   - dW^T[i, :] += x * G[t]      over the element's input events (t, i)   (nnz * N)
//   - dR^T[i, :] += G[t+1]        over the element's spikes (t, i)         (#spikes * N)
// summed per input / neuron in registers (add_row_sums). Batch elements are grouped in fixed
// chunks (BatchChunks); each chunk sums into its own partial dW, dR, db, added up in chunk order:
// results do not depend on the number of threads.
#pragma once

#include <type_traits>

#include "cpu/neuron_rows.h"     // with_reset, leaky_step_row, tangent_row
#include "cpu/trace_backward.h"  // TileVec, tile_lanes, kTileGroup, events_by_input

namespace sparsegrad {
namespace cpu {

// Visits the set bits of a bit-packed row in ascending order: fn(j).
template <typename Fn>
inline void for_each_bit(const int32_t* row, int64_t words, const Fn& fn) {
  for (int64_t w = 0; w < words; ++w)
    for (uint32_t m = static_cast<uint32_t>(row[w]); m != 0; m &= m - 1)
      fn(w * 32 + __builtin_ctz(m));
}


// Tensor parameters (issue 18): the kernels are templates over the parameter view (lif_math.h).
// ScalarParam is the float API (the loops vectorise as before); with ParamView (per-neuron
// alpha, threshold, and alpha_syn for the synaptic current) the forward also runs the traces
// P = dV/dalpha, Q = -dV/dthreshold, R = dsyn/dalpha_syn, U = dV/dalpha_syn (math::tangent_*)
// and keeps P, Q, U per active entry (dense mode: everywhere) and P, Q, R, U after the last step;
// the backwards add math::param_grads where they form delta (docs/design.md, "Tensor parameters
// and the synaptic current of the recurrent layer"). is_param_view: lif_math.h.

// ------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------
template <typename scalar_t, typename Param = ScalarParam<at::opmath_type<scalar_t>>>
struct RlifForward {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t T = 0, B = 0, n = 0, words = 0;
  Param alpha{}, threshold{}, alpha_syn{};
  acc_t b_th = 1, slope = 1;
  int surrogate = kFastSigmoid, reset = kResetSubtract;
  const scalar_t* rec_t = nullptr;  // [N, N]: row i = R[:, i], the current spike i adds
  const scalar_t* v_init = nullptr;
  const scalar_t* s_init = nullptr;
  scalar_t* spikes = nullptr;   // [T, B, N]
  scalar_t* v_final = nullptr;  // [B, N]
  int32_t* bits = nullptr;      // [T, B, words], zeroed
  scalar_t* sg_dense = nullptr; // dense mode: [T, B, N]
  bool sparse = true;
  // ParamView only:
  bool syn = false;                  // synaptic current (alpha_syn given)
  const scalar_t* syn_init = nullptr;  // [B, N] or null
  scalar_t* syn_final = nullptr;     // [B, N] (syn)
  bool keep_traces = false;          // save the traces (some parameter needs its gradient)
  scalar_t* trace_dense[3] = {nullptr, nullptr, nullptr};  // dense mode: P, Q, U [T, B, N]
  scalar_t* tan_last = nullptr;      // P, Q, R, U after the last step [4, B, N]
};

// ParamView: one element's synaptic current, traces P, Q, R, U and, in sparse mode, P, Q, U per
// active entry (in act_idx's order).
template <typename scalar_t>
struct RlifTraces {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> syn, tan[4];  // [N] each: P, Q, R, U
  std::vector<scalar_t> act[3];    // P, Q, U
};

// Runs element b; appends its active entries (t, j order) to act_idx / act_sg and writes the
// per-row counts act_cnt[b*T + t]. Returns the number of spikes.
// (ParamView: tr holds the element's synaptic current and traces, see RlifTraces.)
template <typename scalar_t, typename Param>
int64_t rlif_forward_element(const RlifForward<scalar_t, Param>& a, const InputCurrent<scalar_t>& current,
                             int64_t b, std::vector<int32_t>& act_idx, std::vector<scalar_t>& act_sg,
                             int32_t* act_cnt, std::vector<at::opmath_type<scalar_t>>& v,
                             std::vector<at::opmath_type<scalar_t>>& s,
                             std::vector<at::opmath_type<scalar_t>>& cur,
                             std::vector<int32_t>& fired, RlifTraces<scalar_t>* tr = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kTraces = is_param_view<Param>();
  const int64_t T = a.T, B = a.B, n = a.n;
  const NeuronParams<Param> prm{a.alpha, a.threshold, a.alpha_syn};
  acc_t* syn = nullptr;
  acc_t* tan[4] = {nullptr, nullptr, nullptr, nullptr};
  if constexpr (kTraces) {
    tr->syn.assign(a.syn ? n : 0, acc_t(0));
    syn = tr->syn.data();
    if (a.syn && a.syn_init)
      for (int64_t j = 0; j < n; ++j) syn[j] = static_cast<acc_t>(a.syn_init[b * n + j]);
    for (int k = 0; k < 4; ++k) {
      tr->tan[k].assign(n, acc_t(0));
      tan[k] = tr->tan[k].data();
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    v[j] = a.v_init ? static_cast<acc_t>(a.v_init[b * n + j]) : acc_t(0);
    s[j] = a.s_init ? static_cast<acc_t>(a.s_init[b * n + j]) : acc_t(0);
  }
  int64_t count = 0;
  fired.clear();
  for (int64_t t = 0; t < T; ++t) {
    current.fill(b, t, cur.data());
    // The recurrent input S[t-1] R^T, spike by spike in ascending neuron order (the CUDA kernel
    // adds in the same order). At t = 0 it comes from s_init, which may hold any value.
    if (t == 0) {
      if (a.s_init)
        for (int64_t i = 0; i < n; ++i) {
          const acc_t si = s[i];
          if (si != acc_t(0)) {
            const scalar_t* r = a.rec_t + i * n;
            for (int64_t j = 0; j < n; ++j) cur[j] += si * static_cast<acc_t>(r[j]);
          }
        }
    } else {
      for (const int32_t i : fired) {
        const scalar_t* r = a.rec_t + int64_t(i) * n;
        for (int64_t j = 0; j < n; ++j) cur[j] += static_cast<acc_t>(r[j]);
      }
    }
    const int64_t row = (t * B + b) * n;
    // the reset (and the synaptic current) as constants, so that the row loops vectorise; the
    // traces from the previous step's state, before the membrane step
    with_reset(a.reset, [&](auto kind) {
      constexpr int kReset = decltype(kind)::value;
      if constexpr (kTraces) {
        if (a.syn) {
          tangent_row<kReset, true>(n, v.data(), s.data(), syn, tan[0], tan[1], tan[2], tan[3], prm);
          leaky_step_row<kReset, true>(n, cur.data(), v.data(), s.data(), syn, a.spikes + row, prm);
          return;
        }
        tangent_row<kReset, false>(n, v.data(), s.data(), syn, tan[0], tan[1], tan[2], tan[3], prm);
      }
      leaky_step_row<kReset, false>(n, cur.data(), v.data(), s.data(), syn, a.spikes + row, prm);
    });
    // Spikes and active entries 32 neurons at a time as bit masks (branch-free compares that
    // vectorise), then only the set bits are visited: the spike word is spk_bits' word.
    fired.clear();
    int32_t* word = a.bits + (t * B + b) * a.words;
    const size_t active_before = act_idx.size();
    for (int64_t w = 0; w < a.words; ++w) {
      const int64_t j0 = w * 32, len = std::min<int64_t>(32, n - j0);
      uint32_t spiked = 0, active = 0;
      for (int64_t k = 0; k < len; ++k) {
        spiked |= static_cast<uint32_t>(s[j0 + k] > acc_t(0)) << k;
        active |= static_cast<uint32_t>(math::is_active(v[j0 + k], a.threshold[j0 + k], a.b_th)) << k;
      }
      word[w] = static_cast<int32_t>(spiked);
      for (uint32_t m = spiked; m != 0; m &= m - 1) fired.push_back(static_cast<int32_t>(j0 + __builtin_ctz(m)));
      if (a.sparse) {
        for (uint32_t m = active; m != 0; m &= m - 1) {
          const int64_t j = j0 + __builtin_ctz(m);
          act_idx.push_back(static_cast<int32_t>(j));
          act_sg.push_back(static_cast<scalar_t>(math::surrogate(v[j], a.threshold[j], a.slope, a.surrogate)));
          if (kTraces && a.keep_traces) {
            tr->act[0].push_back(static_cast<scalar_t>(tan[0][j]));
            tr->act[1].push_back(static_cast<scalar_t>(tan[1][j]));
            if (a.syn) tr->act[2].push_back(static_cast<scalar_t>(tan[3][j]));
          }
        }
      }
    }
    count += static_cast<int64_t>(fired.size());
    if (a.sparse) {
      act_cnt[b * T + t] = static_cast<int32_t>(act_idx.size() - active_before);
    } else {
      for (int64_t j = 0; j < n; ++j)
        a.sg_dense[row + j] = static_cast<scalar_t>(math::surrogate(v[j], a.threshold[j], a.slope, a.surrogate));
      if (kTraces && a.keep_traces)
        for (int k = 0; k < 3; ++k)
          if (a.trace_dense[k])
            for (int64_t j = 0; j < n; ++j)
              a.trace_dense[k][row + j] = static_cast<scalar_t>(tan[k < 2 ? k : 3][j]);
    }
  }
  for (int64_t j = 0; j < n; ++j) a.v_final[b * n + j] = static_cast<scalar_t>(v[j]);
  if (kTraces && a.syn)
    for (int64_t j = 0; j < n; ++j) a.syn_final[b * n + j] = static_cast<scalar_t>(syn[j]);
  if (kTraces && a.keep_traces)
    for (int k = 0; k < 4; ++k)
      for (int64_t j = 0; j < n; ++j) a.tan_last[(k * B + b) * n + j] = static_cast<scalar_t>(tan[k][j]);
  return count;
}

// ------------------------------------------------------------------------------------------
// Sparse backward
// ------------------------------------------------------------------------------------------
// ParamView: what the backward walks add to the float API's: the synaptic current (syn:
// alpha_syn, dL/dsyn_final [B, N] or null), the forward's traces P, Q, U (per active entry in the
// sparse walk, at every entry [T, B, N] in the dense one; U only with syn) and P, Q, R, U after
// the last step (tan_last [4, B, N]), and the outputs: the parameter gradients per batch element
// d_param = d_alpha, d_threshold, d_alpha_syn [B, N] (d_param[0] null: none wanted; d_param[2]
// null without syn), dL/dsyn_init (sparse walk) and G_V[0] (dense walk) [B, N] or null.
template <typename scalar_t, typename Param>
struct RlifParamIO {
  Param alpha_syn{};
  bool syn = false;
  const scalar_t* g_syn = nullptr;
  const scalar_t* trace[3] = {nullptr, nullptr, nullptr};
  const scalar_t* tan_last = nullptr;
  scalar_t* d_param[3] = {nullptr, nullptr, nullptr};
  scalar_t* dsyn = nullptr;
  scalar_t* gv0 = nullptr;
};

template <typename scalar_t, typename Param = ScalarParam<at::opmath_type<scalar_t>>>
struct RlifBackward {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t T = 0, B = 0, n_in = 0, n = 0, words = 0;
  Param alpha{};
  int reset = kResetSubtract;
  const scalar_t* grad = nullptr;      // dL/dS [T, B, N]
  const scalar_t* g_init = nullptr;    // dL/dV_final [B, N] or null
  const int64_t* act_off = nullptr;    // active set, CSR over b*T + t
  const int32_t* act_idx = nullptr;
  const scalar_t* act_sg = nullptr;
  EventView<scalar_t> events;          // input events
  const int32_t* bits = nullptr;       // S[t] [T, B, words]
  const scalar_t* s_init = nullptr;    // [B, N] or null
  const scalar_t* rec_t = nullptr;     // [N, N]: row j = R[:, j]
  const scalar_t* weight = nullptr;    // [N, N_in]: full dx
  const scalar_t* weight_t = nullptr;  // [N_in, N]: dx on the producer's active set
  const int64_t* prev_off = nullptr;   // producer's active set, or null (then dx everywhere)
  const int32_t* prev_idx = nullptr;
  // outputs (null = not wanted)
  scalar_t* dx = nullptr;         // [T, B, N_in], zeroed
  scalar_t* dv = nullptr;         // [B, N]
  scalar_t* ds = nullptr;         // [B, N]
  // dW^T and dR^T partial sums per batch chunk, rows padded to whole tiles (n_pad = tiles * L,
  // 64-byte aligned), zeroed: [chunks, N_in, n_pad] and [chunks, N, n_pad]
  acc_t* dw_t_parts = nullptr;
  acc_t* drec_t_parts = nullptr;
  acc_t* db_parts = nullptr;      // [chunks, N], zeroed
  RlifParamIO<scalar_t, Param> prm;  // ParamView: synaptic current, traces, parameter gradients
};

// Rows of the dW^T / dR^T partials: N rounded up to whole SIMD tiles (trace_backward.h).
template <typename acc_t>
inline int64_t padded_row(int64_t n) {
  constexpr int64_t L = tile_lanes<acc_t>();
  return (n + L - 1) / L * L;
}

// For each row i (an input, or a spiking neuron) of one batch element: the sum of val * G[t]
// over the row's times t (ascending, t <= t_max), for R tiles side by side in registers, added to
// out[i, tiles k0 .. k0+R-1] once. G rows and out rows are `stride` vectors apart.
template <int R, typename acc_t, typename scalar_t, typename vec>
void add_row_sums(const vec* G, int64_t stride, const int64_t* ptr, const int32_t* times,
                  const scalar_t* values, int64_t rows, int64_t t_max, vec* out) {
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t q0 = ptr[i], q1 = ptr[i + 1];
    if (q0 == q1 || times[q0] > t_max) continue;
    vec sum[R] = {};
    for (int64_t q = q0; q < q1 && times[q] <= t_max; ++q) {
      const vec* row = G + int64_t(times[q]) * stride;
      if (values) {
        const acc_t v = static_cast<acc_t>(values[q]);
        SG_UNROLL_8
        for (int r = 0; r < R; ++r) sum[r] += v * row[r];
      } else {
        SG_UNROLL_8
        for (int r = 0; r < R; ++r) sum[r] += row[r];
      }
    }
    SG_UNROLL_8
    for (int r = 0; r < R; ++r) out[i * stride + r] += sum[r];
  }
}

// add_row_sums over all tiles, in groups of up to kTileGroup.
template <typename acc_t, typename scalar_t, typename vec>
void add_row_sums_all(const vec* G, int64_t tiles, const int64_t* ptr, const int32_t* times,
                      const scalar_t* values, int64_t rows, int64_t t_max, vec* out) {
  for (int64_t k = 0; k < tiles; k += kTileGroup) {
    const vec* g = G + k;
    vec* o = out + k;
    switch (std::min<int64_t>(kTileGroup, tiles - k)) {
      case 8: add_row_sums<8, acc_t>(g, tiles, ptr, times, values, rows, t_max, o); break;
      case 7: add_row_sums<7, acc_t>(g, tiles, ptr, times, values, rows, t_max, o); break;
      case 6: add_row_sums<6, acc_t>(g, tiles, ptr, times, values, rows, t_max, o); break;
      case 5: add_row_sums<5, acc_t>(g, tiles, ptr, times, values, rows, t_max, o); break;
      case 4: add_row_sums<4, acc_t>(g, tiles, ptr, times, values, rows, t_max, o); break;
      case 3: add_row_sums<3, acc_t>(g, tiles, ptr, times, values, rows, t_max, o); break;
      case 2: add_row_sums<2, acc_t>(g, tiles, ptr, times, values, rows, t_max, o); break;
      default: add_row_sums<1, acc_t>(g, tiles, ptr, times, values, rows, t_max, o); break;
    }
  }
}

template <typename scalar_t, typename Param>
void rlif_backward_walk(const RlifBackward<scalar_t, Param>& p) {
  using acc_t = at::opmath_type<scalar_t>;
  // Per-neuron alpha or a synaptic current: the input-space trace D = G W cannot decay by one
  // factor; dx everywhere is then G_I[t] W, formed per live step from the neurons with G_I != 0.
  // With a synaptic current the walk keeps two traces: G_V = dL/dV (it forms delta's decay and
  // the parameter gradients) and G_I = dL/dI = G_V[t] + alpha_syn*G_I[t+1] (what the input, the
  // recurrent spikes and the bias receive); without one G_I is G_V.
  constexpr bool kPerNeuron = is_param_view<Param>();
  using vec = typename TileVec<acc_t>::type;
  constexpr int64_t L = tile_lanes<acc_t>();
  const int64_t T = p.T, B = p.B, n = p.n, n_in = p.n_in;
  const int64_t tiles = padded_row<acc_t>(n) / L;
  const bool full_dx = p.dx && !p.prev_off;
  const bool d_trace = full_dx && !kPerNeuron;
  const bool params = kPerNeuron && p.prm.d_param[0];
  const bool syn = kPerNeuron && p.prm.syn;
  const bool zero_reset = p.reset == kResetZero;
  constexpr int64_t kAhead = 8;  // dL/dS rows are a stride apart: prefetch them early
  // dW and dR are summed per element after its walk, from a buffer of G_I at every step (T * N
  // values, L2-sized): for each input i (spiking neuron i) the G_I rows at its event (spike)
  // times are added up in registers, a group of SIMD tiles at a time, and the sums added to
  // dW^T[i, :] (dR^T[i, :]) once per element — instead of one read-modify-write of a row of the
  // [N_in, N] partial per event, which sweeps it through L2 (measured: 3x slower at SHD size).
  EventsByInput<scalar_t> by_input;
  if (p.dw_t_parts) by_input = events_by_input<scalar_t>(p.events, T, B, n_in);
  const bool buffer = p.dw_t_parts || p.drec_t_parts;
  const BatchChunks chunks(B);
  const int64_t work_per_chunk = (B / chunks.count + 1) * T * (n + (full_dx ? n_in : 0));
  at::parallel_for(0, chunks.count, grain_for(work_per_chunk), [&](int64_t c0, int64_t c1) {
    std::vector<acc_t> G(n), GI(syn ? n : 0), delta(n), D(full_dx ? n_in : 0);
    std::vector<acc_t> dpar(params ? 3 * n : 0);  // d_alpha, d_threshold, d_alpha_syn
    acc_t* gi = syn ? GI.data() : G.data();       // G_I
    std::vector<vec> G_all(buffer ? T * tiles : 0, vec{});  // G_I[t] at row t; pad lanes stay 0
    std::vector<int64_t> spk_off(p.drec_t_parts ? n + 1 : 0);
    std::vector<int32_t> spk_times;
    for (int64_t c = c0; c < c1; ++c) {
      vec* dw_t = p.dw_t_parts ? reinterpret_cast<vec*>(p.dw_t_parts) + c * n_in * tiles : nullptr;
      vec* drec_t = p.drec_t_parts ? reinterpret_cast<vec*>(p.drec_t_parts) + c * n * tiles : nullptr;
      acc_t* db = p.db_parts ? p.db_parts + c * n : nullptr;
      for (int64_t b = chunks.begin(c); b < chunks.end(c); ++b) {
        bool live = false;  // G (and D) are exactly zero until the first injection
        int64_t t_live = -1;  // the last step with G != 0 (G[t] = 0 for t > t_live)
        std::fill(G.begin(), G.end(), acc_t(0));
        std::fill(GI.begin(), GI.end(), acc_t(0));
        std::fill(D.begin(), D.end(), acc_t(0));
        std::fill(dpar.begin(), dpar.end(), acc_t(0));
        acc_t* d_alpha = params ? dpar.data() : nullptr;
        acc_t* d_threshold = params ? dpar.data() + n : nullptr;
        acc_t* d_alpha_syn = params ? dpar.data() + 2 * n : nullptr;
        auto last = [&](int k, int64_t j) { return static_cast<acc_t>(p.prm.tan_last[(k * B + b) * n + j]); };
        // dL/dV_final and dL/dsyn_final arrive at step T-1 (G_I[T-1] = G_V[T-1] + dL/dsyn_final)
        if (p.g_init) {
          for (int64_t j = 0; j < n; ++j) {
            const acc_t g = static_cast<acc_t>(p.g_init[b * n + j]);
            G[j] = g;
            if (d_trace && g != acc_t(0)) axpy<acc_t>(n_in, g, p.weight + j * n_in, D.data());
            if (params)
              math::param_grads(d_alpha[j], d_threshold[j], d_alpha_syn[j], g, last(0, j),
                                last(1, j), last(3, j), false);
          }
          live = true;
        }
        if (syn && p.prm.g_syn) {
          for (int64_t j = 0; j < n; ++j) {
            GI[j] = static_cast<acc_t>(p.prm.g_syn[b * n + j]);
            if (params) d_alpha_syn[j] += GI[j] * last(2, j);
          }
          live = true;
        }
        for (int64_t t = T - 1; t >= 0; --t) {
          const int64_t r = b * T + t;
          if (t >= kAhead) {
            const scalar_t* ahead = p.grad + ((t - kAhead) * B + b) * n;
            for (int64_t e = p.act_off[r - kAhead]; e < p.act_off[r - kAhead + 1]; ++e)
              __builtin_prefetch(ahead + p.act_idx[e]);
          }
          const int32_t* spk = p.bits + (t * B + b) * p.words;
          const bool carry = live && t < T - 1;  // G holds G[t+1], which reaches step t
          // delta at the active entries of (t, b), from G_I[t+1] before it decays
          const int64_t e0 = p.act_off[r], e1 = p.act_off[r + 1];
          const scalar_t* e_row = p.grad + (t * B + b) * n;
          for (int64_t e = e0; e < e1; ++e) {
            const int64_t j = p.act_idx[e];
            const acc_t u = carry ? dot<acc_t>(n, gi, p.rec_t + j * n) : acc_t(0);
            delta[e - e0] = static_cast<acc_t>(p.act_sg[e]) * (static_cast<acc_t>(e_row[j]) + u);
            if (params)
              math::param_grads(d_alpha[j], d_threshold[j], d_alpha_syn[j], delta[e - e0],
                                static_cast<acc_t>(p.prm.trace[0][e]), static_cast<acc_t>(p.prm.trace[1][e]),
                                syn ? static_cast<acc_t>(p.prm.trace[2][e]) : acc_t(0), true);
          }
          if (carry) {
            if (zero_reset) {
              // d[t] = alpha*(1 - S[t]): G[t+1] does not reach V[t] where the neuron spiked
              if (d_trace) {
                scale_inplace<acc_t>(n_in, p.alpha.value, D.data());
                for_each_bit(spk, p.words, [&](int64_t j) {
                  axpy<acc_t>(n_in, -(p.alpha.value * G[j]), p.weight + j * n_in, D.data());
                });
              }
              for (int64_t j = 0; j < n; ++j) G[j] *= math::trace_decay(p.alpha[j], test_bit(spk, j), p.reset);
            } else if constexpr (kPerNeuron) {
              for (int64_t j = 0; j < n; ++j) G[j] *= p.alpha[j];
            } else {
              scale_inplace<acc_t>(n, p.alpha.value, G.data());
              if (full_dx) scale_inplace<acc_t>(n_in, p.alpha.value, D.data());
            }
            if (syn)
              for (int64_t j = 0; j < n; ++j) GI[j] *= p.prm.alpha_syn[j];
          }
          for (int64_t e = e0; e < e1; ++e) {
            const int64_t j = p.act_idx[e];
            G[j] += delta[e - e0];
            if (d_trace) axpy<acc_t>(n_in, delta[e - e0], p.weight + j * n_in, D.data());
          }
          live = live || e1 > e0;
          if (!live) continue;
          if (syn)
            for (int64_t j = 0; j < n; ++j) GI[j] += G[j];
          if (t_live < 0) t_live = t;
          if (db) for (int64_t j = 0; j < n; ++j) db[j] += gi[j];
          if (buffer) __builtin_memcpy(G_all.data() + t * tiles, gi, n * sizeof(acc_t));
          if (p.dx) {
            scalar_t* dx_row = p.dx + (t * B + b) * n_in;
            if (full_dx && kPerNeuron) {  // D = G_I[t] W
              std::fill(D.begin(), D.end(), acc_t(0));
              for (int64_t j = 0; j < n; ++j)
                if (gi[j] != acc_t(0)) axpy<acc_t>(n_in, gi[j], p.weight + j * n_in, D.data());
            }
            if (full_dx) {
              for (int64_t i = 0; i < n_in; ++i) dx_row[i] = static_cast<scalar_t>(D[i]);
            } else {
              for (int64_t e = p.prev_off[r]; e < p.prev_off[r + 1]; ++e) {
                const int64_t i = p.prev_idx[e];
                dx_row[i] = static_cast<scalar_t>(dot<acc_t>(n, gi, p.weight_t + i * n));
              }
            }
          }
        }
        // G holds G_V[0] = dL/dV[0], gi G_I[0] (zero if nothing reached this element); T = 0:
        // the final state is the initial one, and S[-1] reaches nothing
        const scalar_t* s0 = p.s_init ? p.s_init + b * n : nullptr;
        if (p.dv)
          for (int64_t j = 0; j < n; ++j) {
            const acc_t keep = zero_reset && s0 ? p.alpha[j] * (acc_t(1) - static_cast<acc_t>(s0[j])) : p.alpha[j];
            p.dv[b * n + j] = static_cast<scalar_t>(T > 0 ? keep * G[j] : G[j]);
          }
        if (p.ds)
          for (int64_t j = 0; j < n; ++j)
            p.ds[b * n + j] = static_cast<scalar_t>(live && T > 0 ? dot<acc_t>(n, gi, p.rec_t + j * n) : acc_t(0));
        if (syn && p.prm.dsyn)  // syn[0] = alpha_syn * syn_init + I[0]
          for (int64_t j = 0; j < n; ++j)
            p.prm.dsyn[b * n + j] = static_cast<scalar_t>(T > 0 ? p.prm.alpha_syn[j] * GI[j] : GI[j]);
        if (params)
          for (int k = 0; k < 3; ++k)
            if (p.prm.d_param[k])
              for (int64_t j = 0; j < n; ++j) p.prm.d_param[k][b * n + j] = static_cast<scalar_t>(dpar[k * n + j]);
        if (!live) continue;
        // dW^T[i, :] += x * G_I[t] over the element's events (t, i)
        if (dw_t)
          add_row_sums_all<acc_t>(G_all.data(), tiles, by_input.ptr.data() + b * n_in,
                                  by_input.times.get(), by_input.values.get(), n_in, t_live, dw_t);
        // dR^T[i, :] += G_I[t+1] over the element's spikes (t < T-1, i) (+ s_init[i] * G_I[0])
        if (drec_t) {
          const int64_t t_end = std::min(t_live, T - 1);  // spikes at t < t_end meet G[t+1] != 0
          std::fill(spk_off.begin(), spk_off.end(), 0);
          for (int64_t t = 0; t < t_end; ++t)
            for_each_bit(p.bits + (t * B + b) * p.words, p.words, [&](int64_t i) { ++spk_off[i + 1]; });
          for (int64_t i = 0; i < n; ++i) spk_off[i + 1] += spk_off[i];
          spk_times.resize(spk_off[n]);
          for (int64_t t = 0; t < t_end; ++t)  // ascending t: each neuron's list comes out sorted
            for_each_bit(p.bits + (t * B + b) * p.words, p.words,
                         [&](int64_t i) { spk_times[spk_off[i]++] = static_cast<int32_t>(t + 1); });
          for (int64_t i = n; i > 0; --i) spk_off[i] = spk_off[i - 1];  // the fill moved each start
          spk_off[0] = 0;
          add_row_sums_all<acc_t, scalar_t>(G_all.data(), tiles, spk_off.data(), spk_times.data(),
                                            nullptr, n, T, drec_t);
          if (s0)
            for (int64_t i = 0; i < n; ++i)
              if (s0[i] != scalar_t(0))
                axpy<acc_t>(n, static_cast<acc_t>(s0[i]), gi, reinterpret_cast<acc_t*>(drec_t + i * tiles));
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------------------
// Dense backward: G at every entry [T, B, N] (the GEMMs for dW, dR, dx follow in ATen).
// ------------------------------------------------------------------------------------------
// ParamView: prm as in the sparse walk, with the traces at every entry; with a synaptic current
// G_out holds G_I and prm.gv0 receives G_V[0].
template <typename scalar_t, typename Param>
void rlif_dense_walk(const scalar_t* grad, const scalar_t* sg, const scalar_t* spikes,
                     const scalar_t* g_init, const scalar_t* rec_t, int64_t T, int64_t B, int64_t n,
                     Param alpha, int reset, scalar_t* G_out, RlifParamIO<scalar_t, Param> prm = {}) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool params = prm.d_param[0] != nullptr;
  const bool syn = prm.syn;
  at::parallel_for(0, B, grain_for(T * n * n), [&](int64_t b0, int64_t b1) {
    // G_V of this step and the next; G_I (syn) of this step and the next
    std::vector<acc_t> G(n), next(n), GI(syn ? n : 0), next_i(syn ? n : 0);
    std::vector<acc_t> dpar(params ? 3 * n : 0);
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t j = 0; j < n; ++j) next[j] = g_init ? static_cast<acc_t>(g_init[b * n + j]) : acc_t(0);
      for (int64_t j = 0; j < (syn ? n : 0); ++j)
        next_i[j] = prm.g_syn ? static_cast<acc_t>(prm.g_syn[b * n + j]) : acc_t(0);
      acc_t* d_alpha = params ? dpar.data() : nullptr;
      acc_t* d_threshold = params ? dpar.data() + n : nullptr;
      acc_t* d_alpha_syn = params ? dpar.data() + 2 * n : nullptr;
      if (params) {
        std::fill(dpar.begin(), dpar.end(), acc_t(0));
        auto last = [&](int k, int64_t j) { return static_cast<acc_t>(prm.tan_last[(k * B + b) * n + j]); };
        for (int64_t j = 0; j < n; ++j) {
          math::param_grads(d_alpha[j], d_threshold[j], d_alpha_syn[j], next[j], last(0, j),
                            last(1, j), last(3, j), false);
          if (syn) d_alpha_syn[j] += next_i[j] * last(2, j);
        }
      }
      for (int64_t t = T - 1; t >= 0; --t) {
        const int64_t row = (t * B + b) * n;
        const bool carry = t < T - 1;
        // at t = T-1, next / next_i hold dL/dV_final, dL/dsyn_final (they arrive undecayed)
        const acc_t* in_next = syn ? next_i.data() : next.data();
        for (int64_t j = 0; j < n; ++j) {
          const acc_t u = carry ? dot<acc_t>(n, in_next, rec_t + j * n) : acc_t(0);
          const acc_t d = carry ? math::trace_decay(alpha[j], spikes[row + j] > scalar_t(0), reset) : acc_t(1);
          const acc_t delta = static_cast<acc_t>(sg[row + j]) * (static_cast<acc_t>(grad[row + j]) + u);
          G[j] = d * next[j] + delta;
          if (params)
            math::param_grads(d_alpha[j], d_threshold[j], d_alpha_syn[j], delta,
                              static_cast<acc_t>(prm.trace[0][row + j]),
                              static_cast<acc_t>(prm.trace[1][row + j]),
                              syn ? static_cast<acc_t>(prm.trace[2][row + j]) : acc_t(0), true);
        }
        if (syn) {
          for (int64_t j = 0; j < n; ++j) GI[j] = G[j] + (carry ? prm.alpha_syn[j] * next_i[j] : next_i[j]);
          std::swap(GI, next_i);
        }
        const acc_t* g_in = syn ? next_i.data() : G.data();
        for (int64_t j = 0; j < n; ++j) G_out[row + j] = static_cast<scalar_t>(g_in[j]);
        std::swap(G, next);
      }
      if (syn && prm.gv0)
        for (int64_t j = 0; j < n; ++j) prm.gv0[b * n + j] = static_cast<scalar_t>(next[j]);
      if (params)
        for (int k = 0; k < 3; ++k)
          if (prm.d_param[k])
            for (int64_t j = 0; j < n; ++j) prm.d_param[k][b * n + j] = static_cast<scalar_t>(dpar[k * n + j]);
    }
  });
}

}  // namespace cpu
}  // namespace sparsegrad
