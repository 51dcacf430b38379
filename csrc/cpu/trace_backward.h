// The reverse-time gradient walk shared by the LIF and readout backwards.
//
// Both layers reduce to: per batch element b, a trace G over output neurons with
//     G[t] = alpha * G[t+1] + delta[t]          (G[T-1] starts from g_init, e.g. dL/dV_final)
// where delta is given at a few (t, j) entries (the "injections"), and gradients
//     dW = scale * sum_{t,b} G[t,b,:]^T x[t,b,:]     db = scale * sum G     dx = scale * G W
// (scale = 1 for LIF, 1 - alpha for the leaky readout). Work is proportional to injections and
// input events, plus one decay of the N_out trace per step; no dense [T,B,N] float is built.
// Three walks compute them: trace_backward here (per batch element, all of G at once: full dx,
// and restricted dx on the active route), trace_forward_active here (dW, db, dV through the input
// trace, when very few entries are active) and tiled_backward (tiled_backward.h, CPU only: dW,
// db, dV and restricted dx by input events, in register tiles of output neurons).
#pragma once

#include <memory>
#include <type_traits>

#include "cpu/cpu_common.h"

namespace sparsegrad {
namespace cpu {

template <typename scalar_t>
struct TraceProblem {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t T = 0, B = 0, n_in = 0, n_out = 0;
  acc_t alpha = 0, scale = 1;
  const scalar_t* weight = nullptr;    // [N_out, N_in]
  const scalar_t* weight_t = nullptr;  // [N_in, N_out]
  const scalar_t* g_init = nullptr;    // [B, N_out] or null
  EventView<scalar_t> events;          // x's nonzeros (needed for dW via events)
  const int64_t* prev_ptr = nullptr;   // producer's active set: dx only there
  const int32_t* prev_idx = nullptr;
  // Reset to zero (op_schemas.h): R[t] bits [T, B, ceil(N_out/32)]; the trace decays by
  // alpha*(1 - R[t+1]) instead of alpha. Null for the other resets and for the readout.
  const int32_t* rst_bits = nullptr;
  const int32_t* reset_row(int64_t t, int64_t b) const { return rst_bits + (t * B + b) * bit_words(n_out); }
  // outputs (null = not wanted)
  scalar_t* dx = nullptr;  // [T, B, N_in], zero-initialised
  scalar_t* dv = nullptr;  // [B, N_out]: alpha * G[0]
  acc_t* dw_t_parts = nullptr;  // [chunks, N_in, N_out] via events (trace_backward), zeroed
  acc_t* dw_parts = nullptr;    // [chunks, N_out, N_in] via the input trace, zero-initialised
  acc_t* db_parts = nullptr;    // [chunks, N_out], zero-initialised
};

// dx only on the producer's active set: needs W^T rows; the returned tensor keeps them alive.
template <typename scalar_t>
at::Tensor restrict_dx(TraceProblem<scalar_t>& p, const at::Tensor& weight, const at::Tensor& prev_ptr,
                       const at::Tensor& prev_idx) {
  at::Tensor weight_t = weight.t().contiguous();
  p.weight_t = weight_t.data_ptr<scalar_t>();
  p.prev_ptr = prev_ptr.data_ptr<int64_t>();
  p.prev_idx = prev_idx.data_ptr<int32_t>();
  return weight_t;
}

// Per-chunk partial sums [chunks, n] -> out of `shape` (summed in chunk order, times scale).
template <typename scalar_t, typename acc_t>
at::Tensor sum_chunks(const at::Tensor& parts, at::IntArrayRef shape, acc_t scale,
                      const at::TensorOptions& opts) {
  at::Tensor out = at::empty(shape, opts);
  reduce_chunks<acc_t>(parts.data_ptr<acc_t>(), parts.size(0), out.numel(), scale,
                       out.data_ptr<scalar_t>());
  return out;
}

// inject(b, t, emit) calls emit(j, delta) for each entry of row (b, t) carrying gradient.
template <typename scalar_t, typename Inject>
void trace_backward(const TraceProblem<scalar_t>& p, const Inject& inject) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = p.T, B = p.B, n_in = p.n_in, n_out = p.n_out;
  const bool full_dx = p.dx && !p.prev_ptr;
  const bool dw_events = p.dw_t_parts != nullptr;
  const BatchChunks chunks(B);

  const int64_t work_per_chunk = (B / chunks.count + 1) * T * (n_out + (full_dx ? n_in : 0));
  at::parallel_for(0, chunks.count, grain_for(work_per_chunk), [&](int64_t c0, int64_t c1) {
    std::vector<acc_t> G(n_out), dx_trace(full_dx ? n_in : 0);
    for (int64_t c = c0; c < c1; ++c) {
      acc_t* dw_t = dw_events ? p.dw_t_parts + c * n_in * n_out : nullptr;
      acc_t* db = p.db_parts ? p.db_parts + c * n_out : nullptr;
      for (int64_t b = chunks.begin(c); b < chunks.end(c); ++b) {
        bool live = false;  // G and dx_trace are exactly zero until the first injection
        std::fill(G.begin(), G.end(), acc_t(0));
        std::fill(dx_trace.begin(), dx_trace.end(), acc_t(0));
        if (p.g_init) {
          for (int64_t j = 0; j < n_out; ++j) {
            const acc_t g = static_cast<acc_t>(p.g_init[b * n_out + j]);
            G[j] = g;
            if (full_dx && g != acc_t(0)) axpy<acc_t>(n_in, g, p.weight + j * n_in, dx_trace.data());
          }
          live = true;
        }
        for (int64_t t = T - 1; t >= 0; --t) {
          if (live && t < T - 1) {
            if (p.rst_bits) {  // neurons reset by a spike at t+1 drop their trace (and its dx share)
              const int32_t* cut = p.reset_row(t + 1, b);
              for (int64_t j = 0; j < n_out; ++j) {
                if (!test_bit(cut, j) || G[j] == acc_t(0)) continue;
                if (full_dx) axpy<acc_t>(n_in, -G[j], p.weight + j * n_in, dx_trace.data());
                G[j] = acc_t(0);
              }
            }
            scale_inplace<acc_t>(n_out, p.alpha, G.data());
            if (full_dx) scale_inplace<acc_t>(n_in, p.alpha, dx_trace.data());
          }
          inject(b, t, [&](int64_t j, acc_t delta) {
            G[j] += delta;
            if (full_dx) axpy<acc_t>(n_in, delta, p.weight + j * n_in, dx_trace.data());
            live = true;
          });
          if (!live) continue;
          if (db) for (int64_t j = 0; j < n_out; ++j) db[j] += G[j];
          if (dw_t) {
            for (int64_t e = p.events.begin(b, t); e < p.events.end(b, t); ++e)
              axpy<acc_t>(n_out, static_cast<acc_t>(p.events.value(e)), G.data(),
                          dw_t + int64_t(p.events.idx[e]) * n_out);
          }
          if (p.dx) {
            scalar_t* dx_row = p.dx + (t * B + b) * n_in;
            if (full_dx) {
              for (int64_t i = 0; i < n_in; ++i) dx_row[i] = static_cast<scalar_t>(p.scale * dx_trace[i]);
            } else {
              const int64_t r = b * T + t;
              for (int64_t e = p.prev_ptr[r]; e < p.prev_ptr[r + 1]; ++e) {
                const int64_t i = p.prev_idx[e];
                dx_row[i] = static_cast<scalar_t>(p.scale * dot<acc_t>(n_out, G.data(), p.weight_t + i * n_out));
              }
            }
          }
        }
        if (p.dv) {
          const int32_t* cut = p.rst_bits ? p.reset_row(0, b) : nullptr;
          for (int64_t j = 0; j < n_out; ++j) {
            const acc_t a = cut ? math::trace_decay(p.alpha, test_bit(cut, j), int(kResetZero)) : p.alpha;
            p.dv[b * n_out + j] = static_cast<scalar_t>(a * G[j]);
          }
        }
      }
    }
  });
}

// The same gradients walking forward in time, with work proportional to active entries:
//   dW[j,:] += delta * X[t]      X[t] = sum_{k<=t} alpha^(t-k) x[k]   (the input trace)
//   db[j]   += delta * sum_{m<=t} alpha^m                              (sum over k of G[k])
//   dv[j]   += delta * alpha^(t+1)                                     (alpha * G[0])
// X decays lazily: each input keeps the time of its last event, and X[t] is formed only for rows
// that have active entries. Work: nnz(x) + (rows with actives + |A|) * N_in. No dx (see above).
template <typename scalar_t, typename Inject>
void trace_forward_active(const TraceProblem<scalar_t>& p, const Inject& inject) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = p.T, B = p.B, n_in = p.n_in, n_out = p.n_out;
  std::vector<acc_t> alpha_pow(T + 1), alpha_sum(T);  // alpha^k; sum_{m<=t} alpha^m
  alpha_pow[0] = acc_t(1);
  for (int64_t k = 1; k <= T; ++k) alpha_pow[k] = alpha_pow[k - 1] * p.alpha;
  for (int64_t t = 0; t < T; ++t) alpha_sum[t] = (t > 0 ? alpha_sum[t - 1] : acc_t(0)) + alpha_pow[t];
  const BatchChunks chunks(B);
  const int64_t work_per_chunk = (B / chunks.count + 1) * (T + n_in);
  at::parallel_for(0, chunks.count, grain_for(work_per_chunk), [&](int64_t c0, int64_t c1) {
    std::vector<acc_t> X(p.dw_parts ? n_in : 0), X_now(p.dw_parts ? n_in : 0);
    std::vector<int32_t> last(p.dw_parts ? n_in : 0);
    for (int64_t c = c0; c < c1; ++c) {
      acc_t* dw = p.dw_parts ? p.dw_parts + c * n_out * n_in : nullptr;
      acc_t* db = p.db_parts ? p.db_parts + c * n_out : nullptr;
      for (int64_t b = chunks.begin(c); b < chunks.end(c); ++b) {
        std::fill(X.begin(), X.end(), acc_t(0));
        std::fill(last.begin(), last.end(), 0);
        scalar_t* dv = p.dv ? p.dv + b * n_out : nullptr;
        if (dv) std::fill(dv, dv + n_out, scalar_t(0));
        auto trace_at = [&](int64_t t) {  // X[t] into X_now
          for (int64_t i = 0; i < n_in; ++i) X_now[i] = X[i] * alpha_pow[t - last[i]];
        };
        auto add = [&](int64_t t, int64_t j, acc_t delta, bool& have_trace) {
          if (dw) {
            if (!have_trace) { trace_at(t); have_trace = true; }
            axpy<acc_t>(n_in, delta, X_now.data(), dw + j * n_in);
          }
          if (db) db[j] += delta * alpha_sum[t];
          if (dv) dv[j] = static_cast<scalar_t>(static_cast<acc_t>(dv[j]) + delta * alpha_pow[t + 1]);
        };
        for (int64_t t = 0; t < T; ++t) {
          if (dw) {
            for (int64_t e = p.events.begin(b, t); e < p.events.end(b, t); ++e) {
              const int64_t i = p.events.idx[e];
              X[i] = X[i] * alpha_pow[t - last[i]] + static_cast<acc_t>(p.events.value(e));
              last[i] = static_cast<int32_t>(t);
            }
          }
          bool have_trace = false;
          inject(b, t, [&](int64_t j, acc_t delta) { add(t, j, delta, have_trace); });
        }
        if (p.g_init) {  // dL/dV_final enters like a delta at t = T-1
          bool have_trace = false;
          for (int64_t j = 0; j < n_out; ++j)
            add(T - 1, j, static_cast<acc_t>(p.g_init[b * n_out + j]), have_trace);
        }
      }
    }
  });
}

// Which way dW is cheaper: events cost nnz(x) * N_out (vector adds from L2, tiled_backward.h), the
// lazily decayed input trace nnz(x) plus N_in per active entry and per row holding active
// entries, each unit about 8x dearer (gathers, scalar updates). Calibrated with 1 and 2 threads
// on the SHD and Fashion-MNIST layers over b_th (benchmarks/bench_sweeps.py): the trace route
// wins only below ~0.1 % active entries.
enum class DwRoute : int64_t { kAuto = 0, kEvents = 1, kActive = 2 };

// dx on the producer's active set costs |A_prev| * N_out multiply-adds (in the tiled walk); dx
// everywhere through the reverse trace in input space costs |injections| * N_in plus, per (b, t),
// an N_in-wide decay and the row's write (measured at the SHD 200->200 layer: restricted 12.5 ms,
// full 16.5 ms per backward, 1 thread). Both are correct (the producer reads dx only on its
// active set), so take the cheaper.
inline bool restrict_dx_to_producer(int64_t n_prev, int64_t n_active, int64_t T, int64_t B,
                                    int64_t n_in, int64_t n_out) {
  const double restricted = double(n_prev) * double(n_out);
  const double full = (double(n_active) + 2.0 * double(T) * double(B)) * double(n_in);
  return restricted <= full;
}

inline DwRoute choose_dw_route(int64_t route, int64_t nnz, int64_t n_active, int64_t T, int64_t B,
                               int64_t n_in, int64_t n_out) {
  if (route == 1) return DwRoute::kEvents;
  if (route == 2) return DwRoute::kActive;
  const double via_events = double(nnz) * double(n_out);
  const double rows_with_actives = double(std::min(n_active, T * B));
  const double via_active = 8.0 * (double(nnz) + (rows_with_actives + double(n_active)) * double(n_in));
  return via_events <= via_active ? DwRoute::kEvents : DwRoute::kActive;
}

}  // namespace cpu
}  // namespace sparsegrad
