// The reverse-time gradient walk shared by the LIF and readout backwards.
//
// Both layers reduce to: per batch element b, a trace G over output neurons with
//     G[t] = alpha * G[t+1] + delta[t]          (G[T-1] starts from g_init, e.g. dL/dV_final)
// where delta is given at a few (t, j) entries (the "injections"), and gradients
//     dW = scale * sum_{t,b} G[t,b,:]^T x[t,b,:]     db = scale * sum G     dx = scale * G W
// (scale = 1 for LIF, 1 - alpha for the leaky readout). Work is proportional to injections and
// input events, plus one decay of the N_out trace per step; no dense [T,B,N] float is built.
// Three walks compute them: trace_backward (per batch element, all of G at once: the readout's
// gradients and the LIF's full dx), tiled_event_backward (the LIF's dW, db, dV and restricted
// dx by input events, in tiles of output neurons) and trace_forward_active (the LIF's dW, db, dV
// through the input trace, when very few entries are active).
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

// ------------------------------------------------------------------------------------------
// dW, db, dv of the LIF layer by input events, in tiles of output neurons (the "events" route).
//
// Each neuron's trace G[:, b, j] depends only on its own injections, so the output neurons split
// into tiles of one SIMD register (kTileBytes), and the tiles into fixed groups of at most
// kTileGroup. A task owns whole groups; per batch element it walks t backwards once for a
// group's tiles side by side (independent register chains), writing their traces at every step into a buffer G [T][group], then for every input i
// adds up G at i's event times in registers and adds the sums to its block of dW^T once.
// Each part of dW and db has one writer: no partial sums to zero and reduce, and the summation
// order (b ascending, t fixed) does not depend on the thread count.
// Work: nnz(x) * N_out / lanes vector adds (from L2) plus T * B * N_out / lanes for the walks.
// ------------------------------------------------------------------------------------------
constexpr int64_t kTileBytes = 64;
constexpr int kTileGroup = 8;

template <typename acc_t>
constexpr int64_t tile_lanes() { return kTileBytes / int64_t(sizeof(acc_t)); }

// One SIMD register of acc_t as a GCC/Clang vector (lowered to the vector units -march allows).
template <typename acc_t>
struct TileVec {
  typedef acc_t type __attribute__((vector_size(kTileBytes)));
};

// The LIF injections: delta = grad_spikes[t,b,j] * sg at each active entry (rows b*T + t).
template <typename scalar_t>
struct ActiveView {
  const int64_t* ptr = nullptr;
  const int32_t* idx = nullptr;
  const scalar_t* sg = nullptr;
  const scalar_t* grad_spikes = nullptr;  // [T, B, N_out]
};

// The input events of each batch element grouped by input: input i of element b fired at
// times[e] (ascending) with values[e] (null when binary) for e in [ptr[b*N_in + i], next).
template <typename scalar_t>
struct EventsByInput {
  std::vector<int64_t> ptr;  // [B * N_in + 1]
  std::unique_ptr<int32_t[]> times;
  std::unique_ptr<scalar_t[]> values;
};

template <typename scalar_t>
EventsByInput<scalar_t> events_by_input(const EventView<scalar_t>& ev, int64_t T, int64_t B,
                                        int64_t n_in) {
  EventsByInput<scalar_t> out;
  const int64_t nnz = ev.ptr[B * T];
  out.ptr.assign(B * n_in + 1, 0);
  out.times.reset(new int32_t[std::max<int64_t>(1, nnz)]);
  if (ev.val) out.values.reset(new scalar_t[std::max<int64_t>(1, nnz)]);
  at::parallel_for(0, B, grain_for(T * 8), [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> next(n_in);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t e0 = ev.ptr[b * T], e1 = ev.ptr[(b + 1) * T];
      std::fill(next.begin(), next.end(), 0);
      for (int64_t e = e0; e < e1; ++e) ++next[ev.idx[e]];
      int64_t pos = e0;  // the events of b keep their place; only their order changes
      for (int64_t i = 0; i < n_in; ++i) {
        const int64_t c = next[i];
        out.ptr[b * n_in + i] = next[i] = pos;
        pos += c;
      }
      for (int64_t t = 0; t < T; ++t)
        for (int64_t e = ev.begin(b, t); e < ev.end(b, t); ++e) {
          const int64_t dst = next[ev.idx[e]]++;
          out.times[dst] = static_cast<int32_t>(t);
          if (ev.val) out.values[dst] = ev.val[e];
        }
    }
  });
  out.ptr[B * n_in] = nnz;
  return out;
}

// Lanes j0 .. j0+L-1 of a reset row: 0 where the bit is set (the trace is cut), else 1.
template <typename acc_t>
inline typename TileVec<acc_t>::type reset_mask(const int32_t* bits, int64_t j0, int64_t n_out) {
  constexpr int64_t L = tile_lanes<acc_t>();
  typename TileVec<acc_t>::type m;
  for (int64_t l = 0; l < L; ++l) m[l] = (j0 + l < n_out && test_bit(bits, j0 + l)) ? acc_t(0) : acc_t(1);
  return m;
}

// Element b, tiles g0 .. g0+R-1: walks t backwards writing each tile's trace at every step into
// G [T][R] and adding it to db_sum; sets dv. Returns false when no gradient reaches the tiles.
template <int R, typename scalar_t>
bool walk_tiles(const TraceProblem<scalar_t>& p, const ActiveView<scalar_t>& act, int64_t b,
                int64_t g0, typename TileVec<at::opmath_type<scalar_t>>::type* G,
                typename TileVec<at::opmath_type<scalar_t>>::type* db_sum) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec = typename TileVec<acc_t>::type;
  constexpr int64_t L = tile_lanes<acc_t>(), kSpan = R * L;
  constexpr int64_t kAhead = 8;  // grad_spikes rows are a stride apart: prefetch them early
  const int64_t T = p.T, B = p.B, n_out = p.n_out, j_lo = g0 * L;
  const acc_t alpha = p.alpha;
  // This step's injections into the group, one register per tile; entries of the row that
  // belong to other tiles land in the last slot, so the scatter has no branch.
  alignas(kTileBytes) acc_t inject[kSpan + L];
  vec g[R], db_b[R];
  bool any = p.g_init != nullptr;
  SG_UNROLL_8
  for (int r = 0; r < R; ++r) {
    g[r] = db_b[r] = vec{};
    if (p.g_init)
      for (int64_t l = 0; l < L && j_lo + r * L + l < n_out; ++l)
        g[r][l] = static_cast<acc_t>(p.g_init[b * n_out + j_lo + r * L + l]);
  }
  for (int64_t t = T - 1; t >= 0; --t) {
    if (t >= kAhead) {
      const int64_t ra = b * T + t - kAhead;
      const scalar_t* g_ahead = act.grad_spikes + ((t - kAhead) * B + b) * n_out;
      for (int64_t e = act.ptr[ra]; e < act.ptr[ra + 1]; ++e) __builtin_prefetch(g_ahead + act.idx[e]);
    }
    std::fill(inject, inject + kSpan, acc_t(0));
    const int64_t r0 = act.ptr[b * T + t], r1 = act.ptr[b * T + t + 1];
    const scalar_t* g_row = act.grad_spikes + (t * B + b) * n_out;
    for (int64_t e = r0; e < r1; ++e) {
      const int64_t j = act.idx[e];
      const bool inside = static_cast<uint64_t>(j - j_lo) < static_cast<uint64_t>(kSpan);
      inject[inside ? j - j_lo : kSpan] = static_cast<acc_t>(g_row[j]) * static_cast<acc_t>(act.sg[e]);
      any |= inside;
    }
    const bool decay = t < T - 1;
    if (decay && p.rst_bits) {  // reset to zero: a spike at t+1 cuts the neuron's trace
      const int32_t* cut = p.reset_row(t + 1, b);
      for (int r = 0; r < R; ++r) g[r] *= reset_mask<acc_t>(cut, j_lo + r * L, n_out);
    }
    SG_UNROLL_8
    for (int r = 0; r < R; ++r) {
      vec add;
      __builtin_memcpy(&add, inject + r * L, sizeof(vec));
      const vec gr = (decay ? g[r] * alpha : g[r]) + add;
      g[r] = gr;
      db_b[r] += gr;
      G[t * R + r] = gr;
    }
  }
  for (int r = 0; r < R; ++r) {
    db_sum[r] += db_b[r];
    if (p.dv) {
      vec dv = g[r] * alpha;
      if (p.rst_bits) dv *= reset_mask<acc_t>(p.reset_row(0, b), j_lo + r * L, n_out);
      for (int64_t l = 0; l < L && j_lo + r * L + l < n_out; ++l)
        p.dv[b * n_out + j_lo + r * L + l] = static_cast<scalar_t>(dv[l]);
    }
  }
  return any;
}

// For every input i of element b, adds the sum of G [T][R] over i's event times to dw_t[r][i]:
// one pass over the event times serves R tiles.
template <int R, typename scalar_t, typename vec>
void add_event_sums(const vec* G, const EventsByInput<scalar_t>& by_input, int64_t b, int64_t n_in,
                    vec* const* dw_t) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t* ptr = by_input.ptr.data() + b * n_in;
  const int32_t* times = by_input.times.get();
  const scalar_t* values = by_input.values.get();
  for (int64_t i = 0; i < n_in; ++i) {
    const int64_t q0 = ptr[i], q1 = ptr[i + 1];
    if (q0 == q1) continue;
    vec sum[R] = {};
    if (values) {
      for (int64_t q = q0; q < q1; ++q) {
        const vec* row = G + int64_t(times[q]) * R;
        const acc_t v = static_cast<acc_t>(values[q]);
        for (int r = 0; r < R; ++r) sum[r] += v * row[r];
      }
    } else {
      for (int64_t q = q0; q < q1; ++q) {
        const vec* row = G + int64_t(times[q]) * R;
        for (int r = 0; r < R; ++r) sum[r] += row[r];
      }
    }
    for (int r = 0; r < R; ++r) dw_t[r][i] += sum[r];
  }
}

// dx on the producer's active set, this group's share: for each producer entry (t, b, i),
// dx_part[e] = sum over the group's neurons j of G[t, j] * W[j, i] (weight_t is W^T padded to
// whole tiles, [N_in, tiles * L]).
template <int R, typename scalar_t, typename vec>
void add_dx_part(const TraceProblem<scalar_t>& p, const vec* G, int64_t b, int64_t g0,
                 const scalar_t* weight_t, int64_t row_len, bool any,
                 at::opmath_type<scalar_t>* dx_part) {
  using acc_t = at::opmath_type<scalar_t>;
  static_assert(std::is_same<scalar_t, acc_t>::value, "W^T rows are loaded as acc_t vectors");
  constexpr int64_t L = tile_lanes<acc_t>();
  for (int64_t t = 0; t < p.T; ++t) {
    const int64_t r = b * p.T + t;
    for (int64_t e = p.prev_ptr[r]; e < p.prev_ptr[r + 1]; ++e) {
      if (!any) {
        dx_part[e] = acc_t(0);
        continue;
      }
      const scalar_t* w = weight_t + int64_t(p.prev_idx[e]) * row_len + g0 * L;
      vec sum{};
      SG_UNROLL_8
      for (int k = 0; k < R; ++k) {
        vec wk;  // scalar_t is acc_t for the dispatched float and double
        __builtin_memcpy(&wk, w + k * L, sizeof(vec));
        sum += G[t * R + k] * wk;
      }
      dx_part[e] = lane_tree_sum<L, acc_t>(sum);
    }
  }
}

template <typename scalar_t>
struct TileGroupDx {  // restricted dx: W^T padded to whole tiles, and one partial per group
  const scalar_t* weight_t = nullptr;
  int64_t row_len = 0;
  at::opmath_type<scalar_t>* parts = nullptr;  // [groups, |A_prev|]
  int64_t n_prev = 0;
};

template <int R, typename scalar_t, typename vec>
void walk_tile_group(const TraceProblem<scalar_t>& p, const ActiveView<scalar_t>& act,
                     const EventsByInput<scalar_t>* by_input, int64_t b, int64_t g0, vec* G,
                     vec* const* dw_t, vec* db_sum, const TileGroupDx<scalar_t>& dx, int64_t group) {
  const bool any = walk_tiles<R, scalar_t>(p, act, b, g0, G, db_sum);
  if (any && by_input) add_event_sums<R>(G, *by_input, b, p.n_in, dw_t);
  if (dx.parts)
    add_dx_part<R, scalar_t>(p, G, b, g0, dx.weight_t, dx.row_len, any, dx.parts + group * dx.n_prev);
}

// The tiles split into fixed groups of at most kTileGroup, sizes differing by at most one, and
// at least kMinGroups when there are that many tiles (so small layers still use two threads;
// every extra group adds a partial sum per restricted dx entry). The split depends on N_out
// only, so the partial sums of restricted dx do not depend on the thread count.
constexpr int64_t kMinGroups = 2;

inline int64_t tile_group_count(int64_t tiles) {
  return std::max((tiles + kTileGroup - 1) / kTileGroup, std::min(tiles, kMinGroups));
}

inline int64_t tile_group_begin(int64_t g, int64_t tiles, int64_t groups) { return g * tiles / groups; }

// Needs p.alpha, p.scale, p.g_init; writes dw [N_out, N_in] (needs by_input), db [N_out],
// p.dv and, when p.prev_ptr is set, p.dx on the producer's active set, each only if non-null.
template <typename scalar_t>
void tiled_event_backward(const TraceProblem<scalar_t>& p, const ActiveView<scalar_t>& act,
                          const EventsByInput<scalar_t>* by_input, scalar_t* dw, scalar_t* db) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec = typename TileVec<acc_t>::type;
  constexpr int64_t L = tile_lanes<acc_t>();
  const int64_t T = p.T, B = p.B, n_in = p.n_in, n_out = p.n_out;
  const int64_t tiles = (n_out + L - 1) / L, groups = tile_group_count(tiles);

  TileGroupDx<scalar_t> dx;
  std::vector<scalar_t> weight_t_padded;
  std::unique_ptr<acc_t[]> dx_parts;
  if (p.dx && p.prev_ptr) {  // p.weight_t [N_in, N_out] was set with p.prev_ptr (restrict_dx)
    dx.row_len = tiles * L;
    weight_t_padded.assign(n_in * dx.row_len, scalar_t(0));
    for (int64_t i = 0; i < n_in; ++i)
      std::copy(p.weight_t + i * n_out, p.weight_t + (i + 1) * n_out,
                weight_t_padded.begin() + i * dx.row_len);
    dx.weight_t = weight_t_padded.data();
    dx.n_prev = p.prev_ptr[B * T];
    dx_parts.reset(new acc_t[std::max<int64_t>(1, groups * dx.n_prev)]);
    dx.parts = dx_parts.get();
  }

  at::parallel_for(0, groups, 1, [&](int64_t q0, int64_t q1) {
    const int64_t k0 = tile_group_begin(q0, tiles, groups), k1 = tile_group_begin(q1, tiles, groups);
    const int64_t my_tiles = k1 - k0;
    std::vector<vec> G(T * kTileGroup);                      // a group's traces, [T][group]
    std::vector<vec> dw_t(dw ? my_tiles * n_in : 0, vec{});  // dW^T blocks [tile][N_in]
    std::vector<vec> db_sum(my_tiles, vec{});
    const EventsByInput<scalar_t>* events = dw ? by_input : nullptr;
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t g0 = tile_group_begin(q, tiles, groups), g1 = tile_group_begin(q + 1, tiles, groups);
        vec* blocks[kTileGroup] = {};
        if (dw)
          for (int64_t k = g0; k < g1; ++k) blocks[k - g0] = dw_t.data() + (k - k0) * n_in;
        vec* db_g = db_sum.data() + (g0 - k0);
        switch (g1 - g0) {
          case 8: walk_tile_group<8>(p, act, events, b, g0, G.data(), blocks, db_g, dx, q); break;
          case 7: walk_tile_group<7>(p, act, events, b, g0, G.data(), blocks, db_g, dx, q); break;
          case 6: walk_tile_group<6>(p, act, events, b, g0, G.data(), blocks, db_g, dx, q); break;
          case 5: walk_tile_group<5>(p, act, events, b, g0, G.data(), blocks, db_g, dx, q); break;
          case 4: walk_tile_group<4>(p, act, events, b, g0, G.data(), blocks, db_g, dx, q); break;
          case 3: walk_tile_group<3>(p, act, events, b, g0, G.data(), blocks, db_g, dx, q); break;
          case 2: walk_tile_group<2>(p, act, events, b, g0, G.data(), blocks, db_g, dx, q); break;
          default: walk_tile_group<1>(p, act, events, b, g0, G.data(), blocks, db_g, dx, q); break;
        }
      }
    }
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t j0 = k * L, lanes = std::min(L, n_out - j0);
      if (dw)
        for (int64_t l = 0; l < lanes; ++l)
          for (int64_t i = 0; i < n_in; ++i)
            dw[(j0 + l) * n_in + i] = static_cast<scalar_t>(p.scale * dw_t[(k - k0) * n_in + i][l]);
      if (db)
        for (int64_t l = 0; l < lanes; ++l)
          db[j0 + l] = static_cast<scalar_t>(p.scale * db_sum[k - k0][l]);
    }
  });

  if (dx.parts) {  // dx = the groups' partial sums, in group order
    at::parallel_for(0, B, grain_for(T * 8), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t t = 0; t < T; ++t) {
          const int64_t r = b * T + t;
          scalar_t* dx_row = p.dx + (t * B + b) * n_in;
          for (int64_t e = p.prev_ptr[r]; e < p.prev_ptr[r + 1]; ++e) {
            acc_t sum = dx_parts[e];
            for (int64_t q = 1; q < groups; ++q) sum += dx_parts[q * dx.n_prev + e];
            dx_row[p.prev_idx[e]] = static_cast<scalar_t>(p.scale * sum);
          }
        }
    });
  }
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

// Which way dW is cheaper: events cost nnz(x) * N_out (vector adds from L2, tiled above), the
// lazily decayed input trace nnz(x) plus N_in per active entry and per row holding active
// entries, each unit about 8x dearer (gathers, scalar updates). Calibrated with 1 and 2 threads
// on the SHD and Fashion-MNIST layers over b_th (benchmarks/bench_sweeps.py): the trace route
// wins only below ~0.1 % active entries.
enum class DwRoute : int64_t { kAuto = 0, kEvents = 1, kActive = 2 };

// dx on the producer's active set costs |A_prev| * N_out dot products; dx everywhere through the
// reverse trace in input space costs |injections| * N_in plus one N_in-wide decay per (b, t).
// Both are correct (the producer reads dx only on its active set), so take the cheaper.
inline bool restrict_dx_to_producer(int64_t n_prev, int64_t n_active, int64_t T, int64_t B,
                                    int64_t n_in, int64_t n_out) {
  const double restricted = double(n_prev) * double(n_out);
  const double full = (double(n_active) + 0.25 * double(T) * double(B)) * double(n_in);
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
