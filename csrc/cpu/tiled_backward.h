// The reverse-time walk of the LIF and readout backwards by input events ("events route"), in
// tiles of output neurons held in SIMD registers. CPU only (the CUDA build does not include it).
//
// Each neuron's trace G[:, b, j] depends only on its own injections, so the output neurons split
// into tiles of one register (L = 64 / sizeof(acc_t) lanes) and the tiles into fixed groups of at
// most kTileGroup (the split depends on N_out only). A task owns whole groups; per batch element
// it walks t = T-1 .. 0 once with the group's traces in registers, and at each step
//   - adds the step's injections (the walk's only scatter, through a small L1 buffer),
//   - decays the trace (G[t] = alpha G[t+1] + delta[t]; alpha(1 - R[t+1]) under reset to zero),
//   - adds G to db and keeps it in a buffer G [T][R] (L2),
//   - writes the group's share of dx at each entry (t, b, i) of the producer's active set:
//     sum over the group's neurons of G[t, j] W[j, i];
// then, for every input i of the element, sums G over i's event times in registers (the events
// of b grouped by input, once per call: events_by_input) and adds the sum to dW^T[i, group] once.
// (Adding G to dW^T at every event instead, in row order, moves every dW^T line in and out of L1
// per event: twice the cache traffic of reading G rows, measured slower than the regrouping.)
// Each part of dW and db has one writer and is summed in a fixed order (b ascending, then fixed
// orders within b); restricted dx is the groups' partial sums added in group order, so nothing
// depends on the thread count.
// Work: nnz(x) * N_out / L vector loads and adds from L2, (rows with gradient) * N_out / L for
// the walk, |A_prev| * N_out / L multiply-adds for restricted dx; no zero-filled dense buffers
// except dx itself.
#pragma once

#include <memory>
#include <type_traits>

#include "cpu/trace_backward.h"  // EventsByInput, events_by_input, kTileGroup

namespace sparsegrad {
namespace cpu {

// At least this many groups when there are that many tiles (so small layers use two threads);
// every extra group adds a partial sum per restricted dx entry.
constexpr int64_t kMinGroups = 2;

inline int64_t tile_group_count(int64_t tiles) {
  return std::max((tiles + kTileGroup - 1) / kTileGroup, std::min(tiles, kMinGroups));
}

inline int64_t tile_group_begin(int64_t g, int64_t tiles, int64_t groups) { return g * tiles / groups; }

// Rows b*T + t of entries (j, delta): the injections into the trace.
template <typename acc_t>
struct DeltaRows {
  const int64_t* off = nullptr;  // [B*T + 1]
  const int32_t* idx = nullptr;
  const acc_t* delta = nullptr;
};

// delta[e] = dL/dS * surrogate at each active entry (rows b*T + t): computed once, read by every
// tile group's walk in order (the LIF layer's SparseInject, the neuron ops' reverse walk). A pass
// of its own, so that the walks read it sequentially instead of dL/dS at scattered rows.
template <typename scalar_t>
std::unique_ptr<at::opmath_type<scalar_t>[]> active_deltas(const scalar_t* gS, const int64_t* off,
                                                           const int32_t* idx, const scalar_t* sg,
                                                           int64_t T, int64_t B, int64_t n_out) {
  using acc_t = at::opmath_type<scalar_t>;
  profile::Scope timer(profile::kBwdDeltas);
  const int64_t n = off[B * T];
  std::unique_ptr<acc_t[]> delta(new acc_t[std::max<int64_t>(1, n)]);
  // The rows of dL/dS an element reads are B * N_out apart: fetch them a few steps ahead.
  // (Walking t-major instead, in dL/dS's memory order, measured slower: the compact arrays are
  // b-major.)
  constexpr int64_t kAhead = 8;
  at::parallel_for(0, B, grain_for(T + n / std::max<int64_t>(B, 1)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t t = 0; t < T; ++t) {
        if (t + kAhead < T) {
          const int64_t ra = b * T + t + kAhead;
          const scalar_t* g_ahead = gS + ((t + kAhead) * B + b) * n_out;
          for (int64_t e = off[ra]; e < off[ra + 1]; ++e) __builtin_prefetch(g_ahead + idx[e]);
        }
        const scalar_t* g_row = gS + (t * B + b) * n_out;
        const int64_t r = b * T + t;
        for (int64_t e = off[r]; e < off[r + 1]; ++e)
          delta[e] = static_cast<acc_t>(g_row[idx[e]]) * static_cast<acc_t>(sg[e]);
      }
  });
  return delta;
}

template <typename scalar_t>
struct TiledProblem {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t T = 0, B = 0, n_in = 0, n_out = 0;
  acc_t alpha = 0, scale = 1;
  const scalar_t* g_init = nullptr;   // [B, N_out]: dL/dV_final, or null
  const int32_t* rst_bits = nullptr;  // reset to zero: [T, B, words], or null
  // input events (dW), rows b*T + t
  const int64_t* ev_off = nullptr;
  const int32_t* ev_idx = nullptr;
  const scalar_t* ev_val = nullptr;   // null: binary
  const EventsByInput<scalar_t>* by_input = nullptr;  // set by tiled_backward when dw is wanted
  // the producer's active set (restricted dx), rows b*T + t
  const int64_t* prev_off = nullptr;
  const int32_t* prev_idx = nullptr;
  const scalar_t* weight_t = nullptr;  // W^T padded, [N_in, tiles * L] (restricted dx)
  int64_t width = 0;                   // tiles * L
  // outputs, null when not wanted
  scalar_t* dw = nullptr;  // [N_out, N_in]
  scalar_t* db = nullptr;  // [N_out]
  scalar_t* dv = nullptr;  // [B, N_out]
  scalar_t* dx = nullptr;  // [T, B, N_in], written whole (zeros outside the producer's set)
};

// Injections of one row into lanes j_lo .. j_lo + span of buf (zeroed here); returns whether any
// entry fell inside. Entries of other groups land in the slot past the span: no branch.
template <typename acc_t>
struct SparseInject {
  DeltaRows<acc_t> rows;
  int64_t T = 0;
  bool operator()(int64_t b, int64_t t, int64_t j_lo, int64_t span, acc_t* buf) const {
    std::fill(buf, buf + span, acc_t(0));
    const int64_t r = b * T + t;
    bool any = false;
    for (int64_t e = rows.off[r]; e < rows.off[r + 1]; ++e) {
      const int64_t j = rows.idx[e] - j_lo;
      const bool inside = static_cast<uint64_t>(j) < static_cast<uint64_t>(span);
      buf[inside ? j : span] = rows.delta[e];
      any |= inside;
    }
    return any;
  }
};

// out[k] = lane_tree_sum(v[k]) for k < n <= L, with the same bits. With AVX-512 and floats,
// 16 sums at once: the four levels of the lane tree (lanes l + 8, l + 4, l + 2, l + 1) done across
// the vectors by shuffles, 45 instructions for 16 sums instead of 8 per sum.
template <typename acc_t>
inline void lane_tree_sums(typename TileVec<acc_t>::type* v, int64_t n, acc_t* out) {
  constexpr int64_t L = tile_lanes<acc_t>();
  for (int64_t k = 0; k < n; ++k) out[k] = lane_tree_sum<L, acc_t>(v[k]);
}

#if defined(__AVX512F__)
// (GCC's _mm512_shuffle_f32x4 passes _mm512_undefined_ps() as its unused source operand, which
// -Wmaybe-uninitialized reports once inlined.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
template <>
inline void lane_tree_sums<float>(typename TileVec<float>::type* v, int64_t n, float* out) {
  if (n < 6) {  // the batched tree pays off from a handful of sums
    for (int64_t k = 0; k < n; ++k) out[k] = lane_tree_sum<16, float>(v[k]);
    return;
  }
  __m512 s[16];
  for (int k = 0; k < 16; ++k) s[k] = k < n ? reinterpret_cast<__m512>(v[k]) : _mm512_setzero_ps();
  // level 1: lanes l + (l + 8); u[i] holds vector 2i in lanes 0-7 and vector 2i+1 in lanes 8-15
  __m512 u[8];
  for (int i = 0; i < 8; ++i)
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], 0xEE));
  // level 2: (l) + (l + 4); quarter q of w[i] holds vector 4i + q, lanes 0-3
  __m512 w[4];
  for (int i = 0; i < 4; ++i)
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
  // level 3: (l) + (l + 2) within each quarter: [a0 + a2, a1 + a3, b0 + b2, b1 + b3]
  __m512 x[2];
  for (int i = 0; i < 2; ++i)
    x[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // level 4: (0) + (1); lane 4q + m of y = vector q + 4m
  const __m512 y = _mm512_add_ps(_mm512_shuffle_ps(x[0], x[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(x[0], x[1], _MM_SHUFFLE(3, 1, 3, 1)));
  // vector k = q + 4m sits in lane 4q + m: gather lane 4(k % 4) + k / 4
  const __m512i perm = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  const __m512 r = _mm512_permutexvar_ps(perm, y);
  _mm512_mask_storeu_ps(out, static_cast<__mmask16>((1u << n) - 1u), r);
}
#pragma GCC diagnostic pop
#endif

template <typename acc_t>
inline typename TileVec<acc_t>::type keep_lanes(const int32_t* bits, int64_t j0, int64_t n_out) {
  constexpr int64_t L = tile_lanes<acc_t>();
  typename TileVec<acc_t>::type m;
  for (int64_t l = 0; l < L; ++l) m[l] = (j0 + l < n_out && test_bit(bits, j0 + l)) ? acc_t(0) : acc_t(1);
  return m;
}

// For every input i of element b, adds the sum of G [T][R] over i's event times to dw_t[i][r]:
// one pass over the event times serves R tiles.
template <int R, typename scalar_t, typename vec>
void add_event_sums(const vec* G, const EventsByInput<scalar_t>& by_input, int64_t b, int64_t n_in,
                    vec* dw_t) {
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
        SG_UNROLL_8
        for (int r = 0; r < R; ++r) sum[r] += v * row[r];
      }
    } else {
      for (int64_t q = q0; q < q1; ++q) {
        const vec* row = G + int64_t(times[q]) * R;
        SG_UNROLL_8
        for (int r = 0; r < R; ++r) sum[r] += row[r];
      }
    }
    vec* d = dw_t + i * R;
    SG_UNROLL_8
    for (int r = 0; r < R; ++r) d[r] += sum[r];
  }
}

// One group (tiles g0 .. g0+R-1) over every batch element. dw_t: [N_in][R] vectors (zeroed), db:
// [R] vectors, dx_part: [|A_prev|] or null.
template <int R, typename scalar_t, typename Inject>
void walk_group(const TiledProblem<scalar_t>& p, const Inject& inject, int64_t g0,
                typename TileVec<at::opmath_type<scalar_t>>::type* dw_t,
                typename TileVec<at::opmath_type<scalar_t>>::type* db_sum,
                at::opmath_type<scalar_t>* dx_part) {
  using acc_t = at::opmath_type<scalar_t>;
  using vec = typename TileVec<acc_t>::type;
  constexpr int64_t L = tile_lanes<acc_t>(), kSpan = R * L;
  const int64_t T = p.T, B = p.B, n_out = p.n_out, j_lo = g0 * L, words = bit_words(n_out);
  const acc_t alpha = p.alpha;
  alignas(kTileBytes) acc_t buf[kSpan + L];
  std::unique_ptr<vec[]> G(dw_t ? new vec[std::max<int64_t>(1, T) * R] : nullptr);  // [T][R]
  for (int64_t b = 0; b < B; ++b) {
    profile::Scope timer(profile::kBwdWalk);
    vec g[R], db_b[R];
    bool live = p.g_init != nullptr;
    SG_UNROLL_8
    for (int r = 0; r < R; ++r) {
      g[r] = db_b[r] = vec{};
      if (p.g_init)
        for (int64_t l = 0; l < L && j_lo + r * L + l < n_out; ++l)
          g[r][l] = static_cast<acc_t>(p.g_init[b * n_out + j_lo + r * L + l]);
    }
    for (int64_t t = T - 1; t >= 0; --t) {
      const bool injected = inject(b, t, j_lo, kSpan, buf);
      const int64_t r_row = b * T + t;
      if (!live && !injected) {  // G is still exactly 0: nothing reaches dW, db or dx yet
        if (dw_t)
          SG_UNROLL_8
          for (int r = 0; r < R; ++r) G[t * R + r] = vec{};
        if (dx_part)
          for (int64_t e = p.prev_off[r_row]; e < p.prev_off[r_row + 1]; ++e) dx_part[e] = acc_t(0);
        continue;
      }
      live = true;
      if (t < T - 1) {
        if (p.rst_bits) {  // reset to zero: a spike at t+1 cuts the neuron's trace
          const int32_t* cut = p.rst_bits + ((t + 1) * B + b) * words;
          SG_UNROLL_8
          for (int r = 0; r < R; ++r) g[r] *= keep_lanes<acc_t>(cut, j_lo + r * L, n_out);
        }
        SG_UNROLL_8
        for (int r = 0; r < R; ++r) g[r] = g[r] * alpha;
      }
      SG_UNROLL_8
      for (int r = 0; r < R; ++r) {
        vec add;
        __builtin_memcpy(&add, buf + r * L, sizeof(vec));
        g[r] += add;
        db_b[r] += g[r];
      }
      if (dw_t)
        SG_UNROLL_8
        for (int r = 0; r < R; ++r) G[t * R + r] = g[r];
      if (dx_part) {
        static_assert(std::is_same<scalar_t, acc_t>::value, "W^T rows are loaded as acc_t vectors");
        const int64_t e_end = p.prev_off[r_row + 1];
        for (int64_t e0 = p.prev_off[r_row]; e0 < e_end; e0 += L) {  // L entries at a time
          const int64_t n = std::min<int64_t>(L, e_end - e0);
          vec sums[L];
          for (int64_t k = 0; k < n; ++k) {
            const scalar_t* w = p.weight_t + int64_t(p.prev_idx[e0 + k]) * p.width + j_lo;
            vec sum{};
            SG_UNROLL_8
            for (int r = 0; r < R; ++r) {
              vec wr;
              __builtin_memcpy(&wr, w + r * L, sizeof(vec));
              sum += g[r] * wr;
            }
            sums[k] = sum;
          }
          lane_tree_sums<acc_t>(sums, n, dx_part + e0);
        }
      }
    }
    if (dw_t && live) {
      timer.next(profile::kBwdEventSums);
      add_event_sums<R>(G.get(), *p.by_input, b, p.n_in, dw_t);
    }
    timer.stop();
    SG_UNROLL_8
    for (int r = 0; r < R; ++r) db_sum[r] += db_b[r];
    if (p.dv) {
      const int32_t* cut = p.rst_bits ? p.rst_bits + b * words : nullptr;  // R[0] = s_init
      for (int r = 0; r < R; ++r) {
        vec dv = g[r] * alpha;
        if (cut) dv *= keep_lanes<acc_t>(cut, j_lo + r * L, n_out);
        for (int64_t l = 0; l < L && j_lo + r * L + l < n_out; ++l)
          p.dv[b * n_out + j_lo + r * L + l] = static_cast<scalar_t>(dv[l]);
      }
    }
  }
}

template <typename scalar_t, typename Inject>
void dispatch_group(int R, const TiledProblem<scalar_t>& p, const Inject& inject, int64_t g0,
                    typename TileVec<at::opmath_type<scalar_t>>::type* dw_t,
                    typename TileVec<at::opmath_type<scalar_t>>::type* db_sum,
                    at::opmath_type<scalar_t>* dx_part) {
  switch (R) {
    case 8: walk_group<8, scalar_t>(p, inject, g0, dw_t, db_sum, dx_part); break;
    case 7: walk_group<7, scalar_t>(p, inject, g0, dw_t, db_sum, dx_part); break;
    case 6: walk_group<6, scalar_t>(p, inject, g0, dw_t, db_sum, dx_part); break;
    case 5: walk_group<5, scalar_t>(p, inject, g0, dw_t, db_sum, dx_part); break;
    case 4: walk_group<4, scalar_t>(p, inject, g0, dw_t, db_sum, dx_part); break;
    case 3: walk_group<3, scalar_t>(p, inject, g0, dw_t, db_sum, dx_part); break;
    case 2: walk_group<2, scalar_t>(p, inject, g0, dw_t, db_sum, dx_part); break;
    default: walk_group<1, scalar_t>(p, inject, g0, dw_t, db_sum, dx_part); break;
  }
}

// Writes dx [T, B, N_in] whole: zeros, and at each producer entry the groups' partial sums
// (parts [groups][n_prev]) in group order, times scale. One batch element at a time, its rows
// t = 0 .. T-1 in the CSR's order (rows b*T + t), so that parts is read sequentially (a t-major
// walk reads it in B scattered runs per step: measured 3-4x slower at SHD size); each row is staged
// in a small buffer and streamed out, so dx is written once and never read.
template <typename scalar_t>
void write_restricted_dx(const TiledProblem<scalar_t>& p, const at::opmath_type<scalar_t>* parts,
                         int64_t groups, int64_t n_prev) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = p.T, B = p.B, n_in = p.n_in;
  if (T * B * n_in == 0) return;
  profile::Scope timer(profile::kBwdDxWrite);
  at::parallel_for(0, B, grain_for(T * n_in / 4 + 1), [&](int64_t b0, int64_t b1) {
    std::unique_ptr<scalar_t[]> row(new scalar_t[n_in]);
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t t = 0; t < T; ++t) {
        std::fill(row.get(), row.get() + n_in, scalar_t(0));
        const int64_t r = b * T + t;
        for (int64_t e = p.prev_off[r]; e < p.prev_off[r + 1]; ++e) {
          acc_t sum = groups > 0 ? parts[e] : acc_t(0);
          for (int64_t q = 1; q < groups; ++q) sum += parts[q * n_prev + e];
          row[p.prev_idx[e]] = static_cast<scalar_t>(p.scale * sum);
        }
        stream_copy(p.dx + (t * B + b) * n_in, row.get(), n_in);
      }
    stream_fence();
  });
}

// A readout walk's sizes and decay (TiledProblem or TraceProblem): U = alpha U + (1 - alpha) I.
template <class Problem, typename acc_t>
void set_readout_dims(Problem& p, int64_t T, int64_t B, int64_t n_in, int64_t n_out, acc_t alpha) {
  p.T = T; p.B = B; p.n_in = n_in; p.n_out = n_out;
  p.alpha = alpha;
  p.scale = acc_t(1) - alpha;
}

// The problem of a walk with trace decay alpha fed by dL/dU (the readout, and the fused
// tensor-parameter layer at alpha = 0): dW by x's events, db, and dx on the producer's set when
// prev_ptr is given (W^T padded into weight_t, which the caller keeps alive). The outputs are the
// tensors given, or null where undefined.
template <typename scalar_t>
TiledProblem<scalar_t> events_problem(int64_t T, int64_t B, const at::Tensor& weight,
                                      const at::Tensor& ev_ptr, const at::Tensor& ev_idx,
                                      const at::Tensor& ev_val,
                                      const c10::optional<at::Tensor>& prev_ptr,
                                      const c10::optional<at::Tensor>& prev_idx, double alpha,
                                      at::Tensor& weight_t, const at::Tensor& dx,
                                      const at::Tensor& dw, const at::Tensor& db) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n_out = weight.size(0), n_in = weight.size(1);
  TiledProblem<scalar_t> p;
  set_readout_dims(p, T, B, n_in, n_out, static_cast<acc_t>(alpha));
  p.ev_off = ev_ptr.data_ptr<int64_t>();
  p.ev_idx = ev_idx.data_ptr<int32_t>();
  p.ev_val = ev_val.numel() > 0 ? ev_val.data_ptr<scalar_t>() : nullptr;
  if (dx.defined() && prev_ptr.has_value()) {
    p.width = Padded<acc_t>::width(n_out);
    weight_t = at::zeros({n_in, p.width}, weight.options());
    if (weight.numel() > 0) weight_t.narrow(1, 0, n_out).copy_(weight.t());
    p.weight_t = weight_t.data_ptr<scalar_t>();
    p.prev_off = prev_ptr->data_ptr<int64_t>();
    p.prev_idx = prev_idx->data_ptr<int32_t>();
    p.dx = dx.data_ptr<scalar_t>();
  }
  p.dw = dw.defined() ? dw.data_ptr<scalar_t>() : nullptr;
  p.db = db.defined() ? db.data_ptr<scalar_t>() : nullptr;
  return p;
}

// dW, db, dv and (with prev_off) restricted dx of p, by the tiled walk.
template <typename scalar_t, typename Inject>
void tiled_backward(const TiledProblem<scalar_t>& p_in, const Inject& inject) {
  TiledProblem<scalar_t> p = p_in;
  EventsByInput<scalar_t> by_input;
  if (p.dw && p.n_out > 0) {
    by_input = events_by_input<scalar_t>(p.ev_off, p.ev_idx, p.ev_val, p.T, p.B, p.n_in);
    p.by_input = &by_input;
  }
  using acc_t = at::opmath_type<scalar_t>;
  using vec = typename TileVec<acc_t>::type;
  constexpr int64_t L = tile_lanes<acc_t>();
  const int64_t B = p.B, T = p.T, n_in = p.n_in, n_out = p.n_out;
  const int64_t tiles = (n_out + L - 1) / L, groups = tile_group_count(tiles);
  const bool restricted = p.dx && p.prev_off;
  const int64_t n_prev = restricted ? p.prev_off[B * T] : 0;
  std::unique_ptr<acc_t[]> parts(restricted ? new acc_t[std::max<int64_t>(1, groups * n_prev)] : nullptr);
  if (tiles > 0) {
    at::parallel_for(0, groups, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t g0 = tile_group_begin(q, tiles, groups), g1 = tile_group_begin(q + 1, tiles, groups);
        const int R = static_cast<int>(g1 - g0);
        std::unique_ptr<vec[]> dw_t(p.dw ? new vec[n_in * R] : nullptr);
        if (p.dw) std::fill(dw_t.get(), dw_t.get() + n_in * R, vec{});
        vec db_sum[kTileGroup] = {};
        dispatch_group<scalar_t>(R, p, inject, g0, dw_t.get(), db_sum, restricted ? parts.get() + q * n_prev : nullptr);
        for (int r = 0; r < R; ++r) {
          const int64_t j0 = (g0 + r) * L, lanes = std::min(L, n_out - j0);
          if (p.dw)
            for (int64_t l = 0; l < lanes; ++l)
              for (int64_t i = 0; i < n_in; ++i)
                p.dw[(j0 + l) * n_in + i] = static_cast<scalar_t>(p.scale * dw_t[i * R + r][l]);
          if (p.db)
            for (int64_t l = 0; l < lanes; ++l) p.db[j0 + l] = static_cast<scalar_t>(p.scale * db_sum[r][l]);
        }
      }
    });
  }
  if (restricted) write_restricted_dx<scalar_t>(p, parts.get(), tiles > 0 ? groups : 0, n_prev);
}

}  // namespace cpu
}  // namespace sparsegrad
