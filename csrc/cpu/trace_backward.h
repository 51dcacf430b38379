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
// Also the pieces the other CPU ops share (input events and currents, events grouped by input).
// CPU only: the CUDA host code includes cpu_common.h, not this header.
#pragma once

#include <memory>
#include <type_traits>

#include "cpu/row_kernels.h"  // scan_events (build_events below)

namespace sparsegrad {
namespace cpu {

// ------------------------------------------------------------------------------------------
// Shared with the other CPU ops (the recurrent layer, csrc/cpu/rlif_cpu.cpp and recurrent_walk.h):
// input events of x, input currents, tile groups, and the events of each batch element grouped
// by input. (The LIF and readout forwards use row_kernels.h's row-walk forms of the first two.)
// ------------------------------------------------------------------------------------------

// The nonzeros of x [T,B,N] as a CSR over rows b*T + t (one scan of x, row_kernels.h).
template <typename scalar_t>
Events build_events(const at::Tensor& x) {
  return scan_events<scalar_t>(x)->ev.as_events();
}

// I[t,b,:] = x[t,b,:] @ W.T + bias, either from the events (W given transposed, [N_in,N_out])
// or from a precomputed dense GEMM result [T,B,N_out].
template <typename scalar_t>
struct InputCurrent {
  using acc_t = at::opmath_type<scalar_t>;
  EventView<scalar_t> events;
  const scalar_t* weight_t = nullptr;  // [N_in, N_out]
  const scalar_t* bias = nullptr;
  const scalar_t* dense = nullptr;     // [T, B, N_out] when the GEMM path is used
  bool from_gemm = false;              // (an empty GEMM result has a null data pointer)
  int64_t B = 0, n_out = 0;

  void fill(int64_t b, int64_t t, acc_t* cur) const {
    if (from_gemm) {
      const scalar_t* row = dense + (t * B + b) * n_out;
      for (int64_t j = 0; j < n_out; ++j) cur[j] = static_cast<acc_t>(row[j]);
      return;
    }
    for (int64_t j = 0; j < n_out; ++j) cur[j] = bias ? static_cast<acc_t>(bias[j]) : acc_t(0);
    int64_t e = events.begin(b, t);
    const int64_t e_end = events.end(b, t);
    if (!events.val) {  // binary input: add weight rows, four at a time to save passes over cur
      for (; e + 4 <= e_end; e += 4) {
        const scalar_t* w0 = weight_t + events.idx[e] * n_out;
        const scalar_t* w1 = weight_t + events.idx[e + 1] * n_out;
        const scalar_t* w2 = weight_t + events.idx[e + 2] * n_out;
        const scalar_t* w3 = weight_t + events.idx[e + 3] * n_out;
        for (int64_t j = 0; j < n_out; ++j)
          cur[j] += (static_cast<acc_t>(w0[j]) + static_cast<acc_t>(w1[j])) +
                    (static_cast<acc_t>(w2[j]) + static_cast<acc_t>(w3[j]));
      }
    }
    for (; e < e_end; ++e) {
      axpy<acc_t>(n_out, static_cast<acc_t>(events.value(e)), weight_t + events.idx[e] * n_out, cur);
    }
  }
};

// Chooses the path for the input current and owns the buffers it needs.
template <typename scalar_t>
struct CurrentPlan {
  at::Tensor weight_t, dense;
  InputCurrent<scalar_t> current;

  CurrentPlan(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
              const Events& ev) {
    const int64_t T = x.size(0), B = x.size(1), n_in = x.size(2), n_out = weight.size(0);
    const double density = x.numel() > 0 ? double(ev.nnz) / double(x.numel()) : 0.0;
    current.B = B;
    current.n_out = n_out;
    if (density <= kEventDensityMax) {
      weight_t = weight.t().contiguous();
      current.events = EventView<scalar_t>(ev.ptr, ev.idx, ev.val, T);
      current.weight_t = weight_t.data_ptr<scalar_t>();
      current.bias = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
    } else {
      auto x2 = x.reshape({T * B, n_in});
      dense = bias.has_value() ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
      current.dense = dense.data_ptr<scalar_t>();
      current.from_gemm = true;
    }
  }
};


// Tiles of output neurons are walked in fixed groups of at most kTileGroup (one task per group).
constexpr int kTileGroup = 8;

// The input events of each batch element grouped by input: input i of element b fired at
// times[e] (ascending) with values[e] (null when binary) for e in [ptr[b*N_in + i], next).
template <typename scalar_t>
struct EventsByInput {
  std::vector<int64_t> ptr;  // [B * N_in + 1]
  std::unique_ptr<int32_t[]> times;
  std::unique_ptr<scalar_t[]> values;
};

// From a CSR over rows b*T + t (off [B*T+1], idx, val or null): a counting sort per element.
template <typename scalar_t>
EventsByInput<scalar_t> events_by_input(const int64_t* off, const int32_t* idx, const scalar_t* val,
                                        int64_t T, int64_t B, int64_t n_in) {
  profile::Scope timer(profile::kBwdRegroup);
  EventsByInput<scalar_t> out;
  const int64_t nnz = off[B * T];
  out.ptr.assign(B * n_in + 1, 0);
  out.times.reset(new int32_t[std::max<int64_t>(1, nnz)]);
  if (val) out.values.reset(new scalar_t[std::max<int64_t>(1, nnz)]);
  int64_t* ptr = out.ptr.data();
  int32_t* times = out.times.get();
  scalar_t* values = out.values.get();
  at::parallel_for(0, B, grain_for(T * 8 + nnz / std::max<int64_t>(B, 1)), [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> next(n_in);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t e0 = off[b * T], e1 = off[(b + 1) * T];
      std::fill(next.begin(), next.end(), 0);
      for (int64_t e = e0; e < e1; ++e) ++next[idx[e]];
      int64_t pos = e0;  // the events of b keep their place; only their order changes
      for (int64_t i = 0; i < n_in; ++i) {
        const int64_t c = next[i];
        ptr[b * n_in + i] = next[i] = pos;
        pos += c;
      }
      for (int64_t t = 0; t < T; ++t) {
        const int64_t r = b * T + t;
        for (int64_t e = off[r]; e < off[r + 1]; ++e) {
          const int64_t dst = next[idx[e]]++;
          times[dst] = static_cast<int32_t>(t);
          if (values) values[dst] = val[e];
        }
      }
    }
  });
  ptr[B * n_in] = nnz;
  return out;
}

template <typename scalar_t>
EventsByInput<scalar_t> events_by_input(const EventView<scalar_t>& ev, int64_t T, int64_t B, int64_t n_in) {
  return events_by_input<scalar_t>(ev.ptr, ev.idx, ev.val, T, B, n_in);
}

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
